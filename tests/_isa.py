"""The CPU instruction-set tables the tests run on: what the CPU runs natively, plus "avx512emu" (the
AVX-512 kernels built on SIMDe, csrc/cpu/isa_avx512emu.cpp) where the CPU lacks AVX-512, so that the
512-bit kernels are checked on every host. AMX is never emulated."""
import quantkern
from quantkern import ops

NATIVE = quantkern.cpu_capabilities()
EMULATED = [c for c in ops.emulated_cpu_capabilities() if "avx512" not in NATIVE]
ISAS = NATIVE + EMULATED
# The AVX-512 kernels run here, natively or emulated.
AVX512 = "avx512" if "avx512" in NATIVE else ("avx512emu" if EMULATED else None)
# Environment for a subprocess that should run the AVX-512 kernels (emulated ones must be asked for).
AVX512_ENV = {"QUANTKERN_CPU_CAPABILITY": AVX512} if AVX512 == "avx512emu" else {}
