// AVX2 kernels on packed weights: the vector block decoder behind the dequantize op and the fp32
// GEMM panels, and the fp32 GEMV for small M (kPathLutF32 on AVX2 CPUs: AMD Zen 1-3, Intel
// client cores without AVX-512). Included by packed_kernel.h (whose helpers it uses) in the AVX2
// build only.
//
// Every weight comes out exactly as the reference computes it, (q - z) * s in fp32 (sub, then mul):
//   4 bits: codes -> int32 lanes (zero-extend, and / shift) -> cvtdq2ps -> sub z -> mul s;
//   2 bits: an 8-entry table of (e & 3 - z) * s; vpermps reads only the low 3 bits of an index,
//           so a byte shifted right by 2f indexes field f with no mask (bit 2 repeats the table);
//   3 bits: two such tables, codes 0-3 and 4-7, and vblendvps on the bit plane's bit moved to
//           the sign (vpsllvd by 31 - t for weight t).
// The GEMV then multiplies the exact weights with fp32 x (fused multiply-add), as the AVX-512
// LUT path does, so its error is a float product's.
#pragma once

#if defined(QK_ISA_AVX2)

namespace qk {
namespace QK_ISA_NS {

// The per-group constants of one row: 4 bits: A = z, B = s (splat); 2 bits: A = the table;
// 3 bits: A = the table of codes 0-3, B = of codes 4-7 (each repeated twice in the 8 lanes).
template <int BITS>
QK_SI void avx2_group_consts(float s, float z, __m256& A, __m256& B) {
  if constexpr (BITS == 4) {
    A = _mm256_set1_ps(z);
    B = _mm256_set1_ps(s);
  } else {
    const __m256 e = BITS == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3) : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 t = _mm256_mul_ps(_mm256_sub_ps(e, _mm256_set1_ps(z)), _mm256_set1_ps(s));
    if constexpr (BITS == 2) {
      A = t;
      B = t;
    } else {
      A = _mm256_permute2f128_ps(t, t, 0x00);  // codes 0-3 in both halves
      B = _mm256_permute2f128_ps(t, t, 0x11);  // codes 4-7
    }
  }
}

// Block j of a packed row -> w[i] = weights 8i .. 8i + 7 of the block (exact (q - z) * s).
template <int BITS>
QK_SI void avx2_block(const uint8_t* row, int64_t nb, int64_t j, __m256 A, __m256 B, __m256* w) {
  if constexpr (BITS == 4) {
    const uint8_t* b = row + 16 * j;
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8)));
    const __m256i m15 = _mm256_set1_epi32(15);
    const __m256i c[4] = {_mm256_and_si256(lo, m15), _mm256_and_si256(hi, m15), _mm256_srli_epi32(lo, 4),
                          _mm256_srli_epi32(hi, 4)};
    for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c[i]), A), B);
  } else {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * j)));
    const __m256i f[4] = {v, _mm256_srli_epi32(v, 2), _mm256_srli_epi32(v, 4), _mm256_srli_epi32(v, 6)};
    if constexpr (BITS == 2) {
      for (int i = 0; i < 4; ++i) w[i] = _mm256_permutevar8x32_ps(A, f[i]);
    } else {
      uint32_t h;
      std::memcpy(&h, row + 8 * nb + 4 * j, 4);
      const __m256i hv = _mm256_set1_epi32(int(h));
      const __m256i to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);  // bit t -> bit 31
      for (int i = 0; i < 4; ++i) {
        const __m256 sel = _mm256_castsi256_ps(
            _mm256_sllv_epi32(hv, _mm256_sub_epi32(to_sign, _mm256_set1_epi32(8 * i))));
        w[i] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(A, f[i]), _mm256_permutevar8x32_ps(B, f[i]), sel);
      }
    }
  }
}

template <int BITS>
inline void avx2_dequant_row(const PackedW& P, int64_t n, float* out) {
  const uint8_t* row = P.qw + n * P.row_bytes;
  for (int64_t g = 0; g < P.G; ++g) {
    __m256 A, B;
    avx2_group_consts<BITS>(meta_at(P.scales, P.mdt, n * P.G + g), meta_at(P.zeros, P.mdt, n * P.G + g), A, B);
    const int64_t j1 = qmin(P.nb, (g + 1) * P.gblk);
    for (int64_t j = g * P.gblk; j < j1; ++j) {
      __m256 w[4];
      avx2_block<BITS>(row, P.nb, j, A, B, w);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 32 * j + 8 * i, w[i]);
    }
  }
}

// y[m, n + r] for m < MT, r < NR: x rows from xp (fp32 [MT, Kp], row stride Kp, zero padded).
// NA accumulators per (m, r) (NA = 2: weights 0-15 / 16-31 of each block) keep FMA chains apart.
template <int BITS, int MT, int NR, int NA>
inline void avx2_gemv_block(const PackedW& P, const float* xp, int64_t n, Dt ydt, void* y, int64_t ldy,
                            const float* bias) {
  const int64_t Kp = P.Kp();
  __m256 acc[MT][NR][NA];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < NA; ++a) acc[m][r][a] = _mm256_setzero_ps();
  const uint8_t* row[NR];
  for (int r = 0; r < NR; ++r) row[r] = P.qw + (n + r) * P.row_bytes;
  for (int64_t g = 0; g < P.G; ++g) {
    __m256 A[NR], B[NR];
    for (int r = 0; r < NR; ++r)
      avx2_group_consts<BITS>(meta_at(P.scales, P.mdt, (n + r) * P.G + g), meta_at(P.zeros, P.mdt, (n + r) * P.G + g),
                              A[r], B[r]);
    const int64_t j1 = qmin(P.nb, (g + 1) * P.gblk);
    for (int64_t j = g * P.gblk; j < j1; ++j) {
      for (int r = 0; r < NR; ++r) {
        __m256 w[4];
        avx2_block<BITS>(row[r], P.nb, j, A[r], B[r], w);
        for (int m = 0; m < MT; ++m) {
          const float* xb = xp + m * Kp + 32 * j;
          for (int i = 0; i < 4; ++i)
            acc[m][r][i % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), w[i], acc[m][r][i % NA]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r)
    {
      __m256 t = acc[m][r][0];
      for (int a = 1; a < NA; ++a) t = _mm256_add_ps(t, acc[m][r][a]);
      store_any(ydt, y, m * ldy + n + r, reduce_add(V{t}) + (bias ? bias[n + r] : 0.f));
    }
}

// Rows [n0, n1) for MT rows of x, NR rows of W at a time. Decoding costs more than the FMAs, so
// the register budget (16 ymm) goes to the MT x rows that share each decoded block: up to 8
// accumulators, the rest for the block and the group constants (Zen 3, 4096 x 11008 int4: NR = 4
// spilled accumulators, 7.9 ms against 5.0-5.5 for NR = 1-2).
template <int BITS, int MT>
inline void avx2_gemv_rows_t(const PackedW& P, const float* xp, int64_t n0, int64_t n1, Dt ydt, void* y,
                             int64_t ldy, const float* bias) {
  constexpr int NR = MT == 1 ? 2 : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) avx2_gemv_block<BITS, MT, NR, 2>(P, xp, n, ydt, y, ldy, bias);
  for (; n < n1; ++n) avx2_gemv_block<BITS, MT, 1, 2>(P, xp, n, ydt, y, ldy, bias);
}

// f(std::integral_constant<int, MT>, m0) over the rows of x in tiles of MT = 4, 2 and 1 rows.
template <class F>
QK_SI void for_x_tiles(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t left = M - m0;
    if (left >= 4) {
      f(std::integral_constant<int, 4>{}, m0);
      m0 += 4;
    } else if (left >= 2) {
      f(std::integral_constant<int, 2>{}, m0);
      m0 += 2;
    } else {
      f(std::integral_constant<int, 1>{}, m0);
      m0 += 1;
    }
  }
}

template <int BITS>
inline void avx2_gemv_rows_b(const PackedW& P, const float* xp, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                             int64_t ldy, const float* bias) {
  // M > 4: slabs of 16 rows of W, so the slab stays in cache while every 4 rows of x read it
  const int64_t slab = M <= 4 ? n1 - n0 : 16;
  for (int64_t s0 = n0; s0 < n1; s0 += slab) {
    const int64_t s1 = qmin(n1, s0 + slab);
    for_x_tiles(M, [&](auto mt, int64_t m0) {
      avx2_gemv_rows_t<BITS, decltype(mt)::value>(P, xp + m0 * P.Kp(), s0, s1, ydt,
                                                  static_cast<char*>(y) + m0 * ldy * (ydt == Dt::F32 ? 4 : 2), ldy,
                                                  bias);
    });
  }
}

inline void avx2_gemv_rows(const PackedW& P, const float* xp, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                           int64_t ldy, const float* bias) {
  QK_BITS_DISPATCH(P.bits, avx2_gemv_rows_b, P, xp, M, n0, n1, ydt, y, ldy, bias)
}

}  // namespace QK_ISA_NS
}  // namespace qk

#endif  // QK_ISA_AVX2
