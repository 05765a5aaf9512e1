"""What the checkpoint and tokenizer tests share (a helper module, not a test module): a small random checkpoint
written in either layout, and a checkpoint file replaced by a FIFO."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from llama3_triton.model.tokenizers.llama3 import default_tokenizer_path
from llama3_triton.model.tools.tiny import random_weights, tiny_args, write_hf_checkpoint, write_meta_checkpoint

SMALL = {"dim": 64, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32}


def small_checkpoint(folder: Path, *, shards: int = 1, hf: bool = False, hf_shards: int = 1, tied: bool = False,
                     seed: int = 1):  # fmt: skip
    """A one-layer random checkpoint in Meta's layout (``shards`` files) or Hugging Face's (``hf_shards``):
    (its ModelArgs, its weights)."""
    args = tiny_args(**SMALL, tie_embeddings=tied)
    weights = random_weights(args, seed, torch.float32)
    if hf:
        write_hf_checkpoint(folder, args, weights, hf_shards)
    else:
        write_meta_checkpoint(folder, args, weights, shards, 32, 1.3, default_tokenizer_path())
    return args, weights


@contextmanager
def fifo_in_place(path: Path):
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
