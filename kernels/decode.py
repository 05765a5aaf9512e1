"""Split-KV decode attention ("flash-decoding"): one new query token per sequence against its KV cache.

The maths. Sequence b has lengths[b] = L cached keys (the new token's own key already written at L - 1).
For query head h, reading kv head h // G (G = Hq // Hkv):

    out[b, h] = sum_{j < L} softmax_j(scale * q[b, h] . k[b, j]) * v[b, j]

Why split. With one query row per head there is little parallelism: B * Hkv programs (8 for Llama-3-8B at
batch 1) cannot keep 132 SMs busy streaming the cache. So the L keys are cut into ``num_splits`` ranges and
each (b, kv head, split) gets its own program (stage 1), which runs an online softmax over its range (see
kernels/attention.py for that recurrence) and writes two things per query head: its normalised partial
output o_s = sum_{j in s} exp(x_j - lse_s) v_j and the log-sum-exp of its scores lse_s = log sum_{j in s}
exp(x_j). Stage 2 merges the splits exactly, because softmax over the union is a weighted mean of the
per-split softmaxes, each weighted by its share of the total mass:

    LSE = log sum_s exp(lse_s)            out = sum_s exp(lse_s - LSE) * o_s

(computed with max-subtraction, in log2 units as the kernels use exp2). The splits are sized from each
sequence's own length, on the device: of the ``num_splits`` programs launched for a sequence, only
``used = min(num_splits, ceil(L / min_keys))`` get keys (chunk = L / used, rounded up to whole key blocks, at
least ``min_keys`` = 256 keys each, so a split's fixed cost stays small next to its keys); the others return
at once, writing nothing, and stage 2 reads the ``used`` partials alone. At 100 tokens in an 8192-slot
cache one split works and no empty partial is written or read.

GQA: the G query heads that share a kv head are one program's M tile (G rows padded to 16, the smallest
tensor-core tile), so each K/V block is read from memory once for all G heads, never repeated.

CUDA graphs: num_splits (the grid) comes from S_max, B, Hkv and the SM count — never from the values in
``lengths``, which only the kernels read — so the launch is identical on every step and can be captured;
the host check of ``lengths`` is skipped while the stream is capturing, and the kernels clamp every length
to S_max so they never read past the cache (a length < 1, which only an unchecked captured call can pass,
uses no split and yields NaN).

Shapes: q (B, Hq, D); k_cache, v_cache (B, S_max, Hkv, D) views with any strides (last dim contiguous);
lengths (B,) int32/int64 in [1, S_max]. D 64 or 128; fp16, bf16, fp32.

The loop of stage 1 is a helper, ``attend_keys``, which the decode step's one-launch kernel
(kernels/decode_step.py: RoPE, the cache write, attention and the merge) runs too.

Paged cache (the engine's): ``paged_decode_attention`` (and decode_step.py's ``paged_rope_decode_attention``) read
the cache as a pool of pages (num_pages, PAGE, Hkv, D), key p of sequence b at page block_tables[b, p // PAGE],
offset p % PAGE. Not a second kernel: the constexpr PAGE_SIZE (0 for the slab) switches only how a key block's rows
are addressed — the slab's scalar base plus loop-invariant rows, or each key's page gathered from the block table
(attention.py's ``block_pages``) — so splits, GQA tile, online softmax and the merges are the same
lines for both. Why not the slab as pages of size S_max with block_tables[b] = [b]: S_max is neither a power of two
nor a compile-time constant, so every key's page and offset would cost a division, and the measured slab loop (the
decode step's hot path at batch 1) would change for nothing. The table is read a block ahead, so the K/V loads'
addresses never wait on a table read in their own step and Triton multi-buffers them as in the slab's loop (compile
gate, fp16, D = 128, stage 1: 71680 B of shared memory for every page size in PAGE_SIZES, as the slab, and 128 /
111-120 registers on sm_80 / sm_90 against the slab's 128 / 132; the one-launch step 168 / 148 against 137-168;
reading the page in the same step left one buffer, 38916 B; a scalar page per block when PAGE >= BLOCK_N took more
registers than the gather, 136 / 181 on sm_90). Lengths are clamped to the table's reach (max_pages_per_seq * PAGE)
and page indices into the pool, so an unchecked (captured) call reads only the pool; the new key of the one-launch
step is written only to a page inside it. Extra bytes: 4 per key for the table entry (BLOCK_N entries a block, 1/256
of the K/V bytes at Hkv = 1, D = 128, fp16), so the floor is the slab's.

Bytes and floor. Each step must read the live cache, 2 * Hkv * D * sum_b L_b elements, and does only
4 * Hq * D * sum_b L_b FLOPs: G FLOPs per byte at fp16, so it is memory-bound and the floor is bytes /
bandwidth. Llama-3-8B (Hkv=8, D=128, bf16) at 8192 tokens: 4 KiB per token per layer, 32 MiB per layer,
1 GiB for the 32 layers -> 10 us per layer, 0.32 ms per generated token at an H100 SXM's 3.35 TB/s, per
sequence in the batch. The split workspace adds 2 * B * Hq * num_splits * (D + 1) * 4 bytes (written, then
read once) — 1 MiB for one Llama-3-8B sequence at 32 splits, small next to its 32 MiB of cache per layer.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import (
    PAGE_SIZES,
    PagedCache,
    aligned_strides,
    capturing,
    check_scale,
    check_splits,
    check_tensor,
    interpreting,
    variant,
)
from llama3_triton.kernels.attention import block_pages, online_softmax_step

__all__ = ["decode_attention", "paged_decode_attention", "compile_variants"]

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_G = 16  # query rows per program: G <= 16 heads, padded to the smallest tensor-core M tile
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write) outweighs its keys
CPU_SM_COUNT = 4  # stands in for the SM count under the interpreter, so several splits are exercised
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}  # a tensor's type in a signature


# Not specialised on the sizes nor on where ``lengths`` sits (one scalar load), only on the alignment of the
# tensors and strides: one binary per dtype, head dim and lengths dtype, exactly the ones the gate checks.
@triton.jit
def _split_range(
    length,  # keys of this sequence (clamped to the cache)
    num_splits,  # programs launched per sequence
    min_keys,  # fewest keys a used split gets (the last may get fewer)
    BLOCK_N: tl.constexpr,  # keys per inner step: a chunk is whole blocks
):
    """(chunk, used): keys per split and how many splits own keys, from the length alone (both stages agree)."""
    want = tl.maximum(tl.minimum(num_splits, tl.cdiv(length, min_keys)), 1)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length, want), BLOCK_N) * BLOCK_N, BLOCK_N)
    return chunk, tl.cdiv(length, chunk)


@triton.jit
def query_rows(
    Q,  # (B, Hq, D) one query per sequence
    b64,  # this program's sequence (int64)
    h_kv,  # its kv head: query heads h_kv * G .. h_kv * G + G - 1
    G,  # query heads per kv head
    stride_qb,
    stride_qh,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """(q, head, row_ok): the G query rows of one kv head as a (BLOCK_G, HEAD_DIM) tile, zero past row G."""
    g = tl.arange(0, BLOCK_G)
    row_ok = g < G
    head = h_kv * G + g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    return q, head, row_ok


@triton.jit
def attend_keys(
    q,  # (BLOCK_G, HEAD_DIM) the query rows, in the cache's dtype
    K,  # the key cache: the slab (B, S_max, Hkv, D) or, PAGE_SIZE > 0, the pool (num_pages, PAGE_SIZE, Hkv, D)
    V,  # the value cache, as K
    BlockTables,  # PAGE_SIZE: (B, pages_per_seq) int32
    b64,  # the sequence (int64)
    h_kv,  # the kv head
    start,  # first key of the range
    end,  # one past its last key (start < end)
    stride_kb,  # k strides: batch (PAGE_SIZE: page), position (within the page), head
    stride_ks,
    stride_kh,
    stride_vb,  # v strides: batch (PAGE_SIZE: page), position, head
    stride_vs,
    stride_vh,
    qk_scale,  # softmax scale * log2(e)
    pages_per_seq,  # PAGE_SIZE: block-table row stride
    n_pages,  # PAGE_SIZE: pages in the pool (table entries are clamped into it)
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per step
    DOT_FP32: tl.constexpr,  # interpreter + bf16 only: the interpreter computes bf16 dots on raw bits
    PAGE_SIZE: tl.constexpr,  # 0: the slab, K[b, s]; else the pool, K[BlockTables[b, s // PAGE], s % PAGE]
):
    """The online softmax of q's rows over keys [start, end) of one kv head: (acc, l_i, m_i), the unnormalised
    output sum_j exp2(x_j - m) v_j, its mass sum_j exp2(x_j - m) and the running max m of the scores x (log2
    units). The loop of flash-decoding's stage 1 and of the one-launch decode step (kernels/decode_step.py)."""
    if DOT_FP32:
        q = q.to(tl.float32)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    cols = offs_d[None, :]
    start64 = start.to(tl.int64)
    if PAGE_SIZE > 0:  # the head's base in the pool; each block's page comes from the table in the loop
        k_base = K + h_kv * stride_kh
        v_base = V + h_kv * stride_vh
        table = BlockTables + b64 * pages_per_seq
        # The first block's pages; then each step reads the next block's a step ahead, so the K/V loads' addresses
        # do not wait on a table read in their own iteration and Triton's pipeliner multi-buffers them as in the
        # slab's loop (compile gate: 72 KB of shared memory at D = 128 fp16, as the slab; 38 KB, one buffer,
        # when the table was read in the same step).
        page, off = block_pages(table, start, offs_n, start + offs_n < end, n_pages, PAGE_SIZE)
    else:
        k_base = K + b64 * stride_kb + start64 * stride_ks + h_kv * stride_kh  # scalar: key `start` of this head
        v_base = V + b64 * stride_vb + start64 * stride_vs + h_kv * stride_vh
    k_rows = offs_n[:, None] * stride_ks  # loop-invariant offsets; only the scalar bases move
    v_rows = offs_n[:, None] * stride_vs

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)  # running sum of exp2(score - m_i) * v
    # One loop, the key bound masked on every block: this kernel waits on memory, and a compare per key
    # costs nothing next to the 16-byte vector loads, which a per-row mask does not break up.
    for n in range(start, end, BLOCK_N):
        key_ok = n + offs_n < end
        if PAGE_SIZE > 0:
            k_ptrs = k_base + (page * stride_kb + off * stride_ks) + cols
        else:
            k_ptrs = k_base + k_rows + cols
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_G, BLOCK_N) fp32
        s = tl.where(key_ok[None, :], s, float("-inf"))  # each block has >= 1 valid key: the max is finite
        p, alpha, l_i, m_i = online_softmax_step(l_i, m_i, s)  # the recurrence prefill uses, shared
        if PAGE_SIZE > 0:
            v_ptrs = v_base + (page * stride_vb + off * stride_vs) + cols
        else:
            v_ptrs = v_base + v_rows + cols
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        if PAGE_SIZE == 0:
            k_base += BLOCK_N * stride_ks
            v_base += BLOCK_N * stride_vs
        else:  # the next block's pages, a step ahead (none read past the range)
            page, off = block_pages(table, n + BLOCK_N, offs_n, n + BLOCK_N + offs_n < end, n_pages, PAGE_SIZE)
    return acc, l_i, m_i


@triton.jit
def store_partials(
    O_part,  # (B, Hq, num_splits, D) fp32 workspace
    Lse,  # (B, Hq, num_splits) fp32 workspace
    row,  # (BLOCK_G,) int64: the workspace row (b, head, split) of each query row
    o,  # (BLOCK_G, HEAD_DIM) fp32 normalised partial output
    lse,  # (BLOCK_G,) fp32 log2-sum-exp2 of the split's scores
    row_ok,  # (BLOCK_G,) which rows are real heads
    HEAD_DIM: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(O_part + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None])
    tl.store(Lse + row, lse, mask=row_ok)


@triton.jit(
    do_not_specialize=["S_max", "G", "num_splits", "min_keys", "pages_per_seq", "n_pages"],
    do_not_specialize_on_alignment=["Lengths", "BlockTables"],
)
def _decode_split_kernel(
    Q,  # (B, Hq, D) one query per sequence
    K,  # (B, S_max, Hkv, D) key cache; PAGE_SIZE: the pool (num_pages, PAGE_SIZE, Hkv, D)
    V,  # (B, S_max, Hkv, D) value cache; PAGE_SIZE: the pool (num_pages, PAGE_SIZE, Hkv, D)
    Lengths,  # (B,) int32/int64 valid keys per sequence
    O_part,  # (B, Hq, num_splits, D) fp32 workspace: normalised partial outputs
    Lse,  # (B, Hq, num_splits) fp32 workspace: log2-sum-exp2 of each split's scaled scores
    BlockTables,  # PAGE_SIZE: (B, pages_per_seq) int32, page of each sequence's i-th PAGE_SIZE keys
    stride_qb,  # q strides: batch, head (the last dim is contiguous)
    stride_qh,
    stride_kb,  # k strides: batch (PAGE_SIZE: page), position (within the page), head
    stride_ks,
    stride_kh,
    stride_vb,  # v strides: batch (PAGE_SIZE: page), position, head
    stride_vs,
    stride_vh,
    S_max,  # cache capacity: lengths are clamped to it (PAGE_SIZE: pages_per_seq * PAGE_SIZE)
    G,  # query heads per kv head
    num_splits,  # programs per sequence (grid axis 2); workspace slots per (b, head)
    min_keys,  # fewest keys per used split
    qk_scale,  # softmax scale * log2(e)
    pages_per_seq,  # PAGE_SIZE: block-table row stride
    n_pages,  # PAGE_SIZE: pages in the pool (table entries are clamped into it)
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_G: tl.constexpr,  # query-head rows of the tile (>= G, >= 16)
    BLOCK_N: tl.constexpr,  # keys per inner step
    DOT_FP32: tl.constexpr,  # interpreter + bf16 only: the interpreter computes bf16 dots on raw bits
    PAGE_SIZE: tl.constexpr,  # 0: the slab, K[b, s]; else the paged pool, K[BlockTables[b, s // PAGE], s % PAGE]
):
    """Stage 1: program (b, kv head, split) attends the G query rows of its kv head over its split's keys and
    writes their normalised partial outputs and log-sum-exps; stage 2 (_decode_combine_kernel) merges them."""
    b = tl.program_id(0)
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.minimum(tl.load(Lengths + b), S_max).to(tl.int32)  # clamp: never read past the cache
    chunk, used = _split_range(length, num_splits, min_keys, BLOCK_N)
    if split >= used:  # no keys for this program at this length: nothing to read, nothing to write
        return
    start = split * chunk
    end = tl.minimum(start + chunk, length)  # start < end: every used split owns at least one key

    b64 = b.to(tl.int64)  # int64: b * stride_b and start * stride_s can pass 2^31 on a large cache
    q, head, row_ok = query_rows(Q, b64, h_kv, G, stride_qb, stride_qh, HEAD_DIM, BLOCK_G)
    acc, l_i, m_i = attend_keys(
        q, K, V, BlockTables, b64, h_kv, start, end, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        qk_scale, pages_per_seq, n_pages, HEAD_DIM, BLOCK_G, BLOCK_N, DOT_FP32, PAGE_SIZE,
    )  # fmt: skip
    o = acc / l_i[:, None]  # l_i >= 1: the running max's own key contributes exp2(0)
    lse = m_i + tl.log2(l_i)
    row = (b64 * G * tl.num_programs(1) + head) * num_splits + split  # (b, head, split) in the workspace
    store_partials(O_part, Lse, row, o, lse, row_ok, HEAD_DIM)


@triton.jit(do_not_specialize=["Hq", "S_max", "num_splits", "min_keys"], do_not_specialize_on_alignment=["Lengths"])
def _decode_combine_kernel(
    O_part,  # (B, Hq, num_splits, D) fp32 normalised partial outputs
    Lse,  # (B, Hq, num_splits) fp32 log2-sum-exp2 per split
    Lengths,  # (B,) int32/int64 valid keys per sequence: which splits stage 1 used
    Out,  # (B, Hq, D) output
    stride_ob,  # out strides: batch, head
    stride_oh,
    Hq,  # query heads
    S_max,  # cache capacity: lengths are clamped to it, as in stage 1
    num_splits,  # workspace slots per (b, head)
    min_keys,  # as in stage 1
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
    BLOCK_N: tl.constexpr,  # stage 1's key block
):
    pid = tl.program_id(0)  # one (b, head) per program
    b = pid // Hq
    h = pid % Hq
    length = tl.minimum(tl.load(Lengths + b), S_max).to(tl.int32)
    _, used = _split_range(length, num_splits, min_keys, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < used  # only the partials stage 1 wrote
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(Lse + base + offs_s, mask=s_ok, other=float("-inf"))
    o = tl.load(O_part + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    lse_max = tl.max(lse, 0)  # split 0 always holds key 0 (length >= 1), so this is finite
    w = tl.exp2(lse - lse_max)  # each split's share of the softmax mass, up to the common factor
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty))


def _stage1_config(dtype: torch.dtype, head_dim: int, paged: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): 64-key blocks, 3 in flight. fp32 (tests only; FMA, not tensor cores)
    takes 32-key blocks and 8 warps: with 4 warps its D = 128 variant spilled on sm_90 (compile gate). Paged at
    D = 64, 2 stages: with 3, ptxas parked two scalars of the fp16 one-launch step in an 8-byte stack frame
    across the loop on sm_90 (96 registers; 102 and no frame at 2 stages). A D = 64 block is 8 KB of K and 8 of
    V, and at 5 programs an SM two stages still keep ~80 KB of loads in flight."""
    if dtype == torch.float32:
        return 32, 8, 3
    return 64, 4, 2 if paged and head_dim == 64 else 3


def _combine_warps(head_dim: int) -> int:
    """Stage 2 moves num_splits * D fp32 per program: 2 warps cover D = 64 with 1 element a thread."""
    return 4 if head_dim == 128 else 2


def _workspace(B: int, Hq: int, num_splits: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's outputs, stage 2's inputs: partial outputs (B, Hq, num_splits, D) and their log-sum-exps, fp32."""
    o_part = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=device)
    return o_part, torch.empty((B, Hq, num_splits), dtype=torch.float32, device=device)


@functools.cache
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of GPU ``index`` (asked once: eager decode calls this per layer per token)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_num_splits(batch: int, h_kv: int, s_max: int, device: torch.device) -> int:
    """Enough programs for ~4 per SM, but no split shorter than MIN_KEYS_PER_SPLIT keys of capacity.

    Uses only shapes and the device, never the lengths, so it needs no host sync (CUDA-graph safe).
    """
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = CPU_SM_COUNT
    want = triton.cdiv(4 * sms, batch * h_kv)
    return max(1, min(want, triton.cdiv(s_max, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


_INTERPRET = interpreting(_decode_split_kernel)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    check_values: bool = True,
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q (B, Hq, D) over keys 0 .. lengths[b]-1 of k_cache/v_cache (B, S_max, Hkv, D).

    Returns (B, Hq, D) in q's dtype, written into ``out`` when given. ``num_splits`` (1..64) overrides the
    split count derived from the shapes and the SM count; then every split that has keys is used (at least one
    key each, not MIN_KEYS_PER_SPLIT). Safe to capture in a CUDA graph.
    ``check_values=False`` skips the host check of ``lengths`` (a device sync) for a caller that has
    validated them; the kernel still clamps every length to S_max.
    ``block_tables``: the caches are page pools instead, see ``paged_decode_attention``.
    """
    interpret = _INTERPRET
    check_tensor("q", q, interpret=interpret, ndim=3)  # (B, Hq, D)
    B, Hq, D = q.shape
    if B < 1:  # else the cache check below reads "expected (B=0, ...), got (0, ...)"
        raise ValueError(f"q: expected a batch of at least one sequence (B >= 1), got shape {tuple(q.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"q: head dim must be 64 or 128, got {D}")
    if block_tables is None:
        kname, paged = "k_cache", PagedCache.slab(q)
        check_tensor("k_cache", k_cache, like=q, ndim=4)  # (B, S_max, Hkv, D)
        check_tensor("v_cache", v_cache, like=q, ndim=4)
        S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
        if B < 1 or S_max < 1 or tuple(k_cache.shape) != (B, S_max, Hkv, D):
            raise ValueError(f"k_cache: expected shape (B={B}, S_max, Hkv, D={D}), got {tuple(k_cache.shape)}")
        if tuple(v_cache.shape) != tuple(k_cache.shape):
            raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (as k_cache), got {tuple(v_cache.shape)}")
    else:
        kname, paged = "k_pages", PagedCache.check(q, k_cache, v_cache, block_tables)
        S_max, Hkv = paged.capacity, k_cache.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{kname}: kv heads ({Hkv}) must divide the query heads ({Hq})")
    if Hq // Hkv > BLOCK_G:
        raise ValueError(f"q: at most {BLOCK_G} query heads per kv head are supported, got {Hq // Hkv}")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths: expected an int32 or int64 tensor, got {getattr(lengths, 'dtype', type(lengths))}")
    if tuple(lengths.shape) != (B,) or lengths.device != q.device:
        got = f"{tuple(lengths.shape)} on {lengths.device}"
        raise ValueError(f"lengths: expected shape ({B},) on {q.device}, got {got}")
    if block_tables is not None and lengths.dtype != torch.int32:  # one compiled variant, as the tables
        raise ValueError(f"lengths: expected an int32 tensor with block_tables (the engine's), got {lengths.dtype}")
    if check_splits(num_splits, MAX_SPLITS) is None:
        num_splits, min_keys = _default_num_splits(B, Hkv, S_max, q.device), MIN_KEYS_PER_SPLIT
    else:
        min_keys = 1  # the caller chose the split count: use it wherever there are keys
    check_scale(scale)
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    else:
        check_tensor("out", out, like=q, ndim=3, shape=(B, Hq, D))

    q_strides = aligned_strides("q", q, 2)
    k_strides = aligned_strides(kname, k_cache, 3)
    v_strides = aligned_strides(kname.replace("k", "v", 1), v_cache, 3)
    out_strides = aligned_strides("out", out, 2)
    if check_values and not capturing(q):  # the one host sync, last; skipped under capture (the kernel clamps)
        if block_tables is not None:
            paged.check_lengths(lengths)
        else:
            lo, hi = torch.stack(torch.aminmax(lengths)).tolist()
            if lo < 1 or hi > S_max:
                raise ValueError(f"lengths: expected values in [1, S_max={S_max}], got min {lo}, max {hi}")
    qk_scale = (D**-0.5 if scale is None else float(scale)) * LOG2E
    o_part, lse = _workspace(B, Hq, num_splits, D, q.device)
    block_n, num_warps, num_stages = _stage1_config(q.dtype, D, paged.page > 0)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, lengths, o_part, lse, paged.tables, *q_strides, *k_strides, *v_strides,
        S_max, Hq // Hkv, num_splits, min_keys, qk_scale, paged.pages_per_seq, paged.num_pages,
        HEAD_DIM=D, BLOCK_G=BLOCK_G, BLOCK_N=block_n, DOT_FP32=interpret and q.dtype == torch.bfloat16,
        PAGE_SIZE=paged.page, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    _decode_combine_kernel[(B * Hq,)](
        o_part, lse, lengths, out, *out_strides, Hq, S_max, num_splits, min_keys,
        HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_N=block_n, num_warps=_combine_warps(D),
    )  # fmt: skip
    return out


def _need_tables(block_tables: object) -> torch.Tensor:
    if not isinstance(block_tables, torch.Tensor):  # None would select the slab in the shared launcher
        raise ValueError(
            f"block_tables: expected a (B, max_pages_per_seq) int32 tensor, got {type(block_tables).__name__}"
        )
    return block_tables


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """``decode_attention`` over a paged cache: q (B, Hq, D) over keys 0 .. lengths[b]-1 of sequence b, key p at
    page block_tables[b, p // PAGE], offset p % PAGE of k_pages / v_pages (num_pages, PAGE, Hkv, D), PAGE in
    ``PAGE_SIZES``; block_tables (B, max_pages_per_seq) int32, lengths (B,) in [1, max_pages_per_seq * PAGE].
    The same kernel and launches as the slab's (module docstring). ``check_values`` checks the lengths and the
    table entries they use on the host (one sync); without it the kernel clamps lengths to the table's reach and
    page indices into the pool, so it reads only the pool, whatever the values. Safe to capture in a CUDA graph."""
    return decode_attention(
        q, k_pages, v_pages, lengths, scale=scale, num_splits=num_splits, out=out, check_values=check_values,
        block_tables=_need_tables(block_tables),
    )  # fmt: skip


def stage1_shapes():
    """(dtype, its name, head dim, lengths type, page size) of every stage-1-shaped launch: the slab (page 0) with
    int32 or int64 lengths, the pool with int32 only. The compile lists here and in decode_step.py walk it."""
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for len_ty, page in itertools.product(("*i32", "*i64"), (0, *PAGE_SIZES)):
                if not (page and len_ty == "*i64"):  # paged launches take int32 lengths and positions only
                    yield dtype, str(dtype).split(".")[-1], d, len_ty, page


def compile_variants() -> list[dict]:
    """Every kernel configuration the launcher can pick on a GPU, for the AOT compile gate.

    Stage 1: dtype x head dim x lengths dtype x page size (its block config is fixed per dtype). Stage 2: dtype x
    head dim x lengths dtype x BLOCK_S (powers of two up to MAX_SPLITS).
    ``DOT_FP32=True`` is left out: only the interpreter picks it.
    """
    variants = []
    for dtype, name, d, len_ty, page in stage1_shapes():
        block_n, num_warps, num_stages = _stage1_config(dtype, d, page > 0)
        types = {n: PTR[dtype] for n in ("Q", "K", "V")} | {"Lengths": len_ty}
        types.update(O_part="*fp32", Lse="*fp32", qk_scale="fp32")
        types["BlockTables"] = "*i32" if page else PTR[dtype]  # the slab's launcher passes q, never read
        cx = {"HEAD_DIM": d, "BLOCK_G": BLOCK_G, "BLOCK_N": block_n, "DOT_FP32": False, "PAGE_SIZE": page}
        tag = f"decode_split_{name}_d{d}_n{block_n}_len{len_ty[1:]}" + (f"_pages{page}" if page else "")
        unaligned = ["Lengths", "BlockTables"]
        variants.append(variant(tag, _decode_split_kernel, types, cx, num_warps, num_stages, unaligned=unaligned))
    for dtype, name, d in ((dt, str(dt).split(".")[-1], d) for dt in DTYPES for d in HEAD_DIMS):
        block_n = _stage1_config(dtype, d, False)[0]  # the combine's BLOCK_N: stage 1's, which paging keeps
        for len_ty in ("*i32", "*i64"):
            block_s = 1
            while block_s <= MAX_SPLITS:
                types = {"O_part": "*fp32", "Lse": "*fp32", "Out": PTR[dtype], "Lengths": len_ty}
                cx = {"HEAD_DIM": d, "BLOCK_S": block_s, "BLOCK_N": block_n}
                tag = f"decode_combine_{name}_d{d}_s{block_s}_len{len_ty[1:]}"
                w = _combine_warps(d)
                variants.append(variant(tag, _decode_combine_kernel, types, cx, w, 3, unaligned=["Lengths"]))
                block_s *= 2
    return variants
