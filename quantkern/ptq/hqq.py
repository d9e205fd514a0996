"""HQQ and round-to-nearest weight quantization (DESIGN.md section 3).

Both return ``(q uint8 [N, K], scale fp32 [N, K // g], zero fp32 [N, K // g])``
with ``W ~= (q - zero) * scale``: the group-wise asymmetric format with a float
zero (DESIGN.md section 2). The solver is the fused kernel
``torch.ops.quantkern.hqq_quantize`` (CPU: AVX-512 / AVX2 / scalar; CUDA;
Triton); quantkern/reference/hqq.py is its oracle.
"""
from __future__ import annotations

import warnings

import torch

from .. import ops
from ..reference import hqq as _ref

__all__ = ["hqq_quantize", "rtn_quantize", "hqq_dequantize"]


def _one_group_per_row(W, group_size, axis, fn="hqq_quantize"):
    """group_size -1 or None: one group per row (g = K), as gptq_quantize / erq_quantize / quantize_ take it."""
    if (group_size is None or (group_size == -1 and not isinstance(group_size, bool))) and \
            isinstance(W, torch.Tensor) and W.dim() == 2:
        if axis != 1:  # hqq's axis=0 groups are strided over the flattened weight, not rows
            raise ValueError(f"{fn}: group_size {group_size} (one group per row) needs axis=1, got axis={axis}")
        if W.shape[1] == 0:  # else refused as "group_size must be a positive int, got 0", a value never passed
            raise ValueError(f"{fn}: group_size {group_size} (one group per row) needs K >= 1, got W of shape {tuple(W.shape)}")
        return W.shape[1]
    return group_size


def hqq_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size, axis: int = 1) -> torch.Tensor:
    """fp32 ``(q - zero) * scale`` [N, K] from :func:`hqq_quantize`'s outputs, with the same
    ``group_size`` (-1 / None: one group per row, axis=1 only) and ``axis``."""
    fn = "hqq_dequantize"
    if not all(isinstance(t, torch.Tensor) for t in (q, scale, zero)) or q.dim() != 2:
        raise ValueError(f"{fn}: q must be a 2-D tensor [N, K] and scale / zero tensors")
    N, K = q.shape
    if axis not in (0, 1) or isinstance(axis, bool):
        raise ValueError(f"{fn}: axis must be 0 or 1, got {axis!r}")
    g = _one_group_per_row(q, group_size, axis, fn)
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
        raise ValueError(f"{fn}: group_size must be a positive int, -1 or None, got {group_size!r}")
    if (K if axis == 1 else N * K) % g:
        raise ValueError(f"{fn}: group_size {g} does not divide " + (f"K = {K}" if axis == 1 else f"the {N * K} weights"))
    for name, t in (("scale", scale), ("zero", zero)):
        if t.numel() != N * K // g:
            raise ValueError(f"{fn}: {name} must hold one value per group ({N * K // g} for q {tuple(q.shape)} and "
                             f"group_size {g}), got shape {tuple(t.shape)}")
    return _ref.hqq_dequantize(q, scale, zero, g, axis)


def init_clamp_fraction(W: torch.Tensor, bits: int, group_size: int, axis: int = 1) -> float:
    """The fraction of W's groups that hqq's min-max init does not give their min-max grid: a range
    <= 1e-4 gets inverse scale 1, and the inverse scale is capped at 2e4 (as in the hqq package). A
    constant group (range 0) is not counted: scale 1 reproduces it exactly."""
    if W.numel() == 0 or W.is_meta:  # (nothing to count; a meta W has no values)
        return 0.0
    # the kernel's fp32 arithmetic: min / max are exact in W's dtype, the range is taken in fp32
    Wg = W.detach().reshape(-1, group_size) if axis == 1 else W.detach().reshape(group_size, -1)
    rng = Wg.amax(axis).float() - Wg.amin(axis).float()
    hit = (rng > 0) & ((rng <= 1e-4) | ((2**bits - 1) / rng > 2e4))
    return hit.float().mean().item()


def _warn_init_clamps(who: str, W: torch.Tensor, bits: int, group_size: int, axis: int) -> None:
    """Warn when :func:`init_clamp_fraction` is not 0."""
    if torch.compiler.is_compiling():  # a data-dependent branch
        return
    frac = init_clamp_fraction(W, bits, group_size, axis)
    if frac > 0:
        warnings.warn(f"{who}: {frac:.1%} of the groups have a weight range below hqq's thresholds "
                      "(range <= 1e-4 -> scale 1, 1/scale capped at 2e4, as in the hqq package), so they quantize far "
                      "more coarsely than min-max (weights that small lose most of their information). gptq_quantize, "
                      "or PackedWeight.from_float (plain min-max), keep them; or scale W up by a power of two first. "
                      "warn=False silences this.", stacklevel=3)


def hqq_quantize(
    W: torch.Tensor,
    bits: int,
    group_size: int | None,
    axis: int = 1,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    backend: str = "auto",
    early_stop: str = "global",
    *,
    warn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ of W ``[N, K]``: min-max init, then up to ``iters`` proximal iterations on the zero.

    Defaults are the official ones (p = 0.7, beta = 10, kappa = 1.01, 20
    iterations, global early stop); ``kappa=1.0`` reproduces hqq 0.2.8.post1 (which
    ignores kappa). ``early_stop="group"`` is the per-group variant (each group
    stops on its own error and keeps its best zero). ``group_size`` -1 or None: one group
    per row. See :func:`quantkern.ops.hqq_quantize` for every argument.

    Tiny weights: the min-max init has hqq's two clamps (as :func:`rtn_quantize`): a group whose
    range is <= 1e-4 gets scale 1, and the inverse scale is capped at 2e4 (scale >= 5e-5), and
    only the zero is optimised afterwards, so such groups quantize far more coarsely than min-max
    (a group of weights ~1e-5 comes out nearly constant). ``warn`` (default True): a warning names
    the fraction of groups this hits (constant groups, which scale 1 keeps exactly, are not counted).
    """
    g = _one_group_per_row(W, group_size, axis)
    out = ops.hqq_quantize(
        W, bits, g, axis=axis, lp_norm=lp_norm, beta=beta, kappa=kappa, iters=iters,
        early_stop=early_stop, backend=backend,
    )
    if warn:
        _warn_init_clamps("hqq_quantize", W, bits, g, axis)
    return out


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int | None, axis: int = 1, backend: str = "auto", *,
                 warn: bool = True):
    """Round to nearest with the min-max init (asymmetric, float zero): HQQ with 0 iterations.

    ``scale = (max - min) / (2^bits - 1)`` (stored as the reciprocal of hqq's inverse scale),
    ``zero = -min / scale``, ``q = clamp(round(W / scale + zero))``, with hqq's two clamps
    (bit-exact with the hqq package's ``optimize=False``): a group whose range is <= 1e-4 gets
    scale 1 (a constant group), and the inverse scale is capped at 2e4 (scale >= 5e-5). Layers
    with weights that small lose most of their information here; ``PackedWeight.from_float``
    is the plain min-max RTN. ``warn`` (default True): a warning names the fraction of groups
    the clamps hit, as :func:`hqq_quantize`'s. ``group_size`` -1 or None: one group per row.
    """
    g = _one_group_per_row(W, group_size, axis)
    out = ops.hqq_quantize(W, bits, g, axis=axis, iters=0, backend=backend)
    if warn:
        _warn_init_clamps("rtn_quantize", W, bits, g, axis)
    return out
