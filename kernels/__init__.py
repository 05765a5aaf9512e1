"""Hand-written Triton kernels for the hot spots of a Llama-3 forward pass.

Each op lives in its own file with a docstring that explains the maths, the bytes it moves and the
floor that follows; ``kernels.reference`` holds the plain-PyTorch twin of each, with the same
signature. On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* importing this package
to run the kernels in Triton's interpreter (the ``@triton.jit`` decorator reads it at import time).
"""

import importlib
from typing import Any

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``import kernels.reference`` (the torch backend) never compiles or interprets a Triton kernel, and so
# that TRITON_INTERPRET can still be set after ``import kernels`` but before the first kernel is used.
_EXPORTS = {
    "rms_norm": "kernels.rmsnorm",
    "add_rms_norm": "kernels.rmsnorm",
    "rope": "kernels.rope",
    "rope_inv_freq": "kernels.reference",
    "attention": "kernels.attention",
    "decode_attention": "kernels.decode",
    "swiglu": "kernels.swiglu",
    "reference": "kernels.reference",
}


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
    "attention",
    "decode_attention",
    "swiglu",
]
