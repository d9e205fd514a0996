"""``quantize_`` end to end: calibration with cached block inputs against rerunning the model from its start.

``python -m benchmarks.bench_quantize [--depths 4,8,16] [--method gptq] [--threads 2]``
``python -m benchmarks.bench_quantize --effnet [--crops 32]``  (``fake_quantize_model_`` on EfficientNet-Lite0)

A randomly initialised Llama-style causal LM (transformers config, no download; without transformers,
a pure-torch stack of the same layer shapes without rotary embeddings) of each depth is
quantized twice with the same calibration batches: ``block_cache=True`` (a layer's calibration pass
runs its decoder block alone on every unit's cached input) and ``block_cache=False`` (each pass runs
the model from the embedding up to the layer, so the forwards grow with the square of the depth).
Reports seconds (median of ``--reps``), the speed-up, and whether the two packed models are
bit-identical (they must be). ``--effnet``: the same comparison for ``fake_quantize_model_`` W4 g64
on EfficientNet-Lite0 (the demo's model and calibration crops; needs its PyPI packages, see
``scripts/demo.sh``) with GPTQ, ERQ, GPTQ + HQQ depthwise and RTN + bias correction.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

try:
    from . import _harness as H
except ImportError:  # run as a script
    import _harness as H


class _Block(nn.Module):
    """Pre-norm attention + gated MLP (a Llama block without rotary embeddings), for machines without
    transformers."""

    def __init__(self, d: int, ff: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), nn.Linear(ff, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        h = self.n1(x)
        sh = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(sh(self.q(h)), sh(self.k(h)), sh(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class _TorchLM(nn.Module):
    def __init__(self, depth: int, d: int, ff: int, heads: int, vocab: int = 512):
        super().__init__()
        self.embed, self.layers = nn.Embedding(vocab, d), nn.ModuleList(_Block(d, ff, heads) for _ in range(depth))
        self.norm, self.lm_head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for b in self.layers:
            x = b(x)
        return self.lm_head(self.norm(x))


def _ffn(hidden: int) -> int:
    """The intermediate size of :func:`_llama`'s MLP (about 2.75x hidden, a multiple of 32)."""
    return hidden * 11 // 4 // 32 * 32


def _heads(hidden: int) -> tuple[int, int]:
    """:func:`_llama`'s attention heads and key / value heads (head size 64, two query heads per kv head)."""
    return max(hidden // 64, 1), max(hidden // 128, 1)


def _llama(depth: int, hidden: int, seed: int = 0):
    """transformers' LlamaForCausalLM when installed, else :class:`_TorchLM` (same layer shapes)."""
    torch.manual_seed(seed)
    ff = _ffn(hidden)
    heads, kv_heads = _heads(hidden)
    try:
        import transformers as tf
    except ImportError:
        return _TorchLM(depth, hidden, ff, heads).eval()
    tf.logging.set_verbosity_error()
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ff,
                         num_hidden_layers=depth, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=1024)
    return tf.LlamaForCausalLM(cfg).eval()


def _quantize(model, units, method: str, bits: int, group: int, cached: bool):
    from quantkern import QuantizeConfig, quantize_

    t = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-tokens warning on small calibration sets
        # strict_group: a row labelled g{group} must not hide layers that fell back to another group size
        quantize_(model, QuantizeConfig(method=method, bits=bits, group_size=group, block_cache=cached,
                                        strict_group=True),
                  calib_fn=units, progress=False)
    return time.perf_counter() - t


EFFNET_ROWS = {"gptq": dict(method="gptq"), "erq": dict(method="erq"),
               "gptq + hqq depthwise": dict(method="gptq", depthwise_method="hqq"),
               "rtn + bias correction": dict(method="rtn", bias_correction=True)}


def _effnet(a, out) -> int:
    try:
        from quantkern.demo import _crops, _images
        from quantkern.ptq.models import load_efficientnet_lite0
        base = load_efficientnet_lite0()
    except ImportError as e:
        print(f"# bench_quantize --effnet: EfficientNet-Lite0 is not installed ({e}); see scripts/demo.sh", file=out)
        return 0
    from quantkern.ptq.conv import fake_quantize_model_

    n = a.crops or (4 if a.quick else 32)
    Xc = _crops(_images()[0], n, 0, jitter=True)
    reps = a.reps or 1
    print(f"# fake_quantize_model_ W4 g64 on EfficientNet-Lite0, {n} calibration crops (the demo's), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {reps}", file=out)
    print("\n| method | cached blocks s | rerun from start s | speed-up | bit-identical |\n|---|--:|--:|--:|---|", file=out)
    rows = EFFNET_ROWS if not a.quick else {"gptq": EFFNET_ROWS["gptq"]}
    for label, kw in rows.items():
        res = {}
        for cached in (True, False):
            ts = []
            for _ in range(a.warmup):  # untimed runs
                fake_quantize_model_(copy.deepcopy(base), 4, group_size=64, calib_data=Xc, progress=False,
                                     block_cache=cached, **kw)
            for _ in range(reps):
                m = copy.deepcopy(base)
                t = time.perf_counter()
                fake_quantize_model_(m, 4, group_size=64, calib_data=Xc, progress=False, block_cache=cached, **kw)
                ts.append(time.perf_counter() - t)
            res[cached] = (statistics.median(ts), m.state_dict())
        same = all(torch.equal(v, res[False][1][k]) for k, v in res[True][1].items())
        print(f"| {label} | {res[True][0]:.1f} | {res[False][0]:.1f} | {res[False][0] / res[True][0]:.2f}x | "
              f"{'yes' if same else 'NO'} |", file=out)
        if not same:
            return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(ap, threads=2, warmup=0, writes_files=False, reps_help="timed runs per row (default 1)",
                      warmup_help="untimed quantize_ runs per row before the timed ones (default 0)")
    ap.add_argument("--depths", type=H.comma_list(H.positive_int), default=None, help="decoder layers (default 4,8,16; 2,4 with --quick)")
    ap.add_argument("--hidden", type=H.positive_int, default=None, help="hidden size (default 256; 128 with --quick)")
    ap.add_argument("--method", choices=["gptq", "erq"], default=None, help="default gptq")
    ap.add_argument("--bits", type=H.one_of((2, 3, 4)), default=None, help="default 4")
    ap.add_argument("--group", type=H.positive_int, default=None, help="default 64 (32 with --quick)")
    ap.add_argument("--batches", type=H.positive_int, default=None, help="calibration units (default 4)")
    ap.add_argument("--tokens", type=H.positive_int, default=None, help="tokens per unit, 2 sequences (default 256)")
    ap.add_argument("--effnet", action="store_true", help="fake_quantize_model_ on EfficientNet-Lite0 instead")
    ap.add_argument("--crops", type=H.positive_int, default=None, help="--effnet calibration crops (default 32)")
    a = ap.parse_args(argv)
    llm_only = [f"--{k}" for k in ("method", "bits", "group", "batches", "depths", "hidden", "tokens")
                if getattr(a, k) is not None]
    if a.effnet and llm_only:  # (the EfficientNet rows are fixed: W4 g64, the methods of EFFNET_ROWS)
        ap.error(f"{', '.join(llm_only)}: not with --effnet (its rows are fixed: W4 g64, {', '.join(EFFNET_ROWS)})")
    if not a.effnet and a.crops is not None:
        ap.error("--crops: only with --effnet")
    # (--quick's MLP has 352 inputs: g32, so that every layer has the group size the table names)
    a.method, a.bits, a.batches = a.method or "gptq", a.bits or 4, a.batches or 4
    a.group = a.group or (32 if a.quick else 64)
    # (checked here: these failed only after the models were built, inside quantize_ / the model's forward)
    hidden = a.hidden or (128 if a.quick else 256)
    ff = _ffn(hidden)
    if not a.effnet and (a.group % 32 or hidden % a.group or ff % a.group):
        ap.error(f"--group must be a multiple of 32 (quantize_'s packed groups) that divides the hidden size {hidden} "
                 f"and the intermediate size {ff}, got {a.group}")
    heads, kv_heads = _heads(hidden)
    if not a.effnet and (hidden % heads or heads % kv_heads or (hidden // heads) % 2):
        # (transformers refused such a model, or attention failed, after the run had started)
        ap.error(f"--hidden {hidden}: the model has hidden // 64 = {heads} attention heads and hidden // 128 = "
                 f"{kv_heads} key / value heads, which must divide it and each other with an even head size "
                 f"(e.g. a multiple of 128)")
    if a.tokens is not None and a.tokens < 2:
        ap.error(f"--tokens must be >= 2 (two sequences of tokens // 2 each), got {a.tokens}")
    dev = H.apply_common_args(a)
    out = H.table_stream(a)
    H.note_no_files(a, "bench_quantize", out)
    if a.effnet:
        if dev.type != "cpu":
            ap.error("--effnet runs on the CPU (the demo's model): --device cpu")
        return _effnet(a, out)
    depths = a.depths or ([2, 4] if a.quick else [4, 8, 16])
    T = (a.tokens or (64 if a.quick else 256)) // 2
    reps = a.reps or 1
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 512, (2, T), generator=g).to(dev) for _ in range(a.batches)]
    units = [lambda m, b=b: m(input_ids=b) for b in batches]
    kind = type(_llama(1, 64)).__name__
    print(f"# quantize_ {a.method} W{a.bits} g{a.group}, {kind} hidden {hidden}, {a.batches} units of 2x{T} "
          f"tokens, {torch.get_num_threads()} threads, device {dev}, torch {torch.__version__}; median of {reps}",
          file=out)
    print("\n| layers | Linear layers | cached blocks s | rerun from start s | speed-up | bit-identical |", file=out)
    print("|--:|--:|--:|--:|--:|---|", file=out)
    for d in depths:
        base = _llama(d, hidden).to(dev)
        res = {}
        for cached in (True, False):
            ts = []
            for _ in range(a.warmup):  # untimed runs (allocator, caches, lazy imports)
                _quantize(copy.deepcopy(base), units, a.method, a.bits, a.group, cached)
            for _ in range(reps):
                m = copy.deepcopy(base)
                ts.append(_quantize(m, units, a.method, a.bits, a.group, cached))
            res[cached] = (statistics.median(ts), {k: v for k, v in m.state_dict().items()
                                                   if isinstance(v, torch.Tensor)})
        same = res[True][1].keys() == res[False][1].keys() and all(
            torch.equal(res[True][1][k], res[False][1][k]) for k in res[True][1])
        n_lin = 7 * d
        print(f"| {d} | {n_lin} | {res[True][0]:.2f} | {res[False][0]:.2f} | {res[False][0] / res[True][0]:.2f}x | "
              f"{'yes' if same else 'NO'} |", file=out)
        if not same:
            print("# ERROR: the two calibration paths gave different packed models", file=out)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
