"""From quantization-aware training to packed inference: a trained QAT layer as a PackedLinear.

A :class:`QuantLinear` computes ``F.linear(Qa(x), Qw(W), bias)`` with
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
from torch.nn.parameter import is_lazy

from ..packed import PackedWeight
from ..reference import packing as ref
from ._sites import module_sites, swap_module
from .lsq import LSQQuantizer, qrange
from .packed_linear import PackedLinear, _skipped, disable_fused_encoder_paths, untie_packed_outputs
from .quant_modules import QuantLinear

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def is_qat_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` with an :class:`LSQQuantizer` as ``weight_quantizer`` (QuantLinear and the like;
    :func:`unpackable_reason` says which of them have a packed form)."""
    return isinstance(m, nn.Linear) and isinstance(getattr(m, "weight_quantizer", None), LSQQuantizer)


def _own_code_or_state(layer: nn.Module) -> str | None:
    """What a QAT linear layer computes beyond QuantLinear's ``F.linear(Qa(x), Qw(weight), bias)``, which
    a packed layer would silently drop: another forward (a LoRA subclass), other parameters / buffers /
    submodules (torch.nn.utils.prune's ``weight_orig`` / ``weight_mask`` and its weight-recomputing
    pre-hook, a parametrization such as weight_norm); None for a plain QuantLinear."""
    if not isinstance(layer, QuantLinear) or type(layer).forward is not QuantLinear.forward:
        return (f"{type(layer).__name__} is not a QuantLinear or overrides its forward: its computation is not "
                "known to be F.linear(Qa(x), Qw(weight), bias)")
    extra = ([n for n in layer._parameters if n not in ("weight", "bias")]
             + list(layer._buffers)
             + [n for n in layer._modules if n not in ("weight_quantizer", "input_quantizer")])
    if extra:
        return (f"it has state of its own ({', '.join(extra[:3])}; e.g. pruning or a parametrization: "
                "torch.nn.utils.prune.remove / parametrize.remove_parametrizations first makes it plain)")
    return None


def unpackable_reason(layer: nn.Module) -> str | None:
    """Why the QAT layer ``layer`` has no packed form (a setting, not its data), or None when it has one."""
    why = _own_code_or_state(layer)
    if why:
        return why
    wq = layer.weight_quantizer
    if wq.bits not in ref.SUPPORTED_BITS:
        return f"its weights are {wq.bits}-bit; packed weights are 2, 3 or 4-bit"
    if wq.qmax - wq.qmin >= 1 << wq.bits:
        return (f"its weight integer range [{wq.qmin}, {wq.qmax}] does not fit {wq.bits} bits (qmin / qmax were "
                "changed after construction)")
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
        if (iq.qmin, iq.qmax) != qrange(iq.bits, iq.signed):
            return (f"its input quantizer's integer range [{iq.qmin}, {iq.qmax}] is not the {iq.bits}-bit "
                    f"{'signed' if iq.signed else 'unsigned'} grid {list(qrange(iq.bits, iq.signed))}")
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


def _rounded_meta(codes, s, z, gs, meta_dtype, name):
    """``s``, ``z`` in ``meta_dtype``: refused where they overflow or a scale rounds to 0; a warning where
    the rounding moves a weight by more than 5% of its grid step (a zero point ``-qmin - beta / s`` far
    from the codes, i.e. a learnt offset of many steps, or scales in fp16's subnormal range)."""
    sh, zh = s.to(meta_dtype), z.to(meta_dtype)
    if not bool(torch.isfinite(sh).all() & torch.isfinite(zh).all() & (sh > 0).all()):
        raise ValueError(f"PackedLinear.from_qat: layer {name!r}: its scales or zero points do not fit {meta_dtype} "
                         "(overflow, or a scale that rounds to 0); use meta_dtype=torch.float32")
    c = codes.float()
    exact = (c - z.repeat_interleave(gs, 1)) * s.repeat_interleave(gs, 1)
    rounded = (c - zh.float().repeat_interleave(gs, 1)) * sh.float().repeat_interleave(gs, 1)
    steps = float(((rounded - exact).abs() / s.repeat_interleave(gs, 1)).max()) if c.numel() else 0.0
    if steps > 0.05:
        warnings.warn(f"PackedLinear.from_qat: layer {name!r}: {meta_dtype} scales / zero points move some weights by "
                      f"{steps:.2g} of a grid step (large learnt offsets or tiny scales); meta_dtype=torch.float32 "
                      "keeps them exact", stacklevel=4)
    return sh, zh


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
        raise ValueError(f"PackedLinear.from_qat: layer {name!r}: its input quantizer was never initialised (it saw "
                         "no data, or only empty / all-zero batches), so it has no range yet; run the model forward "
                         "on training data first (the QAT layer initialises it from its first batch)")
    for what, q in (("weight", layer.weight_quantizer), ("input", iq)):
        for pn in ("scale", "offset"):
            t = getattr(q, pn, None) if q is not None else None
            if isinstance(t, torch.Tensor) and not is_lazy(t) and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"PackedLinear.from_qat: layer {name!r}: its {what} quantizer's {pn} holds NaN or inf "
                                 "(diverged training?)")
    with torch.inference_mode(False), torch.no_grad():
        codes, s, z, gs = _codes(layer, name)
        if meta_dtype != torch.float32:
            s, z = _rounded_meta(codes, s, z, gs, meta_dtype, name)
        bias = layer.bias.detach() if layer.bias is not None else None
        m = PackedLinear.from_packed(PackedWeight.from_quantized(codes, s, z, layer.weight_quantizer.bits, gs), bias,
                                     backend)
        if bias is not None:  # a frozen bias stays frozen
            m.bias.requires_grad_(layer.bias.requires_grad)
        if iq is not None:
            si = iq.scale.detach().float().abs().clamp_min(iq.eps)  # as its forward uses them
            bi = iq.offset.detach().float() if iq.offset is not None else torch.zeros_like(si)
            m.set_input_quantizer(iq.bits, iq.signed, scale=si, offset=bi, per_channel=iq.granularity == "channel")
    m.train(layer.training)
    return m


def convert_qat(model: nn.Module, meta_dtype: torch.dtype = torch.float32,
                skip: Iterable[str] | Callable[[str], bool] | None = None, backend: str = "auto") -> list[str]:
    """Replace every QAT linear layer of ``model`` (in place) by its exact :class:`PackedLinear`.

    QAT linear layers are the :class:`QuantLinear` s that :func:`quantize_modules` makes; see
    :meth:`PackedLinear.from_qat` for what is kept. ``skip``: module names, as
    :func:`quantize_modules` takes them (a name also skips everything under it), fnmatch patterns
    (``"*.head"``), or a predicate on the qualified name; default None (all). A ``torch.compile``
    wrapper is converted through (names without ``_orig_mod.``).

    Layers a packed layer cannot express stay as they are (fake-quantized, still correct) with one
    warning naming each and why: 5-8-bit weights, weight groups that are not a multiple of 32
    dividing in_features, per-input-feature weight scales, input quantizers other than an
    LSQQuantizer per tensor / per input feature on its full grid, QuantLinear subclasses with a
    forward or state of their own (a LoRA subclass, a pruned or parametrized weight), Linear layers
    whose ``weight_quantizer`` is not an LSQQuantizer, and every QAT layer that is not a Linear
    (QuantConv2d). Errors in the data (NaN weights or scales, an input quantizer that never saw
    data) raise before any layer is replaced, naming the layer. Returns the converted layers' names.
    """
    from ..ptq.quantize import _unwrap_compiled

    model = _unwrap_compiled(model)
    if is_qat_linear(model):
        raise TypeError("convert_qat: model is itself a QAT layer (no parent to replace it in); use "
                        "PackedLinear.from_qat(layer)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_qat: model must be an nn.Module, got {type(model).__name__}")
    if skip is not None and not callable(skip):
        skip = (skip,) if isinstance(skip, str) else tuple(skip)  # (a generator would be spent by the first name)
        every = [n for n, _ in model.named_modules(remove_duplicate=False)]
        unused = [p for p in skip if not any(_skipped(n, (p,)) for n in every)]
        if unused:
            warnings.warn(f"convert_qat: skip entries that match no module: {unused}", stacklevel=2)

    def skipped(n: str) -> bool:  # the name or any module above it (quantize_modules' rule)
        if skip is None or callable(skip):
            return _skipped(n, skip)
        parts = n.split(".")
        return any(_skipped(".".join(parts[:i]), skip) for i in range(1, len(parts) + 1))

    found = [(names, sites, m) for names, sites, m in module_sites(model, is_qat_linear)
             if not any(skipped(n) for n in names)]
    left, todo = [], []
    for names, sites, m in found:
        why = unpackable_reason(m)
        if why:
            left.append(f"{names[0]} ({why})")
        else:
            todo.append((names[0], sites, m))
    for n, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is None or skipped(n) or is_qat_linear(m):
            continue
        if not isinstance(wq, LSQQuantizer):
            left.append(f"{n} (its weight_quantizer is a {type(wq).__name__}, not an LSQQuantizer)")
        elif not isinstance(m, nn.Linear):
            left.append(f"{n} ({type(m).__name__}: PackedLinear packs linear layers only)")
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
        warnings.warn(f"convert_qat: {len(left)} QAT layer(s) stay as they are: {'; '.join(left[:4])}"
                      f"{' ...' if len(left) > 4 else ''}", stacklevel=2)
    if not found and not left:
        warnings.warn("convert_qat: the model has no QAT linear layers (QuantLinear, e.g. from "
                      "quantkern.nn.quantize_modules)" + (" outside skip" if skip else ""), stacklevel=2)
    return [name for name, _, _ in todo]
