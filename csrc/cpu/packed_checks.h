// Argument checks of the packed-weight ops, shared by the CPU and CUDA glue.
// Every failure names the argument (calls through torch.ops.quantkern.* skip
// the Python checks of quantkern/ops.py).
#pragma once

#include <ATen/ATen.h>

#include "../shared/packing.h"
#include "checks.h"

namespace qk {

inline void check_qweight(const char* op, const at::Tensor& qw, int64_t bits, int64_t K) {
  TORCH_CHECK(qw.scalar_type() == at::kInt, "quantkern.", op, ": qweight must be int32, got ", qw.scalar_type());
  const int64_t words = (K + 31) / 32 * bits;
  TORCH_CHECK(qw.dim() == 2 && qw.size(1) == words, "quantkern.", op, ": qweight must have shape [N, ", words,
              "] for in_features=", K, ", bits=", bits, ", got ", qw.sizes());
}

inline void check_packed(const char* op, const at::Tensor& qw, const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t bits, int64_t group_size, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "quantkern.", op, ": bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(K > 0, "quantkern.", op, ": in_features must be positive, got ", K);
  TORCH_CHECK(group_size == K || (group_size > 0 && group_size % 32 == 0 && K % group_size == 0), "quantkern.", op,
              ": group_size ", group_size, " must be a multiple of 32 that divides in_features=", K,
              ", or equal in_features (one group per row)");
  check_qweight(op, qw, bits, K);
  const int64_t N = qw.size(0), G = K / group_size;
  dt_of(scales, "scales");
  TORCH_CHECK(zeros.scalar_type() == scales.scalar_type(), "quantkern.", op, ": zeros dtype ", zeros.scalar_type(),
              " must equal scales dtype ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, "quantkern.", op,
              ": scales must have shape [", N, ", ", G, "] (N, in_features / group_size), got ", scales.sizes());
  TORCH_CHECK(zeros.sizes() == scales.sizes(), "quantkern.", op, ": zeros shape ", zeros.sizes(),
              " must equal scales shape ", scales.sizes());
  TORCH_CHECK(scales.device() == qw.device() && zeros.device() == qw.device(), "quantkern.", op,
              ": qweight, scales and zeros must be on one device (", qw.device(), ", ", scales.device(), ", ",
              zeros.device(), ")");
}

// A view of contiguous tensors for the kernels (checked by check_packed).
inline PackedW packed_view(const at::Tensor& qw, const at::Tensor& s, const at::Tensor& z, int64_t bits,
                           int64_t group_size, int64_t K) {
  return packed_w(reinterpret_cast<const uint8_t*>(qw.data_ptr<int32_t>()), s.data_ptr(), z.data_ptr(),
                  dt_of(s, "scales"), qw.size(0), K, int(bits), group_size);
}

}  // namespace qk
