// Instruction-throughput probes behind RESULTS_packed_linear.md's "Why it stops here" (session
// 20): what a zmm vpdpbusd shares its pipe with on this core, and what the one-row int2 GEMV body
// costs in registers and with its loads.
//
//   g++ -O3 -funroll-all-loops -std=c++17 -o /tmp/pipes benchmarks/packed_linear_stream/pipes.cpp
//   taskset -c 1 /tmp/pipes [GHZ]        (GHZ: the core's clock, default 3.66)
//
// Each line is the best of 5 runs of 200k iterations, in cycles per iteration. "8 dp + n X": 8
// independent vpdpbusd chains (8 cycles if it issues once per cycle) plus n independent chains
// of X: ~8 means X issues beside vpdpbusd, 8 + n means it takes vpdpbusd's pipe.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni"), noinline))
#define KEEP(x) __asm__ volatile("" : "+v"(x))

static double ghz = 3.66;

template <class F>
static void bench(const char* name, F f, double per = 1) {  // per: units of work per iteration
  double best = 1e30;
  for (int k = 0; k < 5; ++k) {
    const auto t = std::chrono::steady_clock::now();
    f(200000);
    best = std::min(best, std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t).count());
  }
  printf("%-44s %6.2f cycles\n", name, best / 200000 * ghz / per);
}

template <int W>  // 12 independent chains of a zmm (W = 512) or ymm vpdpbusd
TGT void dp_alone(long n) {
  if constexpr (W == 512) {
    __m512i a[12], b = _mm512_set1_epi8(3), c = _mm512_set1_epi8(5);
    for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
    for (long it = 0; it < n; ++it)
      for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbusd_epi32(a[i], b, c);
    for (int i = 0; i < 12; ++i) KEEP(a[i]);
  } else {
    __m256i a[12], b = _mm256_set1_epi8(3), c = _mm256_set1_epi8(5);
    for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_epi32(i);
    for (long it = 0; it < n; ++it)
      for (int i = 0; i < 12; ++i) a[i] = _mm256_dpbusd_epi32(a[i], b, c);
    for (int i = 0; i < 12; ++i) KEEP(a[i]);
  }
}

#define PAIR(NAME, EXPR)                                                      \
  template <int NX>                                                           \
  TGT void NAME(long n) {                                                     \
    __m512i a[8], w[8], b = _mm512_set1_epi8(3), c = _mm512_set1_epi8(5);     \
    for (int i = 0; i < 8; ++i) a[i] = w[i] = _mm512_set1_epi32(i);           \
    for (long it = 0; it < n; ++it) {                                         \
      for (int i = 0; i < 8; ++i) a[i] = _mm512_dpbusd_epi32(a[i], b, c);     \
      for (int i = 0; i < NX; ++i) w[i] = EXPR;                               \
      KEEP(b);                                                                \
    }                                                                         \
    for (int i = 0; i < 8; ++i) {                                             \
      KEEP(a[i]);                                                             \
      KEEP(w[i]);                                                             \
    }                                                                         \
  }
PAIR(with_and, _mm512_and_si512(w[i], c))
PAIR(with_srlw, _mm512_srli_epi16(w[i], 2))
PAIR(with_slld, _mm512_slli_epi32(w[i], 8))
PAIR(with_add, _mm512_add_epi32(w[i], c))
PAIR(with_permd, _mm512_permutexvar_epi32(c, w[i]))
PAIR(with_pshufb, _mm512_shuffle_epi8(c, w[i]))
PAIR(with_permb, _mm512_permutexvar_epi8(w[i], c))
PAIR(with_permt2d, _mm512_permutex2var_epi32(w[i], c, b))
PAIR(with_cvt, _mm512_castps_si512(_mm512_cvtepi32_ps(w[i])))
PAIR(with_ternlog, _mm512_ternarylogic_epi32(w[i], c, b, 0xE4))
PAIR(with_multishift, _mm512_multishift_epi64_epi8(c, w[i]))
PAIR(with_gf2p8, _mm512_gf2p8affine_epi64_epi8(c, w[i], 0))
PAIR(with_fma, _mm512_castps_si512(_mm512_fmadd_ps(_mm512_castsi512_ps(w[i]), _mm512_castsi512_ps(c),
                                                   _mm512_castsi512_ps(b))))

// The one-row int2 GEMV body of the Zen 4 form for 4 rows of W (per row and chunk: 3 vpsrlw, 4
// vpandd, 8 vpdpbusd, vpslld, vcvtdq2ps, vpermps, FMA), per row and chunk of 256 weights.
// MEM = 0: codes, x and scales in registers; 1: from memory (codes 4 x 16 KiB, in L1 / L2).
alignas(64) static uint8_t codes[4][16384];
alignas(64) static int8_t xs[2][16384];
alignas(64) static float sbuf[4][1024];
alignas(64) static int32_t gl[256 * 16];
template <int MEM>
TGT void int2_body(long n) {
  const __m512i m3 = _mm512_set1_epi8(3), gfix = _mm512_set1_epi32(3);
  const __m512 sfix = _mm512_set1_ps(1.f);
  __m512 y[4];
  __m512i xr[8];
  for (int i = 0; i < 4; ++i) y[i] = _mm512_setzero_ps();
  for (int i = 0; i < 8; ++i) xr[i] = _mm512_set1_epi8(char(i + 1));
  const __m512i wr = _mm512_set1_epi32(0x1b2c3d4e);
  for (long it = 0; it < n; it += 256)
    for (int c = 0; c < 256; ++c) {  // n chunks of 4 rows of W
      __m512i xv[8];
      for (int i = 0; i < 8; ++i) {
        xv[i] = MEM ? _mm512_load_si512(&xs[i / 4][(c * 4 + i % 4) * 64 % 16384]) : xr[i];
        if (!MEM) KEEP(xv[i]);
      }
      const __m512i gidx = MEM ? _mm512_load_si512(gl + c * 16) : gfix;
      for (int r = 0; r < 4; ++r) {
        __m512i w = MEM ? _mm512_load_si512(&codes[r][c * 64]) : _mm512_add_epi32(wr, _mm512_set1_epi32(r));
        KEEP(w);
        const __m512i f0 = _mm512_and_si512(w, m3), f1 = _mm512_and_si512(_mm512_srli_epi16(w, 2), m3),
                      f2 = _mm512_and_si512(_mm512_srli_epi16(w, 4), m3), f3 = _mm512_and_si512(_mm512_srli_epi16(w, 6), m3);
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), f0, xv[0]);
        acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, f1, xv[1]), f2, xv[2]), f3, xv[3]);
        acc = _mm512_slli_epi32(acc, 8);
        acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, f0, xv[4]), f1, xv[5]);
        acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, f2, xv[6]), f3, xv[7]);
        const __m512 sw = _mm512_permutexvar_ps(gidx, MEM ? _mm512_loadu_ps(&sbuf[r][(c / 4) * 4]) : sfix);
        y[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sw, y[r]);
      }
    }
  for (int i = 0; i < 4; ++i) KEEP(y[i]);
}

int main(int argc, char** argv) {
  if (argc > 1) ghz = atof(argv[1]);
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < 16384; ++i) codes[r][i] = uint8_t(rand());
  for (int i = 0; i < 256 * 16; ++i) gl[i] = i % 16;
  bench("12 zmm vpdpbusd", dp_alone<512>);
  bench("12 ymm vpdpbusd", dp_alone<256>);
  bench("8 dp + 8 vpandd", with_and<8>);
  bench("8 dp + 8 vpsrlw", with_srlw<8>);
  bench("8 dp + 4 vpslld", with_slld<4>);
  bench("8 dp + 8 vpaddd", with_add<8>);
  bench("8 dp + 4 vpermd", with_permd<4>);
  bench("8 dp + 4 vpshufb", with_pshufb<4>);
  bench("8 dp + 4 vpermb", with_permb<4>);
  bench("8 dp + 8 vpermb", with_permb<8>);
  bench("8 dp + 4 vpermt2d", with_permt2d<4>);
  bench("8 dp + 4 vcvtdq2ps", with_cvt<4>);
  bench("8 dp + 4 vpternlogd", with_ternlog<4>);
  bench("8 dp + 8 vpternlogd", with_ternlog<8>);
  bench("8 dp + 4 vpmultishiftqb", with_multishift<4>);
  bench("8 dp + 4 vgf2p8affineqb", with_gf2p8<4>);
  bench("8 dp + 2 FMA", with_fma<2>);
  printf("int2 GEMV body, 4 rows of W, per row and chunk of 256 weights:\n");
  bench("  in registers", int2_body<0>, 4);
  bench("  codes / x / scales from memory", int2_body<1>, 4);
}
