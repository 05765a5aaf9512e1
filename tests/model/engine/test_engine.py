"""The engine: requests arriving at different steps, with different lengths and settings, give the tokens each gives
alone (greedy, and seeded sampling); preemption, aborts and the prefix cache change no output and leak no page;
what can never fit is refused when it is submitted. On the torch backend, and the Triton kernels in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from llama3_triton.model.engine import Engine, Request
from llama3_triton.model.errors import UserError
from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.tiny import make_tiny
from tests.smol import SMOL, needs_smol

SYSTEM = "You are a helpful assistant. Answer briefly and well, always, in every case you meet. "
PROMPTS = [SYSTEM + q for q in ("What is one?", "What is two plus two?", "Name a color.", "Why?")] + [
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen",
    "Hi",
]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return Llama.load(tiny_ckpt, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=256)


@pytest.fixture(scope="module")
def alone(llm):
    """Each prompt's greedy tokens, generated alone on the static cache (the engine's reference)."""
    return [llm.generate(p, max_new_tokens=24, temperature=0, stop_tokens=[]).tokens[0] for p in PROMPTS]


def _engine(llm, **kw) -> Engine:
    kw = {"max_num_seqs": 8, "max_num_batched_tokens": 32, "kv_cache_tokens": 2048} | kw
    return Engine(llm, **kw)


def _drain(engine: Engine) -> dict:
    """Step until nothing is left; each request's outputs in order."""
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    for o in engine.step():  # outputs of requests ended between steps (aborts)
        outs.setdefault(o.request_id, []).append(o)
    return outs


def _assert_no_page_held(engine: Engine) -> None:
    assert engine.pool.num_free == engine.pool.num_pages and not any(engine.pool.refs)


def test_staggered_requests_give_each_ones_tokens_alone(llm, alone):
    """Requests join at different steps, each with its own length, while others decode; a chunk budget of 32
    splits the long prompts across steps. Every request ends with exactly the tokens it makes alone."""
    engine = _engine(llm)
    lengths = [24, 7, 16, 24, 3, 11]
    ids, outs = {}, {}
    for step in range(200):
        if step % 3 == 0 and len(ids) < len(PROMPTS):  # a new request every third step
            i = len(ids)
            ids[engine.add_request(PROMPTS[i], Request(max_tokens=lengths[i], temperature=0, ignore_eos=True))] = i
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if len(ids) == len(PROMPTS) and not engine.has_unfinished():
            break
    for rid, i in ids.items():
        final = outs[rid][-1]
        assert final.finished and final.finish_reason == "length", final
        assert final.token_ids == alone[i][: lengths[i]], f"prompt {i}"
        assert sum(len(o.new_token_ids) for o in outs[rid]) == lengths[i]  # each token said once
        assert sum(o.finished for o in outs[rid]) == 1  # one finish per request
    _assert_no_page_held(engine)


def test_a_seeded_request_samples_the_same_tokens_whatever_runs_beside_it(llm):
    request = Request(max_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    solo = _engine(llm).generate([PROMPTS[0]], request)[0].token_ids
    others = [
        Request(max_tokens=12, temperature=0.8, seed=1),
        Request(max_tokens=5, temperature=0),
        Request(max_tokens=9, temperature=1.0, top_k=5, repetition_penalty=1.3),  # unseeded, penalised
    ]
    mixed = _engine(llm).generate(PROMPTS[2:5] + [PROMPTS[0]], [*others, request])
    assert mixed[-1].token_ids == solo
    again = _engine(llm).generate([PROMPTS[0]], Request(max_tokens=12, temperature=1.0, top_p=0.95, seed=8))
    assert again[0].token_ids != solo  # the seed is what repeats it


def test_preemption_changes_no_output_and_leaks_no_page(llm, alone):
    """A pool of 7 pages (112 tokens) for six requests: the newest running request gives its pages back several
    times and is computed again; every output is still its own alone."""
    engine = _engine(llm, kv_cache_tokens=112, prefix_caching=False)
    outs = engine.generate(PROMPTS, Request(max_tokens=24, temperature=0, ignore_eos=True))
    assert engine.stats["preemptions"] >= 2, engine.stats
    assert [o.token_ids for o in outs] == [a[:24] for a in alone]
    _assert_no_page_held(engine)
    m = engine.metrics()
    assert m["finished"] == 6 and m["generated_tokens"] == 6 * 24 and 0 < m["ttft_p50_s"] and 0 < m["tpot_p50_s"]


def test_each_step_records_its_time_prompt_tokens_and_decodes(llm):
    """Engine.last_step, what a server's step-time histogram is made of: a prompt chunk counts as prompt tokens,
    the one newest token of a request past its prompt as a decode, in the same step as each other."""
    engine = _engine(llm, max_num_batched_tokens=8)
    ids = llm.tokenizer.encode(PROMPTS[4])
    a = engine.add_request(ids[:11], Request(max_tokens=3, temperature=0, ignore_eos=True))
    seen = []
    for _ in range(3):  # the prompt in chunks of 8 and 3 (the first token sampled), then a decode
        engine.step()
        seen.append((engine.last_step.prompt_tokens, engine.last_step.decodes))
    engine.add_request(ids[:5], Request(max_tokens=1, temperature=0))
    engine.step()  # a's second decode beside the new request's prompt
    seen.append((engine.last_step.prompt_tokens, engine.last_step.decodes))
    assert seen == [(8, 0), (3, 0), (0, 1), (5, 1)] and engine.last_step.seconds > 0
    _drain(engine)
    assert a not in engine.seqs
    _assert_no_page_held(engine)


def test_preempted_seeded_sampling_resumes_its_own_stream(llm):
    request = Request(max_tokens=20, temperature=1.0, seed=11)
    want = _engine(llm).generate([PROMPTS[1]], request)[0].token_ids
    engine = _engine(llm, kv_cache_tokens=96, prefix_caching=False)
    outs = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [Request(max_tokens=20, temperature=0), request,
                                                                  Request(max_tokens=20, temperature=0)])  # fmt: skip
    assert engine.stats["preemptions"] >= 1 and outs[1].token_ids == want


def test_aborts_mid_prefill_and_mid_decode_free_their_pages(llm, alone):
    engine = _engine(llm, max_num_batched_tokens=8)
    ids = [engine.add_request(p, Request(max_tokens=20, temperature=0, ignore_eos=True)) for p in PROMPTS[:3]]
    outs: dict[str, list] = {}

    def step():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)

    step()  # the first prompt's first chunk only: it is mid-prefill
    assert engine.seqs[ids[0]].computed < len(engine.seqs[ids[0]].prompt)
    engine.abort(ids[0])
    while not outs.get(ids[1]):  # until the second request has sampled a token: it is decoding
        step()
    engine.abort(ids[1])  # mid-decode
    while engine.has_unfinished():
        step()
    step()
    assert [o.finish_reason for o in outs[ids[0]]] == ["abort"]
    assert outs[ids[1]][-1].finish_reason == "abort" and len(outs[ids[1]][-1].token_ids) < 20
    assert outs[ids[2]][-1].token_ids == alone[2][:20]  # the other goes on untouched
    engine.abort(ids[2])  # finished already: nothing to do
    _assert_no_page_held(engine)


def test_prefix_cache_on_and_off_same_outputs_and_the_shared_pages_are_reused(llm, alone):
    shared = len(llm.tokenizer.encode(SYSTEM, bos=True)) // 16 * 16  # whole pages of the system prompt
    assert shared >= 16
    results = {}
    for on in (False, True):
        engine = _engine(llm, prefix_caching=on)
        results[on] = [engine.generate([p], Request(max_tokens=24, temperature=0, ignore_eos=True))[0] for p in PROMPTS]
        _assert_no_page_held(engine)
    assert [o.token_ids for o in results[True]] == [o.token_ids for o in results[False]] == [a[:24] for a in alone]
    assert [o.cached_tokens for o in results[False]] == [0] * 6
    assert [o.cached_tokens for o in results[True]] == [0, shared, shared, shared, 0, 0]
    # A chat's next turn: the first turn's prompt and reply are whole pages already computed.
    engine = _engine(llm)
    first = engine.generate([PROMPTS[0]], Request(max_tokens=24, temperature=0, ignore_eos=True))[0]
    turn = first.token_ids[:24]
    prompt_ids = llm.tokenizer.encode(PROMPTS[0], bos=True) + turn + llm.tokenizer.encode(" And?")
    second = engine.generate([prompt_ids], Request(max_tokens=4, temperature=0))[0]
    # The first turn computed its prompt and 23 of its 24 tokens (the last was sampled, never run): whole pages.
    computed = len(llm.tokenizer.encode(PROMPTS[0], bos=True)) + 23
    assert second.cached_tokens == min(computed // 16, (len(prompt_ids) - 1) // 16) * 16 > shared
    assert engine.metrics()["prefix_hit_tokens"] == second.cached_tokens


def test_stop_strings_end_the_text_before_them(llm, alone):
    text = llm.tokenizer.decode(alone[0][:24])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("the tiny model's text has no printable stop string there")
    out = _engine(llm).generate([PROMPTS[0]], Request(max_tokens=24, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)] and stop not in out.text


def test_logprobs_are_the_models_log_softmax(llm):
    out = _engine(llm).generate([PROMPTS[5]], Request(max_tokens=3, temperature=0, logprobs=3))[0]
    ids = llm.tokenizer.encode(PROMPTS[5], bos=True)
    llm.setup_cache(1, 256)
    logits = llm.forward(torch.tensor([ids + out.token_ids[:2]]), 0)[0, len(ids) - 1 :]  # (3, vocab)
    want = torch.log_softmax(logits, -1)
    for t, lp in enumerate(out.logprobs):
        assert lp["token"] == out.token_ids[t]
        torch.testing.assert_close(lp["logprob"], want[t, lp["token"]].item(), atol=1e-4, rtol=1e-4)
        top = torch.topk(want[t], 3)
        assert [i for i, _ in lp["top"]] == top.indices.tolist()


@pytest.mark.parametrize(
    "prompt, request_kw, match",
    [
        ("x " * 300, {"max_tokens": 1}, "is longer than the context of 256 tokens"),
        ("Hi", {"max_tokens": 255}, "is longer than the context of 256 tokens"),
        ("Hi", {"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ("Hi", {"stop": "x"}, "stop must be a sequence of non-empty strings"),
        ("Hi", {"logprobs": 50}, r"logprobs must be an integer in \[0, 20\]"),
        ("Hi", {"temperature": -1}, "temperature must be a finite number >= 0"),
        ([], {}, "the prompt is empty"),
        ([1, 10**9], {}, "token ids outside"),
    ],
)
def test_what_can_never_fit_or_is_wrong_is_refused_at_once(llm, prompt, request_kw, match):
    engine = _engine(llm)
    with pytest.raises(UserError, match=match):
        engine.add_request(prompt, Request(**request_kw))
    assert not engine.has_unfinished()


def test_a_request_larger_than_the_pool_is_refused(llm):
    engine = _engine(llm, kv_cache_tokens=32)
    with pytest.raises(UserError, match="need 3 pages of the KV cache, which has 2"):
        engine.add_request("Hi", Request(max_tokens=40))


def test_the_triton_kernels_serve_the_same_tokens(tmp_path):
    """The engine on the Triton backend (its paged kernels, in the interpreter here): mixed prefill and decode
    steps, and decode-only steps, give the torch backend's tokens."""
    ckpt = make_tiny(tmp_path / "small", seed=4, dtype=torch.float32, n_layers=1, dim=128, n_heads=2, n_kv_heads=1)
    prompts = ["Hello there my friend", "The capital of France is"]
    got = {}
    for backend in ("torch", "triton"):
        model = Llama.load(ckpt, backend=backend, device="cpu", dtype=torch.float32, max_seq_len=64)
        engine = Engine(model, max_num_seqs=2, max_num_batched_tokens=4, kv_cache_tokens=128)
        got[backend] = [o.token_ids for o in engine.generate(prompts, Request(max_tokens=3, temperature=0))]
    assert got["triton"] == got["torch"]


class _OpNames:
    """A backend that records the name of each op the model calls on it, then runs the op on the wrapped one."""

    def __init__(self, ops):
        self.ops, self.names = ops, []

    def __getattr__(self, name):
        op = getattr(self.ops, name)
        if not callable(op) or name in ("pack_quant", "workspaces"):
            return op
        return lambda *a, **k: (self.names.append(name), op(*a, **k))[1]


def test_the_engines_decode_steps_run_the_fused_paged_step(tmp_path):
    """On the Triton backend an engine step whose every request is decoding runs the fused decode step through the
    block tables: per layer the four fused products and the one-launch paged RoPE + cache write + attention, and
    nothing else on the backend (the head is PyTorch's in the interpreter). Its tokens and log-probabilities equal
    the unfused path's (the prefill path over the pages, T = 1 per sequence), three sequences of ragged lengths."""
    ckpt = make_tiny(tmp_path / "small", seed=5, dtype=torch.float32, n_layers=2, dim=256, n_heads=4, n_kv_heads=2)
    prompts = ["Hello there my friend", "The capital of France is a city that", "Hi"]
    request = Request(max_tokens=4, temperature=0, logprobs=2, ignore_eos=True)
    model = Llama.load(ckpt, backend="triton", device="cpu", dtype=torch.float32, max_seq_len=60)
    got = {}
    for fused in (True, False):
        model.use(fused_decode=fused)
        engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_tokens=256, page_size=16)
        got[fused] = engine.generate(prompts, request)
    for a, b in zip(got[True], got[False], strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            torch.testing.assert_close(x["logprob"], y["logprob"], atol=1e-4, rtol=1e-4)
    model.use(fused_decode=True)
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_tokens=256, page_size=16)
    for p in prompts:
        engine.add_request(p, request)
    engine.step()  # the three prompts, one step
    spy = _OpNames(model.ops)
    model.use(ops=spy)
    engine.step()  # three decodes
    layer = ["linear", "paged_rope_decode_attention", "linear", "linear", "linear"]
    assert spy.names == layer * model.args.n_layers, spy.names


@needs_smol
def test_smollm2_staggered_greedy_equals_alone():
    model = Llama.load(SMOL, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=256)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]
    want = [model.generate(p, max_new_tokens=12, temperature=0, stop_tokens=[]).tokens[0] for p in prompts]
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=8, kv_cache_tokens=512)
    ids = [engine.add_request(prompts[0], Request(max_tokens=12, temperature=0, ignore_eos=True))]
    engine.step()
    ids.append(engine.add_request(prompts[1], Request(max_tokens=12, temperature=0, ignore_eos=True)))
    engine.step()
    ids.append(engine.add_request(prompts[2], Request(max_tokens=12, temperature=0, ignore_eos=True)))
    outs = _drain(engine)
    assert [outs[i][-1].token_ids for i in ids] == want
    _assert_no_page_held(engine)
