"""quantkern.nn: LSQQuantizer, QuantLinear, QuantConv2d, quantize_modules."""
import copy
import io
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkern
from quantkern import reference
from quantkern.nn import LSQQuantizer, QuantConv2d, QuantLinear, quantize_modules, qrange


def _err(q, x):
    with torch.no_grad():
        return (q(x).float() - x.float()).square().sum().item()


def _ref(q, x):
    """The quantizer's output recomputed with the pure-PyTorch reference."""
    s = q.scale.detach().abs().clamp_min(q.eps)
    b = q.offset.detach() if q.offset is not None else torch.zeros_like(s)
    xv, axis, gs = x, None, None
    if q.granularity == "channel":
        axis = q.axis % x.dim()
    elif q.granularity == "group":
        xv, gs = x.reshape(x.shape[0], -1), q.group_size
    return reference.fake_quant_lsq(xv, s, b, q.qmin, q.qmax, axis, gs).reshape(x.shape)


# ------------------------------------------------------------------ init formulas
def test_qrange():
    assert qrange(4, True) == (-8, 7)
    assert qrange(4, False) == (0, 15)
    assert qrange(2, True) == (-2, 1)
    assert qrange(8, False) == (0, 255)


def test_init_lsq_hand_computed():
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, 0.5]])
    q = LSQQuantizer(4, True, "tensor", learn_offset=False, init="lsq")
    q.initialize(x)
    assert q.scale.item() == pytest.approx(2 * (12.0 / 8) / math.sqrt(7), rel=1e-6)
    assert q.offset is None
    qc = LSQQuantizer(3, False, "channel", init="lsq", axis=0)
    qc.initialize(x)
    assert qc.scale.tolist() == pytest.approx([2 * 2.5 / math.sqrt(7), 2 * 0.5 / math.sqrt(7)], rel=1e-6)
    assert qc.offset.tolist() == [0.0, 0.0]
    # channel on the last axis: statistics per column
    qa = LSQQuantizer(4, True, "channel", init="lsq", axis=-1)
    qa.initialize(x)
    assert qa.scale.tolist() == pytest.approx([2 * m / math.sqrt(7) for m in (0.75, 1.25, 1.75, 2.25)], rel=1e-6)


def _lsqplus(vals, bits):
    mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
    return max(abs(mu - 3 * sd), abs(mu + 3 * sd)) / 2 ** (bits - 1)


def test_init_lsqplus_hand_computed():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, generator=g) + torch.tensor([[0.5], [-1.0], [0.0]])
    rows = w.tolist()
    qt = LSQQuantizer(4, True, "tensor", learn_offset=False, init="lsq+")
    qt.initialize(w)
    assert qt.scale.item() == pytest.approx(_lsqplus(sum(rows, []), 4), rel=1e-5)
    qc = LSQQuantizer(3, True, "channel", init="lsq+")
    qc.initialize(w)
    assert qc.scale.tolist() == pytest.approx([_lsqplus(r, 3) for r in rows], rel=1e-5)
    assert qc.offset.abs().sum().item() == 0
    qg = LSQQuantizer(4, True, "group", learn_offset=False, init="lsq+", group_size=4)
    qg.initialize(w)
    assert qg.scale.shape == (3, 2)
    want = [[_lsqplus(r[:4], 4), _lsqplus(r[4:], 4)] for r in rows]
    assert qg.scale.tolist() == [pytest.approx(v, rel=1e-5) for v in want]
    # an unsigned grid has twice the positive levels: half the signed scale (it was the signed one)
    qu = LSQQuantizer(4, False, "tensor", learn_offset=False, init="lsq+")
    qu.initialize(w)
    assert qu.scale.item() == pytest.approx(_lsqplus(sum(rows, []), 4) / 2, rel=1e-5)


def test_init_from_a_meta_tensor_names_the_problem():
    from quantkern.nn import quantize_modules
    with torch.device("meta"):
        lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="meta device"):
        LSQQuantizer(4, True).initialize(torch.empty(2, 3, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        quantize_modules(nn.Sequential(lin), w_bits=4)


def test_init_minmax_hand_computed():
    x = torch.tensor([[-1.0, 0.0, 3.0], [0.5, 1.0, 2.0]])
    # offset learnt: grid covers [min, max] exactly
    q = LSQQuantizer(4, False, "channel", init="minmax")
    q.initialize(x)
    assert q.scale.tolist() == pytest.approx([4 / 15, 1.5 / 15])
    assert q.offset.tolist() == pytest.approx([-1.0, 0.5])
    # no offset, signed: smallest s with s*qmin <= min and s*qmax >= max
    q = LSQQuantizer(4, True, "channel", learn_offset=False, init="minmax")
    q.initialize(x)
    assert q.scale.tolist() == pytest.approx([3 / 7, 2 / 7])
    q = LSQQuantizer(4, True, "tensor", learn_offset=False, init="minmax")
    q.initialize(torch.tensor([-8.0, 1.0]))
    assert q.scale.item() == pytest.approx(1.0)


def _brute_force_mse(row, qmin, qmax, n=2000):
    """Dense 1-D search of s (offset 0) for one row, the slow obvious way."""
    amax = max(row.max().item() / qmax, row.min().item() / qmin if qmin < 0 else 0.0)
    best = math.inf
    for k in range(1, n + 1):
        s = amax * k / n
        xh = torch.round(torch.clamp(row / s, qmin, qmax)) * s
        best = min(best, (xh - row).square().sum().item())
    return best


def test_init_mse_per_channel_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 200, generator=g)
    x[0, 3] = 8.0  # an outlier: clipping it pays off at 3 bits
    x[2] *= 0.01
    q = LSQQuantizer(3, True, "channel", learn_offset=False, init="mse")
    q.initialize(x)
    xh = q(x).detach()
    for c in range(4):
        got = (xh[c] - x[c]).square().sum().item()
        want = _brute_force_mse(x[c], q.qmin, q.qmax, n=400)
        assert got <= want * 1.01 + 1e-12, (c, got, want)


@pytest.mark.parametrize("gran,kw", [("tensor", {}), ("channel", {"axis": 0}), ("group", {"group_size": 64})])
@pytest.mark.parametrize("learn_offset", [False, True])
def test_init_mse_beats_minmax(gran, kw, learn_offset):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 256, generator=g) ** 3  # heavy tails
    errs = {}
    for init in ("mse", "minmax"):
        q = LSQQuantizer(4, True, gran, learn_offset=learn_offset, init=init, **kw)
        errs[init] = _err(q, x)
    assert errs["mse"] < 0.97 * errs["minmax"], errs  # per tensor the gain is 40-80 %


def test_init_mse_unsigned_learns_negative_offset():
    # swish-like activations (min about -0.28): an unsigned grid needs a negative beta
    g = torch.Generator().manual_seed(3)
    x = F.silu(torch.randn(256, 32, generator=g) * 2)
    q = LSQQuantizer(4, False, "tensor", learn_offset=True, init="mse")
    q.initialize(x)
    assert q.offset.item() < -0.05
    q0 = LSQQuantizer(4, False, "tensor", learn_offset=False, init="mse")
    assert _err(q, x) < _err(q0, x)


def test_init_mse_subsample_keeps_tails():
    # large input: the search runs on a subsample plus the extreme values of each row
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8192, generator=g)
    x[5, 77] = 30.0
    sub = LSQQuantizer(8, True, "channel", learn_offset=False, init="mse")
    full = LSQQuantizer(8, True, "channel", learn_offset=False, init="mse")
    full.mse_max_elems = 1 << 30
    assert _err(sub, x) <= 1.02 * _err(full, x)


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "gran,shape,kw",
    [
        ("tensor", (3, 5, 7), {}),
        ("channel", (6, 10), {"axis": 0}),
        ("channel", (2, 5, 9), {"axis": -1}),
        ("group", (6, 32), {"group_size": 8}),
        ("group", (4, 2, 3, 4), {"group_size": 12}),  # conv weight [O, I, kh, kw]
    ],
)
def test_forward_matches_reference(dtype, gran, shape, kw):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).to(dtype)
    q = LSQQuantizer(4, True, gran, init="lsq", **kw)
    y = q(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert q.scale.dtype == torch.float32
    torch.testing.assert_close(y, _ref(q, x), rtol=0, atol=0)
    # the integer grid: at most 2^bits distinct levels per scale
    if gran == "tensor":
        assert torch.unique(y).numel() <= 16


def test_scale_through_zero_stays_finite():
    q = LSQQuantizer(4, True, "channel", init="lsq")
    x = torch.randn(3, 8)
    q(x)
    with torch.no_grad():
        q.scale[0] = -q.scale[0]
        q.scale[1] = 0.0
    y = q(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], _ref(q, x)[0])


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("gran,kw", [("tensor", {}), ("channel", {"axis": 0}), ("group", {"group_size": 4})])
def test_gradients_match_reference(gran, kw):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 8, generator=g) * 2).requires_grad_()
    q = LSQQuantizer(3, True, gran, init="minmax", **kw)
    q.initialize(x)
    with torch.no_grad():
        q.scale.mul_(0.6)  # make some values clip
        q.offset.add_(0.1)
    y = q(x)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    n_per_scale = x.numel() // q.scale.numel()
    gscale = 1 / math.sqrt(n_per_scale * q.qmax)
    axis = 0 if gran == "channel" else None
    gs = kw.get("group_size")
    gx, gsc, gb = reference.fake_quant_lsq_backward(
        gy, x.detach(), q.scale.detach(), q.offset.detach(), q.qmin, q.qmax, axis, gs, gscale
    )
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(q.scale.grad, gsc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.offset.grad, gb, rtol=1e-5, atol=1e-6)
    assert q.scale.grad.abs().sum() > 0 and q.offset.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_gradients_reach_everything(dtype):
    torch.manual_seed(7)
    m = QuantLinear.from_float(nn.Linear(16, 8).to(dtype), w_bits=4, a_bits=8)
    x = torch.randn(4, 16, dtype=dtype)
    y = m(x)
    assert y.shape == (4, 8) and y.dtype == dtype
    y.float().square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert m.weight_quantizer.scale.dtype == torch.float32


def test_module_dtype_cast_keeps_quantizer_params_fp32():
    m = QuantLinear(8, 4).bfloat16()
    assert m.weight.dtype == torch.bfloat16 and m.weight_quantizer.scale.dtype == torch.float32
    assert m(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    q = LSQQuantizer(4, True, "channel").half()  # uninitialised: stays lazy and fp32
    assert q(torch.randn(3, 4)).dtype == torch.float32 and q.scale.dtype == torch.float32


# ------------------------------------------------------------------ training
def _train(model, x, y, steps, lr, loss_fn):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_quant_linear_reduces_loss():
    torch.manual_seed(8)
    x = torch.randn(128, 12)
    y = (x @ torch.randn(12, 1)).tanh() + 0.1 * x[:, :1] ** 2
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 1))
    quantize_modules(model, w_bits=4, a_bits=8)
    losses = _train(model, x, y, 60, 1e-2, F.mse_loss)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_training_quant_conv_reduces_loss():
    torch.manual_seed(9)
    x = torch.randn(32, 1, 8, 8)
    y = (x[:, 0, :4, :4].mean((1, 2)) > x[:, 0, 4:, 4:].mean((1, 2))).long()
    model = nn.Sequential(
        QuantConv2d(1, 8, 3, padding=1, w_bits=4, a_bits=8),
        nn.ReLU(),
        QuantConv2d(8, 8, 3, stride=2, w_bits=4, a_bits=4, act_signed=False),
        nn.ReLU(),
        nn.Flatten(),
        QuantLinear(8 * 3 * 3, 2, w_bits=4, a_bits=8, act_signed=False),
    )
    opt_params_before = [p for p in model.parameters()]  # an optimiser may be built before the first forward
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in opt_params_before)
    losses = _train(model, x, y, 40, 1e-2, F.cross_entropy)
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert [p for p in model.parameters()] == opt_params_before  # init updated them in place


# ------------------------------------------------------------------ state dict
def test_state_dict_round_trip_after_init():
    torch.manual_seed(10)
    model = quantize_modules(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 3, 6, act_signed=False)
    x = torch.randn(10, 8)
    y = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["0.input_quantizer.initialized"].item() is True
    fresh = quantize_modules(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 3, 6, act_signed=False)
    fresh.load_state_dict(sd)
    # loaded quantizers are not re-initialised by a different first batch
    fresh(torch.randn(3, 8) * 100)
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def test_lazy_quantizer_first_forward_under_inference_mode_then_train():
    q = LSQQuantizer(8, True, "channel", axis=-1)
    with torch.inference_mode():
        q(torch.randn(4, 16))
    assert not q.scale.is_inference() and q._initialized
    q(torch.randn(4, 16, requires_grad=True)).sum().backward()
    assert q.scale.grad.shape == (16,)


def test_reset_reinitialises():
    torch.manual_seed(0)
    q = LSQQuantizer(8, True, "tensor", init="minmax")
    x = torch.randn(64)
    q(x)
    s1 = q.scale.detach().clone()
    q(10 * x)
    assert torch.equal(q.scale.detach(), s1)  # initialised once
    q.reset()
    assert not bool(q.initialized)
    q(10 * x)
    torch.testing.assert_close(q.scale.detach(), 10 * s1)


def test_state_dict_lazy_quantizer_before_and_after_init():
    q = LSQQuantizer(4, True, "channel", init="lsq+")
    sd = q.state_dict()
    assert set(sd) == {"initialized"} and not sd["initialized"]
    q2 = LSQQuantizer(4, True, "channel", init="lsq+")
    q2.load_state_dict(sd)  # both uninitialised: fine
    assert "initialized=False" in repr(q2)
    x = torch.randn(5, 7)
    q(x)
    q3 = LSQQuantizer(4, True, "channel", init="lsq+")
    q3.load_state_dict(q.state_dict())  # materialises the shapes from the state dict
    assert q3.scale.shape == (5,) and q3._initialized
    torch.testing.assert_close(q3(x), q(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        q3.load_state_dict({"scale": torch.ones(3), "offset": torch.zeros(3), "initialized": torch.tensor(True)})


def test_state_dict_of_uninitialised_lazy_quantizer_loads_into_initialised_one():
    # A checkpoint taken before the first forward (e.g. a model's initial state) has no scale /
    # offset for a lazy quantizer; restoring it into the same, since trained, model raised
    # "Missing key(s): scale, offset". It must load and mark the quantizer uninitialised.
    fresh = QuantLinear(6, 3, a_granularity="channel")
    sd = copy.deepcopy(fresh.state_dict())
    assert "input_quantizer.scale" not in sd
    x = torch.randn(4, 6)
    fresh(x)
    assert fresh.input_quantizer._initialized
    fresh.load_state_dict(sd)
    assert not fresh.input_quantizer._initialized and not fresh.input_quantizer.initialized
    fresh(3 * x)  # re-initialised from the new data
    want = LSQQuantizer(8, True, "channel", axis=-1)  # the layer's input quantizer, fresh
    want.initialize(3 * x)
    assert fresh.input_quantizer._initialized
    torch.testing.assert_close(fresh.input_quantizer.scale, want.scale, rtol=0, atol=0)
    torch.testing.assert_close(fresh.input_quantizer.offset, want.offset, rtol=0, atol=0)
    # a checkpoint that claims to be initialised but lacks the values still fails
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.input_quantizer.load_state_dict({"initialized": torch.tensor(True)})


# ------------------------------------------------------------------ torch.compile
def test_compile_fullgraph_training_step_matches_eager():
    torch.manual_seed(11)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = quantize_modules(base, w_bits=4, a_bits=8)
    model[2].input_quantizer = LSQQuantizer(8, False, "tensor", init="mse")  # post-ReLU: unsigned
    x, y = torch.randn(24, 16), torch.randint(0, 4, (24,))
    model(x)  # data-dependent init runs eagerly, before compiling
    eager = copy.deepcopy(model)

    def step(m, x, y, lr=0.05):
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        with torch.no_grad():
            for p in m.parameters():
                p.sub_(lr * p.grad)
                p.grad = None
        return loss.detach()

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            compiled = torch.compile(step, fullgraph=True)
            for _ in range(3):
                lc = compiled(model, x, y)
                le = step(eager, x, y)
                torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    for (n, pc), pe in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------ modules
def test_from_float_copies_and_matches_float_at_8_bits():
    torch.manual_seed(12)
    lin = nn.Linear(32, 16)
    ql = QuantLinear.from_float(lin, w_bits=8, a_bits=None)
    assert ql.input_quantizer is None
    assert torch.equal(ql.weight, lin.weight) and torch.equal(ql.bias, lin.bias)
    assert ql.weight_quantizer._initialized and ql.weight_quantizer.scale.shape == (16,)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ql(x), lin(x), rtol=0.05, atol=0.05)

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False, padding_mode="reflect")
    qc = QuantConv2d.from_float(conv, w_bits=8, a_bits=8, w_granularity="group", w_group_size=6)
    assert qc.bias is None and qc.padding_mode == "reflect" and qc.groups == 2
    assert qc.weight_quantizer.scale.shape == (6, 3)
    xi = torch.randn(2, 4, 9, 9)
    assert qc(xi).shape == conv(xi).shape
    torch.testing.assert_close(qc(xi), conv(xi), rtol=0.1, atol=0.1)
    qcc = QuantConv2d.from_float(conv, a_bits=8, a_granularity="channel")
    assert qcc(xi[0]).shape == conv(xi[0]).shape  # unbatched input
    assert qcc.input_quantizer.scale.shape == (4,)


def test_quantize_modules_swaps_skips_and_keeps_sharing():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Flatten(1), nn.Sequential(nn.Linear(8, 8), shared, shared),
        nn.MultiheadAttention(8, 2),
    )
    model.head = nn.Linear(8, 2)
    quantize_modules(model, w_bits=4, a_bits=None, skip=("head",))
    assert isinstance(model[0], QuantConv2d)
    assert isinstance(model[2][0], QuantLinear) and isinstance(model[2][1], QuantLinear)
    assert model[2][1] is model[2][2]
    assert type(model.head) is nn.Linear
    # torch's attention (which reads its fused weights directly) became quantkern's, projections quantized
    assert isinstance(model[3].out_proj, QuantLinear) and isinstance(model[3].q_proj, QuantLinear)
    root = quantize_modules(nn.Linear(4, 4), 4, 8)
    assert isinstance(root, QuantLinear)
    with pytest.raises(ValueError, match="skip names not found.*'hed'"):
        quantize_modules(nn.Sequential(nn.Linear(2, 2)), 4, 8, skip=["hed"])


def test_extra_repr():
    r = repr(LSQQuantizer(3, False, "group", group_size=32))
    assert "bits=3" in r and "granularity='group'" in r and "group_size=32" in r
    r = repr(QuantLinear(4, 4, w_bits=3, a_bits=5))
    assert "w_bits=3" in r and "a_bits=5" in r and "granularity='channel'" in r


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bits=1, signed=True), ValueError, "bits must be an int in 2..8"),
        (dict(bits=9, signed=True), ValueError, "bits must be an int in 2..8"),
        (dict(bits=4.0, signed=True), ValueError, "bits"),
        (dict(bits=4, signed="yes"), TypeError, "signed"),
        (dict(bits=4, signed=True, granularity="row"), ValueError, "granularity must be one of"),
        (dict(bits=4, signed=True, init="kl"), ValueError, "init must be one of"),
        (dict(bits=4, signed=True, granularity="group"), ValueError, "needs group_size"),
        (dict(bits=4, signed=True, granularity="group", group_size=0), ValueError, "group_size must be a positive int"),
        (dict(bits=4, signed=True, granularity="group", group_size=8, axis=1), ValueError, "axis must be 0"),
        (dict(bits=4, signed=True, granularity="channel", group_size=8), ValueError, "group_size is only used"),
        (dict(bits=4, signed=True, backend="cuda"), ValueError, "backend must be one of"),
        (dict(bits=4, signed=True, grad_scale=-1.0), ValueError, "grad_scale"),
        # accepted here before, and only refused by the op on the first forward
        (dict(bits=4, signed=True, grad_scale=float("inf")), ValueError, "grad_scale must be a finite"),
        (dict(bits=4, signed=True, grad_scale=True), ValueError, "grad_scale must be a finite"),
    ],
)
def test_quantizer_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LSQQuantizer(**kwargs)


@pytest.mark.parametrize("cls,args", [(QuantLinear, (8, 4)), (QuantConv2d, (3, 4, 3))], ids=["linear", "conv"])
@pytest.mark.parametrize("kw", [{}, {"w_granularity": "tensor"}, {"a_granularity": "channel"}],
                         ids=["default", "w_tensor", "a_channel"])
def test_quant_layer_builds_its_quantizers_on_its_device(cls, args, kw):
    # device=... (and from_float of a layer on that device) must put the quantizers' scale,
    # offset and buffers there too: a per-tensor scale used to stay on the CPU (a device
    # mismatch in the first forward of a CUDA layer), and a lazy one could not be
    # materialised on "meta" (the constructor raised).
    m = cls(*args, device="meta", **kw)
    where = {n: t.device.type for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    assert set(where.values()) == {"meta"}, where


def test_bad_inputs_and_module_arguments():
    with pytest.raises(ValueError, match="group_size 8 does not divide the row length 12"):
        LSQQuantizer(4, True, "group", group_size=8)(torch.randn(2, 12))
    with pytest.raises(ValueError, match="axis 2 out of range"):
        LSQQuantizer(4, True, "channel", axis=2)(torch.randn(2, 12))
    q = LSQQuantizer(4, True)  # an empty batch initialises nothing (see test_empty_batch_waits_for_the_init)
    assert q(torch.randn(0, 3)).shape == (0, 3) and not q._initialized
    with pytest.raises(TypeError, match="floating-point"):
        LSQQuantizer(4, True)(torch.ones(3, dtype=torch.int32))
    q = LSQQuantizer(4, True, "channel")
    q(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"LSQQuantizer: scale has shape \(3,\).*needs \(5,\)"):
        q(torch.randn(5, 4))
    with pytest.raises(ValueError, match="w_bits must be an int in 2..8"):
        QuantLinear(4, 4, w_bits=1)
    with pytest.raises(ValueError, match="a_bits must be an int in 2..8 or None"):
        QuantLinear(4, 4, a_bits=16)
    with pytest.raises(ValueError, match="w_granularity='group' needs w_group_size"):
        QuantConv2d(4, 4, 3, w_granularity="group")
    with pytest.raises(ValueError, match="a_granularity must be one of"):
        QuantLinear(4, 4, a_granularity="group")
    with pytest.raises(ValueError, match="only used with w_granularity='group'"):
        QuantLinear(4, 4, w_group_size=2)
    with pytest.raises(ValueError, match=r"QuantLinear: weight quantizer \(w_\* arguments\): w_group_size 5 does not "
                                         r"divide the row length 4 of the weight of shape \(4, 4\)"):
        QuantLinear(4, 4, w_granularity="group", w_group_size=5)
    for kw, exc, match in ((dict(w_granularity="group", w_group_size=0), ValueError, "w_group_size must be a positive"),
                           (dict(act_signed="false"), TypeError, "act_signed must be a bool"),
                           (dict(w_learn_offset=1), TypeError, "w_learn_offset must be a bool"),
                           (dict(a_learn_offset=None), TypeError, "a_learn_offset must be a bool"),
                           (dict(backend="cuda"), ValueError, "QuantLinear: backend must be one of")):
        with pytest.raises(exc, match=match):  # the layer's own argument, not LSQQuantizer's
            QuantLinear(4, 4, **kw)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        QuantConv2d.from_float(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_modules("model", 4, 8)
    assert quantkern.nn.LSQQuantizer is LSQQuantizer


def test_state_dict_loaded_under_inference_mode_stays_trainable():
    # loading materialised the lazy scale/offset as inference tensors: training afterwards failed
    q = LSQQuantizer(4, True, granularity="channel")
    q(torch.randn(3, 8))
    q2 = LSQQuantizer(4, True, granularity="channel")
    with torch.inference_mode():
        q2.load_state_dict(q.state_dict())
    assert not q2.scale.is_inference()
    q2(torch.randn(3, 8)).sum().backward()
    assert q2.scale.grad is not None


def test_quantize_modules_failure_names_the_layer_and_leaves_the_model_unchanged():
    # w_group_size 8 fits the conv (row length 2*2*2 = 8), not the Linear (row length 12): the conv
    # used to be swapped already when the Linear raised, and the error did not name the layer
    model = nn.Sequential(nn.Conv2d(2, 4, 2), nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match=r"quantize_modules: layer '2' \(Linear\): .*group_size 8 does not divide"):
        quantize_modules(model, w_bits=4, a_bits=8, w_granularity="group", w_group_size=8)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear
    with pytest.raises(TypeError, match=r"layer '0' \(Conv2d\).*unexpected keyword argument 'bogus'"):
        quantize_modules(model, bogus=1)
    assert type(model[0]) is nn.Conv2d


def test_quantize_modules_failure_puts_unfused_attention_back():
    # the attention modules were unfused (new Parameters, new state-dict keys, the encoder's fused path
    # off) before any layer was built: a failing call said "the model is unchanged" and was not
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=False)
    enc.eval()
    attn, keys = enc.layers[0].self_attn, set(enc.state_dict())
    flags = (enc.layers[0].activation_relu_or_gelu, enc.use_nested_tensor)
    for kw in ({"w_bits": 9}, {"w_granularity": "group", "w_group_size": 5}):
        with pytest.raises(ValueError):
            quantize_modules(enc, **kw)
        assert enc.layers[0].self_attn is attn and set(enc.state_dict()) == keys
        assert (enc.layers[0].activation_relu_or_gelu, enc.use_nested_tensor) == flags
    quantize_modules(enc, w_bits=4, a_bits=8)  # and the model still converts
    assert type(enc.layers[0].self_attn.q_proj).__name__ == "QuantLinear"


def test_undo_swaps_on_error_restores_reparametrization_hooks():
    from quantkern.nn._sites import swap_module, undo_swaps_on_error

    parent = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4)))
    old = parent[0]
    n_pre = len(old._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with undo_swaps_on_error():
            swap_module([(parent, "0")], old, nn.Linear(4, 4))
            assert parent[0] is not old and len(old._forward_pre_hooks) == 0
            raise RuntimeError("boom")
    assert parent[0] is old and len(old._forward_pre_hooks) == n_pre
    parent(torch.randn(2, 4))  # weight_norm's hook runs again


def test_quant_layers_take_a_fixed_gradient_scale():
    # the README's advice for torch.compile over varying batch sizes ("pass a fixed grad_scale")
    # had no way in through QuantLinear / QuantConv2d / quantize_modules
    torch.manual_seed(0)
    model = quantize_modules(nn.Sequential(nn.Linear(8, 4)), w_bits=4, a_bits=8, w_grad_scale=0.5, a_grad_scale=0.25)
    assert model[0].weight_quantizer.grad_scale == 0.5 and model[0].input_quantizer.grad_scale == 0.25
    qc = QuantConv2d(3, 4, 3, a_grad_scale=1.0)
    assert qc.weight_quantizer.grad_scale is None and qc.input_quantizer.grad_scale == 1.0
    x = torch.randn(5, 8)
    ref = LSQQuantizer(8, True, "tensor", init="mse", grad_scale=0.25)
    model[0](x).sum().backward()
    ref.load_state_dict(model[0].input_quantizer.state_dict())
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.linear(ref(xr), model[0].weight_quantizer(model[0].weight).detach(), model[0].bias).sum().backward()
    torch.testing.assert_close(model[0].input_quantizer.scale.grad, ref.scale.grad)
    for bad in (0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="QuantLinear: a_grad_scale must be a finite positive number or None"):
            QuantLinear(8, 4, a_grad_scale=bad)
        with pytest.raises(ValueError, match="QuantConv2d: w_grad_scale must be a finite positive number or None"):
            QuantConv2d(3, 4, 3, w_grad_scale=bad)


def test_numpy_scalars_are_numbers():
    # np.float32 grad_scale was refused as "must be a finite float > 0, got np.float32(0.077)", and
    # np.int64 bits as "bits must be an int" (momentum / norm, numbers.Real, took them)
    import numpy as np
    x = torch.randn(6, 32)
    s = torch.full((6,), 0.1)
    ops = quantkern.ops
    want = ops.fake_quant_lsq(x, s, None, -8, 7, axis=0, grad_scale=0.25)
    assert torch.equal(ops.fake_quant_lsq(x, s, None, -8, 7, axis=0, grad_scale=np.float32(0.25)), want)
    q = LSQQuantizer(np.int64(4), True, "group", group_size=np.int32(16), axis=np.int64(0), grad_scale=np.float64(0.5))
    assert (q.bits, q.group_size, q.axis, q.grad_scale) == (4, 16, 0, 0.5)
    assert all(type(v) in (int, float) for v in (q.bits, q.group_size, q.axis, q.grad_scale))
    torch.testing.assert_close(q(x), LSQQuantizer(4, True, "group", group_size=16, grad_scale=0.5)(x))
    with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
        ops.fake_quant_lsq(x, s, None, -8, 7, axis=0, grad_scale=torch.tensor(0.25))
    # the QAT layers refused them ("w_bits must be an int in 2..8, got np.int64(4)")
    lin = QuantLinear(32, 8, w_bits=np.int64(4), a_bits=np.int32(8), w_granularity="group", w_group_size=np.int64(16),
                      a_grad_scale=np.float32(0.5))
    assert (lin.w_bits, lin.a_bits, lin.weight_quantizer.group_size) == (4, 8, 16)
    assert all(type(v) is int for v in (lin.w_bits, lin.a_bits))
    quantize_modules(nn.Sequential(nn.Linear(32, 8)), w_bits=np.int64(3), a_bits=None)


def test_meta_built_channel_input_quantizer_materialises_after_to_empty():
    # to_empty() could not move the lazy per-channel scale (empty_like refuses it): it stayed on meta and the
    # first forward failed in set_data ("incompatible tensor type")
    fl, x = nn.Linear(16, 8), torch.randn(4, 16)
    with torch.device("meta"):
        m = QuantLinear(16, 8, a_granularity="channel")
        q = LSQQuantizer(8, True, "channel", axis=-1)
    m.to_empty(device="cpu")
    q.to_empty(device="cpu")
    assert q._parameters["scale"].device.type == "cpu"
    m.load_state_dict(fl.state_dict(), strict=False)
    torch.testing.assert_close(m(x), QuantLinear.from_float(fl, a_granularity="channel")(x), rtol=0, atol=0)
    q(x)
    # a QAT checkpoint into a meta model without assign=True: a no-op with torch's warning (item() on meta raised)
    src = QuantLinear.from_float(fl)
    src(x)
    with torch.device("meta"):
        mm = QuantLinear(16, 8)
    with pytest.warns(UserWarning):
        mm.load_state_dict(src.state_dict())


def test_uninitialised_quantizer_under_torch_func_says_so():
    # grad / vmap over an uninitialised module failed with torch's internals ("Cannot access storage of
    # TensorWrapper", "in-place operation ... captured Tensor")
    from torch.func import functional_call, grad

    m, x = QuantLinear(8, 4), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="under a torch.func transform"):
        grad(lambda x: m(x).sum())(x)
    with pytest.raises(RuntimeError, match="under a torch.func transform"):
        grad(lambda p: functional_call(m, p, (x,)).sum())(dict(m.named_parameters()))
    m(x)  # once initialised, both work
    grad(lambda x: m(x).sum())(x)


def test_quantize_modules_keeps_hooks_and_warns_about_reparametrizations():
    # a plain setattr dropped the float layer's forward hooks; a hook-based prune mask silently stopped applying
    seen = []
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    net[0].register_forward_hook(lambda mod, i, o: seen.append(type(mod).__name__))
    quantize_modules(net, w_bits=4, a_bits=None)
    net(torch.randn(2, 8))
    assert seen == ["QuantLinear"]
    from torch.nn.utils import prune

    net = nn.Sequential(nn.Linear(8, 8))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    with pytest.warns(UserWarning, match="prune / weight_norm / spectral_norm"):
        quantize_modules(net, w_bits=4, a_bits=None)
    assert int((net[0].weight == 0).sum()) == 32  # (starts from the pruned weight)

# ------------------------------------------------------------------ user-facing edge cases

@pytest.mark.parametrize(
    "kw,shape,bad_shape,match",
    [
        (dict(granularity="channel", axis=1), (4, 3), (4, 5), r"scale has shape \(3,\).*x of shape \(4, 5\) needs \(5,\)"),
        (dict(granularity="channel", axis=-1), (2, 3, 4), (2, 4, 3), r"scale has shape \(4,\).*needs \(3,\)"),
        (dict(granularity="group", group_size=4), (4, 2, 4), (2, 4, 4), r"scale has shape \(4, 2\).*\(2, 4, 4\) needs \(2, 4\)"),
    ],
)
def test_quantizer_called_with_a_different_parameter_shape_names_itself(kw, shape, bad_shape, match):
    # the error came from the op about the reshaped x ("per-group scale must have shape (2, 4),
    # got (4, 2)"), naming neither the quantizer nor the input the user passed
    q = LSQQuantizer(4, True, **kw)
    q(torch.randn(shape))
    with pytest.raises(ValueError, match="LSQQuantizer: " + match):
        q(torch.randn(bad_shape))
    q(torch.randn(shape))  # still usable with the shape it was initialised for


def test_failed_load_leaves_quantizer_usable():
    # A plain-LSQ checkpoint (no offset) loaded into a lazy LSQ+ quantizer must fail, but it left
    # initialized=True with a still-lazy offset: the next forward died with PyTorch's
    # "Can't access the shape of an uninitialized parameter".
    src = LSQQuantizer(4, True, "channel", learn_offset=False)
    src(torch.randn(3, 8))
    dst = LSQQuantizer(4, True, "channel")
    with pytest.raises(RuntimeError, match="initialized=True but has no scale/offset"):
        dst.load_state_dict(src.state_dict(), strict=False)
    assert not dst._initialized and not dst.initialized
    x = torch.randn(3, 8)
    torch.testing.assert_close(dst(x), _ref(dst, x), rtol=0, atol=0)  # initialises from x
    assert dst._initialized and dst.offset.shape == (3,)


@pytest.mark.parametrize("init", ["mse", "minmax", "lsq", "lsq+"])
@pytest.mark.parametrize("learn_offset", [True, False])
def test_constant_rows_at_init_get_a_usable_scale(init, learn_offset):
    # A channel that is constant in the first batch (a dead input channel, an alpha channel == 1)
    # got scale 1e-8 (every init gives it 0 there), and training never grew it back: later inputs
    # quantized to ~0 or to the offset. It takes the median of the other rows' scales, with its
    # value kept on the grid; the other rows are exactly what they were.
    torch.manual_seed(0)
    x = torch.rand(8, 4, 5, 5)
    x[:, 1] = 0.0
    x[:, 3] = 1.0
    q = LSQQuantizer(8, signed=learn_offset, granularity="channel", axis=1, learn_offset=learn_offset, init=init)
    s0, b0 = q._init_rows(q._rows(x))  # the init of every row, before the fix-up
    flat = s0 <= q.eps  # channel 1 always; channel 3 unless the init gives it a scale (lsq, lsq+)
    assert flat[1] and not flat[0] and not flat[2]
    with pytest.warns(UserWarning, match=rf"{int(flat.sum())} of 4 channels are constant"):
        y = q(x)
    s = q.scale.detach()
    assert torch.equal(s[~flat], s0.clamp_min(q.eps)[~flat])  # normal rows: bit-identical
    assert (s[flat] == s0.clamp_min(q.eps)[~flat].median()).all()
    if learn_offset:
        assert torch.equal(q.offset.detach()[~flat], b0[~flat])
    torch.testing.assert_close(y[:, 1], x[:, 1], rtol=0, atol=1e-7)  # the constants are on the grid
    if flat[3]:  # (lsq / lsq+ give the 1.0 channel a scale of its own: their init's grid, not ours)
        torch.testing.assert_close(y[:, 3], x[:, 3], rtol=1e-6, atol=0)
    x2 = torch.rand(8, 4, 5, 5)  # later, the channels vary: their grids resolve them as the others'
    err = (q(x2) - x2).abs().amax((0, 2, 3))
    assert err[flat].max() <= 2 * err[~flat].max(), err


def test_constant_rows_every_row_and_per_tensor():
    # every row constant: the placeholder scale 1, values kept on the grid (was 1e-8 everywhere)
    q = LSQQuantizer(4, True, "channel", learn_offset=True, init="minmax")
    w = torch.tensor([[0.5, 0.5, 0.5], [2.25, 2.25, 2.25]])
    with pytest.warns(UserWarning, match="2 of 2 channels are constant.*scale 1"):
        y = q(w)
    assert torch.equal(q.scale.detach(), torch.ones(2)) and torch.equal(y, w)
    q = LSQQuantizer(8, False, learn_offset=True, init="mse")
    with pytest.warns(UserWarning, match="the initialisation data is constant"):
        y = q(torch.full((4, 4), 0.3))
    assert q.scale.item() == 1.0 and torch.allclose(y, torch.full((4, 4), 0.3), rtol=1e-6, atol=0)
    # a weight quantizer with a zero (pruned) row, one constant row and normal rows (lsq+ init)
    lin = nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[2].zero_()
    with pytest.warns(UserWarning, match="1 of 4 channels are constant"):
        ql = QuantLinear.from_float(lin, w_bits=4, a_bits=None)
        ql(torch.randn(2, 16))
    s = ql.weight_quantizer.scale.detach()
    assert s[2] == s[[0, 1, 3]].median() and (s > 1e-3).all()


def test_empty_batch_waits_for_the_init():
    # an MoE expert that got no token: "cannot initialise from an empty tensor" before; now the init
    # waits for the next non-empty batch (as for all-zero data) and the output is empty
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    q = QuantLinear.from_float(copy.deepcopy(lin), w_bits=4, a_bits=8, a_granularity="channel")
    x0 = torch.randn(0, 16, requires_grad=True)
    y0 = q(x0)
    assert y0.shape == (0, 4) and not q.input_quantizer._initialized
    y0.sum().backward()
    assert x0.grad.shape == (0, 16)
    x = torch.randn(5, 16)
    ref = QuantLinear.from_float(copy.deepcopy(lin), w_bits=4, a_bits=8, a_granularity="channel")
    assert torch.equal(q(x), ref(x)) and torch.equal(q.input_quantizer.scale, ref.input_quantizer.scale)
    assert q(x0).shape == (0, 4)  # initialised: the op itself takes an empty batch
    # the empty dim may be the one the parameters' shape comes from: nothing is materialised
    g = LSQQuantizer(4, True, "group", group_size=4)
    assert g(torch.randn(0, 8)).shape == (0, 8) and not g._initialized
    g(torch.randn(3, 8))
    assert g.scale.shape == (3, 2) and g._initialized
    with pytest.raises(ValueError, match="group_size 8 does not divide the row length 12"):
        LSQQuantizer(4, True, "group", group_size=8)(torch.randn(0, 12))


def test_gradients_at_the_grid_ends_as_documented():
    # README / DESIGN.md: dx counts v == qmin / qmax as inside (qmin <= v <= qmax), the scale and
    # offset gradients as clipped (strictly inside only: qmin < v < qmax)
    q = LSQQuantizer(4, True, learn_offset=True, grad_scale=1.0)
    q.initialize(torch.randn(16))
    with torch.no_grad():
        q.scale.fill_(0.125)
        q.offset.zero_()
    x = torch.tensor([-1.0, -0.5, 0.25, 0.875, 0.9375], requires_grad=True)  # v = -8 (qmin), -4, 2, 7 (qmax), 7.5
    for i, (dx, ds, db) in enumerate([(1, -8, 1), (1, 0, 0), (1, 0, 0), (1, 7, 1), (0, 7, 1)]):
        x.grad = q.scale.grad = q.offset.grad = None
        q(x)[i].backward()
        assert (x.grad[i].item(), q.scale.grad.item(), q.offset.grad.item()) == (dx, ds, db), i


def test_extra_repr_shows_non_default_grad_scale_and_backend():
    r = repr(LSQQuantizer(4, True, grad_scale=0.125, backend="native"))
    assert "grad_scale=0.125" in r and "backend='native'" in r
    r = repr(LSQQuantizer(4, True))
    assert "grad_scale" not in r and "backend" not in r


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_all_zero_first_batch_defers_the_init(granularity):
    # A padding batch (or a dead layer's output) first: the init waits for data with a non-zero
    # value instead of fixing scale 1e-8, which clipped every later input to ~0.
    q = LSQQuantizer(4, signed=False, granularity=granularity, axis=1, learn_offset=True, init="mse")
    with pytest.warns(UserWarning, match="all zeros"):
        assert torch.equal(q(torch.zeros(8, 5)), torch.zeros(8, 5))
    assert not q._initialized and not bool(q.initialized) and tuple(q.scale.shape) in ((1,), (5,))
    x = torch.rand(8, 5) * 3
    y = q(x)
    ref = LSQQuantizer(4, signed=False, granularity=granularity, axis=1, learn_offset=True, init="mse")
    assert q._initialized and torch.equal(y, ref(x)) and torch.equal(q.scale, ref.scale)
    # an explicit initialize() with zeros on an initialised quantizer keeps what it has (it set the
    # placeholder scale 1 for good: forward never re-runs the init)
    s = q.scale.detach().clone()
    with pytest.warns(UserWarning, match="keeps its current scale"):
        q.initialize(torch.zeros(8, 5))
    assert q._initialized and torch.equal(q.scale, s) and torch.equal(q(x), y)


def test_lsq_init_warnings_point_at_the_caller():
    # the compiler.disable / no_grad wrappers around the init made them point into torch's eval_frame.py
    from quantkern.nn.lsq import LSQQuantizer

    x = torch.randn(4, 8)
    x[:, 3] = 0.0
    for data in (x, torch.zeros(4, 8)):
        q = LSQQuantizer(4, True, granularity="channel", axis=1, init="minmax")
        with pytest.warns(UserWarning) as rec:
            q(data)
        assert {r.filename for r in rec} == {__file__}


def test_loading_a_float_checkpoint_reinitialises_the_weight_quantizer():
    # quantize_modules(Net()) then load_state_dict(float_sd, strict=False): the weight scales stayed those of
    # the random init (output error 0.98 instead of 0.12)
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        trained[0].weight.mul_(20)
    sd = trained.state_dict()
    model = quantize_modules(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), w_bits=4, a_bits=None)
    res = model.load_state_dict(sd, strict=False)
    assert all("weight_quantizer" in k for k in res.missing_keys)
    x = torch.randn(64, 32)
    ref = quantize_modules(copy.deepcopy(trained), w_bits=4, a_bits=None)
    torch.testing.assert_close(model(x), ref(x))
    # initialised by the load itself (a reset left to the next forward happened on one DDP rank only)
    model.load_state_dict(sd, strict=False)
    torch.testing.assert_close(model[0].weight_quantizer.scale, ref[0].weight_quantizer.scale)
    # a full QAT checkpoint keeps its trained scales
    with torch.no_grad():
        ref[0].weight_quantizer.scale.mul_(1.5)
    model.load_state_dict(ref.state_dict())
    assert model[0].weight_quantizer._initialized
    torch.testing.assert_close(model(x), ref(x))
    # ... also loaded in two parts, the quantizers first: the weights after them do not re-initialise
    full = ref.state_dict()
    fresh = quantize_modules(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), w_bits=4, a_bits=None)
    fresh.load_state_dict({k: v for k, v in full.items() if "quantizer" in k}, strict=False)
    fresh.load_state_dict({k: v for k, v in full.items() if "quantizer" not in k}, strict=False)
    torch.testing.assert_close(fresh(x), ref(x))
    # and a model compiled with fullgraph=True keeps running after a float load (no init left to its forward)
    comp = torch.compile(model, fullgraph=True)
    comp(x)
    model.load_state_dict(sd, strict=False)
    torch.testing.assert_close(comp(x), quantize_modules(copy.deepcopy(trained), w_bits=4, a_bits=None)(x))


def test_float_load_of_a_zero_layer_and_loads_that_do_not_touch_a_layer():
    torch.manual_seed(0)
    mk = lambda: quantize_modules(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)),  # noqa: E731
                                  w_bits=4, a_bits=None)
    # an all-zero float weight (a zero-init layer): the quantizer waits for the first non-zero weight
    # (initialize() on zeros kept the conversion's scale and warned)
    model = mk()
    sd = {k: torch.zeros_like(v) if k == "0.weight" else v for k, v in mk().state_dict().items()
          if "quantizer" not in k}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(sd, strict=False)
    assert not model[0].weight_quantizer._initialized
    # a checkpoint in three parts: layer 0's quantizers, then layer 2 alone, then layer 0's weights: the
    # load of layer 2 must not clear layer 0's "state loaded" mark
    ref = mk()
    with torch.no_grad():
        ref[0].weight_quantizer.scale.mul_(1.5)
    full, model = ref.state_dict(), mk()
    for part in (lambda k: k.startswith("0.weight_quantizer"), lambda k: k.startswith("2."),
                 lambda k: k in ("0.weight", "0.bias")):
        model.load_state_dict({k: v for k, v in full.items() if part(k)}, strict=False)
    x = torch.randn(8, 32)
    torch.testing.assert_close(model(x), ref(x))


def test_swap_journal_is_per_thread():
    import threading

    from quantkern.nn._sites import swap_module, undo_swaps_on_error

    a, b = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    old_a, new_b = a[0], nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with undo_swaps_on_error():
            swap_module([(a, "0")], old_a, nn.Linear(2, 2))
            t = threading.Thread(target=lambda: swap_module([(b, "0")], b[0], new_b))
            t.start()
            t.join()
            raise RuntimeError("boom")
    assert a[0] is old_a and b[0] is new_b  # the other thread's swap stays


def test_meta_to_empty_then_float_checkpoint_initialises_from_data():
    # to_empty() leaves the `initialized` buffer as uninitialised memory; loading a float checkpoint
    # (no quantizer keys) copied it into the Python flag, so most fresh layers skipped the input
    # quantizer's init and ran with uninitialised memory as scale / offset
    torch.manual_seed(0)
    fl = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    ref = QuantLinear.from_float(fl)(x)
    for _ in range(10):
        with torch.device("meta"):
            m = QuantLinear(64, 32)
        m.to_empty(device="cpu")
        for q in (m.input_quantizer, m.weight_quantizer):
            q.initialized.fill_(True)  # what the garbage often read as
        m.load_state_dict(fl.state_dict(), strict=False)
        assert not m.input_quantizer._initialized and not bool(m.input_quantizer.initialized)
        torch.testing.assert_close(m(x), ref)
        assert m.input_quantizer._initialized and bool(m.input_quantizer.initialized)


def test_uninitialised_quantizer_on_copies_of_its_parameters_raises():
    # nn.DataParallel replicas and functional_call with copies: the init wrote the copies only, and
    # the module stayed uninitialised (DataParallel: re-initialised from every batch)
    from torch.func import functional_call
    torch.manual_seed(0)
    m = QuantLinear(16, 8)
    x = torch.randn(4, 16)
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    with pytest.raises(RuntimeError, match="Run one plain forward .* on the model before wrapping it"):
        functional_call(m, params, (x,))
    assert not m.input_quantizer._initialized
    # what nn.parallel.replicate does (it needs CUDA): every module replicated, parameters as plain-tensor copies
    mods = list(m.modules())
    reps = {id(mod): mod._replicate_for_data_parallel() for mod in mods}
    for mod in mods:
        r = reps[id(mod)]
        r._modules = {k: reps[id(c)] if c is not None else None for k, c in mod._modules.items()}
        r._parameters = {k: p.detach().clone() if p is not None else None for k, p in mod._parameters.items()}
    with pytest.raises(RuntimeError, match="DataParallel"):
        reps[id(m)](x)
    assert not m.input_quantizer._initialized and not m.weight_quantizer._initialized
    y = m(x)  # initialised on the model itself: copies of it run
    torch.testing.assert_close(functional_call(m, {k: v.detach().clone() for k, v in m.named_parameters()}, (x,)), y)
    # copies of the buffers beside the module's own parameters (or its lazy per-channel scale, which a cloned
    # state_dict leaves out): the init reached the scale but marked only the copied `initialized`, so the
    # module's state_dict said initialized=False next to a real scale (and a checkpoint re-initialised on load)
    for fresh, swap in ((QuantLinear(16, 8), lambda mod: (dict(mod.named_parameters()),
                                                          {k: v.clone() for k, v in mod.named_buffers()})),
                        (LSQQuantizer(4, True, "channel", axis=-1), lambda mod: {k: v.clone() for k, v in
                                                                                 mod.state_dict().items()})):
        with pytest.raises(RuntimeError, match="`initialized` buffer is not its own"):
            functional_call(fresh, swap(fresh), (x,))
        assert not any(q._initialized or bool(q.initialized) for q in fresh.modules() if isinstance(q, LSQQuantizer))
    # tensors that share the module's memory (state_dict(), detached parameters) initialise the module itself
    for make in (lambda mod: mod.state_dict(), lambda mod: {k: v.detach() for k, v in mod.named_parameters()}):
        fresh = QuantLinear(16, 8)
        out = functional_call(fresh, make(fresh), (x,))
        assert fresh.input_quantizer._initialized and bool(fresh.input_quantizer.initialized)
        torch.testing.assert_close(fresh(x), out)


def test_bits_and_signed_are_read_only():
    # q.bits = 2 changed only the repr (qmin / qmax stayed 4-bit's)
    q = LSQQuantizer(4, True)
    for attr, val in (("bits", 2), ("signed", False)):
        with pytest.raises(AttributeError, match="fixed at construction"):
            setattr(q, attr, val)
    assert (q.bits, q.signed, q.qmin, q.qmax) == (4, True, -8, 7)
    c = copy.deepcopy(q)
    assert (c.bits, c.signed) == (4, True)
    # a module pickled whole before (bits / signed as plain attributes) still loads
    st = dict(q.__dict__)
    st["bits"], st["signed"] = st.pop("_bits"), st.pop("_signed")
    old = LSQQuantizer.__new__(LSQQuantizer)
    old.__setstate__(st)
    assert (old.bits, old.signed) == (4, True) and "bits=4" in repr(old)
