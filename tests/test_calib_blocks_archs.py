"""quantize_'s cached block inputs (``quantkern/ptq/_blocks.py``) on tiny random transformers models.

For each architecture two copies are quantized, with ``block_cache=True`` and ``False``: every tensor
of the state_dict must be bit-identical, and ``_quantize_block_lists`` must name the lists the cache
used (empty: the model was rerun from its start for every layer). The architectures are the ones
whose block calls differ in an informative way: rotary position embeddings shared by every layer
(Llama), one sliding-window mask for all layers (Mistral), experts inside the blocks (Qwen2-MoE),
ALiBi (BLOOM), a per-layer-type mask (Gemma2: not a chain as checked today), a shared layer
(ALBERT), an encoder-decoder (BART: one of its two lists), nested stages (Swin), and a position
bias handed from block to block (T5).
"""
import copy
import warnings

import pytest
import torch

from quantkern import QuantizeConfig, quantize_

tf = pytest.importorskip("transformers")
V, H, L, S = 128, 64, 3, 12


def _ids_units(dec: bool = False):
    """Three units on random ids [2, 12]: the first without a mask, the others with a padded row
    given as (f, attention_mask) pairs; ``dec``: encoder-decoder, decoder ids [2, 8]."""
    g = torch.Generator().manual_seed(1)
    units = []
    for u in range(3):
        ids = torch.randint(1, V, (2, S), generator=g)
        att = torch.ones(2, S, dtype=torch.long)
        kw = {"decoder_input_ids": ids[:, :8]} if dec else {}
        if u == 0:
            units.append(lambda m, ids=ids, kw=kw: m(input_ids=ids, **kw))
        else:
            att[1, S - 4:] = 0
            units.append((lambda m, ids=ids, att=att, kw=kw: m(input_ids=ids, attention_mask=att, **kw), att))
    return units


def _pix_units():
    g = torch.Generator().manual_seed(1)
    return [lambda m, x=torch.randn(2, 3, 32, 32, generator=g): m(pixel_values=x) for _ in range(2)]


def _build(name):
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    lm = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**lm, num_key_value_heads=2)), _ids_units(), {}
    if name == "mistral_sliding4":  # every layer sliding: one mask object for all of them
        return tf.MistralForCausalLM(tf.MistralConfig(**lm, num_key_value_heads=2, sliding_window=4)), _ids_units(), {}
    if name == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**lm, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=64, shared_expert_intermediate_size=64)
        return tf.Qwen2MoeForCausalLM(cfg), _ids_units(), {}
    if name == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=H, n_layer=L, n_head=4)), _ids_units(), {}
    if name == "gemma2":
        cfg = tf.Gemma2Config(**lm, num_key_value_heads=2, head_dim=16, sliding_window=4)
        return tf.Gemma2ForCausalLM(cfg), _ids_units(), {}
    if name == "albert":
        cfg = tf.AlbertConfig(vocab_size=V, embedding_size=32, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                              num_attention_heads=4, max_position_embeddings=32)
        return tf.AlbertModel(cfg), _ids_units(), {}
    if name == "bart":
        cfg = tf.BartConfig(vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=32)
        return tf.BartForConditionalGeneration(cfg), _ids_units(dec=True), {}
    if name == "swin":
        cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=2)
        return tf.SwinModel(cfg), _pix_units(), {}
    if name == "t5":
        cfg = tf.T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)
        # (T5's feed-forward reads wo.weight.dtype, which a PackedLinear has not: wo stays float)
        return tf.T5ForConditionalGeneration(cfg), _ids_units(dec=True), {"skip": ["lm_head", "*.wo"]}
    raise ValueError(name)


def _tensors(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


CASES = [
    ("llama", ("model.layers",), "gptq"),
    ("mistral_sliding4", ("model.layers",), "erq"),
    ("qwen2_moe", ("model.layers",), "gptq"),
    ("bloom", ("transformer.h",), "erq"),
    # the sliding / global layers get two different mask objects: each block's own, captured per unit
    # (checked not to follow the hidden states)
    ("gemma2", ("model.layers",), "gptq"),
    # one layer object shared by every depth: no list holds it in a single child
    ("albert", (), "gptq"),
    # an encoder-decoder: both lists, one after the other
    ("bart", ("model.encoder.layers", "model.decoder.layers"), "erq"),
    # the stages (each with its own input_dimensions tuple, captured per unit), over each stage's blocks
    ("swin", ("encoder.layers",), "gptq"),
    # blocks 1.. get the position bias block 0 made, handed on in each block's output
    ("t5", ("encoder.block", "decoder.block"), "erq"),
]


@pytest.mark.parametrize("name,blocks,method", CASES, ids=[c[0] for c in CASES])
def test_block_cache_bit_identical_across_architectures(name, blocks, method):
    base, units, over = _build(name)
    base.eval()
    cfg = dict(method=method, bits=4, group_size=32, **over)
    cfg.update(act_bits=8) if method == "gptq" else cfg.update(erq_refine_iters=5)
    got = []
    for bc in (True, False):
        m = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(m, QuantizeConfig(**cfg, block_cache=bc), calib_fn=units, progress=False)
        got.append((m._quantize_block_lists, _tensors(m)))
    (listed, a), (ref_list, b) = got
    assert ref_list == ()
    assert listed == blocks
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{name}: block_cache=True differs from False in {bad[:5]}"
