"""Batch-norm statistics re-estimation (Nagel et al. 2022, section 4.3)."""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.parameter import is_lazy


@torch.no_grad()
def reestimate_bn_stats(model: nn.Module, loader, num_batches: int = 50, input_fn=None) -> int:
    """Replace every BatchNorm's running mean/var by the average of per-batch statistics
    over ``num_batches`` batches of ``loader`` (items ``x`` or ``(x, ...)``; ``float("inf")``: all).

    ``input_fn(batch)`` picks the model input out of a batch of another kind (e.g.
    ``lambda b: b["image"]`` for a loader of dicts, which otherwise raises TypeError); a tensor
    it returns is moved to the model's device, anything else is passed to ``model`` as it is.

    BN layers run in training mode with ``momentum=None`` (PyTorch's cumulative moving
    average: after n batches the running stats are the plain mean of the n batch
    statistics -- the official code's "momentum 1.0 and average"); every other module
    runs in eval mode. Afterwards momentum, ``num_batches_tracked`` and the train/eval
    flags are restored. A BatchNorm that no batch reaches keeps its statistics (with a warning
    naming it). Returns the number of batches used (0 for a model without a BatchNorm
    that tracks running stats: no batch is read). A loader that yields no batch
    raises ValueError, and an error mid-way leaves the previous statistics in place.
    """
    if num_batches == float("inf"):  # every batch of the loader
        num_batches = None
    elif isinstance(num_batches, float) and num_batches.is_integer():
        num_batches = int(num_batches)
    elif hasattr(num_batches, "__index__") and not isinstance(num_batches, bool):  # numpy / torch ints
        num_batches = num_batches.__index__()
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches <= 0):
        raise ValueError(f"reestimate_bn_stats: num_batches must be a positive integer (or inf: the whole loader), "
                         f"got {num_batches!r}")
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"reestimate_bn_stats: input_fn must be callable (batch -> model input), got {input_fn!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    lazy = [n for n, m in model.named_modules() if m in bns and is_lazy(m.running_mean)]
    if lazy:
        raise ValueError(f"reestimate_bn_stats: the lazy BatchNorm(s) {lazy} are not initialised yet: run a forward "
                         "first")
    names = {m: n for n, m in model.named_modules()}
    flags = {m: m.training for m in model.modules()}
    saved = [(m, m.momentum, m.num_batches_tracked.clone(), m.running_mean.clone(), m.running_var.clone())
             for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n, ok, unreached = 0, False, []
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for batch in itertools.islice(loader, num_batches):  # never pulls a batch it will not use
            if input_fn is not None:
                x = input_fn(batch)
            elif isinstance(batch, (tuple, list)):
                x = batch[0]
            elif isinstance(batch, Mapping):  # which entry is the input is the caller's to say (it failed with
                raise TypeError(  # "'dict' object has no attribute 'to'")
                    f"reestimate_bn_stats: the loader gives {type(batch).__name__} batches (keys "
                    f"{list(batch)[:8]}); pass input_fn=lambda batch: batch[<key of the model input>]")
            else:
                x = batch
            model(x.to(device) if isinstance(x, torch.Tensor) else x)
            n += 1
        ok = n > 0
    finally:
        for m, mom, nbt, mean, var in saved:
            m.momentum = mom
            # a BN no batch reached (a training-only head, an unused branch, an MoE expert) keeps its
            # statistics too: they were reset to mean 0 / var 1 above
            missed = ok and int(m.num_batches_tracked) == 0
            if missed:
                unreached.append(names[m])
            m.num_batches_tracked.copy_(nbt)
            if not ok or missed:  # no batch (an exhausted iterator) or an error: the old statistics stay
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, tr in flags.items():
            m.training = tr
    if not ok:
        raise ValueError("reestimate_bn_stats: the loader gave no batch (an exhausted iterator?); the BatchNorm "
                         "statistics are unchanged")
    if unreached:
        warnings.warn(f"reestimate_bn_stats: {len(unreached)} BatchNorm layer(s) saw no batch and keep their "
                      f"statistics: {unreached[:8]}{' ...' if len(unreached) > 8 else ''}", stacklevel=2)
    return n
