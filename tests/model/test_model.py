"""End to end on the torch backend: our model against Hugging Face transformers' LlamaForCausalLM on the
same random weights, KV-cache consistency (prefill/decode/chunks/ragged batches), and generation."""

from __future__ import annotations

import pytest
import torch

from llama3_triton.model.generation.generate import SamplingParams, sample
from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.tiny import make_tiny

# (name, make_tiny kwargs, which folder our loader reads). Every variant writes HF's layout at the top and
# Meta's in original/, from the same weights; HF's model always reads the top folder.
VARIANTS = {
    "3.0-gqa1-meta": (dict(dim=128, n_heads=2, n_kv_heads=2, rope_scaling_factor=None), "original"),
    "3.1-gqa4-hf": (dict(dim=256, n_heads=4, n_kv_heads=1, rope_scaling_factor=8.0), ""),
    "3.2-tied-gqa4-meta-sharded": (
        dict(dim=512, n_heads=8, n_kv_heads=2, rope_scaling_factor=32.0, tie_embeddings=True, shards=2),
        "original",
    ),
    "3.1-gqa4-hf-sharded": (dict(dim=256, n_heads=4, n_kv_heads=1, hf_shards=3), ""),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        name: make_tiny(root / name, hf=True, dtype=torch.float32, seed=i, **kw)
        for i, (name, (kw, _)) in enumerate(VARIANTS.items())
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small fp32 Meta-layout model for the cache and generation tests."""
    path = make_tiny(tmp_path_factory.mktemp("tiny") / "m", dim=128, n_heads=2, n_kv_heads=1, dtype=torch.float32)
    return Llama.load(path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=96, max_batch_size=3)


def _random_tokens(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128000, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(ckpts, variant):
    from transformers import LlamaForCausalLM

    kw, sub = VARIANTS[variant]
    path = ckpts[variant]
    ours = Llama.load(path / sub if sub else path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=64)
    assert ours.args.tie_embeddings == kw.get("tie_embeddings", False)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = _random_tokens(1, 23, seed=1)
    with torch.no_grad():
        expected = hf(tokens).logits
    got = ours.forward(tokens, 0)
    assert got.dtype == torch.float32 and got.shape == (1, 23, 128256)
    assert expected.abs().max() > 1.0  # a real signal, not all zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_meta_and_hf_layouts_give_identical_logits(ckpts):
    path = ckpts["3.1-gqa4-hf"]
    tokens = _random_tokens(1, 9, seed=2)
    a = Llama.load(path, dtype=torch.float32, device="cpu", max_seq_len=16).forward(tokens, 0)
    b = Llama.load(path / "original", dtype=torch.float32, device="cpu", max_seq_len=16).forward(tokens, 0)
    assert torch.equal(a, b)


def test_decode_one_token_at_a_time_matches_full_forward(tiny):
    tokens = _random_tokens(2, 12, seed=3)
    full = tiny.forward(tokens, 0)
    tiny.forward(tokens[:, :5], 0)
    steps = [tiny.forward(tokens[:, t : t + 1], t) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 5:], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_matches_one_prefill(tiny):
    tokens = _random_tokens(1, 20, seed=4)
    full = tiny.forward(tokens, 0)
    first = tiny.forward(tokens[:, :13], 0)
    second = tiny.forward(tokens[:, 13:], 13)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-4, rtol=1e-4)


def test_per_sequence_positions_in_one_decode_step(tiny):
    """Two sequences with different history lengths decoded in one batch equal each decoded alone."""
    a, b = _random_tokens(1, 7, seed=5), _random_tokens(1, 4, seed=6)
    nxt = _random_tokens(2, 1, seed=7)
    tiny.forward(a, 0)
    alone_a = tiny.forward(nxt[:1], 7)
    tiny.forward(b, 0)
    alone_b = tiny.forward(nxt[1:], 4)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    tiny.forward(batch, 0)  # b's 3 padding slots are overwritten by its next token before being read
    both = tiny.forward(nxt, torch.tensor([7, 4]))
    torch.testing.assert_close(both, torch.cat([alone_a, alone_b]), atol=1e-4, rtol=1e-4)


def test_ragged_batch_generation_equals_one_by_one(tiny):
    prompts = ["The capital of France is", "Hi", "Once upon a time, in a land far away, there"]
    batch = tiny.generate(prompts, max_new_tokens=6, temperature=0)
    singles = [tiny.generate(p, max_new_tokens=6, temperature=0) for p in prompts]
    assert batch.tokens == [s.tokens[0] for s in singles]
    assert batch.prompt_tokens == [len(tiny.tokenizer.encode(p, bos=True)) for p in prompts]
    assert all(len(t) == 6 for t in batch.tokens) and batch.stop_reasons == ["max_new_tokens"] * 3


def test_greedy_is_the_argmax_of_the_logits(tiny):
    ids = tiny.tokenizer.encode("Llamas are", bos=True)
    out = tiny.generate([ids], max_new_tokens=3, temperature=0)
    expected, seq = [], list(ids)
    for _ in range(3):
        logits = tiny.forward(torch.tensor([seq]), 0)
        seq.append(int(logits[0, -1].argmax()))
        expected.append(seq[-1])
    assert out.tokens[0] == expected


def test_same_seed_same_tokens(tiny):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=1.0)
    a = tiny.generate("Tell me a story", seed=123, **kw).tokens
    b = tiny.generate("Tell me a story", seed=123, **kw).tokens
    c = tiny.generate("Tell me a story", seed=124, **kw).tokens
    assert a == b
    assert a != c  # 12 tokens sampled at temperature 1 from a near-uniform 128k vocabulary


def test_stops_on_stop_token_and_streams(tiny):
    free = tiny.generate("abc", max_new_tokens=8, temperature=0)
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    streamed = []
    out = tiny.generate(
        "abc", max_new_tokens=8, temperature=0, stop_tokens=[stop], on_token=lambda b, t: streamed.append((b, t))
    )
    assert out.tokens[0] == free.tokens[0][:first]
    assert out.stop_reasons == ["stop_token"]
    assert streamed == [(0, t) for t in free.tokens[0][:first]]


def test_sampling_filters():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, SamplingParams(0.0, 1.0, 0), g), greedy)
    assert torch.equal(sample(logits, SamplingParams(1.0, 1.0, 1), g), greedy)  # top-k 1
    assert torch.equal(sample(logits, SamplingParams(1.0, 1e-6, 0), g), greedy)  # top-p tiny keeps the top token
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        t = sample(logits, SamplingParams(2.0, 1.0, 5), g)
        assert (top5 == t[:, None]).any(-1).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=95), "overflows the KV cache"),
    ],
)
def test_bad_generation_arguments(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate("hello", **kw)


def test_bad_prompts(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.generate([[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="longer than the context"):
        tiny.generate("word " * 200, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_batch_size"):
        tiny.generate(["a", "b", "c", "d"], max_new_tokens=1)
    with pytest.raises(ValueError, match="outside"):
        tiny.generate([[1, 2, 200000]], max_new_tokens=1)


def test_bad_forward_inputs(tiny):
    ok = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="integer tensor of shape"):
        tiny.forward(ok.float(), 0)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        tiny.forward(ok[0], 0)
    with pytest.raises(ValueError, match="token ids must be in"):
        tiny.forward(torch.tensor([[1, -2]]), 0)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        tiny.forward(ok, 95)
    with pytest.raises(ValueError, match="is on|are on"):
        tiny.forward(ok.to("meta"), 0)
    with pytest.raises(ValueError, match="only supported for one-token"):
        tiny.forward(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="batch size"):
        tiny.forward(torch.ones(4, 1, dtype=torch.long), 0)


def test_bad_load_arguments(ckpts):
    path = ckpts["3.0-gqa1-meta"] / "original"
    with pytest.raises(ValueError, match="backend"):
        Llama.load(path, backend="cuda-magic", device="cpu")
    with pytest.raises(ValueError, match="max_seq_len"):
        Llama.load(path, device="cpu", max_seq_len=10**6)
    with pytest.raises(ValueError, match="dtype"):
        Llama.load(path, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="max_batch_size"):
        Llama.load(path, device="cpu", max_batch_size=0)


def test_unseeded_sampling_leaves_the_global_rng_alone(tiny):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny.generate("hello", max_new_tokens=2, temperature=1.0, seed=None)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("bad", [-3, True, 2.0])
def test_bad_start_pos(tiny, bad):
    with pytest.raises(ValueError, match="start_pos"):
        tiny.generate("hello", max_new_tokens=1, start_pos=bad)
    if not isinstance(bad, float):
        with pytest.raises(ValueError, match="start_pos"):
            tiny.forward(torch.tensor([[1]]), bad)


def test_first_decode_step_is_timed_apart(tiny):
    out = tiny.generate("hello", max_new_tokens=6, temperature=0)
    assert out.decode_steps == 4 and out.first_decode_seconds > 0 and out.decode_seconds > 0
    assert out.decode_tokens_per_second == pytest.approx(4 / out.decode_seconds)
