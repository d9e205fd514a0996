// Experiment (not the library's kernel): an AMX-int8 GEMV for M = 1, the same interface as
// kernel.cpp, to test whether tile multiplies beat the VNNI GEMV once the codes are decoded to
// bytes. They do not (RESULTS_packed_linear.md, "AMX-int8 for M = 1"): the decoded bytes have to
// be stored and read back by tileloadd, which costs about what the vpdpbusd work it replaces did.
//
// Scheme: x is split in two int8 pieces per 64-group as the VNNI path does (x ~ a (h + l / 256)).
// 16 rows at a time are decoded (full K) into a byte panel, row r at r * RS, so that field f of
// 64-byte line c of all 16 rows is one 16 x 64 A tile (stride RS). The B tile of (c, f) holds
// h and l of each k in the column pair 2 (group % 8), 2 (group % 8) + 1, so one C tile collects
// a window of 8 groups x (h, l) per row; then C -> 256 h + l -> * s a_g, plus the usual
// zero-point term. Limits: int4 / int2, group size 64, K a multiple of 512, bf16 x and metadata.
// -DNODEC skips the decode, -DNOMMA the tile multiplies (timing only: wrong results).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vbmi,amx-tile,amx-int8")
#ifndef PFB
#define PFB 3072  // software prefetch distance in bytes (the int4 kernel's)
#endif
static inline float bf(uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t tobf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return uint16_t(u >> 16); }
struct alignas(64) TileCfg { uint8_t palette_id, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
static bool perm() { static bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0; return ok; }
#define PF(p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1)

extern "C" void run(const uint8_t* qw, const void* s_, const void* z_, const uint16_t* x, uint16_t* y, int bits, long K,
                    long N, long gs, uint8_t* ws_unused) {
  if ((bits != 4 && bits != 2) || gs != 64 || K % 512 || !perm()) return;  // outside the experiment
  const uint16_t* S = (const uint16_t*)s_; const uint16_t* Z = (const uint16_t*)z_;
  const long G = K / 64, nb = K / 32, row_bytes = nb * bits * 4, nlines = row_bytes / 64;
  const int NF = bits == 4 ? 2 : 4;
  const long kpl = 64 * NF;                 // k per line
  const long lpw = 512 / kpl;             // lines per window of 8 groups
  const long RS = nlines * NF * 64 + 64;  // +64: the 16 rows of a tile fall in different L1 sets
    static thread_local int8_t* xh = nullptr; static thread_local int8_t* xl; static thread_local float* A; static thread_local float* X;
  static thread_local int8_t* B; static thread_local int8_t* panel; static thread_local long cap = 0;
  if (cap < K) {
    xh = (int8_t*)aligned_alloc(64, K); xl = (int8_t*)aligned_alloc(64, K);
    A = (float*)aligned_alloc(64, (G + 16) * 4); X = (float*)aligned_alloc(64, (G + 16) * 4);
    B = (int8_t*)aligned_alloc(64, nlines * NF * 1024 + 4096);
    panel = (int8_t*)aligned_alloc(64, 16 * (nlines * NF * 64 + 64) + 4096);
    cap = K;
  }
  for (long g = 0; g < G; ++g) {
    float amax = 0, sum = 0;
    for (long k = g * 64; k < g * 64 + 64; ++k) { float v = bf(x[k]); amax = fmaxf(amax, fabsf(v)); sum += v; }
    X[g] = sum; A[g] = amax / 127.f / 256.f;
    const float inv = amax > 0 ? 127.f / amax : 0.f;
    for (long k = g * 64; k < g * 64 + 64; ++k) {
      float v = bf(x[k]) * inv; float h = fminf(127, fmaxf(-127, nearbyintf(v)));
      float l = fminf(127, fmaxf(-127, nearbyintf((v - h) * 256.f)));
      xh[k] = int8_t(h); xl[k] = int8_t(l);
    }
  }
  memset(B, 0, nlines * NF * 1024);
  for (long c = 0; c < nlines; ++c)
    for (int f = 0; f < NF; ++f) {
      int8_t* Bt = B + (c * NF + f) * 1024;
      for (int t = 0; t < 64; ++t) {
        long k = bits == 4 ? 32 * (4 * c + t / 16) + 16 * f + t % 16 : 32 * (8 * c + t / 8) + 8 * f + t % 8;
        long j = 2 * ((k / 64) % 8);
        Bt[(t / 4) * 64 + 4 * j + t % 4] = xh[k];
        Bt[(t / 4) * 64 + 4 * (j + 1) + t % 4] = xl[k];
      }
    }
  TileCfg cfg; memset(&cfg, 0, sizeof cfg); cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  _tile_loadconfig(&cfg);
  __m512i lshift[4];
  for (int f = 0; f < 4; ++f) { alignas(64) uint8_t c[64]; for (int i = 0; i < 64; ++i) c[i] = uint8_t(8 * (i & 7) + 2 * f); lshift[f] = _mm512_load_si512(c); }
  const __m512i msk = _mm512_set1_epi8(bits == 4 ? 0x0F : 0x03);
  const __m512i evenidx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  alignas(64) int32_t cbuf[256];
  for (long n0 = 0; n0 < N; n0 += 16) {
    const int rows = (int)std::min<long>(16, N - n0);
    // decode 16 rows into the tile panel: tile (c, f) row r at ((c * NF + f) * 16 + r) * 64
#ifndef NODEC
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = qw + (n0 + r) * row_bytes;
      for (long c = 0; c < nlines; ++c) {
        PF(row + 64 * c + PFB);
        const __m512i w = _mm512_loadu_si512(row + 64 * c);
        int8_t* dst = panel + r * RS + c * NF * 64;
        _mm512_store_si512(dst, _mm512_and_si512(w, msk));
        for (int f = 1; f < NF; ++f)
          _mm512_store_si512(dst + f * 64, _mm512_and_si512(_mm512_multishift_epi64_epi8(lshift[bits == 4 ? 2 : f], w), msk));
      }
    }
#endif
    __m512 yacc[16];
    for (int r = 0; r < 16; ++r) yacc[r] = _mm512_setzero_ps();
    for (long w0 = 0; w0 < nlines; w0 += lpw) {
      _tile_zero(0);
#ifndef NOMMA
      for (long c = w0; c < w0 + lpw; ++c) {
        for (int f = 0; f < NF; f += 2) {
          _tile_loadd(1, panel + (c * NF + f) * 64, RS);
          _tile_loadd(2, B + (c * NF + f) * 1024, 64);
          _tile_loadd(3, panel + (c * NF + f + 1) * 64, RS);
          _tile_loadd(4, B + (c * NF + f + 1) * 1024, 64);
          _tile_dpbusd(0, 1, 2);
          _tile_dpbusd(0, 3, 4);
        }
      }
#endif
      _tile_stored(0, cbuf, 64);
      const long g0 = (w0 * kpl) / 64;
      const __m512 a8 = _mm512_permutexvar_ps(evenidx, _mm512_castps256_ps512(_mm256_loadu_ps(A + g0)));
      for (int r = 0; r < rows; ++r) {
        const __m256i s8 = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(S + (n0 + r) * G + g0)));
        const __m512 sf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(s8), 16));
        const __m512 sa = _mm512_maskz_mul_ps(0x5555, _mm512_permutexvar_ps(evenidx, sf), a8);
        const __m512i v = _mm512_load_si512(cbuf + 16 * r);
        const __m512i t = _mm512_add_epi32(_mm512_slli_epi32(v, 8), _mm512_srli_epi64(v, 32));
        yacc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sa, yacc[r]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      __m512 za = _mm512_setzero_ps();
      for (long g = 0; g < G; g += 16) {
        const __m512 zz = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(Z + (n0 + r) * G + g))), 16));
        const __m512 ss = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(S + (n0 + r) * G + g))), 16));
        za = _mm512_fmadd_ps(_mm512_mul_ps(zz, ss), _mm512_loadu_ps(X + g), za);
      }
      const float zt = _mm512_reduce_add_ps(za);
      y[n0 + r] = tobf(_mm512_reduce_add_ps(yacc[r]) - zt);
    }
  }
}
