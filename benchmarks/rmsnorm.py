"""RMSNorm and the fused residual add + RMSNorm, against torch eager and ``torch.compile`` of the reference.

Bytes each must move (the GB/s below are these over the median time):
    rms_norm:      reads x (T x D) and the weight (D), writes y (T x D)            (2 T D + D) elements
    add_rms_norm:  reads x, the residual (T x D each) and the weight, writes y and h  (4 T D + D) elements
Shapes: the model dim of Llama-3 8B (4096) and 70B (8192); T from 1 (a decode step, launch-bound) to
16k (a long prefill, bandwidth-bound). Inputs are (1, T, D), as the model hands them over.

    python -m llama3_triton.benchmarks.rmsnorm [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.common import Case, Context, Skip, compiled, element_size, randn

KERNELS = ("rms_norm", "add_rms_norm")
EPS = 1e-5


def cases(ctx: Context, kernels: tuple[str, ...] = KERNELS) -> list[Case]:
    return [
        _case(ctx, kernel, model, shape["dim"], T)
        for kernel in kernels
        for model, shape in ctx.model_shapes().items()
        for T in ctx.sizes("tokens")
    ]


def _case(ctx: Context, kernel: str, model: str, D: int, T: int) -> Case:
    es = element_size(ctx.dtype)
    n_bytes = ((2 if kernel == "rms_norm" else 4) * T * D + D) * es

    def setup() -> dict:
        from llama3_triton.kernels import reference, triton_ops

        x = randn((1, T, D), ctx, seed=T)
        w = randn((D,), ctx, seed=1, scale=0.1) + 1.0  # near 1, not 1: a missing multiply shows
        if kernel == "rms_norm":
            args: tuple = (x, w, EPS)
        else:
            args = (x, randn((1, T, D), ctx, seed=T + 1), w, EPS)
        ref_op, op = getattr(reference, kernel), getattr(triton_ops, kernel)
        impls: dict = {"torch_eager": lambda: ref_op(*args), "triton": lambda: op(*args)}
        if ctx.compile_peers:
            c = compiled(ref_op, ctx)
            impls["torch_compile"] = lambda: c(*args)
        else:
            impls["torch_compile"] = Skip("--no-compile")
        return impls

    return Case(
        kernel=kernel,
        model=model,
        label=f"T={T}",
        size=T,
        size_name="tokens",
        shape={"B": 1, "T": T, "D": D, "dtype": str(ctx.dtype).removeprefix("torch.")},
        bytes=n_bytes,
        flops=0,
        bound="memory",
        setup=setup,
    )


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "rms_norm", "--kernel", "add_rms_norm"))
