"""Speculative decoding: greedy output with each drafter equals plain greedy token for token (tiny model on both
backends, SmolLM2); the accept/resample rule draws exactly the target's distribution under every sampling filter
(a chi-square test over many draws on a small vocabulary); rejected positions leave the cache as plain decoding
would; a draft model that is the target itself is always accepted (its own rollback is right); a draft with another
vocabulary is refused in one line."""

from __future__ import annotations

import pytest
import torch

from llama3_triton.model.errors import UserError
from llama3_triton.model.generation.sampling import SamplingParams, TokenCounts
from llama3_triton.model.generation.speculative import ModelDrafter, NgramDrafter, judge, speculative_generate
from llama3_triton.model.llama import Llama
from tests.smol import SMOL, needs_smol

REPEAT = "one two three four five six seven eight nine ten. one two three four five six seven eight nine ten. one two"
GREEDY = SamplingParams(0.0, 1.0, 0)


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt, tiny_ckpt_b):
    return tiny_ckpt, tiny_ckpt_b


def _load(ckpt, backend="torch"):
    return Llama.load(ckpt, backend=backend, device="cpu", dtype=torch.float32, max_seq_len=256)


@pytest.fixture(scope="module")
def target(ckpts):
    return _load(ckpts[0])


def _plain(llm, prompt, n, **kw):
    return llm.generate(prompt, max_new_tokens=n, temperature=0, **kw)


def test_prompt_lookup_proposes_what_followed_the_last_words():
    d = NgramDrafter()
    assert d.propose([7, 1, 2, 3, 9, 1, 2], 3, GREEDY, None) == ([3, 9, 1], None)  # "1 2" was followed by "3 9 1"
    d.reset()
    assert d.propose([1, 2, 3, 1, 2, 3, 1, 2], 4, GREEDY, None) == ([3, 1, 2, 3], None)  # a repeat runs on
    d.reset()
    assert d.propose([5, 5, 5, 5], 4, GREEDY, None) == ([5, 5, 5, 5], None)
    d.reset()
    assert d.propose([4, 8, 15, 16], 4, GREEDY, None) == ([], None)  # nothing seen before: no guess
    d.reset()
    seq = [1, 2, 3, 4, 9, 2, 3, 4, 7, 3, 4]  # "3 4" last followed by 7, "2 3 4" by 9: the longest match wins
    assert d.propose(seq, 1, GREEDY, None) == ([7], None)
    d.reset()
    assert d.propose([*seq[:-1], 2, 3, 4], 1, GREEDY, None) == ([7], None)  # "2 3 4" last seen before 7


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_prompt_lookup_equals_plain_greedy(target, k):
    want = _plain(target, REPEAT, 40, stop_tokens=[])
    got = speculative_generate(target, REPEAT, NgramDrafter(), max_new_tokens=40, draft_tokens=k, stop_tokens=[])
    assert got.tokens == want.tokens and got.texts == want.texts and got.stop_reasons == want.stop_reasons
    assert got.extra["speculative"]["target_steps"] <= 40  # (a random model rarely repeats itself: SmolLM2 below)


def test_greedy_with_a_draft_model_equals_plain_greedy_and_rolls_back(ckpts, target):
    """Another random model drafts (most drafts rejected: rollback on every step); the target itself drafts (every
    draft accepted, which holds only if the draft's own cache is rolled back and fed right)."""
    want = _plain(target, REPEAT, 30, stop_tokens=[])
    other = speculative_generate(target, REPEAT, ModelDrafter(_load(ckpts[1]), target), max_new_tokens=30,
                                 draft_tokens=3, stop_tokens=[], adaptive=False)  # fmt: skip
    assert other.tokens == want.tokens
    s = other.extra["speculative"]
    assert s["proposed"] > s["accepted"]  # rejections happened
    itself = speculative_generate(target, REPEAT, ModelDrafter(_load(ckpts[0]), target), max_new_tokens=30,
                                  draft_tokens=4, stop_tokens=[])  # fmt: skip
    assert itself.tokens == want.tokens
    assert itself.extra["speculative"]["acceptance_rate"] == 1.0
    assert itself.extra["speculative"]["tokens_per_step"] > 4


def test_rejected_positions_leave_the_cache_as_plain_decoding_would(ckpts, target):
    """After a run with rejections, the next token's logits from the cache equal those of a fresh prefill of the
    whole sequence: the rejected keys and values were never read."""
    out = speculative_generate(target, REPEAT, ModelDrafter(_load(ckpts[1]), target), max_new_tokens=20,
                               draft_tokens=4, stop_tokens=[], adaptive=False)  # fmt: skip
    assert out.extra["speculative"]["proposed"] > out.extra["speculative"]["accepted"]
    seq = target.tokenizer.encode(REPEAT, bos=True) + out.tokens[0]
    with torch.no_grad():
        from_cache = target.prefill(torch.tensor([[seq[-1]]]), len(seq) - 1)[0, -1]
        fresh = target.prefill(torch.tensor([seq]), 0)[0, -1]
    torch.testing.assert_close(from_cache, fresh, atol=1e-4, rtol=1e-4)


def test_stop_strings_and_stop_tokens_end_as_in_plain_decoding(target):
    want = _plain(target, REPEAT, 40, stop_tokens=[])
    stop = want.texts[0][10:13]
    plain = _plain(target, REPEAT, 40, stop=[stop], stop_tokens=[])
    got = speculative_generate(target, REPEAT, NgramDrafter(), max_new_tokens=40, stop=[stop], stop_tokens=[])
    assert (got.texts, got.tokens, got.stop_reasons) == (plain.texts, plain.tokens, ["stop_string"])
    eos = want.tokens[0][7]  # call the 8th token a stop token: the output ends before it
    plain = _plain(target, REPEAT, 40, stop_tokens=[eos])
    got = speculative_generate(target, REPEAT, NgramDrafter(), max_new_tokens=40, stop_tokens=[eos])
    assert (got.tokens, got.stop_reasons) == (plain.tokens, ["stop_token"])


def test_greedy_speculation_in_the_triton_kernels_equals_plain(ckpts):
    """The verify pass through the Triton kernels (interpreter): a draft model on the torch backend proposes, the
    target's prefill kernels at a start position check; tokens equal plain decoding's through the decode kernels."""
    llm = _load(ckpts[0], backend="triton")
    want = _plain(llm, REPEAT, 8, stop_tokens=[])
    got = speculative_generate(llm, REPEAT, ModelDrafter(_load(ckpts[1]), llm), max_new_tokens=8, draft_tokens=3,
                               stop_tokens=[], adaptive=False)  # fmt: skip
    assert got.tokens == want.tokens and got.extra["speculative"]["proposed"] > 0


@needs_smol
def test_smollm2_greedy_with_prompt_lookup_and_a_bf16_draft_equals_plain():
    llm = Llama.load(SMOL, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=512)
    prompt = ("Repeat the text exactly.\n\nText: Triton is a language and compiler for writing highly efficient "
              "custom deep-learning primitives.\n\nRepeated text:")  # fmt: skip
    want = _plain(llm, prompt, 24)
    got = speculative_generate(llm, prompt, NgramDrafter(), max_new_tokens=24)
    s = got.extra["speculative"]
    assert got.tokens == want.tokens and s["accepted"] > 5 and s["target_steps"] < 24
    draft = Llama.load(SMOL, backend="torch", device="cpu", dtype=torch.bfloat16, max_seq_len=512)  # other numerics
    got = speculative_generate(llm, prompt, ModelDrafter(draft, llm), max_new_tokens=24)
    assert got.tokens == want.tokens and got.extra["speculative"]["acceptance_rate"] > 0.5


@needs_smol
def test_a_draft_with_another_vocabulary_is_refused_in_one_line(target):
    smol = Llama.load(SMOL, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=64)
    with pytest.raises(UserError, match="vocabulary") as e:
        ModelDrafter(smol, target)
    assert "\n" not in str(e.value)


# ---- the sampled rule: the target's distribution, exactly ------------------------------------------------------------

V = 8
FILTERS = {
    "temperature": SamplingParams(0.7, 1.0, 0),
    "top_k": SamplingParams(1.0, 1.0, 3),
    "top_p": SamplingParams(1.0, 0.8, 0),
    "min_p": SamplingParams(1.3, 1.0, 0, 0.15),
    "penalties": SamplingParams(1.0, 1.0, 0, 0.0, 1.4, 0.5, 0.3),
    "all": SamplingParams(0.9, 0.9, 5, 0.05, 1.2, 0.2, 0.1),
}


def _target_probs(logits, params, counts):
    from llama3_triton.model.generation.sampling import reference_probs

    return reference_probs(logits[None], params, counts)[0].double()


@pytest.mark.parametrize("drafter", ["point mass", "model"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_accept_or_resample_draws_the_targets_distribution(name, drafter):
    """6,000 draws of (draft, judge) on a fixed 8-token distribution: the emitted tokens' counts pass a chi-square
    test against the target's filtered distribution (the sorted reference) at p = 0.001 (seeded: no flake), and a
    filtered-out token never appears, whatever the drafter proposed."""
    params = FILTERS[name]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 2
    counts = TokenCounts([[1, 2]], V, torch.device("cpu")) if params.penalized else None
    if counts is not None:
        counts.add(torch.tensor([2]))
        counts.add(torch.tensor([5]))
    p = _target_probs(logits, params, counts)
    q = torch.softmax(torch.randn(V, generator=g), -1).double()  # a draft model's distribution, unlike p
    gen = torch.Generator().manual_seed(1)
    n = 6_000
    hist = torch.zeros(V, dtype=torch.float64)
    for _ in range(n):
        if drafter == "point mass":  # prompt lookup proposes one token, whatever its probability
            d = int(torch.randint(0, V, (), generator=gen))
            instead = judge(logits, d, None, params, counts, gen)
        else:
            d = int(torch.multinomial(q, 1, generator=gen))
            instead = judge(logits, d, q, params, counts, gen)
        hist[d if instead is None else instead] += 1
    assert hist[p == 0].sum() == 0
    kept = p > 0
    expected = p[kept] * n
    chi2 = float(((hist[kept] - expected) ** 2 / expected).sum())
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}[int(kept.sum()) - 1]
    assert chi2 < critical, (name, drafter, chi2, hist / n, p)
