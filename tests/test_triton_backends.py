"""The Triton backends against backend="native", through the public ops and the modules that pass
a backend through: edge cases the per-op files do not reach, argument errors of the raw
``torch.ops.quantkern.*_triton`` ops, and torch.compile over public calls.

Runs the kernels on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), or on CUDA. Shapes are small: the interpreter
is slow.
"""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import quantkern  # noqa: E402
from quantkern import PackedWeight, ops  # noqa: E402

from _triton_dev import triton_device  # noqa: E402

DEV = triton_device()

import quantkern.triton_kernels  # noqa: E402,F401  (registers the *_triton kernels)

Q = torch.ops.quantkern
needs_cpu_native = pytest.mark.skipif(DEV != "cpu" or quantkern._load._C is None,
                                      reason="compares with the native CPU kernels on the same tensors")


# ------------------------------------------------------------------ dampening loss
@needs_cpu_native
def test_dampening_loss_on_a_grid_past_2_22_matches_native():
    # The kernel rounded with (v + 1.5 * 2^23) - 1.5 * 2^23, exact only for |v| < 2^22; the loss takes
    # any grid in [-2^24, 2^24]: v = 1e7 + 1 rounded to 1e7 + 2 (loss 2.5 and a gradient of 2 where
    # the native op gives 0.5 and 0).
    w0 = torch.tensor([5e6 + 0.5, 5e6 + 1.5, 1e7 + 1, -1.2e7 + 0.25, 3.0, 6e6 + 0.75, -(2.0**23) - 3, 2.0**24 - 1])
    s = torch.tensor([1.0])
    out = {}
    for be in ("native", "triton"):
        w = w0.clone().requires_grad_()
        L = ops.dampening_loss(w, s, None, -(2**24), 2**24, backend=be)
        L.backward()
        out[be] = (L.detach(), w.grad)
    assert torch.equal(out["triton"][0], out["native"][0]) and float(out["native"][0]) == 0.5
    assert torch.equal(out["triton"][1], out["native"][1])


# ------------------------------------------------------------------ oscillation update
@needs_cpu_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,axis,gs,qmin,qmax", [((5, 7), None, None, -8, 7), ((3, 5, 2), 1, None, -4, 3),
                                                      ((3, 96), None, 32, 0, 15), ((1, 33), 0, None, -128, 127),
                                                      ((1025,), None, None, -8, 7)])
def test_oscillation_steps_equal_native_bitwise(dtype, shape, axis, gs, qmin, qmax):
    # several steps with freezing: weights, state and counts bit for bit (1025 weights: some w / s round
    # to -0, whose sign the Triton kernel's rounding dropped, so its EMA state differed in that bit)
    res = {}
    for be in ("native", "triton"):
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(shape, generator=g) * 0.5).to(dtype)
        ss = (shape[0], shape[1] // gs) if gs else ((shape[axis],) if axis is not None else (1,))
        s, b = torch.rand(ss, generator=g) * 0.1 + 0.05, torch.randn(ss, generator=g) * 0.02
        meta, ema = ops.oscillation_init_state(w, s, b, qmin, qmax, axis=axis, group_size=gs)
        counts = []
        for _ in range(5):
            w.add_((torch.randn(shape, generator=g) * 0.05).to(dtype))
            counts.append(ops.oscillation_update(w, s, b, meta, ema, qmin, qmax, axis=axis, group_size=gs, momentum=0.3,
                                                 freeze_threshold=0.1, backend=be))
        res[be] = (w, meta, ema, torch.stack(counts))
    for a, t in zip(res["native"], res["triton"]):
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           t.view(torch.uint8) if t.is_floating_point() else t)


def test_oscillation_update_triton_errors_name_the_argument():
    # One combined message ("meta (int32) and ema (float32) must have the shape of weight") blamed the
    # shape of a meta of the wrong dtype; the contiguity message did not say which tensor.
    w = torch.randn(4, 6, device=DEV)
    s, b = torch.full((1,), 0.1, device=DEV), torch.zeros(1, device=DEV)
    meta, ema = torch.zeros(4, 6, dtype=torch.int32, device=DEV), torch.zeros(4, 6, device=DEV)
    cases = [
        ((w, s, b, meta.long(), ema), TypeError, "oscillation_update_triton: meta must have dtype"),
        ((w, s, b, meta, ema.double()), TypeError, "oscillation_update_triton: ema must have dtype"),
        ((w, s, b, meta.view(6, 4), ema), ValueError, r"meta shape \(6, 4\) must equal weight shape \(4, 6\)"),
        ((w, s, b, meta, ema[:, :3]), ValueError, r"ema shape \(4, 3\) must equal weight shape"),
        ((w, s, b, meta.t().contiguous().t(), ema), ValueError, "meta must be contiguous"),
        ((w.t().contiguous().t(), s, b, meta, ema), ValueError, "weight must be contiguous"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            Q.oscillation_update_triton(*args, -8, 7, None, None, 0.1, 0.5)
    with pytest.raises(ValueError, match="oscillation_update_triton: the state keeps the integer in int8"):
        Q.oscillation_update_triton(w, s, b, meta, ema, -8, 128, None, None, 0.1, 0.5)


# ------------------------------------------------------------------ calibration histogram
@needs_cpu_native
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: a * n overflows
def test_calib_histogram_finite_values_far_past_R_land_in_the_last_bin():
    # |x| * n / R overflowing fp32 (R tiny, or |x| huge) was reported as "x contains NaN or infinity";
    # the native kernels redo the quotient scaled by 2^-64 and clamp it to the last bin.
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(3, 301, generator=g), torch.full((3,), 1e-38)),
             (torch.tensor([[3e38, -3.4e38, 1e30, -1e-30, 0.0, 1e35, -2e35, 1e-45]]), torch.tensor([1e-45])),
             (torch.tensor([[3e38, -3.4e38, 1e30, -1e-30, 0.0, 1e35, -2e35]]), torch.tensor([1.0]))]
    for x, R_ in cases:
        for dtype in (torch.float32, torch.bfloat16):
            xx = x.to(dtype)
            if not torch.isfinite(xx).all():
                continue
            n = torch.full((x.shape[0],), 1 << 16)
            hist = {}
            for be in ("native", "triton"):
                pos = torch.zeros(x.shape[0], 1 << 16, dtype=torch.long)
                neg = torch.zeros_like(pos)
                ops.calib_histogram(xx, pos, neg, R_, n, backend=be)
                hist[be] = (pos, neg)
            assert all(torch.equal(a, t) for a, t in zip(hist["native"], hist["triton"])), (x, R_, dtype)
    with pytest.raises(ValueError, match="NaN or infinity"):  # still refused: a real infinity
        ops.calib_histogram(torch.tensor([[1.0, float("inf")]], device=DEV), torch.zeros(1, 4, dtype=torch.long, device=DEV),
                            torch.zeros(1, 4, dtype=torch.long, device=DEV), torch.tensor([1e-30], device=DEV),
                            torch.tensor([4], device=DEV), backend="triton")


# ------------------------------------------------------------------ packed weights
def test_packed_linear_triton_checks_devices():
    # a CUDA x with a CPU bias dispatches to the Triton op, whose launch failed deep inside Triton;
    # the function is called directly here (a meta tensor would dispatch to the fake kernel)
    from quantkern.triton_kernels.packed_linear import packed_linear_triton

    pw = PackedWeight.from_float(torch.randn(8, 64), 4, 32, torch.float16).to(DEV)
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ValueError, match="packed_linear_triton: bias is on meta but x is on"):
        packed_linear_triton(x, pw.qweight, pw.scales, pw.zeros, 4, 32, 64, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="packed_linear_triton: x is on meta but qweight is on"):
        packed_linear_triton(x.to("meta"), pw.qweight, pw.scales, pw.zeros, 4, 32, 64, None)


# ------------------------------------------------------------------ modules passing a backend
@needs_cpu_native
def test_qat_step_through_modules_equals_native():
    # QuantConv2d / QuantLinear (per-channel weights, per-tensor inputs), OscillationTracker and
    # DampeningLoss with backend="triton": the same losses, counts and weights as native (the LSQ
    # backward sums per channel in another order: float tolerance)
    from quantkern.nn import QuantConv2d, QuantLinear
    from quantkern.qat import DampeningLoss, OscillationTracker

    def run(be):
        torch.manual_seed(0)
        m = nn.Sequential(QuantConv2d(3, 4, 3, w_bits=3, a_bits=4, backend=be), nn.Flatten(),
                          QuantLinear(4 * 4 * 4, 5, w_bits=3, a_bits=4, backend=be))
        tr = OscillationTracker(m, momentum=0.2, freeze_threshold=0.02, backend=be)
        dl = DampeningLoss(m, weighting=0.1, backend=be)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 5)
        out = []
        for _ in range(3):
            loss = ((m(x) - y) ** 2).mean() + dl()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out += [loss.detach(), *tr.step().values()]
        return out + [p.detach() for p in m.parameters()]

    for a, t in zip(run("native"), run("triton")):
        torch.testing.assert_close(t, a, rtol=1e-5, atol=1e-6)


@needs_cpu_native
def test_ptq_hqq_and_rtn_pass_the_backend():
    from quantkern.ptq import hqq_quantize, rtn_quantize

    W = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    for f in (lambda be: hqq_quantize(W, 3, 32, iters=4, backend=be), lambda be: rtn_quantize(W, 4, None, backend=be),
              lambda be: hqq_quantize(W.t(), 2, 5, axis=0, iters=3, early_stop="group", backend=be)):
        for a, t in zip(f("native"), f("triton")):
            assert torch.equal(a, t)


# ------------------------------------------------------------------ torch.compile over public calls
def test_compile_fullgraph_public_calls():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    # LSQ training step (forward and backward graphs)
    x = torch.randn(16, 24, generator=g).to(DEV).requires_grad_()
    s = (torch.rand(16, generator=g) * 0.1 + 0.05).to(DEV).requires_grad_()

    def loss_fn(x, s):
        y = ops.fake_quant_lsq(x, s, None, -8, 7, axis=0, grad_scale=0.1, backend="triton")
        return (y * y).sum()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        x.grad = s.grad = None
        fn(x, s).backward()
        grads.append((x.grad.clone(), s.grad.clone()))
    for a, c in zip(*grads):
        torch.testing.assert_close(c, a)
    # packed_linear with bias (and its backward), dequantize
    pw = PackedWeight.from_float(torch.randn(12, 64, generator=g), 3, 32, torch.float16).to(DEV)
    bias = torch.randn(12, generator=g).to(DEV)
    xl = torch.randn(3, 64, generator=g).to(DEV).requires_grad_()
    f = torch.compile(lambda t: ops.packed_linear(t, pw, bias, backend="triton"), fullgraph=True, backend="aot_eager")
    y = f(xl)
    assert torch.equal(y, ops.packed_linear(xl, pw, bias, backend="triton"))
    y.sum().backward()
    torch.testing.assert_close(xl.grad, torch.ones(3, 12, device=DEV) @ pw.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    d = torch.compile(lambda: ops.dequantize(pw, torch.float32, backend="triton"), fullgraph=True, backend="aot_eager")()
    assert torch.equal(d, pw.dequantize(torch.float32, backend="triton"))
    # the in-place oscillation update
    w = torch.randn(4, 8, generator=g).to(DEV)
    sc = torch.full((4,), 0.1, device=DEV)
    st = ops.oscillation_init_state(w, sc, None, -4, 3, axis=0)
    w2, st2 = w.clone(), tuple(t.clone() for t in st)
    step = torch.compile(lambda w, m, e: ops.oscillation_update(w, sc, None, m, e, -4, 3, axis=0, momentum=0.5,
                                                                freeze_threshold=0.1, backend="triton"),
                         fullgraph=True, backend="aot_eager")
    for _ in range(3):
        w.add_(0.06)
        w2.add_(0.06)
        c1 = step(w, *st)
        c2 = ops.oscillation_update(w2, sc, None, *st2, -4, 3, axis=0, momentum=0.5, freeze_threshold=0.1, backend="triton")
        assert torch.equal(c1, c2)
    assert torch.equal(w, w2) and all(torch.equal(a, b) for a, b in zip(st, st2))
