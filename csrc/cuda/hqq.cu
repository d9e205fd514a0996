// CUDA implementation of quantkern::hqq_quantize over the same per-group math
// as the CPU kernels (csrc/shared/hqq.h): one thread per group, the thread's
// "lane" being exactly one lane of the CPU's SIMD blocks, so every group runs
// the same fp32 operation sequence (qk_math.h: __fadd_rn etc., no FMA
// contraction) and the results match the CPU bit for bit.
//
// A block of T threads owns T consecutive groups. Their g*T values are loaded
// once, coalesced, into shared memory as [g][T+1] (padded: conflict-free for
// both the transposing load and the per-thread sweeps), and all iterations
// read them from there. Groups too large for shared memory (g > 364: [g][33]
// floats plus the static red[] past 48 KB) are read from global memory (L1/L2) instead.
//
// Global early stop (the official rule): every thread records its zero after
// each iteration (zhist), and each block sums its groups' fp32 error sums in
// fp64 in group order per iteration. A one-block kernel reduces the blocks,
// applies the rule and stores the number of updates on the device; the last
// kernel writes zero and q from it (no host round trip except the final
// NaN/inf check). The CPU groups that fp64 sum by its tiles (hqq_tile_groups),
// this kernel by blocks of T groups: the mean errors E can differ in the last
// fp64 bit (fp32 values summed exactly, as is typical, give equal sums), so the
// stop iteration, and with it zero and q, matches the CPU except when such a
// bit flips E's fp32 rounding at a tie of the stop test.
//
// Build check without a CUDA torch: the kernels are torch-free and compile alone with
//   nvcc -std=c++17 -DQK_KERNELS_ONLY -arch=sm_80 -c csrc/cuda/hqq.cu
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "../shared/hqq.h"

namespace qk {
namespace cuda {

__device__ __forceinline__ float hq_ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float hq_ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float hq_ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// Dynamic shared memory a block may use without an opt-in: 48 KB minus the kernel's static
// `red[128]` doubles (dynamic + static must stay within 48 KB, or the launch fails).
constexpr int kHqqRed = 128;  // = the largest block hqq_threads picks
constexpr int kHqqMaxSmemBytes = 48 * 1024 - kHqqRed * int(sizeof(double));

// Threads per block for group size g; `smem` is false when [g][T+1] floats do not fit.
inline int hqq_threads(int64_t g, bool& smem) {
  for (int T = 128; T >= 32; T /= 2) {
    if (g * (T + 1) * 4 <= kHqqMaxSmemBytes) {
      smem = true;
      return T;
    }
  }
  smem = false;
  return 128;
}

__device__ __forceinline__ int64_t hq_index(const HqqParams& P, int64_t j, int64_t i) {
  return P.axis == 1 ? j * P.g + i : i * P.M + j;
}

template <class TW, bool kSmem>
__global__ void hqq_solve_kernel(const TW* __restrict__ W, HqqParams P, float* __restrict__ s_inv,
                                 float* __restrict__ scale, float* __restrict__ zero, float* __restrict__ zhist,
                                 double* __restrict__ errp, uint8_t* __restrict__ q, int* __restrict__ bad) {
  extern __shared__ float sm[];
  const int T = blockDim.x, tid = threadIdx.x, ld = T + 1;
  const int64_t g = P.g, M = P.M;
  const int64_t j0 = int64_t(blockIdx.x) * T;
  const int nl = int(M - j0 < T ? M - j0 : T);
  const int l = tid < nl ? tid : 0;  // threads past the last group recompute group j0 and store nothing
  const int64_t j = j0 + l;
  const bool owner = tid < nl;
  if (kSmem) {
    if (P.axis == 1) {  // the block's groups are contiguous: elements [j0*g, (j0+nl)*g)
      for (int64_t k = tid; k < int64_t(nl) * g; k += T) sm[(k % g) * ld + k / g] = hq_ld(W, j0 * g + k);
    } else {
      for (int64_t i = 0; i < g; ++i)
        if (tid < nl) sm[i * ld + tid] = hq_ld(W, i * M + j0 + tid);
    }
    __syncthreads();
  }
  auto w_at = [&](int64_t i) -> float { return kSmem ? sm[i * ld + l] : hq_ld(W, hq_index(P, j, i)); };

  float s, z, chk;
  hqq_init_lanes(w_at, g, P.qmax, P.wmax, s, z, chk);
  if (owner) {
    if (!(chk == chk)) atomicOr(bad, 1);
    s_inv[j] = s;
    scale[j] = __fdiv_rn(1.f, s);
  }
  const bool global = P.mode == HqqStop::Global && P.iters > 0;
  if (global && owner) zhist[j] = z;
  __shared__ double red[kHqqRed];
  float best = hqq_inf(), zbest = z;
  bool active = true;
  for (int it = 0; it < P.iters; ++it) {
    float zsum, esum;
    hqq_iterate_lanes(w_at, g, s, z, P.qmax, P.c[it], P.y, P.thr[it], P.l1 != 0, zsum, esum);
    const float zn = __fdiv_rn(zsum, float(g));
    if (P.mode == HqqStop::Global) {
      z = zn;
      if (owner) zhist[int64_t(it + 1) * M + j] = z;
      red[tid] = owner ? double(esum) : 0.0;
      __syncthreads();
      if (tid == 0) {  // group order, as the CPU sums a tile
        double acc = 0.0;
        for (int k = 0; k < nl; ++k) acc += red[k];
        errp[int64_t(blockIdx.x) * P.iters + it] = acc;
      }
      __syncthreads();
    } else if (P.mode == HqqStop::Group) {
      const float e = __fdiv_rn(esum, float(g));
      const bool imp = active && e < best;
      active = imp;
      if (imp) {
        best = e;
        zbest = z;
        z = zn;
      }
      if (!active) break;  // no block-wide sync follows in this mode
    } else {
      z = zn;
    }
  }
  if (global) return;
  if (P.mode == HqqStop::Group && !active) z = zbest;
  if (owner) zero[j] = z;
  if (P.axis == 0 || !kSmem) {
    if (owner)
      for (int64_t i = 0; i < g; ++i) q[hq_index(P, j, i)] = uint8_t(hqq_q(w_at(i), s, z, P.qmax));
  } else {  // stage through shared memory for coalesced byte stores
    __syncthreads();  // every thread is done reading the values (threads past nl read column 0)
    if (owner)
      for (int64_t i = 0; i < g; ++i) sm[i * ld + l] = hqq_q(sm[i * ld + l], s, z, P.qmax);  // own column only
    __syncthreads();
    for (int64_t k = tid; k < int64_t(nl) * g; k += T) q[j0 * g + k] = uint8_t(sm[(k % g) * ld + k / g]);
  }
}

// One block: E[it] = fp32(sum_b errp[b][it] / numel) (blocks in order), then the
// official rule; writes the number of zero updates to *n_out.
__global__ void hqq_decide_kernel(const double* __restrict__ errp, int64_t nblocks, int iters, double numel,
                                  float* __restrict__ E, int* __restrict__ n_out) {
  for (int it = threadIdx.x; it < iters; it += blockDim.x) {
    double acc = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) acc += errp[b * iters + it];
    E[it] = float(acc / numel);
  }
  __syncthreads();
  if (threadIdx.x == 0) *n_out = hqq_global_updates(E, iters);
}

// zero[j] = zhist[n][j]; q from it, one thread per element (coalesced).
template <class TW>
__global__ void hqq_final_kernel(const TW* __restrict__ W, HqqParams P, const float* __restrict__ s_inv,
                                 const float* __restrict__ zhist, const int* __restrict__ n_upd,
                                 float* __restrict__ zero, uint8_t* __restrict__ q, int64_t numel) {
  const int64_t zoff = int64_t(*n_upd) * P.M;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < numel; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t jg = P.axis == 1 ? k / P.g : k % P.M;
    const float z = zhist[zoff + jg];
    q[k] = uint8_t(hqq_q(hq_ld(W, k), s_inv[jg], z, P.qmax));
    if (k < P.M) zero[k] = zhist[zoff + k];
  }
}

// Explicit instantiations so the kernels-only build compiles every variant.
template __global__ void hqq_solve_kernel<float, true>(const float*, HqqParams, float*, float*, float*, float*, double*, uint8_t*, int*);
template __global__ void hqq_solve_kernel<float, false>(const float*, HqqParams, float*, float*, float*, float*, double*, uint8_t*, int*);
template __global__ void hqq_solve_kernel<__half, true>(const __half*, HqqParams, float*, float*, float*, float*, double*, uint8_t*, int*);
template __global__ void hqq_solve_kernel<__half, false>(const __half*, HqqParams, float*, float*, float*, float*, double*, uint8_t*, int*);
template __global__ void hqq_solve_kernel<__nv_bfloat16, true>(const __nv_bfloat16*, HqqParams, float*, float*, float*, float*, double*, uint8_t*, int*);
template __global__ void hqq_solve_kernel<__nv_bfloat16, false>(const __nv_bfloat16*, HqqParams, float*, float*, float*, float*, double*, uint8_t*, int*);
template __global__ void hqq_final_kernel<float>(const float*, HqqParams, const float*, const float*, const int*, float*, uint8_t*, int64_t);
template __global__ void hqq_final_kernel<__half>(const __half*, HqqParams, const float*, const float*, const int*, float*, uint8_t*, int64_t);
template __global__ void hqq_final_kernel<__nv_bfloat16>(const __nv_bfloat16*, HqqParams, const float*, const float*, const int*, float*, uint8_t*, int64_t);

}  // namespace cuda
}  // namespace qk

#ifndef QK_KERNELS_ONLY
// ------------------------------------------------------------------ torch glue
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>
#include <type_traits>

#include "../cpu/hqq_host.h"

namespace qk {
namespace cuda {
namespace {

template <class F>
void hqq_dispatch_w(const at::Tensor& w, F&& f) {
  switch (w.scalar_type()) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "quantkern.hqq_quantize: W must be float32, float16 or bfloat16, got ", w.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hqq_quantize_cuda(const at::Tensor& W_, int64_t bits,
                                                                 int64_t group_size, int64_t axis, double lp_norm,
                                                                 double beta, double kappa, int64_t iters,
                                                                 c10::string_view early_stop) {
  HqqHost H = hqq_prepare(W_, bits, group_size, axis, lp_norm, beta, kappa, iters,
                          std::string_view(early_stop.data(), early_stop.size()));
  TORCH_CHECK(W_.is_cuda(), "quantkern.hqq_quantize: W must be a CUDA tensor, got ", W_.device());
  c10::cuda::CUDAGuard guard(W_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = H.N, K = H.K;
  HqqParams P = H.P;
  const int64_t M = P.M;
  auto W = W_.contiguous();
  auto f32 = W.options().dtype(at::kFloat);
  auto q = at::empty({N, K}, W.options().dtype(at::kByte));
  auto scale = at::empty({N, K / group_size}, f32);
  auto zero = at::empty({N, K / group_size}, f32);
  if (M == 0) return {q, scale, zero};
  // c_i and the thresholds on the device (one small copy).
  std::vector<float> consts(H.c);
  consts.insert(consts.end(), H.thr.begin(), H.thr.end());
  consts.push_back(0.f);
  auto cdev = at::from_blob(consts.data(), {int64_t(consts.size())}, at::TensorOptions().dtype(at::kFloat))
                  .to(W.device(), /*non_blocking=*/false);
  P.c = cdev.data_ptr<float>();
  P.thr = P.c + P.iters;
  bool smem = false;
  const int T = hqq_threads(P.g, smem);
  const int64_t nblocks = (M + T - 1) / T;
  TORCH_CHECK(nblocks <= 0x7fffffffLL, "quantkern.hqq_quantize: too many groups for one launch (", M, ")");
  const size_t smem_bytes = smem ? size_t(P.g) * (T + 1) * sizeof(float) : 0;
  const bool global = P.mode == HqqStop::Global;
  auto s_inv = at::empty({M}, f32);
  auto bad = at::zeros({1}, W.options().dtype(at::kInt));
  at::Tensor zhist, errp;
  if (global) {
    zhist = at::empty({P.iters + 1, M}, f32);
    errp = at::empty({nblocks, P.iters}, W.options().dtype(at::kDouble));
  }
  float* zh = global ? zhist.data_ptr<float>() : nullptr;
  double* ep = global ? errp.data_ptr<double>() : nullptr;
  hqq_dispatch_w(W, [&](auto tag) {
    using TW = std::remove_pointer_t<decltype(tag)>;
    const TW* wp = static_cast<const TW*>(W.data_ptr());
    auto kern = smem ? &hqq_solve_kernel<TW, true> : &hqq_solve_kernel<TW, false>;
    kern<<<unsigned(nblocks), T, smem_bytes, stream>>>(wp, P, s_inv.data_ptr<float>(), scale.data_ptr<float>(),
                                                       zero.data_ptr<float>(), zh, ep, q.data_ptr<uint8_t>(),
                                                       bad.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (global) {
    auto E = at::empty({P.iters}, f32);
    auto n_upd = at::empty({1}, W.options().dtype(at::kInt));
    hqq_decide_kernel<<<1, 128, 0, stream>>>(ep, nblocks, P.iters, double(N) * double(K), E.data_ptr<float>(),
                                             n_upd.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = N * K;
    const int grid = int(std::min<int64_t>((numel + 255) / 256, 65535 * 8));
    hqq_dispatch_w(W, [&](auto tag) {
      using TW = std::remove_pointer_t<decltype(tag)>;
      hqq_final_kernel<TW><<<grid, 256, 0, stream>>>(static_cast<const TW*>(W.data_ptr()), P,
                                                     s_inv.data_ptr<float>(), zh, n_upd.data_ptr<int>(),
                                                     zero.data_ptr<float>(), q.data_ptr<uint8_t>(), numel);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  TORCH_CHECK_VALUE(bad.item<int>() == 0, "quantkern.hqq_quantize: W contains NaN or infinity, or a group with "
                    "max|W| * max(group_size, 2) > 2^127 (the fp32 solver would overflow: scale W down by a power of two)");
  return {q, scale, zero};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) { m.impl("hqq_quantize", &cuda::hqq_quantize_cuda); }

}  // namespace qk
#endif  // QK_KERNELS_ONLY
