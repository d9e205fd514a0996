"""Model demo: quantize real models offline and measure what it costs.

``python -m quantkern demo [--quick] [--methods rtn,hqq,gptq,erq] [--bits 4,3,2] [--act-bits 8,4] [--threads N]``

(a) all-MiniLM-L6-v2 (sentence embeddings): every ``nn.Linear`` -> PackedLinear via
    :func:`quantkern.quantize_`, group size 64. Sentences of ``load_sentences()``:
    even indices calibrate (GPTQ / ERQ), odd indices evaluate (disjoint).
    Metrics vs fp32: mean / min embedding cosine, nearest-neighbour agreement
    (the nearest other eval sentence is the same as under fp32), model size,
    quantization time, encode time.
(b) EfficientNet-Lite0: weight-only fake quantization of every conv / linear weight
    (conv weights reshaped ``[O, I*kh*kw]``; one group per row where 64 does not
    divide, e.g. depthwise 3x3 / 5x5); written back as ``(q - zero) * scale``
    (PackedLinear is linear-only). GPTQ uses a conv Hessian from unfolded inputs for
    dense convs; depthwise convs fall back to RTN under GPTQ. Metrics: top-1 agreement
    with fp32 and mean KL(fp32 || quant) on random crops of natural images;
    calibration crops and evaluation crops come from different images.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .nn import PackedLinear
from .ptq import QuantizeConfig, quantize_
from .ptq.models import efficientnet_preprocess, load_efficientnet_lite0, load_minilm, load_sentences, sample_photos

METHOD_LABEL = {"rtn": "RTN", "hqq": "HQQ", "gptq": "GPTQ", "erq": "ERQ (weight-only, Wqer)"}
ACT_LABEL = {"erq": "ERQ (Aqer + Wqer)"}


def _model_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor)) / 1e6


# ------------------------------------------------------------------ (a) MiniLM
def _encode(model, sents, bs=64):
    with torch.inference_mode():
        return model.encode(sents, batch_size=bs, convert_to_tensor=True, show_progress_bar=False).float()


def _nn_index(E):
    E = F.normalize(E, dim=1)
    S = E @ E.T
    S.fill_diagonal_(-2)
    return S.argmax(1)


def minilm_calib_units(model, sentences, batch: int = 16):
    """One calibration callable per batch of ``batch`` sentences, batched by token length.

    Padding tokens also pass through every Linear and so enter the layers' statistics
    (Hessians, ERQ rows, activation ranges) although the model masks them out; batching
    sentences of similar length keeps them few. Returns (callables, real tokens, rows incl. padding).
    """
    order = sorted(range(len(sentences)), key=lambda i: len(model.tokenize([sentences[i]])["input_ids"][0]))
    feats = [model.tokenize([sentences[i] for i in order[j:j + batch]]) for j in range(0, len(order), batch)]
    units = [(lambda f: (lambda m: m(dict(f))))(f) for f in feats]
    return (units, sum(int(f["attention_mask"].sum()) for f in feats),
            sum(f["attention_mask"].numel() for f in feats))


def minilm_table(methods, bits_list, quick=False, group_size=64, out=print, act_bits_list=(8, 4)):
    model = load_minilm("cpu")
    sents = load_sentences()
    calib, evals = sents[0::2], sents[1::2]
    if quick:
        calib, evals = calib[:32], evals[:48]
    calib_fn, ntok, nrows = minilm_calib_units(model, calib)

    t0 = time.perf_counter()
    E0 = _encode(model, evals)
    t_fp = min(time.perf_counter() - t0, _time(lambda: _encode(model, evals)))
    nn0 = _nn_index(E0)
    mb0 = _model_mb(model)

    def row(method, bits, act_bits=None):
        m = copy.deepcopy(model)
        cfg = QuantizeConfig(method=method, bits=bits, group_size=group_size, act_bits=act_bits)
        label = METHOD_LABEL[method] if act_bits is None else ACT_LABEL.get(method, METHOD_LABEL[method])
        if quick and method in ("gptq", "erq"):  # the solvers' column loops take minutes on 2 cores
            cfg.skip = lambda name: ".layer.0." not in name
            label += " (quick: layer 0 only)"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(m, cfg, calib_fn=calib_fn, progress=False)
        tq = time.perf_counter() - t0
        E = _encode(m, evals)
        ti = _time(lambda: _encode(m, evals))
        cos = F.cosine_similarity(E, E0, dim=1)
        agree = (_nn_index(E) == nn0).float().mean().item()
        npk = sum(isinstance(x, PackedLinear) for x in m.modules())
        a = f"A{act_bits}" if act_bits else ""
        r = (f"| {label} | W{bits}{a} g{group_size} | {cos.mean():.4f} | {cos.min():.4f} | "
             f"{100 * agree:.1f}% | {_model_mb(m):.1f} | {tq:.1f} | {ti:.2f} ({ti / t_fp:.2f}x) |")
        out(r + f"  <!-- {npk} PackedLinear -->")
        return r

    rows = [f"| fp32 | - | 1.0000 | 1.0000 | 100.0% | {mb0:.1f} | - | {t_fp:.2f} (1.00x) |"]
    rows += [row(method, bits) for bits in bits_list for method in methods]
    # weight + activation rows: W4 with every Linear input fake-quantized (static per tensor,
    # asymmetric, calibrated with QuantizeConfig's act_method on the calibration sentences)
    act_methods = [m for m in ("rtn", "gptq", "erq") if m in methods and not (quick and m == "gptq")]
    act_rows = [row(method, 4, ab) for ab in act_bits_list for method in act_methods]
    cols = ("| method | config | mean cos | min cos | NN agreement | size MB | quant s | encode s (vs fp32) |\n"
            "|---|---|---|---|---|---|---|---|")
    head = (f"all-MiniLM-L6-v2: {len(evals)} eval sentences, {len(calib)} disjoint calibration sentences "
            f"({ntok} tokens, {nrows} rows with padding, length-sorted batches of 16) for GPTQ/ERQ and the "
            f"activation ranges; every nn.Linear packed (weights + fp16 scales/zeros).\n\n" + cols)
    text = head + "\n" + "\n".join(rows)
    if act_rows:
        d = QuantizeConfig()
        text += (f"\n\nWith activation quantization (every PackedLinear's input, static per tensor, "
                 f"{'symmetric' if d.act_symmetric else 'asymmetric'}, calibrated with {d.act_method!r}):\n\n"
                 + cols + "\n" + "\n".join(act_rows))
    return text


def _time(fn, reps=2):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------ (b) EfficientNet-Lite0
def _images():
    """(calibration images, evaluation images): uint8 [H, W, 3] arrays from disjoint photos."""
    import numpy as np

    imgs = [("sklearn:" + n, im) for n, im in zip(("china", "flower"), sample_photos())]
    try:
        import skimage.data as sd

        for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina",
                     "immunohistochemistry", "cat", "colorwheel", "logo", "skin", "lily"):
            try:
                im = np.asarray(getattr(sd, name)())
            except Exception:  # noqa: BLE001  (absent in this skimage version / needs pooch)
                continue
            if im.ndim == 3 and im.shape[2] >= 3 and im.dtype == np.uint8 and min(im.shape[:2]) >= 128:
                imgs.append(("skimage:" + name, im[..., :3]))
    except ImportError:
        pass
    if len(imgs) >= 4:
        cal = imgs[1::3]
        ev = [x for i, x in enumerate(imgs) if i % 3 != 1]
    else:  # sklearn only: one photo each
        cal, ev = imgs[:1], imgs[1:]
    return cal, ev


def _crops(imgs, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        _, im = imgs[i % len(imgs)]
        H, W = im.shape[:2]
        s = int(min(H, W) * (0.35 + 0.65 * torch.rand((), generator=g).item()))
        y = int(torch.randint(0, H - s + 1, (), generator=g))
        x = int(torch.randint(0, W - s + 1, (), generator=g))
        c = torch.from_numpy(im[y:y + s, x:x + s].copy())
        if torch.rand((), generator=g).item() < 0.5:
            c = c.flip(1)
        out.append(efficientnet_preprocess(c))
    return torch.cat(out)


def _conv_unfold(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Rows [T, I*kh*kw] of the conv's im2col (dense convs)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        pad = 0 if isinstance(conv.padding, str) else conv.padding
    else:
        pad = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)  # [B, K, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Stop(Exception):
    pass


@torch.no_grad()
def fake_quant_weights(model, method, bits, group_size, calib_x=None, bs=16, keep_sensitive=False):
    """Weight-only fake quantization of every Conv2d / Linear, in module order (sequential for GPTQ)."""
    from .ptq import gptq_quantize, hqq_quantize, rtn_quantize
    from .ptq.gptq import HessianAccumulator

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if keep_sensitive:  # the stem conv and the depthwise convs stay fp32
        layers = [m for i, m in enumerate(layers) if i > 0 and (isinstance(m, nn.Linear) or m.groups == 1)]
    n_rtn_fallback = 0
    for mod in layers:
        W = mod.weight.detach().float()
        W2 = W.reshape(W.shape[0], -1)
        K = W2.shape[1]
        g = group_size if K % group_size == 0 else K
        dense = isinstance(mod, nn.Linear) or mod.groups == 1
        if method == "gptq" and dense:
            acc = HessianAccumulator(K)

            def hook(m, inp, out=None):
                x = inp[0]
                acc.add_batch(x.reshape(-1, K) if isinstance(m, nn.Linear) else _conv_unfold(m, x))
                raise _Stop

            h = mod.register_forward_hook(hook)
            try:
                for i in range(0, calib_x.shape[0], bs):
                    try:
                        model(calib_x[i:i + bs])
                    except _Stop:
                        pass
            finally:
                h.remove()
            q, s, z = gptq_quantize(W2, acc.H, bits, g)
        elif method == "hqq":
            q, s, z = hqq_quantize(W2, bits, g)
        else:
            n_rtn_fallback += method == "gptq"
            q, s, z = rtn_quantize(W2, bits, g)
        Wq = ((q.float().reshape(q.shape[0], -1, g) - z[..., None]) * s[..., None]).reshape(W.shape)
        mod.weight.copy_(Wq.to(mod.weight.dtype))
    return n_rtn_fallback


def effnet_table(methods, bits_list, quick=False, group_size=64, out=print):
    model = load_efficientnet_lite0("cpu")
    cal_imgs, ev_imgs = _images()
    n_cal, n_ev = (16, 24) if quick else (32, 128)
    Xc, Xe = _crops(cal_imgs, n_cal, seed=0), _crops(ev_imgs, n_ev, seed=1)
    with torch.inference_mode():
        L0 = torch.cat([model(Xe[i:i + 32]) for i in range(0, n_ev, 32)])
    P0 = L0.log_softmax(1)
    rows = []
    for bits in bits_list:
        for method in methods:
            if method == "erq":
                rows.append(f"| ERQ | W{bits} | - | - | - | not run on convs (ERQ here is linear-only) |")
                out(rows[-1])
                continue
            if quick and method == "gptq":
                rows.append(f"| GPTQ | W{bits} | - | - | - | skipped in --quick (about 90 s) |")
                out(rows[-1])
                continue
            for keep in (False, True):
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                nfb = fake_quant_weights(m, method, bits, group_size, Xc, keep_sensitive=keep)
                tq = time.perf_counter() - t0
                with torch.inference_mode():
                    L = torch.cat([m(Xe[i:i + 32]) for i in range(0, n_ev, 32)])
                P = L.log_softmax(1)
                agree = (L.argmax(1) == L0.argmax(1)).float().mean().item()
                kl = F.kl_div(P, P0, log_target=True, reduction="none").sum(1).mean().item()
                note = "stem + depthwise convs kept fp32" if keep else "all layers"
                if nfb:
                    note += f"; {nfb} depthwise convs RTN"
                rows.append(f"| {METHOD_LABEL[method]} | W{bits} g{group_size} | {100 * agree:.1f}% | {kl:.4f} | {tq:.1f} | {note} |")
                out(rows[-1])
    head = (f"EfficientNet-Lite0, weight-only fake quant of all conv/linear weights (g{group_size}, one group per row "
            f"where {group_size} does not divide I*kh*kw); {n_ev} eval crops from {len(ev_imgs)} images "
            f"({', '.join(n for n, _ in ev_imgs)}), {n_cal} calibration crops from {len(cal_imgs)} other images "
            f"({', '.join(n for n, _ in cal_imgs)}).\n\n"
            "| method | config | top-1 agreement | mean KL(fp32‖q) | quant s | note |\n|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m quantkern demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few sentences / crops, W4 only (smoke test)")
    ap.add_argument("--methods", default="rtn,hqq,gptq,erq")
    ap.add_argument("--bits", default=None, help="comma list, default 4,3,2 (MiniLM) and 4 (EfficientNet)")
    ap.add_argument("--act-bits", default="8,4", help="MiniLM W4A<b> rows with activation quantization, comma "
                    "list ('' for none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["minilm", "effnet"], default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHOD_LABEL:
            ap.error(f"unknown method {m!r}")
    act_bits = [int(b) for b in args.act_bits.split(",") if b.strip()]
    if args.bits is not None:
        bits_m = bits_e = [int(b) for b in args.bits.split(",") if b.strip()]
    else:
        bits_m, bits_e = ([4], [4]) if args.quick else ([4, 3, 2], [4])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    tabs = []
    if args.only in (None, "minilm"):
        tabs.append(minilm_table(methods, bits_m, args.quick, out=lambda s: print(s, flush=True),
                                 act_bits_list=act_bits))
        print("\n" + tabs[-1] + "\n", flush=True)
    if args.only in (None, "effnet"):
        tabs.append(effnet_table(methods, bits_e, args.quick, out=lambda s: print(s, flush=True)))
        print("\n" + tabs[-1] + "\n", flush=True)
    return tabs
