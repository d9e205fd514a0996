"""Pure-PyTorch reference implementations: the oracle every kernel is tested against.

Readable before fast. Never registered as a kernel.
"""
from . import hqq, oscillation
from .fake_quant_lsq import fake_quant_lsq, fake_quant_lsq_backward, lsq_param_view

__all__ = ["fake_quant_lsq", "fake_quant_lsq_backward", "lsq_param_view", "hqq", "oscillation"]
