"""What every kernel launcher shares, so that each kernel file reads as its kernel: whether the kernels run in
Triton's interpreter, the argument checks (one wording for every op), the alignment Triton specialises on,
and the compile gate's description of a configuration.

Interpreted or compiled is decided once, when ``@triton.jit`` runs (at the kernel module's import, from
``TRITON_INTERPRET``): ask the kernel object, not the environment, which may have changed since.

Triton 3.6/3.7's interpreter converts a loop bound such as ``tl.cdiv(N, BLOCK)`` to a Python int with
``int(array)`` on a one-element 1-d numpy array; numpy 2.4 made that a ``TypeError`` ("only 0-dimensional
arrays can be converted to Python scalars"), so every kernel with a ``range(...)`` loop fails there. Triton
3.8 fixed it upstream by squeezing the array first; ``_fix_interpreter_index`` applies the same one-line fix
to the older releases, and only to them (the GPU machine's image pairs triton 3.6 with numpy 2.5). It runs
when this module is first imported, before any kernel can be launched; compiled kernels never reach it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ARCHS = (80, 90)  # the compile gate's targets: A100 (sm_80) and H100/H200 (sm_90)
# Tokens per page of a paged KV cache: powers of two (a page and an offset are a shift and a mask of the slot id)
# that the paged kernels are compiled for; 16 is vLLM's default, 64 and up keep a whole key block in one page.
PAGE_SIZES = (16, 32, 64, 128)


def interpreting(kernel: object) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's interpreter rather than compiled."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream: no host syncs allowed."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ---- argument checks: each failure a ValueError that names the argument and says what it expected ----------


def check_tensor(
    name: str,
    t: object,
    *,
    like: torch.Tensor | None = None,
    like_name: str = "q",
    interpret: bool = False,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ndim: int | None = None,
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """``t`` as a tensor the kernels can read, else a ValueError naming ``name``.

    Without ``like``: a dtype from ``dtypes`` on a CUDA device (or on the CPU when ``interpret``, the kernel
    running in Triton's interpreter). With ``like``: the device and dtype of ``like`` (the op's first input,
    called ``like_name``). Then ``ndim`` dims and exactly ``shape`` where given, and a contiguous last dim.
    """
    if not isinstance(t, torch.Tensor) or (ndim is not None and t.dim() != ndim):
        want = "a torch.Tensor" if ndim is None else f"a {ndim}-d tensor"
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected {want}, got {got}")
    if like is None:
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name}: expected dtype {names}, got {t.dtype}")
        if not (t.is_cuda or (t.device.type == "cpu" and interpret)):
            raise ValueError(f"{name}: expected a CUDA tensor (or a CPU one under TRITON_INTERPRET=1), got {t.device}")
    else:
        if t.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device} (the device of {like_name}), got {t.device}")
        if t.dtype != like.dtype:
            raise ValueError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dim (stride 1), got strides {t.stride()}")
    return t


def check_index(
    name: str,
    t: object,
    *,
    device: torch.device,
    shape: Sequence[int],
    dtypes: Sequence[torch.dtype] = (torch.int32, torch.int64),
    contiguous: bool = False,
) -> torch.Tensor:
    """``t`` as an integer tensor (lengths, slots, block tables) of exactly ``shape`` on ``device``, else a
    ValueError naming ``name``; ``contiguous``: the kernel indexes it as one flat array."""
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: expected an {names} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(shape) or t.device != device:
        raise ValueError(f"{name}: expected shape {tuple(shape)} on {device}, got {tuple(t.shape)} on {t.device}")
    if (contiguous and not t.is_contiguous()) or (t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1):
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t


def check_scale(scale: object) -> float | None:
    """The softmax scale a launcher takes: None (1 / sqrt(D)) or a finite number > 0, else a ValueError."""
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite float > 0, got {scale!r}")
    return scale


def check_splits(num_splits: object, most: int) -> int | None:
    """A split count a caller chose: None (the launcher's choice) or an int in [1, most], else a ValueError."""
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= most):  # fmt: skip
        raise ValueError(f"num_splits: expected an int in [1, {most}], got {num_splits!r}")
    return num_splits


def check_pages(name: str, pages: object, *, like: torch.Tensor, head_dim: int, heads: int | None = None) -> tuple:
    """A paged KV cache (num_pages, PAGE, Hkv, D) on the device and in the dtype of ``like`` (q), PAGE one of
    PAGE_SIZES, D = ``head_dim`` and Hkv = ``heads`` where given: returns (num_pages, PAGE, Hkv)."""
    check_tensor(name, pages, like=like, ndim=4)
    n, page, h, d = pages.shape
    if page not in PAGE_SIZES:
        raise ValueError(
            f"{name}: expected a page size (dim 1) in {PAGE_SIZES}, got {page} (shape {tuple(pages.shape)})"
        )
    if n < 1 or h < 1 or d != head_dim or (heads is not None and h != heads):
        want = f"(num_pages >= 1, PAGE, Hkv={heads if heads is not None else 'Hkv'}, D={head_dim})"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(pages.shape)}")
    return n, page, h


def check_block_tables(block_tables: object, batch: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(B, max_pages_per_seq) int32 page indices, rows contiguous: returns it and max_pages_per_seq."""
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
        got = tuple(block_tables.shape) if isinstance(block_tables, torch.Tensor) else type(block_tables).__name__
        raise ValueError(f"block_tables: expected a 2-d (B={batch}, max_pages_per_seq) tensor, got {got}")
    check_index(
        "block_tables", block_tables, device=device, dtypes=(torch.int32,), shape=(batch, block_tables.shape[1])
    )
    if block_tables.shape[1] < 1:
        raise ValueError(
            f"block_tables: expected at least one page per sequence, got shape {tuple(block_tables.shape)}"
        )
    if batch > 1 and block_tables.stride(0) != block_tables.shape[1]:
        raise ValueError(f"block_tables: expected contiguous rows, got strides {block_tables.stride()}")
    return block_tables, block_tables.shape[1]


def check_pages_in_use(block_tables: torch.Tensor, lengths: torch.Tensor, page: int, num_pages: int) -> tuple:
    """The host check of a paged call's values, one device sync: (min, max) of ``lengths`` and whether every
    block-table entry a sequence uses (its first ceil(lengths[b] / page) pages) is a page of the pool. Entries
    past a sequence's pages are never read and may hold anything (-1 padding, say)."""
    used = torch.arange(block_tables.shape[1], device=lengths.device)[None, :] * page < lengths.long()[:, None]
    bad = (used & ((block_tables < 0) | (block_tables >= num_pages))).any()
    lo, hi, bad = torch.stack((*torch.aminmax(lengths.long()), bad.long())).tolist()
    return lo, hi, bool(bad)


@dataclass(frozen=True)
class PagedCache:
    """What a launcher hands its kernel about a paged KV cache, checked: the block tables, the page size (0: the
    cache is the slab, and ``tables`` a stand-in pointer the kernel never reads), the table's row width and the
    pool's page count. ``capacity``: the keys a sequence can reach, pages_per_seq * page."""

    tables: torch.Tensor
    page: int
    pages_per_seq: int
    num_pages: int

    @property
    def capacity(self) -> int:
        return self.pages_per_seq * self.page

    @classmethod
    def slab(cls, like: torch.Tensor) -> PagedCache:
        return cls(like, 0, 0, 0)

    @classmethod
    def check(
        cls, q: torch.Tensor, k_pages: object, v_pages: object, block_tables: object, batch: int | None = None
    ) -> PagedCache:
        """k_pages, v_pages (num_pages, PAGE, Hkv, D) like q (.., D) and block_tables (B, width), B = ``batch``,
        by default q.shape[0] (one query a sequence)."""
        D = q.shape[-1]
        num_pages, page, heads = check_pages("k_pages", k_pages, like=q, head_dim=D)
        check_pages("v_pages", v_pages, like=q, head_dim=D, heads=heads)
        if v_pages.shape != k_pages.shape:
            raise ValueError(f"v_pages: expected shape {tuple(k_pages.shape)} (as k_pages), got {tuple(v_pages.shape)}")
        tables, width = check_block_tables(block_tables, q.shape[0] if batch is None else batch, q.device)
        return cls(tables, page, width, num_pages)

    def check_lengths(self, lengths: torch.Tensor, name: str = "lengths") -> None:
        """The host check (one sync): lengths in [1, capacity], and the table entries they use inside the pool."""
        lo, hi, bad = check_pages_in_use(self.tables, lengths, self.page, self.num_pages)
        if lo < 1 or hi > self.capacity:
            raise ValueError(
                f"{name}: expected values in [1, max_pages_per_seq * PAGE = {self.capacity}], got min {lo}, max {hi}"
            )
        if bad:
            raise ValueError(
                f"block_tables: expected the pages each sequence uses (the first ceil({name}[b] / {self.page})) in "
                f"[0, num_pages={self.num_pages})"
            )


def rows(name: str, t: torch.Tensor, *, written: bool = False) -> torch.Tensor:
    """``t`` (..., D), last dim contiguous, viewed as (R, D) rows without a copy; ``written`` rows must not overlap."""
    D = t.shape[-1]
    try:
        r = t.view(-1, D)
    except RuntimeError:
        raise ValueError(
            f"{name}: expected leading dims that flatten to one row stride, got strides {t.stride()}"
        ) from None
    if written and r.shape[0] > 1 and r.stride(0) < D:
        raise ValueError(f"{name}: output rows overlap (row stride {r.stride(0)} < {D})")
    return r


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


# ---- the compile gate's description of one configuration --------------------------------------------------


def variant(
    name: str,
    fn: object,
    types: dict[str, str],
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    *,
    archs: Sequence[int] = ARCHS,
    divisible: Sequence[str] = (),
    unaligned: Sequence[str] = (),
    stream_bytes: int | None = None,
) -> dict:
    """One entry of a kernel file's ``compile_variants()``: what ``benchmarks/kernel_resources.py`` compiles.

    ``types`` gives the Triton type of the pointer and float arguments ("*bf16", "fp32"); every other run-time
    argument is an "i32". ``attrs`` marks what Triton specialises at launch on every realistic call: pointers
    16-byte aligned (but those in ``unaligned``), strides and the sizes in ``divisible`` divisible by 16.
    ``archs`` are the compute capabilities the launcher may pick the configuration on. ``stream_bytes``: for a
    kernel that streams one operand from memory (a GEMV's weight), the bytes of it one pipeline stage loads; the
    gate then predicts the bytes each SM keeps in flight (benchmarks/kernel_resources.py).
    """
    names = list(fn.arg_names)
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = [
        i
        for i, n in enumerate(names)
        if (sig[n].startswith("*") and n not in unaligned)
        or ("stride" in n.lower() and sig[n] == "i32")
        or n in divisible
    ]
    return {
        "name": name,
        "fn": fn,
        "signature": sig,
        "constexprs": constexprs,
        "attrs": {(i,): [["tt.divisibility", 16]] for i in aligned},
        "archs": list(archs),
        "num_warps": num_warps,
        "num_stages": num_stages,
    } | ({"stream_bytes": stream_bytes} if stream_bytes else {})


# ---- triton < 3.8's interpreter with numpy >= 2.4 ------------------------------------------------------------


def _needs_index_fix() -> bool:
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 8)


def _fix_interpreter_index() -> None:
    """Make ``tensor.__index__`` squeeze its one-element array inside the interpreter (triton < 3.8 only)."""
    if not _needs_index_fix():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_llama3_triton_fix", False):
        return  # already applied in this process

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # scope restores attributes last-in first-out, so this override is undone with the rest after each launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._llama3_triton_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_fix_interpreter_index()
