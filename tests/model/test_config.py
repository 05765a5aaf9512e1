"""model.config: Meta's params.json and Hugging Face's config.json -> ModelArgs, for the real Llama-3 shapes.

The params.json contents are the ones Meta ships; the config.json contents are the ones on the Hugging Face
hub (transformers 4 vocabulary) plus what transformers 5 writes itself (``LlamaConfig(...).to_dict()``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from llama3_triton.model.config import (
    ConfigError,
    ModelArgs,
    ffn_hidden_dim,
    from_hf_config,
    from_meta_params,
    to_hf_config,
    to_meta_params,
)
from llama3_triton.model.tools.tiny import tiny_args

_BASE = {"vocab_size": 128256, "norm_eps": 1e-05, "rope_theta": 500000.0}

# name: (params.json as Meta ships it, FFN width, RoPE scaling factor or None, context, tied on the hub)
MODELS = {
    "3-8B": (
        {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024, "ffn_dim_multiplier": 1.3},
        14336,
        None,
        8192,
        False,
    ),
    "3.1-8B": (
        {
            "dim": 4096,
            "n_layers": 32,
            "n_heads": 32,
            "n_kv_heads": 8,
            "multiple_of": 1024,
            "ffn_dim_multiplier": 1.3,
            "use_scaled_rope": True,
        },
        14336,
        8.0,
        131072,
        False,
    ),
    "3.1-70B": (
        {
            "dim": 8192,
            "n_layers": 80,
            "n_heads": 64,
            "n_kv_heads": 8,
            "multiple_of": 4096,
            "ffn_dim_multiplier": 1.3,
            "use_scaled_rope": True,
        },
        28672,
        8.0,
        131072,
        False,
    ),
    "3.1-405B": (
        {
            "dim": 16384,
            "n_layers": 126,
            "n_heads": 128,
            "n_kv_heads": 8,
            "multiple_of": 4096,
            "ffn_dim_multiplier": 1.2,
            "use_scaled_rope": True,
        },
        53248,
        8.0,
        131072,
        False,
    ),
    "3.2-1B": (
        {
            "dim": 2048,
            "n_layers": 16,
            "n_heads": 32,
            "n_kv_heads": 8,
            "multiple_of": 256,
            "ffn_dim_multiplier": 1.5,
            "use_scaled_rope": True,
        },
        8192,
        32.0,
        131072,
        True,
    ),
    "3.2-3B": (
        {
            "dim": 3072,
            "n_layers": 28,
            "n_heads": 24,
            "n_kv_heads": 8,
            "multiple_of": 256,
            "ffn_dim_multiplier": 1.0,
            "use_scaled_rope": True,
        },
        8192,
        32.0,
        131072,
        True,
    ),
}


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _meta_params(model: str) -> dict:
    return {**MODELS[model][0], **_BASE}


def _expected(model: str, tied: bool = False) -> ModelArgs:
    p, hidden, factor, context, _ = MODELS[model]
    scaling = None
    if factor is not None:
        scaling = {
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return ModelArgs(
        dim=p["dim"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"],
        vocab_size=128256,
        hidden_dim=hidden,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=scaling,
        tie_embeddings=tied,
        max_position_embeddings=context,
    )


def _hf_v4(model: str) -> dict:
    """config.json as on the hub (transformers 4.4x): rope_scaling + rope_theta side by side."""
    p, hidden, factor, context, tied = MODELS[model]
    rope_scaling = None
    if factor is not None:
        rope_scaling = {
            "factor": factor,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": p["dim"],
        "initializer_range": 0.02,
        "intermediate_size": hidden,
        "max_position_embeddings": context,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": p["n_heads"],
        "num_hidden_layers": p["n_layers"],
        "num_key_value_heads": p["n_kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    }


def _hf_v5(model: str) -> dict:
    """The same in transformers 5's vocabulary: rope_theta moves into rope_parameters."""
    c = _hf_v4(model)
    rope = c.pop("rope_scaling") or {"rope_type": "default"}
    c["rope_parameters"] = {**rope, "rope_theta": c.pop("rope_theta")}
    return c


def _hf_transformers(model: str) -> dict:
    """What transformers itself writes for the model (``LlamaConfig(...).to_dict()``)."""
    c = _hf_v4(model)
    config = transformers.LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"],
        tie_word_embeddings=c["tie_word_embeddings"],
        rope_theta=c["rope_theta"],
        rope_scaling=c["rope_scaling"],
    )
    return config.to_dict()


# ---- Meta's params.json -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_meta_params(tmp_path, model):
    args = from_meta_params(_write(tmp_path, "params.json", _meta_params(model)))
    assert args == _expected(model)
    assert args.hidden_dim == MODELS[model][1]
    assert args.head_dim == (128 if model != "3.2-1B" else 64)
    assert args.n_rep == args.n_heads // 8
    assert args.tie_embeddings is False  # decided by the weights, not by params.json


def test_hidden_dims_from_metas_formula():
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672
    assert ffn_hidden_dim(16384, 4096, 1.2) == 53248
    assert ffn_hidden_dim(2048, 256, 1.5) == 8192
    assert ffn_hidden_dim(3072, 256, 1.0) == 8192
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B: no multiplier


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"rope_scaling_factor": 16}, {"factor": 16.0}),
        ({"rope_scaling_factor": 4.0, "low_freq_factor": 2, "high_freq_factor": 8.0}, {"factor": 4.0}),
        ({"original_max_position_embeddings": 4096}, {"factor": 32.0, "original_max_position_embeddings": 4096}),
    ],
)
def test_explicit_rope_fields_in_params_win(tmp_path, extra, expected):
    args = from_meta_params(_write(tmp_path, "params.json", {**_meta_params("3.2-1B"), **extra}))
    want = {
        "factor": 32.0,
        "low_freq_factor": float(extra.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(extra.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": 8192,
        **expected,
    }
    assert args.rope_scaling == want


def test_scaling_fields_ignored_without_use_scaled_rope(tmp_path):
    params = {**_meta_params("3-8B"), "rope_scaling_factor": 8.0, "use_scaled_rope": False}
    assert from_meta_params(_write(tmp_path, "params.json", params)).rope_scaling is None


def test_meta_defaults(tmp_path):
    # n_kv_heads defaults to n_heads (no GQA), multiple_of to 256, no multiplier, eps 1e-5, theta 500000.
    params = {"dim": 512, "n_layers": 2, "n_heads": 8, "vocab_size": 1000}
    args = from_meta_params(_write(tmp_path, "params.json", params))
    assert (args.n_kv_heads, args.hidden_dim, args.norm_eps, args.rope_theta) == (8, 1536, 1e-5, 500000.0)
    assert args.rope_scaling is None and args.max_position_embeddings == 8192


# ---- Hugging Face config.json -------------------------------------------------------------------------------


@pytest.mark.parametrize("style", [_hf_v4, _hf_v5, _hf_transformers], ids=["transformers4", "transformers5", "dict"])
@pytest.mark.parametrize("model", list(MODELS))
def test_hf_config(tmp_path, model, style):
    args = from_hf_config(_write(tmp_path, "config.json", style(model)))
    assert args == _expected(model, tied=MODELS[model][4])
    # The same model from either file: only tying differs (params.json cannot say it).
    meta = from_meta_params(_write(tmp_path, "params.json", _meta_params(model)))
    assert replace(meta, tie_embeddings=args.tie_embeddings) == args


def test_hf_legacy_rope_type_key(tmp_path):
    c = _hf_v4("3.1-8B")
    c["rope_scaling"]["type"] = c["rope_scaling"].pop("rope_type")
    assert from_hf_config(_write(tmp_path, "config.json", c)) == _expected("3.1-8B")


def test_hf_rope_theta_inside_rope_parameters_wins(tmp_path):
    c = _hf_v5("3-8B")
    c["rope_parameters"]["rope_theta"] = 10000.0
    c["rope_theta"] = 500000.0  # a stale top-level value
    assert from_hf_config(_write(tmp_path, "config.json", c)).rope_theta == 10000.0


@pytest.mark.parametrize("model", ["3-8B", "3.2-1B"])
def test_hf_config_from_transformers_loads_in_transformers(tmp_path, model):
    # The config transformers itself reads from our file: same model.
    path = _write(tmp_path, "config.json", _hf_v4(model))
    tf = transformers.LlamaConfig.from_json_file(str(path))
    assert from_hf_config(_write(tmp_path, "again.json", tf.to_dict())) == from_hf_config(path)


# ---- parameter counts ---------------------------------------------------------------------------------------


def test_num_parameters_8b(tmp_path):
    args = from_meta_params(_write(tmp_path, "params.json", _meta_params("3-8B")))
    assert args.num_parameters() == 8_030_261_248


def test_num_parameters_3_2_1b_tied(tmp_path):
    args = from_hf_config(_write(tmp_path, "config.json", _hf_v4("3.2-1B")))
    assert args.tie_embeddings
    assert args.num_parameters() == 1_235_814_400
    assert replace(args, tie_embeddings=False).num_parameters() == 1_235_814_400 + 128256 * 2048


@pytest.mark.parametrize("model", ["3-8B", "3.2-1B", "3.2-3B"])
def test_num_parameters_equals_transformers(tmp_path, model):
    path = _write(tmp_path, "config.json", _hf_v4(model))
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_json_file(str(path)))
    assert from_hf_config(path).num_parameters() == sum(p.numel() for p in hf_model.parameters())


def test_kv_cache_bytes(tmp_path):
    args = from_meta_params(_write(tmp_path, "params.json", _meta_params("3-8B")))
    assert args.kv_cache_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16


# ---- writers round-trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"dim": 256, "n_heads": 4, "n_kv_heads": 4, "rope_scaling_factor": None},
        {"dim": 192, "n_layers": 3, "n_heads": 3, "n_kv_heads": 1, "rope_scaling_factor": 32.0, "rope_theta": 1e4},
        {"dim": 64, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 64, "ffn_dim_multiplier": None, "vocab_size": 300},
    ],
)
def test_writers_round_trip(tmp_path, kwargs):
    args = tiny_args(**kwargs)
    multiple_of, mult = kwargs.get("multiple_of", 32), kwargs.get("ffn_dim_multiplier", 1.3)
    assert from_meta_params(_write(tmp_path, "params.json", to_meta_params(args, multiple_of, mult))) == args
    assert from_hf_config(_write(tmp_path, "config.json", to_hf_config(args))) == args
    tied = replace(args, tie_embeddings=True)
    assert from_hf_config(_write(tmp_path, "tied.json", to_hf_config(tied))) == tied
    # transformers reads our config.json as the same model.
    tf = transformers.LlamaConfig.from_dict(to_hf_config(tied)).to_dict()
    assert from_hf_config(_write(tmp_path, "tf.json", tf)) == tied


# ---- bad files ----------------------------------------------------------------------------------------------


def _meta_bad(**changes) -> dict:
    p = _meta_params("3.1-8B")
    for k, v in changes.items():
        if v is _DELETE:
            del p[k]
        else:
            p[k] = v
    return p


def _hf_bad(**changes) -> dict:
    c = _hf_v4("3.1-8B")
    for k, v in changes.items():
        if v is _DELETE:
            del c[k]
        else:
            c[k] = v
    return c


_DELETE = object()
_LLAMA3_ROPE = _hf_v4("3.1-8B")["rope_scaling"]

META_BAD = {
    "missing-dim": (_meta_bad(dim=_DELETE), "'dim'"),
    "missing-n_layers": (_meta_bad(n_layers=_DELETE), "'n_layers'"),
    "missing-vocab": (_meta_bad(vocab_size=_DELETE), "'vocab_size'"),
    "null-dim": (_meta_bad(dim=None), "'dim'"),
    "string-dim": (_meta_bad(dim="4096"), "'dim'"),
    "bool-dim": (_meta_bad(dim=True), "'dim'"),
    "float-layers": (_meta_bad(n_layers=32.0), "'n_layers'"),
    "bool-heads": (_meta_bad(n_heads=False), "'n_heads'"),
    "string-eps": (_meta_bad(norm_eps="1e-5"), "'norm_eps'"),
    "string-scaled": (_meta_bad(use_scaled_rope="yes"), "'use_scaled_rope'"),
    "int-scaled": (_meta_bad(use_scaled_rope=1), "'use_scaled_rope'"),
    "list-multiplier": (_meta_bad(ffn_dim_multiplier=[1.3]), "'ffn_dim_multiplier'"),
    "dim-0": (_meta_bad(dim=0), "'dim'"),
    "negative-dim": (_meta_bad(dim=-4096), "'dim'"),
    "negative-layers": (_meta_bad(n_layers=-1), "'n_layers'"),
    "zero-kv": (_meta_bad(n_kv_heads=0), "'n_kv_heads'"),
    "zero-vocab": (_meta_bad(vocab_size=0), "'vocab_size'"),
    "zero-multiple": (_meta_bad(multiple_of=0), "'multiple_of'"),
    "negative-multiplier": (_meta_bad(ffn_dim_multiplier=-1.3), "'ffn_dim_multiplier'"),
    "zero-eps": (_meta_bad(norm_eps=0), "'norm_eps'"),
    "negative-theta": (_meta_bad(rope_theta=-500000.0), "'rope_theta'"),
    "heads-not-dividing-dim": (_meta_bad(n_heads=31), "n_heads 31"),
    "kv-not-dividing-heads": (_meta_bad(n_kv_heads=5), "n_kv_heads 5"),
    "kv-more-than-heads": (_meta_bad(n_kv_heads=64), "n_kv_heads 64"),
    "odd-head-dim": (_meta_bad(dim=96, n_heads=32, n_kv_heads=8), "head dim 3"),
    "negative-factor": (_meta_bad(rope_scaling_factor=-8.0), "'rope_scaling_factor'"),
    "string-factor": (_meta_bad(rope_scaling_factor="8"), "'rope_scaling_factor'"),
    "zero-low-freq": (_meta_bad(low_freq_factor=0), "'low_freq_factor'"),
    "high-below-low": (_meta_bad(low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
    "float-original-context": (
        _meta_bad(original_max_position_embeddings=8192.5),
        "'original_max_position_embeddings'",
    ),
}


@pytest.mark.parametrize("case", list(META_BAD))
def test_bad_meta_params(tmp_path, case):
    data, field = META_BAD[case]
    path = _write(tmp_path, "params.json", data)
    with pytest.raises(ConfigError) as e:
        from_meta_params(path)
    assert str(path) in str(e.value)
    assert field in str(e.value)


HF_BAD = {
    "model-type": (_hf_bad(model_type="mistral"), "'mistral'"),
    "missing-hidden": (_hf_bad(hidden_size=_DELETE), "'hidden_size'"),
    "missing-layers": (_hf_bad(num_hidden_layers=_DELETE), "'num_hidden_layers'"),
    "missing-intermediate": (_hf_bad(intermediate_size=_DELETE), "'intermediate_size'"),
    "string-hidden": (_hf_bad(hidden_size="4096"), "'hidden_size'"),
    "bool-vocab": (_hf_bad(vocab_size=True), "'vocab_size'"),
    "zero-intermediate": (_hf_bad(intermediate_size=0), "'intermediate_size'"),
    "negative-layers": (_hf_bad(num_hidden_layers=-32), "'num_hidden_layers'"),
    "string-tied": (_hf_bad(tie_word_embeddings="true"), "'tie_word_embeddings'"),
    "zero-eps": (_hf_bad(rms_norm_eps=0.0), "'rms_norm_eps'"),
    "kv-not-dividing": (_hf_bad(num_key_value_heads=6), "n_kv_heads 6"),
    "heads-not-dividing": (_hf_bad(num_attention_heads=30), "num_attention_heads 30"),
    "head-dim-mismatch": (_hf_bad(head_dim=64), "head_dim 64"),
    "odd-head-dim": (
        _hf_bad(hidden_size=96, num_attention_heads=32, num_key_value_heads=8, head_dim=3),
        "head dim 3",
    ),
    "rope-scaling-string": (_hf_bad(rope_scaling="llama3"), "rope_scaling"),
    "rope-scaling-list": (_hf_bad(rope_scaling=[8.0]), "rope_scaling"),
    "rope-type-yarn": (_hf_bad(rope_scaling={**_LLAMA3_ROPE, "rope_type": "yarn"}), "'yarn'"),
    "rope-type-linear": (_hf_bad(rope_scaling={"type": "linear", "factor": 2.0}), "'linear'"),
    "llama3-no-factor": (
        _hf_bad(rope_scaling={k: v for k, v in _LLAMA3_ROPE.items() if k != "factor"}),
        "'factor'",
    ),
    "llama3-string-factor": (_hf_bad(rope_scaling={**_LLAMA3_ROPE, "factor": "8"}), "'factor'"),
    "llama3-bool-low": (_hf_bad(rope_scaling={**_LLAMA3_ROPE, "low_freq_factor": True}), "'low_freq_factor'"),
    "llama3-zero-context": (
        _hf_bad(rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 0}),
        "'original_max_position_embeddings'",
    ),
    "llama3-high-below-low": (
        _hf_bad(rope_scaling={**_LLAMA3_ROPE, "high_freq_factor": 0.5}),
        "high_freq_factor",
    ),
    "string-theta": (_hf_bad(rope_theta="500000"), "rope_theta"),
    "zero-theta": (_hf_bad(rope_theta=0), "rope_theta"),
    "bool-theta": (_hf_bad(rope_theta=True), "rope_theta"),
    "theta-in-parameters": (
        _hf_bad(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
        "rope_theta",
    ),
}


@pytest.mark.parametrize("case", list(HF_BAD))
def test_bad_hf_config(tmp_path, case):
    data, field = HF_BAD[case]
    path = _write(tmp_path, "config.json", data)
    with pytest.raises(ConfigError) as e:
        from_hf_config(path)
    assert str(path) in str(e.value)
    assert field in str(e.value)


@pytest.mark.parametrize("reader", [from_meta_params, from_hf_config])
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        ("", "not valid JSON"),
        ('{"dim": 4096,', "not valid JSON"),
        (b"\xff\xfe{\x00}", "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object, got list"),
        ('"params"', "expected a JSON object, got str"),
        ("null", "expected a JSON object, got NoneType"),
    ],
)
def test_unreadable_files(tmp_path, reader, content, expected):
    path = tmp_path / "cfg.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected) as e:
        reader(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers(tmp_path, value):
    # Python's json accepts these non-standard literals; they must not become a model.
    text = json.dumps(_meta_params("3-8B")).replace('"norm_eps": 1e-05', f'"norm_eps": {value}')
    assert value in text
    path = _write(tmp_path, "params.json", text)
    with pytest.raises(ConfigError, match="'norm_eps'"):
        from_meta_params(path)
    hf = json.dumps(_hf_v4("3-8B")).replace('"rope_theta": 500000.0', f'"rope_theta": {value}')
    with pytest.raises(ConfigError, match="rope_theta"):
        from_hf_config(_write(tmp_path, "config.json", hf))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("field", ["factor", "low_freq_factor", "original_max_position_embeddings"])
@pytest.mark.parametrize("value", ["Infinity", "NaN"])
def test_non_finite_rope_scaling_is_refused(tmp_path, field, value):
    """JSON's Infinity and NaN parse as floats: a config.json with rope_scaling.factor = Infinity loaded and
    generated. Every float from a file is finite and in range."""
    c = _hf_v4("3.1-8B")
    c["rope_scaling"][field] = 1.0
    text = json.dumps(c).replace(f'"{field}": 1.0', f'"{field}": {value}')
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"RoPE scaling field '{field}' must be a finite positive number, got "):
        from_hf_config(path)


def test_a_non_finite_rope_theta_is_refused(tmp_path):
    c = _hf_v4("3.1-8B")
    c["rope_theta"] = 1.0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c).replace('"rope_theta": 1.0', '"rope_theta": Infinity'))
    with pytest.raises(ConfigError, match=r"rope_theta"):
        from_hf_config(path)
