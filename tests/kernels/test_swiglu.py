"""kernels.swiglu against kernels.reference.swiglu, on fp32 upcasts of the same inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_triton.kernels import reference as ref
from llama3_triton.kernels.swiglu import _BLOCK, swiglu
from tests.tolerances import DTYPES, assert_close, poisoned_like

# (rows..., F): tiny, odd, F not a multiple of the block, F spanning several blocks, 3-D leading dims.
SHAPES = [(1, 1), (7, 123), (123, 200), (2, 3, 2 * _BLOCK + 7), (1, 4097)]


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    # scaled so the gate spans silu's negative dip, its linear part and exp(-g) overflow territory
    gate = (4 * torch.randn(shape, generator=g)).to(device, dtype)
    up = torch.randn(shape, generator=g).to(device, dtype)
    return gate, up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu(shape, dtype, device):
    gate, up = _inputs(shape, dtype, device, seed=1)
    out = poisoned_like(gate)
    y = swiglu(gate, up, out=out)
    assert y is out
    assert_close(y, ref.swiglu(gate.float(), up.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_w1_w3_halves(dtype, device):
    """gate and up as the two halves of one (B, T, 2F) product: row stride 2F, no copy; out a strided view too."""
    B, T, F = 2, 5, 300
    g = torch.Generator().manual_seed(2)
    h13 = torch.randn(B, T, 2 * F, generator=g).to(device, dtype)
    gate, up = h13[..., :F], h13[..., F:]
    out_wide = torch.full((B, T, 2 * F), float("nan"), device=device, dtype=dtype)
    y = swiglu(gate, up, out=out_wide[..., F:])
    assert_close(y, ref.swiglu(gate.float(), up.float()), dtype)
    assert torch.isnan(out_wide[..., :F]).all(), "wrote outside the out view"
    y2 = swiglu(gate, up)  # allocating path
    assert y2.is_contiguous() and y2.shape == (B, T, F)
    assert torch.equal(y2, y)
    up_own = torch.randn(B, T, F, generator=g).to(device, dtype)  # a row stride of F against gate's 2F
    assert_close(swiglu(gate, up_own), ref.swiglu(gate.float(), up_own.float()), dtype, "mixed row strides")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
def test_extremes(device):
    """exp(-g) overflows for g < -88: silu -> -0, not NaN; large g: silu(g) -> g."""
    gate = torch.tensor([[-1000.0, -100.0, -88.0, 0.0, 88.0, 1000.0]], device=device)
    up = torch.full_like(gate, 2.0)
    assert_close(swiglu(gate, up), ref.swiglu(gate, up), torch.float32)


def test_in_place(device):
    gate, up = _inputs((3, 70), torch.float16, device, seed=3)
    expected = ref.swiglu(gate.float(), up.float())
    y = swiglu(gate, up, out=gate)
    assert y is gate
    assert_close(gate, expected, torch.float16, "out=gate")


def test_empty_rows(device):
    gate = torch.randn(0, 16, device=device)
    assert swiglu(gate, gate).shape == (0, 16)


def test_tolerance_can_fail(device):
    """The shared tolerance sees silu(g) * u confused with sigmoid(g) * u or silu(u) * g."""
    gate, up = _inputs((4, 64), torch.float32, device, seed=4)
    with pytest.raises(AssertionError):
        assert_close(swiglu(gate, up), torch.sigmoid(gate) * up, torch.float32)
    with pytest.raises(AssertionError):
        assert_close(swiglu(gate, up), ref.swiglu(up, gate), torch.float32)


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    F=st.integers(1, 1500),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "fused", "gate_fused_up_own"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(lead, F, dtype, layout, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gate, up = _inputs((*lead, F), dtype, device, seed)
    if layout != "contiguous":
        both, _ = _inputs((*lead, 2 * F), dtype, device, seed + 1)
        gate = both[..., :F]
        up = both[..., F:] if layout == "fused" else up
    assert_close(swiglu(gate, up, out=poisoned_like(gate)), ref.swiglu(gate.float(), up.float()), dtype)


# --- bad calls: each a ValueError naming the argument, and nothing written --------------------------------------


def _bad_cases(device):
    g = torch.randn(3, 8, device=device)
    meta = torch.empty(3, 8, device="meta")
    return [
        ("gate type", lambda: swiglu([1.0], g), "gate: expected a torch.Tensor"),
        ("gate dtype", lambda: swiglu(g.double(), g.double()), "gate: expected dtype"),
        ("gate int", lambda: swiglu(g.int(), g.int()), "gate: expected dtype"),
        ("gate device", lambda: swiglu(meta, meta), "gate: expected a CUDA tensor"),
        ("gate 0-dim", lambda: swiglu(g[0, 0], g[0, 0]), r"gate: expected shape \(\.\.\., F\)"),
        ("gate F=0", lambda: swiglu(g[:, :0], g[:, :0]), r"gate: expected shape \(\.\.\., F\) with F >= 1"),
        ("gate last stride", lambda: swiglu(g.t(), g.t()), "gate: expected a contiguous last dim"),
        ("gate rows", lambda: swiglu(*[torch.randn(4, 3, 8, device=device).transpose(0, 1)] * 2), "gate: expected lea"),
        ("up type", lambda: swiglu(g, None), "up: expected a torch.Tensor"),
        ("up shape", lambda: swiglu(g, g[:2]), r"up: expected shape \(3, 8\)"),
        ("up dtype", lambda: swiglu(g, g.half()), "up: expected dtype torch.float32"),
        ("up device", lambda: swiglu(g, meta), "up: expected a tensor on"),
        ("up last stride", lambda: swiglu(g[:, :3], torch.randn(3, 6, device=device)[:, ::2]), "up: expected a cont"),
        ("out shape", lambda: swiglu(g, g, out=g[:, :4]), "out: expected shape"),
        ("out dtype", lambda: swiglu(g, g, out=g.bfloat16()), "out: expected dtype"),
        ("out device", lambda: swiglu(g, g, out=meta), "out: expected a tensor on"),
        ("out overlap", lambda: swiglu(g, g, out=torch.empty(1, 8, device=device).expand(3, 8)), "out: output rows"),
    ]


@pytest.mark.parametrize("case", [name for name, _, _ in _bad_cases(torch.device("cpu"))])
def test_bad_arguments(case, device):
    _, call, match = next(c for c in _bad_cases(device) if c[0] == case)
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_call_writes_nothing(device):
    gate, up = _inputs((3, 8), torch.float32, device, seed=5)
    out = poisoned_like(gate)
    with pytest.raises(ValueError, match="up: expected dtype"):
        swiglu(gate, up.half(), out=out)
    assert torch.isnan(out).all()
