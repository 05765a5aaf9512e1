"""Next-token sampling: penalties, temperature, top-k, top-p (nucleus), min-p, and the draw.

One algorithm for the CPU and the GPU, made of fixed-shape tensor ops with no data-dependent branch and
no host sync, so a later CUDA graph can hold it. No full sort of the vocabulary either: a sort of
Llama-3's 128,256 probabilities took 100-300 ms a token on a busy 2-core CPU (about 9 ms on an idle core).

**The filters, in Hugging Face's order** (temperature, top-k, top-p, min-p): with p = softmax(logits / T),
- top-k keeps the k most probable tokens;
- top-p keeps, of what top-k left, the smallest set whose mass reaches ``top_p`` of the kept mass: token i
  stays when the mass ranked above it is below top_p * mass (the top token always stays);
- min-p keeps a token when p_i >= min_p * max(p).
"Ranked" is the order of a stable descending sort: ties by probability are ranked by token id, so the kept
set is a function of the logits alone (``reference_probs`` does exactly that with a full sort).

**Selection without a sort.** With top-k on, ``torch.topk`` gives the k largest probabilities in order,
and top-p needs only a cumulative sum over those k. Without it, top-p asks for a threshold tau, a value of
p, such that the mass of the tokens strictly above tau is below the target top_p * mass and adding the
tokens equal to tau reaches it. Non-negative fp32 values sort like their int32 bit patterns, so tau is
found by a radix select on the bits, most significant first: three passes (11 + 10 + 10 of the 31 value
bits), each a histogram of the masses of the tokens still in the chosen bucket (``scatter_add_`` into 2048
or 1024 bins), a suffix sum over the bins and a count to pick the next digit. Every pass reads the
vocabulary once: the three cost about 0.5 ms per row on one CPU core, against ~3 ms for a 30-step
bisection on the threshold. Whole ``sample`` calls with ``SampleRng``
(``python -m llama3_triton.benchmarks.sampling``, one
thread of a 2-core CPU also running the test suite): top-p 0.9 3.4 ms, top-k 50 + top-p 1.1 ms, against 13-14
ms for softmax + full sort + ``torch.multinomial``. Tokens above tau stay; tokens equal to tau stay in
token-id order while the mass ranked before them is below the target, which is what the sorted reference does
with ties (top-k likewise keeps the first tied tokens by id). Masses are summed in fp64: with thousands of
tokens kept (top_p 0.999), fp32 sums in two different orders disagree by more than the boundary token's mass.

**The draw** is an inverse-CDF lookup: a cumulative sum of the kept probabilities (fp64) and a ``searchsorted`` of
one uniform number per row (no ``torch.multinomial``, whose CPU cost at this size was ~2 ms, and no
exponential race, whose 128k random numbers cost as much).

**The random numbers** come from ``SampleRng``, a counter-based generator written in integer tensor ops: draw
n of row b is a hash of (seed, n, b) (PCG's output permutation, twice per number for 53 random bits), and
the draw counter is a device tensor that each draw increments in place. So the numbers are the same on the
CPU and on the GPU for the same seed, and a CUDA graph can hold the draw: replaying it moves the counter on,
with no host involvement (a ``torch.Generator`` is also accepted, for eager use).

Kept sets agree with the sorted reference except where the mass above a token equals the target to within
fp64 rounding.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch

from llama3_triton.model.errors import UserError, shown

# (shift, width) of the three radix digits over the 31 value bits of a non-negative fp32 number.
_DIGITS = ((20, 11), (10, 10), (0, 10))


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 = greedy
    top_p: float = 0.9  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 = off
    repetition_penalty: float = 1.0  # CTRL / Hugging Face: logits of tokens already seen (prompt too) / r; 1 = off
    presence_penalty: float = 0.0  # OpenAI: subtract from the logits of tokens already generated; 0 = off
    frequency_penalty: float = 0.0  # OpenAI: subtract this times the count of each generated token; 0 = off

    def __post_init__(self):
        errors = validate(
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
        )
        if errors:
            raise UserError(errors[0])

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


MIN_TEMPERATURE = 1e-3  # the smallest temperature that is not greedy: below it, the scaled logits overflow


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def validate(temperature, top_p, top_k, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """The messages for every bad sampling argument (an empty list when all are good). Used by
    ``SamplingParams`` and by the command line, which checks its arguments before it reads any weight."""
    errors = []
    if not _number(temperature) or temperature < 0:
        errors.append(f"temperature must be a finite number >= 0, got {shown(temperature)}")
    elif 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-45 overflow to inf: greedy in all but name, or NaN
        errors.append(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {shown(temperature)}")
    if not _number(top_p) or not 0 < top_p <= 1:
        errors.append(f"top_p must be in (0, 1], got {shown(top_p)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        errors.append(f"top_k must be an integer >= 0, got {shown(top_k)}")
    if not _number(min_p) or not 0 <= min_p <= 1:
        errors.append(f"min_p must be in [0, 1], got {shown(min_p)}")
    if not _number(repetition_penalty) or repetition_penalty <= 0:
        errors.append(f"repetition_penalty must be a finite number > 0 (1 = off), got {shown(repetition_penalty)}")
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _number(v) or not -2 <= v <= 2:
            errors.append(f"{name} must be in [-2, 2] (0 = off), got {shown(v)}")
    return errors


class TokenCounts:
    """What the penalties look at, kept on the device: which tokens each prompt holds (B, V) and how often
    each token has been generated so far (B, V). ``add`` is a scatter, so the loop stays free of host syncs."""

    def __init__(self, prompts: list[list[int]], vocab_size: int, device: torch.device):
        B = len(prompts)
        self.in_prompt = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        for b, ids in enumerate(prompts):
            self.in_prompt[b, torch.tensor(ids, dtype=torch.long, device=device)] = True
        self.generated = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)

    def add(self, tokens: torch.Tensor) -> None:
        """Count one new token per row: tokens (B,) int64."""
        self.generated.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.float32))


def apply_penalties(logits: torch.Tensor, params: SamplingParams, counts: TokenCounts | None) -> torch.Tensor:
    """Penalized copy of logits (B, V) fp32; the logits themselves when no penalty is on."""
    if counts is None or not params.penalized:
        return logits
    out = logits
    if params.repetition_penalty != 1:
        r = params.repetition_penalty
        seen = counts.in_prompt | (counts.generated > 0)
        out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
    if params.presence_penalty != 0:
        out = out - params.presence_penalty * (counts.generated > 0)
    if params.frequency_penalty != 0:
        out = out - params.frequency_penalty * counts.generated
    return out


def _select(bits: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radix select per row: the int32 bit pattern tau (B, 1) of a value such that the weight of the entries
    whose bits are above tau is below ``target`` (B, 1) and reaches it with those equal to tau; and that
    weight above tau (B, 1). bits (B, V) int32 >= 0; weight (B, V) >= 0, fp64 for top-p."""
    B = bits.shape[0]
    prefix = torch.zeros(B, 1, dtype=torch.int32, device=bits.device)
    above = torch.zeros(B, 1, dtype=weight.dtype, device=bits.device)
    for shift, width in _DIGITS:
        n = 1 << width
        digit = ((bits >> shift) & (n - 1)).long()
        w = weight
        if shift + width < 31:  # only tokens in the bucket chosen so far count: the others add 0
            # (to their own digit's bin: sending them all to one spare bin made every add wait for the one
            # before it, 6x slower on a CPU)
            w = torch.where((bits >> (shift + width)) == prefix, weight, 0.0)
        bins = torch.zeros(B, n, dtype=weight.dtype, device=bits.device).scatter_add_(1, digit, w)
        incl = bins.flip(-1).cumsum(-1).flip(-1) + above  # incl[d]: weight of the tokens at digit >= d, and above
        # incl falls as d grows: the digit is the last d whose incl still reaches the target.
        d = ((incl >= target).sum(-1, keepdim=True) - 1).clamp_(min=0)
        above = incl.gather(1, d) - bins.gather(1, d)
        prefix = (prefix << width) | d.to(torch.int32)
    return prefix, above


def _keep_ranked(bits, tau, above, target, tie_weight) -> torch.Tensor:
    """Tokens above tau, and the tokens equal to tau in token-id order while the weight ranked before each
    (``above`` + its rank among the ties x ``tie_weight``) is below the target: (B, V) bool."""
    ties = bits == tau
    rank = ties.cumsum(-1, dtype=torch.int32) - 1
    return (bits > tau) | (ties & (above + rank * tie_weight < target))


def filter_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The unnormalised probabilities (B, V) fp32 that the draw picks from (0 for every filtered token), from
    penalised logits (B, V); temperature must be > 0."""
    p = torch.softmax(logits.float() / params.temperature, dim=-1)
    V = p.shape[-1]
    if 0 < params.top_k < V:
        # torch.topk gives the k largest values, sorted: the k-th is the threshold, and top-p then needs no radix
        # select, only a cumulative sum over those k values (the reference's own computation).
        vals = torch.topk(p, params.top_k, dim=-1).values  # (B, k) descending
        kth = vals[:, -1:]
        above = (p > kth).sum(-1, keepdim=True, dtype=torch.float32)
        p = torch.where(_keep_ranked(p.view(torch.int32), kth.view(torch.int32), above, params.top_k, 1.0), p, 0.0)
        if params.top_p < 1:
            v = vals.double()
            target = params.top_p * v.sum(-1, keepdim=True)
            n_kept = ((v.cumsum(-1) - v) < target).sum(-1, keepdim=True)  # >= 1: the top token's "before" is 0
            tau = vals.gather(1, n_kept - 1)
            above = torch.where(v > tau.double(), v, 0.0).sum(-1, keepdim=True)
            keep = _keep_ranked(p.view(torch.int32), tau.view(torch.int32), above, target, tau.double())
            p = torch.where(keep, p, 0.0)
    elif params.top_p < 1:
        bits = p.view(torch.int32)
        w = p.double()  # masses in fp64 (see the module docstring)
        target = params.top_p * w.sum(-1, keepdim=True)
        tau, above = _select(bits, w, target)
        p = torch.where(_keep_ranked(bits, tau, above, target, tau.view(torch.float32).double()), p, 0.0)
    if params.min_p > 0:
        p = torch.where(p >= params.min_p * p.amax(-1, keepdim=True), p, 0.0)
    return p


_M32 = 0xFFFFFFFF


def _pcg(x: torch.Tensor) -> torch.Tensor:
    """PCG's RXS-M-XS output permutation of one LCG step ("pcg_hash", Jarzynski and Olano, JCGT 2020) on
    int64 tensors holding 32-bit values: every product stays below 2^62, so nothing overflows."""
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return (word >> 22) ^ word


def seed64(seed: int) -> int:
    """A user's seed (any Python int) as 64 bits: [0, 2^64) as given (both halves are used, so seeds 2^32 apart
    differ), anything else hashed, so that 2^64, 2^64 + 5 and -1 are distinct seeds too."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {shown(seed)}")
    if 0 <= seed < 2**64:
        return seed
    digest = hashlib.sha256(f"llama3-triton seed {seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class SampleRng:
    """Uniform numbers for the draw, from (seed, draw counter, row) alone: identical on every device, and
    capturable in a CUDA graph (the counter is a device tensor, incremented in place by each draw)."""

    def __init__(self, seed: int | None = None, device: torch.device | str = "cpu"):
        seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed64(seed)
        k = _pcg(torch.tensor([seed & _M32, seed >> 32], dtype=torch.int64))
        k[1] = _pcg(k[1] ^ k[0])
        self.key = k.to(device)  # two 32-bit keys, each depending on the whole seed
        self.counter = torch.zeros((), dtype=torch.int64, device=device)  # draws made so far
        self.device = torch.device(device)

    def uniform(self, rows: int) -> torch.Tensor:
        """(rows, 1) fp64 in [0, 1) (53 bits, from two 32-bit hashes); moves the counter on by one.

        Every input goes through a hash before it is combined with another, and the combinations are additions
        of hashed keys: XOR-ing the raw counter with a small seed only permuted the counters among themselves,
        so seeds 0..3 made the same tokens and a chi-square test rejected the draws (p = 3e-4)."""
        s, t = self.key[0], self.key[1]
        row = torch.arange(rows, dtype=torch.int64, device=self.device)
        n = _pcg(_pcg((self.counter + s) & _M32) ^ t)  # this draw's stream
        h1 = _pcg(_pcg((n + row) & _M32) ^ s)
        h2 = _pcg((h1 + t) & _M32)
        self.counter += 1
        return (((h1 << 21) | (h2 >> 11)).double() * 2.0**-53)[:, None]


def draw(probs: torch.Tensor, generator: SampleRng | torch.Generator | None) -> torch.Tensor:
    """One token per row from unnormalised probabilities (B, V) >= 0: inverse CDF, (B,) int64."""
    cdf = probs.double().cumsum(-1)
    if isinstance(generator, SampleRng):
        u = generator.uniform(probs.shape[0])
    else:
        u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: SampleRng | torch.Generator | None,
    counts: TokenCounts | None = None,
) -> torch.Tensor:
    """Next token per row of logits (B, V) fp32 -> (B,) int64, on the logits' device, without a host sync."""
    logits = apply_penalties(logits, params, counts)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return draw(filter_probs(logits, params), generator)


def reference_probs(logits: torch.Tensor, params: SamplingParams, counts: TokenCounts | None = None) -> torch.Tensor:
    """The exact next-token distribution (B, V) that ``sample`` draws from, computed the plain way with a full
    stable sort (slow: for tests and the benchmark)."""
    logits = apply_penalties(logits, params, counts).float()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    p = torch.softmax(logits / params.temperature, dim=-1)
    sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
    if 0 < params.top_k < p.shape[-1]:
        sp[:, params.top_k :] = 0
    if params.top_p < 1:
        spd = sp.double()  # exact enough: fp64 sums of fp32 values
        before = spd.cumsum(-1) - spd  # the mass ranked above each token
        sp = sp.masked_fill(before >= params.top_p * spd.sum(-1, keepdim=True), 0.0)
    if params.min_p > 0:
        sp = sp.masked_fill(sp < params.min_p * sp[:, :1], 0.0)
    sp = sp / sp.sum(-1, keepdim=True)
    return torch.zeros_like(p).scatter_(-1, order, sp)
