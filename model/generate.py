"""The sampling loop: prefill the prompts once, then one decode step per new token.

A batch of prompts of different lengths is right-padded and prefilled together; the logits of each
prompt's own last token pick its first new token, and from then on every sequence decodes at its own
position (slot len_b, len_b + 1, ...), overwriting the padding's cache slots before it ever reads them.
Sampling runs on the device and the stop check is batched, so without a streaming callback the loop
only synchronises with the host every ``SYNC_EVERY`` steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

SYNC_EVERY = 16
# The smallest temperature accepted (0 means greedy). Below it, logits / temperature overflows fp32 for
# ordinary logits (|logit| ~ 30 / 1e-45 = inf) and the softmax turns into NaN; 1e-3 is already greedy in practice.
MIN_TEMPERATURE = 1e-3


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


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 = greedy
    top_p: float = 0.9  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 = off

    def __post_init__(self):
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {k!r}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits (B, V) fp32 -> (B,) int64, on the logits' device."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) > params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class GenerationOutput:
    texts: list[str]
    tokens: list[list[int]]  # new tokens per prompt, without the stop token
    stop_reasons: list[str]  # "stop_token" or "max_new_tokens"
    prompt_tokens: list[int]  # prompt length per sequence
    prefill_seconds: float = 0.0  # includes any one-time kernel compilation / autotuning of the prefill
    first_decode_seconds: float = 0.0  # the first decode step: kernel compilation and CUDA-graph capture
    decode_seconds: float = 0.0  # every later decode step: the steady state
    decode_steps: int = 0  # steps timed in decode_seconds (the first step is not among them)
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
    seed: int | None = None,
    bos: bool = True,
    start_pos: int = 0,
    stop_tokens: Sequence[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` for each prompt (text, or token ids used as given).

    Stops a sequence at any of the model's stop tokens (128001, 128008, 128009) or at max_new_tokens.
    ``seed`` makes sampling repeatable; ``on_token(index_in_batch, token_id)`` streams tokens as they
    come (this adds one host sync per step). ``start_pos`` continues after tokens already in the KV
    cache (chat turns; one prompt only).
    """
    params = SamplingParams(temperature, top_p, top_k)
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
        raise ValueError(f"{B} prompts but the model was loaded with max_batch_size={model.max_batch_size}")
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
    device = model.device
    stops = torch.tensor(list(stop_tokens if stop_tokens is not None else tok.stop_tokens), device=device)
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # a fresh random seed for this generator only (the global RNG is left alone)
        else:
            generator.manual_seed(generator_seed(seed))

    lengths = torch.tensor([len(p) for p in ids], device=device)
    padded = torch.tensor([p + [tok.pad_id] * (longest - len(p)) for p in ids], device=device)

    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model._forward(
            padded, (start_pos + torch.arange(longest, device=device)).expand(B, longest), start_pos, gather=lengths - 1
        )[:, 0]
        # NaN/Inf logits are noted on the device (no host sync) and reported at the stop checks; sampling gets
        # finite stand-ins so that multinomial neither fails first with a message about "probability tensor"
        # nor, on CUDA, trips a device-side assert.
        bad = ~torch.isfinite(logits).all(dim=-1)  # (B,)
        logits = torch.nan_to_num(logits)
        # Under tensor parallelism every rank holds the same logits, but rank 0's sample is the answer.
        next_tok = model.tp.broadcast(sample(logits, params, generator))  # (B,)
        sync(device)
        t1 = t_first = time.perf_counter()
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        positions = start_pos + lengths  # where each sequence's next token goes
        produced = 0
        stop_set = set(stops.tolist())
        streamed_done = [False] * B
        # How often to ask the device whether every sequence is done (a host sync): every step when
        # streaming, else every SYNC_EVERY steps. Under tensor parallelism every rank must make the same
        # choice (a rank that leaves the loop early would strand the others in a collective), so rank 0's is used.
        streaming = model.tp.broadcast_object(on_token is not None)
        check_every = 1 if streaming else SYNC_EVERY
        for step in range(max_new_tokens):
            out[:, step] = next_tok
            done |= torch.isin(next_tok, stops)
            produced = step + 1
            if on_token is not None:  # stream each sequence's tokens up to (not including) its stop token
                _check_finite(bad, step)  # streaming syncs every step anyway: never print a token of NaN logits
                for b, t in enumerate(next_tok.tolist()):
                    if not streamed_done[b]:
                        streamed_done[b] = t in stop_set
                        if not streamed_done[b]:
                            on_token(b, t)
            if produced == max_new_tokens:
                break
            if step % check_every == check_every - 1:
                all_done, any_bad = torch.stack([done.all(), bad.any()]).tolist()  # one host sync for both
                if any_bad:
                    _check_finite(bad, step)
                if all_done:
                    break
            logits = model.decode_step(next_tok[:, None], positions)
            bad |= ~torch.isfinite(logits).all(dim=-1)
            logits = torch.nan_to_num(logits)
            positions = positions + 1
            if step == 0:  # the first step compiles kernels / captures the CUDA graph: time it apart
                sync(device)
                t_first = time.perf_counter()
            # A finished sequence keeps decoding (its tokens are discarded): the batch stays static.
            next_tok = model.tp.broadcast(sample(logits, params, generator))
        sync(device)
        t2 = time.perf_counter()
        _check_finite(bad, produced - 1)

    texts, tokens, reasons = [], [], []
    for row in out[:, :produced].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_set), None)
        kept = row if cut is None else row[:cut]
        tokens.append(kept)
        reasons.append("max_new_tokens" if cut is None else "stop_token")
        texts.append(tok.decode(kept))
    return GenerationOutput(
        texts=texts,
        tokens=tokens,
        stop_reasons=reasons,
        prompt_tokens=[len(p) for p in ids],
        prefill_seconds=t1 - t0,
        first_decode_seconds=t_first - t1,
        decode_seconds=t2 - t_first,
        decode_steps=max(produced - 2, 0),
    )


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
