"""``llama3-triton serve``: load the model, build the engine, serve OpenAI's API on it (model/server/).

Every check that needs no weights runs before the load (main.check_arguments, and the ones below), so a typo in
``--port`` costs no minute of loading. main.py hands over its loader (``load``) and default checkpoint: this module
imports nothing of main's, so the two stay out of an import circle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from llama3_triton.model.cli import CliError


def add_arguments(s) -> None:
    """``serve``'s own options (the checkpoint, device, dtype, backend and quantize options come from the shared
    ``model`` group)."""
    from llama3_triton.model.server import DEFAULT_MAX_QUEUE

    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    s.add_argument("--served-model-name", help="the model's name in the API (default: the checkpoint's name)")
    s.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $LLAMA3_TRITON_API_KEY, "
        "else none)",
    )
    s.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once (default 64)")
    s.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="new tokens in one engine step (default 512)"
    )
    s.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="tokens the paged KV cache holds (default: 90%% of free GPU memory; on a CPU room for --max-num-seqs "
        "full contexts, at most a quarter of free memory)",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait beyond --max-num-seqs; more get 429 (default {DEFAULT_MAX_QUEUE})",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds the requests in flight have to finish before they are ended (default 30)",
    )


def check(args) -> None:
    """serve's arguments, before any weight is read."""
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be in [0, 65535], got {args.port}")
    for flag, v, lo in (("--max-num-seqs", args.max_num_seqs, 1), ("--max-num-batched-tokens",
                        args.max_num_batched_tokens, 1), ("--max-queue", args.max_queue, 0)):  # fmt: skip
        if v < lo:
            raise CliError(f"{flag} must be at least {lo}, got {v}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 16:
        raise CliError(f"--kv-cache-tokens must be at least 16 (one page), got {args.kv_cache_tokens}")
    if not 0 <= args.shutdown_timeout <= 3600:
        raise CliError(f"--shutdown-timeout must be in [0, 3600] seconds, got {args.shutdown_timeout}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CliError("serve runs in one process on one device: the engine does not run tensor parallel yet "
                       "(run it without torchrun)")  # fmt: skip


def model_name(args, default_checkpoint: Callable[[], Path]) -> str:
    """--served-model-name, else a checkpoint folder's or file's name, a hub name as given, or the default model's."""
    if args.served_model_name:
        return args.served_model_name
    if args.ckpt:
        return args.ckpt.rstrip("/").split("/")[-1] if os.path.exists(args.ckpt) else args.ckpt
    return default_checkpoint().name


def cmd_serve(args, load, default_checkpoint: Callable[[], Path]) -> int:
    """``load(args)``: main's model loader (threads, device, dtype, backend, quantize)."""
    from llama3_triton.model.engine import Engine
    from llama3_triton.model.server.app import serve
    from llama3_triton.model.server.worker import EngineWorker

    check(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLAMA3_TRITON_API_KEY") or None
    name = model_name(args, default_checkpoint)
    llm = load(args)
    engine = Engine(
        llm,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
    )
    try:
        serve(
            EngineWorker(engine), name, host=args.host, port=args.port, api_key=api_key, max_queue=args.max_queue,
            shutdown_timeout=args.shutdown_timeout,
        )  # fmt: skip
    except OSError as e:  # the port is taken, the address is not this machine's
        raise CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print("stopped", file=sys.stderr)
    return 0
