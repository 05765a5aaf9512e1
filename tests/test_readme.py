"""The README's "From Python" block runs as written (on the default model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(after: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the embedded default is written here, not in ~/.cache
    code = python_block("From Python")
    ns = {"__name__": "__readme__"}
    exec(compile(code, f"{README}:From Python", "exec"), ns)
    out = capsys.readouterr().out.splitlines()
    texts = eval(out[0])  # print(out.texts)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # The default model: SmolLM2 (vocabulary 49152) when its wheel is installed, else the tiny Llama-3 (128256).
    T, vocab = ns["tokens"].shape[1], ns["llm"].args.vocab_size
    assert T >= 5 and vocab in (49152, 128256)
    assert out[1] == f"torch.Size([1, {T}, {vocab}])"
    assert float(out[2].removeprefix("tensor(").split(")")[0].split(",")[0]) < 1e-4
    assert out[3] == f"torch.Size([1, {vocab}])"  # one decode step after the prefill
