"""quantkern: quantization kernels for PyTorch.

Importing quantkern defines every ``torch.ops.quantkern.*`` operator and loads
the compiled CPU/CUDA kernels (``quantkern._C``); Triton kernels register on
first use of ``backend="triton"`` (or import ``quantkern.triton_kernels``).
"""
from . import _registry  # noqa: F401  (defines the operators)
from . import _load

_load.load()
_load.map_source_triton_kernels()  # a source tree used in place: quantkern.triton_kernels resolves too

from . import ops, ptq, reference  # noqa: E402
from .ops import (  # noqa: E402
    cpu_capabilities,
    dampening_loss,
    dequantize,
    fake_quant_lsq,
    oscillation_init_state,
    oscillation_update,
    get_cpu_capability,
    hqq_quantize,
    pack,
    packed_linear,
    set_cpu_capability,
    unpack,
)
from .packed import PackedWeight, load_packed, save_packed  # noqa: E402
from . import formats, nn  # noqa: E402
from .ptq.quantize import QuantizeConfig, load_quantized, quantize_, save_quantized  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "fake_quant_lsq",
    "oscillation_init_state",
    "oscillation_update",
    "dampening_loss",
    "hqq_quantize",
    "ptq",
    "cpu_capabilities",
    "get_cpu_capability",
    "set_cpu_capability",
    "PackedWeight",
    "save_packed",
    "load_packed",
    "pack",
    "unpack",
    "dequantize",
    "packed_linear",
    "formats",
    "nn",
    "QuantizeConfig",
    "quantize_",
    "save_quantized",
    "load_quantized",
]
