"""Loads the compiled kernels (quantkern._C) and says clearly when they are missing."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
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


# ---------------------------------------------------------------- Triton kernels in a source tree
# An install maps the repository's triton_kernels/ to quantkern.triton_kernels (setup.py
# package_dir); a tree built with `setup.py build_ext --inplace` and used from its root has no
# such mapping, so backend="triton" (and "auto" on a GPU) failed to import them there.
_SRC_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SRC_TRITON = os.path.join(_SRC_ROOT, "triton_kernels")


class SourceTritonFinder(importlib.abc.MetaPathFinder):
    """Resolves ``quantkern.triton_kernels`` (and only it) to the source tree's ``triton_kernels/``."""

    NAME = "quantkern.triton_kernels"

    def find_spec(self, name, path=None, target=None):
        init = os.path.join(_SRC_TRITON, "__init__.py")
        if name != self.NAME or not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[_SRC_TRITON])


def map_source_triton_kernels() -> None:
    """Install :class:`SourceTritonFinder` when no installed mapping provides quantkern.triton_kernels."""
    try:
        found = importlib.util.find_spec(SourceTritonFinder.NAME) is not None
    except (ImportError, ValueError):
        found = False
    # only in our source tree (next to setup.py): an installed quantkern sits in site-packages,
    # whose triton_kernels/ is triton's own package of that name
    if not found and os.path.isfile(os.path.join(_SRC_ROOT, "setup.py")) and os.path.isdir(_SRC_TRITON):
        sys.meta_path.append(SourceTritonFinder())
