"""Learned rounding (AdaRound-style) for group-wise weight quantization, layer by layer.

Given fixed group params ``(scale, zero)`` (e.g. HQQ's) and the second moment of the
layer input ``H = E[x x^T]``, choose for every weight whether it rounds down or up,

    q = clamp(floor(w / s + z) + r, 0, 2^bits - 1),   r in {0, 1},

to minimise the layer's output error ``tr((Wq - W) H (Wq - W)^T)`` instead of each
weight's own rounding error (round-to-nearest). The binary ``r`` is relaxed to
``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (a rectified sigmoid, ``zeta =
1.1``, ``gamma = -0.1``), initialised at the nearest-rounding fraction, and optimised with Adam
on ``rec(V) / rec_0 + lam * mean(1 - |2 h(V) - 1|^beta)``: the regulariser, switched on after
a warm-up and with ``beta`` annealed from 20 to 2, pushes every ``h`` to 0 or 1. Then ``r =
[h >= 0.5]``.

Normalisation. AdaRound (Nagel et al. 2020) minimises ``||W X - W~ X||_F^2 + lam * sum(reg)`` with
``lam = 0.01`` against an unnormalised squared error. Here the reconstruction is divided by its value
at round-to-nearest and the regulariser averaged over the ``N`` weights, which is the paper's form
with the reconstruction measured per weight (``rec * N / rec_0``, each weight's share of the RTN error
~1) and the same ``lam``: that ``lam`` does not depend on the layer's size or the data's scale, but
it is not the paper's number. ``lam = 0.01`` (the default before 2026-12) left the relaxation soft
(most ``h`` strictly between 0 and 1 after 300 steps) and the thresholded result was round-to-nearest;
``lam = 100`` with ``lr = 3e-2`` (the defaults) ends with 96-99% of ``h`` at exactly 0 or 1 and the
layer error at 0.07-1.0x RTN's (mean 0.58) on the 11 layers of a small depthwise CNN (RTN's params,
300 steps; ``info`` reports both). The result is exact integer codes: the dequantized weight is ``(q - zero) * scale``.

Dense layers share one ``H [K, K]`` over the rows of ``W [O, K]``; depthwise convs pass
one ``H [C, k, k]`` per row (channel). The reconstruction term is evaluated through a
factor ``H = F F^T`` (eigendecomposition; rank-deficient ``H``, e.g. a classifier fed
fewer samples than inputs, gets a thin factor), so one step costs ``O * K * rank``.

The nearest-rounding codes are kept if the learned rounding ends with a larger
objective (never worse than round-to-nearest with the same params on the layer objective).

Written for this project (no code taken from the AdaRound / BRECQ reference implementations).
"""
from __future__ import annotations

import math
import numbers

import torch

from ._wquant import check_weight_args

__all__ = ["adaround_quantize", "layer_error"]

_ZETA, _GAMMA = 1.1, -0.1


def _h(V: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(V) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def _factor(H: torch.Tensor, rel_tol: float = 1e-7) -> torch.Tensor:
    """F with ``F F^T = H`` (symmetric PSD ``[K, K]`` or ``[C, k, k]``); dense H: thin (drops null directions)."""
    H = 0.5 * (H + H.transpose(-1, -2)).double()
    evals, evecs = torch.linalg.eigh(H)
    evals = evals.clamp_min(0)
    if H.dim() == 2:
        keep = evals > rel_tol * float(evals.max().clamp_min(1e-300))
        evals, evecs = evals[keep], evecs[:, keep]
    return (evecs * evals.sqrt().unsqueeze(-2)).float()


def layer_error(D: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``tr(D H D^T)`` with ``H = F F^T``: dense ``D [O, K]``, ``F [K, r]``; depthwise ``D [C, k]``, ``F [C, k, k]``."""
    if F.dim() == 2:
        P = D @ F
    else:
        P = torch.einsum("ck,ckr->cr", D, F)
    return (P * P).sum()


@torch.inference_mode(False)  # (called under inference_mode: the relaxation still needs autograd)
def adaround_quantize(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      iters: int = 300, lr: float = 3e-2, lam: float = 100.0, beta: tuple[float, float] = (20.0, 2.0),
                      warmup: float = 0.2, init_q: torch.Tensor | None = None, info: dict | None = None):
    """Learned up/down rounding of ``W`` with fixed group params (module docstring).

    Args:
        W: ``[O, K]`` float weights.
        H: ``[K, K]`` (one for all rows) or ``[O, K, K]`` (one per row, depthwise convs), symmetric
            PSD, any positive scale (e.g. GPTQ's ``2 X^T X / T``).
        scale, zero: ``[O, G]`` float group params (``G`` divides ``K``; groups contiguous along K),
            the format of :func:`~quantkern.ptq.hqq_quantize` (float zero allowed).
        bits: 1..8.
        iters: Adam steps (0: round to nearest with these params). lr: Adam step size on V.
        lam: weight of the rounding regulariser (the reconstruction term is normalised to 1 at
            round-to-nearest, the regulariser is a mean over the weights: module docstring, "Normalisation";
            below ~10 the relaxation stays soft and the result is close to round-to-nearest). beta: its annealed exponent (start, end). warmup: fraction of
            the steps without the regulariser.
        init_q: optional ``[O, K]`` codes to compare against at the end (e.g. another
            method's); the candidate with the lowest objective is returned.
        info: optional dict, filled with ``soft_fraction`` (the fraction of ``h`` strictly between
            0 and 1 after the last step; None without steps), ``error`` (the layer objective of the
            result relative to round-to-nearest's) and ``chosen`` ("adaround", "nearest" or "init_q").

    Returns:
        ``(q uint8 [O, K], scale, zero)`` with ``q`` in ``[0, 2^bits - 1]``; the dequantized
        weight is ``(q - zero) * scale`` (``scale``, ``zero`` returned unchanged, float32).
    """
    fn = "adaround_quantize"
    check_weight_args(fn, W, bits, None)
    O, K = W.shape
    if H.dim() == 2 and tuple(H.shape) != (K, K) or H.dim() == 3 and tuple(H.shape) != (O, K, K) or H.dim() not in (2, 3):
        raise ValueError(f"{fn}: H must be [K, K] or [O, K, K] with O, K = {O}, {K}, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):  # the factorisation would drop every direction: plain RTN, silently
        raise ValueError(f"{fn}: H contains NaN or Inf (calibration inputs with NaN / Inf?)")
    if scale.dim() != 2 or scale.shape[0] != O or scale.shape[1] == 0 or K % scale.shape[1] or tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"{fn}: scale / zero must be [O, G] with G dividing K, got {tuple(scale.shape)}, {tuple(zero.shape)}")
    if not (scale.is_floating_point() and zero.is_floating_point()):
        raise TypeError(f"{fn}: scale / zero must be float tensors, got {scale.dtype}, {zero.dtype}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):  # w / scale would be inf / NaN: garbage codes
        raise ValueError(f"{fn}: scale must be finite and > 0")
    if not bool(torch.isfinite(zero).all()):
        raise ValueError(f"{fn}: zero contains NaN or Inf")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 0:
        raise ValueError(f"{fn}: iters must be an int >= 0, got {iters!r}")
    iters = int(iters)

    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if not (real(lr) and lr > 0):
        raise ValueError(f"{fn}: lr must be a finite float > 0, got {lr!r}")
    if not (real(lam) and lam >= 0):  # (NaN gave round-to-nearest without a word)
        raise ValueError(f"{fn}: lam must be a finite float >= 0, got {lam!r}")
    if not (real(warmup) and 0 <= warmup <= 1):
        raise ValueError(f"{fn}: warmup must be a fraction in [0, 1], got {warmup!r}")
    if not (isinstance(beta, (tuple, list)) and len(beta) == 2 and all(real(b) and b > 0 for b in beta)):
        raise ValueError(f"{fn}: beta must be (start, end), two finite floats > 0, got {beta!r}")
    maxq = 2**bits - 1
    if init_q is not None and (tuple(init_q.shape) != (O, K) or bool(((init_q < 0) | (init_q > maxq)).any())):
        raise ValueError(f"{fn}: init_q must be [O, K] = [{O}, {K}] codes in [0, {maxq}], got shape "
                         f"{tuple(init_q.shape)}")
    if init_q is not None and init_q.is_floating_point() and not bool((init_q == init_q.round()).all()):
        raise ValueError(f"{fn}: init_q must hold integer codes, got fractional values")  # (scored, then truncated)
    g = K // scale.shape[1]
    s = scale.float().repeat_interleave(g, 1)
    z = zero.float().repeat_interleave(g, 1)
    Wf = W.detach().float()
    Hf = H.detach().float()
    F = _factor(Hf)
    x = Wf / s + z
    base = torch.floor(x)
    rest = (x - base).clamp(0, 1)

    def deq(r):
        return (torch.clamp(base + r, 0, maxq) - z) * s

    def err(q):
        return float(layer_error((q - z) * s - Wf, F))

    q_near = torch.clamp(torch.round(x), 0, maxq)  # (half to even, as every rounding here)
    cands = [(err(q_near), q_near)]
    if init_q is not None:
        qi = init_q.float()
        cands.append((err(qi), qi))
    rec0 = max(cands[0][0], 1e-30)
    if iters > 0:
        # h(V) = rest at the start: sigmoid(V) = (rest - gamma) / (zeta - gamma)
        p = ((rest - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        V = torch.log(p / (1 - p)).requires_grad_(True)
        opt = torch.optim.Adam([V], lr=lr)
        n_warm = int(warmup * iters)
        with torch.enable_grad():
            for it in range(iters):
                h = _h(V)
                loss = layer_error(deq(h) - Wf, F) / rec0
                if it >= n_warm:
                    t = (it - n_warm) / max(1, iters - n_warm)
                    b = beta[0] + (beta[1] - beta[0]) * t
                    loss = loss + lam * (1 - (2 * h - 1).abs().pow(b)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            hv = _h(V)
            q_ada = torch.clamp(base + (hv >= 0.5).float(), 0, maxq)
            soft = float(((hv > 0) & (hv < 1)).float().mean())
        cands.append((err(q_ada), q_ada))
    best = min(range(len(cands)), key=lambda i: cands[i][0])
    if info is not None:
        kinds = ["nearest"] + (["init_q"] if init_q is not None else []) + (["adaround"] if iters > 0 else [])
        info.update(soft_fraction=soft if iters > 0 else None, error=cands[best][0] / rec0, chosen=kinds[best])
    return cands[best][1].to(torch.uint8), scale.float(), zero.float()


class _FixedCodeWeight(torch.nn.Module):
    """Parametrization ``weight = (q - (z0 + dz)) * s0 * exp(a)`` with fixed integer codes q."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape):
        super().__init__()
        self.g = q.shape[1] // scale.shape[1]
        self.shape = tuple(shape)
        self.register_buffer("q", q.float())
        self.register_buffer("s0", scale.float())
        self.register_buffer("z0", zero.float())
        self.a = torch.nn.Parameter(torch.zeros_like(self.s0))
        self.dz = torch.nn.Parameter(torch.zeros_like(self.z0))

    def params(self):
        return self.s0 * torch.exp(self.a), self.z0 + self.dz

    def forward(self, W):  # noqa: ARG002  (the float weight is replaced)
        s, z = self.params()
        g = self.g
        return ((self.q - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)).reshape(self.shape).to(W.dtype)


@torch.inference_mode(False)
def distill_qparams_(model: torch.nn.Module, codes: dict, calib_data: torch.Tensor, teacher_logits: torch.Tensor,
                     steps: int = 100, batch_size: int = 8, lr: float = 3e-4, seed: int = 0,
                     extra_params=()) -> dict:
    """Tunes the group scales and zeros of already-quantized layers end to end, codes fixed.

    ``codes``: ``{module: (q [O, K], scale [O, G], zero [O, G])}`` (the result of a weight
    quantizer; the module's weight is ``(q - zero) * scale`` reshaped). Every module's
    weight becomes ``(q - zero') * scale'`` with ``scale' = scale * exp(a)``, ``zero' = zero + dz``
    (``a``, ``dz`` per group, 0 at the start), trained with Adam to minimise KL(teacher || model)
    of the output logits on random batches of ``calib_data`` (``teacher_logits`` = the fp32
    model's logits on it). The integer codes never change, so the result stays exactly on the
    quantization grid. Other parameters are frozen; the model is left in eval mode (BatchNorm
    statistics unchanged). ``extra_params``: other float parameters trained along (e.g. the
    BatchNorm biases; same optimiser and step size). Returns ``{"loss_first", "loss_last"}`` (means over the first /
    last ``min(10, steps // 2)`` steps, at least one) and writes the final weights (and returns ``codes`` updated in place).
    If a step fails, the weights and ``extra_params`` are given back as they came in, and the error raised.
    Modules that share one weight tensor must come with equal codes; they train one set of scales / zeros.
    ``codes`` that do not describe their module's weight (shapes) raise ValueError before the model changes;
    each module's parameters keep their order.
    """
    from torch.nn.utils import parametrize

    if steps <= 0:
        return {}
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"distill_qparams_: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"distill_qparams_: lr must be a finite float > 0, got {lr!r}")
    # (checked before anything changes: a bad entry found while registering left the model half parametrized)
    first = {}  # id(weight) -> codes of its first module
    for mod, qsz in codes.items():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or not (isinstance(qsz, tuple) and len(qsz) == 3):
            raise ValueError(f"distill_qparams_: codes must map modules with a weight to (q, scale, zero), got "
                             f"{type(mod).__name__} -> {type(qsz).__name__}")
        q, s, z = qsz
        if (q.dim() != 2 or s.dim() != 2 or s.shape != z.shape or q.shape[0] != s.shape[0] or s.shape[1] == 0
                or q.shape[1] % s.shape[1] or q.numel() != w.numel()):
            raise ValueError(f"distill_qparams_: {type(mod).__name__} with weight {tuple(w.shape)}: codes of shapes "
                             f"q {tuple(q.shape)}, scale {tuple(s.shape)}, zero {tuple(z.shape)} do not describe it")
        f = first.setdefault(id(w), qsz)
        if f is not qsz and not all(torch.equal(a, b) for a, b in zip(f, qsz)):
            raise ValueError("distill_qparams_: two modules share one weight tensor but have different codes")
    gen = torch.Generator().manual_seed(seed)
    was = [(p, p.requires_grad) for p in model.parameters()]
    extra = list(extra_params)
    start = [p.detach().clone() for p in extra]  # (a failure gives them back, with the starting scales / zeros)
    pars, order, losses = {}, {}, []
    done = False
    try:  # from here on the parametrizations are always removed again
        for p, _ in was:
            p.requires_grad_(False)
        shared = {}  # id(weight) -> its parametrization: modules sharing a weight train one set of scales / zeros
        for mod, (q, s, z) in codes.items():
            pm = shared.get(id(mod.weight)) or _FixedCodeWeight(q, s, z, mod.weight.shape)
            shared[id(mod.weight)] = pm
            order[mod] = list(mod._parameters)
            parametrize.register_parametrization(mod, "weight", pm, unsafe=True)
            pars[mod] = pm
        params = [p for pm in shared.values() for p in (pm.a, pm.dz)]
        # fp16 / bf16 parameters are trained through float32 master copies (Adam's state and eps underflow in
        # fp16: the steps were NaN); the parameter gets the master's value, rounded, before every forward
        masters = []
        for p in extra:
            p.requires_grad_(True)
            if p.dtype in (torch.float16, torch.bfloat16):
                masters.append((p, p.detach().float().clone().requires_grad_(True)))
                params.append(masters[-1][1])
            else:
                params.append(p)
        model.eval()
        N = calib_data.shape[0]
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randperm(N, generator=gen)[:batch_size]
                out = model(calib_data[idx])
                t = teacher_logits[idx]
                loss = torch.nn.functional.kl_div(out.log_softmax(1), t.log_softmax(1), log_target=True,
                                                  reduction="batchmean")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, m32 in masters:
                    m32.grad = None if p.grad is None else p.grad.float()
                    p.grad = None
                opt.step()
                with torch.no_grad():
                    for p, m32 in masters:
                        p.copy_(m32)
                losses.append(float(loss.detach()))
        done = True
    finally:
        for p, p0 in zip(extra, start):  # (no gradients left behind on the model)
            p.grad = None
            if not done:
                with torch.no_grad():
                    p.copy_(p0)
        for mod, pm in pars.items():
            with torch.no_grad():
                if not done:  # a failure mid-way leaves the weights as they came in
                    pm.a.zero_()
                    pm.dz.zero_()
                s, z = pm.params()
                codes[mod] = (pm.q.to(torch.uint8), s.detach().clone(), z.detach().clone())
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
                for k in order[mod]:  # (removal appends the weight after the bias: keep the parameters' order)
                    mod._parameters[k] = mod._parameters.pop(k)
                g = pm.g
                Wq = (pm.q - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)
                mod.weight.copy_(Wq.reshape(mod.weight.shape).to(mod.weight.dtype))
        for p, r in was:
            p.requires_grad_(r)
    k = max(1, min(10, len(losses) // 2))  # disjoint windows (overlapping ones hid the change of short runs)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
