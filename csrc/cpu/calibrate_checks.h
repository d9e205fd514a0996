// Argument checks of calib_histogram / calib_search, shared by the CPU and
// CUDA glue (torch.ops callers bypass quantkern/ops.py): every message names
// the argument.
#pragma once

#include <ATen/ATen.h>

#include "../shared/calibrate.h"

namespace qk {

inline void calib_histogram_check(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& neg,
                                  const at::Tensor& R, const at::Tensor& n) {
  const char* op = "quantkern.calib_histogram: ";
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, "x must be 2-D [C, M], got shape ", x.sizes());
  const int64_t C = x.size(0);
  TORCH_CHECK(pos.scalar_type() == at::kLong && neg.scalar_type() == at::kLong, op,
              "pos and neg must be int64, got ", pos.scalar_type(), " and ", neg.scalar_type());
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == C && neg.sizes() == pos.sizes(), op, "pos and neg must be [C, B] with C = ",
              C, ", got ", pos.sizes(), " and ", neg.sizes());
  TORCH_CHECK(pos.is_contiguous() && neg.is_contiguous(), op, "pos and neg must be contiguous (updated in place)");
  TORCH_CHECK(R.scalar_type() == at::kFloat && R.dim() == 1 && R.size(0) == C, op, "R must be float32 [", C, "], got ",
              R.scalar_type(), " ", R.sizes());
  TORCH_CHECK(n.scalar_type() == at::kLong && n.dim() == 1 && n.size(0) == C, op, "n must be int64 [", C, "], got ",
              n.scalar_type(), " ", n.sizes());
  for (const at::Tensor* t : {&pos, &neg, &R, &n})
    TORCH_CHECK(t->device() == x.device(), op, "all tensors must be on x's device ", x.device(), ", got ", t->device());
  if (C > 0 && x.device().is_cpu()) {
    TORCH_CHECK(n.max().item<int64_t>() <= std::min(pos.size(1), kCalibMaxBins), op, "n must be <= B = pos.shape[1] = ",
                pos.size(1), " and <= 2^24");
    TORCH_CHECK(n.min().item<int64_t>() >= 0, op, "n must be >= 0");
  }
}

inline int calib_search_check(const at::Tensor& pos, const at::Tensor& neg, const at::Tensor& width,
                              const at::Tensor& n, c10::string_view method, int64_t num_bits, bool is_unsigned,
                              bool symmetric, int64_t stride, int64_t start_bin) {
  const char* op = "quantkern.calib_search: ";
  TORCH_CHECK(pos.scalar_type() == at::kLong && neg.scalar_type() == at::kLong, op,
              "pos and neg must be int64, got ", pos.scalar_type(), " and ", neg.scalar_type());
  TORCH_CHECK(pos.dim() == 2 && neg.sizes() == pos.sizes(), op, "pos and neg must be [C, B] of one shape, got ",
              pos.sizes(), " and ", neg.sizes());
  const int64_t C = pos.size(0);
  TORCH_CHECK(pos.size(1) >= 2, op, "pos must have at least 2 bins, got ", pos.size(1));
  TORCH_CHECK(width.scalar_type() == at::kDouble && width.dim() == 1 && width.size(0) == C, op,
              "width must be float64 [", C, "], got ", width.scalar_type(), " ", width.sizes());
  TORCH_CHECK(n.scalar_type() == at::kLong && n.dim() == 1 && n.size(0) == C, op, "n must be int64 [", C, "], got ",
              n.scalar_type(), " ", n.sizes());
  for (const at::Tensor* t : {&neg, &width, &n})
    TORCH_CHECK(t->device() == pos.device(), op, "all tensors must be on pos's device ", pos.device(), ", got ",
                t->device());
  int meth = -1;
  if (method == "entropy") meth = kCalibEntropy;
  if (method == "mse") meth = kCalibMse;
  TORCH_CHECK(meth >= 0, op, "method must be 'entropy' or 'mse', got '", std::string(method), "'");
  TORCH_CHECK(num_bits >= 1 && num_bits <= 16, op, "num_bits must be in [1, 16], got ", num_bits);
  TORCH_CHECK(!(symmetric && !is_unsigned && num_bits < 2), op, "symmetric signed search needs num_bits >= 2");
  // (<= 2^24, the most bins a histogram has: the work buffers grow with stride, and a stride near
  // 2^62 wrapped their size around int64)
  TORCH_CHECK(stride >= 1 && stride <= kCalibMaxBins, op, "stride must be in [1, 2^24], got ", stride);
  TORCH_CHECK(start_bin >= 1 && start_bin <= kCalibMaxBins, op, "start_bin must be in [1, 2^24], got ", start_bin);
  if (C > 0 && pos.device().is_cpu()) {
    TORCH_CHECK(n.max().item<int64_t>() <= pos.size(1) && n.min().item<int64_t>() >= 0, op,
                "n must be in [0, B = pos.shape[1] = ", pos.size(1), "]");
    // (as the Python wrapper: beyond ~1e150 every candidate's squared error overflows float64)
    TORCH_CHECK(at::all(at::isfinite(width) & (width >= 0) & (width <= 1e150)).item<bool>(), op,
                "width must be finite, >= 0 (0: no data) and <= 1e150");
  }
  return meth;
}

}  // namespace qk
