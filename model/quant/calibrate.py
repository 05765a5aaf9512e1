"""Calibrated int4: the products' inputs on a sample text, then GPTQ codes (``Llama.load(..., calibration=text)``).

Plain int4 rounds each weight to its group's nearest level: the least error in the weight. What the model feels is
the error in each product's output, (W - Wq) x, and the inputs x are far from uniform: a few dimensions of the
residual stream carry most of its energy. GPTQ (``model.quantize.gptq_int4``) chooses codes that keep the outputs
close on real inputs, given H = sum over tokens of x x^T for each product. This module gets those sums:

    1. load the model unquantized (dense, in the model's dtype, on its device);
    2. run the calibration text through it (prefill, chunks of CHUNK tokens, the plain-PyTorch ops), a
       forward pre-hook on each product adding x^T x (fp32) of its input; wq|wk|wv and w1|w3 are stored as one
       matrix each (model/llama.py), so they share one sum, as they share their input; then each distinct token of
       the text alone at position 0, weighted (the sink pass: SINK_SHARE says why);
    3. replace each of those products by its GPTQ-quantized ``QuantLinear``, dropping the dense weight.

The sums of a run of layers are held at once, up to HESSIAN_BUDGET bytes of them (at least one layer): all 30 of
SmolLM2's layers (0.4 GB) in one pass over the text; Llama-3-8B's 0.95 GiB a layer, 4 layers a pass, 8 passes. A
later pass sees the layers before it already quantized, as GPTQ's paper runs (one layer a pass); SmolLM2 measured
the two orders alike (groups of 64, TEXT: +7.1% one layer a pass, +6.4% all at once, within a 256-token text's
noise), so the budget only trades memory for passes. The output head is then quantized as the uncalibrated loader
does it (int8: model/quantize.py says why).

Cost: the dense model's memory until it is quantized, plus a pass's sums and an fp32 copy of the product being
quantized; per product a Cholesky of its (K, K) H and K column steps. The text should look like what the model
will read; a few thousand tokens is typical (GPTQ's paper: 128 x 2048).
"""

from __future__ import annotations

import torch
from torch import nn

from llama3_triton.kernels import reference
from llama3_triton.model.errors import UserError, shown
from llama3_triton.model.quant import quantize as quant

MIN_TOKENS = 128  # fewer: H is mostly damping, and GPTQ's codes follow a handful of tokens
# The most tokens of a calibration text used: its first MAX_TOKENS (tokenized only that far, so a text of any size
# costs bounded time and memory; a 50 MB text aborted inside the tokenizer). The project's texts are ~3,000 tokens,
# GPTQ's paper 128 x 2,048; past this a prefill pass per 256 tokens on a CPU takes longer than people wait.
MAX_TOKENS = 1 << 16
# Tokens per prefill pass, each from position 0, whatever the caller's max_seq_len: the chunking is part of what
# the codes are chosen on, so a serving setting must not change it. It matters more than its size suggests: each
# chunk's first token is an attention sink that every later position reads (the sink pass below), and cutting the
# same text at 254 instead of 256 moved SmolLM2's int4 perplexity on HELDOUT from +4.0% to +5.3% and +7.0% (no
# sink pass; an exact run and a perturbed one, benchmarks/gptq_spread.py's seed 0). The loader used to cut at
# min(512, max_seq_len), so the CLI's default max_seq_len quantized SmolLM2 otherwise than the tests' 256 did (512:
# +4.7% to +4.9% on TEXT, +6.0% to +6.2% on HELDOUT, the same two runs, against +4.4% to +5.6% and +3.3% to +4.1%
# at 256). On DEV cut every 256 tokens (below) 128, 256 and 512 measured alike: +5.7%, +6.0%, +5.8%.
CHUNK = 256
# The sink pass. A prompt's first token is the attention sink: its keys and values, in every layer, are read by
# every later position (often with most of their attention), and its hidden state is a function of that token
# alone. The chunks above show the products a dozen first tokens among ~2,950, so GPTQ spends almost nothing on
# them. After the chunks, every distinct token of the text runs alone at position 0 (batches of SINK_BATCH), those
# rows weighted to total SINK_SHARE of the text's tokens. Chosen on DEV (the paragraphs of
# benchmarks/data/calibration_more.txt, each from its start, with TEXT and HELDOUT: 3,379 tokens), SmolLM2, single runs:
#
#     share        plain int4: DEV   TEXT    HELDOUT     int4-g64: DEV   TEXT    HELDOUT
#     none                 +6.0%   +4.9%   +4.1%                 +4.6%   +5.8%   +1.2%
#     0.1                  +4.0%   +3.0%   +0.7%                 +4.9%   +5.4%   +0.8%
#     0.2                  +4.4%   +1.9%   +1.1%                 +5.4%   +3.5%   +0.2%
#
# and for plain int4 on DEV cut every 256 tokens instead (windows mostly starting mid-sentence), with shares 0.05,
# 0.1, 0.2, 0.3, 0.5, 1.0: +4.8%, +4.1%, +4.7%, +5.5%, +5.1%, +4.8% (none: +6.0%); TEXT +2.8%, +3.0%, +1.9%, +4.0%,
# +6.4%, +6.8%. So 0.1: the least DEV for plain int4, the default; groups of 64 gain on the two texts and lose a
# little on DEV. (Leaving each chunk's first token out of the sums instead cost +111% to +195%.)
SINK_SHARE = 0.1
SINK_BATCH = 512
HESSIAN_BUDGET = 4 << 30  # bytes of input sums held at once (fp32 (K, K) each)


def products(model) -> dict[str, nn.Linear]:
    """The model's dense matrix products that GPTQ quantizes: every layer's wqkv, wo, w13, w2 (not the head)."""
    names = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
    return {f"layers.{i}.{n}": layer.get_submodule(n) for i, layer in enumerate(model.layers) for n in names}


@torch.inference_mode()
def input_hessians(model, tokens: list[int], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """For each product named (default: all of ``products``), H = sum of x^T x over the inputs x (K,) it sees when
    ``tokens`` run through ``model`` (fp32, on the model's device), the text cut into chunks of CHUNK tokens (fewer
    only where the model's context is shorter), each from position 0, whatever ``model.max_seq_len``; then the sink
    pass (SINK_SHARE): each distinct token alone at position 0, those rows weighted to total SINK_SHARE x
    len(tokens)."""
    sums: dict[str, torch.Tensor] = {}
    linears = products(model)
    names = list(linears) if names is None else names
    weight = 1.0  # each input row's weight in the sums (the hooks read it when they run): the sink pass's below

    def hook(name):
        def add(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (rows, K)
            if name in sums:
                sums[name].addmm_(x.T, x, alpha=weight)
            else:
                sums[name] = (x.T @ x).mul_(weight)

        return add

    handles = [linears[name].register_forward_pre_hook(hook(name)) for name in names]
    ops, cache = model.ops, (model.max_batch_size, model.max_seq_len)
    chunk = min(CHUNK, model.args.max_position_embeddings)
    firsts = sorted(set(tokens))  # the sink pass: each distinct token of the text alone at position 0
    try:
        model.use(ops=reference)  # a statistic of the inputs: any backend gives it; this one runs anywhere
        model.setup_cache(1, chunk)
        for i in range(0, len(tokens), chunk):
            part = torch.tensor([tokens[i : i + chunk]], device=model.device)
            model.prefill(part, 0)
        if SINK_SHARE:
            weight = SINK_SHARE * len(tokens) / len(firsts)
            model.setup_cache(SINK_BATCH, 1)
            for i in range(0, len(firsts), SINK_BATCH):
                part = torch.tensor(firsts[i : i + SINK_BATCH], device=model.device)[:, None]  # (B, 1)
                model.prefill(part, 0)
    finally:
        for h in handles:
            h.remove()
        model.use(ops=ops)
        model.setup_cache(*cache)
    return sums


def check(spec: tuple[str, int] | None, text) -> None:
    """The arguments' own checks, run by the loader before any weight is read: ``spec`` (``model.quantize.parse``'s)
    must be int4's, ``text`` a str."""
    if spec is None or spec[0] != "int4":
        raise UserError(
            f"calibration chooses int4 codes (GPTQ): it needs quantize='int4[-gG]', got {shown(spec and spec[0])}"
        )
    if not isinstance(text, str):
        raise UserError(f"calibration must be a str (the text), got {type(text).__name__}")


def quantize_calibrated(model, spec: tuple[str, int], text: str) -> None:
    """Quantize ``model``'s products in place with GPTQ under ``spec`` (``model.quantize.parse``'s; int4 only),
    calibrated on ``text``; the head as ``quantize_product`` does it. Raises ValueError for a text of fewer than
    MIN_TOKENS tokens (only the first MAX_TOKENS are used)
    or a group that does not divide a product's K, before any product is replaced."""
    check(spec, text)
    tokens = model.tokenizer.encode(text, bos=True, limit=MAX_TOKENS)[:MAX_TOKENS]
    if len(tokens) < MIN_TOKENS:
        raise UserError(
            f"calibration text too short: {len(tokens)} tokens, GPTQ needs at least {MIN_TOKENS} (a few thousand "
            "tokens of text like the model's input is typical)"
        )
    dense = products(model)
    for name, lin in dense.items():  # every group fits before anything changes
        K = lin.in_features
        group = spec[1] or quant.int4_group(K)
        if K % group or K % 32:
            raise UserError(f"{name}: int4 group size {group} does not divide K={K}")
    dtype = model.dtype
    for names in _passes(dense):
        hessians = input_hessians(model, tokens, names)
        for name in names:
            K = dense[name].in_features
            group = spec[1] or quant.int4_group(K)
            q, s, m = quant.gptq_int4(dense[name].weight, hessians.pop(name), group)
            _replace(model, name, quant.QuantLinear(q, s, m, format=f"int4-g{group}", dtype=dtype))
    head = model.tok_embeddings.weight if model.output is None else model.output.weight
    _replace(model, "output", quant.quantize_product("output", head, spec, dtype))
    model.use(ops=model.ops)  # drop graphs captured with the dense weights; pack the new products for the backend


def _passes(dense: dict[str, nn.Linear]) -> list[list[str]]:
    """The products in runs of whole layers whose sums fit HESSIAN_BUDGET together (at least one layer a run)."""
    layers: dict[str, list[str]] = {}
    for name in dense:
        layers.setdefault(name.split(".")[1], []).append(name)
    runs, size = [[]], 0
    for names in layers.values():
        need = sum(4 * dense[n].in_features ** 2 for n in names)
        if runs[-1] and size + need > HESSIAN_BUDGET:
            runs.append([])
            size = 0
        runs[-1] += names
        size += need
    return runs


def _replace(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
