"""Checks a CUDA build of quantkern without a GPU (DESIGN.md section 5).

Run by .ci/cuda_build.sh with the CUDA torch and the freshly built tree on
PYTHONPATH. Asserts that quantkern._C was compiled with the CUDA kernels and
that every native op (quantkern._registry.native_op_names()) has a kernel
registered for both the CUDA and the CPU dispatch keys. Prints a table; exits
non-zero on anything missing.
"""
from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    import quantkern
    from quantkern import _registry

    # Import _C directly: quantkern's own loader only warns when it is missing.
    import quantkern._C as C

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); quantkern from {os.path.dirname(quantkern.__file__)}")
    print(f"quantkern._C: {C.__file__}")
    ok = True
    if not C.built_with_cuda():
        print("FAIL: quantkern._C.built_with_cuda() is False (built without QUANTKERN_WITH_CUDA)")
        ok = False
    names = _registry.native_op_names()
    if not names:
        print("FAIL: no native ops defined")
        return 1
    keys = ("CPU", "CUDA")
    width = max(len(n) for n in names) + len("quantkern::")
    print(f"{'op':<{width}}  " + "  ".join(f"{k:<5}" for k in keys))
    for name in names:
        qual = f"quantkern::{name}"
        row = []
        for key in keys:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(qual, key)
            ok &= has
            row.append("yes" if has else "NO")
        print(f"{qual:<{width}}  " + "  ".join(f"{r:<5}" for r in row))
    print("check_cuda_build: " + ("OK" if ok else "FAILED: missing kernels above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
