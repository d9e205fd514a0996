// packed_linear_backward (dX = dY W of y = x W^T) on any device: its argument checks and its
// composite form, shared by the CPU glue (where its BLAS path cannot run) and the CUDA glue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "packed_checks.h"

namespace qk {

// W is dequantized to fp32 at most this many bytes of rows at a time, never whole.
constexpr int64_t kGradChunkBytes = int64_t(16) << 20;

// Product of all but the last size of t (symbolic under torch.compile; .expect_int() in kernels).
// The row count of grad [..., N] without reshape(-1, N), which fails for N = 0.
inline c10::SymInt rows_of(const at::Tensor& t) {
  c10::SymInt r = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) r = r * t.sym_size(d);
  return r;
}

inline void check_packed_backward(const at::Tensor& grad, const at::Tensor& qw, const at::Tensor& s,
                                  const at::Tensor& z, int64_t bits, int64_t group_size, int64_t K) {
  check_packed("packed_linear_backward", qw, s, z, bits, group_size, K);
  dt_of(grad, "grad");
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == qw.size(0), "quantkern.packed_linear_backward: grad must have shape [..., ",
              qw.size(0), "] (out_features), got ", grad.sizes());
  TORCH_CHECK(grad.device() == qw.device(), "quantkern.packed_linear_backward: grad is on ", grad.device(),
              " but the weight is on ", qw.device());
}

// dX [..., K] in grad's dtype: fp32 chunks of W from the dequantize op, fp32 accumulation (addmm).
inline at::Tensor packed_grad_composite(const at::Tensor& grad, const at::Tensor& qw, const at::Tensor& s,
                                        const at::Tensor& z, int64_t bits, int64_t group_size, int64_t K) {
  static auto deq = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("quantkern::dequantize", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                          int64_t, std::optional<at::ScalarType>)>();
  const int64_t N = qw.size(0);
  auto g2 = grad.reshape({rows_of(grad).expect_int(), N});
  auto out = at::zeros({g2.size(0), K}, grad.options().dtype(at::kFloat));
  const int64_t step = std::max<int64_t>(1, kGradChunkBytes / (4 * K));
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t n1 = std::min(N, n0 + step);
    auto w = deq.call(qw.slice(0, n0, n1), s.slice(0, n0, n1), z.slice(0, n0, n1), bits, group_size, K, at::kFloat);
    out.addmm_(g2.slice(1, n0, n1).to(at::kFloat), w);
  }
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape.back() = K;
  return out.to(grad.scalar_type()).reshape(shape);
}

}  // namespace qk
