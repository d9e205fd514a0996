// The AVX-512 build of every span kernel (isa_avx512.cpp) compiled for AVX2 with SIMDe
// (github.com/simd-everywhere/simde; headers from the simde-py package): each _mm512_* intrinsic
// becomes SIMDe's portable form of it. Why: the AVX-512 kernels (VNNI GEMV, AVX512-BF16 GEMM, and
// every other span kernel's 512-bit form) are what a Xeon or Zen 4 runs, and a host without AVX-512
// could otherwise never run their tests. Never picked by "auto": tests force it with
// quantkern.set_cpu_capability("avx512emu"). AMX has no emulation, so this table never plans the
// AMX GEMM; it reports VNNI, VBMI, GFNI and AVX512-BF16 as present (each switchable as on hardware).
// Built only where setup.py finds SIMDe (QK_HAVE_SIMDE); otherwise the table is absent.
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(QK_HAVE_SIMDE)
// GCC's own declarations first, so that SIMDe's aliases (macros) below only rename our calls.
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c")
// -O1: SIMDe's headers make this the slowest file to compile (about 4 min at -O2 on one core, 2 at
// -O1); it serves tests only. Float results do not depend on the level (-ffp-contract=off).
#pragma GCC optimize("O1")
// `#pragma GCC target` does not define these; SIMDe reads them to use the native AVX2 forms.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __POPCNT__ 1
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/gfni.h>
#include "simde_shim.h"

#define QK_ISA_AVX512 1
#define QK_ISA_EMU 1
#define QK_ISA_NS avx512emu
#define QK_ISA_NAME "avx512emu"
#include "isa_kernels.inc"

const qk::IsaTable* qk::isa_table_avx512emu() { return &qk::avx512emu::kTable; }
#else
#include "isa.h"
const qk::IsaTable* qk::isa_table_avx512emu() { return nullptr; }
#endif
