"""Public functional API of quantkern.

Every function validates its arguments (errors name the argument), picks an
implementation (``backend``) and calls one ``torch.ops.quantkern.*`` operator.

Backends:

* ``"native"``: the C++ kernels of quantkern._C (CPU always; CUDA when built).
* ``"triton"``: ``quantkern::<op>_triton`` (CUDA; on CPU only under
  ``TRITON_INTERPRET=1``, for testing).
* ``"auto"``: CPU tensors -> native; CUDA tensors -> triton when triton is
  installed, else native. The native CUDA kernels have run on one GPU (README);
  the Triton kernels' logic is checked end to end by the interpreter.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from . import _functorch, _load

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "native", "triton")


# ---------------------------------------------------------------- utilities
def cpu_capabilities() -> list[str]:
    """CPU instruction sets the native kernels can use here, best first, e.g. ``["avx512", "avx2", "scalar"]``."""
    return list(_load.require_native("cpu_capabilities").cpu_capabilities())


def emulated_cpu_capabilities() -> list[str]:
    """Emulated instruction sets :func:`set_cpu_capability` also takes here: ``["avx512emu"]`` where the
    build had SIMDe (``simde-py``) and the CPU has AVX2, else ``[]``.

    ``"avx512emu"`` runs the AVX-512 kernels (the VNNI GEMV, the AVX512-BF16 GEMM and every 512-bit span
    kernel; not AMX) through SIMDe's portable forms of the intrinsics, so that their tests run on CPUs
    without AVX-512. It is slow and for tests only; ``"auto"`` never picks it.
    """
    return list(_load.require_native("emulated_cpu_capabilities").emulated_cpu_capabilities())


def get_cpu_capability() -> str:
    """The instruction set the CPU kernels use now."""
    return _load.require_native("get_cpu_capability").get_cpu_capability()


def set_cpu_capability(name: str) -> str:
    """Force the CPU kernels onto ``"avx512"``, ``"avx2"`` or ``"scalar"`` (``"auto"``: the best), or
    ``"avx512emu"`` (tests; see :func:`emulated_cpu_capabilities`).

    Process-wide; also settable with the environment variable
    ``QUANTKERN_CPU_CAPABILITY``. Raises ValueError if the CPU cannot run it.
    """
    return _load.require_native("set_cpu_capability").set_cpu_capability(name)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pick_backend(op: str, x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"quantkern.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if x.device.type == "cuda":
            try:
                # registers the *_triton kernels (needs triton); only importing triton, as before,
                # picked ops that were never registered: every auto call on a GPU failed
                from . import triton_kernels  # noqa: F401

                return "triton"
            except ImportError:
                return "native"
        return "native"
    if backend == "triton":
        if x.device.type != "cuda" and not _triton_interpreting():
            raise ValueError(
                f"quantkern.{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing); "
                f"the input is on {x.device}"
            )
        from . import triton_kernels  # noqa: F401  (registers the *_triton kernels)
    else:
        _load.require_native(op)
    return backend


def _check_tensor(op: str, name: str, t, dtypes=None, device=None, ref: str = "x") -> None:
    """Type / dtype / device check; ``ref`` names the tensor whose ``device`` t must share."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"quantkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"quantkern.{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"quantkern.{op}: {name} is on {t.device} but {ref} is on {device}")


def _check_qparams(op, x, scale, offset, qmin, qmax, axis, group_size, xname="weight"):
    """Validate a tensor and its quantizer parameters (the granularity follows the shapes, as in
    fake_quant_lsq); returns (offset, axis) with offset=None replaced by zeros and axis made non-negative."""
    _check_tensor(op, xname, x, _FLOATS)
    _check_tensor(op, "scale", scale, (torch.float32,), x.device, xname)
    if offset is None:
        offset = torch.zeros_like(scale)
    _check_tensor(op, "offset", offset, (torch.float32,), x.device, xname)
    if not (isinstance(qmin, int) and isinstance(qmax, int)) or isinstance(qmin, bool) or isinstance(qmax, bool):
        raise TypeError(f"quantkern.{op}: qmin and qmax must be int, got {type(qmin).__name__}, {type(qmax).__name__}")
    if qmin >= qmax:
        raise ValueError(f"quantkern.{op}: qmin ({qmin}) must be < qmax ({qmax})")
    # The grid is applied in fp32: a bound beyond 2^24 is not an exact float and was silently moved
    # (qmin = 2^25 + 1 clamped to 2^25, outside the grid); beyond int64 the schema refused it obscurely.
    if not -(1 << 24) <= qmin < qmax <= 1 << 24:
        raise ValueError(f"quantkern.{op}: qmin and qmax must lie in [-2^24, 2^24] (fp32-exact integers), got {qmin}, {qmax}")
    if offset.shape != scale.shape:
        raise ValueError(f"quantkern.{op}: offset shape {tuple(offset.shape)} must equal scale shape {tuple(scale.shape)}")
    if group_size is not None:
        if axis is not None:
            raise ValueError(f"quantkern.{op}: pass either axis or group_size, not both")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"quantkern.{op}: group_size must be a positive int, got {group_size!r}")
        if x.dim() != 2:
            raise ValueError(f"quantkern.{op}: per-group {xname} must be 2-D [rows, K], got shape {tuple(x.shape)}")
        if x.shape[1] % group_size:
            raise ValueError(f"quantkern.{op}: group_size {group_size} does not divide K = {x.shape[1]}")
        want = (x.shape[0], x.shape[1] // group_size)
        if tuple(scale.shape) != want:
            raise ValueError(f"quantkern.{op}: per-group scale must have shape {want}, got {tuple(scale.shape)}")
    elif axis is not None:
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(f"quantkern.{op}: axis must be an int or None, got {axis!r}")
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"quantkern.{op}: axis {axis} out of range for {xname} with {x.dim()} dims")
        axis = axis % x.dim()
        if scale.dim() != 1 or scale.shape[0] != x.shape[axis]:
            raise ValueError(
                f"quantkern.{op}: per-channel scale must be 1-D of length {xname}.shape[{axis}] = {x.shape[axis]}, got {tuple(scale.shape)}"
            )
    elif scale.numel() != 1:
        raise ValueError(
            f"quantkern.{op}: scale has shape {tuple(scale.shape)}; per-tensor needs one element "
            "(pass axis= for per-channel or group_size= for per-group)"
        )
    return offset, axis


# ------------------------------------------------------------ fake_quant_lsq
def fake_quant_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    grad_scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """LSQ+ fake quantization: ``round(clamp((x - offset) / scale, qmin, qmax)) * scale + offset``.

    Differentiable in ``x``, ``scale`` and ``offset`` with the LSQ+ gradients
    (straight-through estimator; the clip region is decided on the unrounded
    value); the gradients of scale and offset are multiplied by ``grad_scale``
    (LSQ uses ``1 / sqrt(N * qmax)``, N = elements per scale). The backward is
    one fused pass.

    Args:
        x: any shape, float32 / float16 / bfloat16, any strides. All arithmetic is fp32.
        scale: float32, positive. Granularity follows its shape:
            per-tensor: one element (``axis`` and ``group_size`` None);
            per-channel: 1-D of length ``x.shape[axis]``;
            per-group: x is 2-D ``[rows, K]`` and scale is ``[rows, K // group_size]``
            (groups are contiguous along K).
        offset: float32, same shape as scale (LSQ+ beta), or None for LSQ (zero
            offset, no gradient).
        qmin, qmax: integer grid, ``-2^24 <= qmin < qmax <= 2^24`` (e.g. -8, 7 for signed
            4-bit; the grid is applied in fp32, where larger integers are not all exact).
        axis: channel axis for per-channel (negative counts from the end).
        group_size: group length along K for per-group.
        grad_scale: LSQ gradient scale g.
        backend: "auto", "native" or "triton" (see module docstring).

    Returns:
        x_hat: same shape and dtype as x, contiguous.
    """
    op = "fake_quant_lsq"
    offset, axis = _check_qparams(op, x, scale, offset, qmin, qmax, axis, group_size, xname="x")
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real) or not 0 < grad_scale < float("inf"):
        raise ValueError(f"quantkern.{op}: grad_scale must be a finite number > 0, got {grad_scale!r}")
    be = _pick_backend(op, x, backend)
    fn = torch.ops.quantkern.fake_quant_lsq_triton if be == "triton" else torch.ops.quantkern.fake_quant_lsq
    # torch.func refuses the autograd register_autograd generates: inside a transform, a Function that it takes
    kind = _functorch.transform_kind()
    if kind is not None:
        return _functorch.apply(kind, _functorch.FakeQuantLSQFn, x, scale, offset, qmin, qmax, axis, group_size,
                                float(grad_scale), be)
    _functorch.refuse_dual(op, x, scale, offset)
    return fn(x, scale, offset, qmin, qmax, axis, group_size, float(grad_scale))


# ------------------------------------------------- oscillation tracking / dampening
def oscillation_init_state(
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh oscillation state for ``weight``: ``(meta, ema)``, int32 and float32, shaped like weight.

    ``meta`` packs, per weight, the previous integer (int8), the direction of its last
    change, a frozen bit, an "EMA started" bit and the 20-bit fixed-point frequency EMA
    (layout: csrc/shared/oscillation.h; decode with
    :func:`quantkern.reference.oscillation.decode_state`); ``ema`` is the fp32 EMA of
    the integer. 8 bytes per weight. The previous integer starts at the current one.
    Needs ``-128 <= qmin < qmax <= 127``.
    """
    from .reference import oscillation as ref

    op = "oscillation_init_state"
    offset, axis = _check_qparams(op, weight, scale, offset, qmin, qmax, axis, group_size)
    if not -128 <= qmin < qmax <= 127:
        raise ValueError(f"quantkern.{op}: the state keeps the integer in int8: need -128 <= qmin < qmax <= 127, got {qmin}, {qmax}")
    with torch.no_grad():
        # One-time host check (as the CPU kernels do): a bad scale would silently encode garbage
        # integers (NaN -> 0, negative -> mirrored) as every weight's starting point.
        if not bool(((scale > 0) & torch.isfinite(scale)).all()):
            raise ValueError(f"quantkern.{op}: scale must be positive and finite")
        if not bool(torch.isfinite(offset).all()):
            raise ValueError(f"quantkern.{op}: offset must be finite")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"quantkern.{op}: weight must be finite (a NaN / inf would start as a garbage integer)")
        # contiguous state whatever the weight's strides (oscillation_update needs it)
        meta, ema = ref.init_state(weight.detach(), scale.detach(), offset.detach(), qmin, qmax, axis, group_size)
        return meta.contiguous(), ema.contiguous()


def check_osc_state(op: str, weight, meta, ema, qmin: int, qmax: int) -> None:
    """The oscillation state's checks (also run by the raw Triton op): meta int32 / ema fp32 of
    weight's shape and device, all contiguous (updated in place), an int8 grid."""
    _check_tensor(op, "meta", meta, (torch.int32,), weight.device, "weight")
    _check_tensor(op, "ema", ema, (torch.float32,), weight.device, "weight")
    for name, t in (("meta", meta), ("ema", ema)):
        if t.shape != weight.shape:
            raise ValueError(f"quantkern.{op}: {name} shape {tuple(t.shape)} must equal weight shape {tuple(weight.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"quantkern.{op}: {name} must be contiguous")
    if not weight.is_contiguous():
        raise ValueError(f"quantkern.{op}: weight must be contiguous (it is updated in place; for a channels_last "
                         f"weight update a .contiguous() copy and copy it back, as OscillationTracker does)")
    if not -128 <= qmin < qmax <= 127:
        raise ValueError(f"quantkern.{op}: the state keeps the integer in int8: need -128 <= qmin < qmax <= 127, got {qmin}, {qmax}")


def oscillation_update(
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    meta: torch.Tensor,
    ema: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    momentum: float = 0.01,
    freeze_threshold: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused, in-place step of oscillation tracking and freezing (Nagel et al. 2022).

    Call once per training step, after ``optimizer.step()``, with the quantizer's current
    scale/offset (the values the next forward uses). In one pass over the weights:
    computes ``q = round(clamp((w - offset) / scale, qmin, qmax))``, detects an
    oscillation (q moved opposite to its last move), updates the frequency EMA
    ``f <- m * osc + (1 - m) * f`` and, when ``freeze_threshold > 0``, the integer EMA
    and freezing: a weight with ``f > freeze_threshold`` is frozen at ``round(q_ema)``
    for good. Every frozen weight is (re)written as ``q_frozen * scale + offset``, so
    the next forward quantizes it to q_frozen whatever the scale did.

    Args:
        weight: latent weight, float32 / float16 / bfloat16, contiguous; updated in place
            (pass ``param.data`` or call under ``torch.no_grad()``).
        scale, offset: the quantizer's (positive) scale and offset (None = 0), float32;
            per-tensor, per-channel (``axis``) or per-group (``group_size``; weight 2-D).
        meta, ema: the state from :func:`oscillation_init_state`, updated in place.
        qmin, qmax: integer grid, ``-128 <= qmin < qmax <= 127``.
        momentum: EMA momentum m in (0, 1] (official class default 0.01, paper runs 0.001).
        freeze_threshold: in [0, 1]; freeze where f exceeds it; 0 turns freezing (and the
            integer EMA) off, as in the official code.
        backend: "auto", "native" or "triton".

    Returns:
        int64 tensor ``[2]`` on weight's device: (oscillations this step, frozen weights
        after this step). No host synchronisation.
    """
    op = "oscillation_update"
    offset, axis = _check_qparams(op, weight, scale, offset, qmin, qmax, axis, group_size)
    check_osc_state(op, weight, meta, ema, qmin, qmax)
    # bools are ints: momentum=True ran as 1; a threshold outside [0, 1] silently never froze
    # (negative: off, > 1: f never exceeds it), as OscillationTracker already refuses
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 < momentum <= 1:
        raise ValueError(f"quantkern.{op}: momentum must be in (0, 1], got {momentum!r}")
    if isinstance(freeze_threshold, bool) or not isinstance(freeze_threshold, numbers.Real) or not 0 <= freeze_threshold <= 1:
        raise ValueError(f"quantkern.{op}: freeze_threshold must be a number in [0, 1] (a frequency; 0: no freezing), "
                         f"got {freeze_threshold!r}")
    be = _pick_backend(op, weight, backend)
    fn = torch.ops.quantkern.oscillation_update_triton if be == "triton" else torch.ops.quantkern.oscillation_update
    with torch.no_grad():
        return fn(weight, scale.detach(), offset.detach(), meta, ema, qmin, qmax, axis, group_size, float(momentum), float(freeze_threshold))


def dampening_loss(
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    norm: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Oscillation dampening loss (Nagel et al. 2022, eq. 6), fused forward and backward.

    ``norm * sum((q*s + beta).detach() - clamp(w, s*qmin + beta, s*qmax + beta))^2`` with
    ``q = round(clamp((w - beta) / s, qmin, qmax))``. Differentiable in ``weight`` only
    (``2 * norm * d`` inside the clamp range, 0 outside); scale and offset get no
    gradient, as in the paper. The official aggregation ("kernel_mean",
    ``loss.sum(0).mean()``) is ``norm = weight.shape[0] / weight.numel()``.

    Args: as :func:`fake_quant_lsq` (``weight`` any float dtype and strides).
    Returns: 0-d float32 tensor.
    """
    op = "dampening_loss"
    offset, axis = _check_qparams(op, weight, scale, offset, qmin, qmax, axis, group_size)
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not 0 <= norm < math.inf:
        raise ValueError(f"quantkern.{op}: norm must be a finite number >= 0, got {norm!r}")
    be = _pick_backend(op, weight, backend)
    args = (weight, scale.detach(), offset.detach(), qmin, qmax, axis, group_size, float(norm))
    kind = _functorch.transform_kind()
    if kind is not None:  # (as in fake_quant_lsq)
        return _functorch.apply(kind, _functorch.DampeningLossFn, *args, be)
    _functorch.refuse_dual(op, weight)
    fn = torch.ops.quantkern.dampening_loss_triton if be == "triton" else torch.ops.quantkern.dampening_loss
    return fn(*args)
# ------------------------------------------------------------- hqq_quantize
HQQ_BITS = (1, 2, 3, 4, 8)
HQQ_EARLY_STOP = ("global", "group", "none")


def _hqq_check_args(op, W, bits, group_size, axis, lp_norm, beta, kappa, iters, early_stop) -> None:
    """Argument checks of hqq_quantize (also run by the Triton kernel, which torch.ops callers reach directly)."""
    _check_tensor(op, "W", W, _FLOATS)
    if W.dim() != 2:
        raise ValueError(f"quantkern.{op}: W must be 2-D [N, K], got shape {tuple(W.shape)}")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in HQQ_BITS:
        raise ValueError(f"quantkern.{op}: bits must be one of {HQQ_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"quantkern.{op}: group_size must be a positive int, got {group_size!r}")
    if W.shape[1] % group_size:
        raise ValueError(f"quantkern.{op}: group_size {group_size} does not divide K = W.shape[1] = {W.shape[1]}")
    # bools and floats compare equal to 0 / 1: True, 1.0 or "0.7" passed as axis / lp_norm before
    if not isinstance(axis, int) or isinstance(axis, bool) or axis not in (0, 1):
        raise ValueError(f"quantkern.{op}: axis must be 0 or 1, got {axis!r}")
    real = (int, float, torch.SymFloat)
    if isinstance(lp_norm, bool) or not isinstance(lp_norm, real) or not 0.0 < lp_norm <= 1.0:
        raise ValueError(f"quantkern.{op}: lp_norm must be a number in (0, 1], got {lp_norm!r}")
    for name, v in (("beta", beta), ("kappa", kappa)):
        # (v - v) == 0 is "finite" without math.isfinite, which dynamo cannot trace on a symbolic float
        if isinstance(v, bool) or not (isinstance(v, real) and (v - v) == 0 and v > 0):
            raise ValueError(f"quantkern.{op}: {name} must be a positive finite number, got {v!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or not 0 <= iters <= 100000:
        raise ValueError(f"quantkern.{op}: iters must be an int in [0, 100000], got {iters!r}")
    if early_stop not in HQQ_EARLY_STOP:
        raise ValueError(f"quantkern.{op}: early_stop must be one of {HQQ_EARLY_STOP}, got {early_stop!r}")


def hqq_quantize(
    W: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    axis: int = 1,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: str = "global",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ (half-quadratic quantization) of a weight matrix, one fused solver pass.

    Min-max init, then up to ``iters`` proximal iterations on the zero point
    exactly as the official hqq solver (see quantkern/reference/hqq.py):
    ``q = clamp(round(W*s + z))``, ``We = shrink_lp(W - (q - z)/s, beta_i)``,
    ``z = mean_group(q - (W - We)*s)``, ``beta_i = beta * kappa^i``.

    Args:
        W: ``[N, K]`` float32 / float16 / bfloat16, any strides; computed in fp32.
            Must be finite, with ``max|W| * max(group_size, 2) <= 2^127`` (1.7e38): beyond,
            the solver's fp32 intermediates overflow (the group range max - min, a
            constant group's zero sum) and scale / zero come out inf or NaN; scale such W
            down by a power of two first.
        bits: 1, 2, 3, 4 or 8.
        group_size: g, must divide K.
        axis: 1 (groups contiguous along K: what fast kernels want) or 0 (hqq's
            strided groups: group j = ``W.flatten()[j::N*K//g]``).
        lp_norm: p of the lp shrink, in (0, 1].
        beta, kappa: shrink strength and its per-iteration growth
            (``kappa=1.0`` reproduces hqq 0.2.8, which ignores kappa).
        iters: at most this many iterations; 0 = round to nearest (min-max).
        early_stop: "global" (the official rule: stop at the first iteration
            whose mean |W - Wr| over the whole tensor does not improve; exact),
            "group" (each group stops on its own error and keeps its best zero;
            fully fused), or "none" (always ``iters`` iterations). "global" runs
            every group through all ``iters`` iterations in one fused pass, keeps
            each group's zero after every iteration (scratch of
            ``4 * (iters + 1) * N * K / g`` bytes) and per-iteration error sums,
            applies the official rule, then writes q in a second, cheap pass.
        backend: "auto", "native" or "triton" (see module docstring).

    Returns:
        ``(q, scale, zero)``: q ``uint8 [N, K]`` in ``[0, 2^bits - 1]``; scale and
        zero ``float32 [N, K // g]`` (``scale.flatten()[j]`` belongs to group j),
        with ``W ~= (q - zero) * scale``.
    """
    op = "hqq_quantize"
    _hqq_check_args(op, W, bits, group_size, axis, lp_norm, beta, kappa, iters, early_stop)
    be = _pick_backend(op, W, backend)
    fn = torch.ops.quantkern.hqq_quantize_triton if be == "triton" else torch.ops.quantkern.hqq_quantize
    return fn(W, bits, group_size, int(axis), float(lp_norm), float(beta), float(kappa), iters, early_stop)
# ------------------------------------------------------------- calibrators
CALIB_SEARCH_METHODS = ("entropy", "mse")


# the most bins a calibration histogram has, and the bound of calib_search's stride / start_bin
# (csrc/shared/calibrate.h kCalibMaxBins)
CALIB_MAX_BINS = 1 << 24


def _calib_hist_check(op, x, pos, neg, R, n) -> None:
    """Argument checks of calib_histogram (also run by the Triton kernel)."""
    _check_tensor(op, "x", x, _FLOATS)
    if x.dim() != 2:
        raise ValueError(f"quantkern.{op}: x must be 2-D [C, M], got shape {tuple(x.shape)}")
    C = x.shape[0]
    for name, t in (("pos", pos), ("neg", neg)):
        _check_tensor(op, name, t, (torch.int64,), x.device)
        if t.dim() != 2 or t.shape[0] != C or not t.is_contiguous():
            raise ValueError(f"quantkern.{op}: {name} must be a contiguous int64 [C={C}, B] tensor, got shape {tuple(t.shape)}")
    if neg.shape != pos.shape:
        raise ValueError(f"quantkern.{op}: neg shape {tuple(neg.shape)} must equal pos shape {tuple(pos.shape)}")
    _check_tensor(op, "R", R, (torch.float32,), x.device)
    _check_tensor(op, "n", n, (torch.int64,), x.device)
    for name, t in (("R", R), ("n", n)):
        if t.shape != (C,):
            raise ValueError(f"quantkern.{op}: {name} must have shape ({C},), got {tuple(t.shape)}")
    # bins past B would land in the next channel's row (or past the buffer). Reading n is a host sync
    # that torch.compile cannot trace: compiled, the kernels' own checks (C++ / the Triton launcher) do it
    if C > 0 and not torch.compiler.is_compiling():
        lo, hi = int(n.min()), int(n.max())
        if lo < 0 or hi > min(pos.shape[1], CALIB_MAX_BINS):
            raise ValueError(f"quantkern.{op}: n must be in [0, min(B = pos.shape[1] = {pos.shape[1]}, 2^24)], "
                             f"got values in [{lo}, {hi}]")
        # a NaN range, or a range with no bins, would drop the row's values without a word (eager only, as above)
        if not bool(torch.isfinite(R).all()):
            raise ValueError(f"quantkern.{op}: R must be finite (rows with R <= 0 are skipped)")
        if bool(((R > 0) & (n < 1)).any()):
            raise ValueError(f"quantkern.{op}: n must be >= 1 where R > 0")
        # one buffer passed as both halves summed the signs' counts into it without a word
        # (by the bytes they span: two disjoint views of one buffer, pos = buf[0] and neg = buf[1], are fine)
        if pos.numel() and neg.numel() and _spans_overlap(pos, neg):
            raise ValueError(f"quantkern.{op}: pos and neg must be separate tensors (they share memory)")


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges spanned by two non-empty tensors intersect (conservative for strided views)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        n = sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + n * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _calib_search_check(op, pos, neg, width, n, method, num_bits, unsigned, symmetric, stride, start_bin) -> None:
    """Argument checks of calib_search (also run by the Triton kernel)."""
    _check_tensor(op, "pos", pos, (torch.int64,))
    if pos.dim() != 2 or pos.shape[1] < 2:
        raise ValueError(f"quantkern.{op}: pos must be int64 [C, B] with B >= 2, got shape {tuple(pos.shape)}")
    C = pos.shape[0]
    _check_tensor(op, "neg", neg, (torch.int64,), pos.device, "pos")
    if neg.shape != pos.shape:
        raise ValueError(f"quantkern.{op}: neg shape {tuple(neg.shape)} must equal pos shape {tuple(pos.shape)}")
    _check_tensor(op, "width", width, (torch.float64,), pos.device, "pos")
    _check_tensor(op, "n", n, (torch.int64,), pos.device, "pos")
    for name, t in (("width", width), ("n", n)):
        if t.shape != (C,):
            raise ValueError(f"quantkern.{op}: {name} must have shape ({C},), got {tuple(t.shape)}")
    if method not in CALIB_SEARCH_METHODS:
        raise ValueError(f"quantkern.{op}: method must be one of {CALIB_SEARCH_METHODS}, got {method!r}")
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
        raise ValueError(f"quantkern.{op}: num_bits must be an int in [1, 16], got {num_bits!r}")
    if symmetric and not unsigned and num_bits < 2:
        raise ValueError(f"quantkern.{op}: symmetric signed search needs num_bits >= 2")
    for name, v in (("stride", stride), ("start_bin", start_bin)):
        # (<= 2^24, the most bins a histogram has: the kernels' work buffers grow with stride)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= CALIB_MAX_BINS:
            raise ValueError(f"quantkern.{op}: {name} must be an int in [1, 2^24], got {v!r}")
    # values: host syncs, so eager calls of ops.calib_search only (compiled, or through
    # torch.ops.quantkern directly, only the kernels' shape and n-range checks run)
    if C > 0 and not torch.compiler.is_compiling():
        # (beyond ~1e150 every candidate's squared error overflows float64 and the choice is arbitrary;
        # a histogram of fp32 data has width < 4e38)
        if not bool((torch.isfinite(width) & (width >= 0) & (width <= 1e150)).all()):
            raise ValueError(f"quantkern.{op}: width must be finite, >= 0 (0: no data) and <= 1e150")
        if bool(((width > 0) & (n < 2)).any()):
            raise ValueError(f"quantkern.{op}: n must be >= 2 where width > 0")
        if bool((pos < 0).any()) or bool((neg < 0).any()):
            raise ValueError(f"quantkern.{op}: pos and neg hold counts, which must be >= 0")


def calib_histogram(x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, R: torch.Tensor, n: torch.Tensor, *,
                    backend: str = "auto") -> None:
    """Adds the values of ``x`` to per-channel signed histograms, in place.

    Args:
        x: ``[C, M]`` float32 / float16 / bfloat16 (any strides; binned in fp32),
            channel c = row c. Must be finite (NaN / inf raise; the check runs while binning,
            so ``pos`` / ``neg`` may already hold part of x then: check first, as
            ``HistogramCalibrator.collect`` does, if the histogram must survive the error).
        pos, neg: contiguous ``int64 [C, B]``, updated in place: value v of row c goes
            to bin ``k = min(trunc(|v| * n[c] / R[c]), n[c] - 1)`` (fp32 arithmetic)
            of ``neg`` if ``v < 0``, else of ``pos`` (exact zeros: ``pos[c, 0]``).
        R: ``float32 [C]``, the histogram range of each channel; rows with
            ``R[c] <= 0`` are skipped (the caller counts them).
        n: ``int64 [C]``, bins in use per channel, ``n[c] <= min(B, 2^24)``.
        backend: "auto", "native" or "triton".
    """
    op = "calib_histogram"
    _calib_hist_check(op, x, pos, neg, R, n)
    be = _pick_backend(op, x, backend)
    fn = torch.ops.quantkern.calib_histogram_triton if be == "triton" else torch.ops.quantkern.calib_histogram
    fn(x, pos, neg, R, n)


def calib_search(pos: torch.Tensor, neg: torch.Tensor, width: torch.Tensor, n: torch.Tensor, method: str,
                 num_bits: int = 8, *, unsigned: bool = False, symmetric: bool = True, stride: int = 1,
                 start_bin: int = 128, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (KL) or histogram-MSE range of every channel, all candidates at once.

    The rules are those of :mod:`quantkern.reference.calibrate` (symmetric: NVIDIA's
    ``amax_entropy`` / ``amax_mse`` on the |x| histogram ``pos + neg``; asymmetric:
    ``range_entropy_asym`` / ``range_mse_asym`` on the signed histogram).

    Args:
        pos, neg: ``int64 [C, B]`` signed histograms as written by :func:`calib_histogram`.
        width: ``float64 [C]`` bin width (edge k = ``k * width``); 0 = no data, range (0, 0).
        n: ``int64 [C]`` bins in use, ``2 <= n[c] <= B`` where ``width[c] > 0``.
        method: "entropy" or "mse".
        num_bits: 1..16; unsigned: symmetric grid ``[0, 2^b - 1]`` (2^b levels);
        symmetric: False for the asymmetric rules; stride, start_bin: the candidate grid, ints in
            ``[1, 2^24]``; width in ``[0, 1e150]``.
        backend: "auto", "native" or "triton".

    Returns:
        ``(amin, amax)``, float64 ``[C]``; symmetric: ``amin = -amax`` (0 if unsigned).
    """
    op = "calib_search"
    _calib_search_check(op, pos, neg, width, n, method, num_bits, unsigned, symmetric, stride, start_bin)
    be = _pick_backend(op, pos, backend)
    fn = torch.ops.quantkern.calib_search_triton if be == "triton" else torch.ops.quantkern.calib_search
    return fn(pos, neg, width, n, method, num_bits, bool(unsigned), bool(symmetric), stride, start_bin)


# ------------------------------------------------------------ packed weights
_PACK_BITS = (2, 3, 4)


def _check_bits(op: str, bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in _PACK_BITS:
        raise ValueError(f"quantkern.{op}: bits must be one of {_PACK_BITS}, got {bits!r}")


def _check_group(op: str, in_features: int, group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"quantkern.{op}: group_size must be a positive int, got {group_size!r}")
    if group_size != in_features and (group_size % 32 or in_features % group_size):
        fit = [g for g in (32, 64, 128, 256) if in_features % g == 0]  # (the examples must fit this K)
        raise ValueError(
            f"quantkern.{op}: group_size {group_size} must be a multiple of 32 that divides "
            f"in_features={in_features}{f' (e.g. {fit})' if fit else ''}, or equal in_features (one group per row)"
        )


def check_packed(op: str, qweight, scales, zeros, bits: int, group_size: int, in_features: int) -> None:
    """Validate the tensors of a packed weight; raise TypeError/ValueError naming the argument."""
    _check_bits(op, bits)
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features <= 0:  # True is not 1 feature
        raise ValueError(f"quantkern.{op}: in_features must be a positive int, got {in_features!r}")
    _check_group(op, in_features, group_size)
    _check_tensor(op, "qweight", qweight, (torch.int32,))
    words = (in_features + 31) // 32 * bits
    if qweight.dim() != 2 or qweight.shape[1] != words:
        raise ValueError(
            f"quantkern.{op}: qweight must have shape [N, {words}] for in_features={in_features}, bits={bits}; "
            f"got {tuple(qweight.shape)}"
        )
    _check_tensor(op, "scales", scales, _FLOATS, qweight.device, "qweight")
    _check_tensor(op, "zeros", zeros, _FLOATS, qweight.device, "qweight")
    want = (qweight.shape[0], in_features // group_size)
    if tuple(scales.shape) != want:
        raise ValueError(
            f"quantkern.{op}: scales must have shape {want} (out_features, in_features // group_size), got {tuple(scales.shape)}"
        )
    if tuple(zeros.shape) != want:
        raise ValueError(f"quantkern.{op}: zeros must have shape {want} like scales, got {tuple(zeros.shape)}")
    if zeros.dtype != scales.dtype:
        raise TypeError(f"quantkern.{op}: zeros dtype {zeros.dtype} must equal scales dtype {scales.dtype}")


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``q [N, K]`` (values in ``[0, 2**bits)``) into the canonical format.

    Returns ``qweight``: int32 ``[N, ceil(K / 32) * bits]`` (layout: quantkern/reference/packing.py).
    CPU kernel; tensors on another device are packed on the CPU and moved back.
    """
    op = "pack"
    _check_bits(op, bits)
    _check_tensor(op, "q", q)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"quantkern.{op}: q must have an integer dtype, got {q.dtype}")
    if q.dim() != 2 or q.shape[1] == 0:
        raise ValueError(f"quantkern.{op}: q must be 2-D [N, K] with K > 0, got shape {tuple(q.shape)}")
    if q.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few CPU ops take these: widen (out of range stays so)
        q = q.to(torch.int64)
    _load.require_native(op)
    if q.device.type != "cpu":
        return torch.ops.quantkern.pack(q.cpu(), bits).to(q.device)
    return torch.ops.quantkern.pack(q, bits)


def unpack(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``qweight`` -> uint8 codes ``[N, in_features]``."""
    op = "unpack"
    _check_bits(op, bits)
    _check_tensor(op, "qweight", qweight, (torch.int32,))
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features <= 0:  # True is not 1 feature
        raise ValueError(f"quantkern.{op}: in_features must be a positive int, got {in_features!r}")
    words = (in_features + 31) // 32 * bits
    if qweight.dim() != 2 or qweight.shape[1] != words:
        raise ValueError(f"quantkern.{op}: qweight must have shape [N, {words}], got {tuple(qweight.shape)}")
    _load.require_native(op)
    if qweight.device.type != "cpu":
        return torch.ops.quantkern.unpack(qweight.cpu(), bits, in_features).to(qweight.device)
    return torch.ops.quantkern.unpack(qweight, bits, in_features)


def _weight_parts(op: str, weight):
    from .packed import PackedWeight

    if not isinstance(weight, PackedWeight):
        raise TypeError(f"quantkern.{op}: weight must be a quantkern.PackedWeight, got {type(weight).__name__}")
    return weight


def dequantize(weight, dtype: torch.dtype | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Dequantize a :class:`quantkern.PackedWeight` to ``[out_features, in_features]``.

    ``w = (q - zeros) * scales`` computed in fp32, returned in ``dtype`` (default:
    the metadata dtype). Materialises the whole weight: meant for checks and export.
    """
    op = "dequantize"
    w = _weight_parts(op, weight)
    if dtype is not None and dtype not in _FLOATS:
        raise TypeError(f"quantkern.{op}: dtype must be one of {_FLOATS}, got {dtype}")
    be = _pick_backend(op, w.qweight, backend)
    # scales / zeros get no derivative: a forward-mode tangent (eager dual tensors) was dropped in silence, and
    # under torch.func the registered autograd is refused with torch's generic error (the Function raises ours)
    fwd = torch.autograd.forward_ad
    if fwd._current_level >= 0 and any(fwd.unpack_dual(t).tangent is not None for t in (w.scales, w.zeros)):
        raise _functorch.metadata_grad_error(op)
    kind = _functorch.transform_kind()
    if kind is not None:
        return _functorch.apply(kind, _functorch.DequantizeFn, w.qweight, w.scales, w.zeros, w.bits, w.group_size,
                                w.in_features, dtype, be)
    fn = torch.ops.quantkern.dequantize_triton if be == "triton" else torch.ops.quantkern.dequantize
    return fn(w.qweight, w.scales, w.zeros, w.bits, w.group_size, w.in_features, dtype)


def packed_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``y = x @ W.T + bias`` with W a :class:`quantkern.PackedWeight` (2, 3 or 4 bits).

    Args:
        x: ``[..., in_features]``, float32 / float16 / bfloat16, any strides.
        weight: PackedWeight ``[out_features, in_features]``, on x's device.
        bias: ``[out_features]`` float32 / float16 / bfloat16 (any of them, whatever x's) or None.
        backend: "auto", "native" or "triton" (module docstring).

    Returns:
        ``[..., out_features]`` in x's dtype. Accumulation is fp32; the whole
        dequantized weight is never materialised. Differentiable w.r.t. x (and
        bias); the packed weight gets no gradient: scales / zeros that require grad
        (with grad mode on), carry a tangent or are differentiated by a torch.func
        transform raise RuntimeError. No autocast: the output dtype follows x.

    CPU paths (chosen per call): on AVX-512 CPUs small M uses a GEMV (VNNI on bf16/fp16
    x, up to 4 rows with AMX and 12 without; exact fp32 table-lookup dequantization
    on fp32 x); larger M dequantizes panels of rows into a cache-resident buffer
    and uses AMX, or AVX512-BF16 ``vdpbf16ps`` on CPUs without AMX (bf16 x; the
    weight rounded to bf16, denormal inputs read as 0, as bf16 ``F.linear``), or
    fp32 FMA / MKL sgemm on exactly dequantized tiles (fp32/fp16 x). On AVX2 CPUs
    bf16/fp16 x takes an int16 ``vpmaddwd`` GEMV up to 11 rows and an int16 GEMM
    from 12 (groups of at most 1024), fp32 x the exact fp32 GEMV up to 16 rows and
    MKL tiles above.
    ``quantkern.set_cpu_capability`` and ``quantkern.ops.set_cpu_feature`` force
    the fallbacks.
    """
    w = _weight_parts("packed_linear", weight)
    return _packed_linear(x, w.qweight, w.scales, w.zeros, w.bits, w.group_size, w.in_features, bias, backend)


def _packed_linear(x, qweight, scales, zeros, bits, group_size, in_features, bias, backend):
    """packed_linear on already-validated weight tensors (PackedWeight / PackedLinear): checks x and bias only."""
    op = "packed_linear"
    _check_tensor(op, "x", x, _FLOATS)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"quantkern.{op}: x must have shape [..., {in_features}] (in_features), got {tuple(x.shape)}")
    if qweight.device != x.device:
        raise ValueError(f"quantkern.{op}: weight is on {qweight.device} but x is on {x.device}")
    if bias is not None:
        _check_tensor(op, "bias", bias, _FLOATS, x.device)
        if bias.dim() != 1 or bias.shape[0] != qweight.shape[0]:
            raise ValueError(f"quantkern.{op}: bias must have shape [{qweight.shape[0]}], got {tuple(bias.shape)}")
    be = _pick_backend(op, x, backend)
    # the packed weight is frozen: trainable scales / zeros got a silent None (zero under torch.func) gradient
    # (two attribute reads on the hot path; a tangent or a transform's differentiation raises in _functorch)
    if (scales.requires_grad or zeros.requires_grad) and torch.is_grad_enabled():
        raise _functorch.metadata_grad_error(op)
    # torch.func refuses the ops' own autograd (C++ / Python); dynamo traces the transforms too
    kind = _functorch.transform_kind()
    if kind is not None:
        if be == "triton" and not (backend == "auto" and _functorch.native_kernel("packed_linear", x.device)):
            raise NotImplementedError(
                f"quantkern.{op}: torch.func transforms (vmap, grad, jvp, ...) need the native kernels; the "
                "Triton op has no transform support (its jvp would be zero): pass backend='native' "
                f"({'build the CUDA kernels' if x.device.type == 'cuda' else 'the CPU kernels'})")
        return _functorch.apply(kind, _functorch.PackedLinearFn, x, qweight, scales, zeros, bits, group_size,
                                in_features, bias)
    fn = torch.ops.quantkern.packed_linear_triton if be == "triton" else torch.ops.quantkern.packed_linear
    return fn(x, qweight, scales, zeros, bits, group_size, in_features, bias)


def cpu_features() -> dict:
    """Optional CPU features of the AVX-512 kernels: ``{name: (detected, enabled)}`` (vnni, vbmi, bf16, amx)."""
    return dict(_load.require_native("cpu_features").cpu_features())


def set_cpu_feature(name: str, enabled: bool) -> None:
    """Enable or disable an optional CPU feature ("vnni", "vbmi", "bf16", "amx") process-wide.

    Disabling forces the fallback kernels (for tests and benchmarks); also settable
    with ``QUANTKERN_DISABLE_CPU_FEATURES=amx,vnni``.
    """
    _load.require_native("set_cpu_feature").set_cpu_feature(name, bool(enabled))
