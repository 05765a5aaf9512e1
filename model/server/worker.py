"""The engine's own thread: the one place that touches the ``Engine``, fed by the HTTP handlers through a queue.

The model's steps block (a forward pass is milliseconds to seconds of torch work), and the HTTP side is an asyncio
event loop that must keep accepting and streaming meanwhile. So the engine lives in one thread of its own, which
loops: take every command waiting in its inbox (add a request, abort one), run one ``Engine.step()``, hand each
output to the sink of the request it belongs to; with nothing to do it sleeps on the inbox. A sink is a callable
the handler gave with its request; the server's sinks move the output onto the event loop
(``loop.call_soon_threadsafe``), where the handler awaits it.

An abort (a client that left) is taken before the next step, so the request's pages are free by the end of the
step in flight: "within a step". A step that raises (a bug, NaN logits) ends every request in flight with the
error instead of taking the thread down; the engine's metrics are copied after each step, so a scrape never reads
them mid-step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from llama3_triton.model.engine import Engine, Request, RequestOutput
from llama3_triton.model.engine.engine import StepRecord

Sink = Callable[[RequestOutput | BaseException], None]


class EngineWorker:
    """Runs ``engine`` in a thread; ``submit``/``abort`` from any thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.on_step: Callable[[StepRecord], None] | None = None  # called in this thread after each model step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._stopping = False
        self.metrics = engine.metrics()  # the latest copy, for scrapes from other threads
        self._thread = threading.Thread(target=self._run, name="llama3-triton-engine", daemon=True)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def submit(self, request_id: str, prompt: list[int], request: Request, sink: Sink) -> None:
        """Queue a request: ``sink`` gets each of its outputs (the last one ``finished``), or the exception that
        ended it."""
        self._inbox.put(("add", request_id, prompt, request, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all",))

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    # ---- the thread ---------------------------------------------------------------------------------------------

    def _take(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, rid, prompt, request, sink = command
            try:
                self.engine.add_request(prompt, request, rid)
            except Exception as e:  # checked by the server already; a refusal here still reaches its client
                self._give(sink, e)
                return
            self._sinks[rid] = sink
        elif kind == "abort":
            self.engine.abort(command[1])
        elif kind == "abort_all":
            for rid in list(self._sinks):
                self.engine.abort(rid)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _give(self, sink: Sink, item) -> None:
        try:
            sink(item)
        except Exception:  # noqa: BLE001 - a sink whose event loop is gone (shutdown): nobody is waiting
            pass

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: every request in flight is told, /health turns 503 (alive() is False)
            for sink in list(self._sinks.values()):
                self._give(sink, e)
            self._sinks.clear()
            raise

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            busy = engine.has_unfinished()
            try:
                command = self._inbox.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                self._take(command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopping or not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - every request in flight learns of it; the thread goes on
                for rid, sink in list(self._sinks.items()):
                    engine.abort(rid)
                    self._give(sink, e)
                self._sinks.clear()
                while engine.has_unfinished():  # the aborted requests' last outputs: nobody to give them to
                    try:
                        engine.step()
                    except Exception:  # noqa: BLE001
                        break
                continue
            if self.on_step is not None and engine.last_step is not None:
                self.on_step(engine.last_step)
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    if out.finished:
                        del self._sinks[out.request_id]
                    self._give(sink, out)
            self.metrics = engine.metrics()
        for sink in list(self._sinks.values()):  # stopped with requests in flight: each is told
            self._give(sink, RuntimeError("the server stopped"))


__all__ = ["EngineWorker"]
