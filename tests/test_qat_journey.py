"""The QAT user's journey end to end on sklearn digits (CPU, offline, a few seconds):
quantize_modules -> QAT with OscillationTracker (freezing) + DampeningLoss on cosine schedules
-> BN re-estimation -> evaluation; checkpoint / resume; bf16; torch.compile; edge cases.

The strict xfails are open bugs found on this journey (each names the fix); they flip to
XPASS, and then fail, once fixed: remove the marker then.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkern import qat
from quantkern.nn import PackedLinear, QuantLinear, quantize_modules
from quantkern.reference.fake_quant_lsq import lsq_param_view

sklearn_datasets = pytest.importorskip("sklearn.datasets")


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest: tiny models, one thread)


# ------------------------------------------------------------------ data and models
_DATA = {}


def _digits():
    """load_digits (offline), standardised, a fixed 1400 / 397 split: x [N, 1, 8, 8] fp32, y int64."""
    if not _DATA:
        X, y = sklearn_datasets.load_digits(return_X_y=True)
        X = torch.tensor((X / 16.0 - 0.3) / 0.4, dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.tensor(y)
        p = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        _DATA["d"] = (X[p[:1400]], y[p[:1400]], X[p[1400:]], y[p[1400:]])
    return _DATA["d"]


class CNN(nn.Module):
    """conv + BN + ReLU, depthwise conv + BN + ReLU, 1x1 conv + BN + ReLU, linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.b3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.dw(x)))
        x = F.relu(self.b3(self.pw(x)))
        return self.fc(F.avg_pool2d(x, 4).flatten(1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1, self.f2, self.f3 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.f3(F.relu(self.f2(F.relu(self.f1(x.flatten(1))))))


def _batches(X, y, bs, seed):
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    return [(X[idx[i:i + bs]], y[idx[i:i + bs]]) for i in range(0, len(X) - bs + 1, bs)]


def _acc(m, X, y):
    was = m.training
    m.eval()
    with torch.no_grad():
        a = (m(X).argmax(1) == y).float().mean().item()
    m.train(was)
    return a


_FP = {}


def _float_model(cls):
    """A float model trained for a few epochs (cached: every test starts from a deepcopy)."""
    if cls not in _FP:
        Xtr, ytr, _, _ = _digits()
        torch.manual_seed(0)
        m = cls()
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        for e in range(4):
            for xb, yb in _batches(Xtr, ytr, 64, e):
                loss = F.cross_entropy(m(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        _FP[cls] = m
    return copy.deepcopy(_FP[cls])


def _integers(L):
    """The integers the weight of layer L (a qat.QLayer) quantizes to now, flat int64."""
    s, b = L.params()
    w = L.weight_view()
    v = (w - lsq_param_view(w, b, L.axis, L.group_size)) / lsq_param_view(w, s, L.axis, L.group_size)
    return v.clamp(L.qmin, L.qmax).round().reshape(-1).long()


# ------------------------------------------------------------------ 1. the training journey
@pytest.mark.parametrize("cls,w_bits,a_bits,opt_name,group", [
    (CNN, 4, 4, "sgd", None),
    (CNN, 3, 3, "adamw", None),
    (MLP, 2, 4, "sgd", None),
    (MLP, 3, 3, "adamw", 16),
])
def test_qat_journey_freezing_counts_and_accuracy(cls, w_bits, a_bits, opt_name, group):
    """QAT with freezing + dampening: accuracy near float after BN re-estimation; frozen weights keep
    their integer through SGD momentum / AdamW weight decay; the per-step oscillation counts equal an
    independent count of integer reversals; 'frozen so far' equals the frozen mask."""
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = _digits()
    fp = _float_model(cls)
    fp_acc = _acc(fp, Xte, yte)
    m = copy.deepcopy(fp)
    kw = {"w_granularity": "group", "w_group_size": group} if group else {}
    quantize_modules(m, w_bits=w_bits, a_bits=a_bits, a_learn_offset=True, **kw)
    m.train()
    if opt_name == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
    epochs = 2
    steps = epochs * (len(Xtr) // 64)
    # momentum 0.05 so that a 2-epoch run freezes a measurable number of weights
    tracker = qat.OscillationTracker(m, momentum=0.05, max_bits=None)
    damp = qat.DampeningLoss(m)
    f_th = qat.freeze_threshold_schedule(steps, 0.1, 0.02)
    lam = qat.dampening_schedule(steps, 0.1)
    prev_q, last_dir, prev_frozen = None, {}, None
    step = 0
    for e in range(epochs):
        for xb, yb in _batches(Xtr, ytr, 64, 100 + e):
            step += 1
            loss = F.cross_entropy(m(xb), yb) + damp(weighting=lam(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            q_seen = {n: _integers(t.layer) for n, t in tracker.tracked.items()}  # what the tracker reads
            counts = tracker.step(freeze_threshold=f_th(step))
            q_now = {n: _integers(t.layer) for n, t in tracker.tracked.items()}  # after frozen rewrites
            frozen = {n: tracker.frozen_mask(n).reshape(-1).clone() for n in tracker.tracked}
            for n in tracker.tracked:
                assert int(counts[n][1]) == int(frozen[n].sum()), n
                if prev_q is None:
                    continue
                # frozen stays frozen, and its integer does not move (optimiser momentum / weight decay
                # moved the latent weight; the tracker put it back)
                pf = prev_frozen[n]
                assert bool(frozen[n][pf].all()), n
                assert torch.equal(q_now[n][pf], prev_q[n][pf]), n
                # oscillation = the integer moved opposite to its last move (unfrozen weights)
                sw = (prev_q[n] - q_seen[n]).sign()
                ld = last_dir.get(n, torch.zeros_like(sw))
                osc = (sw != 0) & (sw == -ld) & ~pf
                assert int(counts[n][0]) == int(osc.sum()), (n, step)
                last_dir[n] = torch.where(sw != 0, sw, ld)
            prev_q, prev_frozen = q_now, frozen
    n_frozen = sum(int(f.sum()) for f in prev_frozen.values())
    assert n_frozen > 0
    met = tracker.metrics()
    assert all(0 <= v["frozen_frac"] <= 1 and 0 <= v["frac_oscillating"] <= 1 for v in met.values())
    n_bn = qat.reestimate_bn_stats(m, _batches(Xtr, ytr, 64, 7), num_batches=10)
    assert n_bn == (10 if cls is CNN else 0)
    acc = _acc(m, Xte, yte)
    assert acc > fp_acc - 0.08, (acc, fp_acc)
    for n, p in m.named_parameters():
        assert torch.isfinite(p).all(), n


# ------------------------------------------------------------------ 2. checkpoint / resume
@pytest.mark.parametrize("opt_name,frozen_grad,a_gran", [
    ("sgd", "grid", "tensor"),
    ("adamw", "official", "channel"),  # channel: lazily shaped input quantizers
])
def test_checkpoint_resume_is_bit_exact(opt_name, frozen_grad, a_gran):
    """model + optimizer + tracker state_dicts through torch.save / torch.load(weights_only=True) into
    freshly built objects (another seed): the remaining losses, frozen masks and every tensor of the
    model are bit for bit those of an uninterrupted run."""
    Xtr, ytr, _, _ = _digits()
    fp_sd = _float_model(CNN).state_dict()
    total, cut = 30, 18
    data = _batches(Xtr, ytr, 32, 5)[:total]
    f_th = qat.freeze_threshold_schedule(total, 0.1, 0.02)
    lam = qat.dampening_schedule(total, 0.1)

    def build(seed):
        torch.manual_seed(seed)
        m = CNN()
        m.load_state_dict(fp_sd)
        quantize_modules(m, w_bits=3, a_bits=3, a_granularity=a_gran)
        if opt_name == "sgd":
            opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
        else:
            opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05)
        return m, opt, qat.OscillationTracker(m, momentum=0.05, max_bits=None, frozen_grad=frozen_grad)

    def train(m, opt, tracker, s0, s1):
        damp = qat.DampeningLoss(m)
        out = []
        for step in range(s0 + 1, s1 + 1):
            xb, yb = data[step - 1]
            loss = F.cross_entropy(m(xb), yb) + damp(weighting=lam(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.step(freeze_threshold=f_th(step))
            out.append(loss.item())
        return out

    m, opt, tr = build(0)
    losses_a = train(m, opt, tr, 0, total)
    frozen_a = {n: tr.frozen_mask(n).clone() for n in tr.tracked}
    state_a = {k: v.clone() for k, v in m.state_dict().items()}

    m, opt, tr = build(0)
    losses_b = train(m, opt, tr, 0, cut)
    assert any(bool(tr.frozen_mask(n).any()) for n in tr.tracked)  # the cut is after freezing started
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "tracker": tr.state_dict()}, buf)
    del m, opt, tr
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m, opt, tr = build(123)
    m.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    tr.load_state_dict(ck["tracker"])
    assert tr.steps == cut
    losses_b += train(m, opt, tr, cut, total)

    assert losses_a == losses_b
    for n in frozen_a:
        assert torch.equal(frozen_a[n], tr.frozen_mask(n)), n
    state_b = m.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k


# ------------------------------------------------------------------ 3. mixed precision
@pytest.mark.parametrize("mode", ["autocast", "bf16_model"])
def test_bf16_training_keeps_fp32_quantizer_params(mode):
    """autocast(cpu, bf16) around the forward, or model.to(bfloat16): scales / offsets and their
    gradients stay fp32, training lowers the loss, frozen weights stay on their integer in bf16."""
    Xtr, ytr, _, _ = _digits()
    m = _float_model(CNN)
    quantize_modules(m, w_bits=4, a_bits=4)
    if mode == "bf16_model":
        m.to(torch.bfloat16)
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)
    total = 20
    tr = qat.OscillationTracker(m, momentum=0.1, max_bits=None)
    damp = qat.DampeningLoss(m)
    f_th = qat.freeze_threshold_schedule(total, 0.2, 0.05)
    data = _batches(Xtr, ytr, 64, 3)
    losses, prev = [], None
    for step in range(1, total + 1):
        xb, yb = data[step % len(data)]
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(xb), yb) + damp(weighting=0.01)
        else:
            loss = F.cross_entropy(m(xb.bfloat16()).float(), yb) + damp(weighting=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr.step(freeze_threshold=f_th(step))
        losses.append(loss.item())
        now = {n: (tr.frozen_mask(n).reshape(-1).clone(), _integers(t.layer)) for n, t in tr.tracked.items()}
        if prev is not None:
            for n, (fz, q) in prev.items():
                assert torch.equal(now[n][1][fz], q[fz]), n
        prev = now
    assert sum(int(f.sum()) for f, _ in prev.values()) > 0
    for n, p in m.named_parameters():
        if n.endswith(("scale", "offset")):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        elif n.endswith("weight") and mode == "bf16_model":
            assert p.dtype == torch.bfloat16, n
    assert sum(losses[-5:]) < sum(losses[:5])


# ------------------------------------------------------------------ 4. torch.compile
def test_compiled_forward_matches_eager():
    """torch.compile (fullgraph=False) of the loss (QAT forward + dampening), with the grad masks of
    a freezing tracker: the same losses and frozen masks as eager. aot_eager: dynamo + AOT autograd
    over our ops, without inductor's compile time (the rounding is the same as eager's)."""
    Xtr, ytr, _, _ = _digits()
    data = _batches(Xtr, ytr, 64, 5)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = quantize_modules(_float_model(MLP), w_bits=3, a_bits=4)
        m(data[0][0])  # eager init (data-dependent)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        tr = qat.OscillationTracker(m, momentum=0.3, max_bits=None)
        damp = qat.DampeningLoss(m)

        def loss_fn(xb, yb, lam):
            return F.cross_entropy(m(xb), yb) + damp(weighting=lam)

        f = torch.compile(loss_fn, backend="aot_eager") if compiled else loss_fn
        losses = []
        for step in range(1, 9):
            xb, yb = data[step]
            loss = f(xb, yb, 0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tr.step(freeze_threshold=0.2 if step > 2 else 0.0)
            losses.append(loss.item())
        results.append((losses, {n: tr.frozen_mask(n).clone() for n in tr.tracked}))
    torch._dynamo.reset()
    (le, fe), (lc, fc) = results
    assert sum(int(v.sum()) for v in fe.values()) > 0
    assert lc == pytest.approx(le, rel=1e-6, abs=1e-6)
    for n in fe:
        assert torch.equal(fe[n], fc[n]), n


@pytest.mark.xfail(strict=True, reason=(
    "dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards=True): a function "
    "compiled for a model without the frozen_grad='official' forward hooks is reused for a new model of the "
    "same class that has them, silently without the hooks (grid gradients). Needs the hook moved into "
    "LSQQuantizer.forward (an attribute dynamo guards on) or a README note / torch._dynamo.reset()"))
def test_compiled_function_reused_for_a_second_model_keeps_official_hooks():
    Xtr, ytr, _, _ = _digits()
    data = _batches(Xtr, ytr, 64, 5)
    torch._dynamo.reset()

    def run(frozen_grad, compiled):
        torch.manual_seed(0)
        m = quantize_modules(_float_model(MLP), w_bits=3, a_bits=4)
        m(data[0][0])
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        tr = qat.OscillationTracker(m, momentum=0.3, max_bits=None, frozen_grad=frozen_grad)
        holder["m"] = m
        out = []
        for step in range(1, 9):
            xb, yb = data[step]
            loss = (compiled_fn if compiled else loss_fn)(xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tr.step(freeze_threshold=0.2 if step > 2 else 0.0)
            out.append(loss.item())
        return out, {n: p.detach().clone() for n, p in m.named_parameters()}

    holder = {}

    def loss_fn(xb, yb):
        return F.cross_entropy(holder["m"](xb), yb)

    compiled_fn = torch.compile(loss_fn, backend="aot_eager")
    try:
        eager = run("official", compiled=False)
        run("grid", compiled=True)  # e.g. the LSQ baseline of a sweep, first
        comp = run("official", compiled=True)
    finally:
        torch._dynamo.reset()
    for n in eager[1]:
        assert torch.allclose(eager[1][n], comp[1][n], rtol=1e-5, atol=1e-6), n


# ------------------------------------------------------------------ 5. edge cases
def test_all_zero_weight_layer_trains_without_nan():
    """An all-zero weight does not initialise its quantizer (placeholder scale 1, a warning); the
    first forward after a step moved the weight does, and training recovers (no NaN)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    nn.init.zeros_(lin.weight)
    with pytest.warns(UserWarning, match="all zeros"):
        q = QuantLinear.from_float(lin, w_bits=4, a_bits=None)
    assert torch.all(q.weight_quantizer.scale == 1) and not q.weight_quantizer._initialized
    tr = qat.OscillationTracker(q)
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    x = torch.randn(64, 16)
    t = x @ torch.randn(16, 8)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(q(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr.step(0.05)
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.6 * losses[0]
    assert q.weight_quantizer._initialized and float(q.weight_quantizer.scale.abs().min()) > 1e-4
    assert torch.isfinite(q.weight).all() and torch.isfinite(q.weight_quantizer.scale).all()


def test_tracker_step_without_backward_changes_nothing_but_the_count():
    """tracker.step with unchanged weights (no optimiser step in between): no oscillation, no weight
    moves, nothing newly frozen; the frequency EMAs only decay."""
    Xtr, ytr, _, _ = _digits()
    torch.manual_seed(0)
    m = quantize_modules(_float_model(MLP), w_bits=3, a_bits=4)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    tr = qat.OscillationTracker(m, momentum=0.2, max_bits=None)
    for xb, yb in _batches(Xtr, ytr, 64, 1)[:10]:
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr.step(0.0)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    f0 = {n: tr.frequency(n).clone() for n in tr.tracked}
    counts = tr.step(0.9)
    for n, c in counts.items():
        assert c.tolist() == [0, 0], n
        assert torch.all(tr.frequency(n) <= f0[n]), n
    for n, p in m.named_parameters():
        assert torch.equal(p, w0[n]), n
    assert tr.steps == 11


def test_batch_size_one_param_groups_and_module_called_twice():
    """Batch size 1 (BN over 8x8 maps), the quantizer parameters in their own Adam group with
    another lr and no weight decay, and one QuantLinear called twice per forward: trains, freezes,
    frozen integers stay, the shared layer's grads are the sum of both calls."""
    Xtr, ytr, _, _ = _digits()
    torch.manual_seed(0)
    m = quantize_modules(_float_model(CNN), w_bits=3, a_bits=4)
    head2 = nn.Linear(10, 10)  # applied twice below, shares m.fc's input path
    m.head2 = quantize_modules(head2, w_bits=3, a_bits=8)
    q_params = [p for n, p in m.named_parameters() if n.endswith(("scale", "offset"))]
    w_params = [p for n, p in m.named_parameters() if not n.endswith(("scale", "offset"))]
    opt_w = torch.optim.SGD(w_params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    opt_q = torch.optim.Adam(q_params, lr=1e-3)
    tr = qat.OscillationTracker(m, momentum=0.3, max_bits=None)
    prev = None
    for step in range(1, 16):
        xb, yb = Xtr[step:step + 1], ytr[step:step + 1]
        logits = m.head2(m.head2(m(xb)))  # one module, two calls per forward
        loss = F.cross_entropy(logits, yb)
        opt_w.zero_grad()
        opt_q.zero_grad()
        loss.backward()
        opt_w.step()
        opt_q.step()
        tr.step(freeze_threshold=0.2 if step > 4 else 0.0)
        now = {n: (tr.frozen_mask(n).reshape(-1).clone(), _integers(t.layer)) for n, t in tr.tracked.items()}
        if prev is not None:
            for n, (fz, q) in prev.items():
                assert torch.equal(now[n][1][fz], q[fz]), n
        prev = now
    assert "head2" in tr.tracked
    assert sum(int(f.sum()) for f, _ in prev.values()) > 0
    for p in m.parameters():
        assert torch.isfinite(p).all()


def test_quantizers_do_not_depend_on_train_eval():
    """eval() changes BatchNorm only: the same fake-quantized weights / inputs in both modes."""
    torch.manual_seed(0)
    m = quantize_modules(_float_model(MLP), w_bits=4, a_bits=4)
    x = _digits()[0][:32]
    m.train()
    y_train = m(x)
    m.eval()
    assert torch.equal(m(x), y_train)


# ------------------------------------------------------------------ open bugs (see the reasons)
def test_quantize_modules_keeps_tied_weights():
    m = MLP()
    m.f2.weight = m.f1.weight
    quantize_modules(m, w_bits=4, a_bits=4)
    assert m.f2.weight is m.f1.weight


def test_packed_linear_from_linear_refuses_a_qat_layer():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 32), w_bits=4, a_bits=8)
    with pytest.raises(TypeError):
        PackedLinear.from_linear(q, bits=4, group_size=64)
