"""Whole-model speed of a Llama-style causal LM on packed weights: prefill and cached decoding.

The per-op benchmark (``bench_packed_linear.py``) times one layer; this one times what an LLM user
runs: a transformers ``LlamaForCausalLM`` (randomly initialised from a config, no download;
default: TinyLlama-1.1B's layer shapes, hidden 2048, MLP 5632, 32 query / 4 key-value heads, with 4
layers instead of 22 and a 32000-token vocabulary), batch 1:

* prefill: one forward of a prompt of ``--prompt`` tokens (M = prompt length in every Linear);
* decode: ``--new`` cached steps, one token each (M = 1: the GEMV), after the prefill; the median
  step time is the per-token latency.

Variants (each a copy of the same model; every ``nn.Linear`` replaced, the ``lm_head`` included
unless ``--keep-lm-head``):

* ``bf16 nn.Linear`` (the baseline of the ratios) and ``fp32 nn.Linear``;
* ``quantkern intB gG``: :func:`quantkern.nn.replace_linear` (round-to-nearest, bf16 scales / zeros),
  bf16 activations;
* ``aten int4 gG``: PyTorch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, what torchao's int4
  weight-only CPU path calls) on the same 4-bit codes and scales as ``quantkern int4`` (its zero
  ``(8 - z) s`` in bf16), bf16 activations;
* ``dynamic int8``: ``torch.ao.quantization.quantize_dynamic`` on the fp32 model (int8 weights,
  per-token int8 activations, fp32 elsewhere).

Columns: weight MB of the Linears as stored, prefill ms and tokens/s, decode ms per token and
tokens/s, the decode's weight read rate (GB/s) and its fraction of the machine's read bandwidth
measured in the same run, speed-ups against ``bf16 nn.Linear`` and ``fp32 nn.Linear`` (on CPUs
without bf16 arithmetic the fp32 model is the faster dense one), and the relative L2 error of the
prefill logits against the fp32 model. A randomly initialised model's logits are near-flat, so
greedy-token agreement says little; and such a model amplifies any weight error through its layers
far more than a trained one (dynamic int8 gives ~0.2 at the default size), so the error column ranks
the variants and is no estimate of a trained model's accuracy (the demo measures that on MiniLM).

    python -m benchmarks.bench_llm_decode --threads 2
    python -m benchmarks.bench_llm_decode --threads 2 --layers 8 --bits 4 --prompt 512 --new 64

CPU only (the model sizes are a CPU's); the weights of 4 layers are larger than the last-level
cache of the hosts measured here, so every decode step reads them from memory.
"""
from __future__ import annotations

import argparse
import copy
import gc
import inspect
import statistics
import time
import warnings

import torch
from torch import nn

from benchmarks import _harness as H

DEFAULTS = dict(layers=4, hidden=2048, ffn=5632, heads=32, kv_heads=4, vocab=32000)
QUICK = dict(layers=2, hidden=256, ffn=704, heads=8, kv_heads=2, vocab=512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, writes_files=True, warmup=2,
                      reps_help="timed prefills per variant (default 5; the decode always times --new steps)",
                      warmup_help="untimed prefills and decode steps before timing (default 2)")
    p.add_argument("--layers", type=H.positive_int, default=None, help=f"decoder layers (default {DEFAULTS['layers']})")
    p.add_argument("--hidden", type=H.positive_int, default=None, help=f"hidden size (default {DEFAULTS['hidden']})")
    p.add_argument("--ffn", type=H.positive_int, default=None, help=f"MLP size (default {DEFAULTS['ffn']})")
    p.add_argument("--heads", type=H.positive_int, default=None, help=f"query heads (default {DEFAULTS['heads']})")
    p.add_argument("--kv-heads", type=H.positive_int, default=None,
                   help=f"key / value heads (default {DEFAULTS['kv_heads']})")
    p.add_argument("--vocab", type=H.positive_int, default=None, help=f"vocabulary (default {DEFAULTS['vocab']})")
    p.add_argument("--prompt", type=H.positive_int, default=None, help="prompt tokens (default 128; 16 with --quick)")
    p.add_argument("--new", type=H.positive_int, default=None, help="decode steps timed (default 32; 4 with --quick)")
    p.add_argument("--bits", type=H.comma_list(H.one_of([2, 3, 4])), default=[4, 3, 2],
                   help="quantkern bit widths (default 4,3,2)")
    p.add_argument("--group", type=H.positive_int, default=64, help="group size, a multiple of 32 (default 64)")
    p.add_argument("--keep-lm-head", action="store_true", help="leave the lm_head in bf16 / fp32 in every variant")
    p.add_argument("--no-baselines", action="store_true", help="only bf16 nn.Linear and the quantkern rows")
    args = p.parse_args(argv)
    if args.group % 32:
        p.error(f"--group must be a multiple of 32, got {args.group}")
    base = QUICK if args.quick else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.prompt = args.prompt or (16 if args.quick else 128)
    args.new = args.new or (4 if args.quick else 32)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads}), "
                f"and --heads of --kv-heads ({args.kv_heads})")
    if (args.hidden // args.heads) % 2:  # (rotary embeddings rotate pairs: transformers failed mid-run)
        p.error(f"--hidden / --heads (the head size, {args.hidden // args.heads}) must be even")
    for name in ("hidden", "ffn"):
        if getattr(args, name) % args.group:
            p.error(f"--group {args.group} must divide --{name} ({getattr(args, name)})")
    if args.device != "cpu":
        p.error("bench_llm_decode runs on the CPU only (--device cpu)")
    return args


def make_model(args) -> nn.Module:
    import transformers as tf

    tf.logging.set_verbosity_error()
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt + args.new + 8,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


class AtenInt4Linear(nn.Module):
    """``nn.Linear`` on PyTorch's CPU int4 kernel: the 4-bit codes q [N, K] of a quantkern
    ``PackedWeight`` (``w = (q - z) s``) with aten's scales_and_zeros [G, N, 2] = (s, (8 - z) s), so
    that ``(q - 8) s + (8 - z) s`` is the same weight; bf16 x only."""

    def __init__(self, pw, bias):
        super().__init__()
        q = pw.unpack().to(torch.int32)
        s, z = pw.scales.float(), pw.zeros.float()
        self.K, self.gs = pw.in_features, pw.group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("sz", torch.stack([s.t(), ((8 - z) * s).t()], -1).to(torch.bfloat16).contiguous())
        self.bias = bias

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.K), self.packed, self.gs, self.sz)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def linears(model: nn.Module, keep_lm_head: bool) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if not (keep_lm_head and n == "lm_head")
            and (isinstance(m, (nn.Linear, AtenInt4Linear)) or hasattr(m, "packed_weight"))]


def linear_bytes(model: nn.Module, keep_lm_head: bool) -> int:
    """Bytes of the replaced layers' weights as stored (codes + scales + zeros, or the dense weight)."""
    total = 0
    for _, m in linears(model, keep_lm_head):
        if hasattr(m, "packed_weight"):
            total += m.packed_weight.nbytes()
        elif isinstance(m, AtenInt4Linear):
            total += m.packed.numel() * m.packed.element_size() + m.sz.numel() * m.sz.element_size()
        else:
            total += m.weight.numel() * m.weight.element_size()
    return total


def variants(fp32: nn.Module, args, out):
    """(name, model, weight bytes) one at a time: a variant's model is built when its turn comes and
    dropped after, so that the fp32 model, its bf16 copy (the quantized variants' source) and one
    variant are in memory at a time."""
    from quantkern.nn import replace_linear

    skip = ["lm_head"] if args.keep_lm_head else None
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    yield "bf16 nn.Linear", bf16, linear_bytes(bf16, args.keep_lm_head)
    if not args.no_baselines:
        yield "fp32 nn.Linear", fp32, linear_bytes(fp32, args.keep_lm_head)
    for bits in args.bits:
        m = copy.deepcopy(bf16)
        replace_linear(m, bits, args.group, skip=skip, meta_dtype=torch.bfloat16)
        yield f"quantkern int{bits} g{args.group}", m, linear_bytes(m, args.keep_lm_head)
        if bits == 4 and not args.no_baselines and args.group not in (32, 64, 128, 256):
            # (aten's op refuses other group sizes on its first call, which ended the run mid-table)
            print(f"# aten int4: skipped (its CPU op takes group sizes 32, 64, 128, 256, not {args.group})", file=out)
        elif bits == 4 and not args.no_baselines:
            a = m  # the same codes and scales on aten's kernel
            try:
                for name, mod in linears(a, args.keep_lm_head):
                    a.set_submodule(name, AtenInt4Linear(mod.packed_weight, mod.bias))
            except Exception as e:  # noqa: BLE001  (a torch without the CPU int4 op)
                print(f"# aten int4 unavailable: {e}", file=out)
            else:
                yield f"aten int4 g{args.group}", a, linear_bytes(a, args.keep_lm_head)
        del m
        gc.collect()
    if not args.no_baselines:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao's deprecation notices
                q8 = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8, inplace=False)
                if args.keep_lm_head:
                    q8.lm_head = copy.deepcopy(fp32.lm_head)
        except Exception as e:  # noqa: BLE001
            print(f"# dynamic int8 unavailable: {e}", file=out)
        else:
            n8 = sum(m.weight().numel() for n, m in q8.named_modules() if type(m).__name__ == "Linear"
                     and hasattr(m, "weight") and callable(m.weight))
            yield "dynamic int8", q8, n8
    del bf16
    gc.collect()


@torch.inference_mode()
def run_variant(model: nn.Module, ids: torch.Tensor, args) -> tuple[H.Timing, list[float], torch.Tensor]:
    """(prefill timing, per-step decode ms, prefill logits as fp32)."""
    def prefill():
        return model(ids, use_cache=True)

    # transformers 5.x names the KV cache `cache` (argument and output); older ones `past_key_values`
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pre = H.measure(prefill, warmup=args.warmup, reps=args.reps or 5)
    o = prefill()
    logits = o.logits[0].float()
    past, tok = o[kw], o.logits[:, -1:].argmax(-1)
    steps = []
    for i in range(args.warmup + args.new):
        t0 = time.perf_counter()
        o = model(tok, use_cache=True, **{kw: past})
        dt = (time.perf_counter() - t0) * 1e3
        past, tok = o[kw], o.logits[:, -1:].argmax(-1)
        if i >= args.warmup:
            steps.append(dt)
    return pre, steps, logits


def main(argv=None) -> int:
    args = parse_args(argv)
    H.apply_common_args(args)
    out = H.table_stream(args)
    import quantkern

    info = H.env_info("cpu")
    bw_bytes = 64 * H.MiB if args.quick else H.memory_bytes(256)
    rd0 = H.read_bandwidth("cpu", bw_bytes)
    print(f"# llm decode benchmark{' (--quick: smoke test, not a measurement)' if args.quick else ''}", file=out)
    print(f"# {H.describe(info)}; cpu features {quantkern.ops.cpu_features()}", file=out)
    print(f"# Llama: {args.layers} layers, hidden {args.hidden}, MLP {args.ffn}, heads {args.heads} / "
          f"{args.kv_heads}, vocab {args.vocab}; prompt {args.prompt} tokens, {args.new} decode steps; "
          f"lm_head {'kept' if args.keep_lm_head else 'replaced too'}", file=out)
    fp32 = make_model(args)
    ids = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = fp32(ids).logits[0].float()
    rows: list[H.Row] = []
    for name, model, nbytes in variants(fp32, args, out):
        pre, steps, logits = run_variant(model, ids, args)
        dec = statistics.median(steps)
        q1, q3 = (statistics.quantiles(steps, n=4)[0], statistics.quantiles(steps, n=4)[2]) if len(steps) > 1 else (dec, dec)
        err = float((logits - ref).norm() / ref.norm())
        rows.append(H.Row(case="llama", impl=name, pass_="prefill", ms=pre.median, spread=pre.spread, bytes=nbytes,
                          extra=dict(tok_s=args.prompt / (pre.median * 1e-3), weight_mb=nbytes / 1e6, logit_err=err)))
        rows.append(H.Row(case="llama", impl=name, pass_="decode", ms=dec, spread=(q3 - q1) / dec, bytes=nbytes,
                          extra=dict(tok_s=1e3 / dec, weight_mb=nbytes / 1e6, logit_err=err)))
        print(f"# {name}: prefill {pre.median:.1f} ms, decode {dec:.2f} ms / token", file=out, flush=True)
        del model
        gc.collect()
    rd1 = H.read_bandwidth("cpu", bw_bytes)
    bw = max(rd0, rd1)
    print(f"# read bandwidth {rd0:.1f} GB/s at start, {rd1:.1f} at end; roofline uses {bw:.1f}", file=out)
    for r in rows:
        for col, impl in (("vs_bf16_x", "bf16 nn.Linear"), ("vs_fp32_x", "fp32 nn.Linear")):
            base = [o for o in rows if o.pass_ == r.pass_ and o.impl == impl]
            r.extra[col] = base[0].ms / r.ms if base else float("nan")
        r.extra["roofline"] = r.gbps / bw if r.pass_ == "decode" and r.gbps else float("nan")
    cols = ["pass", "impl", "weight_mb", "ms", "spread", "tok_s", "gbps", "roofline", "vs_bf16_x", "vs_fp32_x",
            "logit_err"]
    H.print_table(rows, cols, file=out,
                  title="Llama-style LM, batch 1 (decode: ms per token; GB/s and roofline: the Linears' weight "
                        "bytes per decode step / read bandwidth; logit_err: prefill logits against fp32)",
                  titles={"weight_mb": "weights MB", "tok_s": "tokens/s", "vs_bf16_x": "vs bf16", "vs_fp32_x": "vs fp32",
                          "logit_err": "logit err"})
    if args.json:
        H.write_json(args.json, rows, meta=dict(info, read_bandwidth_gbps=bw, config=dict(
            layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads, kv_heads=args.kv_heads,
            vocab=args.vocab, prompt=args.prompt, new=args.new, group=args.group, keep_lm_head=args.keep_lm_head)))
    H.plot_rows([r for r in rows if r.pass_ == "decode"], args, out, title=f"LLM decode ({H.describe(info)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
