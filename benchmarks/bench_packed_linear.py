"""Benchmark of quantkern.packed_linear (2/3/4-bit packed weights) against PyTorch baselines.

Shapes are ``KxN`` = in_features x out_features (the weight is ``[N, K]``):
4096x4096, 4096x11008 (LLM up/gate), 11008x4096 (LLM down), 768x3072 and
3072x768 (ViT-B MLP); M (rows of x) in {1, 8, 32, 128}; bits 2, 3, 4; group
size 64 and 128; x in bfloat16 (default) and/or float32 (``--dtype``), standard normal
(default) or with LLM-style outlier channels (``--x outliers``: every 1024th channel 40x, so one
group of 64 in 16 holds an outlier; the integer GEMVs give such groups a second piece of x).

Cold weights: every implementation rotates through enough copies of its
weight to touch more than ``--pool-mib`` (default 1024 MiB or twice the last-level
cache, whichever is larger) between two uses of one copy, so each call streams its weight from
memory, as a decoder step does.

Implementations:

* ``quantkern bN gG``: ``quantkern.packed_linear`` (native CPU kernels; the path
  is picked per call: VNNI GEMV / fp32 LUT GEMV for small M, AMX-BF16 or fp32
  panels for larger M).
* ``aten int4 gG``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` with a weight
  from ``_convert_weight_to_int4pack_for_cpu`` (PyTorch's CPU int4 kernel; bf16
  scales_and_zeros), 4 bits only.
* ``F.linear bf16`` / ``F.linear fp32``: dense weights (x cast to the weight's dtype).
* ``dynamic int8``: ``torch.ao.nn.quantized.dynamic.Linear`` (fp32 x, int8 weight
  per channel, x quantized per call).

Columns: ms (median), GB/s (bytes of the weight, metadata included, per call),
roofline (GB/s / read bandwidth: the fastest of an fp32 ``torch.mv``, ``amax()`` and an int64 ``sum()``
over 256 MiB or twice the last-level cache, measured in the same run; :func:`_harness.read_bandwidth`), and ``vs bf16`` /
``vs aten``: baseline ms / our ms (> 1: ours is faster).

Run: ``python -m benchmarks.bench_packed_linear [--quick] [--threads N] [--dtype bfloat16,float32] [--device cuda]``.
On a GPU (``--device cuda``) the rows are the native CUDA kernels, ``quantkern triton`` (where triton
imports), aten's CUDA int4 kernel (``_weight_int4pack_mm``, bf16 x) and F.linear; the roofline is the
GPU's read bandwidth (the same probes); dynamic int8 is CPU-only.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks import _harness as H

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "768x3072", "3072x768"]
MS = [1, 8, 32, 128]
BITS = [4, 3, 2]
GROUPS = [64, 128]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class Pool:
    """Copies of one weight (a tuple of tensors) covering ``pool_bytes``; ``next()`` rotates."""

    def __init__(self, make, nbytes: int, pool_bytes: int):
        self.n = H.cold_copies(nbytes, pool_bytes)
        first = make()
        self.items = [first] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in first)
                                for _ in range(self.n - 1)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % self.n
        return self.items[self.i]


def timed(fn, args) -> H.Timing:
    return H.measure(fn, warmup=args.warmup, reps=args.reps, budget_s=args.budget, device=args.device)


def kxn(s: str) -> tuple[int, int]:
    """argparse type of one --shapes entry: ``KxN``, two positive integers."""
    k, x, n = s.lower().partition("x")
    try:
        K, N = int(k), int(n)
    except ValueError:
        K = N = 0
    if not x or K < 1 or N < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected KxN with positive integers K and N, e.g. 4096x11008")
    return K, N


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(p, plot_name=None)
    # lists are checked here, before the minutes of bandwidth measurements
    p.add_argument("--shapes", type=H.comma_list(kxn), default=None, help=f"comma list of KxN (default {','.join(SHAPES)})")
    p.add_argument("--m", type=H.comma_list(H.positive_int), default=None, help="comma list of M (default 1,8,32,128)")
    p.add_argument("--bits", type=H.comma_list(H.one_of(BITS)), default=None, help="comma list of bit widths (default 4,3,2)")
    p.add_argument("--groups", type=H.comma_list(H.positive_int), default=None,
                   help="comma list of group sizes, each a multiple of 32 dividing every K, or K (default 64,128)")
    p.add_argument("--dtype", type=H.comma_list(H.one_of(list(DTYPES))), default="bfloat16",
                   help="comma list: bfloat16,float32 (dtype of x)")
    p.add_argument("--pool-mib", type=H.nonneg_int, default=None, help="cold-weight rotation pool per implementation (default 1024 or twice the last-level cache, "
                   "whichever is larger; 96 with --quick)")
    p.add_argument("--budget", type=H.positive_float, default=None,
                   help="seconds of timed calls per measurement (default 0.6; 0.1 with --quick)")
    p.add_argument("--no-baselines", action="store_true", help="only quantkern rows")
    p.add_argument("--x", choices=("gaussian", "outliers"), default="gaussian",
                   help="x: standard normal, or with every 1024th channel 40x (LLM-style outlier channels)")
    args = p.parse_args(argv)
    groups_given = args.groups is not None
    args.shapes = args.shapes or [kxn(s) for s in (["768x3072", "4096x11008"] if args.quick else SHAPES)]
    args.m = args.m or ([1, 32] if args.quick else MS)
    args.bits = args.bits or ([4] if args.quick else BITS)
    args.groups = args.groups or ([64] if args.quick else GROUPS)
    from quantkern import ops  # the packing's own rule for group sizes

    for K, N in args.shapes:
        for gs in args.groups:
            try:
                ops._check_group("packed_linear", K, gs)
            except ValueError as e:
                # a default group size that does not fit a --shapes entry: say so, and what to pass
                p.error(f"--groups {gs}{'' if groups_given else ' (the default; pass --groups)'} does not fit "
                        f"shape {K}x{N}: {e}")
    args.pool = args.pool_mib * H.MiB if args.pool_mib is not None else (96 * H.MiB if args.quick else H.memory_bytes(1024))
    args.budget = args.budget or (0.1 if args.quick else 0.6)
    return args


def _quantkern_backends(dev: torch.device) -> list[tuple[str, object]]:
    """(row label suffix, op) of our implementations on ``dev``: the native kernels, plus the Triton
    ones on a GPU where triton imports."""
    out = [("", torch.ops.quantkern.packed_linear)]
    if dev.type == "cuda":
        try:
            import quantkern.triton_kernels  # noqa: F401  (registers packed_linear_triton)

            out.append((" triton", torch.ops.quantkern.packed_linear_triton))
        except Exception:  # noqa: BLE001  (no triton: native only)
            pass
    return out


def _aten_int4(q: torch.Tensor, dev: torch.device):
    """(packed weight, mm(x, w, gs, scales_and_zeros)) of PyTorch's int4 kernel for ``dev``."""
    if dev.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), torch.ops.aten._weight_int4pack_mm_for_cpu
    qu8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(dev)  # CUDA: uint8 [N, K / 2], 8 inner k-tiles
    return torch.ops.aten._convert_weight_to_int4pack(qu8, 8), torch.ops.aten._weight_int4pack_mm


def make_x(M: int, K: int, g: torch.Generator, kind: str) -> torch.Tensor:
    """fp32 x [M, K]: standard normal; ``"outliers"``: channels 7, 1031, 2055, ... (every 1024th) 40x,
    as the few large hidden channels of LLM activations."""
    x = torch.randn(M, K, generator=g)
    if kind == "outliers":
        x[:, 7::1024] *= 40.0
    return x


def bench_shape(K: int, N: int, args, rows: list, out, dev: torch.device = torch.device("cpu")) -> None:
    import quantkern
    from quantkern import PackedWeight

    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g) * 0.02
    case = f"{K}x{N}"
    xs = {(d, M): make_x(M, K, g, args.x).to(DTYPES[d]).to(dev) for d in args.dtype for M in args.m}

    def add(impl, dtype, M, t, nbytes, **extra):
        rows.append(H.Row(case=case, impl=impl, pass_=f"{dtype} M={M}", ms=t.median, spread=t.spread, bytes=nbytes,
                          flops=2.0 * M * N * K, extra=dict(dtype=dtype, M=M, **extra)))

    # ---- quantkern
    for bits in args.bits:
        for gs in args.groups:
            pw = PackedWeight.from_float(W, bits, gs, meta_dtype=torch.bfloat16).to(dev)
            nbytes = pw.nbytes()
            pool = Pool(lambda: (pw.qweight, pw.scales, pw.zeros), nbytes, args.pool)
            for label, op in _quantkern_backends(dev):
                for d in args.dtype:
                    for M in args.m:
                        x = xs[(d, M)]

                        def fn():
                            qw, s, z = pool.next()
                            return op(x, qw, s, z, bits, gs, K, None)

                        add(f"quantkern{label} b{bits} g{gs}", d, M, timed(fn, args), nbytes, bits=bits, group=gs)
            del pool, pw
            gc.collect()
    if args.no_baselines:
        return
    # ---- aten int4 (4 bits only; bf16 scales_and_zeros)
    if 4 in args.bits:
        for gs in args.groups:
            q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
            sz = torch.randn(K // gs, N, 2, generator=g)
            try:
                packed, mm = _aten_int4(q, dev)
                # one call: aten takes fewer group sizes than ours (32, 64, 128, 256)
                mm(torch.zeros(1, K, dtype=torch.bfloat16, device=dev), packed, gs, sz.to(torch.bfloat16).to(dev))
            except Exception as e:  # noqa: BLE001
                print(f"# aten int4 g{gs} unavailable for {case}: {e}", file=out)
                continue
            for d in args.dtype:  # scales_and_zeros must have x's dtype
                if dev.type == "cuda" and d != "bfloat16":
                    continue  # the CUDA kernel takes bf16 x only
                szd = sz.to(DTYPES[d]).to(dev)
                nbytes = packed.numel() * packed.element_size() + szd.numel() * szd.element_size()
                pool = Pool(lambda: (packed, szd), nbytes, args.pool)
                for M in args.m:
                    x = xs[(d, M)]

                    def fn():
                        p, s = pool.next()
                        return mm(x, p, gs, s)

                    add(f"aten int4 g{gs}", d, M, timed(fn, args), nbytes, bits=4, group=gs)
                del pool
            del packed
            gc.collect()
    # ---- dense F.linear (bf16 and fp32 weights)
    for wd, name in ((torch.bfloat16, "F.linear bf16"), (torch.float32, "F.linear fp32")):
        Wd = W.to(wd).to(dev)
        nbytes = Wd.numel() * Wd.element_size()
        pool = Pool(lambda: (Wd,), nbytes, args.pool)
        for d in args.dtype:
            for M in args.m:
                x = xs[(d, M)].to(wd)

                def fn():
                    (w,) = pool.next()
                    return F.linear(x, w)

                add(name, d, M, timed(fn, args), nbytes, bits=16 if wd == torch.bfloat16 else 32)
        del pool, Wd
        gc.collect()
    # ---- dynamic int8 (fp32 activations; a CPU-only module)
    if dev.type != "cpu":
        return
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear

        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(W)
        lin.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        mods = []
        n = H.cold_copies(N * K, args.pool)  # (as Pool: n - 1 other copies between two uses)
        for _ in range(n):
            mods.append(DynLinear.from_float(lin))
        pool_i = [0]
        for d in args.dtype:
            for M in args.m:
                x = xs[(d, M)].float()

                def fn():
                    pool_i[0] = (pool_i[0] + 1) % n
                    return mods[pool_i[0]](x)

                add("dynamic int8", d, M, timed(fn, args), N * K + 8 * N, bits=8)
        del mods
        gc.collect()
    except Exception as e:  # noqa: BLE001
        print(f"# dynamic int8 unavailable: {e}", file=out)


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = H.apply_common_args(args)
    out = H.table_stream(args)
    import quantkern

    info = H.env_info(dev)
    bw_bytes = 64 * H.MiB if args.quick else H.memory_bytes(256)
    cp0, rd0 = H.copy_bandwidth(dev, bw_bytes), H.read_bandwidth(dev, bw_bytes)
    quick_note = " (--quick: smoke test, not a measurement; the small pool stays in cache: roofline can exceed 100%)"
    print(f"# packed_linear benchmark{quick_note if args.quick else ''}", file=out)
    print(f"# {H.describe(info)}; cpu features {quantkern.ops.cpu_features()}; x {args.x}", file=out)
    print(f"# bandwidth at start: read {rd0:.1f} GB/s, copy (read+write) {cp0:.1f} GB/s; "
          f"cold-weight pool {args.pool // H.MiB} MiB", file=out)
    rows: list[H.Row] = []
    for K, N in args.shapes:
        bench_shape(K, N, args, rows, out, dev)
    cp1, rd1 = H.copy_bandwidth(dev, bw_bytes), H.read_bandwidth(dev, bw_bytes)
    # A GEMV reads its weight and writes almost nothing: its ceiling is the read
    # bandwidth (the best of the two measurements: load from other jobs only lowers it).
    bw = max(rd0, rd1)
    print(f"# bandwidth at end: read {rd1:.1f} GB/s, copy {cp1:.1f} GB/s; roofline uses read {bw:.1f} GB/s", file=out)
    for r in rows:
        r.extra["roofline"] = r.gbps / bw if r.gbps else float("nan")
        same = lambda impl: [o for o in rows if o.case == r.case and o.pass_ == r.pass_ and o.impl == impl]
        b = same("F.linear bf16")
        r.extra["vs_bf16_x"] = b[0].ms / r.ms if b else float("nan")
        a = same(f"aten int4 g{r.extra.get('group')}")
        r.extra["vs_aten_x"] = a[0].ms / r.ms if a and r.impl.startswith("quantkern") else float("nan")
    cols = ["case", "pass", "impl", "ms", "spread", "gbps", "roofline", "vs_bf16_x", "vs_aten_x"]
    H.print_table(rows, cols, title="packed_linear (vs_* = baseline ms / this ms; roofline = weight GB/s / read GB/s)",
                  file=out, titles={"vs_bf16_x": "vs bf16", "vs_aten_x": "vs aten"})
    summary(rows, args, out)
    if args.json:
        H.write_json(args.json, rows, meta=dict(info, read_bandwidth_gbps=bw, copy_bandwidth_gbps=max(cp0, cp1)))
    H.plot_rows(rows, args, out, title=f"packed_linear ({H.describe(info)})")
    return 0


def summary(rows, args, out) -> None:
    """The issue's targets, where this run measured them."""
    def find(case, impl, dtype, M):
        r = [x for x in rows if x.case == case and x.impl == impl and x.extra["dtype"] == dtype and x.extra["M"] == M]
        return r[0] if r else None

    lines = []
    for d in args.dtype:
        r = find("4096x11008", "quantkern b4 g64", d, 1)
        if r:
            lines.append(f"M=1 int4 g64 4096x11008 {d}: {r.ms:.3f} ms (issue: <= 0.9 ms on its host), "
                         f"roofline {100 * r.extra['roofline']:.0f}% (target >= 90%)")
        for b in (3, 2):
            r = find("4096x11008", f"quantkern b{b} g64", d, 1)
            if r:
                lines.append(f"M=1 int{b} g64 4096x11008 {d}: {r.ms:.3f} ms, roofline {100 * r.extra['roofline']:.0f}% (target >= 85%)")
        r = find("4096x11008", "quantkern b4 g64", d, 32)
        if r:
            lines.append(f"M=32 int4 g64 4096x11008 {d}: {r.ms:.3f} ms (target <= 4.5), vs bf16 F.linear {r.extra['vs_bf16_x']:.2f}x")
    # (only rows with a bf16 F.linear row to compare with: none under --no-baselines)
    compared = [r for r in rows if r.impl.startswith("quantkern") and math.isfinite(r.extra.get("vs_bf16_x", float("nan")))]
    slower = [r for r in compared if r.extra["vs_bf16_x"] < 1.0]
    lines.append(f"quantkern rows slower than bf16 F.linear: {len(slower)} of {len(compared)} compared"
                 + ("" if not slower else " -- " + ", ".join(f"{r.case} {r.pass_} {r.impl} ({r.extra['vs_bf16_x']:.2f}x)"
                                                             for r in slower[:12])))
    print("\n### targets\n", file=out)
    for line in lines:
        print(f"- {line}", file=out)


if __name__ == "__main__":
    sys.exit(main())
