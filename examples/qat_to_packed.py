"""Quantization-aware training, then packed inference: the whole path on sklearn's digits (offline).

1. train a float MLP (64 -> 256 -> 256 -> 10) for a few epochs;
2. swap its layers for QAT layers (``quantize_modules``: LSQ weights per group of 32, LSQ+ inputs)
   and train on with oscillation tracking + freezing and the dampening loss;
3. ``quantkern.nn.convert_qat``: every QAT layer becomes a ``PackedLinear`` holding the same
   integers, scales and input quantizer;
4. ``save_quantized`` / ``load_quantized`` round trip into a fresh float model.

Prints one table: test accuracy, agreement with the QAT model's predictions, the largest logit
difference to the QAT model, and the size of the state_dict. Runs in well under a minute on a CPU.

    python examples/qat_to_packed.py [--w-bits 4] [--a-bits 8] [--group-size 32] [--epochs 3]
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import quantkern
from quantkern import qat
from quantkern.nn import convert_qat, quantize_modules


class MLP(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.f1, self.f2, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(F.relu(self.f2(F.relu(self.f1(x)))))


def digits():
    """load_digits standardised, a fixed 1400 / 397 split: x [N, 64] fp32, y int64."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor((X / 16.0 - 0.3) / 0.4, dtype=torch.float32)
    p = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X[p[:1400]], torch.tensor(y)[p[:1400]], X[p[1400:]], torch.tensor(y)[p[1400:]]


def batches(n: int, bs: int, seed: int):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [idx[i:i + bs] for i in range(0, n - bs + 1, bs)]


def state_bytes(m: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.getbuffer().nbytes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--w-bits", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--a-bits", type=int, default=8, help="input bits (2..8); 0: weights only")
    ap.add_argument("--group-size", type=int, default=32, help="weight group size (a multiple of 32); 0: per channel")
    ap.add_argument("--epochs", type=int, default=3, help="QAT epochs (the float model trains 4 first)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 <= args.a_bits <= 8 or args.a_bits == 1 or args.group_size < 0 or args.group_size % 32 or args.epochs < 1:
        ap.error("--a-bits must be 0 or 2..8, --group-size 0 or a multiple of 32, --epochs >= 1")
    torch.manual_seed(args.seed)
    Xtr, ytr, Xte, yte = digits()

    def acc(m):
        with torch.no_grad():
            return (m.eval()(Xte).argmax(1) == yte).float().mean().item()

    t0 = time.perf_counter()
    fp = MLP()
    opt = torch.optim.Adam(fp.parameters(), 3e-3)
    for e in range(4):
        for i in batches(len(Xtr), 64, e):
            loss = F.cross_entropy(fp(Xtr[i]), ytr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()

    m = copy.deepcopy(fp).train()
    g = {"w_granularity": "group", "w_group_size": args.group_size} if args.group_size else {}
    quantize_modules(m, w_bits=args.w_bits, a_bits=args.a_bits or None, **g)
    m(Xtr[:256])  # initialise the input quantizers on training data
    quant = [p for n, p in m.named_parameters() if "quantizer" in n]
    rest = [p for n, p in m.named_parameters() if "quantizer" not in n]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": 1e-4}, {"params": quant, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9)
    steps = args.epochs * (len(Xtr) // 64)
    tracker = qat.OscillationTracker(m, momentum=0.01)
    damp = qat.DampeningLoss(m)
    f_th = qat.freeze_threshold_schedule(steps, 0.1, 0.01)
    lam = qat.dampening_schedule(steps, 0.1)
    step = 0
    for e in range(args.epochs):
        for i in batches(len(Xtr), 64, 100 + e):
            step += 1
            loss = F.cross_entropy(m(Xtr[i]), ytr[i]) + damp(weighting=lam(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.step(freeze_threshold=f_th(step))
    frozen = sum(v["frozen_frac"] * v["numel"] for v in tracker.metrics().values())
    qat_acc = acc(m)
    with torch.no_grad():
        y_qat = m(Xte)
    qat_bytes = state_bytes(m)

    packed = copy.deepcopy(m)
    names = convert_qat(packed)
    with torch.no_grad():
        y_packed = packed.eval()(Xte)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "qat_packed.safetensors")
        quantkern.save_quantized(packed, path)
        file_bytes = os.path.getsize(path)
        loaded = quantkern.load_quantized(MLP(), path)
    with torch.no_grad():
        y_loaded = loaded.eval()(Xte)

    rows = [
        ("fp32", acc(fp), float("nan"), float("nan"), state_bytes(fp)),
        (f"QAT W{args.w_bits}A{args.a_bits or 'fp'} (fake-quantized)", qat_acc, 1.0, 0.0, qat_bytes),
        ("convert_qat -> PackedLinear", acc(packed), (y_packed.argmax(1) == y_qat.argmax(1)).float().mean().item(),
         (y_packed - y_qat).abs().max().item(), state_bytes(packed)),
        ("save_quantized -> load_quantized", acc(loaded), (y_loaded.argmax(1) == y_qat.argmax(1)).float().mean().item(),
         (y_loaded - y_qat).abs().max().item(), file_bytes),
    ]
    print(f"digits MLP 64-256-256-10, QAT W{args.w_bits} (group {args.group_size or 'per channel'}) "
          f"A{args.a_bits or 'fp'}, {args.epochs} epochs, {int(frozen)} weights frozen; converted: {', '.join(names)}")
    print("| model | test accuracy | agreement with QAT | max abs logit diff to QAT | size (bytes) |")
    print("|---|--:|--:|--:|--:|")
    for name, a, agr, diff, size in rows:
        print(f"| {name} | {a:.4f} | {'-' if agr != agr else f'{agr:.4f}'} | {'-' if diff != diff else f'{diff:.2e}'} "
              f"| {size:,} |")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return {"rows": rows, "converted": names}


if __name__ == "__main__":
    main()
