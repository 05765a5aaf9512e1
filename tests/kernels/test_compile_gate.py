"""The compile gate: every kernel configuration compiles for sm_80 and sm_90 with Triton's bundled ptxas
(no GPU needed), without spills, within shared memory, the GEMVs with enough programs resident per SM to keep the
weight bytes in flight that the bandwidth needs (benchmarks/kernel_resources.py's prediction), and the attention
kernels use tensor cores.

The interpreter forgives what the GPU compiler does not (layouts, register pressure, shared memory), so
this is the CPU's check that the code a GPU would run is sound. The compiles run in a subprocess
without TRITON_INTERPRET, since this test process may be interpreting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama3_triton.benchmarks.kernel_resources import KERNEL_MODULES, gate_archs, problems

# Compiles every kernel configuration with ptxas: ~2 minutes on a 2-core CPU (pytest -m 'not slow' skips it).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gate") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run(
        [sys.executable, "-m", "llama3_triton.benchmarks.kernel_resources", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=1500,
    )
    assert out.exists(), f"kernel_resources did not run:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    print(p.stdout)  # the resource table, shown with pytest -s
    return json.loads(out.read_text())


def test_every_kernel_has_variants_for_every_arch(rows):
    seen = {(r["module"], r["arch"]) for r in rows}
    for module in KERNEL_MODULES:
        for arch in gate_archs():
            assert (module, f"sm_{arch}") in seen, f"{module} has no compiled configuration for sm_{arch}"


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_without_spills_within_shared_memory(rows, module):
    mine = [r for r in rows if r["module"] == module]
    assert mine
    failures = [f"{r['name']} {r['arch']}: {'; '.join(problems(r))}" for r in mine if problems(r)]
    assert not failures, "\n".join(failures)


def test_attention_kernels_use_tensor_cores(rows):
    """The prefill and decode attention kernels hold matrix products: they must run on HMMA/HGMMA."""
    for module in ("attention", "decode", "decode_step"):
        module = f"llama3_triton.kernels.{module}"
        dot_rows = [r for r in rows if r["module"] == module and r.get("uses_dot")]
        assert dot_rows, f"{module}: no configuration with a tl.dot"
        for r in dot_rows:
            assert r.get("tensor_core_ops"), f"{module} {r['name']} {r['arch']}: no tensor-core instruction in SASS"


def test_gate_rejects_local_memory_of_any_kind():
    """A stack frame or STL/LDL instructions fail the gate even with no spill (libdevice's sin/cos slow path
    keeps an array in local memory that way); a clean row passes."""
    clean = {"arch": "sm_90", "local_bytes": 0, "stack_bytes": 0, "local_memory_ops": 0, "shared_bytes": 0}
    clean |= {"uses_dot": False, "tensor_core_ops": []}
    assert problems(clean) == []
    for bad in ({"stack_bytes": 32}, {"local_memory_ops": 4}, {"local_bytes": 8}):
        assert any("local memory" in p for p in problems(clean | bad)), bad
