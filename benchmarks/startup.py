"""How long a person waits for the first output: ``llama3-triton info`` and ``llama3-triton generate``, each run as a
user runs it (the console script, a fresh process, the default model unless ``--ckpt``).

For ``info``: the wall time of the whole command (it prints once, at the end). For ``generate``: the time to the
first byte it writes to stdout (the prompt's continuation starts there) and the time to its exit, with
``--max-new-tokens 8 --temperature 0``. The median, minimum and maximum of ``--repeats`` runs each, alternated so
that a busy moment of the machine falls on both.

Where the time went before (cProfile, SmolLM2 Q4_1): gguf.GGUFReader building a numpy view per element of the
tokenizer's arrays (~1.9 s), nn.Embedding's init importing torch._dynamo (~1.2 s), importing torch (~1.2 s).

    python -m llama3_triton.benchmarks.startup [--ckpt CKPT] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _script() -> str:
    """The llama3-triton console script of this interpreter's environment (the one a user of it runs)."""
    beside = Path(sys.executable).parent / "llama3-triton"
    found = str(beside) if beside.exists() else shutil.which("llama3-triton")
    if found is None:
        raise SystemExit("error: no llama3-triton console script beside this python or on PATH (pip install -e .)")
    return found


def first_output(cmd: list[str], timeout: float = 600.0) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit) of ``cmd``; a failed command raises."""
    import select

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Wait for the first byte at most ``timeout`` (a command that hangs before printing must not hang this).
        if not select.select([p.stdout], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(cmd, timeout)
        first = p.stdout.read(1)
        t_first = time.perf_counter() - t0
        _, err = p.communicate(timeout=max(timeout - t_first, 1.0))
    except BaseException:
        p.kill()
        p.wait()
        raise
    if p.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {err.decode(errors='replace').strip()[-300:]}")
    return t_first, time.perf_counter() - t0


def measure(ckpt: str | None, repeats: int) -> dict:
    script = _script()
    ck = ["--ckpt", ckpt] if ckpt else []
    info = [script, "info", *ck]
    gen = [script, "generate", *ck, "--max-new-tokens", "8", "--temperature", "0"]
    runs: dict[str, list[float]] = {"info": [], "generate_first_output": [], "generate_exit": []}
    for _ in range(repeats):
        runs["info"].append(first_output(info)[1])
        first, done = first_output(gen)
        runs["generate_first_output"].append(first)
        runs["generate_exit"].append(done)
    summary = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs_s": v} for k, v in
               runs.items()}  # fmt: skip
    return {"commands": {"info": " ".join(info[1:]), "generate": " ".join(gen[1:])}, "repeats": repeats,
            "results": summary}  # fmt: skip


def markdown(rec: dict) -> str:
    rows = [
        f"# Start-up ({rec['machine']}, {rec['threads']})",
        "",
        "| what | median | min | max |",
        "|---|---|---|---|",
    ]
    for k, v in rec["results"].items():
        rows.append(f"| {k.replace('_', ' ')} | {v['median_s']:.2f} s | {v['min_s']:.2f} s | {v['max_s']:.2f} s |")
    rows += ["", f"`llama3-triton {rec['commands']['info']}`; `llama3-triton {rec['commands']['generate']}`; "
             f"{rec['repeats']} runs each."]  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from llama3_triton.benchmarks.common import _cpu_name, save_record

    ap = argparse.ArgumentParser(prog="python -m llama3_triton.benchmarks.startup", description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="the checkpoint (default: the default model, as a first run uses)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    ap.add_argument("--out", type=Path, help="write startup.json and startup.md into this folder")
    args = ap.parse_args(argv)
    if not 1 <= args.repeats <= 100:
        ap.error(f"--repeats must be in [1, 100], got {args.repeats}")
    rec = measure(args.ckpt, args.repeats)
    rec["machine"] = f"{_cpu_name()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    rec["threads"] = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    md = markdown(rec)
    print(md)
    save_record(rec, md, args.out, "startup")
    return 0


if __name__ == "__main__":
    sys.exit(main())
