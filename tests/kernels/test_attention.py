"""kernels.attention (causal flash attention for prefill) against kernels.reference.attention.

The reference runs in fp32 on upcasts of the very inputs the kernel gets; the kernel's output (in the input
dtype) must match within the shared tolerance of that dtype. K/V are strided views of a (B, Hkv, S_max, D)
cache, as the model passes them; q is sometimes a slice of a fused qkv projection.

bf16 under the interpreter: Triton's interpreter computes bf16 arithmetic and ``tl.dot`` on the raw 16-bit
patterns. The launcher therefore sets the kernel's ``DOT_FP32`` flag when ``TRITON_INTERPRET=1`` and the
dtype is bf16: the dot operands are upcast to fp32 right after the load, so the bf16 tests run for real on a
CPU. The GPU path keeps bf16 tensor-core dots, with P rounded to bf16 before P @ V; that rounding is only
exercised on a GPU (the interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_triton.kernels import reference
from llama3_triton.kernels.attention import attention
from tests.tolerances import DTYPES, INTERPRET, assert_close, poisoned_like

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(B, T, Hq, Hkv, D, dtype, *, start_pos=0, extra=0, fused=False, seed=0):
    """q (B, T, Hq, D) and k, v (B, S, Hkv, D) views of a (B, Hkv, S, D) cache, S = start_pos + T + extra."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = start_pos + T + extra

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    if fused:  # q as the first Hq heads of a fused (B, T, Hq + 2 Hkv, D) projection: strided tokens
        q = randn(B, T, Hq + 2 * Hkv, D)[:, :, :Hq]
    else:
        q = randn(B, T, Hq, D)
    k = randn(B, Hkv, S, D).transpose(1, 2)
    v = randn(B, Hkv, S, D).transpose(1, 2)
    return q, k, v


def _expected(q, k, v, start_pos=0, scale=None):
    return reference.attention(q.float(), k.float(), v.float(), start_pos=start_pos, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("T", [1, 7, 123])
def test_matches_reference(T, G, D, dtype):
    Hkv = 2
    q, k, v = _inputs(2, T, G * Hkv, Hkv, D, dtype, seed=T * 100 + G * 10 + D)
    assert_close(attention(q, k, v), _expected(q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,start_pos,G", [(1, 77, 8), (7, 50, 4), (200, 37, 1)])
def test_cache_offset_fused_q(T, start_pos, G, dtype):
    """Chunked prefill after a cache: queries at start_pos.., a longer cache view, q strided in a fused qkv.

    T = 200 with G = 1 spans more than one query tile in every config (BLOCK_M <= 128) and is a multiple of
    none of them, so the ragged last tile and the diagonal key blocks are both exercised.
    """
    Hkv, D = 2, 64
    q, k, v = _inputs(1, T, G * Hkv, Hkv, D, dtype, start_pos=start_pos, extra=9, fused=True, seed=T)
    assert q.stride(1) == (G + 2) * Hkv * D  # really strided
    assert_close(attention(q, k, v, start_pos=start_pos), _expected(q, k, v, start_pos), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_strided_out_fully_written(dtype):
    """out= is a strided view into a NaN buffer: every element of the view written, nothing outside it."""
    B, T, Hq, Hkv, D = 2, 37, 8, 2, 128
    q, k, v = _inputs(B, T, Hq, Hkv, D, dtype, start_pos=5, extra=3, seed=7)
    buf = poisoned_like(torch.empty(B, T, Hq, 2 * D, dtype=dtype, device=DEVICE))
    out = buf[..., D:]
    ret = attention(q, k, v, start_pos=5, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert_close(out, _expected(q, k, v, 5), dtype)
    assert torch.isnan(buf[..., :D]).all(), "wrote outside the out= view"


def test_custom_scale():
    q, k, v = _inputs(1, 19, 4, 1, 64, torch.float32, seed=3)
    assert_close(attention(q, k, v, scale=0.3), _expected(q, k, v, scale=0.3), torch.float32)


def test_contiguous_bshd_cache():
    """k/v in the (B, S, Hkv, D) layout, contiguous, also work (not only transposed views)."""
    q, k, v = _inputs(2, 9, 8, 2, 64, torch.float16, seed=4)
    k, v = k.contiguous(), v.contiguous()
    assert_close(attention(q, k, v), _expected(q, k, v), torch.float16)


@settings(max_examples=8, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3, 4, 8]),
    D=st.sampled_from([64, 128]),
    start_pos=st.integers(0, 40),
    extra=st.integers(0, 5),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(B, T, Hkv, G, D, start_pos, extra, dtype, seed):
    q, k, v = _inputs(B, T, G * Hkv, Hkv, D, dtype, start_pos=start_pos, extra=extra, seed=seed)
    out = poisoned_like(q)
    attention(q, k, v, start_pos=start_pos, out=out)
    assert_close(out, _expected(q, k, v, start_pos), dtype)


# ---- bad input: one clear ValueError each, and nothing written ----------------------------------------


def _good():
    return _inputs(1, 4, 4, 2, 64, torch.float16, start_pos=2, seed=11)


def _shifted(t):
    """A copy of t whose data starts 2 elements past a 16-byte boundary."""
    return torch.empty(t.numel() + 2, dtype=t.dtype, device=t.device)[2:].view(t.shape).copy_(t)


def _padded(t):
    """A copy of t (B, S, H, D) whose head stride is D + 8 elements: not a multiple of 16."""
    B, S, H, D = t.shape
    return torch.zeros(B, S, H, D + 8, dtype=t.dtype, device=t.device)[..., :D].copy_(t)


def _bad_cases():
    q, k, v = _good()
    other = torch.float32
    return [
        ("q-ndim", lambda: attention(q[0], k, v), "q: expected a 4-d tensor"),
        ("q-empty", lambda: attention(q[:, :0], k, v), "q: expected B >= 1 and T >= 1"),
        ("q-dtype", lambda: attention(q.double(), k, v), "q: expected dtype"),
        ("q-headdim", lambda: attention(q[..., :32], k[..., :32], v[..., :32]), "q: head dim must be 64 or 128"),
        ("q-stride", lambda: attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v), "q: expected a cont"),
        ("k-ndim", lambda: attention(q, k[0], v), "k: expected a 4-d tensor"),
        ("v-type", lambda: attention(q, k, None), "v: expected a 4-d tensor"),
        ("k-dtype", lambda: attention(q, k.to(other), v), "k: expected dtype"),
        ("v-dtype", lambda: attention(q, k, v.to(other)), "v: expected dtype"),
        ("k-batch", lambda: attention(q, k.expand(2, -1, -1, -1), v), "k: expected shape"),
        ("v-shape", lambda: attention(q, k, v[:, :-1]), "v: expected shape"),
        ("k-device", lambda: attention(q, k.to("meta"), v), "k: expected a tensor on"),
        ("k-stride", lambda: attention(q, k.transpose(1, 3).contiguous().transpose(1, 3), v), "k: expected a cont"),
        ("gqa", lambda: attention(q[:, :, :3], k, v), r"k: kv heads \(2\) must divide the query heads \(3\)"),
        ("q-misaligned", lambda: attention(_shifted(q), k, v), "q: expected a 16-byte aligned base"),
        ("k-stride16", lambda: attention(q, _padded(k), v), "k: expected a 16-byte aligned base and strides"),
        ("out-misaligned", lambda: attention(q, k, v, out=_shifted(q)), "out: expected a 16-byte aligned"),
        ("start_pos-neg", lambda: attention(q, k, v, start_pos=-1), "start_pos: expected an int >= 0"),
        ("start_pos-float", lambda: attention(q, k, v, start_pos=1.0), "start_pos: expected an int >= 0"),
        ("start_pos-range", lambda: attention(q, k, v, start_pos=3), "start_pos: start_pos \\+ T = 7 exceeds"),
        ("scale", lambda: attention(q, k, v, scale=-1.0), "scale: expected a finite float > 0"),
        ("scale-nan", lambda: attention(q, k, v, scale=math.nan), "scale: expected a finite float > 0"),
        ("grid", lambda: attention(*(t[:1].expand(65536, -1, -1, -1) for t in (q, k, v))), "k: expected batch"),
        ("out-type", lambda: attention(q, k, v, out=q.tolist()), "out: expected a torch.Tensor"),
        ("out-shape", lambda: attention(q, k, v, out=torch.empty_like(q)[:, :-1]), "out: expected shape"),
        ("out-dtype", lambda: attention(q, k, v, out=torch.empty_like(q, dtype=other)), "out: expected dtype"),
        ("out-stride", lambda: attention(q, k, v, out=q.transpose(2, 3).contiguous().transpose(2, 3)), "out: exp"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(case):
    _, call, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_input_writes_nothing():
    q, k, v = _good()
    out = poisoned_like(q)
    with pytest.raises(ValueError, match="start_pos"):
        attention(q, k, v, start_pos=10, out=out)
    assert torch.isnan(out).all()


def test_cpu_tensor_needs_the_interpreter(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("llama3_triton.kernels.attention"), "_INTERPRET", False)
    q, k, v = (t.cpu() for t in _good())
    with pytest.raises(ValueError, match="q: expected a CUDA tensor"):
        attention(q, k, v)


@pytest.mark.skipif(INTERPRET, reason="GPU-only: the autotuner benchmarks configs on a real device")
def test_autotuned_long_prefill():
    """A prefill long enough for the 128-row tiles, bf16, Llama-3-8B head layout."""
    q, k, v = _inputs(1, 1000, 32, 8, 128, torch.bfloat16, start_pos=24, extra=0, seed=5)
    assert_close(attention(q, k, v, start_pos=24), _expected(q, k, v, 24), torch.bfloat16)


def test_compile_variants_are_well_formed():
    """The compile gate's list: every kernel argument typed, each config on at least one arch, no duplicates."""
    from llama3_triton.kernels.attention import compile_variants

    variants = compile_variants()
    assert len({v["name"] for v in variants}) == len(variants) > 0
    for v in variants:
        assert list(v["signature"]) == list(v["fn"].arg_names), v["name"]
        assert all(v["signature"][name] == "constexpr" for name in v["constexprs"]), v["name"]
        assert v["archs"] and set(v["archs"]) <= {80, 90}, v["name"]
        assert {"num_warps", "num_stages", "attrs"} <= set(v), v["name"]
