// LSQ / LSQ+ fake quantization, per element (DESIGN.md section 3).
//
//   v     = (x - beta) / s                      (true division, fp32)
//   x_hat = rint(clamp(v, n, p)) * s + beta     (two roundings, no FMA)
//
// Gradients (straight-through estimator for rint), clip region decided on the
// unrounded v:
//   dx    = g                 if n <= v <= p, else 0
//   ds    = g * (rint(v) - v) if n < v < p;  g * n if v <= n;  g * p if v >= p
//   dbeta = 0                 if n < v < p,  else g
// The caller sums ds and dbeta over the elements sharing a scale and multiplies
// by the LSQ gradient scale.
#pragma once

#include "qk_math.h"

namespace qk {

template <class T>
QK_HD T lsq_fake_quant(T x, T s, T beta, T n, T p) {
  T v = div(sub(x, beta), s);
  return add(mul(rint(clamp_nan(v, n, p)), s), beta);
}

template <class T>
QK_HD void lsq_grads(T g, T x, T s, T beta, T n, T p, T zero, T& gx, T& ds, T& dbeta) {
  T v = div(sub(x, beta), s);
  auto lo = le(v, n);
  auto hi = ge(v, p);
  gx = select(mand(ge(v, n), le(v, p)), g, zero);
  ds = mul(g, select(lo, n, select(hi, p, sub(rint(v), v))));
  dbeta = select(mor(lo, hi), g, zero);
}

}  // namespace qk
