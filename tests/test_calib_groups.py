"""quantize_'s calibration groups: layers that read the same input tensor share one calibration pass.

Every result must be bit-identical to calibrating one layer per pass (``_GROUP_CALIBRATION = False``),
and the number of calibration forwards must drop to one per group and unit.
"""
import warnings

import pytest
import torch
from torch import nn

import quantkern.ptq.quantize as qmod
from quantkern.ptq import quantize_


class _Block(nn.Module):
    """Pre-norm attention + gated MLP: q / k / v read one tensor, gate / up another."""

    def __init__(self, d=64, ff=96, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d)

    def forward(self, x):
        B, T, D = x.shape
        h = self.ln1(x)
        sh = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        a = nn.functional.scaled_dot_product_attention(sh(self.q(h)), sh(self.k(h)), sh(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        h = self.ln2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class _Odd(nn.Module):
    """Inputs that must not be shared: r's input is changed in place before t reads it (t / u do
    share); k2 is registered before q2 but called after it; p is called twice on one tensor."""

    def __init__(self, d=64):
        super().__init__()
        self.r, self.t, self.u, self.k2, self.q2, self.p = (nn.Linear(d, d) for _ in range(6))

    def forward(self, x):
        h = torch.tanh(x)
        z = self.r(h)
        h.add_(0.5 * z)  # in place: t's input depends on r's output
        y = self.t(h) + self.u(h)
        y = self.q2(y) + self.k2(y)
        return self.p(y) * self.p(y)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(_Block(), _Block(), _Odd()).eval()


N_LAYERS = 20  # 7 per block + 6
N_GROUPS = 13  # per block {q,k,v} {o} {gate,up} {down}; then {r} {t,u} {k2} {q2} {p}
_X = torch.randn(3, 2, 16, 64, generator=torch.Generator().manual_seed(1)) * 2


def _run(cfg, grouped, monkeypatch, extra_units=(), inference=False, block_cache=False):
    """(state_dict, (report without times, warnings), {calibration forwards of the model, Hessian batches}).
    Block inputs are not cached by default (each pass a forward of the model, which is what these
    tests count; tests/test_calib_blocks.py covers the cached passes)."""
    monkeypatch.setattr(qmod, "_GROUP_CALIBRATION", grouped)
    model = _model()
    calls = {"model": 0, "hess": 0}

    def unit(x):
        def f(m):
            calls["model"] += m is model
            if inference:
                with torch.inference_mode():
                    return m(x)
            return m(x)
        return f

    units = [unit(x) for x in _X] + [lambda m, f=f: (calls.__setitem__("model", calls["model"] + (m is model)), f(m))
                                     for f in extra_units]
    from quantkern.ptq.gptq import HessianAccumulator

    add = HessianAccumulator.add_batch

    def counted(self, x):
        calls["hess"] += 1
        return add(self, x)

    monkeypatch.setattr(HessianAccumulator, "add_batch", counted)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        quantize_(model, calib_fn=units, progress=False, group_size=32, skip=None, block_cache=block_cache, **cfg)
    monkeypatch.setattr(HessianAccumulator, "add_batch", add)
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    return sd, ([(r[0], r[2]) for r in model._quantize_report], [str(w.message) for w in rec]), calls


def _assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for k, v in a[0].items():
        w = b[0][k]
        assert (v.dtype == w.dtype and torch.equal(v, w)) if isinstance(v, torch.Tensor) else v == w, k
    assert a[1] == b[1]  # the same layers, tokens and warnings


CONFIGS = {
    "gptq": dict(method="gptq"),
    "gptq_a8_static_nofp": dict(method="gptq", act_bits=8, fp_target=False, act_order=False, clip="minmax"),
    "gptq_a8_static": dict(method="gptq", act_bits=8, act_method="max"),
    "erq_a4": dict(method="erq", act_bits=4, erq_refine_iters=10),
    "erq_nofp_sample": dict(method="erq", fp_target=False, calib_tokens=40, erq_refine_iters=10),
    "rtn_a8_static": dict(method="rtn", act_bits=8, act_method="percentile"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_calibration_is_bit_identical(name, monkeypatch):
    cfg = CONFIGS[name]
    grouped = _run(cfg, True, monkeypatch)
    single = _run(cfg, False, monkeypatch)
    _assert_same(grouped, single)
    units = len(_X)
    assert single[2]["model"] == units * N_LAYERS
    assert grouped[2]["model"] == units * N_GROUPS
    if cfg["method"] == "gptq":  # one Hessian per group, not per layer
        assert grouped[2]["hess"] == units * N_GROUPS and single[2]["hess"] == units * N_LAYERS


def test_group_shrinks_when_a_member_fires_alone(monkeypatch):
    # a unit that calls the second block's up projection on its own: up's first call there is not
    # gate's input, so that pair is calibrated in two passes; everything stays bit-identical
    xs = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    extra = [lambda m: m[1].up(xs)]
    cfg = dict(method="gptq", act_bits=8)
    grouped = _run(cfg, True, monkeypatch, extra)
    single = _run(cfg, False, monkeypatch, extra)
    _assert_same(grouped, single)
    units = len(_X) + 1
    assert grouped[2]["model"] == units * (N_GROUPS + 1)


def test_inference_mode_calibration_gets_one_layer_per_pass(monkeypatch):
    # inference tensors have no version counter: an in-place change could not be seen, so no groups
    cfg = dict(method="gptq", fp_target=False)
    inf = _run(cfg, True, monkeypatch, inference=True)
    _assert_same(inf, _run(cfg, False, monkeypatch))
    assert inf[2]["model"] == len(_X) * N_LAYERS


@pytest.mark.parametrize("method", ["gptq", "erq"])
def test_token_mask_drops_padding_rows(method, one_thread):
    # (f, token_mask): a padded batch with its mask calibrates exactly as the real tokens alone
    # (same rows, same order); without the mask the padding rows count as data. One thread: with
    # two, the BLAS summed the first layer's padded batch in another order than the compact one on
    # an AVX2-only host (last-bit differences, and ERQ's rounding then flips codes)
    import torch.nn as tnn

    from quantkern import QuantizeConfig, quantize_

    def mlp():
        torch.manual_seed(0)
        return tnn.Sequential(tnn.Linear(64, 96), tnn.ReLU(), tnn.Linear(96, 32))

    g = torch.Generator().manual_seed(1)
    real = [torch.randn(2, 5, 64, generator=g), torch.randn(2, 7, 64, generator=g)]
    lens = [torch.tensor([5, 3]), torch.tensor([7, 4])]
    pads, masks, rows = [], [], []
    for x, n in zip(real, lens):
        mask = torch.arange(x.shape[1])[None] < n[:, None]
        pads.append(torch.where(mask[..., None], x, torch.randn(x.shape, generator=g) * 5))
        masks.append(mask.long())
        rows.append(x[mask])
    cfg = QuantizeConfig(method=method, bits=4, group_size=32, skip=None, act_bits=8)
    a = quantize_(mlp(), cfg, [(lambda m, x=x: m(x), k) for x, k in zip(pads, masks)], progress=False)
    b = quantize_(mlp(), cfg, [lambda m, x=x: m(x) for x in rows], progress=False)
    c = quantize_(mlp(), cfg, [lambda m, x=x: m(x) for x in pads], progress=False)
    sa, sb, sc = ({k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)} for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [r[2] for r in a._quantize_report] == [r[2] for r in b._quantize_report] == [19, 19]
    with pytest.raises(TypeError, match="token mask"):
        quantize_(mlp(), cfg, [(lambda m: m(pads[0]), masks[0].float())], progress=False)
