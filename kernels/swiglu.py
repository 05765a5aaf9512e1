"""SwiGLU, the gated activation of the Llama feed-forward block: out = silu(gate) * up.

Maths, per element, in fp32 and cast once at the store:

    silu(g) = g * sigmoid(g) = g / (1 + exp(-g)),    out = silu(g) * u

(exp(-g) overflowing to inf for g < -88 gives g / inf = -0, the right limit.)

Shapes: gate, up and out are (..., F), F the FFN hidden size, last dim contiguous. gate and up are
typically the two halves of one fused x @ [w1 | w3] product of shape (..., 2F), so their rows are
strided (row stride 2F): the leading dims are flattened to R rows as a view and the row strides are
passed to the kernel, so no copy is ever made. Grid: (R, cdiv(F, BLOCK)), one block of BLOCK
columns of one row per program; F need not be a multiple of BLOCK (masked).

Work: ~6 FLOPs and one exp per element; the floor is memory: read 2 R F elements, write R F. For
Llama-3 8B (F = 14336, bf16) on an H100 SXM (3.35 TB/s):
    decode, R = 1:        84 KiB -> 26 ns; launch latency (~3 us) dominates;
    prefill, R = 8192:    672 MiB -> 210 us, against 1.1 GiB (350 us) for an unfused silu then mul
                          (5 passes over R F elements). 70B (F = 28672) moves twice as much.

Config: BLOCK = 1024 columns with 4 warps (8 elements, one 16-byte vector of bf16, per thread and
operand); one config for every shape, no autotuning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import interpreting


@triton.jit
def _swiglu_kernel(
    gate_ptr,  # (R, F) gate rows, unit column stride
    up_ptr,  # (R, F) up rows, unit column stride
    out_ptr,  # (R, F) output rows, unit column stride
    stride_gate,  # row stride of gate, in elements (2F for a fused [w1 | w3] output)
    stride_up,  # row stride of up
    stride_out,  # row stride of out
    F,  # row length (FFN hidden size)
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 for R F >= 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    # fp32 right after the load: exact, and required by the interpreter, which holds bf16 as raw bits.
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024
_NUM_WARPS = 4
_INTERPRET = interpreting(_swiglu_kernel)  # TRITON_INTERPRET=1 at import


def _rows(name: str, t: object, like: torch.Tensor | None, written: bool = False) -> torch.Tensor:
    """t checked (against ``like``: shape, dtype, device) and viewed as (R, F) rows without a copy."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if like is None:
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
        if not (t.is_cuda or (t.device.type == "cpu" and _INTERPRET)):
            raise ValueError(f"{name}: expected a CUDA tensor (or a CPU one under TRITON_INTERPRET=1), got {t.device}")
        if t.dim() == 0 or t.shape[-1] == 0:
            raise ValueError(f"{name}: expected shape (..., F) with F >= 1, got {tuple(t.shape)}")
    else:
        if t.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device} (the device of gate), got {t.device}")
        if t.dtype != like.dtype:
            raise ValueError(f"{name}: expected dtype {like.dtype} (the dtype of gate), got {t.dtype}")
        if t.shape != like.shape:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)} (the shape of gate), got {tuple(t.shape)}")
    F = t.shape[-1]
    if F > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dim (stride 1), got strides {t.stride()}")
    try:
        rows = t.view(-1, F)
    except RuntimeError:
        raise ValueError(
            f"{name}: expected leading dims that flatten to one row stride, got strides {t.stride()}"
        ) from None
    if written and rows.shape[0] > 1 and rows.stride(0) < F:
        raise ValueError(f"{name}: output rows overlap (row stride {rows.stride(0)} < {F})")
    return rows


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up over (..., F) tensors, in fp32, returned in gate.dtype.

    gate and up may be strided views (e.g. the halves of a fused (..., 2F) product); ``out`` (shaped like
    gate, last dim contiguous; may be gate or up itself) receives the result if given.
    """
    g2 = _rows("gate", gate, None)
    u2 = _rows("up", up, gate)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    o2 = _rows("out", out, gate, written=True)
    R, F = g2.shape
    if R == 0:
        return out
    grid = (R, triton.cdiv(F, _BLOCK))
    _swiglu_kernel[grid](
        g2, u2, o2,
        g2.stride(0), u2.stride(0), o2.stride(0),
        F,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS, num_stages=1,
    )  # fmt: skip
    return out


def compile_variants() -> list[dict]:
    """The one config, in each dtype: BLOCK and num_warps do not depend on F (8192 .. 28672 for Llama-3).

    Each twice: with F divisible by 16, as every Llama-3 width is (Triton specialises on it at launch and
    emits 16-byte loads), and with an odd F (the scalar path).
    """
    variants = []
    for dt in ("fp32", "fp16", "bf16"):
        for divisible in (True, False):
            sig = {"gate_ptr": f"*{dt}", "up_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
            sig |= {"stride_gate": "i32", "stride_up": "i32", "stride_out": "i32", "F": "i32", "BLOCK": "constexpr"}
            variants.append(
                {
                    "name": f"swiglu_{dt}_{'F16k' if divisible else 'Fodd'}",
                    "fn": _swiglu_kernel,
                    "signature": sig,
                    "constexprs": {"BLOCK": _BLOCK},
                    "num_warps": _NUM_WARPS,
                    "num_stages": 1,
                    "divisible": ["F"] if divisible else [],
                }
            )
    return variants
