"""Where EfficientNet-Lite0's weight-only error comes from: one kind of layer (or one layer) at a
time quantized, the rest fp32, measured on the demo's evaluation crops.

``python -m benchmarks.effnet_sensitivity [--bits 4] [--method hqq] [--per-layer project,stem]``

Kinds: ``dw`` (depthwise convs), ``expand`` / ``project`` (the MBConv 1x1 convs), ``stem``,
``head`` (the last 1x1 conv), ``fc`` (the classifier), then ``all``. ``--per-layer`` also
quantizes each layer of the named kinds on its own. Weights via
:func:`quantkern.ptq.conv.fake_quantize_model_` (group size: the largest divisor of
``I*kh*kw`` <= 64, as in the demo); metrics: top-1 agreement and mean KL(fp32 || quantized) over
the demo's 256 evaluation crops (``quantkern.demo``: ``_images``, ``_crops(ev, 256, seed=1)``).
``--method`` takes the data-free methods only (rtn, hqq): the point is the layers' sensitivity,
not a calibration set. ``--output-error`` also prints every layer's relative weight error and
the relative error of its output on its own fp32 inputs (32 crops).
"""
import argparse
import copy
import warnings

import torch

from benchmarks._harness import comma_list, one_of, positive_int

KINDS = ("dw", "expand", "project", "stem", "head", "fc")


def layer_kind(name: str, module) -> str:
    """The kind (one of :data:`KINDS`) of an EfficientNet-Lite0 Conv2d / Linear named ``name``."""
    from quantkern.ptq.conv import _is_depthwise

    if _is_depthwise(module):
        return "dw"
    if name == "_conv_stem":
        return "stem"
    if name == "_conv_head":
        return "head"
    if name == "_fc":
        return "fc"
    if "_expand_conv" in name:
        return "expand"
    if "_project_conv" in name:
        return "project"
    raise ValueError(f"unknown EfficientNet-Lite0 layer {name!r}")


def output_errors(model, layers, X, bits: int, method: str) -> list[tuple[str, float, float]]:
    """Per layer: ``||Wq - W|| / ||W||`` and ``||(Wq - W) * x|| / ||W * x||`` over the layer's fp32
    inputs on ``X`` (each layer alone; Wq from the same call as :func:`main`'s)."""
    from quantkern.ptq.conv import fake_quantize_model_

    inputs, hooks = {}, []
    for name, mod in layers:
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].detach())))
    try:
        with torch.no_grad():
            model(X)
    finally:
        for h in hooks:
            h.remove()
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fake_quantize_model_(q, bits, method, 64, progress=False)
    qmods = dict(q.named_modules())
    out = []
    with torch.no_grad():
        for name, mod in layers:
            W, Wq = mod.weight, qmods[name].weight
            dW = copy.deepcopy(mod)
            dW.weight.copy_(Wq - W)
            if dW.bias is not None:
                dW.bias.zero_()
            y = mod(inputs[name]) - (mod.bias.view(-1, *[1] * (inputs[name].dim() - 2)) if mod.bias is not None else 0)
            out.append((name, ((Wq - W).norm() / W.norm()).item(), (dW(inputs[name]).norm() / y.norm()).item()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=positive_int, default=4, help="weight bits (1-8; default 4)")
    ap.add_argument("--method", choices=("rtn", "hqq"), default="hqq", help="weight method (default hqq)")
    ap.add_argument("--per-layer", type=comma_list(one_of(KINDS)), default=[],
                    help=f"comma list of kinds ({', '.join(KINDS)}) whose layers are also measured one by one")
    ap.add_argument("--output-error", action="store_true",
                    help="also each layer's relative weight and output error (no KL) on 32 evaluation crops")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    a = ap.parse_args(argv)
    if a.bits > 8:
        ap.error(f"--bits must be in 1..8, got {a.bits}")
    torch.set_num_threads(a.threads)
    from quantkern.demo import _agree_kl, _crops, _images, _logits, load_efficientnet_lite0
    from quantkern.ptq.conv import fake_quantize_model_, group_size_for, quantizable_layers

    model = load_efficientnet_lite0("cpu")
    _, ev = _images()
    Xe = _crops(ev, 256, seed=1)
    L0 = _logits(model, Xe)
    layers = quantizable_layers(model)
    kinds = {n: layer_kind(n, m) for n, m in layers}

    def measure(keep) -> tuple[float, float]:
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fake_quantize_model_(m, a.bits, a.method, 64, skip=[n for n, _ in layers if not keep(n)], progress=False)
        agree, kl, _, _ = _agree_kl(_logits(m, Xe), L0)
        return agree, kl

    print(f"W{a.bits} {a.method}, one kind of layer at a time (the rest fp32), 256 evaluation crops")
    print("| layers | count | top-1 agreement | KL(fp32 || q) |\n|---|--:|--:|--:|")
    for kind in KINDS + ("all",):
        agree, kl = measure(lambda n: kind == "all" or kinds[n] == kind)
        count = len(layers) if kind == "all" else sum(k == kind for k in kinds.values())
        print(f"| {kind} | {count} | {100 * agree:.1f}% | {kl:.4f} |", flush=True)
    if a.output_error:
        print("\n| layer | kind | weight rel. error | output rel. error |\n|---|---|--:|--:|")
        for name, w_err, y_err in output_errors(model, layers, Xe[:32], a.bits, a.method):
            print(f"| {name} | {kinds[name]} | {100 * w_err:.1f}% | {100 * y_err:.1f}% |", flush=True)
    if a.per_layer:
        print("\n| layer | weight | group | top-1 agreement | KL(fp32 || q) |\n|---|---|--:|--:|--:|")
        for name, mod in layers:
            if kinds[name] in a.per_layer:
                agree, kl = measure(lambda n: n == name)
                W = mod.weight
                print(f"| {name} | {tuple(W.shape)} | {group_size_for(W[0].numel(), 64)} | {100 * agree:.1f}% | "
                      f"{kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
