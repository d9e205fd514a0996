// HQQ span kernels, compiled once per instruction set by the isa_<name>.cpp
// files (see isa.h). The per-group math is csrc/shared/hqq.h, the same header
// the CUDA kernel uses; here each SIMD lane is one group.
//
// A block of kL groups (16 on AVX-512, 8 on AVX2, 1 scalar) is gathered once
// into an L1 buffer transposed to [g][kL] (row i = element i of every group),
// then all iterations sweep that buffer: a group's values are read from memory
// once and q / scale / zero written once.
#pragma once

#include <vector>

#include "../shared/hqq.h"
#include "kernel_io.h"

namespace qk {
namespace QK_ISA_NS {

// ---- vector versions of the scalar vocabulary of shared/hqq.h
#if defined(QK_ISA_AVX512)
QK_SI V splat_like(V, float c) { return splat(c); }
QK_SI V abs_(V a) { return {_mm512_abs_ps(a.v)}; }
QK_SI V max_(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
QK_SI V min_(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
QK_SI bool any_(M m) { return m.m != 0; }
QK_SI void frexp1_(V a, V& m, V& e) {
  __m512i b = _mm512_castps_si512(a.v);
  m = {_mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffff)), _mm512_set1_epi32(0x3f800000)))};
  e = {_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(127)))};
}
QK_SI V exp2i_(V n) {
  __m512i b = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23);
  return {_mm512_castsi512_ps(b)};
}
// kW values in [0, 255] (integral) -> kW bytes
QK_SI void store_u8(uint8_t* p, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v.v)));
}
QK_SI bool all_finite(V v) { return _mm512_cmp_ps_mask(v.v, v.v, _CMP_ORD_Q) == 0xffff; }
#elif defined(QK_ISA_AVX2)
QK_SI V splat_like(V, float c) { return splat(c); }
QK_SI V abs_(V a) { return {_mm256_and_ps(a.v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)))}; }
QK_SI V max_(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }
QK_SI V min_(V a, V b) { return {_mm256_min_ps(a.v, b.v)}; }
QK_SI bool any_(M m) { return _mm256_movemask_ps(m.m) != 0; }
QK_SI void frexp1_(V a, V& m, V& e) {
  __m256i b = _mm256_castps_si256(a.v);
  m = {_mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f800000)))};
  e = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127)))};
}
QK_SI V exp2i_(V n) {
  __m256i b = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_castsi256_ps(b)};
}
QK_SI void store_u8(uint8_t* p, V v) {
  __m256i i32 = _mm256_cvtps_epi32(v.v);
  __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(p16, p16));
}
QK_SI bool all_finite(V v) { return _mm256_movemask_ps(_mm256_cmp_ps(v.v, v.v, _CMP_ORD_Q)) == 0xff; }
#else  // scalar: V is float and the qk:: scalar vocabulary applies
QK_SI void store_u8(uint8_t* p, float v) { *p = uint8_t(v); }
QK_SI bool all_finite(float v) { return v == v; }
#endif

// Element i of group j.
QK_SI int64_t hqq_index(const HqqParams& P, int64_t j, int64_t i) { return P.axis == 1 ? j * P.g + i : i * P.M + j; }

#if defined(QK_ISA_AVX512)
// Row i of a full block of axis-1 groups: element i of groups jb..jb+15, one gather.
// fp16 / bf16 gather 32 bits at each element (the element is the low half), so the
// caller uses them only when the block is not the last one in memory.
template <Dt D>
QK_SI V gather_row(const void* W, int64_t off, __m512i idx) {
  if constexpr (D == Dt::F32) {
    return {_mm512_i32gather_ps(idx, static_cast<const float*>(W) + off, 4)};
  } else {
    __m512i x = _mm512_i32gather_epi32(idx, static_cast<const uint16_t*>(W) + off, 2);
    if constexpr (D == Dt::BF16) return {_mm512_castsi512_ps(_mm512_slli_epi32(x, 16))};
    else return {_mm512_cvtph_ps(_mm512_cvtepi32_epi16(x))};
  }
}
QK_SI __m512i lane_offsets(int64_t g) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(int32_t(g)));
}
#elif defined(QK_ISA_AVX2)
template <Dt D>
QK_SI V gather_row(const void* W, int64_t off, __m256i idx) {
  if constexpr (D == Dt::F32) {
    return {_mm256_i32gather_ps(static_cast<const float*>(W) + off, idx, 4)};
  } else {
    __m256i x = _mm256_i32gather_epi32(reinterpret_cast<const int*>(static_cast<const uint16_t*>(W) + off), idx, 2);
    if constexpr (D == Dt::BF16) {
      return {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16))};
    } else {
      __m256i p = _mm256_packus_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0xffff)), x);
      p = _mm256_permute4x64_epi64(p, 0x08);  // qwords 0 and 2: the 8 halves in order
      return {_mm256_cvtph_ps(_mm256_castsi256_si128(p))};
    }
  }
}
QK_SI __m256i lane_offsets(int64_t g) {
  return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int32_t(g)));
}
#endif

// buf[i*kL + l] = element i of group j0 + l for l < nl; lanes >= nl repeat lane 0.
template <Dt D>
void hqq_gather(const void* W, const HqqParams& P, int64_t j0, int nl, float* buf) {
#if !defined(QK_ISA_SCALAR)
  // axis 1, full block: one gather per row (16-bit types: not for the block that ends the tensor).
  if (P.axis == 1 && nl == kW && int64_t(kW) * P.g < (int64_t(1) << 30) &&
      (D == Dt::F32 || j0 + kW < P.M)) {
    const auto idx = lane_offsets(P.g);
    for (int64_t i = 0; i < P.g; ++i) vst(buf + i * kW, gather_row<D>(W, j0 * P.g + i, idx));
    return;
  }
#endif
  for (int64_t i = 0; i < P.g; ++i) {
    float* row = buf + i * kW;
    if (P.axis == 1) {
      for (int l = 0; l < nl; ++l) row[l] = sload<D>(W, (j0 + l) * P.g + i);
    } else {
      const int64_t base = i * P.M + j0;
      for (int l = 0; l < nl; ++l) row[l] = sload<D>(W, base + l);
    }
    for (int l = nl; l < kW; ++l) row[l] = row[0];
  }
}

// Solve groups [j0, j1) (one tile). Outputs (indexed by group): s_inv (inverse
// scale), scale (= 1 / s_inv), and either zero + q (modes Group / None, and
// iters == 0) or, in mode Global, the zero history zhist[(it) * M + j] for
// it = 0..iters and err[it] += the groups' fp32 error sums (in group order, as
// fp64). *bad is set to 1 if a group holds a NaN or an infinity.
template <Dt D>
void hqq_solve_t(const void* W, const HqqParams& P, int64_t j0, int64_t j1, float* s_inv, float* scale,
                 float* zero, float* zhist, double* err, uint8_t* q, int* bad) {
  const int64_t g = P.g, M = P.M;
  std::vector<float> bufv(size_t(g) * kW);
  std::vector<uint8_t> qbuf(size_t(g) * kW + 16);  // store_u8 writes 16 bytes on AVX2 too
  float* buf = bufv.data();
  alignas(64) float tmp[kW];
  alignas(64) float tmp2[kW];
  const bool global = P.mode == HqqStop::Global && P.iters > 0;
  const V qmax = splat_like(V(), P.qmax), y = splat_like(V(), P.y), gf = splat_like(V(), float(g));
  const V one = splat_like(V(), 1.f);
  auto w_at = [&](int64_t i) { return vld(buf + i * kW); };
  auto store_lanes = [&](float* dst, V v, int nl) {
    vst(tmp, v);
    for (int l = 0; l < nl; ++l) dst[l] = tmp[l];
  };
  for (int64_t jb = j0; jb < j1; jb += kW) {
    const int nl = int(std::min<int64_t>(kW, j1 - jb));
    hqq_gather<D>(W, P, jb, nl, buf);
    V s, z, chk;
    hqq_init_lanes(w_at, g, qmax, splat_like(V(), P.wmax), s, z, chk);
    if (!all_finite(chk)) *bad = 1;
    store_lanes(s_inv + jb, s, nl);
    store_lanes(scale + jb, div(one, s), nl);
    if (global) store_lanes(zhist + jb, z, nl);
    V best = splat_like(V(), hqq_inf()), zbest = z;
    auto active = ge(best, best);  // all lanes
    for (int it = 0; it < P.iters; ++it) {
      V zsum, esum;
      hqq_iterate_lanes(w_at, g, s, z, qmax, splat_like(V(), P.c[it]), y, splat_like(V(), P.thr[it]), P.l1 != 0,
                        zsum, esum);
      V zn = div(zsum, gf);
      if (P.mode == HqqStop::Global) {
        vst(tmp, esum);
        double acc = err[it];
        for (int l = 0; l < nl; ++l) acc += double(tmp[l]);
        err[it] = acc;
        z = zn;
        store_lanes(zhist + int64_t(it + 1) * M + jb, z, nl);
      } else if (P.mode == HqqStop::Group) {
        V e = div(esum, gf);
        auto imp = mand(active, lt(e, best));
        active = imp;
        best = select(imp, e, best);
        zbest = select(imp, z, zbest);
        z = select(imp, zn, z);
        if (!any_(active)) break;  // padded lanes copy lane 0: they stop with it
      } else {
        z = zn;
      }
    }
    if (global) continue;  // zero and q come from hqq_write_q once the stop is known
    if (P.mode == HqqStop::Group) z = select(active, z, zbest);
    store_lanes(zero + jb, z, nl);
    if (P.axis == 0 && nl == kW) {
      for (int64_t i = 0; i < g; ++i) store_u8(q + i * M + jb, hqq_q(w_at(i), s, z, qmax));
    } else if (P.axis == 1) {  // bytes staged as [g][kW], then transposed out
      uint8_t* qb = qbuf.data();
      for (int64_t i = 0; i < g; ++i) store_u8(qb + i * kW, hqq_q(w_at(i), s, z, qmax));
      for (int l = 0; l < nl; ++l) {
        uint8_t* dst = q + (jb + l) * g;
        for (int64_t i = 0; i < g; ++i) dst[i] = qb[i * kW + l];
      }
    } else {
      for (int64_t i = 0; i < g; ++i) {
        vst(tmp2, hqq_q(w_at(i), s, z, qmax));
        for (int l = 0; l < nl; ++l) q[i * M + jb + l] = uint8_t(tmp2[l]);
      }
    }
  }
}

// q for groups [j0, j1) from the inverse scales and the final zeros.
template <Dt D>
void hqq_write_q_t(const void* W, const HqqParams& P, int64_t j0, int64_t j1, const float* s_inv, const float* zero,
                   uint8_t* q) {
  const int64_t g = P.g, M = P.M;
  const float qm = P.qmax;
  if (P.axis == 1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t base = j * g;
      int64_t i = 0;
#if !defined(QK_ISA_SCALAR)
      const V s = splat(s_inv[j]), z = splat(zero[j]), vq = splat(qm);
      for (; i + kW <= g; i += kW) store_u8(q + base + i, hqq_q(vload<D>(W, base + i), s, z, vq));
#endif
      for (; i < g; ++i) q[base + i] = uint8_t(hqq_q(sload<D>(W, base + i), s_inv[j], zero[j], qm));
    }
  } else {
    for (int64_t i = 0; i < g; ++i) {
      const int64_t base = i * M;
      int64_t j = j0;
#if !defined(QK_ISA_SCALAR)
      const V vq = splat(qm);
      for (; j + kW <= j1; j += kW)
        store_u8(q + base + j, hqq_q(vload<D>(W, base + j), load(s_inv + j), load(zero + j), vq));
#endif
      for (; j < j1; ++j) q[base + j] = uint8_t(hqq_q(sload<D>(W, base + j), s_inv[j], zero[j], qm));
    }
  }
}

inline void hqq_solve(Dt dt, const void* W, const HqqParams& P, int64_t j0, int64_t j1, float* s_inv, float* scale,
                      float* zero, float* zhist, double* err, uint8_t* q, int* bad) {
  QK_SPAN_DISPATCH(dt, hqq_solve_t, W, P, j0, j1, s_inv, scale, zero, zhist, err, q, bad)
}
inline void hqq_write_q(Dt dt, const void* W, const HqqParams& P, int64_t j0, int64_t j1, const float* s_inv,
                        const float* zero, uint8_t* q) {
  QK_SPAN_DISPATCH(dt, hqq_write_q_t, W, P, j0, j1, s_inv, zero, q)
}

}  // namespace QK_ISA_NS
}  // namespace qk
