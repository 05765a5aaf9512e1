"""Rotary embedding with the KV-cache write, as the model calls it, against torch eager and ``torch.compile``.

The model hands rope three strided views of one fused q|k|v product (B, T, (Hq + 2 Hkv) * hd) and the
(B, S, Hkv, hd) views of its KV cache; the op rotates q and k, returns q_rot and writes the rotated k and
the v into cache slot ``positions[b, t]``. Bytes it must move:
    reads  q, k, v                     T (Hq + 2 Hkv) hd elements, positions (T int64), T cos/sin table rows (hd fp32)
    writes q_rot, k and v cache slots  T (Hq + 2 Hkv) hd elements
Shapes: Llama-3 8B (32 q heads) and 70B (64), 8 kv heads, head dim 128, Llama 3.1 RoPE scaling; T from 1
(a decode step) to 16k.

    python -m llama3_triton.benchmarks.rope [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.common import Case, Context, Skip, compiled, element_size, randn

# Llama 3.1's RoPE scaling (the frequencies only change the values, not the work).
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def cases(ctx: Context) -> list[Case]:
    return [_case(ctx, model, shape, T) for model, shape in ctx.model_shapes().items() for T in ctx.sizes("tokens")]


def _case(ctx: Context, model: str, s: dict[str, int], T: int) -> Case:
    import torch

    B, Hq, Hkv, hd = 1, s["n_heads"], s["n_kv_heads"], s["head_dim"]
    es = element_size(ctx.dtype)
    n_bytes = 2 * B * T * (Hq + 2 * Hkv) * hd * es + B * T * 8 + B * T * hd * 4

    def setup() -> dict:
        from llama3_triton.kernels import reference, triton_ops

        qkv = randn((B, T, (Hq + 2 * Hkv) * hd), ctx, seed=T)
        q = qkv[..., : Hq * hd].unflatten(-1, (Hq, hd))  # (B, T, Hq, hd) views, as in the model
        k = qkv[..., Hq * hd : (Hq + Hkv) * hd].unflatten(-1, (Hkv, hd))
        v = qkv[..., (Hq + Hkv) * hd :].unflatten(-1, (Hkv, hd))
        # The model's cache layout: (B, Hkv, S, hd) storage, handed over as a (B, S, Hkv, hd) view.
        k_cache = torch.zeros(B, Hkv, T, hd, device=ctx.device, dtype=ctx.dtype).transpose(1, 2)
        v_cache = torch.zeros(B, Hkv, T, hd, device=ctx.device, dtype=ctx.dtype).transpose(1, 2)
        positions = torch.arange(T, device=ctx.device).expand(B, T)
        cos_sin = reference.rope_table(reference.rope_inv_freq(hd, 500000.0, SCALING).to(ctx.device), T)

        def call(op):
            return lambda: op(q, k, positions, cos_sin, k_cache=k_cache, v=v, v_cache=v_cache)

        impls: dict = {"torch_eager": call(reference.rope), "triton": call(triton_ops.rope)}
        impls["torch_compile"] = call(compiled(reference.rope, ctx)) if ctx.compile_peers else Skip("--no-compile")
        return impls

    return Case(
        kernel="rope",
        model=model,
        label=f"T={T}",
        size=T,
        size_name="tokens",
        shape={"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "head_dim": hd, "dtype": str(ctx.dtype).removeprefix("torch.")},
        bytes=n_bytes,
        flops=0,
        bound="memory",
        setup=setup,
    )


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "rope"))
