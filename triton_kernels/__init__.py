"""Triton kernels, installed as quantkern.triton_kernels; importing registers the quantkern::<op>_triton kernels."""
from . import hqq  # noqa: F401
