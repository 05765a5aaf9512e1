"""Hand-written Triton kernels for the hot spots of a Llama-3 forward pass, and their PyTorch twins.

Two backends implement the same ops, the ``Ops`` protocol below, which is all the model driver calls:

    kernels.triton_ops   the Triton kernels, one file each: rmsnorm.py, rope.py, attention.py (prefill),
                         decode.py (split-KV decode), decode_step.py (the decode step's RoPE, cache write,
                         attention and merge in one launch, on decode.py's loop), swiglu.py, gemv.py (the
                         decode step's fused matrix products), paged_attention.py (varlen prefill over a paged
                         KV cache; rope.py, decode.py and decode_step.py take the paged cache too, behind a
                         constexpr switch); _launch.py holds what their launchers share
    kernels.reference    the same functions in plain PyTorch: the definitions the kernels are tested against,
                         and the backend that runs anywhere (its one fast path: a quantized product on a CPU
                         runs on torch's own weight-only kernels, given the weight ``pack_quant`` made for them)

Choosing one is one line: ``ops = kernels.reference`` or ``from kernels import triton_ops as ops``.

``import kernels`` imports neither. Importing a kernel file runs ``@triton.jit``, which reads
``TRITON_INTERPRET`` at that moment; on a machine without a GPU, set ``TRITON_INTERPRET=1`` before the first
``import kernels.triton_ops`` (or of any kernel file) to run the kernels in Triton's interpreter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["Ops"]


class Ops(Protocol):
    """The ops the model driver calls on its backend, one per kernel.

    Prefill and the unfused decode step use the first six around torch's (cuBLAS's) matrix products, and
    ``quant_linear`` for a quantized product of up to 8 rows. The fused decode step (``Llama.decode`` on the Triton
    backend) uses ``linear`` (or ``quant_linear``) and ``rope_decode_attention`` alone: five launches a layer.

    Shapes (Meta's): activations (B, T, heads, head_dim); the KV cache as a (B, S_max, Hkv, head_dim) view.
    The engine's paged ops (``rope_write_paged_cache``, ``paged_*``) take packed tokens instead, and the cache as
    a pool of pages (num_pages, PAGE, Hkv, head_dim) that each sequence reaches through its row of
    ``block_tables`` (B, max_pages_per_seq) int32: position p of sequence b is page block_tables[b, p // PAGE],
    offset p % PAGE, the flat slot page * PAGE + offset.
    Each backend module defines these functions with these parameters (and may take more keywords).
    """

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight over the last dim."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = residual + x; returns (rms_norm(h), h)."""
        ...

    def rope_write_cache(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        check_values: bool = True,
    ) -> torch.Tensor:
        """Returns q rotated by RoPE at ``positions``; writes k rotated, and v, into the caches at those slots."""
        ...

    def rope_write_paged_cache(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        cos_sin: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        *,
        check_values: bool = True,
    ) -> torch.Tensor:
        """The paged cache's ``rope_write_cache``, for N packed tokens: returns q (N, Hq, D) rotated at ``positions``
        (N,); writes k (N, Hkv, D) rotated, and v, to flat slot ``slot_mapping[i]`` = page * PAGE + offset of the
        page pools (num_pages, PAGE, Hkv, D), nothing where the slot is -1 (padding)."""
        ...

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start_pos: int = 0, scale: float | None = None
    ) -> torch.Tensor:
        """Causal attention of q (B, T, Hq, D) at positions start_pos.. over k, v (B, S, Hkv, D)."""
        ...

    def paged_prefill_attention(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        *,
        scale: float | None = None,
        check_values: bool = True,
    ) -> torch.Tensor:
        """Causal attention of packed chunks q (total_q, Hq, D), sequence b's rows cu_seqlens_q[b] ..
        cu_seqlens_q[b + 1] - 1 at positions seq_lens[b] - q_len_b .., over its keys 0 .. seq_lens[b] - 1 (prefix
        and chunk, already in the pages) through block_tables[b]."""
        ...

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lengths: torch.Tensor,
        *,
        check_values: bool = True,
    ) -> torch.Tensor:
        """Attention of one query per sequence, q (B, Hq, D), over keys 0 .. lengths[b] - 1 of the caches."""
        ...

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        *,
        scale: float | None = None,
        check_values: bool = True,
    ) -> torch.Tensor:
        """``decode_attention`` over a paged cache: q (B, Hq, D) over keys 0 .. lengths[b] - 1 of sequence b, key p
        at page block_tables[b, p // PAGE], offset p % PAGE of k_pages / v_pages (num_pages, PAGE, Hkv, D)."""
        ...

    def paged_rope_decode_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_tables: torch.Tensor,
        workspace: object,
        *,
        scale: float | None = None,
    ) -> torch.Tensor:
        """``rope_decode_attention`` over a paged cache: the new k and v go to page block_tables[b, pos // PAGE],
        offset pos % PAGE; attention over keys 0 .. positions[b] through the table. One launch, like the slab's."""
        ...

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up."""
        ...

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        *,
        rms_weight: torch.Tensor | None = None,
        eps: float = 1e-5,
        residual: torch.Tensor | None = None,
        swiglu: bool = False,
        out: torch.Tensor | None = None,
        workspace: object = None,
    ) -> torch.Tensor:
        """x (M, K) @ weight.T for few rows M, with the ops around it fused: RMSNorm(x) * rms_weight instead of
        x, silu(x W1.T) * (x W3.T) of weight = [W1; W3], + residual. Into ``out`` (x's dtype or fp32) if given.
        ``workspace``: kernels.gemv's GemvWorkspace, the scratch of its split-K (one per model)."""
        ...

    def quant_linear(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        group: int,
        *,
        rms_weight: torch.Tensor | None = None,
        eps: float = 1e-5,
        residual: torch.Tensor | None = None,
        swiglu: bool = False,
        out: torch.Tensor | None = None,
        workspace: object = None,
        packed: object = None,
    ) -> torch.Tensor:
        """``linear`` (same fusions, same keywords) with a weight-only quantized weight given as its planes
        (kernels/quant.py's layouts: ``qweight`` int8 or packed 4-bit, ``scales`` and ``mins`` per ``group``
        weights of a row). ``packed``: what this backend's ``pack_quant`` made of these planes, or None."""
        ...

    def pack_quant(
        self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int, dtype: torch.dtype
    ) -> object:
        """The planes as this backend's quantized product reads them best with ``dtype`` activations, made once
        per weight and handed back to ``quant_linear`` as ``packed``; None when the planes serve as they are."""
        ...

    def workspaces(
        self, max_batch: int, n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device
    ) -> tuple[object, object]:
        """The fused decode step's scratch, made once per model: (``rope_decode_attention``'s workspace,
        ``linear``'s and ``quant_linear``'s); (None, None) for a backend that keeps none."""
        ...

    def rope_decode_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        workspace: object,
        *,
        scale: float | None = None,
    ) -> torch.Tensor:
        """A decode step's attention: RoPE of q (B, Hq, D) and the new k (B, Hkv, D) at positions (B,), k and v
        to cache slot positions[b], attention over keys 0 .. positions[b]. ``workspace``: kernels.decode_step's."""
        ...
