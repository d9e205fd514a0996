"""Benchmark: fused oscillation tracking/freezing vs a composite PyTorch tracker.

    python benchmarks/bench_oscillation.py [--sizes 4M,16M] [--runs 15] [--device cpu]

Rows, per size (4-bit, per-channel, weight [rows, 1024] fp32):

* ``update (freeze on)``: quantkern.ops.oscillation_update with a threshold > 0
  (reads w, meta, ema; writes meta, ema: 20 bytes per weight; frozen weights are
  also written, ~0 here);
* ``update (track only)``: threshold 0 (the first 25% of training): reads w, meta and
  writes meta, 12 bytes per weight;
* ``composite official``: the official TrackOscillation algorithm in PyTorch ops with
  its full-size fp32 state (quantkern.reference.oscillation.OfficialTracker), freezing on
  (the baseline of the first row); ``composite (track)``: the same with threshold 0, which
  skips its freezing block (the baseline of the track-only row);
* ``dampening fwd+bwd`` vs the composite autograd formula (reference).

Cold data: every call takes the next of several copies of the weights and their state
covering ``--pool-mib`` (default 1024 MiB or twice the last-level cache), so a host whose
cache could hold one copy still streams it from memory.

Each row: median time of ``--runs`` runs after warm-up, GB/s of the bytes the fused
kernel must move, the fraction of the machine's copy bandwidth (measured in the same
run, ``dst.copy_(src)`` on 256 MiB or twice the last-level cache, counted as read + write), and the speedup of
the fused op over the composite.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quantkern as qk
from benchmarks import _harness as H
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


def copy_bandwidth(dev, runs, quick=False):
    # fp32 elements: 256 MiB, or 2x the last-level cache where that is larger (64 MiB for --quick)
    n = (64 << 20 if quick else H.memory_bytes(256)) // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), dev, runs)
    return 2 * src.numel() * 4 / t / 1e9


SIZE_FORMAT = "N, NK or NM (K = 1024, M = 1024K; N may have decimals), a multiple of 1024 (the row length)"


def parse_size(s: str) -> int:
    """argparse type of one --sizes entry: a weight count, whole rows of 1024."""
    t = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v.is_integer() and v >= 1024 and int(v) % 1024 == 0):
        raise argparse.ArgumentTypeError(f"{s!r}: expected {SIZE_FORMAT}")
    return int(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # --quick, --threads, --reps (= --runs), --warmup, --device, --json, --plot / --no-plot
    H.add_common_args(ap, writes_files=False, reps_help="same as --runs")
    ap.add_argument("--sizes", type=H.comma_list(parse_size), default=None,
                    help=f"comma list of weight counts, each {SIZE_FORMAT} (default 4M,16M; 256K with --quick)")
    ap.add_argument("--runs", type=H.positive_int, default=None,
                    help="timed runs of the fused ops (default 15; 3 with --quick)")
    ap.add_argument("--composite-runs", type=H.positive_int, default=None,
                    help="timed runs of the composites (default 5; 1 quick)")
    ap.add_argument("--pool-mib", type=H.nonneg_int, default=None, help="cold data: state copies covering this many MiB "
                    "(default 1024 or twice the last-level cache; 0 with --quick)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (with --threads 1 on a shared machine: the time the op ran, "
                         "not the time other processes held the core)")
    args = ap.parse_args(argv)
    if args.reps is not None and args.runs is not None and args.reps != args.runs:  # (--runs won silently)
        ap.error(f"--reps and --runs are the same setting (timed runs), given {args.reps} and {args.runs}: give one")
    dev = H.apply_common_args(args)  # --threads, --device (cuda without a GPU is an error), --quick
    args.sizes = args.sizes or ([256 << 10] if args.quick else [4 << 20, 16 << 20])
    args.runs = args.runs or args.reps or (3 if args.quick else 15)
    args.composite_runs = args.composite_runs or (1 if args.quick else 5)
    pool = args.pool_mib * (1 << 20) if args.pool_mib is not None else (0 if args.quick else H.memory_bytes(1024))
    out = H.table_stream(args)
    H.note_no_files(args, "bench_oscillation", out)
    global CLOCK
    if args.clock == "cpu":
        if torch.get_num_threads() != 1 or torch.device(args.device).type != "cpu":
            ap.error("--clock cpu needs --threads 1 on the CPU")
        CLOCK = time.process_time
    torch.manual_seed(0)
    bw = copy_bandwidth(dev, args.runs, args.quick)
    print(f"device {dev}, threads {torch.get_num_threads()}, clock {args.clock}, cpu capability "
          f"{qk.get_cpu_capability() if dev.type == 'cpu' else '-'}; copy bandwidth {bw:.1f} GB/s", file=out)
    hdr = f"{'weights':>8} {'row':<22} {'median ms':>10} {'GB/s':>7} {'of copy':>8} {'speedup':>8}"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    qmin, qmax = -8, 7
    for size in args.sizes:
        rows = size // 1024
        n = rows * 1024
        # cold data: copies of (w, s, b, meta, ema) covering the pool, one per call in turn
        n_sets = H.cold_copies(12 * n, pool)
        sets = []
        for _ in range(n_sets):
            w = torch.randn(rows, 1024, device=dev) * 0.05
            s = (w.abs().amax(1) / 7).clamp_min(1e-4)
            b = torch.zeros_like(s)
            meta, ema = ops.oscillation_init_state(w, s, b, qmin, qmax, axis=0)
            # one step with freezing on to make the EMA live (steady state of the freezing phase)
            ops.oscillation_update(w, s, b, meta, ema, qmin, qmax, axis=0, momentum=0.01, freeze_threshold=0.05)
            sets.append((w, s, b, meta, ema))
        w, s, b, meta, ema = sets[0]
        turn = itertools.cycle(range(n_sets))

        def update(th):
            w_, s_, b_, m_, e_ = sets[next(turn)]
            return ops.oscillation_update(w_, s_, b_, m_, e_, qmin, qmax, axis=0, momentum=0.01, freeze_threshold=th)

        t_fz = bench(lambda: update(0.05), dev, args.runs, args.warmup)
        t_tr = bench(lambda: update(0.0), dev, args.runs, args.warmup)
        t_co = {}
        for th in (0.05, 0.0):  # freezing on / track only (its freezing block is skipped at 0)
            # as many trackers as cover the pool: one tracker's state (measured after a step: it allocates
            # it then, less with freezing off) and its weight
            probe = R.OfficialTracker(qmin, qmax, axis=0, momentum=0.01, freeze_threshold=th)
            probe.step(*sets[0][:3])
            per = 4 * n + sum(t.numel() * t.element_size() for t in vars(probe).values() if isinstance(t, torch.Tensor))
            del probe
            n_off = H.cold_copies(per, pool)
            offs = [(R.OfficialTracker(qmin, qmax, axis=0, momentum=0.01, freeze_threshold=th), sets[i % n_sets])
                    for i in range(n_off)]
            oturn = itertools.cycle(range(n_off))

            def off_step():
                o, (w_, s_, b_, _, _) = offs[next(oturn)]
                return o.step(w_, s_, b_)

            # at least one step per tracker: its first step allocates its state
            t_co[th] = bench(off_step, dev, args.composite_runs, warmup=max(args.warmup, n_off))
            del offs

        # dampening reads w (and writes its gradient): rotate weight copies covering the pool as well
        n_w = H.cold_copies(8 * n, pool)
        wgs = [(sets[i % n_sets][0].clone().requires_grad_(), sets[i % n_sets][1], sets[i % n_sets][2])
               for i in range(n_w)]
        wturn = itertools.cycle(range(n_w))
        norm = w.shape[0] / n

        def damp_fused():
            wg, s_, b_ = wgs[next(wturn)]
            wg.grad = None
            ops.dampening_loss(wg, s_, b_, qmin, qmax, axis=0, norm=norm).backward()

        def damp_comp():
            wg, s_, b_ = wgs[next(wturn)]
            wg.grad = None
            R.dampening_loss(wg, s_, b_, qmin, qmax, 0, None, norm).backward()

        t_df = bench(damp_fused, dev, args.runs, args.warmup)
        t_dc = bench(damp_comp, dev, args.composite_runs, args.warmup)

        label = f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K"
        for name, t, nbytes, base in (
            ("update (freeze on)", t_fz, 20 * n, t_co[0.05]),
            ("update (track only)", t_tr, 12 * n, t_co[0.0]),
            ("composite official", t_co[0.05], 20 * n, None),
            ("composite (track)", t_co[0.0], 12 * n, None),
            ("dampening fwd+bwd", t_df, 12 * n, t_dc),
            ("composite dampening", t_dc, 12 * n, None),
        ):
            gbs = nbytes / t / 1e9
            sp = f"{base / t:7.1f}x" if base else f"{'':>8}"
            print(f"{label:>8} {name:<22} {t * 1e3:10.2f} {gbs:7.1f} {gbs / bw:7.0%} {sp}", file=out)
        del w, meta, ema, wgs, sets


if __name__ == "__main__":
    main()
