"""kernels.rope against kernels.reference.rope, on fp32 upcasts of the same inputs, with and without the
KV-cache write."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama3_triton.kernels.rope as rope_mod
from llama3_triton.kernels import reference as ref
from llama3_triton.kernels.rope import rope
from tests.tolerances import DTYPES, assert_close, poisoned_like

LLAMA31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _table(D, device, theta=500000.0, scaling=LLAMA31_SCALING, n_positions=8192):
    """The (n_positions, D) cos/sin table of Llama 3.1's scaled frequencies (or ``theta`` unscaled)."""
    return ref.rope_table(ref.rope_inv_freq(D, theta, scaling).to(device), n_positions)


def _fused_qkv(B, T, Hq, Hkv, D, dtype, device, seed):
    """q, k, v as strided views of one (B, T, (Hq + 2 Hkv) D) projection output, as the model makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(device, dtype)
    q = qkv[..., : Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D :].view(B, T, Hkv, D)
    return q, k, v


def _positions(B, T, start_max, device, dtype=torch.int64, seed=0):
    """Each sequence at its own offset: positions[b] = start_b + arange(T)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, start_max + 1, (B, 1), generator=g)
    return (start + torch.arange(T)).to(device, dtype)


# (B, T, Hq, Hkv, D): GQA ratios 1, 4 and 8, head dims 64 and 128, T = 1, 7 and 123, and a D whose half
# is not a power of two.
SHAPES = [(1, 1, 8, 8, 64), (2, 7, 8, 2, 128), (3, 5, 8, 1, 64), (1, 123, 4, 1, 64), (2, 3, 2, 1, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope(shape, dtype, device):
    B, T, Hq, Hkv, D = shape
    q, k, _ = _fused_qkv(B, T, Hq, Hkv, D, dtype, device, seed=1)
    pos = _positions(B, T, 5000, device, seed=2)
    cs = _table(D, device)
    out_q, out_k = poisoned_like(q), poisoned_like(k)
    q_rot, k_rot = rope(q, k, pos, cs, out_q=out_q, out_k=out_k)
    assert q_rot is out_q and k_rot is out_k
    q_ref, k_ref = ref.rope(q.float(), k.float(), pos, cs)
    assert_close(q_rot, q_ref, dtype, "q_rot")
    assert_close(k_rot, k_ref, dtype, "k_rot")


def _rotate_fp64(x, pos, inv_freq):
    """Meta's interleaved-pair rotation computed from scratch in fp64: angle p * f_i, no table."""
    angles = pos.double()[..., None, None] * inv_freq.double()  # (B, T, 1, D/2)
    x0, x1 = x.double().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = angles.cos(), angles.sin()
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_allocating_path_and_long_context(pos_dtype, device):
    """Without out=, new tensors; at positions up to Llama 3.1's 131071, with its scaled frequencies, the result
    equals the rotation computed in fp64 from scratch to fp32 tolerance. Angles reach 1.3e5 rad there: an fp32
    angle p * f (what Meta's code computes) is off by up to 4e-3 rad, which this tolerance rejects."""
    D, n = 128, 131072
    inv_freq = ref.rope_inv_freq(D, 500000.0, LLAMA31_SCALING).to(device)
    cs = ref.rope_table(inv_freq, n)
    q, k, _ = _fused_qkv(2, 4, 4, 2, D, torch.float32, device, seed=3)
    pos = torch.tensor([[0, 1, 8191, 8192], [65535, 100003, 131070, 131071]], device=device, dtype=pos_dtype)
    q_rot, k_rot = rope(q, k, pos, cs)
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
    assert_close(q_rot, _rotate_fp64(q, pos, inv_freq), torch.float32, "q_rot vs fp64")
    assert_close(k_rot, _rotate_fp64(k, pos, inv_freq), torch.float32, "k_rot vs fp64")
    # The check has teeth: angles computed in fp32, as before the table, fail it at these positions.
    fp32_angles = pos.float()[..., None] * inv_freq
    fp32_table = torch.zeros(n, D, device=device)
    fp32_table[pos.long()] = torch.cat((fp32_angles.cos(), fp32_angles.sin()), dim=-1)
    with pytest.raises(AssertionError):
        assert_close(ref.rope(q, k, pos, fp32_table)[0], _rotate_fp64(q, pos, inv_freq), torch.float32, "fp32 angles")


def test_table_is_exact_in_fp64(device):
    """Every row of the table is cos/sin of p * f computed in fp64 and rounded once."""
    inv_freq = ref.rope_inv_freq(64, 500000.0, LLAMA31_SCALING).to(device)
    cs = ref.rope_table(inv_freq, 131072)
    assert cs.shape == (131072, 64) and cs.dtype == torch.float32 and cs.is_contiguous()
    rows = torch.tensor([0, 1, 4097, 131071], device=device)
    angles = rows.double()[:, None] * inv_freq.double()
    assert torch.equal(cs[rows], torch.cat((angles.cos(), angles.sin()), dim=-1).float())
    with pytest.raises(ValueError, match="n_positions"):
        ref.rope_table(inv_freq, 0)


def test_in_place(device):
    q, k, _ = _fused_qkv(2, 4, 4, 1, 64, torch.float16, device, seed=5)
    pos = _positions(2, 4, 100, device, seed=6)
    cs = _table(64, device)
    q_ref, k_ref = ref.rope(q.float(), k.float(), pos, cs)
    q_rot, k_rot = rope(q, k, pos, cs, out_q=q, out_k=k)
    assert q_rot is q and k_rot is k
    assert_close(q, q_ref, torch.float16, "q in place")
    assert_close(k, k_ref, torch.float16, "k in place")


def _check_cache(cache, expected, pos, dtype, what, exact=False):
    """Slots positions[b, t] of cache (B, S, H, D) hold expected[b, t]; every other slot is still poison."""
    B, T = pos.shape
    b_idx = torch.arange(B, device=pos.device)[:, None].expand(B, T)
    written = torch.zeros(cache.shape[:2], dtype=torch.bool, device=cache.device)
    written[b_idx, pos.long()] = True
    assert torch.isnan(cache[~written]).all(), f"{what}: a slot other than positions[b, t] was written"
    got = cache[b_idx, pos.long()]
    if exact:
        assert torch.equal(got, expected), f"{what}: not a bit-exact copy"
    else:
        assert_close(got, expected, dtype, what)


def _caches(B, S_max, Hkv, D, dtype, device, layout):
    """Poisoned k/v caches (B, S_max, Hkv, D) as the model may lay them out, neither one contiguous:
    "kv" interleaves them in one (B, S_max, 2, Hkv, D) buffer; "head_major" stores each as (B, Hkv, S_max, D)."""
    if layout == "kv":
        kv = torch.full((B, S_max, 2, Hkv, D), float("nan"), device=device, dtype=dtype)
        return kv[:, :, 0], kv[:, :, 1]
    k_cache, v_cache = (torch.full((B, Hkv, S_max, D), float("nan"), device=device, dtype=dtype) for _ in "kv")
    return k_cache.transpose(1, 2), v_cache.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [((2, 7, 8, 2, 128), "kv"), ((3, 1, 8, 1, 64), "head_major")])
def test_cache_write(shape, layout, dtype, device):
    """k rotated into k_cache and v copied into v_cache at positions[b, t], one launch. With "head_major", v
    is its own contiguous tensor, so q, k, v, the caches and out_q all have different strides."""
    B, T, Hq, Hkv, D = shape
    q, k, v = _fused_qkv(B, T, Hq, Hkv, D, dtype, device, seed=7)
    if layout == "head_major":
        v = torch.randn(B, T, Hkv, D, device=device).to(dtype)
    S_max = 40
    pos = _positions(B, T, S_max - T, device, torch.int32, seed=8)
    cs = _table(D, device)
    k_cache, v_cache = _caches(B, S_max, Hkv, D, dtype, device, layout)
    out_q = poisoned_like(q)
    q_rot, none = rope(q, k, pos, cs, k_cache=k_cache, v=v, v_cache=v_cache, out_q=out_q)
    assert none is None and q_rot is out_q
    q_ref, k_ref = ref.rope(q.float(), k.float(), pos, cs)
    assert_close(q_rot, q_ref, dtype, "q_rot")
    _check_cache(k_cache, k_ref, pos, dtype, "k_cache")
    _check_cache(v_cache, v, pos, dtype, "v_cache", exact=True)


def test_cache_k_only(device):
    """k_cache without v: only k is written."""
    q, k, _ = _fused_qkv(2, 3, 4, 2, 64, torch.bfloat16, device, seed=9)
    pos = _positions(2, 3, 10, device, seed=10)
    cs = _table(64, device)
    k_cache = torch.full((2, 16, 2, 64), float("nan"), device=device, dtype=torch.bfloat16)
    q_rot, none = rope(q, k, pos, cs, k_cache=k_cache)
    assert none is None
    q_ref, k_ref = ref.rope(q.float(), k.float(), pos, cs)
    assert_close(q_rot, q_ref, torch.bfloat16, "q_rot")
    _check_cache(k_cache, k_ref, pos, torch.bfloat16, "k_cache")


@pytest.mark.parametrize("skip", ["graph-capture", "check_values=False"])
def test_in_kernel_slot_mask(monkeypatch, device, skip):
    """While a CUDA graph is captured, or when the caller says it validated the positions, the host check is
    skipped: the kernel itself must drop writes to slots outside [0, S_max). The caches are views of larger
    poisoned buffers; nothing outside them may change."""
    if skip == "graph-capture":
        monkeypatch.setattr(rope_mod, "capturing", lambda positions: True)
    B, T, Hq, Hkv, D, S_max = 2, 3, 2, 2, 64, 8
    q, k, v = _fused_qkv(B, T, Hq, Hkv, D, torch.float32, device, seed=11)
    pos = torch.tensor([[5, 6, 7], [7, 8, 9]], device=device)  # 8 and 9 are past the end
    cs = _table(D, device)
    k_big = torch.full((B, S_max + 4, Hkv, D), float("nan"), device=device)
    v_big = torch.full((B, S_max + 4, Hkv, D), float("nan"), device=device)
    kw = {"check_values": False} if skip == "check_values=False" else {}
    rope(q, k, pos, cs, k_cache=k_big[:, :S_max], v=v, v_cache=v_big[:, :S_max], **kw)
    assert torch.isnan(k_big[:, S_max:]).all() and torch.isnan(v_big[:, S_max:]).all(), "wrote past S_max"
    _, k_ref = ref.rope(q, k, pos, cs)
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if p < S_max:
                assert_close(k_big[b, p], k_ref[b, t], torch.float32, f"k_cache[{b}, {p}]")
                assert torch.equal(v_big[b, p], v[b, t]), f"v_cache[{b}, {p}]"
    written = {(b, int(p)) for b in range(B) for p in pos[b] if p < S_max}
    for b in range(B):
        for s in range(S_max):
            if (b, s) not in written:
                assert torch.isnan(k_big[b, s]).all() and torch.isnan(v_big[b, s]).all(), f"slot {b}, {s}"


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    Hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    D=st.sampled_from([2, 6, 16, 64]),
    dtype=st.sampled_from(DTYPES),
    cache=st.sampled_from([None, "kv", "head_major"]),
    fused=st.booleans(),
    start_max=st.integers(0, 3000),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(B, T, Hkv, group, D, dtype, cache, fused, start_max, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v = _fused_qkv(B, T, Hkv * group, Hkv, D, dtype, device, seed)
    if not fused:  # separate contiguous tensors: q, k and v strides all differ from one another
        q, k, v = (t.contiguous() for t in (q, k, v))
    pos = _positions(B, T, start_max, device, seed=seed)
    cs = _table(D, device, 10000.0, None, start_max + T)
    q_ref, k_ref = ref.rope(q.float(), k.float(), pos, cs)
    if cache:
        k_cache, v_cache = _caches(B, start_max + T, Hkv, D, dtype, device, cache)
        q_rot, _ = rope(q, k, pos, cs, k_cache=k_cache, v=v, v_cache=v_cache, out_q=poisoned_like(q))
        _check_cache(k_cache, k_ref, pos, dtype, "k_cache")
        _check_cache(v_cache, v, pos, dtype, "v_cache", exact=True)
    else:
        q_rot, k_rot = rope(q, k, pos, cs, out_q=poisoned_like(q), out_k=poisoned_like(k))
        assert_close(k_rot, k_ref, dtype, "k_rot")
    assert_close(q_rot, q_ref, dtype, "q_rot")


# --- bad calls: each a ValueError naming the argument, and nothing written --------------------------------------


def _bad_cases(device):
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 8, 16
    q = torch.randn(B, T, Hq, D, device=device)
    k = torch.randn(B, T, Hkv, D, device=device)
    pos = torch.arange(T, device=device).expand(B, T)
    f = _table(D, device, 10000.0, None, S + 8)  # more rows than cache slots
    kc = torch.zeros(B, S, Hkv, D, device=device)
    meta = torch.empty(B, T, Hq, D, device="meta")
    return [
        ("q type", lambda: rope(None, k, pos, f), "q: expected a torch.Tensor"),
        ("q dtype", lambda: rope(q.double(), k, pos, f), "q: expected dtype"),
        ("q device", lambda: rope(meta, k, pos, f), "q: expected a CUDA tensor"),
        ("q dims", lambda: rope(q[0], k, pos, f), r"q: expected shape \(B, T, Hq >= 1, D\)"),
        ("q odd D", lambda: rope(q[..., :7], k, pos, f), "q: expected shape .* even D"),
        ("q last stride", lambda: rope(q.transpose(2, 3), k, pos, f), "q: expected a contiguous last dim"),
        ("k shape", lambda: rope(q, k[:, :2], pos, f), r"k: expected shape \(B=2, T=3, Hkv, D=8\)"),
        ("k dtype", lambda: rope(q, k.half(), pos, f), "k: expected dtype"),
        ("k device", lambda: rope(q, k.to("meta"), pos, f), "k: expected a tensor on"),
        ("k last stride", lambda: rope(q, k.transpose(2, 3).contiguous().transpose(2, 3), pos, f), "k: expected a con"),
        ("positions dtype", lambda: rope(q, k, pos.float(), f), "positions: expected an int32 or int64"),
        ("positions shape", lambda: rope(q, k, pos[:, :2], f), r"positions: expected shape \(2, 3\)"),
        ("positions device", lambda: rope(q, k, pos.to("meta"), f), "positions: expected shape"),
        ("cos_sin type", lambda: rope(q, k, pos, None), "cos_sin: expected a float32"),
        ("cos_sin dtype", lambda: rope(q, k, pos, f.double()), "cos_sin: expected a float32"),
        ("cos_sin width", lambda: rope(q, k, pos, f[:, :-2]), r"cos_sin: expected a float32 \(S, 8\)"),
        ("cos_sin dims", lambda: rope(q, k, pos, f[0]), r"cos_sin: expected a float32 \(S, 8\)"),
        ("cos_sin empty", lambda: rope(q, k, pos, f[:0]), r"cos_sin: expected a float32 \(S, 8\)"),
        ("cos_sin stride", lambda: rope(q, k, pos, f[::2]), "cos_sin: expected a contiguous"),
        ("cos_sin device", lambda: rope(q, k, pos, f.to("meta")), "cos_sin: expected a contiguous tensor on"),
        ("positions >= rows", lambda: rope(q, k, pos, f[:2]), r"positions: expected values in \[0, 2\)"),
        ("out_q shape", lambda: rope(q, k, pos, f, out_q=k), "out_q: expected shape"),
        ("out_q dtype", lambda: rope(q, k, pos, f, out_q=q.half()), "out_q: expected dtype"),
        ("out_k shape", lambda: rope(q, k, pos, f, out_k=q), "out_k: expected shape"),
        ("out_k with cache", lambda: rope(q, k, pos, f, k_cache=kc, out_k=k), "out_k: not used with k_cache"),
        ("v without cache", lambda: rope(q, k, pos, f, v=k, v_cache=kc), "v, v_cache: only used with k_cache"),
        ("k_cache shape", lambda: rope(q, k, pos, f, k_cache=kc[:, :, :1]), r"k_cache: expected shape \(B=2, S_max"),
        ("k_cache dtype", lambda: rope(q, k, pos, f, k_cache=kc.half()), "k_cache: expected dtype"),
        ("k_cache stride", lambda: rope(q, k, pos, f, k_cache=kc.transpose(2, 3)), "k_cache: expected"),
        ("v_cache missing", lambda: rope(q, k, pos, f, k_cache=kc, v=k), "v_cache: v and v_cache go together"),
        ("v missing", lambda: rope(q, k, pos, f, k_cache=kc, v_cache=kc), "v: v and v_cache go together"),
        ("v shape", lambda: rope(q, k, pos, f, k_cache=kc, v=q, v_cache=kc), "v: expected shape"),
        ("v_cache shape", lambda: rope(q, k, pos, f, k_cache=kc, v=k, v_cache=kc[:, :4]), "v_cache: expected shape"),
        ("positions >= S_max", lambda: rope(q, k, pos + 14, f, k_cache=kc), r"positions: expected cache slots in \[0"),
        ("positions < 0", lambda: rope(q, k, pos - 1, f, k_cache=kc), r"positions: expected cache slots in \[0"),
    ]


@pytest.mark.parametrize("case", [name for name, _, _ in _bad_cases(torch.device("cpu"))])
def test_bad_arguments(case, device):
    _, call, match = next(c for c in _bad_cases(device) if c[0] == case)
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_call_writes_nothing(device):
    """A position past the cache fails before the launch: out_q, k_cache and v_cache keep their poison."""
    q, k, v = _fused_qkv(1, 2, 2, 1, 8, torch.float32, device, seed=12)
    k_cache = torch.full((1, 4, 1, 8), float("nan"), device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    out_q = poisoned_like(q)
    pos = torch.tensor([[3, 4]], device=device)
    with pytest.raises(ValueError, match="positions: expected cache slots"):
        rope(q, k, pos, _table(8, device, 10000.0, None), k_cache=k_cache, v=v, v_cache=v_cache, out_q=out_q)
    assert torch.isnan(out_q).all() and torch.isnan(k_cache).all() and torch.isnan(v_cache).all()
