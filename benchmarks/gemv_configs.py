"""Tuning data for the decode GEMVs: each product at batch 1 under a few tile configurations, for a GPU run to
choose from (opt-in: not part of the default sweep or of `make gpu-check`).

The launchers' configurations (``kernels.gemv._config``, ``kernels.quant._config``) were chosen on a CPU, from the
compile gate's prediction of the weight bytes each SM keeps in flight (benchmarks/kernel_resources.py), not from
timings. This times, on the same tensors, the launcher's own choice (the first of each list: ``default_*``) beside
neighbours: fewer or more pipeline stages, wider or narrower tiles, more warps, and for int4 the first layout (16
rows of 256 weights over 8 warps). Each with the launcher's split-K plan and the model's workspace. Shapes: the
Llama-3-8B products of a decode step and Llama-3.2-1B's N = 2048 ones (fewest tiles), in bf16, int8 per channel
and int4 in groups of 128. A configuration that fails to compile or run is recorded as that impl's error.

    python -m llama3_triton.benchmarks --only kernels --kernel gemv_configs [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.common import Case, Context, element_size, randn
from llama3_triton.benchmarks.gemv import PRODUCTS_1B, PRODUCTS_8B, PRODUCTS_TINY
from llama3_triton.benchmarks.quant import _planes, _weight_bytes

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per format; the first is the launcher's own for these products
CONFIGS = {
    "bf16": [(16, 128, 4, 4), (16, 128, 4, 6), (32, 128, 4, 4), (16, 256, 4, 3), (64, 64, 4, 4)],
    "int8": [(16, 128, 4, 5), (16, 128, 4, 3), (32, 128, 4, 4), (16, 256, 4, 4), (16, 128, 8, 6)],
    "int4-g128": [(32, 128, 4, 5), (16, 256, 8, 3), (16, 128, 4, 8), (64, 128, 4, 4), (32, 256, 4, 4)],
}


def config_name(config: tuple[int, int, int, int], default: bool) -> str:
    bn, bk, w, s = config
    return f"{'default_' if default else ''}n{bn}_k{bk}_w{w}_s{s}"


def cases(ctx: Context) -> list[Case]:
    if ctx.smoke:  # each configuration of each format runs: one product shows it (seconds a call interpreted)
        products = {"tiny": {"w2": PRODUCTS_TINY["w2"]}}
    else:
        products = {"8B": {k: v for k, v in PRODUCTS_8B.items() if k != "head"}}
        products["1B"] = {k: PRODUCTS_1B[k] for k in ("wo", "w2")}
    return [
        _case(ctx, model, name, *spec, fmt)
        for model, shapes in products.items()
        for name, spec in shapes.items()
        for fmt in CONFIGS
    ]


def _case(ctx: Context, model: str, name: str, N: int, K: int, fusion: str, fmt: str) -> Case:
    M, es = 1, element_size(ctx.dtype)
    rows = 2 * N if "swiglu" in fusion else N
    n_bytes = _weight_bytes(fmt, rows, K, es) + (M * K + M * N * (2 if fusion == "add" else 1)) * es

    def setup() -> dict:
        from llama3_triton.kernels import gemv, quant

        x = randn((M, K), ctx, seed=M)
        w = randn((rows, K), ctx, seed=N) * K**-0.5
        fused = {
            "rms_weight": randn((K,), ctx, seed=K + 1) if "norm" in fusion else None,
            "residual": randn((M, N), ctx, seed=K) if fusion == "add" else None,
            "swiglu": "swiglu" in fusion,
            "workspace": gemv.GemvWorkspace.for_device(x.device),
        }
        if fmt == "bf16":
            run = lambda c: gemv.linear(x, w, config=c, **fused)  # noqa: E731
        else:
            q, s, m, group = _planes(fmt, w)
            run = lambda c: quant.quant_linear(x, q, s, m, group, config=c, **fused)  # noqa: E731
        return {config_name(c, i == 0): (lambda c=c: run(c)) for i, c in enumerate(CONFIGS[fmt])}

    return Case(
        kernel="gemv_configs",
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


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "gemv_configs"))
