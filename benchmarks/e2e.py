"""End to end: decode and prefill tokens/s of whole Llama-3-shaped models, against the bandwidth floor.

For each model shape (Llama 3.2 1B, 3.2 3B, 3.1 8B) random bf16 weights are written in Meta's layout by the
project's own tiny-checkpoint code (``model.checkpoint.write_meta_checkpoint``, the real tokenizer), loaded
through the real loader (``Llama.load``), timed, and deleted before the next model (8B is 16 GB on disk and
in host RAM; the scratch folder is /dev/shm when it has room, else the temp folder, or
$LLAMA3_TRITON_SCRATCH).

Decode: one ``decode_step`` (B new tokens at position L, each attending to L + 1 keys) at batch 1 and 8
and contexts 128, 512, 2k and 8k (--quick: 512 and 8k, where the goals are judged), the KV cache filled with
random values; tokens/s = B / step time. Peers, all on the same loaded weights (a backend is only the ops module
the driver calls, so it is switched in place):
    triton         the driver as shipped: Triton kernels, the decode step replayed as a CUDA graph
    torch          backend="torch" (the reference ops), same driver, same CUDA graph; under capture the
                   reference cannot read the lengths on the host, so it attends over the whole static
                   cache with a mask and its step time does not depend on the context
    torch_eager    backend="torch" without the CUDA graph: every op launched from Python
    triton_eager   (full runs) the Triton kernels without the graph: what the graph saves
    torch_compile  ``benchmarks/torch_decode.py``: a plain-PyTorch decode step written for compiling (gpt-fast's
                   recipe: the model's own weights and bf16 static cache, SDPA over the cache with a mask built
                   on the device, greedy sampling in the graph, no host sync), torch.compile(fullgraph=True,
                   dynamic=False, mode="reduce-overhead"); each row records the recipe and its logits' largest
                   difference from the Triton path's. One graph serves every context; each batch size and
                   sampling setting is a compile (about a minute for a model, estimated), so --quick compiles
                   one model at batch 1: 8B when it runs and the time budget leaves room for the compile beside
                   the base figures of the models still to come, else the smallest model if it fits then. A
                   failure is recorded, never raised.
                   It replaces torch.compile of the torch backend's decode step, which graph-broke in every layer
                   on the reference's host read of the lengths (``int(lengths.max())``) and upcast the cache to
                   fp32: it measured how the reference ops compile, not what torch.compile can do for decode, and
                   the torch and torch_eager rows already show those ops.
Floor: the most tokens/s the measured copy bandwidth allows, B * bandwidth / bytes a step must read, where
the bytes are the weights a step reads (``decode_bytes_per_token``: all but the embedding table) plus the
KV cache read up to each sequence's length; also given against all weight bytes.

Generation (``generate`` rows): whole generation at batch 1 as peers publish it, sampling and the loop included:
a 16-token random prompt, then 128 new tokens (256 in full runs) with generate()'s default sampling
(temperature 0.6, top-p 0.9) and greedy; ``model.generate`` for the Triton path, the same loop around the
compiled step (sampling inside its graph) for the torch.compile peer. tokens/s = (new tokens - 1) / the loop's
wall time: the prefill and the first token's sample are excluded and reported apart (also tokens/s with the
prefill). Median of 3 timed runs (5 in full runs) after an untimed one. Its floor is a decode step's at the
loop's middle context (prompt + half the new tokens).

Prefill: one 2k-token prompt at batch 1 (logits of the last token only, as generation does); tokens/s and
TFLOP/s (2 FLOPs per weight per token + causal attention) as a fraction of the measured matmul ceiling.
Peak GPU memory over the model's load and benchmarks is recorded too.

    python -m llama3_triton.benchmarks.e2e [runner flags]      # same as python -m llama3_triton.benchmarks --only e2e
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from llama3_triton.benchmarks import decode_profile
from llama3_triton.benchmarks.attention import causal_flops
from llama3_triton.benchmarks.common import (
    Context,
    describe,
    element_size,
    fmt_time,
    free_memory,
    host_available_bytes,
    time_call,
)

# Meta's shapes, as tiny_args() keywords (vocabulary 128256, GQA with 8 kv heads, head dim 128 / 64 for tiny).
MODELS: dict[str, dict[str, Any]] = {
    "1B": dict(  # Llama 3.2 1B: FFN 8192, tied output, RoPE factor 32
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
        rope_scaling_factor=32.0, tie_embeddings=True,
    ),
    "3B": dict(  # Llama 3.2 3B: FFN 8192, tied output, RoPE factor 32
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
        rope_scaling_factor=32.0, tie_embeddings=True,
    ),
    "8B": dict(  # Llama 3.1 8B: FFN 14336, untied, RoPE factor 8
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
        rope_scaling_factor=8.0, tie_embeddings=False,
    ),
    "tiny": dict(  # the smoke run's model: every code path, GQA 2, head dim 64
        dim=128, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, ffn_dim_multiplier=1.3,
        rope_scaling_factor=8.0, tie_embeddings=False,
    ),
}  # fmt: skip
DEFAULT_MODELS = ("1B", "3B", "8B")
# Rough seconds per model on an H100 in --quick mode (write, load, time the decode and prefill points), compile
# peer excluded: a model is skipped, with the reason recorded, when less time than this is left of the budget.
EST_SECONDS = {"tiny": 0, "1B": 40, "3B": 60, "8B": 120}
# Rough seconds of one cold inductor compile (mode="reduce-overhead") of the torch.compile peer's whole decode
# step, and of the generation rows (warm-up + timed runs of 128 tokens, two sampling settings, two paths).
# Estimates, not yet measured on a GPU here: "about a minute" per model for the compile.
COMPILE_EST_SECONDS = {"tiny": 0, "1B": 60, "3B": 75, "8B": 90}
GENERATE_EST_SECONDS = {"tiny": 0, "1B": 10, "3B": 15, "8B": 20}
# The model the decode goals are judged on: in --quick mode the compile peer goes to it (when it is in the run).
GOAL_MODEL = "8B"


def points(ctx: Context) -> tuple[list[int], list[int], int]:
    """(batches, contexts, prefill length). The goals are judged at batch 1, contexts 512 and 8k."""
    if ctx.smoke:
        return [1, 2], [12], 16
    if ctx.quick:
        return [1, 8], [512, 8192], 2048
    return [1, 8], [128, 512, 2048, 8192], 2048


def model_args(name: str):
    from llama3_triton.model.tools.tiny import tiny_args

    spec = MODELS[name]
    return tiny_args(
        dim=spec["dim"],
        n_layers=spec["n_layers"],
        n_heads=spec["n_heads"],
        n_kv_heads=spec["n_kv_heads"],
        multiple_of=spec["multiple_of"],
        ffn_dim_multiplier=spec["ffn_dim_multiplier"],
        rope_scaling_factor=spec["rope_scaling_factor"],
        tie_embeddings=spec["tie_embeddings"],
    )


def write_checkpoint(folder: Path, name: str, dtype, device, hf: bool = False) -> Any:
    """Random weights of model shape ``name`` in Meta's layout in ``folder`` (with ``hf``: Meta's in
    folder/original and Hugging Face's in folder, the same weights, as ``make-tiny --hf`` lays them out)."""
    from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path
    from llama3_triton.model.tools.tiny import random_weights, write_hf_checkpoint, write_meta_checkpoint

    spec, args = MODELS[name], model_args(name)
    weights = random_weights(args, 0, dtype, device)  # drawn on the GPU when there is one: 8 G normals in a second
    meta_dir = folder / "original" if hf else folder
    write_meta_checkpoint(
        meta_dir, args, weights, 1, spec["multiple_of"], spec["ffn_dim_multiplier"], default_tokenizer_path()
    )
    if hf:
        write_hf_checkpoint(folder, args, weights)
    del weights
    return args


def scratch_dir(need_bytes: int) -> Path:
    """A fresh folder with room for ``need_bytes``: $LLAMA3_TRITON_SCRATCH, else /dev/shm (RAM-backed, fast;
    used only when the host also has RAM for the weights being written), else the temp folder."""
    candidates = [os.environ.get("LLAMA3_TRITON_SCRATCH"), "/dev/shm", tempfile.gettempdir()]
    for base in candidates:
        if not base or not os.path.isdir(base) or not os.access(base, os.W_OK):
            continue
        if shutil.disk_usage(base).free < need_bytes * 1.15 + (1 << 28):
            continue
        if base == "/dev/shm" and host_available_bytes() < 3 * need_bytes + (4 << 30):
            continue
        return Path(tempfile.mkdtemp(prefix="llama3-triton-bench-", dir=base))
    raise RuntimeError(
        f"no scratch space for a {need_bytes / 1e9:.1f} GB random checkpoint; set LLAMA3_TRITON_SCRATCH to a "
        "folder with room"
    )


def prefill_flops(args, T: int) -> int:
    """2 FLOPs per weight per token in every layer's matrices, causal attention, and the output row of one token."""
    hd = args.head_dim
    qkv_o = args.dim * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * args.dim
    ffn = 3 * args.dim * args.hidden_dim
    per_layer = 2 * T * (qkv_o + ffn) + causal_flops(1, args.n_heads, hd, T)
    return args.n_layers * per_layer + 2 * args.dim * args.vocab_size


def _use(model, backend: str, graph: bool, fused: bool | None = None) -> None:
    """Switch the loaded model's backend, graph capture and fused decode step in place (the weights and the cache
    stay); ``fused`` None: the backend's default (fused for triton)."""
    model.use(backend=backend, cuda_graph=graph, fused_decode=fused)
    free_memory()


PARTS = ("headline", "rest")


def run(ctx: Context, models: list[str], out: dict | None = None, parts: tuple[str, ...] = PARTS) -> dict:
    """Benchmark each model in two passes; one failing model is recorded and the next one still runs.

    ``headline`` (the runner's section of that name, first in every run): per model, in the order given (8B
    first), the fused Triton step at batch 1 at the goal contexts, then the same step with int8 and int4
    products. ``rest`` (section ``e2e``): per model again, the other peers and batch sizes, the decode-step
    profile, the torch.compile peer, whole generation and prefill. Each pass builds its model anew (the goal model
    from weights drawn in memory, no 16 GB file round trip; the others through a checkpoint on disk and the real
    loader, once); ``out`` (the runner's results["e2e"]) gets every row as it is measured, and ``ctx.save()`` is
    called after each, so a run cut at any moment keeps what it measured. The goal model is never skipped on an
    estimate: only a spent budget cuts its rows, one by one."""
    out = {"models": []} if out is None else out
    out.setdefault("models", [])
    recs = {m["model"]: m for m in out["models"]}
    for part in parts:
        compiled: list[str] = []  # models that got the compile peer (rest pass)
        for i, name in enumerate(models):
            rec = recs.get(name)
            if rec is None:
                rec = recs[name] = {"model": name}
                out["models"].append(rec)
                ctx.save()
            if "error" in rec:
                continue
            if part == "rest" and "headline" not in rec.get("parts", []) and "headline" not in parts:
                # A rest pass with no headline before it (``--only e2e``): the headline rows are part of it.
                todo = PARTS
            else:
                todo = (part,)
            need = EST_SECONDS.get(name, 0) // (2 if part == "headline" else 1)
            if name != GOAL_MODEL and ctx.time_left() < need:
                why = f"time budget: ~{need} s needed, {max(ctx.time_left(), 0):.0f} s left"
                ctx.log(f"e2e {name} ({part}): skipped, {why}")
                rec.setdefault("skipped_parts", {})[part] = why
                ctx.save()
                continue
            if ctx.over_budget():
                rec.setdefault("skipped_parts", {})[part] = "time budget spent"
                ctx.save()
                continue
            compile_here, why_not = (False, None)
            if "rest" in todo:
                compile_here, why_not = _compile_plan(ctx, models, i, compiled)
                if compile_here:
                    compiled.append(name)
            try:
                bench_model(ctx, rec, name, todo, compile_here, why_not)
            except Exception as e:
                if ctx.debug:
                    traceback.print_exc()
                ctx.log(f"e2e {name}: error: {describe(e)}")
                rec["error"] = describe(e)
            ctx.save()
            free_memory()
    return out


def _compile_plan(ctx: Context, models: list[str], i: int, compiled: list[str]) -> tuple[bool, str | None]:
    """Whether model ``models[i]`` gets the torch.compile peer, and why not. Full runs compile every model.
    --quick compiles one: the goal model (8B) when it is in the run, else (or when 8B's compile did not fit the
    budget) the smallest. On a GPU with a time budget, the compile must fit beside the base figures of this
    model and of the models still to come (``COMPILE_EST_SECONDS``, ``EST_SECONDS``)."""
    if not ctx.compile_peers:
        return False, "--no-compile"
    name = models[i]
    if ctx.quick:
        smallest = min(models, key=lambda n: model_args(n).num_parameters())
        if compiled:
            return False, f"--quick: one model only ({compiled[0]})"
        if name != GOAL_MODEL and name != smallest:
            return False, f"--quick: {GOAL_MODEL if GOAL_MODEL in models else smallest} only"
        if name == smallest and GOAL_MODEL in models and models.index(GOAL_MODEL) > i:
            return False, f"--quick: {GOAL_MODEL} only"  # 8B comes later and goes first
    if not ctx.cuda:
        return True, None
    need = sum(EST_SECONDS.get(n, 0) for n in models[i:]) + COMPILE_EST_SECONDS.get(name, 90)
    need += GENERATE_EST_SECONDS.get(name, 0)
    if ctx.time_left() < need:
        return False, f"time budget: ~{need} s needed with the compile, {max(ctx.time_left(), 0):.0f} s left"
    return True, None


def build_model(ctx: Context, rec: dict, name: str, max_seq_len: int, max_batch: int, via_file: bool):
    """The model of shape ``name`` with random weights, on the device, through ``Llama.load``. ``via_file``: written
    in Meta's layout to scratch space and read back by the real loader (what a user's checkpoint goes through);
    else drawn in memory on the device and handed over as a ``MemoryCheckpoint`` (the goal model: writing and
    reading 16 GB on the GPU machine's disk costs 30-60 s and ~19 GB of scratch)."""
    import torch

    from llama3_triton.model.checkpoints.folder import MemoryCheckpoint
    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path
    from llama3_triton.model.tools.tiny import random_weights

    args = model_args(name)
    load = dict(backend="triton", device=ctx.device, dtype=ctx.dtype, max_seq_len=max_seq_len,
                max_batch_size=max_batch, progress=ctx.progress)  # fmt: skip
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    if not via_file:
        try:  # the timed steps take token ids; a tokenizer is needed only by what decodes text
            tokenizer = default_tokenizer_path()
        except Exception as e:
            tokenizer, rec["tokenizer"] = None, f"none: {describe(e)}"
        weights = random_weights(args, 0, ctx.dtype, ctx.device, on_host=False)
        model = Llama.load(MemoryCheckpoint(args, weights, tokenizer), **load)
        del weights
        rec["built_in_memory_s"] = time.perf_counter() - t0
        ctx.log(f"e2e {name}: {args.num_parameters() / 1e9:.2f} B parameters, built in memory in "
                f"{rec['built_in_memory_s']:.1f} s")  # fmt: skip
        return model, args
    scratch = scratch_dir(args.num_parameters() * element_size(ctx.dtype))
    try:
        write_checkpoint(scratch / "ckpt", name, ctx.dtype, ctx.device)
        rec["write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = Llama.load(scratch / "ckpt", **load)
        rec["load_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ctx.log(f"e2e {name}: {args.num_parameters() / 1e9:.2f} B parameters, written in {rec['write_s']:.1f} s, "
            f"loaded in {rec['load_s']:.1f} s")  # fmt: skip
    return model, args


def bench_model(
    ctx: Context, rec: dict, name: str, parts: tuple[str, ...], compile_here: bool, why_not: str | None = None
) -> dict:
    """Measure ``parts`` of model ``name`` into ``rec`` (rows appended as they are measured, ``ctx.save()`` after
    each)."""

    batches, contexts, prefill_len = points(ctx)
    es = element_size(ctx.dtype)
    args = model_args(name)
    rec.update(
        dtype=str(ctx.dtype).removeprefix("torch."),
        config={k: v for k, v in args.to_dict().items() if k != "rope_scaling"},
        params=args.num_parameters(),
    )
    rec.setdefault("decode", [])
    # The goal model never goes through a file; another model's first pass does, so the loader is measured too.
    via_file = name != GOAL_MODEL and "load_s" not in rec
    model, args = build_model(ctx, rec, name, max(max(contexts) + 64, prefill_len), max(batches), via_file)
    rec["weight_bytes"] = model.weight_bytes()
    rec["decode_weight_bytes_per_token"] = model.decode_bytes_per_token()
    rec["kv_cache_bytes_per_token"] = args.kv_cache_bytes_per_token(es)
    for t in [*model.k_cache, *model.v_cache]:
        t.normal_()  # attention's cost depends on the lengths, not the values; but never time zeros

    def add(rows: list, row: dict) -> None:
        """Append ``row`` (in place of a row of the same point that an earlier pass skipped) and save the results."""
        key = (row.get("impl"), row.get("batch"), row.get("context"), row.get("sampling"))
        for i, r in enumerate(rows):
            if "skipped" in r and (r.get("impl"), r.get("batch"), r.get("context"), r.get("sampling")) == key:
                rows[i] = row
                break
        else:
            rows.append(row)
        ctx.save()

    if "headline" in parts:
        # The goal rows first: the fused Triton step (CUDA graph) at batch 1, each goal context; then int8, int4.
        _use(model, "triton", True, True)
        for L in contexts:
            add(rec["decode"], _decode_point(ctx, model, args, "triton", batches[0], L, es))
        _quantized_points(ctx, model, args, contexts, es, lambda row: add(rec["decode"], row))
        rec.setdefault("parts", []).append("headline")
        ctx.save()
    if "rest" not in parts:
        _release(ctx, rec, model)
        return rec

    # (impl, backend, CUDA graph, fused decode step): triton_unfused is the Triton ops around cuBLAS's products,
    # 10 launches a layer (the driver before the fused step): what the fused GEMVs and attention gain or lose.
    peers = [
        ("triton", "triton", True, True),
        ("triton_unfused", "triton", True, False),
        ("torch", "torch", True, None),
    ]
    if ctx.cuda:  # on a CPU there is no graph, so these would repeat the ones above
        peers.append(("torch_eager", "torch", False, None))
        if not ctx.quick and not ctx.smoke:
            peers.append(("triton_eager", "triton", False, True))
    done = {(r["impl"], r["batch"], r["context"]) for r in rec["decode"] if "skipped" not in r}
    for impl, backend, graph, fused in peers:
        _use(model, backend, graph, fused)
        for B in batches:
            for L in contexts:
                if (impl, B, L) not in done:
                    add(rec["decode"], _decode_point(ctx, model, args, impl, B, L, es))
    # Where the fused step's time goes, kernel by kernel, at batch 1 and the first context.
    _use(model, "triton", True, True)
    graph_ms = next(
        (
            r.get("median_ms")
            for r in rec["decode"]
            if (r["impl"], r["batch"], r["context"]) == ("triton", batches[0], contexts[0])
        ),
        None,
    )
    if not ctx.over_budget():
        rec["decode_profile"] = decode_profile.profile(ctx, model, batches[0], contexts[0], graph_ms)
        ctx.save()
    peer = _Peer(ctx, model) if compile_here else None
    try:
        if peer is not None:
            # One compiled graph serves every context (positions are device tensors); each batch size recompiles,
            # so --quick times batch 1 only (the goals' batch).
            pts = [(b, L) for b in batches for L in contexts if b == batches[0] or not (ctx.quick or ctx.smoke)]
            _compiled_points(ctx, model, args, peer, pts, es, lambda row: add(rec["decode"], row))
        else:
            rec["decode_compile_skipped"] = why_not or "not run"
        # Default sampling in the compile peer is a second compile: in --quick runs only if it fits the budget.
        peer_default = peer is not None and (
            not ctx.cuda or not ctx.quick or ctx.time_left() >= COMPILE_EST_SECONDS.get(name, 90) + 30
        )
        rec["generate"] = []
        _generation_rows(ctx, model, args, peer, peer_default, es, lambda row: add(rec["generate"], row))
    finally:
        if peer is not None:
            peer.close()

    rec["prefill"] = []
    outputs = {}
    for impl in ("triton", "torch"):
        _use(model, impl, False)
        row, out = _prefill_point(ctx, model, args, impl, prefill_len)
        add(rec["prefill"], row)
        if out is not None:
            outputs[impl] = out
    if len(outputs) == 2:
        rec["prefill_logits_max_abs_diff_triton_vs_torch"] = float((outputs["triton"] - outputs["torch"]).abs().max())
        rec["prefill_logits_max_abs"] = float(outputs["torch"].abs().max())
    del outputs
    rec.setdefault("parts", []).append("rest")
    _release(ctx, rec, model)
    return rec


def _release(ctx: Context, rec: dict, model) -> None:
    import torch

    if ctx.cuda:
        rec["peak_memory_bytes"] = max(rec.get("peak_memory_bytes", 0), torch.cuda.max_memory_allocated(ctx.device))
    del model
    free_memory()


def _floors(ctx: Context, model, args, B: int, L: int, es: int) -> dict:
    """Tokens/s ceilings of a step that reads its bytes (weights + KV up to L + 1) once: from the measured read
    ceiling (a decode step mostly reads; ``floor_tokens_per_s``, what the fractions divide by), and beside it from
    the copy ceiling (read + write; ``floor_tokens_per_s_copy``), which a read-mostly step can beat."""
    read, copy = ctx.ceilings.get("read_gbps"), ctx.ceilings.get("copy_gbps")
    weights = model.decode_bytes_per_token()
    kv = B * (L + 1) * args.kv_cache_bytes_per_token(es)
    row: dict[str, Any] = {"bytes_per_step": weights + kv}
    if read:
        row["floor_bandwidth"] = "read"
        row["floor_tokens_per_s"] = B * read * 1e9 / (weights + kv)
        row["floor_tokens_per_s_all_weights"] = B * read * 1e9 / model.weight_bytes()
    if copy:
        row["floor_tokens_per_s_copy"] = B * copy * 1e9 / (weights + kv)
    return row


QUANTIZED = ("int8", "int4")  # impl triton_int8, triton_int4: the loader's formats (int4 = groups of 128)


def _quantized_points(ctx: Context, model, args, contexts: list[int], es: int, add) -> None:
    """Decode rows of the fused step with the products quantized as ``Llama.load(quantize=...)`` would (the head at
    int8), built from the loaded weights on the device and swapped in place, then swapped back: no second
    checkpoint load. Floors use each format's own bytes (``decode_bytes_per_token`` counts the packed planes)."""
    from llama3_triton.model.quant import quantize as quant

    rows: list[dict] = []  # this function's rows, each also handed to ``add`` as it is made

    def put(row: dict) -> None:
        rows.append(row)
        add(row)

    group = quant.int4_group_for(args)
    for fmt in QUANTIZED:
        if ctx.over_budget():
            for L in contexts:
                put({"impl": f"triton_{fmt}", "batch": 1, "context": L, "skipped": "time budget spent"})
            continue
        kind, g = quant.parse(fmt)
        if kind == "int4":  # groups of 128 on every Llama-3 (the loader's "int4"); the smoke model's K needs fewer
            if group is None:
                why = "no int4 group (128, 64, 32) divides this model's K"
                for L in contexts:
                    put({"impl": f"triton_{fmt}", "batch": 1, "context": L, "skipped": why})
                continue
            g = group
        swapped = []
        try:
            for layer in model.layers:
                for parent, name in ((layer.attention, "wqkv"), (layer.attention, "wo"),
                                     (layer.feed_forward, "w13"), (layer.feed_forward, "w2")):  # fmt: skip
                    old = getattr(parent, name)
                    swapped.append((parent, name, old))
                    setattr(parent, name, quant.quantize_product(name, old.weight, (kind, g), model.dtype))
            head = model.tok_embeddings if model.output is None else model.output  # tied: a quantized copy, as loaded
            swapped.append((model, "output", model.output))
            model.output = quant.quantize_product("output", head.weight, (kind, g), model.dtype)
            _use(model, "triton", True, True)
            for L in contexts:
                row = _decode_point(ctx, model, args, f"triton_{fmt}", 1, L, es)
                row["quantize"] = f"int4-g{g}" if kind == "int4" else fmt
                put(row)
        except Exception as e:
            if ctx.debug:
                traceback.print_exc()
            done = {r["context"] for r in rows if r["impl"] == f"triton_{fmt}"}
            for L in contexts:
                if L not in done:
                    put({"impl": f"triton_{fmt}", "batch": 1, "context": L, "error": describe(e)})
        finally:
            for parent, name, old in reversed(swapped):
                setattr(parent, name, old)
            _use(model, "triton", True, True)


def _decode_point(ctx: Context, model, args, impl: str, B: int, L: int, es: int) -> dict:
    import torch

    row: dict[str, Any] = {"impl": impl, "batch": B, "context": L, **_floors(ctx, model, args, B, L, es)}
    if ctx.over_budget():
        row["skipped"] = "time budget spent"
        return row
    tokens = torch.randint(0, args.vocab_size, (B, 1), device=ctx.device)
    positions = torch.full((B,), L, dtype=torch.long, device=ctx.device)
    try:
        timing, _ = time_call(lambda: model.decode(tokens, positions), ctx, graph=False)
    except Exception as e:
        if ctx.debug:
            traceback.print_exc()
        row["error"] = describe(e)
        ctx.log(f"e2e decode {impl} B={B} L={L}: error: {row['error']}")
        return row
    if ctx.cuda and model.use_cuda_graph:  # the driver falls back to eager (with a warning) if capture fails
        row["cuda_graph"] = model.has_decode_graph(B)
    _finish_decode_row(ctx, row, timing)
    return row


def _finish_decode_row(ctx: Context, row: dict, timing: dict) -> None:
    row.update(timing)
    row["tokens_per_s"] = row["batch"] / (timing["median_ms"] * 1e-3)
    if "floor_tokens_per_s" in row:
        row["fraction_of_floor"] = row["tokens_per_s"] / row["floor_tokens_per_s"]
    frac = f" ({row['fraction_of_floor']:.0%} of the floor)" if "fraction_of_floor" in row else ""
    ctx.log(f"e2e decode {row['impl']} B={row['batch']} L={row['context']}: {fmt_time(timing['median_ms'])}/step, "
            f"{row['tokens_per_s']:.1f} tokens/s{frac}")  # fmt: skip


class _Peer:
    """The compiled torch.compile peer (``benchmarks.torch_decode``) of one model: one compiled step per sampling
    setting (a new batch size recompiles inside it), built on first use, dropped by ``close``."""

    def __init__(self, ctx: Context, model):
        self.ctx, self.model = ctx, model
        self._steps: dict = {}
        self._compiled: set = set()  # (params, batch) pairs already compiled

    def get(self, params):
        from llama3_triton.benchmarks.torch_decode import TorchDecode

        if params not in self._steps:
            peer = TorchDecode(self.model, params)
            self._steps[params] = (peer, peer.compile(backend=self.ctx.compile_backend))
        return self._steps[params]

    def call(self, params, tokens, positions):
        """Run the compiled step (compiling it on the first call of a batch size): (next tokens, logits)."""
        import torch

        _, step = self.get(params)
        if self.ctx.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs may now be overwritten
        with torch.inference_mode():
            return step(tokens, positions)

    def warm(self, params, tokens, positions) -> float | None:
        """Compile (and let cudagraph trees warm up and record) for this batch size; seconds it took, or None when
        this (params, batch) was compiled before."""
        key = (params, tokens.shape[0])
        if key in self._compiled:
            return None
        t0 = time.perf_counter()
        for _ in range(3):  # compile, then cudagraph trees' warm-up and recording runs
            self.call(params, tokens, positions)
        sync(self.ctx)
        self._compiled.add(key)
        return time.perf_counter() - t0

    def recipe(self, params) -> dict:
        peer, _ = self.get(params)
        mode = "reduce-overhead" if self.ctx.cuda and self.ctx.compile_backend == "inductor" else None
        return {**peer.recipe, "backend": self.ctx.compile_backend, **({"mode": mode} if mode else {})}

    def close(self) -> None:
        import torch

        self._steps.clear()
        try:
            torch._dynamo.reset()
            if self.ctx.cuda:
                from torch._inductor import cudagraph_trees

                cudagraph_trees.reset_cudagraph_trees()
        except Exception:
            pass
        free_memory()


def sync(ctx: Context) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def _compiled_points(ctx: Context, model, args, peer: _Peer, pts: list[tuple[int, int]], es: int, add) -> None:
    """The torch.compile peer's decode step (``benchmarks.torch_decode``: the whole step in one graph, greedy
    sampling inside it, compiled with fullgraph=True and mode="reduce-overhead") at each (batch, context). Its
    logits are compared with the Triton path's on the same inputs (``max_abs_diff_vs_triton``)."""
    import torch

    from llama3_triton.benchmarks.torch_decode import GREEDY

    _use(model, "triton", True)  # the driver as shipped: its logits are the comparison's reference
    for B, L in pts:
        row: dict[str, Any] = {"impl": "torch_compile", "batch": B, "context": L, **_floors(ctx, model, args, B, L, es)}
        if ctx.over_budget():
            row["skipped"] = "time budget spent"
            add(row)
            continue
        tokens = torch.randint(0, args.vocab_size, (B, 1), device=ctx.device)
        positions = torch.full((B,), L, dtype=torch.long, device=ctx.device)
        try:
            row["compile"] = peer.recipe(GREEDY)
            compile_s = peer.warm(GREEDY, tokens, positions)
            if compile_s is not None:
                row["compile_s"] = compile_s
            expected = model.decode(tokens, positions).float().clone()
            row["max_abs_diff_vs_triton"] = float((peer.call(GREEDY, tokens, positions)[1] - expected).abs().max())
            row["max_abs_logit_triton"] = float(expected.abs().max())
            timing, _ = time_call(lambda t=tokens, p=positions: peer.call(GREEDY, t, p), ctx, graph=False)
        except Exception as e:
            if ctx.debug:
                traceback.print_exc()
            row["error"] = describe(e)
            ctx.log(f"e2e decode torch_compile B={B} L={L}: error: {row['error']}")
            add(row)
            continue
        _finish_decode_row(ctx, row, timing)
        add(row)


# ---- whole generation: prefill, then the decode + sample loop ------------------------------------------------


def gen_settings(ctx: Context) -> tuple[int, int, int]:
    """(prompt tokens, new tokens, timed runs) of the generation rows."""
    if ctx.smoke:
        return 4, 4, 1
    return (16, 128, 3) if ctx.quick else (16, 256, 5)


def _sampling_settings():
    """(name, SamplingParams) of the generation rows: generate()'s defaults and greedy."""
    from llama3_triton.model.generation.sampling import SamplingParams

    return [("default", SamplingParams()), ("greedy", SamplingParams(temperature=0.0))]


def _generate_triton(model, prompt: list[int], n_new: int, params, seed: int) -> dict:
    """``model.generate`` as a user calls it (no stop tokens, so every run makes n_new tokens): its own timers
    split the prefill (with the first token's sample) from the loop of n_new - 1 decode + sample steps."""
    t0 = time.perf_counter()
    out = model.generate(
        [prompt],
        max_new_tokens=n_new,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=seed,
        stop_tokens=[],
    )
    total = time.perf_counter() - t0
    if len(out.tokens[0]) != n_new:
        raise RuntimeError(f"generate made {len(out.tokens[0])} tokens, expected {n_new}")
    loop = out.first_decode_seconds + out.decode_seconds
    return {"prefill_s": out.prefill_seconds, "loop_s": loop, "total_s": total, "tokens": out.tokens[0]}


def _generate_peer(ctx: Context, model, peer: _Peer, prompt: list[int], n_new: int, params, seed: int) -> dict:
    """The same loop as ``model.generate`` with the compiled peer's step (sampling inside its graph): prefill
    with the model's own prefill (Triton backend) and sample the first token; then per step the compiled step,
    the token stored, the stop check on the device, a host sync every ``SYNC_EVERY`` steps as generate does."""
    import torch

    from llama3_triton.model.generation.generate import SYNC_EVERY
    from llama3_triton.model.generation.sampling import sample

    torch.manual_seed(seed)
    device = ctx.device
    B = 1
    stops = torch.tensor([], dtype=torch.long, device=device)  # none, as in the Triton rows
    sync(ctx)
    t0 = time.perf_counter()
    with torch.inference_mode():
        tokens = torch.tensor([prompt], device=device)
        lengths = torch.tensor([len(prompt)], device=device)
        logits = model.prefill(tokens, 0, last=lengths - 1, check=False)[:, 0]
        tok = sample(logits, params, None)
        sync(ctx)
        t1 = time.perf_counter()
        out = torch.empty(B, n_new, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        bad = torch.zeros(B, dtype=torch.bool, device=device)
        positions = lengths.clone()
        for step in range(n_new):
            out[:, step] = tok
            done |= torch.isin(tok, stops)
            if step + 1 == n_new:
                break
            if step % SYNC_EVERY == SYNC_EVERY - 1:
                all_done, _ = torch.stack([done.all(), bad.any()]).tolist()
                if all_done:
                    break
            tok, logits = peer.call(params, tok[:, None].clone(), positions)
            bad |= ~torch.isfinite(logits).all(dim=-1)
            tok = tok.clone()  # the replay's output buffer is reused by the next replay
            positions = positions + 1
        sync(ctx)
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "loop_s": t2 - t1, "total_s": t2 - t0, "tokens": out[0, : step + 1].tolist()}


def _generation_rows(ctx: Context, model, args, peer: _Peer | None, peer_default: bool, es: int, add) -> None:
    """Whole generation at batch 1: a short random prompt, then n_new tokens, with generate()'s default sampling
    and with greedy, for the Triton path (``model.generate``) and the compile peer. tokens/s = (n_new - 1) / the
    loop's wall time (prefill and the first token's sample excluded; reported apart, and in
    tokens_per_s_with_prefill = n_new / the whole call). The median of ``runs`` timed runs after one untimed one
    (CUDA-graph capture, compilation)."""
    import numpy as np
    import torch

    n_prompt, n_new, runs = gen_settings(ctx)
    g = torch.Generator().manual_seed(n_prompt)
    prompt = torch.randint(0, 128000, (n_prompt,), generator=g).tolist()  # ordinary tokens, no special ids
    _use(model, "triton", True)  # generate's path, and the peer's prefill
    impls = [("triton", True)] + ([("torch_compile", peer_default)] if peer is not None else [])
    for impl, with_default in impls:
        for name, params in _sampling_settings():
            row: dict[str, Any] = {
                "impl": impl,
                "batch": 1,
                "sampling": name,
                "sampling_params": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k},
                "prompt_tokens": n_prompt,
                "new_tokens": n_new,
                "runs": runs,
                # The floor of a step at the loop's middle context (the KV cache grows from the prompt's length).
                "floor_context": n_prompt + n_new // 2,
                **_floors(ctx, model, args, 1, n_prompt + n_new // 2, es),
            }
            if impl == "torch_compile":
                row["compile"] = peer.recipe(params)
            else:
                row["how"] = "model.generate: the Triton backend, the driver's CUDA-graph decode step, eager sampling"
            if name == "default" and not with_default:
                row["skipped"] = "time budget: a second compile (default sampling) did not fit"
                add(row)
                continue
            if ctx.over_budget():
                row["skipped"] = "time budget spent"
                add(row)
                continue
            try:
                if impl == "triton":

                    def once(seed, params=params):
                        return _generate_triton(model, prompt, n_new, params, seed)
                else:
                    tok = torch.zeros(1, 1, dtype=torch.long, device=ctx.device)
                    compile_s = peer.warm(params, tok, torch.full((1,), n_prompt, device=ctx.device))
                    if compile_s is not None:
                        row["compile_s"] = compile_s

                    def once(seed, params=params):
                        return _generate_peer(ctx, model, peer, prompt, n_new, params, seed)

                once(0)  # untimed: graph capture, compilation, allocator growth
                timed = [once(1 + r) for r in range(runs)]
            except Exception as e:
                if ctx.debug:
                    traceback.print_exc()
                row["error"] = describe(e)
                ctx.log(f"e2e generate {impl} {name}: error: {row['error']}")
                add(row)
                continue
            loop = float(np.median([t["loop_s"] for t in timed]))
            total = float(np.median([t["total_s"] for t in timed]))
            row.update(
                loop_s=loop,
                loop_s_runs=[t["loop_s"] for t in timed],
                prefill_s=float(np.median([t["prefill_s"] for t in timed])),
                total_s=total,
                tokens_per_s=(n_new - 1) / loop,
                tokens_per_s_with_prefill=n_new / total,
            )
            if "floor_tokens_per_s" in row:
                row["fraction_of_floor"] = row["tokens_per_s"] / row["floor_tokens_per_s"]
            ctx.log(f"e2e generate {impl} {name} B=1: {row['tokens_per_s']:.1f} tokens/s over {n_new - 1} steps "
                    f"({row['tokens_per_s_with_prefill']:.1f} with the prefill of {n_prompt} tokens)")  # fmt: skip
            add(row)


def _prefill_point(ctx: Context, model, args, impl: str, T: int) -> tuple[dict, Any]:
    import torch

    flops = prefill_flops(args, T)
    row: dict[str, Any] = {"impl": impl, "batch": 1, "prompt_tokens": T, "flops": flops}
    if ctx.over_budget():
        row["skipped"] = "time budget spent"
        return row, None
    # The same prompt for every implementation (their logits are compared).
    tokens = torch.randint(0, args.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(ctx.device)
    last = torch.tensor([T - 1], device=ctx.device)

    @torch.inference_mode()
    def prefill():
        return model.prefill(tokens, 0, last=last, check=False)  # (1, 1, vocab): logits of the last token

    try:
        timing, out = time_call(prefill, ctx, graph=False)
    except Exception as e:
        if ctx.debug:
            traceback.print_exc()
        row["error"] = describe(e)
        ctx.log(f"e2e prefill {impl} T={T}: error: {row['error']}")
        return row, None
    s = timing["median_ms"] * 1e-3
    row.update(timing)
    row["tokens_per_s"] = T / s
    row["tflops"] = flops / s / 1e12
    if ctx.ceilings.get("matmul_tflops"):
        row["fraction_of_ceiling"] = row["tflops"] / ctx.ceilings["matmul_tflops"]
    ctx.log(f"e2e prefill {impl} T={T}: {fmt_time(timing['median_ms'])}, {row['tokens_per_s']:.0f} tokens/s, "
            f"{row['tflops']:.1f} TFLOP/s")  # fmt: skip
    return row, out.float().clone()


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "e2e"))
