"""quantkern: quantization kernels for PyTorch.

Importing quantkern defines every ``torch.ops.quantkern.*`` operator and loads
the compiled CPU/CUDA kernels (``quantkern._C``); Triton kernels register on
first use of ``backend="triton"`` (or import ``quantkern.triton_kernels``).
"""
from . import _registry  # noqa: F401  (defines the operators)
from . import _load

_load.load()

from . import ops, ptq, reference  # noqa: E402
from .ops import (  # noqa: E402
    cpu_capabilities,
    dampening_loss,
    fake_quant_lsq,
    oscillation_init_state,
    oscillation_update,
    get_cpu_capability,
    hqq_quantize,
    set_cpu_capability,
)

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
]
