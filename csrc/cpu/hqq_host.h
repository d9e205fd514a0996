// Host-side preparation for quantkern::hqq_quantize, shared by the CPU
// (csrc/cpu/hqq.cpp) and CUDA (csrc/cuda/hqq.cu) glue: argument checks with
// clear messages, the per-iteration constants c_i = fp32(1 / beta_i) and the
// shrink thresholds, and the tile plan.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "../shared/hqq.h"
#include "checks.h"

namespace qk {

struct HqqHost {
  HqqParams P{};  // P.c / P.thr are set by the caller (host or device copies of c / thr)
  std::vector<float> c, thr;
  int64_t N = 0, K = 0;
};

inline HqqHost hqq_prepare(const at::Tensor& W, int64_t bits, int64_t group_size, int64_t axis, double lp_norm,
                           double beta, double kappa, int64_t iters, std::string_view early_stop) {
  dt_of(W, "W");
  TORCH_CHECK(W.dim() == 2, "quantkern.hqq_quantize: W must be 2-D [N, K], got shape ", W.sizes());
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8,
              "quantkern.hqq_quantize: bits must be 1, 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0, "quantkern.hqq_quantize: group_size must be positive, got ", group_size);
  TORCH_CHECK(W.size(1) % group_size == 0, "quantkern.hqq_quantize: group_size ", group_size,
              " must divide K = W.shape[1] = ", W.size(1));
  TORCH_CHECK(axis == 0 || axis == 1, "quantkern.hqq_quantize: axis must be 0 or 1, got ", axis);
  TORCH_CHECK(lp_norm > 0.0 && lp_norm <= 1.0, "quantkern.hqq_quantize: lp_norm must be in (0, 1], got ", lp_norm);
  TORCH_CHECK(std::isfinite(beta) && beta > 0.0, "quantkern.hqq_quantize: beta must be positive and finite, got ", beta);
  TORCH_CHECK(std::isfinite(kappa) && kappa > 0.0, "quantkern.hqq_quantize: kappa must be positive and finite, got ",
              kappa);
  TORCH_CHECK(iters >= 0 && iters <= 100000, "quantkern.hqq_quantize: iters must be in [0, 100000], got ", iters);
  HqqHost H;
  HqqParams& P = H.P;
  if (early_stop == "global") P.mode = HqqStop::Global;
  else if (early_stop == "group") P.mode = HqqStop::Group;
  else if (early_stop == "none") P.mode = HqqStop::None;
  else TORCH_CHECK(false, "quantkern.hqq_quantize: early_stop must be 'global', 'group' or 'none', got '",
                   std::string(early_stop), "'");
  if (iters == 0) P.mode = HqqStop::None;
  H.N = W.size(0);
  H.K = W.size(1);
  P.g = group_size;
  P.M = H.N * (H.K / group_size);
  P.axis = int(axis);
  P.iters = int(iters);
  P.l1 = lp_norm == 1.0;
  P.qmax = float((1 << bits) - 1);
  P.wmax = float(std::ldexp(1.0, 127) / double(std::max<int64_t>(group_size, 2)));
  P.y = float(lp_norm - 1.0);
  H.c.resize(size_t(iters));
  H.thr.resize(size_t(iters));
  double b = beta;  // beta_i = beta * kappa^i, multiplied in order as the Python loop does
  for (int64_t i = 0; i < iters; ++i) {
    const float c = float(1.0 / b);
    TORCH_CHECK(std::isfinite(b) && c >= 1.1754943508222875e-38f,
                "quantkern.hqq_quantize: beta * kappa^i leaves the fp32 range at iteration ", i, " (beta_i = ", b,
                "); use a smaller kappa or fewer iters");
    const double t = std::pow(double(c), 1.0 / (2.0 - lp_norm)) * (1.0 - 1e-4);
    H.c[size_t(i)] = c;
    H.thr[size_t(i)] = float(std::max(t, 1.1754943508222875e-38));
    b *= kappa;
  }
  return H;
}

// Groups per tile: a multiple of 16 (so SIMD blocks never straddle tiles) that
// depends only on M, so every reduction is the same for any thread count.
inline int64_t hqq_tile_groups(int64_t M) {
  int64_t t = (M / 64 + 15) / 16 * 16;
  return std::clamp<int64_t>(t, 16, 512);
}

}  // namespace qk
