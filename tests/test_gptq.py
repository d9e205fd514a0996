"""GPTQ: beats RTN on correlated inputs; exactness properties; argument errors."""
import pytest
import torch

from quantkern.ptq import HessianAccumulator, gptq_quantize
from quantkern.ptq._wquant import dequantize, minmax_params, rtn_minmax


def _problem(N=128, K=256, T=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(K, K, generator=g) / K**0.5 + 0.3 * torch.eye(K)
    X = (torch.randn(T, K, generator=g) @ M) * (torch.rand(K, generator=g) * 2 + 0.1)  # correlated, uneven scales
    W = torch.randn(N, K, generator=g) * 0.05
    return W, X


def _out_err(W, Wq, X):
    Y = X @ W.T
    return ((Y - X @ Wq.T).norm() / Y.norm()).item()


@pytest.fixture(scope="module")
def problem():
    W, X = _problem()
    acc = HessianAccumulator(W.shape[1])
    for xb in X.split(500):
        acc.add_batch(xb)
    return W, X, acc.H


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (4, None, False), (3, 64, False), (4, 64, True), (3, None, True)])
def test_gptq_beats_rtn(problem, bits, group_size, act_order):
    W, X, H = problem
    q, s, z = gptq_quantize(W, H, bits, group_size, act_order=act_order)
    rq, rs, rz = rtn_minmax(W, bits, group_size)
    e_gptq, e_rtn = _out_err(W, dequantize(q, s, z), X), _out_err(W, dequantize(rq, rs, rz), X)
    print(f"W{bits} g={group_size} act_order={act_order}: rtn {e_rtn:.4f} gptq {e_gptq:.4f}")
    assert e_gptq < 0.85 * e_rtn


def test_output_format(problem):
    W, X, H = problem
    for bits, gs in [(4, 128), (2, 32), (8, None)]:
        q, s, z = gptq_quantize(W.half(), H, bits, gs)
        G = 1 if gs is None else W.shape[1] // gs
        assert q.dtype == torch.uint8 and q.shape == W.shape and int(q.max()) <= 2**bits - 1
        assert s.dtype == z.dtype == torch.float32 and s.shape == z.shape == (W.shape[0], G)
        assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 2**bits - 1).all() and (s > 0).all()
    assert _out_err(W, dequantize(*gptq_quantize(W, H, 8, None)), X) < 0.01


def test_diagonal_hessian_is_rtn():
    """With a diagonal H no error is propagated: GPTQ == round-to-nearest exactly."""
    W, _ = _problem(N=32, K=96)
    H = torch.diag(torch.rand(96) + 0.5)
    for gs, sym in [(32, False), (None, False), (32, True)]:
        q, s, z = gptq_quantize(W, H, 4, gs, sym=sym, block_size=40)
        rq, rs, rz = rtn_minmax(W, 4, gs, sym=sym)
        assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)


def test_lazy_blocks_equal_unblocked(problem):
    """Lazy batch updates are exact: block_size 128 == block_size 1, also with groups that straddle blocks."""
    W, X, H = problem
    for gs, bs in ((32, 128), (64, 96), (256, 128)):  # (64, 96): groups straddle block ends
        a = gptq_quantize(W, H, 4, gs, block_size=bs)
        b = gptq_quantize(W, H, 4, gs, block_size=1)
        assert (a[0] != b[0]).float().mean() < 1e-3
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-6)


def test_official_group_params(problem):
    W, X, H = problem
    same = gptq_quantize(W, H, 4, 128, official_group_params=True)  # groups start at block starts: identical
    ours = gptq_quantize(W, H, 4, 128)
    assert all(torch.equal(u, v) for u, v in zip(same, ours))
    off = gptq_quantize(W, H, 4, 32, official_group_params=True)  # stale in-block weights: differs a little
    ours = gptq_quantize(W, H, 4, 32)
    e_off, e_ours = _out_err(W, dequantize(*off), X), _out_err(W, dequantize(*ours), X)
    e_rtn = _out_err(W, dequantize(*rtn_minmax(W, 4, 32)), X)
    assert max(e_off, e_ours) < 0.85 * e_rtn


def test_act_order_static_groups(problem):
    W, X, H = problem
    q, s, z = gptq_quantize(W, H, 4, 64, act_order=True)
    s0, z0 = minmax_params(W.reshape(W.shape[0], -1, 64), 4)
    assert torch.equal(s, s0) and torch.equal(z, z0)  # params from the original weights, contiguous groups
    q2, s2, z2 = gptq_quantize(W, H, 4, 64, static_groups=True)
    assert torch.equal(s2, s0)


def test_act_order_one_group_mse_clip_uses_the_permuted_diag(problem):
    """One group per row: act_order without static groups must pick the same group params as with
    them (the MSE search weights each column by its own diag(H), whatever the column order)."""
    W, _, H = problem
    a = gptq_quantize(W, H, 3, None, act_order=True, static_groups=True, clip="mse")
    b = gptq_quantize(W, H, 3, None, act_order=True, static_groups=False, clip="mse")
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[2], b[2])


def test_dead_columns_and_single_row():
    W, X = _problem(N=1, K=64, T=256)
    X[:, [3, 40]] = 0
    acc = HessianAccumulator(64)
    acc.add_batch(X)
    q, s, z = gptq_quantize(W, acc.H, 4, 16)
    Wq = dequantize(q, s, z)
    assert (Wq[:, [3, 40]] == 0).all()
    assert _out_err(W, Wq, X) < _out_err(W, dequantize(*rtn_minmax(W, 4, 16)), X)
    assert torch.isfinite(Wq).all()


def test_hessian_accumulator_streaming():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(4, 30, 16, generator=g)  # [B, S, K]
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add_batch(X[:1])
    acc.add_batch(X[1:])
    acc.add_batch(torch.empty(0, 16))
    flat = X.reshape(-1, 16).double()
    torch.testing.assert_close(acc.H, 2 * flat.T @ flat / flat.shape[0])
    assert acc.nsamples == 120
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        acc.add_batch(torch.ones(3, 15))
    with pytest.raises(ValueError, match="NaN"):
        acc.add_batch(torch.full((2, 16), float("nan")))


def test_bad_args(problem):
    W, X, H = problem
    with pytest.raises(ValueError, match="H must have shape"):
        gptq_quantize(W, H[:-1, :-1], 4, 128)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(W, H, 9, 128)
    with pytest.raises(ValueError, match="group_size 100 does not divide"):
        gptq_quantize(W, H, 4, 100)
    with pytest.raises(ValueError, match="g_idx"):
        gptq_quantize(W, H, 4, 64, act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="W must be 2-D"):
        gptq_quantize(W[0], H, 4, 128)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, H * float("nan"), 4, 128)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(W, H, 4, 128, damp=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, H, 4, 128, block_size=0)
    with pytest.raises(ValueError, match="sym=True needs bits >= 2"):  # its grid {-2 max|w|, 0} zeroed every weight
        gptq_quantize(W, H, 1, 128, sym=True)
    bad = torch.zeros(256, 256)
    bad[0, 0], bad[1, 1], bad[0, 1], bad[1, 0] = 1.0, 1.0, 2.0, 2.0  # indefinite
    with pytest.raises(RuntimeError, match="positive definite"):
        gptq_quantize(W, bad, 4, 128, damp=0.0)


@pytest.mark.parametrize("clip", ["minmax", "mse"])
@pytest.mark.parametrize("sym", [False, True])
def test_all_zero_group_decodes_to_zero(clip, sym):
    # pruned weights (and GPTQ's dead columns) stay exactly 0; the mse search put the float zero
    # of an all-zero group on a half step, so they decoded to +-scale / 2
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 64, generator=g) * 0.05
    W[:, :32] = 0
    X = torch.randn(256, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add_batch(X)
    Wq = dequantize(*gptq_quantize(W, acc.H, 4, 32, clip=clip, sym=sym))
    assert torch.equal(Wq[:, :32], torch.zeros(4, 32))


def test_bad_static_params_raise(problem):
    # params were silently replaced by min-max params with static_groups=False, and a zero / NaN
    # scale was used as given (w / 0: codes clamped to the ends, NaN errors propagated)
    W, X, H = problem
    s, z = minmax_params(W.reshape(W.shape[0], -1, 64), 4)
    q, s2, z2 = gptq_quantize(W, H, 4, 64, params=(s, z))
    assert torch.equal(s2, s) and torch.equal(z2, z)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(W, H, 4, 64, params=(s, z), static_groups=False)
    for bad in ((s * 0, z), (-s, z), (s, z * float("nan"))):
        with pytest.raises(ValueError, match="params"):
            gptq_quantize(W, H, 4, 64, params=bad)


@pytest.mark.parametrize("kw", [{"clip_max_shrink": 2.0}, {"clip_max_shrink": -0.1}, {"clip_grid": 0},
                                {"clip_grid": 2.5}, {"clip": "max"}])
def test_clip_arguments_are_checked(kw):
    from quantkern.ptq import erq_quantize, gptq_quantize

    W = torch.randn(8, 64)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        gptq_quantize(W, torch.eye(64), 2, 32, **{"clip": "mse", **kw})
    with pytest.raises(ValueError, match=name):
        erq_quantize(W, None, torch.randn(80, 64), 2, 32, **{"clip": "mse", **kw})


@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_sym_all_positive_group_keeps_its_range(clip):
    # symmetric params of a group with no negative weight used the range [0, max] with the zero
    # at 2^(b-1) (the official code's xmin = -xmax only where xmin < 0): every weight above
    # ~max / 2 was clamped (4-bit error up to half the group's max, 17x RTN-asymmetric's)
    g = torch.Generator().manual_seed(0)
    W = torch.rand(4, 32, generator=g) + 0.5  # every weight in [0.5, 1.5)
    q, s, z = rtn_minmax(W, 4, 8, sym=True)
    assert (dequantize(q, s, z) - W).abs().max() <= 1.5 * 2 / 15 / 2 + 1e-6  # half a step of [-max, max]
    assert torch.equal(z, torch.full_like(z, 8.0))
    q, s, z = gptq_quantize(W, torch.eye(32), 4, 8, sym=True, clip=clip)
    # min-max: at most half a step; the mse search may clip the top a little (it was 0.8 for both)
    assert (dequantize(q, s, z) - W).abs().max() <= (1.5 * 2 / 15 / 2 + 1e-6 if clip == "minmax" else 0.2)
    Wn = -W  # all-negative groups were already fine: unchanged
    assert torch.equal(minmax_params(Wn.reshape(4, 4, 8), 4, sym=True)[0], Wn.reshape(4, 4, 8).abs().amax(-1) * 2 / 15)


def test_non_symmetric_hessian_raises(problem):
    # Cholesky reads only one triangle of H: a non-symmetric H (e.g. X [K, K] passed for H) was
    # silently treated as the symmetric matrix of its lower triangle
    W, X, H = problem
    with pytest.raises(ValueError, match="H must be symmetric"):
        gptq_quantize(W, X[:256], 4, 128)
    H2 = H.clone()
    H2[0, 1] += 1.0
    with pytest.raises(ValueError, match="H must be symmetric"):
        gptq_quantize(W, H2, 4, 128)
    # rounding-level asymmetry (a float32 X^T X, a float16 H) is fine
    Xh = X[:300].half().float()
    gptq_quantize(W, (Xh.T @ Xh).half(), 4, 128)


@pytest.mark.parametrize("kw", [{"damp": True}, {"block_size": True}, {"damp": float("inf")}])
def test_bool_and_inf_args_raise(problem, kw):
    W, X, H = problem
    with pytest.raises(ValueError, match=next(iter(kw))):
        gptq_quantize(W, H, 4, 128, **kw)


@pytest.mark.parametrize("W", [torch.full((2, 8), 3e38).mul_(torch.tensor([1.0, -1.0]).repeat(4)),
                               torch.full((2, 8), 1e300, dtype=torch.float64)])
def test_weights_beyond_the_float32_range_raise(W):
    # the float32 group range (max - min) overflowed: scale inf, every dequantized weight NaN
    from quantkern.ptq import erq_quantize

    with pytest.raises(ValueError, match="below 2"):
        gptq_quantize(W, torch.eye(8), 4, 4)
    with pytest.raises(ValueError, match="below 2"):
        erq_quantize(W, None, torch.randn(16, 8), 4, 4)
    with pytest.raises(ValueError, match="below 2"):
        rtn_minmax(W, 4, 4)
    Wq = dequantize(*gptq_quantize(W * 1e-270 if W.dtype == torch.float64 else W / 3, torch.eye(8), 4, 4))
    assert torch.isfinite(Wq).all()


def test_hessian_accumulator_rejects_bool_in_features():
    with pytest.raises(ValueError, match="in_features"):
        HessianAccumulator(True)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_column_result_does_not_depend_on_the_scale_of_H(act_order):
    # the official H[j, j] = 1 for a dead input made the dampening (a fraction of mean(diag(H)))
    # depend on H's scale: with small inputs GPTQ drifted to round-to-nearest's error
    W, X = _problem(N=32, K=128, T=1024)
    X[:, 7] = 0
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    ref = gptq_quantize(W, H.float(), 4, 32, act_order=act_order)
    for c in (1e-3, 1e-6, 1e3):
        got = gptq_quantize(W, (H * c).float(), 4, 32, act_order=act_order)
        assert torch.equal(got[0], ref[0]), c
        torch.testing.assert_close(got[1], ref[1])
    Wq = dequantize(*ref)
    assert _out_err(W, Wq, X) < _out_err(W, dequantize(*rtn_minmax(W, 4, 32)), X)


@pytest.mark.filterwarnings("ignore:gptq_quantize. H is all zero")  # channel 2, on purpose
def test_depthwise_dead_column_result_does_not_depend_on_the_scale_of_H():
    from quantkern.ptq.conv import gptq_depthwise
    g = torch.Generator().manual_seed(3)
    C, k, T = 6, 9, 400
    X = torch.randn(C, T, k, generator=g) @ torch.randn(k, k, generator=g) * 1e-3
    X[:, :, 4] = 0
    X[2] = 0  # a channel with every input dead: its row quantizes to 0
    H = 2 * X.transpose(1, 2).double() @ X.double() / T
    W = torch.randn(C, k, generator=g)
    ref = gptq_depthwise(W, H, 4, None)
    got = gptq_depthwise(W, H * 1e6, 4, None)
    assert torch.equal(got[0], ref[0])
    assert (dequantize(*ref)[2] == 0).all()
    for c in range(C):  # and each row is gptq_quantize's with that row's H
        assert torch.equal(gptq_quantize(W[c:c + 1], H[c].float(), 4, None)[0], ref[0][c:c + 1])


def test_all_zero_hessian_warns():
    W = torch.randn(4, 32)
    with pytest.warns(UserWarning, match="H is all zero"):
        q, s, z = gptq_quantize(W, torch.zeros(32, 32), 4, 16)
    assert (dequantize(q, s, z) == 0).all()
