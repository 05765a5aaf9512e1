"""The torch.compile peer of the end-to-end decode step: one plain-PyTorch decode step, gpt-fast style.

Issue 11 asked for a fair peer: the earlier one compiled the torch backend's decode step, which graph-breaks in
every layer on ``int(lengths.max())`` (the reference's host read of the lengths) and upcasts the KV cache to
fp32. This one is what a careful PyTorch user writes for decode (gpt-fast's recipe) and compiles whole:

    x = embedding[tokens]                                           (B, dim)       the model's own table
    per layer:
        h = RMSNorm(x)                                              fp32 maths, rounded to the model dtype
        q|k|v = h @ wqkv.T; RoPE(q), RoPE(k)                        Meta's interleaved pairs, the model's
                                                                    rope_cos_sin table (fp32)
        k_cache[b, :, pos_b] = k; v_cache[b, :, pos_b] = v          the model's own static cache, in place
        o = SDPA(q, k_cache, v_cache, mask)                         the G = Hq / Hkv query heads that share a
                                                                    kv head are SDPA's G query rows: no repeated
                                                                    k/v, any SDPA backend that takes a mask
        x = x + o @ wo.T; h = RMSNorm(x)
        x = x + (silu(h @ w1.T) * (h @ w3.T)) @ w2.T                w1|w3 as the model stores them (w13)
    logits = RMSNorm(x) @ output.T, in fp32                          (B, vocab)
    next token = model.sampling.sample(logits, params, None)         the project's sampler, in the graph

- **Same weights, no copies**: every tensor is the loaded ``Llama``'s (``layer.attention.wqkv.weight``, ...),
  read through the model's modules, so the peer reads exactly the bytes the Triton path reads.
- **Static cache in the model dtype**: the model's own ``k_cache``/``v_cache`` (B_max, Hkv, S_max, hd), which is
  SDPA's (B, H, S, D) layout as stored; nothing is upcast. Like gpt-fast, every step attends over all S_max
  slots with a mask built on the device from the positions (slot <= position): no ``.item()``/``int()`` of a
  device value anywhere, so one compiled graph serves every context, and its step time does not shrink with
  the context (the Triton kernel reads only up to each sequence's length; the floor counts only that).
- **Sampling in the graph**: ``model.sampling.sample`` traces with zero graph breaks when its generator is None
  (dynamo cannot trace a ``torch.Generator`` argument: "Failed to convert args/kwargs to proxy", two breaks,
  measured with torch 2.13 and 2.11), so the draw uses the global RNG: the same inverse-CDF draw with one
  ``torch.rand`` per row, seeded with ``torch.manual_seed`` (under inductor the numbers come from its Philox
  stream, so they differ from an eager draw's but have the same distribution). Greedy (temperature 0) is
  an argmax.
- **Compiled** ``torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")`` on CUDA (a CUDA
  graph through cudagraph trees; the cache and the RoPE table are marked as static addresses so nothing is
  copied in before a replay); one graph per batch size and sampling setting.

Tensor parallelism is not supported (the peer raises ``ValueError``). ``RECIPE`` is stored with every figure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llama3_triton.model.generation.sampling import SamplingParams, sample

GREEDY = SamplingParams(temperature=0.0)

RECIPE = {
    "what": "benchmarks/torch_decode.py: plain-PyTorch Llama-3 decode step (gpt-fast style) with sampling in the "
    "graph, on the loaded model's own weights and static KV cache in the model dtype (no upcast)",
    "torch_compile": "torch.compile(step, fullgraph=True, dynamic=False, mode='reduce-overhead' on CUDA)",
    "attention": "F.scaled_dot_product_attention over all max_seq_len cache slots with a device-built mask "
    "(slot <= position); GQA as G query rows per kv head (no repeated k/v); SDPA picks its backend",
    "sampling": "model.sampling.sample(logits, params, generator=None): the global RNG, seeded by torch.manual_seed",
    "host_syncs": "none in the step",
}


class TorchDecode:
    """One decode step of ``model`` (a loaded ``model.llama.Llama``) in plain PyTorch, with sampling.

    ``step(tokens (B, 1), positions (B,))`` writes the step's k/v into the model's cache at ``positions`` and
    returns (next tokens (B,) int64, logits (B, vocab) fp32). ``compile(...)`` returns the compiled step.
    """

    def __init__(self, model, params: SamplingParams = GREEDY):
        if model.tp.enabled:
            raise ValueError("the torch.compile peer does not run under tensor parallelism")
        if not model.k_cache:
            raise ValueError("the model has no KV cache (call setup_cache first)")
        self.model = model
        self.params = params
        a = model.args
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.hidden = a.hidden_dim
        self.eps = a.norm_eps

    @property
    def recipe(self) -> dict[str, Any]:
        p = self.params
        sampling = "greedy (argmax)" if p.temperature == 0 else f"temperature {p.temperature}, top-p {p.top_p}"
        if p.temperature and p.top_k:
            sampling += f", top-k {p.top_k}"
        return {**RECIPE, "sampling_params": sampling}

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight.float()).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate Meta's interleaved pairs (x[2i], x[2i+1]) of x (B, H, hd) by cos, sin (B, 1, hd/2); fp32 maths."""
        xf = x.float().unflatten(-1, (-1, 2))  # (B, H, hd/2, 2)
        x0, x1 = xf[..., 0], xf[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        B = tokens.shape[0]
        Hq, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        G = Hq // Hkv
        S = m.max_seq_len
        x = F.embedding(tokens[:, 0], m.tok_embeddings.weight)  # (B, dim), the model dtype
        cos, sin = m.rope_cos_sin[positions].chunk(2, dim=-1)  # (B, hd/2) each, fp32
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, hd/2)
        # Slot s of sequence b is visible when s <= positions[b]: built on the device, no host read.
        mask = (torch.arange(S, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]  # (B,1,1,S)
        rows = torch.arange(B, device=positions.device)
        for i, layer in enumerate(m.layers):
            h = self._rms_norm(x, layer.attention_norm)
            qkv = F.linear(h, layer.attention.wqkv.weight)  # (B, (Hq + 2 Hkv) hd)
            q = self._rope(qkv[:, : Hq * hd].view(B, Hq, hd), cos, sin)
            k = self._rope(qkv[:, Hq * hd : (Hq + Hkv) * hd].view(B, Hkv, hd), cos, sin)
            v = qkv[:, (Hq + Hkv) * hd :].view(B, Hkv, hd)
            k_cache, v_cache = m.k_cache[i], m.v_cache[i]  # (B_max, Hkv, S, hd): the model's own tensors
            k_cache[rows, :, positions] = k  # side effect: this step's keys and values into slot positions[b]
            v_cache[rows, :, positions] = v
            # q head h uses kv head h // G: the G heads of a group are G query rows against that kv head.
            o = F.scaled_dot_product_attention(q.view(B, Hkv, G, hd), k_cache[:B], v_cache[:B], attn_mask=mask)
            x = x + F.linear(o.reshape(B, Hq * hd), layer.attention.wo.weight)
            h = self._rms_norm(x, layer.ffn_norm)
            gu = F.linear(h, layer.feed_forward.w13.weight)  # (B, 2 hidden): w1 | w3
            a = (F.silu(gu[:, : self.hidden].float()) * gu[:, self.hidden :].float()).to(x.dtype)
            x = x + F.linear(a, layer.feed_forward.w2.weight)
        out_w = m.tok_embeddings.weight if m.output is None else m.output.weight
        logits = F.linear(self._rms_norm(x, m.norm), out_w).float()  # (B, vocab)
        return sample(logits, self.params, None), logits

    __call__ = step

    def compile(self, backend: str = "inductor", mode: str | None = None) -> Callable:
        """``torch.compile(self.step, fullgraph=True, dynamic=False, ...)``; ``mode`` defaults to
        "reduce-overhead" for inductor on CUDA. The cache and the RoPE table are marked as static addresses."""
        import torch._dynamo

        m = self.model
        if mode is None and backend == "inductor" and m.device.type == "cuda":
            mode = "reduce-overhead"
        for t in [*m.k_cache, *m.v_cache, m.rope_cos_sin]:
            torch._dynamo.mark_static_address(t)
        kw: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": backend}
        if mode:
            kw["mode"] = mode
        return torch.compile(self.step, **kw)
