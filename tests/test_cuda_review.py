"""GPU-only checks from a static review of csrc/cuda/*.cu (skipped without CUDA).

Each test names what it would catch on a GPU: zero-size inputs (a launch with a zero
grid fails with "invalid configuration argument"), inputs on a second GPU while another
is current (a missing device guard launches on the wrong device), a non-finite offset in
oscillation_update (the CUDA kernel must leave that channel alone, as it does for a bad
scale), and the argument checks the CUDA glue repeats (same bounds, same messages as the
CPU op). Inputs are built on the CPU from seeded generators; the CPU op is the oracle.
"""
import pytest
import torch

import quantkern  # noqa: F401  (loads the ops)

Q = torch.ops.quantkern

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA review tests need a GPU (torch.cuda.is_available() is False)")


def _to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


# ------------------------------------------------------------------ zero-size inputs, every op
def _empty_results(dev):
    """Every native op on zero-size inputs on `dev`: a dict name -> result tensor(s)."""
    f32 = dict(device=dev, dtype=torch.float32)
    out = {}
    x = torch.zeros(0, 4, **f32)
    s, b = torch.ones(4, **f32), torch.zeros(4, **f32)
    out["lsq"] = Q.fake_quant_lsq(x, s, b, -8, 7, 1, None, 1.0)
    out["lsq_bwd"] = Q.fake_quant_lsq_backward(x, x, s, b, -8, 7, 1, None, 1.0)
    meta, ema = torch.zeros(0, 4, device=dev, dtype=torch.int32), torch.zeros(0, 4, **f32)
    out["osc"] = Q.oscillation_update(x.clone(), s, b, meta, ema, -8, 7, 1, None, 0.01, 0.1)
    out["damp"] = Q.dampening_loss(x, s, b, -8, 7, 1, None, 1.0)
    out["damp_bwd"] = Q.dampening_loss_backward(torch.ones((), **f32), x, s, b, -8, 7, 1, None, 1.0)
    out["hqq"] = Q.hqq_quantize(torch.zeros(0, 64, **f32), 4, 64, 1, 0.7, 10.0, 1.01, 20, "global")
    for C, M in ((0, 5), (2, 0)):  # no channels; channels without values
        pos = torch.zeros(C, 16, device=dev, dtype=torch.long)
        neg = pos.clone()
        Q.calib_histogram(torch.zeros(C, M, **f32), pos, neg, torch.ones(C, **f32),
                          torch.full((C,), 16, device=dev, dtype=torch.long))
        out[f"hist{C}x{M}"] = (pos, neg)
    pos = torch.zeros(0, 16, device=dev, dtype=torch.long)
    out["search"] = Q.calib_search(pos, pos, torch.zeros(0, device=dev, dtype=torch.float64), pos[:, 0],
                                   "entropy", 8, False, True, 1, 4)
    K, bits, N = 40, 4, 3
    words = (K + 31) // 32 * bits
    out["pack"] = Q.pack(torch.zeros(0, K, device=dev, dtype=torch.uint8), bits)
    qw0 = torch.zeros(0, words, device=dev, dtype=torch.int32)
    s0, z0 = torch.ones(0, 1, **f32), torch.zeros(0, 1, **f32)
    out["unpack"] = Q.unpack(qw0, bits, K)
    out["deq"] = Q.dequantize(qw0, s0, z0, bits, K, K, None)
    qw = torch.zeros(N, words, device=dev, dtype=torch.int32)
    sN, zN = torch.ones(N, 1, **f32), torch.zeros(N, 1, **f32)
    out["linear_m0"] = Q.packed_linear(torch.zeros(0, K, **f32), qw, sN, zN, bits, K, K, None)
    out["linear_n0"] = Q.packed_linear(torch.zeros(3, K, **f32), qw0, s0, z0, bits, K, K, None)
    out["linear_bwd_m0"] = Q.packed_linear_backward(torch.zeros(0, N, **f32), qw, sN, zN, bits, K, K)
    out["linear_bwd_n0"] = Q.packed_linear_backward(torch.zeros(3, 0, **f32), qw0, s0, z0, bits, K, K)
    out["bias_bwd"] = Q.packed_linear_bias_backward(torch.zeros(0, 5, **f32))
    return out


def _flat(v):
    return list(v) if isinstance(v, (tuple, list)) else [v]


def _assert_same(got, want, exact=True):
    assert got.keys() == want.keys()
    for k in want:
        for g, w in zip(_flat(got[k]), _flat(want[k])):
            assert g.shape == w.shape and g.dtype == w.dtype, (k, g.shape, w.shape, g.dtype, w.dtype)
            if exact:
                assert torch.equal(g.cpu(), w), k
            else:
                torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4, msg=k)


def test_zero_size_inputs_every_op():
    got = _empty_results("cuda")
    torch.cuda.synchronize()  # a failed launch surfaces here at the latest
    _assert_same(got, _empty_results("cpu"))


# ------------------------------------------------------------------ a second GPU (device guards)
def _small_results(dev):
    """Every native op on small non-empty inputs (seeded, built on the CPU) on `dev`."""
    g = torch.Generator().manual_seed(0)
    out = {}
    x = torch.randn(6, 40, generator=g)
    s, b = torch.rand(40, generator=g) * 0.2 + 0.05, torch.randn(40, generator=g) * 0.05
    gr = torch.randn(6, 40, generator=g)
    xd, sd, bd, grd = _to(dev, x, s, b, gr)
    out["lsq"] = Q.fake_quant_lsq(xd, sd, bd, -8, 7, 1, None, 1.0)
    out["lsq_bwd"] = Q.fake_quant_lsq_backward(grd, xd, sd, bd, -8, 7, 1, None, 0.1)
    w = xd.clone()
    meta = torch.zeros(6, 40, dtype=torch.int32, device=dev)
    ema = torch.zeros(6, 40, device=dev)
    counts = Q.oscillation_update(w, sd, bd, meta, ema, -8, 7, 1, None, 0.3, 0.2)
    out["osc"] = (counts, w, meta, ema)
    out["damp"] = Q.dampening_loss(xd, sd, bd, -8, 7, 1, None, 0.5)
    out["damp_bwd"] = Q.dampening_loss_backward(torch.tensor(1.5, device=dev), xd, sd, bd, -8, 7, 1, None, 0.5)
    W = torch.randn(8, 128, generator=g) * 0.02
    out["hqq"] = Q.hqq_quantize(W.to(dev), 4, 64, 1, 0.7, 10.0, 1.01, 20, "global")
    R = x.abs().amax(1) * 1.1
    n = torch.full((6,), 64, dtype=torch.long)
    pos, neg = torch.zeros(6, 64, dtype=torch.long, device=dev), torch.zeros(6, 64, dtype=torch.long, device=dev)
    Q.calib_histogram(xd, pos, neg, R.to(dev), n.to(dev))
    out["hist"] = (pos, neg)
    out["search"] = Q.calib_search(pos, neg, (R / n).double().to(dev), n.to(dev), "mse", 8, False, True, 1, 8)
    K, bits, gs, N = 64, 4, 32, 24
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    qw = Q.pack(q.to(dev), bits)
    out["pack"] = qw
    out["unpack"] = Q.unpack(qw, bits, K)
    sc = (torch.rand(N, K // gs, generator=g) * 0.02 + 0.001).to(dev)
    zc = (torch.rand(N, K // gs, generator=g) * 16).to(dev)
    out["deq"] = Q.dequantize(qw, sc, zc, bits, gs, K, None)
    bias = torch.randn(N, generator=g).to(dev)
    for M in (1, 3, 9):  # the GEMV and the fp32 GEMM
        out[f"linear{M}"] = Q.packed_linear(torch.randn(M, K, generator=g).to(dev), qw, sc, zc, bits, gs, K, bias)
    gy = torch.randn(5, N, generator=g).to(dev)
    out["linear_bwd"] = Q.packed_linear_backward(gy, qw, sc, zc, bits, gs, K)
    out["bias_bwd"] = Q.packed_linear_bias_backward(gy)
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (a device guard test)")
def test_inputs_on_a_second_gpu_while_another_is_current():
    with torch.cuda.device(0):
        got = _small_results("cuda:1")
        for v in got.values():
            for t in _flat(v):
                assert t.device == torch.device("cuda:1")
    torch.cuda.synchronize(1)
    want = _small_results("cpu")
    exact = {"lsq", "osc", "hqq", "hist", "pack", "unpack", "deq"}  # elementwise or integer: the CPU's bits
    _assert_same({k: got[k] for k in exact}, {k: want[k] for k in exact})
    _assert_same({k: v for k, v in got.items() if k not in exact}, {k: v for k, v in want.items() if k not in exact},
                 exact=False)


def test_small_inputs_match_the_cpu_on_the_current_gpu():
    got = _small_results("cuda")
    want = _small_results("cpu")
    exact = {"lsq", "osc", "hqq", "hist", "pack", "unpack", "deq"}
    _assert_same({k: got[k] for k in exact}, {k: want[k] for k in exact})
    _assert_same({k: v for k, v in got.items() if k not in exact}, {k: v for k, v in want.items() if k not in exact},
                 exact=False)


# ------------------------------------------------------------------ oscillation_update: non-finite offset
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_oscillation_update_leaves_a_channel_with_a_non_finite_offset_alone(bad):
    # The CPU op raises on a NaN / inf offset; the CUDA kernel (no host sync) must skip that channel
    # as it skips a bad scale. It used to run it: a NaN offset gave q = NaN (meta got int(NaN), ema
    # NaN), an inf one moved q to qmin and rewrote frozen weights as inf.
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(8, 16, generator=g)
    s = torch.rand(8, generator=g) * 0.2 + 0.05
    b = torch.randn(8, generator=g) * 0.05
    meta = torch.zeros(8, 16, dtype=torch.int32)
    ema = torch.zeros(8, 16)
    w = w0.clone()
    Q.oscillation_update(w, s, b, meta, ema, -8, 7, 0, None, 1.0, 1e-6)  # EMA live, freezing on
    wg, mg, eg = w.cuda(), meta.cuda(), ema.cuda()
    b_bad = b.clone()
    b_bad[2] = bad
    Q.oscillation_update(wg, s.cuda(), b_bad.cuda(), mg, eg, -8, 7, 0, None, 0.5, 1e-6)
    assert torch.equal(wg[2].cpu(), w[2]) and torch.equal(mg[2].cpu(), meta[2]) and torch.equal(eg[2].cpu(), ema[2])
    # the other channels are updated as on the CPU
    Q.oscillation_update(w, s, b, meta, ema, -8, 7, 0, None, 0.5, 1e-6)
    rows = [r for r in range(8) if r != 2]
    assert torch.equal(wg[rows].cpu(), w[rows]) and torch.equal(mg[rows].cpu(), meta[rows])
    assert torch.equal(eg[rows].cpu(), ema[rows])


# ------------------------------------------------------------------ argument checks the CUDA glue repeats
@pytest.mark.parametrize("dev", ["cpu", "cuda"])
def test_calib_histogram_checks_n_even_without_values(dev):
    # The CUDA glue returned before checking n when x had no columns, and its message omitted 2^24.
    x = torch.zeros(2, 0, device=dev)
    pos = torch.zeros(2, 16, dtype=torch.long, device=dev)
    neg = pos.clone()
    R = torch.ones(2, device=dev)
    with pytest.raises(RuntimeError, match=r"n must be <= B = pos.shape\[1\] = 16 and <= 2\^24"):
        Q.calib_histogram(x, pos, neg, R, torch.full((2,), 17, dtype=torch.long, device=dev))
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        Q.calib_histogram(x, pos, neg, R, torch.full((2,), -1, dtype=torch.long, device=dev))
    with pytest.raises(RuntimeError, match=r"n must be <= B"):
        Q.calib_histogram(torch.ones(2, 3, device=dev), pos, neg, R, torch.full((2,), 17, dtype=torch.long, device=dev))


@pytest.mark.parametrize("dev", ["cpu", "cuda"])
def test_pack_checks_match_the_cpu(dev):
    with pytest.raises(RuntimeError, match=r"q must be 2-D \[N, K\], got shape"):
        Q.pack(torch.zeros(4, dtype=torch.uint8, device=dev), 4)
    with pytest.raises(RuntimeError, match="q must have an integer dtype"):
        Q.pack(torch.zeros(2, 0, device=dev), 4)
    with pytest.raises(RuntimeError, match=r"K \(q.shape\[1\]\) must be positive"):
        Q.pack(torch.zeros(2, 0, dtype=torch.uint8, device=dev), 4)
