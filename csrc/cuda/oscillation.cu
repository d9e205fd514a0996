// CUDA implementation of quantkern::oscillation_update and quantkern::dampening_loss
// (+ backward), over the same per-element math as the CPU kernels
// (csrc/shared/oscillation.h).
//
// Build check without a CUDA torch: the kernels are torch-free and compile alone with
//   nvcc -std=c++17 -DQK_KERNELS_ONLY -arch=sm_80 -c csrc/cuda/oscillation.cu
// (tests/test_oscillation.py does this when nvcc is present).
//
// Determinism: counts are integers (atomicAdd order does not matter); the loss is
// summed per block into a buffer, then the buffer is reduced in double by one block
// in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "../shared/oscillation.h"

namespace qk {
namespace cuda {

constexpr int kThreads = 256;

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ int64_t param_index(int64_t i, int64_t C, int64_t inner) { return (i / inner) % C; }

template <class TW, bool kFreeze>
__global__ void __launch_bounds__(kThreads) osc_kernel(TW* __restrict__ w, const float* __restrict__ s,
                                                       const float* __restrict__ b, int32_t* __restrict__ meta,
                                                       float* __restrict__ ema, unsigned long long* __restrict__ counts,
                                                       int64_t N, int64_t C, int64_t inner, OscConsts k) {
  unsigned int n_osc = 0, n_frz = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = param_index(i, C, inner);
    const float sv = s[c], bv = b[c];
    // The CPU op raises on such a scale or offset; raising here would cost a host sync per call, so
    // the kernel leaves those weights and their state untouched instead of writing NaN-derived codes
    // (a NaN offset gave q = NaN: q_prev int(NaN), a NaN EMA; an inf one rewrote frozen weights as inf).
    if (!(sv > 0.f) || !isfinite(sv) || !isfinite(bv)) continue;
    uint32_t mo;
    float eo, wo, o, f;
    // Without freezing the integer EMA is neither read nor written.
    oscillation_step<kFreeze>(ld(w, i), sv, bv, uint32_t(meta[i]), kFreeze ? ema[i] : 0.f, k.n, k.p, k.m, k.om, k.mS,
                              k.thF, mo, eo, wo, o, f);
    meta[i] = int32_t(mo);
    if (kFreeze) ema[i] = eo;
    if (f > 0.5f) st(w, i, wo);
    n_osc += o > 0.5f;
    n_frz += f > 0.5f;
  }
  // block reduction of the two counts
  for (int off = 16; off > 0; off >>= 1) {
    n_osc += __shfl_down_sync(0xffffffffu, n_osc, off);
    n_frz += __shfl_down_sync(0xffffffffu, n_frz, off);
  }
  __shared__ unsigned int sh[2][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh[0][warp] = n_osc;
    sh[1][warp] = n_frz;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long a = 0, z = 0;
    for (int j = 0; j < kThreads / 32; ++j) {
      a += sh[0][j];
      z += sh[1][j];
    }
    atomicAdd(counts, a);
    atomicAdd(counts + 1, z);
  }
}

template <class TW>
__global__ void __launch_bounds__(kThreads) damp_fwd_kernel(const TW* __restrict__ w, const float* __restrict__ s,
                                                            const float* __restrict__ b, float* __restrict__ part,
                                                            int64_t N, int64_t C, int64_t inner, float n, float p) {
  float acc = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = param_index(i, C, inner);
    float in;
    const float d = dampening_diff(ld(w, i), s[c], b[c], n, p, in);
    acc = __fadd_rn(acc, __fmul_rn(d, d));
  }
  for (int off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off));
  __shared__ float sh[kThreads / 32];
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int j = 0; j < kThreads / 32; ++j) t = __fadd_rn(t, sh[j]);
    part[blockIdx.x] = t;
  }
}

// One block sums the per-block partials in double, in a fixed order; out = norm * sum.
__global__ void __launch_bounds__(kThreads) damp_sum_kernel(const float* __restrict__ part, int64_t nb, double norm,
                                                            float* __restrict__ out) {
  __shared__ double sh[kThreads];
  double a = 0.0;
  for (int64_t j = threadIdx.x; j < nb; j += kThreads) a += double(part[j]);
  sh[threadIdx.x] = a;
  __syncthreads();
  for (int st = kThreads / 2; st > 0; st >>= 1) {
    if (threadIdx.x < st) sh[threadIdx.x] += sh[threadIdx.x + st];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = float(sh[0] * norm);
}

template <class TW>
__global__ void __launch_bounds__(kThreads) damp_bwd_kernel(const double* __restrict__ grad, const TW* __restrict__ w,
                                                            TW* __restrict__ gw, const float* __restrict__ s,
                                                            const float* __restrict__ b, int64_t N, int64_t C,
                                                            int64_t inner, float n, float p, double norm2) {
  const float g2 = float(__dmul_rn(grad[0], norm2));  // as the CPU: grad * norm * 2 in double, rounded once
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = param_index(i, C, inner);
    float in;
    const float d = dampening_diff(ld(w, i), s[c], b[c], n, p, in);
    st(gw, i, __fmul_rn(__fmul_rn(g2, d), in));
  }
}

inline int grid_for(int64_t N) {
  int64_t g = (N + kThreads - 1) / kThreads;
  return int(g < 65535 * 8 ? (g > 0 ? g : 1) : 65535 * 8);
}

// Explicit instantiations so the kernels-only build compiles every variant.
template __global__ void osc_kernel<float, true>(float*, const float*, const float*, int32_t*, float*, unsigned long long*, int64_t, int64_t, int64_t, OscConsts);
template __global__ void osc_kernel<float, false>(float*, const float*, const float*, int32_t*, float*, unsigned long long*, int64_t, int64_t, int64_t, OscConsts);
template __global__ void osc_kernel<__half, true>(__half*, const float*, const float*, int32_t*, float*, unsigned long long*, int64_t, int64_t, int64_t, OscConsts);
template __global__ void osc_kernel<__half, false>(__half*, const float*, const float*, int32_t*, float*, unsigned long long*, int64_t, int64_t, int64_t, OscConsts);
template __global__ void osc_kernel<__nv_bfloat16, true>(__nv_bfloat16*, const float*, const float*, int32_t*, float*, unsigned long long*, int64_t, int64_t, int64_t, OscConsts);
template __global__ void osc_kernel<__nv_bfloat16, false>(__nv_bfloat16*, const float*, const float*, int32_t*, float*, unsigned long long*, int64_t, int64_t, int64_t, OscConsts);
template __global__ void damp_fwd_kernel<float>(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, float, float);
template __global__ void damp_fwd_kernel<__half>(const __half*, const float*, const float*, float*, int64_t, int64_t, int64_t, float, float);
template __global__ void damp_fwd_kernel<__nv_bfloat16>(const __nv_bfloat16*, const float*, const float*, float*, int64_t, int64_t, int64_t, float, float);
template __global__ void damp_bwd_kernel<float>(const double*, const float*, float*, const float*, const float*, int64_t, int64_t, int64_t, float, float, double);
template __global__ void damp_bwd_kernel<__half>(const double*, const __half*, __half*, const float*, const float*, int64_t, int64_t, int64_t, float, float, double);
template __global__ void damp_bwd_kernel<__nv_bfloat16>(const double*, const __nv_bfloat16*, __nv_bfloat16*, const float*, const float*, int64_t, int64_t, int64_t, float, float, double);

}  // namespace cuda
}  // namespace qk

#ifndef QK_KERNELS_ONLY
// ------------------------------------------------------------------ torch glue
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/oscillation_checks.h"

namespace qk {
namespace cuda {
namespace {

// (C, inner): element i uses parameter (i / inner) % C.
void param_layout(const Layout& L, int64_t& C, int64_t& inner) {
  C = L.C;
  inner = L.inner;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "quantkern: ", name, " must be a CUDA tensor, got ", t.device());
}

template <class F>
void dispatch_w(const at::Tensor& w, F&& f) {
  switch (w.scalar_type()) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "quantkern: weight must be float32, float16 or bfloat16, got ", w.scalar_type());
  }
}

at::Tensor oscillation_update_cuda(at::Tensor& weight, const at::Tensor& scale_, const at::Tensor& offset_,
                                   at::Tensor& meta, at::Tensor& ema, int64_t qmin, int64_t qmax,
                                   std::optional<int64_t> axis, std::optional<int64_t> group_size, double momentum,
                                   double threshold) {
  const Layout L = osc_checks(weight, scale_, offset_, meta, ema, qmin, qmax, axis, group_size, momentum, threshold);
  check_cuda(weight, "weight");
  c10::cuda::CUDAGuard guard(weight.device());
  auto counts = at::zeros({2}, weight.options().dtype(at::kLong));
  const int64_t N = weight.numel();
  if (N == 0) return counts;
  auto s = scale_.contiguous(), b = offset_.contiguous();
  int64_t C, inner;
  param_layout(L, C, inner);
  const OscConsts k = make_osc_consts(qmin, qmax, momentum, threshold);
  const bool freeze = threshold > 0.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* cp = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  dispatch_w(weight, [&](auto tag) {
    using TW = std::remove_pointer_t<decltype(tag)>;
    TW* wp = static_cast<TW*>(weight.data_ptr());
    auto kern = freeze ? &osc_kernel<TW, true> : &osc_kernel<TW, false>;
    kern<<<grid_for(N), kThreads, 0, stream>>>(wp, s.data_ptr<float>(), b.data_ptr<float>(), meta.data_ptr<int32_t>(),
                                               ema.data_ptr<float>(), cp, N, C, inner, k);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

at::Tensor dampening_loss_cuda(const at::Tensor& weight_, const at::Tensor& scale_, const at::Tensor& offset_,
                               int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                               std::optional<int64_t> group_size, double norm) {
  const Layout L = lsq_layout(weight_, scale_, offset_, qmin, qmax, axis, group_size);
  check_cuda(weight_, "weight");
  c10::cuda::CUDAGuard guard(weight_.device());
  auto out = at::zeros({}, scale_.options());
  const int64_t N = weight_.numel();
  if (N == 0) return out;
  auto w = weight_.contiguous();
  auto s = scale_.contiguous(), b = offset_.contiguous();
  int64_t C, inner;
  param_layout(L, C, inner);
  const int grid = grid_for(N);
  auto part = at::empty({grid}, scale_.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_w(w, [&](auto tag) {
    using TW = std::remove_pointer_t<decltype(tag)>;
    damp_fwd_kernel<TW><<<grid, kThreads, 0, stream>>>(static_cast<const TW*>(w.data_ptr()), s.data_ptr<float>(),
                                                       b.data_ptr<float>(), part.data_ptr<float>(), N, C, inner,
                                                       float(qmin), float(qmax));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  damp_sum_kernel<<<1, kThreads, 0, stream>>>(part.data_ptr<float>(), grid, norm, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dampening_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& weight_, const at::Tensor& scale_,
                                        const at::Tensor& offset_, int64_t qmin, int64_t qmax,
                                        std::optional<int64_t> axis, std::optional<int64_t> group_size, double norm) {
  const Layout L = lsq_layout(weight_, scale_, offset_, qmin, qmax, axis, group_size);
  check_cuda(weight_, "weight");
  TORCH_CHECK(grad.numel() == 1, "quantkern: grad of dampening_loss must hold one element, got shape ", grad.sizes());
  c10::cuda::CUDAGuard guard(weight_.device());
  auto w = weight_.contiguous();
  auto gw = at::empty_like(w);
  const int64_t N = w.numel();
  if (N == 0) return gw;
  auto s = scale_.contiguous(), b = offset_.contiguous();
  TORCH_CHECK(grad.device() == weight_.device(), "quantkern: grad of dampening_loss is on ", grad.device(),
              " but weight is on ", weight_.device());
  auto g = grad.reshape({1}).to(at::kDouble).contiguous();
  int64_t C, inner;
  param_layout(L, C, inner);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_w(w, [&](auto tag) {
    using TW = std::remove_pointer_t<decltype(tag)>;
    damp_bwd_kernel<TW><<<grid_for(N), kThreads, 0, stream>>>(
        g.data_ptr<double>(), static_cast<const TW*>(w.data_ptr()), static_cast<TW*>(gw.data_ptr()),
        s.data_ptr<float>(), b.data_ptr<float>(), N, C, inner, float(qmin), float(qmax), 2.0 * norm);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gw;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("oscillation_update", &cuda::oscillation_update_cuda);
  m.impl("dampening_loss", &cuda::dampening_loss_cuda);
  m.impl("dampening_loss_backward", &cuda::dampening_loss_backward_cuda);
}

}  // namespace qk
#endif  // QK_KERNELS_ONLY
