// CUDA kernels of the histogram calibrators over the CPU's math
// (csrc/shared/calibrate.h), so the CPU tests check the arithmetic the GPU runs.
//
// calib_histogram: a 2-D grid (blocks of M, channels), 64-bit atomic adds into
//   pos / neg (integer counts: order independent, deterministic).
// calib_search, per chunk of channels (bounded scratch):
//   1. one thread per channel builds its extended bins and prefix sums (O(bins)),
//   2. one thread per (channel, candidate) evaluates the objective,
//   3. one thread per channel picks (calib_pick) and writes (amin, amax).
//
// Build check without a CUDA torch: the kernels are torch-free and compile alone with
//   nvcc -std=c++17 -DQK_KERNELS_ONLY -arch=sm_80 -c csrc/cuda/calibrate.cu
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "../shared/calibrate.h"

namespace qk {
namespace cuda {

__device__ __forceinline__ float cb_ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float cb_ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float cb_ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <class T>
__global__ void calib_hist_kernel(const T* __restrict__ x, unsigned long long* pos, unsigned long long* neg,
                                  const float* __restrict__ R, const int64_t* __restrict__ n, int64_t M, int64_t B,
                                  int* bad) {
  const int64_t c = blockIdx.y;
  const float r = R[c];
  const int64_t nc = n[c];
  if (!(r > 0) || nc <= 0) return;
  const float nf = float(nc), top = float(nc - 1);
  const T* xr = x + c * M;
  for (int64_t m = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; m < M; m += int64_t(gridDim.x) * blockDim.x) {
    const float v = cb_ld(xr, m);
    const float t = calib_ratio(fabsf(v), nf, r);
    if (calib_bad(t)) {
      atomicOr(bad, 1);
      continue;
    }
    atomicAdd((v < 0 ? neg : pos) + c * B + calib_bin(t, top), 1ULL);
  }
}

struct SearchArgs {
  const int64_t* pos;
  const int64_t* neg;
  const double* width;
  const int64_t* n;
  int64_t B, L, imax, stride, start_bin;
  int method, num_bits;
  bool is_unsigned, symmetric;
};

// scratch per channel: ext [L], cb, cz, cbl [L + 1] each
__global__ void calib_build_kernel(SearchArgs a, int64_t c0, int64_t cn, double* scratch, CalibChan* chans) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= cn) return;
  const int64_t c = c0 + k;
  double* ext = scratch + k * (4 * a.L + 3);
  CalibChan ch{};
  if (a.width[c] > 0)
    ch = calib_build(a.pos + c * a.B, a.neg + c * a.B, a.n[c], a.width[c], a.symmetric, a.method, a.stride,
                     a.start_bin, ext, ext + a.L, ext + 2 * a.L + 1, ext + 3 * a.L + 2);
  chans[k] = ch;  // ncand = 0 for a channel without data
}

__global__ void calib_eval_kernel(SearchArgs a, int64_t cn, const double* scratch, const CalibChan* chans,
                                  double* obj) {
  const int64_t k = blockIdx.y;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= cn) return;
  const CalibChan ch = chans[k];
  if (t >= ch.ncand) return;
  const double* ext = scratch + k * (4 * a.L + 3);
  obj[k * a.imax + t] = calib_eval(ext, ext + a.L, ext + 2 * a.L + 1, ext + 3 * a.L + 2, ch, a.symmetric, a.method,
                                   a.num_bits, a.is_unsigned, a.stride, a.start_bin, t);
}

__global__ void calib_pick_kernel(SearchArgs a, int64_t c0, int64_t cn, const CalibChan* chans, const double* obj,
                                  double* amin, double* amax) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= cn) return;
  const int64_t c = c0 + k;
  if (!(a.width[c] > 0)) {
    amin[c] = 0;
    amax[c] = 0;
    return;
  }
  const CalibChan ch = chans[k];
  const int64_t t = calib_pick(obj + k * a.imax, ch, a.symmetric, a.method, a.stride, a.start_bin);
  calib_result(ch, a.symmetric, a.method, a.is_unsigned, a.n[c], a.stride, a.start_bin, t, amin[c], amax[c]);
}

}  // namespace cuda
}  // namespace qk

#ifndef QK_KERNELS_ONLY
// ------------------------------------------------------------------ torch glue
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../cpu/calibrate_checks.h"

namespace qk {
namespace cuda {
namespace {

void calib_histogram_cuda(const at::Tensor& x_, at::Tensor pos, at::Tensor neg, const at::Tensor& R_,
                          const at::Tensor& n_) {
  calib_histogram_check(x_, pos, neg, R_, n_);
  TORCH_CHECK(x_.is_cuda(), "quantkern.calib_histogram: x must be a CUDA tensor, got ", x_.device());
  const int64_t C = x_.size(0), M = x_.size(1), B = pos.size(1);
  if (C == 0) return;
  // The CPU check's bounds and messages (calibrate_checks.h does it on the CPU only: reading n
  // here is a host sync), and like it also when M == 0, so a bad n fails on every device.
  TORCH_CHECK(n_.max().item<int64_t>() <= std::min(B, kCalibMaxBins), "quantkern.calib_histogram: ",
              "n must be <= B = pos.shape[1] = ", B, " and <= 2^24");
  TORCH_CHECK(n_.min().item<int64_t>() >= 0, "quantkern.calib_histogram: ", "n must be >= 0");
  if (M == 0) return;
  c10::cuda::CUDAGuard guard(x_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto x = x_.contiguous();
  auto R = R_.contiguous();
  auto n = n_.contiguous();
  auto bad = at::zeros({1}, x.options().dtype(at::kInt));
  const int threads = 256;
  auto* pp = reinterpret_cast<unsigned long long*>(pos.data_ptr<int64_t>());
  auto* np = reinterpret_cast<unsigned long long*>(neg.data_ptr<int64_t>());
  // channels ride on grid.y (at most 65535 per launch): more channels run as several launches
  for (int64_t c0 = 0; c0 < C; c0 += 65535) {
    const int64_t cn = std::min<int64_t>(C - c0, 65535);
    const int64_t bx = std::min<int64_t>((M + threads - 1) / threads, std::max<int64_t>(1, 4096 / cn));
    const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(cn));
    const float* Rp = R.data_ptr<float>() + c0;
    const int64_t* npc = n.data_ptr<int64_t>() + c0;
    auto* pc = pp + c0 * B;
    auto* nc = np + c0 * B;
    switch (x.scalar_type()) {
      case at::kFloat:
        calib_hist_kernel<<<grid, threads, 0, stream>>>(x.data_ptr<float>() + c0 * M, pc, nc, Rp, npc, M, B,
                                                        bad.data_ptr<int>());
        break;
      case at::kHalf:
        calib_hist_kernel<<<grid, threads, 0, stream>>>(reinterpret_cast<const __half*>(x.data_ptr()) + c0 * M, pc,
                                                        nc, Rp, npc, M, B, bad.data_ptr<int>());
        break;
      default:
        calib_hist_kernel<<<grid, threads, 0, stream>>>(
            reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()) + c0 * M, pc, nc, Rp, npc, M, B, bad.data_ptr<int>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  TORCH_CHECK(bad.item<int>() == 0, "quantkern.calib_histogram: x contains NaN or infinity");
}

std::tuple<at::Tensor, at::Tensor> calib_search_cuda(const at::Tensor& pos_, const at::Tensor& neg_,
                                                     const at::Tensor& width_, const at::Tensor& n_,
                                                     c10::string_view method, int64_t num_bits, bool is_unsigned,
                                                     bool symmetric, int64_t stride, int64_t start_bin) {
  const int meth = calib_search_check(pos_, neg_, width_, n_, method, num_bits, is_unsigned, symmetric, stride,
                                      start_bin);
  TORCH_CHECK(pos_.is_cuda(), "quantkern.calib_search: pos must be a CUDA tensor, got ", pos_.device());
  c10::cuda::CUDAGuard guard(pos_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto pos = pos_.contiguous(), neg = neg_.contiguous(), width = width_.contiguous(), n = n_.contiguous();
  const int64_t C = pos.size(0), B = pos.size(1);
  auto f64 = pos.options().dtype(at::kDouble);
  auto amin = at::zeros({C}, f64), amax = at::zeros({C}, f64);
  if (C == 0) return {amin, amax};
  TORCH_CHECK(n.max().item<int64_t>() <= B && n.min().item<int64_t>() >= 0,
              "quantkern.calib_search: n must be in [0, B = pos.shape[1] = ", B, "]");
  // (calib_search_check tests width on the CPU only; the CUDA op answered an inf width with
  // (-inf, inf) and a NaN or negative one with a silent (0, 0))
  TORCH_CHECK(at::all(at::isfinite(width) & (width >= 0) & (width <= 1e150)).item<bool>(),
              "quantkern.calib_search: width must be finite, >= 0 (0: no data) and <= 1e150");
  SearchArgs a{pos.data_ptr<int64_t>(), neg.data_ptr<int64_t>(), width.data_ptr<double>(), n.data_ptr<int64_t>(),
               B, symmetric ? B : 2 * (B + stride), 0, stride, start_bin, meth, int(num_bits), is_unsigned, symmetric};
  a.imax = symmetric ? B + 1 : (B / stride + 2) * (B / stride + 2);
  // channels per chunk: scratch + objectives within about 256 MiB
  const int64_t per = (4 * a.L + 3 + a.imax) * 8;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>({C, (int64_t(256) << 20) / per, 65535}));
  auto scratch = at::empty({chunk * (4 * a.L + 3)}, f64);
  auto obj = at::empty({chunk * a.imax}, f64);
  auto chans = at::empty({chunk * int64_t(sizeof(CalibChan))}, pos.options().dtype(at::kByte));
  auto* cp = reinterpret_cast<CalibChan*>(chans.data_ptr());
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t cn = std::min(chunk, C - c0);
    const int threads = 128;
    calib_build_kernel<<<unsigned((cn + threads - 1) / threads), threads, 0, stream>>>(a, c0, cn,
                                                                                       scratch.data_ptr<double>(), cp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>((a.imax + threads - 1) / threads), static_cast<unsigned>(cn));
    calib_eval_kernel<<<grid, threads, 0, stream>>>(a, cn, scratch.data_ptr<double>(), cp, obj.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    calib_pick_kernel<<<unsigned((cn + threads - 1) / threads), threads, 0, stream>>>(
        a, c0, cn, cp, obj.data_ptr<double>(), amin.data_ptr<double>(), amax.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {amin, amax};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("calib_histogram", &cuda::calib_histogram_cuda);
  m.impl("calib_search", &cuda::calib_search_cuda);
}

}  // namespace qk
#endif  // QK_KERNELS_ONLY
