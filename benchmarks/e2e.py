"""End to end: decode and prefill tokens/s of whole Llama-3-shaped models, against the bandwidth floor.

For each model shape (Llama 3.2 1B, 3.2 3B, 3.1 8B) random bf16 weights are written in Meta's layout by the
project's own tiny-checkpoint code (``model.checkpoint.write_meta_checkpoint``, the real tokenizer), loaded
through the real loader (``Llama.load``), timed, and deleted before the next model (8B is 16 GB on disk and
in host RAM; the scratch folder is /dev/shm when it has room, else the temp folder, or
$LLAMA3_TRITON_SCRATCH).

Decode: one ``decode_step`` (B new tokens at position L, each attending to L + 1 keys) at batch 1 and 8
and contexts 128, 2k and 8k, the KV cache filled with random values; tokens/s = B / step time. Peers, all
on the same loaded weights (a backend is only the ops module the driver calls, so it is switched in place):
    triton         the driver as shipped: Triton kernels, the decode step replayed as a CUDA graph
    torch          backend="torch" (the reference ops), same driver, same CUDA graph; under capture the
                   reference cannot read the lengths on the host, so it attends over the whole static
                   cache with a mask and its step time does not depend on the context
    torch_eager    backend="torch" without the CUDA graph: every op launched from Python
    triton_eager   (full runs) the Triton kernels without the graph: what the graph saves
    torch_compile  torch.compile(mode="reduce-overhead") of the torch backend's decode step (gpt-fast's
                   recipe); a failure is recorded, never raised. Compiling costs about a minute per model
                   and shape, so --quick compiles only the smallest model, at batch 1 and context 2k.
Floor: the most tokens/s the measured copy bandwidth allows, B * bandwidth / bytes a step must read, where
the bytes are the weights a step reads (``decode_bytes_per_token``: all but the embedding table) plus the
KV cache read up to each sequence's length; also given against all weight bytes.

Prefill: one 2k-token prompt at batch 1 (logits of the last token only, as generation does); tokens/s and
TFLOP/s (2 FLOPs per weight per token + causal attention) as a fraction of the measured matmul ceiling.
Peak GPU memory over the model's load and benchmarks is recorded too.

    python -m benchmarks.e2e [runner flags]      # same as python -m benchmarks --only e2e
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

from benchmarks.attention import causal_flops
from benchmarks.common import Context, describe, element_size, fmt_time, free_memory, host_available_bytes, time_call

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
# Rough seconds per model on an H100 in --quick mode (write, load, time), compile peer excluded: a model is
# skipped, with the reason recorded, when less time than this is left of the run's budget.
EST_SECONDS = {"tiny": 0, "1B": 40, "3B": 60, "8B": 120}
COMPILE_EST_SECONDS = 90


def points(ctx: Context) -> tuple[list[int], list[int], int]:
    """(batches, contexts, prefill length)."""
    if ctx.smoke:
        return [1, 2], [12], 16
    return [1, 8], [128, 2048, 8192], 2048


def model_args(name: str):
    from model.tiny import tiny_args

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
    from model.tiny import random_weights, write_hf_checkpoint, write_meta_checkpoint
    from model.tokenizer import default_tokenizer_path

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


def _use(model, backend: str, graph: bool) -> None:
    """Switch the loaded model's backend and graph capture in place (the weights and the cache stay)."""
    model.use(backend=backend, cuda_graph=graph)
    free_memory()


def run(ctx: Context, models: list[str]) -> dict:
    """Benchmark each model in turn; one failing model is recorded and the next one still runs."""
    out: dict[str, Any] = {"models": []}
    smallest = min(models, key=lambda n: model_args(n).num_parameters())
    for name in models:
        compile_here = ctx.compile_peers and (not ctx.quick or name == smallest)
        need = EST_SECONDS.get(name, 0) + (COMPILE_EST_SECONDS if compile_here and ctx.cuda else 0)
        if ctx.time_left() < need:
            ctx.log(f"e2e {name}: skipped, ~{need} s needed and {max(ctx.time_left(), 0):.0f} s of the budget left")
            out["models"].append({"model": name, "skipped": f"time budget: ~{need} s needed"})
            continue
        try:
            out["models"].append(bench_model(ctx, name, compile_here))
        except Exception as e:
            if ctx.debug:
                traceback.print_exc()
            ctx.log(f"e2e {name}: error: {describe(e)}")
            out["models"].append({"model": name, "error": describe(e)})
        free_memory()
    return out


def bench_model(ctx: Context, name: str, compile_here: bool) -> dict:
    import torch

    from model.llama import Llama

    batches, contexts, prefill_len = points(ctx)
    args = model_args(name)
    es = element_size(ctx.dtype)
    rec: dict[str, Any] = {
        "model": name,
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "config": {k: v for k, v in args.to_dict().items() if k != "rope_scaling"},
        "params": args.num_parameters(),
    }
    scratch = scratch_dir(args.num_parameters() * es)
    try:
        t0 = time.perf_counter()
        write_checkpoint(scratch / "ckpt", name, ctx.dtype, ctx.device)
        rec["write_s"] = time.perf_counter() - t0
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t0 = time.perf_counter()
        model = Llama.load(
            scratch / "ckpt",
            backend="triton",
            device=ctx.device,
            dtype=ctx.dtype,
            max_seq_len=max(max(contexts) + 64, prefill_len),
            max_batch_size=max(batches),
            progress=ctx.progress,
        )
        rec["load_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ctx.log(f"e2e {name}: {rec['params'] / 1e9:.2f} B parameters, written in {rec['write_s']:.1f} s, "
            f"loaded in {rec['load_s']:.1f} s")  # fmt: skip
    rec["weight_bytes"] = model.weight_bytes()
    rec["decode_weight_bytes_per_token"] = model.decode_bytes_per_token()
    rec["kv_cache_bytes_per_token"] = args.kv_cache_bytes_per_token(es)
    for t in [*model.k_cache, *model.v_cache]:
        t.normal_()  # attention's cost depends on the lengths, not the values; but never time zeros

    peers = [("triton", "triton", True), ("torch", "torch", True)]
    if ctx.cuda:  # on a CPU there is no graph, so these would repeat the two above
        peers.append(("torch_eager", "torch", False))
        if not ctx.quick and not ctx.smoke:
            peers.append(("triton_eager", "triton", False))
    rec["decode"] = []
    for impl, backend, graph in peers:
        _use(model, backend, graph)
        for B in batches:
            for L in contexts:
                rec["decode"].append(_decode_point(ctx, model, args, impl, B, L, es))
    if compile_here:
        pts = [(b, L) for b in batches for L in contexts]
        if ctx.quick or ctx.smoke:
            pts = [(batches[0], contexts[len(contexts) // 2])]
        rec["decode"] += _compiled_points(ctx, model, args, pts, es)
    else:
        rec["decode_compile_skipped"] = "--no-compile" if not ctx.compile_peers else "--quick: the smallest model only"

    rec["prefill"] = []
    outputs = {}
    for impl in ("triton", "torch"):
        _use(model, impl, False)
        row, out = _prefill_point(ctx, model, args, impl, prefill_len)
        rec["prefill"].append(row)
        if out is not None:
            outputs[impl] = out
    if len(outputs) == 2:
        rec["prefill_logits_max_abs_diff_triton_vs_torch"] = float((outputs["triton"] - outputs["torch"]).abs().max())
        rec["prefill_logits_max_abs"] = float(outputs["torch"].abs().max())
    del outputs
    if ctx.cuda:
        rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
    del model
    free_memory()
    return rec


def _floors(ctx: Context, model, args, B: int, L: int, es: int) -> dict:
    """Tokens/s ceilings from the measured copy bandwidth: bytes a step reads (weights + KV up to L + 1)."""
    bw = ctx.ceilings.get("copy_gbps")
    weights = model.decode_bytes_per_token()
    kv = B * (L + 1) * args.kv_cache_bytes_per_token(es)
    row: dict[str, Any] = {"bytes_per_step": weights + kv}
    if bw:
        row["floor_tokens_per_s"] = B * bw * 1e9 / (weights + kv)
        row["floor_tokens_per_s_all_weights"] = B * bw * 1e9 / model.weight_bytes()
    return row


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


def _compiled_points(ctx: Context, model, args, pts: list[tuple[int, int]], es: int) -> list[dict]:
    """torch.compile of the torch backend's decode step, mode="reduce-overhead" on CUDA (CUDA graphs through
    cudagraph trees, the KV cache marked as static addresses), fullgraph=False: the reference's host read of
    the lengths is a graph break, as it would be for any user compiling this model."""
    import torch
    import torch._dynamo

    _use(model, "torch", False)
    for t in [*model.k_cache, *model.v_cache]:
        try:
            torch._dynamo.mark_static_address(t)
        except Exception:  # older torch: cudagraph trees then copy the cache in, slower but correct
            break

    def step(tokens, positions):
        return model.decode(tokens, positions)  # eager: the model's own graph capture is off

    kw: dict[str, Any] = {"fullgraph": False, "dynamic": False, "backend": ctx.compile_backend}
    if ctx.compile_backend == "inductor" and ctx.cuda:
        kw["mode"] = "reduce-overhead"
    compiled = torch.compile(step, **kw)
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    rows = []
    for B, L in pts:
        row: dict[str, Any] = {"impl": "torch_compile", "batch": B, "context": L, **_floors(ctx, model, args, B, L, es)}
        row["compile"] = {"backend": ctx.compile_backend, **({"mode": kw["mode"]} if "mode" in kw else {})}
        if ctx.over_budget():
            row["skipped"] = "time budget spent"
            rows.append(row)
            continue
        tokens = torch.randint(0, args.vocab_size, (B, 1), device=ctx.device)
        positions = torch.full((B,), L, dtype=torch.long, device=ctx.device)

        def call(tokens=tokens, positions=positions):
            if mark_step is not None and ctx.cuda:
                mark_step()
            with torch.inference_mode():
                return compiled(tokens, positions)

        try:
            t0 = time.perf_counter()
            for _ in range(3):  # compile, then cudagraph trees' warm-up and recording runs
                call()
            if ctx.cuda:
                torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - t0
            timing, _ = time_call(call, ctx, graph=False)
        except Exception as e:
            if ctx.debug:
                traceback.print_exc()
            row["error"] = describe(e)
            ctx.log(f"e2e decode torch_compile B={B} L={L}: error: {row['error']}")
            rows.append(row)
            continue
        _finish_decode_row(ctx, row, timing)
        rows.append(row)
    try:
        torch._dynamo.reset()
        if ctx.cuda:
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()
    except Exception:
        pass
    free_memory()
    return rows


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
    from benchmarks import run_as

    sys.exit(run_as("--only", "e2e"))
