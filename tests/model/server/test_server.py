"""``llama3-triton serve`` against the official ``openai`` client and plain HTTP: answers equal the model's (tokens,
usage, log-probabilities), streams equal answers, stop strings never leak, bad requests get OpenAI's error object
and disturb nobody, a client that leaves frees its pages, 32 streams at once all come back whole, the API key holds,
a full queue says 429, SIGTERM ends streams with a last chunk and exits 0."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time

import pytest
import torch

from tests.model.server.harness import API_KEY, CONTEXT, Server

PROMPT = "The capital of France is"


def _sse(server: Server, path: str, body: dict) -> tuple[list[dict], bool]:
    """A streamed request read to its end with plain HTTP: the events' JSON, and whether [DONE] closed it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})  # fmt: skip
    r = conn.getresponse()
    assert r.status == 200, r.read()
    events, done = [], False
    for raw in r.read().decode().split("\n\n"):
        if not raw:
            continue
        assert raw.startswith("data: "), raw
        if raw == "data: [DONE]":
            done = True
        else:
            assert not done, "an event after [DONE]"
            events.append(json.loads(raw[6:]))
    conn.close()
    return events, done


def _greedy_ids(llm, prompt_ids: list[int], n: int) -> list[int]:
    out = llm.generate([prompt_ids], max_new_tokens=n, temperature=0, stop_tokens=[])
    return out.tokens[0]


def test_completions_and_chat_answer_as_the_model_does(server, openai_client, llm):
    """Greedy completion = the model's greedy tokens; usage = the tokenizer's counts (chat: the chat template's)."""
    r = openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    want = _greedy_ids(llm, ids, 8)
    assert r.choices[0].text == llm.tokenizer.decode(want)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion" and r.model == "tiny"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)

    from llama3_triton.model.tokenizers.hf import chat_format

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot_id|> there"}]
    c = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    chat_ids = chat_format(llm.tokenizer).encode_dialog_prompt(messages)  # the user's <|eot_id|> stays text
    assert chat_ids.count(llm.tokenizer.eot_id) == 2  # the system's and the user's own turn ends, no third
    assert c.usage.prompt_tokens == len(chat_ids) and c.usage.completion_tokens == 6
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == llm.tokenizer.decode(_greedy_ids(llm, chat_ids, 6))
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_equals_the_answer_with_one_finish_reason_per_choice(server, kind):
    """n=2 greedy: both choices' concatenated streams equal the non-streamed texts; each choice has exactly one
    finish_reason; include_usage adds one last chunk whose usage equals the answer's."""
    path, body = (("/v1/completions", {"prompt": PROMPT}) if kind == "completion" else
                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}))  # fmt: skip
    body |= {"max_tokens": 12, "temperature": 0, "n": 2}
    status, _, answer = server.request("POST", path, body)
    assert status == 200, answer
    events, done = _sse(server, path, body | {"stream_options": {"include_usage": True}})
    assert done
    texts, reasons = ["", ""], [[], []]
    for e in events[:-1]:
        assert e["usage"] is None and len(e["choices"]) == 1
        ch = e["choices"][0]
        texts[ch["index"]] += ch["text"] if kind == "completion" else ch["delta"].get("content", "")
        if ch["finish_reason"] is not None:
            reasons[ch["index"]].append(ch["finish_reason"])
    assert events[-1]["choices"] == [] and events[-1]["usage"] == answer["usage"]
    for i, ch in enumerate(answer["choices"]):
        text = ch["text"] if kind == "completion" else ch["message"]["content"]
        assert texts[i] == text and text
        assert reasons[i] == [ch["finish_reason"]]
    assert answer["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_never_appears_in_a_stream(server):
    """A stop string taken from the middle of the greedy text: the stream ends just before it, with "stop", and no
    piece of it was ever sent."""
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    full = server.request("POST", "/v1/completions", body)[2]["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and full.index(stop) > 0
    events, done = _sse(server, "/v1/completions", body | {"stop": [stop, "never-seen-text"]})
    text = "".join(e["choices"][0]["text"] for e in events)
    assert done and text == full[: full.index(stop)]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["stop"]
    answer = server.request("POST", "/v1/completions", body | {"stop": stop})[2]
    assert answer["choices"][0]["text"] == text and answer["choices"][0]["finish_reason"] == "stop"


def test_logprobs_are_the_models_log_softmax(server, openai_client, llm):
    """Each chosen token's log-probability and the top 3 equal log_softmax of the model's own logits (fp32)."""
    n = 5
    r = openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=n, temperature=0, logprobs=3)
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    out = _greedy_ids(llm, ids, n)
    with torch.no_grad():
        logits = llm.prefill(torch.tensor([ids + out]), 0)[0, len(ids) - 1 : -1].float()
    lp = torch.log_softmax(logits, -1)
    got = r.choices[0].logprobs
    assert got.tokens == [llm.tokenizer.piece(t) for t in out]
    want = [lp[i, t].item() for i, t in enumerate(out)]
    assert got.token_logprobs == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(got.top_logprobs):
        assert sorted(top.values(), reverse=True) == pytest.approx(lp[i].topk(3).values.tolist(), abs=1e-4)
    assert got.text_offset == [sum(len(p) for p in got.tokens[:i]) for i in range(n)]

    c = openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5) for e in content)  # greedy: the top
    assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content)


def test_a_seed_repeats_and_cached_tokens_count_the_prefix_cache(server, openai_client):
    kw = {"model": "tiny", "prompt": "Seeded: " + PROMPT, "max_tokens": 10, "temperature": 1.0, "top_p": 0.95}
    a = openai_client.completions.create(seed=7, **kw).choices[0].text
    b = openai_client.completions.create(seed=7, **kw).choices[0].text
    c = openai_client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c
    long_prompt = "A second turn reuses the first: " + " ".join(f"word{i}" for i in range(40))
    first = openai_client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2, temperature=0)
    second = openai_client.completions.create(model="tiny", prompt=long_prompt + " more", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    full_pages = (first.usage.prompt_tokens // 16) * 16  # the prefix cache keeps whole pages of 16 tokens
    assert full_pages >= 32 and second.usage.prompt_tokens_details.cached_tokens == full_pages


LONG = {"prompt": "word " * 100_000, "max_tokens": 1}  # 500 KB of text, ~100,000 tokens past a 256 context
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": 3.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": CONTEXT - 3}, 400, "prompt"),
    ("/v1/completions", LONG, 400, "prompt"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("/v1/completions", b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}', 413, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/nope", {}, 404, None),
]


def test_bad_requests_get_their_status_and_error_object_and_disturb_nobody(server):
    """Every bad request: its status, OpenAI's error object naming the field; meanwhile a stream runs to its end
    with exactly the text it has alone."""
    body = {"prompt": "Undisturbed", "max_tokens": 40, "temperature": 0}
    alone = server.request("POST", "/v1/completions", body)[2]["choices"][0]["text"]
    result = {}

    async def stream():
        result["events"] = await asyncio.to_thread(_sse, server, "/v1/completions", body)

    async def bad():
        for path, b, status, param in BAD:
            got, _, err = await asyncio.to_thread(server.request, "POST", path, b)
            assert got == status, (path, str(b)[:80], err)
            assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
            if param is not None:
                assert err["error"]["param"] == param, err
            if status == 404 and param == "model":
                assert err["error"]["code"] == "model_not_found"
        t0 = time.monotonic()
        got, _, err = await asyncio.to_thread(server.request, "POST", "/v1/completions", LONG)
        assert got == 400 and err["error"]["code"] == "context_length_exceeded"
        assert time.monotonic() - t0 < 10  # 500 KB of text: a bounded encode, not a whole one

    async def both():
        await asyncio.gather(stream(), bad())

    asyncio.run(both())
    events, done = result["events"]
    assert done and "".join(e["choices"][0]["text"] for e in events) == alone


def test_a_client_that_leaves_mid_stream_frees_its_pages(server):
    """Read two chunks of a long stream, close the socket: the request is aborted and its pages are free (read
    from /metrics), and the server still answers."""
    assert server.wait_metric("llama3_triton_engine_pages_used", 0.0) == 0.0
    before = server.metrics()["llama3_triton_engine_generated_tokens_total"]
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())  # fmt: skip
    got = b""
    while got.count(b"data: ") < 2:
        chunk = s.recv(4096)  # 30 s timeout a read
        assert chunk, f"the server closed the stream after {got[-200:]!r}"
        got += chunk
    s.close()
    assert server.wait_metric("llama3_triton_engine_running", 0.0) == 0.0
    assert server.wait_metric("llama3_triton_engine_pages_used", 0.0) == 0.0
    assert server.wait_metric("llama3_triton_requests_in_flight", 0.0) == 0.0
    m = server.metrics()
    made = m["llama3_triton_engine_generated_tokens_total"] - before
    assert m['llama3_triton_requests_total{route="/v1/completions",status="499"}'] >= 1  # counted as a client gone
    assert not any('status="500"' in k for k in m)  # never as a server error
    print(f"tokens made before the abort: {made}")
    assert made < 100, f"{made} of 200 tokens: the request ran on after its client left"
    assert server.request("GET", "/health")[0] == 200


def test_32_concurrent_streaming_clients_all_get_their_whole_text(server):
    openai = pytest.importorskip("openai", reason="the openai client (dev extras; not on the GPU image)")
    prompts = [f"Client {i} asks: {PROMPT}" for i in range(32)]
    want = [server.request("POST", "/v1/completions", {"prompt": p, "max_tokens": 16, "temperature": 0})[2]
            for p in prompts]  # fmt: skip

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one(p):
            stream = await client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0,
                                                     stream=True)  # fmt: skip
            text, reasons = "", []
            async for ev in stream:
                text += ev.choices[0].text
                reasons += [ev.choices[0].finish_reason] if ev.choices[0].finish_reason else []
            return text, reasons

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    got = asyncio.run(run())
    for (text, reasons), w in zip(got, want, strict=True):
        assert text == w["choices"][0]["text"] and reasons == [w["choices"][0]["finish_reason"]]


def test_the_api_key_is_enforced_on_every_route_but_health(server):
    for path in ("/v1/models", "/metrics", "/v1/completions"):
        method = "POST" if path == "/v1/completions" else "GET"
        for key in (None, "wrong"):
            status, _, err = server.request(method, path, {"prompt": "x"} if method == "POST" else None, key=key)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, key)
    assert server.request("GET", "/health", key=None)[0] == 200
    assert server.request("GET", "/v1/models")[0] == 200


def test_a_full_queue_gets_429_and_sigterm_ends_streams_and_exits_0(tiny_ckpt, tmp_path):
    """One sequence slot and no queue: a second request gets 429 with Retry-After. SIGTERM: the stream in flight
    ends (after --shutdown-timeout) with a last chunk and [DONE], new connections are refused, the exit is 0."""
    s = Server(tiny_ckpt, "--max-num-seqs", "1", "--max-queue", "0", "--shutdown-timeout", "1",
               "--max-seq-len", "4096", "--kv-cache-tokens", "2048", home=tmp_path)  # fmt: skip
    try:
        # A page pool smaller than the context: what one request may use is the pool's 2048 tokens, said up front
        assert s.request("GET", "/v1/models", key=None)[2]["data"][0]["max_model_len"] == 2048
        over = s.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2048}, key=None)
        assert over[0] == 400 and over[2]["error"]["code"] == "context_length_exceeded", over
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        first = r.readline()
        assert first.startswith(b"data: ")
        status, headers, err = s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=None)
        assert status == 429 and headers.get("Retry-After") == "1" and err["error"]["type"] == "rate_limit_error"
        s.proc.send_signal(__import__("signal").SIGTERM)
        rest = (first + r.read()).decode()
        events = [json.loads(e[6:]) for e in rest.split("\n\n") if e.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]")
        reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]]
        assert reasons == ["abort"], reasons
        assert s.proc.wait(30) == 0, "".join(s.lines[-20:])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.port), timeout=5).close()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_the_load_test_client_counts_every_token(server):
    """benchmarks/serving.py's HTTP client against the live server: every request completes, the token count is the
    requests' max_tokens (EOS ignored), latencies are measured; a non-loopback URL is refused."""
    from llama3_triton.benchmarks.serving import load, workload

    reqs = workload(6, (4, 24), (2, 8), vocab=128256)
    rec = load(server.url, reqs, concurrency=3, api_key=API_KEY, model="tiny")
    assert (rec["completed"], rec["errors"]) == (6, 0), rec["error_examples"]
    assert rec["output_tokens"] == sum(r["max_tokens"] for r in reqs)
    assert 0 < rec["ttft_p50_s"] <= rec["ttft_p99_s"] and 0 < rec["itl_p50_s"] <= rec["itl_p99_s"]
    # The server's step times over the run, from its /metrics: each prompt (4-24 tokens, under the 256 budget) in
    # one step of its own or shared; every output token but the first of each request from a decode row.
    steps = rec["steps"]
    assert set(steps) == {"prompt", "decode"} and 1 <= steps["prompt"]["steps"] <= 6, steps
    for st in steps.values():
        assert st["mean_s"] > 0 and st["p50_le_s"] <= st["p99_le_s"], st
    bad = load(server.url, reqs[:1], concurrency=1, api_key="wrong")
    assert bad["errors"] == 1 and "401" in bad["error_examples"][0] and "steps" not in bad  # /metrics refused too
    with pytest.raises(ValueError, match="this machine only"):
        load("http://10.0.0.1:8000", reqs, concurrency=1)
