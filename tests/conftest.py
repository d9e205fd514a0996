"""Shared pytest setup for the quantkern test suite."""
import os

# Inductor's on-disk caches key a compiled graph on the Python side only: after a rebuild that
# changed a C++ op's autograd (e.g. which op computes a gradient), a cached backward graph from
# the old build was reused and ran the old ops. Tests compile from scratch (set before
# torch is imported: inductor reads it once).
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch

# The Triton kernels run on CPU under the Triton interpreter when there is no GPU.
# TRITON_INTERPRET is read when a @triton.jit function is defined, so it must be set
# here, at conftest import time, before any test module imports triton or
# quantkern.triton_kernels. An explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a loaded 2-core machine a second thread
    made them ~20x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
