"""Weight-only quantization of the model's matrix products: int8 per channel, int4 in groups, GGUF blocks as they are.

``Llama.load(..., quantize=...)`` (CLI ``--quantize``) takes one of:

    None            the weights in the model's dtype (bf16 on a GPU), as before
    "int8"          int8, one fp16 scale per output channel (symmetric: s = max|w| / 127)
    "int4"          int4 in groups along K, an fp16 scale and offset per group (asymmetric, w = q * s + m): groups
                    of 128, or for a product whose K 128 does not divide the largest of 64, 32 that does
                    (``int4_group``: every Llama-3 product takes 128; SmolLM2's K = 576 takes 64)
    "int4-g32", "int4-g64", "int4-g128"   exactly that group size (it must divide every K, else an error)
                    with ``calibration=text`` (CLI ``--calibration FILE``), int4's codes are GPTQ's on that text's
                    inputs (``gptq_int4``, model/calibrate.py); same layout, same kernels
    "gguf"          a GGUF file's Q8_0 / Q4_0 / Q4_1 blocks kept as they are (split into planes, no precision
                    change); F32/F16/BF16 tensors stay dense. Opt-in: without it a GGUF file is dequantized to
                    the model's dtype as before (the exact reference the quantized paths are measured against).

The quantized products are wqkv, wo, w13, w2 of every layer and the output head. The token embedding stays in
the model's dtype (a lookup reads one row of it). A model with a tied head (SmolLM2, Llama 3.2 1B/3B) gets a
quantized copy of the embedding as its ``output`` head: decode reads that copy (0.27-0.53 bytes a weight)
instead of the embedding, at the cost of the copy's memory (for "gguf", the embedding's own blocks when it is
stored as Q8_0/Q4_0/Q4_1, else no copy and the dense embedding serves as the head, as without quantization).

int8 rounds to the nearest step of max|row| / 127. int4 searches each group's scale and offset rather than taking
its min and max (``_int4_search``, after llama.cpp's make_qkx2_quants): it tries min/max (m = min, s = range / 15)
and 18 least-squares candidates (the range spread over 14, 14.4, ..., 16 levels, the (s, m) of those codes refit in
closed form, three times) and keeps the one of least squared error as stored (fp16) and applied (q rounded against
the stored values), so no group is worse than min/max. Relative RMS error on Gaussian weights, groups of 32 / 64 /
128: 7.8 / 9.0 / 10.0% (min/max) -> 6.9 / 8.2 / 9.2%. It costs 13-22x min/max's time: on a 2-core CPU 0.40 s for a
4096 x 4096 fp32 matrix (min/max 0.03 s), 1.3 s for 14336 x 4096 (0.06 s); an 8B checkpoint ~2.7 minutes there,
predicted (not measured) ~5-10 s on an H200.

Each tensor is quantized on the target device as it is loaded, its rows in slices of at most 4 M weights (16 MB in
fp32; the int4 search holds three such temporaries), so peak memory stays near the quantized model plus one dense
tensor (tests/model/test_loading_memory.py measures it).

``QuantLinear`` replaces ``nn.Linear``: it holds the planes, ``forward(x)`` is torch's product for any number of rows,
and ``weight`` is the dequantized matrix (for readers such as explain; slow, not for the hot path). The decode
products run on the backend's ``quant_linear`` (the ops contract, kernels/__init__.py): kernels/quant.py's Triton
GEMV, or kernels/reference.py's definition (torch's CPU weight-only kernels with bf16 activations on a CPU).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from llama3_triton.kernels import reference
from llama3_triton.model.errors import UserError, shown

QUANTIZE_CHOICES = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "gguf")
GGUF_KEPT = ("Q8_0", "Q4_0", "Q4_1")
_SLICE = 1 << 22  # weights per slice when quantizing or dequantizing a big matrix: bounds the fp32 temporaries
# (16 MB each; at 1 << 24 quantizing a 128k-row head took 320 MB of them, more than its int8 result)
_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: scales stay at full fp16 precision


def parse(quantize: str | None) -> tuple[str, int] | None:
    """``quantize`` as (kind, group): ("int8", 0), ("int4", G), ("int4", 0) for plain "int4" (each tensor's group
    chosen by ``int4_group``) or ("gguf", 0); None for no quantization."""
    if quantize is None or quantize == "none":
        return None
    if not isinstance(quantize, str) or quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (or None), got {shown(quantize)}")
    if quantize.startswith("int4"):
        m = re.fullmatch(r"int4(?:-g(\d+))?", quantize)
        return ("int4", int(m.group(1) or 0))
    return (quantize, 0)


def int4_group(K: int) -> int:
    """Plain "int4"'s group for a product of width K: the largest of 128, 64, 32 that divides it (128 for every
    Llama-3; SmolLM2's K = 576 takes 64). A smaller group only adds bytes (0.5625 or 0.625 a weight instead of
    0.53) and lowers the error, as llama.cpp's k-quants fall back per tensor; "int4-gG" names one group and
    fails where it does not fit. 128 (and so the usual error) where none does."""
    return next((g for g in (128, 64, 32) if K % g == 0), 128)


# ---- quantizers (plain PyTorch, on the weight's device) ------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (q int8 (N, K), scales fp16 (N, 1)): w ~ q * s, s = max|row| / 127 rounded to fp16 first."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8, device=w.device)
    s = torch.empty(N, 1, dtype=torch.float16, device=w.device)
    step = max(_SLICE // K, 1)
    for r in range(0, N, step):
        wf = w[r : r + step].to(torch.float32, copy=True)  # a copy even from fp32: modified in place below
        amax = torch.maximum(wf.amax(1, keepdim=True), -wf.amin(1, keepdim=True))  # max |w| without an abs copy
        _check_finite(amax)
        sc = (amax / 127).clamp_min(_FP16_TINY).half()  # the stored scale: quantize against it, not the exact one
        q[r : r + step] = wf.div_(sc.float()).round_().clamp_(-127, 127).to(torch.int8)  # in place: one temporary
        s[r : r + step] = sc
    return q, s


def quantize_int4(
    w: torch.Tensor, group: int, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> (packed uint8 (N, K/2), scales fp16 (N, K/G), mins fp16 (N, K/G)): w ~ q * s + m, q in 0..15, with
    each group's (s, m) the one of least squared error among min/max and the candidates of ``_int4_search``, the
    error of column k weighted by ``importance[k]`` (K,) where given."""
    N, K = w.shape
    if K % group or K % 32:
        fits = [f"int4-g{g}" for g in (128, 64, 32) if K % g == 0 and g != group]
        hint = f"try {' or '.join(fits)}" if fits else "no int4 group (128, 64, 32) divides it: try int8"
        raise UserError(f"int4 group size {group} does not divide K={K} ({hint})")
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, K // group, dtype=torch.float16, device=w.device)
    mins = torch.empty_like(scales)
    if importance is not None and importance.shape != (K,):
        raise UserError(f"importance must be ({K},): one weight a column of w, got {tuple(importance.shape)}")
    h = None if importance is None else importance.to(w.device, torch.float32).reshape(K // group, group)
    step = max(_SLICE // K, 1)
    for r in range(0, N, step):
        x = w[r : r + step].to(torch.float32).unflatten(1, (K // group, group))  # (n, K/G, G); read only
        s, m = _int4_search(x, h)
        q = torch.empty_like(x)
        packed[r : r + step] = pack_int4(_int4_codes(x, s, m, q).to(torch.uint8).flatten(1))
        scales[r : r + step], mins[r : r + step] = s, m
    return packed, scales, mins


# The search's candidates, after llama.cpp's make_qkx2_quants (ggml-quants.c, as its Q4_K calls it): spread each
# group's [min, max] over n levels, n = 14, 14.4, ..., 16 (n < 15 leaves room past the ends, n > 15 clips the top),
# then refit (s, m) to those codes by least squares and round again, three times. Measured on Gaussian groups of 64
# (RMS error; min/max 8.96%): 6 spreads x 3 refits 8.15%, llama.cpp's 21 spreads x 1 8.22%, 11 x 2 8.16% (~35%
# slower), 11 x 3 8.13% (~85% slower); a centred spread (clipping both ends) did slightly worse.
_INT4_SPREADS = tuple(14 + 0.4 * i for i in range(6))
_INT4_REFITS = 3


def _int4_search(x: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (s, m), fp16 (n, K/G), of least squared error over x (n, K/G, G) fp32: min/max first, then the
    least-squares candidates, each kept only if strictly better. Errors are those of the stored fp16 (s, m) with
    the codes rounded against them, as the dequantizer computes them, so the result is never worse than min/max.
    ``importance`` (K/G, G), optional: each column's weight in the error and the fits (GPTQ passes its inputs'
    mean squares, as llama.cpp's imatrix does: an error where the input is large costs more). Works on ~3 slices of
    temporaries (x, codes, one scratch) whatever the number of candidates."""
    lo, hi = x.amin(-1), x.amax(-1)
    _check_finite(torch.stack((lo, hi)))
    best_m = lo.half()
    best_s = ((hi - best_m.float()) / 15).clamp_min(_FP16_TINY).half()
    q, scratch = torch.empty_like(x), torch.empty_like(x)
    h = importance
    best = _int4_error(x, _int4_codes(x, best_s, best_m, q), best_s, best_m, scratch, h)
    sums = (x.shape[-1], x.sum(-1)) if h is None else (h.sum(-1), torch.mul(x, h, out=scratch).sum(-1))
    # A constant group (hi == lo) gives 0 * inf = nan codes and a nan fit, and a fit beyond fp16 an inf s or m:
    # their error is nan or inf, never below min/max's, so no such candidate is ever kept.
    width = (hi - lo)[..., None]
    for n in _INT4_SPREADS:
        torch.sub(x, lo[..., None], out=q).mul_(n / width).round_().clamp_(0, 15)
        for _ in range(_INT4_REFITS):
            s, m = _int4_fit(x, q, sums, scratch, h)
            err = _int4_error(x, _int4_codes(x, s, m, q), s, m, scratch, h)
            better = err < best
            best = torch.where(better, err, best)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return best_s, best_m


def _int4_codes(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """round((x - m) / s) clamped to 0..15 (fp32, into ``out``): each weight's nearest level of the stored (s, m)."""
    return torch.sub(x, m.float()[..., None], out=out).div_(s.float()[..., None]).round_().clamp_(0, 15)


def _int4_error(x, q, s, m, scratch, h=None):
    """Each group's sum of squared errors of q * s + m (a product, then a sum: kernels.reference.dequantize's),
    each weighted by h where given."""
    e = torch.mul(q, s.float()[..., None], out=scratch).add_(m.float()[..., None]).sub_(x).square_()
    return (e if h is None else e.mul_(h)).sum(-1)


def _int4_fit(x, q, sums, scratch, h=None):
    """The (s, m) minimising sum h (q * s + m - x)^2 per group (h = 1 where not given), the 2x2 normal equations
    solved in closed form, as fp16 (s at least fp16's smallest normal); ``sums``: (sum h, sum h x). D is exact in
    fp32 for h = 1 (integer sums below 2^24); D = 0 (one level used) gives nan, never kept."""

    def hsum(a, b=None):  # each group's sum of h a b, through the scratch slice
        t = scratch.copy_(a) if b is None else torch.mul(a, b, out=scratch)
        return (t if h is None else t.mul_(h)).sum(-1)

    sum_w, sum_x = sums
    sum_q, sum_qq, sum_qx = hsum(q), hsum(q, q), hsum(q, x)
    d = sum_w * sum_qq - sum_q * sum_q
    s = (sum_w * sum_qx - sum_x * sum_q) / d
    m = (sum_qq * sum_x - sum_q * sum_qx) / d
    return s.clamp_min(_FP16_TINY).half(), m.half()


def gptq_int4(
    w: torch.Tensor, hessian: torch.Tensor, group: int, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_int4``'s layout (packed codes, fp16 scales and offsets), with the codes chosen by GPTQ (Frantar et
    al. 2022) to keep the product's output, not the weight, close: minimise ||(W - Wq) X||^2 over calibration inputs
    X (K, tokens), given as ``hessian`` = X X^T (K, K), summed over the tokens by model/calibrate.py.

    Columns are rounded one at a time, in order of decreasing H_kk (the most active inputs first, "act-order"); each
    column's rounding error e is spread over the columns not yet rounded, W[:, later] -= e H^-1[k, later] / H^-1[k, k]
    (with H^-1's upper Cholesky factor, ``block`` columns at a time and then one product for the rest), so later
    codes compensate for it. Each group's (s, m) is ``_int4_search``'s on the original weights, fixed before any
    column moves ("static groups": the stored layout, and so the kernels, stay ``quantize_int4``'s whatever the
    order). ``damp`` x mean(H_kk) is added to H's diagonal: a few hundred tokens give a singular X X^T. With H = I
    no error moves and the result is ``quantize_int4``'s, code for code (tests/model/quant/test_quant.py checks it).

    Each group's (s, m) search weighs its columns by H_kk (``importance``), as llama.cpp's imatrix does. Measured on
    SmolLM2-135M, groups of 64, perplexity over the reference's on TEXT (tests/model/quant/test_quant.py),
    calibrated on ~2,950
    tokens of other public-domain prose: the search alone +24.2%; both +5.8% to +6.7% (+5.3% to +5.7% since the
    sink pass of model/calibrate.py; GPTQ's choices cascade: runs whose H differ by 1e-6 land that far apart;
    benchmarks/gptq_spread.py). A prototype's single runs, so within
    that noise: the weighted search alone +9.7%, GPTQ with the unweighted search +12.2%, weighting by the damped
    diagonal (H_kk + 1% of its mean) +7.2%. Costs K Python steps over (block, N) rows and one (K, K) Cholesky per
    product; it holds W in fp32 (transposed, in rounding order) plus H."""
    N, K = w.shape
    if hessian.shape != (K, K):
        raise UserError(f"hessian must be ({K}, {K}) for a weight of K={K}, got {tuple(hessian.shape)}")
    H = hessian.to(device=w.device, dtype=torch.float64, copy=True)
    # Each column's weight in its group's (s, m): its input's mean square, as llama.cpp's imatrix (mean 1, so H = c I
    # weighs every column exactly 1.0, as no weights do; at least 1e-3, so a column never seen still counts)
    importance = (H.diagonal() / H.diagonal().mean()).clamp_min(1e-3)
    dead = H.diagonal() == 0  # an input never active: its column cannot matter, round it like the rest
    H[dead, dead] = 1
    H.diagonal().add_(damp * H.diagonal().mean())
    packed, scales, mins = quantize_int4(w, group, importance)  # the static groups' (s, m); the layout's checks
    order = torch.argsort(H.diagonal(), descending=True, stable=True)
    H = H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)
    # Transposed, in rounding order: row k of each (K, N) matrix is the k-th column rounded, contiguous, so each step
    # below reads and writes whole rows (and on a GPU, coalesced ones)
    Wt = w.T[order].to(torch.float32).contiguous()
    s_t = scales.T.repeat_interleave(group, 0)[order].float().contiguous()  # each row's group's (s, m), (K, N)
    m_t = mins.T.repeat_interleave(group, 0)[order].float().contiguous()
    codes = torch.empty(K, N, dtype=torch.uint8, device=w.device)
    q, r = torch.empty(N, device=w.device), torch.empty(N, device=w.device)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        err = torch.empty(b1 - b0, N, device=w.device)
        for i in range(b1 - b0):
            k = b0 + i
            torch.sub(Wt[k], m_t[k], out=q).div_(s_t[k]).round_().clamp_(0, 15)
            codes[k] = q
            torch.mul(q, s_t[k], out=r).add_(m_t[k])
            torch.sub(Wt[k], r, out=err[i]).div_(U[k, k])
            Wt[k + 1 : b1] -= torch.outer(U[k, k + 1 : b1], err[i])  # the block's later columns compensate
        Wt[b1:] -= U[b0:b1, b1:].T @ err  # then every column after the block, in one product
    out = torch.empty_like(codes)
    out[order] = codes
    return pack_int4(out.T.contiguous()), scales, mins


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers 0..15 -> (N, K/2) bytes in GGUF's order: byte j of 32-block b = q[32b+j] | q[32b+16+j] << 4."""
    b = q.to(torch.uint8).unflatten(1, (-1, 32))
    return (b[..., :16] | (b[..., 16:] << 4)).flatten(1)


def _check_finite(t: torch.Tensor) -> None:
    if not torch.isfinite(t).all() or t.abs().max() > 65504:
        raise UserError("cannot quantize a weight with non-finite values or values beyond fp16's range")


def gguf_planes(kind: str, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF tensor's blocks, raw (N, bytes a row) uint8, split into the planes of kernels/quant.py, bit for bit.

    Q8_0: 34-byte blocks (fp16 d, 32 int8). Q4_0: 18 (fp16 d, 16 bytes of nibbles). Q4_1: 20 (fp16 d, fp16 m,
    16 bytes): llama.cpp's block_q8_0 / block_q4_0 / block_q4_1, little-endian."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    N = raw.shape[0]
    blocks = raw.reshape(N, -1, size)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(N, -1)
    if kind == "Q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8).reshape(N, -1), d.contiguous(), None
    if kind == "Q4_0":
        return blocks[..., 2:].reshape(N, -1).contiguous(), d.contiguous(), None
    m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(N, -1)
    return blocks[..., 4:].reshape(N, -1).contiguous(), d.contiguous(), m.contiguous()


# ---- the module ------------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A weight-only quantized ``nn.Linear`` (no bias) whose weight is held as the planes of kernels/quant.py.

    ``format``: "int8", "int4-gG", "Q8_0", "Q4_0" or "Q4_1"; ``dtype``: the activations' (the model's) dtype.
    The model runs its products through its backend (``ops.quant_linear(x, *layer.planes, packed=layer.packed)``,
    llama.py's ``_product``); ``packed`` is what that backend's ``pack_quant`` made of the planes (``Llama.use``
    sets it; None: the planes serve as they are)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, *, format: str,
                 dtype: torch.dtype):  # fmt: skip
        super().__init__()
        bits = 8 if qweight.dtype == torch.int8 else 4
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 8 // bits
        self.group = self.in_features // scales.shape[1]
        self.format, self.dtype = format, dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)  # None: symmetric (not in the state dict)
        self.packed: object = None
        self.packed_with = None  # the pack_quant that made ``packed`` (Llama.use packs again only for another)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"

    @property
    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(qweight, scales, mins, group): the weight as the ops contract's ``quant_linear`` takes it."""
        return self.qweight, self.scales, self.mins, self.group

    @property
    def weight_bytes(self) -> int:
        """Bytes of the quantized weight (what a decode step reads): the integers, scales and offsets."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight in ``dtype``: a new tensor each call, for readers, not the hot path."""
        return self._dequantize(0, self.out_features, self.dtype)

    def _dequantize(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        mins = None if self.mins is None else self.mins[r0:r1]
        return reference.dequantize(self.qweight[r0:r1], self.scales[r0:r1], mins, self.group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) with torch's product, for any number of rows, as ``nn.Linear`` has it: with a
        ``packed`` weight torch's CPU weight-only kernel, else the weight dequantized to x's dtype a slice of rows
        at a time (at most 4 M weights) and torch's matrix product. (A prefill's many rows; the model's products
        of up to 8 rows go through its backend instead.)"""
        if self.packed is not None:
            return reference.quant_linear(x, *self.planes, packed=self.packed)
        N, K = self.out_features, self.in_features
        step = max(_SLICE // K, 1)
        if step >= N:
            return F.linear(x, self._dequantize(0, N, x.dtype))
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
        for r in range(0, N, step):
            out[..., r : r + step] = F.linear(x, self._dequantize(r, min(r + step, N), x.dtype))
        return out


def quantize_weight(w: torch.Tensor, kind: str, group: int, dtype: torch.dtype) -> QuantLinear:
    """A dense (N, K) weight (on its target device) as a QuantLinear of ``kind`` "int8" or "int4" (group G; 0:
    ``int4_group(K)``)."""
    if kind == "int8":
        q, s = quantize_int8(w)
        return QuantLinear(q, s, None, format="int8", dtype=dtype)
    group = group or int4_group(w.shape[1])
    q, s, m = quantize_int4(w, group)
    return QuantLinear(q, s, m, format=f"int4-g{group}", dtype=dtype)


def quantize_product(name: str, w: torch.Tensor, spec: tuple[str, int], dtype: torch.dtype) -> QuantLinear:
    """The loader's choice for product ``name`` ("layers.0.attention.wqkv", ..., "output") under ``spec`` (from
    ``parse``, "int8" or "int4"): its format, except the output head, always int8. The head is the most sensitive
    product (on SmolLM2 an int4 head alone cost +11% perplexity at g32 with min/max rounding, int8 +0.03%), as
    llama.cpp's 4-bit mixes keep it at 6-8 bits."""
    kind = "int8" if name == "output" else spec[0]
    return quantize_weight(w, kind, spec[1], dtype)


def quantized_modules(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


# ---- bytes a weight, for `info` and the benchmarks --------------------------------------------------------


def bytes_per_weight(fmt: str, K: int) -> float:
    """Bytes a weight of ``fmt`` ("bf16", "int8", "int4-gG", "int4" (``int4_group(K)``), "Q8_0", "Q4_0",
    "Q4_1") in a row of K weights."""
    if fmt in ("bf16", "fp16"):
        return 2.0
    if fmt == "fp32":
        return 4.0
    if fmt == "int8":
        return 1 + 2 / K
    if fmt == "int4":
        return 0.5 + 4 / int4_group(K)
    if fmt.startswith("int4-g"):
        return 0.5 + 4 / int(fmt.removeprefix("int4-g"))
    return {"Q8_0": 34 / 32, "Q4_0": 18 / 32, "Q4_1": 20 / 32}[fmt]


def product_shapes(args) -> dict[str, tuple[int, int, int]]:
    """Llama's matrix products read per decoded token: name -> (N, K, count over the layers)."""
    q_rows = args.n_heads * args.head_dim
    kv_rows = args.n_kv_heads * args.head_dim
    L = args.n_layers
    return {
        "wqkv": (q_rows + 2 * kv_rows, args.dim, L),
        "wo": (args.dim, q_rows, L),
        "w13": (2 * args.hidden_dim, args.dim, L),
        "w2": (args.dim, args.hidden_dim, L),
        "output": (args.vocab_size, args.dim, 1),
    }


def int4_group_for(args) -> int | None:
    """The largest int4 group (128, 64, 32) that divides every product's K, or None."""
    ks = {k for _, k, _ in product_shapes(args).values()}
    return next((g for g in (128, 64, 32) if all(k % g == 0 for k in ks)), None)


def decode_weight_bytes(args, fmt: str, norm_bytes: int = 2) -> int:
    """Weight bytes a decode step reads with every product in ``fmt`` (the loader's choices: an int4 run keeps
    the head at int8), plus the norms (``norm_bytes`` each); the embedding row is not counted."""
    total = 0.0
    for name, (N, K, count) in product_shapes(args).items():
        f = "int8" if name == "output" and fmt.startswith("int4") else fmt
        total += N * K * count * bytes_per_weight(f, K)
    return int(total) + (2 * args.n_layers + 1) * args.dim * norm_bytes


__all__ = [
    "product_shapes",
    "int4_group_for",
    "int4_group",
    "decode_weight_bytes",
    "QUANTIZE_CHOICES",
    "QuantLinear",
    "parse",
    "quantize_int8",
    "quantize_int4",
    "gptq_int4",
    "pack_int4",
    "gguf_planes",
    "quantize_weight",
    "quantize_product",
    "quantized_modules",
    "bytes_per_weight",
]
