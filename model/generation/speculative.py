"""Speculative decoding: past the bandwidth floor at batch 1, with the target model's output unchanged.

Batch-1 decode reads every weight once per token. Reading them once for K + 1 positions costs about what one
position costs (the products become skinny matrix products instead of vector products, still bound by the same
bytes), so if something cheap can *guess* the next K tokens, one target step can check all of them and keep the
longest correct run: up to K + 1 tokens for one read of the weights.

**A step.** The sequence so far is ``seq`` (prompt + output); the target's KV cache holds all of it but the last
token. The drafter proposes d_1..d_K. The target runs ``[seq[-1], d_1, .., d_K]`` in one pass at the next
positions (``Llama.prefill`` with a start position: causal among the new tokens, full over the cache), which gives
the target's next-token logits after each prefix: row i is the distribution of the token after d_1..d_i. Then, in
order:

- greedy: accept d_i while it equals the target's argmax of row i - 1; at the first mismatch take the argmax
  instead; if all K are accepted, row K gives one more token (the "bonus");
- sampled (every filter the sampler has: temperature, top-k, top-p, min-p, penalties): with p the target's
  filtered distribution of row i - 1 and q the drafter's for d_i, accept d_i with probability min(1, p(d_i) /
  q(d_i)); at the first rejection draw from max(0, p - q), normalised, and stop. The tokens then have exactly the
  target's distribution (Leviathan et al. 2023, Chen et al. 2023): a prompt-lookup drafter's q is a point mass,
  so it accepts with probability p(d_i) and otherwise draws from p without d_i.

Penalties are applied row by row with the counts of the tokens accepted so far, as plain decoding would see them.
**Rollback** is a position: the target's cache beyond the accepted tokens holds rejected keys and values that the
next step overwrites before any query can see them (a query at position t reads keys < t + 1 only); the draft
model's cache likewise moves back to what was accepted.

**Drafters.** ``NgramDrafter`` (prompt lookup): find the most recent earlier occurrence of the last n tokens (n =
3, then 2, then 1) in the prompt and output, propose what followed it: free, and right whenever the text copies
its input (rewriting, summarising, editing code). ``ModelDrafter``: a smaller model with the same tokenizer (Llama
3.2 1B for an 8B) or the target itself quantized, K cheap decode steps on its own KV cache.

**Adaptive K.** A step that accepts every draft grows K by one (up to ``max_draft``); one that accepts none halves
it; at zero the loop decodes plainly for a few steps and then tries one draft again, so open-ended text, where
guesses fail, costs about what plain decoding costs.

A step with nothing to verify, and each of a draft model's one-token steps, run through the model's decode step
(on CUDA its captured graph, the fused five launches a layer); the verify pass of K + 1 tokens runs eagerly through
the prefill kernels (a graph for it, per K, is not written yet).

A chat (``ChatSession(drafter=...)``, ``chat --draft``) decodes each reply this way, the history already in the
cache passed as ``context`` (the drafter looks back on all of it).

The stats (target steps, drafts proposed and accepted) come back in ``GenerationOutput.extra["speculative"]``.
Tokens equal plain decoding's exactly when greedy, given the same logits; a verify pass computes them with the
prefill kernels instead of the decode ones, which agree to rounding (the tests compare token for token). Sampled
runs draw from the same distribution, but not the same tokens for a seed as plain decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from llama3_triton.model.errors import UserError, shown
from llama3_triton.model.generation.generate import GenerationOutput, TextStream, check_fits, sync
from llama3_triton.model.generation.sampling import SamplingParams, TokenCounts, apply_penalties, draw, filter_probs

MAX_DRAFT = 16  # --draft-tokens at most
COOLDOWN_STEPS = 8  # plain steps after K fell to 0, before one draft is tried again


def _next_logits(llm, tokens: list[int], start: int) -> torch.Tensor:
    """Run ``tokens`` at positions ``start``.. and return the next-token logits (V,) after the last. One token goes
    through the model's decode step (on CUDA its captured graph, the fused five launches a layer), several through
    a prefill at ``start`` with the head on the last token only."""
    dev = llm.device
    if len(tokens) == 1:
        return llm.decode(torch.tensor([tokens], device=dev), torch.tensor([start], device=dev))[0]
    last = torch.tensor([len(tokens) - 1], device=dev)
    return llm.prefill(torch.tensor([tokens], device=dev), start, last=last, check=False)[0, 0]


class NgramDrafter:
    """Prompt lookup: propose what followed the most recent earlier occurrence of the sequence's last n tokens."""

    name = "ngram"

    def __init__(self, n_max: int = 3, n_min: int = 1):
        self.n_max, self.n_min = n_max, n_min
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> the end index (exclusive) of its latest occurrence
        self._indexed = 0  # n-grams ending at indices < this are in the index

    def reset(self) -> None:
        self._last.clear()
        self._indexed = 0

    def propose(self, seq: list[int], k: int, params: SamplingParams, gen) -> tuple[list[int], None]:
        # Index every n-gram that ends before the last token: the sequence's own tail is then never its own match.
        for end in range(max(self._indexed, 1), len(seq)):
            for n in range(self.n_min, self.n_max + 1):
                if end - n >= 0:
                    self._last[tuple(seq[end - n : end])] = end
        self._indexed = max(self._indexed, len(seq))
        for n in range(min(self.n_max, len(seq) - 1), self.n_min - 1, -1):
            end = self._last.get(tuple(seq[len(seq) - n :]))
            if end is not None and end < len(seq):
                # Copy what followed, reading on into the copy itself when the source runs into the sequence's
                # end: a repeating run (period len(seq) - end) then proposes k tokens, not just the few left.
                out: list[int] = []
                for i in range(k):
                    j = end + i
                    out.append(seq[j] if j < len(seq) else out[j - len(seq)])
                return out, None
        return [], None

    def rollback(self, valid: int) -> None:
        pass  # the index holds accepted tokens only


class ModelDrafter:
    """A draft model with the target's tokenizer: K greedy (or sampled, with the target's filters) decode steps."""

    def __init__(self, draft, target):
        a, b = draft.args.vocab_size, target.args.vocab_size
        if a != b or draft.tokenizer.n_words != target.tokenizer.n_words:
            raise UserError(
                f"the draft model's vocabulary ({a:,} ids, tokenizer {draft.tokenizer.n_words:,}) is not the target's "
                f"({b:,}, tokenizer {target.tokenizer.n_words:,}): a draft must share the target's tokenizer"
            )
        probe = "Speculative decoding checks the tokenizers: 123 ünïcode ✓"
        if draft.tokenizer.encode(probe) != target.tokenizer.encode(probe):
            raise UserError("the draft model's tokenizer encodes text differently from the target's: a draft must "
                            "share the target's tokenizer")  # fmt: skip
        self.llm, self.pos = draft, 0
        self.name = "model"

    def reset(self) -> None:
        self.pos = 0

    def propose(self, seq: list[int], k: int, params: SamplingParams, gen) -> tuple[list[int], list[torch.Tensor]]:
        llm = self.llm
        k = min(k, llm.max_seq_len - len(seq))
        if k <= 0:
            return [], []
        logits = _next_logits(llm, seq[self.pos :], self.pos)[None]  # (1, V): the tokens it has not seen yet
        self.pos = len(seq)
        drafts, qs = [], []
        for i in range(k):
            if params.temperature == 0:
                d = int(logits.argmax(-1))
            else:
                q = filter_probs(logits, params)
                q = q / q.sum(-1, keepdim=True)
                d = int(draw(q, gen))
                qs.append(q[0])
            drafts.append(d)
            if i + 1 < k:
                logits = _next_logits(llm, [d], self.pos)[None]
                self.pos += 1
        return drafts, qs

    def rollback(self, valid: int) -> None:
        """Keep the draft's cache for the first ``valid`` tokens of the sequence (what the target accepted)."""
        self.pos = min(self.pos, valid)


def judge(
    row: torch.Tensor,
    d: int,
    q: torch.Tensor | None,
    params: SamplingParams,
    counts: TokenCounts | None,
    gen: torch.Generator | None,
) -> int | None:
    """One draft token against the target's logits ``row`` (V,) for its position: None to accept it, else the
    token to emit instead (module docstring). ``q``: the drafter's distribution (V,), normalised, None for a point
    mass at ``d`` (prompt lookup)."""
    logits = apply_penalties(row[None], params, counts)
    if params.temperature == 0:
        best = int(logits.argmax(-1))
        return None if best == d else best
    p = filter_probs(logits, params)[0].double()
    p = p / p.sum()
    qd = q[d].double() if q is not None else torch.ones((), dtype=torch.float64, device=p.device)
    u = torch.rand((), generator=gen, device=p.device, dtype=torch.float64)
    if u * qd < p[d]:  # u < p(d) / q(d), without dividing by a zero q(d)
        return None
    if q is None:
        q = torch.zeros_like(p)
        q[d] = 1.0
    residual = (p - q.double()).clamp_(min=0)
    return int(draw((residual if residual.sum() > 0 else p)[None], gen))


def speculative_generate(
    model,
    prompt: str | Sequence[int],
    drafter,
    *,
    max_new_tokens: int = 64,
    params: SamplingParams | None = None,
    seed: int | None = None,
    bos: bool = True,
    stop_tokens: Sequence[int] | None = None,
    stop: Sequence[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    draft_tokens: int = 4,
    adaptive: bool = True,
    context: Sequence[int] = (),
    generator: torch.Generator | None = None,
    interruptible: bool = False,
    keep_drafter: bool = False,
) -> GenerationOutput:
    """Generate for one prompt with ``drafter``'s proposals verified by ``model`` (module docstring); the same
    ``GenerationOutput`` as ``generate``, with ``extra["speculative"]`` the acceptance statistics.

    ``context``: tokens already in the model's KV cache at positions 0.. (a chat's history): the prompt goes in
    after them, and the drafter sees them too. ``generator``: the random stream of sampled runs (a chat session's
    one), else one seeded with ``seed``. ``interruptible``: Ctrl-C ends the generation with stop reason
    "interrupted" once a token is out, as ``generate``'s. ``keep_drafter``: the drafter last saw a sequence that
    ``context`` extends (a chat's previous turn): it keeps what it holds of ``context`` (a draft model's cache)
    instead of starting over."""
    params = params or SamplingParams(0.0, 1.0, 0)
    tok, dev, V = model.tokenizer, model.device, model.args.vocab_size
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= MAX_DRAFT:
        raise UserError(f"draft_tokens must be an integer in [1, {MAX_DRAFT}], got {shown(draft_tokens)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {shown(max_new_tokens)}")
    ids = tok.encode(prompt, bos=bos, limit=model.max_seq_len) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise UserError("the prompt is empty: nothing to condition on")
    if min(ids) < 0 or max(ids) >= V:
        raise UserError(f"the prompt has token ids outside [0, {V})")
    context = [int(t) for t in context]
    check_fits(len(ids), max_new_tokens, model.max_seq_len, start_pos=len(context))  # as generate's refusal
    stops = set(tok.stop_tokens if stop_tokens is None else stop_tokens)
    gen = generator
    if params.temperature > 0 and gen is None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    counts = TokenCounts([ids], V, dev) if params.penalized else None
    stream = TextStream(tok, stop or ())
    if keep_drafter:
        drafter.rollback(len(context))
    else:
        drafter.reset()
    stats = {"drafter": drafter.name, "target_steps": 0, "proposed": 0, "accepted": 0, "draft_tokens": draft_tokens}
    out: list[int] = []
    reason: str | None = None

    def pick(row: torch.Tensor) -> int:
        logits = apply_penalties(row[None], params, counts)
        if params.temperature == 0:
            return int(logits.argmax(-1))
        return int(draw(filter_probs(logits, params), gen))

    def take(t: int) -> str | None:
        """Append one token; the stop reason if it ends the generation."""
        if t in stops:
            return "stop_token"
        out.append(t)
        if counts is not None:
            counts.add(torch.tensor([t], device=dev))
        piece = stream.feed(t)
        if on_text is not None and piece:
            on_text(0, piece)
        if stream.hit is not None:
            return "stop_string"
        if len(out) >= max_new_tokens:
            return "max_new_tokens"
        return None

    t0 = time.perf_counter()
    start = len(context)
    with torch.no_grad():
        last = torch.tensor([len(ids) - 1], device=dev)
        first = model.prefill(torch.tensor([ids], device=dev), start, last=last)[0, 0]
        sync(dev)
        prefill_s = time.perf_counter() - t0
        reason = take(pick(first))
        t1 = time.perf_counter()
        k, cooldown = draft_tokens, 0
        try:
            while reason is None:
                seq = context + ids + out
                room = min(max_new_tokens - len(out), model.max_seq_len - len(seq)) - 1  # drafts past it are wasted
                k_now = min(k, room) if cooldown == 0 else 0
                drafts, qs = drafter.propose(seq, k_now, params, gen) if k_now > 0 else ([], None)
                if drafts:  # verify: the last token and the drafts in one pass, logits after each
                    block = torch.tensor([[seq[-1], *drafts]], device=dev)
                    logits = model.prefill(block, len(seq) - 1, check=False)[0]  # (1 + len(drafts), V)
                else:  # nothing to verify: a plain decode step (on CUDA the captured graph)
                    logits = _next_logits(model, [seq[-1]], len(seq) - 1)[None]
                stats["target_steps"] += 1
                stats["proposed"] += len(drafts)
                accepted = 0
                for i, d in enumerate(drafts):
                    instead = judge(logits[i], d, qs[i] if qs else None, params, counts, gen)
                    if instead is None:
                        accepted += 1
                        reason = take(d)
                        if reason is not None:
                            break
                        continue
                    reason = take(instead)
                    break
                else:  # every draft accepted (or none proposed): the last row gives one more token
                    reason = take(pick(logits[len(drafts)]))
                stats["accepted"] += accepted
                drafter.rollback(len(seq) + accepted)
                if adaptive and drafts:
                    k = min(k + 1, draft_tokens) if accepted == len(drafts) else (k // 2 if accepted == 0 else k)
                    if k == 0:
                        cooldown = COOLDOWN_STEPS
                elif cooldown:
                    cooldown -= 1
                    if cooldown == 0:
                        k = 1
        except KeyboardInterrupt:
            if not interruptible or not out:
                raise
            reason = "interrupted"
        sync(dev)
        decode_s = time.perf_counter() - t1
    if stream.hit is None:
        piece = stream.flush()
        if on_text is not None and piece:
            on_text(0, piece)
    steps = stats["target_steps"]
    stats["acceptance_rate"] = stats["accepted"] / stats["proposed"] if stats["proposed"] else None
    stats["tokens_per_step"] = (len(out) - 1) / steps if steps else None  # the first token came from the prefill
    return GenerationOutput(
        texts=[stream.text], tokens=[out], stop_reasons=[reason], prompt_tokens=[len(ids)],
        prefill_seconds=prefill_s, decode_seconds=decode_s, decode_steps=max(len(out) - 1, 0),
        extra={"speculative": stats},
    )  # fmt: skip


__all__ = ["NgramDrafter", "ModelDrafter", "judge", "speculative_generate", "MAX_DRAFT"]
