"""Sampling cost per token over the Llama-3 vocabulary: ``model.sampling.sample`` against the sort-based way.

The sampler runs once per decode step on one row of 128,256 logits. On a CPU its cost adds straight to the
step's time (the tiny default model's forward pass takes a few ms), so it must stay well under that: the
goal is < 5 ms per token on a 2-core CPU. The peer is the plain approach the project used before (softmax,
a full sort, a cumulative sum, ``torch.multinomial``), which is also ``reference_probs`` + a draw.

    python -m llama3_triton.benchmarks.sampling                    # the CPU, this process's default thread count
    python -m llama3_triton.benchmarks.sampling --threads 1 --batch 1 --batch 8
    python -m llama3_triton.benchmarks.sampling --device cuda      # on a GPU: CUDA-event timing, no host sync inside

Timing: on a CPU ``time.perf_counter`` around each call after warm-up calls, median and 20th/80th percentiles
of --reps calls; on a GPU ``triton.testing.do_bench``. Prints a Markdown table (ms per call and per row);
``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

CONFIGS = {
    "top-p 0.9": dict(temperature=0.6, top_p=0.9),
    "top-k 50 + top-p 0.9": dict(temperature=0.6, top_p=0.9, top_k=50),
    "top-p 0.9 + min-p 0.05": dict(temperature=0.8, top_p=0.9, min_p=0.05),
    "top-p 0.9 + penalties": dict(temperature=0.6, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.3),
    "top-p 0.999 (thousands kept)": dict(temperature=1.0, top_p=0.999),
    "greedy": dict(temperature=0.0, top_p=1.0),
}


def _sorted_sample(logits, params, generator, counts=None):
    """The sort-based sampler: the reference distribution drawn with torch.multinomial."""
    import torch

    from llama3_triton.model.generation.sampling import reference_probs

    probs = reference_probs(logits, params, counts)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _time(fn, device, reps: int) -> dict:
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=10)
    del torch
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llama3_triton.benchmarks.sampling", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default 128256, Llama-3)")
    p.add_argument("--batch", type=int, action="append", help="rows per call (repeatable; default 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's own)")
    p.add_argument("--reps", type=int, default=50, help="timed calls per figure on a CPU (default 50)")
    p.add_argument("--no-sort", action="store_true", help="skip the (slow) sort-based peer")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    import torch

    from llama3_triton.model.generation.sampling import SampleRng, SamplingParams, TokenCounts, sample

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    print(f"device {device}, vocabulary {args.vocab}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\n| sampler | config | batch | median ms/call | p20-p80 | ms/row |\n|---|---|---|---|---|---|")
    for batch in args.batch or [1]:
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(batch, args.vocab, generator=g, device=device) * 3  # spread like a real model's
        counts = TokenCounts([[t % args.vocab for t in (1, 2, 3, 1000, 50000)]] * batch, args.vocab, device)
        counts.add(torch.full((batch,), 7, device=device))
        for name, kw in CONFIGS.items():
            params = SamplingParams(**kw)
            impls = {"model.sampling.sample": sample}
            if not args.no_sort:
                impls["sort + multinomial"] = _sorted_sample
            rng = SampleRng(0, device)  # generate()'s generator; the sorted way draws with torch's
            for impl, fn in impls.items():
                gen = rng if fn is sample else g
                t = _time(lambda f=fn, a=(logits, params, gen, counts): f(*a), device, args.reps)
                rows.append({"sampler": impl, "config": name, "batch": batch, **t})
                print(
                    f"| {impl} | {name} | {batch} | {t['median_ms']:.2f} | {t['p20_ms']:.2f}-{t['p80_ms']:.2f} "
                    f"| {t['median_ms'] / batch:.2f} |",
                    flush=True,
                )
    if args.json:
        meta = {
            "device": str(device),
            "vocab": args.vocab,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({**meta, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
