// 32-bit integer vectors for the CPU kernels that keep packed state
// (csrc/shared/oscillation.h): the vector overloads of the integer vocabulary
// (ilike/iand/ior/ishl/ishr/itof/ftoi/sext8_to_f) and like()/any_mask() for V.
// Included after simd.h, inside the same per-ISA namespace; the scalar ISA uses
// the uint32_t versions from csrc/shared/oscillation.h.
#pragma once

#include "simd.h"

namespace qk {
namespace QK_ISA_NS {

#if defined(QK_ISA_AVX512)
struct VI {
  __m512i v;
};
QK_SI V like(V, float c) { return splat(c); }
QK_SI VI ilike(VI, uint32_t c) { return {_mm512_set1_epi32(int(c))}; }
QK_SI VI iand(VI a, VI b) { return {_mm512_and_si512(a.v, b.v)}; }
QK_SI VI ior(VI a, VI b) { return {_mm512_or_si512(a.v, b.v)}; }
template <int K>
QK_SI VI ishl(VI a) { return {_mm512_slli_epi32(a.v, K)}; }
template <int K>
QK_SI VI ishr(VI a) { return {_mm512_srli_epi32(a.v, K)}; }
QK_SI V itof(VI a) { return {_mm512_cvtepi32_ps(a.v)}; }
QK_SI VI ftoi(V a) { return {_mm512_cvttps_epi32(a.v)}; }
QK_SI V sext8_to_f(VI a) { return {_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(a.v, 24), 24))}; }
QK_SI VI load_i(const int32_t* p) {
  // One load into a register: left to itself gcc folds the load into each of the
  // six field extractions, and with the store to the same address at the end of
  // the iteration that ran 1.6x slower (measured) than the extra ema stream.
  VI r{_mm512_loadu_si512(p)};
#if !defined(QK_ISA_EMU)  // (no zmm registers in the emulated build)
  asm("" : "+v"(r.v));
#endif
  return r;
}
QK_SI void store_i(int32_t* p, VI a) { _mm512_storeu_si512(p, a.v); }
QK_SI bool any_mask(M m) { return m.m != 0; }
#elif defined(QK_ISA_AVX2)
struct VI {
  __m256i v;
};
QK_SI V like(V, float c) { return splat(c); }
QK_SI VI ilike(VI, uint32_t c) { return {_mm256_set1_epi32(int(c))}; }
QK_SI VI iand(VI a, VI b) { return {_mm256_and_si256(a.v, b.v)}; }
QK_SI VI ior(VI a, VI b) { return {_mm256_or_si256(a.v, b.v)}; }
template <int K>
QK_SI VI ishl(VI a) { return {_mm256_slli_epi32(a.v, K)}; }
template <int K>
QK_SI VI ishr(VI a) { return {_mm256_srli_epi32(a.v, K)}; }
QK_SI V itof(VI a) { return {_mm256_cvtepi32_ps(a.v)}; }
QK_SI VI ftoi(V a) { return {_mm256_cvttps_epi32(a.v)}; }
QK_SI V sext8_to_f(VI a) { return {_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(a.v, 24), 24))}; }
QK_SI VI load_i(const int32_t* p) {
  VI r{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))};
  asm("" : "+x"(r.v));  // one load into a register (see the AVX-512 version)
  return r;
}
QK_SI void store_i(int32_t* p, VI a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a.v); }
QK_SI bool any_mask(M m) { return _mm256_movemask_ps(m.m) != 0; }
#endif

}  // namespace QK_ISA_NS
}  // namespace qk
