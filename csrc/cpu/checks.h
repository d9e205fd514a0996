// Argument checks shared by the CPU and CUDA glue: every failure names the
// argument, so a bad call from torch.ops.quantkern.* (which bypasses the Python
// checks in quantkern/ops.py) still gets a clear message instead of a crash.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "../shared/layout.h"

namespace qk {

inline Dt dt_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kHalf: return Dt::F16;
    case at::kBFloat16: return Dt::BF16;
    default:
      TORCH_CHECK(false, "quantkern: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Checks x, scale and offset of fake_quant_lsq and returns the layout that maps
// element i of x to its parameter index (i / inner) % C.
inline Layout lsq_layout(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset,
                         int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                         std::optional<int64_t> group_size) {
  dt_of(x, "x");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "quantkern: scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK(offset.scalar_type() == at::kFloat, "quantkern: offset must be float32, got ", offset.scalar_type());
  TORCH_CHECK(scale.device() == x.device(), "quantkern: scale is on ", scale.device(), " but x is on ", x.device());
  TORCH_CHECK(offset.device() == x.device(), "quantkern: offset is on ", offset.device(), " but x is on ", x.device());
  TORCH_CHECK(qmin < qmax, "quantkern: qmin (", qmin, ") must be < qmax (", qmax, ")");
  // The grid is applied in fp32: a bound beyond 2^24 is not an exact float and would be moved silently.
  TORCH_CHECK(qmin >= -(int64_t(1) << 24) && qmax <= (int64_t(1) << 24),
              "quantkern: qmin and qmax must lie in [-2^24, 2^24] (fp32-exact integers), got ", qmin, ", ", qmax);
  TORCH_CHECK(scale.sizes() == offset.sizes(), "quantkern: offset shape ", offset.sizes(),
              " must equal scale shape ", scale.sizes());
  TORCH_CHECK(!(axis.has_value() && group_size.has_value()), "quantkern: pass either axis or group_size, not both (got axis ",
              axis.value_or(0), ", group_size ", group_size.value_or(0), ")");
  Layout L{1, 1, x.numel()};
  if (group_size.has_value()) {
    int64_t gs = *group_size;
    TORCH_CHECK(x.dim() == 2, "quantkern: per-group x must be 2-D [rows, K], got shape ", x.sizes());
    TORCH_CHECK(gs > 0 && x.size(1) % gs == 0, "quantkern: group_size ", gs, " must divide K = ", x.size(1));
    TORCH_CHECK(scale.dim() == 2 && scale.size(0) == x.size(0) && scale.size(1) == x.size(1) / gs,
                "quantkern: per-group scale must be [", x.size(0), ", ", x.size(1) / gs, "], got ", scale.sizes());
    L = Layout{1, x.size(0) * (x.size(1) / gs), gs};
  } else if (axis.has_value()) {
    int64_t a = *axis;
    TORCH_CHECK(a >= 0 && a < x.dim(), "quantkern: axis ", a, " out of range for x of dim ", x.dim());
    TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(a), "quantkern: per-channel scale must be 1-D of length x.shape[",
                a, "] = ", x.size(a), ", got ", scale.sizes());
    int64_t outer = 1, inner = 1;
    for (int64_t d = 0; d < a; ++d) outer *= x.size(d);
    for (int64_t d = a + 1; d < x.dim(); ++d) inner *= x.size(d);
    L = Layout{outer, x.size(a), inner};
  } else {
    TORCH_CHECK(scale.numel() == 1, "quantkern: per-tensor scale must hold one element, got shape ", scale.sizes(),
                " (pass axis= or group_size= for finer granularity)");
  }
  return L;
}

// Values of a CPU scale / offset pair (cheap, and a CPU op is synchronous anyway): a NaN or
// non-positive scale, or a non-finite offset, would otherwise turn the whole result into
// NaN / inf without a word. The CUDA glue does not call this (it would force a host sync).
inline void check_qparam_values(const at::Tensor& scale, const at::Tensor& offset) {
  auto s = scale.contiguous(), b = offset.contiguous();
  const float *sp = s.data_ptr<float>(), *bp = b.data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i)
    TORCH_CHECK(std::isfinite(sp[i]) && sp[i] > 0.f, "quantkern: scale must be positive and finite; scale[", i,
                "] = ", sp[i]);
  for (int64_t i = 0; i < b.numel(); ++i)
    TORCH_CHECK(std::isfinite(bp[i]), "quantkern: offset must be finite; offset[", i, "] = ", bp[i]);
}

}  // namespace qk
