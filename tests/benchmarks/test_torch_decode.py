"""The torch.compile peer of the end-to-end benchmark (benchmarks/torch_decode.py): a plain-PyTorch decode step on
the model's own weights and cache. It must compute the model's logits, and trace as one graph with no break (what
fullgraph=True demands), sampling included; on a GPU, compile with inductor and replay as a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from llama3_triton.benchmarks.torch_decode import GREEDY, TorchDecode
from llama3_triton.model.generation.sampling import SamplingParams, sample
from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.tiny import make_tiny
from tests.tolerances import assert_close

CUDA = torch.cuda.is_available()
DEFAULT = SamplingParams()  # generate()'s default sampling: temperature 0.6, top-p 0.9


@pytest.fixture(scope="module", params=["untied", "tied"])
def ckpt(request, tmp_path_factory):
    """GQA 2 (4 q heads, 2 kv heads, head dim 32), two layers; the tied variant has no output matrix."""
    return make_tiny(
        tmp_path_factory.mktemp("peer") / request.param, dim=128, n_heads=4, n_kv_heads=2,
        tie_embeddings=request.param == "tied", seed=7,
    )  # fmt: skip


def _load(ckpt, dtype, backend="torch", device="cpu") -> Llama:
    return Llama.load(ckpt, backend=backend, device=device, dtype=dtype, max_seq_len=48, max_batch_size=2)


def _fill_cache(models, seed: int) -> None:
    """The same random (bf16-representable) values in every model's cache: never zeros."""
    g = torch.Generator().manual_seed(seed)
    first = models[0]
    for i in range(len(first.k_cache)):
        for name in ("k_cache", "v_cache"):
            values = torch.randn(getattr(first, name)[i].shape, generator=g).bfloat16()
            for m in models:
                getattr(m, name)[i].copy_(values)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128000, (2, 1), generator=g)
    return tokens, torch.tensor([21, 9])  # per-sequence positions: each sequence sees its own cache length


def _cache(model) -> list[torch.Tensor]:
    return [t.clone() for t in [*model.k_cache, *model.v_cache]]


def _restore(model, saved) -> None:
    for t, s in zip([*model.k_cache, *model.v_cache], saved, strict=True):
        t.copy_(s)


def test_logits_and_cache_writes_equal_the_models_own_decode_fp32(ckpt):
    model = _load(ckpt, torch.float32)
    _fill_cache([model], seed=1)
    tokens, positions = _inputs(2)
    before = _cache(model)
    expected = model.decode(tokens, positions)  # (B, vocab): the driver with the reference ops
    written_by_model = _cache(model)
    _restore(model, before)
    with torch.inference_mode():
        token, logits = TorchDecode(model, GREEDY).step(tokens, positions)
    assert_close(logits, expected, torch.float32, "peer logits vs model.decode")
    assert torch.equal(token, expected.argmax(-1))  # greedy sampling in the step
    # It wrote this step's k/v into the model's own cache, at each sequence's own slot, and nowhere else.
    for ours, theirs, old in zip(_cache(model), written_by_model, before, strict=True):
        assert_close(ours, theirs, torch.float32, "cache after the step")
        changed = (ours != old).any(-1).any(1)  # (B, S): slots that changed
        assert changed.nonzero().tolist() == [[0, 21], [1, 9]]


def test_bf16_is_as_accurate_as_the_models_own_bf16_decode(ckpt):
    """In bf16 the peer rounds at other places than the driver (SDPA, matrix-product shapes), so the two differ
    by a few bf16 units; measured against the fp32 model on the same weights and cache, the peer's error must be
    no larger than the driver's own (a ratio of 0.93-1.09 was seen over four seeds) -- not within a loose bound."""
    m32, m16 = _load(ckpt, torch.float32), _load(ckpt, torch.bfloat16)
    _fill_cache([m32, m16], seed=3)
    tokens, positions = _inputs(4)
    exact = m32.decode(tokens, positions)
    before = _cache(m16)
    own = m16.decode(tokens, positions)
    _restore(m16, before)
    with torch.inference_mode():
        _, peer = TorchDecode(m16, GREEDY).step(tokens, positions)
    own_err, peer_err = (own - exact).abs(), (peer - exact).abs()
    assert 0 < own_err.max() < 0.1 * exact.abs().max()  # a bf16-sized difference, not a broken model
    assert peer_err.max() <= 1.5 * own_err.max(), (peer_err.max(), own_err.max())
    assert peer_err.mean() <= 1.5 * own_err.mean(), (peer_err.mean(), own_err.mean())


@pytest.mark.parametrize("params", [GREEDY, DEFAULT, SamplingParams(top_k=40, top_p=0.8)], ids=str)
def test_traces_as_one_graph_with_no_break_and_compiles_fullgraph(ckpt, params):
    """torch._dynamo.explain: one graph, zero breaks (a host sync such as int(lengths.max()) or a torch.Generator
    argument would be a break); then torch.compile(fullgraph=True) (aot_eager: no C++ compiler needed, fast)
    gives the eager step's logits and, from the same global seed, its token."""
    import torch._dynamo

    model = _load(ckpt, torch.float32)
    _fill_cache([model], seed=5)
    tokens, positions = _inputs(6)
    peer = TorchDecode(model, params)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(peer.step)(tokens, positions)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    try:
        compiled = peer.compile(backend="aot_eager")
        with torch.inference_mode():
            torch.manual_seed(11)
            token, logits = compiled(tokens, positions)
            torch.manual_seed(11)
            eager_token, eager_logits = peer.step(tokens, positions)
    finally:
        torch._dynamo.reset()
    assert_close(logits, eager_logits, torch.float32, "compiled vs eager step")
    assert torch.equal(token, eager_token)
    torch.manual_seed(11)
    assert torch.equal(token, sample(eager_logits, params, None))  # the project's own sampler, global RNG


def test_peer_generation_loop_gives_generates_greedy_tokens(ckpt):
    """The benchmark's generation loop around the peer step (benchmarks.e2e._generate_peer) and model.generate
    give the same greedy tokens from the same prompt: the positions and cache bookkeeping agree."""
    from llama3_triton.benchmarks.common import Context
    from llama3_triton.benchmarks.e2e import _generate_peer, _generate_triton, _Peer

    model = _load(ckpt, torch.float32)
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, smoke=True, compile_backend="eager")
    prompt = [128000, 791, 4062, 14198, 39935, 35308]
    expected = _generate_triton(model, prompt, 12, GREEDY, seed=0)["tokens"]  # model.generate (torch backend here)
    peer = _Peer(ctx, model)
    try:
        got = _generate_peer(ctx, model, peer, prompt, 12, GREEDY, seed=0)
    finally:
        peer.close()
    assert got["tokens"] == expected and len(expected) == 12
    assert got["loop_s"] > 0 and got["prefill_s"] > 0


def test_rejects_a_model_without_a_cache(ckpt):
    model = _load(ckpt, torch.float32)
    model.k_cache, model.v_cache = [], []
    with pytest.raises(ValueError, match="no KV cache"):
        TorchDecode(model)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: inductor + CUDA graphs (reduce-overhead)")
def test_compiled_with_inductor_replays_without_host_syncs_on_the_gpu(ckpt):
    """On a GPU: torch.compile(fullgraph=True, mode="reduce-overhead") of the step matches the Triton driver's
    decode, and its replays make no host synchronisation."""
    import torch._dynamo

    model = _load(ckpt, torch.bfloat16, backend="triton", device="cuda")
    tokens, positions = (t.cuda() for t in _inputs(8))
    for t in [*model.k_cache, *model.v_cache]:
        t.normal_()
    peer = TorchDecode(model, DEFAULT)
    compiled = peer.compile()
    try:
        with torch.inference_mode():
            for _ in range(3):  # compile, warm-up, record
                torch.compiler.cudagraph_mark_step_begin()
                compiled(tokens, positions)
            expected = model.decode(tokens, positions).float().clone()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                torch.compiler.cudagraph_mark_step_begin()
                token, logits = compiled(tokens, positions)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            logits = logits.clone()
    finally:
        torch._dynamo.reset()
    assert token.shape == (2,) and token.dtype == torch.long
    assert (logits - expected).abs().max() <= 0.05 * max(1.0, float(expected.abs().max()))
