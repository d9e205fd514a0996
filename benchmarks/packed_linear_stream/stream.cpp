// Synthetic int4 streams over the driver's buffers (results are meaningless; only time counts).
//   -DWORK=0: read the bytes, optionally software-prefetched PFD bytes ahead with hint HINT, as
//             -DSTREAMS=S far-apart slices read in lockstep (S concurrent sequential streams)
//   -DWORK=1: per 64-byte weight line the int4 GEMV's work (decode, 4 vpdpbusd, convert, FMA)
//             over the packed weights only; -DMETA=1 adds the scale / zero rows as two more
//             streams (prefetched 2 rows ahead), as the kernel reads them. WORK=1 without META
//             reads 22.5 of the 25.4 MB the driver counts in its GB/s column (compare ms).
// Env: PFD (prefetch distance in bytes, 3072; 0 = no software prefetch).
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx512vbmi,avx512dq")
#ifndef STREAMS
#define STREAMS 1
#endif
#ifndef HINT
#define HINT _MM_HINT_T1
#endif
static const long kPfd = getenv("PFD") ? atol(getenv("PFD")) : 3072;
alignas(64) static int8_t xs[2][4096];

extern "C" void run(const uint8_t* qw, const void* s, const void* z, const uint16_t*, uint16_t* y, int bits, long K,
                    long N, long gs, uint8_t*) {
  const long d = kPfd;
#if WORK == 0
  // STREAMS (compile time) equal slices of the bytes read in lockstep, 256 bytes of each per round
  const long bytes = N * (K / 32) * bits * 4 + 2 * N * (K / gs) * 2;  // packed + metadata: contiguous in driver.cpp
  const long slice = bytes / STREAMS / 256 * 256;
  __m512i a[STREAMS];
  for (int t = 0; t < STREAMS; ++t) a[t] = _mm512_setzero_si512();
  for (long i = 0; i + 256 <= slice; i += 256)
    for (int t = 0; t < STREAMS; ++t) {
      const uint8_t* p = qw + t * slice + i;
      if (d)
        for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(p) + d + 64 * l, HINT);
      a[t] = _mm512_add_epi32(a[t], _mm512_add_epi32(_mm512_add_epi32(_mm512_load_si512(p), _mm512_load_si512(p + 64)),
                                                     _mm512_add_epi32(_mm512_load_si512(p + 128), _mm512_load_si512(p + 192))));
    }
  for (int t = 1; t < STREAMS; ++t) a[0] = _mm512_add_epi32(a[0], a[t]);
  y[0] = uint16_t(_mm512_reduce_add_epi32(a[0]));
#else
  const long row = K / 2, G = K / gs;  // int4 only
  const __m512i m0f = _mm512_set1_epi8(15);
  alignas(64) uint8_t c[64];
  for (int i = 0; i < 64; ++i) c[i] = uint8_t(8 * (i & 7) + 4);
  const __m512i hi = _mm512_load_si512(c);
  __m512 sa = _mm512_set1_ps(1.0f), tot = _mm512_setzero_ps();
  for (long n = 0; n < N; ++n) {
    const uint8_t* r = qw + n * row;
    __m512 yacc = _mm512_setzero_ps();
#if META
    const uint16_t* sr = static_cast<const uint16_t*>(s) + n * G;
    const uint16_t* zr = static_cast<const uint16_t*>(z) + n * G;
    for (long b = 0; b < 2 * G; b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(sr + 2 * G) + b, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(zr + 2 * G) + b, _MM_HINT_T1);
    }
    __m512 zacc = _mm512_setzero_ps();
    for (long g = 0; g + 16 <= G; g += 16) {
      const __m512 a = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sr + g))), 16));
      const __m512 b = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zr + g))), 16));
      zacc = _mm512_fmadd_ps(a, b, zacc);
    }
    sa = _mm512_mul_ps(sa, zacc);
#endif
    for (long o = 0; o < row; o += 64) {
      if (d) _mm_prefetch(reinterpret_cast<const char*>(r) + o + d, _MM_HINT_T1);
      const __m512i w = _mm512_load_si512(r + o);
      const __m512i f0 = _mm512_and_si512(w, m0f);
      const __m512i f1 = _mm512_and_si512(_mm512_multishift_epi64_epi8(hi, w), m0f);
      const int8_t* xh = xs[0] + 2 * o;
      const int8_t* xl = xs[1] + 2 * o;
      __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), f0, _mm512_load_si512(xh));
      acc = _mm512_slli_epi32(_mm512_dpbusd_epi32(acc, f1, _mm512_load_si512(xh + 64)), 8);
      acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, f0, _mm512_load_si512(xl)), f1, _mm512_load_si512(xl + 64));
      yacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sa, yacc);
    }
    tot = _mm512_add_ps(tot, yacc);
  }
  y[0] = uint16_t(_mm512_reduce_add_ps(tot));
#endif
}
