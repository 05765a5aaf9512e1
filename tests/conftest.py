"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run in Triton's interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when the kernel modules are imported, so it is set here, before any test module
imports ``kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns on every compile until this is set; keep its current default (fusion on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from model import _kernels_name  # noqa: E402  (binds `kernels` to this project's package)

_kernels_name.hide_hub_kernels()  # transformers, the tests' reference, must not import our `kernels` as its own

from tests.tolerances import INTERPRET  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on: CUDA when there is one, else the CPU (through the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    where = "Triton interpreter on the CPU (TRITON_INTERPRET=1)" if INTERPRET else "compiled Triton on CUDA"
    return f"kernels run in: {where}"
