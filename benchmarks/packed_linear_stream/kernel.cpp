// The library's AVX-512 VNNI GEMV (csrc/cpu/packed_kernel.h, M = 1, bf16 x and metadata) as a
// plain C function for driver.cpp. Build it against a copy of the headers (-I) to A/B a change.
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

extern "C" void run(const uint8_t* qw, const void* s, const void* z, const uint16_t* x, uint16_t* y, int bits, long K,
                    long N, long gs, uint8_t* ws) {
  PackedW P;
  P.N = N;
  P.K = K;
  P.nb = K / 32;
  P.row_bytes = P.nb * bits * 4;
  P.bits = bits;
  P.gblk = gs / 32;
  P.G = K / gs;
  P.mdt = Dt::BF16;
  P.qw = qw;
  P.scales = s;
  P.zeros = z;
  vnni_prep(P, Dt::BF16, x, K, 0, 1, ws);
  vnni_gemv_rows(P, ws, 1, 0, N, Dt::BF16, y, N, nullptr);
}
