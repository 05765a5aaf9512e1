"""Hub names as checkpoints (model/hub.py): ``org/name`` and ``org/name/FILE.gguf`` resolve through huggingface_hub's
cache. Every test builds its own cache in a temporary folder and never touches the network: HF_HUB_OFFLINE=1, or
an HF_ENDPOINT on a closed local port to see the "cannot reach the hub" error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3_triton.model.checkpoints.folder import CheckpointError
from llama3_triton.model.checkpoints.hub import cache_dir, is_hub_name
from llama3_triton.model.checkpoints.sources import resolve
from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.tiny import make_tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _repo(cache: Path, repo: str) -> Path:
    """An entry of huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return root / "snapshots" / COMMIT


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from tests.gguf_writer import write_tiny_gguf

    cache = tmp_path_factory.mktemp("hf-cache")
    make_tiny(_repo(cache, "org/tiny"), dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hf=True, seed=4)
    snap = _repo(cache, "org/tiny-GGUF")
    snap.mkdir(parents=True)
    write_tiny_gguf(snap / "m.Q8_0.gguf")
    return cache


@pytest.fixture
def offline(cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | extra


def test_hub_name_loads_the_cached_snapshot(offline):
    kw = dict(backend="torch", device="cpu", dtype=torch.float32, max_seq_len=16)
    llm = Llama.load("org/tiny", **kw)
    assert llm.checkpoint_dir == offline / "models--org--tiny" / "snapshots" / COMMIT
    local = Llama.load(llm.checkpoint_dir, **kw)
    tokens = torch.tensor([[128000, 9906, 11, 1917]])
    assert torch.equal(llm.forward(tokens, 0), local.forward(tokens, 0))


def test_hub_gguf_file_loads_from_the_cache(offline):
    llm = Llama.load("org/tiny-GGUF/m.Q8_0.gguf", backend="torch", device="cpu", dtype=torch.float32, max_seq_len=16)
    assert llm.checkpoint_format == "gguf" and llm.args.n_layers == 2


def test_a_gguf_repo_named_without_its_file_gets_a_hint(offline):
    with pytest.raises(
        CheckpointError, match=r"^org/tiny-GGUF: the hub repo has no Meta or Hugging Face weights; for a GGUF"
    ):
        Llama.load("org/tiny-GGUF", backend="torch", device="cpu")


def test_not_in_the_cache_offline_is_one_line(offline):
    with pytest.raises(CheckpointError) as e:
        Llama.load("meta-llama/Llama-3.2-1B-Instruct", backend="torch", device="cpu")
    assert str(e.value) == (
        f"meta-llama/Llama-3.2-1B-Instruct: no such local path, not in the Hugging Face cache {offline}, "
        "and HF_HUB_OFFLINE is set"
    )


def test_unreachable_hub_is_one_line_and_exit_1(cache, tmp_path):
    # A closed local port stands for a machine without network: nothing leaves this host.
    env = _env(HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2")
    r = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model.cli", "generate", "--ckpt", "org/not-cached", "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: org/not-cached: no such local path, not in the Hugging Face cache {cache}, "
        "and the hub could not be reached"
    ]
    # A cached repo still loads when the hub is unreachable: the cache answers.
    r = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model.cli", "info", "--ckpt", "org/tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert f"models--org--tiny/snapshots/{COMMIT}" in r.stdout and "hf layout" in r.stdout


def test_a_local_path_wins_over_a_hub_name(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    assert resolve("org/tiny") == Path("org/tiny")
    with pytest.raises(CheckpointError, match="no/such: no such local path, not in the Hugging Face cache"):
        resolve("no/such")  # not local: asks the hub (here its cache)


@pytest.mark.parametrize(
    "spec, want",
    [
        ("meta-llama/Llama-3.2-1B-Instruct", True),
        ("bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf", True),
        ("org/name/sub/file.gguf", True),
        ("org/name/config.json", False),
        ("./org/name", False),
        ("/abs/path", False),
        ("org/../etc", False),
        ("just-a-name", False),
        ("org/name/", False),
    ],
)
def test_what_counts_as_a_hub_name(spec, want):
    assert is_hub_name(spec) is want


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
