"""`llama3-triton explain`: the walk reproduces the model, every kernel agrees with its reference, the HTML
report is self-contained, and bad arguments get one clear line and exit 1."""

from __future__ import annotations

import base64
import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from llama3_triton.model.cli.main import main
from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.explain import DEFAULT_PROMPT, explain
from llama3_triton.model.tools.tiny import make_tiny
from tests.tolerances import TOLERANCES, assert_close

KERNEL_OPS = {"rms_norm", "add_rms_norm", "rope_write_cache", "attention", "swiglu"}
PNGS = {"scores.png", "scores_masked.png", "attention.png", "rope.png", "layer_norms.png", "topk.png"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The shape of the embedded default: dim 128, 2 layers, 2 query heads / 1 k/v head, Llama 3.1 RoPE scaling."""
    return make_tiny(tmp_path_factory.mktemp("explain") / "tiny", seed=5)


@pytest.fixture(scope="module")
def gqa4(tmp_path_factory) -> Path:
    """4 query heads sharing 1 k/v head, output tied to the embedding (3.2-style), no RoPE scaling (3.0-style)."""
    path = tmp_path_factory.mktemp("explain") / "gqa4"
    return make_tiny(path, dim=256, n_heads=4, n_kv_heads=1, tie_embeddings=True, rope_scaling_factor=None, seed=6)


@pytest.mark.parametrize(
    "which, backend, layer, head, dtype",
    [
        ("tiny", "torch", 1, 1, None),  # None: the device's default (fp32 on a CPU, bf16 on CUDA)
        ("tiny", "triton", 0, 1, None),
        ("tiny", "triton", 1, 0, torch.bfloat16),
        ("gqa4", "triton", 1, 3, None),
    ],
)
def test_walk_reproduces_the_model_and_every_kernel_matches_its_reference(
    request, device, which, backend, layer, head, dtype
):
    llm = Llama.load(request.getfixturevalue(which), backend=backend, device=device, dtype=dtype, max_seq_len=64)
    text = io.StringIO()
    # The Triton interpreter is slow: a short prompt (4 tokens) for every case.
    ex = explain(llm, "Hello, world", layer=layer, head=head, top_k=5, file=text)
    n_layers, tol = llm.args.n_layers, TOLERANCES[llm.dtype]

    # Every op of every layer was checked, each against its reference on the same tensors.
    ops = [(c.op, c.layer) for c in ex.checks]
    assert ops.count(("rms_norm", None)) == 1
    per_layer = ["add_rms_norm", "add_rms_norm", "attention", "rope_write_cache", "swiglu"]
    for i in range(n_layers):
        assert sorted(op for op, lay in ops if lay == i) == per_layer
    for c in ex.checks:
        pairs = list(zip(c.actual, c.expected, strict=True))
        assert c.max_diff == max(float((a.float() - e.float()).abs().max()) for a, e in pairs)
        for a, e in pairs:
            assert_close(a, e, llm.dtype, what=f"{c.op} in layer {c.layer}")
        # The kernel named is the backend's: kernels/<op>.py for triton, kernels/reference.py for torch.
        expected_file = "kernels/reference.py" if backend == "torch" else "kernels/"
        assert c.source.startswith(expected_file) and Path(c.url.removeprefix("file://")).is_file()
        if backend == "triton":
            assert "reference" not in c.source
    # Steps 3 to 7 and 9 name their kernels with the difference; step 8 sums up all layers.
    out = text.getvalue()
    for n in range(1, 10):
        assert f"[{n}] " in out
    for op in KERNEL_OPS:
        assert f"-> {op} ran in kernels/" in out

    # The walk's logits are the model's: compared with a fresh forward pass of the driver.
    logits = llm.forward(torch.tensor([ex.tokens], device=llm.device), 0)[0]
    assert ex.model_logits_diff <= tol["atol"] + tol["rtol"] * float(logits.abs().max())
    torch.testing.assert_close(ex.logits, logits, **tol)
    assert ex.chosen == int(logits[-1].argmax()) == ex.top_ids[0]
    assert len(ex.top_ids) == 5 and ex.top_probs == sorted(ex.top_probs, reverse=True)
    assert len(ex.layer_norms) == n_layers + 1


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "data", "poster", "action", "background", "xlink:href"):
                self.refs.append((tag, k, v or ""))


def test_cli_writes_a_self_contained_report(gqa4, tmp_path, capsys):
    out_dir = tmp_path / "report"
    # No --prompt: the default one. Layer 1, head 3 of 4 (k/v head 0), torch backend on the CPU.
    argv = ["explain", "--ckpt", str(gqa4), "--layer", "1", "--head", "3", "--out", str(out_dir)]
    rc = main([*argv, "--backend", "torch", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert repr(DEFAULT_PROMPT) in out and "<|begin_of_text|>" in out
    assert "q heads 0..3 -> k/v head 0" in out and "wq [4, 64, 256]" in out and "no frequency scaling" in out
    assert "llm.forward(tokens, 0) gives the same logits" in out

    page = (out_dir / "explain.html").read_text(encoding="utf-8")
    assert {p.name for p in out_dir.glob("*.png")} == PNGS
    parser = _Refs()
    parser.feed(page)
    # Nothing is loaded from outside the page: no scripts, style sheets, frames; images are data URIs.
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(parser.tags)
    assert "url(" not in page and "@import" not in page
    imgs = [v for tag, k, v in parser.refs if k == "src"]
    assert all(v.startswith("data:image/png;base64,") for v in imgs) and len(imgs) == len(PNGS)
    embedded = {base64.b64decode(v.split(",", 1)[1]) for v in imgs}
    assert embedded == {(out_dir / name).read_bytes() for name in PNGS}
    import html

    from llama3_triton.model.tools.explain import CAPTIONS

    # Each figure's caption says what to look at, not only its file name.
    assert set(CAPTIONS) == PNGS and all(html.escape(CAPTIONS[name]) in page for name in PNGS)
    # Links: in-page anchors, and each kernel's source file by a path relative to the report (to follow,
    # never loaded), so the page names no absolute path of the machine that wrote it.
    from urllib.parse import unquote

    assert "file:" not in page
    for tag, k, v in parser.refs:
        if k == "href" and not v.startswith("#"):
            assert tag == "a" and not Path(unquote(v)).is_absolute() and (out_dir / unquote(v)).is_file(), v
        assert not re.match(r"(?i)\s*(https?:)?//", v), v
    sources = {v for tag, k, v in parser.refs if k == "href" and not v.startswith("#")}
    assert {Path(v).name for v in sources} == {"reference.py"}
    assert "mean rms(x)" in out and "|x|" not in out  # an RMS, named as one
    for n in range(1, 10):
        assert f'id="step-{n}"' in page
    assert page.count("<table>") == 5  # the steps with kernels: 3, 5, 6, 7, and 8 (layer 0, not detailed)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--layer", "2"], "layer 2 is out of range: this model has 2 layers (0..1)"),
        (["--layer", "-1"], "layer -1 is out of range"),
        (["--head", "2"], "head 2 is out of range: this model has 2 query heads (0..1)"),
        (["--prompt", ""], "the prompt is empty"),
        (["--out", "FILE"], "exists and is not a folder"),
    ],
)
def test_bad_arguments_one_line_and_exit_1(tiny, tmp_path, capsys, extra, match):
    if "FILE" in extra:
        (tmp_path / "file").write_text("not a folder")
        extra = ["--out", str(tmp_path / "file")]
    rc = main(["explain", "--ckpt", str(tiny), "--backend", "torch", "--device", "cpu", *extra])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert out == ""  # refused before the walk began


def test_cli_runs_the_triton_kernels_by_default(tiny, capsys, monkeypatch):
    # A reader runs explain to see the kernels at work: without --backend they run, on a CPU in the interpreter.
    from llama3_triton.model.tools import explain

    seen = {}
    monkeypatch.setattr(explain, "explain", lambda llm, prompt, **kw: seen.update(backend=llm.backend))
    assert main(["explain", "--ckpt", str(tiny)]) == 0
    assert seen == {"backend": "triton"}


def test_cli_explains_a_gguf_file_as_generate_takes_it(tmp_path, capsys):
    """explain opens --ckpt the way generate does: a .gguf file (the default model is one) used to fail with
    "not a directory" before anything was read."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    from tests.gguf_writer import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out_dir = tmp_path / "report"
    rc = main(["explain", "--ckpt", str(path), "--backend", "torch", "--device", "cpu", "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "llm.forward(tokens, 0) gives the same logits" in out
    assert (out_dir / "explain.html").is_file() and {p.name for p in out_dir.glob("*.png")} == PNGS
    rc = main(["explain", "--ckpt", str(path), "--layer", "7", "--backend", "torch", "--device", "cpu"])
    assert rc == 1 and "layer 7 is out of range: this model has 2 layers" in capsys.readouterr().err


def test_deep_models_keep_their_layer_labels_apart_and_missing_glyphs_fall_back():
    from llama3_triton.model.tools.explain import _axis, _layer_ticks

    for layers in (2, 16, 32, 80):
        ticks = _layer_ticks(layers + 1)  # the embedding, then each layer
        assert ticks[0] == 0 and ticks[-1] == layers and len(ticks) <= 21 and ticks == sorted(set(ticks))
    assert _layer_ticks(17) == list(range(17))  # 16 layers: every one labelled
    latin = lambda c: ord(c) < 0x250 or c == "\u2423"  # noqa: E731 - a font with Latin letters (and the space mark)
    assert _axis(" 中 é\n", latin) == "\u2423U+4E2D\u2423é\\n"  # a code point, not an empty box
    assert _axis(" 中") == "\u2423中"  # no font to ask: the text as it is


def test_explain_report_is_whole_or_absent(tiny64_ckpt, tmp_path, monkeypatch):
    from llama3_triton.model.checkpoints import files as _files
    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tools import explain

    llm = Llama.load(tiny64_ckpt, backend="torch", device="cpu", max_seq_len=64)
    real, written = _files.write_text, []

    def full_disk(path, text, encoding="utf-8"):
        written.append(Path(path).name)
        if Path(path).name == "explain.html":
            raise OSError(28, "No space left on device", str(path))
        return real(path, text, encoding)

    monkeypatch.setattr(_files, "write_text", full_disk)
    out = tmp_path / "report"
    with pytest.raises(OSError, match="No space left"):
        explain.explain(llm, "Hi", out_dir=out, file=open(os.devnull, "w"))  # noqa: SIM115
    assert "explain.html" in written and not (out / "explain.html").exists()
    assert all(not p.name.startswith(".") for p in out.iterdir())  # no temporary leftovers
    monkeypatch.setattr(_files, "write_text", real)
    explain.explain(llm, "Hi", out_dir=out, file=open(os.devnull, "w"))  # noqa: SIM115
    page = (out / "explain.html").read_text()
    assert (
        page.rstrip().endswith("</html>") and (out / "explain.html").stat().st_mode & 0o777 == 0o666 & ~_files.umask()
    )
