// Argument checks of quantkern::oscillation_update, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "checks.h"

namespace qk {

inline Layout osc_checks(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& offset, const at::Tensor& meta,
                  const at::Tensor& ema, int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                  std::optional<int64_t> group_size, double momentum, double threshold) {
  const Layout L = lsq_layout(weight, scale, offset, qmin, qmax, axis, group_size);
  TORCH_CHECK(qmin >= -128 && qmax <= 127, "quantkern: oscillation state keeps the integer in int8: need -128 <= qmin (",
              qmin, ") and qmax (", qmax, ") <= 127");
  TORCH_CHECK(weight.is_contiguous(), "quantkern: weight must be contiguous (it is updated in place)");
  TORCH_CHECK(meta.scalar_type() == at::kInt, "quantkern: state meta must be int32, got ", meta.scalar_type());
  TORCH_CHECK(ema.scalar_type() == at::kFloat, "quantkern: state ema must be float32, got ", ema.scalar_type());
  TORCH_CHECK(meta.sizes() == weight.sizes(), "quantkern: state meta shape ", meta.sizes(), " must equal weight shape ",
              weight.sizes());
  TORCH_CHECK(ema.sizes() == weight.sizes(), "quantkern: state ema shape ", ema.sizes(), " must equal weight shape ",
              weight.sizes());
  TORCH_CHECK(meta.is_contiguous() && ema.is_contiguous(), "quantkern: state meta and ema must be contiguous");
  TORCH_CHECK(meta.device() == weight.device() && ema.device() == weight.device(),
              "quantkern: state meta/ema must be on the device of weight (", weight.device(), ")");
  TORCH_CHECK(momentum > 0.0 && momentum <= 1.0, "quantkern: momentum must be in (0, 1], got ", momentum);
  TORCH_CHECK(std::isfinite(threshold), "quantkern: freeze_threshold must be finite, got ", threshold);
  return L;
}

}  // namespace qk
