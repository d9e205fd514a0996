// oscillation_update / dampening_loss span kernels, compiled once per instruction
// set by the isa_<name>.cpp files (see isa.h). Per-element math:
// csrc/shared/oscillation.h (the header the CUDA kernel uses).
#pragma once

#include "../shared/oscillation.h"
#include "kernel_io.h"
#include "simd_int.h"

namespace qk {
namespace QK_ISA_NS {

// One span of `len` contiguous weights. Parameters broadcast (ps == 0) or per
// element (ps == 1). Adds the span's counts to counts[0] (oscillations now) and
// counts[1] (frozen after the step); writes w only where a weight is frozen.
template <Dt D, bool kFreeze>
void osc_span_t(void* w, int64_t len, const float* s, const float* b, int64_t ps, int32_t* meta,
                float* ema, const OscConsts& k, int64_t* counts) {
  int64_t i = 0;
  float c_osc = 0.f, c_frz = 0.f;  // exact: a span is at most a tile (< 2^24 elements)
#if !defined(QK_ISA_SCALAR)
  {
    const V n = splat(k.n), p = splat(k.p), m = splat(k.m), om = splat(k.om), mS = splat(k.mS),
            thF = splat(k.thF), half = splat(0.5f);
    V acc_o = splat(0.f), acc_f = splat(0.f);
    V vs = splat(s[0]), vb = splat(b[0]);
    for (; i + kW <= len; i += kW) {
      if (ps) {
        vs = load(s + i);
        vb = load(b + i);
      }
      // Prefetch the state ~2 KiB ahead: without it the track-only loop stalled on meta loads.
      __builtin_prefetch(meta + i + 512, 1);
      const V wv = vload<D>(w, i);
      VI mo;
      V eo, wo, o, f;
      // Without freezing the integer EMA is neither read nor written (12 instead of 20 bytes per weight).
      oscillation_step<kFreeze>(wv, vs, vb, load_i(meta + i), kFreeze ? load(ema + i) : half, n, p, m, om, mS, thF, mo,
                                eo, wo, o, f);
      store_i(meta + i, mo);
      if (kFreeze) store(ema + i, eo);
      const auto fm = gt(f, half);
      if (any_mask(fm)) vstore<D>(w, i, select(fm, wo, wv));
      acc_o = add(acc_o, o);
      acc_f = add(acc_f, f);
    }
    c_osc = reduce_add(acc_o);
    c_frz = reduce_add(acc_f);
  }
#endif
  for (; i < len; ++i) {
    uint32_t mo;
    float eo, wo, o, f;
    oscillation_step<kFreeze>(sload<D>(w, i), s[i * ps], b[i * ps], uint32_t(meta[i]), kFreeze ? ema[i] : 0.f, k.n,
                              k.p, k.m, k.om, k.mS, k.thF, mo, eo, wo, o, f);
    meta[i] = int32_t(mo);
    if (kFreeze) ema[i] = eo;
    if (f > 0.5f) sstore<D>(w, i, wo);
    c_osc += o;
    c_frz += f;
  }
  counts[0] += int64_t(c_osc);
  counts[1] += int64_t(c_frz);
}

inline void osc_span(Dt dt, void* w, int64_t len, const float* s, const float* b, int64_t ps, int32_t* meta,
                     float* ema, const OscConsts& k, bool freeze, int64_t* counts) {
  auto* fn = freeze ? (dt == Dt::F32 ? &osc_span_t<Dt::F32, true> : dt == Dt::F16 ? &osc_span_t<Dt::F16, true> : &osc_span_t<Dt::BF16, true>)
                    : (dt == Dt::F32 ? &osc_span_t<Dt::F32, false> : dt == Dt::F16 ? &osc_span_t<Dt::F16, false> : &osc_span_t<Dt::BF16, false>);
  fn(w, len, s, b, ps, meta, ema, k, counts);
}

// Dampening loss: returns sum(d^2) over the span (fp32 lanes, then double).
template <Dt D>
double damp_fwd_span_t(const void* w, int64_t len, const float* s, const float* b, int64_t ps, float n, float p) {
  int64_t i = 0;
  double acc = 0.0;
#if !defined(QK_ISA_SCALAR)
  {
    const V vn = splat(n), vp = splat(p);
    V a0 = splat(0.f), a1 = splat(0.f);
    V vs = splat(s[0]), vb = splat(b[0]);
    V in;
    if (!ps) {  // two accumulators hide the add latency
      for (; i + 2 * kW <= len; i += 2 * kW) {
        const V d0 = dampening_diff(vload<D>(w, i), vs, vb, vn, vp, in);
        const V d1 = dampening_diff(vload<D>(w, i + kW), vs, vb, vn, vp, in);
        a0 = add(a0, mul(d0, d0));
        a1 = add(a1, mul(d1, d1));
      }
    }
    for (; i + kW <= len; i += kW) {
      if (ps) {
        vs = load(s + i);
        vb = load(b + i);
      }
      const V d = dampening_diff(vload<D>(w, i), vs, vb, vn, vp, in);
      a0 = add(a0, mul(d, d));
    }
    acc = double(reduce_add(a0)) + double(reduce_add(a1));
  }
#endif
  float t = 0.f;
  for (; i < len; ++i) {
    float in;
    const float d = dampening_diff(sload<D>(w, i), s[i * ps], b[i * ps], n, p, in);
    t += d * d;
  }
  return acc + double(t);
}

// grad_w = gscale * 2 d * inside, gscale = upstream grad * normaliser.
template <Dt D>
void damp_bwd_span_t(const void* w, void* gw, int64_t len, const float* s, const float* b, int64_t ps, float n,
                     float p, float g2) {
  int64_t i = 0;
#if !defined(QK_ISA_SCALAR)
  {
    const V vn = splat(n), vp = splat(p), vg = splat(g2);
    V vs = splat(s[0]), vb = splat(b[0]);
    for (; i + kW <= len; i += kW) {
      if (ps) {
        vs = load(s + i);
        vb = load(b + i);
      }
      V in;
      const V d = dampening_diff(vload<D>(w, i), vs, vb, vn, vp, in);
      vstore<D>(gw, i, mul(mul(vg, d), in));
    }
  }
#endif
  for (; i < len; ++i) {
    float in;
    const float d = dampening_diff(sload<D>(w, i), s[i * ps], b[i * ps], n, p, in);
    sstore<D>(gw, i, ::qk::mul(::qk::mul(g2, d), in));
  }
}

inline double damp_fwd_span(Dt dt, const void* w, int64_t len, const float* s, const float* b, int64_t ps, float n,
                            float p) {
  switch (dt) {
    case Dt::F32: return damp_fwd_span_t<Dt::F32>(w, len, s, b, ps, n, p);
    case Dt::F16: return damp_fwd_span_t<Dt::F16>(w, len, s, b, ps, n, p);
    default: return damp_fwd_span_t<Dt::BF16>(w, len, s, b, ps, n, p);
  }
}
inline void damp_bwd_span(Dt dt, const void* w, void* gw, int64_t len, const float* s, const float* b, int64_t ps,
                          float n, float p, float g2) {
  QK_SPAN_DISPATCH(dt, damp_bwd_span_t, w, gw, len, s, b, ps, n, p, g2)
}

}  // namespace QK_ISA_NS
}  // namespace qk
