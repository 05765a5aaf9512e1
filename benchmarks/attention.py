"""Causal prefill attention against SDPA's flash and cuDNN backends, the reference in torch eager, and its compile.

Prefill attention is compute-bound. FLOPs it must do, causal, for T queries at positions 0..T-1:
    query t scores t + 1 keys (2 hd FLOPs each) and sums as many values (2 hd each):
    4 B Hq hd * sum_t (t + 1) = 4 B Hq hd T (T + 1) / 2, about half of the 4 B Hq hd T^2 of full attention.
TFLOP/s below are these over the median time, for every implementation (the reference computes the
masked half too; it is charged only for the useful half, like the others). Bytes (q, k, v in; o out) are
recorded for reference. Shapes: Llama-3 8B (32 q heads) and 70B (64), 8 kv heads (GQA 4 and 8), head dim
128, B = 1, T from 128 to 16k; q is a view of the fused q|k|v product and k/v the model's cache views.

SDPA is timed twice, pinned to one backend each time with ``torch.nn.attention.sdpa_kernel``: ``sdpa_flash``
(FlashAttention-2, ``SDPBackend.FLASH_ATTENTION``) and ``sdpa_cudnn`` (cuDNN's fused attention,
``SDPBackend.CUDNN_ATTENTION``, often the faster of the two on Hopper); where cuDNN attention cannot run (a CPU,
a torch without it) its cell is a skip with the reason, and where a backend refuses the shape at run time the
error is recorded.

The reference materialises fp32 (T x T) score matrices per head: where they would not fit in memory
(8B at 16k: ~96 GiB) it and its compiled twin are skipped, with the reason recorded.

    python -m llama3_triton.benchmarks.attention [runner flags]
"""

from __future__ import annotations

import sys

from llama3_triton.benchmarks.common import (
    Case,
    Context,
    Skip,
    available_bytes,
    compiled,
    describe,
    element_size,
    randn,
)

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def sdpa_unavailable(name: str, ctx: Context) -> Skip | None:
    """Why SDPA backend ``name`` (a key of SDPA_BACKENDS) cannot run here, or None when it may: cuDNN attention
    needs a CUDA GPU, a torch that has ``SDPBackend.CUDNN_ATTENTION`` (2.5 on) and cuDNN."""
    import torch
    from torch.nn.attention import SDPBackend

    if name == "sdpa_cudnn":
        if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
            return Skip(f"torch {torch.__version__} has no SDPBackend.CUDNN_ATTENTION")
        if not ctx.cuda:
            return Skip("cuDNN attention needs a CUDA GPU")
        if not torch.backends.cudnn.is_available():
            return Skip("cuDNN is not available to this torch")
    return None


class Sdpa:
    """``F.scaled_dot_product_attention`` restricted to one backend (flash by default, or cuDNN's), on (B, H, T, hd)
    tensors.

    GQA goes through ``enable_gqa=True`` (k/v read once per kv head, like our kernels). Where this torch's
    backend refuses it, k/v are repeated to Hq heads once, on the first (untimed) call, and ``note``
    says so: then SDPA reads Hq / Hkv times the k/v bytes our kernels do.
    """

    def __init__(self, q, k, v, causal: bool, out_view, backend: str = "FLASH_ATTENTION"):
        self.q, self.k, self.v, self.causal, self.out_view = q, k, v, causal, out_view
        self.backend = backend
        self.gqa = q.shape[1] != k.shape[1]
        self.note: str | None = None

    def __call__(self):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, self.backend)):
            if self.gqa:
                try:
                    o = F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal, enable_gqa=True)
                    return self.out_view(o)
                except (RuntimeError, TypeError) as e:
                    rep = self.q.shape[1] // self.k.shape[1]
                    self.k = self.k.repeat_interleave(rep, dim=1)
                    self.v = self.v.repeat_interleave(rep, dim=1)
                    self.gqa = False
                    self.note = f"enable_gqa refused ({describe(e)}); k/v repeated {rep}x before the timing"
            return self.out_view(F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal))


def sdpa_peers(ctx: Context, q, k, v, causal: bool, out_view) -> dict:
    """{"sdpa_flash": ..., "sdpa_cudnn": ...}: SDPA pinned to each backend (``sdpa_kernel``), or a Skip saying why
    it cannot run here."""
    return {
        name: sdpa_unavailable(name, ctx) or Sdpa(q, k, v, causal=causal, out_view=out_view, backend=backend)
        for name, backend in SDPA_BACKENDS.items()
    }


def causal_flops(B: int, Hq: int, hd: int, T: int, start_pos: int = 0) -> int:
    """4 hd FLOPs per (query, visible key) pair: query t at position start_pos + t sees start_pos + t + 1 keys."""
    pairs = T * start_pos + T * (T + 1) // 2
    return 4 * B * Hq * hd * pairs


def cases(ctx: Context) -> list[Case]:
    return [_case(ctx, model, shape, T) for model, shape in ctx.model_shapes().items() for T in ctx.sizes("prefill")]


def _case(ctx: Context, model: str, s: dict[str, int], T: int) -> Case:
    B, Hq, Hkv, hd = 1, s["n_heads"], s["n_kv_heads"], s["head_dim"]
    es = element_size(ctx.dtype)

    def setup() -> dict:
        from llama3_triton.kernels import reference, triton_ops

        qkv = randn((B, T, (Hq + 2 * Hkv) * hd), ctx, seed=T)
        q = qkv[..., : Hq * hd].unflatten(-1, (Hq, hd))  # (B, T, Hq, hd), a view as in the model
        k_store = randn((B, Hkv, T, hd), ctx, seed=T + 1)  # the model's cache storage ...
        v_store = randn((B, Hkv, T, hd), ctx, seed=T + 2)
        k, v = k_store.transpose(1, 2), v_store.transpose(1, 2)  # ... and the (B, S, Hkv, hd) views it hands over
        q_sdpa = q.transpose(1, 2).contiguous()  # SDPA's own layout, prepared outside the timing
        impls: dict = {}
        # fp32 scores, their masked copy and the softmax, plus fp32 copies of q, k, v.
        need = 3 * B * Hq * T * T * 4 + 4 * B * T * (Hq + 2 * Hkv) * hd * 2
        too_big = need > 0.8 * available_bytes(ctx)
        skip_ref = Skip(f"the reference needs ~{need / 2**30:.0f} GiB for fp32 score matrices") if too_big else None
        impls["torch_eager"] = skip_ref or (lambda: reference.attention(q, k, v))
        impls["triton"] = lambda: triton_ops.attention(q, k, v)
        impls.update(sdpa_peers(ctx, q_sdpa, k_store, v_store, causal=True, out_view=lambda o: o.transpose(1, 2)))
        if not ctx.compile_peers:
            impls["torch_compile"] = Skip("--no-compile")
        elif skip_ref:
            impls["torch_compile"] = skip_ref
        else:
            c = compiled(reference.attention, ctx)
            impls["torch_compile"] = lambda: c(q, k, v)
        return impls

    return Case(
        kernel="attention",
        model=model,
        label=f"T={T}",
        size=T,
        size_name="tokens",
        shape={"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "head_dim": hd, "dtype": str(ctx.dtype).removeprefix("torch.")},
        bytes=(2 * B * T * Hq * hd + 2 * B * T * Hkv * hd) * es,
        flops=causal_flops(B, Hq, hd, T),
        bound="compute",
        setup=setup,
    )


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "kernels", "--kernel", "attention"))
