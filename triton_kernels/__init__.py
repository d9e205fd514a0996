"""Triton kernels of quantkern, installed as the package ``quantkern.triton_kernels``.

Importing this package registers every ``quantkern::<op>_triton`` kernel: on CUDA, and on
CPU when ``TRITON_INTERPRET=1`` is set before triton is imported (testing under the
Triton interpreter).
"""
from . import fake_quant_lsq  # noqa: F401
from . import calibrate  # noqa: F401
from . import hqq  # noqa: F401
from . import oscillation  # noqa: F401
from . import packed_linear  # noqa: F401
