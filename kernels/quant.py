"""Weight-only quantized GEMV for decode: int8 and int4 weights, dequantized in registers, with gemv's fusions.

The maths. A weight W (N, K) is stored as integers q and, per group of G consecutive weights along K of a row,
an fp16 scale s (and for some layouts an fp16 offset m). One layout per (bits, group, offset):

    layout              w =                 q                     bytes per weight   GGUF block
    int8 per channel    q * s               int8, G = K           1 + 2/K
    Q8_0                q * s               int8, G = 32          34 B / 32 = 1.0625  block_q8_0
    int4 gG (G 32/64/128)  q * s + m        uint4 0..15, G        0.5 + 4/G           (G = 32: block_q4_1)
    Q4_1                q * s + m           uint4 0..15, G = 32   20 B / 32 = 0.625   block_q4_1
    Q4_0                (q - 8) * s         uint4 0..15, G = 32   18 B / 32 = 0.5625  block_q4_0

so int4 g128 is 0.53 bytes a weight and int8 per channel 1.0005 at K = 4096. ``int4`` is asymmetric: the offset
m (the group's minimum) is the zero point z = -m/s kept in the form the kernel uses, an FMA per weight; that is
also llama.cpp's Q4_1, which is therefore the int4 g32 layout, bit for bit. The kernels compute

    y = x @ dequantize(W).T      with the fusions of kernels/gemv.py (NORM, ADD, SWIGLU; read its docstring)

accumulated in fp32 and rounded once at the store; ``kernels.reference.quant_linear`` is the same thing in
plain PyTorch (dequantize to fp32, then ``reference.linear``), the definition they are tested against.

Memory layout (what the loader builds, ``model/quantize.py``), planes rather than GGUF's interleaved blocks, so
every load is a contiguous 16-byte vector per thread:
    qweight  int8 (N, K), or uint8 (N, K/2) for 4 bits: byte j of each 32-weight block b of a row holds weight
             32b + j in its low nibble and 32b + 16 + j in its high one (GGUF's own order: Q4_0/Q4_1 blocks keep
             their bytes; a chunk of 128 weights is 64 contiguous bytes a row)
    scales   fp16 (N, K/G)         a row's scales, contiguous: 4 of them (8 bytes) per 128-weight chunk at G = 32
    mins     fp16 (N, K/G)         the offsets m (int4 and Q4_1 only)
The weight bytes are read as vectors: a 16 x 128-byte tile per chunk, 16 bytes a thread over 4 warps (8-bit), a
32 x 64-byte one, 16 bytes a thread too (4-bit: narrower chunks keep the unpacked tiles in few registers, so
several programs fit on an SM; ``_config`` says why). The scales are a
1/16 (int4 g32) to 1/64 of those bytes: the 8-bit grouped kernel loads them as a (BLOCK_N, groups) tile and
broadcasts in registers; the 4-bit kernels index each byte's scale and offset directly (the chunk's few scales,
L1-resident), since the broadcast's register reshape kept a 144-byte stack frame in the compile gate.
GGUF's Q8_0/Q4_0/Q4_1 blocks are split into these planes when loaded: the same numbers, no precision change.

Bytes and floor. As for the bf16 GEMV, batch-1 decode is bound by the bytes of the weight: N * K * bytes per
weight / bandwidth. Against bf16's 2 bytes a weight, int8 per channel reads 0.50x and int4 g128 0.27x, so the
weight-read floor of Llama-3-8B's decode step (15.0 GB in bf16; its embedding table is not read) drops to 7.5 GB
(int8) and 4.2 GB (int4 g128 with the loader's int8 head), at an H200's 4.8 TB/s (spec sheet, not measured here)
3.1, 1.6 and 0.9 ms a token.
Dequantizing costs an integer unpack and an FMA per weight per program, not per row of x: at M <= 8 the GPU
has the ALU time to spare. (Predicted from bytes; no GPU run measured these kernels yet.)

Tiling. As kernels/gemv.py: one program per BLOCK_N output rows (16; 32 for 4-bit) and 16 rows of x, walking K
in chunks of 128 weights (128 bytes a row for 8-bit, 64 for 4-bit), pipelined 5 stages deep; split-K, where a launch
has too few tiles, is kernels/gemv.py's. A 4-bit chunk is unpacked
into its low and high nibbles, each multiplied by the matching columns of x (read at the block's positions
32b + j and 32b + 16 + j, no shuffle of the weights), two tensor-core products per chunk. Per-channel int8
applies its scale once to the accumulator, after the K loop; grouped layouts scale each group in registers.
K must be a multiple of 32 for the 4-bit and the G = 32 layouts, and of G for int4 (every Llama-3 width and
SmolLM2's 576 and 1536 are).

A prefill of more than 8 rows does not come here: ``QuantLinear`` dequantizes to the activation dtype and calls
torch's matrix product (cuBLAS), compute bound at those sizes, with the dequantized copy freed at once. The fused
decode step does at any batch it runs (an engine's decode steps: up to 16 rows, one row tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import interpreting, variant
from llama3_triton.kernels.gemv import (
    SPLIT_MAX_N,
    check_config,
    check_fusions,
    check_x,
    split_args,
    split_k_epilogue,
    split_range,  # fmt: skip,
)

__all__ = ["quant_linear", "compile_variants", "check_layout", "GROUPS_INT4"]

BLOCK_M = 16  # rows of x per program: the smallest tensor-core tile
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUPS_INT4 = (32, 64, 128)


# N is never specialised: Triton makes an int argument equal to 1 a constexpr at launch, and ``N.to(tl.int64)``
# (SWIGLU's W3 offset) does not compile on a constexpr; unspecialised, the GPU compiles what the compile gate does.
@triton.jit(do_not_specialize=["N"])
def _qgemv_kernel(
    X,  # (M, K) input rows, unit column stride
    Q,  # (N, K) int8, or (N, K/2) uint8 (two 4-bit weights a byte); SWIGLU: 2N rows, W1 then W3
    S,  # (N, K/G) fp16 scales (per channel: (N, 1))
    Z,  # (N, K/G) fp16 offsets m (HAS_MIN only)
    Gamma,  # (K,) the RMSNorm weight (NORM only)
    Res,  # (M, N) residual (ADD only)
    Out,  # (M, N) output
    M,  # rows of x
    N,  # output columns (SWIGLU: half of the weight's rows)
    K,  # reduction length (weights per row)
    stride_xm,  # row stride of x
    stride_qn,  # row stride of Q in bytes (K or K/2)
    stride_sn,  # row stride of S and Z (K/G)
    stride_rm,  # row stride of the residual
    stride_om,  # row stride of out
    eps,  # RMSNorm epsilon (NORM only)
    Part,  # split-K partials, fp32 (SPLIT only): kernels.gemv.GemvWorkspace's
    Counter,  # split-K tickets, int32, one per output tile (SPLIT only)
    K_SPLIT,  # weights of a row per split, a multiple of BLOCK_K (SPLIT only)
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # weights per reduction chunk (a multiple of GROUP)
    GROUP: tl.constexpr,  # weights per scale; 0: one scale per row (int8 per channel)
    BITS: tl.constexpr,  # 8 (int8) or 4 (two a byte)
    HAS_MIN: tl.constexpr,  # 4-bit: w = q * s + m; else (q - 8) * s (Q4_0); 8-bit: q * s
    NORM: tl.constexpr,  # x * gamma in the product, each row of the result scaled by rms(x row)
    ADD: tl.constexpr,  # add the residual
    SWIGLU: tl.constexpr,  # silu(x @ W1.T) * (x @ W3.T)
    DOT_FP32: tl.constexpr,  # fp32 inputs, or bf16 in the interpreter: dots in fp32 ("ieee")
    SPLIT: tl.constexpr,  # split-K: program_id(2) sums K_SPLIT of K, the last split of a tile merges (gemv's)
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * 16 + tl.arange(0, 16)  # rows of x (padded to 16)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = rows of W
    row_ok = rows < M
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    k_lo, k_hi = split_range(K, K_SPLIT, SPLIT)
    offs_b = tl.arange(0, BLOCK_K * BITS // 8)  # byte columns of a chunk
    if BITS == 4:
        offs_lo = (offs_b // 16) * 32 + offs_b % 16  # the weight in each byte's low nibble; high: + 16
    else:
        offs_lo = offs_b
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + (k_lo + offs_lo)[None, :]
    q_ptrs = Q + cols64[:, None] * stride_qn + (k_lo * BITS // 8 + offs_b)[None, :]  # int64: the head's N * K
    up_rows = N.to(tl.int64)  # SWIGLU: W3's rows start N rows further down
    if GROUP > 0:
        offs_g = tl.arange(0, BLOCK_K // GROUP)  # the chunk's groups
        s_off = cols64[:, None] * stride_sn + offs_g[None, :]
        s_off_b = cols64[:, None] * stride_sn + (offs_b // (GROUP // 2))[None, :]  # 4-bit: each byte's group
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    acc_up = tl.zeros([16, BLOCK_N], tl.float32)
    sumsq = tl.zeros([16], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + offs_lo < K  # 4-bit: the high nibble's weight is in the same 32-block, so valid alike
        x_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = col_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if BITS == 4:
            x_hi = tl.load(x_ptrs + 16, mask=x_mask, other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            gamma = tl.load(Gamma + k0 + offs_lo, mask=k_ok, other=0.0).to(tl.float32)
            sumsq += tl.sum(xf * xf, 1)
            x = (xf * gamma[None, :]).to(x.dtype)  # rounded as the unfused norm's output would be
            if BITS == 4:
                xhf = x_hi.to(tl.float32)
                gamma_hi = tl.load(Gamma + k0 + 16 + offs_lo, mask=k_ok, other=0.0).to(tl.float32)
                sumsq += tl.sum(xhf * xhf, 1)
                x_hi = (xhf * gamma_hi[None, :]).to(x_hi.dtype)
        if DOT_FP32:
            x = x.to(tl.float32)
            if BITS == 4:
                x_hi = x_hi.to(tl.float32)
        if GROUP > 0:
            g0 = k0 // GROUP
            g_mask = col_ok[:, None] & (g0 + offs_g < stride_sn)[None, :]  # stride_sn = K / GROUP
        for half in tl.static_range(2 if SWIGLU else 1):
            # half 0: the rows of W (W1 with SWIGLU); half 1: W3's, N rows further down
            qp = q_ptrs + half * up_rows * stride_qn
            q = tl.load(qp, mask=w_mask, other=0)
            if GROUP > 0:
                if BITS == 4:
                    so_b = s_off_b + g0 + half * up_rows * stride_sn
                else:
                    so = s_off + g0 + half * up_rows * stride_sn
                    s = tl.load(S + so, mask=g_mask, other=0.0).to(tl.float32)
            if BITS == 4:
                # byte column c of the chunk is in group c // (GROUP / 2): each byte's scale (and offset) is read
                # from the chunk's few scales, L1-resident, in the byte tile's own layout (no register shuffle)
                sc = tl.load(S + so_b, mask=w_mask, other=0.0).to(tl.float32)
                lo = (q & 0xF).to(tl.float32)
                hi = (q >> 4).to(tl.float32)
                if HAS_MIN:
                    mn = tl.load(Z + so_b, mask=w_mask, other=0.0).to(tl.float32)
                    w_lo = (lo * sc + mn).to(x.dtype)
                    w_hi = (hi * sc + mn).to(x.dtype)
                else:
                    w_lo = ((lo - 8.0) * sc).to(x.dtype)
                    w_hi = ((hi - 8.0) * sc).to(x.dtype)
                part = tl.dot(x, tl.trans(w_lo), input_precision="ieee")
                part = tl.dot(x_hi, tl.trans(w_hi), part, input_precision="ieee")
            else:
                if GROUP > 0:
                    w = tl.reshape(q.to(tl.float32), [BLOCK_N, BLOCK_K // GROUP, GROUP]) * s[:, :, None]
                    w = tl.reshape(w, [BLOCK_N, BLOCK_K]).to(x.dtype)
                else:
                    w = q.to(x.dtype)  # integers up to 127: exact in fp16 and bf16; scaled after the loop
                part = tl.dot(x, tl.trans(w), input_precision="ieee")
            if half == 0:
                acc += part
            else:
                acc_up += part
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K * BITS // 8
    if GROUP == 0:  # one scale per row: applied once, to the sums
        s = tl.load(S + cols64 * stride_sn, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
        if SWIGLU:
            s_up = tl.load(S + (cols64 + up_rows) * stride_sn, mask=col_ok, other=0.0).to(tl.float32)
            acc_up = acc_up * s_up[None, :]
    split_k_epilogue(
        acc, acc_up, sumsq, rows, cols, row_ok, col_ok, K, eps, Res, stride_rm, Out, stride_om, Part, Counter,
        NORM, ADD, SWIGLU, SPLIT, BLOCK_N,
    )  # fmt: skip


_INTERPRET = interpreting(_qgemv_kernel)


def _config(N: int, bits: int, dtype: torch.dtype, swiglu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), chosen with the compile gate's residency prediction
    (benchmarks/kernel_resources.py: programs resident per SM x stages in flight x weight bytes a stage, which an
    H200 needs at ~25 KB a SM). Not tuned on a GPU.

    8-bit: 128 weights (128 bytes) of 16 rows a chunk, 16-byte loads over 4 warps, 5 stages (3 kept only
    20-24 KB in flight with the norm); 64 rows for the output head (N > 16384, without SwiGLU).
    4-bit: 128 weights (64 bytes) of 32 rows a chunk over 4 warps, 5 stages. The first layout, 256 weights of 16
    rows over 8 warps at 3 stages, held 130-200 registers a thread: one program a SM, 4-8 KB in flight, a
    predicted quarter of the bandwidth; this one fits 3-5 programs a SM (32-64 KB). Wider chunks at 4 warps needed
    255 registers and a stack frame (triton 3.6), 64-row blocks a 120-byte stack frame on sm_80."""
    if bits == 4:
        return (32, 128, 4, 5)
    return (16 if N <= 16384 or swiglu else 64, 128, 4, 5)


def check_layout(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, K: int, group: int) -> int:
    """Check a quantized weight's planes against the layout of the module docstring; return its bits (4 or 8).
    ``group`` = K means one scale per row."""
    bits = {torch.int8: 8, torch.uint8: 4}.get(getattr(qweight, "dtype", None))
    if bits is None:
        raise ValueError(
            f"qweight: expected an int8 (8-bit) or uint8 (two 4-bit weights a byte) tensor, got {qweight!r:.60}"
        )
    if qweight.dim() != 2 or not qweight.is_contiguous() or qweight.shape[1] * (8 // bits) != K:
        raise ValueError(f"qweight: expected a contiguous (N, {K * bits // 8}) tensor, got {tuple(qweight.shape)}")
    if not (isinstance(group, int) and group > 0 and K % group == 0):
        raise ValueError(f"group: expected a group size that divides K={K}, got {group!r}")
    if group != K and (group % 32 or (bits == 4 and group not in GROUPS_INT4)):
        raise ValueError(
            f"group: {bits}-bit layouts take groups of {'32, 64 or 128' if bits == 4 else '32'} or K, got {group}"
        )
    if bits == 4 and K % 32:
        raise ValueError(f"K: 4-bit layouts need a multiple of 32 weights a row, got {K}")
    want = (qweight.shape[0], K // group)
    for name, t in (("scales", scales), ("mins", mins)):
        if t is None:
            continue
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype != torch.float16
            or tuple(t.shape) != want
            or not t.is_contiguous()
        ):
            raise ValueError(f"{name}: expected a contiguous float16 tensor of shape {want}, got {t!r:.80}")
        if t.device != qweight.device:
            raise ValueError(f"{name}: expected a tensor on {qweight.device} (the device of qweight), got {t.device}")
    if mins is not None and bits == 8:
        raise ValueError("mins: 8-bit layouts are symmetric (w = q * s), got offsets")
    return bits


def quant_linear(
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
    split_k: int | None = None,
    workspace=None,
    config: tuple[int, int, int, int] | None = None,
    packed: None = None,
) -> torch.Tensor:
    """x (..., K) @ dequantize(W).T with the fusions and split-K of ``kernels.gemv.linear`` (same keywords, same
    meaning); W given as its planes (module docstring): ``qweight``, ``scales``, ``mins`` (None: symmetric),
    ``group`` (weights per scale; K: per channel). Returns (..., N) in x's dtype. ``config``: as gemv's (BLOCK_K a
    multiple of 32 and of the group). ``packed``: ``pack_quant``'s, always None (the kernel reads the planes)."""
    if packed is not None:
        raise ValueError("packed: the Triton kernel reads the planes themselves (its pack_quant gives None)")
    K = check_x(x, _INTERPRET)
    bits = check_layout(qweight, scales, mins, K, group)
    if config is not None:
        check_config(config, 32 if group == K else max(32, group))
    if qweight.device != x.device:
        raise ValueError(f"qweight: expected a tensor on {x.device} (the device of x), got {qweight.device}")
    w_rows = qweight.shape[0]
    x2, out, out2, r2, N = check_fusions(x, "qweight", w_rows, rms_weight, eps, residual, swiglu, out, _INTERPRET)
    M = x2.shape[0]
    if M == 0:
        return out
    block_n, block_k, num_warps, num_stages = config or _config(N, bits, x.dtype, swiglu)
    if split_k is None and N > SPLIT_MAX_N:  # the output head (kernels/gemv.py's rule)
        split_k = 1
    tiles = (triton.cdiv(N, block_n), triton.cdiv(M, BLOCK_M))
    splits, k_split, part, counters = split_args(tiles[0] * tiles[1], K, block_k, block_n, x2, split_k, workspace)
    _qgemv_kernel[(*tiles, splits)](
        x2, qweight, scales, mins if mins is not None else scales,
        rms_weight if rms_weight is not None else x2, r2, out2,
        M, N, K, x2.stride(0), qweight.stride(0), scales.stride(0), r2.stride(0), out2.stride(0), float(eps),
        part, counters, k_split,
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP=0 if group == K and bits == 8 else group, BITS=bits,
        HAS_MIN=mins is not None,
        NORM=rms_weight is not None, ADD=residual is not None, SWIGLU=swiglu,
        DOT_FP32=x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16), SPLIT=splits > 1,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def pack_quant(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int, dtype: torch.dtype
) -> None:
    """The ops contract's repacking step: none, the kernel reads the planes as the loader stores them."""
    return None


# The layouts the loader builds: (name, bits, group (0: per channel), has_min).
LAYOUTS = (
    ("int8", 8, 0, False),
    ("q8_0", 8, 32, False),
    ("int4_g32", 4, 32, True),  # = Q4_1
    ("int4_g64", 4, 64, True),
    ("int4_g128", 4, 128, True),
    ("q4_0", 4, 32, False),
)


def compile_variants() -> list[dict]:
    """Every (layout, dtype, block shape, fusion) the launcher can pick, for fp16 and bf16 activations (the GPU's;
    fp32 runs only in the interpreter's tests): 16-column blocks with every fusion (Llama-3's wqkv, wo, w13,
    w2), whole or split-K, 64-column ones with the norm (the output head). K divisible by 16 at every Llama-3 width."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    variants = []
    for layout, bits, group, has_min in LAYOUTS:
        for dtype in (torch.float16, torch.bfloat16):
            types = {n: ptr[dtype] for n in ("X", "Gamma", "Res", "Out")} | {"eps": "fp32"}
            types |= {"Q": "*i8" if bits == 8 else "*u8", "S": "*fp16", "Z": "*fp16"}
            types |= {"Part": "*fp32", "Counter": "*i32"}
            for N, fusions in ((4096, ("plain", "norm", "add", "norm_swiglu")), (128256, ("norm", "norm_fp32_out"))):
                for fusion, split in ((f, s) for f in fusions for s in (False, True)):
                    types["Out"] = "*fp32" if fusion.endswith("fp32_out") else ptr[dtype]  # the decode step's head
                    block_n, block_k, num_warps, num_stages = _config(N, bits, dtype, "swiglu" in fusion)
                    cx = {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP": group, "BITS": bits, "HAS_MIN": has_min}
                    cx |= {"NORM": "norm" in fusion, "ADD": fusion == "add", "SWIGLU": "swiglu" in fusion}
                    cx |= {"DOT_FP32": False, "SPLIT": split}
                    name = f"qgemv_{layout}_{str(dtype).split('.')[-1]}_n{block_n}_{fusion}{'_splitk' * split}"
                    if any(v["name"] == name for v in variants) or (split and N > SPLIT_MAX_N):
                        continue  # 4-bit: the head's block is the others'; split-K: not the head's
                    tile = block_n * block_k * bits // 8 * (2 if "swiglu" in fusion else 1)  # weight bytes a stage
                    variants.append(
                        variant(name, _qgemv_kernel, types, cx, num_warps, num_stages, divisible=["K", "K_SPLIT"],
                                stream_bytes=tile)
                    )  # fmt: skip
    return variants
