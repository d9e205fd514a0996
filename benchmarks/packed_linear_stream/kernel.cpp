// The library's AVX-512 VNNI GEMV (csrc/cpu/packed_kernel.h, bf16 x and metadata) as plain C
// functions: `run` (M = 1, x prepared per call) for driver.cpp, `run_hot` (M rows of x prepared
// once, then `reps` GEMVs) for hot_driver.cpp. Build it against a copy of the headers (-I) to A/B
// a change.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define QK_ISA_AVX512 1
#define QK_ISA_NS avx512
#define QK_ISA_NAME "avx512"
#include "isa.h"
#include "simd.h"  // before packed_kernel.h, which uses its vector types
#include "packed_kernel.h"
using namespace qk;
using namespace qk::avx512;

static PackedW packed(const uint8_t* qw, const void* s, const void* z, int bits, long K, long N, long gs) {
  return packed_w(qw, s, z, Dt::BF16, N, K, bits, gs);
}

extern "C" void run(const uint8_t* qw, const void* s, const void* z, const uint16_t* x, uint16_t* y, int bits, long K,
                    long N, long gs, uint8_t* ws) {
  const PackedW P = packed(qw, s, z, bits, K, N, gs);
  vnni_prep(P, Dt::BF16, x, K, 0, 1, ws);
  vnni_gemv_rows(P, ws, 1, 0, N, Dt::BF16, y, N, nullptr);
}

extern "C" void run_hot(const uint8_t* qw, const void* s, const void* z, const uint16_t* x, uint16_t* y, int bits,
                        long K, long N, long gs, uint8_t* ws, int reps, int M) {
  const PackedW P = packed(qw, s, z, bits, K, N, gs);
  vnni_prep(P, Dt::BF16, x, K, 0, M, ws);
  for (int r = 0; r < reps; ++r) vnni_gemv_rows(P, ws, M, 0, N, Dt::BF16, y, N, nullptr);
}
