"""The README's "From Python" block runs as written (on the embedded tiny model)."""

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
    exec(compile(code, f"{README}:From Python", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.splitlines()
    texts = eval(out[0])  # print(out.texts)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert out[1] == "torch.Size([1, 6, 128256])"
    assert float(out[2].removeprefix("tensor(").split(")")[0].split(",")[0]) < 1e-4
