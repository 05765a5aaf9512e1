"""The benchmark runner: ``python -m llama3_triton.benchmarks`` (or ``llama3-triton bench``).

One run, in this order, every row or case written to results.json and results.md as soon as it is measured (a
run cut at any moment, by --time-budget, SIGINT or SIGTERM, keeps them and records what was cut):
  0. ceilings  the device's copy and read bandwidth and bf16 matrix-product rate, measured now (``common``);
  1. headline  the end-to-end goal rows: 8B (then 1B, 3B) batch-1 decode through the fused Triton step at the goal
               contexts, then with int8 and int4 products (``e2e``'s first pass);
  2. kernels   each Triton kernel against its peers over Llama-3 8B/70B shapes (``rmsnorm``, ``rope``,
               ``swiglu``, ``attention``, ``decode``, ``gemv``, ``quant``);
  3. e2e       the rest of the end-to-end figures: peers, batch 8, the profile, torch.compile, generation,
               prefill (``e2e``'s second pass);
  4. cpu       CPU decode of the torch backend against transformers' generate, and quantized (``cpu``);
  5. serving   the engine's throughput against static batches and one request at a time (``serving``);
  6. speculative  prompt lookup and a draft model against plain decoding (``speculative``); then tp.
Output: results.json, results.md and plots/ in --out (default ~/.cache/llama3-triton/bench/<device>-<date>, or
smoke-<device>-<date> for a smoke run, as every CPU run is; never the package's folder).

Modes: the default sweep (every size, every peer, all three models: ~15-25 minutes on an H100, compiles
included); --quick (the sizes the goals are judged at, the torch.compile peer of the end-to-end step for one
model at batch 1, 8B when the budget allows, else the smallest; the kernels' torch.compile peers last, in the
time left: what benchmarks/gpu_check.py runs, with --time-budget);
--smoke (tiny shapes; automatic without a GPU, where the kernels run in Triton's interpreter and
torch.compile uses its "eager" backend, tracing without code generation, since a cold inductor compile
takes ~30 s on a 2-core CI machine). A failing implementation, case, model or section is recorded with its
error and the run goes on; the exit status is non-zero only when the runner itself cannot run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
import traceback
from datetime import date, datetime, timezone
from pathlib import Path

from llama3_triton.benchmarks.common import (
    CPU_BANNER,
    GPU_SMOKE_BANNER,
    QUANTILES,
    UNITS,
    Context,
    default_out_dir,
    describe,
    environment_info,
    measure_ceilings,
    prepare_environment,
    run_cases,
)

# headline first in every run: the end-to-end goal rows (e2e.py's first pass), then the kernels, then the rest of
# the end-to-end figures (its second pass), CPU decode and tensor parallel.
SECTIONS = ("headline", "kernels", "e2e", "cpu", "serving", "speculative", "tp")
KERNELS = ("rms_norm", "add_rms_norm", "rope", "swiglu", "attention", "decode_attention", "gemv", "quant")
OPT_IN_KERNELS = ("gemv_configs",)  # tuning data, run only when named with --kernel
MODEL_CHOICES = ("1B", "3B", "8B")
# 8B first: it carries the headline goal, so a tight time budget drops a smaller model rather than it.
DEFAULT_MODELS = ("8B", "1B", "3B")
# Shares of the remaining time budget a section may use when it starts (only with --time-budget).
SECTION_SHARE = {
    "headline": 0.25, "kernels": 0.25, "e2e": 0.25, "cpu": 0.05, "serving": 0.05, "speculative": 0.05, "tp": 0.15,
}  # fmt: skip


def _models(text: str) -> list[str]:
    names = [m.strip().upper() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in MODEL_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list from {','.join(MODEL_CHOICES)}, got {text!r}"
        )
    return list(dict.fromkeys(names))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The runner's options (shared with ``llama3-triton bench``, which adds its own --debug)."""
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, a few calls each: exercises every code path (automatic without a GPU)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer sizes (those the goals are judged at) and the torch.compile peer of the end-to-end step for "
        "one model (8B when the time budget allows, else the smallest); the kernels' torch.compile peers last",
    )
    p.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable, run in the order given; default: all of headline, kernels, e2e, "
        "cpu, serving, speculative, tp; headline is the end-to-end goal rows, e2e the rest of the end-to-end "
        "figures; tp needs 2+ GPUs)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="add to the results.json already in --out (same device) instead of starting anew: its ceilings are "
        "kept, its end-to-end rows are not measured again (benchmarks/gpu_check.py runs the headline, the tests, "
        "then the rest this way)",
    )
    p.add_argument(
        "--kernel",
        choices=KERNELS + OPT_IN_KERNELS,
        action="append",
        help="with the kernels section: only this kernel (repeatable); gemv_configs (GEMV tile configurations, "
        "for tuning) runs only when named",
    )
    p.add_argument(
        "--models",
        type=_models,
        help="end-to-end model shapes, comma-separated from 1B,3B,8B (default: all; 8B needs 16 GB of scratch "
        "space and host RAM; smoke runs use a tiny model instead)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="results folder (default: ~/.cache/llama3-triton/bench/<device>-<date>, or smoke-<device>-<date> for a "
        "smoke run, as every run on a CPU is; never the package's folder: pass --out benchmarks/results/... to "
        "keep a GPU run for committing)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="start no new work after this many seconds; what is left is recorded as skipped",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peers (the slowest part)")
    p.add_argument(
        "--compile-backend",
        choices=["inductor", "eager"],
        help="torch.compile backend of the compiled peers (default: inductor; eager in smoke runs)",
    )
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="time the kernels' plain calls instead of CUDA-graph replays of them (adds launch and host overhead)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("LLAMA3_TRITON_BENCH_PROG", "python -m llama3_triton.benchmarks"),
        description="Benchmark the Triton kernels and the end-to-end model against the device's measured "
        "ceilings and against torch eager, torch.compile and SDPA; write JSON, Markdown and plots.",
    )
    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks (of failing implementations too)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for people; the traceback with --debug
        if args.debug:
            raise
        print(f"error: {describe(e)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _command() -> str:
    """The command line that started this run, as a user would type it again."""
    path = Path(sys.argv[0])
    if path.parent.name == "benchmarks" and path.suffix == ".py":  # python -m llama3_triton.benchmarks[.module]
        head = "python -m llama3_triton.benchmarks" + ("" if path.name == "__main__.py" else f".{path.stem}")
    else:
        head = path.name
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks described by the parsed ``args``; returns the exit status."""
    started = time.monotonic()
    smoke = prepare_environment(args.smoke)  # before any kernel module is imported
    import torch

    from llama3_triton.benchmarks import cpu, e2e, serving, speculative, tp
    from llama3_triton.benchmarks.report import list_problems, write_results

    cuda = torch.cuda.is_available()
    if smoke and not cuda:
        # Tiny shapes gain nothing from threads, and waking the pool can dominate: on a 2-core CI machine a
        # tiny reference attention took 48 ms with 2 threads and 0.1 ms with 1.
        torch.set_num_threads(1)
    ctx = Context(
        device=torch.device("cuda" if cuda else "cpu"),
        dtype=torch.bfloat16 if cuda else torch.float32,
        smoke=smoke,
        quick=args.quick and not smoke,
        use_cuda_graph=not args.no_cuda_graph,
        compile_peers=not args.no_compile,
        compile_backend=args.compile_backend or ("eager" if smoke else "inductor"),
        progress=not args.no_progress and sys.stderr.isatty(),
        debug=getattr(args, "debug", False),
    )
    if ctx.quick:
        ctx.rep_ms = 60
        ctx.compile_peers_last = True
    if smoke:  # the interpreter takes 0.1-2 s a call: a warm-up and one timed call show the code path works
        ctx.cpu_min_reps, ctx.cpu_min_seconds = 1, 0.05
        ctx.warmup_ms, ctx.rep_ms = 5, 20
    deadline = None if args.time_budget is None else started + args.time_budget
    # --only's order is the run's order; the default starts with the headline (the end-to-end goal rows).
    sections = list(dict.fromkeys(args.only)) if args.only else list(SECTIONS)
    models = ["tiny"] if smoke else (args.models or list(DEFAULT_MODELS))
    out = args.out or default_out_dir(ctx)
    device, versions = environment_info(ctx)
    banner = CPU_BANNER if not cuda else GPU_SMOKE_BANNER if smoke else None
    timing = (
        "triton.testing.do_bench (CUDA events, L2 flushed before each call, warm-up outside the timing), "
        "median and 20th/80th percentiles; kernels timed as CUDA-graph replays of one call"
        if cuda
        else "time.perf_counter around single calls (CPU; Triton kernels in the interpreter)"
    )
    results: dict = {
        "schema": 1,
        "banner": banner,
        "smoke": smoke,
        "mode": ctx.mode,
        "date": date.today().isoformat(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "device": device,
        "versions": versions,
        "timing": timing,
        "quantiles": list(QUANTILES),
        "units": UNITS,
        "settings": {
            "sections": sections,
            "kernels": args.kernel or list(KERNELS),
            "models": models,
            "dtype": str(ctx.dtype).removeprefix("torch."),
            "cuda_graph": ctx.use_cuda_graph,
            "compile_peers": ctx.compile_peers,
            "compile_backend": ctx.compile_backend,
            "time_budget_s": args.time_budget,
        },
        "ceilings": {},
        "kernels": [],
        "e2e": {},
        "cpu": {},
        "serving": {},
        "speculative": {},
        "tp": {},
        "errors": [],
    }
    if args.resume:
        _resume(results, out, device)
    if banner:
        ctx.log(f"*** {banner} ***")
    ctx.log(f"benchmarks on {device['name']} ({ctx.mode} run), results -> {out}")

    def save() -> None:
        write_results(results, out, plots=False)

    ctx.saver = save
    section = "ceilings"
    started_sections: list[str] = []
    # SIGTERM (a job scheduler, `timeout`'s default) ends the run the way Ctrl-C does: with what was measured.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        if not results["ceilings"]:
            results["ceilings"] = measure_ceilings(ctx)
        ctx.ceilings = {
            k: results["ceilings"][k] for k in ("copy_gbps", "read_gbps", "matmul_tflops") if k in results["ceilings"]
        }
        ctx.log(
            "ceilings: copy "
            + (f"{ctx.ceilings['copy_gbps']:.0f} GB/s" if "copy_gbps" in ctx.ceilings else "failed")
            + ", read "
            + (f"{ctx.ceilings['read_gbps']:.0f} GB/s" if "read_gbps" in ctx.ceilings else "failed")
            + ", matmul "
            + (f"{ctx.ceilings['matmul_tflops']:.1f} TFLOP/s" if "matmul_tflops" in ctx.ceilings else "failed")
            + (" (kept from the results resumed)" if args.resume and results.get("resumed") else "")
        )
        save()
        for i, section in enumerate(sections):
            started_sections.append(section)
            if deadline is not None:
                left = deadline - time.monotonic()
                share = SECTION_SHARE[section] / sum(SECTION_SHARE[s] for s in sections[i:])
                ctx.deadline = time.monotonic() + max(left, 0) * share
            try:
                if section == "kernels":
                    run_kernels(ctx, args.kernel or list(KERNELS), results["kernels"])
                elif section in ("headline", "e2e"):
                    # headline: each model's goal rows; e2e: the rest (and the goal rows too when no headline ran).
                    parts = ("headline",) if section == "headline" else ("rest",)
                    e2e.run(ctx, models, results["e2e"], parts)
                elif section == "tp":
                    results["tp"] = tp.run(ctx, models)
                elif section == "serving":
                    results["serving"] = serving.run(ctx)
                elif section == "speculative":
                    results["speculative"] = speculative.run(ctx)
                else:
                    results["cpu"] = cpu.run(ctx)
            except Exception as e:
                if ctx.debug:
                    traceback.print_exc()
                results["errors"].append({"section": section, "error": describe(e)})
                ctx.log(f"section {section} failed: {describe(e)}")
            save()
    except KeyboardInterrupt as e:
        why = "SIGTERM" if isinstance(e, _Terminated) else "interrupted (SIGINT)"
        results["errors"].append({"section": section, "error": why})
        _mark_cut(results, why, section, [s for s in sections if s not in started_sections])
        results["wall_s"] = time.monotonic() - started
        write_results(results, out, plots=not args.no_plots)
        ctx.log(f"{results['cut']['line']}; what was measured is in {out}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if deadline is not None and time.monotonic() >= deadline:
        _mark_cut(results, "time budget spent", section, [])
    results["wall_s"] = time.monotonic() - started
    write_results(results, out, plots=not args.no_plots)
    print_summary(results, out, list_problems(results))
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it ends as Ctrl-C does: results written, a line saying what was cut."""


def _terminated(signum, frame) -> None:
    raise _Terminated()


def _budget_skips(results: dict) -> int:
    """How many rows and cases of ``results`` were skipped because the time budget was spent."""
    n = sum(1 for c in results.get("kernels", []) if "time budget" in str(c.get("skipped", "")))
    for m in results.get("e2e", {}).get("models", []):
        for key in ("decode", "generate", "prefill"):
            n += sum(1 for r in m.get(key, []) if "time budget" in str(r.get("skipped", "")))
        n += sum(1 for why in m.get("skipped_parts", {}).values() if "time budget" in why)
    return n


def _mark_cut(results: dict, why: str, section: str, not_started: list[str]) -> None:
    """Record that the run ended early: ``results["cut"]``, with the one line the summary shows."""
    skipped = _budget_skips(results)
    line = f"cut by {why} during {section}"
    if not_started:
        line += f"; not started: {', '.join(not_started)}"
    if skipped:
        line += f"; {skipped} rows or cases skipped for the time budget"
    results["cut"] = {"why": why, "section": section, "not_started": not_started, "line": line}


def _resume(results: dict, out: Path, device: dict) -> None:
    """Take the sections already measured in ``out``/results.json into ``results`` (same device only)."""
    import json

    path = out / "results.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"--resume: {path} cannot be read ({describe(e)}); remove it or use another --out") from e
    if old.get("device", {}).get("name") != device.get("name"):
        raise RuntimeError(
            f"--resume: {path} was measured on {old.get('device', {}).get('name')!r}, not on {device.get('name')!r}"
        )
    for key in ("ceilings", "kernels", "e2e", "cpu", "serving", "speculative", "tp", "errors"):
        if old.get(key):
            results[key] = old[key]
    results["resumed"] = {"from": old.get("command"), "created": old.get("created")}
    results["settings"]["sections"] = list(dict.fromkeys(old.get("settings", {}).get("sections", [])
                                                         + results["settings"]["sections"]))  # fmt: skip


def run_kernels(ctx: Context, names: list[str], records: list[dict] | None = None) -> list[dict]:
    from llama3_triton.benchmarks import attention, decode, gemv, gemv_configs, quant, rmsnorm, rope, swiglu

    cases = []
    for name in KERNELS + OPT_IN_KERNELS:  # a fixed order, whatever the order on the command line
        if name not in names:
            continue
        if name in rmsnorm.KERNELS:
            cases += rmsnorm.cases(ctx, (name,))
        elif name == "rope":
            cases += rope.cases(ctx)
        elif name == "swiglu":
            cases += swiglu.cases(ctx)
        elif name == "attention":
            cases += attention.cases(ctx)
        elif name == "gemv":
            cases += gemv.cases(ctx)
        elif name == "quant":
            cases += quant.cases(ctx)
        elif name == "gemv_configs":
            cases += gemv_configs.cases(ctx)
        else:
            cases += decode.cases(ctx)
    return run_cases(cases, ctx, "kernels", records)


def print_summary(results: dict, out: Path, problems: list[str]) -> None:
    """The short table printed last: ceilings, goals, end-to-end headline, where the files are."""
    from llama3_triton.benchmarks.report import summary_text

    print(summary_text(results, out, problems), flush=True)


if __name__ == "__main__":
    sys.exit(main())
