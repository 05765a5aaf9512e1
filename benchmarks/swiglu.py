"""SwiGLU on the two halves of the fused w1|w3 product, against torch eager and ``torch.compile``.

The model computes gu = h @ [w1 | w3].T, (1, T, 2F), and hands swiglu the strided halves gate = gu[..., :F]
and up = gu[..., F:]. Bytes it must move: reads gate and up, writes out: 3 T F elements. Shapes: the FFN
width of Llama-3 8B (14336) and 70B (28672); T from 1 (a decode step) to 16k.

    python -m llama3_triton.benchmarks.swiglu [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.common import Case, Context, Skip, compiled, element_size, randn


def cases(ctx: Context) -> list[Case]:
    return [
        _case(ctx, model, shape["hidden"], T)
        for model, shape in ctx.model_shapes().items()
        for T in ctx.sizes("tokens")
    ]


def _case(ctx: Context, model: str, F: int, T: int) -> Case:
    n_bytes = 3 * T * F * element_size(ctx.dtype)

    def setup() -> dict:
        from llama3_triton.kernels import reference, triton_ops

        gu = randn((1, T, 2 * F), ctx, seed=T)
        gate, up = gu[..., :F], gu[..., F:]
        impls: dict = {"torch_eager": lambda: reference.swiglu(gate, up), "triton": lambda: triton_ops.swiglu(gate, up)}
        if ctx.compile_peers:
            c = compiled(reference.swiglu, ctx)
            impls["torch_compile"] = lambda: c(gate, up)
        else:
            impls["torch_compile"] = Skip("--no-compile")
        return impls

    return Case(
        kernel="swiglu",
        model=model,
        label=f"T={T}",
        size=T,
        size_name="tokens",
        shape={"B": 1, "T": T, "F": F, "dtype": str(ctx.dtype).removeprefix("torch.")},
        bytes=n_bytes,
        flops=0,
        bound="memory",
        setup=setup,
    )


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "swiglu"))
