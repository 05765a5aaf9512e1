"""Hostile and damaged checkpoint folders (model/checkpoints/folder.py, files.py): nothing loads as garbage, a
small file never starts unbounded work, only regular files inside the folder are opened, nothing hangs on a FIFO.
Each case is built the way an attacker (or a bad disk) would build it; each refusal is one line naming the file."""

from __future__ import annotations

import json
import shutil
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch

from llama3_triton.model.checkpoints.folder import Checkpoint, CheckpointError
from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path
from tests.hostile import fifo_in_place, small_checkpoint

_small = small_checkpoint  # tests/hostile.py


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
    with fifo_in_place(tmp_path / name):
        _raises(tmp_path, str(tmp_path / name), "not a regular file", "FIFO")


# ---- 3c. a zip directory and a tokenizer that point elsewhere ----------------------------------------------


def test_directory_entry_pointing_at_another_record_is_refused(tmp_path):
    _small(tmp_path)
    path = tmp_path / "consolidated.00.pth"
    raw = bytearray(path.read_bytes())
    a, b = _central_entry(bytes(raw), b"/data/0"), _central_entry(bytes(raw), b"/data/1")
    raw[b + 42 : b + 46] = raw[a + 42 : a + 46]  # data/1's local-header offset := data/0's
    path.write_bytes(bytes(raw))
    _raises(tmp_path, str(path), "local header names another record")


def test_tokenizer_linked_from_outside_the_folder_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    _small(ckpt)
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.model").symlink_to(default_tokenizer_path())
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        _ = Checkpoint(ckpt).tokenizer_path
