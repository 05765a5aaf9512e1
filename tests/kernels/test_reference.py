"""kernels/reference.py against the plain formula: the torch backend's prefill attention goes in chunks of queries
(O(chunk x S) memory, never the (T, S) score matrix) and still equals the whole-matrix softmax in float64."""

from __future__ import annotations

import pytest
import torch


def _attention_fp64(q, k, v, start_pos):
    """Causal GQA attention in float64, the plain way (the whole score matrix at once)."""
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    S = start_pos + T
    kk = k[:, :S].double().repeat_interleave(G, dim=2).transpose(1, 2)  # (B, Hq, S, D)
    vv = v[:, :S].double().repeat_interleave(G, dim=2).transpose(1, 2)
    scores = q.double().transpose(1, 2) @ kk.transpose(-1, -2) / D**0.5  # (B, Hq, T, S)
    mask = torch.arange(S)[None, :] > torch.arange(start_pos, S)[:, None]
    return (torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ vv).transpose(1, 2)


@pytest.mark.parametrize(("T", "start_pos", "G"), [(37, 0, 4), (19, 11, 1), (64, 5, 2)])
def test_chunked_reference_attention_matches_the_whole_matrix(monkeypatch, T, start_pos, G):
    from llama3_triton.kernels import reference

    g = torch.Generator().manual_seed(T)
    B, Hkv, D = 2, 2, 64
    q = torch.randn(B, T, Hkv * G, D, generator=g)
    k, v = (torch.randn(B, start_pos + T + 3, Hkv, D, generator=g) for _ in range(2))
    want = _attention_fp64(q, k, v, start_pos)
    whole = reference.attention(q, k, v, start_pos=start_pos)  # the default budget: one chunk at these sizes
    assert (whole.double() - want).abs().max() < 2e-6
    shapes = []
    real_softmax = torch.softmax

    def softmax(x, dim):
        shapes.append(tuple(x.shape))
        return real_softmax(x, dim=dim)

    monkeypatch.setattr(torch, "softmax", softmax)
    S = start_pos + T
    for rows in (1, 3, 8):
        shapes.clear()
        monkeypatch.setattr(reference, "ATTENTION_SCORE_BYTES", rows * 4 * B * Hkv * G * S)
        got = reference.attention(q, k, v, start_pos=start_pos)
        assert (got - whole).abs().max() < 1e-6, rows
        assert len(shapes) == -(-T // rows) and all(s[3] <= rows for s in shapes)  # chunks of `rows` queries
        assert max(s[3] * s[4] for s in shapes) <= rows * S  # never the (T, S) matrix


def test_paged_prefill_reference_equals_the_plain_formula_with_one_token_chunks():
    """The reference's paged prefill runs its one-token chunks (an engine step's decodes beside a prompt's chunk)
    together through the paged decode attention: every row still equals the plain causal formula in float64 over
    its own sequence's keys, read from shuffled pages."""
    from llama3_triton.kernels import reference

    g = torch.Generator().manual_seed(5)
    Hkv, G, D, page = 2, 3, 64, 16
    seq_lens, q_lens = [9, 40, 1, 33, 17, 5], [1, 6, 1, 1, 17, 0]
    pages_of = [-(-n // page) for n in seq_lens]
    order = torch.randperm(sum(pages_of), generator=g).tolist()  # pages in shuffled order in the pool
    tables = torch.zeros(len(seq_lens), max(pages_of), dtype=torch.int32)
    k_pages, v_pages = (torch.randn(len(order), page, Hkv, D, generator=g) for _ in range(2))
    i = 0
    for b, n in enumerate(pages_of):
        tables[b, :n] = torch.tensor(order[i : i + n])
        i += n
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hkv * G, D, generator=g)
    got = reference.paged_prefill_attention(q, k_pages, v_pages, cu, torch.tensor(seq_lens, dtype=torch.int32), tables)
    for b, (n, t) in enumerate(zip(seq_lens, q_lens, strict=True)):
        if t == 0:
            continue
        k = k_pages[tables[b, : pages_of[b]].long()].reshape(-1, Hkv, D)[None, :n]
        v = v_pages[tables[b, : pages_of[b]].long()].reshape(-1, Hkv, D)[None, :n]
        want = _attention_fp64(q[None, cu[b] : cu[b + 1]], k, v, n - t)[0]
        torch.testing.assert_close(got[cu[b] : cu[b + 1]].double(), want, atol=1e-5, rtol=1e-5)
