"""Explain one forward pass: how a prompt becomes the next token, step by step.

``explain(llm, prompt)`` (the ``llama3-triton explain`` command) runs the model's own prefill of one
sequence -- its blocks, its KV cache -- through a recording wrapper of its ops backend (``_Recorder``, a
``kernels.Ops``), then says at each step what was computed, the shapes, and which kernel ran it:

    1 text -> token ids            2 embeddings [T, dim]          3 RMSNorm
    4-7 the chosen layer in detail: q/k/v per head, RoPE and the cache write, attention (scores, mask,
        softmax), SwiGLU
    8 every layer in turn          9 final norm, logits, the top-k next tokens, the chosen one

Every op the driver hands to its backend runs there (the Triton kernels, or their PyTorch twins for
backend="torch") -- that result is what the model carries on with -- and through ``kernels.reference`` on
the same inputs in fp32; the largest |difference| is reported beside the kernel's source file and line.
There is no second copy of the block here, so the walk cannot drift from the model. At the end the
logits are compared with a plain ``llm.forward`` on the same tokens. Matrix products are plain torch.

The report (``out_dir``) is one self-contained HTML page plus the PNGs it shows. The PNGs are embedded as
base64 data URIs and the style sheet is inline, so viewing the page loads nothing, from the network or
from disk. Kernel names link to their source files by a path relative to the report's folder (a link a
reader may follow, never something the page loads): it works wherever the project and the report sit
together, leaks no absolute path of the machine that wrote it, and the text beside it names the file in
the project (kernels/rope.py:176) should the page be moved.
"""

from __future__ import annotations

import base64
import functools
import html
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from llama3_triton.kernels import reference
from llama3_triton.model.checkpoints import files as _files
from llama3_triton.model.errors import UserError

DEFAULT_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
_ROOT = Path(reference.__file__).resolve().parent.parent  # the folder holding kernels/ and model/


@dataclass
class Check:
    """One op run by the model's backend and by ``kernels.reference`` on the same inputs."""

    op: str  # "rms_norm", "rope", ...
    layer: int | None
    source: str  # where the backend's function is defined: "kernels/rope.py:176"
    url: str  # file:// URL of that file
    ref_source: str  # where its reference twin is defined: "kernels/reference.py:92"
    max_diff: float  # max |backend output - reference output| over every output element
    actual: tuple[torch.Tensor, ...] = field(repr=False)  # outputs (and, for a cache write, the slots written)
    expected: tuple[torch.Tensor, ...] = field(repr=False)  # the same from the reference, fp32
    inputs: tuple = field(default=(), repr=False)  # the arguments the model passed


@dataclass
class Step:
    number: int
    title: str
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # PNG names, keys of Explanation.figures


@dataclass
class Explanation:
    tokens: list[int]
    steps: list[Step]
    logits: torch.Tensor  # (T, vocab) fp32: the walk's
    model_logits_diff: float  # max |walk logits - llm.forward(tokens, 0)|
    top_ids: list[int]
    top_probs: list[float]
    chosen: int  # the greedy next token
    layer_norms: list[tuple[float, float]]  # (mean over tokens, last token) of rms(x): embeddings, then each layer
    figures: dict[str, bytes] = field(default_factory=dict, repr=False)
    html_path: Path | None = None

    @property
    def checks(self) -> list[Check]:
        return [c for s in self.steps for c in s.checks]


@functools.cache
def _where(fn) -> tuple[str, str]:
    """("kernels/rope.py:176", "file:///.../kernels/rope.py") for a function; (its name, "") if it has no source."""
    try:
        path = Path(inspect.getsourcefile(fn)).resolve()
        line = inspect.getsourcelines(fn)[1]
    except (TypeError, OSError):  # a builtin, or code with no file (a REPL lambda)
        return getattr(fn, "__qualname__", repr(fn)), ""
    shown = path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path
    return f"{shown}:{line}", path.as_uri()


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last dim, in fp32: the size of each token's residual vector, on the scale
    RMSNorm divides by (an L2 norm would grow with sqrt(dim))."""
    return x.float().pow(2).mean(-1).sqrt()


def _fp32(v):
    return v.float() if torch.is_tensor(v) and v.is_floating_point() else v


def _vals(t: torch.Tensor, n: int = 4) -> str:
    t = t.flatten().float()
    more = ", ..." if t.numel() > n else ""
    return "[" + ", ".join(f"{v:+.4f}" for v in t[:n].tolist()) + more + "]"


def _axis(piece: str, has_glyph=None) -> str:
    """A token's text for a plot axis: spaces and newlines made visible; a character the plot's font cannot draw
    (``has_glyph`` says, when given) as its code point, U+4E2D, instead of an empty box."""
    text = piece.replace("\n", "\\n").replace(" ", "\u2423")
    if has_glyph is None:
        return text
    return "".join(c if has_glyph(c) else f"U+{ord(c):04X}" for c in text)


def _glyph_test():
    """A function telling whether matplotlib's default font draws a character (None when it cannot tell)."""
    try:
        from matplotlib import rcParams
        from matplotlib.font_manager import FontProperties, findfont
        from matplotlib.ft2font import FT2Font

        font = FT2Font(findfont(FontProperties(family=rcParams["font.family"])))
    except Exception:  # no matplotlib font machinery: keep the text as it is
        return None
    return lambda c: c.isspace() or font.get_char_index(ord(c)) != 0


# What each figure shows and where to look: the page's captions (a file name taught nothing).
CAPTIONS = {
    "rope.png": "Rotary embedding. Each circle is one pair of the query's dimensions; position p turns pair j by "
    "p x theta_j (the dots, coloured by position). The first pairs spin fast and tell neighbouring tokens apart; the "
    "last barely move over the prompt and carry what a token is, not where. The right panel: every pair's theta, "
    "with Llama 3.1's long-context scaling where the checkpoint uses it.",
    "scores.png": "One head's raw attention scores, q . k / sqrt(d): a row per query token, a column per key token. "
    "Columns bright for every row are tokens this head reads from everywhere.",
    "scores_masked.png": "The same scores after the causal mask: blank above the diagonal, where a key lies in the "
    "query's future and is never seen.",
    "attention.png": "Softmax of each row: the weights the head gives each earlier token (each row sums to 1). A "
    "bright first column is an attention sink (heads park their weight on the first token when nothing else "
    "matters); a bright cell off the diagonal is a token this head copies from.",
    "layer_norms.png": "The residual stream's size after each layer. Every block adds to it; a jump marks a layer "
    "that writes a lot (often the first and the last few), and the last token's line is the one the "
    "prediction is read from.",
    "topk.png": "The next-token distribution after the last position. Red: the token greedy decoding picks; a tall "
    "red bar is a confident model, a flat list a guess.",
}


class _Recorder:
    """A backend (``kernels.Ops``) that records: each op runs on the model's backend, whose result the model
    carries on with, and on ``kernels.reference`` in fp32 with the same inputs; the difference is kept with the
    layer that made the call. The model runs its own forward pass through it, so the walk cannot drift from
    the model: there is no second copy of the block here."""

    def __init__(self, ops):
        self.ops = ops
        self.pack_quant = ops.pack_quant  # the backend's own function: what it packed stays packed
        self.layer: int | None = None  # set by a forward pre-hook on each block
        self.calls: list[Check] = []

    def _run(self, name: str, args: tuple, kwargs: dict, writes: tuple[int, ...] = ()):
        fn, ref_fn = getattr(self.ops, name), getattr(reference, name)
        # The reference gets fp32 copies; a cache it writes (arguments ``writes``) is a copy too, so the model's
        # own cache holds the backend's values only.
        ref_args = [a.float().clone() if i in writes else _fp32(a) for i, a in enumerate(args)]
        got = fn(*args, **kwargs)  # the model's backend: its result is what the model carries on with
        ref = ref_fn(*ref_args, **{k: _fp32(v) for k, v in kwargs.items()})
        got_t, ref_t = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
        if writes:  # compare the cache slots written too: positions is argument 3 of rope_write_cache
            positions = args[3].long()
            b = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
            got_t += tuple(args[i][b, positions] for i in writes)
            ref_t += tuple(ref_args[i][b, positions] for i in writes)
        diff = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got_t, ref_t, strict=True))
        (source, url), (ref_source, _) = _where(fn), _where(ref_fn)
        self.calls.append(Check(name, self.layer, source, url, ref_source, diff, got_t, ref_t, args))
        return got

    def rms_norm(self, x, weight, eps=1e-5):
        return self._run("rms_norm", (x, weight, eps), {})

    def add_rms_norm(self, x, residual, weight, eps=1e-5):
        return self._run("add_rms_norm", (x, residual, weight, eps), {})

    def rope_write_cache(self, q, k, v, positions, cos_sin, k_cache, v_cache, *, check_values=True):
        args = (q, k, v, positions, cos_sin, k_cache, v_cache)
        return self._run("rope_write_cache", args, {"check_values": check_values}, writes=(5, 6))

    def attention(self, q, k, v, *, start_pos=0, scale=None):
        return self._run("attention", (q, k, v), {"start_pos": start_pos, "scale": scale})

    def decode_attention(self, q, k_cache, v_cache, lengths, *, check_values=True):
        return self._run("decode_attention", (q, k_cache, v_cache, lengths), {"check_values": check_values})

    def swiglu(self, gate, up):
        return self._run("swiglu", (gate, up), {})

    # Not recorded: the products (a dense one is torch's, a quantized one the backend's), and what the backend keeps.
    def quant_linear(self, x, qweight, scales, mins, group, **kwargs):
        return self.ops.quant_linear(x, qweight, scales, mins, group, **kwargs)

    def workspaces(self, max_batch, n_heads, n_kv_heads, head_dim, device):
        return self.ops.workspaces(max_batch, n_heads, n_kv_heads, head_dim, device)


@torch.inference_mode()
def _record(llm, tokens: torch.Tensor) -> tuple[torch.Tensor, _Recorder]:
    """The model's own prefill of ``tokens`` (1, T), KV cache and all, through a recording backend."""
    rec = _Recorder(llm.ops)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: setattr(rec, "layer", i)) for i, b in enumerate(llm.layers)]
    backend = llm.ops
    try:
        llm.use(ops=rec)
        logits = llm.prefill(tokens, 0)[0]  # (T, vocab)
    finally:
        llm.use(ops=backend)
        for hk in hooks:
            hk.remove()
    return logits, rec


class _Walk:
    """Collects the steps and prints each line as it comes."""

    def __init__(self, llm, out: TextIO):
        self.llm, self.out = llm, out
        self.steps: list[Step] = []
        self.plot: dict = {}  # data the figures are drawn from

    def step(self, title: str) -> Step:
        s = Step(len(self.steps) + 1, title)
        self.steps.append(s)
        print(f"\n[{s.number}] {title}", file=self.out)
        return s

    def say(self, s: Step, line: str) -> None:
        s.lines.append(line)
        print("    " + line, file=self.out)

    def check(self, s: Step, c: Check) -> None:
        """Show a recorded op in this step: where it ran, and its difference from the reference."""
        s.checks.append(c)
        print(f"    -> {c.op} ran in {c.source}; max |diff| vs {c.ref_source}: {c.max_diff:.2e}", file=self.out)


def _layer_calls(rec: _Recorder, i: int) -> dict[str, list[Check]]:
    calls: dict[str, list[Check]] = {}
    for c in rec.calls:
        if c.layer == i:
            calls.setdefault(c.op, []).append(c)
    return calls


def _explain_layer(w: _Walk, rec: _Recorder, i: int, head: int, labels: list[str]) -> None:
    """Steps 4 to 7: the recorded calls of block i, for one query head, with the numbers they moved."""
    llm, a = w.llm, w.llm.args
    blk = llm.layers[i]
    calls = _layer_calls(rec, i)
    rope, attn_call, swi = calls["rope_write_cache"][0], calls["attention"][0], calls["swiglu"][0]
    add_attn, add_ffn = calls["add_rms_norm"]
    Hq, Hkv, hd, G, dim = blk.attention.n_heads, blk.attention.n_kv_heads, a.head_dim, a.n_rep, a.dim
    q, k, v, positions = rope.inputs[:4]  # (1, T, H, hd) views of the wqkv product, as the block made them
    T, kvh, last = q.shape[1], head // G, f"token {q.shape[1] - 1} {labels[-1]!r}"
    h_in = (rec.calls[0] if i == 0 else _layer_calls(rec, i - 1)["add_rms_norm"][1]).actual[0]  # this block's h

    s = w.step(f"Layer {i}: q, k and v, per head")
    src = "the RMSNorm of the embeddings (step 3)" if i == 0 else f"RMSNorm(x after layer {i - 1}), fused with the add"
    w.say(s, f"input h [T={T}, dim={dim}]: {src}")
    wqkv = blk.attention.wqkv.weight  # ((Hq + 2 Hkv) hd, dim): wq | wk | wv stacked by rows
    wq = wqkv[: Hq * hd].view(Hq, hd, dim)
    wk = wqkv[Hq * hd : (Hq + Hkv) * hd].view(Hkv, hd, dim)
    wv = wqkv[(Hq + Hkv) * hd :].view(Hkv, hd, dim)
    w.say(s, f"wqkv [{wqkv.shape[0]}, {dim}] = wq | wk | wv stacked by rows; viewed per head [heads, head_dim, dim]:")
    w.say(s, f"  wq {list(wq.shape)}, wk {list(wk.shape)}, wv {list(wv.shape)} (a head's rows are contiguous)")
    groups = [f"q heads {g * G}..{g * G + G - 1} -> k/v head {g}" for g in range(Hkv)]
    w.say(s, f"GQA, {G} query heads per k/v head: " + "; ".join(groups[:4]) + ("; ..." if Hkv > 4 else ""))
    w.say(s, f"h @ wqkv.T -> [T, {wqkv.shape[0]}] -> q [T, {Hq}, {hd}], k [T, {Hkv}, {hd}], v [T, {Hkv}, {hd}]")
    own = h_in[0] @ wq[head].T  # the chosen head from its own slice of the weight: the same numbers
    d = float((own - q[0, :, head]).abs().max())
    w.say(s, f"head {head}: q = h @ wq[{head}].T [T, {hd}] (= the slice of the fused product, max |diff| {d:.1e})")
    w.say(s, f"  it reads k/v head {kvh}: k = h @ wk[{kvh}].T, v = h @ wv[{kvh}].T, each [T, {hd}]")
    w.say(s, f"  {last}: q {_vals(q[0, -1, head])}  k {_vals(k[0, -1, kvh])}  v {_vals(v[0, -1, kvh])}")

    s = w.step(f"Layer {i}: rotary position embedding (RoPE), and the KV cache")
    inv, plain = llm.inv_freq, reference.rope_inv_freq(hd, a.rope_theta).to(llm.inv_freq.device)
    w.say(s, f"pair j = (x[2j], x[2j+1]) of every head turns by angle p * theta_j at position p, j < {hd // 2}")
    w.say(s, f"theta_j = {a.rope_theta:g}^(-2j/{hd}): {float(inv[0]):.3g} .. {float(inv[-1]):.3g} rad/token")
    if a.rope_scaling:
        f = float(a.rope_scaling["factor"])
        kept, divided = torch.isclose(inv, plain), torch.isclose(inv, plain / f)
        n_kept, n_div, n_blend = int(kept.sum()), int(divided.sum()), int((~kept & ~divided).sum())
        w.say(s, f"Llama 3.1/3.2 scaling (factor {f:g}): {n_kept} high frequencies kept, {n_div} low ones divided")
        w.say(s, f"  by {f:g}, {n_blend} blended between (long wavelengths stretched for a longer context)")
    else:
        w.say(s, "no frequency scaling in this checkpoint (Llama 3.0)")
    w.say(s, f"wavelengths 2pi/theta_j: {2 * math.pi / float(inv[0]):.3g} .. {2 * math.pi / float(inv[-1]):.3g} tokens")
    w.say(s, f"cos/sin: a table built once in fp64 [max_seq_len={llm.max_seq_len}, {hd}]; the kernel reads row p")
    w.say(s, "one launch rotates q and k, and writes the rotated k and the v into KV-cache slot p (the position)")
    w.check(s, rope)
    q_rot = rope.actual[0]  # (1, T, Hq, hd)
    k_cache, v_cache = rope.inputs[5], rope.inputs[6]  # (1, S_max, Hkv, hd) views of this layer's cache
    k_rot = k_cache[:, :T]  # slots 0..T-1 now hold the prompt's rotated keys
    for name, before, after in (("q", q[0, -1, head], q_rot[0, -1, head]), ("k", k[0, -1, kvh], k_rot[0, -1, kvh])):
        n0, n1 = float(before.float().norm()), float(after.float().norm())
        w.say(s, f"{name}, {last}: {_vals(before)} -> {_vals(after)}; |{name}| {n0:.4f} -> {n1:.4f}")
    w.say(s, "(a rotation keeps lengths; q.k then depends on the positions only through their difference)")
    w.say(s, f"KV cache of this layer: k and v [max_seq_len={k_cache.shape[1]}, {Hkv}, {hd}]; slots 0..{T - 1} filled")
    w.plot["rope"] = (inv.cpu(), plain.cpu(), q[0, -1, head].float().cpu(), T, head)

    s = w.step(f"Layer {i}: causal attention")
    qh, kh, vh = q_rot[0, :, head].float(), k_rot[0, :, kvh].float(), v_cache[0, :T, kvh].float()  # (T, hd) each
    scores = qh @ kh.T / math.sqrt(hd)  # (T, T): row t = query token t, column s = key token s
    future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)  # key s after query t
    masked = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    out_h = probs @ vh  # (T, hd)
    w.say(s, f"head {head}: scores = q k^T / sqrt({hd}) -> [T, T]; row t: query t against every key")
    w.say(s, f"causal mask: token t sees tokens 0..t; the {T * (T - 1) // 2} scores above the diagonal -> -inf")
    p3, j3 = probs[-1].topk(min(3, T))
    seen = ", ".join(f"{labels[j]!r}@{j} {p:.2f}" for p, j in zip(p3.tolist(), j3.tolist(), strict=True))
    w.say(s, f"softmax of each row -> weights summing to 1; the last token attends most to {seen}")
    w.say(s, f"head output = weights @ v -> [T, {hd}]")
    w.check(s, attn_call)
    o = attn_call.actual[0]  # (1, T, Hq, hd)
    d = float((o[0, :, head].float() - out_h).abs().max())
    w.say(s, f"all heads in one call, over the cache: attention(q, k_cache, v_cache) -> [T, {Hq}, {hd}]; its head "
             f"{head} vs the above: {d:.1e}")  # fmt: skip
    w.say(s, f"output projection: the heads side by side [T, {Hq * hd}] @ wo.T -> [T, {dim}]")
    x_in, x_mid = add_attn.inputs[1], add_attn.actual[1]
    n0, n1 = float(_rms(x_in[0]).mean()), float(_rms(x_mid[0]).mean())
    w.check(s, add_attn)
    w.say(s, f"residual: x = x + that (mean rms(x) {n0:.3f} -> {n1:.3f}); fused with the FFN's norm: h = RMSNorm(x)")
    w.plot["scores"] = (scores.cpu(), masked.cpu(), probs.cpu(), i, head)

    s = w.step(f"Layer {i}: SwiGLU feed-forward")
    gate = swi.inputs[0]
    hid = gate.shape[-1]
    w.say(s, f"h @ w13.T -> [T, {2 * hid}]: gate (w1) | up (w3) side by side, one matmul")
    off = float((gate < 0).float().mean())
    w.say(s, f"swiglu = silu(gate) * up -> [T, {hid}]; silu(g) = g sigmoid(g), ~0 for g << 0 ({off:.0%} of gates < 0)")
    w.check(s, swi)
    w.say(s, f"down projection: @ w2.T -> [T, {dim}]")
    n2 = float(_rms(add_ffn.actual[1][0]).mean())
    w.check(s, add_ffn)
    nxt = f"layer {i + 1}'s attention_norm" if i + 1 < a.n_layers else "the final norm"
    w.say(s, f"residual: x = x + that (mean rms(x) {n1:.3f} -> {n2:.3f}); fused with the next norm ({nxt})")


@torch.inference_mode()
def explain(
    llm,
    prompt: str = DEFAULT_PROMPT,
    *,
    layer: int = 0,
    head: int = 0,
    top_k: int = 10,
    out_dir: str | Path | None = None,
    file: TextIO | None = None,
) -> Explanation:
    """Walk ``prompt`` through ``llm`` (a loaded ``model.Llama``), printing each step to ``file`` (stdout).

    ``layer``/``head``: the layer and query head shown in detail. ``out_dir``: write explain.html and the PNGs.
    """
    a, tok = llm.args, llm.tokenizer
    if not prompt:
        raise UserError("the prompt is empty: pass some text to explain")
    if not 0 <= layer < a.n_layers:
        raise UserError(f"layer {layer} is out of range: this model has {a.n_layers} layers (0..{a.n_layers - 1})")
    if not 0 <= head < a.n_heads:
        raise UserError(f"head {head} is out of range: this model has {a.n_heads} query heads (0..{a.n_heads - 1})")
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    ids = tok.encode(prompt, bos=True, limit=llm.max_seq_len)  # tokenized only as far as it could fit
    T = len(ids)
    if T > llm.max_seq_len:
        raise UserError(f"the prompt is {T:,} tokens or more, longer than the model's max_seq_len of "
                        f"{llm.max_seq_len:,}")  # fmt: skip
    if out_dir is not None:
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise UserError(f"{out_dir}: exists and is not a folder (the report goes into a folder)")
        _matplotlib()  # fail now, not after the walk, if it is missing
    w = _Walk(llm, file or sys.stdout)
    labels = [tok.piece(i) for i in ids]  # each token's text
    tokens = torch.tensor([ids], device=llm.device)  # (1, T): a batch of one sequence

    s = w.step("Text to tokens, and the model")
    how = (
        "the checkpoint's Hugging Face BPE (model/hf_tokenizer.py)"
        if getattr(tok, "kind", None) == "huggingface"
        else "Llama-3's tiktoken BPE (model/tokenizer.py)"
    )
    bos = ", BOS first" if ids and ids[0] == tok.bos_id else " (this model's prompts take no BOS)"
    w.say(s, f"prompt {prompt!r}: {how} -> {T} ids{bos}")
    w.say(s, "  pos      id  piece")
    for p, (i, piece) in enumerate(zip(ids[:48], labels[:48], strict=True)):
        w.say(s, f"  {p:3d}  {i:6d}  {piece!r}")
    if T > 48:
        w.say(s, f"  ... {T - 48} more")
    w.say(s, f"model: dim {a.dim}, {a.n_layers} layers, FFN hidden {a.hidden_dim}, vocab {a.vocab_size}")
    w.say(s, f"  {a.n_heads} query heads, {a.n_kv_heads} k/v heads (GQA {a.n_rep}), head dim {a.head_dim}")
    scaling = f"factor {a.rope_scaling['factor']:g} (Llama 3.1/3.2)" if a.rope_scaling else "none (Llama 3.0)"
    w.say(s, f"  RoPE theta {a.rope_theta:g}, scaling {scaling}; norm eps {a.norm_eps:g}")
    w.say(s, f"  output matrix: {'tied to the embedding (Llama 3.2 1B/3B)' if a.tie_embeddings else 'its own'}")
    ops = "the Triton kernels" if llm.backend == "triton" else "kernels.reference, the PyTorch twins"
    w.say(s, f"run: {str(llm.dtype).removeprefix('torch.')} on {llm.device}, backend {llm.backend!r} ({ops})")
    if llm.backend == "torch":
        w.say(s, "  (the torch backend runs the reference ops themselves: the differences below show only the")
        w.say(s, "  rounding of the dtype against fp32; --backend triton puts the Triton kernels to the test)")

    # The model's own forward pass, through a recorder of its ops; everything below reads what it recorded.
    logits, rec = _record(llm, tokens)  # (T, vocab) fp32, exactly the model's
    first_norm = rec.calls[0]  # rms_norm(x, layers[0].attention_norm) before the first block

    s = w.step("Token embeddings")
    x = first_norm.inputs[0]  # (1, T, dim): the residual stream starts here
    w.say(s, f"x = tok_embeddings.weight[ids]: rows of the [{a.vocab_size}, {a.dim}] table -> x [T={T}, dim={a.dim}]")
    w.say(s, f"x[0] ({labels[0]!r}) = {_vals(x[0, 0])}; a gather, no kernel (torch.nn.Embedding)")
    w.say(s, "x is the residual stream: every layer reads it and adds its result to it")

    s = w.step("RMSNorm of the embeddings")
    rms = x[0].float().pow(2).mean(-1).sqrt()
    w.say(s, f"h = x / sqrt(mean(x^2) + {a.norm_eps:g}) * attention_norm of layer 0 -> h [T={T}, dim={a.dim}]")
    w.say(s, f"rms of each token's x: {_vals(rms)} -> 1 after the division; the weight then scales each channel")
    w.check(s, first_norm)

    out_w = llm.tok_embeddings.weight if llm.output is None else llm.output.weight

    def lens(x: torch.Tensor) -> tuple[float, float, int, float]:
        """rms(x) (mean over tokens, last token) and the top guess if the model stopped here (the "logit lens")."""
        hl = reference.rms_norm(x[0, -1].float(), llm.norm.float(), a.norm_eps)
        p = torch.softmax(hl @ out_w.float().T, -1)
        n = _rms(x[0])
        return float(n.mean()), float(n[-1]), int(p.argmax()), float(p.max())

    summary = [lens(x)]
    for i in range(a.n_layers):
        if i == layer:
            _explain_layer(w, rec, i, head, labels)
        summary.append(lens(_layer_calls(rec, i)["add_rms_norm"][1].actual[1]))  # x after block i

    s = w.step("Every layer in turn: the residual stream")
    s.checks.extend(c for c in rec.calls if c.layer is not None and c.layer != layer)
    w.say(s, "the model's own blocks ran every layer (TransformerBlock.forward); each op was recorded and checked")
    w.say(s, "layer  mean rms(x)  last rms(x)  top guess for the next token (final norm + output on the last token)")
    for j, (mean, lst, guess, p) in enumerate(summary):
        name = "emb" if j == 0 else f"{j - 1:3d}"
        w.say(s, f"{name:>5}  {mean:9.3f}  {lst:9.3f}   {tok.piece(guess)!r} (id {guess}, p {p:.4f})")
    by_op: dict[str, float] = {}
    for c in rec.calls:
        by_op[c.op] = max(by_op.get(c.op, 0.0), c.max_diff)
    w.say(s, "kernels over all layers, max |diff| vs reference: " + ", ".join(f"{k} {v:.1e}" for k, v in by_op.items()))

    s = w.step("Final norm, logits, the next token")
    w.say(s, f"h = RMSNorm(x) with the final norm weight (fused into the last add_rms_norm) [T={T}, dim={a.dim}]")
    tied = "tok_embeddings.weight (tied)" if llm.output is None else "output.weight"
    w.say(s, f"logits = h @ {tied}.T -> [T={T}, vocab={a.vocab_size}]; row t predicts token t+1")
    probs = torch.softmax(logits[-1], -1)
    top = probs.topk(min(top_k, a.vocab_size))
    top_ids, top_probs = top.indices.tolist(), top.values.tolist()
    w.say(s, f"top {len(top_ids)} of softmax(logits[{T - 1}]):")
    for r, (i, p) in enumerate(zip(top_ids, top_probs, strict=True), 1):
        w.say(s, f"  {r:2d}. {tok.piece(i)!r:<20} id {i:6d}  p {p:.4f}  logit {float(logits[-1, i]):+.3f}")
    chosen = top_ids[0]
    w.say(s, f"chosen (greedy, temperature 0): {tok.piece(chosen)!r} (id {chosen})")
    model_logits = llm.forward(tokens, 0)[0]  # the driver again, on its own backend, without the recorder
    model_diff = float((model_logits - logits).abs().max())
    w.say(s, f"llm.forward(tokens, 0) gives the same logits: max |diff| {model_diff:.2e}")

    ex = Explanation(ids, w.steps, logits, model_diff, top_ids, top_probs, chosen, [m[:2] for m in summary])
    if out_dir is not None:
        with warnings.catch_warnings():  # token text in a script DejaVu Sans lacks: boxes, not a warning each
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            ex.figures = _figures(w.plot, labels, summary, tok, top_ids, top_probs)
        for st, names in ((5, ["rope.png"]), (6, ["scores.png", "scores_masked.png", "attention.png"])):
            w.steps[st - 1].figures = names
        w.steps[7].figures, w.steps[8].figures = ["layer_norms.png"], ["topk.png"]
        ex.html_path = _write_report(Path(out_dir), ex, llm, prompt, layer, head)
        print(f"\nwrote {ex.html_path} and {len(ex.figures)} PNGs beside it", file=w.out)
    return ex


# ---- the report -------------------------------------------------------------------------------------


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the HTML report needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    _matplotlib()[1](fig).print_png(buf)  # Agg, no pyplot: no global state, no display needed
    return buf.getvalue()


def _layer_ticks(n: int, most: int = 20) -> list[int]:
    """The points of an n-point layer axis that get a label: every k-th and the last, at most ``most`` + 1, so that
    80 layers' labels never run into each other (a label on each of 81 points did)."""
    every = max(1, math.ceil(n / most))
    return [x for x in range(n) if x % every == 0 or x == n - 1]


def _figures(plot: dict, labels, summary, tok, top_ids, top_probs) -> dict[str, bytes]:
    Figure = _matplotlib()[0]
    T, figs = len(labels), {}
    has_glyph = _glyph_test()
    axis = [_axis(lab, has_glyph) for lab in labels]
    scores, masked, probs, layer, head = plot["scores"]
    for name, m, what, cmap in (
        ("scores.png", scores, "q k^T / sqrt(d), before masking", "RdBu_r"),
        ("scores_masked.png", masked, "after the causal mask (blank: -inf)", "RdBu_r"),
        ("attention.png", probs, "after softmax: attention weights", "viridis"),
    ):
        size = 2.5 + 0.32 * T
        fig = Figure(figsize=(size + 1.2, size))
        ax = fig.add_subplot()
        vmax = float(scores.abs().max()) if cmap == "RdBu_r" else None
        im = ax.imshow(m.numpy(), cmap=cmap, vmin=-vmax if vmax else 0, vmax=vmax)
        ax.set_xticks(range(T), axis, rotation=90, fontsize=8)
        ax.set_yticks(range(T), axis, fontsize=8)
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
        ax.set_title(f"layer {layer}, head {head}: {what}", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        figs[name] = _png(fig)

    inv, plain, q_last, T, head = plot["rope"]
    half = inv.numel()
    pairs = sorted({round(x) for x in torch.linspace(0, half - 1, 5).tolist()})
    fig = Figure(figsize=(15, 3.4))
    pos = torch.arange(T, dtype=torch.float32)
    for n, j in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs) + 1, n + 1)
        t = torch.linspace(0, 2 * math.pi, 200)
        ax.plot(t.cos(), t.sin(), color="0.85", lw=1)
        ang = pos * inv[j]  # e^{i p theta_j}: where position p turns pair j
        ax.scatter(ang.cos(), ang.sin(), c=pos, cmap="viridis", s=18, zorder=3)
        z = complex(float(q_last[2 * j]), float(q_last[2 * j + 1]))
        z = z / abs(z) if abs(z) else 0j
        r = complex(math.cos(float(ang[-1])), math.sin(float(ang[-1]))) * z  # that pair after rotation
        for c, col in ((z, "0.5"), (r, "crimson")):
            ax.annotate("", (c.real, c.imag), (0, 0), arrowprops={"arrowstyle": "->", "color": col})
        ax.set_aspect("equal")
        ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), xticks=[], yticks=[])
        ax.set_title(f"pair {j}: theta {float(inv[j]):.2g}\nwavelength {2 * math.pi / float(inv[j]):.3g}", fontsize=8)
    ax = fig.add_subplot(1, len(pairs) + 1, len(pairs) + 1)
    ax.semilogy(plain.numpy(), label="unscaled", color="0.6")
    ax.semilogy(inv.numpy(), label="this checkpoint", color="crimson", ls="--")
    ax.set(xlabel="pair j", ylabel="theta_j (rad/token)")
    ax.legend(fontsize=7)
    fig.suptitle(
        f"RoPE: e^(i p theta_j) for positions p = 0..{T - 1} (colour: p); arrows: head {head}'s query pair of "
        "the last token before (grey) and after (red) rotation",
        fontsize=9,
    )
    fig.tight_layout()
    figs["rope.png"] = _png(fig)

    n = len(summary)  # the embedding, then each layer: 17 to 81 points for 16 to 80 layers
    fig = Figure(figsize=(max(6.0, 0.11 * n), 3.5))
    ax = fig.add_subplot()
    xs = range(n)
    marker = n <= 40  # markers on every point crowd a long line
    ax.plot(xs, [m[0] for m in summary], marker="o" if marker else None, label="mean over tokens")
    ax.plot(xs, [m[1] for m in summary], marker="s" if marker else None, label="last token")
    ticks = _layer_ticks(n)
    ax.set_xticks(ticks, ["emb" if x == 0 else str(x - 1) for x in ticks], fontsize=8)
    ax.set(xlabel="after layer", ylabel="rms(x) = sqrt(mean(x^2))", title="The residual stream's RMS, layer by layer")
    ax.legend()
    fig.tight_layout()
    figs["layer_norms.png"] = _png(fig)

    fig = Figure(figsize=(6, 0.8 + 0.32 * len(top_ids)))
    ax = fig.add_subplot()
    names = [f"{_axis(tok.piece(i), has_glyph)} ({i})" for i in top_ids]
    ax.barh(range(len(top_ids)), top_probs, color=["crimson"] + ["steelblue"] * (len(top_ids) - 1))
    ax.set_yticks(range(len(top_ids)), names, fontsize=8)
    ax.invert_yaxis()
    ax.locator_params(axis="x", nbins=4)
    ax.set(xlabel="probability", title="Top next tokens (red: chosen)")
    fig.tight_layout()
    figs["topk.png"] = _png(fig)
    return figs


_CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:13px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;font-size:13px;text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:13px;color:#555}"""


def _relative_link(url: str, out_dir: Path) -> str:
    """A file:// URL as a URL path relative to ``out_dir`` (where explain.html goes)."""
    import os
    from urllib.parse import quote
    from urllib.request import url2pathname

    target = url2pathname(url.removeprefix("file://"))
    return quote(Path(os.path.relpath(target, out_dir.resolve())).as_posix())


def _write_report(out_dir: Path, ex: Explanation, llm, prompt: str, layer: int, head: int) -> Path:
    """explain.html (self-contained: PNGs as data URIs, inline CSS) and the PNGs, all in ``out_dir``."""
    esc = html.escape
    body = [
        f"<h1>How a prompt becomes the next token</h1><p>Prompt <code>{esc(repr(prompt))}</code>; checkpoint "
        f"<code>{esc(str(getattr(llm, 'checkpoint_dir', '?')))}</code>; backend <b>{esc(llm.backend)}</b>, "
        f"{esc(str(llm.dtype).removeprefix('torch.'))} on {esc(str(llm.device))}; layer {layer}, head {head} in "
        "detail. Each step names the kernel that ran it (a link to its source file) and its largest "
        "difference from the plain-PyTorch reference on these very tensors.</p><ol>"
        + "".join(f'<li><a href="#step-{s.number}">{esc(s.title)}</a></li>' for s in ex.steps)
        + "</ol>"
    ]
    for s in ex.steps:
        body.append(f'<section id="step-{s.number}"><h2>{s.number}. {esc(s.title)}</h2>')
        body.append("<pre>" + esc("\n".join(s.lines)) + "</pre>")
        if s.checks:
            rows: dict[str, list[Check]] = {}
            for c in s.checks:
                rows.setdefault(c.op, []).append(c)
            body.append("<table><tr><th>op</th><th>ran in</th><th>calls</th><th>max |diff| vs reference</th></tr>")
            for op, cs in rows.items():
                c = cs[0]
                link = f"<code>{esc(c.source)}</code>"
                link = f'<a href="{esc(_relative_link(c.url, out_dir))}">{link}</a>' if c.url else link
                body.append(
                    f"<tr><td><code>{esc(op)}</code></td><td>{link}</td><td>{len(cs)}</td>"
                    f"<td>{max(x.max_diff for x in cs):.2e} "
                    f"(vs <code>{esc(c.ref_source)}</code>)</td></tr>"
                )
            body.append("</table>")
        for name in s.figures:
            data = base64.b64encode(ex.figures[name]).decode("ascii")
            body.append(
                f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(CAPTIONS.get(name, name))} <code>{esc(name)}</code></figcaption></figure>"
            )
        body.append("</section>")
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>llama3-triton explain</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    # Each file appears whole or not at all (a full disk used to leave a truncated report); the PNGs first,
    # so that the page never exists without them.
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, png in ex.figures.items():
        _files.write_bytes(out_dir / name, png)
    path = out_dir / "explain.html"
    _files.write_text(path, page)
    return path


__all__ = ["DEFAULT_PROMPT", "Check", "Explanation", "Step", "explain"]
