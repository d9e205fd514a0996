"""quantkern.nn: modules.

* :class:`LSQQuantizer`: learnable LSQ / LSQ+ fake quantizer (scale and offset are
  ``nn.Parameter``), initialised from the first batch (``"lsq"``, ``"lsq+"``, ``"mse"``,
  ``"minmax"``), per tensor, per channel or per group.
* :class:`QuantLinear`, :class:`QuantConv2d`: ``nn.Linear`` / ``nn.Conv2d`` with
  fake-quantized weight and input (QAT); build with ``from_float``.
* :func:`quantize_modules`: swap a model's Linear/Conv2d layers for QAT in place.
* :class:`PackedLinear`, :func:`replace_linear`: packed low-bit inference;
  :func:`convert_qat` (:meth:`PackedLinear.from_qat`): trained QAT layers to their exact packed form.
* :class:`MultiheadAttention`, :func:`unfuse_attention`: ``nn.MultiheadAttention`` with its
  projections as Linear submodules, so the tools above reach them; :func:`conv1d_to_linear`
  (transformers' Conv1D, GPT-2), :func:`plain_linear_subclasses` (Falcon's FalconLinear),
  :func:`expose_linears` (all three).
"""
from .attention import MultiheadAttention, unfuse_attention
from .expose import conv1d_to_linear, expose_linears, plain_linear_subclasses
from .lsq import LSQQuantizer, qrange
from .packed_linear import PackedLinear, replace_linear
from .qat_convert import convert_qat
from .quant_modules import QuantConv2d, QuantLinear, quantize_modules

__all__ = ["LSQQuantizer", "QuantLinear", "QuantConv2d", "quantize_modules", "qrange", "PackedLinear", "replace_linear", "convert_qat",
           "MultiheadAttention", "unfuse_attention", "conv1d_to_linear", "expose_linears",
           "plain_linear_subclasses"]
