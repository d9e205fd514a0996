"""Activation (input) quantization of PackedLinear: set_input_quantizer, its numbers against a
hand-written fake quantizer, non-finite inputs, checkpoints, casts, compile, and how quantize_ /
save_quantized / load_quantized carry it."""
import copy
import warnings

import pytest
import torch
from torch import nn

from quantkern import QuantizeConfig, load_quantized, quantize_, save_quantized
from quantkern.nn import PackedLinear
from quantkern._affine_fq import one_pass
from quantkern.nn.packed_linear import fake_quant_input
from quantkern.ptq.calibrate import fake_quant, fake_quant_dynamic

K, N = 64, 16
STATIC = dict(bits=8, symmetric=False, dynamic=False, scale=0.03, zero=128.0)
CONFIGS = [STATIC, dict(bits=4, symmetric=True, dynamic=False, scale=0.4),
           dict(bits=8, symmetric=False, dynamic=True), dict(bits=4, symmetric=True, dynamic=True)]


def layer(seed=0, **q):
    torch.manual_seed(seed)
    m = PackedLinear.from_linear(nn.Linear(K, N), bits=4, group_size=32)
    return m.set_input_quantizer(**q) if q else m


def hand_fake_quant(x, bits, symmetric, dynamic, scale=None, zero=0.0):
    """Token by token with 0-dim float32 ranges: (clamp(round(x / s) + z, qmin, qmax) - z) * s."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    qmin, qmax = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    rows = x.float().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i, r in enumerate(rows):
        if not dynamic:
            s, z = f32(scale), f32(zero)
        elif symmetric:
            s, z = r.abs().max() / qmax, f32(0.0)
        else:
            lo, hi = torch.clamp(r.min(), max=0.0), torch.clamp(r.max(), min=0.0)
            s = (hi - lo) / qmax
            z = torch.round(-lo / s) if s > 0 else f32(0.0)
        out[i] = 0 if s == 0 else (torch.clamp(torch.round(r / s) + z, qmin, qmax) - z) * s
    return out.reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_matches_hand_written_fake_quant(bits, symmetric, dynamic):
    torch.manual_seed(bits)
    q = dict(bits=bits, symmetric=symmetric, dynamic=dynamic)
    if not dynamic:
        q.update(scale=0.37 / 2 ** (bits - 3), zero=0.0 if symmetric else float(2 ** (bits - 1) - 1))
    m = layer(**q)
    plain = layer()
    xs = [torch.randn(3, K) * 2, torch.randn(K), torch.randn(2, 1, 3, K), torch.randn(0, K),
          (torch.randn(K, 5) * 3).t(),  # non-contiguous
          torch.randn(4, K, dtype=torch.float16), torch.randn(4, K, dtype=torch.bfloat16)]
    xs[0][1] = 0.0  # a token with range 0 -> 0
    xs[0][2, :] = xs[0][2].abs() + 0.1  # one-signed token (asymmetric zero 0)
    for x in xs:
        want = hand_fake_quant(x, bits, symmetric, dynamic, q.get("scale"), q.get("zero", 0.0))
        got = m.quantize_input(x)
        assert got.dtype == x.dtype and got.shape == x.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with torch.no_grad():  # the layer: the same packed matmul on the quantized input
            torch.testing.assert_close(m(x), plain(want), rtol=0, atol=0)
    if dynamic:  # per token (per leading index), never per tensor: another token's outlier changes nothing
        x = torch.randn(5, K)
        y = x.clone()
        y[0, 0] = 1e3
        assert torch.equal(m.quantize_input(x)[1:], m.quantize_input(y)[1:])
        # = calibrate.fake_quant_dynamic per row (axis=0) of the flattened leading dims
        x3 = torch.randn(2, 3, K)
        ref = fake_quant_dynamic(x3.reshape(-1, K), bits, axis=0, symmetric=symmetric).reshape(x3.shape)
        torch.testing.assert_close(m.quantize_input(x3), ref, rtol=0, atol=0)


@pytest.mark.parametrize("bits,symmetric", [(3, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_pass_form_is_the_composite_bit_for_bit(bits, symmetric, dtype):
    # fake_quant_input runs as one fake_quant_lsq pass where no gradient is taken (_one_pass); it
    # must give the composite form's bits for every zero point, on ties (half-integers of x / s),
    # at and beyond the grid's ends, for -0, +-inf, NaN, subnormals and values far outside the range
    qmin, qmax = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    zeros = [0] if symmetric else sorted({0, 1, 2, (qmax + 1) // 2, qmax - 1, qmax})
    s = torch.tensor(0.0371, dtype=torch.float32)
    k = torch.arange(-2 * 2 ** bits, 2 * 2 ** bits, dtype=torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 3e38, -3e38])
    x = torch.cat([k * s, (k + 0.5) * s, (k - 0.5) * s, (k + 0.4999) * s, torch.randn(997) * 4, special])
    x = x.to(dtype)
    for z in zeros:
        m = layer(bits=bits, symmetric=symmetric, scale=float(s), zero=float(z))
        args = (x, bits, symmetric, False, m.input_scale, m.input_zero)
        assert one_pass(x, m.input_scale, m.input_zero, qmin, qmax) is not None
        want = composite(*args)
        got = m.quantize_input(x)
        assert got.dtype == dtype and same_bits(got, want), z
        # with a gradient taken, the composite form (its straight-through rule) runs: same forward
        xg = x.clone().requires_grad_(True)
        assert one_pass(xg, m.input_scale, m.input_zero, qmin, qmax) is None
        assert same_bits(m.quantize_input(xg).detach(), want)
    # dynamic symmetric: per-token scales; tokens with special values (a zero, inf or NaN range)
    # send the whole call to the composite form
    xt = torch.randn(7, 3, 33).to(dtype) * torch.logspace(-3, 3, 33).to(dtype)
    xt[1, 2] = (torch.arange(33) - 16).to(dtype) * 0.5  # ties on a grid whose scale is 16 / qmax
    assert same_bits(fake_quant_input(xt, bits, symmetric, True), composite(xt, bits, symmetric, True))
    xt[2, 0, 0] = float("nan")
    assert same_bits(fake_quant_input(xt, bits, symmetric, True), composite(xt, bits, symmetric, True))
    # calibrate.fake_quant (ActQuantizer's), per tensor and per channel (zero 0 only)
    sc = torch.rand(33) + 0.01
    assert same_bits(fake_quant(xt, sc, torch.zeros(33), qmin, qmax, axis=-1),
                     composite_calib(xt, sc, torch.zeros(33), qmin, qmax, axis=-1))
    assert one_pass(xt, sc, torch.zeros(33), qmin, qmax, axis=2) is not None
    assert one_pass(xt, sc, torch.ones(33), qmin, qmax, axis=2) is None  # per-channel zero points: composite
    for z in zeros:
        assert same_bits(fake_quant(x, s, torch.tensor(float(z)), qmin, qmax),
                         composite_calib(x, s, torch.tensor(float(z)), qmin, qmax))


def test_one_pass_steps_aside_for_gradients_transforms_layouts_and_wide_grids():
    # a learnable scale takes the composite form's gradient; vmap (a batched range cannot be read on the
    # host), a channels_last x (the composite keeps its layout) and grids past 2^24 run the composite too
    x = torch.randn(4, 8)
    s = torch.tensor(0.1, requires_grad=True)
    assert one_pass(x, s, torch.tensor(3.0), 0, 255) is None
    y = fake_quant(x, s, torch.tensor(3.0), 0, 255)
    y.sum().backward()
    assert s.grad is not None  # (the composite's: straight through, scale constant only in x's gradient)
    assert one_pass(x, s.detach(), torch.tensor(3.0), 0, 255) is not None
    sc = torch.tensor([0.1, 0.2, 0.3])
    out = torch.func.vmap(lambda sv: fake_quant_input(x, 8, False, False, sv, torch.tensor(3.0)))(sc)
    assert out.shape == (3, 4, 8) and torch.equal(out[1], fake_quant_input(x, 8, False, False, sc[1], torch.tensor(3.0)))
    xc = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert one_pass(xc, torch.tensor(0.1), None, -128, 127) is None
    assert fake_quant(xc, 0.1, 0.0, -128, 127).is_contiguous(memory_format=torch.channels_last)
    assert one_pass(x, torch.tensor(0.1), torch.tensor(0.0), -(2 ** 25), 2 ** 25) is None
    assert fake_quant(x, 0.1, 0.0, -(2 ** 25), 2 ** 25).shape == x.shape


def composite(*args):
    """fake_quant_input without its fused form."""
    with torch.enable_grad():
        return fake_quant_input(args[0].detach().requires_grad_(True), *args[1:]).detach()


def composite_calib(x, *args, **kw):
    """calibrate.fake_quant without its fused form."""
    with torch.enable_grad():
        return fake_quant(x.detach().requires_grad_(True), *args, **kw).detach()


def same_bits(a, b):
    """Equal bit for bit (so -0 is not +0), except that any NaN equals any NaN (the payload and sign
    of a NaN differ between kernels)."""
    a, b = a.float(), b.float()
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


BAD_SETS = [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(bits=True), dict(bits="8"),
            dict(bits=8, symmetric="false"), dict(bits=8, dynamic=1),
            dict(bits=8, scale=-1.0), dict(bits=8, scale=0.0), dict(bits=8, scale=float("nan")),
            dict(bits=8, scale=1e-50), dict(bits=8, scale=1e39),  # 0 / inf in float32
            dict(bits=8, scale=torch.tensor([0.1, 0.2])), dict(bits=8, scale="0.1"),
            dict(bits=8, scale=0.1, zero=3.5), dict(bits=8, scale=0.1, zero=256.0),
            dict(bits=8, symmetric=True, scale=0.1, zero=3.0),
            dict(bits=8, dynamic=True, scale=0.1), dict(bits=None, scale=0.1)]


@pytest.mark.parametrize("bad", BAD_SETS, ids=[str(b) for b in BAD_SETS])
def test_bad_set_input_quantizer_raises_and_changes_nothing(bad):
    # a refused call used to delete the static range first (forward then failed with an
    # AttributeError), or to keep the new grid's symmetric flag with the old range
    m = layer(**STATIC)
    x = torch.randn(3, K)
    y = m(x)
    with pytest.raises(ValueError, match="act_bits|symmetric|dynamic|scale|zero"):
        m.set_input_quantizer(**bad)
    assert m.act_config == {"bits": 8, "symmetric": False, "dynamic": False}
    assert sorted(n for n, _ in m.named_buffers()) == ["input_scale", "input_zero", "qweight", "scales", "zeros"]
    assert torch.equal(m(x), y)


def test_scale_with_autograd_history_is_stored_detached():
    # a scale computed from a Parameter became a non-leaf buffer: deepcopy (and quantize_'s float copy) failed
    p = nn.Parameter(torch.tensor(0.05))
    m = layer(bits=8, scale=p * 1.0, zero=torch.tensor(7))
    assert not m.input_scale.requires_grad and m.input_scale.dtype == m.input_zero.dtype == torch.float32
    assert m.input_scale.shape == () and float(m.input_zero) == 7.0
    x = torch.randn(2, K)
    assert torch.equal(copy.deepcopy(m)(x), m(x))
    m2 = layer(bits=8, scale=torch.tensor([0.05], dtype=torch.float64))  # one-element, any float dtype
    assert m2.input_scale.shape == () and m2.input_scale.dtype == torch.float32


def test_static_quantizer_without_range_raises_until_a_checkpoint_fills_it():
    # it used to run the placeholder grid (scale 1, zero 0): inputs rounded to integers, negatives to 0
    src = layer(**STATIC)
    x = torch.randn(3, K)
    m = PackedLinear(K, N, bits=4, group_size=32).set_input_quantizer(8)
    for f in (m, m.quantize_input, copy.deepcopy(m)):
        with pytest.raises(RuntimeError, match="no range yet"):
            f(x)
    # a load that misses the range keeps it unset; a failed load too
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("input_")}
    m.load_state_dict(sd, strict=False)
    with pytest.raises(RuntimeError, match="no range yet"):
        m(x)
    with pytest.raises(ValueError, match="bias"):
        m.load_state_dict(dict(src.state_dict(), bias=torch.zeros(N + 1)))
    with pytest.raises(RuntimeError, match="no range yet"):
        m(x)
    m.load_state_dict(src.state_dict())
    assert torch.equal(m(x), src(x))
    # dynamic quantizers and the removed one need no range
    PackedLinear(K, N, bits=4, group_size=32).set_input_quantizer(8, dynamic=True)(x)
    PackedLinear(K, N, bits=4, group_size=32).set_input_quantizer(8).set_input_quantizer(None)(x)


@pytest.mark.parametrize("symmetric", [False, True])
def test_nonfinite_inputs(symmetric):
    st = layer(bits=8, symmetric=symmetric, scale=0.03, zero=0.0 if symmetric else 128.0)
    dy = layer(bits=8, symmetric=symmetric, dynamic=True)
    x = torch.randn(4, K)
    x[1, 3], x[2, 5], x[3, 7] = float("inf"), -float("inf"), float("nan")
    # static: +-inf saturates like any value beyond the range (calibrate.fake_quant's result; the
    # straight-through term made it NaN); NaN stays NaN, in its own token only
    xq = st.quantize_input(x)
    # (both grids here end at 127 * s and -128 * s: asymmetric [0, 255] with zero 128)
    assert float(xq[1, 3]) == pytest.approx(127 * 0.03) and float(xq[2, 5]) == pytest.approx(-128 * 0.03)
    assert torch.isnan(xq[3, 7]) and torch.isfinite(xq[:3]).all()
    y = st(x)
    assert torch.isfinite(y[:3]).all() and torch.isnan(y[3]).all()
    # gradient: zero at the saturated +-inf entries, never NaN there
    xg = x[:3].clone().requires_grad_(True)
    st(xg).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad[1, 3] == 0 and xg.grad[2, 5] == 0
    # dynamic: a token with NaN / inf has no finite range -> NaN; the others are untouched
    y = dy(x)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()
    assert torch.equal(dy(x[:1]), y[:1])


def test_dynamic_asymmetric_range_wider_than_float32():
    # max - min overflowed for a finite token spanning +-3e38: scale inf, the whole token NaN
    x = torch.tensor([[3e38, -3e38, 1.0, 2.0], [1.0, -2.0, 0.5, 0.0]])
    got = fake_quant_input(x, 8, False, True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, fake_quant_dynamic(x, 8, axis=0, symmetric=False), rtol=0, atol=0)


@pytest.mark.parametrize("src_q,dst_q", [(STATIC, None), (None, STATIC), (STATIC, CONFIGS[2]), (CONFIGS[2], STATIC),
                                         (STATIC, dict(STATIC, symmetric=True, zero=0.0)), (CONFIGS[2], None),
                                         (STATIC, dict(STATIC, bits=4, scale=0.3, zero=8.0))])
def test_state_dict_into_another_input_quantizer_is_refused(src_q, dst_q):
    src = layer(**src_q) if src_q else layer()
    dst = layer(seed=1, **dst_q) if dst_q else layer(seed=1)
    x = torch.randn(3, K)
    y, cfg = dst(x), dst.act_config
    with pytest.raises((ValueError, RuntimeError)):
        dst.load_state_dict(src.state_dict())
    # without the extra state (a filtered checkpoint) a static range's keys or zero point still tell,
    # before anything is copied, strict or not (a dynamic quantizer leaves no key: only the extra state has it)
    filtered = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}
    if src_q is not None and not src_q["dynamic"]:  # its range's keys or zero point tell, before any copy
        for strict in (True, False):
            with pytest.raises(ValueError, match="input"):
                dst.load_state_dict(filtered, strict=strict)
    elif dst_q is not None and not dst_q["dynamic"]:  # no range for a static quantizer
        fresh = PackedLinear(K, N, bits=4, group_size=32).set_input_quantizer(8)
        with pytest.raises(RuntimeError, match="input_scale"):  # torch's missing keys
            fresh.load_state_dict(filtered)
        fresh = PackedLinear(K, N, bits=4, group_size=32).set_input_quantizer(8)
        fresh.load_state_dict(filtered, strict=False)  # the placeholders stay, and forward says so
        with pytest.raises(RuntimeError, match="no range yet"):
            fresh(x)
    assert dst.act_config == cfg and torch.equal(dst(x), y)


@pytest.mark.parametrize("value", [1e-50, 1e39, float("nan"), 0.0, -0.5])
def test_checkpoint_scale_is_judged_in_float32(value):
    # a float64 1e-50 loaded as scale 0 (every input -> 0) and 1e39 as inf (NaN outputs)
    sd = dict(layer(**STATIC).state_dict(), input_scale=torch.tensor(value, dtype=torch.float64))
    m = layer(seed=1, **STATIC)
    with pytest.raises(ValueError, match="input_scale"):
        m.load_state_dict(sd)
    assert float(m.input_scale) == pytest.approx(0.03)


def test_checkpoint_round_trip_casts_copy_and_gradient():
    x = torch.randn(2, 3, K)
    for q in CONFIGS:
        m = layer(**q)
        fresh = PackedLinear(K, N, bits=4, group_size=32).set_input_quantizer(q["bits"], q["symmetric"], q["dynamic"])
        fresh.load_state_dict(m.state_dict())
        assert torch.equal(fresh(x), m(x)) and fresh.act_config == m.act_config
        c = copy.deepcopy(m)
        assert torch.equal(c(x), m(x))
        if not q["dynamic"]:
            assert c.input_scale.data_ptr() != m.input_scale.data_ptr()
        # a model-wide cast keeps the range in float32; the same fp16 input gives the same output
        xh = x.half()
        yh = m(xh)
        m.half()
        if not q["dynamic"]:
            assert m.input_scale.dtype == m.input_zero.dtype == torch.float32
        assert m.bias.dtype == torch.float16 and m(xh).dtype == torch.float16
        torch.testing.assert_close(m(xh), yh, rtol=2e-3, atol=2e-3)  # only the bias was rounded
        m.float()
        # straight-through gradient: dY W where the clamp keeps the entry, 0 where it clips
        xg = (x * 4).requires_grad_(True)
        gy = torch.randn(2, 3, N)
        m(xg).backward(gy)
        W = m.dequantize(torch.float32)
        xf = xg.detach()
        if q["dynamic"]:
            inside = torch.ones_like(xf, dtype=torch.bool)  # the token's own range never clips
        else:
            qmin, qmax = (-2 ** (q["bits"] - 1), 2 ** (q["bits"] - 1) - 1) if q["symmetric"] else (0, 2 ** q["bits"] - 1)
            v = torch.round(xf / q["scale"]) + q.get("zero", 0.0)
            inside = (v >= qmin) & (v <= qmax)
            assert not inside.all()
        torch.testing.assert_close(xg.grad, (gy @ W) * inside)


def test_compile_fullgraph_dynamic_asymmetric():
    # the float64 branch for ranges wider than float32 traces too (static and the other grids:
    # test_quantize.py / test_compile_api.py)
    m = layer(bits=8, symmetric=False, dynamic=True)
    x = torch.randn(3, K)
    x[0, :2] = torch.tensor([3e38, -3e38])
    with torch.no_grad():
        y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)  # tracing is the point; inductor: test_quantize
        assert torch.equal(y, m(x)) and torch.isfinite(m.quantize_input(x)).all()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(K, 96), nn.Linear(96, K), nn.Linear(K, 32)

    def forward(self, x=None, input_ids=None):
        x = input_ids if x is None else x
        return self.c(torch.relu(self.b(nn.functional.gelu(self.a(x)))))


def _net(seed=0):
    torch.manual_seed(seed)
    return _Net().eval()


_g = torch.Generator().manual_seed(1)
X_CAL = torch.randn(16, 16, K, generator=_g) * 2
X_EVAL = torch.randn(4, 16, K, generator=_g) * 2


def _rel(m, ref):
    with torch.no_grad():
        y, r = m(X_EVAL), ref(X_EVAL)
    return ((y - r).norm() / r.norm()).item()


@pytest.mark.parametrize("dynamic", [False, True])
def test_quantize_save_load_bit_exact_with_dict_batches(tmp_path, dynamic):
    # calibration units calling the model with a dict batch (keyword input); the hook takes x by name
    units = [lambda m, b={"x": X_CAL[i:i + 4]}: m(**b) for i in range(0, 16, 4)]
    cfg = QuantizeConfig(method="rtn", bits=4, group_size=32, act_bits=8, act_dynamic=dynamic, act_method="max")
    m = quantize_(_net(), cfg, calib_fn=units, progress=False)
    for name in ("a", "b", "c"):
        lin = getattr(m, name)
        assert lin.act_config == {"bits": 8, "symmetric": False, "dynamic": dynamic}
        assert ("input_scale" in dict(lin.named_buffers())) == (not dynamic)
    if not dynamic:  # calibrated, not the placeholder: max calibration of a's input
        lo, hi = min(float(X_CAL.min()), 0.0), max(float(X_CAL.max()), 0.0)
        assert float(m.a.input_scale) == pytest.approx((hi - lo) / 255, rel=1e-6)
    p = str(tmp_path / "m.safetensors")
    save_quantized(m, p)
    m2 = load_quantized(lambda: _net(seed=3), p)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sd2[k].dtype and torch.equal(v, sd2[k]), k
        else:
            assert v == sd2[k], k
    with torch.no_grad():
        assert torch.equal(m(X_EVAL), m2(X_EVAL))


def test_erq_w3a4_beats_rtn_w3a4():
    units = [lambda m, i=i: m(X_CAL[i:i + 4]) for i in range(0, 16, 4)]
    ref = _net()
    errs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("rtn", "erq"):
            cfg = QuantizeConfig(method=method, bits=3, group_size=32, act_bits=4, erq_refine_iters=10)
            errs[method] = _rel(quantize_(_net(), cfg, calib_fn=units, progress=False), ref)
    assert errs["erq"] < errs["rtn"] < 0.5, errs


def test_save_refuses_a_static_quantizer_without_range_and_fake_quant_saturates_inf(tmp_path):
    # save_quantized would store the placeholder range (1, 0), which load_quantized then trusts
    model = nn.Sequential(PackedLinear(K, N, bits=4, group_size=32).set_input_quantizer(8))
    with pytest.raises(ValueError, match="without a range"):
        save_quantized(model, str(tmp_path / "m.safetensors"))
    # calibrate.fake_quant with autograd on: +-inf saturates as without it (the straight-through
    # term used to turn it into NaN)
    from quantkern.ptq.calibrate import fake_quant

    x = torch.tensor([float("inf"), -float("inf"), 1.0])
    want = fake_quant(x, torch.tensor(0.03), torch.tensor(128.0), 0, 255)
    got = fake_quant(x.clone().requires_grad_(), torch.tensor(0.03), torch.tensor(128.0), 0, 255)
    assert torch.isfinite(want).all() and torch.equal(got.detach(), want)
    got.sum().backward()


def test_bias_of_another_size_is_refused_before_any_copy():
    src, dst = layer(1), layer(2)
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="bias has shape"):
        dst.load_state_dict(dict(src.state_dict(), bias=torch.zeros(N + 1)))
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())


def test_from_packed_refuses_a_bias_of_another_shape_or_dtype():
    # copy_ broadcast a [1] or 0-dim bias to every output in silence; a float64 one failed at forward
    from quantkern import PackedWeight
    pw = PackedWeight.from_float(torch.randn(N, K), 4, 32)
    for b in (torch.zeros(1), torch.zeros(()), torch.zeros(1, N), torch.zeros(N, 1)):
        with pytest.raises(ValueError, match=rf"bias must have shape \({N},\)"):
            PackedLinear.from_packed(pw, b)
    with pytest.raises(TypeError, match="bias must be a float32 / float16 / bfloat16 tensor"):
        PackedLinear.from_packed(pw, torch.zeros(N, dtype=torch.float64))
    assert PackedLinear.from_packed(pw, torch.ones(N, dtype=torch.bfloat16)).bias.dtype == torch.bfloat16
