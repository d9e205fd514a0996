"""Mixed precision: each layer's weight bits chosen from its measured sensitivity, under a budget of average bits.

Two steps:

1. :func:`layer_sensitivity` quantizes one layer at a time (every other layer stays in float) at each
   of the candidate bit widths with a data-free method (``"hqq"`` or ``"rtn"``), runs the model on the
   calibration inputs and measures how far its output moved from the float model's: the *sensitivity*
   ``e_l(b)`` of layer ``l`` at ``b`` bits.
2. :func:`allocate_bits` picks one bit width per layer so that the mean number of code bits per weight
   (over the layers measured, each counted by its weight's element count) stays within ``budget`` and
   the sum of the sensitivities is small: the errors of one-layer perturbations add up to first order
   (on EfficientNet-Lite0 at W4, the per-kind KLs sum to 0.64 against 0.59 for all layers together;
   benchmarks/RESULTS.md), so the choice is a multiple-choice knapsack. It is solved by a greedy
   heuristic: starting from every layer's lowest width, the upgrade with the largest drop of the
   summed error per added bit that still fits the budget is taken, until none fits (small layers with a
   large error go first). A ratio greedy alone can spend the room on small gains that a large one needed,
   so the same fill is also run after each of the few single upgrades with the largest drops, and the
   allocation with the smallest summed error is kept: it is never worse than the best single upgrade
   (not necessarily optimal).

The result is a ``{layer name: bits}`` dict for ``fake_quantize_model_(..., layer_bits=...)`` (any
method: the sensitivities only rank the layers) or, with 2 / 3 / 4 bits only, for :func:`quantize_`
through ``QuantizeConfig(layer_config={name: {"bits": b} for name, b in bits.items()})``.

Group scales and zeros are not counted in the budget: they are the same per weight at every width
(one fp16 scale and zero per group), so only the code bits differ between choices. Layers that share
one weight tensor are measured once (the perturbation of all of them) and get one width; the tensor
counts once in the budget.

Which layers: the ``nn.Conv2d`` / ``nn.Linear`` modules of the model as it is. ``fake_quantize_model_``
and ``quantize_`` first turn torch's ``nn.MultiheadAttention`` and transformers' ``Conv1D`` into Linear
layers (:func:`quantkern.nn.expose_linears`); run that on the model before measuring it (a warning says
so), or those projections are never measured and keep the quantizer's default bits.

Written for this project (the idea of sensitivity-driven bit allocation is HAWQ's and others'; no code
taken from them).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..nn.packed_linear import fallback_group
from ..ops import HQQ_BITS
from .conv import _computed_weight, group_size_for, quantizable_layers
from .hqq import hqq_quantize, rtn_quantize
from ._wquant import dequantize

__all__ = ["layer_sensitivity", "allocate_bits", "average_bits", "SENSITIVITY_METRICS"]

SENSITIVITY_METRICS = ("mse", "kl")
# how a layer's group size follows from the requested one: fake_quantize_model_'s rule (the largest divisor of
# K = I*kh*kw not above it) or quantize_'s / the packed format's (it, where it divides K; else the largest
# multiple of 32 below it that does; else one group per row)
GROUP_RULES = ("divisor", "packed")


def _first_tensor(out) -> torch.Tensor:
    """The model output the metrics compare: the output itself, or the first floating-point tensor of a
    tuple / list / dict (a transformers ``ModelOutput``'s ``logits`` or ``last_hidden_state``; integer
    tensors are passed over: a sentence-transformers output dict starts with the ``input_ids``, which no
    weight changes, so every error would read 0)."""
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return out
    vals = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in vals:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise TypeError(f"layer_sensitivity: the model returned {type(out).__name__} with no floating-point tensor "
                    "in it; pass output_fn=lambda out: <the tensor to compare>")


def _calib_batches(calib_data, batch_size: int) -> list:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"layer_sensitivity: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(calib_data, torch.Tensor):
        batches = list(calib_data.split(batch_size)) if calib_data.dim() > 0 and calib_data.shape[0] > 0 else []
    elif isinstance(calib_data, Iterable) and not isinstance(calib_data, (str, bytes, Mapping)):
        batches = list(calib_data)
    else:
        raise TypeError("layer_sensitivity: calib_data must be a tensor [N, ...] or an iterable of input batches, "
                        f"got {type(calib_data).__name__}")
    if not batches:
        raise ValueError("layer_sensitivity: calib_data is empty")
    for i, xb in enumerate(batches):
        for t in (xb.values() if isinstance(xb, Mapping) else (xb,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"layer_sensitivity: calib_data batch {i} contains NaN or Inf")
    return batches


def _call(model: nn.Module, xb):
    """``model(**xb)`` for a dict batch (a tokenizer's output: input_ids, attention_mask), ``xb(model)`` for a
    callable one (``quantize_``'s ``calib_fn`` units), else ``model(xb)``."""
    if isinstance(xb, Mapping):
        return model(**xb)
    return xb(model) if callable(xb) else model(xb)


def _bits_tuple(bits) -> tuple[int, ...]:
    vals = (bits,) if isinstance(bits, int) and not isinstance(bits, bool) else tuple(bits) \
        if isinstance(bits, Iterable) and not isinstance(bits, str) else ()
    if not vals or any(isinstance(b, bool) or not isinstance(b, int) or b not in HQQ_BITS for b in vals):
        raise ValueError(f"layer_sensitivity: bits must be an int or a sequence of ints in {HQQ_BITS} (the widths "
                         f"HQQ / RTN take), got {bits!r}")
    return tuple(sorted(set(vals)))


class _Error:
    """Accumulates the distance of the quantized model's outputs from the float ones over the batches."""

    def __init__(self, metric: str):
        self.metric, self.num, self.den = metric, 0.0, 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor):
        if out.shape != ref.shape:
            raise RuntimeError(f"layer_sensitivity: output shape changed from {tuple(ref.shape)} to {tuple(out.shape)}")
        out = out.float()
        if self.metric == "kl":  # KL(float || quantized) over the last dim, summed over rows; den counts rows
            if ref.dim() == 0 or ref.shape[-1] < 2:  # (softmax over one logit is 1: every layer would measure 0)
                raise ValueError(f"layer_sensitivity: metric='kl' needs logits over >= 2 classes in the last dim, "
                                 f"got an output of shape {tuple(ref.shape)}; use metric='mse'")
            lp, lq = ref.log_softmax(-1), out.log_softmax(-1)
            self.num += float((lp.exp() * (lp - lq)).sum())
            self.den += ref.numel() // max(ref.shape[-1], 1) if ref.dim() else 1
        else:  # squared error relative to the float output's energy, over all batches
            d = out - ref
            self.num += float((d * d).sum())
            self.den += float((ref * ref).sum())

    def value(self) -> float:
        if not math.isfinite(self.num):  # the quantized output overflowed (or NaN): as bad as it gets
            return math.inf
        v = self.num / self.den if self.den > 0 else (0.0 if self.num == 0 else math.inf)
        return max(v, 0.0)  # a KL of -1e-9 is rounding


def layer_sensitivity(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable,
    bits: int | Iterable[int] = (4, 8),
    method: str = "hqq",
    group_size: int | None = 64,
    *,
    metric: str = "mse",
    skip: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    group_rule: str = "divisor",
    batch_size: int = 16,
    output_fn: Callable | None = None,
    progress: bool = True,
) -> dict[str, dict[int, float]]:
    """How much the model's output moves when one layer alone has quantized weights.

    Args:
        model: any module; its ``nn.Conv2d`` / ``nn.Linear`` layers (:func:`quantizable_layers`) are measured,
            one at a time, each by writing its dequantized weight into the float model and restoring it
            bit for bit afterwards. It runs in eval mode under ``torch.no_grad``; each submodule's mode is
            given back at the end.
        calib_data: a tensor ``[N, ...]`` of inputs (split into ``batch_size`` batches) or an iterable of
            batches, each passed as ``model(batch)``, as ``model(**batch)`` where it is a dict (a tokenizer's
            ``input_ids`` / ``attention_mask``), or called as ``batch(model)`` where it is a callable (e.g.
            ``lambda m: m(features)`` for a sentence-transformers model, which takes one dict). Float
            tensors with NaN / Inf are refused.
        bits: the candidate widths (1, 2, 3, 4 or 8: what HQQ / RTN take); every layer is measured at each.
        method: ``"hqq"`` (:func:`hqq_quantize`) or ``"rtn"`` (:func:`rtn_quantize`), data-free, so one
            measurement costs one pass over ``calib_data``: ``len(layers) * len(bits)`` passes in all,
            plus one for the float outputs (keep ``calib_data`` small: 32-64 images were enough to rank
            EfficientNet-Lite0's layers).
        group_size: requested group size (None / -1: one group per row).
        group_rule: how a layer's group size follows from it: ``"divisor"`` (default) as
            ``fake_quantize_model_`` (:func:`group_size_for`: the largest divisor of ``I*kh*kw`` not above
            it), ``"packed"`` as ``quantize_`` (``group_size`` where it divides ``in_features``, else the
            largest multiple of 32 below it that does, else one group per row): measure with the rule of
            the quantizer the allocation is for.
        metric: ``"mse"``: ``sum ||y_q - y||^2 / sum ||y||^2`` over all batches (any output); ``"kl"``:
            the mean over the output's rows of ``KL(softmax(y) || softmax(y_q))`` along its last dim
            (classifier logits).
        skip: names of Conv2d / Linear layers (any name a layer is registered under) to leave out of the
            measurement, and so of :func:`allocate_bits`' result, or a predicate ``(name, module) -> bool``
            called with each layer's first name (give the quantizer the same ``skip`` to keep them in float).
        output_fn: maps the model's return value to the tensor compared; default: the output, or the
            first floating-point tensor of a tuple / list / dict (transformers: ``logits`` /
            ``last_hidden_state``; sentence-transformers: ``token_embeddings``).
        progress: a tqdm bar over the measurements.

    Returns:
        ``{layer name: {bits: error}}`` in module order, errors as Python floats >= 0; ``inf`` where the
        quantized model's output was not finite (e.g. an fp16 model overflowing). Layers that share one
        weight tensor are measured once and each get that result.

    Layers whose weight is computed (parametrizations, ``weight_norm``) are left out, as
    ``fake_quantize_model_`` keeps them in float.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_sensitivity: model must be an nn.Module, got {type(model).__name__}")
    bits_t = _bits_tuple(bits)
    if method not in ("hqq", "rtn"):
        raise ValueError(f"layer_sensitivity: method must be 'hqq' or 'rtn' (data-free: one pass per measurement), "
                         f"got {method!r}")
    if metric not in SENSITIVITY_METRICS:
        raise ValueError(f"layer_sensitivity: metric must be one of {SENSITIVITY_METRICS}, got {metric!r}")
    group_size_for(1, group_size)  # checks it (ValueError naming group_size)
    if group_rule not in GROUP_RULES:
        raise ValueError(f"layer_sensitivity: group_rule must be one of {GROUP_RULES}, got {group_rule!r}")
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"layer_sensitivity: output_fn must be callable, got {type(output_fn).__name__}")
    batches = _calib_batches(calib_data, batch_size)
    layers = _measured_layers(model, skip)
    if not layers:
        raise ValueError("layer_sensitivity: the model has no Conv2d / Linear layer to measure (after skip)")
    get = output_fn or _first_tensor
    quant = hqq_quantize if method == "hqq" else rtn_quantize

    was = [(m, m.training) for m in model.modules()]
    stack = contextlib.ExitStack()  # the progress bar, closed on any exit
    try:
        model.eval()
        with torch.no_grad():
            refs = [_reference(get(_call(model, xb)), i) for i, xb in enumerate(batches)]
            out: dict[str, dict[int, float]] = {}
            bar = stack.enter_context(_bar(len(layers) * len(bits_t), progress))
            done: dict[int, str] = {}  # id of a weight tensor -> the first layer measured with it
            for name, mod in layers:
                w = mod.weight
                if id(w) in done:  # shared with a layer measured already: the same perturbation
                    out[name] = dict(out[done[id(w)]])
                    bar.update(len(bits_t))
                    continue
                done[id(w)] = name
                W0 = w.detach().clone()
                W2 = W0.float().reshape(W0.shape[0], -1)
                g = _group(W2.shape[1], group_size, group_rule)
                out[name] = {}
                try:
                    for b in bits_t:
                        bar.set_postfix_str(f"{name} W{b}", refresh=False)
                        try:
                            q, s, z = quant(W2, b, g, warn=False)
                        except ValueError as e:  # e.g. NaN / Inf weights: say which layer
                            raise ValueError(f"layer_sensitivity: layer {name!r}: {e}") from None
                        w.data.copy_(dequantize(q, s, z).reshape(W0.shape).to(W0.dtype))
                        err = _Error(metric)
                        for xb, ref in zip(batches, refs):
                            err.add(ref, get(_call(model, xb)))
                        out[name][b] = err.value()
                        bar.update(1)
                finally:
                    w.data.copy_(W0)
    finally:
        stack.close()
        for m, t in was:
            m.train(t)
    return out


def _reference(out, i: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"layer_sensitivity: output_fn must return a floating-point tensor, got "
                        f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}")
    if not torch.isfinite(out).all():
        raise ValueError(f"layer_sensitivity: the float model's output on calib_data batch {i} has NaN or Inf")
    return out.detach().float()


def _group(K: int, group_size, rule: str) -> int:
    if rule == "divisor" or group_size in (None, -1):
        return group_size_for(K, group_size)
    return group_size if K % group_size == 0 else fallback_group(K, group_size)


def _measured_layers(model: nn.Module, skip) -> list[tuple[str, nn.Module]]:
    from ..nn.expose import _is_hf_conv1d

    if callable(skip):
        drop = skip
    else:
        if isinstance(skip, str):
            raise TypeError("layer_sensitivity: skip must be a collection of layer names or a predicate, not a "
                            f"string ({skip!r}); wrap one name in a list")
        names = set(skip)
        aliases: dict[int, set] = {}  # every name each Conv2d / Linear is registered under
        for n, m in model.named_modules(remove_duplicate=False):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                aliases.setdefault(id(m), set()).add(n)
        unknown = names - set().union(*aliases.values())
        if unknown:
            raise ValueError(f"layer_sensitivity: skip names no Conv2d / Linear layer of the model: {sorted(unknown)}")
        drop = lambda n, m: bool(aliases[id(m)] & names)  # noqa: E731
    hidden = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) or _is_hf_conv1d(m)]
    if hidden:
        warnings.warn(f"layer_sensitivity: {len(hidden)} nn.MultiheadAttention / transformers Conv1D module(s) "
                      f"({', '.join(hidden[:3])}{', ...' if len(hidden) > 3 else ''}) hold projections that are not "
                      "Linear layers, so they are not measured; quantkern.nn.expose_linears(model) first makes them "
                      "Linear layers, as fake_quantize_model_ / quantize_ do", stacklevel=3)
    return [(n, m) for n, m in quantizable_layers(model) if not drop(n, m) and not _computed_weight(m)]


def _bar(total: int, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="layer sensitivity", disable=not on, leave=False)


def _weights_of(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        try:
            mod = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"no module named {n!r} in the model") from None
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"module {n!r} has no weight tensor")
        out[n] = w
    return out


def _shared_groups(model: nn.Module, names: Iterable[str]) -> list[tuple[list[str], int]]:
    """The names grouped by the weight tensor they hold (first-seen order), with its element count."""
    groups: dict[int, tuple[list[str], int]] = {}
    for n, w in _weights_of(model, names).items():
        groups.setdefault(id(w), ([], w.numel()))[0].append(n)
    return list(groups.values())


def average_bits(model: nn.Module, layer_bits: Mapping[str, int]) -> float:
    """The mean code bits per weight of ``layer_bits`` (``{layer name: bits}``), each layer weighted by its
    weight's element count (a weight tensor that several named layers share counts once; the layers not
    named are not counted)."""
    if not layer_bits:
        raise ValueError("average_bits: layer_bits is empty")
    groups = _shared_groups(model, layer_bits)
    for names, _ in groups:
        if len({layer_bits[n] for n in names}) > 1:
            raise ValueError(f"average_bits: layers {names} share one weight tensor but are given different bits "
                             f"{[layer_bits[n] for n in names]}")
    return sum(k * layer_bits[names[0]] for names, k in groups) / sum(k for _, k in groups)


def allocate_bits(model: nn.Module, sensitivity: Mapping[str, Mapping[int, float]], budget: float,
                  restarts: int = 8) -> dict[str, int]:
    """One bit width per layer, with the mean code bits per weight at most ``budget`` (see the module docstring).

    Args:
        model: the model the names refer to (for each layer's weight element count).
        sensitivity: ``{layer name: {bits: error}}``, e.g. from :func:`layer_sensitivity`; the layers may
            offer different widths; errors may be ``inf`` (a width to avoid). Layers that share one weight
            tensor are one choice (the first name's errors) and get one width.
        budget: the largest mean code bits per weight over the named layers; at least the mean of every
            layer's lowest width (that allocation is the start).
        restarts: how many of the single upgrades with the largest error drops the greedy fill is also
            run after (the best result is kept; 0: the plain ratio greedy).

    Returns:
        ``{layer name: bits}`` for every named layer, in ``sensitivity``'s order. A layer moves to a wider
        width only where its measured error there is lower.
    """
    if not isinstance(sensitivity, Mapping) or not sensitivity:
        raise ValueError("allocate_bits: sensitivity must be a non-empty dict {layer name: {bits: error}}")
    for n, errs in sensitivity.items():
        if not isinstance(errs, Mapping) or not errs:
            raise ValueError(f"allocate_bits: sensitivity[{n!r}] must be a non-empty dict {{bits: error}}")
        for b, e in errs.items():
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
                raise ValueError(f"allocate_bits: sensitivity[{n!r}] has bits {b!r}; bits must be ints in [1, 8]")
            if not isinstance(e, (int, float)) or isinstance(e, bool) or math.isnan(e) or e < 0:
                raise ValueError(f"allocate_bits: sensitivity[{n!r}][{b}] must be an error >= 0 (inf allowed), "
                                 f"got {e!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"allocate_bits: budget must be a finite number of bits per weight, got {budget!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ValueError(f"allocate_bits: restarts must be an int >= 0, got {restarts!r}")
    groups = _shared_groups(model, sensitivity)
    errs = [dict(sensitivity[names[0]]) for names, _ in groups]
    sizes = [k for _, k in groups]
    total = sum(sizes)
    start = [min(e) for e in errs]
    room0 = budget * total - sum(k * b for k, b in zip(sizes, start))  # bit-weights still to give
    if room0 < -1e-9 * total:
        raise ValueError(f"allocate_bits: budget {budget:g} is below {(budget * total - room0) / total:.4g} bits per "
                         "weight, the mean of every layer's lowest width")
    slack = 1e-9 * total  # the budget's own float rounding

    def upgrades(cur, room):
        """(drop, added bit-weights, item, bits) of every single upgrade that fits and lowers the error."""
        for i, (e, k) in enumerate(zip(errs, sizes)):
            e0 = e[cur[i]]
            for b, eb in e.items():
                cost = k * (b - cur[i])
                if b > cur[i] and eb < e0 and cost <= room + slack:
                    yield e0 - eb, cost, i, b

    def fill(cur, room):
        cur = list(cur)
        while True:
            # largest drop per added bit; an infinite drop (from an inf error) first; ties: the earlier layer
            best = max(upgrades(cur, room), default=None,
                       key=lambda u: (u[0] / u[1] if math.isfinite(u[0]) else math.inf, -u[2], -u[3]))
            if best is None:
                return cur
            cur[best[2]], room = best[3], room - best[1]

    def score(cur):
        return sum(e[b] for e, b in zip(errs, cur))

    best = fill(start, room0)
    firsts = sorted(upgrades(start, room0), key=lambda u: (-u[0], u[2], u[3]))[:restarts]
    for drop, cost, i, b in firsts:
        cur = list(start)
        cur[i] = b
        cand = fill(cur, room0 - cost)
        if score(cand) < score(best):
            best = cand
    out = {}
    for (names, _), b in zip(groups, best):
        out.update({n: b for n in names})
    return {n: out[n] for n in sensitivity}
