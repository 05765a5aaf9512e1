"""What every benchmark shares: the run context, the timer, the device's ceilings, and the case runner.

Timing on a GPU is ``triton.testing.do_bench(call, quantiles=[0.5, 0.2, 0.8])``: CUDA events around each
call, the L2 cache flushed before each one (do_bench zeroes a 256 MB buffer between calls), so an input
that would fit in L2 (the 8B decode attention's 32 MiB KV cache at 8k does) is still read from DRAM. The
first call (compilation, autotuning, allocator growth) happens before the timing. Where the op can be
captured, ``call`` is the replay of a CUDA graph holding one call of it: that is how the decode step runs
the kernels, and it removes the Python and launch overhead, including the launchers' host-side argument
checks (a device sync each for rope and decode attention, skipped under capture) that would otherwise
dominate every op under ~50 us. Where capture fails the plain call is timed, and the record says which.

On a CPU (the smoke run) the timer is ``time.perf_counter`` around a few calls: the same code paths, no
meaningful figures.

Each result carries the time (median, 20th and 80th percentiles, in ms), the bytes the op must move (each
input read once, each output written once) as GB/s, or its FLOPs as TFLOP/s, and that rate as a fraction
of the ceiling measured in the same run: the copy bandwidth for memory-bound ops, the bf16 matrix-product
rate for compute-bound ones.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

CPU_BANNER = "CPU smoke run: these figures are not GPU performance"
GPU_SMOKE_BANNER = "Smoke run on tiny shapes: these figures are not representative GPU performance"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)
REFERENCE_IMPL = "torch_eager"  # every other implementation's output is compared with this one's

UNITS = {
    "median_ms": "milliseconds (median of the timed calls)",
    "p20_ms": "milliseconds (20th percentile)",
    "p80_ms": "milliseconds (80th percentile)",
    "bytes": "bytes the op must move: each input read once, each output written once",
    "flops": "floating-point operations the op must do (causal attention: only the unmasked half)",
    "gbps": "1e9 bytes per second (bytes / median time)",
    "tflops": "1e12 FLOP per second (flops / median time)",
    "fraction_of_ceiling": "gbps / copy ceiling for memory-bound ops, tflops / matmul ceiling for compute-bound ones",
    "tokens_per_s": "tokens per second (decode: batch / step time; prefill: prompt tokens / prefill time)",
    "floor_tokens_per_s": "the most tokens/s the measured copy bandwidth allows for the bytes a step must read",
    "peak_memory_bytes": "torch.cuda.max_memory_allocated over the model's load and benchmarks",
    "max_abs_diff_vs_torch_eager": "largest |output - torch eager output| on the same inputs (a sanity check)",
    "max_abs_output": "largest |torch eager output|: the scale of those differences",
}

# Llama-3 shapes the kernels are timed at (head dim 128, 8 kv heads). The FFN width is Meta's:
# 8B 4096 * 8/3 * 1.3 rounded to 1024 = 14336; 70B 8192 * 8/3 * 1.3 rounded to 4096 = 28672.
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "8B": {"dim": 4096, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128, "hidden": 14336},
    "70B": {"dim": 8192, "n_heads": 64, "n_kv_heads": 8, "head_dim": 128, "hidden": 28672},
}
# Smoke shapes: every code path (GQA 2, head dim 64, ragged sizes), each kernel a handful of rows.
TINY_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 256, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64, "hidden": 384},
}

# Sizes swept per kind of op, by mode. "quick" keeps the sizes the goals are judged at (decode-sized and
# prefill-sized rows, attention at 4k-16k, decode attention at 8k) and fits `make gpu-check`'s budget.
SIZES: dict[str, dict[str, list[int]]] = {
    "tokens": {  # rows of the elementwise kernels (B = 1, T tokens)
        "smoke": [1, 5],
        "quick": [1, 4096, 16384],
        "full": [1, 16, 128, 512, 2048, 4096, 8192, 16384],
    },
    "prefill": {  # prompt length of prefill attention
        "smoke": [16, 37],
        "quick": [1024, 4096, 16384],
        "full": [128, 512, 1024, 2048, 4096, 8192, 16384],
    },
    "context": {  # KV-cache length of decode attention
        "smoke": [16, 40],
        "quick": [2048, 8192, 16384],
        "full": [128, 512, 1024, 2048, 4096, 8192, 16384],
    },
    "decode_batch": {"smoke": [1, 2], "quick": [1, 8], "full": [1, 8]},
}


@dataclass(frozen=True)
class Skip:
    """An implementation left out of a case, with the reason (recorded instead of a timing)."""

    reason: str


@dataclass
class Context:
    """Where and how this run measures. Built once by the runner; read by every benchmark."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype of the timed tensors: bf16 on a GPU, fp32 on a CPU
    smoke: bool
    quick: bool = False
    use_cuda_graph: bool = True
    compile_peers: bool = True
    compile_backend: str = "inductor"
    compile_peers_last: bool = False  # kernels: the torch.compile peers in a second pass, in the time left (--quick)
    progress: bool = False
    debug: bool = False
    deadline: float | None = None  # time.monotonic() after which no new work starts
    ceilings: dict[str, float] = field(default_factory=dict)  # copy_gbps, matmul_tflops
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_min_reps: int = 3
    cpu_max_reps: int = 50
    cpu_min_seconds: float = 0.2
    # Called after every measured row or case: the runner writes results.json and results.md there, so a run cut
    # at any moment (budget, SIGINT, SIGTERM, a crash) keeps what it measured. A no-op outside the runner.
    saver: Callable[[], None] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def mode(self) -> str:
        return "smoke" if self.smoke else "quick" if self.quick else "full"

    def sizes(self, kind: str) -> list[int]:
        return SIZES[kind][self.mode]

    def model_shapes(self) -> dict[str, dict[str, int]]:
        return TINY_SHAPES if self.smoke else LLAMA_SHAPES

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def over_budget(self) -> bool:
        return self.time_left() <= 0

    def save(self) -> None:
        if self.saver is not None:
            self.saver()

    def log(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)


# ---- environment ----------------------------------------------------------------------------------------


def prepare_environment(smoke: bool) -> bool:
    """Decide whether this is a smoke run and set Triton up for it, before any kernel module is imported.

    Without a GPU the kernels can only run in Triton's interpreter, which ``@triton.jit`` picks when the
    kernel modules are imported, so TRITON_INTERPRET=1 must be set first; such a run is always a smoke run.
    """
    import torch

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns on every compile until it is set
    quiet_other_libraries()
    if torch.cuda.is_available():
        return smoke
    if os.environ.get("TRITON_INTERPRET") != "1" and any(m in sys.modules for m in _KERNEL_MODULES):
        raise RuntimeError("the Triton kernels were imported before TRITON_INTERPRET=1 was set; run in a new process")
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def bind_hub_kernels() -> None:
    """Let ``import kernels`` mean Hugging Face's package (transformers >= 5.25 imports it), not this checkout's folder.

    This project imports its kernels only as ``llama3_triton.kernels``; but run from a checkout (``python -m pytest``,
    ``python -m llama3_triton.benchmarks``), the checkout's root is on sys.path, and its folder ``kernels/`` would
    answer transformers' ``import kernels``. When Hugging Face's package is installed it is imported here, once,
    with the checkout left out of the search; nothing is patched. Call before importing transformers."""
    import importlib
    import importlib.metadata

    if "kernels" in sys.modules:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # transformers then does not import it either
    checkout = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != checkout]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # a broken install: transformers says so itself
    finally:
        sys.path[:] = saved


def quiet_other_libraries() -> None:
    """Keep the run's output to its own lines: no progress bars or advice from Hugging Face libraries, and no
    torch.compile graph-break or recompile warnings (the peers' figures already say what was compiled)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\._dynamo.*")
    warnings.filterwarnings("ignore", module=r"transformers.*")


_KERNEL_MODULES = tuple(f"llama3_triton.kernels.{m}" for m in ("rmsnorm", "rope", "swiglu", "attention", "decode"))


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(ctx: Context) -> tuple[dict, dict]:
    """(device, versions): what the figures were measured on and with."""
    import numpy
    import torch
    import triton

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "transformers": _dist_version("transformers"),
        "matplotlib": _dist_version("matplotlib"),
        "platform": platform.platform(),
    }
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        device = {
            "type": "cuda",
            "name": p.name,
            "compute_capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_bytes": p.total_memory,
            "l2_cache_bytes": getattr(p, "L2_cache_size", None),
            "driver": _driver_version(),
        }
    else:
        device = {
            "type": "cpu",
            "name": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }
    device["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return device, versions


def device_slug(ctx: Context) -> str:
    import torch

    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def user_results_dir() -> Path:
    """Where runs whose figures are not for committing go: $XDG_CACHE_HOME/llama3-triton/bench (~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3-triton" / "bench"


def default_out_dir(ctx: Context) -> Path:
    """<device>-<date> (a smoke run, as every run on a CPU is: smoke-<device>-<date>) in the user's cache folder,
    never in the package's folder: an installed copy must not write into site-packages. A GPU run whose figures
    are for committing is given ``--out benchmarks/results/<device>-<date>`` (gpu_check.py does so)."""
    stem = f"{device_slug(ctx)}-{date.today().isoformat()}"
    return user_results_dir() / (f"smoke-{stem}" if ctx.smoke else stem)


# ---- small helpers ----------------------------------------------------------------------------------------


def save_record(rec: dict, md: str, out: Path | None, stem: str) -> None:
    """A stand-alone benchmark's record as ``out/stem.json`` and its table as ``out/stem.md``, each written whole
    (nothing when ``out`` is None): how ``--out`` of cpu.py, serving.py and speculative.py commits a result."""
    if out is None:
        return
    import json

    from llama3_triton.model.checkpoints.files import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.json", json.dumps(rec, indent=1))
    write_text(out / f"{stem}.md", md + "\n")


def describe(e: BaseException) -> str:
    """One line for a results file: the exception type and the first line of its message."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    line = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def fmt_time(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_bytes(ctx: Context) -> int:
    """Memory a benchmark may still allocate on ctx.device (free GPU memory, or the host's available RAM)."""
    import torch

    if ctx.cuda:
        return torch.cuda.mem_get_info(ctx.device)[0]
    return host_available_bytes()


def host_available_bytes() -> int:
    """The host's available RAM (MemAvailable), for sizing what the benchmarks write to RAM-backed /dev/shm."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def randn(shape: tuple[int, ...], ctx: Context, seed: int, scale: float = 1.0, dtype: Any = None) -> Any:
    """Fresh random inputs (never zeros: they can run faster than real data), drawn on the device."""
    import torch

    g = torch.Generator(device=ctx.device).manual_seed(seed)
    t = torch.randn(shape, generator=g, device=ctx.device, dtype=torch.float32)
    return (t * scale if scale != 1.0 else t).to(dtype or ctx.dtype)


def element_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def first_tensor(out: Any) -> Any:
    """The tensor an op returned (the first one of a tuple, e.g. rope's q_rot or add_rms_norm's y)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def compiled(fn: Callable, ctx: Context) -> Callable:
    """``torch.compile`` of ``fn`` for one static shape (a new shape recompiles rather than going dynamic).

    Dynamo's recompile limit (8 by default) would silently fall back to eager once a sweep has shown one
    function more shapes than that, so it is raised; ``run_case`` resets dynamo after each case anyway.
    """
    import torch
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(fn, dynamic=False, backend=ctx.compile_backend)


# ---- timing ------------------------------------------------------------------------------------------


def _capture(fn: Callable[[], Any]):
    """A CUDA graph holding one call of ``fn``, warmed up on a side stream first (as PyTorch recommends)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


MIN_SAMPLES = 10  # timed calls per figure at the least (long calls would otherwise get one or two)


def time_call(fn: Callable[[], Any], ctx: Context, graph: bool = True) -> tuple[dict, Any]:
    """Time ``fn`` (no arguments). Returns ({median_ms, p20_ms, p80_ms, method[, note]}, fn's first output)."""
    import numpy as np
    import torch

    if ctx.cuda:
        from triton.testing import do_bench

        out = fn()  # compile, autotune, allocate: outside the timing
        torch.cuda.synchronize()
        call, method, note, g = fn, "triton.testing.do_bench", None, None
        if graph and ctx.use_cuda_graph:
            try:
                g = _capture(fn)
                call, method = g.replay, "triton.testing.do_bench over CUDA-graph replays"
            except Exception as e:
                g = None
                note = f"CUDA graph capture failed ({describe(e)}); plain calls timed"
                torch.cuda.synchronize()
        # do_bench runs rep / (its estimate of one call) calls: for a 50 ms prefill that is one or two, and
        # percentiles of two samples mean nothing. Time a call first and ask for at least MIN_SAMPLES.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        rep = max(ctx.rep_ms, MIN_SAMPLES * start.elapsed_time(end))
        med, p20, p80 = do_bench(call, warmup=ctx.warmup_ms, rep=rep, quantiles=list(QUANTILES))
        del g
        timing = {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80), "method": method}
        if note:
            timing["note"] = note
        return timing, out

    out = fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < ctx.cpu_min_reps or (
        len(times) < ctx.cpu_max_reps and time.perf_counter() - start < ctx.cpu_min_seconds
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = (float(v) for v in np.quantile(times, QUANTILES))
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "method": f"time.perf_counter, {len(times)} calls"}, out


def rates(median_ms: float, n_bytes: int, flops: int, bound: str, ceilings: dict[str, float]) -> dict:
    """GB/s and/or TFLOP/s at ``median_ms``, and the fraction of the ceiling that bounds the op."""
    s = median_ms * 1e-3
    out: dict[str, float] = {}
    if s <= 0:
        return out
    if n_bytes:
        out["gbps"] = n_bytes / s / 1e9
    if flops:
        out["tflops"] = flops / s / 1e12
    value, ceiling = (
        (out.get("gbps"), ceilings.get("copy_gbps"))
        if bound == "memory"
        else (out.get("tflops"), ceilings.get("matmul_tflops"))
    )
    if value and ceiling:
        out["fraction_of_ceiling"] = value / ceiling
    return out


# ---- the ceilings --------------------------------------------------------------------------------------


def measure_ceilings(ctx: Context) -> dict:
    """The device's bandwidth and matrix-product rate, measured now.

    Copy: ``dst.copy_(src)`` of N bytes of random bf16 counts N read + N written (2 GiB on a GPU: far past
    L2, long enough that launch cost vanishes). Read: ``src.sum()`` over the same N bytes, which reads them
    and writes nothing worth counting: a batch-1 decode step mostly reads (weights, the KV cache), so this
    is the bandwidth its floor is closest to; it is reported beside the copy figure, which the fractions use.
    Matmul: a bf16 8192^3 product of random data (zeros run faster), 2 * 8192^3 FLOPs. On a CPU all three are
    small and fp32: figures for the smoke run's fractions only.
    """
    import torch

    if ctx.cuda:
        copy_bytes = (256 << 20) if ctx.smoke else (1 << 30) if ctx.quick else (2 << 30)
        n, mm_dtype = (2048 if ctx.smoke else 8192), torch.bfloat16
    else:
        copy_bytes, n, mm_dtype = 64 << 20, 512, torch.float32
    out: dict[str, Any] = {}
    for name, key, measure in (
        ("copy", "gbps", lambda: _copy_ceiling(ctx, copy_bytes)),
        ("read", "gbps", lambda: _read_ceiling(ctx, copy_bytes)),
        ("matmul", "tflops", lambda: _matmul_ceiling(ctx, n, mm_dtype)),
    ):
        try:
            out[name] = measure()
            out[f"{name}_{key}"] = out[name][key]  # copy_gbps, matmul_tflops: what the fractions divide by
        except Exception as e:
            out[name] = {"error": describe(e)}
        free_memory()
    return out


def _copy_ceiling(ctx: Context, copy_bytes: int) -> dict:
    import torch

    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    t, _ = time_call(lambda: dst.copy_(src), ctx, graph=False)
    gbps = 2 * copy_bytes / (t["median_ms"] * 1e-3) / 1e9
    return {"bytes_per_copy": copy_bytes, "bytes_moved": 2 * copy_bytes, **t, "gbps": gbps}


def _read_ceiling(ctx: Context, read_bytes: int) -> dict:
    import torch

    src = torch.empty(read_bytes // 2, dtype=torch.bfloat16, device=ctx.device).normal_()
    t, _ = time_call(lambda: src.sum(dtype=torch.float32), ctx, graph=False)
    gbps = read_bytes / (t["median_ms"] * 1e-3) / 1e9
    return {"bytes_read": read_bytes, **t, "gbps": gbps}


def _matmul_ceiling(ctx: Context, n: int, dtype: Any) -> dict:
    import torch

    a = torch.randn(n, n, dtype=dtype, device=ctx.device)
    b = torch.randn(n, n, dtype=dtype, device=ctx.device)
    t, _ = time_call(lambda: a @ b, ctx, graph=False)
    tflops = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
    return {"shape": [n, n, n], "dtype": str(dtype).removeprefix("torch."), **t, "tflops": tflops}


# ---- kernel cases ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """One kernel at one shape, and the implementations to time on it.

    ``setup()`` allocates the inputs and returns {implementation name: zero-argument callable (or Skip)}; it
    runs only when the case does, so a sweep never holds more than one case's tensors. The torch eager
    implementation comes first: the others' outputs are compared with it.
    """

    kernel: str
    model: str
    label: str  # e.g. "T=4096" or "B=8 L=8192"
    size: int  # the x axis of the plots: tokens, or KV-cache length
    size_name: str  # "tokens" | "context"
    shape: dict[str, Any]
    bytes: int
    flops: int
    bound: str  # "memory" | "compute"
    setup: Callable[[], dict[str, Any]]


def run_case(case: Case, ctx: Context, skip_compiled: bool = False, only_compiled: dict | None = None) -> dict:
    """Time every implementation of one case; a failing one is recorded as its error, never raised.

    ``skip_compiled``: record the torch.compile peers as left for later instead of timing them. ``only_compiled``
    (a record made that way): time just those peers into it, the reference run once untimed for the comparison."""
    import torch

    if only_compiled is not None:
        return _run_compiled_peers(case, ctx, only_compiled)
    rec: dict[str, Any] = {
        "kernel": case.kernel,
        "model": case.model,
        "label": case.label,
        "size": case.size,
        "size_name": case.size_name,
        "shape": case.shape,
        "bytes": case.bytes,
        "flops": case.flops,
        "bound": case.bound,
        "results": {},
    }
    if ctx.over_budget():
        rec["skipped"] = "time budget spent"
        return rec
    try:
        impls = case.setup()
    except Exception as e:
        if ctx.debug:
            traceback.print_exc()
        rec["error"] = f"setting up the inputs failed: {describe(e)}"
        free_memory()
        return rec
    reference = None
    for name in list(impls):
        fn = impls.pop(name)
        if isinstance(fn, Skip):
            rec["results"][name] = {"skipped": fn.reason}
            continue
        if skip_compiled and name.startswith("torch_compile"):
            rec["results"][name] = {"skipped": _COMPILE_LATER}
            continue
        r, out = _time_impl(case, ctx, fn)
        if "error" in r:
            rec["results"][name] = r
            del fn
            free_memory()
            continue
        if getattr(fn, "note", None):  # e.g. SDPA falling back to repeated k/v
            r["note"] = fn.note
        t_out = first_tensor(out)
        if name == REFERENCE_IMPL:
            reference = t_out
            if t_out is not None:
                r["max_abs_output"] = float(t_out.abs().max())  # the scale the others' differences compare to
        elif reference is not None and t_out is not None:
            if tuple(t_out.shape) == tuple(reference.shape):
                r["max_abs_diff_vs_torch_eager"] = float((t_out.float() - reference.float()).abs().max())
            else:
                r["note_output"] = f"output shape {tuple(t_out.shape)} != torch eager's {tuple(reference.shape)}"
        rec["results"][name] = r
        del fn, out, t_out
    del impls, reference
    if any(n.startswith("torch_compile") for n in rec["results"]):
        torch._dynamo.reset()  # drop this shape's compiled code before the next
    free_memory()
    return rec


def _time_impl(case: Case, ctx: Context, fn: Callable[[], Any]) -> tuple[dict, Any]:
    """One implementation of a case timed: (its timing and rates, its output), or ({"error": ...}, None)."""
    try:
        timing, out = time_call(fn, ctx)
    except Exception as e:
        if ctx.debug:
            traceback.print_exc()
        return {"error": describe(e)}, None
    return {**timing, **rates(timing["median_ms"], case.bytes, case.flops, case.bound, ctx.ceilings)}, out


def _run_compiled_peers(case: Case, ctx: Context, rec: dict) -> dict:
    import torch

    try:
        impls = case.setup()
        reference = first_tensor(impls[REFERENCE_IMPL]())
    except Exception as e:
        for r in rec["results"].values():
            if r.get("skipped") == _COMPILE_LATER:
                r.clear()
                r["error"] = f"setting up the inputs failed: {describe(e)}"
        free_memory()
        return rec
    for name, fn in impls.items():
        if rec["results"].get(name, {}).get("skipped") != _COMPILE_LATER:
            continue
        r, out = _time_impl(case, ctx, fn)
        if "error" in r:
            rec["results"][name] = r
            continue
        t_out = first_tensor(out)
        if reference is not None and t_out is not None and tuple(t_out.shape) == tuple(reference.shape):
            r["max_abs_diff_vs_torch_eager"] = float((t_out.float() - reference.float()).abs().max())
        rec["results"][name] = r
        ctx.log(f"{rec['kernel']} {rec['model']} {rec['label']}: {name} {fmt_time(r['median_ms'])}")
    del impls, reference
    torch._dynamo.reset()
    free_memory()
    return rec


def summarize_case(rec: dict) -> str:
    """One log line for a finished case."""
    head = f"{rec['kernel']} {rec['model']} {rec['label']}:"
    if "skipped" in rec or "error" in rec:
        return f"{head} {rec.get('skipped') or rec.get('error')}"
    parts = []
    for name, r in rec["results"].items():
        if "median_ms" in r:
            rate = f"{r['gbps']:.0f} GB/s" if rec["bound"] == "memory" else f"{r.get('tflops', 0):.1f} TFLOP/s"
            frac = f" ({r['fraction_of_ceiling']:.0%})" if "fraction_of_ceiling" in r else ""
            parts.append(f"{name} {fmt_time(r['median_ms'])} {rate}{frac}")
        else:
            parts.append(f"{name} {'skipped' if 'skipped' in r else 'error'}")
    return f"{head} " + " | ".join(parts)


class Progress:
    """A tqdm bar over a sweep (on a terminal) and one log line per finished item (always, on stderr)."""

    def __init__(self, total: int, desc: str, ctx: Context):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, disable=not ctx.progress, leave=False)

    def step(self, line: str) -> None:
        self._bar.write(line, file=sys.stderr)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def run_cases(cases: list[Case], ctx: Context, desc: str, records: list[dict] | None = None) -> list[dict]:
    """Run ``cases`` in order, each record appended to ``records`` and saved (``ctx.save()``) as soon as it is
    made. In --quick runs on a GPU the torch.compile peers (a cold inductor compile per shape, 10-30 s each) are
    left for a second pass over the finished cases, run only with the time the budget leaves: every case's own
    figures come first."""
    records = [] if records is None else records
    later = ctx.compile_peers_last
    bar = Progress(len(cases), desc, ctx)
    mine: list[tuple[Case, dict]] = []
    try:
        for case in cases:
            rec = run_case(case, ctx, skip_compiled=later)
            records.append(rec)
            mine.append((case, rec))
            ctx.save()
            bar.step(summarize_case(rec))
    finally:
        bar.close()
    if later and ctx.compile_peers:
        for case, rec in mine:
            if "skipped" in rec or "error" in rec:
                continue
            if ctx.over_budget():
                for r in rec["results"].values():
                    if r.get("skipped") == _COMPILE_LATER:
                        r["skipped"] = "time budget spent (torch.compile peers run last in --quick)"
                ctx.save()
                continue
            run_case(case, ctx, only_compiled=rec)
            ctx.save()
    return records


_COMPILE_LATER = "--quick: torch.compile peers run after every case, in the time left"
