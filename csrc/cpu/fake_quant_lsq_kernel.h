// fake_quant_lsq span kernels, compiled once per instruction set by the
// isa_<name>.cpp files (see isa.h). The per-element math is
// csrc/shared/fake_quant_lsq.h, the same header the CUDA kernel uses.
#pragma once

#include "../shared/fake_quant_lsq.h"
#include "kernel_io.h"

namespace qk {
namespace QK_ISA_NS {

template <Dt D>
void lsq_fwd_span_t(const void* x, void* y, int64_t len, const float* s, const float* b,
                    int64_t ps, float n, float p) {
  int64_t i = 0;
#if !defined(QK_ISA_SCALAR)
  const V vn = splat(n), vp = splat(p);
  if (ps == 0) {
    const V vs = splat(s[0]), vb = splat(b[0]);
    for (; i + kW <= len; i += kW) vstore<D>(y, i, lsq_fake_quant(vload<D>(x, i), vs, vb, vn, vp));
  } else {
    for (; i + kW <= len; i += kW)
      vstore<D>(y, i, lsq_fake_quant(vload<D>(x, i), load(s + i), load(b + i), vn, vp));
  }
#endif
  for (; i < len; ++i) sstore<D>(y, i, lsq_fake_quant(sload<D>(x, i), s[i * ps], b[i * ps], n, p));
}

template <Dt D>
void lsq_bwd_span_t(const void* g, const void* x, void* gx, int64_t len, const float* s,
                    const float* b, int64_t ps, float n, float p, float* acc_s, float* acc_b) {
  int64_t i = 0;
  float ts = 0.f, tb = 0.f;  // tail sums (broadcast case)
#if !defined(QK_ISA_SCALAR)
  const V vn = splat(n), vp = splat(p), v0 = splat(0.f);
  if (ps == 0) {
    const V vs = splat(s[0]), vb = splat(b[0]);
    // Two accumulator pairs hide the add latency.
    V as0 = v0, ab0 = v0, as1 = v0, ab1 = v0;
    for (; i + 2 * kW <= len; i += 2 * kW) {
      V gx0, ds0, db0, gx1, ds1, db1;
      lsq_grads(vload<D>(g, i), vload<D>(x, i), vs, vb, vn, vp, v0, gx0, ds0, db0);
      lsq_grads(vload<D>(g, i + kW), vload<D>(x, i + kW), vs, vb, vn, vp, v0, gx1, ds1, db1);
      vstore<D>(gx, i, gx0);
      vstore<D>(gx, i + kW, gx1);
      as0 = add(as0, ds0); ab0 = add(ab0, db0);
      as1 = add(as1, ds1); ab1 = add(ab1, db1);
    }
    for (; i + kW <= len; i += kW) {
      V gx0, ds0, db0;
      lsq_grads(vload<D>(g, i), vload<D>(x, i), vs, vb, vn, vp, v0, gx0, ds0, db0);
      vstore<D>(gx, i, gx0);
      as0 = add(as0, ds0); ab0 = add(ab0, db0);
    }
    ts = reduce_add(add(as0, as1));
    tb = reduce_add(add(ab0, ab1));
  } else {
    for (; i + kW <= len; i += kW) {
      V gx0, ds0, db0;
      lsq_grads(vload<D>(g, i), vload<D>(x, i), load(s + i), load(b + i), vn, vp, v0, gx0, ds0, db0);
      vstore<D>(gx, i, gx0);
      store(acc_s + i, add(load(acc_s + i), ds0));
      store(acc_b + i, add(load(acc_b + i), db0));
    }
  }
#endif
  for (; i < len; ++i) {
    float gxi, dsi, dbi;
    lsq_grads(sload<D>(g, i), sload<D>(x, i), s[i * ps], b[i * ps], n, p, 0.f, gxi, dsi, dbi);
    sstore<D>(gx, i, gxi);
    if (ps == 0) {
      ts += dsi;
      tb += dbi;
    } else {
      acc_s[i] += dsi;
      acc_b[i] += dbi;
    }
  }
  if (ps == 0) {
    acc_s[0] += ts;
    acc_b[0] += tb;
  }
}

inline void lsq_fwd_span(Dt dt, const void* x, void* y, int64_t len, const float* s,
                         const float* b, int64_t ps, float n, float p) {
  QK_SPAN_DISPATCH(dt, lsq_fwd_span_t, x, y, len, s, b, ps, n, p)
}
inline void lsq_bwd_span(Dt dt, const void* g, const void* x, void* gx, int64_t len,
                         const float* s, const float* b, int64_t ps, float n, float p,
                         float* acc_s, float* acc_b) {
  QK_SPAN_DISPATCH(dt, lsq_bwd_span_t, g, x, gx, len, s, b, ps, n, p, acc_s, acc_b)
}

}  // namespace QK_ISA_NS
}  // namespace qk
