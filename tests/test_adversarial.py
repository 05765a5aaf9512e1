"""Adversarial checkpoints, files and faults: nothing loads as garbage, nothing hangs, nothing is left half-written.

One section per class of issue 14, each case built the way an attacker (or a bad disk) would build it. Grows
with every new format the loaders learn (GGUF next): add its damaged files here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from model.checkpoint import (
    Checkpoint,
    CheckpointError,
    random_weights,
    tiny_args,
    write_hf_checkpoint,
    write_meta_checkpoint,
)
from model.tokenizer import default_tokenizer_path

_SMALL = {"dim": 64, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32}


def _small(folder: Path, *, shards: int = 1, hf: bool = False, hf_shards: int = 1, seed: int = 1):
    args = tiny_args(**_SMALL)
    weights = random_weights(args, seed, torch.float32)
    if hf:
        write_hf_checkpoint(folder, args, weights, hf_shards)
    else:
        write_meta_checkpoint(folder, args, weights, shards, 32, 1.3, default_tokenizer_path())
    return args, weights


def _raises(folder: Path, *needles: str, read_all: bool = False) -> str:
    with pytest.raises(CheckpointError) as e:
        ckpt = Checkpoint(folder)
        if read_all:
            for _ in ckpt.tensors():
                pass
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ---- 1. damaged weights never load silently -----------------------------------------------------------------


def _central_entry(raw: bytes, record_suffix: bytes) -> int:
    """Offset of the zip central-directory entry whose name ends with ``record_suffix``."""
    i = raw.find(b"PK\x01\x02")
    while i != -1:
        n = struct.unpack_from("<H", raw, i + 28)[0]
        if raw[i + 46 : i + 46 + n].endswith(record_suffix):
            return i
        i = raw.find(b"PK\x01\x02", i + 4)
    raise AssertionError(f"no record {record_suffix!r}")


def _record_of(path: Path, key: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as z:
        return next(i for i in z.infolist() if i.filename.endswith(f"/data/{key}"))


def test_record_cut_short_in_the_zip_directory_is_refused(tmp_path):
    # The directory says record data/0 holds 100 bytes; the pickle says its storage needs far more. torch's
    # mmap=True load would map the storage anyway and read the rest from the following records.
    _small(tmp_path)
    path = tmp_path / "consolidated.00.pth"
    raw = bytearray(path.read_bytes())
    i = _central_entry(bytes(raw), b"/data/0")
    struct.pack_into("<II", raw, i + 20, 100, 100)  # compressed and uncompressed sizes
    path.write_bytes(bytes(raw))
    assert torch.load(path, mmap=True, weights_only=True)  # torch alone loads it without a word
    _raises(tmp_path, str(path), "data/0", "holds 100 bytes", "cut-short")


def test_flipped_byte_in_a_tensor_fails_its_crc(tmp_path, monkeypatch):
    _, weights = _small(tmp_path)
    path = tmp_path / "consolidated.00.pth"
    info = _record_of(path, "3")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    _raises(tmp_path, str(path), "CRC-32", read_all=True)
    # The check can be turned off (LLAMA3_TRITON_VERIFY_CRC=0); the damage then shows in the values.
    monkeypatch.setenv("LLAMA3_TRITON_VERIFY_CRC", "0")
    differs = [n for n, t in Checkpoint(tmp_path).tensors() if not torch.equal(t, weights[n])]
    assert len(differs) == 1


def test_swapped_meta_shards_are_refused(tmp_path):
    _small(tmp_path, shards=2)
    a, b = tmp_path / "consolidated.00.pth", tmp_path / "consolidated.01.pth"
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    _raises(tmp_path, str(a), "holds shard 1", "consolidated.01/", "not shard 0")


def test_duplicated_meta_shard_is_refused(tmp_path):
    _small(tmp_path, shards=2)
    shutil.copyfile(tmp_path / "consolidated.00.pth", tmp_path / "consolidated.01.pth")
    _raises(tmp_path, str(tmp_path / "consolidated.01.pth"), "holds shard 0")


def test_duplicated_shard_without_names_in_its_records_is_refused(tmp_path):
    # Shards saved through file objects have records named archive/...; the bytes still tell a copy.
    _small(tmp_path, shards=2)
    for f in ("consolidated.00.pth", "consolidated.01.pth"):
        sd = torch.load(tmp_path / f, weights_only=True)
        with open(tmp_path / f, "wb") as out:
            torch.save(sd, out)
    assert Checkpoint(tmp_path).n_shards == 2  # renamed-free, distinct shards still load
    shutil.copyfile(tmp_path / "consolidated.00.pth", tmp_path / "consolidated.01.pth")
    _raises(tmp_path, str(tmp_path / "consolidated.01.pth"), "same weights as", "consolidated.00.pth")


def test_meta_without_output_declared_untied_is_refused(tmp_path):
    _small(tmp_path)
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    sd.pop("output.weight")
    torch.save(sd, tmp_path / "consolidated.00.pth")
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "tie_embeddings": False}))
    _raises(tmp_path, "'output.weight'", "missing")


# ---- 2. a small file never starts unbounded work ------------------------------------------------------------


def _timed_refusal(folder: Path, *needles: str) -> None:
    t0 = time.perf_counter()
    _raises(folder, *needles)
    assert time.perf_counter() - t0 < 10, "refusing a huge config took too long: work grows with the config"


@pytest.mark.parametrize("hf", [False, True])
def test_billion_layers_refused_by_the_files_real_size(tmp_path, hf):
    _small(tmp_path, hf=hf)
    name, key = ("config.json", "num_hidden_layers") if hf else ("params.json", "n_layers")
    cfg = json.loads((tmp_path / name).read_text())
    (tmp_path / name).write_text(json.dumps({**cfg, key: 1_000_000_000}))
    _timed_refusal(tmp_path, str(tmp_path / name), "1000000000 layers", "bytes of weight files")


@pytest.mark.parametrize(
    ("value", "needle"), [(2**40, "larger than any model"), (2**30, "bytes of weight files"), (10**30, "larger")]
)
def test_huge_dim_is_one_line_naming_the_file(tmp_path, value, needle):
    _small(tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "dim": value, "n_heads": 2, "n_kv_heads": 2}))
    _timed_refusal(tmp_path, str(tmp_path / "params.json"), needle)


def test_huge_config_file_is_not_read_whole(tmp_path):
    _small(tmp_path)
    with open(tmp_path / "params.json", "a") as f:
        f.write(" " * (2 << 20))
    _timed_refusal(tmp_path, str(tmp_path / "params.json"), "larger than")


# ---- 3. only regular files inside the checkpoint folder are opened ------------------------------------------


@pytest.mark.parametrize("entry", ["../x.safetensors", "/etc/x.safetensors", "sub/x.safetensors", "..\\x.safetensors"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, entry):
    ckpt = tmp_path / "ckpt"
    _small(ckpt, hf=True, hf_shards=2)
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    shutil.copyfile(ckpt / first, tmp_path / "x.safetensors")  # a real file there: only the path is wrong
    data["weight_map"] = {k: (entry if v == first else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    _raises(ckpt, str(index), repr(entry), "not a file name in the checkpoint folder")


@pytest.mark.parametrize("hf", [False, True])
def test_symlinked_weights_must_stay_inside(tmp_path, hf):
    ckpt = tmp_path / "ckpt"
    _small(ckpt, hf=hf)
    name = "model.safetensors" if hf else "consolidated.00.pth"
    (ckpt / name).rename(tmp_path / name)
    (ckpt / name).symlink_to(tmp_path / name)
    _raises(ckpt, str(ckpt / name), "outside the checkpoint folder")
    # A link that stays inside the folder is fine.
    (ckpt / name).unlink()
    (tmp_path / name).rename(ckpt / "blob")
    (ckpt / name).symlink_to("blob")
    assert len(list(Checkpoint(ckpt).tensors())) == 12


def test_hf_hub_cache_snapshot_links_into_blobs_are_followed(tmp_path):
    # huggingface_hub keeps files in models--org--name/blobs and links them from snapshots/<rev>/.
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    _small(snap, hf=True)
    (repo / "blobs").mkdir()
    for f in list(snap.iterdir()):
        f.rename(repo / "blobs" / f.name)
        f.symlink_to(Path("../..") / "blobs" / f.name)
    assert len(list(Checkpoint(snap).tensors())) == 12


@contextmanager
def _fifo(path: Path):
    """Replace ``path`` by a FIFO. Should the code under test block on it, a writer opens it after 20 s so the
    test fails instead of hanging."""
    path.unlink()
    os.mkfifo(path)
    rescued = []

    def rescue():
        if not done.wait(20):
            rescued.append(True)
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

    done = threading.Event()
    t = threading.Thread(target=rescue, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        assert not rescued, f"{path}: the loader blocked on a FIFO"


@pytest.mark.parametrize(
    ("hf", "name"),
    [
        (False, "params.json"),
        (False, "consolidated.00.pth"),
        (True, "config.json"),
        (True, "model.safetensors"),
        (True, "model-00001-of-00002.safetensors"),
        (True, "model.safetensors.index.json"),
    ],
)
def test_fifo_in_place_of_a_checkpoint_file_does_not_hang(tmp_path, hf, name):
    _small(tmp_path, hf=hf, hf_shards=2 if "0000" in name or "index" in name else 1)
    with _fifo(tmp_path / name):
        _raises(tmp_path, str(tmp_path / name), "not a regular file", "FIFO")


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
    from model.tokenizer import Tokenizer, TokenizerError

    path = tmp_path / "tokenizer.model"
    path.write_bytes(_bpe(_BYTES + extra))
    with pytest.raises(TokenizerError) as e:  # never tiktoken's Rust panic (a BaseException)
        Tokenizer(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_a_valid_small_tokenizer_still_loads(tmp_path):
    from model.tokenizer import Tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(_bpe(_BYTES + [(b"ab", 256)]))
    tok = Tokenizer(path, vocab_size=257 + 256)
    assert tok.encode("ab") == [256] and tok.eot_id == 257 + 9


@pytest.mark.parametrize("n_base", [127999, 128001, 1000])
def test_tokenizer_must_match_the_model_vocabulary(tmp_path, n_base):
    from model.tokenizer import Tokenizer, TokenizerError

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
    from model.checkpoint import make_tiny
    from model.llama import Llama
    from model.tokenizer import TokenizerError

    ckpt = make_tiny(tmp_path / "ckpt", dim=64, n_layers=1)
    with open(ckpt / "tokenizer.model", "ab") as f:
        f.write(_bpe([(b"\xff\xfe\xfd-extra", 128000)]))
    with pytest.raises(TokenizerError, match="128,257 ids, but the model's vocabulary has 128,256"):
        Llama.load(ckpt, backend="torch", device="cpu")


def test_fifo_in_place_of_the_tokenizer_does_not_hang(tmp_path):
    from model.tokenizer import Tokenizer, TokenizerError

    path = tmp_path / "tokenizer.model"
    path.write_text("x")
    with _fifo(path), pytest.raises(TokenizerError, match="not a regular file but a FIFO"):
        Tokenizer(path)
