"""Llama-3's tokenizer: tiktoken BPE over 128,000 merges plus 256 special tokens, and Meta's chat format.

Text -> ids: the regex ``PAT_STR`` splits text into words/numbers/punctuation/whitespace runs, and each
piece is byte-pair encoded with the ranks in ``tokenizer.model`` (one ``base64(token) rank`` per line).
Special tokens (ids 128000..128255) are never produced from ordinary text unless the caller allows it:
a user who types "<|eot_id|>" gets the characters, not the end-of-turn token.
"""

from __future__ import annotations

import base64
import codecs
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from llama3_triton.model.errors import UserError, shown

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# Llama 3.1's names for the first special tokens; the rest are <|reserved_special_token_N|>.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS += [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(SPECIAL_TOKENS))
]
# tiktoken panics on very long runs without a split point; encode in slices (Meta does the same). The slices are
# also where an encode with a ``limit`` stops: at most one slice past the context.
_MAX_CHARS = 400_000
_MAX_RUN = 25_000

ROLES = ("system", "user", "assistant", "ipython")


class TokenizerError(UserError):
    """A tokenizer file that is missing or unreadable."""


def default_tokenizer_path() -> Path:
    """The real Llama-3 tokenizer.model shipped inside Meta's ``llama-models`` package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("no tokenizer.model in the checkpoint and the llama-models package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.exists():
        raise TokenizerError(f"{path}: llama-models is installed but its Llama-3 tokenizer.model is missing")
    return path


# Llama-3's tokenizer.model is 2.2 MB; a file many times that is not one (and would cost its size in memory).
MAX_TOKENIZER_BYTES = 64 << 20


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """``base64(token) rank`` lines -> {token bytes: rank}, validated so that tiktoken never sees a file it
    would panic on: its Rust panics (duplicate ranks, ranks it cannot index) are BaseExceptions that escape
    ``except Exception`` with a 100-line backtrace. The ranks must be exactly 0 .. n-1, each once."""
    from llama3_triton.model.checkpoints.files import open_regular

    try:
        fd = open_regular(path, "tokenizer")  # a FIFO in its place would block a plain read forever
        with open(fd, "rb") as f:
            raw = f.read(MAX_TOKENIZER_BYTES + 1)
        if len(raw) > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{path}: larger than {MAX_TOKENIZER_BYTES:,} bytes, not a tiktoken BPE file")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except UnicodeDecodeError:
        raise TokenizerError(f"{path}: not a tiktoken BPE file (not UTF-8 text)") from None
    except TokenizerError:
        raise
    except ValueError as e:  # not a regular file
        raise TokenizerError(str(e)) from None
    except OSError as e:  # no permission, an I/O error
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror or e})") from None
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()
            token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
        except ValueError:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank', got {shown(line[:60])}") from None
        if token in ranks:
            raise TokenizerError(f"{path}:{lineno}: token {shown(token[:20])} is listed twice")
        if rank in line_of_rank:
            raise TokenizerError(f"{path}:{lineno}: rank {rank} is given twice (also on line {line_of_rank[rank]})")
        line_of_rank[rank] = lineno
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: tokenizer file is empty")
    n = len(ranks)
    bad = next((r for r in line_of_rank if not 0 <= r < n), None)
    if bad is not None:  # n distinct ranks all in [0, n): exactly 0 .. n-1
        raise TokenizerError(
            f"{path}:{line_of_rank[bad]}: rank {bad} is outside [0, {n}) (ranks must be 0 .. n-1, each once)"
        )
    # Byte-level BPE needs every single byte as a token; without one, tiktoken panics (a BaseException that
    # escapes `except Exception`) on the first text that contains that byte.
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path}: not a byte-level BPE file: {len(missing)} of the 256 single bytes have no rank"
            f" (e.g. {shown(bytes([missing[0]]))})"
        )
    return ranks


class Tokenizer:
    """Llama-3's tokenizer. ``encode(text, bos=True)`` -> ids; ``decode(ids)`` -> text."""

    def __init__(self, model_path: str | Path | None = None, vocab_size: int | None = None):
        """``vocab_size``: the model's vocabulary (its embedding rows), checked to be exactly the tokenizer's ids:
        a smaller tokenizer cannot decode every token the model may pick, and a larger one moves the special ids
        (<|eot_id|> ...) away from the rows the model learned them at."""
        self.path = Path(model_path) if model_path is not None else default_tokenizer_path()
        ranks = load_bpe_ranks(self.path)
        n_base = len(ranks)
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = n_base + len(SPECIAL_TOKENS)
        if vocab_size is not None and vocab_size != self.n_words:
            raise TokenizerError(
                f"{self.path}: {n_base:,} tokens + {len(SPECIAL_TOKENS)} special ones = {self.n_words:,} ids, but the "
                f"model's vocabulary has {vocab_size:,} (its special ids would be {vocab_size - len(SPECIAL_TOKENS):,}"
                f" onwards, this tokenizer's {n_base:,}): a tokenizer of another model"
            )
        self.bos_id = self.special_tokens["<|begin_of_text|>"]  # 128000
        self.eos_id = self.special_tokens["<|end_of_text|>"]  # 128001
        self.eom_id = self.special_tokens["<|eom_id|>"]  # 128008
        self.eot_id = self.special_tokens["<|eot_id|>"]  # 128009
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(
        self, s: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False, limit: int | None = None
    ) -> list[int]:
        """Ids of ``s``. Text that looks like a special token is encoded as plain text unless allow_special.

        ``limit``: the most ids the caller can use (the context). Encoding stops at the first slice that passes it
        and returns what it has, more than ``limit`` ids: a text of megabytes is found too long in bounded time
        and memory, its length a lower bound."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        allowed = "all" if allow_special else set()
        ids: list[int] = [self.bos_id] if bos else []
        for i in range(0, len(s), _MAX_CHARS):
            for piece in _split_long_runs(s[i : i + _MAX_CHARS], _MAX_RUN):
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
                if limit is not None and len(ids) > limit:
                    return ids
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a character cut between tokens) becomes U+FFFD."""
        return self.model.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.model.decode_single_token_bytes(token_id)

    def piece(self, token_id: int) -> str:
        """A printable form of one token, for tables (``'Ġthe'``-style spaces kept as is)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


def _split_long_runs(s: str, max_run: int):
    """Cut ``s`` so that no run of whitespace or of non-whitespace is longer than ``max_run`` characters."""
    start, run, in_space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != in_space:
            run, in_space = 1, ch.isspace()
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class StreamDecoder:
    """Turns a stream of token ids into text without ever printing half a UTF-8 character.

    A character like "é" or an emoji can be split across two byte-level tokens; decoding each token on
    its own would print U+FFFD twice. We feed the bytes to an incremental UTF-8 decoder, which holds back
    an incomplete tail until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        is_special = getattr(self.tokenizer, "is_special", None)  # Hugging Face tokenizers (model/hf_tokenizer.py)
        special = (
            is_special(token_id) if is_special else token_id >= self.tokenizer.n_words - NUM_RESERVED_SPECIAL_TOKENS
        )
        if self.skip_special and special:
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class ChatFormat:
    """Meta's Llama-3 chat format:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n            <- the model continues from here
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode_header(self, role: str) -> list[int]:
        if role == "tool":  # Meta's name for the role whose header reads "ipython"
            role = "ipython"
        if role not in ROLES:
            raise UserError(f"chat role must be one of {ROLES} (or 'tool'), got {shown(role)}")
        t = self.tok
        return [
            t.special_tokens["<|start_header_id|>"],
            *t.encode(role),
            t.special_tokens["<|end_header_id|>"],
            *t.encode("\n\n"),
        ]

    def encode_message(self, message: dict[str, str]) -> list[int]:
        """Header, the content as plain text (special-token strings in it stay text), then <|eot_id|>."""
        content = message.get("content")
        if not isinstance(content, str):
            raise UserError(f"chat message content must be a string, got {type(content).__name__}")
        return [*self.encode_header(message.get("role", "")), *self.tok.encode(content), self.tok.eot_id]

    def encode_dialog_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """BOS, every message, then the assistant header the model answers after."""
        ids = [self.tok.bos_id]
        for m in messages:
            ids.extend(self.encode_message(m))
        ids.extend(self.encode_header("assistant"))
        return ids
