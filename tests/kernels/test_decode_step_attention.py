"""kernels.decode_step.rope_decode_attention (RoPE, the cache write and split-KV attention in one launch) against
kernels.reference.rope_decode_attention (rope_write_cache, then decode_attention), in fp32 on the same inputs.

q, k, v are slices of one fused qkv row as the model hands them over; positions are ragged (slot 0 and the last
slot of the cache always among them); the split count is varied so that one, some and many splits merge, and
the merge is done by whichever split finishes last, through a counter that must be back at zero afterwards.
"""

from __future__ import annotations

import pytest
import torch

from llama3_triton.kernels import reference
from llama3_triton.kernels.decode import MAX_SPLITS
from llama3_triton.kernels.decode_step import DecodeWorkspace, rope_decode_attention
from tests.tolerances import DTYPES, assert_close, poisoned_like

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(B, Hq, Hkv, D, S_max, dtype, *, positions=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    qkv = randn(B, (Hq + 2 * Hkv) * D)  # one fused projection row per sequence, as the decode step has it
    q = qkv[:, : Hq * D].unflatten(-1, (Hq, D))
    k = qkv[:, Hq * D : (Hq + Hkv) * D].unflatten(-1, (Hkv, D))
    v = qkv[:, (Hq + Hkv) * D :].unflatten(-1, (Hkv, D))
    k_buf, v_buf = randn(B, Hkv, S_max, D), randn(B, Hkv, S_max, D)  # stored (B, Hkv, S, D), as the model does
    if positions is None:
        positions = torch.randint(0, S_max, (B,), generator=g)
        positions[0], positions[-1] = 0, S_max - 1
    inv_freq = reference.rope_inv_freq(D, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192})  # fmt: skip
    cos_sin = reference.rope_table(inv_freq, S_max).to(DEVICE)
    return q, k, v, torch.as_tensor(positions).to(DEVICE), cos_sin, k_buf, v_buf


def _run_both(q, k, v, positions, cos_sin, k_buf, v_buf, ws, **kw):
    """(kernel out, its caches), (reference out, its caches): each on its own copy of the caches."""
    kc, vc = k_buf.clone(), v_buf.clone()
    out = poisoned_like(torch.empty_like(q))
    got = rope_decode_attention(q, k, v, positions, cos_sin, kc.transpose(1, 2), vc.transpose(1, 2), ws, out=out, **kw)
    assert got is out
    kr, vr = k_buf.float(), v_buf.float()
    f = [t.float() for t in (q, k, v)]
    want = reference.rope_decode_attention(*f, positions, cos_sin, kr.transpose(1, 2), vr.transpose(1, 2), None)
    return (got, kc, vc), (want, kr, vr)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [None, 1, 5], ids=["default", "one-split", "5-splits"])
def test_matches_reference(num_splits, G, D, dtype):
    Hkv, S_max, B = 2, 700, 3  # 700 slots: several splits of 256 keys by default, ragged last blocks
    q, k, v, pos, cs, kb, vb = _inputs(B, G * Hkv, Hkv, D, S_max, dtype, seed=G * 100 + D)
    ws = DecodeWorkspace(B, G * Hkv, Hkv, D, DEVICE)
    (got, kc, vc), (want, kr, vr) = _run_both(q, k, v, pos, cs, kb, vb, ws, num_splits=num_splits)
    assert_close(got, want, dtype, "attention output")
    assert_close(kc, kr, dtype, "k cache (the new key rotated into its slot, the rest untouched)")
    assert torch.equal(vc.float(), vr), "v cache: the new value copied into its slot, nothing else changed"
    assert not ws.counters.any(), "the last split must leave its counter at zero for the next launch"


def test_every_position_and_the_splits_that_merge():
    """Every slot of a 600-slot cache as the new token's position with 7 splits: from one split that holds only
    the new key (position 0) to seven that merge; each step's cache writes feed the next."""
    Hq, Hkv, D, S = 4, 2, 64, 600
    q, k, v, _, cs, kb, vb = _inputs(1, Hq, Hkv, D, S, torch.float32, positions=[0], seed=5)
    ws = DecodeWorkspace(1, Hq, Hkv, D, DEVICE)
    for p in list(range(0, 600, 37)) + [599]:
        pos = torch.tensor([p], device=DEVICE)
        (got, kc, vc), (want, kr, vr) = _run_both(q, k, v, pos, cs, kb, vb, ws, num_splits=7)
        assert_close(got, want, torch.float32, f"position {p}")
        assert_close(kc, kr, torch.float32, f"k cache at position {p}")
        assert not ws.counters.any()


def test_a_batch_smaller_than_the_workspace_and_many_splits():
    q, k, v, pos, cs, kb, vb = _inputs(2, 8, 1, 128, 300, torch.float32, seed=9)
    ws = DecodeWorkspace(4, 8, 1, 128, DEVICE)
    (got, kc, _), (want, kr, _) = _run_both(q, k, v, pos, cs, kb, vb, ws, num_splits=MAX_SPLITS)
    assert_close(got, want, torch.float32)
    assert_close(kc, kr, torch.float32)


def test_a_position_past_the_cache_writes_nothing():
    """Positions are trusted (the model checks them once a step); one past the cache must still not write."""
    q, k, v, _, cs, kb, vb = _inputs(1, 2, 2, 64, 64, torch.float32, positions=[0], seed=3)
    kc, vc = kb.clone(), vb.clone()
    ws = DecodeWorkspace(1, 2, 2, 64, DEVICE)
    big = torch.tensor([64], device=DEVICE)
    rope_decode_attention(q, k, v, big, cs, kc.transpose(1, 2), vc.transpose(1, 2), ws)
    assert torch.equal(kc, kb) and torch.equal(vc, vb)
    assert not ws.counters.any()


def _bad_cases():
    q, k, v, pos, cs, kb, vb = _inputs(2, 4, 2, 64, 32, torch.float32, positions=[0, 1])
    kc, vc = kb.transpose(1, 2), vb.transpose(1, 2)
    ws = DecodeWorkspace(2, 4, 2, 64, DEVICE)
    return [
        ("head dim", lambda: rope_decode_attention(q[..., :32], k, v, pos, cs, kc, vc, ws), r"q: expected \(B >= 1"),
        ("k shape", lambda: rope_decode_attention(q, k[:, :1], v, pos, cs, kc, vc, ws), r"k: expected shape"),
        ("k/v strides", lambda: rope_decode_attention(q, k.contiguous(), v, pos, cs, kc, vc, ws), "same strides"),
        ("positions dtype", lambda: rope_decode_attention(q, k, v, pos.float(), cs, kc, vc, ws), "positions: expected"),
        ("short table", lambda: rope_decode_attention(q, k, v, pos, cs[:8], kc, vc, ws), "cos_sin: expected"),
        (
            "workspace",
            lambda: rope_decode_attention(q, k, v, pos, cs, kc, vc, DecodeWorkspace(1, 4, 2, 64, DEVICE)),
            "workspace: expected",
        ),  # fmt: skip
        ("splits", lambda: rope_decode_attention(q, k, v, pos, cs, kc, vc, ws, num_splits=0), "num_splits"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(case):
    _, call, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        call()
