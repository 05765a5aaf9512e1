"""Hugging Face tokenizers (``tokenizer.json``, or the token list and merges inside a GGUF file) and their chat
templates, behind the interface of model/tokenizer.Tokenizer: encode/decode/piece/token_bytes, bos/eos/eot ids,
stop tokens, and a chat format.

Which tokenizer a checkpoint gets is decided here, in ``load_tokenizer``: Llama-3's tiktoken file when the
checkpoint has one (Meta's layout, or the ``original/`` folder of a Hugging Face repo); else the Hugging Face
tokenizer that comes with it; else (a folder with neither) the Llama-3 file shipped in llama-models. A
tokenizer that can produce ids beyond the model's embedding is refused: those ids would index past the table.

Chat templates are Jinja; a template comes from a file we did not write, so it is rendered in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation).
Message contents are passed through the template as opaque placeholders and encoded as plain text, so a user
who types "<|im_end|>" gets those characters, not the end-of-turn token; only the template's own text may
produce special tokens.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from llama3_triton.model.checkpoints.folder import read_side_file
from llama3_triton.model.errors import UserError, shown
from llama3_triton.model.tokenizers.llama3 import ChatFormat, Tokenizer, TokenizerError

# Characters per piece when a long text is counted against a limit (``HFTokenizer.encode``): ~17 MB of the
# tokenizers library's working memory each.
PIECE_CHARS = 1 << 16


def _pieces(s: str, size: int):
    """``s`` in pieces of about ``size`` characters, each cut before a space that sits between two non-spaces (where
    a byte-level pre-tokenizer splits anyway); a piece with no such space in its last quarter is cut at ``size``."""
    start = 0
    while len(s) - start > size:
        end = start + size
        cut = max((m.start() + 1 for m in _WORD_GAP.finditer(s, end - size // 4, end)), default=end)
        yield s[start:cut]
        start = cut
    yield s[start:]


_WORD_GAP = re.compile(r"\S(?= \S)")

# Token texts that end a turn in the common chat formats (llama.cpp treats the same ones as end-of-generation).
END_OF_TURN_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
)

# GGUF's tokenizer.ggml.pre names -> how Hugging Face splits text before byte-level BPE.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE = {"default": "gpt2", "gpt2": "gpt2", "smollm": "smollm", "llama-bpe": "llama3", "llama3": "llama3"}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character that stands for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids and chat template its checkpoint declares."""

    def __init__(
        self,
        tk: Any,
        *,
        source: str,
        bos_id: int | None,
        eos_id: int,
        add_bos: bool,
        stop_tokens: Sequence[int],
        pad_id: int | None = None,
        chat_template: str | None = None,
    ):
        self.model = tk
        self.source = source
        self.kind = "huggingface"
        self.vocab = tk.get_vocab(with_added_tokens=True)
        self.n_words = max(self.vocab.values()) + 1
        self.special_tokens = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self._special_ids = set(self.special_tokens.values())
        self.bos_id = bos_id if bos_id is not None else eos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        eot = [self.vocab[t] for t in END_OF_TURN_TEXTS[:4] if t in self.vocab]
        self.eot_id = eot[0] if eot else eos_id
        self.stop_tokens = sorted({eos_id, self.eot_id, *stop_tokens})
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.chat_template = chat_template
        self._byte_level = _is_byte_level(tk)
        for what, i in (
            ("bos", self.bos_id),
            ("eos", eos_id),
            ("pad", self.pad_id),
            *(("stop", s) for s in stop_tokens),
        ):
            if not 0 <= i < self.n_words:
                raise TokenizerError(f"{source}: {what} token id {i} is outside the vocabulary of {self.n_words}")

    def encode(
        self, s: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False, limit: int | None = None
    ) -> list[int]:
        """Ids of ``s``. ``bos=True`` adds the BOS token only for tokenizers that use one (``add_bos``); text that
        looks like a special token stays text unless ``allow_special``.

        ``limit``: the most ids the caller can use (the context). A text longer than ``PIECE_CHARS`` is first
        counted in pieces cut between words, stopping once the count is clearly past ``limit`` (the ids counted so
        far are returned, more than ``limit``: a lower bound for the error message); only a text that may fit is
        then encoded whole, so the ids never depend on where the pieces were cut. The tokenizers library holds
        some 270 bytes per character while encoding: a 10 MB prompt cost 2.7 GB before it was refused as too
        long; counted in pieces it costs one piece's worth."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        self.model.encode_special_tokens = not allow_special
        head = [self.bos_id] if bos and self.add_bos else []
        if limit is not None and len(s) > PIECE_CHARS:
            counted, cuts = list(head), 0
            for piece in _pieces(s, PIECE_CHARS):
                counted += self.model.encode(piece, add_special_tokens=False).ids
                # A cut between two words leaves a byte-level BPE's pre-tokens as they were; other tokenizers
                # (SentencePiece's leading space) may differ by a token or two per cut: refuse only well past.
                if len(counted) > limit + 4 * cuts:
                    return counted
                cuts += 1
        ids = self.model.encode(s, add_special_tokens=False).ids
        return head + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        text = self.model.id_to_token(token_id)
        if text is None:
            raise UserError(f"token id {token_id} is outside the vocabulary of {self.n_words}")
        if token_id in self._special_ids or token_id in self.model.get_added_tokens_decoder():
            return text.encode("utf-8")
        if self._byte_level:
            table = _byte_decoder()
            return bytes(table[c] for c in text) if all(c in table for c in text) else text.encode("utf-8")
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)  # SentencePiece byte fallback
        if m:
            return bytes([int(m.group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")

    def piece(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return (
            f"Hugging Face tokenizer from {self.source}: {self.n_words} ids, bos {self.bos_id} "
            f"({'added' if self.add_bos else 'not added'}), stop {self.stop_tokens}, "
            f"chat template {'yes' if self.chat_template else 'none'}"
        )


def _is_byte_level(tk: Any) -> bool:
    decoder = (
        json.loads(tk.decoder.__getstate__()) if tk.decoder is not None else {}
    )  # the decoder alone, not 1e5 merges
    kinds = (
        [d.get("type") for d in decoder.get("decoders", [])]
        if decoder.get("type") == "Sequence"
        else [decoder.get("type")]
    )
    return "ByteLevel" in kinds


# ---- building one ---------------------------------------------------------------------------------


def from_gguf(ckpt: Any) -> HFTokenizer:
    """The tokenizer stored in a GGUF file: byte-level BPE (tokenizer.ggml.model 'gpt2') from its tokens and merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TK

    where = str(ckpt.path)
    kind = ckpt.metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(
            f"{where}: GGUF tokenizer model {shown(kind)} is not supported (only byte-level BPE, 'gpt2'); "
            "put the model's tokenizer.json next to it"
        )
    pre = ckpt.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise TokenizerError(f"{where}: GGUF pre-tokenizer {shown(pre)} is not one of {sorted(GGUF_PRE)}")
    tokens = ckpt.field("tokenizer.ggml.tokens")
    merges = ckpt.field("tokenizer.ggml.merges")
    types = ckpt.field("tokenizer.ggml.token_type") or []
    if not tokens or not merges:
        raise TokenizerError(f"{where}: GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{where}: GGUF token list has duplicate tokens")
    try:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab, pairs, ignore_merges=GGUF_PRE[pre] == "llama3")
    except Exception as e:
        raise TokenizerError(f"{where}: GGUF merges do not form a BPE model ({e})") from None
    tk = TK(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=GGUF_PRE[pre] != "llama3")
    if GGUF_PRE[pre] == "llama3":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level]
        )
    elif GGUF_PRE[pre] == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if int(t) == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if int(t) == 4]
    tk.add_special_tokens(control)
    tk.add_tokens(user)

    def tid(key: str) -> int | None:
        v = ckpt.metadata.get(f"tokenizer.ggml.{key}_token_id")
        return int(v) if v is not None else None

    eos = tid("eos")
    if eos is None:
        raise TokenizerError(f"{where}: GGUF tokenizer has no tokenizer.ggml.eos_token_id")
    stops = [i for i in (tid("eot"), tid("eom")) if i is not None]
    stops += [vocab[t] for t in END_OF_TURN_TEXTS if t in vocab and int(types[vocab[t]]) == 3] if types else []
    return HFTokenizer(
        tk,
        source=f"{where} (GGUF, pre-tokenizer {shown(pre)})",
        bos_id=tid("bos"),
        eos_id=eos,
        add_bos=bool(ckpt.metadata.get("tokenizer.ggml.add_bos_token", False)),
        stop_tokens=stops,
        pad_id=tid("padding"),
        chat_template=ckpt.metadata.get("tokenizer.chat_template"),
    )


def _read_json(path: Path, ckpt_dir: Path) -> dict[str, Any]:
    if not path.exists() and not path.is_symlink():
        return {}
    text = read_side_file(path, ckpt_dir, path.stem.replace("_", " "))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise TokenizerError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def from_tokenizer_json(path: Path, ckpt_dir: Path | None = None) -> HFTokenizer:
    """``tokenizer.json`` with its neighbours ``tokenizer_config.json`` (bos/eos, chat template) and
    ``generation_config.json`` (the stop ids generation uses). Each is read through ``read_side_file``: inside
    ``ckpt_dir`` (default: the file's folder) after links, a regular file, under its size cap."""
    from tokenizers import Tokenizer as TK

    folder = path.parent
    ckpt_dir = folder if ckpt_dir is None else ckpt_dir
    text = read_side_file(path, ckpt_dir, "tokenizer")  # our bounded read, not the library's (a FIFO hung it)
    try:
        tk = TK.from_str(text)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({first[:200]})") from None
    cfg = _read_json(folder / "tokenizer_config.json", ckpt_dir)
    gen = _read_json(folder / "generation_config.json", ckpt_dir)
    vocab = tk.get_vocab(with_added_tokens=True)

    def tid(name: str) -> int | None:
        text = _token_text(cfg.get(name))
        if text is None:
            return None
        if text not in vocab:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {name} {shown(text)} is not in the vocabulary")
        return vocab[text]

    eos = tid("eos_token")
    gen_eos = gen.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in (gen_eos or []) if isinstance(i, int)]
    if eos is None:
        if not gen_eos:
            raise TokenizerError(
                f"{folder}: no eos_token in tokenizer_config.json nor eos_token_id in generation_config.json"
            )
        eos = gen_eos[0]
    bos = tid("bos_token")
    if bos is None and isinstance(gen.get("bos_token_id"), int):
        bos = gen["bos_token_id"]
    # Whether prompts start with BOS: what the tokenizer's own post-processor does is the truth.
    with_special = tk.encode("a", add_special_tokens=True).ids
    add_bos = bos is not None and bool(with_special) and with_special[0] == bos
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").exists():
        template = read_side_file(folder / "chat_template.jinja", ckpt_dir, "chat template")
    return HFTokenizer(
        tk,
        source=str(path),
        bos_id=bos,
        eos_id=eos,
        add_bos=add_bos,
        stop_tokens=gen_eos,
        pad_id=tid("pad_token"),
        chat_template=template if isinstance(template, str) else None,
    )


def load_tokenizer(ckpt: Any, vocab_size: int | None = None) -> Tokenizer | HFTokenizer | None:
    """The tokenizer for a checkpoint (see the module docstring for the order), checked against the model's
    vocabulary size."""
    size = vocab_size if vocab_size is not None else ckpt.args.vocab_size
    if getattr(ckpt, "layout", None) == "gguf":
        tok = from_gguf(ckpt)
    elif getattr(ckpt, "layout", None) == "memory":  # checkpoint.MemoryCheckpoint: a tiktoken file, or none at all
        if ckpt.tokenizer_path is None:
            return None
        tok = Tokenizer(ckpt.tokenizer_path, vocab_size=size)
    else:
        tiktoken_file = ckpt.tokenizer_path
        hf_file = next((d / "tokenizer.json" for d in (ckpt.root, ckpt.dir) if (d / "tokenizer.json").exists()), None)
        if tiktoken_file is not None:
            try:
                # Llama-3's special ids follow its base tokens: the file must have exactly the model's vocabulary.
                tok = Tokenizer(tiktoken_file, vocab_size=size)
            except TokenizerError:
                if hf_file is None:  # a SentencePiece tokenizer.model (Llama 2 style) and no tokenizer.json
                    raise
                tok = from_tokenizer_json(hf_file, ckpt.dir)
        elif hf_file is not None:
            tok = from_tokenizer_json(hf_file, ckpt.dir)
        else:
            tok = Tokenizer(None, vocab_size=size)  # Llama-3's file from llama-models
    if tok.n_words > size:
        where = getattr(tok, "source", None) or getattr(tok, "path", "tokenizer")
        raise TokenizerError(
            f"{where}: the tokenizer has {tok.n_words} ids but the model's embedding has only {size} rows "
            "(tokenizer and checkpoint do not belong together)"
        )
    return tok


# ---- chat --------------------------------------------------------------------------------------------

_SENTINEL = "\x00msg{}\x00"


# A chat template's budget. Real ones (Llama 3, ChatML, Gemma, Phi, Qwen) render a conversation in well under a
# millisecond and some thousands of Python steps; a rendered conversation is short, its messages' contents being
# placeholders here.
TEMPLATE_MAX_STEPS = 2_000_000  # Python calls and lines executed while rendering
TEMPLATE_MAX_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 1 << 20


class _OverBudget(Exception):
    pass


class _TemplateBudget:
    """A trace function for the rendering: raises _OverBudget in the template's code past the step or time budget."""

    def __init__(self, source: str):
        self.steps = 0
        self.deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

    def trace(self, frame, event, arg):
        self.steps += 1
        if self.steps > TEMPLATE_MAX_STEPS:
            raise _OverBudget(f"more than {TEMPLATE_MAX_STEPS:,} steps")
        if not self.steps & 1023 and time.monotonic() > self.deadline:
            raise _OverBudget(f"more than {TEMPLATE_MAX_SECONDS:g} s")
        return self.trace


class TemplateChatFormat:
    """A Jinja chat template, with the ``ChatFormat`` methods the chat loop uses.

    The template is rendered with placeholders for the message contents; the template's own text is encoded
    with special tokens allowed, the contents as plain text. Per-turn pieces (``encode_message``,
    ``encode_header``, ``end_of_turn``) are differences of renderings, which works for the templates that render
    a conversation as one piece per message (ChatML, Llama 3, Gemma, Phi); others get a one-line error.
    """

    def __init__(self, tokenizer: HFTokenizer):
        if not tokenizer.chat_template:
            raise TokenizerError(f"{tokenizer.source}: no chat template (a base model?); use generate, not chat")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: __import__("time").strftime(fmt)
        try:
            self.template = env.from_string(tokenizer.chat_template)
        except TemplateError as e:
            raise TokenizerError(f"{tokenizer.source}: chat template does not parse ({e})") from None
        self.tok = tokenizer
        self._TemplateError = TemplateError

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        """The template's text for ``messages``, rendered under a budget: a template is a program from a file we did
        not write, and the sandbox bounds what it may touch, not how long it runs or how much it writes (nested
        loops, ``lipsum(n=10**8)``, a loop printing gigabytes each ran without end)."""
        t = self.tok
        budget = _TemplateBudget(t.source)
        chunks: list[str] = []
        size = 0
        previous = sys.gettrace()
        try:
            stream = self.template.generate(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=t.model.id_to_token(t.bos_id) or "",
                eos_token=t.model.id_to_token(t.eos_id) or "",
            )
            sys.settrace(budget.trace)  # counts the template's Python steps and watches the clock
            for chunk in stream:
                size += len(chunk)
                if size > TEMPLATE_MAX_CHARS:
                    raise _OverBudget(f"its output passed {TEMPLATE_MAX_CHARS:,} characters")
                chunks.append(chunk)
            return "".join(chunks)
        except _OverBudget as e:
            raise UserError(
                f"{t.source}: chat template stopped, over its budget: {e} (a chat template renders in milliseconds)"
            ) from None
        except self._TemplateError as e:
            raise UserError(f"{t.source}: chat template failed ({e})") from None
        except Exception as e:  # a template error inside the sandbox (SecurityError, TypeError, ...)
            raise UserError(f"{t.source}: chat template failed ({type(e).__name__}: {str(e)[:200]})") from None
        finally:
            sys.settrace(previous)

    def _encode(self, text: str, contents: Sequence[str]) -> list[int]:
        """Template text -> ids: placeholders become their contents encoded as plain text."""
        ids: list[int] = []
        for i, part in enumerate(re.split("\x00msg(\\d+)\x00", text)):
            if i % 2:
                ids += self.tok.encode(contents[int(part)])
            elif part:
                ids += self.tok.encode(part, allow_special=True)
        return ids

    def _placeholders(self, messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
        out, contents = [], []
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str):
                raise UserError(f"chat message content must be a string, got {type(content).__name__}")
            out.append({**m, "content": _SENTINEL.format(len(contents))})
            contents.append(content)
        return out, contents

    def encode_dialog_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The whole conversation as the template renders it, ending with the assistant's turn opened."""
        held, contents = self._placeholders(messages)
        return self._encode(self.render(held, add_generation_prompt=True), contents)

    def _diff(self, before: list[dict[str, str]], after: list[dict[str, str]], gen: tuple[bool, bool]) -> str:
        a, b = self.render(before, gen[0]), self.render(after, gen[1])
        if not b.startswith(a):
            raise UserError(f"{self.tok.source}: this chat template does not render turn by turn; cannot chat with it")
        return b[len(a) :]

    def encode_message(self, message: dict[str, str]) -> list[int]:
        """One message as it appears in the middle of a conversation (after a system message)."""
        held, contents = self._placeholders([{"role": "system", "content": ""}, message])
        return self._encode(self._diff(held[:1], held, (False, False)), contents)

    def encode_header(self, role: str) -> list[int]:
        """What the template adds to open the assistant's turn (the generation prompt)."""
        if role != "assistant":
            raise UserError(f"a chat template opens only the assistant's turn, not {shown(role)}")
        held, contents = self._placeholders([{"role": "user", "content": ""}])
        return self._encode(self._diff(held, held, (False, True)), contents)

    def encode_start(self, system: str | None) -> list[int]:
        """What comes before the first user message: BOS and the system message, or the template's default one."""
        if system:
            held, contents = self._placeholders([{"role": "system", "content": system}])
            return self._encode(self._diff([], held, (False, False)), contents)
        held, contents = self._placeholders([{"role": "system", "content": ""}, {"role": "user", "content": ""}])
        user_piece = self._diff(held[:1], held, (False, False))
        text = self.render(held[1:], add_generation_prompt=False)  # may hold the template's default system turn
        if not text.endswith(user_piece):
            raise UserError(f"{self.tok.source}: this chat template does not render turn by turn; cannot chat with it")
        return self._encode(text[: len(text) - len(user_piece)], contents)

    def end_of_turn(self) -> list[int]:
        """What follows an assistant's answer before the next message (e.g. ``<|im_end|>\\n``)."""
        held, contents = self._placeholders([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
        text = self.render(held, add_generation_prompt=False)
        tail = text.split(_SENTINEL.format(1), 1)
        if len(tail) != 2:
            raise UserError(f"{self.tok.source}: this chat template drops the assistant's message; cannot chat with it")
        return self._encode(tail[1], contents)


class Llama3ChatFormat(ChatFormat):
    """Meta's format with the two methods the chat loop shares with ``TemplateChatFormat``."""

    def encode_start(self, system: str | None) -> list[int]:
        return [self.tok.bos_id] + (self.encode_message({"role": "system", "content": system}) if system else [])

    def end_of_turn(self) -> list[int]:
        return [self.tok.eot_id]


def chat_format(tokenizer: Tokenizer | HFTokenizer) -> ChatFormat | TemplateChatFormat:
    """The chat format of a tokenizer: Meta's for Llama-3's tiktoken, the checkpoint's template otherwise."""
    if isinstance(tokenizer, HFTokenizer):
        return TemplateChatFormat(tokenizer)
    return Llama3ChatFormat(tokenizer)
