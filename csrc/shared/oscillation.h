// Oscillation tracking + freezing (Nagel et al. 2022) and the dampening loss,
// per element. Same header for the CPU ISA variants, CUDA and (transcribed) Triton.
//
// ---------------------------------------------------------------- state
// 8 bytes per weight, two planes with the weight's shape:
//
//   meta (int32, read as uint32):
//     bits  0..7   q_prev    previous integer (int8, two's complement); for a frozen
//                            weight: the frozen integer
//     bit   8      up        last change of the integer was +1 direction   } both 0:
//     bit   9      down      last change was -1 direction                   } no change yet
//     bit  10      frozen
//     bit  11      ema_live  q_ema holds an average (set by the first step with
//                            freezing on; the official code starts the EMA there)
//     bits 12..31  F         oscillation-frequency EMA, unsigned 20-bit fixed point,
//                            f = F / kFreqOne
//   q_ema (float32): EMA of the integer value.
//
// Why not fp16 EMAs: an fp16 q_ema in [4, 8) has ulp 2^-8, so with m = 0.001 the
// update m * (q - q_ema) (< 0.001 for |q - q_ema| < 1) is below half an ulp and
// rounds to no change: the EMA stalls. fp32 q_ema moves down to |q - q_ema| ~ 5e-4.
// An fp16 frequency does not stall at m = 0.001 (m > 2^-10, barely) but each decay
// step m*f is 1.0 to 2.0 ulps, so rounding biases the decay rate by up to ~30%
// near the thresholds (0.01). The 20-bit fixed point has ulp 9.5e-7: the decay
// step at f = 0.01 is ~10 ulps (rate error < 5%), and it stalls only below
// f = 0.5 / (m kFreqOne) = 4.8e-4 (m = 0.001), 20x under the smallest threshold.
//
// ---------------------------------------------------------------- one step
//   q      = rint(clamp((w - beta) / s, n, p))           (the integer the forward uses)
//   moved  = sign(q - q_prev)
//   osc    = moved != 0 and moved == -last_dir           (reversal of the last change)
//   F      = rint((1 - m) F + osc * m * kFreqOne)
//   last_dir <- moved where moved != 0;  q_prev <- q
//   if freezing is on (threshold > 0):
//     ema_eff = ema_live ? q_ema : q                      (EMA starts at the current q)
//     if F > threshold * kFreqOne: frozen, q_prev <- rint(ema_eff)
//     q_ema  = m q + (1 - m) ema_eff;  ema_live = 1
//   frozen weights: the whole state stays as it is, and the latent weight is reset to
//   q_prev * s + beta (so that the next forward quantizes it to the frozen integer).
// Arithmetic is fp32 with explicit add/mul (no FMA), so every backend rounds alike.
#pragma once

#include "qk_math.h"

namespace qk {

// Frequency fixed point: f = F / kFreqOne, F in [0, kFreqOne].
constexpr float kFreqOne = 1048575.0f;  // 2^20 - 1
constexpr uint32_t kFreqMask = 0xFFFFFu;
constexpr int kFreqShift = 12;
constexpr int kUpBit = 8, kDownBit = 9, kFrozenBit = 10, kLiveBit = 11;

// Step constants, computed once per call by the glue (fp32, in this order).
struct OscConsts {
  float n, p;   // qmin, qmax
  float m, om;  // momentum, 1 - m (fp32 subtraction)
  float mS;     // m * kFreqOne (fp32 multiplication)
  float thF;    // float(threshold * kFreqOne) (computed in double, rounded once)
};

inline OscConsts make_osc_consts(int64_t qmin, int64_t qmax, double momentum, double threshold) {
  OscConsts k;
  k.n = float(qmin);
  k.p = float(qmax);
  k.m = float(momentum);
  k.om = 1.0f - k.m;
  k.mS = k.m * kFreqOne;
  k.thF = float(threshold * double(kFreqOne));
  return k;
}

// ---- the scalar integer vocabulary (CPU tails, scalar ISA, CUDA threads).
// csrc/cpu/simd_int.h overloads the same names for AVX2 / AVX-512 vectors.
// like(x, c) / ilike(i, c): the constant c in the type of x / i (a template cannot
// call splat(c) for its vector type: argument-dependent lookup needs a vector argument).
QK_HD float like(float, float c) { return c; }
QK_HD uint32_t ilike(uint32_t, uint32_t c) { return c; }
QK_HD uint32_t iand(uint32_t a, uint32_t b) { return a & b; }
QK_HD uint32_t ior(uint32_t a, uint32_t b) { return a | b; }
template <int K>
QK_HD uint32_t ishl(uint32_t a) { return a << K; }
template <int K>
QK_HD uint32_t ishr(uint32_t a) { return a >> K; }
// int32 -> float (values here are small, exact)
QK_HD float itof(uint32_t a) { return float(int32_t(a)); }
// integral float -> int32 bits (truncation; the values are already integers)
QK_HD uint32_t ftoi(float a) { return uint32_t(int32_t(a)); }
// low byte as a signed int8, as float
QK_HD float sext8_to_f(uint32_t a) { return float(int8_t(uint8_t(a & 0xFFu))); }

template <int B, class I>
QK_HD auto bit_to_f(I meta) -> decltype(itof(meta)) {
  return itof(iand(ishr<B>(meta), ilike(meta, 1u)));
}

// One tracking/freezing step for one element (or one vector of elements).
//   w, s, b: latent weight and its quantizer's scale / offset (fp32)
//   meta, ema: the state, updated in meta_out / ema_out
//   w_out: q_prev * s + beta, the value a frozen weight must hold (use it where frz = 1)
//   osc: 1 where this (unfrozen) weight oscillated now; frz: 1 where frozen after the step
template <bool kFreeze, class T, class I>
QK_HD void oscillation_step(T w, T s, T b, I meta, T ema, T n, T p, T m, T om, T mS, T thF,
                            I& meta_out, T& ema_out, T& w_out, T& osc, T& frz) {
  const T zero = like(w, 0.f), one = like(w, 1.f), half = like(w, 0.5f), fone = like(w, kFreqOne);
  const T q = rint(clamp_nan(div(sub(w, b), s), n, p));
  const T qp = sext8_to_f(meta);
  const T up = bit_to_f<kUpBit>(meta), dn = bit_to_f<kDownBit>(meta);
  const T fz0 = bit_to_f<kFrozenBit>(meta), live = bit_to_f<kLiveBit>(meta);
  const T F = itof(iand(ishr<kFreqShift>(meta), ilike(meta, kFreqMask)));

  const auto mv_up = gt(q, qp), mv_dn = lt(q, qp);
  const T o = select(mor(mand(mv_up, gt(dn, half)), mand(mv_dn, gt(up, half))), one, zero);
  T F1 = rint(add(mul(om, F), mul(o, mS)));
  F1 = select(gt(F1, fone), fone, F1);
  T up1 = select(mv_up, one, select(mv_dn, zero, up));
  T dn1 = select(mv_dn, one, select(mv_up, zero, dn));
  T qp1 = q, fz1 = zero, ema1 = ema, live1 = live;
  if constexpr (kFreeze) {
    const T ema_eff = select(gt(live, half), ema, q);
    const auto fz_new = gt(F1, thF);
    qp1 = select(fz_new, rint(ema_eff), q);
    fz1 = select(fz_new, one, zero);
    ema1 = add(mul(m, q), mul(om, ema_eff));
    live1 = one;
  }
  // Already frozen: keep everything.
  const auto was = gt(fz0, half);
  qp1 = select(was, qp, qp1);
  up1 = select(was, up, up1);
  dn1 = select(was, dn, dn1);
  F1 = select(was, F, F1);
  fz1 = select(was, one, fz1);
  ema1 = select(was, ema, ema1);
  live1 = select(was, live, live1);

  osc = select(was, zero, o);
  frz = fz1;
  ema_out = ema1;
  w_out = add(mul(qp1, s), b);
  // A NaN weight (a diverged step) has q = NaN, and NaN -> int is undefined behaviour: its q_prev is
  // stored as 0, the low byte x86's conversion and the reference's .to(int64) & 0xFF give
  // (ge(v, v): false for NaN only; no fast-math here to fold it)
  const T qst = select(ge(qp1, qp1), qp1, zero);
  meta_out = ior(ior(ior(iand(ftoi(qst), ilike(meta, 0xFFu)), ishl<kUpBit>(ftoi(up1))),
                     ior(ishl<kDownBit>(ftoi(dn1)), ishl<kFrozenBit>(ftoi(fz1)))),
                 ior(ishl<kLiveBit>(ftoi(live1)), ishl<kFreqShift>(ftoi(F1))));
}

// Dampening loss term of one element:
//   d = clamp(w, s n + b, s p + b) - (rint(clamp((w - b)/s, n, p)) s + b)
// loss = sum(d^2) (times a normaliser), dL/dw = 2 d where s n + b <= w <= s p + b, else 0.
// `inside` is 1 inside the clamp range (inclusive, as torch.clamp's gradient), 0 outside.
template <class T>
QK_HD T dampening_diff(T w, T s, T b, T n, T p, T& inside) {
  const T xq = add(mul(rint(clamp_nan(div(sub(w, b), s), n, p)), s), b);
  const T lo = add(mul(n, s), b), hi = add(mul(p, s), b);
  inside = select(mand(ge(w, lo), le(w, hi)), like(w, 1.f), like(w, 0.f));
  return sub(clamp_nan(w, lo, hi), xq);
}

}  // namespace qk
