"""Inference after QAT: the trained QAT layer itself against its packed form (``convert_qat``).

``python -m benchmarks.bench_qat_convert [--shapes 4096x4096,4096x11008] [--m 1,32] [--threads 2]``

A ``QuantLinear`` in eval mode fake-quantizes its whole weight on every call (one
``fake_quant_lsq`` pass over K x N fp32 values) and then runs a dense ``F.linear``; its
``PackedLinear.from_qat`` form reads the packed 4-bit codes instead (the same integers and input
quantizer). Rows per shape (K x N), M and x dtype: the QAT layer, the packed layer, and the float
``nn.Linear`` it was trained from; median ms of ``--reps`` calls (weights warm: this is the cost
of each layer's work, not a cold-cache measurement; ``bench_packed_linear`` has those), and the
speed-up of each against the QAT layer. W4, groups of 128, A8 per tensor with an offset (LSQ+).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

try:
    from . import _harness as H
except ImportError:  # run as a script
    import _harness as H

from quantkern.nn import PackedLinear, QuantLinear


def _shape(s: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be KxN (e.g. 4096x11008), got {s!r}") from None
    if k <= 0 or n <= 0 or k % 128:
        raise argparse.ArgumentTypeError(f"shape {s!r}: K and N must be positive and K a multiple of 128 (the groups)")
    return k, n


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(ap, threads=2, warmup=2, writes_files=False)
    ap.add_argument("--shapes", type=H.comma_list(_shape), default=None,
                    help="KxN list (default 4096x4096,4096x11008; 512x512 with --quick)")
    ap.add_argument("--m", type=H.comma_list(H.positive_int), default=[1, 32], help="rows of x (default 1,32)")
    ap.add_argument("--dtype", type=H.comma_list(H.one_of(("float32", "bfloat16"))), default=["bfloat16", "float32"],
                    help="x / model dtype list (default bfloat16,float32)")
    a = ap.parse_args(argv)
    if torch.device(a.device).type != "cpu":
        ap.error("bench_qat_convert runs on the CPU (--device cpu)")
    H.apply_common_args(a)
    out = H.table_stream(a)
    H.note_no_files(a, "bench_qat_convert", out)
    shapes = a.shapes or ([(512, 512)] if a.quick else [(4096, 4096), (4096, 11008)])
    print(f"# {H.describe(H.env_info('cpu'))}; weights warm", file=out)
    rows = []
    for K, N in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(K, N)
        for dt in (getattr(torch, d) for d in a.dtype):
            fl = nn.Linear(K, N).to(dt).eval()
            fl.load_state_dict(lin.to(dt).state_dict())
            q = QuantLinear.from_float(fl, w_bits=4, a_bits=8, w_granularity="group", w_group_size=128).eval()
            with torch.no_grad():
                q(torch.randn(64, K, dtype=dt))  # the input quantizer's init (a training batch would do it)
            p = PackedLinear.from_qat(q).eval()
            for M in a.m:
                x = torch.randn(M, K, dtype=dt)
                res = {}
                with torch.no_grad():
                    for name, mod in (("QAT layer (QuantLinear, eval)", q), ("packed (convert_qat)", p),
                                      ("float nn.Linear", fl)):
                        res[name] = H.measure(lambda: mod(x), a.warmup, a.reps).median
                base = res["QAT layer (QuantLinear, eval)"]
                for name, ms in res.items():
                    rows.append({"shape": f"{K}x{N}", "M": M, "dtype": str(dt).replace("torch.", ""), "layer": name,
                                 "ms": ms, "vs QAT": base / ms})
    H.print_table(rows, ["shape", "M", "dtype", "layer", "ms", "vs QAT"], file=out)
    return rows


if __name__ == "__main__":
    main()
