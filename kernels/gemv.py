"""Skinny matrix products for decode (GEMV, a few rows of x), with the ops around them fused in.

The maths. For x (M, K) with M small (1..8 in batch decode) and a weight W (N, K), stored as nn.Linear stores
it (a row per output), one of:

    y = x @ W.T                                  the plain product
    y = rms(x) * ((x * gamma) @ W.T)             NORM: the RMSNorm before the product folded in,
                                                 rms(x) = 1 / sqrt(mean(x^2) + eps), gamma the norm's weight
    y = residual + x @ W.T                       ADD: the residual add after wo and w2
    y = silu(x @ W1.T) * (x @ W3.T)              SWIGLU: W = [W1; W3] (2N, K), the fused w1|w3 of the FFN

all accumulated in fp32 and rounded once at the store. Because the norm is linear in its scale, the kernel
never materialises the normalised x: it multiplies each chunk of x by the matching chunk of gamma (K values,
read from L2 by every program: 1/N of the weight bytes) and sums x^2 while it streams x for the product, then
scales the (M, N) result by rms(x) at the end. The weights stay as the checkpoint has them, so prefill's
cuBLAS products and the quantized layouts use the same tensors.

Bytes and floor. A GEMV reads every weight once and does 2 FLOPs per weight per row of x: at M = 1 that is
1 FLOP per byte of bf16, far below any GPU's balance point, so the floor is N * K * 2 bytes / bandwidth.
Llama-3-8B's decode step reads 15 GB of weights through five such products per layer and the output head;
at an H200's measured 4.3 TB/s that floor is about 3.5 ms per token. Fusing the norm, the residual add and
SwiGLU removes the separate launches (and their reads and writes of x) that cost more than their bytes at
batch 1. (Predicted from bytes and launch counts; not measured on a GPU.)

Tiling. One program per BLOCK_N output rows (and per 16 rows of x): it walks K in BLOCK_K chunks, several
in flight, loading a (BLOCK_N, BLOCK_K) tile of W (contiguous along K: 16-byte vector loads) and the matching
(16, BLOCK_K) slice of x, and accumulates x_tile @ W_tile.T on the tensor cores with x padded to 16 rows (the
smallest MMA tile: the padding costs compute the GEMV has to spare, and no bytes). Small BLOCK_N keeps enough
programs in flight to fill every SM when N is only 4096 (wo, w2): 16 rows give 256 programs.

Split-K. Llama-3.2-1B's wo and w2 (N = 2048) have only 128 such tiles: fewer programs than an H200's 132 SMs,
one 4-warp program per SM, too few loads in flight to pull the full bandwidth. So a launch may split K: grid
(tiles, rows / 16, splits), program (n, m, s) sums its K_SPLIT slice of K into fp32 partials (only the rows of x
there are; the norm's sum of x^2 too), stores them to a GemvWorkspace, then takes a ticket from the tile's
int32 counter (an acq_rel atomic after a barrier, kernels/decode_step.py's protocol). The program that draws the last
ticket adds the slots in split order -- the same bits whichever finished last -- and runs the epilogue (the
norm's 1/rms, SwiGLU, the residual, one rounding), then leaves the counter at zero: still one launch per product.
The partials cost M * BLOCK_N * 4 bytes per program, against the 16 * K_SPLIT * 2 of weight it reads (1/256 at
batch 1 and 1024-weight splits). ``plan_split_k`` splits until the launch has 2 programs per SM, each split at
least 1024 weights long: at an H200's 132 SMs, 1B's qkv and wo into 2, its w2 into 3, 8B's wo and w2 into 2,
the rest (and the output head) whole. That rule is a prediction, not a measurement: benchmarks/gemv.py times
each shape split and whole (``triton`` / ``triton_whole``) beside cuBLAS so a GPU run can say where it pays.
kernels/quant.py's dequantizing GEMVs share the same split and merge.

The fused decode step (model/llama.py, ``TransformerBlock.decode``) calls ``linear`` for its four products and
the head, with the model's GemvWorkspace; prefill keeps cuBLAS (compute bound at many rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import check_tensor, interpreting, variant

__all__ = [
    "linear", "compile_variants", "fused_epilogue", "split_range", "split_k_epilogue", "check_x", "check_fusions",
    "GemvWorkspace", "plan_split_k", "check_config",
]  # fmt: skip

BLOCK_M = 16  # rows of x per program: the smallest tensor-core tile
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 16  # split-K: most splits of K per output tile
MIN_K_PER_SPLIT = 1024  # split-K: fewest weights of a row per split (8 chunks of 128: the pipeline runs full)
PROGRAMS_PER_SM = 2  # split-K: split until the launch has this many programs per SM (a prediction; see below)
SPLIT_MAX_N = 16384  # split-K by default only up to this N: the output head (2004+ tiles) never needs it


@triton.jit
def fused_epilogue(
    acc,  # (16, BLOCK_N) fp32: x @ W.T (SWIGLU: x @ W1.T), rows of x by output columns
    acc_up,  # (16, BLOCK_N) fp32: x @ W3.T (SWIGLU only)
    sumsq,  # (16,) fp32: sum of x^2 over K, per row (NORM only)
    rows,  # (16,) rows of x
    cols,  # (BLOCK_N,) output columns
    row_ok,  # (16,) rows < M
    col_ok,  # (BLOCK_N,) columns < N
    K,
    eps,
    Res,  # (M, N) residual (ADD only)
    stride_rm,
    Out,  # (M, N) output, x's dtype or fp32
    stride_om,
    NORM: tl.constexpr,
    ADD: tl.constexpr,
    SWIGLU: tl.constexpr,
):
    """The end of every fused GEMV, whatever its weight format (this file's, kernels/quant.py's): the RMSNorm's
    1 / rms(x) per row, SwiGLU, the residual, one rounding at the store."""
    if NORM:
        rstd = 1.0 / tl.sqrt(sumsq / K + eps)
        acc = acc * rstd[:, None]
        acc_up = acc_up * rstd[:, None]
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    mask = row_ok[:, None] & col_ok[None, :]
    if ADD:
        r = tl.load(Res + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        acc += r.to(tl.float32)
    tl.store(Out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def split_range(K, K_SPLIT, SPLIT: tl.constexpr):
    """The K range [k_lo, k_hi) this program sums: all of it, or split program_id(2)'s K_SPLIT weights."""
    if SPLIT:
        k_lo = tl.program_id(2) * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
    else:
        k_lo = 0
        k_hi = K
    return k_lo, k_hi


@triton.jit
def split_k_epilogue(
    acc,  # (16, BLOCK_N) fp32: this program's sums (over its split's K range when SPLIT)
    acc_up,  # (16, BLOCK_N) fp32: SWIGLU's W3 sums
    sumsq,  # (16,) fp32: the norm's sum of x^2 over the same K range
    rows,  # and the rest as fused_epilogue's
    cols,
    row_ok,
    col_ok,
    K,
    eps,
    Res,
    stride_rm,
    Out,
    stride_om,
    Part,  # fp32 partials: per output tile, num_splits slots of [acc | acc_up | sumsq] (GemvWorkspace.part)
    Counter,  # int32 ticket per output tile, zero between launches (GemvWorkspace.counters)
    NORM: tl.constexpr,
    ADD: tl.constexpr,
    SWIGLU: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """fused_epilogue, straight away, or (SPLIT) once every split of this output tile has summed its part of K:
    each split stores its sums, takes a ticket, and the one that draws the last ticket adds the slots in split
    order (the same result whichever finishes last) and runs the epilogue: split-K in one launch."""
    if SPLIT:
        num_splits = tl.num_programs(2)
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        slot_size = 2 * 16 * BLOCK_N + 16
        first = Part + tile.to(tl.int64) * num_splits * slot_size
        r = tl.arange(0, 16)
        offs = r[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        mine = first + tl.program_id(2) * slot_size
        tl.store(mine + offs, acc, mask=row_ok[:, None])  # only the rows of x there are: M of 16 at batch 1
        if SWIGLU:
            tl.store(mine + 16 * BLOCK_N + offs, acc_up, mask=row_ok[:, None])
        if NORM:
            tl.store(mine + 32 * BLOCK_N + r, sumsq, mask=row_ok)
        # Publish, then take a ticket (kernels/decode_step.py's protocol): every thread's stores are ordered before
        # the barrier, the barrier before the atomic's release; the last ticket's acquire sees all the slots.
        tl.debug_barrier()
        ticket = tl.atomic_add(Counter + tile, 1, sem="acq_rel")
        if ticket == num_splits - 1:
            tl.atomic_xchg(Counter + tile, 0)
            acc = tl.zeros([16, BLOCK_N], tl.float32)
            acc_up = tl.zeros([16, BLOCK_N], tl.float32)
            sumsq = tl.zeros([16], tl.float32)
            for s in range(0, num_splits):  # .cg: from L2, where the other programs' stores went
                slot = first + s * slot_size
                acc += tl.load(slot + offs, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    acc_up += tl.load(slot + 16 * BLOCK_N + offs, mask=row_ok[:, None], other=0.0,
                                      cache_modifier=".cg")  # fmt: skip
                if NORM:
                    sumsq += tl.load(slot + 32 * BLOCK_N + r, mask=row_ok, other=0.0, cache_modifier=".cg")
            fused_epilogue(
                acc, acc_up, sumsq, rows, cols, row_ok, col_ok, K, eps, Res, stride_rm, Out, stride_om,
                NORM, ADD, SWIGLU,
            )  # fmt: skip
    else:
        fused_epilogue(
            acc, acc_up, sumsq, rows, cols, row_ok, col_ok, K, eps, Res, stride_rm, Out, stride_om, NORM, ADD, SWIGLU
        )


# N is never specialised: Triton makes an int argument equal to 1 a constexpr at launch, and ``N.to(tl.int64)``
# (SWIGLU's W3 offset) does not compile on a constexpr; unspecialised, the GPU compiles what the compile gate does.
@triton.jit(do_not_specialize=["N"])
def _gemv_kernel(
    X,  # (M, K) input rows, unit column stride
    W,  # (N, K) weight (SWIGLU: (2N, K), W1 rows then W3 rows), contiguous
    Gamma,  # (K,) the RMSNorm weight (NORM only)
    Res,  # (M, N) residual (ADD only)
    Out,  # (M, N) output
    M,  # rows of x
    N,  # output columns (SWIGLU: half of W's rows)
    K,  # reduction length
    stride_xm,  # row stride of x
    stride_rm,  # row stride of the residual
    stride_om,  # row stride of out
    eps,  # RMSNorm epsilon (NORM only)
    Part,  # split-K partials, fp32 (SPLIT only): a GemvWorkspace's
    Counter,  # split-K tickets, int32, one per output tile, left at zero (SPLIT only)
    K_SPLIT,  # weights of a row per split, a multiple of BLOCK_K (SPLIT only)
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction chunk
    NORM: tl.constexpr,  # x * gamma in the product, each row of the result scaled by rms(x row)
    ADD: tl.constexpr,  # add the residual
    SWIGLU: tl.constexpr,  # silu(x @ W1.T) * (x @ W3.T)
    DOT_FP32: tl.constexpr,  # fp32 inputs, or bf16 in the interpreter: dots in fp32 ("ieee")
    SPLIT: tl.constexpr,  # split-K: program_id(2) sums K_SPLIT of K, the last split of a tile to finish merges
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * 16 + tl.arange(0, 16)  # rows of x (padded to 16)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = rows of W
    row_ok = rows < M
    col_ok = cols < N
    k_lo, k_hi = split_range(K, K_SPLIT, SPLIT)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = W + cols.to(tl.int64)[:, None] * K + (k_lo + offs_k)[None, :]  # int64: N * K passes 2^31 (the head)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    acc_up = tl.zeros([16, BLOCK_N], tl.float32)
    sumsq = tl.zeros([16], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + offs_k < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, 1)
            gamma = tl.load(Gamma + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            x = (xf * gamma[None, :]).to(x.dtype)  # rounded as the unfused norm's output would be
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        if SWIGLU:  # the matching rows of W3, N rows further down
            u = tl.load(w_ptrs + N.to(tl.int64) * K, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_FP32:
                u = u.to(tl.float32)
            acc_up = tl.dot(x, tl.trans(u), acc_up, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    split_k_epilogue(
        acc, acc_up, sumsq, rows, cols, row_ok, col_ok, K, eps, Res, stride_rm, Out, stride_om, Part, Counter,
        NORM, ADD, SWIGLU, SPLIT, BLOCK_N,
    )  # fmt: skip


_INTERPRET = interpreting(_gemv_kernel)


def _config(N: int, dtype: torch.dtype, swiglu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages). 16 output columns while wider blocks would leave SMs idle
    (N <= 16384: wo and w2 give 256 programs), and always with SwiGLU (it loads two weight tiles); 64 for the
    output head. 128-wide K chunks (256 bytes of a bf16 row), 4 in flight; fp32 (tests only) 64-wide (32 for the
    head), 3 deep.
    From the compile gate: 256-wide bf16 chunks kept an 8-byte stack frame on sm_80, and SwiGLU with 64
    columns and 4 stages needed 216 KB of shared memory. Not tuned on a GPU."""
    block_n = 16 if N <= 16384 or swiglu else 64
    if dtype == torch.float32:  # 64 columns x 64-wide chunks with the norm's gamma kept a 16-byte stack on sm_90
        return (block_n, 64 if block_n == 16 else 32, 4, 3)
    return (block_n, 128, 4, 4)


def _slot_size(block_n: int) -> int:
    """fp32 values of one split's partials for a tile: acc and acc_up (16 x BLOCK_N each), sumsq (16)."""
    return 2 * 16 * block_n + 16


class GemvWorkspace:
    """What split-K GEMVs keep between their programs, allocated once per model (not per call, so a captured CUDA
    graph never owns it): ``part``, fp32 partial sums, and ``counters``, an int32 ticket per output tile that
    every launch leaves at zero. Products run one after another and reuse it; ``linear`` makes a temporary one
    when given none (two allocations and a memset launch). ``for_device`` sizes it for every split the launchers
    choose by themselves (``plan_split_k``): below 2 * PROGRAMS_PER_SM * SMs slots of a 64-column tile."""

    def __init__(self, part_size: int, counters: int, device: torch.device | str):
        self.part = torch.empty(part_size, dtype=torch.float32, device=device)
        self.counters = torch.zeros(counters, dtype=torch.int32, device=device)

    @classmethod
    def for_device(cls, device: torch.device | str) -> GemvWorkspace:
        target = split_target(torch.device(device))
        # a default split of t < target tiles: splits < target / t + 1, so t * splits < 2 * target slots
        return cls(2 * target * _slot_size(64), target, device)

    def fits(self, tiles: int, splits: int, block_n: int) -> bool:
        return self.counters.numel() >= tiles and self.part.numel() >= tiles * splits * _slot_size(block_n)


_SMS: dict[torch.device, int] = {}


def split_target(device: torch.device) -> int:
    """Programs a launch should have before split-K stops paying: PROGRAMS_PER_SM per SM of a CUDA device; 0
    (never split by default) elsewhere, where the interpreter runs programs one at a time."""
    if device.type != "cuda":
        return 0
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * _SMS[device]


def plan_split_k(tiles: int, K: int, block_k: int, device: torch.device, split_k: int | None) -> tuple[int, int]:
    """(splits, K_SPLIT): how many programs share each output tile's K, and the weights of a row each sums (a
    multiple of block_k). ``split_k`` None: enough splits to reach ``split_target`` programs, each at least
    MIN_K_PER_SPLIT long, at most MAX_SPLITS; else at most that many (fewer when K is short)."""
    if split_k is None:
        target = split_target(device)
        split_k = 1 if tiles >= target else min(-(-target // tiles), K // MIN_K_PER_SPLIT, MAX_SPLITS)
    elif not (isinstance(split_k, int) and not isinstance(split_k, bool) and 1 <= split_k <= MAX_SPLITS):
        raise ValueError(f"split_k: expected None or an int in [1, {MAX_SPLITS}], got {split_k!r}")
    if split_k <= 1:
        return 1, K
    k_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return triton.cdiv(K, k_split), k_split


def split_args(
    tiles: int, K: int, block_k: int, block_n: int, x: torch.Tensor, split_k: int | None, workspace
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(splits, K_SPLIT, part, counters) for a launch of ``tiles`` output tiles (shared with kernels/quant.py).
    A default split that the given workspace cannot hold is not taken; an asked-for one makes a temporary."""
    splits, k_split = plan_split_k(tiles, K, block_k, x.device, split_k)
    if workspace is not None:
        if not isinstance(workspace, GemvWorkspace):
            raise ValueError(f"workspace: expected a kernels.gemv.GemvWorkspace, got {type(workspace).__name__}")
        if workspace.counters.device != x.device:
            raise ValueError(f"workspace: on {workspace.counters.device}, x is on {x.device}")
    if splits == 1:
        return 1, K, x, x  # unused pointers
    if workspace is None or not workspace.fits(tiles, splits, block_n):
        if split_k is None and workspace is not None:
            return 1, K, x, x
        workspace = GemvWorkspace(tiles * splits * _slot_size(block_n), tiles, x.device)
    return splits, k_split, workspace.part, workspace.counters


def check_config(config, chunk: int) -> tuple[int, int, int, int]:
    """A launcher's ``config`` override, (BLOCK_N, BLOCK_K, num_warps, num_stages), checked (shared with
    kernels/quant.py): powers of two, BLOCK_N >= 16 (the tensor cores' tile), BLOCK_K a multiple of ``chunk`` (the
    layout's smallest chunk), 1-16 warps, 1-8 stages. For tuning (benchmarks/gemv_configs.py): the compile gate
    checks the launchers' own choices only."""
    ok = isinstance(config, tuple) and len(config) == 4 and all(type(v) is int and v > 0 for v in config)
    if ok:
        bn, bk, w, s = config
        ok = bn >= 16 and bn & (bn - 1) == 0 and bk % chunk == 0 and bk & (bk - 1) == 0 and w in (1, 2, 4, 8, 16)
        ok = ok and s <= 8
    if not ok:
        raise ValueError(
            f"config: expected (BLOCK_N, BLOCK_K, num_warps, num_stages): powers of two, BLOCK_N >= 16, BLOCK_K a "
            f"multiple of {chunk}, 1-16 warps, 1-8 stages; got {config!r}"
        )
    return config


def check_x(x: torch.Tensor, interpret: bool) -> int:
    """K of a GEMV's input x (..., K), after checking it (shared with kernels/quant.py)."""
    check_tensor("x", x, interpret=interpret, dtypes=DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected shape (..., K) with K >= 1, got {tuple(x.shape)}")
    return x.shape[-1]


def check_fusions(x, w_name: str, w_rows: int, rms_weight, eps, residual, swiglu: bool, out, interpret: bool):
    """The fusion arguments of a GEMV against x (..., K) and a weight of ``w_rows`` rows (shared with
    kernels/quant.py). Returns (x2, out, out2, residual2, N): x as (M, K) rows, the output (allocated in x's dtype
    if not given) and its (M, N) view, the residual's (M, N) view (out2 when there is none), and N."""
    K = x.shape[-1]
    if swiglu and w_rows % 2:
        raise ValueError(f"{w_name}: swiglu needs an even number of rows (W1 then W3), got {w_rows}")
    if swiglu and residual is not None:
        raise ValueError("residual: not supported with swiglu (no Llama product needs both)")
    N = w_rows // 2 if swiglu else w_rows
    if rms_weight is not None:
        check_tensor("rms_weight", rms_weight, like=x, like_name="x", shape=(K,))
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
            raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
    x2 = x.reshape(-1, K)  # a view for any x whose rows share one stride (the model's activations)
    shape = (*x.shape[:-1], N)
    if residual is not None:
        check_tensor("residual", residual, like=x, like_name="x", shape=shape)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:  # x's dtype, or fp32 (logits straight from bf16 weights)
        check_tensor(
            "out", out, interpret=interpret, dtypes=tuple(dict.fromkeys((x.dtype, torch.float32))), shape=shape
        )
        if out.device != x.device:
            raise ValueError(f"out: expected a tensor on {x.device} (the device of x), got {out.device}")
    out2 = out.reshape(-1, N)
    if out2.data_ptr() != out.data_ptr():
        raise ValueError("out: expected rows that flatten to one row stride (a view, not a copy)")
    r2 = residual.reshape(-1, N) if residual is not None else out2
    return x2, out, out2, r2, N


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    rms_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    workspace: GemvWorkspace | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x (..., K) @ weight.T, fused as the module docstring says; returns (..., N) in x's dtype, or written into
    ``out``, which may also be fp32 (the output head's logits, rounded once from the fp32 accumulator).

    ``rms_weight`` (K,): multiply by RMSNorm(x) with that gamma instead of x: rows scaled by 1 / sqrt(mean(x^2) + eps).
    ``residual`` (..., N): add it. ``swiglu``: weight is (2N, K) = [W1; W3]; return silu(x W1.T) * (x W3.T).
    ``split_k``: split K over at most that many programs per output tile (None: ``plan_split_k``'s choice on a
    GPU, 1 in the interpreter); ``workspace``: the GemvWorkspace their partials go through (None: a temporary).
    ``config``: (BLOCK_N, BLOCK_K, num_warps, num_stages) instead of the launcher's own (tuning only).
    """
    K = check_x(x, _INTERPRET)
    if config is not None:
        check_config(config, 16)
    check_tensor("weight", weight, like=x, like_name="x", ndim=2)
    if weight.shape[1] != K or not weight.is_contiguous():
        raise ValueError(f"weight: expected a contiguous (N, {K}) tensor, got {tuple(weight.shape)}, {weight.stride()}")
    x2, out, out2, r2, N = check_fusions(
        x, "weight", weight.shape[0], rms_weight, eps, residual, swiglu, out, _INTERPRET
    )
    M = x2.shape[0]
    if M == 0:
        return out
    block_n, block_k, num_warps, num_stages = config or _config(N, x.dtype, swiglu)
    if split_k is None and N > SPLIT_MAX_N:
        split_k = 1
    if _INTERPRET and config is None:  # the interpreter pays per program, not per byte: few wide programs
        block_n = max(block_n, min(1024, triton.next_power_of_2(N)))  # (the output head: 126, not 2004)
    tiles = (triton.cdiv(N, block_n), triton.cdiv(M, BLOCK_M))
    splits, k_split, part, counters = split_args(tiles[0] * tiles[1], K, block_k, block_n, x2, split_k, workspace)
    _gemv_kernel[(*tiles, splits)](
        x2, weight, rms_weight if rms_weight is not None else weight, r2, out2,
        M, N, K, x2.stride(0), r2.stride(0), out2.stride(0), float(eps), part, counters, k_split,
        BLOCK_N=block_n, BLOCK_K=block_k, NORM=rms_weight is not None, ADD=residual is not None, SWIGLU=swiglu,
        DOT_FP32=x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16), SPLIT=splits > 1,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def compile_variants() -> list[dict]:
    """Every (dtype, block shape, fusion) the launcher can pick: 16-column blocks with every fusion (N up to 16384,
    Llama-3's wqkv, wo, w13, w2), 64-column ones without SwiGLU (the output head, 128256 rows, whose fused decode
    step form writes fp32 logits from half inputs). K is divisible
    by 16 at every Llama-3 width (Triton specialises on it)."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    variants = []
    for dtype in DTYPES:
        types = {n: ptr[dtype] for n in ("X", "W", "Gamma", "Res", "Out")} | {"eps": "fp32"}
        types |= {"Part": "*fp32", "Counter": "*i32"}
        head = ("plain", "norm", "add") + (("norm_fp32_out",) if dtype != torch.float32 else ())  # the decode head
        for N, fusions in ((4096, ("plain", "norm", "add", "norm_swiglu")), (128256, head)):
            for fusion in fusions:
                types["Out"] = "*fp32" if fusion.endswith("fp32_out") else ptr[dtype]
                block_n, block_k, num_warps, num_stages = _config(N, dtype, "swiglu" in fusion)
                # split-K where a launch may have few tiles (N <= SPLIT_MAX_N), not the head
                for split in (False, True) if N <= SPLIT_MAX_N else (False,):
                    cx = {"BLOCK_N": block_n, "BLOCK_K": block_k, "NORM": "norm" in fusion, "ADD": fusion == "add"}
                    cx |= {"SWIGLU": "swiglu" in fusion, "DOT_FP32": dtype == torch.float32, "SPLIT": split}
                    name = f"gemv_{str(dtype).split('.')[-1]}_n{block_n}_k{block_k}_{fusion}{'_splitk' * split}"
                    # the weight bytes a stage streams (W, and W3), judged for the GPU's dtypes (fp32: tests only)
                    tile = block_n * block_k * dtype.itemsize * (2 if "swiglu" in fusion else 1)
                    tile = tile if dtype != torch.float32 else None
                    variants.append(
                        variant(name, _gemv_kernel, types, cx, num_warps, num_stages, divisible=["K", "K_SPLIT"],
                                stream_bytes=tile)
                    )  # fmt: skip
    return variants
