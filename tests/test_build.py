"""What was really built: the compiled library, its kernels per device, the CPU variants."""
import torch

import quantkern
from quantkern import _load, _registry


def test_native_library_loaded():
    assert _load._C is not None, _load.LOAD_ERROR


def test_every_native_op_has_a_cpu_kernel():
    names = _registry.native_op_names()
    assert "fake_quant_lsq" in names and "fake_quant_lsq_backward" in names
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkern::{n}", "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


def test_cuda_kernels_match_build_flag():
    has = [torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkern::{n}", "CUDA") for n in _registry.native_op_names()]
    if _load._C.built_with_cuda():
        assert all(has)
    else:
        assert not any(has), "CUDA kernels registered although _C was built without CUDA"


def test_reference_is_never_registered():
    # A missing kernel must fail loudly rather than silently run the oracle.
    for n in _registry.op_names():
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkern::{n}", "CompositeImplicitAutograd")


def test_cpu_capabilities():
    caps = quantkern.cpu_capabilities()
    assert caps[-1] == "scalar"
    try:
        for c in caps:
            assert quantkern.set_cpu_capability(c) == c
            assert quantkern.get_cpu_capability() == c
    finally:
        quantkern.set_cpu_capability("auto")
    assert quantkern.get_cpu_capability() == caps[0]


def test_unknown_cpu_capability_raises():
    import pytest

    with pytest.raises(ValueError, match="not supported on this CPU"):
        quantkern.set_cpu_capability("avx1024")
