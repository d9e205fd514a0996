"""quantkern.qat attached to quantkern.nn.QuantConv2d / QuantLinear (end to end, CPU, a few seconds)."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkern import qat
from quantkern.nn import LSQQuantizer, QuantConv2d, QuantLinear, quantize_modules

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The example's --quick run takes ~10-20 s on a loaded 2-core machine: opt in.
slow = pytest.mark.skipif(os.environ.get("QUANTKERN_SLOW") != "1", reason="slow; set QUANTKERN_SLOW=1 to run")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def _model(bits=3):
    torch.manual_seed(0)
    m = quantize_modules(Net(), w_bits=bits, a_bits=8, a_init="lsq", a_learn_offset=False)
    assert isinstance(m.conv, QuantConv2d) and isinstance(m.dw, QuantConv2d) and isinstance(m.fc, QuantLinear)
    return m


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _train(model, steps, tracker=None, thr=0.0, damp=None, lam=0.0, lr=0.05):
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        if damp is not None:
            loss = loss + damp(lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tracker is not None:
            tracker.step(thr)
    return opt


def _ints(layer: qat.QLayer) -> torch.Tensor:
    w = layer.weight_view().float()
    s, b = layer.params()
    return torch.round(((w - b.view(-1, *[1] * (w.dim() - 1))) / s.view(-1, *[1] * (w.dim() - 1))).clamp(layer.qmin, layer.qmax))


def test_layers_found_with_library_quantizer_attributes():
    m = _model()
    layers = {l.name: l for l in qat.quantized_layers(m)}
    assert set(layers) == {"conv", "dw", "fc"}
    for l in layers.values():
        assert l.axis == 0 and l.group_size is None and (l.qmin, l.qmax) == (-4, 3)
        s, b = l.params()
        assert s.shape == (l.weight.shape[0],) and torch.all(s > 0) and torch.all(b == 0)
    # |scale| clamped at eps as in LSQQuantizer.forward: a negative scale reads as its magnitude
    with torch.no_grad():
        m.fc.weight_quantizer.scale.neg_()
    s, _ = layers["fc"].params()
    assert torch.all(s > 0)
    assert torch.allclose(s, m.fc.weight_quantizer.scale.detach().abs())


def test_tracking_counts_are_sane():
    m = _model()
    tracker = qat.OscillationTracker(m, momentum=0.1, max_bits=None)
    steps = 12
    _train(m, steps, tracker)
    assert tracker.steps == steps
    met = tracker.metrics(osc_freq=0.0)
    for name, l in ((l.name, l) for l in qat.quantized_layers(m)):
        c = tracker.tracked[name].counts.tolist()
        n = l.weight.numel()
        assert met[name]["numel"] == n
        assert 0 <= c[0] <= n and c[1] == 0  # no freezing with threshold 0
        assert met[name]["frozen_frac"] == 0.0
        assert 0.0 <= met[name]["frac_oscillating"] <= 1.0
        f = tracker.frequency(name)
        assert f.shape == l.weight.shape and torch.all((f >= 0) & (f <= 1))
    # lr 0.05 on 3-bit weights for 12 steps: some integers must have flipped back and forth
    assert sum(m_["frac_oscillating"] for m_ in met.values()) > 0


def test_tracker_before_first_forward_initialises_weight_quantizer():
    q = QuantLinear(8, 4, w_bits=3)  # built directly: weight quantizer not initialised yet
    assert not q.weight_quantizer._initialized
    tracker = qat.OscillationTracker(nn.Sequential(q), max_bits=None)
    tracker.step()
    assert q.weight_quantizer._initialized
    assert not torch.allclose(q.weight_quantizer.scale, torch.ones(4))  # not the placeholder 1
    # lazy (standalone) per-channel LSQQuantizer, too
    mod = nn.Module()
    mod.weight = nn.Parameter(torch.randn(4, 8))
    mod.weight_quantizer = LSQQuantizer(3, True, "channel", learn_offset=False, init="lsq+")
    loss = qat.DampeningLoss(mod)(1.0)
    assert mod.weight_quantizer.scale.shape == (4,) and torch.isfinite(loss)


def test_frozen_weights_stay_at_their_integer():
    m = _model()
    tracker = qat.OscillationTracker(m, momentum=0.2, max_bits=None)
    _train(m, 6, tracker, thr=0.0)
    # a low threshold freezes a good share of the weights
    opt = _train(m, 4, tracker, thr=0.02)
    layers = qat.quantized_layers(m)
    masks = {l.name: tracker.frozen_mask(l.name).clone() for l in layers}
    q0 = {l.name: _ints(l) for l in layers}
    assert sum(int(k.sum()) for k in masks.values()) > 0
    # keep training without new freezing (threshold tiny but >0 keeps freezing on): scales move too
    x, y = _data()
    for _ in range(5):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        for l in layers:  # gradient of frozen weights is masked
            assert torch.all(l.weight.grad[masks[l.name]] == 0)
        opt.step()
        tracker.step(1e-9)
    for l in layers:
        k = masks[l.name]
        assert torch.equal(tracker.frozen_mask(l.name)[k], k[k])  # still frozen
        assert torch.equal(_ints(l)[k], q0[l.name][k]), l.name  # same integer


def _frozen_grad_max(m, tracker):
    x, y = _data()
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    return max(float(l.weight.grad[tracker.frozen_mask(l.name)].abs().sum()) for l in qat.quantized_layers(m))


def test_grad_mask_follows_the_weight():
    # a weight frozen while requires_grad=False, and a Parameter replaced by load_state_dict(assign=True),
    # still get their frozen gradients masked
    m = _model()
    tracker = qat.OscillationTracker(m, momentum=0.2, max_bits=None)
    _train(m, 6, tracker)
    m.fc.weight.requires_grad_(False)  # when freezing starts
    _train(m, 4, tracker, thr=0.02)
    m.fc.weight.requires_grad_(True)
    tracker.step(1e-9)
    assert int(tracker.frozen_mask("fc").sum()) > 0 and _frozen_grad_max(m, tracker) == 0
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    tracker.step(1e-9)
    assert _frozen_grad_max(m, tracker) == 0
    tracker.remove_hooks()
    tracker.step(1e-9)
    assert _frozen_grad_max(m, tracker) > 0  # masking off, and it stays off


def test_tracker_refuses_tied_weights_and_replaced_layers_and_checks_checkpoints():
    m = _model()
    m.fc2 = QuantLinear(8, 4, w_bits=3)
    m.fc2.weight = m.fc.weight
    with pytest.raises(ValueError, match="share one weight"):
        qat.OscillationTracker(m, max_bits=None)
    m = _model()
    tracker = qat.OscillationTracker(m, momentum=0.2, max_bits=None)
    damp = qat.DampeningLoss(m)
    _train(m, 2, tracker)
    sd = tracker.state_dict()
    # a checkpoint saved from a DDP-wrapped model ("module." names) loads into an unwrapped tracker
    wrapped = dict(sd, layers={"module." + k: v for k, v in sd["layers"].items()})
    t2 = qat.OscillationTracker(m, momentum=0.2, max_bits=None)
    t2.load_state_dict(wrapped)
    assert torch.equal(t2.tracked["fc"].meta, tracker.tracked["fc"].meta)
    with pytest.raises(KeyError, match="not tracked here"):
        t2.load_state_dict(dict(sd, layers=dict(sd["layers"], nope=sd["layers"]["fc"])))
    with pytest.raises(ValueError, match="elements"):
        t2.load_state_dict(dict(sd, layers={"fc": {k: (v[:3] if torch.is_tensor(v) else v)
                                                   for k, v in sd["layers"]["fc"].items()}}))
    m.fc = QuantLinear(8, 4, w_bits=3)
    with pytest.raises(RuntimeError, match="replaced"):
        tracker.step()
    with pytest.raises(RuntimeError, match="replaced"):
        damp(1.0)


def test_tracker_warns_about_a_weight_tied_to_an_untracked_module():
    # an LM head tied to its embedding: freezing rewrites the shared tensor and masks the embedding's
    # gradient too (it was accepted without a word)
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(self.emb(t))

    m = quantize_modules(LM(), w_bits=2, a_bits=None)
    assert m.head.weight is m.emb.weight
    with pytest.warns(UserWarning, match=r"tied to a module that is not tracked: 'head' with 'emb.weight'"):
        qat.OscillationTracker(m)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qat.OscillationTracker(_model(), max_bits=None)  # untied: silent
        m = _model()  # a parametrization's original Parameter belongs to the layer itself: silent too
        torch.nn.utils.parametrize.register_parametrization(m.fc, "weight", nn.Identity())
        qat.OscillationTracker(m, max_bits=None)


def test_dampening_gradient_reaches_weights_only():
    m = _model()
    m(_data()[0])  # initialise the input quantizers
    damp = qat.DampeningLoss(m)
    assert float(damp(0.0)) == 0.0
    loss = damp(0.5)
    assert loss.item() > 0
    m.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in m.named_parameters():
        is_qweight = name in ("conv.weight", "dw.weight", "fc.weight")
        if is_qweight:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or torch.all(p.grad == 0), name


def test_reestimate_bn_stats_changes_stats_and_restores_momentum():
    m = _model()
    m.bn.momentum = 0.3
    _train(m, 3)
    before = (m.bn.running_mean.clone(), m.bn.running_var.clone(), int(m.bn.num_batches_tracked))
    x, _ = _data()
    loader = [(x[i:i + 16],) for i in range(0, 64, 16)]
    m.train()
    n = qat.reestimate_bn_stats(m, loader, num_batches=10)
    assert n == 4
    assert not torch.allclose(m.bn.running_mean, before[0]) and not torch.allclose(m.bn.running_var, before[1])
    assert m.bn.momentum == 0.3 and m.bn2.momentum == 0.1
    assert int(m.bn.num_batches_tracked) == before[2]
    assert m.training and all(mod.training for mod in m.modules())
    # the stats are the plain mean of the per-batch statistics of the BN input
    with torch.no_grad():
        m.eval()
        means = [m.conv(b[0]).mean((0, 2, 3)) for b in loader]
    assert torch.allclose(m.bn.running_mean, torch.stack(means).mean(0), atol=1e-5)


@slow
def test_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("oscillation_digits", ROOT / "examples" / "oscillation_digits.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    res = ex.main(["--quick", "--out", str(tmp_path)])
    assert set(res) == {(3, "lsq"), (3, "damp"), (3, "freeze")}
    for rs in res.values():
        r = rs[0]
        assert 0 <= r["acc_before"] <= 1 and 0 <= r["acc_after"] <= 1 and r["ms_step"] > 0
    assert res[(3, "freeze")][0]["frozen"] > 0 and res[(3, "lsq")][0]["frozen"] == 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "latent_w3_freeze.png").exists()


def test_reestimate_bn_stats_loader_of_dicts_needs_input_fn():
    torch.manual_seed(0)
    model = quantize_modules(Net(), w_bits=4, a_bits=8)
    xs = [torch.randn(4, 1, 8, 8) * (i + 1) for i in range(3)]
    model(xs[0])
    before = model.bn.running_mean.clone()
    # a dict batch failed with "'dict' object has no attribute 'to'"
    with pytest.raises(TypeError, match=r"dict batches \(keys \['image', 'label'\]\); pass input_fn"):
        qat.reestimate_bn_stats(model, [{"image": x, "label": 0} for x in xs])
    assert torch.equal(model.bn.running_mean, before)
    with pytest.raises(TypeError, match="input_fn must be callable"):
        qat.reestimate_bn_stats(model, xs, input_fn="image")
    n = qat.reestimate_bn_stats(model, [{"image": x, "label": 0} for x in xs], input_fn=lambda b: b["image"])
    ref = quantize_modules(Net(), w_bits=4, a_bits=8)
    ref.load_state_dict(model.state_dict())
    assert n == qat.reestimate_bn_stats(ref, [(x, 0) for x in xs]) == 3  # same as a loader of tuples
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(model.bn2.running_var, ref.bn2.running_var)
    assert model.bn.momentum == 0.1 and model.bn.training  # restored
