"""quantkern::fake_quant_lsq (CPU native) against quantkern.reference.

One sample list feeds the forward, backward, autograd and opcheck tests. Every
CPU instruction set is forced in turn, so the AVX-512, AVX2 and scalar
variants (and through them the shared per-element math the CUDA kernel uses)
are all checked.
"""
import math

import pytest
import torch

import quantkern
from quantkern import ops, reference as R

import _lsq_cases as C
from _isa import ISAS

DTYPES = C.DTYPES


def _case(shape, axis=None, group_size=None, bits=4, dtype=torch.float32, noncontig=False, edges=False, seed=0):
    x, scale, offset, qmin, qmax = C.lsq_data(shape, axis, group_size, bits, edges=edges, seed=seed)
    x = x.to(dtype)
    if noncontig:
        x = C.noncontig(x)
        assert not x.is_contiguous() or x.dim() == 1
    return dict(x=x, scale=scale, offset=offset, qmin=qmin, qmax=qmax, axis=axis, group_size=group_size)


def sample_inputs():
    """(id, kwargs) pairs: odd shapes, every granularity, bit width and dtype."""
    out = []
    for dtype in DTYPES:
        dn = str(dtype).split(".")[1]
        for n in (1, 3, 127, 4097):
            out.append((f"tensor-{n}-{dn}", _case((n,), dtype=dtype, bits=8)))
        out.append((f"tensor-2d-edges-{dn}", _case((33, 65), dtype=dtype, bits=3, edges=True)))
        out.append((f"channel-ax1-{dn}", _case((3, 127, 5), axis=1, dtype=dtype, bits=4, edges=True)))
        out.append((f"channel-ax0-{dn}", _case((127, 33), axis=0, dtype=dtype, bits=2)))
        out.append((f"channel-last-{dn}", _case((4097, 3), axis=1, dtype=dtype, bits=4)))
        out.append((f"channel-neg-{dn}", _case((2, 3, 4, 5), axis=3, dtype=dtype, bits=8, edges=True)))
        out.append((f"channel-big-inner-{dn}", _case((2, 3, 20000), axis=1, dtype=dtype, bits=4)))
        out.append((f"group32-{dn}", _case((3, 128), group_size=32, dtype=dtype, bits=4, edges=True)))
        out.append((f"group64-odd-rows-{dn}", _case((127, 256), group_size=64, dtype=dtype, bits=3)))
        out.append((f"group128-{dn}", _case((1, 4096), group_size=128, dtype=dtype, bits=2)))
        out.append((f"noncontig-channel-{dn}", _case((65, 31), axis=0, dtype=dtype, bits=4, noncontig=True)))
        out.append((f"noncontig-tensor-{dn}", _case((129,), dtype=dtype, bits=8, noncontig=True)))
    return out


SAMPLES = sample_inputs()
IDS = [s[0] for s in SAMPLES]


@pytest.fixture(params=ISAS)
def isa(request):
    quantkern.set_cpu_capability(request.param)
    yield request.param
    quantkern.set_cpu_capability("auto")


def _call(c):
    return ops.fake_quant_lsq(
        c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], axis=c["axis"], group_size=c["group_size"]
    )


def _bwd_tol(c, g):
    # Sums of up to numel terms of size |g| * max(|qmin|, |qmax|): fp32 reassociation.
    per = c["x"].numel() / max(c["scale"].numel(), 1)
    return 1e-5 * per * max(abs(c["qmin"]), abs(c["qmax"])) + 1e-5


@pytest.mark.parametrize("name,c", SAMPLES, ids=IDS)
def test_forward_matches_reference(isa, name, c):
    y = _call(c)
    ref = R.fake_quant_lsq(c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], c["axis"], c["group_size"])
    assert y.dtype == c["x"].dtype and y.shape == c["x"].shape
    assert torch.equal(y, ref)


@pytest.mark.parametrize("name,c", SAMPLES, ids=IDS)
def test_backward_matches_reference(isa, name, c):
    grad = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(1)).to(c["x"].dtype)
    args = (c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], c["axis"], c["group_size"], 0.37)
    gx, gs, gb = torch.ops.quantkern.fake_quant_lsq_backward(grad, *args)
    rx, rs, rb = R.fake_quant_lsq_backward(grad, *args)
    assert torch.equal(gx, rx)
    tol = _bwd_tol(c, grad)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=tol)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=tol)


def _composite_lsq(x, s, b, qmin, qmax, axis, group_size, g):
    """Textbook LSQ+ with autograd: STE through round, gradient scaling by g (a hook)."""
    s.register_hook(lambda t: t * g)
    b.register_hook(lambda t: t * g)
    xf = x.float()
    sv, bv = R.lsq_param_view(xf, s, axis, group_size), R.lsq_param_view(xf, b, axis, group_size)
    v = torch.clamp((xf - bv) / sv, qmin, qmax)
    q = v + (torch.round(v) - v).detach()
    return (q * sv + bv).to(x.dtype)


@pytest.mark.parametrize("name,c", [s for s in SAMPLES if "float32" in s[0]], ids=[s[0] for s in SAMPLES if "float32" in s[0]])
def test_autograd_matches_composite(name, c):
    g = 1.0 / math.sqrt(c["x"].numel() / c["scale"].numel() * c["qmax"])
    leaves = [c["x"].detach().clone().requires_grad_(), c["scale"].clone().requires_grad_(), c["offset"].clone().requires_grad_()]
    y = ops.fake_quant_lsq(*leaves, c["qmin"], c["qmax"], axis=c["axis"], group_size=c["group_size"], grad_scale=g)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    ours = torch.autograd.grad((y * w).sum(), leaves)
    leaves2 = [t.detach().clone().requires_grad_() for t in leaves]
    y2 = _composite_lsq(*leaves2, c["qmin"], c["qmax"], c["axis"], c["group_size"], g)
    theirs = torch.autograd.grad((y2 * w).sum(), leaves2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    # The composite's dx is (w / s) * s: equal to ours up to one rounding.
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_reference_backward_accepts_a_negative_axis():
    # The reference forward broadcasts a negative axis; its backward summed the scale/offset
    # terms over every dim (a shape error, or a wrong sum when the shapes happened to fit).
    c = _case((3, 7, 5), axis=2, bits=4, edges=True)
    grad = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(4))
    args = (c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"])
    want = R.fake_quant_lsq_backward(grad, *args, 2, None, 0.5)
    got = R.fake_quant_lsq_backward(grad, *args, -1, None, 0.5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(R.fake_quant_lsq(*args, -1), R.fake_quant_lsq(*args, 2))


def test_reference_backward_of_no_rows_per_group():
    # reshape(0, -1, group_size) is ambiguous: the reference raised where the op returns empty gradients
    x, s, b = torch.zeros(0, 8), torch.ones(0, 2), torch.zeros(0, 2)
    gx, gs, gb = R.fake_quant_lsq_backward(torch.zeros(0, 8), x, s, b, -8, 7, None, 4, 1.0)
    assert gx.shape == (0, 8) and gs.shape == gb.shape == (0, 2)
    xs = x.requires_grad_()
    y = ops.fake_quant_lsq(xs, s, b, -8, 7, group_size=4)
    assert y.shape == (0, 8)

def test_offset_none_is_lsq():
    c = _case((64, 32), axis=0, bits=4)
    s = c["scale"].clone().requires_grad_()
    y = ops.fake_quant_lsq(c["x"], s, None, c["qmin"], c["qmax"], axis=0)
    ref = R.fake_quant_lsq(c["x"], c["scale"], torch.zeros_like(c["scale"]), c["qmin"], c["qmax"], 0)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert s.grad is not None and s.grad.shape == s.shape


@pytest.mark.parametrize("name,c", [s for s in SAMPLES if "4097" in s[0] or "group64" in s[0] or "channel-big" in s[0]])
def test_backward_deterministic_across_threads(name, c):
    grad = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(3)).to(c["x"].dtype)
    args = (grad, c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], c["axis"], c["group_size"], 1.0)
    n = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            outs.append(torch.ops.quantkern.fake_quant_lsq_backward(*args))
    finally:
        torch.set_num_threads(n)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_large_per_tensor_many_tiles():
    # > 1 tile per thread and a tail: exercises the partial-sum slots.
    c = _case((3 * 16384 + 17,), bits=8)
    grad = torch.randn(c["x"].shape)
    args = (c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], None, None, 0.5)
    gx, gs, gb = torch.ops.quantkern.fake_quant_lsq_backward(grad, *args)
    rx, rs, rb = R.fake_quant_lsq_backward(grad, *args)
    assert torch.equal(gx, rx)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-2)


def test_special_values():
    s, b = torch.tensor([0.1]), torch.tensor([0.0])
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30])
    y = ops.fake_quant_lsq(x, s, b, -8, 7)
    ref = R.fake_quant_lsq(x, s, b, -8, 7)
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=0, atol=0)


def test_fp16_bf16_rounding_of_output_is_rne():
    # Values whose fp32 result lies exactly between two fp16/bf16 numbers.
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.linspace(-3, 3, 1001)).to(dtype)
        s, b = torch.tensor([1.0 / 3.0]), torch.tensor([1e-3])
        assert torch.equal(ops.fake_quant_lsq(x, s, b, -9, 9), R.fake_quant_lsq(x, s, b, -9, 9))


# ------------------------------------------------------------------ opcheck
OPCHECK = [s for s in SAMPLES if any(k in s[0] for k in ("tensor-3-", "channel-ax1", "group32", "channel-last", "noncontig-channel"))]


@pytest.mark.parametrize("name,c", OPCHECK, ids=[s[0] for s in OPCHECK])
def test_opcheck(name, c):
    x = c["x"].detach().clone().requires_grad_(c["x"].dtype == torch.float32)
    s = c["scale"].clone().requires_grad_(True)
    b = c["offset"].clone().requires_grad_(True)
    args = (x, s, b, c["qmin"], c["qmax"], c["axis"], c["group_size"], 0.5)
    torch.library.opcheck(torch.ops.quantkern.fake_quant_lsq.default, args)
    grad = torch.randn(c["x"].shape).to(c["x"].dtype)
    torch.library.opcheck(torch.ops.quantkern.fake_quant_lsq_backward.default, (grad, c["x"], c["scale"], c["offset"], *args[3:]))


def test_compile_fullgraph_training_step():
    c = _case((64, 96), axis=0, bits=4)
    x = c["x"].clone().requires_grad_()
    s = c["scale"].clone().requires_grad_()
    b = c["offset"].clone().requires_grad_()

    def loss_fn(x, s, b):
        y = ops.fake_quant_lsq(x, s, b, -8, 7, axis=0, grad_scale=0.1)
        return (y * y).sum()

    def grads(fn):
        for t in (x, s, b):
            t.grad = None
        fn(x, s, b).backward()  # the backward graph is compiled by AOTAutograd
        return [t.grad.clone() for t in (x, s, b)]

    eager = grads(loss_fn)
    compiled = grads(torch.compile(loss_fn, fullgraph=True))
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------- errors
def _ok():
    return dict(x=torch.randn(8, 64), scale=torch.full((8,), 0.1), offset=torch.zeros(8), qmin=-8, qmax=7, axis=0)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x=torch.randint(0, 4, (8, 64))), TypeError, "x must have dtype"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(scale=torch.full((8,), 0.1, dtype=torch.float16)), TypeError, "scale must have dtype"),
        (dict(offset=torch.zeros(8, dtype=torch.float64)), TypeError, "offset must have dtype"),
        (dict(scale=torch.full((8,), 0.1, device="meta")), ValueError, "scale is on meta"),
        (dict(scale=torch.full((9,), 0.1), offset=torch.zeros(9)), ValueError, "per-channel scale must be 1-D of length"),
        (dict(offset=torch.zeros(7)), ValueError, "offset shape"),
        (dict(qmin=7, qmax=7), ValueError, "qmin"),
        (dict(qmin=1.5), TypeError, "qmin and qmax must be int"),
        (dict(axis=2), ValueError, "axis 2 out of range"),
        (dict(axis=None), ValueError, "per-tensor needs one element"),
        (dict(axis=None, group_size=48, scale=torch.full((8, 1), 0.1), offset=torch.zeros(8, 1)), ValueError, "does not divide K"),
        (dict(axis=None, group_size=32, scale=torch.full((8, 3), 0.1), offset=torch.zeros(8, 3)), ValueError, "per-group scale must have shape"),
        (dict(axis=None, group_size=0), ValueError, "group_size must be a positive int"),
        (dict(group_size=32), ValueError, "either axis or group_size"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        # bools are ints to Python: these were accepted (groups of 1, a 0..1 grid, axis 1)
        (dict(axis=None, group_size=True, scale=torch.full((8, 64), 0.1), offset=torch.zeros(8, 64)), ValueError,
         "group_size must be a positive int"),
        (dict(qmin=False, qmax=True), TypeError, "qmin and qmax must be int"),
        (dict(axis=True, scale=torch.full((64,), 0.1), offset=torch.zeros(64)), TypeError, "axis must be an int"),
        (dict(axis=0.0), TypeError, "axis must be an int"),
    ],
)
def test_bad_input_raises_clear_error(change, exc, match):
    kw = _ok()
    kw.update(change)
    backend = kw.pop("backend", "auto")
    x, s, b, qmin, qmax = kw.pop("x"), kw.pop("scale"), kw.pop("offset"), kw.pop("qmin"), kw.pop("qmax")
    with pytest.raises(exc, match=match):
        ops.fake_quant_lsq(x, s, b, qmin, qmax, backend=backend, **kw)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_scale_values_raise(bad):
    kw = _ok()
    kw["scale"][3] = bad
    with pytest.raises(RuntimeError, match=r"scale must be positive and finite; scale\[3\]"):
        ops.fake_quant_lsq(kw["x"], kw["scale"], kw["offset"], -8, 7, axis=0)


def test_raw_op_checks_arguments_too():
    # torch.ops.* bypasses quantkern.ops' checks; the kernel must still refuse.
    with pytest.raises(RuntimeError, match="group_size 48 must divide K"):
        torch.ops.quantkern.fake_quant_lsq(torch.randn(4, 64), torch.ones(4, 1), torch.zeros(4, 1), -8, 7, None, 48)
    with pytest.raises(RuntimeError, match="qmin"):
        torch.ops.quantkern.fake_quant_lsq(torch.randn(4), torch.ones(1), torch.zeros(1), 3, 3)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        ops.fake_quant_lsq(torch.randn(4), torch.ones(1), torch.zeros(1), -8, 7, backend="triton")


def test_double_backward_and_dequantize_gradient_are_clear_errors():
    # ops without a second-order / parameter gradient raise instead of PyTorch's warn-and-zero fallback
    x = torch.randn(8, 16, requires_grad=True)
    s = (torch.rand(8) + 0.1).requires_grad_()
    b = torch.zeros(8, requires_grad=True)
    y = quantkern.ops.fake_quant_lsq(x, s, b, -8, 7, axis=0)
    gx, gs, gb = torch.autograd.grad((y * y).sum(), (x, s, b), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(gs.sum(), (x, s, b))
    w = torch.randn(8, 16, requires_grad=True)
    (g,) = torch.autograd.grad(quantkern.ops.dampening_loss(w, s.detach(), b.detach(), -8, 7, axis=0), w,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad((g * g).sum(), w)
    pw = quantkern.PackedWeight.from_float(torch.randn(4, 64), 4, 32)
    sc = pw.scales.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no gradient with respect to scales"):
        torch.ops.quantkern.dequantize(pw.qweight, sc, pw.zeros, 4, 32, 64, torch.float32).sum().backward()



def test_dequantize_refuses_forward_mode_and_transform_derivatives_of_its_metadata():
    # a jvp / forward-AD tangent on the scales was dropped (a zero Jacobian from jacfwd), and torch.func.grad
    # raised torch's generic "autograd.Function ... setup_context" error
    pw = quantkern.PackedWeight.from_float(torch.randn(8, 64), 4, 32)

    def deq(s):
        return quantkern.ops.dequantize(quantkern.PackedWeight(pw.qweight, s, pw.zeros, 4, 32, (8, 64)), torch.float32)

    for f in (torch.func.grad(lambda s: deq(s).sum()), torch.func.jacfwd(deq), torch.func.jacrev(deq),
              lambda s: torch.func.jvp(deq, (s,), (torch.ones_like(s),))):
        with pytest.raises(RuntimeError, match="dequantize: no gradient with respect to scales"):
            f(pw.scales)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="no gradient with respect to scales"):
        deq(fwAD.make_dual(pw.scales, torch.ones_like(pw.scales)))
    ref = pw.dequantize(torch.float32)  # vmap over the scales, and a transform of something else, still work
    out = torch.func.vmap(deq)(torch.stack([pw.scales, 2 * pw.scales]))
    assert torch.equal(out[0], ref) and torch.allclose(out[1], 2 * ref)
    x = torch.randn(3, 64)
    g = torch.func.grad(lambda x: (x @ quantkern.ops.dequantize(pw, torch.float32).T).sum())(x)
    torch.testing.assert_close(g, ref.sum(0).expand(3, 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_native_ops_refuse_a_non_finite_offset(bad):
    # the CPU ops checked the scale's values but not the offset's: NaN / inf came back silently
    x, s, b = torch.randn(4, 8), torch.full((4,), 0.1), torch.zeros(4)
    b[2] = bad
    with pytest.raises(RuntimeError, match=r"offset must be finite; offset\[2\]"):
        torch.ops.quantkern.fake_quant_lsq(x, s, b, -8, 7, 0, None, 1.0)
    with pytest.raises(RuntimeError, match="offset must be finite"):
        torch.ops.quantkern.dampening_loss(x, s, b, -8, 7, 0, None, 1.0)


def test_torch_func_transforms():
    # torch.func.grad / vmap(grad) / jacrev raised PyTorch's "autograd.Function ... must override the
    # setup_context staticmethod" (the registered autograd is refused inside a transform).
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4)
    s, b = torch.rand(4) * 0.2 + 0.05, torch.randn(4) * 0.05

    def loss(xi, si, bi):
        return (ops.fake_quant_lsq(xi, si, bi, -8, 7, axis=-1, grad_scale=0.3) ** 2).sum()

    want = []
    for i in range(5):
        xi, si, bi = (t.clone().requires_grad_() for t in (x[i], s, b))
        want.append(torch.autograd.grad(loss(xi, si, bi), (xi, si, bi)))
    got = torch.func.grad(loss, argnums=(0, 1, 2))(x[0], s, b)
    for g, w in zip(got, want[0]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # per-sample gradients
    got = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None))(x, s, b)
    for k in range(3):
        torch.testing.assert_close(got[k], torch.stack([w[k] for w in want]), rtol=0, atol=0)
    jac = torch.func.jacrev(lambda si: ops.fake_quant_lsq(x[0], si, None, -8, 7, axis=1))(s)
    assert jac.shape == (3, 4, 4)
    y = torch.func.vmap(lambda si: ops.fake_quant_lsq(x, si, b, -8, 7, axis=2))(torch.stack([s, 2 * s]))
    torch.testing.assert_close(y[1], R.fake_quant_lsq(x, 2 * s, b, -8, 7, 2), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.func.grad(lambda si: torch.func.grad(loss, argnums=1)(x[0], si, b).sum())(s)


@pytest.mark.parametrize("qmin,qmax", [(2**25 + 1, 2**25 + 3), (0, 2**24 + 1), (-(2**70), 7), (0, 2**63)])
def test_grid_beyond_fp32_exact_integers_is_refused(qmin, qmax):
    # the arithmetic is fp32: qmin = 2^25 + 1 became 2^25, and x = 5 came back as 2^25, outside the
    # grid, silently; beyond int64 the error was the schema's "Expected a value of type 'int' ... 'int'"
    with pytest.raises(ValueError, match=r"qmin and qmax must lie in \[-2\^24, 2\^24\]"):
        ops.fake_quant_lsq(torch.tensor([5.0]), torch.ones(1), None, qmin, qmax)
    ops.fake_quant_lsq(torch.tensor([5.0]), torch.ones(1), None, -(2**24), 2**24)  # the widest exact grid


def test_grid_beyond_fp32_exact_integers_is_refused_by_raw_ops_and_dampening():
    # torch.ops.quantkern.* skip the Python checks: the C++ glue (shared by the LSQ and oscillation ops)
    # refuses the grid too; dampening_loss (same fp32 grid) refuses it by name
    x, s, b = torch.tensor([5.0]), torch.ones(1), torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"qmin and qmax must lie in \[-2\^24, 2\^24\]"):
        torch.ops.quantkern.fake_quant_lsq(x, s, b, 0, 2**24 + 1, None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"qmin and qmax must lie in \[-2\^24, 2\^24\]"):
        torch.ops.quantkern.dampening_loss(x, s, b, -(2**24) - 1, 7, None, None, 1.0)
    with pytest.raises(ValueError, match=r"quantkern.dampening_loss: qmin and qmax must lie in"):
        ops.dampening_loss(x, s, None, 0, 2**24 + 1)


def test_compiled_around_torch_func_grad():
    """torch.compile around torch.func.grad of fake_quant_lsq crashed (the raw op's registered autograd
    under a transform); the call breaks the graph there and runs eagerly: the same gradients."""
    x, s, b = torch.randn(8, 16), torch.tensor(0.1), torch.tensor(0.02)
    fx = lambda t: ops.fake_quant_lsq(t, s, b, -8, 7).pow(2).sum()  # noqa: E731
    fs = lambda t: ops.fake_quant_lsq(x, t, b, -8, 7).pow(2).sum()  # noqa: E731
    for f, a in ((lambda t: torch.func.grad(fx)(t), x), (lambda t: torch.func.grad(fs)(t), s)):
        torch._dynamo.reset()
        assert torch.equal(torch.compile(f)(a), f(a))
    torch._dynamo.reset()
