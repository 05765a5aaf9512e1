"""The one table of tolerances that every kernel test uses, and the comparison helpers.

A kernel's output (in the input dtype) is compared with the reference computed in fp32 on the same
inputs. The fp32 row allows for a different summation order; fp16 and bf16 rows allow a few units in
the last place of the output dtype (fp16: 2^-11 = 4.9e-4 relative, bf16: 2^-8 = 3.9e-3 relative)
plus the rounding of intermediates that flash attention keeps in the input dtype (P before P@V).

Measured in Triton 3.9's interpreter (CPU): an fp32 -> bf16 cast truncates instead of rounding to nearest
even (its "rtne" mode too), so interpreted bf16 outputs can sit one unit in the last place low; the bf16
row covers that, and on a GPU the cast rounds. bf16 tl.dot operands are upcast to fp32 when interpreting
(the attention kernels' DOT_FP32 flag), since the interpreter computes bf16 products on raw bit patterns.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# A value no kernel produces from random inputs: outputs are filled with it before a call, and a test
# fails if any survives (an element the kernel forgot to write).
POISON = float("nan")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    """Kernel output vs fp32 reference, with the tolerance of ``dtype`` from the shared table."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element left unwritten, or a NaN computed)"
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer shaped like ``t`` filled with POISON."""
    return torch.full_like(t, POISON)
