"""Triton LSQ / LSQ+ fake quantization: ``quantkern::fake_quant_lsq_triton`` and its fused backward.

Same math as ``csrc/shared/fake_quant_lsq.h`` and ``quantkern/reference/fake_quant_lsq.py``,
bit for bit in the forward and in grad_x:

    v     = (x - beta) / s                    IEEE division (tl.div_rn; Triton's ``/`` is
                                              div.full.f32 on NVIDIA, up to 2 ulp off)
    x_hat = rint(clamp(v, n, p)) * s + beta   round half to even, then a separate multiply
                                              and add (kernels launch with enable_fp_fusion=False)

all in fp32 whatever the dtype of x; results are cast back to x's dtype with round to
nearest even (bf16 by hand, see _cast_out).

Layout (as in csrc/shared/layout.h): contiguous x is viewed as ``[outer, C, inner]`` and
element (o, c, i) uses parameter c. Per-tensor: {1, 1, numel}; per-channel on axis a:
{prod(shape[:a]), shape[a], prod(shape[a+1:])}; per-group on [rows, K], group g:
{1, rows * K / g, g}. Every program owns one 3-D tile ``[BO, BC, BI]`` (a block of outer
rows x a block of channels x a segment of the inner dimension), the same tiling as the CPU
kernel's plan.

Backward: one fused pass writes grad_x and, per tile, the fp32 partial sums of the scale and
offset terms over its outer rows and inner segment into ``partials[slot, c]`` with
``slot = ob * n_ib + ib`` (every (slot, c) written by exactly one program, no atomics). A
second kernel sums the slots in a fixed order and multiplies by grad_scale, so the result
is deterministic. When there is a single slot the first kernel writes the result directly.

Registered for CUDA, and for CPU when TRITON_INTERPRET=1 (testing under the interpreter).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from quantkern import _registry  # noqa: F401  (defines the quantkern::*_triton schemas)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

BLOCK = 4096  # elements per program tile
NUM_WARPS = 8
RED_BLOCK = 2048  # partial-sum elements per step of the final reduction


# ------------------------------------------------------------------ device code
@triton.jit
def _rint(v):
    """Round half to even, exact for every fp32 (libdevice rint is unavailable in the interpreter).

    For |v| < 2^23, adding +-2^23 (same sign as v) lands in a binade with ulp 1, so the
    IEEE round-to-nearest-even addition rounds v to an integer and the subtraction is
    exact. |v| >= 2^23 is already an integer (inf too); NaN stays NaN. The sign of a zero
    result is restored from v (rint(-0.3) = -0.0), as torch.round and rint give.
    Needs no reassociation (Triton never sets fast-math flags) and has no multiply-add.
    """
    t = tl.where(v < 0.0, -8388608.0, 8388608.0)
    r = (v + t) - t
    r = tl.where(tl.abs(v) < 8388608.0, r, v)
    return tl.where(r == 0.0, v * 0.0, r)


@triton.jit
def _cast_out(y, dtype: tl.constexpr):
    """fp32 -> dtype, round to nearest even, as torch's ``.to(dtype)``.

    bf16 is rounded by hand: Triton's own fp32 -> bf16 cast is RNE on GPU but truncates
    under the interpreter, and this formula is exact on both. NaN -> 0x7FC0, as in c10.
    """
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.jit
def _tile(pid, outer, C, inner, n_cb, n_ib, BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr):
    ib = pid % n_ib
    cb = (pid // n_ib) % n_cb
    ob = pid // (n_ib * n_cb)
    o = ob.to(tl.int64) * BO + tl.arange(0, BO)
    c = cb.to(tl.int64) * BC + tl.arange(0, BC)  # int64: C reaches 2^31 per group with a small group_size
    i = ib.to(tl.int64) * BI + tl.arange(0, BI)
    cmask = c < C
    if BI == 1:  # inner == 1 (channel-last): spelled out so the compiler sees c as the contiguous axis
        offs = (o[:, None] * C + c[None, :])[:, :, None]
        mask = ((o < outer)[:, None] & cmask[None, :])[:, :, None]
    else:
        offs = (o[:, None, None] * C + c[None, :, None]) * inner + i[None, None, :]
        mask = (o < outer)[:, None, None] & cmask[None, :, None] & (i < inner)[None, None, :]
    return c, cmask, offs, mask, ob * n_ib + ib


@triton.jit
def _lsq_fwd_kernel(
    x_ptr, y_ptr, s_ptr, b_ptr,
    outer, C, inner, n_cb, n_ib, qn, qp,
    BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr,
):
    c, cmask, offs, mask, _slot = _tile(tl.program_id(0), outer, C, inner, n_cb, n_ib, BO, BC, BI)
    s = tl.load(s_ptr + c, mask=cmask, other=1.0)[None, :, None]
    b = tl.load(b_ptr + c, mask=cmask, other=0.0)[None, :, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x - b, s)
    v = tl.minimum(tl.maximum(v, qn, propagate_nan=tl.PropagateNan.ALL), qp, propagate_nan=tl.PropagateNan.ALL)
    y = _rint(v) * s + b
    tl.store(y_ptr + offs, _cast_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_bwd_kernel(
    g_ptr, x_ptr, gx_ptr, s_ptr, b_ptr, ps_ptr, pb_ptr,
    outer, C, inner, n_cb, n_ib, qn, qp, gscale,
    BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr, FINAL: tl.constexpr,
):
    c, cmask, offs, mask, slot = _tile(tl.program_id(0), outer, C, inner, n_cb, n_ib, BO, BC, BI)
    s = tl.load(s_ptr + c, mask=cmask, other=1.0)[None, :, None]
    b = tl.load(b_ptr + c, mask=cmask, other=0.0)[None, :, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x - b, s)
    lo = v <= qn
    hi = v >= qp
    inside = (v >= qn) & (v <= qp)
    gx = tl.where(inside, g, 0.0)
    tl.store(gx_ptr + offs, _cast_out(gx, gx_ptr.dtype.element_ty), mask=mask)
    ds = g * tl.where(lo, qn, tl.where(hi, qp, _rint(v) - v))
    db = tl.where(lo | hi, g, 0.0)
    ds = tl.where(mask, ds, 0.0)
    db = tl.where(mask, db, 0.0)
    ps = tl.sum(tl.sum(ds, axis=2), axis=0)
    pb = tl.sum(tl.sum(db, axis=2), axis=0)
    if FINAL:  # a single slot: these are the final sums
        tl.store(ps_ptr + c, ps * gscale, mask=cmask)
        tl.store(pb_ptr + c, pb * gscale, mask=cmask)
    else:
        base = slot.to(tl.int64) * C
        tl.store(ps_ptr + base + c, ps, mask=cmask)
        tl.store(pb_ptr + base + c, pb, mask=cmask)


@triton.jit
def _lsq_reduce_kernel(
    ps_ptr, pb_ptr, gs_ptr, gb_ptr, C, nslots, gscale,
    BS: tl.constexpr, BC: tl.constexpr,
):
    # Sums partials[:, c] over the slots in a fixed order (per lane, then a fixed tree).
    c = tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    cmask = c < C
    acc_s = tl.zeros([BS, BC], dtype=tl.float32)
    acc_b = tl.zeros([BS, BC], dtype=tl.float32)
    for k0 in range(0, nslots, BS):
        k = k0 + tl.arange(0, BS)
        m = (k < nslots)[:, None] & cmask[None, :]
        offs = k.to(tl.int64)[:, None] * C + c[None, :]
        acc_s += tl.load(ps_ptr + offs, mask=m, other=0.0)
        acc_b += tl.load(pb_ptr + offs, mask=m, other=0.0)
    tl.store(gs_ptr + c, tl.sum(acc_s, axis=0) * gscale, mask=cmask)
    tl.store(gb_ptr + c, tl.sum(acc_b, axis=0) * gscale, mask=cmask)


# ------------------------------------------------------------------ host code
def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _plan(outer: int, C: int, inner: int):
    """Tile [BO, BC, BI] (powers of two, BO*BC*BI <= BLOCK) and the grid, as in csrc/cpu/fake_quant_lsq.cpp.

    Channel blocks keep at least min(outer, 64) outer rows per tile, so the partial-sum
    buffer ([nob * n_ib, C]) stays around 1/64 of x or smaller.
    """
    BI = min(_np2(inner), BLOCK)
    bo_min = min(_np2(outer), 64)
    BC = max(1, min(_np2(C), BLOCK // (BI * bo_min)))
    BO = max(1, min(_np2(outer), BLOCK // (BI * BC)))
    nob, n_cb, n_ib = triton.cdiv(outer, BO), triton.cdiv(C, BC), triton.cdiv(inner, BI)
    return BO, BC, BI, nob, n_cb, n_ib


def check_layout(op, x, scale, offset, qmin, qmax, axis, group_size, negative_axis=True):
    """The argument checks of the native ops (csrc/cpu/checks.h ``lsq_layout``), with messages naming
    the argument; returns the layout ``(outer, C, inner)``. torch.ops.quantkern.*_triton callers bypass
    quantkern/ops.py, and a scale of the wrong size would be read out of bounds on the GPU.

    Scale *values* are not checked, as in the CUDA kernel: reading them would synchronise the host
    with the GPU on every training step (README: "On GPU the scale values are not checked").
    ``negative_axis``: accept ``-x.dim() <= axis < 0`` (fake_quant_lsq_triton always did).
    """
    from quantkern.ops import _check_tensor

    _check_tensor(op, "x", x, _FLOATS)
    _check_tensor(op, "scale", scale, (torch.float32,), x.device)
    _check_tensor(op, "offset", offset, (torch.float32,), x.device)
    if not qmin < qmax:
        raise ValueError(f"quantkern.{op}: qmin ({qmin}) must be < qmax ({qmax})")
    # The grid is applied in fp32: a bound beyond 2^24 is not an exact float and would be moved
    # silently (as quantkern.ops._check_qparams and csrc/cpu/checks.h refuse it)
    if not -(1 << 24) <= qmin < qmax <= 1 << 24:
        raise ValueError(f"quantkern.{op}: qmin and qmax must lie in [-2^24, 2^24] (fp32-exact integers), got {qmin}, {qmax}")
    if offset.shape != scale.shape:
        raise ValueError(f"quantkern.{op}: offset shape {tuple(offset.shape)} must equal scale shape {tuple(scale.shape)}")
    if group_size is not None and axis is not None:
        raise ValueError(f"quantkern.{op}: pass either axis or group_size, not both (got axis {axis}, group_size {group_size})")
    if group_size is not None:
        if x.dim() != 2:
            raise ValueError(f"quantkern.{op}: per-group x must be 2-D [rows, K], got shape {tuple(x.shape)}")
        if group_size <= 0 or x.shape[1] % group_size:
            raise ValueError(f"quantkern.{op}: group_size {group_size} must divide K = {x.shape[1]}")
        want = (x.shape[0], x.shape[1] // group_size)
        if tuple(scale.shape) != want:
            raise ValueError(f"quantkern.{op}: per-group scale must be {list(want)}, got {list(scale.shape)}")
        return 1, want[0] * want[1], group_size
    if axis is not None:
        lo = -x.dim() if negative_axis else 0
        if not lo <= axis < x.dim():
            raise ValueError(f"quantkern.{op}: axis {axis} out of range for x of dim {x.dim()}")
        axis = axis % x.dim()
        if scale.dim() != 1 or scale.shape[0] != x.shape[axis]:
            raise ValueError(f"quantkern.{op}: per-channel scale must be 1-D of length x.shape[{axis}] = "
                             f"{x.shape[axis]}, got {list(scale.shape)}")
        return math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])
    if scale.numel() != 1:
        raise ValueError(f"quantkern.{op}: per-tensor scale must hold one element, got shape {list(scale.shape)} "
                         "(pass axis= or group_size= for finer granularity)")
    return 1, 1, x.numel()


def check_qparam_values(op, scale, offset) -> None:
    """The native ops' value checks (csrc/cpu/checks.h ``check_qparam_values``): scale positive and
    finite, offset finite. Reads the values on the host (a synchronisation on a GPU)."""
    if scale.numel() and not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"quantkern.{op}: scale must be positive and finite")
    if offset is not None and offset.numel() and not bool(torch.isfinite(offset).all()):
        raise ValueError(f"quantkern.{op}: offset must be finite")


def _check(x, scale, offset, qmin, qmax, axis, group_size, op="fake_quant_lsq_triton"):
    layout = check_layout(op, x, scale, offset, qmin, qmax, axis, group_size)
    if scale.device.type == "cpu":  # (the interpreter) as the native CPU op; a GPU would need a host sync
        check_qparam_values(op, scale, offset)
    return layout


def fake_quant_lsq_triton(x, scale, offset, qmin, qmax, axis=None, group_size=None, grad_scale=1.0):
    outer, C, inner = _check(x, scale, offset, qmin, qmax, axis, group_size)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    s, b = scale.contiguous(), offset.contiguous()
    BO, BC, BI, nob, n_cb, n_ib = _plan(outer, C, inner)
    _lsq_fwd_kernel[(nob * n_cb * n_ib,)](
        x, y, s, b, outer, C, inner, n_cb, n_ib, float(qmin), float(qmax),
        BO=BO, BC=BC, BI=BI, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return y


def fake_quant_lsq_backward_triton(grad, x, scale, offset, qmin, qmax, axis, group_size, grad_scale):
    op = "fake_quant_lsq_backward_triton"
    outer, C, inner = _check(x, scale, offset, qmin, qmax, axis, group_size, op)
    if grad.dtype != x.dtype or grad.shape != x.shape or grad.device != x.device:
        raise ValueError(f"quantkern.{op}: grad ({grad.dtype}, {list(grad.shape)}, {grad.device}) must have the dtype, "
                         f"shape and device of x ({x.dtype}, {list(x.shape)}, {x.device})")
    x, grad = x.contiguous(), grad.contiguous()
    s, b = scale.contiguous(), offset.contiguous()
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    gs = torch.empty_like(s, memory_format=torch.contiguous_format)
    gb = torch.empty_like(b, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return gx, gs.zero_(), gb.zero_()
    BO, BC, BI, nob, n_cb, n_ib = _plan(outer, C, inner)
    nslots = nob * n_ib
    final = nslots == 1
    if final:
        ps, pb = gs, gb
    else:
        ps = torch.empty((nslots, C), dtype=torch.float32, device=x.device)
        pb = torch.empty((nslots, C), dtype=torch.float32, device=x.device)
    gscale = float(grad_scale)
    _lsq_bwd_kernel[(nob * n_cb * n_ib,)](
        grad, x, gx, s, b, ps, pb, outer, C, inner, n_cb, n_ib, float(qmin), float(qmax), gscale,
        BO=BO, BC=BC, BI=BI, FINAL=final, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    if not final:
        rbc = min(_np2(C), 64)
        rbs = max(1, min(_np2(nslots), RED_BLOCK // rbc))
        _lsq_reduce_kernel[(triton.cdiv(C, rbc),)](
            ps, pb, gs, gb, C, nslots, gscale, BS=rbs, BC=rbc, num_warps=4, enable_fp_fusion=False,
        )
    return gx, gs, gb


# ------------------------------------------------------------------ registration
_DEVICES = ("CUDA", "CPU") if _INTERPRET else ("CUDA",)
for _dev in _DEVICES:
    torch.library.impl("quantkern::fake_quant_lsq_triton", _dev)(fake_quant_lsq_triton)
    torch.library.impl("quantkern::fake_quant_lsq_backward_triton", _dev)(fake_quant_lsq_backward_triton)
