// Packed low-bit weights: dequantization and packed_linear, compiled once per
// instruction set (isa_kernels.inc). The format is csrc/shared/packing.h
// (spec: quantkern/reference/packing.py).
//
// Paths (chosen by pk_plan from the ISA, the CPU features and M):
//   kPathGemmF32  every ISA. Dequantize a panel of rows to fp32, exactly as the
//                 reference ((q - z) * s), into a cache-resident buffer, then a
//                 register-blocked fp32 FMA micro-kernel (dot products along K).
//   kPathLutF32   AVX-512, small M, fp32 x. The 16-entry table (e - z) * s of a
//                 group is one zmm; vpermps turns a vector of codes into exact
//                 weights, which feed fp32 FMAs directly (no buffer). On AVX2 the
//                 same GEMV with the decoder of packed_avx2.h, for any x dtype.
//   kPathVnni     AVX-512 VNNI + VBMI + GFNI, small M, bf16/fp16 x. x is quantized per
//                 group to two int8 pieces (x ~ a * (h + l / 256), a = amax / 127,
//                 error <= a / 512); codes are decoded with shift+mask to bytes and
//                 multiplied by vpdpbusd. The zero point is folded, with the pieces' x^
//                 on both sides: sum_k x^_k w_k = s * sum_k x^_k q_k - z * s * sum_k x^_k.
//                 a / 512 is far below bf16/fp16 rounding unless a group holds an
//                 outlier (amax > kVnniWideRange * mean |x|, kWideRangeBf16 for bf16 x): then the small entries
//                 of that group would lose precision, so the call takes a third piece
//                 (x ~ a * (h + l / 256 + u / 65536)). x with inf/NaN takes the
//                 fp32 LUT path, which propagates them as a float product does.
//                 On AMD CPUs it runs its Zen 4 form (kZen4Gemv).
//   kPathAmx      AMX-BF16, large M, bf16 x. A panel of 32 rows is dequantized to
//                 bf16 (the same rounding as W_deq.to(bfloat16)) and multiplied as
//                 the A operand (Y^T = W X^T), so the panel needs no transpose.
//   kPathDpBf16   AVX512-BF16 without AMX (AMD Zen 4), large M, bf16 x: the AMX
//                 path's panels and x layout, multiplied with vdpbf16ps.
//   kPathI16      AVX2, small M, bf16/fp16 x: x in int16 pieces, vpmaddwd
//                 (packed_avx2_i16.h).
//   kPathI16Gemm  AVX2, larger M, bf16/fp16 x, groups of up to 1024: the same pieces and
//                 per-group formula as kPathI16, blocked as a GEMM (8 rows of x across the
//                 lanes, W decoded once per call; packed_avx2_i16.h).
#pragma once

#include <array>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../shared/packing.h"
#include "cpu_features.h"
#include "kernel_io.h"

#if defined(QK_ISA_AVX512)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qk {
namespace QK_ISA_NS {

enum PkPath : int { kPathGemmF32 = 0, kPathLutF32 = 1, kPathVnni = 2, kPathAmx = 3, kPathDpBf16 = 4, kPathI16 = 5,
                   kPathI16Gemm = 6 };

QK_SI float meta_at(const void* p, Dt dt, int64_t i) {
  switch (dt) {
    case Dt::F32: return static_cast<const float*>(p)[i];
    case Dt::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

QK_SI void store_any(Dt dt, void* p, int64_t i, float v) {
  switch (dt) {
    case Dt::F32: static_cast<float*>(p)[i] = v; break;
    case Dt::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
  }
}

QK_SI float load_any(Dt dt, const void* p, int64_t i) { return meta_at(p, dt, i); }

// No std:: templates in this header: it is compiled once per instruction set,
// and an out-of-line std:: instantiation compiled for AVX-512 could be picked
// by the linker for the scalar build.
template <class T>
QK_SI T qmin(T a, T b) { return b < a ? b : a; }
template <class T>
QK_SI T qmax(T a, T b) { return a < b ? b : a; }

// Per-thread scratch buffers (grow only, 64-byte aligned), one per slot. They
// live as long as the thread (the OpenMP pool), like a cache.
inline void* scratch(int slot, size_t bytes) {
  thread_local void* buf[8] = {};
  thread_local size_t cap[8] = {};
  if (cap[slot] < bytes) {
    std::free(buf[slot]);
    cap[slot] = (bytes + 4095) & ~size_t(4095);
    buf[slot] = std::aligned_alloc(64, cap[slot]);
    if (!buf[slot]) cap[slot] = 0;
  }
  return buf[slot];
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// `return NAME<bits>(args)` for a packed weight's bit width (2, 3 or 4).
#define QK_BITS_DISPATCH(bits, NAME, ...)        \
  switch (bits) {                                \
    case 4: return NAME<4>(__VA_ARGS__);         \
    case 3: return NAME<3>(__VA_ARGS__);         \
    default: return NAME<2>(__VA_ARGS__);        \
  }

inline int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : dflt;
}

#if defined(QK_ISA_AVX512)
// Software prefetch of cold weight rows into L2, kPfRows blocks of rows ahead of the
// rows being decoded. Measured on a 4096x11008 int4 GEMV (cold, 1 thread): 6.1 GB/s
// without, 10.6 GB/s with (the same bandwidth as bf16 F.linear); into L1 (T0) it was
// erratic (7-11 GB/s depending on the distance). Re-measured later (same shape, 1 thread,
// read roofline = fp32 sgemv 14.7 GB/s): T1 or T2 2.2-2.4 ms, T0 2.7-2.8 ms, none 3.4-3.9 ms;
// distance 1-16 blocks, 1, 2 or 4 rows per block: all within noise. Dropping half of the
// vpdpbusd work made int4 only 3% faster (int2 9%): the int4 GEMV is bound by this
// memory stream (~75% of the sgemv read rate), not by the decode.
static const int64_t kPfRows = env_int("QUANTKERN_PK_PREFETCH_ROWS", 2);
// The one-row int4 GEMV (M = 1) prefetches a fixed number of bytes ahead instead (one
// sequential stream through consecutive rows); so does every block that advances one row per
// stream (the slices of kStreams; M = 3, 4). Measured 2026-12-03 (4096x11008 int4 g64,
// cold, 1 thread, interleaved in one process): one row at a time with 3 KB lookahead
// 2.23-2.30 ms, the two-row block 8 KB ahead 2.40-2.54 ms (2 threads: 1.18 vs 1.27 ms).
// A bare read loop peaks at 0.5-4 KB lookahead (~13 GB/s) and drops to ~10 GB/s at 8 KB.
// For 2 and 3 bits the two-row block stayed as fast or faster (their rows are shorter and
// their decode heavier), so they keep it.
static const int64_t kPfBytes = env_int("QUANTKERN_PK_PREFETCH_BYTES", 3072);
// At M <= 2 the GEMV reads several far-apart slices of its rows in lockstep (4 at M = 1, 2 at
// M = 2), each a sequential stream: one core keeps more memory requests in flight across
// concurrent streams than along one. Measured 2026-12-04 (4096x11008 g64, cold, 2 threads,
// benchmarks/packed_linear_stream, interleaved): a bare read of the same bytes as 1 / 2 / 4 / 8
// streams per thread 27.7 / 29.9 / 32.6 / 33.4 GB/s; the int4 GEMV as one stream 0.98 ms,
// 4 streams 0.84 ms (int3 1.12 -> 0.92, int2 0.96 -> 0.78; 1 thread int4 1.96 -> 1.68),
// bit-identical. Rows interleaved one at a time across the slices instead of in lockstep
// gained half as much. QUANTKERN_PK_STREAMS=0 restores the one-stream order (for A/B runs).
static const bool kStreams = env_int("QUANTKERN_PK_STREAMS", 1) != 0;
// The GEMV in the form tuned for AMD Zen 4. It applies to each group of rows of x the GEMV takes
// at once (up to 4; a call with 5 rows runs 4 + 1, and the rows of a call that must go one by
// one, because another row holds inf / NaN, run as single rows).
//   One row of x: (1) the group scales times a_g of a whole row go to a buffer before the chunk
//   loop (vnni_gemv_block) instead of into registers whenever the 16-group window moves; (2) 2-bit
//   fields come from 16-bit shifts (vnni_decode): on Zen 4 vpmultishiftqb shares vpdpbusd's pipes
//   (a vpdpbusd paired with one takes 2 cycles, with a vpsrlw 1.15), while on the Xeons vpdpbusd
//   has port 0 to itself.
//   One row of x, 2- and 3-bit: (4) one vpdpbusd chain per piece of x (vnni_products' SPLIT).
//   3-4 rows of x: (3) two rows of W per block (NR in vnni_gemv_rows_t).
//   Every row count, 3-bit: (5) fields from vpermb lookups and one vgf2p8affineqb (vnni_decode).
// Measured on 2 vCPUs of an EPYC (hot weights, cycles per 256 weights and row of x, int2 / int3 /
// int4, g64): M = 1 16.4 / 23.0 / 19.6 -> 14.8 / 22.2 / 18.1, M = 3-8 19-21 -> 12-15; cold
// 4096x11008 M = 1: int2 -13 to -17%, int3 -8% (RESULTS_packed_linear.md). Session 20 (both
// forms: full chunks on a path without masks, see vnni_gemv_block; and (4)): M = 1 hot 14.3 /
// 21.2 / 17.6 -> 13.3 / 20.1 / 16.8, cold 1 thread -4 / -9 / -9%. Session 21 ((5)): int3 hot
// M = 1 / 2 / 4 20.2 / 16.1 / 13.8 -> 17.8 / 14.7 / 13.3, cold M = 1 -8% on 1 thread, -11% on 2.
// Outputs are bit for bit the same. QUANTKERN_PK_ZEN4_GEMV=0 / 1 forces either form; the default
// (-1) takes it on every AMD CPU with the GEMV's instructions (measured on Zen 4 only; the Xeon
// form was tuned on hardware this host cannot re-measure).
static const bool kZen4Gemv = [] {
  const int64_t v = env_int("QUANTKERN_PK_ZEN4_GEMV", -1);
  return v < 0 ? cpu_is_amd() : v != 0;
}();
#define QK_PF(p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1)
#endif

// ------------------------------------------------------------ generic decode
QK_SI void decode_block_u8(const uint8_t* row, int bits, int64_t nb, int64_t j, uint8_t* q) {
  if (bits == 4) {
    const uint8_t* b = row + 16 * j;
    for (int p = 0; p < 16; ++p) {
      q[p] = b[p] & 15;
      q[p + 16] = b[p] >> 4;
    }
    return;
  }
  const uint8_t* b = row + 8 * j;
  for (int f = 0; f < 4; ++f)
    for (int p = 0; p < 8; ++p) q[8 * f + p] = (b[p] >> (2 * f)) & 3;
  if (bits == 3) {
    uint32_t h;
    std::memcpy(&h, row + 8 * nb + 4 * j, 4);
    for (int t = 0; t < 32; ++t) q[t] |= uint8_t(((h >> t) & 1u) << 2);
  }
}

// Row n dequantized to fp32, Kp = 32 * nb values (padding decodes as q = 0).
inline void dequant_row_f32_generic(const PackedW& P, int64_t n, float* out) {
  const uint8_t* row = P.qw + n * P.row_bytes;
  alignas(64) uint8_t q[32];
  for (int64_t g = 0; g < P.G; ++g) {
    const float s = meta_at(P.scales, P.mdt, n * P.G + g), z = meta_at(P.zeros, P.mdt, n * P.G + g);
    const int64_t j1 = qmin(P.nb, (g + 1) * P.gblk);
    for (int64_t j = g * P.gblk; j < j1; ++j) {
      decode_block_u8(row, P.bits, P.nb, j, q);
      float* o = out + 32 * j;
      for (int t = 0; t < 32; ++t) o[t] = (float(q[t]) - z) * s;  // -ffp-contract=off: sub, then mul
    }
  }
}

// ------------------------------------------------------------ vector helpers
#if defined(QK_ISA_AVX512)
QK_SI V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
QK_SI float vsum(V a) { return _mm512_reduce_add_ps(a.v); }
#elif defined(QK_ISA_AVX2)
QK_SI V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
QK_SI float vsum(V a) { return reduce_add(a); }
#else
QK_SI float vfma(float a, float b, float c) { return a * b + c; }
QK_SI float vsum(float a) { return a; }
#endif

#if defined(QK_ISA_AVX512)
// ------------------------------------------------------------ AVX-512 LUT decode
// Index vectors for the 16-entry tables: entry e holds (code(e) - z) * s where
// code(e) = e (4 bits), e & 7 (3 bits), e & 3 (2 bits), so that index bits
// above the code are don't-cares and need no masking.
template <int BITS>
QK_SI __m512 lut_iota() {
  if constexpr (BITS == 4) return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  else if constexpr (BITS == 3) return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
  else return _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
}
QK_SI __m512 lut_table(__m512 iota, float s, float z) {
  return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
}

// Block j of a row -> w0 = weights 0..15, w1 = weights 16..31 (exact (q - z) * s).
template <int BITS>
QK_SI void lut_block(const uint8_t* row, int64_t nb, int64_t j, __m512 T, __m512& w0, __m512& w1) {
  if constexpr (BITS == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j)));
    w0 = _mm512_permutexvar_ps(v, T);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), T);
  } else {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * j));
    const __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(b, b));
    const __m512i sh0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i sh1 = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
    __m512i i0 = _mm512_srlv_epi32(v, sh0), i1 = _mm512_srlv_epi32(v, sh1);
    if constexpr (BITS == 3) {
      uint32_t h;
      std::memcpy(&h, row + 8 * nb + 4 * j, 4);
      const __m512i hv = _mm512_set1_epi32(int(h));
      // rotate bit t of h to bit 2 of lane t
      const __m512i r0 = _mm512_setr_epi32(30, 31, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13);
      const __m512i r1 = _mm512_setr_epi32(14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29);
      const __m512i three = _mm512_set1_epi32(3);
      i0 = _mm512_ternarylogic_epi32(i0, _mm512_rorv_epi32(hv, r0), three, 0xE4);  // c ? a : b
      i1 = _mm512_ternarylogic_epi32(i1, _mm512_rorv_epi32(hv, r1), three, 0xE4);
    }
    w0 = _mm512_permutexvar_ps(i0, T);
    w1 = _mm512_permutexvar_ps(i1, T);
  }
}

template <int BITS>
inline void dequant_row_f32_lut(const PackedW& P, int64_t n, float* out) {
  const uint8_t* row = P.qw + n * P.row_bytes;
  const __m512 iota = lut_iota<BITS>();
  for (int64_t g = 0; g < P.G; ++g) {
    const __m512 T = lut_table(iota, meta_at(P.scales, P.mdt, n * P.G + g), meta_at(P.zeros, P.mdt, n * P.G + g));
    const int64_t j1 = qmin(P.nb, (g + 1) * P.gblk);
    for (int64_t j = g * P.gblk; j < j1; ++j) {
      __m512 w0, w1;
      lut_block<BITS>(row, P.nb, j, T, w0, w1);
      _mm512_storeu_ps(out + 32 * j, w0);
      _mm512_storeu_ps(out + 32 * j + 16, w1);
    }
  }
}
#endif

}  // namespace QK_ISA_NS
}  // namespace qk
#include "packed_avx2.h"  // the AVX2 block decoder and GEMV (uses the helpers above)
namespace qk {
namespace QK_ISA_NS {

inline void dequant_row_f32(const PackedW& P, int64_t n, float* out) {
#if defined(QK_ISA_AVX512)
  QK_BITS_DISPATCH(P.bits, dequant_row_f32_lut, P, n, out)
#elif defined(QK_ISA_AVX2)
  QK_BITS_DISPATCH(P.bits, avx2_dequant_row, P, n, out)
#else
  dequant_row_f32_generic(P, n, out);
#endif
}

// dequantize op: rows [n0, n1) -> out (dtype odt, row stride ldo elements), K columns.
inline void pk_dequant(const PackedW& P, int64_t n0, int64_t n1, Dt odt, void* out, int64_t ldo) {
  float* buf = static_cast<float*>(scratch(0, P.Kp() * sizeof(float)));
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row_f32(P, n, buf);
    const int64_t base = (n - n0) * ldo;
    int64_t k = 0;
#if !defined(QK_ISA_SCALAR)
    switch (odt) {
      case Dt::F32: for (; k + kW <= P.K; k += kW) vstore<Dt::F32>(out, base + k, vld(buf + k)); break;
      case Dt::F16: for (; k + kW <= P.K; k += kW) vstore<Dt::F16>(out, base + k, vld(buf + k)); break;
      case Dt::BF16: for (; k + kW <= P.K; k += kW) vstore<Dt::BF16>(out, base + k, vld(buf + k)); break;
    }
#endif
    for (; k < P.K; ++k) store_any(odt, out, base + k, buf[k]);
  }
}

// ------------------------------------------------------------ fp32 panel GEMM
#if defined(QK_ISA_AVX512)
constexpr int kMR = 4, kNR = 4, kNB = 16;
#elif defined(QK_ISA_AVX2)
constexpr int kMR = 2, kNR = 4, kNB = 16;
#else
constexpr int kMR = 1, kNR = 4, kNB = 16;
#endif

// c[i][j] = dot(x row i, w row j) over Kp (a multiple of 32). Two-level
// summation: vector lanes accumulate blocks of 32 steps, the block sums are
// added into a second set of accumulators (error ~ (32 + Kp / (32 W)) ulps
// instead of Kp / W).
template <int MR>
QK_SI void micro_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t Kp, float* c) {
  V tot[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) tot[i][j] = splat(0.f);
  constexpr int64_t KB = 32 * kW;
  for (int64_t k0 = 0; k0 < Kp; k0 += KB) {
    const int64_t k1 = qmin(Kp, k0 + KB);
    V acc[MR][kNR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j) acc[i][j] = splat(0.f);
    for (int64_t k = k0; k < k1; k += kW) {
      V wv[kNR];
      for (int j = 0; j < kNR; ++j) wv[j] = vld(w + j * ldw + k);
      for (int i = 0; i < MR; ++i) {
        const V xv = vld(x + i * ldx + k);
        for (int j = 0; j < kNR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j) tot[i][j] = add(tot[i][j], acc[i][j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * kNR + j] = vsum(tot[i][j]);
}

// y[m, n] for m < M, n in [n0, n1); xp is fp32 [M, Kp] (zero padded).
inline void gemm_f32_rows(const PackedW& P, const float* xp, int64_t M, int64_t n0, int64_t n1, Dt ydt,
                          void* y, int64_t ldy, const float* bias) {
  const int64_t Kp = P.Kp();
  float* panel = static_cast<float*>(scratch(1, size_t(kNB) * Kp * sizeof(float)));
  for (int64_t b0 = n0; b0 < n1; b0 += kNB) {
    const int64_t rows = qmin<int64_t>(kNB, n1 - b0);
    for (int64_t r = 0; r < rows; ++r) dequant_row_f32(P, b0 + r, panel + r * Kp);
    for (int64_t r = rows; r < round_up(rows, kNR); ++r) std::memset(panel + r * Kp, 0, Kp * sizeof(float));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int64_t mr = qmin<int64_t>(kMR, M - m0);
      for (int64_t j0 = 0; j0 < rows; j0 += kNR) {
        float c[kMR * kNR];
        const float* xr = xp + m0 * Kp;
        const float* wr = panel + j0 * Kp;
        switch (mr) {
          case 1: micro_f32<1>(xr, Kp, wr, Kp, Kp, c); break;
#if !defined(QK_ISA_SCALAR)
          case 2: micro_f32<(kMR >= 2 ? 2 : 1)>(xr, Kp, wr, Kp, Kp, c); break;
          case 3: micro_f32<(kMR >= 3 ? 3 : 1)>(xr, Kp, wr, Kp, Kp, c); break;
          case 4: micro_f32<(kMR >= 4 ? 4 : 1)>(xr, Kp, wr, Kp, Kp, c); break;
#endif
        }
        const int64_t nr = qmin<int64_t>(kNR, rows - j0);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j) {
            const int64_t n = b0 + j0 + j;
            store_any(ydt, y, (m0 + i) * ldy + n, c[i * kNR + j] + (bias ? bias[n] : 0.f));
          }
      }
    }
  }
}

// x [M, K] (dtype xdt, row stride ldx) -> fp32 [M, Kp], zero padded.
inline void prep_f32(const PackedW& P, Dt xdt, const void* x, int64_t ldx, int64_t m0, int64_t m1, float* xp) {
  const int64_t Kp = P.Kp();
  for (int64_t m = m0; m < m1; ++m) {
    float* o = xp + m * Kp;
    int64_t k = 0;
#if !defined(QK_ISA_SCALAR)
    switch (xdt) {
      case Dt::F32: for (; k + kW <= P.K; k += kW) vstore<Dt::F32>(o, k, vload<Dt::F32>(x, m * ldx + k)); break;
      case Dt::F16: for (; k + kW <= P.K; k += kW) vstore<Dt::F32>(o, k, vload<Dt::F16>(x, m * ldx + k)); break;
      case Dt::BF16: for (; k + kW <= P.K; k += kW) vstore<Dt::F32>(o, k, vload<Dt::BF16>(x, m * ldx + k)); break;
    }
#endif
    for (; k < P.K; ++k) o[k] = load_any(xdt, x, m * ldx + k);
    for (; k < Kp; ++k) o[k] = 0.f;
  }
}

// ------------------------------------------------------------ x range rules of the integer GEMVs
// (the AVX-512 VNNI GEMV's pieces; the AVX2 int16 GEMV of packed_avx2_i16.h maps them to its own)
// A group whose amax exceeds this multiple of its mean |x| makes the call use three pieces.
// Gaussian groups of 32-256 stay below ~5; one outlier of 8x the mean |x| or more (or a few
// much larger ones) crosses it. With two pieces such a group's small entries get errors of
// amax / 65024 each, far above their own fp16/bf16 rounding when the outlier's weight is ~0.
constexpr float kVnniWideRange = 8.f;
// With bf16 x the outlier rule's ratio is this instead (the VNNI GEMV's third piece and the AVX2 int16
// GEMV's second alike; since session 38 for VNNI, 37 for AVX2). Where a group's outlier meets a zero
// weight, the output comes from the other entries, about amax / R in size (R the ratio), and the
// error of the GEMV's default split (VNNI: two int8 pieces, steps of amax / 32512; AVX2: one int16
// piece, amax / 32767) is about R / 113000 of that output: at R = 16, 1.4e-4, an eighth of bf16
// `F.linear`'s output rounding (2^-9 / sqrt 3). fp16 rounds 4x finer, and a fuzz with R = 16 for
// fp16 too (rows of 8 groups mixing outliers of 9-17x, heavy tails, tiny bulks; 90% of the weights
// at their zero point) put 3 rows of 8000 at 2.2-2.5x `F.linear`'s error, so fp16 keeps 8. At 8, the
// silu(a) * b inputs of an LLM's MLP down projection put 48% of their g64 groups past the rule, at 16
// 1.7% (Student-t with 3 degrees: 16% -> 1.4%; ReLU'd Gaussian 7.5% -> 0%).
constexpr float kWideRangeBf16 = 16.f;
// Several large entries hide from that mean: with 1/8 of a group at 1 and the rest at 1e-5, the
// output comes from the small entries when the large ones meet zero weights, and two pieces
// (error amax / 65024 each) got it wrong by 140% (a test-drive). So a group whose nonzero
// entries are 3/8 or more at or below amax / kVnniWideRange ("bulk") takes three pieces too
// when the bulk's mean |x| is below amax / kVnniBulkRange, and the row takes the exact fp32 path
// below amax / kVnniBulkFp32, where three pieces (resolution amax / 2^24) no longer hold the bulk
// to fp16's precision. (3/8 and not half: with half the entries at amax and half tiny, one of
// those rounded to 0 in fp16 put the bulk just under half, and one piece lost 25% of the output; the
// AVX2 GEMV decides per group, where no other group of the row covers for that. The share of
// Gaussian, uniform, Laplace, Student-t, ReLU'd and log-normal groups taking more pieces is the same
// at 3/8 and 1/2 to 1e-3.) Gaussian, uniform, Laplace, Student-t, log-normal and ReLU'd groups of
// 32-128 never trip these on their own (simulated: 200 rows of 4096; heavy-tailed and ReLU'd rows
// mostly take three pieces by kVnniWideRange already). With fp16 x a bulk between amax / 32 and
// amax / 8 whose large entries all meet zero weights can still see up to ~2.2x F.linear's error.
constexpr float kVnniBulkRange = 32.f;
// A row of x whose nonzero group amaxes span more than this factor takes the fp32 path (see vnni_prep).
// A mitigation, not a bound: the GEMV sums the products and the zero-point term (z s a_g S_g) in fp32
// apart, so large groups of x on weights at their zero point leave fp32's rounding of their two equal
// terms, ~2^-24 of them per group, in place of the other groups' products. One such group at 255x
// stays within F.linear's error; many (31 of 32 groups, 4-bit, z = 8) reach 21x bf16's and 313x
// fp16's error at 255x, and ~10x fp16's at 16x (a review's cases). The exact fix is the AVX2 int16
// GEMV's: the zero point's integer part subtracted from the exact integer sums (here per lane, before
// the int -> float conversion); not done, as it adds a multiply per chunk and row that could not be
// timed on an AVX-512 CPU. Extreme ranges (1e10 beside 1e-10: 100% error) are what this catches.
constexpr float kVnniGroupRange = 256.f;
constexpr float kVnniBulkFp32 = 1024.f;
// A group with 0 < amax below this (2^-64, only reachable with bf16 x: fp32 x never takes this
// GEMV, fp16 cannot hold such values) takes the fp32 path too: 127 / amax overflows below ~4e-37, and well before that a_g times the piece unit
// (1/65536) times the group scale leaves the normal fp32 range and loses bits.
constexpr float kVnniTinyAmax = 0x1p-64f;
// A group with amax above this (2^64) takes the fp32 path as well: a_g s_g (the group's unit of x
// times its scale) overflows fp32 for amax near 1e36 at s = 1e7, and inf times a group sum of 0
// (large entries on weights with q = z) gave NaN where the reference is finite. Below 2^64, a_g s_g
// stays finite for scales up to ~6e23.
constexpr float kVnniHugeAmax = 0x1p64f;

}  // namespace QK_ISA_NS
}  // namespace qk
// A lambda inlined into its caller (loop bodies instantiated for several cases).
#define QK_SI_LAMBDA __attribute__((always_inline))
#include "packed_avx2_i16.h"  // the AVX2 int16 GEMV (uses prep_f32 and the rules above)
namespace qk {
namespace QK_ISA_NS {

#if defined(QK_ISA_AVX512)
// ------------------------------------------------------------ AVX-512 fp32 LUT GEMV
template <int BITS, int MT, int NR>
inline void lut_gemv_block(const PackedW& P, const float* xp, int64_t n, Dt ydt, void* y, int64_t ldy,
                           const float* bias) {
  const int64_t Kp = P.Kp();
  const __m512 iota = lut_iota<BITS>();
  __m512 acc[MT][NR][2];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  const uint8_t* row[NR];
  for (int r = 0; r < NR; ++r) row[r] = P.qw + (n + r) * P.row_bytes;
  for (int64_t g = 0; g < P.G; ++g) {
    __m512 T[NR];
    for (int r = 0; r < NR; ++r)
      T[r] = lut_table(iota, meta_at(P.scales, P.mdt, (n + r) * P.G + g), meta_at(P.zeros, P.mdt, (n + r) * P.G + g));
    const int64_t j1 = qmin(P.nb, (g + 1) * P.gblk);
    for (int64_t j = g * P.gblk; j < j1; ++j) {
      __m512 w0[NR], w1[NR];
      for (int r = 0; r < NR; ++r) {
        if ((j & (BITS == 4 ? 3 : 7)) == 0) {  // once per 64-byte line of the primary plane
          QK_PF(row[r] + (BITS == 4 ? 16 : 8) * j + kPfRows * NR * P.row_bytes);
          if constexpr (BITS == 3) QK_PF(row[r] + 8 * P.nb + 4 * j + kPfRows * NR * P.row_bytes);
        }
        lut_block<BITS>(row[r], P.nb, j, T[r], w0[r], w1[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 x0 = _mm512_loadu_ps(xp + m * Kp + 32 * j), x1 = _mm512_loadu_ps(xp + m * Kp + 32 * j + 16);
        for (int r = 0; r < NR; ++r) {
          acc[m][r][0] = _mm512_fmadd_ps(x0, w0[r], acc[m][r][0]);
          acc[m][r][1] = _mm512_fmadd_ps(x1, w1[r], acc[m][r][1]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r)
      store_any(ydt, y, m * ldy + n + r,
                _mm512_reduce_add_ps(_mm512_add_ps(acc[m][r][0], acc[m][r][1])) + (bias ? bias[n + r] : 0.f));
}

template <int BITS, int MT>
inline void lut_gemv_rows_t(const PackedW& P, const float* xp, int64_t n0, int64_t n1, Dt ydt, void* y,
                            int64_t ldy, const float* bias) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) lut_gemv_block<BITS, MT, 2>(P, xp, n, ydt, y, ldy, bias);
  for (; n < n1; ++n) lut_gemv_block<BITS, MT, 1>(P, xp, n, ydt, y, ldy, bias);
}

template <int BITS>
inline void lut_gemv_rows_b(const PackedW& P, const float* xp, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                            int64_t ldy, const float* bias) {
  const int64_t slab = M <= 4 ? n1 - n0 : 16;  // see vnni_gemv_rows_b
  for (int64_t s0 = n0; s0 < n1; s0 += slab) {
    const int64_t s1 = qmin(n1, s0 + slab);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = xp + m0 * P.Kp();
      void* ym = static_cast<char*>(y) + m0 * ldy * (ydt == Dt::F32 ? 4 : 2);
      switch (qmin<int64_t>(4, M - m0)) {
        case 1: lut_gemv_rows_t<BITS, 1>(P, xm, s0, s1, ydt, ym, ldy, bias); break;
        case 2: lut_gemv_rows_t<BITS, 2>(P, xm, s0, s1, ydt, ym, ldy, bias); break;
        case 3: lut_gemv_rows_t<BITS, 3>(P, xm, s0, s1, ydt, ym, ldy, bias); break;
        default: lut_gemv_rows_t<BITS, 4>(P, xm, s0, s1, ydt, ym, ldy, bias); break;
      }
    }
  }
}

inline void lut_gemv_rows(const PackedW& P, const float* xp, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                          int64_t ldy, const float* bias) {
  QK_BITS_DISPATCH(P.bits, lut_gemv_rows_b, P, xp, M, n0, n1, ydt, y, ldy, bias)
}

#if defined(QK_ISA_EMU)  // isa_avx512emu.cpp: SIMDe functions, compiled for AVX2 (no target switch)
#define QK_VNNI_TARGET
#define QK_AMX_TARGET
#else
#define QK_VNNI_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni,avx512vbmi,gfni")))
#define QK_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,avx512vbmi,amx-tile,amx-bf16")))
#endif

// ------------------------------------------------------------ AVX-512 VNNI GEMV
// Workspace per row m of x (64-byte aligned pieces):
//   xh, xl, xu: int8 [nc][nfield][64]  the three pieces, permuted to the decode order
//   A:      fp32 [G16 + 16]        a_g per group (0 past G: a 16-group window may overhang)
//   X, X3:  fp32 [G16] each        sum over each group of x as two pieces carry it, and as three
//   mode:   int32                  kVnniTwo / kVnniThree (pieces this row needs) / kVnniFp32
//   xf:     fp32 [Kp]              x itself (for the fp32 fallback: inf / NaN or a tiny group range)
// Shared: gl int32 [nc][16] lane -> group index minus g0[c]; g0 int32 [nc].
struct VnniLayout {
  int64_t bpc, nfield, nc, G16;
  int64_t x_bytes, A_off, X_off, X3_off, mode_off, xf_off, per_m;
  int64_t gl_off, g0_off, total_shared;
};
inline VnniLayout vnni_layout(const PackedW& P) {
  VnniLayout L;
  L.bpc = P.bits == 4 ? 4 : 8;
  L.nfield = P.bits == 4 ? 2 : 4;
  L.nc = (P.nb + L.bpc - 1) / L.bpc;
  L.G16 = round_up(P.G, 16);
  L.x_bytes = L.nc * L.nfield * 64;
  L.A_off = 3 * L.x_bytes;
  L.X_off = L.A_off + round_up((L.G16 + 16) * 4, 64);
  L.X3_off = round_up(L.X_off + L.G16 * 4, 64);
  L.mode_off = round_up(L.X3_off + L.G16 * 4, 64);
  L.xf_off = L.mode_off + 64;
  L.per_m = round_up(L.xf_off + P.Kp() * 4, 64);
  L.gl_off = 0;
  L.g0_off = L.nc * 64;
  L.total_shared = round_up(L.g0_off + L.nc * 4, 64);
  return L;
}

enum VnniMode : int32_t { kVnniTwo = 0, kVnniThree = 1, kVnniFp32 = 2 };

// One piece of x, int8 [Kp] in natural order -> dst int8 [nc][nfield][64] in the decode order
// (field f of chunk c: each block's entries of field f, block after block), zero past the last
// block. Full chunks move whole qwords (int2 / int3: 8 bytes = one block's field) or 16-byte
// lanes (int4) with two-source permutes: a byte-wise copy of the same cost a few microseconds a
// call at K = 4096, a visible share of a small layer's GEMV.
inline void vnni_order_piece(const PackedW& P, const VnniLayout& L, const int8_t* src, int8_t* dst) {
  const int64_t full = P.nb / L.bpc;
  if (P.bits == 4) {  // a chunk: 4 blocks x 2 fields of 16 bytes, lane 2 b + f
    const __m512i f0 = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), f1 = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    for (int64_t c = 0; c < full; ++c) {
      const __m512i a = _mm512_loadu_si512(src + 128 * c), b = _mm512_loadu_si512(src + 128 * c + 64);
      _mm512_storeu_si512(dst + 128 * c, _mm512_permutex2var_epi64(a, f0, b));
      _mm512_storeu_si512(dst + 128 * c + 64, _mm512_permutex2var_epi64(a, f1, b));
    }
  } else {  // a chunk: 8 blocks x 4 fields of 8 bytes, qword 4 b + f
    for (int64_t c = 0; c < full; ++c) {
      __m512i in[4];
      for (int i = 0; i < 4; ++i) in[i] = _mm512_loadu_si512(src + 256 * c + 64 * i);
      for (int f = 0; f < 4; ++f) {
        const __m512i idx = _mm512_setr_epi64(f, 4 + f, 8 + f, 12 + f, f, 4 + f, 8 + f, 12 + f);
        const __m512i lo = _mm512_permutex2var_epi64(in[0], idx, in[1]), hi = _mm512_permutex2var_epi64(in[2], idx, in[3]);
        _mm512_storeu_si512(dst + (4 * c + f) * 64, _mm512_mask_blend_epi64(0xF0, lo, hi));
      }
    }
  }
  if (full == L.nc) return;
  int8_t* last = dst + full * L.nfield * 64;
  std::memset(last, 0, L.nfield * 64);
  const int64_t fb = P.bits == 4 ? 16 : 8;  // bytes of one field of one block
  for (int64_t j = full * L.bpc; j < P.nb; ++j)
    for (int64_t f = 0; f < L.nfield; ++f) std::memcpy(last + f * 64 + fb * (j - full * L.bpc), src + 32 * j + fb * f, fb);
}

// Lane -> group tables of the GEMV (shared by all rows of x): per chunk c, g0[c] is its first
// group rounded down to a multiple of 8 (a chunk spans at most 8 groups, so all its lanes fall in
// the window of 16 groups from there) and gl[16 c + lane] the lane's group minus g0[c]. Computed
// per call from the shape alone, 16 lanes at a time: a scalar loop with two 64-bit divisions per
// lane took ~14% of a small layer's prep.
inline void vnni_group_tables(const PackedW& P, const VnniLayout& L, uint8_t* ws) {
  int32_t* gl = reinterpret_cast<int32_t*>(ws + L.gl_off);
  int32_t* g0 = reinterpret_cast<int32_t*>(ws + L.g0_off);
  const int64_t lanes_per_block = 16 / L.bpc;
  const bool pow2 = (P.gblk & (P.gblk - 1)) == 0;
  if (P.G == 1 || !pow2) {  // one group per row (the only case with gblk not a power of two), or a fallback
    for (int64_t c = 0; c < L.nc; ++c) {
      const int64_t j0 = c * L.bpc;
      g0[c] = int32_t((j0 / P.gblk) & ~int64_t(7));
      for (int lane = 0; lane < 16; ++lane)
        gl[c * 16 + lane] = int32_t(qmin(P.nb - 1, j0 + lane / lanes_per_block) / P.gblk - g0[c]);
    }
    return;
  }
  const __m512i sh = _mm512_set1_epi32(__builtin_ctzll(uint64_t(P.gblk)));
  const __m512i lanes = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          __builtin_ctz(unsigned(lanes_per_block)));
  const __m512i last = _mm512_set1_epi32(int32_t(P.nb - 1));
  for (int64_t c = 0; c < L.nc; ++c) {
    const int64_t j0 = c * L.bpc;
    g0[c] = int32_t((j0 >> __builtin_ctzll(uint64_t(P.gblk))) & ~int64_t(7));
    const __m512i j = _mm512_min_epi32(_mm512_add_epi32(_mm512_set1_epi32(int32_t(j0)), lanes), last);
    _mm512_storeu_si512(gl + c * 16, _mm512_sub_epi32(_mm512_srlv_epi32(j, sh), _mm512_set1_epi32(g0[c])));
  }
}

// Rows [m0, m1) of x -> their int8 pieces, per-group scales and sums and mode (see VnniLayout).
// The third piece is computed and reordered only where the GEMV reads it: for a row in three-piece
// mode, or for every row when `all_pieces` (M > 1: one three-piece row makes the whole call read
// three pieces of every row).
inline void vnni_prep(const PackedW& P, Dt xdt, const void* x, int64_t ldx, int64_t m0, int64_t m1, uint8_t* ws,
                      bool all_pieces = true) {
  const VnniLayout L = vnni_layout(P);
  const int64_t Kp = P.Kp();
  if (m0 == 0) vnni_group_tables(P, L, ws);
  int8_t* h8 = static_cast<int8_t*>(scratch(3, 3 * Kp + 12 * P.G));
  int8_t* l8 = h8 + Kp;
  int8_t* u8 = l8 + Kp;
  float* ginv = reinterpret_cast<float*>(u8 + Kp);  // 127 / amax per group (Kp is a multiple of 32)
  int32_t* Sh = reinterpret_cast<int32_t*>(ginv + P.G);  // sums of the pieces h and l per group
  int32_t* Sl = Sh + P.G;
  const __m512 c127 = _mm512_set1_ps(127.f), cm127 = _mm512_set1_ps(-127.f), c256 = _mm512_set1_ps(256.f);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const float wide = xdt == Dt::BF16 ? kWideRangeBf16 : kVnniWideRange;
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* wm = ws + L.total_shared + m * L.per_m;
    float* A = reinterpret_cast<float*>(wm + L.A_off);
    float* X = reinterpret_cast<float*>(wm + L.X_off);
    float* X3 = reinterpret_cast<float*>(wm + L.X3_off);
    int32_t* mode = reinterpret_cast<int32_t*>(wm + L.mode_off);
    float* xf = reinterpret_cast<float*>(wm + L.xf_off);
    prep_f32(P, xdt, static_cast<const char*>(x) + m * ldx * (xdt == Dt::F32 ? 4 : 2), ldx, 0, 1, xf);
    std::memset(X, 0, L.G16 * 4);
    std::memset(X3, 0, L.G16 * 4);
    std::memset(A, 0, (L.G16 + 16) * 4);
    *mode = kVnniTwo;
    for (int64_t g = 0; g < P.G; ++g) {
      const int64_t k0 = g * P.gblk * 32, k1 = qmin(Kp, (g + 1) * P.gblk * 32);  // multiples of 32
      __m512 vmax = _mm512_setzero_ps(), vabs = _mm512_setzero_ps();
      __m512 vhi = _mm512_set1_ps(-INFINITY), vlo = _mm512_set1_ps(INFINITY);
      const int64_t kx = qmin(k1, P.K);  // signed extremes over real entries only (not K's zero padding)
      for (int64_t k = k0; k < k1; k += 16) {
        const __m512 xv = _mm512_loadu_ps(xf + k), a = _mm512_and_ps(xv, absmask);
        vmax = _mm512_max_ps(a, vmax);  // NaN in a propagates (max returns its second operand)
        vabs = _mm512_add_ps(vabs, a);
        const __mmask16 real = kx - k >= 16 ? __mmask16(0xFFFF) : kx <= k ? __mmask16(0) : __mmask16((1u << (kx - k)) - 1u);
        vhi = _mm512_mask_max_ps(vhi, real, xv, vhi);
        vlo = _mm512_mask_min_ps(vlo, real, xv, vlo);
      }
      const float amax = _mm512_reduce_max_ps(vmax), asum = _mm512_reduce_add_ps(vabs);
      // inf or NaN somewhere in the group (the sum of |x| sees both), or a range too tiny or too
      // large to scale
      if (!(asum <= 3.0e38f) || (amax > 0.f && amax < kVnniTinyAmax) || amax > kVnniHugeAmax) {
        *mode = kVnniFp32;
        break;
      }
      // the padded tail of the last group counts as zeros in the mean, which only errs towards three pieces
      if (amax * float(k1 - k0) > wide * asum) *mode = kVnniThree;
      // x spread over less than amax / 8 (a DC offset with small variations): two pieces' error,
      // amax / 65024 per entry, is then large next to what varies, and rows of W whose products
      // cancel the offset leave only that error (x = 3 + 0.01 noise on balanced weights: 0.3% error
      // where F.linear is exact; the AVX2 GEMV's rule, found there first)
      if (_mm512_reduce_max_ps(vhi) - _mm512_reduce_min_ps(vlo) < amax * (1.f / kVnniWideRange)) *mode = kVnniThree;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      ginv[g] = inv;
      A[g] = amax / 127.f;
      const __m512 vinv = _mm512_set1_ps(inv), vsmall = _mm512_set1_ps(amax / kVnniWideRange);
      __m512 vbulk = _mm512_setzero_ps();
      __m512i vsh = _mm512_setzero_si512(), vsl = _mm512_setzero_si512();  // sums of the pieces h, l
      int64_t nbulk = 0, nnz = 0;
      for (int64_t k = k0; k < k1; k += 16) {
        const __m512 xa = _mm512_and_ps(_mm512_loadu_ps(xf + k), absmask);
        const __mmask16 nz = _mm512_cmp_ps_mask(xa, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __mmask16 small = _mm512_mask_cmp_ps_mask(nz, xa, vsmall, _CMP_LE_OQ);
        vbulk = _mm512_mask_add_ps(vbulk, small, vbulk, xa);
        nbulk += __builtin_popcount(small);
        nnz += __builtin_popcount(nz);
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xf + k), vinv);  // |v| <= 127
        __m512 h = _mm512_roundscale_ps(v, kRound);
        __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), c256), kRound);  // r1 in [-128, 128], exact
        // l = 128 does not fit int8: carry it into h (h < 127 there, since v - h > 0 needs v < 127)
        const __mmask16 carry = _mm512_cmp_ps_mask(l, _mm512_set1_ps(128.f), _CMP_EQ_OQ);
        h = _mm512_mask_add_ps(h, carry, h, _mm512_set1_ps(1.f));
        l = _mm512_mask_sub_ps(l, carry, l, c256);
        const __m512i hi = _mm512_cvtps_epi32(h), li = _mm512_cvtps_epi32(l);
        vsh = _mm512_add_epi32(vsh, hi);
        vsl = _mm512_add_epi32(vsl, li);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(h8 + k), _mm512_cvtsepi32_epi8(hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(l8 + k), _mm512_cvtsepi32_epi8(li));
      }
      // The zero-point term takes the sum of x as the pieces carry it (x^ = a (h + l / 256)), not
      // of x itself: the GEMV then computes s sum (q - z) x^ exactly, whose error follows |q - z|.
      // With the exact sum the piece error entered as s sum q e, weighted by q ~ z: x with a DC
      // offset (correlated e) got 8-19x F.linear's error (fp16 / bf16, weights exact in them).
      // Integer sums: |h|, |l| <= 128, so int32 holds groups of up to 2^24 entries.
      Sh[g] = _mm512_reduce_add_epi32(vsh);
      Sl[g] = _mm512_reduce_add_epi32(vsl);
      X[g] = float(double(A[g]) * (double(Sh[g]) + double(Sl[g]) / 256.0));
      if (8 * nbulk >= 3 * nnz && nbulk > 0) {  // (3/8: kVnniBulkRange)
        const float bulk = _mm512_reduce_add_ps(vbulk);
        if (amax * float(nbulk) > kVnniBulkFp32 * bulk) {
          *mode = kVnniFp32;
          break;
        }
        if (amax * float(nbulk) > kVnniBulkRange * bulk) *mode = kVnniThree;
      }
    }
    // Groups whose amax spans more than kVnniGroupRange: the GEMV sums the products and the zero-point
    // term (z s a_g S_g) in fp32 apart, so a group of large x on weights with q = z leaves fp32's
    // rounding of its two equal terms, ~2^-24 of them, in place of the smaller groups' products
    // (x = 1e10 on such a group beside groups of 1e-10: 100% error). Such rows take the fp32 path.
    if (*mode != kVnniFp32) {
      float lo = INFINITY, hi = 0.f;
      for (int64_t g = 0; g < P.G; ++g)
        if (A[g] > 0.f) {
          lo = qmin(lo, A[g]);
          hi = qmax(hi, A[g]);
        }
      if (hi > kVnniGroupRange * lo) *mode = kVnniFp32;
    }
    if (*mode == kVnniFp32) continue;
    const int np = all_pieces || *mode == kVnniThree ? 3 : 2;
    if (np == 3) {  // the third piece: what the first two leave, times 2^16 (from l before its carry)
      for (int64_t g = 0; g < P.G; ++g) {
        const int64_t k0 = g * P.gblk * 32, k1 = qmin(Kp, (g + 1) * P.gblk * 32);
        const __m512 vinv = _mm512_set1_ps(ginv[g]);
        __m512i vsu = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k += 16) {
          const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xf + k), vinv);
          const __m512 r1 = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_roundscale_ps(v, kRound)), c256);
          const __m512 l = _mm512_roundscale_ps(r1, kRound);
          const __m512 u = _mm512_min_ps(c127, _mm512_max_ps(cm127, _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(r1, l), c256), kRound)));
          const __m512i ui = _mm512_cvtps_epi32(u);
          vsu = _mm512_add_epi32(vsu, ui);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(u8 + k), _mm512_cvtsepi32_epi8(ui));
        }
        // (h and l after the carry: 256 h + l is the same either way)
        X3[g] = float(double(A[g]) * (double(Sh[g]) + double(Sl[g]) / 256.0 +
                                      double(_mm512_reduce_add_epi32(vsu)) / 65536.0));
      }
    }
    const int8_t* src[3] = {h8, l8, u8};
    for (int p = 0; p < np; ++p) vnni_order_piece(P, L, src[p], reinterpret_cast<int8_t*>(wm + p * L.x_bytes));
  }
}

template <Dt MD>
QK_SI __m512 load_meta16(const void* p, int64_t i, __mmask16 k) {
  if constexpr (MD == Dt::F32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  else if constexpr (MD == Dt::F16)
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i));
  else
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i)), 16));
}

QK_SI __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
QK_SI __mmask64 mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }


// The code fields of one chunk of one row: NF vectors of one code per byte, in the decode
// order of vnni_order_piece. Also prefetches the row pf bytes ahead. Z4: the Zen 4 decode (2-bit
// fields from shifts, taken with one row of x; 3-bit fields from lookups, taken with every M).
template <int BITS, bool Z4>
QK_VNNI_TARGET QK_SI void vnni_decode(const uint8_t* row, int64_t nb, int64_t j0, int64_t nvalid, bool full, int64_t pf,
                                      const __m512i* ctrl, const __m512i* lshift, __m512i* fld) {
  constexpr int64_t bpb = BITS == 4 ? 16 : 8;  // bytes per block in the primary plane
  const __m512i m0f = _mm512_set1_epi8(BITS == 4 ? 0x0F : 0x03);
  // Software prefetch of the same line NR rows ahead (the next block of rows): with
  // the hardware streamer alone a cold row stream ran at ~60% of the bandwidth.
  QK_PF(row + bpb * j0 + pf);
  if constexpr (BITS == 3) QK_PF(row + 8 * nb + 4 * j0 + pf);
  __m512i w = full ? _mm512_loadu_si512(row + bpb * j0) : _mm512_maskz_loadu_epi8(mask64(bpb * nvalid), row + bpb * j0);
  // one load into a register: GCC otherwise folds it into every field's shift / AND (a zmm load each)
#if !defined(QK_ISA_EMU)  // (no zmm registers there)
  __asm__("" : "+v"(w));
#endif
  // Fields f > 0 come from vpmultishiftqb (port 5 on the Xeons) rather than a shift (port 0,
  // which also runs every vpdpbusd and the int->float conversion). On Zen 4 it is the other way
  // round (see kZen4Gemv): with one row of x, 2-bit fields come from 16-bit shifts there (the
  // ablation in RESULTS_packed_linear.md; 4 bits, and 2 bits with several rows of x, measured no
  // faster that way, so they keep vpmultishiftqb), and 3-bit fields from lookups (below).
  // The AND that follows drops the bits pulled in from the next byte.
  if constexpr (BITS == 4) {
    fld[0] = _mm512_and_si512(w, m0f);
    fld[1] = _mm512_and_si512(_mm512_multishift_epi64_epi8(lshift[2], w), m0f);
  } else if constexpr (BITS == 3 && Z4) {
    // The Zen 4 form (every M): 9 instructions for the 4 fields instead of 16, and only the one
    // vgf2p8affineqb on vpdpbusd's pipe instead of 7 vpmultishiftqb. The high bits of block b are
    // bit 8 f + p of its word h_b (weight 8 f + p). The spread puts h_b's bytes (one per field) at
    // bytes 2, 3, 6, 7 of qword b; vgf2p8affineqb with one-hot bytes as data then transposes each
    // qword's 8x8 bits, giving every byte p the high bits of weight p of fields 0, 1, 2, 3 at bits
    // 5, 4, 1, 0 (T). Two selects build 6-bit indices, [c0 c1 h1 h0] from the low plane's byte
    // (c_f = bits 2f, 2f + 1) and [h3 h2 c2 c3] from it shifted right by 2, and a vpermb lookup
    // per field maps an index to c_f + 4 h_f (vpermb reads bits 0-5 only; the rest are don't-cares).
    // (Gains: kZen4Gemv's (5). ANDs and shifts in place of the 4 lookups, 12 instructions, measured
    // 18.2 against 17.8 cycles at M = 1.)
    alignas(64) static constexpr auto tabs = [] {
      std::array<uint8_t, 384> t{};  // 0-255: the field lookups; 256: the spread; 320: one-hot
      for (int i = 0; i < 64; ++i) {
        t[i] = uint8_t((i & 3) | ((i >> 5 & 1) << 2));
        t[64 + i] = uint8_t((i >> 2 & 3) | ((i >> 4 & 1) << 2));
        t[128 + i] = uint8_t((i >> 2 & 3) | ((i >> 1 & 1) << 2));
        t[192 + i] = uint8_t((i >> 4 & 3) | ((i & 1) << 2));
        constexpr int byte_of_h[8] = {0, 0, 0, 1, 2, 2, 2, 3};  // bytes 0, 1, 4, 5: don't-cares
        t[256 + i] = uint8_t(4 * (i >> 3) + byte_of_h[i & 7]);
        t[320 + i] = uint8_t(1u << (i & 7));
      }
      return t;
    }();
    const uint8_t* hp = row + 8 * nb + 4 * j0;
    const __m512i hw = full ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hp)))
                            : _mm512_maskz_loadu_epi32(__mmask16((1u << nvalid) - 1u), hp);
    const __m512i hq = _mm512_permutexvar_epi8(_mm512_load_si512(tabs.data() + 256), hw);
    const __m512i T = _mm512_gf2p8affine_epi64_epi8(_mm512_load_si512(tabs.data() + 320), hq, 0);
    // ternlog 0xE4: c ? a : b, bit by bit
    const __m512i i01 = _mm512_ternarylogic_epi32(w, T, _mm512_set1_epi8(0x0F), 0xE4);
    const __m512i i23 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 2), T, _mm512_set1_epi8(char(0xFC)), 0xE4);
    for (int f = 0; f < 4; ++f) fld[f] = _mm512_permutexvar_epi8(f < 2 ? i01 : i23, _mm512_load_si512(tabs.data() + 64 * f));
  } else if constexpr (BITS == 2) {
    fld[0] = _mm512_and_si512(w, m0f);
    for (int f = 1; f < 4; ++f)
      fld[f] = _mm512_and_si512(Z4 ? _mm512_srli_epi16(w, 2 * f) : _mm512_multishift_epi64_epi8(lshift[f], w), m0f);
  } else {
    const __m256i hw = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * nb + 4 * j0))
                            : _mm256_maskz_loadu_epi32(__mmask8((1u << nvalid) - 1u), row + 8 * nb + 4 * j0);
    const __m512i hq = _mm512_cvtepu32_epi64(hw);
    const __m512i three = _mm512_set1_epi8(0x03), seven = _mm512_set1_epi8(0x07);
    for (int f = 0; f < 4; ++f) {
      const __m512i lo = f == 0 ? w : _mm512_multishift_epi64_epi8(lshift[f], w);
      const __m512i hb = _mm512_multishift_epi64_epi8(ctrl[f], hq);
      fld[f] = _mm512_and_si512(_mm512_ternarylogic_epi32(lo, hb, three, 0xE4), seven);
    }
  }
}

// sum over the pieces p of 256^(NP-1-p) * (q . x_p) per int32 lane (int32: |sum| < 2^31 for
// every bit width): each piece's products accumulate onto the shifted sum of the ones before.
// SPLIT: one chain of vpdpbusd per piece, added at the end (the same integers): with 4 fields the
// single chain is 8-12 vpdpbusd of 4 cycles each, and on Zen 4 the one-row int2 GEMV ran ~5%
// faster cold with the chains split (int3 the same; int4, 2 fields, 9% slower, so it keeps one).
template <int NF, int NP, bool SPLIT = false>
QK_VNNI_TARGET QK_SI __m512i vnni_products(const __m512i* fld, const __m512i (*xv)[NF]) {
  if constexpr (SPLIT) {
    __m512i part[NP];
    for (int p = 0; p < NP; ++p) {
      part[p] = _mm512_setzero_si512();
      for (int f = 0; f < NF; ++f) part[p] = _mm512_dpbusd_epi32(part[p], fld[f], xv[p][f]);
    }
    __m512i acc = part[0];
    for (int p = 1; p < NP; ++p) acc = _mm512_add_epi32(_mm512_slli_epi32(acc, 8), part[p]);
    return acc;
  }
  __m512i acc = _mm512_setzero_si512();
  for (int p = 0; p < NP; ++p) {
    if (p) acc = _mm512_slli_epi32(acc, 8);
    for (int f = 0; f < NF; ++f) acc = _mm512_dpbusd_epi32(acc, fld[f], xv[p][f]);
  }
  return acc;
}

// NR rows of W at a time (independent work for the out-of-order core; x loads shared).
// NP: pieces of x (2 or 3, see kVnniWideRange). Z4: the Zen 4 form (kZen4Gemv); with MT = 1 it
// reads its group scales from sbuf.
template <int BITS, int MT, int NR, Dt MD, int NP, bool Z4>
QK_VNNI_TARGET QK_SI void vnni_gemv_block(const PackedW& P, const VnniLayout& L, const int32_t* gl, const int32_t* g0v,
                                          const uint8_t* const* wm, const __m512i* ctrl, const __m512i* lshift,
                                          const int64_t* rn, int64_t adv, Dt ydt, void* y, int64_t ldy,
                                          const float* bias, float* sbuf) {
  constexpr int NF = BITS == 4 ? 2 : 4;
  constexpr int64_t es = MD == Dt::F32 ? 4 : 2;
  const uint8_t* row[NR];
  const char* srow_s[NR];
  const char* srow_z[NR];
  __m512 yacc[NR][MT], sa[NR][MT];
  for (int r = 0; r < NR; ++r) {
    row[r] = P.qw + rn[r] * P.row_bytes;
    srow_s[r] = static_cast<const char*>(P.scales) + rn[r] * P.G * es;
    srow_z[r] = static_cast<const char*>(P.zeros) + rn[r] * P.G * es;
    for (int m = 0; m < MT; ++m) yacc[r][m] = sa[r][m] = _mm512_setzero_ps();
  }
  int64_t gwin = -1;
  const __m512 piece_unit = _mm512_set1_ps(NP == 2 ? 1.f / 256.f : 1.f / 65536.f);  // A[g] is amax / 127
  const int64_t pf = adv == 1 ? kPfBytes : kPfRows * adv * P.row_bytes;
  // Loops over a runtime range go outside the loops over r and m throughout: a loop over r
  // around one that GCC cannot unroll made it keep yacc, row and srow_* in memory (a store of
  // every accumulator per chunk).
  for (int64_t b = 0; b < P.G * es; b += 64)  // the metadata rows of the next block of rows
    for (int r = 0; r < NR; ++r) {
      QK_PF(srow_s[r] + kPfRows * adv * P.G * es + b);
      QK_PF(srow_z[r] + kPfRows * adv * P.G * es + b);
    }
  // s[n, g] * a_g / 256 (or / 65536 with three pieces): each chunk picks its lanes' groups from
  // a window of 16 groups starting at g0v[c] with one permute. The window's products are made in
  // registers whenever it moves (every 8 groups), or with Z4 and one row of x for the whole row
  // into sbuf (one row [G16 + 16] per r) before the chunk loop, each chunk loading its window from
  // there: on Zen 4 the moves cost ~10 cycles per row and window on the chunk's critical path
  // (with several rows of x they are shared by them, and loading from sbuf measured slower).
  const int64_t sstride = L.G16 + 16;
  constexpr bool kRowBuf = Z4 && MT == 1;
  if constexpr (kRowBuf) {
    for (int64_t g = 0; g < P.G; g += 16) {
      const __mmask16 k = mask16(P.G - g);
      const __m512 a16 = _mm512_loadu_ps(reinterpret_cast<const float*>(wm[0] + L.A_off) + g);
      for (int r = 0; r < NR; ++r)
        _mm512_store_ps(sbuf + r * sstride + g, _mm512_mul_ps(a16, _mm512_mul_ps(load_meta16<MD>(srow_s[r], g, k), piece_unit)));
    }
  }
  // Full chunks take a path of their own: with `full` known at compile time every row's load is
  // a plain one (no mask built from nvalid, no branch per row).
  auto chunk = [&](int64_t c, auto full_t) QK_SI_LAMBDA {
    constexpr bool full = decltype(full_t)::value;
    const int64_t j0 = c * L.bpc;
    const int64_t nvalid = full ? L.bpc : P.nb - j0;
    const int64_t g0 = g0v[c];
    if (!kRowBuf && g0 != gwin) {
      for (int r = 0; r < NR; ++r) {
        const __m512 s16 = _mm512_mul_ps(load_meta16<MD>(srow_s[r], g0, mask16(P.G - g0)), piece_unit);
        for (int m = 0; m < MT; ++m)
          sa[r][m] = _mm512_mul_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(wm[m] + L.A_off) + g0), s16);
      }
      gwin = g0;
    }
    const __m512i gidx = _mm512_loadu_si512(gl + c * 16);
    __m512i xv[NP][NF];
#define QK_LOAD_X(m)                                                                  \
  for (int p = 0; p < NP; ++p)                                                        \
    for (int f = 0; f < NF; ++f)                                                      \
      xv[p][f] = _mm512_load_si512(reinterpret_cast<const int8_t*>(wm[m]) + c * NF * 64 + p * L.x_bytes + f * 64);
    if constexpr (kRowBuf) {
      // each row of W decoded just before its products: one row's fields live at a time
      QK_LOAD_X(0)
      for (int r = 0; r < NR; ++r) {
        __m512i fld[NF];
        vnni_decode<BITS, true>(row[r], P.nb, j0, nvalid, full, pf, ctrl, lshift, fld);
        const __m512 sw = _mm512_permutexvar_ps(gidx, _mm512_loadu_ps(sbuf + r * sstride + g0));
        yacc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps((vnni_products<NF, NP, NF == 4>(fld, xv))), sw, yacc[r][0]);
      }
    } else {
      __m512i fld[NR][NF];
      // the Zen 4 2-bit decode pays with one row of x only (see kZen4Gemv)
      for (int r = 0; r < NR; ++r) vnni_decode<BITS, Z4 && BITS == 3>(row[r], P.nb, j0, nvalid, full, pf, ctrl, lshift, fld[r]);
      for (int m = 0; m < MT; ++m) {
        QK_LOAD_X(m)
        for (int r = 0; r < NR; ++r) {
          const __m512 sw = _mm512_permutexvar_ps(gidx, sa[r][m]);
          yacc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps((vnni_products<NF, NP>(fld[r], xv))), sw, yacc[r][m]);
        }
      }
    }
#undef QK_LOAD_X
  };
  const int64_t nfull = P.nb / L.bpc;
  for (int64_t c = 0; c < nfull; ++c) chunk(c, std::true_type{});
  if (nfull < L.nc) chunk(nfull, std::false_type{});
  // zero-point term: - sum_g z * s * X_g (X_g: the group's sum of x as the NP pieces carry it)
  __m512 zacc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) zacc[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < P.G; g += 16) {
    const __mmask16 k = mask16(P.G - g);
    for (int r = 0; r < NR; ++r) {
      const __m512 zs = _mm512_mul_ps(load_meta16<MD>(srow_z[r], g, k), load_meta16<MD>(srow_s[r], g, k));
      for (int m = 0; m < MT; ++m)
        zacc[r][m] = _mm512_fmadd_ps(zs, _mm512_load_ps(reinterpret_cast<const float*>(wm[m] + (NP == 2 ? L.X_off : L.X3_off)) + g), zacc[r][m]);
    }
  }
  // Reduced in a loop of its own that unrolls: with the calls of store_any in it, the loop stayed a
  // loop over yacc's address, so yacc lived in memory.
  float ys[NR][MT];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) ys[r][m] = _mm512_reduce_add_ps(yacc[r][m]) - _mm512_reduce_add_ps(zacc[r][m]);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) store_any(ydt, y, m * ldy + rn[r], ys[r][m] + (bias ? bias[rn[r]] : 0.f));
}

template <int BITS, int MT, Dt MD, int NP, bool Z4>
QK_VNNI_TARGET void vnni_gemv_rows_t(const PackedW& P, const uint8_t* ws, const uint8_t* xm, int64_t n0, int64_t n1,
                                     Dt ydt, void* y, int64_t ldy, const float* bias) {
  const VnniLayout L = vnni_layout(P);
  const int32_t* gl = reinterpret_cast<const int32_t*>(ws + L.gl_off);
  const int32_t* g0v = reinterpret_cast<const int32_t*>(ws + L.g0_off);
  const uint8_t* wm[MT];
  for (int m = 0; m < MT; ++m) wm[m] = xm + m * L.per_m;
  __m512i ctrl[4];
  for (int f = 0; f < 4; ++f) {
    alignas(64) uint8_t c[64];
    for (int i = 0; i < 64; ++i) c[i] = uint8_t((8 * f + (i & 7) - 2) & 63);
    ctrl[f] = _mm512_load_si512(c);
  }
  // lshift[f]: byte i of every qword takes bits [8 i + 2 f, 8 i + 2 f + 8), i.e. byte i >> 2 f
  // in its low bits (f = 2 is the high nibble of the 4-bit format).
  __m512i lshift[4];
  for (int f = 0; f < 4; ++f) {
    alignas(64) uint8_t c[64];
    for (int i = 0; i < 64; ++i) c[i] = uint8_t(8 * (i & 7) + 2 * f);
    lshift[f] = _mm512_load_si512(c);
  }
  // M = 1 and 2: NS rows from NS equal, far-apart slices of [n0, n1) in lockstep, i.e. NS
  // concurrent sequential streams (see kStreams); larger M and short ranges: NR adjacent rows.
  constexpr int NS = MT == 1 ? 4 : 2;
  // NR = 2 at MT = 3 / 4 too on Zen 4: one rows' x loads then serve two rows of W (a zmm load from
  // L1 costs ~2 cycles there); 19-21 -> 12-15 cycles per 256 weights and row of x at M = 3-8.
  constexpr int NR = MT == 1 && BITS == 4 ? 1 : MT <= 2 || Z4 ? 2 : 1;  // see kPfBytes
  int64_t rn[NS > NR ? NS : NR];
  float* sbuf = Z4 && MT == 1 ? static_cast<float*>(scratch(4, size_t(NS > NR ? NS : NR) * (L.G16 + 16) * 4)) : nullptr;
  int64_t n = n0;
  bool spread = false;
  if constexpr (MT <= 2) {
    const int64_t len = (n1 - n0) / NS;
    spread = kStreams && len >= 8;
    for (int64_t i = 0; spread && i < len; ++i) {
      for (int r = 0; r < NS; ++r) rn[r] = n0 + r * len + i;
      vnni_gemv_block<BITS, MT, NS, MD, NP, Z4>(P, L, gl, g0v, wm, ctrl, lshift, rn, 1, ydt, y, ldy, bias, sbuf);
    }
    if (spread) n = n0 + NS * len;
  }
  for (; !spread && n + NR <= n1; n += NR) {
    for (int r = 0; r < NR; ++r) rn[r] = n + r;
    vnni_gemv_block<BITS, MT, NR, MD, NP, Z4>(P, L, gl, g0v, wm, ctrl, lshift, rn, NR, ydt, y, ldy, bias, sbuf);
  }
  for (; n < n1; ++n) {
    rn[0] = n;
    vnni_gemv_block<BITS, MT, 1, MD, NP, Z4>(P, L, gl, g0v, wm, ctrl, lshift, rn, 1, ydt, y, ldy, bias, sbuf);
  }
}

// MT rows of x in the Zen 4 form or not (with MT = 2 the forms differ only in the int3 decode).
template <int BITS, int MT, Dt MD, int NP>
inline void vnni_gemv_rows_z(bool z4, const PackedW& P, const uint8_t* ws, const uint8_t* xm, int64_t n0, int64_t n1,
                             Dt ydt, void* y, int64_t ldy, const float* bias) {
  if constexpr (MT != 2 || BITS == 3)
    if (z4) return vnni_gemv_rows_t<BITS, MT, MD, NP, true>(P, ws, xm, n0, n1, ydt, y, ldy, bias);
  vnni_gemv_rows_t<BITS, MT, MD, NP, false>(P, ws, xm, n0, n1, ydt, y, ldy, bias);
}

// Rows [m0, m0 + M) of x (all of one piece count NP).
template <int BITS, Dt MD, int NP>
inline void vnni_gemv_rows_b(const PackedW& P, const uint8_t* ws, int64_t m0, int64_t M, int64_t n0, int64_t n1,
                             Dt ydt, void* y, int64_t ldy, const float* bias) {
  const VnniLayout L = vnni_layout(P);
  const int64_t es = ydt == Dt::F32 ? 4 : 2;
  // Slabs of rows outer, groups of 4 rows of x inner: with M > 4 the slab is still in
  // cache for the second group, so the weight streams from memory once.
  const int64_t slab = M <= 4 ? n1 - n0 : 16;
  for (int64_t s0 = n0; s0 < n1; s0 += slab) {
    const int64_t s1 = qmin(n1, s0 + slab);
    for (int64_t mb = m0; mb < m0 + M; mb += 4) {
      const uint8_t* xm = ws + L.total_shared + mb * L.per_m;
      void* ym = static_cast<char*>(y) + mb * ldy * es;
      switch (qmin<int64_t>(4, m0 + M - mb)) {
        case 1: vnni_gemv_rows_z<BITS, 1, MD, NP>(kZen4Gemv, P, ws, xm, s0, s1, ydt, ym, ldy, bias); break;
        case 2: vnni_gemv_rows_z<BITS, 2, MD, NP>(kZen4Gemv, P, ws, xm, s0, s1, ydt, ym, ldy, bias); break;
        case 3: vnni_gemv_rows_z<BITS, 3, MD, NP>(kZen4Gemv, P, ws, xm, s0, s1, ydt, ym, ldy, bias); break;
        default: vnni_gemv_rows_z<BITS, 4, MD, NP>(kZen4Gemv, P, ws, xm, s0, s1, ydt, ym, ldy, bias); break;
      }
    }
  }
}

template <int BITS, Dt MD>
inline void vnni_gemv_rows_md(const PackedW& P, const uint8_t* ws, int64_t M, int64_t n0, int64_t n1, Dt ydt,
                              void* y, int64_t ldy, const float* bias) {
  const VnniLayout L = vnni_layout(P);
  auto mode = [&](int64_t m) { return *reinterpret_cast<const int32_t*>(ws + L.total_shared + m * L.per_m + L.mode_off); };
  bool three = false, vnni_only = true;
  for (int64_t m = 0; m < M; ++m) {
    three |= mode(m) == kVnniThree;
    vnni_only &= mode(m) != kVnniFp32;
  }
  if (vnni_only) {  // the common case: every row of x in one pass over the weight
    if (three) return vnni_gemv_rows_b<BITS, MD, 3>(P, ws, 0, M, n0, n1, ydt, y, ldy, bias);
    return vnni_gemv_rows_b<BITS, MD, 2>(P, ws, 0, M, n0, n1, ydt, y, ldy, bias);
  }
  // x holds inf or NaN, a group range below kVnniTinyAmax or above kVnniHugeAmax, a bulk below
  // kVnniBulkFp32, or group amaxes spanning more than kVnniGroupRange: those rows take the fp32 LUT
  // GEMV on x itself (inf / NaN propagate as in a float product); the other rows stay on this path,
  // one at a time (so such a row makes the call read the weight once per row of x).
  const int64_t es = ydt == Dt::F32 ? 4 : 2;
  for (int64_t m = 0; m < M; ++m) {
    if (mode(m) == kVnniFp32) {
      const float* xf = reinterpret_cast<const float*>(ws + L.total_shared + m * L.per_m + L.xf_off);
      lut_gemv_rows_t<BITS, 1>(P, xf, n0, n1, ydt, static_cast<char*>(y) + m * ldy * es, ldy, bias);
    } else if (mode(m) == kVnniThree) {
      vnni_gemv_rows_b<BITS, MD, 3>(P, ws, m, 1, n0, n1, ydt, y, ldy, bias);
    } else {
      vnni_gemv_rows_b<BITS, MD, 2>(P, ws, m, 1, n0, n1, ydt, y, ldy, bias);
    }
  }
}

template <int BITS>
inline void vnni_gemv_rows_m(const PackedW& P, const uint8_t* ws, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                             int64_t ldy, const float* bias) {
  switch (P.mdt) {
    case Dt::F32: return vnni_gemv_rows_md<BITS, Dt::F32>(P, ws, M, n0, n1, ydt, y, ldy, bias);
    case Dt::F16: return vnni_gemv_rows_md<BITS, Dt::F16>(P, ws, M, n0, n1, ydt, y, ldy, bias);
    default: return vnni_gemv_rows_md<BITS, Dt::BF16>(P, ws, M, n0, n1, ydt, y, ldy, bias);
  }
}

inline void vnni_gemv_rows(const PackedW& P, const uint8_t* ws, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                           int64_t ldy, const float* bias) {
  switch (P.bits) {
    case 4: return vnni_gemv_rows_m<4>(P, ws, M, n0, n1, ydt, y, ldy, bias);
    case 3: return vnni_gemv_rows_m<3>(P, ws, M, n0, n1, ydt, y, ldy, bias);
    default: return vnni_gemv_rows_m<2>(P, ws, M, n0, n1, ydt, y, ldy, bias);
  }
}

// ------------------------------------------------------------ AMX-BF16 GEMM
// Y^T [N, M] = W [N, K] . X^T: the A operand is a panel of 32 rows of W dequantized to
// bf16 (rounded as W_deq.to(bfloat16)), the B operand is x in the AMX pair layout.
// Both read K in the same permuted order inside chunks of 128 (the order the
// codes decode in), so the dot products are unchanged:
//   4 bits: position 32 h + 16 b + p  <-> k = 32 b + 16 h + p   (chunk of 2 blocks, per 64)
//   2/3 bits: position 32 f + 8 b + p <-> k = 32 b + 8 f + p    (chunk of 4 blocks)
// xT layout: bf16 [Mt][Kpa / 2][16 m][2], Kpa = round_up(Kp, 128).
struct alignas(64) TileCfg {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline bool amx_permitted() {
#if defined(QK_ISA_EMU)
  return false;
#endif
  static const bool ok = [] {
    // ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

QK_SI void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
  }
}

inline int64_t amx_kpa(const PackedW& P) { return round_up(P.Kp(), 128); }
// k of panel position pos (pos < Kpa)
QK_SI int64_t amx_k_of(int bits, int64_t pos) {
  if (bits == 4) {
    const int64_t c = pos / 64, r = pos % 64, h = r / 32, b = (r % 32) / 16, p = r % 16;
    return c * 64 + 32 * b + 16 * h + p;
  }
  const int64_t c = pos / 128, r = pos % 128, f = r / 32, b = (r % 32) / 8, p = r % 8;
  return c * 128 + 32 * b + 8 * f + p;
}

// x (bf16 [M, K], row stride ldx) rows of m-tiles [t0, t1) -> xT.
inline void amx_prep(const PackedW& P, const void* x, int64_t ldx, int64_t M, int64_t t0, int64_t t1, uint16_t* xT) {
  const int64_t Kpa = amx_kpa(P);
  const int run = P.bits == 4 ? 16 : 8;  // contiguous run of k in the permutation
  uint16_t* xr = static_cast<uint16_t*>(scratch(2, size_t(16) * Kpa * 2));
  const uint16_t* xs = static_cast<const uint16_t*>(x);
  for (int64_t mt = t0; mt < t1; ++mt) {
    for (int i = 0; i < 16; ++i) {  // permuted, zero-padded copy of the 16 rows
      const int64_t m = mt * 16 + i;
      uint16_t* o = xr + i * Kpa;
      if (m >= M) {
        std::memset(o, 0, Kpa * 2);
        continue;
      }
      // whole chunks in registers: within a chunk the permutation moves blocks of `run` elements, a
      // transpose of 128-bit lanes (2/3 bits: 4 x 4 blocks of 8) or of 256-bit halves (4 bits: 2 x 2
      // blocks of 16)
      const uint16_t* xm = xs + m * ldx;
      const int64_t chunk = P.bits == 4 ? 64 : 128;
      int64_t pos = 0;
      for (; pos + chunk <= Kpa && pos + chunk <= P.K; pos += chunk) {
        if (P.bits == 4) {
          const __m512i a = _mm512_loadu_si512(xm + pos), b = _mm512_loadu_si512(xm + pos + 32);
          _mm512_storeu_si512(o + pos, _mm512_shuffle_i64x2(a, b, 0x44));
          _mm512_storeu_si512(o + pos + 32, _mm512_shuffle_i64x2(a, b, 0xEE));
        } else {
          const __m512i a = _mm512_loadu_si512(xm + pos), b = _mm512_loadu_si512(xm + pos + 32),
                        c = _mm512_loadu_si512(xm + pos + 64), d = _mm512_loadu_si512(xm + pos + 96);
          const __m512i ab0 = _mm512_shuffle_i64x2(a, b, 0x88), ab1 = _mm512_shuffle_i64x2(a, b, 0xDD);
          const __m512i cd0 = _mm512_shuffle_i64x2(c, d, 0x88), cd1 = _mm512_shuffle_i64x2(c, d, 0xDD);
          _mm512_storeu_si512(o + pos, _mm512_shuffle_i64x2(ab0, cd0, 0x88));       // lane 0 of a, b, c, d
          _mm512_storeu_si512(o + pos + 32, _mm512_shuffle_i64x2(ab1, cd1, 0x88));  // lane 1
          _mm512_storeu_si512(o + pos + 64, _mm512_shuffle_i64x2(ab0, cd0, 0xDD));  // lane 2
          _mm512_storeu_si512(o + pos + 96, _mm512_shuffle_i64x2(ab1, cd1, 0xDD));  // lane 3
        }
      }
      for (; pos < Kpa; pos += run) {  // the last, partial chunk (and the zero padding)
        const int64_t k = amx_k_of(P.bits, pos);
        if (k + run <= P.K) {
          std::memcpy(o + pos, xm + k, run * 2);
        } else {
          for (int e = 0; e < run; ++e) o[pos + e] = k + e < P.K ? xm[k + e] : uint16_t(0);
        }
      }
    }
    for (int64_t ks = 0; ks < Kpa / 32; ++ks) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(xr + i * Kpa + ks * 32);
      transpose16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(xT + ((mt * (Kpa / 2)) + ks * 16 + i) * 32, r[i]);
    }
  }
}

// Row n's scales and zeros as fp32 (so tables use broadcasts from memory).
inline void meta_row_f32(const PackedW& P, int64_t n, float* sf, float* zf) {
  for (int64_t g = 0; g < P.G; g += 16) {
    const __mmask16 k = mask16(P.G - g);
    __m512 a, b;
    switch (P.mdt) {
      case Dt::F32: a = load_meta16<Dt::F32>(P.scales, n * P.G + g, k); b = load_meta16<Dt::F32>(P.zeros, n * P.G + g, k); break;
      case Dt::F16: a = load_meta16<Dt::F16>(P.scales, n * P.G + g, k); b = load_meta16<Dt::F16>(P.zeros, n * P.G + g, k); break;
      default: a = load_meta16<Dt::BF16>(P.scales, n * P.G + g, k); b = load_meta16<Dt::BF16>(P.zeros, n * P.G + g, k); break;
    }
    _mm512_mask_storeu_ps(sf + g, k, a);
    _mm512_mask_storeu_ps(zf + g, k, b);
  }
}

// bf16 table: 32 words, entry e = bf16((code(e) - z) * s), code(e) = e & 15 / e & 7 / e & 3.
template <int BITS>
QK_AMX_TARGET inline __m512i bf16_table(float s, float z) {
  const __m512 t = lut_table(lut_iota<BITS>(), s, z);
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(t);
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

// Row n, positions [p0, p1) (multiples of 128) -> out (bf16, permuted order).
template <int BITS>
QK_AMX_TARGET void amx_dequant_row(const PackedW& P, int64_t n, int64_t p0, int64_t p1, uint16_t* out) {
  const uint8_t* row = P.qw + n * P.row_bytes;
  float* sf = static_cast<float*>(scratch(7, size_t(2) * round_up(P.G, 16) * sizeof(float)));
  float* zf = sf + round_up(P.G, 16);
  meta_row_f32(P, n, sf, zf);
  constexpr int64_t CH = BITS == 4 ? 64 : 128;    // positions per chunk
  constexpr int64_t BPC = CH / 32;                 // blocks per chunk
  __m512i ctrl[4];
  if constexpr (BITS == 3) {
    for (int f = 0; f < 4; ++f) {
      alignas(64) uint8_t c[64];
      for (int i = 0; i < 64; ++i) {
        const int q = i / 8, wb = (i % 8) / 2;  // qword, word in qword
        const int p = 4 * (q & 1) + wb;
        c[i] = uint8_t((8 * f + p - 2) & 63);
      }
      ctrl[f] = _mm512_load_si512(c);
    }
  }
  // Word lanes 0..15 hold the first half of the chunk's blocks, 16..31 the second
  // half; vpermt2w picks table A or B with index bit 5.
  const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x200020, 0x200020, 0x200020, 0x200020, 0x200020,
                                        0x200020, 0x200020, 0x200020);
  const __m512i low5 = _mm512_set1_epi16(0x1F);
  int64_t ga = -1, gb = -1;
  __m512i TA = _mm512_setzero_si512(), TB = TA;
  // group of block j0 and of block j0 + BPC / 2 (and of the last block of each half),
  // tracked incrementally (no division per chunk)
  int64_t j0 = p0 / 32;
  int64_t gA = j0 / P.gblk, rA = j0 - gA * P.gblk;
  int64_t gB = (j0 + BPC / 2) / P.gblk, rB = (j0 + BPC / 2) - gB * P.gblk;
  for (int64_t pos = p0; pos < p1; pos += CH, j0 += BPC) {
    if (pos != p0) {
      rA += BPC;
      while (rA >= P.gblk) { rA -= P.gblk; ++gA; }
      rB += BPC;
      while (rB >= P.gblk) { rB -= P.gblk; ++gB; }
    }
    const int64_t g0 = gA, g1 = gB;
    QK_PF(row + (BITS == 4 ? 16 : 8) * j0 + kPfRows * P.row_bytes);
    if constexpr (BITS != 4) QK_PF(row + (BITS == 4 ? 16 : 8) * j0 + 64 + kPfRows * P.row_bytes);
    if constexpr (BITS == 3) QK_PF(row + 8 * P.nb + 4 * j0 + kPfRows * P.row_bytes);
    const bool fast = j0 + BPC <= P.nb && rA + BPC / 2 <= P.gblk && rB + BPC / 2 <= P.gblk;
    uint16_t* o = out + (pos - p0);
    if (!fast) {  // a group boundary inside a half chunk, or padding blocks
      alignas(64) float w[32];
      for (int64_t b = 0; b < BPC; ++b) {
        const int64_t j = j0 + b;
        if (j < P.nb) {
          const int64_t gj = j / P.gblk;
          const float s = meta_at(P.scales, P.mdt, n * P.G + gj), z = meta_at(P.zeros, P.mdt, n * P.G + gj);
          __m512 w0, w1;
          lut_block<BITS>(row, P.nb, j, lut_table(lut_iota<BITS>(), s, z), w0, w1);
          _mm512_store_ps(w, w0);
          _mm512_store_ps(w + 16, w1);
        } else {
          std::memset(w, 0, sizeof(w));
        }
        for (int t = 0; t < 32; ++t) {
          const int64_t ps = BITS == 4 ? (t / 16) * 32 + b * 16 + (t % 16) : (t / 8) * 32 + b * 8 + (t % 8);
          o[ps] = f32_to_bf16(w[t]);
        }
      }
      continue;
    }
    if (g0 != ga) {
      TA = g0 == gb ? TB : bf16_table<BITS>(sf[g0], zf[g0]);
      ga = g0;
    }
    if (g1 != gb) {
      TB = g1 == ga ? TA : bf16_table<BITS>(sf[g1], zf[g1]);
      gb = g1;
    }
    // one table: vpermw (index bits above the code are don't-cares); two tables:
    // vpermt2w with index bit 5 = second half, (raw & 31) | sel by one ternlog.
#define QK_LOOKUP(raw) \
  (g0 == g1 ? _mm512_permutexvar_epi16((raw), TA) \
            : _mm512_permutex2var_epi16(TA, _mm512_ternarylogic_epi32((raw), low5, sel, 0xEA), TB))
    if constexpr (BITS == 4) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * j0)));
      _mm512_storeu_si512(o, QK_LOOKUP(v));
      _mm512_storeu_si512(o + 32, QK_LOOKUP(_mm512_srli_epi16(v, 4)));
    } else {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * j0)));
      if constexpr (BITS == 2) {
        for (int f = 0; f < 4; ++f) _mm512_storeu_si512(o + 32 * f, QK_LOOKUP(f ? _mm512_srli_epi16(v, 2 * f) : v));
      } else {
        const __m512i hw = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8 * P.nb + 4 * j0)));
        const __m512i hq = _mm512_permutexvar_epi32(
            _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), hw);
        const __m512i three = _mm512_set1_epi16(3);
        for (int f = 0; f < 4; ++f) {
          const __m512i lo = f ? _mm512_srli_epi16(v, 2 * f) : v;
          const __m512i idx = _mm512_ternarylogic_epi32(lo, _mm512_multishift_epi64_epi8(ctrl[f], hq), three, 0xE4);
          _mm512_storeu_si512(o + 32 * f, QK_LOOKUP(idx));
        }
      }
    }
#undef QK_LOOKUP
  }
}

QK_SI void store_row16(Dt ydt, void* y, int64_t off, __m512 v, __mmask16 k) {
  if (ydt == Dt::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(y) + off, k, v);
  } else if (ydt == Dt::F16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + off, k,
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    alignas(32) uint16_t tmp[16];
    store_bf16(tmp, V{v});
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + off, k, _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp)));
  }
}

// C tile (16 n x 16 m fp32 in cbuf) -> y[m, n] + bias.
inline void amx_store_tile(const float* cbuf, int64_t n, int64_t n1, int64_t m, int64_t M, Dt ydt, void* y, int64_t ldy,
                           const float* bias) {
  if (n >= n1 || m >= M) return;
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(cbuf + 16 * i);
  transpose16x16(r);
  const __mmask16 k = mask16(n1 - n);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + n) : _mm512_setzero_ps();
  for (int i = 0; i < 16 && m + i < M; ++i)
    store_row16(ydt, y, (m + i) * ldy + n, _mm512_add_ps(_mm512_castsi512_ps(r[i]), b), k);
}

#if !defined(QK_ISA_EMU)  // no tile emulation: the emulated table never plans kPathAmx
#define QK_TILE_LOAD_C(t, base) _tile_loadd(t, (base), 64)

template <int BITS>
QK_AMX_TARGET void amx_gemm_rows_t(const PackedW& P, const uint16_t* xT, int64_t M, int64_t n0, int64_t n1, Dt ydt,
                                   void* y, int64_t ldy, const float* bias) {
  const int64_t Kpa = amx_kpa(P);
  const int64_t Mt = (M + 15) / 16;
  // K block: keep the x block (Mt * 16 rows x Kc bf16) within ~1 MiB of L2.
  int64_t Kc = qmax<int64_t>(128, (int64_t(1) << 20) / (Mt * 16 * 2) / 128 * 128);
  Kc = qmin(Kc, Kpa);
  const int64_t nkb = (Kpa + Kc - 1) / Kc;
  uint16_t* panel = static_cast<uint16_t*>(scratch(5, size_t(32) * Kc * 2));
  float* cacc = nullptr;
  const int64_t nnb = (n1 - n0 + 31) / 32;
  if (nkb > 1) cacc = static_cast<float*>(scratch(6, size_t(nnb) * 2 * Mt * 256 * 4));
  alignas(64) float cbuf[4][256];
  TileCfg cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
  if (Mt <= 2) {
    // Small M: x (<= 2 tiles x Kpa) stays in L2 for every block of rows, so the blocks of
    // rows go outer and the C tiles stay in tile registers across K; the panel holds
    // 32 rows x at most 4096 positions (256 KiB), whatever K is.
    const int64_t kc_max = qmin<int64_t>(Kpa, 4096);
    uint16_t* pnl = static_cast<uint16_t*>(scratch(5, size_t(32) * kc_max * 2));
    const bool two = Mt == 2;
    const uint16_t* xa = xT;
    const uint16_t* xb = xT + (Kpa / 2) * 32;
    // While the tiles compute on one block of rows, prefetch the next block (its bytes
    // are contiguous) into L2, a slice per step, so memory and compute overlap.
    const int64_t nks_total = Kpa / 32;
    const int64_t pf_bytes_per_ks = round_up((32 * P.row_bytes + nks_total - 1) / nks_total, 64);
    for (int64_t b0 = n0; b0 < n1; b0 += 32) {
      const int64_t rows = qmin<int64_t>(32, n1 - b0);
      const uint8_t* next = P.qw + qmin<int64_t>(b0 + 32, P.N) * P.row_bytes;
      const uint8_t* next_end = P.qw + qmin<int64_t>(b0 + 64, P.N) * P.row_bytes;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t p0 = 0; p0 < Kpa; p0 += kc_max) {
        const int64_t p1 = qmin(Kpa, p0 + kc_max), kc = p1 - p0;
        for (int64_t r = 0; r < rows; ++r) amx_dequant_row<BITS>(P, b0 + r, p0, p1, pnl + r * kc);
        for (int64_t r = rows; r < 32; ++r) std::memset(pnl + r * kc, 0, kc * 2);
        asm volatile("" ::: "memory");
        for (int64_t ks = 0; ks < kc / 32; ++ks) {
          const int64_t kg = p0 / 32 + ks;
          for (int64_t b = 0; b < pf_bytes_per_ks; b += 64) {
            const uint8_t* a = next + kg * pf_bytes_per_ks + b;
            if (a < next_end) QK_PF(a);
          }
          _tile_loadd(4, pnl + ks * 32, kc * 2);
          _tile_loadd(5, pnl + 16 * kc + ks * 32, kc * 2);
          _tile_loadd(6, xa + kg * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (two) {
            _tile_loadd(7, xb + kg * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        asm volatile("" ::: "memory");
      }
      _tile_stored(0, cbuf[0], 64);
      _tile_stored(2, cbuf[2], 64);
      if (two) {
        _tile_stored(1, cbuf[1], 64);
        _tile_stored(3, cbuf[3], 64);
      }
      asm volatile("" ::: "memory");
      amx_store_tile(cbuf[0], b0, n1, 0, M, ydt, y, ldy, bias);
      amx_store_tile(cbuf[2], b0 + 16, n1, 0, M, ydt, y, ldy, bias);
      if (two) {
        amx_store_tile(cbuf[1], b0, n1, 16, M, ydt, y, ldy, bias);
        amx_store_tile(cbuf[3], b0 + 16, n1, 16, M, ydt, y, ldy, bias);
      }
    }
    _tile_release();
    return;
  }
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t p0 = kb * Kc, p1 = qmin(Kpa, p0 + Kc), kc = p1 - p0;
    const bool first = kb == 0, last = kb == nkb - 1;
    for (int64_t bi = 0; bi < nnb; ++bi) {
      const int64_t b0 = n0 + 32 * bi;
      const int64_t rows = qmin<int64_t>(32, n1 - b0);
      for (int64_t r = 0; r < rows; ++r) amx_dequant_row<BITS>(P, b0 + r, p0, p1, panel + r * kc);
      for (int64_t r = rows; r < 32; ++r) std::memset(panel + r * kc, 0, kc * 2);
      asm volatile("" ::: "memory");
      for (int64_t mt = 0; mt < Mt; mt += 2) {
        const bool two = mt + 1 < Mt;
        float* cb = cacc ? cacc + ((bi * Mt) + mt) * 2 * 256 : nullptr;  // [mt..mt+1][2 n-tiles][256]
        if (first) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          QK_TILE_LOAD_C(0, cb);
          QK_TILE_LOAD_C(2, cb + 256);
          if (two) {
            QK_TILE_LOAD_C(1, cb + 512);
            QK_TILE_LOAD_C(3, cb + 768);
          }
        }
        const uint16_t* xa = xT + (mt * (Kpa / 2) + p0 / 2) * 32;
        const uint16_t* xb = xT + ((mt + 1) * (Kpa / 2) + p0 / 2) * 32;
        if (two) {
          for (int64_t ks = 0; ks < kc / 32; ++ks) {
            _tile_loadd(4, panel + ks * 32, kc * 2);
            _tile_loadd(5, panel + 16 * kc + ks * 32, kc * 2);
            _tile_loadd(6, xa + ks * 512, 64);
            _tile_loadd(7, xb + ks * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        } else {
          for (int64_t ks = 0; ks < kc / 32; ++ks) {
            _tile_loadd(4, panel + ks * 32, kc * 2);
            _tile_loadd(5, panel + 16 * kc + ks * 32, kc * 2);
            _tile_loadd(6, xa + ks * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
          }
        }
        if (!last) {
          _tile_stored(0, cb, 64);
          _tile_stored(2, cb + 256, 64);
          if (two) {
            _tile_stored(1, cb + 512, 64);
            _tile_stored(3, cb + 768, 64);
          }
        } else {
          _tile_stored(0, cbuf[0], 64);
          _tile_stored(2, cbuf[2], 64);
          if (two) {
            _tile_stored(1, cbuf[1], 64);
            _tile_stored(3, cbuf[3], 64);
          }
          asm volatile("" ::: "memory");
          amx_store_tile(cbuf[0], b0, n1, mt * 16, M, ydt, y, ldy, bias);
          amx_store_tile(cbuf[2], b0 + 16, n1, mt * 16, M, ydt, y, ldy, bias);
          if (two) {
            amx_store_tile(cbuf[1], b0, n1, mt * 16 + 16, M, ydt, y, ldy, bias);
            amx_store_tile(cbuf[3], b0 + 16, n1, mt * 16 + 16, M, ydt, y, ldy, bias);
          }
        }
        asm volatile("" ::: "memory");
      }
    }
  }
  _tile_release();
}
#endif

inline void amx_gemm_rows(const PackedW& P, const uint16_t* xT, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                          int64_t ldy, const float* bias) {
#if defined(QK_ISA_EMU)
  (void)P, (void)xT, (void)M, (void)n0, (void)n1, (void)ydt, (void)y, (void)ldy, (void)bias;
  std::abort();
#else
  switch (P.bits) {
    case 4: return amx_gemm_rows_t<4>(P, xT, M, n0, n1, ydt, y, ldy, bias);
    case 3: return amx_gemm_rows_t<3>(P, xT, M, n0, n1, ydt, y, ldy, bias);
    default: return amx_gemm_rows_t<2>(P, xT, M, n0, n1, ydt, y, ldy, bias);
  }
#endif
}

// ------------------------------------------------------------ AVX512-BF16 GEMM (no AMX)
// The AMX path's data with vdpbf16ps instead of tiles, for CPUs with AVX512-BF16 and VBMI but no
// AMX (AMD Zen 4; Cooper Lake lacks VBMI): the same bf16 panels of 32 rows (amx_dequant_row: W_deq
// rounded to bf16, positions in decode order) and the same x layout (amx_prep: [Mt][Kpa / 2][16 m][2]).
// A zmm of x holds one k-pair of 16 rows m; a row's k-pair of the panel is broadcast; each
// vdpbf16ps adds both products to 16 fp32 sums (one per m). Register block: 8 rows of W x 48 m
// (24 accumulators; per k-pair 3 loads of x, 8 broadcasts, 24 vdpbf16ps). The fp32 sums of a
// K block that is not the last wait in `cacc` [block][m-tile][32 rows][16 m].
// Same products as the AMX path (bf16 x bf16, fp32 sums, denormal inputs read as 0, as bf16
// F.linear's vdpbf16ps: |x| or |w| near 1e-38 lose their precision here, not on the exact paths);
// the sums are added in another order, and not split by thread count.
#if defined(QK_ISA_EMU)
#define QK_BF16_TARGET
#else
#define QK_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,avx512vbmi")))
#endif

// 8 rows of the panel (row stride kc) x NT m-tiles of x (m-tile stride xs), k-pairs [0, kc / 2):
// acc[8 t + i] += the products of row i and m-tile t.
template <int NT>
QK_BF16_TARGET inline void dp_block8(const uint16_t* pnl, int64_t kc, const uint16_t* x, int64_t xs, __m512* acc) {
  const int32_t* r[8];
  for (int i = 0; i < 8; ++i) r[i] = reinterpret_cast<const int32_t*>(pnl + i * kc);
  for (int64_t kp = 0; kp < kc / 2; ++kp) {
    __m512bh v[NT];
    for (int t = 0; t < NT; ++t) v[t] = (__m512bh)_mm512_loadu_si512(x + t * xs + kp * 32);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(r[i][kp]);
      for (int t = 0; t < NT; ++t) acc[8 * t + i] = _mm512_dpbf16_ps(acc[8 * t + i], v[t], w);
    }
  }
}

template <int BITS>
QK_BF16_TARGET void dp_gemm_rows_t(const PackedW& P, const uint16_t* xT, int64_t M, int64_t n0, int64_t n1, Dt ydt,
                                   void* y, int64_t ldy, const float* bias) {
  constexpr int kNT = 3;  // m-tiles per block: 24 accumulators, a broadcast of W feeds 3 vdpbf16ps
  const int64_t Kpa = amx_kpa(P);
  const int64_t Mt = (M + 15) / 16;
  const int64_t xs = (Kpa / 2) * 32;  // bf16 elements between m-tiles of xT
  // K block: the x block (Mt * 16 rows x Kc bf16) within ~512 KiB and the panel (32 x Kc) within
  // 256 KiB, so both stay in a 1 MiB L2 (Zen 4's) while a block of rows is multiplied.
  // (a tuning knob; amx_dequant_row needs K blocks of whole 128-position chunks)
  static const int64_t kc_cap = qmax<int64_t>(128, env_int("QUANTKERN_PK_DP_KC", 4096) / 128 * 128);
  const int64_t Kc = qmin(Kpa, qmin<int64_t>(kc_cap, qmax<int64_t>(128, (int64_t(1) << 19) / (Mt * 32) / 128 * 128)));
  const int64_t nkb = (Kpa + Kc - 1) / Kc;
  const int64_t nnb = (n1 - n0 + 31) / 32;
  uint16_t* panel = static_cast<uint16_t*>(scratch(5, size_t(32) * Kc * 2));
  float* cacc = nkb > 1 ? static_cast<float*>(scratch(6, size_t(nnb) * Mt * 32 * 16 * 4)) : nullptr;
  alignas(64) float cbuf[256];
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t p0 = kb * Kc, p1 = qmin(Kpa, p0 + Kc), kc = p1 - p0;
    const bool first = kb == 0, last = kb == nkb - 1;
    for (int64_t bi = 0; bi < nnb; ++bi) {
      const int64_t b0 = n0 + 32 * bi;
      const int64_t rows = qmin<int64_t>(32, n1 - b0);
      for (int64_t r = 0; r < rows; ++r) amx_dequant_row<BITS>(P, b0 + r, p0, p1, panel + r * kc);
      for (int64_t r = rows; r < round_up(rows, 8); ++r) std::memset(panel + r * kc, 0, kc * 2);
      for (int64_t mt = 0; mt < Mt; mt += kNT) {
        const int nt = int(qmin<int64_t>(kNT, Mt - mt));
        const uint16_t* xm = xT + mt * xs + (p0 / 2) * 32;
        for (int64_t r8 = 0; r8 < rows; r8 += 8) {
          __m512 acc[8 * kNT];
          // this block's sums of m-tile mt + t, rows r8.. (K blocks before the last)
          float* ca = cacc ? cacc + ((bi * Mt + mt) * 32 + r8) * 16 : nullptr;
          for (int t = 0; t < nt; ++t)
            for (int i = 0; i < 8; ++i)
              acc[8 * t + i] = first ? _mm512_setzero_ps() : _mm512_load_ps(ca + t * 512 + 16 * i);
          switch (nt) {
            case 3: dp_block8<3>(panel + r8 * kc, kc, xm, xs, acc); break;
            case 2: dp_block8<2>(panel + r8 * kc, kc, xm, xs, acc); break;
            default: dp_block8<1>(panel + r8 * kc, kc, xm, xs, acc); break;
          }
          if (!last) {
            for (int t = 0; t < nt; ++t)
              for (int i = 0; i < 8; ++i) _mm512_store_ps(ca + t * 512 + 16 * i, acc[8 * t + i]);
            continue;
          }
          const int64_t nb = b0 + r8, ne = qmin(n1, nb + 8);
          for (int t = 0; t < nt; ++t) {  // C tile [16 n (8 used)][16 m] -> y
            for (int i = 0; i < 8; ++i) _mm512_store_ps(cbuf + 16 * i, acc[8 * t + i]);
            for (int i = 8; i < 16; ++i) _mm512_store_ps(cbuf + 16 * i, _mm512_setzero_ps());
            amx_store_tile(cbuf, nb, ne, (mt + t) * 16, M, ydt, y, ldy, bias);
          }
        }
      }
    }
  }
}

inline void dp_gemm_rows(const PackedW& P, const uint16_t* xT, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                         int64_t ldy, const float* bias) {
  switch (P.bits) {
    case 4: return dp_gemm_rows_t<4>(P, xT, M, n0, n1, ydt, y, ldy, bias);
    case 3: return dp_gemm_rows_t<3>(P, xT, M, n0, n1, ydt, y, ldy, bias);
    default: return dp_gemm_rows_t<2>(P, xT, M, n0, n1, ydt, y, ldy, bias);
  }
}
#endif  // QK_ISA_AVX512

// ------------------------------------------------------------ dispatch (IsaTable entries)

#if defined(QK_ISA_AVX512)
// The CPU's optional features; the emulated table (QK_ISA_EMU) has every one but AMX.
inline bool isa_feature_on(CpuFeature f) {
#if defined(QK_ISA_EMU)
  return f != CpuFeature::Amx && cpu_feature_enabled(f);
#else
  return cpu_feature_on(f);
#endif
}
inline bool isa_has_gfni() {
#if defined(QK_ISA_EMU)
  return true;
#else
  return cpu_has_gfni();
#endif
}
#endif

inline int pk_plan(const PackedW& P, Dt xdt, int64_t M) {
  (void)P;
#if defined(QK_ISA_AVX512)
  static const int64_t vnni_max = env_int("QUANTKERN_PK_VNNI_MAX_M", 4);
  static const int64_t lut_max = env_int("QUANTKERN_PK_LUT_MAX_M", 16);
  // GFNI: the VNNI functions are compiled with it (the Zen 4 form's int3 decode runs one
  // vgf2p8affineqb); every CPU with VNNI and VBMI has it, but a VM may hide it
  const bool vnni = isa_feature_on(CpuFeature::Vnni) && isa_feature_on(CpuFeature::Vbmi) && isa_has_gfni();
  // the AMX path also runs VBMI (vpmultishiftqb decode) and AVX512-BF16 (vcvtneps2bf16): disabling
  // either (or a CPU without it) must keep it off
  const bool amx = isa_feature_on(CpuFeature::Amx) && isa_feature_on(CpuFeature::Vbmi) &&
                   isa_feature_on(CpuFeature::Bf16) && amx_permitted();
  // Without AMX the int8 GEMV stays ahead of the other paths up to M = 12; bf16 x beyond goes to the
  // AVX512-BF16 GEMM (AMD Zen 4, 2 threads, with the Zen 4 GEMV form: 4096 x 11008 int4 GEMV 3.6 /
  // 4.2 / 5.6 ms at M = 10 / 12 / 16 against the BF16 GEMM's 4.5 ms for any M <= 16, int2 3.4 / 3.9
  // / 5.2 against 4.2; 3072 x 768 int4 0.22 / 0.25 / 0.33 against 0.26; the fp32 LUT took 9.9 ms
  // at M = 8). It was 8 before the Zen 4 form.
  static const int64_t vnni_max_noamx = env_int("QUANTKERN_PK_VNNI_MAX_M_NOAMX", 12);
  if (xdt != Dt::F32 && vnni && M <= (amx ? vnni_max : qmax(vnni_max, vnni_max_noamx))) return kPathVnni;
  if (xdt == Dt::BF16 && amx && M > vnni_max) return kPathAmx;
  if (xdt == Dt::BF16 && !amx && isa_feature_on(CpuFeature::Bf16) && isa_feature_on(CpuFeature::Vbmi) &&
      M > vnni_max)
    return kPathDpBf16;
  if (M <= lut_max) return kPathLutF32;
  return kPathGemmF32;
#elif defined(QK_ISA_AVX2)
  // the GEMVs read W once per 4 rows of x, the panels once per 128: even at M = 12-16 (Zen 3, 4096 x
  // 11008 int4, fp32 GEMV: 30 / 41 ms against the panels' 31 / 33) they stay, as on AVX-512, so that
  // a batch of up to 16 rows of fp32 x takes the same sums as its rows alone (vmap'd per-sample
  // gradients; bf16 / fp16 rows share their batch's piece rule, packed_avx2_i16.h)
  static const int64_t lut_max = env_int("QUANTKERN_PK_LUT_MAX_M", 16);
  // bf16 / fp16 x: the int16 GEMV up to 11 rows, the int16 GEMM from 12 (groups of up to 1024). The
  // GEMM decodes W once per call where the GEMV decodes it once per 4 rows of x, and does twice the
  // products per cycle of the fp32 BLAS GEMM on dequantized panels that took M > 16 before (Zen 3, 2
  // threads, cold, int4 g64, ms GEMV / GEMM: 11008 x 4096 M = 8 5.8 / 5.8, 10 7.3 / 7.9, 12 8.7 / 8.0,
  // 16 11.6 / 8.0; 3072 x 768 M = 8 0.33 / 0.40, 12 0.48 / 0.49, 16 0.62 / 0.46; 768 x 3072 M = 8 0.40 /
  // 0.34; M = 32, 4096 x 11008: BLAS 26 ms, GEMM 13.6). QUANTKERN_PK_I16_GEMM=0 turns the GEMM off,
  // QUANTKERN_PK_I16_MAX_M moves the switch.
  static const int64_t i16_max = env_int("QUANTKERN_PK_I16_MAX_M", 11);
  static const bool i16_gemm = env_int("QUANTKERN_PK_I16_GEMM", 1) != 0;
  if (xdt != Dt::F32) {
    const bool gemm = i16_gemm && i16g_fits(P);
    if (M <= i16_max || (M <= lut_max && !gemm)) return kPathI16;
    if (gemm) return kPathI16Gemm;
  }
  return M <= lut_max ? kPathLutF32 : kPathGemmF32;
#else
  (void)xdt;
  (void)M;
  return kPathGemmF32;
#endif
}

// Rows of x per chunk (the caller loops over chunks; the weight is read once per chunk).
inline int64_t pk_mchunk(int path) {
  if (path == kPathAmx || path == kPathDpBf16) return 256;
  if (path == kPathGemmF32) return 128;
  if (path == kPathI16Gemm) return 256;
  return 1 << 30;
}

inline int64_t pk_prep_units(int path, int64_t M) {
  return path == kPathAmx || path == kPathDpBf16 ? (M + 15) / 16 : M;
}

inline int64_t pk_ws_bytes(const PackedW& P, Dt, int64_t M, int path) {
#if defined(QK_ISA_AVX512)
  if (path == kPathVnni) {
    const VnniLayout L = vnni_layout(P);
    return L.total_shared + M * L.per_m;
  }
  if (path == kPathAmx || path == kPathDpBf16) return ((M + 15) / 16) * 16 * amx_kpa(P) * 2;
#elif defined(QK_ISA_AVX2)
  if (path == kPathI16) {
    const I16Layout L = i16_layout(P, M);
    return L.xf_bytes + M * L.per_m;
  }
  if (path == kPathI16Gemm) return i16g_layout(P, M).total;
#endif
  (void)path;
  return M * P.Kp() * 4;
}

inline void pk_prep(const PackedW& P, Dt xdt, const void* x, int64_t ldx, int64_t M, int path, int64_t u0, int64_t u1,
                    void* ws) {
#if defined(QK_ISA_AVX512)
  if (path == kPathVnni) return vnni_prep(P, xdt, x, ldx, u0, u1, static_cast<uint8_t*>(ws), M > 1);
  if (path == kPathAmx || path == kPathDpBf16) return amx_prep(P, x, ldx, M, u0, u1, static_cast<uint16_t*>(ws));
#elif defined(QK_ISA_AVX2)
  if (path == kPathI16) return i16_prep(P, xdt, x, ldx, M, u0, u1, static_cast<uint8_t*>(ws));
  if (path == kPathI16Gemm) return i16g_prep(P, xdt, x, ldx, M, u0, u1, static_cast<uint8_t*>(ws));
#endif
  (void)M;
  (void)path;
  prep_f32(P, xdt, x, ldx, u0, u1, static_cast<float*>(ws));
}

inline void pk_run(const PackedW& P, const void* ws, int64_t M, int path, int64_t n0, int64_t n1, Dt ydt, void* y,
                   int64_t ldy, const float* bias) {
#if defined(QK_ISA_AVX512)
  if (path == kPathVnni) return vnni_gemv_rows(P, static_cast<const uint8_t*>(ws), M, n0, n1, ydt, y, ldy, bias);
  if (path == kPathAmx) return amx_gemm_rows(P, static_cast<const uint16_t*>(ws), M, n0, n1, ydt, y, ldy, bias);
  if (path == kPathDpBf16) return dp_gemm_rows(P, static_cast<const uint16_t*>(ws), M, n0, n1, ydt, y, ldy, bias);
  if (path == kPathLutF32) return lut_gemv_rows(P, static_cast<const float*>(ws), M, n0, n1, ydt, y, ldy, bias);
#elif defined(QK_ISA_AVX2)
  if (path == kPathLutF32) return avx2_gemv_rows(P, static_cast<const float*>(ws), M, n0, n1, ydt, y, ldy, bias);
  if (path == kPathI16) return i16_gemv_rows(P, static_cast<const uint8_t*>(ws), M, n0, n1, ydt, y, ldy, bias);
  if (path == kPathI16Gemm) return i16g_rows(P, static_cast<const uint8_t*>(ws), M, n0, n1, ydt, y, ldy, bias);
#endif
  (void)path;
  gemm_f32_rows(P, static_cast<const float*>(ws), M, n0, n1, ydt, y, ldy, bias);
}

// Rows of W per parallel task.
inline int64_t pk_n_grain(int path) { return path == kPathAmx || path == kPathDpBf16 ? 32 : 16; }
}  // namespace QK_ISA_NS
}  // namespace qk
