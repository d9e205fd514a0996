"""The canonical packed weight format of quantkern (DESIGN.md section 4). The packer is the spec.

A weight ``W [N, K]`` (N = out_features, K = in_features) is stored as

* ``qweight``: int32 ``[N, nb * bits]`` with ``nb = ceil(K / 32)``: the integers
  ``q in [0, 2^bits)``, packed along K, row by row, with no wasted bits;
* ``scales``, ``zeros``: ``[N, G]``, float32 / float16 / bfloat16 (same dtype),
  ``G = K // group_size``; group ``g`` of row ``n`` covers
  ``k in [g * group_size, (g + 1) * group_size)``;
* dequantized weight ``w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]``
  computed in fp32 (float zero point: covers HQQ's float zeros and GPTQ/AWQ
  integer zeros). Kernels may use the fused form ``q * s + m, m = -z * s``.

Group sizes: any multiple of 32 that divides K (32, 64, 128, 256, ...), so that
groups are whole 32-weight blocks; or ``group_size == K`` (one group per row,
any K).

Blocks and padding
------------------
Each row is cut into blocks of 32 consecutive weights, ``k = 32 * j + t`` with
``t in [0, 32)``; block j occupies ``bits`` 32-bit words. When K is not a
multiple of 32 the last block is padded with ``q = 0`` (so the row still holds
``nb * bits`` words); the padding never contributes: kernels read x as zero
there. Words are little-endian: bit ``i`` of a word is bit ``i % 8`` of its
byte ``i // 8``. Below, ``byte p`` is byte p of the block's bytes, counted from
the block's first word.

4 bits: 4 words (16 bytes) per block, stored at words ``[4j, 4j + 4)``::

    byte p (p = 0..15):   bit 7 ......... 4   3 ......... 0
                          [   q[t = p + 16] ] [   q[t = p]    ]

  i.e. the low nibbles of the 16 bytes are weights 0..15 of the block, the high
  nibbles weights 16..31: ``bytes & 0xF`` gives weights 0..15 in order and
  ``(bytes >> 4) & 0xF`` weights 16..31 in order (one AND, or one shift and
  one AND, per 16 weights; no x permutation for byte- or lane-wise decode).

2 bits: 2 words (8 bytes) per block, stored at words ``[2j, 2j + 2)``::

    byte p (p = 0..7):    bits 7-6        bits 5-4        bits 3-2       bits 1-0
                          [q[t = p + 24]] [q[t = p + 16]] [q[t = p + 8]] [q[t = p]]

  field f (bits 2f, 2f+1) of the 8 bytes holds weights ``8f .. 8f + 7`` in order:
  ``(bytes >> 2f) & 3``.

3 bits: a 2-bit plane plus a 1-bit plane, exactly 3 words per block. The row is
``[lo plane: 2 * nb words][hi plane: nb words]``::

    lo plane, words [2j, 2j + 2):      the 2-bit layout above, of (q & 3)
    hi plane, word  2 * nb + j:        bit t = (q[t] >> 2) & 1      (t = 0..31)

  A SIMD decoder combines field f of the lo bytes, ``(lo >> 2f) & 3``, with bit
  ``8f + p`` of the hi word moved to bit 2 (a per-lane rotate, or AVX-512
  VBMI vpmultishiftqb per byte); a GPU thread reads 2 lo words and 1 hi word per
  block. The planes are separate so that each is a contiguous stream: one
  vector load of 64 lo bytes (8 blocks) pairs with one 32-byte load of hi bits.

Example (4 bits, K = 40): nb = 2, row = 8 words; weights 0..31 in words 0..3,
weights 32..39 in the low nibbles of bytes 0..7 of words 4..5, the rest zero.

The same bytes are read by the CPU (csrc/cpu/packed_linear*.{cpp,h}), CUDA
(csrc/cuda/packed_linear.cu) and Triton (triton_kernels/packed_linear.py)
kernels. Everything in this file is plain PyTorch, readable before fast.
"""
from __future__ import annotations

import torch

BLOCK = 32
SUPPORTED_BITS = (2, 3, 4)
META_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_blocks(K: int) -> int:
    """Number of 32-weight blocks of a row of length K (the last one padded)."""
    return (K + BLOCK - 1) // BLOCK


def packed_words(K: int, bits: int) -> int:
    """int32 words per packed row."""
    return num_blocks(K) * bits


def check_group_size(K: int, group_size: int) -> None:
    """Raise ValueError unless group_size is a multiple of 32 dividing K, or K itself."""
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if group_size == K:
        return
    if group_size % BLOCK or K % group_size:
        raise ValueError(
            f"group_size {group_size} must be a multiple of {BLOCK} that divides K = {K} "
            f"(e.g. 32, 64, 128, 256), or equal K (one group per row)"
        )


def _bytes_to_words(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4m] -> int32 [..., m], little-endian."""
    b = b.to(torch.int64)
    b = b.reshape(*b.shape[:-1], b.shape[-1] // 4, 4)  # not -1: ambiguous for N = 0 rows
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _words_to_bytes(w: torch.Tensor) -> torch.Tensor:
    """int32 [..., m] -> uint8 [..., 4m], little-endian."""
    w = w.to(torch.int64) & 0xFFFFFFFF
    b = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    return b.reshape(*w.shape[:-1], 4 * w.shape[-1]).to(torch.uint8)


def _plane2(q: torch.Tensor) -> torch.Tensor:
    """q [N, nb, 32] (values < 4) -> 2-bit plane bytes [N, nb, 8]."""
    out = torch.zeros(*q.shape[:-1], 8, dtype=torch.int64, device=q.device)
    for f in range(4):
        out |= q[..., 8 * f : 8 * f + 8] << (2 * f)
    return out


def _unplane2(b: torch.Tensor) -> torch.Tensor:
    """2-bit plane bytes [N, nb, 8] -> q [N, nb, 32]."""
    return torch.cat([(b >> (2 * f)) & 3 for f in range(4)], dim=-1)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``q [N, K]`` (any integer dtype, values in [0, 2^bits)) into ``qweight [N, nb * bits]`` int32."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [N, K], got shape {tuple(q.shape)}")
    N, K = q.shape
    nb = num_blocks(K)
    qi = q.to(torch.int64)
    if qi.numel() and (int(qi.min()) < 0 or int(qi.max()) >= (1 << bits)):
        raise ValueError(f"q values must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    qi = torch.nn.functional.pad(qi, (0, nb * BLOCK - K)).reshape(N, nb, BLOCK)
    if bits == 4:
        by = qi[..., :16] | (qi[..., 16:] << 4)  # [N, nb, 16]
        return _bytes_to_words(by.reshape(N, nb * 16))
    if bits == 2:
        return _bytes_to_words(_plane2(qi).reshape(N, nb * 8))
    # bits == 3
    lo = _bytes_to_words(_plane2(qi & 3).reshape(N, nb * 8))  # [N, 2 nb]
    hb = (qi >> 2) & 1  # [N, nb, 32]
    hi_bytes = torch.stack([sum(hb[..., 8 * p + i] << i for i in range(8)) for p in range(4)], dim=-1)
    hi = _bytes_to_words(hi_bytes.reshape(N, nb * 4))  # [N, nb]
    return torch.cat([lo, hi], dim=1)


def unpack(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``qweight [N, nb * bits]`` int32 -> ``q [N, K]`` uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    N = qweight.shape[0]
    nb = num_blocks(K)
    if tuple(qweight.shape) != (N, nb * bits):
        raise ValueError(f"qweight must have shape [N, {nb * bits}] for K={K}, bits={bits}, got {tuple(qweight.shape)}")
    by = _words_to_bytes(qweight).to(torch.int64)
    if bits == 4:
        by = by.reshape(N, nb, 16)
        q = torch.cat([by & 0xF, by >> 4], dim=-1)
    elif bits == 2:
        q = _unplane2(by.reshape(N, nb, 8))
    else:
        lo = _unplane2(by[:, : nb * 8].reshape(N, nb, 8))
        hb = by[:, nb * 8 :].reshape(N, nb, 4)
        hi = torch.cat([((hb >> i) & 1)[..., None] for i in range(8)], dim=-1).reshape(N, nb, 32)
        q = lo | (hi << 2)
    return q.reshape(N, nb * BLOCK)[:, :K].to(torch.uint8)


def group_view(t: torch.Tensor, K: int) -> torch.Tensor:
    """Expand per-group metadata ``[N, G]`` to ``[N, K]`` (fp32)."""
    G = t.shape[1]
    return t.float().repeat_interleave(K // G, dim=1)


def dequantize(qweight, scales, zeros, bits: int, group_size: int, K: int, dtype=torch.float32) -> torch.Tensor:
    """``w = (q - z) * s`` in fp32, cast to ``dtype``: ``[N, K]``."""
    check_group_size(K, group_size)
    q = unpack(qweight, bits, K).float()
    w = (q - group_view(zeros, K)) * group_view(scales, K)
    return w.to(dtype)


def packed_linear(x, qweight, scales, zeros, bits: int, group_size: int, K: int, bias=None) -> torch.Tensor:
    """``x @ w.T + bias`` with fp32 math, returned in x.dtype (the oracle of ops.packed_linear)."""
    w = dequantize(qweight, scales, zeros, bits, group_size, K)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_rtn(W: torch.Tensor, bits: int, group_size: int, meta_dtype=None):
    """Round-to-nearest, min-max asymmetric quantization per group along K.

    Per group: ``s = (max - min) / (2^bits - 1)`` (1 when max == min, or when the range is so
    small that s underflows or z overflows in ``meta_dtype``), ``z = -min / s``
    (a float zero point), both rounded to ``meta_dtype`` first, then
    ``q = clamp(round(W / s + z), 0, 2^bits - 1)`` with the stored s and z, so that
    dequantization reproduces the grid exactly. ``meta_dtype`` defaults to W's
    dtype when it is fp16/bf16 and to fp32 otherwise. A group whose max error
    ``|W - (q - z) s|`` then exceeds 0.6 of its step ``(max - min) / (2^bits - 1)``
    (z's rounding in fp16 / bf16 moved its grid: values far from 0 next to their
    range) takes, of the pairs of representable s and z near those (``_rtn_search``),
    the one with the least max error.

    Returns ``(q uint8 [N, K], scales [N, G], zeros [N, G])``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [N, K], got shape {tuple(W.shape)}")
    N, K = W.shape
    check_group_size(K, group_size)
    if meta_dtype is None:
        meta_dtype = W.dtype if W.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"meta_dtype must be one of {META_DTYPES}, got {meta_dtype}")
    qmax = (1 << bits) - 1
    Wg = W.float().reshape(N, K // group_size, group_size)
    mn, mx = Wg.amin(-1), Wg.amax(-1)
    rng = mx - mn
    # max - min of finite fp32 values can overflow to inf (|W| near 3.4e38) although s = range / qmax
    # and z = -min / s are representable: those groups take the range in fp64 (others keep the fp32
    # formula bit for bit)
    s = torch.where(torch.isfinite(rng), rng / qmax, ((mx.double() - mn.double()) / qmax).float())
    s = torch.where(s > 0, s, torch.ones_like(s)).to(meta_dtype)
    z = (-mn / s.float()).to(meta_dtype)
    # A range so small that s underflows to 0 in meta_dtype, or z = -min / s overflows it, is
    # treated as a constant group (s = 1, z = -min: every q = round(w - min) = 0, w ~= min).
    tiny = (s == 0) | ~torch.isfinite(z)
    if tiny.any():
        s = torch.where(tiny, torch.ones_like(s), s)
        z = torch.where(tiny, (-mn).to(meta_dtype), z)
    q = _rtn_codes(Wg, s, z, qmax)
    # fp16 / bf16 metadata: where |z| is large (a group's values far from 0 next to their range), z's
    # rounding moved the grid by several codes and clamped the group's extremes (bf16, values 3 +
    # [0, 0.003): 35 steps of error). Such groups search nearby representable pairs for the least max
    # error (RTN's own bound is half a step; after the search groups up to 1000x their range from 0 stay
    # within 0.6 steps, 2-4 bits, fp16 and bf16). Only |z| > 2^bits - 1 can miss by 0.6 steps: there s
    # and z's rounding (2^-9 relative in bf16) moves the grid by at most ~(|z| + 2^bits) 2^-9 codes, 0.06
    # for z within the codes, so groups spanning 0 (most weights) are not even measured.
    step = rng / qmax
    far = (z.float().abs() > qmax) & ~tiny & (step > 0)
    if far.any():
        idx = far.nonzero(as_tuple=True)
        err = _rtn_error(Wg[idx], q[idx], s[idx], z[idx])
        miss = err > 0.6 * step[idx]
        if miss.any():
            idx = tuple(i[miss] for i in idx)
            sb, zb = _rtn_search(Wg[idx], mn[idx], s[idx], z[idx], err[miss], qmax)
            s, z = s.index_put(idx, sb), z.index_put(idx, zb)
            q[idx] = _rtn_codes(Wg[idx], sb, zb, qmax)
    return q.reshape(N, K).to(torch.uint8), s, z


def _rtn_codes(Wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes (float) of groups ``Wg [..., gs]`` on the grid ``(q - z) s`` (s, z [...] in their metadata dtype)."""
    return torch.clamp(torch.round(Wg / s.float()[..., None] + z.float()[..., None]), 0, qmax)


def _rtn_error(Wg: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Each group's max error ``|W - (q - z) s|`` [...] (fp32, as the kernels dequantize)."""
    return (Wg - (q - z.float()[..., None]) * s.float()[..., None]).abs().amax(-1)


def _rtn_search(Wg, mn, s, z, err, qmax, s_ulps: int = 64, z_ulps: int = 2):
    """For groups ``Wg [B, gs]`` whose rounded (s, z) missed: the scales within ``s_ulps`` units in the
    last place of s (in its dtype), each with ``z = -min / s`` rounded and its ``z_ulps`` neighbours
    either way; returns the pair ``(s, z)`` of least max error per group (unchanged where none beats them).
    Moving s by an ulp moves the grid's centre by |z| ulps of s, so the pairs reach centres z's own
    rounding cannot (bf16, values 3 + [0, 0.003): 35 steps of error -> 0.5)."""
    best_s, best_z, best_e = s, z, err

    def walk(t, n, up):
        out, lim = [], torch.full_like(t, float("inf") if up else -float("inf"))
        for _ in range(n):
            t = torch.nextafter(t, lim)
            out.append(t)
        return out

    for sj in [s] + walk(s, s_ulps, True) + walk(s, s_ulps, False):
        zc = (-mn / sj.float()).to(z.dtype)
        for zk in [zc] + walk(zc, z_ulps, True) + walk(zc, z_ulps, False):
            e = _rtn_error(Wg, _rtn_codes(Wg, sj, zk, qmax), sj, zk)
            better = e < best_e  # (NaN / inf candidates never win)
            best_s, best_z, best_e = (torch.where(better, sj, best_s), torch.where(better, zk, best_z),
                                      torch.where(better, e, best_e))
    return best_s, best_z
