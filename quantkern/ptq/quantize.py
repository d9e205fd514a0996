"""Whole-model weight quantization: ``quantize_`` / ``save_quantized`` / ``load_quantized``.

``quantize_(model, QuantizeConfig(method="gptq", bits=4, group_size=64), calib_fn)``
replaces every ``nn.Linear`` (except the skipped ones) by a
:class:`~quantkern.nn.PackedLinear` holding the solver's ``(q, scale, zero)``.

* ``rtn`` / ``hqq`` need no data.
* ``gptq`` / ``erq`` need ``calib_fn`` and work layer by layer, in module order:
  for each layer, the calibration forward runs with a hook on that layer which
  accumulates its statistics (GPTQ: the Hessian ``2/T X^T X``; ERQ: a random
  subsample of at most ``calib_tokens`` input rows) and then raises a private
  exception, so the forward stops at that layer. The layer is quantized and
  swapped in before the next layer is calibrated, so later layers see the
  quantized earlier ones (sequential, as GPTQ does). Memory: one layer's
  statistics at a time (the layers of a calibration group share one set).
* Cached block inputs (``block_cache``, ``_blocks``): when the model runs a list of
  blocks as a chain (a transformer's layers, checked on the first unit), each unit's
  input to the current block is kept, so a pass of a layer in block ``j`` runs block
  ``j`` alone rather than the model from its start; bit-identical, and the forwards
  grow with the depth instead of its square. Memory: one block input per unit (two
  with ``fp_target``). A transformers model's ``config.use_cache`` is off meanwhile
  (a KV cache passed to every block could not be replayed).

Calibration groups: layers that read the very same input tensor (q / k / v projections,
gate / up, BERT's query / key / value) share one calibration pass instead of one each.
When the hook of the layer being calibrated (the group's leader) has captured its input
``x``, the forward goes on (instead of stopping), and each next layer in module order joins
the group if it is the next hooked layer to fire and is called with ``x`` itself (the same
tensor object, its version counter unchanged: no in-place change since the leader's call);
the forward stops once the group is complete or at the first hooked call that does not fit
(another tensor, a layer out of order, the leader again). A member's input does not depend
on the leader's output, so quantizing the leader first (as the one-layer-per-pass order did)
would not have changed it: its statistics are the leader's, computed once (one Hessian, one
row sample, one activation calibrator, one float-target Gram), and the members are then
quantized one after another from them, exactly as before: results are bit-identical. The
group is found in the first unit where the leader fires and only shrinks in later units: a
member that fires before the leader (its first call is elsewhere), or not right after the
previous member, or with another input, leaves the group with every member after it (and is
calibrated in a pass of its own later). With ``fp_target`` the float model's pass must show
the same chain. Passes per calibration unit: 4 instead of 7 for a Llama block (q/k/v, o,
gate/up, down), 4 instead of 6 for BERT's and ``nn.TransformerEncoder``'s. Assumed: whether
the next layers are called with ``x`` does not depend on the *values* of the leader's output
(true of attention and MLP blocks). Tensors made under ``torch.inference_mode`` have no version
counter, so a ``calib_fn`` that runs the model under it gets one layer per pass. At most
``_MAX_GROUP`` layers share a pass; ``_GROUP_CALIBRATION = False`` restores one layer per pass.

``calib_fn``: a callable ``f(model)`` that runs the model on calibration data,
or a sequence of such callables (one per batch). Each callable is one unit of
the early stop: when the hook fires the rest of *that callable* is skipped, so
a callable that loops over several batches only contributes its first batch;
pass one callable per batch to use them all. A unit may be a pair ``(f, token_mask)``
with ``token_mask`` a bool / integer tensor ``[batch, seq]`` (an attention mask; nonzero:
a real token): a layer input whose leading dims have that shape then contributes only
the real tokens' rows (padding would count as calibration data, and hide a too-small
calibration set from the few-tokens warning); other inputs (a pooler's ``[batch, K]``)
keep every row.

Float-model targets (``fp_target=True``, default): sequential calibration alone fits
each layer to its original weights applied to the inputs of the partly quantized model,
``min ||(W - W_hat) Xq||``, so the error the quantized earlier layers left in ``Xq`` is
never corrected. With ``fp_target`` a float copy of the model (sharing its weights) runs the same calibration
units; for each layer, the float model's inputs ``X`` and the quantized model's ``Xq`` (same
tokens) give ``A^T A`` and ``B^T A`` (``A = [Xq | 1]``, ``B = [X | 1]``) and the layer is
first replaced by the ridge least-squares map ``W*, b*`` from ``Xq`` to the float outputs
``X W^T + b`` (``fp_target_weights``, ridge ``fp_target_damp * mean(diag(Xq^T Xq))``,
pulling towards ``W``); GPTQ / ERQ then quantize ``W*`` (new bias ``b*``), and GPTQ's re-fit
of scale / zero / bias uses the float outputs as its target. (The same idea as GPTAQ's
asymmetric calibration, done as a least-squares target before the solver rather than
inside GPTQ's column loop.) With an input quantizer (``act_bits``) GPTQ fits the target on the
layer's effective inputs ``Qa(Xq)`` (the pairs are kept until the quantizer is calibrated;
fitting on ``Xq`` took MiniLM GPTQ W4A4 from 0.70 to 0.53), ERQ on ``Xq`` (its Aqer corrects the
activation error itself; fitting on ``Qa(Xq)`` as well dropped ERQ W4A4 to 0.42). Costs: a second
forward per unit, and the replaced float layers stay in memory until ``quantize_`` returns (the copy
shares the model's tensors, so the peak is the float model plus the packed layers, not twice the model).
On all-MiniLM-L6-v2 (1.6K calibration tokens) it raised GPTQ's W4 / W3 / W2 embedding
cosine; it needs a strong ridge there (0.01 hurt at W4, 0.1 .. 1 helped), because the
1536-wide layers see about as many tokens as they have inputs.

Activation quantization (``act_bits``): every new PackedLinear gets an input
fake-quantizer (static per tensor, calibrated with ``act_method`` on the layer's
captured calibration inputs, or dynamic per token). Calibration is sequential
like the weights: a layer's inputs come from the already quantized earlier
layers, input quantizers included. ERQ then runs Aqer (ridge regression of the
activation-quantization error) and Wqer with that very quantizer; RTN / HQQ /
GPTQ only get the quantizer (GPTQ's Hessian is of the unquantized inputs).
Without ``act_bits`` ERQ is weight-only: Aqer is off (a no-op without activation
quantization) and Wqer (rounding refinement + ridge compensation, bias column
included) is what runs.

ERQ's lambdas are relative by default (``erq_relative_lambda``): multiples of
``T * E[x^2]`` (the mean diagonal of ``Xq^T Xq``, T calibration rows), so they
mean the same for any token count and activation scale. On all-MiniLM-L6-v2
``T * E[x^2]`` spans 17 .. 1.8e3 over the 37 layers (median 765, T = 2.7K rows),
which is why one absolute lambda1 (~1e3, the paper's code) over-regularised some
layers and under-regularised others. Defaults: lambda2 = 0.3 (1.0, about the old
absolute 1e3 at the median layer, was the default before fp_target; with fp_target on
MiniLM W4, 0.3 / 1 / 3 gave embedding cosine 0.9897 / 0.9894 / 0.9891 at ridge 0.3),
lambda1 = 10 (Aqer as a mild correction:
small lambda1 fits the calibration tokens' activation error and hurt the
network before, see erq.py).

Group size: a multiple of 32 (the packed format's groups; anything else is refused). If it
does not divide a layer's in_features, that layer falls back to a smaller
group size (the largest multiple of 32 below it that divides in_features, else one group per
row) and a warning names it (``strict_group=True`` raises instead).

Checkpoints: safetensors through :func:`quantkern.save_packed` (format name,
version, layout and per-weight bits / group size / shape are validated on load);
the float parameters and buffers of the rest of the model ride along as plain
tensors. Never pickle.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
import warnings
from collections.abc import Mapping
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..nn._sites import refresh_hooked_weights, swap_module, undo_swaps_on_error
from ..nn.attention import unfuse_attention
from ..nn.expose import _is_hf_conv1d, conv1d_to_linear, expose_linears
from ..nn.packed_linear import (DEFAULT_SKIP, PackedLinear, _skipped, check_linear_weights, check_skip,
                                 disable_fused_encoder_paths, fallback_group, linear_sites, tied_holders,
                                 untie_packed_outputs, warn_left_float, weights_to_convert, with_keep_float)
from ..packed import PackedWeight, load_packed, lost_groups_matter, save_packed, scales_lost
from ._blocks import BlockInputs, fitting, plan_blocks
from ._blocks import StopForward as _StopForward
from ._wquant import check_clip

__all__ = ["QuantizeConfig", "quantize_", "save_quantized", "load_quantized", "METHODS", "LAYER_FIELDS",
           "fp_target_weights"]

METHODS = ("rtn", "hqq", "gptq", "erq")
# the QuantizeConfig fields QuantizeConfig.layer_config may set per layer: the weight solver's
LAYER_FIELDS = ("method", "bits", "group_size", "meta_dtype", "strict_group", "damp", "block_size", "act_order",
                "clip", "clip_grid", "clip_max_shrink", "refit", "refit_passes", "erq_lambda1", "erq_lambda2",
                "erq_relative_lambda", "erq_refine_iters", "hqq_iters", "calib_tokens", "fp_target_damp")
_DATA_METHODS = ("gptq", "erq")
# Calibration groups (module docstring). Private switch: False calibrates one layer per pass (the
# tests compare the two paths for bit-identical results).
_GROUP_CALIBRATION = True
# At most this many layers (the leader and the next ones in order with its in_features) are hooked
# as one group's candidates. Not a memory bound: a group holds one set of statistics, whatever its size.
_MAX_GROUP = 16


_META_DTYPE_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                     "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                     "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


@dataclasses.dataclass
class QuantizeConfig:
    """What :func:`quantize_` does.

    Attributes:
        method: "rtn", "hqq", "gptq" or "erq" (weight-only ERQ; see module docstring).
        bits: 2, 3 or 4.
        group_size: contiguous input group per (scale, zero), a multiple of 32; None / -1: one
            group per row.
        skip: layer names (exact, ".suffix" or fnmatch patterns such as ``"*.classifier"``)
            or a predicate on the qualified name; those layers stay float. Default
            ``DEFAULT_SKIP``: ``lm_head``, ``classifier`` and the output layer of a classification
            head module (``classifier.out_proj``, ``classification_head.out_proj``).
        meta_dtype: dtype of the stored scales / zeros (fp16 default, fp32, bf16); also by name
            ("float16", "torch.bfloat16", "fp32", ...: a config read from JSON).
        strict_group: raise instead of falling back to a smaller group size (or one group per row).
        damp, block_size, act_order: GPTQ (defaults 0.1, 128, True with static groups; on
            all-MiniLM-L6-v2 with 1.6K calibration tokens damp 0.1 beat GPTQ's usual 0.01).
        clip: group params of GPTQ / ERQ: "minmax" or "mse" (clipping search weighted by
            the diagonal of the layer's input Gram; see ``_wquant.search_params``).
        clip_grid, clip_max_shrink: that search's candidates, shrinks 1 .. 1 - clip_max_shrink.
        refit: GPTQ / ERQ: after quantizing, re-fit each group's scale and zero (ERQ: and the
            bias) by least squares given q, under the layer's output error (``refit_scale_zero``).
        refit_passes: GPTQ only: extra GPTQ passes run with the re-fitted params held fixed,
            each followed by another re-fit (not with fp_target, which does one re-fit).
        erq_lambda1, erq_lambda2: ERQ's ridge strengths (Aqer / Wqer compensation).
        erq_relative_lambda: the lambdas are multiples of ``T * E[x^2]`` (the mean diagonal of
            the quantized inputs' Gram) rather than absolute values.
        erq_refine_iters: Wqer's rounding refinement iterations.
        hqq_iters: HQQ iterations.
        act_bits: None: weight-only; 8 or 4 (2..8 accepted): every PackedLinear quantizes its
            input (per tensor static, or per token with act_dynamic).
        act_method: static calibrator (calibrate.make_calibrator): "max", "percentile",
            "mse", "entropy" or "mse_search".
        act_dynamic: per-token dynamic ranges instead of a calibrated static range.
        act_symmetric: symmetric grid (zero 0) instead of asymmetric.
        calib_tokens: cap on the input rows kept per layer for ERQ (random subsample).
        seed: for the ERQ subsample.
        fp_target: GPTQ / ERQ: a layer's target is the *float* model's output of that layer
            (on the float model's inputs) instead of the original weights applied to the inputs
            of the partly quantized model, so each layer also absorbs the error its quantized
            predecessors left in its input (``fp_target_weights``). Runs every calibration unit
            through a float copy of the model as well (about twice the forward time; the copy shares
            the model's weights, so the float layers are freed only when ``quantize_`` returns).
        fp_target_damp: that least-squares fit's ridge, relative to ``mean(diag(Xq^T Xq))``.
        block_cache: GPTQ / ERQ / static act: when the model runs a list of blocks one after the
            other (a transformer's layers; checked on the first calibration unit), keep each
            unit's input to the current block so a layer's calibration pass runs its block
            alone instead of the model from its start (``_blocks``; bit-identical results).
            Costs one block input per calibration unit (two with ``fp_target``) held in memory.
            A replayed block runs outside ``calib_fn``: a context ``calib_fn`` sets around the
            model call (``sdpa_kernel``, TF32 flags, an attribute the blocks read) is not in
            effect then (autocast is detected and turns the cache off); use False for such a
            ``calib_fn``.
        layer_config: per-layer settings, ``{pattern: {field: value}}`` (a dict, in order; patterns
            match a layer's name as ``skip``'s entries do: exact, ".suffix" or fnmatch). A layer takes
            the fields of the first pattern that matches it; the others keep the config's values.
            Fields: :data:`LAYER_FIELDS` (the weight solver's: ``method``, ``bits``, ``group_size``,
            ...); input quantization, ``fp_target``, ``block_cache``, ``seed`` and ``skip`` are the
            model's. E.g. ``{"*.down_proj": {"bits": 4}, "*.self_attn.*": {"method": "hqq"}}`` on a
            W3 GPTQ config. A layer whose method needs no data (rtn / hqq) gets no calibration pass
            unless an input quantizer needs one.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 64
    skip: Iterable[str] | Callable[[str], bool] | None = DEFAULT_SKIP
    meta_dtype: torch.dtype = torch.float16
    strict_group: bool = False
    damp: float = 0.1
    block_size: int = 128
    act_order: bool = True
    clip: str = "mse"
    clip_grid: int = 40
    clip_max_shrink: float = 0.5
    refit: bool = True
    refit_passes: int = 0
    erq_lambda1: float = 10.0
    erq_lambda2: float = 0.3
    erq_relative_lambda: bool = True
    erq_refine_iters: int = 100
    hqq_iters: int = 20
    act_bits: int | None = None
    act_method: str = "mse_search"
    act_dynamic: bool = False
    act_symmetric: bool = False
    calib_tokens: int = 4096
    seed: int = 0
    fp_target: bool = True
    fp_target_damp: float = 1.0
    block_cache: bool = True
    layer_config: Mapping[str, Mapping[str, object]] | None = None

    def __post_init__(self) -> None:
        # a config read from JSON names the dtype: "float16", "torch.float16", "fp16", "half", ...
        if isinstance(self.meta_dtype, str):
            self.meta_dtype = _META_DTYPE_NAMES.get(self.meta_dtype.removeprefix("torch."), self.meta_dtype)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"QuantizeConfig: unknown method {self.method!r}; choose one of {METHODS}")
        # an int: 4.0 == 4 passes the membership test and failed later, in a solver
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in (2, 3, 4):
            raise ValueError(f"QuantizeConfig: bits must be 2, 3 or 4, got {self.bits!r}")
        gs = self.group_size
        # (a size the packed format cannot hold, such as 16, used to fall back to one group per row: the
        # coarsest grid, not the finer one asked for)
        if gs is not None and gs != -1 and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 32):
            raise ValueError(f"QuantizeConfig: group_size must be a positive multiple of 32 (32, 64, 128, 256, ...: "
                             f"the packed format's groups), None or -1 (one group per row), got {gs!r}")
        if self.meta_dtype not in (torch.float16, torch.float32, torch.bfloat16):
            raise ValueError(f"QuantizeConfig: meta_dtype must be torch.float16, torch.float32 or torch.bfloat16 (or "
                             f"one of the names {sorted(_META_DTYPE_NAMES)}), got {self.meta_dtype!r}")
        if not (isinstance(self.calib_tokens, int) and self.calib_tokens > 0):
            raise ValueError(f"QuantizeConfig: calib_tokens must be a positive int, got {self.calib_tokens!r}")
        from .calibrate import METHODS as ACT_METHODS

        ab = self.act_bits
        if ab is not None and (isinstance(ab, bool) or not isinstance(ab, int) or not 2 <= ab <= 8):
            raise ValueError(f"QuantizeConfig: act_bits must be None or an int in [2, 8] (8 or 4 typically), got {ab!r}")
        if self.act_method not in ACT_METHODS:
            raise ValueError(f"QuantizeConfig: act_method must be one of {ACT_METHODS}, got {self.act_method!r}")
        for name in ("act_dynamic", "act_symmetric", "refit", "erq_relative_lambda", "act_order", "strict_group",
                     "fp_target", "block_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantizeConfig: {name} must be a bool, got {getattr(self, name)!r}")
        check_clip("QuantizeConfig", self.clip, self.clip_grid, self.clip_max_shrink)
        if isinstance(self.refit_passes, bool) or not isinstance(self.refit_passes, int) or self.refit_passes < 0:
            raise ValueError(f"QuantizeConfig: refit_passes must be an int >= 0, got {self.refit_passes!r}")
        for name, lo in (("hqq_iters", 0), ("erq_refine_iters", 0), ("block_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"QuantizeConfig: {name} must be an int >= {lo}, got {v!r}")
        check_skip("QuantizeConfig", self.skip)
        for name in ("erq_lambda1", "erq_lambda2", "damp", "fp_target_damp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"QuantizeConfig: {name} must be a finite float >= 0, got {v!r}")
        self.layer_configs()

    def layer_configs(self) -> list[tuple[str, "QuantizeConfig"]]:
        """``layer_config`` as ``[(pattern, the full config of the layers it matches)]``, validated."""
        lc = self.layer_config
        if lc is None:
            return []
        if not isinstance(lc, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping) for k, v in lc.items()):
            raise ValueError("QuantizeConfig: layer_config must be a dict {layer name pattern: {field: value}}, got "
                             f"{lc!r}")
        out = []
        for pat, fields in lc.items():
            bad = sorted(set(fields) - set(LAYER_FIELDS))
            if bad:
                raise ValueError(f"QuantizeConfig: layer_config[{pat!r}]: {bad} cannot be set per layer; the fields "
                                 f"that can: {LAYER_FIELDS}")
            one = dataclasses.replace(self, layer_config=None, **fields)
            try:
                one.validate()
            except ValueError as e:
                msg = str(e).removeprefix("QuantizeConfig: ")
                raise ValueError(f"QuantizeConfig: layer_config[{pat!r}]: {msg}") from None
            out.append((pat, one))
        return out

    @property
    def static_act(self) -> bool:
        """True when layers get a calibrated (static) input quantizer."""
        return self.act_bits is not None and not self.act_dynamic


def _group_for(name: str, K: int, cfg: QuantizeConfig, fell: list) -> int:
    """The layer's group size; a fallback appends its note to ``fell`` (one warning for all of them)."""
    gs = cfg.group_size
    if gs in (None, -1) or gs == K:
        return K
    if K % gs:
        msg = (f"quantize_: group_size {gs} does not fit layer {name!r} (in_features={K}; the packed format needs a "
               f"multiple of 32 that divides in_features)")
        if cfg.strict_group:
            raise ValueError(msg)
        fit = fallback_group(K, gs)
        fell.append((msg, f"{name!r} (in_features {K}): " + (f"g{fit}" if fit < K else "one group per row"),
                     f"; using group size {fit} for this layer" if fit < K else "; using one group per row for this layer"))
        return fit
    return gs


def _calib_unit(u):
    """``f`` or ``(f, token_mask)`` -> ``(f, bool mask or None)``; None when ``u`` is neither."""
    if callable(u):
        return u, None
    if isinstance(u, tuple) and len(u) == 2 and callable(u[0]) and isinstance(u[1], torch.Tensor):
        m = u[1]
        if m.dtype.is_floating_point or m.dtype.is_complex or m.dim() == 0:
            raise TypeError(f"quantize_: a calibration token mask must be a bool or integer tensor [batch, seq] "
                            f"(nonzero: a real token), got {m.dtype} of shape {tuple(m.shape)}")
        return u[0], m.detach().bool()
    return None


def _calib_units(calib_fn) -> list:
    """``calib_fn`` as a list of ``(f, token_mask or None)``."""
    one = _calib_unit(calib_fn)
    if one is not None:
        return [one]
    if isinstance(calib_fn, Sequence) and calib_fn:
        units = [_calib_unit(u) for u in calib_fn]
        if all(u is not None for u in units):
            return units
    raise TypeError("quantize_: calib_fn must be a callable f(model), a pair (f, token_mask), or a non-empty "
                    f"sequence of them, got {type(calib_fn).__name__}")


def _layer_input(inputs: tuple, kwargs: dict) -> torch.Tensor:
    """A Linear's input from a forward hook's (args, kwargs): ``lin(x)`` or ``lin(input=x)``."""
    return inputs[0] if inputs else kwargs["input"]


# fp_target's pairing test (_Capture.judge_pairing): measured on all-MiniLM-L6-v2 (GPTQ / ERQ at W2 and W3,
# 525 unit-layer pairs) the same tokens' squared distance is at most 0.14x a random pairing's weight-only,
# 0.46 with 16-sentence units at W2A4, up to 0.70 for units of one short sequence whose tokens are alike
# (a random BERT's near-uniform attention; MiniLM W2A4 one sentence per unit: 0.51-0.56); an MoE expert that
# gets other tokens in the two models gives 0.89-1.0x. (0.5, judged per unit, dropped correctly paired layers:
# which ones depended on the order of the units.)
_PAIR_RATIO = 0.85


class _Capture:
    """One layer's (or one calibration group's: the same inputs) statistics.

    :meth:`add` takes the layer's input of one calibration unit, :meth:`set_float_input`
    the float model's (``fp_target``); as forward hooks (``__call__`` / :meth:`fp_hook`)
    each then stops the forward. GPTQ: the Hessian of the inputs; ERQ: a random subsample
    of at most ``cap`` input rows; with a static input quantizer (``act_cal``): the
    calibrator sees every row. With ``pair`` (``fp_target``): the float model's input ``X``
    of the unit is stored first, and the quantized model's input (``Xq``, same tokens)
    accumulates ``A^T A`` and ``B^T A`` with ``A = [Xq | 1]``, ``B = [X | 1]`` (float64 sums).
    Nothing here changes once the passes are done except :meth:`finish` (a no-op when called
    again): the layers of a group read one _Capture in turn.
    """

    def __init__(self, method: str, K: int, cap: int, seed: int, act_cal=None, pair: bool = False, device=None,
                 name: str = "?"):
        from .gptq import HessianAccumulator

        self.method, self.cap, self.seen, self.act_cal, self.name = method, cap, 0, act_cal, name
        # statistics live where the layer does (a model on a GPU accumulates there)
        self.hess = HessianAccumulator(K, device=device) if method == "gptq" else None
        self.rows: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)
        self.pair, self.pending, self.dropped = pair, None, None
        # the pairing test's permutations (its own generator: drawing from self.gen would change ERQ's row sample)
        self.pair_gen = torch.Generator().manual_seed(0)
        self.pair_sums = [0.0, 0.0, 0.0]  # the pairing test's near, far, spread, summed over the units
        self.mask: torch.Tensor | None = None  # the current unit's token mask (calib_fn's (f, token_mask))
        # whether a mask's shape matched this layer's input's leading dims; the first (input, mask) shapes that did not
        self.mask_hit, self.mask_miss = False, None
        self.defer = pair == "defer"  # keep the (X, Xq) pairs until the input quantizer is known
        self.pairs: list = []
        if pair:
            self.AtA = torch.zeros(K + 1, K + 1, dtype=torch.float64, device=device)
            self.BtA = torch.zeros(K + 1, K + 1, dtype=torch.float64, device=device)

    def _check_finite(self, x: torch.Tensor, which: str) -> None:
        # here, naming the layer: a NaN would otherwise surface deep inside a solver (lstsq / LAPACK)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"quantize_: the {which} input of layer {self.name!r} contains NaN or Inf "
                             "(check the calibration data)")

    def fp_hook(self, module, inputs, kwargs, output=None):
        self.set_float_input(_layer_input(inputs, kwargs))
        raise _StopForward

    def __call__(self, module, inputs, kwargs, output=None):
        self.add(_layer_input(inputs, kwargs))
        raise _StopForward

    def _token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` as rows ``[n, K]``: with a token mask whose shape is x's leading dims, only the
        real tokens' rows (padding would count as calibration data); other inputs (a pooler's
        ``[batch, K]``) keep every row."""
        x = x.detach()
        m = self.mask
        if m is not None and tuple(x.shape[:-1]) == tuple(m.shape):
            self.mask_hit = True
            return x[m.to(x.device)]
        if m is not None and self.mask_miss is None:
            self.mask_miss = (tuple(x.shape), tuple(m.shape))
        return x.reshape(-1, x.shape[-1])

    # inference_mode(False): a unit run under inference_mode must not make the statistics inference
    # tensors (the next units update them in place, which torch refuses outside inference mode)
    @torch.inference_mode(False)
    def set_float_input(self, x: torch.Tensor) -> None:
        """The float model's input of this unit (``fp_target``), paired with the next :meth:`add`."""
        self.pending = self._token_rows(x).double()
        self._check_finite(self.pending, "float model's")

    @torch.inference_mode(False)
    def add(self, x: torch.Tensor) -> None:
        """Accumulate one unit's input ``x [..., K]`` (read only: it is not changed)."""
        x = self._token_rows(x).float()
        self._check_finite(x, "calibration")
        self.seen += x.shape[0]
        if self.act_cal is not None and x.shape[0]:  # an empty batch carries nothing (the calibrator refuses it)
            self.act_cal.collect(x)
        if self.pair:
            xf, self.pending = self.pending, None
            why = self._pairing_fails(xf, x)
            if why is not None:
                self._drop_pairing(why)
            elif self.defer:
                self.pairs.append((xf, x.clone()))
            else:
                self._accumulate(xf, x)
        if self.hess is not None:
            self.hess.add_batch(x)
        elif self.method == "erq":
            self._reservoir_add(x, self.seen - x.shape[0])

    def _reservoir_add(self, x: torch.Tensor, n: int) -> None:
        """Keep a uniform random sample of at most ``cap`` of all rows seen (reservoir sampling,
        Algorithm R, vectorised per batch): ``n`` rows came before ``x``."""
        take = min(max(self.cap - n, 0), x.shape[0])
        if take:  # the first cap rows fill the reservoir
            head = x[:take].clone()
            self.rows = head if self.rows is None else torch.cat([self.rows, head])
        if take == x.shape[0]:
            return
        # row t (0-based over all rows) replaces slot r_t ~ U{0..t} when r_t < cap; a slot chosen
        # several times in this batch ends with the last row that chose it
        t = torch.arange(n + take, n + x.shape[0])
        r = (torch.rand(t.shape[0], generator=self.gen, dtype=torch.float64) * (t + 1)).long()
        keep = r < self.cap
        last = torch.full((self.cap,), -1, dtype=torch.long)
        last.scatter_reduce_(0, r[keep], t[keep], reduce="amax")
        hit = last >= 0  # (index tensors built on the CPU; the rows live on the layer's device)
        self.rows[hit.to(self.rows.device)] = x[(last[hit] - n).to(x.device)]

    def _pairing_fails(self, xf: torch.Tensor | None, x: torch.Tensor) -> str | None:
        """Why the float model's input rows ``xf`` cannot be the same tokens as the quantized model's
        ``x``, as far as one unit tells (another number of rows); else None, with this unit's distances
        added for :meth:`judge_pairing`. fp_target pairs rows by position: a routed layer (an MoE expert)
        gets other tokens, or another number of them, once routing shifts in the quantized model."""
        if xf is None or xf.shape != x.shape:
            return (f"{'no' if xf is None else xf.shape[0]} input rows in the float model against {x.shape[0]} in "
                    "the quantized one")
        n = x.shape[0]
        if n >= 2:
            # a random pairing with no row left in place (a fixed point is a correct pair: it lowered `far`)
            order = torch.randperm(n, generator=self.pair_gen)
            perm = torch.empty_like(order)
            perm[order] = order.roll(1)
            perm = perm.to(x.device)
            xd = x.double()
            self.pair_sums[0] += float((xf - xd).square().sum())
            self.pair_sums[1] += float((xf - xd[perm]).square().sum())
            self.pair_sums[2] += float((xf - xf[perm]).square().sum())  # how far the float tokens are from each other
        return None

    def judge_pairing(self) -> None:
        """After the calibration passes: drop the pairing when, over all units, the paired rows' squared
        distance is not clearly below that of random pairings of the same rows (_PAIR_RATIO): same tokens
        sit far closer to each other than to other tokens. Unless the tokens hardly differ from each other
        at all (rows all alike, e.g. one timestep's embedding per unit: any pairing is as good, and
        position pairs them exactly). Judged over all units at once, so the order of the units does not
        decide it."""
        near, far, spread = self.pair_sums
        if self.pair and far > 0 and near > _PAIR_RATIO * far and spread > _PAIR_RATIO * near:
            self._drop_pairing(f"its paired rows are {near / far:.2f}x as far apart (squared) as randomly paired ones")

    def _drop_pairing(self, why: str) -> None:
        """Fit this layer (group) to its own inputs alone; ``dropped`` says why (quantize_ warns)."""
        self.dropped = why
        self.pair = self.defer = False
        self.pairs, self.AtA, self.BtA = [], None, None

    def _accumulate(self, xf, x):
        accumulate_pairs(self.AtA, self.BtA, x, xf)

    def finish(self, act_q) -> None:
        """Deferred pairs: accumulate with the layer's effective inputs ``act_q(Xq)``."""
        for xf, x in self.pairs:
            self._accumulate(xf, act_q(x))
        self.pairs = []


def _version(x: torch.Tensor):
    """``x``'s version counter (every in-place change bumps it); None for an inference tensor (it has none)."""
    try:
        return x._version
    except RuntimeError:
        return None


class _Chain:
    """Forward hooks on a calibration group's candidates (the leader, then the next layers in order).

    One :meth:`run` is one pass of one calibration unit. The leader's first call hands its input
    to ``on_lead`` (which captures the statistics); candidate ``p`` then joins the pass's chain
    when it is the next hooked layer to fire, right after candidates ``0 .. p-1``, with the very
    tensor the leader got at the same version (not changed in place since). The forward stops
    once the chain holds ``limit`` layers, or at the first hooked call that does not join it
    (another tensor, a candidate out of turn, the leader again). A candidate that fires before
    the leader has its first call elsewhere: the limit drops to below it.
    """

    def __init__(self, mods: list, on_lead: Callable):
        self.on_lead, self.limit, self.n, self.x, self.ver = on_lead, len(mods), 0, None, None
        self.handles = [m.register_forward_hook(self._hook(p), with_kwargs=True) for p, m in enumerate(mods)]

    def _hook(self, p: int):
        def fire(module, inputs, kwargs, output=None):
            x = _layer_input(inputs, kwargs)
            if self.n == 0:
                if p:  # before the leader: this is p's first call, not one the chain could hold
                    self.limit = min(self.limit, p)
                    return
                self.x, self.ver = x, _version(x)  # (before on_lead: a change it made would end the chain)
                self.on_lead(x)
                self.n = 1
            elif p == self.n and p < self.limit and x is self.x and self.ver is not None and _version(x) == self.ver:
                self.n += 1
            else:
                raise _StopForward
            if self.n >= self.limit:
                raise _StopForward
        return fire

    def run(self, call: Callable[[], object], limit: int) -> int:
        """Run one pass (``call()``: a unit on the model, or on the current block) with at most ``limit``
        candidates in the chain; returns the new limit: the chain's length if the leader fired, else
        ``limit`` less the candidates that fired."""
        self.limit, self.n = limit, 0
        try:
            call()
        except _StopForward:
            pass
        finally:
            self.x = None
        return self.n or self.limit

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _calibrate_group(cap: _Capture, mods: list, fp_mods: list | None, passes: list) -> int:
    """Run every calibration unit's passes for the candidates ``mods`` (the leader first, then the
    next layers in order; ``fp_mods``: their copies in the float model, with ``fp_target``), the
    leader's inputs going to ``cap``. ``passes``: per unit ``(call, fp_call or None, token mask)``,
    each call running the unit on the model (or on the current block: ``_blocks``). Returns how
    many of the candidates, from the leader on (>= 1), share these statistics."""
    limit = len(mods)
    chain = _Chain(mods, cap.add)
    fchain = _Chain(fp_mods, cap.set_float_input) if fp_mods is not None else None
    try:
        for call, fp_call, mask in passes:
            cap.mask = mask
            if fchain is not None:  # first: the quantized model's pass pairs its inputs with these
                cap.pending = None
                limit = fchain.run(fp_call, limit)
            limit = chain.run(call, limit)
    finally:
        cap.mask = None
        chain.remove()
        if fchain is not None:
            fchain.remove()
    return limit


def accumulate_pairs(AtA: torch.Tensor, BtA: torch.Tensor, x: torch.Tensor, xf: torch.Tensor) -> None:
    """Adds one batch of paired rows to ``fp_target``'s statistics: ``AtA += A^T A``, ``BtA += B^T A`` with
    ``A = [x | 1]`` (the quantized model's rows ``[T, K]``) and ``B = [xf | 1]`` (the float model's, same
    positions); ``AtA`` / ``BtA`` float64 ``[K+1, K+1]``."""
    one = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
    A = torch.cat([x.double(), one], 1)
    AtA.addmm_(A.T, A)
    BtA.addmm_(torch.cat([xf.double(), one], 1).T, A)


def _with_bias(W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``[W | b]`` in float64 (just ``W`` without a bias): the layer acting on ``[x | 1]`` (``W [..., N, K]``,
    ``b [..., N]``)."""
    return torch.cat([W.double(), b.double()[..., None]], -1) if b is not None else W.double()


def fp_target_weights(W: torch.Tensor, b: torch.Tensor | None, AtA: torch.Tensor, BtA: torch.Tensor,
                      damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer that maps the quantized model's inputs closest to the float model's outputs.

    With ``A = [Xq | 1]`` (inputs the layer sees in the partly quantized model),
    ``B = [X | 1]`` (the float model's inputs, same tokens) and ``Wc = [W | b]``:
    ``argmin_V ||A V^T - B Wc^T||^2 + lam ||V - Wc||^2`` =
    ``(Wc B^T A + lam Wc) (A^T A + lam I)^-1``, ``lam = damp * mean(diag(Xq^T Xq))``
    (the ridge pulls towards the original weights where the data say little).
    Without a bias the ones column is dropped. Returns (W*, b*) float32.

    Shapes: ``W [N, K]``, ``b [N]``, ``AtA`` / ``BtA [n, n]`` (``n >= K + 1`` with a bias, ``>= K``
    without; the leading block is used), or all with one leading batch dimension ``B`` (``W [B, N, K]``,
    ``AtA [B, n, n]``: independent problems, e.g. the channels of a depthwise conv, each with its own
    ``lam``). A problem whose solution is not finite keeps its ``W`` / ``b``.
    """
    K = W.shape[-1]
    fb = b is not None
    n = K + int(fb)
    G = AtA[..., :n, :n].clone()
    Wc = _with_bias(W, b)
    lam = damp * torch.diagonal(G, dim1=-2, dim2=-1)[..., :K].mean(-1).clamp_min(1e-30)
    G.diagonal(dim1=-2, dim2=-1).add_(lam[..., None])
    rhs = Wc @ BtA[..., :n, :n] + lam[..., None, None] * Wc
    L, info = torch.linalg.cholesky_ex(G)
    if not bool(info.any()):
        V = torch.cholesky_solve(rhs.mT, L).mT
    else:  # (damp = 0 with a singular G: solved for the change from Wc, so that the minimum-norm solution
        # keeps Wc in the directions the data do not see; lstsq for V itself zeroed them, error 0.85 vs 0.10)
        # (on the CPU with gelsd, which handles rank deficiency: CUDA's only driver, gels, assumes full rank)
        d = torch.linalg.lstsq(G.cpu().double(), (rhs - Wc @ G).mT.cpu().double(), driver="gelsd").solution.mT
        V = Wc + d.to(Wc)
    ok = torch.isfinite(V).flatten(-2).all(-1)[..., None, None]  # per problem
    V = torch.where(ok, V, Wc)
    return V[..., :K].float(), (V[..., K].float() if fb else None)


def _layer_scale(W: torch.Tensor, b: torch.Tensor | None) -> float:
    """max |W| and |b| of a layer (what a negligible group is measured against: a zero-initialised layer
    with a bias, e.g. LoRA-B or adaLN-zero, has max |W| = 0)."""
    m = float(W.detach().abs().max()) if W.numel() else 0.0
    return max(m, float(b.detach().abs().max())) if b is not None and b.numel() else m


def _act_qparams(cfg: QuantizeConfig, cap: _Capture | None, name: str):
    """(scale, zero) 0-dim float32 of a static input quantizer (None, None when dynamic / off)."""
    if not cfg.static_act or cap is None or cap.seen == 0:
        return None, None
    scale, zero, _, _ = cap.act_cal.qparams()
    from .calibrate import nonzero_scale

    return nonzero_scale(scale.float().reshape(()), zero.float().reshape(()), f"quantize_: layer {name!r}")


def _warn_hqq_init_clamps(name: str, W: torch.Tensor, bits: int, gs: int) -> None:
    """Warn when HQQ's min-max init (rtn and hqq, as in the hqq package) would not give some of a
    layer's groups their min-max grid (:func:`~quantkern.ptq.hqq.init_clamp_fraction`). Layers with
    tiny weights then lose most of their information."""
    from .hqq import init_clamp_fraction

    frac = init_clamp_fraction(W, bits, gs)
    if frac > 0:
        warnings.warn(f"quantize_: layer {name!r}: {frac:.1%} of its groups have a weight range below HQQ's "
                      f"thresholds (range <= 1e-4 -> scale 1, 1/scale capped at 2e4; the min-max init that "
                      f"'rtn' and 'hqq' share with the hqq package), so they quantize far more coarsely than "
                      f"min-max. 'gptq' / 'erq', or PackedWeight.from_float (plain min-max), keep them.",
                      stacklevel=4)


def _solve(method: str, W: torch.Tensor, b, bits: int, gs: int, cfg: QuantizeConfig, cap: _Capture | None,
           act_q: Callable | None):
    from ._wquant import refit_scale_zero
    from .hqq import hqq_quantize, rtn_quantize

    if method == "rtn":
        q, s, z = rtn_quantize(W, bits, gs, warn=False)  # (quantize_ warns itself, naming the layer)
        return q, s, z, b
    if method == "hqq":
        q, s, z = hqq_quantize(W, bits, gs, iters=cfg.hqq_iters, warn=False)
        return q, s, z, b
    W0, b0 = W, b
    pair = cap is not None and cap.pair and method in _DATA_METHODS
    if pair:
        W, b = fp_target_weights(W0, b0, cap.AtA, cap.BtA, cfg.fp_target_damp)
    if method == "gptq":
        from .gptq import gptq_quantize

        H = cap.hess.H
        kw = dict(damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, clip=cfg.clip,
                  clip_grid=cfg.clip_grid, clip_max_shrink=cfg.clip_max_shrink)
        q, s, z = gptq_quantize(W, H, bits, gs, **kw)
        if cfg.refit and pair:  # the float model's outputs as the target, bias included
            n = W.shape[1] + int(b is not None)
            s, z, b = refit_scale_zero(q, gs, cap.AtA[:n, :n], _with_bias(W0, b0) @ cap.BtA[:n, :n], s, z, bias=b)
        elif cfg.refit:
            Hd = H.double()
            rhs = W.double() @ Hd  # the objective tr((W - W_hat) H (W - W_hat)^T)
            s, z, _ = refit_scale_zero(q, gs, Hd, rhs, s, z)
            for _ in range(cfg.refit_passes):
                q, s, z = gptq_quantize(W, H, bits, gs, **kw, params=(s, z))
                s, z, _ = refit_scale_zero(q, gs, Hd, rhs, s, z)
        return q, s, z, b
    from .erq import erq_quantize

    use_aqer = act_q is not None
    q, s, z, nb = erq_quantize(W, b, cap.rows, bits, gs, lambda1=cfg.erq_lambda1, lambda2=cfg.erq_lambda2,
                               act_quant=act_q if use_aqer else (lambda x: x), use_aqer=use_aqer,
                               refine_iters=cfg.erq_refine_iters, relative_lambda=cfg.erq_relative_lambda,
                               clip=cfg.clip, clip_grid=cfg.clip_grid, clip_max_shrink=cfg.clip_max_shrink,
                               refit=cfg.refit)
    return q, s, z, (nb if nb is not None else b)


def _linear_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, module) that skip entries can name: linear layers, packed or not (a skipped one stays
    as it is), attention modules and transformers Conv1Ds."""
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (nn.Linear, PackedLinear, nn.MultiheadAttention)) or _is_hf_conv1d(m)]


def _unmatched(named: list[tuple[str, nn.Module]], entries) -> list:
    """The skip entries / layer_config patterns of ``entries`` that name no layer of ``named``
    (:func:`_linear_like`)."""
    return [s for s in entries if not any(_skipped(n, (s,)) for n, _ in named)]


def _warn_unmatched_skip(model: nn.Module, skip, what: str = "skip entries") -> None:
    """Warn about skip entries (names / patterns given by the caller) that match no linear layer: a typo
    or a parent module's name (entries match the layer's own name) would otherwise quantize the layer
    (``what``: how the message calls them, e.g. layer_config's patterns)."""
    if skip is None or callable(skip):
        return
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    if not skip or skip == tuple(DEFAULT_SKIP):
        return
    named = _linear_like(model)
    unmatched = _unmatched(named, skip)
    if unmatched:
        warnings.warn(f"quantize_: {what} {unmatched} match no nn.Linear of the model (entries match a layer's "
                      f"own name: exact, '.suffix' or an fnmatch pattern such as '*.fc'; a parent module's name "
                      f"matches none)", stacklevel=4)
    # an entry naming one layer exactly also matches, as a '.suffix', every layer whose name ends in it
    # (skip=("0",) skipped "0" and "2.0"): say so, since the exact name suggests one layer was meant
    by_name = dict(named)  # (one module under several names is one layer)
    wide = {s: [n for n, m in named if m is not by_name[s] and n.endswith("." + s)] for s in skip if s in by_name}
    wide = {s: more for s, more in wide.items() if more}
    if wide:
        s, more = next(iter(wide.items()))
        warnings.warn(f"quantize_: {what} {sorted(wide)} name a layer exactly but also match other layers as a "
                      f"'.suffix' (e.g. {s!r} also matches {more[:3]}); every match is taken" + (
                          f". To skip that layer alone, pass a predicate: skip=lambda n: n == {s!r}"
                          if what == "skip entries" else ""), stacklevel=4)


def _no_grad_outside_inference_mode(fn):
    """``torch.no_grad()`` with inference mode off, as one wrapper (one frame: the warnings' stacklevels
    count it). Under a caller's ``inference_mode`` the calibration statistics and the new layers'
    buffers would be inference tensors, which later in-place updates, ``load_state_dict`` and a
    LoRA backward refuse."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)
    return run


@_no_grad_outside_inference_mode
def quantize_(model: nn.Module, config: QuantizeConfig | None = None, calib_fn=None, progress: bool = True,
              **overrides) -> nn.Module:
    """Quantize ``model`` in place (every non-skipped ``nn.Linear`` -> ``PackedLinear``); returns it.

    Keyword overrides update ``config`` (e.g. ``quantize_(m, method="hqq", bits=3)``).
    ``calib_fn``: ``f(model)`` or a list of them (one per calibration batch), each running the model
    on its batch. They are called several times: for every layer, or every group of layers that read
    the same input tensor (module docstring: calibration groups), unless the layer's block input is
    cached (then once per unit to check the block chains and, per chain, once per unit to reach it;
    twice more with per-block tensors), and on the float model for the float target; so each must run
    the same data on every call (no fresh random batches) and do nothing but run the model
    (``QuantizeConfig.block_cache``).
    Raises ValueError on a bad config and when gptq / erq get no ``calib_fn``.
    After the call ``model._quantize_report`` lists ``(name, seconds, tokens_seen)`` per layer (a
    group's calibration passes count in its first layer's seconds), and ``model._quantize_block_lists``
    names the block lists whose inputs were cached (empty: every pass ran the model from its start).
    """
    if isinstance(config, Mapping):  # the fields as a dict (e.g. read from a JSON file)
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(QuantizeConfig)})
        if unknown:
            raise ValueError(f"quantize_: config has unknown field(s) {unknown}")
        config = QuantizeConfig(**config)
    elif config is not None and not isinstance(config, QuantizeConfig):
        raise TypeError(f"quantize_: config must be a QuantizeConfig (or a dict of its fields), got "
                        f"{type(config).__name__}")
    cfg = dataclasses.replace(config or QuantizeConfig(), **overrides)
    cfg.validate()
    per_layer = cfg.layer_configs()
    if type(model) is nn.Linear:  # it has no parent here to be swapped in: nothing would change
        raise TypeError("quantize_: model is itself an nn.Linear; quantize the module that holds it, or use "
                        "PackedLinear.from_linear(layer)")
    data_methods = [c.method for c in [cfg] + [c for _, c in per_layer] if c.method in _DATA_METHODS]
    units = None
    if data_methods or cfg.static_act:
        if calib_fn is None:
            why = f"method {data_methods[0]!r}" if data_methods else "a static input quantizer (act_bits)"
            raise ValueError(f"quantize_: {why} needs calib_fn (a callable that runs the model on calibration "
                             "data); rtn and hqq weight-only or with act_dynamic need none")
        units = _calib_units(calib_fn)
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("quantize_: model is itself an nn.MultiheadAttention (no parent to replace it in); wrap it "
                        "in a module")
    # _keep_in_fp32_modules stay float; dtype, meta device, NaN / Inf of every weight to convert are
    # checked before expose_linears changes the model (it left GPT-2's Conv1Ds as Linears on refusal)
    keep = with_keep_float("quantize_", model, cfg.skip)
    refresh_hooked_weights(model)  # (prune / weight_norm weights as they are now, not as of the last forward)
    check_linear_weights("quantize_", weights_to_convert(model, keep))
    with undo_swaps_on_error():  # (a refusal below leaves the model as it came)
        expose_linears(model, cfg.skip)  # torch attention projections, transformers Conv1D -> nn.Linear
        layers = linear_sites(model, keep)  # a layer shared under several names: once, kept shared
        # a layer registered under several names takes a pattern that matches any of them, as skip does
        aliases: dict[int, list[str]] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            aliases.setdefault(id(m), []).append(n)

        def matches(lin, p) -> bool:
            return any(_skipped(a, (p,)) for a in aliases.get(id(lin), ()))

        cfgs = [next((c for p, c in per_layer if matches(lin, p)), cfg) for _, _, lin in layers]
        # every layer's group size now: strict_group refuses before any layer changes
        group_sizes, fell = [], []
        for (name, _, lin), c in zip(layers, cfgs):
            group_sizes.append(_group_for(name, lin.in_features, c, fell))
    if len(fell) == 1:
        warnings.warn(fell[0][0] + fell[0][2], stacklevel=3)
    elif fell:  # (one warning per layer was hundreds for a large model)
        warnings.warn(f"quantize_: the group size does not fit {len(fell)} layers (the packed format needs a multiple "
                      f"of 32 that divides in_features); they use the largest that does: "
                      f"{', '.join(f[1] for f in fell[:4])}{' ...' if len(fell) > 4 else ''}", stacklevel=3)
    _warn_unmatched_skip(model, cfg.skip)
    patterns = [p for p, _ in per_layer]
    _warn_unmatched_skip(model, patterns, "layer_config patterns")
    unmatched = set(_unmatched(_linear_like(model), patterns))  # (named by the warning above)
    dead = [p for p in patterns if p not in unmatched and not any(matches(lin, p) for _, _, lin in layers)]
    if dead:  # (e.g. {"lm_head": ...} under the default skip)
        warnings.warn(f"quantize_: layer_config patterns {dead} match only layers that skip (or the model's "
                      "_keep_in_fp32_modules) keeps in float, so they change nothing; take those layers out of skip "
                      "to quantize them", stacklevel=3)
    tied = tied_holders(model, [lin for _, _, lin in layers])  # (so that each float layer can go once replaced)
    # which layers get calibration passes: the data methods' and, with a static input quantizer, all
    calibrated = [c.method in _DATA_METHODS or cfg.static_act for c in cfgs]
    needs_data = any(calibrated)
    if not layers:
        packed = sum(isinstance(m, PackedLinear) for m in model.modules())
        warnings.warn("quantize_: the model has no nn.Linear to quantize (after skip)"
                      + (f"; it already holds {packed} PackedLinear layer(s): quantize the float model (a second "
                         "call does not re-quantize)" if packed else
                         "; layers of other types (e.g. convolutions) are not converted"),
                      stacklevel=3)
    # (before any calibration forward: converted encoder layers must not take torch's fused path)
    disable_fused_encoder_paths(model, [lin for _, _, lin in layers])
    # each module's own mode, restored by name at the end (a packed layer takes its float layer's)
    modes = {n: m.training for n, m in model.named_modules(remove_duplicate=False)}
    model.eval()
    # A transformers model's calibration forwards need no KV cache, and one (a stateful object every
    # block appends to) would keep the block inputs from being cached (``_blocks``): off meanwhile.
    # Every config object counts: T5's stacks hold their own copies, a VLM's language model its text_config.
    hf_cfgs = {id(c): c for c in (getattr(mod, "config", None) for mod in model.modules()) if c is not None}
    cache_on = [c for c in hf_cfgs.values() if getattr(c, "use_cache", None) is True] if needs_data else []
    for c in cache_on:
        c.use_cache = False
    try:
        fp_model = fp_mods = None
        if cfg.fp_target and any(c.method in _DATA_METHODS for c in cfgs):
            import copy

            # The float reference shares every parameter and buffer with the model (nothing here
            # writes them in place; layers are swapped, not edited), so it costs module objects,
            # not a second copy of the weights: the replaced float layers just stay alive until
            # quantize_ returns instead of being freed one by one.
            shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
            fp_model = copy.deepcopy(model, shared)
            fp_mods = dict(fp_model.named_modules())
        plans = []  # the block lists whose inputs are cached (``_blocks``); the one in use and its caches
        active = qcache = fcache = None
        if needs_data and cfg.block_cache and layers:
            f0 = units[0][0]
            plans, note = plan_blocks(model, layers, lambda: f0(model), [lambda f=f: f(model) for f, _ in units[1:]])
            plans = fitting("quantize_", plans, len(units), 2 if fp_model is not None else 1)
            if note is not None:
                warnings.warn(f"quantize_: calibration passes rerun the model from its start for the layers of {note}: "
                              "run the calibration forwards with use_cache=False to let each pass run one block",
                              stacklevel=2)
        report, few = [], []  # few: layers GPTQ / ERQ fit to fewer tokens than their inputs
        unseen = []  # layers no calibration forward reached (one warning for all: an MoE's unused experts)
        mask_hit, mask_miss, mask_odd = False, None, []  # did a token mask apply anywhere; the first mismatch;
        # the layers whose input has the mask's rank but not its shape ([seq, batch, K], an off-by-one seq)
        it = layers
        if progress:
            from tqdm.auto import tqdm

            a = f"A{cfg.act_bits}" if cfg.act_bits else ""
            mixed = " + layer_config" if per_layer else ""
            it = tqdm(layers, desc=f"quantize {cfg.method} W{cfg.bits}{a}{mixed}", unit="layer")
        group_cap, group_end = None, 0  # the statistics of the current calibration group, its end in layers
        for i, (name, sites, lin) in enumerate(it):
            t0 = time.perf_counter()
            W = lin.weight.detach().float()
            b = lin.bias.detach().float() if lin.bias is not None else None
            lc = cfgs[i]  # this layer's solver settings
            gs = group_sizes[i]
            cap = None
            method = lc.method
            if calibrated[i]:
                if i < group_end:  # calibrated in its group's pass: its inputs are the leader's
                    cap = group_cap
                else:
                    act_cal = None
                    if cfg.static_act:
                        from .calibrate import make_calibrator

                        act_cal = make_calibrator(cfg.act_method, cfg.act_bits, None, symmetric=cfg.act_symmetric)
                    # GPTQ with an input quantizer: fit the float target on Qa(Xq) (deferred until Qa is calibrated);
                    # ERQ: on Xq, its Aqer handles the activation error itself (fitting on Qa(Xq) too
                    # double-corrects: MiniLM W4A4 0.66 -> 0.42)
                    pair = ((("defer" if cfg.act_bits is not None and method == "gptq" else True))
                            if fp_mods is not None and method in _DATA_METHODS else False)
                    cap = _Capture(method, lin.in_features, lc.calib_tokens, cfg.seed, act_cal, pair=pair,
                                   device=lin.weight.device, name=name)
                    # candidates: the next layers in order that could read the same tensor (and are
                    # calibrated into the same kind of statistics)
                    n = 1
                    while (_GROUP_CALIBRATION and n < _MAX_GROUP and i + n < len(layers)
                           and layers[i + n][2].in_features == lin.in_features
                           and layers[i + n][2].weight.device == lin.weight.device
                           and calibrated[i + n] and (cfgs[i + n].method, cfgs[i + n].calib_tokens)
                           == (method, lc.calib_tokens)):
                        n += 1
                    group = layers[i:i + n]
                    plan = next((p for p in plans if p.first <= i <= p.last), None)
                    if plan is not None and plan is not active:  # its first layer: every unit's input to block 0
                        active = plan
                        qcache = BlockInputs(plan)
                        qcache.capture([lambda f=f: f(model) for f, _ in units])
                        if fp_model is not None:
                            fcache = BlockInputs(plan, list(fp_model.get_submodule(plan.name)))
                            fcache.capture([lambda f=f: f(fp_model) for f, _ in units])
                        why = qcache.why or (fcache.why if fcache is not None else None)
                        if why is not None:
                            warnings.warn(f"quantize_: {plan.name or 'the model'}: {why}; its layers' calibration "
                                          "passes rerun the model from its start", stacklevel=2)
                            plans.remove(plan)
                            plan = active = qcache = fcache = None
                    if plan is not None:
                        j = plan.block_of[id(lin)]
                        qcache.advance(j)
                        if fcache is not None:
                            fcache.advance(j)
                        passes = [(lambda u=u: qcache.run(u), (lambda u=u: fcache.run(u)) if fcache else None, mask)
                                  for u, (_, mask) in enumerate(units)]
                    else:
                        passes = [(lambda f=f: f(model), (lambda f=f: f(fp_model)) if fp_model is not None else None,
                                   mask) for f, mask in units]
                    n = _calibrate_group(cap, [m for _, _, m in group],
                                         [fp_mods[nm] for nm, _, _ in group] if cap.pair else None, passes)
                    cap.judge_pairing()
                    mask_hit = mask_hit or cap.mask_hit
                    mask_miss = mask_miss or (cap.mask_miss and (name, *cap.mask_miss))
                    if cap.mask_miss and len(cap.mask_miss[0]) - 1 == len(cap.mask_miss[1]):
                        mask_odd.append((name, *cap.mask_miss))  # same rank, other shape: a mask meant for it
                    group_cap, group_end = cap, i + n
                    if cap.dropped is not None:  # (every layer of the group shares the statistics)
                        names = [nm for nm, _, _ in layers[i:i + n]]
                        warnings.warn(f"quantize_(fp_target=True): layer(s) {names} see other tokens in the float and "
                                      f"the quantized model ({cap.dropped}): a routed layer (an MoE expert whose "
                                      "tokens change once earlier layers are quantized), or a calib_fn that is not "
                                      "deterministic or runs a model other than the one it is passed; they are fitted "
                                      "to their own inputs alone (fp_target=False for them)", stacklevel=3)
                if cap.seen == 0:
                    unseen.append(repr(name))
                    method = "rtn"
                else:  # ERQ fits on its sample of at most calib_tokens rows (unless it fits a float target)
                    used = min(cap.seen, lc.calib_tokens) if method == "erq" and not cap.pair else cap.seen
                    if method in ("gptq", "erq") and used < lin.in_features:
                        few.append(f"{name!r} ({used} < {lin.in_features})")
            a_scale, a_zero = _act_qparams(cfg, cap, name)
            act_q = None
            if cfg.act_bits is not None:
                from ..nn.packed_linear import fake_quant_input

                dyn = cfg.act_dynamic or a_scale is None

                def act_q(x, _d=dyn, _s=a_scale, _z=a_zero):
                    return fake_quant_input(x, cfg.act_bits, cfg.act_symmetric, _d, _s, _z)

            if cap is not None and cap.defer:
                cap.finish(act_q)
            if method in ("rtn", "hqq"):
                _warn_hqq_init_clamps(name, W, lc.bits, gs)
            try:
                q, s, z, nb = _solve(method, W, b, lc.bits, gs, lc, cap, act_q)
            except (RuntimeError, ValueError) as e:
                raise type(e)(f"quantize_: layer {name!r}: {e}" + (
                    f" (the {len(report)} layer(s) before it are already replaced: quantize a fresh copy)"
                    if report else "")) from e
            sm, zm = s.to(lc.meta_dtype), z.to(lc.meta_dtype)
            # A scale that underflows to 0 zeroes its group, and a deep subnormal keeps few bits (scales_lost).
            # Harmless when the group's weights are negligible (e.g. the ~1e-18 a float-target fit leaves in an
            # all-zero row).
            lost_ok = not lost_groups_matter(s, z, lc.bits, scales_lost(sm, s), _layer_scale(W, b))
            if not (lost_ok and bool(torch.isfinite(sm).all() and torch.isfinite(zm).all())):
                warnings.warn(f"quantize_: layer {name!r}: its scales / zeros do not fit {lc.meta_dtype} (a scale "
                              f"underflows to 0 or to a subnormal, or a value overflows); this layer keeps float32 "
                              f"metadata",
                              stacklevel=3)
                sm, zm = s.float(), z.float()
            pw = PackedWeight.from_quantized(q.to(torch.uint8), sm, zm, lc.bits, gs)
            new = PackedLinear.from_packed(pw.to(lin.weight.device), nb.to(lin.weight.dtype) if nb is not None else None)
            if new.bias is not None and lin.bias is not None:  # a frozen bias stays frozen
                new.bias.requires_grad_(lin.bias.requires_grad)
            if cfg.act_bits is not None:
                new.set_input_quantizer(cfg.act_bits, cfg.act_symmetric, cfg.act_dynamic or a_scale is None,
                                        a_scale, a_zero)
            swap_module(sites, lin, new)
            report.append((name, time.perf_counter() - t0, cap.seen if cap else 0))
            # nothing here holds the float layer any longer (without fp_target, whose float copy shares the
            # weights, it is freed now unless the caller holds it): the peak is one float layer, not the model
            layers[i] = (name, sites, None)
            del cap, lin, W, b
            if i + 1 >= group_end:  # the group is done: free its statistics before the next one
                group_cap = None
            if active is not None and i == active.last:  # past the blocks: free their cached inputs
                active = qcache = fcache = None
        if mask_odd:
            warnings.warn(f"quantize_: the calibration token mask did not fit the input of {len(mask_odd)} layer(s) "
                          f"with its rank, e.g. {mask_odd[0][0]!r}: {list(mask_odd[0][1])} with a mask of "
                          f"{list(mask_odd[0][2])} (a sequence-first [seq, batch, K] input, or an off-by-one seq); "
                          "their padding rows were calibration data", stacklevel=3)
        elif units and not mask_hit and mask_miss:
            warnings.warn(f"quantize_: no calibration token mask matched a layer's input (a mask's shape must be "
                          f"the input's leading dims, e.g. [batch, seq] for [batch, seq, K]): e.g. layer "
                          f"{mask_miss[0]!r} got {list(mask_miss[1])} with a mask of {list(mask_miss[2])}; every row, "
                          "padding included, was calibration data", stacklevel=3)
        if unseen:
            warnings.warn(f"quantize_: {len(unseen)} layer(s) saw no calibration input, e.g. "
                          f"{', '.join(unseen[:3])}{' ...' if len(unseen) > 3 else ''}; using RTN for them"
                          + (" and a dynamic input quantizer" if cfg.static_act else "")
                          + " (if the model reads a layer's .weight instead of calling it, as WavLM's attention "
                          "does, a packed layer cannot serve it: skip it)", stacklevel=3)
        if few:
            warnings.warn(f"quantize_: {len(few)} layer(s) were fitted to fewer calibration tokens than their "
                          f"in_features (ERQ: at most calib_tokens), "
                          f"e.g. {', '.join(few[:3])}: GPTQ / ERQ then fits the calibration data rather than the "
                          f"layer (its error can exceed RTN's); give it more calibration data", stacklevel=3)
    except BaseException as e:  # (a calib_fn error, out of memory, Ctrl-C: say what state the model is in)
        if report and "already replaced" not in str(e):
            e.add_note(f"quantize_: the {len(report)} layer(s) done before this error are already replaced by "
                       "PackedLinear (the model is partly quantized: quantize a fresh copy)")
        raise
    finally:  # an error mid-way leaves the layers done so far quantized, and the modes as they were
        for n, m in model.named_modules(remove_duplicate=False):
            m.training = modes.get(n, m.training)
        for c in cache_on:
            c.use_cache = True
    untie_packed_outputs(model, still=tied)
    warn_left_float("quantize_", model, cfg.skip, stacklevel=4)  # (+1: the no-grad wrapper)
    fp_model = fp_mods = None
    model._quantize_report = report
    model._quantize_block_lists = tuple(p.name for p in plans)
    return model


def _packed_modules(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """First name of every module (``named_modules()``'s) -> all names it is registered under."""
    first = {id(m): n for n, m in model.named_modules()}
    out: dict[str, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        out.setdefault(first[id(m)], []).append(n)
    return out


_PACKED_KEYS = ("qweight", "scales", "zeros", "_extra_state")
# header key: {layer: {"bits", "symmetric", "dynamic"[, "offset": true, "per_channel"]}} as JSON (the offset keys
# for a converted QAT layer's input quantizer, PackedLinear.from_qat)
_ACT_META = "quantkern.act_quant"
# header key: JSON list of the float nn.Linear layers that were transformers Conv1D (conv1d_to_linear) but
# stayed unpacked: their saved weight is transposed from the fresh model's Conv1D (for a square one the
# shapes agree, so the load could not tell). Packed ones are known by their packed weight.
_CONV1D_META = "quantkern.conv1d_as_linear"
_TIED_META = "quantkern.tied"  # header key: JSON {name: name it shares its tensor with (stored)}


def _same_tensor_key(t: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (a tied weight): same storage, offset, shape, strides, dtype."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _check_act_meta(name: str, d) -> dict:
    """Validate one layer's input-quantizer entry of a checkpoint header; returns it."""
    base = {"bits", "symmetric", "dynamic"}
    ok = (isinstance(d, dict) and set(d) in (base, base | {"offset", "per_channel"}) and type(d["bits"]) is int
          and 2 <= d["bits"] <= 8 and type(d["symmetric"]) is bool and type(d["dynamic"]) is bool
          and ("offset" not in d or (d["offset"] is True and type(d["per_channel"]) is bool and not d["dynamic"])))
    if not ok:
        raise ValueError(f"load_quantized: bad input-quantizer metadata for {name!r}: {d!r} (expected "
                         "{'bits': int in [2, 8], 'symmetric': bool, 'dynamic': bool}, plus 'offset': true and "
                         "'per_channel': bool for a static offset (LSQ+) quantizer)")
    return d


def _unwrap_compiled(model):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds; anything else unchanged."""
    import sys

    # (no wrapper exists unless dynamo was imported: importing it here would cost a second and warnings)
    ev = sys.modules.get("torch._dynamo.eval_frame")
    return model._orig_mod if ev is not None and isinstance(model, ev.OptimizedModule) else model


def save_quantized(model: nn.Module, path: str) -> None:
    """Save a :func:`quantize_`-d model to one safetensors file (packed weights + every other float tensor).
    A ``torch.compile`` wrapper is saved as the model it wraps (names without ``_orig_mod.``)."""
    model = _unwrap_compiled(model)
    if isinstance(model, PackedLinear):
        raise TypeError("save_quantized: model is itself a PackedLinear; save the module that holds it, or use "
                        "quantkern.save_packed({'name': layer.packed_weight}, path)")
    packed = _packed_modules(model)
    if not packed:
        raise ValueError("save_quantized: the model has no PackedLinear layers (run quantize_ first)")
    unset = [n for n, m in packed.items() if m.act_bits is not None and not m.act_dynamic and not m._input_range_set]
    if unset:  # their placeholder range (1, 0) would load as if calibrated
        raise ValueError(f"save_quantized: static input quantizer(s) without a range: {unset[:3]}"
                         f"{' ...' if len(unset) > 3 else ''} (set_input_quantizer(..., scale=, zero=) or calibrate first)")
    weights = {n: m.packed_weight for n, m in packed.items()}
    names = _aliases(model)  # a layer shared under several names is stored once, under its first
    skip = {f"{a}.{k}" for n in packed for a in names[n] for k in _PACKED_KEYS}
    extra, tied, first = {}, {}, {}
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_quantized: state_dict entry {k!r} is {type(v).__name__}, not a tensor")
        # one tensor under several names (tie_word_embeddings: lm_head.weight is embed_tokens.weight) is
        # stored once; the header maps the other names to it
        key = _same_tensor_key(v)
        if v.numel() and key in first:
            tied[k] = first[key]
            continue
        first[key] = k
        extra[k] = v.detach().clone()  # clone: safetensors refuses tensors that share storage
    clash = set(extra) & {f"{n}.{k}" for n in weights for k in ("qweight", "scales", "zeros")}
    if clash:
        raise ValueError(f"save_quantized: name clash {sorted(clash)}")
    import json

    act = {n: m.act_config for n, m in packed.items() if m.act_config is not None}
    conv1d = sorted(n for n, m in model.named_modules() if getattr(m, "_qk_from_conv1d", False) and n not in packed)
    meta = {**({_ACT_META: json.dumps(act, sort_keys=True)} if act else {}),
            **({_CONV1D_META: json.dumps(conv1d)} if conv1d else {}),
            **({_TIED_META: json.dumps(tied, sort_keys=True)} if tied else {})}
    save_packed(weights, path, extra, metadata=meta or None)


def load_quantized(model_or_factory, path: str, device="cpu", backend: str = "auto") -> nn.Module:
    """Rebuild a quantized model from a fresh float model (or a zero-arg factory returning one) and ``path``.

    Each saved packed weight replaces the ``nn.Linear`` of the same name (its shape must
    match); every other parameter / buffer is loaded from the file, strictly.
    """
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError("load_quantized: expected an nn.Module or a factory returning one")
    wrapper, model = model, _unwrap_compiled(model)  # (a torch.compile wrapper: load into what it wraps)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"load_quantized: device must be a torch device or its name, got {device!r}") from e
    if dev.type == "meta":  # (load_state_dict cannot copy into meta: it failed after the layers were swapped)
        raise ValueError("load_quantized: device='meta' cannot hold the loaded tensors; load on 'cpu' (or a GPU), "
                         "or use quantkern.load_packed(path, device='meta') for the shapes alone")
    import json

    from ..packed import read_packed_metadata

    # (a directory or a damaged file: load_packed's errors name the path)
    weights, extra = load_packed(path, device=device)
    header = read_packed_metadata(path)
    try:
        act = json.loads(header.get(_ACT_META, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"load_quantized: unreadable {_ACT_META} metadata in {path}: {e}") from None
    if not isinstance(act, dict) or set(act) - set(weights):
        raise ValueError(f"load_quantized: {_ACT_META} metadata names layers without a packed weight: "
                         f"{sorted(set(act) - set(weights)) if isinstance(act, dict) else act!r}")
    try:
        tied = json.loads(header.get(_TIED_META, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"load_quantized: unreadable {_TIED_META} metadata in {path}: {e}") from None
    # name -> the stored tensor it shares; save_quantized writes only names that hold no tensor of their own
    # (a damaged header mapping a stored name, or a packed layer's, would overwrite it without a word)
    if not isinstance(tied, dict) or any(not isinstance(v, str) or v not in extra or k in extra
                                         or k.rpartition(".")[0] in weights for k, v in tied.items()):
        raise ValueError(f"load_quantized: bad {_TIED_META} metadata in {path}: {tied!r}")
    # quantize_ saved each nn.MultiheadAttention as quantkern's (projections q_proj, ...) and each transformers
    # Conv1D as an nn.Linear: give the float model the same structure where the checkpoint has it
    keys = set(weights) | {k.rpartition(".")[0] for k in extra}
    # (a shared module is skipped when any of its names is: skip it only when none of them was saved)
    every = {a: al for al in _aliases(model).values() for a in al}  # any name -> all names of that module
    unfuse_attention(model, skip=lambda n: not any(f"{a}.q_proj" in keys for a in every.get(n, [n])))
    try:
        unpacked_conv1d = set(json.loads(header.get(_CONV1D_META, "[]")))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"load_quantized: unreadable {_CONV1D_META} metadata in {path}: {e}") from None
    conv1d_to_linear(model, skip=lambda n: not any(a in weights or a in unpacked_conv1d for a in every.get(n, [n])))
    mods = dict(model.named_modules(remove_duplicate=False))  # (parents reached only through a shared module too)
    names = _aliases(model)
    # load_state_dict cannot fill meta tensors (a no-op with a warning), so a model built on the
    # meta device would fail only at the final .to(device), with its layers already swapped
    swapped = {a for n in weights for a in names.get(n, [n])}
    on_meta = [f"{mn}.{tn}" if mn else tn for mn, mod in model.named_modules() if mn not in swapped
               for tn, t in itertools.chain(mod._parameters.items(), mod._buffers.items())
               if t is not None and t.is_meta]
    if on_meta:
        raise ValueError(f"load_quantized: the model has tensors on the meta device ({', '.join(on_meta[:3])}"
                         f"{', ...' if len(on_meta) > 3 else ''}), which a checkpoint cannot fill; build the float "
                         "model on a real device (its nn.Linear weights are replaced by the packed ones)")
    replaced_linears = []
    for name, w in weights.items():
        lin = mods.get(name)
        if isinstance(lin, nn.Linear):
            replaced_linears.append(lin)
        if not isinstance(lin, (nn.Linear, PackedLinear)):
            raise ValueError(f"load_quantized: the checkpoint has a packed weight {name!r} but the model has "
                             f"{type(lin).__name__ if lin is not None else 'no such module'}")
        if (lin.out_features, lin.in_features) != tuple(w.shape):
            raise ValueError(f"load_quantized: {name!r} is {(lin.out_features, lin.in_features)} in the model but "
                             f"{tuple(w.shape)} in the checkpoint")
        bias = torch.zeros(w.shape[0], dtype=lin.bias.dtype) if lin.bias is not None else None
        new = PackedLinear.from_packed(w, bias.to(device) if bias is not None else None, backend=backend)
        if new.bias is not None:  # a frozen bias stays frozen, as quantize_ leaves it
            new.bias.requires_grad_(lin.bias.requires_grad)
        if name in act:  # buffers are placeholders until the strict load below fills them
            d = _check_act_meta(name, act[name])
            if "offset" in d:  # (placeholders too: the strict load below fills them)
                new.set_input_quantizer(d["bits"], d["symmetric"], offset=0.0, per_channel=d["per_channel"])
            else:
                new.set_input_quantizer(d["bits"], d["symmetric"], d["dynamic"])
        sites = [(mods[p] if p else model, child) for p, _, child in
                 (alias.rpartition(".") for alias in names.get(name, [name]))]  # every place a shared layer sits
        swap_module(sites, lin, new)
        disable_fused_encoder_paths(model, [new])
    extra.update({k: extra[v] for k, v in tied.items()})
    # names that are one tensor in the model must hold one value in the checkpoint: torch copies each
    # into the shared tensor in turn, so an untied checkpoint loaded into a tied model kept the last
    # (lm_head.weight as the embedding) without a word
    groups: dict = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if k in extra and isinstance(t, torch.Tensor) and t.numel():
            groups.setdefault(_same_tensor_key(t), []).append(k)
    for ks in groups.values():
        if any(not torch.equal(extra[ks[0]], extra[k]) for k in ks[1:]):
            raise ValueError(f"load_quantized: {ks} are one (tied) tensor in the model but differ in {path}; build "
                             "the model with the checkpoint's tying (e.g. tie_word_embeddings=False)")
    # load_state_dict casts each tensor to the model's dtype: a bf16 checkpoint loaded into a model built in fp32
    # became an fp32 model (other outputs, twice the float memory) without a word
    sd = model.state_dict(keep_vars=True)
    cast = [(k, extra[k].dtype, sd[k].dtype) for k in extra if k in sd and isinstance(sd[k], torch.Tensor)
            and extra[k].is_floating_point() and sd[k].is_floating_point() and extra[k].dtype != sd[k].dtype]
    if cast:
        k, a, b = cast[0]
        warnings.warn(f"load_quantized: {len(cast)} float tensor(s) of the checkpoint have another dtype than the "
                      f"model's (e.g. {k!r}: {a} in the file, {b} in the model); they are cast to the model's. Build "
                      "the model in the checkpoint's dtype to get the quantized model that was saved", stacklevel=2)
    missing, unexpected = model.load_state_dict(extra, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untie_packed_outputs(model, [m.weight for m in replaced_linears])
    allowed = {f"{a}.{k}" for n in weights for a in names.get(n, [n]) for k in _PACKED_KEYS}
    bad_missing = [k for k in missing if k not in allowed]
    if bad_missing or unexpected:
        raise ValueError(f"load_quantized: checkpoint does not match the model: missing {bad_missing}, "
                         f"unexpected {list(unexpected)}")
    model.to(device)
    return wrapper
