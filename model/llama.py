"""The Llama-3 driver: token ids in, logits out, one readable file.

    tokens (B, T) ──embedding──▶ x (B, T, dim)                         the residual stream
    h = RMSNorm(x)                                                     ops.rms_norm, once: the first block's norm
    for each of n_layers blocks (TransformerBlock.forward), h arriving already normalised:
        q|k|v = h @ wqkv.T          (B, T, (Hq + 2 Hkv) * hd)        one matrix product for all three
        q = RoPE(q); RoPE(k), v -> KV cache slots                    ops.rope_write_cache
        o = causal attention(q, cache)                               ops.attention (prefill)
                                                                     ops.decode_attention (decode)
        x = x + o @ wo.T;  h = RMSNorm(x)                            ops.add_rms_norm (fused)
        g|u = h @ w13.T             (B, T, 2 * hidden)               one matrix product for w1 and w3
        x = x + swiglu(g, u) @ w2.T;  h = RMSNorm(x)                 ops.swiglu, ops.add_rms_norm (fused): h is
                                                                     normalised with the NEXT block's weight
                                                                     (after the last block: the final norm)
    logits = h @ output.T           (B, T, vocab)

Every elementwise/attention op goes through ``self.ops``, a backend of the ``kernels.Ops`` contract:
``kernels.triton_ops`` (the Triton kernels) for backend="triton", ``kernels.reference`` (plain PyTorch) for
backend="torch". Prefill's matrix products stay with torch (cuBLAS).

A decode step (one token per sequence) on the Triton backend takes a shorter road, ``TransformerBlock.decode``:
five launches a layer instead of ten, because at batch 1 each launch costs microseconds while its bytes cost
nanoseconds:

    qkv = RMSNorm(x) @ wqkv.T                  ops.linear (the norm inside the GEMV, kernels/gemv.py)
    o = attention(RoPE(q), cache + RoPE(k), v)  ops.rope_decode_attention (rotate, write the cache, attend, merge)
    x = x + o @ wo.T                            ops.linear (the residual add inside)
    a = swiglu(RMSNorm(x) @ w13.T)              ops.linear (the norm and SwiGLU inside)
    x = x + a @ w2.T                            ops.linear
    logits = RMSNorm(x) @ output.T              once per step, fp32 out

A quantized product (quant/quantize.py's QuantLinear: the weight as planes) runs on ``ops.quant_linear``, the
dequantizing GEMV with the same fusions; so does a prefill's up to 8 rows (``_matmul``).

The public steps: ``prefill(tokens, start_pos)`` runs a prompt (or a chunk of one) and fills the cache;
``decode(tokens, positions)`` runs one new token per sequence; ``forward`` checks its inputs and does either;
``use(backend=..., cuda_graph=...)`` switches the ops or the graph capture in place.

The KV cache is static: one (max_batch, Hkv, max_seq_len, hd) tensor per layer for k and for v,
allocated once; a token at absolute position p lives in slot p. It is handed to the ops as the
(B, S, Hkv, hd) view they expect (a transpose, no copy). The engine's cache is paged instead (``setup_pages``,
``forward_paged``: a pool of pages per layer, each sequence's reached through its block table). On CUDA the
one-token decode step is captured once in a CUDA graph and replayed (graph.py), since at batch 1 launching ~10
kernels per layer from Python would otherwise cost more than the kernels themselves. Loading is loading.py's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama3_triton.kernels import Ops, reference
from llama3_triton.model import distributed, loading
from llama3_triton.model.checkpoints.folder import CheckpointError
from llama3_triton.model.config import ModelArgs
from llama3_triton.model.distributed import TensorParallel
from llama3_triton.model.errors import UserError, shown
from llama3_triton.model.graph import DecodeGraph, DecodeGraphs
from llama3_triton.model.inputs import check_inputs, described
from llama3_triton.model.loading import default_device, default_dtype, select_ops
from llama3_triton.model.quant.quantize import QuantLinear
from llama3_triton.model.tokenizers.llama3 import Tokenizer


@dataclass
class Pages:
    """A step over the paged KV cache (the engine's, model/engine): the new tokens of several sequences packed
    into one row, each written to its own slot of the page pools, each sequence reading its pages."""

    slot_mapping: torch.Tensor  # (N,) page * PAGE + offset of each new token's k and v
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32: sequence s's new tokens are rows cu[s] .. cu[s + 1] - 1
    seq_lens: torch.Tensor  # (S,) int32: keys of sequence s once its new tokens are in
    block_tables: torch.Tensor  # (S, pages) int32: sequence s's i-th page
    decode: bool  # one new token per sequence: the split-KV decode attention instead of the prefill's


@dataclass
class Step:
    """What every block of one forward pass shares."""

    ops: Ops  # the backend
    positions: torch.Tensor  # (B, T) absolute position of each token = its KV-cache slot
    start_pos: int | None  # prefill: position of token 0, the same for every sequence; None: a decode step
    lengths: torch.Tensor | None  # decode: (B,) cache length of each sequence once this token is in
    cos_sin: torch.Tensor  # (max_seq_len rounded up to whole pages, hd) RoPE table
    eps: float  # RMSNorm epsilon
    pages: Pages | None = None  # the paged cache's addressing; None: the static slab, slot = position


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel):
        super().__init__()
        # Under tensor parallelism each rank holds n_heads / world query heads and their k/v heads.
        self.tp = tp
        self.n_heads, self.n_kv_heads = args.n_heads // tp.world, args.n_kv_heads // tp.world
        self.head_dim = args.head_dim
        qkv_rows = (self.n_heads + 2 * self.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_rows, bias=False)  # wq | wk | wv stacked: read together
        self.wo = nn.Linear(self.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, h: torch.Tensor, step: Step, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """h (B, T, dim) -> attention output (B, T, dim); k_cache, v_cache: (B, S_max, Hkv, hd) views of this
        layer's cache, into which this step's keys and values are written."""
        B, T, _ = h.shape
        Hq, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = _matmul(step.ops, self.wqkv, h)  # (B, T, (Hq + 2 Hkv) * hd)
        q = qkv[..., : Hq * hd].unflatten(-1, (Hq, hd))  # (B, T, Hq, hd), a view
        k = qkv[..., Hq * hd : (Hq + Hkv) * hd].unflatten(-1, (Hkv, hd))  # (B, T, Hkv, hd)
        v = qkv[..., (Hq + Hkv) * hd :].unflatten(-1, (Hkv, hd))  # (B, T, Hkv, hd)
        # Rotate q and k; the rotated k and the v go into cache slot positions[b, t] in the same launch.
        # Positions were validated once per step (forward's input checks, or generate's own bookkeeping),
        # so the ops skip their per-layer host check: no device sync inside the layer loop.
        ops = step.ops
        if step.pages is not None:  # k_cache, v_cache: this layer's page pools (num_pages, PAGE, Hkv, hd)
            o = self._paged(q[0], k[0], v[0], step, k_cache, v_cache)  # (N, Hq, hd), the N packed tokens
            return self.tp.all_reduce(_matmul(ops, self.wo, o.reshape(B, T, Hq * hd)))
        q = ops.rope_write_cache(q, k, v, step.positions, step.cos_sin, k_cache, v_cache, check_values=False)
        if step.start_pos is None:  # decode: one query per sequence, each sees its own cache length
            o = ops.decode_attention(q[:, 0], k_cache, v_cache, step.lengths, check_values=False)  # (B, Hq, hd)
        else:  # prefill (possibly a chunk after earlier tokens): causal over slots 0 .. start_pos + T - 1
            o = ops.attention(q, k_cache, v_cache, start_pos=step.start_pos)  # (B, T, Hq, hd)
        return self.tp.all_reduce(_matmul(ops, self.wo, o.reshape(B, T, Hq * hd)))  # (B, T, dim); TP: sum the parts

    def _paged(self, q, k, v, step: Step, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        """The same attention over the paged cache: RoPE + k, v to their slots, then each sequence's queries
        over its pages (causal among its new tokens); q (N, Hq, hd), k and v (N, Hkv, hd)."""
        ops, p = step.ops, step.pages
        q = ops.rope_write_paged_cache(
            q, k, v, step.positions[0], p.slot_mapping, step.cos_sin, k_pages, v_pages, check_values=False
        )
        if p.decode:
            return ops.paged_decode_attention(q, k_pages, v_pages, p.block_tables, p.seq_lens, check_values=False)
        return ops.paged_prefill_attention(
            q, k_pages, v_pages, p.cu_seqlens_q, p.seq_lens, p.block_tables, check_values=False
        )


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.hidden = args.hidden_dim // tp.world  # this rank's FFN columns
        self.w13 = nn.Linear(args.dim, 2 * self.hidden, bias=False)  # w1 (gate) | w3 (up) stacked
        self.w2 = nn.Linear(self.hidden, args.dim, bias=False)

    def forward(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        ops = step.ops
        gu = _matmul(ops, self.w13, h)  # (B, T, 2 * hidden)
        out = _matmul(ops, self.w2, ops.swiglu(gu[..., : self.hidden], gu[..., self.hidden :]))  # (B, T, dim)
        return self.tp.all_reduce(out)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel):
        super().__init__()
        self.attention_norm = nn.Parameter(torch.empty(args.dim))
        self.attention = Attention(args, tp)
        self.ffn_norm = nn.Parameter(torch.empty(args.dim))
        self.feed_forward = FeedForward(args, tp)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        step: Step,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        next_norm: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream (B, T, dim); h = RMSNorm(x) with this block's attention_norm (computed by the
        previous block, fused into its residual add). Returns (x, h) after the block, h normalised with
        ``next_norm`` (the next block's attention_norm, or the final norm)."""
        ops, eps = step.ops, step.eps
        a = self.attention(h, step, k_cache, v_cache)
        h, x = ops.add_rms_norm(a, x, self.ffn_norm, eps)  # x += attention out; h = RMSNorm(x)
        f = self.feed_forward(h, step)
        h, x = ops.add_rms_norm(f, x, next_norm, eps)  # x += FFN out; h = next block's RMSNorm(x)
        return x, h

    def decode(self, x: torch.Tensor, step: DecodeStep, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """The fused decode step of this block, five launches: x (B, dim), one token per sequence -> x after it.

        Each RMSNorm runs inside the product that consumes it, RoPE and the cache write inside the attention,
        the residual adds and SwiGLU inside the products: nothing but the residual stream (B, dim), q|k|v, the
        attention output and the FFN activation goes through memory between them.
        """
        ops, eps, ws, a, f = step.ops, step.eps, step.gemv_workspace, self.attention, self.feed_forward
        B, Hq, Hkv, hd = x.shape[0], a.n_heads, a.n_kv_heads, a.head_dim
        qkv = _product(ops, a.wqkv, x, rms_weight=self.attention_norm, eps=eps, workspace=ws)  # 1: (B, (Hq+2Hkv) hd)
        q = qkv[:, : Hq * hd].unflatten(-1, (Hq, hd))
        k = qkv[:, Hq * hd : (Hq + Hkv) * hd].unflatten(-1, (Hkv, hd))
        v = qkv[:, (Hq + Hkv) * hd :].unflatten(-1, (Hkv, hd))
        if step.block_tables is None:  # 2: k_cache, v_cache the slab's (B, S_max, Hkv, hd) views, or the page pools
            o = ops.rope_decode_attention(q, k, v, step.positions, step.cos_sin, k_cache, v_cache, step.workspace)
        else:
            args = (step.positions, step.cos_sin, k_cache, v_cache, step.block_tables, step.workspace)
            o = ops.paged_rope_decode_attention(q, k, v, *args)
        x = _product(ops, a.wo, o.reshape(B, Hq * hd), residual=x, workspace=ws)  # 3: x + o @ wo.T
        g = _product(ops, f.w13, x, rms_weight=self.ffn_norm, eps=eps, swiglu=True, workspace=ws)  # 4: SwiGLU
        return _product(ops, f.w2, g, residual=x, workspace=ws)  # 5: x + g @ w2.T


@dataclass
class DecodeStep:
    """What every block of one fused decode step shares."""

    ops: Ops  # the backend
    positions: torch.Tensor  # (B,) slot of each sequence's new token (its cache length is one more)
    cos_sin: torch.Tensor  # (max_seq_len rounded up to whole pages, hd) RoPE table
    workspace: object  # kernels.decode_step.DecodeWorkspace (the attention's split partials), None for the reference
    gemv_workspace: object  # kernels.gemv.GemvWorkspace (the products' split-K partials), None for the reference
    eps: float  # RMSNorm epsilon
    block_tables: torch.Tensor | None = None  # the engine's paged cache: (B, pages) int32; None: the static slab


def _product(ops: Ops, linear: nn.Module, x: torch.Tensor, **fusions) -> torch.Tensor:
    """The fused decode step's product: x @ linear's weight with ``ops.linear``'s fusions, or ``ops.quant_linear``'s
    for a quantized layer (its planes, and what the backend packed of them)."""
    if isinstance(linear, QuantLinear):
        return ops.quant_linear(x, *linear.planes, packed=linear.packed, **fusions)
    return ops.linear(x, linear.weight, **fusions)


def _matmul(ops: Ops, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A product of the prefill path, x (B, T, K): torch's (cuBLAS's) for a dense weight; for a quantized one the
    backend's ``quant_linear`` up to GEMV_ROWS rows (an unfused decode step, an engine's decode batch, a speculative
    verify), beyond them torch's product on the weight dequantized a slice at a time (``QuantLinear.forward``)."""
    if isinstance(linear, QuantLinear) and x.numel() <= GEMV_ROWS * x.shape[-1]:
        return ops.quant_linear(x, *linear.planes, packed=linear.packed)
    return linear(x)


FUSED_PAGED_SEQS = 16  # an engine's decode steps up to this many sequences (one row tile of the GEMV) run fused
GEMV_ROWS = 8  # rows up to which a quantized product reads its planes (a GEMV) rather than a dequantized copy


class Llama(nn.Module):
    """A Llama-3 model with its tokenizer, ops backend and static KV cache. Build it with ``Llama.load``."""

    def __init__(
        self,
        args: ModelArgs,
        backend: str = "torch",
        device: torch.device | str = "cpu",
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        self.args = args
        self.backend = backend
        self.tp = tp = tp or TensorParallel()
        self.vocab_local = args.vocab_size // tp.world  # TP: each rank holds a slice of the vocabulary
        # The weight is given, so nn.Embedding skips its own init: normal_ on the meta device imports torch._dynamo,
        # 1.2 s of every start, to fill values the checkpoint overwrites.
        emb = torch.empty(self.vocab_local, args.dim)
        self.tok_embeddings = nn.Embedding(self.vocab_local, args.dim, _weight=emb)
        self.layers = nn.ModuleList(TransformerBlock(args, tp) for _ in range(args.n_layers))
        self.norm = nn.Parameter(torch.empty(args.dim))
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, self.vocab_local, bias=False)
        self.ops = select_ops(backend, torch.device(device))
        self.tokenizer: Tokenizer | None = None
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.k_pages: list[torch.Tensor] = []  # the engine's paged cache (setup_pages), empty until then
        self.v_pages: list[torch.Tensor] = []
        self.use_cuda_graph = True
        self.fused_decode = backend == "triton" and not tp.enabled
        self.decode_workspace = self.gemv_workspace = None
        self._graphs = DecodeGraphs()
        self.quantize: str | None = None  # the loader's quantize= (None: dense products)

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        ckpt_dir: str | os.PathLike,
        backend: str = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 1,
        progress: bool = False,
        tp: TensorParallel | None = None,
        quantize: str | None = None,
        calibration: str | None = None,
        before_weights=None,
    ) -> Llama:
        """Load a checkpoint (a Meta or Hugging Face folder, a .gguf file, a hub name, or a
        ``checkpoints.folder.MemoryCheckpoint``) tensor by tensor onto ``device``; the body is loading.py's.

        Defaults: CUDA + bf16 with a GPU, else CPU + fp32 (bf16 when quantized); max_seq_len = the model's context,
        capped at 8192 to keep the KV cache modest. Under torchrun each rank loads its tensor-parallel slice (``tp``
        overrides the group read from torch.distributed). ``quantize``: None, "int8", "int4", "int4-gG" or "gguf":
        the products become ``QuantLinear`` as they load (model/quant/quantize.py says which and why);
        ``calibration`` (int4): a text whose inputs choose the int4 codes (GPTQ, model/quant/calibrate.py).
        ``before_weights(tokenizer, max_seq_len)``: called before any weight is read, so a check on the input (a
        prompt too long for the context) fails before the long part.
        """
        tp = tp or distributed.current()
        load = (ckpt_dir, backend, device, dtype, max_seq_len, max_batch_size, progress, tp, quantize, calibration,
                before_weights)  # fmt: skip
        return loading.load_on_every_rank(tp, lambda: loading.load(cls, *load))

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """(Re)allocate the static KV cache: per layer, k and v of shape (max_batch, Hkv, max_seq_len, hd)
        (Hkv: this rank's k/v heads under tensor parallelism)."""
        a, dev, dt = self.args, self.device, self.dtype
        shape = (max_batch_size, a.n_kv_heads // self.tp.world, max_seq_len, a.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(a.n_layers)]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(a.n_layers)]
        # RoPE's cos/sin of every position the cache can hold, exact (fp64, rounded once): 4 * hd bytes a position.
        page = self.k_pages[0].shape[1] if self.k_pages else 1  # the paged cache's steps read whole pages
        self.rope_cos_sin = reference.rope_table(self.inv_freq, -(-max_seq_len // page) * page)  # (S, hd) fp32
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self._make_decode_workspace()
        self._graphs.clear()

    def setup_pages(self, num_pages: int, page_size: int) -> None:
        """Allocate the paged KV cache the engine runs on: per layer, k and v pools of ``num_pages`` pages of
        ``page_size`` tokens, (num_pages, page_size, Hkv, hd). Positions reach at most max_seq_len; the RoPE table
        covers whole pages (the fused step's kernel may read as far as a block-table row reaches)."""
        a, dev, dt = self.args, self.device, self.dtype
        shape = (num_pages, page_size, a.n_kv_heads // self.tp.world, a.head_dim)
        self.k_pages = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(a.n_layers)]
        self.v_pages = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(a.n_layers)]
        rows = -(-self.max_seq_len // page_size) * page_size
        if self.rope_cos_sin.shape[0] < rows:
            self.rope_cos_sin = reference.rope_table(self.inv_freq, rows)
        self._make_decode_workspace()
        self._graphs.clear()  # captured steps hold the workspaces and table they were captured with

    @torch.inference_mode()
    def forward_paged(
        self, tokens: torch.Tensor, positions: torch.Tensor, pages: Pages, last: torch.Tensor
    ) -> torch.Tensor:
        """One engine step over the paged cache: the new tokens (N,) of several sequences packed, at ``positions``
        (N,), their k and v written to ``pages.slot_mapping``; logits (S, vocab) fp32 at rows ``last`` (S,), each
        sequence's last new token. Inputs are the engine's own, trusted (no checks, no host sync here).

        A decode step of at most FUSED_PAGED_SEQS sequences runs the fused step (5 launches a layer) over the pages;
        beyond that many rows the prefill path's products (cuBLAS's GEMM reads each weight once for all rows, the
        fused GEMV once per tile of 16 rows) win."""
        if pages.decode and self.fused_decode and tokens.shape[0] <= FUSED_PAGED_SEQS:
            return self._decode_step(tokens[:, None], positions.int(), pages)
        return self._run(tokens[None], positions[None], 0, gather=last, pages=pages)[:, 0]

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def weight_bytes(self) -> int:
        """Bytes of every weight: parameters, and the quantized products' buffers (integers, scales, offsets)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: everything but the embedding table (one row of it), unless tied."""
        emb = self.tok_embeddings.weight
        skipped = 0 if self.output is None else emb.numel() * emb.element_size()
        return self.weight_bytes() - skipped

    # ---- switching backend and graph capture --------------------------------------------------------
    def use(
        self,
        backend: str | None = None,
        cuda_graph: bool | None = None,
        ops: Ops | None = None,
        fused_decode: bool | None = None,
    ) -> None:
        """Switch the ops backend ("triton" or "torch"), the CUDA-graph decode step and/or the fused decode step,
        in place: the weights and the KV cache stay. Captured graphs are dropped (they hold the previous kernels).
        ``ops``: run any implementation of ``kernels.Ops`` instead (explain's recording wrapper, say); the
        ``backend`` name is left as it is. ``fused_decode`` (default: on for "triton", off for "torch"): decode
        steps run ``TransformerBlock.decode``, five launches a layer, instead of the prefill path's ten (whose
        matrix products are cuBLAS's); not under tensor parallelism, where each product ends in an all-reduce."""
        if backend is not None:
            self.ops = select_ops(backend, self.device)
            self.backend = backend
            if fused_decode is None:
                self.fused_decode = backend == "triton" and not self.tp.enabled
        if ops is not None:
            self.ops = ops
        if cuda_graph is not None:
            self.use_cuda_graph = bool(cuda_graph)
        if fused_decode is not None:
            if fused_decode and self.tp.enabled:
                raise UserError("fused_decode: not available under tensor parallelism")
            self.fused_decode = bool(fused_decode)
        pack = self.ops.pack_quant
        for m in self.modules():  # each quantized product's planes as this backend reads them best, packed once
            if isinstance(m, QuantLinear) and m.packed_with is not pack:
                m.packed, m.packed_with = pack(*m.planes, self.dtype), pack
        self._make_decode_workspace()
        self._graphs.clear()

    def _make_decode_workspace(self) -> None:
        """The fused step's scratch, the backend's (``ops.workspaces``): for the attention and the products."""
        self.decode_workspace = self.gemv_workspace = None
        batch = max(self.max_batch_size, FUSED_PAGED_SEQS if self.k_pages else 0)  # the engine's fused steps too
        if self.fused_decode and batch:
            a = self.args
            self.decode_workspace, self.gemv_workspace = self.ops.workspaces(
                batch, a.n_heads, a.n_kv_heads, a.head_dim, self.device
            )

    def has_decode_graph(self, batch: int) -> bool:
        """Whether decode steps of this batch size replay a captured CUDA graph (False: eager, or not yet run)."""
        return self._graphs.captured(batch)

    # ---- the forward pass -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32 for ``tokens`` (B, T) placed at positions start_pos.. of the cache.

        ``start_pos`` is an int (every sequence at the same offset), or for T == 1 a (B,) tensor of
        per-sequence positions (a batch whose histories differ in length). The T positions are
        written to the KV cache, so the next call continues from start_pos + T. Inputs are checked.
        """
        tokens, positions, start = check_inputs(self, tokens, start_pos)
        if start is None:  # one token per sequence at its own position: a decode step
            return self._decode_step(tokens, positions[:, 0])[:, None]
        return self._run(tokens, positions, start)

    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, start_pos: int = 0, last: torch.Tensor | None = None, check: bool = True
    ) -> torch.Tensor:
        """Run ``tokens`` (B, T) at positions start_pos .. start_pos + T - 1 of every sequence, filling the cache.

        Returns logits (B, T, vocab) in fp32, or with ``last`` (B,) token indices only those, (B, 1, vocab):
        generation needs just each prompt's last token. ``check=False`` skips the input checks (host syncs)
        for a caller that made the tokens itself.
        """
        if check:
            if not isinstance(start_pos, int) or isinstance(start_pos, bool):
                raise UserError(f"start_pos must be an int, got {shown(start_pos)}")
            tokens, positions, start_pos = check_inputs(self, tokens, start_pos)
            if last is not None and (not torch.is_tensor(last) or last.shape != (tokens.shape[0],)):
                raise UserError(f"last must be a ({tokens.shape[0]},) tensor of token indices, got {described(last)}")
        else:
            B, T = tokens.shape
            positions = (start_pos + torch.arange(T, device=tokens.device)).expand(B, T)
        return self._run(tokens, positions, start_pos, gather=last)

    def _run(self, tokens, positions, start_pos, gather: torch.Tensor | None = None, pages: Pages | None = None):
        """tokens (B, T), positions (B, T) on the device; start_pos None for a decode step. ``gather`` (B,):
        return only logits at those token indices (B, 1, vocab). ``pages``: a paged step, tokens (1, N) packed,
        the caches the page pools (``setup_pages``), logits at ``gather`` (S,) rows: (S, 1, vocab)."""
        B = tokens.shape[0]
        lengths = positions[:, 0] + 1 if start_pos is None else None  # decode: cache length per sequence
        step = Step(self.ops, positions, start_pos, lengths, self.rope_cos_sin, self.args.norm_eps, pages)
        x = self._embed(tokens)  # (B, T, dim): the residual stream
        h = self.ops.rms_norm(x, self.layers[0].attention_norm, step.eps)
        for i, layer in enumerate(self.layers):
            if pages is None:
                k_cache = self.k_cache[i][:B].transpose(1, 2)  # (B, S_max, Hkv, hd) view
                v_cache = self.v_cache[i][:B].transpose(1, 2)
            else:
                k_cache, v_cache = self.k_pages[i], self.v_pages[i]  # (num_pages, PAGE, Hkv, hd)
            next_norm = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else self.norm
            x, h = layer(x, h, step, k_cache, v_cache, next_norm)
        if pages is not None:
            h = h[0, gather][:, None]  # (S, 1, dim): each sequence's last new token
        elif gather is not None:
            h = h[torch.arange(B, device=h.device), gather][:, None]  # (B, 1, dim)
        # The head's own module when it has one (a quantized head reads its bytes, not a weight dequantized per step)
        logits = F.linear(h, self.tok_embeddings.weight) if self.output is None else _matmul(self.ops, self.output, h)
        return self.tp.all_gather_last(logits.float())  # (B, T, vocab); TP: gather the slices

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return self.tok_embeddings(tokens)
        # Vocabulary-parallel lookup: rows outside this rank's slice contribute zeros; the sum has them all.
        local = tokens - self.tp.rank * self.vocab_local
        inside = (local >= 0) & (local < self.vocab_local)
        x = self.tok_embeddings(local.clamp(0, self.vocab_local - 1)) * inside[..., None]
        return self.tp.all_reduce(x)

    # ---- decode step (CUDA graph on GPUs) ---------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence: tokens (B, 1) at positions (B,) (device tensors, trusted). Logits (B, vocab).

        No host synchronisation: on CUDA the step is a replayed CUDA graph over static input buffers.
        """
        if self.device.type == "cuda" and self.use_cuda_graph:
            graph = self._graphs.get(self, tokens, positions)  # captured on the first step of this batch size
            if graph is not None:
                return graph.replay(tokens, positions)
        return self._decode_step(tokens, positions)

    def decode_graph(self, tokens: torch.Tensor, positions: torch.Tensor) -> DecodeGraph | None:
        """The captured decode step for this batch size (captured now if needed), its static input buffers holding
        ``tokens`` (B, 1) and ``positions`` (B,): a caller that writes the next inputs into ``graph.tokens`` and
        ``graph.positions`` itself (generate's sampling graph) runs a step with ``graph.replay_static()``, and finds
        the logits in ``graph.logits``. None where decode steps run eagerly (no CUDA, or graphs off, or failed)."""
        if self.device.type != "cuda" or not self.use_cuda_graph:
            return None
        graph = self._graphs.get(self, tokens, positions)
        if graph is not None:
            graph.tokens.copy_(tokens)
            graph.positions.copy_(positions)
        return graph

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, pages: Pages | None = None) -> torch.Tensor:
        """One token per sequence, tokens (B, 1) at positions (B,) -> logits (B, vocab) fp32: the fused step
        (embedding, 5 launches a block, the output head) or the prefill path with T = 1. ``pages``: the engine's
        paged cache, read and written through ``pages.block_tables`` (positions int32)."""
        if not self.fused_decode:
            return self._run(tokens, positions[:, None], None)[:, 0]
        tables = None if pages is None else pages.block_tables
        ws, gemv_ws, eps = self.decode_workspace, self.gemv_workspace, self.args.norm_eps
        step = DecodeStep(self.ops, positions, self.rope_cos_sin, ws, gemv_ws, eps, tables)
        B = tokens.shape[0]
        x = self.tok_embeddings(tokens[:, 0])  # (B, dim): the residual stream
        for i, layer in enumerate(self.layers):
            if pages is None:
                x = layer.decode(x, step, self.k_cache[i][:B].transpose(1, 2), self.v_cache[i][:B].transpose(1, 2))
            else:
                x = layer.decode(x, step, self.k_pages[i], self.v_pages[i])
        head = self.tok_embeddings if self.output is None else self.output  # tied, or its own (maybe quantized)
        logits = torch.empty((B, self.vocab_local), dtype=torch.float32, device=x.device)
        if x.device.type == "cpu" and self.backend == "triton":
            # Triton's interpreter (no GPU) reads ~4M weights a second: a 128k-row head would take seconds a token.
            # The head-wide kernels are tested on their own (tests/kernels/test_gemv.py, test_quant.py); PyTorch
            # computes the same thing here.
            return reference.linear(x, head.weight, rms_weight=self.norm, eps=step.eps, out=logits)
        ws = step.gemv_workspace
        return _product(self.ops, head, x, rms_weight=self.norm, eps=step.eps, out=logits, workspace=ws)  # norm + head

    def generate(self, prompts, **kwargs):
        """Generate text for one prompt or a batch; see ``model.generate.generate`` for the arguments."""
        from llama3_triton.model.generation.generate import generate

        return generate(self, prompts, **kwargs)


__all__ = ["Llama", "Step", "Pages", "DecodeStep", "CheckpointError", "select_ops", "default_device", "default_dtype"]
