"""Reading GGUF files (llama.cpp's format) of the Llama architecture.

A GGUF file is one memory-mapped file: a header of typed key/value metadata (the config, the tokenizer's
token list, merges and chat template) followed by the tensors, each in its own storage type (F32, F16,
BF16, or block-quantized: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...). ``_Header`` reads the header itself, every count
checked against the bytes left and the token arrays decoded only when the tokenizer asks; the ``gguf`` package,
maintained with llama.cpp, supplies the storage types' block sizes and ``gguf.quants.dequantize``, which turns one
tensor's blocks into fp32.

``GGUFCheckpoint`` presents the file the way ``model.checkpoint.Checkpoint`` presents Meta's and Hugging
Face's folders: ``args`` (ModelArgs from the metadata) and ``tensor(name)`` under Meta's names, one
weight at a time, dequantized on demand, so host memory holds the (mapped) file plus one fp32 tensor.

The q/k layout: llama.cpp's Llama graph uses the interleaved-pairs RoPE (its "NORM" mode), Meta's, and
its converter undoes Hugging Face's rotate-half permutation of wq/wk when it writes the file
(``LlamaModel.permute`` in convert_hf_to_gguf.py). So the rows are already in the order this project
uses, and nothing is permuted here. Checked on SmolLM2-135M-Instruct against transformers
(tests/model/checkpoints/test_gguf.py: the logits agree only with this choice).

Llama 3.1+ RoPE scaling is not in the metadata: the converter stores the per-frequency divisors as a
``rope_freqs.weight`` tensor. We accept it when it is exactly Meta's llama3 formula for some factor (the
usual low/high frequency factors 1 and 4 and original context 8192), and refuse anything else.

Nothing in a GGUF file is executed: it holds numbers and strings only (the chat template is rendered in
a sandboxed Jinja environment by model/hf_tokenizer.py).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Only public names of checkpoint.py/config.py: both are being reworked, and this module should not care how.
from llama3_triton.model.checkpoints.folder import (
    META_SPLIT_DIM,
    CheckpointError,
    check_tensor_parallel,
    expected_shapes,
)
from llama3_triton.model.config import ConfigError, ModelArgs
from llama3_triton.model.errors import shown

GGUF_MAGIC = b"GGUF"

# GGUF (llama.cpp) tensor names -> Meta's.
_TOP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_BLOCK = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}
ROPE_FREQS = "rope_freqs.weight"


def is_gguf(path: str | os.PathLike) -> bool:
    """A path that names a GGUF file: a ``.gguf`` suffix, or a regular file that starts with the magic."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _meta_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    return None


def _rank_shape(name: str, shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    """A tensor-parallel rank's share of a weight: split dim divided by ``world`` (see META_SPLIT_DIM)."""
    split = META_SPLIT_DIM[name.rsplit(".", 2)[-2]]
    return shape if split is None else tuple(s // world if d == split else s for d, s in enumerate(shape))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ---- the header: read here, every count checked against the bytes left ---------------------------------------

# GGUF value types: struct formats of the fixed-size ones (8: string, 9: array, handled apart).
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_FIXED = {k: struct.calcsize(f) for k, f in _FORMATS.items()}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# The longest metadata array a Llama-3 file needs: its tokenizer's merges (~280k) and tokens (128,256). A longer
# one, needed or not, is refused: a file claiming 2**62 elements must not start work that grows with the claim.
MAX_ARRAY = 1 << 20
MAX_STRING = 16 << 20  # a chat template is a few KB; a token a few bytes
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32  # general.alignment when the file does not say


@dataclass
class _Field:
    """One metadata value: a scalar or string read at once; an array kept as (element type, count, offset) and
    read when asked for (a tokenizer's 100k-string arrays cost nothing until the tokenizer wants them)."""

    vtype: int
    value: Any = None
    etype: int = -1
    count: int = 0
    offset: int = 0


@dataclass
class _Tensor:
    """One tensor record: its GGUF name, dims fastest-first (as stored), storage type id, and its data as a
    read-only numpy view of the mapped file (the bytes of the blocks, or the values of a float/int type)."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    data: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major shape, slowest dim first (GGUF lists dims fastest-first)."""
        return tuple(reversed(self.dims))

    @property
    def tensor_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id)


class _Header:
    """A GGUF file's metadata and tensor records, read with every count checked against the bytes left.

    Numeric arrays are skipped in O(1) (count times element size, which must fit); string arrays are walked by
    their length prefixes, at most MAX_ARRAY of them, and decoded only when asked for. Raises CheckpointError
    naming the field for a count the file cannot hold, an array longer than MAX_ARRAY, a type GGUF does not
    define, a tensor whose data lies past the end of the file. Time and memory do not depend on what the counts
    claim. (gguf.GGUFReader, which this replaces, builds a numpy view per element of every array at open: 1.9 s
    for SmolLM2's tokenizer, on every start.)"""

    def __init__(self, path: Path, m: mmap.mmap):
        self.path, self.m = path, m
        size = len(m)
        self.pos = 4
        self.version = self._take("<I", "the version")
        if self.version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {self.version} (this reader takes versions 2 and 3)")
        n_tensors = self._take("<Q", "the tensor count")
        n_kv = self._take("<Q", "the metadata count")
        # Each key/value needs at least 8 (key length) + 4 (type) + 1 bytes; each tensor record 8+4+8+4+8.
        if n_kv * 13 > size - self.pos or n_tensors * 32 > size - self.pos:
            raise CheckpointError(
                f"{path}: GGUF header claims {n_kv:,} metadata fields and {n_tensors:,} tensors, more than its "
                f"{size:,} bytes can hold"
            )
        self.fields: dict[str, _Field] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key {i}").decode("utf-8", "replace")
            what = f"metadata field {shown(key)}"
            if key in self.fields:
                raise CheckpointError(f"{path}: GGUF {what} appears twice")
            self.fields[key] = self._field(what)
        records = []
        for i in range(n_tensors):
            name = self._string(f"tensor record {i}").decode("utf-8", "replace")
            what = f"tensor {shown(name)}"
            n_dims = self._take("<I", what)
            if not 1 <= n_dims <= MAX_DIMS:
                raise CheckpointError(f"{path}: GGUF {what} has {n_dims} dimensions (1 to {MAX_DIMS})")
            dims = tuple(self._take("<Q", what) for _ in range(n_dims))
            if any(d == 0 or d > size * 8 for d in dims):  # 8: the most elements a byte can hold (1-bit)
                raise CheckpointError(f"{path}: GGUF {what} has dimensions {list(dims)}, more than the file can hold")
            records.append((name, dims, self._take("<I", what), self._take("<Q", what)))
        align = self.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            raise CheckpointError(f"{path}: GGUF general.alignment is {shown(align)}, not a power of two")
        self.data_start = -(-self.pos // align) * align
        self.tensors = [self._tensor(*r) for r in records]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            dup = next(n for n, c in Counter(t.name for t in self.tensors).items() if c > 1)
            raise CheckpointError(f"{path}: GGUF tensor {shown(dup)} appears twice")

    # -- the walk
    def _take(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.m):
            raise CheckpointError(f"{self.path}: GGUF header truncated in {what} (byte {self.pos} of {len(self.m)})")
        v = struct.unpack_from(fmt, self.m, self.pos)[0]
        self.pos += n
        return v

    def _skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.m):
            raise CheckpointError(
                f"{self.path}: GGUF {what} claims {n:,} bytes, but only {len(self.m) - self.pos:,} are left in the file"
            )
        self.pos += n

    def _string(self, what: str) -> bytes:
        n = self._take("<Q", what)
        if n > MAX_STRING:
            raise CheckpointError(f"{self.path}: GGUF {what} is a string of {n:,} bytes (at most {MAX_STRING:,})")
        start = self.pos
        self._skip(n, what)
        return bytes(self.m[start : self.pos])

    def _field(self, what: str) -> _Field:
        vtype = self._take("<I", what)
        if vtype in _FORMATS:
            return _Field(vtype, self._take(_FORMATS[vtype], what))
        if vtype == _STRING:
            return _Field(vtype, self._string(what))
        if vtype != _ARRAY:
            raise CheckpointError(f"{self.path}: GGUF {what} has type {vtype}, not one GGUF defines")
        etype, count = self._take("<I", what), self._take("<Q", what)
        if count > MAX_ARRAY:
            raise CheckpointError(
                f"{self.path}: GGUF {what} is an array of {count:,} elements (a Llama model's longest, its "
                f"tokenizer's, has under {MAX_ARRAY:,}): not read"
            )
        field = _Field(vtype, etype=etype, count=count, offset=self.pos)
        if etype in _FIXED:
            self._skip(count * _FIXED[etype], what)
        elif etype == _STRING:
            if count * 8 > len(self.m) - self.pos:
                self._skip(count * 8, what)  # raises: the length prefixes alone do not fit
            # The length prefixes, walked in a tight loop (a tokenizer's 100k strings in ~30 ms); the first that
            # does not fit is read again by _string, which raises with its message.
            m, size, unpack, pos = self.m, len(self.m), _U64.unpack_from, self.pos
            for _ in range(count):
                if pos + 8 > size or (end := pos + 8 + unpack(m, pos)[0]) > size or end - pos - 8 > MAX_STRING:
                    self.pos = pos
                    self._string(what)
                pos = end
            self.pos = pos
        else:  # nested arrays: GGUF allows them, no Llama file has one
            raise CheckpointError(f"{self.path}: GGUF {what} is an array of type {etype}, not one this reader takes")
        return field

    def _tensor(self, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> _Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        what = f"tensor {shown(name)}"
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(
                f"{self.path}: GGUF {what} has storage type {type_id}, not one GGUF defines"
            ) from None
        n = math.prod(dims)
        shape = tuple(reversed(dims))
        if dims[0] % block:
            raise CheckpointError(f"{self.path}: GGUF {what}: rows of {dims[0]} values are not whole {qtype.name} "
                                  f"blocks of {block}")  # fmt: skip
        n_bytes = n // block * type_size
        start = self.data_start + offset
        if start + n_bytes > len(self.m):
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file, truncated or corrupt (tensor {shown(name)}'s "
                f"{n_bytes:,} bytes at {start:,} lie past the end of the file, {len(self.m):,} bytes)"
            )
        plain = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
        if qtype.name in plain:
            data = np.frombuffer(self.m, dtype=plain[qtype.name], count=n, offset=start).reshape(shape)
        else:
            data = np.frombuffer(self.m, dtype=np.uint8, count=n_bytes, offset=start)
            data = data.reshape(quant_shape_to_byte_shape(shape, qtype))
        return _Tensor(name, dims, type_id, data)

    # -- the values
    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata field ``key`` (a str, a number, a bool, or a list of them), or ``default``."""
        f = self.fields.get(key)
        if f is None:
            return default
        if f.vtype == _STRING:
            return f.value.decode("utf-8")  # a UnicodeDecodeError is the caller's "unreadable"
        if f.vtype != _ARRAY:
            return f.value
        if f.etype in _NUMPY:
            return np.frombuffer(self.m, dtype=_NUMPY[f.etype], count=f.count, offset=f.offset).tolist()
        out, pos, m = [], f.offset, self.m
        unpack = struct.unpack_from
        for _ in range(f.count):  # every prefix was checked against the file's size when the header was walked
            (n,) = unpack("<Q", m, pos)
            out.append(m[pos + 8 : pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        return out


class GGUFCheckpoint:
    """One GGUF file; ``tensor(name)`` yields full fp32 weights under Meta's names, one at a time."""

    layout = "gguf"

    def __init__(self, path: str | os.PathLike, part: tuple[int, int] | None = None):
        self.path = self.dir = self.root = Path(path)
        self.files = [self.path]
        self.part = part
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: not a file (a GGUF checkpoint is one .gguf file)")
        try:
            with open(self.path, "rb") as f:
                magic, size = f.read(4), os.fstat(f.fileno()).st_size
                if magic == GGUF_MAGIC and size >= 24:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the tensors are views of it
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"{self.path}: not a GGUF file (starts with {shown(magic)}, expected {shown(GGUF_MAGIC)})"
            )
        if size < 24:
            raise CheckpointError(f"{self.path}: not a readable GGUF file, truncated ({size} bytes)")
        self.header = _Header(self.path, self._map)
        self.metadata = self._read_metadata()
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: GGUF architecture is {shown(arch)}, this project runs 'llama' models")
        self._tensors: dict[str, Any] = {}
        unknown: list[str] = []
        for t in self.header.tensors:
            meta = _meta_name(t.name)
            if meta is not None:
                self._tensors[meta] = t
            elif t.name != ROPE_FREQS:
                unknown.append(t.name)
        tied = "output.weight" not in self._tensors
        try:
            args = self._args(tied)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.args = args
        if unknown:
            raise CheckpointError(
                f"{self.path}: unexpected tensor {shown(unknown[0])} for a {args.n_layers}-layer Llama"
            )
        # The layer count from the metadata is checked against the blocks the file holds (bounded by its size)
        # before anything is built per layer: a small file claiming a billion layers is refused at once.
        blocks = {int(m.group(1)) for n in self._tensors if (m := re.match(r"layers\.(\d+)\.", n))}
        if args.n_layers != len(blocks) or blocks != set(range(len(blocks))):
            raise CheckpointError(
                f"{self.path}: GGUF metadata says {args.n_layers} layers (block_count), the file holds the tensors "
                f"of {len(blocks)}"
            )
        full = expected_shapes(args, with_output=not tied)
        missing = [n for n in full if n not in self._tensors]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor {shown(missing[0])} ({len(missing)} missing in all)")
        extra = [n for n in self._tensors if n not in full]
        if extra:
            raise CheckpointError(
                f"{self.path}: unexpected tensor {shown(self._tensors[extra[0]].name)} for this config"
            )
        for name, want in full.items():
            t = self._tensors[name]
            if t.shape != want:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} has shape {t.shape}, the config implies {want} (Meta name {name})"
                )
        self.shapes = full
        if part is not None:
            rank, world = part
            check_tensor_parallel(args, world, self.path)
            if not 0 <= rank < world:
                raise CheckpointError(f"tensor-parallel rank {rank} is outside [0, {world})")
            self.shapes = {n: _rank_shape(n, s, world) for n, s in full.items()}

    # ---- metadata -----------------------------------------------------------------------------------
    def _read_metadata(self) -> dict[str, Any]:
        """Every scalar, string and short array field (token lists are read separately, by the tokenizer)."""
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
        out: dict[str, Any] = {"GGUF.version": self.header.version}
        for key in self.header.fields:
            if key not in skip:
                out[key] = self.field(key)
        return out

    def field(self, key: str) -> Any:
        """Any metadata field's value (lists included), or None."""
        try:
            return self.header.get(key)
        except UnicodeDecodeError as e:
            raise CheckpointError(
                f"{self.path}: metadata field {shown(key)} is unreadable ({_first_line(e)})"
            ) from None

    def _get(self, key: str, kind: type, default: Any = ...) -> Any:
        v = self.metadata.get(key)
        if v is None:
            if default is ...:
                raise ConfigError(f"{self.path}: GGUF metadata has no {shown(key)}")
            return default
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            # GGUF stores float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that rounds to the
            # same float32 is the value the converter was given.
            v = float(str(np.float32(v)))
        if not isinstance(v, kind) or isinstance(v, bool) or not v > 0 or (kind is float and not math.isfinite(v)):
            raise ConfigError(
                f"{self.path}: GGUF metadata {shown(key)} must be a finite positive {kind.__name__}, got {str(v)[:80]}"
            )
        return v

    def _args(self, tied: bool) -> ModelArgs:
        a = "llama."
        dim = self._get(a + "embedding_length", int)
        n_heads = self._get(a + "attention.head_count", int)
        n_kv = self._get(a + "attention.head_count_kv", int, default=n_heads)
        emb = self._tensors.get("tok_embeddings.weight")
        vocab_default = emb.shape[0] if emb is not None and len(emb.shape) == 2 else ...
        vocab = self._get(a + "vocab_size", int, default=vocab_default)
        ctx = self._get(a + "context_length", int, default=8192)
        head_dim = dim // n_heads
        for key in (a + "rope.dimension_count", a + "attention.key_length", a + "attention.value_length"):
            v = self.metadata.get(key)
            if v is not None and v != head_dim:
                raise ConfigError(
                    f"{self.path}: GGUF {key} is {v}, but embedding_length/head_count gives head dim {head_dim}"
                    " (partial rotary or a separate head dim is not a Llama layout this project runs)"
                )
        kind = self.metadata.get(a + "rope.scaling.type", "none")
        if kind not in ("none", None):
            raise ConfigError(
                f"{self.path}: GGUF RoPE scaling type {shown(kind)} is not Llama 3's (none or rope_freqs)"
            )
        args = ModelArgs(
            dim=dim,
            n_layers=self._get(a + "block_count", int),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=vocab,
            hidden_dim=self._get(a + "feed_forward_length", int),
            norm_eps=self._get(a + "attention.layer_norm_rms_epsilon", float, default=1e-5),
            rope_theta=self._get(a + "rope.freq_base", float, default=10000.0),
            rope_scaling=None,
            tie_embeddings=tied,
            max_position_embeddings=ctx,
        )
        if dim % n_heads or n_heads % n_kv or head_dim % 2:
            raise ConfigError(
                f"{self.path}: embedding_length {dim}, head_count {n_heads}, head_count_kv {n_kv}: need whole, even "
                "heads and a whole number of query heads per k/v head"
            )
        freqs = next((t for t in self.header.tensors if t.name == ROPE_FREQS), None)
        if freqs is not None:
            args = replace(args, rope_scaling=self._llama3_scaling_from(freqs, args))
        return args

    def _llama3_scaling_from(self, t: Any, args: ModelArgs) -> dict[str, float]:
        """Recognise a rope_freqs tensor as Meta's llama3 scaling: it must equal the formula's divisors."""
        from llama3_triton.kernels import reference

        got = torch.from_numpy(self._dequantize(t).reshape(-1).copy()).double()
        if got.numel() != args.head_dim // 2 or not torch.isfinite(got).all() or got.min() <= 0:
            raise ConfigError(f"{self.path}: {ROPE_FREQS} must hold {args.head_dim // 2} positive factors")
        original = int(self.metadata.get("llama.rope.scaling.original_context_length") or 8192)
        plain = reference.rope_inv_freq(args.head_dim, args.rope_theta, None).double()
        for factor in sorted({float(got.max()), 8.0, 32.0, 16.0, 4.0, 2.0}):
            scaling = {
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": original,
            }
            want = plain / reference.rope_inv_freq(args.head_dim, args.rope_theta, scaling).double()
            if torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                return scaling
        raise ConfigError(
            f"{self.path}: {ROPE_FREQS} is not Llama 3's RoPE scaling (low/high frequency factors 1 and 4, "
            f"original context {original}) for any factor; max factor {float(got.max()):.4g}"
        )

    # ---- tensors ------------------------------------------------------------------------------------
    def _dequantize(self, t: Any) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        try:
            if t.tensor_type == GGMLQuantizationType.BF16:
                # bf16 -> fp32 is a 16-bit shift: exact, and without a temporary the size of the tensor.
                raw = np.asarray(t.data).view(np.uint16)
                out = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                out = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: tensor {t.name} is unreadable, truncated or corrupt ({_first_line(e)})"
            ) from None
        want = t.shape
        if out.size != int(np.prod(want)):
            raise CheckpointError(f"{self.path}: tensor {t.name} holds {out.size} values, its shape {want} needs more")
        return out.reshape(want)

    def names(self) -> list[str]:
        """Every tensor the model needs, in a loading order that keeps each layer's weights together."""
        return list(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        """The full weight ``name`` (Meta's naming) as fp32 (the caller casts), shape-checked."""
        t = self._tensors[name]
        a = np.ascontiguousarray(self._dequantize(t), dtype=np.float32)
        if not a.flags.writeable:  # an F32 tensor is a view of the read-only mapping: copy it out
            a = a.copy()
        w = torch.from_numpy(a)
        if self.part is not None:
            split = META_SPLIT_DIM[name.rsplit(".", 2)[-2]]
            if split is not None:
                rank, world = self.part
                n = w.shape[split] // world
                w = w.narrow(split, rank * n, n)
        if tuple(w.shape) != self.shapes[name]:  # cannot happen after the checks in __init__; kept as a guard
            raise CheckpointError(
                f"{self.path}: tensor {t.name} has shape {tuple(w.shape)}, expected {self.shapes[name]}"
            )
        return w

    def storage_type(self, name: str) -> str:
        """The GGUF storage type of weight ``name`` (Meta's naming): "F32", "Q4_1", ..."""
        return self._tensors[name].tensor_type.name

    def blocks(self, name: str) -> torch.Tensor:
        """Weight ``name``'s stored bytes as they are, one row of blocks per output row: uint8 (N, bytes a row),
        copied out of the read-only mapping. The whole tensor (the loader refuses kept blocks under tensor
        parallelism)."""
        raw = np.asarray(self._tensors[name].data)
        return torch.from_numpy(raw.reshape(-1, raw.shape[-1]).copy())

    def tensors(self):
        for name in self.names():
            yield name, self.tensor(name)

    def weight_bytes(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(int(torch.Size(s).numel()) * size for s in self.shapes.values())

    def storage_types(self) -> dict[str, int]:
        """How many of the model's tensors are stored in each GGUF type, e.g. {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}."""
        return dict(Counter(self._tensors[n].tensor_type.name for n in self._tensors).most_common())

    @property
    def tokenizer_path(self) -> Path | None:
        return None  # the tokenizer is inside the file (model/hf_tokenizer.py reads it)

    def describe(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in self.storage_types().items())
        return f"GGUF v{self.metadata.get('GGUF.version')}, tensors stored as {types}"
