"""A launcher-side check shared by the attention kernels (not kernel maths: see attention.py and decode.py)."""

from __future__ import annotations

import torch


def aligned_strides(name: str, t: torch.Tensor, dims: int) -> tuple[int, ...]:
    """The first ``dims`` strides of t for the kernel, after checking the alignment Triton specialises on.

    Triton compiles one binary per alignment pattern of its pointer and integer arguments; with a 16-byte
    aligned base and strides divisible by 16 elements the loads become 16-byte vectors, and those are the
    binaries the compile gate checks (the unaligned fallback spilled). Every KV-cache, qkv or fresh tensor
    qualifies. Dims of size 1 are never stepped along, so their stride is passed as 0 whatever it is.
    """
    strides = tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:dims], t.shape[:dims], strict=True))
    if t.data_ptr() % 16 or any(s % 16 for s in strides):
        raise ValueError(
            f"{name}: expected a 16-byte aligned base and strides that are multiples of 16 elements, got "
            f"address {t.data_ptr():#x}, strides {t.stride()} (pass a copy: {name}.clone())"
        )
    return strides
