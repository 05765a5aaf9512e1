"""Many requests at once: continuous batching over a paged KV cache, with prefix caching.

    engine = Engine(llm, max_num_seqs=64, max_num_batched_tokens=512, kv_cache_tokens=65536)
    rid = engine.add_request("Once upon a time", Request(max_tokens=64, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():        # one forward pass of every running request
            print(out.request_id, out.delta, out.finished)

**A step.** The scheduler picks, under a budget of ``max_num_batched_tokens`` new tokens: first each running
request's next tokens (one for a request that is decoding; the next chunk of its prompt for one still in
prefill), oldest first, then waiting requests in arrival order while there are free sequences
(``max_num_seqs``) and pages. Their new tokens are packed into one row and run through the model once
(``Llama.forward_paged``): each writes its keys and values to its own slot of the page pools and attends to its
sequence's pages (a step of decodes alone, up to 16 of them, runs the fused decode step through the block tables:
5 launches a layer on the Triton backend). A request whose new tokens reach the end of what it has (its prompt,
or its last sampled token) samples its next token from its own parameters and its own random stream; a long
prompt is cut into chunks, so it never holds up the running decodes for more than a step's budget. A finished
request leaves at once and its pages go back to the pool.

**Pages.** The pool (``kv_cache_tokens``, in pages of PAGE_SIZE = 16 tokens: the granularity at which prompts
share a prefix, and at most 15 tokens of a sequence's last page unused) is the model's memory for keys and
values; the scheduler hands pages out as sequences grow. When a running request needs a page and none is
free, the newest running request is *preempted*: its pages are released and it goes back to the front of the
queue, to be computed again from its prompt and the tokens it has produced (recompute), which gives the same
output: greedy is deterministic, and a seeded request's random stream is its own and moves on only when it
samples. A request that could never fit (its prompt plus ``max_tokens`` past the context or the pool) is
refused when it is submitted.

**Prefix caching.** Full pages are kept by content (model/engine/pages.py): a request whose prompt starts with
pages already computed (a shared system prompt, the previous turns of a chat) takes them instead of computing
them; ``RequestOutput.cached_tokens`` says how many.

Sampling is per request (temperature, top-p, top-k, min-p, penalties, seed, stop strings, token limit), each
request's random numbers drawn from its own counter-based stream (``SampleRng``) keyed by its seed, so a seeded
request gives the same tokens whatever shares its batch.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from llama3_triton.model.engine.pages import PAGE_SIZE, PagePool, PoolExhausted
from llama3_triton.model.errors import UserError, shown
from llama3_triton.model.generation.generate import TextStream
from llama3_triton.model.generation.sampling import SampleRng, SamplingParams, TokenCounts, sample
from llama3_triton.model.llama import Pages


@dataclass(frozen=True)
class Request:
    """What a request asks for: OpenAI's names where the concept is OpenAI's."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # the same tokens for the same seed, whatever else runs beside it
    stop: tuple[str, ...] = ()  # strings that end the text (not included)
    ignore_eos: bool = False  # go on past the model's end-of-sequence tokens
    logprobs: int | None = None  # the log-probability of each chosen token and of this many most likely ones

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserError(f"max_tokens must be an integer >= 1, got {shown(self.max_tokens)}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop must be a sequence of non-empty strings, got {shown(self.stop)}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 20):
            raise UserError(f"logprobs must be an integer in [0, 20], got {shown(lp)}")
        _ = self.sampling  # validates the sampling parameters

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            self.temperature, self.top_p, self.top_k, self.min_p,
            self.repetition_penalty, self.presence_penalty, self.frequency_penalty,
        )  # fmt: skip


@dataclass
class RequestOutput:
    """What a step produced for one request: the new tokens and text since the last output, and, once it is
    finished, why (``stop``: an end-of-sequence token or a stop string; ``length``: max_tokens or the context;
    ``abort``)."""

    request_id: str
    new_token_ids: list[int]
    delta: str  # new text, whole characters only, never a piece of a stop string
    text: str  # all the text so far
    token_ids: list[int]  # all the tokens so far
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the prefix cache (the first time the request was admitted)
    logprobs: list[dict] | None = None  # per new token: {"token": id, "logprob": x, "top": [(id, logprob), ...]}


@dataclass
class StepRecord:
    """One step that ran the model: its seconds (forward and sampling), its prompt tokens (including a preempted
    request's recomputed ones) and its decode rows. A server's step-time histogram is made of these: a step with
    prompt tokens delays every decode in it, the usual cause of an inter-token latency tail."""

    seconds: float
    prompt_tokens: int
    decodes: int


@dataclass
class _Seq:
    """A request being served: its tokens, pages and progress."""

    id: str
    prompt: list[int]
    req: Request
    arrival: float
    rng: SampleRng | None
    counts: TokenCounts | None
    stream: TextStream
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the pages
    registered: tuple[int, int] = (0, 0)  # prefix cache: (pages entered, content id of the last)
    cached_tokens: int | None = None
    sent_tokens: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    pending_logprobs: list[dict] = field(default_factory=list)
    sent_text: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Engine:
    """Continuous batching over ``llm`` (a loaded ``Llama``): requests in, tokens and text out, step by step."""

    def __init__(
        self,
        llm,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        kv_cache_tokens: int | None = None,
        page_size: int = PAGE_SIZE,
        prefix_caching: bool = True,
    ):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be an integer >= 1, got {shown(v)}")
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = llm.max_seq_len
        tokens = kv_cache_tokens if kv_cache_tokens is not None else default_kv_tokens(llm, max_num_seqs)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < page_size:
            raise UserError(f"kv_cache_tokens must be an integer >= {page_size} (one page), got {shown(tokens)}")
        num_pages = math.ceil(tokens / page_size)
        need, have = num_pages * page_size * kv_bytes_per_token(llm), _free_bytes(llm.device)
        if have is not None and need > have:
            raise UserError(
                f"a KV cache of {tokens:,} tokens needs {need / 1e9:.2f} GB, {llm.device} has {have / 1e9:.2f} GB free"
                " (pass fewer --kv-cache-tokens)"
            )
        llm.setup_pages(num_pages, page_size)
        self.pool = PagePool(num_pages, page_size, prefix_caching)
        self.page_size = page_size
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.seqs: dict[str, _Seq] = {}
        self.stop_ids = set(self.tokenizer.stop_tokens)
        self._ids = itertools.count()
        self.stats = {"preemptions": 0, "prefix_hit_tokens": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self.finished_requests: deque[dict] = deque(maxlen=1000)  # recent requests' timings, for the metrics
        self._ended: list[_Seq] = []  # finished between steps (aborted): their last output comes with the next step
        self.last_step: StepRecord | None = None  # the latest step, if it ran the model

    # ---- requests in ------------------------------------------------------------------------------------------

    def add_request(
        self, prompt: str | list[int], request: Request | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request (a text, encoded with the model's BOS where it uses one, or token ids as given); its id.
        Refused at once, in one line, when it could never fit: its prompt plus max_tokens past the model's
        context or past the whole page pool."""
        request = request or Request()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, bos=True, limit=self.max_model_len)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise UserError(f"a prompt is a str or a list of token ids, got {shown(prompt)}")
        if not ids:
            raise UserError("the prompt is empty: nothing to condition on")
        vocab = self.llm.args.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise UserError(f"the prompt has token ids outside [0, {vocab})")
        total = len(ids) + request.max_tokens
        if total > self.max_model_len:
            raise UserError(
                f"{len(ids):,} prompt tokens + max_tokens {request.max_tokens:,} = {total:,} is longer than the "
                f"context of {self.max_model_len:,} tokens"
            )
        if math.ceil(total / self.page_size) > self.pool.num_pages:
            raise UserError(
                f"{len(ids):,} prompt tokens + max_tokens {request.max_tokens:,} need "
                f"{math.ceil(total / self.page_size):,} pages of the KV cache, which has {self.pool.num_pages:,} "
                "(pass more --kv-cache-tokens)"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise UserError(f"request id {shown(rid)} is in use")
        params = request.sampling
        device = self.llm.device
        seq = _Seq(
            rid, ids, request, time.monotonic(),
            rng=SampleRng(request.seed, device) if params.temperature > 0 else None,
            counts=TokenCounts([ids], vocab, device) if params.penalized else None,
            stream=TextStream(self.tokenizer, request.stop),
        )  # fmt: skip
        self.seqs[rid] = seq
        self.waiting.append(seq)
        self.stats["prompt_tokens"] += len(ids)
        return rid

    def abort(self, request_id: str) -> None:
        """End a request now (a client that left): its pages go back to the pool; its last output says "abort"."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.finish_reason is not None:
            return
        self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        """Requests waiting or running, or aborted ones whose last output the next step gives."""
        return bool(self.waiting or self.running or self._ended)

    # ---- a step -----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once over every scheduled request's new tokens, sample; the outputs of every
        request that produced something or finished (aborted ones included)."""
        plan, self.last_step = self._schedule(), None
        outputs = [self._output(s) for s in self._ended]
        self._ended = []
        if not plan:
            return outputs
        started = time.perf_counter()
        # A decode row: one token, the newest, of a request whose prompt is in the cache; anything else is prompt
        # (or, after a preemption, recomputed) tokens: what makes a step slow for every request in it.
        decodes = sum(n == 1 and s.computed == len(s.tokens) - 1 >= len(s.prompt) for s, n in plan)
        logits = self._forward(plan)  # (len(plan), vocab) fp32
        sampled = []
        for i, (seq, n) in enumerate(plan):
            seq.computed += n
            seq.registered = self.pool.register(seq.pages, seq.tokens[: seq.computed], *seq.registered)
            if seq.computed == len(seq.tokens):  # its newest token ran: its next one can be sampled
                sampled.append((seq, logits[i : i + 1]))
        for seq, token in zip((s for s, _ in sampled), self._sample(sampled), strict=True):
            self._append(seq, token)
            outputs.append(self._output(seq))
        self.last_step = StepRecord(time.perf_counter() - started, sum(n for _, n in plan) - decodes, decodes)
        return outputs

    def generate(
        self, prompts: list[str | list[int]], requests: Request | list[Request] | None = None
    ) -> list[RequestOutput]:
        """Run ``prompts`` to the end (blocking) and return each one's final output, in order (``logprobs``: all of
        its tokens')."""
        requests = requests if isinstance(requests, list) else [requests or Request()] * len(prompts)
        ids = [self.add_request(p, r) for p, r in zip(prompts, requests, strict=True)]
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list] = {i: [] for i in ids}
        while any(i not in final for i in ids):
            for out in self.step():
                logprobs[out.request_id] += out.logprobs or []
                if out.finished:
                    final[out.request_id] = out
        for i in ids:  # the final output with all of its tokens' log-probabilities, not the last step's
            final[i].logprobs = logprobs[i] if final[i].logprobs is not None else None
        return [final[i] for i in ids]

    def metrics(self) -> dict:
        """What a server exposes: queue lengths, pages, prefix-cache hits, preemptions, and the recent finished
        requests' time to first token and time per output token."""
        done = list(self.finished_requests)
        ttft = sorted(r["ttft_s"] for r in done)
        tpot = sorted(r["tpot_s"] for r in done if r["tpot_s"] is not None)
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "pages_total": self.pool.num_pages,
            "pages_used": self.pool.num_used,
            "pages_free": self.pool.num_free,
            **self.stats,
            "finished": len(done),
            "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
            "tpot_p50_s": tpot[len(tpot) // 2] if tpot else None,
        }

    # ---- scheduling -------------------------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[_Seq, int]]:
        """(request, new tokens) for this step: running requests first, oldest first, then waiting ones."""
        budget, plan = self.max_num_batched_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.computed, budget)
            while not self._reserve(seq, seq.computed + n):
                victim = self.running[-1]  # the newest: the least work lost, and it was the last to be admitted
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                plan.append((seq, n))
                budget -= n
                i += 1
                continue
            # seq itself was preempted: the list shifted under i, nothing to advance
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.pages:  # admitted afresh (or again after a preemption): take what the prefix cache holds
                seq.pages, parent = self.pool.lookup(seq.tokens)
                seq.computed = len(seq.pages) * self.page_size
                seq.registered = (len(seq.pages), parent)
                if seq.cached_tokens is None:
                    seq.cached_tokens = min(seq.computed, len(seq.prompt))
                    self.stats["prefix_hit_tokens"] += seq.cached_tokens
            n = min(len(seq.tokens) - seq.computed, budget)
            if not self._reserve(seq, seq.computed + n):
                self._release(seq)  # no room this step: it waits at the front, its pages back in the pool
                break
            self.waiting.popleft()
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        return plan

    def _reserve(self, seq: _Seq, tokens: int) -> bool:
        """Pages for the first ``tokens`` tokens of ``seq``; False when the pool runs out (what it got, it keeps)."""
        try:
            while len(seq.pages) * self.page_size < tokens:
                seq.pages.append(self.pool.allocate())
        except PoolExhausted:
            return False
        return True

    def _release(self, seq: _Seq) -> None:
        self.pool.release(seq.pages)
        seq.pages, seq.computed, seq.registered = [], 0, (0, 0)

    def _preempt(self, seq: _Seq) -> None:
        """Out of pages: ``seq`` gives its pages back and waits at the front, to be computed again from its tokens."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    # ---- the model and the sampler ----------------------------------------------------------------------------

    def _forward(self, plan: list[tuple[_Seq, int]]) -> torch.Tensor:
        dev, P = self.llm.device, self.page_size
        tokens, positions, slots, cu, lens, last = [], [], [], [0], [], []
        for seq, n in plan:
            c = seq.computed
            tokens += seq.tokens[c : c + n]
            positions += range(c, c + n)
            slots += (seq.pages[p // P] * P + p % P for p in range(c, c + n))
            cu.append(cu[-1] + n)
            lens.append(c + n)
            last.append(cu[-1] - 1)
        width = max(math.ceil(n / P) for n in lens)
        tables = [seq.pages[:width] + [0] * (width - min(len(seq.pages), width)) for seq, _ in plan]
        i32 = dict(dtype=torch.int32, device=dev)
        pages = Pages(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu, **i32),
            seq_lens=torch.tensor(lens, **i32),
            block_tables=torch.tensor(tables, **i32),
            decode=all(n == 1 for _, n in plan),
        )
        t = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return self.llm.forward_paged(t, pos, pages, torch.tensor(last, dtype=torch.long, device=dev))

    def _sample(self, rows: list[tuple[_Seq, torch.Tensor]]) -> list[int]:
        """One token for each (request, logits (1, vocab)): greedy rows in one argmax, the others each with its
        own parameters, penalty counts and random stream; one transfer to the host for all."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        greedy = [i for i, (s, _) in enumerate(rows) if s.rng is None and s.counts is None]
        if greedy:
            picks = torch.cat([rows[i][1] for i in greedy]).argmax(-1)
            for j, i in enumerate(greedy):
                out[i] = picks[j : j + 1]
        for i, (seq, logits) in enumerate(rows):
            if out[i] is None:
                out[i] = sample(logits, seq.req.sampling, seq.rng, seq.counts)
            if seq.req.logprobs is not None:
                seq.pending_logprobs.append(self._logprobs(logits[0], out[i], seq.req.logprobs))
        tokens = torch.cat(out).tolist() if out else []
        for (seq, _), tok in zip(rows, tokens, strict=True):
            if seq.counts is not None:
                seq.counts.add(torch.tensor([tok], device=self.llm.device))
        return tokens

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: torch.Tensor, k: int) -> dict:
        """The model's log-probabilities (log-softmax of its logits, before any sampling filter) of the chosen
        token and of the k most likely; tensors until the output is made."""
        lp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(lp, k) if k else None
        return {"token": token, "logprob": lp[token], "top": top}

    # ---- outputs ----------------------------------------------------------------------------------------------

    def _append(self, seq: _Seq, token: int) -> None:
        now = time.monotonic()
        seq.first_token_at = seq.first_token_at or now
        self.stats["generated_tokens"] += 1
        if token in self.stop_ids and not seq.req.ignore_eos:
            seq.output.append(token)
            self._finish(seq, "stop", listed=False)
            return
        seq.output.append(token)
        seq.stream.feed(token)
        if seq.stream.hit is not None:
            self._finish(seq, "stop", listed=False)
        elif len(seq.output) >= seq.req.max_tokens or len(seq.tokens) >= self.max_model_len:
            self._finish(seq, "length", listed=False)

    def _finish(self, seq: _Seq, reason: str, listed: bool = True) -> None:
        seq.finish_reason, seq.finished_at = reason, time.monotonic()
        if seq.stream.hit is None:
            seq.stream.flush()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        if listed:  # finished outside a step's sampling (abort): said at the next step
            self._ended.append(seq)
        n = len(seq.output)
        self.finished_requests.append({
            "ttft_s": (seq.first_token_at or seq.finished_at) - seq.arrival,
            "tpot_s": (seq.finished_at - seq.first_token_at) / (n - 1) if seq.first_token_at and n > 1 else None,
            "output_tokens": n,
            "finish_reason": reason,
        })  # fmt: skip

    def _output(self, seq: _Seq) -> RequestOutput:
        new = seq.output[seq.sent_tokens :]
        seq.sent_tokens = len(seq.output)
        text = seq.stream.text
        delta, seq.sent_text = text[seq.sent_text :], len(text)
        logprobs = None
        if seq.req.logprobs is not None:
            logprobs = [
                {
                    "token": int(p["token"]),
                    "logprob": float(p["logprob"]),
                    "top": list(zip(p["top"].indices.tolist(), p["top"].values.tolist(), strict=True))
                    if p["top"]
                    else [],
                }
                for p in seq.pending_logprobs
            ]
            seq.pending_logprobs = []
        finished = seq.finish_reason is not None
        if finished:
            self.seqs.pop(seq.id, None)
        return RequestOutput(
            seq.id, new, delta, text, list(seq.output), finished, seq.finish_reason, len(seq.prompt),
            seq.cached_tokens or 0, logprobs,
        )  # fmt: skip


def kv_bytes_per_token(llm) -> int:
    """Bytes of keys and values one token holds in every layer (this rank's heads)."""
    a = llm.args
    return (
        2 * a.n_layers * (a.n_kv_heads // llm.tp.world) * a.head_dim * torch.empty((), dtype=llm.dtype).element_size()
    )


def default_kv_tokens(llm, max_num_seqs: int) -> int:
    """Without ``kv_cache_tokens``: on CUDA 90% of the free memory; on a CPU room for ``max_num_seqs`` full
    contexts, at most a quarter of the free memory."""
    free = _free_bytes(llm.device) or 0
    per_token = kv_bytes_per_token(llm)
    if llm.device.type == "cuda":
        return max(int(0.9 * free) // per_token, PAGE_SIZE)
    want = max_num_seqs * llm.max_seq_len
    return max(min(want, free // 4 // per_token), PAGE_SIZE)


def _free_bytes(device: torch.device) -> int | None:
    from llama3_triton.model.loading import free_bytes

    return free_bytes(device)


__all__ = ["Engine", "Request", "RequestOutput", "kv_bytes_per_token", "default_kv_tokens"]
