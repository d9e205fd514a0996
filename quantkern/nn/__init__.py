"""quantkern.nn: modules (PackedLinear for packed low-bit inference)."""
from .packed_linear import PackedLinear, replace_linear

__all__ = ["PackedLinear", "replace_linear"]
