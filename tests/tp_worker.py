"""One rank of a tensor-parallel test run (spawned by tests/model/test_tensor_parallel.py, gloo on the CPU)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def run_rank(rank: int, world: int, init_file: str, ckpt: str, out_dir: str, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        from llama3_triton.model.llama import Llama

        llm = Llama.load(ckpt, backend=backend, device="cpu", dtype=torch.float32, max_seq_len=48, max_batch_size=2)
        tokens = torch.randint(0, 128000, (2, 7), generator=torch.Generator().manual_seed(0))
        logits = llm.forward(tokens, 0)
        greedy = llm.generate(["The capital of France is", "Hi"], max_new_tokens=4, temperature=0)
        sampled = llm.generate("Once", max_new_tokens=4, temperature=1.0, top_p=1.0, seed=11)
        # Unseeded: each rank's generator gets its own random seed, so the ranks agree only through the
        # broadcast of rank 0's tokens.
        unseeded = llm.generate("Once", max_new_tokens=8, temperature=1.0, top_p=1.0, seed=None)
        # Only rank 0 streams (a callback changes how often the loop checks for the end): every rank must
        # still leave the loop at the same step, or the others would wait in a collective until the timeout.
        stop = greedy.tokens[1][1]
        streamed = llm.generate(
            "Hi",
            max_new_tokens=12,
            temperature=0,
            stop_tokens=[stop],
            on_token=(lambda b, t: None) if rank == 0 else None,
        )
        result = {
            "logits": logits,
            "greedy": greedy.tokens,
            "sampled": sampled.tokens,
            "unseeded": unseeded.tokens,
            "streamed": streamed.tokens,
            "weight_bytes": llm.weight_bytes(),
            "kv_heads_local": llm.k_cache[0].shape[1],
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # leave together (see benchmarks/tp.py)
    finally:
        dist.destroy_process_group()
