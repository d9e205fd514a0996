"""quantkern.nn.expose: quantkern.nn.MultiheadAttention (torch's attention with its projections as
submodules) and transformers' Conv1D -> nn.Linear, and the conversions that use them:
replace_linear, quantize_ / save / load, quantize_modules, fake_quantize_model_."""
import itertools
import warnings

import pytest
import torch
from torch import nn

import quantkern
from quantkern.nn import MultiheadAttention, PackedLinear, QuantLinear, quantize_modules, replace_linear, unfuse_attention
from quantkern.ptq.conv import fake_quantize_model_

E, H, L, S, B = 16, 4, 5, 7, 3


def _inputs(batch_first, unbatched, self_attn, kdim, dtype=torch.float32, g=None):
    def mk(t, f):
        shape = (t, f) if unbatched else ((B, t, f) if batch_first else (t, B, f))
        return torch.randn(shape, dtype=dtype, generator=g)

    q = mk(L, E)
    if self_attn:
        return q, q, q, L
    return q, mk(S, kdim or E), mk(S, kdim or E), S


def _masks(kind_kpm, kind_am, unbatched, s, dtype, g):
    kw = {}
    if kind_kpm == "bool":
        m = torch.rand((s,) if unbatched else (B, s), generator=g) > 0.6
        m[..., 0] = False  # a row with every key masked is NaN in both
        kw["key_padding_mask"] = m
    elif kind_kpm == "float":
        kw["key_padding_mask"] = torch.randn((s,) if unbatched else (B, s), dtype=dtype, generator=g)
    if kind_am == "2d":
        kw["attn_mask"] = torch.randn(L, s, dtype=dtype, generator=g)
    elif kind_am == "3d":
        kw["attn_mask"] = torch.randn((1 if unbatched else B) * H, L, s, dtype=dtype, generator=g)
    elif kind_am == "bool":
        m = torch.rand(L, s, generator=g) > 0.7
        m[:, 0] = False
        kw["attn_mask"] = m
    return kw


CASES = list(itertools.product([None, 12], [True, False], [False, True], [False, True], [False, True], [False, True],
                               [True, False], [None, "bool", "float"], [None, "2d", "3d", "bool"], [True, False]))


@pytest.mark.parametrize("case", range(0, len(CASES), 11))  # a spread-out eleventh of the grid (~280 cases)
def test_matches_torch_bit_for_bit(case):
    kdim, bias, bkv, zero, bf, unb, sa, kpm, am, nw = CASES[case]
    if kpm == "float" and am == "bool" or kpm == "bool" and am in ("2d", "3d"):
        am = None  # torch deprecates mixing bool and float masks
    torch.manual_seed(case)
    g = torch.Generator().manual_seed(case)
    ref = nn.MultiheadAttention(E, H, 0.0, bias, bkv, zero, kdim, kdim, bf).eval()
    ours = MultiheadAttention.from_torch(ref)
    q, k, v, s = _inputs(bf, unb, sa and kdim is None, kdim, g=g)
    kw = _masks(kpm, am, unb, s, torch.float32, g)
    for avg in (True, False):
        a = ref(q, k, v, need_weights=nw, average_attn_weights=avg, **kw)
        b = ours(q, k, v, need_weights=nw, average_attn_weights=avg, **kw)
        assert torch.equal(a[0], b[0])
        assert (a[1] is None and b[1] is None) or torch.equal(a[1], b[1])


@pytest.mark.parametrize("need_weights", [True, False])
def test_causal_hint_and_errors_like_torch(need_weights):
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = MultiheadAttention.from_torch(ref)
    x = torch.randn(B, L, E)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    a = ref(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0]
    b = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        ours(x, x, x, attn_mask=torch.zeros(L, L + 1))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ours(x, x, x, key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="features 16 / 16 / 16"):
        ours(x[..., :8], x, x)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)


def test_bf16_training_and_gradients():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True)
    ours = MultiheadAttention.from_torch(ref)
    x = torch.randn(B, L, E, requires_grad=True)
    a, _ = ref(x, x, x)
    b, _ = ours(x, x, x)
    a.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    b.square().sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
    gq = torch.cat([ours.q_proj.weight.grad, ours.k_proj.weight.grad, ours.v_proj.weight.grad])
    torch.testing.assert_close(gq, ref.in_proj_weight.grad, rtol=1e-5, atol=1e-6)
    # bf16 and dropout in training mode: same shapes, finite
    m16 = MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, dropout=0.5, dtype=torch.bfloat16)).train()
    y, w = m16(*(torch.randn(L, B, E, dtype=torch.bfloat16),) * 3)
    assert y.shape == (L, B, E) and y.dtype == torch.bfloat16 and w.shape == (B, L, L) and torch.isfinite(y).all()


def test_round_trip_and_unfuse():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, bias=True, add_bias_kv=True, kdim=12, vdim=10).eval()
    ref.q_proj_weight.requires_grad_(False)
    ours = MultiheadAttention.from_torch(ref)
    assert not ours.q_proj.weight.requires_grad and ours.k_proj.weight.requires_grad and not ours.training
    back = ours.to_torch()
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(E, H)
            self.b = self.a  # shared
            self.c = nn.MultiheadAttention(E, H)

    m = Two()
    assert unfuse_attention(m, skip=["c"]) == ["a"]
    assert m.a is m.b and isinstance(m.a, MultiheadAttention) and isinstance(m.c, nn.MultiheadAttention)
    with pytest.raises(TypeError, match="itself an nn.MultiheadAttention"):
        unfuse_attention(nn.MultiheadAttention(E, H))


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def test_encoder_fast_paths_step_aside():
    enc = _encoder()
    x = torch.randn(2, 6, 64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():  # torch's fused / nested-tensor paths run here before the swap
        ref, ref_pad = enc(x), enc(x, src_key_padding_mask=pad)
        unfuse_attention(enc)
        out, out_pad = enc(x), enc(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_pad[~pad], ref_pad[~pad], rtol=1e-5, atol=1e-5)


def test_replace_linear_packs_attention_projections():
    enc = _encoder()
    x = torch.randn(2, 6, 64)
    names = replace_linear(enc, 4, 32)
    assert "layers.0.self_attn.q_proj" in names and "layers.1.self_attn.out_proj" in names and len(names) == 12
    assert sum(p.numel() for p in enc.parameters() if p.dim() == 2) == 0  # every weight matrix packed
    # the same model with the dequantized weights, torch's attention: same output
    ref = _encoder()
    with torch.no_grad():
        for i, layer in enumerate(enc.layers):
            att, r = layer.self_attn, ref.layers[i].self_attn
            r.in_proj_weight.copy_(torch.cat([p.packed_weight.dequantize(torch.float32)
                                              for p in (att.q_proj, att.k_proj, att.v_proj)]))
            r.out_proj.weight.copy_(att.out_proj.packed_weight.dequantize(torch.float32))
            for a in ("linear1", "linear2"):
                getattr(ref.layers[i], a).weight.copy_(getattr(layer, a).packed_weight.dequantize(torch.float32))
        torch.testing.assert_close(enc(x), ref(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="itself an nn.MultiheadAttention"):
        replace_linear(nn.MultiheadAttention(64, 4))


def test_quantize_save_load_round_trip(tmp_path):
    enc = _encoder()
    x = torch.randn(2, 6, 64)
    quantkern.quantize_(enc, method="hqq", bits=4, group_size=32, progress=False)
    assert isinstance(enc.layers[0].self_attn.v_proj, PackedLinear)
    with torch.no_grad():
        y = enc(x)
    path = str(tmp_path / "enc.safetensors")
    quantkern.save_quantized(enc, path)
    loaded = quantkern.load_quantized(_encoder, path)
    assert isinstance(loaded.layers[1].self_attn, MultiheadAttention)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_quantize_skip_keeps_torch_attention():
    enc = _encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skip naming the attention module is a match, not a typo
        quantkern.quantize_(enc, method="rtn", bits=4, group_size=32, skip=["layers.0.self_attn"], progress=False)
    assert isinstance(enc.layers[0].self_attn, nn.MultiheadAttention)
    assert isinstance(enc.layers[1].self_attn.k_proj, PackedLinear)
    with torch.no_grad():
        assert torch.isfinite(enc(torch.randn(2, 6, 64))).all()


def test_qat_and_fake_quant_reach_projections():
    enc = _encoder()
    quantize_modules(enc, 4, 8)
    assert isinstance(enc.layers[0].self_attn.q_proj, QuantLinear)
    enc.train()
    enc(torch.randn(2, 6, 64)).square().mean().backward()
    assert enc.layers[0].self_attn.q_proj.weight.grad is not None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.att(x, x, x)[0].mean(1))

    torch.manual_seed(0)
    net = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # out_proj used to see no calibration input (RTN fallback, warned)
        rep = fake_quantize_model_(net, 4, "gptq", 32, calib_data=torch.randn(8, 5, 32), progress=False)
    assert rep["layers"] == ["att.q_proj", "att.k_proj", "att.v_proj", "att.out_proj", "fc"]


def test_compile_fullgraph():
    torch.manual_seed(0)
    m = MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, batch_first=True)).eval()
    x = torch.randn(B, L, E)
    f = torch.compile(lambda t: m(t, t, t, need_weights=False)[0], fullgraph=True)
    torch.testing.assert_close(f(x), m(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def _gpt2():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return tf.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_are_converted_and_round_trip(tmp_path):
    from quantkern.nn import conv1d_to_linear

    ids = torch.randint(0, 128, (2, 10))
    model = _gpt2()
    with torch.no_grad():
        ref = model(ids).logits
        assert len(conv1d_to_linear(model)) == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
        assert isinstance(model.transformer.h[0].attn.c_attn, nn.Linear)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)  # the same function
    model = _gpt2()
    names = replace_linear(model, 4, 32)  # lm_head (tied to the embedding) skipped by default
    assert len(names) == 8 and "transformer.h.1.mlp.c_fc" in names
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()
    model = _gpt2()
    quantkern.quantize_(model, method="gptq", bits=4, group_size=32, progress=False,
                        calib_fn=[lambda m: m(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)))])
    with torch.no_grad():
        y = model(ids).logits
    path = str(tmp_path / "gpt2.safetensors")
    quantkern.save_quantized(model, path)
    loaded = quantkern.load_quantized(_gpt2, path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, y)


@pytest.mark.parametrize("expose_first", [False, True])
def test_gpt2_unpacked_conv1d_layers_load_in_their_saved_layout(tmp_path, expose_first):
    # attn.c_proj is square (64 x 64): a Conv1D kept as it is and one turned into an unpacked Linear
    # (transposed weight) have the same shape, so the checkpoint must say which it holds
    from quantkern.nn import expose_linears

    ids = torch.randint(0, 128, (2, 10))
    model = _gpt2()
    if expose_first:  # every Conv1D becomes a Linear, then attn.c_proj stays unpacked (float)
        expose_linears(model)
    quantkern.quantize_(model, method="rtn", bits=4, group_size=32, skip=["lm_head", "*.attn.c_proj"], progress=False)
    with torch.no_grad():
        y = model(ids).logits
    path = str(tmp_path / "gpt2.safetensors")
    quantkern.save_quantized(model, path)
    loaded = quantkern.load_quantized(_gpt2, path)
    assert type(loaded.transformer.h[0].attn.c_proj).__name__ == ("Linear" if expose_first else "Conv1D")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, y)


def test_empty_batch_and_torch_checkpoints():
    torch.manual_seed(0)
    for kw in ({}, {"kdim": 12, "vdim": 10, "add_bias_kv": True}, {"bias": False}):
        ref = nn.MultiheadAttention(E, H, **kw).eval()
        ours = MultiheadAttention(E, H, **kw).eval()
        sd = ref.state_dict()
        ours.load_state_dict(sd)  # torch's keys (in_proj_weight or q/k/v_proj_weight) split into the projections
        assert list(sd) == list(ref.state_dict())  # the caller's dict is left as it was
        q, k, v = torch.randn(L, B, E), torch.randn(S, B, kw.get("kdim", E)), torch.randn(S, B, kw.get("vdim", E))
        assert torch.equal(ours(q, k, v)[0], ref(q, k, v)[0])
        for nw in (True, False):  # an empty batch: shapes as torch's (a view(B, -1, ...) used to fail)
            e = (q[:, :0], k[:, :0], v[:, :0])
            a, b = ref(*e, need_weights=nw), ours(*e, need_weights=nw)
            assert a[0].shape == b[0].shape and (a[1] is None) == (b[1] is None)
    # inside a model: a torch checkpoint loads into the unfused model, strictly
    enc, fresh = _encoder(), _encoder()
    unfuse_attention(fresh)
    fresh.load_state_dict(enc.state_dict())
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), enc(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"in_proj_weight: torch's checkpoint holds \(96, 32\)"):
        MultiheadAttention(E, H).load_state_dict(nn.MultiheadAttention(32, H).state_dict())


def test_unfuse_moves_hooks_and_leaves_subclasses():
    class P(nn.Module):
        def __init__(self, att):
            super().__init__()
            self.att = att

    calls = []
    p = P(nn.MultiheadAttention(E, H))
    h1 = p.att.register_forward_hook(lambda m, i, o: calls.append(type(m) is MultiheadAttention))
    h2 = p.att.register_forward_pre_hook(lambda m, a, k: calls.append(k.get("need_weights")), with_kwargs=True)
    assert unfuse_attention(p) == ["att"]
    x = torch.randn(L, B, E)
    p.att(x, x, x, need_weights=False)
    assert calls == [False, True]
    h1.remove(), h2.remove()  # the user's handles still work
    p.att(x, x, x)
    assert len(calls) == 2

    class Doubled(nn.MultiheadAttention):  # its own forward: unfusing would change what it computes
        def forward(self, *a, **kw):
            out, w = super().forward(*a, **kw)
            return 2 * out, w

    class Tagged(nn.MultiheadAttention):  # torch's forward, no extra state: the same function
        pass

    p = P(Doubled(E, H))
    p.other = Tagged(E, H)
    with pytest.warns(UserWarning, match=r"left 1 nn.MultiheadAttention module.*att \(Doubled overrides forward\)"):
        assert unfuse_attention(p) == ["other"]
    assert type(p.att) is Doubled and type(p.other) is MultiheadAttention
    with pytest.raises(TypeError, match="overrides forward"):
        MultiheadAttention.from_torch(Doubled(E, H))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unfuse_attention(P(Doubled(E, H)), skip=["att"])  # skipped by name: no warning


def test_skip_reaches_modules_under_a_shared_parent():
    # enc.layers[1] is enc.layers[0]: every module inside has two names, and a skip under either applies
    enc = _encoder()
    enc.layers[1] = enc.layers[0]
    assert unfuse_attention(enc, skip=["layers.1.self_attn"]) == []
    names = replace_linear(enc, 4, 32, skip=["layers.1.linear1"])
    assert names == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
                     "layers.0.self_attn.out_proj", "layers.0.linear2"]  # named_modules order: attention first
    assert type(enc.layers[0].linear1) is nn.Linear and enc.layers[0] is enc.layers[1]


def test_encoder_built_from_converted_layer_and_to_torch_refuses_quant_layers():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    layer.self_attn = MultiheadAttention.from_torch(layer.self_attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: nested tensors off, the attention has no fused bias)
        enc = nn.TransformerEncoder(layer, 2).eval()  # its constructor reads self_attn._qkv_same_embed_dim
    assert not enc.use_nested_tensor
    with torch.no_grad():
        assert enc(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    att = enc.layers[0].self_attn
    quantize_modules(att, 4, 8)
    with pytest.raises(TypeError, match="q_proj is a QuantLinear, not a plain nn.Linear"):
        att.to_torch()  # would silently drop the fake quantization


def test_gpt2_conv1d_hooks_and_frozen_weights_carry_over():
    from quantkern.nn import conv1d_to_linear

    model = _gpt2()
    model.requires_grad_(False)
    seen = []
    handle = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    conv1d_to_linear(model)
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        model(ids)
        handle.remove()
        model(ids)
    assert seen == [(1, 4, 3 * 64)]


def test_shared_layers_save_load_and_skip_every_converter(tmp_path):
    # A layer shared by two parents (enc.layers[1] is enc.layers[0]; an attention registered twice):
    # load_quantized rebuilds it (it looked for the second name's packed weights and failed), and a
    # skip under the second name applies in quantize_modules (it converted the first site) and in
    # fake_quantize_model_ (KeyError for an attention's alias).
    def shared():
        enc = _encoder()
        enc.layers[1] = enc.layers[0]
        return enc

    x = torch.randn(2, 6, 64)
    enc = shared()
    quantkern.quantize_(enc, method="rtn", bits=4, group_size=32, progress=False)
    with torch.no_grad():
        y = enc(x)
    path = str(tmp_path / "shared.safetensors")
    quantkern.save_quantized(enc, path)
    loaded = quantkern.load_quantized(shared, path)
    assert loaded.layers[0] is loaded.layers[1] and isinstance(loaded.layers[1].self_attn.q_proj, PackedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)

    q = quantize_modules(shared(), 4, 8, skip=["layers.1.self_attn.q_proj", "layers.1.linear1"])
    assert type(q.layers[0].self_attn.q_proj) is nn.Linear and type(q.layers[0].linear1) is nn.Linear
    assert isinstance(q.layers[0].self_attn.k_proj, QuantLinear) and isinstance(q.layers[0].linear2, QuantLinear)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(16, 2, batch_first=True)
            self.b = self.a

        def forward(self, t):
            return self.a(t, t, t)[0] + self.b(t, t, t)[0]

    m = Twice().eval()
    fake_quantize_model_(m, 4, "rtn", 16, skip=["b"])
    assert type(m.a) is nn.MultiheadAttention and m.b is m.a


def test_skip_keeping_a_gpt2_conv1d_is_not_called_unmatched():
    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Conv1D stays a Conv1D: the skip matched
        quantkern.quantize_(model, method="rtn", bits=4, group_size=32, skip=["lm_head", "*.attn.c_proj"],
                            progress=False)
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    assert isinstance(model.transformer.h[0].attn.c_attn, PackedLinear)


class _SameForward(nn.Linear):  # inherits nn.Linear.forward: a plain Linear
    pass


class _OwnForward(nn.Linear):  # its own forward, not known to be Linear's math: left alone
    def forward(self, x):
        return super().forward(x) * 2


class _ExtraParam(nn.Linear):  # state of its own: left alone
    def __init__(self, *a):
        super().__init__(*a)
        self.gain = nn.Parameter(torch.ones(1))


def test_plain_linear_subclasses_become_linear():
    from quantkern.nn import plain_linear_subclasses

    torch.manual_seed(0)
    m = nn.Sequential(_SameForward(16, 32), _OwnForward(32, 32), _ExtraParam(32, 8))
    m.append(m[0])  # shared: replaced once, stays shared (16 -> 32 again would not fit: only the object matters)
    w = m[0].weight
    seen = []
    m[0].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    assert plain_linear_subclasses(m) == ["0"]
    assert type(m[0]) is nn.Linear and m[3] is m[0] and m[0].weight is w  # the same Parameter, not a copy
    assert type(m[1]) is _OwnForward and type(m[2]) is _ExtraParam
    m[0](torch.randn(2, 16))
    assert seen == [(2, 32)]  # the hook moved


def test_falcon_linear_is_quantized_and_round_trips(tmp_path):
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    make = lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,  # noqa: E731
                                                         num_attention_heads=4)).eval()
    m = make()
    assert type(m.transformer.h[0].mlp.dense_h_to_4h).__name__ == "FalconLinear"
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    quantkern.quantize_(m, method="rtn", bits=4, group_size=32, progress=False)
    assert sum(isinstance(x, PackedLinear) for x in m.modules()) == 8  # 4 per block (lm_head skipped)
    path = str(tmp_path / "falcon.safetensors")
    quantkern.save_quantized(m, path)
    torch.manual_seed(0)
    m2 = quantkern.load_quantized(make(), path)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)


def test_t5_wo_stays_float():
    # T5 lists `wo` in _keep_in_fp32_modules (its forward reads wo.weight.dtype): packing it broke forward
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                                    d_kv=16)).eval()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for convert in (lambda m: quantkern.quantize_(m, method="rtn", bits=4, group_size=32, progress=False),
                    lambda m: replace_linear(m, bits=4, group_size=32)):
        m = __import__("copy").deepcopy(t5)
        with pytest.warns(UserWarning, match="_keep_in_fp32_modules"):
            convert(m)
        wo = [n for n, x in m.named_modules() if n.endswith(".wo")]
        assert len(wo) == 4 and all(type(m.get_submodule(n)) is nn.Linear for n in wo)
        assert sum(isinstance(x, PackedLinear) for x in m.modules()) == 28
        with torch.no_grad():
            m(input_ids=ids, decoder_input_ids=ids[:, :5])


def test_hook_based_reparametrizations_are_dropped_with_the_layer():
    # prune / weight_norm / spectral_norm pre-hooks moved to the PackedLinear (or the unfused attention)
    # with the other hooks, and crashed every forward there (no weight_orig / weight_g / ... on it)
    from torch.nn.utils import prune, spectral_norm, weight_norm
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    for wrap, raw in ((lambda l: prune.l1_unstructured(l, "weight", 0.3), "weight_orig"), (weight_norm, "weight_v"),
                      (spectral_norm, "weight_orig")):
        def build():
            torch.manual_seed(1)
            m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
            wrap(m[0])
            with torch.no_grad():  # an optimizer step with no forward since: .weight is stale until the next one
                getattr(m[0], raw).add_(torch.randn_like(getattr(m[0], raw)))
            return m
        want = build()(x)  # (a twin: its forward refreshes the weight)
        m = build()
        assert replace_linear(m, 4, 32, skip=None) == ["0", "2"]
        y = m(x)
        assert isinstance(m[0], PackedLinear) and not m[0]._forward_pre_hooks
        assert (y - want).norm() < 0.2 * want.norm()
    mha = nn.MultiheadAttention(E, H)
    prune.random_unstructured(mha, "in_proj_weight", 0.2)
    prune.random_unstructured(mha.out_proj, "weight", 0.2)  # (keeps its type: converted, not refused)
    holder = nn.Module()
    holder.attn = mha
    q = torch.randn(L, B, E)
    want = mha(q, q, q)[0]
    assert unfuse_attention(holder) == ["attn"]
    torch.testing.assert_close(holder.attn(q, q, q)[0], want)


def test_reparam_refresh_keeps_training_and_checks_projections_by_their_names():
    # the weights recomputed before conversion kept requires_grad (a QAT conversion copies the flag:
    # recomputed under no_grad, a pruned layer's QAT weight came out frozen)
    from torch.nn.utils import prune
    m = nn.Sequential(nn.Linear(64, 64))
    prune.l1_unstructured(m[0], "weight", 0.3)
    quantize_modules(m, 4, 8)
    assert isinstance(m[0], QuantLinear) and m[0].weight.requires_grad
    # an attention projection that stays float (skipped by its unfused name, or NaN there) does not
    # refuse the model: the check sees each projection under the name the skip sees
    mha = nn.MultiheadAttention(E, H)
    with torch.no_grad():
        mha.out_proj.weight[0, 0] = float("nan")
    m = nn.ModuleDict({"attn": mha, "fc": nn.Linear(E, E)})
    assert sorted(replace_linear(m, 4, None, skip=("attn.out_proj",))) == ["attn.k_proj", "attn.q_proj", "attn.v_proj", "fc"]
    assert type(m["attn"].out_proj) is nn.Linear
    m = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H)})
    with torch.no_grad():
        m["attn"].in_proj_weight[E, 0] = float("nan")  # k_proj's third
    with pytest.raises(ValueError, match=r"\['attn.k_proj'\] have NaN"):
        replace_linear(m, 4, None, skip=None)


def test_refusals_come_before_expose_and_skip_is_checked():
    # a float64 GPT-2 was refused after its Conv1Ds had become (transposed) Linears: the model no
    # longer loaded its own checkpoint; a bad skip failed inside fnmatch, after those changes too
    model = _gpt2().double()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="float64"):
        replace_linear(model, 4, 32)
    with pytest.raises(TypeError, match="float64"):
        quantkern.quantize_(model, method="rtn", bits=4, group_size=32, progress=False)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    model.load_state_dict(sd)
    # an attention module left float (a subclass with its own forward) is not checked: NaN there is fine
    class Own(nn.MultiheadAttention):
        def forward(self, *a, **k):
            return super().forward(*a, **k)
    m = nn.ModuleDict({"attn": Own(E, H), "fc": nn.Linear(E, E)})
    with torch.no_grad():
        m["attn"].in_proj_weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="overrides forward"):
        assert replace_linear(m, 4, None, skip=None) == ["fc"]
    for fn in (lambda s: replace_linear(_gpt2(), 4, 32, skip=s), lambda s: unfuse_attention(_encoder(), s)):
        for bad in (5, ["h", 1]):
            with pytest.raises(ValueError, match="skip must be None, a name / pattern"):
                fn(bad)


def test_unfuse_keeps_ties_and_refuses_a_parametrized_out_proj():
    from torch.nn.utils import parametrizations
    a, b = nn.MultiheadAttention(E, H), nn.MultiheadAttention(E, H)
    b.in_proj_weight, b.out_proj.weight = a.in_proj_weight, a.out_proj.weight  # tied across the two
    m = nn.ModuleDict({"a": a, "b": b})
    assert unfuse_attention(m) == ["a", "b"]
    assert m["a"].q_proj.weight is m["b"].q_proj.weight and m["a"].out_proj.weight is m["b"].out_proj.weight
    assert m["a"].q_proj.bias is not m["b"].q_proj.bias  # (their biases were never tied)
    c = nn.MultiheadAttention(E, H)
    parametrizations.weight_norm(c.out_proj)  # its state would have become a plain weight in the copy
    holder = nn.ModuleDict({"c": c})
    with pytest.warns(UserWarning, match="out_proj of type Parametrized"):
        assert unfuse_attention(holder) == []
    assert holder["c"] is c


def test_parametrized_gpt2_conv1d_is_named_as_left_float():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w
    model = _gpt2()
    parametrize.register_parametrization(model.transformer.h[0].mlp.c_fc, "weight", Double())
    with pytest.warns(UserWarning, match=r"\(or Conv1D\) subclass layer\(s\) stay float.*c_fc"):
        replace_linear(model, 4, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", ["key_padding_mask", "attn_mask"])
def test_low_precision_float_masks_and_output_layout_like_torch(dtype, mask):
    # the mask enters the product as in torch's baddbmm (one rounding), and the output has torch's strides
    torch.manual_seed(0)
    for bf in (True, False):
        ref = nn.MultiheadAttention(E, H, batch_first=bf, dtype=dtype).eval()
        ours = MultiheadAttention.from_torch(ref)
        q, k, v, s = _inputs(bf, False, False, None, dtype=dtype)
        m = torch.randn((B, s) if mask == "key_padding_mask" else (L, s), dtype=dtype)
        a, b = ref(q, k, v, **{mask: m}), ours(q, k, v, **{mask: m})
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].stride() == b[0].stride()


def test_encoder_layer_trains_like_torch_after_unfuse():
    # the dropout after the attention draws its mask in memory order: the same seed gives the same result
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(E, H, 32, dropout=0.3, batch_first=True).train()
    ours = nn.TransformerEncoderLayer(E, H, 32, dropout=0.3, batch_first=True).train()
    ours.load_state_dict(ref.state_dict())
    unfuse_attention(ours)
    x = torch.randn(B, L, E)
    torch.manual_seed(1)
    a = ref(x)
    torch.manual_seed(1)
    assert torch.equal(a, ours(x))


@pytest.mark.parametrize("kdim", [None, 12])
def test_constructor_initialises_like_torch(kdim):
    for bkv in (False, True):
        torch.manual_seed(3)
        ref = nn.MultiheadAttention(E, H, add_bias_kv=bkv, kdim=kdim, vdim=kdim)
        torch.manual_seed(3)
        ours = MultiheadAttention(E, H, add_bias_kv=bkv, kdim=kdim, vdim=kdim)
        for (n, p), (n2, p2) in zip(ref.state_dict().items(), ours.to_torch().state_dict().items()):
            assert n == n2 and torch.equal(p, p2), n
    # numpy integers work as in torch's constructor
    np = pytest.importorskip("numpy")
    ours = MultiheadAttention(np.int64(E), np.int64(H))
    assert type(ours.embed_dim) is int
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        MultiheadAttention(16.0, 4)


def test_to_torch_with_biases_on_some_projections():
    # torch's module has biases on all four projections or none; the flag came from out_proj alone, so
    # q / k / v biases (which bias correction, float targets and ERQ add) were dropped beside a bias-free
    # out_proj, and a bias-free q_proj beside biased k / v failed in torch.cat. Missing ones are zeros now.
    torch.manual_seed(0)
    x = torch.randn(5, 2, E)
    for biased in (("q_proj", "k_proj", "v_proj"), ("k_proj", "v_proj", "out_proj"), ("out_proj",)):
        att = MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, bias=False))
        for n in biased:
            getattr(att, n).bias = nn.Parameter(torch.randn(E))
        back = att.to_torch()
        torch.testing.assert_close(back(x, x, x)[0], att(x, x, x)[0], rtol=1e-5, atol=1e-6)
        assert back.in_proj_bias.requires_grad == any(n != "out_proj" for n in biased)
        assert back.out_proj.bias.requires_grad == ("out_proj" in biased)


def test_to_torch_keeps_requires_grad_and_unfuse_is_all_or_nothing(monkeypatch):
    ref = nn.MultiheadAttention(E, H)
    ref.out_proj.weight.requires_grad_(False)
    back = MultiheadAttention.from_torch(ref).to_torch()
    assert {n: p.requires_grad for n, p in back.named_parameters()} == \
        {n: p.requires_grad for n, p in ref.named_parameters()}
    model = nn.Sequential(nn.MultiheadAttention(E, H), nn.MultiheadAttention(E, H))
    real, calls = MultiheadAttention.from_torch.__func__, []

    def failing_second(cls, mha, _copies=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(cls, mha, _copies)

    monkeypatch.setattr(MultiheadAttention, "from_torch", classmethod(failing_second))
    with pytest.raises(RuntimeError, match="boom"):
        unfuse_attention(model)
    assert [type(m) for m in model] == [nn.MultiheadAttention] * 2


def test_lazy_layers_and_a_linear_subclass_as_the_model_are_refused_clearly():
    from quantkern.nn import expose_linears

    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 4))
    for convert in (expose_linears, quantize_modules, lambda m: replace_linear(m, 4, 32)):
        with pytest.raises(ValueError, match=r"\['0'\] are lazy modules"):
            convert(model)
        assert type(model[0]) is nn.LazyLinear and type(model[2]) is nn.Linear
    model(torch.randn(2, 3))  # materialised: now it converts
    quantize_modules(model)
    assert type(model[0]) is QuantLinear

    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match="quantize_modules: model is itself a MyLinear"):
        quantize_modules(MyLinear(8, 8))
