"""Writing tiny random Llama-3-shaped checkpoints: the CLI's embedded default, the tests' models and the
benchmarks' model shapes all come from here.

``make_tiny`` writes random weights (``random_weights``: norms near 1, matrices scaled by 1/sqrt(fan-in) so
activations stay O(1)) with the real Llama-3 tokenizer, in Meta's layout and optionally Hugging Face's, each
file whole or not at all (model._files). ``ensure_tiny`` keeps the cached default checkpoint whole: a manifest
of sizes and CRC-32s checked on every use, rebuilt when damaged, safe for concurrent first runs.

Reading checkpoints is model/checkpoint.py's; this module only writes them (imports run one way: it uses the
reader's names and shapes, the reader knows nothing of it).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch

from llama3_triton.model.checkpoints import files as _files
from llama3_triton.model.checkpoints.folder import (
    HF_NAMES,
    META_SPLIT_DIM,
    CheckpointError,
    _kind,
    expected_shapes,
    permute_for_rotate_half,
)
from llama3_triton.model.config import ModelArgs, to_hf_config, to_meta_params


def random_weights(
    args: ModelArgs,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    on_host: bool = True,
) -> dict[str, torch.Tensor]:
    """Random weights for ``args`` under Meta's names, scaled so activations stay O(1) through the layers.

    Drawn on ``device`` (on a GPU, 8 G normals take a second where the host takes a minute) and returned on the
    host, ready to be written (``on_host=False``: left on ``device``, for ``checkpoint.MemoryCheckpoint``). The
    same seed gives the same weights on the same kind of device."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(args, with_output=not args.tie_embeddings).items():
        t = torch.randn(shape, generator=g, device=device)
        if len(shape) == 1:  # norm weights near 1, but not exactly 1, so a missing multiply is caught
            t = 1.0 + 0.1 * t
        elif name != "tok_embeddings.weight":
            t = t / shape[1] ** 0.5
        out[name] = t.to(dtype).cpu() if on_host else t.to(dtype)
        del t
    return out


def _write_atomically(target: Path, write) -> None:
    """Write into a temporary sibling folder, then rename: a failure leaves nothing half-written, and the folder
    and its files get the usual modes (0755/0644 under the common umask), not tempfile's 0700."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"{target}: already exists and is not empty; choose a new directory")
    for stale in _files.stale_tmp_siblings(target):  # left by a run that was killed (Ctrl-C exits at once)
        _files.remove(stale)
    try:
        _files.build_dir(target, write)
    except FileExistsError:  # another process created it meanwhile
        raise CheckpointError(f"{target}: already exists and is not empty; choose a new directory") from None


def _save_pth(obj: dict, path: Path) -> None:
    """torch.save, whole or not at all. It saves under the final file name inside a hidden temporary folder
    (torch names the zip's records after the file, "consolidated.03/...", which is how a renamed shard is
    told from the real one), then renames the file into place. torch reports a full disk as
    "inline_container.cc: unexpected pos"; that becomes OSError(ENOSPC) naming the file."""
    tmp_dir = _files.new_tmp_dir(path)
    try:
        tmp = tmp_dir / path.name
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            st = os.statvfs(tmp_dir)
            if st.f_bavail * st.f_frsize < (1 << 20) or "unexpected pos" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _files.file_mode())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_meta_checkpoint(
    folder: Path,
    args: ModelArgs,
    weights: dict[str, torch.Tensor],
    shards: int,
    multiple_of: int,
    ffn_dim_multiplier: float | None,
    tokenizer_file: Path,
) -> None:
    """Meta's layout, split ``shards`` ways along META_SPLIT_DIM (norms replicated)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in weights.items():
        split = META_SPLIT_DIM[_kind(name)]
        if split is not None and t.shape[split] % shards:
            raise CheckpointError(f"cannot split {name} {tuple(t.shape)} {shards} ways on dim {split}")
    for r in range(shards):
        shard = {}
        for name, t in weights.items():
            split = META_SPLIT_DIM[_kind(name)]
            shard[name] = t if split is None else t.chunk(shards, dim=split)[r].clone()
        _save_pth(shard, folder / f"consolidated.{r:02d}.pth")
    params = to_meta_params(args, multiple_of, ffn_dim_multiplier)
    _files.write_text(folder / "params.json", json.dumps(params, indent=2) + "\n")
    with _files.atomic_path(folder / "tokenizer.model") as tmp:
        shutil.copyfile(tokenizer_file, tmp)


def to_hf_state_dict(args: ModelArgs, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-named weights under Hugging Face's names, wq/wk permuted for rotate-half RoPE (what transformers'
    LlamaForCausalLM loads)."""
    inverse = {v: k for k, v in HF_NAMES.items()}
    hf: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        kind = _kind(name)
        if kind == "wq":
            t = permute_for_rotate_half(t, args.n_heads)
        elif kind == "wk":
            t = permute_for_rotate_half(t, args.n_kv_heads)
        if name == "tok_embeddings.weight":
            hf_name = "model.embed_tokens.weight"
        elif name == "norm.weight":
            hf_name = "model.norm.weight"
        elif name == "output.weight":
            hf_name = "lm_head.weight"
        else:
            layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name).groups()
            hf_name = f"model.layers.{layer}.{inverse[rest]}.weight"
        hf[hf_name] = t.contiguous()
    return hf


def write_hf_checkpoint(folder: Path, args: ModelArgs, weights: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Hugging Face's layout: wq/wk permuted for rotate-half, HF names, optionally sharded with an index."""
    from safetensors.torch import save_file

    hf = to_hf_state_dict(args, weights)
    folder.mkdir(parents=True, exist_ok=True)
    config = to_hf_config(args)
    # The dtype the tensors are stored in (Hugging Face's field for it), not a fixed "float32".
    config["torch_dtype"] = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    _files.write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    names = list(hf)
    if shards == 1:
        with _files.atomic_path(folder / "model.safetensors") as tmp:
            save_file(hf, str(tmp), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: hf[n] for n in names[i * per : (i + 1) * per]}
        with _files.atomic_path(folder / fname) as tmp:
            save_file(part, str(tmp), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _files.write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def tiny_args(
    dim: int = 128,
    n_layers: int = 2,
    n_heads: int = 2,
    n_kv_heads: int = 1,
    vocab_size: int = 128256,
    multiple_of: int = 32,
    ffn_dim_multiplier: float | None = 1.3,
    rope_scaling_factor: float | None = 8.0,
    tie_embeddings: bool = False,
    rope_theta: float = 500000.0,
) -> ModelArgs:
    """A Llama-3-shaped config, small enough for a CPU (defaults: head dim 64, GQA 2, Llama 3.1 RoPE)."""
    from llama3_triton.model.config import _llama3_scaling, ffn_hidden_dim

    scaling = None if rope_scaling_factor is None else _llama3_scaling(rope_scaling_factor)
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        hidden_dim=ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_embeddings=tie_embeddings,
        max_position_embeddings=131072 if scaling else 8192,
    )


def make_tiny(
    target: str | os.PathLike,
    *,
    dim: int = 128,
    n_layers: int = 2,
    n_heads: int = 2,
    n_kv_heads: int = 1,
    multiple_of: int = 32,
    ffn_dim_multiplier: float | None = 1.3,
    rope_scaling_factor: float | None = 8.0,
    tie_embeddings: bool = False,
    shards: int = 1,
    hf: bool = False,
    hf_shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a random Llama-3-shaped checkpoint with the real tokenizer.

    Meta's layout in ``target`` (``shards`` model-parallel files); with ``hf=True``, Hugging Face's layout in
    ``target`` and Meta's in ``target/original`` (as HF repos ship them), holding the same weights.
    """
    from llama3_triton.model.loading import free_bytes
    from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path

    for what, v in (
        ("dim", dim),
        ("layers", n_layers),
        ("heads", n_heads),
        ("kv-heads", n_kv_heads),
        ("shards", shards),
        ("hf-shards", hf_shards),
    ):
        if v < 1:
            raise CheckpointError(f"--{what} must be at least 1, got {v}")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise CheckpointError(
            f"dim {dim}, heads {n_heads}, kv-heads {n_kv_heads}: need dim % heads == 0, heads % kv-heads == 0 "
            "and an even head dim"
        )
    if n_kv_heads % shards:
        raise CheckpointError(
            f"--shards {shards} must divide --kv-heads {n_kv_heads} (Meta splits heads across shards)"
        )
    args = tiny_args(
        dim, n_layers, n_heads, n_kv_heads, 128256, multiple_of, ffn_dim_multiplier, rope_scaling_factor, tie_embeddings
    )
    # Sized before anything is drawn: fp32 normals, then the stored copy (--layers 100000 allocated ~20 GB first).
    need = args.num_parameters() * (4 + torch.empty((), dtype=dtype).element_size())
    free = free_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise CheckpointError(
            f"a checkpoint of {args.num_parameters():,} parameters needs {need / 1e9:.1f} GB of memory to write, "
            f"this machine has {free / 1e9:.1f} GB free: fewer --layers or a smaller --dim"
        )
    weights = random_weights(args, seed, dtype)
    target = Path(target)

    def write(tmp: Path) -> None:
        meta_dir = tmp / "original" if hf else tmp
        write_meta_checkpoint(
            meta_dir, args, weights, shards, multiple_of, ffn_dim_multiplier, default_tokenizer_path()
        )
        if hf:
            write_hf_checkpoint(tmp, args, weights, hf_shards)

    _write_atomically(target, write)
    return target


# ---- the cached default checkpoint ----------------------------------------------------------------------------

MANIFEST = ".llama3-triton-manifest.json"  # size and CRC-32 of every file, written last, checked on every use


def _manifest(folder: Path) -> dict[str, dict[str, int]]:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            data = f.read_bytes()
            out[str(f.relative_to(folder))] = {"size": len(data), "crc32": zlib.crc32(data)}
    return out


def _cache_problem(folder: Path) -> str | None:
    """Why the cached checkpoint in ``folder`` cannot be used as it is, or None when it is whole."""
    try:
        want = json.loads(_files.read_regular_bytes(folder / MANIFEST, "manifest"))["files"]
        if not isinstance(want, dict) or not want:
            return "its manifest lists no files"
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted write, or an older version's cache)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for rel, meta in want.items():
        f = folder / rel
        try:
            data = _files.read_regular_bytes(f, "checkpoint")
        except (OSError, ValueError) as e:
            return f"{rel}: {getattr(e, 'strerror', None) or e}"
        if not isinstance(meta, dict) or len(data) != meta.get("size") or zlib.crc32(data) != meta.get("crc32"):
            return f"{rel} is not the file that was written (size or CRC-32 differs)"
    return None


def ensure_tiny(path: str | os.PathLike, *, seed: int, log=None) -> Path:
    """The tiny random checkpoint cached at ``path`` (the CLI's embedded default): written once, checked on every
    use (sizes and CRC-32s against its manifest, ~0.1 s for its 66 MB), rebuilt when damaged.

    Safe for concurrent first runs: each builds in its own hidden temporary sibling folder and renames it into
    place; the rename fails for all but the first (the target is then a non-empty folder), and the others
    check the winner's copy and use it. Temporary folders left by killed runs (their pid gone, or a day old)
    are removed on the way.
    """
    path = Path(path)
    log = log or (lambda message: None)
    for stale in _files.stale_tmp_siblings(path):
        _files.remove(stale)
    if path.exists() or path.is_symlink():
        problem = _cache_problem(path)
        if problem is None:
            return path
        log(f"{path}: the cached tiny checkpoint is damaged ({problem}); writing it again")
        aside = _files.new_tmp_dir(path)  # move the damaged copy out of the way in one rename, then delete it
        try:
            os.replace(path, aside / "damaged")
        except FileNotFoundError:  # another run moved it first
            pass
        _files.remove(aside)
    else:
        log(f"writing the embedded tiny random checkpoint to {path}")
    tmp = _files.new_tmp_dir(path)
    try:
        inner = make_tiny(tmp / path.name, seed=seed)
        _files.write_text(inner / MANIFEST, json.dumps({"files": _manifest(inner)}, indent=1) + "\n")
        try:
            os.replace(inner, path)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
            problem = _cache_problem(path)  # another run finished first: use its copy if it is whole
            if problem is not None:
                raise CheckpointError(f"{path}: written by another run meanwhile, but damaged ({problem})") from None
    finally:
        _files.remove(tmp)
    return path
