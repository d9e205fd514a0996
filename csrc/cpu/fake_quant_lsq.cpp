// CPU implementation of quantkern::fake_quant_lsq and its fused backward.
//
// The element loops live in fake_quant_lsq_kernel.h (one build per instruction
// set); this file checks arguments, splits the work into fixed tiles, runs
// them with at::parallel_for and reduces the scale/offset gradients.
//
// Determinism: tiles depend only on the shapes, never on the thread count.
// Each tile writes its own partial-sum slot and the slots are summed in a fixed
// order, so grad_scale/grad_offset are bitwise identical run to run and for
// any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "host_cache.h"
#include "isa.h"

namespace qk {
namespace {

constexpr int64_t kTile = 16384;  // elements per tile (64 KiB of fp32: stays in L2)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A tile is (outer block, channel block, segment of the inner dimension).
// Partial sums go to slot (ob * nseg + seg), entries [c0, c1).
struct Plan {
  Layout L;
  int64_t S, nseg, Cb, Ob, nob, ncb;
  bool per_element;  // inner == 1: parameters vary along the contiguous span
  int64_t tiles() const { return nob * ncb * nseg; }
  int64_t slots() const { return nob * nseg; }
};

Plan make_plan(Layout L) {
  Plan P{L, 0, 0, 0, 0, 0, 0, L.inner == 1};
  // Keep at least min(outer, 64) outer rows per tile when blocking channels so
  // the partial-sum buffer stays under 1/64 of x (no full-size temporaries).
  const int64_t ob_min = std::min<int64_t>(L.outer, 64);
  if (P.per_element) {
    P.S = 1;
    P.nseg = 1;
    P.Cb = std::min(L.C, std::max<int64_t>(16, kTile / ob_min));
  } else {
    P.S = std::min(L.inner, kTile);
    P.nseg = cdiv(L.inner, P.S);
    P.Cb = std::clamp<int64_t>(kTile / (P.S * ob_min), 1, L.C);
  }
  P.Ob = std::clamp<int64_t>(kTile / (P.S * P.Cb), 1, std::max<int64_t>(L.outer, 1));
  P.nob = cdiv(L.outer, P.Ob);
  P.ncb = cdiv(L.C, P.Cb);
  return P;
}

// Calls fn(offset_in_x, len, channel, slot) for every span of tile t. In the
// per-element case a span covers channels [channel, channel + len).
template <class F>
void for_each_span(const Plan& P, int64_t t, F&& fn) {
  const int64_t seg = t % P.nseg;
  const int64_t cb = (t / P.nseg) % P.ncb;
  const int64_t ob = t / (P.nseg * P.ncb);
  const int64_t o0 = ob * P.Ob, o1 = std::min(P.L.outer, o0 + P.Ob);
  const int64_t c0 = cb * P.Cb, c1 = std::min(P.L.C, c0 + P.Cb);
  const int64_t slot = ob * P.nseg + seg;
  for (int64_t o = o0; o < o1; ++o) {
    if (P.per_element) {
      fn(o * P.L.C + c0, c1 - c0, c0, slot);
    } else {
      const int64_t i0 = seg * P.S, len = std::min(P.S, P.L.inner - i0);
      for (int64_t c = c0; c < c1; ++c) fn((o * P.L.C + c) * P.L.inner + i0, len, c, slot);
    }
  }
}

char* bytes(const at::Tensor& t) { return static_cast<char*>(t.data_ptr()); }

at::Tensor fake_quant_lsq_cpu(const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& offset_,
                              int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                              std::optional<int64_t> group_size, double /*grad_scale: backward only*/) {
  const Layout L = lsq_layout(x_, scale_, offset_, qmin, qmax, axis, group_size);
  check_qparam_values(scale_, offset_);
  auto x = x_.contiguous();
  auto s = scale_.contiguous(), b = offset_.contiguous();
  auto y = cpu_empty_like(x);
  if (x.numel() == 0) return y;
  const Dt dt = dt_of(x, "x");
  const size_t es = x.element_size();
  const float *sp = s.data_ptr<float>(), *bp = b.data_ptr<float>();
  const char* xp = bytes(x);
  char* yp = bytes(y);
  const IsaTable& K = isa_table();
  const Plan P = make_plan(L);
  const float n = float(qmin), p = float(qmax);
  at::parallel_for(0, P.tiles(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_span(P, t, [&](int64_t off, int64_t len, int64_t c, int64_t) {
        K.lsq_fwd(dt, xp + off * es, yp + off * es, len, sp + c, bp + c, P.per_element ? 1 : 0, n, p);
      });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_lsq_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& offset_,
    int64_t qmin, int64_t qmax, std::optional<int64_t> axis, std::optional<int64_t> group_size,
    double grad_scale) {
  const Layout L = lsq_layout(x_, scale_, offset_, qmin, qmax, axis, group_size);
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "quantkern: grad shape ", grad_.sizes(), " must equal x shape ", x_.sizes());
  TORCH_CHECK(grad_.scalar_type() == x_.scalar_type(), "quantkern: grad dtype ", grad_.scalar_type(),
              " must equal x dtype ", x_.scalar_type());
  TORCH_CHECK(grad_.device() == x_.device(), "quantkern: grad must be on the device of x");
  check_qparam_values(scale_, offset_);
  auto x = x_.contiguous(), g = grad_.contiguous();
  auto s = scale_.contiguous(), b = offset_.contiguous();
  auto gx = cpu_empty_like(x);
  auto gs = at::zeros_like(s), gb = at::zeros_like(b);
  if (x.numel() == 0) return {gx, gs, gb};
  const Dt dt = dt_of(x, "x");
  const size_t es = x.element_size();
  const Plan P = make_plan(L);
  const int64_t C = L.C, nslots = P.slots();
  // One slot: tiles own disjoint channels, so they can sum straight into the
  // outputs. Otherwise partial sums [nslots, C] (at most 1/64 of x).
  at::Tensor part_s = gs, part_b = gb;
  if (nslots > 1) {
    part_s = at::zeros({nslots, C}, s.options());
    part_b = at::zeros({nslots, C}, s.options());
  }
  const float *sp = s.data_ptr<float>(), *bp = b.data_ptr<float>();
  float *ps = part_s.data_ptr<float>(), *pb = part_b.data_ptr<float>();
  const char *gp = bytes(g), *xp = bytes(x);
  char* gxp = bytes(gx);
  const IsaTable& K = isa_table();
  const float n = float(qmin), p = float(qmax);
  at::parallel_for(0, P.tiles(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_span(P, t, [&](int64_t off, int64_t len, int64_t c, int64_t slot) {
        K.lsq_bwd(dt, gp + off * es, xp + off * es, gxp + off * es, len, sp + c, bp + c,
                  P.per_element ? 1 : 0, n, p, ps + slot * C + c, pb + slot * C + c);
      });
  });
  float *os = gs.data_ptr<float>(), *obp = gb.data_ptr<float>();
  const double gscale = grad_scale;
  at::parallel_for(0, C, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double as = 0, ab = 0;
      for (int64_t k = 0; k < nslots; ++k) {
        as += ps[k * C + c];
        ab += pb[k * C + c];
      }
      os[c] = float(as * gscale);
      obp[c] = float(ab * gscale);
    }
  });
  return {gx, gs, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("fake_quant_lsq", &fake_quant_lsq_cpu);
  m.impl("fake_quant_lsq_backward", &fake_quant_lsq_backward_cpu);
}

}  // namespace qk
