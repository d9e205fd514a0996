"""Benchmark: fused oscillation tracking/freezing vs a composite PyTorch tracker.

    python benchmarks/bench_oscillation.py [--sizes 4M,16M] [--runs 15] [--device cpu]

Rows, per size (4-bit, per-channel, weight [rows, 1024] fp32):

* ``update (freeze on)``: quantkern.ops.oscillation_update with a threshold > 0
  (reads w, meta, ema; writes meta, ema: 20 bytes per weight; frozen weights are
  also written, ~0 here);
* ``update (track only)``: threshold 0 (the first 25% of training): reads w, meta and
  writes meta, 12 bytes per weight;
* ``composite official``: the official TrackOscillation algorithm in PyTorch ops with
  its full-size fp32 state (quantkern.reference.oscillation.OfficialTracker);
* ``dampening fwd+bwd`` vs the composite autograd formula (reference).

Each row: median time of ``--runs`` runs after warm-up, GB/s of the bytes the fused
kernel must move, the fraction of the machine's copy bandwidth (measured in the same
run, ``dst.copy_(src)`` on 256 MiB or twice the last-level cache, counted as read + write), and the speedup of
the fused op over the composite.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import quantkern as qk
from quantkern import ops
from quantkern.reference import oscillation as R


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def bench(fn, dev, runs, warmup=3):
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(runs):
        t0 = CLOCK()
        fn()
        _sync(dev)
        ts.append(CLOCK() - t0)
    return statistics.median(ts)


def copy_bandwidth(dev, runs):
    try:
        from benchmarks._harness import memory_bytes
    except ImportError:  # run as a script: benchmarks/ itself is on sys.path
        from _harness import memory_bytes
    n = memory_bytes(256) // 4  # fp32 elements: 256 MiB, or 2x the last-level cache where that is larger
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), dev, runs)
    return 2 * src.numel() * 4 / t / 1e9


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
    return int(float(s.rstrip("KM")) * mult)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4M,16M")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--composite-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (with --threads 1 on a shared machine: the time the op ran, "
                         "not the time other processes held the core)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1 or args.device != "cpu":
            ap.error("--clock cpu needs --threads 1 on the CPU")
        CLOCK = time.process_time
    dev = torch.device(args.device)
    torch.manual_seed(0)
    bw = copy_bandwidth(dev, args.runs)
    print(f"device {dev}, threads {torch.get_num_threads()}, clock {args.clock}, cpu capability "
          f"{qk.get_cpu_capability() if dev.type == 'cpu' else '-'}; copy bandwidth {bw:.1f} GB/s")
    hdr = f"{'weights':>8} {'row':<22} {'median ms':>10} {'GB/s':>7} {'of copy':>8} {'speedup':>8}"
    print(hdr)
    print("-" * len(hdr))
    qmin, qmax = -8, 7
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        rows = size // 1024
        w = torch.randn(rows, 1024, device=dev) * 0.05
        s = (w.abs().amax(1) / 7).clamp_min(1e-4)
        b = torch.zeros_like(s)
        meta, ema = ops.oscillation_init_state(w, s, b, qmin, qmax, axis=0)
        n = w.numel()

        # one step with freezing on to make the EMA live (steady state of the freezing phase)
        ops.oscillation_update(w, s, b, meta, ema, qmin, qmax, axis=0, momentum=0.01, freeze_threshold=0.05)
        t_fz = bench(lambda: ops.oscillation_update(w, s, b, meta, ema, qmin, qmax, axis=0, momentum=0.01,
                                                    freeze_threshold=0.05), dev, args.runs)
        t_tr = bench(lambda: ops.oscillation_update(w, s, b, meta, ema, qmin, qmax, axis=0, momentum=0.01,
                                                    freeze_threshold=0.0), dev, args.runs)
        off = R.OfficialTracker(qmin, qmax, axis=0, momentum=0.01, freeze_threshold=0.05)
        sv = s
        t_co = bench(lambda: off.step(w, sv, b), dev, args.composite_runs, warmup=2)
        del off

        wg = w.clone().requires_grad_()
        norm = w.shape[0] / n

        def damp_fused():
            wg.grad = None
            ops.dampening_loss(wg, s, b, qmin, qmax, axis=0, norm=norm).backward()

        def damp_comp():
            wg.grad = None
            R.dampening_loss(wg, s, b, qmin, qmax, 0, None, norm).backward()

        t_df = bench(damp_fused, dev, args.runs)
        t_dc = bench(damp_comp, dev, args.composite_runs, warmup=2)

        label = f"{n / (1 << 20):.0f}M"
        for name, t, nbytes, base in (
            ("update (freeze on)", t_fz, 20 * n, t_co),
            ("update (track only)", t_tr, 12 * n, t_co),
            ("composite official", t_co, 20 * n, None),
            ("dampening fwd+bwd", t_df, 12 * n, t_dc),
            ("composite dampening", t_dc, 12 * n, None),
        ):
            gbs = nbytes / t / 1e9
            sp = f"{base / t:7.1f}x" if base else f"{'':>8}"
            print(f"{label:>8} {name:<22} {t * 1e3:10.2f} {gbs:7.1f} {gbs / bw:7.0%} {sp}")
        del w, meta, ema, wg


if __name__ == "__main__":
    main()
