"""Post-training quantization: calibrators, GPTQ, ERQ (and, on other branches, RTN/HQQ and model conversion)."""
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
]
