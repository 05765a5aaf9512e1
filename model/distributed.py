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

import contextlib
import itertools
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llama3_triton.model.errors import UserError


class TensorParallelError(UserError, RuntimeError):
    """Another rank failed, left or hung: said on every rank, in one line, so that none waits forever."""


# Collectives that do not complete in this time raise instead of hanging: how long a frozen rank (stopped, stuck in
# a driver call) holds the others. Ranks do the same work between collectives, so a healthy one is late by
# milliseconds to seconds (a first Triton compile on a cold cache: tens); two minutes is what a person waits before
# deciding a run has hung. The one wait that is a person's, not a rank's (the next chat line, a prompt typed on
# stdin), does not go through a collective (``from_rank0``), so it is not bounded by this.
DEFAULT_TIMEOUT_S = int(os.environ.get("LLAMA3_TRITON_TP_TIMEOUT", "120"))
# While rank 0 waits on a person, it shows it is alive every second; another rank that hears nothing for this long
# decides rank 0 is frozen and stops.
HEARTBEAT_TIMEOUT_S = float(os.environ.get("LLAMA3_TRITON_TP_HEARTBEAT_TIMEOUT", "30"))
_from_rank0_rounds = itertools.count()
# How long a rank that has loaded its weights waits for the others (``TensorParallel.agree``). Ranks load equal
# slices in parallel, so a healthy peer is seconds behind; one stuck on its files (a slow or hung mount) must
# not hold every other rank for the generation timeout.
LOAD_TIMEOUT_S = float(os.environ.get("LLAMA3_TRITON_TP_LOAD_TIMEOUT", "120"))
_agree_rounds = itertools.count()  # every rank calls agree() the same number of times: a key per round


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

    def from_rank0(self, read):
        """``read()`` run on rank 0, its result (a str, None or another JSON value) or the UserError it raised, given
        to every rank.

        For what waits on a person (the next chat line, stdin): the others poll the key-value store instead of
        blocking in a collective, whose timeout (DEFAULT_TIMEOUT_S) would end a chat left idle for two minutes.
        Rank 0 beats once a second while it waits; a rank that hears no beat for HEARTBEAT_TIMEOUT_S stops
        with a TensorParallelError (rank 0 frozen). Without a store, a collective as before."""
        if self.world == 1:
            return read()
        store = _default_store()
        if store is None:
            return self._from_rank0_by_collective(read)
        key = f"llama3-triton/from-rank0/{next(_from_rank0_rounds)}/"
        if self.rank == 0:
            done = threading.Event()

            def beat() -> None:
                n = 0
                while not done.wait(1.0):
                    n += 1
                    with contextlib.suppress(Exception):
                        store.set(key + "beat", str(n))

            beater = threading.Thread(target=beat, daemon=True)
            beater.start()
            try:
                box = ("ok", read())
            except UserError as e:
                box = ("error", str(e))
            finally:
                done.set()
            store.set(key + "value", json.dumps(box))
        else:
            last, heard = None, time.monotonic()
            while True:
                try:
                    if store.check([key + "value"]):
                        box = json.loads(store.get(key + "value"))
                        break
                    beat = store.get(key + "beat") if store.check([key + "beat"]) else None
                except Exception as e:  # the store lives with rank 0 or torchrun's agent: gone
                    raise TensorParallelError(
                        f"tensor-parallel rank {self.rank} lost the rendezvous store while waiting for rank 0's input: "
                        f"{(str(e).strip().splitlines() or [''])[0]}"
                    ) from None
                if beat != last:
                    last, heard = beat, time.monotonic()
                elif time.monotonic() - heard > HEARTBEAT_TIMEOUT_S:
                    raise TensorParallelError(
                        f"tensor-parallel rank 0 stopped responding for {HEARTBEAT_TIMEOUT_S:g} s while waiting for "
                        f"input (LLAMA3_TRITON_TP_HEARTBEAT_TIMEOUT); rank {self.rank} stops"
                    )
                time.sleep(0.05)
        if box[0] == "error":
            raise UserError(box[1])
        return box[1]

    def _from_rank0_by_collective(self, read):
        box = None
        if self.rank == 0:
            try:
                box = ("ok", read())
            except UserError as e:
                box = ("error", str(e))
        box = self.broadcast_object(box)
        if box[0] == "error":
            raise UserError(box[1])
        return box[1]

    def agree(self, error: BaseException | None, timeout_s: float | None = None) -> None:
        """Raise on every rank if any rank failed (e.g. to load), instead of leaving the others to hang.

        Through the process group's key-value store, not a collective: a rank that failed posts its one-line
        error at once, so that every other rank stops as soon as it has loaded, naming the rank and its error. A
        rank waits at most ``timeout_s`` (LOAD_TIMEOUT_S, LLAMA3_TRITON_TP_LOAD_TIMEOUT, much shorter than the
        generation timeout) for the others' reports: one that never reports (stuck on its files) is named.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return
        timeout_s = LOAD_TIMEOUT_S if timeout_s is None else timeout_s
        store = _default_store()
        round_ = next(_agree_rounds)
        if store is None:  # no store to post to: fall back to one all-reduce of the failure flags
            self._agree_by_all_reduce(error)
            return
        key = f"llama3-triton/agree/{round_}/"
        waiting, deadline = set(range(self.world)) - {self.rank}, time.monotonic() + timeout_s
        if error is not None:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            store.set(key + str(self.rank), "error: " + first)
            # Say so now, not after the wait below (bounded, but long if another rank is stuck too); the CLI
            # does not print an error marked as reported a second time.
            print(f"[rank {self.rank}] error: {first}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                error.reported_by_rank = self.rank
            # Each other rank stops as soon as it has loaded and reads this. Wait (bounded) until they have all
            # reported, so that they print why before this rank's exit makes torchrun stop them.
            with contextlib.suppress(Exception):
                while waiting and time.monotonic() < deadline:
                    waiting = {r for r in waiting if not store.check([key + str(r)])}
                    time.sleep(0.05 if waiting else 0.2)  # after the last report: a moment for it to print
            raise error
        store.set(key + str(self.rank), "ok")
        while waiting:
            for r in sorted(waiting):
                try:
                    value = store.get(key + str(r)).decode("utf-8", "replace") if store.check([key + str(r)]) else None
                except Exception as e:  # the store lives in rank 0's process (torchrun): it failed and left
                    raise TensorParallelError(
                        f"tensor-parallel rank {self.rank} lost the rendezvous store while waiting for the others to "
                        f"load (rank 0 failed? its error is above): {(str(e).strip().splitlines() or [''])[0]}"
                    ) from None
                if value is not None:
                    if value != "ok":
                        raise TensorParallelError(
                            f"tensor-parallel rank {r} failed: {value.removeprefix('error: ')}; rank {self.rank} "
                            "stops too"
                        )
                    waiting.discard(r)
            if waiting and time.monotonic() > deadline:
                raise TensorParallelError(
                    f"tensor-parallel rank(s) {sorted(waiting)} did not finish loading within {timeout_s:g} s "
                    f"(LLAMA3_TRITON_TP_LOAD_TIMEOUT); rank {self.rank} stops"
                )
            if waiting:
                time.sleep(0.05)

    def _agree_by_all_reduce(self, error: BaseException | None) -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        failed = torch.zeros(self.world, dtype=torch.int32, device=device)
        failed[self.rank] = int(error is not None)
        dist.all_reduce(failed)
        if error is not None:
            raise error
        bad = failed.nonzero().flatten().tolist()
        if bad:
            raise TensorParallelError(
                f"tensor-parallel rank {bad[0]} failed (its error is above); rank {self.rank} stops too"
            )


def _default_store():
    """The default process group's key-value store (torchrun's TCPStore, a FileStore, ...), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a private API: if it moves, agree() falls back to a collective
        return None


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
