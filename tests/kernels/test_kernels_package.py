"""The ops contract: both backends implement every op of ``kernels.Ops`` with its parameters, and
``import kernels`` / ``import kernels.reference`` import no Triton kernel (TRITON_INTERPRET may be set later)."""

import inspect
import subprocess
import sys
import types

import pytest

from llama3_triton import kernels
from llama3_triton.kernels import reference, triton_ops

OPS = [name for name, member in vars(kernels.Ops).items() if inspect.isfunction(member) and not name.startswith("_")]


def test_the_contract_names_every_op_the_driver_calls():
    unfused = {"rms_norm", "add_rms_norm", "rope_write_cache", "attention", "decode_attention", "swiglu"}
    fused = {"linear", "rope_decode_attention"}  # the fused decode step's two
    quantized = {"quant_linear", "pack_quant"}  # a quantized product, and the backend's repacking of its planes
    kept = {"workspaces"}  # the fused step's scratch
    paged = {"rope_write_paged_cache", "paged_prefill_attention", "paged_decode_attention"}  # the engine's
    paged |= {"paged_rope_decode_attention"}
    assert set(OPS) == unfused | fused | quantized | kept | paged


def test_the_driver_reaches_its_backend_through_the_contract_only():
    """Every ``ops.X`` / ``self.ops.X`` the model's driver reads is an op of ``kernels.Ops``: no attribute a
    backend may or may not have (no ``getattr(ops, ...)``, no ``hasattr``), so choosing a backend is the one switch."""
    import ast
    from pathlib import Path

    root = Path(kernels.__file__).resolve().parents[1] / "model"
    for f in (root / "llama.py", root / "graph.py", root / "engine" / "engine.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                base = node.value
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
                if name == "ops" and node.attr != "ops":
                    assert node.attr in OPS, f"{f.name}: ops.{node.attr} is not in kernels.Ops"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                target = node.args[0]
                assert "ops" not in ast.unparse(target), f"{f.name}: {ast.unparse(node)} goes around the contract"


@pytest.mark.parametrize("backend", [triton_ops, reference], ids=["triton", "torch"])
@pytest.mark.parametrize("op", OPS)
def test_backend_implements_the_op_with_its_parameters(backend: types.ModuleType, op: str):
    fn = getattr(backend, op)
    assert inspect.isfunction(fn), f"{backend.__name__}.{op} is not a plain function"
    want = list(inspect.signature(getattr(kernels.Ops, op)).parameters.values())[1:]  # without self
    have = inspect.signature(fn).parameters
    for p in want:
        assert p.name in have, f"{backend.__name__}.{op} lacks parameter {p.name!r}"
        assert have[p.name].kind == p.kind, f"{backend.__name__}.{op}: {p.name!r} is {have[p.name].kind}, not {p.kind}"
        assert have[p.name].default == p.default, f"{backend.__name__}.{op}: default of {p.name!r}"
    extra = [q for q in have.values() if q.name not in {p.name for p in want}]
    assert all(q.default is not inspect.Parameter.empty for q in extra), f"{op}: extra parameters need defaults"


def test_triton_ops_are_the_kernel_files_functions():
    for op in OPS:
        assert getattr(triton_ops, op).__module__.startswith("llama3_triton.kernels."), op
        assert getattr(triton_ops, op).__module__ != "llama3_triton.kernels.reference", op


@pytest.mark.parametrize("module", ["kernels", "llama3_triton.kernels.reference"])
def test_importing_does_not_import_triton_kernels(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith(('kernels.', 'triton'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("[]", "['llama3_triton.kernels.reference']"), out


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "0.1"])
def test_one_scale_check_for_every_attention_launcher(bad):
    """kernels/_launch.py's check_scale and check_splits are the launchers' one copy of these checks."""
    from llama3_triton.kernels._launch import check_scale, check_splits

    with pytest.raises(ValueError, match=r"scale: expected a finite float > 0"):
        check_scale(bad)
    assert check_scale(None) is None and check_scale(0.125) == 0.125
    for splits in (0, 65, True, 2.0, "4"):
        with pytest.raises(ValueError, match=r"num_splits: expected an int in \[1, 64\]"):
            check_splits(splits, 64)
    assert check_splits(None, 64) is None and check_splits(64, 64) == 64
