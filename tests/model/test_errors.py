"""Values from outside quoted in an error: cut to ~80 characters, non-printables escaped, so that a 600,000-character
field or an escape sequence in a checkpoint's file can neither flood nor repaint the terminal."""

from __future__ import annotations

import json

import pytest

from llama3_triton.model.errors import LINE_CHARS, VALUE_CHARS, UserError, one_line, shown


def test_shown_quotes_short_values_as_repr():
    assert shown("llama") == "'llama'" and shown(3.5) == "3.5" and shown(None) == "None"


def test_shown_escapes_what_a_terminal_acts_on():
    text = shown("\x1b[2J\x1b]0;title\x07\u202eevil\r\n")
    assert text.isprintable() and "\\x1b[2J" in text and "\\u202e" in text


def test_shown_cuts_long_values_and_counts_the_rest():
    text = shown("x" * 600_000)  # its repr: 600,002 characters, quotes included
    assert len(text) <= VALUE_CHARS + 30 and text.endswith("(599,923 more characters)"), text


def test_one_line_bounds_a_whole_message():
    line = one_line("bad value: " + "\x1b" * 10_000)
    assert line.isprintable() and len(line) <= LINE_CHARS + 30


def test_a_hostile_config_value_is_shown_cut_and_escaped(tmp_path):
    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tools.tiny import make_tiny

    ckpt = make_tiny(tmp_path / "hf", hf=True, n_layers=1, dim=64, n_heads=2, n_kv_heads=1, seed=0)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "\x1b[2J" + "A" * 600_000
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        Llama.load(ckpt, device="cpu", max_seq_len=16)
    message = str(e.value)
    assert "model_type is '\\x1b[2JAAA" in message and "more characters)" in message, message[:300]
    assert message.isprintable() and len(message) < 300 + len(str(ckpt)), len(message)
