"""The HTTP side: aiohttp routes in OpenAI's shapes over the engine's thread (model/server/worker.py).

Why aiohttp and prometheus-client: both are on the GPU image as it stands (FastAPI, uvicorn and pydantic are not),
both are well kept, and between them they do all a server needs here (HTTP/1.1 with keep-alive, streaming
responses, request size limits, cancelling a handler whose client left; Prometheus' text format). The request
checks are plain functions in protocol.py, which a reader can follow without a framework's conventions.

A request's path: the middleware checks the API key (every route but ``/health``) and turns any error into
OpenAI's error object; the handler reads the body (at most MAX_BODY_BYTES: a 413 past it), decodes the JSON,
checks the model name and every field (protocol.py: a 400 names the field), encodes the prompt, and refuses with
429 and ``Retry-After`` when the engine already holds ``max_num_seqs + max_queue`` requests. Then each choice goes
to the engine as its own request and the handler awaits its outputs: collected into one JSON answer, or written as
server-sent events as they come (``data: {...}`` per chunk, ``data: [DONE]`` at the end). A client that leaves
cancels its handler (aiohttp's handler cancellation), whose ``finally`` aborts the choices still running; their
pages are free after the engine's next step.

Shutdown (SIGTERM or SIGINT): the listening socket closes and new requests get 503; requests in flight have
``shutdown_timeout`` seconds to finish; any still running then end with a final chunk whose finish_reason is
``abort``; the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llama3_triton.model.errors import UserError
from llama3_triton.model.server import DEFAULT_MAX_QUEUE
from llama3_triton.model.server import protocol as P
from llama3_triton.model.server.worker import EngineWorker

MAX_BODY_BYTES = 4 * 2**20  # a whole context of text or token ids is well under 1 MiB
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
# Steps: finer, since a step's time against the inter-token latency's tail is what they are read for
_STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)


@dataclass
class ServerState:
    """What every handler shares: the engine's thread, the names, the limits, the metrics."""

    worker: EngineWorker
    model_name: str
    api_key: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0  # engine requests (choices) submitted and not yet finished
    draining: bool = False

    def __post_init__(self):
        engine = self.worker.engine
        self.tokenizer, self.vocab = engine.tokenizer, engine.llm.args.vocab_size
        # What one request may use: the context, or the whole page pool when it is smaller (--kv-cache-tokens)
        self.context = min(engine.max_model_len, engine.pool.num_pages * engine.page_size)
        try:
            from llama3_triton.model.tokenizers.hf import chat_format

            self.chat_format = chat_format(self.tokenizer)
        except UserError:  # no chat template: /v1/chat/completions says so per request
            self.chat_format = None
        self.capacity = engine.max_num_seqs + self.max_queue
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llama3_triton_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("llama3_triton_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("llama3_triton_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("llama3_triton_time_to_first_token_seconds", "from a request's arrival to its first "
                              "token", buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("llama3_triton_inter_token_latency_seconds", "between a choice's consecutive tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("llama3_triton_request_latency_seconds", "from arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.steps = Histogram(
            "llama3_triton_engine_step_seconds",
            "one step of the model (forward and sampling), by whether it carried prompt tokens",
            ["kind"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.worker.on_step = self._observe_step
        r.register(_EngineCollector(self))

    def _observe_step(self, step) -> None:  # in the engine's thread
        self.steps.labels("prompt" if step.prompt_tokens else "decode").observe(step.seconds)


class _EngineCollector:
    """The engine's own counts (a copy made by its thread after each step), as gauges and counters."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self):
        m = self.state.worker.metrics
        for name, doc in (("running", "requests running"), ("waiting", "requests waiting for a slot or pages"),
                          ("pages_total", "KV-cache pages"), ("pages_used", "KV-cache pages held by requests"),
                          ("pages_free", "KV-cache pages free (cached prefixes included)")):  # fmt: skip
            g = GaugeMetricFamily(f"llama3_triton_engine_{name}", doc)
            g.add_metric([], m[name])
            yield g
        g = GaugeMetricFamily("llama3_triton_requests_in_flight", "requests admitted by the server, not finished")
        g.add_metric([], self.state.inflight)
        yield g
        for name, doc in (("preemptions", "requests preempted for pages"),
                          ("prefix_hit_tokens", "prompt tokens taken from the prefix cache"),
                          ("generated_tokens", "tokens the engine sampled (aborted requests' included)")):  # fmt: skip
            c = CounterMetricFamily(f"llama3_triton_engine_{name}", doc)
            c.add_metric([], m[name])
            yield c


STATE = web.AppKey("state", ServerState)


def create_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_and_auth])
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


def _error_response(e: P.ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return web.json_response(e.body(), status=e.status, headers=headers)


@web.middleware
async def _errors_and_auth(request: web.Request, handler):
    state = request.app[STATE]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        if state.api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                raise P.ApiError(401, "invalid API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")  # fmt: skip
        response = await handler(request)
        status = response.status
        return response
    except P.ApiError as e:
        status = e.status
        return _error_response(e)
    except web.HTTPException as e:  # aiohttp's own: no route (404), wrong method (405), ...
        status = e.status
        return _error_response(P.ApiError(e.status, e.reason or "error", code=None))
    except (ConnectionResetError, asyncio.CancelledError):  # the client left: counted as nginx counts it, 499
        status = 499
        raise
    finally:
        state.requests.labels(route, str(status)).inc()


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "shutting down"}, status=503)
    if not state.worker.alive():
        return web.json_response({"status": "the engine stopped"}, status=503)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    s = request.app[STATE]
    card = {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "llama3-triton",
            "max_model_len": s.context}  # fmt: skip
    return web.json_response({"object": "list", "data": [card]})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _body(request: web.Request) -> dict:
    state = request.app[STATE]
    if state.draining:
        raise P.ApiError(503, "the server is shutting down", type_="server_error")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise P.ApiError(413, f"the request body is over {MAX_BODY_BYTES:,} bytes") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # malformed JSON, not UTF-8, nested past the parser's depth
        raise P.ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})") from None


async def completions(request: web.Request) -> web.StreamResponse:
    s = request.app[STATE]
    body = await _body(request)
    P.check_model(body, s.model_name)
    # In a worker thread: encoding a long prompt must not stall the streams this loop is writing.
    parsed = await asyncio.to_thread(P.parse_completion, body, s.tokenizer, s.vocab, s.context)
    return await _serve(request, s, parsed)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    s = request.app[STATE]
    body = await _body(request)
    P.check_model(body, s.model_name)
    parsed = await asyncio.to_thread(P.parse_chat, body, s.chat_format, s.vocab, s.context)
    return await _serve(request, s, parsed)


# ---- one request, from admission to its last byte -----------------------------------------------------------------


async def _serve(request: web.Request, s: ServerState, parsed: P.Parsed) -> web.StreamResponse:
    k = len(parsed.requests)
    if k > s.capacity:
        raise P.ApiError(400, f"{k} choices (n x prompts) is more than this server holds at once ({s.capacity})",
                         param="n")  # fmt: skip
    if s.inflight + k > s.capacity:
        raise P.ApiError(429, "the server is at capacity: retry later", type_="rate_limit_error",
                         code="rate_limit_exceeded")  # fmt: skip
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue = asyncio.Queue()
    prefix = P.new_id("chatcmpl" if parsed.kind == "chat" else "cmpl")
    ids = [f"{prefix}-{i}" for i in range(k)]
    open_ids = set(ids)
    s.inflight += k
    arrival = time.monotonic()
    for i, (rid, req) in enumerate(zip(ids, parsed.requests, strict=True)):
        prompt = parsed.prompts[i // parsed.n]

        def sink(out, i=i):
            loop.call_soon_threadsafe(outputs.put_nowait, (i, out))

        s.worker.submit(rid, prompt, req, sink)
    s.prompt_tokens.inc(sum(len(p) for p in parsed.prompts))
    timing = [[None, None] for _ in range(k)]  # per choice: first token time, last token time

    async def next_output():
        i, out = await outputs.get()
        if isinstance(out, BaseException):
            open_ids.discard(ids[i])
            raise P.ApiError(
                400 if isinstance(out, UserError) else 500,
                f"{type(out).__name__}: {out}",
                type_="invalid_request_error" if isinstance(out, UserError) else "server_error",
            )
        now = time.monotonic()
        if out.new_token_ids:
            s.generation_tokens.inc(len(out.new_token_ids))
            first, last = timing[i]
            if first is None:
                timing[i][0] = now
                s.ttft.observe(now - arrival)
            else:
                s.itl.observe((now - last) / len(out.new_token_ids))
            timing[i][1] = now
        if out.finished:
            open_ids.discard(ids[i])
            s.e2e.observe(now - arrival)
        return i, out

    try:
        if parsed.stream:
            return await _stream(request, s, parsed, prefix, k, next_output, open_ids)
        return await _collect(s, parsed, prefix, k, next_output, open_ids)
    finally:
        for rid in open_ids:  # the client left (the handler was cancelled) or an error: free what still runs
            s.worker.abort(rid)
        s.inflight -= k


def _prompt_of(parsed: P.Parsed, i: int) -> int:
    return i // parsed.n


async def _collect(s: ServerState, parsed: P.Parsed, rid: str, k: int, next_output, open_ids) -> web.Response:
    finals, logprobs = [None] * k, [[] for _ in range(k)]
    while open_ids:
        i, out = await next_output()
        logprobs[i] += out.logprobs or []
        if out.finished:
            finals[i] = out
    choices = []
    for i, out in enumerate(finals):
        if parsed.kind == "chat":
            lp = P.chat_logprobs(s.tokenizer, logprobs[i]) if parsed.logprobs is not None else None
            choices.append({"index": i, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                            "finish_reason": out.finish_reason})  # fmt: skip
        else:
            echo = parsed.prompt_texts[_prompt_of(parsed, i)] if parsed.echo else ""
            lp = P.completion_logprobs(s.tokenizer, logprobs[i], len(echo)) if parsed.logprobs is not None else None
            choices.append({"index": i, "text": echo + out.text, "logprobs": lp, "finish_reason": out.finish_reason})
    use = _usage(parsed, finals)
    body = (P.chat_body if parsed.kind == "chat" else P.completion_body)(rid, s.model_name, choices, use)
    return web.json_response(body)


def _usage(parsed: P.Parsed, finals: list) -> dict:
    prompt = sum(len(p) for p in parsed.prompts)
    completion = sum(len(o.token_ids) for o in finals)
    cached = sum(finals[j * parsed.n].cached_tokens for j in range(len(parsed.prompts)))
    return P.usage(prompt, completion, cached)


async def _stream(request, s: ServerState, parsed: P.Parsed, rid: str, k: int, next_output, open_ids):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    created, chat = int(time.time()), parsed.kind == "chat"
    use = None if parsed.include_usage else False

    async def send(choices: list[dict], u=use) -> None:
        event = P.chunk(parsed.kind, rid, s.model_name, created, choices, u)
        await resp.write(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")

    offsets = [0] * k
    for i in range(k):  # the opening chunk: chat's role; completions' echoed prompt
        if chat:
            await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}])  # fmt: skip
        elif parsed.echo:
            text = parsed.prompt_texts[_prompt_of(parsed, i)]
            offsets[i] = len(text)
            await send([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
    finals = [None] * k
    try:
        while open_ids:
            i, out = await next_output()
            if out.delta or out.logprobs:
                if chat:
                    lp = P.chat_logprobs(s.tokenizer, out.logprobs) if parsed.logprobs is not None else None
                    c = {"index": i, "delta": {"content": out.delta}, "logprobs": lp, "finish_reason": None}
                else:
                    lp = None
                    if parsed.logprobs is not None:
                        lp = P.completion_logprobs(s.tokenizer, out.logprobs or [], offsets[i])
                    offsets[i] += len(out.delta)
                    c = {"index": i, "text": out.delta, "logprobs": lp, "finish_reason": None}
                await send([c])
            if out.finished:
                finals[i] = out
                done = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
                await send([{**done, "logprobs": None, "finish_reason": out.finish_reason}])
        if parsed.include_usage:
            await send([], _usage(parsed, finals))
    except P.ApiError as e:  # the engine failed mid-stream: the client learns it in the stream it reads
        await resp.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


# ---- running it ---------------------------------------------------------------------------------------------------


async def _run(state: ServerState, host: str, port: int, shutdown_timeout: float, ready) -> None:
    app = create_app(state)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = runner.addresses[0]
    ready(bound[0], bound[1])
    await stop.wait()
    print("shutting down: no new requests; waiting for those in flight", file=sys.stderr, flush=True)
    state.draining = True
    await site.stop()
    deadline = time.monotonic() + shutdown_timeout
    while state.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.inflight:  # out of time: each gets its last chunk, finish_reason "abort"
        state.worker.abort_all()
        deadline = time.monotonic() + 10
        while state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    await runner.cleanup()


def serve(worker: EngineWorker, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, shutdown_timeout: float = 30.0,
          ready=None) -> None:  # fmt: skip
    """Serve until SIGTERM or SIGINT; ``ready(host, port)`` is called once the socket listens."""
    state = ServerState(worker, model_name, api_key, max_queue)

    def say(h, p):
        print(f"serving {model_name} on http://{h}:{p} (OpenAI API: /v1/completions, /v1/chat/completions; "
              "/health, /metrics)", file=sys.stderr, flush=True)  # fmt: skip
        if ready is not None:
            ready(h, p)

    worker.start()
    try:
        asyncio.run(_run(state, host, port, shutdown_timeout, say))
    finally:
        with contextlib.suppress(Exception):
            worker.stop()


__all__ = ["create_app", "serve", "ServerState", "MAX_BODY_BYTES", "DEFAULT_MAX_QUEUE"]
