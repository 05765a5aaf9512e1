"""The command line under faults: a stats line with too few tokens to time, a seed of 2**64, a closed stdin, Ctrl-C
at any moment (exit 130, no traceback), a full disk (one line, nothing half-written)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def _cli(argv, capsys, stdin="keep"):
    from llama3_triton.model.cli.main import main

    old = sys.stdin
    if stdin != "keep":
        sys.stdin = stdin
    try:
        rc = main(argv)
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return rc, out, err


def test_stats_line_for_two_tokens_has_no_nan(tiny64_ckpt, capsys):
    for n in (1, 2):
        rc, _, err = _cli(
            ["generate", "--ckpt", str(tiny64_ckpt), "--max-new-tokens", str(n), "--temperature", "0"], capsys
        )
        assert rc == 0 and "nan" not in err.lower() and "no steady-state decode timing" in err


def test_seed_two_to_the_64_on_the_command_line(tiny64_ckpt, capsys):
    rc, out, err = _cli(["generate", "--ckpt", str(tiny64_ckpt), "--max-new-tokens", "3", "--seed", str(2**64)], capsys)
    assert rc == 0 and "error" not in err


def test_closed_stdin_is_one_line(tiny64_ckpt, capsys):
    rc, out, err = _cli(["generate", "--ckpt", str(tiny64_ckpt), "--prompt", "-"], capsys, stdin=None)
    assert rc == 1 and err.strip().splitlines() == [
        "error: stdin is closed: nothing to read the prompt from (pass --prompt TEXT)"
    ]
    rc, out, err = _cli(["chat", "--ckpt", str(tiny64_ckpt)], capsys, stdin=None)  # no input: nothing to answer
    assert rc == 0 and out == "" and "error" not in err


def test_closed_stdin_in_a_real_process(tiny64_ckpt):
    import subprocess

    p = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model", "generate", "--ckpt", str(tiny64_ckpt), "--prompt", "-"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: os.close(0),
    )
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "error: stdin is closed: nothing to read the prompt from (pass --prompt TEXT)"
    ], p.stderr


@pytest.mark.parametrize("delay", [0.3, 1.0, 1.6, 2.5])
def test_ctrl_c_early_exits_130_without_a_traceback(tiny64_ckpt, delay):
    import signal
    import subprocess

    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama3_triton.model",
            "generate",
            "--ckpt",
            str(tiny64_ckpt),
            "--max-new-tokens",
            "500",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err


def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    # torch.save on a full disk raises RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos ..").
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    rc, out, err = _cli(["make-tiny", str(tmp_path / "t"), "--dim", "64", "--layers", "1"], capsys)
    assert rc == 1 and err.strip().splitlines() == [
        f"error: {tmp_path / 't' / 'consolidated.00.pth'}: No space left on device"
    ]
    assert list(tmp_path.iterdir()) == []  # and nothing half-written
