"""Tensor-parallel loading under faults (model/distributed.py): ranks agree on a load with their own short timeout,
and a failing rank tells the others, so a run stops at once instead of waiting out the process group's timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _agree_rank(rank: int, world: int, init_file: str, mode: str, out_dir: str) -> None:
    """One gloo rank: rank 1 fails to load (mode 'fails') or never reports (mode 'stuck'); rank 0 loads fine."""
    from datetime import timedelta

    import torch.distributed as dist

    from llama3_triton.model.distributed import TensorParallel

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    t0 = time.monotonic()
    try:
        if rank == 1 and mode == "stuck":
            time.sleep(6)  # "loading" far longer than rank 0's load timeout, then gone without a report
            result = "stuck"
        else:
            error = ValueError("consolidated.01.pth: cannot open") if rank == 1 else None
            try:
                TensorParallel(rank, world).agree(error, timeout_s=2)
                result = "ok"
            except Exception as e:
                result = f"{type(e).__name__}: {e}"
        Path(out_dir, f"agree{rank}.txt").write_text(f"{time.monotonic() - t0:.2f}\n{result}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fails", "stuck"])
def test_tensor_parallel_load_agreement(tmp_path, mode):
    import torch.multiprocessing as mp

    mp.spawn(_agree_rank, args=(2, str(tmp_path / "rdv"), mode, str(tmp_path)), nprocs=2, join=True)
    (t0, r0), (_, r1) = (Path(tmp_path, f"agree{r}.txt").read_text().split("\n", 1) for r in (0, 1))
    if mode == "fails":
        want = "tensor-parallel rank 1 failed: consolidated.01.pth: cannot open; rank 0 stops too"
        assert r0 == f"TensorParallelError: {want}"
        assert r1 == "ValueError: consolidated.01.pth: cannot open"
    else:
        assert r0.startswith("TensorParallelError: tensor-parallel rank(s) [1] did not finish loading within 2 s")
        assert 1.9 < float(t0) < 5.5  # the load timeout, not the 600 s of the process group


def test_torchrun_rank_whose_shard_is_a_fifo_stops_the_run_at_once(tmp_path):
    from llama3_triton.benchmarks.tp import free_port
    from llama3_triton.model.tools.tiny import make_tiny

    ckpt = make_tiny(tmp_path / "ckpt", dim=128, n_heads=2, n_kv_heads=2, n_layers=1, shards=2, seed=2)
    (ckpt / "consolidated.01.pth").unlink()
    os.mkfifo(ckpt / "consolidated.01.pth")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"LLAMA3_TRITON_TP_TIMEOUT": "600", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    t0 = time.monotonic()
    p = subprocess.run(
        [*cmd, "-m", "llama3_triton.model.cli", "generate", "--ckpt", str(ckpt), "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode != 0
    assert (
        f"[rank 1] error: {ckpt / 'consolidated.01.pth'}: cannot read the weights file: not a regular file" in p.stderr
    )
    assert p.stderr.count("[rank 1] error:") == 1  # said at once by agree(), not again by the CLI
    # Rank 0 either meets the FIFO too (it checks every file's size against the config) or hears of rank 1's.
    fifo = f"[rank 0] error: {ckpt / 'consolidated.01.pth'}: cannot read the weights file: not a regular file"
    assert fifo in p.stderr or "[rank 0] error: tensor-parallel rank 1 failed:" in p.stderr, p.stderr[-3000:]
    assert time.monotonic() - t0 < 200
