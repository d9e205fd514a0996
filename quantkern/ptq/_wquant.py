"""Group-wise weight quantization helpers shared by GPTQ and ERQ.

Convention (the same as ``rtn_quantize`` / ``hqq_quantize``): for ``W [N, K]``
and group size ``g`` (groups contiguous along K),
``q`` uint8 ``[N, K]`` in ``[0, 2^bits - 1]``, ``scale`` and ``zero`` float32
``[N, K // g]`` and ``W ~= (q - zero) * scale`` (zero broadcast over its group).
"""
from __future__ import annotations

import torch


def check_weight_args(fn: str, W, bits, group_size, sym: bool = False) -> int:
    """Validate W [N, K] / bits / group_size (and bits >= 2 when ``sym``); returns the effective
    group size (K for None / -1)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{fn}: W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{fn}: W must be 2-D [N, K], got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{fn}: W must be a float tensor, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{fn}: W is empty (shape {tuple(W.shape)})")
    if not torch.isfinite(W).all():
        raise ValueError(f"{fn}: W contains NaN or Inf")
    # params and outputs are float32: a group range (max - min) past float32's max (a float64 W
    # beyond it, or |W| >= 2^127) made scale inf and every dequantized weight NaN, without a word
    amax = float(W.detach().abs().max())
    if amax >= 2.0**127:
        raise ValueError(f"{fn}: W has values up to {amax:.3g} in magnitude; they must be below 2^127 "
                         "(~1.7e38) so that a group's float32 range max - min stays finite")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in [1, 8], got {bits!r}")
    if sym and bits < 2:  # the symmetric 1-bit grid is {-2 max|w|, 0}: every weight in (-max|w|, max|w|] became 0
        raise ValueError(f"{fn}: sym=True needs bits >= 2 (the symmetric 1-bit grid holds only -2 max|w| and 0), "
                         f"got bits={bits}; use sym=False")
    K = W.shape[1]
    if group_size is None or group_size == -1:
        return K
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{fn}: group_size must be a positive int, -1 or None, got {group_size!r}")
    if K % group_size:
        raise ValueError(f"{fn}: group_size {group_size} does not divide K = {K}")
    return group_size


def _minmax_range(w: torch.Tensor, sym: bool):
    """(xmin, xmax) over the last dim, widened to contain 0; symmetric: ``xmax = max|w|``,
    ``xmin = -xmax``; an all-zero group gets [-1, 1]."""
    zero_t = torch.zeros((), dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.amin(-1), zero_t)
    xmax = torch.maximum(w.amax(-1), zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        # always -xmax: the official code keeps xmin = 0 for a group with no negative weight, but the
        # symmetric zero sits at 2^(b-1), so such a group could only reach ~xmax / 2 (clamped above)
        xmin = -xmax
    both0 = (xmin == 0) & (xmax == 0)
    return torch.where(both0, -torch.ones_like(xmin), xmin), torch.where(both0, torch.ones_like(xmax), xmax)


def minmax_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max quantizer params over the last dim of ``w [..., g]``: (scale, zero), shape ``[...]``.

    The range is widened to contain 0; ``scale = (xmax - xmin) / maxq``;
    asymmetric ``zero = round(-xmin / scale)``, symmetric ``zero = (maxq + 1) / 2``
    with the range ``[-max|w|, max|w|]`` (also for a group with no negative weight, where the
    official GPTQ code uses ``[0, max]``); an all-zero group gets the range [-1, 1].
    """
    maxq = 2**bits - 1
    xmin, xmax = _minmax_range(w, sym)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_int(w, scale, zero, maxq: int, rounding=torch.round):
    """``clamp(rounding(w / scale + zero), 0, maxq)`` (float, integer-valued).

    Zeros may be fractional (the packed format stores float zeros), so the zero's
    fraction is rounded together with ``w / scale``; for an integer zero this is exactly
    GPTQ's ``rounding(w / scale) + zero`` (the fraction added is 0.0).
    """
    zi = torch.round(zero)
    return torch.clamp(rounding(w / scale + (zero - zi)) + zi, 0, maxq)


def rtn_minmax(W: torch.Tensor, bits: int, group_size=None, sym: bool = False):
    """Round-to-nearest with GPTQ's min-max params: (q uint8 [N,K], scale fp32 [N,G], zero fp32 [N,G]).

    A baseline for tests and the ERQ ablations (the library's ``rtn_quantize``
    lives with HQQ).
    """
    g = check_weight_args("rtn_minmax", W, bits, group_size, sym)
    N, K = W.shape
    Wg = W.detach().float().reshape(N, K // g, g)
    scale, zero = minmax_params(Wg, bits, sym)
    q = quantize_int(Wg, scale[..., None], zero[..., None], 2**bits - 1)
    return q.reshape(N, K).to(torch.uint8), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` with group-wise scale/zero ``[N, G]`` -> float32 ``[N, K]``."""
    N, K = q.shape
    G = scale.shape[1]
    qg = q.float().reshape(N, G, K // G)
    return ((qg - zero.float()[..., None]) * scale.float()[..., None]).reshape(N, K)


def check_clip(fn: str, clip, clip_grid, clip_max_shrink) -> None:
    """The clipping-search arguments of gptq_quantize / erq_quantize / QuantizeConfig."""
    if clip not in ("minmax", "mse"):
        raise ValueError(f"{fn}: clip must be 'minmax' or 'mse', got {clip!r}")
    if isinstance(clip_grid, bool) or not isinstance(clip_grid, int) or clip_grid < 1:
        raise ValueError(f"{fn}: clip_grid must be an int >= 1, got {clip_grid!r}")
    # a shrink of 1 or more gives zero or negative ranges (scales)
    if isinstance(clip_max_shrink, bool) or not (isinstance(clip_max_shrink, (int, float)) and 0 <= clip_max_shrink < 1):
        raise ValueError(f"{fn}: clip_max_shrink must be in [0, 1), got {clip_max_shrink!r}")


def search_params(w: torch.Tensor, bits: int, sym: bool = False, weight: torch.Tensor | None = None,
                  grid: int = 40, max_shrink: float = 0.5, norm: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping search: min-max params whose range is shrunk by the factor with the least error.

    ``w [..., g]`` (float32 or float64); candidates ``p = 1 - max_shrink * i / (grid - 1)``,
    ``i = 0..grid-1``, scale the (0-widened) min-max range ``[p * xmin, p * xmax]``;
    the error of a candidate is ``sum_i weight_i |w_i - w_hat_i|^norm`` over the group
    (``weight [g]`` or broadcastable to ``w``, e.g. ``diag(H)`` of the group's columns:
    the per-column cost of an error under GPTQ's objective). The zero is not rounded
    (the packed format stores float zeros), so the clipped range maps exactly onto
    ``[0, maxq]``, except in an all-zero group, whose zero is rounded so that it decodes
    to exactly 0. ``grid=1`` is plain min-max with a float zero.

    Returns (scale, zero), float tensors of shape ``w.shape[:-1]``, dtype of w.
    """
    maxq = 2**bits - 1
    xmin, xmax = _minmax_range(w, sym)
    best_err = best_s = best_z = None
    for i in range(max(1, grid)):
        p = 1.0 - max_shrink * i / max(1, grid - 1)
        s = (xmax - xmin) * p / maxq
        z = torch.full_like(s, (maxq + 1) / 2) if sym else -xmin * p / s
        q = quantize_int(w, s[..., None], z[..., None], maxq)
        e = ((q - z[..., None]) * s[..., None] - w).abs().pow(norm)
        err = (e * weight).sum(-1) if weight is not None else e.sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    # an all-zero group (pruned weights, GPTQ's dead columns) must decode to exactly 0: its
    # [-1, 1] range puts the float zero on a half step (7.5 at 4 bits), so round it
    allz = (w == 0).all(-1)
    return best_s, torch.where(allz, torch.round(best_z), best_z)


def refit_scale_zero(q: torch.Tensor, group_size: int, gram: torch.Tensor, rhs: torch.Tensor,
                     scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None,
                     ridge: float = 1e-6, row_chunk: int | None = None):
    """Least-squares re-fit of every group's (scale, zero) (and the bias) given the integers ``q``.

    Per output row n the dequantized row is ``w_hat = sum_g (s_g q_g + c_g 1_g)``
    (``c_g = -s_g z_g``; ``q_g`` / ``1_g`` are q / ones on group g's columns, zero
    elsewhere), plus ``b`` at index K when ``bias`` is given. With ``M_n`` the
    ``[K', P]`` matrix of those columns (``P = 2G`` or ``2G + 1``), the objective
    ``||A M_n theta - y_n||^2`` of a layer with inputs ``A [T, K']`` and targets
    ``y_n`` has the closed form ``(M^T Gram M) theta = M^T rhs_n`` with
    ``Gram = A^T A`` and ``rhs_n = A^T y_n``. GPTQ: ``Gram = H``,
    ``rhs = W H`` (the layer's output error); ERQ: ``A = [Qa(X) | 1]``,
    ``rhs = (A^T Y_fp)^T``. The normal matrix is built from the Gram in
    O(N K^2) without forming ``M``. A ridge ``ridge * mean(diag)`` pulls each
    row towards its current params (so collinear directions, e.g. a group
    whose q is constant, keep them); rows whose solution has a scale <= 0 or is
    not finite keep their current params.

    Args:
        q: ``[N, K]`` integers (any dtype). group_size: g, divides K.
        gram: ``[K', K']`` float, ``K' = K`` (+1 with bias: the bias column last).
        rhs: ``[N, K']`` float.
        scale, zero: ``[N, K // g]`` current params; bias: ``[N]`` current bias or None.
        row_chunk: rows solved together; None: as many as fit 128 MiB of fp64 scratch (``[rows, G, K]`` and
            ``[rows, P, P]``; a fixed 256 rows took 1.5 GB at K = 4096, g = 32, and ~11 GB at K = 11008).
    Returns:
        (scale, zero) float32 ``[N, K // g]`` and the bias float32 ``[N]`` (None without).
    """
    f64 = torch.float64
    N, K = q.shape
    g = group_size
    G = K // g
    fb = bias is not None
    Kp = K + int(fb)
    if tuple(gram.shape) != (Kp, Kp) or tuple(rhs.shape) != (N, Kp):
        raise ValueError(f"refit_scale_zero: gram must be [{Kp}, {Kp}] and rhs [{N}, {Kp}], got "
                         f"{tuple(gram.shape)} and {tuple(rhs.shape)}")
    gram = gram.to(f64)
    Gr = gram[:K, :K].reshape(G, g, G, g)
    S11 = Gr.sum((1, 3))  # [G, G]
    P = 2 * G + int(fb)
    out_s = scale.to(f64).clone()
    out_z = zero.to(f64).clone()
    out_b = bias.to(f64).clone() if fb else None
    if row_chunk is None:
        row_chunk = max(1, min(256, (128 << 20) // (8 * (G * K + P * P))))
    for r0 in range(0, N, row_chunk):
        r = slice(r0, min(N, r0 + row_chunk))
        qg = q[r].to(f64).reshape(-1, G, g)
        n = qg.shape[0]
        tmp = torch.einsum("ngi,gihj->nghj", qg, Gr)  # q_g^T Gram[g, h-block]
        M = torch.empty(n, P, P, dtype=f64, device=q.device)
        M[:, :G, :G] = torch.einsum("nghj,nhj->ngh", tmp, qg)
        M[:, :G, G:2 * G] = tmp.sum(-1)
        M[:, G:2 * G, :G] = M[:, :G, G:2 * G].transpose(1, 2)
        M[:, G:2 * G, G:2 * G] = S11
        rh = rhs[r].to(f64)
        rg = rh[:, :K].reshape(n, G, g)
        v = torch.cat([(qg * rg).sum(-1), rg.sum(-1)], 1)
        s0, z0 = out_s[r], out_z[r]
        theta0 = torch.cat([s0, -s0 * z0], 1)
        if fb:
            gb = gram[:K, K].reshape(G, g)
            M[:, :G, -1] = (qg * gb).sum(-1)
            M[:, G:2 * G, -1] = gb.sum(-1)
            M[:, -1, :-1] = M[:, :-1, -1]
            M[:, -1, -1] = gram[K, K]
            v = torch.cat([v, rh[:, K:]], 1)
            theta0 = torch.cat([theta0, out_b[r, None]], 1)
        lam = ridge * torch.diagonal(M, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        M.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        theta = torch.linalg.solve(M, (v + lam[:, None] * theta0)[..., None])[..., 0]
        s = theta[:, :G]
        ok = torch.isfinite(theta).all(1) & (s > 0).all(1)
        z = -theta[:, G:2 * G] / torch.where(s > 0, s, torch.ones_like(s))
        out_s[r] = torch.where(ok[:, None], s, s0)
        out_z[r] = torch.where(ok[:, None], z, z0)
        if fb:
            out_b[r] = torch.where(ok, theta[:, -1], out_b[r])
    return out_s.float(), out_z.float(), (out_b.float() if fb else None)
