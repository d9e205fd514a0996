"""Finding quantized layers and reading their weight quantizer (duck-typed).

A layer qualifies when it has ``weight`` (a tensor) and ``weight_quantizer`` with
``scale`` (tensor), ``qmin``/``qmax`` (ints) and optionally ``offset`` (tensor or
None), ``granularity`` ("tensor" | "channel" | "group"), ``axis``, ``group_size``
and ``eps`` -- the contract of quantkern.nn.QuantLinear / QuantConv2d and their
LSQQuantizer. Without ``granularity`` it is inferred from the scale's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QLayer:
    """One tracked layer: its name in the model, the module holding the weight, the weight's LSQ
    quantizer, the integer grid ``[qmin, qmax]`` and the quantizer's granularity (``axis`` per channel,
    ``group_size`` per group; both None per tensor)."""

    name: str
    module: nn.Module
    quantizer: nn.Module
    qmin: int
    qmax: int
    axis: int | None
    group_size: int | None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def weight_view(self) -> torch.Tensor:
        """The weight's data as the kernels see it (2-D [rows, K] for per-group), contiguous: the
        weight itself when it is contiguous, else a contiguous copy (e.g. a channels_last conv;
        write in-place changes back with :meth:`write_back`)."""
        w = self.module.weight.data.contiguous()
        if self.group_size is not None and w.dim() != 2:
            w = w.view(w.shape[0], -1)
        return w

    def write_back(self, w: torch.Tensor) -> None:
        """Copy ``w`` (from :meth:`weight_view`) into the weight unless it is the weight's own storage."""
        data = self.module.weight.data
        # weight_view copied exactly when the weight is not contiguous; decided from the strides, not
        # by comparing data pointers, which torch.compile cannot trace (a compiled tracker.step failed)
        if not data.is_contiguous():
            data.copy_(w.view(data.shape))

    def params(self, detach: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) as the quantizer's forward uses them: fp32, |scale| >= eps; detached
        unless ``detach=False`` (then differentiable in the quantizer's parameters)."""
        q = self.quantizer
        if getattr(q, "_initialized", True) is False and callable(getattr(q, "initialize", None)):
            # LSQQuantizer initialises from the data on its first forward; for a weight
            # quantizer that data is the weight, so do it now rather than read the
            # placeholder scale (1, or a lazy parameter with no data).
            q.initialize(self.module.weight)
        eps = float(getattr(q, "eps", 1e-8))
        s = q.scale.float().abs().clamp_min(eps)
        off = getattr(q, "offset", None)
        b = off.float() if isinstance(off, torch.Tensor) else torch.zeros_like(s)
        if detach:
            s, b = s.detach(), b.detach()
        if self.axis is not None or self.group_size is not None:
            return s, b
        return s.reshape(1), b.reshape(1)

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.qmax - self.qmin + 1)))


def _granularity(module, q) -> tuple[int | None, int | None]:
    g = getattr(q, "granularity", None)
    w = module.weight
    if g == "tensor":
        return None, None
    if g == "channel":
        axis = int(getattr(q, "axis", 0))
        return axis % w.dim(), None
    if g == "group":
        return None, int(q.group_size)
    # infer from the scale's shape
    s = q.scale
    if s.numel() == 1:
        return None, None
    if s.dim() == 1 and s.shape[0] == w.shape[0]:
        return 0, None
    if s.dim() == 2 and s.shape[0] == w.shape[0]:
        return None, (w.numel() // w.shape[0]) // s.shape[1]
    raise ValueError(f"cannot infer the granularity of a weight quantizer with scale shape {tuple(s.shape)}")


def quantized_layers(model: nn.Module, max_bits: int | None = None) -> list[QLayer]:
    """Every module of ``model`` with a weight and a weight_quantizer (see module docstring) of at most
    ``max_bits`` bits (a positive int; None: all)."""
    if max_bits is not None and (isinstance(max_bits, bool) or not isinstance(max_bits, int) or max_bits <= 0):
        # a string failed deep inside with "'>' not supported", 0 / negative silently matched nothing
        raise ValueError(f"quantized_layers: max_bits must be a positive int or None, got {max_bits!r}")
    out = []
    for name, mod in model.named_modules():
        q = getattr(mod, "weight_quantizer", None)
        w = getattr(mod, "weight", None)
        if q is None or not isinstance(w, torch.Tensor) or not isinstance(getattr(q, "scale", None), torch.Tensor):
            continue
        axis, gs = _granularity(mod, q)
        layer = QLayer(name, mod, q, int(q.qmin), int(q.qmax), axis, gs)
        if max_bits is not None and layer.bits > max_bits:
            continue
        out.append(layer)
    return out
