"""Plain-PyTorch twins of every Triton kernel in this package.

These are the definitions the kernels are tested against and the ops that ``backend="torch"`` runs,
so they favour clarity over speed, and compute in fp32 whatever the input dtype (casting once, at the
end, like the kernels do). Each has the same signature as its Triton twin in ``kernels/<op>.py``.

Shape conventions (Meta's): activations are ``(B, T, H, D)`` — batch, tokens, heads, head dim — and the
KV cache is handed to the ops as a ``(B, S_max, H_kv, D)`` view (any strides). Positions are absolute
token positions in the sequence, so a KV-cache slot is the position itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "rope_inv_freq",
    "rope_table",
    "rope",
    "rope_write_cache",
    "rope_write_paged_cache",
    "gather_pages",
    "attention",
    "paged_prefill_attention",
    "decode_attention",
    "paged_decode_attention",
    "paged_rope_decode_attention",
    "swiglu",
    "linear",
    "dequantize",
    "quant_linear",
    "pack_quant",
    "workspaces",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x.dtype.

    Meta's model rounds the normalised row to the input dtype before multiplying by the weight; we
    multiply in fp32 and round once (the kernel does the same), which is the more accurate of the two.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + x (rounded to x.dtype, as the residual stream is stored); returns (rms_norm(h), h)."""
    h = (residual.float() + x.float()).to(x.dtype)
    return rms_norm(h, weight, eps), h


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The ``head_dim // 2`` rotation frequencies of RoPE, fp32, with Llama 3.1/3.2 scaling if given.

    ``scaling`` holds ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings`` (8192 for Llama 3). Long wavelengths (low frequencies) are
    divided by ``factor``, short ones kept, and the band between blended smoothly — Meta's
    ``apply_scaling``, with the constants read from the checkpoint instead of hard-coded.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    new_freqs = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * new_freqs / factor + smooth * new_freqs
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, new_freqs)


def rope_table(inv_freq: torch.Tensor, n_positions: int) -> torch.Tensor:
    """The (n_positions, D) fp32 table the rope ops read: row p = [cos(p f_0) .. cos(p f_{D/2-1}) | sin(...)].

    ``inv_freq`` (D/2,) from ``rope_inv_freq`` holds the frequencies as the model defines them (fp32, like Meta's
    and Hugging Face's code); each angle p * f_i and its cosine and sine are computed in fp64 and rounded once,
    so the table is exact to fp32 at every position. (Computing the angle in fp32, as Meta's code does, is off
    by up to 4e-3 rad at p = 131072.) Built once per model, on the device of ``inv_freq``: 4 * D bytes a position.
    """
    if n_positions < 1:
        raise ValueError(f"n_positions: expected at least 1, got {n_positions}")
    angles = torch.arange(n_positions, dtype=torch.float64, device=inv_freq.device)[:, None] * inv_freq.double()
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float().contiguous()  # (S, D)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate Meta's interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by angles (B, T, 1, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    *,
    k_cache: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotary position embedding of q (B, T, Hq, D) and k (B, T, Hkv, D) at ``positions`` (B, T).

    The cosine and sine of pair i at position p are ``cos_sin[p, i]`` and ``cos_sin[p, D/2 + i]`` (the table
    from ``rope_table``). Returns new tensors
    ``(q_rot, k_rot)`` in the input dtype. With ``k_cache`` (and ``v``/``v_cache``), shapes
    (B, S_max, Hkv, D), the rotated k (and v as is) are written to slot ``positions[b, t]`` of the
    caches instead, and ``(q_rot, None)`` is returned. (``check_values`` is accepted for parity with the
    kernel; indexing checks the slots here.)
    """
    rows = cos_sin.to(positions.device, torch.float32)[positions.long()]  # (B, T, D)
    cos, sin = rows.chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2)
    q_rot = _rotate(q, cos, sin).to(q.dtype)
    k_rot = _rotate(k, cos, sin).to(k.dtype)
    if k_cache is None:
        return q_rot, k_rot
    b_idx = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(positions)
    k_cache[b_idx, positions.long()] = k_rot.to(k_cache.dtype)
    if v_cache is not None:
        v_cache[b_idx, positions.long()] = v.to(v_cache.dtype)
    return q_rot, None


def rope_write_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """RoPE of q and k, and the KV-cache write: returns q rotated; the rotated k and v as they are go to slot
    ``positions[b, t]`` of k_cache and v_cache (B, S_max, Hkv, D). What the model runs per layer."""
    q_rot, _ = rope(q, k, positions, cos_sin, k_cache=k_cache, v=v, v_cache=v_cache)
    return q_rot


def rope_write_paged_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """The paged cache's ``rope_write_cache`` for N packed tokens: q (N, Hq, D), k, v (N, Hkv, D) at ``positions``
    (N,); the rotated k and v go to page slot_mapping[i] // PAGE, offset slot_mapping[i] % PAGE of k_pages /
    v_pages (num_pages, PAGE, Hkv, D), nowhere when slot_mapping[i] is -1. Returns q rotated (N, Hq, D)."""
    q_rot, k_rot = rope(q[None], k[None], positions[None], cos_sin)
    slots = slot_mapping.long()
    keep = slots >= 0  # -1: a padding token, written nowhere
    page, offset = slots[keep] // k_pages.shape[1], slots[keep] % k_pages.shape[1]
    k_pages[page, offset] = k_rot[0][keep].to(k_pages.dtype)
    v_pages[page, offset] = v[keep].to(v_pages.dtype)
    return q_rot[0]


def gather_pages(pages: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The slab (B, max_pages_per_seq * PAGE, Hkv, D) a paged cache (num_pages, PAGE, Hkv, D) stands for: row b
    is sequence b's pages block_tables[b] end to end. Entries past ceil(lengths[b] / PAGE) are never read (they
    may hold -1 or garbage): page 0 stands in for them, behind the length mask of the attention."""
    page = pages.shape[1]
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] * page < lengths.long()[:, None]
    table = torch.where(used, block_tables.long(), 0)  # (B, max_pages)
    return pages[table].flatten(1, 2)  # (B, max_pages, PAGE, Hkv, D) -> (B, max_pages * PAGE, Hkv, D)


# Bytes of fp32 scores the prefill attention builds at once. The whole (T, S) score matrix of a 40k-token
# prompt is 12.8 GB per 32 heads; the queries are processed in chunks small enough to stay under this, so
# memory is O(chunk x S) however long the prompt (softmax makes a second matrix of the same size).
ATTENTION_SCORE_BYTES = 256 << 20


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start_pos: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention with a cache offset and grouped-query heads.

    q: (B, T, Hq, D) at absolute positions start_pos .. start_pos+T-1; k, v: (B, S, Hkv, D) with
    S >= start_pos + T (only the first start_pos + T keys are read). Query t sees keys 0..start_pos+t.
    Hq must be a multiple of Hkv: q head h reads k/v head h // (Hq // Hkv). Returns (B, T, Hq, D).

    GQA without copies: q is viewed as (B, Hkv, G, T, D) and k as (B, Hkv, 1, S, D), so the
    matrix product broadcasts each k/v head over its G query heads instead of repeating it.
    Queries go in chunks of rows (``ATTENTION_SCORE_BYTES``); each row's softmax is its own, so chunking
    changes no result, and a chunk reads only the keys its last query can see.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    S = start_pos + T
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf = k[:, :S].float().permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, S, D)
    vf = v[:, :S].float().permute(0, 2, 1, 3)[:, :, None]
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    rows = max(1, ATTENTION_SCORE_BYTES // (4 * max(B * Hq * S, 1)))  # queries per chunk
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        keys = start_pos + t1  # the chunk's last query sees keys 0 .. keys-1
        qf = q[:, t0:t1].float().permute(0, 2, 1, 3).reshape(B, Hkv, G, t1 - t0, D)
        scores = (qf @ kf[..., :keys, :].transpose(-1, -2)) * scale  # (B, Hkv, G, t1 - t0, keys)
        q_pos = torch.arange(start_pos + t0, start_pos + t1, device=q.device)[:, None]
        k_pos = torch.arange(keys, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        o = torch.softmax(scores, dim=-1) @ vf[..., :keys, :]  # (B, Hkv, G, t1 - t0, D)
        out[:, t0:t1] = o.reshape(B, Hq, t1 - t0, D).permute(0, 2, 1, 3).to(q.dtype)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    scale: float | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Causal prefill over a paged cache, sequence by sequence: q (total_q, Hq, D) packed, sequence b's queries rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1, its newest tokens, so that query i sits at position
    seq_lens[b] - q_len_b + i; its keys 0 .. seq_lens[b] - 1 gathered from the pools (num_pages, PAGE, Hkv, D)
    through block_tables[b], then ``attention`` with that start position. Returns (total_q, Hq, D).

    The sequences with one new token (the decodes an engine step carries beside a prompt's chunk) are the case of
    ``paged_decode_attention`` (one query, every key of its sequence) and run through it together, one call for all
    of them instead of a gather and an ``attention`` each."""
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    ones = [b for b in range(len(lens)) if cu[b + 1] - cu[b] == 1]
    if ones:
        rows, which = torch.tensor([cu[b] for b in ones], device=q.device), torch.tensor(ones, device=q.device)
        out[rows] = paged_decode_attention(q[rows], k_pages, v_pages, block_tables[which], seq_lens[which], scale=scale)
    for b in range(len(lens)):
        s, e, n = cu[b], cu[b + 1], lens[b]
        if e - s <= 1:  # none, or done above
            continue
        k = gather_pages(k_pages, block_tables[b : b + 1], seq_lens[b : b + 1])[:, :n]  # (1, n, Hkv, D)
        v = gather_pages(v_pages, block_tables[b : b + 1], seq_lens[b : b + 1])[:, :n]
        out[s:e] = attention(q[None, s:e], k, v, start_pos=n - (e - s), scale=scale)[0]
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """One new query per sequence against its KV cache.

    q: (B, Hq, D); k_cache, v_cache: (B, S_max, Hkv, D); lengths: (B,) ints in [1, S_max]. Sequence b
    attends to its keys 0 .. lengths[b]-1 (the new token's own key already written at lengths[b]-1).
    Returns (B, Hq, D). (``check_values`` is accepted for parity with the kernel.)
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Read only the filled part of the cache (a host sync, so not while a CUDA graph is captured).
        S = int(lengths.max())
        k_cache, v_cache = k_cache[:, :S], v_cache[:, :S]
    S_max = k_cache.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # The G query heads of a kv head are the rows of one product with its keys: (G, D) @ (D, S), no copy of k per
    # query head (a broadcast (G, 1, D) @ (1, D, S) product expanded k G times: 20% of an engine step on a CPU).
    qf = q.float().reshape(B, Hkv, G, D)
    kf = k_cache.float().permute(0, 2, 3, 1)  # (B, Hkv, D, S_max)
    vf = v_cache.float().permute(0, 2, 1, 3)  # (B, Hkv, S_max, D)
    scores = (qf @ kf) * scale  # (B, Hkv, G, S_max)
    valid = torch.arange(S_max, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]  # (B, S_max)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf  # (B, Hkv, G, D)
    return out.reshape(B, Hq, D).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """``decode_attention`` over a paged cache: the pages of each sequence gathered through its block-table row
    into a slab (``gather_pages``), then the slab's definition. q (B, Hq, D), k_pages / v_pages
    (num_pages, PAGE, Hkv, D), block_tables (B, max_pages_per_seq), lengths (B,). Returns (B, Hq, D)."""
    k = gather_pages(k_pages, block_tables, lengths)
    v = gather_pages(v_pages, block_tables, lengths)
    return decode_attention(q, k, v, lengths, scale=scale)


def paged_rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    workspace: object,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """``rope_decode_attention`` over a paged cache: the new token's slot is page block_tables[b, pos // PAGE],
    offset pos % PAGE; ``rope_write_paged_cache`` there, then ``paged_decode_attention`` with lengths positions + 1."""
    page = k_pages.shape[1]
    pos = positions.long()
    slots = block_tables.long().gather(1, (pos // page)[:, None])[:, 0] * page + pos % page
    q_rot = rope_write_paged_cache(q, k, v, positions, slots, cos_sin, k_pages, v_pages)
    return paged_decode_attention(q_rot, k_pages, v_pages, block_tables, positions + 1, scale=scale)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and returned in gate.dtype (the FFN's gated activation)."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    rms_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    workspace: object = None,
) -> torch.Tensor:
    """x (..., K) @ weight.T in fp32, with the fusions of ``kernels.gemv.linear``: ``rms_weight`` replaces x by
    RMSNorm(x) with that gamma, x / sqrt(mean(x^2) + eps) * rms_weight, first; ``swiglu`` reads weight as
    [W1; W3] and returns silu(x W1.T) * (x W3.T), ``residual`` is added last. Returned in x's dtype.
    ``workspace``: the Triton kernel's split-K scratch (how it sums K, not what); unused here."""
    xf = x.float()
    if rms_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * rms_weight.float()
    return _epilogue(xf @ weight.float().T, x.dtype, residual, swiglu, out)


def _epilogue(y: torch.Tensor, dtype: torch.dtype, residual, swiglu: bool, out) -> torch.Tensor:
    """The fused products' end, in fp32: silu(y1) * y3 of y = [y1 | y3] with ``swiglu``, + ``residual``, then
    rounded once to ``dtype`` (or into ``out``)."""
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if residual is not None:
        y = residual.float() + y
    return y.to(dtype) if out is None else out.copy_(y)


def rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    workspace: object,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """A decode step's attention: q (B, Hq, D) and the new k, v (B, Hkv, D) at ``positions`` (B,); RoPE, the cache
    write at slot positions[b], then attention over keys 0 .. positions[b]. ``rope_write_cache`` then
    ``decode_attention``, which the Triton kernel does in one launch (``workspace`` is its scratch; unused here)."""
    q_rot = rope_write_cache(q[:, None], k[:, None], v[:, None], positions[:, None], cos_sin, k_cache, v_cache)
    return decode_attention(q_rot[:, 0], k_cache, v_cache, positions + 1, scale=scale)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    group: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The (N, K) weight a quantized layout of ``kernels/quant.py`` stands for, in ``dtype`` (computed in fp32).

    ``qweight`` int8 (N, K): w = q * s. uint8 (N, K/2), two 4-bit weights a byte in GGUF's order (byte j of
    32-block b: weight 32b + j in the low nibble, 32b + 16 + j in the high one): w = q * s + m with ``mins``,
    else (q - 8) * s (Q4_0). ``scales``/``mins`` fp16 (N, K/group): one per ``group`` weights of a row."""
    N = qweight.shape[0]
    if qweight.dtype == torch.int8:
        q = qweight.float()  # (N, K)
    else:
        b = qweight.view(N, -1, 16)  # (N, K/32, 16): the bytes of each 32-block
        q = torch.cat((b & 0xF, b >> 4), dim=-1).reshape(N, -1).float()  # (N, K): low nibbles, then high
        if mins is None:
            q = q - 8.0
    K = q.shape[1]
    w = q.view(N, K // group, group) * scales.float()[:, :, None]
    if mins is not None:
        w = w + mins.float()[:, :, None]
    return w.reshape(N, K).to(dtype)


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    group: int,
    *,
    rms_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    workspace: object = None,
    packed: tuple | None = None,
) -> torch.Tensor:
    """``kernels.quant.quant_linear``'s definition: ``linear`` (fusions included) of x with the dequantized
    weight, all in fp32, returned in x's dtype. The weight is dequantized a slice of rows at a time (at most
    ``SLICE`` weights), so a 128k-row head costs a few 16-MB fp32 temporaries, not 2 GB each.

    ``packed`` (from ``pack_quant``: a CPU, bf16 activations): the product runs on torch's CPU weight-only kernel
    instead, its input RMSNorm(x) rounded to bf16, its bf16 result widened for the fused epilogue in fp32. That is
    torch's fast path, not the definition: it reads 1 or 0.5 bytes a weight where dequantizing writes and reads 4."""
    xf = None if rms_weight is None else rms_norm(x.float(), rms_weight.float(), eps)
    if packed is not None:
        y = _packed_product(x if xf is None else xf.to(x.dtype), packed, group)
        if not swiglu and residual is None:  # a plain product (the unfused step's): no fp32 round trip
            return y if out is None else out.copy_(y)
        y = y.float()
    else:
        xf = x.float() if xf is None else xf
        N, K = qweight.shape[0], xf.shape[-1]
        step = max(SLICE // K, 1)
        parts = [
            xf @ dequantize(qweight[r : r + step], scales[r : r + step], None if mins is None else mins[r : r + step],
                            group).T
            for r in range(0, N, step)
        ]  # fmt: skip
        y = torch.cat(parts, dim=-1)
    return _epilogue(y, x.dtype, residual, swiglu, out)


SLICE = 1 << 22  # weights per slice when a quantized weight is dequantized: 16 MB per fp32 temporary


def pack_quant(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int, dtype: torch.dtype
) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """The planes as torch's CPU weight-only kernels take them, for bf16 activations on a CPU: ("int8", the int8
    (N, K) weight, bf16 scales (N,)) for ``torch._weight_int8pack_mm`` (one scale a row: "int8"); ("int4", the
    packed weight, bf16 (K/G, N, 2) scales and zeros) for ``torch._weight_int4pack_mm_for_cpu`` (any 4-bit layout
    in groups of 32 to 256: int4-gG, Q4_0, Q4_1). That kernel computes w = (q - 8) * s + z, so the offset m of
    w = q * s + m becomes z = m + 8 s, and Q4_0's (q - 8) * s takes z = 0. None for what they cannot run (another
    dtype or device, Q8_0's groups of 32, a row count not a multiple of 32): ``quant_linear`` dequantizes then.

    Why: dequantizing each product's weight on every step made CPU decode 4-6x slower than fp32 (SmolLM2: int8
    3.2-3.8 tokens/s, int4 2.5-2.7, against 14.6-16.7 in fp32); these kernels read the 1 or 0.5 bytes a weight the
    layout holds. The int4 weight is packed in slices of rows (the packing works on blocks of 32 rows), so the
    int32 codes it takes never cost more than one slice."""
    N = qweight.shape[0]
    if dtype != torch.bfloat16 or qweight.device.type != "cpu" or N % 32:
        return None
    if qweight.dtype == torch.int8:
        if scales.shape[1] != 1:
            return None
        return "int8", qweight, scales[:, 0].to(torch.bfloat16).contiguous()
    if group not in (32, 64, 128, 256):
        return None
    K = qweight.shape[1] * 2
    step = max(64, SLICE // K // 64 * 64)
    packed = []
    for r in range(0, N, step):
        b = qweight[r : r + step].view(-1, K // 32, 16)  # the bytes of each 32-block, as dequantize reads them
        q = torch.cat((b & 0xF, b >> 4), dim=-1).reshape(-1, K).to(torch.int32)
        packed.append(torch._convert_weight_to_int4pack_for_cpu(q, 1))
    s = scales.float().T  # (K/G, N)
    z = torch.zeros_like(s) if mins is None else mins.float().T + 8 * s
    return "int4", torch.cat(packed), torch.stack((s, z), dim=-1).to(torch.bfloat16).contiguous()


def _packed_product(x: torch.Tensor, packed: tuple, group: int) -> torch.Tensor:
    """x (..., K) bf16 @ W.T through torch's CPU weight-only kernel: (..., N) bf16."""
    kind, weight, scales = packed
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if kind == "int8":
        y = torch._weight_int8pack_mm(x2, weight, scales)
    else:
        y = torch._weight_int4pack_mm_for_cpu(x2, weight, group, scales)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def workspaces(max_batch: int, n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device) -> tuple[None, None]:
    """The fused decode step's scratch: none here (the Triton kernels' split partials have no twin)."""
    return None, None
