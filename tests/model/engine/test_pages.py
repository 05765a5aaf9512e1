"""The page pool's bookkeeping: allocation in least-recently-freed order, reference counts, and the prefix cache
keyed by content (a page and everything before it)."""

from __future__ import annotations

import pytest

from llama3_triton.model.engine.pages import PagePool, PoolExhausted


def test_allocate_release_and_exhaustion():
    pool = PagePool(3, 4)
    pages = [pool.allocate() for _ in range(3)]
    assert sorted(pages) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.release([pages[0], pages[1]])  # the last page of a sequence is freed first: evicted first
    assert pool.num_free == 2 and pool.allocate() == pages[1]
    with pytest.raises(AssertionError, match="released more often"):
        pool.release([pages[0]])


def test_full_pages_are_found_by_content_and_everything_before_them():
    pool = PagePool(8, 4)
    tokens = list(range(10))  # two full pages and two tokens
    pages = [pool.allocate() for _ in range(3)]
    assert pool.register(pages, tokens, 0, 0)[0] == 2  # only the full pages
    found, parent = pool.lookup(tokens)
    assert found == pages[:2] and parent > 0 and [pool.refs[p] for p in pages] == [2, 2, 1]
    # The same second page after a different first one is another content.
    assert pool.lookup([9, 9, 9, 9, 4, 5, 6, 7, 0])[0] == []
    # At most (len - 1) // PAGE pages: the last token is always computed (its logits are sampled from).
    assert pool.lookup(list(range(8)))[0] == pages[:1]


def test_a_freed_cached_page_is_reused_until_it_is_evicted():
    pool = PagePool(2, 2)
    a = [pool.allocate(), pool.allocate()]
    pool.register(a, [1, 2, 3, 4], 0, 0)
    pool.release(a)  # both stay cached on the free list
    assert pool.lookup([1, 2, 3, 4, 5])[0] == a  # taken back from the free list
    pool.release(a)
    p = pool.allocate()  # evicts the least recently freed: the second page (released first) ...
    assert p == a[1] and pool.lookup([1, 2, 3, 4, 5])[0] == [a[0]]  # ... the first is still found


def test_a_content_cached_elsewhere_is_not_entered_twice_and_the_chain_goes_on():
    pool = PagePool(6, 2)
    first = [pool.allocate(), pool.allocate()]
    pool.register(first, [1, 2, 3, 4], 0, 0)
    second = [pool.allocate(), pool.allocate(), pool.allocate()]  # the same prefix computed again, one more page
    assert pool.register(second, [1, 2, 3, 4, 5, 6], 0, 0)[0] == 3
    assert second[0] not in pool.key_of and second[2] in pool.key_of
    assert pool.lookup([1, 2, 3, 4, 5, 6, 7])[0] == [*first, second[2]]


def test_no_prefix_caching_finds_nothing():
    pool = PagePool(4, 2, prefix_caching=False)
    pages = [pool.allocate(), pool.allocate()]
    pool.register(pages, [1, 2, 3, 4], 0, 0)
    assert pool.lookup([1, 2, 3, 4, 5]) == ([], 0)
