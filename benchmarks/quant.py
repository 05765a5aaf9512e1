"""Weight-only quantized decode products (kernels/quant.py) beside the bf16 GEMV, against the same copy ceiling.

Each Llama-3-8B product of a decode step (benchmarks/gemv.py's PRODUCTS_8B, with their fusions) at M = 1 and 8,
its weight in each format: bf16 (kernels/gemv.py), int8 per channel, int4 in groups of 128, and GGUF's Q8_0 and
Q4_0 blocks (kernels/quant.py). A case's bytes are what its format must move (the weight at its bytes per weight,
x, the output, the residual), so GB/s against the copy ceiling is how close each comes to its own floor. Peers
on the same weights: ``torch_eager`` dequantizes to the activation dtype and runs cuBLAS with the fusions as
torch ops (QuantLinear's path past 8 rows, and the torch backend's), and torch's own weight-only kernels where
the installed torch has them for the device (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm``; the
product alone, no fusion), each skipped with the reason otherwise.

The report's quantized-decode goal line sums a step's products (32 layers of wqkv, wo, w13, w2 and the head;
an int4 run's head is int8, as the loader makes it) per format: a proxy for the decode step, named as such.

    python -m llama3_triton.benchmarks.quant [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.common import Case, Context, Skip, element_size, randn
from llama3_triton.benchmarks.gemv import PRODUCTS_8B, PRODUCTS_TINY, _torch_sequence

FORMATS = ("bf16", "int8", "int4-g128", "Q8_0", "Q4_0")
N_LAYERS_8B = 32


def cases(ctx: Context) -> list[Case]:
    products = PRODUCTS_TINY | {"head": (1024, 256, "norm")} if ctx.smoke else PRODUCTS_8B
    model = "tiny" if ctx.smoke else "8B"
    # A smoke run shows each format and fusion works at M = 1: in the interpreter a quantized case takes seconds,
    # and the kernel tests check M = 1, 3 and 8 (tests/model/quant/test_quant.py).
    batches = ctx.sizes("decode_batch")[:1] if ctx.smoke else ctx.sizes("decode_batch")
    return [
        _case(ctx, model, name, *spec, M, fmt) for name, spec in products.items() for M in batches for fmt in FORMATS
    ]


def _weight_bytes(fmt: str, rows: int, K: int, es: int) -> int:
    from llama3_triton.model.quant.quantize import bytes_per_weight

    bpw = es if fmt == "bf16" else bytes_per_weight(fmt, K)
    return int(rows * K * bpw)


def _planes(fmt: str, w):
    """(q, scales, mins, group) of ``fmt`` for the dense weight w, on its device."""
    import torch

    from llama3_triton.model.quant import quantize as quant

    N, K = w.shape
    if fmt == "int8":
        q, s = quant.quantize_int8(w)
        return q, s, None, K
    if fmt == "int4-g128":
        return (*quant.quantize_int4(w, 128), 128)
    # GGUF blocks: random integers and scales of the right sizes (the timing depends on the bytes, not the values)
    g = torch.Generator(device=w.device).manual_seed(K)
    s = (torch.rand(N, K // 32, generator=g, device=w.device) * 1e-3 + 1e-4).half()
    if fmt == "Q8_0":
        return torch.randint(-127, 128, (N, K), generator=g, device=w.device, dtype=torch.int8), s, None, 32
    return torch.randint(0, 256, (N, K // 2), generator=g, device=w.device, dtype=torch.uint8), s, None, 32


def _torch_int8pack(q, s):
    """torch's weight-only int8 product x -> x @ (q * s).T, if this torch has the op: a callable, or a Skip."""
    import torch

    op = getattr(torch, "_weight_int8pack_mm", None)
    if op is None:
        return Skip(f"torch {torch.__version__} has no _weight_int8pack_mm")
    return lambda x: op(x, q, s.view(-1).to(x.dtype))


def _torch_int4pack(x, q, s, m, group):
    """torch's tinygemm int4 product (w = (q - 8) * s + z per group), fed the same integers: or a Skip."""
    import torch

    if not (hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")):
        return Skip(f"torch {torch.__version__} has no _weight_int4pack_mm")
    if not x.is_cuda or x.dtype != torch.bfloat16:
        return Skip("torch._weight_int4pack_mm (tinygemm) runs on CUDA with bf16 activations")
    try:
        N = q.shape[0]
        b = q.view(N, -1, 16)
        ints = torch.cat((b & 0xF, b >> 4), dim=-1).reshape(N, -1)  # (N, K) 0..15, in K order
        packed_in = (ints[:, ::2] << 4 | ints[:, 1::2]).to(torch.uint8)  # torch's order: even weights high
        packed = torch._convert_weight_to_int4pack(packed_in, 8)
        zeros = m.float() + 8 * s.float()  # q * s + m = (q - 8) * s + (m + 8 s)
        sz = torch.stack((s.float(), zeros), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/G, N, 2)
    except Exception as e:
        return Skip(f"torch._convert_weight_to_int4pack: {str(e).splitlines()[0][:100]}")
    return lambda x: torch._weight_int4pack_mm(x, packed, group, sz)


def _case(ctx: Context, model: str, name: str, N: int, K: int, fusion: str, M: int, fmt: str) -> Case:
    es = element_size(ctx.dtype)
    rows = 2 * N if "swiglu" in fusion else N
    n_bytes = _weight_bytes(fmt, rows, K, es) + (M * K + M * N * (2 if fusion == "add" else 1)) * es

    def setup() -> dict:
        from llama3_triton.kernels import gemv, quant
        from llama3_triton.kernels.reference import dequantize

        x = randn((M, K), ctx, seed=M)
        w = randn((rows, K), ctx, seed=N) * K**-0.5  # bf16 cases time it; quantized ones read their planes
        res = randn((M, N), ctx, seed=K) if fusion == "add" else None
        gamma = randn((K,), ctx, seed=K + 1) if "norm" in fusion else None
        swiglu = "swiglu" in fusion
        fused = {"rms_weight": gamma, "residual": res, "swiglu": swiglu}
        ws = gemv.GemvWorkspace.for_device(x.device)  # split-K where the launcher picks it, as in the model
        if fmt == "bf16":
            return {
                "torch_eager": lambda: _torch_sequence(x, w, res, gamma, swiglu),
                "triton": lambda: gemv.linear(x, w, workspace=ws, **fused),
                "triton_whole": lambda: gemv.linear(x, w, split_k=1, **fused),
            }
        q, s, m, group = _planes(fmt, w)
        impls: dict = {
            "torch_eager": lambda: _torch_sequence(x, dequantize(q, s, m, group, x.dtype), res, gamma, swiglu),
            "triton": lambda: quant.quant_linear(x, q, s, m, group, workspace=ws, **fused),
            "triton_whole": lambda: quant.quant_linear(x, q, s, m, group, split_k=1, **fused),
        }
        # torch's kernels do the product alone: the norm, SwiGLU and add around it as torch ops (as torch_eager)
        mm = (
            _torch_int8pack(q, s)
            if fmt == "int8"
            else _torch_int4pack(x, q, s, m, group)
            if fmt == "int4-g128"
            else None
        )
        if mm is None:
            impls["torch_weight_only"] = Skip(f"torch has no kernel for GGUF's {fmt} blocks")
        elif isinstance(mm, Skip):
            impls["torch_weight_only"] = mm
        else:
            try:
                mm(x)
                impls["torch_weight_only"] = lambda: _torch_sequence(x, mm, res, gamma, swiglu)
            except Exception as e:  # e.g. no kernel for this device or dtype
                impls["torch_weight_only"] = Skip(f"torch's weight-only kernel on {x.device.type}/{x.dtype}: "
                                                  f"{str(e).splitlines()[0][:100]}")  # fmt: skip
        return impls

    return Case(
        kernel="quant",
        model=f"{model} {name}",
        label=f"{fmt} M={M}",
        size=M,
        size_name="batch",
        shape={"M": M, "N": N, "K": K, "fusion": fusion, "format": fmt, "dtype": str(ctx.dtype).removeprefix("torch.")},
        bytes=n_bytes,
        flops=2 * M * rows * K,
        bound="memory",
        setup=setup,
    )


def decode_proxy(records: list[dict]) -> dict[str, dict]:
    """Per format, the summed time and bytes of one 8B decode step's products at M = 1 (int4's head: int8's record).
    Returns {format: {"ms": .., "bytes": ..}} for the formats whose every product was timed."""
    counts = {"qkv": N_LAYERS_8B, "wo": N_LAYERS_8B, "w13": N_LAYERS_8B, "w2": N_LAYERS_8B, "head": 1}
    by = {}
    for rec in records:
        sh = rec.get("shape", {})
        tr = rec.get("results", {}).get("triton")
        if rec.get("kernel") == "quant" and sh.get("M") == 1 and tr and "median_ms" in tr:
            by[(sh["format"], rec["model"].split()[-1])] = (tr["median_ms"], rec["bytes"])
    out = {}
    for fmt in FORMATS:
        total_ms = total_bytes = 0.0
        for product, n in counts.items():
            key = ("int8" if fmt.startswith("int4") and product == "head" else fmt, product)
            if key not in by:
                break
            total_ms += n * by[key][0]
            total_bytes += n * by[key][1]
        else:
            out[fmt] = {"ms": total_ms, "bytes": total_bytes}
    return out


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "quant"))
