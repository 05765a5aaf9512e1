"""OpenAI's request and response shapes, checked by hand: a request body in, engine requests out; engine outputs
in, OpenAI's JSON out. No web framework here, so each rule can be read (and tested) on its own.

**Requests.** ``parse_completion`` and ``parse_chat`` take the decoded JSON body and return a ``Parsed``: the
prompts as token ids (a completion's ``prompt`` is a text, a list of texts, a list of ids or a list of lists of
ids; a chat's ``messages`` go through the checkpoint's chat template, their contents always encoded as plain text,
so a user's ``<|eot_id|>`` stays text), one engine ``Request`` per choice (``n`` choices of each prompt, choice
``i`` of a seeded request seeded ``seed + i``), and what the response needs (stream, usage, logprobs, echo).
Fields take OpenAI's names and defaults; vLLM's extensions with its names (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``). A field we do not know is ignored, as OpenAI ignores one; a field we know
but cannot honour, which would change the output (``suffix``, ``logit_bias``, ``tools``, a ``response_format``
other than text, ``best_of`` above ``n``, ``echo`` with ``logprobs``), is refused rather than silently dropped.

Every bad value raises ``ApiError``: the HTTP status and OpenAI's error object (``message``, ``type``, ``param``,
``code``). A prompt plus ``max_tokens`` past the context is a 400 with code ``context_length_exceeded``, found
before any model work; the prompt is encoded with ``limit`` (model/tokenizers), so a megabyte of text costs a
bounded encode, not a whole one.

**Responses.** ``completion_body``/``chat_body`` shape the non-streamed answer; ``completion_chunk``/
``chat_chunk`` one server-sent event's JSON; ``usage`` counts prompt and completion tokens with
``prompt_tokens_details.cached_tokens`` from the prefix cache.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llama3_triton.model.engine import Request
from llama3_triton.model.errors import UserError, shown

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one completion request
MAX_STOPS = 16  # stop strings (OpenAI allows 4)
MAX_STOP_CHARS = 1024  # characters of one stop string
MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI: 5 for completions, 20 for chat)
MAX_MESSAGES = 4096  # messages in one chat request
_SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_CHARS_PER_TOKEN = 64  # a chat's text past this many characters per context token cannot fit (tokens are ~4)


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A request, checked: what the engine runs and what the response needs."""

    kind: str  # "completion" | "chat"
    prompts: list[list[int]]  # token ids of each prompt
    requests: list[Request]  # one per choice: prompt i's choice j is requests[i * n + j]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top log-probabilities per token (0: the chosen token's only); None: none
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)  # for echo


# ---- field readers ------------------------------------------------------------------------------------------------


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"{name} must be an integer, got {shown(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"{name} must be a number, got {shown(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"{name} must be in [{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be true or false, got {shown(v)}")
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"stop must be a string or a list of strings, got {shown(v)}")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad("stop", f"a stop string has at most {MAX_STOP_CHARS} characters")
    return tuple(s for s in stops if s)  # OpenAI ignores an empty stop string


def _refuse_unsupported(body: dict, kind: str) -> None:
    """Fields that would change the output and that this server cannot honour: a 400, never a silent drop."""
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "suffix (fill in the middle) is not supported")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias", "logit_bias is not supported")
    for name in ("tools", "functions"):
        if body.get(name) not in (None, []):
            raise _bad(name, f"{name} (function calling) is not supported")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("response_format", "only response_format {'type': 'text'} is supported")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise _bad("best_of", "best_of other than n is not supported")
    if kind == "completion" and body.get("echo") and body.get("logprobs") is not None:
        raise _bad("echo", "echo with logprobs (the prompt's log-probabilities) is not supported")


def check_model(body: dict, served: str) -> None:
    """``model`` names the served model (or is left out, as curl users often do): anything else is a 404."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("model", f"model must be a string, got {shown(model)}")
    if model != served:
        raise ApiError(404, f"the model {shown(model)} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")  # fmt: skip


def _sampling(body: dict, max_tokens: int, seed: int | None, logprobs: int | None) -> Request:
    top_k = _int(body, "top_k", 0, -1, 2**31 - 1)
    try:
        return Request(
            max_tokens=max_tokens,
            temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_float(body, "top_p", 1.0, 0.0, 1.0),
            top_k=max(top_k, 0),  # vLLM's -1 and OpenAI-style 0 both mean off
            min_p=_float(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 100.0),
            presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
            seed=seed,
            stop=_stops(body),
            ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs,
        )
    except UserError as e:  # a value in range for OpenAI but not for the sampler (top_p 0, temperature 1e-50)
        field = str(e).split(" ", 1)[0]  # the sampler's messages begin with the field's name
        raise ApiError(400, str(e), param=field if field in body else None) from None


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options", f"stream_options must be an object, got {shown(opts)}")
    if not stream:
        raise _bad("stream_options", "stream_options needs stream: true")
    return _bool(opts, "include_usage", False)


def _fits(prompt: list[int], max_tokens: int, context: int, param: str) -> None:
    if len(prompt) + max_tokens > context:
        what = f"{len(prompt):,}+" if len(prompt) > context else f"{len(prompt):,}"
        raise ApiError(
            400,
            f"this model's context is {context:,} tokens; the prompt has {what} tokens and max_tokens asks for "
            f"{max_tokens:,} more",
            param=param,
            code="context_length_exceeded",
        )


def _choices(body: dict, prompts: list[list[int]], max_tokens: list[int], logprobs: int | None) -> tuple[int, list]:
    n = _int(body, "n", 1, 1, MAX_N)
    seed = _int(body, "seed", None, *_SEED_RANGE)
    requests = []
    for m in max_tokens:
        for j in range(n):
            s = None if seed is None else (seed + j + 2**63) % 2**64 - 2**63  # choice j: its own reproducible stream
            requests.append(_sampling(body, m, s, logprobs))
    return n, requests


# ---- the two request kinds ------------------------------------------------------------------------------------------


def parse_completion(body: Any, tokenizer, vocab: int, context: int) -> Parsed:
    """``POST /v1/completions``'s body, checked and encoded."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body, "completion")
    prompt = body.get("prompt")
    texts: list[str] = []
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = prompt
    elif isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        ids_list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_id(t) for t in p) for p in prompt):
        ids_list = prompt
    else:
        raise _bad("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                             f"token ids, got {shown(prompt)}")  # fmt: skip
    if len(texts or ids_list) > MAX_PROMPTS:
        raise _bad("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(texts or ids_list)}")
    max_tokens = _int(body, "max_tokens", 16, 1, context)
    if texts:
        ids_list = [tokenizer.encode(t, bos=True, limit=context) for t in texts]
    for ids in ids_list:
        if not ids:
            raise _bad("prompt", "a prompt is empty: nothing to condition on")
        if min(ids) < 0 or max(ids) >= vocab:
            raise _bad("prompt", f"a prompt has token ids outside [0, {vocab})")
        _fits(ids, max_tokens, context, "prompt")
    lp = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    stream = _bool(body, "stream", False)
    n, requests = _choices(body, ids_list, [max_tokens] * len(ids_list), lp)
    echo = _bool(body, "echo", False)
    if echo and not texts:
        texts = [tokenizer.decode(ids) for ids in ids_list]
    return Parsed("completion", ids_list, requests, n, stream, _stream_options(body, stream), lp, echo, texts)


def parse_chat(body: Any, chat_format, vocab: int, context: int) -> Parsed:
    """``POST /v1/chat/completions``'s body, checked and rendered with the checkpoint's chat template."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", f"messages must be a non-empty list of messages, got {shown(messages)}")
    if len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    plain = [_message(m, i) for i, m in enumerate(messages)]
    chars = sum(len(m["content"]) for m in plain)
    if chars > MAX_CHARS_PER_TOKEN * context:  # rendered and encoded whole below: bounded first by its length
        raise ApiError(
            400,
            f"the messages hold {chars:,} characters, more than {MAX_CHARS_PER_TOKEN} for each of the context's "
            f"{context:,} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    if chat_format is None:
        raise ApiError(400, "this model has no chat template (a base model?): use /v1/completions",
                       param="messages", code="no_chat_template")  # fmt: skip
    try:
        ids = chat_format.encode_dialog_prompt(plain)
    except UserError as e:
        raise _bad("messages", str(e)) from None
    if len(ids) >= context:
        _fits(ids, 1, context, "messages")
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _int(body, name, context - len(ids), 1, context)  # default: the room left in the context
    _fits(ids, max_tokens, context, name)
    if min(ids) < 0 or max(ids) >= vocab:
        raise _bad("messages", f"the chat template produced token ids outside the model's [0, {vocab})")
    lp = None
    if _bool(body, "logprobs", False):
        lp = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
    stream = _bool(body, "stream", False)
    n, requests = _choices(body, [ids], [max_tokens], lp)
    return Parsed("chat", [ids], requests, n, stream, _stream_options(body, stream), lp)


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _message(m: Any, i: int) -> dict[str, str]:
    """One chat message as {role, content: str}: content parts of type text are joined; other parts are refused."""
    param = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _bad(param, f"{param} must be an object with a string role, got {shown(m)}")
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(param, f"{param}: only text content parts are supported, got {shown(p)}")
            parts.append(p["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise _bad(param, f"{param}.content must be a string or a list of text parts, got {shown(content)}")
    role = m["role"]
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    return {"role": role, "content": content}


# ---- responses -----------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(tokenizer, entries: list[dict], offset: int) -> dict:
    """Completions' legacy shape: parallel lists of tokens, their log-probabilities, the top ones, text offsets."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        piece = tokenizer.piece(e["token"])
        tokens.append(piece)
        lps.append(e["logprob"])
        tops.append({tokenizer.piece(t): lp for t, lp in e["top"]} if e["top"] else None)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, entries: list[dict]) -> dict:
    """Chat's shape: one entry per token with its bytes and its ``top_logprobs``."""

    def one(t: int, lp: float) -> dict:
        b = tokenizer.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries]}  # fmt: skip


def completion_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}  # fmt: skip


def chat_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}  # fmt: skip


def chunk(kind: str, rid: str, model: str, created: int, choices: list[dict], use: dict | None | bool = False) -> dict:
    """One streamed event's JSON. ``use``: False leaves ``usage`` out (stream_options.include_usage not set); None
    writes ``"usage": null`` (it is set, and this is not the last chunk); a dict is the usage chunk's."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if use is not False:
        out["usage"] = use
    return out


__all__ = [
    "ApiError", "Parsed", "parse_completion", "parse_chat", "check_model", "usage", "completion_logprobs",
    "chat_logprobs", "completion_body", "chat_body", "chunk", "new_id",
]  # fmt: skip
