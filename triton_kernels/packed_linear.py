"""Triton kernels on the canonical packed format: ``quantkern::packed_linear_triton`` and
``quantkern::dequantize_triton``.

They read the same bytes as the CPU and CUDA kernels (spec and bit diagrams:
``quantkern/reference/packing.py``). ``qweight`` is viewed as bytes. A row is a
sequence of 32-weight blocks; the kernels decode a block *field* by field, where
field ``f`` of block ``j`` is a run of ``W`` consecutive weights
``k = 32 j + W f + p`` (``p in [0, W)``) held by the same bit positions of ``W``
consecutive bytes:

* 4 bits: ``W = 16``, 2 fields: bytes ``[16 j, 16 j + 16)``, nibble ``f``;
* 2 bits: ``W = 8``, 4 fields: bytes ``[8 j, 8 j + 8)``, bits ``[2 f, 2 f + 2)``;
* 3 bits: the 2-bit fields of ``q & 3`` plus, for bit 2, bit ``p`` of byte
  ``8 nb + 4 j + f`` (the hi plane after the lo plane).

So every load is a contiguous run of bytes (vectorisable), and a dot product
takes x in the same field order (a dot product does not care about the order of
its terms). Groups are whole blocks (or one group per row), so a block's scale
and zero are one load.

``w = (q - z) * s`` in fp32 (a subtraction then a multiply, exactly the
reference). bf16/fp16 x multiplies the weight rounded to x's dtype (as
``F.linear(x, W.to(x.dtype))`` does); fp32 x the exact fp32 weight (IEEE fp32
products, no TF32). Accumulation is fp32. The whole weight is never
materialised:

* GEMV (``M <= GEMV_MAX_M``): one program per (``BN`` rows, K slice, row of x);
  the K slices (split-K, sized to fill the GPU) write fp32 partial sums that a
  second kernel adds in a fixed order, with the bias, and rounds to x's dtype
  (no atomics: the same config and split give the same bits on every call; another
  config or GPU may sum in another order, within fp32 rounding).
* GEMM: ``[BM, BN]`` output tiles, ``tl.dot`` per field.

Both are autotuned over tile sizes and warps on a GPU (``GEMV_CONFIGS``,
``GEMM_CONFIGS``, keyed on N, K and M's size class); under the interpreter one
small config runs (tests run every config directly).

Registered for CUDA, and for CPU when TRITON_INTERPRET=1 (testing under the interpreter).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantkern import _registry  # noqa: F401  (defines the quantkern::*_triton schemas)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
GEMV_MAX_M = 4  # rows of x up to which packed_linear_triton runs the GEMV


@triton.jit
def _cast(y, dtype: tl.constexpr):
    """fp32 -> dtype with round to nearest even (bf16 by hand: the interpreter truncates)."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.jit
def _blocks(qw_ptr, s_ptr, z_ptr, rn, jj, N, G, gs, row_bytes, nb, W: tl.constexpr):
    """Blocks jj of rows rn (rn: [BN], jj: [NBK]): their (lo-plane) bytes int32 [BN, NBK, W], one
    contiguous run per row, and their scale and zero fp32 [BN, NBK, 1]; 0 for rows >= N and
    blocks >= nb. Loaded once per tile and shared by its fields."""
    r3 = rn[:, None, None]
    j3 = jj[None, :, None]
    mask = (r3 < N) & (j3 < nb)
    b = tl.load(qw_ptr + r3.to(tl.int64) * row_bytes + (W * j3 + tl.arange(0, W)[None, None, :]), mask=mask,
                other=0).to(tl.int32)
    goff = r3.to(tl.int64) * G + (32 * j3) // gs
    s = tl.load(s_ptr + goff, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + goff, mask=mask, other=0.0).to(tl.float32)
    return b, s, z


@triton.jit
def _field(b, s, z, qw_ptr, rn, jj, N, K, row_bytes, nb, F: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr):
    """Field F of the tile of :func:`_blocks`, dequantized: fp32 [BN, NBK, W] for weights
    k = 32 jj + W F + p; exactly 0 for k >= K (the padding of the last block would decode as
    -z * s, which a 16-bit x's dtype may round to inf, and inf * 0 is NaN)."""
    if BITS == 4:
        q = (b >> (4 * F)) & 15
    else:
        q = (b >> (2 * F)) & 3
        if BITS == 3:  # bit 2: bit p of hi-plane byte 4 j + F
            r3 = rn[:, None, None]
            j3 = jj[None, :, None]
            hb = tl.load(qw_ptr + r3.to(tl.int64) * row_bytes + 8 * nb + 4 * j3 + F, mask=(r3 < N) & (j3 < nb),
                         other=0).to(tl.int32)  # [BN, NBK, 1]
            q = q | (((hb >> tl.arange(0, W)[None, None, :]) & 1) << 2)
    k = 32 * jj[None, :, None] + W * F + tl.arange(0, W)[None, None, :]
    return tl.where(k < K, (q.to(tl.float32) - z) * s, 0.0)


@triton.jit
def _x_field(x_ptr, rm, jj, M, K, F: tl.constexpr, W: tl.constexpr):
    """x[rm, 32 jj + W F + p] as fp32 [BM, NBK, W]; 0 past M and K (rm: [BM], jj: [NBK])."""
    k = 32 * jj[None, :, None] + W * F + tl.arange(0, W)[None, None, :]
    r3 = rm[:, None, None]
    return tl.load(x_ptr + r3.to(tl.int64) * K + k, mask=(r3 < M) & (k < K), other=0.0)


@triton.jit
def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, G, gs, row_bytes, nb, BITS: tl.constexpr,
                       OUT: tl.constexpr, BN: tl.constexpr, NBK: tl.constexpr):
    W: tl.constexpr = 16 if BITS == 4 else 8
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    jj = tl.program_id(1) * NBK + tl.arange(0, NBK)
    b, s, z = _blocks(qw_ptr, s_ptr, z_ptr, rn, jj, N, G, gs, row_bytes, nb, W)
    for f in tl.static_range(32 // W):
        w = _field(b, s, z, qw_ptr, rn, jj, N, K, row_bytes, nb, f, BITS, W)
        k = 32 * jj[None, :, None] + W * f + tl.arange(0, W)[None, None, :]
        r3 = rn[:, None, None]
        tl.store(out_ptr + r3.to(tl.int64) * K + k, _cast(w, OUT), mask=(r3 < N) & (k < K))


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, G, gs, row_bytes, nb, SPLIT, M_CLASS,
                 BITS: tl.constexpr, XT: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
                 BN: tl.constexpr, NBK: tl.constexpr):
    """out = partial sums fp32 [SPLIT, M, N] (DIRECT: y [M, N] in x's dtype, with the bias).

    Grid (cdiv(N, BN) * M, SPLIT): the rows of x are the fastest axis, so the (at most 4)
    programs that read the same weight tile run together and share it through the L2."""
    W: tl.constexpr = 16 if BITS == 4 else 8
    m = tl.program_id(0) % M
    rn = (tl.program_id(0) // M) * BN + tl.arange(0, BN)
    ks = tl.program_id(1)
    rm = m + tl.arange(0, 1)
    steps = tl.cdiv(nb, NBK)
    per = tl.cdiv(steps, SPLIT)
    acc = tl.zeros((BN, NBK, W), dtype=tl.float32)
    for step in range(ks * per, tl.minimum(ks * per + per, steps)):
        jj = step * NBK + tl.arange(0, NBK)
        b, s, z = _blocks(qw_ptr, s_ptr, z_ptr, rn, jj, N, G, gs, row_bytes, nb, W)
        for f in tl.static_range(32 // W):
            w = _field(b, s, z, qw_ptr, rn, jj, N, K, row_bytes, nb, f, BITS, W)
            if XT != tl.float32:
                w = _cast(w, XT).to(tl.float32)
            x = _x_field(x_ptr, rm, jj, M, K, f, W).to(tl.float32)  # [1, NBK, W]
            acc += w * x
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if DIRECT:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0)
        tl.store(out_ptr + m.to(tl.int64) * N + rn, _cast(y, XT), mask=rn < N)
    else:
        tl.store(out_ptr + (ks * M + m).to(tl.int64) * N + rn, y, mask=rn < N)


@triton.jit
def _splitk_sum_kernel(part_ptr, b_ptr, y_ptr, M, N, SPLIT, XT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """y[M, N] = sum over s (in order) of part[s] (+ bias), rounded to x's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + i
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += M * N  # (a pointer step: no int32 product of the slice index)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=ok, other=0.0)
    tl.store(y_ptr + i, _cast(acc, XT), mask=ok)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, gs, row_bytes, nb, M_CLASS,
                 BITS: tl.constexpr, XT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, NBK: tl.constexpr):
    W: tl.constexpr = 16 if BITS == 4 else 8
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for j0 in range(0, nb, NBK):
        jj = j0 + tl.arange(0, NBK)
        b, s, z = _blocks(qw_ptr, s_ptr, z_ptr, rn, jj, N, G, gs, row_bytes, nb, W)
        for f in tl.static_range(32 // W):
            w = tl.reshape(_field(b, s, z, qw_ptr, rn, jj, N, K, row_bytes, nb, f, BITS, W), (BN, NBK * W))
            x = tl.reshape(_x_field(x_ptr, rm, jj, M, K, f, W), (BM, NBK * W))
            if XT == tl.float32:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            elif UPCAST:  # interpreter: its bf16 dot is wrong; fp32 products of 16-bit values are exact
                acc += tl.dot(x.to(tl.float32), tl.trans(_cast(w, XT).to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(_cast(w, XT)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
    ym = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], _cast(acc, XT), mask=ym)


def _cfg(num_warps, num_stages=2, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# Autotune candidates: a GPU picks the fastest per (N, K, size class of M, bits, x's dtype; for the
# GEMV also split or not); the first call with a new key benchmarks them (it synchronises: run one
# call before capturing a CUDA graph). Configs that spill registers on sm_90 at BM = 64 (BN >= 128
# with NBK = 4, BN = 256) are left out. The
# interpreter runs only the first of each list (the tests run every one directly). GEMV: a
# [BN rows, 32 NBK weights] tile per step, i.e. BN rows of 16 NBK (4 bits) / 8 NBK (2 bits)
# contiguous bytes per field load. GEMM: tl.dot needs K >= 16 per field, so NBK >= 2.
GPU_GEMV_CONFIGS = [
    _cfg(4, BN=16, NBK=8), _cfg(4, BN=8, NBK=16), _cfg(4, BN=32, NBK=4), _cfg(8, BN=32, NBK=8),
    _cfg(8, BN=16, NBK=16), _cfg(8, BN=64, NBK=4), _cfg(4, BN=16, NBK=4, num_stages=3), _cfg(2, BN=8, NBK=8)]
GPU_GEMM_CONFIGS = [
    _cfg(4, BN=64, NBK=2), _cfg(8, BN=128, NBK=2), _cfg(4, BN=32, NBK=2), _cfg(4, BN=32, NBK=4),
    _cfg(4, BN=64, NBK=2, num_stages=3), _cfg(8, BN=64, NBK=4, num_stages=3)]
GEMV_CONFIGS = [_cfg(4, BN=8, NBK=2)] if _INTERPRET else GPU_GEMV_CONFIGS
GEMM_CONFIGS = [_cfg(4, BN=32, NBK=2)] if _INTERPRET else GPU_GEMM_CONFIGS
_gemv = triton.autotune(GEMV_CONFIGS, key=["N", "K", "M_CLASS", "BITS", "XT", "DIRECT"])(_gemv_kernel)
_gemm = triton.autotune(GEMM_CONFIGS, key=["N", "K", "M_CLASS", "BITS", "XT"])(_gemm_kernel)


def _geometry(qweight, bits, group_size, in_features):
    N, K = qweight.shape[0], in_features
    nb = (K + 31) // 32
    return N, K, nb, nb * bits * 4, K // group_size


def _checked_geometry(op, qweight, scales, zeros, bits, group_size, in_features):
    # the public wrappers check too; a direct torch.ops call must not read past the rows either
    from quantkern.ops import check_packed

    check_packed(op, qweight, scales, zeros, bits, group_size, in_features)
    return _geometry(qweight, bits, group_size, in_features)


def _programs_wanted(device) -> int:
    """About four waves of programs on this GPU (a fixed small number under the interpreter)."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def gemv_split(M: int, N: int, nb: int, device) -> int:
    """K slices of the GEMV: enough (16-row tiles, rows of x, K slices) programs to fill the GPU,
    at most nb // 8 slices (about 8 blocks = 256 weights each or more). The kernel cuts K in whole
    steps of its tile's NBK blocks, so with a large NBK some slices are short or empty (an empty
    slice adds 0)."""
    tiles = triton.cdiv(N, 16) * M
    return max(1, min(triton.cdiv(_programs_wanted(device), tiles), nb // 8))


def dequantize_triton(qweight, scales, zeros, bits, group_size, in_features, dtype=None):
    N, K, nb, row_bytes, G = _checked_geometry("dequantize_triton", qweight, scales, zeros, bits, group_size,
                                               in_features)
    if dtype is not None and dtype not in _TL:
        raise ValueError(f"quantkern.dequantize_triton: dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty((N, K), dtype=dtype or scales.dtype, device=qweight.device)
    if N == 0:
        return out
    BN, NBK = 32, 2
    grid = (triton.cdiv(N, BN), triton.cdiv(nb, NBK))
    _dequantize_kernel[grid](qweight.contiguous().view(torch.uint8), scales.contiguous(), zeros.contiguous(), out,
                             N, K, G, group_size, row_bytes, nb, BITS=bits, OUT=_TL[out.dtype], BN=BN, NBK=NBK,
                             enable_fp_fusion=False)
    return out


def packed_linear_triton(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
    N, K, nb, row_bytes, G = _checked_geometry("packed_linear_triton", qweight, scales, zeros, bits, group_size,
                                               in_features)
    if x.dtype not in _TL:
        raise ValueError(f"quantkern.packed_linear_triton: x must be float32, float16 or bfloat16, got {x.dtype}")
    # as the native op: a CUDA x with a CPU bias (or the reverse) dispatches here and the launch would fail
    # deep inside Triton ("Pointer argument cannot be accessed")
    from quantkern.ops import _check_tensor

    _check_tensor("packed_linear_triton", "x", x, None, qweight.device, "qweight")
    if bias is not None:
        _check_tensor("packed_linear_triton", "bias", bias, None, x.device, "x")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"quantkern.packed_linear_triton: x must have shape [..., {K}], got {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"quantkern.packed_linear_triton: bias must have shape [{N}], got {tuple(bias.shape)}")
    if bias is not None and bias.dtype not in _TL:  # as the native op: no silent cast of a float64 / int bias
        raise ValueError(f"quantkern.packed_linear_triton: bias must be float32, float16 or bfloat16, got {bias.dtype}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        launch(x2, qweight.contiguous().view(torch.uint8), scales.contiguous(), zeros.contiguous(),
               None if bias is None else bias.float().contiguous(), y, bits, group_size)
    return y.reshape(*x.shape[:-1], N)


def launch(x2, qw8, scales, zeros, bias, y, bits, group_size, split=None, gemv=None, config=None):
    """y [M, N] = x2 [M, K] @ W.T (+ bias fp32 [N]) on contiguous tensors, qw8 the packed rows as bytes.

    ``split`` / ``gemv`` / ``config`` (a ``triton.Config``) override the choices of
    :func:`gemv_split`, ``M <= GEMV_MAX_M`` and the autotuner (tests run every config with them)."""
    M, K = x2.shape
    N = qw8.shape[0]
    nb = (K + 31) // 32
    geo = (M, N, K, K // group_size, group_size, nb * bits * 4, nb)
    m_class = min(triton.next_power_of_2(M), 256)
    xt = _TL[x2.dtype]
    b = bias if bias is not None else y  # dummy pointer when there is no bias
    opts = {"enable_fp_fusion": False}
    if gemv if gemv is not None else M <= GEMV_MAX_M:
        if split is not None and split < 1:
            raise ValueError(f"launch: split must be >= 1 (None: automatic), got {split}")
        S = split or gemv_split(M, N, nb, x2.device)
        part = y if S == 1 else torch.empty((S, M, N), dtype=torch.float32, device=y.device)
        kern, meta = (_gemv_kernel, dict(config.all_kwargs(), **opts)) if config else (_gemv, opts)
        grid = lambda c: (triton.cdiv(N, c["BN"]) * M, S)  # noqa: E731
        kern[grid](x2, qw8, scales, zeros, b, part, *geo, S, m_class, BITS=bits, XT=xt, HAS_BIAS=bias is not None,
                   DIRECT=S == 1, **meta)
        if S > 1:
            BLOCK = 1024
            _splitk_sum_kernel[(triton.cdiv(M * N, BLOCK),)](part, b, y, M, N, S, XT=xt, HAS_BIAS=bias is not None,
                                                             BLOCK=BLOCK, **opts)
    else:
        BM = 16 if M <= 16 else (32 if M <= 32 else 64)
        kern, meta = (_gemm_kernel, dict(config.all_kwargs(), **opts)) if config else (_gemm, opts)
        grid = lambda c: (triton.cdiv(M, BM), triton.cdiv(N, c["BN"]))  # noqa: E731
        kern[grid](x2, qw8, scales, zeros, b, y, *geo, m_class, BITS=bits, XT=xt, HAS_BIAS=bias is not None,
                   UPCAST=_INTERPRET, BM=BM, **meta)


# ------------------------------------------------------------------ registration
_DEVICES = ("CUDA", "CPU") if _INTERPRET else ("CUDA",)
for _dev in _DEVICES:
    torch.library.impl("quantkern::packed_linear_triton", _dev)(packed_linear_triton)
    torch.library.impl("quantkern::dequantize_triton", _dev)(dequantize_triton)
