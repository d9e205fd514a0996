// CPU implementation of quantkern::oscillation_update (fused in-place oscillation
// tracking + freezing, one pass) and quantkern::dampening_loss (+ backward).
//
// The element loops live in oscillation_kernel.h (one build per instruction set);
// this file checks arguments, cuts the tensor into fixed tiles (independent of
// the thread count), runs them with at::parallel_for and sums the per-tile
// counts / partial losses in tile order, so results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "oscillation_checks.h"
#include "host_cache.h"
#include "isa.h"

namespace qk {
namespace {

constexpr int64_t kTile = 16384;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Spans of contiguous elements that share one parameter (or, when inner == 1,
// runs along the channel dimension with one parameter per element).
struct Tiling {
  Layout L;
  bool per_element;
  int64_t Cb, ncb, ro;    // per_element: channel block; outer rows per tile (C small: many rows)
  int64_t nseg, seglen;   // inner >= kTile: segments of one row
  int64_t rpt;            // inner < kTile: rows per tile
  int64_t tiles;
};

Tiling make_tiling(Layout L) {
  Tiling T{L, L.inner == 1, 0, 0, 0, 0, 0, 0, 0};
  if (T.per_element) {
    T.Cb = std::min<int64_t>(L.C, kTile);
    T.ncb = cdiv(L.C, T.Cb);
    // a short channel axis ([4M, 4] with axis 1): one row per tile made 4M tiles of 4 elements
    T.ro = T.ncb == 1 ? std::max<int64_t>(1, kTile / L.C) : 1;
    T.tiles = cdiv(L.outer, T.ro) * T.ncb;
  } else if (L.inner >= kTile) {
    T.seglen = kTile;
    T.nseg = cdiv(L.inner, kTile);
    T.tiles = L.outer * L.C * T.nseg;
  } else {
    T.rpt = std::max<int64_t>(1, kTile / L.inner);
    T.tiles = cdiv(L.outer * L.C, T.rpt);
  }
  return T;
}

// The scale / offset pointers the spans index: with several short rows per tile (Tiling::ro > 1)
// a span runs over ro rows, so the parameter row is repeated ro times (at most kTile floats).
struct TileParams {
  std::vector<float> s, b;
  const float *sp, *bp;
  TileParams(const Tiling& T, const float* s0, const float* b0) : sp(s0), bp(b0) {
    if (!(T.per_element && T.ro > 1)) return;
    const int64_t C = T.L.C;
    s.resize(size_t(T.ro * C));
    b.resize(size_t(T.ro * C));
    for (int64_t r = 0; r < T.ro; ++r) {
      std::copy(s0, s0 + C, s.begin() + r * C);
      std::copy(b0, b0 + C, b.begin() + r * C);
    }
    sp = s.data();
    bp = b.data();
  }
};

// fn(offset, len, param_index, param_stride) for every span of tile t.
template <class F>
void for_each_span(const Tiling& T, int64_t t, F&& fn) {
  const Layout& L = T.L;
  if (T.per_element) {
    const int64_t ot = t / T.ncb, cb = t % T.ncb;
    const int64_t c0 = cb * T.Cb, len = std::min(T.Cb, L.C - c0);
    if (T.ro > 1) {  // rows o0..o1 are contiguous: one span over a repeated parameter row (TileParams)
      const int64_t o0 = ot * T.ro, o1 = std::min(L.outer, o0 + T.ro);
      fn(o0 * L.C, (o1 - o0) * L.C, int64_t(0), int64_t(1));
    } else {
      fn(ot * L.C + c0, len, c0, int64_t(1));
    }
  } else if (T.nseg) {
    const int64_t r = t / T.nseg, seg = t % T.nseg;
    const int64_t i0 = seg * T.seglen, len = std::min(T.seglen, L.inner - i0);
    fn(r * L.inner + i0, len, r % L.C, int64_t(0));
  } else {
    const int64_t r0 = t * T.rpt, r1 = std::min(L.outer * L.C, r0 + T.rpt);
    for (int64_t r = r0; r < r1; ++r) fn(r * L.inner, L.inner, r % L.C, int64_t(0));
  }
}

char* bytes(const at::Tensor& t) { return static_cast<char*>(t.data_ptr()); }

}  // namespace

namespace {

at::Tensor oscillation_update_cpu(at::Tensor& weight, const at::Tensor& scale_, const at::Tensor& offset_,
                                  at::Tensor& meta, at::Tensor& ema, int64_t qmin, int64_t qmax,
                                  std::optional<int64_t> axis, std::optional<int64_t> group_size, double momentum,
                                  double threshold) {
  const Layout L = osc_checks(weight, scale_, offset_, meta, ema, qmin, qmax, axis, group_size, momentum, threshold);
  check_qparam_values(scale_, offset_);
  auto counts = at::zeros({2}, weight.options().dtype(at::kLong));
  if (weight.numel() == 0) return counts;
  auto s = scale_.contiguous(), b = offset_.contiguous();
  const Dt dt = dt_of(weight, "weight");
  const size_t es = weight.element_size();
  const OscConsts k = make_osc_consts(qmin, qmax, momentum, threshold);
  const bool freeze = threshold > 0.0;
  const Tiling T = make_tiling(L);
  std::vector<int64_t> part(size_t(T.tiles) * 2, 0);
  const TileParams tp(T, s.data_ptr<float>(), b.data_ptr<float>());
  const float *sp = tp.sp, *bp = tp.bp;
  char* wp = bytes(weight);
  int32_t* mp = meta.data_ptr<int32_t>();
  float* ep = ema.data_ptr<float>();
  const IsaTable& K = isa_table();
  at::parallel_for(0, T.tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_span(T, t, [&](int64_t off, int64_t len, int64_t c, int64_t ps) {
        K.osc_update(dt, wp + off * es, len, sp + c, bp + c, ps, mp + off, ep + off, k, freeze, &part[size_t(t) * 2]);
      });
  });
  int64_t o = 0, f = 0;
  for (int64_t t = 0; t < T.tiles; ++t) {
    o += part[size_t(t) * 2];
    f += part[size_t(t) * 2 + 1];
  }
  auto* cp = counts.data_ptr<int64_t>();
  cp[0] = o;
  cp[1] = f;
  return counts;
}

at::Tensor dampening_loss_cpu(const at::Tensor& weight_, const at::Tensor& scale_, const at::Tensor& offset_,
                              int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                              std::optional<int64_t> group_size, double norm) {
  const Layout L = lsq_layout(weight_, scale_, offset_, qmin, qmax, axis, group_size);
  check_qparam_values(scale_, offset_);
  auto out = at::zeros({}, scale_.options());
  if (weight_.numel() == 0) return out;
  auto w = weight_.contiguous();
  auto s = scale_.contiguous(), b = offset_.contiguous();
  const Dt dt = dt_of(w, "weight");
  const size_t es = w.element_size();
  const Tiling T = make_tiling(L);
  std::vector<double> part(size_t(T.tiles), 0.0);
  const TileParams tp(T, s.data_ptr<float>(), b.data_ptr<float>());
  const float *sp = tp.sp, *bp = tp.bp;
  const char* wp = bytes(w);
  const IsaTable& K = isa_table();
  const float n = float(qmin), p = float(qmax);
  at::parallel_for(0, T.tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_span(T, t, [&](int64_t off, int64_t len, int64_t c, int64_t ps) {
        part[size_t(t)] += K.damp_fwd(dt, wp + off * es, len, sp + c, bp + c, ps, n, p);
      });
  });
  double acc = 0.0;
  for (double v : part) acc += v;
  out.fill_(acc * norm);
  return out;
}

at::Tensor dampening_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& weight_, const at::Tensor& scale_,
                                       const at::Tensor& offset_, int64_t qmin, int64_t qmax,
                                       std::optional<int64_t> axis, std::optional<int64_t> group_size, double norm) {
  const Layout L = lsq_layout(weight_, scale_, offset_, qmin, qmax, axis, group_size);
  TORCH_CHECK(grad.numel() == 1, "quantkern: grad of dampening_loss must hold one element, got shape ", grad.sizes());
  check_qparam_values(scale_, offset_);
  auto w = weight_.contiguous();
  auto gw = cpu_empty_like(w);
  if (w.numel() == 0) return gw;
  auto s = scale_.contiguous(), b = offset_.contiguous();
  const Dt dt = dt_of(w, "weight");
  const size_t es = w.element_size();
  const Tiling T = make_tiling(L);
  const TileParams tp(T, s.data_ptr<float>(), b.data_ptr<float>());
  const float *sp = tp.sp, *bp = tp.bp;
  const char* wp = bytes(w);
  char* gp = bytes(gw);
  const IsaTable& K = isa_table();
  const float n = float(qmin), p = float(qmax);
  const float g2 = float(grad.item<double>() * norm * 2.0);
  at::parallel_for(0, T.tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_span(T, t, [&](int64_t off, int64_t len, int64_t c, int64_t ps) {
        K.damp_bwd(dt, wp + off * es, gp + off * es, len, sp + c, bp + c, ps, n, p, g2);
      });
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("oscillation_update", &oscillation_update_cpu);
  m.impl("dampening_loss", &dampening_loss_cpu);
  m.impl("dampening_loss_backward", &dampening_loss_backward_cpu);
}

}  // namespace qk
