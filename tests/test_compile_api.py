"""The public API under ``torch.compile(fullgraph=True)``: ops, nn modules, PTQ quantizers, converted
models and the QAT pieces of a training step, each compared with eager (forward, backward where it is
differentiable, and a second batch size where shapes vary).

Backends: graphs made only of quantkern's custom ops compile in well under a second with inductor,
so those run on inductor (bit-exact: the ops run the same kernels). Module and model graphs hold
many pointwise ops, for which inductor takes 3-15 s each on 2 cores and generates its own fused
arithmetic (last-bit differences in e.g. GELU / LayerNorm, which can flip a rounding in a fake
quantizer downstream); they run on ``aot_eager``, which traces the same graph (dynamo + AOT
autograd, the part that breaks on data-dependent code) and must equal eager bit for bit. One
inductor case per kind of module checks the generated code too, with a tolerance.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

import quantkern
from quantkern import ops, qat
from quantkern.nn import (LSQQuantizer, MultiheadAttention, PackedLinear, QuantConv2d, QuantLinear, quantize_modules,
                          replace_linear)
from quantkern.ptq.calibrate import ActQuantizer, fake_quant, fake_quant_dynamic, fake_quant_static


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _counting(backend):
    """(backend, counter): the backend, counting the graphs it compiles (recompiles included)."""
    inner, cnt = lookup_backend(backend), {"graphs": 0}

    def be(gm, example_inputs):
        cnt["graphs"] += 1
        return inner(gm, example_inputs)

    return be, cnt


def _run(f, args, grads):
    for t in grads:
        t.grad = None
    out = f(*args)
    gs = []
    if grads:
        o = out[0] if isinstance(out, tuple) else out
        w = torch.linspace(-1, 1, o.numel()).reshape(o.shape)  # not .sum(): after a LayerNorm its gradient is ~0
        (o.float() * w).sum().backward()
        gs = [None if t.grad is None else t.grad.clone() for t in grads]
    return out, gs


def _same(got, want, exact, what):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, exact, f"{what}[{i}]")
    elif want is None:
        assert got is None, what
    elif exact:
        assert torch.equal(got, want), f"{what}: max diff {(got.float() - want.float()).abs().max()}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def check(f, args, grads=(), more=None, backend="aot_eager", exact=True, max_graphs=2):
    """torch.compile(f, fullgraph=True) equals f on ``args`` (outputs, and the gradients of ``grads``
    after a backward), then on ``more`` (other shapes) with at most ``max_graphs`` graphs in all."""
    be, cnt = _counting(backend)
    cf = torch.compile(f, fullgraph=True, backend=be)
    for a in [args] + ([more] if more is not None else []):
        want, gw = _run(f, a, grads)
        got, gc = _run(cf, a, grads)
        _same(got, want, exact, "forward")
        _same(gc, gw, exact, "gradients")
    assert cnt["graphs"] <= max_graphs, f"{cnt['graphs']} graphs"
    return cnt["graphs"]


def _rg(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


# ---------------------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("kind", ["tensor", "channel", "group", "bf16_no_offset"])
def test_fake_quant_lsq_op(kind):
    torch.manual_seed(0)
    x = _rg(8, 64)
    if kind == "tensor":
        s, b = torch.tensor([0.1], requires_grad=True), torch.zeros(1, requires_grad=True)
        kw = {}
    elif kind == "channel":
        s, b = torch.full((64,), 0.1, requires_grad=True), torch.zeros(64, requires_grad=True)
        kw = {"axis": -1}
    elif kind == "group":
        s, b = torch.full((8, 2), 0.1, requires_grad=True), torch.zeros(8, 2, requires_grad=True)
        kw = {"group_size": 32}
    else:
        x = _rg(8, 64, dtype=torch.bfloat16)
        s, b = torch.tensor([0.1], requires_grad=True), None
        kw = {}
    args = (x, s) if b is None else (x, s, b)
    more = None if kind in ("group", "bf16_no_offset") else (_rg(5, 64), s, b)

    def f(x, s, b=None):
        return ops.fake_quant_lsq(x, s, b, -8, 7, grad_scale=0.1, **kw)

    # (bf16: aot_eager; inductor's first bf16 graph takes ~15 s to build here)
    check(f, args, [t for t in args if t is not None], more, backend="aot_eager" if kind == "bf16_no_offset" else "inductor")


def test_oscillation_update_op_in_place():
    torch.manual_seed(0)
    w, s = torch.randn(8, 64), torch.full((8,), 0.1)

    def f(w, meta, ema):
        return ops.oscillation_update(w, s, None, meta, ema, -8, 7, axis=0, momentum=0.3, freeze_threshold=0.05)

    eager = [w.clone(), *ops.oscillation_init_state(w, s, None, -8, 7, axis=0)]
    comp = [t.clone() for t in eager]
    cf = torch.compile(f, fullgraph=True)
    for _ in range(4):
        d = 0.1 * torch.randn(8, 64)
        eager[0] += d
        comp[0] += d
        counts = f(*eager)
        assert torch.equal(cf(*comp), counts)
    assert int(counts[1]) > 0  # something froze
    for a, b in zip(comp, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("group", [False, True])
def test_dampening_loss_op(group):
    torch.manual_seed(0)
    w = _rg(8, 64)
    s, kw = (torch.full((8, 2), 0.1), {"group_size": 32}) if group else (torch.full((8,), 0.1), {"axis": 0})
    check(lambda w: ops.dampening_loss(w, s, None, -8, 7, norm=0.5, **kw), (w,), (w,), backend="inductor", exact=False)


def test_packed_ops_and_weights_built_inside_compile():
    torch.manual_seed(0)
    pw3 = quantkern.PackedWeight.from_float(torch.randn(24, 64), 3, 32)
    check(lambda: ops.dequantize(pw3), (), backend="inductor")
    check(lambda: quantkern.dequantize(pw3, torch.float32), (), backend="inductor")
    q = torch.randint(0, 4, (24, 64), dtype=torch.uint8)
    check(lambda q: ops.unpack(ops.pack(q, 2), 2, q.shape[1]), (q,), more=(q[:7, :32],), backend="inductor")
    # a PackedWeight built in the compiled region (PackedLinear.packed_weight / .dequantize() do): its
    # finite-metadata check read the data, a data-dependent branch that failed fullgraph=True
    pl = PackedLinear.from_linear(nn.Linear(64, 24), bits=4, group_size=32)
    x = _rg(3, 64)
    check(lambda: pl.dequantize(), (), backend="inductor")
    check(lambda x: quantkern.packed_linear(x, pl.packed_weight, pl.bias), (x,), (x, pl.bias), (_rg(6, 64),),
          backend="inductor")
    # eager keeps the check
    with pytest.raises(ValueError, match="scales contain NaN"):
        quantkern.PackedWeight(pl.qweight, torch.full_like(pl.scales, float("nan")), pl.zeros, 4, 32, (24, 64))


def test_calib_ops():
    def f(x):
        C = x.shape[0]
        pos = torch.zeros(C, 256, dtype=torch.int64)
        neg = torch.zeros_like(pos)
        R, n = x.abs().amax(1), torch.full((C,), 256, dtype=torch.int64)
        ops.calib_histogram(x, pos, neg, R, n)
        return ops.calib_search(pos, neg, (R / 256).double(), n, "mse", 8, stride=4, start_bin=16)

    torch.manual_seed(0)
    check(f, (torch.randn(3, 1000),), more=(torch.randn(4, 500),), backend="inductor")


# ---------------------------------------------------------------------------------------------- QAT modules
@pytest.mark.parametrize("gran", ["tensor", "channel", "group", "channel4d"])
def test_lsq_quantizer(gran):
    torch.manual_seed(0)
    shape = (2, 3, 4, 4) if gran == "channel4d" else (6, 32)
    kw = {"group_size": 16} if gran == "group" else {"axis": 1} if gran != "tensor" else {}
    q = LSQQuantizer(4, True, "channel" if gran == "channel4d" else gran, **kw)
    x = _rg(*shape)
    q(x.detach())  # the data-dependent init runs eagerly first (README)
    more = (_rg(9, *shape[1:]),) if gran in ("tensor", "channel") else None
    check(q, (x,), (x, q.scale, q.offset), more)


def test_lsq_quantizer_uninitialised_says_what_to_do():
    # the data-dependent init cannot be traced; dynamo's own hint ("remove the torch.compiler.disable
    # call") misled: the error now says to run one eager forward first
    q = LSQQuantizer(4, True, "tensor")
    with pytest.raises(Exception, match="run one eager forward"):
        torch.compile(q, fullgraph=True, backend="eager")(torch.randn(6, 32))


def test_lsq_fixed_grad_scale_compiles_once_over_batch_sizes():
    torch.manual_seed(0)
    q = LSQQuantizer(8, False, "tensor", grad_scale=0.01)
    q(torch.randn(6, 32))
    be, cnt = _counting("aot_eager")
    cf = torch.compile(q, fullgraph=True, backend=be)
    for b in (3, 4, 5, 6):
        x = torch.randn(b, 32)
        assert torch.equal(cf(x), q(x))
    assert cnt["graphs"] == 2  # the first size, then one dynamic graph


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_quant_linear(backend):
    torch.manual_seed(0)
    ql = QuantLinear.from_float(nn.Linear(32, 16), w_bits=4, a_bits=8, a_grad_scale=0.05)
    x = _rg(5, 32)
    ql(x.detach())
    grads = (x, ql.weight, ql.bias, ql.weight_quantizer.scale, ql.input_quantizer.scale, ql.input_quantizer.offset)
    check(ql, (x,), grads, (_rg(9, 32),), backend=backend, exact=backend == "aot_eager")
    qg = QuantLinear.from_float(nn.Linear(32, 16), w_bits=3, a_bits=None, w_granularity="group", w_group_size=16)
    if backend == "aot_eager":
        check(qg, (x,), (x, qg.weight, qg.weight_quantizer.scale))


def test_quant_conv2d():
    torch.manual_seed(0)
    qc = QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), w_bits=4, a_bits=8, a_grad_scale=0.01)
    x = _rg(2, 3, 8, 8)
    qc(x.detach())
    check(qc, (x,), (x, qc.weight, qc.weight_quantizer.scale, qc.input_quantizer.scale), (_rg(3, 3, 8, 8),))
    qu = QuantConv2d.from_float(nn.Conv2d(3, 8, 3), w_bits=4, a_bits=8, a_granularity="channel")
    xu = _rg(3, 8, 8)
    qu(xu.detach())  # unbatched, per-channel input quantizer
    check(qu, (xu,), (xu, qu.input_quantizer.scale))


def test_quantize_modules_training_forward_backward():
    torch.manual_seed(0)
    m = quantize_modules(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)),
                         w_bits=4, a_bits=8)
    x = torch.randn(2, 3, 8, 8)
    m(x)
    check(m, (x,), tuple(m.parameters()))


# ---------------------------------------------------------------------------------------------- packed
@pytest.mark.parametrize("sym,dyn", [(False, False), (True, False), (True, True), (False, True)])
def test_packed_linear_with_input_quantizer_backward_and_batch_sizes(sym, dyn):
    torch.manual_seed(0)
    p = PackedLinear.from_linear(nn.Linear(64, 24), bits=4, group_size=32)
    p.set_input_quantizer(8, sym, dyn, None if dyn else 0.02, None if dyn else (0.0 if sym else 128.0))
    x = _rg(3, 64)
    check(p, (x,), (x, p.bias), (_rg(2, 7, 64),))


def test_replace_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 8))
    replace_linear(model, bits=4, group_size=32, skip=())
    x = _rg(3, 64)
    check(model, (x,), (x,), (_rg(5, 64),))
    with torch.inference_mode():
        assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(x.detach()), model(x.detach()))
    model.to(torch.bfloat16)
    xb = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(xb), model(xb))


# ---------------------------------------------------------------------------------------------- attention
E, H = 32, 4


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_weights(batch_first):
    torch.manual_seed(0)
    m = MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, batch_first=batch_first)).eval()
    q = _rg(2, 5, E) if batch_first else _rg(5, 2, E)
    check(lambda t: m(t, t, t), (q,), (q, *m.parameters()))
    check(lambda t: m(t, t, t), (q[0].detach().requires_grad_(),), (q,))  # unbatched (batch_first: [5, E])


def test_multihead_attention_masks_kdim_bias_kv_zero_attn():
    torch.manual_seed(0)
    m = MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True,
                                                            add_zero_attn=True, kdim=16, vdim=24)).eval()
    q, k, v = _rg(2, 5, E), torch.randn(2, 7, 16), torch.randn(2, 7, 24)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    am = torch.triu(torch.full((5, 7), float("-inf")), 1)
    for nw in (False, True):
        # (need_weights=False: SDPA's CPU backward sums in an order that follows the incoming gradient's
        # strides, which aot_eager lays out otherwise than eager autograd for torch's [L, B, E] output
        # layout, the module's since it matches torch's: gradients equal to ~1 ulp, outputs to the bit)
        check(lambda q, k, v: m(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=nw,
                                average_attn_weights=False), (q, k, v), (q, *m.parameters()), exact=nw)
    mm = MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, batch_first=True)).eval()
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    check(lambda t: mm(t, t, t, attn_mask=causal, is_causal=True, need_weights=False)[0], (q,), (q,))


def test_multihead_attention_inductor_and_sequence_lengths():
    torch.manual_seed(0)
    m = MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, batch_first=True)).eval()
    # a second sequence length and the backward: aot_eager (inductor's graph for each takes ~5-8 s more here)
    q = _rg(2, 5, E)
    check(lambda t: m(t, t, t)[0], (q,), (q, *m.parameters()), (_rg(3, 9, E),))
    check(lambda t: m(t, t, t)[0], (torch.randn(2, 5, E),), backend="inductor", exact=False)


def test_encoder_with_packed_attention():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    replace_linear(enc, bits=4, group_size=32, skip=())  # self_attn becomes a MultiheadAttention of PackedLinears
    x = _rg(2, 5, E)
    check(enc, (x,), (x,), (_rg(3, 4, E),))


def test_encoder_qat_training_forward_backward():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=False)
    quantize_modules(enc, w_bits=4, a_bits=8)
    x = _rg(2, 5, E)
    enc(x.detach())
    check(enc, (x,), (x, *enc.parameters()))


# ---------------------------------------------------------------------------------------------- PTQ
@pytest.mark.parametrize("kw", [{"dynamic": True, "axis": 0}, {"dynamic": True, "symmetric": False},
                                {"dynamic": True, "unsigned": True}, {"method": "entropy"}, {"unsigned": True},
                                {"axis": 1, "symmetric": False}])
def test_act_quantizer_backward_and_batch_sizes(kw):
    torch.manual_seed(0)
    kw = dict(kw)
    if kw.get("dynamic"):
        aq = ActQuantizer(8, **kw)
    else:
        aq = ActQuantizer.from_data(torch.randn(64, 16), 8, kw.pop("method", "max"), **kw)
    check(aq, (_rg(6, 16),), (), (_rg(3, 16),))
    x = _rg(6, 16)
    check(aq, (x,), (x,))


def test_fake_quant_functions():
    torch.manual_seed(0)
    x = _rg(6, 16)
    amax, amin = torch.rand(16) + 1, -torch.rand(16)
    check(lambda x: fake_quant(x, torch.tensor(0.05), torch.tensor(3.0), 0, 255), (x,), (x,))
    check(lambda x: fake_quant(x, 0.05, 0, -128, 127), (x,), (x,))
    check(lambda x: fake_quant_static(x, amax, 8, amin=amin, axis=1, symmetric=False), (x,), (x,))
    check(lambda x: fake_quant_dynamic(x, 4, axis=0, symmetric=False), (x,), (x,), (_rg(3, 16),))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("kw", [{}, {"act_bits": 8}, {"act_bits": 8, "act_dynamic": True},
                                {"act_bits": 8, "act_symmetric": True, "act_method": "entropy"}])
def test_quantize_rtn_model(kw):
    m = _mlp()
    calib = [torch.randn(16, 64) for _ in range(2)]
    cfg = quantkern.QuantizeConfig(method="rtn", bits=4, group_size=32, skip=(), **kw)
    quantkern.quantize_(m, cfg, calib_fn=[lambda mm, b=b: mm(b) for b in calib], progress=False)
    check(m, (_rg(3, 64),), (), (_rg(5, 64),))
    x = _rg(3, 64)
    check(m, (x,), (x,))


def test_quantize_encoder_with_static_act_bits():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=False).eval()
    calib = [torch.randn(2, 5, E) for _ in range(2)]
    cfg = quantkern.QuantizeConfig(method="rtn", bits=4, group_size=32, skip=(), act_bits=8)
    quantkern.quantize_(enc, cfg, calib_fn=[lambda mm, b=b: mm(b) for b in calib], progress=False)
    check(enc, (torch.randn(2, 5, E),), (), (torch.randn(3, 4, E),))


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_fake_quantize_model_with_act_bits(method):
    from quantkern.ptq.conv import fake_quantize_model_

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                      nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small layers: group-size notes
        fake_quantize_model_(m, 4, method, 64, act_bits=8, act_method="max", calib_data=torch.randn(8, 3, 8, 8),
                             progress=False)
    x = _rg(2, 3, 8, 8)
    check(m, (x,), (x,), (_rg(3, 3, 8, 8),))


# ---------------------------------------------------------------------------------------------- QAT step
def _qat_model():
    torch.manual_seed(0)
    m = quantize_modules(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), w_bits=3, a_bits=8,
                         a_grad_scale=0.05)
    m(torch.randn(8, 16))
    return m


@pytest.mark.parametrize("frozen_grad,compile_tracker", [("grid", False), ("official", False), ("grid", True),
                                                         ("official", True)])
def test_qat_training_step(frozen_grad, compile_tracker):
    """A compiled loss (model + DampeningLoss with a scheduled lambda) and OscillationTracker built before
    compiling (its hooks: the gradient masks, and frozen_grad="official"'s forward hooks); the tracker's
    step() compiled too after one eager step. Same losses, gradients, counts and weights as eager.
    The lambda changes every step: from its second value dynamo makes it a symbolic float, on which
    the lambda check's math.isfinite failed fullgraph=True; tracker.step compared data pointers and read
    hook handles, which dynamo cannot trace."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(5)]
    rec = {}
    for mode in ("eager", "compiled"):
        m = _qat_model()
        tracker = qat.OscillationTracker(m, momentum=0.3, frozen_grad=frozen_grad)
        damp = qat.DampeningLoss(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)

        def loss_fn(x, y, lam):
            return F.cross_entropy(m(x), y) + damp(weighting=lam)

        f = torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if mode == "compiled" else loss_fn
        tstep = torch.compile(tracker.step, fullgraph=True, backend="aot_eager") if compile_tracker else tracker.step
        out = []
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = f(x, y, 0.01 * (i + 1))
            loss.backward()
            opt.step()
            th = 0.02 + 0.001 * i if i else 0.0
            counts = (tstep if mode == "compiled" and i >= 1 else tracker.step)(freeze_threshold=th)
            out += [loss.detach(), *[p.grad.clone() for p in m.parameters()], *counts.values()]
        out += [p.detach().clone() for p in m.parameters()]
        assert sum(int(c[1]) for c in counts.values()) > 0  # something froze
        rec[mode] = out
    for i, (a, b) in enumerate(zip(rec["compiled"], rec["eager"])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda s: f"item {i}: {s}")


def test_dampening_loss_scheduled_lambda_does_not_recompile_per_value():
    m = _qat_model()
    damp = qat.DampeningLoss(m)
    be, cnt = _counting("aot_eager")
    f = torch.compile(lambda lam: damp(weighting=lam), fullgraph=True, backend=be)
    for lam in (0.01, 0.02, 0.0):  # the first value, then a symbolic one, and lambda == 0 (no loss)
        torch.testing.assert_close(f(lam), damp(weighting=lam), rtol=1e-6, atol=0)
    n = cnt["graphs"]
    for lam in (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.11):  # past the recompile limit of 8
        torch.testing.assert_close(f(lam), damp(weighting=lam), rtol=1e-6, atol=0)
    assert cnt["graphs"] == n
    with pytest.raises(ValueError, match="weighting must be a finite number >= 0"):
        damp(weighting=float("inf"))  # eager keeps the check
