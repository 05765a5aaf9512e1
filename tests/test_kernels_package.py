"""The public names of ``kernels`` stay the functions, even after their same-named modules are imported."""

import importlib
import types

import kernels
from kernels import reference

OPS = ["rms_norm", "add_rms_norm", "rope", "attention", "decode_attention", "swiglu"]


def test_public_ops_are_functions_with_reference_twins():
    for m in ("kernels.rmsnorm", "kernels.rope", "kernels.attention", "kernels.decode", "kernels.swiglu"):
        importlib.import_module(m)  # binds the submodule on the package, which must not shadow the function
    for name in OPS:
        op = getattr(kernels, name)
        assert callable(op) and not isinstance(op, types.ModuleType), name
        assert callable(getattr(reference, name)), name
    assert isinstance(importlib.import_module("kernels.rope"), types.ModuleType)


def test_reference_import_does_not_import_triton_kernels():
    import subprocess
    import sys

    code = "import sys, kernels.reference; print(any(m in sys.modules for m in ('kernels.rope', 'kernels.attention')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
