"""kernels.decode_attention (split-KV decode) against kernels.reference.decode_attention.

The reference runs in fp32 on upcasts of the very inputs the kernel gets. Caches are (B, S_max, Hkv, D) views
of a (B, Hkv, S_max, D) buffer, lengths are ragged (length 1 and length S_max always among them), and the
split count is varied: one split, the default, and more splits than some sequences have key blocks (so
empty splits must drop out of the reduction).

bf16 under the interpreter: Triton's interpreter computes bf16 arithmetic and ``tl.dot`` on the raw 16-bit
patterns. The launcher therefore sets the kernel's ``DOT_FP32`` flag when ``TRITON_INTERPRET=1`` and the
dtype is bf16: the dot operands are upcast to fp32 right after the load, so the bf16 tests run for real on a
CPU. The GPU path keeps bf16 tensor-core dots, with P rounded to bf16 before P @ V; that rounding is only
exercised on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama3_triton.kernels.decode as decode_mod
from llama3_triton.kernels import reference
from llama3_triton.kernels.decode import MAX_SPLITS, _default_num_splits, decode_attention
from tests.tolerances import DTYPES, INTERPRET, assert_close, poisoned_like

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(B, Hq, Hkv, D, S_max, dtype, *, lengths=None, strided_q=False, seed=0):
    """q (B, Hq, D); k, v (B, S_max, Hkv, D) views of (B, Hkv, S_max, D) caches; ragged lengths (B,)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q = randn(B, 3 * Hq, D)[:, Hq : 2 * Hq] if strided_q else randn(B, Hq, D)
    k = randn(B, Hkv, S_max, D).transpose(1, 2)
    v = randn(B, Hkv, S_max, D).transpose(1, 2)
    if lengths is None:
        lengths = torch.randint(1, S_max + 1, (B,), generator=g)
        lengths[0], lengths[-1] = 1, S_max
    return q, k, v, torch.as_tensor(lengths).to(DEVICE)


def _expected(q, k, v, lengths, scale=None):
    return reference.decode_attention(q.float(), k.float(), v.float(), lengths, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [None, 1, 7], ids=["default", "one-split", "7-splits"])
def test_matches_reference(num_splits, G, D, dtype):
    Hkv, S_max = 2, 150  # 150 keys: several 64-key blocks and a ragged last one
    q, k, v, lengths = _inputs(3, G * Hkv, Hkv, D, S_max, dtype, seed=G * 1000 + D)
    out = decode_attention(q, k, v, lengths, num_splits=num_splits)
    assert_close(out, _expected(q, k, v, lengths), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("len_dtype", [torch.int32, torch.int64], ids=str)
def test_strided_q_poisoned_out(len_dtype, dtype):
    """q strided inside a fused buffer; out= a strided view into a NaN buffer, fully written, nothing outside."""
    B, Hq, Hkv, D, S_max = 4, 8, 1, 128, 300
    lengths = torch.tensor([1, 300, 65, 129], dtype=len_dtype)
    q, k, v, lengths = _inputs(B, Hq, Hkv, D, S_max, dtype, lengths=lengths, strided_q=True, seed=1)
    buf = poisoned_like(torch.empty(B, 2 * Hq, D, dtype=dtype, device=DEVICE))
    out = buf[:, 1::2]
    ret = decode_attention(q, k, v, lengths, num_splits=5, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert_close(out, _expected(q, k, v, lengths), dtype)
    assert torch.isnan(buf[:, 0::2]).all(), "wrote outside the out= view"


def test_many_splits_mostly_empty():
    """MAX_SPLITS splits over short sequences: most splits own no keys and must carry zero weight."""
    q, k, v, lengths = _inputs(2, 4, 1, 64, 200, torch.float32, lengths=[1, 70], seed=2)
    out = decode_attention(q, k, v, lengths, num_splits=MAX_SPLITS)
    assert_close(out, _expected(q, k, v, lengths), torch.float32)


@pytest.mark.parametrize("num_splits", [None, 12])
def test_splits_sized_from_the_lengths(monkeypatch, num_splits):
    """Only splits that own keys at each sequence's length write a partial, and stage 2 reads only those: with the
    workspace poisoned, the unused slots stay NaN and the output is exact. Default splits need MIN_KEYS_PER_SPLIT
    keys each (one split below 2 x 256 keys); a caller's split count is used wherever there are keys."""
    spaces, workspace = [], decode_mod._workspace

    def poisoned_workspace(*args):
        o_part, lse = (torch.full_like(t, float("nan")) for t in workspace(*args))
        spaces.append((o_part, lse))
        return o_part, lse

    monkeypatch.setattr(decode_mod, "_workspace", poisoned_workspace)
    S_max = 8 * decode_mod.MIN_KEYS_PER_SPLIT
    lengths = [1, 100, 2 * decode_mod.MIN_KEYS_PER_SPLIT + 1, S_max]
    q, k, v, lengths = _inputs(4, 4, 1, 64, S_max, torch.float32, lengths=lengths, seed=7)
    out = decode_attention(q, k, v, lengths, num_splits=num_splits)
    assert_close(out, _expected(q, k, v, lengths), torch.float32)
    [(o_part, lse)] = spaces
    n = lse.shape[-1]
    assert n > 3
    block_n = decode_mod._stage1_config(torch.float32, 64, False)[0]
    min_keys = decode_mod.MIN_KEYS_PER_SPLIT if num_splits is None else 1

    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    used = []
    for L in lengths.tolist():  # ceil(L / min_keys) splits wanted, at most n, of whole key blocks: those with keys
        chunk = cdiv(cdiv(L, min(n, cdiv(L, min_keys))), block_n) * block_n
        used.append(cdiv(L, chunk))
    assert used[0] == 1 and used[1] < n and used[-1] >= n - 1  # short sequences use few splits, a full cache ~all
    if num_splits is None:
        assert used[1] == 1 and used[2] == 3  # 100 keys: one split; 513 keys: three (256 keys at least each)
    for b, u in enumerate(used):
        assert torch.isfinite(lse[b, :, :u]).all() and torch.isfinite(o_part[b, :, :u]).all(), (b, u)
        assert torch.isnan(lse[b, :, u:]).all() and torch.isnan(o_part[b, :, u:]).all(), f"sequence {b}: wrote past {u}"


def test_custom_scale_and_contiguous_cache():
    q, k, v, lengths = _inputs(2, 8, 2, 64, 90, torch.float16, seed=3)
    k, v = k.contiguous(), v.contiguous()  # the (B, S_max, Hkv, D) layout itself
    out = decode_attention(q, k, v, lengths, scale=0.2)
    assert_close(out, _expected(q, k, v, lengths, scale=0.2), torch.float16)


def test_default_splits_need_no_lengths():
    """The split count is a function of shapes and device only (CUDA-graph safe), within [1, MAX_SPLITS]."""
    assert _default_num_splits(1, 8, 8192, torch.device("cpu")) > 1
    assert _default_num_splits(1, 8, 100, torch.device("cpu")) == 1  # one short cache: one split
    assert 1 <= _default_num_splits(64, 8, 131072, DEVICE) <= MAX_SPLITS


@settings(max_examples=8, deadline=None)
@given(
    B=st.integers(1, 3),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3, 4, 8, 16]),
    D=st.sampled_from([64, 128]),
    S_max=st.integers(1, 300),
    num_splits=st.one_of(st.none(), st.integers(1, 12)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(B, Hkv, G, D, S_max, num_splits, dtype, seed):
    q, k, v, lengths = _inputs(B, G * Hkv, Hkv, D, S_max, dtype, seed=seed)
    out = poisoned_like(q)
    decode_attention(q, k, v, lengths, num_splits=num_splits, out=out)
    assert_close(out, _expected(q, k, v, lengths), dtype)


# ---- bad input: one clear ValueError each, and nothing written ----------------------------------------


def _good():
    return _inputs(2, 4, 2, 64, 20, torch.float16, seed=11)


def _shifted(t):
    """A copy of t whose data starts 2 elements past a 16-byte boundary."""
    return torch.empty(t.numel() + 2, dtype=t.dtype, device=t.device)[2:].view(t.shape).copy_(t)


def _padded(t):
    """A copy of t (B, S, H, D) whose head stride is D + 8 elements: not a multiple of 16."""
    B, S, H, D = t.shape
    return torch.zeros(B, S, H, D + 8, dtype=t.dtype, device=t.device)[..., :D].copy_(t)


def _bad_cases():
    q, k, v, n = _good()
    f32 = torch.float32
    return [
        ("q-ndim", lambda: decode_attention(q[0], k, v, n), "q: expected a 3-d tensor"),
        ("q-dtype", lambda: decode_attention(q.double(), k, v, n), "q: expected dtype"),
        ("q-headdim", lambda: decode_attention(q[..., :32], k[..., :32], v[..., :32], n), "q: head dim must be 64"),
        ("q-stride", lambda: decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, n), "q: expe"),
        ("k-ndim", lambda: decode_attention(q, k[0], v, n), "k_cache: expected a 4-d tensor"),
        ("k-dtype", lambda: decode_attention(q, k.to(f32), v, n), "k_cache: expected dtype"),
        ("k-device", lambda: decode_attention(q, k.to("meta"), v, n), "k_cache: expected a tensor on"),
        ("k-stride", lambda: decode_attention(q, k.transpose(1, 3).contiguous().transpose(1, 3), v, n), "k_cache: e"),
        ("k-batch", lambda: decode_attention(q, k[:1], v[:1], n), "k_cache: expected shape"),
        ("k-empty", lambda: decode_attention(q, k[:, :0], v[:, :0], n), "k_cache: expected shape"),
        ("v-shape", lambda: decode_attention(q, k, v[:, :-1], n), "v_cache: expected shape"),
        ("v-dtype", lambda: decode_attention(q, k, v.to(f32), n), "v_cache: expected dtype"),
        ("gqa", lambda: decode_attention(q[:, :3], k, v, n), r"k_cache: kv heads \(2\) must divide"),
        ("q-misaligned", lambda: decode_attention(_shifted(q), k, v, n), "q: expected a 16-byte aligned base"),
        ("v-stride16", lambda: decode_attention(q, k, _padded(v), n), "v_cache: expected a 16-byte aligned"),
        ("gqa-too-wide", lambda: decode_attention(q.repeat(1, 9, 1), k, v, n), "at most 16 query heads"),
        ("len-dtype", lambda: decode_attention(q, k, v, n.float()), "lengths: expected an int32 or int64"),
        ("len-list", lambda: decode_attention(q, k, v, [1, 2]), "lengths: expected an int32 or int64"),
        ("len-shape", lambda: decode_attention(q, k, v, n[:1]), r"lengths: expected shape \(2,\)"),
        ("len-device", lambda: decode_attention(q, k, v, n.to("meta")), r"lengths: expected shape \(2,\)"),
        ("len-zero", lambda: decode_attention(q, k, v, n * 0), r"lengths: expected values in \[1, S_max=20\]"),
        ("len-big", lambda: decode_attention(q, k, v, n * 0 + 21), r"lengths: expected values in \[1, S_max=20\]"),
        ("splits-0", lambda: decode_attention(q, k, v, n, num_splits=0), "num_splits: expected an int in"),
        ("splits-big", lambda: decode_attention(q, k, v, n, num_splits=MAX_SPLITS + 1), "num_splits: expected"),
        ("splits-float", lambda: decode_attention(q, k, v, n, num_splits=2.0), "num_splits: expected an int"),
        ("scale", lambda: decode_attention(q, k, v, n, scale=0.0), "scale: expected a finite float > 0"),
        ("out-shape", lambda: decode_attention(q, k, v, n, out=torch.empty_like(q)[:1]), "out: expected shape"),
        ("out-dtype", lambda: decode_attention(q, k, v, n, out=torch.empty_like(q, dtype=f32)), "out: expected dt"),
        ("out-ndim", lambda: decode_attention(q, k, v, n, out=q[0]), "out: expected a 3-d tensor"),
        ("out-stride", lambda: decode_attention(q, k, v, n, out=q.mT.contiguous().mT), "out: expected a contiguous"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(case):
    _, call, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_lengths_write_nothing():
    q, k, v, n = _good()
    out = poisoned_like(q)
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k, v, n * 0 + 21, out=out)
    assert torch.isnan(out).all()


def test_lengths_anywhere_in_memory():
    """lengths is one scalar load per program: a slice at any offset is fine (not specialised on alignment)."""
    q, k, v, n = _inputs(2, 4, 1, 64, 40, torch.float32, lengths=[40, 3], seed=12)
    shifted = torch.cat([n[:1], n])[1:]  # same values, 1 element past the start of the buffer
    assert_close(decode_attention(q, k, v, shifted), _expected(q, k, v, n), torch.float32)


def test_cpu_tensor_needs_the_interpreter(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("llama3_triton.kernels.decode"), "_INTERPRET", False)
    q, k, v, n = (t.cpu() for t in _good())
    with pytest.raises(ValueError, match="q: expected a CUDA tensor"):
        decode_attention(q, k, v, n)


@pytest.mark.skipif(INTERPRET, reason="GPU-only: CUDA-graph capture needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    """Captured once, replayed with new lengths and new cache contents: no host sync, right answers."""
    q, k, v, lengths = _inputs(2, 32, 8, 128, 512, torch.bfloat16, lengths=[5, 300], seed=6)
    out = torch.empty_like(q)
    decode_attention(q, k, v, lengths, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, lengths, out=out)
    lengths.copy_(torch.tensor([512, 1]))
    k.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _expected(q, k, v, lengths), torch.bfloat16)


def test_compile_variants_are_well_formed():
    """The compile gate's lists: every kernel argument typed, both stages and the one-launch step, every BLOCK_S up
    to MAX_SPLITS."""
    from llama3_triton.kernels import decode, decode_step

    variants = decode.compile_variants() + decode_step.compile_variants()
    assert len({v["name"] for v in variants}) == len(variants) > 0
    for v in variants:
        assert list(v["signature"]) == list(v["fn"].arg_names), v["name"]
        assert all(v["signature"][name] == "constexpr" for name in v["constexprs"]), v["name"]
        assert v["archs"] and set(v["archs"]) <= {80, 90}, v["name"]
    block_s = {v["constexprs"]["BLOCK_S"] for v in variants if "BLOCK_S" in v["constexprs"]}
    assert max(block_s) >= MAX_SPLITS and 1 in block_s


def test_unchecked_lengths_are_clamped_to_the_cache():
    """check_values=False skips the host check (the driver validated the lengths); a length past S_max must
    still read only the cache: the kernel clamps it, giving attention over all S_max keys."""
    q, k, v, _ = _inputs(2, 4, 2, 64, 40, torch.float32, seed=3)
    lengths = torch.tensor([40, 1000], device=DEVICE)
    out = decode_attention(q, k, v, lengths, check_values=False)
    assert_close(out, _expected(q, k, v, torch.tensor([40, 40], device=DEVICE)), torch.float32)
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k, v, lengths)


def test_empty_batch_is_named_as_such(device):
    from llama3_triton.kernels import triton_ops as kernels

    q, cache = torch.randn(0, 2, 64, device=device), torch.randn(0, 8, 1, 64, device=device)
    with pytest.raises(ValueError, match=r"q: expected a batch of at least one sequence \(B >= 1\)"):
        kernels.decode_attention(q, cache, cache, torch.ones(0, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="B >= 1"):
        kernels.attention(torch.randn(0, 3, 2, 64, device=device), cache, cache)
