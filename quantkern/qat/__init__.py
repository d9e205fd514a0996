"""Quantization-aware training helpers against weight oscillations (Nagel et al. 2022):
oscillation tracking and iterative freezing, dampening, schedules, BN re-estimation,
per-layer metrics and plots. Works with any module that has ``weight`` and
``weight_quantizer`` (quantkern.nn.QuantLinear / QuantConv2d)."""
from ._layers import QLayer, quantized_layers
from .bn import reestimate_bn_stats
from .oscillation import (
    CosineSchedule,
    DampeningLoss,
    OscillationTracker,
    dampening_schedule,
    freeze_threshold_schedule,
)
from .viz import latent_distance_to_edge, plot_latent_distance

__all__ = [
    "OscillationTracker",
    "DampeningLoss",
    "CosineSchedule",
    "freeze_threshold_schedule",
    "dampening_schedule",
    "reestimate_bn_stats",
    "quantized_layers",
    "QLayer",
    "latent_distance_to_edge",
    "plot_latent_distance",
]
