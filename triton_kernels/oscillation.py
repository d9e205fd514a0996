"""Triton kernels: quantkern::oscillation_update_triton, dampening_loss_triton (+ backward).

The per-element math is csrc/shared/oscillation.h transcribed (same state layout,
same fp32 operation order). Registered for CUDA, and for CPU when
``TRITON_INTERPRET=1`` (the interpreter is how the tests run them here).

Numerics notes:
* round-half-to-even is the exact ``_rint`` of fake_quant_lsq (libdevice.rint is not available
  in the interpreter), which keeps the sign of a zero result as rint does (the oscillation update's
  bare ``(x + 1.5 * 2^23) - 1.5 * 2^23`` gave +0 where the native op's q was -0, and the EMA
  state differed from it in that bit);
* division is ``tl.div_rn`` (IEEE), and kernels launch with ``enable_fp_fusion=False``
  so no multiply-add is contracted into an FMA (the CPU/CUDA kernels round twice).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .._registry import LIB
from ..ops import check_osc_state
from .fake_quant_lsq import _cast_out, _rint, check_layout, check_qparam_values

_BLOCK = 1024
_FREQ_ONE = 1048575.0


@triton.jit
def _param_index(offs, C, inner):
    return (offs // inner) % C


@triton.jit
def _osc_kernel(w_ptr, s_ptr, b_ptr, meta_ptr, ema_ptr, counts_ptr, N, C, inner,
                n, p, m, om, mS, thF, FREEZE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = _param_index(offs, C, inner)
    w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
    w = w_raw.to(tl.float32)
    s = tl.load(s_ptr + c, mask=mask, other=1.0)
    b = tl.load(b_ptr + c, mask=mask, other=0.0)
    meta = tl.load(meta_ptr + offs, mask=mask, other=0)
    if FREEZE:
        ema = tl.load(ema_ptr + offs, mask=mask, other=0.0)
    else:
        ema = w * 0.0  # not read or written without freezing

    v = tl.div_rn(w - b, s)
    q = _rint(tl.where(v < n, n, tl.where(v > p, p, v)))
    qp = ((meta << 24) >> 24).to(tl.float32)
    up = ((meta >> 8) & 1) != 0
    dn = ((meta >> 9) & 1) != 0
    was = ((meta >> 10) & 1) != 0
    live = ((meta >> 11) & 1) != 0
    F = ((meta >> 12) & 0xFFFFF).to(tl.float32)

    mv_up = q > qp
    mv_dn = q < qp
    osc = (mv_up & dn) | (mv_dn & up)
    F1 = _rint(om * F + tl.where(osc, 1.0, 0.0) * mS)
    F1 = tl.where(F1 > 1048575.0, 1048575.0, F1)
    up1 = mv_up | (up & ~mv_dn)
    dn1 = mv_dn | (dn & ~mv_up)
    if FREEZE:
        ema_eff = tl.where(live, ema, q)
        fz_new = F1 > thF
        qp1 = tl.where(fz_new, _rint(ema_eff), q)
        ema1 = m * q + om * ema_eff
        live1 = mv_up | True
    else:
        fz_new = mv_up & False
        qp1 = q
        ema1 = ema
        live1 = live
    qp1 = tl.where(was, qp, qp1)
    up1 = tl.where(was, up, up1)
    dn1 = tl.where(was, dn, dn1)
    F1 = tl.where(was, F, F1)
    fz1 = was | fz_new
    ema1 = tl.where(was, ema, ema1)
    live1 = tl.where(was, live, live1)

    meta1 = ((qp1.to(tl.int32) & 0xFF) | (up1.to(tl.int32) << 8) | (dn1.to(tl.int32) << 9)
             | (fz1.to(tl.int32) << 10) | (live1.to(tl.int32) << 11) | (F1.to(tl.int32) << 12))
    tl.store(meta_ptr + offs, meta1, mask=mask)
    if FREEZE:
        tl.store(ema_ptr + offs, ema1, mask=mask)
    w_out = qp1 * s + b
    tl.store(w_ptr + offs, _cast_out(w_out, w_raw.dtype), mask=mask & fz1)
    n_osc = tl.sum(tl.where(mask & osc & ~was, 1, 0).to(tl.int64), axis=0)
    n_frz = tl.sum(tl.where(mask & fz1, 1, 0).to(tl.int64), axis=0)
    tl.atomic_add(counts_ptr, n_osc)
    tl.atomic_add(counts_ptr + 1, n_frz)


@triton.jit
def _damp_diff(w, s, b, n, p):
    v = tl.div_rn(w - b, s)
    xq = _rint(tl.where(v < n, n, tl.where(v > p, p, v))) * s + b
    lo = n * s + b
    hi = p * s + b
    inside = (w >= lo) & (w <= hi)
    wc = tl.where(w < lo, lo, tl.where(w > hi, hi, w))
    return wc - xq, inside


@triton.jit
def _damp_fwd_kernel(w_ptr, s_ptr, b_ptr, part_ptr, N, C, inner, n, p, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = _param_index(offs, C, inner)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + c, mask=mask, other=1.0)
    b = tl.load(b_ptr + c, mask=mask, other=0.0)
    d, inside = _damp_diff(w, s, b, n, p)
    d = tl.where(mask, d, 0.0)
    tl.store(part_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def _damp_bwd_kernel(g2_ptr, w_ptr, gw_ptr, s_ptr, b_ptr, N, C, inner, n, p, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = _param_index(offs, C, inner)
    w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
    w = w_raw.to(tl.float32)
    s = tl.load(s_ptr + c, mask=mask, other=1.0)
    b = tl.load(b_ptr + c, mask=mask, other=0.0)
    g2 = tl.load(g2_ptr)  # fp32(grad * norm * 2), formed in float64 by the launcher as on the CPU
    d, inside = _damp_diff(w, s, b, n, p)
    gw = (g2 * d) * inside.to(tl.float32)  # (a product, as the native kernel: a NaN weight gives a NaN gradient)
    tl.store(gw_ptr + offs, _cast_out(gw, w_raw.dtype), mask=mask)


# ------------------------------------------------------------------ launchers
def _layout(x: torch.Tensor, scale: torch.Tensor, axis, group_size) -> tuple[int, int]:
    """(C, inner) such that element i uses parameter (i // inner) % C."""
    if group_size is not None:
        return scale.numel(), group_size
    if axis is not None:
        inner = 1
        for d in x.shape[axis + 1:]:
            inner *= d
        return x.shape[axis], inner
    return 1, max(1, x.numel())


def _f32(v: float) -> float:
    return float(np.float32(v))


def _check(op, x, scale, offset, qmin, qmax, axis, group_size):
    """The native ops' checks (csrc/cpu/checks.h): argument types and shapes (a scale or offset of the
    wrong size would be read out of bounds), then the values of scale and offset (a host sync, as the
    oscillation update always did: a bad scale would freeze weights at garbage)."""
    check_layout(op, x, scale, offset, qmin, qmax, axis, group_size, negative_axis=False)
    check_qparam_values(op, scale, offset)


def oscillation_update_triton(weight, scale, offset, meta, ema, qmin, qmax, axis, group_size, momentum, freeze_threshold):
    op = "oscillation_update_triton"
    _check(op, weight, scale, offset, qmin, qmax, axis, group_size)
    # one message per argument (a single combined message blamed the shape of a meta of the wrong dtype)
    check_osc_state(op, weight, meta, ema, qmin, qmax)
    if not 0 < momentum <= 1:
        raise ValueError(f"quantkern.{op}: momentum must be in (0, 1], got {momentum}")
    if not math.isfinite(freeze_threshold):
        raise ValueError(f"quantkern.{op}: freeze_threshold must be finite, got {freeze_threshold}")
    counts = torch.zeros(2, dtype=torch.int64, device=weight.device)
    N = weight.numel()
    if N == 0:
        return counts
    C, inner = _layout(weight, scale, axis, group_size)
    m = np.float32(momentum)
    om = np.float32(1.0) - m
    mS = m * np.float32(_FREQ_ONE)
    thF = _f32(freeze_threshold * _FREQ_ONE)
    grid = (triton.cdiv(N, _BLOCK),)
    _osc_kernel[grid](
        weight, scale.contiguous(), offset.contiguous(), meta, ema, counts, N, C, inner,
        float(qmin), float(qmax), float(m), float(om), float(mS), thF,
        FREEZE=freeze_threshold > 0, BLOCK=_BLOCK, enable_fp_fusion=False,
    )
    return counts


def dampening_loss_triton(weight, scale, offset, qmin, qmax, axis, group_size, norm):
    _check("dampening_loss_triton", weight, scale, offset, qmin, qmax, axis, group_size)
    w = weight.contiguous()
    N = w.numel()
    if N == 0:
        return torch.zeros((), dtype=torch.float32, device=w.device)
    C, inner = _layout(w, scale, axis, group_size)
    nblk = triton.cdiv(N, _BLOCK)
    part = torch.empty(nblk, dtype=torch.float32, device=w.device)
    _damp_fwd_kernel[(nblk,)](w, scale.contiguous(), offset.contiguous(), part, N, C, inner, float(qmin), float(qmax),
                              BLOCK=_BLOCK, enable_fp_fusion=False)
    return (part.double().sum() * norm).float()


def dampening_loss_backward_triton(grad, weight, scale, offset, qmin, qmax, axis, group_size, norm):
    op = "dampening_loss_backward_triton"
    _check(op, weight, scale, offset, qmin, qmax, axis, group_size)
    if grad.numel() != 1:
        raise ValueError(f"quantkern.{op}: grad of dampening_loss must hold one element, got shape {list(grad.shape)}")
    w = weight.contiguous()
    gw = torch.empty_like(w)
    N = w.numel()
    if N == 0:
        return gw
    C, inner = _layout(w, scale, axis, group_size)
    nblk = triton.cdiv(N, _BLOCK)
    # one rounding of grad * norm * 2 (in float64, on the device: no host sync), as the CPU and CUDA kernels do
    g2 = (grad.reshape(1).to(device=w.device, dtype=torch.float64) * (2.0 * norm)).float()
    _damp_bwd_kernel[(nblk,)](g2, w, gw, scale.contiguous(), offset.contiguous(), N, C, inner,
                              float(qmin), float(qmax), BLOCK=_BLOCK, enable_fp_fusion=False)
    return gw


_KEYS = ["CUDA"] + (["CPU"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
for _key in _KEYS:
    LIB.impl("oscillation_update_triton", oscillation_update_triton, _key)
    LIB.impl("dampening_loss_triton", dampening_loss_triton, _key)
    LIB.impl("dampening_loss_backward_triton", dampening_loss_backward_triton, _key)
