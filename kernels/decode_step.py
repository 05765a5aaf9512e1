"""The decode step's attention in one launch: RoPE, the KV-cache write, split-KV attention and the merge.

A decode step of the model needs, per layer: rotate q and the new key by the token's position (RoPE), write the
new key and value into the cache, attend over the cache (kernels/decode.py's flash-decoding: splits, then a
merge), and merge the splits. Four launches, or two with rope_write_cache; here it is one. Program (b, kv head,
split) does flash-decoding's stage 1 over its split (decode.py's ``query_rows`` and ``attend_keys``, the same
loop), with three additions:

1. RoPE in registers: q is rotated after its load, with this token's row of the (cos | sin) table; the new key is
   rotated by every split, which needs it for one score.
2. The cache write: the last split (the one whose range ends at the new token's slot) writes the rotated key and
   the value to the cache for later steps. It does not read them back: its loop stops one key short and the new
   key joins the online softmax from registers, one more step of the recurrence.
3. The merge without a second launch: each split publishes its partial output and log-sum-exp, then takes a
   ticket from an int32 counter per (sequence, kv head) (an acq_rel atomic after a barrier, so every thread's
   stores are ordered before it). The split that draws the last ticket knows the others' partials are written,
   merges them (``_merge_splits``: stage 2's maths, one split at a time from L2) and leaves the counter at zero
   for the next launch. A sequence short enough for one split writes its output directly.

The counter and the partials live in a ``DecodeWorkspace`` allocated once per model, so a CUDA graph captures the
launch without owning memory; the grid comes from the shapes alone (decode.py), never from the positions.

Paged: ``paged_rope_decode_attention`` takes the engine's page pool, the new token's slot at page
block_tables[b, pos // PAGE], offset pos % PAGE; a position past the table's reach or a page outside the pool
writes nothing. Registers (compile gate, fp16, D = 128, sm_80 / sm_90): the slab's step 137-168 / 148 against the
paged step's 168 / 148.

Bytes and floor: those of decode_attention (the live cache, read once) plus the new k and v written once and the
partials of a split sequence, written and read once from L2: the floor is decode.py's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import (
    PagedCache,
    aligned_strides,
    check_scale,
    check_splits,
    check_tensor,
    interpreting,
    variant,
)
from llama3_triton.kernels.attention import online_softmax_step
from llama3_triton.kernels.decode import (
    BLOCK_G,
    HEAD_DIMS,
    LOG2E,
    MAX_SPLITS,
    MIN_KEYS_PER_SPLIT,
    PTR,
    _default_num_splits,
    _need_tables,
    _split_range,
    _stage1_config,
    attend_keys,
    query_rows,
    stage1_shapes,
    store_partials,
)

__all__ = ["rope_decode_attention", "paged_rope_decode_attention", "DecodeWorkspace", "compile_variants"]


@triton.jit
def _rotate_pairs(
    x,  # (ROWS, HEAD_DIM) rows of one token's heads
    cos,  # (HEAD_DIM // 2,) fp32, this token's row of the RoPE table
    sin,  # (HEAD_DIM // 2,) fp32
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """RoPE of Meta's interleaved pairs (x[2i], x[2i+1]) of each row (kernels/rope.py has the maths), in fp32."""
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), [ROWS, HEAD_DIM // 2, 2]))
    c = cos[None, :]
    s = sin[None, :]
    return tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), [ROWS, HEAD_DIM])


@triton.jit
def _merge_splits(
    O_part,  # fp32 normalised partial outputs
    Lse,  # fp32 log2-sum-exp2 per split
    out_ptrs,  # (BLOCK_G, HEAD_DIM) where the merged rows go
    first,  # (BLOCK_G,) int64: workspace row of split 0 for each head
    used,  # splits that hold partials
    row_ok,  # (BLOCK_G,) which rows are real heads
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """out = sum_s exp2(lse_s - LSE) o_s, one split at a time with a running max (the stage-2 maths)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for s in range(0, used):
        # .cg: straight from L2, where the other programs' stores went (never from this SM's L1)
        lse = tl.load(Lse + first + s, mask=row_ok, other=0.0, cache_modifier=".cg")
        o = tl.load(O_part + (first + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0,
                    cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        w_sum = w_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    tl.store(out_ptrs, (acc / w_sum[:, None]).to(out_ptrs.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(
    do_not_specialize=["S_max", "G", "num_splits", "min_keys", "pages_per_seq", "n_pages"],
    do_not_specialize_on_alignment=["Lengths", "BlockTables"],
)
def _decode_step_kernel(
    Q,  # (B, Hq, D) one query per sequence, not yet rotated
    K,  # (B, S_max, Hkv, D) key cache; PAGE_SIZE: the pool (num_pages, PAGE_SIZE, Hkv, D)
    V,  # (B, S_max, Hkv, D) value cache; PAGE_SIZE: the pool (num_pages, PAGE_SIZE, Hkv, D)
    Lengths,  # (B,) int32/int64 the new token's position (pos + 1 keys are live)
    O_part,  # (B, Hq, num_splits, D) fp32 workspace: normalised partial outputs
    Lse,  # (B, Hq, num_splits) fp32 workspace: log2-sum-exp2 of each split's scaled scores
    Knew,  # (B, Hkv, D) the new token's key, not yet rotated
    Vnew,  # (B, Hkv, D) its value (same strides as Knew: both slices of one qkv row)
    CosSin,  # (S_max, D) fp32 RoPE table, row p = cos | sin of position p
    Counter,  # (B * Hkv,) int32, zero between launches: splits finished per (b, kv head)
    Out,  # (B, Hq, D) the output
    BlockTables,  # PAGE_SIZE: (B, pages_per_seq) int32, page of each sequence's i-th PAGE_SIZE keys
    stride_qb,  # q strides: batch, head (the last dim is contiguous)
    stride_qh,
    stride_kb,  # k strides: batch (PAGE_SIZE: page), position (within the page), head
    stride_ks,
    stride_kh,
    stride_vb,  # v strides: batch (PAGE_SIZE: page), position, head
    stride_vs,
    stride_vh,
    stride_nb,  # Knew / Vnew strides: batch, head
    stride_nh,
    stride_ob,  # Out strides: batch, head
    stride_oh,
    S_max,  # cache capacity (PAGE_SIZE: pages_per_seq * PAGE_SIZE)
    G,  # query heads per kv head
    num_splits,  # programs per sequence (grid axis 2); workspace slots per (b, head)
    min_keys,  # fewest keys per used split
    qk_scale,  # softmax scale * log2(e)
    pages_per_seq,  # PAGE_SIZE: block-table row stride
    n_pages,  # PAGE_SIZE: pages in the pool (table entries are clamped into it; the new key is written only inside)
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_G: tl.constexpr,  # query-head rows of the tile (>= G, >= 16)
    BLOCK_N: tl.constexpr,  # keys per inner step
    DOT_FP32: tl.constexpr,  # interpreter + bf16 only: the interpreter computes bf16 dots on raw bits
    PAGE_SIZE: tl.constexpr,  # 0: the slab, K[b, s]; else the paged pool, K[BlockTables[b, s // PAGE], s % PAGE]
):
    b = tl.program_id(0)
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(Lengths + b).to(tl.int32)  # the new token sits at slot pos: pos + 1 keys are live
    length = tl.minimum(pos + 1, S_max)
    chunk, used = _split_range(length, num_splits, min_keys, BLOCK_N)
    if split >= used:  # no keys for this program at this length: nothing to read, nothing to write
        return
    start = split * chunk
    end = tl.minimum(start + chunk, length)  # start < end: every used split owns at least one key

    b64 = b.to(tl.int64)  # int64: b * stride_b and start * stride_s can pass 2^31 on a large cache
    q, head, row_ok = query_rows(Q, b64, h_kv, G, stride_qb, stride_qh, HEAD_DIM, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    # 1. This token's (cos, sin); q rotated in registers, and the new key (every split scores it).
    half = tl.arange(0, HEAD_DIM // 2)
    cs_row = CosSin + tl.minimum(pos, S_max - 1).to(tl.int64) * HEAD_DIM
    cos = tl.load(cs_row + half)
    sin = tl.load(cs_row + HEAD_DIM // 2 + half)
    q = _rotate_pairs(q, cos, sin, BLOCK_G, HEAD_DIM).to(Q.dtype.element_ty)
    last = split == used - 1
    new_row = b64 * stride_nb + h_kv * stride_nh + offs_d[None, :]  # (1, D)
    k_new = _rotate_pairs(tl.load(Knew + new_row), cos, sin, 1, HEAD_DIM).to(K.dtype.element_ty)
    v_new = tl.load(Vnew + new_row)
    # 2. The last split writes the new k and v to the cache; an unchecked slot outside it writes nothing.
    if PAGE_SIZE > 0:  # the new token's page, from the table
        new_page = tl.load(BlockTables + b64 * pages_per_seq + tl.minimum(pos, S_max - 1) // PAGE_SIZE)
        in_cache = (pos < S_max) & (new_page >= 0) & (new_page < n_pages)
        new_page = tl.where(in_cache, new_page, 0).to(tl.int64)
        new_slot = (pos % PAGE_SIZE).to(tl.int64)
    else:
        in_cache = pos < S_max
        new_page, new_slot = b64, pos.to(tl.int64)
    write = offs_d[None, :] < tl.where(last & in_cache, HEAD_DIM, 0)  # (1, D): the last split's
    new_k = K + new_page * stride_kb + new_slot * stride_ks + h_kv * stride_kh + offs_d[None, :]
    new_v = V + new_page * stride_vb + new_slot * stride_vs + h_kv * stride_vh + offs_d[None, :]
    tl.store(new_k, k_new, mask=write)
    tl.store(new_v, v_new, mask=write)

    # The cached keys of the split (the last stops one short of the new key, not read back), then the new key: one
    # more step of the recurrence (-inf, a no-op, in every split but the last, whose max stays finite).
    end_cache = tl.where(last, end - 1, end)
    acc, l_i, m_i = attend_keys(
        q, K, V, BlockTables, b64, h_kv, start, end_cache, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
        stride_vh, qk_scale, pages_per_seq, n_pages, HEAD_DIM, BLOCK_G, BLOCK_N, DOT_FP32, PAGE_SIZE,
    )  # fmt: skip
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * qk_scale  # (BLOCK_G,)
    s_new = tl.where(last, s_new, float("-inf"))
    p, alpha, l_i, m_i = online_softmax_step(l_i, m_i, s_new[:, None])
    acc = acc * alpha[:, None] + p * v_new.to(tl.float32)

    o = acc / l_i[:, None]  # l_i >= 1: the running max's own key contributes exp2(0)
    lse = m_i + tl.log2(l_i)
    row = (b64 * G * tl.num_programs(1) + head) * num_splits + split  # (b, head, split) in the workspace
    out_ptrs = Out + b64 * stride_ob + head[:, None] * stride_oh + offs_d[None, :]
    if used == 1:  # the whole softmax is here: no partials, no merge
        tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        # 3. Publish the partials, then take a ticket: every thread's stores are ordered before the barrier, the
        # barrier before the release of the atomic. The split that draws the last ticket knows the others'
        # partials are written (acquire), merges them, and leaves the counter at zero again.
        store_partials(O_part, Lse, row, o, lse, row_ok, HEAD_DIM)
        tl.debug_barrier()
        counter = Counter + b * tl.num_programs(1) + h_kv
        ticket = tl.atomic_add(counter, 1, sem="acq_rel")
        if ticket == used - 1:
            tl.atomic_xchg(counter, 0)
            _merge_splits(O_part, Lse, out_ptrs, row - split, used, row_ok, HEAD_DIM, BLOCK_G)


_INTERPRET = interpreting(_decode_step_kernel)


class DecodeWorkspace:
    """What the one-launch decode attention keeps between launches, allocated once per model (not per call, so a
    captured CUDA graph never owns it): the split partials, room for MAX_SPLITS per head, and one int32 counter
    per (sequence, kv head) that each launch leaves at zero. Every layer reuses it: layers run one after another."""

    def __init__(self, max_batch: int, n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device | str):
        self.max_batch, self.n_heads, self.n_kv_heads, self.head_dim = max_batch, n_heads, n_kv_heads, head_dim
        rows = max_batch * n_heads * MAX_SPLITS
        self.o_part = torch.empty(rows * head_dim, dtype=torch.float32, device=device)
        self.lse = torch.empty(rows, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max_batch * n_kv_heads, dtype=torch.int32, device=device)


def rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    workspace: DecodeWorkspace,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode step's attention in one launch: RoPE of q (B, Hq, D) and of the new key k (B, Hkv, D) at
    ``positions`` (B,), k and v (B, Hkv, D) written to slot positions[b] of k_cache / v_cache (B, S_max, Hkv, D),
    then attention over keys 0 .. positions[b] (the new one included), the splits merged by the last of them.

    Equal to ``rope_write_cache`` followed by ``decode_attention`` with lengths = positions + 1 (kernels/reference.py
    composes exactly that). q, k, v may be strided slices of one fused qkv row (k and v with the same strides);
    cos_sin is the (S, D) fp32 RoPE table with S >= S_max. Positions are trusted (the model checked them once per
    step): a position >= S_max writes nothing. Safe to capture in a CUDA graph. Returns (B, Hq, D) in q's dtype.
    ``block_tables``: the caches are page pools instead, see ``paged_rope_decode_attention``.
    """
    interpret = _INTERPRET
    check_tensor("q", q, interpret=interpret, ndim=3)
    B, Hq, D = q.shape
    if B < 1 or D not in HEAD_DIMS:
        raise ValueError(f"q: expected (B >= 1, Hq, D in {HEAD_DIMS}), got shape {tuple(q.shape)}")
    if block_tables is None:
        kname, paged = "k_cache", PagedCache.slab(q)
        check_tensor("k_cache", k_cache, like=q, ndim=4)
        S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
        if tuple(k_cache.shape) != (B, S_max, Hkv, D) or tuple(v_cache.shape) != tuple(k_cache.shape):
            raise ValueError(f"k_cache, v_cache: expected shape (B={B}, S_max, Hkv, D={D}), got "
                             f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")  # fmt: skip
        check_tensor("v_cache", v_cache, like=q, ndim=4)
    else:
        kname, paged = "k_pages", PagedCache.check(q, k_cache, v_cache, block_tables)
        S_max, Hkv = paged.capacity, k_cache.shape[2]
    if Hkv < 1 or Hq % Hkv or Hq // Hkv > BLOCK_G:
        raise ValueError(f"{kname}: {Hkv} kv heads for {Hq} query heads (G = Hq / Hkv must be an integer <= {BLOCK_G})")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, like=q, ndim=3, shape=(B, Hkv, D))
    if k.stride() != v.stride():
        raise ValueError(f"k, v: expected the same strides (slices of one qkv row), got {k.stride()}, {v.stride()}")
    # With pages, int32 positions only (as the tables): one compiled variant instead of two
    pos_types = (torch.int32,) if block_tables is not None else (torch.int32, torch.int64)
    check_tensor("positions", positions, interpret=interpret, dtypes=pos_types, shape=(B,))
    check_tensor("cos_sin", cos_sin, interpret=interpret, dtypes=(torch.float32,), ndim=2)
    if positions.device != q.device or cos_sin.device != q.device:
        raise ValueError(f"positions, cos_sin: expected tensors on {q.device} (the device of q), got "
                         f"{positions.device}, {cos_sin.device}")  # fmt: skip
    if cos_sin.shape[0] < S_max or cos_sin.shape[1] != D or not cos_sin.is_contiguous():
        raise ValueError(f"cos_sin: expected a contiguous (>= {S_max}, {D}) table, got {tuple(cos_sin.shape)}")
    ws = workspace
    shape_ok = isinstance(ws, DecodeWorkspace) and (ws.n_heads, ws.n_kv_heads, ws.head_dim) == (Hq, Hkv, D)
    if not shape_ok or B > ws.max_batch:
        raise ValueError(f"workspace: expected a DecodeWorkspace for >= {B} sequences of ({Hq}, {Hkv}, {D}) heads")
    if ws.counters.device != q.device:
        raise ValueError(f"workspace: on {ws.counters.device}, q is on {q.device}")
    if check_splits(num_splits, MAX_SPLITS) is None:
        num_splits, min_keys = _default_num_splits(B, Hkv, S_max, q.device), MIN_KEYS_PER_SPLIT
    else:
        min_keys = 1  # the caller chose the split count: use it wherever there are keys
    check_scale(scale)
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    else:
        check_tensor("out", out, like=q, ndim=3, shape=(B, Hq, D))
    qk_scale = (D**-0.5 if scale is None else float(scale)) * LOG2E
    block_n, num_warps, num_stages = _stage1_config(q.dtype, D, paged.page > 0)
    _decode_step_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, positions, ws.o_part, ws.lse, k, v, cos_sin, ws.counters, out, paged.tables,
        *aligned_strides("q", q, 2), *aligned_strides(kname, k_cache, 3),
        *aligned_strides(kname.replace("k", "v", 1), v_cache, 3),
        *aligned_strides("k", k, 2), *aligned_strides("out", out, 2),
        S_max, Hq // Hkv, num_splits, min_keys, qk_scale, paged.pages_per_seq, paged.num_pages,
        HEAD_DIM=D, BLOCK_G=BLOCK_G, BLOCK_N=block_n, DOT_FP32=interpret and q.dtype == torch.bfloat16,
        PAGE_SIZE=paged.page, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def paged_rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    workspace: DecodeWorkspace,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rope_decode_attention`` over a paged cache, one launch: RoPE of q (B, Hq, D) and the new k (B, Hkv, D) at
    ``positions`` (B,); k and v to page block_tables[b, pos // PAGE], offset pos % PAGE of k_pages / v_pages
    (num_pages, PAGE, Hkv, D); attention over keys 0 .. positions[b] through the table. cos_sin needs
    max_pages_per_seq * PAGE rows. Positions and table entries are trusted, as in ``rope_decode_attention``: a
    position past the table's reach or a page outside the pool writes nothing, and reads are clamped into the pool.
    """
    return rope_decode_attention(
        q, k, v, positions, cos_sin, k_pages, v_pages, workspace, scale=scale, num_splits=num_splits, out=out,
        block_tables=_need_tables(block_tables),
    )  # fmt: skip


def compile_variants() -> list[dict]:
    """Every configuration of the one-launch step the launchers can pick on a GPU, for the AOT compile gate:
    dtype x head dim x positions dtype x page size (0: the slab), with stage 1's block config.
    ``DOT_FP32=True`` is left out: only the interpreter picks it."""
    variants = []
    for dtype, name, d, len_ty, page in stage1_shapes():
        block_n, num_warps, num_stages = _stage1_config(dtype, d, page > 0)
        types = {n: PTR[dtype] for n in ("Q", "K", "V", "Knew", "Vnew", "Out")} | {"Lengths": len_ty}
        types.update(O_part="*fp32", Lse="*fp32", CosSin="*fp32", Counter="*i32", qk_scale="fp32")
        types["BlockTables"] = "*i32" if page else PTR[dtype]  # the slab's launcher passes q, never read
        cx = {"HEAD_DIM": d, "BLOCK_G": BLOCK_G, "BLOCK_N": block_n, "DOT_FP32": False, "PAGE_SIZE": page}
        tag = f"decode_step_{name}_d{d}_n{block_n}_len{len_ty[1:]}" + (f"_pages{page}" if page else "")
        unaligned = ["Lengths", "BlockTables"]
        variants.append(variant(tag, _decode_step_kernel, types, cx, num_warps, num_stages, unaligned=unaligned))
    return variants
