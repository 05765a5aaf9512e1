"""The paged KV cache's kernels against their twins in kernels.reference: the RoPE + cache write by slot mapping,
split-KV decode attention (and the fused one-launch decode step) through block tables, and the varlen prefill
over a prefix already in pages plus a new chunk.

Every pool is laid out the way an engine leaves it: each sequence's pages a random sample of the pool in shuffled
order, lengths ragged (1, 7, 33, ... and one an exact multiple of the page), page sizes 16 and 32, GQA 1 and 4,
head dims 64 and 128, fp32 and fp16 (bf16 where the kernel is elementwise; the attention kernels' bf16 dots run
in fp32 under the interpreter, see tests/kernels/test_decode.py). Slots no sequence uses hold NaN: a kernel that
reads one turns its output NaN, and one that writes one is seen by the slot no longer being NaN. The references
run on the same pools with the NaNs zeroed (the reference's masked softmax multiplies them by 0, which keeps NaN).
"""

from __future__ import annotations

import pytest
import torch

from llama3_triton.kernels import reference as ref
from llama3_triton.kernels.rope import rope_write_paged_cache
from tests.tolerances import POISON, assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _pool(lengths, page, Hkv, D, dtype, *, seed, spare_pages=3, width_pad=1):
    """k_pages, v_pages (num_pages, page, Hkv, D) and block_tables (B, max_pages) int32 for sequences of
    ``lengths`` tokens: pages drawn at random from a pool with ``spare_pages`` no sequence owns, each sequence's
    in shuffled order; the filled slots random, every other slot NaN; table entries past a sequence's pages -1."""
    g = _gen(seed)
    need = [-(-n // page) for n in lengths]
    num_pages = sum(need) + spare_pages
    order = torch.randperm(num_pages, generator=g)
    width = max(need) + width_pad
    tables = torch.full((len(lengths), width), -1, dtype=torch.int32)
    k_pages = torch.full((num_pages, page, Hkv, D), POISON, dtype=dtype, device=DEVICE)
    v_pages = torch.full_like(k_pages, POISON)
    used = 0
    for b, (n, p) in enumerate(zip(lengths, need, strict=True)):
        tables[b, :p] = order[used : used + p]
        used += p
        for pos in range(n):
            pg, off = int(tables[b, pos // page]), pos % page
            k_pages[pg, off] = _randn(g, Hkv, D, dtype=dtype)
            v_pages[pg, off] = _randn(g, Hkv, D, dtype=dtype)
    return k_pages, v_pages, tables.to(DEVICE)


def _slots(tables: torch.Tensor, page: int, b: int, positions) -> torch.Tensor:
    """Flat slot ids page * PAGE + offset of sequence b's tokens at ``positions``."""
    pos = torch.as_tensor(positions, dtype=torch.int64)
    return tables[b].cpu().long()[pos // page] * page + pos % page


def _table(D: int) -> torch.Tensor:
    return ref.rope_table(ref.rope_inv_freq(D, 500000.0).to(DEVICE), 512)


# ---- 1. RoPE + cache write by slot mapping ----------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,D,G,page,slot_dtype",
    [
        (torch.float32, 64, 4, 16, torch.int64),
        (torch.float16, 128, 1, 32, torch.int32),
        (torch.bfloat16, 64, 1, 16, torch.int64),
    ],
    ids=str,
)
def test_rope_write_paged_cache(dtype, D, G, page, slot_dtype):
    """Chunks of three sequences packed into one call, with padding tokens (slot -1) between them: q rotated, k
    rotated and v copied into exactly their slots, every other slot of the pool still NaN."""
    Hkv = 2
    starts, chunk = [0, 5, 30], [7, 1, 4]  # sequence b's chunk sits at positions starts[b] .. + chunk[b]
    k_pages, v_pages, tables = _pool([s + c for s, c in zip(starts, chunk, strict=True)], page, Hkv, D, dtype, seed=1)
    k_pages.fill_(POISON), v_pages.fill_(POISON)
    positions, slots = [], []
    for b, (s, c) in enumerate(zip(starts, chunk, strict=True)):
        positions += list(range(s, s + c)) + [0]  # then a padding token
        slots += _slots(tables, page, b, range(s, s + c)).tolist() + [-1]
    N = len(slots)
    g = _gen(2)
    q, k, v = (_randn(g, N, h, D, dtype=dtype) for h in (G * Hkv, Hkv, Hkv))
    positions = torch.tensor(positions, device=DEVICE)
    slot_mapping = torch.tensor(slots, dtype=slot_dtype, device=DEVICE)
    cs = _table(D)

    out_q = torch.full_like(q, POISON)
    ret = rope_write_paged_cache(q, k, v, positions, slot_mapping, cs, k_pages, v_pages, out_q=out_q)
    assert ret.data_ptr() == out_q.data_ptr()
    want_k, want_v = torch.zeros_like(k_pages), torch.zeros_like(v_pages)
    want_q = ref.rope_write_paged_cache(q, k, v, positions, slot_mapping, cs, want_k, want_v)
    assert_close(out_q, want_q, dtype, "q")
    written = torch.zeros(k_pages.shape[:2], dtype=torch.bool, device=DEVICE).view(-1)
    written[slot_mapping[slot_mapping >= 0].long()] = True
    written = written.view(k_pages.shape[:2])
    assert_close(k_pages[written], want_k[written], dtype, "k_pages")
    assert torch.equal(v_pages[written], want_v[written]), "v is copied bit for bit"
    assert torch.isnan(k_pages[~written]).all() and torch.isnan(v_pages[~written]).all(), "wrote an unused slot"


def test_rope_paged_all_padding_writes_nothing():
    k_pages, v_pages, _ = _pool([1], 16, 1, 64, torch.float32, seed=3)
    k_pages.fill_(POISON), v_pages.fill_(POISON)
    g = _gen(4)
    q, k, v = (_randn(g, 3, 1, 64, dtype=torch.float32) for _ in range(3))
    slots = torch.full((3,), -1, device=DEVICE)
    positions = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    rope_write_paged_cache(q, k, v, positions, slots, _table(64), k_pages, v_pages)
    assert torch.isnan(k_pages).all() and torch.isnan(v_pages).all()


def _rope_bad_cases():
    k_pages, v_pages, tables = _pool([20], 16, 2, 64, torch.float16, seed=5)
    g = _gen(6)
    q, k, v = (_randn(g, 4, h, 64, dtype=torch.float16) for h in (4, 2, 2))
    pos = torch.arange(4, device=DEVICE)
    slots = _slots(tables, 16, 0, range(4)).to(DEVICE)
    cs = _table(64)

    def call(**kw):
        args = dict(q=q, k=k, v=v, positions=pos, slot_mapping=slots, cos_sin=cs, k_pages=k_pages, v_pages=v_pages)
        return lambda: rope_write_paged_cache(**(args | kw))

    n_slots = k_pages.shape[0] * 16
    odd_page = torch.zeros(2, 24, 2, 64, dtype=torch.float16, device=DEVICE)
    return [
        ("q-ndim", call(q=q[None]), "q: expected a 3-d"),
        ("k-heads", call(k=k[:, :1]), "k_pages: expected shape"),
        ("v-dtype", call(v=v.float()), "v: expected dtype"),
        ("pos-shape", call(positions=pos[:3]), r"positions: expected a 1-d \(4,\)"),
        ("slots-shape", call(slot_mapping=slots[None]), r"slot_mapping: expected a 1-d \(4,\)"),
        ("slots-dtype", call(slot_mapping=slots.float()), "slot_mapping: expected an int32 or int64"),
        ("slots-stride", call(slot_mapping=slots.repeat_interleave(2)[::2]), "slot_mapping: expected a contiguous"),
        ("slots-range", call(slot_mapping=slots + n_slots), r"slot_mapping: expected -1 \(skip\) or slots in"),
        ("slots-neg", call(slot_mapping=slots - 100), r"slot_mapping: expected -1 \(skip\) or slots in"),
        ("pages-dtype", call(k_pages=k_pages.float()), "k_pages: expected dtype"),
        ("pages-size", call(k_pages=odd_page, v_pages=odd_page), r"k_pages: expected a page size \(dim 1\) in"),
        ("v-pages-shape", call(v_pages=v_pages[:1]), "v_pages: expected shape"),
        ("pos-range", call(positions=pos + 600), r"positions: expected values in \[0, 512\)"),
    ]


@pytest.mark.parametrize("case", range(13), ids=[c[0] for c in _rope_bad_cases()])
def test_rope_paged_bad_input(case):
    _, fn, match = _rope_bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn()
