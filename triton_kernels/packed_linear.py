"""Triton kernels on the canonical packed format: ``quantkern::packed_linear_triton`` and
``quantkern::dequantize_triton``.

They read the same bytes as the CPU and CUDA kernels (spec and bit diagrams:
``quantkern/reference/packing.py``). ``qweight`` is viewed as bytes; weight ``k``
of row ``n`` is in block ``j = k // 32`` at ``t = k % 32``:

* 4 bits: byte ``16 j + (t & 15)``, nibble ``t >> 4``;
* 2 bits: byte ``8 j + (t & 7)``, bits ``2 (t >> 3)``;
* 3 bits: the 2-bit layout for ``q & 3`` plus bit ``t & 7`` of byte
  ``8 nb + 4 j + (t >> 3)`` for bit 2 (the hi plane after the lo plane).

``w = (q - z) * s`` in fp32 (a subtraction then a multiply, exactly the
reference); packed_linear multiplies tiles with ``tl.dot`` and accumulates in
fp32: fp32 x with IEEE fp32 products (no TF32), bf16/fp16 x with the weight tile
rounded to x's dtype (as ``F.linear(x, W.to(x.dtype))`` does). The whole weight
is never materialised: each program dequantizes a [BN, BK] tile in registers.

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
def _weights(qw_ptr, s_ptr, z_ptr, rn, rk, N, K, G, gs, row_bytes, nb, BITS: tl.constexpr):
    """Dequantized fp32 tile w[rn, rk] (rn: [BN, 1], rk: [1, BK]); 0 outside [N, K]."""
    mask = (rn < N) & (rk < K)
    j = rk // 32
    t = rk % 32
    base = qw_ptr + rn.to(tl.int64) * row_bytes
    if BITS == 4:
        b = tl.load(base + 16 * j + (t & 15), mask=mask, other=0).to(tl.int32)
        q = (b >> ((t >> 4) * 4)) & 15
    else:
        lo = tl.load(base + 8 * j + (t & 7), mask=mask, other=0).to(tl.int32)
        q = (lo >> (2 * (t >> 3))) & 3
        if BITS == 3:
            hb = tl.load(base + 8 * nb + 4 * j + (t >> 3), mask=mask, other=0).to(tl.int32)
            q = q | (((hb >> (t & 7)) & 1) << 2)
    g = rk // gs
    s = tl.load(s_ptr + rn.to(tl.int64) * G + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rn.to(tl.int64) * G + g, mask=mask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - z) * s
    return tl.where(mask, w, 0.0)


@triton.jit
def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, G, gs, row_bytes, nb, BITS: tl.constexpr,
                       OUT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    rk = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]
    w = _weights(qw_ptr, s_ptr, z_ptr, rn, rk, N, K, G, gs, row_bytes, nb, BITS)
    tl.store(out_ptr + rn.to(tl.int64) * K + rk, _cast(w, OUT), mask=(rn < N) & (rk < K))


@triton.jit
def _packed_linear_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, gs, row_bytes, nb,
                          BITS: tl.constexpr, XT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        xm = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=xm, other=0.0)
        w = _weights(qw_ptr, s_ptr, z_ptr, rn[:, None], rk[None, :], N, K, G, gs, row_bytes, nb, BITS)  # [BN, BK]
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


def _geometry(qweight, bits, group_size, in_features):
    N, K = qweight.shape[0], in_features
    nb = (K + 31) // 32
    return N, K, nb, nb * bits * 4, K // group_size


def _checked_geometry(op, qweight, scales, zeros, bits, group_size, in_features):
    # the public wrappers check too; a direct torch.ops call must not read past the rows either
    from quantkern.ops import check_packed

    check_packed(op, qweight, scales, zeros, bits, group_size, in_features)
    return _geometry(qweight, bits, group_size, in_features)


def dequantize_triton(qweight, scales, zeros, bits, group_size, in_features, dtype=None):
    N, K, nb, row_bytes, G = _checked_geometry("dequantize_triton", qweight, scales, zeros, bits, group_size,
                                               in_features)
    out = torch.empty((N, K), dtype=dtype or scales.dtype, device=qweight.device)
    if N == 0:
        return out
    BN, BK = 32, 64
    grid = (triton.cdiv(N, BN), triton.cdiv(K, BK))
    _dequantize_kernel[grid](qweight.contiguous().view(torch.uint8), scales.contiguous(), zeros.contiguous(), out,
                             N, K, G, group_size, row_bytes, nb, BITS=bits, OUT=_TL[out.dtype], BN=BN, BK=BK,
                             enable_fp_fusion=False)
    return out


def packed_linear_triton(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
    N, K, nb, row_bytes, G = _checked_geometry("packed_linear_triton", qweight, scales, zeros, bits, group_size,
                                               in_features)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"quantkern.packed_linear_triton: x must have shape [..., {K}], got {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"quantkern.packed_linear_triton: bias must have shape [{N}], got {tuple(bias.shape)}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        BM = 16 if M <= 16 else (32 if M <= 32 else 64)
        BN, BK = 64, 64
        b = bias.float().contiguous() if bias is not None else y  # dummy pointer when no bias
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
        _packed_linear_kernel[grid](x2, qweight.contiguous().view(torch.uint8), scales.contiguous(), zeros.contiguous(),
                                    b, y, M, N, K, G, group_size, row_bytes, nb, BITS=bits, XT=_TL[x.dtype],
                                    HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, UPCAST=_INTERPRET, num_warps=4,
                                    enable_fp_fusion=False)
    return y.reshape(*x.shape[:-1], N)


# ------------------------------------------------------------------ registration
_DEVICES = ("CUDA", "CPU") if _INTERPRET else ("CUDA",)
for _dev in _DEVICES:
    torch.library.impl("quantkern::packed_linear_triton", _dev)(packed_linear_triton)
    torch.library.impl("quantkern::dequantize_triton", _dev)(dequantize_triton)
