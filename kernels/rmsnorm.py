"""RMSNorm, and RMSNorm fused with the residual add that precedes it.

Maths, per row x of length D (the model dim), everything in fp32 and cast once at the store:

    y = x / sqrt(mean(x^2) + eps) * weight

``add_rms_norm(x, residual, weight)`` first forms the residual stream h = residual + x in fp32 and
rounds it to the input dtype (the residual stream is stored in that dtype), stores h, and normalises
the *rounded* h, so (y, h) equal the unfused ``h = residual + x; rms_norm(h)`` exactly.

Shapes: x, residual, y, h are (..., D) with the last dim contiguous; the leading dims are flattened
to R rows (a view, so any row stride works). weight is (D,). One program normalises one row.

Work: ~4 FLOPs per element, nothing to speak of. The floor is memory: rms_norm reads x and weight
and writes y (2 R D + D elements), add_rms_norm reads x, residual and weight and writes h and y
(4 R D + D). For Llama-3 8B (D = 4096, bf16) on an H100 SXM (3.35 TB/s):
    decode, R = 1:        add_rms_norm moves 40 KiB -> 12 ns; the ~3 us launch latency is the real
                          cost, so fusing the add saves a launch per norm (64 per 8B token);
    prefill, R = 8192:    rms_norm moves 128 MiB -> 40 us; add_rms_norm 256 MiB -> 80 us, against
                          320 MiB (100 us) for a separate add (3 passes) and norm (2 passes).

Block choice: a row of up to 16384 elements (every Llama-3 model dim: 2048 .. 16384) is held in
registers as one block (BLOCK = next power of two >= D, masked): x is read once from DRAM, and with
num_warps = BLOCK / 512 (at most 16) each thread holds 16-32 fp32 values, no spills. Longer rows
loop over D in 8192-wide chunks (16 warps; 4096-wide chunks made ptxas use 8-32 B of stack on
sm_80/sm_90 in the compile gate, 8192 none): a first pass sums squares (and stores h), a second re-reads the row
(from L2) to scale it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import check_tensor, interpreting, rows, variant


@triton.jit
def _load_h(
    x_row,  # pointer to this row of x
    res_row,  # pointer to this row of residual (HAS_RESIDUAL only)
    h_row,  # pointer to this row of h, the rounded residual + x (HAS_RESIDUAL only)
    cols,  # column indices of this chunk
    mask,  # cols < D
    HAS_RESIDUAL: tl.constexpr,  # add the residual, round to the input dtype and store h
):
    # fp32 right after the load: exact, and required by the interpreter, which holds bf16 as raw bits.
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_row.dtype.element_ty)  # the residual stream is stored rounded ...
        tl.store(h_row + cols, h, mask=mask)
        x = h.to(tl.float32)  # ... and normalised as stored, so fused == unfused exactly
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # (R, D) input rows, unit column stride
    res_ptr,  # (R, D) residual rows (read only when HAS_RESIDUAL)
    w_ptr,  # (D,) weight, contiguous
    out_ptr,  # (R, D) normalised output rows
    h_ptr,  # (R, D) h = residual + x in the input dtype (written only when HAS_RESIDUAL)
    stride_x,  # row stride of x, in elements
    stride_res,  # row stride of residual
    stride_out,  # row stride of out
    stride_h,  # row stride of h
    D,  # row length
    eps,  # added to mean(x^2) before the square root
    BLOCK: tl.constexpr,  # columns per block (power of two); the whole row when ONE_PASS
    ONE_PASS: tl.constexpr,  # D <= BLOCK: the row stays in registers and is read once
    HAS_RESIDUAL: tl.constexpr,  # add_rms_norm: normalise h = residual + x and store h
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 on long prefills
    x_row = x_ptr + row * stride_x
    res_row = res_ptr + row * stride_res
    out_row = out_ptr + row * stride_out
    h_row = h_ptr + row * stride_h
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < D
        x = _load_h(x_row, res_row, h_row, cols, mask, HAS_RESIDUAL)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            mask = start + cols < D
            x = _load_h(x_row, res_row, h_row, start + cols, mask, HAS_RESIDUAL)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / D + eps)
        if HAS_RESIDUAL:
            # The second pass reads back the h this program stored (residual_out may alias residual,
            # so re-adding would be wrong): make those global stores visible to every thread first.
            tl.debug_barrier()
        for start in range(0, D, BLOCK):
            mask = start + cols < D
            if HAS_RESIDUAL:
                x = tl.load(h_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + start + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


_MAX_ONE_PASS = 16384  # longest row held in registers (the largest Llama-3 model dim, 405B)
_LOOP_BLOCK = 8192  # chunk width for longer rows
_INTERPRET = interpreting(_rms_norm_kernel)


def _config(D: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) for rows of length D: one config per D, no autotuning."""
    if D <= _MAX_ONE_PASS:
        block = max(16, triton.next_power_of_2(D))
        return block, True, min(16, max(1, block // 512))
    return _LOOP_BLOCK, False, _LOOP_BLOCK // 512


def _launch(x, residual, weight, eps, out, residual_out, fused: bool) -> None:
    check_tensor("x", x, interpret=_INTERPRET)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., D) with D >= 1, got {tuple(x.shape)}")
    D = x.shape[-1]
    check_tensor("weight", weight, like=x, like_name="x")
    if weight.shape != (D,) or weight.stride() != (1,):
        raise ValueError(f"weight: expected a contiguous ({D},) tensor, got shape {tuple(weight.shape)}, "
                         f"strides {weight.stride()}")  # fmt: skip
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    x2 = rows("x", x)
    out2 = rows("out", check_tensor("out", out, like=x, like_name="x", shape=x.shape), written=True)
    if fused:
        r2 = rows("residual", check_tensor("residual", residual, like=x, like_name="x", shape=x.shape))
        h = check_tensor("residual_out", residual_out, like=x, like_name="x", shape=x.shape)
        h2 = rows("residual_out", h, written=True)
        if out2.numel() > 0 and out2.data_ptr() == h2.data_ptr():
            raise ValueError("residual_out: must not be the same memory as out (both are written)")
    else:
        r2, h2 = x2, out2  # unused by the kernel
    if x2.shape[0] == 0:
        return
    block, one_pass, num_warps = _config(D)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out2, h2,
        x2.stride(0), r2.stride(0), out2.stride(0), h2.stride(0),
        D, float(eps),
        BLOCK=block, ONE_PASS=one_pass, HAS_RESIDUAL=fused,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim of x (..., D); fp32 inside, x.dtype out.

    ``out`` (shape and dtype of x, last dim contiguous; may be x itself) receives y if given.
    """
    if out is None and isinstance(x, torch.Tensor):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None, fused=False)
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + x (fp32 add, rounded to x.dtype); returns (rms_norm(h), h) in one pass, one launch.

    ``out`` receives the normalised rows and ``residual_out`` receives h; both optional, shaped like x.
    ``residual_out=residual`` updates the residual stream in place; ``out=x`` is allowed too.
    """
    if isinstance(x, torch.Tensor):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual_out is None else residual_out
    _launch(x, residual, weight, eps, out, residual_out, fused=True)
    return out, residual_out


def compile_variants() -> list[dict]:
    """Every (dtype, BLOCK, ONE_PASS, HAS_RESIDUAL) the launcher picks for D in 2048 .. 16384 and beyond."""
    variants = []
    for dt in ("fp32", "fp16", "bf16"):
        types = {n: f"*{dt}" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "h_ptr")} | {"eps": "fp32"}
        for D in (2048, 4096, 8192, 16384, 16384 + 1):
            block, one_pass, num_warps = _config(D)
            for has_res in (False, True):
                cx = {"BLOCK": block, "ONE_PASS": one_pass, "HAS_RESIDUAL": has_res}
                name = f"rms_norm_{dt}_D{D}_{'add' if has_res else 'plain'}"
                # Triton specialises D % 16 == 0 at launch (vector loads): compile what runs.
                divisible = ["D"] if D % 16 == 0 else []
                variants.append(variant(name, _rms_norm_kernel, types, cx, num_warps, 1, divisible=divisible))
    return variants
