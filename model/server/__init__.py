"""The OpenAI-compatible HTTP server on the engine (``llama3-triton serve``).

protocol.py  OpenAI's request fields, checked by hand (a 400 names the field), and its response shapes
worker.py    ``EngineWorker``: the engine's own thread, fed by the handlers through a queue
app.py       the aiohttp routes (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics), the
             API key, the queue limit, streaming, shutdown on SIGTERM

Nothing is imported here, so the command line can read the defaults without loading aiohttp or torch.
"""

DEFAULT_MAX_QUEUE = 256  # requests that may wait for a sequence slot beyond max_num_seqs; more get 429
