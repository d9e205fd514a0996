"""Quantization-aware training modules built on :func:`quantkern.ops.fake_quant_lsq`.

* :class:`LSQQuantizer`: learnable LSQ / LSQ+ fake quantizer (scale and offset are
  ``nn.Parameter``), initialised from the first batch (``"lsq"``, ``"lsq+"``, ``"mse"``,
  ``"minmax"``), per tensor, per channel or per group.
* :class:`QuantLinear`, :class:`QuantConv2d`: ``nn.Linear`` / ``nn.Conv2d`` with
  fake-quantized weight and input; build with ``from_float``.
* :func:`quantize_modules`: swap a model's Linear/Conv2d layers in place.
"""
from .lsq import LSQQuantizer, qrange
from .quant_modules import QuantConv2d, QuantLinear, quantize_modules

__all__ = ["LSQQuantizer", "QuantLinear", "QuantConv2d", "quantize_modules", "qrange"]
