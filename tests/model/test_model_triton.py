"""End to end on the Triton backend: the same greedy tokens and logits as the torch backend, and a small,
counted number of kernel launches per decode step.

On a CPU the kernels run in Triton's interpreter (slow), so the models are tiny and the prompts short.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.tiny import make_tiny
from tests.tolerances import INTERPRET, TOLERANCES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

VARIANTS = {
    "gqa1-unscaled": dict(dim=128, n_heads=2, n_kv_heads=2, rope_scaling_factor=None),
    "gqa4-scaled": dict(dim=256, n_heads=4, n_kv_heads=1, rope_scaling_factor=8.0),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    path = make_tiny(
        tmp_path_factory.mktemp("e2e") / request.param, seed=7, dtype=torch.float32, **VARIANTS[request.param]
    )
    kw = dict(device=DEVICE, dtype=torch.float32, max_seq_len=64, max_batch_size=3)
    return Llama.load(path, backend="torch", **kw), Llama.load(path, backend="triton", **kw)


def test_prefill_and_decode_logits_agree(pair):
    ref, tri = pair
    tokens = torch.randint(0, 128000, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    tol = TOLERANCES[torch.float32]
    # Logits are matrix products of the final hidden state with a 128k x dim matrix: compare with a
    # tolerance scaled by the logits' size, not their absolute value.
    scale = 1 + ref.forward(tokens, 0).abs().max().item()
    for m in (ref, tri):
        m.forward(tokens[:, :6], 0)
    a = ref.forward(tokens[:, 6:7], 6), ref.forward(tokens[:, 7:8], 7)
    b = tri.forward(tokens[:, 6:7], 6), tri.forward(tokens[:, 7:8], 7)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, atol=tol["atol"] * scale * 10, rtol=tol["rtol"] * 10)
    full_ref = ref.forward(tokens, 0)
    full_tri = tri.forward(tokens, 0)
    torch.testing.assert_close(full_tri, full_ref, atol=tol["atol"] * scale * 10, rtol=tol["rtol"] * 10)


def test_same_greedy_tokens_for_a_ragged_batch(pair):
    ref, tri = pair
    prompts = ["The capital of France is", "Hi", "One two three four five six"]
    a = ref.generate(prompts, max_new_tokens=4, temperature=0)
    b = tri.generate(prompts, max_new_tokens=4, temperature=0)
    assert a.tokens == b.tokens


class _CountAten(TorchDispatchMode):
    """Counts aten ops that launch a kernel on a GPU (views and metadata-only ops excluded)."""

    FREE = {
        "view",
        "_unsafe_view",
        "transpose",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "expand",
        "t",
        "as_strided",
        "alias",
        "detach",
        "unflatten",
        "permute",
        "reshape",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "clone_free",
    }

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False  # set while the interpreter runs a Triton kernel (it uses torch ops itself)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not self.paused and name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _count_launches(model, monkeypatch, tokens, positions):
    """(Triton kernel launches in order, aten ops that would launch a kernel) of one ``model.decode``; the
    interpreter's own torch calls and, on the CPU, the PyTorch output head (kept out of the interpreter, see
    ``Llama._decode_step``) are counted as one launch each: "head"."""
    from triton.runtime.interpreter import InterpretedFunction

    import llama3_triton.model.llama as llama_mod

    launches: list[str] = []
    aten = _CountAten()

    def paused(name, fn):
        def call(*args, **kwargs):
            launches.append(name)
            aten.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                aten.paused = False

        return call

    original = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda fn, *a, **k: paused(fn.fn.__name__, original)(fn, *a, **k))
    monkeypatch.setattr(llama_mod.reference, "linear", paused("head", llama_mod.reference.linear))
    with aten:
        model.decode(tokens, positions)
    monkeypatch.undo()
    return launches, aten.ops


# No host synchronisation inside a step: the driver validates positions once, so the launchers skip their own
# range checks (a min/max and a host read each).
SYNCS = {"aminmax", "item", "stack", "resolve_conj", "resolve_neg", "_local_scalar_dense", "max", "min"}


@pytest.mark.skipif(not INTERPRET, reason="counts interpreter launches; on a GPU the decode step is a CUDA graph")
def test_kernel_launches_per_decode_step(pair, monkeypatch):
    """The fused decode step: per layer 5 launches, all Triton -- RMSNorm + qkv product, RoPE + cache write +
    attention (splits merged in the same launch), wo product + residual, RMSNorm + w13 product + SwiGLU, w2 product
    + residual. Per step: the embedding lookup and the output head (RMSNorm + product). Nothing else."""
    _, tri = pair
    assert tri.fused_decode
    tri.forward(torch.tensor([[1, 2, 3]], device=DEVICE), 0)
    launches, aten_ops = _count_launches(tri, monkeypatch, torch.tensor([[4]]), torch.tensor([3]))
    n_layers = tri.args.n_layers
    layer = ["_gemv_kernel", "_decode_step_kernel", "_gemv_kernel", "_gemv_kernel", "_gemv_kernel"]
    assert launches == layer * n_layers + ["head"], launches
    assert aten_ops == ["embedding"], aten_ops  # and no host sync
    assert len(launches) + len(aten_ops) == 5 * n_layers + 2


@pytest.mark.skipif(not INTERPRET, reason="counts interpreter launches; on a GPU the decode step is a CUDA graph")
def test_kernel_launches_per_unfused_decode_step(pair, monkeypatch):
    """The prefill path at T = 1 (``use(fused_decode=False)``): per layer 4 cuBLAS products (wqkv, wo, w13, w2) +
    rope + decode attention (2: splits, merge) + 2 fused add_rms_norm + swiglu = 10 launches. Per step: the
    embedding, the first RMSNorm, the cache lengths, the output product and its fp32 cast."""
    _, tri = pair
    tri.use(fused_decode=False)
    try:
        tri.forward(torch.tensor([[1, 2, 3]], device=DEVICE), 0)
        launches, ops = _count_launches(tri, monkeypatch, torch.tensor([[4]]), torch.tensor([3]))
    finally:
        tri.use(fused_decode=True)
    n_layers = tri.args.n_layers
    assert not SYNCS & set(ops), ops
    matmuls = [o for o in ops if o in ("linear", "mm", "addmm", "matmul")]
    assert len(matmuls) == 4 * n_layers + 1, ops  # wqkv, wo, w13, w2 per layer + the output projection
    others = sorted(o for o in ops if o not in matmuls)
    assert others == ["add", "embedding", "to"], ops  # cache lengths, embedding lookup, fp32 logits: once per step
    # Triton: the first RMSNorm, then per layer rope, decode attention (split pass + reduction), 2 add_rms_norm,
    # swiglu. So a decode step is 10 launches per layer plus 5.
    assert len(launches) == 1 + 6 * n_layers, launches


def test_fused_decode_step_with_split_k(pair, monkeypatch):
    """Split-K in the fused step's products (forced at these tiny widths: as if the device had many SMs, 64-weight
    splits): the same logits as without it, every launch still one per product (the last split merges), and the
    model's GemvWorkspace left with its counters at zero."""
    import llama3_triton.kernels.gemv as gemv

    _, tri = pair
    prompt, tok, pos = torch.tensor([[1, 2, 3]], device=DEVICE), torch.tensor([[4]], device=DEVICE), torch.tensor([3])
    tri.forward(prompt, 0)
    whole = tri.decode(tok, pos.to(DEVICE))
    monkeypatch.setattr(gemv, "split_target", lambda device: 64)
    monkeypatch.setattr(gemv, "MIN_K_PER_SPLIT", 64)
    splits: list[int] = []
    plan = gemv.plan_split_k
    monkeypatch.setattr(gemv, "plan_split_k", lambda *a: splits.append(plan(*a)[0]) or plan(*a))
    tri.use(fused_decode=True)  # a workspace sized for the patched device
    try:
        split = tri.decode(tok, pos.to(DEVICE))
        assert max(splits) > 1, splits
        torch.testing.assert_close(split, whole, **TOLERANCES[torch.float32])
        assert not tri.gemv_workspace.counters.any()
        if INTERPRET:
            launches, _ = _count_launches(tri, monkeypatch, tok, pos)
            assert len(launches) == 5 * tri.args.n_layers + 1, launches
    finally:
        monkeypatch.undo()
        tri.use(fused_decode=True)


def test_fused_and_unfused_decode_agree_over_a_ragged_batch(pair):
    """The fused step (Triton) against the prefill path at T = 1 on the torch backend, step after step, with
    per-sequence positions (a ragged batch): logits and the KV cache each step leaves behind."""
    ref, tri = pair
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 128000, (3, 5), generator=g).to(DEVICE)
    start = torch.tensor([5, 3, 1], device=DEVICE)
    scale = 1 + ref.forward(prompt, 0).abs().max().item()
    tri.forward(prompt, 0)
    tol = TOLERANCES[torch.float32]
    for i in range(4):
        tok = torch.randint(0, 128000, (3, 1), generator=g).to(DEVICE)
        a, b = ref.decode(tok, start + i), tri.decode(tok, start + i)
        torch.testing.assert_close(b, a, atol=tol["atol"] * scale * 10, rtol=tol["rtol"] * 10)
    for layer in range(tri.args.n_layers):
        for mine, theirs in ((tri.k_cache, ref.k_cache), (tri.v_cache, ref.v_cache)):
            torch.testing.assert_close(mine[layer][:3, :, :9], theirs[layer][:3, :, :9], **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the CUDA-graph decode step needs a CUDA device")
@pytest.mark.parametrize("B", [1, 2])
def test_cuda_graph_decode_matches_eager_decode(pair, B):
    """Replays of the captured decode step (static buffers, per-sequence positions that change every step)
    give the logits of the eager step, and the graph really was captured (no silent fallback)."""
    _, tri = pair
    g = torch.Generator().manual_seed(B)
    prompt = torch.randint(0, 128000, (B, 6), generator=g).to(DEVICE)
    steps = torch.randint(0, 128000, (8, B, 1), generator=g).to(DEVICE)
    start = torch.tensor([6, 4][:B], device=DEVICE)  # ragged: the second sequence's last 2 slots are padding

    def run(graph: bool) -> list[torch.Tensor]:
        tri.use(cuda_graph=graph)
        tri.forward(prompt, 0)
        return [tri.decode(steps[i], start + i).clone() for i in range(len(steps))]

    try:
        eager = run(False)
        graphed = run(True)
        assert tri.has_decode_graph(B), "capture failed and the driver fell back to eager"
    finally:
        tri.use(cuda_graph=True)
    for i, (a, b) in enumerate(zip(eager, graphed, strict=True)):
        torch.testing.assert_close(b, a, **TOLERANCES[torch.float32], msg=lambda m, i=i: f"step {i}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: counts the CUDA kernels of an eager decode step")
def test_cuda_kernels_per_decode_step(pair):
    """On the GPU the profiler sees what the interpreter count above predicts: 5 kernels a layer and 2 a step."""
    from torch.autograd import DeviceType

    _, tri = pair
    tri.use(cuda_graph=False)
    try:
        tri.forward(torch.tensor([[1, 2, 3]], device=DEVICE), 0)
        tokens, positions = torch.tensor([[4]], device=DEVICE), torch.tensor([3], device=DEVICE)
        tri.decode(tokens, positions)  # compile and autotune outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            tri.decode(tokens, positions)
            torch.cuda.synchronize()
    finally:
        tri.use(cuda_graph=True)
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith("Mem")]
    assert len(kernels) == 5 * tri.args.n_layers + 2, kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: generation replaying CUDA graphs")
def test_generation_in_cuda_graphs_matches_eager(pair):
    """Decode and sampling as two replayed graphs give the eager loop's tokens (the sampler's random numbers come
    from (seed, step, row) alone), streamed or not."""
    _, tri = pair
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    prompts = ["Hello there", "Hi"]
    graphed = tri.generate(prompts, **kw)
    assert graphed.extra["cuda_graphs"], "the decode loop fell back to eager"
    streamed: list[tuple[int, int]] = []
    graphed_streaming = tri.generate(prompts, on_token=lambda b, t: streamed.append((b, t)), **kw)
    tri.use(cuda_graph=False)
    try:
        eager = tri.generate(prompts, **kw)
    finally:
        tri.use(cuda_graph=True)
    assert not eager.extra["cuda_graphs"]
    assert graphed.tokens == eager.tokens == graphed_streaming.tokens
    assert sorted(streamed) == sorted((b, t) for b, row in enumerate(eager.tokens) for t in row)
