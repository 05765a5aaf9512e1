"""Tensor parallelism on torch.distributed: the few collectives the driver needs, and their set-up.

Megatron-style splitting, as Meta cut its own model-parallel shards:
  - column-parallel wq|wk|wv and w1|w3: each rank holds whole heads / a slice of the FFN columns, so
    attention and the SwiGLU run on local data with no communication;
  - row-parallel wo and w2: each rank multiplies its slice of the inputs, producing a partial sum of
    the full output, which one all-reduce completes (two per layer);
  - the vocabulary (embedding rows and output rows) split across ranks: the embedding lookup is masked
    to the rank's rows and all-reduced, and the logits are all-gathered before sampling.

Launched by torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR); NCCL on GPUs, gloo on
CPUs. A single process is a world of one, and every collective is then skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Collectives that do not complete in this time raise instead of hanging (a rank died mid-run).
DEFAULT_TIMEOUT_S = int(os.environ.get("LLAMA3_TRITON_TP_TIMEOUT", "600"))


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial results in place (after the row-parallel wo and w2)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dim (the vocabulary slices of the logits)."""
        if self.world == 1:
            return x
        if dist.get_backend() == "nccl":  # one preallocated buffer: the simplest thing to capture in a CUDA graph
            out = torch.empty((self.world, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x.contiguous())
            return out.movedim(0, -2).flatten(-2)  # (..., world, n) -> (..., world * n)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Make every rank hold rank ``src``'s ``x`` (the sampled tokens: one answer for all ranks)."""
        if self.world > 1:
            dist.broadcast(x, src)
        return x

    def broadcast_object(self, obj, src: int = 0):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (e.g. to load), instead of leaving the others to hang.

        Each rank reports whether it failed; the failing rank re-raises its own error, the others a
        one-line error naming the rank that failed.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        failed = torch.zeros(self.world, dtype=torch.int32, device=device)
        failed[self.rank] = int(error is not None)
        dist.all_reduce(failed)
        if error is not None:
            raise error
        bad = failed.nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(f"tensor-parallel rank {bad[0]} failed (its error is above); rank {self.rank} stops too")


def current() -> TensorParallel:
    """The process group this process belongs to (a world of one when torch.distributed is not set up)."""
    if dist.is_available() and dist.is_initialized():
        return TensorParallel(dist.get_rank(), dist.get_world_size())
    return TensorParallel()


def init_from_env(timeout_s: int = DEFAULT_TIMEOUT_S) -> TensorParallel:
    """Join the process group torchrun describes in the environment (no-op for a single process).

    NCCL when CUDA is available (each rank on GPU LOCAL_RANK), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return current()


def default_device(tp: TensorParallel) -> torch.device:
    """This rank's device: GPU LOCAL_RANK under torchrun on CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", "0")) if tp.enabled else torch.cuda.current_device()
        )
    return torch.device("cpu")
