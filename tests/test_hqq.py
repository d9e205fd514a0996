"""quantkern::hqq_quantize: CPU kernels (every ISA), Triton (interpreter), the
reference, and the official hqq package.

What is exact and what is not (see quantkern/reference/hqq.py):

* reference(order="torch") is the official code's own arithmetic: it must equal
  hqq 0.2.8's optimize_weights_proximal (with kappa=1.0) bit for bit.
* The kernels implement reference(order="kernel") bit for bit (q, scale, zero),
  on every ISA, for any thread count; the Triton kernel too.
* Kernel vs the official arithmetic: the two orders sum each group's mean in a
  different order (and the power differs in its last bits), so zeros differ in
  their last bits; where w*s + z lands within those bits of a .5 tie, q flips
  and that group's zero then moves by about 1/g: the documented float ties. The
  tests bound how rare that is and check that the error is not larger.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os

import pytest
import torch

import quantkern
from quantkern.ptq import hqq_dequantize, hqq_quantize, rtn_quantize
from quantkern.reference import hqq as R

from _isa import ISAS

HAVE_HQQ = importlib.util.find_spec("hqq") is not None
HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BITS = (1, 2, 3, 4, 8)
GROUPS = (32, 64, 128)
MODES = ("global", "group", "none")


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    quantkern.set_cpu_capability("auto")


def make_w(shape, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def op(W, bits, g, axis=1, lp=0.7, beta=10.0, kappa=1.01, iters=20, mode="global"):
    return torch.ops.quantkern.hqq_quantize(W, bits, g, axis, lp, beta, kappa, iters, mode)


def assert_same(got, want, msg=""):
    for name, a, b in zip(("q", "scale", "zero"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{msg} {name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if not torch.equal(a, b):
            bad = (a != b).sum().item()
            raise AssertionError(f"{msg} {name}: {bad} of {a.numel()} differ")


def rel_err(W, q, s, z, g, axis):
    Wf = W.float()
    return ((hqq_dequantize(q, s, z, g, axis) - Wf).norm() / Wf.norm()).item()


# ------------------------------------------------------------ kernel == spec
# Odd row counts; scale 1.0 makes |W - Wr| large enough for the shrink to fire
# (at 0.02 it never does: the kernels' skip path).
@pytest.mark.parametrize("bits,g,axis,mode", list(itertools.product(BITS, GROUPS, (1, 0), MODES)))
def test_kernel_matches_reference_bitwise(bits, g, axis, mode):
    for shape, scale, seed in (((37, 384), 1.0, 1), ((3, 384), 0.02, 2)):
        W = make_w(shape, scale, seed + bits * 7 + g)
        want = R.hqq_quantize(W, bits, g, axis, early_stop=mode, order="kernel")
        for isa in ISAS:
            quantkern.set_cpu_capability(isa)
            assert_same(op(W, bits, g, axis, mode=mode), want, f"{isa} {shape} x{scale}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [1, 0])
def test_half_inputs_and_strides(dtype, axis):
    W = make_w((64, 17 * 16), 1.0, 5, dtype)  # K = 272: 17 groups of 16
    want = R.hqq_quantize(W, 4, 16, axis, order="kernel")
    for isa in ISAS:
        quantkern.set_cpu_capability(isa)
        assert_same(op(W, 4, 16, axis), want, f"{isa} {dtype}")
    Wt = make_w((272, 64), 1.0, 6, dtype).t()  # non-contiguous view
    assert_same(op(Wt, 4, 16, axis), R.hqq_quantize(Wt.contiguous(), 4, 16, axis, order="kernel"), "strided")


@pytest.mark.parametrize(
    "shape,g,kw",
    [
        ((1, 64), 64, {}),  # one group
        ((5, 12), 3, {}),  # odd group size
        ((7, 35), 5, {"mode": "group"}),
        ((4, 64), 64, {"lp": 1.0}),  # l1 shrink: no power
        ((9, 128), 32, {"lp": 0.5, "beta": 3.0}),
        ((9, 128), 32, {"kappa": 1.3, "iters": 7}),
        ((9, 128), 32, {"iters": 0}),  # RTN
        ((9, 128), 32, {"iters": 1}),
        ((9, 128), 32, {"iters": 100, "mode": "none"}),
    ],
)
def test_edge_parameters(shape, g, kw):
    W = make_w(shape, 1.0, 11)
    a = dict(lp_norm=kw.get("lp", 0.7), beta=kw.get("beta", 10.0), kappa=kw.get("kappa", 1.01), iters=kw.get("iters", 20))
    mode = kw.get("mode", "global")
    for axis in (1, 0):
        want = R.hqq_quantize(W, 4, g, axis, early_stop=mode, order="kernel", **a)
        for isa in ISAS:
            quantkern.set_cpu_capability(isa)
            got = op(W, 4, g, axis, a["lp_norm"], a["beta"], a["kappa"], a["iters"], mode)
            assert_same(got, want, f"{isa} axis={axis} {kw}")


def test_degenerate_groups():
    """Constant groups (range 0 -> inverse scale 1) and ranges below 1e-4."""
    W = make_w((6, 128), 1.0, 3)
    W[0, :64] = 0.25
    W[1, 64:] = -3.0
    W[2, :64] = 1.0 + torch.arange(64) * 1e-6
    W[3, :] = 0.0
    for isa in ISAS:
        quantkern.set_cpu_capability(isa)
        for axis in (1, 0):
            got = op(W, 4, 64, axis)
            assert_same(got, R.hqq_quantize(W, 4, 64, axis, order="kernel"), f"{isa} axis={axis}")
    q, s, z = op(W, 4, 64)
    assert s[0, 0] == 1.0 and s[1, 1] == 1.0 and s[3, 0] == 1.0
    assert torch.equal(hqq_dequantize(q, s, z, 64)[0, :64], W[0, :64])


def test_thread_count_invariance():
    W = make_w((96, 512), 0.5, 4)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(W, 4, 64)
        torch.set_num_threads(max(2, n))
        two = op(W, 4, 64)
    finally:
        torch.set_num_threads(n)
    assert_same(one, two, "threads")


def test_pow_poly_accuracy():
    """The kernels' power (reference.pow_poly, same fp32 ops) is within 2 ulp of the exact power."""
    a = torch.cat([torch.logspace(-3, 3, 20001), torch.logspace(-37, 37, 20001)]).float()
    for y in (-0.3, -0.5, -0.9, -0.05, -1.0, -1e-3):
        got = R.pow_poly(a, y).double()
        exact = a.double() ** float(torch.tensor(y, dtype=torch.float32))
        ulp = (exact.float().nextafter(torch.tensor(math.inf)).double() - exact.float().double()).abs()
        assert ((got - exact).abs() / ulp).max() <= 2.0, y


# ---------------------------------------------------- vs the official arithmetic
@pytest.mark.parametrize("bits,g,axis", list(itertools.product(BITS, GROUPS, (1, 0))))
def test_kernel_vs_official_arithmetic(bits, g, axis):
    """Same algorithm, different summation order: zeros equal to float tolerance except
    in the rare groups where a tie flipped one q (documented), and equal error."""
    W = make_w((128, 512), 1.0 if bits < 8 else 0.02, 100 + bits + g)
    q, s, z = op(W, bits, g, axis)
    qr, sr, zr = R.hqq_quantize(W, bits, g, axis, order="torch")
    assert torch.equal(s, sr)  # the init has no reduction: exact
    close = (z - zr).abs() <= 1e-5 * (1 + zr.abs())
    assert close.float().mean() >= 0.97, f"{(~close).sum().item()} of {z.numel()} zeros differ"
    assert (q != qr).float().mean() <= 2e-3
    e_k, e_r = rel_err(W, q, s, z, g, axis), rel_err(W, qr, sr, zr, g, axis)
    assert e_k <= e_r * (1 + 1e-3) + 1e-7


# ------------------------------------------------------------- vs hqq itself
@pytest.mark.skipif(not HAVE_HQQ, reason="hqq is not installed")
@pytest.mark.parametrize("bits,g,axis", list(itertools.product(BITS, GROUPS, (1, 0))))
def test_reference_equals_hqq(bits, g, axis):
    """reference(order='torch', kappa=1) is hqq 0.2.8's optimize_weights_proximal, bit for bit;
    the kernel gives the same zeros (float tolerance, documented ties) and no larger error."""
    from hqq.core.optimize import optimize_weights_proximal

    W = make_w((96, 384), 1.0 if bits < 8 else 0.02, 200 + bits + g)
    Wg = R.group_view(W, g, axis)
    s0, z0 = R.hqq_init(Wg, bits, axis)
    Wq_h, s_h, z_h = optimize_weights_proximal(
        Wg, s0.clone(), z0.clone(), [0, 2**bits - 1], axis=axis, device="cpu",
        opt_params={"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20},
    )
    N, K = W.shape
    hq = (Wq_h.to(torch.uint8).reshape(N, K), (1.0 / s_h).reshape(N, -1), z_h.reshape(N, -1))
    assert_same(R.hqq_quantize(W, bits, g, axis, kappa=1.0, order="torch"), hq, "reference vs hqq")
    q, s, z = op(W, bits, g, axis, kappa=1.0)
    assert torch.equal(s, hq[1])
    close = (z - hq[2]).abs() <= 1e-5 * (1 + hq[2].abs())
    assert close.float().mean() >= 0.97
    assert rel_err(W, q, s, z, g, axis) <= rel_err(W, *hq, g, axis) * (1 + 1e-3) + 1e-7
    mae = lambda qq, ss, zz: (hqq_dequantize(qq, ss, zz, g, axis) - W).abs().mean().item()  # noqa: E731
    assert mae(q, s, z) <= mae(*hq) * (1 + 1e-3) + 1e-9


@pytest.mark.skipif(not HAVE_HQQ, reason="hqq is not installed")
@pytest.mark.parametrize("optimize", [False, True])
def test_hqq_quantizer_path(optimize):
    """hqq's Quantizer.quantize (what HQQLinear calls) == reference, for RTN and HQQ."""
    from hqq.core.quantize import Quantizer

    W = make_w((64, 256), 0.05, 7)
    Wq, meta = Quantizer.quantize(W, nbits=4, group_size=64, optimize=optimize, axis=1, bitpack=False, device="cpu")
    want = (Wq.to(torch.uint8).reshape(64, 256), meta["scale"].reshape(64, -1), meta["zero"].reshape(64, -1))
    got = R.hqq_quantize(W, 4, 64, 1, kappa=1.0, iters=20 if optimize else 0, order="torch")
    assert_same(got, want, "Quantizer")
    if not optimize:
        assert_same(rtn_quantize(W, 4, 64), want, "rtn kernel")


# -------------------------------------------------------------- properties
def test_public_api_and_rtn():
    W = make_w((64, 256), 0.02, 8)
    q, s, z = hqq_quantize(W, 4, 64)
    assert q.dtype == torch.uint8 and q.shape == (64, 256) and int(q.max()) <= 15
    assert s.shape == z.shape == (64, 4) and s.dtype == z.dtype == torch.float32
    assert_same((q, s, z), quantkern.hqq_quantize(W, 4, 64), "api")
    qr, sr, zr = rtn_quantize(W, 4, 64)
    assert_same((qr, sr, zr), R.rtn_quantize(W, 4, 64), "rtn")
    mae = lambda qq, ss, zz: (hqq_dequantize(qq, ss, zz, 64) - W).abs().mean().item()  # noqa: E731
    assert mae(q, s, z) < mae(qr, sr, zr)
    # kappa anneals: a different result than kappa = 1 once the shrink fires
    Wb = make_w((64, 256), 1.0, 9)
    assert not torch.equal(hqq_quantize(Wb, 4, 64)[2], hqq_quantize(Wb, 4, 64, kappa=1.0)[2])


def test_group_mode_never_worse_per_group():
    """early_stop='group' keeps each group's best zero: its per-group mean |W - Wr| is never
    above the min-max init's (up to float noise: the solver measures |W - (q - z) / s| in
    its own summation order, this test |W - (q - z) * scale|)."""
    W = make_w((64, 512), 1.0, 10)
    q, s, z = op(W, 3, 64, mode="group")
    qn, sn, zn = op(W, 3, 64, iters=0)
    err = lambda qq, ss, zz: (hqq_dequantize(qq, ss, zz, 64) - W).abs().reshape(-1, 64).mean(1)  # noqa: E731
    e_hqq, e_rtn = err(q, s, z), err(qn, sn, zn)
    assert (e_hqq <= e_rtn * (1 + 1e-6)).all()
    assert e_hqq.mean() < e_rtn.mean()


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("args", [(4, 64, 1, 0.7, 10.0, 1.01, 20, "global"), (3, 32, 0, 0.7, 10.0, 1.0, 5, "group"),
                                  (2, 16, 1, 1.0, 10.0, 1.01, 3, "none")])
def test_opcheck(args):
    W = make_w((8, 64), 1.0, 12)
    torch.library.opcheck(torch.ops.quantkern.hqq_quantize.default, (W,) + args)


def test_outputs_not_differentiable():
    W = make_w((8, 64), 1.0, 17).requires_grad_()
    q, s, z = op(W, 4, 32)
    assert not (q.requires_grad or s.requires_grad or z.requires_grad)
    torch.library.opcheck(torch.ops.quantkern.hqq_quantize.default, (W, 4, 32, 1, 0.7, 10.0, 1.01, 4, "global"))


def test_compile_fullgraph():
    W = make_w((8, 128), 1.0, 13)
    f = torch.compile(lambda w: torch.ops.quantkern.hqq_quantize(w, 4, 64), fullgraph=True, backend="aot_eager")
    assert_same(f(W), op(W, 4, 64), "compile")


# ------------------------------------------------------------------- Triton
triton_only = pytest.mark.skipif(
    not (HAVE_TRITON and (INTERPRET or torch.cuda.is_available())), reason="needs triton (GPU or TRITON_INTERPRET=1)"
)


@triton_only
@pytest.mark.parametrize(
    "bits,g,axis,mode,dtype,iters",
    [(4, 32, 1, "global", torch.float32, 20), (3, 32, 0, "group", torch.float16, 8), (2, 16, 1, "none", torch.bfloat16, 6),
     (8, 16, 0, "global", torch.float32, 6), (1, 5, 1, "global", torch.float32, 6)],
)
def test_triton_matches_reference(bits, g, axis, mode, dtype, iters):
    import quantkern.triton_kernels  # noqa: F401

    dev = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    W = make_w((7, 4 * g), 1.0, 14 + g, dtype)
    want = R.hqq_quantize(W, bits, g, axis, iters=iters, early_stop=mode, order="kernel")
    got = quantkern.ops.hqq_quantize(W.to(dev), bits, g, axis=axis, iters=iters, early_stop=mode, backend="triton")
    assert_same(tuple(t.cpu() for t in got), want, "triton")


@triton_only
def test_triton_opcheck_and_errors():
    import quantkern.triton_kernels  # noqa: F401

    dev = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    W = make_w((2, 32), 1.0, 15).to(dev)
    torch.library.opcheck(torch.ops.quantkern.hqq_quantize_triton.default, (W, 4, 16, 1, 0.7, 10.0, 1.01, 2, "global"))
    with pytest.raises(ValueError, match="bits"):
        torch.ops.quantkern.hqq_quantize_triton(W, 5, 16)
    Wn = W.clone()
    Wn[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.quantkern.hqq_quantize_triton(Wn, 4, 16, 1, 0.7, 10.0, 1.01, 1, "global")


# --------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"W": torch.zeros(4, 64, dtype=torch.int32)}, TypeError, "W must have dtype"),
        ({"W": torch.zeros(2, 4, 64)}, ValueError, "2-D"),
        ({"bits": 5}, ValueError, "bits"),
        ({"bits": 4.0}, ValueError, "bits"),
        ({"group_size": 48}, ValueError, "does not divide"),
        ({"group_size": 0}, ValueError, "group_size"),
        ({"axis": 2}, ValueError, "axis"),
        # bools and floats equal to 0 / 1 (and a numeric string) passed as axis / lp_norm / beta / kappa
        ({"axis": True}, ValueError, "axis must be 0 or 1, got True"),
        ({"axis": 0.0}, ValueError, "axis must be 0 or 1, got 0.0"),
        ({"lp_norm": True}, ValueError, "lp_norm"),
        ({"lp_norm": "0.7"}, ValueError, "lp_norm"),
        ({"lp_norm": None}, ValueError, "lp_norm"),  # TypeError from float(), not naming it
        ({"beta": True}, ValueError, "beta"),
        ({"kappa": True}, ValueError, "kappa"),
        ({"lp_norm": 0.0}, ValueError, "lp_norm"),
        ({"lp_norm": 1.5}, ValueError, "lp_norm"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"kappa": float("nan")}, ValueError, "kappa"),
        ({"iters": -1}, ValueError, "iters"),
        ({"early_stop": "never"}, ValueError, "early_stop"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_arguments_python(kw, exc, match):
    a = {"W": torch.zeros(4, 64), "bits": 4, "group_size": 32}
    a.update(kw)
    W, bits, g = a.pop("W"), a.pop("bits"), a.pop("group_size")
    with pytest.raises(exc, match=match):
        quantkern.ops.hqq_quantize(W, bits, g, **a)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(4, 64, dtype=torch.float64), 4, 32), "W must be float32"),
        ((torch.zeros(64), 4, 32), "2-D"),
        ((torch.zeros(4, 64), 6, 32), "bits"),
        ((torch.zeros(4, 64), 4, 24), "group_size 24 must divide"),
        ((torch.zeros(4, 64), 4, 32, 3), "axis"),
        ((torch.zeros(4, 64), 4, 32, 1, 2.0), "lp_norm"),
        ((torch.zeros(4, 64), 4, 32, 1, 0.7, 0.0), "beta"),
        ((torch.zeros(4, 64), 4, 32, 1, 0.7, 10.0, 1.01, 20, "sometimes"), "early_stop"),
        ((torch.zeros(4, 64), 4, 32, 1, 0.7, 10.0, 1e30, 20, "global"), "fp32 range"),
    ],
)
def test_bad_arguments_native(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.quantkern.hqq_quantize(*args)


@pytest.mark.parametrize("val", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_weights(val, mode):
    W = make_w((8, 128), 1.0, 16)
    W[5, 77] = val
    for isa in ISAS:
        quantkern.set_cpu_capability(isa)
        with pytest.raises(ValueError, match="NaN or infinity"):
            op(W, 4, 64, mode=mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test needs a GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("g", [94, 186, 366])
def test_cuda_native_group_sizes_at_the_shared_memory_limit(g):
    # [g][T + 1] floats plus the kernel's static reduction buffer must fit in 48 KB
    W = torch.randn(8, 2 * g)
    q, s, z = quantkern.ops.hqq_quantize(W, 4, g, backend="native")
    qc, sc, zc = quantkern.ops.hqq_quantize(W.cuda(), 4, g, backend="native")
    assert torch.equal(qc.cpu(), q)
    torch.testing.assert_close(sc.cpu(), s)
    torch.testing.assert_close(zc.cpu(), z)


def test_one_group_per_row_spelled_like_the_other_solvers():
    # gptq_quantize / erq_quantize / quantize_ take group_size -1 or None as one group per row
    W = make_w((8, 100), 1.0, 16)
    for fn in (hqq_quantize, rtn_quantize):
        want = fn(W, 4, 100)
        for gs in (-1, None):
            got = fn(W, 4, gs)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="needs axis=1"):
        hqq_quantize(W, 4, -1, axis=0)


def test_tiny_weights_warn_with_the_fraction_of_groups():
    """hqq's init clamps (range <= 1e-4 -> scale 1, 1/scale capped at 2e4) coarsen groups of tiny
    weights; hqq_quantize / rtn_quantize said nothing. The warning counts exactly the groups whose
    stored scale the clamps set (constant groups excluded: scale 1 keeps them exactly)."""
    import warnings

    W = make_w((8, 128), 1.0, 21)
    W[:2] *= 1e-5  # range ~5e-5 <= 1e-4: scale 1
    W[2] *= 1e-3   # range ~5e-3: 4 bits 15 / 5e-3 < 2e4 (untouched), 8 bits 255 / 5e-3 > 2e4 (capped)
    W[3] = 0.5     # constant: exact with scale 1, not counted
    for bits, frac in ((4, "25.0%"), (8, "37.5%")):
        for fn, name in ((hqq_quantize, "hqq_quantize"), (rtn_quantize, "rtn_quantize")):
            with pytest.warns(UserWarning, match=rf"{name}: {frac} of the groups have a weight range below") as rec:
                fn(W, bits, 64)
            assert all(w.filename == __file__ for w in rec)  # points at the caller
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                fn(W, bits, 64, warn=False)
        _, s, _ = rtn_quantize(W, bits, 64, warn=False)
        clamped = (s == 1.0) | (s == torch.tensor(2e4).reciprocal())  # the stored scale is 1 / (inverse scale)
        clamped[3] = False
        assert f"{clamped.float().mean().item():.1%}" == frac
    with warnings.catch_warnings():  # ordinary and all-zero weights: no warning
        warnings.simplefilter("error")
        hqq_quantize(make_w((8, 128), 0.02, 22), 4, 64)
        rtn_quantize(torch.zeros(8, 128), 4, -1)
        hqq_quantize(make_w((8, 128), 1.0, 23, torch.bfloat16), 4, 64, axis=0)


def test_one_group_per_row_of_an_empty_row_names_it():
    # was "group_size must be a positive int, got 0": a value the caller never passed
    with pytest.raises(ValueError, match=r"group_size None \(one group per row\) needs K >= 1"):
        hqq_quantize(torch.zeros(4, 0), 4, None)


def test_beta_annealed_to_zero_matches_kernel():
    # kappa < 1 drives beta_i = beta * kappa^i to 0.0; the kernels use c = 1 / 0 = inf (the shrink
    # is 0: the beta -> 0 limit), the reference raised ZeroDivisionError in both orders
    W = make_w((4, 64), 1.0, 21)
    kw = dict(kappa=1e-10, iters=40, early_stop="none")
    want = R.hqq_quantize(W, 4, 32, 1, order="kernel", **kw)
    assert_same(op(W, 4, 32, kappa=1e-10, iters=40, mode="none"), want, "beta -> 0")
    assert torch.equal(R.hqq_quantize(W, 4, 32, 1, order="torch", **kw)[0], want[0])
    if HAVE_TRITON and (INTERPRET or torch.cuda.is_available()):  # (its constants raised ZeroDivisionError)
        import quantkern.triton_kernels  # noqa: F401

        got = quantkern.ops.hqq_quantize(W, 4, 32, kappa=1e-10, iters=40, early_stop="none", backend="triton")
        assert_same(got, want, "beta -> 0, triton")


@pytest.mark.parametrize("row,g,bits", [
    ([2.0**127, -2.0**127], 2, 4),                         # max - min = 2^128: inverse scale 0, NaN zero
    ([2.0**127 - 2.0**103, -(2.0**127 - 2.0**103)], 2, 1),  # 1 / range is subnormal: returned scale inf
    ([1e37] * 64, 64, 4),                                   # a constant group's zero sum -g * w: zero -inf
])
def test_weights_beyond_the_fp32_range_of_the_solver_are_refused(row, g, bits):
    # sufficient and near-tight: max|W| * max(group_size, 2) <= 2^127 keeps every intermediate finite
    # (scale / zero came out inf or NaN without a word)
    with pytest.raises(ValueError, match=r"max\|W\| \* max\(group_size, 2\) > 2\^127"):
        op(torch.tensor([row]), bits, g)
    if HAVE_TRITON and (INTERPRET or torch.cuda.is_available()):
        import quantkern.triton_kernels  # noqa: F401

        with pytest.raises(ValueError, match=r"max\|W\| \* max\(group_size, 2\) > 2\^127"):
            quantkern.ops.hqq_quantize(torch.tensor([row]), bits, g, backend="triton")


@pytest.mark.parametrize("bits", BITS)
def test_weights_at_the_fp32_limit_of_the_solver_work(bits):
    # the other side of the bound above (max|W| * max(g, 2) = 2^127): finite, and as the reference computes
    for row, g in (([2.0**125, -2.0**125, 2.0**124, -1.0], 4), ([2.0**126, -2.0**126], 2), ([2.0**120] * 128, 128)):
        W = torch.tensor([row] * 3)
        got = op(W, bits, g)
        assert all(torch.isfinite(t.float()).all() for t in got)
        assert torch.isfinite(hqq_dequantize(*got, g)).all()
        assert_same(got, R.hqq_quantize(W, bits, g, 1, order="kernel"), f"{row[:2]} g={g}")


def test_hqq_dequantize_takes_what_hqq_quantize_takes():
    # group_size -1 / None (one group per row) and axis=0 round-trip; a group size that does not fit
    # or metadata of another size raise naming the argument (they were reshape errors)
    from quantkern.ptq import hqq_dequantize
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for g, axis in ((-1, 1), (None, 1), (16, 1), (16, 0)):
        q, s, z = hqq_quantize(W, 4, g, axis=axis)
        assert torch.equal(hqq_dequantize(q, s, z, g, axis=axis), ((q.float().reshape(-1, 64 if g in (-1, None) else 16)
                           - z.reshape(-1, 1)) * s.reshape(-1, 1)).reshape(4, 64)) or axis == 0
        assert float((hqq_dequantize(q, s, z, g, axis=axis) - W).abs().max()) < 0.5
    q, s, z = hqq_quantize(W, 4, 16)
    with pytest.raises(ValueError, match="group_size 7 does not divide K = 64"):
        hqq_dequantize(q, s, z, 7)
    with pytest.raises(ValueError, match="scale must hold one value per group"):
        hqq_dequantize(q, s[:, :2], z, 16)
    with pytest.raises(ValueError, match="needs axis=1"):
        hqq_dequantize(q, s, z, -1, axis=0)

