"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU under the emulator (tests/cuda_emu), against the
reference and the CPU kernels: their indexing, tails, grid-stride loops, shared-memory staging and
warp reductions, which the GPU tests check only where a GPU exists.

Every case runs with the threads of a block in two orders between barriers (``QK_EMU_ORDER``
forward and reverse): a missing ``__syncthreads`` makes the two disagree. The emulated device has
4 multiprocessors (``QK_EMU_SMS``), so persistent grids loop; ``QK_EMU_CC=7`` takes the kernels'
pre-sm_80 paths. Skipped where g++ or the CUDA toolkit's headers are missing.
"""
import math
import re
import shutil

import pytest
import torch

import quantkern
from quantkern import reference as R
from quantkern.reference import oscillation as RO
from quantkern.reference import packing as RP
from quantkern.packed import PackedWeight

import _lsq_cases as C
from test_calibrate import search_inputs
from test_packed_linear import check_accuracy, make

build = pytest.importorskip("cuda_emu.build")

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or build.cuda_include() is None,
    reason="the CUDA emulator needs g++ and the CUDA toolkit's headers (cuda_fp16.h)",
)

ORDERS = ("forward", "reverse")


@pytest.fixture(scope="module")
def E():
    build.load()
    # red zones (tests/cuda_emu/runtime.cpp): reads just past a tensor give NaN, writes raise
    prev = torch.ops.quantkern_emu.redzones(True)
    yield torch.ops.quantkern_emu
    torch.ops.quantkern_emu.redzones(prev)


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("QK_EMU_ORDER", request.param)
    return request.param


def test_every_launch_is_rewritten():
    src = "k<<<grid, 256, 0, stream>>>(a, b);\n  kern<1, T><<<unsigned(n), T, smem, s>>>(\n    x);\n  z<<<1, 32>>>();"
    out = build.transform(src + "\nTORCH_LIBRARY_IMPL(quantkern, CUDA, m) { m.impl(\"z\", &z); }")
    assert "<<<" not in out and out.count("::qk_emu::Launch(") == 3
    assert "TORCH_LIBRARY_FRAGMENT(quantkern_emu, m)" in out and 'm.def("z"' in out


def test_flat_indices_are_64_bit():
    """A flat index built in 32 bits wraps past 2^31 elements, far beyond what the emulator can run:
    every blockIdx * ... product in csrc/cuda must widen blockIdx to int64_t first."""
    bad = []
    for f in sorted(build.CU_DIR.glob("*.cu")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"(?<!int64_t\()blockIdx\.[xyz]\s*\*|\*\s*blockIdx\.[xyz]", line) or \
                    re.search(r"\b(unsigned|int|int32_t)\s+\w+\s*=[^;]*\bblockIdx\.[xyz]\)?\s*\*", line):
                bad.append(f"{f.name}:{i}: {line.strip()}")
    assert not bad, "32-bit flat indices:\n" + "\n".join(bad)


# ------------------------------------------------------------------ packed weights
PACK_SHAPES = [(1, 32), (7, 96), (33, 160)]


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_pack_unpack_exact(E, order, bits):
    g = torch.Generator().manual_seed(bits)
    for N, K in PACK_SHAPES:
        q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
        qw = torch.ops.quantkern.pack(q, bits)
        assert torch.equal(E.pack(q, bits), qw)
        assert torch.equal(E.unpack(qw, bits, K), q)


@pytest.mark.parametrize("meta", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_dequantize_exact(E, order, meta):
    for bits in (2, 3, 4):
        for N, K, gs in [(5, 64, 32), (17, 96, 96), (3, 256, 128)]:
            pw = make(N, K, bits, gs, meta, seed=N + bits)
            for out in (None, torch.float32, torch.bfloat16):
                want = torch.ops.quantkern.dequantize(pw.qweight, pw.scales, pw.zeros, bits, gs, K, out)
                got = E.dequantize(pw.qweight, pw.scales, pw.zeros, bits, gs, K, out)
                assert got.dtype == want.dtype and torch.equal(got, want)


# M covers the GEMV's 1-, 2- and 4-row forms and the GEMM (one and several row tiles)
# (and the GEMM's partial last K block, K % 32 != 0; the GEMV's second x chunk, K > 2048)
LINEAR_CASES = [(1, 19, 96, 32), (2, 37, 544, 32), (3, 64, 256, 64), (4, 70, 100, 100), (5, 33, 256, 128),
                (40, 70, 160, 32), (70, 65, 128, 64), (6, 40, 100, 100), (1, 9, 2080, 32)]


def check_rounding(y, x, pw, bias, wmma):
    """16-bit y: nearly every element is the fp64 product rounded once to x's dtype (nearest even); the
    fp32 accumulation flips a rounding only close to a tie (or for outputs near 0, by cancellation).
    check_accuracy's tolerance hides a store that truncates. wmma: the tensor-core GEMM multiplies by
    W.to(x.dtype)."""
    Wd = RP.dequantize(pw.qweight, pw.scales, pw.zeros, pw.bits, pw.group_size, pw.in_features)
    if wmma:
        Wd = Wd.to(x.dtype)
    truth = x.double() @ Wd.double().T + (0 if bias is None else bias.double())
    bad = int((y != truth.to(x.dtype)).sum())  # unmutated kernels: at most 0.6% (fp16 near 0); truncation: ~50%
    assert bad <= 2 + 0.01 * y.numel(), f"{bad} of {y.numel()} outputs are not the correctly rounded product"


@pytest.mark.parametrize("cc", (8, 7))
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_accuracy(E, order, monkeypatch, bits, cc):
    monkeypatch.setenv("QK_EMU_CC", str(cc))  # 7: the GEMM's fp32 SIMT path for 16-bit x too
    for i, (M, N, K, gs) in enumerate(LINEAR_CASES):
        pw = make(N, K, bits, gs, (torch.float16, torch.bfloat16, torch.float32)[i % 3], seed=i)
        bias = torch.randn(N) if i % 2 else None
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(M, K).to(dt)
            y = E.packed_linear(x, pw.qweight, pw.scales, pw.zeros, bits, gs, K, bias)
            check_accuracy(y, x, pw, bias)
            if dt != torch.float32:
                check_rounding(y, x, pw, bias, wmma=M > 4 and cc == 8)


def test_packed_linear_batch_dims_and_backward(E, order):
    pw = make(24, 96, 3, 32, torch.bfloat16, seed=5)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    y = E.packed_linear(x, pw.qweight, pw.scales, pw.zeros, 3, 32, 96, None)
    assert y.shape == (2, 3, 24)
    check_accuracy(y.reshape(6, 24), x.reshape(6, 96), pw)
    g = torch.randn(2, 3, 24)
    dx = E.packed_linear_backward(g, pw.qweight, pw.scales, pw.zeros, 3, 32, 96)
    want = torch.ops.quantkern.packed_linear_backward(g, pw.qweight, pw.scales, pw.zeros, 3, 32, 96)
    torch.testing.assert_close(dx, want)
    torch.testing.assert_close(E.packed_linear_bias_backward(g), g.sum((0, 1)))


# ------------------------------------------------------------------ LSQ+ fake quant
# a subset of the GPU test's samples (tests/test_fake_quant_lsq_cuda.py), small enough for the emulator:
# both backward kernels ("rows": inner >= 32, "cols": inner < 32), one and several partial-sum slots,
# the vectorised and the scalar paths
LSQ_SAMPLES = [
    dict(shape=(127,), bits=8),
    dict(shape=(3, 1100), bits=4, edges=True),
    dict(shape=(13, 33), axis=0, bits=2),
    dict(shape=(3, 256), axis=0, bits=8),
    dict(shape=(3, 31, 5), axis=1, bits=4, edges=True),
    dict(shape=(300, 3), axis=1, bits=4),
    dict(shape=(40, 127), axis=1, bits=3),
    dict(shape=(31, 64), group_size=16, bits=4),
    dict(shape=(3, 128), group_size=32, bits=4, edges=True),
    dict(shape=(3, 254), group_size=127, bits=3),
    dict(shape=(17 * 4096 + 5,), bits=4),  # 18 partial-sum slots: pass 2's warp reduction uses lanes >= 16
]


def _lsq_case(kw, dtype):
    kw = dict(kw)
    shape, axis, gs = kw.pop("shape"), kw.pop("axis", None), kw.pop("group_size", None)
    x, s, b, qmin, qmax = C.lsq_data(shape, axis, gs, seed=len(shape) + shape[-1], **kw)
    axis = None if axis is None else axis % len(shape)
    gscale = 1.0 / math.sqrt(x.numel() // s.numel() * max(abs(qmax), 1))
    return x.to(dtype), s, b, qmin, qmax, axis, gs, gscale


@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_fake_quant_lsq_forward_and_backward(E, order, dtype):
    for kw in LSQ_SAMPLES:
        x, s, b, qmin, qmax, axis, gs, gsc = _lsq_case(kw, dtype)
        y = E.fake_quant_lsq(x, s, b, qmin, qmax, axis, gs, gsc)
        torch.testing.assert_close(y, R.fake_quant_lsq(x, s, b, qmin, qmax, axis, gs), rtol=0, atol=0, equal_nan=True)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        gx, gs_, gb = E.fake_quant_lsq_backward(grad, x, s, b, qmin, qmax, axis, gs, gsc)
        rgx, rgs, rgb = R.fake_quant_lsq_backward(grad, x, s, b, qmin, qmax, axis, gs, gsc)
        torch.testing.assert_close(gx, rgx, rtol=0, atol=0)
        atol = 1e-3 * max(1.0, math.sqrt(x.numel() // s.numel()) * gsc * max(abs(qmin), abs(qmax)))
        torch.testing.assert_close(gs_, rgs, rtol=1e-4, atol=atol)
        torch.testing.assert_close(gb, rgb, rtol=1e-4, atol=atol)


def test_fake_quant_lsq_backward_bits_do_not_depend_on_the_order(E, monkeypatch):
    x, s, b, qmin, qmax, axis, gs, gsc = _lsq_case(dict(shape=(7, 3, 600), axis=1, bits=4), torch.float16)
    grad = torch.randn(x.shape).half()
    outs = []
    for o in ("forward", "reverse", "shuffle:3"):
        monkeypatch.setenv("QK_EMU_ORDER", o)
        outs.append(E.fake_quant_lsq_backward(grad, x, s, b, qmin, qmax, axis, gs, gsc))
    for other in outs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(outs[0], other))


# ------------------------------------------------------------------ oscillation
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("gran", ("tensor", "channel", "group"))
def test_oscillation_update_and_dampening(E, order, gran, dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 48, generator=g).to(dtype)
    axis, gs = (None, None) if gran != "channel" else (0, None)
    pshape = (1,) if gran == "tensor" else (9,) if gran == "channel" else (9, 3)
    gs = 16 if gran == "group" else gs
    s = torch.rand(pshape, generator=g) * 0.2 + 0.2
    b = torch.randn(pshape, generator=g) * 0.05
    meta, ema = quantkern.ops.oscillation_init_state(w, s, b, -8, 7, axis=axis, group_size=gs)
    wr, mr, er = w.clone(), meta.clone(), ema.clone()
    for t in range(6):
        step = (torch.randn(w.shape, generator=g) * 0.3 * s.max()).to(dtype)
        w, wr = w + step, wr + step
        th = 0.0 if t < 2 else 0.05
        cnt = E.oscillation_update(w, s, b, meta, ema, -8, 7, axis, gs, 0.2, th)
        wr, mr, er, cr = RO.oscillation_update(wr, s, b, mr, er, -8, 7, axis, gs, 0.2, th)
        assert torch.equal(meta, mr) and torch.equal(cnt, cr) and torch.equal(w, wr)
        torch.testing.assert_close(ema, er, rtol=0, atol=1e-6)
    loss = E.dampening_loss(w, s, b, -8, 7, axis, gs, 1.0 / w.numel())
    torch.testing.assert_close(loss, RO.dampening_loss(w, s, b, -8, 7, axis, gs, 1.0 / w.numel()), rtol=1e-5, atol=0)
    grad = torch.tensor(1.5)
    gw = E.dampening_loss_backward(grad, w, s, b, -8, 7, axis, gs, 1.0 / w.numel())
    want = torch.ops.quantkern.dampening_loss_backward(grad, w, s, b, -8, 7, axis, gs, 1.0 / w.numel())
    torch.testing.assert_close(gw, want, rtol=0, atol=0)


# ------------------------------------------------------------------ HQQ
@pytest.mark.parametrize("axis", (1, 0))
def test_hqq_matches_cpu(E, order, axis):
    g = torch.Generator().manual_seed(4)
    for bits, N, K, gs, dtype in [(4, 6, 128, 64, torch.float32), (3, 5, 96, 32, torch.bfloat16),
                                  (2, 3, 200, 100, torch.float16), (8, 4, 64, 64, torch.float32)]:
        W = (torch.randn(N, K, generator=g) * 0.02).to(dtype)
        for early in ("global", "group"):
            want = torch.ops.quantkern.hqq_quantize(W, bits, gs, axis, 0.7, 10.0, 1.01, 20, early)
            got = E.hqq_quantize(W, bits, gs, axis, 0.7, 10.0, 1.01, 20, early)
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])
            torch.testing.assert_close(got[2], want[2])


# ------------------------------------------------------------------ calibration
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_calib_histogram_exact(E, order, dtype):
    g = torch.Generator().manual_seed(5)
    Cn, M = 5, 700
    x = (torch.randn(Cn, M, generator=g) * 2).to(dtype)
    R_ = x.float().abs().amax(1) * 0.9  # some values past the range land in the last bins
    n = torch.tensor([16, 64, 1, 256, 7])
    pos, neg = torch.zeros(Cn, 256, dtype=torch.long), torch.zeros(Cn, 256, dtype=torch.long)
    torch.ops.quantkern.calib_histogram(x, pos, neg, R_, n)
    pe, ne = torch.zeros_like(pos), torch.zeros_like(neg)
    E.calib_histogram(x, pe, ne, R_, n)
    assert torch.equal(pe, pos) and torch.equal(ne, neg)


@pytest.mark.parametrize("method", ("mse", "entropy"))
@pytest.mark.parametrize("symmetric", (True, False))
def test_calib_search_matches_cpu(E, order, method, symmetric):
    pos, neg, width, n, args = search_inputs(method, symmetric, C=6, B=128)
    lo, hi = torch.ops.quantkern.calib_search(pos, neg, width, n, *args)
    lo_e, hi_e = E.calib_search(pos, neg, width, n, *args)
    torch.testing.assert_close(lo_e, lo, rtol=1e-12, atol=0)
    torch.testing.assert_close(hi_e, hi, rtol=1e-12, atol=0)
