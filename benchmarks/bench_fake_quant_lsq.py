"""Benchmark of quantkern.fake_quant_lsq (LSQ+ fake quantization) against PyTorch baselines.

Cases (full size; ``--quick`` shrinks them to ~1 MiB for smoke tests):

* ``per-tensor``:  16M-element fp32 activation, 8-bit (qmin -128, qmax 127), offset (beta) = -2 s.
* ``per-channel``: 4096x4096 fp32 weight, scale and offset per row (axis 0), 4-bit (-8, 7), offset 0.

Passes: ``fwd`` (training forward: inputs require grad, so each impl builds
its graph), ``bwd`` (``torch.autograd.grad(y, inputs, gy, retain_graph=True)``
on graphs built beforehand) and ``fwd+bwd``. ``torch.autograd.grad`` returns the
grads, so no ``.grad`` accumulation is timed. Cold data: each call takes the next
of several copies of x and gy (and, for ``bwd``, of the graphs) covering ``--pool-mib``
(default 1024 MiB or twice the last-level cache), so a case is streamed from memory
even on a host whose cache could hold it.

Implementations:

* ``quantkern``: ``quantkern.fake_quant_lsq(backend="native")``; on a GPU also
  ``quantkern-triton`` (``backend="triton"``). The first quantkern row is "ours"
  for the speedup column.
* ``torch-learnable``: ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``.
  Its parameters are (scale, zero_point) with ``x_hat = (clamp(round(x/s + zp)) - zp) * s``;
  the zero point is a float tensor that the op rounds, ``zp = -beta / s``. Same
  qmin/qmax and ``grad_factor`` = our ``grad_scale``.
* ``composite``: textbook LSQ+ in plain torch ops (STE via ``detach``, LSQ grad
  scaling via ``(s - s*g).detach() + s*g``), eager.
* ``composite+compile``: the same under ``torch.compile(dynamic=False)``; compiled
  once per case during warm-up, compile time excluded (printed separately).
  Left out of ``--quick`` runs unless named in ``--impl`` (compiling takes 10-60 s).

Bytes moved (for GB/s and the roofline): fwd reads x and writes y (2 N e);
bwd reads g and x and writes gx (3 N e); fwd+bwd is the sum (5 N e), e = element
size. The roofline fraction divides by the copy bandwidth measured in the same run.

Page faults: quantkern's CPU allocator caches large output blocks
(``QUANTKERN_CPU_CACHE_MB``, default 1024; read once per process). The
page-fault table re-runs the quantkern rows in a subprocess with
``QUANTKERN_CPU_CACHE_MB=0`` and shows what fresh pages cost.

Run: ``python -m benchmarks.bench_fake_quant_lsq [--quick] [--threads N] [--json PATH] [--no-plot]``.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import _harness as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSES = ("fwd", "bwd", "fwd+bwd")
BYTES_PER_ELEM_MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
ALL_IMPLS = ("quantkern", "quantkern-triton", "torch-learnable", "composite", "composite+compile")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------ cases
class Case:
    def __init__(self, name, shape, qmin, qmax, axis, offset_steps):
        self.name, self.shape, self.qmin, self.qmax, self.axis = name, shape, qmin, qmax, axis
        self.offset_steps = offset_steps  # beta = -offset_steps * s (an integer zero point)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def label(self) -> str:
        bits = (self.qmax - self.qmin + 1).bit_length() - 1
        dims = "x".join(str(d) for d in self.shape)
        gran = "per-tensor" if self.axis is None else f"per-channel(axis {self.axis})"
        return f"{gran} int{bits} [{dims}]"

    def make(self, device, dtype, seed=0):
        """x, scale, offset (fp32 parameters, LSQ+ coordinates) and the LSQ grad scale g."""
        gen = torch.Generator().manual_seed(seed)
        if self.axis is None:
            x = torch.randn(self.shape, generator=gen)
            s = torch.tensor([0.02])
            n_per_scale = self.numel
        else:
            x = torch.randn(self.shape, generator=gen) * 0.02
            dims = [d for d in range(x.dim()) if d != self.axis]
            s = (x.abs().amax(dims) * 0.9 / self.qmax).clamp_min(1e-8)
            n_per_scale = self.numel // self.shape[self.axis]
        b = -self.offset_steps * s
        g = 1.0 / math.sqrt(n_per_scale * self.qmax)
        return x.to(device=device, dtype=dtype), s.to(device), b.to(device), g


CASES = ("per-tensor", "per-channel")  # the keys of cases()


def cases(quick: bool) -> dict[str, Case]:
    if quick:
        return {
            "per-tensor": Case("per-tensor", (1 << 18,), -128, 127, None, 2),
            "per-channel": Case("per-channel", (256, 1024), -8, 7, 0, 0),
        }
    return {
        "per-tensor": Case("per-tensor", (1 << 24,), -128, 127, None, 2),
        "per-channel": Case("per-channel", (4096, 4096), -8, 7, 0, 0),
    }


# ---------------------------------------------------------- implementations
def composite_lsq(x, s, b, qmin: int, qmax: int, g: float, axis: int | None):
    """Textbook LSQ+ with autograd: STE round, LSQ gradient scaling, clip on the unrounded value."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, b = s.reshape(shape), b.reshape(shape)
    # LSQ gradient scaling: value s, gradient g * dL/ds. (Beware the look-alike
    # `s*g - (s*g).detach() + s`: its value is s but its gradient is (1 + g) dL/ds.)
    sg = s * g
    s = (s - sg).detach() + sg
    bg = b * g
    b = (b - bg).detach() + bg
    v = (x - b) / s
    q = torch.clamp(v, qmin, qmax)
    q = q + (q.round() - q).detach()  # straight-through round
    return q * s + b


def make_impl(name: str, case: Case, x, s, b, g, device):
    """Returns (fn(*params) -> y, params) where params are the leaf tensors to differentiate."""
    import quantkern

    qmin, qmax, axis = case.qmin, case.qmax, case.axis
    leaf = lambda t: t.detach().clone().requires_grad_(True)
    xs = leaf(x)
    if name in ("quantkern", "quantkern-triton"):
        backend = "triton" if name == "quantkern-triton" else "native"

        def fn(x_, s_, b_):
            return quantkern.fake_quant_lsq(x_, s_, b_, qmin, qmax, axis=axis, grad_scale=g, backend=backend)

        return fn, (xs, leaf(s), leaf(b))
    if name == "torch-learnable":
        zp = leaf(-b / s)  # the zero point in PyTorch's coordinates: beta = -zp * s
        if axis is None:
            def fn(x_, s_, z_):
                return torch._fake_quantize_learnable_per_tensor_affine(x_, s_, z_, qmin, qmax, g)
        else:
            def fn(x_, s_, z_):
                return torch._fake_quantize_learnable_per_channel_affine(x_, s_, z_, axis, qmin, qmax, g)
        return fn, (xs, leaf(s), zp)
    if name in ("composite", "composite+compile"):
        def fn(x_, s_, b_):
            return composite_lsq(x_, s_, b_, qmin, qmax, g, axis)

        if name == "composite+compile":
            fn = torch.compile(fn, dynamic=False)
        return fn, (xs, leaf(s), leaf(b))
    raise ValueError(f"unknown impl {name!r}")


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0].split("  (Could this error message be improved")[0] if msg else ""
    return f"{type(e).__name__}: {first[:90]}"


def triton_check(device) -> None:
    """Stop up front when ``--impl quantkern-triton`` cannot run here (e.g. a CPU without
    TRITON_INTERPRET=1), instead of a table of error notes and exit 0: one tiny call."""
    import quantkern

    x = torch.zeros(4, device=device)
    s = torch.ones(1, device=device)
    try:
        quantkern.fake_quant_lsq(x, s, torch.zeros_like(s), -8, 7, backend="triton")
    except Exception as e:  # noqa: BLE001 -- any failure means the rows would all fail
        raise SystemExit(f"--impl quantkern-triton: not usable on {device} ({_short_error(e)})") from None


def bench_impl(name, case, x, s, b, g, device, passes, args, notes):
    """Rows for one implementation of one case (errors become n/a rows with a note)."""
    rows = []
    try:
        fn, params = make_impl(name, case, x, s, b, g, device)
        gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=x.dtype)
        t0 = time.perf_counter()
        y = fn(*params)  # first call: compiles for composite+compile
        y_ref = y.detach()  # for the agreement of the forward with ours
    except Exception as e:  # noqa: BLE001 -- a failing baseline is a result, not a crash
        return [H.Row(case.name, name, p, note=_short_error(e)) for p in passes], None
    bwd_error = None
    try:
        torch.autograd.grad(y, params, gy)
    except Exception as e:  # noqa: BLE001 -- e.g. PyTorch's learnable fake-quant backward on fp16
        bwd_error = "backward: " + _short_error(e)
    H.sync(device)
    first = time.perf_counter() - t0
    del y
    if name == "composite+compile":
        notes.append(f"{case.name}: composite+compile first fwd+bwd (compile) took {first:.1f} s, excluded")

    # Cold data: every call takes the next of n copies of (x, gy), (n - 1) * |x| >= args.pool, so that
    # the forward (which reads x only) also comes back to a copy only after args.pool bytes, and a
    # host whose last-level cache holds a whole case (480 MiB here) still streams it from memory.
    # (The outputs land in recycled, cache-warm blocks: a forward can exceed the copy roofline.)
    xb = x.numel() * x.element_size()
    n = H.cold_copies(xb, args.pool)
    sets = [(params, gy)] + [((params[0].detach().clone().requires_grad_(params[0].requires_grad),) + tuple(params[1:]),
                              gy.clone()) for _ in range(n - 1)]
    nxt = iter(itertools.cycle(range(n)))

    def fwd():
        return fn(*sets[next(nxt)][0])

    graphs = []

    def bwd():
        y_, prm, g_ = graphs[next(nxt)]
        return torch.autograd.grad(y_, prm, g_, retain_graph=True)

    def fwdbwd():
        prm, g_ = sets[next(nxt)]
        return torch.autograd.grad(fn(*prm), prm, g_)

    for p in passes:
        if p != "fwd" and bwd_error:
            rows.append(H.Row(case.name, name, p, note=bwd_error))
            continue
        try:
            if p == "bwd":
                graphs[:] = [(fn(*prm), prm, g_) for prm, g_ in sets]
                t = H.measure(bwd, args.warmup, args.reps, device=device)
                graphs.clear()
            else:
                t = H.measure(fwd if p == "fwd" else fwdbwd, args.warmup, args.reps, device=device)
            nbytes = BYTES_PER_ELEM_MOVED[p] * case.numel * x.element_size()
            rows.append(H.Row.from_timing(case.name, name, p, t, bytes=nbytes))
        except Exception as e:  # noqa: BLE001
            graphs.clear()
            rows.append(H.Row(case.name, name, p, note=_short_error(e)))
    return rows, y_ref


def agreement_note(y, y_ours, s, axis) -> str:
    """'' when the forward is on the same integer levels as ours; else how many elements differ."""
    if y is None or y_ours is None:
        return ""
    d = (y.float() - y_ours.float()).abs()
    if axis is not None:
        shape = [1] * d.dim()
        shape[axis] = -1
        d = d / s.reshape(shape)
    else:
        d = d / s.reshape(())
    # > 0.5 step: a different integer level (dtype rounding of the output stays far below)
    n = int((d > 0.5).sum())
    return "" if n == 0 else f"fwd level != ours at {n} elem (max {float(d.max()):.2f} steps)"


# ------------------------------------------------------------ page faults
def run_no_cache_child(args) -> list[dict]:
    """The quantkern rows again, in a subprocess with QUANTKERN_CPU_CACHE_MB=0."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "nocache.json")
        cmd = [sys.executable, "-m", "benchmarks.bench_fake_quant_lsq", "--impl", "quantkern", "--no-pagefault",
               "--no-bandwidth", "--no-plot", "--json", out, "--warmup", str(args.warmup), "--dtype", args.dtype,
               "--case", ",".join(args.case), "--pass", ",".join(args.passes), "--device", args.device,
               "--pool-mib", str(args.pool // H.MiB)]
        if args.quick:
            cmd.append("--quick")
        if args.reps is not None:
            cmd += ["--reps", str(args.reps)]
        cmd += ["--threads", str(torch.get_num_threads())]
        env = dict(os.environ, QUANTKERN_CPU_CACHE_MB="0")
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"no-cache subprocess failed ({r.returncode}):\n{r.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)["rows"]


def fresh_alloc_cost(numel: int, dtype, reps, warmup) -> tuple[float, float]:
    """(ms for torch.empty + fill_, ms for fill_ into an existing tensor) of numel elements."""
    buf = torch.empty(numel, dtype=dtype)
    t_existing = H.measure(lambda: buf.fill_(1.0), warmup, reps)
    t_fresh = H.measure(lambda: torch.empty(numel, dtype=dtype).fill_(1.0), warmup, reps)
    return t_fresh.median, t_existing.median


# ------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(p, plot_name="fake_quant_lsq.png")
    p.add_argument("--impl", type=H.comma_list(H.one_of(ALL_IMPLS)), default=None,
                   help=f"comma list from {','.join(ALL_IMPLS)} (default: all that apply; --quick leaves out composite+compile)")
    p.add_argument("--case", type=H.comma_list(H.one_of(CASES)), default=",".join(CASES),
                   help=f"comma list: {','.join(CASES)}")
    p.add_argument("--pass", dest="passes", type=H.comma_list(H.one_of(PASSES)), default=",".join(PASSES),
                   help="comma list: fwd,bwd,fwd+bwd")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of x (parameters stay fp32)")
    p.add_argument("--bw-mib", type=H.positive_int, default=None, help="copy-bandwidth buffer size in MiB (default 256 or twice the last-level cache, whichever is larger; 64 with --quick)")
    p.add_argument("--pool-mib", type=H.nonneg_int, default=None, help="cold-data rotation: copies of x and grad_y covering this "
                   "many MiB (default 1024 or twice the last-level cache, whichever is larger; 0 with --quick: one copy)")
    p.add_argument("--no-pagefault", action="store_true", help="skip the no-cache subprocess (page-fault table)")
    p.add_argument("--no-bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pool = args.pool_mib * H.MiB if args.pool_mib is not None else (0 if args.quick else H.memory_bytes(1024))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.apply_common_args(args)
    out = H.table_stream(args)
    import quantkern

    all_cases = cases(args.quick)
    if args.impl:
        impls = args.impl
        if "quantkern-triton" in impls:
            triton_check(device)
    else:
        impls = ["quantkern"] + (["quantkern-triton"] if device.type == "cuda" else []) + ["torch-learnable", "composite"]
        if not args.quick:
            impls.append("composite+compile")
    dtype = DTYPES[args.dtype]

    info = H.env_info(device)
    bw = bw_start = bw_end = float("nan")
    bw_bytes = args.bw_mib * H.MiB if args.bw_mib else (64 * H.MiB if args.quick else H.memory_bytes(256))
    if not args.no_bandwidth:
        bw = bw_start = H.copy_bandwidth(device, bw_bytes)
    print(f"# fake_quant_lsq benchmark{' (--quick: smoke test, not a measurement)' if args.quick else ''}", file=out)
    print(f"# {H.describe(info)}", file=out)
    print(f"# copy bandwidth (read+write, into an existing buffer): {bw:.1f} GB/s at start", file=out)

    rows: list[H.Row] = []
    notes: list[str] = []
    for cname in args.case:
        case = all_cases[cname]
        x, s, b, g = case.make(device, dtype)
        case_rows: list[H.Row] = []
        y_ours = None
        ours_name = None
        for impl in impls:
            r, y = bench_impl(impl, case, x, s, b, g, device, args.passes, args, notes)
            if impl.startswith("quantkern") and y is not None and y_ours is None:
                y_ours, ours_name = y, impl
            elif y is not None:
                note = agreement_note(y, y_ours, s, case.axis)
                if note:
                    for row in r[:1]:  # on the first pass's row only
                        row.note = (row.note + "; " if row.note else "") + note
            case_rows += r
            del y
        # speedup of ours and the roofline fraction
        for row in case_rows:
            ours = [o for o in case_rows if o.impl == ours_name and o.pass_ == row.pass_]
            row.extra["ours_x"] = row.ms / ours[0].ms if ours and math.isfinite(ours[0].ms) else float("nan")
        rows += case_rows
        notes.append(f"{cname}: {case.label()}, {args.dtype}, grad_scale g = {g:.3g}")
        del x, s, b, y_ours
        gc.collect()

    # Copy bandwidth again at the end; the roofline uses the larger of the two, so a
    # burst of load from elsewhere during one measurement cannot inflate the fractions.
    if not args.no_bandwidth:
        bw_end = H.copy_bandwidth(device, bw_bytes)
        bw = max(bw_start, bw_end)
    for row in rows:
        row.extra["roofline"] = (row.gbps / bw) if row.gbps is not None and bw == bw else float("nan")

    # one table, ordered case -> pass -> impl
    order = {p: i for i, p in enumerate(PASSES)}
    rows.sort(key=lambda r: (args.case.index(r.case), order.get(r.pass_, 9)))
    cols = ["case", "pass", "impl", "ms", "spread", "gbps", "roofline", "ours_x", "note"]
    H.print_table(rows, cols, title="fake_quant_lsq (ours_x = impl ms / ours ms: how many times faster ours is; "
                  "roofline = GB/s / copy GB/s)", file=out, titles={"ours_x": "ours speedup"})
    for n in notes:
        print(f"- {n}", file=out)
    print(f"- copy bandwidth: {bw_start:.1f} GB/s at start, {bw_end:.1f} GB/s at end; roofline uses {bw:.1f} GB/s "
          f"({bw_bytes // H.MiB} MiB buffer, {torch.get_num_threads()} thread(s))", file=out)

    # page-fault cost of ours (CPU host cache on vs off)
    pf_rows: list[H.Row] = []
    if device.type == "cpu" and not args.no_pagefault and "quantkern" in impls:
        cached = {(r.case, r.pass_): r for r in rows if r.impl == "quantkern" and math.isfinite(r.ms)}
        try:
            child = run_no_cache_child(args)
        except Exception as e:  # noqa: BLE001
            print(f"\n(page-fault table skipped: {e})", file=out)
            child = []
        for d in child:
            c = cached.get((d["case"], d["pass"]))
            if c is None or d["ms"] is None:
                continue
            pf = H.Row(d["case"], "quantkern", d["pass"], ms=c.ms, bytes=c.bytes)
            pf.extra.update(no_cache_ms=d["ms"], fault_ms=d["ms"] - c.ms, slowdown_x=d["ms"] / c.ms)
            pf_rows.append(pf)
        if pf_rows:
            H.print_table(pf_rows, ["case", "pass", "ms", "no_cache_ms", "fault_ms", "slowdown_x"], file=out,
                          title="page faults: quantkern with its CPU output cache (ms) vs QUANTKERN_CPU_CACHE_MB=0 "
                          "(subprocess)", titles={"ms": "cached ms", "no_cache_ms": "no-cache ms",
                                                  "fault_ms": "fault cost ms", "slowdown_x": "slowdown"})
            n = max(all_cases[c].numel for c in args.case)
            fresh, existing = fresh_alloc_cost(n, dtype, args.reps, args.warmup)
            print(f"- context: torch.empty({n}) + fill_ {fresh:.2f} ms vs fill_ into an existing tensor "
                  f"{existing:.2f} ms ({fresh / existing:.1f}x); quantkern cache now holds "
                  f"{quantkern._C.cache_bytes() / H.MiB:.0f} MiB", file=out)

    if args.json:
        H.write_json(args.json, rows, meta={**info, "copy_gbps": bw, "copy_gbps_start": bw_start,
                                                  "copy_gbps_end": bw_end, "quick": args.quick, "notes": notes},
                     page_faults=pf_rows)
    H.plot_rows(rows, args, out, title=f"fake_quant_lsq ({H.describe(info)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
