"""The decode step's matrix products at batch 1..8 (GEMV), with their fusions, against cuBLAS and torch.compile.

Each Llama-3-8B product of a decode step (and the output head), as ``kernels.gemv.linear`` runs it fused:

    qkv   RMSNorm(x) @ wqkv.T          (6144, 4096), the norm folded in
    wo    x + o @ wo.T                 (4096, 4096), the residual add folded in
    w13   swiglu(RMSNorm(x) @ w13.T)   (2 x 14336, 4096), norm and SwiGLU folded in
    w2    x + a @ w2.T                 (4096, 14336)
    head  RMSNorm(x) @ output.T        (128256, 4096)

and the same five at Llama-3.2-1B (dim 2048, hidden 8192), whose N = 2048 products have only 128 tiles of 16
columns: fewer programs than an H200 has SMs, the case split-K is for. ``triton`` is the launcher's own choice
(split-K where ``kernels.gemv.plan_split_k`` says, through a GemvWorkspace as in the model), ``triton_whole``
the same kernel with one program per tile (``split_k=1``): the pair says whether the split pays, per shape.

Peers, on the same tensors: ``torch_eager`` is the unfused driver in its own dtype -- cuBLAS's
F.linear with the norm, add or SwiGLU as separate torch ops -- and ``torch_compile`` is that sequence
compiled. Bytes a product must move: the weight (N x K, or 2N x K), x, the output and the residual; at batch 1
the weight is all of it, so GB/s against the copy ceiling says how close the product comes to its floor.

    python -m llama3_triton.benchmarks.gemv [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.common import Case, Context, Skip, compiled, element_size, randn

# name -> (N, K, fusion) at Llama-3-8B; the smoke run's tiny model keeps the structure at small sizes.
PRODUCTS_8B = {
    "qkv": (6144, 4096, "norm"),
    "wo": (4096, 4096, "add"),
    "w13": (14336, 4096, "norm_swiglu"),
    "w2": (4096, 14336, "add"),
    "head": (128256, 4096, "norm"),
}
PRODUCTS_1B = {
    "qkv": (3072, 2048, "norm"),
    "wo": (2048, 2048, "add"),
    "w13": (8192, 2048, "norm_swiglu"),
    "w2": (2048, 8192, "add"),
    "head": (128256, 2048, "norm"),
}
PRODUCTS_TINY = {"qkv": (512, 256, "norm"), "w13": (384, 256, "norm_swiglu"), "w2": (256, 384, "add")}


def cases(ctx: Context) -> list[Case]:
    models = {"tiny": PRODUCTS_TINY} if ctx.smoke else {"8B": PRODUCTS_8B, "1B": PRODUCTS_1B}
    return [
        _case(ctx, model, name, *spec, M)
        for model, products in models.items()
        for name, spec in products.items()
        for M in ctx.sizes("decode_batch")
    ]


def _torch_sequence(x, w, res, gamma, swiglu: bool, eps: float = 1e-5):
    """The unfused sequence, in the tensors' dtype: what the model does around cuBLAS today. ``w``: the weight
    (cuBLAS's F.linear), or a product x -> y of its own (benchmarks/quant.py: torch's weight-only kernels)."""
    import torch
    import torch.nn.functional as F

    if gamma is not None:
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()).to(x.dtype)
    y = w(x) if callable(w) else F.linear(x, w)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if res is not None:
        y = res + y
    return y


def _case(ctx: Context, model: str, name: str, N: int, K: int, fusion: str, M: int) -> Case:
    es = element_size(ctx.dtype)
    rows = 2 * N if "swiglu" in fusion else N
    n_bytes = (rows * K + M * K + M * N * (2 if fusion == "add" else 1) + (K if "norm" in fusion else 0)) * es

    def setup() -> dict:
        from llama3_triton.kernels import gemv

        x = randn((M, K), ctx, seed=M)
        w = randn((rows, K), ctx, seed=N) * K**-0.5
        res = randn((M, N), ctx, seed=K) if fusion == "add" else None
        gamma = randn((K,), ctx, seed=K + 1) if "norm" in fusion else None
        swiglu = "swiglu" in fusion
        ws = gemv.GemvWorkspace.for_device(x.device)  # the model's: no allocation in the timed call
        impls: dict = {
            "torch_eager": lambda: _torch_sequence(x, w, res, gamma, swiglu),
            "triton": lambda: gemv.linear(x, w, rms_weight=gamma, residual=res, swiglu=swiglu, workspace=ws),
            "triton_whole": lambda: gemv.linear(x, w, rms_weight=gamma, residual=res, swiglu=swiglu, split_k=1),
        }
        if ctx.compile_peers:
            c = compiled(_torch_sequence, ctx)
            impls["torch_compile"] = lambda: c(x, w, res, gamma, swiglu)
        else:
            impls["torch_compile"] = Skip("--no-compile")
        return impls

    return Case(
        kernel="gemv",
        model=f"{model} {name}",  # a panel per product in the plots
        label=f"M={M}",
        size=M,
        size_name="batch",
        shape={"M": M, "N": N, "K": K, "fusion": fusion, "dtype": str(ctx.dtype).removeprefix("torch.")},
        bytes=n_bytes,
        flops=2 * M * rows * K,
        bound="memory",
        setup=setup,
    )


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "gemv"))
