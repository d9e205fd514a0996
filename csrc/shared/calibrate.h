// Torch-free math of the histogram calibrators (quantkern::calib_histogram,
// quantkern::calib_search), shared by the CPU and CUDA kernels.
//
// The semantics are those of quantkern/reference/calibrate.py (NVIDIA's
// entropy / histogram-MSE rules, plus our asymmetric variants); the formulas
// here are the batched ones: the KL divergence of a candidate comes from
// prefix sums in O(levels), so every candidate of every channel is evaluated
// independently (one CPU task or one GPU thread each) and the choice is made
// by calib_pick, identically on every device.
//
// Per channel the search works on one "extended" array of bins (float64):
//   symmetric:  ext[j] = |x|-histogram bin j, j < n          (zero edge at 0)
//   asymmetric: ext = neg[A-1] .. neg[0] pos[0] .. pos[Bx-1]  (zero edge at A)
// (entropy: the bin holding the exact zeros is replaced by its right neighbour
// first) and, for entropy, its prefix sums cb (counts), cz (non-empty bins)
// and cbl (count * log count), each of length L + 1.
#pragma once

#include <cmath>
#include <cstdint>

#include "qk_math.h"

namespace qk {

constexpr double kCalibTieTol = 1e-9;    // reference TIE_TOL
constexpr double kCalibMseRtol = 1e-10;  // reference MSE_RTOL
enum CalibMethod : int { kCalibEntropy = 0, kCalibMse = 1 };

// Histogram bin of |x| = a: trunc(a * n / R) in fp32 (two roundings, as the
// reference's torch expression), clamped to n - 1. Written as the fp32 ratio
// t = calib_ratio(...) (the caller flags t that is not finite: NaN / inf in x)
// and calib_bin(t, n - 1 as float): clamping t before the conversion equals
// clamping the integer for n <= 2^24 (checked by the glue), and keeps the CPU
// loop free of branches so that it vectorises.
constexpr int64_t kCalibMaxBins = int64_t(1) << 24;
//
// A finite a so large that a * n overflows fp32 (a > FLT_MAX / n >= 2^104) must not
// read as inf (it did: finite x beyond ~1.7e35 was rejected as "NaN or infinity"):
// calib_ratio then repeats the two roundings on a and R scaled by 2^-64 (exact for
// such a), i.e. the quotient fp32 would give with an unbounded exponent, and a
// quotient still beyond fp32 (R far below a) becomes 3e38: the last bin, as for
// any finite value past R. Only NaN / inf a give a non-finite t. calib_ratio_fast
// is the plain quotient (the CPU's vectorised loop; it redoes a chunk with
// calib_ratio when calib_bad flags one of its values).
QK_HD float calib_ratio_fast(float a, float nf, float R) { return div(mul(a, nf), R); }
QK_HD float calib_ratio(float a, float nf, float R) {
  const float t = calib_ratio_fast(a, nf, R);
  if (t <= 3.0e38f || !(a <= 3.4028234664e38f)) return t;
  const float ts = div(mul(mul(a, 0x1p-64f), nf), mul(R, 0x1p-64f));
  return ts <= 3.0e38f ? ts : 3.0e38f;
}
QK_HD bool calib_bad(float t) { return !(t <= 3.0e38f); }
QK_HD int32_t calib_bin(float t, float top) { return int32_t(t < top ? t : top); }

// Round half to even in float64. On the CPU the classic 1.5 * 2^52 trick
// (exact for |v| < 2^51, larger values are already integers) keeps the MSE
// loop vectorisable; rint() is a library call that blocks vectorisation.
QK_HD double calib_rint(double v) {
#if defined(__CUDA_ARCH__)
  // ::rint, the CUDA double overload: an unqualified rint here would find
  // qk::rint(float) (qk_math.h) first and round v through fp32.
  return ::rint(v);
#else
  const double m = 6755399441055744.0;
  const double r = (v + m) - m;
  return (v < 2251799813685248.0 && v > -2251799813685248.0) ? r : v;
#endif
}

// The MSE sums are the hot loops of the search: let the CPU compiler vectorise
// them (a SIMD reduction: lanes summed at the end; the order is fixed by the
// build, so results are reproducible run to run).
#if defined(__CUDACC__) || !defined(_OPENMP)
#define QK_SIMD_SUM_ERR
#else
#define QK_SIMD_SUM_ERR _Pragma("omp simd reduction(+ : err)")
#endif

QK_HD double calib_xlogx(double t) { return t > 0 ? t * log(t) : 0.0; }

// Candidate geometry of one channel.
struct CalibChan {
  int64_t L;         // bins in ext
  int64_t zero;      // index of the zero edge in ext (0 symmetric, A asymmetric)
  int64_t un, up;    // used extents (last non-empty neg / pos bin + 1)
  int64_t na, nbx;   // asymmetric grid: a in {0, s, .., (na-1)s}, b in {0, .., (nbx-1)s}
  int64_t ncand;     // candidate slots (some asymmetric slots are invalid: a + b < start_bin)
  int64_t nnz;       // mse: non-empty bins, listed in cb (count) and cz (signed bin number)
  double T;          // total count of ext (entropy) or of the unmodified bins (mse)
  double raw;        // total count of pos and neg (0: no data, the range is (0, 0) as in the reference)
  double width;
};

// Fills ext (and for entropy the prefix sums) of one channel from its int64
// pos / neg bins and returns its geometry. n: bins in use; B: row stride.
QK_HD CalibChan calib_build(const int64_t* pos, const int64_t* neg, int64_t n, double width, bool symmetric,
                            int method, int64_t stride, int64_t start_bin, double* ext, double* cb, double* cz,
                            double* cbl) {
  CalibChan ch{};
  ch.width = width;
  for (int64_t k = 0; k < n; ++k) ch.raw += double(pos[k] + neg[k]);
  const bool ent = method == kCalibEntropy;
  // the value of pos[0] as the search sees it (entropy: replaced by pos[1])
  auto posv = [&](int64_t k) -> double { return double(k == 0 && ent && n > 1 ? pos[1] : pos[k]); };
  auto absv = [&](int64_t k) -> double {
    const int64_t kk = (k == 0 && ent && n > 1) ? 1 : k;
    return double(pos[kk] + neg[kk]);
  };
  if (symmetric) {
    ch.L = n;
    ch.zero = 0;
    for (int64_t k = 0; k < n; ++k) ext[k] = absv(k);
    int64_t used = 0;
    for (int64_t k = 0; k < n; ++k)
      if (ext[k] != 0) used = k + 1;
    ch.un = 0;
    ch.up = used;
    const int64_t last = method == kCalibEntropy ? n : n - 1;  // entropy: i <= n; mse: i < n
    ch.ncand = last >= start_bin ? (last - start_bin) / stride + 1 : 0;
  } else {
    int64_t un = 0, up = 0;
    for (int64_t k = 0; k < n; ++k) {
      if (neg[k] != 0) un = k + 1;
      if (posv(k) != 0) up = k + 1;
    }
    const int64_t A = (un + stride - 1) / stride * stride, Bx = (up + stride - 1) / stride * stride;
    ch.L = A + Bx;
    ch.zero = A;
    ch.un = un;
    ch.up = up;
    for (int64_t j = 0; j < ch.L; ++j) {
      const int64_t k = j < A ? A - 1 - j : j - A;
      ext[j] = k >= n ? 0.0 : (j < A ? double(neg[k]) : posv(k));
    }
    ch.na = A / stride + 1;
    ch.nbx = Bx / stride + 1;
    ch.ncand = A + Bx >= start_bin ? ch.na * ch.nbx : 0;
  }
  double T = 0;
  if (ent) {
    double s = 0, z = 0, l = 0;
    cb[0] = cz[0] = cbl[0] = 0;
    for (int64_t j = 0; j < ch.L; ++j) {
      s += ext[j];
      z += ext[j] != 0 ? 1.0 : 0.0;
      l += calib_xlogx(ext[j]);
      cb[j + 1] = s;
      cz[j + 1] = z;
      cbl[j + 1] = l;
    }
    T = s;
  } else {
    // mse: only non-empty bins contribute (adding an exact 0 changes no sum), so
    // list them once: cb = count, cz = bin number (k >= 0: pos[k]; -1 - k: neg[k]).
    int64_t m = 0;
    for (int64_t j = 0; j < ch.L; ++j) {
      T += ext[j];
      if (ext[j] != 0) {
        cb[m] = ext[j];
        cz[m] = double(j - ch.zero);
        ++m;
      }
    }
    ch.nnz = m;
  }
  ch.T = T;
  return ch;
}

// Window [l, r) of ext for candidate slot t; false for an invalid slot.
QK_HD bool calib_window(const CalibChan& ch, bool symmetric, int64_t t, int64_t stride, int64_t start_bin,
                        int64_t& l, int64_t& r) {
  if (symmetric) {
    l = 0;
    r = start_bin + t * stride;  // entropy: i bins; mse: candidate bin i (its center)
    return true;
  }
  const int64_t a = (t / ch.nbx) * stride, b = (t % ch.nbx) * stride;
  l = ch.zero - a;
  r = ch.zero + b;
  // a side holding values keeps at least one stride of it (reference: _asym_candidates)
  return a + b >= start_bin && (a > 0 || ch.zero == 0) && (b > 0 || ch.nbx == 1);
}

// KL(P || Q) of the window [l, r) of ext with 2^levels_log2 levels (reference
// entropy rule, from prefix sums). Left / right tails fold into the end bins.
QK_HD double calib_entropy_div(const double* ext, const double* cb, const double* cz, const double* cbl, double T,
                               int64_t l, int64_t r, int64_t nb) {
  const int64_t i = r - l;
  const double head = cb[r] - cb[l], lt = cb[l], rt = T - cb[r];
  const double f = ext[l], g = ext[r - 1];
  if (!(head > 0) || (lt > 0 && f == 0) || (rt > 0 && g == 0)) return INFINITY;
  // units: levels, or bins when there are at least as many levels as bins
  // (then every level holds one bin: the same merge, in O(i))
  const bool per_bin = nb >= i;
  const int64_t U = per_bin ? i : nb;
  const int64_t u_last = per_bin ? i - 1 : ((i - 1) * nb) / i;
  double plogq = 0, avg_first = 1, avg_last = 1;
  int64_t lo = l;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t hi = per_bin ? l + u + 1 : l + ((u + 1) * i + nb - 1) / nb;
    const double S = cb[hi] - cb[lo], Z = cz[hi] - cz[lo];
    if (Z > 0) {
      const double avg = S / Z;
      if (avg > 0) plogq += S * log(avg);
      if (u == 0) avg_first = avg;
      if (u == u_last) avg_last = avg;
    }
    lo = hi;
  }
  if (lt > 0) plogq += lt * log(avg_first);
  if (rt > 0) plogq += rt * log(avg_last);
  const double plogp = i == 1 ? calib_xlogx(f + lt + rt)
                              : (cbl[r - 1] - cbl[l + 1]) + calib_xlogx(f + lt) + calib_xlogx(g + rt);
  return (plogp - plogq) / T - log(T) + log(head);
}

// Symmetric histogram MSE of candidate bin i (amax = center of bin i): the sum
// of count * (fq(center) - center)^2 over the used bins, fq as NVIDIA's
// fake_tensor_quant (narrow range; unsigned: [0, hi]).
// cnt / idx: the non-empty bins (count, bin number) listed by calib_build.
QK_HD double calib_mse_sym(const double* cnt, const double* idx, int64_t nnz, double w, int64_t i, double hi,
                           double lo) {
  const double amax = (double(i) * w + double(i + 1) * w) / 2;
  const double s = hi / amax;
  double err = 0;
  // c >= 0, so q is in [max(lo, 0), hi]: with few levels and many bins, q / s
  // (a division, the loop's bottleneck) comes from a table of the same quotients.
  // Host only: on the GPU the 2 KiB array lives in local memory (a 2 KiB stack frame per thread, which
  // the driver reserves for every resident thread: ~550 MB on an H100), and the loop below computes the
  // same quotients (tab[q] is q / s), so both paths give identical results.
#if !defined(__CUDA_ARCH__)
  constexpr int kTab = 256;
  if (hi < kTab && 2 * hi < double(nnz) && lo <= 0) {
    double tab[kTab];
    for (int q = 0; q <= int(hi); ++q) tab[q] = double(q) / s;
    for (int64_t k = 0; k < nnz; ++k) {
      const double j = idx[k];
      const double c = (j * w + (j + 1) * w) / 2;
      double q = calib_rint(c * s);
      q = q > 0 ? (q > hi ? hi : q) : 0;  // (NaN -> 0: an inf / huge width gives c * s = NaN; never a wild index)
      const double e = tab[int(q)] - c;
      err += e * e * cnt[k];
    }
    return err;
  }
#endif
  QK_SIMD_SUM_ERR
  for (int64_t k = 0; k < nnz; ++k) {
    const double j = idx[k];
    const double c = (j * w + (j + 1) * w) / 2;
    double q = calib_rint(c * s);
    q = q < lo ? lo : (q > hi ? hi : q);
    const double e = q / s - c;
    err += e * e * cnt[k];
  }
  return err;
}

// Asymmetric histogram MSE of the window [-a*w, b*w] (a = zero - l, b = r - zero).
// Bin number b < 0 is neg[-1 - b] (center -(k + 1/2) w), b >= 0 is pos[b].
QK_HD double calib_mse_asym(const double* cnt, const double* idx, const CalibChan& ch, int64_t l, int64_t r,
                            double qmax) {
  const double w = ch.width;
  const double amin = -double(ch.zero - l) * w, amax = double(r - ch.zero) * w;
  const double s = (amax - amin) / qmax;
  const double z = calib_rint(-amin / s);
  double err = 0;
  QK_SIMD_SUM_ERR
  for (int64_t m = 0; m < ch.nnz; ++m) {
    const double b = idx[m];
    const double k = b < 0 ? -1 - b : b;
    const double mid = (k * w + (k + 1) * w) / 2;
    const double c = b < 0 ? -mid : mid;
    double q = calib_rint(c / s) + z;
    q = q < 0 ? 0 : (q > qmax ? qmax : q);
    const double e = (q - z) * s - c;
    err += e * e * cnt[m];
  }
  return err;
}

// Objective of candidate slot t (INFINITY for an invalid slot).
QK_HD double calib_eval(const double* ext, const double* cb, const double* cz, const double* cbl, const CalibChan& ch,
                        bool symmetric, int method, int num_bits, bool is_unsigned, int64_t stride, int64_t start_bin,
                        int64_t t) {
  int64_t l, r;
  if (!calib_window(ch, symmetric, t, stride, start_bin, l, r)) return INFINITY;
  if (method == kCalibEntropy) {
    const int64_t nb = int64_t(1) << (symmetric ? num_bits - 1 + int(is_unsigned) : num_bits);
    return calib_entropy_div(ext, cb, cz, cbl, ch.T, l, r, nb);
  }
  if (symmetric) {
    const double hi = double((int64_t(1) << (num_bits - 1 + int(is_unsigned))) - 1);
    return calib_mse_sym(cb, cz, ch.nnz, ch.width, r, hi, is_unsigned ? 0.0 : -hi);
  }
  return calib_mse_asym(cb, cz, ch, l, r, double((int64_t(1) << num_bits) - 1));
}

// The chosen slot from the objectives of all slots (entropy: the last within
// kCalibTieTol of the minimum; mse: the first within kCalibMseRtol, relative, of
// the minimum); -1 when none is valid.
// `valid` is recomputed from the geometry so that INFINITY divergences (valid
// candidates) are told apart from invalid asymmetric slots.
QK_HD int64_t calib_pick(const double* obj, const CalibChan& ch, bool symmetric, int method, int64_t stride,
                         int64_t start_bin) {
  int64_t best = -1;
  double m = INFINITY;
  for (int64_t t = 0; t < ch.ncand; ++t) {
    int64_t l, r;
    if (!calib_window(ch, symmetric, t, stride, start_bin, l, r)) continue;
    if (best < 0 || obj[t] < m) {
      m = obj[t];
      best = t;
    }
  }
  if (best < 0) return best;
  if (method != kCalibEntropy) {
    const double lim = m + m * kCalibMseRtol;
    for (int64_t t = 0; t < best; ++t) {
      int64_t l, r;
      if (calib_window(ch, symmetric, t, stride, start_bin, l, r) && obj[t] <= lim) return t;
    }
    return best;
  }
  for (int64_t t = ch.ncand - 1; t >= 0; --t) {
    int64_t l, r;
    if (calib_window(ch, symmetric, t, stride, start_bin, l, r) && obj[t] <= m + kCalibTieTol) return t;
  }
  return best;
}

// (amin, amax) of channel ch for the chosen slot (-1: no candidate -> the used range; an
// empty histogram: (0, 0)).
QK_HD void calib_result(const CalibChan& ch, bool symmetric, int method, bool is_unsigned, int64_t n, int64_t stride,
                        int64_t start_bin, int64_t t, double& amin, double& amax) {
  const double w = ch.width;
  if (ch.raw == 0) {
    amin = amax = 0.0;
    return;
  }
  if (t < 0) {
    if (symmetric) {
      amax = double(n) * w;
      amin = is_unsigned ? 0.0 : -amax;
    } else {
      amin = -(double(ch.un) * w);
      amax = double(ch.up) * w;
    }
    return;
  }
  int64_t l, r;
  calib_window(ch, symmetric, t, stride, start_bin, l, r);
  if (symmetric) {
    amax = method == kCalibEntropy ? double(r) * w : (double(r) * w + double(r + 1) * w) / 2;
    amin = is_unsigned ? 0.0 : -amax;
  } else {
    amin = -(double(ch.zero - l) * w);
    amax = double(r - ch.zero) * w;
  }
}

}  // namespace qk
