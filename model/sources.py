"""Where a checkpoint comes from, decided in one place: a folder (Meta's or Hugging Face's layout), a GGUF
file, or a Hugging Face hub name (``org/name``) resolved through ``huggingface_hub``'s cache.

``open_checkpoint(spec)`` returns an object with the ``model.checkpoint.Checkpoint`` interface (``args``,
``names()``, ``tensor(name)``, ``layout``); ``open_tokenizer(ckpt)`` picks the tokenizer that belongs to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.checkpoint import Checkpoint, CheckpointError


def open_checkpoint(spec: str | os.PathLike, part: tuple[int, int] | None = None):
    """A Checkpoint (Meta/HF folder) or a GGUFCheckpoint (.gguf file) for a path or a hub name."""
    from model.gguf import GGUFCheckpoint, is_gguf

    path = resolve(spec)
    if is_gguf(path):
        return GGUFCheckpoint(path, part=part)
    return Checkpoint(path, part=part)


def resolve(spec: str | os.PathLike) -> Path:
    """A local path as is; ``org/name`` (or ``org/name/file.gguf``) that is not a local path: the hub's copy."""
    path = Path(spec)
    if path.exists():
        return path
    from model.hub import is_hub_name, snapshot

    if is_hub_name(str(spec)):
        return snapshot(str(spec))
    return path


def open_tokenizer(ckpt, vocab_size: int | None = None):
    """The tokenizer that comes with ``ckpt``: Llama-3's tiktoken file when there is one, else the Hugging Face
    tokenizer (``tokenizer.json``, or the GGUF's own token list); Llama-3's shipped tiktoken file when the
    checkpoint carries none. Refuses one whose ids do not fit the model's embedding."""
    from model.hf_tokenizer import load_tokenizer

    return load_tokenizer(ckpt, vocab_size)


__all__ = ["open_checkpoint", "open_tokenizer", "resolve", "CheckpointError"]
