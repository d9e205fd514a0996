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

The quantized layers here are a minimal local QConv2d/QLinear over
quantkern.ops.fake_quant_lsq with the quantkern.nn contract (``weight``,
``weight_quantizer`` with ``scale``/``offset``/``qmin``/``qmax``, per channel on
axis 0); quantkern.qat attaches to quantkern.nn.QuantConv2d the same way.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantkern import ops, qat


# ------------------------------------------------------------------ quantized layers
class LSQ(nn.Module):
    """LSQ quantizer: per-channel (axis 0) for weights with the LSQ+ init, per-tensor for
    activations with the LSQ init on the first batch. Gradient scale 1/sqrt(N qmax)."""

    eps = 1e-8

    def __init__(self, bits: int, signed: bool, per_channel: bool):
        super().__init__()
        self.bits, self.signed = bits, signed
        self.qmin, self.qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        self.granularity, self.axis = ("channel", 0) if per_channel else ("tensor", 0)
        self.scale = nn.Parameter(torch.ones(1))
        self.offset = None
        self.initialized = False

    @torch.no_grad()
    def _init(self, x):
        if self.granularity == "channel":
            r = x.reshape(x.shape[0], -1)
            mu, sd = r.mean(1), r.std(1, correction=0)
            s = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 2 ** (self.bits - 1)
        else:
            s = (2 * x.abs().mean() / math.sqrt(self.qmax)).reshape(1)
        self.scale.data = s.clamp_min(1e-4).float()
        self.initialized = True

    def forward(self, x):
        if not self.initialized:
            self._init(x)
        s = self.scale.abs().clamp_min(self.eps)
        g = 1.0 / math.sqrt(max(1, x.numel() // s.numel()) * self.qmax)
        axis = 0 if self.granularity == "channel" else None
        return ops.fake_quant_lsq(x, s, None, self.qmin, self.qmax, axis=axis, grad_scale=g)


class QConv2d(nn.Conv2d):
    def __init__(self, cin, cout, k, w_bits, a_bits, act_signed, stride=1, groups=1):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
        self.weight_quantizer = LSQ(w_bits, True, per_channel=True)
        self.input_quantizer = LSQ(a_bits, act_signed, per_channel=False)

    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), None)


class QLinear(nn.Linear):
    def __init__(self, cin, cout, w_bits, a_bits, act_signed):
        super().__init__(cin, cout)
        self.weight_quantizer = LSQ(w_bits, True, per_channel=True)
        self.input_quantizer = LSQ(a_bits, act_signed, per_channel=False)

    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


# ------------------------------------------------------------------ model
class Block(nn.Module):
    def __init__(self, cin, cout, t, stride, wb, ab):
        super().__init__()
        mid = cin * t
        self.expand = QConv2d(cin, mid, 1, wb, ab, act_signed=True) if t != 1 else None
        self.bn1 = nn.BatchNorm2d(mid) if t != 1 else None
        self.dw = QConv2d(mid, mid, 3, wb, ab, act_signed=t == 1, stride=stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.project = QConv2d(mid, cout, 1, wb, ab, act_signed=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        h = x if self.expand is None else F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        h = self.bn3(self.project(h))
        return x + h if self.res else h


class MobileNetV2Tiny(nn.Module):
    """stem 3x3 (W8A8) -> inverted residual blocks (t, c, n, s) = (1,8,1,1) (4,16,2,2) (4,24,2,2) (4,32,1,1)
    -> 1x1 conv 64 -> avgpool -> linear (W8A8)."""

    def __init__(self, wb=32, ab=32):
        super().__init__()
        q = wb < 32
        wb_, ab_ = (wb, ab) if q else (8, 8)
        self.stem = QConv2d(1, 8, 3, 8, 8, act_signed=True)
        self.bn0 = nn.BatchNorm2d(8)
        cfg, blocks, cin = [(1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1)], [], 8
        for t, c, n, s in cfg:
            for i in range(n):
                blocks.append(Block(cin, c, t, s if i == 0 else 1, wb_, ab_))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = QConv2d(cin, 64, 1, wb_, ab_, act_signed=True)
        self.bnh = nn.BatchNorm2d(64)
        self.fc = QLinear(64, 10, 8, 8, act_signed=False)
        self.quantize(q)

    def quantize(self, on: bool):
        for m in self.modules():
            if isinstance(m, (QConv2d, QLinear)):
                m.quant = on

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = self.blocks(x)
        x = F.relu6(self.bnh(self.head(x)))
        return self.fc(x.mean((2, 3)))


def _float_forward(mod, x):  # float mode of the quantized layers (pretraining)
    if isinstance(mod, QConv2d):
        return mod._conv_forward(x, mod.weight, None)
    return F.linear(x, mod.weight, mod.bias)


def set_float(model: nn.Module, on: bool):
    for m in model.modules():
        if isinstance(m, (QConv2d, QLinear)):
            m.forward = (lambda x, m=m: _float_forward(m, x)) if on else type(m).forward.__get__(m)


def set_bits(model: nn.Module, wb: int, ab: int):
    """Re-create the quantizers of every layer except the stem and the fc with wb/ab bits."""
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)) and name not in ("stem", "fc"):
            m.weight_quantizer = LSQ(wb, True, per_channel=True)
            m.input_quantizer = LSQ(ab, m.input_quantizer.signed, per_channel=False)


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
    set_float(model, True)
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


def qat_run(fp_model, seed, data, bits, method, epochs, bn_batches, damp_lambda=0.1):
    import copy

    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = copy.deepcopy(fp_model)
    set_bits(model, bits, bits)
    set_float(model, False)
    model.train()
    with torch.no_grad():  # initialise the quantizers on one batch
        model(Xtr[:256])
    qparams = [p for n, p in model.named_parameters() if n.endswith("scale")]
    wparams = [p for n, p in model.named_parameters() if not n.endswith("scale")]
    steps = epochs * (len(Xtr) // 64)
    opt_w = torch.optim.SGD(wparams, lr=0.01 if bits == 3 else 0.0033, momentum=0.9, weight_decay=2.5e-5)
    opt_q = torch.optim.Adam(qparams, lr=1e-3)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, steps)
    low_bit = [l for l in qat.quantized_layers(model) if l.name not in ("stem", "fc")]
    tracker = qat.OscillationTracker(model, momentum=0.01, max_bits=None, layers=low_bit)
    thr = qat.freeze_threshold_schedule(steps, 0.1, 0.01 if bits == 4 else 0.011) if method == "freeze" else (lambda t: 0.0)
    damp = qat.DampeningLoss(model, layers=low_bit) if method == "damp" else None
    lam = qat.dampening_schedule(steps, damp_lambda)
    g = torch.Generator().manual_seed(100 + seed)
    t_total, n_steps = 0.0, 0
    for _ in range(epochs):
        for xb, yb in batches(Xtr, ytr, 64, g):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            if damp is not None:
                loss = loss + damp(lam(n_steps))
            opt_w.zero_grad()
            opt_q.zero_grad()
            loss.backward()
            opt_w.step()
            opt_q.step()
            sch.step()
            tracker.step(thr(n_steps))  # track-only (threshold 0) except for "freeze"
            t_total += time.perf_counter() - t0
            n_steps += 1
    acc_before = accuracy(model, Xte, yte)
    qat.reestimate_bn_stats(model, batches(Xtr, ytr, 64, torch.Generator().manual_seed(7)), num_batches=bn_batches)
    acc_after = accuracy(model, Xte, yte)
    met = tracker.metrics(osc_freq=0.005)
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
                r = qat_run(fp, seed, data, bits, key, args.qat_epochs, args.bn_batches, args.damp_lambda)
                res.setdefault((bits, key), []).append(r)
                print(f"  W{bits}A{bits} {key:<6} acc {r['acc_before']:.4f} -> {r['acc_after']:.4f} (BN re-est.)  "
                      f"osc dw {r['osc_dw']:.2%} pw {r['osc_pw']:.2%} frozen {r['frozen']:.2%}  "
                      f"{r['ms_step']:.1f} ms/step", flush=True)
                if seed == 0 and key in ("lsq", "freeze"):
                    m = r["model"]
                    groups = {"depthwise": [n for n, mm in m.named_modules() if is_depthwise(mm) and hasattr(mm, "weight_quantizer")],
                              "pointwise": [n for n, mm in m.named_modules() if isinstance(mm, QConv2d) and mm.kernel_size == (1, 1)
                                            and n not in ("stem",)]}
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
