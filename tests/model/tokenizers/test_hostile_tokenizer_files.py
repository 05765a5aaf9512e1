"""Tokenizer files are validated before tiktoken sees them (model/tokenizers/llama3.py): bad ranks, a vocabulary
that does not match the model, a FIFO; each one line naming the file, never tiktoken's Rust panic."""

from __future__ import annotations

import pytest

from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path
from tests.hostile import fifo_in_place

# ---- 6. tokenizer files are validated before tiktoken sees them ---------------------------------------------


def _bpe(lines: list[tuple[bytes, int]]) -> bytes:
    import base64

    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in lines).encode()


_BYTES = [(bytes([b]), b) for b in range(256)]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ([(b"ab", 256), (b"cd", 256)], (":258:", "rank 256 is given twice", "line 257")),
        ([(b"ab", -1)], (":257:", "rank -1 is outside [0, 257)")),
        ([(b"ab", 2**70)], (":257:", f"rank {2**70} is outside")),
        ([(b"ab", 300)], (":257:", "rank 300 is outside [0, 257)")),
        ([(b"ab", 256), (b"ab", 257)], (":258:", "listed twice")),
    ],
    ids=["duplicate-rank", "negative-rank", "huge-rank", "gap", "duplicate-token"],
)
def test_bad_ranks_are_one_line_naming_the_file(tmp_path, extra, needles):
    from llama3_triton.model.tokenizers.llama3 import Tokenizer, TokenizerError

    path = tmp_path / "tokenizer.model"
    path.write_bytes(_bpe(_BYTES + extra))
    with pytest.raises(TokenizerError) as e:  # never tiktoken's Rust panic (a BaseException)
        Tokenizer(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_a_valid_small_tokenizer_still_loads(tmp_path):
    from llama3_triton.model.tokenizers.llama3 import Tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(_bpe(_BYTES + [(b"ab", 256)]))
    tok = Tokenizer(path, vocab_size=257 + 256)
    assert tok.encode("ab") == [256] and tok.eot_id == 257 + 9


@pytest.mark.parametrize("n_base", [127999, 128001, 1000])
def test_tokenizer_must_match_the_model_vocabulary(tmp_path, n_base):
    from llama3_triton.model.tokenizers.llama3 import Tokenizer, TokenizerError

    real = default_tokenizer_path().read_bytes().splitlines(keepends=True)
    assert len(real) == 128000
    if n_base <= 128000:
        lines = real[:n_base]
    else:
        lines = real + [_bpe([(b"\xff\xfe\xfd\xfc-new-" + bytes([i]), 128000 + i) for i in range(n_base - 128000)])]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(lines))
    with pytest.raises(TokenizerError) as e:
        Tokenizer(path, vocab_size=128256)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "128,256" in msg and f"{n_base + 256:,} ids" in msg


def test_load_refuses_a_checkpoint_whose_tokenizer_shifts_the_special_ids(tmp_path):
    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tokenizers.llama3 import TokenizerError
    from llama3_triton.model.tools.tiny import make_tiny

    ckpt = make_tiny(tmp_path / "ckpt", dim=64, n_layers=1)
    with open(ckpt / "tokenizer.model", "ab") as f:
        f.write(_bpe([(b"\xff\xfe\xfd-extra", 128000)]))
    with pytest.raises(TokenizerError, match="128,257 ids, but the model's vocabulary has 128,256"):
        Llama.load(ckpt, backend="torch", device="cpu")


def test_fifo_in_place_of_the_tokenizer_does_not_hang(tmp_path):
    from llama3_triton.model.tokenizers.llama3 import Tokenizer, TokenizerError

    path = tmp_path / "tokenizer.model"
    path.write_text("x")
    with fifo_in_place(path), pytest.raises(TokenizerError, match="not a regular file but a FIFO"):
        Tokenizer(path)
