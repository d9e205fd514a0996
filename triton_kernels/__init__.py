"""Triton kernels, installed as quantkern.triton_kernels; importing registers the quantkern::<op>_triton kernels."""
from . import oscillation  # noqa: F401
