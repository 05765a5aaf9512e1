"""The sampling loop: prefill the prompts once, then one decode step per new token.

A batch of prompts of different lengths is right-padded and prefilled together; the logits of each
prompt's own last token pick its first new token, and from then on every sequence decodes at its own
position (slot len_b, len_b + 1, ...), overwriting the padding's cache slots before it ever reads them.
Sampling (``model.sampling``) runs on the device and the stop check is batched, so without a streaming
callback or stop strings the loop only synchronises with the host every ``SYNC_EVERY`` steps; with them,
the tokens come back through pinned memory a few steps behind the device. On CUDA a step is two replayed
graphs, the model's decode step and the sampling step (``_DecodeLoop``).

A conversation, one turn after another over the history in the KV cache, is chat.py's ``ChatSession``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llama3_triton.model.errors import UserError, shown
from llama3_triton.model.generation.sampling import SampleRng, SamplingParams, TokenCounts, sample

__all__ = [
    "SamplingParams",
    "sample",
    "generate",
    "GenerationOutput",
    "StopStrings",
    "TextStream",
    "check_fits",
]

SYNC_EVERY = 16
# The smallest temperature accepted (0 means greedy). Below it, logits / temperature overflows fp32 for
# ordinary logits (|logit| ~ 30 / 1e-45 = inf) and the softmax turns into NaN; 1e-3 is already greedy in practice.


class NonFiniteLogitsError(UserError, RuntimeError):
    """The model produced NaN or Inf logits (damaged weights, or activations that overflowed the dtype)."""


@dataclass
class GenerationOutput:
    texts: list[str]
    tokens: list[list[int]]  # new tokens per prompt, without the stop token
    stop_reasons: list[str]  # "stop_token", "stop_string", "max_new_tokens" or "interrupted"
    prompt_tokens: list[int]  # prompt length per sequence
    prefill_seconds: float = 0.0  # includes any one-time kernel compilation / autotuning of the prefill
    first_decode_seconds: float = 0.0  # the first decode step: kernel compilation and CUDA-graph capture
    decode_seconds: float = 0.0  # every later decode step: the steady state
    decode_steps: int = 0  # steps timed in decode_seconds (the first step is not among them)
    sample_seconds: float | None = None  # time in sampling, all steps (CPU only: timing it on a GPU would sync)
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        """Steady-state decode steps per second (each step makes one token for every sequence in the batch);
        the first step, which pays for compilation and graph capture, is timed apart."""
        return (
            self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else float("nan")
        )


def generate(
    model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    bos: bool = True,
    start_pos: int = 0,
    stop_tokens: Sequence[int] | None = None,
    stop: Sequence[str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    interruptible: bool = False,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` for each prompt (text, or token ids used as given).

    Stops a sequence at any of the model's stop tokens (128001, 128008, 128009), at the first of the
    ``stop`` strings (the text ends before it; the tokens end with the one that completed it) or at
    max_new_tokens. Sampling: see ``model.sampling.SamplingParams``. ``seed`` makes sampling repeatable (the
    same tokens on the CPU and the GPU: ``model.sampling.SampleRng``); ``generator`` (a SampleRng on the model's
    device, or a torch.Generator, which keeps the loop out of the CUDA graph) is used instead when given, so a
    caller can draw several generations from one stream of random numbers (a chat session).
    ``on_token(index_in_batch, token_id)`` streams token ids and ``on_text(index_in_batch, text)`` streams text,
    whole characters only and never a piece of a stop string; the tokens reach the host asynchronously
    (``_DecodeLoop.arrived``), at most STREAM_LAG steps behind the device, with no host sync per step.
    ``start_pos`` continues after tokens already in the KV cache (chat turns; one prompt only).
    ``interruptible``: Ctrl-C (KeyboardInterrupt) ends the generation instead of propagating, with stop
    reason "interrupted" (single process only).
    """
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    tok = model.tokenizer
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise UserError("prompts must hold at least one prompt")
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise UserError(f"start_pos must be an integer >= 0, got {shown(start_pos)}")
    room = model.max_seq_len - start_pos  # a text is tokenized only as far as it could fit: bounded on any input
    ids = [tok.encode(p, bos=bos, limit=room) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise UserError(f"prompt {i} is empty: nothing to condition on")
        if min(p) < 0 or max(p) >= model.args.vocab_size:
            raise UserError(f"prompt {i} has token ids outside [0, {model.args.vocab_size})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {shown(max_new_tokens)}")
    B, longest = len(ids), max(len(p) for p in ids)
    if B > model.max_batch_size:
        raise UserError(
            f"{B} prompts but the model was loaded with max_batch_size={model.max_batch_size} "
            f"(pass max_batch_size={B} or more to Llama.load)"
        )
    if start_pos and B != 1:
        raise UserError("start_pos (continuing from the KV cache) needs exactly one prompt")
    check_fits(longest, max_new_tokens, model.max_seq_len, start_pos)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"stop strings must be non-empty strings, got {shown(stop)}")
    device = model.device
    stops = torch.tensor(list(stop_tokens if stop_tokens is not None else tok.stop_tokens), device=device)
    if params.temperature > 0 and generator is None:
        generator = SampleRng(seed, device)  # seed None: a fresh random one (the global RNG is left alone)
    counts = TokenCounts(ids, model.args.vocab_size, device) if params.penalized else None
    interruptible = interruptible and not model.tp.enabled

    lengths = torch.tensor([len(p) for p in ids], device=device)
    padded = torch.tensor([p + [tok.pad_id] * (longest - len(p)) for p in ids], device=device)
    texts_streamed = [TextStream(tok, stop) for _ in range(B)] if (stop or on_text) else None
    stop_set = set(stops.tolist())
    stopped_at: list[int | None] = [None] * B  # step of the token that ends each sequence (host-side view)
    sample_seconds = 0.0
    timed_sampling = device.type == "cpu"  # synchronous there, so a host clock measures it for free

    # Ids past the tokenizer's (an embedding padded beyond its vocabulary) have no text: never sampled.
    n_words = getattr(tok, "n_words", None)
    decodable = n_words if n_words is not None and n_words < model.args.vocab_size else None

    def pick(logits: torch.Tensor) -> torch.Tensor:
        nonlocal sample_seconds
        t = time.perf_counter()
        if decodable is not None:
            logits[:, decodable:] = float("-inf")  # a copy (record passes nan_to_num's), never the model's buffer
        # Under tensor parallelism every rank holds the same logits, but rank 0's sample is the answer.
        token = model.tp.broadcast(sample(logits, params, generator, counts))  # (B,)
        if timed_sampling:
            sample_seconds += time.perf_counter() - t
        if counts is not None:
            counts.add(token)
        return token

    def deliver(step: int, row: list[int]) -> None:
        """Stream token ``step`` of every sequence (host-side: stop tokens, callbacks, stop strings)."""
        for b, t in enumerate(row):
            if stopped_at[b] is not None:
                continue
            if t in stop_set:
                stopped_at[b] = step
                continue
            if on_token is not None:
                on_token(b, t)
            if texts_streamed is not None:
                piece = texts_streamed[b].feed(t)
                if piece and on_text is not None:
                    on_text(b, piece)
                if texts_streamed[b].hit is not None:
                    stopped_at[b] = step

    sync(device)
    t0 = time.perf_counter()
    produced, reason_all = 0, None
    # Streaming (callbacks or stop strings) reads every token on the host, but never waits for the newest: the
    # device runs up to STREAM_LAG steps ahead and the tokens come back through a pinned buffer. Under tensor
    # parallelism every rank must make the same choices (a rank that leaves the loop early would strand the
    # others in a collective), so rank 0's is used.
    streaming = model.tp.broadcast_object(on_token is not None or texts_streamed is not None)
    with torch.inference_mode():
        loop = None
        try:
            logits = model.prefill(padded, start_pos, last=lengths - 1, check=False)[:, 0]  # (B, vocab)
            loop = _DecodeLoop(model, pick, generator, counts, stops, start_pos + lengths, max_new_tokens, streaming)
            loop.first(logits)  # token 0, from the prompt's last logits
            sync(device)
            t1 = t_first = time.perf_counter()
            for step in range(max_new_tokens):  # token `step` is on the device; make token step + 1
                produced = step + 1
                if streaming:
                    for s, row in loop.arrived(step):
                        deliver(s, row)
                    if all(s is not None for s in stopped_at):
                        break
                if produced == max_new_tokens:
                    break
                if not streaming and step % SYNC_EVERY == SYNC_EVERY - 1:
                    all_done, any_bad = torch.stack([loop.done.all(), loop.bad.any()]).tolist()  # one host sync
                    if any_bad:
                        _check_finite(loop.bad, step)
                    if all_done:
                        break
                # A finished sequence keeps decoding (its tokens are discarded): the batch stays static.
                loop.advance()
                if step == 0:  # the first step compiles kernels / captures the CUDA graphs: time it apart
                    sync(device)
                    t_first = time.perf_counter()
            if streaming:  # the tokens still on their way, up to the last one made
                for s, row in loop.arrived(produced - 1, wait=True):
                    deliver(s, row)
        except KeyboardInterrupt:
            if not interruptible or produced == 0:
                raise
            reason_all = "interrupted"
        sync(device)
        t2 = time.perf_counter()
        _check_finite(loop.bad, produced - 1)
        out = loop.out[:produced, 0].T  # (B, produced)

    texts, tokens, reasons = [], [], []
    for b, row in enumerate(out.tolist()):
        cut = next((i for i, t in enumerate(row) if t in stop_set), None)
        if texts_streamed is not None and texts_streamed[b].hit is not None:
            kept, reason = row[: stopped_at[b] + 1], "stop_string"
        elif cut is not None:
            kept, reason = row[:cut], "stop_token"
        else:
            kept, reason = row, reason_all or "max_new_tokens"
        if texts_streamed is not None:
            rest = texts_streamed[b].flush()
            if rest and on_text is not None:
                on_text(b, rest)
            text = texts_streamed[b].text
        else:
            text = tok.decode(kept)
        tokens.append(kept)
        reasons.append(reason)
        texts.append(text)
    steps = max(produced - 2, 0)
    return GenerationOutput(
        texts=texts,
        tokens=tokens,
        stop_reasons=reasons,
        prompt_tokens=[len(p) for p in ids],
        prefill_seconds=t1 - t0,
        first_decode_seconds=t_first - t1,
        decode_seconds=t2 - t_first,
        decode_steps=steps,
        sample_seconds=sample_seconds if timed_sampling else None,
        extra={"cuda_graphs": loop is not None and loop.sample_graph is not None},  # decode + sampling replayed
    )


STREAM_LAG = 4  # decode steps the device may run ahead of the host while streaming


class _DecodeLoop:
    """The decode loop's state on the device and its one step: decode the last tokens at their positions, sample
    the next ones, write them down. ``rec[s]`` holds token s of every sequence and whether any logits so far were
    NaN/Inf; ``step`` counts the tokens made (a device tensor, so that a CUDA graph can advance it).

    On CUDA (no tensor parallelism, the model's decode graph available, ``SampleRng`` or greedy sampling) a step
    is two graph replays and nothing else: the model's decode step, whose static input buffers are this loop's
    ``tokens`` and ``positions``, then the sampling step recorded here, which reads the decode graph's logits and
    writes the next tokens straight into those buffers. No host sync, no per-step launch from Python. Elsewhere
    the same ``_sample_step`` runs eagerly.
    """

    def __init__(self, model, pick, generator, counts, stops, positions, max_new_tokens, streaming):
        B, device = positions.shape[0], positions.device
        self.model, self.pick, self.stops = model, pick, stops
        self.rec = torch.zeros(max_new_tokens, 2, B, dtype=torch.long, device=device)  # (token, non-finite so far)
        self.bad = torch.zeros(B, dtype=torch.bool, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = positions.clone()  # where each sequence's next token goes
        self.decode_graph = self.sample_graph = None
        # What a sampling step writes besides the loop's own tensors (the capture's warm-up puts it back).
        self._also_written = [generator.counter] if isinstance(generator, SampleRng) else []
        self._also_written += [counts.generated] if counts is not None else []
        graphable = device.type == "cuda" and model.use_cuda_graph and not model.tp.enabled
        if graphable and not isinstance(generator, torch.Generator):  # a torch.Generator would need registering
            self._capture()
        self.pinned = None
        if streaming and device.type == "cuda":
            self.pinned = torch.empty(self.rec.shape, dtype=torch.long, pin_memory=True)
            self.events: dict[int, torch.cuda.Event] = {}
        self.delivered = 0  # tokens handed to the host so far

    @property
    def out(self) -> torch.Tensor:
        return self.rec[:, :1]  # (max_new, 1, B)

    def first(self, logits: torch.Tensor) -> None:
        """Token 0 of every sequence, from the prompts' last logits (B, vocab)."""
        self.record(logits)
        self._copy_out()

    def record(self, logits: torch.Tensor) -> None:
        """Sample token ``step`` from logits (B, vocab) and write it down."""
        self.bad |= ~torch.isfinite(logits).all(dim=-1)
        # Sampling gets finite stand-ins for NaN/Inf (noted in ``bad``, reported at the stop checks), so that it
        # never fails first with a message about probabilities, nor, on CUDA, trips a device-side assert.
        token = self.pick(torch.nan_to_num(logits))
        self.rec.index_copy_(0, self.step, torch.stack([token, self.bad.long()])[None])
        self.done |= torch.isin(token, self.stops)
        self.tokens.copy_(token[:, None])
        self.step += 1

    def _sample_step(self, logits: torch.Tensor) -> None:
        self.positions += 1
        self.record(logits)

    def advance(self) -> None:
        """Make the next token of every sequence."""
        if self.sample_graph is not None:
            self.decode_graph.replay_static()
            self.sample_graph.replay()
            self._copy_out()
        else:
            self._sample_step(self.model.decode(self.tokens, self.positions))
            self._copy_out()

    def _copy_out(self) -> None:
        """Streaming on CUDA: start copying the newest token to pinned host memory, with an event to wait on."""
        if self.pinned is None:
            return
        s = len(self.events)
        self.pinned[s].copy_(self.rec[s], non_blocking=True)
        self.events[s] = torch.cuda.Event()
        self.events[s].record()

    def arrived(self, last: int, wait: bool = False) -> list[tuple[int, list[int]]]:
        """Tokens delivered..last that have reached the host, in order: all of them with ``wait``, else those whose
        copy is done and, to bound the lag, any older than STREAM_LAG steps. Raises on NaN/Inf logits first."""
        rows = []
        while self.delivered <= last:
            s = self.delivered
            if self.pinned is None:
                token, bad = self.rec[s].tolist()
            else:
                event = self.events[s]
                if not (wait or last - s >= STREAM_LAG or event.query()):
                    break
                event.synchronize()
                token, bad = self.pinned[s].tolist()
            if any(bad):
                _check_finite(torch.tensor(bad, dtype=torch.bool), s)
            rows.append((s, token))
            self.delivered += 1
        return rows

    def _capture(self) -> None:
        g = self.model.decode_graph(self.tokens, self.positions)
        if g is None:
            return
        self.tokens, self.positions = g.tokens, g.positions  # the decode graph reads these
        written = [self.rec, self.bad, self.done, self.step, self.tokens, self.positions, *self._also_written]
        saved = [t.clone() for t in written]
        try:
            stream = torch.cuda.Stream()  # warm up (lazy initialisation) on a side stream, then undo its writes
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._sample_step(g.logits)
            torch.cuda.current_stream().wait_stream(stream)
            for t, old in zip(written, saved, strict=True):
                t.copy_(old)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._sample_step(g.logits)
        except Exception as e:  # an optimisation: fall back to eager sampling, say so once
            warnings.warn(f"CUDA graph capture of sampling failed, sampling eagerly: {type(e).__name__}: {e}",
                          stacklevel=3)  # fmt: skip
            for t, old in zip(written, saved, strict=True):
                t.copy_(old)
            return
        self.decode_graph, self.sample_graph = g, graph


class StopStrings:
    """Finds the first of several stop strings in text that arrives in pieces. ``feed`` returns the text that
    is safe to show: it holds back a tail that could still grow into a stop string, and nothing from the
    first stop string on. ``hit`` is the stop string's offset in ``text`` once one is seen."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything fed
        self.sent = 0  # text[:sent] has been returned
        self.hit: int | None = None

    def feed(self, piece: str) -> str:
        if self.hit is not None:
            return ""
        self.text += piece
        # A stop string cannot start before `sent`: at that time no tail from there was a prefix of one.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.hit = min(found)
            return self._release(self.hit)
        hold = 0
        for s in self.stops:
            hold = max(
                hold, next((k for k in range(min(len(s) - 1, len(self.text)), 0, -1) if self.text.endswith(s[:k])), 0)
            )
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.hit is not None else self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class TextStream:
    """Token ids -> text for one sequence: whole UTF-8 characters (StreamDecoder), cut at the first stop string."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        from llama3_triton.model.tokenizers.llama3 import StreamDecoder

        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopStrings(stops)
        self.text = ""  # what has been released

    @property
    def hit(self) -> int | None:
        return self.stops.hit

    def feed(self, token_id: int) -> str:
        piece = self.stops.feed(self.decoder.feed(token_id))
        self.text += piece
        return piece

    def flush(self) -> str:
        piece = self.stops.feed(self.decoder.flush()) + self.stops.flush()
        self.text += piece
        return piece


def _check_finite(bad: torch.Tensor, step: int) -> None:
    """Raise if any sequence's logits were NaN/Inf (``bad``: (B,) bool, accumulated on the device)."""
    rows = bad.nonzero().flatten().tolist()
    if rows:
        raise NonFiniteLogitsError(
            f"the model produced NaN/Inf logits (sequence {rows[0]} of the batch, by new token {step + 1}): "
            "its weights hold non-finite values or its activations overflowed the dtype"
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_fits(prompt_tokens: int, max_new_tokens: int, max_seq_len: int, start_pos: int = 0) -> None:
    """Refuse, in one line that says what to pass instead, a prompt (after ``start_pos`` cached tokens) that with
    ``max_new_tokens`` does not fit the context. The command line runs it on the tokenizer before any weight is
    read; ``generate`` and speculative decoding run it again."""
    if start_pos + prompt_tokens > max_seq_len:
        raise UserError(
            f"a prompt of {prompt_tokens:,} tokens or more{f' (after {start_pos:,} cached)' if start_pos else ''} is "
            f"longer than the context of {max_seq_len:,} tokens: shorten it (or load with a larger max_seq_len, "
            "--max-seq-len)"
        )
    if start_pos + prompt_tokens + max_new_tokens > max_seq_len:
        room = max_seq_len - start_pos - prompt_tokens
        raise UserError(
            f"max_new_tokens={max_new_tokens} overflows the KV cache: {start_pos + prompt_tokens:,} prompt tokens + "
            f"{max_new_tokens:,} > max_seq_len {max_seq_len:,}; "
            + (f"at most {room:,} new tokens fit (--max-new-tokens), or shorten the prompt" if room >= 1
               else "shorten the prompt")
            + " (or load with a larger max_seq_len, --max-seq-len)"
        )  # fmt: skip
