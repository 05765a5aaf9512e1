"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run in Triton's interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when the kernel modules are imported, so it is set here, before any test module
imports ``llama3_triton.kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns on every compile until this is set; keep its current default (fusion on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from llama3_triton.benchmarks.common import bind_hub_kernels  # noqa: E402

# `python -m pytest` puts the checkout's root on sys.path, where the folder kernels/ would answer transformers'
# `import kernels` (Hugging Face's package): bind the name to theirs first. This project imports llama3_triton.kernels.
bind_hub_kernels()

from tests.tolerances import INTERPRET  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on: CUDA when there is one, else the CPU (through the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    where = "Triton interpreter on the CPU (TRITON_INTERPRET=1)" if INTERPRET else "compiled Triton on CUDA"
    return f"kernels run in: {where}"
