"""The one root of the errors a person can fix.

``UserError`` is what a person did wrong or must change: an argument, a file, a checkpoint, a prompt, a setting
that does not fit. The command line prints it as one line and exits 1. Every other exception is a bug (or a
failure of what runs beneath: torch, the driver, the disk): the command line prints its type with a hint to rerun
with ``--debug`` for the traceback. ``UserError`` is a ``ValueError``, so ``except ValueError`` still catches it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something a person can fix, said in one line: what is wrong, where, and what would do instead."""


__all__ = ["UserError"]
