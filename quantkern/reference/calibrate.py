"""Reference histogram calibrators: one tensor (one channel) at a time, loops allowed.

These follow NVIDIA pytorch-quantization's ``calib/histogram.py``
(``_compute_amax_entropy``, ``_compute_amax_mse``, ``_compute_amax_percentile``)
line by line, in float64 torch instead of numpy/scipy. The batched,
per-channel implementations in :mod:`quantkern.ptq.calibrate` are tested
against these.

Histogram convention (the first batch of ``torch.histc(|x|, bins, min=0, max=amax)``):
bin ``k`` of ``n`` covers ``[k*R/n, (k+1)*R/n)``, the index of a value is
``trunc(|x| * n / R)`` (fp32, clamped to ``n - 1``) and edge ``k`` is
``k * (R / n)`` in float64 (NVIDIA uses ``torch.linspace``, which may differ
from this in the last ulp).

Deliberate differences from NVIDIA, also in the batched version:

* entropy: divergences within ``TIE_TOL`` (absolute) of the minimum count as
  ties and the last of them wins (NVIDIA: exact last argmin). Two correct
  float64 evaluations of the same divergence differ in the last bits, so an
  exact "last argmin" is not reproducible across formulations.
* entropy with fewer than ``start_bin`` bins, or mse with at most ``start_bin``
  bins, has no candidate: the amax is the top edge (NVIDIA raises).
* a histogram with no data (all zeros) gives amax 0.
"""
from __future__ import annotations

import torch

TIE_TOL = 1e-9


def abs_histogram(x: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of |x| over [0, max|x|]: (counts float64 [num_bins], edges float64 [num_bins + 1])."""
    a = x.detach().reshape(-1).float().abs()
    amax = a.max() if a.numel() else torch.zeros(())
    if amax == 0:
        counts = torch.zeros(num_bins, dtype=torch.float64)
        counts[0] = a.numel()
        return counts, torch.zeros(num_bins + 1, dtype=torch.float64)
    idx = torch.trunc(a * float(num_bins) / amax).long().clamp_(0, num_bins - 1)
    counts = torch.bincount(idx, minlength=num_bins).double()
    edges = torch.arange(num_bins + 1, dtype=torch.float64) * (amax.double() / num_bins)
    return counts, edges


def amax_percentile(hist: torch.Tensor, edges: torch.Tensor, percentile: float = 99.99) -> torch.Tensor:
    """``edges[searchsorted(cdf, percentile / 100)]`` with ``cdf = cumsum(hist / total)`` (float64 scalar)."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    hist = hist.double()
    total = hist.sum()
    if total == 0:
        return torch.zeros((), dtype=torch.float64)
    cdf = torch.cumsum(hist / total, 0)
    idx = int(torch.searchsorted(cdf, torch.tensor([percentile / 100], dtype=torch.float64)))
    return edges.double()[min(idx, edges.numel() - 1)]


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """scipy.stats.entropy(p, q): both normalised; sum of p log(p/q) over p > 0; inf where q = 0 < p (or q all 0)."""
    if q.sum() == 0:
        return float("inf")
    p = p.double() / p.sum()
    q = q.double() / q.sum()
    m = p > 0
    if bool((q[m] == 0).any()):
        return float("inf")
    return float((p[m] * torch.log(p[m] / q[m])).sum())


def entropy_divergences(hist: torch.Tensor, num_bits: int, unsigned: bool = False, stride: int = 1, start_bin: int = 128):
    """(candidates i [list of int], KL(P_i || Q_i) [list of float]) exactly as NVIDIA's loop."""
    bins = hist.double().clone()
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1 + int(unsigned))
    cands, divs = [], []
    for i in range(start_bin, bins.numel() + 1, stride):
        # np.digitize(range(i), linspace(0, i, nbins + 1)) - 1 == floor(j * nbins / i) (exact: nbins is a power of 2)
        level = torch.div(torch.arange(i) * nbins, i, rounding_mode="floor")
        head = bins[:i]
        nz = head != 0
        sums = torch.zeros(nbins, dtype=torch.float64).index_add_(0, level[nz], head[nz])
        cnts = torch.bincount(level[nz], minlength=nbins).double()
        q = torch.zeros(i, dtype=torch.float64)
        q[nz] = sums[level[nz]] / cnts[level[nz]]
        p = head.clone()
        p[-1] += bins[i:].sum()
        cands.append(i)
        divs.append(kl_divergence(p, q))
    return cands, divs


def amax_entropy(hist, edges, num_bits: int, unsigned: bool = False, stride: int = 1, start_bin: int = 128) -> torch.Tensor:
    """Edge ``i`` of the candidate with the smallest KL divergence (the last among ties, see module doc)."""
    if hist.double().sum() == 0:
        return torch.zeros((), dtype=torch.float64)
    cands, divs = entropy_divergences(hist, num_bits, unsigned, stride, start_bin)
    if not cands:
        return edges.double()[-1]
    d = torch.tensor(divs, dtype=torch.float64)
    best = d.min()
    last = int(torch.nonzero(d <= best + TIE_TOL).max())
    return edges.double()[cands[last]]


def fake_tensor_quant(x: torch.Tensor, amax, num_bits: int, unsigned: bool = False, narrow_range: bool = True) -> torch.Tensor:
    """pytorch-quantization's symmetric fake quant: ``clamp(round(x * s), lo, hi) / s``, ``s = hi / amax``."""
    hi = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    lo = 0.0 if unsigned else (-hi if narrow_range else -hi - 1.0)
    s = hi / amax
    return torch.clamp(torch.round(x * s), lo, hi) / s


def mse_errors(hist, edges, num_bits: int, unsigned: bool = False, stride: int = 1, start_bin: int = 128):
    """(candidate bins i, mean((fq(centers; amax=centers[i]) - centers)^2 * counts)) as NVIDIA's loop."""
    counts = hist.double()
    e = edges.double()
    centers = (e[1:] + e[:-1]) / 2
    cands, errs = [], []
    for i in range(start_bin, centers.numel(), stride):
        qc = fake_tensor_quant(centers, centers[i], num_bits, unsigned)
        cands.append(i)
        errs.append(float(((qc - centers) ** 2 * counts).mean()))
    return cands, errs


def amax_mse(hist, edges, num_bits: int, unsigned: bool = False, stride: int = 1, start_bin: int = 128) -> torch.Tensor:
    """Bin center with the smallest histogram-weighted squared error (first argmin)."""
    if hist.double().sum() == 0:
        return torch.zeros((), dtype=torch.float64)
    cands, errs = mse_errors(hist, edges, num_bits, unsigned, stride, start_bin)
    e = edges.double()
    if not cands:
        return e[-1]
    i = cands[int(torch.tensor(errs).argmin())]
    return (e[i] + e[i + 1]) / 2
