"""Give a model's hidden linear maps the form the Linear-swapping tools look for.

``replace_linear``, ``quantize_``, ``quantize_modules`` and ``fake_quantize_model_`` convert
``nn.Linear`` modules. Two common layers compute a linear map without being one:

* ``torch.nn.MultiheadAttention`` (fused ``in_proj_weight``, ``out_proj.weight`` read directly):
  replaced by :class:`quantkern.nn.MultiheadAttention` (:func:`unfuse_attention`);
* transformers' ``Conv1D`` (GPT-2 and its relatives: ``y = x @ W + b`` with ``W`` [in, out]):
  replaced by an ``nn.Linear`` holding ``W.T`` (:func:`conv1d_to_linear`).

* an ``nn.Linear`` subclass that computes ``x @ W.T + b`` itself (transformers' ``FalconLinear``)
  or inherits ``nn.Linear.forward`` unchanged, with no state of its own: replaced by a plain
  ``nn.Linear`` holding the very same Parameters (:func:`plain_linear_subclasses`); the tools match
  ``type(m) is nn.Linear``, so such a layer (every projection of a Falcon) was left in float.

The replacements compute the same function (Conv1D's up to the rounding of a transposed
product); :func:`expose_linears` runs all three.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ._sites import module_sites, refresh_hooked_weights, swap_module
from .attention import unfuse_attention


def _is_hf_conv1d(m: nn.Module) -> bool:
    return _is_hf_conv1d_type(type(m))


def _is_hf_conv1d_type(t: type) -> bool:
    # by name: transformers is optional, and importing it only to test a type would cost seconds
    return t.__name__ == "Conv1D" and (t.__module__ == "transformers" or t.__module__.startswith("transformers."))


def conv1d_to_linear(model: nn.Module, skip=None) -> list[str]:
    """Replace every transformers ``Conv1D`` (weight ``[in, out]``, ``y = x @ W + b``) of ``model``
    by an ``nn.Linear(in, out)`` with weight ``W.T`` (a copy; ``requires_grad`` kept), in place;
    returns the qualified names replaced. A module shared under several names is replaced once
    and stays shared; ``skip`` (names or a predicate, as in ``replace_linear``) leaves the
    matching ones alone. Forward / backward hooks move to the Linear.

    The Linear's state-dict ``weight`` is ``[out, in]``, the Conv1D's ``[in, out]``: a GPT-2
    checkpoint does not load into the converted model (nor the converse) without transposing
    (a size mismatch, except for a square layer such as ``attn.c_proj``)."""
    def build(conv):
        w, b = conv.weight, conv.bias
        lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        if b is not None:
            lin.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        lin._qk_from_conv1d = True  # save_quantized records it when it stays unpacked (see load_quantized)
        return lin

    if _is_hf_conv1d(model):
        raise TypeError("conv1d_to_linear: model is itself a Conv1D (no parent to replace it in); wrap it in a module")
    return _replace_each(model, _is_hf_conv1d, skip, build)


def _replace_each(model: nn.Module, match, skip, build) -> list[str]:
    """Replace every module of ``model`` that ``match``es (once, shared ones stay shared; ``skip`` as in
    ``replace_linear``) by ``build(old)``, which keeps ``old``'s train / eval mode and call hooks (same
    inputs and outputs: the user's hooks keep working); returns the qualified names replaced."""
    from .packed_linear import _skipped, check_skip

    check_skip("expose_linears", skip)
    refresh_hooked_weights(model)
    replaced = []
    for names, sites, old in module_sites(model, match):
        if any(_skipped(n, skip) for n in names):
            continue
        swap_module(sites, old, build(old))
        replaced.append(names[0])
    return replaced


# nn.Linear subclasses known to override forward with nn.Linear's own math (checked against their source)
_SAME_MATH = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def _is_plain_linear_subclass(m: nn.Module) -> bool:
    t = type(m)
    # NonDynamicallyQuantizableLinear: the out_proj of torch's nn.MultiheadAttention, which reads its
    # weight directly (unfuse_attention handles those; a skipped attention module keeps it)
    if t is nn.Linear or not isinstance(m, nn.Linear) or issubclass(t, NonDynamicallyQuantizableLinear):
        return False
    if isinstance(m, LazyModuleMixin):  # not run yet: no weight (it becomes an nn.Linear on its first call)
        return False
    same = t.forward is nn.Linear.forward or (t.__module__, t.__name__) in _SAME_MATH
    # nothing of its own beyond weight / bias (a LoRA layer, an input scale, ... is not a plain Linear)
    return same and set(m._parameters) <= {"weight", "bias"} and not m._buffers and not m._modules


def plain_linear_subclasses(model: nn.Module, skip=None) -> list[str]:
    """Replace every ``nn.Linear`` subclass of ``model`` that computes exactly ``nn.Linear``'s function
    (module docstring) by an ``nn.Linear`` holding the same ``weight`` / ``bias`` Parameters (shared, not
    copied: ties and optimizers keep working), in place; returns the qualified names replaced. Shared
    modules stay shared; ``skip`` as in ``replace_linear``; hooks move to the new module."""
    def build(old):
        lin = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta",
                        dtype=old.weight.dtype)
        lin.weight, lin.bias = old.weight, old.bias
        return lin

    if _is_plain_linear_subclass(model):
        raise TypeError(f"plain_linear_subclasses: model is itself a {type(model).__name__} (no parent to replace "
                        "it in); wrap it in a module")
    return _replace_each(model, _is_plain_linear_subclass, skip, build)


def expose_linears(model: nn.Module, skip=None) -> list[str]:
    """:func:`unfuse_attention`, :func:`conv1d_to_linear` and :func:`plain_linear_subclasses` on
    ``model`` (in place, same ``skip``); returns the names of the modules replaced. A lazy layer
    (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) not yet run has no weight to convert: ValueError
    before anything changes."""
    from .packed_linear import _skipped, check_skip

    check_skip("expose_linears", skip)
    lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()
            and not _skipped(n, skip)]
    if lazy:
        raise ValueError(f"layers {lazy[:3]}{' ...' if len(lazy) > 3 else ''} are lazy modules (nn.LazyLinear, "
                         "nn.LazyConv2d, ...) not run yet, so they have no weights to convert (their shapes come from "
                         "the first input): run the model once on an input first")
    return unfuse_attention(model, skip) + conv1d_to_linear(model, skip) + plain_linear_subclasses(model, skip)
