"""Loads the compiled kernels (quantkern._C) and says clearly when they are missing."""
from __future__ import annotations

import importlib
import warnings

_C = None
LOAD_ERROR: str | None = None


def load() -> None:
    global _C, LOAD_ERROR
    try:
        _C = importlib.import_module("quantkern._C")
    except ImportError as e:  # keep the package importable: reference, Triton and docs still work
        LOAD_ERROR = str(e)
        from ._registry import native_op_names

        warnings.warn(
            "quantkern: the compiled kernels (quantkern._C) could not be loaded "
            f"({e}). The CPU and CUDA kernels of these ops are unavailable: "
            f"{', '.join(native_op_names())}. Build them with "
            "`pip install --no-build-isolation -e .` from the source tree (needs torch, gcc; "
            "nvcc and a CUDA torch for the CUDA kernels).",
            RuntimeWarning,
            stacklevel=3,
        )


def require_native(op: str):
    """Raise a clear error if the native kernels are not built."""
    if _C is None:
        raise RuntimeError(
            f"quantkern.{op}: the native kernels are not built ({LOAD_ERROR}); run "
            "`pip install --no-build-isolation -e .`, or pass backend='triton' on a GPU."
        )
    return _C
