"""The benchmark runner: ``python -m benchmarks`` (or ``llama3-triton bench``).

One run, in this order, each section's figures written as soon as it ends (an interrupted run keeps them):
  1. ceilings  the device's copy bandwidth and bf16 matrix-product rate, measured now (``common``);
  2. kernels   each Triton kernel against its peers over Llama-3 8B/70B shapes (``rmsnorm``, ``rope``,
               ``swiglu``, ``attention``, ``decode``);
  3. e2e       decode and prefill tokens/s of 1B/3B/8B-shaped models against the bandwidth floor (``e2e``);
  4. cpu       CPU decode of the torch backend against transformers' generate (``cpu``).
Output: results.json, results.md and plots/ in --out (default benchmarks/results/<device>-<date> on a GPU;
smoke runs, and so every CPU run, go to ~/.cache/llama3-triton/bench/smoke-<device>-<date>).

Modes: the default sweep (every size, every peer, all three models: ~15-25 minutes on an H100, compiles
included); --quick (the sizes the goals are judged at, the torch.compile peer of the end-to-end step for one
model at batch 1, 8B when the budget allows, else the smallest: what `make gpu-check` runs inside its 10-minute
device call, with --time-budget as a backstop);
--smoke (tiny shapes; automatic without a GPU, where the kernels run in Triton's interpreter and
torch.compile uses its "eager" backend, tracing without code generation, since a cold inductor compile
takes ~30 s on a 2-core CI machine). A failing implementation, case, model or section is recorded with its
error and the run goes on; the exit status is non-zero only when the runner itself cannot run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from datetime import date, datetime, timezone
from pathlib import Path

from benchmarks.common import (
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

SECTIONS = ("kernels", "e2e", "cpu", "tp")
KERNELS = ("rms_norm", "add_rms_norm", "rope", "swiglu", "attention", "decode_attention", "gemv", "quant")
OPT_IN_KERNELS = ("gemv_configs",)  # tuning data, run only when named with --kernel
MODEL_CHOICES = ("1B", "3B", "8B")
# 8B first: it carries the headline goal, so a tight time budget drops a smaller model rather than it.
DEFAULT_MODELS = ("8B", "1B", "3B")
# Shares of the remaining time budget a section may use when it starts (only with --time-budget).
SECTION_SHARE = {"kernels": 0.35, "e2e": 0.40, "cpu": 0.10, "tp": 0.15}


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
        "one model (8B when the time budget allows, else the smallest); fits `make gpu-check`'s 10-minute device call",
    )
    p.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable, run in the order given; default: all of kernels, e2e, cpu, tp; "
        "tp needs 2+ GPUs)",
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
        help="results folder (default: benchmarks/results/<device>-<date> on a GPU; a smoke run, as every run on "
        "a CPU is, goes to ~/.cache/llama3-triton/bench/smoke-<device>-<date>, outside the source tree)",
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
        prog="python -m benchmarks",
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
    path = Path(sys.argv[0])
    head = f"python -m {path.parent.name}" if path.name == "__main__.py" else path.name
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks described by the parsed ``args``; returns the exit status."""
    started = time.monotonic()
    smoke = prepare_environment(args.smoke)  # before any kernel module is imported
    import torch

    from benchmarks import cpu, e2e, tp
    from benchmarks.report import list_problems, write_results

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
    if smoke:  # the interpreter takes ~0.1 s a call: two timed calls show the code path works
        ctx.cpu_min_reps, ctx.cpu_min_seconds = 2, 0.05
        ctx.warmup_ms, ctx.rep_ms = 5, 20
    deadline = None if args.time_budget is None else started + args.time_budget
    # --only's order is the run's order (make gpu-check puts e2e, the headline decode goal, first).
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
        "tp": {},
        "errors": [],
    }
    if banner:
        ctx.log(f"*** {banner} ***")
    ctx.log(f"benchmarks on {device['name']} ({ctx.mode} run), results -> {out}")

    section = "ceilings"
    try:
        results["ceilings"] = measure_ceilings(ctx)
        ctx.ceilings = {k: results["ceilings"][k] for k in ("copy_gbps", "matmul_tflops") if k in results["ceilings"]}
        ctx.log(
            "ceilings: copy "
            + (f"{ctx.ceilings['copy_gbps']:.0f} GB/s" if "copy_gbps" in ctx.ceilings else "failed")
            + ", read "
            + (f"{results['ceilings']['read_gbps']:.0f} GB/s" if "read_gbps" in results["ceilings"] else "failed")
            + ", matmul "
            + (f"{ctx.ceilings['matmul_tflops']:.1f} TFLOP/s" if "matmul_tflops" in ctx.ceilings else "failed")
        )
        write_results(results, out, plots=False)
        for i, section in enumerate(sections):
            if deadline is not None:
                left = deadline - time.monotonic()
                share = SECTION_SHARE[section] / sum(SECTION_SHARE[s] for s in sections[i:])
                ctx.deadline = time.monotonic() + max(left, 0) * share
            try:
                if section == "kernels":
                    results["kernels"] = run_kernels(ctx, args.kernel or list(KERNELS))
                elif section == "e2e":
                    results["e2e"] = e2e.run(ctx, models)
                elif section == "tp":
                    results["tp"] = tp.run(ctx, models)
                else:
                    results["cpu"] = cpu.run(ctx)
            except Exception as e:
                if ctx.debug:
                    traceback.print_exc()
                results["errors"].append({"section": section, "error": describe(e)})
                ctx.log(f"section {section} failed: {describe(e)}")
            write_results(results, out, plots=False)
    except KeyboardInterrupt:
        results["errors"].append({"section": section, "error": "interrupted"})
        results["wall_s"] = time.monotonic() - started
        write_results(results, out, plots=not args.no_plots)
        ctx.log(f"interrupted during {section}; partial results in {out}")
        return 130
    results["wall_s"] = time.monotonic() - started
    write_results(results, out, plots=not args.no_plots)
    print_summary(results, out, list_problems(results))
    return 0


def run_kernels(ctx: Context, names: list[str]) -> list[dict]:
    from benchmarks import attention, decode, gemv, gemv_configs, quant, rmsnorm, rope, swiglu

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
    return run_cases(cases, ctx, "kernels")


def print_summary(results: dict, out: Path, problems: list[str]) -> None:
    """The short table printed last: ceilings, goals, end-to-end headline, where the files are."""
    from benchmarks.report import summary_text

    print(summary_text(results, out, problems), flush=True)


if __name__ == "__main__":
    sys.exit(main())
