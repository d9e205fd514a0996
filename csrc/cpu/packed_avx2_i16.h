// AVX2 int16 GEMV for bf16 / fp16 x at small M (kPathI16): the AVX2 counterpart of the AVX-512
// VNNI GEMV, with vpmaddwd; and from M = 12 the int16 GEMM (kPathI16Gemm, at the end of this file)
// over the same pieces of x. Included by packed_kernel.h (whose helpers it uses) in the AVX2 build.
//
// x is quantized per group g to int16: x ~ a_g h with a_g = amax_g / 32767 (error <= a_g / 2 =
// amax / 65534, as the VNNI path's two int8 pieces), or, where that group's range is wide (the VNNI
// path's rules: an outlier, at twice the ratio for bf16 x, or a bulk of small entries under a few
// large ones) or its spread narrow (a DC offset), to two pieces, x ~ a_g (h + l / 65536) (error <= amax / 2^32). x with
// inf / NaN, a range no int16 split holds, or a nonzero group amax below 2^-64 or above 2^64 takes
// the exact fp32 GEMV of packed_avx2.h instead. Codes are decoded to int16 lanes (int4 in natural
// order, int2 / int3 even weights then odd ones, x stored to match) and vpmaddwd sums code * h
// pairs into int32 lanes, exact. Per group, with the zero point
// folded as in the VNNI path (the pieces' own sum on both sides, so the error follows |q - z|):
//   sum_k x^_k (q_k - z) s = a_g s (sum_k h_k q_k - z S_g),  S_g = sum_k h_k (+ l_k / 65536).
// The two terms cancel where large entries of x meet weights with q = z (a bulk of small entries
// under a few large ones), and fp32 sums of them lost the small entries' product there (9% error at
// a bulk of amax / 1e5). Groups of up to 1024 weights (i16_gemv_block_g) subtract z's integer part
// from the exact int32 sums and only its fraction in fp32; longer groups (i16_gemv_block) form each
// group's value in double from exact int64 sums.
// Per 32 weights and row of x: 3 (int4), 5 (int2) or 11 (int3) decode instructions + 4 multiply-add
// ones, against the fp32 GEMV's 22 for int4.
#pragma once

#if defined(QK_ISA_AVX2)

namespace qk {
namespace QK_ISA_NS {

enum I16Mode : int32_t { kI16One = 0, kI16Two = 1, kI16Fp32 = 2 };
// Blocks summed in int32 before a flush: a lane takes 4 products of |q h| <= 15 * 32768 per
// block, so 512 blocks keep the sum of two lanes below 2^31 (groups longer than that flush inside).
constexpr int64_t kI16FlushBlocks = 512;
// Below amax / kI16BulkFp32 a group's bulk (see kVnniBulkRange) loses fp16 precision even in two
// pieces (resolution amax / 2^32; at 2^18 the bulk keeps ~2^-14 relative).
constexpr float kI16BulkFp32 = 262144.f;
// Software prefetch distance, in blocks of NR rows of W: the NR row streams at a time (plus the
// bit plane at int3) did not keep enough lines in flight on Zen 3 (4096 x 11008 int4, 1 thread,
// out of cache about 2x the in-cache time without it).
constexpr int64_t kI16PfRows = 4;
// Groups of up to this many blocks (group sizes up to 1024) take i16_gemv_block_g, whose int32
// epilogue is bounded for them.
constexpr int64_t kI16ShortGroup = 32;

// Workspace: fp32 x [M][Kp] (zero padded; the fp32 fallback and the source of the pieces), then
// per row m: xh, xl int16 [Kp]; A fp32 [G] (a_g); S1, S2 fp64 [G] (the pieces' sums for one and
// for two pieces, S_g above; i16_gemv_block); ShI, SlI int32 [G] (sum h, sum l) and S2F fp32 [G]
// (S2) for i16_gemv_block_g, which reads A, ShI, SlI and S2F 8 groups at a time: those are zero from
// G to G rounded up to 16; Two int32 [G] (1 where the group takes two pieces); mode int32 (the row's
// widest: kI16Two where any group takes two pieces).
struct I16Layout {
  int64_t xf_bytes, xh_off, xl_off, A_off, S1_off, S2_off, ShI_off, SlI_off, S2F_off, Two_off, mode_off, per_m;
};
inline I16Layout i16_layout(const PackedW& P, int64_t M) {
  I16Layout L;
  const int64_t Kp = P.Kp(), G = round_up(P.G, 16);
  L.xf_bytes = round_up(M * Kp * 4, 64);
  L.xh_off = 0;
  L.xl_off = Kp * 2;
  L.A_off = Kp * 4;
  L.S1_off = L.A_off + G * 4;
  L.S2_off = L.S1_off + G * 8;
  L.ShI_off = L.S2_off + G * 8;
  L.SlI_off = L.ShI_off + G * 4;
  L.S2F_off = L.SlI_off + G * 4;
  L.Two_off = L.S2F_off + G * 4;
  L.mode_off = L.Two_off + G * 4;
  L.per_m = round_up(L.mode_off + 4, 64);
  return L;
}

// The widest mode (kI16One < kI16Two < kI16Fp32) of rows [m0, m1) of x in an i16_prep workspace.
inline int32_t i16_widest_mode(const uint8_t* ws, const I16Layout& L, int64_t m0, int64_t m1) {
  int32_t mode = kI16One;
  for (int64_t m = m0; m < m1; ++m)
    mode = qmax(mode, *reinterpret_cast<const int32_t*>(ws + L.xf_bytes + m * L.per_m + L.mode_off));
  return mode;
}

// The zero points' integer parts zi (round to nearest, clamped to [-32, 32]; see i16_gemv_block_g).
QK_SI __m256i i16_zero_int(__m256 z) {
  return _mm256_min_epi32(_mm256_set1_epi32(32), _mm256_max_epi32(_mm256_set1_epi32(-32), _mm256_cvtps_epi32(z)));
}

// Each block of 32 int16 in place: x0 x1 .. x31 -> x0 x2 .. x30 x1 x3 .. x31 (the order in which
// i16_codes gives int2 / int3 codes).
inline void i16_even_odd(int16_t* x, int64_t nb) {
  const __m256i low = _mm256_set1_epi32(0xFFFF);
  for (int64_t j = 0; j < nb; ++j) {
    __m256i* p = reinterpret_cast<__m256i*>(x + 32 * j);
    const __m256i a = _mm256_loadu_si256(p), b = _mm256_loadu_si256(p + 1);
    // packus of zero-extended words (0..65535) does not saturate; it interleaves the 128-bit halves
    const __m256i ev = _mm256_packus_epi32(_mm256_and_si256(a, low), _mm256_and_si256(b, low));
    const __m256i od = _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));
    _mm256_storeu_si256(p, _mm256_permute4x64_epi64(ev, 0xD8));
    _mm256_storeu_si256(p + 1, _mm256_permute4x64_epi64(od, 0xD8));
  }
}

// Rows [m0, m1) of x (M rows in all) -> the workspace above.
inline void i16_prep(const PackedW& P, Dt xdt, const void* x, int64_t ldx, int64_t M, int64_t m0, int64_t m1,
                     uint8_t* ws) {
  const I16Layout L = i16_layout(P, M);
  const int64_t Kp = P.Kp();
  float* xf_all = reinterpret_cast<float*>(ws);
  prep_f32(P, xdt, x, ldx, m0, m1, xf_all);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 c65536 = _mm256_set1_ps(65536.f), zero = _mm256_setzero_ps();
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const float wide = xdt == Dt::BF16 ? kWideRangeBf16 : kVnniWideRange;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xf = xf_all + m * Kp;
    uint8_t* wm = ws + L.xf_bytes + m * L.per_m;
    int16_t* xh = reinterpret_cast<int16_t*>(wm + L.xh_off);
    int16_t* xl = reinterpret_cast<int16_t*>(wm + L.xl_off);
    float* A = reinterpret_cast<float*>(wm + L.A_off);
    double* S1 = reinterpret_cast<double*>(wm + L.S1_off);
    double* S2 = reinterpret_cast<double*>(wm + L.S2_off);
    int32_t& mode = *reinterpret_cast<int32_t*>(wm + L.mode_off);
    int32_t* ShI = reinterpret_cast<int32_t*>(wm + L.ShI_off);
    int32_t* SlI = reinterpret_cast<int32_t*>(wm + L.SlI_off);
    float* S2F = reinterpret_cast<float*>(wm + L.S2F_off);
    int32_t* Two = reinterpret_cast<int32_t*>(wm + L.Two_off);
    for (int64_t g = P.G; g < round_up(P.G, 16); ++g) {  // read 8 groups at a time
      A[g] = 0.f;
      ShI[g] = SlI[g] = Two[g] = 0;
      S2F[g] = 0.f;
    }
    mode = kI16One;
    for (int64_t g = 0; g < P.G && mode != kI16Fp32; ++g) {
      const int64_t k0 = g * P.gblk * 32, k1 = qmin(Kp, (g + 1) * P.gblk * 32);  // multiples of 32
      __m256 vmax = zero, vabs = zero, vhi = _mm256_set1_ps(-INFINITY), vlo = _mm256_set1_ps(INFINITY);
      const int64_t kx = qmin(k1, P.K);  // signed extremes over real entries only (not K's zero padding)
      int64_t k = k0;
      for (; k < k1; k += 8) {
        const __m256 xv = _mm256_loadu_ps(xf + k), a = _mm256_and_ps(xv, absmask);
        vmax = _mm256_max_ps(a, vmax);  // (a NaN is dropped here; the sum below catches it)
        vabs = _mm256_add_ps(vabs, a);
        if (k + 8 <= kx) {
          vhi = _mm256_max_ps(xv, vhi);
          vlo = _mm256_min_ps(xv, vlo);
        }
      }
      alignas(32) float mx[8], hi8[8], lo8[8];
      _mm256_store_ps(mx, vmax);
      _mm256_store_ps(hi8, vhi);
      _mm256_store_ps(lo8, vlo);
      float amax = 0.f, xhi = -INFINITY, xlo = INFINITY;
      for (int i = 0; i < 8; ++i) {
        amax = qmax(amax, mx[i]);
        xhi = qmax(xhi, hi8[i]);
        xlo = qmin(xlo, lo8[i]);
      }
      for (k = k0 + (kx - k0) / 8 * 8; k < kx; ++k) {
        xhi = qmax(xhi, xf[k]);
        xlo = qmin(xlo, xf[k]);
      }
      const float asum = reduce_add(V{vabs});
      // inf or NaN in the group (the sum of |x| sees both), or a range too tiny or too large to scale
      if (!(asum <= 3.0e38f) || (amax > 0.f && amax < kVnniTinyAmax) || amax > kVnniHugeAmax) {
        mode = kI16Fp32;
        break;
      }
      // the padded tail of the last group counts as zeros in the mean, which only errs towards two pieces
      bool two = amax * float(k1 - k0) > wide * asum;
      // x spread over less than amax / 8 (a DC offset with small variations): one piece's error,
      // amax / 65534 per entry, is then large next to what varies, and weights whose products
      // cancel the offset (rows summing to ~0) leave only that error (a review: 300x F.linear's
      // with x = 3 + 0.01 noise on balanced weights exact in fp16)
      if (xhi - xlo < amax * (1.f / kVnniWideRange)) two = true;
      const float inv = amax > 0.f ? 32767.f / amax : 0.f, a = amax / 32767.f;
      A[g] = a;
      const __m256 vinv = _mm256_set1_ps(inv), vsmall = _mm256_set1_ps(amax / kVnniWideRange);
      __m256 vbulk = zero;
      int64_t nbulk = 0, nnz = 0;
      double sh = 0.0, sl = 0.0;  // sums of the pieces (int32 lanes flushed every 1024 entries)
      for (int64_t c0 = k0; c0 < k1; c0 += 1024) {
        __m256i vsh = _mm256_setzero_si256(), vsl = _mm256_setzero_si256();
        for (int64_t k = c0; k < qmin(k1, c0 + 1024); k += 16) {
          __m256i hi[2], li[2];
          for (int i = 0; i < 2; ++i) {
            const __m256 xv = _mm256_loadu_ps(xf + k + 8 * i), xa = _mm256_and_ps(xv, absmask);
            const __m256 nz = _mm256_cmp_ps(xa, zero, _CMP_GT_OQ);
            const __m256 small = _mm256_and_ps(nz, _mm256_cmp_ps(xa, vsmall, _CMP_LE_OQ));
            vbulk = _mm256_add_ps(vbulk, _mm256_and_ps(small, xa));
            nbulk += __builtin_popcount(_mm256_movemask_ps(small));
            nnz += __builtin_popcount(_mm256_movemask_ps(nz));
            const __m256 v = _mm256_mul_ps(xv, vinv);  // |v| <= 32767
            __m256 h = _mm256_round_ps(v, kRound);
            __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, h), c65536), kRound);  // in [-32768, 32768]
            // l = 32768 does not fit int16: carry it into h (h < 32767 there, since v - h > 0 needs v < 32767)
            const __m256 carry = _mm256_cmp_ps(l, _mm256_set1_ps(32768.f), _CMP_EQ_OQ);
            h = _mm256_add_ps(h, _mm256_and_ps(carry, _mm256_set1_ps(1.f)));
            l = _mm256_sub_ps(l, _mm256_and_ps(carry, c65536));
            hi[i] = _mm256_cvtps_epi32(h);
            li[i] = _mm256_cvtps_epi32(l);
            vsh = _mm256_add_epi32(vsh, hi[i]);
            vsl = _mm256_add_epi32(vsl, li[i]);
          }
          // packs_epi32 interleaves the 128-bit halves: put them back in order
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(xh + k),
                              _mm256_permute4x64_epi64(_mm256_packs_epi32(hi[0], hi[1]), 0xD8));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(xl + k),
                              _mm256_permute4x64_epi64(_mm256_packs_epi32(li[0], li[1]), 0xD8));
        }
        alignas(32) int32_t th[8], tl[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(th), vsh);
        _mm256_store_si256(reinterpret_cast<__m256i*>(tl), vsl);
        for (int i = 0; i < 8; ++i) {
          sh += th[i];
          sl += tl[i];
        }
      }
      S1[g] = sh;
      S2[g] = sh + sl / 65536.0;
      // int32 copies for i16_gemv_block_g (groups of up to 1024 entries: |sh|, |sl| <= 2^25, exact)
      ShI[g] = int32_t(qmax(-2147483648.0, qmin(2147483647.0, sh)));
      SlI[g] = int32_t(qmax(-2147483648.0, qmin(2147483647.0, sl)));
      S2F[g] = float(S2[g]);
      // As in the VNNI path, only a bulk holding 3/8 of the nonzero entries counts (kVnniBulkRange):
      // a few small entries' mean falls below amax / 32 by chance too often (uniform x, g64: ~1/3 of rows).
      // So a group mostly at amax whose large entries all meet zero weights keeps one piece and its
      // small entries' error (a review: 26x F.linear's with 3/4 of a group at amax, the rest at
      // amax / 1000; README).
      if (8 * nbulk >= 3 * nnz && nbulk > 0) {
        const float bulk = reduce_add(V{vbulk});
        if (amax * float(nbulk) > kI16BulkFp32 * bulk) {
          mode = kI16Fp32;
          break;
        }
        if (amax * float(nbulk) > kVnniBulkRange * bulk) two = true;
      }
      // Pieces per group, not per row: a group that needs no second piece gets l = 0 and the sums of
      // one piece, so the two-piece loops compute exactly the one-piece value for it and may skip
      // its second piece (i16_gemv_block(_g), i16g_micro). Real activations trip the rules above in
      // a minority of their groups (an outlier channel, a heavy tail: 13-42% of the groups of
      // MiniLM's and a Llama MLP's inputs at the outlier ratio 8) but in most rows, which took two pieces throughout; and a
      // row's output no longer depends on the other rows of its call.
      Two[g] = two;
      if (two) {
        mode = kI16Two;
      } else {
        std::memset(xl + k0, 0, size_t(k1 - k0) * 2);
        S2[g] = sh;
        SlI[g] = 0;
        S2F[g] = float(sh);
      }
    }
    if (P.bits != 4 && mode != kI16Fp32) {  // int2 / int3 read x in even / odd order (see i16_codes)
      i16_even_odd(xh, P.nb);
      i16_even_odd(xl, P.nb);
    }
  }
}

// Block j of a packed row -> int16 lanes of codes: int4 c[0] = weights 0-15, c[1] = 16-31; int2 /
// int3 c[0] = weights 0, 2, .., 30, c[1] = 1, 3, .., 31 (x is reordered to match, i16_even_odd).
template <int BITS>
QK_SI void i16_codes(const uint8_t* row, int64_t nb, int64_t j, __m256i* c) {
  if constexpr (BITS == 4) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j)));
    c[0] = _mm256_and_si256(b, _mm256_set1_epi16(15));
    c[1] = _mm256_srli_epi16(b, 4);
  } else {
    int64_t raw;
    std::memcpy(&raw, row + 8 * j, 8);
    // qword f = the block's bytes >> 2 f: bytes 8 f .. 8 f + 7 then hold field f (weights 8 f + p)
    __m256i t = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(raw), _mm256_setr_epi64x(0, 2, 4, 6)),
                                 _mm256_set1_epi8(3));
    if constexpr (BITS == 3) {
      int32_t h;
      std::memcpy(&h, row + 8 * nb + 4 * j, 4);
      // byte t gets byte t / 8 of the bit plane, then its bit t % 8 -> 4
      const __m256i bytes = _mm256_shuffle_epi8(
          _mm256_set1_epi32(h), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2,
                                                 2, 3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
      t = _mm256_or_si256(t, _mm256_and_si256(set, _mm256_set1_epi8(4)));
    }
    // byte t = code of weight t; as words, the even weights' codes are the low bytes and the odd
    // ones' the high bytes: two instructions instead of widening both halves (x is in that order)
    c[0] = _mm256_and_si256(t, _mm256_set1_epi16(0xFF));
    c[1] = _mm256_srli_epi16(t, 8);
  }
}

// Elements [off, off + G) of scales or zeros (dtype dt) -> fp32 out[0, G), zeros in out[G, G8) (G
// rounded up to 8). `avail` elements from off may be read: a tail read as 8 when they allow it.
inline void meta_row(const void* p, Dt dt, int64_t off, int64_t G, int64_t avail, float* out) {
  const int64_t G0 = G / 8 * 8;
  const bool wide = G0 < G && G0 + 8 <= avail;
  auto rows = [&](auto d) QK_SI_LAMBDA {
    constexpr Dt D = decltype(d)::value;
    for (int64_t g = 0; g < G0; g += 8) vst(out + g, vload<D>(p, off + g));
    if (wide) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(G - G0)), lane));
      _mm256_storeu_ps(out + G0, _mm256_and_ps(keep, vload<D>(p, off + G0).v));
    }
  };
  switch (dt) {
    case Dt::F32: rows(std::integral_constant<Dt, Dt::F32>{}); break;
    case Dt::F16: rows(std::integral_constant<Dt, Dt::F16>{}); break;
    case Dt::BF16: rows(std::integral_constant<Dt, Dt::BF16>{}); break;
  }
  if (!wide)
    for (int64_t g = G0; g < round_up(G, 8); ++g) out[g] = g < G ? meta_at(p, dt, off + g) : 0.f;
}

// Scales, then zeros, of rows n .. n + NR - 1 of W as fp32, each G8 = G rounded up to 8 long and zero
// padded: row r's scales at 2 r G8, its zeros at 2 r G8 + G8 (a per-thread buffer).
template <int NR>
inline const float* i16_meta_rows(const PackedW& P, int64_t n) {
  const int64_t G = P.G, G8 = round_up(G, 8);
  float* sz = static_cast<float*>(scratch(5, size_t(2 * NR * G8) * 4));
  for (int r = 0; r < NR; ++r) {
    meta_row(P.scales, P.mdt, (n + r) * G, G, (P.N - n - r) * G, sz + 2 * r * G8);
    meta_row(P.zeros, P.mdt, (n + r) * G, G, (P.N - n - r) * G, sz + 2 * r * G8 + G8);
  }
  return sz;
}

// Pointers of one call of i16_gemv_block(_g): MT rows of x (pieces xh, xl), NR rows of W.
template <int MT, int NR>
struct I16Rows {
  const int16_t* xh[MT];
  const int16_t* xl[MT];
  const int32_t* two[MT];
  const uint8_t* w[NR];
  I16Rows(const PackedW& P, const I16Layout& L, const uint8_t* wrow, int64_t n) {
    for (int m = 0; m < MT; ++m) {
      xh[m] = reinterpret_cast<const int16_t*>(wrow + m * L.per_m + L.xh_off);
      xl[m] = reinterpret_cast<const int16_t*>(wrow + m * L.per_m + L.xl_off);
      two[m] = reinterpret_cast<const int32_t*>(wrow + m * L.per_m + L.Two_off);
    }
    for (int r = 0; r < NR; ++r) w[r] = P.qw + (n + r) * P.row_bytes;
  }
  // Group g of one of the MT rows takes two pieces (the others' l are 0 there: i16_prep).
  bool two_in(int64_t g) const {
    int32_t t = 0;
    for (int m = 0; m < MT; ++m) t |= two[m][g];
    return t != 0;
  }
};

// Block j of the NR rows of W against the MT rows of x: code * piece pairs into the int32 lanes of
// ah (h pieces) and al (l pieces). Once per 64-byte line of a row (4 blocks of int4, 8 of int2 /
// int3) it prefetches the same line kI16PfRows blocks of NR rows on.
template <int BITS, int MT, int NR, int NP>
QK_SI void i16_block(const PackedW& P, const I16Rows<MT, NR>& R, int64_t j, __m256i (&ah)[MT][NR],
                     __m256i (&al)[MT][NR]) {
  for (int r = 0; r < NR; ++r) {
    if ((j & (BITS == 4 ? 3 : 7)) == 0) {
      const uint8_t* ahead = R.w[r] + kI16PfRows * NR * P.row_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(ahead + (BITS == 4 ? 16 : 8) * j), _MM_HINT_T0);
      if constexpr (BITS == 3) _mm_prefetch(reinterpret_cast<const char*>(ahead + 8 * P.nb + 4 * j), _MM_HINT_T0);
    }
    __m256i c[2];
    i16_codes<BITS>(R.w[r], P.nb, j, c);
    for (int m = 0; m < MT; ++m) {
      const __m256i* h = reinterpret_cast<const __m256i*>(R.xh[m] + 32 * j);
      ah[m][r] = _mm256_add_epi32(ah[m][r], _mm256_madd_epi16(c[0], _mm256_loadu_si256(h)));
      ah[m][r] = _mm256_add_epi32(ah[m][r], _mm256_madd_epi16(c[1], _mm256_loadu_si256(h + 1)));
      if constexpr (NP == 2) {
        const __m256i* l = reinterpret_cast<const __m256i*>(R.xl[m] + 32 * j);
        al[m][r] = _mm256_add_epi32(al[m][r], _mm256_madd_epi16(c[0], _mm256_loadu_si256(l)));
        al[m][r] = _mm256_add_epi32(al[m][r], _mm256_madd_epi16(c[1], _mm256_loadu_si256(l + 1)));
      }
    }
  }
}

// y[m, n + r] for m < MT, r < NR, NP pieces, for groups of more than kI16ShortGroup blocks or one
// group per row (i16_gemv_block_g takes the others). The per-row workspaces of the MT rows are
// L.per_m apart. A group's int32 lane sums (flushed every kI16FlushBlocks blocks) add up exactly in
// int64; at the group's end its value a_g s_g (sum h q [+ sum l q / 65536] - z S_g) is formed in
// fp64 and added to the row's sum. (Summing the two terms over all groups apart and subtracting at
// the end let a group whose large entries meet q = z wipe out the other groups' products: a
// review's case, x = 1e10 on such a group, 1e-10 elsewhere, gave 0.) At more than 32 blocks per
// group this per-group work is a few % of the multiply-adds.
template <int BITS, int MT, int NR, int NP>
inline void i16_gemv_block(const PackedW& P, const I16Layout& L, const uint8_t* wrow, int64_t n, Dt ydt, void* y,
                           int64_t ldy, const float* bias) {
  const int64_t G = P.G, G8 = round_up(G, 8);
  const I16Rows<MT, NR> R(P, L, wrow, n);
  const float* sz = i16_meta_rows<NR>(P, n);
  auto lanes = [](__m256i v) QK_SI_LAMBDA {  // the sum of 8 int32 lanes, in int64
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
    int64_t s = 0;
    for (int i = 0; i < 8; ++i) s += t[i];
    return s;
  };
  double tot[MT][NR] = {};
  for (int64_t g = 0; g < G; ++g) {
    int64_t sh[MT][NR] = {}, sl[MT][NR] = {};
    const int64_t jg1 = qmin(P.nb, (g + 1) * P.gblk);
    for (int64_t c0 = g * P.gblk; c0 < jg1; c0 += kI16FlushBlocks) {
      __m256i ah[MT][NR], al[MT][NR];
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) ah[m][r] = al[m][r] = _mm256_setzero_si256();
      const int64_t c1 = qmin(jg1, c0 + kI16FlushBlocks);
      if (NP == 2 && R.two_in(g))
        for (int64_t j = c0; j < c1; ++j) i16_block<BITS, MT, NR, 2>(P, R, j, ah, al);
      else  // (al stays 0)
        for (int64_t j = c0; j < c1; ++j) i16_block<BITS, MT, NR, 1>(P, R, j, ah, al);
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) {
          sh[m][r] += lanes(ah[m][r]);
          if constexpr (NP == 2) sl[m][r] += lanes(al[m][r]);
        }
    }
    for (int m = 0; m < MT; ++m) {
      const uint8_t* xm = wrow + m * L.per_m;
      const double a = reinterpret_cast<const float*>(xm + L.A_off)[g];
      const double S = reinterpret_cast<const double*>(xm + (NP == 2 ? L.S2_off : L.S1_off))[g];
      for (int r = 0; r < NR; ++r) {
        const float* sr = sz + 2 * r * G8;
        const double v = double(sh[m][r]) + (NP == 2 ? double(sl[m][r]) * 0x1p-16 : 0.0) - double(sr[G8 + g]) * S;
        tot[m][r] += a * double(sr[g]) * v;
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) store_any(ydt, y, m * ldy + n + r, float(tot[m][r]) + (bias ? bias[n + r] : 0.f));
}

// The sums of the 8 lanes of each of 8 vectors v[i][0..7], in order: a tree of vphaddd.
QK_SI __m256i i16_hsum8(const int32_t (*v)[8]) {
  __m256i a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(v[i]));
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// i16_gemv_block for groups of up to kI16ShortGroup blocks (G > 1, so every group is whole; GB = 1,
// 2, 4 or 8 fixes the count at compile time, GB = 0 reads it from P). The groups' int32 lane
// sums are stored, and every 8 groups go through the epilogue together; per group in the loop of
// i16_gemv_block, or with fp64 constants per row, the epilogue cost as much as g64's multiply-adds.
// Epilogue, per 8 groups: the group sums (i16_hsum8) with the zero point's integer part zi folded in
// exactly, sum h (q - zi) = sum h q - zi S_g, then its fraction zf = z - zi in fp32. As
// |zf| <= 1/2 <= |q - z| wherever q != zi (for |z| <= 32.5; beyond it q != zi and |zf| < |q - z|),
// |zf S_g| <= sum |h (q - z)|: no term is larger than the products it stands for, so fp32 rounds
// the sum as an fp32 dot product of them would (sum h q and z S_g apart cancel where large entries
// of x meet q = z, and fp32 lost the small entries' products there). zi is clamped to [-32, 32]:
// at 32 blocks |sum h q| < 2^29 and |zi S_g| <= 2^30, so the int32 arithmetic cannot overflow (a
// zero point beyond that keeps the rest in zf).
template <int BITS, int MT, int NR, int NP, int GB>
inline void i16_gemv_block_g(const PackedW& P, const I16Layout& L, const uint8_t* wrow, int64_t n, Dt ydt, void* y,
                             int64_t ldy, const float* bias) {
  const int64_t G = P.G, G8 = round_up(G, 8), gb = GB ? GB : P.gblk;
  const I16Rows<MT, NR> R(P, L, wrow, n);
  const float* sz = i16_meta_rows<NR>(P, n);
  alignas(32) int32_t seg[MT * NR * NP][8][8];  // [accumulator][group % 8][lane]
  __m256 acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g8 = 0; g8 < G; g8 += 8) {
    const int ng = int(qmin(int64_t(8), G - g8));
    for (int gi = 0; gi < ng; ++gi) {
      __m256i ah[MT][NR], al[MT][NR];
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) ah[m][r] = al[m][r] = _mm256_setzero_si256();
      const int64_t j0 = (g8 + gi) * gb;
      if (NP == 2 && R.two_in(g8 + gi))
        for (int64_t jj = 0; jj < gb; ++jj) i16_block<BITS, MT, NR, 2>(P, R, j0 + jj, ah, al);
      else  // (al stays 0)
        for (int64_t jj = 0; jj < gb; ++jj) i16_block<BITS, MT, NR, 1>(P, R, j0 + jj, ah, al);
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(seg[(m * NR + r) * NP][gi]), ah[m][r]);
          if constexpr (NP == 2) _mm256_store_si256(reinterpret_cast<__m256i*>(seg[(m * NR + r) * NP + 1][gi]), al[m][r]);
        }
    }
    if (ng < 8)
      for (int i = 0; i < MT * NR * NP; ++i) std::memset(seg[i][ng], 0, (8 - ng) * 32);
    for (int r = 0; r < NR; ++r) {
      const float* sr = sz + 2 * r * G8;
      const __m256 zv = _mm256_loadu_ps(sr + G8 + g8);
      const __m256i zi = i16_zero_int(zv);
      const __m256 zf = _mm256_sub_ps(zv, _mm256_cvtepi32_ps(zi));
      const __m256 sv = _mm256_loadu_ps(sr + g8);
      for (int m = 0; m < MT; ++m) {
        const uint8_t* xm = wrow + m * L.per_m;
        const int i = (m * NR + r) * NP;
        const __m256i sh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + L.ShI_off) + g8 / 8);
        __m256 t = _mm256_cvtepi32_ps(_mm256_sub_epi32(i16_hsum8(seg[i]), _mm256_mullo_epi32(zi, sh)));
        __m256 S = _mm256_cvtepi32_ps(sh);
        if constexpr (NP == 2) {  // + (sum l (q - zi)) / 65536, S = S_h + S_l / 65536
          const __m256i sl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + L.SlI_off) + g8 / 8);
          const __m256 tl = _mm256_cvtepi32_ps(_mm256_sub_epi32(i16_hsum8(seg[i + 1]), _mm256_mullo_epi32(zi, sl)));
          t = _mm256_add_ps(t, _mm256_mul_ps(tl, _mm256_set1_ps(0x1p-16f)));
          S = _mm256_loadu_ps(reinterpret_cast<const float*>(xm + L.S2F_off) + g8);
        }
        // F t - (F zf) S: zf S alone overflows fp32 for |z| > ~1e31 even where the scale makes the
        // product finite (a review's z = 1e33, s = 1e-30)
        const __m256 F = _mm256_mul_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(xm + L.A_off) + g8), sv);
        acc[m][r] = _mm256_add_ps(acc[m][r], _mm256_sub_ps(_mm256_mul_ps(F, t), _mm256_mul_ps(_mm256_mul_ps(F, zf), S)));
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r)
      store_any(ydt, y, m * ldy + n + r, reduce_add(V{acc[m][r]}) + (bias ? bias[n + r] : 0.f));
}

template <int BITS, int MT, int NP>
inline void i16_gemv_rows_t(const PackedW& P, const I16Layout& L, const uint8_t* wrow, int64_t n0, int64_t n1,
                            Dt ydt, void* y, int64_t ldy, const float* bias) {
  // 8 int32 accumulators (MT * NR * NP); at MT = 4 each x load feeds two rows of W (Zen 3, 4096 x
  // 11008 int4, M = 4: 8.5 ms against 10.9 with NR = 1: four rows of int16 x fill L1 alone)
  constexpr int NR = (MT == 4 ? 2 : 4) / NP;
  int64_t n = n0;
  auto run = [&](auto gb) {
    constexpr int GB = decltype(gb)::value;
    if constexpr (GB < 0) {
      for (; n + NR <= n1; n += NR) i16_gemv_block<BITS, MT, NR, NP>(P, L, wrow, n, ydt, y, ldy, bias);
      for (; n < n1; ++n) i16_gemv_block<BITS, MT, 1, NP>(P, L, wrow, n, ydt, y, ldy, bias);
    } else {
      for (; n + NR <= n1; n += NR) i16_gemv_block_g<BITS, MT, NR, NP, GB>(P, L, wrow, n, ydt, y, ldy, bias);
      for (; n < n1; ++n) i16_gemv_block_g<BITS, MT, 1, NP, GB>(P, L, wrow, n, ydt, y, ldy, bias);
    }
  };
  switch (P.G == 1 ? -1 : P.gblk) {  // group sizes 32 - 256: the block count fixed at compile time
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 8: return run(std::integral_constant<int, 8>{});
    default: return P.gblk <= kI16ShortGroup ? run(std::integral_constant<int, 0>{}) : run(std::integral_constant<int, -1>{});
  }
}

template <int BITS, int NP>
inline void i16_gemv_rows_b(const PackedW& P, const I16Layout& L, const uint8_t* ws, int64_t M, int64_t n0,
                            int64_t n1, Dt ydt, void* y, int64_t ldy, const float* bias) {
  const int64_t slab = M <= 4 ? n1 - n0 : 16;  // M > 4: a slab of W stays in cache for every 4 rows of x
  for (int64_t s0 = n0; s0 < n1; s0 += slab) {
    const int64_t s1 = qmin(n1, s0 + slab);
    for_x_tiles(M, [&](auto mt, int64_t m0) {
      i16_gemv_rows_t<BITS, decltype(mt)::value, NP>(P, L, ws + L.xf_bytes + m0 * L.per_m, s0, s1, ydt,
                                                     static_cast<char*>(y) + m0 * ldy * (ydt == Dt::F32 ? 4 : 2),
                                                     ldy, bias);
    });
  }
}

// i16_gemv_rows_b with NP bound, for QK_BITS_DISPATCH.
template <int NP>
struct i16_gemv_rows_np {
  template <int BITS>
  static void run(const PackedW& P, const I16Layout& L, const uint8_t* ws, int64_t M, int64_t n0, int64_t n1, Dt ydt,
                  void* y, int64_t ldy, const float* bias) {
    i16_gemv_rows_b<BITS, NP>(P, L, ws, M, n0, n1, ydt, y, ldy, bias);
  }
};

// Rows [n0, n1) of y. A row of x needing two pieces in a group makes the call run the two-piece
// loops, which read the second piece in the groups where a row of the x tile needs it (the other
// rows' l are 0 there); a row needing fp32 sends the call to the fp32 GEMV.
inline void i16_gemv_rows(const PackedW& P, const uint8_t* ws, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                          int64_t ldy, const float* bias) {
  const I16Layout L = i16_layout(P, M);
  const int32_t mode = i16_widest_mode(ws, L, 0, M);
  if (mode == kI16Fp32) return avx2_gemv_rows(P, reinterpret_cast<const float*>(ws), M, n0, n1, ydt, y, ldy, bias);
  if (mode == kI16Two) QK_BITS_DISPATCH(P.bits, i16_gemv_rows_np<2>::run, P, L, ws, M, n0, n1, ydt, y, ldy, bias)
  QK_BITS_DISPATCH(P.bits, i16_gemv_rows_np<1>::run, P, L, ws, M, n0, n1, ydt, y, ldy, bias)
}

// ------------------------------------------------------------ AVX2 int16 GEMM (kPathI16Gemm)
// bf16 / fp16 x beyond the GEMV's M (prefill): the GEMV's x pieces, sums and rules (i16_prep), the
// same per-group formula, but blocked for reuse of both operands: 8 rows of x go across the lanes of
// one ymm (x transposed once per call, below), NR rows of W are decoded once per call into int16
// rows, and each code pair (k, k + 1) of a row is broadcast against the 8 rows' pairs (vpmaddwd). Per
// pair and row of W: one vpmaddwd + one vpaddd for 16 products, where an fp32 GEMM's FMA makes 8:
// on Zen 3 (two vpmaddwd pipes, four integer-add pipes) twice the products per cycle of the fp32
// BLAS GEMM on dequantized panels that this path replaces for bf16 / fp16 x.
// Workspace after i16_layout(P, M)'s: for each tile t of 8 rows of x (M8 = M rounded up to 8;
// rows past M are zero),
//   XH, XL  int32 [M8 / 8][Kp / 2][8]  the pieces' pairs at k = 2p, 2p + 1 (i16_codes' order)
//   A, S2   fp32  [M8 / 8][G][8]       a_g and S2F (S_h + S_l / 65536) per row
//   SH      int32 [M8 / 8][G][8]       ShI (S_h)
struct I16GemmLayout {
  int64_t xh_off, xl_off, a_off, s2_off, sh_off, total;
};
inline I16GemmLayout i16g_layout(const PackedW& P, int64_t M) {
  const I16Layout L = i16_layout(P, M);
  const int64_t M8 = round_up(M, 8), Kp = P.Kp(), G = P.G;
  I16GemmLayout Q;
  Q.xh_off = round_up(L.xf_bytes + M * L.per_m, 64);
  Q.xl_off = Q.xh_off + M8 * Kp * 2;
  Q.a_off = Q.xl_off + M8 * Kp * 2;
  Q.s2_off = round_up(Q.a_off + M8 * G * 4, 64);
  Q.sh_off = round_up(Q.s2_off + M8 * G * 4, 64);
  Q.total = round_up(Q.sh_off + M8 * G * 4, 64);
  return Q;
}

// The GEMM takes groups of up to kI16ShortGroup blocks (or one group per row of up to that many):
// their int32 sums are bounded as in i16_gemv_block_g.
inline bool i16g_fits(const PackedW& P) { return P.gblk <= kI16ShortGroup; }

// Rows [m0, m1) of x (M in all): i16_prep, then those rows' lanes of the tiles above. The call
// for the last rows also zeroes the lanes past M.
inline void i16g_prep(const PackedW& P, Dt xdt, const void* x, int64_t ldx, int64_t M, int64_t m0, int64_t m1,
                      uint8_t* ws) {
  i16_prep(P, xdt, x, ldx, M, m0, m1, ws);
  const I16Layout L = i16_layout(P, M);
  const I16GemmLayout Q = i16g_layout(P, M);
  const int64_t np2 = P.Kp() / 2, G = P.G;
  const int64_t mend = m1 == M ? round_up(M, 8) : m1;
  for (int64_t m = m0; m < mend; ++m) {
    const int64_t t = m / 8, i = m % 8;
    int32_t* xh = reinterpret_cast<int32_t*>(ws + Q.xh_off) + t * np2 * 8 + i;
    int32_t* xl = reinterpret_cast<int32_t*>(ws + Q.xl_off) + t * np2 * 8 + i;
    float* pa = reinterpret_cast<float*>(ws + Q.a_off) + t * G * 8 + i;
    float* ps2 = reinterpret_cast<float*>(ws + Q.s2_off) + t * G * 8 + i;
    int32_t* psh = reinterpret_cast<int32_t*>(ws + Q.sh_off) + t * G * 8 + i;
    const uint8_t* wm = ws + L.xf_bytes + m * L.per_m;
    if (m >= M || *reinterpret_cast<const int32_t*>(wm + L.mode_off) == kI16Fp32) {  // padding, or unused
      for (int64_t p = 0; p < np2; ++p) xh[8 * p] = xl[8 * p] = 0;
      for (int64_t g = 0; g < G; ++g) {
        pa[8 * g] = ps2[8 * g] = 0.f;
        psh[8 * g] = 0;
      }
      continue;
    }
    const int32_t* sh = reinterpret_cast<const int32_t*>(wm + L.xh_off);  // int16 pairs
    const int32_t* sl = reinterpret_cast<const int32_t*>(wm + L.xl_off);
    for (int64_t p = 0; p < np2; ++p) {
      xh[8 * p] = sh[p];
      xl[8 * p] = sl[p];
    }
    for (int64_t g = 0; g < G; ++g) {
      pa[8 * g] = reinterpret_cast<const float*>(wm + L.A_off)[g];
      ps2[8 * g] = reinterpret_cast<const float*>(wm + L.S2F_off)[g];
      psh[8 * g] = reinterpret_cast<const int32_t*>(wm + L.ShI_off)[g];
    }
  }
}

// 8 rows of W from row n (those from nr on, or past N, zero), decoded once per call: the codes minus the zero
// point's integer part zi (clamped to [-32, 32], as in i16_gemv_block_g), q - zi as int16 [8][Kp] in
// i16_codes' order (signed: vpmaddwd multiplies signed words), so that the integer sums are already
// sum h (q - zi); per row and group the scale s and s zf, zf = z - zi, each [8][G8]. |q - zi| <= 47
// keeps a group's int32 sums below 2^31 (512 pairs of 2 * 47 * 32768).
struct I16GemmW {
  const int32_t* w[8];  // code pairs of each row
  const float* s;
  const float* sz;
  int64_t G8;
};
template <int BITS>
inline I16GemmW i16g_decode(const PackedW& P, int64_t n, int nr) {
  const int64_t Kp = P.Kp(), G = P.G, G8 = round_up(G, 8);
  int16_t* wb = static_cast<int16_t*>(scratch(6, size_t(8) * Kp * 2 + size_t(8) * G8 * 16));
  float* s = reinterpret_cast<float*>(wb + 8 * Kp);
  float* sz = s + 8 * G8;
  float* z = sz + 8 * G8;
  int32_t* zi = reinterpret_cast<int32_t*>(z + 8 * G8);
  I16GemmW W;
  for (int r = 0; r < 8; ++r) {
    int16_t* o = wb + r * Kp;
    W.w[r] = reinterpret_cast<const int32_t*>(o);
    float *sr = s + r * G8, *zr = z + r * G8;
    int32_t* zir = zi + r * G8;
    const bool real = r < nr && n + r < P.N;
    if (real) {
      meta_row(P.scales, P.mdt, (n + r) * G, G, (P.N - n - r) * G, sr);
      meta_row(P.zeros, P.mdt, (n + r) * G, G, (P.N - n - r) * G, zr);
    } else {
      std::memset(sr, 0, G8 * 4);
      std::memset(zr, 0, G8 * 4);
    }
    for (int64_t g = 0; g < G8; g += 8) {
      const __m256 zv = _mm256_loadu_ps(zr + g);
      const __m256i zq = i16_zero_int(zv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(zir + g), zq);
      // s zf, not zf alone: zf S overflows fp32 for |z| > ~1e31 where s keeps the weights finite (a
      // review's z = 1e33, s = 1e-30 on the GEMV)
      _mm256_storeu_ps(sz + r * G8 + g, _mm256_mul_ps(_mm256_loadu_ps(sr + g), _mm256_sub_ps(zv, _mm256_cvtepi32_ps(zq))));
    }
    if (!real) {
      std::memset(o, 0, Kp * 2);
      continue;
    }
    const uint8_t* row = P.qw + (n + r) * P.row_bytes;
    for (int64_t g = 0, j = 0; j < P.nb; ++g) {  // (gblk = nb for one group per row)
      const __m256i zw = _mm256_set1_epi16(int16_t(zir[g]));
      for (const int64_t j1 = qmin(P.nb, j + P.gblk); j < j1; ++j) {
        __m256i c[2];
        i16_codes<BITS>(row, P.nb, j, c);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32 * j), _mm256_sub_epi16(c[0], zw));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32 * j + 16), _mm256_sub_epi16(c[1], zw));
      }
    }
  }
  W.s = s;
  W.sz = sz;
  W.G8 = G8;
  return W;
}

// x tiles (pointers into the workspace's tiles of 8 rows of x).
struct I16GemmX {
  const int32_t *xh, *xl, *sh;
  const float *a, *s2;
  const uint8_t* two;  // [G]: group g takes two pieces in a row of the tile (i16g_rows_b)
};

// Rows r0 .. r0 + NR - 1 of a decoded block of W against MT tiles of 8 rows of x, NP pieces, all
// groups; C[t][r] += tile t's 8 values for W row r0 + r. Per group: the pairs' products summed in
// int32 (exact, sum h (q - zi)), then i16_gemv_block_g's epilogue lane by lane: v = sum h (q - zi)
// [+ sum l (q - zi) / 65536], C += a_g s_g v - (a_g S_g) (s_g zf). MT NR NP accumulators + MT NP x vectors +
// NR broadcasts fit the 16 ymm registers (4 x 2 x 1 or 4 x 1 x 2; 8 rows of W with one tile spilled
// an accumulator, and the store-to-load round trip per pair halved the speed).
template <int NR, int NP, int MT>
inline void i16g_micro(const PackedW& P, const I16GemmW& W, int r0, const I16GemmX* X, __m256 (*C)[8]) {
  const int64_t np2 = P.Kp() / 2, pg = P.G == 1 ? np2 : 16 * P.gblk;
  for (int64_t g = 0; g < P.G; ++g) {
    __m256i ah[MT][NR], al[MT][NR];
    for (int t = 0; t < MT; ++t)
      for (int r = 0; r < NR; ++r) ah[t][r] = al[t][r] = _mm256_setzero_si256();
    const int64_t p1 = qmin(np2, (g + 1) * pg);  // p1 - g pg: a multiple of 16
    auto pairs = [&](auto np) QK_SI_LAMBDA {
      constexpr int NPG = decltype(np)::value;
      // two pairs per trip: GCC copies fewer accumulators between registers (8 moves per pair at one
      // pair per trip, ~4.5 at two; 4 pairs gave no more)
#pragma GCC unroll 2
      for (int64_t p = g * pg; p < p1; ++p) {
        __m256i vh[MT], vl[MT];
        for (int t = 0; t < MT; ++t) {
          vh[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(X[t].xh + 8 * p));
          if constexpr (NPG == 2) vl[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(X[t].xl + 8 * p));
        }
        for (int r = 0; r < NR; ++r) {
          const __m256i wv = _mm256_set1_epi32(W.w[r0 + r][p]);
          for (int t = 0; t < MT; ++t) {
            ah[t][r] = _mm256_add_epi32(_mm256_madd_epi16(wv, vh[t]), ah[t][r]);
            if constexpr (NPG == 2) al[t][r] = _mm256_add_epi32(_mm256_madd_epi16(wv, vl[t]), al[t][r]);
          }
        }
      }
    };
    // a group where no row of the tile takes a second piece: its l are 0 (i16_prep), al stays 0
    if (NP == 2 && X[0].two[g]) pairs(std::integral_constant<int, 2>{});
    else pairs(std::integral_constant<int, 1>{});
    for (int t = 0; t < MT; ++t) {
      const __m256 a = _mm256_load_ps(X[t].a + 8 * g);
      const __m256 aS = _mm256_mul_ps(a, NP == 2 ? _mm256_load_ps(X[t].s2 + 8 * g)
                                                 : _mm256_cvtepi32_ps(_mm256_load_si256(
                                                       reinterpret_cast<const __m256i*>(X[t].sh + 8 * g))));
      for (int r = 0; r < NR; ++r) {
        const int64_t i = (r0 + r) * W.G8 + g;
        __m256 v = _mm256_cvtepi32_ps(ah[t][r]);
        if constexpr (NP == 2) v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(al[t][r]), _mm256_set1_ps(0x1p-16f), v);
        const __m256 c = _mm256_fmadd_ps(_mm256_mul_ps(a, _mm256_set1_ps(W.s[i])), v, C[t][r0 + r]);
        C[t][r0 + r] = _mm256_fnmadd_ps(aS, _mm256_set1_ps(W.sz[i]), c);
      }
    }
  }
}

// Rows [n0, n1) of y for all M rows of x: 8 rows of W at a time, decoded once, against every tile
// of 8 rows of x, two tiles at once where both take one piece (a tile takes two pieces in the
// groups where one of its rows needs them).
template <int BITS>
inline void i16g_rows_b(const PackedW& P, const uint8_t* ws, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                        int64_t ldy, const float* bias) {
  const I16Layout L = i16_layout(P, M);
  const I16GemmLayout Q = i16g_layout(P, M);
  const int64_t np2 = P.Kp() / 2, G = P.G, ntiles = (M + 7) / 8;
  // per tile and group: 1 where a row of the tile takes two pieces in that group
  uint8_t* two = static_cast<uint8_t*>(scratch(7, size_t(ntiles) * G));
  for (int64_t t = 0; t < ntiles; ++t)
    for (int64_t g = 0; g < G; ++g) {
      int32_t any = 0;
      for (int64_t m = 8 * t; m < qmin(M, 8 * t + 8); ++m)
        any |= reinterpret_cast<const int32_t*>(ws + L.xf_bytes + m * L.per_m + L.Two_off)[g];
      two[t * G + g] = uint8_t(any != 0);
    }
  auto tile_x = [&](int64_t t) {
    I16GemmX X;
    X.two = two + t * G;
    X.xh = reinterpret_cast<const int32_t*>(ws + Q.xh_off) + t * np2 * 8;
    X.xl = reinterpret_cast<const int32_t*>(ws + Q.xl_off) + t * np2 * 8;
    X.a = reinterpret_cast<const float*>(ws + Q.a_off) + t * G * 8;
    X.s2 = reinterpret_cast<const float*>(ws + Q.s2_off) + t * G * 8;
    X.sh = reinterpret_cast<const int32_t*>(ws + Q.sh_off) + t * G * 8;
    return X;
  };
  auto two_t = [&](int64_t t) { return i16_widest_mode(ws, L, 8 * t, qmin(M, 8 * t + 8)) == kI16Two; };
  for (int64_t n = n0; n < n1; n += 8) {
    const int nr = int(qmin<int64_t>(8, n1 - n));
    const I16GemmW W = i16g_decode<BITS>(P, n, nr);
    for (int64_t t = 0; t < ntiles;) {
      const bool two = two_t(t);  // (a row of tile t needs two pieces)
      const int mt = !two && t + 1 < ntiles && !two_t(t + 1) ? 2 : 1;
      const I16GemmX X[2] = {tile_x(t), tile_x(mt == 2 ? t + 1 : t)};
      __m256 C[2][8];
      for (int i = 0; i < 2; ++i)
        for (int r = 0; r < 8; ++r) C[i][r] = _mm256_setzero_ps();
      for (int r0 = 0; r0 < nr; r0 += 4) {
        if (two) i16g_micro<4, 2, 1>(P, W, r0, X, C);
        else if (mt == 2) i16g_micro<4, 1, 2>(P, W, r0, X, C);
        else i16g_micro<4, 1, 1>(P, W, r0, X, C);
      }
      alignas(32) float c[8];
      for (int i = 0; i < mt; ++i)
        for (int r = 0; r < nr; ++r) {
          _mm256_store_ps(c, C[i][r]);
          const int64_t m0 = 8 * (t + i);
          for (int64_t j = 0; j < qmin<int64_t>(8, M - m0); ++j)
            store_any(ydt, y, (m0 + j) * ldy + n + r, c[j] + (bias ? bias[n + r] : 0.f));
        }
      t += mt;
    }
  }
}

// Rows [n0, n1) of y; a call with a row of x that needs fp32 (inf / NaN, extreme ranges) takes the
// fp32 GEMM on the fp32 copy of x at the start of the workspace.
inline void i16g_rows(const PackedW& P, const uint8_t* ws, int64_t M, int64_t n0, int64_t n1, Dt ydt, void* y,
                      int64_t ldy, const float* bias) {
  if (i16_widest_mode(ws, i16_layout(P, M), 0, M) == kI16Fp32)
    return gemm_f32_rows(P, reinterpret_cast<const float*>(ws), M, n0, n1, ydt, y, ldy, bias);
  QK_BITS_DISPATCH(P.bits, i16g_rows_b, P, ws, M, n0, n1, ydt, y, ldy, bias)
}

}  // namespace QK_ISA_NS
}  // namespace qk

#endif  // QK_ISA_AVX2
