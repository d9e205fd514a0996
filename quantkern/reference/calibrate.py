"""Reference histogram calibrators: one tensor (one channel) at a time, loops allowed.

These follow NVIDIA pytorch-quantization's ``calib/histogram.py``
(``_compute_amax_entropy``, ``_compute_amax_mse``, ``_compute_amax_percentile``)
line by line, in float64 torch instead of numpy/scipy. The batched,
per-channel implementations in :mod:`quantkern.ptq.calibrate` are tested
against these.

Histogram convention (the first batch of ``torch.histc(|x|, bins, min=0, max=amax)``):
bin ``k`` of ``n`` covers ``[k*R/n, (k+1)*R/n)``, the index of a value is
``trunc(|x| * n / R)`` (fp32, clamped to ``n - 1``; :func:`bin_index`) and edge ``k`` is
``k * (R / n)`` in float64 (NVIDIA uses ``torch.linspace``, which may differ
from this in the last ulp).

Deliberate differences from NVIDIA, also in the batched version:

* entropy: divergences within ``TIE_TOL`` (absolute) of the minimum count as
  ties and the last of them wins (NVIDIA: exact last argmin). Two correct
  float64 evaluations of the same divergence differ in the last bits, so an
  exact "last argmin" is not reproducible across formulations.
* mse: errors within ``MSE_RTOL`` (relative) of the minimum count as ties and the
  first of them wins (NVIDIA: exact first argmin), for the same reason: windows with
  equal error (exact ties occur on small integer histograms) came out in a different
  order from each backend's summation.
* entropy with fewer than ``start_bin`` bins, or mse with at most ``start_bin``
  bins, has no candidate: the amax is the top edge (NVIDIA raises).
* a histogram with no data (all zeros) gives amax 0.
* entropy candidates whose first ``i`` bins merge into an all-zero Q (no data below
  ~``i / n`` of the range) have infinite divergence (NVIDIA: scipy's entropy gives NaN,
  which its argmin picks).
* the streaming histogram (``quantkern.ptq.HistogramCalibrator``) keeps NVIDIA's bin width
  as later batches widen it up to ``16 * num_bins`` bins per channel (fewer with many
  channels), then merges bins by powers of two; NVIDIA never merges.
* percentile: the running counts (exact integers in float64) are compared with
  ``total * p / 100`` (NVIDIA: a normalised cdf, ``cumsum(hist / total)``, against
  ``p / 100``). The normalised cdf can end just below 1.0, so percentile 100 gave the
  top non-empty bin's left edge or the histogram's top edge depending on rounding.
"""
from __future__ import annotations

import torch

TIE_TOL = 1e-9
MSE_RTOL = 1e-10


def first_min(errs) -> int:
    """Index of the first error within ``MSE_RTOL`` (relative) of the smallest (mse's tie rule)."""
    e = torch.as_tensor(errs, dtype=torch.float64)
    m = e.min()
    return int(torch.nonzero(e <= m + m * MSE_RTOL).min())  # m + m * rtol: as the kernels round it


def bin_index(a: torch.Tensor, num_bins: int, R: torch.Tensor) -> torch.Tensor:
    """Bin of each ``a = |x|`` (fp32): ``trunc(a * n / R)`` in fp32, clamped to ``n - 1``.

    Where ``a * n`` overflows fp32 (``a`` above ~FLT_MAX / n, e.g. 1.7e35 for 2048 bins) the
    quotient is taken on ``a`` and ``R`` scaled by 2^-64 (exact for such values), i.e. what fp32
    would give with an unbounded exponent; a quotient still beyond fp32 is the last bin. This is
    the kernels' ``calib_ratio`` (csrc/shared/calibrate.h).
    """
    t = a * float(num_bins) / R
    big = ~(t <= 3.0e38) & (a <= 3.4028234664e38)
    if bool(big.any()):
        ts = (a * 2.0**-64 * float(num_bins)) / (R * 2.0**-64)
        t = torch.where(big, ts.clamp(max=3.0e38), t)
    return torch.trunc(t.clamp(max=float(num_bins - 1))).long()


def abs_histogram(x: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of |x| over [0, max|x|]: (counts float64 [num_bins], edges float64 [num_bins + 1])."""
    a = x.detach().reshape(-1).float().abs()
    amax = a.max() if a.numel() else torch.zeros(())
    if amax == 0:
        counts = torch.zeros(num_bins, dtype=torch.float64)
        counts[0] = a.numel()
        return counts, torch.zeros(num_bins + 1, dtype=torch.float64)
    idx = bin_index(a, num_bins, amax)
    counts = torch.bincount(idx, minlength=num_bins).double()
    edges = torch.arange(num_bins + 1, dtype=torch.float64) * (amax.double() / num_bins)
    return counts, edges


def amax_percentile(hist: torch.Tensor, edges: torch.Tensor, percentile: float = 99.99) -> torch.Tensor:
    """``edges[searchsorted(cumsum(hist), total * percentile / 100)]`` (float64 scalar).

    That is the left edge of the bin holding the quantile (NVIDIA's rule), except in bin 0, whose
    left edge is 0: there the right edge, so data that is not all zero never gets amax 0 (it
    happens when one outlier stretches the histogram past ~2048x the bulk's range).
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    hist = hist.double()
    total = hist.sum()
    if total == 0:
        return torch.zeros((), dtype=torch.float64)
    idx = int(torch.searchsorted(torch.cumsum(hist, 0), (total * (percentile / 100)).reshape(1)))
    return edges.double()[min(max(idx, 1), edges.numel() - 1)]


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


def _merge_levels(head: torch.Tensor, nbins: int) -> torch.Tensor:
    """Q of the entropy rule: the i bins of ``head`` merged into ``nbins`` levels, each level's
    count spread evenly over its non-empty bins (empty bins stay 0)."""
    i = head.numel()
    # np.digitize(range(i), linspace(0, i, nbins + 1)) - 1 == floor(j * nbins / i) (exact: nbins is a power of 2)
    level = torch.div(torch.arange(i) * nbins, i, rounding_mode="floor")
    nz = head != 0
    sums = torch.zeros(nbins, dtype=torch.float64).index_add_(0, level[nz], head[nz])
    cnts = torch.bincount(level[nz], minlength=nbins).double()
    q = torch.zeros(i, dtype=torch.float64)
    q[nz] = sums[level[nz]] / cnts[level[nz]]
    return q


def entropy_divergences(hist: torch.Tensor, num_bits: int, unsigned: bool = False, stride: int = 1, start_bin: int = 128):
    """(candidates i [list of int], KL(P_i || Q_i) [list of float]) exactly as NVIDIA's loop."""
    bins = hist.double().clone()
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1 + int(unsigned))
    cands, divs = [], []
    for i in range(start_bin, bins.numel() + 1, stride):
        head = bins[:i]
        q = _merge_levels(head, nbins)
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
    # a true division, as NVIDIA's `max_bound / amax` of two tensors and the kernels: torch's
    # `float / tensor` is `tensor.reciprocal() * float` (two roundings), which broke exact ties of
    # the MSE search differently from the kernels
    s = torch.as_tensor(hi, dtype=amax.dtype, device=amax.device) / amax if isinstance(amax, torch.Tensor) else hi / amax
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
    """Bin center with the smallest histogram-weighted squared error (first argmin, :func:`first_min`)."""
    # no data, or only zeros (every edge 0: the candidates' scales would be inf and every error NaN)
    if hist.double().sum() == 0 or edges.double()[-1] == 0:
        return torch.zeros((), dtype=torch.float64)
    cands, errs = mse_errors(hist, edges, num_bits, unsigned, stride, start_bin)
    e = edges.double()
    if not cands:
        return e[-1]
    i = cands[first_min(errs)]
    return (e[i] + e[i + 1]) / 2


# --------------------------------------------------------------------------- asymmetric (signed) histograms
# Why a definition of our own: NVIDIA's entropy and histogram-MSE calibrators are
# symmetric only. The asymmetric versions below keep their spirit (same histogram,
# same KL / squared-error objective, same tie rules) on a signed histogram.
#
# Signed histogram (what HistogramCalibrator keeps): ``pos[k]`` counts values in
# ``[k*w, (k+1)*w)`` (exact zeros included), ``neg[k]`` values in ``(-(k+1)*w, -k*w]``
# with ``x < 0``, for ``k < n``; the index is the symmetric one, ``trunc(|x| * n / R)``.
# Reading the bins left to right, ``neg[n-1] .. neg[0] pos[0] .. pos[n-1]``, value 0 is
# the edge between ``neg[0]`` and ``pos[0]``.
#
# Candidates: windows ``[-a*w, b*w]`` that contain 0, ``a`` and ``b`` multiples of
# ``stride`` with ``0 <= a <= A``, ``0 <= b <= Bx`` and ``a + b >= start_bin``, where
# ``A = ceil(un / stride) * stride`` and ``Bx = ceil(up / stride) * stride`` round up the
# used extents ``un`` / ``up`` (index of the last non-empty neg / pos bin + 1; bins past
# the histogram count as empty). Candidate order: ``a`` outer, ``b`` inner, ascending.
# The search costs O((A/stride) * (Bx/stride)) candidates, so HistogramCalibrator uses
# ``stride=16`` by default in asymmetric mode.
#
# * entropy: as the symmetric rule, the bin holding the exact zeros (``pos[0]``) is
#   replaced by its neighbour ``pos[1]`` first. For a window of ``i = a + b`` bins,
#   P = the window's bins with everything left of it folded into its first bin and
#   everything right of it into its last bin; Q = the unfolded window merged into
#   ``2^num_bits`` levels (bin ``j`` of the window -> level ``floor(j * 2^b / i)``), each
#   level's count spread evenly over its non-empty bins. KL(P || Q) as
#   :func:`kl_divergence`; the smallest wins, ties within ``TIE_TOL`` go to the last.
# * mse: the window is the range of asymmetric fake quantization with ``2^b`` levels,
#   ``scale = (a + b) * w / (2^b - 1)``, ``zero = round(a * w / scale)``; error = sum over
#   the (unmodified) bins of ``count * (fq(center) - center)^2``; first argmin.
#
# ``(amin, amax) = (-a*w, b*w)`` of the chosen window; with no candidate
# (``A + Bx < start_bin``) the used range ``(-un*w, up*w)``; an empty histogram (0, 0).
def signed_histogram(x: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(pos float64 [num_bins], neg float64 [num_bins], width) of one tensor, R = max|x| (fp32)."""
    xf = x.detach().reshape(-1).float()
    a = xf.abs()
    R = a.max() if a.numel() else torch.zeros(())
    if R == 0:
        pos = torch.zeros(num_bins, dtype=torch.float64)
        pos[0] = a.numel()
        return pos, torch.zeros(num_bins, dtype=torch.float64), 0.0
    idx = bin_index(a, num_bins, R)
    pos = torch.bincount(idx[xf >= 0], minlength=num_bins).double()
    neg = torch.bincount(idx[xf < 0], minlength=num_bins).double()
    return pos, neg, float(R.double() / num_bins)


def _extent(h: torch.Tensor) -> int:
    nz = torch.nonzero(h)
    return int(nz.max()) + 1 if nz.numel() else 0


def _asym_candidates(un: int, up: int, stride: int, start_bin: int):
    """Windows (a, b) in bins below / above 0 on the stride grid, a + b >= start_bin. A side that
    holds values keeps at least one stride of it: with a = 0 entropy folded the whole negative
    half into the window's first bin, which KL(P || Q) hardly penalises (P folds the same way),
    and picked one-sided windows for two-sided data."""
    A = -(-un // stride) * stride
    Bx = -(-up // stride) * stride
    return [(a, b) for a in range(0, A + 1, stride) for b in range(0, Bx + 1, stride)
            if a + b >= start_bin and (a > 0 or un == 0) and (b > 0 or up == 0)], A, Bx


def entropy_divergences_asym(pos, neg, num_bits: int, stride: int = 16, start_bin: int = 128):
    """(windows [(a, b)], KL(P || Q) [float]) of the asymmetric entropy rule (see above)."""
    pos = pos.double().clone()
    neg = neg.double()
    if pos.numel() > 1:
        pos[0] = pos[1]
    un, up = _extent(neg), _extent(pos)
    cands, A, Bx = _asym_candidates(un, up, stride, start_bin)
    ext = torch.zeros(A + Bx, dtype=torch.float64)  # neg[A-1] .. neg[0] pos[0] .. pos[Bx-1]
    ext[A - un:A] = neg[:un].flip(0)
    ext[A:A + up] = pos[:up]
    nb = 1 << num_bits
    divs = []
    for a, b in cands:
        i = a + b
        win = ext[A - a:A + b]
        q = _merge_levels(win, nb)
        p = win.clone()
        p[0] += ext[:A - a].sum()
        p[-1] += ext[A + b:].sum()
        divs.append(kl_divergence(p, q))
    return cands, divs, (un, up)


def range_entropy_asym(pos, neg, width: float, num_bits: int, stride: int = 16, start_bin: int = 128):
    """(amin, amax) float64 scalars of the asymmetric entropy rule (see above)."""
    if pos.double().sum() + neg.double().sum() == 0:
        return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    cands, divs, (un, up) = entropy_divergences_asym(pos, neg, num_bits, stride, start_bin)
    if not cands:
        return torch.tensor(-un * width, dtype=torch.float64), torch.tensor(up * width, dtype=torch.float64)
    d = torch.tensor(divs, dtype=torch.float64)
    last = int(torch.nonzero(d <= d.min() + TIE_TOL).max())
    a, b = cands[last]
    return torch.tensor(-a * width, dtype=torch.float64), torch.tensor(b * width, dtype=torch.float64)


def mse_errors_asym(pos, neg, width: float, num_bits: int, stride: int = 16, start_bin: int = 128):
    """(windows [(a, b)], sum of count * (fq(center) - center)^2 [float]) of the asymmetric MSE rule."""
    pos, neg = pos.double(), neg.double()
    un, up = _extent(neg), _extent(pos)
    cands, _, _ = _asym_candidates(un, up, stride, start_bin)
    k = torch.arange(pos.numel(), dtype=torch.float64)
    cen = (k * width + (k + 1) * width) / 2
    centers = torch.cat([-cen, cen])
    counts = torch.cat([neg, pos])
    qmax = float(2**num_bits - 1)
    errs = []
    for a, b in cands:
        amin, amax = -a * width, b * width
        s = (amax - amin) / qmax
        z = round(-amin / s)  # Python round: half to even
        fq = (torch.clamp(torch.round(centers / s) + z, 0.0, qmax) - z) * s
        errs.append(float(((fq - centers) ** 2 * counts).sum()))
    return cands, errs, (un, up)


def range_mse_asym(pos, neg, width: float, num_bits: int, stride: int = 16, start_bin: int = 128):
    """(amin, amax) float64 scalars of the asymmetric histogram-MSE rule (first argmin, :func:`first_min`)."""
    if pos.double().sum() + neg.double().sum() == 0:
        return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    cands, errs, (un, up) = mse_errors_asym(pos, neg, width, num_bits, stride, start_bin)
    if not cands:
        return torch.tensor(-un * width, dtype=torch.float64), torch.tensor(up * width, dtype=torch.float64)
    a, b = cands[first_min(errs)]
    return torch.tensor(-a * width, dtype=torch.float64), torch.tensor(b * width, dtype=torch.float64)
