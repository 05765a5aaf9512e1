"""Loading: a checkpoint (a Meta or Hugging Face folder, a GGUF file, a hub name, or weights already in memory)
streamed tensor by tensor into a ``Llama``, fusing wq|wk|wv and w1|w3 as it goes, quantizing each product as it is
read when asked; and the choice of ops backend. ``Llama.load`` is the public entry; this is its body.

Peak host memory stays near one copy of the checkpoint: the model is built on the meta device, each tensor is read
(memory-mapped), cast and moved to the device, and assigned in place (``load_state_dict(assign=True)``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from llama3_triton.kernels import Ops, reference
from llama3_triton.model import distributed
from llama3_triton.model.checkpoints.folder import Checkpoint
from llama3_triton.model.checkpoints.sources import open_checkpoint, open_tokenizer
from llama3_triton.model.errors import UserError, shown


def select_ops(backend: str, device: torch.device) -> Ops:
    """The backend whose functions run the non-matmul ops: the Triton kernels or their PyTorch twins."""
    if backend == "torch":
        return reference
    if backend != "triton":
        raise UserError(f"backend must be 'triton' or 'torch', got {shown(backend)}")
    if device.type == "cpu":
        # Without a GPU, Triton kernels run in its interpreter, which @triton.jit picks at import time.
        if "llama3_triton.kernels.rmsnorm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before the kernels are imported")
        os.environ["TRITON_INTERPRET"] = "1"
    elif device.type != "cuda":
        raise UserError(f"backend='triton' runs on CUDA (or the CPU through the interpreter), not {device.type}")
    from llama3_triton.kernels import triton_ops  # imports every kernel file now, not in the middle of a forward pass

    return triton_ops


def load_on_every_rank(tp: distributed.TensorParallel, load_model) -> nn.Module:
    """``load_model()`` (a ``load``), under tensor parallelism on every rank at once: a rank that fails tells the
    others, which raise too (else they would hang in the next collective)."""
    if not tp.enabled:
        return load_model()
    model, error = None, None
    try:
        model = load_model()
    except Exception as e:
        error = e
    tp.agree(error)
    return model


def load(
    cls: type[nn.Module],
    ckpt_dir,
    backend: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    max_seq_len: int | None,
    max_batch_size: int,
    progress: bool,
    tp: distributed.TensorParallel,
    quantize: str | None = None,
    calibration: str | None = None,
    before_weights=None,
) -> nn.Module:
    """A ``cls`` (``Llama``) with the checkpoint's weights on ``device``; see ``Llama.load`` for the arguments."""
    from llama3_triton.model.quant import calibrate
    from llama3_triton.model.quant import quantize as quant

    spec = quant.parse(quantize)  # a bad value fails here, before anything is read
    if calibration is not None:
        calibrate.check(spec, calibration)
        if tp.enabled:
            raise UserError("calibration is not supported under tensor parallelism")
    device = torch.device(device) if device is not None else distributed.default_device(tp)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' requested but torch sees no CUDA device")
    dtype = dtype if dtype is not None else default_dtype(device, spec is not None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    # Pick (and import) the kernels first: @triton.jit reads TRITON_INTERPRET at import time, and the
    # meta-device model construction below would otherwise import triton.language un-interpreted.
    select_ops(backend, device)
    # A folder (Meta/HF), a .gguf file, a hub name or weights in memory; checkpoints/sources.py decides which.
    ckpt = open_checkpoint(ckpt_dir, part=(tp.rank, tp.world) if tp.enabled else None)
    args = ckpt.args
    max_seq_len = min(args.max_position_embeddings, 8192) if max_seq_len is None else max_seq_len
    if not 1 <= max_seq_len <= args.max_position_embeddings:
        raise UserError(f"max_seq_len must be in [1, {args.max_position_embeddings}] for this model, got {max_seq_len}")
    if max_batch_size < 1:
        raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")

    if spec is not None and spec[0] == "gguf":
        if ckpt.layout != "gguf":
            raise UserError(f"quantize='gguf' keeps a GGUF file's blocks; {ckpt.dir} is a {ckpt.layout} checkpoint")
        if tp.enabled:
            raise UserError("quantize='gguf' is not supported under tensor parallelism (blocks run along K)")

    check_room(args, device, dtype, max_seq_len, max_batch_size, tp.world, dense=spec is None or calibration)
    tokenizer = None
    if before_weights is not None:  # e.g. the command line's prompt against the context: found in seconds, not minutes
        tokenizer = open_tokenizer(ckpt, args.vocab_size)
        before_weights(tokenizer, max_seq_len)

    with torch.device("meta"):
        model = cls(args, backend, device, tp)
    quantized: dict[str, nn.Module] = {}
    dense = calibration is not None  # GPTQ needs the dense model's inputs: quantized after loading
    state = _fused_state_dict(ckpt, device, dtype, progress, quantize=None if dense else spec, modules=quantized)
    for name, module in quantized.items():  # QuantLinear in place of nn.Linear (or of the tied head's None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval().requires_grad_(False)
    model.inv_freq = reference.rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
    model.setup_cache(max_batch_size, max_seq_len)
    model.use()  # the backend's packing of the quantized products, and its workspaces
    # Read after the weights unless a check needed it first: Llama-3's tiktoken ranks take ~80 MB, which would add
    # to the load's peak (tests/model/test_loading_memory.py).
    model.tokenizer = tokenizer if tokenizer is not None else open_tokenizer(ckpt, args.vocab_size)
    n_words = getattr(model.tokenizer, "n_words", args.vocab_size)
    if n_words < args.vocab_size:  # a padded embedding: generate masks the rows no text belongs to
        warnings.warn(
            f"{ckpt.dir}: the embedding has {args.vocab_size:,} rows but the tokenizer {n_words:,} ids: ids "
            f"{n_words:,}..{args.vocab_size - 1:,} have no text and are never sampled",
            stacklevel=3,
        )
    model.checkpoint_dir = Path(ckpt.dir)
    model.checkpoint_format = ckpt.layout
    model.quantize = quantize  # what the products hold: None (dense) or the --quantize format, for reports
    if dense:
        calibrate.quantize_calibrated(model, spec, calibration)
    return model


def _fused_state_dict(
    ckpt: Checkpoint,
    device,
    dtype,
    progress: bool,
    quantize: tuple[str, int] | None = None,
    modules: dict[str, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """Stream the checkpoint into our parameter names, fusing wq|wk|wv and w1|w3, cast and moved per tensor.

    ``quantize`` (from ``model.quantize.parse``): each product is quantized (or its GGUF blocks kept) as soon as
    it is read, on ``device``, and its QuantLinear goes into ``modules`` under its module name, its buffers into
    the returned state; the dense tensor is dropped at once."""
    from tqdm import tqdm

    from llama3_triton.model.quant import quantize as quant

    names = ckpt.names()
    bar = tqdm(total=len(names), desc="loading weights", unit="tensor", disable=not progress, file=sys.stderr)
    modules = {} if modules is None else modules

    def get(name: str) -> torch.Tensor:
        t = ckpt.tensor(name).to(device=device, dtype=dtype)
        bar.update(1)
        return t

    state: dict[str, torch.Tensor] = {}

    def product(module: str, parts: list[str]) -> None:
        """One matrix product's weight, the rows of ``parts`` stacked: dense, quantized or kept blocks."""
        kind = quantize[0] if quantize is not None else None
        if kind == "gguf":
            types = [ckpt.storage_type(n) for n in parts]
            if all(t in quant.GGUF_KEPT for t in types) and len(set(types)) == 1:
                planes = [quant.gguf_planes(types[0], ckpt.blocks(n).to(device)) for n in parts]
                bar.update(len(parts))
                q, s, m = (None if p[0] is None else torch.cat(p) for p in zip(*planes, strict=True))
                lin = quant.QuantLinear(q, s, m, format=types[0], dtype=dtype)
                _put(module, lin)
                return
            kept = [t for t in types if t in quant.GGUF_KEPT]
            other = next((t for t in types if t not in quant.GGUF_KEPT and t not in ("F32", "F16", "BF16")), None)
            if other is not None or kept:
                what = f"stored as {other}" if other else f"mixes {' and '.join(sorted(set(types)))}"
                raise UserError(
                    f"{ckpt.path}: {parts[0]} is {what}; quantize='gguf' keeps Q8_0, Q4_0 and Q4_1 blocks (one type "
                    "per fused product): load without it to dequantize"
                )
            kind = None  # a dense tensor in a GGUF file stays dense
        w = torch.cat([get(n) for n in parts]) if len(parts) > 1 else get(parts[0])
        if kind is None:
            state[module + ".weight"] = w
            return
        _put(module, _quantized(w, module))

    def _quantized(w: torch.Tensor, module: str) -> nn.Module:
        try:
            return quant.quantize_product(module, w, quantize, dtype)  # the head stays at int8
        except ValueError as e:
            raise UserError(f"{module}: {e}") from None

    def _put(module: str, lin: nn.Module) -> None:
        modules[module] = lin
        for k, v in lin.state_dict().items():
            state[f"{module}.{k}"] = v

    args = ckpt.args
    state["tok_embeddings.weight"] = get("tok_embeddings.weight")
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state[p + "attention_norm"] = get(p + "attention_norm.weight")
        product(p + "attention.wqkv", [p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"])
        product(p + "attention.wo", [p + "attention.wo.weight"])
        state[p + "ffn_norm"] = get(p + "ffn_norm.weight")
        product(p + "feed_forward.w13", [p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"])
        product(p + "feed_forward.w2", [p + "feed_forward.w2.weight"])
    state["norm"] = get("norm.weight")
    if not args.tie_embeddings:
        product("output", ["output.weight"])
    elif quantize is not None and quantize[0] != "gguf":
        # A tied head gets its own quantized copy: decode reads it instead of the dense embedding.
        _put("output", _quantized(state["tok_embeddings.weight"], "output"))
    elif quantize is not None and ckpt.storage_type("tok_embeddings.weight") in quant.GGUF_KEPT:
        kind = ckpt.storage_type("tok_embeddings.weight")
        q, s, m = quant.gguf_planes(kind, ckpt.blocks("tok_embeddings.weight").to(device))
        _put("output", quant.QuantLinear(q, s, m, format=kind, dtype=dtype))
    bar.close()
    return state


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, quantized: bool = False) -> torch.dtype:
    """bf16 on CUDA. On a CPU fp32 (as fast as bf16 there: SmolLM2 16.2 and 15.6 tokens/s, 1 thread, and exact), but
    bf16 with quantized weights: torch's CPU weight-only kernels take bf16 activations (SmolLM2 int8: 3.2 tokens/s
    with fp32 activations, which dequantize each product's weight every step, 16.4 with bf16; int4 2.5 and 20.5)."""
    return torch.bfloat16 if device.type == "cuda" or quantized else torch.float32


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_room(args, device: torch.device, dtype: torch.dtype, max_seq_len: int, max_batch: int, world: int,
               dense: bool) -> None:  # fmt: skip
    """Refuse, before anything is allocated, a KV cache (and, dense, weights) the device cannot hold: said as
    'needs X GB, has Y', not as an allocator's message after minutes of loading."""
    size = torch.empty((), dtype=dtype).element_size()
    cache = 2 * args.n_layers * max_batch * (args.n_kv_heads // world) * max_seq_len * args.head_dim * size
    weights = args.num_parameters() * size // world if dense else 0
    free = free_bytes(device)
    if free is not None and cache + weights > free:
        what = f"the weights ({weights / 1e9:.2f} GB) and " if weights else ""
        raise UserError(
            f"{what}the KV cache for max_seq_len {max_seq_len:,} x max_batch_size {max_batch} "
            f"({cache / 1e9:.2f} GB) need {(cache + weights) / 1e9:.2f} GB; {device} has {free / 1e9:.2f} GB free: "
            "pass a smaller max_seq_len (--max-seq-len) or batch"
        )
