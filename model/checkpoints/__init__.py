"""Checkpoints: where a model's weights and config come from, each read the same way.

    folder.py    Meta's layout (params.json, consolidated.NN.pth) and Hugging Face's (config.json, safetensors),
                 detected; MemoryCheckpoint, weights already in memory (the benchmarks' large random models)
    gguf.py      llama.cpp's GGUF files (dequantized on load, or their blocks kept for quant/)
    hub.py       Hugging Face hub names, through huggingface_hub's cache
    sources.py   which of these a ``--ckpt`` names (``open_checkpoint``), the bundled SmolLM2, the tokenizer
    files.py     bounded, link-checked reads and whole-or-nothing writes

Every implementation presents the ``Reader`` surface below; ``loading.py`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from llama3_triton.model.config import ModelArgs


class Reader(Protocol):
    """What loading reads from a checkpoint: its config, and its tensors one at a time under Meta's names."""

    args: ModelArgs  # the model's configuration
    layout: str  # "meta", "hf", "gguf" or "memory"
    dir: Path  # where it was found (the folder, or the file's)

    def names(self) -> list[str]:
        """Every tensor the model needs, in a loading order that keeps each layer's weights together."""
        ...

    def tensor(self, name: str) -> torch.Tensor:
        """The full weight ``name`` (Meta's naming), shape-checked."""
        ...


__all__ = ["Reader"]
