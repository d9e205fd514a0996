"""The LLM user's journey, end to end, on tiny randomly initialised transformers models (no downloads).

quantize_ (every method, calibration as token ids or dicts with an attention mask), greedy generate()
with and without the KV cache and with a left-padded batch, save_quantized -> load_quantized (bit for
bit, tied embeddings, a model of another configuration refused), dtype casts after quantization,
torch.compile without recompiles, LoRA-style training on a packed base, and the other architectures
(Qwen2 biases, GPT-2 Conv1D, OPT projections, BERT, ViT); tied embeddings (stored once, an untied
checkpoint refused by a tied model, transformers' tie_weights() after packing a tied lm_head).
"""
import copy
import os
import warnings

import pytest
import torch
from torch import nn

tf = pytest.importorskip("transformers")

import quantkern  # noqa: E402, F401  (loads the ops)
from quantkern import QuantizeConfig, load_quantized, quantize_, save_quantized  # noqa: E402
from quantkern.nn import PackedLinear  # noqa: E402

V = 256


@pytest.fixture(autouse=True)
def _quiet():
    tf.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices
        yield


def llama(tie=False, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    cfg.update(kw)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
    model.generation_config.pad_token_id = 0
    return model


def batches(n=3, T=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (2, T), generator=g) for _ in range(n)]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def quantized(method="rtn", bits=4, group_size=32, model=None, **kw):
    model = model if model is not None else llama()
    units = [lambda m, b=b: m(b) for b in batches()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-tokens warning of GPTQ / ERQ on this tiny data set
        quantize_(model, QuantizeConfig(method=method, bits=bits, group_size=group_size, **kw),
                  calib_fn=units if method in ("gptq", "erq") else None, progress=False)
    return model


IDS = torch.randint(1, V, (2, 24), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- quantize_ + generate
@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "erq"])
def test_every_method_close_to_float_and_ordered_by_bits(method):
    base = llama()
    with torch.no_grad():
        ref = base(IDS).logits
    errs = {}
    for bits in (4, 2):
        m = quantized(method, bits, model=copy.deepcopy(base))
        assert sum(isinstance(x, PackedLinear) for x in m.modules()) == 14
        assert type(m.lm_head) is nn.Linear  # the default skip
        with torch.no_grad():
            errs[bits] = rel(m(IDS).logits, ref)
    # measured at g32: W4 0.10-0.13, W2 0.40-0.70 (random init: Gaussian weights, no outliers)
    assert errs[4] < 0.2 and errs[4] < errs[2] < 1.0, errs


def test_calibration_dicts_with_attention_mask():
    base = llama()
    with torch.no_grad():
        ref = base(IDS).logits
    dicts = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches()]
    m = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, QuantizeConfig(method="gptq", bits=4, group_size=32),
                  calib_fn=[lambda mm, d=d: mm(**d) for d in dicts], progress=False)
    assert all(seen == 2 * 48 * 3 for _, _, seen in m._quantize_report)
    with torch.no_grad():
        assert rel(m(IDS).logits, ref) < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_cache_padding_and_incremental_decode(dtype):
    m = quantized("rtn").to(dtype)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, V, (3, 10), generator=g)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, :6] = 0
    ids = ids.masked_fill(am == 0, 0)
    a = m.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, use_cache=True)
    b = m.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    for i in range(3):  # the left-padded batch decodes each row as it decodes alone
        alone = m.generate(ids[i:i + 1, int((am[i] == 0).sum()):], max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, -6:], a[i, -6:])
    with torch.no_grad():  # cached incremental logits agree with a full forward
        full = m(ids, attention_mask=am).logits
        out = m(ids[:, :7], attention_mask=am[:, :7], use_cache=True)
        step = m(ids[:, 7:], attention_mask=am, past_key_values=out.past_key_values, use_cache=True).logits
    assert (step.float() - full[:, 7:].float()).abs().max() < (1e-5 if dtype == torch.float32 else 5e-2)


# ---------------------------------------------------------------- dtypes
def test_casts_before_and_after_quantization_keep_the_metadata():
    base = llama()
    with torch.no_grad():
        ref = base(IDS).logits
    m = quantized("rtn", model=copy.deepcopy(base))
    with torch.no_grad():
        out = m(IDS).logits
    for cast in (lambda x: x.to(torch.bfloat16), lambda x: x.half(), lambda x: x.to("cpu", torch.bfloat16)):
        c = cast(copy.deepcopy(m))
        assert {b.dtype for n, b in c.named_buffers() if n.endswith((".scales", ".zeros"))} == {torch.float16}
        with torch.no_grad():
            assert abs(rel(c(IDS).logits, ref) - rel(out, ref)) < 0.02
    # quantizing a bf16 / fp16 model: same quality as the fp32 one
    for dt in (torch.bfloat16, torch.float16):
        q = quantized("gptq", model=copy.deepcopy(base).to(dt))
        with torch.no_grad():
            o = q(IDS).logits
        assert o.dtype == dt and rel(o, ref) < 0.2
    # float64 is refused clearly: before quantization by quantize_, after it by the packed matmul
    with pytest.raises(TypeError, match="float32 / float16 / bfloat16"):
        quantize_(copy.deepcopy(base).double(), method="rtn", progress=False)
    lay = m.model.layers[0].mlp.up_proj
    with pytest.raises(TypeError, match="x must have dtype"):
        lay(torch.randn(2, lay.in_features, dtype=torch.float64))


def test_meta_and_state_dict():
    m = quantized("rtn")
    assert len(list(m.named_parameters())) == 7  # embeddings, norms, lm_head: the packed weights are buffers
    sd = m.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    mm = copy.deepcopy(m).to("meta")
    with torch.no_grad():  # the fake kernel gives shapes on the meta device
        assert mm(IDS.to("meta")).logits.shape == (2, 24, V)
    fresh = quantized("rtn", bits=4, model=llama(seed=3))
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, m(IDS).logits)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("tie", [False, True])
def test_save_load_bit_identical(tmp_path, tie):
    m = quantized("gptq", 3, model=llama(tie=tie))
    p = str(tmp_path / "m.safetensors")
    save_quantized(m, p)
    float_bytes = sum(v.numel() * v.element_size() for v in llama(tie=tie).state_dict().values())
    assert os.path.getsize(p) < 0.35 * float_bytes  # measured 0.29 (embedding and lm_head stay fp32)
    m2 = load_quantized(lambda: llama(tie=tie, seed=9), p)
    assert (m2.lm_head.weight is m2.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.equal(m2(IDS).logits, m(IDS).logits)
    assert torch.equal(m2.generate(IDS[:1, :6], max_new_tokens=5, do_sample=False),
                       m.generate(IDS[:1, :6], max_new_tokens=5, do_sample=False))


def test_load_into_another_config_is_refused(tmp_path):
    p = str(tmp_path / "m.safetensors")
    save_quantized(quantized("rtn"), p)
    with pytest.raises(ValueError, match="in the model but"):
        load_quantized(lambda: llama(num_key_value_heads=4), p)
    with pytest.raises(ValueError, match="no such module"):
        load_quantized(lambda: llama(num_hidden_layers=1), p)
    with pytest.raises(ValueError, match="missing"):
        load_quantized(lambda: llama(num_hidden_layers=3), p)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_quantized(lambda: llama(vocab_size=2 * V), p)


def test_untied_checkpoint_into_tied_model_is_refused(tmp_path):
    m = quantized("rtn", model=llama(tie=False))
    p = str(tmp_path / "m.safetensors")
    save_quantized(m, p)
    with pytest.raises(ValueError):
        load_quantized(lambda: llama(tie=True), p)


def test_tied_embedding_stored_once(tmp_path):
    from safetensors import safe_open

    p = str(tmp_path / "m.safetensors")
    save_quantized(quantized("rtn", model=llama(tie=True)), p)
    with safe_open(p, "pt") as f:
        assert not {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())


def test_tie_weights_after_packing_a_tied_lm_head(tmp_path):
    m = quantized("rtn", model=llama(tie=True), skip=None)
    assert isinstance(m.lm_head, PackedLinear)
    m.tie_weights()
    p = str(tmp_path / "m.safetensors")
    save_quantized(m, p)
    m2 = load_quantized(lambda: llama(tie=True), p)
    with torch.no_grad():
        assert torch.equal(m2(IDS).logits, m(IDS).logits)


# ---------------------------------------------------------------- torch.compile
def test_compile_same_outputs_no_recompiles():
    import torch._dynamo
    from torch._dynamo.utils import counters

    m = quantized("hqq", 3)
    with torch.no_grad():
        ref = m(IDS).logits
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(m, backend="aot_eager")  # the graph capture and the fake kernel; inductor costs ~10 s more
    with torch.no_grad():
        outs = [cm(IDS).logits, cm(IDS.flip(1)).logits, cm(IDS).logits]
    assert torch.equal(outs[0], ref) and torch.equal(outs[2], ref)
    assert counters["frames"]["total"] == 1 and not counters["graph_break"]
    torch._dynamo.reset()


# ---------------------------------------------------------------- LoRA on a packed base
class LoRA(nn.Module):
    def __init__(self, base, r=4):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features) * 0.02)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + ((x.float() @ self.A.T) @ self.B.T).to(x.dtype) * 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_on_packed_base_trains(dtype):
    m = quantized("rtn").to(dtype)
    m.requires_grad_(False)
    for layer in m.model.layers:
        layer.self_attn.q_proj = LoRA(layer.self_attn.q_proj)
        layer.mlp.down_proj = LoRA(layer.mlp.down_proj)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == 8
    opt = torch.optim.AdamW(params, lr=1e-2)
    data = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(3))
    m.train()
    losses = []
    for _ in range(6):
        loss = m(data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the first layer's adapter gets its gradient back through every later packed layer's backward
    a = m.model.layers[0].self_attn.q_proj.A.grad
    assert torch.isfinite(a).all() and a.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.05, losses


def test_packed_backward_matches_dequantized_linear():
    torch.manual_seed(0)
    pl = PackedLinear.from_linear(nn.Linear(96, 40), bits=3, group_size=32)
    W = pl.dequantize(torch.float32).double()
    x = torch.randn(5, 96, requires_grad=True)
    y = pl(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(x.grad.double(), gy.double() @ W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pl.bias.grad, gy.sum(0))
    # gradcheck through a float32 cast (float64 x is refused by the kernel)
    xd = torch.randn(2, 96, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pl(t.float()).double(), (xd,), eps=1e-2, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- other architectures
def _arch(name):
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=4)
    if name == "qwen2":  # q / k / v biases, tied embeddings
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=V, hidden_size=128, intermediate_size=352,
                                                  num_key_value_heads=2, tie_word_embeddings=True, **small))
    if name == "gpt2":  # Conv1D projections, tied lm_head
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=128, n_layer=2, n_head=4, n_positions=64))
    if name == "opt":  # project_in / project_out
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=128, ffn_dim=256, word_embed_proj_dim=64,
                                              max_position_embeddings=64, **small))
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, hidden_size=128, intermediate_size=256,
                                                              num_labels=3, **small))
    return tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, **small))


@pytest.mark.parametrize("name,n_packed", [("qwen2", 14), ("gpt2", 8), ("opt", 14), ("bert", 13), ("vit", 13)])
def test_other_architectures_roundtrip(tmp_path, name, n_packed):
    base = _arch(name).eval()
    inp = ({"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))} if name == "vit"
           else {"input_ids": IDS})

    def out(m):
        with torch.no_grad():
            o = m(**inp)
        return o.last_hidden_state if name == "vit" else o.logits

    ref = out(base)
    m = copy.deepcopy(base)
    quantize_(m, QuantizeConfig(method="rtn", bits=4, group_size=32), progress=False)
    assert sum(isinstance(x, PackedLinear) for x in m.modules()) == n_packed
    o = out(m)
    assert rel(o, ref) < 0.2
    p = str(tmp_path / "m.safetensors")
    save_quantized(m, p)
    m2 = load_quantized(lambda: _arch(name).eval(), p)
    assert torch.equal(out(m2), o)
    if name in ("qwen2", "gpt2", "opt"):
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(m2.generate(IDS[:1, :5], **kw), m.generate(IDS[:1, :5], **kw))
        assert torch.equal(m.generate(IDS[:1, :5], use_cache=False, **kw), m.generate(IDS[:1, :5], **kw))
