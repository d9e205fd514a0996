"""quantkern::fake_quant_lsq_triton (Triton) against quantkern.reference.

On a machine without a GPU the kernels run on CPU tensors under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); with a GPU they run on CUDA. Shapes stay small so that the
interpreter keeps the whole file fast, but some are chosen to need several
tiles (partial-sum slots and the second reduction kernel).
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

import quantkern  # noqa: E402,F401
from quantkern import ops, reference as R  # noqa: E402

from _triton_dev import triton_device  # noqa: E402

DEV = triton_device()

import quantkern.triton_kernels  # noqa: E402,F401  (registers the *_triton kernels)
from quantkern.triton_kernels import fake_quant_lsq as TK  # noqa: E402

import triton.language as tl  # noqa: E402

import _lsq_cases as C  # noqa: E402

DTYPES = C.DTYPES
FWD = torch.ops.quantkern.fake_quant_lsq_triton
BWD = torch.ops.quantkern.fake_quant_lsq_backward_triton


def _case(shape, axis=None, group_size=None, bits=4, dtype=torch.float32, noncontig=False, ties=False, seed=0):
    x, scale, offset, qmin, qmax = C.lsq_data(shape, axis, group_size, bits, ties=ties, seed=seed)
    x = x.to(dtype)
    if noncontig:
        x = C.noncontig(x)
    return dict(x=x.to(DEV), scale=scale.to(DEV), offset=offset.to(DEV), qmin=qmin, qmax=qmax, axis=axis, group_size=group_size)


def sample_inputs():
    """(id, kwargs): every granularity on small odd shapes, fp32/fp16/bf16."""
    out = []
    for dtype in DTYPES:
        dn = str(dtype).split(".")[1]
        for n in (1, 3, 127, 257):
            out.append((f"tensor-{n}-{dn}", dict(shape=(n,), dtype=dtype, bits=8)))
        out.append((f"tensor-slots-{dn}", dict(shape=(127, 257), dtype=dtype, bits=4)))  # 8 tiles -> reduce kernel
        out.append((f"tensor-ties-{dn}", dict(shape=(3, 127), dtype=dtype, bits=3, ties=True)))
        out.append((f"channel-ax0-{dn}", dict(shape=(127, 3), axis=0, dtype=dtype, bits=2)))
        out.append((f"channel-ax1-{dn}", dict(shape=(3, 127, 5), axis=1, dtype=dtype, bits=4, ties=True)))
        out.append((f"channel-last-slots-{dn}", dict(shape=(257, 127), axis=1, dtype=dtype, bits=4)))  # inner 1
        out.append((f"channel-neg-{dn}", dict(shape=(2, 3, 5), axis=-1, dtype=dtype, bits=8)))
        out.append((f"channel-1d-{dn}", dict(shape=(257,), axis=0, dtype=dtype, bits=4)))
        out.append((f"group32-{dn}", dict(shape=(3, 128), group_size=32, dtype=dtype, bits=4, ties=True)))
        out.append((f"group1-{dn}", dict(shape=(3, 5), group_size=1, dtype=dtype, bits=2)))
        out.append((f"group257-{dn}", dict(shape=(1, 257), group_size=257, dtype=dtype, bits=8)))
        out.append((f"noncontig-channel-{dn}", dict(shape=(127, 3), axis=0, dtype=dtype, bits=4, noncontig=True)))
        out.append((f"noncontig-tensor-{dn}", dict(shape=(127,), dtype=dtype, bits=8, noncontig=True)))
    return out


SAMPLES = sample_inputs()
IDS = [s[0] for s in SAMPLES]


def _args(c):
    return (c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], c["axis"], c["group_size"])


def _ref_args(c):
    # The reference wants a non-negative axis (ops.py normalises it before dispatch).
    axis = c["axis"] % c["x"].dim() if c["axis"] is not None else None
    return (c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], axis, c["group_size"])


def _bwd_tol(c):
    # Sums of numel/C terms of size |g| * max(|qmin|, |qmax|), reassociated in fp32.
    per = c["x"].numel() / max(c["scale"].numel(), 1)
    return 1e-5 * per * max(abs(c["qmin"]), abs(c["qmax"])) + 1e-5


@pytest.mark.parametrize("name,kw", SAMPLES, ids=IDS)
def test_forward_and_backward_match_reference(name, kw):
    c = _case(**kw)
    y = FWD(*_args(c), 1.0)
    ref = R.fake_quant_lsq(*_ref_args(c))
    assert y.dtype == c["x"].dtype and y.shape == c["x"].shape and y.is_contiguous()
    assert torch.equal(y, ref)

    grad = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(1)).to(c["x"].dtype).to(DEV)
    gx, gs, gb = BWD(grad, *_args(c), 0.37)
    rx, rs, rb = R.fake_quant_lsq_backward(grad, *_ref_args(c), 0.37)
    assert gx.dtype == rx.dtype and gs.shape == rs.shape and gb.shape == rb.shape
    assert torch.equal(gx, rx)
    tol = _bwd_tol(c)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=tol)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=tol)


AUTOGRAD = [s for s in SAMPLES if "float32" in s[0] or "bfloat16" in s[0]]


@pytest.mark.parametrize("name,kw", AUTOGRAD, ids=[s[0] for s in AUTOGRAD])
def test_autograd_matches_reference(name, kw):
    c = _case(**kw)
    gscale = 1.0 / math.sqrt(c["x"].numel() / c["scale"].numel() * c["qmax"])
    leaves = [c["x"].detach().clone().requires_grad_(), c["scale"].clone().requires_grad_(), c["offset"].clone().requires_grad_()]
    y = ops.fake_quant_lsq(*leaves, c["qmin"], c["qmax"], axis=c["axis"], group_size=c["group_size"], grad_scale=gscale, backend="triton")
    assert torch.equal(y, R.fake_quant_lsq(*_ref_args(c)))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype).to(DEV)
    gx, gs, gb = torch.autograd.grad((y * w).sum(), leaves)
    rx, rs, rb = R.fake_quant_lsq_backward(w, *_ref_args(c), gscale)
    assert torch.equal(gx, rx)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=_bwd_tol(c) * gscale)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=_bwd_tol(c) * gscale)


def test_offset_none_is_lsq():
    c = _case(shape=(64, 32), axis=0, bits=4)
    s = c["scale"].clone().requires_grad_()
    y = ops.fake_quant_lsq(c["x"], s, None, c["qmin"], c["qmax"], axis=0, backend="triton")
    assert torch.equal(y, R.fake_quant_lsq(c["x"], c["scale"], torch.zeros_like(c["scale"]), c["qmin"], c["qmax"], 0))
    y.sum().backward()
    assert s.grad is not None and s.grad.shape == s.shape


@pytest.mark.parametrize("name,kw", [s for s in SAMPLES if "slots-float32" in s[0]])
def test_backward_is_deterministic(name, kw):
    c = _case(**kw)
    grad = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    a, b = BWD(grad, *_args(c), 1.0), BWD(grad, *_args(c), 1.0)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# The interpreter evaluates both sides of tl.where with numpy (inf - inf, inf * 0 on discarded lanes).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_special_values():
    s, b = torch.tensor([0.1], device=DEV), torch.tensor([0.0], device=DEV)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -0.01, 0.01, 1e30, -1e30], device=DEV)
    y = FWD(x, s, b, -8, 7, None, None, 1.0)
    ref = R.fake_quant_lsq(x, s, b, -8, 7)
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.signbit(y), torch.signbit(ref))  # rint(-0.1) = -0.0
    g = torch.ones_like(x)
    got, want = BWD(g, x, s, b, -8, 7, None, None, 1.0), R.fake_quant_lsq_backward(g, x, s, b, -8, 7)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_huge_grid_rounds_exactly():
    # the widest grid, [-2^24, 2^24]: rint must be exact for every fp32 (large v, half-integers near
    # 2^22..2^23, integers past 2^23 where the 1.5 * 2^23 trick would round to even)
    s, b = torch.tensor([1.0], device=DEV), torch.tensor([0.0], device=DEV)
    base = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 2.0**22 + 0.5, 2.0**22 + 1.5, -(2.0**22) - 0.5, 2.0**23 - 0.5, 2.0**23,
                         2.0**23 + 1, -(2.0**23) - 3, 2.0**24 - 1, 3e9, -3e9])
    x = torch.cat([base, torch.randn(1000) * 1e6]).to(DEV)
    y = FWD(x, s, b, -(2**24), 2**24, None, None, 1.0)
    assert torch.equal(y, R.fake_quant_lsq(x, s, b, -(2**24), 2**24))


def test_grid_beyond_2_24_is_refused_like_the_public_op():
    # The raw Triton op ran any int64 grid: 2^24 + 1 is not an fp32 and was moved silently (qmin
    # 2^25 + 1 clamped to 2^25, outside the grid). Same message as quantkern.ops.fake_quant_lsq.
    x, s, b = torch.randn(4, 8, device=DEV), torch.ones(1, device=DEV), torch.zeros(1, device=DEV)
    for qmin, qmax in ((-(2**24) - 1, 7), (-8, 2**24 + 1), (2**25 + 1, 2**26)):
        with pytest.raises(ValueError) as pub:
            ops.fake_quant_lsq(x, s, b, qmin, qmax, backend="triton")
        with pytest.raises(ValueError) as raw:
            FWD(x, s, b, qmin, qmax, None, None, 1.0)
        assert str(raw.value) == str(pub.value).replace("fake_quant_lsq:", "fake_quant_lsq_triton:")
        with pytest.raises(ValueError, match=r"qmin and qmax must lie in \[-2\^24, 2\^24\]"):
            BWD(torch.ones_like(x), x, s, b, qmin, qmax, None, None, 1.0)


def test_fp16_bf16_output_rounding_is_rne():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.linspace(-3, 3, 1001).to(dtype).to(DEV)
        s, b = torch.tensor([1.0 / 3.0], device=DEV), torch.tensor([1e-3], device=DEV)
        assert torch.equal(FWD(x, s, b, -9, 9, None, None, 1.0), R.fake_quant_lsq(x, s, b, -9, 9))


def test_empty():
    x = torch.empty(0, 5, device=DEV)
    s, b = torch.ones(5, device=DEV), torch.zeros(5, device=DEV)
    assert FWD(x, s, b, -8, 7, 1, None, 1.0).shape == (0, 5)
    gx, gs, gb = BWD(x, x, s, b, -8, 7, 1, None, 1.0)
    assert gx.shape == (0, 5) and torch.equal(gs, torch.zeros(5, device=DEV)) and torch.equal(gb, gs)


@triton.jit
def _rint_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y_ptr + i, TK._rint(tl.load(x_ptr + i, mask=m)), mask=m)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_rint_is_round_half_even_bitwise():
    g = torch.Generator().manual_seed(4)
    k = torch.arange(-2000, 2000).float()
    x = torch.cat([
        k / 2, k / 4, k / 2 + 2.0**22, k / 2 - 2.0**22, k + 2.0**23, k - 2.0**23,
        torch.randn(4000, generator=g) * 10.0 ** torch.randint(-3, 12, (4000,), generator=g).float(),
        torch.tensor([0.0, -0.0, -0.4, 0.4, 1e-45, -1e-45, float("inf"), -float("inf"), 3.4e38, -3.4e38]),
    ]).to(DEV)
    y = torch.empty_like(x)
    _rint_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    ref = torch.round(x)
    assert torch.equal(y.view(torch.int32), ref.view(torch.int32))  # bitwise: signed zeros too
    xn = torch.tensor([float("nan")], device=DEV)
    yn = torch.empty_like(xn)
    _rint_kernel[(1,)](xn, yn, 1, BLOCK=16)
    assert torch.isnan(yn).all()


def test_plan_partials_stay_small():
    # The partial-sum buffer is a small fraction of x for every layout.
    for outer, C, inner in [(4096, 4096, 1), (1, 4096, 4096), (64, 256, 196), (10**6, 3, 1), (1, 1, 10**8), (1, 10**6, 128)]:
        BO, BC, BI, nob, n_cb, n_ib = TK._plan(outer, C, inner)
        assert BO * BC * BI <= TK.BLOCK
        assert nob * n_ib * C <= max(C, outer * C * inner // 32), (outer, C, inner)


# ------------------------------------------------------------------ opcheck
OPCHECK = [s for s in SAMPLES if s[0] in (
    "tensor-3-float32", "tensor-slots-bfloat16", "channel-ax1-float16", "channel-last-slots-float32",
    "group32-float32", "noncontig-channel-float32")]


@pytest.mark.parametrize("name,kw", OPCHECK, ids=[s[0] for s in OPCHECK])
def test_opcheck(name, kw):
    c = _case(**kw)
    x = c["x"].detach().clone().requires_grad_(c["x"].dtype == torch.float32)
    s = c["scale"].clone().requires_grad_(True)
    b = c["offset"].clone().requires_grad_(True)
    rest = (c["qmin"], c["qmax"], c["axis"], c["group_size"])
    torch.library.opcheck(FWD, (x, s, b, *rest, 0.5))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype).to(DEV)
    torch.library.opcheck(BWD, (grad, x.detach(), s.detach(), b.detach(), *rest, 0.5))


def test_compile_fullgraph():
    c = _case(shape=(33, 65), axis=1, bits=4)
    f = torch.compile(lambda x, s, b: FWD(x, s, b, -8, 7, 1, None, 1.0) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(c["x"], c["scale"], c["offset"]), R.fake_quant_lsq(*_ref_args(c)) * 2)


# ------------------------------------------------------------------ GPU code generation, no GPU needed
_PTX_SCRIPT = r"""
from _ptx import compile_ptx, instructions
from quantkern.triton_kernels import fake_quant_lsq as TK

def ptx(fn, sig, consts, div16):
    return compile_ptx(fn, sig, consts, div16, num_warps=TK.NUM_WARPS)

fwd = {"x_ptr": "*fp32", "y_ptr": "*fp32", "s_ptr": "*fp32", "b_ptr": "*fp32", "outer": "i32", "C": "i32", "inner": "i32",
       "n_cb": "i32", "n_ib": "i32", "qn": "fp32", "qp": "fp32", "BO": "constexpr", "BC": "constexpr", "BI": "constexpr"}
bwd = {"g_ptr": "*bf16", "x_ptr": "*bf16", "gx_ptr": "*bf16", "s_ptr": "*fp32", "b_ptr": "*fp32", "ps_ptr": "*fp32",
       "pb_ptr": "*fp32", "outer": "i32", "C": "i32", "inner": "i32", "n_cb": "i32", "n_ib": "i32", "qn": "fp32",
       "qp": "fp32", "gscale": "fp32", "BO": "constexpr", "BC": "constexpr", "BI": "constexpr", "FINAL": "constexpr"}
ptrs = ["x_ptr", "y_ptr", "s_ptr", "b_ptr"]
out = {
    "fwd_tensor": ptx(TK._lsq_fwd_kernel, fwd, {"BO": 1, "BC": 1, "BI": TK.BLOCK}, ptrs + ["inner"]),
    "fwd_inner1": ptx(TK._lsq_fwd_kernel, fwd, {"BO": 64, "BC": 64, "BI": 1}, ptrs + ["C"]),
    "bwd_bf16": ptx(TK._lsq_bwd_kernel, bwd, {"BO": 16, "BC": 1, "BI": 256, "FINAL": False}, []),
}
for name, p in out.items():
    ops = instructions(p)
    print(name, "div.rn.f32" in ops, sorted(o for o in ops if o.startswith(("div.", "fma", "mad.", "ld.global.v"))))
"""


def test_gpu_codegen_is_ieee_exact():
    # Compiles the kernels for sm_90 (Triton ships ptxas; no GPU needed) and checks the PTX:
    # IEEE division (Triton's plain "/" would be div.full.f32), no fused multiply-add, and
    # vectorised 16-byte loads on aligned per-tensor and channel-last tiles.
    import _ptx

    lines = dict(line.split(" ", 1) for line in _ptx.run_script(_PTX_SCRIPT, timeout=300))
    for name, rest in lines.items():
        assert rest.startswith("True"), (name, rest)  # div.rn.f32 present
        for bad in ("div.full", "div.approx", "fma.", "mad.f", "mad.rn"):  # mad.wide.s32 is integer
            assert bad not in rest, (name, rest)
    assert "ld.global.v4" in lines["fwd_tensor"] and "ld.global.v4" in lines["fwd_inner1"], lines


@pytest.mark.skipif(DEV != "cpu", reason="CPU tensors (the interpreter): a GPU does not check scale values")
def test_triton_on_cpu_checks_scale_values_as_native():
    x = torch.randn(100)
    for bad_s, bad_b in ((-0.5, 0.0), (0.0, 0.0), (float("nan"), 0.0), (0.5, float("inf"))):
        for be in ("native", "triton"):
            with pytest.raises((ValueError, RuntimeError), match="scale|offset"):
                ops.fake_quant_lsq(x, torch.tensor([bad_s]), torch.tensor([bad_b]), -8, 7, backend=be)


# ------------------------------------------------------------------ bad input (torch.ops bypasses ops.py)
def _bad_lsq_cases():
    x = torch.randn(4, 8, device=DEV)
    one, zero = torch.ones(1, device=DEV), torch.zeros(1, device=DEV)
    ch = lambda n: (torch.ones(n, device=DEV), torch.zeros(n, device=DEV))  # noqa: E731
    gr = lambda *s: (torch.ones(*s, device=DEV), torch.zeros(*s, device=DEV))  # noqa: E731
    return [
        ("x-dtype", (x.double(), one, zero, -8, 7, None, None), "x"),
        ("scale-dtype", (x, one.double(), zero, -8, 7, None, None), "scale"),
        ("offset-dtype", (x, one, zero.double(), -8, 7, None, None), "offset"),
        ("qmin-qmax", (x, one, zero, 7, 7, None, None), "qmin"),
        ("grid-past-2^24", (x, one, zero, -(2**24) - 1, 7, None, None), "qmin and qmax must lie in"),
        ("offset-shape", (x, one, zero.reshape(1, 1), -8, 7, None, None), "offset shape"),
        ("per-tensor-numel", (x, *ch(3), -8, 7, None, None), "per-tensor scale"),
        ("per-channel-length", (x, *ch(8), -8, 7, 0, None), "per-channel scale"),
        ("axis-range", (x, *ch(4), -8, 7, 5, None), "axis"),
        ("group-divides", (x, *gr(4, 2), -8, 7, None, 3), "group_size"),
        ("group-zero", (x, *gr(4, 2), -8, 7, None, 0), "group_size"),
        # same element count, other shape: accepted before, the native op refuses it
        ("group-scale-shape", (x, *gr(2, 4), -8, 7, None, 4), "per-group scale"),
        ("group-3d", (torch.randn(2, 4, 8, device=DEV), *gr(2, 4, 2), -8, 7, None, 4), "per-group x"),
    ]


BAD_LSQ = _bad_lsq_cases()


@pytest.mark.parametrize("name,args,match", BAD_LSQ, ids=[c[0] for c in BAD_LSQ])
def test_bad_input_raises_like_native(name, args, match):
    # The launcher checked with bare asserts (AssertionError without a message, nothing at all
    # under python -O: a scale of the wrong size is then read out of bounds on the GPU), and some
    # layouts not at all. Now: the native op's checks, each error naming the argument.
    if DEV == "cpu" and quantkern._load._C is not None:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.quantkern.fake_quant_lsq(*args, 1.0)
    with pytest.raises((ValueError, TypeError), match=match):
        FWD(*args, 1.0)
    x = args[0]
    with pytest.raises((ValueError, TypeError), match=match):
        BWD(torch.ones_like(x), *args, 1.0)


def test_backward_bad_grad_raises():
    x, s, b = torch.randn(4, 8, device=DEV), torch.ones(1, device=DEV), torch.zeros(1, device=DEV)
    for g in (x[:2], x.half()):
        with pytest.raises(ValueError, match="grad"):
            BWD(g, x, s, b, -8, 7, None, None, 1.0)
