"""The page pool's bookkeeping: which pages are free, who holds each, and the prefix cache. No tensors here: the
pages themselves are the model's (``Llama.setup_pages``); this module hands out their indices.

A page holds PAGE consecutive tokens' keys and values of one sequence, in every layer. A sequence's block table
is the list of its pages in order: token t lives in page ``table[t // PAGE]`` at offset ``t % PAGE``.

**Prefix caching.** A page whose PAGE tokens are all computed is *full*; it is entered in the cache under its
key, (the key of the page before it, its tokens), so a key names a page's content and everything before it.
A new request walks its prompt page by page through the cache and takes every page it finds (its reference
count goes up): those tokens are not computed again. A page whose count falls to zero stays cached on the free
list, least recently used first; allocating a page takes the least recently used one, and if that one was
cached, its entry goes. Keys compare the tokens themselves (a dict of tuples), so two contents never share a
page however their hashes fall.
"""

from __future__ import annotations

from collections import OrderedDict

from llama3_triton.model.errors import UserError

PAGE_SIZE = 16  # tokens a page: the engine's default (see model/engine/engine.py for why)


class PoolExhausted(Exception):
    """No free page is left: the scheduler preempts a request and tries again."""


class PagePool:
    """``num_pages`` pages of ``page_size`` tokens: reference counts, a free list in least-recently-used order,
    and (``prefix_caching``) the cache of full pages by content."""

    def __init__(self, num_pages: int, page_size: int = PAGE_SIZE, prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise UserError(f"a page pool needs at least one page of at least one token, got {num_pages} x {page_size}")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.refs = [0] * num_pages
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))  # LRU first
        self.key_of: dict[int, tuple] = {}  # cached page -> its key
        self.page_of: dict[tuple, int] = {}  # key -> cached page
        self._ids: dict[int, int] = {}  # cached page -> its content id (the next page's key refers to it)
        self._next_id = 1

    @property
    def num_free(self) -> int:
        """Pages that can be allocated now (cached free pages included: allocating evicts them)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free)

    def allocate(self) -> int:
        """A page for one more block of a sequence (count 1); the least recently freed one, its cache entry
        dropped. Raises PoolExhausted when none is free."""
        if not self.free:
            raise PoolExhausted
        page, _ = self.free.popitem(last=False)
        self._uncache(page)
        self.refs[page] = 1
        return page

    def release(self, pages: list[int]) -> None:
        """A sequence lets go of its pages (in order: the last pages are the first evicted, as they are the least
        likely to be shared)."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise AssertionError(f"page {page} released more often than it was taken")
            if self.refs[page] == 0:
                self.free[page] = None  # most recently used end

    # ---- the prefix cache -----------------------------------------------------------------------------------

    def key(self, parent: int, tokens: list[int]) -> tuple:
        """The key of a full page of ``tokens`` after the page whose content id is ``parent`` (0: the first)."""
        return parent, tuple(tokens)

    def lookup(self, tokens: list[int]) -> tuple[list[int], int]:
        """The cached pages holding the longest run of whole pages at the start of ``tokens``, each taken (count
        + 1), and the content id of the last (0 for none: where ``register`` goes on). At most
        ``(len(tokens) - 1) // page_size`` pages: the last token is always computed, as its logits are what the
        request samples from."""
        found, parent, P = [], 0, self.page_size
        if not self.prefix_caching:
            return found, parent
        for i in range((len(tokens) - 1) // P):
            page = self.page_of.get(self.key(parent, tokens[i * P : (i + 1) * P]))
            if page is None:
                break
            if self.refs[page] == 0:
                del self.free[page]
            self.refs[page] += 1
            found.append(page)
            parent = self._ids[page]
        return found, parent

    def register(self, pages: list[int], tokens: list[int], done: int, parent: int) -> tuple[int, int]:
        """Enter the full pages of a sequence whose computed tokens are ``tokens``, from its page ``done`` on
        (those before are entered or found already; ``parent`` is the content id of page ``done - 1``, 0 for
        none). A page whose content is cached elsewhere already stays out (the sequence keeps its own copy) and
        the chain goes on from the cached one. Returns the new (done, parent)."""
        if not self.prefix_caching:
            return done, parent
        for i in range(done, min(len(pages), len(tokens) // self.page_size)):
            key = self.key(parent, tokens[i * self.page_size : (i + 1) * self.page_size])
            page = self.page_of.get(key)
            if page is None:
                page = pages[i]
                if page in self.key_of:  # cannot happen: a page's tokens do not change once it is full
                    raise AssertionError(f"page {page} is cached under another key")
                self.key_of[page], self.page_of[key] = key, page
                self._ids[page], self._next_id = self._next_id, self._next_id + 1
            parent, done = self._ids[page], i + 1
        return done, parent

    def _uncache(self, page: int) -> None:
        key = self.key_of.pop(page, None)
        if key is not None:
            del self.page_of[key]
            del self._ids[page]


__all__ = ["PAGE_SIZE", "PagePool", "PoolExhausted"]
