"""Edge cases of quantkern.ptq.conv.fake_quantize_model_: failures leave the model as it was (or say
what was written), keyword calls, inference mode, fp16 distillation, parametrized weights, ERQ's Aqer
against installed quantizers, AdaRound's defaults, and the small warnings."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkern.ptq import rtn_quantize
from quantkern.ptq.conv import fake_quantize_model_, gptq_depthwise, remove_act_quantizers

torch.set_num_threads(1)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pw1 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False)
        self.pw2 = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        return x + self.pw2(F.relu6(self.dw(F.relu6(self.bn1(self.pw1(x))))))


class _Net(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_Block(c), _Block(c))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    m = _Net().eval()
    with torch.no_grad():
        m.fc.weight.mul_(10)
    return m


def _x(n=8, hw=16, seed=1):
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


class _MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc(t.mean(1))


@pytest.mark.parametrize("kw", [dict(calib_data=torch.randn(4, 5, 16, 16)),
                                dict(calib_data=torch.randn(4, 3, 16, 16), skip=["nope"]),
                                dict(calib_data=torch.randn(4, 3, 16, 16), layer_bits={"nope": 4})])
def test_bad_arguments_leave_attention_modules_alone(kw):
    # expose_linears ran before the checks: a failing call had already unfused nn.MultiheadAttention
    torch.manual_seed(0)
    m = _MHANet().eval()
    s0 = _state(m)
    with pytest.raises((ValueError, RuntimeError)):
        fake_quantize_model_(m, 4, "gptq", progress=False, **kw)
    assert type(m.attn) is nn.MultiheadAttention and _same(s0, _state(m))


def test_names_of_the_unfused_projections_are_accepted():
    torch.manual_seed(0)
    m = _MHANet().eval()
    rep = fake_quantize_model_(m, 4, "gptq", calib_data=torch.randn(4, 3, 16, 16), progress=False,
                               skip=["attn.k_proj"], layer_bits={"attn.q_proj": 8})
    assert "attn.q_proj" in rep["layers"] and "attn.k_proj" not in rep["layers"]


class _KwNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(input=torch.relu(self.a(x)))


@pytest.mark.parametrize("kw", [dict(method="gptq"), dict(method="erq"), dict(method="hqq", act_bits=4),
                                dict(method="hqq", bias_correction=True)])
def test_layer_called_by_keyword(kw):
    torch.manual_seed(0)
    m = _KwNet()
    x = torch.randn(16, 8)
    rep = fake_quantize_model_(m, calib_data=x, progress=False, **kw)
    assert rep["layers"] == ["a", "b"] and not rep["notes"]
    if "act_bits" in kw:  # the quantizer acts on the keyword input too
        y = m(x)
        remove_act_quantizers(m)
        assert not torch.equal(y, m(x))


class _Flaky(nn.Module):
    def __init__(self, fail_at):
        super().__init__()
        self.n, self.k, self.fail_at = _net(), 0, fail_at

    def forward(self, x):
        self.k += 1
        if self.k == self.fail_at:
            raise RuntimeError(f"boom on call {self.k}")
        return self.n(x)


def test_failed_activation_calibration_removes_its_quantizers():
    x = _x(16)
    m = _Flaky(4)  # 1: check, 2-3: sign pass, 4: the calibration pass
    with pytest.raises(RuntimeError, match="boom"):
        fake_quantize_model_(m, None, act_bits=8, calib_data=x, batch_size=8, progress=False)
    assert not any(hasattr(mm, "input_quantizer") or mm._forward_pre_hooks for mm in m.modules())
    # quantizers of an earlier call are given back
    m = _Flaky(-1)
    fake_quantize_model_(m, None, act_bits=8, calib_data=x, batch_size=8, progress=False)
    with torch.no_grad():
        y = m(x)
    m.k, m.fail_at = 0, 4
    with pytest.raises(RuntimeError, match="boom"):
        fake_quantize_model_(m, None, act_bits=4, calib_data=x, batch_size=8, progress=False)
    m.fail_at = -1
    with torch.no_grad():
        assert torch.equal(m(x), y)
    assert all(q.input_quantizer.num_bits == 8 for q in m.modules() if hasattr(q, "input_quantizer"))


@pytest.mark.parametrize("value,method,match", [(float("nan"), "gptq", "NaN or Inf"), (float("inf"), "hqq", "NaN or Inf"),
                                                (1e38, "hqq", "overflows")])
def test_bad_weights_are_refused_before_anything_changes(value, method, match):
    m = _net()
    with torch.no_grad():
        m.fc.weight[0, 0] = value
    s0 = _state(m)
    with pytest.raises(ValueError, match=match) as e:
        fake_quantize_model_(m, 4, method, calib_data=_x(4), progress=False)
    assert "'fc'" in str(e.value)
    assert _same(s0, _state(m))


def test_failure_mid_way_names_the_layer():
    m = _net()
    with pytest.raises(RuntimeError, match=r"layer 'fc' \(8 of 8\).*positive definite.*already quantized") as e:
        fake_quantize_model_(m, 4, "gptq", calib_data=_x(1), damp=0.0, progress=False)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_distillation_needs_one_batch_shape_up_front():
    m = _net()
    s0 = _state(m)
    with pytest.raises(ValueError, match="one shape"):
        fake_quantize_model_(m, 4, "hqq", calib_data=[_x(4), _x(4, hw=24)], distill_steps=2, progress=False)
    assert _same(s0, _state(m))


@pytest.mark.parametrize("kw", [dict(method="adaround", adaround_iters=5), dict(method="hqq", distill_steps=3,
                                                                               distill_bias=True),
                                dict(method="hqq", bias_correction=True), dict(method="erq")])
def test_runs_under_inference_mode(kw):
    m = _net()
    x = _x(8)
    with torch.inference_mode():
        fake_quantize_model_(m, 4, calib_data=x, progress=False, **kw)
    assert not any(p.is_inference() for p in m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).sum().backward()
    opt.step()


def test_warnings_point_at_the_caller():
    m = nn.Sequential(nn.Linear(97, 10), nn.ReLU(), nn.Linear(10, 3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fake_quantize_model_(m, 2, "rtn", 64, progress=False, distill_bias=True, skip=["2"], layer_bits={"2": 4})
    msgs = [str(w.message) for w in rec]
    assert any("tiny groups" in s and "'0' (K=97: g1)" in s for s in msgs), msgs
    assert any("distill_bias=True does nothing" in s for s in msgs), msgs
    assert any("layer_bits names layer(s) that stay in float" in s for s in msgs), msgs
    assert all(w.filename == __file__ for w in rec), [(w.filename, str(w.message)[:40]) for w in rec]


def test_fp16_distillation_of_biases_stays_finite():
    m = _net().half()
    x = _x(8).half()
    rep = fake_quantize_model_(m, 4, "hqq", calib_data=x, progress=False, distill_steps=5, distill_bias=True,
                               distill_batch=4)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(p.grad is None for p in m.parameters())  # (no gradients left behind)
    assert rep["distill"]["loss_last"] == rep["distill"]["loss_last"]  # not NaN


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrized_weights_stay_float_with_a_note(wrap):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if wrap == "old_weight_norm":
            conv = nn.utils.weight_norm(conv)
        else:
            conv = getattr(nn.utils.parametrizations, wrap)(conv)
    m = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    x = torch.randn(8, 3, 8, 8)
    b0 = m[0].bias.detach().clone()
    with pytest.warns(UserWarning, match="stay in float, their weight is computed"):
        rep = fake_quantize_model_(m, 2, "hqq", calib_data=x, progress=False, bias_correction=True, distill_steps=2)
    assert rep["layers"] == ["3"] and rep["notes"]["0"].startswith("not quantized: its weight is")
    assert torch.equal(m[0].bias, b0)
    assert torch.unique(m[3].weight.detach().reshape(4, -1)[0][:64]).numel() <= 4  # the Linear is W2


def test_erq_aqer_sees_the_float_input_of_installed_quantizers(monkeypatch):
    import quantkern.ptq.conv as conv

    seen = []
    orig = conv.erq_quantize

    def spy(W, b, X, bits, g, act_quant=None, use_aqer=True, **kw):
        seen.append((use_aqer, float((act_quant(X) - X).abs().max())))
        return orig(W, b, X, bits, g, act_quant=act_quant, use_aqer=use_aqer, **kw)

    monkeypatch.setattr(conv, "erq_quantize", spy)
    m = _net()
    x = _x(8)
    fake_quantize_model_(m, None, act_bits=4, calib_data=x, progress=False)
    fake_quantize_model_(m, 4, "erq", calib_data=x, progress=False)
    assert seen and all(u and d > 0 for u, d in seen), seen


def test_adaround_defaults_beat_round_to_nearest():
    m = _net()
    x = _x(16)
    ref = m(x).detach()
    r0 = copy.deepcopy(m)
    fake_quantize_model_(r0, 3, "rtn", progress=False)
    ra = copy.deepcopy(m)
    rep = fake_quantize_model_(ra, 3, "adaround", calib_data=x, progress=False, return_qparams=True)
    q_rtn = {n: rtn_quantize(mm.weight.detach().reshape(mm.weight.shape[0], -1), 3,
                             rep["group_sizes"][n], warn=False)[0] for n, mm in m.named_modules() if n in rep["layers"]}
    assert sum(int((rep["qparams"][n][0] != q_rtn[n]).sum()) for n in q_rtn) > 20  # (was ~0: RTN in effect)
    with torch.no_grad():
        assert (ra(x) - ref).pow(2).mean() < (r0(x) - ref).pow(2).mean()


def test_model_with_activation_quantizers_pickles():
    m = _net()
    x = _x(8)
    fake_quantize_model_(m, 4, "hqq", act_bits=8, calib_data=x, progress=False)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_hqq_with_bias_correction_keeps_hqq_for_a_layer_without_input():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.aux = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    m = WithAux()
    a = copy.deepcopy(m)
    fake_quantize_model_(a, 3, "hqq", 8, progress=False)
    with pytest.warns(UserWarning, match="no bias correction for it"):
        rep = fake_quantize_model_(m, 3, "hqq", 8, calib_data=torch.randn(16, 8), bias_correction=True, progress=False)
    assert torch.equal(m.aux.weight, a.aux.weight) and rep["notes"]["aux"] == "no calibration input: no bias correction"


def test_gptq_depthwise_refuses_a_non_symmetric_hessian():
    W = torch.randn(4, 9)
    X = torch.randn(4, 50, 9)
    H = X.transpose(1, 2) @ X
    gptq_depthwise(W, H, 4, 9)
    H[0, 0, 1] += 10.0
    with pytest.raises(ValueError, match="symmetric"):
        gptq_depthwise(W, H, 4, 9)


def test_inference_mode_with_attention_modules():
    # the projections expose_linears created under the caller's inference_mode were inference tensors
    m = _MHANet().eval()
    with torch.inference_mode():
        rep = fake_quantize_model_(m, 4, "gptq", 16, calib_data=torch.randn(4, 3, 16, 16), progress=False)
    assert "attn.q_proj" in rep["layers"]
    assert not any(p.is_inference() for p in m.parameters())


def test_nan_in_attention_weights_is_found_before_unfusing():
    m = _MHANet().eval()
    with torch.no_grad():
        m.attn.in_proj_weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'attn': its in_proj_weight contains NaN"):
        fake_quantize_model_(m, 4, "rtn", 16, progress=False)
    assert type(m.attn) is nn.MultiheadAttention


class _TwoExperts(nn.Module):
    """Expert e1 gets the tokens with x[:, 0] > 100: none of the calibration data."""

    def __init__(self):
        super().__init__()
        self.e0, self.e1, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        sel = x[:, 0] > 100
        y = torch.zeros_like(x)
        y[~sel] = self.e0(x[~sel])
        y[sel] = self.e1(x[sel])
        return self.head(y)


def test_layer_with_only_empty_batches_gets_a_dynamic_input_quantizer():
    torch.manual_seed(0)
    m = _TwoExperts().eval()
    with pytest.warns(UserWarning, match="'e1' saw no calibration input"):
        rep = fake_quantize_model_(m, None, act_bits=8, calib_data=torch.randn(64, 32), progress=False)
    assert rep["notes"] == {"e1": "no calibration input: dynamic input quantizer"}


def test_activation_only_call_reaches_layers_with_computed_weights():
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), parametrizations.weight_norm(nn.Linear(16, 4))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "stays in float" warning: no weight is quantized)
        fake_quantize_model_(m, None, act_bits=8, calib_data=torch.randn(8, 16), progress=False)
    assert hasattr(m[0], "input_quantizer") and hasattr(m[2], "input_quantizer")


def test_failed_distillation_gives_the_quantized_model_back():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 10)
            self.calls, self.fail_after = 0, None

        def forward(self, x):
            if torch.is_grad_enabled():
                self.calls += 1
                if self.fail_after is not None and self.calls > self.fail_after:
                    raise RuntimeError("boom")
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    X = torch.randn(32, 32)
    ref = Flaky().eval()
    m = copy.deepcopy(ref)
    fake_quantize_model_(ref, 4, "rtn", 32, calib_data=X, progress=False)
    m.fail_after = 5
    with pytest.raises(RuntimeError, match="boom"):
        fake_quantize_model_(m, 4, "rtn", 32, calib_data=X, progress=False, distill_steps=20, distill_lr=1e-2,
                             distill_bias=True)
    assert _same(_state(m), _state(ref))


class _PadsInForward(nn.Conv2d):
    """Pads inside forward (as Conv2dDynamicSamePadding / timm's Conv2dSame): conv.padding stays 0."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("kw", [{"method": "gptq"}, {"method": "rtn", "bias_correction": True}])
def test_conv_that_pads_in_its_forward_is_refused_by_the_data_methods(kw):
    torch.manual_seed(0)
    m = nn.Sequential(_PadsInForward(4, 8, 3)).eval()
    before = copy.deepcopy(m.state_dict())
    method = kw.pop("method")
    with pytest.raises(NotImplementedError, match="layer '0'.*overrides Conv2d.forward"):
        fake_quantize_model_(m, 4, method, 64, calib_data=torch.randn(4, 4, 8, 8), progress=False, **kw)
    assert _same(m.state_dict(), before)
    fake_quantize_model_(m, 4, "rtn", 64, progress=False)  # no data: quantized as any conv


def test_skipping_an_attention_module_by_name_keeps_its_out_proj():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.head = nn.Linear(8, 16), nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0]).mean(1)

    torch.manual_seed(0)
    m = M().eval()
    attn = copy.deepcopy(m.attn.state_dict())
    rep = fake_quantize_model_(m, 4, "gptq", 64, calib_data=torch.randn(8, 5, 8), skip=["attn"], act_bits=8,
                               progress=False)
    assert rep["layers"] == ["inp", "head"] and not rep["notes"]
    assert _same(m.attn.state_dict(), attn) and not hasattr(m.attn.out_proj, "input_quantizer")


@pytest.mark.parametrize("kw", [{"distill_steps": 2}, {"clip": "mse"}])
def test_qparams_keep_uint8_codes(kw):
    # (RTN with clip="mse" returned float32 codes, the other methods uint8 as documented)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    rep = fake_quantize_model_(m, 4, "rtn", 16, calib_data=torch.randn(16, 16), return_qparams=True,
                               progress=False, **kw)
    for name, (q, s, z) in rep["qparams"].items():
        assert q.dtype == torch.uint8
        W = dict(m.named_modules())[name].weight
        assert torch.equal(((q.float() - z.repeat_interleave(16, 1)) * s.repeat_interleave(16, 1)), W)


def test_activation_only_call_refuses_weight_options_and_reports_block_lists():
    m = nn.Sequential(nn.Linear(16, 8)).eval()
    X = torch.randn(8, 16)
    for kw in ({"bias_correction": True}, {"depthwise_method": "hqq"}):
        with pytest.raises(ValueError, match="not weight_bits=None"):
            fake_quantize_model_(m, None, act_bits=8, calib_data=X, progress=False, **kw)
    assert fake_quantize_model_(m, None, act_bits=8, calib_data=X, progress=False)["block_lists"] == ()


def test_integer_calibration_tensor_passes_through_like_integer_batches():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8)).eval()
    ids = torch.randint(0, 50, (8, 5))
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    fake_quantize_model_(a, 4, "gptq", 16, calib_data=ids, progress=False)
    fake_quantize_model_(b, 4, "gptq", 16, calib_data=[ids[:4], ids[4:]], batch_size=4, progress=False)
    assert _same(a.state_dict(), b.state_dict())


def test_distillation_with_every_layer_skipped_warns_and_does_nothing():
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    before = copy.deepcopy(m.state_dict())
    with pytest.warns(UserWarning, match="nothing to distill"):
        fake_quantize_model_(m, 4, "hqq", calib_data=torch.randn(8, 16), skip=["0", "2"], distill_steps=3,
                             progress=False)
    assert _same(m.state_dict(), before)
