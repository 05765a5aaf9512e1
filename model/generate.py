"""The sampling loop: prefill the prompts once, then one decode step per new token.

A batch of prompts of different lengths is right-padded and prefilled together; the logits of each
prompt's own last token pick its first new token, and from then on every sequence decodes at its own
position (slot len_b, len_b + 1, ...), overwriting the padding's cache slots before it ever reads them.
Sampling (``model.sampling``) runs on the device and the stop check is batched, so without a streaming
callback or stop strings the loop only synchronises with the host every ``SYNC_EVERY`` steps.

``ChatSession`` keeps a conversation's history in the KV cache, one turn after another, with one random
generator for the whole session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from model.sampling import SamplingParams, TokenCounts, sample

__all__ = ["SamplingParams", "sample", "generate", "GenerationOutput", "StopStrings", "ChatSession", "ContextFull"]

SYNC_EVERY = 16
# The smallest temperature accepted (0 means greedy). Below it, logits / temperature overflows fp32 for
# ordinary logits (|logit| ~ 30 / 1e-45 = inf) and the softmax turns into NaN; 1e-3 is already greedy in practice.


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or Inf logits (damaged weights, or activations that overflowed the dtype)."""


def generator_seed(seed: int) -> int:
    """The value ``torch.Generator.manual_seed`` gets for a user's ``seed`` (any Python int).

    Seeds in [0, 2**32) are used as given. torch accepts only 64-bit values, and its CPU generator keeps the
    low 32 bits, so a larger or negative seed is hashed to 32 bits (then 2**64 works, and seeds 2**32 apart
    give different tokens)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if 0 <= seed < 2**32:
        return seed
    import hashlib

    digest = hashlib.sha256(f"llama3-triton seed {seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


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
    max_new_tokens. Sampling: see ``model.sampling.SamplingParams``. ``seed`` makes sampling repeatable;
    ``generator`` (a torch.Generator on the model's device) is used instead when given, so a caller can
    draw several generations from one stream of random numbers (a chat session). ``on_token(index_in_batch,
    token_id)`` streams token ids and ``on_text(index_in_batch, text)`` streams text, whole characters only
    and never a piece of a stop string; either adds one host sync per step, as do stop strings.
    ``start_pos`` continues after tokens already in the KV cache (chat turns; one prompt only).
    ``interruptible``: Ctrl-C (KeyboardInterrupt) ends the generation instead of propagating, with stop
    reason "interrupted" (single process only).
    """
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    tok = model.tokenizer
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt")
    ids = [tok.encode(p, bos=bos) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty: nothing to condition on")
        if min(p) < 0 or max(p) >= model.args.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {model.args.vocab_size})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    B, longest = len(ids), max(len(p) for p in ids)
    if B > model.max_batch_size:
        raise ValueError(
            f"{B} prompts but the model was loaded with max_batch_size={model.max_batch_size} "
            f"(pass max_batch_size={B} or more to Llama.load)"
        )
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"start_pos must be an integer >= 0, got {start_pos!r}")
    if start_pos and B != 1:
        raise ValueError("start_pos (continuing from the KV cache) needs exactly one prompt")
    if start_pos + longest > model.max_seq_len:
        raise ValueError(
            f"prompt of {longest} tokens (after {start_pos} cached) is longer than the context of "
            f"{model.max_seq_len} tokens"
        )
    if start_pos + longest + max_new_tokens > model.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} overflows the KV cache: {start_pos + longest} prompt tokens + "
            f"{max_new_tokens} > max_seq_len {model.max_seq_len}"
        )
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    device = model.device
    stops = torch.tensor(list(stop_tokens if stop_tokens is not None else tok.stop_tokens), device=device)
    if params.temperature > 0 and generator is None:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # a fresh random seed for this generator only (the global RNG is left alone)
        else:
            generator.manual_seed(generator_seed(seed))
    counts = TokenCounts(ids, model.args.vocab_size, device) if params.penalized else None
    interruptible = interruptible and not model.tp.enabled

    lengths = torch.tensor([len(p) for p in ids], device=device)
    padded = torch.tensor([p + [tok.pad_id] * (longest - len(p)) for p in ids], device=device)
    texts_streamed = [_TextStream(tok, stop) for _ in range(B)] if (stop or on_text) else None
    stop_set = set(stops.tolist())
    stopped_at: list[int | None] = [None] * B  # step of the token that ends each sequence (host-side view)
    sample_seconds = 0.0
    timed_sampling = device.type == "cpu"  # synchronous there, so a host clock measures it for free

    def pick(logits: torch.Tensor) -> torch.Tensor:
        nonlocal sample_seconds
        t = time.perf_counter()
        # Under tensor parallelism every rank holds the same logits, but rank 0's sample is the answer.
        token = model.tp.broadcast(sample(logits, params, generator, counts))  # (B,)
        if timed_sampling:
            sample_seconds += time.perf_counter() - t
        if counts is not None:
            counts.add(token)
        return token

    sync(device)
    t0 = time.perf_counter()
    produced, reason_all = 0, None
    with torch.inference_mode():
        try:
            logits = model.prefill(padded, start_pos, last=lengths - 1, check=False)[:, 0]  # (B, vocab)
            # NaN/Inf logits are noted on the device (no host sync) and reported at the stop checks; sampling
            # gets finite stand-ins so that it never fails first with a message about probabilities, nor, on
            # CUDA, trips a device-side assert.
            bad = ~torch.isfinite(logits).all(dim=-1)  # (B,)
            next_tok = pick(torch.nan_to_num(logits))
            sync(device)
            t1 = t_first = time.perf_counter()
            out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            positions = start_pos + lengths  # where each sequence's next token goes
            # How often to ask the device whether every sequence is done (a host sync): every step when
            # streaming or matching stop strings, else every SYNC_EVERY steps. Under tensor parallelism every
            # rank must make the same choice (a rank that leaves the loop early would strand the others in a
            # collective), so rank 0's is used.
            streaming = model.tp.broadcast_object(on_token is not None or texts_streamed is not None)
            check_every = 1 if streaming else SYNC_EVERY
            for step in range(max_new_tokens):
                out[:, step] = next_tok
                done |= torch.isin(next_tok, stops)
                produced = step + 1
                if streaming:
                    _check_finite(bad, step)  # streaming syncs every step anyway: never show a token of NaN logits
                    for b, t in enumerate(next_tok.tolist()):
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
                                done[b] = True
                if produced == max_new_tokens:
                    break
                if step % check_every == check_every - 1:
                    all_done, any_bad = torch.stack([done.all(), bad.any()]).tolist()  # one host sync for both
                    if any_bad:
                        _check_finite(bad, step)
                    if all_done:
                        break
                logits = model.decode(next_tok[:, None], positions)
                bad |= ~torch.isfinite(logits).all(dim=-1)
                positions = positions + 1
                if step == 0:  # the first step compiles kernels / captures the CUDA graph: time it apart
                    sync(device)
                    t_first = time.perf_counter()
                # A finished sequence keeps decoding (its tokens are discarded): the batch stays static.
                next_tok = pick(torch.nan_to_num(logits))
        except KeyboardInterrupt:
            if not interruptible or produced == 0:
                raise
            reason_all = "interrupted"
        sync(device)
        t2 = time.perf_counter()
        _check_finite(bad, produced - 1)

    texts, tokens, reasons = [], [], []
    for b, row in enumerate(out[:, :produced].tolist()):
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
    )


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


class _TextStream:
    """Token ids -> text for one sequence: whole UTF-8 characters (StreamDecoder), cut at the first stop string."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        from model.tokenizer import StreamDecoder

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


class ContextFull(ValueError):
    """The next chat turn does not fit in the KV cache."""


class ChatSession:
    """A conversation in the model's chat format (Meta's Llama-3 format, or the checkpoint's own template for a
    Hugging Face tokenizer) whose history lives in the model's KV cache: each turn
    feeds only its new tokens. One random generator serves the whole session (seeded once), so a seed makes
    the session repeatable without making every reply start the same way."""

    def __init__(self, model, *, system: str | None = None, seed: int | None = None, **sampling):
        from model.hf_tokenizer import chat_format

        self.model = model
        self.fmt = chat_format(model.tokenizer)
        self.system = system
        self.sampling = sampling  # generate()'s sampling keywords: temperature, top_p, top_k, min_p, penalties, stop
        SamplingParams(**{k: v for k, v in sampling.items() if k != "stop"})  # bad values fail here, not mid-chat
        self.generator = torch.Generator(device=model.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the random stream goes on."""
        self.pending: list[int] = self.fmt.encode_start(self.system)  # to feed before the next answer: BOS, system
        self.pos = 0  # tokens already in the KV cache

    @property
    def context_left(self) -> int:
        """Tokens of the context not yet used by the conversation."""
        return self.model.max_seq_len - self.pos - len(self.pending)

    def reply(
        self,
        text: str,
        *,
        max_new_tokens: int = 128,
        on_text: Callable[[int, str], None] | None = None,
        interruptible: bool = False,
    ) -> GenerationOutput:
        """The assistant's answer to one user message. Stop reason "context_full" when the KV cache ran out
        before the answer ended; ``ContextFull`` when the message itself does not fit."""
        prompt = (
            self.pending
            + self.fmt.encode_message({"role": "user", "content": text})
            + self.fmt.encode_header("assistant")
        )
        room = self.model.max_seq_len - self.pos - len(prompt)
        if room < 1:
            raise ContextFull(
                f"the chat history ({self.pos + len(prompt)} tokens) is longer than the context of "
                f"{self.model.max_seq_len} tokens"
            )
        out = generate(
            self.model,
            [prompt],
            max_new_tokens=min(max_new_tokens, room),
            generator=self.generator,
            start_pos=self.pos,
            on_text=on_text,
            interruptible=interruptible,
            **self.sampling,
        )
        if out.stop_reasons[0] == "max_new_tokens" and room < max_new_tokens:
            out.stop_reasons[0] = "context_full"
        kept = out.tokens[0]
        # Every kept token but possibly the last was fed back through the model (the cache holds them). Stopped
        # on a stop token: all kept tokens are cached. Otherwise the last may not be: feed it again next turn
        # (the cache is indexed by position, so feeding it twice writes the same slot with the same values).
        unfed = [] if out.stop_reasons[0] == "stop_token" else kept[-1:]
        self.pos += len(prompt) + len(kept) - len(unfed)
        self.pending = unfed + self.fmt.end_of_turn()
        return out
