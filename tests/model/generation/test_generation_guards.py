"""What generate() refuses or stops on (model/generation/generate.py): NaN/Inf logits stop it with one clear error,
whenever they appear; seeds of any size work and stay distinct; a temperature too small to divide by is refused."""

from __future__ import annotations

import pytest

# ---- 5. non-finite logits stop generation with one clear error ----------------------------------------------


@pytest.fixture
def llm(tiny64_ckpt):
    from llama3_triton.model.llama import Llama

    return Llama.load(tiny64_ckpt, backend="torch", device="cpu", max_batch_size=2, max_seq_len=64)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_logits_stop_generation(llm, value, temperature, stream):
    from llama3_triton.model.generation.generate import NonFiniteLogitsError

    llm.output.weight.data[5, 3] = value  # one logit of every position is NaN/Inf
    seen = []
    with pytest.raises(NonFiniteLogitsError, match="the model produced NaN/Inf logits"):
        llm.generate(
            ["Hello", "A longer prompt"],
            max_new_tokens=20,
            temperature=temperature,
            seed=0,
            on_token=(lambda b, t: seen.append(t)) if stream else None,
        )
    assert seen == []  # nothing of it was streamed


def test_non_finite_logits_after_the_first_steps_are_caught_at_a_stop_check(llm, monkeypatch):
    # NaN only from the 3rd decode step on: caught at the next batched stop check (or the end), not ignored.
    from llama3_triton.model.generation import generate as gen

    real, calls = llm.decode, []

    def decode(tokens, positions):
        calls.append(1)
        logits = real(tokens, positions)
        return logits.fill_(float("nan")) if len(calls) >= 3 else logits

    monkeypatch.setattr(llm, "decode", decode)
    for n in (5, gen.SYNC_EVERY + 4):
        calls.clear()
        # The 4th new token came from NaN logits: reported at the end (5 tokens) or the first stop check (16).
        with pytest.raises(gen.NonFiniteLogitsError, match=rf"by new token {5 if n == 5 else gen.SYNC_EVERY}\)"):
            llm.generate("Hello", max_new_tokens=n, temperature=0)


# ---- seeds of any size, temperatures too small to divide by -------------------------------------------------


def test_seeds_of_any_size_are_accepted_and_stay_distinct(llm):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=1.0)
    toks = {s: llm.generate("Once", seed=s, **kw).tokens[0] for s in (5, 5 + 2**32, 2**64, 2**64 + 5, -1)}
    assert len({tuple(t) for t in toks.values()}) == len(toks), toks
    assert llm.generate("Once", seed=2**64, **kw).tokens[0] == toks[2**64]  # still repeatable
    with pytest.raises(ValueError, match="seed must be an integer"):
        llm.generate("Once", seed=1.5, **kw)


@pytest.mark.parametrize("t", [1e-45, 1e-30, 5e-4])
def test_tiny_temperature_is_refused_up_front(llm, t):
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or at least"):
        llm.generate("Once", max_new_tokens=2, temperature=t)
