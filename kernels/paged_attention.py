"""Causal prefill attention over a paged KV cache: packed varlen queries, a prefix already in pages plus a chunk.

The maths. The engine's prefill step packs the new tokens of B sequences into q (total_q, Hq, D); sequence b's
q_len_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b] queries are its newest tokens, at positions
ctx_b - q_len_b .. ctx_b - 1 with ctx_b = seq_lens[b] (prefix + chunk; the chunk's keys already written to the
pages by ``rope_write_paged_cache``). Query i of sequence b, at position p = ctx_b - q_len_b + i, attends causally:

    out[i] = sum_{j <= p} softmax_j(scale * q[i] . k_b[j]) * v_b[j],    k_b[j] = k_pages[block_tables[b, j // PAGE],
                                                                                          j % PAGE]

It is kernels/attention.py's flash attention (its docstring has the online softmax) with two changes, both in
the addressing: a program's (sequence, query offset) comes from cu_seqlens_q instead of a (B, T) grid, and its
keys from the block table — ``_attend_blocks``, the same inner loop with the PAGE_SIZE switch, each key's page
gathered a block ahead (attention.py's ``block_pages``; kernels/decode.py says why a block ahead). So prefix
caching and chunked prefill are one launch: a chunk after a cached prefix is just ctx_b > q_len_b.

Grid: (ceil(max_q_len * G / BLOCK_M), B * Hkv), heaviest query tiles first; a program past its sequence's
q_len_b * G rows returns at once. GQA as in attention.py: the G query heads of a kv head share the M tile.

Work and floor. Per sequence and head P_b = q_len_b * (ctx_b - q_len_b) + q_len_b (q_len_b + 1) / 2 query/key
pairs: 4 D P FLOPs (two products) over all heads, the same compute floor as the slab's prefill (FLOPs / peak
tensor throughput: a 2048-token chunk after a 6144-token cached prefix of Llama-3-8B is 4.3e11 FLOPs a layer,
0.44 ms at an H100 SXM's 989 TFLOP/s dense bf16). Bytes: q, out and each sequence's live K/V once per query
tile row of programs, plus 4 bytes of block table per key and tile; compute-bound for any chunk of a few hundred
tokens (the short-chunk end, q_len * G <= 16, reads like decode and is memory-bound: bytes / bandwidth).

Configs: no autotuning yet (a GPU has to measure it first): 64-row tiles, 16 rows when every sequence's chunk
fits in one (q_len * G <= 16, decode-like), 32-key blocks (within sm_80's register budget for mma.sync's
register operand at D = 128, attention.py's ``_allowed``); fp32 (tests) 16 x 16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import (
    PAGE_SIZES,
    PagedCache,
    aligned_strides,
    capturing,
    check_index,
    check_scale,
    check_tensor,
    interpreting,
    variant,
)
from llama3_triton.kernels.attention import _attend_blocks

__all__ = ["paged_prefill_attention", "compile_variants"]

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HALF_CONFIGS = [(64, 32, 4, 3), (16, 32, 4, 3)]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
# fp32 (tests only) by head dim. ptxas leaves small stack frames (STL/LDL) in neighbouring configs: 2 stages at
# D = 64 on sm_80 (triton 3.9), (16, 16, 4, 1) at D = 128 on sm_80 (triton 3.6), 2 warps or BLOCK_M = 32 at
# D = 128 everywhere; these two compile clean with both triton versions the project supports.
_FP32_CONFIGS = {64: (16, 16, 4, 1), 128: (16, 32, 8, 1)}


@triton.jit(
    do_not_specialize=["H_KV", "G", "pages_per_seq", "n_pages"],
    do_not_specialize_on_alignment=["CuSeqlensQ", "SeqLens", "BlockTables"],
)
def _paged_prefill_kernel(
    Q,  # (total_q, Hq, D) the new tokens' queries, packed sequence after sequence
    K,  # (num_pages, PAGE_SIZE, Hkv, D) key pool
    V,  # (num_pages, PAGE_SIZE, Hkv, D) value pool
    Out,  # (total_q, Hq, D) output
    CuSeqlensQ,  # (B + 1,) int32: sequence b's queries are rows cu[b] .. cu[b + 1] - 1 of Q
    SeqLens,  # (B,) int32: keys of sequence b after this chunk (prefix + chunk)
    BlockTables,  # (B, pages_per_seq) int32
    stride_qt,  # q strides: token, head (the last dim is contiguous)
    stride_qh,
    stride_kp,  # k strides: page, slot, head
    stride_ks,
    stride_kh,
    stride_vp,  # v strides: page, slot, head
    stride_vs,
    stride_vh,
    stride_ot,  # out strides: token, head
    stride_oh,
    H_KV,  # kv heads
    G,  # query heads per kv head
    pages_per_seq,  # block-table row stride
    n_pages,  # pages in the pool
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_M: tl.constexpr,  # (token, head) rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    PAGE_SIZE: tl.constexpr,  # tokens per page
    DOT_FP32: tl.constexpr,  # interpreter + bf16 only: the interpreter computes bf16 dots on raw bits
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles first, as in attention.py
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    h_kv = pid_bh % H_KV
    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    if pid_m * BLOCK_M >= q_len * G:  # this sequence's chunk has fewer rows: nothing to do
        return
    start_pos = tl.load(SeqLens + b) - q_len  # position of the chunk's first token

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = (token r // G, head h_kv * G + r % G)
    row_ok = rows < q_len * G
    tok = tl.minimum(rows // G, q_len - 1)  # padding rows borrow the last token: finite maths, never stored
    head = h_kv * G + rows % G
    q_pos = start_pos + tok
    cols = tl.arange(0, HEAD_DIM)[None, :]
    tok64 = (q_start + tok).to(tl.int64)  # int64: token * stride passes 2^31 on long packed batches
    q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + cols, mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + h_kv * stride_kh  # the head's base in the pool; the pages come from the table
    v_base = V + h_kv * stride_vh
    table = BlockTables + b.to(tl.int64) * pages_per_seq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_pos = start_pos + (pid_m * BLOCK_M) // G
    last_pos = start_pos + tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys [0, full_end) are visible to every row
    acc, l_i, m_i, _, _ = _attend_blocks(
        acc, l_i, m_i, q, k_base, v_base, cols, cols, cols, stride_ks, stride_vs,
        q_pos, 0, full_end, qk_scale, table, n_pages, stride_kp, stride_vp, BLOCK_N, False, DOT_FP32, PAGE_SIZE,
    )  # fmt: skip
    acc, l_i, m_i, _, _ = _attend_blocks(
        acc, l_i, m_i, q, k_base, v_base, cols, cols, cols, stride_ks, stride_vs,
        q_pos, full_end, last_pos + 1, qk_scale, table, n_pages, stride_kp, stride_vp, BLOCK_N, True, DOT_FP32,
        PAGE_SIZE,
    )  # fmt: skip
    out = acc / l_i[:, None]
    o_ptrs = Out + tok64[:, None] * stride_ot + head[:, None] * stride_oh + cols
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


_INTERPRET = interpreting(_paged_prefill_kernel)


def _config(dtype: torch.dtype, head_dim: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the longest chunk's rows = max q_len * G (module docstring)."""
    if dtype == torch.float32:
        return _FP32_CONFIGS[head_dim]
    return _HALF_CONFIGS[1] if rows <= 16 else _HALF_CONFIGS[0]


def paged_prefill_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    max_seqlen_q: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Causal attention of the packed chunks q (total_q, Hq, D) over their sequences' paged caches; see the module
    docstring. k_pages / v_pages (num_pages, PAGE, Hkv, D); cu_seqlens_q (B + 1,), seq_lens (B,) and block_tables
    (B, max_pages_per_seq), int32. Returns (total_q, Hq, D) in q's dtype, into ``out`` when given.

    ``max_seqlen_q``: the longest chunk (sizes the grid); without it, read from cu_seqlens_q (a device sync).
    ``check_values`` (two syncs): cu_seqlens_q starts at 0, rises to total_q, each chunk within its sequence's
    seq_lens, seq_lens within the table's reach, the table entries they use inside the pool."""
    check_tensor("q", q, interpret=_INTERPRET, ndim=3)  # (total_q, Hq, D)
    total_q, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"q: head dim must be 64 or 128, got {D}")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens_q: expected a 1-d (B + 1,) tensor, B >= 1, got {getattr(cu_seqlens_q, 'shape', None)}"
        )
    B = cu_seqlens_q.shape[0] - 1
    check_index("cu_seqlens_q", cu_seqlens_q, device=q.device, shape=(B + 1,), dtypes=(torch.int32,))
    check_index("seq_lens", seq_lens, device=q.device, shape=(B,), dtypes=(torch.int32,))
    paged = PagedCache.check(q, k_pages, v_pages, block_tables, batch=B)
    Hkv = k_pages.shape[2]
    if Hq % Hkv:
        raise ValueError(f"k_pages: kv heads ({Hkv}) must divide the query heads ({Hq})")
    if B * Hkv > 65535:  # grid axis 1, which CUDA caps at 65535
        raise ValueError(f"cu_seqlens_q: expected batch * kv heads <= 65535, got {B} * {Hkv}")
    if max_seqlen_q is not None and not (isinstance(max_seqlen_q, int) and 0 <= max_seqlen_q):
        raise ValueError(f"max_seqlen_q: expected an int >= 0 (the longest chunk), got {max_seqlen_q!r}")
    check_scale(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_tensor("out", out, like=q, shape=q.shape)
    strides = [aligned_strides(n, t, k) for n, t, k in (("q", q, 2), ("k_pages", k_pages, 3),
                                                          ("v_pages", v_pages, 3), ("out", out, 2))]  # fmt: skip
    if (check_values or max_seqlen_q is None) and not capturing(q):
        q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        first, last = cu_seqlens_q[0].long(), cu_seqlens_q[-1].long()
        lo_q, hi_q = torch.aminmax(q_lens)
        over = (q_lens > seq_lens.long()).any().long()
        stats = torch.stack((first, last, lo_q, hi_q, over)).tolist()  # one sync; the table check below another
        if check_values:
            paged.check_lengths(seq_lens, "seq_lens")
            first, last, lo_q, hi_q, over = stats
            if first != 0 or last != total_q or lo_q < 0:
                raise ValueError(
                    f"cu_seqlens_q: expected 0 = cu[0] <= cu[1] <= ... <= cu[B] = total_q = {total_q}, got cu[0] = "
                    f"{first}, cu[B] = {last}, smallest step {lo_q}"
                )
            if over:
                raise ValueError("seq_lens: expected each sequence's keys >= its chunk's queries (prefix + chunk)")
        if max_seqlen_q is None:
            max_seqlen_q = max(stats[3], 0)
    elif max_seqlen_q is None:
        raise ValueError("max_seqlen_q: required while a CUDA graph is being captured (no host sync allowed)")
    if max_seqlen_q == 0 or total_q == 0:
        return out
    G = Hq // Hkv
    qk_scale = (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E
    block_m, block_n, num_warps, num_stages = _config(q.dtype, D, max_seqlen_q * G)
    grid = (triton.cdiv(max_seqlen_q * G, block_m), B * Hkv)
    _paged_prefill_kernel[grid](
        q, k_pages, v_pages, out, cu_seqlens_q, seq_lens, paged.tables, *[s for st in strides for s in st],
        Hkv, G, paged.pages_per_seq, paged.num_pages, qk_scale,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=paged.page,
        DOT_FP32=_INTERPRET and q.dtype == torch.bfloat16, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def compile_variants() -> list[dict]:
    """Every (config, dtype, head dim, page size) the launcher can pick, for the AOT compile gate.
    ``DOT_FP32=True`` is left out: only the interpreter picks it."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    variants = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for m, n, w, s in [_FP32_CONFIGS[d]] if dtype == torch.float32 else _HALF_CONFIGS:
                for page in PAGE_SIZES:
                    types = {x: ptr[dtype] for x in ("Q", "K", "V", "Out")} | {"qk_scale": "fp32"}
                    types |= {x: "*i32" for x in ("CuSeqlensQ", "SeqLens", "BlockTables")}
                    cx = {"HEAD_DIM": d, "BLOCK_M": m, "BLOCK_N": n, "PAGE_SIZE": page, "DOT_FP32": False}
                    name = f"paged_prefill_{str(dtype).split('.')[-1]}_d{d}_m{m}_n{n}_pages{page}"
                    unaligned = ["CuSeqlensQ", "SeqLens", "BlockTables"]
                    variants.append(variant(name, _paged_prefill_kernel, types, cx, w, s, unaligned=unaligned))
    return variants
