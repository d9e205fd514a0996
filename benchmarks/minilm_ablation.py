"""MiniLM ablation of quantize_ settings: mean embedding cosine to fp32 (the demo's setup).

``python benchmarks/minilm_ablation.py --bits 4,3,2 'gptq' 'gptq clip=mse refit=True' ...``
Each positional argument is a method followed by ``key=value`` QuantizeConfig overrides
(values parsed as Python literals, so no spaces inside one: ``layer_config={'*.output.dense':{'bits':4}}``). Calibration (``--calib``): "even" (the 110 even demo
sentences), "pydoc:N" (the first N sentences of ``load_calibration_texts()``) or
"even+pydoc:N" (both); batches of 32 in order, or length-sorted batches of ``--batch``
(one callable each); evaluation: the 110 odd demo sentences; group size 64, every Linear.
"""
import argparse
import ast
import copy
import time
import warnings

import torch
import torch.nn.functional as F

from quantkern.demo import _model_mb, st_features
from quantkern.ptq import QuantizeConfig, quantize_
from quantkern.ptq.models import load_calibration_texts, load_minilm, load_sentences


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="length-sorted batches of this size (0: 32 in order)")
    ap.add_argument("--calib", default="even", help="even | pydoc:N | even+pydoc:N")
    a = ap.parse_args()
    if a.threads < 1:
        ap.error(f"--threads must be >= 1, got {a.threads}")
    if a.batch < 0:
        ap.error(f"--batch must be >= 0, got {a.batch}")
    # every config checked before the model loads (an unknown method or --bits 9 failed after minutes)
    try:
        bits_list = [int(b) for b in a.bits.split(",")]
    except ValueError:
        ap.error(f"--bits must be a comma list of ints, got {a.bits!r}")
    specs = []
    for spec in a.configs:
        try:
            method, *kvs = spec.split()
            over = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in kvs)}
            for bits in bits_list:
                QuantizeConfig(method=method, bits=bits, group_size=64, **over).validate()
        except (ValueError, TypeError, SyntaxError) as e:
            ap.error(f"config {spec!r}: {e}")
        specs.append((spec, method, over))
    for part in a.calib.split("+"):
        if part != "even" and not (part.startswith("pydoc:") and part[6:].isdigit()):
            ap.error(f"bad --calib part {part!r} (even | pydoc:N | even+pydoc:N)")
    torch.set_num_threads(a.threads)
    model = load_minilm("cpu")
    sents = load_sentences()
    evals = sents[1::2]
    calib = []
    for part in a.calib.split("+"):
        if part == "even":
            calib += sents[0::2]
        elif part.startswith("pydoc:"):
            calib += load_calibration_texts(int(part.split(":")[1]))
        else:
            ap.error(f"bad --calib part {part!r}")
    if a.batch:
        from quantkern.demo import minilm_calib_units

        units, ntok, nrows = minilm_calib_units(model, calib, a.batch)
        print(f"calibration: {ntok} tokens ({nrows - ntok} padding rows left out by the attention mask)", flush=True)
    else:  # the earlier demo's batches: 32 in input order
        feats = [st_features(model, calib[i:i + 32]) for i in range(0, len(calib), 32)]
        units = [(lambda f: (lambda m: m(dict(f))))(f) for f in feats]

    def enc(m):
        with torch.inference_mode():
            return m.encode(evals, batch_size=64, convert_to_tensor=True, show_progress_bar=False).float()

    E0 = enc(model)
    for spec, method, over in specs:
        res = []
        for bits in bits_list:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(m, QuantizeConfig(method=method, bits=bits, group_size=64, **over), calib_fn=units,
                          progress=False)
            cos = F.cosine_similarity(enc(m), E0, dim=1).mean().item()
            res.append(f"W{bits} {cos:.4f} ({time.perf_counter() - t0:.0f}s, {_model_mb(m):.1f} MB)")
        print(f"{spec:60s} | " + " | ".join(res), flush=True)


if __name__ == "__main__":
    main()
