"""Module casts that leave calibrated / quantized buffers in their own dtype."""
from __future__ import annotations

from torch import nn


def apply_keeping_dtype(module: nn.Module, names: tuple[str, ...], fn, recurse: bool = True) -> nn.Module:
    """``nn.Module._apply(fn)`` for ``module``, except that the buffers ``names`` keep their dtype.

    ``model.half()`` / ``.to(torch.bfloat16)`` must not round group scales, zero points or a
    calibrated input range (that would change the quantized model, or underflow a tiny scale
    to 0); device moves still apply to them.
    """
    old = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    nn.Module._apply(module, fn, recurse)
    for n, t in old.items():
        new = module._buffers[n]
        if new is not None and new.dtype != t.dtype:
            module._buffers[n] = t.to(new.device)
    return module
