"""The device the Triton test files run their kernels on: CUDA where there is a GPU, else the CPU
under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); without either the calling test module is skipped."""
import os

import pytest
import torch


def triton_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
