"""Exact converters from other packed formats to :class:`quantkern.PackedWeight`.

hqq (dropbox/hqq, formerly mobiusml/hqq; checked against hqq 0.2.8.post1)
------------------------------------------------------------------------
``hqq.core.quantize.Quantizer.quantize(W, nbits, group_size, axis=1, ...)`` returns
``W_q`` and ``meta``. With ``axis=1`` (HQQLinear's default) the weight
``W [N, K]`` is viewed as ``R = N * K / g`` rows of one group each (row
``r = n * (K / g) + group``), and ``meta["scale"]``, ``meta["zero"]`` are ``[R, 1]``
(scale already inverted: ``w = (q - zero) * scale``, float zero). Packing is
along that row axis (``hqq/core/bitpack.py``):

* 4 bits ``4bit_u8``: uint8 ``[R/2, g]``, ``W_q[i] = q[i] << 4 | q[i + R/2]``
* 2 bits ``2bit_u8``: uint8 ``[R/4, g]``, ``q[i] << 6 | q[i + R/4] << 4 | q[i + R/2] << 2 | q[i + 3R/4]``
* 3 bits ``3bit_32``: int32 ``[ceil(R/10), g]``, ten values per word
  (``q[i + s * step] << (27 - 3 s)``, s = 0..9; rows padded to a multiple of 10;
  bits 30-31 unused).

``axis=0`` groups are strided across rows (not contiguous along K) and cannot be
represented in the canonical format: rejected. Quantized metadata (the
deprecated ``quant_zero``/``quant_scale``) is rejected too.

GPTQ (AutoGPTQ / GPTQModel / exllama checkpoints)
-------------------------------------------------
* ``qweight``: int32 ``[K * bits / 32, N]``, packed along K (the input dimension):
  for 4 bits, word ``qweight[i, n]`` holds ``q[8 i + j, n]`` in bits ``4 j .. 4 j + 3``
  (j = 0..7); 2 bits: 16 per word; 3 bits: 32 values in 3 words, values
  crossing word boundaries (the AutoGPTQ packer: 10 values, then 2 + 1 bits of
  the 11th, 10 more, 1 + 2 bits of the 22nd, 10 more).
* ``qzeros``: int32 ``[G, N * bits / 32]``, packed along N the same way.
* ``scales``: ``[G, N]`` (fp16 in checkpoints).
* ``g_idx`` (optional): integer ``[K]``, the group of each input. Without act-order it
  is ``k // group_size``. Act-order (``desc_act=True``) checkpoints quantized the columns
  in a permuted order, so g_idx is a permutation of that: every group g still holds
  exactly ``group_size`` inputs, but they are scattered along K. The canonical format
  needs contiguous groups, so such a weight is stored permuted: with ``P`` the stable
  argsort of g_idx (int64 ``[K]``; columns ``P[g*gs:(g+1)*gs]`` are group g), the
  PackedWeight holds ``Wp = W[:, P]`` (codes ``q[:, P]``, scales / zeros unchanged)
  and ``x @ W.T == x[..., P] @ Wp.T``. ``from_gptq(..., return_perm=True)`` returns
  ``(Wp, P)``; :meth:`quantkern.nn.PackedLinear.from_gptq` builds a layer that
  gathers its input by P (one ``index_select`` of x per call).
* Dequantization: ``w[n, k] = scales[g, n] * (q[k, n] - (qzeros[g, n] + zero_offset))``.
  ``zero_offset=1`` is the historical AutoGPTQ ("v1") convention: the packer
  stored ``zero - 1`` and every kernel adds 1 back; GPTQModel's ``gptq_v2``
  format stores the true zero (``zero_offset=0``).

Every conversion is exact: the integer codes and the scales/zeros values are
carried over unchanged (zeros become float zeros, exact in fp16/bf16/fp32).
"""
from __future__ import annotations

import torch

from .packed import PackedWeight, cast_meta

# ---------------------------------------------------------------- hqq


def _hqq_unpack_rows(W_q: torch.Tensor, packing: str, R: int) -> torch.Tensor:
    """hqq packed rows -> int64 codes [R, g] (hqq/core/bitpack.py, inverse of pack_*)."""
    if packing == "4bit_u8":
        w = W_q.view(torch.uint8).to(torch.int64)
        q = torch.cat([(w >> 4) & 0xF, w & 0xF], dim=0)
    elif packing == "2bit_u8":
        w = W_q.view(torch.uint8).to(torch.int64)
        q = torch.cat([(w >> 6) & 3, (w >> 4) & 3, (w >> 2) & 3, w & 3], dim=0)
    elif packing == "3bit_32":
        w = W_q.view(torch.int32).to(torch.int64)
        q = torch.cat([(w >> (27 - 3 * s)) & 7 for s in range(10)], dim=0)
    else:
        raise ValueError(f"from_hqq: unsupported hqq packing {packing!r} (supported: 4bit_u8, 3bit_32, 2bit_u8)")
    if q.shape[0] < R:
        raise ValueError(f"from_hqq: W_q unpacks to {q.shape[0]} rows, expected at least {R}")
    return q[:R]


def from_hqq(W_q, meta: dict | None = None, meta_dtype: torch.dtype | None = None) -> PackedWeight:
    """Convert hqq's ``(W_q, meta)`` (or an ``HQQLinear`` module) to a PackedWeight, exactly.

    ``meta`` needs ``nbits``, ``group_size``, ``shape``, ``axis``, ``packing`` and
    ``scale``/``zero`` (or ``zero_scale``). ``meta_dtype`` casts scales and zeros
    (default: keep hqq's dtype, so the conversion is exact).
    """
    if meta is None:  # HQQLinear
        mod = W_q
        if not hasattr(mod, "W_q") or not hasattr(mod, "meta"):
            raise TypeError("from_hqq: pass (W_q, meta) or an hqq HQQLinear module")
        W_q, meta = mod.W_q, mod.meta
    meta = dict(meta)
    if meta.get("quant_zero") or meta.get("quant_scale"):
        raise NotImplementedError("from_hqq: quantized zero/scale metadata (deprecated in hqq) is not supported")
    if meta.get("axis", 1) != 1:
        raise NotImplementedError(
            "from_hqq: axis=0 groups are strided across rows and cannot be stored in the canonical format "
            "(groups contiguous along in_features); quantize with axis=1"
        )
    missing = [k for k in ("nbits", "group_size", "shape", "packing") if k not in meta]
    if missing or not (("scale" in meta and "zero" in meta) or "zero_scale" in meta):
        raise ValueError(f"from_hqq: meta lacks {missing or ['scale', 'zero']} (hqq's quantize meta needs nbits, "
                         f"group_size, shape, axis, packing and scale / zero)")
    bits = meta["nbits"]
    if bits not in (2, 3, 4) or isinstance(bits, bool):
        raise ValueError(f"from_hqq: nbits must be 2, 3 or 4, got {bits!r}")
    bits = int(bits)  # (hqq declares nbits a float: 4.0)
    if not meta.get("packing"):
        raise ValueError("from_hqq: W_q is not bit-packed (meta['packing'] is None); use PackedWeight.from_quantized")
    pbits = {"4bit_u8": 4, "2bit_u8": 2, "3bit_32": 3}.get(meta["packing"])
    if pbits is not None and pbits != bits:  # the codes would be read with the wrong width
        raise ValueError(f"from_hqq: meta['nbits'] = {bits} does not match meta['packing'] = {meta['packing']!r}")
    N, K = (int(d) for d in meta["shape"])
    g = meta["group_size"] or K
    if K % g:
        raise ValueError(f"from_hqq: group_size {g} does not divide in_features {K}")
    if "zero_scale" in meta and "scale" not in meta:
        zs = meta["zero_scale"]
        meta["zero"], meta["scale"] = zs[0], zs[1]
    R = N * K // g
    per = {"4bit_u8": 2, "2bit_u8": 4, "3bit_32": 10}.get(meta["packing"])
    if per in (2, 4) and R % per:
        # hqq's 4/2-bit packers pair rows i and i + R/per and broadcast a short last slice: with R not a
        # multiple of per the packed bytes do not hold the codes (hqq's own dequantize fails on them). Checked
        # before W_q's shape, which such a broadcast leaves arbitrary (the shape error hid this cause)
        raise ValueError(f"from_hqq: {meta['packing']} needs N * K / group_size = {R} to be a multiple of {per}; "
                         "hqq packed this weight incorrectly")
    if not isinstance(W_q, torch.Tensor):
        raise TypeError(f"from_hqq: W_q must be a torch.Tensor, got {type(W_q).__name__}")
    word = torch.int32 if meta["packing"] == "3bit_32" else torch.uint8  # what hqq's packer returns
    if meta.get("view_as_float"):  # hqq stored the packed words viewed as its compute dtype (view_as_float=True)
        if not W_q.dtype.is_floating_point:
            raise TypeError(f"from_hqq: meta['view_as_float'] is True, so W_q must be the packed words viewed as a float "
                            f"dtype (hqq's compute dtype), got {W_q.dtype}")
        W_q = W_q.view(meta.get("unpack_view_dtype") or word)
    if per is not None and W_q.dtype != word:
        # checked before the unpacker's .view(): an int32 W_q for 4bit_u8 was read as 4x the bytes ("shape
        # '[16, 128]' is invalid for input of size 8192"), a float one likewise
        hint = (" (a float W_q is hqq's view_as_float=True storage: pass its meta with view_as_float)"
                if W_q.dtype.is_floating_point and not meta.get("view_as_float") else "")
        raise TypeError(f"from_hqq: W_q must be {word} for packing {meta['packing']!r}, got {W_q.dtype}{hint}")
    if per is not None:
        want = (-(-R // per), g)
        if tuple(W_q.shape) != want:
            raise ValueError(f"from_hqq: W_q must have shape {want} for shape {(N, K)}, group_size {g} and packing "
                             f"{meta['packing']!r}, got {tuple(W_q.shape)}")
    q = _hqq_unpack_rows(W_q, meta["packing"], R).reshape(N, K)
    for k in ("scale", "zero"):  # else a raw reshape error
        if meta[k].numel() != R:
            raise ValueError(f"from_hqq: meta[{k!r}] must hold N * K / group_size = {R} values (one per group), "
                             f"got shape {tuple(meta[k].shape)}")
    scale = meta["scale"].reshape(N, K // g)
    zero = meta["zero"].reshape(N, K // g)
    if not torch.is_floating_point(zero):
        zero = zero.to(scale.dtype)
    scale, zero = cast_meta(scale, zero.to(scale.dtype) if meta_dtype is None else zero, meta_dtype, "from_hqq")
    return PackedWeight.from_quantized(q.to(torch.uint8), scale.contiguous(), zero.contiguous(), bits, g)


# ---------------------------------------------------------------- GPTQ


def _as_u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def gptq_unpack_axis0(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """GPTQ packing along dim 0: int32 ``[rows * bits / 32, C]`` -> int64 codes ``[rows, C]``."""
    w = _as_u32(packed)
    if bits in (2, 4, 8):
        per = 32 // bits
        mask = (1 << bits) - 1
        q = torch.stack([(w >> (bits * j)) & mask for j in range(per)], dim=1)  # [W, per, C]
        return q.reshape(-1, w.shape[1])[:rows]
    if bits == 3:
        w = w.reshape(-1, 3, w.shape[1])
        w0, w1, w2 = w[:, 0], w[:, 1], w[:, 2]
        vals = [(w0 >> (3 * j)) & 7 for j in range(10)]
        vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
        vals += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
        vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
        vals += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
        q = torch.stack(vals, dim=1)  # [W/3, 32, C]
        return q.reshape(-1, w.shape[2])[:rows]
    raise ValueError(f"GPTQ bits must be 2, 3, 4 or 8, got {bits}")


def gptq_pack_axis0(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`gptq_unpack_axis0` (the AutoGPTQ packer): codes ``[rows, C]`` -> int32."""
    q = q.to(torch.int64)
    rows, C = q.shape
    per = 32 if bits == 3 else 32 // bits
    if rows % per:
        raise ValueError(f"GPTQ {bits}-bit packing needs a multiple of {per} rows, got {rows}")
    if bits in (2, 4, 8):
        per = 32 // bits
        qq = q.reshape(-1, per, C)
        w = sum(qq[:, j] << (bits * j) for j in range(per))
    elif bits == 3:
        qq = q.reshape(-1, 32, C)
        w0 = sum(qq[:, j] << (3 * j) for j in range(10)) | ((qq[:, 10] & 3) << 30)
        w1 = ((qq[:, 10] >> 2) & 1) | sum(qq[:, 11 + j] << (3 * j + 1) for j in range(10)) | ((qq[:, 21] & 1) << 31)
        w2 = ((qq[:, 21] >> 1) & 3) | sum(qq[:, 22 + j] << (3 * j + 2) for j in range(10))
        w = torch.stack([w0, w1, w2], dim=1).reshape(-1, C)
    else:
        raise ValueError(f"GPTQ bits must be 2, 3, 4 or 8, got {bits}")
    w = w & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def to_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, zero_offset: int = 1):
    """Codes ``q [N, K]``, integer ``zeros [N, G]`` and ``scales [N, G]`` -> GPTQ ``(qweight, qzeros, scales)``.

    GPTQ stores integer zeros: codes must lie in ``[0, 2^bits - 1]`` and zeros be integers in
    ``[zero_offset, 2^bits - 1 + zero_offset]`` (what the stored field holds); anything else raises
    rather than being truncated or wrapped. (AutoGPTQ's v1 packer wraps a zero of 0 to 2^bits - 1;
    such a checkpoint cannot be written here.) HQQ-style float zeros have no GPTQ form.
    """
    maxq = (1 << bits) - 1
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"to_gptq: bits must be 2, 3, 4 or 8, got {bits}")
    if not isinstance(zero_offset, int) or isinstance(zero_offset, bool):
        raise TypeError(f"to_gptq: zero_offset must be an int (1 for AutoGPTQ v1, 0 for v2), got {zero_offset!r}")
    if q.dim() != 2 or zeros.dim() != 2 or zeros.shape != scales.shape or zeros.shape[0] != q.shape[0]:
        raise ValueError(f"to_gptq: need q [N, K] and zeros / scales [N, G], got {tuple(q.shape)}, "
                         f"{tuple(zeros.shape)}, {tuple(scales.shape)}")
    # float codes were truncated by .to(int64) (2.7 -> 2): codes are integers, as for quantkern.pack
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"to_gptq: q (the codes) must have an integer dtype, got {q.dtype}")
    if not scales.dtype.is_floating_point:
        raise TypeError(f"to_gptq: scales must be a float tensor, got {scales.dtype}")
    G = zeros.shape[1]
    if G == 0 or q.shape[1] % G:
        # a G that does not divide K gave GPTQ tensors no reader (from_gptq included) can use
        raise ValueError(f"to_gptq: zeros / scales have G = {G} groups per row, which must be >= 1 and divide "
                         f"in_features K = {q.shape[1]} (group_size = K / G)")
    qi = q.to(torch.int64)
    if q.numel() and (int(qi.min()) < 0 or int(qi.max()) > maxq):
        raise ValueError(f"to_gptq: codes must be in [0, {maxq}] for {bits} bits, got [{int(qi.min())}, {int(qi.max())}]")
    zf = zeros.double()
    for name, t in (("zeros", zf), ("scales", scales)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"to_gptq: {name} contain NaN or Inf")
    if zeros.numel() and (not torch.equal(zf, zf.round()) or float(zf.min()) < zero_offset
                          or float(zf.max()) > maxq + zero_offset):
        raise ValueError(f"to_gptq: zeros must be integers in [{zero_offset}, {maxq + zero_offset}] (GPTQ stores "
                         f"zero - {zero_offset} in {bits} bits), got values in [{float(zf.min())}, {float(zf.max())}]"
                         + ("" if torch.equal(zf, zf.round()) else " with fractional parts (float zeros, e.g. HQQ's)"))
    per = 32 if bits == 3 else 32 // bits  # codes per int32 (3 bits: 32 per 3 int32)
    for what, n in (("in_features K = q.shape[1]", q.shape[1]), ("out_features N = q.shape[0] (qzeros packs along N)",
                                                                   q.shape[0])):
        if n % per:
            raise ValueError(f"to_gptq: {bits}-bit GPTQ tensors need {what} to be a multiple of {per}, got {n}")
    qweight = gptq_pack_axis0(qi.t(), bits)  # [K * bits / 32, N]
    z = zf.to(torch.int64) - zero_offset  # [N, G], in [0, maxq]
    qzeros = gptq_pack_axis0(z, bits).t().contiguous()  # packed along N: [G, N * bits / 32]
    return qweight, qzeros, scales.t().contiguous()


def _gptq_group_perm(g_idx, K: int, G: int, gs: int) -> torch.Tensor | None:
    """Validate a GPTQ ``g_idx`` and return the column permutation that makes its groups contiguous.

    ``g_idx``: integer ``[K]`` with values in ``[0, G)``, each taken by exactly ``gs`` inputs.
    Returns None when g_idx is ``arange(K) // gs`` (no permutation needed), else int64 ``[K]``
    ``P`` = the stable argsort of g_idx: ``P[g*gs:(g+1)*gs]`` are group g's inputs, ascending.
    """
    if not isinstance(g_idx, torch.Tensor) or g_idx.shape != (K,):  # not an act-order question
        raise ValueError(f"from_gptq: g_idx must have shape ({K},) (in_features), got "
                         f"{tuple(g_idx.shape) if isinstance(g_idx, torch.Tensor) else type(g_idx).__name__}")
    if g_idx.dtype.is_floating_point or g_idx.dtype.is_complex or g_idx.dtype == torch.bool:
        # group ids are integers (int32 in checkpoints); a float g_idx is a mix-up of tensors
        raise TypeError(f"from_gptq: g_idx must have an integer dtype (int32 / int64), got {g_idx.dtype}")
    gi = g_idx.detach().to("cpu", torch.int64)  # host checks: this runs once per layer, at load time
    bad = (gi < 0) | (gi >= G)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"from_gptq: g_idx values must lie in [0, {G}) (scales has G = {G} groups), got "
                         f"g_idx[{k}] = {int(gi[k])}")
    counts = torch.bincount(gi, minlength=G)
    off = (counts != gs).nonzero().flatten()
    if off.numel():
        g = int(off[0])
        raise ValueError(f"from_gptq: g_idx must give every group exactly group_size = {gs} inputs; group {g} has "
                         f"{int(counts[g])} ({off.numel()} group(s) off), so this is no GPTQ layout")
    if torch.equal(gi, torch.arange(K) // gs):
        return None
    # stable: inputs keep their ascending order inside a group (a forward-streaming gather of x)
    return torch.sort(gi, stable=True).indices


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int = 4,
              group_size: int | None = None, g_idx: torch.Tensor | None = None, zero_offset: int = 1,
              meta_dtype: torch.dtype | None = None, return_perm: bool = False):
    """Convert GPTQ-style tensors (module docstring) to a PackedWeight, exactly.

    Args:
        qweight: int32 ``[K * bits / 32, N]``; qzeros: int32 ``[G, N * bits / 32]``;
        scales: ``[G, N]``; bits: 2, 3 or 4; group_size: K // G when None or -1;
        g_idx: optional integer ``[K]``, the group of each input, every group exactly
            ``group_size`` inputs. ``arange(K) // group_size`` (or None) is the plain layout;
            any other (act-order / desc_act) needs ``return_perm=True``;
        zero_offset: 1 for AutoGPTQ v1 checkpoints (stored zero + 1), 0 for v2;
        meta_dtype: dtype of the scales/zeros (default: scales' dtype);
        return_perm: False: return the PackedWeight and refuse an act-order g_idx
            (NotImplementedError). True: return ``(pw, perm)``, ``perm`` None for a plain
            g_idx, else int64 ``[K]`` on qweight's device with ``pw`` holding ``W[:, perm]``
            (so ``x @ W.T == x[..., perm] @ pw.dequantize().T``; module docstring).

    Returns:
        ``PackedWeight`` ``[N, K]``, or ``(PackedWeight, perm | None)`` with ``return_perm=True``.
    """
    if not isinstance(return_perm, bool):
        raise TypeError(f"from_gptq: return_perm must be a bool, got {return_perm!r}")
    if isinstance(bits, bool) or not hasattr(bits, "__index__") or bits not in (2, 3, 4):  # (4.0 passed, failed later)
        raise ValueError(f"from_gptq: bits must be an int 2, 3 or 4, got {bits!r}")
    bits = bits.__index__()  # (numpy / torch ints)
    if not isinstance(zero_offset, int) or isinstance(zero_offset, bool):  # 0.5 gave fractional zeros
        raise TypeError(f"from_gptq: zero_offset must be an int (1 for AutoGPTQ v1, 0 for v2), got {zero_offset!r}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise TypeError(f"from_gptq: {name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or scales.shape[0] == 0:
        raise ValueError(f"from_gptq: scales must be [G, N] with G >= 1 groups, got {tuple(scales.shape)}")
    G, N = scales.shape
    if bits == 3 and qweight.shape[0] % 3:
        raise ValueError(f"from_gptq: a 3-bit qweight packs 32 rows in 3 int32 rows: qweight.shape[0] must be a "
                         f"multiple of 3, got {qweight.shape[0]}")
    K = qweight.shape[0] * 32 // bits
    if K == 0:
        raise ValueError(f"from_gptq: qweight has no rows (in_features K = 0), got {tuple(qweight.shape)}")
    if qweight.shape[1] != N:
        raise ValueError(f"from_gptq: qweight has {qweight.shape[1]} columns but scales has N = {N}")
    per_word = 32 // bits if bits != 3 else 32
    if N % per_word:
        raise ValueError(f"from_gptq: qzeros packs {per_word} output columns per {'3 int32' if bits == 3 else 'int32'}"
                         f": N = {N} (scales.shape[1]) must be a multiple of {per_word}")
    if qzeros.shape != (G, N * bits // 32):
        raise ValueError(f"from_gptq: qzeros must have shape {(G, N * bits // 32)}, got {tuple(qzeros.shape)}")
    if group_size == -1:  # GPTQ configs write -1 for one group per row
        if G != 1:
            raise ValueError(f"from_gptq: group_size -1 means one group per row, but scales has G = {G} groups")
        group_size = None
    gs = K // G if group_size is None else group_size  # not `or`: group_size=0 was taken as None
    if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0:
        raise ValueError(f"from_gptq: group_size must be a positive int, None or -1, got {group_size!r}")
    if gs * G != K:
        partial = " (the last group is partial: the canonical format needs group_size to divide in_features)" \
            if gs * (G - 1) < K < gs * G else ""
        raise ValueError(f"from_gptq: group_size {gs} x {G} groups != in_features {K}{partial}")
    perm = None if g_idx is None else _gptq_group_perm(g_idx, K, G, gs)
    if perm is not None and not return_perm:
        raise NotImplementedError(
            "from_gptq: g_idx is not arange(K) // group_size (an act-order / desc_act checkpoint): its groups are "
            "not contiguous along in_features, so the weight is stored with its columns permuted and the layer "
            "must gather its input by that permutation; pass return_perm=True to get (PackedWeight, perm), or "
            "build the layer with quantkern.nn.PackedLinear.from_gptq(..., g_idx=g_idx)")
    q = gptq_unpack_axis0(qweight, bits, K)  # [K, N]
    if perm is not None:
        perm = perm.to(qweight.device)
        q = q.index_select(0, perm)  # row j of Wp^T is input perm[j]: groups now contiguous
    q = q.t()  # [N, K]
    z = gptq_unpack_axis0(qzeros.t(), bits, N)  # stored zeros [N, G]
    # stored zeros [N, G] (exact integers in every metadata dtype for bits <= 8)
    s, zeros = cast_meta(scales.t(), (z + zero_offset).to(scales.dtype), meta_dtype, "from_gptq")
    pw = PackedWeight.from_quantized(q.to(torch.uint8).contiguous(), s.contiguous(), zeros.contiguous(), bits, gs)
    return (pw, perm) if return_perm else pw
