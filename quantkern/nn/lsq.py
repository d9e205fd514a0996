"""LSQ / LSQ+ learnable fake quantizer (Esser et al. 2020; Bhalgat et al. 2020).

``LSQQuantizer`` owns a learnable step size ``scale`` (and, with
``learn_offset=True``, a learnable LSQ+ offset ``offset``) and applies
:func:`quantkern.ops.fake_quant_lsq`::

    x_hat = round(clamp((x - offset) / scale, qmin, qmax)) * scale + offset

Parameters are initialised from data on the first forward (or by an explicit
``initialize(x)``); see DESIGN.md section 3 for the formulas.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter, is_lazy

from .. import ops
from .._warn import user_stacklevel as _user_stacklevel


def _read_only(name: str) -> property:
    """A property over ``self._<name>`` whose assignment raises (set once, in __init__)."""
    def get(self):
        return getattr(self, "_" + name)

    def refuse(self, _):
        raise AttributeError(f"{type(self).__name__}.{name} is fixed at construction (it sets the grid qmin, qmax); "
                             "build a new quantizer")

    return property(get, refuse, doc=f"{name} (read-only)")


GRANULARITIES = ("tensor", "channel", "group")
INITS = ("lsq", "lsq+", "mse", "minmax")


def _is_int(v) -> bool:
    # numbers.Integral: NumPy's integers too (np.int64(4) was refused as "not an int")
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)``: signed ``-2^(b-1) .. 2^(b-1)-1``, unsigned ``0 .. 2^b-1``."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


class LSQQuantizer(nn.Module):
    """Learnable LSQ / LSQ+ fake quantizer.

    Args:
        bits: bit width, int in 2..8.
        signed: integer grid ``[-2^(b-1), 2^(b-1)-1]`` if True, ``[0, 2^b-1]`` if False.
        granularity: one scale for the whole tensor (``"tensor"``), one per slice along
            ``axis`` (``"channel"``), or one per ``group_size`` consecutive elements of
            each row of ``x`` viewed as 2-D ``[x.shape[0], numel // x.shape[0]]``
            (``"group"``; meant for weights, e.g. ``[out, in]`` or ``[out, in, kh, kw]``).
        learn_offset: learn the LSQ+ offset beta (``offset`` parameter). If False,
            ``offset`` is None and the grid is anchored at 0 (plain LSQ).
        init: how the first batch initialises scale/offset:

            * ``"lsq"``: ``s = 2 mean(|x|) / sqrt(qmax)``, offset 0 (Esser et al.).
            * ``"lsq+"``: ``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``, offset 0
              (Bhalgat et al., for weights; sigma is the population std, correction=0);
              ``/ 2^b`` on an unsigned grid, whose positive side has twice the levels.
            * ``"mse"``: ``(s, beta) = argmin ||x_hat - x||^2`` over a grid of clipping
              ranges, evaluated on the first batch, batched over channels/groups (for
              activations). Without a learnt offset the range is ``[s*qmin, s*qmax]`` and
              only s is searched; with one, both ends are searched (asymmetric LSQ+).
            * ``"minmax"``: the smallest grid that covers ``[min(x), max(x)]``.

            Statistics are per channel / per group for those granularities. Data that is all
            zeros initialises nothing: the parameters get placeholders (scale 1, offset 0), a
            warning says so, and the next forward with a non-zero value initialises; an empty x
            initialises nothing either (the forward returns it). A row (channel / group) that is
            constant in the data and gets no scale from the init takes the median of the other
            rows' scales (1 if all are constant), its constant kept on the grid, with a warning.
        axis: channel axis for ``"channel"`` (negative counts from the end). Must be 0
            for ``"group"``; ignored for ``"tensor"``.
        group_size: group length for ``"group"`` (positive int dividing the row length).
        grad_scale: LSQ gradient scale g; None (default) uses ``1 / sqrt(N * qmax)``
            with N = ``x.numel() // scale.numel()`` of the current input (elements per scale).
        backend: passed to :func:`quantkern.ops.fake_quant_lsq`.

    Parameters (float32; lazily shaped for ``"channel"``/``"group"`` until the first
    forward, :meth:`materialize` or ``load_state_dict``):

        scale: ``[1]`` (tensor), ``[x.shape[axis]]`` (channel) or
            ``[x.shape[0], numel // x.shape[0] // group_size]`` (group).
        offset: same shape as scale, or None when ``learn_offset=False``.

    Buffer ``initialized`` (bool, 0-d) records whether the data-dependent init has
    run; it travels with ``state_dict`` so a loaded quantizer is not re-initialised.
    Call :meth:`reset` (not a write to the buffer) to have the next forward initialise again.

    Forward: ``x`` of any shape, float32 / float16 / bfloat16 -> ``x_hat`` of the same
    shape and dtype (contiguous). The scale used is ``|scale|`` clamped at ``eps``, so an
    optimiser step that drives the scale through zero cannot produce NaN/inf.

    Run one eager forward (or ``initialize``) before ``torch.compile(fullgraph=True)``:
    the init is data dependent and would graph break.
    """

    eps: float = 1e-8
    _warned_zero_init: bool = False
    _warned_flat_init: bool = False
    _state_loaded: bool = False  # (class default: quantizers pickled by an earlier checkout lack it)
    #: MSE search: coarse grid size for the kept fraction of the range, and for the raise of
    #: the lower end (only with a learnt offset and negative data); then a 9 x 5 refinement.
    mse_grid: int = 24
    mse_grid_lo: int = 4
    #: MSE search looks at about this many elements in all (strided subsample beyond that),
    #: but at least min(M, mse_min_elems_per_row) per scale.
    mse_max_elems: int = 1 << 18
    mse_min_elems_per_row: int = 256
    mse_tail: int = 32

    def __init__(
        self,
        bits: int,
        signed: bool,
        granularity: str = "tensor",
        learn_offset: bool = True,
        init: str = "mse",
        axis: int = 0,
        group_size: int | None = None,
        *,
        grad_scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not _is_int(bits) or not 2 <= bits <= 8:
            raise ValueError(f"{name}: bits must be an int in 2..8, got {bits!r}")
        if not isinstance(signed, bool):
            raise TypeError(f"{name}: signed must be a bool, got {signed!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"{name}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if init not in INITS:
            raise ValueError(f"{name}: init must be one of {INITS}, got {init!r}")
        if not isinstance(learn_offset, bool):
            raise TypeError(f"{name}: learn_offset must be a bool, got {learn_offset!r}")
        if not _is_int(axis):
            raise TypeError(f"{name}: axis must be an int, got {axis!r}")
        if granularity == "group":
            if group_size is None:
                raise ValueError(f"{name}: granularity='group' needs group_size (e.g. 32, 64, 128)")
            if not _is_int(group_size) or group_size <= 0:
                raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
            if axis != 0:
                raise ValueError(f"{name}: granularity='group' groups along the rows of x viewed as 2-D; axis must be 0, got {axis}")
        elif group_size is not None:
            raise ValueError(f"{name}: group_size is only used with granularity='group' (got granularity={granularity!r})")
        if grad_scale is not None and (isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real)
                                       or not 0 < grad_scale < math.inf):
            raise ValueError(f"{name}: grad_scale must be a finite positive number or None, got {grad_scale!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"{name}: backend must be one of {ops.BACKENDS}, got {backend!r}")

        # Python numbers from here on (NumPy scalars would reach the op schemas and torch.compile's guards)
        bits, axis = int(bits), int(axis)
        group_size = None if group_size is None else int(group_size)
        grad_scale = None if grad_scale is None else float(grad_scale)
        self._bits = bits
        self._signed = signed
        self.granularity = granularity
        self.learn_offset = learn_offset
        self.init = init
        self.axis = axis
        self.group_size = group_size
        self.grad_scale = grad_scale
        self.backend = backend
        self.qmin, self.qmax = qrange(bits, signed)

        if granularity == "tensor":
            self.scale = nn.Parameter(torch.ones(1))
            self.offset = nn.Parameter(torch.zeros(1)) if learn_offset else None
        else:
            self.scale = UninitializedParameter(dtype=torch.float32)
            self.offset = UninitializedParameter(dtype=torch.float32) if learn_offset else None
        self.register_buffer("initialized", torch.tensor(False))
        self._remember_own_scale()
        self._initialized = False  # Python mirror of the buffer: no host sync, no graph break in forward
        # scale / offset loaded from a state_dict without the layer's weight, since the last initialize():
        # a float weight loaded after them must not re-initialise over them (QuantLinear._load_from_state_dict)
        self._state_loaded = False

    # bits and signed fix the grid (qmin, qmax) and the meaning of scale / offset: read-only, since an
    # assignment (e.g. q.bits = 2 for a lower-bit stage) used to change nothing but the repr
    bits = _read_only("bits")
    signed = _read_only("signed")

    # ------------------------------------------------------------ shapes
    def param_shape(self, x_shape) -> tuple[int, ...]:
        """Shape of scale/offset for inputs of shape ``x_shape`` (validates it)."""
        x_shape = tuple(x_shape)
        name = type(self).__name__
        if self.granularity == "tensor":
            return (1,)
        if len(x_shape) == 0:
            raise ValueError(f"{name}: granularity={self.granularity!r} needs x with at least 1 dim, got a 0-d tensor")
        if self.granularity == "channel":
            if not -len(x_shape) <= self.axis < len(x_shape):
                raise ValueError(f"{name}: axis {self.axis} out of range for x of shape {x_shape}")
            return (x_shape[self.axis],)
        rows = x_shape[0]
        k = math.prod(x_shape[1:])
        if k % self.group_size:
            raise ValueError(
                f"{name}: group_size {self.group_size} does not divide the row length {k} of x of shape {x_shape} "
                f"(viewed as [{rows}, {k}])"
            )
        return (rows, k // self.group_size)

    def materialize(self, x_shape, device=None) -> None:
        """Give scale/offset their shape for inputs of shape ``x_shape`` (values 1 / 0).

        Does not mark the quantizer initialised: the data-dependent init still runs on
        the first forward. Lets an optimiser be built before the first forward.
        """
        shape = self.param_shape(x_shape)
        for pname, fill in (("scale", 1.0), ("offset", 0.0)):
            p = self._parameters.get(pname)
            if p is None:
                continue
            if is_lazy(p):
                # a first forward under torch.inference_mode must still leave a trainable
                # parameter (an inference tensor could never be used by autograd again)
                with torch.inference_mode(False), torch.no_grad():
                    p.materialize(shape, device=device)
                    p.fill_(fill)
            elif tuple(p.shape) != shape:
                raise ValueError(
                    f"{type(self).__name__}: {pname} already has shape {tuple(p.shape)}, inputs of shape "
                    f"{tuple(x_shape)} need {shape}"
                )

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as fp32 ``[n_scales, elements_per_scale]`` (rows ordered like scale.flatten())."""
        xf = x.detach().float()
        if self.granularity == "tensor":
            return xf.reshape(1, -1)
        if self.granularity == "channel":
            return xf.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        return xf.reshape(-1, self.group_size)

    # ------------------------------------------------------------ init
    # data dependent: runs eagerly (a graph break) if reached under torch.compile; with fullgraph=True dynamo
    # raises, and the reason is what its error tells the user (its own hint, "remove the disable call", misleads)
    @torch.compiler.disable(reason="LSQQuantizer's data-dependent init: run one eager forward (or initialize(x)) "
                                   "before torch.compile(fullgraph=True)")
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set scale (and offset) from the data ``x`` with ``self.init``; marks the quantizer initialised."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.numel() == 0:
            # An empty batch (an MoE expert that got no token) has nothing to initialise from: as for
            # all-zero data, the init waits for the next non-empty input. Nothing is materialised, since
            # the empty dim may be the one the parameters' shape comes from (a 0-row group weight).
            self.param_shape(x.shape)  # a bad shape still raises now
            return
        if x.is_meta:  # (else a cryptic "item() cannot be called on meta tensors" below)
            raise ValueError(f"{name}: cannot initialise from a tensor on the meta device (load the real weights "
                             "first)")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: cannot initialise from x containing NaN or inf")
        self.materialize(x.shape, device=x.device)
        if not bool(x.any()) and self._initialized:
            # zeros carry no range: an initialised quantizer keeps its (trained) parameters, where the
            # placeholders below used to stay for good (forward never re-runs the init once it has run)
            warnings.warn(f"{name}: initialize() got all-zero data, which carries no range; the quantizer keeps its "
                          "current scale / offset (reset() makes the next non-zero forward re-initialise)",
                          stacklevel=_user_stacklevel())
            return
        if not bool(x.any()):
            # All zeros (a zero-initialised layer, a padding batch, a dead input): every init gives
            # scale eps (1e-8) here, a grid that clipped every later input to ~0 until training grew
            # it (hundreds of Adam steps). Any scale quantizes zeros exactly, so the parameters get
            # placeholders (1, 0) and the init waits for the next forward with a non-zero value.
            self.scale.fill_(1.0)
            if self.offset is not None:
                self.offset.zero_()
            if not self._warned_zero_init:
                self._warned_zero_init = True
                warnings.warn(f"{name}: initialisation data is all zeros; the init waits for the next input "
                              "with a non-zero value (scale 1 until then)", stacklevel=_user_stacklevel())
            return
        shape = tuple(self.scale.shape)
        rows = self._rows(x)
        s, b = self._init_rows(rows)
        s, b = self._fix_flat_rows(rows, s, b)
        s = s.clamp_min(self.eps)
        self.scale.copy_(s.reshape(shape))
        if self.offset is not None:
            self.offset.copy_(b.reshape(shape))
        self.initialized.fill_(True)
        self._initialized = True
        self._state_loaded = False

    def reset(self) -> None:
        """Mark the quantizer uninitialised: the next forward re-runs the data-dependent init
        (scale / offset keep their shape and values until then)."""
        self.initialized.fill_(False)
        self._initialized = False

    def _fix_flat_rows(self, r, s, b) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that are constant in the init data (a dead input channel, an alpha channel == 1, a
        pruned weight row) and got no scale from the init (<= eps: a zero row under every init, any
        constant row under "minmax" / "mse" with an offset): the eps (1e-8) they were clamped to
        stayed stuck (an optimiser step moves a scale by ~lr, not by its own size), so later
        inputs quantized to ~0 or to the offset. They take the median of
        the other rows' scales (1 if every row is constant); with an offset, the median of their
        offsets (0 if none), shifted so that the row's constant value is a grid point. Other rows
        are left exactly as they are."""
        mn, mx = r.amin(1), r.amax(1)
        flat = (mn == mx) & (s <= self.eps)
        n = int(flat.sum())
        if n == 0:
            return s, b
        s = s.clamp_min(self.eps)
        fill = s[~flat].median() if n < s.numel() else torch.ones((), device=s.device)
        s = torch.where(flat, fill, s)
        if self.offset is not None:
            # the other rows' typical grid (median offset), moved by less than a step (or, for a value
            # beyond it, to its end) so that the constant is a grid point
            b_ref = b[~flat].median() if n < s.numel() else torch.zeros((), device=s.device)
            k = torch.round((mn - b_ref) / s).clamp(self.qmin, self.qmax)
            b = torch.where(flat, mn - k * s, b)
        if not self._warned_flat_init:
            self._warned_flat_init = True
            what = ("the initialisation data is constant; it gets" if self.granularity == "tensor" else
                    f"{n} of {s.numel()} {self.granularity}s are constant in the initialisation data; they get")
            warnings.warn(f"{type(self).__name__}: {what} {'the median scale of the others' if n < s.numel() else 'scale 1'} "
                          f"({float(fill):.3g}) instead of {self.eps:g}, which training would not grow back", stacklevel=_user_stacklevel())
        return s, b

    def _init_rows(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (s, beta) for rows r [C, M] fp32."""
        qmax = self.qmax
        zero = torch.zeros(r.shape[0], device=r.device)
        if self.init == "lsq":
            return 2 * r.abs().mean(1) / math.sqrt(qmax), zero
        if self.init == "lsq+":
            mu = r.mean(1)
            sd = r.std(1, correction=0)
            levels = 2 ** (self.bits - 1) if self.signed else 2**self.bits  # (the paper's grid is signed)
            return torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / levels, zero
        mn, mx = r.amin(1), r.amax(1)
        if self.init == "minmax":
            return self._range_to_params(mn, mx)
        return self._mse_search(r, mn, mx)

    def _range_to_params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest grid covering [lo, hi]: asymmetric with an offset, anchored at 0 without."""
        qmin, qmax = self.qmin, self.qmax
        if self.offset is not None:
            s = ((hi - lo) / (qmax - qmin)).clamp_min(self.eps)
            return s, lo - qmin * s
        s = hi.clamp_min(0) / qmax
        if qmin < 0:
            s = torch.maximum(s, lo.clamp_max(0) / qmin)
        return s, torch.zeros_like(s)

    def _mse_search(self, r, mn, mx) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (s, beta) minimising sum((x_hat - x)^2): coarse grid, then a finer grid around the best.

        Candidates are clipping ranges parametrised by ``ratio`` in (0, 1] (how much of the
        range to keep) and, with a learnt offset, ``a`` in [0, 0.5] (how far to raise the
        lower end; searched only if some value is negative). ratio = 1, a = 0 is the minmax
        range, so the result is never worse than "minmax" on the searched data. All rows
        (channels/groups) and chunks of candidates are evaluated at once with tensor ops.
        """
        C, M = r.shape
        keep = max(min(M, self.mse_min_elems_per_row), self.mse_max_elems // C)
        w = None
        if M > keep:
            # Deterministic strided subsample, each point standing for `step` elements, plus
            # the t largest and t smallest values of each row with weight 1: the tails decide
            # the clipping error, and a subsample alone would miss them.
            step = -(-M // keep)
            t = min(self.mse_tail, M // 2)
            r = torch.cat([r[:, ::step], r.topk(t, 1).values, r.topk(t, 1, largest=False).values], 1)
            w = torch.ones(r.shape[1], device=r.device)
            w[: r.shape[1] - 2 * t] = step
            w = w.sqrt_()
        r = r.contiguous()
        dev = r.device
        asym = self.offset is not None
        s0 = self._range_to_params(mn, mx)[0].clamp_min(self.eps)
        span = mx - mn

        def params(a, ratio):  # a, ratio [K, C] -> s, b [K, C]
            if not asym:
                return ratio * s0, torch.zeros_like(ratio)
            lo = mn + a * span
            s = (ratio * (mx - lo) / (self.qmax - self.qmin)).clamp_min(self.eps)
            return s, lo - self.qmin * s

        n = self.mse_grid
        n_lo = self.mse_grid_lo if asym and bool((mn < 0).any()) else 1
        a_max = 0.5 if n_lo > 1 else 0.0
        # coarse grid
        ratio1 = torch.linspace(1.0 / n, 1.0, n, device=dev)
        a1 = torch.linspace(0.0, a_max, n_lo, device=dev)
        A, R = torch.meshgrid(a1, ratio1, indexing="ij")
        A = A.reshape(-1, 1).expand(-1, C)
        R = R.reshape(-1, 1).expand(-1, C)
        best = self._mse_eval(r, w, A, R, *params(A, R))
        # fine grid around each row's best (ratio +- one coarse step, a +- one coarse step)
        dr = torch.linspace(-1.0, 1.0, 9, device=dev) / n
        da = torch.linspace(-1.0, 1.0, 5, device=dev) * (a_max / max(1, n_lo - 1)) if n_lo > 1 else torch.zeros(1, device=dev)
        DA, DR = torch.meshgrid(da, dr, indexing="ij")
        A = (best[1][None, :] + DA.reshape(-1, 1)).clamp(0.0, a_max)
        R = (best[2][None, :] + DR.reshape(-1, 1)).clamp(1.0 / (4 * n), 1.0)
        best = self._mse_eval(r, w, A, R, *params(A, R), best=best)
        return best[3], best[4]

    def _mse_eval(self, r, w, A, R, S, B, best=None):
        """Evaluate candidates S, B [K, C] (with their a, ratio A, R [K, C]) on rows r [C, M].

        w: sqrt of per-column weights [M], or None. Error of a candidate:
        ``s^2 * sum(w^2 (round(clamp(v)) - v)^2)`` with ``v = (x - b) / s``, computed in chunks
        of candidates that reuse two buffers. Returns the running best per row as
        ``(err, a, ratio, s, b)``, each [C].
        """
        K, C = S.shape
        M = r.shape[1]
        if best is None:
            inf = torch.full((C,), float("inf"), device=r.device)
            best = (inf, A[-1].clone(), R[-1].clone(), S[-1].clone(), B[-1].clone())
        err_best, a_best, r_best, s_best, b_best = best
        inv = (1.0 / S)[:, :, None]
        off = (-B / S)[:, :, None]
        chunk = max(1, min(K, (1 << 22) // max(1, C * M)))
        vbuf = torch.empty((chunk, C, M), device=r.device)
        qbuf = torch.empty_like(vbuf)
        cols = torch.arange(C, device=r.device)
        for k0 in range(0, K, chunk):
            k1 = min(K, k0 + chunk)
            v = torch.addcmul(off[k0:k1], r[None], inv[k0:k1], out=vbuf[: k1 - k0])
            q = torch.clamp(v, self.qmin, self.qmax, out=qbuf[: k1 - k0]).round_().sub_(v)
            if w is not None:
                q.mul_(w)
            err = torch.linalg.vecdot(q, q) * S[k0:k1].square()  # [k, C]
            e, i = err.min(0)
            better = e < err_best
            err_best = torch.where(better, e, err_best)
            a_best = torch.where(better, A[k0:k1][i, cols], a_best)
            r_best = torch.where(better, R[k0:k1][i, cols], r_best)
            s_best = torch.where(better, S[k0:k1][i, cols], s_best)
            b_best = torch.where(better, B[k0:k1][i, cols], b_best)
        return err_best, a_best, r_best, s_best, b_best

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            # (under torch.func.grad / vmap the init's in-place writes fail with torch's internal errors)
            if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"{type(self).__name__}: not initialised, and called under a torch.func transform (grad, vmap, "
                    "jacrev, ...), where the data-dependent init cannot write the module's state. Run one plain "
                    "forward (or initialize(x)) on the model first")
            if getattr(self, "_is_replica", False) or not self._state_is_own():
                # an nn.DataParallel replica or torch.func.functional_call with copies: the init would
                # write the copies only, the module itself would stay uninitialised (a DataParallel model
                # re-initialised from every batch, its own scale drifting under the gradients)
                raise RuntimeError(
                    f"{type(self).__name__}: not initialised, and its scale or its `initialized` buffer is not its "
                    "own (an nn.DataParallel replica, torch.func.functional_call with copies of the parameters or "
                    "buffers, a parametrization): the data-dependent init would be lost. Run one plain forward (or "
                    "initialize(x)) on the model before wrapping it or calling it functionally")
            self.initialize(x)
            if x.numel() == 0:  # nothing to initialise from (the init waits) and nothing to quantize
                return x.clone(memory_format=torch.contiguous_format)
        else:
            # Shapes only (no host sync, nothing for dynamo to break on). Without this a different
            # channel count / row length reached the op, whose error describes the reshaped x and
            # names neither the quantizer nor the input the caller passed.
            want = self.param_shape(x.shape)
            if tuple(self.scale.shape) != want:
                raise ValueError(
                    f"{type(self).__name__}: scale has shape {tuple(self.scale.shape)} (from the first input or "
                    f"the checkpoint), but x of shape {tuple(x.shape)} needs {want} with "
                    f"granularity={self.granularity!r} (use a separate quantizer for inputs of another shape)"
                )
        shape = x.shape
        axis, group_size = None, None
        if self.granularity == "channel":
            axis = self.axis
        elif self.granularity == "group":
            group_size = self.group_size
            if x.dim() != 2:
                x = x.reshape(shape[0], -1)
        s = self.scale.float().abs().clamp_min(self.eps)
        b = self.offset.float() if self.offset is not None else None
        g = self.grad_scale
        if g is None:
            g = 1.0 / math.sqrt(max(1, x.numel() // s.numel()) * self.qmax)
        y = ops.fake_quant_lsq(x, s, b, self.qmin, self.qmax, axis=axis, group_size=group_size, grad_scale=g, backend=self.backend)
        return y.reshape(shape)

    def _remember_own_scale(self) -> None:
        # in __dict__, not registered: the scale parameter and the `initialized` buffer this module
        # owns, for _state_is_own
        self.__dict__["_own_scale"] = self._parameters.get("scale")
        self.__dict__["_own_initialized"] = self._buffers.get("initialized")

    def _state_is_own(self) -> bool:
        """Whether the scale and the ``initialized`` buffer in use are the module's own or share its
        memory (functional_call with ``state_dict()`` / detached tensors: the init still reaches the
        module), not copies. (A copied buffer beside the module's own lazy scale, functional_call with
        a cloned state_dict, initialised the scale and marked only the copy: the module's state_dict
        then said initialized=False next to a real scale, and a checkpoint of it re-initialised on load.)"""
        def shares(cur, own):
            if not (isinstance(cur, torch.Tensor) and isinstance(own, torch.Tensor) and not is_lazy(own)
                    and cur.device == own.device):
                return False
            try:
                return cur.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
            except NotImplementedError:  # a torch.func wrapper (grad / vmap): a copy as far as the init goes
                return False

        cur = self._parameters.get("scale")
        if not (isinstance(cur, nn.Parameter) or shares(cur, self.__dict__.get("_own_scale"))):
            return False
        buf = self._buffers.get("initialized")
        return buf is self.__dict__.get("_own_initialized") or shares(buf, self.__dict__.get("_own_initialized"))

    def __setstate__(self, state):
        # modules pickled whole before bits / signed became read-only kept them as plain attributes
        for name in ("bits", "signed"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)

    def _apply(self, fn, recurse=True):
        # scale/offset stay float32 through module-wide dtype casts (model.bfloat16(), .half())
        # and follow device moves; uninitialised ones take only what they support (device).
        # A lazy (uninitialised) parameter cannot be moved by every conversion: to_empty()'s empty_like
        # refuses it, so one built on meta stayed there and its first forward failed to materialise it on
        # the input's device. Rebuild it, still lazy, on the device the conversion sends tensors to.
        for name, p in list(self._parameters.items()):
            if p is not None and is_lazy(p):
                try:
                    dev = fn(torch.empty(0, device=p.device)).device
                except Exception:  # (a conversion that takes no plain tensor: leave it to super()._apply)
                    continue
                if dev != p.device:
                    self._parameters[name] = type(p)(requires_grad=p.requires_grad, device=dev, dtype=torch.float32)

        def keep_fp32(t):
            if is_lazy(t):
                try:
                    t = fn(t)
                except ValueError:  # e.g. t.bfloat16() on an UninitializedParameter
                    pass
                return t.float()
            out = fn(t)
            return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out

        out = super()._apply(keep_fp32, recurse)
        self._remember_own_scale()  # (a conversion may replace the parameter object)
        return out

    # ------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Uninitialised (lazy) parameters have no data to save: leave them out.
        for pname, p in self._parameters.items():
            if p is not None and not is_lazy(p):
                destination[prefix + pname] = p if keep_vars else p.detach()
        for bname, buf in self._buffers.items():
            if buf is not None and bname not in self._non_persistent_buffers_set:
                destination[prefix + bname] = buf if keep_vars else buf.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        lazy_absent = []
        for pname in ("scale", "offset"):
            p = self._parameters.get(pname)
            if p is None:
                continue
            key = prefix + pname
            if key in state_dict:
                if is_lazy(p):
                    with torch.inference_mode(False):  # as in materialize(): stays trainable
                        p.materialize(tuple(state_dict[key].shape))
            elif is_lazy(p) or not bool(state_dict.get(prefix + "initialized", True)):
                # nothing to load: both sides uninitialised, or the checkpoint's quantizer never
                # saw data (its lazy scale/offset had none); this one re-initialises on its next forward
                lazy_absent.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._remember_own_scale()  # (assign=True puts new parameter objects in)
        for key in lazy_absent:
            if key in missing_keys:
                missing_keys.remove(key)
        if self.initialized.is_meta:
            pass  # (a model on meta loaded without assign=True: torch leaves it unchanged, with its own warning)
        elif prefix + "initialized" in state_dict:
            self._initialized = bool(self.initialized)
        else:
            # the checkpoint does not say (a float checkpoint): the Python flag stays the truth. The buffer
            # may hold garbage (a model built on meta, then to_empty()): reading it marked ~all fresh
            # quantizers initialised with uninitialised memory as scale / offset.
            self.initialized.fill_(self._initialized)
        if self._initialized and any(is_lazy(p) for p in self._parameters.values() if p is not None):
            error_msgs.append(
                f"{type(self).__name__} at {prefix!r}: state_dict says initialized=True but has no scale/offset "
                f"({', '.join(lazy_absent)})"
            )
            # load_state_dict raises, but the module must stay usable: initialised with a still-lazy
            # parameter, its next forward would fail on the uninitialised parameter instead of
            # initialising it from data.
            self.initialized.fill_(False)
            self._initialized = False

    def extra_repr(self) -> str:
        s = f"bits={self.bits}, signed={self.signed}, granularity={self.granularity!r}"
        if self.granularity == "channel":
            s += f", axis={self.axis}"
        if self.granularity == "group":
            s += f", group_size={self.group_size}"
        s += f", learn_offset={self.learn_offset}, init={self.init!r}, qrange=({self.qmin}, {self.qmax})"
        if self.grad_scale is not None:  # non-defaults change training: show them
            s += f", grad_scale={self.grad_scale}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if not self._initialized:
            s += ", initialized=False"
        return s
