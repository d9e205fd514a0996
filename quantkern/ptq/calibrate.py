"""Calibrators (max, percentile, MSE, KL/entropy) and activation fake-quant helpers.

CPU or GPU, batched over channels (no Python loop over channels). The histogram
and the mse / entropy threshold search run as kernels (``quantkern.ops.calib_histogram``
and ``quantkern.ops.calib_search``: CPU, CUDA, Triton); the rest is PyTorch.
The histogram methods follow NVIDIA pytorch-quantization (``calib/histogram.py``);
the readable one-channel oracle is :mod:`quantkern.reference.calibrate` and the
tests check every batched method against it channel by channel.

Shapes. A calibrator is built with ``axis``:

* ``axis=None``: per tensor; ``compute_amax()`` returns a 0-dim float32 tensor.
* ``axis=a``: per channel along dimension ``a`` of every collected ``x``
  (weights ``[N, K]``: ``axis=0``; activations ``[..., K]``: ``axis=-1``);
  ``compute_amax()`` returns float32 ``[x.shape[a]]``.

``collect(x)`` accepts any float dtype and shape (the same channel count every
call) and streams: nothing but the running statistics is kept; an empty x (no token)
records nothing. Statistics are taken
in float32: float64 values beyond its range raise (as inf would), values below
~1e-45 count as 0. Symmetric ``unsigned=True`` calibrators (and ``fake_quant_dynamic``)
warn once when they see negative values: the grid quantizes them to 0, and max and the
histograms count them by ``|x|`` (NVIDIA's ``abs``).

Methods:

* ``max``: running max of ``|x|`` (symmetric) or running min and max (asymmetric).
* ``percentile`` (histogram, default 99.99): ``edges[searchsorted(cumsum(hist), total * p/100)]``, the left edge
  of the bin holding the quantile (the right edge for bin 0, so non-zero data never gets amax 0).
  Asymmetric: a signed histogram; ``amin`` is the left edge of the bin holding
  the ``(100-p)`` quantile, ``amax`` the right edge of the bin holding the ``p`` quantile
  (so p >= 50). The rank is the float product ``total * p / 100``, as NVIDIA's calibrator computes
  it: where that is an integer rank up to rounding (20000 x 99.9%), the rounding picks the rank's
  bin or the next sample's bin, and NVIDIA's normalised cdf may pick the other one of the two, which in
  a sparse tail can be tens of bins (a few % of amax) away; at other ranks the two agree bit for bit.
* ``mse`` (histogram): candidates are the bin centers from ``start_bin``;
  argmin of the count-weighted squared error of symmetric fake quantization.
  Asymmetric (``symmetric=False``): windows ``[-a*w, b*w]`` of the signed histogram
  on a ``stride`` grid (default 16), error of 2^b-level asymmetric fake quantization.
* ``entropy`` (histogram, KL): 2048 bins over ``|x|``; for ``i`` in
  ``start_bin..n`` fold the tail into bin ``i-1``, merge the ``i`` bins into
  ``2^(b-1)`` levels (``2^b`` unsigned), KL(P||Q), last argmin, ``amax = edge i``.
  Evaluated for all candidates at once from prefix sums (O(n * 2^(b-1)) per channel).
  Asymmetric: windows ``[-a*w, b*w]`` as mse, tails folded into both end bins,
  ``2^b`` levels (exact definitions: :mod:`quantkern.reference.calibrate`).
* ``mse_search`` (raw data): candidates ``base * linspace(0.25, 4, 39)`` where
  ``base`` is the first batch's amax (or range); squared fake-quant error
  accumulated over all collected batches, first argmin. Symmetric or asymmetric.

Histograms (NVIDIA's ``torch.histc`` path): the first batch of a channel sets
``R = max|x|`` and ``n = num_bins``; bin index ``trunc(|x| * n / R)`` (fp32).
A later batch with a larger max grows the histogram with the same width
(``n = ceil(max / width)``, ``R = n * width``). Edge ``k`` is ``k * R / n``
(float64). All-zero channels give amax 0 (and a channel that is all zero in
the first batches starts its histogram at its first non-zero batch).
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import ops
from .._affine_fq import one_pass
from .._dtype_keep import apply_keeping_dtype
from .._warn import user_stacklevel

__all__ = [
    "MaxCalibrator",
    "HistogramCalibrator",
    "MseCalibrator",
    "make_calibrator",
    "compute_amax",
    "quant_range",
    "range_to_qparams",
    "fake_quant",
    "fake_quant_static",
    "fake_quant_dynamic",
    "ActQuantizer",
    "METHODS",
]

METHODS = ("max", "percentile", "mse", "entropy", "mse_search")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_bits(num_bits) -> int:
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an int in [1, 16], got {num_bits!r}")
    return num_bits


def _check_axis(axis, ndim: int, name: str = "x") -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {name} with {ndim} dims")
    return axis % ndim


def _nonfinite_msg(name: str, wide: bool) -> str:
    return f"{name} contains NaN or Inf" + (" (as float32: float64 values beyond 3.4e38 become inf)" if wide else "")


def _channels(x: torch.Tensor, axis: int | None, name: str = "x", native: bool = False,
              empty_ok: bool = False) -> torch.Tensor:
    """``x`` as float32 ``[C, M]`` (C = 1 per tensor).

    native: keep float16 / bfloat16 (the kernels read them directly) and skip the
    NaN / inf check (the caller checks a reduction of x instead: one pass less).
    empty_ok: an empty x gives an empty ``[C, 0]`` (or ``[0, M]``) instead of raising.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if x.numel() == 0 and not empty_ok:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    x = x.detach()
    wide = x.dtype == torch.float64
    if not native or wide:
        x = x.float()
    if axis is None:
        out = x.reshape(1, -1)
    else:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} out of range for {name} with {x.dim()} dims")
        rest = list(x.shape)
        del rest[axis]
        # M spelled out: reshape(0, -1) cannot infer it (x empty along the channel axis)
        out = x.movedim(axis, 0).reshape(x.shape[axis], math.prod(rest))
    if not native and _eager() and not torch.isfinite(out).all():
        raise ValueError(_nonfinite_msg(name, wide))
    return out


def _eager() -> bool:
    """Checks that read tensor data run in eager mode only: under torch.compile each was a
    data-dependent branch, which broke ``fullgraph=True`` over an ActQuantizer."""
    return not torch.compiler.is_compiling()


def _minmax(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row min and max of ``[C, M]`` as float32 (NaN / inf propagate). amin + amax, not
    aminmax (several times slower on the CPU) nor abs().amax (a full-size temporary)."""
    return xc.amin(1).float(), xc.amax(1).float()


def _negative_unsigned_msg(who: str, mn: torch.Tensor) -> str:
    return (f"{who} (unsigned=True): x has negative values (min {float(mn.min()):g}); the unsigned grid quantizes them "
            "to 0, and max, histogram and dynamic ranges are taken on |x|. Use unsigned=False or symmetric=False for "
            "data with negative values.")


def _out(t: torch.Tensor, axis) -> torch.Tensor:
    t = t.float()
    return t.reshape(()) if axis is None else t


# --------------------------------------------------------------------------- quantization grid
def quant_range(num_bits: int, symmetric: bool = True, unsigned: bool = False, narrow_range: bool = False) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)``.

    symmetric signed: ``[-2^(b-1), 2^(b-1)-1]`` (``narrow_range``: ``[-(2^(b-1)-1), 2^(b-1)-1]``);
    symmetric unsigned and asymmetric: ``[0, 2^b - 1]``.
    """
    _check_bits(num_bits)
    if symmetric and not unsigned:
        if num_bits < 2:
            raise ValueError("symmetric signed quantization needs num_bits >= 2")
        hi = 2 ** (num_bits - 1) - 1
        return (-hi if narrow_range else -hi - 1), hi
    return 0, 2**num_bits - 1


def range_to_qparams(amin, amax, num_bits: int, symmetric: bool = True, unsigned: bool = False, narrow_range: bool = False):
    """(scale, zero, qmin, qmax) for ``x_hat = (clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale``.

    symmetric: ``scale = amax / qmax`` (``amin`` ignored, may be None), ``zero = 0``.
    asymmetric: the range is widened to contain 0, ``scale = (amax - amin) / (2^b - 1)``,
    ``zero = round(-amin / scale)`` (an integer in [0, 2^b - 1]).
    ``scale`` is 0 where the range is empty (fake_quant then returns 0). float32 tensors,
    shape of ``amax``.
    """
    qmin, qmax = quant_range(num_bits, symmetric, unsigned, narrow_range)
    amax = torch.as_tensor(amax).float()
    if symmetric:
        if _eager() and not bool((amax >= 0).all()):  # NaN too (it gave a NaN scale)
            raise ValueError(f"amax must be >= 0 (and not NaN), got values in [{float(amax.min())}, {float(amax.max())}]")
        return amax / qmax, torch.zeros_like(amax), qmin, qmax
    if amin is None:
        raise ValueError("asymmetric quantization needs amin")
    amin = torch.as_tensor(amin).float()
    try:
        torch.broadcast_shapes(amin.shape, amax.shape)
    except RuntimeError:
        raise ValueError(f"amin (shape {tuple(amin.shape)}) and amax (shape {tuple(amax.shape)}) must have the same shape") from None
    if _eager() and not bool((amin <= amax).all()):  # NaN too
        raise ValueError("amin must be <= amax (and neither NaN)")
    amin = torch.minimum(amin, torch.zeros(()))
    amax = torch.maximum(amax, torch.zeros(()))
    scale = (amax - amin) / qmax
    # amax - amin overflows fp32 for a range wider than 3.4e38 (data near -FLT_MAX and FLT_MAX)
    # although the scale itself fits: take those in float64
    wide = torch.isinf(scale) & torch.isfinite(amin) & torch.isfinite(amax)
    scale = torch.where(wide, ((amax.double() - amin.double()) / qmax).float(), scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.where(scale > 0, torch.round(-amin / safe), torch.zeros_like(scale)).clamp(qmin, qmax)
    return scale, zero, qmin, qmax


def nonzero_scale(scale: torch.Tensor, zero: torch.Tensor, where: str):
    """(scale, zero) with scale 1 and zero 0 wherever scale is 0, i.e. where calibration saw only
    zeros (a static quantizer with scale 0 turns every later input into 0); warns when it does."""
    dead = ~(scale > 0)
    if bool(dead.any()):
        what = f"{int(dead.sum())} of {dead.numel()} channels" if dead.dim() else "its input"
        warnings.warn(f"{where}: {what} saw only zeros during calibration; using scale 1 (an integer grid) there "
                      "instead of 0, which would turn every later input into 0. Calibrate on data that reaches it.",
                      stacklevel=2)
        scale = torch.where(dead, torch.ones_like(scale), scale)
        zero = torch.where(dead, torch.zeros_like(zero), zero)
    return scale, zero


def fake_quant(x: torch.Tensor, scale, zero, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale`` in fp32, returned in x.dtype.

    scale, zero: one element (per tensor) or 1-D of length ``x.shape[axis]``.
    Where ``scale == 0`` the output is 0. Gradient to x: straight through the rounding, zero
    where the clamp clips (scale and zero count as constants).
    """
    if qmin > qmax:
        raise ValueError(f"need qmin <= qmax, got qmin={qmin}, qmax={qmax}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # an int x came back truncated
        raise TypeError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    scale = torch.as_tensor(scale, device=x.device).float()
    zero = torch.as_tensor(zero, device=x.device).float()
    if zero.numel() not in (1, scale.numel()):  # broadcasting gave an obscure size error, or a [C, C] result
        raise ValueError(f"zero must have one element or as many as scale ({scale.numel()}), got shape {tuple(zero.shape)}")
    checks = _eager()
    if checks and not bool(torch.isfinite(zero).all()):  # a NaN zero made every output NaN
        raise ValueError("zero must be finite")
    axis = _check_axis(axis, x.dim())
    if axis is not None:
        if scale.dim() != 1 or scale.shape[0] != x.shape[axis]:
            raise ValueError(f"per-channel scale must be 1-D of length x.shape[{axis}] = {x.shape[axis]}, got {tuple(scale.shape)}")
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    elif scale.numel() != 1:
        raise ValueError(f"per-tensor scale must have one element, got shape {tuple(scale.shape)} (pass axis=)")
    else:
        scale, zero = scale.reshape(()), zero.reshape(())
    if checks and (not torch.isfinite(scale).all() or (scale < 0).any()):
        raise ValueError("scale must be finite and >= 0")
    fused = one_pass(x, scale, zero, qmin, qmax, axis)  # the same bits in one pass, where it applies
    if fused is not None:
        return fused
    ok = scale > 0
    s = torch.where(ok, scale, torch.ones_like(scale))
    xf = x.float()
    v = torch.round(xf.detach() / s) + zero
    out = (torch.clamp(v, qmin, qmax) - zero) * s
    if xf.requires_grad:  # straight through the rounding, zero where the clamp clips (round's own
        # gradient is 0: training through an activation quantizer got silent zeros); the added
        # term is an exact zero, so the forward value is unchanged (through where, not a product with
        # the mask: for x = +-inf it is inf - inf = NaN, and 0 * NaN made the saturated value NaN)
        out = out + torch.where((v >= qmin) & (v <= qmax) & ok, xf - xf.detach(), torch.zeros_like(out))
    return torch.where(ok, out, torch.zeros_like(out)).to(x.dtype)


def fake_quant_static(x, amax, num_bits: int = 8, *, amin=None, axis=None, symmetric: bool = True, unsigned: bool = False, narrow_range: bool = False):
    """Static fake quantization with a calibrated range (``amax`` [and ``amin`` if asymmetric]).

    x: any float tensor. amax / amin: 0-dim (per tensor) or ``[x.shape[axis]]``.
    Returns x_hat, same shape and dtype as x.
    """
    scale, zero, qmin, qmax = range_to_qparams(amin, amax, num_bits, symmetric, unsigned, narrow_range)
    if axis is not None and isinstance(x, torch.Tensor):  # (fake_quant's error names its own `scale`)
        ax = _check_axis(axis, x.dim())
        for name, v in (("amax", amax), ("amin", amin)):
            t = None if v is None else torch.as_tensor(v)
            if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[ax]):
                raise ValueError(f"fake_quant_static: per-channel {name} must be 1-D of length x.shape[{axis}] = "
                                 f"{x.shape[ax]}, got shape {tuple(t.shape)}")
    return fake_quant(x, scale, zero, qmin, qmax, axis)


def fake_quant_dynamic(x, num_bits: int = 8, *, axis=None, symmetric: bool = True, unsigned: bool = False, narrow_range: bool = False):
    """Dynamic fake quantization: the range is the min/max of this very ``x``.

    axis=None: one range for the tensor; axis=a: one range per index of dimension a
    (per token for activations ``[T, K]``: ``axis=0``). Returns x_hat like x; an empty x
    (no token, e.g. an MoE expert that received none) is returned as an empty copy.
    """
    xc = _channels(x, axis, empty_ok=True)
    if xc.numel() == 0:  # no range to take and nothing to quantize (amin / amax of nothing raised)
        quant_range(num_bits, symmetric, unsigned, narrow_range)  # a bad grid still raises
        return x.clone(memory_format=torch.contiguous_format)
    mn, mx = _minmax(xc)
    if symmetric and unsigned and _eager() and bool((mn < 0).any()):  # negative values became 0 without a word
        warnings.warn(_negative_unsigned_msg("fake_quant_dynamic", mn), stacklevel=2)
    amax = torch.maximum(mx, -mn) if symmetric else mx
    amin = None if symmetric else mn
    if axis is None:
        amax = amax.reshape(())
        amin = None if amin is None else amin.reshape(())
    return fake_quant_static(x, amax, num_bits, amin=amin, axis=axis, symmetric=symmetric, unsigned=unsigned, narrow_range=narrow_range)


# --------------------------------------------------------------------------- calibrators
class _Calibrator:
    def __init__(self, num_bits: int = 8, axis: int | None = None, unsigned: bool = False, symmetric: bool = True):
        self.num_bits = _check_bits(num_bits)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        self.axis = axis
        self.unsigned = bool(unsigned)
        self.symmetric = bool(symmetric)
        quant_range(num_bits, self.symmetric, self.unsigned)  # symmetric signed needs num_bits >= 2: raise now
        self._C = None
        self._warned_sign = False

    def _check_sign(self, mn: torch.Tensor) -> None:
        """Warns (once until reset()) when a symmetric unsigned calibrator sees negative values: the
        grid [0, 2^b - 1] turns them into 0, and max / histograms count them by |x| (NVIDIA's abs),
        which may widen the range past the positive data; both silently, before."""
        if self.symmetric and self.unsigned and not self._warned_sign and bool((mn < 0).any()):
            self._warned_sign = True
            warnings.warn(_negative_unsigned_msg(type(self).__name__, mn), stacklevel=user_stacklevel())

    def _prep(self, x, native: bool = False) -> torch.Tensor:
        """x as [C, M] (see _channels), or None for an empty x (nothing to collect); the caller sets
        ``self._C`` once the batch is collected."""
        xc = _channels(x, self.axis, native=native, empty_ok=True)
        if self._C is not None and xc.shape[0] != self._C:
            raise ValueError(f"collect: x has {xc.shape[0]} channels along axis {self.axis}, earlier batches had {self._C}")
        # an empty batch (no token this step) records nothing: the caller skips it
        return None if xc.numel() == 0 else xc

    def _need_data(self):
        if self._C is None:
            raise RuntimeError(f"{type(self).__name__}: compute_amax() before any collect() of a non-empty x")

    def compute_amax(self) -> torch.Tensor:
        """Symmetric range: float32, 0-dim (per tensor) or [C]."""
        if not self.symmetric:
            raise RuntimeError(f"{type(self).__name__} is asymmetric: use compute_range()")
        return self._amax()

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(amin, amax), float32, 0-dim or [C]. Symmetric: (-amax, amax), or (0, amax) when unsigned.

        Asymmetric: the chosen candidate range, which :meth:`qparams` widens to contain 0. For
        ``mse_search`` (a multiple of the first batch's range) it need not contain the data or 0:
        constant data 3.0 may give (6.375, 6.375); use :meth:`qparams` for the grid applied.
        """
        if self.symmetric:
            amax = self._amax()
            return (torch.zeros_like(amax) if self.unsigned else -amax), amax
        return self._range()

    def qparams(self, narrow_range: bool | None = None):
        """(scale, zero, qmin, qmax) of the calibrated range (see range_to_qparams). ``narrow_range``
        None: the calibrator's own (MseCalibrator searched on that grid), else False."""
        if narrow_range is None:
            narrow_range = getattr(self, "narrow_range", False)
        amin, amax = self.compute_range()
        return range_to_qparams(amin, amax, self.num_bits, self.symmetric, self.unsigned, narrow_range)


class MaxCalibrator(_Calibrator):
    """Running max of |x| (symmetric) or running min/max (asymmetric), per tensor or per channel."""

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, symmetric: bool = True):
        super().__init__(num_bits, axis, unsigned, symmetric)
        self.reset()

    def reset(self):
        self._C = None
        self._max = self._min = None
        self._warned_sign = False

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        xc = self._prep(x, native=True)
        if xc is None:
            return
        mn, mx = _minmax(xc)
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise ValueError(_nonfinite_msg("x", x.dtype == torch.float64))
        self._check_sign(mn)
        if self.symmetric:
            mx = torch.maximum(mx, -mn)
        self._max = mx if self._max is None else torch.maximum(self._max, mx)
        if not self.symmetric:
            self._min = mn if self._min is None else torch.minimum(self._min, mn)
        self._C = xc.shape[0]

    def _amax(self):
        self._need_data()
        return _out(self._max, self.axis)

    def _range(self):
        self._need_data()
        return _out(self._min, self.axis), _out(self._max, self.axis)


# A histogram keeps NVIDIA's fixed bin width as later batches widen it, up to _bin_cap bins per channel (past it,
# bins merge by a power of two). 16x the first batch's bins where memory allows (pos + neg int64 of all channels
# within _BIN_BUDGET bins: 64 MiB), at least 4x: 4x alone made heavy-tailed streams (a Student-t batch after a
# normal one: 15x) merge where NVIDIA does not, and their amax differ by 20%.
_BIN_BUDGET = 1 << 22


def _bin_cap(num_bins: int, channels: int) -> int:
    return max(4 * num_bins, min(16 * num_bins, _BIN_BUDGET // max(1, channels)))


class HistogramCalibrator(_Calibrator):
    """Streaming per-channel histograms; ``method`` in {"percentile", "mse", "entropy"}.

    Args:
        method: how compute_amax() reads the histogram (changeable later: ``calib.method = ...``).
        num_bits, axis, unsigned: as the other calibrators (unsigned: 2^b levels in mse/entropy).
        symmetric: False: asymmetric range (compute_range()); for "mse" / "entropy" the
            asymmetric rules of :mod:`quantkern.reference.calibrate`.
        num_bins: bins of the first batch (2048). A later batch with a larger max extends the
            histogram at the same bin width, as NVIDIA's; past ``16 * num_bins`` bins per channel
            (fewer where the channels' histograms would pass 2^22 bins in all, at least ``4 * num_bins``)
            a channel's bins are merged by a power of two (exactly: bin i -> i >> k), so memory stays
            bounded whatever the growth (an outlier far beyond the first batches' range); NVIDIA never
            merges, so its results differ from there on.
        percentile: in [0, 100] (99.99); at least 50 when asymmetric.
        start_bin, stride: first candidate bin (asymmetric: least window width in bins) and
            step of the mse/entropy candidate grid (128; stride None = 1 symmetric,
            16 asymmetric, where the grid is two-dimensional).
    """

    def __init__(self, method: str = "percentile", num_bits: int = 8, axis=None, unsigned: bool = False, symmetric: bool = True,
                 num_bins: int = 2048, percentile: float = 99.99, start_bin: int = 128, stride: int | None = None):
        super().__init__(num_bits, axis, unsigned, symmetric)
        if not isinstance(num_bins, int) or not 2 <= num_bins <= 1 << 22:
            raise ValueError(f"num_bins must be an int in [2, 2^22], got {num_bins!r}")
        if isinstance(start_bin, bool) or not isinstance(start_bin, int) or start_bin < 1:
            raise ValueError(f"start_bin must be an int >= 1, got {start_bin!r}")
        if stride is None:
            stride = 1 if symmetric else 16
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        self.method, self.percentile = method, percentile  # checked by their setters
        self.num_bins, self.start_bin, self.stride = num_bins, start_bin, stride
        self.reset()

    # method and percentile may change after collecting (one histogram, several readings): checked when set
    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        if value not in ("percentile", "mse", "entropy"):
            raise ValueError(f"HistogramCalibrator method must be 'percentile', 'mse' or 'entropy', got {value!r}")
        self._method = value

    @property
    def percentile(self) -> float:
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        try:  # any real number: int, float, numpy scalar, 0-dim tensor (not a bool or a string)
            v = float(value) if not isinstance(value, (bool, str)) else math.nan
        except (TypeError, ValueError):
            v = math.nan
        if not 0 <= v <= 100:
            raise ValueError(f"percentile must be a number in [0, 100], got {value!r}")
        if not self.symmetric and v < 50:
            # amin is the (100 - p) quantile and amax the p quantile: below 50 they cross, and the
            # range collapsed to (0, 0), later reported as "saw only zeros"
            raise ValueError(f"percentile must be >= 50 for an asymmetric range (symmetric=False: amin is the "
                             f"(100 - percentile) quantile, amax the percentile quantile), got {value!r}")
        self._percentile = v

    def reset(self):
        self._C = None
        self._R = None  # float32 [C], 0 = no non-zero data yet
        self._n = None  # int64 [C]
        self._pos = self._neg = None  # int64 [C, B]
        self._pending = None  # int64 [C]: zeros seen before the first non-zero value
        self._warned_sign = False

    # inference_mode(False): the running state is updated in place, so state made by a first batch under
    # torch.inference_mode() (an inference tensor) raised on a later batch outside it
    @torch.inference_mode(False)
    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        xc = self._prep(x, native=True)
        if xc is None:
            return
        C, M = xc.shape
        dev = xc.device
        mn, mx = _minmax(xc)
        bmax = torch.maximum(mx, -mn)
        if not torch.isfinite(bmax).all():  # aminmax propagates NaN and inf
            raise ValueError(_nonfinite_msg("x", x.dtype == torch.float64))
        self._check_sign(mn)
        if self._R is None:
            self._R = torch.zeros(C, device=dev)
            self._n = torch.zeros(C, dtype=torch.long, device=dev)
            self._pos = torch.zeros(C, self.num_bins, dtype=torch.long, device=dev)
            self._neg = torch.zeros_like(self._pos)
            self._pending = torch.zeros(C, dtype=torch.long, device=dev)
        init = (self._R == 0) & (bmax > 0)
        grow = (self._R > 0) & (bmax > self._R)
        if init.any():
            self._R = torch.where(init, bmax, self._R)
            self._n = torch.where(init, torch.full_like(self._n, self.num_bins), self._n)
            self._pos[:, 0] += torch.where(init, self._pending, torch.zeros_like(self._pending))
            self._pending = torch.where(init, torch.zeros_like(self._pending), self._pending)
        if grow.any():
            width = self._R.double() / self._n.clamp(min=1).double()
            need = torch.ceil(bmax.double() / width)  # bins at this width (may be astronomically many)
            cap = _bin_cap(self.num_bins, C)
            # coarsen by 2^k so that at most cap bins cover the new max; merging is exact
            k = torch.where(grow & (need > cap), torch.ceil(torch.log2(need / cap)), torch.zeros_like(need))
            width = torch.ldexp(width, k.long().clamp(max=1 << 12))
            new_n = torch.ceil(bmax.double() / width).clamp(max=cap)
            # R = n * width must stay finite in fp32 (data near FLT_MAX made it inf); values past R
            # go to the last bin
            new_n = torch.minimum(new_n, torch.floor(torch.finfo(torch.float32).max / width).clamp(min=1)).long()
            if bool((k > 0).any()):
                shift = k.long().clamp(max=62)[:, None]  # i >> 62 == 0 for every bin index
                idx = torch.arange(self._pos.shape[1], device=dev)[None, :] >> shift
                self._pos = torch.zeros_like(self._pos).scatter_add_(1, idx, self._pos)
                self._neg = torch.zeros_like(self._neg).scatter_add_(1, idx, self._neg)
            self._n = torch.where(grow, new_n, self._n)
            self._R = torch.where(grow, (new_n.double() * width).float(), self._R)
        B = int(self._n.max()) if bool((self._n > 0).any()) else self.num_bins
        if B > self._pos.shape[1]:
            pad = B - self._pos.shape[1]
            self._pos = torch.nn.functional.pad(self._pos, (0, pad))
            self._neg = torch.nn.functional.pad(self._neg, (0, pad))
        live = self._R > 0
        self._pending += torch.where(live, torch.zeros_like(self._pending), torch.full_like(self._pending, M))
        if live.any():  # the kernel skips channels with R == 0
            ops.calib_histogram(xc, self._pos, self._neg, self._R, self._n)
        self._C = C

    def _width(self):
        return torch.where(self._n > 0, self._R.double() / self._n.clamp(min=1).double(), torch.zeros_like(self._R, dtype=torch.float64))

    # -- views of the histogram
    def histogram(self):
        """(hist float64 [C, B] of |x|, edges float64 [C, B + 1], n int64 [C]): bins >= n[c] are empty padding."""
        self._need_data()
        hist = (self._pos + self._neg).double()
        hist[:, 0] += self._pending.double()
        B = hist.shape[1]
        edges = torch.arange(B + 1, dtype=torch.float64, device=hist.device)[None, :] * self._width()[:, None]
        return hist, edges, self._n.clone()

    def _search(self, symmetric: bool):
        # calib_search takes stride / start_bin <= 2^24; past num_bins (<= 2^22) a larger value selects the
        # same candidates (one, or none), so the clamp changes no result
        cap = ops.CALIB_MAX_BINS
        return ops.calib_search(self._pos, self._neg, self._width(), self._n, self.method, self.num_bits, unsigned=self.unsigned,
                                symmetric=symmetric, stride=min(self.stride, cap), start_bin=min(self.start_bin, cap))

    def _amax(self):
        self._need_data()
        if self.method == "percentile":
            hist, edges, n = self.histogram()
            amax = _percentile_batched(hist, edges, n, self.percentile)
            return _out(torch.where(self._R > 0, amax, torch.zeros_like(amax)), self.axis)
        return _out(self._search(True)[1], self.axis)

    def _range(self):
        self._need_data()
        if self.method != "percentile":
            amin, amax = self._search(False)
            return _out(amin, self.axis), _out(amax, self.axis)
        neg = self._neg.double()
        pos = self._pos.double()
        pos[:, 0] += self._pending.double()
        C, B = pos.shape
        width = self._width()
        # signed bins: neg[B-1] ... neg[0] pos[0] ... pos[B-1]; edges -B*w ... 0 ... B*w
        signed = torch.cat([neg.flip(1), pos], 1)
        edges = torch.arange(-B, B + 1, dtype=torch.float64, device=pos.device)[None, :] * width[:, None]
        # integer running counts (exact in float64) against p * total: a normalised float cdf can end
        # just below 1.0, and percentile 100 then ran past the last bin to the padding's edge
        cum = torch.cumsum(signed, 1)
        total = cum[:, -1:]
        p = self.percentile / 100
        hi = torch.searchsorted(cum, total * p).clamp(max=2 * B - 1)
        lo = torch.searchsorted(cum, total * (1 - p), right=True).clamp(max=2 * B - 1)
        amax = edges.gather(1, hi + 1)[:, 0].clamp(min=0)
        amin = edges.gather(1, lo)[:, 0].clamp(max=0)
        live = self._R > 0
        return _out(torch.where(live, amin, torch.zeros_like(amin)), self.axis), _out(torch.where(live, amax, torch.zeros_like(amax)), self.axis)


def _percentile_batched(hist, edges, n, percentile):
    # integer running counts (exact in float64) against p * total, as in _range
    cum = torch.cumsum(hist, 1)
    idx = torch.searchsorted(cum, cum[:, -1:] * (percentile / 100))
    idx = torch.minimum(idx[:, 0].clamp(min=1), n)  # bin 0: its right edge
    return edges.gather(1, idx[:, None])[:, 0]


class MseCalibrator(_Calibrator):
    """Raw-data MSE search over ``base * linspace(start, stop, num_steps)``.

    ``base`` is the amax (asymmetric: the (amin, amax) pair) of the first batch
    (per channel: of the first batch that is not all zero there), or ``base_amax`` /
    ``base_amin`` if given; without given bases, a later batch beyond ``stop * base`` gets a warning. Every collect() adds the squared
    fake-quant error of every candidate (per channel); compute_amax() returns
    the first argmin. Symmetric or asymmetric, per tensor or per channel.
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, symmetric: bool = True, *,
                 num_steps: int = 39, start: float = 0.25, stop: float = 4.0, narrow_range: bool = False,
                 base_amax=None, base_amin=None):
        super().__init__(num_bits, axis, unsigned, symmetric)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if not 0 < start <= stop < math.inf:
            raise ValueError(f"need 0 < start <= stop < inf, got start={start}, stop={stop}")
        self.mult = torch.linspace(start, stop, num_steps, dtype=torch.float64)
        self.narrow_range = narrow_range
        # the bases' values are checked here (a NaN / inf base got "no candidate fits float32", a
        # negative one "amax must be >= 0"); their length, against the channels, at the first collect()
        given = {}
        for name, g in (("base_amax", base_amax), ("base_amin", base_amin)):
            if g is not None:
                try:
                    given[name] = t = torch.as_tensor(g, dtype=torch.float64)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"MseCalibrator: {name} must be a number or a 1-D list / tensor of numbers, got {g!r}") from None
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"MseCalibrator: {name} must be finite, got {g!r}")
        if self.symmetric and base_amin is not None:
            raise ValueError("MseCalibrator: base_amin is for symmetric=False (a symmetric range is base_amax alone)")
        if self.symmetric and base_amax is not None and bool((given["base_amax"] < 0).any()):
            raise ValueError(f"MseCalibrator: base_amax must be >= 0 (symmetric), got {base_amax!r}")
        if "base_amax" in given and "base_amin" in given:
            try:
                bad = bool((given["base_amin"] > given["base_amax"]).any())
            except RuntimeError:
                bad = False  # lengths differ: reported at the first collect()
            if bad:
                raise ValueError(f"MseCalibrator: need base_amin <= base_amax, got {base_amin!r} and {base_amax!r}")
        self._given = (base_amin, base_amax)
        self.reset()

    def reset(self):
        self._C = None
        self._base = None
        self._err = None
        self._warned = self._warned_sign = False

    @torch.inference_mode(False)  # (in-place running state: see HistogramCalibrator.collect)
    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        xc = self._prep(x)
        if xc is None:
            return
        if self.symmetric and self.unsigned and not self._warned_sign:
            self._check_sign(xc.amin(1))
        if self._base is None:
            gmin, gmax = self._given
            for name, g in (("base_amax", gmax), ("base_amin", gmin)):
                t = None if g is None else torch.as_tensor(g)
                if t is not None and (t.numel() not in (1, xc.shape[0]) or t.dim() > 1):
                    raise ValueError(f"MseCalibrator: {name} must be 1 value or a 1-D list of one per channel ({xc.shape[0]}), "
                                     f"got shape {tuple(t.shape)}")
            amax = torch.as_tensor(gmax, dtype=torch.float32, device=xc.device).expand(xc.shape[0]).clone() if gmax is not None else (
                xc.abs().amax(1) if self.symmetric else xc.amax(1))
            amin = torch.as_tensor(gmin, dtype=torch.float32, device=xc.device).expand(xc.shape[0]).clone() if gmin is not None else (
                None if self.symmetric else xc.amin(1))
            self._base = (amin, amax)
            self._err = torch.zeros(xc.shape[0], self.mult.numel(), dtype=torch.float64, device=xc.device)
        elif self._given[0] is None and self._given[1] is None:  # (== (None, None) failed on a numpy array)
            self._rebase_empty(xc)
        amin, amax = self._base
        for s, m in enumerate(self.mult.tolist()):
            scale, zero, qmin, qmax = range_to_qparams(None if amin is None else amin * m, amax * m, self.num_bits, self.symmetric,
                                                       self.unsigned, self.narrow_range)
            # a candidate whose grid overflows fp32 (data near FLT_MAX) is no candidate
            fin = scale.isfinite()
            xh = fake_quant(xc, torch.where(fin, scale, torch.ones_like(scale)), torch.where(fin, zero, torch.zeros_like(zero)),
                            qmin, qmax, axis=0)
            err = ((xh - xc).double() ** 2).sum(1)
            self._err[:, s] += torch.where(fin, err, torch.full_like(err, math.inf))
        self._C = xc.shape[0]

    def _rebase_empty(self, xc: torch.Tensor) -> None:
        """Channels whose base range is still empty (every batch so far was all zero there) take this
        batch's range: their accumulated errors are exactly 0 for any candidate (0 is on every grid),
        so nothing is lost. A batch beyond the largest candidate only gets a warning: the earlier
        batches' errors for wider candidates are unknown."""
        amin, amax = self._base
        bmax = xc.abs().amax(1) if self.symmetric else xc.amax(1)
        bmin = None if self.symmetric else xc.amin(1)
        empty = (amax == 0) if amin is None else ((amax <= 0) & (amin >= 0))
        if bool(empty.any()):
            amax = torch.where(empty, bmax, amax)
            amin = None if amin is None else torch.where(empty, bmin, amin)
            self._base = (amin, amax)
        top = float(self.mult[-1])
        over = (bmax > amax * top) if amin is None else ((bmax > torch.clamp(amax, min=0) * top)
                                                         | (bmin < torch.clamp(amin, max=0) * top))
        if bool(over.any()) and not self._warned:
            self._warned = True
            warnings.warn("MseCalibrator (mse_search): a later batch reaches beyond the largest candidate range "
                          f"({top:g}x the first batch's); the search cannot cover it. Pass base_amax / base_amin "
                          "(e.g. from a 'max' pass) or put a representative batch first.", stacklevel=user_stacklevel())

    def _best(self):
        self._need_data()
        if not bool(self._err.isfinite().any(1).all()):
            raise ValueError("MseCalibrator (mse_search): no candidate range fits float32 for this data (its range "
                             "is near the float32 limit, 3.4e38); use method='max' or a histogram method")
        return self.mult.to(self._err.device)[self._err.argmin(1)]

    def _amax(self):
        m = self._best()  # raises a clear error before any collect()
        return _out(self._base[1].double() * m, self.axis)

    def _range(self):
        m = self._best()
        return _out(self._base[0].double() * m, self.axis), _out(self._base[1].double() * m, self.axis)


def make_calibrator(method: str = "max", num_bits: int = 8, axis=None, unsigned: bool = False, symmetric: bool = True, **kwargs):
    """A calibrator by name: one of :data:`METHODS`. kwargs go to the class (num_bins, percentile, ...)."""
    if method == "max":
        return MaxCalibrator(num_bits, axis, unsigned, symmetric, **kwargs)
    if method in ("percentile", "mse", "entropy"):
        return HistogramCalibrator(method, num_bits, axis, unsigned, symmetric, **kwargs)
    if method == "mse_search":
        return MseCalibrator(num_bits, axis, unsigned, symmetric, **kwargs)
    raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")


def compute_amax(x: torch.Tensor, method: str = "max", num_bits: int = 8, axis=None, unsigned: bool = False, symmetric: bool = True, **kwargs):
    """One-shot calibration of one tensor (e.g. a weight, ``axis=0`` per output channel).

    Returns amax (symmetric; float32, 0-dim or [C]) or (amin, amax) (asymmetric).
    """
    cal = make_calibrator(method, num_bits, axis, unsigned, symmetric, **kwargs)
    if isinstance(x, torch.Tensor) and x.numel() == 0:  # collect() skips an empty batch: nothing to calibrate on
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    cal.collect(x)
    return cal.compute_amax() if symmetric else cal.compute_range()


class ActQuantizer(torch.nn.Module):
    """Activation fake quantizer: calibrate (static) or quantize on the fly (dynamic).

    Usage (static)::

        aq = ActQuantizer(num_bits=8, method="percentile")
        aq.start_calibration()
        for x in loader: aq(x)            # collects, returns x unchanged
        aq.finish_calibration()           # freezes scale / zero buffers
        x_hat = aq(x)

    A static range that saw only zeros (a channel, or the whole input) gets scale 1 and a
    warning (see :func:`nonzero_scale`). ``dynamic=True``: every call uses the min/max of that call's input (per tensor,
    or per index of ``axis``). forward keeps shape and dtype.
    """

    def __init__(self, num_bits: int = 8, method: str = "max", axis=None, symmetric: bool = True, unsigned: bool = False,
                 narrow_range: bool = False, dynamic: bool = False, **calib_kwargs):
        super().__init__()
        self.num_bits, self.method, self.axis = _check_bits(num_bits), method, axis
        self.symmetric, self.unsigned, self.narrow_range, self.dynamic = symmetric, unsigned, narrow_range, dynamic
        self.calib_kwargs = calib_kwargs
        self.qmin, self.qmax = quant_range(num_bits, symmetric, unsigned, narrow_range)
        self.calibrator = None
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self._make_calibrator()  # validate the method and its arguments now (a dynamic one too)

    def _make_calibrator(self):
        kwargs = dict(self.calib_kwargs)
        if self.method == "mse_search":  # search on the grid this quantizer applies
            kwargs["narrow_range"] = self.narrow_range
        return make_calibrator(self.method, self.num_bits, self.axis, self.unsigned, self.symmetric, **kwargs)

    @classmethod
    def from_data(cls, xs, num_bits: int = 8, method: str = "max", **kwargs) -> "ActQuantizer":
        """Calibrated on a tensor or an iterable of tensors (not (input, target) pairs: pass
        ``(x for x, _ in loader)``). An empty iterable raises."""
        aq = cls(num_bits, method, **kwargs)
        aq.start_calibration()
        for i, x in enumerate([xs] if isinstance(xs, torch.Tensor) else xs):
            if not isinstance(x, torch.Tensor):  # a loader of (x, y) tuples or dicts: say which batch and what to pass
                raise TypeError(f"ActQuantizer.from_data: batch {i} is a {type(x).__name__}, not a tensor; pass an iterable "
                                "of the quantizer's input tensors, e.g. (x for x, _ in loader)")
            aq(x)
        return aq.finish_calibration()

    def start_calibration(self):
        self.calibrator = self._make_calibrator()
        return self

    def finish_calibration(self, name: str | None = None):
        """Freezes the range; ``name`` (e.g. the layer's) labels the all-zero-data warning."""
        if self.calibrator is None:
            raise RuntimeError("finish_calibration() without start_calibration()")
        if self.calibrator._C is None:  # the calibrator's own error spoke of a compute_amax() the user never called
            raise RuntimeError(f"ActQuantizer{f' of {name!r}' if name else ''}: finish_calibration() before any input was seen "
                               "since start_calibration() (an empty calibration loader, or only empty batches?)")
        scale, zero, _, _ = self.calibrator.qparams(self.narrow_range)
        self.scale, self.zero = nonzero_scale(scale, zero, f"ActQuantizer of {name!r}" if name else "ActQuantizer")
        self.calibrator = None
        return self

    def forward(self, x):
        if self.calibrator is not None:
            self.calibrator.collect(x)
            return x
        if self.dynamic:
            return fake_quant_dynamic(x, self.num_bits, axis=self.axis, symmetric=self.symmetric, unsigned=self.unsigned,
                                      narrow_range=self.narrow_range)
        if self.scale is None:
            raise RuntimeError("ActQuantizer is not calibrated: call start_calibration(), feed data, finish_calibration()")
        return fake_quant(x, self.scale, self.zero, self.qmin, self.qmax, self.axis)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # every check runs before anything is set: a refused checkpoint used to leave an uncalibrated
        # quantizer with an uninitialised scale (torch.empty_like), or a calibrated one with the refused range
        for name in ("scale", "zero"):
            t = state_dict.get(prefix + name)
            # checkpoints from before the axis was saved: a per-channel range loaded into a per-tensor
            # quantizer (or back) loaded, and only the first forward failed
            if isinstance(t, torch.Tensor) and (t.numel() != 1 if self.axis is None else t.dim() != 1):
                raise ValueError(f"ActQuantizer at {prefix!r}: the checkpoint's {name} has shape {tuple(t.shape)}, but this "
                                 f"quantizer is {'per tensor (axis=None)' if self.axis is None else f'per channel (axis={self.axis})'}"
                                 ": a different axis?")
        # the config is not in the checkpoint, but its zero point tells a mismatched one apart (an
        # asymmetric 8-bit range loaded into a symmetric 4-bit quantizer would saturate everything)
        z = state_dict.get(prefix + "zero")
        if isinstance(z, torch.Tensor) and z.numel():
            if (self.symmetric and bool((z != 0).any())) or bool((z < self.qmin).any()) or bool((z > self.qmax).any()):
                raise ValueError(f"ActQuantizer at {prefix!r}: the checkpoint's zero points (in [{float(z.min())}, "
                                 f"{float(z.max())}]) do not fit this quantizer's grid [{self.qmin}, {self.qmax}] "
                                 f"(num_bits={self.num_bits}, symmetric={self.symmetric}): a different configuration?")
        if prefix + "_extra_state" in state_dict:
            self.set_extra_state(state_dict[prefix + "_extra_state"])  # only checks; the base class calls it again
        # an uncalibrated quantizer (scale / zero None, which load_state_dict would skip) takes a
        # calibrated checkpoint's range
        for name in ("scale", "zero"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(t))
        missing_keys = args[2] if len(args) > 2 else kwargs.get("missing_keys")
        had_extra = prefix + "_extra_state" in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not had_extra and missing_keys is not None and prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")  # checkpoints from before the grid was saved

    def get_extra_state(self):
        # the grid the saved scale / zero belong to (the zero-point check above cannot tell an
        # unsigned range from a signed one: both have zero 0)
        # and the axis (the load check above sees only that a range is 1-D, not along which axis it was
        # taken, and a dynamic quantizer has no range to tell per-token from per-tensor)
        return {"num_bits": self.num_bits, "symmetric": self.symmetric, "unsigned": self.unsigned,
                "narrow_range": self.narrow_range, "dynamic": self.dynamic, "axis": self.axis}

    def set_extra_state(self, state):
        want = self.get_extra_state()
        for key in ("dynamic", "axis"):  # saved before these were recorded
            if isinstance(state, dict) and key not in state:
                want.pop(key)
        if state != want:
            raise ValueError(f"ActQuantizer: the checkpoint's grid and mode (with the axis) {state} differ from this "
                             f"quantizer's {want}")

    def _apply(self, fn, recurse=True):
        # .half() / .bfloat16() keep the calibrated range in its dtype (a tiny scale would underflow
        # to 0; fake_quant computes in float32 anyway)
        return apply_keeping_dtype(self, ("scale", "zero"), fn, recurse)

    def extra_repr(self):
        return f"num_bits={self.num_bits}, method={self.method!r}, axis={self.axis}, symmetric={self.symmetric}, dynamic={self.dynamic}"
