"""Calibration inputs synthesized from a model's own BatchNorm statistics (data-free calibration).

A network trained with BatchNorm stores, in every BN layer, the per-channel mean and variance its
input had over the training set (``running_mean``, ``running_var``). :func:`synthesize_inputs`
starts from noise and moves a batch of inputs by gradient descent until the batch statistics of
every BN layer's input match those stored ones (the idea of ZeroQ, Cai et al. 2020, and of
DeepInversion, Yin et al. 2020), optionally also towards random class labels (so the batch holds
"class-like" inputs, as GDFQ / DeepInversion do) under a small total-variation prior. The result
stands in for calibration data where none is at hand: ``fake_quantize_model_(model, 4, "gptq",
calib_data=synthesize_inputs(model, 64, (3, 160, 160)), fp_target=True)``.

Loss of one batch ``x`` (``B`` inputs; ``mu_l, var_l``: the per-channel mean and biased variance of
BN layer ``l``'s input over every dimension but the channel one; ``m_l, v_l``: its running mean and
variance, ``v_l`` with the layer's eps added):

    L(x) = sum_l mean_c [ (mu_l - m_l)^2 + (sqrt(var_l + eps) - sqrt(v_l))^2 ] / v_l
           + label_weight * cross_entropy(model(x), y) + tv_weight * TV(x)

i.e. the squared distance of the two per-channel Gaussians' means and standard deviations in units
of the stored standard deviation (scale-free, so no layer dominates by the size of its activations:
on EfficientNet-Lite0 the unnormalised norms of the differences, as DeepInversion sums them, went from
1.9e4 to 7.3e3 in 100 steps and left the float model unconfident on the results, median top-1
probability 0.14, where this form gives 0.86-0.93 after 150 steps),
``y`` uniform random classes, ``TV`` the mean absolute difference of neighbouring values along the
spatial dimensions (those after the channel one, at most the last two). Each step sees the batch shifted
by a random roll of up to ``jitter`` positions along them and, with probability 1/2, flipped along the
last one (DeepInversion's augmentation, which keeps the inputs from fitting one pixel grid); Adam with a cosine-decayed step
size; after each step the values are clamped to ``value_range``.

Measured on EfficientNet-Lite0 (W4 g<=64, every layer; the demo's 256 evaluation crops; 2 threads;
benchmarks/RESULTS.md): GPTQ on the dense layers + HQQ on the depthwise convs with float-model targets,
calibrated on 64 synthesized 160x160 inputs (150 steps, ~9 min) and no image at all: KL(fp32 ‖ q) 0.24-0.28,
against 0.59 for HQQ (the best data-free method before) and 0.14 with the 256 crops of 11 real photos.

Written for this project from the papers' descriptions (no code taken from their implementations).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["synthesize_inputs", "bn_statistics_loss"]


def _bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None
            and m.running_var is not None]


def _layer_loss(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The BN term of one layer for its input ``x`` ``[B, C, ...]`` (see the module docstring)."""
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    mu = xf.mean(dims)
    var = xf.var(dims, unbiased=False)
    v = bn.running_var.float() + bn.eps
    d_mu = mu - bn.running_mean.float()
    d_sd = (var + bn.eps).sqrt() - v.sqrt()
    return ((d_mu * d_mu + d_sd * d_sd) / v).mean()


class _BnHooks:
    """Forward pre-hooks that collect each BN layer's term for the current forward."""

    def __init__(self, layers: list[_BatchNorm]):
        self.terms: list[torch.Tensor] = []
        self.handles = [bn.register_forward_pre_hook(self._hook) for bn in layers]

    def _hook(self, mod, args):
        self.terms.append(_layer_loss(mod, args[0]))

    def take(self) -> torch.Tensor:
        if not self.terms:
            raise RuntimeError("synthesize_inputs: the forward reached no BatchNorm layer")
        out, self.terms = torch.stack(self.terms).sum(), []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _bn_hooked(model: nn.Module, layers: list[_BatchNorm]):
    """``model`` in eval mode with :class:`_BnHooks` on ``layers``; hooks and every submodule's mode
    are given back on exit."""
    hooks, was = _BnHooks(layers), [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield hooks
    finally:
        hooks.remove()
        for m, t in was:
            m.train(t)


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> float:
    """The BN-statistics term of the module docstring's loss for the inputs ``x`` (a forward of
    ``model`` in eval mode, no gradient): 0 when every BN layer sees exactly its stored statistics."""
    layers = _bn_layers(model)
    if not layers:
        raise ValueError("bn_statistics_loss: model has no BatchNorm layer with running statistics")
    with _bn_hooked(model, layers) as hooks, torch.no_grad():
        model(x)
        return float(hooks.take())


def _check(n, shape, steps, batch_size, lr, label_weight, tv_weight, jitter, value_range):
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(n) or n < 1:
        raise ValueError(f"synthesize_inputs: n must be an int >= 1, got {n!r}")
    if not isinstance(shape, Sequence) or len(shape) < 1 or not all(is_int(s) and s >= 1 for s in shape):
        raise ValueError(f"synthesize_inputs: shape must be a sequence of ints >= 1 (one input, no batch "
                         f"dimension, e.g. (3, 224, 224)), got {shape!r}")
    if not is_int(steps) or steps < 0:
        raise ValueError(f"synthesize_inputs: steps must be an int >= 0, got {steps!r}")
    if not is_int(batch_size) or batch_size < 2:
        raise ValueError(f"synthesize_inputs: batch_size must be an int >= 2 (batch statistics need two "
                         f"inputs), got {batch_size!r}")
    for name, v in (("lr", lr), ("label_weight", label_weight), ("tv_weight", tv_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (name == "lr" and v == 0):
            raise ValueError(f"synthesize_inputs: {name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                             f"got {v!r}")
    if not is_int(jitter) or jitter < 0:
        raise ValueError(f"synthesize_inputs: jitter must be an int >= 0, got {jitter!r}")
    if value_range is not None:
        ok = isinstance(value_range, Sequence) and len(value_range) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value_range)
        if not ok or value_range[0] >= value_range[1]:
            raise ValueError(f"synthesize_inputs: value_range must be None or (low, high) with low < high, "
                             f"got {value_range!r}")


def synthesize_inputs(
    model: nn.Module,
    n: int,
    shape: Sequence[int],
    *,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 0.25,
    label_weight: float = 0.1,
    tv_weight: float = 0.05,
    jitter: int = 8,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """``n`` model inputs whose BatchNorm statistics match the model's stored ones (module docstring).

    Args:
        model: a module with at least one BatchNorm layer (``nn.BatchNorm1d/2d/3d``, SyncBatchNorm)
            that tracks running statistics, e.g. a trained CNN. It runs in eval mode (running
            statistics are read, never updated); its parameters get no ``.grad`` and each
            submodule's train / eval mode is given back at the end.
        n: number of inputs to synthesize (made ``batch_size`` at a time; the last batch may be
            smaller but is made with at least 2).
        shape: one input's shape without the batch dimension, e.g. ``(3, 160, 160)``; any spatial
            size the model accepts (a fully convolutional net with global pooling takes smaller
            inputs than it was trained on, at a fraction of the cost).
        steps: Adam steps per batch (0: the scaled noise the optimisation starts from).
        batch_size: inputs optimised together (the statistics are matched over the batch).
        lr: Adam's step size at the start (cosine decay to 0 over ``steps``).
        label_weight: weight of the cross-entropy towards uniform random classes; needs the model to
            return logits ``[B, classes]``; 0: BN statistics (and TV) only.
        tv_weight: weight of the total-variation prior (0: off).
        jitter: largest random shift (roll) per step (0: none; the random flip of the last dimension stays).
            The shift, the flip and the TV prior act on the dimensions after the channel dimension, at
            most the last two (H, W of ``(C, H, W)``; L of ``(C, L)``; none for a feature vector ``(C,)``).
        value_range: ``(low, high)`` the inputs are clamped to after every step (the model's input
            range; quantkern's EfficientNet preprocessing gives [-1, 1]), or None.
        seed: seeds the noise, the labels and the augmentation (a fixed seed gives the same inputs
            with the same threads / BLAS).
        progress: tqdm bar over all steps, with the current batch's BN term.

    Returns:
        float32 tensor ``[n, *shape]`` on the model's device (detached).
    """
    _check(n, shape, steps, batch_size, lr, label_weight, tv_weight, jitter, value_range)
    if not isinstance(model, nn.Module):
        raise TypeError(f"synthesize_inputs: model must be an nn.Module, got {type(model).__name__}")
    layers = _bn_layers(model)
    if not layers:
        raise ValueError("synthesize_inputs: model has no BatchNorm layer with running statistics "
                         "(track_running_stats=True); the method matches those statistics")
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    shape = tuple(shape)
    # the dims after the channel dim, at most the last two: the ones shifted, flipped (the last) and smoothed
    spatial = [d for d in (-2, -1) if len(shape) - 1 >= -d]
    g = torch.Generator().manual_seed(seed)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] < 2:  # a batch of one has no batch variance: fold it into the one before
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    bar = None
    if progress and steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sizes) * steps, desc=f"synthesize {n} inputs", unit="step")
    lo, hi = value_range if value_range is not None else (None, None)
    outs = []
    try:  # (autograd on whatever mode the caller is in: under no_grad / inference_mode x had no gradient)
        with _bn_hooked(model, layers) as hooks, torch.inference_mode(False), torch.enable_grad():
            for b in sizes:
                x = 0.5 * torch.randn((max(b, 2),) + shape, generator=g)
                if value_range is not None:
                    x = x.mul((hi - lo) / 2).add((hi + lo) / 2).clamp(lo, hi)
                x = x.to(device).requires_grad_(True)
                y = None
                opt = torch.optim.Adam([x], lr=lr)
                for it in range(steps):
                    for group in opt.param_groups:  # cosine decay, from lr at step 0 towards 0
                        group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * it / steps))
                    xi = x
                    if jitter and spatial:
                        shifts = torch.randint(-jitter, jitter + 1, (len(spatial),), generator=g).tolist()
                        xi = torch.roll(xi, shifts, spatial)
                    if spatial and torch.rand((), generator=g).item() < 0.5:
                        xi = xi.flip(-1)
                    out = model(xi.to(dtype))
                    loss_bn = hooks.take()
                    loss = loss_bn
                    if label_weight:
                        if not isinstance(out, torch.Tensor) or out.dim() != 2:
                            raise ValueError("synthesize_inputs: label_weight > 0 needs the model to return logits "
                                             f"[batch, classes], got {getattr(out, 'shape', type(out).__name__)}; "
                                             "pass label_weight=0")
                        if y is None:
                            y = torch.randint(0, out.shape[1], (out.shape[0],), generator=g).to(out.device)
                        loss = loss + label_weight * nn.functional.cross_entropy(out.float(), y)
                    if tv_weight and spatial:
                        loss = loss + tv_weight * sum(xi.diff(dim=d).abs().mean() for d in spatial)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"synthesize_inputs: the loss became {loss.detach().item()} "
                                                 f"at step {it}; try a smaller lr")
                    # the gradient of the inputs only: the model's parameters get no .grad
                    (grad,) = torch.autograd.grad(loss, [x])
                    x.grad = grad
                    opt.step()
                    x.grad = None
                    if value_range is not None:
                        with torch.no_grad():
                            x.clamp_(lo, hi)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(bn=f"{loss_bn.detach().item():.3f}", refresh=False)
                outs.append(x.detach()[:b].float())
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(outs)
