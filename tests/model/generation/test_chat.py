"""Chat: one random stream per session, Ctrl-C stops a reply and keeps the session, /reset, the end of the
KV cache said out loud, and the history in the cache equal to a fresh run over the whole conversation."""

from __future__ import annotations

import io
import sys

import pytest

from llama3_triton.model.cli.main import main
from llama3_triton.model.generation.chat import ChatSession, ContextFull
from llama3_triton.model.generation.generate import generate
from llama3_triton.model.generation.sampling import SampleRng
from llama3_triton.model.llama import Llama
from llama3_triton.model.tokenizers.llama3 import ChatFormat


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt_b):
    return tiny_ckpt_b


@pytest.fixture(scope="module")
def llm(ckpt):
    return Llama.load(ckpt, device="cpu", max_seq_len=256)


SAMPLING = dict(temperature=1.0, top_p=0.95)


def _history(llm, system, turns):
    fmt = ChatFormat(llm.tokenizer)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": turns[0]}]
    return fmt.encode_dialog_prompt(msgs)


def test_one_generator_per_session(llm):
    # The session draws from one seeded stream: two turns equal two generate calls that share a generator,
    # and a new session with the same seed repeats the conversation.
    a = ChatSession(llm, seed=7, **SAMPLING)
    r1, r2 = a.reply("hi", max_new_tokens=6), a.reply("hi", max_new_tokens=6)
    g = SampleRng(7, llm.device)
    fmt = ChatFormat(llm.tokenizer)
    first = _history(llm, None, ["hi"])
    e1 = generate(llm, [first], max_new_tokens=6, generator=g, **SAMPLING)
    assert r1.tokens == e1.tokens
    second = first + e1.tokens[0] + [llm.tokenizer.eot_id] if e1.stop_reasons[0] == "max_new_tokens" else None
    if second is not None:
        second += fmt.encode_message({"role": "user", "content": "hi"}) + fmt.encode_header("assistant")
        assert r2.tokens == generate(llm, [second], max_new_tokens=6, generator=g, **SAMPLING).tokens
    b = ChatSession(llm, seed=7, **SAMPLING)
    assert [b.reply("hi", max_new_tokens=6).tokens, b.reply("hi", max_new_tokens=6).tokens] == [r1.tokens, r2.tokens]


@pytest.mark.parametrize("draft", [False, True], ids=["plain", "speculative"])
def test_interrupted_reply_keeps_the_session(llm, draft):
    from llama3_triton.model.generation.speculative import NgramDrafter

    s = ChatSession(llm, seed=0, temperature=0, drafter=NgramDrafter() if draft else None)
    pieces = []

    def on_text(_b, text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    out = s.reply("tell me a story", max_new_tokens=20, on_text=on_text, interruptible=True)
    assert out.stop_reasons == ["interrupted"] and 1 <= len(out.tokens[0]) < 20
    # The next turn continues from what was said so far, as a fresh run over the whole conversation would.
    nxt = s.reply("go on", max_new_tokens=4)
    fmt = ChatFormat(llm.tokenizer)
    history = _history(llm, None, ["tell me a story"]) + out.tokens[0] + [llm.tokenizer.eot_id]
    history += fmt.encode_message({"role": "user", "content": "go on"}) + fmt.encode_header("assistant")
    assert nxt.tokens == generate(llm, [history], max_new_tokens=4, temperature=0).tokens
    # Without interruptible, Ctrl-C propagates.
    with pytest.raises(KeyboardInterrupt):
        s.reply("again", max_new_tokens=20, on_text=lambda b, t: (_ for _ in ()).throw(KeyboardInterrupt()))


def test_context_full_and_reset(ckpt):
    small = Llama.load(ckpt, device="cpu", max_seq_len=40)
    s = ChatSession(small, seed=0, temperature=0)
    out = s.reply("hello there", max_new_tokens=100)
    assert out.stop_reasons == ["context_full"] and s.context_left <= 1
    with pytest.raises(ContextFull, match="longer than the context of 40 tokens"):
        s.reply("and now?")
    s.reset()
    again = s.reply("hello there", max_new_tokens=100)
    assert again.tokens == out.tokens  # greedy, same conversation from the start


def _chat(argv, stdin: bytes, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    rc = main(["chat", *argv])
    return (rc, *capsys.readouterr())


def test_cli_reset_and_unknown_commands(ckpt, capsys, monkeypatch):
    argv = ["--ckpt", str(ckpt), "--max-new-tokens", "3", "--temperature", "0"]
    rc, out, err = _chat(argv, b"hi there\n/reset\nhi there\n/help\n/exit\nnever read\n", capsys, monkeypatch)
    assert rc == 0
    replies = out[:-1].split("\n\n")
    assert len(replies) == 2 and replies[0] == replies[1]  # /reset: the second turn starts over
    assert "(new conversation)" in err and "unknown command /help" in err and "/exit" in err


def test_cli_says_when_the_context_is_full(ckpt, capsys, monkeypatch):
    argv = ["--ckpt", str(ckpt), "--max-seq-len", "40", "--max-new-tokens", "100", "--temperature", "0"]
    rc, out, err = _chat(argv, b"hello there\n", capsys, monkeypatch)
    assert rc == 0 and "the context of 40 tokens is full" in err


def test_stop_strings_never_show_a_piece_of_the_stop():
    from llama3_triton.model.generation.generate import StopStrings

    s = StopStrings(["</end>", "STOP"])
    shown = [s.feed(p) for p in ["Hello <", "/en", "d maybe", " not. ST", "OP here"]]
    # "<" and "</en" are held back until "d maybe" shows they were not the stop; "ST" is held and was one.
    assert shown == ["Hello ", "", "</end maybe", " not. ", ""]
    assert s.hit == len("Hello </end maybe not. ") and s.flush() == ""
    t = StopStrings(["xyz"])
    assert [t.feed("ab"), t.feed("cx"), t.flush()] == ["ab", "c", "x"]  # an unfinished prefix comes out at the end


TURNS = ["one two three four one two three four", "and again: one two three four", "hi"]


@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_speculative_chat_replies_equal_plain_chat_greedy(llm, tiny_ckpt, kind):
    """chat --draft: each reply is decoded speculatively over the history in the cache; greedy, every turn's tokens,
    stop reason and the cache's bookkeeping equal plain chat's."""
    from llama3_triton.model.generation.speculative import ModelDrafter, NgramDrafter

    plain = ChatSession(llm, temperature=0, system="Be brief.")
    want = [plain.reply(t, max_new_tokens=10) for t in TURNS]  # the sessions share one KV cache: one after the other
    drafter = NgramDrafter() if kind == "ngram" else ModelDrafter(Llama.load(tiny_ckpt, device="cpu"), llm)
    spec = ChatSession(llm, temperature=0, system="Be brief.", drafter=drafter, draft_tokens=3)
    starts: list[list[int]] = []  # per turn: where the draft model's multi-token passes began
    if kind == "model":
        real = drafter.llm.prefill
        drafter.llm.prefill = lambda tokens, start, **kw: starts[-1].append(int(start)) or real(tokens, start, **kw)
    got = []
    for t in TURNS:
        starts.append([])
        got.append(spec.reply(t, max_new_tokens=10))
    if kind == "model":  # the draft's cache is kept across turns: only the first turn feeds it from position 0
        assert starts[0][0] == 0 and all(s > 0 for turn in starts[1:] for s in turn) and all(starts[1:]), starts
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.stop_reasons for g in got] == [w.stop_reasons for w in want]
    assert (spec.pos, spec.pending) == (plain.pos, plain.pending) and spec.pos == len(spec.history)
    assert sum(g.extra["speculative"]["proposed"] for g in got) > 0  # the drafter was asked, every turn a verify


def test_speculative_chat_sampled_repeats_with_its_seed(llm):
    from llama3_triton.model.generation.speculative import NgramDrafter

    def session():
        s = ChatSession(llm, seed=3, drafter=NgramDrafter(), **SAMPLING)
        return [s.reply(t, max_new_tokens=8).tokens for t in TURNS]

    first = session()
    assert session() == first and all(len(t[0]) <= 8 for t in first)


def test_cli_chat_with_a_draft_prints_plain_chats_replies(ckpt, capsys, monkeypatch):
    argv = ["--ckpt", str(ckpt), "--max-new-tokens", "8", "--temperature", "0"]
    lines = "\n".join(TURNS).encode() + b"\n"
    rc, plain, _ = _chat(argv, lines, capsys, monkeypatch)
    rc2, drafted, err = _chat([*argv, "--draft", "ngram", "--draft-tokens", "3"], lines, capsys, monkeypatch)
    assert rc == rc2 == 0 and drafted == plain and len(plain.split("\n\n")) == len(TURNS), err
