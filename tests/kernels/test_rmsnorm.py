"""kernels.rms_norm and kernels.add_rms_norm against kernels.reference, on fp32 upcasts of the same inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_triton.kernels import reference as ref
from llama3_triton.kernels.rmsnorm import _MAX_ONE_PASS, add_rms_norm, rms_norm
from tests.tolerances import DTYPES, INTERPRET, TOLERANCES, assert_close, poisoned_like

# (rows..., D): tiny, odd, non-power-of-two D, a Llama dim, and one row longer than a register block
# (the two-pass loop path).
SHAPES = [(1, 123), (7, 200), (123, 64), (2, 3, 4096), (1, 4097), (3, _MAX_ONE_PASS + 123)]


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device, dtype)
    res = torch.randn(shape, generator=g).to(device, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    return x, res, w


def _check_h(h: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """h = residual + x rounded once: bit-exact, except bf16 in the interpreter, whose fp32 -> bf16 cast
    truncates instead of rounding to nearest even (triton 3.9 interpreter `_convert_float`), one ulp."""
    if dtype == torch.bfloat16 and INTERPRET:
        assert_close(h, expected, dtype, "h")
    else:
        assert torch.equal(h, expected), "h: not bit-exact residual + x"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype, device):
    x, _, w = _inputs(shape, dtype, device, seed=1)
    out = poisoned_like(x)
    y = rms_norm(x, w, 1e-5, out=out)
    assert y is out
    assert_close(y, ref.rms_norm(x.float(), w.float(), 1e-5), dtype)
    assert_close(rms_norm(x, w, 1e-5), y, dtype, "without out=")  # the allocating path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm(shape, dtype, device):
    x, res, w = _inputs(shape, dtype, device, seed=2)
    out, h_out = poisoned_like(x), poisoned_like(x)
    y, h = add_rms_norm(x, res, w, 1e-6, out=out, residual_out=h_out)
    assert y is out and h is h_out
    _, h_ref = ref.add_rms_norm(x, res, w, 1e-6)  # h rounded to the input dtype, as the model stores it
    _check_h(h, h_ref, dtype)
    assert_close(y, ref.rms_norm(h_ref.float(), w.float(), 1e-6), dtype)
    # Fused == unfused, bit for bit: the norm is computed on the rounded h, with the same reduction.
    assert torch.equal(y, rms_norm(h, w, 1e-6))


@pytest.mark.parametrize("D", [200, _MAX_ONE_PASS + 5])
def test_in_place(D, device):
    """out=x and residual_out=residual (the residual stream updated in place), both code paths."""
    dtype = torch.float16
    x, res, w = _inputs((5, D), dtype, device, seed=3)
    y_ref, h_ref = ref.add_rms_norm(x, res, w)
    y, h = add_rms_norm(x, res, w, out=x, residual_out=res)
    assert y is x and h is res
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, dtype)
    x2 = torch.randn(5, D, device=device).to(dtype)
    expected = ref.rms_norm(x2, w)
    assert_close(rms_norm(x2, w, out=x2), expected, dtype, "rms_norm in place")


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype, device):
    """Inputs and outputs that are column slices of wider tensors, each with its own row stride (3D, D, 2D, 4D)."""
    B, T, D = 2, 5, 96
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, 3 * D, generator=g).to(device, dtype)[..., D : 2 * D]
    res = torch.randn(B, T, D, generator=g).to(device, dtype)
    w = torch.randn(D, generator=g).to(device, dtype)
    out_wide = torch.full((B, T, 2 * D), float("nan"), device=device, dtype=dtype)
    h_wide = torch.full((B, T, 4 * D), float("nan"), device=device, dtype=dtype)
    y, h = add_rms_norm(x, res, w, out=out_wide[..., D:], residual_out=h_wide[..., D : 2 * D])
    _, h_ref = ref.add_rms_norm(x, res, w)
    _check_h(h, h_ref, dtype)
    assert_close(y, ref.rms_norm(h_ref.float(), w.float()), dtype)
    assert torch.isnan(out_wide[..., :D]).all(), "wrote outside the out view"
    assert torch.isnan(h_wide[..., :D]).all() and torch.isnan(h_wide[..., 2 * D :]).all(), "wrote outside h"
    assert_close(rms_norm(x, w), ref.rms_norm(x.float(), w.float()), dtype, "strided rms_norm")


def test_empty_rows(device):
    x = torch.randn(0, 64, device=device)
    w = torch.randn(64, device=device)
    assert rms_norm(x, w).shape == (0, 64)
    y, h = add_rms_norm(x, x, w)
    assert y.shape == h.shape == (0, 64)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 9),
    D=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    fused=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(rows, D, dtype, fused, eps, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, res, w = _inputs((rows, D), dtype, device, seed)
    if fused:
        y, h = add_rms_norm(x, res, w, eps, out=poisoned_like(x), residual_out=poisoned_like(x))
        _, h_ref = ref.add_rms_norm(x, res, w, eps)
        _check_h(h, h_ref, dtype)
        assert_close(y, ref.rms_norm(h_ref.float(), w.float(), eps), dtype)
    else:
        assert_close(rms_norm(x, w, eps, out=poisoned_like(x)), ref.rms_norm(x.float(), w.float(), eps), dtype)


def test_tolerance_can_fail(device):
    """The shared tolerance is tight enough to see a wrong eps or a dropped weight."""
    x, _, w = _inputs((4, 64), torch.float32, device, seed=5)
    with pytest.raises(AssertionError):
        assert_close(rms_norm(x, w, 1e-1), ref.rms_norm(x, w, 1e-5), torch.float32)
    with pytest.raises(AssertionError):
        assert_close(rms_norm(x, w), ref.rms_norm(x, torch.ones_like(w)), torch.float32)
    assert TOLERANCES[torch.float32]["rtol"] < 1e-4


# --- bad calls: each a ValueError naming the argument, and nothing written --------------------------------------


def _bad_cases(device):
    D = 64
    x = torch.randn(3, D, device=device)
    w = torch.randn(D, device=device)
    meta = torch.empty(3, D, device="meta")
    return [
        ("x", lambda: rms_norm(x.numpy() if device.type == "cpu" else x.cpu(), w), "x: expected"),
        ("x dtype", lambda: rms_norm(x.double(), w), "x: expected dtype"),
        ("x int", lambda: rms_norm(x.int(), w), "x: expected dtype"),
        ("x device", lambda: rms_norm(meta, w), "x: expected a CUDA tensor"),
        ("x D=0", lambda: rms_norm(torch.randn(3, 0, device=device), w), r"x: expected shape \(\.\.\., D\)"),
        ("x 0-dim", lambda: rms_norm(torch.tensor(1.0, device=device), w), r"x: expected shape"),
        ("x last stride", lambda: rms_norm(torch.randn(D, 3, device=device).t(), w), "x: expected a contiguous last"),
        ("x rows", lambda: rms_norm(torch.randn(4, 3, D, device=device).transpose(0, 1), w), "x: expected leading"),
        ("weight shape", lambda: rms_norm(x, w[:-1]), r"weight: expected a contiguous \(64,\)"),
        ("weight dtype", lambda: rms_norm(x, w.half()), "weight: expected"),
        ("weight stride", lambda: rms_norm(x, torch.randn(2 * D, device=device)[::2]), "weight: expected"),
        ("weight device", lambda: rms_norm(x, w.to("meta")), "weight: expected a tensor on"),
        ("weight type", lambda: rms_norm(x, None), "weight: expected a torch.Tensor"),
        ("eps negative", lambda: rms_norm(x, w, -1.0), "eps: expected"),
        ("eps nan", lambda: rms_norm(x, w, float("nan")), "eps: expected"),
        ("eps type", lambda: rms_norm(x, w, "1e-5"), "eps: expected"),
        ("out shape", lambda: rms_norm(x, w, out=torch.empty(3, D + 1, device=device)), "out: expected shape"),
        ("out dtype", lambda: rms_norm(x, w, out=torch.empty(3, D, device=device).half()), "out: expected dtype"),
        ("out device", lambda: rms_norm(x, w, out=meta), "out: expected a tensor on"),
        ("out overlap", lambda: rms_norm(x, w, out=torch.empty(1, D, device=device).expand(3, D)), "out: output rows"),
        ("residual none", lambda: add_rms_norm(x, None, w), "residual: expected a torch.Tensor"),
        ("residual shape", lambda: add_rms_norm(x, x[:2], w), "residual: expected shape"),
        ("residual dtype", lambda: add_rms_norm(x, x.half(), w), "residual: expected dtype"),
        ("residual_out shape", lambda: add_rms_norm(x, x, w, residual_out=x[:1]), "residual_out: expected shape"),
    ]


@pytest.mark.parametrize("case", [name for name, _, _ in _bad_cases(torch.device("cpu"))])
def test_bad_arguments(case, device):
    _, call, match = next(c for c in _bad_cases(device) if c[0] == case)
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_call_writes_nothing(device):
    """Every argument is checked before the launch: a valid out= stays poisoned when residual_out is bad,
    and out and residual_out may not be the same memory."""
    x, res, w = _inputs((3, 64), torch.float32, device, seed=6)
    out = poisoned_like(x)
    with pytest.raises(ValueError, match="residual_out: expected dtype"):
        add_rms_norm(x, res, w, out=out, residual_out=torch.empty_like(x).half())
    with pytest.raises(ValueError, match="residual_out: must not be the same memory as out"):
        add_rms_norm(x, res, w, out=out, residual_out=out)
    assert torch.isnan(out).all()
