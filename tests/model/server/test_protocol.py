"""OpenAI's request fields, checked without a server: each bad value is a 400 naming its field, defaults are
OpenAI's, a seeded request's choices get their own seeds, fields that would change the output and cannot be honoured
are refused, unknown ones ignored, and a prompt past the context is found in bounded time."""

from __future__ import annotations

import time

import pytest

from llama3_triton.model.server import protocol as P
from llama3_triton.model.tokenizers.hf import chat_format
from llama3_triton.model.tokenizers.llama3 import Tokenizer

VOCAB, CONTEXT = 128256, 256


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _completion(tok, **body):
    return P.parse_completion({"prompt": "Hello", **body}, tok, VOCAB, CONTEXT)


def test_defaults_are_openais(tok):
    p = _completion(tok)
    (r,) = p.requests
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop, r.logprobs) == (16, 1.0, 1.0, 0, None, (),
                                                                                           None)  # fmt: skip
    assert p.prompts == [tok.encode("Hello", bos=True)] and not p.stream and not p.include_usage
    chat = P.parse_chat({"messages": [{"role": "user", "content": "Hi"}]}, chat_format(tok), VOCAB, CONTEXT)
    assert chat.requests[0].max_tokens == CONTEXT - len(chat.prompts[0])  # chat: the room left in the context


def test_prompts_choices_and_seeds(tok):
    p = _completion(tok, prompt=["a", "b c"], n=3, seed=5, stop="x", top_k=-1, logprobs=2, max_tokens=4)
    assert len(p.prompts) == 2 and len(p.requests) == 6 and p.n == 3
    assert [r.seed for r in p.requests] == [5, 6, 7] * 2 and all(r.stop == ("x",) for r in p.requests)
    assert p.requests[0].top_k == 0 and p.requests[0].logprobs == 2 and p.requests[0].max_tokens == 4
    ids = P.parse_completion({"prompt": [[1, 2], [3]]}, tok, VOCAB, CONTEXT)
    assert ids.prompts == [[1, 2], [3]]
    assert P.parse_completion({"prompt": [7, 8]}, tok, VOCAB, CONTEXT).prompts == [[7, 8]]
    top = P.parse_completion({"prompt": "a", "seed": 2**63 - 1, "n": 2}, tok, VOCAB, CONTEXT).requests
    assert [r.seed for r in top] == [2**63 - 1, -(2**63)]  # wraps within int64


@pytest.mark.parametrize(
    "body,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 17}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": "1"}, "seed"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"suffix": "z"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": ["x"] * 65}, "prompt"),
    ],
)
def test_each_bad_field_is_a_400_naming_it(tok, body, param):
    with pytest.raises(P.ApiError) as e:
        _completion(tok, **body)
    assert e.value.status == 400 and e.value.param == param and e.value.body()["error"]["param"] == param


def test_the_sampler_refuses_what_openai_allows_with_a_400(tok):
    for field, value in (("top_p", 0), ("temperature", 1e-9), ("repetition_penalty", 0)):
        with pytest.raises(P.ApiError) as e:
            _completion(tok, **{field: value})
        assert e.value.status == 400 and e.value.param == field and field in e.value.message


def test_unknown_fields_are_ignored_and_the_model_is_checked(tok):
    assert _completion(tok, user="me", metadata={"a": 1}, store=False).requests
    P.check_model({"model": "m"}, "m")
    P.check_model({}, "m")  # left out: the served model
    with pytest.raises(P.ApiError) as e:
        P.check_model({"model": "other"}, "m")
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_a_prompt_past_the_context_is_found_in_bounded_time(tok):
    t0 = time.monotonic()
    with pytest.raises(P.ApiError) as e:
        _completion(tok, prompt="word " * 2_000_000)  # 10 MB of text
    assert e.value.code == "context_length_exceeded" and "256" in e.value.message
    assert time.monotonic() - t0 < 5
    with pytest.raises(P.ApiError) as e:
        _completion(tok, max_tokens=CONTEXT - 1)
    assert e.value.code == "context_length_exceeded"


def test_chat_messages(tok):
    fmt = chat_format(tok)
    parts = [
        {"role": "developer", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    p = P.parse_chat({"messages": parts, "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5}, fmt, VOCAB,
                     CONTEXT)  # fmt: skip
    want = [{"role": "system", "content": "S"}, {"role": "user", "content": "ab"}]
    assert p.prompts == [fmt.encode_dialog_prompt(want)]
    assert p.logprobs == 3 and p.requests[0].max_tokens == 5
    for bad, param in [({"messages": "hi"}, "messages"), ({"messages": [{"content": "x"}]}, "messages[0]"),
                       ({"messages": [{"role": "user", "content": 5}]}, "messages[0]"),
                       ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                       ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
                       ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
                        "response_format")]:  # fmt: skip
        with pytest.raises(P.ApiError) as e:
            P.parse_chat(bad, fmt, VOCAB, CONTEXT)
        assert e.value.status == 400 and e.value.param == param, bad
    with pytest.raises(P.ApiError) as e:
        P.parse_chat({"messages": [{"role": "user", "content": "x"}]}, None, VOCAB, CONTEXT)
    assert e.value.code == "no_chat_template"
    t0 = time.monotonic()
    with pytest.raises(P.ApiError) as e:  # 4 MB of chat text: refused by its length, before the template runs
        P.parse_chat({"messages": [{"role": "user", "content": "word " * 800_000}]}, fmt, VOCAB, CONTEXT)
    assert e.value.code == "context_length_exceeded" and time.monotonic() - t0 < 1
