// Vector types for the CPU kernels, one per instruction set.
//
// Each csrc/cpu/isa_<name>.cpp defines exactly one of QK_ISA_AVX512, QK_ISA_AVX2
// or QK_ISA_SCALAR, switches the compiler's target with `#pragma GCC target`,
// and then includes this header and the kernel headers. The vector type `V`
// (with `V::W` lanes) overloads the vocabulary of csrc/shared/qk_math.h, so the
// shared per-element templates compile to AVX-512, AVX2 or scalar code.
//
// Everything here is inside namespace qk::QK_ISA_NS so that the three
// instantiations never collide at link time.
#pragma once

#include <cstdint>
#include <cstring>

#include "../shared/qk_math.h"

#if !defined(QK_ISA_NS)
#error "define QK_ISA_NS (and one of QK_ISA_AVX512/QK_ISA_AVX2/QK_ISA_SCALAR) before including simd.h"
#endif

#if defined(QK_ISA_AVX512) || defined(QK_ISA_AVX2)
#include <immintrin.h>
#endif

namespace qk {

// ---- torch-free fp16 / bf16 scalar conversions (round to nearest even) ----
QK_HD float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
QK_HD uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as c10::BFloat16
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
QK_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    u = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
QK_HD uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;          // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;         // rounds to >= 65520: inf
  if (a < 0x38800000u) {                               // below 2^-14: subnormal or 0
    if (a < 0x33000000u) return sign;                  // below half the smallest subnormal
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;                         // 14..24
    uint32_t half = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t mid = 1u << (shift - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return sign | uint16_t(half);
  }
  // normal: rebias exponent, round the 13 dropped bits to nearest even
  uint32_t r = a - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | uint16_t(r >> 13);
}

namespace QK_ISA_NS {

#if defined(QK_ISA_AVX512)
#define QK_SI __attribute__((always_inline)) inline
struct V {
  __m512 v;
  static constexpr int W = 16;
};
struct M {
  __mmask16 m;
};
QK_SI V splat(float a) { return {_mm512_set1_ps(a)}; }
QK_SI V add(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
QK_SI V sub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
QK_SI V mul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
QK_SI V div(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
QK_SI V rint(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
QK_SI M lt(V a, V b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
QK_SI M le(V a, V b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
QK_SI M gt(V a, V b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
QK_SI M ge(V a, V b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
QK_SI M mand(M a, M b) { return {__mmask16(a.m & b.m)}; }
QK_SI M mor(M a, M b) { return {__mmask16(a.m | b.m)}; }
QK_SI V select(M m, V a, V b) { return {_mm512_mask_blend_ps(m.m, b.v, a.v)}; }
QK_SI float reduce_add(V a) { return _mm512_reduce_add_ps(a.v); }
QK_SI V load(const float* p) { return {_mm512_loadu_ps(p)}; }
QK_SI void store(float* p, V a) { _mm512_storeu_ps(p, a.v); }
QK_SI V load_f16(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
QK_SI void store_f16(uint16_t* p, V a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
QK_SI V load_bf16(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
QK_SI void store_bf16(uint16_t* p, V a) {
  __m512i u = _mm512_castps_si512(a.v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
#elif defined(QK_ISA_AVX2)
#define QK_SI __attribute__((always_inline)) inline
struct V {
  __m256 v;
  static constexpr int W = 8;
};
struct M {
  __m256 m;
};
QK_SI V splat(float a) { return {_mm256_set1_ps(a)}; }
QK_SI V add(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
QK_SI V sub(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
QK_SI V mul(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
QK_SI V div(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }
QK_SI V rint(V a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
QK_SI M lt(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
QK_SI M le(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
QK_SI M gt(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
QK_SI M ge(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
QK_SI M mand(M a, M b) { return {_mm256_and_ps(a.m, b.m)}; }
QK_SI M mor(M a, M b) { return {_mm256_or_ps(a.m, b.m)}; }
QK_SI V select(M m, V a, V b) { return {_mm256_blendv_ps(b.v, a.v, m.m)}; }
QK_SI float reduce_add(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
QK_SI V load(const float* p) { return {_mm256_loadu_ps(p)}; }
QK_SI void store(float* p, V a) { _mm256_storeu_ps(p, a.v); }
QK_SI V load_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
QK_SI void store_f16(uint16_t* p, V a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
QK_SI V load_bf16(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
QK_SI void store_bf16(uint16_t* p, V a) {
  __m256i u = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // 8 x u32 (each < 2^16) -> 8 x u16 in order
  __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(lo, hi));
}
#elif defined(QK_ISA_SCALAR)
#define QK_SI __attribute__((always_inline)) inline
// The scalar "vector" is a plain float: the kernels' tail loops already use
// float, so the scalar variant is the tail loop run over the whole span.
using V = float;
#else
#error "no QK_ISA_* defined"
#endif

// Scalar loads/stores, used for tails by every ISA.
QK_SI float load(const float* p, int) { return *p; }
QK_SI void store(float* p, float a, int) { *p = a; }

// Full-width fp32 load/store under one name for every ISA (a float for scalar).
#if defined(QK_ISA_SCALAR)
QK_SI float vld(const float* p) { return *p; }
QK_SI void vst(float* p, float v) { *p = v; }
#else
QK_SI V vld(const float* p) { return load(p); }
QK_SI void vst(float* p, V v) { store(p, v); }
#endif

}  // namespace QK_ISA_NS
}  // namespace qk
