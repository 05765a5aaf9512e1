"""The code blocks of README.md ("From Python", "Serve") and docs/serving.md ("The engine", "The server") run as
written, the way a user runs them: in a fresh ``python`` (or ``bash``) process with a clean environment (no
TRITON_INTERPRET, nothing from the test run), outside the repository; the server on a free port instead of 8000."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SERVING = ROOT / "docs" / "serving.md"


def python_block(after: str, lang: str = "python", doc: Path = README) -> str:
    """The first ``lang`` block after the heading ``after`` in ``doc``."""
    text = doc.read_text(encoding="utf-8")
    start = text.index(after)
    return re.search(rf"```{lang}\n(.*?)```", text[start:], re.S).group(1)


def _run_block(tmp_path, code: str, cmd: tuple[str, ...] = (sys.executable, "block.py"), path: str | None = None):
    """``code`` in a fresh process with a clean environment, in ``tmp_path``: its result, asserted successful."""
    (tmp_path / "block.py").write_text(code)
    env = {"PATH": path or os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path)}  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_readme_python_block_runs_as_written_in_a_fresh_process(tmp_path):
    out = _run_block(tmp_path, python_block("## From Python")).stdout.splitlines()
    texts = eval(out[0])  # print(out.texts)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert float(out[1].removeprefix("tensor(").split(")")[0].split(",")[0]) < 1e-4  # Triton == reference
    # One decode step after the prefill. The default model: SmolLM2 (vocabulary 49152) when its wheel is installed,
    # else the tiny Llama-3 (128256).
    shape = re.fullmatch(r"torch\.Size\(\[1, (\d+)\]\)", out[2])
    assert shape and int(shape.group(1)) in (49152, 128256), out[2]
    assert len(out) == 3, out


def test_readme_engine_block_runs_as_written_in_a_fresh_process(tmp_path):
    out = _run_block(tmp_path, python_block("## The engine", doc=SERVING)).stdout.splitlines()
    streamed = [line for line in out if line.startswith("req-0 ")]
    assert streamed and streamed[-1].endswith(("stop", "length")), out  # one finish reason, on the last output
    texts = eval(out[len(streamed)])
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    metrics = eval(out[-1])
    assert metrics["running"] == metrics["waiting"] == 0 and metrics["pages_used"] == 0, metrics


def test_readme_serve_blocks_run_as_written_on_a_free_port(tmp_path):
    """The README's shell block (the server in the background, curl), then docs/serving.md's openai snippet in a
    fresh python, then the server is stopped with SIGTERM and must exit 0."""
    pytest.importorskip("openai", reason="the openai client (dev extras; not on the GPU image)")
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: the README's serve block uses it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    shell = python_block("## Serve", "bash").replace("8000", port)
    (tmp_path / "snippet.py").write_text(python_block("## The server", doc=SERVING).replace("8000", port))
    script = f"{shell}\n{shlex.quote(sys.executable)} snippet.py\nkill -TERM %1\nwait %1\necho server exit $?\n"
    bindir = str(Path(sys.executable).parent)  # where this interpreter's llama3-triton script is installed
    p = _run_block(tmp_path, script, cmd=("bash", "block.py"), path=f"{bindir}:{os.environ.get('PATH', '/bin')}")
    answer, end = json.JSONDecoder().raw_decode(p.stdout)  # curl's answer has no newline: the snippet's text follows
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"], answer
    assert answer["usage"]["completion_tokens"] == 8 or answer["choices"][0]["finish_reason"] == "stop"
    out = p.stdout[end:].splitlines()
    assert "".join(out[:-1]).strip(), out  # the chat stream's text, then the server's exit status
    assert out[-1] == "server exit 0", p.stderr[-2000:]
