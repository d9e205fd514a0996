"""quantize_ / save_quantized / load_quantized on small random models (no downloads)."""
import pytest
import torch
from torch import nn

import quantkern
from quantkern.nn import PackedLinear
from quantkern.ptq import QuantizeConfig, load_quantized, quantize_, save_quantized


class Block(nn.Module):
    """A tiny pre-norm transformer block + MLP head, all nn.Linear."""

    def __init__(self, d=64, h=4, ff=128, out=10):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d, bias=False)
        self.classifier = nn.Linear(d, out)

    def forward(self, x):
        B, T, D = x.shape
        y = self.ln1(x)
        sh = lambda t: t.view(B, T, self.h, D // self.h).transpose(1, 2)  # noqa: E731
        a = torch.nn.functional.scaled_dot_product_attention(sh(self.q(y)), sh(self.k(y)), sh(self.v(y)))
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        x = x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
        return self.classifier(x)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Block().eval()


_MIX = torch.randn(64, 64, generator=torch.Generator().manual_seed(7)) * torch.logspace(0, -1.5, 64)[None, :]


def correlated_inputs(n=8, T=32, d=64, seed=1):
    """Samples of one fixed correlated distribution (the same mixing matrix for calibration and evaluation)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, T, d, generator=g) @ _MIX.T) * 2


X_CAL = correlated_inputs(seed=1)
X_EVAL = correlated_inputs(seed=2)


def calib(model):
    for i in range(0, X_CAL.shape[0], 4):
        model(X_CAL[i:i + 4])


CALIB = [lambda m, i=i: m(X_CAL[i:i + 4]) for i in range(0, X_CAL.shape[0], 4)]


def rel_err(model, ref):
    with torch.no_grad():
        y, r = model(X_EVAL), ref(X_EVAL)
    return ((y - r).norm() / r.norm()).item()


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "erq"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_method_close(method, bits):
    ref = make_model()
    m = quantize_(make_model(), QuantizeConfig(method=method, bits=bits, group_size=32), calib_fn=CALIB, progress=False)
    names = [n for n, mod in m.named_modules() if isinstance(mod, PackedLinear)]
    assert sorted(names) == sorted(["q", "k", "v", "o", "fc1", "fc2"])  # classifier skipped by default
    assert type(m.classifier) is nn.Linear
    err = rel_err(m, ref)
    assert err < {4: 0.15, 3: 0.35, 2: 0.9}[bits], err


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_data_methods_beat_rtn(bits):
    """No residual path: the output error is the quantization error (correlated inputs)."""
    ref = make_mlp()
    errs = {}
    for method in ("rtn", "hqq", "gptq", "erq"):
        m = quantize_(make_mlp(), QuantizeConfig(method=method, bits=bits, group_size=32, skip=None), calib_fn=CALIB,
                      progress=False)
        errs[method] = rel_err(m, ref)
    assert errs["gptq"] <= errs["rtn"], errs
    assert errs["erq"] <= errs["rtn"], errs
    assert errs["rtn"] < {4: 0.2, 3: 0.4, 2: 1.0}[bits], errs


def test_single_callable_and_report():
    m = quantize_(make_model(), QuantizeConfig(method="gptq", bits=4, group_size=32), calib_fn=calib, progress=False)
    # one callable = one batch (the early stop ends it at the hooked layer)
    assert [t for _, _, t in m._quantize_report] == [4 * 32] * 6


def test_skip_list():
    m = quantize_(make_model(), QuantizeConfig(method="rtn", bits=4, skip=["fc*", "q"]), progress=False)
    assert type(m.fc1) is nn.Linear and type(m.fc2) is nn.Linear and type(m.q) is nn.Linear
    assert isinstance(m.k, PackedLinear) and isinstance(m.classifier, PackedLinear)


def test_group_fallback_warns():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.warns(UserWarning, match="one group per row"):
        quantize_(m, QuantizeConfig(method="hqq", bits=4, group_size=32, skip=None), progress=False)
    assert m[0].group_size == 48 and m[2].group_size == 32
    with pytest.raises(ValueError, match="does not fit"):
        quantize_(nn.Sequential(nn.Linear(48, 8)), QuantizeConfig(strict_group=True, group_size=32), progress=False)


@pytest.mark.parametrize("method", ["hqq", "gptq", "erq"])
def test_save_load_roundtrip(tmp_path, method):
    m = quantize_(make_model(), QuantizeConfig(method=method, bits=3, group_size=32), calib_fn=CALIB, progress=False)
    p = str(tmp_path / "q.safetensors")
    save_quantized(m, p)
    m2 = load_quantized(lambda: make_model(seed=123), p)  # different float init: everything must come from the file
    assert isinstance(m2.fc1, PackedLinear) and type(m2.classifier) is nn.Linear
    with torch.no_grad():
        assert torch.equal(m(X_EVAL), m2(X_EVAL))
    # top-level exports
    assert quantkern.load_quantized is load_quantized and quantkern.quantize_ is quantize_
    assert quantkern.save_quantized is save_quantized


def test_load_mismatch(tmp_path):
    m = quantize_(make_model(), QuantizeConfig(method="rtn", bits=4, group_size=32), progress=False)
    p = str(tmp_path / "q.safetensors")
    save_quantized(m, p)
    with pytest.raises(ValueError):
        load_quantized(nn.Sequential(nn.Linear(64, 64)), p)
    bad = str(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a quantkern.packed"):
        load_quantized(make_model(), bad)


def test_bad_config():
    with pytest.raises(ValueError, match="unknown method"):
        quantize_(make_model(), QuantizeConfig(method="awq"), progress=False)
    with pytest.raises(ValueError, match="bits"):
        quantize_(make_model(), QuantizeConfig(bits=8), progress=False)
    with pytest.raises(ValueError, match="needs calib_fn"):
        quantize_(make_model(), QuantizeConfig(method="gptq"), progress=False)
    with pytest.raises(TypeError, match="calib_fn"):
        quantize_(make_model(), QuantizeConfig(method="erq"), calib_fn=42, progress=False)
    with pytest.raises(ValueError, match="group_size"):
        quantize_(make_model(), QuantizeConfig(group_size=0), progress=False)
    with pytest.raises(ValueError, match="no PackedLinear"):
        save_quantized(make_model(), "/tmp/never_written.safetensors")
