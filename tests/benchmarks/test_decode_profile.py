"""benchmarks.decode_profile: the fused decode step's launch plan and its bytes, which the GPU profile is matched
against kernel by kernel (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from llama3_triton.benchmarks import decode_profile
from llama3_triton.benchmarks.common import Context
from llama3_triton.model.llama import Llama
from llama3_triton.model.tools.tiny import make_tiny

# The Triton backend runs compiled on a GPU and in the interpreter on a CPU, never both in one process.
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("prof") / "tiny", dim=256, n_layers=2, n_heads=4, n_kv_heads=2, seed=1)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_plan_is_the_launch_sequence_and_its_weights_are_the_decode_bytes(tiny, quantize):
    device = "cuda" if CUDA else "cpu"
    llm = Llama.load(tiny, backend="triton", device=device, dtype=torch.float32, max_seq_len=64, quantize=quantize)
    rows = decode_profile.plan(llm, 1, 40)
    n = llm.args.n_layers
    assert [r["kind"] for r in rows] == ["embed"] + ["qkv", "attn", "wo", "w13", "w2"] * n + ["head"]
    # Every weight a step reads is in exactly one launch: their sum is the model's own count.
    assert sum(r["weight_bytes"] for r in rows) == llm.decode_bytes_per_token()
    a, es = llm.args, 4
    attn = rows[2]["bytes"]
    cache = 40 * 2 * a.n_kv_heads * a.head_dim * es  # the 40 cached keys and values of one layer
    assert cache < attn < cache + 4 * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim * es
    # Doubling the batch doubles the activations and the cache read, not the weights.
    rows2 = decode_profile.plan(llm, 2, 40)
    assert all(r2["weight_bytes"] == r["weight_bytes"] for r, r2 in zip(rows, rows2, strict=True))
    assert rows2[2]["bytes"] == 2 * attn


@pytest.mark.skipif(CUDA, reason="the CPU's record; on a GPU the profile times the step (benchmarks, gpu_check)")
def test_profile_on_a_cpu_records_the_plan_and_times_nothing(tiny):
    llm = Llama.load(tiny, backend="triton", device="cpu", dtype=torch.float32, max_seq_len=64)
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, quick=False, smoke=True)
    ctx.ceilings = {"read_gbps": 10.0}
    rec = decode_profile.profile(ctx, llm, 1, 16)
    assert rec["launches_planned"] == 5 * llm.args.n_layers + 2
    assert rec["floor_ms"] == pytest.approx(rec["bytes"] / 10e9 * 1e3)
    assert "kernel_sum_ms" not in rec and "no GPU" in rec["skipped"]
    text = "\n".join(decode_profile.markdown("tiny", rec))
    assert "Times: not measured" in text and "| attn | 2 |" in text
    llm.use(fused_decode=False)
    assert "fused decode step is off" in decode_profile.profile(ctx, llm, 1, 16)["error"]
