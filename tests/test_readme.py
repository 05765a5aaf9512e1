"""The README's Python blocks ("From Python", "Many requests at once") run as written, the way a user runs them: in
a fresh ``python`` process with a clean environment (no TRITON_INTERPRET, nothing from the test run), outside the
repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(after: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_python_block_runs_as_written_in_a_fresh_process(tmp_path):
    code = python_block("## From Python")
    (tmp_path / "block.py").write_text(code)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.splitlines()
    texts = eval(out[0])  # print(out.texts)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # The default model: SmolLM2 (vocabulary 49152) when its wheel is installed, else the tiny Llama-3 (128256).
    shape = re.fullmatch(r"torch\.Size\(\[1, (\d+), (\d+)\]\)", out[1])
    assert shape, out[1]
    T, vocab = int(shape.group(1)), int(shape.group(2))
    assert T >= 5 and vocab in (49152, 128256)
    assert float(out[2].removeprefix("tensor(").split(")")[0].split(",")[0]) < 1e-4  # Triton == reference
    assert out[3] == f"torch.Size([1, {vocab}])"  # one decode step after the prefill


def test_readme_engine_block_runs_as_written_in_a_fresh_process(tmp_path):
    code = python_block("## Many requests at once")
    (tmp_path / "block.py").write_text(code)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.splitlines()
    streamed = [line for line in out if line.startswith("req-0 ")]
    assert streamed and streamed[-1].endswith(("stop", "length")), out  # one finish reason, on the last output
    texts = eval(out[len(streamed)])
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    metrics = eval(out[-1])
    assert metrics["running"] == metrics["waiting"] == 0 and metrics["pages_used"] == 0, metrics
