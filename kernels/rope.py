"""Rotary position embedding (RoPE) of q and k, optionally writing k (and v) straight into the KV cache.

Maths (Meta's layout: interleaved pairs). For a token at absolute position p and pair i of a head,
with theta_i = inv_freq[i] (Llama 3.1/3.2 frequency scaling already folded in):

    a = p * theta_i,   c = cos(a), s = sin(a)
    (x[2i], x[2i+1]) -> (x[2i] c - x[2i+1] s,  x[2i] s + x[2i+1] c)

The kernel computes no sine: (c, s) come from a table, ``rope_table(inv_freq, S)`` in ``kernels.reference``,
row p = [cos(p theta_0) .. cos(p theta_{D/2-1}) | sin(p theta_0) .. sin(p theta_{D/2-1})], fp32, computed
once per model in fp64. Two reasons. Exactness: an fp32 angle p * theta_i is rounded to 24 bits, so at
p = 131072 (Llama 3.1's context) the fastest pair's angle of about 1.3e5 rad is off by up to 4e-3 rad; the
table's entries are the fp64 values rounded once. Speed: precise sin/cos of such angles take libdevice's
slow path (Payne-Hanek reduction), which keeps a 28-byte array in local memory in every configuration
(seen with triton 3.6). The table costs D * 4 bytes read per token (512 B at D = 128, 2% of the bytes below)
and D * 4 bytes of device memory per position of context.

Shapes: q (B, T, Hq, D), k and v (B, T, Hkv, D), any strides with the last dim contiguous (so they may
be slices of one fused qkv projection output); positions (B, T), int32 or int64, different per
sequence; cos_sin (S, D) fp32, S > every position. With k_cache / v_cache (B, S_max, Hkv, D), the rotated k and the
unrotated v go to slot positions[b, t] of the caches in the same launch, instead of to new tensors.

Paged cache (the engine's): with ``slot_mapping``, the caches are page pools (num_pages, PAGE, Hkv, D) and token
(b, t) goes to flat slot s = slot_mapping[b, t] = page * PAGE + offset, i.e. row (s >> log2 PAGE, s & (PAGE - 1))
of the pool: the slab's (b, pos) with the page in the batch's place, so it is one more constexpr branch (SLOTS)
of the same kernel, not a second kernel. A slot of -1 (vLLM's padding) writes nothing; positions then choose
only the rotation. ``rope_write_paged_cache`` takes N packed tokens (N, H, D) of any sequences, one launch.
Same bytes as the slab write, plus the 4 or 8 bytes of a token's slot id.

Grid: one program per (token, block of BLOCK_H heads); the q head blocks come first along axis 1,
then the k head blocks (whose programs also copy v). Each program loads its D/2 (cos, sin) once
and applies them to all its heads. Head rows are loaded whole (contiguous 16-byte vectors), then
viewed as (D/2, 2) pairs and split into the even and odd elements: no strided loads.

Work: 6 FLOPs per pair; the floor is memory. Bytes per token: read (Hq + 2 Hkv) D and write the same
(q_rot, k and v into the cache), plus the D fp32 of the token's table row. Llama-3 8B (Hq 32, Hkv 8,
D 128, bf16) on an H100 SXM (3.35 TB/s):
    decode, B = 1:       24 KiB -> 7 ns; launch latency (~3 us) is the cost, and doing the cache
                         writes here saves the two copy launches of an unfused step (per layer);
    prefill, T = 8192:   192 MiB -> 60 us.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama3_triton.kernels._launch import capturing, check_index, check_pages, check_tensor, interpreting, variant


@triton.jit
def _rotate_heads(
    src,  # pointer to head 0, element 0 of this token's rows
    src_stride_h,  # head stride of src
    dst,  # pointer to head 0, element 0 of the destination rows
    dst_stride_h,  # head stride of dst
    heads,  # (BLOCK_H,) head indices of this program
    n_heads,  # heads below this are written (0: none, the cache slot is out of bounds)
    cos,  # (BLOCK_HALF,) fp32
    sin,  # (BLOCK_HALF,) fp32
    HALF: tl.constexpr,  # D / 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_H: tl.constexpr,  # heads per program
):
    h = heads[:, None]
    d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < 2 * HALF)
    # Load whole rows (contiguous, vectorised), then view each as (D/2, 2) pairs and split the pairs.
    x = tl.load(src + h * src_stride_h + d, mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_HALF, 2]))  # x[2i], x[2i+1]: (BLOCK_H, BLOCK_HALF)
    c = cos[None, :]
    s = sin[None, :]
    y = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), [BLOCK_H, 2 * BLOCK_HALF])
    tl.store(dst + h * dst_stride_h + d, y.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # (B, T, Hq, D) queries
    k_ptr,  # (B, T, Hkv, D) keys
    v_ptr,  # (B, T, Hkv, D) values, copied to v_cache (HAS_V only)
    pos_ptr,  # (B, T) absolute positions, int32 or int64
    slot_ptr,  # SLOTS: (B * T,) contiguous flat cache slots page * PAGE + offset, int32/int64; -1 skips the token
    cs_ptr,  # (N_ROWS, 2 * HALF) fp32 table: row p = cos(p * theta) | sin(p * theta)
    q_out_ptr,  # (B, T, Hq, D) rotated queries
    k_out_ptr,  # rotated keys: (B, T, Hkv, D), or k_cache (B, S_max, Hkv, D) when HAS_CACHE
    v_out_ptr,  # v_cache (B, S_max, Hkv, D) (HAS_V only)
    T,  # tokens per sequence
    HQ,  # query heads
    HKV,  # key/value heads
    S_MAX,  # cache slots per sequence (HAS_CACHE only); SLOTS: slots in the page pool, num_pages * PAGE
    page_shift,  # SLOTS: log2(PAGE), the page size a power of two
    N_ROWS,  # rows (positions) of the cos/sin table
    stride_qb,  # batch stride of q
    stride_qt,  # token stride of q
    stride_qh,  # head stride of q
    stride_kb,  # batch stride of k
    stride_kt,  # token stride of k
    stride_kh,  # head stride of k
    stride_vb,  # batch stride of v
    stride_vt,  # token stride of v
    stride_vh,  # head stride of v
    stride_pb,  # batch stride of positions
    stride_pt,  # token stride of positions
    stride_oqb,  # batch stride of q_out
    stride_oqt,  # token stride of q_out
    stride_oqh,  # head stride of q_out
    stride_okb,  # batch stride of k_out (or k_cache); SLOTS: the page stride of k_pages
    stride_okt,  # token stride of k_out, or the slot stride of k_cache (k_pages: within a page)
    stride_okh,  # head stride of k_out (or k_cache)
    stride_ovb,  # batch stride of v_cache (SLOTS: page stride of v_pages)
    stride_ovt,  # slot stride of v_cache (v_pages: within a page)
    stride_ovh,  # head stride of v_cache
    HALF: tl.constexpr,  # D / 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_H: tl.constexpr,  # heads per program
    HAS_CACHE: tl.constexpr,  # write k to k_cache[b, pos] instead of k_out[b, t]
    HAS_V: tl.constexpr,  # also copy v to v_cache[b, pos]
    SLOTS: tl.constexpr,  # HAS_CACHE into a page pool: k, v to slot slot_ptr[b * T + t] instead of [b, pos]
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)  # int64: b * stride passes 2^31 on large fused qkv buffers
    t = (pid % T).to(tl.int64)
    blk = tl.program_id(1)
    n_q_blocks = tl.cdiv(HQ, BLOCK_H)

    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    # The launcher checks 0 <= pos < N_ROWS; the clamp keeps an unchecked position (CUDA graph capture) from
    # reading outside the table.
    row = tl.minimum(tl.maximum(pos, 0), N_ROWS - 1) * (2 * HALF)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cs_ptr + row + i, mask=i < HALF, other=0.0)
    sin = tl.load(cs_ptr + row + HALF + i, mask=i < HALF, other=0.0)

    if blk < n_q_blocks:
        heads = blk * BLOCK_H + tl.arange(0, BLOCK_H)
        src = q_ptr + b * stride_qb + t * stride_qt
        dst = q_out_ptr + b * stride_oqb + t * stride_oqt
        _rotate_heads(src, stride_qh, dst, stride_oqh, heads, HQ, cos, sin, HALF, BLOCK_HALF, BLOCK_H)
    else:
        heads = (blk - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        src = k_ptr + b * stride_kb + t * stride_kt
        if SLOTS:
            # A flat slot id, page * PAGE + offset (vLLM's slot_mapping); -1 (padding) and, when the host check
            # was skipped, any id outside the pool write nothing. The cache rows are (page, offset): the slab's
            # (b, pos) with the page in the batch's place.
            slot = tl.load(slot_ptr + pid).to(tl.int64)
            n_kv = tl.where((slot >= 0) & (slot < S_MAX), HKV, 0)
            slot = tl.where(slot >= 0, slot, 0)
            page = slot >> page_shift
            off = slot & ((1 << page_shift) - 1)
            dst = k_out_ptr + page * stride_okb + off * stride_okt
        elif HAS_CACHE:
            # The launcher checks 0 <= pos < S_max on the host, except under CUDA graph capture: then this
            # mask is the only guard against writing outside the cache. (A head count of 0 rather than a
            # scalar bool in the mask: the interpreter mis-broadcasts scalar & tensor int1 to int32.)
            n_kv = tl.where((pos >= 0) & (pos < S_MAX), HKV, 0)
            page, off = b, pos
            dst = k_out_ptr + b * stride_okb + pos * stride_okt
        else:
            n_kv = HKV
            dst = k_out_ptr + b * stride_okb + t * stride_okt
        _rotate_heads(src, stride_kh, dst, stride_okh, heads, n_kv, cos, sin, HALF, BLOCK_HALF, BLOCK_H)
        if HAS_V:
            d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
            mask = (heads[:, None] < n_kv) & (d < 2 * HALF)
            v_src = v_ptr + b * stride_vb + t * stride_vt + heads[:, None] * stride_vh + d
            v_dst = v_out_ptr + page * stride_ovb + off * stride_ovt + heads[:, None] * stride_ovh + d
            tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)  # a bit-exact copy, no conversion


_INTERPRET = interpreting(_rope_kernel)


def _config(D: int, Hq: int) -> tuple[int, int, int]:
    """(BLOCK_HALF, BLOCK_H, num_warps): about 1024 elements per program, 8 per thread."""
    block_half = triton.next_power_of_2(D // 2)
    block_h = min(max(1, 512 // block_half), triton.next_power_of_2(Hq))
    return block_half, block_h, max(1, min(4, 2 * block_half * block_h // 256))


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    *,
    k_cache: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    out_q: torch.Tensor | None = None,
    out_k: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) at ``positions`` (B, T) in one launch, with the cosines and
    sines of ``cos_sin`` (S, D), the table from ``kernels.reference.rope_table``.

    Returns ``(q_rot, k_rot)``, or ``(q_rot, None)`` with ``k_cache`` (B, S_max, Hkv, D): then the rotated
    k, and v if ``v``/``v_cache`` are given, are written to slot ``positions[b, t]`` of the caches.
    ``out_q``/``out_k`` receive the results if given (``out_q=q`` rotates in place).
    With ``slot_mapping`` (B, T) contiguous, int32/int64, the caches are page pools (num_pages, PAGE, Hkv, D)
    instead, PAGE in ``PAGE_SIZES``, and token (b, t) goes to flat slot ``slot_mapping[b, t]`` = page * PAGE +
    offset, or nowhere when it is -1 (padding); ``positions`` then only choose the rotation.
    ``check_values=False`` skips the host check of the positions (a device sync) for a caller that has
    validated them already, like the model driver once per step; the kernel's mask still guards the cache.
    """
    check_tensor("q", q, interpret=_INTERPRET)
    if q.dim() != 4 or q.shape[2] < 1 or q.shape[-1] < 2 or q.shape[-1] % 2:
        raise ValueError(f"q: expected shape (B, T, Hq >= 1, D) with an even D, got {tuple(q.shape)}")
    B, T, Hq, D = q.shape
    check_tensor("k", k, like=q)
    if k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (B, T, D) or k.shape[2] < 1:
        raise ValueError(f"k: expected shape (B={B}, T={T}, Hkv, D={D}), got {tuple(k.shape)}")
    Hkv = k.shape[2]
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions: expected an int32 or int64 tensor, got {getattr(positions, 'dtype', positions)}")
    if positions.device != q.device or tuple(positions.shape) != (B, T):
        got = f"{tuple(positions.shape)} on {positions.device}"
        raise ValueError(f"positions: expected shape ({B}, {T}) on {q.device}, got {got}")
    if (
        not isinstance(cos_sin, torch.Tensor)
        or cos_sin.dtype != torch.float32
        or cos_sin.dim() != 2
        or cos_sin.shape[0] < 1
        or cos_sin.shape[1] != D
    ):
        got = f"{getattr(cos_sin, 'dtype', type(cos_sin).__name__)} {tuple(getattr(cos_sin, 'shape', ()))}"
        raise ValueError(f"cos_sin: expected a float32 (S, {D}) table from rope_table, got {got}")
    if cos_sin.device != q.device or not cos_sin.is_contiguous():
        got = f"strides {cos_sin.stride()} on {cos_sin.device}"
        raise ValueError(f"cos_sin: expected a contiguous tensor on {q.device}, got {got}")
    n_rows = cos_sin.shape[0]
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out_q is None else out_q
    check_tensor("out_q", out_q, like=q, shape=q.shape)

    page_shift = 0
    if k_cache is None:
        if slot_mapping is not None:
            raise ValueError("slot_mapping: only used with k_cache (the page pool it indexes); pass k_cache too")
        if v is not None or v_cache is not None:
            raise ValueError("v, v_cache: only used with k_cache (v is copied into v_cache); pass k_cache too")
        out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device) if out_k is None else out_k
        check_tensor("out_k", out_k, like=q, shape=k.shape)
        dst_k, dst_v, v_src, S_max = out_k, out_k, k, 0  # v slots unused
    else:
        if out_k is not None:
            raise ValueError("out_k: not used with k_cache (the rotated k goes into k_cache); pass one of them")
        check_tensor("k_cache", k_cache, like=q)
        if slot_mapping is not None:  # a page pool: S_max is its slot count, and the slots come from the caller
            num_pages, page, _ = check_pages("k_cache", k_cache, like=q, head_dim=D, heads=Hkv)
            S_max, page_shift = num_pages * page, page.bit_length() - 1
            check_index("slot_mapping", slot_mapping, device=q.device, shape=(B, T), contiguous=True)
        elif k_cache.dim() != 4 or (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3]) != (B, Hkv, D):
            raise ValueError(f"k_cache: expected shape (B={B}, S_max, Hkv={Hkv}, D={D}), got {tuple(k_cache.shape)}")
        else:
            S_max = k_cache.shape[1]
        if (v is None) != (v_cache is None):
            raise ValueError(f"{'v_cache' if v_cache is None else 'v'}: v and v_cache go together; got only one")
        if v is not None:
            check_tensor("v", v, like=q, shape=k.shape)
            check_tensor("v_cache", v_cache, like=q, shape=k_cache.shape)
        dst_k = k_cache
        dst_v = k_cache if v_cache is None else v_cache
        v_src = k if v is None else v
    # Host check of the positions (a device sync), skipped while a CUDA graph is being captured (syncs are
    # forbidden there): the kernel's mask still drops any cache write outside [0, S_max), and its clamp keeps
    # table reads inside the table.
    if check_values and not capturing(positions) and positions.numel() > 0:
        if slot_mapping is not None:
            lo, hi, s_lo, s_hi = torch.stack((*positions.aminmax(), *slot_mapping.aminmax())).tolist()  # one sync
            if s_lo < -1 or s_hi >= S_max:
                raise ValueError(
                    f"slot_mapping: expected -1 (skip) or slots in [0, num_pages * PAGE = {S_max}), got values in "
                    f"[{s_lo}, {s_hi}]"
                )
        else:
            lo, hi = torch.stack(positions.aminmax()).tolist()  # one sync for both
        if k_cache is not None and slot_mapping is None and (lo < 0 or hi >= S_max):
            raise ValueError(f"positions: expected cache slots in [0, S_max={S_max}), got values in [{lo}, {hi}]")
        if lo < 0 or hi >= n_rows:
            raise ValueError(f"positions: expected values in [0, {n_rows}) (the rows of cos_sin), got [{lo}, {hi}]")

    if B * T == 0:
        return out_q, None if k_cache is not None else out_k
    block_half, block_h, num_warps = _config(D, Hq)
    grid = (B * T, triton.cdiv(Hq, block_h) + triton.cdiv(Hkv, block_h))
    _rope_kernel[grid](
        q, k, v_src, positions, positions if slot_mapping is None else slot_mapping, cos_sin, out_q, dst_k, dst_v,
        T, Hq, Hkv, S_max, page_shift, n_rows,
        *q.stride()[:3], *k.stride()[:3], *v_src.stride()[:3], *positions.stride(),
        *out_q.stride()[:3], *dst_k.stride()[:3], *dst_v.stride()[:3],
        HALF=D // 2, BLOCK_HALF=block_half, BLOCK_H=block_h,
        HAS_CACHE=k_cache is not None, HAS_V=v_cache is not None, SLOTS=slot_mapping is not None,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    return out_q, (None if k_cache is not None else out_k)


def rope_write_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    out_q: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """RoPE of q and k, and the KV-cache write, in one launch: returns q rotated; the rotated k and v as they are
    go to slot ``positions[b, t]`` of k_cache and v_cache (B, S_max, Hkv, D). What the model runs per layer."""
    q_rot, _ = rope(
        q, k, positions, cos_sin, k_cache=k_cache, v=v, v_cache=v_cache, out_q=out_q, check_values=check_values
    )
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
    out_q: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """The paged cache's ``rope_write_cache``, one launch for N packed tokens of any sequences: q (N, Hq, D) and
    k (N, Hkv, D) rotated at ``positions`` (N,); the rotated k and v (N, Hkv, D) written to flat slot
    ``slot_mapping[i]`` = page * PAGE + offset of k_pages / v_pages (num_pages, PAGE, Hkv, D), nothing for a
    slot of -1 (padding). Returns q rotated (N, Hq, D)."""
    for name, t, heads in (("q", q, "Hq"), ("k", k, "Hkv"), ("v", v, "Hkv")):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-d (N, {heads}, D) tensor, got {getattr(t, 'shape', type(t))}")
    n = q.shape[0]
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name}: expected a 1-d ({n},) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    # The pools first, by their names here (rope() below calls them k_cache / v_cache).
    check_tensor("q", q, interpret=_INTERPRET)
    check_pages("k_pages", k_pages, like=q, head_dim=q.shape[-1], heads=k.shape[1])
    check_pages("v_pages", v_pages, like=q, head_dim=q.shape[-1], heads=k.shape[1])
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages: expected shape {tuple(k_pages.shape)} (as k_pages), got {tuple(v_pages.shape)}")
    if out_q is not None and (not isinstance(out_q, torch.Tensor) or out_q.dim() != 3):
        raise ValueError(f"out_q: expected a 3-d (N, Hq, D) tensor, got {getattr(out_q, 'shape', type(out_q))}")
    q_rot, _ = rope(
        q[None], k[None], positions[None], cos_sin, k_cache=k_pages, v=v[None], v_cache=v_pages,
        out_q=None if out_q is None else out_q[None], slot_mapping=slot_mapping[None], check_values=check_values,
    )  # fmt: skip
    return q_rot[0]


def compile_variants() -> list[dict]:
    """Every config the launcher picks for Llama-3 (head dim 64 with 32 q heads, 128 with 24..128)."""
    variants = []
    for dt in ("fp32", "fp16", "bf16"):
        for pos_dt in ("i32", "i64"):
            types = {p: f"*{dt}" for p in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_out_ptr", "v_out_ptr")}
            types |= {"pos_ptr": f"*{pos_dt}", "cs_ptr": "*fp32"}
            for D, Hq in ((64, 32), (128, 32)):
                block_half, block_h, num_warps = _config(D, Hq)
                # The slab's modes (slot_ptr is positions, page_shift 0: divisible by 16), then the page pool's,
                # with int32 or int64 slot ids (page_shift log2(PAGE), one binary for every page size).
                modes = [(False, False, None), (True, False, None), (True, True, None), (True, True, "i32")]
                modes.append((True, True, "i64"))
                for has_cache, has_v, slot_dt in modes:
                    cx = {"HALF": D // 2, "BLOCK_HALF": block_half, "BLOCK_H": block_h}
                    cx |= {"HAS_CACHE": has_cache, "HAS_V": has_v, "SLOTS": slot_dt is not None}
                    mode = "cache_kv" if has_v else "cache_k" if has_cache else "out"
                    mode = f"pages_slots{slot_dt}" if slot_dt else mode
                    ty = types | {"slot_ptr": f"*{slot_dt or pos_dt}"}
                    div = [] if slot_dt else ["page_shift"]
                    name = f"rope_{dt}_{pos_dt}_D{D}_{mode}"
                    variants.append(variant(name, _rope_kernel, ty, cx, num_warps, 1, divisible=div))
    return variants
