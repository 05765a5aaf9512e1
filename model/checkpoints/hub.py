"""Hugging Face hub names as checkpoints: ``--ckpt org/name`` (a safetensors repo) or ``--ckpt org/name/FILE.gguf``
(one GGUF file of a repo), resolved through ``huggingface_hub``: its cache first, the network only when allowed.

The environment is read at each call, the way the ``huggingface-cli`` tools read it: ``HF_HUB_OFFLINE=1``
(cache only), ``HF_HUB_CACHE`` / ``HF_HOME`` (where the cache lives), ``HF_TOKEN`` (gated or private repos;
huggingface_hub reads it itself). Only what the loaders read is downloaded: config and tokenizer files,
safetensors weights and Llama-3's tiktoken file, not Meta's duplicate ``original/*.pth`` weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llama3_triton.model.checkpoints.folder import CheckpointError

_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model", "*.jinja"]


def is_hub_name(spec: str) -> bool:
    """``org/name`` or ``org/name/path/to/FILE.gguf`` (no leading ./ or /, no backslashes, no '..')."""
    if ".." in spec or "\\" in spec:
        return False
    parts = spec.split("/")
    if len(parts) == 2:
        return bool(_NAME.fullmatch(spec))
    return len(parts) > 2 and bool(_NAME.fullmatch("/".join(parts[:2]))) and spec.lower().endswith(".gguf")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def snapshot(spec: str) -> Path:
    """The local path of hub checkpoint ``spec`` (a snapshot folder, or a GGUF file), downloading if allowed."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(
            f"{spec}: no such local path (and huggingface_hub, needed for hub names, is not installed)"
        ) from None
    parts = spec.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    cache, offline = cache_dir(), _offline()
    try:
        if filename is not None:
            path = hf_hub_download(repo, filename, cache_dir=cache, local_files_only=offline)
        else:
            path = snapshot_download(repo, cache_dir=cache, local_files_only=offline, allow_patterns=ALLOW)
    except (GatedRepoError, RepositoryNotFoundError) as e:
        kind = "gated" if isinstance(e, GatedRepoError) else "not found"
        raise CheckpointError(
            f"{spec}: no such local path, and the Hugging Face hub says the repo is {kind} "
            "(a gated or private repo needs access and HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{spec}: no such local path, and the hub repo has no 'main' revision") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(f"{spec}: no such local path, not in the Hugging Face cache {cache}, and {why}") from None
    except Exception as e:  # network errors (httpx/requests), HTTP errors, a file missing from the repo
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{spec}: no such local path, and the Hugging Face hub could not provide it ({first})"
        ) from None
    return Path(path)
