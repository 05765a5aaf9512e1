"""Where a decode step's time goes: each kernel of one fused step, its time and the bytes it must move, against
the bandwidth floor.

The plan (``plan(model, B, L)``) is the fused step's launch sequence, which the model fixes (``Llama._decode_step``,
``TransformerBlock.decode``):

    embed      the token's embedding row
    per layer:
      qkv      RMSNorm + the qkv product                  weights, x, gamma in; q|k|v out
      attn     RoPE, the cache write, split-KV attention   q|k|v and the live cache (L keys and values) in; o out
      wo       o @ wo.T + residual                         weights, o, x in; x out
      w13      RMSNorm + the w1|w3 product + SwiGLU        weights, x, gamma in; the FFN activation out
      w2       a @ w2.T + residual                         weights, a, x in; x out
    head       the final RMSNorm + the output product      weights, x, gamma in; fp32 logits out

with the bytes each must move (a quantized layer's packed bytes; the attention's split partials, at most
2 * Hq * splits * (hd + 1) * 4 bytes a sequence, are left out). Their sum at batch 1 is the step's floor in bytes:
the weights read once (``decode_bytes_per_token``), the live KV cache, and the few activations.

On a GPU one eager step (CUDA graph off, so the profiler sees each launch; the kernels are the graph's) runs
under torch.profiler; its kernels, in launch order, are matched one to one with the plan (a count mismatch is
recorded as an error, never guessed around). Per row: kernel name, time, bytes, GB/s and the fraction of the
read ceiling; per kind (all qkv, all attn, ...): the same summed. Then the kernel times' sum against the floor
(all bytes / the read ceiling of the same run) and against the replayed graph's median step time, whose excess
over the kernel sum is what launching and gaps between kernels still cost. On a CPU (the smoke run) the plan
is recorded and nothing is timed.

    python -m llama3_triton.benchmarks --only e2e    # the e2e section profiles batch 1 at its first context per model
"""

from __future__ import annotations

from typing import Any

from llama3_triton.benchmarks.common import Context, describe

KINDS = ("embed", "qkv", "attn", "wo", "w13", "w2", "head")


def _weight_bytes(module) -> int:
    wb = getattr(module, "weight_bytes", None)  # a quantized layer (model.quantize.QuantLinear): its packed bytes
    if isinstance(wb, int):
        return wb
    return module.weight.numel() * module.weight.element_size()


def plan(model, B: int, L: int) -> list[dict[str, Any]]:
    """The fused decode step's launches for B sequences whose new token sits at position L (L cached keys before
    it): one dict per launch, {"kind", "layer", "bytes", "weight_bytes"}, in launch order."""
    a = model.args
    es = model.dtype.itemsize
    hd, Hq, Hkv = a.head_dim, a.n_heads, a.n_kv_heads
    qkv_cols = (Hq + 2 * Hkv) * hd
    out: list[dict[str, Any]] = [{"kind": "embed", "layer": None, "bytes": 2 * B * a.dim * es, "weight_bytes": 0}]
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.feed_forward
        norm = a.dim * es  # each RMSNorm's gamma
        hidden = ffn.hidden
        wq, wo, w13, w2 = (_weight_bytes(m) for m in (att.wqkv, att.wo, ffn.w13, ffn.w2))
        kv = 2 * Hkv * hd * es  # one position's key and value
        rows = [
            ("qkv", wq + norm, wq + norm + B * (a.dim + qkv_cols) * es),
            ("attn", 0, B * (qkv_cols * es + L * kv + kv + Hq * hd * es + hd * 4)),  # + cache write, o, RoPE row
            ("wo", wo, wo + B * (Hq * hd + 2 * a.dim) * es),
            ("w13", w13 + norm, w13 + norm + B * (a.dim + hidden) * es),
            ("w2", w2, w2 + B * (hidden + 2 * a.dim) * es),
        ]
        out += [{"kind": k, "layer": i, "bytes": n, "weight_bytes": w} for k, w, n in rows]
    head = model.tok_embeddings if model.output is None else model.output
    wh = _weight_bytes(head) + a.dim * es
    out.append(
        {"kind": "head", "layer": None, "bytes": wh + B * a.dim * es + B * model.vocab_local * 4, "weight_bytes": wh}
    )
    return out


def profile(ctx: Context, model, B: int, L: int, graph_ms: float | None = None) -> dict[str, Any]:
    """The plan of one fused step at (B, L), timed kernel by kernel on a GPU. ``graph_ms``: the replayed graph's
    median step time at the same point, measured by the caller in the same run."""
    rows = plan(model, B, L)
    total = sum(r["bytes"] for r in rows)
    rec: dict[str, Any] = {"batch": B, "context": L, "launches_planned": len(rows), "bytes": total}
    read = ctx.ceilings.get("read_gbps") or ctx.ceilings.get("copy_gbps")
    if read:
        rec["floor_ms"] = total / (read * 1e9) * 1e3
        rec["ceiling"] = {"read_gbps": read}
    if not model.fused_decode:
        rec["error"] = "the model's fused decode step is off (use(fused_decode=True))"
        return rec
    if not ctx.cuda:
        rec["skipped"] = "no GPU: the plan only, nothing timed"
        rec["kinds"] = _by_kind(rows)
        return rec
    try:
        kernels = _profile_one_step(model, B, L)
    except Exception as e:
        rec["error"] = describe(e)
        return rec
    rec["launches_seen"] = len(kernels)
    if len(kernels) != len(rows):
        rec["error"] = f"{len(kernels)} kernels seen, {len(rows)} planned: {sorted(set(n for n, _ in kernels))}"
        return rec
    for r, (name, us) in zip(rows, kernels, strict=True):
        r["kernel"], r["us"] = name, us
        r["gbps"] = r["bytes"] / (us * 1e-6) / 1e9 if us > 0 else None
    rec["kinds"] = _by_kind(rows, read)
    rec["kernel_sum_ms"] = sum(us for _, us in kernels) * 1e-3
    if read:
        rec["floor_fraction_of_kernel_sum"] = rec["floor_ms"] / rec["kernel_sum_ms"]
    if graph_ms:
        rec["graph_step_ms"] = graph_ms
        rec["gaps_ms"] = graph_ms - rec["kernel_sum_ms"]  # what launching and the gaps between kernels cost
    return rec


def _by_kind(rows: list[dict], read: float | None = None) -> list[dict[str, Any]]:
    out = []
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        k: dict[str, Any] = {"kind": kind, "launches": len(mine), "bytes": sum(r["bytes"] for r in mine)}
        if mine and all("us" in r for r in mine):
            us = sum(r["us"] for r in mine)
            k["kernel"] = mine[0]["kernel"]
            k["us"] = us
            k["gbps"] = k["bytes"] / (us * 1e-6) / 1e9 if us > 0 else None
            if read and k["gbps"]:
                k["fraction_of_read_ceiling"] = k["gbps"] / read
        out.append(k)
    return out


def _profile_one_step(model, B: int, L: int) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of one eager fused decode step, in launch order (copies and memsets left out:
    the step itself makes none; its inputs are on the device already)."""
    import torch
    from torch.autograd import DeviceType

    device = model.device
    tokens = torch.randint(0, model.args.vocab_size, (B, 1), device=device)
    positions = torch.full((B,), L, dtype=torch.long, device=device)
    graph = model.use_cuda_graph
    model.use(cuda_graph=False)
    try:
        model.decode(tokens, positions)  # compile and autotune outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.decode(tokens, positions)
            torch.cuda.synchronize()
    finally:
        model.use(cuda_graph=graph)
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith("Mem")]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, float(e.time_range.elapsed_us())) for e in events]


def markdown(name: str, rec: dict[str, Any]) -> list[str]:
    """results.md lines for one model's profile."""
    head = f"Decode step profile, {name}, batch {rec['batch']}, context {rec['context']}"
    lines = [f"#### {head}", ""]
    if "error" in rec:
        return lines + [f"error: {rec['error']}", ""]
    floor = f"{rec['floor_ms']:.3f} ms" if "floor_ms" in rec else "not measured (no ceiling)"
    lines.append(
        f"{rec['launches_planned']} launches, {rec['bytes'] / 1e9:.3f} GB to move: floor {floor} at the read ceiling."
    )
    if "kernel_sum_ms" in rec:
        s = f"Kernel times sum to {rec['kernel_sum_ms']:.3f} ms"
        if "floor_fraction_of_kernel_sum" in rec:
            s += f" ({rec['floor_fraction_of_kernel_sum']:.0%} of it is the floor)"
        if "graph_step_ms" in rec:
            gaps = rec["gaps_ms"] * 1e3
            s += f"; the replayed graph's step took {rec['graph_step_ms']:.3f} ms ({gaps:+.0f} us of gaps)"
        lines.append(s + ".")
    else:
        lines.append(f"Times: not measured ({rec.get('skipped', 'no GPU')}).")
    lines += ["", "| kind | launches | kernel | us | MB | GB/s | of read ceiling |", "|---|---|---|---|---|---|---|"]
    for k in rec.get("kinds", []):
        us = f"{k['us']:.1f}" if "us" in k else "-"
        gbps = f"{k['gbps']:.0f}" if k.get("gbps") else "-"
        frac = f"{k['fraction_of_read_ceiling']:.0%}" if "fraction_of_read_ceiling" in k else "-"
        lines.append(
            f"| {k['kind']} | {k['launches']} | {k.get('kernel', '-')} | {us} | {k['bytes'] / 1e6:.2f} | {gbps} "
            f"| {frac} |"
        )
    return lines + [""]
