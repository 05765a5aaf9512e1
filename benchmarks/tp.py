"""Tensor-parallel decode: tokens/s at TP 1, 2, 4, 8 against the floor from per-rank weight bytes.

Under tensor parallelism each of N GPUs reads only its slice of the weights per token (1/N of every split
matrix, plus the replicated norms) and its k/v heads of the cache, in parallel; the floor is therefore

    tokens/s  <=  B * copy bandwidth of one GPU / (weight bytes read per rank + KV-cache bytes read per rank)

before the two all-reduces per layer, which this floor leaves out (their latency is what TP pays).

Each TP size runs as its own ``torchrun`` job over a random Meta-layout checkpoint written once to scratch
space; rank 0 measures its GPU's copy bandwidth, then every rank loads its slice and times the decode step
(a CUDA graph replay with the all-reduces inside). It needs a machine with at least 2 GPUs; with fewer the
section records that it was not measured. On a CPU (smoke run) the same code runs at TP 1 and 2 over gloo
on a tiny model, so CI exercises it; those figures are not GPU performance.

    python -m llama3_triton.benchmarks --only tp [--models 8B]
    python -m llama3_triton.benchmarks.tp --sizes 1,2,4,8 --model 8B   # this section alone, results to stdout as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama3_triton.model.checkpoints import files as _files

TP_SIZES = (1, 2, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_gbps(device) -> float:
    """Bytes read + written per second by a large device-to-device copy on this rank's device."""
    import torch

    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * n / sorted(times)[len(times) // 2] / 1e9


def worker(a: argparse.Namespace) -> int:
    """One rank (launched by torchrun): load this rank's slice, time the decode step, rank 0 writes JSON."""
    import torch
    import torch.distributed as dist

    from llama3_triton.model import distributed
    from llama3_triton.model.llama import Llama

    tp = distributed.init_from_env()
    device = distributed.default_device(tp)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_gbps = _copy_gbps(device) if tp.rank == 0 else None
    backend = "triton" if device.type == "cuda" else "torch"
    llm = Llama.load(
        a.ckpt, backend=backend, device=device, dtype=dtype, max_seq_len=a.context + 8, max_batch_size=a.batch
    )
    B, L = a.batch, a.context
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, llm.args.vocab_size, (B, L), generator=gen).to(device)
    with torch.inference_mode():
        llm.prefill(tokens, 0, last=torch.full((B,), L - 1, device=device), check=False)  # fill the cache
    tok = torch.zeros(B, 1, dtype=torch.long, device=device)
    pos = torch.full((B,), L, dtype=torch.long, device=device)
    for _ in range(3):  # warm-up; on CUDA the first call captures the graph
        llm.decode(tok, pos)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if tp.enabled:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        llm.decode(tok, pos)  # the same slot each step: a constant cache length L + 1
    sync()
    step_s = (time.perf_counter() - t0) / a.steps
    if tp.rank == 0:
        es = torch.empty((), dtype=dtype).element_size()
        weight_bytes = llm.decode_bytes_per_token()  # this rank's
        kv_bytes = 2 * llm.args.n_layers * (llm.args.n_kv_heads // tp.world) * llm.args.head_dim * (L + 1) * es * B
        floor = B * copy_gbps * 1e9 / (weight_bytes + kv_bytes)
        row = {
            "tp": tp.world,
            "batch": B,
            "context": L,
            "backend": backend,
            "dtype": str(dtype).removeprefix("torch."),
            "cuda_graph": bool(device.type == "cuda" and llm.has_decode_graph(B)),
            "step_ms": step_s * 1e3,
            "tokens_per_s": B / step_s,
            "weight_bytes_per_rank": weight_bytes,
            "kv_bytes_per_rank": kv_bytes,
            "copy_gbps_rank0": copy_gbps,
            "floor_tokens_per_s": floor,
            "fraction_of_floor": (B / step_s) / floor,
        }
        _files.write_text(a.out, json.dumps(row))  # whole or not at all: the parent reads it
    if tp.enabled:
        # Leave together: a rank that exits while its peer still holds the gloo connection can make the
        # peer abort (SIGABRT, seen intermittently in CI-like runs).
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _launch(n: int, ckpt: Path, out: Path, batch: int, context: int, steps: int, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-port",
        str(free_port()),
        "-m",
        "llama3_triton.benchmarks.tp",
        "--worker",
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--batch",
        str(batch),
        "--context",
        str(context),
        "--steps",
        str(steps),
    ]
    # A session of its own, so that a timeout can end torchrun and every worker it started (they hold GPUs).
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"tp": n, "error": f"timed out after {timeout:.0f} s"}
    p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"tp": n, "error": f"torchrun exited {p.returncode}: {' | '.join(tail)}"}
    return json.loads(out.read_text())


def run(ctx, models: list[str]) -> dict:
    """The runner's tp section: every TP size this machine can hold, or a record of why none ran."""
    import torch

    n_gpus = torch.cuda.device_count() if ctx.cuda else 0
    if ctx.cuda and n_gpus < 2:
        return {
            "measured": False,
            "note": f"not measured: tensor parallel needs at least 2 GPUs, this machine has {n_gpus}",
        }
    from llama3_triton.model.tools.tiny import make_tiny

    scratch = Path(tempfile.mkdtemp(prefix="llama3-triton-tp-"))
    try:
        if ctx.smoke or not ctx.cuda:
            name, sizes, batch, context, steps = "tiny", [1, 2], 1, 16, 3
            ckpt = make_tiny(scratch / "ckpt", dim=256, n_heads=4, n_kv_heads=2, dtype=torch.float32)
        else:
            from llama3_triton.benchmarks import e2e

            name = models[0] if models else "8B"
            sizes, batch, context, steps = [n for n in TP_SIZES if n <= n_gpus], 1, 2048, 100
            shutil.rmtree(scratch)
            scratch = e2e.scratch_dir(2 * e2e.model_args(name).num_parameters() + (1 << 28))
            ckpt = scratch / "ckpt"
            e2e.write_checkpoint(ckpt, name, torch.bfloat16, ctx.device)
        rows = []
        for n in sizes:
            if ctx.over_budget():
                rows.append({"tp": n, "skipped": "time budget spent"})
                continue
            ctx.log(f"tp: {name} decode at TP {n} (batch {batch}, context {context})")
            rows.append(_launch(n, ckpt, scratch / f"tp{n}.json", batch, context, steps, timeout=900))
        return {
            "measured": True,
            "model": name,
            "rows": rows,
            "note": "floor = B x rank 0's copy bandwidth / (weight + KV-cache bytes read per rank); "
            "all-reduce time not in the floor",
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def markdown(tp: dict) -> list[str]:
    lines = ["## Tensor-parallel decode", ""]
    if not tp.get("measured"):
        return lines + [tp.get("note") or tp.get("error") or "not measured", ""]
    lines += [
        f"{tp['model']}-shaped random weights; {tp['note']}.",
        "",
        "| TP | batch | context | tokens/s | ms/step | weight bytes/rank | floor tokens/s | of floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in tp["rows"]:
        if "tokens_per_s" in r:
            lines.append(
                f"| {r['tp']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} "
                f"| {r['weight_bytes_per_rank'] / 1e9:.2f} GB | {r['floor_tokens_per_s']:.1f} "
                f"| {100 * r['fraction_of_floor']:.0f}% |"
            )
        else:
            lines.append(f"| {r['tp']} | | | {r.get('error') or r.get('skipped')} | | | | |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help="sequences per decode step (default 1)")
    p.add_argument("--context", type=int, default=2048, help="tokens already in the cache (default 2048)")
    p.add_argument("--steps", type=int, default=100, help="timed decode steps (default 100)")
    p.add_argument("--model", default="8B", help="model shape for the standalone run (default 8B)")
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    from llama3_triton.benchmarks.common import Context, prepare_environment

    smoke = prepare_environment(False)
    import torch

    ctx = Context(
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), dtype=torch.bfloat16, smoke=smoke
    )
    print(json.dumps(run(ctx, [a.model]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
