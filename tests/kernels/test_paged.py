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
from llama3_triton.kernels.decode import decode_attention, paged_decode_attention
from llama3_triton.kernels.decode_step import DecodeWorkspace, paged_rope_decode_attention
from llama3_triton.kernels.paged_attention import paged_prefill_attention
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


# ---- 2. split-KV decode attention through block tables -------------------------------------------------------


def _clean(t: torch.Tensor) -> torch.Tensor:
    """The pool as the reference reads it: fp32, the unused (NaN) slots zeroed."""
    return t.float().nan_to_num(0.0)


@pytest.mark.parametrize(
    "dtype,D,G,page,num_splits",
    [
        (torch.float32, 64, 4, 16, 3),  # pages smaller than the key block (32): each key's page gathered
        (torch.float16, 128, 1, 32, None),
        (torch.float16, 64, 4, 16, 3),
        (torch.float32, 128, 1, 32, 2),  # a page holds a whole 32-key block: one table read a block
        (torch.bfloat16, 64, 4, 16, 2),  # bf16 dots in fp32 under the interpreter (test_decode.py)
    ],
    ids=str,
)
def test_paged_decode_matches_reference(dtype, D, G, page, num_splits):
    Hkv = 2
    lengths = [1, 7, 33, 2 * page, 70]  # 2 * page: ends exactly on a page boundary
    k_pages, v_pages, tables = _pool(lengths, page, Hkv, D, dtype, seed=10 + D + page)
    q = _randn(_gen(11), len(lengths), G * Hkv, D, dtype=dtype)
    n = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, POISON)
    ret = paged_decode_attention(q, k_pages, v_pages, tables, n, num_splits=num_splits, out=out)
    assert ret.data_ptr() == out.data_ptr()
    want = ref.paged_decode_attention(q.float(), _clean(k_pages), _clean(v_pages), tables, n)
    assert_close(out, want, dtype)  # a NaN slot read would have made the output NaN


@pytest.mark.parametrize("dtype,page", [(torch.float16, 16), (torch.float16, 64), (torch.float32, 32)], ids=str)
def test_paged_decode_equals_the_slab_on_contiguous_pages(dtype, page):
    """A slab (B, S_max, Hkv, D) is a pool of B * S_max / PAGE pages with sequence b on pages b * S_max / PAGE
    onwards: through its block tables, the paged decode must give the slab decode's output bit for bit."""
    B, Hkv, D, S_max = 3, 2, 64, 128
    g = _gen(20)
    k, v = (_randn(g, B, S_max, Hkv, D, dtype=dtype) for _ in range(2))
    q = _randn(g, B, 4 * Hkv, D, dtype=dtype)
    lengths = torch.tensor([1, 77, S_max], dtype=torch.int32, device=DEVICE)
    per_seq = S_max // page
    tables = torch.arange(B * per_seq, dtype=torch.int32, device=DEVICE).view(B, per_seq)
    k_pages, v_pages = k.view(-1, page, Hkv, D), v.view(-1, page, Hkv, D)
    for splits in (1, 3):
        slab = decode_attention(q, k, v, lengths, num_splits=splits)
        paged = paged_decode_attention(q, k_pages, v_pages, tables, lengths, num_splits=splits)
        assert torch.equal(paged, slab), f"{splits} splits"


@pytest.mark.parametrize(
    "dtype,D,G,page,num_splits",
    [(torch.float32, 64, 4, 16, 3), (torch.float16, 128, 1, 32, None), (torch.float16, 64, 4, 32, 2)],
    ids=str,
)
def test_paged_rope_decode_attention(dtype, D, G, page, num_splits):
    """The fused decode step over pages: q and the new key rotated, k and v written to the new token's slot
    through the table (and nowhere else), attention over the prefix plus the new key."""
    Hkv = 2
    positions = [0, 6, 32, 2 * page - 1, 69]  # the new token's position: 0, ..., the last slot of a page
    k_pages, v_pages, tables = _pool([p + 1 for p in positions], page, Hkv, D, dtype, seed=30 + D)
    B = len(positions)
    g = _gen(31)
    qkv = _randn(g, B, (G * Hkv + 2 * Hkv) * D, dtype=dtype)  # one fused projection row per sequence
    q = qkv[:, : G * Hkv * D].unflatten(-1, (G * Hkv, D))
    k = qkv[:, G * Hkv * D : (G + 1) * Hkv * D].unflatten(-1, (Hkv, D))
    v = qkv[:, (G + 1) * Hkv * D :].unflatten(-1, (Hkv, D))
    pos = torch.tensor(positions, dtype=torch.int32, device=DEVICE)
    cs = ref.rope_table(ref.rope_inv_freq(D, 500000.0).to(DEVICE), tables.shape[1] * page)
    ws = DecodeWorkspace(B, G * Hkv, Hkv, D, DEVICE)
    new_page, new_off = tables[torch.arange(B), pos // page].long(), pos % page  # the new token's slot
    new = torch.zeros(k_pages.shape[:2], dtype=torch.bool, device=DEVICE)
    new[new_page, new_off] = True
    k_pages[new], v_pages[new] = POISON, POISON  # the new token's slots: written by the kernel
    k_want, v_want = _clean(k_pages), _clean(v_pages)
    before = (k_pages.clone(), v_pages.clone())

    out = torch.full_like(q, POISON)
    paged_rope_decode_attention(q, k, v, pos, cs, k_pages, v_pages, tables, ws, num_splits=num_splits, out=out)
    f = [t.float() for t in (q, k, v)]
    want = ref.paged_rope_decode_attention(*f, pos, cs, k_want, v_want, tables, None)
    assert_close(out, want, dtype)
    assert_close(k_pages[new], k_want[new], dtype, "new keys")
    assert torch.equal(v_pages[new_page, new_off], v), "new values, copied bit for bit"
    for got, was in zip((k_pages, v_pages), before, strict=True):
        assert torch.equal(got[~new].nan_to_num(7.0), was[~new].nan_to_num(7.0)), "wrote outside the new slots"
    assert not ws.counters.any(), "the split counters are left at zero"


def _decode_bad_cases():
    k_pages, v_pages, tables = _pool([5, 20], 16, 2, 64, torch.float16, seed=40)
    q = _randn(_gen(41), 2, 4, 64, dtype=torch.float16)
    n = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)

    def call(**kw):
        args = dict(q=q, k_pages=k_pages, v_pages=v_pages, block_tables=tables, lengths=n) | kw
        return lambda: paged_decode_attention(**args)

    bad_entry = tables.clone()
    bad_entry[1, 1] = k_pages.shape[0]  # a page past the pool, in use by sequence 1 (keys 16..19)
    unused_entry = tables.clone()
    unused_entry[0, 1] = 10_000  # past sequence 0's one page: never read, so allowed
    odd = torch.zeros(4, 24, 2, 64, dtype=torch.float16, device=DEVICE)
    return [
        ("q-ndim", call(q=q[0]), "q: expected a 3-d tensor"),
        ("pages-ndim", call(k_pages=k_pages[0]), "k_pages: expected a 4-d tensor"),
        ("pages-dtype", call(v_pages=v_pages.float()), "v_pages: expected dtype"),
        ("pages-size", call(k_pages=odd, v_pages=odd), r"k_pages: expected a page size \(dim 1\) in"),
        ("pages-headdim", call(k_pages=k_pages[..., :32]), "k_pages: expected shape"),
        ("v-pages-shape", call(v_pages=v_pages[:-1]), "v_pages: expected shape"),
        ("gqa", call(q=q[:, :3]), r"k_pages: kv heads \(2\) must divide"),
        ("tables-none", call(block_tables=None), "block_tables: expected a"),
        ("tables-dtype", call(block_tables=tables.long()), "block_tables: expected an int32 tensor"),
        ("tables-ndim", call(block_tables=tables[0]), "block_tables: expected a 2-d"),
        ("tables-batch", call(block_tables=tables[:1]), r"block_tables: expected shape \(2, "),
        ("tables-stride", call(block_tables=tables.repeat(1, 2)[:, ::2]), "block_tables: expected a contiguous"),
        ("tables-range", call(block_tables=bad_entry), r"block_tables: expected the pages each sequence uses"),
        ("tables-negative", call(block_tables=tables * 0 - 1), r"block_tables: expected the pages each sequence"),
        ("len-zero", call(lengths=n * 0), r"lengths: expected values in \[1, max_pages_per_seq \* PAGE"),
        ("len-reach", call(lengths=n * 0 + tables.shape[1] * 16 + 1), r"lengths: expected values in \[1, max"),
        ("len-dtype", call(lengths=n.float()), "lengths: expected an int32 or int64"),
        ("len-int64", call(lengths=n.long()), "lengths: expected an int32 tensor with block_tables"),
        ("out-dtype", call(out=torch.empty_like(q, dtype=torch.float32)), "out: expected dtype"),
    ], unused_entry


@pytest.mark.parametrize("case", range(19), ids=[c[0] for c in _decode_bad_cases()[0]])
def test_paged_decode_bad_input(case):
    _, fn, match = _decode_bad_cases()[0][case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_paged_decode_ignores_table_entries_past_the_lengths():
    """Entries past ceil(lengths[b] / PAGE) are never read, so they may hold anything (-1 padding, a stale page)."""
    cases, unused_entry = _decode_bad_cases()
    k_pages, v_pages, tables = _pool([5, 20], 16, 2, 64, torch.float16, seed=40)
    q = _randn(_gen(41), 2, 4, 64, dtype=torch.float16)
    n = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)
    got = paged_decode_attention(q, k_pages, v_pages, unused_entry, n)
    assert_close(got, ref.paged_decode_attention(q.float(), _clean(k_pages), _clean(v_pages), tables, n), q.dtype)


def test_paged_rope_decode_bad_input():
    k_pages, v_pages, tables = _pool([5, 20], 16, 2, 64, torch.float16, seed=42)
    g = _gen(43)
    q, k, v = (_randn(g, 2, h, 64, dtype=torch.float16) for h in (4, 2, 2))
    pos, cs, ws = (
        torch.tensor([4, 19], dtype=torch.int32, device=DEVICE),
        _table(64),
        DecodeWorkspace(2, 4, 2, 64, DEVICE),
    )
    args = (q, k, v, pos, cs, k_pages, v_pages)
    with pytest.raises(ValueError, match="block_tables: expected a"):
        paged_rope_decode_attention(*args, None, ws)
    with pytest.raises(ValueError, match="k_pages: expected a page size"):
        odd = torch.zeros(4, 24, 2, 64, dtype=torch.float16, device=DEVICE)
        paged_rope_decode_attention(q, k, v, pos, cs, odd, odd, tables, ws)
    with pytest.raises(ValueError, match=r"cos_sin: expected a contiguous \(>= 48, 64\) table"):
        paged_rope_decode_attention(q, k, v, pos, cs[:20], k_pages, v_pages, tables, ws)
    with pytest.raises(ValueError, match="workspace: expected a DecodeWorkspace"):
        paged_rope_decode_attention(*args, tables, DecodeWorkspace(1, 4, 2, 64, DEVICE))
    with pytest.raises(ValueError, match="positions: expected dtype"):  # int32 only with pages: one variant
        paged_rope_decode_attention(q, k, v, pos.long(), cs, k_pages, v_pages, tables, ws)


# ---- 3. prefill over a prefix in pages plus a new chunk ------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,D,G,page",
    [
        (torch.float32, 64, 4, 16),
        (torch.float16, 128, 1, 32),
        (torch.float16, 64, 4, 16),
        (torch.bfloat16, 64, 1, 32),  # bf16 dots in fp32 under the interpreter (test_decode.py)
    ],
    ids=str,
)
def test_paged_prefill_matches_reference(dtype, D, G, page):
    """Packed chunks of ragged sequences: a whole prompt (no prefix), chunks after cached prefixes (one ending
    exactly on a page boundary), a one-token chunk, and a sequence with no new tokens this step."""
    Hkv = 2
    seq_lens = [7, 33, 2 * page + 5, 2 * page, 19]
    q_lens = [7, 12, 1, page + 3, 0]  # chunk b: the last q_lens[b] of seq_lens[b] tokens
    k_pages, v_pages, tables = _pool(seq_lens, page, Hkv, D, dtype, seed=50 + D + page)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = _randn(_gen(51), int(cu[-1]), G * Hkv, D, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, POISON)
    ret = paged_prefill_attention(q, k_pages, v_pages, cu, lens, tables, out=out)
    assert ret.data_ptr() == out.data_ptr()
    want = ref.paged_prefill_attention(q.float(), _clean(k_pages), _clean(v_pages), cu, lens, tables)
    assert_close(out, want, dtype)  # every row written (no NaN left), no NaN slot read


def test_paged_prefill_long_chunk_spans_query_tiles():
    """A chunk of more rows (q_len * G) than one 64-row tile, ragged, after a prefix: several tiles per sequence,
    the diagonal blocks masked, and max_seqlen_q given by the caller (no host read of cu_seqlens_q)."""
    Hkv, D, G, page = 1, 64, 1, 16
    seq_lens = [150, 70]  # chunks of 100 and 70 tokens
    k_pages, v_pages, tables = _pool(seq_lens, page, Hkv, D, torch.float16, seed=60)
    cu = torch.tensor([0, 100, 170], dtype=torch.int32, device=DEVICE)
    q = _randn(_gen(61), 170, G * Hkv, D, dtype=torch.float16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_prefill_attention(q, k_pages, v_pages, cu, lens, tables, max_seqlen_q=100, scale=0.1)
    want = ref.paged_prefill_attention(q.float(), _clean(k_pages), _clean(v_pages), cu, lens, tables, scale=0.1)
    assert_close(got, want, torch.float16)


def test_paged_prefill_equals_prefill_then_decode_paths():
    """A whole prompt through the paged prefill equals the slab prefill (kernels.attention) on the same keys laid
    out contiguously, within fp32's tolerance (different tiles, so not bit for bit)."""
    from llama3_triton.kernels.attention import attention

    Hkv, D, G, page, T = 2, 64, 4, 16, 40
    g = _gen(70)
    k, v = (_randn(g, 1, 48, Hkv, D, dtype=torch.float32) for _ in range(2))
    q = _randn(g, T, G * Hkv, D, dtype=torch.float32)
    tables = torch.arange(3, dtype=torch.int32, device=DEVICE)[None]
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([T], dtype=torch.int32, device=DEVICE)
    got = paged_prefill_attention(q, k.view(3, page, Hkv, D), v.view(3, page, Hkv, D), cu, lens, tables)
    assert_close(got, attention(q[None], k, v)[0], torch.float32)


def _prefill_bad_cases():
    k_pages, v_pages, tables = _pool([5, 20], 16, 2, 64, torch.float16, seed=80)
    q = _randn(_gen(81), 9, 4, 64, dtype=torch.float16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)

    def call(**kw):
        args = dict(q=q, k_pages=k_pages, v_pages=v_pages, cu_seqlens_q=cu, seq_lens=lens, block_tables=tables)
        return lambda: paged_prefill_attention(**(args | kw))

    i32 = dict(dtype=torch.int32, device=DEVICE)
    return [
        ("q-ndim", call(q=q[None]), "q: expected a 3-d tensor"),
        ("q-headdim", call(q=q[..., :32]), "q: head dim must be 64 or 128"),
        ("pages-dtype", call(k_pages=k_pages.float()), "k_pages: expected dtype"),
        ("gqa", call(q=q[:, :3]), r"k_pages: kv heads \(2\) must divide"),
        ("cu-short", call(cu_seqlens_q=cu[:1]), r"cu_seqlens_q: expected a 1-d \(B \+ 1,\)"),
        ("cu-dtype", call(cu_seqlens_q=cu.long()), "cu_seqlens_q: expected an int32 tensor"),
        ("cu-end", call(cu_seqlens_q=torch.tensor([0, 4, 8], **i32)), "cu_seqlens_q: expected 0 = cu"),
        ("cu-start", call(cu_seqlens_q=torch.tensor([1, 4, 9], **i32)), "cu_seqlens_q: expected 0 = cu"),
        ("cu-falls", call(cu_seqlens_q=torch.tensor([0, 10, 9], **i32)), "cu_seqlens_q: expected 0 = cu"),
        ("lens-shape", call(seq_lens=lens[:1]), r"seq_lens: expected shape \(2,\)"),
        ("lens-dtype", call(seq_lens=lens.long()), "seq_lens: expected an int32 tensor"),
        ("lens-short", call(seq_lens=torch.tensor([3, 20], **i32)), "seq_lens: expected each sequence's keys"),
        ("lens-reach", call(seq_lens=torch.tensor([5, 200], **i32)), r"seq_lens: expected values in \[1, max"),
        ("tables-dtype", call(block_tables=tables.long()), "block_tables: expected an int32 tensor"),
        ("tables-range", call(block_tables=tables * 0 + 999), "block_tables: expected the pages each sequence"),
        ("max-q", call(max_seqlen_q=-1), r"max_seqlen_q: expected an int >= 0"),
        ("scale", call(scale=0.0), "scale: expected a finite float > 0"),
        ("out-shape", call(out=q[:-1]), "out: expected shape"),
    ]


@pytest.mark.parametrize("case", range(18), ids=[c[0] for c in _prefill_bad_cases()])
def test_paged_prefill_bad_input(case):
    _, fn, match = _prefill_bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_compile_variants_cover_every_page_size():
    """The compile gate's lists: each paged kernel in every page size the launchers accept, well formed."""
    from llama3_triton.kernels import decode, decode_step, paged_attention, rope
    from llama3_triton.kernels._launch import PAGE_SIZES

    for module in (decode, decode_step, paged_attention, rope):
        variants = module.compile_variants()
        assert len({v["name"] for v in variants}) == len(variants), module.__name__
        for v in variants:
            assert list(v["signature"]) == list(v["fn"].arg_names), v["name"]
    for module in (decode, decode_step):
        pages = {v["constexprs"]["PAGE_SIZE"] for v in module.compile_variants() if "PAGE_SIZE" in v["constexprs"]}
        assert pages == {0, *PAGE_SIZES}, module.__name__
    assert {v["constexprs"]["PAGE_SIZE"] for v in paged_attention.compile_variants()} == set(PAGE_SIZES)
    assert any(v["constexprs"].get("SLOTS") for v in rope.compile_variants())
