"""Tensor parallelism on torch.distributed (gloo, CPU processes): the same tokens and logits as one process,
for every shard count x rank count that divides, each rank reading only its slice of the weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llama3_triton.benchmarks.tp import free_port
from llama3_triton.model.checkpoints.folder import Checkpoint, CheckpointError
from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.tiny import make_tiny
from tests.tolerances import TOLERANCES
from tests.tp_worker import run_rank

# Each case starts torchrun workers: 10-25 s apiece (pytest -m 'not slow' skips them).
pytestmark = pytest.mark.slow

TINY = dict(dim=256, n_heads=4, n_kv_heads=4, dtype=torch.float32)  # 4 kv heads: TP 1, 2 and 4 all divide


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {s: make_tiny(root / f"meta{s}", shards=s, seed=5, **TINY) for s in (1, 2, 4)}
    out["hf"] = make_tiny(root / "hf", hf=True, hf_shards=2, seed=5, **TINY)
    return out


@pytest.fixture(scope="module")
def single(ckpts):
    """What one process computes, the baseline every TP run must reproduce (same weights in every ckpt)."""
    from tests.tp_worker import Path as _  # noqa: F401  (worker module imports cleanly in this process too)

    llm = Llama.load(ckpts[1], device="cpu", dtype=torch.float32, max_seq_len=48, max_batch_size=2)
    tokens = torch.randint(0, 128000, (2, 7), generator=torch.Generator().manual_seed(0))
    return {
        "logits": llm.forward(tokens, 0),
        "greedy": llm.generate(["The capital of France is", "Hi"], max_new_tokens=4, temperature=0).tokens,
        "sampled": llm.generate("Once", max_new_tokens=4, temperature=1.0, top_p=1.0, seed=11).tokens,
        "weight_bytes": llm.weight_bytes(),
    }


def _torchrun(*cli_args: str, timeout: float = 240, **env_extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m llama3_triton.model.cli ARGS`` on a free port, compiled-kernel env as a user has
    it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_extra
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    return subprocess.run(
        [*cmd, "-m", "llama3_triton.model.cli", *cli_args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _spawn(world: int, ckpt: Path, tmp_path: Path, backend: str = "torch") -> list[dict]:
    init = tmp_path / "rendezvous"
    mp.spawn(run_rank, args=(world, str(init), str(ckpt), str(tmp_path), backend), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("shards, world", [(1, 2), (2, 2), (4, 2), (1, 4), (2, 4), (4, 4)])
def test_tensor_parallel_matches_one_process(ckpts, single, tmp_path, shards, world):
    results = _spawn(world, ckpts[shards], tmp_path)
    for r, res in enumerate(results):
        assert res["greedy"] == single["greedy"], f"rank {r}"
        assert res["unseeded"] == results[0]["unseeded"], f"rank {r} sampled its own tokens"
        hi = single["greedy"][1]
        assert res["streamed"] == [hi[: hi.index(hi[1])]], f"rank {r}"  # cut at the stop token, on every rank
        assert res["sampled"] == single["sampled"], f"rank {r}"  # rank 0's sample, broadcast to all
        torch.testing.assert_close(res["logits"], single["logits"], **TOLERANCES[torch.float32])
        assert res["kv_heads_local"] == 4 // world
        # Each rank holds 1/world of every split weight; only the norms (3 x 256 floats here) are replicated.
        assert res["weight_bytes"] <= single["weight_bytes"] / world + 3 * 256 * 4 * 2


def test_tensor_parallel_hf_layout(ckpts, single, tmp_path):
    results = _spawn(2, ckpts["hf"], tmp_path)
    for res in results:
        assert res["greedy"] == single["greedy"]
        torch.testing.assert_close(res["logits"], single["logits"], **TOLERANCES[torch.float32])


def test_tensor_parallel_triton_kernels(ckpts, single, tmp_path):
    """The Triton kernels run unchanged on each rank's local heads (interpreted here)."""
    results = _spawn(2, ckpts[2], tmp_path, backend="triton")
    for res in results:
        assert res["greedy"] == single["greedy"]


@pytest.mark.parametrize(
    "shards, world, expected",
    [(4, 4, [[0], [1], [2], [3]]), (4, 2, [[0, 1], [2, 3]]), (1, 2, [[0], [0]]), (2, 4, [[0], [0], [1], [1]])],
)
def test_each_rank_opens_only_the_shards_it_needs(ckpts, shards, world, expected):
    for rank in range(world):
        ck = Checkpoint(ckpts[shards], part=(rank, world))
        assert ck.shard_ids == expected[rank]
        full = Checkpoint(ckpts[shards])
        for name in ("layers.0.attention.wk.weight", "layers.1.feed_forward.w2.weight", "tok_embeddings.weight"):
            split = 1 if ".w2." in name else 0
            want = full.tensor(name).chunk(world, dim=split)[rank]
            assert torch.equal(ck.tensor(name), want), (name, rank)


def test_hf_slices_equal_the_meta_slices(ckpts):
    for rank in range(2):
        hf, meta = Checkpoint(ckpts["hf"], part=(rank, 2)), Checkpoint(ckpts[2], part=(rank, 2))
        for name in hf.names():
            assert torch.equal(hf.tensor(name), meta.tensor(name)), name


def test_world_must_divide_kv_heads(ckpts):
    with pytest.raises(CheckpointError, match="must divide the 4 key/value heads"):
        Checkpoint(ckpts[1], part=(0, 3))


def test_a_rank_that_fails_to_load_stops_the_whole_run(ckpts, tmp_path):
    """Rank 1 reads a corrupt shard; both ranks exit non-zero with a clear line instead of hanging."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpts[2], bad)
    shard = bad / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    p = _torchrun("generate", "--ckpt", str(bad), "--max-new-tokens", "2", LLAMA3_TRITON_TP_TIMEOUT="60")
    assert p.returncode != 0
    assert "consolidated.01.pth: not a readable PyTorch checkpoint" in p.stderr
    assert "tensor-parallel rank 1 failed" in p.stderr


def test_torchrun_cli_generate(ckpts, single):
    p = _torchrun(
        "generate",
        "--ckpt",
        str(ckpts[2]),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    tok = Llama.load(ckpts[1], device="cpu", dtype=torch.float32, max_seq_len=48).tokenizer
    assert p.stdout == tok.decode(single["greedy"][0]) + "\n"  # printed once, by rank 0
    assert p.stderr.count("prompt ") == 1


# ---- waits on a person (chat lines, stdin) are not bounded by the collectives' timeout ---------------------------


def _person_rank(rank: int, world: int, init_file: str, mode: str, out_dir: str) -> None:
    """One gloo rank with a 2 s collective timeout. Rank 0 'waits on a person' for 4 s (mode 'slow'), or stops
    itself with SIGSTOP while waiting (mode 'frozen': rank 1 resumes it once it has given up on it)."""
    import signal
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from llama3_triton.model import distributed

    distributed.HEARTBEAT_TIMEOUT_S = 3.0
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=2)
    )
    tp, t0 = distributed.TensorParallel(rank, world), time.monotonic()
    Path(out_dir, f"pid{rank}").write_text(str(os.getpid()))

    def read():
        if mode == "frozen":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(4)
        return "the next line"

    try:
        result = tp.from_rank0(read)
        x = tp.all_reduce(torch.ones(1))  # the collectives still work after the long wait
        result = f"{result} {x.item():g}"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    Path(out_dir, f"person{rank}.txt").write_text(f"{time.monotonic() - t0:.2f}\n{result}")
    if rank == 1 and mode == "frozen":
        os.kill(int(Path(out_dir, "pid0").read_text()), signal.SIGCONT)
    if mode == "slow":
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["slow", "frozen"])
def test_a_wait_on_a_person_outlasts_the_collective_timeout_but_not_a_frozen_rank(tmp_path, mode):
    """A chat left idle past the collectives' timeout ended the run on every other rank: those waits poll the
    store while rank 0 beats. A rank 0 that stops beating (frozen) is given up on after the heartbeat timeout."""
    mp.spawn(_person_rank, args=(2, str(tmp_path / "rdv"), mode, str(tmp_path)), nprocs=2, join=False).join(60)
    (t0, r0), (t1, r1) = (Path(tmp_path, f"person{r}.txt").read_text().split("\n", 1) for r in (0, 1))
    if mode == "slow":
        assert r0 == r1 == "the next line 2", (r0, r1)
        assert 3.9 < float(t1) < 10
    else:
        assert r1.startswith("TensorParallelError: tensor-parallel rank 0 stopped responding for 3 s"), r1
        assert 2.9 < float(t1) < 10
