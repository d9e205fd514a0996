"""The canonical packed format: pack/unpack/dequantize exactness, layout, converters, errors."""
import pytest
import torch

import quantkern
from quantkern import PackedWeight, formats, ops
from quantkern.reference import packing as ref

from _isa import ISAS

BITS = (2, 3, 4)
# (N, K, group sizes that divide K): odd N, K not a multiple of 32 (one group per row)
SHAPES = [(1, 32, (32,)), (3, 100, (100,)), (5, 64, (32, 64)), (7, 96, (32, 96)), (17, 256, (64, 128, 256)),
          (2, 4097, (4097,)), (9, 384, (128,))]
META = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(params=["auto"] + ISAS)
def cap(request):
    old = quantkern.get_cpu_capability()
    quantkern.set_cpu_capability(request.param)
    yield request.param
    quantkern.set_cpu_capability("auto")


def rand_q(N, K, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("N,K,_g", SHAPES)
def test_pack_unpack_exact(bits, N, K, _g):
    q = rand_q(N, K, bits, seed=N * K + bits)
    packed = ops.pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (N, (K + 31) // 32 * bits)
    assert torch.equal(packed, ref.pack(q, bits)), "native packer differs from the spec"
    assert torch.equal(ops.unpack(packed, bits, K), q)
    assert torch.equal(ref.unpack(packed, bits, K), q)


def test_layout_matches_diagram():
    # 4 bits: byte p = q[p] | q[p + 16] << 4
    q = torch.arange(32, dtype=torch.uint8).remainder(16)[None]
    b = ref._words_to_bytes(ref.pack(q, 4))[0]
    assert [int(v) for v in b[:3]] == [0 | (0 << 4), 1 | (1 << 4), 2 | (2 << 4)]
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 17] = 9
    b = ref._words_to_bytes(ref.pack(q, 4))[0]
    assert int(b[1]) == 9 << 4 and int(b.sum()) == 9 << 4
    # 2 bits: bits 2f..2f+1 of byte p hold q[8f + p]
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 8 * 3 + 5] = 2
    b = ref._words_to_bytes(ref.pack(q, 2))[0]
    assert int(b[5]) == 2 << 6 and int(b.sum()) == 2 << 6
    # 3 bits: lo plane then hi plane; bit t of the hi word = bit 2 of q[t]
    q = torch.zeros(1, 64, dtype=torch.uint8)  # nb = 2
    q[0, 32 + 13] = 5  # block 1, t = 13: lo = 1, hi = 1
    w = ref.pack(q, 3)[0]
    assert w.shape == (6,)
    b = ref._words_to_bytes(w[None])[0]
    assert int(b[8 * 1 + 5]) == 1 << 2  # lo plane, block 1, byte p = 5, field f = 1
    assert int(w[4 + 1]) == 1 << 13  # hi plane word 2 nb + j = 5
    assert int(w[4]) == 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("meta", META)
def test_dequantize_exact(bits, meta, cap):
    for N, K, gss in SHAPES[:6]:
        for gs in gss:
            g = torch.Generator().manual_seed(K + gs)
            q = rand_q(N, K, bits, seed=K)
            s = (torch.rand(N, K // gs, generator=g) + 0.1).to(meta)
            z = (torch.rand(N, K // gs, generator=g) * (1 << bits)).to(meta)
            w = PackedWeight.from_quantized(q, s, z, bits, gs)
            want = ref.dequantize(w.qweight, s, z, bits, gs, K)
            assert torch.equal(w.dequantize(torch.float32), want)
            for dt in (torch.float16, torch.bfloat16):
                assert torch.equal(w.dequantize(dt), want.to(dt))
            assert w.dequantize().dtype == meta


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", [32, 64, 128, None])
def test_from_float_rtn(bits, gs):
    W = torch.randn(33, 256)
    pw = PackedWeight.from_float(W, bits, gs)
    G = 1 if gs is None else 256 // gs
    assert pw.scales.shape == (33, G) and pw.scales.dtype == torch.float32
    err = (pw.dequantize() - W).abs()
    s = ref.group_view(pw.scales, 256)
    assert bool((err <= 0.5 * s * (1 + 1e-5) + 1e-7).all())
    q = pw.unpack()
    assert int(q.max()) == (1 << bits) - 1 and int(q.min()) == 0
    # fp16 metadata by default for an fp16 weight
    assert PackedWeight.from_float(W.half(), bits, gs).scales.dtype == torch.float16


@pytest.mark.parametrize("meta", [torch.float16, torch.bfloat16])
def test_from_float_tiny_range_groups(meta):
    """Groups whose range/(2^b - 1) underflows in the metadata dtype (or whose z = -min/s would
    overflow it) become constant groups instead of failing with a NaN/inf zero."""
    W = torch.randn(4, 64)
    W[1, :32] = 1e-3
    W[1, 0] = 1e-3 + 3e-7  # fp16 s = 2e-8 -> 0
    W[2, 32:] = 0.0
    W[2, 40] = 1e-30 if meta == torch.bfloat16 else 2.4e-7
    W[3, :32] = 1.0
    W[3, 7] = 1.0 + 1e-7  # z = -1 / s overflows fp16
    for Win in (W, W.to(meta)):
        pw = PackedWeight.from_float(Win, 4, 32, meta)
        assert torch.isfinite(pw.scales.float()).all() and (pw.scales.float() > 0).all()
        err = (pw.dequantize(torch.float32) - Win.float()).abs()
        assert err[1, :32].max() < 1e-5 and err[2, 32:].max() < 1e-5 and err[3, :32].max() < 1e-2


@pytest.mark.parametrize("meta", [torch.float16, torch.bfloat16])
def test_from_float_groups_far_from_zero_keep_half_a_step(meta):
    """Groups far from 0 next to their range (|z| >> 2^bits): z = -min / s rounded to fp16 / bf16 moved
    the grid by several codes and clamped the extremes, silently (bf16, 3 + [0, 0.03): 3.9 steps of
    error, 3 + [0, 0.003): 35; a review's case). quantize_rtn then searches nearby representable (s, z)
    pairs (offsets up to 1000x the range: within 0.6 steps; beyond ~3000x the values' spacing is below
    bf16's resolution of them); ordinary groups keep the plain formula bit for bit."""
    g = torch.Generator().manual_seed(0)
    for off, bits in ((100, 4), (1000, 4), (1000, 2), (300, 3), (30, 4), (1000, 3)):
        W = 3.0 + 3.0 / off * torch.rand(8, 64, generator=g)
        W[::2] *= -1
        pw = PackedWeight.from_float(W, bits, 32, meta)
        Wg = W.reshape(8, 2, 32)
        step = (Wg.amax(-1) - Wg.amin(-1)) / (2 ** bits - 1)
        err = (pw.dequantize(torch.float32) - W).abs().reshape(8, 2, 32).amax(-1)
        assert bool((err <= 0.65 * step).all()), (off, bits, float((err / step).max()))
    W = torch.randn(16, 128, generator=g)
    q, s, z = ref.quantize_rtn(W, 4, 32, meta)
    Wg = W.reshape(16, 4, 32)
    want_s = ((Wg.amax(-1) - Wg.amin(-1)) / 15).to(meta)
    assert torch.equal(s, want_s) and torch.equal(z, (-Wg.amin(-1) / want_s.float()).to(meta))


def test_packed_weight_to_refuses_lossy_meta_cast():
    W = torch.randn(4, 64)
    W[1, :32] *= 1e-8  # scales ~3e-9: 0 in fp16
    pw = PackedWeight.from_float(W, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="underflow"):
        pw.to(meta_dtype=torch.float16)
    assert pw.to(meta_dtype=torch.bfloat16).scales.dtype == torch.bfloat16
    # a deep fp16 subnormal is not 0 but keeps a few bits (scales ~1e-7: up to 25% off): refused too
    W2 = torch.randn(4, 64) * 1e-6
    with pytest.raises(ValueError, match="subnormal"):
        PackedWeight.from_float(W2, 4, 32, torch.float32).to(meta_dtype=torch.float16)
    W2 *= 100  # scales ~2e-5: shallow subnormals, < 2^-8 relative error
    assert PackedWeight.from_float(W2, 4, 32, torch.float32).to(meta_dtype=torch.float16).scales.dtype == torch.float16
    with pytest.raises(TypeError, match="meta_dtype"):
        pw.to(torch.float16)


def test_converters_refuse_lossy_meta_dtype_and_meta_device_casts():
    # from_gptq / from_hqq cast with meta_dtype= unchecked (scales ~1e-9 all became 0 in fp16);
    # PackedWeight.to(meta_dtype=) on the meta device raised an unrelated .item() error
    N, K, gs = 16, 64, 32
    q = rand_q(N, K, 4, seed=0)
    z = torch.randint(1, 16, (N, K // gs))
    s = torch.full((N, K // gs), 1e-9)
    qweight, qzeros, scales = formats.to_gptq(q, z, s, 4, 1)
    with pytest.raises(ValueError, match="from_gptq: casting scales / zeros to torch.float16 loses"):
        formats.from_gptq(qweight, qzeros, scales, 4, meta_dtype=torch.float16)
    with pytest.raises(TypeError, match="from_gptq: meta_dtype must be one of"):
        formats.from_gptq(qweight, qzeros, scales, 4, meta_dtype=torch.float64)
    assert formats.from_gptq(qweight, qzeros, scales, 4, meta_dtype=torch.bfloat16).scales.dtype == torch.bfloat16
    pw = PackedWeight.from_float(torch.randn(N, K), 4, gs, torch.float32).to("meta")
    assert pw.to(meta_dtype=torch.float16).scales.dtype == torch.float16
    assert pw.to("meta", meta_dtype=torch.bfloat16).scales.is_meta


def test_packed_weight_to_and_repr():
    pw = PackedWeight.from_float(torch.randn(8, 64), 4, 32)
    pw2 = pw.to("cpu", meta_dtype=torch.bfloat16)
    assert pw2.scales.dtype == torch.bfloat16 and pw2.shape == (8, 64)
    assert "bits=4" in repr(pw)
    assert pw.nbytes() == 8 * 8 * 4 + 2 * 8 * 2 * 4


# ---------------------------------------------------------------- converters
def _hqq():
    try:
        from hqq.core.quantize import Quantizer
    except Exception as e:  # pragma: no cover
        pytest.skip(f"hqq not installed: {e}")
    return Quantizer


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", [64, 128, None])
@pytest.mark.parametrize("optimize", [False, True])
def test_from_hqq_bit_exact(bits, gs, optimize):
    Quantizer = _hqq()
    torch.manual_seed(bits * 7 + (gs or 0))
    W = torch.randn(48, 256)
    W_q, meta = Quantizer.quantize(W, nbits=bits, group_size=gs, axis=1, optimize=optimize, device="cpu",
                                   round_zero=bits == 4)
    meta["compute_dtype"] = torch.float32
    pw = formats.from_hqq(W_q, meta)
    # codes: hqq's own unpack, reshaped to [N, K]
    codes = Quantizer.unpack[meta["packing"]](W_q, dtype=torch.int64)[: 48 * 256 // (gs or 256)].reshape(48, 256)
    assert torch.equal(pw.unpack().to(torch.int64), codes)
    assert torch.equal(pw.scales, meta["scale"].reshape(pw.scales.shape))
    assert torch.equal(pw.zeros, meta["zero"].reshape(pw.zeros.shape))
    if bits == 3 and gs is None:  # hqq 0.2.8's own dequantize fails here (group_size None with 3-bit rows)
        want = ((codes.float().reshape(-1, 256) - meta["zero"]) * meta["scale"]).reshape(48, 256)
    else:
        want = Quantizer.dequantize(W_q, meta)
    assert torch.equal(pw.dequantize(torch.float32), want)
    # fp16 metadata, as HQQLinear stores it
    meta16 = dict(meta, scale=meta["scale"].half(), zero=meta["zero"].half())
    pw16 = formats.from_hqq(W_q, meta16)
    assert pw16.scales.dtype == torch.float16 and torch.equal(pw16.unpack(), pw.unpack())


def test_from_hqq_rejects_axis0():
    Quantizer = _hqq()
    W_q, meta = Quantizer.quantize(torch.randn(16, 64), nbits=4, group_size=32, axis=0, optimize=False, device="cpu")
    with pytest.raises(NotImplementedError, match="axis=0"):
        formats.from_hqq(W_q, meta)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zero_offset", [1, 0])
def test_gptq_roundtrip(bits, zero_offset):
    N, K, gs = 64, 256, 64
    q = rand_q(N, K, bits, seed=bits)
    z = torch.randint(zero_offset, 1 << bits, (N, K // gs))
    s = torch.rand(N, K // gs).half() + 0.01
    qweight, qzeros, scales = formats.to_gptq(q, z, s, bits, zero_offset)
    assert qweight.shape == (K * bits // 32, N) and qzeros.shape == (K // gs, N * bits // 32)
    pw = formats.from_gptq(qweight, qzeros, scales, bits, zero_offset=zero_offset)
    assert torch.equal(pw.unpack(), q)
    assert torch.equal(pw.zeros, z.half()) and torch.equal(pw.scales, s)
    # GPTQ's own dequantization: scales[g, n] * (q[k, n] - (qzeros[g, n] + offset))
    qk = formats.gptq_unpack_axis0(qweight, bits, K)  # [K, N]
    zk = formats.gptq_unpack_axis0(qzeros.t(), bits, N).t()  # [G, N]
    gidx = torch.arange(K) // gs
    w_gptq = scales.float()[gidx] * (qk - (zk[gidx] + zero_offset)).float()
    assert torch.equal(pw.dequantize(torch.float32), w_gptq.t())


def test_gptq_4bit_word_layout():
    # qweight[i, n] holds q[8 i + j, n] in bits 4j..4j+3
    K, N = 32, 8
    q = torch.zeros(N, K, dtype=torch.uint8)
    q[3, 8 * 2 + 5] = 0xB
    qweight, qzeros, _ = formats.to_gptq(q, torch.ones(N, 1, dtype=torch.int64), torch.ones(N, 1), 4, 1)
    assert int(qweight[2, 3]) == 0xB << 20 and int(qweight.abs().sum()) == 0xB << 20
    assert int(qzeros[0, 0]) == 0  # zero 1 stored as 0 (v1 convention)
    # 3-bit boundary values (the 11th and 22nd cross words)
    q3 = torch.zeros(1, 32, dtype=torch.uint8)
    q3[0, 10] = 0b101
    q3[0, 21] = 0b110
    w = formats.gptq_pack_axis0(q3.t(), 3)[:, 0].to(torch.int64) & 0xFFFFFFFF
    assert int(w[0]) == 0b01 << 30 and int(w[1]) == (1 | (0 << 31)) and int(w[2]) == 0b11
    assert torch.equal(formats.gptq_unpack_axis0(formats.gptq_pack_axis0(q3.t(), 3), 3, 32).t().to(torch.uint8), q3)


def test_gptq_act_order_rejected():
    q = rand_q(8, 64, 4)
    qw, qz, s = formats.to_gptq(q, torch.ones(8, 2, dtype=torch.int64), torch.ones(8, 2), 4)
    g_idx = (torch.arange(64) // 32).flip(0)  # a permuted (act-order) g_idx
    with pytest.raises(NotImplementedError, match="act-order"):
        formats.from_gptq(qw, qz, s, 4, g_idx=g_idx)
    formats.from_gptq(qw, qz, s, 4, g_idx=torch.arange(64) // 32)
    # the error's advice works on the PackedWeight method too
    pw, perm = PackedWeight.from_gptq(qw, qz, s, 4, g_idx=g_idx, return_perm=True)
    pw2, perm2 = formats.from_gptq(qw, qz, s, 4, g_idx=g_idx, return_perm=True)
    assert torch.equal(pw.qweight, pw2.qweight) and torch.equal(perm, perm2)
    with pytest.raises(ValueError, match="last group is partial"):  # AutoGPTQ's ceil(K / g) groups
        formats.from_gptq(qw, qz, s, 4, group_size=48)


def test_gptq_converter_checks():
    q = rand_q(8, 64, 4)
    one = torch.ones(8, 2)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\]"):
        formats.to_gptq(q.to(torch.int64) + 16, one, one, 4)
    with pytest.raises(ValueError, match="fractional"):
        formats.to_gptq(q, torch.full((8, 2), 7.6), one, 4, zero_offset=0)
    with pytest.raises(ValueError, match=r"zeros must be integers in \[1, 16\]"):
        formats.to_gptq(q, torch.zeros(8, 2), one, 4)  # v1 stores zero - 1: 0 would wrap
    with pytest.raises(ValueError, match=r"zeros must be integers in \[0, 15\]"):
        formats.to_gptq(q, torch.full((8, 2), 20.0), one, 4, zero_offset=0)
    qw, qz, sc = formats.to_gptq(q, one, one, 4)
    # GPTQ configs write group_size -1 for one group per row
    q1 = formats.to_gptq(q, torch.ones(8, 1), torch.ones(8, 1), 4)
    assert formats.from_gptq(*q1, 4, group_size=-1).group_size == 64
    with pytest.raises(ValueError, match="multiple of 3"):
        formats.from_gptq(torch.zeros(4, 32, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32),
                          torch.ones(1, 32), 3)
    with pytest.raises(ValueError, match="G >= 1"):  # no groups: was a ZeroDivisionError
        formats.from_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(0, 1, dtype=torch.int32),
                          torch.ones(0, 8), 4)
    with pytest.raises(ValueError, match="N = 12"):
        formats.from_gptq(torch.zeros(8, 12, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                          torch.ones(1, 12), 4)


def test_from_hqq_checks_w_q_shape():
    Quantizer = _hqq()
    W_q, meta = Quantizer.quantize(torch.randn(3, 64), nbits=4, group_size=64, axis=1, optimize=False, device="cpu")
    with pytest.raises(ValueError, match="multiple of 2"):  # hqq mis-packs an odd number of rows
        formats.from_hqq(W_q, meta)
    W_q, meta = Quantizer.quantize(torch.randn(4, 64), nbits=4, group_size=64, axis=1, optimize=False, device="cpu")
    with pytest.raises(ValueError, match="W_q must have shape"):
        formats.from_hqq(W_q[:, :32], meta)


# ---------------------------------------------------------------- errors
def test_errors():
    q = rand_q(4, 64, 4)
    with pytest.raises(ValueError, match="bits"):
        ops.pack(q, 5)
    with pytest.raises(ValueError, match="bits"):
        PackedWeight.from_float(torch.randn(4, 64), 5, 32)
    with pytest.raises(ValueError, match="group_size 48"):
        PackedWeight.from_float(torch.randn(4, 96), 4, 48)
    with pytest.raises(ValueError, match="group_size 64"):
        PackedWeight.from_float(torch.randn(4, 96), 4, 64)
    with pytest.raises(RuntimeError, match="values must lie"):
        torch.ops.quantkern.pack(q + 8, 3)
    for dt in (torch.uint16, torch.uint32, torch.uint64):  # unsigned codes beyond uint8 are packed too
        assert torch.equal(ops.pack(q.to(dt), 4), ops.pack(q, 4))
    with pytest.raises(ValueError, match="q must be a 2-D tensor"):
        PackedWeight.from_quantized(q[0], torch.ones(4, 2), torch.ones(4, 2), 4, 32)
    pw = PackedWeight.from_float(torch.randn(4, 64), 4, 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        PackedWeight(pw.qweight, pw.scales[:, :1], pw.zeros[:, :1], 4, 32, (4, 64))
    with pytest.raises(ValueError, match="zeros must have shape"):
        PackedWeight(pw.qweight, pw.scales, pw.zeros[:3], 4, 32, (4, 64))
    with pytest.raises(TypeError, match="zeros dtype"):
        PackedWeight(pw.qweight, pw.scales, pw.zeros.half(), 4, 32, (4, 64))
    with pytest.raises(TypeError, match="qweight must have dtype"):
        PackedWeight(pw.qweight.float(), pw.scales, pw.zeros, 4, 32, (4, 64))
    with pytest.raises(ValueError, match="qweight must have shape"):
        PackedWeight(pw.qweight[:, :4], pw.scales, pw.zeros, 4, 32, (4, 64))
    with pytest.raises(ValueError, match="is on meta"):
        PackedWeight(pw.qweight, pw.scales.to("meta"), pw.zeros, 4, 32, (4, 64))
    # the C++ checks name the argument too
    with pytest.raises(RuntimeError, match="scales must have shape"):
        torch.ops.quantkern.dequantize(pw.qweight, pw.scales[:, :1], pw.zeros[:, :1], 4, 32, 64)
    with pytest.raises(RuntimeError, match="group_size 48"):
        torch.ops.quantkern.dequantize(pw.qweight, pw.scales, pw.zeros, 4, 48, 64)
    with pytest.raises(RuntimeError, match="bits must be 2, 3 or 4"):
        torch.ops.quantkern.unpack(pw.qweight, 5, 64)


def test_opcheck_pack_ops():
    q = rand_q(5, 100, 3)
    pw = PackedWeight.from_quantized(q, torch.rand(5, 1) + 0.1, torch.rand(5, 1), 3, 100)
    torch.library.opcheck(torch.ops.quantkern.pack, (q, 3))
    torch.library.opcheck(torch.ops.quantkern.unpack, (pw.qweight, 3, 100))
    torch.library.opcheck(torch.ops.quantkern.dequantize, (pw.qweight, pw.scales, pw.zeros, 3, 100, 100, torch.bfloat16))


def test_safetensors_checkpoint(tmp_path):
    from quantkern import load_packed, save_packed

    ws = {"a": PackedWeight.from_float(torch.randn(8, 100), 3, None), "b.c": PackedWeight.from_float(torch.randn(5, 64), 2, 32)}
    p = str(tmp_path / "w.safetensors")
    save_packed(ws, p, extra={"b.bias": torch.ones(5)})
    got, extra = load_packed(p)
    assert set(got) == {"a", "b.c"} and torch.equal(extra["b.bias"], torch.ones(5))
    for k in ws:
        assert got[k].bits == ws[k].bits and got[k].group_size == ws[k].group_size and got[k].shape == ws[k].shape
        assert torch.equal(got[k].dequantize(), ws[k].dequantize())
    from safetensors.torch import save_file

    bad = str(tmp_path / "bad.safetensors")
    save_file({"x": torch.ones(1)}, bad, metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a quantkern.packed checkpoint"):
        load_packed(bad)
    # a tampered 'weights' header gives a ValueError that says what is wrong, never a raw error
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(p, "pt") as f:
        meta = f.metadata()
    tensors = load_file(p)
    header = json.loads(meta["weights"])
    tampered = {
        "not JSON": "{",
        "object of layers": json.dumps([1, 2]),
        "must be integers": json.dumps(dict(header, a=dict(header["a"], bits="3"))),
        "expected keys": json.dumps(dict(header, a={"bits": 3, "group_size": None})),
        "shape must be": json.dumps(dict(header, a=dict(header["a"], shape=[8]))),
        "file has no": json.dumps(dict(header, z=header["a"])),
    }
    for why, text in tampered.items():
        save_file(tensors, bad, metadata=dict(meta, weights=text))
        with pytest.raises(ValueError, match=why):
            load_packed(bad)


def test_nan_scales_rejected():
    pw = PackedWeight.from_float(torch.randn(4, 64), 4, 32)
    s = pw.scales.clone()
    s[1, 1] = float("nan")
    with pytest.raises(ValueError, match="scales contain NaN"):
        PackedWeight(pw.qweight, s, pw.zeros, 4, 32, (4, 64))


def test_save_packed_extra_cannot_replace_a_packed_tensor(tmp_path):
    # an extra tensor named like a packed weight's tensor used to overwrite it silently: the file then
    # loaded as a different weight (same dtype and shape) with no error
    from quantkern import load_packed, save_packed

    pw = PackedWeight.from_float(torch.randn(8, 64), 4, 32)
    p = str(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="clashes"):
        save_packed({"l": pw}, p, extra={"l.qweight": torch.zeros_like(pw.qweight)})
    save_packed({"l": pw}, p, extra={"l.bias": torch.zeros(8)})
    got, extra = load_packed(p)
    assert torch.equal(got["l"].qweight, pw.qweight) and set(extra) == {"l.bias"}


def test_load_packed_requires_weights_header(tmp_path):
    # a header without the 'weights' entry used to load as "no packed weights" with every
    # qweight / scales / zeros returned as a plain extra tensor
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from quantkern import load_packed, save_packed

    p, bad = str(tmp_path / "w.safetensors"), str(tmp_path / "bad.safetensors")
    save_packed({"l": PackedWeight.from_float(torch.randn(8, 64), 4, 32)}, p)
    with safe_open(p, "pt") as f:
        meta = dict(f.metadata())
    meta.pop("weights")
    save_file(load_file(p), bad, metadata=meta)
    with pytest.raises(ValueError, match="no 'weights' entry"):
        load_packed(bad)
    save_packed({}, p, extra={"x": torch.ones(2)})  # no packed weights at all still round-trips
    got, extra = load_packed(p)
    assert got == {} and set(extra) == {"x"} and json.loads(read_meta(p)["weights"]) == {}


def read_meta(p):
    from quantkern.packed import read_packed_metadata

    return read_packed_metadata(p)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_from_hqq_view_as_float(bits, compute_dtype):
    # HQQLinear(view_as_float=True) stores W_q viewed as its compute dtype: from_hqq refused it
    # (W_q shape error) for every case where that view changes the shape
    _hqq()
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(bits)
    lin = torch.nn.Linear(128, 48)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=64, axis=1, view_as_float=True)
    h = HQQLinear(lin, cfg, compute_dtype=compute_dtype, device="cpu", initialize=True, del_orig=False)
    assert h.meta["view_as_float"] and h.W_q.dtype == compute_dtype
    pw = formats.from_hqq(h)
    meta = dict(h.meta, view_as_float=False)
    want = formats.from_hqq(h.W_q.data.view(h.meta["unpack_view_dtype"]), meta)
    assert torch.equal(pw.qweight, want.qweight) and torch.equal(pw.scales, want.scales)
    if compute_dtype == torch.float32:  # hqq dequantizes in its compute dtype: bit for bit only in fp32
        assert torch.equal(pw.dequantize(torch.float32), h.dequantize())


def test_from_float_nonfinite_or_unrepresentable_weights_name_w():
    # NaN / inf in W used to surface as "PackedWeight: scales contain NaN or inf" (an argument the
    # caller never passed); a finite W whose values overflow the metadata dtype likewise
    for bad in (float("nan"), float("inf"), -float("inf")):
        W = torch.randn(4, 64)
        W[2, 5] = bad
        for dt in (torch.float32, torch.float16):
            with pytest.raises(ValueError, match=r"from_float: W contains NaN or inf.*row 2"):
                PackedWeight.from_float(W.to(dt), 4, 32)
    with pytest.raises(ValueError, match=r"from_float: W .*float16.*meta_dtype=torch.float32"):
        PackedWeight.from_float(torch.full((2, 32), 7e4), 4, 32, torch.float16)  # a constant row beyond fp16
    with pytest.raises(ValueError, match=r"from_float: W .*float16.*meta_dtype=torch.float32"):
        PackedWeight.from_float(torch.tensor([[-1e6] * 16 + [1e6] * 16]), 2, 32, torch.float16)  # range beyond fp16
    # constant and zero rows stay exact
    W = torch.randn(3, 64)
    W[0], W[1] = 3.0, 0.0
    for md in META:
        d = PackedWeight.from_float(W, 3, 32, md).dequantize(torch.float32)
        assert torch.equal(d[:2], W[:2])


def test_reference_pack_unpack_zero_rows():
    # the spec must handle N = 0 like the kernels do (reshape(-1) of an empty tensor is ambiguous)
    for bits in BITS:
        q = torch.zeros(0, 100, dtype=torch.uint8)
        qw = ref.pack(q, bits)
        assert qw.shape == (0, 4 * bits) and torch.equal(qw, ops.pack(q, bits))
        assert ref.unpack(qw, bits, 100).shape == (0, 100)
        assert ref.dequantize(qw, torch.ones(0, 1), torch.zeros(0, 1), bits, 100, 100).shape == (0, 100)


def test_gptq_converters_refuse_what_they_cannot_hold():
    q = torch.randint(0, 16, (8, 64))
    with pytest.raises(ValueError, match="out_features N"):
        formats.to_gptq(q[:6], torch.full((6, 2), 8.0), torch.ones(6, 2), 4)
    with pytest.raises(ValueError, match="zeros contain NaN"):
        formats.to_gptq(q, torch.full((8, 2), float("nan")), torch.ones(8, 2), 4)
    with pytest.raises(ValueError, match="scales contain NaN"):
        formats.to_gptq(q, torch.full((8, 2), 8.0), torch.full((8, 2), float("inf")), 4)
    qw, qz, s = formats.to_gptq(q, torch.full((8, 2), 8.0), torch.ones(8, 2), 4)
    with pytest.raises(ValueError, match="one group per row"):
        formats.from_gptq(qw, qz, s, 4, group_size=-1)


# ---------------------------------------------------------------- test-drive of the packed-format API
def test_from_float_group_range_beyond_fp32():
    # max - min of finite fp32 weights overflowed to inf: from_float refused a weight whose fp32 scale
    # (range / 15) and zero are representable, advising meta_dtype=torch.float32, already in use
    W = torch.tensor([[-3e38] * 16 + [3e38] * 16, [1.0] * 16 + [2.0] * 16])
    pw = PackedWeight.from_float(W, 4, 32)
    assert torch.isfinite(pw.scales).all() and torch.equal(pw.unpack()[0], torch.tensor([0] * 16 + [15] * 16,
                                                                                          dtype=torch.uint8))
    assert torch.allclose(pw.dequantize(torch.float32), W, rtol=1e-6)
    q, s, z = ref.quantize_rtn(torch.randn(4, 64), 3, 32)  # ordinary ranges: the fp32 formula, bit for bit
    W2 = torch.randn(4, 64)
    s2 = (W2.reshape(4, 2, 32).amax(-1) - W2.reshape(4, 2, 32).amin(-1)) / 7
    assert torch.equal(ref.quantize_rtn(W2, 3, 32)[1], s2)
    W64 = torch.randn(2, 32, dtype=torch.float64)
    W64[0, 3] = 1e39  # beyond fp32: no metadata dtype can hold it, and the message must not suggest fp32
    with pytest.raises(ValueError, match="rescale W") as e:
        PackedWeight.from_float(W64, 4, 32)
    assert "meta_dtype" not in str(e.value)
    with pytest.raises(ValueError, match=r"W must have in_features > 0"):  # named group_size / quantkern.pack
        PackedWeight.from_float(torch.randn(4, 0), 4, None)


def test_from_quantized_inferred_group_size_names_scales():
    q = rand_q(4, 64, 4)
    # G = 3 does not divide K = 64: the error named a "group_size 21" the caller never passed
    with pytest.raises(ValueError, match=r"from_quantized: scales has 3 groups per row.*K = 64"):
        PackedWeight.from_quantized(q, torch.ones(4, 3), torch.zeros(4, 3), 4)
    with pytest.raises(ValueError, match=r"scales has 0 groups"):
        PackedWeight.from_quantized(q, torch.ones(4, 0), torch.zeros(4, 0), 4)
    assert PackedWeight.from_quantized(q, torch.ones(4, 2), torch.zeros(4, 2), 4).group_size == 32


def test_packed_weight_to_meta_dtype_must_be_float():
    pw = PackedWeight.from_float(torch.randn(4, 64), 4, 32)
    # an int meta_dtype was reported as "loses scale(s) to underflow"
    for bad in (torch.int32, torch.float64):
        with pytest.raises(TypeError, match="meta_dtype must be one of"):
            pw.to(meta_dtype=bad)
    assert pw.to(meta_dtype=torch.float16).meta_dtype == torch.float16


def test_unpack_refuses_bool_in_features():
    # True passed the int check and unpacked one column
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        ops.unpack(torch.zeros(2, 4, dtype=torch.int32), 4, True)


def test_to_gptq_refuses_float_codes_and_bad_groups():
    q = rand_q(8, 64, 4)
    one = torch.ones(8, 2)
    # float codes were truncated (2.7 -> 2) without a word
    with pytest.raises(TypeError, match="q .*integer dtype"):
        formats.to_gptq(torch.full((8, 64), 2.7), one, one, 4)
    # G = 3 does not divide K = 64: tensors were written that no reader (from_gptq included) accepts
    with pytest.raises(ValueError, match=r"G = 3 groups.*K = 64"):
        formats.to_gptq(q, torch.ones(8, 3), torch.ones(8, 3), 4)
    with pytest.raises(ValueError, match=r"G = 0 groups"):  # was a raw reshape error
        formats.to_gptq(q, torch.ones(8, 0), torch.ones(8, 0), 4)
    with pytest.raises(TypeError, match="scales must be a float"):
        formats.to_gptq(q, one, one.long(), 4)
    with pytest.raises(TypeError, match="zero_offset must be an int"):
        formats.to_gptq(q, one, one, 4, zero_offset=0.5)


def test_from_gptq_argument_checks():
    q = rand_q(8, 64, 4)
    qw, qz, s = formats.to_gptq(q, torch.ones(8, 2), torch.ones(8, 2), 4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):  # 0 was taken as None
        formats.from_gptq(qw, qz, s, 4, group_size=0)
    with pytest.raises(TypeError, match="zero_offset must be an int"):  # 0.5 gave fractional zeros
        formats.from_gptq(qw, qz, s, 4, zero_offset=0.5)
    with pytest.raises(ValueError, match=r"g_idx must have shape \(64,\)"):  # was reported as act-order
        formats.from_gptq(qw, qz, s, 4, g_idx=torch.arange(65) // 32)
    with pytest.raises(ValueError, match="qweight has no rows"):
        formats.from_gptq(torch.zeros(0, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                          torch.ones(1, 8), 4)
    assert torch.equal(formats.from_gptq(qw, qz, s, 4, group_size=32).unpack(), q)
    with pytest.raises(ValueError, match="bits must be an int 2, 3 or 4, got 4.0"):  # failed later, naming group_size
        formats.from_gptq(qw, qz, s, 4.0)
    import numpy as np
    assert torch.equal(formats.from_gptq(qw, qz, s, np.int64(4), group_size=32).unpack(), q)


def test_from_float_refuses_scales_deep_in_the_subnormals():
    # fp16 scales of weights ~1e-6 kept a few bits: 7x fp32 metadata's error, without a word
    W = torch.randn(64, 128) * 1e-6
    with pytest.raises(ValueError, match="deep into torch.float16's subnormals.*meta_dtype=torch.float32"):
        PackedWeight.from_float(W, 4, 64, torch.float16)
    for md in (torch.float32, torch.bfloat16):
        pw = PackedWeight.from_float(W, 4, 64, md)
        assert ((pw.dequantize(torch.float32) - W).abs().max() / W.abs().max()) < 0.1
    W = torch.randn(64, 128) * 1e-4  # shallow subnormal fp16 scales (5e-5) pass, as in .to()
    assert ((PackedWeight.from_float(W, 4, 64, torch.float16).dequantize(torch.float32) - W).abs().max()
            / W.abs().max()) < 0.1


def _hqq_4bit(N=4, K=64, g=32):
    """A synthetic hqq 4bit_u8 (W_q, meta): W_q[i] = q[i] << 4 | q[i + R / 2] (hqq/core/bitpack.py)."""
    R = N * K // g
    q = rand_q(N, K, 4)
    qr = q.reshape(R, g).to(torch.int64)
    W_q = ((qr[: R // 2] << 4) | qr[R // 2:]).to(torch.uint8)
    meta = dict(nbits=4, group_size=g, shape=(N, K), axis=1, packing="4bit_u8", scale=torch.rand(R, 1) + 0.1,
                zero=torch.rand(R, 1) * 15)
    return q, W_q, meta


def test_from_hqq_checks_meta_without_hqq():
    q, W_q, meta = _hqq_4bit()
    pw = formats.from_hqq(W_q, meta)
    assert torch.equal(pw.unpack(), q) and torch.equal(pw.scales.flatten(), meta["scale"].flatten())
    with pytest.raises(ValueError, match=r"nbits'\] = 2 does not match.*4bit_u8"):  # was quantkern.pack's q error
        formats.from_hqq(W_q, dict(meta, nbits=2))
    with pytest.raises(ValueError, match=r"meta\['scale'\] must hold .* 8 values"):  # was a raw reshape error
        formats.from_hqq(W_q, dict(meta, scale=meta["scale"][:4]))
    with pytest.raises(ValueError, match=r"meta lacks \['shape'\]"):  # was KeyError: 'shape'
        formats.from_hqq(W_q, {k: v for k, v in meta.items() if k != "shape"})
    # hqq declares nbits a float
    assert torch.equal(formats.from_hqq(W_q, dict(meta, nbits=4.0)).unpack(), q)
    with pytest.raises(ValueError, match="nbits must be 2, 3 or 4, got 4.5"):
        formats.from_hqq(W_q, dict(meta, nbits=4.5))


def test_from_hqq_checks_w_q_dtype_and_mispacked_2bit():
    q, W_q, meta = _hqq_4bit()
    # a wrong dtype was viewed as uint8 first: "shape '[4, 64]' is invalid for input of size ..." named nothing
    with pytest.raises(TypeError, match=r"W_q must be torch.uint8 for packing '4bit_u8', got torch.int32"):
        formats.from_hqq(W_q.to(torch.int32), meta)
    with pytest.raises(TypeError, match=r"got torch.float32 \(a float W_q is hqq's view_as_float"):
        formats.from_hqq(W_q.float(), meta)
    with pytest.raises(TypeError, match=r"view_as_float'\] is True, so W_q must be .* float dtype"):
        formats.from_hqq(W_q, dict(meta, view_as_float=True))
    with pytest.raises(TypeError, match=r"W_q must be torch.int32 for packing '3bit_32', got torch.uint8"):
        formats.from_hqq(W_q, dict(meta, nbits=3, packing="3bit_32"))
    # hqq's 2-bit packer on R = N * K / g = 7 rows broadcasts a short slice into 4 rows: the shape error
    # ("W_q must have shape (2, 64)") hid the cause
    R, g = 7, 64
    qr = rand_q(R, g, 2).to(torch.int64)
    s = R // 4
    W2 = (qr[:s] << 6 | qr[s:2 * s] << 4 | qr[2 * s:3 * s] << 2 | qr[3 * s:]).to(torch.uint8)
    assert W2.shape == (4, 64)
    meta2 = dict(nbits=2, group_size=g, shape=(7, 64), axis=1, packing="2bit_u8", scale=torch.ones(R, 1),
                 zero=torch.zeros(R, 1))
    with pytest.raises(ValueError, match=r"2bit_u8 needs N \* K / group_size = 7 to be a multiple of 4; hqq packed "
                                         r"this weight incorrectly"):
        formats.from_hqq(W2, meta2)
    assert torch.equal(formats.from_hqq(W_q, meta).unpack(), q)  # the good one still converts


def test_from_float_meta_w_and_bad_meta_dtype_errors():
    # a meta W failed in the quantizer: "Tensor.item() cannot be called on meta tensors"
    with pytest.raises(ValueError, match=r"quantkern.PackedWeight.from_float: W \(shape \(4, 64\)\) is on the meta "
                                         r"device"):
        PackedWeight.from_float(torch.empty(4, 64, device="meta"), 4, 64)
    # the reference quantizer's error had no prefix ("meta_dtype must be one of ...")
    for bad in (torch.float64, torch.int32):
        with pytest.raises(TypeError, match=r"^quantkern.PackedWeight.from_float: meta_dtype must be one of"):
            PackedWeight.from_float(torch.randn(4, 64), 4, 64, meta_dtype=bad)
    assert PackedWeight.from_float(torch.randn(4, 64), 4, 64, meta_dtype=torch.bfloat16).meta_dtype == torch.bfloat16


def test_load_packed_errors_name_the_file_and_weight(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from quantkern import load_packed, save_packed
    from quantkern.packed import read_packed_metadata

    p, bad = str(tmp_path / "w.safetensors"), str(tmp_path / "bad.safetensors")
    save_packed({"l0": PackedWeight.from_float(torch.randn(8, 64), 4, 32),
                 "l1": PackedWeight.from_float(torch.randn(8, 100), 3, None)}, p, extra={"b": torch.ones(8)})
    with safe_open(p, "pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["weights"])
    save_file(load_file(p), bad, metadata=dict(meta, weights=json.dumps(dict(header, l1=dict(header["l1"], bits=4)))))
    # the PackedWeight error named neither the file nor which of its weights
    with pytest.raises(ValueError, match=r"load_packed: .*bad\.safetensors: weight 'l1': .*qweight must have shape"):
        load_packed(bad)
    with pytest.raises(IsADirectoryError, match="is a directory"):  # was "No such device (os error 19)"
        load_packed(str(tmp_path))
    with open(bad, "wb") as f:
        f.write(open(p, "rb").read()[:50])
    for fn in (load_packed, read_packed_metadata):  # was a SafetensorError naming no file
        with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file"):
            fn(bad)
    # device="meta" was refused by safe_open; any torch device works now (read on the CPU, then moved)
    w, extra = load_packed(p, device="meta")
    assert w["l1"].device.type == "meta" and extra["b"].device.type == "meta" and w["l1"].shape == (8, 100)
    w, extra = load_packed(p, device=torch.device("cpu"))
    assert w["l0"].device.type == "cpu"


def test_save_packed_tied_weights_and_argument_types(tmp_path):
    from quantkern import load_packed, save_packed

    p = str(tmp_path / "w.safetensors")
    pw = PackedWeight.from_float(torch.randn(8, 64), 4, 32)
    bias = torch.randn(8)
    # one PackedWeight (or extra tensor) under two names: safetensors raised "Some tensors share memory"
    save_packed({"enc": pw, "dec": pw}, p, extra={"enc.bias": bias, "dec.bias": bias})
    w, extra = load_packed(p)
    assert torch.equal(w["dec"].qweight, pw.qweight) and torch.equal(extra["dec.bias"], bias)
    with pytest.raises(TypeError, match="weight names must be str"):  # 1 was saved as, and loaded under, "1"
        save_packed({1: pw}, p)
    with pytest.raises(TypeError, match="extra must map str names to tensors"):  # was an AttributeError
        save_packed({"a": pw}, p, extra={"x": 3})
