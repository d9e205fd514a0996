"""Model demo: quantize real models offline and measure what it costs.

``python -m quantkern demo [--quick] [--methods rtn,hqq,gptq,erq] [--bits 4,3,2] [--act-bits 8,4] [--threads N]
[--only minilm|effnet] [--effnet-rows ROWS|all]`` (``--help`` explains each)

(a) all-MiniLM-L6-v2 (sentence embeddings): every ``nn.Linear`` -> PackedLinear via
    :func:`quantkern.quantize_`, group size 64. Sentences of ``load_sentences()``:
    even indices calibrate (GPTQ / ERQ), odd indices evaluate (disjoint).
    Metrics vs fp32: mean / min embedding cosine, nearest-neighbour agreement
    (the nearest other eval sentence is the same as under fp32), model size,
    quantization time, encode time. With GPTQ, W3 and W2 also get a mixed-precision row (each
    layer at 2-4 bits by measured sensitivity, ``ptq.layer_sensitivity`` / ``allocate_bits``, a
    third of a bit per weight above the row's bits).
(b) EfficientNet-Lite0, simulated quantization with :mod:`quantkern.ptq.conv`
    (``fake_quantize_model_``): every conv / linear weight quantized group-wise along
    ``I*kh*kw`` (group size: the largest divisor <= 64), written back as
    ``(q - zero) * scale``. Table 1: weight-only W4 with RTN / HQQ / GPTQ / ERQ, plus
    HQQ with bias correction, HQQ + end-to-end KD of the group scales/zeros (codes fixed;
    also with the BatchNorm biases), GPTQ with HQQ's params on the depthwise convs, and GPTQ
    on the dense layers with HQQ on the depthwise ones (also with stem + classifier at 8
    bits, labelled, and with KD on top); float-model targets (``fp_target``) with HQQ and with GPTQ dense +
    HQQ depthwise, the latter also calibrated on inputs synthesized from the model's BatchNorm statistics
    instead of images (``ptq.synthesize_inputs``: data-free); HQQ and that row with W8 on the layers
    ``ptq.layer_sensitivity`` ranks first within 4.1 bits per weight (labelled: not all-W4). Table 2: W8A8 and W4A8 (weights HQQ) with static per-tensor
    activation quantizers calibrated by max / percentile / mse / entropy. Metrics: top-1 agreement with fp32
    (all crops, and the crops where fp32's top-1 probability is > 0.5) and mean
    KL(fp32 || quant) on random crops of natural images; calibration crops and
    evaluation crops come from different images (see ``_images``).
"""
from __future__ import annotations

import argparse
import contextlib
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
# bits each model's rows accept: MiniLM runs on PackedLinear (2, 3, 4 bits); EfficientNet is fake
# quantized, and its RTN / HQQ rows (the KD rows too) take 1, 2, 3, 4 and 8 bits
MINILM_BITS, EFFNET_BITS, MINILM_ACT_BITS = (2, 3, 4), (1, 2, 3, 4, 8), tuple(range(2, 9))
# MiniLM's mixed-precision GPTQ rows (W2 and W3, not --quick): each layer at 2, 3 or 4 bits by
# ptq.layer_sensitivity (HQQ one layer at a time, squared error of the sentence embedding on the first
# ``units`` calibration batches) and ptq.allocate_bits within ``extra`` bits per weight above the row's bits
MINILM_MIXED = {"extra": 1 / 3, "units": 4}


def _choices(name: str, values, allowed, empty_ok: bool = False, hint: str = "") -> list:
    """``values`` (a sequence, or a comma list in a string) as a list whose entries are all in
    ``allowed`` (same type: 4.0 or "4" is not the bit width 4); ValueError naming ``name`` and the
    bad entry otherwise, or when empty unless ``empty_ok``. Checks the arguments of the tables and of
    the CLI, before any model loads (a bad entry used to surface after minutes, as a KeyError, or
    not at all: an unknown EfficientNet row or method was skipped in silence)."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    values = list(dict.fromkeys(values))  # each once, in the given order
    choose = f"choose from {', '.join(map(str, allowed))}{hint}"
    if not values and not empty_ok:
        raise ValueError(f"{name}: none given ({choose})")
    for v in values:
        if not any(v == a and type(v) is type(a) for a in allowed):
            raise ValueError(f"{name}: unknown entry {v!r} ({choose})")
    return values


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


def st_features(model, texts):
    """sentence-transformers' model inputs for ``texts`` (``preprocess``; ``tokenize`` before 6.x,
    which 6.x deprecates with a warning and forwards to ``preprocess``)."""
    return model.preprocess(inputs=texts) if hasattr(model, "preprocess") else model.tokenize(texts)


def minilm_calib_units(model, sentences, batch: int = 16):
    """One calibration unit per batch of ``batch`` sentences, batched by token length:
    ``(callable, attention_mask)``, so padding rows stay out of the layers' statistics (Hessians,
    ERQ rows, activation ranges; with them MiniLM W4A4 lost 0.07-0.11 cosine, W2 0.002-0.004).
    Returns (units, real tokens, rows incl. padding).
    """
    order = sorted(range(len(sentences)), key=lambda i: len(st_features(model, [sentences[i]])["input_ids"][0]))
    feats = [st_features(model, [sentences[i] for i in order[j:j + batch]]) for j in range(0, len(order), batch)]
    units = [((lambda f: (lambda m: m(dict(f))))(f), f["attention_mask"]) for f in feats]
    return (units, sum(int(f["attention_mask"].sum()) for f in feats),
            sum(f["attention_mask"].numel() for f in feats))


def minilm_table(methods, bits_list, quick=False, group_size=64, out=print, act_bits_list=(8, 4)):
    """The MiniLM tables (markdown): weight-only W``bits`` x ``methods``, then W4A``act_bits``.

    ``methods``: keys of :data:`METHOD_LABEL` (a list, or a comma list in a string); ``bits_list``:
    weight bits of :data:`MINILM_BITS`; ``act_bits_list``: activation bits of
    :data:`MINILM_ACT_BITS` (empty: no activation table). ``group_size`` must fit every Linear
    (a multiple of 32 dividing in_features 384 and 1536; None / -1: one group per row): the rows are
    labelled with it, so a layer never falls back to one group per row in silence.
    ``out`` gets each row as it is measured. Arguments are checked before the model loads.
    """
    from .ptq.mixed import allocate_bits, average_bits, layer_sensitivity

    methods = _choices("methods", methods, METHOD_LABEL)
    bits_list = _choices("bits_list", bits_list, MINILM_BITS)
    act_bits_list = _choices("act_bits_list", act_bits_list, MINILM_ACT_BITS, empty_ok=True)
    QuantizeConfig(group_size=group_size).validate()
    glabel = "per row" if group_size in (None, -1) else f"g{group_size}"
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

    def row(method, bits, act_bits=None, layer_bits=None):
        m = copy.deepcopy(model)
        cfg = QuantizeConfig(method=method, bits=bits, group_size=group_size, act_bits=act_bits, strict_group=True,
                             layer_config=None if layer_bits is None else
                             {n: {"bits": b} for n, b in layer_bits.items()})
        label = METHOD_LABEL[method] if act_bits is None else ACT_LABEL.get(method, METHOD_LABEL[method])
        if quick and method in ("gptq", "erq"):  # the solvers' column loops take minutes on 2 cores
            cfg.skip = lambda name: ".layer.0." not in name
            label += " (quick: layer 0 only)"
        t0 = time.perf_counter()
        with _quiet():
            quantize_(m, cfg, calib_fn=calib_fn, progress=False)
        tq = time.perf_counter() - t0
        E = _encode(m, evals)
        ti = _time(lambda: _encode(m, evals))
        cos = F.cosine_similarity(E, E0, dim=1)
        agree = (_nn_index(E) == nn0).float().mean().item()
        npk = sum(isinstance(x, PackedLinear) for x in m.modules())
        a = f"A{act_bits}" if act_bits else ""
        if layer_bits is not None:  # the bits of each layer, and the mean, in the label and the config
            label += " (" + ", ".join(f"{sum(v == b for v in layer_bits.values())} layers W{b}"
                                      for b in sorted(set(layer_bits.values()))) + ", by measured sensitivity)"
            a = f"/mixed {average_bits(model, layer_bits):.2f} bits"
            tq += t_sens
        r = (f"| {label} | W{bits}{a} {glabel} | {cos.mean():.4f} | {cos.min():.4f} | "
             f"{100 * agree:.1f}% | {_model_mb(m):.1f} | {tq:.1f} | {ti:.2f} ({ti / t_fp:.2f}x) |")
        out(r + f"  <!-- {npk} PackedLinear -->")
        return r

    rows = [f"| fp32 | - | 1.0000 | 1.0000 | 100.0% | {mb0:.1f} | - | {t_fp:.2f} (1.00x) |"]
    rows += [row(method, bits) for bits in bits_list for method in methods]
    # mixed precision: GPTQ with each layer's bits from its measured sensitivity (one pass for every row)
    mixed_bits = [b for b in bits_list if b < max(MINILM_BITS)] if "gptq" in methods and not quick else []
    if mixed_bits:
        t0 = time.perf_counter()
        sens = layer_sensitivity(model, [u for u, _ in calib_fn[:MINILM_MIXED["units"]]], MINILM_BITS, "hqq",
                                 group_size, metric="mse", group_rule="packed",
                                 output_fn=lambda o: o["sentence_embedding"], progress=False)
        t_sens = time.perf_counter() - t0
        for bits in mixed_bits:
            sb = {n: {b: e for b, e in es.items() if b >= bits} for n, es in sens.items()}
            rows.append(row("gptq", bits, layer_bits=allocate_bits(model, sb, bits + MINILM_MIXED["extra"])))
    # weight + activation rows: W4 with every Linear input fake-quantized (static per tensor,
    # asymmetric, calibrated with QuantizeConfig's act_method on the calibration sentences)
    act_methods = minilm_act_methods(methods, quick)
    act_rows = [row(method, 4, ab) for ab in act_bits_list for method in act_methods]
    cols = ("| method | config | mean cos | min cos | NN agreement | size MB | quant s | encode s (vs fp32) |\n"
            "|---|---|---|---|---|---|---|---|")
    head = (f"all-MiniLM-L6-v2: {len(evals)} eval sentences, {len(calib)} disjoint calibration sentences "
            f"({ntok} tokens in length-sorted batches of 16, {nrows - ntok} padding rows left out by the attention "
            f"mask) for GPTQ/ERQ and the "
            f"activation ranges; every nn.Linear packed (weights + fp16 scales/zeros"
            f"{'; --quick: GPTQ / ERQ on layer 0 only, the other layers stay float' if quick else ''}). GPTQ: act_order "
            f"{QuantizeConfig().act_order}, damp {QuantizeConfig().damp}; GPTQ/ERQ: fp_target "
            f"{QuantizeConfig().fp_target} (ridge {QuantizeConfig().fp_target_damp}).\n\n" + cols)
    text = head + "\n" + "\n".join(rows)
    if act_rows:
        d = QuantizeConfig()
        text += (f"\n\nWith activation quantization (every PackedLinear's input, static per tensor, "
                 f"{'symmetric' if d.act_symmetric else 'asymmetric'}, calibrated with {d.act_method!r}):\n\n"
                 + cols + "\n" + "\n".join(act_rows))
    return text


def minilm_act_methods(methods, quick: bool) -> list[str]:
    """The methods of ``methods`` with MiniLM weight + activation rows (``--quick`` leaves out GPTQ)."""
    return [m for m in ("rtn", "gptq", "erq") if m in methods and not (quick and m == "gptq")]


def _time(fn, reps=2):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------ (b) EfficientNet-Lite0
# skimage's grayscale photos (camera man, brick, grass, gravel, moon, coins, clock), replicated to
# RGB: extra calibration images only (the evaluation images stay the same as before)
EFFNET_CAL_GRAY = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock")


def _images(extra_cal: bool = True):
    """(calibration images, evaluation images): lists of (name, uint8 [H, W, 3]) from disjoint photos.

    Colour photos: sklearn china / flower and skimage's colour images; every third one
    (flower, coffee, retina, colorwheel) calibrates, the others evaluate (each distinct photo
    once: skimage's ``cat`` is ``chelsea``). ``extra_cal``: the
    calibration set also gets the grayscale photos of :data:`EFFNET_CAL_GRAY` (as RGB).
    """
    import numpy as np

    imgs = [("sklearn:" + n, im) for n, im in zip(("china", "flower"), sample_photos())]
    gray = []
    try:
        import skimage.data as sd

        # images bundled with the skimage wheel only: "skin" / "lily" are fetched from the network by
        # pooch where it is installed (the image set, so every number, then depended on the machine),
        # and without it skimage calls pytest.skip under pytest (the tests of _images were skipped)
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                     "immunohistochemistry", "cat", "colorwheel", "logo"):
            try:
                im = np.asarray(getattr(sd, name)())
            except Exception:  # noqa: BLE001  (absent in this skimage version / needs pooch)
                continue
            if im.ndim == 3 and im.shape[2] >= 3 and im.dtype == np.uint8 and min(im.shape[:2]) >= 128:
                imgs.append(("skimage:" + name, im[..., :3]))
        for name in (EFFNET_CAL_GRAY if extra_cal else ()):
            try:
                im = np.asarray(getattr(sd, name)())
            except Exception:  # noqa: BLE001
                continue
            if im.ndim == 2 and im.dtype == np.uint8 and min(im.shape) >= 128:
                gray.append(("skimage:" + name + "(gray)", np.repeat(im[..., None], 3, axis=2)))
    except ImportError:
        pass
    if len(imgs) >= 4:
        cal = imgs[1::3]
        ev = [x for i, x in enumerate(imgs) if i % 3 != 1]
    else:  # sklearn only: one photo each
        cal, ev = imgs[:1], imgs[1:]
    # skimage's cat is chelsea (one photo, two names): keep an evaluation photo once, and never
    # one that also calibrates
    seen, unique = {hash(im.tobytes()) for _, im in cal}, []
    for name, im in ev:
        h = hash(im.tobytes())
        if h not in seen:
            seen.add(h)
            unique.append((name, im))
    return cal + gray, unique


def _crops(imgs, n, seed, jitter: bool = False, min_frac: float = 0.35):
    """``n`` random square crops (side ``min_frac``..1 of the short side, random position, flip
    with p 0.5), cycling over ``imgs``, preprocessed to ``[n, 3, 224, 224]``. ``jitter``: also a random
    per-channel gain in [0.8, 1.2] (colour / brightness; calibration crops only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        _, im = imgs[i % len(imgs)]
        H, W = im.shape[:2]
        s = int(min(H, W) * (min_frac + (1 - min_frac) * torch.rand((), generator=g).item()))
        y = int(torch.randint(0, H - s + 1, (), generator=g))
        x = int(torch.randint(0, W - s + 1, (), generator=g))
        c = torch.from_numpy(im[y:y + s, x:x + s].copy())
        if torch.rand((), generator=g).item() < 0.5:
            c = c.flip(1)
        if jitter:
            c = (c.float() * (0.8 + 0.4 * torch.rand(3, generator=g))).clamp(0, 255)
        out.append(efficientnet_preprocess(c))
    return torch.cat(out)


def _logits(m, X, bs=32):
    with torch.inference_mode():
        return torch.cat([m(X[i:i + bs]) for i in range(0, X.shape[0], bs)])


def _agree_kl(L, L0, conf: float = 0.5):
    """(top-1 agreement with fp32 over all eval crops, mean KL(fp32 || quantized), top-1 agreement
    over the crops where fp32's top-1 probability is > ``conf``, number of those crops)."""
    same = L.argmax(1) == L0.argmax(1)
    kl = F.kl_div(L.log_softmax(1), L0.log_softmax(1), log_target=True, reduction="none").sum(1).mean().item()
    sure = L0.softmax(1).amax(1) > conf
    agree_conf = same[sure].float().mean().item() if sure.any() else float("nan")
    return same.float().mean().item(), kl, agree_conf, int(sure.sum())


# EfficientNet-Lite0's first and last layers, for the labelled "stem/classifier at 8 bits" rows
EFFNET_EDGE_W8 = {"_conv_stem": 8, "_fc": 8}
CALIBRATORS = ("max", "percentile", "mse", "entropy")
# crops: (calibration, evaluation), full run and --quick
EFFNET_CROPS = {"full": (256, 256), "quick": (16, 32)}
# end-to-end distillation of the group scales / zeros (codes fixed) after HQQ: the best all-W4 method
EFFNET_KD = {"distill_steps": 150, "distill_batch": 8, "distill_lr": 3e-4}
# float-model targets (fake_quantize_model_'s fp_target): each layer re-fitted to the float model's outputs
# on the quantized model's inputs before it is quantized (ridge 0.1 relative)
EFFNET_FP = {"fp_target": True, "fp_target_damp": 0.1}
# the data-free row: calibration inputs synthesized from the model's BatchNorm statistics
# (ptq.synthesize_inputs; 160x160: the fully convolutional net takes them at half the cost of 224x224)
EFFNET_SYN = {"n": 64, "shape": (3, 160, 160), "steps": 150, "batch_size": 16}
# the mixed-precision rows: W4, and W8 on the layers ptq.layer_sensitivity ranks first (HQQ one layer at a time,
# KL on the first ``crops`` calibration crops), within ``extra`` code bits per weight above the row's bits
# (ptq.allocate_bits; W4 + 0.1: 4.1 bits per weight)
EFFNET_MIXED = {"extra": 0.1, "bits": (4, 8), "crops": 32}
# rows of the weight-only table (``rows=`` of effnet_table; None there: every row of the given methods)
EFFNET_ROWS = ("rtn", "hqq", "gptq", "erq", "adaround", "hqq_bc", "hqq_fp", "gptq_hqqparams", "hybrid", "hybrid_w8",
               "kd", "kd_bias", "kd_w8", "hybrid_kd", "hybrid_fp", "hybrid_fp_syn", "hqq_mixed", "hybrid_fp_mixed")
# the rows ``python -m quantkern demo`` computes unless ``--effnet-rows all``: each method of the issue plus
# the best HQQ-based and the best overall all-W4 row, both with float targets, and the latter with no image
# (synthesized inputs); HQQ and the best row with W8 on the most sensitive layers (mixed precision, labelled).
# The others are ablations, the KD rows among them, which float targets replaced as the best: about 50 more minutes
EFFNET_DEFAULT_ROWS = ("rtn", "hqq", "gptq", "erq", "hqq_fp", "hybrid_fp", "hybrid_fp_syn", "hqq_mixed",
                       "hybrid_fp_mixed")
# effnet_table's ``parts``: the weight-only table, the weight + activation table
EFFNET_PARTS = ("weights", "acts")
# rows --quick leaves out: the GPTQ / ERQ / AdaRound passes (minutes on 2 cores) and all KD rows but one
EFFNET_QUICK_SKIP = ("gptq", "erq", "adaround", "hqq_bc", "gptq_hqqparams", "hybrid", "hybrid_w8", "kd", "kd_w8",
                     "hybrid_kd", "hybrid_fp", "hybrid_fp_syn", "hqq_mixed", "hybrid_fp_mixed")


def effnet_rows_run(methods, rows=None, quick: bool = False, bits=None) -> list[str]:
    """The weight-only rows (keys of :data:`EFFNET_ROWS`, in table order) that :func:`effnet_table`
    computes for ``methods`` and ``rows`` (None: all): a method's own row, "adaround" whenever asked
    for, "hqq_bc" / "hqq_fp" / "kd*" / "hqq_mixed" with "hqq" in ``methods``, "gptq_hqqparams" / "hybrid*" with
    "gptq";
    ``quick`` leaves out :data:`EFFNET_QUICK_SKIP`; ``bits`` (the table's bit widths; None: any) leaves
    out the mixed-precision rows when none is below 8 (W8 has no wider width to give)."""
    rows = EFFNET_ROWS if rows is None else rows
    order = [m for m in methods if m in METHOD_LABEL] + ["adaround"]
    order += ["hqq_bc", "hqq_fp", "kd", "kd_bias", "kd_w8", "hqq_mixed"] if "hqq" in methods else []
    order += ["gptq_hqqparams", "hybrid", "hybrid_w8", "hybrid_kd", "hybrid_fp", "hybrid_fp_syn", "hybrid_fp_mixed"] \
        if "gptq" in methods else []
    no_mixed = bits is not None and not any(b < 8 for b in bits)
    return [k for k in order if k in rows and not (quick and k in EFFNET_QUICK_SKIP)
            and not (no_mixed and k in ("hqq_mixed", "hybrid_fp_mixed"))]


def _hybrid(model, bits, group_size, Xc, layer_bits=None):
    """HQQ on the depthwise convs, then sequential GPTQ on every other layer (which sees them quantized)."""
    from .ptq.conv import fake_quantize_model_

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    with _quiet():
        fake_quantize_model_(m, bits, "gptq", group_size, calib_data=Xc, depthwise_method="hqq",
                             layer_bits=layer_bits, progress=False)
    return m, time.perf_counter() - t0


@contextlib.contextmanager
def _quiet():
    """The demo's quantization calls run without warnings (the tables say what each row is; e.g. the
    hqq init-clamp warning names the layers HQQ / RTN coarsen, which is those methods' definition)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def effnet_table(methods, bits_list, quick=False, group_size=64, out=print, act_weight_method="hqq",
                 parts=("weights", "acts"), rows=None, crops=None):
    """Two EfficientNet-Lite0 tables (markdown): weight-only W``bits`` x methods, then W8A8 / W4A8 x calibrators.

    Every Conv2d / Linear is fake-quantized by :func:`quantkern.ptq.conv.fake_quantize_model_`
    (group size: the largest divisor of I*kh*kw <= ``group_size``). Metrics against fp32 on
    evaluation crops from images disjoint from the calibration images: top-1 agreement over all
    crops, mean KL(fp32 || q), and top-1 agreement over the crops where fp32's top-1 probability
    is > 0.5. ``methods``: keys of :data:`METHOD_LABEL` (a list, or a comma list in a string);
    ``bits_list``: weight bits of :data:`EFFNET_BITS`. ``parts``: which tables to compute, of
    :data:`EFFNET_PARTS`. ``rows``: keys of :data:`EFFNET_ROWS` for the weight-only table (None: all
    rows the ``methods`` allow; :func:`effnet_rows_run` says which run). ``act_weight_method``: the
    weights' method (of :data:`METHOD_LABEL`) in the activation table. ``crops``: (calibration,
    evaluation) crop counts, ints >= 1, default :data:`EFFNET_CROPS`. Arguments are checked
    before the model loads.
    """
    from .ptq.conv import fake_quantize_model_
    from .ptq.mixed import allocate_bits, average_bits, layer_sensitivity
    from .ptq.synthesize import synthesize_inputs

    parts = _choices("parts", parts, EFFNET_PARTS)
    weights = "weights" in parts  # methods / bits only matter to the weight-only table
    methods = _choices("methods", methods, METHOD_LABEL, empty_ok=not weights)
    bits_list = _choices("bits_list", bits_list, EFFNET_BITS, empty_ok=not weights)
    rows = set(EFFNET_ROWS if rows is None else _choices("rows", rows, EFFNET_ROWS))
    _choices("act_weight_method", [act_weight_method], METHOD_LABEL)
    n_cal, n_ev = crops or EFFNET_CROPS["quick" if quick else "full"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (n_cal, n_ev)):
        raise ValueError(f"crops: (calibration, evaluation) crop counts must be ints >= 1, got {crops!r}")
    runs = effnet_rows_run(methods, rows, quick)

    model = load_efficientnet_lite0("cpu")
    cal_imgs, ev_imgs = _images()
    Xc, Xe = _crops(cal_imgs, n_cal, seed=0, jitter=True), _crops(ev_imgs, n_ev, seed=1)
    L0 = _logits(model, Xe)
    n_conf = int((L0.softmax(1).amax(1) > 0.5).sum())
    kd = dict(EFFNET_KD, distill_steps=10) if quick else EFFNET_KD
    kd_note = f"{kd['distill_steps']} Adam steps, batch {kd['distill_batch']}, lr {kd['distill_lr']:g}"
    lines = []
    Xs, ts = None, 0.0  # the synthesized calibration inputs (row hybrid_fp_syn), made once, and their time
    mixed = {}  # bits -> (layer_bits, config label, note, seconds) of the mixed-precision rows, measured once

    def mixed_plan(bits):
        if bits not in mixed:  # once per bit width; its time goes into each mixed row
            t0 = time.perf_counter()
            sens = layer_sensitivity(model, Xc[:EFFNET_MIXED["crops"]], (bits,) + EFFNET_MIXED["bits"][1:],
                                     "hqq", group_size, metric="kl", batch_size=32, progress=False)
            lb = allocate_bits(model, sens, bits + EFFNET_MIXED["extra"])
            tm, hi = time.perf_counter() - t0, max(lb.values())
            note = (f"not all-W{bits}: {sum(b > bits for b in lb.values())} of {len(lb)} layers at W{hi} by measured "
                    f"sensitivity (ptq.layer_sensitivity on {EFFNET_MIXED['crops']} calibration crops + allocate_bits, "
                    f"{tm:.0f} s of the time)")
            mixed[bits] = (lb, f"W{bits}/W{hi} {average_bits(model, lb):.2f} bits g<={group_size}", note, tm)
        return mixed[bits]

    def row(label, cfg, m, tq, note):
        agree, kl, agree_c, _ = _agree_kl(_logits(m, Xe), L0)
        conf = "-" if agree_c != agree_c else f"{100 * agree_c:.1f}%"  # NaN: no confident crop
        lines.append(f"| {label} | {cfg} | {100 * agree:.1f}% | {kl:.4f} | {conf} | {tq:.1f} | {note} |")
        out(lines[-1])

    def quantized(bits, method, calib=None, **kw):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        with _quiet():
            fake_quantize_model_(m, bits, method, group_size, calib_data=Xc if calib is None else calib,
                                 progress=False, **kw)
        return m, time.perf_counter() - t0

    # (1) weight-only, every conv / linear at W``bits``
    # ``runs`` (effnet_rows_run) says which rows run; the blocks below keep its order
    for bits in (bits_list if weights else ()):
        lab = f"W{bits} g<={group_size}"
        # AdaRound is a row, not a --methods entry: it runs whenever the rows ask for it
        for method in list(methods) + ["adaround"]:
            if method not in runs:
                continue
            kw = {"clip": "hqq", "adaround_iters": 300, "adaround_lr": 3e-2, "adaround_lambda": 0.1} \
                if method == "adaround" else {}
            m, tq = quantized(bits, method, **kw)
            note = "all layers" + ("; depthwise convs: batched GPTQ" if method == "erq" else "") + \
                ("; HQQ params, 300 Adam steps per layer" if method == "adaround" else "")
            row(METHOD_LABEL.get(method, "AdaRound").split(" (")[0], lab, m, tq, note)
        if "hqq" in methods:
            kd_rows = [("kd", "HQQ + KD of scales/zeros", {}, None),
                       ("kd_bias", "HQQ + KD of scales/zeros + BN biases", {"distill_bias": True}, None),
                       ("kd_w8", "HQQ + KD of scales/zeros", {}, EFFNET_EDGE_W8)]
            if "hqq_bc" in runs:
                m, tq = quantized(bits, "hqq", bias_correction=True)
                row("HQQ + bias correction", lab, m, tq, "all layers")
            if "hqq_fp" in runs:
                m, tq = quantized(bits, "hqq", **EFFNET_FP)
                row("HQQ, float targets", lab, m, tq, "all layers; each layer re-fitted to fp32's outputs, then HQQ")
            for key, label, extra, edge in kd_rows:
                if key in runs:  # --quick: one KD row (kd_bias), 10 steps
                    m, tq = quantized(bits, "hqq", layer_bits=edge, **kd, **extra)
                    row(label, lab + (", stem + fc W8" if edge else ""), m, tq,
                        ("not all-W4: stem conv and classifier at 8 bits; " if edge else "all layers; ") + kd_note)
            if "hqq_mixed" in runs and bits < 8:  # (W8 has no wider width to give)
                lb, cfg, note, tm = mixed_plan(bits)
                m, tq = quantized(bits, "hqq", layer_bits=lb)
                row("HQQ, W8 on the most sensitive layers", cfg, m, tq + tm, note)
        if "gptq" in methods:
            if "gptq_hqqparams" in runs:
                m, tq = quantized(bits, "gptq", clip="hqq")
                row("GPTQ, HQQ params on depthwise", lab, m, tq, "all layers; depthwise GPTQ from HQQ's scale/zero")
            for key, edge in (("hybrid", None), ("hybrid_w8", EFFNET_EDGE_W8)):
                if key in runs:
                    m, tq = _hybrid(model, bits, group_size, Xc, edge)
                    row("GPTQ dense + HQQ depthwise", lab + (", stem + fc W8" if edge else ""), m, tq,
                        "not all-W4: stem conv and classifier at 8 bits" if edge else "all layers")
            if "hybrid_kd" in runs:
                m, tq = quantized(bits, "gptq", depthwise_method="hqq", distill_bias=True, **kd)
                row("GPTQ dense + HQQ depthwise + KD of scales/zeros + BN biases", lab, m, tq, "all layers; " + kd_note)
            if "hybrid_fp" in runs:
                m, tq = quantized(bits, "gptq", depthwise_method="hqq", **EFFNET_FP)
                row("GPTQ dense + HQQ depthwise, float targets", lab, m, tq,
                    "all layers; each layer re-fitted to fp32's outputs, then quantized")
            if "hybrid_fp_syn" in runs:
                if Xs is None:  # once per table; its time goes into every bit width's row
                    t0 = time.perf_counter()
                    Xs = synthesize_inputs(model, **EFFNET_SYN, progress=False)
                    ts = time.perf_counter() - t0
                m, tq = quantized(bits, "gptq", depthwise_method="hqq", calib=Xs, **EFFNET_FP)
                row("GPTQ dense + HQQ depthwise, float targets, synthesized inputs", lab, m, tq + ts,
                    f"all layers; no image: {EFFNET_SYN['n']} inputs synthesized from the BatchNorm statistics "
                    f"({ts:.0f} s of the time)")
            if "hybrid_fp_mixed" in runs and bits < 8:  # (W8 has no wider width to give)
                lb, cfg, note, tm = mixed_plan(bits)
                m, tq = quantized(bits, "gptq", depthwise_method="hqq", layer_bits=lb, **EFFNET_FP)
                row("GPTQ dense + HQQ depthwise, float targets, W8 on the most sensitive layers", cfg, m, tq + tm, note)
    # (2) weights + activations: the weights quantized once per bit width, then each calibrator
    rows_before = len(lines)
    # --quick: W8A8 with the two cheap calibrators only (mse / entropy search 2048-bin histograms of 50 layers)
    for wbits in ((8,) if quick else (8, 4)) if "acts" in parts else ():
        mw, tw = quantized(wbits, act_weight_method)
        for cal in (CALIBRATORS[:2] if quick else CALIBRATORS):
            m = copy.deepcopy(mw)
            t0 = time.perf_counter()
            with _quiet():
                fake_quantize_model_(m, None, act_bits=8, act_method=cal, calib_data=Xc, progress=False)
            row(cal, f"W{wbits}A8", m, tw + time.perf_counter() - t0,
                f"weights {METHOD_LABEL[act_weight_method].split(' (')[0]} g<={group_size}")
    wa_rows, lines = lines[rows_before:], lines[:rows_before]
    ev_used, cal_used = ev_imgs[:n_ev], cal_imgs[:n_cal]  # _crops cycles over the images: fewer crops, fewer images
    src = (f"{n_ev} eval crops from {len(ev_used)} images ({', '.join(n for n, _ in ev_used)}); fp32 top-1 "
           f"probability > 0.5 on {n_conf} of them (the 'confident' column). {n_cal} calibration crops (random "
           f"size/position/flip, per-channel gain 0.8-1.2) from {len(cal_used)} other images "
           f"({', '.join(n for n, _ in cal_used)}).")
    cols = ("| top-1 agreement | mean KL(fp32‖q) | agreement, confident crops | quant s | note |\n"
            "|---|---|---|---|---|---|---|")
    head1 = (f"EfficientNet-Lite0, weight-only fake quant of every conv/linear weight, group size = largest divisor "
             f"of I*kh*kw <= {group_size}. {src}\n\n| method | config " + cols)
    head2 = ("EfficientNet-Lite0, static per-tensor 8-bit activation fake quant at the input of every conv/linear "
             "(unsigned after ReLU6, symmetric signed elsewhere), calibrated on the calibration crops."
             + ("" if weights else " " + src) + "\n\n| calibrator | config " + cols)
    # only the tables of ``parts`` (an empty table with its header reads as a failed run)
    tables = ([head1 + "\n" + "\n".join(lines)] if weights else []) + \
        ([head2 + "\n" + "\n".join(wa_rows)] if "acts" in parts else [])
    return "\n\n".join(tables)


def _int_list(text: str) -> list[int]:
    """argparse type: a comma list of ints ('' for none)."""
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def _threads(text: str) -> int:
    """argparse type: a thread count >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m quantkern demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few sentences / crops, W4 weights (plus the MiniLM W4A8 / W4A4 and two EfficientNet W8A8 rows), a smoke test")
    ap.add_argument("--methods", default="rtn,hqq,gptq,erq",
                    help=f"comma list of {', '.join(METHOD_LABEL)} (default: %(default)s; --quick skips GPTQ / ERQ / "
                         "AdaRound on EfficientNet and runs them on MiniLM's first layer only)")
    ap.add_argument("--bits", type=_int_list, default=None,
                    help=f"comma list of weight bits, default 4,3,2 (MiniLM) and 4 (EfficientNet); MiniLM takes "
                         f"{', '.join(map(str, MINILM_BITS))}, EfficientNet {', '.join(map(str, EFFNET_BITS))}: each "
                         "model runs the bits it takes")
    ap.add_argument("--act-bits", type=_int_list, default=[8, 4], help="MiniLM W4A<b> rows with activation "
                    "quantization, comma list of 2-8 ('' for none; default 8,4)")
    ap.add_argument("--threads", type=_threads, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", choices=["minilm", "effnet"], default=None, help="one model's table only")
    ap.add_argument("--effnet-rows", default=",".join(EFFNET_DEFAULT_ROWS),
                    help=f"EfficientNet weight-only rows, comma list of {', '.join(EFFNET_ROWS)}, or 'all' "
                         f"(default: %(default)s)")
    args = ap.parse_args(argv)
    try:  # the tables' own checks, named by option, before any model loads
        eff_rows = None if args.effnet_rows.strip() == "all" else \
            _choices("--effnet-rows", args.effnet_rows, EFFNET_ROWS, hint=", or 'all' alone")
        methods = _choices("--methods", args.methods, METHOD_LABEL)
        args.act_bits = _choices("--act-bits", args.act_bits, MINILM_ACT_BITS, empty_ok=True)
    except ValueError as e:
        ap.error(str(e))
    if args.bits is not None:
        if not args.bits:
            ap.error("--bits: no bit width given")
        args.bits = list(dict.fromkeys(args.bits))  # each width once, in the given order
        for b in args.bits:
            if b not in MINILM_BITS + EFFNET_BITS:
                ap.error(f"--bits: {b} is not one of 1, 2, 3, 4, 8 (MiniLM takes {', '.join(map(str, MINILM_BITS))}, "
                         f"EfficientNet {', '.join(map(str, EFFNET_BITS))})")
        bits_m = [b for b in args.bits if b in MINILM_BITS]
        bits_e = [b for b in args.bits if b in EFFNET_BITS]
        for model, only, usable in (("MiniLM", "minilm", bits_m), ("EfficientNet", "effnet", bits_e)):
            if args.only == only and not usable:
                ap.error(f"--bits: {model} takes none of {','.join(map(str, args.bits))}")
    else:
        bits_m, bits_e = ([4], [4]) if args.quick else ([4, 3, 2], [4])
    if args.threads:
        torch.set_num_threads(args.threads)
    nt = torch.get_num_threads()
    print(f"torch {torch.__version__}, {nt} thread{'s' if nt > 1 else ''}", flush=True)
    if args.only in (None, "minilm") and not bits_m:
        print(f"MiniLM: none of --bits {','.join(map(str, args.bits))} is one it takes "
              f"({', '.join(map(str, MINILM_BITS))}): its table is skipped", flush=True)
    if args.only in (None, "minilm") and bits_m and args.act_bits and not minilm_act_methods(methods, args.quick):
        print(f"MiniLM: --act-bits {','.join(map(str, args.act_bits))} has no rows: the activation rows take "
              f"rtn, gptq or erq from --methods{' (gptq not with --quick)' if args.quick else ''}", flush=True)
    eff_run = effnet_rows_run(methods, eff_rows, args.quick, bits_e)
    why = "each row needs its method in --methods; the mixed-precision rows a width below 8"
    dropped = [r for r in (eff_rows or ()) if r not in eff_run]
    if args.only in (None, "effnet") and eff_run and dropped and args.effnet_rows != ",".join(EFFNET_DEFAULT_ROWS):
        # rows asked for by name that these options leave out (they were dropped without a word)
        print(f"EfficientNet: --effnet-rows {','.join(dropped)} do not run with --methods {','.join(methods)}, "
              f"--bits {','.join(map(str, bits_e))}{' and --quick' if args.quick else ''} ({why})", flush=True)
    if args.only in (None, "effnet") and not eff_run:
        print(f"EfficientNet: none of its weight-only rows runs with --methods {','.join(methods)}, "
              f"--bits {','.join(map(str, bits_e))} and --effnet-rows {args.effnet_rows}"
              + (" (--quick skips " + ", ".join(EFFNET_QUICK_SKIP) + ")" if args.quick else "")
              + f" ({why}): that table stays empty", flush=True)
    tabs = []
    if args.only in (None, "minilm") and bits_m:
        tabs.append(minilm_table(methods, bits_m, args.quick, out=lambda s: print(s, flush=True),
                                 act_bits_list=args.act_bits))
        print("\n" + tabs[-1] + "\n", flush=True)
    if args.only in (None, "effnet"):
        tabs.append(effnet_table(methods, bits_e, args.quick, out=lambda s: print(s, flush=True), rows=eff_rows))
        print("\n" + tabs[-1] + "\n", flush=True)
    return tabs
