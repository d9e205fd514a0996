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


def test_emulated_avx512_table():
    """"avx512emu" (the AVX-512 kernels on SIMDe) is built wherever simde-py was installed at build time
    (scripts/setup.sh installs it), settable on any AVX2 CPU, and never what "auto" picks."""
    import importlib.util

    from quantkern import ops

    emu = ops.emulated_cpu_capabilities()
    assert set(emu) <= {"avx512emu"}
    if importlib.util.find_spec("simde_py") is not None and "avx2" in quantkern.cpu_capabilities():
        assert emu == ["avx512emu"]
    assert "avx512emu" not in quantkern.cpu_capabilities()
    try:
        for c in emu:
            assert quantkern.set_cpu_capability(c) == c == quantkern.get_cpu_capability()
        assert quantkern.set_cpu_capability("auto") == quantkern.cpu_capabilities()[0]
    finally:
        quantkern.set_cpu_capability("auto")


def test_emulated_avx512_matches_native_bits():
    """Where the CPU has AVX-512 too, the emulated table gives the native one's bits (AMX off: it has no
    emulation; features the CPU lacks off in both, since the emulated table has them all): the VNNI
    GEMV, the AVX512-BF16 GEMM, the fp32 paths, LSQ+ fake-quant and HQQ."""
    import os

    import pytest

    from quantkern import PackedWeight, ops

    if "avx512" not in quantkern.cpu_capabilities() or "avx512emu" not in ops.emulated_cpu_capabilities():
        pytest.skip("needs a CPU with AVX-512 and the emulated table")
    with open("/proc/cpuinfo") as f:
        gfni = " gfni" in f.read()
    before = ops.cpu_features()  # {name: (detected, on)}
    env_off = set(os.environ.get("QUANTKERN_DISABLE_CPU_FEATURES", "").split(","))
    off = {"amx"} | {n for n, (det, _) in before.items() if not det} | (set() if gfni else {"vnni"})
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 320, generator=g)
    x = torch.randn(33, 320, generator=g)
    s, b = torch.rand(40, generator=g) * 0.1 + 0.01, torch.randn(40, generator=g) * 0.01
    out = {}
    try:
        for n in off:
            ops.set_cpu_feature(n, False)
        for cap in ("avx512", "avx512emu"):
            quantkern.set_cpu_capability(cap)
            res = []
            for bits in (2, 3, 4):
                pw = PackedWeight.from_float(W, bits, 64)
                for dt in (torch.float32, torch.float16, torch.bfloat16):
                    for M in (1, 3, 8, 33):
                        res.append(ops.packed_linear(x[:M].to(dt), pw))
            res.append(ops.fake_quant_lsq(W, s, b, -8, 7, axis=0))
            res.extend(ops.hqq_quantize(W, 4, 64))
            out[cap] = res
    finally:
        for n in off:  # back to the state before: on where detected and on, else as the environment says
            det, on = before[n]
            ops.set_cpu_feature(n, on if det else n not in env_off)
        quantkern.set_cpu_capability("auto")
    for a, e in zip(out["avx512"], out["avx512emu"]):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                           e.view(torch.uint8) if e.dtype != torch.uint8 else e)


def test_unknown_cpu_capability_raises():
    import pytest

    with pytest.raises(ValueError, match="not supported on this CPU"):
        quantkern.set_cpu_capability("avx1024")
