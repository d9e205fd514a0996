"""ERQ: Error Reduction for post-training Quantization (Zhong et al., ICML 2024).

For one linear layer ``y = x W^T + b`` with quantized activations ``Qa(x)``.
Pure PyTorch (float64 solves), CPU or GPU; vectorised over output rows, the
loop is over Wqer's shrinking column blocks and the refinement iterations.

Notation: ``X [T, K]`` full-precision calibration inputs of the layer,
``Xq = Qa(X)``, ``A = [Xq | 1]`` (the ones column when the layer has a bias,
or ``fit_bias=True``), ``Wc = [W | b]``, ``Y_fp = X W^T + b``.

1. **Aqer** (activation quantization error reduction), a ridge regression:
   ``delta = (A^T A + lambda1 I)^-1 A^T (Y_fp - A Wc^T)``, ``Wc += delta^T``.
   (The official code updates the bias too; so do we.)
2. **Wqer** (weight quantization error reduction), while weight columns remain:
   take the next ``max(1, floor(R / 2))`` columns S (R = remaining columns of
   ``Wc`` counting the bias column), round them to nearest; *rounding
   refinement* per output row: with ``H = mu mu^T + Sigma`` of ``Xq[:, S]``, up to
   ``refine_iters`` (100) iterations of ``g = 2 H delta``, take the entry with the
   largest ``|g|`` among those whose gradient sign matches their error
   (``delta * g > 0``) and flip its rounding (floor <-> ceil); keep the flip only
   if ``delta^T H delta`` falls, else the row stops (batched over rows; the
   quadratic form and the gradient are updated incrementally, O(|S|) per flip).
   Then the remaining full-precision columns R absorb the error by ridge regression:
   ``dW_R = -(A_R^T A_R + lambda2 I)^-1 A_R^T A_S delta_S^T``.

lambda1 / lambda2 are absolute: they compete with ``A^T A``, whose diagonal
grows like ``T * E[x^2]``. The official code uses ~2e3 with ~2e5 calibration
tokens. Measured on all-MiniLM-L6-v2 (per-layer, FP inputs, 2.6K calibration
tokens, per-tensor A4): lambda1 = 1e3 makes the model worse than plain RTN
(embedding cosine 0.36 vs 0.60), lambda1 = 1e5 slightly better (0.62); per-layer
output error and the network's error disagree there, so tune lambda1 on the model.

Weights are quantized group-wise with GPTQ's min-max params; a group's
params are computed when its first column is quantized, on the current
(Aqer- and compensation-updated) weights.

Bugs of the official code (zysxmu/ERQ) that this avoids: the ``IPython.embed()``
left in the no-bias branch, and ``w_error[:, -1] = 0``, which in the no-bias
case leaves the last *weight* column unquantized (it is meant for the bias
column). Here the bias column is never quantized and every weight column is.

``refine_rule="official"`` uses the official update instead of a plain flip:
``v = delta_j - g_j`` moved to the nearer of the floor/ceil errors (ties to
ceil), accepted unless the quadratic form rises; it only flips when
``|g_j|`` exceeds about half a step. The default ``"flip"`` always proposes
the flip and keeps it only if the loss strictly falls.

Both rules (on purpose) skip entries whose floor and ceil coincide (the weight is
clamped at 0 or 2^b - 1, or ``w / s`` is an exact integer). The official code can
select such an entry; its update is then a no-op that does not raise the loss, so
it selects the same entry on every later iteration and that row's refinement stops
there. Apart from this (and float rounding), ``refine_rule="official"`` with
``group_size=None`` reproduces the official Wqer given the same params, inputs and
lambdas; the official code's weight params are a per-row percentile search by
squared error (RepQ-ViT's), not GPTQ's min-max.
"""
from __future__ import annotations

import math

import torch

from ._wquant import check_clip, check_weight_args, minmax_params, quantize_int, refit_scale_zero, search_params
from .calibrate import ActQuantizer

__all__ = ["erq_quantize", "aqer", "act_quantizer_for"]


def act_quantizer_for(X: torch.Tensor, a_bits: int, method: str = "mse_search", symmetric: bool = False, **kwargs) -> ActQuantizer:
    """The per-tensor activation quantizer ERQ uses by default, calibrated on X."""
    return ActQuantizer.from_data(X, a_bits, method, symmetric=symmetric, **kwargs)


def _ridge_solve(G: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """(G + lam I)^-1 rhs for symmetric PSD G (float64), Cholesky with a fallback to lstsq."""
    M = G.clone()
    M.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(M)
    if info.item() == 0:
        return torch.cholesky_solve(rhs, L)
    if M.device.type == "cpu":  # gelsy: rank-revealing, fine for a singular M
        return torch.linalg.lstsq(M, rhs).solution
    # CUDA's lstsq has only gels, which assumes full rank: a singular M (lambda 0) gives garbage there
    return torch.linalg.pinv(M, hermitian=True) @ rhs


def aqer(Wc: torch.Tensor, A: torch.Tensor, Y_fp: torch.Tensor, lambda1: float) -> torch.Tensor:
    """Aqer step: returns ``Wc + ((A^T A + lambda1 I)^-1 A^T (Y_fp - A Wc^T))^T`` (float64 [N, K'])."""
    rhs = A.T @ (Y_fp - A @ Wc.T)
    return Wc + _ridge_solve(A.T @ A, rhs, lambda1).T


def _refine(w, s, z, qr, qf, qc, H, iters: int, rule: str):
    """Rounding refinement for a block, batched over rows.

    w, s, z, qr, qf, qc: [n, m] float64 (weights, scale, zero, round/floor/ceil integers); H [m, m].
    Returns the refined integers [n, m].
    """
    q = qr.clone()
    delta = (q - z) * s - w
    ef, ec = (qf - z) * s - w, (qc - z) * s - w  # errors of floor / ceil
    flippable = qf != qc
    Hd = delta @ H  # [n, m], gradient / 2
    cost = (delta * Hd).sum(1)
    hdiag = torch.diagonal(H)
    active = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    rows = torch.arange(w.shape[0], device=w.device)
    for _ in range(iters):
        if not bool(active.any()):
            break
        grad = 2 * Hd
        cand = (delta * grad > 0) & flippable & active[:, None]
        score = torch.where(cand, grad.abs(), torch.zeros_like(grad))
        best, j = score.max(1)
        has = best > 0
        dj, gj = delta[rows, j], grad[rows, j]
        efj, ecj = ef[rows, j], ec[rows, j]
        if rule == "flip":
            at_floor = q[rows, j] == qf[rows, j]
            new_d = torch.where(at_floor, ecj, efj)
            new_q = torch.where(at_floor, qc[rows, j], qf[rows, j])
        else:  # official: nearest of floor/ceil to the gradient step
            v = dj - gj
            to_ceil = (v - ecj).abs() <= (v - efj).abs()
            new_d = torch.where(to_ceil, ecj, efj)
            new_q = torch.where(to_ceil, qc[rows, j], qf[rows, j])
        ch = new_d - dj
        new_cost = cost + 2 * ch * Hd[rows, j] + ch * ch * hdiag[j]
        ok = has & ((new_cost < cost) if rule == "flip" else ((new_cost <= cost) & (ch != 0)))
        active &= ok
        if not bool(ok.any()):
            break
        chk = torch.where(ok, ch, torch.zeros_like(ch))
        delta[rows, j] += chk
        q[rows, j] = torch.where(ok, new_q, q[rows, j])
        Hd += chk[:, None] * H[j]
        cost = torch.where(ok, new_cost, cost)
    return q


@torch.no_grad()
def erq_quantize(
    W: torch.Tensor,
    b: torch.Tensor | None,
    X_calib: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    a_bits: int = 8,
    lambda1: float = 1e3,
    lambda2: float = 1e3,
    *,
    act_quant=None,
    a_method: str = "mse_search",
    a_symmetric: bool = False,
    use_aqer: bool = True,
    use_wqer: bool = True,
    refine: bool = True,
    refine_iters: int = 100,
    refine_rule: str = "flip",
    fit_bias: bool | None = None,
    sym: bool = False,
    row_chunk: int = 1024,
    relative_lambda: bool = False,
    clip: str = "minmax",
    clip_grid: int = 40,
    clip_max_shrink: float = 0.5,
    refit: bool = False,
):
    """ERQ for one linear layer; see the module docstring.

    Args:
        W: ``[N, K]`` float weight.
        b: ``[N]`` bias or None.
        X_calib: ``[T, K]`` (or ``[..., K]``) full-precision calibration inputs of the layer.
        bits: weight bits (1..8); group_size: divides K, None / -1 = per channel.
        a_bits: activation bits of Qa (per tensor, uniform).
        lambda1, lambda2: ridge strengths of Aqer and of Wqer's compensation
            (absolute: compare with ``diag(A^T A) ~ T * E[x^2]``; the paper's code uses 1e3..2e3
            with ~2e5 calibration tokens).
        act_quant: callable ``x -> Qa(x)`` (e.g. an :class:`ActQuantizer`); default:
            an asymmetric per-tensor quantizer calibrated on X_calib with ``a_method``.
        use_aqer / use_wqer / refine: switch the parts off for ablations (use_wqer=False:
            plain round-to-nearest of the Aqer-updated weights).
        refine_iters, refine_rule: rounding refinement, "flip" (default) or "official".
        fit_bias: add the ones column (and return a bias) even when b is None.
            Default: True when b is given. False with b given: b is kept as it is (the
            returned bias is None; the layer is ``Qa(x) @ Wq^T + b``).
        sym: symmetric weight params.
        row_chunk: output rows per refinement batch (memory bound).
        relative_lambda: lambda1 / lambda2 are multiples of ``mean(diag(Xq^T Xq)) = T * E[x^2]``
            (the scale of the Gram they are added to) instead of absolute values, so one
            setting means the same for any number of tokens and any activation scale.
        clip: group params "minmax" (GPTQ's) or "mse" (``search_params``: least
            ``diag(A^T A)``-weighted squared error over shrinks of the range; float zero).
        refit: after Wqer (or the plain rounding of ``use_wqer=False``), re-fit every group's
            (scale, zero) and the bias by least squares given q (``refit_scale_zero`` with ``Gram = A^T A``, targets ``Y_fp``).

    Returns:
        ``(q uint8 [N, K], scale float32 [N, K // g], zero float32 [N, K // g], new_bias float32 [N] or None)``
        with the layer computed as ``Qa(x) @ ((q - zero) * scale)^T + new_bias``.
    """
    fn = "erq_quantize"
    g = check_weight_args(fn, W, bits, group_size, sym)
    N, K = W.shape
    dev = W.device
    if b is not None:
        if not isinstance(b, torch.Tensor) or b.shape != (N,):
            raise ValueError(f"{fn}: b must be a tensor of shape [N] = [{N}] or None, got {getattr(b, 'shape', type(b).__name__)}")
        if not b.is_floating_point():
            raise TypeError(f"{fn}: b must be a float tensor, got {b.dtype}")
        if b.device != dev:
            raise ValueError(f"{fn}: b is on {b.device} but W is on {dev}")
        if not torch.isfinite(b).all():
            raise ValueError(f"{fn}: b contains NaN or Inf")
    if not isinstance(X_calib, torch.Tensor) or not X_calib.is_floating_point():
        raise TypeError(f"{fn}: X_calib must be a float tensor")
    if X_calib.dim() == 0 or X_calib.shape[-1] != K:
        raise ValueError(f"{fn}: X_calib must have shape [T, K] with K = {K}, got {tuple(X_calib.shape)}")
    if X_calib.device != dev:
        raise ValueError(f"{fn}: X_calib is on {X_calib.device} but W is on {dev}")
    X = X_calib.detach().reshape(-1, K)
    if X.shape[0] == 0:
        raise ValueError(f"{fn}: X_calib has no rows")
    if not torch.isfinite(X).all():
        raise ValueError(f"{fn}: X_calib contains NaN or Inf")
    if isinstance(a_bits, bool) or not isinstance(a_bits, int) or not 2 <= a_bits <= 16:
        raise ValueError(f"{fn}: a_bits must be an int in [2, 16], got {a_bits!r}")
    for name, lam in (("lambda1", lambda1), ("lambda2", lambda2)):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"{fn}: {name} must be a finite float >= 0, got {lam!r}")
    if refine_rule not in ("flip", "official"):
        raise ValueError(f"{fn}: refine_rule must be 'flip' or 'official', got {refine_rule!r}")
    if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
        raise ValueError(f"{fn}: refine_iters must be an int >= 0, got {refine_iters!r}")
    if isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk <= 0:
        raise ValueError(f"{fn}: row_chunk must be a positive int, got {row_chunk!r}")
    check_clip(fn, clip, clip_grid, clip_max_shrink)
    if fit_bias is None:
        fit_bias = b is not None

    f64 = torch.float64
    if act_quant is None:
        act_quant = act_quantizer_for(X.float(), a_bits, a_method, a_symmetric)
    Xq = act_quant(X.float())
    if not isinstance(Xq, torch.Tensor) or not Xq.is_floating_point():
        raise TypeError(f"{fn}: act_quant must return a float tensor, got "
                        f"{Xq.dtype if isinstance(Xq, torch.Tensor) else type(Xq).__name__}")
    if Xq.shape != X.shape:
        raise ValueError(f"{fn}: act_quant changed the shape {tuple(X.shape)} -> {tuple(Xq.shape)}")
    if Xq.device != dev:
        raise ValueError(f"{fn}: act_quant returned a tensor on {Xq.device} but W is on {dev}")
    # NaN / Inf here reached the ridge solves (MKL's lstsq fails with an internal assert there)
    if not bool(torch.isfinite(Xq).all()):
        raise ValueError(f"{fn}: act_quant returned NaN or Inf")
    Xq = Xq.to(f64)
    Wd = W.detach().to(f64)
    bd = b.detach().to(f64) if b is not None else torch.zeros(N, dtype=f64, device=dev)
    ones = torch.ones(X.shape[0], 1, dtype=f64, device=dev)
    A = torch.cat([Xq, ones], 1) if fit_bias else Xq
    cur = torch.cat([Wd, bd[:, None]], 1) if fit_bias else Wd.clone()
    Kc = cur.shape[1]

    if relative_lambda:  # T * E[x^2] of the (quantized) inputs: the scale of diag(A^T A)
        unit = float((Xq * Xq).sum(0).mean())
        lambda1, lambda2 = lambda1 * unit, lambda2 * unit
    # the float output the fit aims at; without a bias column b stays as it is on both sides
    Y_fp = (X.to(f64) @ Wd.T + (bd if fit_bias else 0)) if (use_aqer or refit) else None
    if use_aqer:
        cur = aqer(cur, A, Y_fp, float(lambda1))
    Gram = A.T @ A  # [Kc, Kc]
    gdiag = torch.diagonal(Gram)[:K].float()

    def group_params(wg, c0):  # wg [N, n, g]: the groups starting at column c0
        if clip == "minmax":
            return minmax_params(wg, bits, sym)
        wt = gdiag[c0:c0 + wg.shape[1] * g].reshape(wg.shape[1:]).to(wg.dtype)
        return search_params(wg, bits, sym, weight=wt, grid=clip_grid, max_shrink=clip_max_shrink)

    maxq = 2**bits - 1
    G = K // g
    if not use_wqer:  # round-to-nearest of the (Aqer-updated) weights, no compensation
        s, z = group_params(cur[:, :K].reshape(N, G, g), 0)
        scale, zero = s.to(f64), z.to(f64)
        Q = quantize_int(cur[:, :K].reshape(N, G, g), s[..., None], z[..., None], maxq).reshape(N, K).to(f64)
    else:
        scale = torch.zeros(N, G, dtype=f64, device=dev)
        zero = torch.zeros(N, G, dtype=f64, device=dev)
        Q = torch.zeros(N, K, dtype=f64, device=dev)
        k0 = 0
        groups_done = 0
        while k0 < K:
            R_all = Kc - k0  # remaining columns, the bias column included
            nq = min(max(1, R_all // 2), K - k0)
            k1 = k0 + nq
            # params of the groups this block starts, from the current weights
            g_hi = (k1 - 1) // g + 1
            if g_hi > groups_done:
                wg = cur[:, groups_done * g: g_hi * g].reshape(N, g_hi - groups_done, g)
                s, z = group_params(wg, groups_done * g)
                scale[:, groups_done:g_hi], zero[:, groups_done:g_hi] = s, z
                groups_done = g_hi
            cols = torch.arange(k0, k1, device=dev)
            s = scale[:, cols // g]
            z = zero[:, cols // g]
            w = cur[:, k0:k1]
            qr = quantize_int(w, s, z, maxq)
            if refine and refine_iters > 0:
                xs = Xq[:, k0:k1]
                mu = xs.mean(0)
                cov = torch.cov(xs.T, correction=1 if xs.shape[0] > 1 else 0).reshape(nq, nq)
                Hb = mu[:, None] * mu[None, :] + cov
                qf = quantize_int(w, s, z, maxq, torch.floor)
                qc = quantize_int(w, s, z, maxq, torch.ceil)
                for r0 in range(0, N, row_chunk):
                    r = slice(r0, min(N, r0 + row_chunk))
                    qr[r] = _refine(w[r], s[r], z[r], qr[r], qf[r], qc[r], Hb, refine_iters, refine_rule)
            deq = (qr - z) * s
            delta = deq - w  # [N, nq]
            Q[:, k0:k1] = qr
            cur[:, k0:k1] = deq
            if k1 < Kc:  # compensate with the remaining full-precision columns (and the bias)
                rhs = Gram[k1:, k0:k1] @ delta.T  # [R, N]
                cur[:, k1:] -= _ridge_solve(Gram[k1:, k1:], rhs, float(lambda2)).T
            k0 = k1

    new_bias = cur[:, K] if fit_bias else None
    if refit:
        rhs = (A.T @ Y_fp).T  # [N, Kc]
        scale, zero, new_bias = refit_scale_zero(Q, g, Gram, rhs, scale, zero, new_bias)
    return Q.to(torch.uint8), scale.float(), zero.float(), (new_bias.float() if fit_bias else None)
