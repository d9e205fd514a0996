"""quantize_'s cached block inputs (``quantkern/ptq/_blocks.py``): a layer's calibration pass runs its
block alone on each unit's cached input instead of the model from its start.

Every result must be bit-identical to ``block_cache=False`` (each pass a forward of the whole model);
models that are not a chain of blocks must be recognised and take the rerun-from-start path.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkern import QuantizeConfig, quantize_

from test_calib_groups import CONFIGS, _X, _assert_same, _run


def _tensors(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _both(make, units, **cfg):
    """Quantize two copies of ``make()``, with and without the block cache; returns (cached model, its
    tensors, warnings) after checking the two are bit-identical."""
    out = []
    for bc in (True, False):
        m = make()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            quantize_(m, QuantizeConfig(**{"method": "gptq", "bits": 4, "group_size": 32, **cfg}, block_cache=bc),
                      calib_fn=units, progress=False)
        out.append((m, _tensors(m), [str(w.message) for w in rec]))
    _same(out[0][1], out[1][1])
    assert out[1][0]._quantize_block_lists == ()
    return out[0]


@pytest.mark.parametrize("name", ["gptq", "gptq_a8_static_nofp", "erq_a4"])
def test_cached_blocks_are_bit_identical(name, monkeypatch):
    # nn.Sequential(block, block, odd): the three children are the blocks; GPTQ / ERQ / static
    # activations, with and without the float target and groups
    cfg = CONFIGS[name]
    cached = _run(cfg, True, monkeypatch, block_cache=True)
    _assert_same(cached, _run(cfg, True, monkeypatch))
    # the model itself runs once per unit to check the chain, then once per unit up to block 0
    assert cached[2]["model"] == 2 * len(_X)


class _Blk(nn.Module):
    """A block with a mask keyword, returning a tuple (as transformers' layers did)."""

    def __init__(self, d=32):
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.calls = 0

    def forward(self, x, mask=None, drop=0.0):
        self.calls += 1
        h = self.b(F.gelu(self.a(x))) * (1.0 - drop)
        return (x + (h if mask is None else h * mask[..., None]), h.mean())


class _Net(nn.Module):
    def __init__(self, n=5, d=32, order="chain"):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.blocks, self.out = nn.Linear(16, d), nn.ModuleList(_Blk(d) for _ in range(n)), nn.Linear(d, 8)
        self.order = order
        self.register_buffer("mbuf", torch.zeros(2, 7))

    def forward(self, x, mask=None):
        h = self.inp(x)
        if self.order == "parallel":  # each block reads the same input: not a chain
            return self.out(sum(b(h, mask=mask)[0] for b in self.blocks))
        blocks = list(self.blocks)[::-1] if self.order == "reversed" else self.blocks
        for j, b in enumerate(blocks):
            if self.order == "inplace":  # the block's input changed in place after its call: still fine
                h = b(h, mask=mask)[0]
            elif self.order == "per_block_kwarg":  # another mask object per block, made from the data, not h:
                h = b(h, mask=None if mask is None else mask.clone())[0]  # replayed per unit (a per-layer-type mask)
            elif self.order == "mask_from_h":  # a mask that follows the hidden states: not replayable
                h = b(h, mask=(h[..., 0] > 0).float())[0]
            elif self.order == "scalar_from_h":  # a number that follows the hidden states: not replayable
                h = b(h, mask=mask, drop=float(h.abs().mean()) * 0.1)[0]
            elif self.order == "inplace_between":  # the output changed in place before the next block reads it
                h = b(h, mask=mask)[0]
                h.mul_(0.5)
            elif self.order == "buffer_mask":  # every forward's mask written into one buffer: caught at capture
                if j == 0:
                    self.mbuf.copy_(mask)
                h = b(h, mask=self.mbuf)[0]
            elif self.order == "per_block_scalar":  # a number of its own per block (a drop-path rate): fine
                h = b(h, mask=mask, drop=0.1 * j)[0]
            else:
                h = b(h, mask=mask)[0]
        return self.out(h)


def _units(n=3, masked=True):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 7, 16, generator=g) for _ in range(n)]
    ms = [(torch.rand(2, 7, generator=g) > 0.2).float() for _ in range(n)]
    return [(lambda m, x=x, k=k: m(x, mask=k if masked else None)) for x, k in zip(xs, ms)]


def test_block_passes_and_forward_count():
    units = _units()
    m, _, _ = _both(lambda: _Net(), units)
    assert m._quantize_block_lists == ("blocks",)
    # per unit: the chain check (5 blocks), one pass per group (a, b) of every block, advancing 4
    # blocks, and the whole model once more for `out` (after the blocks: rerun from the start)
    assert sum(b.calls for b in m.blocks) == len(units) * (5 + 2 * 5 + 4 + 5)
    ref = _Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(ref, QuantizeConfig(method="gptq", bits=4, group_size=32, block_cache=False), calib_fn=units,
                  progress=False)
    assert sum(b.calls for b in ref.blocks) == len(units) * (sum(2 * (j + 1) for j in range(5)) + 5)


@pytest.mark.parametrize("order", ["per_block_scalar", "per_block_kwarg"])
def test_per_block_arguments_are_replayed(order):
    m, _, _ = _both(lambda: _Net(4, order=order), _units(2))
    assert m._quantize_block_lists == ("blocks",)


@pytest.mark.parametrize("order", ["parallel", "reversed", "mask_from_h", "scalar_from_h", "inplace_between",
                                   "buffer_mask"])
def test_not_a_chain_reruns_the_model(order):
    m, _, _ = _both(lambda: _Net(3, order=order), _units(2))
    assert m._quantize_block_lists == ()


class _InPlace(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        x.mul_(0.5)  # changes its input: a replay from the cache would see the changed tensor
        return x + self.lin(x)


def test_block_changing_its_input_in_place_is_not_cached():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), _InPlace(), _InPlace(), nn.Linear(32, 8))
    g = torch.Generator().manual_seed(2)
    units = [lambda m, x=x: m(x) for x in torch.randn(2, 4, 16, generator=g)]
    m, _, _ = _both(make, units)
    # the only other chain, the Sequential's children, includes the in-place blocks
    assert m._quantize_block_lists == ()


@pytest.mark.parametrize("cfg", [dict(act_bits=8), dict(method="erq", act_bits=4, erq_refine_iters=5)])
def test_modes_hooks_and_masks_replayed(cfg):
    # units under inference_mode, with grad on, and a user pre-hook that rewrites a block's input:
    # each replay runs as the model's own forward did
    def make():
        net = _Net(4)
        net.blocks[1].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        return net
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 5, 16, generator=g) for _ in range(3)]

    def inf(m, x=xs[0]):
        with torch.inference_mode():
            return m(x)
    units = [inf, lambda m, x=xs[1]: m(x), (lambda m, x=xs[2]: m(x), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))]
    m, _, _ = _both(make, units, **cfg)  # (an inference-mode unit first: statistics stay normal tensors)
    assert m._quantize_block_lists == ("blocks",)


def _hf(name):
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    V, small = 128, dict(num_hidden_layers=2, num_attention_heads=4)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                                  num_key_value_heads=2, **small)).eval()
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    if name == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=64, intermediate_size=96, **small)).eval()
    raise ValueError(name)


@pytest.mark.parametrize("name,blocks", [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                         ("bert", "encoder.layer"), ("encoder", "layers")])
def test_transformers_are_chains(name, blocks):
    g = torch.Generator().manual_seed(4)
    if name == "encoder":
        def make():
            torch.manual_seed(0)
            layer = nn.TransformerEncoderLayer(64, 4, 96, batch_first=True, dropout=0.0)
            return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        xs = [torch.randn(2, 9, 64, generator=g) for _ in range(2)]
        pad = torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
        units = [lambda m, x=x: m(x, src_key_padding_mask=pad) for x in xs]
    else:
        base = _hf(name)
        make = lambda: copy.deepcopy(base)  # noqa: E731
        ids = [torch.randint(1, 128, (2, 12), generator=g) for _ in range(2)]
        att = torch.ones(2, 12, dtype=torch.long)
        att[1, 8:] = 0
        units = [(lambda m, x=x: m(input_ids=x, attention_mask=att), att) for x in ids]
    kw = dict(skip=None) if name == "encoder" else {}
    m, _, msgs = _both(make, units, act_bits=8, **kw)
    assert m._quantize_block_lists == (blocks,)
    assert not any("rerun the model" in w for w in msgs)


def test_explicit_kv_cache_reruns_the_model_with_a_warning():
    # a unit that asks for a KV cache passes a stateful object to every block: not replayable.
    # Without use_cache in the call, quantize_ turns the model's config.use_cache off meanwhile.
    base = _hf("llama")
    assert base.config.use_cache
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    m, _, msgs = _both(lambda: copy.deepcopy(base), [lambda m: m(input_ids=ids, use_cache=True)])
    assert m._quantize_block_lists == () and m.config.use_cache
    assert any("use_cache=False" in w and "Cache" in w for w in msgs)
    m2, t2, _ = _both(lambda: copy.deepcopy(base), [lambda m: m(input_ids=ids)])
    assert m2._quantize_block_lists == ("model.layers",) and m2.config.use_cache
    _same(_tensors(m), t2)  # the KV cache object changes nothing in the numbers


class _ConvBlock(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3, project 1x1; a drop-path rate per block."""

    def __init__(self, c=16):
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.bn = nn.BatchNorm2d(2 * c)
        self.project = nn.Conv2d(2 * c, c, 1)

    def forward(self, x, drop_rate=None):
        h = self.project(F.relu6(self.bn(self.dw(F.relu6(self.expand(x))))))
        return x + h * (1.0 - (drop_rate or 0.0))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(_ConvBlock() for _ in range(3))
        self.fc = nn.Linear(16, 10)
        for b in self.blocks:  # non-trivial BatchNorm statistics
            b.bn.running_mean.uniform_(-0.1, 0.1)
            b.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        for j, b in enumerate(self.blocks):
            x = b(x, drop_rate=0.05 * j)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("kw", [dict(method="gptq"), dict(method="gptq", depthwise_method="hqq"),
                                dict(method="erq"), dict(method="rtn", bias_correction=True),
                                dict(method="adaround", adaround_iters=5),
                                dict(method="gptq", depthwise_method="hqq", fp_target=True),
                                dict(method="rtn", fp_target=True, bias_correction=True)])
def test_conv_fake_quant_blocks_bit_identical(kw):
    assert _conv_both(_CNN, 12, 6, **kw) == (("blocks",), ())


class _ResConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + F.relu(self.conv(x))


class _HeadOutside(nn.Module):
    """A conv registered in the last block but called by the model after the list."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_ResConv(), _ResConv(), _ResConv())
        self.blocks[2].head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.blocks[2].head(self.blocks(self.stem(x))).mean((2, 3)))


def test_layer_called_outside_its_block_gets_no_cache():
    # the replay of block 2 never reached its head: that layer got RTN with a "saw no calibration input"
    # warning; the probe now sees the layer run outside its block's call and keeps the model's reruns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _conv_both(_HeadOutside, 8, 1, method="gptq") == ((), ())


def _conv_both(make, n, seed, **kw):
    """fake_quantize_model_ on two copies, with and without the block cache: checks that the weights are
    bit-identical; returns the two reports' block lists."""
    from quantkern.ptq.conv import fake_quantize_model_

    X = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    out = []
    for bc in (True, False):
        m = make().eval()
        r = fake_quantize_model_(m, 4, group_size=16, calib_data=X, batch_size=4, progress=False, block_cache=bc,
                                 **kw)
        out.append((r["block_lists"], _tensors(m)))
    _same(out[0][1], out[1][1])
    return out[0][0], out[1][0]


def test_no_cache_when_it_would_not_fit(monkeypatch):
    # the cached inputs (units x the first unit's block input, twice with fp_target) must fit in half the free
    # memory; otherwise the passes rerun the model, with a warning, and give the same model
    import quantkern.ptq._blocks as B

    units = _units(3)
    need = 3 * 2 * (2 * 7 * 32 * 4 + 2 * 7 * 4)  # units x (fp + quantized) x (x [2, 7, 32] + mask [2, 7]) fp32
    monkeypatch.setattr(B, "available_bytes", lambda device: 2 * need - 1)
    m, _, msgs = _both(lambda: _Net(3), units)
    assert m._quantize_block_lists == ()
    assert any("more than half" in w and "GiB free" in w for w in msgs), msgs
    monkeypatch.setattr(B, "available_bytes", lambda device: 2 * need)
    m, _, msgs = _both(lambda: _Net(3), units)
    assert m._quantize_block_lists == ("blocks",) and not any("more than half" in w for w in msgs)
    monkeypatch.setattr(B, "available_bytes", lambda device: 1)
    from quantkern.ptq.conv import fake_quantize_model_

    X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with pytest.warns(UserWarning, match="more than half"):
        r = fake_quantize_model_(_CNN().eval(), 4, "gptq", 16, calib_data=X, batch_size=4, progress=False)
    assert r["block_lists"] == ()


class _PoolBlock(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x, n):  # n: this block's token count, which halves from block to block
        y = x + self.a(x) / n
        return F.avg_pool1d(y.transpose(1, 2), 2, ceil_mode=True).transpose(1, 2)


class _Pool(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.layers, self.out = nn.Linear(16, 32), nn.ModuleList(_PoolBlock() for _ in range(3)), nn.Linear(32, 8)

    def forward(self, x):
        h = self.inp(x)
        for b in self.layers:
            h = b(h, h.shape[1])
        return self.out(h.mean(1))


def test_per_block_values_that_depend_on_the_data_are_not_replayed():
    # per-block token counts differ between units of 8 and 16 tokens: the first unit's cannot be replayed
    g = torch.Generator().manual_seed(8)
    units = [lambda m, x=torch.randn(2, t, 16, generator=g): m(x) for t in (8, 16)]
    m, _, _ = _both(_Pool, units)
    assert m._quantize_block_lists == ()
    same_len = [lambda m, x=torch.randn(2, 8, 16, generator=g): m(x) for _ in range(2)]
    m, _, _ = _both(_Pool, same_len)  # the same counts in every unit: replayed
    assert m._quantize_block_lists == ("layers",)


class _CNNAgain(_CNN):
    def forward(self, x):  # the last block runs once more after the list (weight sharing)
        x = self.stem(x)
        for j, b in enumerate(self.blocks):
            x = b(x, drop_rate=0.05 * j)
        x = self.blocks[2](x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("kw", [dict(method="gptq"), dict(method="rtn", bias_correction=True)])
def test_conv_layer_called_again_after_the_blocks(kw):
    # its statistics cover every call, some outside its block: that layer reruns the model
    assert _conv_both(_CNNAgain, 8, 9, **kw)[0] == ("blocks",)


class _DictBlk(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x, state):
        state["depth"] += 1  # a dict every block updates: a replay would count on from the last unit's
        return x + self.a(x) * state["depth"]


class _DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_DictBlk() for _ in range(3))

    def forward(self, x):
        state = {"depth": 0}
        for b in self.blocks:
            x = b(x, state)
        return x


def test_argument_updated_by_the_blocks_is_not_replayed():
    g = torch.Generator().manual_seed(10)
    m, _, _ = _both(_DictNet, [lambda m, x=torch.randn(2, 5, 32, generator=g): m(x) for _ in range(2)], skip=None)
    assert m._quantize_block_lists == ()
