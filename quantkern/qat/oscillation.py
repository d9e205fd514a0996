"""Oscillation tracking + iterative weight freezing, and oscillation dampening
(Nagel et al. 2022), attached to quantized layers in a few lines::

    tracker = OscillationTracker(model, momentum=0.01)
    thr = freeze_threshold_schedule(total_steps, 0.1, 0.01)       # 0 for the first 25%
    damp = DampeningLoss(model)
    lam = dampening_schedule(total_steps, 0.1)                    # 0 for the first 25%
    for step, (x, y) in enumerate(loader, start=1):               # schedules count steps from 1
        loss = F.cross_entropy(model(x), y) + damp(weighting=lam(step))
        opt.zero_grad(); loss.backward(); opt.step()
        tracker.step(freeze_threshold=thr(step))                  # after the optimiser step

``tracker.step`` runs the fused kernel ``quantkern.ops.oscillation_update`` once per
layer: 8 bytes of state per weight, one pass. Frozen weights are kept in place by
(1) the kernel rewriting them to ``q_frozen * s + beta`` every step (the scale and
offset keep training, so the integer stays q_frozen in the next forward), and
(2) optionally (``grad_mask=True``, default) a gradient hook that zeroes their
gradient, so the optimiser's momentum/Adam state does not carry them (the official
code gives them no gradient either: their integer is a constant), and (3) optionally
(``frozen_grad="official"``) a forward hook on each weight quantizer that makes their
output ``q_frozen * s + beta`` with q_frozen a constant, so the scale and offset get the
official code's gradients from them (``q_frozen`` and 1).
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref

import torch
from torch import nn

from .. import ops
from ..reference.fake_quant_lsq import lsq_param_view
from ..reference.oscillation import FREQ_ONE, FREQ_SHIFT, FROZEN_BIT, decode_state
from ._layers import QLayer, quantized_layers


class _Tracked:
    def __init__(self, layer: QLayer):
        self.layer = layer
        self.meta: torch.Tensor | None = None
        self.ema: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # int64 [2], last step
        self.freezing_started = False
        self.hook = None
        self.hooked = None  # the Parameter the hook sits on (a load_state_dict(assign=True) replaces it)
        self.fwd_hook = None  # frozen_grad="official": on the weight quantizer
        self.fwd_hooked = False  # fwd_hook is set (a bool: a compiled step() cannot read the handle)


def _check_layers_current(owner: str, model: nn.Module, layers: list[QLayer]) -> None:
    """A layer replaced in the model after ``owner`` was built (``model.c2 = ...``) would silently be
    left out (the old module is still the one used): raise instead. Judged by identity (is the layer's
    module still in the model?), not by name: ``layers`` may come from a submodule, whose names are
    relative to it."""
    mods = {id(m) for m in model.modules()}
    for L in layers:
        if id(L.module) not in mods:
            raise RuntimeError(f"{owner}: layer {L.name!r} is no longer in the model (replaced after the {owner} was "
                               f"built); build a new {owner}")
        # (a new quantizer, e.g. other bits: the grid and scale read at build time would be stale, and frozen
        # weights rewritten onto a grid the model no longer uses)
        if getattr(L.module, "weight_quantizer", L.quantizer) is not L.quantizer:
            raise RuntimeError(f"{owner}: the weight_quantizer of layer {L.name!r} was replaced after the {owner} was "
                               f"built; build a new {owner}")


class _FrozenForwardHook:
    """Forward hook on a weight quantizer (frozen_grad="official"): its frozen entries become
    ``q_frozen * s + beta`` with q_frozen (the state's integer field) a constant, so they give the
    scale ``q_frozen`` and the offset 1 (times the LSQ gradient scale) and the weight nothing, as the
    official code's frozen integer does. The values equal what the fake-quant gave (the tracker wrote
    the weight onto that grid point); only the gradients change.

    It holds the layer's state weakly: once its tracker is gone (deleted, or replaced by a new one)
    it passes the output through. It pickles as such a spent hook, so ``torch.save(model)`` works."""

    def __init__(self, t: _Tracked | None):
        self.ref = weakref.ref(t) if t is not None else None

    def __reduce__(self):
        return (_FrozenForwardHook, (None,))

    def __call__(self, mod, inputs, out):
        t = self.ref() if self.ref is not None else None
        if t is None or t.meta is None or not t.freezing_started or not inputs:
            return out
        L = t.layer
        if inputs[0] is not L.module.weight:
            return out
        q = L.quantizer
        shape = out.shape
        meta = t.meta.reshape(t.meta.shape if L.group_size is not None else shape).to(out.device)  # (model moved)
        o = out.reshape(meta.shape)
        frozen = (meta & (1 << FROZEN_BIT)) != 0
        qf = ((meta & 0xFF) ^ 0x80) - 0x80  # the int8 integer field (sign-extended)
        s, b = L.params(detach=False)
        # the quantizer's LSQ gradient scale: LSQQuantizer's grad_scale (None: its default
        # 1 / sqrt(N qmax)); a quantizer without the attribute: 1 (fake_quant_lsq's default)
        g = getattr(q, "grad_scale", 1.0)
        if g is None:
            g = 1.0 / math.sqrt(max(1, o.numel() // s.numel()) * L.qmax)
        # value exactly s (s * g + (s - s * g) was off by an ulp for some s), gradient scaled by g (as the
        # LSQ kernel's): the added term is an exact 0 in the forward
        s = s.detach() + (s - s.detach()) * g
        b = b.detach() + (b - b.detach()) * g
        axis, gs = L.axis, L.group_size
        x_frozen = qf.float() * lsq_param_view(o, s, axis, gs) + lsq_param_view(o, b, axis, gs)
        return torch.where(frozen, x_frozen.to(o.dtype), o).reshape(shape)


def _finite_real(v) -> bool:
    """A finite real number (int, float, 0-d tensor; not a bool or a string)."""
    if isinstance(v, (bool, str)):
        return False
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    # not math.isfinite: under torch.compile a scheduled value (a lambda, a threshold) becomes a symbolic
    # float from its second distinct value on, which math.isfinite cannot trace (fullgraph=True failed)
    return f - f == 0  # inf - inf and NaN give NaN


def _check_threshold(owner: str, th) -> None:
    """A freeze threshold is compared with a frequency EMA in [0, 1]: a negative one silently
    disabled freezing (the op treats ``<= 0`` as "off") and one above 1 could never be reached."""
    if not _finite_real(th):
        raise ValueError(f"{owner}: freeze_threshold must be a finite number, got {th!r}")
    if not 0 <= float(th) <= 1:
        raise ValueError(f"{owner}: freeze_threshold must be in [0, 1] (a frequency; 0: no freezing), got {th!r}")


def _warn_tied_untracked(model: nn.Module, layers: list[QLayer]) -> None:
    """Warn when a tracked weight is also a Parameter of a module that is not its layer (an LM head
    tied to the embedding): freezing writes the frozen values into the one shared tensor and the
    gradient mask zeroes its whole gradient, so the other module's use of it freezes too."""
    owner = {id(l.weight): l for l in layers}
    own = {id(l.weight): {id(m) for m in l.module.modules()} for l in layers}  # (a parametrization's original)
    ties = []
    for mname, mod in model.named_modules():
        for pname, p in mod._parameters.items():
            l = owner.get(id(p))
            if l is not None and id(mod) not in own[id(p)]:
                ties.append(f"{l.name!r} with {mname + '.' + pname if mname else pname!r}")
    if ties:
        warnings.warn(f"OscillationTracker: tracked weight(s) tied to a module that is not tracked: {', '.join(ties[:3])}"
                      f"{' ...' if len(ties) > 3 else ''}. Freezing writes the frozen values into the shared tensor and "
                      "the gradient mask zeroes its gradient, for the other module too; leave such a layer out "
                      "(layers=...) or untie it", stacklevel=3)


class OscillationTracker:
    """Tracks integer oscillations of every quantized weight and freezes the oscillating ones.

    Args:
        model: any module; every submodule with ``weight`` and ``weight_quantizer`` is
            tracked (see quantkern.qat._layers), or pass ``layers`` explicitly.
        momentum: EMA momentum of the frequency and integer EMAs (official class 0.01,
            paper runs 0.001).
        freeze_threshold: default threshold for :meth:`step`, in [0, 1] (0: track only).
        max_bits: skip layers with more bits (official default 4; None: track all).
        grad_mask: zero the gradient of frozen weights (a tensor hook on each weight, checked
            on every step: a weight that starts requiring grad later, or a Parameter replaced by
            ``load_state_dict(..., assign=True)``, gets one; :meth:`remove_hooks` removes them).
        frozen_grad: what a frozen weight gives its quantizer's scale / offset. "grid" (default):
            nothing extra: the weight sits on its grid point, so (inside the range) it contributes
            ``round(v) - v = 0``. "official": as the official code, whose frozen integer is a
            constant inside the quantizer's forward: ``q_frozen * s + beta`` contributes
            ``q_frozen`` to the scale's gradient and 1 to the offset's (times the LSQ gradient
            scale: the quantizer's ``grad_scale``, None meaning LSQQuantizer's
            ``1 / sqrt(N / numel(scale) * qmax)``, 1 without the attribute), and the weight 0
            (whatever ``grad_mask``). A forward hook on each weight quantizer (registered here:
            build the tracker before ``torch.compile``, which does not see hooks added later)
            replaces the frozen entries of its output (same values) once a step has had a freeze
            threshold. It is unfused PyTorch over the weight: a 2048x2048 QuantLinear's forward +
            backward took 3.6x as long at batch 8 and 1.7x at batch 512.
        backend: kernel backend ("auto", "native", "triton").

    The state is created on the first :meth:`step` (after the quantizers have been
    initialised by a forward), from the integers the weights have then.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.01, freeze_threshold: float = 0.0,
                 max_bits: int | None = 4, grad_mask: bool = True, backend: str = "auto",
                 layers: list[QLayer] | None = None, frozen_grad: str = "grid"):
        if not _finite_real(momentum) or not 0 < float(momentum) <= 1:
            raise ValueError(f"OscillationTracker: momentum must be in (0, 1], got {momentum!r}")
        if frozen_grad not in ("official", "grid"):
            raise ValueError(f"OscillationTracker: frozen_grad must be 'official' or 'grid', got {frozen_grad!r}")
        self.frozen_grad = frozen_grad
        _check_threshold("OscillationTracker", freeze_threshold)
        if not isinstance(grad_mask, bool):  # a truthy string ("no") would silently turn the masks on
            raise TypeError(f"OscillationTracker: grad_mask must be a bool, got {grad_mask!r}")
        if backend not in ops.BACKENDS:  # else it would only fail at the first step()
            raise ValueError(f"OscillationTracker: backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.momentum = float(momentum)
        self.freeze_threshold = float(freeze_threshold)
        self.backend = backend
        self.grad_mask = grad_mask
        layers = quantized_layers(model, max_bits) if layers is None else layers
        if not layers:
            raise ValueError("OscillationTracker: the model has no quantized layer (module with weight and "
                             f"weight_quantizer) of at most max_bits={max_bits} bits (max_bits=None tracks every one)")
        seen = {}
        for l in layers:  # tied weights: two layers would freeze and rewrite one tensor with two grids
            if not -128 <= l.qmin < l.qmax <= 127:  # (else the first step() failed, naming no layer)
                raise ValueError(f"OscillationTracker: layer {l.name!r} has the integer grid [{l.qmin}, {l.qmax}]; the "
                                 "state keeps integers in int8 (-128 <= qmin < qmax <= 127): leave it out (max_bits, "
                                 "layers=...)")
            if id(l.weight) in seen:
                raise ValueError(f"OscillationTracker: layers {seen[id(l.weight)]!r} and {l.name!r} share one weight "
                                 "tensor; track one of them (pass layers=...)")
            seen[id(l.weight)] = l.name
        _warn_tied_untracked(model, layers)
        self.model = model
        self.tracked = {l.name: _Tracked(l) for l in layers}
        self.steps = 0
        for t in self.tracked.values():  # now, not at the first freeze: torch.compile does not see hooks added later
            self._ensure_forward_hook(t)

    # ---------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, freeze_threshold: float | None = None) -> dict[str, torch.Tensor]:
        """One tracking (+ freezing) step for every layer; returns {name: int64 [2]} counts
        (oscillations this step, frozen so far) without a host sync."""
        if freeze_threshold is not None:
            _check_threshold("OscillationTracker.step", freeze_threshold)
        th = self.freeze_threshold if freeze_threshold is None else float(freeze_threshold)
        out = {}
        self._check_layers_current()
        for name, t in self.tracked.items():
            L = t.layer
            w = L.weight_view()
            s, b = L.params()
            if t.meta is None:
                t.meta, t.ema = ops.oscillation_init_state(w, s, b, L.qmin, L.qmax, axis=L.axis, group_size=L.group_size)
            elif t.meta.device != w.device:  # the model was moved (model.cuda()) after the state was made
                t.meta, t.ema = t.meta.to(w.device), t.ema.to(w.device)
            t.counts = ops.oscillation_update(
                w, s, b, t.meta, t.ema, L.qmin, L.qmax, axis=L.axis, group_size=L.group_size,
                momentum=self.momentum, freeze_threshold=th, backend=self.backend,
            )
            L.write_back(w)  # frozen weights were set in w (a copy for a channels_last weight)
            if th > 0:
                t.freezing_started = True
            self._ensure_hook(t)
            self._ensure_forward_hook(t)  # after remove_hooks() and frozen_grad set back to "official"
            out[name] = t.counts
        self.steps += 1
        return out

    def _ensure_hook(self, t: _Tracked) -> None:
        """The gradient mask on the layer's current weight Parameter, once freezing has started."""
        if not (self.grad_mask and t.freezing_started):
            return
        w = t.layer.weight
        if t.hooked is w:  # (hooked is set and cleared with hook; not reading the handle lets dynamo trace step)
            return
        if t.hook is not None:
            t.hook.remove()
            t.hook = t.hooked = None
        if w.requires_grad:
            t.hook, t.hooked = w.register_hook(self._make_hook(t)), w

    def _ensure_forward_hook(self, t: _Tracked) -> None:
        if self.frozen_grad == "official" and not t.fwd_hooked:
            t.fwd_hook = t.layer.quantizer.register_forward_hook(_FrozenForwardHook(t))
            t.fwd_hooked = True

    def _check_layers_current(self) -> None:
        _check_layers_current("OscillationTracker", self.model, [t.layer for t in self.tracked.values()])

    @staticmethod
    def _make_hook(t: _Tracked):
        ref = weakref.ref(t)  # weakly: a discarded tracker stops masking (and its state can be freed)

        def hook(grad):
            t = ref()
            if t is None:
                return grad
            frozen = (t.meta & (1 << FROZEN_BIT)) != 0
            return grad.masked_fill(frozen.view(grad.shape).to(grad.device), 0)

        return hook

    def remove_hooks(self) -> None:
        """Remove the gradient masks and the frozen-integer forward hooks (``grad_mask = False``,
        ``frozen_grad = "grid"``; set them back to resume on the next step, before a new
        ``torch.compile``)."""
        self.grad_mask = False
        self.frozen_grad = "grid"
        for t in self.tracked.values():
            if t.hook is not None:
                t.hook.remove()
                t.hook = t.hooked = None
            if t.fwd_hooked:
                t.fwd_hook.remove()
                t.fwd_hook, t.fwd_hooked = None, False

    # ---------------------------------------------------------------- inspection
    def _state(self, name: str):
        if name not in self.tracked:
            raise KeyError(f"OscillationTracker: no tracked layer {name!r} (tracked: {sorted(self.tracked)})")
        t = self.tracked[name]
        if t.meta is None:
            raise RuntimeError(f"OscillationTracker: layer {name!r} has no state before the first step()")
        return t

    def frozen_mask(self, name: str) -> torch.Tensor:
        t = self._state(name)
        return ((t.meta & (1 << FROZEN_BIT)) != 0).view(t.layer.weight.shape)

    def frequency(self, name: str) -> torch.Tensor:
        t = self._state(name)
        F = (t.meta >> FREQ_SHIFT) & 0xFFFFF
        return (F.float() / FREQ_ONE).view(t.layer.weight.shape)

    def decode(self, name: str) -> dict[str, torch.Tensor]:
        """All state fields of a layer (q_prev, last_dir, frozen, ema_live, F, q_ema)."""
        t = self._state(name)
        d = decode_state(t.meta)
        d["q_ema"] = t.ema
        return {k: v.view(t.layer.weight.shape) for k, v in d.items()}

    def metrics(self, osc_freq: float = 0.005) -> dict[str, dict[str, float]]:
        """Per layer: numel, frac_oscillating (unfrozen weights with frequency EMA > osc_freq,
        over all weights), osc_last_step (fraction that oscillated in the last step),
        frozen_frac. Synchronises with the device."""
        out = {}
        for name, t in self.tracked.items():
            if t.meta is None:
                continue
            n = t.meta.numel()
            frozen = (t.meta & (1 << FROZEN_BIT)) != 0
            f = ((t.meta >> FREQ_SHIFT) & 0xFFFFF).float() / FREQ_ONE
            c = t.counts.tolist() if t.counts is not None else [0, 0]
            d = max(n, 1)  # (an empty layer: fractions 0)
            out[name] = {
                "numel": n,
                "frac_oscillating": float(((f > osc_freq) & ~frozen).sum()) / d,
                "osc_last_step": c[0] / d,
                "frozen_frac": float(frozen.sum()) / d,
            }
        return out

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"steps": self.steps, "momentum": self.momentum, "frozen_grad": self.frozen_grad,
                "layers": {n: {"meta": t.meta, "ema": t.ema, "freezing_started": t.freezing_started}
                           for n, t in self.tracked.items() if t.meta is not None}}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`. Layer names may differ by ``module.`` / ``_orig_mod.`` prefixes (DDP,
        torch.compile); every layer with state in the checkpoint must be tracked here and have the
        weight's number of elements."""
        layers = dict(sd["layers"])

        def strip(n: str) -> str:  # wrappers' prefixes: DDP's module., torch.compile's _orig_mod.
            while n.startswith(("module.", "_orig_mod.")):
                n = n.split(".", 1)[1]
            return n

        if set(layers) - set(self.tracked):
            layers = {strip(n): st for n, st in layers.items()}
            tracked = {strip(n): n for n in self.tracked}
            layers = {tracked.get(n, n): st for n, st in layers.items()}
        unknown = sorted(set(layers) - set(self.tracked))
        if unknown:
            raise KeyError(f"OscillationTracker.load_state_dict: the checkpoint has state for {unknown}, which are not "
                           f"tracked here (tracked: {sorted(self.tracked)})")
        for n, st in layers.items():
            numel = self.tracked[n].layer.weight.numel()
            if st["meta"].numel() != numel or st["ema"].numel() != numel:
                raise ValueError(f"OscillationTracker.load_state_dict: layer {n!r} state has {st['meta'].numel()} "
                                 f"elements, its weight {numel}")
        self.steps = int(sd["steps"])
        if "momentum" in sd:  # the checkpoint's EMAs were built with it
            self.momentum = float(sd["momentum"])
        if sd.get("frozen_grad", self.frozen_grad) != self.frozen_grad:
            warnings.warn(f"OscillationTracker: the checkpoint was trained with frozen_grad="
                          f"{sd['frozen_grad']!r}, this tracker uses {self.frozen_grad!r}", stacklevel=2)
        for n, st in layers.items():
            t = self.tracked[n]
            dev = t.layer.weight.device
            t.meta, t.ema = st["meta"].to(dev).clone(), st["ema"].to(dev).clone()
            t.freezing_started = t.freezing_started or bool(st.get("freezing_started"))
            self._ensure_hook(t)


def _check_weighting(owner: str, lam) -> float:
    """lambda >= 0 and finite; a bad one used to surface as the op's "norm must be ... >= 0, got
    <lambda * norm>" (or a bare float() error), which names neither the argument nor its value."""
    if not _finite_real(lam) or float(lam) < 0:
        raise ValueError(f"{owner}: weighting must be a finite number >= 0, got {lam!r}")
    return float(lam)


_AGGREGATIONS = ("kernel_mean", "channel_mean", "sum", "mean")


class DampeningLoss:
    """Oscillation dampening regulariser over every quantized layer (fused kernel per layer).

    ``loss = weighting * sum_layers norm_l * sum((q*s + beta).detach() - clamp(w, s*qmin + beta, s*qmax + beta))^2``
    with the aggregation deciding ``norm_l``:

    * ``"kernel_mean"`` (default; the official code's default, ``loss.sum(0).mean()``):
      summed over the output-channel axis, averaged over the rest -> ``shape[0] / numel``;
    * ``"channel_mean"``: summed per output channel, averaged over channels -> ``1 / shape[0]``;
    * ``"sum"`` -> 1; ``"mean"`` -> ``1 / numel``.

    Gradient flows to the weights only. ``weighting`` is the lambda (see
    :func:`dampening_schedule`); calling with lambda = 0 costs nothing.
    """

    def __init__(self, model: nn.Module, weighting: float = 1.0, aggregation: str = "kernel_mean",
                 max_bits: int | None = None, backend: str = "auto", layers: list[QLayer] | None = None):
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"DampeningLoss: aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
        if backend not in ops.BACKENDS:  # else it would only fail at the first call
            raise ValueError(f"DampeningLoss: backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.model = model
        self.layers = quantized_layers(model, max_bits) if layers is None else layers
        if not self.layers:
            raise ValueError("DampeningLoss: the model has no quantized layer (module with weight and weight_quantizer)")
        self.weighting = _check_weighting("DampeningLoss", weighting)
        self.aggregation = aggregation
        self.backend = backend

    def _norm(self, w: torch.Tensor) -> float:
        n, rows = w.numel(), w.shape[0] if w.dim() else 1
        return {"kernel_mean": rows / n, "channel_mean": 1.0 / rows, "sum": 1.0, "mean": 1.0 / n}[self.aggregation]

    def __call__(self, weighting: float | None = None) -> torch.Tensor:
        lam = self.weighting if weighting is None else _check_weighting("DampeningLoss", weighting)
        dev = self.layers[0].weight.device
        if lam == 0.0:
            return torch.zeros((), device=dev)
        _check_layers_current("DampeningLoss", self.model, self.layers)
        total = None
        for L in self.layers:
            w = L.weight
            if w.numel() == 0:  # (adds 0; its norm would divide by 0)
                continue
            if L.group_size is not None and w.dim() != 2:
                w = w.reshape(w.shape[0], -1)
            s, b = L.params()
            term = ops.dampening_loss(w, s, b, L.qmin, L.qmax, axis=L.axis, group_size=L.group_size,
                                      norm=self._norm(L.weight), backend=self.backend)
            total = term if total is None else total + term
        if total is None:  # (every layer empty)
            return torch.zeros((), device=dev)
        # lambda multiplies outside the op: a float argument of an op is a constant to torch.compile, so a
        # scheduled lambda passed into it recompiled the step at every new value (the 9th fails fullgraph)
        return total * lam


# ------------------------------------------------------------------ schedules
class CosineSchedule:
    """``end + 0.5 (start - end)(1 + cos(pi t))`` with t = (step - warmup) / (total - warmup),
    and ``warmup_value`` for the first ``warmup_frac`` of the steps (the official CosineTempDecay
    with rel_decay_start; steps past ``total_steps`` give ``end``). Steps count from 1 as in the
    official code: the last of ``total_steps`` steps is ``step = total_steps`` and gets ``end``
    (``for step, batch in enumerate(loader, start=1)``)."""

    def __init__(self, start: float, end: float, total_steps: int, warmup_frac: float = 0.25,
                 warmup_value: float | None = None):
        if isinstance(total_steps, float) and total_steps.is_integer():
            total_steps = int(total_steps)
        if isinstance(total_steps, numbers.Integral) and not isinstance(total_steps, bool):
            total_steps = int(total_steps)  # (NumPy integers: refused with a message naming a positive integer)
        elif isinstance(total_steps, torch.Tensor) and total_steps.dim() == 0 and not total_steps.is_floating_point() \
                and total_steps.dtype != torch.bool:
            total_steps = int(total_steps)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"CosineSchedule: total_steps must be a positive integer, got {total_steps!r}")
        if not _finite_real(warmup_frac) or not 0 <= float(warmup_frac) < 1:
            raise ValueError(f"CosineSchedule: warmup_frac must be a number in [0, 1), got {warmup_frac!r}")
        warmup_frac = float(warmup_frac)
        for name, v in (("start", start), ("end", end), ("warmup_value", warmup_value)):
            if v is not None and not _finite_real(v):
                raise ValueError(f"CosineSchedule: {name} must be a finite number, got {v!r}")
        self.start, self.end, self.total = float(start), float(end), int(total_steps)
        self.warmup = warmup_frac * total_steps
        self.warmup_value = self.start if warmup_value is None else float(warmup_value)

    def __call__(self, step: int) -> float:
        if not _finite_real(step):  # a NaN step fell through every comparison and gave ``end``
            raise ValueError(f"CosineSchedule: step must be a finite number, got {step!r}")
        step = float(step)
        if step < self.warmup:
            return self.warmup_value
        t = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * t))


def freeze_threshold_schedule(total_steps: int, f_start: float = 0.1, f_end: float = 0.01,
                              warmup_frac: float = 0.25) -> CosineSchedule:
    """Threshold 0 (no freezing) for the first ``warmup_frac``, then cosine from f_start to f_end
    (paper, MobileNetV2: 4-bit 0.1 -> 0.01, 3-bit 0.1 -> 0.011). Both are frequencies, in [0, 1]."""
    for name, v in (("f_start", f_start), ("f_end", f_end)):  # the tracker refuses them later, mid-run
        if not _finite_real(v) or not 0 <= float(v) <= 1:
            raise ValueError(f"freeze_threshold_schedule: {name} must be in [0, 1], got {v!r}")
    return CosineSchedule(f_start, f_end, total_steps, warmup_frac, warmup_value=0.0)


def dampening_schedule(total_steps: int, lam_max: float = 0.1, warmup_frac: float = 0.25) -> CosineSchedule:
    """Lambda 0 for the first ``warmup_frac``, then a cosine ramp from 0 to ``lam_max`` (>= 0)."""
    if not _finite_real(lam_max) or float(lam_max) < 0:  # a negative lambda rewards oscillation
        raise ValueError(f"dampening_schedule: lam_max must be a finite number >= 0, got {lam_max!r}")
    return CosineSchedule(0.0, lam_max, total_steps, warmup_frac, warmup_value=0.0)
