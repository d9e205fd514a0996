"""Reproduction of "Overcoming Oscillations in QAT" (Nagel et al. 2022) at toy scale.

A small MobileNetV2-style CNN (inverted residual blocks: 1x1 expand, 3x3 depthwise,
1x1 project) is trained in float on sklearn's load_digits (8x8 images, held-out
25% test split), then quantization-aware trained at W4A4 and W3A3 with LSQ
(first and last layer W8A8, as in the paper's setup) in three ways:

* LSQ                 plain QAT (the "after BN re-est." column is LSQ + BN re-estimation)
* + dampening         oscillation dampening loss, lambda 0 -> 0.1 (cosine, after 25%)
* + freezing          iterative weight freezing, threshold 0.1 -> 0.01 (4 bit) / 0.011 (3 bit)

Reported per method (mean +- std over seeds): test accuracy before and after BN
re-estimation, the fraction of oscillating weights at the end in depthwise and in
pointwise convs (frequency EMA, momentum 0.01, above 0.005: about one integer
reversal within the last ~70 steps; frozen weights do not oscillate), the frozen
fraction, and the time per training step. Also writes PNG plots of the latent
weights' distance to the bin edges (depthwise vs pointwise).

    python examples/oscillation_digits.py             # full: 3 seeds, a few minutes on 2 cores
    python examples/oscillation_digits.py --quick     # smoke test (seconds)
    # freezing settings: --momentum, --freeze-start, --freeze-end, --freeze-warmup; --osc-freq
    python examples/oscillation_digits.py --bits 3 --methods lsq,freeze --freeze-end 0.005

The quantized model is the float model with its layers swapped for
quantkern.nn.QuantConv2d / QuantLinear (``from_float``); quantkern.qat attaches to
them (OscillationTracker, DampeningLoss, schedules, reestimate_bn_stats).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantkern import qat
from quantkern.nn import QuantConv2d, QuantLinear


# ------------------------------------------------------------------ model (float)
def conv(cin, cout, k, act_signed, stride=1, groups=1):
    """Float conv; ``act_signed`` (is its input signed?) picks the input grid when quantized."""
    c = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
    c.act_signed = act_signed
    return c


class Block(nn.Module):
    def __init__(self, cin, cout, t, stride):
        super().__init__()
        mid = cin * t
        self.expand = conv(cin, mid, 1, act_signed=True) if t != 1 else None
        self.bn1 = nn.BatchNorm2d(mid) if t != 1 else None
        self.dw = conv(mid, mid, 3, act_signed=t == 1, stride=stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.project = conv(mid, cout, 1, act_signed=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        h = x if self.expand is None else F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        h = self.bn3(self.project(h))
        return x + h if self.res else h


class MobileNetV2Tiny(nn.Module):
    """stem 3x3 -> inverted residual blocks (t, c, n, s) = (1,8,1,1) (4,16,2,2) (4,24,2,2) (4,32,1,1)
    -> 1x1 conv 64 -> avgpool -> linear. Float; see :func:`quantize`."""

    def __init__(self):
        super().__init__()
        self.stem = conv(1, 8, 3, act_signed=True)
        self.bn0 = nn.BatchNorm2d(8)
        cfg, blocks, cin = [(1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1)], [], 8
        for t, c, n, s in cfg:
            for i in range(n):
                blocks.append(Block(cin, c, t, s if i == 0 else 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = conv(cin, 64, 1, act_signed=True)
        self.bnh = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)
        self.fc.act_signed = False

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = self.blocks(x)
        x = F.relu6(self.bnh(self.head(x)))
        return self.fc(x.mean((2, 3)))


W8A8 = ("stem", "fc")  # first and last layer stay at 8 bits (the paper's setup)


def quantize(fp_model: nn.Module, bits: int) -> nn.Module:
    """A copy of the float model with every conv / linear swapped for quantkern.nn.QuantConv2d /
    QuantLinear (``from_float``: LSQ, per-channel weights with the LSQ+ init; per-tensor inputs
    with the LSQ init on the first batch, no offset), W8A8 for ``W8A8`` and W{bits}A{bits} else."""
    model = copy.deepcopy(fp_model)
    for pname, parent in list(model.named_modules()):
        for cname, c in list(parent.named_children()):
            if type(c) not in (nn.Conv2d, nn.Linear):
                continue
            name = f"{pname}.{cname}" if pname else cname
            b = 8 if name in W8A8 else bits
            Q = QuantConv2d if isinstance(c, nn.Conv2d) else QuantLinear
            setattr(parent, cname, Q.from_float(c, w_bits=b, a_bits=b, act_signed=c.act_signed,
                                                a_init="lsq", a_learn_offset=False))
    return model


def is_depthwise(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


# ------------------------------------------------------------------ data
def digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0 - 0.3) / 0.4
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    t = lambda a: torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8)  # noqa: E731
    return t(Xtr), torch.tensor(ytr), t(Xte), torch.tensor(yte)


def batches(X, y, bs, g, augment=True):
    idx = torch.randperm(len(X), generator=g)
    for i in range(0, len(X) - bs + 1, bs):
        j = idx[i:i + bs]
        xb = X[j]
        if augment:  # random shift by up to 1 pixel
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dx, dy), (2, 3))
        yield xb, y[j]


@torch.no_grad()
def accuracy(model, X, y):
    model.eval()
    acc = (model(X).argmax(1) == y).float().mean().item()
    model.train()
    return acc


# ------------------------------------------------------------------ training
def pretrain(seed, data, epochs):
    torch.manual_seed(seed)
    Xtr, ytr, Xte, yte = data
    model = MobileNetV2Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(Xtr) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for _ in range(epochs):
        for xb, yb in batches(Xtr, ytr, 64, g):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model, accuracy(model, Xte, yte)


def qat_run(fp_model, seed, data, bits, method, epochs, bn_batches, damp_lambda=0.1, momentum=0.01,
            freeze_start=0.1, freeze_end=None, freeze_warmup=0.25, osc_freq=0.005, frozen_grad="grid"):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = quantize(fp_model, bits)
    model.train()
    with torch.no_grad():  # initialise the input quantizers on one batch (weights: in from_float)
        model(Xtr[:256])
    qparams = [p for n, p in model.named_parameters() if n.endswith("scale")]
    wparams = [p for n, p in model.named_parameters() if not n.endswith("scale")]
    steps = epochs * (len(Xtr) // 64)
    opt_w = torch.optim.SGD(wparams, lr=0.01 if bits == 3 else 0.0033, momentum=0.9, weight_decay=2.5e-5)
    opt_q = torch.optim.Adam(qparams, lr=1e-3)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, steps)
    low_bit = [l for l in qat.quantized_layers(model) if l.name not in W8A8]
    tracker = qat.OscillationTracker(model, momentum=momentum, max_bits=None, layers=low_bit, frozen_grad=frozen_grad)
    f_end = (0.01 if bits == 4 else 0.011) if freeze_end is None else freeze_end
    thr = qat.freeze_threshold_schedule(steps, freeze_start, f_end, freeze_warmup) if method == "freeze" else (lambda t: 0.0)
    damp = qat.DampeningLoss(model, layers=low_bit) if method == "damp" else None
    lam = qat.dampening_schedule(steps, damp_lambda)
    g = torch.Generator().manual_seed(100 + seed)
    t_total, n_steps = 0.0, 0
    for _ in range(epochs):
        for xb, yb in batches(Xtr, ytr, 64, g):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            if damp is not None:
                loss = loss + damp(lam(n_steps + 1))  # schedules count steps from 1
            opt_w.zero_grad()
            opt_q.zero_grad()
            loss.backward()
            opt_w.step()
            opt_q.step()
            sch.step()
            tracker.step(thr(n_steps + 1))  # track-only (threshold 0) except for "freeze"
            t_total += time.perf_counter() - t0
            n_steps += 1
    acc_before = accuracy(model, Xte, yte)
    qat.reestimate_bn_stats(model, batches(Xtr, ytr, 64, torch.Generator().manual_seed(7)), num_batches=bn_batches)
    acc_after = accuracy(model, Xte, yte)
    met = tracker.metrics(osc_freq=osc_freq)
    mods = dict(model.named_modules())
    agg = {"dw": [0.0, 0.0, 0], "pw": [0.0, 0.0, 0]}
    for name, m in met.items():
        kind = "dw" if is_depthwise(mods[name]) else "pw"
        a = agg[kind]
        a[0] += m["frac_oscillating"] * m["numel"]
        a[1] += m["frozen_frac"] * m["numel"]
        a[2] += m["numel"]
    return {
        "acc_before": acc_before,
        "acc_after": acc_after,
        "osc_dw": agg["dw"][0] / agg["dw"][2],
        "osc_pw": agg["pw"][0] / agg["pw"][2],
        "frozen": (agg["dw"][1] + agg["pw"][1]) / (agg["dw"][2] + agg["pw"][2]),
        "ms_step": 1e3 * t_total / n_steps,
        "model": model,
    }


def _fmt(xs, pct=True, digits=1):
    k = 100.0 if pct else 1.0
    m = statistics.mean(xs) * k
    s = (statistics.stdev(xs) * k) if len(xs) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--fp-epochs", type=int, default=15)
    ap.add_argument("--qat-epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny convs gain nothing from more)")
    ap.add_argument("--bn-batches", type=int, default=50)
    ap.add_argument("--damp-lambda", type=float, default=0.1, help="final dampening weight (paper: 0.1)")
    ap.add_argument("--methods", default="lsq,damp,freeze")
    ap.add_argument("--momentum", type=float, default=0.01, help="oscillation EMA momentum (official class 0.01, paper 0.001)")
    ap.add_argument("--frozen-grad", default="grid", choices=("grid", "official"),
                    help="OscillationTracker(frozen_grad=...): frozen weights' scale / offset gradients")
    ap.add_argument("--freeze-start", type=float, default=0.1, help="freezing threshold at the start of freezing")
    ap.add_argument("--freeze-end", type=float, default=None, help="final freezing threshold (default 0.01 at 4 bits, 0.011 at 3)")
    ap.add_argument("--freeze-warmup", type=float, default=0.25, help="fraction of QAT before freezing starts")
    ap.add_argument("--osc-freq", type=float, default=0.005, help="'oscillating' = frequency EMA above this at the end")
    ap.add_argument("--out", default="examples/out")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3-bit only, 1+1 epochs (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.bits, args.fp_epochs, args.qat_epochs, args.bn_batches = 1, "3", 1, 1, 5
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    methods = [(k, v) for k, v in (("lsq", "LSQ"), ("damp", "+ dampening"), ("freeze", "+ freezing"))
               if k in args.methods.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    res: dict = {}
    fp_accs = []
    t_start = time.time()
    for seed in range(args.seeds):
        data = digits(seed)
        fp, acc = pretrain(seed, data, args.fp_epochs)
        fp_accs.append(acc)
        print(f"seed {seed}: float test accuracy {acc:.4f}  ({time.time() - t_start:.0f}s)", flush=True)
        for bits in bits_list:
            for key, _ in methods:
                r = qat_run(fp, seed, data, bits, key, args.qat_epochs, args.bn_batches, args.damp_lambda, args.momentum,
                            args.freeze_start, args.freeze_end, args.freeze_warmup, args.osc_freq, args.frozen_grad)
                res.setdefault((bits, key), []).append(r)
                print(f"  W{bits}A{bits} {key:<6} acc {r['acc_before']:.4f} -> {r['acc_after']:.4f} (BN re-est.)  "
                      f"osc dw {r['osc_dw']:.2%} pw {r['osc_pw']:.2%} frozen {r['frozen']:.2%}  "
                      f"{r['ms_step']:.1f} ms/step", flush=True)
                if seed == 0 and key in ("lsq", "freeze"):
                    m = r["model"]
                    groups = {"depthwise": [n for n, mm in m.named_modules() if is_depthwise(mm) and hasattr(mm, "weight_quantizer")],
                              "pointwise": [n for n, mm in m.named_modules() if isinstance(mm, QuantConv2d) and mm.kernel_size == (1, 1)
                                            and n not in W8A8]}
                    qat.plot_latent_distance(m, os.path.join(args.out, f"latent_w{bits}_{key}.png"), groups,
                                             title=f"W{bits}A{bits} {dict(methods)[key]}: latent weights vs bin edges")
                del r["model"]
    lines = [
        f"Float baseline: {_fmt(fp_accs)} % test accuracy ({args.seeds} seeds; {args.fp_epochs} float epochs, "
        f"{args.qat_epochs} QAT epochs; load_digits, 25% held-out test split)",
        "",
        "| bits | method | test acc. before BN re-est. (%) | after BN re-est. (%) | oscillating dw (%) | oscillating pw (%) | frozen (%) | ms / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bits in bits_list:
        for key, label in methods:
            rs = res[(bits, key)]
            lines.append(
                f"| W{bits}A{bits} | {label} | {_fmt([r['acc_before'] for r in rs])} | {_fmt([r['acc_after'] for r in rs])} | "
                f"{_fmt([r['osc_dw'] for r in rs], digits=2)} | {_fmt([r['osc_pw'] for r in rs], digits=2)} | "
                f"{_fmt([r['frozen'] for r in rs], digits=2)} | {_fmt([r['ms_step'] for r in rs], pct=False)} |"
            )
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\ntotal {time.time() - t_start:.0f}s; plots in {args.out}/")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    return res


if __name__ == "__main__":
    main()
