"""One import name, two packages: this project's ``kernels/`` and Hugging Face's ``kernels`` (PyPI: kernels).

transformers >= 5.25 depends on Hugging Face's ``kernels``, so most environments that hold transformers now hold a
top-level package of the same name as ours, in site-packages. Which one ``import kernels`` finds depends on the
order of ``sys.path``: from the repository root (``python -m model.cli``, ``python -m pytest``) the working
directory comes first and ours is found; from the console script (``llama3-triton``), or anywhere else with an
editable install, site-packages comes first and theirs is found, and ``from kernels import Ops`` fails.

Two explicit fixes, no renaming (DESIGN.md's public API is ``import kernels``):

- ``bind()``, run when the ``model`` package is imported: if ``kernels`` would resolve to any package but the
  ``kernels/`` beside ``model/``, a finder placed first on ``sys.meta_path`` resolves that one name to ours. A
  process that imported Hugging Face's first gets a one-line ImportError: one name cannot hold both.
- ``hide_hub_kernels()``, run before transformers is imported where both are used in one process (the tests, the
  CPU benchmark's peer): transformers imports Hugging Face's ``kernels`` at import time wherever its package
  metadata is installed, and would find ours; it is told that hub kernels are unavailable, which is so here
  (they are CUDA kernels fetched from the Hub, never used by this project's CPU reference checks).

A regular (not editable) ``pip install .`` puts our ``kernels/`` into site-packages over theirs: install this
project editable (``pip install -e .``), as the README does.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

OURS = Path(__file__).resolve().parent.parent / "kernels"


def _is_ours(origin: str | None) -> bool:
    return origin is not None and Path(origin).resolve().parent == OURS


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the top-level name ``kernels`` as this project's package, ahead of sys.path (its submodules follow from
    its ``__path__``). Nothing is imported until something imports ``kernels``: the command line's start stays
    free of torch."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "kernels":
            return None
        return importlib.util.spec_from_file_location(
            "kernels", OURS / "__init__.py", submodule_search_locations=[str(OURS)]
        )


def bind() -> None:
    """Make ``import kernels`` find this project's kernels/ package (a no-op where it already does)."""
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        if _is_ours(getattr(loaded, "__file__", None)):
            return
        raise ImportError(
            f"the module 'kernels' already imported is {getattr(loaded, '__file__', loaded)!r}, not this project's "
            f"({OURS}): Hugging Face's kernels package shares its name; import model before it"
        )
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    spec = importlib.util.find_spec("kernels")
    if spec is not None and _is_ours(spec.origin):
        return
    if not (OURS / "__init__.py").is_file():
        raise ImportError(f"this project's kernels package is missing: no {OURS / '__init__.py'}")
    sys.meta_path.insert(0, _Finder())


def hide_hub_kernels() -> None:
    """Tell transformers (if installed) that Hugging Face's hub kernels are unavailable and off, so that it never
    imports the name ``kernels`` (ours). Sets ``USE_HUB_KERNELS=NO`` (transformers' own switch: from 5.25 its
    ``from_pretrained`` turns hub kernels on by default), and patches ``is_kernels_available`` (checked at import
    time) where transformers defines and re-exports it, in every transformers module already imported; later imports
    bind the patched function. An older transformers without the function never imports ``kernels``."""
    os.environ["USE_HUB_KERNELS"] = "NO"  # not setdefault: in this process they cannot load, whatever was asked
    if importlib.util.find_spec("transformers") is None:
        return
    import transformers.utils.import_utils as import_utils

    original = getattr(import_utils, "is_kernels_available", None)
    if original is None or getattr(original, "_llama3_triton_off", False):
        return

    def is_kernels_available(*args, **kwargs) -> bool:
        return False

    is_kernels_available._llama3_triton_off = True
    for name, module in list(sys.modules.items()):
        if (name == "transformers" or name.startswith("transformers.")) and module is not None:
            if vars(module).get("is_kernels_available") is original:  # vars: no lazy module loads anything
                module.is_kernels_available = is_kernels_available
