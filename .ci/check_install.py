"""Run by .ci/run in a fresh environment holding this project installed (from its wheel, or editable) beside
transformers >= 5.25 and Hugging Face's own ``kernels`` package: the one import root keeps the two apart in either
import order, the console script runs, and nothing is found through the checkout's folders (run from /tmp)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def python(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), capture_output=True, text=True)
    assert p.returncode == 0, f"{code}\n{p.stdout}\n{p.stderr}"
    return p.stdout


ours_first = """
import llama3_triton.kernels as ours, llama3_triton.kernels.reference
from llama3_triton.model import Llama
from llama3_triton.benchmarks.common import default_out_dir
import kernels as theirs
import transformers.integrations.hub_kernels
from transformers import LlamaForCausalLM
assert ours is not theirs and hasattr(ours, "Ops") and not hasattr(theirs, "Ops"), (ours, theirs)
assert "site-packages" in theirs.__file__, theirs.__file__
print(ours.__file__)
"""
theirs_first = """
import kernels as theirs
from transformers import LlamaForCausalLM
from llama3_triton.kernels import Ops, reference
from llama3_triton.model.llama import Llama
import llama3_triton.kernels as ours
assert ours is not theirs and theirs.__name__ == "kernels"
"""
where = python(ours_first).strip()
# Package data: the calibration texts ship in the wheel (benchmarks/data), not only in the checkout.
python("from llama3_triton.benchmarks import quant_texts; assert len(quant_texts.CALIBRATION) > 10_000")
python(theirs_first)
script = os.path.join(os.path.dirname(sys.executable), "llama3-triton")
for args in (["--version"], ["info", "--help"], ["bench", "--help"]):
    p = subprocess.run([script, *args], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"llama3-triton {' '.join(args)}: {p.stderr[-2000:]}"
print(f"install check passed: llama3_triton.kernels from {where}")
