"""quantkern.ptq.synthesize: calibration inputs matched to a model's BatchNorm statistics."""
import copy

import pytest
import torch
from torch import nn

from quantkern.ptq import bn_statistics_loss, synthesize_inputs
from quantkern.ptq.conv import fake_quantize_model_


def _bn_net():
    """conv-BN-ReLU6, depthwise conv-BN-ReLU6, pool, Linear-BN1d, Linear; running statistics from
    train-mode passes over shifted, scaled data (so that noise does not already match them)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12), nn.BatchNorm1d(12), nn.Linear(12, 5))
    net.train()
    with torch.no_grad():
        for _ in range(20):
            # a "data set" with a colour cast and a spatial structure
            x = 0.3 * torch.randn(16, 3, 12, 12) + torch.tensor([0.4, -0.2, 0.1]).view(1, 3, 1, 1)
            x = x + 0.3 * torch.linspace(-1, 1, 12).view(1, 1, 1, 12)
            net(x.clamp(-1, 1))
    return net.eval()


def test_synthesize_matches_bn_statistics():
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    noise = synthesize_inputs(net, 16, (3, 12, 12), steps=0, progress=False)
    X = synthesize_inputs(net, 16, (3, 12, 12), steps=120, batch_size=16, progress=False)
    assert X.shape == (16, 3, 12, 12) and X.dtype == torch.float32 and not X.requires_grad
    assert X.min() >= -1 and X.max() <= 1
    l0, l1 = bn_statistics_loss(net, noise), bn_statistics_loss(net, X)
    assert l1 < 0.25 * l0, (l0, l1)
    # the model is left as it was: parameters and running statistics, no .grad, eval mode
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in net.parameters())
    assert not net.training


def test_synthesize_deterministic_and_batches():
    net = _bn_net()
    a = synthesize_inputs(net, 7, (3, 10, 10), steps=3, batch_size=3, seed=5, progress=False)
    b = synthesize_inputs(net, 7, (3, 10, 10), steps=3, batch_size=3, seed=5, progress=False)
    c = synthesize_inputs(net, 7, (3, 10, 10), steps=3, batch_size=3, seed=6, progress=False)
    assert a.shape == (7, 3, 10, 10) and torch.equal(a, b) and not torch.equal(a, c)
    # a last batch of one is folded into the one before (batch statistics need two inputs)
    assert synthesize_inputs(net, 1, (3, 8, 8), steps=2, progress=False).shape == (1, 3, 8, 8)
    assert synthesize_inputs(net, 5, (3, 8, 8), steps=2, batch_size=2, progress=False).shape == (5, 3, 8, 8)


def test_synthesize_modes_restored_and_options():
    net = _bn_net()
    net.train()
    net[1].eval()
    rm = net[1].running_mean.clone()
    X = synthesize_inputs(net, 4, (3, 8, 8), steps=3, label_weight=0, tv_weight=0, jitter=0,
                          value_range=None, progress=False)
    assert torch.isfinite(X).all() and X.shape == (4, 3, 8, 8)
    assert net.training and not net[1].training and net[4].training  # each submodule's mode given back
    assert torch.equal(net[1].running_mean, rm)
    # the default tqdm bar (with the BN term) runs and closes
    assert synthesize_inputs(net, 2, (3, 8, 8), steps=2).shape == (2, 3, 8, 8)


def test_synthesize_feeds_calibration():
    """The synthesized inputs run through a data method as calibration data."""
    net = _bn_net()
    X = synthesize_inputs(net, 16, (3, 12, 12), steps=20, progress=False)
    m = copy.deepcopy(net)
    rep = fake_quantize_model_(m, 4, "gptq", 64, calib_data=X, fp_target=True, progress=False)
    assert len(rep["layers"]) == 4
    assert torch.isfinite(m(X)).all()


def test_synthesize_errors():
    net = _bn_net()
    with pytest.raises(ValueError, match="no BatchNorm"):
        synthesize_inputs(nn.Sequential(nn.Conv2d(3, 4, 1)), 2, (3, 4, 4), progress=False)
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_statistics_loss(nn.Linear(3, 3), torch.randn(2, 3))
    with pytest.raises(TypeError, match="model"):
        synthesize_inputs(lambda x: x, 2, (3, 4, 4), progress=False)
    bad = [({"n": 0}, "n must"), ({"n": 2.0}, "n must"), ({"shape": 3}, "shape"), ({"shape": (3, 0)}, "shape"),
           ({"steps": -1}, "steps"), ({"batch_size": 1}, "batch_size"), ({"lr": 0}, "lr"),
           ({"lr": float("nan")}, "lr"), ({"label_weight": -1}, "label_weight"), ({"tv_weight": True}, "tv_weight"),
           ({"jitter": -2}, "jitter"), ({"value_range": (1, -1)}, "value_range"),
           ({"value_range": (0, float("inf"))}, "value_range")]
    for kw, msg in bad:
        args = {"n": 2, "shape": (3, 8, 8), **kw}
        with pytest.raises(ValueError, match=msg):
            synthesize_inputs(net, args.pop("n"), args.pop("shape"), progress=False, **args)
    # logits are needed for the labels
    feat = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match="label_weight"):
        synthesize_inputs(feat, 2, (3, 4, 4), steps=1, progress=False)
    assert synthesize_inputs(feat, 2, (3, 4, 4), steps=1, label_weight=0, progress=False).shape == (2, 3, 4, 4)
    # a loss that is not finite stops with an error, not with NaN inputs
    zero_var = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=0.0)).eval()
    zero_var[1].running_var.zero_()
    with pytest.raises(FloatingPointError, match="loss became"):
        synthesize_inputs(zero_var, 2, (3, 4, 4), steps=1, label_weight=0, progress=False)


def test_synthesize_feature_vectors_keep_their_order():
    # inputs (C,) have no spatial dimension: no shift / flip / TV may mix the features
    bn = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([-0.5, -0.2, 0.2, 0.5]))
        bn.running_var.fill_(0.01)
    X = synthesize_inputs(nn.Sequential(bn), 32, (4,), steps=200, batch_size=32, lr=0.05, label_weight=0,
                          progress=False)
    assert torch.allclose(X.mean(0), bn.running_mean, atol=0.03), X.mean(0)
    assert torch.allclose(X.std(0, unbiased=False), torch.full((4,), 0.1), atol=0.03), X.std(0)


def test_synthesize_under_no_grad_and_inference_mode():
    # the input's gradient was taken in the caller's mode: under no_grad / inference_mode the first step failed
    # ("element 0 of tensors does not require grad")
    net = _bn_net()
    kw = dict(steps=3, batch_size=4, progress=False)
    x = synthesize_inputs(net, 4, (3, 12, 12), **kw)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(synthesize_inputs(net, 4, (3, 12, 12), **kw), x, rtol=0, atol=0)
