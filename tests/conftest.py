"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run in Triton's interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when the kernel modules are imported, so it is set here, before any test module
imports ``llama3_triton.kernels``.
"""

import os

# Under pytest-xdist (the README's test command runs -n auto) each worker takes its share of the cores for torch's
# threads and for the processes it starts, unless OMP_NUM_THREADS says otherwise: workers that each run torch on
# every core slow each other down by an order of magnitude. Set before torch is imported, which reads it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import torch  # noqa: E402

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


# The longest files, in the order they start under pytest-xdist's --dist loadfile (a worker takes the next file when
# it is free): the longest first, so that no worker starts a long file as the other runs out of work. Measured with
# --durations on a 2-core CPU; a file not named keeps its place after these.
LONGEST_FIRST = (
    "tests/model/quant/test_quant.py",
    "tests/kernels/test_compile_gate.py",
    "tests/benchmarks/test_benchmarks.py",
    "tests/model/test_tensor_parallel.py",
    "tests/model/generation/test_sampling.py",
    "tests/model/checkpoints/test_gguf.py",
    "tests/model/test_loading_memory.py",
    "tests/test_readme.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist's own order (by the number of tests) would undo ours
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    # Only for --dist loadfile, read in a worker from the command line it was started for (xdist sets each worker's
    # own "dist" option to "no"): a run in one process, or gpu-check's order of its GPU tests, stays as it is.
    argv = getattr(config, "workerinput", {}).get("mainargv", [])
    if not any(a in ("loadfile", "--dist=loadfile") for a in argv):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep order
