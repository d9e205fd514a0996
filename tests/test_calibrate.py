"""Calibrators: batched per-channel implementations against per-channel loops of the reference."""
import math

import pytest
import torch

import quantkern.ptq
import quantkern.reference.calibrate as R
from quantkern.ptq.calibrate import (
    ActQuantizer,
    HistogramCalibrator,
    MaxCalibrator,
    MseCalibrator,
    compute_amax,
    fake_quant,
    fake_quant_dynamic,
    fake_quant_static,
    make_calibrator,
    quant_range,
    range_to_qparams,
)

BINS = 512  # small histograms keep the reference loops fast
METHODS_ALL = ("max", "percentile", "mse", "entropy", "mse_search")


def _data(C=5, M=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(C, M, generator=g) * (torch.rand(C, 1, generator=g) * 3 + 0.1)
    if C > 1:
        x[1] = torch.distributions.Laplace(0.0, 1.0).sample((M,))
    if C > 2:
        x[2] = torch.relu(x[2])  # many zeros (bin 0 replaced by bin 1 in entropy)
    if C > 3:
        x[3, :5] *= 20  # outliers
    return x


def _ref_amax(method, h, e, bits, unsigned=False, start_bin=128, stride=1, percentile=99.99):
    if method == "entropy":
        return R.amax_entropy(h, e, bits, unsigned, stride, start_bin)
    if method == "mse":
        return R.amax_mse(h, e, bits, unsigned, stride, start_bin)
    return R.amax_percentile(h, e, percentile)


# ------------------------------------------------------------------ histogram
def test_histogram_matches_histc():
    x = _data()
    cal = HistogramCalibrator("percentile", axis=0, num_bins=2048)
    cal.collect(x)
    hist, edges, n = cal.histogram()
    for c in range(x.shape[0]):
        a = x[c].abs()
        want = torch.histc(a, bins=2048, min=0, max=float(a.max()))
        assert torch.equal(hist[c].float(), want)
        h, e = R.abs_histogram(x[c], 2048)
        assert torch.equal(hist[c], h) and torch.equal(edges[c], e)
    assert (n == 2048).all()


def _stream_hist_bruteforce(batches, num_bins):
    """Per channel, per batch: the growth rule of the module docstring, with Python loops."""
    C = batches[0].shape[0]
    out = []
    for c in range(C):
        R_, n_, hist, pending = 0.0, 0, None, 0
        for xb in batches:
            a = xb[c].abs().float()
            m = float(a.max())
            if R_ == 0 and m > 0:
                R_, n_ = torch.tensor(m, dtype=torch.float32), num_bins
                hist = torch.zeros(num_bins, dtype=torch.float64)
                hist[0] += pending
            elif R_ != 0 and m > float(R_):
                width = float(R_) / n_
                need, cap = math.ceil(m / width), 16 * num_bins  # (a few channels: the 16x cap)
                k = math.ceil(math.log2(need / cap)) if need > cap else 0  # merge bins by 2^k
                width = math.ldexp(width, k)
                n_ = min(math.ceil(m / width), cap)
                R_ = torch.tensor(n_ * width, dtype=torch.float32)
                merged = torch.zeros(max(n_, hist.numel()), dtype=torch.float64)
                merged.index_add_(0, torch.arange(hist.numel()) >> min(k, 62), hist)
                hist = merged[:n_] if merged[n_:].sum() == 0 else merged
            if R_ == 0:
                pending += a.numel()
                continue
            idx = torch.trunc(a * float(n_) / R_).long().clamp(0, n_ - 1)
            hist += torch.bincount(idx, minlength=n_).double()
        edges = torch.arange(n_ + 1, dtype=torch.float64) * (float(R_) / n_) if n_ else None
        out.append((hist, edges, n_))
    return out


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_streaming_growth_matches_bruteforce(method):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 300, generator=g) * s for s in (1.0, 1.7, 0.5, 3.0)]
    batches[0][3] = 0  # channel 3 all zero in the first batch: starts at its first non-zero batch
    cal = HistogramCalibrator(method, 8, axis=0, num_bins=256)
    for xb in batches:
        cal.collect(xb)
    hist, edges, n = cal.histogram()
    amax = cal.compute_amax()
    for c, (h, e, nc) in enumerate(_stream_hist_bruteforce(batches, 256)):
        assert int(n[c]) == nc and nc > 256
        assert torch.equal(hist[c, :nc], h) and hist[c, nc:].sum() == 0
        assert torch.equal(edges[c, : nc + 1], e)
        assert amax[c].item() == _ref_amax(method, h, e, 8).float().item()


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_streaming_growth_huge_range_merges_bins(method):
    """A later batch 1e4x (or, after a 1e-20 first batch, 1e20x) beyond the range so far: the
    bins merge by a power of two (at most 16 * num_bins per channel here), exactly as the rule says,
    instead of allocating billions of bins or failing; other channels are not widened."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 300, generator=g) for _ in range(3)]
    batches[0][1] *= 1e-20
    batches[1][0, 7] = 1e4
    batches[2][2] *= 3.0
    cal = HistogramCalibrator(method, 8, axis=0, num_bins=64)
    for xb in batches:
        cal.collect(xb)
    hist, edges, n = cal.histogram()
    assert hist.shape[1] <= 16 * 64 and int(n.max()) <= 16 * 64
    for c, (h, e, nc) in enumerate(_stream_hist_bruteforce(batches, 64)):
        assert int(n[c]) == nc
        assert torch.equal(hist[c, :nc], h[:nc]) and hist[c].sum() == 900
        assert torch.equal(edges[c, : nc + 1], e)
    amax = cal.compute_amax()
    assert amax[0] > 1e3 and amax[1] > 1 and torch.isfinite(amax).all()


def test_streaming_growth_keeps_nvidias_bin_width_up_to_16x():
    # bins merged past 4x the first batch's count: a heavy-tailed batch after a normal one (15x) was binned
    # coarser than NVIDIA's histc, which never merges (entropy amax 20% off)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(1, 4096, generator=g)
    later = first * 15
    cal = HistogramCalibrator("entropy", 8, axis=0)
    cal.collect(first)
    cal.collect(later)
    _, edges, n = cal.histogram()
    width = float(first.abs().max()) / 2048
    assert int(n[0]) == math.ceil(float(later.abs().max()) / width)  # (no merge: NVIDIA's width)
    assert abs(float(edges[0, 1]) - width) < 1e-6 * width  # (R is fp32)
    many = HistogramCalibrator("entropy", 8, axis=0)  # 1024 channels: memory keeps the 4x cap
    many.collect(torch.randn(1024, 64, generator=g))
    many.collect(torch.randn(1024, 64, generator=g) * 15)
    assert int(many.histogram()[2].max()) <= 4 * 2048


# ------------------------------------------------------------------ per channel == loop of the reference
@pytest.mark.parametrize("bits,unsigned", [(8, False), (4, False), (4, True)])
@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_per_channel_equals_reference_loop(method, bits, unsigned):
    x = _data()
    kw = dict(percentile=99.9) if method == "percentile" else {}
    cal = HistogramCalibrator(method, bits, axis=0, unsigned=unsigned, num_bins=BINS, **kw)
    cal.collect(x)
    got = cal.compute_amax()
    assert got.shape == (x.shape[0],) and got.dtype == torch.float32
    want = torch.stack([_ref_amax(method, *R.abs_histogram(x[c], BINS), bits, unsigned, **kw) for c in range(x.shape[0])])
    assert torch.equal(got, want.float())


def test_entropy_per_tensor_2048_and_stride():
    x = _data(C=1, M=20000)[0]
    h, e = R.abs_histogram(x, 2048)
    for stride in (1, 7):
        got = compute_amax(x, "entropy", 8, stride=stride)
        assert got.dim() == 0
        assert got.item() == R.amax_entropy(h, e, 8, stride=stride).float().item()


def test_axis_last_for_activations():
    x = _data(C=6, M=300).T.reshape(10, 30, 6)  # [B, T, K], channel = last dim
    for method in ("max", "percentile", "entropy"):
        kw = {} if method == "max" else dict(num_bins=BINS)
        got = compute_amax(x, method, 8, axis=-1, **kw)
        flat = x.reshape(-1, 6)
        for c in range(6):
            want = compute_amax(flat[:, c], method, 8, **kw)
            assert got[c].item() == want.item()


# ------------------------------------------------------------------ literal port of NVIDIA's loops (numpy + scipy)
def _nvidia_entropy(calib_hist, calib_bin_edges, num_bits, unsigned=False, stride=1, start_bin=128):
    np = pytest.importorskip("numpy")
    from collections import Counter

    entropy = pytest.importorskip("scipy.stats").entropy
    bins = calib_hist.copy()
    bins[0] = bins[1]
    total_data = np.sum(bins)
    divergences = []
    nbins = 1 << (num_bits - 1 + int(unsigned))
    new_density_counts = np.zeros(nbins, dtype=np.float64)
    for i in range(start_bin, len(bins) + 1, stride):
        new_density_counts.fill(0)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density_counts[digitized] += bins[idx]
        counter = Counter(digitized_space)
        for key, val in counter.items():
            if key != -1:
                new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density[idx] = new_density_counts[digitized]
        reference_density = np.array(bins[: len(digitized_space)], dtype=np.float64)
        reference_density[-1] += np.sum(bins[i:])
        assert round(np.sum(new_density) + np.sum(bins[i:])) == total_data
        divergences.append(entropy(reference_density, new_density))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return calib_bin_edges[last_argmin * stride + start_bin]


def _nvidia_mse_percentile(calib_hist, calib_bin_edges, num_bits, percentile, start_bin=128):
    np = pytest.importorskip("numpy")
    counts = torch.from_numpy(calib_hist).double()
    edges = torch.from_numpy(calib_bin_edges).double()
    centers = (edges[1:] + edges[:-1]) / 2
    mses = []
    for i in range(start_bin, len(centers)):
        qc = R.fake_tensor_quant(centers, centers[i], num_bits)
        mses.append(((qc - centers) ** 2 * counts).mean().item())
    mse_amax = centers[start_bin + int(np.argmin(mses))].item()
    cdf = np.cumsum(calib_hist / calib_hist.sum())
    pct_amax = calib_bin_edges[np.searchsorted(cdf, percentile / 100)]
    return mse_amax, pct_amax


def test_reference_matches_literal_nvidia_port():
    x = _data(C=1, M=5000, seed=3)[0]
    h, e = R.abs_histogram(x, 300)
    hn, en = h.numpy().astype("int64"), e.numpy()
    for bits in (8, 4):
        assert float(R.amax_entropy(h, e, bits, start_bin=40)) == float(_nvidia_entropy(hn, en, bits, start_bin=40))
    mse_amax, pct_amax = _nvidia_mse_percentile(hn, en, 4, 99.9, start_bin=40)
    assert float(R.amax_mse(h, e, 4, start_bin=40)) == mse_amax
    assert float(R.amax_percentile(h, e, 99.9)) == pct_amax


def test_reference_mse_of_all_zeros():
    # every edge 0: the candidates' scales were inf, every error NaN, and first_min took .min() of
    # nothing; the library (and the reference's entropy / percentile) give 0
    h, e = R.abs_histogram(torch.zeros(100), 2048)
    assert float(R.amax_mse(h, e, 8)) == 0.0 == float(quantkern.ptq.compute_amax(torch.zeros(100), "mse"))


# ------------------------------------------------------------------ max, mse_search, asymmetric
def test_max_calibrator_streaming_sym_and_asym():
    x = _data()
    cal, acal = MaxCalibrator(8, axis=0), MaxCalibrator(8, axis=0, symmetric=False)
    for part in x.split(700, dim=1):
        cal.collect(part)
        acal.collect(part)
    assert torch.equal(cal.compute_amax(), x.abs().amax(1))
    amin, amax = acal.compute_range()
    assert torch.equal(amin, x.amin(1)) and torch.equal(amax, x.amax(1))
    with pytest.raises(RuntimeError, match="compute_range"):
        acal.compute_amax()
    lo, hi = cal.compute_range()
    assert torch.equal(lo, -hi)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_equals_bruteforce(symmetric):
    x = _data(C=3, M=500)
    batches = x.split(200, dim=1)
    cal = MseCalibrator(4, axis=0, symmetric=symmetric, num_steps=39)
    for xb in batches:
        cal.collect(xb)
    got = cal.compute_amax() if symmetric else cal.compute_range()
    mults = torch.linspace(0.25, 4.0, 39, dtype=torch.float64)
    for c in range(3):
        first = batches[0][c]
        base_max = first.abs().max() if symmetric else first.max()
        base_min = None if symmetric else first.min()
        errs = []
        for m in mults.tolist():
            e = 0.0
            for xb in batches:
                s, z, qmin, qmax = range_to_qparams(None if symmetric else base_min * m, base_max * m, 4, symmetric)
                e += ((fake_quant(xb[c], s, z, qmin, qmax) - xb[c]).double() ** 2).sum().item()
            errs.append(e)
        best = mults[int(torch.tensor(errs).argmin())]
        if symmetric:
            assert got[c].item() == pytest.approx((base_max.double() * best).item(), rel=1e-7)
        else:
            assert got[0][c].item() == pytest.approx((base_min.double() * best).item(), rel=1e-7)
            assert got[1][c].item() == pytest.approx((base_max.double() * best).item(), rel=1e-7)


def test_asymmetric_percentile_bruteforce():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3999, generator=g) + torch.tensor([[2.0], [-1.0], [0.0]])  # 3999: no exact cdf ties
    cal = HistogramCalibrator("percentile", 8, axis=0, symmetric=False, num_bins=200, percentile=99.0)
    cal.collect(x)
    amin, amax = cal.compute_range()
    for c in range(3):
        a = x[c].abs()
        Rc = a.max()
        idx = torch.trunc(a * 200.0 / Rc).long().clamp(0, 199)
        pos = torch.bincount(idx[x[c] >= 0], minlength=200).double()
        neg = torch.bincount(idx[x[c] < 0], minlength=200).double()
        signed = torch.cat([neg.flip(0), pos])
        edges = torch.arange(-200, 201, dtype=torch.float64) * (Rc.double() / 200)
        cum = torch.cumsum(signed, 0)  # first bin whose running count reaches p * total
        hi = int(torch.searchsorted(cum, cum[-1:] * 0.99))
        lo = int(torch.searchsorted(cum, cum[-1:] * (1 - 0.99), right=True))
        assert amax[c].item() == pytest.approx(max(edges[hi + 1].item(), 0.0), rel=1e-7)
        assert amin[c].item() == pytest.approx(min(edges[lo].item(), 0.0), rel=1e-7)
        q_lo, q_hi = torch.quantile(x[c], 0.01).item(), torch.quantile(x[c], 0.99).item()
        w = 3 * Rc.item() / 200  # within a few bins of the interpolated quantiles
        assert min(q_lo, 0) - w <= amin[c] <= min(q_lo, 0) + w and q_hi - w <= amax[c] <= q_hi + w


def test_asymmetric_percentile_100_stays_at_the_data():
    # a normalised float cdf can end just below 1.0: percentile 100 then returned the padding's edge
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(5000, generator=g)
        x[x < 0] *= 4
        cal = HistogramCalibrator("percentile", 8, symmetric=False, num_bins=2048, percentile=100.0)
        cal.collect(x)
        amin, amax = cal.compute_range()
        w = 4.1 * x.abs().max().item() / 2048
        assert x.max().item() <= amax.item() <= x.max().item() + w
        assert x.min().item() - w <= amin.item() <= x.min().item()


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy", "mse_search"])
def test_all_zero_channel_constant_and_single_sample(method):
    kw = {} if method in ("max", "mse_search") else dict(num_bins=BINS)
    x = torch.zeros(3, 50)
    x[1] = 3.0  # constant
    x[2] = torch.linspace(-1, 2, 50)
    amax = compute_amax(x, method, 8, axis=0, **kw)
    assert amax[0] == 0 and torch.isfinite(amax).all()
    assert 0 < amax[1] <= 3.0 * (4.0 if method == "mse_search" else 1.0)
    one = compute_amax(torch.tensor([[0.5], [-2.0]]), method, 8, axis=0, **kw)  # a single sample per channel
    assert torch.isfinite(one).all() and (one > 0).all()
    if method != "max":
        h, e = R.abs_histogram(x[1], BINS)
        if method in ("percentile", "mse", "entropy"):
            assert amax[1].item() == _ref_amax(method, h, e, 8).float().item()
    xh = fake_quant_static(x, amax, 8, axis=0)
    assert (xh[0] == 0).all() and torch.isfinite(xh).all()


def test_entropy_no_candidate_and_mass_beyond_start():
    # fewer bins than start_bin: the top edge
    cal = HistogramCalibrator("entropy", 8, num_bins=64)
    cal.collect(torch.rand(1000))
    _, edges, _ = cal.histogram()
    assert cal.compute_amax().item() == pytest.approx(edges[0, -1].item(), rel=1e-7)
    # all mass above the first 128 bins (Q empty for small candidates): finite answer equal to the reference
    x = torch.rand(5000) * 0.5 + 0.5
    h, e = R.abs_histogram(x, 2048)
    assert compute_amax(x, "entropy", 8).item() == R.amax_entropy(h, e, 8).float().item()


# ------------------------------------------------------------------ fake-quant helpers
def test_quant_range_and_params():
    assert quant_range(8) == (-128, 127) and quant_range(8, narrow_range=True) == (-127, 127)
    assert quant_range(4, unsigned=True) == (0, 15) and quant_range(4, symmetric=False) == (0, 15)
    s, z, qmin, qmax = range_to_qparams(torch.tensor(-1.0), torch.tensor(3.0), 4, symmetric=False)
    assert s.item() == pytest.approx(4 / 15) and z.item() == round(1 / (4 / 15)) and (qmin, qmax) == (0, 15)
    s, z, _, _ = range_to_qparams(torch.tensor(0.5), torch.tensor(3.0), 4, symmetric=False)  # range widened to 0
    assert z.item() == 0 and s.item() == pytest.approx(3 / 15)


def test_fake_quant_static_dynamic_and_act_quantizer():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 8, generator=g)
    amax = x.abs().amax(0)
    xh = fake_quant_static(x, amax, 8, axis=1)
    s = amax / 127
    assert torch.equal(xh, torch.clamp(torch.round(x / s), -128, 127) * s)
    # dynamic per token (axis=0) == static with the token's own amax
    d = fake_quant_dynamic(x, 4, axis=0)
    assert torch.equal(d, fake_quant_static(x, x.abs().amax(1), 4, axis=0))
    da = fake_quant_dynamic(x, 4, symmetric=False)
    assert torch.allclose(da, x, atol=(x.max() - x.min()).item() / 15)
    # ActQuantizer: calibrate over batches, then static
    aq = ActQuantizer(8, "percentile", num_bins=BINS)
    aq.start_calibration()
    for part in x.split(4):
        assert aq(part) is part
    aq.finish_calibration()
    cal = make_calibrator("percentile", 8, num_bins=BINS)
    for part in x.split(4):
        cal.collect(part)
    assert torch.equal(aq(x), fake_quant_static(x, cal.compute_amax(), 8))
    assert aq(x.half()).dtype == torch.float16
    with pytest.raises(RuntimeError, match="not calibrated"):
        ActQuantizer(8)(x)
    fresh = ActQuantizer(8)  # an uncalibrated quantizer takes a calibrated one's state_dict
    fresh.load_state_dict(aq.state_dict())
    assert torch.equal(fresh(x), aq(x))
    # a checkpoint of another configuration (asymmetric 8-bit) does not fit a symmetric 4-bit grid
    asym = ActQuantizer.from_data(torch.linspace(-1, 3, 100), 8, symmetric=False)
    assert float(asym.zero) != 0
    with pytest.raises(ValueError, match="do not fit this quantizer's grid"):
        ActQuantizer(4).load_state_dict(asym.state_dict())
    with pytest.raises(RuntimeError, match="before any collect"):
        make_calibrator("mse").compute_amax()


# ------------------------------------------------------------------ bad arguments
def test_bad_args():
    with pytest.raises(ValueError, match="unknown calibration method"):
        make_calibrator("kl")
    with pytest.raises(ValueError, match="num_bits"):
        MaxCalibrator(0)
    with pytest.raises(ValueError, match="num_bins"):
        HistogramCalibrator("entropy", num_bins=1)
    with pytest.raises(ValueError, match="percentile"):
        HistogramCalibrator("percentile", percentile=101)
    with pytest.raises(ValueError, match="axis"):
        compute_amax(torch.ones(3), "max", axis=2)
    with pytest.raises(ValueError, match="NaN"):
        compute_amax(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="float"):
        compute_amax(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        compute_amax(torch.ones(0))
    cal = MaxCalibrator(8, axis=0)
    with pytest.raises(RuntimeError, match="before any collect"):
        cal.compute_amax()
    cal.collect(torch.ones(3, 4))
    with pytest.raises(ValueError, match="channels"):
        cal.collect(torch.ones(5, 4))
    with pytest.raises(ValueError, match="per-channel scale"):
        fake_quant(torch.ones(3, 4), torch.ones(3), torch.zeros(3), -8, 7, axis=1)
    with pytest.raises(ValueError, match="scale must be finite"):
        fake_quant(torch.ones(3), torch.tensor(float("nan")), torch.tensor(0.0), -8, 7)


# ================================================================== the calib_* kernels
import importlib.util  # noqa: E402
import os  # noqa: E402

import quantkern  # noqa: E402
from quantkern import ops  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
triton_only = pytest.mark.skipif(
    not (HAVE_TRITON and (INTERPRET or torch.cuda.is_available())), reason="needs triton (GPU or TRITON_INTERPRET=1)"
)
TDEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _hist_state(x, num_bins):
    """(pos, neg, R, n) as HistogramCalibrator starts them for x [C, M] (fp32 R = max|x|)."""
    C = x.shape[0]
    R_ = x.float().abs().amax(1)
    n = torch.where(R_ > 0, torch.full((C,), num_bins), torch.zeros(C, dtype=torch.long))
    z = torch.zeros(C, num_bins, dtype=torch.long)
    return z, z.clone(), R_, n


def _odd_data(C, M, dtype, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(C, M, generator=g) * torch.linspace(0.1, 4.0, C)[:, None] + torch.linspace(-1, 1, C)[:, None]
    if C > 2:
        x[1] = 0.0  # an all-zero channel: skipped by the kernel
        x[2, ::3] = 0.0  # exact zeros go to pos[0]
    return x.to(dtype)


@pytest.mark.parametrize("C,M", [(1, 1001), (3, 77), (127, 333)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_histogram_kernel_equals_reference(C, M, dtype):
    x = _odd_data(C, M, dtype)
    pos, neg, R_, n = _hist_state(x, 64)
    ops.calib_histogram(x, pos, neg, R_, n)
    for c in range(C):
        if R_[c] == 0:
            assert pos[c].sum() == 0 and neg[c].sum() == 0
            continue
        p, q, _ = R.signed_histogram(x[c], 64)
        assert torch.equal(pos[c].double(), p) and torch.equal(neg[c].double(), q)
    # accumulates in place; a non-contiguous x gives the same counts
    ops.calib_histogram(x.T.contiguous().T, pos, neg, R_, n)
    p, q, _ = R.signed_histogram(x[0], 64)
    assert torch.equal(pos[0].double(), 2 * p) and torch.equal(neg[0].double(), 2 * q)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_histogram_pos_neg_may_be_disjoint_views_of_one_buffer(backend):
    # the aliasing check compared storages: two disjoint halves of one buffer were refused
    if backend == "triton":
        pytest.importorskip("triton")
        from _triton_dev import triton_device

        triton_device()  # (skips without CUDA or the interpreter)
    xc = torch.tensor([[0.5, -0.5, 0.9]])
    buf = torch.zeros(2, 1, 4, dtype=torch.long)
    ops.calib_histogram(xc, buf[0], buf[1], torch.ones(1), torch.tensor([4]), backend=backend)
    assert buf[0].tolist() == [[0, 0, 1, 1]] and buf[1].tolist() == [[0, 0, 1, 0]]
    with pytest.raises(ValueError, match="separate tensors"):
        ops.calib_histogram(xc, buf[0], buf[0], torch.ones(1), torch.tensor([4]), backend=backend)
    flat = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="separate tensors"):  # overlapping by half
        ops.calib_histogram(xc, flat[:4].view(1, 4), flat[2:6].view(1, 4), torch.ones(1), torch.tensor([4]),
                            backend=backend)


def test_histogram_long_channel_sliced_and_thread_invariant():
    x = _odd_data(1, 150_001, torch.float32, seed=4)  # per tensor, long: private slices summed in order
    got = []
    nt = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            pos, neg, R_, n = _hist_state(x, 2048)
            ops.calib_histogram(x, pos, neg, R_, n)
            amin, amax = ops.calib_search(pos, neg, R_.double() / 2048, n, "entropy", 8, symmetric=False, stride=32)
            got.append((pos, neg, amin, amax))
    finally:
        torch.set_num_threads(nt)
    p, q, _ = R.signed_histogram(x[0], 2048)
    assert torch.equal(got[0][0][0].double(), p) and torch.equal(got[0][1][0].double(), q)
    for a, b in zip(got[0], got[1]):
        assert torch.equal(a, b)


def _asym_ref(method, pos, neg, w, bits, stride, start_bin):
    f = R.range_entropy_asym if method == "entropy" else R.range_mse_asym
    return f(pos, neg, w, bits, stride, start_bin)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_asymmetric_per_channel_equals_reference(method, bits):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 2001, generator=g) + torch.tensor([[0.5], [-1.5], [0.0], [3.0], [0.0]])
    x[3] = torch.relu(x[3] - 3)  # one-sided with many zeros
    x[4] = 0.0  # no data
    cal = HistogramCalibrator(method, bits, axis=0, symmetric=False, num_bins=128, stride=8, start_bin=24)
    cal.collect(x)
    amin, amax = cal.compute_range()
    assert amin.dtype == amax.dtype == torch.float32 and amin.shape == (5,)
    for c in range(5):
        pos, neg, w = R.signed_histogram(x[c], 128)
        rmin, rmax = _asym_ref(method, pos, neg, w, bits, 8, 24)
        assert amin[c].item() == rmin.float().item() and amax[c].item() == rmax.float().item(), c
    assert amin[4] == 0 and amax[4] == 0 and amin[3] == 0
    # with stride None the asymmetric default grid is 16
    assert HistogramCalibrator(method, bits, symmetric=False).stride == 16


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_asymmetric_growth_and_no_candidate(method):
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 250, generator=g) * s - 0.3 for s in (1.0, 2.5, 0.7)]
    cal = HistogramCalibrator(method, 4, axis=0, symmetric=False, num_bins=64, stride=4, start_bin=16)
    for xb in batches:
        cal.collect(xb)
    amin, amax = cal.compute_range()
    w = cal._width()
    for c in range(3):
        nc = int(cal._n[c])
        assert nc > 64
        rmin, rmax = _asym_ref(method, cal._pos[c, :nc].double(), cal._neg[c, :nc].double(), float(w[c]), 4, 4, 16)
        assert (amin[c].item(), amax[c].item()) == (rmin.float().item(), rmax.float().item())
    # a window grid with fewer bins than start_bin: the used range
    cal = HistogramCalibrator(method, 4, symmetric=False, num_bins=8, stride=1, start_bin=100)
    x = torch.tensor([-1.0, 0.25, 2.0])
    cal.collect(x)
    pos, neg, w = R.signed_histogram(x, 8)
    rmin, rmax = _asym_ref(method, pos, neg, w, 4, 1, 100)
    lo, hi = cal.compute_range()
    assert (lo.item(), hi.item()) == (rmin.float().item(), rmax.float().item()) and hi.item() == pytest.approx(2.0)


@pytest.mark.parametrize("unsigned", [False, True])
def test_search_op_symmetric_unsigned_and_stride(unsigned):
    x = _data(C=3, M=1500)
    if unsigned:
        x = x.abs()
    pos, neg, R_, n = _hist_state(x, 256)
    ops.calib_histogram(x, pos, neg, R_, n)
    w = R_.double() / 256
    for method in ("entropy", "mse"):
        amin, amax = ops.calib_search(pos, neg, w, n, method, 4, unsigned=unsigned, stride=3, start_bin=40)
        assert torch.equal(amin, torch.zeros_like(amax) if unsigned else -amax)
        for c in range(3):
            h, e = R.abs_histogram(x[c], 256)
            f = R.amax_entropy if method == "entropy" else R.amax_mse
            assert amax[c].item() == f(h, e, 4, unsigned, 3, 40).item()


def test_calib_ops_opcheck():
    x = _odd_data(3, 50, torch.float32)
    pos, neg, R_, n = _hist_state(x, 32)
    torch.library.opcheck(torch.ops.quantkern.calib_histogram.default, (x, pos, neg, R_, n))
    ops.calib_histogram(x, pos, neg, R_, n)
    w = R_.double() / 32
    for sym in (True, False):
        for method in ("entropy", "mse"):
            torch.library.opcheck(torch.ops.quantkern.calib_search.default, (pos, neg, w, n, method, 4, False, sym, 2, 8))


def test_calib_ops_bad_args():
    x = _odd_data(3, 50, torch.float32)
    pos, neg, R_, n = _hist_state(x, 32)
    with pytest.raises(TypeError, match="pos"):
        ops.calib_histogram(x, pos.int(), neg, R_, n)
    with pytest.raises(ValueError, match="R must have shape"):
        ops.calib_histogram(x, pos, neg, R_[:2], n)
    with pytest.raises(TypeError, match="x must"):
        ops.calib_histogram(x.double(), pos, neg, R_, n)
    xn = x.clone()
    xn[0, 5] = float("nan")
    with pytest.raises(RuntimeError, match="x contains NaN"):
        torch.ops.quantkern.calib_histogram(xn, pos, neg, R_, n)
    with pytest.raises(RuntimeError, match="n must be"):
        torch.ops.quantkern.calib_histogram(x, pos, neg, R_, n + 100)
    with pytest.raises(RuntimeError, match="pos and neg must be int64"):
        torch.ops.quantkern.calib_histogram(x, pos.float(), neg, R_, n)
    w = R_.double() / 32
    with pytest.raises(ValueError, match="method"):
        ops.calib_search(pos, neg, w, n, "percentile")
    with pytest.raises(ValueError, match="stride"):
        ops.calib_search(pos, neg, w, n, "mse", stride=0)
    with pytest.raises(TypeError, match="width"):
        ops.calib_search(pos, neg, w.float(), n, "mse")
    with pytest.raises(ValueError, match="<= 1e150"):  # every candidate's error overflowed float64
        ops.calib_search(pos, neg, torch.full_like(w, 1e200), n, "mse")
    with pytest.raises(RuntimeError, match="method must be"):
        torch.ops.quantkern.calib_search(pos, neg, w, n, "kl", 8, False, True, 1, 8)
    with pytest.raises(RuntimeError, match="start_bin"):
        torch.ops.quantkern.calib_search(pos, neg, w, n, "mse", 8, False, True, 1, 0)
    with pytest.raises(ValueError, match="NaN"):
        HistogramCalibrator("entropy").collect(xn)


def test_search_on_an_empty_histogram_gives_zero():
    # the reference's rule ("a histogram with no data gives amax 0"); the kernels returned the first
    # candidate's amax (e.g. 2.0 for symmetric entropy) for a channel with a width but no counts
    pos = neg = torch.zeros(2, 256, dtype=torch.int64)
    w, n = torch.tensor([0.01, 1.0], dtype=torch.float64), torch.tensor([200, 256])
    backends = ["native"] + (["triton"] if HAVE_TRITON and (INTERPRET or torch.cuda.is_available()) else [])
    if "triton" in backends:
        import quantkern.triton_kernels  # noqa: F401
    for be in backends:
        dev = TDEV if be == "triton" else "cpu"
        for method in ("entropy", "mse"):
            for symmetric in (True, False):
                lo, hi = ops.calib_search(pos.to(dev), neg.to(dev), w.to(dev), n.to(dev), method, 8, symmetric=symmetric,
                                          stride=1 if symmetric else 16, start_bin=128, backend=be)
                assert lo.eq(0).all() and hi.eq(0).all(), (be, method, symmetric, lo, hi)
    assert float(R.amax_entropy(pos[0].double(), torch.arange(257) * 0.01, 8)) == 0.0


def test_mse_exact_ties_pick_the_same_window_everywhere():
    # windows (1, 3) and (2, 4) have the same error, 3.25, summed in different orders: every
    # implementation takes the first within MSE_RTOL (an exact first argmin split them)
    pos, neg = torch.tensor([[2, 1, 3, 1]]), torch.tensor([[2, 3, 1, 0]])
    n, w = torch.tensor([4]), torch.tensor([1.0], dtype=torch.float64)
    lo, hi = ops.calib_search(pos, neg, w, n, "mse", 2, symmetric=False, stride=1, start_bin=3)
    rlo, rhi = R.range_mse_asym(pos[0], neg[0], 1.0, 2, stride=1, start_bin=3)
    assert (float(lo), float(hi)) == (float(rlo), float(rhi)) == (-1.0, 3.0)
    if HAVE_TRITON and (INTERPRET or torch.cuda.is_available()):
        import quantkern.triton_kernels  # noqa: F401

        tlo, thi = ops.calib_search(*(t.to(TDEV) for t in (pos, neg, w, n)), "mse", 2, symmetric=False, stride=1,
                                    start_bin=3, backend="triton")
        assert (float(tlo), float(thi)) == (-1.0, 3.0)


def _hist_native_and_triton(x, bins):
    """Histogram state of x from the native op and from the Triton op (asserted equal)."""
    pos, neg, R_, n = _hist_state(x, bins)
    ops.calib_histogram(x, pos, neg, R_, n)
    tp, tn = torch.zeros_like(pos, device=TDEV), torch.zeros_like(neg, device=TDEV)
    ops.calib_histogram(x.to(TDEV), tp, tn, R_.to(TDEV), n.to(TDEV), backend="triton")
    assert torch.equal(tp.cpu(), pos) and torch.equal(tn.cpu(), neg)
    return pos, neg, R_, n, tp, tn


@triton_only
def test_triton_calib_ops_equal_native():
    import quantkern.triton_kernels  # noqa: F401

    x = _odd_data(3, 301, torch.float16)
    pos, neg, R_, n, tp, tn = _hist_native_and_triton(x, 48)
    w = R_.double() / 48
    for sym, unsigned, stride in ((True, False, 1), (True, True, 3), (False, False, 4)):
        for method in ("entropy", "mse"):
            want = ops.calib_search(pos, neg, w, n, method, 3, unsigned=unsigned, symmetric=sym, stride=stride, start_bin=12)
            got = ops.calib_search(tp, tn, w.to(TDEV), n.to(TDEV), method, 3, unsigned=unsigned, symmetric=sym,
                                   stride=stride, start_bin=12, backend="triton")
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), (sym, method)


@triton_only
def test_triton_calib_opcheck_and_errors():
    import quantkern.triton_kernels  # noqa: F401

    x = _odd_data(2, 40, torch.float32).to(TDEV)
    pos, neg, R_, n = (t.to(TDEV) for t in _hist_state(x.cpu(), 16))
    torch.library.opcheck(torch.ops.quantkern.calib_histogram_triton.default, (x, pos, neg, R_, n))
    torch.ops.quantkern.calib_histogram_triton(x, pos, neg, R_, n)
    torch.library.opcheck(torch.ops.quantkern.calib_search_triton.default,
                          (pos, neg, R_.double() / 16, n, "entropy", 2, False, False, 2, 4))
    xn = x.clone()
    xn[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinity"):
        torch.ops.quantkern.calib_histogram_triton(xn, pos, neg, R_, n)
    with pytest.raises(ValueError, match="method"):
        torch.ops.quantkern.calib_search_triton(pos, neg, R_.double(), n, "max", 8, False, True, 1, 8)
    # n past B: the bins would land in the next channel's row (clear error, nothing written)
    p0 = pos.clone()
    with pytest.raises(ValueError, match="n must be in"):
        torch.ops.quantkern.calib_histogram_triton(x, pos, neg, R_, n + 100)
    with pytest.raises(ValueError, match="n must be in"):
        ops.calib_histogram(x, pos, neg, R_, n + 100)
    assert torch.equal(pos, p0)
    # finite values far beyond R clamp into the last bin, as the native kernel does
    xb = torch.tensor([[1.0, 0.5e-20, -2.0]], device=TDEV)
    args = (torch.tensor([1e-20], device=TDEV), torch.tensor([16], device=TDEV))
    pt, nt = torch.zeros(1, 16, dtype=torch.long, device=TDEV), torch.zeros(1, 16, dtype=torch.long, device=TDEV)
    torch.ops.quantkern.calib_histogram_triton(xb, pt, nt, *args)
    pn, nn_ = torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long)
    torch.ops.quantkern.calib_histogram(xb.cpu(), pn, nn_, *(a.cpu() for a in args))
    assert torch.equal(pt.cpu(), pn) and torch.equal(nt.cpu(), nn_) and int(pn[0, 15]) == 1 and int(nn_[0, 15]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test needs a GPU (torch.cuda.is_available() is False)")
def test_cuda_histogram_more_channels_than_grid_y():
    # channels ride on grid.y (65535 at most per launch): 70000 channels take two launches
    x = torch.randn(70000, 8)
    R_ = x.abs().amax(1).float()
    n = torch.full((70000,), 16, dtype=torch.long)
    pos, neg = torch.zeros(70000, 16, dtype=torch.long), torch.zeros(70000, 16, dtype=torch.long)
    torch.ops.quantkern.calib_histogram(x, pos, neg, R_, n)
    pc, nc = pos.cuda().zero_(), neg.cuda().zero_()
    torch.ops.quantkern.calib_histogram(x.cuda(), pc, nc, R_.cuda(), n.cuda())
    assert torch.equal(pc.cpu(), pos) and torch.equal(nc.cpu(), neg)


def search_inputs(method, symmetric, C=70, M=300, B=256):
    """(pos, neg, width, n, args) of calib_search: C channels' histograms of Gaussian data, B bins; the
    CUDA (and emulated CUDA) searches are compared with the CPU's on them."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(C, M, generator=g) * 3
    R_ = x.abs().amax(1) * 1.1
    n = torch.full((C,), B, dtype=torch.long)
    pos, neg = torch.zeros(C, B, dtype=torch.long), torch.zeros(C, B, dtype=torch.long)
    torch.ops.quantkern.calib_histogram(x, pos, neg, R_, n)
    args = (method, 8 if symmetric else 4, False, symmetric, 1 if symmetric else 4, B // 2 if symmetric else 8)
    return pos, neg, (R_ / n).double(), n, args


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test needs a GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("method", ["mse", "entropy"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_search_matches_cpu(method, symmetric):
    # calib_rint on the device used to resolve to qk::rint(float) and round c / s
    # through fp32: the asymmetric MSE search then picked other ranges than the CPU
    # for a few channels of 70 (sparse histograms: many candidates nearly tie).
    pos, neg, width, n, args = search_inputs(method, symmetric)
    lo, hi = torch.ops.quantkern.calib_search(pos, neg, width, n, *args)
    lo_g, hi_g = torch.ops.quantkern.calib_search(pos.cuda(), neg.cuda(), width.cuda(), n.cuda(), *args)
    torch.testing.assert_close(lo_g.cpu(), lo, rtol=1e-12, atol=0)
    torch.testing.assert_close(hi_g.cpu(), hi, rtol=1e-12, atol=0)


def test_mse_search_skips_leading_zero_batches_and_warns_past_its_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 5
    for symmetric in (True, False):
        ref = MseCalibrator(8, symmetric=symmetric)
        ref.collect(x)
        cal = MseCalibrator(8, symmetric=symmetric)
        cal.collect(torch.zeros(100))  # e.g. padding: the search must not collapse to range 0
        cal.collect(x)
        if symmetric:
            assert torch.equal(cal.compute_amax(), ref.compute_amax()) and float(cal.compute_amax()) > 0
        else:
            assert all(torch.equal(a, b) for a, b in zip(cal.compute_range(), ref.compute_range()))
    cal = MseCalibrator(8)
    cal.collect(x * 0.01)
    with pytest.warns(UserWarning, match="beyond the largest candidate"):
        cal.collect(x)


def test_calib_histogram_and_hqq_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(3, 50)
    pos, neg = torch.zeros(3, 16, dtype=torch.long), torch.zeros(3, 16, dtype=torch.long)
    R_, n = x.abs().amax(1), torch.full((3,), 16)
    torch.compile(lambda *a: ops.calib_histogram(*a), fullgraph=True)(x, pos, neg, R_, n)
    p0, n0 = torch.zeros_like(pos), torch.zeros_like(neg)
    ops.calib_histogram(x, p0, n0, R_, n)
    assert torch.equal(pos, p0) and torch.equal(neg, n0)
    W = torch.randn(16, 128)
    f = torch.compile(lambda W, beta: ops.hqq_quantize(W, 4, 64, beta=beta), fullgraph=True, dynamic=True)
    assert torch.equal(f(W, 10.0)[0], ops.hqq_quantize(W, 4, 64)[0])


# ------------------------------------------------------------------ argument checks (review pass)
def test_fake_quant_rejects_bad_axis_and_grid():
    x = torch.randn(4, 8)
    s8, z8 = torch.ones(8), torch.zeros(8)
    # an axis past x's dims wrapped around (axis % dim) and quantized along another dimension
    for axis in (2, 5, -3):
        with pytest.raises(ValueError, match="axis"):
            fake_quant(x, s8, z8, -8, 7, axis=axis)
        with pytest.raises(ValueError, match="axis"):
            fake_quant_static(x, s8, 4, axis=axis)
    with pytest.raises(TypeError, match="axis"):
        fake_quant(x, s8, z8, -8, 7, axis=1.0)
    assert torch.equal(fake_quant(x, s8, z8, -8, 7, axis=-1), fake_quant(x, s8, z8, -8, 7, axis=1))
    # an empty integer grid clamped everything to qmax
    with pytest.raises(ValueError, match="qmin"):
        fake_quant(x, 0.1, 0, 5, -5)
    # an inverted asymmetric range quantized everything to 0
    with pytest.raises(ValueError, match="amin"):
        fake_quant_static(x, torch.tensor(-1.0), 8, amin=torch.tensor(1.0), symmetric=False)
    with pytest.raises(ValueError, match="amin"):
        range_to_qparams(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), 8, symmetric=False)


def test_calibrator_bad_args_raise_at_construction():
    # accepted silently, then failed (or misbehaved) only at compute_amax() after the whole loader
    for kw in (dict(start_bin=True), dict(stride=True), dict(percentile=True)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            HistogramCalibrator("entropy", **kw)
    with pytest.raises(ValueError, match="stop"):
        MseCalibrator(stop=float("inf"))
    with pytest.raises(ValueError, match="num_steps"):
        MseCalibrator(num_steps=True)
    for method in METHODS_ALL:
        with pytest.raises(ValueError, match="num_bits >= 2"):
            make_calibrator(method, 1)
        make_calibrator(method, 1, unsigned=True)  # a 1-bit unsigned or asymmetric grid is fine
        make_calibrator(method, 1, symmetric=False)


def test_failed_first_collect_leaves_the_calibrator_empty():
    bad = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    for method in METHODS_ALL:
        cal = make_calibrator(method, 8, axis=0)
        with pytest.raises(ValueError, match="NaN"):
            cal.collect(bad)
        with pytest.raises(RuntimeError, match="before any collect"):
            cal.compute_amax()
        cal.collect(torch.ones(3, 4))  # the failed batch fixed nothing, not even the channel count
        assert cal.compute_amax().shape == (3,)


def test_act_quantizer_mse_search_searches_its_own_grid():
    # narrow_range=True quantizes on [-7, 7] (4 bits) but the search ran on [-8, 7]: another amax
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(2000, generator=g) ** 3 * 4 + torch.rand(2000, generator=g) * 0.5
    for narrow in (False, True):
        aq = ActQuantizer.from_data(x, 4, "mse_search", narrow_range=narrow)
        cal = MseCalibrator(4, narrow_range=narrow)
        cal.collect(x)
        want, _, _, _ = cal.qparams(narrow_range=narrow)
        assert torch.equal(aq.scale, want), narrow


def test_act_quantizer_checkpoint_grid_and_dtype_casts():
    from quantkern.ptq.calibrate import ActQuantizer

    x = torch.rand(64, 16) * 3
    uq = ActQuantizer.from_data(x, 8, "max", unsigned=True)
    # an unsigned range (zero 0) loaded into a signed quantizer used to pass the zero-point check
    with pytest.raises(ValueError, match="grid"):
        ActQuantizer(8, "max").load_state_dict(uq.state_dict())
    ok = ActQuantizer(8, "max", unsigned=True)
    ok.load_state_dict(uq.state_dict())
    assert torch.equal(ok(x), uq(x))
    # a checkpoint from before the grid was saved still loads (strict)
    old = {k: v for k, v in uq.state_dict().items() if not k.endswith("_extra_state")}
    ActQuantizer(8, "max", unsigned=True).load_state_dict(old)
    # .half() keeps the calibrated range in float32 (a tiny scale underflowed to 0 in fp16)
    tiny = ActQuantizer.from_data(torch.randn(32, 8) * 1e-6, 8, "max")  # scale ~2e-8: 0 in fp16
    s0 = tiny.scale.clone()
    tiny.half()
    assert tiny.scale.dtype == torch.float32 and torch.equal(tiny.scale, s0)
    assert (tiny(torch.randn(4, 8).half() * 1e-6) != 0).any()


def test_mse_calibrator_qparams_default_to_its_own_grid():
    from quantkern.ptq.calibrate import MseCalibrator

    c = MseCalibrator(4, narrow_range=True)
    c.collect(torch.randn(1000))
    assert c.qparams()[2] == -7 and c.qparams(narrow_range=False)[2] == -8


class _GridRecorder:
    """Stands in for a @triton.jit kernel: records each launch grid, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


@triton_only
def test_triton_calib_launch_grids_fit_cuda_limits(monkeypatch):
    # A CUDA grid's y and z sizes stop at 65535 (x at 2^31 - 1). calib_histogram put the blocks of M
    # on y: a per-tensor histogram of more than 65535 * 1024 = 67.1M values failed to launch on a GPU;
    # calib_search put the candidate blocks there (asymmetric, stride 1, 2048 bins: 4.2M candidates).
    # Small blocks make the same grids out of small tensors; the launches are recorded, not run.
    from quantkern.triton_kernels import calibrate as TC

    rec = _GridRecorder()
    monkeypatch.setattr(TC, "_hist_kernel", rec)
    monkeypatch.setattr(TC, "_HBLOCK", 16)
    x = torch.ones(1, 65536 * 16 + 1, device=TDEV)
    pos = torch.zeros(1, 8, dtype=torch.long, device=TDEV)
    TC.calib_histogram_triton(x, pos, torch.zeros_like(pos), torch.ones(1, device=TDEV),
                              torch.full((1,), 8, device=TDEV))
    monkeypatch.setattr(TC, "_search_kernel", rec)
    monkeypatch.setattr(TC, "_SBLOCK", 1)
    B = 256
    full = torch.ones(2, B, dtype=torch.long, device=TDEV)  # (B + 1)^2 = 66049 candidates per channel
    TC.calib_search_triton(full, full, torch.ones(2, dtype=torch.float64, device=TDEV),
                           torch.full((2,), B, device=TDEV), "mse", 4, False, False, 1, 1)
    assert len(rec.grids) == 2
    assert rec.grids[0][0] >= 65537 and rec.grids[1][0] >= 2 * 66049  # every block still launched
    for grid in rec.grids:
        assert all(d <= 65535 for d in grid[1:]), grid
        assert grid[0] < 2**31, grid


@triton_only
def test_triton_calib_many_blocks_per_channel_equal_native():
    # Several channels x several blocks of M / of candidates on the (1-D) grid.
    import quantkern.triton_kernels  # noqa: F401

    x = _odd_data(3, 2 * 1024 + 77, torch.float32)
    pos, neg, R_, n, tp, tn = _hist_native_and_triton(x, 200)
    w = R_.double() / 200
    for method in ("entropy", "mse"):
        want = ops.calib_search(pos, neg, w, n, method, 4, symmetric=True, stride=1, start_bin=3)
        got = ops.calib_search(tp, tn, w.to(TDEV), n.to(TDEV), method, 4, symmetric=True, stride=1, start_bin=3,
                               backend="triton")
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), method


def test_fake_quant_gradient_is_straight_through():
    # round() has a zero gradient: training through an ActQuantizer got silent zeros
    from quantkern.ptq.calibrate import ActQuantizer, fake_quant

    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 2.9], requires_grad=True)
    y = fake_quant(x, 0.5, 0.0, -4, 3)  # grid [-2, 1.5]: -3 and 2.9 clip
    assert torch.equal(y.detach(), fake_quant(x.detach(), 0.5, 0.0, -4, 3))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    aq = ActQuantizer.from_data(torch.randn(64, 8), 8, "max")
    xb = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    aq(xb).float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and (xb.grad != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_histogram_huge_finite_values_are_not_rejected(dtype):
    # |x| * n overflowed fp32 for finite |x| > FLT_MAX / n (~1.7e35 at 2048 bins): the kernel called
    # such data "NaN or infinity". The bins must be those of the same data scaled by 2^-64 (exact).
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 3001, generator=g) * torch.tensor([[1e36], [3e37]])).to(dtype)
    x[0, 7] = 0.0
    pos, neg, R_, n = _hist_state(x, 2048)
    ops.calib_histogram(x, pos, neg, R_, n)
    small = (x.float() * 2.0**-64).to(dtype)
    assert torch.equal(small.float() * 2.0**64, x.float())  # the scaling is exact
    p2, q2, R2, n2 = _hist_state(small, 2048)
    ops.calib_histogram(small, p2, q2, R2, n2)
    assert torch.equal(pos, p2) and torch.equal(neg, q2)
    for c in range(2):
        for xc in (small[c], x[c]):  # the reference bins the huge values themselves alike (it put them in bin 0)
            p, q, _ = R.signed_histogram(xc, 2048)
            assert torch.equal(pos[c].double(), p) and torch.equal(neg[c].double(), q)
            assert torch.equal(R.abs_histogram(xc, 2048)[0], p + q)
    # a finite value far past R goes to the last bin; NaN / inf still raise
    pos, neg = torch.zeros_like(pos), torch.zeros_like(neg)
    ops.calib_histogram(torch.tensor([[3e38, -1e38]]).to(dtype), pos[:1], neg[:1], torch.tensor([1e-3]), n[:1])
    assert pos[0, 2047] == 1 and neg[0, 2047] == 1 and pos.sum() + neg.sum() == 2
    for bad in (float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="NaN or infinity"):
            ops.calib_histogram(torch.tensor([[1e36, bad]]).to(dtype), pos[:1], neg[:1], R_[:1], n[:1])
    # the calibrator collects such data
    cal = HistogramCalibrator("percentile")
    cal.collect(x.float())
    assert cal.compute_amax().isfinite().all()


def test_asymmetric_search_keeps_both_signs_of_two_sided_data():
    """Asymmetric entropy picked windows [0, b] / [-a, 0] for data of both signs (KL hardly sees a
    whole half folded into the window's end bin): every value of the other sign became 0."""
    from quantkern import ptq

    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000), torch.randn(20) * 1e3])
    for method in ("entropy", "mse"):
        lo, hi = ptq.compute_amax(x, method, symmetric=False)
        assert lo < 0 < hi, (method, lo, hi)
    cal = ptq.make_calibrator("entropy", axis=0, symmetric=False)
    for s in (0.001, 1, 0.01, 50, 3, 1e5, 0.5):  # streamed batches of very different scales
        cal.collect(torch.randn(3, 200) * s)
    lo, hi = cal.compute_range()
    assert (lo < 0).all() and (hi > 0).all(), (lo, hi)
    # one-signed data still gets a one-sided window
    lo, hi = ptq.compute_amax(x.abs(), "entropy", symmetric=False)
    assert lo == 0 < hi


def test_percentile_never_zero_for_nonzero_data():
    # one outlier > 2048x the bulk puts 99.99% of the data in bin 0, whose left edge is 0
    x = torch.randn(200, 64)
    x[0, 3] = 1e5
    amax = float(compute_amax(x, "percentile"))
    assert 0 < amax < 1e5
    h, e = R.abs_histogram(x, 2048)
    assert float(R.amax_percentile(h, e)) == float(e[1]) > 0
    assert float(compute_amax(torch.zeros(10, 4), "percentile")) == 0


def test_act_quantizer_dynamic_is_part_of_its_checkpoint():
    from quantkern.ptq.calibrate import ActQuantizer

    with pytest.raises(ValueError, match="unknown calibration method"):
        ActQuantizer(8, "nonsense", dynamic=True)
    static = ActQuantizer.from_data(torch.randn(64, 8), 8, "max")
    with pytest.raises(ValueError, match="mode"):
        ActQuantizer(8, "max", dynamic=True).load_state_dict(static.state_dict())
    old = static.state_dict()
    old["_extra_state"] = {k: v for k, v in old["_extra_state"].items() if k != "dynamic"}  # saved before it was
    ActQuantizer(8, "max").load_state_dict(old)


# ------------------------------------------------------------ found by a test-drive (2026-12-04)
def test_all_zero_calibration_gets_a_usable_scale_and_a_warning():
    # scale 0 turned every later input into 0, silently
    for method in METHODS_ALL:
        with pytest.warns(UserWarning, match="saw only zeros"):
            aq = ActQuantizer.from_data([torch.zeros(4, 4)], 8, method)
        assert float(aq.scale) == 1.0 and float(aq.zero) == 0.0
        assert aq(torch.full((2, 2), 3.0)).eq(3.0).all()
    x = torch.randn(3, 50)
    x[1] = 0.0  # one dead channel of three
    with pytest.warns(UserWarning, match="1 of 3 channels"):
        aq = ActQuantizer.from_data(x, 8, "max", axis=0)
    assert aq.scale[1] == 1.0 and aq.scale[0] != 1.0


def test_percentile_100_is_the_top_bins_left_edge_for_any_count():
    # a normalised float cdf ended just below 1.0 for some counts, and percentile 100 then gave the max
    for N in (3, 7, 10, 20, 49, 100):
        x = torch.linspace(0.1, 1, N)
        got = float(compute_amax(x, "percentile", percentile=100.0))
        h, e = R.abs_histogram(x, 2048)
        assert got == pytest.approx(float(e[2047]), rel=1e-6) == float(R.amax_percentile(h, e, 100.0)), N


def test_mse_search_near_the_float32_limit():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 8e37  # 4x its max overflows fp32
    for symmetric in (True, False):
        out = compute_amax(x, "mse_search", symmetric=symmetric)
        assert all(bool(torch.isfinite(t).all()) for t in (out if isinstance(out, tuple) else (out,)))
    cal = MseCalibrator(symmetric=False, start=2.0, stop=4.0, num_steps=3)
    cal.collect(torch.tensor([-3e38, 3e38]))  # no candidate's grid fits fp32
    with pytest.raises(ValueError, match="float32"):
        cal.compute_range()


def test_calibrator_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="percentile"):
        compute_amax(torch.randn(10), "percentile", percentile="99")
    with pytest.raises(ValueError, match="base_amax"):
        compute_amax(torch.randn(4, 10), "mse_search", axis=0, base_amax=[1.0, 2.0])
    cal = HistogramCalibrator()
    cal.collect(torch.randn(100))
    with pytest.raises(ValueError, match="method"):
        cal.method = "max"
    with pytest.raises(ValueError, match="percentile"):
        cal.percentile = 150
    cal.method, cal.percentile = "entropy", 99.9  # valid changes still work
    assert cal.compute_amax() > 0
    with pytest.raises(ValueError, match="float64 values beyond"):
        compute_amax(torch.tensor([1e39, 1.0], dtype=torch.float64), "max")


def test_raw_calibration_ops_check_values():
    pos = neg = torch.zeros(1, 16, dtype=torch.int64)
    w, n = torch.tensor([0.1], dtype=torch.float64), torch.tensor([16])
    for kw, match in (({"width": torch.tensor([float("nan")], dtype=torch.float64)}, "width"),
                      ({"width": torch.tensor([-1.0], dtype=torch.float64)}, "width"),
                      ({"n": torch.tensor([1])}, "n must be >= 2"),
                      ({"pos": torch.full((1, 16), -1, dtype=torch.int64)}, "counts")):
        a = {"pos": pos, "neg": neg, "width": w, "n": n} | kw
        with pytest.raises(ValueError, match=match):
            ops.calib_search(a["pos"], a["neg"], a["width"], a["n"], "mse", 8, start_bin=4)
    # the raw op checks width too (an inf / huge width indexed a table with int(NaN) in the MSE search)
    pos64 = torch.ones(1, 64, dtype=torch.int64)
    for bad in (float("inf"), 1e308):
        with pytest.raises(RuntimeError, match="width must be finite"):
            torch.ops.quantkern.calib_search(pos64, torch.zeros_like(pos64), torch.tensor([bad], dtype=torch.float64),
                                             torch.tensor([64]), "mse", 4, False, True, 1, 1)
    # a calibrator's stride / start_bin beyond the op's 2^24 bound selects what 2^24 does (num_bins <= 2^22)
    x = torch.randn(4, 500)
    for name in ("stride", "start_bin"):
        big = HistogramCalibrator("mse", symmetric=False, num_bins=64, **{name: 2**25})
        cap = HistogramCalibrator("mse", symmetric=False, num_bins=64, **{name: 2**24})
        big.collect(x)
        cap.collect(x)
        assert all(torch.equal(a, b) for a, b in zip(big.compute_range(), cap.compute_range()))
    # a stride near 2^62 wrapped the work buffer's size around int64 (wild writes)
    w64 = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"stride must be an int in \[1, 2\^24\]"):
        ops.calib_search(pos64, pos64, w64, torch.tensor([64]), "entropy", 8, symmetric=False, stride=2**61)
    with pytest.raises(RuntimeError, match=r"start_bin must be in \[1, 2\^24\]"):
        torch.ops.quantkern.calib_search(pos64, pos64, w64, torch.tensor([64]), "entropy", 8, False, False, 1, 2**40)
    x = torch.randn(1, 10)
    for Rv, nv, match in ((float("nan"), 16, "R must be finite"), (1.0, 0, "n must be >= 1")):
        with pytest.raises(ValueError, match=match):
            ops.calib_histogram(x, pos.clone(), neg.clone(), torch.tensor([Rv]), torch.tensor([nv]))


def test_review_fixes_growth_to_float_max_and_number_types():
    # a batch at FLT_MAX after a small one made the histogram range inf (and the next collect fail)
    cal = HistogramCalibrator()
    cal.collect(torch.tensor([1.0]))
    cal.collect(torch.tensor([3.4028234663852886e38]))
    cal.collect(torch.tensor([2.0]))
    assert torch.isfinite(cal.compute_amax())
    # percentile: any real number (numpy scalars, 0-dim tensors), not bools or strings
    import numpy as np

    for p in (np.float32(99.9), np.int64(100), torch.tensor(99.0)):
        assert compute_amax(torch.randn(100), "percentile", percentile=p) > 0
    for p in (True, "99", float("nan")):
        with pytest.raises(ValueError, match="percentile"):
            compute_amax(torch.randn(100), "percentile", percentile=p)
    with pytest.raises(ValueError, match="base_amax"):
        compute_amax(torch.randn(4, 10), "mse_search", axis=0, base_amax=[[1.0], [2.0], [3.0], [4.0]])


def test_asymmetric_qparams_of_a_range_wider_than_float32():
    # amax - amin overflowed fp32 (inf scale): the quantizer calibrated, then every forward raised
    scale, zero, _, _ = range_to_qparams(torch.tensor(-3e38), torch.tensor(3e38), 8, symmetric=False)
    assert float(scale) == pytest.approx(6e38 / 255, rel=1e-6) and float(zero) == 128
    x = torch.tensor([-3e38, 3e38, 1.0, -2e38])
    for method in ("max", "percentile", "mse_search"):
        y = ActQuantizer.from_data(x, 8, method, symmetric=False)(x)
        assert torch.isfinite(y).all() and (y - x).abs().max() <= 2 * float(scale), method


def test_qparams_and_fake_quant_check_range_and_zero():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="amax"):  # NaN gave a NaN scale
        range_to_qparams(None, float("nan"), 8)
    with pytest.raises(ValueError, match="amin"):
        range_to_qparams(torch.tensor(float("nan")), torch.tensor(1.0), 8, symmetric=False)
    with pytest.raises(ValueError, match=r"amin \(shape \(3,\)\) and amax"):  # was a broadcasting RuntimeError
        fake_quant_static(x, torch.ones(8), 8, amin=-torch.ones(3), axis=1, symmetric=False)
    with pytest.raises(ValueError, match="zero must have one element or as many as scale"):
        fake_quant(x, torch.ones(8), torch.zeros(3), 0, 255, axis=1)
    with pytest.raises(ValueError, match="zero must be finite"):  # every output was NaN
        fake_quant(x, torch.ones(8), torch.full((8,), float("nan")), 0, 255, axis=1)
    assert torch.equal(fake_quant(x, torch.ones(8), 0, -128, 127, axis=1), torch.round(x))  # a scalar zero still broadcasts


@pytest.mark.parametrize("method", METHODS_ALL)
def test_unsigned_calibration_of_negative_values_warns_once(method):
    import warnings

    with pytest.warns(UserWarning, match="unsigned=True.*negative") as rec:
        cal = make_calibrator(method, 8, unsigned=True)
        cal.collect(torch.randn(200))
        cal.collect(torch.randn(200))
    assert sum("unsigned=True" in str(w.message) for w in rec) == 1 and rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_calibrator(method, 8, unsigned=True).collect(torch.rand(200))  # non-negative: fine
        make_calibrator(method, 8, unsigned=True, symmetric=False).collect(torch.randn(200))  # asymmetric: no sign issue
        fake_quant_dynamic(torch.rand(20), unsigned=True)
    with pytest.warns(UserWarning, match="fake_quant_dynamic \\(unsigned=True\\)"):
        fake_quant_dynamic(torch.randn(20), unsigned=True)


def test_mse_search_bases_are_checked_by_name():
    x = torch.randn(100)
    for kw, match in (({"base_amax": float("nan")}, "base_amax must be finite"),
                      ({"base_amax": float("inf")}, "base_amax must be finite"),
                      ({"base_amax": -1.0}, "base_amax must be >= 0"),
                      ({"base_amin": -1.0}, "base_amin is for symmetric=False"),
                      ({"base_amin": 1.0, "base_amax": -1.0, "symmetric": False}, "base_amin <= base_amax")):
        with pytest.raises(ValueError, match=match):
            compute_amax(x, "mse_search", **kw)
    with pytest.raises(TypeError, match="base_amax"):
        MseCalibrator(base_amax="1")
    with pytest.raises(ValueError, match=r"base_amax.*got shape \(1, 1\)"):
        compute_amax(x, "mse_search", base_amax=torch.ones(1, 1))
    assert float(compute_amax(x, "mse_search", base_amax=2.0)) > 0


def test_act_quantizer_empty_loader_and_pair_batches_get_clear_errors():
    with pytest.raises(RuntimeError, match="before any input was seen.*empty calibration loader"):
        ActQuantizer.from_data([], 8, "percentile")  # was "compute_amax() before any collect()"
    xs = [torch.randn(4, 8) for _ in range(2)]
    for batches, kind in (([(x, 0) for x in xs], "tuple"), ([{"x": x} for x in xs], "dict")):
        with pytest.raises(TypeError, match=f"batch 0 is a {kind}.*for x, _ in loader"):
            ActQuantizer.from_data(batches, 8, "max")
    assert ActQuantizer.from_data((x for x, _ in [(x, 0) for x in xs]), 8, "max").scale > 0


def test_act_quantizer_refused_checkpoint_changes_nothing():
    x = torch.rand(64, 16) * 3
    per_ch = ActQuantizer.from_data(x, 8, "max", axis=-1)
    per_t = ActQuantizer.from_data(x, 8, "max")
    # the shapes alone tell a per-channel range from a per-tensor one (checkpoints without the axis)
    for dst, src in ((ActQuantizer(8, "max"), per_ch), (ActQuantizer(8, "max", axis=-1), per_t)):
        with pytest.raises(ValueError, match="different axis"):
            dst.load_state_dict(src.state_dict())
        assert dst.scale is None
    # a refused grid left an uncalibrated quantizer with an uninitialised (torch.empty_like) scale,
    # and a calibrated one with the refused checkpoint's range
    asym = ActQuantizer.from_data(x - 1, 8, "max", symmetric=False)
    unsigned = ActQuantizer.from_data(x, 8, "max", unsigned=True)
    fresh = ActQuantizer(8, "max")
    with pytest.raises(ValueError, match="zero points"):
        fresh.load_state_dict(asym.state_dict())
    assert fresh.scale is None and fresh.zero is None
    s0 = per_t.scale.clone()
    with pytest.raises(ValueError, match="grid and mode"):
        per_t.load_state_dict(unsigned.state_dict())
    assert torch.equal(per_t.scale, s0)


def test_calib_histogram_refuses_one_buffer_for_both_signs():
    h = torch.zeros(1, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="pos and neg must be separate"):
        ops.calib_histogram(torch.randn(1, 10), h, h, torch.tensor([4.0]), torch.tensor([16]), backend="native")
    assert int(h.sum()) == 0


@pytest.mark.parametrize("kw", [{}, {"axis": 1, "symmetric": False}, {"dynamic": True}])
def test_act_quantizer_compiles_fullgraph(kw):
    # the value checks (finite scale / zero, amax >= 0, ...) read tensor data: a data-dependent branch
    # under torch.compile, which failed fullgraph=True; they run in eager only
    from quantkern.ptq.calibrate import ActQuantizer

    x = torch.randn(4, 16)
    aq = ActQuantizer(8, "max", **kw) if kw.get("dynamic") else ActQuantizer.from_data(torch.randn(64, 16), 8, "max", **kw)
    f = torch.compile(lambda t: aq(t), fullgraph=True)
    assert torch.equal(f(x), aq(x))


@pytest.mark.filterwarnings("ignore:MseCalibrator")  # mse_search on these small per-channel batches
@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy", "mse_search"])
def test_empty_batches_are_skipped(method):
    # an MoE expert that got no token this step: "x is empty" from dynamic quantization and from
    # calibration; now dynamic returns the empty tensor and the calibrators record nothing
    empty = torch.randn(0, 16)
    for kw in ({}, {"axis": 0}, {"axis": 1, "symmetric": False}, {"unsigned": True}):
        y = ActQuantizer(8, dynamic=True, **kw)(empty)
        assert y.shape == (0, 16) and y.dtype == empty.dtype
        assert fake_quant_dynamic(empty.half(), 4, **kw).dtype == torch.float16
    xs = [torch.randn(5, 16), torch.randn(3, 16)]
    for kw in ({}, {"axis": -1}, {"symmetric": False}):
        want = ActQuantizer.from_data(xs, 8, method, **kw)
        got = ActQuantizer.from_data([empty, xs[0], empty, xs[1], torch.randn(2, 0, 16)], 8, method, **kw)
        assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
        assert got(empty).shape == (0, 16)
    with pytest.raises(RuntimeError, match="only empty batches"):
        ActQuantizer.from_data([empty], 8, method)
    with pytest.raises(ValueError, match="x is empty"):  # one-shot: nothing to calibrate on
        compute_amax(empty, method)
    cal = make_calibrator(method, 8, axis=-1)
    cal.collect(xs[0])
    with pytest.raises(ValueError, match="x has 8 channels along axis -1, earlier batches had 16"):
        cal.collect(torch.randn(0, 8))


def test_asymmetric_percentile_below_50_is_refused():
    # amin is the (100 - p) quantile, amax the p one: below 50 they cross, and the range came out
    # (0, 0) on N(0, 1) data, then "saw only zeros" and an integer grid
    x = torch.randn(10000)
    with pytest.raises(ValueError, match="percentile must be >= 50 for an asymmetric range"):
        compute_amax(x, "percentile", symmetric=False, percentile=30)
    with pytest.raises(ValueError, match="percentile must be >= 50"):
        ActQuantizer(8, "percentile", symmetric=False, percentile=49.9)
    cal = HistogramCalibrator("percentile", symmetric=False)
    cal.collect(x)
    with pytest.raises(ValueError, match="percentile must be >= 50"):
        cal.percentile = 10
    assert cal.percentile == 99.99
    cal.percentile = 50
    amin, amax = cal.compute_range()
    assert amin <= 0 <= amax and amax - amin < 0.1  # the median's bins
    assert compute_amax(x, "percentile", percentile=30) > 0  # symmetric: a quantile of |x|


def test_act_quantizer_checkpoint_records_the_axis():
    # a per-channel axis=-1 range loaded silently into an axis=0 quantizer (both 1-D), and only the
    # first forward failed; a dynamic quantizer has no range at all to tell per token from per tensor
    src = ActQuantizer.from_data([torch.randn(4, 7, 16)], 8, "max", axis=-1)
    dst = ActQuantizer(8, "max", axis=0)
    with pytest.raises(ValueError, match=r"grid and mode \(with the axis\).*'axis': -1.*'axis': 0"):
        dst.load_state_dict(src.state_dict())
    assert dst.scale is None
    with pytest.raises(ValueError, match="'axis': 0"):
        ActQuantizer(8, dynamic=True).load_state_dict(ActQuantizer(8, dynamic=True, axis=0).state_dict())
    same = ActQuantizer(8, "max", axis=-1)
    same.load_state_dict(src.state_dict())
    assert torch.equal(same.scale, src.scale)
    # checkpoints from before the axis was saved still load
    sd = src.state_dict()
    sd["_extra_state"] = {k: v for k, v in sd["_extra_state"].items() if k != "axis"}
    old = ActQuantizer(8, "max", axis=-1)
    old.load_state_dict(sd)
    assert torch.equal(old.scale, src.scale)


def test_mse_search_single_bin_histograms_tie_as_the_reference():
    # several candidates with zero error in exact arithmetic: the last ulp of the scale decides, and
    # the reference's `hi / amax` (a float over a tensor: reciprocal, then multiply) picked another bin
    # than the kernels' true division for ~1.5% of one-bin histograms (a review's fuzz)
    n, w = 128, 6.0 / 128
    for b in (83, 17, 101, 127):
        pos = torch.zeros(1, n, dtype=torch.long)
        pos[0, b] = 10
        _, amax = ops.calib_search(pos, torch.zeros_like(pos), torch.tensor([w], dtype=torch.float64),
                                   torch.tensor([n]), "mse", 8, unsigned=True, symmetric=True, stride=1, start_bin=8)
        want = R.amax_mse(pos[0].double(), torch.arange(n + 1, dtype=torch.float64) * w, 8, unsigned=True,
                           stride=1, start_bin=8)
        assert float(amax) == float(want)


@pytest.mark.parametrize("method", METHODS_ALL)
def test_calibration_across_inference_mode_and_normal_batches(method):
    # state made by a first batch under inference_mode (inference tensors) raised on an in-place update later
    x1, x2 = torch.randn(64), torch.randn(64) * 2
    aq = ActQuantizer(8, method).start_calibration()
    with torch.inference_mode():
        aq(x1)
    aq(x2)
    aq.finish_calibration()
    ref = ActQuantizer(8, method).start_calibration()
    ref(x1)
    ref(x2)
    ref.finish_calibration()
    assert torch.equal(aq.scale, ref.scale) and torch.equal(aq.zero, ref.zero)


def test_mse_calibrator_takes_numpy_bases_and_fake_quant_refuses_ints():
    import numpy as np

    c = MseCalibrator(8, axis=0, base_amax=np.array([1.0, 2.0, 3.0]))
    for _ in range(2):  # the second collect compared the array with None
        c.collect(torch.randn(3, 50))
    assert c.compute_amax().shape == (3,)
    with pytest.raises(TypeError, match="float tensor"):
        fake_quant(torch.arange(-3, 4), 0.5, 0, -128, 127)
    with pytest.raises(TypeError, match="float tensor"):
        fake_quant_static(torch.arange(-3, 4), torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"per-channel amax must be 1-D of length x.shape\[0\] = 4, got shape \(5,\)"):
        fake_quant_static(torch.randn(4, 3), torch.ones(5), axis=0)
