"""The Triton backend: each op of the ``kernels.Ops`` protocol, from the file of its kernel.

Importing this module imports Triton and runs ``@triton.jit`` on every kernel: on a machine without a GPU,
set ``TRITON_INTERPRET=1`` first (the model driver does it for ``backend="triton"`` on the CPU).
"""

import torch

from llama3_triton.kernels.attention import attention
from llama3_triton.kernels.decode import decode_attention, paged_decode_attention
from llama3_triton.kernels.decode_step import DecodeWorkspace, paged_rope_decode_attention, rope_decode_attention
from llama3_triton.kernels.gemv import GemvWorkspace, linear
from llama3_triton.kernels.paged_attention import paged_prefill_attention
from llama3_triton.kernels.quant import pack_quant, quant_linear
from llama3_triton.kernels.rmsnorm import add_rms_norm, rms_norm
from llama3_triton.kernels.rope import rope, rope_write_cache, rope_write_paged_cache
from llama3_triton.kernels.swiglu import swiglu

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "rope",
    "rope_write_cache",
    "rope_write_paged_cache",
    "attention",
    "paged_prefill_attention",
    "decode_attention",
    "paged_decode_attention",
    "paged_rope_decode_attention",
    "swiglu",
    "linear",
    "quant_linear",
    "pack_quant",
    "rope_decode_attention",
    "workspaces",
    "DecodeWorkspace",  # the scratch rope_decode_attention keeps between launches (one per model)
    "GemvWorkspace",  # the scratch of linear's split-K (one per model)
]


def workspaces(
    max_batch: int, n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device
) -> tuple[DecodeWorkspace, GemvWorkspace]:
    """The fused decode step's scratch, made once per model: the attention's split partials and tickets, and the
    products' split-K partials and tickets (one for every layer: launches run one after another)."""
    return DecodeWorkspace(max_batch, n_heads, n_kv_heads, head_dim, device), GemvWorkspace.for_device(device)
