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


# The tiny checkpoints the model tests share, written once per run. They are read-only: a test that changes files
# in one copies it first (shutil.copytree) or writes its own with make_tiny.


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """make_tiny's default shapes (dim 128, 2 layers, GQA 2:1), fp32, seed 3: the model of the CLI, engine, server
    and speculative tests."""
    from llama3_triton.model.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("seed3") / "tiny", seed=3, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory):
    """The same shapes with other weights (seed 4): a second model, e.g. a draft that disagrees with tiny_ckpt."""
    from llama3_triton.model.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("seed4") / "tiny", seed=4, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny64_ckpt(tmp_path_factory):
    """The smallest useful model (dim 64, one layer, fp32, seed 4), for tests about errors and files."""
    from llama3_triton.model.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("dim64") / "tiny", dim=64, n_layers=1, seed=4, dtype=torch.float32)


def pytest_report_header(config):
    where = "Triton interpreter on the CPU (TRITON_INTERPRET=1)" if INTERPRET else "compiled Triton on CUDA"
    return f"kernels run in: {where}"
