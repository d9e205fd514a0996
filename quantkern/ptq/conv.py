"""Simulated (fake-quant) post-training quantization of conv nets.

The quantized weights are written back into the float model as ``(q - zero) * scale``
(the packed kernels are linear-only), so the model runs unchanged and its
accuracy is exactly that of the integer weights. Entry point:
:func:`fake_quantize_model_`.

Weights. Every ``nn.Conv2d`` / ``nn.Linear`` weight is viewed as ``W [O, I*kh*kw]``
(``I`` = input channels per group; the column order of ``F.unfold``) and quantized
group-wise along that row (asymmetric, float zero; the format of
:func:`quantkern.ptq.rtn_quantize`). Group size: :func:`group_size_for`, the largest
divisor of ``K = I*kh*kw`` that is ``<= group_size``, so no layer gets groups
coarser than asked (EfficientNet's 1x1 convs with 672 inputs get g56 and depthwise
3x3 convs g9, instead of one group of 672 or 9 values per row). Other convs (``nn.Conv1d``,
``nn.Conv3d``, ``nn.ConvTranspose*``) stay in float, with a warning and a ``report["notes"]``
entry. In fp16 / bf16 models the written weights are ``(q - zero) * scale`` rounded to that
dtype (the returned ``qparams`` are float32). Methods:

* ``"rtn"`` / ``"hqq"``: :func:`~quantkern.ptq.rtn_quantize` / :func:`~quantkern.ptq.hqq_quantize`
  (no data, unless ``bias_correction``); these also take grouped convs (ResNeXt-style
  ``groups > 1``), which the data methods and ``bias_correction`` refuse.
* ``"gptq"``: dense layers call :func:`~quantkern.ptq.gptq_quantize` with the Hessian of
  the im2col rows of the layer input; depthwise convs (``groups == in_channels ==
  out_channels``) use :func:`gptq_depthwise`, a batched GPTQ with one
  ``[kh*kw, kh*kw]`` Hessian per channel (each output channel sees only its own input
  channel).
* ``"erq"``: dense layers call :func:`~quantkern.ptq.erq_quantize` (Wqer + ridge
  compensation, which also re-fits the bias, so ``bias_correction`` skips these layers)
  on a random subset of im2col rows. ``act_bits`` quantizers are calibrated after the
  weights, so Aqer runs only against quantizers already installed by an earlier
  activation-only call (``fake_quantize_model_(m, None, act_bits=...)``; its rows are the float input
  of that quantizer, which Aqer quantizes itself); depthwise convs fall back to
  :func:`gptq_depthwise` (ERQ's solver takes one input matrix shared by all rows,
  a depthwise conv has a different one per channel).

* ``"adaround"``: learned up/down rounding per layer
  (:func:`~quantkern.ptq.adaround.adaround_quantize`): group params from ``clip``
  ("hqq": HQQ's, "minmax": RTN's, "mse": :func:`mse_clip_params`), then ``adaround_iters``
  Adam steps on a rectified-sigmoid relaxation of the rounding against the layer objective
  ``tr((Wq - W) H (Wq - W)^T)`` (``H`` from the im2col rows; per channel for depthwise convs).

``depthwise_method`` (e.g. "hqq" with method "gptq") quantizes the depthwise convs with
another method in the same sequential pass.

Float-model targets (``fp_target=True``, any method): a float copy of the model runs each calibration
batch first, and every input row of a layer pairs with the float model's row at the same position. Before
the layer's method quantizes it, its weight and bias become the ridge least-squares fit
:func:`~quantkern.ptq.quantize.fp_target_weights` of the float layer's outputs on the quantized model's
inputs (ridge ``fp_target_damp * mean(diag(Xq^T Xq))``; one problem per channel for a depthwise conv), so
the layer also undoes what the earlier layers' errors did to its input; the method then quantizes those
weights. A conv without a bias gets one. (The same idea as ``quantize_``'s ``fp_target`` for Linear layers.)

End-to-end distillation (``distill_steps > 0``, any method): after all layers are
quantized, the group scales and zeros (integer codes fixed) are tuned with Adam to
minimise KL(fp32 logits || quantized logits) on random batches of the calibration data
(:func:`~quantkern.ptq.adaround.distill_qparams_`; ``distill_bias`` also trains the biases of
the quantized layers and of every BatchNorm). The weights stay exactly ``(q - zero) * scale``.
``return_qparams=True`` puts the final ``(q, scale, zero)`` of every layer in the report.

The data methods are sequential: layer ``i`` is quantized from the inputs the
already-quantized layers ``< i`` produce on the calibration images (a module called more than once
per forward, e.g. a shared head, is calibrated on all its calls). A layer the calibration
forward never reaches (e.g. an unused auxiliary head) gets RTN weights under the data methods (rtn /
hqq keep theirs), no bias correction and a dynamic input quantizer, with a warning and a note
("no calibration input: RTN" / "...: no bias correction" / "...: dynamic input quantizer").

Failures. Every argument, name, weight (NaN / Inf) and the forward of one calibration batch are
checked before the model changes (torch's attention modules are unfused only after that); a failure
in some layer's solver names that layer (the layers before it were already written); a failed
activation calibration removes the quantizers it installed. Layers whose weight is computed
(parametrizations, ``nn.utils.weight_norm``) stay in float with a warning and a note. The call runs
with inference mode off.

Bias correction (``bias_correction=True``): after quantizing a layer, its bias
absorbs the shift of the per-channel output mean over the calibration images,
``b -= Wq mu_q - W mu_fp`` with ``mu`` the mean im2col row of the layer input
(``mu_q`` in the quantized model, ``mu_fp`` in the fp32 model), so it also
removes the mean error propagated from earlier layers. Convs without a bias
get one (zeros). BatchNorm folding is not needed for weight quantization here:
groups lie inside one output row, and round-to-nearest / HQQ / GPTQ are
equivariant to scaling a row, which is all a folded BN does to the weight.

Activations (``act_bits``): a static per-tensor :class:`~quantkern.ptq.ActQuantizer`
at the input of every quantized layer (a forward pre-hook; the quantizer is the
submodule ``input_quantizer``), calibrated with ``act_method`` on the
calibration images after the weights are quantized (all quantizers collect in
one pass, pass-through while calibrating). Range: unsigned ``[0, amax]`` where
the layer input was never negative on the calibration images (after ReLU6),
else symmetric signed ``[-amax, amax]`` (symmetric, so that zero stays exact and zero
padding is unaffected; the calibrators have asymmetric modes, not used here).

Convs must pad with zeros (``padding_mode="zeros"``, numeric padding) or carry a
``static_padding`` module applied before a padding-free conv (the
efficientnet-pytorch convention); other padding raises for the data methods and
``bias_correction``, as does a Conv2d subclass that overrides ``forward`` without a
``static_padding`` (it may pad inside, e.g. ``Conv2dDynamicSamePadding``): its im2col rows
would miss the border.
"""
from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.expose import _is_hf_conv1d, expose_linears
from ._blocks import BlockInputs, fitting, plan_blocks
from ._wquant import check_weight_args, dequantize, minmax_params, quantize_int
from .calibrate import ActQuantizer
from .adaround import adaround_quantize, distill_qparams_
from .erq import erq_quantize
from .gptq import HessianAccumulator, _dead_diag, gptq_quantize
from .hqq import hqq_quantize, init_clamp_fraction, rtn_quantize
from .quantize import accumulate_pairs, fp_target_weights

__all__ = ["fake_quantize_model_", "gptq_depthwise", "mse_clip_params", "group_size_for", "conv_unfold", "quantizable_layers",
           "remove_act_quantizers", "WEIGHT_METHODS", "ACT_METHODS"]

WEIGHT_METHODS = ("rtn", "hqq", "gptq", "erq", "adaround")
ACT_METHODS = ("max", "percentile", "mse", "entropy", "mse_search")


def group_size_for(K: int, group_size: int | None) -> int:
    """The group size used for a row of K weights: the largest divisor of K that is <= group_size.

    ``group_size`` None or -1: K (one group per row). Examples with 64: K=672 -> 56,
    K=480 -> 60, K=9 -> 9, K=27 -> 27, K=1152 -> 64, K=97 (prime) -> 1.
    """
    if isinstance(K, bool) or not isinstance(K, int) or K <= 0:
        raise ValueError(f"K must be a positive int, got {K!r}")
    if group_size is None or group_size == -1:
        return K
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, -1 or None, got {group_size!r}")
    for g in range(min(group_size, K), 0, -1):
        if K % g == 0:
            return g
    return 1  # unreachable


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``nn.Conv2d`` / ``nn.Linear`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The conv's input after its own padding, and the padding F.unfold must still add."""
    sp = getattr(conv, "static_padding", None)
    if sp is not None:
        x = sp(x)
    elif type(conv).forward is not nn.Conv2d.forward:
        # a subclass may pad (or otherwise transform x) inside forward, e.g. efficientnet_lite_pytorch's
        # Conv2dDynamicSamePadding or timm's Conv2dSame: conv.padding is then 0 and the im2col rows would
        # silently miss the border patches, so only a padding the module declares is trusted
        raise NotImplementedError(f"{type(conv).__name__} overrides Conv2d.forward (it may pad or transform its "
                                  "input there): the data methods / bias_correction need plain nn.Conv2d padding or "
                                  "a static_padding module (rtn / hqq quantize it)")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0, 0)
        raise NotImplementedError(f"conv with padding={conv.padding!r}, padding_mode={conv.padding_mode!r} is not supported "
                                  "by the data methods (zero numeric padding or a static_padding module only)")
    return x, tuple(conv.padding)


def conv_unfold(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col of a conv input: ``x [B, C, H, W]`` -> ``[B, C*kh*kw, L]`` float32 (L = output positions).

    Row order ``(c, i, j)`` matches ``conv.weight.reshape(O, -1)`` within one group.
    1x1 stride-1 unpadded convs skip F.unfold (a view).
    """
    x, pad = _padded(conv, x)
    x = x.float()
    if conv.kernel_size == (1, 1) and tuple(conv.stride) == (1, 1) and pad == (0, 0):
        return x.reshape(x.shape[0], x.shape[1], -1)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)


def _rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows ``[T, K]`` of a dense layer's input (im2col for convs)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, mod.in_features).float()
    if mod.groups != 1:
        raise NotImplementedError("grouped (non-depthwise) convs are not supported by the data methods")
    u = conv_unfold(mod, x)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


@torch.no_grad()
def gptq_depthwise(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None, damp: float = 0.01,
                   act_order: bool = False, clip: str = "minmax"):
    """GPTQ of C independent rows, each with its own Hessian (depthwise convs), batched over rows.

    Args:
        W: ``[C, k]`` float (k = kh*kw; row c is output channel c's kernel).
        H: ``[C, k, k]`` float, ``H[c] = 2 X_c^T X_c`` (any positive scale) from channel c's
            own im2col patches ``X_c [T, k]``.
        bits: 1..8. group_size: divides k; None / -1: one group per row.
        damp: relative dampening, ``damp * mean(diag(H[c]))`` per channel.
        act_order: columns of each row processed by decreasing ``diag(H[c])`` (static groups).
        clip: "minmax" (GPTQ's params), "mse": static group params from
            :func:`mse_clip_params` on the original weights, weighted by ``diag(H[c])``, or
            "hqq": static params of :func:`~quantkern.ptq.hqq_quantize` on the original weights
            (float zero; the rounding is then ``round(w / scale + zero)``).

    Returns:
        ``(q uint8 [C, k], scale float32 [C, k // g], zero float32 [C, k // g])``, the same as
        calling :func:`~quantkern.ptq.gptq_quantize` on each row with its Hessian (one
        lazy-batch block; groups in the original column order; with ``act_order`` all
        group params from the unmodified weights, as gptq_quantize's static groups).

    Raises RuntimeError if some ``H[c] + damp`` is not positive definite.
    """
    fn = "gptq_depthwise"
    g = check_weight_args(fn, W, bits, group_size)
    if clip not in ("minmax", "mse", "hqq"):
        raise ValueError(f"{fn}: clip must be 'minmax', 'mse' or 'hqq', got {clip!r}")
    C, k = W.shape
    if not isinstance(H, torch.Tensor) or not H.is_floating_point() or tuple(H.shape) != (C, k, k):
        raise ValueError(f"{fn}: H must be a float tensor of shape [C, k, k] = [{C}, {k}, {k}], got {getattr(H, 'shape', H)}")
    if not bool(torch.isfinite(H).all()):  # (else "not positive definite; increase damp", which it is not about)
        raise ValueError(f"{fn}: H contains NaN or Inf")
    # the Cholesky reads one triangle only: a non-symmetric H[c] would be replaced by the symmetric matrix of
    # its lower triangle without a word (as gptq_quantize, rounding-level asymmetry passes)
    asym = float((H.detach().double() - H.detach().double().transpose(1, 2)).abs().max()) if C else 0.0
    if asym > 1e-3 * float(H.detach().abs().max()):
        raise ValueError(f"{fn}: H[c] must be symmetric (2 X_c^T X_c); max |H - H^T| = {asym:.3g}")
    if not (isinstance(damp, (int, float)) and damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"{fn}: damp must be a finite float >= 0, got {damp!r}")
    maxq = 2**bits - 1
    G = k // g
    Wf = W.detach().float().clone()
    Hd = H.detach().double().clone()
    dg = torch.diagonal(Hd, dim1=1, dim2=2)  # view [C, k]
    dead = dg == 0
    # a column no patch ever reached: any weight is exact, quantize it as 0. Its diagonal is the
    # channel's mean live one (gptq_quantize's reason: the dampening must not depend on H's scale)
    dg[dead] = _dead_diag(dg, dead)
    Wf[dead] = 0
    static = act_order or clip != "minmax"
    scale = torch.zeros(C, G, dtype=torch.float32, device=W.device)
    zero = torch.zeros(C, G, dtype=torch.float32, device=W.device)
    if clip == "hqq":
        _, scale, zero = hqq_quantize(Wf, bits, g, warn=False)
    elif clip == "mse":
        wt = torch.where(dead, torch.zeros_like(dg), dg)  # a dead input's error costs nothing
        scale, zero = mse_clip_params(Wf.reshape(C, G, g), bits, wt.float().reshape(C, G, g))
    elif static:
        scale, zero = minmax_params(Wf.reshape(C, G, g), bits)
    cols = torch.arange(k, device=W.device).expand(C, k)
    if act_order:
        cols = torch.argsort(dg, dim=1, descending=True, stable=True)
        Wf = torch.gather(Wf, 1, cols)
        Hd = torch.gather(torch.gather(Hd, 1, cols[:, :, None].expand(C, k, k)), 2, cols[:, None, :].expand(C, k, k))
    dg = torch.diagonal(Hd, dim1=1, dim2=2)
    dg += damp * dg.mean(1, keepdim=True)
    L, info = torch.linalg.cholesky_ex(Hd)
    if (info != 0).any():
        raise RuntimeError(f"{fn}: H[c] + damp*I is not positive definite for {int((info != 0).sum())} channels; increase damp")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if (info != 0).any():
        raise RuntimeError(f"{fn}: an inverse Hessian is not positive definite; increase damp")
    U = U.float()
    Q = torch.zeros(C, k, dtype=torch.float32, device=W.device)
    rows = torch.arange(C, device=W.device)
    for j in range(k):  # over kernel taps (9 or 25), vectorised over channels
        if not static and j % g == 0:
            s, z = minmax_params(Wf[:, j:j + g], bits)
            scale[:, j // g], zero[:, j // g] = s, z
        gi = cols[:, j] // g
        s, z = scale[rows, gi], zero[rows, gi]
        w = Wf[:, j]
        q = torch.clamp(torch.round(w / s + z), 0, maxq)  # = round(w / s) + z for GPTQ's integer zeros
        Q[:, j] = q
        err = (w - s * (q - z)) / U[:, j, j]
        Wf[:, j:] -= err[:, None] * U[:, j, j:]
    if act_order:
        Q = torch.empty_like(Q).scatter_(1, cols, Q)
    return Q.to(torch.uint8), scale, zero


def mse_clip_params(Wg: torch.Tensor, bits: int, weight: torch.Tensor | None = None, grid: int = 20,
                    min_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipped min-max params minimising the (weighted) squared rounding error.

    Args:
        Wg: ``[..., g]`` float weights, one group per last-dim slice.
        bits: 1..8.
        weight: optional ``[..., g]`` (broadcastable) non-negative importance of each weight
            (e.g. ``diag(H)`` of its input column); None = plain squared error.
        grid: clip ratios tried, ``linspace(1, min_ratio, grid)``, applied to both
            ``min(w, 0)`` and ``max(w, 0)``.

    Returns:
        ``(scale, zero)`` float32 ``[...]`` in GPTQ's min-max convention (integer zero,
        ``w ~= (clamp(round(w / scale) + zero, 0, 2^bits - 1) - zero) * scale``); ratio 1 is
        exactly :func:`~quantkern.ptq._wquant.minmax_params`, so the error never gets worse.
    """
    maxq = 2**bits - 1
    Wg = Wg.float()
    best_s, best_z = minmax_params(Wg, bits)
    best_e = None
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        s, z = minmax_params(Wg * r, bits)  # the range of the clipped group, as min-max would compute it
        d = (quantize_int(Wg, s[..., None], z[..., None], maxq) - z[..., None]) * s[..., None] - Wg
        e = (d * d if weight is None else d * d * weight).sum(-1)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


class _Stop(Exception):
    """Raised by a hook to end the forward pass once the layer of interest has seen its input."""


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """A layer's input from a forward pre-hook's (args, kwargs): ``layer(x)`` or ``layer(input=x)``."""
    return args[0] if args else kwargs["input"]


def _batches(calib_data, batch_size: int):
    if isinstance(calib_data, torch.Tensor):
        for i in range(0, calib_data.shape[0], batch_size):
            yield calib_data[i:i + batch_size]
    else:
        yield from calib_data


def _run(model, calib_data, batch_size):
    for xb in _batches(calib_data, batch_size):
        try:
            model(xb)
        except _Stop:
            pass


class _LayerStats:
    """What one calibration pass collects at one layer's input.

    ``mean``: mean im2col row (``[K]``, depthwise ``[C, k]``), for bias correction.
    ``acc`` / ``Hdw``: GPTQ Hessian (dense ``[K, K]`` via HessianAccumulator, depthwise ``[C, k, k]``).
    ``rows``: up to ``max_rows`` random im2col rows ``[T, K]`` (ERQ).
    ``AtA`` / ``BtA`` (``pair``, for ``fp_target``): ``A^T A`` and ``B^T A`` with ``A = [Xq | 1]`` the
    rows here and ``B = [X | 1]`` the float model's rows at the same positions, float64 ``[K+1, K+1]``
    (depthwise ``[C, k+1, k+1]``, one per channel).
    """

    def __init__(self, mod, hessian: bool, max_rows: int, gen: torch.Generator | None, pair: bool = False):
        self.mod, self.dw = mod, _is_depthwise(mod)
        W = mod.weight
        self.K = W[0].numel()
        self.sum, self.n = None, 0
        # the Hessians live with the weights (the solvers require W and H on one device)
        self.acc = HessianAccumulator(self.K, device=W.device) if hessian and not self.dw else None
        self.Hdw = (torch.zeros(mod.out_channels, self.K, self.K, dtype=torch.float64, device=W.device)
                    if hessian and self.dw else None)
        self.max_rows, self.gen, self.rows = max_rows, gen, []
        shape = ((mod.out_channels,) if self.dw else ()) + (self.K + 1, self.K + 1)
        self.AtA = torch.zeros(shape, dtype=torch.float64, device=W.device) if pair else None
        self.BtA = torch.zeros_like(self.AtA) if pair else None

    def add(self, x: torch.Tensor, xf: torch.Tensor | None = None):
        """One input ``x`` of the layer; ``xf``: the float model's input of the same call (``pair``)."""
        m = self.mod
        if (xf is None) != (self.AtA is None) or (xf is not None and xf.shape != x.shape):
            got = None if xf is None else tuple(xf.shape)
            raise RuntimeError(f"fp_target: the float model's input of this layer ({got}) does not pair with the "
                               f"quantized model's ({tuple(x.shape)})")
        if self.dw:
            for i in range(0, x.shape[0], 2):  # chunks of 2 images: the unfolded 112x112 maps are large
                u = conv_unfold(m, x[i:i + 2])  # [b, C*k, L]
                u = u.reshape(u.shape[0], m.in_channels, self.K, -1)
                s = u.sum((0, 3))
                self.sum = s if self.sum is None else self.sum + s
                self.n += u.shape[0] * u.shape[3]
                if self.Hdw is not None:
                    self.Hdw += torch.einsum("bckl,bcml->ckm", u, u).to(self.Hdw)
                if self.AtA is not None:
                    uf = conv_unfold(m, xf[i:i + 2]).reshape(u.shape)
                    a, bf = _with_ones(u), _with_ones(uf)
                    self.AtA += torch.einsum("bckl,bcml->ckm", a, a).to(self.AtA)
                    self.BtA += torch.einsum("bckl,bcml->ckm", bf, a).to(self.BtA)
            return
        r = _rows(m, x)
        s = r.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.n += r.shape[0]
        if self.acc is not None:
            self.acc.add_batch(r)
        if self.AtA is not None:
            accumulate_pairs(self.AtA, self.BtA, r, _rows(m, xf))
        if self.max_rows:
            keep = min(r.shape[0], self.max_rows)
            idx = torch.randperm(r.shape[0], generator=self.gen)[:keep]
            self.rows.append(r[idx])

    @property
    def mu(self) -> torch.Tensor | None:
        return self.sum / self.n if self.n else None  # None: the layer never saw an input

    def erq_rows(self) -> torch.Tensor:
        r = torch.cat(self.rows)
        if r.shape[0] > self.max_rows:
            r = r[torch.randperm(r.shape[0], generator=self.gen)[:self.max_rows]]
        return r


def _with_ones(u: torch.Tensor) -> torch.Tensor:
    """Unfolded depthwise patches ``[b, C, k, L]`` with a row of ones appended along ``k`` (the bias column of
    ``[x | 1]``)."""
    return torch.cat([u, u.new_ones(u.shape[0], u.shape[1], 1, u.shape[3])], 2)


def _collect(model, mod, calib_data, batch_size, stop: bool = True, blocks: BlockInputs | None = None,
             fp: tuple | None = None, **kw) -> _LayerStats:
    """Runs the calibration images up to ``mod`` (stopping there) and collects its input stats.

    ``stop=False`` (a module called more than once per forward): runs the whole forward (with
    ``blocks``: the whole block), so the stats cover every call, as the fp32 means of bias
    correction do. ``blocks``: every batch's cached input to ``mod``'s block (``_blocks``), run
    instead of the model from its start. ``fp`` (``fp_target``): ``(float model, its copy of mod, its
    BlockInputs or None)``; each batch runs there first, and every input of ``mod`` pairs with the
    float model's input of the same call (the n-th call with the n-th).
    """
    st = _LayerStats(mod, pair=fp is not None, **kw)
    pending = []  # the float model's inputs of the current batch, in call order

    def take(x):
        if fp is not None and not pending:
            raise RuntimeError("fp_target: the layer ran more often in the quantized model than in the float model "
                               "on one calibration batch")
        st.add(x.detach(), pending.pop(0) if fp is not None else None)
        if stop:
            raise _Stop

    def ftake(m, args, kwargs):
        pending.append(_input_of(args, kwargs).detach())
        if stop:
            raise _Stop

    def one(mdl, cache, u):  # one calibration batch (u: the batch, or its index in the cache)
        try:
            mdl(u) if cache is None else cache.run(u)
        except _Stop:
            pass

    # ERQ's rows (max_rows) of a layer with an input quantizer from an earlier call: Aqer needs the float
    # input X (it applies the quantizer itself), which that quantizer's pre-hook has replaced by Qa(X) before
    # a hook of ours would run: its pre-hook hands over its own input instead (the forward goes on as usual)
    tap = bool(st.max_rows) and getattr(mod, "_qk_act_hook", None) is not None
    if tap:
        mod._qk_act_tap = take
    else:
        h = mod.register_forward_pre_hook(lambda m, args, kwargs: take(_input_of(args, kwargs)), with_kwargs=True)
    fh = fp[1].register_forward_pre_hook(ftake, with_kwargs=True) if fp is not None else None
    try:
        with torch.no_grad():
            units = _batches(calib_data, batch_size) if blocks is None else range(len(blocks.items))
            for u in units:
                if fp is not None:
                    pending.clear()
                    one(fp[0], fp[2], u)
                one(model, blocks, u)
                if pending:
                    raise RuntimeError("fp_target: the layer ran more often in the float model than in the quantized "
                                       "model on one calibration batch")
    finally:
        if tap:
            del mod._qk_act_tap
        else:
            h.remove()
        if fh is not None:
            fh.remove()
    return st


def _run_hooked(model, layers, pre_hook, calib_data, batch_size):
    """One pass over the calibration data with ``pre_hook(module, input)`` on every layer."""
    hs = [m.register_forward_pre_hook(lambda m, args, kwargs: pre_hook(m, _input_of(args, kwargs)), with_kwargs=True)
          for _, m in layers]
    try:
        with torch.no_grad():
            _run(model, calib_data, batch_size)
    finally:
        for h in hs:
            h.remove()


def _fp_means(model, layers, calib_data, batch_size) -> dict:
    """Mean im2col rows of every layer's input in the (still fp32) model, one pass."""
    stats = {id(m): _LayerStats(m, False, 0, None) for _, m in layers}
    _run_hooked(model, layers, lambda m, x: stats[id(m)].add(x.detach()), calib_data, batch_size)
    return {k: v.mu for k, v in stats.items()}


def _quantize_layer(mod, bits, method, gs, st, opts, fit=None):
    """Quantizes ``mod.weight`` (or ``fit``'s weight: ``(W [O, K], b [O])`` from :func:`_fp_target_fit`,
    which the method then quantizes); returns (dequantized weight [O, K], new bias or None, note,
    (q, scale, zero))."""
    W = mod.weight.detach().float()
    O = W.shape[0]
    W2 = W.reshape(O, -1) if fit is None else fit[0]
    g = group_size_for(W2.shape[1], gs)
    note = None
    new_b = None if fit is None else fit[1]
    if method == "rtn" and opts["clip"] == "mse":
        s, z = mse_clip_params(W2.reshape(O, -1, g), bits)
        # (uint8 like the other methods' codes: return_qparams documents q as uint8)
        q = quantize_int(W2.reshape(O, -1, g), s[..., None], z[..., None], 2**bits - 1).reshape(O, -1).to(torch.uint8)
    elif method == "rtn":
        q, s, z = rtn_quantize(W2, bits, g, warn=False)  # (fake_quantize_model_ warns once, naming layers)
    elif method == "hqq":
        q, s, z = hqq_quantize(W2, bits, g, warn=False)
    elif method == "adaround":
        if opts["clip"] == "hqq":
            _, s, z = hqq_quantize(W2, bits, g, warn=False)
        elif opts["clip"] == "mse":
            s, z = mse_clip_params(W2.reshape(O, -1, g), bits)
        else:
            _, s, z = rtn_quantize(W2, bits, g, warn=False)
        H = st.Hdw if st.dw else st.acc.H
        q, s, z = adaround_quantize(W2, H, s, z, bits, iters=opts["ada_iters"], lr=opts["ada_lr"], lam=opts["ada_lambda"])
    elif st.dw:  # gptq, and erq's documented fallback
        q, s, z = gptq_depthwise(W2, st.Hdw, bits, g, opts["damp"], opts["act_order"], opts["clip"])
        note = "depthwise: batched GPTQ" if method == "erq" else None
    elif method == "gptq":
        q, s, z = gptq_quantize(W2, st.acc.H, bits, g, damp=opts["damp"], act_order=opts["act_order"],
                                clip="mse" if opts["clip"] == "mse" else "minmax")
    else:  # erq, dense
        X = st.erq_rows()
        aq = getattr(mod, "input_quantizer", None)
        lam = opts["erq_lambda"] * float((X * X).sum(0).mean()) + 1e-8  # relative to diag(X^T X)
        b = fit[1] if fit is not None else (mod.bias.detach().float() if mod.bias is not None else None)
        q, s, z, new_b = erq_quantize(W2, b, X, bits, g, act_quant=aq if aq is not None else (lambda x: x),
                                      use_aqer=aq is not None, lambda1=lam, lambda2=lam, fit_bias=True)
    Wq = dequantize(q, s, z)
    return Wq, new_b, note, (q, s, z)


def _fp_target_fit(mod, st: _LayerStats, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp_target``: the weight ``[O, K]`` and bias ``[O]`` (float32) that map the layer's inputs in the
    quantized model closest to the float model's outputs on the calibration data (ridge least squares,
    :func:`~quantkern.ptq.quantize.fp_target_weights`); a depthwise conv solves one problem per channel."""
    W = mod.weight.detach().float().reshape(mod.weight.shape[0], -1)
    b = mod.bias.detach().float() if mod.bias is not None else W.new_zeros(W.shape[0])
    if st.dw:  # [C] problems of one row each
        Wt, bt = fp_target_weights(W[:, None], b[:, None], st.AtA, st.BtA, damp)
        return Wt[:, 0], bt[:, 0]
    return fp_target_weights(W, b, st.AtA, st.BtA, damp)


def _act_pre_hook(m, args, kwargs):
    """The forward pre-hook of an input quantizer (module level: a model holding it can be pickled)."""
    x = _input_of(args, kwargs)
    tap = getattr(m, "_qk_act_tap", None)  # (_collect: ERQ's Aqer takes the float input)
    if tap is not None:
        tap(x)
    xq = m.input_quantizer(x)
    if args:
        return (xq,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "input": xq}


def _add_act_quantizers(model, layers, act_bits, act_method, calib_data, batch_size, notes=None):
    # pass 1: is each layer's input ever negative? (decides unsigned vs symmetric signed)
    neg = {id(m): False for _, m in layers}
    seen = set()

    def sign_hook(m, x):
        if x.numel():  # (a layer that only ever gets empty batches, an MoE expert no token reached: unseen)
            seen.add(id(m))
            neg[id(m)] |= bool((x < 0).any())

    old = {}  # a second call replaces the quantizers of the first (given back if this call fails)
    for _, m in layers:
        if getattr(m, "_qk_act_hook", None) is not None:
            old[m] = m.input_quantizer
            _remove_act_quantizer(m)
    installed = set()
    try:
        _run_hooked(model, layers, sign_hook, calib_data, batch_size)
        for n, m in layers:
            if id(m) in seen:
                m.input_quantizer = ActQuantizer(act_bits, act_method, symmetric=True, unsigned=not neg[id(m)])
                m.input_quantizer.start_calibration()
            else:  # nothing to calibrate on: a dynamic (per-call min-max) quantizer
                warnings.warn(f"fake_quantize_model_: layer {n!r} saw no calibration input; using a dynamic input "
                              "quantizer for it", stacklevel=3)
                m.input_quantizer = ActQuantizer(act_bits, symmetric=True, dynamic=True)
                if notes is not None:
                    notes[n] = (notes[n] + "; " if n in notes else "") + "no calibration input: dynamic input quantizer"
            m._qk_act_hook = m.register_forward_pre_hook(_act_pre_hook, with_kwargs=True)
            installed.add(m)
        with torch.no_grad():
            _run(model, calib_data, batch_size)
        for name, m in layers:
            if id(m) in seen:
                m.input_quantizer.finish_calibration(name)
    except BaseException:  # no quantizer left half calibrated: this call's are removed, the earlier ones given back
        for _, m in layers:
            if m in installed:
                _remove_act_quantizer(m)
            elif "input_quantizer" in m._modules and getattr(m, "_qk_act_hook", None) is None:
                del m.input_quantizer
        for m, q in old.items():
            if getattr(m, "_qk_act_hook", None) is None:
                m.input_quantizer = q
                m._qk_act_hook = m.register_forward_pre_hook(_act_pre_hook, with_kwargs=True)
        raise


def remove_act_quantizers(model: nn.Module) -> int:
    """Removes the activation fake-quantizers added by :func:`fake_quantize_model_`; returns how many."""
    return sum(_remove_act_quantizer(m) for m in model.modules())


def _remove_act_quantizer(m: nn.Module) -> bool:
    h = getattr(m, "_qk_act_hook", None)
    if h is None:
        return False
    h.remove()
    del m._qk_act_hook
    if "input_quantizer" in m._modules:  # (a failed call may have removed it first)
        del m.input_quantizer
    return True


def _layer_names(model: nn.Module, skip_names) -> tuple[dict, dict, set]:
    """The layers the model will have once :func:`expose_linears` ran, without running it.

    Returns ``names`` (every name of a Conv2d / Linear -> its first name, as :func:`quantizable_layers`
    lists it), ``mods`` (first name -> module, in module order; None for a projection of a torch
    attention module that expose_linears will create, ``attn.q_proj``) and the names of the torch
    attention / transformers Conv1D modules (a skip may name those: they are then kept as they are).
    ``skip_names``: the names skipped (expose_linears leaves those modules alone), or None.
    """
    from ..nn._sites import module_sites
    from ..nn.attention import _not_plain

    names, mods, whole = {}, {}, set()
    first = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (nn.Conv2d, nn.Linear)) or (_is_hf_conv1d(m) and not (skip_names and n in skip_names)):
            names[n] = first.setdefault(id(m), n)
            mods.setdefault(names[n], m)
        if isinstance(m, nn.MultiheadAttention) or _is_hf_conv1d(m):
            whole.add(n)
    for mnames, _, mha in module_sites(model, lambda m: isinstance(m, nn.MultiheadAttention)):
        if (skip_names and any(n in skip_names for n in mnames)) or _not_plain(mha):
            continue
        for proj in ("q_proj", "k_proj", "v_proj"):
            for n in mnames:
                names[f"{n}.{proj}"] = f"{mnames[0]}.{proj}"
            mods[f"{mnames[0]}.{proj}"] = None
    return names, mods, whole


def _computed_weight(m: nn.Module) -> str:
    """Why ``m.weight`` is not a plain Parameter that writing the quantized weight into would change ("" if it is)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(m, "weight"):
        kinds = ", ".join(type(p).__name__ for p in m.parametrizations["weight"])
        return (f"its weight is parametrized ({kinds}): torch.nn.utils.parametrize.remove_parametrizations(m, "
                "'weight') makes it a plain Parameter")
    if m._parameters.get("weight") is not None:
        return ""
    hooks = [type(h).__name__ for h in m._forward_pre_hooks.values()]
    if "WeightNorm" in hooks:
        return "its weight is computed by torch.nn.utils.weight_norm: torch.nn.utils.remove_weight_norm(m) removes it"
    if "SpectralNorm" in hooks:
        return "its weight is computed by torch.nn.utils.spectral_norm: torch.nn.utils.remove_spectral_norm(m) removes it"
    return "its weight is not a Parameter (computed from other tensors)"


def fake_quantize_model_(
    model: nn.Module,
    weight_bits: int | None = 4,
    method: str = "rtn",
    group_size: int | None = 64,
    *,
    act_bits: int | None = None,
    act_method: str = "max",
    calib_data: torch.Tensor | Iterable[torch.Tensor] | None = None,
    skip: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    layer_bits: dict[str, int] | None = None,
    bias_correction: bool = False,
    fp_target: bool = False,
    fp_target_damp: float = 0.1,
    clip: str = "minmax",
    act_order: bool = True,
    damp: float = 0.01,
    erq_lambda: float = 1e-3,
    max_rows: int = 16384,
    batch_size: int = 8,
    progress: bool = True,
    seed: int = 0,
    adaround_iters: int = 300,
    adaround_lr: float = 3e-2,
    adaround_lambda: float = 100.0,
    depthwise_method: str | None = None,
    distill_steps: int = 0,
    distill_batch: int = 8,
    distill_lr: float = 3e-4,
    distill_bias: bool = False,
    return_qparams: bool = False,
    block_cache: bool = True,
) -> dict:
    """Fake-quantizes every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` in place (see the module docstring).

    Args:
        model: any module. Every pass runs it in eval mode (BatchNorm statistics are used as they
            are, never updated); each submodule's train / eval mode is given back at the end.
        weight_bits: 1..8, or None to leave the weights in float (activation-only).
        method: one of :data:`WEIGHT_METHODS` ("rtn", "hqq", "gptq", "erq", "adaround").
        group_size: requested group size along ``I*kh*kw``; each layer uses
            :func:`group_size_for` (largest divisor <= group_size). None / -1: per channel.
        act_bits: None (weight-only) or 2..16: static per-tensor activation fake quant at
            the input of every quantized layer.
        act_method: calibrator of the activation ranges, one of :data:`ACT_METHODS`.
        calib_data: float tensor ``[N, ...]`` of model inputs (split into ``batch_size``
            batches) or an iterable of float batches (a generator is read into a list once);
            NaN / Inf values are refused.
            Needed by gptq / erq / adaround, ``bias_correction``, ``distill_steps`` and ``act_bits``.
        skip: layer names (as in ``model.named_modules()``; a layer registered under two names
            takes either) to keep in float, or a predicate ``(name, module) -> bool`` (called
            with the first name of each layer, as :func:`quantizable_layers` lists it).
        layer_bits: per-layer weight bits overriding ``weight_bits`` (e.g. ``{"_conv_stem": 8}``).
        bias_correction: correct the per-channel output mean of each layer (sequential).
        fp_target: before its method quantizes it, each layer's weight and bias are re-fitted (ridge least
            squares) so that the layer maps its inputs in the partly quantized model to the *float* model's
            outputs of that layer on the calibration data (module docstring); needs ``calib_data``, any method.
        fp_target_damp: that fit's ridge, relative to the mean diagonal of ``Xq^T Xq`` (per channel for
            depthwise convs); 0.1 was best on EfficientNet-Lite0 W4 (0.01: worse, 1.0: about equal).
        clip: "minmax", "mse" (:func:`mse_clip_params`) or "hqq": the group params of ``rtn``
            ("minmax" / "mse") and of depthwise convs under gptq / erq (all three, see
            :func:`gptq_depthwise`); dense GPTQ takes "mse" too (``gptq_quantize(clip="mse")``;
            on EfficientNet-Lite0 W4 it lowered top-1 agreement of the GPTQ-dense + HQQ-depthwise
            model from 61.7% to 46.9%, so the demo keeps min-max); dense ERQ keeps its own
            min-max params, HQQ its own zero search.
        adaround_iters, adaround_lr, adaround_lambda: method "adaround": Adam steps per layer, step
            size, weight of the rounding regulariser (see :func:`~quantkern.ptq.adaround.adaround_quantize`;
            the defaults were 1e-2 / 0.01 before 2026-12, which gave round-to-nearest in effect).
        depthwise_method: None (same as ``method``) or a method for the depthwise convs only.
        distill_steps, distill_batch, distill_lr, distill_bias: end-to-end KD of the group
            scales / zeros after quantization (module docstring); 0 steps = off.
        return_qparams: put ``qparams`` (name -> ``(q uint8 [O, K], scale, zero)``) in the report.
        act_order, damp: GPTQ options (also for depthwise convs and ERQ's depthwise fallback).
        erq_lambda: ERQ's ridge strengths lambda1 = lambda2 = erq_lambda * mean(diag(X^T X))
            of the layer's calibration rows (relative, so independent of the row count).
        max_rows: calibration rows kept per layer for ERQ (random subset).
        batch_size: images per calibration forward.
        progress: tqdm bar over layers.
        seed: for the ERQ row subsets.
        block_cache: the per-layer calibration passes (gptq / erq / adaround / bias_correction) run
            only the layer's block on each batch's cached input to it when the model runs a list of
            blocks as a chain (EfficientNet's ``_blocks``; checked on the first batch, see
            ``quantkern.ptq._blocks``), instead of the model from its start: bit-identical, one
            block input per batch held in memory. False: every pass runs the whole model (needed
            when the model reads settings made outside its forward that change between batches).

    Returns:
        dict: ``layers`` (names quantized), ``group_sizes`` (name -> g), ``notes``
        (name -> fallback note; also Conv1d / Conv3d / ConvTranspose layers left in float),
        ``seconds``; ``distill`` (first / last KD loss) with ``distill_steps``; ``qparams`` with
        ``return_qparams``; ``block_lists``: the block lists whose inputs were cached (empty: none).

    Raises:
        ValueError / TypeError for bad arguments (before the model is touched).
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in WEIGHT_METHODS:
        raise ValueError(f"method must be one of {WEIGHT_METHODS}, got {method!r}")
    if depthwise_method is not None and depthwise_method not in WEIGHT_METHODS:
        raise ValueError(f"depthwise_method must be None or one of {WEIGHT_METHODS}, got {depthwise_method!r}")
    if isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0:
        raise ValueError(f"distill_steps must be an int >= 0, got {distill_steps!r}")
    if weight_bits is None and (distill_steps or return_qparams):  # (there are no weight params to tune / return)
        raise ValueError("distill_steps / return_qparams need quantized weights, not weight_bits=None")
    if not isinstance(fp_target, bool):
        raise ValueError(f"fp_target must be a bool, got {fp_target!r}")
    if weight_bits is None and (bias_correction or fp_target or depthwise_method is not None):  # (the weight pass)
        raise ValueError("bias_correction / fp_target / depthwise_method act on the weight quantization, not "
                         "weight_bits=None")
    if weight_bits is not None and (isinstance(weight_bits, bool) or not isinstance(weight_bits, int) or not 1 <= weight_bits <= 8):
        raise ValueError(f"weight_bits must be an int in [1, 8] or None, got {weight_bits!r}")
    if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 16):
        raise ValueError(f"act_bits must be an int in [2, 16] or None, got {act_bits!r}")
    if act_method not in ACT_METHODS:
        raise ValueError(f"act_method must be one of {ACT_METHODS}, got {act_method!r}")
    if group_size is not None and group_size != -1 and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive int, -1 or None, got {group_size!r}")
    if clip not in ("minmax", "mse", "hqq") or (clip == "hqq" and method == "rtn"):
        raise ValueError(f"clip must be 'minmax', 'mse' or 'hqq' (not with rtn), got {clip!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    # the solvers' own checks run at the first layer that uses them, after earlier layers (e.g. the
    # dense ones under depthwise_method) were already written: check their arguments here
    def _num(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

    for arg, v in (("damp", damp), ("erq_lambda", erq_lambda), ("adaround_lambda", adaround_lambda),
                   ("fp_target_damp", fp_target_damp)):
        if not (_num(v) and v >= 0):
            raise ValueError(f"{arg} must be a finite float >= 0, got {v!r}")
    if not (_num(adaround_lr) and adaround_lr > 0):
        raise ValueError(f"adaround_lr must be a finite float > 0, got {adaround_lr!r}")
    if not isinstance(block_cache, bool):
        raise ValueError(f"block_cache must be a bool, got {block_cache!r}")
    for arg, v, lo in (("adaround_iters", adaround_iters, 0), ("max_rows", max_rows, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{arg} must be an int >= {lo}, got {v!r}")
    data_methods = {"gptq", "erq", "adaround"}
    uses_data = method in data_methods or depthwise_method in data_methods
    need_data = (act_bits is not None or bias_correction or fp_target or distill_steps
                 or (weight_bits is not None and uses_data))
    if need_data:
        if calib_data is None:
            dw = f", depthwise_method={depthwise_method!r}" if depthwise_method else ""
            raise ValueError(f"calib_data is required for method={method!r}{dw} / act_bits / bias_correction / "
                             f"fp_target / distill_steps")
        if isinstance(calib_data, torch.Tensor):
            # (an integer tensor is allowed, as integer batches are: token ids for an embedding model)
            if calib_data.is_complex() or calib_data.dim() == 0 or calib_data.shape[0] == 0:
                raise ValueError(f"calib_data must be a non-empty real tensor [N, ...], got {calib_data.dtype} {tuple(calib_data.shape)}")
        else:
            calib_data = list(calib_data)
            if not calib_data or not all(isinstance(x, torch.Tensor) for x in calib_data):
                raise ValueError("calib_data must be a tensor or a non-empty iterable of tensors")
            # (integer batches stay allowed: token ids for a model that starts with an embedding)
        # NaN / Inf inputs made bias correction and distillation write NaN into the model without a word
        # (and the Hessian methods fail inside some layer): refuse them here
        for i, x in enumerate([calib_data] if isinstance(calib_data, torch.Tensor) else calib_data):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError("calib_data contains NaN or Inf" + ("" if isinstance(calib_data, torch.Tensor)
                                                                     else f" (batch {i})"))
    if isinstance(skip, str):
        skip = (skip,)
    elif not callable(skip):
        skip = tuple(skip)  # a generator would be used up by the name check below
    # Every check runs before anything changes the model, expose_linears included (below: torch's attention
    # modules get Linear projections, transformers' Conv1D layers become nn.Linear), so the names skip /
    # layer_bits may use are those of the exposed model, predicted here without changing it
    name_skip = None if callable(skip) else frozenset(skip)
    pnames, pmods, kept_unexposed = _layer_names(model, name_skip)
    if name_skip is not None:
        unknown = set(skip) - set(pnames) - kept_unexposed
        if unknown:
            raise ValueError(f"skip: no Conv2d / Linear named {sorted(unknown)}")
    bits_by_name = {}
    for n, b in dict(layer_bits or {}).items():
        if n not in pnames:
            raise ValueError(f"layer_bits: no Conv2d / Linear named {n!r}")
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"layer_bits[{n!r}] must be an int in [1, 8], got {b!r}")
        if bits_by_name.get(pnames[n], b) != b:
            raise ValueError(f"layer_bits: {n!r} is layer {pnames[n]!r}, which another entry gives "
                             f"{bits_by_name[pnames[n]]} bits")
        bits_by_name[pnames[n]] = b
    layer_bits = bits_by_name
    if distill_steps:
        if isinstance(distill_batch, bool) or not isinstance(distill_batch, int) or distill_batch < 1:
            raise ValueError(f"distill_batch must be an int >= 1, got {distill_batch!r}")
        if isinstance(distill_lr, bool) or not isinstance(distill_lr, (int, float)) or not 0 < distill_lr < float("inf"):
            raise ValueError(f"distill_lr must be a finite float > 0, got {distill_lr!r}")
        shapes = sorted({tuple(x.shape[1:]) for x in ([calib_data] if isinstance(calib_data, torch.Tensor) else calib_data)})
        if len(shapes) > 1:  # (the distillation draws its random batches from all of them, concatenated)
            raise ValueError(f"distill_steps needs calibration batches of one shape [*, ...], got {shapes[:4]}"
                             f"{' ...' if len(shapes) > 4 else ''}")
    elif distill_bias:
        warnings.warn("fake_quantize_model_: distill_bias=True does nothing without distill_steps > 0", stacklevel=2)
    from ..ops import HQQ_BITS

    def check_layer(n, m):  # m None: a projection expose_linears will create (an nn.Linear)
        if weight_bits is None:
            return
        meth = depthwise_method if (depthwise_method and _is_depthwise(m)) else method
        data = meth in data_methods or bias_correction or fp_target  # (this layer's calibration pass)
        if isinstance(m, nn.Conv2d) and m.groups != 1 and not _is_depthwise(m) and data:
            extra = "".join(f" / {k}" for k, on in (("bias_correction", bias_correction), ("fp_target", fp_target))
                            if on)
            raise NotImplementedError(f"{n}: grouped conv with groups={m.groups}: method {meth!r}{extra} handles "
                                      "dense and depthwise convs only (rtn / hqq quantize any conv)")
        b = layer_bits.get(n, weight_bits)
        # the layers whose params come from the HQQ kernel (rtn_quantize / hqq_quantize) take its bits only
        uses_hqq_kernel = (meth == "hqq" or (meth == "rtn" and clip != "mse")
                           or (meth == "adaround" and clip in ("minmax", "hqq"))
                           or (meth in ("gptq", "erq") and _is_depthwise(m) and clip == "hqq"))
        if uses_hqq_kernel and b not in HQQ_BITS:
            raise ValueError(f"{n}: {b}-bit weights with method {meth!r}, clip={clip!r}: its params come from "
                             f"rtn / hqq, which take bits {HQQ_BITS}")
        if isinstance(m, nn.Conv2d) and data:
            try:  # unsupported padding raises here, not mid-way
                _padded(m, torch.zeros(1, m.in_channels, 1, 1))
            except NotImplementedError as e:
                raise NotImplementedError(f"layer {n!r}: {e}") from None
        if m is not None:  # (else the solver of some layer fails after the layers before it were written)
            W = m.weight.detach()
            if not bool(torch.isfinite(W).all()):
                raise ValueError(f"layer {n!r}: its weight contains NaN or Inf")
            g = group_size_for(W[0].numel(), group_size)
            if uses_hqq_kernel and float(W.abs().max()) * max(g, 2) > 2.0**127:
                raise ValueError(f"layer {n!r}: max|W| = {float(W.abs().max()):.3g} overflows the fp32 solver of "
                                 f"rtn / hqq (max|W| * group size > 2^127); scale the layer down by a power of two")

    # layers whose weight is computed from other parameters (torch.nn.utils.parametrize, weight_norm,
    # spectral_norm): writing it would change a temporary only, so they stay in float (warning + note)
    skip_first = None if name_skip is None else {pnames[k] for k in name_skip if k in pnames}
    if skip_first is not None:  # a skipped attention / Conv1D module keeps its children too (MHA's out_proj)
        inside = tuple(k + "." for k in name_skip & kept_unexposed)
        skip_first |= {pnames[n] for n in pnames if inside and n.startswith(inside)}
    computed, checked = {}, set()
    for n, m in pmods.items():
        if m is None or (skip_first is not None and n in skip_first) or (skip_first is None and skip(n, m)):
            continue  # (the projections expose_linears creates are checked once they exist)
        why = _computed_weight(m) if weight_bits is not None else ""  # (an activation-only call reads no weight)
        if why:
            computed[n] = why
            continue
        check_layer(n, m)
        checked.add(id(m))
    if skip_first is not None:
        for n, m in pmods.items():
            if m is None and n not in skip_first:
                check_layer(n, None)
    # the projections expose_linears will create take their weights from a torch attention module: checked
    # there, before it is unfused (a NaN found once they exist left the attention unfused)
    if weight_bits is not None:
        for n, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention) and pmods.get(f"{n}.q_proj", 0) is None:
                bad = [pn for pn, p in m.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
                if bad:
                    raise ValueError(f"layer {n!r}: its {bad[0]} contains NaN or Inf")

    # Every pass runs in eval mode: in train() mode each calibration pass would update the BatchNorm
    # running statistics (and sample dropout masks). Each module's own mode is given back at the end.
    calls = {}
    if need_data:  # one calibration batch through the untouched model: a bad input fails here, not mid-way
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            calls = _check_forward(model, [(n, m) for n, m in pmods.items() if m is not None], calib_data, batch_size,
                                   distill_steps)
        finally:
            for m, was in modes:
                m.train(was)

    # torch's attention reads its fused weights directly (in_proj was never quantized, out_proj saw no
    # calibration input): its projections become Linear submodules (the same function), and transformers'
    # Conv1D layers nn.Linear, unless skipped by name
    with torch.inference_mode(False):  # (the projections it creates must be normal tensors, as the rest below)
        exposed = expose_linears(model, None if callable(skip) else (lambda n, s=name_skip: n in s))
    # a module registered twice (``self.classifier = self.head``) is listed once, under its first name, but
    # skip may use either: skip_first holds the first names (_layer_names predicted the exposed model's)
    skip_fn = skip if callable(skip) else (lambda n, m: n in skip_first)
    layers = [(n, m) for n, m in quantizable_layers(model) if not skip_fn(n, m) and n not in computed]
    for n, m in layers:
        if id(m) not in checked:  # the new projections (under a predicate skip: known only now)
            check_layer(n, m)
    if computed:
        warnings.warn(f"fake_quantize_model_: {len(computed)} layer(s) stay in float, their weight is computed from "
                      "other parameters, which quantization would not change: "
                      + "; ".join(f"{n!r}: {w}" for n, w in list(computed.items())[:3])
                      + (" ..." if len(computed) > 3 else ""), stacklevel=2)
    noop = sorted(set(layer_bits) - {n for n, _ in layers})
    if noop and weight_bits is not None:
        warnings.warn(f"fake_quantize_model_: layer_bits names layer(s) that stay in float (skipped): {noop}",
                      stacklevel=2)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    # inference mode off for the whole call (the biases it creates, the KD / AdaRound autograd): entered here
    # rather than as a decorator, which would add a frame that the warnings' stacklevel does not count
    no_inference = torch.inference_mode(False)
    no_inference.__enter__()
    stage = None  # what runs now, for the error message of a failure mid-way
    try:
        if need_data and exposed:  # the call counts of the modules expose_linears created
            calls = _check_forward(model, layers, calib_data, batch_size, 0)
        report = {"layers": [n for n, _ in layers], "group_sizes": {}, "notes": {}, "block_lists": ()}
        for n, why in computed.items():
            report["notes"][n] = f"not quantized: {why}"
        # other weight layers with a conv's semantics (Conv1d / Conv3d / ConvTranspose*) stay in float:
        # say so, rather than leave the model half quantized without a word
        other = [(n, type(m).__name__) for n, m in model.named_modules()
                 if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d)]
        if other:
            warnings.warn("fake_quantize_model_: not quantized (only Conv2d / Linear are): "
                          + ", ".join(f"{n!r} ({t})" for n, t in other), stacklevel=2)
            for n, t in other:
                report["notes"][n] = f"not quantized: {t} (only Conv2d / Linear are)"
        if weight_bits is not None:
            data_w = uses_data or bias_correction or fp_target
            fp_model = fp_mods = fcache = None
            if fp_target:  # the float reference: a copy of the model as it is now (before any layer is quantized)
                import copy

                fp_model = copy.deepcopy(model)
                remove_act_quantizers(fp_model)  # (an earlier activation-only call's; the targets are float)
                fp_mods = dict(fp_model.named_modules())
            mu_fp = _fp_means(model, layers, calib_data, batch_size) if bias_correction else None
            gen = torch.Generator().manual_seed(seed)
            opts = {"damp": damp, "act_order": act_order, "erq_lambda": erq_lambda, "clip": clip,
                    "ada_iters": adaround_iters, "ada_lr": adaround_lr, "ada_lambda": adaround_lambda}
            bar = _progress(layers, progress, f"W{weight_bits} {method}")
            codes = {}
            teacher = _logits_of(model, calib_data, batch_size) if distill_steps else None
            plans, active, cache = [], None, None  # the block lists whose inputs are cached; the one in use, its inputs
            if data_w and block_cache:
                batches = list(_batches(calib_data, batch_size))
                with torch.no_grad():
                    plans, _ = plan_blocks(model, [(n, [], m) for n, m in layers], lambda: model(batches[0]),
                                           [lambda xb=xb: model(xb) for xb in batches[1:]])
                plans = fitting("fake_quantize_model_", plans, len(batches), 2 if fp_target else 1)
            report["block_lists"] = tuple(p.name for p in plans)
            clamped = []  # layers whose HQQ min-max init hit hqq's clamps, with the fraction of groups
            tiny = []  # layers whose group size fell far below the one asked for (a prime K: g = 1)
            # A weight tensor two layers share (``b.weight = a.weight``) is quantized once, at its first layer; the
            # others take that result (a second solver run, e.g. GPTQ with the other layer's Hessian, re-quantized
            # the already quantized tensor and left the first layer's qparams describing a weight it no longer had)
            holders = Counter(id(m.weight) for _, m in layers)
            tied_done = {}  # id(weight) -> (first layer's name, its qparams, the float weight for bias correction)
            for idx, (name, mod) in enumerate(bar):
                stage = (idx, name)
                st = None
                meth = depthwise_method if (depthwise_method and _is_depthwise(mod)) else method
                first = tied_done.get(id(mod.weight))
                solve = first is None  # (a later holder of a shared weight needs its statistics only for the bias)
                if data_w and ((meth in ("gptq", "erq", "adaround") or fp_target) and solve or bias_correction):
                    blocks = None
                    # a layer run more than once per forward (a shared block) takes every call's stats, and
                    # some calls may lie outside its block (the block run again after the list): rerun the model
                    plan = next((p for p in plans if p.first <= idx <= p.last), None)
                    if plan is not None and calls.get(id(mod), 0) <= 1:
                        with torch.no_grad():
                            if plan is not active:  # the first layer in these blocks: every batch's input to block 0
                                active, cache = plan, BlockInputs(plan)
                                cache.capture([lambda xb=xb: model(xb) for xb in batches])
                                why = cache.why
                                if fp_model is not None:  # the float copy's inputs to the same blocks
                                    fcache = BlockInputs(plan, list(fp_model.get_submodule(plan.name)))
                                    fcache.capture([lambda xb=xb: fp_model(xb) for xb in batches])
                                    why = why or fcache.why
                                if why is not None:
                                    warnings.warn(f"fake_quantize_model_: {plan.name or 'the model'}: {why}; its "
                                                  "layers' calibration passes rerun the model from its start",
                                                  stacklevel=2)
                                    plans.remove(plan)
                                    report["block_lists"] = tuple(p.name for p in plans)
                                    plan = active = cache = fcache = None
                            if cache is not None:
                                cache.advance(plan.block_of[id(mod)])  # (earlier blocks are final by now)
                                if fcache is not None:
                                    fcache.advance(plan.block_of[id(mod)])
                        blocks = cache
                    fpair = None if (fp_model is None or not solve) else (fp_model, fp_mods[name],
                                                                          None if blocks is None else fcache)
                    st = _collect(model, mod, calib_data, batch_size, stop=calls.get(id(mod), 0) <= 1, blocks=blocks,
                                  fp=fpair, hessian=solve and meth in ("gptq", "erq", "adaround"),
                                  max_rows=max_rows if (solve and meth == "erq" and not _is_depthwise(mod)) else 0,
                                  gen=gen)
                if active is not None and idx == active.last:  # past the blocks: free their cached inputs
                    active = cache = fcache = None
                if not solve:
                    fname, codes[mod], W_fp = first
                    report["group_sizes"][name] = report["group_sizes"][fname]
                    report["notes"][name] = f"shares its weight with {fname!r}: quantized once, there"
                    if bias_correction and st.n and mu_fp[id(mod)] is not None:
                        with torch.no_grad():
                            b = mod.bias.detach().float() if mod.bias is not None else None
                            _set_bias(mod, _corrected_bias(mod.weight.detach().float().reshape(W_fp.shape), W_fp,
                                                           st, mu_fp[id(mod)], b))
                    continue
                bits = layer_bits.get(name, weight_bits)
                W = mod.weight
                lopts = opts
                no_input = st is not None and st.n == 0  # never reached by the calibration forward (an unused layer)
                fell_back = no_input and meth in data_methods
                if fell_back:
                    warnings.warn(f"fake_quantize_model_: layer {name!r} saw no calibration input; using RTN for it",
                                  stacklevel=2)
                    meth = "rtn"
                    if bits not in HQQ_BITS:  # rtn's min-max params come from the HQQ kernel; the clip search takes any bits
                        lopts = dict(opts, clip="mse")
                elif no_input:  # (rtn / hqq need no data: only the bias correction is left out)
                    warnings.warn(f"fake_quantize_model_: layer {name!r} saw no calibration input; no bias correction "
                                  "for it", stacklevel=2)
                fit = _fp_target_fit(mod, st, fp_target_damp) if fp_target and not no_input else None
                Wq, new_b, note, qsz = _quantize_layer(mod, bits, meth, group_size, st, lopts, fit)
                g = group_size_for(Wq.shape[1], group_size)
                if g <= 2 and g < min(Wq.shape[1], group_size if group_size not in (None, -1) else Wq.shape[1]):
                    tiny.append(f"{name!r} (K={Wq.shape[1]}: g{g})")
                if meth == "hqq" or (meth in ("rtn", "adaround") and lopts["clip"] != "mse"):  # HQQ's min-max init
                    frac = init_clamp_fraction(W.detach().reshape(W.shape[0], -1), bits,
                                               group_size_for(Wq.shape[1], group_size))
                    if frac > 0:
                        clamped.append(f"{name!r} ({frac:.1%})")
                if no_input:
                    note = "no calibration input: " + ("RTN" if fell_back else "no bias correction")
                codes[mod] = qsz
                report["group_sizes"][name] = group_size_for(Wq.shape[1], group_size)
                if note:
                    report["notes"][name] = note
                with torch.no_grad():
                    b_orig = mod.bias.detach().float().clone() if mod.bias is not None else None
                    if new_b is not None:
                        _set_bias(mod, new_b)
                    W_fp = W.detach().float().reshape(W.shape[0], -1)
                    if bias_correction and not (meth == "erq" and new_b is not None) and st.n and mu_fp[id(mod)] is not None:
                        # (ERQ fitted the bias already; a layer without calibration input has no mean to correct)
                        # (after fp_target's fit: from the layer's own bias, since the shift is measured against
                        # the float layer; the fitted bias only carried the mean of the weights it replaced)
                        b = b_orig if fit is not None else (mod.bias.detach().float() if mod.bias is not None else None)
                        _set_bias(mod, _corrected_bias(Wq, W_fp, st, mu_fp[id(mod)], b))
                    if holders[id(W)] > 1:
                        tied_done[id(W)] = (name, qsz, W_fp.clone() if bias_correction else None)
                    W.copy_(Wq.reshape(W.shape).to(W.dtype))
            stage = None
            if tiny:
                warnings.warn(f"fake_quantize_model_: {len(tiny)} layer(s) get tiny groups (the largest divisor of K "
                              f"that is <= group_size={group_size}) of 1 or 2 weights, which min-max params keep (nearly) "
                              f"exact: quantization is in effect off there: {', '.join(tiny[:3])}{' ...' if len(tiny) > 3 else ''}; "
                              "skip them or give another group_size", stacklevel=2)
            if clamped:
                warnings.warn(f"fake_quantize_model_: {len(clamped)} layer(s) have groups whose weight range is below "
                              "hqq's thresholds (range <= 1e-4 -> scale 1, 1/scale capped at 2e4: the min-max init "
                              "of 'rtn' / 'hqq'), which quantize far more coarsely than min-max, e.g. "
                              f"{', '.join(clamped[:3])}; clip='mse' (rtn) or 'gptq' keep them", stacklevel=2)
        if weight_bits is not None and distill_steps and not layers:
            warnings.warn("fake_quantize_model_: distill_steps: no layer was quantized (all skipped or kept in "
                          "float), nothing to distill", stacklevel=2)
        elif weight_bits is not None and distill_steps:
            stage = "distill"
            extra = []
            if distill_bias:
                extra = [m.bias for _, m in layers if m.bias is not None]
                extra += [m.bias for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None]
            report["distill"] = distill_qparams_(model, codes, torch.cat(list(_batches(calib_data, batch_size))), teacher,
                                                 steps=distill_steps, batch_size=distill_batch, lr=distill_lr, seed=seed,
                                                 extra_params=extra)
        if weight_bits is not None and return_qparams:
            report["qparams"] = {n: codes[m] for n, m in layers}
        if act_bits is not None:
            stage = "act"
            act_layers = [(n, m) for n, m in quantizable_layers(model) if not skip_fn(n, m)]  # (computed ones too)
            _add_act_quantizers(model, act_layers, act_bits, act_method, calib_data, batch_size, report["notes"])
    except Exception as e:  # a failure mid-way: say where, and what was already written
        if stage == "distill":
            e.add_note("fake_quantize_model_: every layer was quantized (weights written in place) before the "
                       "distillation failed; the distillation's changes were taken out (the weights and biases are "
                       "those of the quantization)")
        elif stage == "act" and weight_bits is not None:
            e.add_note("fake_quantize_model_: the weights were quantized (in place) before the activation "
                       "calibration failed; its input quantizers were removed")
        if not isinstance(stage, tuple):
            raise
        i, n = stage
        msg = (f"fake_quantize_model_: layer {n!r} ({i + 1} of {len(layers)}): {e}"
               + ("; the layers before it were already quantized in place (the model is partly quantized: start "
                  "again from a float copy)" if i else "; no weight was changed yet"))
        try:
            err = type(e)(msg)
        except Exception:  # (an exception type that does not take one message)
            err = None
        if err is None:
            e.add_note(msg)
            raise
        raise err from e
    finally:
        for m, was in modes:
            m.train(was)
        no_inference.__exit__(None, None, None)
    report["seconds"] = time.perf_counter() - t0
    return report


def _check_forward(model, layers, calib_data, batch_size, distill_steps) -> dict:
    """One calibration batch through the (untouched, eval-mode) model; returns ``{id(layer): calls}``.

    A bad input fails here, not after some layers were quantized. The call counts find modules
    run more than once per forward (shared blocks): their stats must come from every call.
    """
    calls = {id(m): 0 for _, m in layers}

    def count(m, args, kwargs):
        calls[id(m)] += 1

    hs = [m.register_forward_pre_hook(count, with_kwargs=True) for _, m in layers]
    try:
        with torch.no_grad():
            out = model(next(iter(_batches(calib_data, batch_size))))
    except Exception as e:  # a bad input: say which argument (the error keeps its type)
        e.add_note("fake_quantize_model_: the model's forward failed on the first batch of calib_data "
                   "(nothing was changed)")
        raise
    finally:
        for h in hs:
            h.remove()
    if distill_steps and not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 2):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"distill_steps needs a model that returns a float logits tensor [B, C, ...], got {shape}")
    return calls


def _logits_of(model, calib_data, batch_size) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(xb) for xb in _batches(calib_data, batch_size)])


def _corrected_bias(Wq, W_fp, st, mu_fp, b) -> torch.Tensor:
    """Bias correction: ``b - (Wq mu_q - W_fp mu_fp)``, per channel (``b`` None: zeros). Wq, W_fp: [O, K] fp32."""
    if st.dw:
        shift = (Wq * st.mu).sum(1) - (W_fp * mu_fp).sum(1)
    else:
        shift = Wq @ st.mu - W_fp @ mu_fp
    return (b if b is not None else torch.zeros(Wq.shape[0], device=Wq.device)) - shift


def _set_bias(mod, b: torch.Tensor):
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype, device=mod.weight.device))
    mod.bias.copy_(b.to(mod.bias.dtype))


def _progress(it, on: bool, desc: str):
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)
