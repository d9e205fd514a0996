// HQQ zero-point solver, per group (DESIGN.md section 3; the spec is
// quantkern/reference/hqq.py, order="kernel").
//
// The templates below work on "lanes": T is a float (one group: a CUDA thread,
// the scalar CPU path) or a SIMD vector whose lanes are independent groups
// (AVX-512: 16 groups, AVX2: 8). Element i of every lane's group is read with
// w_at(i), so a group's g values are loaded from memory once, kept in L1 /
// shared memory, and swept `iters` times without touching DRAM again.
//
// Every op is one IEEE fp32 operation in a fixed order (add/sub/mul/div of
// qk_math.h: no fused multiply-add), so the CPU ISAs, CUDA and the reference
// (order="kernel") agree bit for bit:
//
//   init:  den = max - min;  s = (1 / den) * qmax   (torch's int / tensor is reciprocal-then-multiply)
//          s = 1 where den <= 1e-4;  s = min(s, 2e4);  z = (min * -1) * s
//   iter:  q = min(max(rint(w*s + z), 0), qmax);  wr = (q - z) / s;  d = w - wr;  a = |d|
//          we = sign(d) relu(a - c * a^(p-1))     (c = fp32(1/beta_i); exactly 0 when a < thr)
//          zsum += q - (w - we) * s;  esum += a   (two accumulators: even i, odd i; added at the end)
//          z = zsum / g
//
// thr = fp32(c^(1/(2-p)) (1 - 1e-4)): below it a - c a^(p-1) < 0 with a 1e-4
// relative margin, so the shrink is exactly 0 however a^(p-1) rounds, and the
// kernels skip the power (the common case: for typical LLM weights |W - Wr| is
// far below thr ~ 0.17 at beta = 10, and the shrink never fires).
#pragma once

#include <cstdint>
#include <cstring>

#include "qk_math.h"

namespace qk {

enum class HqqStop : int { Global = 0, Group = 1, None = 2 };

// Everything a kernel needs about one call (torch-free, trivially copyable).
struct HqqParams {
  int64_t M;      // number of groups
  int64_t g;      // group size
  int axis;       // 1: element i of group j at j*g + i;  0: at i*M + j
  int iters;      // iterations (0: round to nearest with the min-max init)
  HqqStop mode;
  int l1;         // lp_norm == 1: the shrink is relu(|x| - c) (no power)
  float qmax;     // 2^bits - 1
  float wmax;     // largest max|W| of a group the fp32 solver takes: fp32(2^127 / max(g, 2))
  float y;        // fp32(lp_norm - 1)
  const float* c;    // [iters] fp32(1 / beta_i), beta_i = beta * kappa^i (host or device memory)
  const float* thr;  // [iters] shrink thresholds
};

// ---- scalar vocabulary used by the templates (CPU vectors overload the same
// names in csrc/cpu/hqq_kernel.h). Inputs are finite: no NaN care needed.
QK_HD float splat_like(float, float c) { return c; }
QK_HD float abs_(float a) {
#if defined(__CUDA_ARCH__)
  return fabsf(a);
#else
  return __builtin_fabsf(a);
#endif
}
// (a > b ? a : b) / (a < b ? a : b): for two zeros the second operand wins, as
// the x86 max/min instructions do.
QK_HD float max_(float a, float b) { return a > b ? a : b; }
QK_HD float min_(float a, float b) { return a < b ? a : b; }
QK_HD bool any_(bool m) { return m; }
// a = m * 2^e with m in [1, 2), e integral (a positive and normal).
QK_HD void frexp1_(float a, float& m, float& e) {
#if defined(__CUDA_ARCH__)
  int32_t b = __float_as_int(a);
  m = __int_as_float((b & 0x7fffff) | 0x3f800000);
#else
  int32_t b;
  std::memcpy(&b, &a, 4);
  int32_t mb = (b & 0x7fffff) | 0x3f800000;
  std::memcpy(&m, &mb, 4);
#endif
  e = float((b >> 23) - 127);
}
// 2^n for integral n in [-126, 127].
QK_HD float exp2i_(float n) {
  int32_t b = (int32_t(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

QK_HD float hqq_inf() {
  int32_t b = 0x7f800000;
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

// fp32 constants (exactly the fp32 roundings the reference uses).
constexpr float kHqqSqrt2 = 0x1.6a09e6p+0f;
constexpr float kHqqLog2e = 0x1.715476p+0f;
constexpr float kHqqLn2 = 0x1.62e430p-1f;

// a^y for a positive normal fp32, y in [-1, 0]: log2 by 2 atanh((m-1)/(m+1)),
// exp2 by e^u Taylor on [-ln2/2, ln2/2], y log2(a) kept in two parts; <= 2 ulp.
template <class T>
QK_HD T hqq_pow(T a, T y) {
  T m, e;
  frexp1_(a, m, e);
  const T one = splat_like(a, 1.f);
  auto hi = gt(m, splat_like(a, kHqqSqrt2));
  m = select(hi, mul(m, splat_like(a, 0.5f)), m);
  e = select(hi, add(e, one), e);
  T t = div(sub(m, one), add(m, one));
  T t2 = mul(t, t);
  T p = splat_like(a, 0x1.c71c72p-4f);                 // 1/9
  p = add(mul(p, t2), splat_like(a, 0x1.24924ap-3f));  // 1/7
  p = add(mul(p, t2), splat_like(a, 0x1.99999ap-3f));  // 1/5
  p = add(mul(p, t2), splat_like(a, 0x1.555556p-2f));  // 1/3
  p = add(mul(p, t2), one);
  T lnm = mul(mul(t, p), splat_like(a, 2.f));
  T l = mul(lnm, splat_like(a, kHqqLog2e));  // log2(m), |l| <= 0.5
  // y log2(a) = y e + y l with y e carried exactly: split y (Veltkamp, 12 bits
  // in yh) so that yh * e (|e| <= 128) is exact; the rest is small.
  T cy = mul(y, splat_like(a, 4097.f));
  T yh = sub(cy, sub(cy, y));
  T yl = sub(y, yh);
  T big = mul(yh, e);
  T small = add(mul(yl, e), mul(y, l));
  T n = min_(max_(rint(add(big, small)), splat_like(a, -126.f)), splat_like(a, 126.f));
  T u = mul(add(sub(big, n), small), splat_like(a, kHqqLn2));  // big - n is exact
  T r = splat_like(a, 0x1.a01a02p-13f);                // 1/5040
  r = add(mul(r, u), splat_like(a, 0x1.6c16c2p-10f));  // 1/720
  r = add(mul(r, u), splat_like(a, 0x1.111112p-7f));   // 1/120
  r = add(mul(r, u), splat_like(a, 0x1.555556p-5f));   // 1/24
  r = add(mul(r, u), splat_like(a, 0x1.555556p-3f));   // 1/6
  r = add(mul(r, u), splat_like(a, 0.5f));
  r = add(mul(r, u), one);
  r = add(mul(r, u), one);
  return mul(r, exp2i_(n));
}

// W_e = sign(d) * relu(a - c * a^(p-1)), a = |d|; exactly 0 where a < thr.
template <class T>
QK_HD T hqq_shrink(T d, T a, T c, T y, T thr, bool l1) {
  const T zero = splat_like(a, 0.f), one = splat_like(a, 1.f);
  auto small = lt(a, thr);
  T pw = l1 ? one : hqq_pow(select(small, one, a), y);
  T r = sub(a, mul(c, pw));
  r = select(gt(r, zero), r, zero);
  r = select(small, zero, r);
  return select(lt(d, zero), sub(zero, r), r);
}

// q = clamp(rint(w*s + z), 0, qmax)
template <class T>
QK_HD T hqq_q(T w, T s, T z, T qmax) {
  return min_(max_(rint(add(mul(w, s), z)), splat_like(w, 0.f)), qmax);
}

// Min-max init of the lanes' groups: inverse scale s and zero z. `bad` gets a
// NaN lane where a group holds a NaN or an infinity (w - w is 0 otherwise), or
// max|w| > wmax: beyond it the fp32 intermediates overflow (max - min, a 1/den in
// the subnormals, a constant group's zero sum g * |w|) and scale / zero came out
// inf or NaN.
template <class T, class WAt>
QK_HD void hqq_init_lanes(WAt&& w_at, int64_t g, T qmax, T wmax, T& s, T& z, T& bad) {
  T mn = w_at(0), mx = mn;
  T chk = sub(mn, mn);
  for (int64_t i = 1; i < g; ++i) {
    T w = w_at(i);
    mn = min_(mn, w);
    mx = max_(mx, w);
    chk = add(chk, sub(w, w));
  }
  const T one = splat_like(mn, 1.f);
  T den = sub(mx, mn);
  s = mul(div(one, den), qmax);
  s = select(le(den, splat_like(mn, 1e-4f)), one, s);
  s = min_(s, splat_like(mn, 2e4f));
  z = mul(mul(mn, splat_like(mn, -1.f)), s);
  const T inf = splat_like(mn, hqq_inf());
  bad = select(gt(max_(mx, mul(mn, splat_like(mn, -1.f))), wmax), sub(inf, inf), chk);
}

// One element of one iteration: returns q - (w - we) * s and sets a = |w - wr|.
template <class T>
QK_HD T hqq_elem(T w, T s, T z, T qmax, T c, T y, T thr, bool l1, T& a) {
  T q = hqq_q(w, s, z, qmax);
  T d = sub(w, div(sub(q, z), s));
  a = abs_(d);
  if (any_(ge(a, thr))) return sub(q, mul(sub(w, hqq_shrink(d, a, c, y, thr, l1)), s));
  return sub(q, mul(w, s));  // the shrink is exactly 0 here, and w - 0 = w
}

// One iteration over the lanes' groups: zsum = sum_i (q - (w - we) * s),
// esum = sum_i |w - wr|, each as (sequential sum of even i) + (sequential sum of odd i).
template <class T, class WAt>
QK_HD void hqq_iterate_lanes(WAt&& w_at, int64_t g, T s, T z, T qmax, T c, T y, T thr, bool l1,
                             T& zsum, T& esum) {
  const T zero = splat_like(s, 0.f);
  T z0 = zero, z1 = zero, e0 = zero, e1 = zero, a0, a1;
  int64_t i = 0;
  for (; i + 1 < g; i += 2) {
    T t0 = hqq_elem(w_at(i), s, z, qmax, c, y, thr, l1, a0);
    T t1 = hqq_elem(w_at(i + 1), s, z, qmax, c, y, thr, l1, a1);
    z0 = add(z0, t0);
    e0 = add(e0, a0);
    z1 = add(z1, t1);
    e1 = add(e1, a1);
  }
  if (i < g) {  // odd g: the last element has an even index
    T t0 = hqq_elem(w_at(i), s, z, qmax, c, y, thr, l1, a0);
    z0 = add(z0, t0);
    e0 = add(e0, a0);
  }
  zsum = add(z0, z1);
  esum = add(e0, e1);
}

// The official global early stop, from the per-iteration mean errors E[i]
// (fp32; each the fp64 sum of the groups' fp32 error sums over numel): the
// number of zero updates applied. The loop breaks at the first i with
// !(E[i] < best) *after* applying that iteration's update.
QK_HD int hqq_global_updates(const float* E, int iters) {
  float best = hqq_inf();
  for (int i = 0; i < iters; ++i) {
    if (E[i] < best) best = E[i];
    else return i + 1;
  }
  return iters;
}

}  // namespace qk
