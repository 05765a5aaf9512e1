"""Reading Llama-3 checkpoints in Meta's and Hugging Face's layouts (model/tiny.py writes tiny random ones).

Both layouts are presented to the driver the same way: an ``args`` (ModelArgs) and a ``tensor(name)``
that returns one full weight under **Meta's name**, merged across model-parallel shards and with
Hugging Face's rotate-half permutation of wq/wk undone, shape-checked against the config. Tensors are
produced one at a time from memory-mapped files, so the driver can cast, fuse and move each before
asking for the next: host memory stays near one copy of the model.

Meta's layout:  params.json, consolidated.00.pth [.. consolidated.NN.pth], tokenizer.model
                (also found in the ``original/`` folder of Hugging Face repos)
HF's layout:    config.json, model.safetensors or model-0000N-of-0000M.safetensors + model.safetensors.index.json

Nothing here unpickles code: ``.pth`` files are opened with ``weights_only=True`` (tensors and plain
containers only) and ``mmap=True``; safetensors files hold no code at all.

What is verified before a tensor is used (issue 14): only regular files inside the checkpoint folder are
opened (symlinks resolved; a FIFO would hang); the config is bounded by the weight files' real size before
anything is built per layer; every ``.pth`` storage record is exactly as long as its storage and its CRC-32
matches when the tensor is first read; Meta shards are the shards their zip records were saved as, and no
two are copies. Safetensors files carry no checksum: the library checks the header against the file size,
and a flipped byte inside a tensor there cannot be detected.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from llama3_triton.model.checkpoints import files as _files
from llama3_triton.model.config import ConfigError, ModelArgs, from_hf_config, from_meta_params
from llama3_triton.model.errors import UserError, shown


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit its config."""


# Meta's model-parallel split dimension of each weight kind (None: replicated, read from shard 0).
# Column-parallel layers are split on the output rows (dim 0), row-parallel wo/w2 on the input (dim 1).
META_SPLIT_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
    "attention_norm": None,
    "ffn_norm": None,
    "norm": None,
}
IGNORED = {"rope.freqs"}  # precomputed RoPE table some Meta checkpoints carry; we compute our own
# (dim, n_layers) of Llama 3.2 1B and 3B, whose output matrix is the embedding; Meta ships them without output.weight.
LLAMA_32_TIED_SHAPES = ((2048, 16), (3072, 28))
MAX_JSON_BYTES = 64 << 20  # a safetensors index of a 405B model is ~100 KB; refuse to parse gigabytes

HF_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def expected_shapes(args: ModelArgs, with_output: bool = True) -> dict[str, tuple[int, ...]]:
    """Every weight of the model under Meta's names, with its full (unsharded) shape."""
    hd, q_rows, kv_rows = args.head_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "attention.wq.weight"] = (q_rows, args.dim)
        shapes[p + "attention.wk.weight"] = (kv_rows, args.dim)
        shapes[p + "attention.wv.weight"] = (kv_rows, args.dim)
        shapes[p + "attention.wo.weight"] = (args.dim, q_rows)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
        shapes[p + "feed_forward.w1.weight"] = (args.hidden_dim, args.dim)
        shapes[p + "feed_forward.w3.weight"] = (args.hidden_dim, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, args.hidden_dim)
    assert hd * args.n_heads == q_rows
    shapes["norm.weight"] = (args.dim,)
    if with_output:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def _kind(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'; 'norm.weight' -> 'norm'."""
    return name.rsplit(".", 2)[-2]


def permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's wq/wk rows -> Hugging Face's: within each head, interleaved pairs (x0,x1),(x2,x3).. become
    halves (x0,x2,..|x1,x3,..), so HF's rotate-half RoPE computes the same rotation."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_for_rotate_half``: HF's q_proj/k_proj rows back to Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A Meta shard, memory-mapped. weights_only=True refuses any pickle that would build other objects."""
    _check_regular(path, "weights")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds objects other than tensors, which could run code"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({first})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors, got {type(obj).__name__}")
    return obj


# ---- what a .pth file's zip records promise, checked before any tensor is used ------------------------------
#
# torch.save writes a zip: <prefix>/data.pkl (the pickle: names, shapes, and for each storage a record key, a
# dtype and an element count) and one stored (uncompressed) record <prefix>/data/<key> per storage. With
# mmap=True torch maps each storage at its record's offset and trusts the pickle's element count, not the
# record's size: a record cut short in the zip directory loads with the rest of the tensor read from whatever
# bytes follow (seen: NaNs, no error). So every storage's record is checked here: present, stored, exactly as
# long as the storage, inside the file. Each record also carries a CRC-32, verified when its tensor is first
# read (``_verify_crc``; zlib.crc32 ran at ~7 GiB/s on one core here, so ~2.3 s for Llama-3-8B's 16 GB next to
# reading those bytes from disk; LLAMA3_TRITON_VERIFY_CRC=0 turns it off). <prefix> is the file's name when
# it was saved ("consolidated.03"), which tells a renamed (swapped or copied) shard from the real one.

# Element sizes of the storage classes torch.save names in its pickles.
_STORAGE_BYTES = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "UntypedStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}


class _Global:
    """A stand-in for any class or function the pickle names: records the name, runs nothing."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        if self.name in ("_rebuild_tensor_v2", "_rebuild_tensor") and args and isinstance(args[0], _StorageRef):
            return _TensorRef(args[0])
        return next((a for a in args if isinstance(a, _TensorRef)), _Any())  # e.g. _rebuild_parameter(tensor)


class _Any:
    """Whatever else the pickle builds (an OrderedDict of hooks, ...): accepts and ignores everything."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageRef:
    def __init__(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)):
            raise UserError(f"unexpected persistent id {shown(pid)}")
        self.key, self.kind, self.numel = str(pid[2]), pid[1].name, pid[4]
        if self.kind not in _STORAGE_BYTES or not isinstance(self.numel, int) or self.numel < 0:
            raise UserError(f"unexpected storage {self.kind} of {shown(self.numel)} elements")
        self.nbytes = self.numel * _STORAGE_BYTES[self.kind]


class _TensorRef:
    def __init__(self, storage: _StorageRef):
        self.storage = storage


class _RecordScanner(pickle.Unpickler):
    """Reads data.pkl for its storage records only. Every class or function the pickle names becomes a
    ``_Global`` that runs nothing, so scanning cannot execute code (torch's weights_only load ran first anyway)."""

    def find_class(self, module, name):
        return _Global(module, name)

    def persistent_load(self, pid):
        return _StorageRef(pid)


class _PthRecords:
    """The checked zip records of one .pth file: per tensor name, its storage record's (offset, size, CRC)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
                infos = {i.filename: i for i in z.infolist()}
                pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl) != 1:
                    raise CheckpointError(f"{path}: not a PyTorch checkpoint zip (no single <name>/data.pkl record)")
                self.prefix = pkl[0].split("/")[0]
                data = z.read(pkl[0])  # zipfile checks this record's CRC
                top = _RecordScanner(io.BytesIO(data), encoding="utf-8").load()
                if not isinstance(top, dict):
                    raise UserError(f"data.pkl holds a {type(top).__name__}, not a dict")
                self.records: dict[str, tuple[str, int, int, int]] = {}  # name -> (record, offset, size, crc)
                for name, ref in top.items():
                    if not isinstance(ref, _TensorRef):
                        continue
                    rec = f"{self.prefix}/data/{ref.storage.key}"
                    info = infos.get(rec)
                    if info is None:
                        raise CheckpointError(f"{path}: tensor {name}'s storage record {rec} is missing")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(f"{path}: record {rec} is compressed; PyTorch stores tensor data raw")
                    if info.file_size != ref.storage.nbytes or info.compress_size != ref.storage.nbytes:
                        raise CheckpointError(
                            f"{path}: record {rec} of tensor {name} holds {info.file_size} bytes, its storage needs "
                            f"{ref.storage.nbytes} (a damaged or cut-short file)"
                        )
                    raw.seek(info.header_offset)
                    header = raw.read(30)
                    if len(header) < 30 or header[:4] != b"PK\x03\x04":
                        raise CheckpointError(f"{path}: record {rec} has no valid local header (a damaged file)")
                    name_len, extra_len = struct.unpack("<HH", header[26:30])
                    if raw.read(name_len) != rec.encode("utf-8"):  # a directory entry pointing at another record
                        raise CheckpointError(f"{path}: record {rec}'s local header names another record (damaged)")
                    offset = info.header_offset + 30 + name_len + extra_len
                    if offset + info.file_size > size:
                        raise CheckpointError(
                            f"{path}: record {rec} of tensor {name} ends at byte {offset + info.file_size}, past the "
                            f"end of the {size}-byte file (truncated)"
                        )
                    self.records[name] = (rec, offset, info.file_size, info.CRC)
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, EOFError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({first})"
            ) from None
        self._verified: set[str] = set()

    def shard_number(self) -> int | None:
        """The shard number the file had when it was saved ("consolidated.03" -> 3), if its records say."""
        m = re.fullmatch(r"consolidated\.(\d+)", self.prefix)
        return int(m.group(1)) if m else None

    def verify_crc(self, name: str, t: torch.Tensor) -> None:
        """Check the CRC-32 of the record behind ``t`` (the tensor named ``name``) once.

        The bytes are read with plain reads into one reused buffer, not through the memory map: touching the
        mapping would make every page of the file resident in this process (a bf16 model loaded as bf16 on the
        CPU keeps its vocabulary matrices mapped and mostly untouched), raising peak RSS by the file's size."""
        rec, offset, size, crc = self.records[name]
        if rec in self._verified or os.environ.get("LLAMA3_TRITON_VERIFY_CRC", "1") == "0":
            return
        if t.untyped_storage().nbytes() != size:
            raise CheckpointError(
                f"{self.path}: tensor {name} maps {t.untyped_storage().nbytes()} bytes, its record holds {size}"
            )
        value, left = 0, size
        buf = memoryview(bytearray(min(size, 16 << 20)))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            while left:
                n = f.readinto(buf[: min(left, len(buf))])
                if not n:
                    raise CheckpointError(f"{self.path}: record {rec} of tensor {name} ends early (truncated file)")
                value = zlib.crc32(buf[:n], value)
                left -= n
        if value != crc:
            raise CheckpointError(
                f"{self.path}: the bytes of tensor {name} (record {rec}) fail their CRC-32 check: the file is damaged"
            )
        self._verified.add(rec)


def _check_regular(path: Path, what: str) -> int:
    """``path`` must be a regular file (a FIFO would hang the read, a device would never end); returns its size."""
    try:
        return _files.check_regular(path, what)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} file not found") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the {what} file ({e.strerror or e})") from None


def _allowed_roots(ckpt_dir: Path) -> list[Path]:
    """The folders a checkpoint's files may resolve into: the checkpoint folder itself and, for a snapshot in
    Hugging Face's hub cache (models--org--name/snapshots/<rev>/), that model's folder, whose blobs/ the
    snapshot's symlinks point at."""
    roots = [ckpt_dir.resolve()]
    if (ckpt_dir / "original").is_dir():  # Meta's files in original/, which may itself be a link the user made
        roots.append((ckpt_dir / "original").resolve())
    parts = ckpt_dir.absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            roots.append(Path(*parts[: i + 1]).resolve())
    return roots


def _inside(path: Path, ckpt_dir: Path, what: str) -> Path:
    """``path`` with symlinks resolved, refused unless it stays inside the checkpoint folder."""
    real = path.resolve()
    if not any(real == r or real.is_relative_to(r) for r in _allowed_roots(ckpt_dir)):
        raise CheckpointError(f"{path}: the {what} file resolves to {real}, outside the checkpoint folder {ckpt_dir}")
    return real


# The most bytes read of each file a checkpoint brings beside its weights. Llama-3's tokenizer.json is 9 MB; a
# tokenizer_config.json with an inline chat template some 50 KB; the others a few KB.
SIDE_FILE_BYTES = {
    "tokenizer.json": 64 << 20,
    "tokenizer_config.json": 8 << 20,
    "generation_config.json": 1 << 20,
    "chat_template.jinja": 1 << 20,
}


def read_side_file(path: Path, ckpt_dir: Path, what: str) -> str:
    """A file a checkpoint brings beside its weights (``SIDE_FILE_BYTES`` names them and their caps), read the one
    way every such file is: inside the checkpoint folder (or its hub snapshot) once links are resolved, a regular
    file (a FIFO or a device is refused at once, never waited on), at most its cap (the error names it), UTF-8."""
    real = _inside(path, ckpt_dir, what)
    cap = SIDE_FILE_BYTES.get(path.name, 1 << 20)
    fd = _files.open_regular(real, what)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(cap + 1) if size <= cap else b""
    if size > cap or len(data) > cap:
        raise CheckpointError(f"{path}: the {what} file is {max(size, len(data)):,} bytes; at most {cap:,} are read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the {what} file is not UTF-8 text (byte {e.start})") from None


def find_layout(ckpt_dir: Path) -> tuple[str, Path]:
    """('hf' | 'meta', the folder that holds it). HF files at the top win over Meta's in ``original/``."""
    if not ckpt_dir.exists():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a directory")
    if (ckpt_dir / "config.json").exists() and any(ckpt_dir.glob("*.safetensors")):
        return "hf", ckpt_dir
    for d in (ckpt_dir, ckpt_dir / "original"):
        if (d / "params.json").exists():
            return "meta", d
    raise CheckpointError(
        f"{ckpt_dir}: no checkpoint found (expected params.json + consolidated.*.pth, "
        "or config.json + *.safetensors, or an original/ folder with Meta's files)"
    )


class Checkpoint:
    """One checkpoint on disk; ``tensor(name)`` yields full weights under Meta's names, one at a time.

    With ``part=(rank, world)`` it yields only that tensor-parallel rank's slice of each weight (split as
    META_SPLIT_DIM says; norms whole), reading only the files, and within them only the bytes, it needs:
    Meta shards whose range overlaps the rank's are memory-mapped and narrowed, HF tensors are read
    with safetensors' ``get_slice``. With as many ranks as Meta shards, rank r opens consolidated.r.pth alone.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, part: tuple[int, int] | None = None):
        self.dir = Path(ckpt_dir)
        self.part = part
        self.layout, self.root = find_layout(self.dir)
        if self.layout == "meta":
            self._open_meta()
        else:
            self._open_hf()
        self.shapes = self._full_shapes
        if part is not None:
            rank, world = part
            check_tensor_parallel(self.args, world, self.dir)
            if not 0 <= rank < world:
                raise CheckpointError(f"tensor-parallel rank {rank} is outside [0, {world})")
            self.shapes = {n: _part_shape(n, s, world) for n, s in self.shapes.items()}

    def _bound_by_file_sizes(self, args: ModelArgs, config: Path, files: list[Path]) -> None:
        """Refuse a config that describes more weights than the files could hold, before building anything per
        layer: a 100-byte params.json with n_layers 1e9 must not make us list 9e9 tensor names. Every weight takes
        at least one byte per parameter (fp8; bf16 takes two), so the weight files' real sizes bound the model."""
        available = 0
        for f in files:
            available += _check_regular(_inside(f, self.dir, "weights"), "weights")
        need = replace(args, tie_embeddings=True).num_parameters()  # the smallest model the config allows
        if need > available:
            raise CheckpointError(
                f"{config}: describes a model of {need:,} parameters (dim {args.dim}, {args.n_layers} layers, "
                f"vocabulary {args.vocab_size}), more than the {available:,} bytes of weight files can hold"
            )

    # ---- Meta -------------------------------------------------------------------------------------
    def _open_meta(self) -> None:
        params = self.root / "params.json"
        try:
            _inside(params, self.dir, "params")
            args = from_meta_params(params)  # errors name the path the user knows, not the link's target
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        files = list(self.root.glob("consolidated.*.pth"))
        if not files:
            raise CheckpointError(f"{self.root}: no consolidated.*.pth weight files next to params.json")
        numbers = [int(m.group(1)) if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)) else -1 for f in files]
        if sorted(numbers) != list(range(len(files))):
            raise CheckpointError(f"{self.root}: shard files must be consolidated.00.pth .. consolidated.NN.pth")
        # Shards are concatenated in rank order: sort by the number, not the name ("10" sorts before "2").
        files = [f for _, f in sorted(zip(numbers, files, strict=True))]
        for f in files:
            _inside(f, self.dir, "weights")
        self.files = files
        self.n_shards = len(files)
        if self.part is None:
            self.shard_ids = list(range(len(files)))
        else:  # only the shards whose slice of every split dim overlaps this rank's slice
            r, n, s = self.part[0], self.part[1], len(files)
            self.shard_ids = [i for i in range(s) if i * n < (r + 1) * s and (i + 1) * n > r * s]
        self._shards = [_load_pth(files[i]) for i in self.shard_ids]
        self._records = [_PthRecords(files[i]) for i in self.shard_ids]
        # Before anything is built per layer (expected_shapes lists 9 names per layer).
        self._bound_by_file_sizes(args, params, files)
        files = [files[i] for i in self.shard_ids]
        self._check_shard_identity(files)
        names0 = set(self._shards[0]) - IGNORED
        for f, shard in zip(files[1:], self._shards[1:], strict=True):
            if set(shard) - IGNORED != names0:
                diff = sorted((set(shard) - IGNORED) ^ names0)[:3]
                raise CheckpointError(f"{f}: shards disagree on tensor names (e.g. {diff}) with {files[0].name}")
        self.args = replace(args, tie_embeddings=self._meta_tied(args, params, names0, files[0]))
        if self.args.tie_embeddings:
            names0 = names0 - {"output.weight"}  # a declared-tied checkpoint may still carry a copy
        self._names = names0
        self._full_shapes = expected_shapes(self.args, with_output=not self.args.tie_embeddings)
        self._check_names(names0, files[0])

    @staticmethod
    def _meta_tied(args: ModelArgs, params: Path, names: set[str], first: Path) -> bool:
        """Whether the output matrix is the embedding. params.json may say so ("tie_embeddings"); Meta's own
        files do not, and its 3.2 1B/3B (the tied models) ship no output.weight. A missing output.weight is
        taken as tying only when declared or for those two shapes: otherwise it is a damaged checkpoint, and
        reusing the embedding would quietly give a different model."""
        declared = args.extra.get("tie_embeddings")
        if declared is not None:
            return declared
        if "output.weight" in names:
            return False
        if (args.dim, args.n_layers) in LLAMA_32_TIED_SHAPES:
            return True
        raise CheckpointError(
            f"{first}: missing tensor 'output.weight', and {params.name} does not declare the output tied to the "
            'embedding (add "tie_embeddings": true to it if it is)'
        )

    def _check_shard_identity(self, files: list[Path]) -> None:
        """Each shard is the one its name says: its zip records keep the name it was saved under, and no two
        shards hold the same bytes for a split weight (a copied shard would load as a plausible, wrong model)."""
        for i, f, rec in zip(self.shard_ids, files, self._records, strict=True):
            n = rec.shard_number()
            if n is not None and n != i:
                raise CheckpointError(
                    f"{f}: holds shard {n} (its zip records are named {rec.prefix}/), not shard {i}: "
                    "shard files swapped or copied"
                )
        if len(files) < 2:
            return
        split_names = [n for n in self._records[0].records if n not in IGNORED and META_SPLIT_DIM.get(_kind(n))]
        seen: dict[tuple, Path] = {}  # (size, CRC-32) of a few split weights' records -> the shard holding them
        for f, rec in zip(files, self._records, strict=True):
            sig = tuple(rec.records[n][2:] for n in split_names[:4] if n in rec.records)
            if sig and sig in seen:
                raise CheckpointError(f"{f}: holds the same weights as {seen[sig]} (a copied shard)")
            seen[sig] = f

    def _meta_tensor(self, name: str) -> torch.Tensor:
        if self.part is not None:
            return self._meta_part(name)
        split = META_SPLIT_DIM[_kind(name)]
        parts = [self._shard_tensor(i, name) for i in range(len(self._shards))]
        if len(parts) == 1:
            return parts[0]
        if split is None:
            for f, p in zip(self.files[1:], parts[1:], strict=True):
                if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                    raise CheckpointError(f"{f}: replicated tensor {name} differs from {self.files[0].name}'s")
            return parts[0]
        for f, p in zip(self.files[1:], parts[1:], strict=True):
            other = [s for d, s in enumerate(p.shape) if d != split]
            if p.shape != parts[0].shape:
                raise CheckpointError(
                    f"{f}: shard of {name} has shape {tuple(p.shape)}, shard 0 has {tuple(parts[0].shape)}"
                    f" (shards must split dim {split} evenly; other dims {other})"
                )
        return torch.cat(parts, dim=split)

    def _meta_part(self, name: str) -> torch.Tensor:
        """This rank's slice of ``name`` from the (few) shards that hold it."""
        split = META_SPLIT_DIM[_kind(name)]
        full = self._full_shapes[name]
        if split is None:
            return self._shard_tensor(0, name)  # replicated: every shard holds all of it
        rank, world = self.part
        length, per_shard = full[split], full[split] // self.n_shards
        lo, hi = rank * length // world, (rank + 1) * length // world
        pieces = []
        for j, i in enumerate(self.shard_ids):
            t = self._shard_tensor(j, name)
            want = tuple(per_shard if d == split else s for d, s in enumerate(full))
            if tuple(t.shape) != want:
                raise CheckpointError(
                    f"{self.files[i]}: shard of {name} has shape {tuple(t.shape)}, the config implies {want}"
                )
            a, b = max(lo, i * per_shard), min(hi, (i + 1) * per_shard)
            pieces.append(t.narrow(split, a - i * per_shard, b - a))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=split)

    def _shard_tensor(self, j: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of the j-th loaded shard, its record's CRC checked on first use."""
        t = self._shards[j][name]
        self._records[j].verify_crc(name, t)
        return t

    # ---- Hugging Face -----------------------------------------------------------------------------
    def _open_hf(self) -> None:
        from safetensors import safe_open

        config = self.root / "config.json"
        try:
            _inside(config, self.dir, "config")
            self.args = from_hf_config(config)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            try:
                _inside(index, self.dir, "index")
                text = _files.read_regular_bytes(index, "index")
                if len(text) > MAX_JSON_BYTES:
                    raise CheckpointError(f"{index}: {len(text):,} bytes, too large for a safetensors index")
                weight_map = json.loads(text.decode("utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                weight_map = None
            except ValueError as e:  # not a regular file
                raise CheckpointError(str(e)) from None
            except OSError as e:
                raise CheckpointError(f"{index}: cannot read the safetensors index ({e.strerror or e})") from None
            # An explicit check, not an assert: asserts vanish under `python -O`.
            if not (
                isinstance(weight_map, dict)
                and weight_map
                and all(isinstance(v, str) and v.endswith(".safetensors") for v in weight_map.values())
            ):
                raise CheckpointError(
                    f"{index}: not a valid safetensors index (needs a non-empty 'weight_map' of tensor name"
                    " -> .safetensors file name)"
                )
            for v in weight_map.values():  # only files of this folder: no "../x", "/abs/x" or "sub/x"
                if Path(v).name != v or v in (".", "..") or "\\" in v or os.path.isabs(v):
                    raise CheckpointError(f"{index}: entry {shown(v)} is not a file name in the checkpoint folder")
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(self.root.glob("*.safetensors"))]
            weight_map = None
        self.files = [self.root / f for f in files]
        for f in self.files:
            if not f.exists() and not f.is_symlink():
                raise CheckpointError(f"{f}: listed in the safetensors index but missing")
        self._handles = {}
        where: dict[str, str] = {}
        for f in self.files:
            _check_regular(_inside(f, self.dir, "weights"), "weights")  # safe_open would block on a FIFO
            try:
                h = safe_open(str(f.resolve()), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt files
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({first})") from None
            self._handles[f.name] = h
            for k in h.keys():
                where[k] = f.name
        self._bound_by_file_sizes(self.args, config, self.files)
        if weight_map is not None:
            for k, f in weight_map.items():
                if where.get(k) != f:
                    raise CheckpointError(f"{self.root / f}: index says it holds {k}, but it does not")
        self._hf_where = {}
        for hf_name, f in where.items():
            meta = self._hf_to_meta(hf_name)
            if meta is not None:
                self._hf_where[meta] = (hf_name, f)
        names = set(self._hf_where)
        if self.args.tie_embeddings:
            names.discard("output.weight")  # some tied repos still carry a copy of lm_head
        self._names = names
        self._full_shapes = expected_shapes(self.args, with_output=not self.args.tie_embeddings)
        self._check_names(names, self.files[0])

    @staticmethod
    def _hf_to_meta(name: str) -> str | None:
        if name == "model.embed_tokens.weight":
            return "tok_embeddings.weight"
        if name == "model.norm.weight":
            return "norm.weight"
        if name == "lm_head.weight":
            return "output.weight"
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if m and m.group(2) in HF_NAMES:
            return f"layers.{m.group(1)}.{HF_NAMES[m.group(2)]}.weight"
        if name.endswith("rotary_emb.inv_freq"):
            return None
        return f"<unknown:{name}>"

    def _hf_tensor(self, name: str) -> torch.Tensor:
        hf_name, f = self._hf_where[name]
        kind = _kind(name)
        split = META_SPLIT_DIM[kind]
        world = 1
        try:
            if self.part is None or split is None:
                t = self._handles[f].get_tensor(hf_name)
            else:  # read only this rank's rows (or columns) from the file
                rank, world = self.part
                sl = self._handles[f].get_slice(hf_name)
                shape = sl.get_shape()
                if len(shape) != 2:
                    raise CheckpointError(f"{self.root / f}: tensor {hf_name} has shape {shape}, expected 2-d")
                length = shape[split]
                lo, hi = rank * length // world, (rank + 1) * length // world
                t = sl[lo:hi] if split == 0 else sl[:, lo:hi]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.root / f}: cannot read tensor {hf_name} ({e})") from None
        if kind in ("wq", "wk") and t.ndim == 2:
            # HF's permutation is within each head, and a rank's rows are whole heads: undo it per local head.
            heads = (self.args.n_heads if kind == "wq" else self.args.n_kv_heads) // world
            if t.shape[0] % (2 * heads) == 0:
                t = unpermute_from_rotate_half(t, heads)
        return t

    # ---- common -----------------------------------------------------------------------------------
    def _check_names(self, names: set[str], file: Path) -> None:
        expected = self._full_shapes  # built once: a lookup per name, not a rebuild per name
        unknown = sorted(n for n in names if n not in expected)
        if unknown:
            u = unknown[0]
            if self.layout == "hf":  # name the tensor as it is spelled in the file that holds it
                u, f = self._hf_where[u]
                file = self.root / f
            raise CheckpointError(f"{file}: unexpected tensor {shown(u)} for a {self.args.n_layers}-layer Llama config")
        missing = sorted(n for n in expected if n not in names)
        if missing:
            raise CheckpointError(f"{file}: missing tensor {shown(missing[0])} ({len(missing)} missing in all)")

    def shapes_for_check(self) -> dict[str, tuple[int, ...]]:
        return dict(self._full_shapes)

    def names(self) -> list[str]:
        """Every tensor the model needs, in a loading order that keeps each layer's weights together."""
        return list(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        """The full weight ``name`` (Meta's naming), in its stored dtype, shape-checked."""
        t = self._meta_tensor(name) if self.layout == "meta" else self._hf_tensor(name)
        want = self.shapes[name]
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{self.files[0] if self.layout == 'meta' else self.root}: tensor {name} has shape "
                f"{tuple(t.shape)}, the config implies {want}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{self.root}: tensor {name} has dtype {t.dtype}, expected a floating-point type")
        return t

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name)

    def weight_bytes(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(int(torch.Size(s).numel()) * size for s in self.shapes.values())

    @property
    def tokenizer_path(self) -> Path | None:
        """The checkpoint's tokenizer.model (refused if it resolves outside the checkpoint folder), or None."""
        for d in (self.root, self.dir, self.dir / "original"):
            if (d / "tokenizer.model").exists():
                _inside(d / "tokenizer.model", self.dir, "tokenizer")
                return d / "tokenizer.model"
        return None


class MemoryCheckpoint:
    """Weights already in memory (on any device), presented as a Meta-layout checkpoint: ``Llama.load`` builds a
    model from them without a file round trip. Made for the benchmarks, where writing and reading a random 8B
    checkpoint (16 GB) would cost more than measuring it; ``tokenizer_path`` None builds a model with no tokenizer
    (token ids in, logits out). Each tensor is handed over once and dropped from here
    (``tensor`` pops it), so building the model holds one copy of the weights, not two."""

    layout = "memory"

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], tokenizer_path: Path | None = None):
        want = expected_shapes(args, with_output=not args.tie_embeddings)
        missing = sorted(set(want) - set(weights))
        if missing:
            raise CheckpointError(
                f"in-memory weights: missing tensor {shown(missing[0])} ({len(missing)} missing in all)"
            )
        for name, shape in want.items():
            if tuple(weights[name].shape) != shape:
                raise CheckpointError(
                    f"in-memory weights: tensor {name} has shape {tuple(weights[name].shape)}, the config implies "
                    f"{shape}"
                )
        self.args, self._weights, self.shapes = args, weights, want
        self.tokenizer_path = tokenizer_path
        self.dir = self.root = self.path = Path("<memory>")

    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._weights.pop(name)
        except KeyError:
            raise CheckpointError(f"in-memory weights: tensor {name} was already read or is unknown") from None


def check_tensor_parallel(args: ModelArgs, world: int, where: object = "model") -> None:
    """Tensor parallelism over ``world`` ranks splits k/v heads, FFN columns and the vocabulary evenly."""
    if world < 1:
        raise CheckpointError(f"tensor-parallel size must be at least 1, got {world}")
    if args.n_kv_heads % world:
        raise CheckpointError(
            f"{where}: tensor-parallel size {world} must divide the {args.n_kv_heads} key/value heads "
            f"(use one of {[n for n in range(1, args.n_kv_heads + 1) if args.n_kv_heads % n == 0]})"
        )
    for what, n in (("FFN width", args.hidden_dim), ("vocabulary", args.vocab_size)):
        if n % world:
            raise CheckpointError(f"{where}: tensor-parallel size {world} must divide the {what} {n}")


def _part_shape(name: str, shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    split = META_SPLIT_DIM[_kind(name)]
    return shape if split is None else tuple(s // world if d == split else s for d, s in enumerate(shape))
