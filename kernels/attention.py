"""Causal flash attention for prefill, with a KV-cache offset and grouped-query heads.

The maths. For one sequence b and query head h (reading kv head h // G, G = Hq // Hkv), query t sits at
absolute position ``start_pos + t`` and sees keys 0 .. start_pos + t:

    s[t, j] = scale * q[t] . k[j]                  for j <= start_pos + t      (else -inf)
    out[t]  = sum_j softmax_j(s[t, :]) * v[j]

Written out naively that needs the T x S score matrix in memory. Flash attention never stores it: each
program owns a tile of BLOCK_M query rows, walks the keys in blocks of BLOCK_N, and keeps three running
values per row — the running maximum m, the running denominator l = sum_j exp(s_j - m) and the running
unnormalised output acc = sum_j exp(s_j - m) v_j. When a new block raises the maximum from m to m', the old
sums are simply rescaled by alpha = exp(m - m'), because exp(s - m) * exp(m - m') = exp(s - m'):

    m'  = max(m, max_j s_j)          alpha = exp(m - m')        p_j = exp(s_j - m')
    l'  = alpha * l + sum_j p_j      acc' = alpha * acc + p @ V_block

and after the last block, out = acc / l. This "online softmax" is exact (not an approximation), needs one
pass over K and V, and keeps all of it in registers. We use exp2, the instruction the hardware has, and
fold log2(e) into the scale once: exp(x * scale) = exp2(x * scale * log2(e)).

GQA without copies: the G query heads that share one kv head are packed into the M tile (row r of the tile
is token r // G, head r % G), so one program reads each K/V block once for all G heads, and a short chunk
(T = 1..16 tokens, decode-like) still fills a tensor-core tile. Causality: a tile only walks keys up to its
last token's position (blocks past it are never loaded), and the key blocks entirely at or below its first
token's position are visible to every row, so the mask is only computed on the few diagonal blocks.

Shapes: q (B, T, Hq, D), k and v (B, S, Hkv, D) with S >= start_pos + T — usually strided views of a KV
cache stored (B, Hkv, S_max, D), and q a slice of a fused qkv projection; any strides, last dim contiguous.
D is 64 or 128. fp16 and bf16 (fp32 too, for tests: its dots use ``input_precision="ieee"``, no TF32).

Work and floor. The causal query/key pairs number P = T * start_pos + T (T + 1) / 2 per head; the kernel
does 4 * D * P * B * Hq FLOPs (two matrix products) and P * B * Hq exponentials, and must move
q, k, v, out = 2 * B * T * (Hq + Hkv) * D elements at least. Llama-3-8B prefill of 8192 tokens (Hq=32,
Hkv=8, D=128, bf16), per layer: 5.5e11 FLOPs -> 0.56 ms at an H100 SXM's 989 TFLOP/s dense bf16, but only
168 MB -> 50 us at 3.35 TB/s: compute-bound, and the floor is FLOPs / peak tensor throughput. (The 1.1e9
exp2 per layer take another 0.28 ms at the H100's ~3.9e12 MUFU ops/s — why FlashAttention-3 overlaps them
with the matrix products; this kernel leaves that to Triton's software pipelining.)

Reading the Triton code, for a PyTorch reader: the kernel body runs once per program of a grid (here one
program per (query tile, batch x kv head)), like a CUDA thread block, but on whole tiles: ``tl.arange(0, N)``
is a vector of indices, ``base + rows[:, None] * stride + cols[None, :]`` a 2-D tile of addresses, and
``tl.load``/``tl.store`` with ``mask=`` read and write it, skipping the ragged edges. ``tl.dot`` is a tile
matrix product on the tensor cores; ``tl.constexpr`` arguments are compile-time constants, so each value
(tile size, head dim, the ``MASKED`` flag below) gets its own specialised binary.

On a GPU the tile shape is autotuned over a short pruned list; under ``TRITON_INTERPRET=1`` (no GPU, where
``@triton.autotune`` cannot benchmark) the launcher runs the plain kernel with one fixed config.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import aligned_strides, check_scale, check_tensor, interpreting, variant

__all__ = ["attention", "compile_variants"]

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def online_softmax_step(
    l_i,  # (M,) fp32 running softmax denominator
    m_i,  # (M,) fp32 running maximum of the scores (log2 units)
    s,  # (M, N) fp32 scores of a new key block, scaled to log2 units, -inf where masked
):
    """The flash recurrence's bookkeeping for one key block (module docstring): returns (p, alpha, l_i, m_i),
    the block's unnormalised probabilities, the factor that rescales what was accumulated before, and the
    new running sum and maximum; the caller then does acc = acc * alpha + p @ V_block.

    Shared by this prefill kernel and the split-KV decode kernel (kernels/decode.py). The caller loads the
    block's values after calling it, so they are not held in registers through the exponentials. Each row must
    have seen an unmasked key by its first block, so m_new is finite and no row computes exp2(-inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def block_pages(
    table,  # pointer to this sequence's row of the block table: int32 page indices
    n,  # first key of the block
    offs_n,  # (BLOCK_N,) 0 .. BLOCK_N - 1
    key_ok,  # (BLOCK_N,) keys of the block inside the range: the table is read only for those
    n_pages,  # pages in the pool: an entry the host did not check is clamped into it, never read past it
    PAGE_SIZE: tl.constexpr,  # tokens per page, a power of two (// and % are a shift and a mask)
):
    """Where keys n .. n + BLOCK_N - 1 of a paged sequence live: (page, offset), (BLOCK_N, 1) int64 each, so that
    a K or V block is ``base + page * stride_page + offset * stride_slot + cols``.

    Each key's own table entry, gathered, whatever the page size: when a page holds the whole block the BLOCK_N
    entries are one address (one L1 line), and the compile gate measured this form at fewer registers than a
    scalar page + the slab's loop-invariant rows (fp16, D = 128, PAGE 64, sm_90: 112 vs 136 in decode's stage 1,
    148 vs 181 in the one-launch step; kernels/decode.py, decode_step.py). Shared by the paged decode
    (kernels/decode.py's loop) and prefill (kernels/paged_attention.py)."""
    pos = n + offs_n
    page = tl.load(table + pos // PAGE_SIZE, mask=key_ok, other=0)
    page = tl.minimum(tl.maximum(page, 0), n_pages - 1).to(tl.int64)
    return page[:, None], (pos % PAGE_SIZE).to(tl.int64)[:, None]


@triton.jit
def _attend_blocks(
    acc,  # (BLOCK_M, HEAD_DIM) fp32 running unnormalised output
    l_i,  # (BLOCK_M,) fp32 running softmax denominator
    m_i,  # (BLOCK_M,) fp32 running maximum of the scaled scores (log2 units)
    q,  # (BLOCK_M, HEAD_DIM) query tile
    k_base,  # scalar pointer to key `lo` of this (b, kv head)
    v_base,  # scalar pointer to value `lo`
    k_rows,  # (BLOCK_N, 1) int32 offsets of a key block's rows from its base
    v_rows,  # (BLOCK_N, 1) int32 offsets of a value block's rows from its base
    cols,  # (1, HEAD_DIM) 0 .. D-1
    stride_ks,  # key-position stride of k
    stride_vs,  # key-position stride of v
    q_pos,  # (BLOCK_M,) absolute position of each query row
    lo,  # first key of the range (a multiple of BLOCK_N)
    hi,  # end of the key range (exclusive)
    qk_scale,  # scale * log2(e)
    table,  # PAGE_SIZE: this sequence's block-table row (k_base / v_base are then the head's base in the pool)
    n_pages,  # PAGE_SIZE: pages in the pool
    stride_kp,  # PAGE_SIZE: page strides of k and v
    stride_vp,
    BLOCK_N: tl.constexpr,  # keys per block
    MASKED: tl.constexpr,  # diagonal blocks: apply the causal mask and the key bound
    DOT_FP32: tl.constexpr,  # interpreter + bf16 only: compute the dots in fp32
    PAGE_SIZE: tl.constexpr,  # 0: k/v are a slab walked by moving k_base / v_base; else a paged pool
):
    offs_n = tl.arange(0, BLOCK_N)
    if PAGE_SIZE > 0:  # the first block's pages; each step reads the next block's a step ahead (decode.py: why)
        page, off = block_pages(table, lo, offs_n, lo + offs_n < hi, n_pages, PAGE_SIZE)
    for start_n in range(lo, hi, BLOCK_N):
        key_pos = start_n + offs_n
        if PAGE_SIZE > 0:
            k_ptrs = k_base + (page * stride_kp + off * stride_ks) + cols
        else:
            k_ptrs = k_base + k_rows + cols
        if MASKED:
            k = tl.load(k_ptrs, mask=(key_pos < hi)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        if MASKED:
            s = tl.where(key_pos[None, :] <= q_pos[:, None], s, float("-inf"))
        # Every row sees key 0 in the first block it visits, so the recurrence's max is finite.
        p, alpha, l_i, m_i = online_softmax_step(l_i, m_i, s)
        if PAGE_SIZE > 0:
            v_ptrs = v_base + (page * stride_vp + off * stride_vs) + cols
        else:
            v_ptrs = v_base + v_rows + cols
        if MASKED:
            v = tl.load(v_ptrs, mask=(key_pos < hi)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if DOT_FP32:
            v = v.to(tl.float32)
        # P goes into the tensor-core product in v's dtype (fp16/bf16), accumulating in fp32.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        # Advance the 64-bit scalar base (never position * stride in int32, which can pass 2^31 at 128k
        # context). A scalar plus loop-invariant (BLOCK_N, 1) and (1, D) offsets, not a (BLOCK_N, D) tile of
        # 64-bit pointers carried through the loop: that tile spilled on sm_90 at 128 x 128, D = 128.
        if PAGE_SIZE > 0:
            nxt = start_n + BLOCK_N
            page, off = block_pages(table, nxt, offs_n, nxt + offs_n < hi, n_pages, PAGE_SIZE)
        else:
            k_base += BLOCK_N * stride_ks
            v_base += BLOCK_N * stride_vs
    return acc, l_i, m_i, k_base, v_base


# Not specialised on the sizes (only on the strides' alignment): one binary per config whatever T, start_pos
# or G, and exactly the binaries the compile gate checks.
@triton.jit(do_not_specialize=["T", "start_pos", "H_KV", "G", "ROWS_BUCKET", "KV_BUCKET"])
def _attention_kernel(
    Q,  # (B, T, Hq, D) queries
    K,  # (B, S, Hkv, D) keys
    V,  # (B, S, Hkv, D) values
    Out,  # (B, T, Hq, D) output
    stride_qb,  # q strides: batch, token, head (the last dim is contiguous)
    stride_qt,
    stride_qh,
    stride_kb,  # k strides: batch, position, head
    stride_ks,
    stride_kh,
    stride_vb,  # v strides: batch, position, head
    stride_vs,
    stride_vh,
    stride_ob,  # out strides: batch, token, head
    stride_ot,
    stride_oh,
    T,  # new tokens per sequence
    start_pos,  # absolute position of token 0 (keys 0 .. start_pos + T - 1 are read)
    H_KV,  # kv heads
    G,  # query heads per kv head (Hq // Hkv)
    qk_scale,  # softmax scale * log2(e)
    ROWS_BUCKET,  # next_pow2(T * G): autotune key only
    KV_BUCKET,  # next_pow2(start_pos + T): autotune key only
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_M: tl.constexpr,  # (token, head) rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    DOT_FP32: tl.constexpr,  # interpreter + bf16 only: the interpreter computes bf16 dots on raw bits
):
    # Heaviest tiles (latest tokens, longest key range) first, so the causal tail does not straggle.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # int64: b * stride_b can pass 2^31 on a large cache
    h_kv = pid_bh % H_KV

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = (token r // G, head h_kv * G + r % G)
    row_ok = rows < T * G
    tok = tl.minimum(rows // G, T - 1)  # padding rows borrow the last token: finite maths, never stored
    head = h_kv * G + rows % G
    q_pos = start_pos + tok
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_d[None, :]

    q_ptrs = Q + b * stride_qb + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + cols
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    k_rows = offs_n[:, None] * stride_ks
    v_rows = offs_n[:, None] * stride_vs

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    first_pos = start_pos + (pid_m * BLOCK_M) // G  # position of the tile's first token
    last_pos = start_pos + tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys [0, full_end) are visible to every row
    # Blocks below the diagonal, no mask; then the diagonal blocks, masked, continuing from the same pointers.
    acc, l_i, m_i, k_base, v_base = _attend_blocks(
        acc, l_i, m_i, q, k_base, v_base, k_rows, v_rows, cols, stride_ks, stride_vs,
        q_pos, 0, full_end, qk_scale, K, 0, 0, 0, BLOCK_N, False, DOT_FP32, 0,
    )  # fmt: skip
    acc, l_i, m_i, k_base, v_base = _attend_blocks(
        acc, l_i, m_i, q, k_base, v_base, k_rows, v_rows, cols, stride_ks, stride_vs,
        q_pos, full_end, last_pos + 1, qk_scale, K, 0, 0, 0, BLOCK_N, True, DOT_FP32, 0,
    )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + cols
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Short on purpose: 128-row tiles for long prefills (the wide
# key blocks only where the tensor cores read K from shared memory, see _allowed), 64 rows for mid-size
# ones, 16 rows for decode-like chunks (T * G <= 16). fp32 (tests only: FMA, no tensor cores) gets one small
# tile; the ieee fp32 product is register-hungry and every bigger tile spilled on sm_80 or sm_90.
_HALF_CONFIGS = [
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 32, 8, 3),
    (64, 32, 4, 3),
    (16, 32, 4, 3),
]
_FP32_CONFIGS = [(16, 16, 4, 2)]
_INTERPRET_CONFIG = (64, 32, 4, 2)  # large tiles keep the interpreter's per-op cost low; its speed is moot


def _allowed(cfg: tuple[int, int, int, int], head_dim: int, dtype: torch.dtype, arch: int, smem: int) -> bool:
    """Whether a config may run for this dtype, head dim, compute capability (80, 90, ...) and shared memory.

    - fp32 gets its own list, fp16/bf16 theirs.
    - Shared memory: the q tile plus ``stages`` buffers of one K and one V block, which is what Triton's
      pipeliner allocated on sm_90 in the compile gate (sm_80 allocates less).
    - sm_90 (wgmma) and sm_100 (tcgen05) read the K^T operand of s = q k^T from shared memory, for tiles of
      64+ rows. Elsewhere (sm_80/86/89/120, and 16-row tiles) mma.sync takes it from registers, each warp
      holding the whole (D, BLOCK_N) tile: BLOCK_N * D / 64 registers a thread. At BLOCK_N * D = 8192 ptxas
      spilled on sm_80 and sm_120; at 4096 it did not (compile gate, bundled ptxas).
    """
    block_m, block_n, _, stages = cfg
    if cfg not in (_FP32_CONFIGS if dtype == torch.float32 else _HALF_CONFIGS):
        return False
    elem = torch.empty((), dtype=dtype).element_size()
    if elem * head_dim * (block_m + 2 * stages * block_n) > smem:
        return False
    smem_operands = arch // 10 in (9, 10) and block_m >= 64 and dtype != torch.float32
    return smem_operands or block_n * head_dim <= 4096


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    dtype, head_dim, rows = args["Q"].dtype, args["HEAD_DIM"], args["ROWS_BUCKET"]
    major, minor = torch.cuda.get_device_capability(args["Q"].device)
    props = torch.cuda.get_device_properties(args["Q"].device)
    smem = getattr(props, "shared_memory_per_block_optin", 99 * 1024)

    def cfg(c: triton.Config) -> tuple[int, int, int, int]:
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    fit = [c for c in configs if _allowed(cfg(c), head_dim, dtype, 10 * major + minor, smem)]
    # Tiles taller than the rows there are only compute padding; the smallest tile always stays.
    smallest = min(c.kwargs["BLOCK_M"] for c in fit)
    return [c for c in fit if c.kwargs["BLOCK_M"] <= max(rows, smallest)]


# Autotuning costs a compile and ~0.13 s of benchmarking per surviving config, paid inside the first prefill
# of each (rows, keys) bucket; cache_results keeps the winners on disk (Triton's cache dir) so that later
# processes, a CLI's next run say, do not pay it again. Older Tritons without the option tune per process.
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_attention_autotuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in _HALF_CONFIGS + _FP32_CONFIGS
    ],
    key=["ROWS_BUCKET", "KV_BUCKET", "HEAD_DIM"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune},
    **_CACHE_RESULTS,
)(_attention_kernel)


_INTERPRET = interpreting(_attention_kernel)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start_pos: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, T, Hq, D) at positions start_pos.. against k, v (B, S, Hkv, D); see module doc.

    Returns (B, T, Hq, D) in q's dtype, written into ``out`` when given (any strides, last dim contiguous).
    Query head h reads kv head h // (Hq // Hkv); k/v are never repeated. ``scale`` defaults to 1/sqrt(D).
    """
    interpret = _INTERPRET
    check_tensor("q", q, interpret=interpret, ndim=4)  # (B, T, Hq, D)
    B, T, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"q: head dim must be 64 or 128, got {D}")
    if T < 1 or B < 1:
        raise ValueError(f"q: expected B >= 1 and T >= 1, got shape {tuple(q.shape)}")
    check_tensor("k", k, like=q, ndim=4)  # (B, S, Hkv, D)
    S, Hkv = k.shape[1], k.shape[2]
    check_tensor("k", k, like=q, shape=(B, S, Hkv, D))
    check_tensor("v", v, like=q, ndim=4, shape=(B, S, Hkv, D))
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"k: kv heads ({Hkv}) must divide the query heads ({Hq})")
    if B * Hkv > 65535:  # grid axis 1, which CUDA caps at 65535
        raise ValueError(f"k: expected batch * kv heads <= 65535, got {B} * {Hkv}")
    if not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"start_pos: expected an int >= 0, got {start_pos!r}")
    if start_pos + T > S:
        raise ValueError(f"start_pos: start_pos + T = {start_pos + T} exceeds the {S} keys in k/v")
    check_scale(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_tensor("out", out, like=q, shape=(B, T, Hq, D))

    strides = [aligned_strides(name, t, 3) for name, t in (("q", q), ("k", k), ("v", v), ("out", out))]
    strides = [s for st in strides for s in st]
    G = Hq // Hkv
    qk_scale = (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E
    rows = T * G
    args = (
        q, k, v, out, *strides,
        T, start_pos, Hkv, G, qk_scale, triton.next_power_of_2(rows), triton.next_power_of_2(start_pos + T),
    )  # fmt: skip
    if interpret:
        block_m, block_n, num_warps, num_stages = _INTERPRET_CONFIG
        grid = (triton.cdiv(rows, block_m), B * Hkv)
        _attention_kernel[grid](
            *args, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=q.dtype == torch.bfloat16,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    else:

        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]), B * Hkv)

        _attention_autotuned[grid](*args, HEAD_DIM=D, DOT_FP32=False)
    return out


def compile_variants() -> list[dict]:
    """Every (config, dtype, head dim) the GPU autotuner can run, for the AOT compile gate, each for the
    compute capabilities _allowed admits it on (sm_80's 163 KB and sm_90's 227 KB of shared memory).
    ``DOT_FP32=True`` is left out: only the interpreter picks it."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    smem = {80: 163 * 1024, 90: 227 * 1024}
    variants = []
    for cfg in _HALF_CONFIGS + _FP32_CONFIGS:
        m, n, w, s = cfg
        for dtype in DTYPES:
            for d in HEAD_DIMS:
                archs = [a for a in (80, 90) if _allowed(cfg, d, dtype, a, smem[a])]
                if not archs:
                    continue
                types = {x: ptr[dtype] for x in ("Q", "K", "V", "Out")} | {"qk_scale": "fp32"}
                cx = {"HEAD_DIM": d, "BLOCK_M": m, "BLOCK_N": n, "DOT_FP32": False}
                name = f"attention_{str(dtype).split('.')[-1]}_d{d}_m{m}_n{n}_w{w}_s{s}"
                variants.append(variant(name, _attention_kernel, types, cx, w, s, archs=archs))
    return variants
