"""Post-training quantization: weight-only solvers (HQQ, RTN)."""
from .hqq import hqq_dequantize, hqq_quantize, rtn_quantize

__all__ = ["hqq_quantize", "rtn_quantize", "hqq_dequantize"]
