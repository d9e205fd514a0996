"""packed_linear: accuracy vs torch's own error, every CPU path, autograd, opcheck, compile, PackedLinear."""
import os

import pytest
import torch
import torch.nn.functional as F

import quantkern
from quantkern import PackedWeight, ops
from quantkern.nn import PackedLinear, replace_linear
from quantkern.nn.packed_linear import fake_quant_input
from quantkern.reference import packing as ref

from _isa import AVX512, AVX512_ENV, NATIVE

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (M, N, K, group_size): GEMV (M <= 4), AMX / fp32 panels (M > 4), several x chunks (M = 300),
# odd N, K not a multiple of 32 (one group per row), one group per row with K % 32 == 0. On AVX2,
# bf16 / fp16 x from M = 12 take the int16 GEMM (the rule tests below run M = 12 for it).
SHAPES = [(1, 33, 256, 64), (3, 17, 100, 100), (2, 40, 4096, 128), (8, 31, 96, 32), (33, 65, 384, 128),
          (300, 20, 128, 128), (5, 48, 64, 64),
          (9, 24, 4224, 128), (260, 18, 4224, 64)]  # K > 4096: AMX panel chunks / K blocks
# Relative-error floors that keep tiny, exactly-representable cases from being flaky.
FLOOR = {torch.float32: 2e-7, torch.bfloat16: 1e-4, torch.float16: 1e-5}

CONFIGS = [("auto", {})] + [(c, {}) for c in NATIVE if c != "avx512"]
if "avx512" in NATIVE:
    CONFIGS += [("avx512", {}), ("avx512", {"vnni": False}), ("avx512", {"amx": False}),
                ("avx512", {"vnni": False, "amx": False})]
elif AVX512:  # emulated (no AMX there): the VNNI GEMV, the AVX512-BF16 GEMM, the fp32 LUT GEMV and panels
    CONFIGS += [(AVX512, {}), (AVX512, {"vnni": False}), (AVX512, {"vnni": False, "bf16": False})]


@pytest.fixture(params=CONFIGS, ids=lambda c: c[0] + "".join(f"-no{k}" for k in c[1]))
def config(request):
    cap, feats = request.param
    quantkern.set_cpu_capability(cap)
    for k, v in feats.items():
        ops.set_cpu_feature(k, v)
    yield request.param
    quantkern.set_cpu_capability("auto")
    for k in feats:
        ops.set_cpu_feature(k, True)


def make(N, K, bits, gs, meta=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    return PackedWeight.from_float(W, bits, gs, meta)


def rel_err(y, truth):
    return ((y.double() - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def check_accuracy(y, x, pw, bias=None):
    """Our error vs the fp64 product must be <= 2x PyTorch's own error at x's dtype (plus a tiny floor)."""
    Wd = ref.dequantize(pw.qweight, pw.scales, pw.zeros, pw.bits, pw.group_size, pw.in_features)
    truth = x.double() @ Wd.double().T
    if bias is not None:
        truth = truth + bias.double()
    yt = F.linear(x, Wd.to(x.dtype), None if bias is None else bias.to(x.dtype))
    e, et = rel_err(y, truth), rel_err(yt, truth)
    assert y.dtype == x.dtype and y.shape == yt.shape
    assert e <= 2 * et + FLOOR[x.dtype], f"error {e:.3g} vs torch {et:.3g}"
    return e, et


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_accuracy(bits, config):
    for i, (M, N, K, gs) in enumerate(SHAPES):
        meta = (torch.float16, torch.bfloat16, torch.float32)[i % 3]
        pw = make(N, K, bits, gs, meta, seed=i)
        bias = torch.randn(N) if i % 2 else None
        for dt in DTYPES:
            x = torch.randn(M, K).to(dt)
            check_accuracy(ops.packed_linear(x, pw, bias), x, pw, bias)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_x_with_an_offset_and_weights_exact_in_its_dtype(bits, config):
    # x = dc + noise, weights (q - z) * 2^-3 with integer z: F.linear's own error is then only its
    # output rounding, and the int8 GEMV's zero-point term took the sum of x itself while the
    # products took x's int8 pieces, so the pieces' (correlated) error came in weighted by q ~ z:
    # 8-19x F.linear's error (a review's repro). Both terms now take the pieces' sum.
    # (the review's cases: weights in {-1/8, 0, 1/8}, so the true product is small next to z s sum x)
    g = torch.Generator().manual_seed(bits)
    zero = 2 ** (bits - 1)
    for M, N, K, gs, dc, noise in ((1, 64, 4096, 4096, 3.0, 0.1), (3, 64, 4096, 4096, 3.0, 0.1),
                                   (1, 64, 4096, 128, 1.0, 0.0), (5, 17, 544, 32, 3.0, 0.1)):
        q = (zero + torch.randint(-1, 2, (N, K), generator=g)).to(torch.uint8)
        G = K // gs
        pw = PackedWeight.from_quantized(q, torch.full((N, G), 0.125), torch.full((N, G), float(zero)), bits, gs)
        x = dc + noise * torch.randn(M, K, generator=g)
        x[:, ::128] = 1.3 if noise == 0 else x[:, ::128]  # a constant x with a few larger entries
        for dt in (torch.float16, torch.bfloat16):
            check_accuracy(ops.packed_linear(x.to(dt), pw), x.to(dt), pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_outliers_and_nonfinite(bits, config):
    """Activation outliers whose weights are exactly zero (q == z): the small GEMV's int8 split of
    x must keep the other entries' precision (a third piece); inf / NaN in x propagate as in a
    float product. M <= 4 and M = 8 (other paths), fp16 / bf16 (the int8 GEMV) and fp32."""
    N, K, gs = 40, 256, 64
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2 ** bits, (N, K), generator=g)
    zero = 2 ** (bits - 1)
    q[:, 3::gs] = zero
    pw = PackedWeight.from_quantized(q, torch.full((N, K // gs), 0.05), torch.full((N, K // gs), float(zero)),
                                     bits, gs)
    for dt in DTYPES:
        for M in (1, 3, 8):
            for outlier in (1e2, 1e3, 3e3):
                x = torch.randn(M, K, generator=g)
                x[:, 3::gs] = outlier
                x = x.to(dt)
                check_accuracy(ops.packed_linear(x, pw), x, pw)
            x = torch.randn(M, K, generator=g).to(dt)
            x[0, 5] = float("inf")
            x[-1, 70] = float("nan") if M > 1 else x[-1, 70]
            Wd = pw.dequantize(torch.float32)
            want = (x.float() @ Wd.T).to(dt)
            got = ops.packed_linear(x, pw)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), (dt, M)
            fin = want.isfinite()
            torch.testing.assert_close(got[fin], want[fin], rtol=2e-2, atol=2e-2)
            assert torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0))


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_many_large_entries_on_zero_weights(bits, config):
    """Several large entries per group (1/8 .. 1/2 of it) that all meet zero weights, so the output
    comes from the small ones: the mean-based outlier rule missed them and two int8 pieces gave 144%
    error (a test-drive). The bulk rule takes three pieces, or the exact fp32 path when even three
    cannot hold the small entries (range 1e5). Small entries down to amax / 32 and below."""
    N, K, gs = 32, 256, 64
    g = torch.Generator().manual_seed(10 + bits)
    zero = 2 ** (bits - 1)
    for every in (2, 4, 8, 64):
        q = torch.randint(0, 2 ** bits, (N, K), generator=g)
        q[:, ::every] = zero
        pw = PackedWeight.from_quantized(q, torch.full((N, K // gs), 0.125), torch.full((N, K // gs), float(zero)),
                                         bits, gs)
        for small in (1e-5, 1e-3, 1e-2):
            for dt in (torch.float16, torch.bfloat16):
                for M in (1, 3, 12):
                    x = torch.randn(M, K, generator=g) * small
                    x[:, ::every] = 1.0
                    x = x.to(dt)
                    check_accuracy(ops.packed_linear(x, pw), x, pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_gemm_tiles_take_their_own_pieces(bits, config):
    """Batches for the AVX2 int16 GEMM (M >= 12, bf16 / fp16 x; other paths elsewhere): 8 rows of x
    share a tile, and a tile takes two pieces where one of its rows needs them (an outlier row in
    one tile only), so plain, wide and mixed tiles, odd M (a partial last tile), odd N (a partial
    block of W rows), every group size up to the GEMM's 1024 and one group per row (K = 100, 1024),
    and groups beyond it (2048: the int16 GEMV's long-group path up to M = 16, the fp32 panels
    above), against the 2x F.linear bound; a row with inf sends the call to the fp32 GEMM and stays
    inf / NaN there alone."""
    g = torch.Generator().manual_seed(40 + bits)
    for N, K, gs in ((37, 1024, 32), (20, 1024, 64), (9, 2048, 256), (16, 2048, 1024), (13, 100, 100),
                     (11, 1024, 1024), (8, 4096, 2048)):
        pw = PackedWeight.from_float(torch.randn(N, K, generator=g), bits, gs, torch.bfloat16)
        for M in (12, 13, 24, 41):
            for dt in (torch.bfloat16, torch.float16):
                x = torch.randn(M, K, generator=g)
                x[M // 2, :: max(1, K // 7)] = 300.0  # one wide row: its tile takes two pieces
                x = x.to(dt)
                b = torch.randn(N, generator=g)
                check_accuracy(ops.packed_linear(x, pw, b), x, pw, b)
                x[-1, 3] = float("inf")
                y = ops.packed_linear(x, pw).float()
                assert not torch.isfinite(y[-1]).any() and torch.isfinite(y[:-1]).all()


@pytest.mark.skipif("avx2" not in NATIVE, reason="the AVX2 int16 GEMV / GEMM (this CPU has no AVX2)")
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_avx2_second_piece_per_group(bits):
    """The AVX2 int16 GEMV and GEMM give x a second piece in the groups whose range needs it (an
    outlier channel, a heavy tail, a DC offset), not in every group of the row, tile or call: a row's
    output is then the same bits whatever the other rows of its call (GEMV: each row alone; GEMM:
    another row of its tile of 8 replaced by one that needs two pieces everywhere), and rows mixing
    one- and two-piece groups stay within the 2x F.linear bound. Group sizes 64 / 128 (the short-group
    GEMV and the GEMM), 1024 (their limit) and 2048 (the GEMV's long-group path), one group per row."""
    quantkern.set_cpu_capability("avx2")
    try:
        g = torch.Generator().manual_seed(50 + bits)
        for N, K, gs in ((37, 1024, 64), (20, 2048, 128), (11, 2048, 1024), (9, 4096, 2048), (13, 1024, 1024)):
            pw = PackedWeight.from_float(torch.randn(N, K, generator=g), bits, gs, torch.bfloat16)
            for dt in (torch.bfloat16, torch.float16):
                x = torch.randn(24, K, generator=g)
                x[:8, 5] *= 40.0  # an outlier channel: its group needs two pieces in rows 0-7
                # heavy tails: Student-t with 2 degrees, z / sqrt(chi2_2 / 2), from g (the global RNG would make
                # the input depend on the tests run before)
                x[3] = (torch.randn(K, generator=g) / (-torch.rand(K, generator=g).log()).sqrt()).clamp(-1e3, 1e3)
                x[6, K // 2:] = 3.0 + 0.01 * torch.randn(K // 2, generator=g)  # a DC offset, half the row
                x = x.to(dt)
                xs = x[:9]  # the GEMV (M <= 11)
                y = ops.packed_linear(xs, pw)
                check_accuracy(y, xs, pw)
                for i in range(9):
                    assert torch.equal(y[i], ops.packed_linear(xs[i:i + 1], pw)[0]), (N, K, gs, dt, i)
                y = ops.packed_linear(x, pw)  # the GEMM: tiles 0 (mixed) and 1, 2 (one piece)
                check_accuracy(y, x, pw)
                x2 = x.clone()
                x2[9, ::7] = 300.0  # every group of row 9 needs two pieces now
                y2 = ops.packed_linear(x2, pw)
                check_accuracy(y2, x2, pw)
                keep = [i for i in range(24) if i != 9]
                assert torch.equal(y2[keep], y[keep]), (N, K, gs, dt)
    finally:
        quantkern.set_cpu_capability("auto")


def _mixed_group(gs, kind, scale, g):
    """One group of x for the fuzz below: ``kind`` as named there, times ``scale``."""
    x = torch.randn(gs, generator=g)
    if kind == "halftiny":  # half at 1, half tiny, one exact 0
        x = torch.where(torch.rand(gs, generator=g) < 0.5, torch.ones(gs), x * 1e-5)
        x[int(torch.randint(gs, (1,), generator=g))] = 0
    elif kind == "dc":
        x = 3 + 0.01 * x
    elif kind in ("outlier", "mid"):  # one entry at 50x, or at 9-17x the mean |x|
        r = 50.0 if kind == "outlier" else 9 + 8 * float(torch.rand(1, generator=g))
        x[int(torch.randint(gs, (1,), generator=g))] = r * x.abs().mean()
    elif kind == "sparse":
        x = x * (torch.rand(gs, generator=g) < 0.1)
    elif kind == "relu":
        x = x.relu()
    elif kind == "bulk":  # 70% at 1e-3 under entries at +-1
        x = torch.where(torch.rand(gs, generator=g) < 0.7, x * 1e-3, x.sign())
    elif kind == "silu":
        x = F.silu(x) * torch.randn(gs, generator=g)
    return x * scale


def test_packed_linear_rows_of_mixed_groups(config):
    """A fuzz of rows whose groups each follow another distribution (Gaussian, ReLU'd, sparse, one
    outlier of 50x or of 9-17x the mean |x|, half large and half tiny, a DC offset, a small bulk under
    large entries, silu(a) * b; scales 1e-3 - 1e2), on weights with 0, 50% or 90% of the codes at the
    zero point, fp16 / bf16, one row per call and 16 per call: the integer GEMVs / GEMM decide their
    pieces per group (AVX2) or per row (AVX-512), and every call stays within 2x F.linear's error."""
    g = torch.Generator().manual_seed(77)
    kinds = ("gauss", "halftiny", "dc", "outlier", "mid", "mid", "sparse", "relu", "bulk", "silu")
    for trial in range(120):
        gs = (32, 64, 128)[trial % 3]
        K, N, bits = gs * (2, 4, 8)[trial // 3 % 3], 8, (2, 3, 4)[trial // 27 % 3]
        zero = 2 ** (bits - 1)
        q = torch.randint(0, 2 ** bits, (N, K), generator=g)
        q[torch.rand(N, K, generator=g) < (0.0, 0.5, 0.9)[trial // 9 % 3]] = zero
        pw = PackedWeight.from_quantized(q.to(torch.uint8), torch.full((N, K // gs), 0.125),
                                         torch.full((N, K // gs), float(zero)), bits, gs)
        dt = (torch.float16, torch.bfloat16)[trial % 2]
        rows = []
        for _ in range(16):
            picks = torch.randint(len(kinds), (K // gs,), generator=g).tolist()
            scales = (10 ** (5 * torch.rand(K // gs, generator=g) - 3)).tolist()
            rows.append(torch.cat([_mixed_group(gs, kinds[i], sc, g) for i, sc in zip(picks, scales)]))
        x = torch.stack(rows).to(dt)
        check_accuracy(ops.packed_linear(x, pw), x, pw)
        check_accuracy(torch.cat([ops.packed_linear(x[i:i + 1], pw) for i in range(16)]), x, pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_dc_offset_on_balanced_exact_weights(bits, config):
    """x = 3 + small noise on rows whose weights (exact in fp16) cancel the offset: the output is the
    noise's product alone, and one int16 piece of x (error amax / 65534 per entry) gave 0.3% error
    where F.linear is exact (a review's repro). The AVX2 GEMV takes two pieces when x spreads over
    less than amax / 8, the AVX-512 int8 GEMV three. The bound allows a last-place flip of an output:
    an exact output can sit on a rounding tie."""
    g = torch.Generator().manual_seed(20 + bits)
    zero = 2 ** (bits - 1)
    N, K, gs = 16, 1024, 128
    d = torch.randint(-1, 2, (N, K // 2), generator=g)
    q = (zero + torch.cat([d, -d], 1)).to(torch.uint8)  # every row sums (q - z) to 0
    pw = PackedWeight.from_quantized(q, torch.full((N, K // gs), 0.125), torch.full((N, K // gs), float(zero)),
                                     bits, gs)
    for noise in (0.01, 0.03):
        for M in (1, 3, 12):
            x = (3.0 + noise * torch.randn(M, K, generator=g)).half()
            truth = x.double() @ pw.dequantize(torch.float32).double().T
            e = rel_err(ops.packed_linear(x, pw), truth)
            assert e <= 5e-4, (noise, M, e)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_long_groups_at_full_scale(bits, config):
    """The integer GEMVs at their sums' limits: every code at its maximum and every x at the group's
    amax (the AVX2 int16 GEMV's h = +-32767 everywhere), in one group per row of up to 40000 weights
    (the int32 sums are flushed inside a group every 512 blocks), groups of 2048 (past the AVX2
    short-group path's 1024) and 1024 (its limit), and g64. M = 1 and 5."""
    top = 2 ** bits - 1
    for K, gs in ((4096, 4096), (17000, 17000), (40000, 40000), (16448, 64), (8192, 2048), (8192, 1024)):
        N = 5
        q = torch.full((N, K), top, dtype=torch.uint8)
        q[1, ::3] = 0  # one row with a pattern
        G = K // gs
        pw = PackedWeight.from_quantized(q, torch.full((N, G), 0.5), torch.zeros(N, G), bits, gs)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for M in (1, 5, 12):
                x = torch.ones(M, K)
                x[-1] = -1.0  # h = -32767
                if M > 1:
                    x[1, K // 2:] = 0.5
                x = x.to(dt)
                check_accuracy(ops.packed_linear(x, pw), x, pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_zero_points_far_out_at_full_scale(bits, config):
    """Groups of 32 - 1024 weights with every code at its maximum, every x at +-amax and zero points
    from -1000 to 1000 (the AVX2 GEMV folds a zero point's integer part, clamped to [-32, 32], into
    its int32 group sums: at 1024 weights and |z| = 32 those sums reach 2^30), fractional ones included."""
    top = 2 ** bits - 1
    K, N = 3072, 6
    q = torch.full((N, K), top, dtype=torch.uint8)
    q[1, ::2] = 0
    for gs in (32, 64, 96, 128, 256, 512, 1024):
        G = K // gs
        for z in (-1000.0, -32.0, -31.5, 0.0, 7.25, 32.0, 32.5, 1000.0):
            zeros = torch.full((N, G), z)
            zeros[2] = -z
            pw = PackedWeight.from_quantized(q, torch.full((N, G), 0.5), zeros, bits, gs)
            for dt in (torch.bfloat16, torch.float16):
                for M in (1, 3, 12):
                    x = torch.ones(M, K)
                    x[-1] = -1.0
                    x[0, 1::4] = 1e-3  # one row with a bulk: two pieces
                    x = x.to(dt)
                    check_accuracy(ops.packed_linear(x, pw), x, pw)


def test_packed_linear_one_group_of_huge_products_on_zero_weights(config):
    """A group whose x is 1e10 on weights with q = z (exactly 0) beside groups of 1e-10 entries: the
    output is the small groups' product alone. Summing every group's sum h q and its zero-point term
    apart and subtracting at the end lost it (output 0 at group sizes over 1024, a review's case)."""
    N, M, bits = 3, 2, 4
    for gs in (64, 1024, 2048, 4096):
        K = 2 * gs
        g = torch.Generator().manual_seed(gs)
        q = torch.randint(0, 16, (N, K), generator=g).to(torch.uint8)
        q[:, :gs] = 8
        pw = PackedWeight.from_quantized(q, torch.full((N, 2), 0.01), torch.full((N, 2), 8.0), bits, gs)
        x = torch.randn(M, K, generator=g) * 1e-10
        x[:, :gs] = 1e10
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            xd = x.to(dt) if dt != torch.float16 else (x * 1e-5).clamp(-6e4, 6e4).to(dt)  # fp16's range
            check_accuracy(ops.packed_linear(xd, pw), xd, pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_large_group_on_zero_weights_below_the_range_rule(bits, config):
    """One group of x 240x the others (every other group's amax pinned at 1; under the AVX-512 GEMV's
    kVnniGroupRange of 256, so it keeps its int8 pieces there) on weights with q = z, the rest positive
    (the zero-point term's sums cancel the most): the fp32 rounding of that group's two equal terms
    stays within F.linear's error. (Many such groups do not: README, the VNNI GEMV's blind spots.)"""
    N, K = 16, 1024
    z = 2 ** (bits - 1)
    for gs in (32, 64, 128):
        g = torch.Generator().manual_seed(bits * gs)
        q = torch.randint(0, 2 ** bits, (N, K), generator=g).to(torch.uint8)
        q[:, :gs] = z
        pw = PackedWeight.from_quantized(q, torch.full((N, K // gs), 0.01), torch.full((N, K // gs), float(z)),
                                         bits, gs)
        for dt in (torch.bfloat16, torch.float16):
            for M in (1, 3, 12):
                x = torch.rand(M, K, generator=g) * 0.5 + 0.5
                x[:, gs::gs] = 1.0  # each small group's amax exactly 1 (exact in fp16 / bf16, as is 240)
                x[:, :gs] = 240.0
                x = x.to(dt)
                check_accuracy(ops.packed_linear(x, pw), x, pw)


def test_packed_linear_huge_zero_points_with_tiny_scales():
    """z = 1e33 with s = 1e-30 (fp32 metadata): each weight (q - z) s is about -1000, finite, and so is
    the output; the zero point's fraction times the group's sum of x overflowed fp32 on its own."""
    N, K, gs = 3, 256, 64
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(5)).to(torch.uint8)
    pw = PackedWeight.from_quantized(q, torch.full((N, K // gs), 1e-30), torch.full((N, K // gs), 1e33), 4, gs)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.full((2, K), 0.125, dtype=dt)  # outputs about -32000: within fp16's range
        y = ops.packed_linear(x, pw)
        assert torch.isfinite(y).all(), y
        check_accuracy(y, x, pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_large_entries_on_the_codes_next_to_a_fractional_zero(bits, config):
    """As test_packed_linear_many_large_entries_on_zero_weights with fractional zero points: the large
    entries meet codes q = round(z), so each adds (q - z) x = -zf x, and the output is their sum plus
    the small entries' products. Neither may be lost to the other's size."""
    N, K = 32, 512
    g = torch.Generator().manual_seed(30 + bits)
    for gs in (64, 256):
        for zf in (0.25, -0.375, 0.5):
            z = 2 ** (bits - 1) + zf
            q = torch.randint(0, 2 ** bits, (N, K), generator=g)
            q[:, ::4] = round(z)
            pw = PackedWeight.from_quantized(q, torch.full((N, K // gs), 0.125), torch.full((N, K // gs), z), bits, gs)
            for small in (1e-3, 1e-2):
                for dt in (torch.float16, torch.bfloat16):
                    x = torch.randn(2, K, generator=g) * small
                    x[:, ::4] = 1.0
                    x = x.to(dt)
                    check_accuracy(ops.packed_linear(x, pw), x, pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_mixed_rows_take_the_widest_rule(bits, config):
    """A batch whose rows need different x splits (one plain, one with an outlier, one with a small
    bulk under a few large entries, one with an inf) is computed as a whole with the rule of its
    widest row: every finite row stays within 2x F.linear's error, the inf propagates."""
    N, K, gs = 24, 512, 64
    pw = make(N, K, bits, gs, torch.bfloat16, seed=11)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(4, K, generator=g)
    base[1, 7] = 500.0
    base[2] = base[2] * 1e-4
    base[2, ::16] = 1.0
    for dt in (torch.bfloat16, torch.float16):
        for rows in ((0, 1), (0, 2), (0, 1, 2), (2, 0, 1, 0)):
            x = base[list(rows)].to(dt)
            check_accuracy(ops.packed_linear(x, pw), x, pw)
        x = base.clone()
        x[3, 100] = float("inf")
        x = x.to(dt)
        y = ops.packed_linear(x, pw)
        assert not y[3].isfinite().all()
        check_accuracy(y[:3], x[:3], pw)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_tiny_inputs(bits, config):
    # bf16 x can be far below fp16's range: 127 / amax overflowed in the int8 GEMV for groups under
    # ~4e-37 (every entry became -128); such groups take the fp32 path. (fp32 x: the LUT GEMV, checked too.)
    pw = make(24, 256, bits, 64, torch.bfloat16, seed=3)
    Wd = ref.dequantize(pw.qweight, pw.scales, pw.zeros, bits, 64, 256).double()
    for dt in (torch.bfloat16, torch.float32):
        for sc in (1e-15, 1e-25, 1e-30, 1e-36, 1e-37, 1e-38):
            for M in (1, 3, 12):
                x = (torch.randn(M, 256) * sc).to(dt)
                for xx in (x, torch.cat([x[:, :64], torch.randn(M, 64).to(dt), x[:, 128:]], 1)):
                    truth = xx.double() @ Wd.T  # relative errors without check_accuracy's 1e-30 floor
                    e = ((ops.packed_linear(xx, pw).double() - truth).norm() / truth.norm()).item()
                    et = ((F.linear(xx, Wd.to(dt)).double() - truth).norm() / truth.norm()).item()
                    assert e <= 2 * et + 1e-3, (dt, sc, M, e, et)



def _activations(kind, M, K, g):
    x = torch.randn(M, K, generator=g)
    if kind == "relu":
        return x.relu()
    if kind == "lognormal":
        return x.exp()
    if kind == "gelu_negative":  # GELU of mostly negative inputs: a few large entries over a tiny bulk
        return F.gelu(2 * x - 2)
    if kind == "student_t":  # heavy tails: x / sqrt(chi2_3 / 3)
        return x / (torch.randn(3, M, K, generator=g).pow(2).mean(0).sqrt())
    return x


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_fp32_x_large_k(bits, config):
    """fp32 x at M <= 4 stays on the exact fp32 GEMV: the int8 VNNI GEMV with three pieces of x
    (tried twice, benchmarks/RESULTS_packed_linear.md) broke these. Zero-mean but skewed weights
    (z far from the middle of the code range) with one-signed x; just over half of a group's
    entries large where the weights are exactly zero; products near fp32's lower range."""
    g = torch.Generator().manual_seed(40 + bits)
    for K, gs in ((1152, 32), (1280, 256), (1056, None), (4096, 128)):
        meta = (torch.float16, torch.bfloat16, torch.float32)[K % 3]
        pw = PackedWeight.from_float(torch.empty(37, K).exponential_(generator=g) - 1, bits, gs, meta)
        for kind in ("gauss", "relu", "lognormal", "gelu_negative", "student_t"):
            for M in (1, 3, 12):
                x = _activations(kind, M, K, g)
                bias = torch.randn(37, generator=g) if M == 3 else None
                check_accuracy(ops.packed_linear(x, pw, bias), x, pw, bias)
        x = 1 + 0.1 * torch.rand(2, K, generator=g)
        check_accuracy(ops.packed_linear(x, pw), x, pw)
    K, N, top = 1024, 40, 2 ** bits - 1
    x = torch.randn(1, K, generator=g).sign() * 1e-6
    large = torch.zeros(K, dtype=torch.bool)
    for k0 in range(0, K, 32):
        large[k0 + torch.randperm(32, generator=g)[:17]] = True
    x[0, large] = 1.0
    q = torch.randint(0, top + 1, (N, K), dtype=torch.uint8, generator=g)
    q[:, large] = top // 2
    pw = PackedWeight.from_quantized(q, torch.full((N, K // 32), 0.01), torch.full((N, K // 32), float(top // 2)),
                                     bits, 32)
    check_accuracy(ops.packed_linear(x, pw), x, pw)
    pw = PackedWeight.from_float(torch.randn(N, K, generator=g) * 3e-36, bits, 128, torch.float32)
    x = torch.randn(2, K, generator=g) * 1e3
    check_accuracy(ops.packed_linear(x, pw), x, pw)


def _run_saved(tmp_path, script, threads, name, env=None):
    """Runs `script` (which saves its outputs to argv[1], argv[2] = thread count) in a fresh Python
    process (the kernels read their QUANTKERN_* knobs once at load time) and returns what it saved."""
    import subprocess
    import sys
    path = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", script, str(path), str(threads)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return torch.load(path)


_STREAM_ORDER_SCRIPT = """
import sys, torch, quantkern
from quantkern import PackedWeight, ops
torch.set_num_threads(int(sys.argv[2]))
out = {}
for bits in (2, 3, 4):
    for N in (32, 35, 71, 133):  # one slice per stream and tails of 1-3 rows
        g = torch.Generator().manual_seed(N * bits)
        pw = PackedWeight.from_float(torch.randn(N, 320, generator=g), bits, 64, torch.bfloat16)
        for M in (1, 2):
            x = torch.randn(M, 320, generator=g).to(torch.bfloat16)
            out[f"{bits}-{N}-{M}"] = ops.packed_linear(x, pw, torch.randn(N, generator=g))
torch.save(out, sys.argv[1])
"""


_ZEN4_FORM_SCRIPT = """
import sys, torch, quantkern
from quantkern import PackedWeight, ops
torch.set_num_threads(int(sys.argv[2]))
out = {}
for bits in (2, 3, 4):
    for K, gs in ((320, 64), (800, 32), (4096, 128), (1000, None), (96, 32)):  # partial chunks, one group per row
        for N, mdt in ((7, torch.float32), (70, torch.float16), (133, torch.bfloat16)):
            g = torch.Generator().manual_seed(K + N + bits)
            pw = PackedWeight.from_float(torch.randn(N, K, generator=g), bits, gs, mdt)
            x = torch.randn(8, K, generator=g)
            x[1, 5] = 300.0  # an outlier: three pieces of x
            b = torch.randn(N, generator=g)
            for xdt in (torch.bfloat16, torch.float16):
                for m in range(3):
                    out[f"{bits}-{K}-{gs}-{N}-{xdt}-{m}"] = ops.packed_linear(x[m:m + 1].to(xdt), pw, b)
                for rows in (2, 3, 4, 5, 8):  # 3-4 rows of x take two rows of W per block in the Zen 4 form
                    out[f"{bits}-{K}-{gs}-{N}-{xdt}-:{rows}"] = ops.packed_linear(x[:rows].to(xdt), pw)
                xi = x[:4].clone()
                xi[2, 0] = float("inf")  # that row takes the fp32 path, the others the GEMV one by one
                out[f"{bits}-{K}-{gs}-{N}-{xdt}-inf"] = ops.packed_linear(xi.to(xdt), pw, b)
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(AVX512 is None, reason="needs AVX-512 or its emulation")
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("knob, script", [("QUANTKERN_PK_STREAMS", _STREAM_ORDER_SCRIPT),
                                          ("QUANTKERN_PK_ZEN4_GEMV", _ZEN4_FORM_SCRIPT)])
def test_gemv_knob_keeps_bits(tmp_path, threads, knob, script):
    # Knobs of the VNNI GEMV, read once at load time (hence the subprocesses), that must not change
    # one output bit. QUANTKERN_PK_STREAMS: at M <= 2 it reads far-apart slices of its rows in
    # lockstep. QUANTKERN_PK_ZEN4_GEMV (the default on AMD CPUs): at M = 1 scales from a per-row
    # buffer and 2-bit fields from shifts, at 3-4 rows of x two rows of W per block, and 3-bit fields
    # from vpermb lookups at every M.
    runs = {v: _run_saved(tmp_path, script, threads, v, dict(os.environ, **AVX512_ENV, **{knob: v})) for v in ("0", "1")}
    assert runs["1"].keys() == runs["0"].keys()
    for key, y in runs["1"].items():  # as bytes: NaN (inf times a zero weight) compares equal to itself
        assert torch.equal(y.view(torch.uint8), runs["0"][key].view(torch.uint8)), key


_THREADS_SCRIPT = """
import sys, torch, quantkern
from quantkern import PackedWeight, ops
torch.set_num_threads(int(sys.argv[2]))
out = {}
for bits, K, N in ((4, 1024, 300), (3, 320, 1000), (2, 777, 130)):
    g = torch.Generator().manual_seed(K + N)
    pw = PackedWeight.from_float(torch.randn(N, K, generator=g), bits, 64 if K % 64 == 0 else None)
    b = torch.randn(N, generator=g)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for M in (1, 5, 17, 64, 200, 600):  # GEMV, LUT, the BLAS GEMM (fp32 / fp16; x in chunks at 600) or AMX (bf16)
            x = torch.randn(M, K, generator=g).to(dt).requires_grad_()
            bias = b.to(dt).detach().clone().requires_grad_()
            y = ops.packed_linear(x, pw, bias)
            y.backward(torch.randn(M, N, generator=g).to(dt))
            out[f"{bits}-{dt}-{M}"] = (y.detach(), x.grad, bias.grad)
# a one-output head over many rows: ATen's sum split the bias gradient's rows by thread count
g = torch.Generator().manual_seed(1)
pw = PackedWeight.from_float(torch.randn(1, 64, generator=g), 4, 64)
x = torch.randn(40000, 64, generator=g).requires_grad_()
bias = torch.zeros(1, requires_grad=True)
gy = torch.randn(40000, 1, generator=g)
ops.packed_linear(x, pw, bias).backward(gy)
out["head"] = (torch.zeros(1), x.grad, bias.grad)
# the same under torch.compile and with create_graph=True (the traced backward runs the same ops)
x.grad = bias.grad = None
torch.compile(lambda x: ops.packed_linear(x, pw, bias), fullgraph=True)(x).backward(gy)
out["head compiled"] = (torch.zeros(1), x.grad, bias.grad)
out["head create_graph"] = (torch.zeros(1),) + torch.autograd.grad(ops.packed_linear(x, pw, bias), (x, bias), gy,
                                                                   create_graph=True)
torch.save(out, sys.argv[1])
"""


def test_packed_linear_bits_do_not_depend_on_thread_count(tmp_path):
    # Every CPU path, forward, dX and the bias gradient, at 1, 2 and 3 threads (3 oversubscribes a 2-core machine, which
    # changes timing, never tiles): the BLAS paths run fixed tiles, one single-threaded sgemm each.
    runs = {threads: _run_saved(tmp_path, _THREADS_SCRIPT, threads, threads) for threads in (1, 2, 3)}
    for threads in (2, 3):
        for key, (y, gx, gb) in runs[threads].items():
            assert torch.equal(y, runs[1][key][0]), (threads, key, "forward")
            assert torch.equal(gx, runs[1][key][1]), (threads, key, "grad of x")
            assert torch.equal(gb, runs[1][key][2]), (threads, key, "grad of bias")
    for key in ("head compiled", "head create_graph"):
        assert torch.equal(runs[1][key][2], runs[1]["head"][2]), key


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_large_m_on_narrow_layers(bits, config):
    """M >= 512 on layers whose tiles of W would be under 256 rows: the BLAS GEMM then takes x in
    chunks of 256 rows (a partial last one here) against taller tiles."""
    for i, (M, N, K, gs) in enumerate([(512, 37, 96, 32), (600, 384, 192, 64), (1029, 1, 64, 64), (700, 200, 160, 32)]):
        pw = make(N, K, bits, gs, (torch.float16, torch.bfloat16, torch.float32)[i % 3], seed=i)
        bias = torch.randn(N) if i % 2 else None
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(M, K).to(dt)
            check_accuracy(ops.packed_linear(x, pw, bias), x, pw, bias)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_bf16_gemm_odd_shapes(bits, config):
    """bf16 x at M > 8: the AMX GEMM, or on CPUs without AMX (and with -noamx) the AVX512-BF16 GEMM
    (vdpbf16ps): rows of W not a multiple of 8 / 32, 1 to 3 m-tiles of 16 and a partial one, K with a
    partial chunk of the decode order, K blocks (partial sums kept between blocks), two x chunks."""
    for i, (M, N, K, gs) in enumerate([(17, 7, 96, 32), (33, 45, 1000, 1000), (40, 33, 256, 64),
                                       (100, 70, 4224, 64), (47, 9, 160, 32), (290, 12, 512, 128)]):
        pw = make(N, K, bits, gs, (torch.float16, torch.bfloat16, torch.float32)[i % 3], seed=i)
        bias = torch.randn(N) if i % 2 else None
        x = torch.randn(M, K).bfloat16()
        check_accuracy(ops.packed_linear(x, pw, bias), x, pw, bias)


def test_bf16_gemm_k_block_knob_is_rounded_to_whole_chunks():
    # QUANTKERN_PK_DP_KC (the AVX512-BF16 GEMM's K block, read once per process) must stay a multiple of
    # the 128-position decode chunk: 200 gave wrong outputs, 64 crashed, 0 divided by zero
    import subprocess
    import sys
    code = ("import torch, quantkern; import torch.nn.functional as F; from quantkern import PackedWeight, ops; "
            "from quantkern.reference import packing as ref; torch.manual_seed(0); "
            "pw = PackedWeight.from_float(torch.randn(24, 4224), 3, 128); x = torch.randn(9, 4224).bfloat16(); "
            "W = ref.dequantize(pw.qweight, pw.scales, pw.zeros, 3, 128, 4224); t = x.double() @ W.double().T; "
            "e = ((ops.packed_linear(x, pw).double() - t).norm() / t.norm()).item(); assert e < 0.01, e")
    for kc in ("0", "64", "200"):
        # (vnni off too: at M = 9 the int8 GEMV would take the call)
        env = dict(os.environ, **AVX512_ENV, QUANTKERN_PK_DP_KC=kc, QUANTKERN_DISABLE_CPU_FEATURES="amx,vnni")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (kc, r.returncode, r.stderr[-2000:])


@pytest.mark.skipif("avx512" not in NATIVE, reason="needs AVX-512 (the emulated table never runs AMX)")
@pytest.mark.parametrize("feature", ["bf16", "vbmi"])
def test_amx_path_needs_bf16_and_vbmi(feature):
    # the AMX path runs AVX512-BF16 and VBMI instructions: disabling either must keep it off (and the
    # AVX512-BF16 path of CPUs without AMX, which runs both too)
    pw = make(48, 256, 3, 64, torch.bfloat16, seed=5)
    x = torch.randn(40, 256).bfloat16()
    try:
        ops.set_cpu_feature("amx", False)
        ops.set_cpu_feature(feature, False)
        no_amx = ops.packed_linear(x, pw)
        ops.set_cpu_feature("amx", True)
        assert torch.equal(ops.packed_linear(x, pw), no_amx)
    finally:
        ops.set_cpu_feature("amx", True)
        ops.set_cpu_feature(feature, True)


def test_noncontiguous_and_batched():
    pw = make(24, 160, 4, 32)
    for dt in DTYPES:
        big = torch.randn(3, 5, 320).to(dt)
        x = big[..., ::2]  # [3, 5, 160], not contiguous
        y = ops.packed_linear(x, pw)
        assert y.shape == (3, 5, 24)
        check_accuracy(y.reshape(15, 24), x.reshape(15, 160), pw)
        assert ops.packed_linear(torch.randn(0, 160).to(dt), pw).shape == (0, 24)


@pytest.mark.parametrize("dt", DTYPES)
def test_grad_x(dt):
    pw = make(40, 96, 3, 32)
    bias = torch.randn(40, requires_grad=True)
    for M in (1, 9):
        x = torch.randn(M, 96).to(dt).requires_grad_()
        y = ops.packed_linear(x, pw, bias)
        gy = torch.randn_like(y)
        y.backward(gy)
        Wd = pw.dequantize(torch.float32)
        want = (gy.float() @ Wd).to(dt)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dt]
        torch.testing.assert_close(x.grad, want, rtol=tol, atol=tol)
        torch.testing.assert_close(bias.grad, gy.float().sum(0), rtol=1e-4, atol=1e-4)
        bias.grad = None


def test_half_bias_equals_its_fp32_widening():
    # a bf16 / fp16 bias is widened to fp32 inside the op (no ATen call): same bits as passing the
    # fp32 copy, strided or not, on the GEMV (M <= 4), AMX / fp32 GEMM and MKL (fp32, M > 16) paths
    for K, N, M in [(256, 33, 1), (256, 33, 7), (1024, 40, 40), (96, 17, 3)]:
        pw = make(N, K, 4, 32)
        args = (pw.qweight, pw.scales, pw.zeros, 4, 32, K)
        for xdt in DTYPES:
            x = torch.randn(M, K).to(xdt)
            for bdt in (torch.bfloat16, torch.float16):
                b = (torch.randn(2 * N) * 3).to(bdt)[::2]
                y = torch.ops.quantkern.packed_linear(x, *args, b)
                assert torch.equal(y, torch.ops.quantkern.packed_linear(x, *args, b.float()))


def test_inference_skips_autograd_but_not_its_rules():
    # Calls that need no gradient skip the C++ autograd Function (a fast path): same output bits,
    # no graph; a tensor input that requires grad (x, bias, or even the scales, whose gradient is
    # None) still records one; forward-mode dual tensors are refused, not silently untangented.
    pw = make(40, 96, 4, 32)
    x, bias = torch.randn(3, 96).bfloat16(), torch.randn(40)
    op = torch.ops.quantkern.packed_linear
    args = (pw.qweight, pw.scales, pw.zeros, 4, 32, 96)
    y0 = op(x, *args, bias)
    assert y0.grad_fn is None and not y0.requires_grad
    with torch.no_grad():
        assert op(x.requires_grad_(), *args, bias).grad_fn is None
    y1 = op(x, *args, bias)
    assert y1.grad_fn is not None and torch.equal(y0.view(torch.int16), y1.detach().view(torch.int16))
    x.requires_grad_(False)
    assert op(x, *args, bias.clone().requires_grad_()).requires_grad
    s = pw.scales.clone().requires_grad_()
    y2 = op(x, pw.qweight, s, pw.zeros, 4, 32, 96, bias)
    assert y2.requires_grad and torch.equal(y2.detach().view(torch.int16), y0.view(torch.int16))
    import torch.autograd.forward_ad as fwAD

    for ctx in (torch.enable_grad, torch.no_grad):
        with ctx(), fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
            op(fwAD.make_dual(x.float(), torch.randn(3, 96)), *args, None)


@pytest.mark.parametrize("dt", [torch.float32, torch.float16])
def test_blas_paths_across_tiles_and_chunks(dt):
    # The CPU fp32 / fp16 GEMM (M > 16) and the backward use fixed tiles and, for the backward,
    # chunks of 16 MiB of dequantized rows: here 2 chunks (N > 1024 at K = 4096), 2 row tiles of
    # dY (R > 256), full and partial tiles, against an fp64 product.
    pw = make(1100, 4096, 4, 64, seed=11)
    Wd = pw.dequantize(torch.float32).double()
    x = torch.randn(300, 4096).to(dt).requires_grad_()
    y = ops.packed_linear(x, pw)
    check_accuracy(y.detach(), x.detach(), pw)
    gy = torch.randn_like(y)
    y.backward(gy)
    truth = gy.double() @ Wd
    e, et = rel_err(x.grad, truth), rel_err((gy.float() @ Wd.float()).to(dt), truth)
    assert e <= 2 * et + FLOOR[dt], (e, et)


def test_grad_input_is_chunked():
    # the backward dequantizes blocks of rows, never the whole weight
    from quantkern._registry import packed_grad_input

    pw = make(50, 64, 4, 32)
    g = torch.randn(3, 50)
    calls = []

    def deq(*a):
        calls.append(a[0].shape[0])
        return torch.ops.quantkern.dequantize(*a)

    out = packed_grad_input(g, pw.qweight, pw.scales, pw.zeros, 4, 32, 64, deq, chunk_bytes=64 * 4 * 16)
    assert calls == [16, 16, 16, 2]
    torch.testing.assert_close(out, g @ pw.dequantize(torch.float32))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_opcheck(dt):
    for M, bits, gs in ((1, 4, 32), (6, 3, 64), (2, 2, 64)):
        pw = make(20, 64, bits, gs)
        x = torch.randn(M, 64).to(dt).requires_grad_()
        bias = torch.randn(20)
        torch.library.opcheck(torch.ops.quantkern.packed_linear,
                              (x, pw.qweight, pw.scales, pw.zeros, bits, gs, 64, bias))
        torch.library.opcheck(torch.ops.quantkern.packed_linear,
                              (x.detach(), pw.qweight, pw.scales, pw.zeros, bits, gs, 64, None))
        gy = torch.randn(M, 20).to(dt).requires_grad_()
        torch.library.opcheck(torch.ops.quantkern.packed_linear_backward,
                              (gy, pw.qweight, pw.scales, pw.zeros, bits, gs, 64))
        torch.library.opcheck(torch.ops.quantkern.packed_linear_bias_backward, (gy,))
        torch.library.opcheck(torch.ops.quantkern.packed_linear_bias_backward, (gy.detach().reshape(M, 4, 5),))


def test_bias_backward_op():
    # grad [..., N] -> fp32 [N], every leading dim summed; empty and zero-size shapes; a clear error on a 0-dim grad
    g = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    out = torch.ops.quantkern.packed_linear_bias_backward(g)
    assert out.dtype == torch.float32 and out.shape == (7,)
    torch.testing.assert_close(out, g.float().sum((0, 1)))
    assert torch.equal(torch.ops.quantkern.packed_linear_bias_backward(torch.zeros(0, 4)), torch.zeros(4))
    assert torch.ops.quantkern.packed_linear_bias_backward(torch.zeros(3, 0)).shape == (0,)
    with pytest.raises(RuntimeError, match="at least 1 dim"):
        torch.ops.quantkern.packed_linear_bias_backward(torch.tensor(1.0))


def test_torch_compile_functional_and_module():
    torch._dynamo.reset()
    pw = make(32, 128, 4, 64)
    bias = torch.randn(32)
    f = torch.compile(lambda x: ops.packed_linear(x, pw, bias), fullgraph=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(f(x), ops.packed_linear(x, pw, bias))
    lin = torch.nn.Linear(128, 32)
    m = PackedLinear.from_linear(lin, bits=3, group_size=32)
    cm = torch.compile(m, fullgraph=True)
    xb = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(cm(xb), m(xb))


def test_torch_compile_backward():
    # the native op's autograd is a C++ kernel: it must trace under torch.compile too
    torch._dynamo.reset()
    pw = make(24, 64, 3, 32)
    bias = torch.randn(24, requires_grad=True)
    f = torch.compile(lambda x: ops.packed_linear(x, pw, bias), fullgraph=True)
    x = torch.randn(5, 64, requires_grad=True)
    gy = torch.randn(5, 24)
    f(x).backward(gy)
    gx, gb = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    ops.packed_linear(x, pw, bias).backward(gy)
    # the compiled backward runs the same packed_linear_backward and packed_linear_bias_backward kernels
    assert torch.equal(gx, x.grad) and torch.equal(gb, bias.grad)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_double_backward(dt):
    # create_graph=True: dX = dY W is the op packed_linear_backward, whose own gradient (with
    # respect to dY) is packed_linear; checked against the float64 formulas
    pw = make(30, 96, 4, 32)
    Wd = pw.dequantize(torch.float32).double()
    x = torch.randn(7, 96).to(dt).requires_grad_()
    gy = torch.randn(7, 30).to(dt).requires_grad_()
    (gx,) = torch.autograd.grad(ops.packed_linear(x, pw), x, gy, create_graph=True)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dt]  # relative (norm) error
    assert rel_err(gx, gy.detach().double() @ Wd) < tol
    v = torch.randn(7, 96).to(dt)
    (ggy,) = torch.autograd.grad(gx, gy, v)
    assert ggy.dtype == dt and rel_err(ggy, v.double() @ Wd.T) < tol
    # the bias gradient (the op packed_linear_bias_backward) is differentiable too: d(sum of gy over rows)/d(gy)
    bias = torch.randn(30, requires_grad=True)
    (gb,) = torch.autograd.grad(ops.packed_linear(x, pw, bias), bias, gy, create_graph=True)
    u = torch.randn(30)
    (ggy,) = torch.autograd.grad(gb, gy, u)
    assert ggy.dtype == dt and torch.equal(ggy, u.to(dt).expand(7, 30))


def test_torch_compile_backward_dynamic_batch():
    # the C++ backward keeps the batch size symbolic: no recompile (and no recompile-limit error)
    # for every new number of rows
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pw = make(24, 64, 4, 32)
    bias = torch.randn(24, requires_grad=True)
    f = torch.compile(lambda x: ops.packed_linear(x, pw, bias), fullgraph=True, dynamic=True, backend="aot_eager")
    Wd = pw.dequantize(torch.float32)
    for M in range(2, 13):
        x = torch.randn(M, 64, requires_grad=True)
        f(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.ones(M, 24) @ Wd, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_packed_linear_module_roundtrip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    m = PackedLinear.from_linear(lin, bits=4, group_size=32)
    x = torch.randn(4, 96)
    y = m(x)
    # close to the float layer (4-bit RTN)
    assert rel_err(y, (lin(x)).double()) < 0.15
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias", "_extra_state"}
    m2 = PackedLinear(96, 40, bias=True, bits=4, group_size=32)
    m2.load_state_dict(sd)
    torch.testing.assert_close(m2(x), y, rtol=0, atol=0)
    bad = PackedLinear(96, 40, bias=True, bits=3, group_size=32)
    with pytest.raises((ValueError, RuntimeError)):
        bad.load_state_dict(sd)
    # trainable bias, frozen packed weight
    y.sum().backward()
    assert m.bias.grad is not None and not m.qweight.requires_grad
    assert "bits=4" in repr(m)


def test_packed_linear_module_dtype_cast_keeps_quantized_params():
    # model.to(bf16) / .half() cast the bias only: the metadata and the input range are the model
    torch.manual_seed(0)
    m = PackedLinear.from_linear(torch.nn.Linear(96, 40), bits=4, group_size=32, meta_dtype=torch.float16)
    m.set_input_quantizer(8, scale=0.0123, zero=3.0)
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    for cast in (lambda mod: mod.to(torch.bfloat16), lambda mod: mod.half(), lambda mod: mod.float()):
        cast(m)
        for k, v in m.state_dict().items():
            if isinstance(v, torch.Tensor) and k != "bias":
                assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert m.bias.dtype == torch.float32
    m.bias.data = before["bias"]
    y = m(x)
    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16
    torch.testing.assert_close(m(x), y, rtol=0.02, atol=0.02)
    # .double() (a model-wide cast): packed_linear has no float64 path and refused the float64 bias,
    # naming the bias, even for fp32 x; the bias keeps its dtype
    m.double()
    assert m.bias.dtype == torch.bfloat16 and m(x).dtype == torch.bfloat16


class ToyBlock(torch.nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.up, self.down = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        self.lm_head = torch.nn.Linear(d, 10)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8, -1) @ self.v(x)
        x = x + self.o(a)
        x = x + self.down(F.gelu(self.up(x)))
        return self.lm_head(x)


def test_replace_linear_toy_transformer():
    torch.manual_seed(0)
    model = ToyBlock().eval()
    x = torch.randn(2, 7, 64)
    ref_out = model(x)
    names = replace_linear(model, bits=4, group_size=32, skip=("lm_head",))
    assert sorted(names) == sorted(["q", "k", "v", "o", "up", "down"])
    assert type(model.lm_head) is torch.nn.Linear and isinstance(model.q, PackedLinear)
    out = model(x)
    assert rel_err(out, ref_out.double()) < 0.1
    sd = model.state_dict()
    model2 = ToyBlock()
    replace_linear(model2, bits=4, group_size=32, skip=("lm_head",))
    model2.load_state_dict(sd)
    torch.testing.assert_close(model2(x), out, rtol=0, atol=0)


def _transformers():
    try:
        import transformers  # noqa: F401

        return transformers
    except Exception as e:  # pragma: no cover
        pytest.skip(f"transformers not usable: {e}")


def test_replace_linear_hf_llama_and_vit():
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref_logits = model(ids).logits
        names = replace_linear(model, bits=4, group_size=32, skip=("lm_head",))
        assert len(names) == 2 * 7
        logits = model(ids).logits
    assert rel_err(logits, ref_logits.double()) < 0.2
    vcfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=5)
    vit = tf.ViTForImageClassification(vcfg).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_v = vit(pixel_values=px).logits
        names = replace_linear(vit, bits=4, group_size=32, skip=("classifier",))
        assert len(names) == 2 * 6
        out_v = vit(pixel_values=px).logits
    assert rel_err(out_v, ref_v.double()) < 0.2


def test_errors():
    pw = make(8, 64, 4, 32)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.packed_linear(torch.randint(0, 3, (2, 64)), pw)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\]"):
        ops.packed_linear(torch.randn(2, 63), pw)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.packed_linear(torch.randn(2, 64), pw, torch.randn(7))
    with pytest.raises(TypeError, match="weight must be a quantkern.PackedWeight"):
        ops.packed_linear(torch.randn(2, 64), pw.qweight)
    with pytest.raises(ValueError, match="weight is on"):
        ops.packed_linear(torch.randn(2, 64, device="meta"), pw)
    with pytest.raises(ValueError, match="backend"):
        ops.packed_linear(torch.randn(2, 64), pw, backend="cuda")
    with pytest.raises(ValueError, match="bits"):
        PackedLinear(64, 8, bits=5)
    with pytest.raises(ValueError, match="group_size 48"):
        PackedLinear(96, 8, group_size=48)
    # the C++ op checks on its own
    with pytest.raises(RuntimeError, match="x must have shape"):
        torch.ops.quantkern.packed_linear(torch.randn(2, 60), pw.qweight, pw.scales, pw.zeros, 4, 32, 64, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.quantkern.packed_linear(torch.randn(2, 64), pw.qweight, pw.scales, pw.zeros, 4, 32, 64,
                                          torch.randn(3))
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.quantkern.packed_linear(torch.randn(2, 64).double(), pw.qweight, pw.scales, pw.zeros, 4, 32, 64,
                                          None)
    # device checks name the tensor they compare with; a meta tensor among CPU ones reaches the fake kernel
    with pytest.raises(ValueError, match="zeros is on meta but qweight is on cpu"):
        PackedWeight(pw.qweight, pw.scales, pw.zeros.to("meta"), 4, 32, (8, 64))
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        torch.ops.quantkern.packed_linear(torch.randn(2, 64), pw.qweight, pw.scales, pw.zeros, 4, 32, 64,
                                          torch.randn(8, device="meta"))


# ---------------------------------------------------------------- Triton (interpreter on CPU)
def _triton_ready():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest.py)")
    try:
        import quantkern.triton_kernels  # noqa: F401
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"triton not installed: {e}")


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_triton_packed_linear(bits):
    _triton_ready()
    for i, (M, N, K, gs) in enumerate([(3, 33, 100, 100), (17, 40, 128, 32), (1, 20, 64, 64)]):
        pw = make(N, K, bits, gs, (torch.float16, torch.bfloat16, torch.float32)[i])
        Wd = ref.dequantize(pw.qweight, pw.scales, pw.zeros, bits, gs, K)
        assert torch.equal(pw.dequantize(torch.float32, backend="triton"), Wd)
        assert torch.equal(pw.dequantize(torch.bfloat16, backend="triton"), Wd.bfloat16())
        bias = torch.randn(N) if i else None
        for dt in DTYPES:
            x = torch.randn(M, K).to(dt)
            check_accuracy(ops.packed_linear(x, pw, bias, backend="triton"), x, pw, bias)


def _launch(x, pw, bias, **kw):
    """y = x @ W.T (+ bias) by the Triton launcher directly (``kw``: split / gemv / config overrides)."""
    from quantkern.triton_kernels import packed_linear as tpl

    y = torch.empty(x.shape[0], pw.shape[0], dtype=x.dtype, device=x.device)
    tpl.launch(x, pw.qweight.view(torch.uint8), pw.scales, pw.zeros, bias, y, pw.bits, pw.group_size, **kw)
    return y


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_triton_every_autotune_config(bits):
    """Each GEMV / GEMM candidate a GPU may pick (the interpreter autotunes over one), with and
    without split-K (slices of unequal length), a ragged last block and one group per row."""
    _triton_ready()
    from quantkern.triton_kernels import packed_linear as tpl

    cases = [(2, 37, 544, 32), (3, 19, 100, 100)]  # nb = 17 blocks (split 3: 6 + 6 + 5); K % 32 != 0
    for M, N, K, gs in cases:
        pw = make(N, K, bits, gs, torch.bfloat16, seed=K)
        bias = torch.randn(N)
        for i, cfg in enumerate(tpl.GPU_GEMV_CONFIGS):  # (x's dtype alternates over the configs)
            x = torch.randn(M, K).to((torch.bfloat16, torch.float32)[i % 2])
            for split in (1, 3):
                check_accuracy(_launch(x, pw, bias, split=split, gemv=True, config=cfg), x, pw, bias)
        for i, cfg in enumerate(tpl.GPU_GEMM_CONFIGS):
            x = torch.randn(20, K).to((torch.float16, torch.float32)[i % 2])
            check_accuracy(_launch(x, pw, bias, gemv=False, config=cfg), x, pw, bias)
    # the automatic split: enough programs for the (interpreter's) fixed target, slices >= 8 blocks
    assert tpl.gemv_split(1, 16, 64, torch.device("cpu")) == 8
    assert tpl.gemv_split(1, 16, 20, torch.device("cpu")) == 2
    assert tpl.gemv_split(4, 4096, 128, torch.device("cpu")) == 1


def test_triton_padding_weights_are_zero():
    """The padding after K in the last block decodes as -z * s; rounded to fp16 that may be inf
    (here -75000) and inf * 0 = NaN: the kernels must use exact zeros there (as the native ones)."""
    _triton_ready()
    K = N = 40
    W = torch.randint(3, 16, (N, K)).float()
    q, s, z = W.to(torch.uint8), torch.full((N, 1), 5000.0), torch.full((N, 1), 15.0)
    pw = PackedWeight(ops.pack(q, 4), s, z, 4, K, (N, K))
    for M in (1, 8):
        x = torch.randn(M, K).half() * 1e-3
        want = ops.packed_linear(x, pw)  # native
        assert torch.isfinite(want).all()
        assert torch.isfinite(ops.packed_linear(x, pw, backend="triton")).all()
        assert torch.isfinite(_launch(x, pw, None, split=2, gemv=True)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test needs a GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_triton_gpu_every_config(bits):
    """The compiled Triton kernels on a GPU (run with TRITON_INTERPRET=0, as scripts/gpu_check/run.sh
    does): the autotuned public path and every candidate, GEMV with and without split-K, GEMM."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 runs the interpreter: set TRITON_INTERPRET=0 to test the compiled kernels")
    from quantkern.triton_kernels import packed_linear as tpl

    for M, N, K, gs in [(1, 4099, 4096, 64), (3, 37, 544, 32), (2, 19, 100, 100), (40, 300, 1024, 128)]:
        pw = make(N, K, bits, gs, torch.bfloat16, seed=N).to("cuda")
        bias = torch.randn(N, device="cuda")
        for dt in DTYPES:
            x = torch.randn(M, K, device="cuda").to(dt)
            check_accuracy(ops.packed_linear(x, pw, bias, backend="triton"), x, pw, bias)
            assert torch.equal(pw.dequantize(torch.float32, backend="triton"),
                               ref.dequantize(pw.qweight, pw.scales, pw.zeros, bits, gs, K))
            gemv = M <= tpl.GEMV_MAX_M
            for cfg in tpl.GPU_GEMV_CONFIGS if gemv else tpl.GPU_GEMM_CONFIGS:
                for split in ((1, 3) if gemv else (None,)):
                    check_accuracy(_launch(x, pw, bias, split=split, gemv=gemv, config=cfg), x, pw, bias)


# Compiles every GPU autotune candidate for sm_90 (Triton ships ptxas: no GPU needed), bits and
# x's dtype cycling over the configs, and reports the PTX instructions that matter.
_PTX_SCRIPT = r"""
import triton.language as tl
from _ptx import compile_ptx, instructions
from quantkern.triton_kernels import packed_linear as P

TY = {tl.bfloat16: "bf16", tl.float32: "fp32", tl.float16: "fp16"}
GEO = {n: "i32" for n in ("M", "N", "K", "G", "gs", "row_bytes", "nb")}
DIV16 = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "K", "row_bytes")

def ops(fn, sig, consts, cfg):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    found = instructions(compile_ptx(fn, sig, consts, DIV16, cfg.num_warps, cfg.num_stages))
    return sorted(o for o in found if o.startswith(("fma", "mad.f", "ld.global.v", "mma", "wgmma.mma")))

for i, cfg in enumerate(P.GPU_GEMV_CONFIGS):
    bits, xt, direct = (4, 3, 2)[i % 3], (tl.bfloat16, tl.float32)[i % 2], i % 2 == 0
    sig = {"x_ptr": "*" + TY[xt], "qw_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*fp32",
           "out_ptr": "*" + (TY[xt] if direct else "fp32"), **GEO, "SPLIT": "i32", "M_CLASS": "i32"}
    print("gemv", i, bits, TY[xt], *ops(P._gemv_kernel, sig, dict(cfg.kwargs, BITS=bits, XT=xt, HAS_BIAS=True, DIRECT=direct), cfg))
for i, cfg in enumerate(P.GPU_GEMM_CONFIGS):
    bits, xt = (2, 3, 4)[i % 3], (tl.bfloat16, tl.float32, tl.float16)[i % 3]
    sig = {"x_ptr": "*" + TY[xt], "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp32",
           "y_ptr": "*" + TY[xt], **GEO, "M_CLASS": "i32"}
    c = dict(cfg.kwargs, BITS=bits, XT=xt, HAS_BIAS=True, UPCAST=False, BM=64 if i % 2 else 16)
    print("gemm", i, bits, TY[xt], *ops(P._gemm_kernel, sig, c, cfg))
"""


def test_triton_packed_linear_gpu_codegen():
    """Every GPU candidate compiles for sm_90; the GEMV has no fused multiply-add (the reference's
    separate rounding) and loads 4-bit weights 16 bytes at a time; the 16-bit GEMM runs on tensor cores."""
    import _ptx

    _triton_ready()
    rows = [line.split() for line in _ptx.run_script(_PTX_SCRIPT, timeout=600)]
    from quantkern.triton_kernels import packed_linear as tpl

    assert len(rows) == len(tpl.GPU_GEMV_CONFIGS) + len(tpl.GPU_GEMM_CONFIGS)
    for kind, i, bits, dt, *found in rows:
        if kind == "gemv":
            assert not any(o.startswith(("fma", "mad.f")) for o in found), (kind, i, found)
            if bits == "4":
                assert "ld.global.v4.b32" in found, (kind, i, found)
        elif dt != "fp32":
            assert any(o.startswith(("mma.sync", "wgmma.mma")) for o in found), (kind, i, found)


def test_triton_grad_and_opcheck():
    _triton_ready()
    pw = make(24, 64, 3, 32)
    x = torch.randn(2, 64, requires_grad=True)
    y = ops.packed_linear(x, pw, backend="triton")
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones(2, 24) @ pw.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.quantkern.packed_linear_triton,
                          (x.detach().requires_grad_(), pw.qweight, pw.scales, pw.zeros, 3, 32, 64, None))
    # a float64 bias / output dtype is refused as natively, not cast (bias) or a KeyError (dtype)
    with pytest.raises(ValueError, match="bias must be float32"):
        torch.ops.quantkern.packed_linear_triton(x.detach(), pw.qweight, pw.scales, pw.zeros, 3, 32, 64,
                                                 torch.randn(24, dtype=torch.float64))
    from quantkern.triton_kernels.packed_linear import dequantize_triton
    with pytest.raises(ValueError, match="dtype must be"):
        dequantize_triton(pw.qweight, pw.scales, pw.zeros, 3, 32, 64, torch.float64)
    # direct op calls get the native op's checks (they read past the rows before)
    with pytest.raises((ValueError, RuntimeError), match="qweight"):
        torch.ops.quantkern.packed_linear_triton(torch.ones(1, 128), pw.qweight, pw.scales, pw.zeros, 3, 32, 128, None)
    with pytest.raises((ValueError, RuntimeError), match="x must have shape"):
        torch.ops.quantkern.packed_linear_triton(torch.ones(1, 32), pw.qweight, pw.scales, pw.zeros, 3, 32, 64, None)
    with pytest.raises((ValueError, RuntimeError), match="scales"):
        torch.ops.quantkern.dequantize_triton(pw.qweight, pw.scales[:, :1], pw.zeros[:, :1], 3, 32, 64, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test needs a GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cuda_native_misaligned_qweight_view(bits):
    # a contiguous qweight view at an odd storage offset (the decoders load 8 / 16-byte vectors)
    pw = PackedWeight.from_float(torch.randn(16, 128), bits, 64).to("cuda")
    buf = torch.empty(pw.qweight.numel() + 1, dtype=torch.int32, device="cuda")
    buf[1:] = pw.qweight.reshape(-1)
    qw = buf[1:].view(pw.qweight.shape)
    x = torch.randn(3, 128, device="cuda")
    want = torch.ops.quantkern.packed_linear(x, pw.qweight, pw.scales, pw.zeros, bits, 64, 128, None)
    got = torch.ops.quantkern.packed_linear(x, qw, pw.scales, pw.zeros, bits, 64, 128, None)
    assert torch.equal(got, want)


def test_replace_linear_and_constructor_check_arguments():
    def model():
        return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Linear(64, 8))

    with pytest.raises(TypeError, match="from_linear"):  # a bare Linear was silently left alone
        replace_linear(torch.nn.Linear(64, 8))

    # group_size=0 raised ZeroDivisionError; a negative or non-multiple-of-32 size silently became
    # one group per row (or, with fallback_group_size=False, left every layer float)
    for gs in (0, -2, 48, 33.0, True):
        for fb in (True, False):
            m = model()
            with pytest.raises(ValueError, match="replace_linear: group_size"):
                replace_linear(m, group_size=gs, fallback_group_size=fb)
            assert type(m[0]) is torch.nn.Linear
    with pytest.raises(ValueError, match="replace_linear: bits"):
        replace_linear(torch.nn.ReLU(), bits=5)  # even with nothing to replace
    assert replace_linear(model(), group_size=-1)[:1] == ["0"]
    # the constructor took any meta_dtype / backend and failed only in forward
    with pytest.raises(TypeError, match="meta_dtype"):
        PackedLinear(64, 8, group_size=32, meta_dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        PackedLinear(64, 8, group_size=32, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        replace_linear(model(), group_size=32, backend="cuda")


def test_failed_state_dict_load_keeps_the_module_usable():
    # a checkpoint with another meta dtype AND a mismatching shape: the scales / zeros were swapped
    # for uninitialised tensors before torch's size check failed, so the module computed NaN after
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    for other in (PackedLinear.from_linear(torch.nn.Linear(64, 9), 4, 32, torch.bfloat16),
                  PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 64, torch.bfloat16)):
        m = PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, torch.float16)
        y = m(x)
        with pytest.raises((RuntimeError, ValueError)):
            m.load_state_dict(other.state_dict())
        assert m.scales.dtype == torch.float16
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)
    # another meta dtype with a matching shape, refused by a later check (the input range, a missing
    # in_perm) or by torch's copy (a meta checkpoint): the old scales / zeros stay, not empty memory
    src = PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, torch.float32).set_input_quantizer(8, True,
                                                                                                    scale=0.1)
    zeros_on_meta = {**src.state_dict(), "zeros": src.zeros.to("meta")}  # scales copy, zeros fail: both go back
    for bad in ({**src.state_dict(), "input_scale": torch.tensor(0.0)},
                {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in src.state_dict().items()},
                zeros_on_meta):
        m = PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, torch.float16).set_input_quantizer(8, True,
                                                                                                      scale=0.05)
        y = m(x)
        with pytest.raises((RuntimeError, ValueError)):
            m.load_state_dict(bad)
        assert m.scales.dtype == m.zeros.dtype == torch.float16
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)
    m = PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, torch.float16).set_input_permutation(torch.arange(64))
    y = m(x)
    with pytest.raises(ValueError, match="comes without in_perm"):
        m.load_state_dict(PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, torch.float32).state_dict())
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)
    # a matching checkpoint with another meta dtype still loads exactly (strict)
    m = PackedLinear(64, 8, group_size=32, meta_dtype=torch.float16)
    src = PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, torch.bfloat16)
    m.load_state_dict(src.state_dict(), strict=True)
    assert m.scales.dtype == torch.bfloat16
    torch.testing.assert_close(m(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_input_quantizer_propagates_nan(symmetric):
    # a token holding NaN has a NaN range; it was treated like an all-zero token (range 0) and
    # silently replaced by zeros, so the layer returned just the bias for it
    torch.manual_seed(0)
    m = PackedLinear.from_linear(torch.nn.Linear(64, 8), 4, 32).set_input_quantizer(8, symmetric, dynamic=True)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    x[2] = 0.0
    y = m(x)
    assert torch.isnan(y[1]).all()
    assert torch.isnan(m.quantize_input(x)[1]).all()  # the whole token (symmetric: round(x) on scale 1 before)
    torch.testing.assert_close(y[2], m.bias.detach(), rtol=0, atol=0)  # an all-zero token still quantizes to 0
    assert torch.isfinite(y[0]).all()


@pytest.mark.parametrize("backend", ("native", "triton"))
def test_backward_with_zero_out_features(backend):
    # the backward reshaped grad [..., 0] with -1 ("cannot reshape tensor of 0 elements")
    if backend == "triton":
        _triton_ready()
    pw = PackedWeight.from_float(torch.randn(0, 64), 4, 32)
    for shape in ((3, 64), (2, 3, 64), (64,)):
        x = torch.randn(*shape, requires_grad=True)
        b = torch.zeros(0, requires_grad=True)
        y = ops.packed_linear(x, pw, b, backend=backend)
        assert y.shape == shape[:-1] + (0,)
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros(shape)) and b.grad.shape == (0,)


def test_auto_backend_on_cuda_registers_the_triton_kernels():
    # auto on a CUDA tensor chose "triton" after importing triton only, so the *_triton kernels
    # were never registered and every auto call on a GPU raised NotImplementedError
    import subprocess
    import sys

    _triton_ready()
    code = ("import sys, types, torch, quantkern\n"
            "from quantkern import ops\n"
            "assert 'quantkern.triton_kernels' not in sys.modules\n"
            "x = types.SimpleNamespace(device=torch.device('cuda'))\n"
            "assert ops._pick_backend('packed_linear', x, 'auto') == 'triton'\n"
            "assert 'quantkern.triton_kernels' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_triton_kernels_import_from_an_uninstalled_source_tree(tmp_path):
    # a tree built with `setup.py build_ext --inplace` and run from its root (no install, so no
    # package_dir mapping): quantkern.triton_kernels failed to import there (seen on a GPU machine)
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    _triton_ready()
    root = Path(quantkern.__file__).resolve().parent.parent
    shutil.copytree(root / "quantkern", tmp_path / "quantkern", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "triton_kernels", tmp_path / "triton_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "setup.py", tmp_path / "setup.py")
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(getattr(f, '__module__', ''))]\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "import quantkern, quantkern.triton_kernels as t\n"
            f"assert quantkern.__file__.startswith({str(tmp_path)!r}), quantkern.__file__\n"
            f"assert t.__file__.startswith({str(tmp_path)!r}), t.__file__\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_replace_linear_keeps_a_frozen_bias_frozen():
    m = torch.nn.Sequential(torch.nn.Linear(64, 64))
    m.requires_grad_(False)
    replace_linear(m, 4, 32, skip=None)
    assert isinstance(m[0], PackedLinear) and not m[0].bias.requires_grad


def test_replace_linear_names_its_group_size_fallbacks():
    # the README promised a warning; the fallback (and fallback_group_size=False's float layers) were silent
    m = torch.nn.Sequential(torch.nn.Linear(96, 8), torch.nn.Linear(8, 8), torch.nn.Linear(352, 8))
    with pytest.warns(UserWarning, match=r"group_size 64 does not divide.*0 \(in_features 96\): g32.*1 \(in_features 8\): "
                                         r"one group per row.*2 \(in_features 352\): g32"):
        assert replace_linear(m, 4, 64, skip=None) == ["0", "1", "2"]
    assert [l.group_size for l in m] == [32, 8, 32]
    m = torch.nn.Sequential(torch.nn.Linear(96, 8), torch.nn.Linear(128, 8))
    with pytest.warns(UserWarning, match=r"0 \(in_features 96\); they stay float"):
        assert replace_linear(m, 4, 64, skip=None, fallback_group_size=False) == ["1"]


def test_replace_linear_warns_when_nothing_is_replaced():
    # e.g. a model of convolutions only: an empty result used to pass silently
    with pytest.warns(UserWarning, match="has no nn.Linear"):
        assert replace_linear(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv1d(4, 4, 1))) == []
    with pytest.warns(UserWarning, match="fallback_group_size=False"):
        assert replace_linear(torch.nn.Sequential(torch.nn.Linear(40, 8)), group_size=32, skip=None,
                              fallback_group_size=False) == []


@pytest.mark.parametrize("bad", ["nan_scales", "inf_zeros", "float_qweight", "float64_scales"])
def test_packed_linear_state_dict_load_validates_the_packed_weight(bad):
    # load_quantized validates through PackedWeight; a plain load_state_dict used to take NaN
    # scales (NaN outputs), cast a float qweight into the int32 buffer (wrong weights) or leave
    # scales and zeros in different dtypes (forward error), silently
    src = PackedLinear.from_linear(torch.nn.Linear(64, 16), 4, 32)
    sd = src.state_dict()
    if bad == "nan_scales":
        sd["scales"] = torch.full_like(sd["scales"], float("nan"))
    elif bad == "inf_zeros":
        sd["zeros"] = torch.full_like(sd["zeros"], float("inf"))
    elif bad == "float_qweight":
        sd["qweight"] = sd["qweight"].float()
    else:
        sd["scales"] = sd["scales"].double()
    dst = PackedLinear(64, 16, bits=4, group_size=32)
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises((ValueError, TypeError), match="PackedLinear: checkpoint"):
        dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():  # refused before any buffer changed
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k


def test_replace_linear_refuses_meta_and_float64_models_up_front():
    # a meta model failed inside the quantizer ("Tensor.item() cannot be called on meta tensors");
    # a float64 model was converted, then every forward failed (PackedLinear takes fp32 / fp16 / bf16)
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"layers \['0'\] are on the meta device"):
        replace_linear(m, 4, 32, skip=None)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 32)).double()
    with pytest.raises(TypeError, match="float64"):
        replace_linear(m, 4, 32, skip=None)
    assert all(type(x) is torch.nn.Linear for x in m)


def test_packed_linear_under_torch_func():
    """torch.func transforms: the C++ autograd cannot run under them, so ops.packed_linear takes
    quantkern/_functorch.py's autograd.Functions there: vmap (a batch of x is one kernel call, a
    batched bias one call per sample), grad / vjp / jacrev, jvp / jacfwd / hessian, and per-sample
    gradients of a trainable layer next to a packed one."""
    g = torch.Generator().manual_seed(7)
    pw = make(24, 320, 4, 64, torch.bfloat16, seed=7)
    Wd = pw.dequantize(torch.float32)
    bias = torch.randn(24, generator=g)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 3, 320, generator=g).to(dt)
        b = bias.to(dt)
        y = torch.func.vmap(lambda xi: ops.packed_linear(xi, pw, b))(x)
        torch.testing.assert_close(y, ops.packed_linear(x, pw, b))
        y1 = torch.func.vmap(lambda xi: ops.packed_linear(xi, pw, b), in_dims=1, out_dims=1)(x)
        torch.testing.assert_close(y1, ops.packed_linear(x, pw, b))
        B = torch.randn(5, 24, generator=g).to(dt)  # batched bias: one call per sample, the same bits
        yb = torch.func.vmap(lambda xi, bi: ops.packed_linear(xi, pw, bi))(x, B)
        assert torch.equal(yb, torch.stack([ops.packed_linear(x[i], pw, B[i]) for i in range(5)]))
    x = torch.randn(5, 3, 320, generator=g)
    xr = x.clone().requires_grad_()
    br = bias.clone().requires_grad_()
    ops.packed_linear(xr, pw, br).pow(2).sum().backward()
    gx, gb = torch.func.grad(lambda xi, bi: ops.packed_linear(xi, pw, bi).pow(2).sum(), argnums=(0, 1))(x, bias)
    assert torch.equal(gx, xr.grad) and torch.equal(gb, br.grad)
    per = torch.func.vmap(torch.func.grad(lambda xi: ops.packed_linear(xi, pw, bias).pow(2).sum()))(x)
    torch.testing.assert_close(per, xr.grad)
    assert torch.equal(torch.func.jacrev(lambda xi: ops.packed_linear(xi, pw))(x[0, 0]), Wd)
    torch.testing.assert_close(torch.func.jacfwd(lambda xi: ops.packed_linear(xi, pw, bias))(x[0, 0]), Wd)
    H = torch.func.hessian(lambda xi: ops.packed_linear(xi, pw, bias).pow(2).sum())(x[0, 0])
    torch.testing.assert_close(H, 2 * Wd.T @ Wd, rtol=1e-5, atol=1e-4)
    t = torch.randn_like(x)
    _, yt = torch.func.jvp(lambda xi: ops.packed_linear(xi, pw, bias), (x,), (t,))
    assert torch.equal(yt, ops.packed_linear(t, pw))
    # per-sample gradients of a LoRA-style adapter beside the packed layer
    lin = torch.nn.Linear(320, 24)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def loss(p, xi):
        return (torch.func.functional_call(lin, p, (xi,)) + ops.packed_linear(xi, pw)).pow(2).sum()

    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in (0, 4):
        lin.zero_grad()
        (lin(x[i]) + ops.packed_linear(x[i], pw)).pow(2).sum().backward()
        torch.testing.assert_close(per["weight"][i], lin.weight.grad)
        torch.testing.assert_close(per["bias"][i], lin.bias.grad)


def test_raw_packed_linear_ops_have_a_vmap_rule(capfd):
    """The raw ops under vmap (what dynamo traces for torch.compile of vmap): a batch of x / dY is one
    call (functorch's fallback looped per sample and printed "not yet implemented the batching rule");
    a batched bias runs per sample. Results equal the unbatched calls."""
    pw = make(16, 64, 4, 64, seed=1)
    Q = torch.ops.quantkern
    args = (pw.qweight, pw.scales, pw.zeros, 4, 64, 64)
    x, b, B = torch.randn(5, 3, 64), torch.randn(16), torch.randn(5, 16)
    want = Q.packed_linear(x, *args, b)
    assert torch.equal(torch.func.vmap(lambda xi: Q.packed_linear(xi, *args, b))(x), want)
    assert torch.equal(torch.func.vmap(lambda xi: Q.packed_linear(xi, *args, b), in_dims=1, out_dims=1)(x), want)
    yb = torch.func.vmap(lambda xi, bi: Q.packed_linear(xi, *args, bi))(x, B)
    torch.testing.assert_close(yb, Q.packed_linear(x, *args) + B[:, None], rtol=0, atol=1e-5)
    g = torch.randn(5, 3, 16)
    assert torch.equal(torch.func.vmap(lambda gi: Q.packed_linear_backward(gi, *args))(g),
                       Q.packed_linear_backward(g, *args))
    f = lambda xi: ops.packed_linear(xi, pw, b)  # noqa: E731
    assert torch.equal(torch.compile(torch.func.vmap(f))(x), want)
    assert "batching rule" not in capfd.readouterr().err
    # an empty batch with a batched bias (the per-sample branch) has F.linear's empty shape
    y0 = torch.func.vmap(lambda xi, bi: Q.packed_linear(xi, *args, bi))(x[:0], B[:0])
    assert y0.shape == (0, 3, 16)


def test_functionalize_and_forward_ad():
    """functionalize alone runs the raw ops (the transform path's Functions have no functionalize
    rule: "NYI"); forward-mode AD outside torch.func is refused, not answered with a dropped tangent."""
    import torch.autograd.forward_ad as fwAD

    pw = make(16, 64, 4, 64, seed=1)
    x = torch.randn(3, 64)
    assert torch.equal(torch.func.functionalize(lambda t: ops.packed_linear(t, pw))(x), ops.packed_linear(x, pw))
    s, b = torch.tensor([0.3]), torch.tensor([0.1])
    fq = lambda t: ops.fake_quant_lsq(t, s, b, -8, 7)  # noqa: E731
    assert torch.equal(torch.func.functionalize(fq)(x), fq(x))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        fq(fwAD.make_dual(x, torch.ones_like(x)))


def test_packed_linear_torch_func_with_compile_and_triton(monkeypatch):
    """torch.compile(fullgraph=True) around vmap keeps working (dynamo traces vmap itself; the
    transform path's guard is not traceable), and the Triton op, which has no transform support
    (its jvp came out zero), is refused inside a transform with a clear error."""
    pw = make(16, 64, 4, 64, seed=1)
    x = torch.randn(5, 3, 64)
    f = lambda xi: ops.packed_linear(xi, pw)  # noqa: E731
    torch.testing.assert_close(torch.compile(lambda t: torch.func.vmap(f)(t), fullgraph=True)(x), f(x))
    _triton_ready()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for transform in (lambda g: torch.func.jvp(g, (x,), (x,)), lambda g: torch.func.grad(lambda t: g(t).sum())(x)):
        with pytest.raises(NotImplementedError, match="need the native kernels"):
            transform(lambda xi: ops.packed_linear(xi, pw, backend="triton"))


def test_packed_linear_refuses_gradients_of_scales_and_zeros():
    """The packed weight is frozen: scales / zeros that require grad got a silent None gradient
    (eager) or a zero gradient / tangent (torch.func); they raise now, as dequantize does."""
    pw = make(12, 96, 4, 32, torch.float32, seed=3)
    x = torch.randn(2, 96)
    mk = lambda s=pw.scales, z=pw.zeros: PackedWeight(pw.qweight, s, z, 4, 32, pw.shape)  # noqa: E731
    msg = "no gradient with respect to scales / zeros"
    for s, z in ((pw.scales.clone().requires_grad_(), pw.zeros), (pw.scales, pw.zeros.clone().requires_grad_())):
        with pytest.raises(RuntimeError, match=msg):
            ops.packed_linear(x, mk(s, z))
        with torch.no_grad():  # no gradient asked for: the same bits as before
            assert torch.equal(ops.packed_linear(x, mk(s, z)), ops.packed_linear(x, pw))
    s0, z0, ones = pw.scales.clone(), pw.zeros.clone(), torch.ones_like(pw.scales)
    fs = lambda s: ops.packed_linear(x, mk(s))  # noqa: E731
    fz = lambda z: ops.packed_linear(x, mk(z=z))  # noqa: E731
    for call in (lambda: torch.func.grad(lambda s: fs(s).sum())(s0),
                 lambda: torch.func.jacrev(fz)(z0),
                 lambda: torch.func.vjp(fs, s0),
                 lambda: torch.func.jvp(fs, (s0,), (ones,)),
                 lambda: torch.func.jvp(fz, (z0,), (ones,)),
                 lambda: torch.func.jacfwd(fs)(s0),
                 lambda: torch.func.vmap(torch.func.grad(lambda s: fs(s).sum()))(torch.stack([s0, s0])),
                 lambda: torch.func.jacrev(lambda s: torch.func.grad(
                     lambda t: ops.packed_linear(t, mk(s)).pow(2).sum())(x))(s0)):
        with pytest.raises(RuntimeError, match=msg):
            call()
    # a constant packed weight inside jvp / jacfwd / hessian is not a tangent (functorch gave zeros there)
    bias = torch.randn(12)
    _, yt = torch.func.jvp(lambda t: ops.packed_linear(t, pw, bias), (x,), (x,))
    assert torch.equal(yt, ops.packed_linear(x, pw))
    Wd = pw.dequantize(torch.float32)
    torch.testing.assert_close(torch.func.hessian(lambda t: ops.packed_linear(t, pw).pow(2).sum())(x[0]),
                               2 * Wd.T @ Wd, rtol=1e-5, atol=1e-4)


def test_packed_linear_compiled_around_torch_func_grad():
    """torch.compile around torch.func.grad / vmap(grad) / jvp of a packed layer crashed ("cannot use C++
    torch::autograd::Function with functorch transforms": the transform path was skipped while compiling).
    PyTorch has no compiled form there: the call breaks the graph and the frame runs eagerly (same bits);
    fullgraph=True says so and what to do. torch.compile(fullgraph=True) of vmap alone still traces."""
    torch.manual_seed(0)
    m = PackedLinear.from_linear(torch.nn.Linear(64, 16), 4, 32)
    x = torch.randn(5, 64)
    g = lambda t: torch.func.grad(lambda u: m(u).pow(2).sum())(t)  # noqa: E731
    cases = [g, lambda t: torch.func.vmap(g)(t[:, None]),
             lambda t: torch.func.jvp(m, (t,), (t,))[1],
             lambda t: torch.func.grad(lambda u: torch.func.vmap(m)(u).sum())(t)]
    for f in cases:
        torch._dynamo.reset()
        assert torch.equal(torch.compile(f)(x), f(x))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"cannot be compiled inside torch.func.grad(.|\n)*drop fullgraph=True"):
        torch.compile(g, fullgraph=True)(x)
    torch._dynamo.reset()
    v = lambda t: torch.func.vmap(m)(t[:, None])  # noqa: E731
    assert torch.equal(torch.compile(v, fullgraph=True)(x), v(x))


def test_packed_linear_vmap_empty_batch():
    """vmap over an empty batch (e.g. a Poisson-sampled DP-SGD batch) with a batched bias (or a per-sample
    bias gradient) raised IndexError in the per-sample rule; it gives F.linear's empty shapes now."""
    pw = make(8, 64, 4, 32, torch.float32, seed=4)
    W = pw.dequantize(torch.float32)
    b, xs, x3, B = torch.randn(8), torch.randn(0, 64), torch.randn(0, 3, 64), torch.randn(0, 8)
    X = torch.randn(3, 64)

    def same(f, ref):
        got, want = f(), ref()
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]

    same(lambda: torch.func.vmap(torch.func.grad(lambda bb, t: ops.packed_linear(t, pw, bb).sum()),
                                 in_dims=(None, 0))(b, xs),
         lambda: torch.func.vmap(torch.func.grad(lambda bb, t: F.linear(t, W, bb).sum()), in_dims=(None, 0))(b, xs))
    same(lambda: torch.func.vmap(lambda bb: ops.packed_linear(X, pw, bb))(B),
         lambda: torch.func.vmap(lambda bb: F.linear(X, W, bb))(B))
    same(lambda: torch.func.vmap(lambda t, bb: ops.packed_linear(t, pw, bb))(x3.bfloat16(), B.half()),
         lambda: torch.func.vmap(lambda t, bb: F.linear(t, W.bfloat16(), bb.bfloat16()))(x3.bfloat16(), B.half()))
    same(lambda: torch.func.vmap(torch.func.grad(lambda t, bb: ops.packed_linear(t, pw, bb).sum(),
                                                 argnums=(0, 1)))(x3, B),
         lambda: torch.func.vmap(torch.func.grad(lambda t, bb: F.linear(t, W, bb).sum(), argnums=(0, 1)))(x3, B))
    S = pw.scales[None][:0]
    assert torch.func.vmap(lambda s: ops.packed_linear(X, PackedWeight(pw.qweight, s, pw.zeros, 4, 32, pw.shape)))(
        S).shape == (0, 3, 8)


def test_vmap_over_packed_weight_scales():
    """A PackedWeight built inside vmap from batched scales failed on its finite-value check
    (data-dependent control flow); the check is skipped inside torch.func transforms, kept outside."""
    pw = make(4, 64, 4, 32, torch.float32, seed=5)
    x = torch.randn(2, 64)
    S = torch.stack([pw.scales, pw.scales * 2])
    f = lambda s: ops.packed_linear(x, PackedWeight(pw.qweight, s, pw.zeros, 4, 32, pw.shape))  # noqa: E731
    assert torch.equal(torch.func.vmap(f)(S), torch.stack([f(s) for s in S]))
    with pytest.raises(ValueError, match="scales contain NaN or inf"):
        PackedWeight(pw.qweight, pw.scales * float("nan"), pw.zeros, 4, 32, pw.shape)


def test_dequantize_refuses_metadata_on_another_device():
    # a direct op call with scales / zeros on meta and qweight on the CPU returned a meta tensor silently
    pw = make(8, 64, 4, 32)
    with pytest.raises(ValueError, match="scales is on meta but qweight is on cpu"):
        torch.ops.quantkern.dequantize(pw.qweight, pw.scales.to("meta"), pw.zeros.to("meta"), 4, 32, 64, None)


def test_packed_linear_module_edge_cases():
    from quantkern.nn import PackedLinear

    for args, name in (((0, 4), "in_features"), ((64, -1), "out_features"), ((64.0, 4), "in_features")):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            PackedLinear(*args)
    # a float64 layer built, then failed on every forward
    with pytest.raises(TypeError, match="cast first"):
        PackedLinear.from_linear(torch.nn.Linear(64, 4).double(), 4, 64)
    lin = torch.nn.Linear(64, 4)
    lin.bias.requires_grad_(False)  # a frozen bias stays frozen
    assert not PackedLinear.from_linear(lin, 4, 64).bias.requires_grad
    m = PackedLinear.from_linear(torch.nn.Linear(64, 4), 4, 64)
    # code reading a Linear's .weight gets told why there is none
    with pytest.raises(AttributeError, match="no dense .weight"):
        m.weight
    assert not hasattr(m, "weight")
    # a partial checkpoint is checked together with the module's own buffers
    with pytest.raises(ValueError, match="NaN"):
        m.load_state_dict({"scales": torch.full_like(m.scales, float("nan"))}, strict=False)
    assert m.scales.dtype == torch.float32
    with pytest.raises(TypeError, match="must equal scales dtype"):
        m.load_state_dict({"scales": m.scales.half()}, strict=False)
    m.load_state_dict({"scales": m.scales.half(), "zeros": m.zeros.half()}, strict=False)
    assert m.scales.dtype == m.zeros.dtype == torch.float16


def test_replace_linear_under_inference_mode_makes_normal_tensors():
    # the layers it creates (packed ones, and attention projections it leaves float) were inference tensors
    m = torch.nn.Sequential(torch.nn.Linear(32, 32))
    m.add_module("attn", torch.nn.MultiheadAttention(32, 4, batch_first=True))
    with torch.inference_mode():
        replace_linear(m, 4, 32, skip=["attn.k_proj"])
    assert not any(t.is_inference() for t in list(m.parameters()) + list(m.buffers()))
    assert type(m.attn.k_proj) is torch.nn.Linear and isinstance(m.attn.q_proj, PackedLinear)


def test_meta_layer_takes_input_quantizer_placeholders_and_bad_dtypes_are_refused():
    for kw in (dict(bits=8, symmetric=False), dict(bits=8, symmetric=True, offset=0.0),
               dict(bits=8, symmetric=True, offset=0.0, per_channel=True), dict(bits=8, symmetric=True, dynamic=True)):
        m = PackedLinear(64, 16, bits=4, group_size=32, device="meta").set_input_quantizer(**kw)
        assert all(b.is_meta for b in m.buffers())
    with pytest.raises(ValueError, match="input scale must be finite"):  # (values on the host are still checked)
        PackedLinear(64, 16, group_size=32, device="meta").set_input_quantizer(8, True, scale=0.0)
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(TypeError, match="dtype must be None, torch.float32"):
            PackedLinear(64, 16, group_size=32, dtype=dtype)


def test_partial_checkpoint_of_the_input_scale_loads_into_either_static_form():
    for kw in (dict(), dict(offset=0.1)):
        torch.manual_seed(0)
        m = PackedLinear.from_linear(torch.nn.Linear(64, 16), 4, 32).set_input_quantizer(8, True, scale=0.05, **kw)
        m.load_state_dict({"input_scale": m.state_dict()["input_scale"] * 2}, strict=False)
        assert float(m.input_scale.reshape(-1)[0]) == pytest.approx(0.1)


def test_replace_linear_that_fails_on_a_later_layer_leaves_the_model_as_it_came():
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 64),
                                torch.nn.MultiheadAttention(64, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e7)  # its scales overflow the float16 metadata
    with pytest.raises(ValueError, match=r"replace_linear: layer '2': .*overflow.*\(the model is unchanged\)"):
        replace_linear(model, 4, 32, meta_dtype=torch.float16, skip=None)
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.MultiheadAttention]


def test_fake_quant_input_static_zero_defaults_to_0_on_every_path():
    s, x = torch.tensor(0.05), torch.randn(4, 64)
    want = fake_quant_input(x, 8, True, False, s, torch.tensor(0.0))
    for xx in (x, x.clone().requires_grad_(), x.t().contiguous().t()):
        torch.testing.assert_close(fake_quant_input(xx, 8, True, False, s), want, rtol=0, atol=0)


def test_packed_linear_huge_x_on_zero_weights(config):
    """bf16 x of about 4e36 in one group on weights with q = z (exactly 0) and scales of 1e7: the
    group's unit of x times its scale overflows fp32 (~1e39) while every product the reference forms
    is finite (the group's are 0), and inf times the group's sum of 0 gave NaN. Groups of x above
    2^64 take the exact fp32 GEMV."""
    N, K, gs = 3, 256, 64
    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (N, K), generator=g).to(torch.uint8)
    q[:, :gs] = 8
    pw = PackedWeight.from_quantized(q, torch.full((N, K // gs), 1e7), torch.full((N, K // gs), 8.0), 4, gs)
    for amax in (1e18, 1e20, 1e30, 4e36):
        for M in (1, 3):
            x = torch.randn(M, K, generator=g)
            x[:, :gs] = amax * (1 + 0.1 * torch.rand(M, gs, generator=g))
            x = x.bfloat16()
            y = ops.packed_linear(x, pw)
            assert torch.isfinite(y).all(), (amax, M, y)
            check_accuracy(y, x, pw)
