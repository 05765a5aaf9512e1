"""The engine's thread: requests from other threads, outputs to their sinks; a sink that fails (its event loop gone
at shutdown) or a request the engine refuses leaves the thread serving the others."""

from __future__ import annotations

import queue

from llama3_triton.model.engine import Engine, Request
from llama3_triton.model.server.worker import EngineWorker


def _until_finished(q: queue.Queue) -> list:
    outs = []
    while not outs or (not isinstance(outs[-1], BaseException) and not outs[-1].finished):
        outs.append(q.get(timeout=60))
    return outs


def test_a_failing_sink_or_a_refused_request_leaves_the_thread_serving(llm):
    engine = Engine(llm, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_tokens=1024)
    worker = EngineWorker(engine).start()
    try:
        ids = llm.tokenizer.encode("Hello there", bos=True)

        def gone(out):
            raise RuntimeError("Event loop is closed")

        refused, served = queue.Queue(), queue.Queue()
        worker.submit("gone", ids, Request(max_tokens=6, temperature=0), gone)
        worker.submit("too-long", ids, Request(max_tokens=10_000, temperature=0), refused.put)
        worker.submit("served", ids, Request(max_tokens=6, temperature=0), served.put)
        err = refused.get(timeout=60)
        assert isinstance(err, ValueError) and "longer than the context" in str(err)
        outs = _until_finished(served)
        want = llm.generate([ids], max_new_tokens=6, temperature=0, stop_tokens=[]).tokens[0]
        assert outs[-1].finish_reason == "length" and outs[-1].token_ids == want
        assert worker.alive()
        worker.abort("gone")  # already finished: nothing to do, nothing breaks
        again = queue.Queue()
        worker.submit("again", ids, Request(max_tokens=2, temperature=0), again.put)
        assert _until_finished(again)[-1].token_ids == want[:2]
    finally:
        worker.stop()
    assert not worker.alive()
