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

from llama3_triton.kernels._launch import check_tensor, interpreting, rows, variant


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


_BLOCK = 1024
_NUM_WARPS = 4
_INTERPRET = interpreting(_swiglu_kernel)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up over (..., F) tensors, in fp32, returned in gate.dtype.

    gate and up may be strided views (e.g. the halves of a fused (..., 2F) product); ``out`` (shaped like
    gate, last dim contiguous; may be gate or up itself) receives the result if given.
    """
    check_tensor("gate", gate, interpret=_INTERPRET)
    if gate.dim() == 0 or gate.shape[-1] == 0:
        raise ValueError(f"gate: expected shape (..., F) with F >= 1, got {tuple(gate.shape)}")
    check_tensor("up", up, like=gate, like_name="gate", shape=gate.shape)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    check_tensor("out", out, like=gate, like_name="gate", shape=gate.shape)
    g2, u2, o2 = rows("gate", gate), rows("up", up), rows("out", out, written=True)
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
        types = {"gate_ptr": f"*{dt}", "up_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
        for divisible in (True, False):
            name = f"swiglu_{dt}_{'F16k' if divisible else 'Fodd'}"
            cx = {"BLOCK": _BLOCK}
            variants.append(variant(name, _swiglu_kernel, types, cx, _NUM_WARPS, 1, divisible=["F"] * divisible))
    return variants
