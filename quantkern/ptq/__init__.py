"""Post-training quantization: calibrators, RTN, HQQ, GPTQ, ERQ; data-free calibration inputs; per-layer bit widths."""
from .calibrate import (
    ActQuantizer,
    HistogramCalibrator,
    MaxCalibrator,
    MseCalibrator,
    compute_amax,
    fake_quant,
    fake_quant_dynamic,
    fake_quant_static,
    make_calibrator,
)
from .erq import erq_quantize
from .gptq import HessianAccumulator, gptq_quantize
from .hqq import hqq_dequantize, hqq_quantize, rtn_quantize
from .mixed import allocate_bits, average_bits, layer_sensitivity
from .quantize import QuantizeConfig, load_quantized, quantize_, save_quantized
from .synthesize import bn_statistics_loss, synthesize_inputs

__all__ = [
    "ActQuantizer",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "compute_amax",
    "fake_quant",
    "fake_quant_dynamic",
    "fake_quant_static",
    "make_calibrator",
    "erq_quantize",
    "HessianAccumulator",
    "gptq_quantize",
    "hqq_quantize",
    "rtn_quantize",
    "hqq_dequantize",
    "QuantizeConfig",
    "quantize_",
    "save_quantized",
    "load_quantized",
    "synthesize_inputs",
    "bn_statistics_loss",
    "layer_sensitivity",
    "allocate_bits",
    "average_bits",
]
