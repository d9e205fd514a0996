"""Group-wise weight quantization helpers shared by GPTQ and ERQ.

Convention (the same as ``rtn_quantize`` / ``hqq_quantize``): for ``W [N, K]``
and group size ``g`` (groups contiguous along K),
``q`` uint8 ``[N, K]`` in ``[0, 2^bits - 1]``, ``scale`` and ``zero`` float32
``[N, K // g]`` and ``W ~= (q - zero) * scale`` (zero broadcast over its group).
"""
from __future__ import annotations

import torch


def check_weight_args(fn: str, W, bits, group_size) -> int:
    """Validate W [N, K] / bits / group_size; returns the effective group size (K for None / -1)."""
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
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in [1, 8], got {bits!r}")
    K = W.shape[1]
    if group_size is None or group_size == -1:
        return K
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{fn}: group_size must be a positive int, -1 or None, got {group_size!r}")
    if K % group_size:
        raise ValueError(f"{fn}: group_size {group_size} does not divide K = {K}")
    return group_size


def minmax_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max quantizer params over the last dim of ``w [..., g]``: (scale, zero), shape ``[...]``.

    The range is widened to contain 0; ``scale = (xmax - xmin) / maxq``;
    asymmetric ``zero = round(-xmin / scale)``, symmetric ``zero = (maxq + 1) / 2``
    with ``xmax = max(|xmin|, xmax)``; an all-zero group gets the range [-1, 1].
    """
    maxq = 2**bits - 1
    zero_t = torch.zeros((), dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.amin(-1), zero_t)
    xmax = torch.maximum(w.amax(-1), zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_int(w, scale, zero, maxq: int, rounding=torch.round):
    """``clamp(rounding(w / scale) + zero, 0, maxq)`` (float, integer-valued)."""
    return torch.clamp(rounding(w / scale) + zero, 0, maxq)


def rtn_minmax(W: torch.Tensor, bits: int, group_size=None, sym: bool = False):
    """Round-to-nearest with GPTQ's min-max params: (q uint8 [N,K], scale fp32 [N,G], zero fp32 [N,G]).

    A baseline for tests and the ERQ ablations (the library's ``rtn_quantize``
    lives with HQQ).
    """
    g = check_weight_args("rtn_minmax", W, bits, group_size)
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
