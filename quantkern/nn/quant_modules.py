"""Quantization-aware training layers: ``QuantLinear``, ``QuantConv2d`` and ``quantize_modules``.

Each layer fake-quantizes its weight with an :class:`LSQQuantizer` (default: signed,
per output channel, ``"lsq+"`` init, no offset) and, unless ``a_bits`` is None, its
input with another (default: per tensor, ``"mse"`` init, learnt LSQ+ offset), then
runs the float op on the fake-quantized tensors. Everything stays differentiable:
the weight, bias, scales and offsets all train.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import BACKENDS
from .expose import _is_hf_conv1d, _is_plain_linear_subclass, expose_linears
from .lsq import GRANULARITIES, INITS, LSQQuantizer, _is_int
from ._sites import _reparam_hook_types, refresh_hooked_weights, swap_module, undo_swaps_on_error
from .packed_linear import disable_fused_encoder_paths


def _check_bits(owner: str, name: str, bits, allow_none: bool) -> None:
    if bits is None and allow_none:
        return
    if not (_is_int(bits) and 2 <= bits <= 8):
        extra = " or None (no input quantization)" if allow_none else ""
        raise ValueError(f"{owner}: {name} must be an int in 2..8{extra}, got {bits!r}")


class _QuantMixin:
    """Builds and applies the weight / input quantizers (shared by QuantLinear and QuantConv2d)."""

    _act_axis: int  # channel axis of the input for a_granularity="channel"

    def _setup_quantizers(
        self,
        w_bits,
        a_bits,
        w_granularity,
        w_group_size,
        w_init,
        w_learn_offset,
        a_granularity,
        a_init,
        act_signed,
        a_learn_offset,
        backend,
        w_grad_scale=None,
        a_grad_scale=None,
    ) -> None:
        owner = type(self).__name__
        _check_bits(owner, "w_bits", w_bits, allow_none=False)
        _check_bits(owner, "a_bits", a_bits, allow_none=True)
        for name, val, allowed in (
            ("w_granularity", w_granularity, GRANULARITIES),
            ("a_granularity", a_granularity, ("tensor", "channel")),
            ("w_init", w_init, INITS),
            ("a_init", a_init, INITS),
        ):
            if val not in allowed:
                raise ValueError(f"{owner}: {name} must be one of {allowed}, got {val!r}")
        if w_granularity == "group" and w_group_size is None:
            raise ValueError(f"{owner}: w_granularity='group' needs w_group_size (e.g. 32, 64, 128)")
        if w_granularity != "group" and w_group_size is not None:
            raise ValueError(f"{owner}: w_group_size={w_group_size} is only used with w_granularity='group', "
                             f"got w_granularity={w_granularity!r}")
        # checked here too so that an error names the layer's argument, not LSQQuantizer's (whose
        # "learn_offset" did not say which of the two quantizers it was)
        if w_group_size is not None and not (_is_int(w_group_size) and w_group_size > 0):
            raise ValueError(f"{owner}: w_group_size must be a positive int, got {w_group_size!r}")
        for name, v in (("act_signed", act_signed), ("w_learn_offset", w_learn_offset),
                        ("a_learn_offset", a_learn_offset)):
            if not isinstance(v, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {v!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        for name, g in (("w_grad_scale", w_grad_scale), ("a_grad_scale", a_grad_scale)):
            if g is not None and (isinstance(g, bool) or not isinstance(g, numbers.Real) or not 0 < g < math.inf):
                raise ValueError(f"{owner}: {name} must be a finite positive number or None, got {g!r}")
        w_bits, a_bits = int(w_bits), None if a_bits is None else int(a_bits)
        w_group_size = None if w_group_size is None else int(w_group_size)
        w_grad_scale, a_grad_scale = (None if g is None else float(g) for g in (w_grad_scale, a_grad_scale))
        self.w_bits, self.a_bits = w_bits, a_bits
        # The quantizers' parameters and buffers are created on the layer's device (device=...
        # of the constructor; from_float), like the weight: a per-tensor scale left on the CPU
        # would not follow a CUDA layer, and a lazy one could not be materialised on "meta".
        with torch.device(self.weight.device):
            self._build_quantizers(w_bits, a_bits, w_granularity, w_group_size, w_init, w_learn_offset,
                                   a_granularity, a_init, act_signed, a_learn_offset, backend,
                                   w_grad_scale, a_grad_scale)

    def _build_quantizers(self, w_bits, a_bits, w_granularity, w_group_size, w_init, w_learn_offset,
                          a_granularity, a_init, act_signed, a_learn_offset, backend,
                          w_grad_scale=None, a_grad_scale=None) -> None:
        with self._errors_name("weight quantizer (w_* arguments)", w_group_size if w_granularity == "group" else None):
            wq = LSQQuantizer(
                w_bits,
                signed=True,
                granularity=w_granularity,
                learn_offset=w_learn_offset,
                init=w_init,
                axis=0,
                group_size=w_group_size if w_granularity == "group" else None,
                grad_scale=w_grad_scale,
                backend=backend,
            )
            # Shapes are known now, so an optimiser can be built before the first forward;
            # the values are set from the weight on the first forward (or by from_float).
            wq.materialize(self.weight.shape, device=self.weight.device)
        self.weight_quantizer = wq
        if a_bits is None:
            self.input_quantizer = None
        else:
            with self._errors_name("input quantizer (a_* arguments)"):
                aq = LSQQuantizer(
                    a_bits,
                    signed=act_signed,
                    granularity=a_granularity,
                    learn_offset=a_learn_offset,
                    init=a_init,
                    axis=self._act_axis,
                    grad_scale=a_grad_scale,
                    backend=backend,
                )
            self.input_quantizer = aq

    @contextlib.contextmanager
    def _errors_name(self, which: str, w_group_size=None):
        """Re-raises a quantizer's ValueError / TypeError naming this layer and which of its arguments it
        came from (the quantizer's own message names its own: group_size, ...)."""
        try:
            yield
        except (ValueError, TypeError) as e:
            if w_group_size is not None and "does not divide" in str(e):
                e = ValueError(f"w_group_size {w_group_size} does not divide the row length "
                               f"{math.prod(self.weight.shape[1:])} of the weight of shape {tuple(self.weight.shape)}")
            raise type(e)(f"{type(self).__name__}: {which}: {e}") from None

    def _quant_extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A float checkpoint loaded into the QAT model (load_state_dict(strict=False): no quantizer keys)
        # brings a new weight, while the weight quantizer's scale was set from the weight the layer had at
        # conversion (random init, when converted before loading): it kept that grid (output error 0.98 vs
        # 0.12). It is initialised again from the loaded weight, here and now: a reset left to the next
        # forward would happen on one DDP rank only (the Python flag is not broadcast) and broke a model
        # already compiled with fullgraph=True. Not when the quantizer's own state was loaded without the
        # weight just before (a checkpoint in two parts, quantizers first), and not for a weight that only
        # changed through a tie (its key is another module's): that one needs initialize() by hand.
        has_w = prefix + "weight" in state_dict
        has_q = any(k.startswith(prefix + "weight_quantizer.") for k in state_dict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        q = self.weight_quantizer
        if has_w and not has_q and not q._state_loaded and not self.weight.is_meta:
            w = self.weight
            if bool(torch.isfinite(w).all()) and bool(w.any()):
                q.initialize(w)
            else:  # NaN / inf (initialize refuses them: the first forward raises that, as for any such
                # weight) or all zeros (a zero-initialised layer: the first non-zero weight initialises)
                q.reset()
        if has_w or has_q:  # (a load that does not touch this layer leaves the flag as it was)
            # the quantizer's state arrived without the weight: a weight loaded next keeps it
            q._state_loaded = has_q and not has_w


_QUANT_DOC_ARGS = """
    Quantization keyword arguments:
        w_bits: weight bit width, 2..8 (signed grid ``[-2^(b-1), 2^(b-1)-1]``). Default 4.
        a_bits: input bit width, 2..8, or None to leave the input in float. Default 8.
        w_granularity: ``"channel"`` (one scale per output channel, axis 0; default),
            ``"tensor"`` or ``"group"`` (groups of ``w_group_size`` along the flattened
            input dimension of each output channel).
        w_group_size: group length for ``w_granularity="group"``.
        w_init: weight quantizer init, default ``"lsq+"`` (see LSQQuantizer).
        w_learn_offset: learn an LSQ+ offset for the weights (default False: symmetric).
        a_granularity: ``"tensor"`` (default) or ``"channel"`` (per input feature/channel).
        a_init: input quantizer init, default ``"mse"`` (searched on the first batch).
        act_signed: signed input grid (default True); use False for inputs that follow a
            ReLU (unsigned grid ``[0, 2^b-1]``, one more bit of resolution).
        a_learn_offset: learn the LSQ+ input offset beta (default True, asymmetric).
        w_grad_scale, a_grad_scale: the LSQ gradient scale of the weight / input quantizer
            (``grad_scale`` of LSQQuantizer; None, the default: ``1 / sqrt(N * qmax)``). A fixed
            ``a_grad_scale`` lets ``torch.compile`` run over varying batch sizes without recompiling.
        backend: kernel backend for :func:`quantkern.ops.fake_quant_lsq`.
"""


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with LSQ+ fake-quantized weight and input (quantization-aware training).

    forward(x): x ``[*, in_features]`` (dtype of the weight, float32 / float16 / bfloat16)
    -> ``[*, out_features]``, same dtype: ``F.linear(Qa(x), Qw(weight), bias)``.

    Attributes: ``weight`` ``[out_features, in_features]``, ``bias`` ``[out_features]`` or
    None, ``weight_quantizer`` (LSQQuantizer; scale ``[out_features]`` per channel),
    ``input_quantizer`` (LSQQuantizer or None; scale ``[1]`` per tensor).
    """ + _QUANT_DOC_ARGS

    _act_axis = -1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        w_bits: int = 4,
        a_bits: int | None = 8,
        w_granularity: str = "channel",
        w_group_size: int | None = None,
        w_init: str = "lsq+",
        w_learn_offset: bool = False,
        a_granularity: str = "tensor",
        a_init: str = "mse",
        act_signed: bool = True,
        a_learn_offset: bool = True,
        w_grad_scale: float | None = None,
        a_grad_scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_quantizers(
            w_bits, a_bits, w_granularity, w_group_size, w_init, w_learn_offset,
            a_granularity, a_init, act_signed, a_learn_offset, backend, w_grad_scale, a_grad_scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int = 4, a_bits: int | None = 8, **kwargs) -> "QuantLinear":
        """A QuantLinear with a copy of ``linear``'s weight and bias (same device and dtype).

        The weight quantizer is initialised from the weight now; the input quantizer on
        the first forward. ``kwargs``: the quantization keyword arguments of the class.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=w.device, dtype=w.dtype, w_bits=w_bits, a_bits=a_bits, **kwargs,
        )
        _copy_params(q, linear)
        return q

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_extra_repr()}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with LSQ+ fake-quantized weight and input (quantization-aware training).

    forward(x): x ``[N, in_channels, H, W]`` (or unbatched ``[in_channels, H, W]``), dtype
    of the weight -> ``[N, out_channels, H_out, W_out]``, same dtype:
    ``conv2d(Qa(x), Qw(weight), bias)`` with the layer's stride/padding/dilation/groups.

    Attributes: ``weight`` ``[out_channels, in_channels // groups, kh, kw]``, ``bias``
    ``[out_channels]`` or None, ``weight_quantizer`` (scale ``[out_channels]`` per channel;
    per group: ``[out_channels, in_channels // groups * kh * kw // w_group_size]``),
    ``input_quantizer`` (scale ``[1]`` per tensor, ``[in_channels]`` per channel, axis 1).
    """ + _QUANT_DOC_ARGS

    _act_axis = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        w_bits: int = 4,
        a_bits: int | None = 8,
        w_granularity: str = "channel",
        w_group_size: int | None = None,
        w_init: str = "lsq+",
        w_learn_offset: bool = False,
        a_granularity: str = "tensor",
        a_init: str = "mse",
        act_signed: bool = True,
        a_learn_offset: bool = True,
        w_grad_scale: float | None = None,
        a_grad_scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._setup_quantizers(
            w_bits, a_bits, w_granularity, w_group_size, w_init, w_learn_offset,
            a_granularity, a_init, act_signed, a_learn_offset, backend, w_grad_scale, a_grad_scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            if self.input_quantizer.granularity == "channel" and x.dim() == 3:
                x = self.input_quantizer(x.unsqueeze(0)).squeeze(0)  # unbatched: channel axis 0
            else:
                x = self.input_quantizer(x)
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int = 4, a_bits: int | None = 8, **kwargs) -> "QuantConv2d":
        """A QuantConv2d with ``conv``'s geometry and a copy of its weight and bias.

        The weight quantizer is initialised from the weight now; the input quantizer on
        the first forward. ``kwargs``: the quantization keyword arguments of the class.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float: conv must be an nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=w.device, dtype=w.dtype, w_bits=w_bits, a_bits=a_bits, **kwargs,
        )
        _copy_params(q, conv)
        return q

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_extra_repr()}"


@torch.no_grad()
def _copy_params(q: nn.Module, src: nn.Module) -> None:
    q.weight.copy_(src.weight)
    q.weight.requires_grad_(src.weight.requires_grad)
    if src.bias is not None:
        q.bias.copy_(src.bias)
        q.bias.requires_grad_(src.bias.requires_grad)
    q.weight_quantizer.initialize(q.weight)
    q.train(src.training)


_SWAP = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def _build_swaps(model: nn.Module, skipped, w_bits, a_bits, kwargs) -> list:
    """(parent, attribute, QAT layer, float layer) for every nn.Linear / nn.Conv2d of ``model`` not ``skipped``,
    built but not yet swapped in (a layer registered under several names is built once)."""
    done: dict[int, nn.Module] = {}
    swaps = []
    # a layer shared by several parents stays float when any of its names is skipped
    kept = {id(m) for n, m in model.named_modules(remove_duplicate=False) if skipped(n)}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # not named_children: it drops repeats
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if child is None or type(child) not in _SWAP or id(child) in kept:
                continue
            if id(child) not in done:
                try:
                    q = _SWAP[type(child)].from_float(child, w_bits, a_bits, **kwargs)
                    # the float layer's own Parameters (equal values): weights tied between layers
                    # (or to an embedding) stay tied, and an optimizer built before keeps training them
                    for pn in ("weight", "bias"):
                        p_old, p_new = getattr(child, pn), getattr(q, pn)
                        if isinstance(p_old, nn.Parameter) and isinstance(p_new, nn.Parameter) and \
                                p_old.shape == p_new.shape and p_old.dtype == p_new.dtype and p_old.device == p_new.device:
                            setattr(q, pn, p_old)
                    done[id(child)] = q
                except (ValueError, TypeError) as e:
                    raise type(e)(f"quantize_modules: layer {full!r} ({type(child).__name__}): {e} "
                                  "(the model is unchanged)") from e
            swaps.append((parent, child_name, done[id(child)], child))
    return swaps


def quantize_modules(model: nn.Module, w_bits: int = 4, a_bits: int | None = 8, skip=(), **kwargs) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by QuantLinear / QuantConv2d, in place.

    Args:
        model: the model (if it is itself a Linear/Conv2d, the converted layer is returned).
        w_bits, a_bits, kwargs: passed to ``from_float`` (see QuantLinear).
        skip: qualified module names (as in ``model.named_modules()``) to leave in float; a
            name also skips everything under it (``"encoder"`` skips ``"encoder.0.fc"``).
            Raises ValueError for a name that matches no module (a typo would otherwise
            silently quantize the layer).

    ``nn.MultiheadAttention`` modules (not skipped) are first replaced by
    :class:`quantkern.nn.MultiheadAttention` (same function, projections ``q_proj`` / ``k_proj`` /
    ``v_proj`` / ``out_proj`` as nn.Linear submodules), so their projections are quantized too
    (torch's module reads its fused weights directly); transformers' ``Conv1D`` layers (GPT-2)
    become nn.Linear, and so do ``nn.Linear`` subclasses that compute nn.Linear's function with no
    state of their own (:func:`quantkern.nn.plain_linear_subclasses`). Otherwise only modules whose
    type is exactly nn.Linear or nn.Conv2d are swapped: other subclasses and layers already
    quantized are left alone. A layer shared by several parents is converted once and stays shared.

    Parameters: a swapped Linear / Conv2d's ``weight`` / ``bias`` are kept (the same Parameter
    objects: ties and an optimizer built before keep working), but the unfused attention modules and
    the Conv1D layers get new Parameters (copies: the fused ``in_proj_weight`` cannot be split into
    Parameters), so build the optimizer after this call when the model has either.

    If any layer cannot be converted, the error names it and the model is left as it came (the
    attention / Conv1D replacements are undone).

    Returns:
        ``model`` (converted in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_modules: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    names |= {f"{n}.{p}" for n, m in model.named_modules(remove_duplicate=False)  # made by expose_linears below
              if isinstance(m, nn.MultiheadAttention) for p in ("q_proj", "k_proj", "v_proj")}
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ValueError(f"quantize_modules: skip names not found in the model: {unknown}")

    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") or s == "" for s in skip)

    if type(model) in _SWAP:
        return model if skipped("") else _SWAP[type(model)].from_float(model, w_bits, a_bits, **kwargs)
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("quantize_modules: model is itself an nn.MultiheadAttention (no parent to replace it in); "
                        "convert quantkern.nn.MultiheadAttention.from_torch(module)")
    if _is_hf_conv1d(model) or _is_plain_linear_subclass(model):
        raise TypeError(f"quantize_modules: model is itself a {type(model).__name__}, which is converted by replacing "
                        "it in its parent; wrap it in a module first (e.g. nn.Sequential(layer))")
    # Expose the hidden linears, build every replacement, and swap only when all succeeded: a layer
    # that fails (e.g. a w_group_size that does not divide its row length) used to leave the model
    # half converted (and, before undo_swaps_on_error, its attention modules already unfused).
    refresh_hooked_weights(model)  # (prune / weight_norm weights as they are now, not as of the last forward)
    with undo_swaps_on_error():  # (also the fused encoder paths unfuse_attention switched off)
        expose_linears(model, skipped)
        swaps = _build_swaps(model, skipped, w_bits, a_bits, kwargs)
        # the float layer's train / eval mode and forward / backward hooks go to its QAT layer (a plain
        # setattr dropped them: a feature hook stopped firing after the conversion)
        sites: dict[int, tuple[nn.Module, nn.Module, list]] = {}
        for parent, child_name, q, child in swaps:
            sites.setdefault(id(child), (child, q, []))[2].append((parent, child_name))
        hooked = [type(child).__name__ for child, _, _ in sites.values()
                  if any(isinstance(h, _reparam_hook_types()) for h in child._forward_pre_hooks.values())]
        for child, q, where in sites.values():
            swap_module(where, child, q)
    if hooked:  # (the QAT layer trains the weight they computed: a pruned entry can grow back)
        warnings.warn(f"quantize_modules: {len(hooked)} converted layer(s) had a hook-based prune / weight_norm / "
                      "spectral_norm; their QAT layers start from the weight it computed and train it freely (the "
                      "mask or norm no longer applies): re-apply it to the QAT layer's weight if it should",
                      stacklevel=2)
    # torch's fused TransformerEncoderLayer inference path (eval under no_grad) reads linear1 / linear2's
    # weights directly: it ran the latent float weights, not the fake-quantized ones
    disable_fused_encoder_paths(model, [q for _, _, q, _ in swaps])
    return model
