"""Affine fake quantization ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` as one fused pass.

The activation quantizers (``nn.packed_linear.fake_quant_input``, ``ptq.calibrate.fake_quant``)
define their output with a dozen elementwise torch ops. Where no gradient is taken, the same fp32
values come from one ``fake_quant_lsq`` pass with no offset and the bounds shifted by z:
``round(clamp(x / s, qmin - z, qmax - z)) * s + 0``. For an integer z the rounded value is an
integer either way, so clamping before or after rounding agrees with integer bounds; a -0 comes
out +0 in both; +-inf saturates and NaN stays NaN in both (tests/test_packed_act.py checks the
bits). The gradients differ (fake_quant_lsq clips on the unrounded value), hence no autograd.
Measured on MiniLM's W4A8 encode (2 threads, static ranges): the composite form took a third of
the time; 2000x1536 fp32 0.28 ms against 9.6 ms.
"""
from __future__ import annotations

import math

import torch

from . import ops

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def one_pass(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int,
             axis: int | None = None) -> torch.Tensor | None:
    """The fake-quantized x (x's shape and dtype, contiguous), or None where the fused pass does
    not apply and the caller's composite form must run.

    x: fp32 / fp16 / bf16 on the CPU, contiguous, at least 1-D. scale: float32, one element (per tensor), or
    ``[x.shape[axis]]`` with ``axis`` (per channel). zero: one element, or as many as scale, or
    None (0). Applies in eager mode only (the bounds are host ints read from zero; the range is
    read on the host too: free on the CPU, a sync on a GPU, and torch.compile fuses the
    composite form anyway), outside torch.func transforms, with no gradient taken (of x, scale or
    zero), every scale finite and > 0, and zero
    integer-valued: per tensor any such z, per channel only z = 0 (one pair of bounds per call).
    """
    if not one_pass_applies(x) or not qmin < qmax:  # (fake_quant_lsq needs a grid of two or more values)
        return None
    if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.device.type == "cpu"):
        return None
    if zero is not None and not (isinstance(zero, torch.Tensor) and zero.device.type == "cpu"):
        return None
    # a range that takes a gradient (a learnable scale): the composite form's gradient, not fake_quant_lsq's
    if torch.is_grad_enabled() and (scale.requires_grad or (zero is not None and zero.requires_grad)):
        return None
    if not bool(((scale > 0) & (scale < math.inf)).all()):  # a zero / inf / NaN range: the composite's rules
        return None
    if axis is None:
        if scale.numel() != 1 or (zero is not None and zero.numel() != 1):
            return None
        z = 0.0 if zero is None else float(zero)
        if not (math.isfinite(z) and z == round(z) and -(1 << 24) <= qmin - z and qmax - z <= 1 << 24):
            return None  # (fake_quant_lsq's grid: fp32-exact integers)
        return ops.fake_quant_lsq(x, scale.reshape(()), None, qmin - int(z), qmax - int(z))
    if (zero is not None and bool((zero != 0).any())) or not -(1 << 24) <= qmin < qmax <= 1 << 24:
        return None
    return ops.fake_quant_lsq(x, scale.reshape(-1), None, qmin, qmax, axis=axis)


def one_pass_applies(x: torch.Tensor) -> bool:
    """x's part of :func:`one_pass`'s conditions (eager, outside torch.func transforms, CPU, fp32 /
    fp16 / bf16, contiguous (the composite form keeps x's layout, e.g. channels_last), >= 1-D, no
    gradient taken), for callers that compute a range from x first."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() > 0 and x.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())  # (vmap: a host bool() of a batched range)
