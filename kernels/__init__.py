"""Hand-written Triton kernels for the hot spots of a Llama-3 forward pass.

Each op lives in its own file with a docstring that explains the maths, the bytes it moves and the
floor that follows; ``kernels.reference`` holds the plain-PyTorch twin of each, with the same
signature. On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* importing this package
to run the kernels in Triton's interpreter (the ``@triton.jit`` decorator reads it at import time).
"""

from kernels import reference
from kernels.attention import attention
from kernels.decode import decode_attention
from kernels.reference import rope_inv_freq
from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.rope import rope
from kernels.swiglu import swiglu

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
