"""The request engine: many requests at once over a paged KV cache.

pages.py     the page pool's bookkeeping: free pages, reference counts, the prefix cache of full pages
engine.py    ``Engine``: requests in (``add_request``, ``abort``), steps (continuous batching, chunked prefill,
             preemption by recompute, per-request sampling), outputs per request, ``generate`` on top, metrics
"""

from llama3_triton.model.engine.engine import Engine, Request, RequestOutput

__all__ = ["Engine", "Request", "RequestOutput"]
