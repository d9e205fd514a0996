"""quantkern.ptq.mixed: per-layer sensitivity and the bit allocation under an average-bits budget."""
import copy
import itertools

import pytest
import torch
from torch import nn

from quantkern.nn import PackedLinear
from quantkern.ptq import QuantizeConfig, allocate_bits, average_bits, layer_sensitivity, quantize_
from quantkern.ptq._wquant import dequantize
from quantkern.ptq.conv import fake_quantize_model_, group_size_for
from quantkern.ptq.hqq import hqq_quantize, rtn_quantize


def _net():
    """A small conv classifier: stem conv, depthwise conv, 1x1 conv, Linear head (logits [B, 10])."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        net[8].weight.mul_(30)  # confident logits, so that the KLs are not all ~1e-6
    return net


X = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
NAMES = ["0", "2", "4", "8"]


@pytest.mark.parametrize("method", ["hqq", "rtn"])
@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_sensitivity_matches_one_layer_quantized_by_hand(method, metric):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    sens = layer_sensitivity(net, X, (2, 4, 8), method, 16, metric=metric, batch_size=5, progress=False)
    assert list(sens) == NAMES and all(list(e) == [2, 4, 8] for e in sens.values())
    # the model is given back bit for bit
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        ref = net(X)
    quant = hqq_quantize if method == "hqq" else rtn_quantize
    for name in NAMES:
        for b in (2, 4, 8):
            m = copy.deepcopy(net)
            w = m.get_submodule(name).weight
            W2 = w.detach().reshape(w.shape[0], -1)
            g = group_size_for(W2.shape[1], 16)
            with torch.no_grad():
                w.copy_(dequantize(*quant(W2, b, g, warn=False)).reshape(w.shape))
                out = m(X)
            if metric == "kl":
                lp, lq = ref.log_softmax(-1), out.log_softmax(-1)
                want = float((lp.exp() * (lp - lq)).sum(-1).mean())
            else:
                want = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
            assert sens[name][b] == pytest.approx(max(want, 0.0), rel=1e-4, abs=1e-9), (name, b)
        assert sens[name][8] < sens[name][4] < sens[name][2]


def test_sensitivity_outputs_modes_skip_and_batches():
    class Wrapped(nn.Module):  # a transformers-like output: a dict whose first tensor is compared
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return {"note": "x", "logits": self.net(x), "aux": torch.zeros(1)}

    w = Wrapped().train()
    w.net[2].eval()
    a = layer_sensitivity(w, X, 4, metric="kl", skip=["net.0"], progress=False)
    assert list(a) == ["net.2", "net.4", "net.8"] and all(list(e) == [4] for e in a.values())
    assert w.training and w.net[0].training and not w.net[2].training  # modes given back
    b = layer_sensitivity(w.net, list(X.split(4)), 4, metric="kl", skip=lambda n, m: n == "0", progress=False)
    assert list(b) == ["2", "4", "8"]
    assert all(b[k.split(".", 1)[1]][4] == pytest.approx(v[4], rel=1e-5) for k, v in a.items())
    c = layer_sensitivity(w, X, 4, metric="kl", output_fn=lambda out: out["logits"], progress=False)
    assert c["net.8"] == pytest.approx(a["net.8"], rel=1e-6)


def test_sensitivity_progress_bar(capsys):
    layer_sensitivity(_net(), X, 4, progress=True)
    assert "layer sensitivity" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"method": "gptq"}, ValueError, "method must be 'hqq' or 'rtn'"),
    ({"metric": "cos"}, ValueError, "metric must be one of"),
    ({"bits": 9}, ValueError, "bits must be an int or a sequence"),
    ({"bits": (4, 5)}, ValueError, r"ints in \(1, 2, 3, 4, 8\)"),
    ({"group_rule": "odd"}, ValueError, "group_rule must be one of"),
    ({"calib_data": torch.empty(0, 3, 8, 8)}, ValueError, "calib_data is empty"),
    ({"skip": ["5"]}, ValueError, r"skip names no Conv2d / Linear layer.*'5'"),
    ({"bits": ()}, ValueError, "bits must be"),
    ({"bits": "48"}, ValueError, "bits must be"),
    ({"group_size": 0}, ValueError, "group_size"),
    ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
    ({"skip": "0"}, TypeError, "skip must be a collection"),
    ({"skip": ["nope"]}, ValueError, r"skip names no Conv2d / Linear layer.*nope"),
    ({"skip": NAMES}, ValueError, "no Conv2d / Linear layer"),
    ({"output_fn": 3}, TypeError, "output_fn must be callable"),
    ({"calib_data": torch.full((2, 3, 8, 8), float("nan"))}, ValueError, "batch 0 contains NaN"),
    ({"calib_data": []}, ValueError, "calib_data is empty"),
    ({"calib_data": 3}, TypeError, "calib_data must be a tensor"),
    ({"output_fn": lambda out: out[:1]}, RuntimeError, "output shape changed"),
])
def test_sensitivity_bad_arguments(kwargs, exc, match):
    kw = {"calib_data": X, "progress": False}
    kw.update(kwargs)
    net = _net()
    if kwargs.get("output_fn") is not None and callable(kwargs["output_fn"]):
        # a reference taken from one batch, compared against the next: simulate a shape change
        calls = {"n": 0}

        def fn(out):
            calls["n"] += 1
            return out if calls["n"] <= 1 else out[:1]
        kw["output_fn"], kw["batch_size"] = fn, 100
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(exc, match=match):
        layer_sensitivity(net, **kw)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


class _Tupled(nn.Module):
    def forward(self, x):
        return ("no", torch.zeros(2, dtype=torch.long))


def test_sensitivity_bad_outputs_models_and_weights():
    with pytest.raises(TypeError, match="output_fn must return a floating-point tensor, got torch.int64"):
        layer_sensitivity(_net(), X, output_fn=lambda out: out.argmax(-1), progress=False)
    bad = _net()
    with torch.no_grad():
        bad[4].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="float model's output on calib_data batch 0 has NaN or Inf"):
        layer_sensitivity(bad, X, progress=False)
    before = copy.deepcopy(bad.state_dict())
    with pytest.raises(ValueError, match=r"layer '4': .*W contains NaN"):
        layer_sensitivity(bad, X, output_fn=lambda out: out.nan_to_num(), progress=False)
    assert all(torch.equal(v, bad.state_dict()[k]) for k, v in before.items())  # the layers before it put back
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        layer_sensitivity(lambda x: x, X)
    with pytest.raises(TypeError, match="no floating-point tensor"):
        layer_sensitivity(nn.Sequential(_net(), _Tupled()), X, progress=False)
    one = nn.Sequential(_net(), nn.Linear(_net()(X).shape[-1], 1))  # (KL over one logit measured 0 everywhere)
    with pytest.raises(ValueError, match="metric='kl' needs logits over >= 2 classes"):
        layer_sensitivity(one, X, metric="kl", progress=False)


def _sizes_model(sizes):
    m = nn.Module()
    for i, n in enumerate(sizes):
        setattr(m, f"l{i}", nn.Linear(n, 1, bias=False))
    return m


def test_allocate_bits_greedy_by_gain_per_bit():
    m = _sizes_model([100, 10, 1000, 50])
    sens = {"l0": {4: 1.0, 8: 0.0}, "l1": {4: 0.5, 8: 0.0}, "l2": {4: 2.0, 8: 0.1}, "l3": {4: 0.01, 8: 0.0}}
    total = 1160
    # at the floor nothing moves; all the room in the world: every layer where 8 bits is better
    assert allocate_bits(m, sens, 4) == {"l0": 4, "l1": 4, "l2": 4, "l3": 4}
    assert allocate_bits(m, sens, 8) == {"l0": 8, "l1": 8, "l2": 8, "l3": 8}
    # gain per added bit: l1 0.5/40, l0 1/400, l2 1.9/4000, l3 0.01/200: l1 first, then l0, then l2
    room = lambda extra: 4 + extra / total  # noqa: E731
    assert allocate_bits(m, sens, room(40)) == {"l0": 4, "l1": 8, "l2": 4, "l3": 4}
    # l0 (400 more bits) does not fit beside l1 at 439: the ratio greedy takes l3 (200) instead (summed error
    # 3.0); l0 alone (2.51) is better, and a restart from the single upgrade with the largest drop finds it
    assert allocate_bits(m, sens, room(439), restarts=0) == {"l0": 4, "l1": 8, "l2": 4, "l3": 8}
    assert allocate_bits(m, sens, room(439)) == {"l0": 8, "l1": 4, "l2": 4, "l3": 4}
    got = allocate_bits(m, sens, room(440))
    assert got == {"l0": 8, "l1": 8, "l2": 4, "l3": 4}
    # l2 (4000 bits) does not fit next, but l3 (200) does
    assert allocate_bits(m, sens, room(640)) == {"l0": 8, "l1": 8, "l2": 4, "l3": 8}
    assert average_bits(m, got) == pytest.approx(room(440))
    # a wider width with a larger measured error is never taken
    assert allocate_bits(m, {"l0": {4: 1.0, 8: 2.0}}, 8) == {"l0": 4}


def test_allocate_bits_within_budget_and_maximal():
    # random instances with three widths: the allocation fits, and no single further upgrade that lowers
    # the error still fits (the greedy stops only when nothing fits)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        sizes = [int(s) for s in torch.randint(1, 500, (6,), generator=g)]
        m = _sizes_model(sizes)
        sens = {}
        for i in range(6):
            e = sorted(torch.rand(3, generator=g).tolist(), reverse=True)
            sens[f"l{i}"] = dict(zip((2, 3, 4), e))
        budget = 2 + 2 * float(torch.rand((), generator=g))
        got = allocate_bits(m, sens, budget)
        assert average_bits(m, got) <= budget + 1e-9
        used = sum(s * got[f"l{i}"] for i, s in enumerate(sizes))
        for i, s in enumerate(sizes):
            for b in (3, 4):
                if b > got[f"l{i}"]:
                    assert used + s * (b - got[f"l{i}"]) > budget * sum(sizes) + 1e-9
        # and it is never worse than the best allocation that moves one layer only
        tot = sum(sizes)
        best_single = min(sum(sens[f"l{j}"][2] for j in range(6)) - sens[f"l{i}"][2] + sens[f"l{i}"][b]
                          for i, b in itertools.product(range(6), (2, 3, 4))
                          if sum(sizes) * 2 + sizes[i] * (b - 2) <= budget * tot + 1e-9)
        assert sum(sens[n][b] for n, b in got.items()) <= best_single + 1e-12


@pytest.mark.parametrize("args, match", [
    (({}, 4), "non-empty dict"),
    (({"l0": {}}, 4), r"sensitivity\['l0'\] must be a non-empty"),
    (({"l0": {9: 0.1}}, 4), "bits must be ints in"),
    (({"l0": {4: float("nan")}}, 4), r"must be an error >= 0 \(inf allowed\), got nan"),
    (({"l0": {4: -1.0}}, 4), "must be an error >= 0"),
    (({"nope": {4: 0.1}}, 4), "no module named 'nope'"),
    (({"l0": {4: 0.1, 8: 0.0}}, 3.5), "below 4 bits per weight"),
    (({"l0": {4: 0.1}}, float("inf")), "budget must be a finite number"),
])
def test_allocate_bits_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        allocate_bits(_sizes_model([8]), *args)
    with pytest.raises(ValueError, match="layer_bits is empty"):
        average_bits(_sizes_model([8]), {})


def test_allocation_feeds_fake_quantize_and_quantize_():
    net = _net()
    sens = layer_sensitivity(net, X, (2, 8), "hqq", 16, metric="kl", progress=False)
    with torch.no_grad():
        ref = net(X)
    errs = []
    for budget in (2, 4, 8):
        lb = allocate_bits(net, sens, budget)
        assert average_bits(net, lb) <= budget
        m = copy.deepcopy(net)
        fake_quantize_model_(m, 2, "hqq", 16, layer_bits=lb, progress=False)
        with torch.no_grad():
            lp, lq = ref.log_softmax(-1), m(X).log_softmax(-1)
        errs.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
    assert errs[2] < errs[1] < errs[0]
    # Linear models: widths 2 / 3 / 4 go to quantize_ as layer_config
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 32))
    xs = torch.randn(16, 64)
    lb = allocate_bits(mlp, layer_sensitivity(mlp, xs, (2, 3, 4), "rtn", 32, progress=False), 3.25)
    assert set(lb.values()) <= {2, 3, 4} and len(set(lb.values())) > 1
    q = quantize_(mlp, QuantizeConfig(method="rtn", bits=2, group_size=32,
                                      layer_config={n: {"bits": b} for n, b in lb.items()}), progress=False)
    assert {n: mod.packed_weight.bits for n, mod in q.named_modules() if isinstance(mod, PackedLinear)} == lb


def test_sensitivity_of_a_transformers_model_on_tokenizer_batches():
    # dict batches go in as model(**batch); the ModelOutput's first tensor (last_hidden_state) is compared
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (6, 9))
    mask = torch.ones_like(ids)
    mask[3:, 6:] = 0
    batches = [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]
    sens = layer_sensitivity(model, batches, (2, 4), "rtn", 32, progress=False)
    assert len(sens) == 12 and all(e[4] < e[2] for e in sens.values())

    # callable batches (quantize_'s calib_fn units) and a dict output that starts with integer tensors
    class Feats(nn.Module):  # the sentence-transformers convention: one dict in, the dict with more keys out
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, f):
            return dict(f, token_embeddings=self.bert(**f).last_hidden_state)

    units = [(lambda f: (lambda m: m(dict(f))))(f) for f in batches]
    sens2 = layer_sensitivity(Feats(), units, (2, 4), "rtn", 32, progress=False)
    assert all(sens2["bert." + n][b] == pytest.approx(e[b], rel=1e-5) for n, e in sens.items() for b in (2, 4))
    lb = allocate_bits(model, sens, 3.0)
    assert set(lb.values()) == {2, 4}
    q = quantize_(model, QuantizeConfig(method="rtn", bits=2, group_size=32,
                                        layer_config={n: {"bits": b} for n, b in lb.items()}), progress=False)
    assert {n: mod.packed_weight.bits for n, mod in q.named_modules() if isinstance(mod, PackedLinear)} == lb
    with pytest.raises(ValueError, match="batch 1 contains NaN"):
        layer_sensitivity(model, [batches[0], {"inputs_embeds": torch.full((1, 2, 32), float("nan"))}], 4,
                          progress=False)


def test_allocate_bits_keeps_a_large_gain_the_ratio_greedy_misses():
    # a: 1 weight, drop 1; b: 100 weights, drop 50. Room for b's upgrade only if a's is not taken first:
    # the ratio greedy takes a (1 / 4 bits against 50 / 400) and leaves b; the restarts find b alone
    m = _sizes_model([1, 100])
    sens = {"l0": {4: 1.0, 8: 0.0}, "l1": {4: 50.0, 8: 0.0}}
    budget = 4 + 400 / 101
    assert allocate_bits(m, sens, budget, restarts=0) == {"l0": 8, "l1": 4}
    assert allocate_bits(m, sens, budget) == {"l0": 4, "l1": 8}
    with pytest.raises(ValueError, match="restarts must be an int >= 0"):
        allocate_bits(m, sens, budget, restarts=-1)


def test_allocate_bits_infinite_errors_and_shared_weights():
    # an inf error (a width whose output overflowed) is left first, whatever its size
    m = _sizes_model([1000, 10])
    sens = {"l0": {2: float("inf"), 4: 0.5}, "l1": {2: 3.0, 4: 0.0}}
    assert allocate_bits(m, sens, 2 + 2000 / 1010) == {"l0": 4, "l1": 2}
    # two layers holding one weight tensor: measured once, one width, the tensor counted once
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32, bias=False))
    net[4].weight = net[0].weight
    sens = layer_sensitivity(net, torch.randn(8, 32), (2, 4), "rtn", 32, progress=False)
    assert list(sens) == ["0", "2", "4"] and sens["4"] == sens["0"]
    for budget in (2, 3, 4):
        lb = allocate_bits(net, sens, budget)
        assert lb["0"] == lb["4"] and average_bits(net, lb) <= budget
    assert average_bits(net, {"0": 4, "2": 2, "4": 4}) == 3.0
    with pytest.raises(ValueError, match=r"share one weight tensor but are given different bits"):
        average_bits(net, {"0": 4, "4": 2})


def test_sensitivity_group_rule_and_skip_names():
    # in_features 96 at group size 64: fake_quantize_model_'s rule gives g48, quantize_'s g32
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(96, 16), nn.ReLU(), nn.Linear(16, 4))
            self.head = self.body[2]  # a second name for the last layer

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    net = Net()
    xs = torch.randn(10, 96)
    with torch.no_grad():
        ref = net(xs)

    def by_hand(g):
        m = copy.deepcopy(net)
        with torch.no_grad():
            m.body[0].weight.copy_(dequantize(*hqq_quantize(m.body[0].weight, 3, g, warn=False)))
            return float(((m(xs) - ref) ** 2).sum() / (ref ** 2).sum())
    for rule, g in (("divisor", 48), ("packed", 32)):
        got = layer_sensitivity(net, xs, 3, "hqq", 64, group_rule=rule, skip=["head"], progress=False)
        assert list(got) == ["body.0"] and got["body.0"][3] == pytest.approx(by_hand(g), rel=1e-5)
    with pytest.raises(ValueError, match="skip names no Conv2d / Linear layer"):
        layer_sensitivity(net, xs, skip=["body"], progress=False)  # a container, not a layer


def test_sensitivity_warns_about_attention_projections():
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(32, 2, batch_first=True)
            self.fc = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(self.att(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"1 nn.MultiheadAttention.*expose_linears"):
        got = layer_sensitivity(Att().eval(), torch.randn(2, 5, 32), 4, progress=False)
    assert list(got) == ["att.out_proj", "fc"]


def test_sensitivity_of_an_overflowing_fp16_model_is_inf():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4)).half()
    with torch.no_grad():
        # rows of 0.01 with one +100 and one -100: ~10 at full precision; at 1 bit every 0.01 becomes 100
        # and the outputs 16 * 6200 overflow fp16
        net[0].weight.fill_(0.01)
        net[0].weight[:, 0], net[0].weight[:, 1] = 100, -100
    xs = torch.full((4, 64), 16.0, dtype=torch.float16)
    with torch.no_grad():
        assert torch.isfinite(net(xs)).all()
    for metric in ("mse", "kl"):
        got = layer_sensitivity(net, xs, (1, 8), "rtn", 64, metric=metric, progress=False)
        assert got["0"][1] == float("inf") and 0 <= got["0"][8] < float("inf") and 0 <= got["1"][1] < float("inf")
        # the inf is left first, even though layer 1's upgrade is cheaper
        assert allocate_bits(net, got, 1 + 7 * 4096 / 4352) == {"0": 8, "1": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sensitivity_of_half_precision_models(dtype):
    # the dequantized weight is written in the model's dtype, the errors computed in fp32, the weights put back
    net = _net().to(dtype)
    before = copy.deepcopy(net.state_dict())
    got = layer_sensitivity(net, X.to(dtype), (2, 8), "hqq", 16, metric="kl", progress=False)
    assert all(0 <= e[8] < e[2] < float("inf") for e in got.values())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(p.dtype == dtype for p in net.parameters())
