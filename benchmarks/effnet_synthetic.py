"""Synthetic calibration images for EfficientNet-Lite0 W4 from BatchNorm-statistics matching.

``python -m benchmarks.effnet_synthetic [--n 128] [--steps 200] [--batch 16] [--lr 0.1] [--ce 0]
[--seed 0] [--sets real,real+syn] [--threads 1] [--generate-only]``

Hypothesis: the W4 KL floor of the best method (GPTQ dense + HQQ depthwise + KD of the group
scales / zeros + BN biases, ``quantkern.demo``'s ``hybrid_kd`` row) is the coverage of the 256
calibration crops of 11 photos; images generated from the fp32 model itself add coverage.

Generation (the idea of ZeroQ, Cai et al. 2020; optionally the cross-entropy term of GDFQ /
Genie; implemented here from the papers' description): a batch of ``--batch`` images starts as
Gaussian noise in the model's input space (``[-1, 1]``, as ``efficientnet_preprocess``). A
forward pre-hook on every ``BatchNorm2d`` takes the per-channel mean and standard deviation of
the layer's input over the batch and the spatial positions; the loss is the sum over layers of
``||mean - running_mean||^2 + ||std - sqrt(running_var + eps)||^2`` (the paper's formula), plus
``--ce`` times the cross entropy of the logits towards random target classes. The pixels are
optimised with Adam (``--lr``, cosine decay to 0) for ``--steps`` steps, clamped to ``[-1, 1]``
after each step; ``--jitter P`` also shifts the batch by a random offset of up to ``P`` pixels
(circular) and flips it with p 0.5 at each step. Every batch is cached in ``--cache``
(``/tmp/synth``) under a name built from all generation settings and the batch index, so a
larger ``--n`` with the same settings reuses the batches already made.

Evaluation: the model, the calibration crops ``Xc`` (256 crops of 11 photos, seed 0, jitter),
the evaluation crops ``Xe`` (256 crops of 7 other photos, seed 1) and the metrics come from
``quantkern.demo`` (``_images``, ``_crops``, ``_logits``, ``_agree_kl``). For each calibration set
of ``--sets`` (``real``: Xc; ``real+syn``: Xc followed by the synthetic images; ``syn``: the
synthetic images only) one model is quantized with
``fake_quantize_model_(m, 4, "gptq", 64, calib_data=X, depthwise_method="hqq", distill_steps=150,
distill_batch=8, distill_lr=3e-4, distill_bias=True)`` in this process (same thread count), and a
markdown table is printed: top-1 agreement with fp32, mean KL(fp32 || q), agreement on the
crops where fp32's top-1 probability is > 0.5, quantization time, and the KD loss on the
calibration set (first -> last).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._harness import comma_list, nonneg_int, one_of, positive_int

SETS = ("real", "real+syn", "syn")
# the demo's best all-W4 row (``hybrid_kd``)
QUANT = dict(weight_bits=4, method="gptq", group_size=64, depthwise_method="hqq", distill_steps=150,
             distill_batch=8, distill_lr=3e-4, distill_bias=True)


def _positive_float(s: str) -> float:
    v = float(s)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite float > 0, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite float >= 0, got {s!r}")
    return v


def bn_matching_batch(model: nn.Module, batch: int, steps: int, lr: float, ce: float = 0.0, jitter: int = 0,
                      res: int = 224, seed: int = 0, log=None) -> tuple[torch.Tensor, dict]:
    """One batch of ``batch`` synthetic inputs ``[batch, 3, res, res]`` in ``[-1, 1]`` (module docstring).

    Returns (images, info): info has ``bn_first`` / ``bn_last`` (BN loss at the first / last step),
    ``ce_last`` (cross entropy at the last step, also when ``ce`` is 0) and ``seconds``.
    """
    g = torch.Generator().manual_seed(seed)
    x = (0.5 * torch.randn(batch, 3, res, res, generator=g)).clamp_(-1, 1).requires_grad_(True)
    target = torch.randint(0, 1000, (batch,), generator=g)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ValueError("bn_matching_batch: the model has no BatchNorm2d layer")
    terms: list[torch.Tensor] = []

    def hook(m, args):
        a = args[0].float()
        mu = a.mean((0, 2, 3))
        sd = (a.var((0, 2, 3), unbiased=False) + m.eps).sqrt()
        terms.append((mu - m.running_mean).pow(2).sum() + (sd - (m.running_var + m.eps).sqrt()).pow(2).sum())

    was = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in was:
        p.requires_grad_(False)
    hooks = [m.register_forward_pre_hook(hook) for m in bns]
    was_training = model.training
    model.eval()
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    info, t0 = {}, time.perf_counter()
    try:
        for i in range(steps):
            xi = x
            if jitter:
                dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
                xi = torch.roll(xi, (dy, dx), (2, 3))
                if torch.rand((), generator=g).item() < 0.5:
                    xi = xi.flip(3)
            terms.clear()
            logits = model(xi)
            bn = torch.stack(terms).sum()
            ce_loss = F.cross_entropy(logits, target)
            loss = bn + ce * ce_loss if ce else bn
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(-1, 1)
            if i == 0:
                info["bn_first"] = bn.item()
            if log and (i % max(1, steps // 5) == 0 or i == steps - 1):
                log(f"    step {i:4d}: BN loss {bn.item():10.3f}  CE {ce_loss.item():.3f}")
        info.update(bn_last=bn.item(), ce_last=ce_loss.item(), seconds=time.perf_counter() - t0)
    finally:
        for h in hooks:
            h.remove()
        for p, r in was:
            p.requires_grad_(r)
        model.train(was_training)
    return x.detach(), info


def synthetic_images(model, n: int, steps: int, batch: int, lr: float, ce: float, jitter: int, seed: int,
                     cache: str, log=print) -> tuple[torch.Tensor, float]:
    """``n`` synthetic images (``ceil(n / batch)`` batches, cached); returns (images [n, 3, 224, 224],
    seconds spent generating in this call, 0 when all batches came from the cache)."""
    os.makedirs(cache, exist_ok=True)
    key = f"bn_s{steps}_b{batch}_lr{lr:g}_ce{ce:g}_j{jitter}_seed{seed}"
    out, spent = [], 0.0
    for b in range((n + batch - 1) // batch):
        path = os.path.join(cache, f"{key}_batch{b}.pt")
        if os.path.exists(path):
            out.append(torch.load(path, weights_only=True))
            continue
        log(f"  generating batch {b} ({key})")
        x, info = bn_matching_batch(model, batch, steps, lr, ce, jitter, seed=seed * 100003 + b, log=log)
        spent += info["seconds"]
        log(f"  batch {b}: {info['seconds']:.1f} s ({1000 * info['seconds'] / (batch * steps):.0f} ms per image-step), "
            f"BN loss {info['bn_first']:.1f} -> {info['bn_last']:.2f}, CE {info['ce_last']:.3f}")
        torch.save(x, path)
        out.append(x)
    return torch.cat(out)[:n], spent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=positive_int, default=128, help="number of synthetic images (default 128)")
    ap.add_argument("--steps", type=positive_int, default=200, help="Adam steps per batch (default 200)")
    ap.add_argument("--batch", type=positive_int, default=16, help="images per generated batch (default 16)")
    ap.add_argument("--lr", type=_positive_float, default=0.1, help="Adam step size on the pixels (default 0.1)")
    ap.add_argument("--ce", type=_nonneg_float, default=0.0,
                    help="weight of the cross entropy towards random classes (default 0: BN statistics only)")
    ap.add_argument("--jitter", type=nonneg_int, default=0, help="random shift (pixels) + flip per step (default 0: off)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    ap.add_argument("--sets", type=comma_list(one_of(SETS)), default=["real", "real+syn"],
                    help=f"calibration sets to evaluate, comma list of {', '.join(SETS)} (default real,real+syn)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cache", default="/tmp/synth", help="folder of the cached synthetic batches")
    ap.add_argument("--generate-only", action="store_true", help="generate (and cache) the images, then stop")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from quantkern.demo import _agree_kl, _crops, _images, _logits
    from quantkern.ptq.conv import fake_quantize_model_
    from quantkern.ptq.models import load_efficientnet_lite0

    def log(s):
        print(s, flush=True)

    model = load_efficientnet_lite0("cpu")
    Xs = None
    if a.generate_only or any(s != "real" for s in a.sets):  # (--sets real generated them for nothing: minutes)
        Xs, t_gen = synthetic_images(model, a.n, a.steps, a.batch, a.lr, a.ce, a.jitter, a.seed, a.cache, log)
        with torch.no_grad():
            Ps = _logits(model, Xs).softmax(1)
        log(f"synthetic: {a.n} images, {t_gen:.0f} s generated now; fp32 on them: median top-1 probability "
            f"{Ps.amax(1).median():.3f}, {len(set(Ps.argmax(1).tolist()))} distinct top-1 classes")
    if a.generate_only:
        return
    cal, ev = _images()
    Xc, Xe = _crops(cal, 256, seed=0, jitter=True), _crops(ev, 256, seed=1)
    L0 = _logits(model, Xe)
    n_conf = int((L0.softmax(1).amax(1) > 0.5).sum())
    data = {"real": Xc, "real+syn": torch.cat([Xc, Xs]) if Xs is not None else None, "syn": Xs}
    label = {"real": f"real: {Xc.shape[0]} crops of {len(cal)} photos",
             "real+syn": f"real + synthetic: {Xc.shape[0]} + {a.n}", "syn": f"synthetic only: {a.n}"}
    rows = []
    for s in a.sets:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = fake_quantize_model_(m, calib_data=data[s], progress=False, **QUANT)
        tq = time.perf_counter() - t0
        agree, kl, agree_c, _ = _agree_kl(_logits(m, Xe), L0)
        d = rep.get("distill", {})
        rows.append(f"| {label[s]} | {100 * agree:.1f}% | {kl:.4f} | {100 * agree_c:.1f}% | {tq:.0f} | "
                    f"{d.get('loss_first', float('nan')):.3f} -> {d.get('loss_last', float('nan')):.3f} |")
        log(rows[-1])
    print(f"\nEfficientNet-Lite0 W4 g<=64, GPTQ dense + HQQ depthwise + KD of scales/zeros + BN biases "
          f"(150 steps, batch 8, lr 3e-4), {a.threads} thread(s). Synthetic: BN-statistics matching, {a.steps} Adam "
          f"steps, batch {a.batch}, lr {a.lr:g}, CE weight {a.ce:g}, jitter {a.jitter}, seed {a.seed}. Evaluation: "
          f"256 crops of {len(ev)} photos (fp32 confident on {n_conf}).\n")
    print(f"| calibration set | top-1 agreement | mean KL(fp32‖q) | agreement, confident crops ({n_conf}) | "
          f"quant s | KD loss on calib set |\n|---|--:|--:|--:|--:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
