// AVX-512 intrinsics the kernels use that SIMDe 0.8.2 lacks or computes otherwise than the hardware, on SIMDe's types, for
// isa_avx512emu.cpp only (included after SIMDe's native aliases). Each follows Intel's definition
// of the instruction, lane by lane; where an instruction's result depends on the order of float
// operations (_mm512_reduce_add_ps) it follows GCC's own expansion, so that the emulated kernels
// give the native ones' bits. Masked loads and stores touch only the selected elements, as the
// hardware does (SIMDe's own read and write whole vectors).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace qk_emu {

using I512 = simde__m512i_private;
using F512 = simde__m512_private;

inline simde__m256i cvtepi32_epi16(simde__m512i a) {  // truncation of each lane
  const I512 p = simde__m512i_to_private(a);
  simde__m256i_private r;
  for (int i = 0; i < 16; ++i) r.i16[i] = int16_t(p.i32[i]);
  return simde__m256i_from_private(r);
}
inline simde__m128i cvtepi32_epi8(simde__m512i a) {
  const I512 p = simde__m512i_to_private(a);
  simde__m128i_private r;
  for (int i = 0; i < 16; ++i) r.i8[i] = int8_t(p.i32[i]);
  return simde__m128i_from_private(r);
}
inline simde__m512i cvtepu32_epi64(simde__m256i a) {
  const simde__m256i_private p = simde__m256i_to_private(a);
  I512 r;
  for (int i = 0; i < 8; ++i) r.u64[i] = p.u32[i];
  return simde__m512i_from_private(r);
}
inline simde__m512i cvtepu8_epi16(simde__m256i a) {
  const simde__m256i_private p = simde__m256i_to_private(a);
  I512 r;
  for (int i = 0; i < 32; ++i) r.i16[i] = int16_t(p.u8[i]);
  return simde__m512i_from_private(r);
}
inline simde__m512i cvtepu8_epi32(simde__m128i a) {
  const simde__m128i_private p = simde__m128i_to_private(a);
  I512 r;
  for (int i = 0; i < 16; ++i) r.i32[i] = int32_t(p.u8[i]);
  return simde__m512i_from_private(r);
}
// vcvtneps2bf16: round to nearest even; NaN kept quiet; zero / denormal inputs give a signed zero
inline uint16_t f32_to_bf16_ne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  if ((u & 0x7f800000u) == 0) return uint16_t((u >> 16) & 0x8000u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline simde__m256bh cvtneps_pbh(simde__m512 a) {
  const F512 p = simde__m512_to_private(a);
  simde__m256i_private r;
  for (int i = 0; i < 16; ++i) r.u16[i] = f32_to_bf16_ne(p.f32[i]);
  simde__m256bh out;
  const simde__m256i v = simde__m256i_from_private(r);
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
// F16C's vcvtps2ph on each 256-bit half (8 halves each) (the same instruction, same rounding immediate)
#define QK_EMU_CVTPS_PH(a, imm)                                    \
  _mm256_set_m128i(_mm256_cvtps_ph(simde_mm512_extractf32x8_ps(a, 1), imm), \
                   _mm256_cvtps_ph(simde_mm512_extractf32x8_ps(a, 0), imm))
inline simde__m512i i32gather_epi32(simde__m512i idx, const void* base, int scale) {
  const I512 p = simde__m512i_to_private(idx);
  I512 r;
  for (int i = 0; i < 16; ++i)
    std::memcpy(&r.i32[i], static_cast<const char*>(base) + int64_t(p.i32[i]) * scale, 4);
  return simde__m512i_from_private(r);
}
// Lane i of dst (a vector of N elements of T) = element i of m where bit i of k is set, else 0; only
// those elements are read.
template <class T, int N, class Vec>
inline void load_lanes(Vec& dst, uint64_t k, const void* m) {
  for (int i = 0; i < N; ++i) {
    T e = T(0);
    if (k >> i & 1) std::memcpy(&e, static_cast<const char*>(m) + sizeof(T) * i, sizeof(T));
    dst[i] = e;
  }
}
// SIMDe 0.8.2's masked stores write every lane (zeros where the mask is clear): this writes only the
// selected elements.
template <class T, int N, class Vec>
inline void store_lanes(void* m, uint64_t k, const Vec& src) {
  for (int i = 0; i < N; ++i)
    if (k >> i & 1) {
      const T e = src[i];
      std::memcpy(static_cast<char*>(m) + sizeof(T) * i, &e, sizeof(T));
    }
}
inline simde__m256i maskz_loadu_epi32_256(simde__mmask8 k, const void* m) {
  simde__m256i_private r;
  load_lanes<int32_t, 8>(r.i32, k, m);
  return simde__m256i_from_private(r);
}
inline simde__m256i maskz_loadu_epi16_256(simde__mmask16 k, const void* m) {
  simde__m256i_private r;
  load_lanes<int16_t, 16>(r.i16, k, m);
  return simde__m256i_from_private(r);
}
inline simde__m512i maskz_loadu_epi32(simde__mmask16 k, const void* m) {
  I512 r;
  load_lanes<int32_t, 16>(r.i32, k, m);
  return simde__m512i_from_private(r);
}
inline simde__m512i maskz_loadu_epi8(simde__mmask64 k, const void* m) {
  I512 r;
  load_lanes<int8_t, 64>(r.i8, k, m);
  return simde__m512i_from_private(r);
}
inline simde__m512 maskz_loadu_ps(simde__mmask16 k, const void* m) {
  F512 r;
  load_lanes<float, 16>(r.f32, k, m);
  return simde__m512_from_private(r);
}
inline void mask_storeu_epi16_256(void* m, simde__mmask16 k, simde__m256i a) {
  const simde__m256i_private p = simde__m256i_to_private(a);
  store_lanes<int16_t, 16>(m, k, p.i16);
}
inline void mask_storeu_ps(void* m, simde__mmask16 k, simde__m512 a) {
  const F512 p = simde__m512_to_private(a);
  store_lanes<float, 16>(m, k, p.f32);
}
// vdpbf16ps: per fp32 lane j, src + the odd pair's product, then + the even pair's, each step an FMA
// rounded to nearest even with denormal inputs read as zero and denormal results flushed to zero
// (Intel's definition; SIMDe adds the even product first and keeps denormals). The products of two
// bf16 are exact in fp32, so the FMA is the rounded sum.
inline float daz_ftz(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return daz_ftz(f);
}
inline simde__m512 dpbf16_ps(simde__m512 src, simde__m512bh a, simde__m512bh b) {
  F512 r = simde__m512_to_private(src);
  uint16_t av[32], bv[32];
  std::memcpy(av, &a, 64);
  std::memcpy(bv, &b, 64);
  for (int j = 0; j < 16; ++j) {
    float t = daz_ftz(r.f32[j]);
    t = daz_ftz(std::fma(bf16_bits_to_f32(av[2 * j + 1]), bf16_bits_to_f32(bv[2 * j + 1]), t));
    t = daz_ftz(std::fma(bf16_bits_to_f32(av[2 * j]), bf16_bits_to_f32(bv[2 * j]), t));
    r.f32[j] = t;
  }
  return simde__m512_from_private(r);
}
// vpmultishiftqb: byte j of qword i = the 8 bits of data's qword i from bit (ctrl byte & 63) on,
// wrapping around the qword (SIMDe shifts by 64 for an offset of 0, undefined in C++)
inline simde__m512i multishift_epi64_epi8(simde__m512i ctrl, simde__m512i data) {
  const I512 c = simde__m512i_to_private(ctrl), d = simde__m512i_to_private(data);
  I512 r;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      const unsigned o = c.u8[8 * i + j] & 63u;
      const uint64_t q = d.u64[i];
      r.u8[8 * i + j] = uint8_t((q >> o) | (o ? q << (64 - o) : 0));
    }
  return simde__m512i_from_private(r);
}
// 64-byte aligned loads / stores: SIMDe's are plain copies; these stop where the hardware would fault
inline void check_aligned(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) & 63) {
    std::fprintf(stderr, "quantkern avx512emu: %s at %p is not 64-byte aligned (a fault on AVX-512)\n", what, p);
    std::abort();
  }
}
inline simde__m512 load_ps(const void* p) {
  check_aligned(p, "_mm512_load_ps");
  return simde_mm512_loadu_ps(p);
}
inline simde__m512i load_si512(const void* p) {
  check_aligned(p, "_mm512_load_si512");
  return simde_mm512_loadu_si512(p);
}
inline void store_ps(void* p, simde__m512 a) {
  check_aligned(p, "_mm512_store_ps");
  simde_mm512_storeu_ps(p, a);
}
inline int reduce_add_epi32(simde__m512i a) {
  const I512 p = simde__m512i_to_private(a);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += uint32_t(p.i32[i]);
  return int(s);
}
// GCC's __MM512_REDUCE_OP: halves of 256, then of 128, then lanes {0,1} + {2,3}, then 0 + 1
inline float reduce_add_ps(simde__m512 a) {
  const F512 p = simde__m512_to_private(a);
  float t3[8], t6[4];
  for (int i = 0; i < 8; ++i) t3[i] = p.f32[i + 8] + p.f32[i];
  for (int i = 0; i < 4; ++i) t6[i] = t3[i + 4] + t3[i];
  const float t80 = t6[0] + t6[2], t81 = t6[1] + t6[3];
  return t80 + t81;
}
inline simde__m512i zextsi256_si512(simde__m256i a) {
  return simde_mm512_inserti64x4(simde_mm512_setzero_si512(), a, 0);
}

}  // namespace qk_emu

#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) qk_emu::cvtepi32_epi16(a)
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8(a) qk_emu::cvtepi32_epi8(a)
#undef _mm512_cvtepu32_epi64
#define _mm512_cvtepu32_epi64(a) qk_emu::cvtepu32_epi64(a)
#undef _mm512_cvtepu8_epi16
#define _mm512_cvtepu8_epi16(a) qk_emu::cvtepu8_epi16(a)
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(a) qk_emu::cvtepu8_epi32(a)
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh(a) qk_emu::cvtneps_pbh(a)
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph(a, imm) QK_EMU_CVTPS_PH(a, imm)
#undef _mm512_i32gather_epi32
#define _mm512_i32gather_epi32(idx, base, scale) qk_emu::i32gather_epi32(idx, base, scale)
#undef _mm512_mask_cmp_ps_mask
#define _mm512_mask_cmp_ps_mask(k, a, b, pred) simde__mmask16((k) & simde_mm512_cmp_ps_mask(a, b, pred))
#undef _mm256_maskz_loadu_epi32
#define _mm256_maskz_loadu_epi32(k, m) qk_emu::maskz_loadu_epi32_256(k, m)
#undef _mm512_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi32(k, m) qk_emu::maskz_loadu_epi32(k, m)
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8(k, m) qk_emu::maskz_loadu_epi8(k, m)
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, m) qk_emu::maskz_loadu_epi16_256(k, m)
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, m) qk_emu::maskz_loadu_ps(k, m)
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16(m, k, a) qk_emu::mask_storeu_epi16_256(m, k, a)
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(m, k, a) qk_emu::mask_storeu_ps(m, k, a)
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32(a) qk_emu::reduce_add_epi32(a)
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(a) qk_emu::reduce_add_ps(a)
#undef _mm512_zextsi256_si512
#define _mm512_zextsi256_si512(a) qk_emu::zextsi256_si512(a)
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps(src, a, b) qk_emu::dpbf16_ps(src, a, b)
#undef _mm512_multishift_epi64_epi8
#define _mm512_multishift_epi64_epi8(ctrl, data) qk_emu::multishift_epi64_epi8(ctrl, data)
#undef _mm512_load_ps
#define _mm512_load_ps(p) qk_emu::load_ps(p)
#undef _mm512_load_si512
#define _mm512_load_si512(p) qk_emu::load_si512(p)
#undef _mm512_store_ps
#define _mm512_store_ps(p, a) qk_emu::store_ps(p, a)
