"""The GPU check and the runner under a budget: the headline comes first, and a run cut at any moment (the budget,
SIGINT, SIGTERM) leaves a valid results.json holding every row that finished.

Rehearsed here on the CPU (the runner's smoke mode, the kernels in the interpreter); the same code runs on a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama3_triton.benchmarks import e2e, gpu_check
from llama3_triton.benchmarks.common import Context
from llama3_triton.benchmarks.report import write_results

ROOT = Path(__file__).resolve().parents[2]


def test_the_plan_puts_the_8b_goal_rows_before_any_test():
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--plan"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert [s["name"] for s in plan] == ["headline", "tests", "rest"]
    headline, tests, rest = plan
    assert headline["cmd"][1:3] == ["-m", "llama3_triton.benchmarks"] and "--only" in headline["cmd"]
    assert headline["cmd"][headline["cmd"].index("--only") + 1] == "headline"
    assert headline["cmd"][headline["cmd"].index("--models") + 1].split(",")[0] == "8B"  # the goal model first
    assert headline["limit"] <= 240  # inside the first four minutes, whatever the budget
    assert "--continue-on-collection-errors" in tests["cmd"]
    # cheap and important first: the sampler's GPU tests, RMSNorm, SwiGLU and SmolLM2 before the compile-heavy ones
    files = [a for a in tests["cmd"] if a.startswith("tests/")]
    assert [Path(f).name for f in files[:4]] == ["test_sampling.py", "test_rmsnorm.py", "test_swiglu.py",
                                                 "test_gguf.py"]  # fmt: skip
    assert all((ROOT / f).is_file() for f in files), files  # every file the check names exists
    assert "--resume" in rest["cmd"]
    sections = [rest["cmd"][i + 1] for i, a in enumerate(rest["cmd"]) if a == "--only"]
    assert sections == ["e2e", "serving", "kernels"]  # the kernels' compile peers last, in the time left


def test_the_runner_runs_the_headline_first_by_default():
    from llama3_triton.benchmarks.runner import SECTIONS

    assert SECTIONS[0] == "headline"


class _Budget(Context):
    """A Context whose budget is spent from the moment ``spent`` is set: a cut at a chosen point of a section."""

    spent = False

    def over_budget(self) -> bool:
        return self.spent

    def time_left(self) -> float:
        return 0.0 if self.spent else 1e9


@pytest.mark.slow  # the tiny model's headline rows in the interpreter: ~15 s
def test_a_budget_cut_mid_section_leaves_the_finished_rows_on_disk(tmp_path):
    ctx = _Budget(device=torch.device("cpu"), dtype=torch.float32, smoke=True, compile_peers=False)
    ctx.cpu_min_reps, ctx.cpu_min_seconds, ctx.warmup_ms, ctx.rep_ms = 2, 0.0, 1, 1
    ctx.ceilings = {"read_gbps": 10.0, "copy_gbps": 8.0}
    results = {"smoke": True, "e2e": {}, "kernels": [], "ceilings": {}}
    seen: list[int] = []

    def save():
        write_results(results, tmp_path, plots=False)
        on_disk = json.loads((tmp_path / "results.json").read_text())  # valid JSON after every save
        seen.append(sum("tokens_per_s" in r for m in on_disk["e2e"].get("models", []) for r in m.get("decode", [])))
        ctx.spent = seen[-1] >= 1  # the budget runs out as the first row is saved

    ctx.saver = save
    e2e.run(ctx, ["tiny"], results["e2e"], ("headline",))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    rows = on_disk["e2e"]["models"][0]["decode"]
    measured = [r for r in rows if "tokens_per_s" in r]
    assert [(r["impl"], r["batch"]) for r in measured] == [("triton", 1)]  # the first goal row, then the cut
    assert measured[0]["floor_bandwidth"] == "read" and measured[0]["floor_tokens_per_s"] > 0
    assert measured[0]["floor_tokens_per_s_copy"] < measured[0]["floor_tokens_per_s"]  # the copy floor beside it
    cut = [r for r in rows if "skipped" in r]
    assert cut and all(r["skipped"] == "time budget spent" for r in cut)
    assert {r["impl"] for r in cut} == {"triton_int8", "triton_int4"}
    assert seen[0] == 0 and 1 in seen and seen == sorted(seen)  # saved before, during and after: never lost


@pytest.mark.slow  # a smoke run of the runner until its first row, then SIGTERM: ~20 s
def test_sigterm_mid_run_keeps_what_was_measured_and_says_what_was_cut(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama3_triton.benchmarks", "--smoke", "--no-progress", "--no-plots", "--only",
         "headline", "--only", "e2e", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = json.loads((out / "results.json").read_text())
            except (OSError, ValueError):
                r = {}
            rows = [x for m in r.get("e2e", {}).get("models", []) for x in m.get("decode", [])]
            if any("tokens_per_s" in x for x in rows):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before a row could be cut"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["cut"]["why"] == "SIGTERM" and r["cut"]["line"] in err
    rows = [x for m in r["e2e"]["models"] for x in m["decode"]]
    assert any("tokens_per_s" in x for x in rows)
    assert (out / "results.md").read_text().count("Partial run: cut by SIGTERM") == 1


def _fake_stages(budget):
    py = sys.executable
    return [
        {"name": "headline", "limit": 30, "floor": 1, "log": "bench.log", "cmd": [py, "-c", "print('goal rows')"]},
        {"name": "tests", "limit": 2, "floor": 1, "log": "pytest.log",
         "cmd": [py, "-c", "import time; print('1 passed in 0.1s', flush=True); time.sleep(60)"]},
        {"name": "rest", "limit": None, "floor": 1000, "log": "bench.log", "cmd": [py, "-c", "print('rest')"]},
    ]  # fmt: skip


def test_each_stage_is_cut_at_its_limit_and_the_summary_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "stages", _fake_stages)
    monkeypatch.setattr(gpu_check, "install_wheels", lambda check: ["MISSING WHEEL gguf (no module gguf): x"])
    check = gpu_check.Check(tmp_path, budget=600)
    t0 = time.monotonic()
    rc = gpu_check.run(check)
    assert time.monotonic() - t0 < 60  # the sleeping stage was cut at its 2 s, not left to run
    assert rc == 1
    assert check.status["headline"].startswith("ok")
    assert check.status["tests"].startswith("cut at its time limit")
    assert check.status["rest"].startswith("not run")  # its floor is more than the budget leaves
    device = (tmp_path / "device.txt").read_text()
    assert device.startswith("MISSING WHEEL gguf")  # the loud line comes first
    assert "goal rows" in (tmp_path / "bench.log").read_text()
    summary = (tmp_path / "summary.txt").read_text()
    assert "MISSING WHEEL gguf" in summary and "tests: cut at its time limit" in summary
    assert "tests: 1 passed in 0.1s" in summary


def _case(calls: list[str]):
    from llama3_triton.benchmarks.common import Case

    def setup():
        x = torch.arange(6.0)
        calls.append("setup")
        return {"torch_eager": lambda: x * 2, "triton": lambda: x * 2, "torch_compile": lambda: x * 2 + 1e-3}

    return Case(kernel="k", model="m", label="T=6", size=6, size_name="tokens", shape={}, bytes=48, flops=0,
                bound="memory", setup=setup)  # fmt: skip


def test_quick_runs_time_every_case_before_any_torch_compile_peer():
    """--quick on a GPU: the kernels' torch.compile peers (a cold inductor compile each) wait for a second pass over
    the finished cases, run in the time the budget leaves; their figures land in the same records."""
    from llama3_triton.benchmarks.common import run_cases

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, smoke=True, compile_peers_last=True)
    ctx.cpu_min_reps, ctx.cpu_min_seconds = 2, 0.0
    saves: list[list[str]] = []
    records: list[dict] = []
    ctx.saver = lambda: saves.append([",".join(sorted(r["results"])) for r in records])
    calls: list[str] = []
    run_cases([_case(calls), _case(calls)], ctx, "kernels", records)
    assert calls == ["setup"] * 4  # each case set up once per pass
    for rec in records:
        peer = rec["results"]["torch_compile"]
        assert peer["median_ms"] > 0 and abs(peer["max_abs_diff_vs_torch_eager"] - 1e-3) < 1e-6
        assert "median_ms" in rec["results"]["triton"]
    assert len(saves) == 4  # after each case, then after each peer: a cut keeps the cases' own figures

    # The budget runs out before the second pass: the case keeps its figures, the peer says why it has none.
    records = []
    ctx2 = _Budget(device=torch.device("cpu"), dtype=torch.float32, smoke=True, compile_peers_last=True)
    ctx2.cpu_min_reps, ctx2.cpu_min_seconds = 2, 0.0
    ctx2.saver = lambda: setattr(ctx2, "spent", True)  # spent once the first case is saved
    run_cases([_case([])], ctx2, "kernels", records)
    assert "median_ms" in records[0]["results"]["triton"]
    assert records[0]["results"]["torch_compile"] == {
        "skipped": "time budget spent (torch.compile peers run last in --quick)"
    }
