"""Shared pytest setup for the quantkern test suite."""
import os

import torch

# The Triton kernels run on CPU under the Triton interpreter when there is no GPU.
# TRITON_INTERPRET is read when a @triton.jit function is defined, so it must be set
# here, at conftest import time, before any test module imports triton or
# quantkern.triton_kernels. An explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
