"""Reference LSQ / LSQ+ fake quantization (Esser et al. 2020; Bhalgat et al. 2020).

Forward, in fp32 whatever the dtype of x::

    v     = (x - beta) / s
    x_hat = round(clamp(v, n, p)) * s + beta        # round half to even

Backward (straight-through estimator), clip region decided on the unrounded v::

    d x_hat / d x    = 1 if n <= v <= p else 0
    d x_hat / d s    = round(v) - v if n < v < p;  n if v <= n;  p if v >= p
    d x_hat / d beta = 0 if n < v < p else 1

and the gradients of s and beta are summed over the elements that share them,
then multiplied by the LSQ gradient scale g (``grad_scale``; LSQ uses
``1 / sqrt(N * p)`` with N the number of elements per scale).
"""
from __future__ import annotations

import torch


def lsq_param_view(x: torch.Tensor, param: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    """Broadcast ``param`` (fp32) to the shape of ``x``.

    per-tensor: param has one element; per-channel: param is [x.shape[axis]];
    per-group: x is [rows, K], param is [rows, K // group_size].
    """
    if group_size is not None:
        return param.repeat_interleave(group_size, dim=1)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        return param.reshape(shape)
    return param.reshape(())


def fake_quant_lsq(x, scale, offset, qmin: int, qmax: int, axis=None, group_size=None) -> torch.Tensor:
    """x_hat with the dtype and shape of x; see the module docstring."""
    xf = x.float()
    s = lsq_param_view(xf, scale.float(), axis, group_size)
    b = lsq_param_view(xf, offset.float(), axis, group_size)
    v = (xf - b) / s
    q = torch.round(torch.clamp(v, qmin, qmax))
    return (q * s + b).to(x.dtype)


def fake_quant_lsq_backward(grad, x, scale, offset, qmin: int, qmax: int, axis=None, group_size=None, grad_scale=1.0):
    """(grad_x [x.dtype, x.shape], grad_scale [scale.shape, fp32], grad_offset [offset.shape, fp32])."""
    xf, gf = x.float(), grad.float()
    s = lsq_param_view(xf, scale.float(), axis, group_size)
    b = lsq_param_view(xf, offset.float(), axis, group_size)
    v = (xf - b) / s
    lo, hi = v <= qmin, v >= qmax
    inside = (v >= qmin) & (v <= qmax)
    gx = torch.where(inside, gf, torch.zeros_like(gf))
    ds = gf * torch.where(lo, torch.full_like(v, qmin), torch.where(hi, torch.full_like(v, qmax), torch.round(v) - v))
    db = torch.where(lo | hi, gf, torch.zeros_like(gf))
    return gx.to(x.dtype), _reduce_like(ds, scale, axis, group_size) * grad_scale, _reduce_like(db, offset, axis, group_size) * grad_scale


def _reduce_like(t: torch.Tensor, param: torch.Tensor, axis, group_size) -> torch.Tensor:
    """Sum the per-element terms t over the elements that share each parameter."""
    if group_size is not None:
        return t.reshape(t.shape[0], t.shape[1] // group_size, group_size).sum(-1).reshape(param.shape)  # (-1: ambiguous for 0 rows)
    if axis is not None:
        axis = axis % t.dim()  # a negative axis (as lsq_param_view accepts) names the same dim
        dims = [d for d in range(t.dim()) if d != axis]
        return (t.sum(dims) if dims else t).reshape(param.shape)
    return t.sum().reshape(param.shape)
