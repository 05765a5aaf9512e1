"""The one root of the errors a person can fix, and how a value from outside is shown in one.

``UserError`` is what a person did wrong or must change: an argument, a file, a checkpoint, a prompt, a setting
that does not fit. The command line prints it as one line and exits 1. Every other exception is a bug (or a
failure of what runs beneath: torch, the driver, the disk): the command line prints its type with a hint to rerun
with ``--debug`` for the traceback. ``UserError`` is a ``ValueError``, so ``except ValueError`` still catches it.

A value quoted in a message comes from a file or an argument we did not write: ``shown`` cuts it to ~80
characters and escapes what a terminal would act on (escape sequences, newlines, bidirectional overrides), so that
a 600,000-character field or an ``ESC [2J`` in a chat template cannot flood or repaint the terminal.
``one_line`` does the same to a whole message, the last guard before it is printed.
"""

from __future__ import annotations

VALUE_CHARS = 80  # the most characters of a quoted value
LINE_CHARS = 600  # the most characters of a printed error line


class UserError(ValueError):
    """Something a person can fix, said in one line: what is wrong, where, and what would do instead."""


def _escaped(text: str) -> str:
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text) - limit + 1:,} more characters)"


def shown(value: object, limit: int = VALUE_CHARS) -> str:
    """``value`` as a message quotes it: its repr (a str in quotes), non-printable characters escaped, cut to
    ``limit`` characters with the count of the rest."""
    text = repr(value) if isinstance(value, str) else _escaped(repr(value))
    if len(text) > limit:  # repr of a huge object is computed whole; of a str it is linear and escaped already
        return _cut(text, limit)
    return text


def one_line(message: str, limit: int = LINE_CHARS) -> str:
    """``message`` as one printable line of at most about ``limit`` characters."""
    return _cut(_escaped(message), limit)


__all__ = ["UserError", "shown", "one_line"]
