"""model.checkpoint: Meta's and Hugging Face's layouts read back exactly, and every kind of bad input refused.

Round trips use real-vocabulary tiny checkpoints from ``make_tiny`` (module-scoped: about a second each); the
bad-input tests use much smaller checkpoints (vocab 256, one layer) written with the same writers, then broken.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llama3_triton.model.checkpoints.folder import (
    Checkpoint,
    CheckpointError,
    expected_shapes,
    find_layout,
    permute_for_rotate_half,
    unpermute_from_rotate_half,
)
from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path
from llama3_triton.model.tools.tiny import (
    make_tiny,
    random_weights,
    tiny_args,
    write_meta_checkpoint,
)
from tests.hostile import small_checkpoint

# ---- round trips through make_tiny --------------------------------------------------------------------------

TINY = {
    "meta-1": {"seed": 101, "dtype": torch.bfloat16},
    "meta-2": {"n_kv_heads": 2, "shards": 2, "rope_scaling_factor": None, "seed": 102, "dtype": torch.float16},
    "meta-4": {"dim": 256, "n_heads": 4, "n_kv_heads": 4, "shards": 4, "seed": 103, "dtype": torch.bfloat16},
    "hf-1": {"hf": True, "n_layers": 3, "seed": 104, "dtype": torch.float16},
    "hf-3": {
        "hf": True,
        "hf_shards": 3,
        "shards": 2,
        "n_kv_heads": 2,
        "tie_embeddings": True,
        "rope_scaling_factor": 32.0,
        "seed": 105,
        "dtype": torch.bfloat16,
    },
}
_ARG_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "rope_scaling_factor")


def _tiny_expected(kw: dict):
    args = tiny_args(**{k: kw[k] for k in _ARG_KEYS if k in kw}, tie_embeddings=kw.get("tie_embeddings", False))
    return args, random_weights(args, kw["seed"], kw["dtype"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(case)`` -> (folder, make_tiny kwargs, expected args, expected weights); each case written once."""
    cache = {}

    def get(case: str):
        if case not in cache:
            kw = TINY[case]
            folder = make_tiny(tmp_path_factory.mktemp(case) / "ckpt", **kw)
            cache[case] = (folder, kw, *_tiny_expected(kw))
        return cache[case]

    return get


ALL = list(TINY)
HF = [c for c in TINY if TINY[c].get("hf")]


def _assert_same_weights(ckpt: Checkpoint, args, weights: dict[str, torch.Tensor]) -> None:
    assert ckpt.args == args
    assert ckpt.names() == list(weights)
    seen = 0
    for name, t in ckpt.tensors():
        w = weights[name]
        assert t.dtype == w.dtype, name
        assert torch.equal(t, w), f"{name} differs"
        seen += 1
    assert seen == len(weights) == len(expected_shapes(args, with_output=not args.tie_embeddings))


@pytest.mark.parametrize("case", ALL)
def test_round_trip(tiny, case):
    folder, kw, args, weights = tiny(case)
    ckpt = Checkpoint(folder)
    assert ckpt.layout == ("hf" if kw.get("hf") else "meta")
    assert ckpt.root == folder
    _assert_same_weights(ckpt, args, weights)
    assert ckpt.args.tie_embeddings == kw.get("tie_embeddings", False)
    assert ("output.weight" in ckpt.names()) != ckpt.args.tie_embeddings
    factor = kw.get("rope_scaling_factor", 8.0)
    assert (ckpt.args.rope_scaling or {}).get("factor") == factor
    itemsize = torch.empty((), dtype=kw["dtype"]).element_size()
    assert ckpt.weight_bytes(kw["dtype"]) == sum(w.numel() for w in weights.values()) * itemsize


@pytest.mark.parametrize("case", HF)
def test_hf_original_folder_loads_too(tiny, case):
    folder, kw, args, weights = tiny(case)
    ckpt = Checkpoint(folder / "original")
    assert (ckpt.layout, ckpt.root) == ("meta", folder / "original")
    assert len(ckpt.files) == kw.get("shards", 1)
    _assert_same_weights(ckpt, args, weights)


@pytest.mark.parametrize("case", ALL)
def test_layout_detection(tiny, case, tmp_path):
    folder, kw, _, _ = tiny(case)
    if kw.get("hf"):
        assert find_layout(folder) == ("hf", folder)
        assert find_layout(folder / "original") == ("meta", folder / "original")
        # A folder with only original/ in it is read from there.
        only = tmp_path / "only-original"
        only.mkdir()
        (only / "original").symlink_to(folder / "original", target_is_directory=True)
        assert find_layout(only) == ("meta", only / "original")
        assert Checkpoint(only).tokenizer_path == only / "original" / "tokenizer.model"
    else:
        assert find_layout(folder) == ("meta", folder)
        assert not (folder / "original").exists()


@pytest.mark.parametrize("case", ALL)
def test_tokenizer_path(tiny, case):
    folder, kw, _, _ = tiny(case)
    path = Checkpoint(folder).tokenizer_path
    assert path == (folder / "original" / "tokenizer.model" if kw.get("hf") else folder / "tokenizer.model")
    assert path.read_bytes() == default_tokenizer_path().read_bytes()


@pytest.mark.parametrize("case", ALL)
def test_meta_shards_on_disk(tiny, case):
    """Each consolidated.NN.pth holds Meta's model-parallel slice: dim 0 of column-parallel weights, dim 1 of
    wo/w2, norms whole."""
    folder, kw, args, weights = tiny(case)
    meta_dir = folder / "original" if kw.get("hf") else folder
    n = kw.get("shards", 1)
    files = sorted(meta_dir.glob("consolidated.*.pth"))
    assert [f.name for f in files] == [f"consolidated.{r:02d}.pth" for r in range(n)]
    params = json.loads((meta_dir / "params.json").read_text())
    assert params["use_scaled_rope"] == (args.rope_scaling is not None)
    for r, f in enumerate(files):
        shard = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        assert set(shard) == set(weights)
        for name, w in weights.items():
            if name.endswith(("norm.weight",)):
                expected = w
            elif ".wo." in name or ".w2." in name:
                expected = w.chunk(n, dim=1)[r]
            else:
                expected = w.chunk(n, dim=0)[r]
            assert torch.equal(shard[name], expected), f"{f.name}: {name}"


@pytest.mark.parametrize("case", HF)
def test_hf_files_on_disk(tiny, case):
    """Hugging Face names, wq/wk permuted for rotate-half RoPE, an index when sharded, no lm_head when tied."""
    folder, kw, args, weights = tiny(case)
    n_files = kw.get("hf_shards", 1)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == n_files
    stored = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            stored.update({k: h.get_tensor(k) for k in h.keys()})
    if n_files > 1:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(stored)
        assert set(index["weight_map"].values()) == {f.name for f in files}
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] == args.tie_embeddings
    assert ("lm_head.weight" in stored) != args.tie_embeddings
    assert len(stored) == len(weights)
    assert torch.equal(stored["model.embed_tokens.weight"], weights["tok_embeddings.weight"])
    for i in range(args.n_layers):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        wq, wk = weights[meta + "attention.wq.weight"], weights[meta + "attention.wk.weight"]
        assert torch.equal(stored[hf + "self_attn.q_proj.weight"], permute_for_rotate_half(wq, args.n_heads))
        assert torch.equal(stored[hf + "self_attn.k_proj.weight"], permute_for_rotate_half(wk, args.n_kv_heads))
        assert not torch.equal(stored[hf + "self_attn.q_proj.weight"], wq)
        assert torch.equal(stored[hf + "self_attn.v_proj.weight"], weights[meta + "attention.wv.weight"])
        assert torch.equal(stored[hf + "mlp.gate_proj.weight"], weights[meta + "feed_forward.w1.weight"])
        assert torch.equal(stored[hf + "mlp.up_proj.weight"], weights[meta + "feed_forward.w3.weight"])
        assert torch.equal(stored[hf + "mlp.down_proj.weight"], weights[meta + "feed_forward.w2.weight"])
        assert torch.equal(stored[hf + "post_attention_layernorm.weight"], weights[meta + "ffn_norm.weight"])


def test_make_tiny_into_an_existing_empty_dir(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    assert make_tiny(target, dim=64, n_layers=1, seed=7, dtype=torch.float32) == target
    args = tiny_args(dim=64, n_layers=1)
    _assert_same_weights(Checkpoint(target), args, random_weights(args, 7, torch.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


# ---- the rotate-half permutation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("n_heads", "head_dim", "cols"), [(1, 2, 3), (1, 4, 1), (3, 6, 5), (8, 128, 16), (2, 64, 128)])
def test_permute_and_unpermute_are_inverses(n_heads, head_dim, cols):
    w = torch.randn(n_heads * head_dim, cols, dtype=torch.float64)
    p = permute_for_rotate_half(w, n_heads)
    assert torch.equal(unpermute_from_rotate_half(p, n_heads), w)
    assert torch.equal(permute_for_rotate_half(unpermute_from_rotate_half(w, n_heads), n_heads), w)
    assert sorted(p.flatten().tolist()) == sorted(w.flatten().tolist())  # a permutation of rows, nothing else
    if head_dim > 2:
        assert not torch.equal(p, w)


def test_permute_by_hand():
    # One head of dim 4: Meta's pairs (r0, r1), (r2, r3) -> HF's halves (r0, r2 | r1, r3).
    w = torch.arange(8.0).view(4, 2)
    assert torch.equal(permute_for_rotate_half(w, 1), w[[0, 2, 1, 3]])
    # Two heads: each permuted inside itself.
    w = torch.arange(8.0).view(8, 1)
    assert permute_for_rotate_half(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_permutation_turns_interleaved_rope_into_rotate_half():
    """Meta's RoPE rotates interleaved pairs; transformers' rotate-half RoPE on the permuted weights rotates the
    same pairs, stored as halves: the rotated vectors match element for element after the same permutation."""
    g = torch.Generator().manual_seed(5)
    n_heads, hd, dim, seq = 4, 16, 64, 9
    w = torch.randn(n_heads * hd, dim, generator=g, dtype=torch.float64)
    x = torch.randn(seq, dim, generator=g, dtype=torch.float64)
    pos = torch.arange(seq, dtype=torch.float64) + 3
    angles = pos[:, None] / 500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (seq, hd/2)
    # Meta: q as complex pairs times e^(i angle).
    q = (x @ w.T).view(seq, n_heads, hd // 2, 2)
    rot = torch.view_as_complex(q.contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    meta = torch.view_as_real(rot).reshape(seq, n_heads, hd)
    # Hugging Face: rotate-half with the angles repeated over the two halves.
    qh = (x @ permute_for_rotate_half(w, n_heads).T).view(seq, n_heads, hd)
    emb = torch.cat([angles, angles], dim=-1)
    hf, _ = apply_rotary_pos_emb(qh, qh, emb.cos(), emb.sin(), unsqueeze_dim=1)
    halves = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    torch.testing.assert_close(hf, meta[..., halves], rtol=1e-12, atol=1e-12)
    # ...and attention scores, which do not care about the order inside a head, are equal.
    torch.testing.assert_close(
        torch.einsum("shd,thd->hst", hf, hf), torch.einsum("shd,thd->hst", meta, meta), rtol=1e-12, atol=1e-10
    )


# ---- small checkpoints to break -----------------------------------------------------------------------------

_small = small_checkpoint  # tests/hostile.py


def _edit_pth(path: Path, edit) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    edit(sd)
    torch.save(sd, path)


def _edit_safetensors(path: Path, edit) -> None:
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def _raises(folder: Path, *needles: str, tensor: str | None = None) -> str:
    """The CheckpointError from opening ``folder`` (or from reading ``tensor``), checked to contain ``needles``."""
    with pytest.raises(CheckpointError) as e:
        ckpt = Checkpoint(folder)
        if tensor is not None:
            ckpt.tensor(tensor)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_small_checkpoints_load(tmp_path):
    for name, kw in {
        "meta": {},
        "meta2": {"shards": 2},
        "hf": {"hf": True},
        "hf2": {"hf": True, "hf_shards": 2},
    }.items():
        args, weights = _small(tmp_path / name, **kw)
        _assert_same_weights(Checkpoint(tmp_path / name), args, weights)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_missing_directory(tmp_path):
    _raises(tmp_path / "nope", str(tmp_path / "nope"), "not found")


def test_a_file_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    _raises(tmp_path / "file", str(tmp_path / "file"), "not a directory")


def test_empty_directory(tmp_path):
    _raises(tmp_path, str(tmp_path), "no checkpoint found")


def test_config_json_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _raises(tmp_path, "no checkpoint found")


def test_params_json_without_weights(tmp_path):
    _small(tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    _raises(tmp_path, str(tmp_path), "no consolidated")


@pytest.mark.parametrize("hf", [False, True])
def test_bad_config_file_in_checkpoint(tmp_path, hf):
    _small(tmp_path, hf=hf)
    name = "config.json" if hf else "params.json"
    (tmp_path / name).write_text('{"dim": 64,')
    _raises(tmp_path, str(tmp_path / name), "not valid JSON")


@pytest.mark.parametrize("cut", ["half", "header", "empty", "garbage"])
def test_truncated_or_corrupt_pth(tmp_path, cut):
    _small(tmp_path)
    path = tmp_path / "consolidated.00.pth"
    data = path.read_bytes()
    new = {"half": data[: len(data) // 2], "header": data[:100], "empty": b"", "garbage": os.urandom(4096)}[cut]
    path.write_bytes(new)
    _raises(tmp_path, str(path))


class _Payload:
    """An object whose unpickling calls ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "os.system": _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.open": _Payload(open, str(marker), "w"),
        "exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "exec"])
@pytest.mark.parametrize("container", ["torch.save", "raw-pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, kind, container):
    # The payload works: plain unpickling does create its marker file.
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_payloads(probe)[kind]))
    assert probe.exists()

    folder = tmp_path / "ckpt"
    _small(folder)
    path = folder / "consolidated.00.pth"
    marker = tmp_path / "MARKER"
    sd = torch.load(path, weights_only=True)
    sd["layers.0.attention.wq.weight"] = _payloads(marker)[kind]
    if container == "torch.save":
        torch.save(sd, path)  # the zip format torch.save writes, with the payload in data.pkl
    else:
        with open(path, "wb") as f:
            pickle.dump(sd, f)
    assert not marker.exists()
    msg = _raises(folder, str(path))
    if container == "torch.save":
        assert "refused" in msg
    assert not marker.exists(), "loading the checkpoint ran the pickle's code"


@pytest.mark.parametrize(
    "content",
    [[torch.ones(2)], torch.ones(2), {"layers.0.attention.wq.weight": 3}, {0: torch.ones(2)}, "weights"],
    ids=["list", "tensor", "int-value", "int-key", "str"],
)
def test_pth_holding_something_else(tmp_path, content):
    _small(tmp_path)
    path = tmp_path / "consolidated.00.pth"
    torch.save(content, path)
    _raises(tmp_path, str(path), "expected a dict")


@pytest.mark.parametrize("cut", ["half", "header", "garbage"])
def test_truncated_or_corrupt_safetensors(tmp_path, cut):
    _small(tmp_path, hf=True)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"half": data[: len(data) // 2], "header": data[:6], "garbage": b"\xff" * 64}[cut])
    _raises(tmp_path, str(path), "safetensors")


def test_index_points_to_missing_file(tmp_path):
    _small(tmp_path, hf=True, hf_shards=2)
    gone = tmp_path / "model-00002-of-00002.safetensors"
    gone.unlink()
    _raises(tmp_path, str(gone), "missing")


def test_index_names_a_tensor_the_file_lacks(tmp_path):
    _small(tmp_path, hf=True, hf_shards=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(k for k, v in index["weight_map"].items() if v == "model-00002-of-00002.safetensors")
    index["weight_map"][name] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _raises(tmp_path, "model-00001-of-00002.safetensors", name)


@pytest.mark.parametrize(
    "index",
    ["{not json", "[]", "{}", '{"weight_map": []}', '{"weight_map": {}}', '{"weight_map": {"model.norm.weight": 3}}'],
)
def test_invalid_index(tmp_path, index):
    _small(tmp_path, hf=True, hf_shards=2)
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(index)
    _raises(tmp_path, str(path), "not a valid safetensors index")


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("layers.0.feed_forward.w1.weight", lambda t: t.T.contiguous()),
        ("layers.0.attention.wk.weight", lambda t: t[: t.shape[0] // 2].clone()),
        ("tok_embeddings.weight", lambda t: t[:, :-2].clone()),
        ("layers.0.ffn_norm.weight", lambda t: torch.cat([t, t])),
        ("norm.weight", lambda t: t[None]),
    ],
    ids=["transposed", "cut-rows", "cut-cols", "doubled", "extra-dim"],
)
@pytest.mark.parametrize("hf", [False, True])
def test_tensor_with_wrong_shape(tmp_path, name, bad, hf):
    args, _ = _small(tmp_path, hf=hf)
    want = expected_shapes(args)[name]
    if hf:
        hf_names = {
            "layers.0.feed_forward.w1.weight": "model.layers.0.mlp.gate_proj.weight",
            "layers.0.attention.wk.weight": "model.layers.0.self_attn.k_proj.weight",
            "tok_embeddings.weight": "model.embed_tokens.weight",
            "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
            "norm.weight": "model.norm.weight",
        }
        got = {}

        def edit(sd):
            sd[hf_names[name]] = bad(sd[hf_names[name]])
            got["shape"] = tuple(sd[hf_names[name]].shape)

        _edit_safetensors(tmp_path / "model.safetensors", edit)
    else:
        got = {}

        def edit(sd):
            sd[name] = bad(sd[name])
            got["shape"] = tuple(sd[name].shape)

        _edit_pth(tmp_path / "consolidated.00.pth", edit)
    assert got["shape"] != want
    _raises(tmp_path, name, str(got["shape"]), str(want), tensor=name)
    # Every other tensor still loads; iterating over all of them stops at the bad one.
    ckpt = Checkpoint(tmp_path)
    for other in ckpt.names():
        if other != name:
            ckpt.tensor(other)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        list(ckpt.tensors())


@pytest.mark.parametrize(
    "extra",
    ["layers.0.attention.wq.bias", "layers.1.attention.wq.weight", "lm_head.weight", "output.bias"],
)
def test_unexpected_tensor_meta(tmp_path, extra):
    _small(tmp_path)
    _edit_pth(tmp_path / "consolidated.00.pth", lambda sd: sd.__setitem__(extra, torch.randn(4)))
    _raises(tmp_path, str(tmp_path / "consolidated.00.pth"), repr(extra), "unexpected")


@pytest.mark.parametrize(
    "extra",
    ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.gate_proj.weight", "model.lm_head.weight", "foo"],
)
def test_unexpected_tensor_hf(tmp_path, extra):
    _small(tmp_path, hf=True)
    _edit_safetensors(tmp_path / "model.safetensors", lambda sd: sd.__setitem__(extra, torch.randn(4)))
    _raises(tmp_path, str(tmp_path / "model.safetensors"), repr(extra), "unexpected")


def test_rope_freqs_in_meta_shards_is_ignored(tmp_path):
    # Some of Meta's checkpoints carry a precomputed RoPE table; it is not a weight of the model.
    args, weights = _small(tmp_path, shards=2)
    for f in sorted(tmp_path.glob("consolidated.*.pth")):
        _edit_pth(f, lambda sd: sd.__setitem__("rope.freqs", torch.randn(16)))
    _assert_same_weights(Checkpoint(tmp_path), args, weights)


def test_hf_tied_checkpoint_with_a_copy_of_lm_head(tmp_path):
    args, weights = _small(tmp_path, hf=True, tied=True)
    _edit_safetensors(
        tmp_path / "model.safetensors",
        lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone()),
    )
    ckpt = Checkpoint(tmp_path)
    assert ckpt.args.tie_embeddings and "output.weight" not in ckpt.names()
    _assert_same_weights(ckpt, args, weights)


@pytest.mark.parametrize("name", ["layers.0.ffn_norm.weight", "layers.0.attention.wv.weight", "tok_embeddings.weight"])
def test_missing_tensor_meta(tmp_path, name):
    _small(tmp_path)
    _edit_pth(tmp_path / "consolidated.00.pth", lambda sd: sd.pop(name))
    _raises(tmp_path, str(tmp_path / "consolidated.00.pth"), repr(name), "missing")


@pytest.mark.parametrize(
    ("hf_name", "name"),
    [("model.norm.weight", "norm.weight"), ("model.layers.0.mlp.down_proj.weight", "layers.0.feed_forward.w2.weight")],
)
def test_missing_tensor_hf(tmp_path, hf_name, name):
    _small(tmp_path, hf=True)
    _edit_safetensors(tmp_path / "model.safetensors", lambda sd: sd.pop(hf_name))
    _raises(tmp_path, repr(name), "missing")


def test_hf_untied_without_lm_head(tmp_path):
    _small(tmp_path, hf=True)
    _edit_safetensors(tmp_path / "model.safetensors", lambda sd: sd.pop("lm_head.weight"))
    _raises(tmp_path, "'output.weight'", "missing")


def test_meta_without_output_is_tied_only_when_declared(tmp_path):
    # Meta's 3.2 1B/3B ship no output.weight: the embedding is the output matrix. Any other Meta checkpoint
    # without it is damaged, unless its params.json declares the tying (as make-tiny --tied writes it).
    args, weights = _small(tmp_path)
    _edit_pth(tmp_path / "consolidated.00.pth", lambda sd: sd.pop("output.weight"))
    _raises(tmp_path, str(tmp_path / "consolidated.00.pth"), "'output.weight'", '"tie_embeddings": true')
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "tie_embeddings": True}))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.args.tie_embeddings
    weights.pop("output.weight")
    _assert_same_weights(ckpt, replace(args, tie_embeddings=True), weights)


@pytest.mark.parametrize("hf", [False, True])
def test_integer_tensor(tmp_path, hf):
    _small(tmp_path, hf=hf)
    if hf:
        _edit_safetensors(
            tmp_path / "model.safetensors",
            lambda sd: sd.__setitem__("model.norm.weight", torch.arange(64, dtype=torch.int32)),
        )
    else:
        _edit_pth(
            tmp_path / "consolidated.00.pth",
            lambda sd: sd.__setitem__("norm.weight", torch.arange(64, dtype=torch.int32)),
        )
    _raises(tmp_path, "norm.weight", "floating-point", tensor="norm.weight")


# ---- shards that disagree -----------------------------------------------------------------------------------


def test_shards_disagree_on_names(tmp_path):
    _small(tmp_path, shards=2)
    _edit_pth(tmp_path / "consolidated.01.pth", lambda sd: sd.pop("layers.0.attention.wk.weight"))
    _raises(tmp_path, str(tmp_path / "consolidated.01.pth"), "disagree", "layers.0.attention.wk.weight")


def test_shards_disagree_on_extra_name(tmp_path):
    _small(tmp_path, shards=2)
    _edit_pth(tmp_path / "consolidated.01.pth", lambda sd: sd.__setitem__("layers.0.attention.wq.bias", torch.ones(2)))
    _raises(tmp_path, str(tmp_path / "consolidated.01.pth"), "disagree", "layers.0.attention.wq.bias")


@pytest.mark.parametrize("name", ["layers.0.attention_norm.weight", "norm.weight"])
def test_replicated_norm_differs_between_shards(tmp_path, name):
    _small(tmp_path, shards=2)

    def edit(sd):
        sd[name] = sd[name].clone()
        sd[name][5] += 0.25

    _edit_pth(tmp_path / "consolidated.01.pth", edit)
    _raises(tmp_path, str(tmp_path / "consolidated.01.pth"), name, "differs", tensor=name)


@pytest.mark.parametrize(
    "name", ["layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "layers.0.feed_forward.w2.weight"]
)
def test_mismatched_shard_shapes(tmp_path, name):
    _small(tmp_path, shards=2)
    shapes = {}

    def edit(sd):
        shapes["0"] = tuple(sd[name].shape)
        sd[name] = sd[name][:-2, :-2].clone()
        shapes["1"] = tuple(sd[name].shape)

    _edit_pth(tmp_path / "consolidated.01.pth", edit)
    _raises(tmp_path, str(tmp_path / "consolidated.01.pth"), name, str(shapes["0"]), str(shapes["1"]), tensor=name)


@pytest.mark.parametrize(
    "rename",
    [
        {"consolidated.01.pth": "consolidated.02.pth"},
        {"consolidated.00.pth": "consolidated.01.pth", "consolidated.01.pth": "consolidated.02.pth"},
        {"consolidated.01.pth": "consolidated.one.pth"},
        {"consolidated.01.pth": "consolidated.-1.pth"},
    ],
    ids=["gap", "no-zero", "not-a-number", "negative"],
)
def test_shard_files_not_numbered_from_zero(tmp_path, rename):
    _small(tmp_path, shards=2)
    for old, new in sorted(rename.items(), reverse=True):
        (tmp_path / old).rename(tmp_path / new)
    _raises(tmp_path, str(tmp_path), "consolidated.00.pth")


def test_duplicate_shard_number(tmp_path):
    _small(tmp_path)
    (tmp_path / "consolidated.0.pth").write_bytes((tmp_path / "consolidated.00.pth").read_bytes())
    _raises(tmp_path, str(tmp_path), "consolidated.00.pth")


def test_shards_are_merged_in_rank_order_not_name_order(tmp_path):
    # Eleven shards named without zero padding: "consolidated.10.pth" sorts before "consolidated.2.pth" by name.
    args = tiny_args(
        dim=88, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=264, multiple_of=44, ffn_dim_multiplier=None
    )
    weights = random_weights(args, 3, torch.float32)
    write_meta_checkpoint(tmp_path, args, weights, 11, 44, None, default_tokenizer_path())
    for r in range(11):
        (tmp_path / f"consolidated.{r:02d}.pth").rename(tmp_path / f"consolidated.{r}.pth")
    ckpt = Checkpoint(tmp_path)
    assert [f.name for f in ckpt.files] == [f"consolidated.{r}.pth" for r in range(11)]
    _assert_same_weights(ckpt, args, weights)


# ---- make_tiny never leaves half a checkpoint ---------------------------------------------------------------


def test_make_tiny_into_non_empty_dir(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty") as e:
        make_tiny(target, dim=64, n_layers=1)
    assert str(target) in str(e.value)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_make_tiny_onto_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        make_tiny(target, dim=64, n_layers=1)
    assert target.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize(
    "kwargs", [{"shards": 2}, {"dim": 0}, {"n_heads": 3}, {"n_layers": 0}, {"hf": True, "hf_shards": 0}]
)
def test_make_tiny_bad_arguments_write_nothing(tmp_path, kwargs):
    with pytest.raises(CheckpointError):
        make_tiny(tmp_path / "x", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_failing_half_way_leaves_nothing(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save_then_fail(obj, f, *a, **k):
        calls.append(Path(f))
        if len(calls) > 1:
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        make_tiny(tmp_path / "x", dim=64, n_layers=1, n_kv_heads=2, shards=2)
    assert len(calls) == 2 and calls[0].name == "consolidated.00.pth"
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_failing_in_the_hf_half_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        make_tiny(tmp_path / "x", hf=True, dim=64, n_layers=1)
    assert list(tmp_path.iterdir()) == []
