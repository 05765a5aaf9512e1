"""Sampling draws exactly the distribution of the plain sorted reference, over the Llama-3 vocabulary.

Two kinds of check: the kept set and renormalised probabilities of ``filter_probs`` against
``reference_probs`` (a full stable sort) token by token, and a chi-square goodness-of-fit test of the
draws of ``sample`` against the reference distribution, which is also shown to reject wrong samplers.
"""

from __future__ import annotations

import pytest
import torch

from llama3_triton.model.generation.sampling import (
    SampleRng,
    SamplingParams,
    TokenCounts,
    draw,
    filter_probs,
    reference_probs,
    sample,
)

V = 128256  # Llama-3's vocabulary
ALPHA = 1e-3  # the chi-square test's significance level


def _logits(seed: int, rows: int = 2, vocab: int = V, ties: bool = False) -> torch.Tensor:
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    # bf16 logits (what a bf16 model's output holds) repeat values: many exact ties in the probabilities.
    return x.bfloat16().float() if ties else x


PARAMS = [
    SamplingParams(0.6, 0.9),
    SamplingParams(1.0, 0.5, 50),
    SamplingParams(1.5, 0.95, 0, 0.05),
    SamplingParams(1.0, 1.0, 1000),
    SamplingParams(0.6, 0.999),  # thousands of tokens kept: the sums must be exact enough
    SamplingParams(2.0, 0.8, 3000, 0.01),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_kept_set_equals_the_sorted_reference(params, ties):
    for seed in range(4):
        logits = _logits(seed, ties=ties)
        ref = reference_probs(logits, params)
        got = filter_probs(logits, params)
        assert torch.equal(got > 0, ref > 0), (seed, (got > 0).sum(-1), (ref > 0).sum(-1))
        torch.testing.assert_close(got / got.sum(-1, keepdim=True), ref, rtol=1e-5, atol=1e-7)


def test_ties_are_ranked_by_token_id():
    p = torch.tensor([[0.1, 0.2, 0.2, 0.2, 0.3]])
    logits = p.log()
    # top-k 2: 0.3 (id 4), then the first of the 0.2s by id (id 1)
    assert (filter_probs(logits, SamplingParams(1.0, 1.0, 2))[0] > 0).tolist() == [False, True, False, False, True]
    # top-p 0.6: mass ranked above ids 4, 1, 2, 3 is 0, 0.3, 0.5, 0.7 -> keep 4, 1, 2
    kept = filter_probs(logits, SamplingParams(1.0, 0.6))[0] > 0
    assert kept.tolist() == (reference_probs(logits, SamplingParams(1.0, 0.6))[0] > 0).tolist()
    assert kept.tolist() == [False, True, True, False, True]


def test_filters_edge_cases():
    logits = _logits(7, rows=3, vocab=1000)
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(1.0, 1e-9), g), greedy)  # tiny top-p keeps the top token
    assert torch.equal(sample(logits, SamplingParams(1.0, 1.0, 1), g), greedy)
    assert torch.equal(sample(logits, SamplingParams(1.0, 1.0, 0, 1.0), g), greedy)  # min-p 1
    assert (filter_probs(logits, SamplingParams(1.0, 1.0)) > 0).all()  # nothing filtered
    masked = logits.clone()
    masked[:, 500:] = float("-inf")  # zero-probability tokens are never drawn
    for _ in range(20):
        assert (sample(masked, SamplingParams(5.0, 1.0), g) < 500).all()


def test_seeded_sampling_repeats():
    logits = _logits(3, rows=4)
    params = SamplingParams(1.0, 0.95)
    a = [sample(logits, params, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    g = torch.Generator().manual_seed(5)
    assert torch.stack([sample(logits, params, g) for _ in range(8)]).unique(dim=0).shape[0] > 1  # the stream moves on


def test_penalties():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    counts = TokenCounts([[2]], 4, torch.device("cpu"))  # the prompt holds token 2
    counts.add(torch.tensor([0]))
    counts.add(torch.tensor([0]))
    ref = reference_probs(logits, SamplingParams(1.0, 1.0, repetition_penalty=2.0), counts)
    want = torch.softmax(torch.tensor([[1.0, 1.0, -2.0, 0.5]]), -1)  # seen: 0 (positive: /2) and 2 (negative: x2)
    torch.testing.assert_close(ref, want)
    ref = reference_probs(logits, SamplingParams(1.0, 1.0, presence_penalty=0.5, frequency_penalty=0.25), counts)
    torch.testing.assert_close(ref, torch.softmax(torch.tensor([[2.0 - 0.5 - 0.5, 1.0, -1.0, 0.5]]), -1))
    # greedy honours the penalties too
    assert sample(logits, SamplingParams(0.0, 1.0, repetition_penalty=3.0), None, counts).item() == 1


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit of ``counts`` to ``probs``. Cells expected fewer than
    ``min_expected`` times are pooled into one. A draw outside the support gives p = 0."""
    n = counts.sum().double()
    probs = probs.double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = n * probs
    big = expected >= min_expected
    obs = torch.cat([counts[big].double(), counts[~big & (probs > 0)].sum().double()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))  # chi2 survival


def _draw_counts(sampler, logits_row: torch.Tensor, n: int, rows: int, seed: int) -> torch.Tensor:
    g = SampleRng(seed)  # the generator generate() uses (and a CUDA graph can hold)
    batch = logits_row.expand(rows, -1).contiguous()
    counts = torch.zeros(logits_row.shape[-1], dtype=torch.long)
    for _ in range(n // rows):
        counts += torch.bincount(sampler(batch, g), minlength=logits_row.shape[-1])
    return counts


def _off_by_one(params):
    """A classic bug: top-p keeps tokens while the mass *including* them is below top_p (drops the boundary token)."""

    def sampler(logits, g):
        p = filter_probs(logits, params)
        sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
        sp = sp.masked_fill(sp.cumsum(-1) >= params.top_p * sp.sum(-1, keepdim=True), 0.0)
        sp[:, 0] = p.amax(-1)
        return draw(torch.zeros_like(p).scatter_(-1, order, sp), g)

    return sampler


def _top_p_before_top_k(params):
    """Another: top-p measured against the whole distribution instead of what top-k left."""

    def sampler(logits, g):
        p = filter_probs(logits, SamplingParams(params.temperature, params.top_p))
        k = filter_probs(logits, SamplingParams(params.temperature, 1.0, params.top_k))
        return draw(torch.where(k > 0, p, 0.0), g)

    return sampler


@pytest.fixture
def one_thread():
    # Thousands of small calls: on a busy machine, a second OpenMP thread waiting for a core slows them ~10x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize(
    "params, wrong",
    [
        (SamplingParams(0.8, 0.7, 0), _off_by_one),
        (SamplingParams(1.0, 0.6, 40, 0.02), _top_p_before_top_k),
    ],
    ids=["top-p", "top-k+top-p+min-p"],
)
def test_draws_follow_the_reference_distribution(params, wrong, one_thread):
    # Llama-3's vocabulary with ties, shaped so the nucleus holds a few dozen tokens.
    logits = _logits(11, rows=1)[0]
    logits[:60] = 16 + 0.5 * torch.randn(60, generator=torch.Generator().manual_seed(12))
    logits = logits.bfloat16().float()
    logits[20:24] = logits[19]  # ties inside the nucleus
    ref = reference_probs(logits[None], params)[0]
    kept = int((ref > 0).sum())
    assert 10 < kept < 60, kept
    n = 2_000  # the least likely kept token is expected >= 38 times
    counts = _draw_counts(lambda x, g: sample(x, params, g), logits[None], n, rows=20, seed=1)
    p_value = chi_square_p_value(counts, ref)
    assert p_value > ALPHA, f"chi-square rejects the sampler: p = {p_value:.2e}"
    print(f"chi-square p-value of the sampler: {p_value:.3f}")
    # The same test, the same draws, catches a sampler that is wrong by one token's mass or by one filter's order.
    bad = _draw_counts(wrong(params), logits[None], n, rows=20, seed=1)
    assert chi_square_p_value(bad, ref) < ALPHA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("params", PARAMS + [SamplingParams(0.7, 0.9, 0, 0.0, 1.2, 0.5, 0.5)], ids=str)
def test_no_host_sync_on_cuda(params):
    # A later CUDA graph holds the sampler: not one device-to-host synchronisation may happen inside it.
    logits = _logits(0, rows=3).cuda()
    counts = TokenCounts([[1, 2, 3], [4], [5, 6]], V, logits.device)
    g = torch.Generator(device="cuda").manual_seed(0)
    sample(logits, params, g, counts)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token = sample(logits, params, g, counts)
        counts.add(token)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert token.shape == (3,)


def test_sample_rng_is_repeatable_and_moves_on():
    """Draw n of row b depends on (seed, n, b) alone: the same seed repeats the stream, each draw moves it on,
    rows differ, and the numbers fill [0, 1) evenly (chi-square over 64 bins, 64k numbers)."""
    a, b = SampleRng(123), SampleRng(123)
    first = a.uniform(4)
    assert torch.equal(first, b.uniform(4)) and int(a.counter) == 1
    assert not torch.equal(a.uniform(4), first)  # the stream moves on
    assert first.unique().numel() == 4  # rows draw different numbers
    assert not torch.equal(SampleRng(124).uniform(4), first)
    assert not torch.equal(SampleRng(123 + 2**32).uniform(4), first)  # both halves of a 64-bit seed count
    u = torch.cat([a.uniform(64) for _ in range(1024)]).flatten()
    assert (u >= 0).all() and (u < 1).all()
    counts = torch.bincount((u * 64).long(), minlength=64)
    assert chi_square_p_value(counts, torch.full((64,), 1 / 64)) > ALPHA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_rng_gives_the_same_tokens_on_cpu_and_gpu():
    """One algorithm for both devices: the same seed draws the same numbers, and so the same tokens."""
    cpu, gpu = SampleRng(9), SampleRng(9, "cuda")
    assert torch.equal(cpu.uniform(8), gpu.uniform(8).cpu())
    logits = _logits(3, rows=4)
    params = SamplingParams(0.8, 0.9)
    assert torch.equal(sample(logits, params, SampleRng(5)), sample(logits.cuda(), params, SampleRng(5, "cuda")).cpu())
