"""Act-order (desc_act) GPTQ checkpoints: exact conversion to a column-permuted PackedWeight, and
PackedLinear's input permutation ``in_perm`` (forward, backward, dequantize, state_dict, compile,
save_quantized / load_quantized)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkern import PackedWeight, formats, ops
from quantkern.nn import PackedLinear
from quantkern.nn.packed_linear import fake_quant_input

torch.set_num_threads(1)

SDTYPES = (torch.float16, torch.bfloat16, torch.float32)
XDTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOOR = {torch.float32: 2e-7, torch.bfloat16: 1e-4, torch.float16: 1e-5}  # as tests/test_packed_linear.py
# (N, K, group_size): K not a multiple of 256; N a multiple of 32, which every GPTQ width needs
# (qzeros packs along N: odd N has no GPTQ form; odd N is covered through from_packed below)
SHAPES = ((32, 96, 32), (64, 320, 64), (32, 160, 32))


def act_order_ckpt(N, K, gs, bits, zero_offset, sdt, seed=0, g_dtype=torch.int32):
    """GPTQ tensors of a desc_act checkpoint: columns quantized in the order P0 (random), so
    g_idx[P0[j]] = j // gs, while qweight keeps the original column order (as AutoGPTQ writes it)."""
    g = torch.Generator().manual_seed(seed)
    G = K // gs
    q = torch.randint(0, 2 ** bits, (N, K), generator=g)
    z = torch.randint(zero_offset, 2 ** bits + zero_offset, (N, G), generator=g)  # stored field in [0, maxq]
    s = (torch.rand(N, G, generator=g) + 0.01).to(sdt)
    qweight, qzeros, scales = formats.to_gptq(q, z, s, bits, zero_offset)
    P0 = torch.randperm(K, generator=g)
    g_idx = torch.empty(K, dtype=g_dtype)
    g_idx[P0] = (torch.arange(K) // gs).to(g_dtype)
    return qweight, qzeros, scales, g_idx


def gptq_reference(qweight, qzeros, scales, g_idx, bits, zero_offset):
    """GPTQ's own dequantization, from its tensors: W[n, k] = s[g, n] * (q[k, n] - (z[g, n] + offset)),
    g = g_idx[k]; float32 [N, K] (one rounding: the product of an exact integer and the scale)."""
    K, N = qweight.shape[0] * 32 // bits, scales.shape[1]
    qk = formats.gptq_unpack_axis0(qweight, bits, K)  # [K, N]
    zk = formats.gptq_unpack_axis0(qzeros.t(), bits, N).t()  # [G, N]
    gi = g_idx.long()
    return (scales.float()[gi] * (qk - (zk[gi] + zero_offset)).float()).t().contiguous()


def rel_err(y, truth):
    return ((y.double() - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def check_accuracy(y, x, W, bias=None):
    """Error vs the fp64 product <= 2x F.linear's own error at x's dtype (tests/test_packed_linear.py)."""
    truth = x.double() @ W.double().T + (0 if bias is None else bias.double())
    yt = F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))
    e, et = rel_err(y, truth), rel_err(yt, truth)
    assert y.dtype == x.dtype and y.shape == yt.shape
    assert e <= 2 * et + FLOOR[x.dtype], f"error {e:.3g} vs F.linear {et:.3g}"


def layer(bits=4, N=32, K=96, gs=32, zero_offset=1, sdt=torch.float16, bias=True, seed=0):
    qw, qz, sc, g_idx = act_order_ckpt(N, K, gs, bits, zero_offset, sdt, seed)
    b = torch.randn(N, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return PackedLinear.from_gptq(qw, qz, sc, b, bits, gs, g_idx, zero_offset), (qw, qz, sc, g_idx)


# ---------------------------------------------------------------- formats.from_gptq


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("zero_offset", (0, 1))
def test_from_gptq_act_order_is_exact(bits, zero_offset):
    for i, (N, K, gs) in enumerate(SHAPES):
        sdt = SDTYPES[(i + bits) % 3]
        qw, qz, sc, g_idx = act_order_ckpt(N, K, gs, bits, zero_offset, sdt, seed=10 * bits + i,
                                           g_dtype=(torch.int32, torch.int64)[i % 2])
        W = gptq_reference(qw, qz, sc, g_idx, bits, zero_offset)
        pw, perm = formats.from_gptq(qw, qz, sc, bits, gs, g_idx=g_idx, zero_offset=zero_offset, return_perm=True)
        assert perm.dtype == torch.int64 and perm.shape == (K,)
        assert torch.equal(perm, torch.sort(g_idx.long(), stable=True).indices)
        # groups contiguous: stored column j belongs to group j // gs
        assert torch.equal(g_idx.long()[perm], torch.arange(K) // gs)
        assert pw.scales.dtype == sdt and torch.equal(pw.scales, sc.t())  # scales / zeros unchanged
        assert torch.equal(pw.unpack().long(), formats.gptq_unpack_axis0(qw, bits, K).t()[:, perm])
        assert torch.equal(pw.dequantize(torch.float32), W[:, perm])
        lin = PackedLinear.from_gptq(qw, qz, sc, None, bits, gs, g_idx, zero_offset)
        assert torch.equal(lin.in_perm, perm)
        assert torch.equal(lin.dequantize(torch.float32), W)  # original column order, bit for bit


def test_from_gptq_plain_g_idx_gives_no_permutation():
    for bits in (2, 3, 4):
        qw, qz, sc, _ = act_order_ckpt(32, 96, 32, bits, 1, torch.float16)
        plain = formats.from_gptq(qw, qz, sc, bits)
        for g_idx in (None, torch.arange(96) // 32, (torch.arange(96) // 32).int()):
            pw, perm = formats.from_gptq(qw, qz, sc, bits, g_idx=g_idx, return_perm=True)
            assert perm is None and torch.equal(pw.qweight, plain.qweight)
            lin = PackedLinear.from_gptq(qw, qz, sc, bits=bits, g_idx=g_idx)
            assert lin.in_perm is None and "in_perm" not in lin.state_dict() and "in_perm" not in repr(lin)
    # desc_act without groups (group_size -1): g_idx is all zeros, no permutation
    qw, qz, sc, _ = act_order_ckpt(32, 96, 96, 4, 1, torch.float16)
    pw, perm = formats.from_gptq(qw, qz, sc, 4, -1, g_idx=torch.zeros(96, dtype=torch.int32), return_perm=True)
    assert perm is None and pw.group_size == 96


def test_from_gptq_g_idx_errors():
    N, K, gs = 32, 96, 32
    qw, qz, sc, g_idx = act_order_ckpt(N, K, gs, 4, 1, torch.float16)
    with pytest.raises(NotImplementedError, match=r"act-order.*return_perm=True.*PackedLinear\.from_gptq"):
        formats.from_gptq(qw, qz, sc, 4, g_idx=g_idx)
    with pytest.raises(NotImplementedError, match="return_perm=True"):  # PackedWeight's classmethod: same check
        PackedWeight.from_gptq(qw, qz, sc, 4, g_idx=g_idx)
    with pytest.raises(ValueError, match=r"g_idx must have shape \(96,\)"):
        formats.from_gptq(qw, qz, sc, 4, g_idx=g_idx[:-1], return_perm=True)
    with pytest.raises(ValueError, match=r"g_idx must have shape \(96,\)"):
        formats.from_gptq(qw, qz, sc, 4, g_idx=g_idx[None], return_perm=True)
    with pytest.raises(TypeError, match="g_idx must have an integer dtype"):
        formats.from_gptq(qw, qz, sc, 4, g_idx=g_idx.float(), return_perm=True)
    with pytest.raises(TypeError, match="g_idx must have an integer dtype"):
        PackedLinear.from_gptq(qw, qz, sc, g_idx=g_idx > 0)
    bad = g_idx.clone()
    bad[int((bad == 2).nonzero()[0])] = 0  # group 0 gets gs + 1 members, group 2 gs - 1
    with pytest.raises(ValueError, match="group_size = 32 inputs; group 0 has 33"):
        formats.from_gptq(qw, qz, sc, 4, g_idx=bad, return_perm=True)
    with pytest.raises(ValueError, match="group 0 has 33"):
        PackedLinear.from_gptq(qw, qz, sc, g_idx=bad)
    for v in (3, -1):
        bad = g_idx.clone()
        bad[5] = v
        with pytest.raises(ValueError, match=rf"g_idx values must lie in \[0, 3\).*g_idx\[5\] = {v}"):
            formats.from_gptq(qw, qz, sc, 4, g_idx=bad, return_perm=True)
    with pytest.raises(TypeError, match="return_perm must be a bool"):
        formats.from_gptq(qw, qz, sc, 4, g_idx=g_idx, return_perm=1)


# ---------------------------------------------------------------- PackedLinear with in_perm


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_packed_linear_act_order_forward_and_grad(bits):
    for i, (N, K, gs) in enumerate(SHAPES):
        zero_offset = i % 2
        m, (qw, qz, sc, g_idx) = layer(bits, N, K, gs, zero_offset, SDTYPES[i], bias=i != 1, seed=i)
        W = gptq_reference(qw, qz, sc, g_idx, bits, zero_offset)
        pw, P = m.packed_weight, m.in_perm
        for dt in XDTYPES:
            for M in (1, 3, 8):
                x = torch.randn(2, M, K).to(dt) if M == 3 else torch.randn(M, K).to(dt)
                y = m(x)
                # the very op on the gathered input, bit for bit
                assert torch.equal(y, ops.packed_linear(x.index_select(-1, P), pw, m.bias))
                check_accuracy(y, x, W, m.bias)
        # gradient to x flows through the gather (a scatter back): gy @ W in the original order
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(5, K).to(dt).requires_grad_()
            gy = torch.randn(5, N).to(dt)
            m(x).backward(gy)
            tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dt]
            torch.testing.assert_close(x.grad.float(), gy.float() @ W, rtol=tol, atol=tol)
            xp = x.detach().index_select(-1, P).requires_grad_()
            ops.packed_linear(xp, pw, m.bias).backward(gy)
            assert torch.equal(x.grad, torch.empty_like(xp.grad).index_copy_(1, P, xp.grad))


def test_input_permutation_on_any_layer_odd_n():
    # in_perm is the layer's, not GPTQ's: any packed weight (odd N here, which GPTQ cannot hold)
    N, K, gs = 33, 160, 32
    pw = PackedWeight.from_float(torch.randn(N, K), 3, gs, torch.bfloat16)
    P = torch.randperm(K, generator=torch.Generator().manual_seed(3)).int()  # int32 accepted, stored int64
    m = PackedLinear.from_packed(pw, torch.randn(N), in_perm=P)
    assert m.in_perm.dtype == torch.int64 and torch.equal(m.in_perm, P.long())
    W = m.dequantize(torch.float32)
    assert torch.equal(W[:, P.long()], pw.dequantize(torch.float32))
    x = torch.randn(4, K)
    check_accuracy(m(x), x, W, m.bias)
    assert torch.equal(m(x), ops.packed_linear(x[:, P.long()], pw, m.bias))
    # 1-D x, and vmap (torch.func: the Python autograd path of the op)
    assert torch.equal(m(x[0]), m(x[:1])[0])
    xb = torch.randn(3, 2, K)
    torch.testing.assert_close(torch.func.vmap(m)(xb), m(xb), rtol=1e-6, atol=1e-6)
    # removing it makes a plain layer again
    m.set_input_permutation(None)
    assert m.in_perm is None and torch.equal(m(x), ops.packed_linear(x, pw, m.bias))


def test_set_input_permutation_checks():
    m, _ = layer()
    P = m.in_perm.clone()
    dup = P.clone()
    dup[1] = dup[0]
    for bad, exc, match in ((dup, ValueError, r"permutation of range\(96\)"),
                            (torch.arange(1, 97), ValueError, r"permutation of range\(96\)"),
                            (P[:-1], ValueError, r"shape \(96,\)"),
                            (P.float(), TypeError, "integer dtype"),
                            (P.tolist(), TypeError, "must be a tensor")):
        with pytest.raises(exc, match=match):
            m.set_input_permutation(bad)
        with pytest.raises(exc, match=match):  # plain assignment gets the same checks
            m.in_perm = bad
        assert torch.equal(m.in_perm, P)  # a refused call leaves the layer as it was
    m.in_perm = torch.arange(96)
    assert torch.equal(m.in_perm, torch.arange(96))
    # stored as a copy: editing the caller's tensor (or a checkpoint's) later changes nothing
    p = P.clone()
    m.set_input_permutation(p)
    p[1] = p[0]
    assert torch.equal(m.in_perm, P)
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    sd["in_perm"][1] = sd["in_perm"][0]
    assert torch.equal(m.in_perm, P)
    m.in_perm = torch.arange(96)
    x = torch.randn(2, 97)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 96\]"):  # not cut to 96 by the gather
        m(x)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 96\]"):
        m(torch.tensor(1.0))


@pytest.mark.parametrize("dynamic", (False, True))
def test_input_quantizer_commutes_with_the_permutation(dynamic):
    m, _ = layer(4, 64, 320, 64)
    x = torch.randn(3, 320) * torch.linspace(0.1, 3, 320)
    m.set_input_quantizer(8, symmetric=False, dynamic=dynamic, **({} if dynamic else {"scale": 0.02, "zero": 128}))
    xq = fake_quant_input(x, 8, False, dynamic, *(() if dynamic else (m.input_scale, m.input_zero)))
    y = m(x)
    assert torch.equal(y, ops.packed_linear(xq.index_select(-1, m.in_perm), m.packed_weight, m.bias))
    assert torch.equal(m.quantize_input(x.index_select(-1, m.in_perm)), xq.index_select(-1, m.in_perm))


def test_state_dict_round_trip_and_mismatches():
    m, (qw, qz, sc, g_idx) = layer(3, 32, 96, 32, 0, torch.bfloat16)
    sd = m.state_dict()
    assert sd["in_perm"].dtype == torch.int64
    x = torch.randn(4, 96)
    y = m(x)
    # a fresh layer takes the checkpoint's permutation with its weight (strict load, no unexpected key)
    fresh = PackedLinear(96, 32, True, 3, 32, torch.bfloat16)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.in_perm, m.in_perm) and torch.equal(fresh(x), y)
    sd32 = dict(sd, in_perm=sd["in_perm"].int())  # int32 in a checkpoint: stored as int64
    fresh = PackedLinear(96, 32, True, 3, 32, torch.bfloat16)
    fresh.load_state_dict(sd32)
    assert fresh.in_perm.dtype == torch.int64 and torch.equal(fresh(x), y)
    # a plain checkpoint (weight in the original order) into a permuted layer: refused, layer unchanged
    plain = PackedLinear.from_packed(PackedWeight.from_float(torch.randn(32, 96), 3, 32, torch.bfloat16),
                                     torch.randn(32))
    with pytest.raises(ValueError, match=r"qweight comes without in_perm.*set_input_permutation\(None\)"):
        m.load_state_dict(plain.state_dict())
    assert torch.equal(m(x), y)
    m2 = copy.deepcopy(m).set_input_permutation(None)
    m2.load_state_dict(plain.state_dict())
    assert m2.in_perm is None and torch.equal(m2(x), plain(x))
    # a partial checkpoint without the weight leaves weight and permutation together
    m3 = copy.deepcopy(m)
    m3.load_state_dict({"bias": torch.zeros(32)}, strict=False)
    assert torch.equal(m3.in_perm, m.in_perm)
    torch.testing.assert_close(m3(x), y - m.bias, rtol=1e-5, atol=1e-5)
    # a bad permutation in a checkpoint: refused before anything is copied
    for bad, exc in ((sd["in_perm"].flip(0)[:-1], ValueError), (torch.zeros(96, dtype=torch.int64), ValueError),
                     (sd["in_perm"].double(), TypeError)):
        fresh = PackedLinear(96, 32, True, 3, 32, torch.bfloat16)
        with pytest.raises(exc, match="checkpoint in_perm"):
            fresh.load_state_dict(dict(sd, in_perm=bad))
        assert fresh.in_perm is None and int(fresh.qweight.abs().sum()) == 0


def test_module_moves_and_casts_keep_the_permutation():
    m, _ = layer(4, 32, 160, 32, 1, torch.float16)
    P = m.in_perm.clone()
    for mm in (copy.deepcopy(m).half(), copy.deepcopy(m).to(torch.bfloat16), copy.deepcopy(m).to("cpu")):
        assert mm.in_perm.dtype == torch.int64 and torch.equal(mm.in_perm, P)
        x = torch.randn(2, 160).to(mm.bias.dtype)
        assert torch.equal(mm(x), ops.packed_linear(x[:, P], mm.packed_weight, mm.bias))
    mm = copy.deepcopy(m).to("meta")
    assert mm.in_perm.is_meta and mm.in_perm.dtype == torch.int64
    assert "in_perm=True" in repr(m)


def test_torch_compile_fullgraph_with_permutation():
    torch._dynamo.reset()
    m, _ = layer(4, 32, 96, 32)
    x = torch.randn(3, 96, requires_grad=True)
    gy = torch.randn(3, 32)
    y = m(x)
    y.backward(gy)
    gx, gb = x.grad.clone(), m.bias.grad.clone()
    x.grad = m.bias.grad = None
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    yc = cm(x)
    yc.backward(gy)
    assert torch.equal(yc, y) and torch.equal(x.grad, gx) and torch.equal(m.bias.grad, gb)
    # the original-order dequantize in a compiled region, under inductor (which miscompiled an
    # index_copy whose source was its own input; see PackedLinear.dequantize)
    assert torch.equal(torch.compile(lambda: m.dequantize(torch.float32), fullgraph=True)(),
                       m.dequantize(torch.float32))


# ---------------------------------------------------------------- save_quantized / load_quantized
# (quantkern/ptq/quantize.py as it is: in_perm travels as a plain state_dict tensor, and
# PackedLinear's state_dict load checks and adopts it)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 16))


def test_save_load_quantized_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quantkern.ptq.quantize import load_quantized, save_quantized

    model = _model()
    model[0], _ = layer(4, 32, 96, 32, 1, torch.float16)
    model[2] = PackedLinear.from_linear(model[2], 4, 32)  # a plain packed layer beside it
    x = torch.randn(5, 96)
    y = model(x)
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path)
    with safe_open(path, "pt") as f:
        assert f.get_tensor("0.in_perm").dtype == torch.int64 and "2.in_perm" not in f.keys()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    loaded = load_quantized(_model(), path)
    assert torch.equal(loaded[0].in_perm, model[0].in_perm) and loaded[2].in_perm is None
    assert torch.equal(loaded(x), y)
    # a damaged permutation is refused on load, naming the tensor
    bad = dict(tensors)
    bad["0.in_perm"] = torch.zeros(96, dtype=torch.int64)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"checkpoint 0\.in_perm must be a permutation"):
        load_quantized(_model(), str(tmp_path / "bad.safetensors"))
    # a checkpoint without permutations (written before they existed) still loads
    del bad["0.in_perm"]
    save_file(bad, str(tmp_path / "plain.safetensors"), metadata=meta)
    plain = load_quantized(_model(), str(tmp_path / "plain.safetensors"))
    assert plain[0].in_perm is None
    assert torch.equal(plain[0](x), ops.packed_linear(x, model[0].packed_weight, model[0].bias))
    assert json.loads(meta.get("quantkern.tied", "{}")) == {}
