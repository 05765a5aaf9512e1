"""Hand-written Triton kernels for the hot spots of a Llama-3 forward pass.

Each op lives in its own file with a docstring that explains the maths, the bytes it moves and the
floor that follows; ``kernels.reference`` holds the plain-PyTorch twin of each, with the same
signature. On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* importing this package
to run the kernels in Triton's interpreter (the ``@triton.jit`` decorator reads it at import time).
"""

import importlib
import sys
import types
from typing import Any

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``import kernels.reference`` (the torch backend) never compiles or interprets a Triton kernel, and so
# that TRITON_INTERPRET can still be set after ``import kernels`` but before the first kernel is used.
_EXPORTS = {
    "rms_norm": "kernels.rmsnorm",
    "add_rms_norm": "kernels.rmsnorm",
    "rope": "kernels.rope",
    "rope_inv_freq": "kernels.reference",
    "rope_table": "kernels.reference",
    "attention": "kernels.attention",
    "decode_attention": "kernels.decode",
    "swiglu": "kernels.swiglu",
    "reference": "kernels.reference",
}


class _KernelsPackage(types.ModuleType):
    """``kernels.rope`` is the function, though ``kernels/rope.py`` is also a module named ``kernels.rope``.

    Importing a submodule binds it as an attribute of its package, which would shadow the function of
    the same name (``kernels.attention`` would become the module once anything ran
    ``from kernels.attention import ...``). This package class keeps the function there instead; the
    modules stay reachable through ``sys.modules`` / ``importlib.import_module("kernels.attention")``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "reference" else getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    "reference",
    "rms_norm",
    "add_rms_norm",
    "rope",
    "rope_inv_freq",
    "rope_table",
    "attention",
    "decode_attention",
    "swiglu",
]
