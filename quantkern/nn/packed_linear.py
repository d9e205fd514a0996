"""PackedLinear: a drop-in ``nn.Linear`` replacement with a 2/3/4-bit packed weight."""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from .. import ops
from ..packed import PackedWeight
from ..reference import packing as ref

FORMAT_VERSION = 1


class PackedLinear(nn.Module):
    """``y = x @ W.T + bias`` with W stored in the canonical packed format.

    Buffers (saved in the state_dict): ``qweight`` int32 ``[out, ceil(in/32) * bits]``,
    ``scales`` and ``zeros`` ``[out, in // group_size]``; ``bias`` is a Parameter
    (trainable; the packed weight is not). ``bits``, ``group_size`` and the format
    version travel as extra state and are checked on load.

    Construct from a trained layer with :meth:`from_linear`, or empty (then load a
    state_dict). Works under ``torch.compile`` (the op has a fake implementation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int | None = 128, meta_dtype: torch.dtype = torch.float16, device=None,
                 dtype: torch.dtype | None = None, backend: str = "auto"):
        super().__init__()
        gs = in_features if group_size in (None, -1) else group_size
        ops._check_bits("PackedLinear", bits)
        ops._check_group("PackedLinear", in_features, gs)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, gs, backend
        G = in_features // gs
        self.register_buffer("qweight", torch.zeros(out_features, ref.packed_words(in_features, bits), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=meta_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, G, dtype=meta_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(cls, weight: PackedWeight, bias: torch.Tensor | None = None, backend: str = "auto") -> "PackedLinear":
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, weight.bits, weight.group_size, weight.scales.dtype,
                device=weight.device, dtype=bias.dtype if bias is not None else None, backend=backend)
        m.qweight.copy_(weight.qweight)
        m.scales.copy_(weight.scales)
        m.zeros.copy_(weight.zeros)
        if bias is not None:
            with torch.no_grad():
                m.bias.copy_(bias)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128,
                    meta_dtype: torch.dtype | None = None, backend: str = "auto") -> "PackedLinear":
        """Quantize ``linear.weight`` with round-to-nearest min-max per group (PackedWeight.from_float)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"PackedLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        w = PackedWeight.from_float(linear.weight.detach(), bits, group_size, meta_dtype)
        b = linear.bias.detach() if linear.bias is not None else None
        return cls.from_packed(w, b, backend)

    @property
    def packed_weight(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                            (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.packed_weight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # buffers were validated at construction / load; only x and bias are checked per call
        return ops._packed_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                  self.in_features, self.bias, self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # scales/zeros take the checkpoint's dtype (fp32/fp16/bf16 metadata), never a lossy cast
        for name in ("scales", "zeros"):
            t = state_dict.get(prefix + name)
            buf = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.dtype != buf.dtype and t.dtype in (torch.float32, torch.float16,
                                                                                   torch.bfloat16):
                setattr(self, name, torch.empty(buf.shape, dtype=t.dtype, device=buf.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self):
        return {"format_version": FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features}

    def set_extra_state(self, state):
        want = self.get_extra_state()
        if state != want:
            raise ValueError(f"PackedLinear: checkpoint has {state}, this module expects {want}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, meta_dtype={self.scales.dtype}")


def _skipped(name: str, skip) -> bool:
    if skip is None:
        return False
    if callable(skip):
        return bool(skip(name))
    if isinstance(skip, str):
        skip = (skip,)
    return any(name == s or fnmatch.fnmatch(name, s) or name.endswith("." + s) for s in skip)


def replace_linear(model: nn.Module, bits: int = 4, group_size: int | None = 128,
                   skip: Iterable[str] | Callable[[str], bool] | None = ("lm_head",),
                   meta_dtype: torch.dtype | None = None, fallback_group_size: bool = True,
                   backend: str = "auto") -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`PackedLinear`.

    Args:
        skip: names (exact, a suffix after ".", or fnmatch patterns such as
            ``"*.classifier"``) or a predicate on the qualified name; those layers stay.
        fallback_group_size: when ``group_size`` does not divide a layer's
            in_features, use one group per row instead of leaving the layer alone.

    Returns the qualified names of the replaced layers.
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or _skipped(name, skip):
                continue
            gs = group_size
            K = child.in_features
            if gs not in (None, -1) and (K % gs or gs % 32) and gs != K:
                if not fallback_group_size:
                    continue
                gs = None
            setattr(parent, child_name, PackedLinear.from_linear(child, bits, gs, meta_dtype, backend))
            replaced.append(name)
    return replaced
