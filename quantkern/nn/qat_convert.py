"""From quantization-aware training to packed inference: a trained QAT layer as a PackedLinear.

A :class:`QuantLinear` (any ``nn.Linear`` whose ``weight_quantizer`` is an
:class:`LSQQuantizer`) computes ``F.linear(Qa(x), Qw(W), bias)`` with
``Qw(W) = q * s + beta``, ``q = round(clamp((W - beta) / s, qmin, qmax))``. Its packed form keeps
those integers exactly, as codes ``c = q - qmin`` in ``[0, 2^b - 1]``, with the packed format's
float zero point ``z = -qmin - beta / s``, so that ``(c - z) * s = q * s + beta``:

* scales ``s`` (the quantizer's ``|scale|`` clamped at its eps, as its forward uses it): per tensor
  and per output channel become one group per row, per group keeps its groups (packable when the
  group size is a multiple of 32 dividing in_features);
* without a weight offset (QuantLinear's default) ``z = -qmin = 2^(b-1)`` exactly, and with float32
  metadata (the default here) the dequantized weight equals the QAT layer's fake-quantized fp32
  weight bit for bit; with a learnt offset ``beta`` it agrees to float32 rounding;
* the input quantizer carries over as the offset (LSQ+) form of
  :meth:`PackedLinear.set_input_quantizer`, run by the same ``fake_quant_lsq`` kernel with the
  same scale / offset values: ``Qa(x)`` is the same, bit for bit.

The codes are the integers the QAT layer's own forward uses: its weight quantizer is run (with
its hooks, e.g. the oscillation tracker's frozen weights) and the codes are checked to reproduce
its output exactly before anything is built.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from ..packed import PackedWeight
from ..reference import packing as ref
from ._sites import module_sites, swap_module
from .lsq import LSQQuantizer
from .packed_linear import PackedLinear, _skipped, disable_fused_encoder_paths, untie_packed_outputs

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def is_qat_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` with an :class:`LSQQuantizer` as ``weight_quantizer`` (QuantLinear and the like)."""
    return isinstance(m, nn.Linear) and isinstance(getattr(m, "weight_quantizer", None), LSQQuantizer)


def unpackable_reason(layer: nn.Module) -> str | None:
    """Why the QAT layer ``layer`` has no packed form (a setting, not its data), or None when it has one."""
    wq = layer.weight_quantizer
    if wq.bits not in ref.SUPPORTED_BITS:
        return f"its weights are {wq.bits}-bit; packed weights are 2, 3 or 4-bit"
    if wq.granularity == "channel" and wq.axis % 2 != 0:
        return "its weight scales are per input feature (axis 1); packed groups run along the input"
    K = layer.in_features
    if wq.granularity == "group" and wq.group_size != K and (wq.group_size % 32 or K % wq.group_size):
        return (f"its weight group size {wq.group_size} is not a multiple of 32 dividing in_features {K} (the packed "
                "format's groups)")
    iq = getattr(layer, "input_quantizer", None)
    if iq is not None:
        if not isinstance(iq, LSQQuantizer):
            return f"its input_quantizer is a {type(iq).__name__}, not an LSQQuantizer"
        if iq.granularity not in ("tensor", "channel") or (iq.granularity == "channel" and iq.axis != -1):
            return (f"its input quantizer is {iq.granularity}-wise (axis {iq.axis}); PackedLinear takes per-tensor or "
                    "per-input-feature (axis -1) input ranges")
    return None


def _codes(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(codes uint8 [N, K], scales fp32 [N, G], zeros fp32 [N, G], group_size)`` of the QAT layer's
    weight, the codes checked against its weight quantizer's output."""
    wq = layer.weight_quantizer
    w = layer.weight.detach()
    N, K = w.shape
    # the quantizer's own forward: it initialises (from the weight, as the layer's first forward would)
    # if it never ran, and its forward hooks apply (the oscillation tracker's frozen entries: its hook acts
    # only when given the weight Parameter itself, not a detached view)
    w_hat = wq(layer.weight).detach()
    s = wq.scale.detach().float().abs().clamp_min(wq.eps)  # what its forward passes to fake_quant_lsq
    b = wq.offset.detach().float() if wq.offset is not None else torch.zeros_like(s)
    if wq.granularity == "group":
        gs = wq.group_size
    else:  # per tensor / per output channel: one group per row
        gs = K
        s, b = s.reshape(-1, 1).expand(N, 1), b.reshape(-1, 1).expand(N, 1)
    sx, bx = s.repeat_interleave(gs, 1), b.repeat_interleave(gs, 1)
    qmin, qmax = wq.qmin, wq.qmax
    q = torch.round(torch.clamp((w.float() - bx) / sx, qmin, qmax))
    bad = (q * sx + bx).to(w_hat.dtype) != w_hat
    if bool(bad.any()):  # (a hook replaced entries: read those integers off the output instead)
        q = torch.where(bad, torch.round(torch.clamp((w_hat.float() - bx) / sx, qmin, qmax)), q)
        bad = (q * sx + bx).to(w_hat.dtype) != w_hat
        if bool(bad.any()):
            raise ValueError(f"PackedLinear.from_qat: layer {name!r}: its weight quantizer's output is off its integer "
                             f"grid at {int(bad.sum())} of {bad.numel()} entries (a forward hook or subclass that "
                             "changes the values?); there is no exact packed form of it")
    zeros = -float(qmin) - b / s
    return (q - qmin).to(torch.uint8), s.contiguous(), zeros.contiguous(), gs


def packed_from_qat(layer: nn.Module, meta_dtype: torch.dtype = torch.float32, backend: str = "auto",
                    name: str = "layer") -> PackedLinear:
    """:meth:`PackedLinear.from_qat` (``name`` labels the layer in errors)."""
    if not is_qat_linear(layer):
        raise TypeError(f"PackedLinear.from_qat: expected a QAT linear layer (an nn.Linear with an LSQQuantizer "
                        f"weight_quantizer, e.g. quantkern.nn.QuantLinear), got {type(layer).__name__}")
    if meta_dtype not in ref.META_DTYPES:
        raise TypeError(f"PackedLinear.from_qat: meta_dtype must be one of {ref.META_DTYPES}, got {meta_dtype!r}")
    why = unpackable_reason(layer)
    if why:
        raise ValueError(f"PackedLinear.from_qat: layer {name!r} cannot be packed: {why}")
    w = layer.weight
    if w.dtype not in _FLOATS:
        raise TypeError(f"PackedLinear.from_qat: layer {name!r} has a {w.dtype} weight; PackedLinear runs float32 / "
                        "float16 / bfloat16 layers (cast first, e.g. layer.float())")
    if w.is_meta:
        raise ValueError(f"PackedLinear.from_qat: layer {name!r} is on the meta device (no weights to pack)")
    if w.numel() and not bool(torch.isfinite(w.detach()).all()):
        raise ValueError(f"PackedLinear.from_qat: layer {name!r} has NaN or Inf weights")
    iq = getattr(layer, "input_quantizer", None)
    if iq is not None and not iq._initialized:
        raise ValueError(f"PackedLinear.from_qat: layer {name!r}: its input quantizer never saw data, so it has no "
                         "range yet; run the model forward on training data first (the QAT layer initialises it "
                         "from its first batch)")
    with torch.inference_mode(False), torch.no_grad():
        codes, s, z, gs = _codes(layer, name)
        if meta_dtype != torch.float32:
            s, z = s.to(meta_dtype), z.to(meta_dtype)
            if not bool(torch.isfinite(s).all() & torch.isfinite(z).all() & (s > 0).all()):
                raise ValueError(f"PackedLinear.from_qat: layer {name!r}: its scales or zero points do not fit "
                                 f"{meta_dtype} (overflow, or a scale that rounds to 0); use meta_dtype=torch.float32")
        bias = layer.bias.detach() if layer.bias is not None else None
        m = PackedLinear.from_packed(PackedWeight.from_quantized(codes, s, z, layer.weight_quantizer.bits, gs), bias,
                                     backend)
        if bias is not None:  # a frozen bias stays frozen
            m.bias.requires_grad_(layer.bias.requires_grad)
        if iq is not None:
            per_channel = iq.granularity == "channel"
            si = iq.scale.detach().float().abs().clamp_min(iq.eps)  # as its forward uses them
            bi = iq.offset.detach().float() if iq.offset is not None else torch.zeros_like(si)
            m.set_input_quantizer(iq.bits, iq.signed, scale=si, offset=bi, per_channel=per_channel)
    m.train(layer.training)
    return m


def convert_qat(model: nn.Module, meta_dtype: torch.dtype = torch.float32,
                skip: Iterable[str] | Callable[[str], bool] | None = None, backend: str = "auto") -> list[str]:
    """Replace every QAT linear layer of ``model`` (in place) by its exact :class:`PackedLinear`.

    QAT linear layers are ``nn.Linear`` s whose ``weight_quantizer`` is an :class:`LSQQuantizer`
    (:class:`QuantLinear`, as :func:`quantize_modules` makes them); see
    :meth:`PackedLinear.from_qat` for what is kept. ``skip``: names (exact, a suffix after ".",
    fnmatch patterns) or a predicate, as for :func:`replace_linear`; default None (all).

    Layers a packed layer cannot express stay QAT layers (fake-quantized, still correct) with one
    warning naming them and why: 5-8-bit weights, weight groups that are not a multiple of 32
    dividing in_features, per-input-feature weight scales, and every QAT layer that is not a
    Linear (QuantConv2d). Errors in the data (NaN weights, an input quantizer that never saw data)
    raise before any layer is replaced, naming the layer. Returns the converted layers' names.
    """
    if is_qat_linear(model):
        raise TypeError("convert_qat: model is itself a QAT layer (no parent to replace it in); use "
                        "PackedLinear.from_qat(layer)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_qat: model must be an nn.Module, got {type(model).__name__}")
    found = [(names, sites, m) for names, sites, m in module_sites(model, is_qat_linear)
             if not any(_skipped(n, skip) for n in names)]
    left = []
    todo = []
    for names, sites, m in found:
        why = unpackable_reason(m)
        if why:
            left.append(f"{names[0]} ({why})")
        else:
            todo.append((names[0], sites, m))
    left += [f"{n} ({type(m).__name__}: PackedLinear packs linear layers only)" for n, m in model.named_modules()
             if isinstance(getattr(m, "weight_quantizer", None), LSQQuantizer) and not isinstance(m, nn.Linear)
             and not _skipped(n, skip)]
    new = [packed_from_qat(m, meta_dtype, backend, name) for name, _, m in todo]  # all built before any swap
    for (_, sites, old), layer in zip(todo, new):
        swap_module(sites, old, layer)
    disable_fused_encoder_paths(model, new)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        still = untie_packed_outputs(model, [old.weight for _, _, old in todo])
    if still:
        warnings.warn(f"convert_qat: the packed layers' float weights are still held by {still} (tied weights), "
                      "which stay float; the tie is broken (config.tie_word_embeddings set to False)", stacklevel=2)
    if left:
        warnings.warn(f"convert_qat: {len(left)} QAT layer(s) stay fake-quantized: {'; '.join(left[:4])}"
                      f"{' ...' if len(left) > 4 else ''}", stacklevel=2)
    if not found:
        warnings.warn("convert_qat: the model has no QAT linear layers (nn.Linear with an LSQQuantizer "
                      "weight_quantizer, e.g. from quantkern.nn.quantize_modules)" +
                      (" outside skip" if skip else ""), stacklevel=2)
    return [name for name, _, _ in todo]
