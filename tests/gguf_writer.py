"""A tiny GGUF writer for the tests (``gguf.GGUFWriter``): random Llama-3-shaped weights in any storage type, the
byte-level token list, the metadata a loader reads. A helper module, not a test module; it needs the ``gguf``
package, which its importers skip without."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


def _byte_tokens() -> list[str]:
    from llama3_triton.model.tokenizers.hf import _byte_decoder

    return sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])  # the 256 byte-level characters, in byte order


def write_tiny_gguf(
    path: Path,
    *,
    dim: int = 256,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden: int = 512,
    types: dict[str, Q] | None = None,
    arch: str = "llama",
    tied: bool = True,
    drop: str | None = None,
    reshape: dict[str, tuple[int, int]] | None = None,
    vocab_size: int | None = None,
    tokenizer: dict | None = None,
    rope_freqs: np.ndarray | None = None,
    seed: int = 0,
    block_count: int | None = None,
) -> dict[str, np.ndarray]:
    """A random Llama GGUF with a byte-level BPE tokenizer of 256 bytes + 4 merges + 3 specials (263 tokens), or the
    ``tokenizer`` given (tokens, types, merges, pre, bos, eos, add_bos).

    ``types`` maps a GGUF tensor kind ('attn_q', 'token_embd', ...) to its storage type (default F32). Returns the
    values the file holds per GGUF name, as fp32 (what a correct reader must give back)."""
    rng = np.random.default_rng(seed)
    types = types or {}
    tokens = _byte_tokens() + ["ĠĠ", "ĠĠĠĠ", "in", "Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n_vocab = len(tokens)
    tok = {
        "tokens": tokens,
        "types": [1] * (n_vocab - 3) + [3, 3, 3],
        "merges": ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t"],
        "pre": "default",
        "bos": n_vocab - 2,
        "eos": n_vocab - 3,
        "add_bos": False,
    } | (tokenizer or {})
    n_vocab = len(tok["tokens"])
    hd = dim // n_heads
    shapes = {"token_embd.weight": (n_vocab, dim), "output_norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (n_vocab, dim)
    for i in range(n_layers):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (dim,),
            b + "attn_q.weight": (n_heads * hd, dim),
            b + "attn_k.weight": (n_kv_heads * hd, dim),
            b + "attn_v.weight": (n_kv_heads * hd, dim),
            b + "attn_output.weight": (dim, n_heads * hd),
            b + "ffn_norm.weight": (dim,),
            b + "ffn_gate.weight": (hidden, dim),
            b + "ffn_up.weight": (hidden, dim),
            b + "ffn_down.weight": (dim, hidden),
        }
    w = gguf.GGUFWriter(str(path), arch)
    a = arch
    w.add_uint32(f"{a}.block_count", n_layers if block_count is None else block_count)  # a lie, to test the reader
    w.add_uint32(f"{a}.context_length", 256 if rope_freqs is None else 131072)
    w.add_uint32(f"{a}.embedding_length", dim)
    w.add_uint32(f"{a}.feed_forward_length", hidden)
    w.add_uint32(f"{a}.attention.head_count", n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", n_kv_heads)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{a}.vocab_size", vocab_size or n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_add_bos_token(tok["add_bos"])
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    values = {}
    for name, shape in shapes.items():
        if drop == name:
            continue
        shape = (reshape or {}).get(name, shape)
        x = (rng.standard_normal(shape) / (shape[-1] ** 0.5 if len(shape) == 2 else 10) + (len(shape) == 1)).astype(
            np.float32
        )
        kind = name.split(".")[-2]
        qt = types.get(kind, Q.F32) if len(shape) == 2 else Q.F32
        if qt == Q.F32:
            data = x
        elif qt == Q.F16:
            data = x.astype(np.float16)
        elif qt in (Q.Q4_K, Q.Q6_K):  # gguf cannot quantize k-quants: random blocks with sane f16 scales
            block, size = gguf.GGML_QUANT_SIZES[qt]
            data = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
            blocks = data.reshape(-1, size)
            scale = np.array([0.01], dtype=np.float16).view(np.uint8)
            if qt == Q.Q4_K:  # d, dmin first
                blocks[:, 0:2] = scale
                blocks[:, 2:4] = scale
            else:  # d last
                blocks[:, -2:] = scale
        else:
            data = gguf.quants.quantize(x, qt)
        w.add_tensor(name, data, raw_dtype=None if qt in (Q.F32, Q.F16) else qt)
        values[name] = gguf.quants.dequantize(data, qt).reshape(shape) if qt != Q.F16 else x.astype(np.float16)
    if rope_freqs is not None:  # Llama 3.1+ RoPE scaling, the way llama.cpp's converter stores it
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}
