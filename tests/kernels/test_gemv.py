"""kernels.gemv.linear against kernels.reference.linear: every fusion, odd sizes, M from 1 to past one tile."""

from __future__ import annotations

import pytest
import torch

from llama3_triton.kernels import gemv
from llama3_triton.kernels import reference as ref
from llama3_triton.kernels.gemv import GemvWorkspace, linear, plan_split_k
from tests.tolerances import DTYPES, assert_close, poisoned_like

FUSIONS = ["plain", "norm", "add", "swiglu", "norm_swiglu", "norm_add"]


def _inputs(M, N, K, dtype, device, fusion, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 2).to(device, dtype)  # rows far from unit RMS: the norm matters
    w = (torch.randn(2 * N if "swiglu" in fusion else N, K, generator=g) * K**-0.5).to(device, dtype)
    res = torch.randn(M, N, generator=g).to(device, dtype) if "add" in fusion else None
    gamma = (1 + 0.5 * torch.randn(K, generator=g)).to(device, dtype) if "norm" in fusion else None
    kw = {"rms_weight": gamma, "eps": 1e-5, "residual": res, "swiglu": "swiglu" in fusion}
    return x, w, kw


# (M, N, K): M = 1 (batch-1 decode), 3, 8, 17 (two row tiles); N not a multiple of the block; K odd, and longer
# than one 256-wide chunk.
SHAPES = [(1, 16, 64), (1, 100, 300), (3, 40, 123), (8, 64, 512), (17, 24, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_reference(shape, fusion, dtype, device):
    M, N, K = shape
    x, w, kw = _inputs(M, N, K, dtype, device, fusion, seed=M * 1000 + K)
    out = poisoned_like(torch.empty(M, N, dtype=dtype, device=device))
    got = linear(x, w, out=out, **kw)
    assert got is out and not torch.isnan(out).any(), "an output element was not written"
    expected = ref.linear(x.float(), w.float(), **{k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()})
    assert_close(got, expected, dtype, f"linear {fusion} {shape}")


def test_leading_dims_and_a_strided_row_view(device):
    """x (B, T, K) as the model holds activations, and x a column slice of a wider buffer (row stride > K)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 3, 200, generator=g).to(device)
    x = wide[..., :96]
    w = torch.randn(48, 96, generator=g).to(device) / 10
    assert_close(linear(x, w), ref.linear(x, w), torch.float32, "strided x")
    assert linear(x, w).shape == (2, 3, 48)


def test_output_head_sized_block(device):
    """N past 16384 takes the wide 64-column block (the output head's); a short K keeps it quick."""
    x, w, kw = _inputs(1, 16400, 32, torch.float32, device, "norm")
    assert_close(linear(x, w, **kw), ref.linear(x, w, **kw), torch.float32, "wide N")


def _bad_cases(device):
    x = torch.randn(2, 8, device=device)
    w = torch.randn(4, 8, device=device)
    return [
        ("x type", lambda: linear(None, w), "x: expected a torch.Tensor"),
        ("x dtype", lambda: linear(x.double(), w), "x: expected dtype"),
        ("x device", lambda: linear(x.to("meta"), w), "x: expected a CUDA tensor"),
        ("w dims", lambda: linear(x, w[0]), "weight: expected a 2-d tensor"),
        ("w K", lambda: linear(x, w[:, :4].contiguous()), r"weight: expected a contiguous \(N, 8\)"),
        ("w strided", lambda: linear(x, torch.randn(8, 4, device=device).T), "weight: expected a contiguous"),
        ("w dtype", lambda: linear(x, w.half()), "weight: expected dtype"),
        ("swiglu odd", lambda: linear(x, w[:3], swiglu=True), "weight: swiglu needs an even number"),
        ("swiglu + add", lambda: linear(x, w, swiglu=True, residual=x[:, :2]), "residual: not supported"),
        ("residual shape", lambda: linear(x, w, residual=x), r"residual: expected shape \(2, 4\)"),
        ("eps", lambda: linear(x, w, rms_weight=x[0], eps=-1.0), "eps: expected a float >= 0"),
        ("gamma shape", lambda: linear(x, w, rms_weight=x[:, :4]), r"rms_weight: expected shape \(8,\)"),
        ("out shape", lambda: linear(x, w, out=x), r"out: expected shape \(2, 4\)"),
        (
            "out dtype",
            lambda: linear(x.half(), w.half(), out=x[:, :4].double()),
            "out: expected dtype float16, float32, got",
        ),
    ]


@pytest.mark.parametrize("case", [name for name, _, _ in _bad_cases(torch.device("cpu"))])
def test_bad_arguments(case, device):
    _, call, match = next(c for c in _bad_cases(device) if c[0] == case)
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_output_from_half_inputs(dtype, device):
    """The output head writes fp32 logits straight from the fp32 accumulator (no bf16 rounding, no cast launch)."""
    x, w, kw = _inputs(2, 200, 96, dtype, device, "norm", seed=4)
    out = poisoned_like(torch.empty(2, 200, dtype=torch.float32, device=device))
    got = linear(x, w, out=out, **kw)
    assert got is out and not torch.isnan(out).any()
    expected = ref.linear(x.float(), w.float(), rms_weight=kw["rms_weight"].float())
    assert_close(got, expected, dtype, "fp32 out")


# ---- split-K: several programs share an output tile's K, the last to finish merges (one launch) ----------------

# (M, N, K, split_k): 2 and 3 splits, and more splits asked than K has chunks (K = 300: 5 of 64)
SPLIT_SHAPES = [(1, 40, 1000, 2), (3, 24, 700, 3), (17, 16, 300, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("shape", SPLIT_SHAPES)
def test_split_k_matches_reference(shape, fusion, dtype, device):
    M, N, K, split_k = shape
    x, w, kw = _inputs(M, N, K, dtype, device, fusion, seed=M * 1000 + K)
    ws = GemvWorkspace(1 << 16, 64, device)
    out = poisoned_like(torch.empty(M, N, dtype=dtype, device=device))
    got = linear(x, w, out=out, split_k=split_k, workspace=ws, **kw)
    assert got is out and not torch.isnan(out).any(), "an output element was not written"
    expected = ref.linear(x.float(), w.float(), **{k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()})
    assert_close(got, expected, dtype, f"split-K {split_k} {fusion} {shape}")
    assert not ws.counters.any(), "every tile's ticket counter is left at zero for the next launch"
    # the merge adds the splits in order, whichever finished last: the same bits with a temporary workspace
    assert torch.equal(linear(x, w, split_k=split_k, **kw), got)


def test_split_k_plan(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(gemv, "split_target", lambda device: 264)  # an H200: 132 SMs, 2 programs each
    # Llama-3.2-1B's wo (N = 2048: 128 tiles of 16 columns), K = 2048: 3 splits wanted, 2 of >= 1024 allowed
    assert plan_split_k(128, 2048, 128, cuda, None) == (2, 1024)
    assert plan_split_k(128, 8192, 128, cuda, None) == (3, 2816)  # its w2: 3 splits of 22 chunks (the last 20)
    assert plan_split_k(256, 14336, 128, cuda, None) == (2, 7168)  # 8B's w2: 256 tiles
    assert plan_split_k(384, 4096, 128, cuda, None) == (1, 4096)  # 8B's qkv: 384 tiles fill the GPU already
    assert plan_split_k(128, 1000, 128, cuda, None) == (1, 1000)  # K too short to share
    assert plan_split_k(1, 1 << 20, 128, cuda, None)[0] == gemv.MAX_SPLITS
    assert plan_split_k(4, 300, 64, cuda, 16) == (5, 64)  # asked for 16: K has 5 chunks
    monkeypatch.undo()
    assert plan_split_k(1, 1 << 20, 128, torch.device("cpu"), None) == (1, 1 << 20)  # interpreter: never by default


def test_split_k_workspace_for_the_default_plan(monkeypatch):
    """GemvWorkspace.for_device holds every split the launcher picks by itself, for any number of tiles."""
    monkeypatch.setattr(gemv, "split_target", lambda device: 264)
    ws = GemvWorkspace.for_device("cpu")
    for tiles in range(1, 300):
        splits, _ = plan_split_k(tiles, 1 << 20, 128, torch.device("cuda", 0), None)
        assert splits == 1 or (ws.fits(tiles, splits, 16) and ws.fits(tiles, splits, 64)), tiles
        assert (splits > 1) == (tiles < 264)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"split_k": 0}, r"split_k: expected None or an int in \[1, 16\], got 0"),
        ({"split_k": 17}, "split_k: expected None or an int"),
        ({"split_k": 2.0}, "split_k: expected None or an int"),
        ({"workspace": object()}, "workspace: expected a kernels.gemv.GemvWorkspace, got object"),
        ({"workspace": "meta"}, "workspace: on meta, x is on"),
    ],
)
def test_split_k_bad_arguments(kw, match, device):
    if kw.get("workspace") == "meta":
        kw = {"workspace": GemvWorkspace(16, 1, "meta")}
    x, w = torch.randn(2, 8, device=device), torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=match):
        linear(x, w, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the splits of a tile run concurrently only there")
@pytest.mark.parametrize("fusion", ["add", "norm_swiglu"])
def test_split_k_on_the_gpu_is_deterministic_at_a_llama_shape(fusion):
    """Llama-3.2-1B's w2 (N = 2048, K = 8192) and a w13-like product, bf16, with the launcher's own split (forced
    to 3 where the device has too many SMs for the default to split): the result within tolerance of the whole-K
    kernel, and bit-identical over 20 launches whose splits finish in whatever order."""
    N, K = (2048, 8192) if fusion == "add" else (1024, 2048)
    x, w, kw = _inputs(1, N, K, torch.bfloat16, "cuda", fusion, seed=5)
    ws = GemvWorkspace.for_device("cuda")
    tiles = N // 16
    splits, _ = plan_split_k(tiles, K, 128, torch.device("cuda"), None)
    split_k = None if splits > 1 else 3
    first = linear(x, w, workspace=ws if split_k is None else None, split_k=split_k, **kw)
    whole = linear(x, w, split_k=1, **kw)
    assert_close(first, whole, torch.bfloat16, f"split-K {fusion}")
    for _ in range(20):
        assert torch.equal(linear(x, w, workspace=ws if split_k is None else None, split_k=split_k, **kw), first)
    assert not ws.counters.any()


@pytest.mark.parametrize("config", [(32, 64, 4, 2), (64, 32, 2, 3), (16, 128, 8, 1)])
def test_a_tuning_config_gives_the_same_result(config, device):
    """``config=`` (benchmarks/gemv_configs.py) changes the tiling, never the result: fused, with split-K."""
    x, w, kw = _inputs(3, 100, 600, torch.float32, device, "norm_add", seed=9)
    expected = ref.linear(x, w, **kw)
    assert_close(linear(x, w, config=config, **kw), expected, torch.float32, f"config {config}")
    assert_close(linear(x, w, config=config, split_k=3, **kw), expected, torch.float32, f"config {config} split")


@pytest.mark.parametrize("config", [(8, 128, 4, 4), (16, 24, 4, 4), (16, 128, 3, 4), (16, 128, 4, 9), [16, 128, 4, 4]])
def test_a_bad_config_is_refused(config, device):
    x, w = torch.randn(2, 64, device=device), torch.randn(16, 64, device=device)
    with pytest.raises(ValueError, match=r"config: expected \(BLOCK_N, BLOCK_K, num_warps, num_stages\)"):
        linear(x, w, config=config)


def test_the_gemvs_never_specialise_n():
    """A weight with one row: Triton would make N == 1 a constexpr at launch, and the SwiGLU offset
    ``N.to(tl.int64)`` does not compile on one (seen for sm_90 with triton 3.6). The GEMVs keep N a run-time
    integer, as the compile gate compiles it. Read from the compiled-mode JIT, in a process without the
    interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from llama3_triton.kernels import gemv, quant\n"
        "for f in (gemv._gemv_kernel, quant._qgemv_kernel):\n"
        "    print(sorted(p.name for p in f.params if p.do_not_specialize))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[2], timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split("\n")[:2] == ["['N']", "['N']"]
