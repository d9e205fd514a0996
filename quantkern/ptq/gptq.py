"""GPTQ (Frantar et al., 2022), following the official IST-DASLab/gptq ``fasterquant``.

Pure PyTorch, CPU or GPU. The loop over columns inside a block (and over
blocks) is the algorithm; every step is vectorised over the output rows.

Algorithm, for ``W [N, K]`` and ``H = 2 X^T X / T [K, K]``:

1. dead inputs (``H[j, j] == 0``): ``H[j, j]`` = the mean of the live diagonal and
   ``W[:, j] = 0`` (official: ``H[j, j] = 1``, see below).
2. ``act_order``: columns permuted by decreasing ``diag(H)``.
3. dampening ``H += damp * mean(diag(H)) * I``; ``U = chol(H^-1)`` upper
   (Cholesky, cholesky_inverse, Cholesky; float64 here for stability).
4. for each block of ``block_size`` columns, for each column ``j``:
   at a group start, the group's min-max params are computed on the current
   (error-updated) weights; ``q = clamp(round(w / s) + z, 0, maxq)``;
   ``err = (w - (q - z) s) / U[j, j]``; ``W[:, j:blk_end] -= err U[j, j:blk_end]``;
   after the block, the lazy batch update ``W[:, blk_end:] -= Err U[blk, blk_end:]``.

Groups are contiguous along K in the *original* column order (the layout of
our packed format). With ``act_order`` this needs static groups (all params
computed from the un-updated weights before the loop, official
``static_groups=True``); act_order with dynamic groups would give GPTQ's
``g_idx`` layout, which this format does not store.

Difference from the official code (``official_group_params=False``, default):
when a group starts in the middle of a block, the official code reads the
group's params from ``W``, which misses the updates from the earlier columns of
the same block (their errors are applied to ``W`` only after the block). We use
the fully updated weights, which is what the paper describes.
``official_group_params=True`` reproduces the official behaviour.
A dead input's diagonal is the mean of the live ones, not 1: the dampening is a fraction
of ``mean(diag(H))``, so with the official 1 the result depended on H's scale (inputs of
size 1e-3 with one dead column: 0.59x round-to-nearest's layer error instead of 0.18x);
the dead column itself is decoupled either way (its row and column of H are zero).
Per-channel (``group_size`` None or -1) params are computed at column 0, after
the dead columns are zeroed (official: before). Symmetric params (``sym=True``)
always use the range ``[-max|w|, max|w|]``; the official code keeps ``[0, max]``
for a group with no negative weight, whose upper half its zero ``2^(bits-1)`` clamps.
"""
from __future__ import annotations

import math
import warnings

import torch

from ._wquant import check_clip, check_weight_args, minmax_params, quantize_int, search_params

__all__ = ["gptq_quantize", "HessianAccumulator"]


def _dead_diag(diag: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The diagonal value for dead inputs (``diag == 0``) along the last dim: the mean of
    the live entries (1 where every entry is dead), shape ``diag.shape[:-1] + (1,)``
    broadcast to the dead entries by the caller. Scale-free, unlike the official 1."""
    live = (~dead).sum(-1, keepdim=True)
    mean = torch.where(dead, torch.zeros_like(diag), diag).sum(-1, keepdim=True) / live.clamp(min=1)
    return torch.where(live > 0, mean, torch.ones_like(mean)).expand_as(diag)[dead]


class HessianAccumulator:
    """Streams ``H = 2 / T * sum_t x_t x_t^T`` over calibration batches (GPTQ's ``add_batch``).

    Args:
        in_features: K.
        dtype: accumulation dtype (float32 as GPTQ, or float64).
        device: where H lives.

    ``add_batch(x)``: x ``[..., K]`` (any float dtype; leading dims are tokens).
    ``H``: ``[K, K]``; ``nsamples``: T, the number of rows seen. (The official
    code counts the batch dimension of 3-D inputs instead of tokens; GPTQ is
    invariant to the scale of H.)
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"add_batch: x must be a float tensor, got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"add_batch: x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(device=self.H.device, dtype=self.H.dtype)
        t = x.shape[0]
        if t == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("add_batch: x contains NaN or Inf")
        self.H *= self.nsamples / (self.nsamples + t)
        self.nsamples += t
        x = x * math.sqrt(2.0 / self.nsamples)
        self.H.addmm_(x.T, x)


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    *,
    static_groups: bool | None = None,
    sym: bool = False,
    official_group_params: bool = False,
    clip: str = "minmax",
    clip_grid: int = 40,
    clip_max_shrink: float = 0.5,
    params: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Quantize ``W`` with GPTQ.

    Args:
        W: ``[N, K]`` float (any float dtype; computed in float32).
        H: ``[K, K]`` symmetric float, ``2 X^T X`` (any positive scale) from the layer's
           calibration inputs ``X [T, K]`` (see :class:`HessianAccumulator`).
        bits: 1..8.
        group_size: divides K; None or -1: one group per row (per channel).
        damp: relative dampening (``percdamp``), added as ``damp * mean(diag(H))``.
        block_size: lazy-batch block width (128).
        act_order: process columns by decreasing ``diag(H)``.
        static_groups: compute all group params before quantizing (default:
            True with act_order, else False). act_order with
            ``static_groups=False`` and ``group_size < K`` raises.
        sym: symmetric min-max (zero = 2^(bits-1)) instead of asymmetric.
        official_group_params: see module docstring.
        clip: how a group's params are chosen: "minmax" (GPTQ's, integer zero) or
            "mse" (:func:`search_params`: the shrink of the min-max range with the least
            ``diag(H)``-weighted squared error over ``clip_grid`` candidates down to
            ``1 - clip_max_shrink``; float zero).
        params: ``(scale, zero)`` float ``[N, K // g]`` to use as static params (no search);
            e.g. the output of a least-squares re-fit, for another GPTQ pass.

    Returns:
        (q uint8 [N, K], scale float32 [N, K // g], zero float32 [N, K // g]) with
        ``W_hat = (q - zero) * scale``; zeros are integers in [0, 2^bits - 1] with
        ``clip="minmax"``, floats with ``clip="mse"``.

    Raises:
        TypeError / ValueError naming the bad argument; RuntimeError if
        ``H + damp`` is not positive definite (increase ``damp``).
    """
    fn = "gptq_quantize"
    g = check_weight_args(fn, W, bits, group_size, sym)
    N, K = W.shape
    if not isinstance(H, torch.Tensor) or not H.is_floating_point():
        raise TypeError(f"{fn}: H must be a float tensor")
    if tuple(H.shape) != (K, K):
        raise ValueError(f"{fn}: H must have shape [K, K] = [{K}, {K}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if H.device != W.device:
        raise ValueError(f"{fn}: H is on {H.device} but W is on {W.device}")
    if not torch.isfinite(H).all():
        raise ValueError(f"{fn}: H contains NaN or Inf")
    # the Cholesky below reads one triangle only: a non-symmetric H (e.g. some X [K, K] passed for
    # H) would be silently replaced by the symmetric matrix of its lower triangle. Rounding-level
    # asymmetry (a float32 / float16 X^T X) passes.
    # (in row chunks: no full-size float64 temporaries for a large K)
    asym = max(float((H[i:i + 1024].double() - H[:, i:i + 1024].T.double()).abs().max()) for i in range(0, K, 1024))
    if asym > 1e-3 * float(H.detach().abs().max()):
        raise ValueError(f"{fn}: H must be symmetric (2 X^T X); max |H - H^T| = {asym:.3g}")
    if isinstance(damp, bool) or not (isinstance(damp, (int, float)) and damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"{fn}: damp must be a finite float >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{fn}: block_size must be a positive int, got {block_size!r}")
    check_clip(fn, clip, clip_grid, clip_max_shrink)
    if static_groups is None:
        static_groups = bool(act_order) or params is not None
    if params is not None and not static_groups:
        raise ValueError(f"{fn}: params are static group params; static_groups=False would recompute them")
    if act_order and not static_groups and g < K:
        raise ValueError(f"{fn}: act_order with static_groups=False gives non-contiguous groups (g_idx), "
                         "which this format cannot store; use static_groups=True (the default with act_order)")

    maxq = 2**bits - 1
    dev = W.device
    Wf = W.detach().to(torch.float32).clone()
    Hd = H.detach().to(torch.float64).clone()
    # (the mse search weighs each column by its own diag(H): 0 for a dead input, whose error costs nothing)
    hdiag = torch.diagonal(Hd).to(torch.float32)
    dead = torch.diagonal(Hd) == 0
    if bool(dead.all()):  # (as the official code, every weight becomes 0: say so)
        warnings.warn(f"{fn}: H is all zero (a HessianAccumulator that saw no batch, or all-zero inputs): every input "
                      "is dead and the whole weight quantizes to 0", stacklevel=3)
    Hd[dead, dead] = _dead_diag(torch.diagonal(Hd), dead)
    Wf[:, dead] = 0
    G = K // g
    scale = torch.zeros(N, G, dtype=torch.float32, device=dev)
    zero = torch.zeros(N, G, dtype=torch.float32, device=dev)

    def group_params(wg, c0):
        # params of the groups whose columns start at c0 (original order), from weights wg [N, n, g] or [N, g]
        if clip == "minmax":
            return minmax_params(wg, bits, sym)
        wt = hdiag[c0:c0 + wg.shape[-1] * (wg.shape[1] if wg.dim() == 3 else 1)].reshape(wg.shape[1:])
        return search_params(wg, bits, sym, weight=wt, grid=clip_grid, max_shrink=clip_max_shrink)

    if params is not None:
        scale = params[0].to(device=dev, dtype=torch.float32).clone()
        zero = params[1].to(device=dev, dtype=torch.float32).clone()
        if tuple(scale.shape) != (N, G) or tuple(zero.shape) != (N, G):
            raise ValueError(f"{fn}: params must be two [N, K // g] = [{N}, {G}] tensors")
        if not bool((torch.isfinite(scale) & (scale > 0)).all() & torch.isfinite(zero).all()):
            raise ValueError(f"{fn}: params: scales must be finite and > 0, zeros finite")
    elif static_groups:
        scale, zero = group_params(Wf.reshape(N, G, g), 0)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(Hd), descending=True)
        Wf = Wf[:, perm]
        Hd = Hd[perm][:, perm]
        hdiag = hdiag[perm]  # group_params called from here on sees columns in this order
    col_group = (perm if perm is not None else torch.arange(K, device=dev)) // g

    Hd.diagonal().add_(damp * torch.diagonal(Hd).mean())
    L, info = torch.linalg.cholesky_ex(Hd)
    if info.item() != 0:
        raise RuntimeError(f"{fn}: H + damp*mean(diag(H))*I is not positive definite (damp={damp}); increase damp")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise RuntimeError(f"{fn}: the inverse Hessian is not positive definite (damp={damp}); increase damp")
    U = U.to(torch.float32)

    Q = torch.zeros(N, K, dtype=torch.float32, device=dev)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = Wf[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static_groups and j % g == 0:
                if official_group_params:
                    wg = Wf[:, j:j + g]
                else:  # the fully updated weights of the group's columns
                    wg = W1[:, i:i + g]
                    if j + g > i2:
                        beyond = Wf[:, i2:j + g] - Err1[:, :i] @ U[i1:j, i2:j + g]
                        wg = torch.cat([wg, beyond], 1)
                s, z = group_params(wg, j)
                scale[:, j // g], zero[:, j // g] = s, z
            gi = col_group[j]
            s, z = scale[:, gi], zero[:, gi]
            w = W1[:, i]
            q = quantize_int(w, s, z, maxq)
            Q[:, j] = q
            err = (w - s * (q - z)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        Wf[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.uint8), scale, zero
