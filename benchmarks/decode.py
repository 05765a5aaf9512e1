"""Split-KV decode attention (one new query per sequence) against the reference, its compile, and SDPA; and the
one-launch ``rope_decode_attention`` the model's fused decode step runs (RoPE, cache write and attention).

SDPA serves a one-query step too: it is timed pinned to its flash backend (``sdpa_flash``) and to cuDNN's
(``sdpa_cudnn``; a skip with the reason where it cannot run), as in ``attention.py``.

Decode attention is memory-bound: each step reads the whole K and V cache up to each sequence's length.
Bytes it must move, for B sequences of length L:
    reads  k and v cache   2 B L Hkv hd elements    q  B Hq hd elements    lengths  B int64
    writes o               B Hq hd elements
At 8k context for Llama-3 8B (8 kv heads, hd 128, bf16) that is 32 MiB per sequence: under L2's 50 MB
on an H100, which is why the timer flushes L2 before every call. Shapes: 8B (32 q heads) and 70B (64),
8 kv heads, head dim 128, B = 1 and 8, L from 128 to 16k; the caches are the model's (B, S, Hkv, hd) views
of (B, Hkv, S, hd) storage, every sequence full to L.

    python -m llama3_triton.benchmarks.decode [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.attention import sdpa_peers
from llama3_triton.benchmarks.common import Case, Context, Skip, compiled, element_size, randn


def cases(ctx: Context) -> list[Case]:
    batches, contexts = ctx.sizes("decode_batch"), ctx.sizes("context")
    out = []
    for model, shape in ctx.model_shapes().items():
        for B in batches:
            # Quick mode: batch 1 over every context, the larger batch at the goal's 8k only.
            lens = contexts if (B == batches[0] or not ctx.quick) else [L for L in contexts if L == 8192]
            out += [_case(ctx, model, shape, B, L) for L in lens]
            out += [_fused_case(ctx, model, shape, B, L) for L in lens]
    return out


def _inputs(ctx: Context, s: dict[str, int], B: int, L: int):
    """The (B, Hkv, L, hd) k and v caches (every sequence full to L), their (B, L, Hkv, hd) views the ops take, and a
    (B, Hq, hd) query: random, the same for every implementation of a case."""
    Hq, Hkv, hd = s["n_heads"], s["n_kv_heads"], s["head_dim"]
    k_store = randn((B, Hkv, L, hd), ctx, seed=L)
    v_store = randn((B, Hkv, L, hd), ctx, seed=L + 1)
    q = randn((B, Hq, hd), ctx, seed=L + 2)
    return k_store, v_store, k_store.transpose(1, 2), v_store.transpose(1, 2), q


def _decode_case(ctx: Context, kernel: str, model: str, s: dict[str, int], B: int, L: int, bytes_: int, setup):
    return Case(
        kernel=kernel,
        model=model,
        label=f"B={B} L={L}",
        size=L,
        size_name="context",
        shape={
            "B": B,
            "L": L,
            "Hq": s["n_heads"],
            "Hkv": s["n_kv_heads"],
            "head_dim": s["head_dim"],
            "dtype": str(ctx.dtype).removeprefix("torch."),
        },
        bytes=bytes_,
        flops=4 * B * s["n_heads"] * s["head_dim"] * L,
        bound="memory",
        setup=setup,
    )


def _fused_case(ctx: Context, model: str, s: dict[str, int], B: int, L: int) -> Case:
    """The launch the model's fused decode step runs (``rope_decode_attention``): RoPE of q and the new k at position
    L - 1, k and v written to that cache slot, attention over the L keys 0 .. L - 1, split-KV and merged in one
    launch. Bytes: the decode case's plus the new k and v read and written once and the two RoPE table rows."""
    import torch

    Hq, Hkv, hd = s["n_heads"], s["n_kv_heads"], s["head_dim"]
    es = element_size(ctx.dtype)

    def setup() -> dict:
        from llama3_triton.kernels import reference, triton_ops

        _, _, k_cache, v_cache, q = _inputs(ctx, s, B, L)
        k, v = randn((B, Hkv, hd), ctx, seed=L + 3), randn((B, Hkv, hd), ctx, seed=L + 4)
        positions = torch.full((B,), L - 1, dtype=torch.long, device=ctx.device)
        cos_sin = reference.rope_table(reference.rope_inv_freq(hd, 500000.0).to(ctx.device), L)
        workspace = triton_ops.DecodeWorkspace(B, Hq, Hkv, hd, ctx.device)

        def call(op):
            return lambda: op(q, k, v, positions, cos_sin, k_cache, v_cache, workspace)

        impls: dict = {
            "torch_eager": call(reference.rope_decode_attention),
            "triton": call(triton_ops.rope_decode_attention),
        }
        impls["torch_compile"] = (
            call(compiled(reference.rope_decode_attention, ctx)) if ctx.compile_peers else Skip("--no-compile")
        )
        return impls

    read_write = (2 * B * (L - 1) * Hkv * hd + 4 * B * Hkv * hd + 2 * B * Hq * hd) * es + 2 * B * hd * 4 + 8 * B
    return _decode_case(ctx, "rope_decode_attention", model, s, B, L, read_write, setup)


def _case(ctx: Context, model: str, s: dict[str, int], B: int, L: int) -> Case:
    import torch

    Hq, Hkv, hd = s["n_heads"], s["n_kv_heads"], s["head_dim"]
    es = element_size(ctx.dtype)

    def setup() -> dict:
        from llama3_triton.kernels import reference, triton_ops

        k_store, v_store, k_cache, v_cache, q = _inputs(ctx, s, B, L)
        lengths = torch.full((B,), L, dtype=torch.long, device=ctx.device)

        def call(op):
            return lambda: op(q, k_cache, v_cache, lengths)

        impls: dict = {"torch_eager": call(reference.decode_attention), "triton": call(triton_ops.decode_attention)}
        impls.update(sdpa_peers(ctx, q[:, :, None, :], k_store, v_store, causal=False, out_view=lambda o: o[:, :, 0]))
        impls["torch_compile"] = (
            call(compiled(reference.decode_attention, ctx)) if ctx.compile_peers else Skip("--no-compile")
        )
        return impls

    return _decode_case(ctx, "decode_attention", model, s, B, L, (2 * B * L * Hkv * hd + 2 * B * Hq * hd) * es + 8 * B,
                        setup)  # fmt: skip


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "decode_attention"))
