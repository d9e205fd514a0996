"""PackedLinear: a drop-in ``nn.Linear`` replacement with a 2/3/4-bit packed weight."""
from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from .. import ops
from .._affine_fq import one_pass, one_pass_applies
from .._dtype_keep import apply_keeping_dtype
from ..packed import PackedWeight
from ..reference import packing as ref
from ._sites import module_sites, refresh_hooked_weights, set_undoably, swap_module, undo_swaps_on_error
from .attention import _not_plain
from .expose import _is_hf_conv1d, _is_hf_conv1d_type, _is_plain_linear_subclass, expose_linears
from .lsq import qrange

FORMAT_VERSION = 1


def _check_input_zero(z: torch.Tensor, bits: int, symmetric: bool, what: str) -> None:
    """A static input zero point must sit on its grid: 0 when symmetric, an integer in [0, 2^b - 1]
    when not (fake_quant_input's grids). Anything else is a corrupted or mismatched checkpoint
    (e.g. an asymmetric 8-bit range loaded into a symmetric or 4-bit quantizer)."""
    v = float(z)
    hi = 0 if symmetric else 2**bits - 1
    if not math.isfinite(v) or v != round(v) or not 0 <= v <= hi:
        raise ValueError(f"PackedLinear: {what} must be {'0 (symmetric grid)' if symmetric else f'an integer in [0, {hi}]'}"
                         f" for the {bits}-bit {'symmetric' if symmetric else 'asymmetric'} input quantizer, got {v}")


def fake_quant_input(x: torch.Tensor, bits: int, symmetric: bool, dynamic: bool,
                     scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform fake quantization of activations ``x [..., K]`` (any float dtype; returned in x.dtype).

    ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` computed in float32 (gradient:
    straight through the rounding, zero where the clamp clips; s and z held constant), with
    the grid of :func:`quantkern.ptq.calibrate.quant_range` (symmetric: ``[-2^(b-1), 2^(b-1)-1]``,
    z = 0; asymmetric: ``[0, 2^b - 1]``, integer z).

    static: ``scale`` / ``zero`` 0-dim float32 (per tensor, from calibration; ``zero`` None: 0).
    dynamic: one range per token (per index of the leading dims; a 1-D x is one token):
    symmetric ``s = max|x| / qmax``; asymmetric ``s = (max(x, 0) - min(x, 0)) / (2^b - 1)``,
    ``z = round(-min / s)``. A token whose range is 0 quantizes to 0.

    Non-finite x (no error: there is no host check): NaN stays NaN; static: +-inf saturates
    to the grid's end like any value beyond the range (calibrate.fake_quant's result);
    dynamic: a token holding NaN or +-inf has a non-finite range and comes out all NaN
    (calibrate.fake_quant_dynamic refuses such x), never as zeros or finite garbage.
    Under ``torch.compile`` pure tensor ops without host synchronisation, so it traces
    (unlike calibrate.fake_quant, which validates scale on the host). Eager on the CPU without
    autograd, a static range or a dynamic symmetric one runs as one fused pass with the same
    bits (:func:`quantkern._affine_fq.one_pass`).
    """
    qmax_s = 2 ** (bits - 1) - 1
    qmin, qmax = (-qmax_s - 1, qmax_s) if symmetric else (0, 2**bits - 1)
    fused = None
    if not dynamic and zero is None:
        zero = torch.zeros_like(scale)
    if not dynamic:
        fused = one_pass(x, scale, zero, qmin, qmax)
    elif symmetric and x.dim() and x.numel() and one_pass_applies(x):  # after the same per-token max as below
        fused = one_pass(x.reshape(-1, x.shape[-1]), (x.float().abs().amax(-1) / qmax).reshape(-1), None,
                         qmin, qmax, axis=0)
    if fused is not None:
        return fused.reshape(x.shape)
    xf = x.float()
    if dynamic:
        if symmetric:
            scale = xf.abs().amax(-1, keepdim=True) / qmax
            zero = torch.zeros_like(scale)
        else:
            lo = xf.amin(-1, keepdim=True).clamp_max(0)
            hi = xf.amax(-1, keepdim=True).clamp_min(0)
            scale = (hi - lo) / qmax
            # hi - lo overflows fp32 for a finite token spanning more than 3.4e38 (near -FLT_MAX and
            # FLT_MAX): its scale came out inf and the whole token NaN; take those in float64, as
            # calibrate.range_to_qparams does (same bits everywhere else)
            wide = torch.isinf(scale) & torch.isfinite(lo) & torch.isfinite(hi)
            scale = torch.where(wide, ((hi.double() - lo.double()) / qmax).float(), scale)
            zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    ok = scale > 0
    s = torch.where(ok, scale, torch.ones_like(scale)).detach()
    zero = zero.detach()
    v = torch.round(xf.detach() / s) + zero
    out = (torch.clamp(v, qmin, qmax) - zero) * s
    # Gradient to x: straight through the rounding, the clamp's own derivative (zero where it
    # clips); the range (static, or this token's for dynamic) counts as a constant. Adding
    # (xf - xf.detach()), an exact zero, keeps the forward value bit for bit; through where, not a
    # product with the mask: for x = +-inf it is inf - inf = NaN, and 0 * NaN turned the
    # saturated (finite) value of a static quantizer into NaN
    inside = (v >= qmin) & (v <= qmax) & ok
    out = out + torch.where(inside, xf - xf.detach(), torch.zeros_like(out))
    # only a range of exactly 0 gives 0; a NaN range (the token holds NaN) makes the whole token NaN
    # (a symmetric one's other entries came out round(x) on the stand-in scale 1)
    out = torch.where(torch.isnan(scale), torch.full_like(out, math.nan), out)
    return torch.where(scale == 0, torch.zeros_like(out), out).to(x.dtype)


class PackedLinear(nn.Module):
    """``y = Qa(x) @ W.T + bias`` with W stored in the canonical packed format.

    ``Qa`` is the optional input fake-quantizer (``act_bits`` None: identity, the
    default); see :meth:`set_input_quantizer` and :func:`fake_quant_input`. Static
    input quantizers keep 0-dim float32 buffers ``input_scale`` / ``input_zero`` (in
    the state_dict); the offset (LSQ+) form of a converted QAT layer (:meth:`from_qat`)
    keeps float32 ``input_scale`` / ``input_offset``, ``[1]`` or ``[in_features]``. The
    config (bits, symmetric, dynamic, and the form) travels in the extra state and is
    checked on load.

    Buffers (saved in the state_dict): ``qweight`` int32 ``[out, ceil(in/32) * bits]``,
    ``scales`` and ``zeros`` ``[out, in // group_size]``; ``bias`` is a Parameter
    (trainable; the packed weight is not). ``bits``, ``group_size`` and the format
    version travel as extra state and are checked on load.

    Optional input permutation ``in_perm``: int64 ``[in]`` buffer (None by default, and then
    absent from the state_dict), a permutation of ``range(in)``. When set, the packed weight
    holds the columns of the layer's weight in that order (``Wp = W[:, in_perm]``, as an
    act-order GPTQ checkpoint needs; :meth:`from_gptq`) and forward computes
    ``Qa(x).index_select(-1, in_perm) @ Wp.T + bias`` (one gather of x per call), which is
    ``Qa(x) @ W.T + bias``. :meth:`dequantize` returns W in the original column order;
    :attr:`packed_weight` is Wp. Set it with :meth:`set_input_permutation`.

    ``module.to(dtype)`` / ``.half()`` / ``.bfloat16()`` cast the bias only: ``scales``,
    ``zeros`` and the input quantizer's buffers keep their dtype (the kernels take any
    metadata dtype with any x dtype), so a model-wide cast never changes the quantized weights.

    Construct from a trained layer with :meth:`from_linear`, or empty (then load a
    state_dict). Works under ``torch.compile`` (the op has a fake implementation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int | None = 128, meta_dtype: torch.dtype = torch.float16, device=None,
                 dtype: torch.dtype | None = None, backend: str = "auto"):
        super().__init__()
        for name, v, lo in (("in_features", in_features, 1), ("out_features", out_features, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"quantkern.PackedLinear: {name} must be an int >= {lo}, got {v!r}")
        gs = in_features if group_size in (None, -1) else group_size
        ops._check_bits("PackedLinear", bits)
        ops._check_group("PackedLinear", in_features, gs)
        if meta_dtype not in ref.META_DTYPES:
            raise TypeError(f"quantkern.PackedLinear: meta_dtype must be one of {ref.META_DTYPES}, got {meta_dtype}")
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):  # (the bias's; the op takes these)
            raise TypeError(f"quantkern.PackedLinear: dtype must be None, torch.float32, torch.float16 or "
                            f"torch.bfloat16, got {dtype}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"quantkern.PackedLinear: backend must be one of {ops.BACKENDS}, got {backend!r}")
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
        self.act_bits, self.act_symmetric, self.act_dynamic = None, False, False
        # registered as None so that forward reads it with one dict lookup (None buffers are not in the state_dict)
        self.register_buffer("in_perm", None)

    def _checked_perm(self, perm, what: str) -> torch.Tensor:
        """``perm`` validated as a permutation of range(in_features): int64 ``[K]`` on qweight's device."""
        K = self.in_features
        if not isinstance(perm, torch.Tensor):
            raise TypeError(f"PackedLinear: {what} must be a tensor (int64 [{K}]) or None, got {type(perm).__name__}")
        if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
            raise TypeError(f"PackedLinear: {what} must have an integer dtype (int64 [{K}]), got {perm.dtype}")
        if perm.shape != (K,):
            raise ValueError(f"PackedLinear: {what} must have shape ({K},) (in_features), got {tuple(perm.shape)}")
        p = perm.detach().to(torch.int64)
        if p.device.type != "meta":  # (a meta layer has no values to check, like its other buffers)
            # every index once: sorted it is arange(K) (a repeated index would duplicate an input, silently)
            if not torch.equal(torch.sort(p).values, torch.arange(K, device=p.device)):
                raise ValueError(f"PackedLinear: {what} must be a permutation of range({K}) (each input index once)")
        # a copy: the caller's tensor (or a checkpoint's) edited later must not reorder the inputs unchecked
        return p.to(self.qweight.device).clone(memory_format=torch.contiguous_format)

    def set_input_permutation(self, perm: torch.Tensor | None) -> "PackedLinear":
        """Set (or with None remove) the input permutation ``in_perm``; returns self.

        ``perm``: integer ``[in_features]``, a permutation of ``range(in_features)``, meaning that
        this layer's packed weight holds column ``perm[j]`` of the weight at column j (class
        docstring). Stored as int64 on the layer's device. Setting it reinterprets the packed
        weight; it does not move any weight data.
        """
        p = None if perm is None else self._checked_perm(perm, "in_perm")
        self._buffers["in_perm"] = p
        return self

    def set_input_quantizer(self, bits: int | None, symmetric: bool = False, dynamic: bool = False,
                            scale=None, zero=None, offset=None, per_channel: bool = False) -> "PackedLinear":
        """Quantize the input before the packed matmul (``bits`` None removes it); returns self.

        bits: int 2..8; symmetric, dynamic: bools. static (``dynamic=False``): ``scale`` > 0
        and ``zero`` (integer on the grid; default 0) are one float each (0-dim / one-element
        tensors or numbers, stored as 0-dim float32 buffers, detached) from calibration.
        Without ``scale`` the buffers are placeholders (1, 0) for a state_dict load to fill:
        until one does, forward raises (the placeholder grid would round inputs to integers).
        dynamic: per-token ranges, no buffers, no scale / zero.

        ``offset`` (not None) selects the LSQ+ form instead, a trained QAT input quantizer's
        (:meth:`from_qat`): ``Qa(x) = round(clamp((x - offset) / scale, qmin, qmax)) * scale + offset``
        with a float ``offset``, computed by :func:`quantkern.ops.fake_quant_lsq` (the QAT forward's
        kernel, so the same bits); grid ``[-2^(b-1), 2^(b-1)-1]`` if ``symmetric`` (LSQ's signed
        grid) else ``[0, 2^b - 1]``. ``per_channel=False``: ``scale`` and ``offset`` are one value
        each (float32 ``[1]`` buffers ``input_scale`` / ``input_offset``); True: ``[in_features]``
        each, one per input feature. Static only, no ``zero``. Without ``scale`` the buffers are
        placeholders (1, and ``offset`` broadcast) for a state_dict load to fill, as above.
        Everything is checked before anything changes: a refused call leaves the module as it was.
        """
        def fail(msg):
            raise ValueError(f"PackedLinear.set_input_quantizer: {msg}")

        if not isinstance(per_channel, bool):
            fail(f"per_channel must be a bool, got {per_channel!r}")
        if offset is not None or per_channel:
            return self._set_offset_input_quantizer(bits, symmetric, dynamic, scale, zero, offset, per_channel, fail)
        if bits is None:
            if scale is not None or zero is not None:
                fail("scale / zero given without bits (bits=None removes the input quantizer)")
        elif isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            # (the message's "act_bits" matches QuantizeConfig's field)
            raise ValueError(f"PackedLinear: act_bits must be an int in [2, 8] or None, got {bits!r}")
        for name, v in (("symmetric", symmetric), ("dynamic", dynamic)):
            if not isinstance(v, bool):  # bool("false") is True: a string or a number flipped the grid silently
                fail(f"{name} must be a bool, got {v!r}")
        s = z = None
        if bits is not None and dynamic and (scale is not None or zero is not None):
            fail("a dynamic quantizer computes its range from every token; scale / zero are for a static one "
                 "(dynamic=False)")
        if bits is not None and not dynamic:
            def one(v, what):
                try:  # detached: a scale carrying autograd history made the module un-deepcopy-able
                    t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float32)
                except (TypeError, ValueError, RuntimeError) as e:
                    fail(f"{what} must be a number or a one-element tensor, got {v!r} ({e})")
                if t.numel() != 1:
                    fail(f"{what} must be one value (the input quantizer is per tensor), got shape {tuple(t.shape)}")
                return t.reshape(())

            # checked where the values are (a meta layer takes placeholders too), then moved to the layer
            s = one(1.0 if scale is None else scale, "scale")
            z = one(0.0 if zero is None else zero, "zero")
            if not s.is_meta and (not bool(torch.isfinite(s)) or float(s) <= 0):  # in float32: 1e-50 is 0, 1e39 inf
                raise ValueError(f"PackedLinear: input scale must be finite and > 0 in float32, got {float(s)}")
            if not z.is_meta:
                _check_input_zero(z, bits, symmetric, "input zero")
            s, z = s.to(self.qweight.device), z.to(self.qweight.device)
        self._replace_input_buffers({} if s is None else {"input_scale": s, "input_zero": z})
        if bits is None:
            self.act_bits, self.act_symmetric, self.act_dynamic = None, False, False
            return self
        self.act_bits, self.act_symmetric, self.act_dynamic = bits, symmetric, dynamic
        self._input_range_set = dynamic or scale is not None
        return self

    def _replace_input_buffers(self, bufs: dict) -> None:
        """Drop every input-quantizer buffer and form flag, then register ``bufs`` (cloned)."""
        for name in ("input_scale", "input_zero", "input_offset"):
            self._buffers.pop(name, None)
        self.__dict__.pop("act_offset_form", None)
        self.__dict__.pop("act_per_channel", None)
        for name, t in bufs.items():
            self.register_buffer(name, t.clone())

    def _set_offset_input_quantizer(self, bits, symmetric, dynamic, scale, zero, offset, per_channel, fail):
        """set_input_quantizer's LSQ+ form (``offset`` given or ``per_channel``); same contract."""
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"PackedLinear: act_bits must be an int in [2, 8] for the offset (LSQ+) input quantizer, "
                             f"got {bits!r}")
        if not isinstance(symmetric, bool):
            fail(f"symmetric must be a bool, got {symmetric!r}")
        if dynamic is not False:
            fail("the offset (LSQ+) form is static: its scale and offset come from training (dynamic=False)")
        if zero is not None:
            fail("the offset (LSQ+) form has a float offset instead of an integer zero point: pass offset=, not zero=")
        if offset is None:
            offset = 0.0
        K = self.in_features
        n = K if per_channel else 1
        what = f"{K} values (per_channel=True: one per input feature)" if per_channel else "one value"

        def vals(v, name):
            try:
                t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                fail(f"{name} must be a number or a float tensor, got {v!r} ({e})")
            if t.numel() == 1:  # one value: every input feature's, with per_channel=True
                t = t.reshape(1).expand(n)
            if t.numel() != n:
                hint = " (pass per_channel=True for one per input feature)" if t.numel() == K else ""
                fail(f"{name} must hold {what}, got shape {tuple(t.shape)}{hint}")
            return t.reshape(n).contiguous()

        # checked where the values are (a meta layer takes placeholders too), then moved to the layer
        s = vals(1.0 if scale is None else scale, "scale")
        b = vals(offset, "offset")
        if not s.is_meta and (not bool(torch.isfinite(s).all()) or not bool((s > 0).all())):
            raise ValueError(f"PackedLinear: input scale must be finite and > 0 in float32, got min "
                             f"{float(s.min()):.4g}")
        if not b.is_meta and not bool(torch.isfinite(b).all()):
            raise ValueError("PackedLinear: input offset must be finite")
        s, b = s.to(self.qweight.device), b.to(self.qweight.device)
        self._replace_input_buffers({"input_scale": s, "input_offset": b})
        self.act_bits, self.act_symmetric, self.act_dynamic = bits, symmetric, False
        self.act_offset_form, self.act_per_channel = True, per_channel
        self._input_range_set = scale is not None
        return self

    # False between set_input_quantizer(bits) without a scale (placeholder range) and the state_dict
    # load that fills it; a class default so modules pickled before it existed still run
    _input_range_set = True
    # the offset (LSQ+) form of the input quantizer and its per-input-feature variant (instance
    # attributes only while that form is set; class defaults for every other module)
    act_offset_form = False
    act_per_channel = False

    @property
    def act_config(self) -> dict | None:
        """``{"bits", "symmetric", "dynamic"}`` of the input quantizer (plus ``"offset": True`` and
        ``"per_channel"`` for the offset (LSQ+) form), or None."""
        if self.act_bits is None:
            return None
        d = {"bits": self.act_bits, "symmetric": self.act_symmetric, "dynamic": self.act_dynamic}
        if self.act_offset_form:  # (absent otherwise, so the older form's checkpoints stay as they were)
            d.update(offset=True, per_channel=self.act_per_channel)
        return d

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``Qa(x)`` (identity without an input quantizer); shape and dtype of x."""
        if self.act_bits is None:
            return x
        if self.act_dynamic:
            return fake_quant_input(x, self.act_bits, self.act_symmetric, True)
        if not self._input_range_set:  # a Python flag: no host sync, a guard under torch.compile
            raise RuntimeError("PackedLinear: the static input quantizer has no range yet (set_input_quantizer "
                               "without scale gives placeholders): pass scale= / zero= from calibration, or "
                               "load a state_dict that holds input_scale / input_zero (input_offset for the "
                               "offset form)")
        if self.act_offset_form:
            qmin, qmax = qrange(self.act_bits, self.act_symmetric)
            return ops.fake_quant_lsq(x, self.input_scale, self.input_offset, qmin, qmax,
                                      axis=-1 if self.act_per_channel else None)
        return fake_quant_input(x, self.act_bits, self.act_symmetric, False, self.input_scale, self.input_zero)

    @classmethod
    def from_packed(cls, weight: PackedWeight, bias: torch.Tensor | None = None, backend: str = "auto",
                    in_perm: torch.Tensor | None = None) -> "PackedLinear":
        """A layer holding ``weight`` (copied) and ``bias``; ``in_perm`` (int ``[in]`` or None): the
        input permutation ``weight`` was stored under (class docstring; :func:`quantkern.formats.from_gptq`)."""
        out_f, in_f = weight.shape
        if bias is not None:  # (copy_ broadcast a [1] or 0-dim bias to every output in silence)
            if not isinstance(bias, torch.Tensor) or bias.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"PackedLinear.from_packed: bias must be a float32 / float16 / bfloat16 tensor, got "
                                f"{bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}")
            if tuple(bias.shape) != (out_f,):
                raise ValueError(f"PackedLinear.from_packed: bias must have shape ({out_f},) (out_features), got "
                                 f"{tuple(bias.shape)}")
        m = cls(in_f, out_f, bias is not None, weight.bits, weight.group_size, weight.scales.dtype,
                device=weight.device, dtype=bias.dtype if bias is not None else None, backend=backend)
        m.qweight.copy_(weight.qweight)
        m.scales.copy_(weight.scales)
        m.zeros.copy_(weight.zeros)
        if bias is not None:
            with torch.no_grad():
                m.bias.copy_(bias)
        if in_perm is not None:
            m.set_input_permutation(in_perm)
        return m

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None, bits: int = 4, group_size: int | None = None,
                  g_idx: torch.Tensor | None = None, zero_offset: int = 1, meta_dtype: torch.dtype | None = None,
                  backend: str = "auto") -> "PackedLinear":
        """A layer from a GPTQ checkpoint's tensors, exactly; act-order (desc_act) ones included.

        Arguments as :func:`quantkern.formats.from_gptq` (qweight int32 ``[K * bits / 32, N]``,
        qzeros int32 ``[G, N * bits / 32]``, scales ``[G, N]``, g_idx integer ``[K]`` or None),
        plus ``bias`` ``[N]`` or None. A permuted g_idx gives the layer an ``in_perm`` (one gather
        of x per call); a plain one (``arange(K) // group_size``) or None gives none.
        """
        from ..formats import from_gptq

        pw, perm = from_gptq(qweight, qzeros, scales, bits, group_size, g_idx=g_idx, zero_offset=zero_offset,
                             meta_dtype=meta_dtype, return_perm=True)
        return cls.from_packed(pw, bias.detach() if bias is not None else None, backend, in_perm=perm)

    @classmethod
    def from_qat(cls, layer: nn.Linear, meta_dtype: torch.dtype = torch.float32,
                 backend: str = "auto") -> "PackedLinear":
        """The packed inference form of a trained QAT layer (:class:`quantkern.nn.QuantLinear`; a subclass
        with a forward or state of its own, e.g. LoRA or pruning, is refused: packing would drop them).

        Keeps the integers the QAT layer's forward uses (oscillation-frozen ones included), its
        scales, its weight offset as the float zero point, and its input quantizer (the offset
        form of :meth:`set_input_quantizer`): see :mod:`quantkern.nn.qat_convert`. 2-4-bit
        weights; per tensor, per output channel, or groups of a multiple of 32 dividing
        in_features. ``meta_dtype``: the scales' / zeros' dtype, float32 by default (exact: the
        learnt scales are float32); float16 / bfloat16 round them (smaller, a little faster at
        small groups). The layer is left as it was (a weight quantizer that never ran initialises
        from the weight first, as its first forward would).
        """
        from .qat_convert import packed_from_qat

        return packed_from_qat(layer, meta_dtype, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128,
                    meta_dtype: torch.dtype | None = None, backend: str = "auto") -> "PackedLinear":
        """Quantize ``linear.weight`` with round-to-nearest min-max per group (PackedWeight.from_float)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"PackedLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if getattr(linear, "weight_quantizer", None) is not None:
            raise TypeError(f"PackedLinear.from_linear: {type(linear).__name__} is a QAT layer: round-to-nearest on "
                            "its latent float weight would drop its learnt scales and input quantizer; use "
                            "PackedLinear.from_qat(layer) (quantkern.nn.convert_qat(model) for a whole model)")
        if linear.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            # (a float64 layer built, then failed on every forward: the packed matmul runs these dtypes only)
            raise TypeError(f"PackedLinear.from_linear: the layer's weight is {linear.weight.dtype}; PackedLinear "
                            "runs float32 / float16 / bfloat16 models: cast first, e.g. layer.float()")
        w = PackedWeight.from_float(linear.weight.detach(), bits, group_size, meta_dtype)
        b = linear.bias.detach() if linear.bias is not None else None
        m = cls.from_packed(w, b, backend)
        if b is not None:  # a frozen bias stays frozen (an optimizer over requires_grad params would train it)
            m.bias.requires_grad_(linear.bias.requires_grad)
        return m

    @property
    def packed_weight(self) -> PackedWeight:
        """The stored packed weight; with an ``in_perm`` its columns are in that order (``W[:, in_perm]``)."""
        return PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                            (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The layer's weight ``W [out, in]`` (``dtype``: see PackedWeight.dequantize; default the
        metadata's dtype, e.g. fp16), in the original input order: ``F.linear(x, layer.dequantize(x.dtype),
        bias)`` is what forward computes (up to rounding; the kernels accumulate in fp32)."""
        w = self.packed_weight.dequantize(dtype)
        p = self._buffers.get("in_perm")
        if p is not None:  # column j of the stored weight is column p[j] of W: scatter them back
            # (into a fresh tensor: inductor miscompiled w.index_copy(1, p, w), source aliasing self)
            w = torch.empty_like(w).index_copy_(1, p, w)
        return w

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (nn.Linear's name: lin(input=x) works)
        # buffers were validated at construction / load; only x and bias are checked per call
        x = self.quantize_input(input)
        # the buffers straight from _buffers: nn.Module.__getattr__ cost ~0.5 us each, ~1/4 of the
        # Python time of a small layer's call (the op itself takes ~7 us at K = 4096, N = 16)
        b = self._buffers
        if b.get("in_perm") is not None:  # (.get: modules pickled before in_perm existed)
            x = self._permute_input(x, b["in_perm"])
        return ops._packed_linear(x, b["qweight"], b["scales"], b["zeros"], self.bits, self.group_size,
                                  self.in_features, self.bias, self.backend)

    def _permute_input(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``x[..., perm]`` for the packed weight's column order. After the input quantizer: its ranges
        (per tensor, or per token over the whole last dim) do not depend on the order, so Qa commutes
        with the gather bit for bit. Gradient to x: index_select's (a scatter back)."""
        # checked here, before the gather: a wider x would be cut to K columns by the gather, and the
        # packed op, seeing K, would not object
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"quantkern.packed_linear: x must have shape [..., {self.in_features}] (in_features), "
                             f"got {tuple(x.shape)}")
        if x.device != perm.device:
            raise ValueError(f"quantkern.packed_linear: weight is on {perm.device} but x is on {x.device}")
        return x.index_select(-1, perm)

    def __getattr__(self, name):
        # (reached only when normal lookup fails) code that reads a Linear's weight directly, e.g.
        # WavLM passing q_proj.weight to F.multi_head_attention_forward, got a bare "no attribute
        # 'weight'"; hasattr(layer, "weight") stays False
        if name == "weight":
            raise AttributeError("PackedLinear has no dense .weight (it is packed: .packed_weight, and .dequantize() "
                                 "gives W): code that reads a Linear's .weight directly (instead of calling the layer) "
                                 "cannot run on a packed layer; keep that layer float (quantize_ / replace_linear "
                                 "skip=[its name])")
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        # transformers' tie_weights() ties an output layer by `lm_head.weight = embed_tokens.weight`: on a
        # PackedLinear that added a stray Parameter the forward never reads (saved, then refused on load)
        if name == "weight":
            raise AttributeError("PackedLinear has no dense weight (it is packed); a packed layer cannot be tied to "
                                 "another module's weight (untie it first, e.g. config.tie_word_embeddings = False)")
        if name == "in_perm":  # `layer.in_perm = t` gets set_input_permutation's checks (torch's would take anything)
            self.set_input_permutation(value)
            return
        super().__setattr__(name, value)

    # buffers whose dtype is part of the quantized model: a module-wide dtype cast leaves them alone
    _KEEP_DTYPE = ("scales", "zeros", "input_scale", "input_zero", "input_offset")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must not round the group scales / zeros or the input
        # quantizer's range (that would change the quantized model); device moves still apply.
        bias = self._parameters.get("bias")
        was = None if bias is None else bias.dtype  # (torch may cast the parameter object in place)
        out = apply_keeping_dtype(self, self._KEEP_DTYPE, fn, recurse)
        new = self._parameters.get("bias")
        if was is not None and new is not None and new.dtype == torch.float64 and was != torch.float64:
            # packed_linear has no float64 path and refused the cast bias, blaming it, after a model-wide
            # .double(); the bias keeps its dtype (x may still be fp32 / fp16 / bf16)
            self._parameters["bias"] = nn.Parameter(new.detach().to(was), requires_grad=new.requires_grad)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an incompatible checkpoint (bits / group size / input quantizer) fails before any buffer is
        # overwritten (torch checks the extra state last, after copying qweight into this module)
        if prefix + "_extra_state" in state_dict:
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        # the checks load_quantized / PackedWeight give a packed weight (forward trusts the buffers):
        # torch's copy would take NaN / inf scales, cast a float qweight into the int32 buffer, or
        # leave scales and zeros in different dtypes, all without a word
        # A partial checkpoint (strict=False) is checked together with this module's other buffers
        # (NaN scales alone, or scales of another dtype than the zeros, loaded without a word); tensors
        # on several devices (or this module on meta) are left to torch's copy below.
        names = ("qweight", "scales", "zeros")
        # a checkpoint tensor without data (meta) into a module with data: torch's copy failed on it after
        # copying the keys before it (a qweight of one checkpoint with the scales of another)
        if not self.qweight.is_meta:
            meta = [prefix + n for n in (*names, "bias", "in_perm", "input_scale", "input_zero", "input_offset")
                    if isinstance(state_dict.get(prefix + n), torch.Tensor) and state_dict[prefix + n].is_meta]
            if meta:
                raise ValueError(f"PackedLinear: checkpoint tensors {meta} are on the meta device (no data)")
        t = [state_dict.get(prefix + n, self._buffers[n]) for n in names]
        if any(prefix + n in state_dict for n in names) and all(isinstance(v, torch.Tensor) for v in t) \
                and len({v.device for v in t}) == 1:
            try:
                PackedWeight(*t, self.bits, self.group_size, (self.out_features, self.in_features))
            except (TypeError, ValueError) as e:
                raise type(e)(f"PackedLinear: checkpoint {prefix}qweight / scales / zeros do not form this "
                              f"module's packed weight: {e}") from None
        # the bias too, before anything is copied (torch's size check came after qweight was overwritten)
        b = state_dict.get(prefix + "bias")
        if isinstance(b, torch.Tensor) and self.bias is not None and b.shape != self.bias.shape:
            raise ValueError(f"PackedLinear: checkpoint {prefix}bias has shape {tuple(b.shape)}, this module's "
                             f"{tuple(self.bias.shape)}")
        # the input permutation belongs to the packed weight it comes with (the column order of qweight):
        # * checkpoint has in_perm: checked, then taken whether or not this module had one (registered
        #   before torch's copy, so the key is neither unexpected nor dropped under strict=False)
        # * checkpoint has qweight but no in_perm while this module has one: the checkpoint's weight is
        #   in the original order, and keeping the permutation would scramble its inputs; refused
        #   (a checkpoint without qweight, e.g. the bias alone, leaves both as they are)
        perm = state_dict.get(prefix + "in_perm")
        if perm is not None:
            perm = self._checked_perm(perm, f"checkpoint {prefix}in_perm")
        elif prefix + "qweight" in state_dict and self._buffers.get("in_perm") is not None:
            raise ValueError(f"PackedLinear: checkpoint {prefix}qweight comes without {prefix}in_perm (its weight is "
                             "in the original input order) but this module has an input permutation; call "
                             "set_input_permutation(None) first to load a plain layer")
        # a static range in a checkpoint without the extra state (filtered, or saved by hand) must meet a
        # static quantizer: torch's strict check caught it only after copying this module's weights, and
        # strict=False dropped the quantizer without a word. (The reverse, a static quantizer given no
        # range, cannot be told from a partial load here: torch passes strict=True to every module; its
        # missing-key check reports it, and forward refuses the placeholder range.)
        ranges = [n for n in ("input_scale", "input_zero", "input_offset") if prefix + n in state_dict]
        if ranges and (self.act_bits is None or self.act_dynamic
                       # (the form judged by the second buffer of the range: input_scale alone fits either)
                       or (prefix + "input_offset" in state_dict and not self.act_offset_form)
                       or (prefix + "input_zero" in state_dict and self.act_offset_form)):
            form = "set_input_quantizer(bits, symmetric, offset=..., per_channel=...)" \
                if prefix + "input_offset" in state_dict else "set_input_quantizer(bits, symmetric, dynamic=False)"
            raise ValueError(f"PackedLinear: checkpoint holds a static input quantizer's range "
                             f"({', '.join(prefix + n for n in ranges)}) but this module has "
                             f"{self.act_config or 'no input quantizer'}; call {form} first")
        # a static input quantizer's range gets the check set_input_quantizer gives it
        # (judged in float32, the buffer's dtype: a float64 1e-50 became scale 0, i.e. every input 0,
        # and 1e39 an inf scale, i.e. NaN outputs, both loaded without a word)
        s, z = state_dict.get(prefix + "input_scale"), state_dict.get(prefix + "input_zero")
        off = state_dict.get(prefix + "input_offset")
        n_range = self.input_scale.numel() if self.act_offset_form else 1
        if isinstance(s, torch.Tensor) and (s.numel() != n_range or not bool(torch.isfinite(s.float()).all())
                                            or not bool((s.float() > 0).all())):
            raise ValueError(f"PackedLinear: checkpoint {prefix}input_scale must be {n_range} value(s), finite and > 0 "
                             f"in float32, got {s if s.numel() <= 8 else tuple(s.shape)}")
        if isinstance(off, torch.Tensor) and (off.numel() != n_range or not bool(torch.isfinite(off.float()).all())):
            raise ValueError(f"PackedLinear: checkpoint {prefix}input_offset must be {n_range} finite value(s), got "
                             f"{off if off.numel() <= 8 else tuple(off.shape)}")
        if isinstance(z, torch.Tensor) and (z.numel() != 1 or not bool(torch.isfinite(z.float()).all())):
            raise ValueError(f"PackedLinear: checkpoint {prefix}input_zero must be one finite value, got {z}")
        if isinstance(z, torch.Tensor) and self.act_bits is not None:
            _check_input_zero(z, self.act_bits, self.act_symmetric, f"checkpoint {prefix}input_zero")
        if self.act_offset_form:  # (the second buffer of the range, whatever the form)
            z = off
        error_msgs = args[4] if len(args) > 4 else kwargs.get("error_msgs")
        n_err = len(error_msgs) if error_msgs is not None else 0
        if perm is not None:  # (all checks passed: nothing above raises after this)
            self._buffers["in_perm"] = perm
        # scales/zeros take the checkpoint's dtype (fp32/fp16/bf16 metadata), never a lossy cast: an empty
        # buffer of that dtype for torch's copy to fill, made only now that every check has passed, and the
        # old buffer put back if torch's copy into it fails (else a caught failed load left uninitialised
        # memory behind). Only when the shape matches: otherwise torch's size check refuses the key anyway.
        replaced = {}
        for name in ("scales", "zeros"):
            t = state_dict.get(prefix + name)
            buf = self._buffers[name]
            if isinstance(t, torch.Tensor) and t.dtype != buf.dtype and t.dtype in ref.META_DTYPES and \
                    t.shape == buf.shape:
                replaced[name] = buf
                self._buffers[name] = torch.empty(buf.shape, dtype=t.dtype, device=buf.device)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        except BaseException:
            self._buffers.update(replaced)
            raise
        # torch reports a failed copy as a message naming the key; then both go back (scales and zeros
        # must keep one dtype: one copied into its new buffer and the other restored would not)
        if error_msgs is not None and any(f'"{prefix}{name}"' in m or f"{prefix}{name}:" in m
                                          for name in replaced for m in error_msgs[n_err:]):
            self._buffers.update(replaced)
        # a placeholder range (set_input_quantizer without scale) counts as set once both buffers
        # came from the checkpoint without an error (a failed copy leaves the placeholders)
        if (self.act_bits is not None and not self.act_dynamic and isinstance(s, torch.Tensor)
                and isinstance(z, torch.Tensor) and (error_msgs is None or len(error_msgs) == n_err)):
            self._input_range_set = True

    def get_extra_state(self):
        st = {"format_version": FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
              "in_features": self.in_features}
        if self.act_bits is not None:  # absent without one, so older checkpoints still load
            st["act"] = self.act_config
        return st

    def set_extra_state(self, state):
        want = self.get_extra_state()
        if state != want:
            raise ValueError(f"PackedLinear: checkpoint has {state}, this module expects {want}")

    def extra_repr(self) -> str:
        r = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"bits={self.bits}, group_size={self.group_size}, meta_dtype={self.scales.dtype}")
        if self.act_bits is not None:
            r += f", act={self.act_config}"
        if self._buffers.get("in_perm") is not None:
            r += ", in_perm=True"
        return r


# the layers kept float unless the caller says otherwise (replace_linear and quantize_ alike): an
# LLM's lm_head and a ViT / BERT classifier, the layers most sensitive to low-bit weights, and the output
# layer of a classification head *module* (transformers' RoBERTa / ELECTRA `classifier.out_proj`, BART's
# `classification_head.out_proj`), which "classifier", a layer's own name, does not match. (Not every
# Linear under a module named classifier: in torchvision's VGG / AlexNet that is most of the model.)
DEFAULT_SKIP = ("lm_head", "classifier", "classifier.out_proj", "classification_head.out_proj")


def check_skip(op: str, skip) -> None:
    """Refuse a ``skip`` that is not None, a name / pattern, a sequence of them or a predicate on the
    layer name (an int or a list holding one failed deep inside fnmatch, after the model changed), and a
    predicate that cannot be called with the name alone (``fake_quantize_model_``'s take ``(name, module)``:
    one of those failed with a bare TypeError mid-way)."""
    if not (skip is None or callable(skip) or isinstance(skip, str) or
            (isinstance(skip, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in skip))):
        raise ValueError(f"{op}: skip must be None, a name / pattern, a sequence of them or a predicate on the "
                         f"layer name, got {skip!r}")
    if callable(skip):
        try:
            sig = inspect.signature(skip, follow_wrapped=False)  # (a functools.wraps adapter: its own signature)
        except (TypeError, ValueError):  # (no signature to read, e.g. some builtins: called as it is)
            return
        try:
            sig.bind("name")
        except TypeError:
            raise TypeError(f"{op}: a skip predicate is called with the layer name alone, skip(name) -> bool; "
                            f"{getattr(skip, '__name__', skip)!r} takes {sig}") from None


def _skipped(name: str, skip) -> bool:
    if skip is None:
        return False
    if callable(skip):
        return bool(skip(name))
    if isinstance(skip, str):
        skip = (skip,)
    return any(name == s or fnmatch.fnmatch(name, s) or name.endswith("." + s) for s in skip)


def with_keep_float(op: str, model: nn.Module, skip):
    """``skip`` plus the layers a transformers model asks to keep in float (``_keep_in_fp32_modules``,
    e.g. T5's ``wo``, whose forward reads ``wo.weight.dtype``: a PackedLinear has no ``weight``), as
    transformers' own quantizers do; a name matches when one of its dotted components (or runs of
    them) is an entry. Warns once naming the layers so kept."""
    keep = getattr(model, "_keep_in_fp32_modules", None)
    if not isinstance(keep, (list, tuple, set)) or not keep or not all(isinstance(k, str) for k in keep):
        return skip

    def kept(n: str) -> bool:
        return any(f".{k}." in f".{n}." for k in keep)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and kept(n) and not _skipped(n, skip)]
    if names:
        warnings.warn(f"{op}: {len(names)} layer(s) stay float because the model lists them in "
                      f"_keep_in_fp32_modules ({sorted(keep)}), e.g. {names[:2]}", stacklevel=3)
    return lambda n: _skipped(n, skip) or kept(n)


def replace_linear(model: nn.Module, bits: int = 4, group_size: int | None = 128,
                   skip: Iterable[str] | Callable[[str], bool] | None = DEFAULT_SKIP,
                   meta_dtype: torch.dtype | None = None, fallback_group_size: bool = True,
                   backend: str = "auto") -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`PackedLinear`.

    ``nn.MultiheadAttention`` modules are first replaced by :class:`quantkern.nn.MultiheadAttention`
    (same function; its q / k / v / out projections are ``nn.Linear`` submodules, then packed
    like any other): torch's module reads its fused weights directly, so they could not be packed.
    transformers' ``Conv1D`` layers (GPT-2) become ``nn.Linear`` likewise (:func:`expose_linears`).

    Args:
        skip: names (exact, a suffix after ".", or fnmatch patterns such as
            ``"*.classifier"``) or a predicate on the qualified name; those layers stay.
            Default :data:`DEFAULT_SKIP` (``lm_head``, ``classifier``, and the output layer of a
            classification head module: ``classifier.out_proj``, ``classification_head.out_proj``);
            None replaces all.
        fallback_group_size: when ``group_size`` does not divide a layer's
            in_features, use the largest multiple of 32 below it that does (one group per
            row when none does) instead of leaving the layer alone.

    Returns the qualified names of the replaced layers.
    """
    ops._check_bits("replace_linear", bits)
    if group_size not in (None, -1) and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                         or group_size <= 0 or group_size % 32):
        # checked once here: a bad size would otherwise fall back to one group per row (or skip every
        # layer with fallback_group_size=False) without a word, or divide by zero
        raise ValueError(f"quantkern.replace_linear: group_size must be a positive multiple of 32 (e.g. 32, 64, "
                         f"128, 256), or None / -1 for one group per row; got {group_size!r}")
    if type(model) is nn.Linear:  # it has no parent here to be replaced in: nothing would change
        raise TypeError("quantkern.replace_linear: model is itself an nn.Linear; use PackedLinear.from_linear(layer)")
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("quantkern.replace_linear: model is itself an nn.MultiheadAttention (no parent to replace it "
                        "in); wrap it, or convert quantkern.nn.MultiheadAttention.from_torch(module)")
    check_skip("quantkern.replace_linear", skip)
    replaced = []
    keep = with_keep_float("replace_linear", model, skip)
    refresh_hooked_weights(model)  # (prune / weight_norm weights as they are now, not as of the last forward)
    # dtype, meta device, NaN / Inf of every weight to convert, before expose_linears changes the model
    check_linear_weights("quantkern.replace_linear", weights_to_convert(model, keep))
    # a layer that fails to convert leaves the model as it came (exposed layers, swaps, encoder flags undone)
    with undo_swaps_on_error():
        with torch.inference_mode(False):  # (normal tensors even under the caller's inference_mode: see quantize_)
            expose_linears(model, skip)  # torch attention projections, transformers Conv1D -> nn.Linear, packed below
        sites_list = linear_sites(model, keep)
        disable_fused_encoder_paths(model, [lin for _, _, lin in sites_list])
        fell, kept = [], []  # (named in one warning each, as quantize_ names its fallbacks)
        for name, sites, child in sites_list:
            gs = group_size
            K = child.in_features
            if gs not in (None, -1) and (K % gs or gs % 32) and gs != K:
                if not fallback_group_size:
                    kept.append(f"{name} (in_features {K})")
                    continue
                gs = fallback_group(K, gs)
                fell.append(f"{name} (in_features {K}): " + (f"g{gs}" if gs < K else "one group per row"))
            try:
                with torch.inference_mode(False):
                    new = PackedLinear.from_linear(child, bits, gs, meta_dtype, backend)
            except (TypeError, ValueError) as e:
                raise type(e)(f"quantkern.replace_linear: layer {name!r}: {e} (the model is unchanged)") from e
            swap_module(sites, child, new)
            replaced.append(name)

    def listed(items):
        return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
    if fell:
        warnings.warn(f"quantkern.replace_linear: group_size {group_size} does not divide the in_features of "
                      f"{listed(fell)}; they use the largest multiple of 32 that does (fallback_group_size=False "
                      "leaves them float instead)", stacklevel=2)
    if kept and replaced:
        warnings.warn(f"quantkern.replace_linear: group_size {group_size} does not divide the in_features of "
                      f"{listed(kept)}; they stay float (fallback_group_size=False)", stacklevel=2)
    warn_left_float("quantkern.replace_linear", model, skip)
    if not replaced:
        warnings.warn("quantkern.replace_linear: no layer replaced: " + (
            "every nn.Linear's in_features is unfit for the group size (fallback_group_size=False)" if sites_list else
            "the model has no nn.Linear (after skip; QAT layers such as QuantLinear are not converted: quantkern.nn.convert_qat packs them)"),
            stacklevel=2)
    return replaced


def linear_sites(model: nn.Module, skip) -> list[tuple[str, list[tuple[nn.Module, str]], nn.Linear]]:
    """Every ``nn.Linear`` of ``model`` once: ``(name, [(parent, attribute), ...], layer)``.

    A layer registered under several names (a shared projection) is listed once, under the name
    ``model.named_modules()`` gives it, with every place it sits, so replacing it keeps it shared.
    It is skipped when any of its names matches ``skip``.
    """
    first = {id(m): n for n, m in model.named_modules()}
    return [(first[id(lin)], sites, lin) for names, sites, lin in module_sites(model, lambda m: type(m) is nn.Linear)
            if not any(_skipped(n, skip) for n in names)]


def weights_to_convert(model: nn.Module, skip) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every layer replace_linear / quantize_ would convert, found before
    :func:`expose_linears` changes anything: plain ``nn.Linear`` s, the ``nn.Linear`` subclasses and
    transformers ``Conv1D`` s it makes plain, and torch ``nn.MultiheadAttention`` projections."""
    def match(m):  # (an attention module that unfuse_attention leaves alone stays float: not checked)
        return (type(m) is nn.Linear or (isinstance(m, nn.MultiheadAttention) and not _not_plain(m))
                or _is_hf_conv1d(m) or _is_plain_linear_subclass(m))
    out = []
    for names, _, m in module_sites(model, match):
        if any(_skipped(n, skip) for n in names):
            continue
        if not isinstance(m, nn.MultiheadAttention):
            out.append((names[0], m.weight))
            continue
        # each projection under the name it gets once unfused, which is what skip / keep-float then see
        E = m.embed_dim
        qkv = (m.in_proj_weight.split(E) if m.in_proj_weight is not None
               else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
        for p, w in zip(("q_proj", "k_proj", "v_proj", "out_proj"), (*qkv, m.out_proj.weight)):
            if not any(_skipped(f"{n}.{p}", skip) for n in names):
                out.append((f"{names[0]}.{p}", w))
    return out


def check_linear_weights(op: str, weights) -> None:
    """Refuse, before any layer is replaced, weights a PackedLinear cannot take: a dtype other than
    fp32 / fp16 / bf16 (the packed matmul runs those inputs only: a float64 model would convert and
    then fail on every forward), the meta device (no data) and NaN / Inf (the quantizers refuse them
    later, without the layer's name, with the earlier layers already swapped).
    ``weights``: ``[(layer name, weight)]`` (:func:`weights_to_convert`)."""
    def names(bad):
        return f"{bad[:3]}{' ...' if len(bad) > 3 else ''}"

    bad = [(n, w.dtype) for n, w in weights if w.dtype not in (torch.float32, torch.float16, torch.bfloat16)]
    if bad:
        raise TypeError(f"{op}: layers {names([n for n, _ in bad])} have weights of dtype {bad[0][1]}; PackedLinear "
                        "takes float32 / float16 / bfloat16 models (cast first, e.g. model.float())")
    meta = [n for n, w in weights if w.is_meta]
    if meta:
        raise ValueError(f"{op}: layers {names(meta)} are on the meta device (no data); load real weights first")
    def finite(w):  # min and max are finite iff every entry is (NaN propagates): ~12x cheaper than isfinite().all()
        lo, hi = torch.aminmax(w.detach())
        return bool(torch.isfinite(lo) & torch.isfinite(hi))

    nonfinite = [n for n, w in weights if w.numel() and not finite(w)]
    if nonfinite:
        raise ValueError(f"{op}: layers {names(nonfinite)} have NaN or Inf weights; a weight must be finite to "
                         "quantize (skip those layers or fix the model)")


def disable_fused_encoder_paths(model: nn.Module, modules) -> int:
    """Switch off torch's fused inference paths of the ``nn.TransformerEncoderLayer`` s whose
    ``linear1`` / ``linear2`` / ``self_attn`` are (or are about to become) one of ``modules``, and
    the nested-tensor path of the ``nn.TransformerEncoder`` s holding them. Both read
    ``linear1.weight`` and the attention's fused weights directly (a PackedLinear has no dense
    weight) and give the same result as the regular path they fall back to. Sets
    ``layer.activation_relu_or_gelu = 0`` (only those checks read it) and
    ``encoder.use_nested_tensor = False``. Returns the number of encoder layers changed."""
    ids = {id(m) for m in modules}
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)
              and any(id(getattr(m, a, None)) in ids for a in ("linear1", "linear2", "self_attn"))]
    for m in layers:
        set_undoably(m, "activation_relu_or_gelu", 0)
    changed = {id(m) for m in layers}
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(id(layer) in changed for layer in m.layers):
            set_undoably(m, "use_nested_tensor", False)
    return len(layers)


def fallback_group(K: int, group_size: int) -> int:
    """The group size a layer of ``K`` inputs gets when ``group_size`` does not fit it: the largest
    multiple of 32 not above ``group_size`` that divides K (finer groups, never coarser than asked),
    else K (one group per row)."""
    return max((g for g in range(32, min(group_size, K) + 1, 32) if K % g == 0), default=K)


def warn_left_float(op: str, model: nn.Module, skip, stacklevel: int = 3) -> None:
    """After a Linear converter ran: warn about the weights it could not reach, which stay float
    although the caller may think them converted: ``nn.Linear`` subclasses with state or code of their
    own (a parametrization such as weight_norm), and 3-D weight tensors outside convolutions (the
    fused experts of transformers 5's MoE blocks, ``experts.gate_up_proj`` [experts, ...])."""
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    # (a parametrized transformers Conv1D is a subclass too: ParametrizedConv1D, which stays as well)
    subs = [n for n, m in model.named_modules()
            if ((isinstance(m, nn.Linear) and type(m) is not nn.Linear
                 and not isinstance(m, NonDynamicallyQuantizableLinear))
                or (not _is_hf_conv1d(m) and any(_is_hf_conv1d_type(t) for t in type(m).__mro__[1:])))
            and not _skipped(n, skip) and getattr(m, "weight_quantizer", None) is None]
    qat = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)
           and getattr(m, "weight_quantizer", None) is not None]
    if qat:
        warnings.warn(f"{op}: {len(qat)} QAT layer(s) stay as they are, e.g. {qat[:3]}: quantkern.nn.convert_qat(model) "
                      "packs trained QAT layers exactly (their learnt scales and integers)", stacklevel=stacklevel)
    if subs:
        warnings.warn(f"{op}: {len(subs)} nn.Linear (or Conv1D) subclass layer(s) stay float: they carry state or code of their "
                      f"own (e.g. a parametrization such as weight_norm: torch.nn.utils.parametrize."
                      f"remove_parametrizations(layer, 'weight') first makes them plain), e.g. {subs[:3]}", stacklevel=stacklevel)
    # the share of the model's weights (a packed layer counts its in x out: its weight is no parameter now)
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    fused = [(f"{mn}.{pn}" if mn else pn, p.numel()) for mn, m in model.named_modules()
             if not isinstance(m, (_ConvNd, nn.Bilinear))
             for pn, p in m.named_parameters(recurse=False)
             if p.is_floating_point() and p.dim() == 3 and p.shape[0] > 1 and min(p.shape[1:]) >= 8]
    if fused:
        share = sum(n for _, n in fused) / max(total, 1)
        warnings.warn(f"{op}: {len(fused)} 3-D weight tensor(s) stay float ({share:.0%} of the weights): fused "
                      f"mixture-of-experts weights ([experts, out, in] tensors, not nn.Linear layers) are not "
                      f"converted, e.g. {[n for n, _ in fused[:2]]}", stacklevel=stacklevel)


def tied_holders(model: nn.Module, layers) -> list[str]:
    """Qualified names of the parameters of ``model`` outside the modules ``layers`` that are one of
    those layers' weights (an input embedding tied to an lm_head): what :func:`untie_packed_outputs`
    reports once the layers are replaced, found before, so that the float layers can be freed one by one."""
    mods, ids = {id(m) for m in layers}, {id(m.weight) for m in layers}
    return [f"{n}.{pn}" if n else pn for n, m in model.named_modules(remove_duplicate=False) if id(m) not in mods
            for pn, p in m.named_parameters(recurse=False) if id(p) in ids]


def untie_packed_outputs(model: nn.Module, replaced_weights=(), still: list[str] | None = None) -> list[str]:
    """After packing layers whose weight another module still holds (an lm_head tied to the input
    embedding), tell transformers the tie is gone (``config.tie_word_embeddings = False``, and the
    same on sub-configs such as ``text_config``), so its ``tie_weights()`` leaves the packed layer alone.
    ``replaced_weights``: the replaced layers' weight tensors, or ``still``: the names holding one
    (:func:`tied_holders` before the replacement). Returns the names still holding one."""
    if still is None:
        ids = {id(w) for w in replaced_weights}
        still = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]
    if still:
        for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        warnings.warn(f"a packed layer was tied to {still}, which stays float: the tie is broken "
                      "(config.tie_word_embeddings set to False)", stacklevel=3)
    return still
