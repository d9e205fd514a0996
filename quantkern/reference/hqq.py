"""Reference HQQ solver (Badri & Shaji 2023; official code dropbox/hqq, formerly
mobiusml/hqq, ``hqq/core/optimize.py::optimize_weights_proximal_legacy``, the
default ``optimize_weights_proximal``) in plain PyTorch, fp32, CPU.

Layout. W is ``[N, K]``; ``group_size = g`` must divide K.

* ``axis=1``: groups are contiguous along K: the rows of ``W.reshape(-1, g)``.
  Group j covers ``W.flatten()[j*g : (j+1)*g]`` and its scale/zero sit at
  ``scale[n, k // g]`` (the layout fast kernels want).
* ``axis=0`` (hqq's other option): the columns of ``W.reshape(g, -1)``: with
  ``M = N*K/g`` groups, group j covers ``W.flatten()[j::M]`` (strided). Its
  scale/zero are ``scale.flatten()[j]``; they are still returned as
  ``[N, K // g]`` (same count), so use :func:`hqq_dequantize` to dequantize.

Algorithm, exactly as the official code runs it (fp32 on CPU):

1. Min-max init, with an *inverse* scale ``s``::

       s = (2^b - 1) / (max - min);  s = 1 where (max - min) <= 1e-4;  s = min(s, 2e4)
       z = -min * s

2. Up to ``iters`` iterations (beta_i = beta * kappa^i)::

       q   = clamp(round(W*s + z), 0, 2^b - 1)          # round half to even
       Wr  = (q - z) / s
       We  = shrink_lp(W - Wr, beta_i)                  # sign(x) relu(|x| - |x|^(p-1) / beta_i)
       z   = mean_group(q - (W - We) * s)
       err = mean_all(|W - Wr|)                         # over the WHOLE tensor
       if not err < best: break                         # first non-improvement stops
       best = err

   Note the order: the error checked at iteration i is that of the zero *used*
   in iteration i, but the zero has already been updated when the loop
   breaks, so the official code returns the zero computed in the failing
   iteration (two updates past the best one), not the best zero.

3. ``q = clamp(round(W*s + z), 0, 2^b - 1)`` with the final z; returned scale
   is ``1 / s`` (fp32), so ``W ~= (q - zero) * scale``.

Versions. hqq 0.2.8.post1 (PyPI) never multiplies beta by kappa (kappa is
read and ignored); the repository's code anneals ``beta *= kappa`` every
iteration (before the error check; that placement cannot change the result).
We anneal; ``kappa=1.0`` reproduces hqq 0.2.8 group for group. hqq 0.2.8
starts ``best`` at +inf, older releases at 1e4 (differs only when the mean
error exceeds 1e4); we use +inf.

``early_stop`` selects the stopping rule:

* ``"global"`` (default): the official rule above.
* ``"group"``: a per-group variant (what a fully fused kernel can do without a
  global reduction): each group stops at its own first non-improving
  iteration (its mean |W - Wr| over the group) and keeps the zero that gave
  its best error; a group that never stops returns its last zero, as the
  official code does. Never a larger error per group than "global" up to its
  stop, and usually a slightly lower one overall.
* ``"none"``: always run ``iters`` iterations (hqq's ``optimize_weights_proximal_slow``
  uses this with 100 iterations).

``order`` selects how the floats are summed:

* ``"torch"``: the official code's own ops (``torch.mean``, ``torch.pow``):
  what hqq computes.
* ``"kernel"``: the exact arithmetic of quantkern's kernels (CPU, CUDA and
  Triton), written as torch ops: a group's sums are two sequential fp32 sums
  (even and odd elements) added at the end; the global error is each group's
  fp32 sum, summed in fp64, divided by numel and rounded to fp32;
  ``|x|^(p-1)`` is the polynomial :func:`pow_poly`, and the shrink is skipped
  (exactly 0) below the threshold where it is provably 0. The kernels match
  this bit for bit; it differs from ``"torch"`` only by float summation order
  (the last bits of each zero) and the pow's last bits.
"""
from __future__ import annotations

import math

import torch

EARLY_STOP_MODES = ("global", "group", "none")
SUPPORTED_BITS = (1, 2, 3, 4, 8)


# ----------------------------------------------------------------- layout
def group_view(W: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """fp32 view of W with one group per row (axis=1, ``[M, g]``) or per column (axis=0, ``[g, M]``)."""
    Wf = W.float().contiguous()
    return Wf.reshape(-1, group_size) if axis == 1 else Wf.reshape(group_size, -1)


def hqq_init(Wg: torch.Tensor, bits: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max init on a group view: (inverse scale s, zero z), keepdim shapes, fp32."""
    qmax = 2**bits - 1
    mn = Wg.amin(axis, keepdim=True)
    mx = Wg.amax(axis, keepdim=True)
    denom = mx - mn
    s = qmax / denom
    s = torch.where(denom.abs() <= 1e-4, torch.full_like(s, 1.0), s)
    s = s.clamp(max=2e4)
    z = -mn * s
    return s, z


def quantize_q(Wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    """q = clamp(round(W*s + z), 0, qmax) as fp32 (half to even, two roundings)."""
    return torch.round(Wg * s + z).clamp(0, qmax)


# ------------------------------------------------------------- shrinking
def inv_beta(beta: float) -> float:
    """1 / beta in double, inf once beta_i = beta * kappa^i has underflowed to 0 (kappa < 1, many
    iterations): the kernels' c = fp32(1 / beta_i), where 1 / 0 is inf; Python raised ZeroDivisionError."""
    return 1.0 / beta if beta != 0 else math.inf


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """The official shrink: sign(x) * relu(|x| - |x|^(p-1) / beta) (in-place op order of hqq 0.2.8)."""
    out = torch.abs(x)
    if lp_norm == 1:
        out.sub_(inv_beta(beta)).clamp_min_(0.0)
    else:
        out.sub_(inv_beta(beta) * out.pow(lp_norm - 1)).clamp_min_(0.0)
    out.mul_(torch.sign(x))
    return out


SQRT2_F = 1.41421353816986083984375  # float32(sqrt(2))
LOG2E_F = 1.44269502162933349609375  # float32(log2(e))
LN2_F = 0.693147182464599609375  # float32(ln 2)
# 2 atanh(t) = 2t (1 + t^2/3 + t^4/5 + t^6/7 + t^8/9); e^u Taylor to u^7.
LOG_COEFFS = (1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0)
EXP_COEFFS = (1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0)


def pow_poly(a: torch.Tensor, y: float) -> torch.Tensor:
    """``a ** y`` for fp32 ``a`` normal and positive, as the kernels compute it (csrc/shared/hqq.h).

    ``a = m 2^e`` with m in [sqrt(1/2), sqrt(2)); ``l = log2 m = 2 atanh((m-1)/(m+1)) log2(e)``;
    ``v = y log2 a`` is kept as ``big + small`` with ``big = yh e`` exact (y split
    into 12 + 12 bits), ``n = rint(v)``, ``2^v = e^(((big - n) + small) ln 2) 2^n``.
    Every step is one fp32 op (no fused multiply-add); at most 2 ulp from the
    exact power.
    """
    f32 = torch.float32
    c = lambda v: torch.tensor(v, dtype=f32)  # noqa: E731  (fp32 constants, rounded once)
    bits = a.view(torch.int32)
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(f32)
    e = ((bits >> 23) - 127).to(f32)
    big = m > c(SQRT2_F)
    m = torch.where(big, m * c(0.5), m)
    e = torch.where(big, e + c(1.0), e)
    t = (m - c(1.0)) / (m + c(1.0))
    t2 = t * t
    p = torch.full_like(t, LOG_COEFFS[0])
    for k in LOG_COEFFS[1:]:
        p = p * t2 + c(k)
    lnm = (t * p) * c(2.0)
    lg = lnm * c(LOG2E_F)
    y32 = c(float(torch.tensor(y, dtype=f32)))
    cy = y32 * c(4097.0)
    yh = cy - (cy - y32)  # 12 significant bits: yh * e is exact
    yl = y32 - yh
    big = yh * e
    small = yl * e + y32 * lg
    n = torch.round(big + small).clamp(-126.0, 126.0)
    u = ((big - n) + small) * c(LN2_F)
    p = torch.full_like(u, EXP_COEFFS[0])
    for k in EXP_COEFFS[1:]:
        p = p * u + c(k)
    two_n = ((n.to(torch.int32) + 127) << 23).view(f32)
    return p * two_n


def shrink_threshold(c: float, lp_norm: float) -> float:
    """fp32 bound below which ``|x| - c |x|^(p-1)`` is negative with a 1e-4 relative margin,
    so the shrink is exactly 0 however the power is rounded (c = fp32(1/beta))."""
    t = c ** (1.0 / (2.0 - lp_norm)) * (1.0 - 1e-4)
    return float(torch.tensor(max(t, 1.1754943508222875e-38), dtype=torch.float32))


def shrink_kernel(x: torch.Tensor, c: float, lp_norm: float, thr: float) -> torch.Tensor:
    """The kernels' shrink: same values as :func:`shrink_lp` up to the pow's last bits;
    exactly 0 where ``|x| < thr``."""
    a = torch.abs(x)
    small = a < thr
    if lp_norm == 1:
        pw = torch.ones_like(a)
    else:
        pw = pow_poly(torch.where(small, torch.ones_like(a), a), lp_norm - 1)
    r = (a - torch.tensor(c, dtype=torch.float32) * pw).clamp_min(0.0)
    r = torch.where(small, torch.zeros_like(r), r)
    return torch.where(x < 0, -r, r)


def group_sum_kernel_order(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum over each group as the kernels do: sequential fp32 sums of the even and of
    the odd elements, then their sum. keepdim shape."""
    tt = t if axis == 0 else t.t()  # [g, M]: row i = element i of every group
    g = tt.shape[0]
    s0 = torch.zeros_like(tt[0])
    s1 = torch.zeros_like(tt[0])
    for i in range(0, g, 2):
        s0 = s0 + tt[i]
        if i + 1 < g:
            s1 = s1 + tt[i + 1]
    s = s0 + s1
    return s.unsqueeze(0) if axis == 0 else s.unsqueeze(1)


# ------------------------------------------------------------------ solver
def _betas(beta: float, kappa: float, iters: int) -> list[float]:
    out, b = [], float(beta)
    for _ in range(iters):
        out.append(b)
        b *= kappa
    return out


@torch.no_grad()
def hqq_solve_groups(
    Wg: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    bits: int,
    axis: int,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: str = "global",
    order: str = "torch",
) -> tuple[torch.Tensor, int]:
    """Optimise the zeros of a group view; returns (zero, number of zero updates applied)."""
    if early_stop not in EARLY_STOP_MODES:
        raise ValueError(f"early_stop must be one of {EARLY_STOP_MODES}, got {early_stop!r}")
    if order not in ("torch", "kernel"):
        raise ValueError(f"order must be 'torch' or 'kernel', got {order!r}")
    qmax = 2**bits - 1
    g = Wg.shape[axis]
    kern = order == "kernel"
    gmean = (lambda t: group_sum_kernel_order(t, axis) / g) if kern else (lambda t: torch.mean(t, axis=axis, keepdim=True))
    best = torch.tensor(math.inf, dtype=torch.float32)
    best_g = torch.full_like(z, math.inf)
    active = torch.ones_like(z, dtype=torch.bool)
    z_best = z.clone()
    updates = 0
    for i, b in enumerate(_betas(beta, kappa, iters)):
        Wq = quantize_q(Wg, s, z, qmax)
        Wr = (Wq - z) / s
        if kern:
            c = float(torch.tensor(inv_beta(b), dtype=torch.float32))
            We = shrink_kernel(Wg - Wr, c, lp_norm, shrink_threshold(c, lp_norm))
        else:
            We = shrink_lp(Wg - Wr, b, lp_norm)
        z_new = gmean(Wq - (Wg - We) * s)
        if early_stop == "global":
            if kern:
                gsum = group_sum_kernel_order(torch.abs(Wg - Wr), axis)
                err = (gsum.double().sum() / Wg.numel()).float()
            else:
                err = torch.abs(Wg - Wr).mean().float()
            z = z_new
            updates += 1
            if err < best:
                best = err
            else:
                break
        elif early_stop == "group":
            if kern:
                e = group_sum_kernel_order(torch.abs(Wg - Wr), axis) / g
            else:
                e = torch.abs(Wg - Wr).mean(axis=axis, keepdim=True)
            improved = active & (e < best_g)
            active = improved
            best_g = torch.where(improved, e, best_g)
            z_best = torch.where(improved, z, z_best)
            z = torch.where(improved, z_new, z)
            updates += 1
            if not bool(active.any()):
                break
        else:
            z = z_new
            updates += 1
    if early_stop == "group":
        z = torch.where(active, z, z_best)
    return z, updates


@torch.no_grad()
def hqq_quantize(
    W: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int = 1,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: str = "global",
    order: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ of a 2-D weight W [N, K] (any float dtype; computed in fp32).

    Returns ``(q uint8 [N, K], scale fp32 [N, K // g], zero fp32 [N, K // g])`` with
    ``W ~= (q - zero) * scale`` per group (see the module docstring for the
    group layout of ``axis=0``). ``iters=0`` is round-to-nearest with the min-max init.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [N, K], got shape {tuple(W.shape)}")
    N, K = W.shape
    if K % group_size:
        raise ValueError(f"group_size {group_size} must divide K = {K}")
    qmax = 2**bits - 1
    Wg = group_view(W, group_size, axis)
    s, z = hqq_init(Wg, bits, axis)
    if iters > 0:
        z, _ = hqq_solve_groups(Wg, s, z, bits, axis, lp_norm, beta, kappa, iters, early_stop, order)
    q = quantize_q(Wg, s, z, qmax).to(torch.uint8).reshape(N, K)
    scale = (1.0 / s).reshape(N, K // group_size)
    return q, scale, z.reshape(N, K // group_size)


def hqq_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, axis: int = 1) -> torch.Tensor:
    """fp32 ``(q - zero) * scale`` for either group layout; shape of q."""
    N, K = q.shape
    if axis == 1:
        qg = q.float().reshape(-1, group_size)
        return ((qg - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(N, K)
    qg = q.float().reshape(group_size, -1)
    return ((qg - zero.reshape(1, -1)) * scale.reshape(1, -1)).reshape(N, K)


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int, axis: int = 1):
    """Round to nearest with the min-max init (HQQ with 0 iterations)."""
    return hqq_quantize(W, bits, group_size, axis=axis, iters=0)
