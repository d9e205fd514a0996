"""quantkern::fake_quant_lsq on CUDA (csrc/cuda/fake_quant_lsq.cu) against quantkern.reference.

GPU only: skipped with a reason where torch.cuda.is_available() is False. The
reference runs on the CPU copies, so the oracle shares no code with the kernel.

Forward and grad_x must match exactly (the kernel uses the same IEEE fp32
operations, without FMA contraction, and round-to-nearest-even stores);
grad_scale / grad_offset are sums, compared with a tolerance that grows with
the number of elements per parameter. The samples cover both backward kernels
("rows": inner >= 32, "cols": inner < 32), one and several partial-sum slots,
the vectorised and the scalar (odd length or misaligned) paths.
"""
import math

import pytest
import torch

import quantkern
from quantkern import reference as R

import _lsq_cases as C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests need a GPU (torch.cuda.is_available() is False)")

DTYPES = C.DTYPES


def _case(shape, axis=None, group_size=None, bits=4, dtype=torch.float32, edges=False, layout="contig", seed=0):
    """CUDA inputs; x built on the CPU from a seeded generator."""
    x, scale, offset, qmin, qmax = C.lsq_data(shape, axis, group_size, bits, edges=edges, seed=seed)
    x = x.to(dtype).cuda()
    if layout == "noncontig":  # same values, transposed strides
        x = C.noncontig(x)
    elif layout == "misaligned":  # contiguous, but the data pointer is off the 16-byte grid
        buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        buf[1:] = x.reshape(-1)
        x = buf[1:].view(shape)
    n_per = x.numel() // scale.numel()
    return dict(
        x=x,
        scale=scale.cuda(),
        offset=offset.cuda(),
        qmin=qmin,
        qmax=qmax,
        axis=axis,
        group_size=group_size,
        grad_scale=1.0 / math.sqrt(n_per * max(abs(qmax), 1)),  # LSQ's g
    )


def sample_inputs():
    out = []
    for dtype in DTYPES:
        dn = str(dtype).split(".")[1]
        for n in (1, 3, 127, 4097):
            out.append((f"tensor-{n}-{dn}", dict(shape=(n,), dtype=dtype, bits=8)))
        out += [
            (f"tensor-many-slots-{dn}", dict(shape=(5, 4097), dtype=dtype, bits=4, edges=True)),
            (f"tensor-misaligned-{dn}", dict(shape=(4096,), dtype=dtype, bits=4, layout="misaligned")),
            (f"channel-ax0-{dn}", dict(shape=(127, 33), axis=0, dtype=dtype, bits=2)),  # rows, scalar
            (f"channel-ax0-vec-{dn}", dict(shape=(3, 4096), axis=0, dtype=dtype, bits=8)),  # rows, vector
            (f"channel-ax1-{dn}", dict(shape=(3, 127, 5), axis=1, dtype=dtype, bits=4, edges=True)),  # cols, inner 5
            (f"channel-mid-slots-{dn}", dict(shape=(5, 3, 4097), axis=1, dtype=dtype, bits=4)),  # rows, 10 slots
            (f"channel-last-{dn}", dict(shape=(4097, 3), axis=1, dtype=dtype, bits=4)),  # cols, inner 1, scalar
            (f"channel-last-slots-{dn}", dict(shape=(1000, 257), axis=1, dtype=dtype, bits=4)),  # cols, 4 slots
            (f"channel-last-wide-{dn}", dict(shape=(200, 1024), axis=1, dtype=dtype, bits=8, edges=True)),  # cols, vector
            (f"channel-last-odd-{dn}", dict(shape=(130, 127), axis=-1, dtype=dtype, bits=3)),  # cols, scalar
            (f"channel-neg-{dn}", dict(shape=(2, 3, 4, 5), axis=3, dtype=dtype, bits=8, edges=True)),
            (f"channel-1-{dn}", dict(shape=(1, 1), axis=1, dtype=dtype, bits=4)),
            (f"group16-{dn}", dict(shape=(127, 64), group_size=16, dtype=dtype, bits=4)),  # cols
            (f"group32-{dn}", dict(shape=(3, 128), group_size=32, dtype=dtype, bits=4, edges=True)),  # rows, 1 slot
            (f"group128-{dn}", dict(shape=(1, 4096), group_size=128, dtype=dtype, bits=2)),
            (f"group127-{dn}", dict(shape=(3, 254), group_size=127, dtype=dtype, bits=3)),  # rows, scalar
            (f"noncontig-channel-{dn}", dict(shape=(65, 31), axis=0, dtype=dtype, bits=4, layout="noncontig")),
            (f"noncontig-tensor-{dn}", dict(shape=(129,), dtype=dtype, bits=8, layout="noncontig")),
        ]
    return out


SAMPLES = sample_inputs()
IDS = [s[0] for s in SAMPLES]


def _norm_axis(c):
    return None if c["axis"] is None else c["axis"] % c["x"].dim()


def _op(c):
    return torch.ops.quantkern.fake_quant_lsq(
        c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], _norm_axis(c), c["group_size"], c["grad_scale"]
    )


def _op_bwd(c, grad):
    return torch.ops.quantkern.fake_quant_lsq_backward(
        grad, c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], _norm_axis(c), c["group_size"], c["grad_scale"]
    )


def _grad_for(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c["x"].shape, generator=g).to(c["x"].dtype).cuda()


def _cpu(c):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}


def test_cuda_kernels_built():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("quantkern::fake_quant_lsq", "CUDA"), (
        "quantkern was built without its CUDA kernels: rebuild with a CUDA torch and "
        "QUANTKERN_CUDA=1 pip install --no-build-isolation -e ."
    )
    assert quantkern._load._C.built_with_cuda()


@pytest.mark.parametrize("name,kw", SAMPLES, ids=IDS)
def test_forward_exact(name, kw):
    c = _case(**kw)
    y = _op(c)
    cc = _cpu(c)
    ref = R.fake_quant_lsq(cc["x"], cc["scale"], cc["offset"], c["qmin"], c["qmax"], _norm_axis(c), c["group_size"])
    assert y.device == c["x"].device and y.dtype == c["x"].dtype and y.shape == c["x"].shape and y.is_contiguous()
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name,kw", SAMPLES, ids=IDS)
def test_backward_vs_reference(name, kw):
    c = _case(**kw)
    grad = _grad_for(c)
    gx, gs, gb = _op_bwd(c, grad)
    cc = _cpu(c)
    rgx, rgs, rgb = R.fake_quant_lsq_backward(
        grad.cpu(), cc["x"], cc["scale"], cc["offset"], c["qmin"], c["qmax"], _norm_axis(c), c["group_size"], c["grad_scale"]
    )
    assert gx.dtype == c["x"].dtype and gs.dtype == torch.float32 and gb.dtype == torch.float32
    assert gs.shape == c["scale"].shape and gb.shape == c["offset"].shape
    torch.testing.assert_close(gx.cpu(), rgx, rtol=0, atol=0)
    # Sums of n_per fp32 terms in different orders: the error grows like sqrt(n_per).
    n_per = c["x"].numel() // c["scale"].numel()
    atol = 1e-3 * max(1.0, math.sqrt(n_per) * c["grad_scale"] * max(abs(c["qmin"]), abs(c["qmax"])))
    torch.testing.assert_close(gs.cpu(), rgs, rtol=1e-4, atol=atol)
    torch.testing.assert_close(gb.cpu(), rgb, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("name,kw", SAMPLES, ids=IDS)
def test_autograd(name, kw):
    """The registered autograd formula reaches the CUDA backward."""
    c = _case(**kw)
    x = c["x"].detach().clone().requires_grad_(True)
    s = c["scale"].clone().requires_grad_(True)
    b = c["offset"].clone().requires_grad_(True)
    grad = _grad_for(c)
    y = quantkern.fake_quant_lsq(
        x, s, b, c["qmin"], c["qmax"], axis=c["axis"], group_size=c["group_size"], grad_scale=c["grad_scale"], backend="native"
    )
    y.backward(grad)
    gx, gs, gb = _op_bwd(c, grad)
    assert torch.equal(x.grad, gx) and torch.equal(s.grad, gs) and torch.equal(b.grad, gb)


@pytest.mark.parametrize(
    "kw",
    [
        dict(shape=(64, 4097), dtype=torch.float32, bits=8),  # per-tensor, ~65 slots
        dict(shape=(1000, 257), axis=1, dtype=torch.bfloat16, bits=4),  # cols, 16 slots
        dict(shape=(7, 3, 5000), axis=1, dtype=torch.float16, bits=4),  # rows, 14 slots
    ],
    ids=["tensor", "channel-last", "channel-mid"],
)
def test_backward_deterministic(kw):
    c = _case(**kw)
    grad = _grad_for(c)
    first = _op_bwd(c, grad)
    for _ in range(3):
        again = _op_bwd(c, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "CUDA backward is not bitwise reproducible"


@pytest.mark.parametrize(
    "kw",
    [
        dict(shape=(5, 4097), dtype=torch.float32, bits=8),  # rows (per-tensor), 6 slots
        dict(shape=(3, 4096), axis=0, dtype=torch.bfloat16, bits=4),  # rows, vector grouping
        dict(shape=(200, 1024), axis=1, dtype=torch.float16, bits=8),  # cols, vector grouping
        dict(shape=(127, 64), group_size=16, dtype=torch.float32, bits=4),  # cols, per-group
    ],
    ids=["tensor", "channel-rows", "channel-cols", "group16"],
)
def test_backward_bits_do_not_depend_on_alignment(kw):
    """A view at an odd storage offset and an aligned copy of it get the same bits.

    The kernels used to choose the element grouping (hence the fp32 summation
    order of grad_scale / grad_offset) from the pointers' alignment, so the
    misaligned view and its aligned clone (what autograd saves) differed in the
    last bits."""
    c = _case(**kw, layout="misaligned")
    assert c["x"].data_ptr() % 16 != 0
    grad = _grad_for(c)
    mis = _op_bwd(c, grad)
    c_al = dict(c, x=c["x"].clone())
    assert c_al["x"].data_ptr() % 16 == 0
    al = _op_bwd(c_al, grad.clone())
    for a, b in zip(mis, al):
        assert torch.equal(a, b)


def test_non_default_stream_and_device_guard():
    """Kernels launch on the current stream (no host sync, no default-stream use)."""
    c = _case((4097, 3), axis=1, bits=4)
    ref = _op(c)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    grad = torch.ones_like(c["x"])
    ref_b = _op_bwd(c, grad)
    with torch.cuda.stream(s):
        y = _op(c)
        got_b = _op_bwd(c, grad)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(y, ref)
    for a, b in zip(got_b, ref_b):
        assert torch.equal(a, b)


def test_empty():
    x = torch.empty(0, 5, device="cuda")
    s = torch.ones(5, device="cuda")
    b = torch.zeros(5, device="cuda")
    assert _op(dict(x=x, scale=s, offset=b, qmin=-8, qmax=7, axis=1, group_size=None, grad_scale=1.0)).shape == (0, 5)
    gx, gs, gb = torch.ops.quantkern.fake_quant_lsq_backward(x, x, s, b, -8, 7, 1, None, 1.0)
    assert gx.shape == (0, 5) and torch.equal(gs, torch.zeros(5, device="cuda")) and torch.equal(gb, torch.zeros(5, device="cuda"))


def test_bad_arguments_named():
    x = torch.randn(4, 8, device="cuda")
    s = torch.ones(8, device="cuda")
    b = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="scale is on"):
        torch.ops.quantkern.fake_quant_lsq(x, s.cpu(), b, -8, 7, 1, None)
    with pytest.raises(RuntimeError, match="offset must be float32"):
        torch.ops.quantkern.fake_quant_lsq(x, s, b.double(), -8, 7, 1, None)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.quantkern.fake_quant_lsq(x.double(), s, b, -8, 7, 1, None)
    with pytest.raises(RuntimeError, match="grad dtype"):
        torch.ops.quantkern.fake_quant_lsq_backward(x.half(), x, s, b, -8, 7, 1, None, 1.0)


_OPCHECK_NAMES = ["tensor-127", "tensor-many-slots", "channel-ax1", "channel-last", "channel-mid-slots", "group16", "group32",
                  "noncontig-channel"]
OPCHECK = [s for s in SAMPLES if s[0] in {f"{n}-{d}" for n in _OPCHECK_NAMES for d in ("float32", "bfloat16")}]


@pytest.mark.parametrize("name,kw", OPCHECK, ids=[s[0] for s in OPCHECK])
def test_opcheck(name, kw):
    c = _case(**kw)
    x = c["x"].detach().clone().requires_grad_(True)
    s = c["scale"].clone().requires_grad_(True)
    b = c["offset"].clone().requires_grad_(True)
    args = (x, s, b, c["qmin"], c["qmax"], _norm_axis(c), c["group_size"], c["grad_scale"])
    torch.library.opcheck(torch.ops.quantkern.fake_quant_lsq.default, args)
    grad = _grad_for(c)
    bargs = (grad, c["x"], c["scale"], c["offset"], c["qmin"], c["qmax"], _norm_axis(c), c["group_size"], c["grad_scale"])
    torch.library.opcheck(torch.ops.quantkern.fake_quant_lsq_backward.default, bargs)
