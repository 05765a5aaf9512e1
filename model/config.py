"""ModelArgs: the shape of a Llama-3 model, read from Meta's params.json or Hugging Face's config.json.

Both files describe the same models with different names. Everything the forward pass needs is
resolved here once (FFN width, RoPE scaling, tied output), so the driver never looks at raw JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama3_triton.model.errors import UserError, shown


class ConfigError(UserError):
    """A params.json / config.json that is missing, unreadable or describes an impossible model."""


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # FFN width (w1/w3 rows); derived from multiple_of/ffn_dim_multiplier for Meta's files
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None for Llama 3.0; for 3.1+: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: dict[str, float] | None = None
    tie_embeddings: bool = False  # Llama 3.2 1B/3B: the output matrix is the embedding matrix
    max_position_embeddings: int = 8192  # the context the model was trained for
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per k/v head (the GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    def num_parameters(self) -> int:
        hd = self.head_dim
        attn = self.dim * (self.n_heads * hd) * 2 + self.dim * (self.n_kv_heads * hd) * 2
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        out = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + out

    def kv_cache_bytes_per_token(self, bytes_per_element: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width: 2/3 of 4*dim, times the multiplier, rounded up to a multiple of multiple_of.

    Llama-3-8B: 4*4096 = 16384 -> 10922 -> x1.3 = 14198 -> 14336.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# A config file is a few hundred bytes; refuse to read (and parse) gigabytes from a damaged or hostile one.
MAX_CONFIG_BYTES = 1 << 20
# The largest size any field may have: shapes are products of these, and must fit torch's int64 sizes.
MAX_FIELD = 2**31 - 1


def _read_json(path: Path) -> dict[str, Any]:
    from llama3_triton.model.checkpoints.files import open_regular

    try:
        fd = open_regular(path, "config")  # a FIFO in its place would block a plain read forever
        with open(fd, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes, not a model config")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    except ConfigError:
        raise
    except ValueError as e:  # not a regular file
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(data: dict[str, Any], path: Path, key: str, kind: type, default: Any = ..., positive: bool = True) -> Any:
    if key not in data or data[key] is None:
        if default is ...:
            raise ConfigError(f"{path}: missing field {shown(key)}")
        return default
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{path}: field {shown(key)} must be {kind.__name__}, got {shown(value)}")
    if positive and kind in (int, float) and not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{path}: field {shown(key)} must be a positive number, got {shown(value)}")
    if kind is int and abs(value) > MAX_FIELD:
        raise ConfigError(f"{path}: field {shown(key)} is {value}, larger than any model's (at most {MAX_FIELD})")
    return value


def _check(args: ModelArgs, path: Path) -> ModelArgs:
    for key in ("rope_theta", "norm_eps"):  # floats from a file: Infinity and NaN parse as JSON numbers
        v = getattr(args, key)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{path}: {key} must be a finite positive number, got {str(v)[:80]}")
    if args.dim % args.n_heads:
        raise ConfigError(f"{path}: dim {args.dim} is not divisible by n_heads {args.n_heads}")
    if args.n_heads % args.n_kv_heads:
        raise ConfigError(f"{path}: n_heads {args.n_heads} is not a multiple of n_kv_heads {args.n_kv_heads}")
    if args.head_dim % 2:
        raise ConfigError(f"{path}: head dim {args.head_dim} must be even for rotary embeddings")
    s = args.rope_scaling
    if s is not None:
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            v = s.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise ConfigError(
                    f"{path}: RoPE scaling field {shown(key)} must be a finite positive number, got {str(v)[:80]}"
                )
        if s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ConfigError(f"{path}: RoPE high_freq_factor must exceed low_freq_factor, got {s}")
    return args


def _llama3_scaling(factor: float, low: float = 1.0, high: float = 4.0, original: int = 8192) -> dict[str, float]:
    return {
        "factor": float(factor),
        "low_freq_factor": float(low),
        "high_freq_factor": float(high),
        "original_max_position_embeddings": int(original),
    }


def from_meta_params(path: Path) -> ModelArgs:
    """Meta's params.json: dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier,
    norm_eps, rope_theta, use_scaled_rope."""
    p = _read_json(path)
    dim = _get(p, path, "dim", int)
    n_heads = _get(p, path, "n_heads", int)
    scaled = _get(p, path, "use_scaled_rope", bool, default=False, positive=False)
    n_layers = _get(p, path, "n_layers", int)
    scaling = None
    if scaled:
        # Meta's params.json says only use_scaled_rope; its code hard-codes factor 8, while the same 3.2
        # 1B/3B models on Hugging Face declare factor 32. We take a factor written in the file when there is
        # one (our tiny checkpoints write it), else 32 for the 3.2 text shapes (dim 2048/16 layers,
        # dim 3072/28 layers), else Llama 3.1's 8.
        default = 32.0 if (dim, n_layers) in ((2048, 16), (3072, 28)) else 8.0
        scaling = _llama3_scaling(
            _get(p, path, "rope_scaling_factor", float, default=default),
            _get(p, path, "low_freq_factor", float, default=1.0),
            _get(p, path, "high_freq_factor", float, default=4.0),
            _get(p, path, "original_max_position_embeddings", int, default=8192),
        )
    multiplier = _get(p, path, "ffn_dim_multiplier", float, default=None)
    tied = _get(p, path, "tie_embeddings", bool, default=None, positive=False)
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_get(p, path, "n_kv_heads", int, default=n_heads),
        vocab_size=_get(p, path, "vocab_size", int),
        hidden_dim=ffn_hidden_dim(dim, _get(p, path, "multiple_of", int, default=256), multiplier),
        norm_eps=_get(p, path, "norm_eps", float, default=1e-5),
        rope_theta=_get(p, path, "rope_theta", float, default=500000.0),
        rope_scaling=scaling,
        # Meta's files do not say whether the output is tied (3.2 1B/3B ship no output.weight); ours write
        # "tie_embeddings". The loader decides from this and the weights (checkpoint.Checkpoint._meta_tied).
        tie_embeddings=bool(tied),
        max_position_embeddings=131072 if scaled else 8192,
        extra={"tie_embeddings": tied},
    )
    return _check(args, path)


def from_hf_config(path: Path) -> ModelArgs:
    """Hugging Face's config.json (LlamaForCausalLM). RoPE settings live in ``rope_scaling`` + ``rope_theta``
    (transformers 4.x) or together in ``rope_parameters`` (transformers 5)."""
    c = _read_json(path)
    model_type = c.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{path}: model_type is {shown(model_type)}, expected 'llama'")
    dim = _get(c, path, "hidden_size", int)
    n_heads = _get(c, path, "num_attention_heads", int)
    head_dim = c.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise ConfigError(f"{path}: head_dim {head_dim} x num_attention_heads {n_heads} != hidden_size {dim}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{path}: rope_scaling must be an object, got {shown(rope)}")
    theta = rope.get("rope_theta", c.get("rope_theta", 500000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not (theta > 0 and math.isfinite(theta)):
        raise ConfigError(f"{path}: rope_theta must be a positive number, got {shown(theta)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = {k: rope.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_position_embeddings"] = rope.get("original_max_position_embeddings")
    elif rope_type == "default":
        scaling = None
    else:
        raise ConfigError(f"{path}: RoPE type {shown(rope_type)} is not Llama 3's ('llama3' or none)")
    args = ModelArgs(
        dim=dim,
        n_layers=_get(c, path, "num_hidden_layers", int),
        n_heads=n_heads,
        n_kv_heads=_get(c, path, "num_key_value_heads", int, default=n_heads),
        vocab_size=_get(c, path, "vocab_size", int),
        hidden_dim=_get(c, path, "intermediate_size", int),
        norm_eps=_get(c, path, "rms_norm_eps", float, default=1e-5),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_embeddings=_get(c, path, "tie_word_embeddings", bool, default=False, positive=False),
        max_position_embeddings=_get(c, path, "max_position_embeddings", int, default=8192),
    )
    return _check(args, path)


def to_meta_params(args: ModelArgs, multiple_of: int, ffn_dim_multiplier: float | None) -> dict[str, Any]:
    """params.json for ``args`` (used by the tiny-checkpoint writer); RoPE factors written explicitly."""
    p: dict[str, Any] = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": args.rope_scaling is not None,
    }
    if args.tie_embeddings:  # not in Meta's own files; without it a missing output.weight is refused
        p["tie_embeddings"] = True
    if args.rope_scaling is not None:
        p["rope_scaling_factor"] = args.rope_scaling["factor"]
        p["low_freq_factor"] = args.rope_scaling["low_freq_factor"]
        p["high_freq_factor"] = args.rope_scaling["high_freq_factor"]
        p["original_max_position_embeddings"] = args.rope_scaling["original_max_position_embeddings"]
    return p


def to_hf_config(args: ModelArgs) -> dict[str, Any]:
    """config.json for ``args`` in transformers' LlamaConfig vocabulary (readable by transformers 4.45+ and 5)."""
    rope_scaling = None
    if args.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **args.rope_scaling}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": args.tie_embeddings,
        "max_position_embeddings": args.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "float32",
    }
