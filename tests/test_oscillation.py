"""oscillation_update / dampening_loss: kernels vs reference, every CPU ISA, Triton
(interpreter), opcheck, the official algorithm, bad input, quantkern.qat, DDP."""
from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkern as qk
from quantkern import ops
REF = importlib.import_module("quantkern.reference.fake_quant_lsq")  # the package re-exports a function of that name
from quantkern.reference import oscillation as R

from _isa import ISAS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=ISAS)
def isa(request):
    old = qk.get_cpu_capability()
    qk.set_cpu_capability(request.param)
    yield request.param
    qk.set_cpu_capability(old)


# ------------------------------------------------------------------ samples
def _case(shape, gran, qmin, qmax, dtype, seed, group_size=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if gran == "tensor":
        s = torch.rand(1, generator=g) * 0.2 + 0.2
        b = torch.randn(1, generator=g) * 0.05
        axis = None
    elif gran in ("channel", "last"):  # "last": the channel axis is the last one (inner == 1)
        axis = 0 if gran == "channel" else len(shape) - 1
        s = torch.rand(shape[axis], generator=g) * 0.2 + 0.2
        b = torch.randn(shape[axis], generator=g) * 0.05
    else:
        axis = None
        s = torch.rand(shape[0], shape[1] // group_size, generator=g) * 0.2 + 0.2
        b = torch.randn(shape[0], shape[1] // group_size, generator=g) * 0.05
    if qmin >= 0:  # unsigned grid: shift the weights into range
        w = w.abs() * (qmax / 6) * s.max()
    return dict(w=w.to(dtype), s=s, b=b, qmin=qmin, qmax=qmax, axis=axis, group_size=group_size)


SAMPLES = [
    ((1,), "tensor", -8, 7, None),
    ((3,), "tensor", -4, 3, None),
    ((127,), "tensor", -8, 7, None),
    ((4097,), "tensor", -2, 1, None),
    ((16, 3, 3, 3), "channel", -8, 7, None),     # conv
    ((32, 1, 3, 3), "channel", -4, 3, None),     # depthwise conv, 3-bit
    ((33, 70), "channel", -128, 127, None),      # 8-bit
    ((24, 129), "channel", 0, 15, None),         # unsigned 4-bit, odd K
    ((6, 128), "group", -8, 7, 32),
    ((5, 96), "group", -4, 3, 48),
    ((40, 1), "channel", -8, 7, None),           # inner == 1: per-element parameters
    ((37, 5), "last", -8, 7, None),              # short last channel axis: many rows per tile
    ((5000, 7), "last", -4, 3, None),            # ... several such tiles, the last one partial
]


def _walk(w, s_view, t, g):
    """Next latent weight: random drift plus an alternating push on half the weights (so they oscillate)."""
    wf = w.float()
    # g is a CPU generator: draw on the CPU, then move (the CUDA test used to mix devices here)
    push = (torch.where(torch.rand(wf.shape, generator=g) < 0.5, 0.6, 0.05) * (-1) ** t).to(wf.device)
    return (wf + s_view * (push + 0.1 * torch.randn(wf.shape, generator=g).to(wf.device))).to(w.dtype)


def _run_steps(c, steps, backend, momentum=0.2, th_after=0.05, warm=3, seed=0):
    from quantkern.reference.fake_quant_lsq import lsq_param_view

    w = c["w"].clone()
    meta, ema = ops.oscillation_init_state(w, c["s"], c["b"], c["qmin"], c["qmax"], axis=c["axis"], group_size=c["group_size"])
    wr, mr, er = w.clone(), meta.clone(), ema.clone()
    s_view = lsq_param_view(w.float(), c["s"], c["axis"], c["group_size"])
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, dtype=torch.int64)
    for t in range(steps):
        w = _walk(w, s_view, t, g)
        wr = w.clone()
        th = 0.0 if t < warm else th_after
        cnt = ops.oscillation_update(w, c["s"], c["b"], meta, ema, c["qmin"], c["qmax"], axis=c["axis"],
                                     group_size=c["group_size"], momentum=momentum, freeze_threshold=th, backend=backend)
        wr, mr, er, cr = R.oscillation_update(wr, c["s"], c["b"], mr, er, c["qmin"], c["qmax"], c["axis"],
                                              c["group_size"], momentum, th)
        assert torch.equal(meta, mr), f"step {t}: meta differs at {(meta != mr).sum().item()} weights"
        assert torch.equal(cnt, cr), f"step {t}: counts {cnt.tolist()} vs {cr.tolist()}"
        torch.testing.assert_close(ema, er, rtol=0, atol=1e-6)
        assert torch.equal(w, wr), f"step {t}: weights differ"
        total += cnt.cpu()
    return total, meta


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"{s[1]}{list(s[0])}q{s[2]}..{s[3]}")
def test_update_matches_reference(isa, sample, dtype):
    shape, gran, qmin, qmax, gs = sample
    c = _case(shape, gran, qmin, qmax, dtype, seed=SAMPLES.index(sample), group_size=gs)
    total, meta = _run_steps(c, steps=12, backend="native")
    if math.prod(shape) >= 100:  # the walk makes weights oscillate and freeze
        assert total[0] > 0
        assert R.decode_state(meta)["frozen"].any()


@pytest.mark.parametrize("freeze", [0.0, 0.5])
def test_nan_weight_keeps_q_prev_zero_as_the_reference(isa, freeze):
    # NaN -> int is undefined behaviour in C++ (UBSan found it in the scalar loop and the SIMD tails):
    # a NaN weight's q_prev is stored as 0 on every ISA, as the reference's .to(int64) & 0xFF gives
    w = torch.randn(4, 17)  # 17 columns: one tail element per row on AVX2 / AVX-512
    s, b = torch.full((4,), 0.1), torch.zeros(4)
    meta, ema = ops.oscillation_init_state(w, s, b, -8, 7, axis=0)
    w[1, 16] = w[2, 3] = float("nan")
    wr, mr, er = w.clone(), meta.clone(), ema.clone()
    cnt = ops.oscillation_update(w, s, b, meta, ema, -8, 7, axis=0, freeze_threshold=freeze)
    wr, mr, er, cr = R.oscillation_update(wr, s, b, mr, er, -8, 7, 0, None, 0.01, freeze)
    assert torch.equal(meta, mr) and torch.equal(cnt, cr)
    assert int(meta[1, 16]) & 0xFF == 0 and int(meta[2, 3]) & 0xFF == 0


def test_update_large_parallel_tiles(isa):
    # several tiles of both kinds (rows > tile, many short rows) and thread-count independence
    for shape in [(3, 40000), (3000, 9)]:
        c = _case(shape, "channel", -4, 3, torch.float32, seed=1)
        _run_steps(c, steps=4, backend="native", warm=1)


def test_update_no_freezing_keeps_ema_and_live():
    c = _case((50, 20), "channel", -8, 7, torch.float32, seed=3)
    total, meta = _run_steps(c, steps=6, backend="native", th_after=0.0)
    st = R.decode_state(meta)
    assert not st["frozen"].any() and not st["ema_live"].any()


def test_frozen_weights_quantize_to_frozen_integer_after_scale_changes():
    c = _case((64, 32), "channel", -4, 3, torch.float32, seed=5)
    _, meta = _run_steps(c, steps=12, backend="native", momentum=0.3, th_after=0.05, warm=2)
    st = R.decode_state(meta)
    assert st["frozen"].sum() > 10
    # the scale keeps training: the next step rewrites frozen weights on the new grid
    w = c["w"].clone()
    meta2, ema2 = ops.oscillation_init_state(w, c["s"], c["b"], -4, 3, axis=0)
    meta2.copy_(meta)
    s2 = c["s"] * 1.37
    ops.oscillation_update(w, s2, c["b"], meta2, ema2, -4, 3, axis=0, momentum=0.3, freeze_threshold=0.05)
    q = R.integer_of(w, s2, c["b"], -4, 3, 0)
    fz = st["frozen"]
    assert torch.equal(q[fz].long(), st["q_prev"][fz])
    assert torch.equal(R.decode_state(meta2)["q_prev"][fz], st["q_prev"][fz])


# ------------------------------------------------------------------ official algorithm
def test_compact_reference_matches_official_algorithm():
    """Our compact-state algorithm vs the official TrackOscillation (restated): identical
    integers, directions and freezing decisions; frequency within the fixed-point ulp."""
    torch.manual_seed(0)
    n = 20000
    s, b = torch.tensor([0.1]), torch.tensor([0.0])
    w = (torch.randint(-6, 6, (n,)) + 0.5 + 0.05 * torch.randn(n)) * 0.1
    m = 0.05
    off = R.OfficialTracker(-8, 7, momentum=m, freeze_threshold=0.0)
    meta, ema = R.init_state(w, s, b, -8, 7)
    off.step(w, s, b)  # the official wrapper initialises on its first call
    frozen_off_prev = torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    for t in range(80):
        w = w + 0.1 * (torch.where(torch.rand(n, generator=g) < 0.3, 0.7, 0.1) * (-1) ** t
                       + 0.15 * torch.randn(n, generator=g))
        th = 0.0 if t < 20 else 0.15
        off.freeze_threshold = th
        off.step(w, s, b)
        _, meta, ema, cnt = R.oscillation_update(w, s, b, meta, ema, -8, 7, None, None, m, th)
        st = R.decode_state(meta)
        # weights not frozen (ours keeps the frozen integer in q_prev; official keeps tracking)
        live = ~off.frozen if off.frozen is not None else torch.ones(n, dtype=torch.bool)
        assert torch.equal(st["q_prev"][live].float(), off.prev_x_int[live])
        assert torch.equal((-st["last_dir"])[live].float(), off.prev_switch_dir[live])
        f = st["F"].float() / R.FREQ_ONE
        # fixed-point rounding: at most half an ulp per step, decaying: |err| <= 0.5 / (m * FREQ_ONE)
        assert (f[live] - off.ema_oscillation[live]).abs().max() <= 0.5 / (m * R.FREQ_ONE) + 1e-6
        if off.frozen is not None:
            assert torch.equal(st["frozen"], off.frozen)
            fz = off.frozen & ~frozen_off_prev
            assert torch.equal(st["q_prev"][fz].float(), off.frozen_x_int[fz])
            torch.testing.assert_close(ema[~st["frozen"]], off.ema_x_int[~st["frozen"]], rtol=0, atol=1e-5)
            frozen_off_prev = off.frozen.clone()
        # oscillation count: official counts over all weights; ours over unfrozen ones
        assert cnt[0] <= off.oscillated_sum
    assert frozen_off_prev.sum() > 100


def test_fp16_emas_stall_and_fixed_point_does_not():
    """Why the state is fp32 q_ema + 20-bit fixed-point frequency (see csrc/shared/oscillation.h)."""
    m = 0.001
    # integer EMA at 5.3 moving toward q = 6: fp16 stalls (update below half an ulp)
    e16 = torch.tensor(5.3, dtype=torch.float16)
    assert (m * 6 + (1 - m) * e16.float()).half() == e16
    e32 = torch.tensor(5.3)
    assert m * 6 + (1 - m) * e32 != e32
    # frequency decay from 0.0105 for 200 steps: exact vs fp16 vs our fixed point
    f0, steps = 0.0105, 200
    exact = f0 * (1 - m) ** steps
    f16 = torch.tensor(f0, dtype=torch.float16)
    F = torch.tensor(round(f0 * R.FREQ_ONE), dtype=torch.float32)
    om = 1 - torch.tensor(m)
    for _ in range(steps):
        f16 = ((1 - m) * f16.float()).half()
        F = torch.round(om * F)
    err16 = abs(f16.item() - exact) / exact
    errfx = abs(F.item() / R.FREQ_ONE - exact) / exact
    assert errfx < 0.01 and errfx < err16 / 2, (err16, errfx)


def test_state_encode_decode_roundtrip():
    g = torch.Generator().manual_seed(0)
    n = 1000
    q = torch.randint(-128, 128, (n,), generator=g)
    up = torch.randint(0, 2, (n,), generator=g)
    down = (1 - up) * torch.randint(0, 2, (n,), generator=g)
    fz = torch.randint(0, 2, (n,), generator=g)
    live = torch.randint(0, 2, (n,), generator=g)
    F = torch.randint(0, 2**20, (n,), generator=g)
    st = R.decode_state(R.encode_state(q, up, down, fz, live, F))
    assert torch.equal(st["q_prev"], q) and torch.equal(st["F"], F) and torch.equal(st["last_dir"], up - down)
    assert torch.equal(st["frozen"], fz.bool()) and torch.equal(st["ema_live"], live.bool())
    assert R.encode_state(q, up, down, fz, live, F).element_size() * 2 == 8  # meta + ema: 8 bytes per weight


# ------------------------------------------------------------------ dampening
DAMP_SAMPLES = [s for s in SAMPLES if s[0] != (1,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("sample", DAMP_SAMPLES, ids=lambda s: f"{s[1]}{list(s[0])}")
def test_dampening_matches_reference(isa, sample, dtype):
    shape, gran, qmin, qmax, gs = sample
    c = _case(shape, gran, qmin, qmax, dtype, seed=7, group_size=gs)
    norm = shape[0] / math.prod(shape)
    w1 = c["w"].clone().requires_grad_()
    s = c["s"].clone().requires_grad_()
    L = ops.dampening_loss(w1, s, c["b"], qmin, qmax, axis=c["axis"], group_size=gs, norm=norm)
    (3.0 * L).backward()
    w2 = c["w"].clone().requires_grad_()
    L2 = R.dampening_loss(w2, c["s"], c["b"], qmin, qmax, c["axis"], gs, norm)
    (3.0 * L2).backward()
    torch.testing.assert_close(L, L2, rtol=1e-5, atol=1e-7)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), rtol=tol, atol=tol * 1e-2)
    assert s.grad is None  # no gradient to the scale, as in the paper


def test_dampening_matches_official_formula():
    # official: loss = (w_q - clamp(w, x_min, x_max))^2; "kernel_mean" = loss.sum(0).mean()
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    s = torch.rand(8) * 0.1 + 0.1
    sv = s.view(-1, 1, 1, 1)
    wq = torch.round(torch.clamp(w / sv, -8, 7)) * sv
    official = (wq - torch.min(torch.max(w, -8 * sv), 7 * sv)).pow(2).sum(0).mean()
    ours = ops.dampening_loss(w, s, None, -8, 7, axis=0, norm=w.shape[0] / w.numel())
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ triton (interpreter)
@pytest.mark.parametrize("sample", [SAMPLES[2], SAMPLES[5], SAMPLES[8], SAMPLES[10]], ids=lambda s: f"{s[1]}{list(s[0])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_update_matches_reference(sample, dtype):
    pytest.importorskip("triton")
    shape, gran, qmin, qmax, gs = sample
    c = _case(shape, gran, qmin, qmax, dtype, seed=11, group_size=gs)
    _run_steps(c, steps=6, backend="triton", warm=2)


@pytest.mark.parametrize("sample", [SAMPLES[4], SAMPLES[9]], ids=lambda s: f"{s[1]}{list(s[0])}")
def test_triton_dampening_matches_reference(sample):
    pytest.importorskip("triton")
    shape, gran, qmin, qmax, gs = sample
    c = _case(shape, gran, qmin, qmax, torch.float32, seed=7, group_size=gs)
    w1 = c["w"].clone().requires_grad_()
    L = ops.dampening_loss(w1, c["s"], c["b"], qmin, qmax, axis=c["axis"], group_size=gs, norm=0.3, backend="triton")
    L.backward()
    w2 = c["w"].clone().requires_grad_()
    L2 = R.dampening_loss(w2, c["s"], c["b"], qmin, qmax, c["axis"], gs, 0.3)
    L2.backward()
    torch.testing.assert_close(L, L2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-8)
    # the backward with grad != 1 rounds grad * norm * 2 once, bit for bit as the native kernel
    args = (c["w"], c["s"], c["b"], qmin, qmax, c["axis"], gs, 0.3)
    g = torch.tensor(0.37)
    assert torch.equal(torch.ops.quantkern.dampening_loss_backward_triton(g, *args),
                       torch.ops.quantkern.dampening_loss_backward(g, *args))


def test_triton_dampening_gradient_of_nonfinite_weights():
    # the native kernel multiplies by the inside mask (a NaN weight gives a NaN gradient); Triton
    # selected 0 there
    pytest.importorskip("triton")
    grads = []
    for be in ("native", "triton"):
        w = torch.tensor([0.1, float("nan"), float("inf"), -float("inf"), 0.3], requires_grad=True)
        ops.dampening_loss(w, torch.tensor([0.2]), None, -8, 7, backend=be).backward()
        grads.append(w.grad)
    assert torch.equal(grads[0].nan_to_num(7.0), grads[1].nan_to_num(7.0)) and grads[1][1].isnan()


def _bf16_store_kernel():
    """A Triton kernel storing fp32 -> bf16 through the kernels' ``_cast_out`` (a jit function resolves
    the names it calls in its module's globals: defined here, not inside the test)."""
    import triton
    import triton.language as tl

    from quantkern.triton_kernels.fake_quant_lsq import _cast_out

    globals()["_cast_out"] = _cast_out

    @triton.jit
    def store(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, _cast_out(tl.load(x_ptr + i, mask=i < n), tl.bfloat16), mask=i < n)

    return store


def test_triton_bf16_nan_gradient_stays_nan():
    # the bf16 store rounded by hand with no NaN case: NaN 0x7FFFFFFF (what a GPU's fp32 NaN results are)
    # became -0.0, a NaN upstream gradient a zero weight gradient
    pytest.importorskip("triton")
    import quantkern.triton_kernels  # noqa: F401
    from _triton_dev import triton_device

    dev = triton_device()
    store = _bf16_store_kernel()

    # the NaN patterns as a GPU produces them, +-inf, a value that rounds up
    bits = torch.tensor([0x7FFFFFFF, 0x7FFF8000, -1, 0x7F800000, 0x3F808000], dtype=torch.int32)
    y = torch.empty(5, dtype=torch.bfloat16, device=dev)
    store[(1,)](bits.view(torch.float32).to(dev), y, 5, BLOCK=8)
    assert y[:3].isnan().all() and torch.equal(y[3:].cpu(), bits[3:].view(torch.float32).to(torch.bfloat16))
    w = (torch.randn(8, generator=torch.Generator().manual_seed(0)) * 0.3).to(torch.bfloat16)
    s, b = torch.tensor([0.1]), torch.tensor([0.0])
    g = torch.tensor(float("nan"))
    out = {be: getattr(torch.ops.quantkern, "dampening_loss_backward" + be)(g, w, s, b, -8, 7, None, None, 1.0)
           for be in ("", "_triton")}
    assert out["_triton"].dtype == torch.bfloat16 and out["_triton"].isnan().all() and out[""].isnan().all()


# ------------------------------------------------------------------ opcheck
def _opcheck_args(triton=False):
    c = _case((16, 3, 3, 3), "channel", -4, 3, torch.float32, seed=2)
    meta, ema = ops.oscillation_init_state(c["w"], c["s"], c["b"], -4, 3, axis=0)
    sfx = "_triton" if triton else ""
    osc = (getattr(torch.ops.quantkern, "oscillation_update" + sfx),
           (c["w"].clone(), c["s"], c["b"], meta, ema, -4, 3, 0, None, 0.1, 0.05))
    damp = (getattr(torch.ops.quantkern, "dampening_loss" + sfx),
            (c["w"].clone().requires_grad_(), c["s"], c["b"], -4, 3, 0, None, 0.5))
    return osc, damp


@pytest.mark.parametrize("triton", [False, True], ids=["native", "triton"])
def test_opcheck(triton):
    if triton:
        pytest.importorskip("triton")
        import quantkern.triton_kernels  # noqa: F401
    (op1, a1), (op2, a2) = _opcheck_args(triton)
    torch.library.opcheck(op1, a1)
    torch.library.opcheck(op2, a2)


def test_registered_native_kernels():
    for name in ("oscillation_update", "dampening_loss", "dampening_loss_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkern::{name}", "CPU")
        if qk._load._C.built_with_cuda():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkern::{name}", "CUDA")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        ["nvcc", "-std=c++17", "-DQK_KERNELS_ONLY", "-O1", "--expt-relaxed-constexpr", "-arch=sm_80", "-c",
         os.path.join(root, "csrc/cuda/oscillation.cu"), "-o", str(tmp_path / "osc.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_matches_reference(backend):
    c = _case((64, 3, 3, 3), "channel", -4, 3, torch.float32, seed=2)
    c = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    _run_steps(c, steps=8, backend=backend)


# ------------------------------------------------------------------ bad input
def test_bad_input_errors():
    w = torch.randn(8, 4)
    s, b = torch.rand(8) + 0.1, torch.zeros(8)
    meta, ema = ops.oscillation_init_state(w, s, b, -8, 7, axis=0)
    with pytest.raises(TypeError, match="meta"):
        ops.oscillation_update(w, s, b, meta.float(), ema, -8, 7, axis=0)
    with pytest.raises(ValueError, match="ema shape"):
        ops.oscillation_update(w, s, b, meta, ema[:4], -8, 7, axis=0)
    with pytest.raises(ValueError, match="int8"):
        ops.oscillation_update(w, s, b, meta, ema, 0, 255, axis=0)
    with pytest.raises(ValueError, match="contiguous"):
        wt = torch.randn(4, 8).t()
        ops.oscillation_update(wt, s, b, meta, ema, -8, 7, axis=0)
    with pytest.raises(ValueError, match="momentum"):
        ops.oscillation_update(w, s, b, meta, ema, -8, 7, axis=0, momentum=0.0)
    with pytest.raises(ValueError, match="per-channel scale"):
        ops.oscillation_update(w, s[:3], b[:3], meta, ema, -8, 7, axis=0)
    with pytest.raises(TypeError, match="weight"):
        ops.dampening_loss(w.long(), s, b, -8, 7, axis=0)
    # the C++ checks name the argument too (torch.ops bypasses the Python checks)
    with pytest.raises(RuntimeError, match="meta must be int32"):
        torch.ops.quantkern.oscillation_update(w, s, b, meta.float(), ema, -8, 7, 0, None, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="scale must be positive"):
        torch.ops.quantkern.oscillation_update(w, -s, b, meta, ema, -8, 7, 0, None, 0.1, 0.0)


@pytest.mark.parametrize("bad", [0.0, -0.3, float("nan"), float("inf")])
def test_init_state_refuses_bad_scale_and_offset(bad):
    # oscillation_init_state encoded garbage starting integers without a word
    # (NaN scale -> 0 everywhere, negative scale -> the mirrored integer).
    w = torch.randn(8, 4)
    s, b = torch.rand(8) + 0.1, torch.zeros(8)
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        ops.oscillation_init_state(w, s.clone().index_fill_(0, torch.tensor([3]), bad), b, -8, 7, axis=0)
    if bad != bad or abs(bad) == float("inf"):
        with pytest.raises(ValueError, match="offset must be finite"):
            ops.oscillation_init_state(w, s, b.clone().index_fill_(0, torch.tensor([3]), bad), -8, 7, axis=0)


def test_init_state_refuses_non_finite_weights():
    # a NaN weight started as integer 0 (and an inf one at qmax) without a word
    w, s = torch.randn(8, 4), torch.rand(8) + 0.1
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight must be finite"):
            ops.oscillation_init_state(w.clone().index_fill_(0, torch.tensor([2]), bad), s, None, -8, 7, axis=0)


@pytest.mark.parametrize("bad", ["a", float("nan"), float("inf"), True, None])
def test_tracker_refuses_bad_thresholds(bad):
    from quantkern import qat
    from quantkern.nn import QuantLinear

    model = nn.Sequential(QuantLinear(8, 4, w_bits=4))
    model(torch.randn(2, 8))
    if bad is not None:  # None is the default of step(), not of the constructor
        with pytest.raises(ValueError, match="freeze_threshold must be a finite number"):
            qat.OscillationTracker(model, freeze_threshold=bad)
    tracker = qat.OscillationTracker(model)
    if bad is not None:
        with pytest.raises(ValueError, match="freeze_threshold must be a finite number"):
            tracker.step(freeze_threshold=bad)
    with pytest.raises(ValueError, match="momentum"):
        qat.OscillationTracker(model, momentum="a" if bad is None else bad)


def test_raw_ops_refuse_axis_and_group_size_together():
    # the raw ops used group_size and ignored axis; ops.* already refused both
    x, s = torch.randn(3, 8), torch.ones(3, 2)
    for fn, args in ((torch.ops.quantkern.fake_quant_lsq, (x, s, torch.zeros(3, 2), -8, 7, 0, 4, 1.0)),
                     (torch.ops.quantkern.dampening_loss, (x, s, torch.zeros(3, 2), -8, 7, 0, 4, 1.0))):
        with pytest.raises(RuntimeError, match="either axis or group_size, not both"):
            fn(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True])
def test_dampening_refuses_bad_norm(bad):
    # norm went straight into the kernel: a NaN / inf / negative loss with no error
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="norm must be a finite number >= 0"):
        ops.dampening_loss(w, torch.rand(8) + 0.1, None, -8, 7, axis=0, norm=bad)
    from quantkern import qat

    # DampeningLoss checks its own lambda, so the error names weighting (not the op's norm = lambda * norm_l)
    model = nn.Sequential(StandinQLinear(4, 8))
    with pytest.raises(ValueError, match="DampeningLoss: weighting must be a finite number >= 0"):
        qat.DampeningLoss(model)(weighting=bad)
    with pytest.raises(ValueError, match="DampeningLoss: weighting must be a finite number >= 0"):
        qat.DampeningLoss(model, weighting=bad)


# ------------------------------------------------------------------ quantkern.qat
class StandinLSQ(nn.Module):
    """The LSQQuantizer contract of quantkern.nn (scale/offset Parameters, qmin/qmax, per-channel axis 0)."""

    eps = 1e-8

    def __init__(self, bits, shape, granularity="channel", group_size=None):
        super().__init__()
        self.qmin, self.qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        self.granularity, self.axis, self.group_size = granularity, 0, group_size
        pshape = {"channel": (shape[0],), "tensor": (1,), "group": (shape[0], math.prod(shape[1:]) // (group_size or 1))}[granularity]
        self.scale = nn.Parameter(torch.ones(pshape))
        self.offset = nn.Parameter(torch.zeros(pshape))
        self.initialized = False

    def forward(self, x):
        if not self.initialized:
            with torch.no_grad():
                rows = x.detach().reshape(x.shape[0], -1) if self.granularity != "tensor" else x.detach().reshape(1, -1)
                if self.granularity == "group":
                    rows = rows.reshape(-1, self.group_size)
                self.scale.copy_((2 * rows.abs().mean(1) / math.sqrt(self.qmax)).reshape(self.scale.shape))
            self.initialized = True
        s = self.scale.abs().clamp_min(self.eps)
        if self.granularity == "group":
            y = ops.fake_quant_lsq(x.reshape(x.shape[0], -1), s, self.offset, self.qmin, self.qmax, group_size=self.group_size)
            return y.reshape(x.shape)
        axis = 0 if self.granularity == "channel" else None
        return ops.fake_quant_lsq(x, s, self.offset, self.qmin, self.qmax, axis=axis)


class StandinQConv(nn.Conv2d):
    def __init__(self, *a, bits=3, granularity="channel", group_size=None, **k):
        super().__init__(*a, **k)
        self.weight_quantizer = StandinLSQ(bits, self.weight.shape, granularity, group_size)

    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class StandinQLinear(nn.Linear):
    def __init__(self, *a, bits=3, granularity="channel", group_size=None, **k):
        super().__init__(*a, **k)
        self.weight_quantizer = StandinLSQ(bits, self.weight.shape, granularity, group_size)

    def forward(self, x):
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        StandinQConv(1, 8, 3, padding=1, bits=3), nn.BatchNorm2d(8), nn.ReLU(),
        StandinQConv(8, 8, 3, padding=1, groups=8, bits=3, granularity="tensor"), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        StandinQLinear(32, 10, bits=4, granularity="group", group_size=16),
    )


def _train(model, steps, seed, tracker=None, damp=None, thr=None, lam=None, lr=0.05):
    from quantkern import qat  # noqa: F401

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for t in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        if damp is not None:
            loss = loss + damp(lam(t) if lam else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tracker is not None:
            tracker.step(thr(t) if thr else None)


def test_tracker_attaches_and_freezes_weights_in_place():
    from quantkern import qat

    model = _tiny_model()
    model(torch.randn(2, 1, 8, 8))  # initialise the quantizers
    tracker = qat.OscillationTracker(model, momentum=0.1)
    assert set(tracker.tracked) == {"0", "3", "8"}
    with pytest.raises(RuntimeError, match="before the first step"):
        tracker.frozen_mask("0")
    with pytest.raises(KeyError, match="no tracked layer"):
        tracker.decode("nope")
    thr = qat.freeze_threshold_schedule(40, 0.3, 0.05)
    _train(model, 40, seed=0, tracker=tracker, thr=thr, lr=0.2)
    met = tracker.metrics()
    assert sum(m["frozen_frac"] for m in met.values()) > 0
    # frozen weights: state, integer and gradient
    for name, t in tracker.tracked.items():
        fz = tracker.frozen_mask(name)
        if not fz.any():
            continue
        L = t.layer
        s, b = L.params()
        q = R.integer_of(L.weight_view(), s, b, L.qmin, L.qmax, L.axis, L.group_size).view(fz.shape)
        assert torch.equal(q[fz].long(), tracker.decode(name)["q_prev"][fz])
        model.zero_grad()
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        assert (L.weight.grad[fz] == 0).all()
    # the state survives a state_dict round trip
    sd = tracker.state_dict()
    t2 = qat.OscillationTracker(model, momentum=0.5, grad_mask=False)
    t2.load_state_dict(sd)
    assert t2.momentum == 0.1  # the checkpoint's
    for n in tracker.tracked:
        assert torch.equal(t2.tracked[n].meta, tracker.tracked[n].meta)
    # names saved through wrappers (DDP's module., torch.compile's _orig_mod.) load too
    wrapped = dict(sd, layers={f"_orig_mod.module.{n}": st for n, st in sd["layers"].items()})
    t3 = qat.OscillationTracker(model, momentum=0.5, grad_mask=False)
    t3.load_state_dict(wrapped)
    for n in tracker.tracked:
        assert torch.equal(t3.tracked[n].meta, tracker.tracked[n].meta)
    with pytest.raises(ValueError, match="momentum"):
        qat.OscillationTracker(model, momentum=True)


@pytest.mark.parametrize("frozen_grad", ["official", "grid"])
def test_frozen_weights_give_the_scale_the_official_gradient(frozen_grad):
    # official: a frozen integer is a constant in the quantizer's forward, so q_frozen * s + beta gives
    # the scale q_frozen and the offset 1 (x the LSQ gradient scale), the weight 0. "grid": the
    # weight sits on its grid point: the plain LSQ gradient (0 inside the range).
    from quantkern import qat

    model = _tiny_model(seed=3)
    model(torch.randn(2, 1, 8, 8))
    tracker = qat.OscillationTracker(model, momentum=0.1, frozen_grad=frozen_grad)
    _train(model, 40, seed=1, tracker=tracker, thr=qat.freeze_threshold_schedule(40, 0.3, 0.05), lr=0.2)
    checked = 0
    for name, t in tracker.tracked.items():
        fz = tracker.frozen_mask(name)
        if not fz.any():
            continue
        L, q = t.layer, t.layer.quantizer
        model.zero_grad()
        out = q(L.weight)
        P = torch.randn(out.shape, generator=torch.Generator().manual_seed(checked))
        (out * P).sum().backward()
        wv, P2 = L.weight_view(), P.reshape(fz.shape)
        s, b = L.params()
        with torch.no_grad():  # values: the fake-quant's, frozen or not
            torch.testing.assert_close(out.reshape(fz.shape), REF.fake_quant_lsq(wv, s, b, L.qmin, L.qmax, L.axis,
                                                                                  L.group_size), rtol=0, atol=1e-6)
        live = frozen_grad == "grid"
        Pn = P2 if live else P2.masked_fill(fz, 0)
        _, ds, db = REF.fake_quant_lsq_backward(Pn, wv, s, b, L.qmin, L.qmax, L.axis, L.group_size, 1.0)
        if not live:
            qf = tracker.decode(name)["q_prev"].reshape(fz.shape).float()
            ds = ds + REF._reduce_like(torch.where(fz, P2 * qf, 0), s, L.axis, L.group_size)
            db = db + REF._reduce_like(torch.where(fz, P2, 0), b, L.axis, L.group_size)
        ds = ds * torch.sign(q.scale.detach()).reshape(ds.shape)  # the quantizer uses |scale|
        torch.testing.assert_close(q.scale.grad.reshape(ds.shape), ds, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(q.offset.grad.reshape(db.shape), db, rtol=1e-4, atol=1e-4)
        assert (L.weight.grad.reshape(fz.shape)[fz] == 0).all()
        checked += 1
    assert checked
    tracker.remove_hooks()
    assert all(t.fwd_hook is None for t in tracker.tracked.values())


def test_official_frozen_grad_hook_keeps_the_forward_values_bit_for_bit():
    # the hook wrote s * g + (s - s * g).detach(), which is s only up to an ulp: some frozen weights
    # moved by ~6e-8 when the hook was attached
    from quantkern import qat
    from quantkern.nn import quantize_modules

    torch.manual_seed(0)
    m = quantize_modules(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)), w_bits=3, a_bits=None,
                         w_learn_offset=True)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    tr = qat.OscillationTracker(m, momentum=0.3, frozen_grad="official")
    X, Y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for _ in range(20):
        loss = F.cross_entropy(m(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr.step(freeze_threshold=0.2)
    frozen = 0
    for name, t in tr.tracked.items():
        L, q = t.layer, t.layer.quantizer
        with_hook = q(L.weight).detach()
        frozen += int(tr.frozen_mask(name).sum())
        t.fwd_hook.remove()
        assert torch.equal(with_hook, q(L.weight).detach()), name
    assert frozen > 0


def test_official_frozen_grad_with_lsq_quantizer_pickling_and_a_discarded_tracker(tmp_path):
    # the real LSQQuantizer (grad_scale None: 1 / sqrt(N qmax)); torch.save of the whole model with
    # the hook attached; a deleted tracker's hook stops acting
    import gc

    from quantkern import qat
    from quantkern.nn import QuantLinear

    torch.manual_seed(0)
    m = nn.Sequential(QuantLinear(32, 16, w_bits=3), nn.ReLU(), QuantLinear(16, 4, w_bits=3))
    m(torch.randn(4, 32))
    tr = qat.OscillationTracker(m, momentum=0.1, frozen_grad="official")
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
    thr = qat.freeze_threshold_schedule(40, 0.3, 0.05)
    for t in range(40):
        loss = F.cross_entropy(m(torch.randn(16, 32)), torch.randint(0, 4, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr.step(thr(t + 1))
    t0 = tr.tracked["0"]
    fz, L, q = tr.frozen_mask("0"), t0.layer, t0.layer.quantizer
    assert fz.any() and q.grad_scale is None
    m.zero_grad()
    out = q(L.weight)
    P = torch.randn(out.shape)
    (out * P).sum().backward()
    s, b = L.params()
    g = 1 / math.sqrt(L.weight.numel() // s.numel() * L.qmax)
    _, ds, _ = REF.fake_quant_lsq_backward(P.masked_fill(fz, 0), L.weight_view(), s, b, L.qmin, L.qmax, L.axis,
                                           L.group_size, g)
    qf = tr.decode("0")["q_prev"].float()
    ds = (ds + g * REF._reduce_like(torch.where(fz, P * qf, 0), s, L.axis, L.group_size))
    ds = ds * torch.sign(q.scale.detach()).reshape(ds.shape)
    torch.testing.assert_close(q.scale.grad.reshape(ds.shape), ds, rtol=1e-4, atol=1e-5)
    torch.save(m, tmp_path / "m.pt")  # the hook pickles (as a spent one)
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(m2(torch.ones(2, 32)), m(torch.ones(2, 32)))
    with torch.no_grad():  # tracker gone: the hook passes the fake-quant's output through unchanged
        L.weight.add_(0.3 * torch.randn_like(L.weight))  # off the grid: the fake-quant now differs
        before = q(L.weight)
    del tr, t0
    gc.collect()
    with torch.no_grad():
        after = q(L.weight)
    s, b = L.params()
    want = REF.fake_quant_lsq(L.weight_view(), s, b, L.qmin, L.qmax, L.axis, L.group_size)
    assert not torch.equal(before, want) and torch.equal(after, want)


def test_tracker_channels_last_weights():
    """A channels_last conv model: the tracker updates a contiguous copy and writes it back."""
    from quantkern import qat

    torch.manual_seed(0)
    model = nn.Sequential(
        StandinQConv(1, 8, 3, padding=1, bits=3), nn.BatchNorm2d(8), nn.ReLU(),
        StandinQConv(8, 8, 3, padding=1, bits=3), nn.BatchNorm2d(8), nn.ReLU(),  # dense: really channels_last
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        StandinQLinear(32, 10, bits=4, granularity="group", group_size=16),
    ).to(memory_format=torch.channels_last)
    model(torch.randn(2, 1, 8, 8))
    assert not model[3].weight.is_contiguous()
    tracker = qat.OscillationTracker(model, momentum=0.1)
    _train(model, 30, seed=0, tracker=tracker, thr=qat.freeze_threshold_schedule(30, 0.3, 0.05), lr=0.2)
    assert sum(m["frozen_frac"] for m in tracker.metrics().values()) > 0
    for name, t in tracker.tracked.items():
        fz = tracker.frozen_mask(name)
        L = t.layer
        s, b = L.params()
        q = R.integer_of(L.weight_view(), s, b, L.qmin, L.qmax, L.axis, L.group_size).view(fz.shape)
        assert torch.equal(q[fz].long(), tracker.decode(name)["q_prev"][fz])


def test_tracker_matches_reference_over_training():
    """The qat wrapper + kernel give the same state as the reference fed the same weights."""
    from quantkern import qat

    model = _tiny_model(1)
    model(torch.randn(2, 1, 8, 8))
    tracker = qat.OscillationTracker(model, momentum=0.1, grad_mask=False)
    ref = {}
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for t in range(15):
        x = torch.randn(8, 1, 8, 8, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        th = 0.0 if t < 5 else 0.1
        snap = {n: (tt.layer.weight_view().clone(), *tt.layer.params()) for n, tt in tracker.tracked.items()}
        tracker.step(th)
        for n, tt in tracker.tracked.items():
            L = tt.layer
            w, s, b = snap[n]
            if n not in ref:
                ref[n] = R.init_state(w, s, b, L.qmin, L.qmax, L.axis, L.group_size)
            nw, nm, ne, _ = R.oscillation_update(w, s, b, *ref[n], L.qmin, L.qmax, L.axis, L.group_size, 0.1, th)
            ref[n] = (nm, ne)
            assert torch.equal(tt.meta, nm)
            assert torch.equal(L.weight_view(), nw)


def test_dampening_loss_module_and_schedules():
    from quantkern import qat

    model = _tiny_model()
    model(torch.randn(2, 1, 8, 8))
    damp = qat.DampeningLoss(model)
    lam = qat.dampening_schedule(100, 0.1)
    assert lam(0) == 0.0 and lam(24) == 0.0 and abs(lam(100) - 0.1) < 1e-12 and 0 < lam(60) < 0.1
    thr = qat.freeze_threshold_schedule(100, 0.1, 0.01)
    assert thr(10) == 0.0 and abs(thr(25) - 0.1) < 1e-12 and abs(thr(100) - 0.01) < 1e-12
    assert damp(0.0).item() == 0.0
    loss = damp(0.5)
    expect = 0.0
    for L in qat.quantized_layers(model):
        s, b = L.params()
        w = L.weight_view()
        expect += 0.5 * R.dampening_loss(w, s, b, L.qmin, L.qmax, L.axis, L.group_size, w.shape[0] / w.numel())
    torch.testing.assert_close(loss, expect.reshape(()), rtol=1e-5, atol=1e-8)
    loss.backward()
    assert all(L.weight.grad is not None for L in qat.quantized_layers(model))
    assert all(L.quantizer.scale.grad is None for L in qat.quantized_layers(model))


@pytest.mark.parametrize("kw,match", [
    (dict(total_steps=0.5), "total_steps must be a positive integer"),   # int() made it 0: t < 0, values past start
    (dict(total_steps=10.5), "total_steps must be a positive integer"),  # silently truncated to 10
    (dict(total_steps=True), "total_steps must be a positive integer"),
    (dict(total_steps=100, start=float("nan")), "start must be a finite number"),
    (dict(total_steps=100, end=float("inf")), "end must be a finite number"),
    (dict(total_steps=100, start="a"), "start must be a finite number"),
])
def test_cosine_schedule_refuses_bad_arguments(kw, match):
    from quantkern import qat

    kw = {"start": 0.1, "end": 0.01, **kw}
    with pytest.raises(ValueError, match=match):
        qat.CosineSchedule(**kw)
    assert qat.CosineSchedule(0.1, 0.01, 1e4)(10000) == pytest.approx(0.01)  # an integral float is fine


def test_reestimate_bn_stats_is_average_of_batch_stats():
    from quantkern import qat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5))
    model.train()
    batches = [torch.randn(8, 2, 5, 5) * (i + 1) for i in range(4)]
    n = qat.reestimate_bn_stats(model, [(x, 0) for x in batches], num_batches=3)
    assert n == 3
    with torch.no_grad():
        feats = [model[0](x) for x in batches[:3]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.3 and model.training and model[2].training
    # a loader with no batch left (a reused iterator) raises and keeps the statistics
    it = iter([(x, 0) for x in batches])
    qat.reestimate_bn_stats(model, it, num_batches=10)
    before = model[1].running_mean.clone(), model[1].running_var.clone()
    with pytest.raises(ValueError, match="no batch"):
        qat.reestimate_bn_stats(model, it)
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])
    # an iterator keeps the batches it was not asked for
    it = iter([(x, 0) for x in batches])
    qat.reestimate_bn_stats(model, it, num_batches=1)
    assert len(list(it)) == 3
    assert qat.reestimate_bn_stats(model, [(x, 0) for x in batches], num_batches=float("inf")) == 4
    assert qat.reestimate_bn_stats(model, [(x, 0) for x in batches], num_batches=2.0) == 2
    import numpy as np  # numpy / torch integers count as integers
    assert qat.reestimate_bn_stats(model, [(x, 0) for x in batches], num_batches=np.int64(3)) == 3
    assert qat.reestimate_bn_stats(model, [(x, 0) for x in batches], num_batches=torch.tensor(2)) == 2
    with pytest.raises(ValueError, match="positive integer"):
        qat.reestimate_bn_stats(model, batches, num_batches=1.5)
    with pytest.raises(ValueError, match="not initialised"):
        qat.reestimate_bn_stats(nn.Sequential(nn.LazyBatchNorm2d()), [torch.randn(2, 3, 4, 4)])


def test_reestimate_bn_stats_keeps_the_statistics_of_a_bn_no_batch_reaches():
    # they were reset to mean 0 / var 1 and stayed so (an auxiliary head used in training only)
    from quantkern import qat

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
            self.aux = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x):
            y = self.main(x)
            return y + self.aux(y) if self.training else y

    net = Net()
    net.aux[1].running_mean.fill_(3.0)
    net.aux[1].running_var.fill_(7.0)
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer\(s\) saw no batch .*'aux.1'"):
        assert qat.reestimate_bn_stats(net, [torch.randn(4, 2, 3, 3) for _ in range(2)]) == 2
    assert (net.aux[1].running_mean == 3).all() and (net.aux[1].running_var == 7).all()
    assert int(net.aux[1].num_batches_tracked) == 0 and int(net.main[1].num_batches_tracked) == 0
    assert not torch.equal(net.main[1].running_var, torch.ones(3))


def test_latent_distance_leaves_out_the_outer_half_bins():
    # v in [qmin - 0.5, qmin) rounds to qmin with no edge below: it was reported near an edge
    from quantkern import qat
    from quantkern.nn import QuantLinear
    from quantkern.qat._layers import quantized_layers

    layer = nn.Sequential(QuantLinear(4, 1, w_bits=4, a_bits=None, w_learn_offset=False))
    layer(torch.randn(2, 4))
    ql = quantized_layers(layer)[0]
    s = float(layer[0].weight_quantizer.scale.detach())
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([[-8.49, -7.9, 6.9, 7.45]]) * s)
    d = qat.latent_distance_to_edge(ql)
    torch.testing.assert_close(d, torch.tensor([0.4, 0.4]), rtol=0, atol=1e-4)


def test_plot_latent_distance(tmp_path):
    from quantkern import qat

    model = _tiny_model()
    model(torch.randn(2, 1, 8, 8))
    p = qat.plot_latent_distance(model, str(tmp_path / "d.png"), groups={"conv": ["0", "3"], "fc": ["8"]})
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    d = qat.latent_distance_to_edge(qat.quantized_layers(model)[0])
    assert d.min() >= 0 and d.max() <= 0.5


def test_plot_latent_distance_keeps_the_matplotlib_backend(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from quantkern import qat

    model = _tiny_model()
    model(torch.randn(2, 1, 8, 8))
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # (a notebook's inline backend: the plot used to switch it to Agg for the session)
    try:
        qat.plot_latent_distance(model, str(tmp_path / "d.png"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


# ------------------------------------------------------------------ DistributedDataParallel
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from quantkern import qat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _tiny_model(0)  # same init on both ranks
        model(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(99)))
        ddp = DDP(model)
        tracker = qat.OscillationTracker(model, momentum=0.1)
        damp = qat.DampeningLoss(model)
        steps = 24
        thr = qat.freeze_threshold_schedule(steps, 0.3, 0.05)
        lam = qat.dampening_schedule(steps, 0.1)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
        g = torch.Generator().manual_seed(1000 + rank)  # different data per rank
        for t in range(steps):
            x = torch.randn(8, 1, 8, 8, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            loss = F.cross_entropy(ddp(x), y) + damp(lam(t))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.step(thr(t))
        params = {k: v.detach().clone() for k, v in model.named_parameters()}  # BN running stats are per rank
        torch.save({"tracker": tracker.state_dict(), "model": params,
                    "metrics": tracker.metrics()}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Free DDP (its reducer holds the process group) and wait for the other rank before the
        # group goes: destroying DDP after the group, once the peer had exited, hung rank 1 at
        # exit in about 1 run of 8.
        del ddp, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_identical_state():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(_ddp_worker, args=(2, init_file, d), nprocs=2, join=True)
        r0 = torch.load(os.path.join(d, "rank0.pt"), weights_only=False)
        r1 = torch.load(os.path.join(d, "rank1.pt"), weights_only=False)
    for n, st in r0["tracker"]["layers"].items():
        assert torch.equal(st["meta"], r1["tracker"]["layers"][n]["meta"]), n
        assert torch.equal(st["ema"], r1["tracker"]["layers"][n]["ema"]), n
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert r0["metrics"] == r1["metrics"]
    assert sum(m["frozen_frac"] for m in r0["metrics"].values()) > 0


# ------------------------------------------------------------------ reproduction script
def test_reproduction_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [os.sys.executable, os.path.join(root, "examples", "oscillation_digits.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| W3A3 | + freezing |" in r.stdout
    assert (tmp_path / "results.md").exists() and (tmp_path / "latent_w3_freeze.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bad_scale_and_grad_device():
    w = torch.randn(8, 4, device="cuda")
    s, b = torch.rand(8, device="cuda") + 0.1, torch.zeros(8, device="cuda")
    meta, ema = ops.oscillation_init_state(w, s, b, -8, 7, axis=0)
    torch.ops.quantkern.oscillation_update(w, s, b, meta, ema, -8, 7, 0, None, 1.0, 1e-6)  # EMA live, freezing on
    s_bad = s.clone()
    s_bad[0] = 0.0
    m0, e0, w0 = meta.clone(), ema.clone(), w.clone()
    torch.ops.quantkern.oscillation_update(w, s_bad, b, meta, ema, -8, 7, 0, None, 0.5, 1e-6)
    # the channel with scale 0 is left untouched (the CPU op raises instead)
    assert torch.equal(meta[0], m0[0]) and torch.equal(ema[0], e0[0]) and torch.equal(w[0], w0[0])
    with pytest.raises(RuntimeError, match="grad of dampening_loss is on cpu"):
        torch.ops.quantkern.dampening_loss_backward(torch.ones(()), w, s, b, -8, 7, 0, None, 1.0)


# ------------------------------------------------------------------ triton bad input (torch.ops bypasses ops.py)
def _bad_triton_cases():
    w = torch.randn(4, 8)
    one, zero = torch.ones(1), torch.zeros(1)
    ch = lambda n: (torch.ones(n), torch.zeros(n))  # noqa: E731
    gr = lambda *s: (torch.ones(*s), torch.zeros(*s))  # noqa: E731
    return [
        ("weight-dtype", (w.double(), one, zero, -8, 7, None, None), "x must"),
        ("scale-dtype", (w, one.double(), zero, -8, 7, None, None), "scale"),
        ("offset-shape", (w, *ch(4)[:1], torch.zeros(2), -8, 7, 0, None), "offset shape"),  # read out of bounds
        ("per-tensor-numel", (w, *ch(3), -8, 7, None, None), "per-tensor scale"),
        ("per-channel-length", (w, *ch(8), -8, 7, 0, None), "per-channel scale"),
        ("group-divides", (w, *gr(4, 2), -8, 7, None, 3), "group_size"),
        ("group-zero", (w, *gr(4, 2), -8, 7, None, 0), "group_size"),
        ("group-scale-numel", (w, *gr(4, 4), -8, 7, None, 4), "per-group scale"),
        ("group-3d", (torch.randn(2, 4, 8), *gr(2, 4, 2), -8, 7, None, 4), "per-group x"),
        ("offset-nan", (w, one, torch.full((1,), float("nan")), -8, 7, None, None), "offset must be finite"),
    ]


BAD_TRITON = _bad_triton_cases()


@pytest.mark.parametrize("name,args,match", BAD_TRITON, ids=[c[0] for c in BAD_TRITON])
def test_triton_bad_input_raises_like_native(name, args, match):
    # The Triton launchers checked only the scale values, qmin < qmax and the axis range: a scale or
    # offset of the wrong size was read out of bounds (silently wrong on CPU, garbage on a GPU), an
    # integer / float64 weight ran, group_size 0 divided by zero inside the kernel.
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    import quantkern.triton_kernels  # noqa: F401

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    w = args[0]
    meta, ema = torch.zeros(w.shape, dtype=torch.int32, device=dev), torch.zeros(w.shape, device=dev)
    Q = torch.ops.quantkern
    if dev == "cpu" and qk._load._C is not None:
        with pytest.raises(RuntimeError, match=match):
            Q.oscillation_update(w.clone(), *args[1:3], meta.clone(), ema.clone(), *args[3:], 0.1, 0.5)
        with pytest.raises(RuntimeError, match=match):
            Q.dampening_loss(*args, 1.0)
    with pytest.raises((ValueError, TypeError), match=match):
        Q.oscillation_update_triton(w.clone(), *args[1:3], meta, ema, *args[3:], 0.1, 0.5)
    with pytest.raises((ValueError, TypeError), match=match):
        Q.dampening_loss_triton(*args, 1.0)
    with pytest.raises((ValueError, TypeError), match=match):
        Q.dampening_loss_backward_triton(torch.ones((), device=dev), *args, 1.0)


def test_triton_bad_scalars_raise_like_native():
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    import quantkern.triton_kernels  # noqa: F401

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w, s, b = torch.randn(4, 8, device=dev), torch.ones(1, device=dev), torch.zeros(1, device=dev)
    meta, ema = torch.zeros(w.shape, dtype=torch.int32, device=dev), torch.zeros(w.shape, device=dev)
    Q = torch.ops.quantkern
    for mom, th, match in ((0.0, 0.5, "momentum"), (2.0, 0.5, "momentum"), (0.1, float("nan"), "freeze_threshold")):
        with pytest.raises(ValueError, match=match):
            Q.oscillation_update_triton(w, s, b, meta, ema, -8, 7, None, None, mom, th)
    with pytest.raises(ValueError, match="grad of dampening_loss must hold one element"):
        Q.dampening_loss_backward_triton(torch.ones(2, device=dev), w, s, b, -8, 7, None, None, 1.0)


@pytest.mark.parametrize("bad", [-0.5, 1.5, 2])
def test_tracker_refuses_threshold_outside_unit_interval(bad):
    # a negative threshold silently turned freezing off (the op reads <= 0 as "off") and one
    # above 1 could never be reached by the frequency EMA: both trained without freezing
    from quantkern import qat

    model = nn.Sequential(StandinQLinear(8, 4))
    with pytest.raises(ValueError, match=r"freeze_threshold must be in \[0, 1\]"):
        qat.OscillationTracker(model, freeze_threshold=bad)
    tracker = qat.OscillationTracker(model)
    with pytest.raises(ValueError, match=r"OscillationTracker.step: freeze_threshold must be in \[0, 1\]"):
        tracker.step(freeze_threshold=bad)
    tracker.step(freeze_threshold=0)  # both ends are fine
    tracker.step(freeze_threshold=1)


def test_tracker_and_helpers_refuse_bad_arguments_naming_them():
    from quantkern import qat

    model = nn.Sequential(StandinQLinear(8, 4))
    # accepted, then failed at the first step()
    with pytest.raises(ValueError, match="OscillationTracker: backend must be one of"):
        qat.OscillationTracker(model, backend="cuda")
    # a truthy string silently turned the gradient masks on
    with pytest.raises(TypeError, match="OscillationTracker: grad_mask must be a bool"):
        qat.OscillationTracker(model, grad_mask="no")
    # "'>' not supported between instances of 'int' and 'str'"
    for bad in ("4", 0, -1, 2.5):
        with pytest.raises(ValueError, match="quantized_layers: max_bits must be a positive int or None"):
            qat.OscillationTracker(model, max_bits=bad)
    assert len(qat.quantized_layers(model, max_bits=4)) == 1


@pytest.mark.parametrize("call,match", [
    (lambda q: q.CosineSchedule(0.1, 0.01, 100, warmup_frac="0.25"), "warmup_frac must be a number in"),  # TypeError '<='
    (lambda q: q.CosineSchedule(0.1, 0.01, 100)(float("nan")), "step must be a finite number"),  # silently gave end
    (lambda q: q.CosineSchedule(0.1, 0.01, 100)("3"), "step must be a finite number"),
    (lambda q: q.freeze_threshold_schedule(100, f_start=2.0), r"f_start must be in \[0, 1\]"),
    (lambda q: q.freeze_threshold_schedule(100, f_end=-0.01), r"f_end must be in \[0, 1\]"),
    (lambda q: q.dampening_schedule(100, lam_max=-0.1), "lam_max must be a finite number >= 0"),
])
def test_schedules_refuse_bad_arguments(call, match):
    from quantkern import qat

    with pytest.raises(ValueError, match=match):
        call(qat)
    s = qat.freeze_threshold_schedule(8, 0.1, 0.01)  # step 0 / before warmup: 0; past the end: f_end
    assert s(0) == 0.0 and s(1) == 0.0 and s(2) == pytest.approx(0.1) and s(8) == s(100) == pytest.approx(0.01)


def test_plot_latent_distance_refuses_unknown_layer_names(tmp_path):
    pytest.importorskip("matplotlib")
    from quantkern import qat

    model = _tiny_model()
    model(torch.randn(2, 1, 8, 8))
    # a misspelt name was skipped: a missing curve (or an empty plot) without a word
    with pytest.raises(KeyError, match=r"\['8x'\]"):
        qat.plot_latent_distance(model, str(tmp_path / "a.png"), groups={"conv": ["0"], "fc": ["8x"]})
    with pytest.raises(ValueError, match="no quantized layer"):
        qat.plot_latent_distance(nn.Sequential(nn.Linear(2, 2)), str(tmp_path / "b.png"))
    assert qat.plot_latent_distance(model, str(tmp_path / "c.png"), groups={"conv": ["0", "3"]}).endswith("c.png")


@pytest.mark.parametrize("kw,match", [
    ({"momentum": True}, "momentum must be in"),  # ran as momentum 1
    ({"freeze_threshold": True}, r"freeze_threshold must be a number in \[0, 1\]"),
    ({"freeze_threshold": -0.5}, r"freeze_threshold must be a number in \[0, 1\]"),  # silently no freezing
    ({"freeze_threshold": 1.5}, r"freeze_threshold must be a number in \[0, 1\]"),  # f <= 1 never exceeds it
    ({"freeze_threshold": float("nan")}, r"freeze_threshold must be a number in \[0, 1\]"),
])
def test_update_refuses_bool_scalars_and_thresholds_outside_unit_interval(kw, match):
    w, s = torch.randn(8, 4), torch.rand(8) + 0.1
    meta, ema = ops.oscillation_init_state(w, s, None, -8, 7, axis=0)
    m0, e0, w0 = meta.clone(), ema.clone(), w.clone()
    with pytest.raises(ValueError, match=match):
        ops.oscillation_update(w, s, None, meta, ema, -8, 7, axis=0, **kw)
    assert torch.equal(meta, m0) and torch.equal(ema, e0) and torch.equal(w, w0)
    for th in (0, 1, 0.0, 1.0):  # both ends are fine, as for OscillationTracker
        ops.oscillation_update(w, s, None, meta, ema, -8, 7, axis=0, momentum=1, freeze_threshold=th)


def test_compile_fullgraph_training_step():
    # a QAT step through torch.compile(fullgraph=True): the SGD step, then the in-place tracking /
    # freezing update, then the loss with the dampening term (its backward runs through AOT autograd);
    # same results as eager
    g = torch.Generator().manual_seed(0)  # not the global RNG: the freezing below depends on the data
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)

    def run(compile_):
        torch.manual_seed(0)
        lin = nn.Linear(8, 4)
        s, b = torch.full((4,), 0.1), torch.zeros(4)
        meta, ema = ops.oscillation_init_state(lin.weight.detach(), s, b, -4, 3, axis=0)

        def step(x, y):
            with torch.no_grad():
                for p in lin.parameters():
                    p -= 1.0 * p.grad  # a learning rate that makes some integers oscillate
            # a constant threshold: each new float value is a recompile (a float schema argument)
            cnt = ops.oscillation_update(lin.weight.data, s, b, meta, ema, -4, 3, axis=0, momentum=0.3,
                                         freeze_threshold=0.05)
            return ((lin(x) - y) ** 2).mean() + 0.1 * ops.dampening_loss(lin.weight, s, b, -4, 3, axis=0, norm=0.5), cnt

        f = torch.compile(step, fullgraph=True, backend="aot_eager") if compile_ else step
        ((lin(x) - y) ** 2).mean().backward()
        out = []
        for _ in range(6):
            loss, cnt = f(x, y)
            lin.zero_grad()
            loss.backward()
            out += [loss.detach(), lin.weight.grad.clone(), cnt]
        return out + [lin.weight.detach(), meta, ema]

    want, got = run(False), run(True)
    assert want[-4][1] > 0  # something froze
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_dampening_loss_checks_backend_up_front():
    from quantkern import qat
    from quantkern.nn import QuantLinear

    model = nn.Sequential(QuantLinear(8, 4, w_bits=4))
    with pytest.raises(ValueError, match="DampeningLoss: backend must be one of"):  # (it failed at the first call)
        qat.DampeningLoss(model, backend="cuda")


def test_dampening_loss_under_torch_func_and_forward_ad():
    # torch.func.grad used to fail with torch's generic "setup_context" error and jvp returned a silent 0
    import torch.autograd.forward_ad as fwAD

    w = torch.randn(6, 8)
    s, b = torch.tensor([0.3]), torch.tensor([0.1])

    def f(u):
        return ops.dampening_loss(u, s, b, -8, 7)

    wg = w.clone().requires_grad_(True)
    f(wg).backward()
    assert torch.equal(torch.func.grad(f)(w), wg.grad)
    assert torch.equal(torch.func.vmap(torch.func.grad(f))(torch.stack([w, 2 * w]))[0], wg.grad)
    with pytest.raises(NotImplementedError):
        torch.func.jvp(f, (w,), (torch.ones_like(w),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        f(fwAD.make_dual(w, torch.ones_like(w)))


def test_dampening_loss_of_infinite_weights_is_the_clamped_formula():
    # clamp(+-inf) is the grid's end, so such a weight adds (end - target)^2 = 0 and no gradient; the
    # reference multiplied inf by its 0 mask and gave NaN where the kernels give the formula's value
    w = torch.tensor([0.1, float("inf"), -float("inf"), 0.3])
    s = torch.tensor([0.2])
    want = R.dampening_loss(w, s, torch.zeros(1), -8, 7)
    assert torch.isfinite(want)
    import importlib.util

    for be in ["native"] + (["triton"] if importlib.util.find_spec("triton") else []):
        torch.testing.assert_close(ops.dampening_loss(w, s, None, -8, 7, backend=be), want)


def test_tracker_and_dampening_on_a_submodules_layers_and_a_replaced_layer():
    from quantkern import qat
    from quantkern.nn import QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(QuantLinear(8, 8, a_bits=None), nn.ReLU()),
                          QuantLinear(8, 2, a_bits=None, w_bits=8))
    model(torch.randn(4, 8))
    layers = qat.quantized_layers(model[0])  # named relative to model[0]: '0' is another module in model
    tracker, damp = qat.OscillationTracker(model, layers=layers), qat.DampeningLoss(model, layers=layers)
    tracker.step()
    damp()
    model[0][0] = QuantLinear(8, 8, a_bits=None)  # replaced after they were built: refused, not skipped
    for f in (tracker.step, damp):
        with pytest.raises(RuntimeError, match="'0' is no longer in the model"):
            f()


def test_tracker_and_dampening_refuse_a_replaced_quantizer_and_grids_beyond_int8():
    # a new weight_quantizer (other bits) was ignored: the tracker rewrote frozen weights onto the old grid
    # and the dampening pulled towards it; an unsigned 8-bit grid was taken and failed at the first step()
    # naming no layer
    from quantkern import qat
    from quantkern.nn import LSQQuantizer, QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(8, 8, a_bits=None))
    model(torch.randn(4, 8))
    tracker, damp = qat.OscillationTracker(model), qat.DampeningLoss(model)
    tracker.step()
    model[0].weight_quantizer = LSQQuantizer(2, True, "channel")
    model(torch.randn(4, 8))
    for f in (tracker.step, damp):
        with pytest.raises(RuntimeError, match="weight_quantizer of layer '0' was replaced"):
            f()
    model[0].weight_quantizer = LSQQuantizer(8, False, "channel")
    model(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"layer '0' has the integer grid \[0, 255\]"):
        qat.OscillationTracker(model, max_bits=None)


def test_tracker_metrics_and_dampening_with_an_empty_layer():
    # metrics() and DampeningLoss divided by the layer's 0 elements
    from quantkern import qat
    from quantkern.nn import QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(4, 8, a_bits=None), QuantLinear(0, 4, a_bits=None))
    model[0](torch.randn(3, 4))
    model[1](torch.randn(3, 0))
    tracker = qat.OscillationTracker(model)
    tracker.step()
    m = tracker.metrics()
    assert m["1"] == {"numel": 0, "frac_oscillating": 0.0, "osc_last_step": 0.0, "frozen_frac": 0.0}
    full = qat.DampeningLoss(model)()
    torch.testing.assert_close(full, qat.DampeningLoss(model, layers=qat.quantized_layers(model)[:1])())


def test_schedules_take_numpy_and_tensor_step_counts():
    import numpy as np

    from quantkern import qat

    for n in (np.int64(100), torch.tensor(100)):
        assert qat.CosineSchedule(1.0, 0.0, n)(100) == 0.0
        assert qat.freeze_threshold_schedule(n)(100) == pytest.approx(0.01)
        assert qat.dampening_schedule(n)(100) == pytest.approx(0.1)


def test_in_place_ops_bump_version_counters():
    # oscillation_update / calib_histogram did not bump the version counters of what they wrote: a backward
    # through a weight that oscillation_update rewrote after dampening_loss saved it used the new values, silently
    w = torch.tensor([[0.04, 0.11, -0.2, 0.3]], requires_grad=True)
    s, b = torch.full((1,), 0.1), torch.zeros(1)
    loss = ops.dampening_loss(w, s, b, -8, 7, axis=0)
    wd = w.detach()
    meta, ema = ops.oscillation_init_state(wd, s, b, -8, 7, axis=0)
    v = w._version
    ops.oscillation_update(wd, s, b, meta, ema, -8, 7, axis=0)
    assert w._version > v and meta._version > 0 and ema._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    pos, neg = torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long)
    ops.calib_histogram(torch.randn(1, 32), pos, neg, torch.full((1,), 4.0), torch.full((1,), 16))
    assert pos._version > 0 and neg._version > 0
