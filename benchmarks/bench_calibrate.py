"""Calibrator time per tensor: the calib_* kernels vs the previous batched PyTorch code vs a per-channel loop.

    python benchmarks/bench_calibrate.py [--tokens 4096 --k 4096 --n 4096 --threads 2 --reps 3]

Cases (one ``collect`` + ``compute_amax``/``compute_range``, the whole calibrator):

* activation ``[tokens, K]`` per tensor (``axis=None``), and a weight ``[N, K]`` per
  output channel (``axis=0``); methods max, percentile, mse, entropy (symmetric, 8 bit,
  2048 bins, start bin 128), plus asymmetric mse / entropy per tensor (ours only: the
  baseline has no asymmetric histogram search).

Rows:

* ``quantkern``: :class:`quantkern.ptq.calibrate.HistogramCalibrator` / ``MaxCalibrator``,
  i.e. the ``calib_histogram`` / ``calib_search`` kernels.
* ``torch-batched (previous)``: a verbatim copy (below, ``_Legacy*``) of the batched
  pure-PyTorch histogram and search that quantkern used before the kernels (bincount
  histogram; prefix-sum entropy and chunked elementwise MSE over all channels at once).
* ``per-channel loop (NVIDIA-style)``: what pytorch-quantization does per channel: a
  Python loop over channels calling the one-channel reference
  (:mod:`quantkern.reference.calibrate`: ``abs_histogram`` + ``amax_*``, itself a loop
  over candidates). Too slow to run for every channel: a few channels are timed and the
  total is extrapolated (``note`` says so).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _harness as H  # noqa: E402
from quantkern.ptq.calibrate import HistogramCalibrator, MaxCalibrator  # noqa: E402
from quantkern.reference import calibrate as R  # noqa: E402


# ---------------------------------------------------------------- baseline: the previous batched PyTorch code
class _LegacyHistogram:
    """The previous HistogramCalibrator's histogram + searches (pure PyTorch), symmetric only."""

    CHUNK = 1 << 22

    def __init__(self, method, axis, num_bins=2048, num_bits=8, start_bin=128, stride=1, percentile=99.99):
        self.method, self.axis, self.num_bins, self.bits = method, axis, num_bins, num_bits
        self.start_bin, self.stride, self.percentile = start_bin, stride, percentile
        self._R = None

    def collect(self, x):
        x = x.detach()
        xc = (x.reshape(1, -1) if self.axis is None else x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)).float()
        if not torch.isfinite(xc).all():
            raise ValueError("x contains NaN or Inf")
        C, M = xc.shape
        a = xc.abs()
        bmax = a.amax(1)
        if self._R is None:
            self._R = torch.zeros(C)
            self._n = torch.zeros(C, dtype=torch.long)
            self._pos = torch.zeros(C, self.num_bins, dtype=torch.long)
            self._neg = torch.zeros_like(self._pos)
        init = (self._R == 0) & (bmax > 0)
        self._R = torch.where(init, bmax, self._R)
        self._n = torch.where(init, torch.full_like(self._n, self.num_bins), self._n)
        B = self._pos.shape[1]
        live = self._R > 0
        if live.any():
            R_ = torch.where(live, self._R, torch.ones_like(self._R))[:, None]
            n = self._n.float()[:, None]
            idx = torch.trunc(a * n / R_).long()
            idx = torch.minimum(idx.clamp_(min=0), (self._n[:, None] - 1).clamp(min=0))
            flat = idx + torch.arange(C)[:, None] * B + (xc < 0).long() * (C * B)
            flat = flat[live]
            counts = torch.bincount(flat.reshape(-1), minlength=2 * C * B)
            self._pos += counts[: C * B].reshape(C, B)
            self._neg += counts[C * B:].reshape(C, B)

    def compute_amax(self):
        hist = (self._pos + self._neg).double()
        B = hist.shape[1]
        width = self._R.double() / self._n.clamp(min=1).double()
        edges = torch.arange(B + 1, dtype=torch.float64)[None, :] * width[:, None]
        n = self._n
        if self.method == "percentile":
            total = hist.sum(1, keepdim=True)
            cdf = torch.cumsum(hist / torch.where(total > 0, total, torch.ones_like(total)), 1)
            v = torch.full((hist.shape[0], 1), self.percentile / 100, dtype=torch.float64)
            idx = torch.minimum(torch.searchsorted(cdf, v)[:, 0], n)
            return edges.gather(1, idx[:, None])[:, 0].float()
        if self.method == "entropy":
            return self._entropy(hist, edges, n).float()
        return self._mse(hist, edges, n).float()

    @staticmethod
    def _xlogx(t):
        return torch.where(t > 0, t * torch.log(torch.where(t > 0, t, torch.ones_like(t))), torch.zeros_like(t))

    def _entropy(self, hist, edges, n):
        C, B = hist.shape
        nb = 1 << (self.bits - 1)
        bins = hist.clone()
        bins[:, 0] = bins[:, 1]
        T = bins.sum(1)
        zc = torch.zeros(C, 1, dtype=torch.float64)
        cb = torch.cat([zc, bins.cumsum(1)], 1)
        cz = torch.cat([zc, (bins != 0).double().cumsum(1)], 1)
        cbl = torch.cat([zc, self._xlogx(bins).cumsum(1)], 1)
        cand = torch.arange(self.start_bin, B + 1, self.stride)
        I = cand.numel()
        k = torch.arange(nb + 1)
        lo = torch.div(k[None, :] * cand[:, None] + nb - 1, nb, rounding_mode="floor")
        k_last = torch.div((cand - 1) * nb, cand, rounding_mode="floor")
        step = max(1, self.CHUNK // (I * (nb + 1)))
        divs = torch.empty(C, I, dtype=torch.float64)
        for c0 in range(0, C, step):
            sl = slice(c0, min(C, c0 + step))
            cbs, czs = cb[sl], cz[sl]
            Sb = cbs[:, lo.reshape(-1)].reshape(cbs.shape[0], I, nb + 1)
            Zb = czs[:, lo.reshape(-1)].reshape(cbs.shape[0], I, nb + 1)
            S = Sb[:, :, 1:] - Sb[:, :, :-1]
            Z = Zb[:, :, 1:] - Zb[:, :, :-1]
            has = Z > 0
            avg = torch.where(has, S / torch.where(has, Z, torch.ones_like(Z)), torch.ones_like(S))
            plogq = torch.where(has, S * torch.log(torch.where(avg > 0, avg, torch.ones_like(avg))), torch.zeros_like(S)).sum(2)
            Ts = T[sl][:, None]
            head = cbs[:, cand]
            tail = Ts - head
            blast = bins[sl][:, cand - 1]
            avg_last = avg.gather(2, k_last[None, :, None].expand(avg.shape[0], I, 1))[:, :, 0]
            plogq = plogq + torch.where(tail > 0, tail * torch.log(avg_last), torch.zeros_like(tail))
            plogp = cbl[sl][:, cand - 1] + self._xlogx(blast + tail)
            Tsafe = torch.where(Ts > 0, Ts, torch.ones_like(Ts))
            hsafe = torch.where(head > 0, head, torch.ones_like(head))
            d = (plogp - plogq) / Tsafe - torch.log(Tsafe) + torch.log(hsafe)
            inf = ((tail > 0) & (blast == 0)) | (head <= 0)
            divs[sl] = torch.where(inf, torch.full_like(d, float("inf")), d)
        valid = cand[None, :] <= n[:, None]
        dv = torch.where(valid, divs, torch.full_like(divs, float("inf")))
        ok = valid & (divs <= dv.amin(1, keepdim=True) + R.TIE_TOL)
        pos = torch.arange(I)[None, :].expand(C, I)
        last = torch.where(ok, pos, torch.full_like(pos, -1)).amax(1)
        return edges.gather(1, cand[last.clamp(min=0)][:, None])[:, 0]

    def _mse(self, hist, edges, n):
        C, B = hist.shape
        centers = (edges[:, 1:] + edges[:, :-1]) / 2
        cand = torch.arange(self.start_bin, B, self.stride)
        hi = 2.0 ** (self.bits - 1) - 1.0
        I = cand.numel()
        errs = torch.empty(C, I, dtype=torch.float64)
        cc = max(1, self.CHUNK // (I * B))
        ci = min(I, max(1, self.CHUNK // (cc * B)))
        nn_ = n.clamp(min=1).double()
        for c0 in range(0, C, cc):
            cen = centers[c0:c0 + cc]
            h = hist[c0:c0 + cc][:, None, :]
            for i0 in range(0, I, ci):
                a = cen[:, cand[i0:i0 + ci]][:, :, None]
                s = hi / torch.where(a > 0, a, torch.ones_like(a))
                qc = torch.clamp(torch.round(cen[:, None, :] * s), -hi, hi) / s
                errs[c0:c0 + cc, i0:i0 + ci] = ((qc - cen[:, None, :]) ** 2 * h).sum(2) / nn_[c0:c0 + cc, None]
        valid = cand[None, :] < n[:, None]
        errs = torch.where(valid, errs, torch.full_like(errs, float("inf")))
        return centers.gather(1, cand[errs.argmin(1)][:, None])[:, 0]


# ---------------------------------------------------------------- rows
def _ours(method, axis, symmetric=True):
    def run(x):
        cal = MaxCalibrator(8, axis=axis, symmetric=symmetric) if method == "max" else HistogramCalibrator(
            method, 8, axis=axis, symmetric=symmetric)
        cal.collect(x)
        return cal.compute_amax() if symmetric else cal.compute_range()
    return run


def _legacy(method, axis):
    def run(x):
        if method == "max":  # unchanged code: the same torch reduction as ours
            xc = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
            return xc.float().abs().amax(1)
        cal = _LegacyHistogram(method, axis)
        cal.collect(x)
        return cal.compute_amax()
    return run


def _loop_per_channel(method, x, axis, max_channels):
    """NVIDIA-style: Python loop over channels, the one-channel reference each. Returns (ms total,
    channels timed). One untimed channel first (one-off costs of the first call would otherwise be
    multiplied by the extrapolation), then ``max_channels`` channels timed and scaled to all C."""
    xc = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    C = xc.shape[0]
    k = min(C, max_channels)

    def one(c):
        if method == "max":
            xc[c].abs().max()
            return
        h, e = R.abs_histogram(xc[c], 2048)
        if method == "percentile":
            R.amax_percentile(h, e, 99.99)
        elif method == "mse":
            R.amax_mse(h, e, 8)
        else:
            R.amax_entropy(h, e, 8)

    one(C - 1)  # warm-up (a channel outside the timed ones when k < C)
    t0 = time.perf_counter()
    for c in range(k):
        one(c)
    return (time.perf_counter() - t0) * 1e3 * C / k, k


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # sizes default to None: --quick picks small defaults, but explicit sizes win over --quick
    p.add_argument("--tokens", type=H.positive_int, default=None, help="activation rows (default 4096; 64 with --quick)")
    p.add_argument("--k", type=H.positive_int, default=None, help="columns (default 4096; 256 with --quick)")
    p.add_argument("--n", type=H.positive_int, default=None, help="weight rows (default 4096; 16 with --quick)")
    p.add_argument("--loop-channels", type=H.positive_int, default=16,
                   help="channels timed for the per-channel loop (extrapolated)")
    p.add_argument("--legacy-channels", type=H.positive_int, default=None,
                   help="per-channel mse/entropy: channels the previous code is timed on (scaled up; default 512, "
                        "8 with --quick)")
    p.add_argument("--no-loop", action="store_true", help="skip the per-channel reference loop rows")
    H.add_common_args(p, warmup=1, reps_help="timed repetitions per measurement (default 5)")
    args = p.parse_args(argv)
    dev = H.apply_common_args(args)
    if dev.type != "cpu":
        raise SystemExit("bench_calibrate: CPU only for now (the baseline copy is CPU code)")
    for name, full, quick in (("tokens", 4096, 64), ("k", 4096, 256), ("n", 4096, 16), ("legacy_channels", 512, 8)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    g = torch.Generator().manual_seed(0)
    act = torch.randn(args.tokens, args.k, generator=g) * torch.rand(args.k, generator=g) * 3  # channel-varying scale
    act[:, :4] *= 20  # outlier features, as in LLM activations
    w = torch.randn(args.n, args.k, generator=g) * 0.02
    out = H.table_stream(args)
    info = H.env_info(dev)
    print(H.describe(info), file=out)
    rows = []
    reps = args.reps or 5
    cases = [(f"act [{args.tokens}x{args.k}] per tensor", act, None), (f"weight [{args.n}x{args.k}] per channel", w, 0)]
    for case, x, axis in cases:
        for method in ("max", "percentile", "mse", "entropy"):
            t_ours = H.measure(lambda: _ours(method, axis)(x), warmup=args.warmup, reps=reps)
            a_ours = _ours(method, axis)(x)
            rows.append(H.Row(case, "quantkern", method, t_ours.median, t_ours.spread))
            # the previous code's mse / entropy over thousands of channels takes minutes: time a
            # slice of the channels (the work is per channel) and scale up
            C = 1 if axis is None else x.shape[axis]
            sub = C if (axis is None or method in ("max", "percentile")) else min(C, args.legacy_channels)
            xs = x if sub == C else x.narrow(axis, 0, sub)
            t_old = H.measure(lambda: _legacy(method, axis)(xs), warmup=args.warmup, reps=reps if sub == C else 3)
            a_old = _legacy(method, axis)(xs)
            same = torch.equal(a_ours.reshape(-1)[:sub], a_old.reshape(-1))
            ms_old = t_old.median * C / sub
            note = ("same amax" if same else "amax differs") + ("" if sub == C else f"; {sub} of {C} channels timed, scaled")
            rows.append(H.Row(case, "torch-batched (previous)", method, ms_old, t_old.spread, note=note,
                              extra={"ours_x": ms_old / t_ours.median}))
            if not args.no_loop:
                ms, k = _loop_per_channel(method, x, axis, 1 if axis is None else args.loop_channels)
                C = 1 if axis is None else x.shape[axis]
                note = "measured" if k == C else f"{k} of {C} channels timed, extrapolated"
                rows.append(H.Row(case, "per-channel loop (NVIDIA-style)", method, ms, float("nan"), note=note,
                                  extra={"ours_x": ms / t_ours.median}))
        if axis is None:
            for method in ("mse", "entropy"):
                t = H.measure(lambda: _ours(method, axis, symmetric=False)(x), warmup=args.warmup, reps=reps)
                rows.append(H.Row(case, "quantkern", f"{method} asym (stride 16)", t.median, t.spread))
    H.print_table(rows, ["case", "impl", "pass_", "ms", "spread", "ours_x", "note"], title="Calibrators (collect + compute)",
                  file=out, titles={"pass_": "method", "ours_x": "ours speedup"})
    if args.json:
        H.write_json(args.json, rows, info)
    H.plot_rows(rows, args, out, title=f"calibrators ({H.describe(info)})")


if __name__ == "__main__":
    main()
