"""CPU decode: the torch backend against Hugging Face transformers' ``generate``, on the same random weights.

Some users run on a CPU. Random Llama 3.2 1B-shaped weights are written once in both layouts (``make-tiny
--hf`` style: Hugging Face's at the top, Meta's in original/); our model loads Meta's through ``Llama.load``
(backend="torch"), transformers' ``LlamaForCausalLM.from_pretrained`` loads Hugging Face's; both in fp32 on
the CPU, with torch's default thread count (recorded). Both decode greedily from the same random prompt,
and decode tokens/s is measured the same way for both, from the wall time of whole generate calls:
(t(N new tokens) - t(1 new token)) / (N - 1), so that prefill and per-call set-up cancel. The greedy
tokens are compared too (random weights give near-ties, so a late divergence is not an error).

The smoke run does the same with the tiny model.

    python -m llama3_triton.benchmarks.cpu [runner flags]      # same as python -m llama3_triton.benchmarks --only cpu
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
import traceback
from typing import Any

from llama3_triton.benchmarks.common import Context, bind_hub_kernels, describe
from llama3_triton.benchmarks.e2e import model_args, scratch_dir, write_checkpoint

EST_SECONDS = 60  # on a 16-core host, 1B in fp32 (write, two loads, ~40 generated tokens each)


def _settings(ctx: Context) -> tuple[str, int, int, int]:
    """(model, prompt tokens, new tokens, repetitions)."""
    if ctx.smoke:
        return "tiny", 8, 6, 3
    return "1B", 32, (8 if ctx.quick else 16), (1 if ctx.quick else 3)


def _from_pretrained(path, dtype):
    """transformers >= 4.56 names the argument ``dtype``; older versions ``torch_dtype``."""
    bind_hub_kernels()  # before transformers: from a checkout, its kernels/ folder would answer `import kernels`
    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar would break up the run's log
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return LlamaForCausalLM.from_pretrained(path, **{key: dtype}).eval()


def run(ctx: Context) -> dict:
    import torch

    name, P, N, reps = _settings(ctx)
    rec: dict[str, Any] = {
        "model": name,
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "prompt_tokens": P,
        "new_tokens": N,
        "method": "(t(N new) - t(1 new)) / (N - 1) from whole greedy generate calls, median of the repetitions",
        "results": {},
    }
    if ctx.time_left() < (0 if ctx.smoke else EST_SECONDS):
        rec["skipped"] = f"time budget: ~{EST_SECONDS} s needed"
        return rec
    try:
        bind_hub_kernels()  # before transformers: from a checkout, its kernels/ folder would answer `import kernels`
        from transformers import LlamaForCausalLM  # noqa: F401  (fail early, with a clear error, if missing)
    except ImportError as e:
        rec["error"] = f"Hugging Face transformers is not importable ({describe(e)})"
        return rec
    from llama3_triton.model.llama import Llama

    args = model_args(name)
    stored = torch.float32 if ctx.smoke else torch.bfloat16  # 1B: half the bytes to write; both loaders upcast
    scratch = scratch_dir(2 * args.num_parameters() * stored.itemsize)
    try:
        write_checkpoint(scratch, name, stored, ctx.device, hf=True)
        ours = Llama.load(
            scratch / "original", backend="torch", device="cpu", dtype=torch.float32, max_seq_len=P + N + 8
        )
        hf = _from_pretrained(scratch, torch.float32)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    prompt = torch.randint(0, 128000, (P,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([prompt])

    def ours_generate(n: int) -> list[int]:
        return ours.generate([prompt], max_new_tokens=n, temperature=0, stop_tokens=[-1]).tokens[0]

    def hf_generate(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, P:].tolist()

    tokens = {}
    for impl, gen in (("torch_backend", ours_generate), ("transformers", hf_generate)):
        try:
            tokens[impl] = gen(N)  # warm-up (and the tokens compared below)
            t1 = statistics.median(_wall(gen, 1) for _ in range(reps))
            tn = statistics.median(_wall(gen, N) for _ in range(reps))
        except Exception as e:
            if ctx.debug:
                traceback.print_exc()
            rec["results"][impl] = {"error": describe(e)}
            ctx.log(f"cpu decode {impl}: error: {describe(e)}")
            continue
        per_token = max(tn - t1, 1e-9) / (N - 1)
        rec["results"][impl] = {
            "tokens_per_s": 1 / per_token,
            "per_token_ms": per_token * 1e3,
            "generate_1_s": t1,
            f"generate_{N}_s": tn,
        }
        ctx.log(f"cpu decode {impl} ({name}, fp32, {rec['threads']} threads): {1 / per_token:.2f} tokens/s")
    r = rec["results"]
    if all("tokens_per_s" in r.get(k, {}) for k in ("torch_backend", "transformers")):
        rec["speedup_vs_transformers"] = r["torch_backend"]["tokens_per_s"] / r["transformers"]["tokens_per_s"]
    if len(tokens) == 2:
        a, b = tokens["torch_backend"], tokens["transformers"]
        rec["same_greedy_tokens"] = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
    return rec


def _wall(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


if __name__ == "__main__":
    from llama3_triton.benchmarks import run_as

    sys.exit(run_as("--only", "cpu"))
