// CUDA kernels of the packed-weight ops: pack, unpack, dequantize, packed_linear (and
// packed_linear_backward, the composite dX = dY W).
//
// They read the canonical format (csrc/shared/packing.h; spec with bit diagrams:
// quantkern/reference/packing.py), the same bytes as the CPU and Triton kernels:
// qweight int32 [N, nb * bits], 32-weight blocks along K; scales/zeros [N, G];
// w = (q - z) * s computed as a subtraction then a multiply (qk::sub / qk::mul:
// __fsub_rn / __fmul_rn, never contracted), exactly the reference's fp32 value.
//
// packed_linear:
//   M <= 4   GEMV: one warp per output row; lane l owns blocks l, l + 32, ...;
//            each lane reads its block's 4 * bits bytes with one vector load,
//            decodes 32 weights and accumulates x * w in fp32 for every row of x
//            (x staged in shared memory, K in chunks). Warp reduction at the end.
//   bf16/fp16, M > 4: tensor cores (WMMA m16n16k16, sm_80+): a 64 x 64 tile of y per
//            block; per K step of 32 the block dequantizes a [64 x 32] weight tile
//            to x's dtype in shared memory (rounded as W.to(dtype)), loads the x
//            tile, and 4 warps each update a 32 x 32 sub-tile; fp32 accumulators.
//   fp32, M > 4: the same tiling with SIMT fp32 FMAs (4 x 8 outputs per thread).
// The whole dequantized weight is never materialised.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../cpu/packed_checks.h"  // check_packed, packed_view: the CPU glue's argument checks
#include "../cpu/packed_grad.h"    // packed_linear_backward's checks and composite form
#include "io.cuh"
#include "../shared/packing.h"

namespace qk {
namespace {

// qweight as the decoders read it: contiguous and 16-byte aligned (the 4-bit / 2-bit decoders load
// uint4 / uint2 vectors; a contiguous view at an odd storage offset would fault), copied if not.
at::Tensor aligned_qweight(const at::Tensor& qw) {
  auto c = qw.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 ? c.clone() : c;
}

// The packed weight as the device sees it (PackedW holds host-side sizes too).
struct DevW {
  const uint8_t* qw;
  int64_t N, K, nb, row_bytes, gblk, G;
  int bits;
};

DevW dev_view(const PackedW& P) { return DevW{P.qw, P.N, P.K, P.nb, P.row_bytes, P.gblk, P.G, P.bits}; }

// 32 codes of block j of row n (row pointer), by bit width.
template <int BITS>
__device__ __forceinline__ void decode_block(const uint8_t* row, int64_t nb, int64_t j, int (&q)[32]) {
  if constexpr (BITS == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + 16 * j);  // 16-byte aligned: rows are 16 nb bytes
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int p = 0; p < 16; ++p) {
      const uint32_t b = (w[p >> 2] >> (8 * (p & 3))) & 0xFFu;
      q[p] = int(b & 15u);
      q[p + 16] = int(b >> 4);
    }
  } else {
    // 2 bits: rows are 8 nb bytes, so one 8-byte load; 3 bits: rows are 12 nb bytes, only 4-byte aligned
    uint32_t w[2];
    if constexpr (BITS == 2) {
      const uint2 v = *reinterpret_cast<const uint2*>(row + 8 * j);
      w[0] = v.x;
      w[1] = v.y;
    } else {
      w[0] = *reinterpret_cast<const uint32_t*>(row + 8 * j);
      w[1] = *reinterpret_cast<const uint32_t*>(row + 8 * j + 4);
    }
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      const uint32_t b = (w[p >> 2] >> (8 * (p & 3))) & 0xFFu;
#pragma unroll
      for (int f = 0; f < 4; ++f) q[8 * f + p] = int((b >> (2 * f)) & 3u);
    }
    if constexpr (BITS == 3) {
      const uint32_t h = *reinterpret_cast<const uint32_t*>(row + 8 * nb + 4 * j);
#pragma unroll
      for (int t = 0; t < 32; ++t) q[t] |= int(((h >> t) & 1u) << 2);
    }
  }
}

template <class M>
__device__ __forceinline__ float meta(const M* p, int64_t i) {
  return Io<M>::ld(p[i]);
}

// ------------------------------------------------------------------ pack / unpack / dequantize
__global__ void pack_kernel(const uint8_t* __restrict__ q, uint8_t* __restrict__ out, int64_t N, int64_t K, int64_t nb,
                            int bits) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // one (row, block) per thread
  if (i >= N * nb) return;
  const int64_t n = i / nb, j = i - n * nb;
  uint8_t* row = out + n * nb * bits * 4;
  for (int t = 0; t < 32; ++t) {
    const int64_t k = 32 * j + t;
    if (k < K) packed_set(row, bits, nb, j, t, q[n * K + k]);
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ qw, uint8_t* __restrict__ out, int64_t N, int64_t K,
                              int64_t nb, int bits) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * K) return;
  const int64_t n = i / K, k = i - n * K;
  out[i] = uint8_t(packed_q(qw + n * nb * bits * 4, bits, nb, k / 32, int(k % 32)));
}

template <class M, class O>
__global__ void dequantize_kernel(DevW W, const M* __restrict__ s, const M* __restrict__ z, O* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= W.N * W.K) return;
  const int64_t n = i / W.K, k = i - n * W.K;
  const int64_t j = k / 32, g = j / W.gblk;
  const int q = packed_q(W.qw + n * W.row_bytes, W.bits, W.nb, j, int(k % 32));
  const float w = mul(sub(float(q), meta(z, n * W.G + g)), meta(s, n * W.G + g));
  out[i] = Io<O>::st(w);
}

// ------------------------------------------------------------------ GEMV (M <= 4)
constexpr int kGemvWarps = 8;
constexpr int kGemvKChunk = 2048;  // x staged per chunk: MT * 2112 fp32 <= 33 KiB
// Lane l of a warp reads x[32 (l + 32 i) + t] for t = 0..31: unpadded, all 32 lanes hit one
// shared-memory bank (a 32-way conflict on every FMA; measured on an H200, 4096x11008 int4 M=1:
// 0.19 ms, 3% of the read roofline). One float of padding per 32 puts lane l's t-th read in
// bank (l + t) % 32: conflict-free.
constexpr int kGemvXsRow = kGemvKChunk + kGemvKChunk / 32;
__device__ __forceinline__ int gemv_xs_at(int k) { return k + (k >> 5); }

template <int BITS, int MT, class X, class M>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(DevW W, const X* __restrict__ x, const M* __restrict__ s, const M* __restrict__ z,
                const float* __restrict__ bias, X* __restrict__ y, int64_t Mrows) {
  __shared__ float xs[MT][kGemvXsRow];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + warp;
  const uint8_t* row = W.qw + (n < W.N ? n : 0) * W.row_bytes;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  for (int64_t k0 = 0; k0 < W.nb * 32; k0 += kGemvKChunk) {
    __syncthreads();
    for (int i = threadIdx.x; i < MT * kGemvKChunk; i += blockDim.x) {
      const int m = i / kGemvKChunk;
      const int64_t k = k0 + (i - m * kGemvKChunk);
      xs[m][gemv_xs_at(i - m * kGemvKChunk)] = (m < Mrows && k < W.K) ? Io<X>::ld(x[m * W.K + k]) : 0.f;
    }
    __syncthreads();
    if (n >= W.N) continue;
    const int64_t j1 = min(W.nb, (k0 + kGemvKChunk) / 32);
    for (int64_t j = k0 / 32 + lane; j < j1; j += 32) {
      int q[32];
      decode_block<BITS>(row, W.nb, j, q);
      const int64_t g = j / W.gblk;
      const float sc = meta(s, n * W.G + g), zc = meta(z, n * W.G + g);
      const float* xr = &xs[0][gemv_xs_at(int(32 * j - k0))];  // the block's 32 values stay contiguous
#pragma unroll
      for (int t = 0; t < 32; ++t) {
        const float w = mul(sub(float(q[t]), zc), sc);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = fmaf(xr[m * kGemvXsRow + t], w, acc[m]);
      }
    }
  }
  if (n >= W.N) return;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    if (lane == 0 && m < Mrows) y[m * W.N + n] = Io<X>::st(v + (bias ? bias[n] : 0.f));
  }
}

// ------------------------------------------------------------------ tiled GEMM (M > 4)
constexpr int kBM = 64, kBN = 64, kBK = 32, kGemmThreads = 128;

// Dequantize the [kBN x 32] weight tile of block j (rows n0..n0+63) into ws[row][t] (fp32 math, then T).
template <int BITS, class T, class M>
__device__ __forceinline__ void load_w_tile(const DevW& W, const M* __restrict__ s, const M* __restrict__ z,
                                            int64_t n0, int64_t j, T (*ws)[kBK + 8]) {
  // 128 threads: thread -> (row r = tid / 2, half h = tid % 2: weights 16h .. 16h + 15)
  const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
  const int64_t n = n0 + r;
  if (n < W.N && j < W.nb) {
    int q[32];
    decode_block<BITS>(W.qw + n * W.row_bytes, W.nb, j, q);
    const int64_t g = j / W.gblk;
    const float sc = meta(s, n * W.G + g), zc = meta(z, n * W.G + g);
    // q[] indexed with compile-time constants only (one branch per half): q[16 * h + t] with the
    // run-time h put the array in local memory (a 128-byte stack frame per thread, ptxas -v)
    if (h) {
#pragma unroll
      for (int t = 0; t < 16; ++t) ws[r][16 + t] = Io<T>::st(mul(sub(float(q[16 + t]), zc), sc));
    } else {
#pragma unroll
      for (int t = 0; t < 16; ++t) ws[r][t] = Io<T>::st(mul(sub(float(q[t]), zc), sc));
    }
  } else {
#pragma unroll
    for (int t = 0; t < 16; ++t) ws[r][16 * h + t] = Io<T>::st(0.f);
  }
}

template <class X>
__device__ __forceinline__ void load_x_tile(const X* __restrict__ x, int64_t Mrows, int64_t K, int64_t m0, int64_t k0,
                                            X (*xs)[kBK + 8]) {
  for (int i = threadIdx.x; i < kBM * kBK; i += kGemmThreads) {
    const int r = i / kBK, c = i % kBK;
    const int64_t m = m0 + r, k = k0 + c;
    xs[r][c] = (m < Mrows && k < K) ? x[m * K + k] : Io<X>::st(0.f);
  }
}

template <class X>
__device__ __forceinline__ void store_y(const float (*cs)[kBN + 4], const float* __restrict__ bias, X* __restrict__ y,
                                        int64_t Mrows, int64_t N, int64_t m0, int64_t n0) {
  for (int i = threadIdx.x; i < kBM * kBN; i += kGemmThreads) {
    const int r = i / kBN, c = i % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < Mrows && n < N) y[m * N + n] = Io<X>::st(cs[r][c] + (bias ? bias[n] : 0.f));
  }
}

// Tensor cores: T = __nv_bfloat16 or __half (x's dtype).
template <int BITS, class T, class M>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_wmma_kernel(DevW W, const T* __restrict__ x, const M* __restrict__ s, const M* __restrict__ z,
                     const float* __restrict__ bias, T* __restrict__ y, int64_t Mrows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) T xs[kBM][kBK + 8];
  __shared__ __align__(32) T ws[kBN][kBK + 8];
  __shared__ __align__(32) float cs[kBM][kBN + 4];
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;  // this warp's 32 x 32 sub-tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.f);
  for (int64_t j = 0; j < W.nb; ++j) {
    __syncthreads();
    load_x_tile<T>(x, Mrows, W.K, m0, 32 * j, xs);
    load_w_tile<BITS, T, M>(W, s, z, n0, j, ws);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];  // B = W^T: ws[n][k] is col-major [k][n]
#pragma unroll
      for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], &xs[wm + 16 * a][kk], kBK + 8);
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], &ws[wn + 16 * b][kk], kBK + 8);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      wmma::store_matrix_sync(&cs[wm + 16 * a][wn + 16 * b], acc[a][b], kBN + 4, wmma::mem_row_major);
  __syncthreads();
  store_y<T>(cs, bias, y, Mrows, W.N, m0, n0);
#endif
}

// fp32 x: SIMT FMAs, each thread 4 x 4 outputs of the 64 x 64 tile.
template <int BITS, class M>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_f32_kernel(DevW W, const float* __restrict__ x, const M* __restrict__ s, const M* __restrict__ z,
                    const float* __restrict__ bias, float* __restrict__ y, int64_t Mrows) {
  __shared__ float xs[kBM][kBK + 8];
  __shared__ float ws[kBN][kBK + 8];
  __shared__ float cs[kBM][kBN + 4];
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  // 128 threads -> 16 x 8 grid of 4 x 8 outputs
  const int tr = (threadIdx.x >> 3) * 4, tc = (threadIdx.x & 7) * 8;
  float acc[4][8];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) acc[a][b] = 0.f;
  for (int64_t j = 0; j < W.nb; ++j) {
    __syncthreads();
    load_x_tile<float>(x, Mrows, W.K, m0, 32 * j, xs);
    load_w_tile<BITS, float, M>(W, s, z, n0, j, ws);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float xv[4], wv[8];
#pragma unroll
      for (int a = 0; a < 4; ++a) xv[a] = xs[tr + a][k];
#pragma unroll
      for (int b = 0; b < 8; ++b) wv[b] = ws[tc + b][k];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b) acc[a][b] = fmaf(xv[a], wv[b], acc[a][b]);
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) cs[tr + a][tc + b] = acc[a][b];
  __syncthreads();
  store_y<float>(cs, bias, y, Mrows, W.N, m0, n0);
}

// ------------------------------------------------------------------ host glue
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor pack_cuda(const at::Tensor& q_, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "quantkern.pack: bits must be 2, 3 or 4, got ", bits);
  // The CPU op's checks, in its order and with its messages (pack_cpu).
  TORCH_CHECK(q_.dim() == 2, "quantkern.pack: q must be 2-D [N, K], got shape ", q_.sizes());
  TORCH_CHECK(at::isIntegralType(q_.scalar_type(), false), "quantkern.pack: q must have an integer dtype, got ",
              q_.scalar_type());
  TORCH_CHECK(q_.size(1) > 0, "quantkern.pack: K (q.shape[1]) must be positive");
  if (q_.numel()) {
    auto mm = at::aminmax(q_);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < (int64_t(1) << bits), "quantkern.pack: q values must lie in [0, ", (1 << bits) - 1,
                "] for bits=", bits, "; got min ", lo, ", max ", hi);
  }
  const c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.to(at::kByte).contiguous();
  const int64_t N = q.size(0), K = q.size(1), nb = cdiv(K, 32);
  auto out = at::zeros({N, nb * bits}, q.options().dtype(at::kInt));
  if (N) {
    pack_kernel<<<unsigned(cdiv(N * nb, 256)), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<uint8_t>(), reinterpret_cast<uint8_t*>(out.data_ptr<int32_t>()), N, K, nb, int(bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor unpack_cuda(const at::Tensor& qw_, int64_t bits, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "quantkern.unpack: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(K > 0, "quantkern.unpack: in_features must be positive, got ", K);
  check_qweight("unpack", qw_, bits, K);
  const c10::cuda::CUDAGuard guard(qw_.device());
  auto qw = aligned_qweight(qw_);
  const int64_t N = qw.size(0), nb = cdiv(K, 32);
  auto out = at::empty({N, K}, qw.options().dtype(at::kByte));
  if (N) {
    unpack_kernel<<<unsigned(cdiv(N * K, 256)), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint8_t*>(qw.data_ptr<int32_t>()), out.data_ptr<uint8_t>(), N, K, nb, int(bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

template <class F>
void dispatch_meta(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

at::Tensor dequantize_cuda(const at::Tensor& qw_, const at::Tensor& s_, const at::Tensor& z_, int64_t bits,
                           int64_t group_size, int64_t K, std::optional<at::ScalarType> dtype) {
  check_packed("dequantize", qw_, s_, z_, bits, group_size, K);
  const c10::cuda::CUDAGuard guard(qw_.device());
  auto qw = aligned_qweight(qw_), s = s_.contiguous(), z = z_.contiguous();
  auto out = at::empty({qw.size(0), K}, s.options().dtype(dtype.value_or(s.scalar_type())));
  dt_of(out, "dtype");
  if (out.numel() == 0) return out;
  const DevW W = dev_view(packed_view(qw, s, z, bits, group_size, K));
  const unsigned grid = unsigned(cdiv(out.numel(), 256));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_meta(s.scalar_type(), [&](auto m) {
    using M = decltype(m);
    const M* sp = reinterpret_cast<const M*>(s.data_ptr());
    const M* zp = reinterpret_cast<const M*>(z.data_ptr());
    dispatch_meta(out.scalar_type(), [&](auto o) {
      using O = decltype(o);
      dequantize_kernel<M, O><<<grid, 256, 0, stream>>>(W, sp, zp, reinterpret_cast<O*>(out.data_ptr()));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <int BITS, class X, class M>
void launch_linear(const DevW& W, const at::Tensor& x, const M* sp, const M* zp, const float* bp, at::Tensor& y,
                   int64_t Mrows, cudaStream_t stream) {
  const X* xp = reinterpret_cast<const X*>(x.data_ptr());
  X* yp = reinterpret_cast<X*>(y.data_ptr());
  if (Mrows <= 4) {
    const unsigned grid = unsigned(cdiv(W.N, kGemvWarps));
    switch (Mrows) {
      case 1: gemv_kernel<BITS, 1, X, M><<<grid, kGemvWarps * 32, 0, stream>>>(W, xp, sp, zp, bp, yp, Mrows); break;
      case 2: gemv_kernel<BITS, 2, X, M><<<grid, kGemvWarps * 32, 0, stream>>>(W, xp, sp, zp, bp, yp, Mrows); break;
      default: gemv_kernel<BITS, 4, X, M><<<grid, kGemvWarps * 32, 0, stream>>>(W, xp, sp, zp, bp, yp, Mrows); break;
    }
    return;
  }
  // grid.y holds at most 65535 row tiles: more rows of x run as several launches
  constexpr int64_t kRowsPerLaunch = int64_t(65535) * kBM;
  for (int64_t r0 = 0; r0 < Mrows; r0 += kRowsPerLaunch) {
    const int64_t mr = std::min(Mrows - r0, kRowsPerLaunch);
    const dim3 grid(unsigned(cdiv(W.N, kBN)), unsigned(cdiv(mr, kBM)));
    if constexpr (std::is_same_v<X, float>) {
      gemm_f32_kernel<BITS, M><<<grid, kGemmThreads, 0, stream>>>(W, xp + r0 * W.K, sp, zp, bp, yp + r0 * W.N, mr);
    } else {
      gemm_wmma_kernel<BITS, X, M><<<grid, kGemmThreads, 0, stream>>>(W, xp + r0 * W.K, sp, zp, bp, yp + r0 * W.N,
                                                                      mr);
    }
  }
}

at::Tensor packed_linear_cuda(const at::Tensor& x_, const at::Tensor& qw_, const at::Tensor& s_, const at::Tensor& z_,
                              int64_t bits, int64_t group_size, int64_t K, const std::optional<at::Tensor>& bias_) {
  check_packed("packed_linear", qw_, s_, z_, bits, group_size, K);
  dt_of(x_, "x");
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == K, "quantkern.packed_linear: x must have shape [..., ", K,
              "] (in_features), got ", x_.sizes());
  TORCH_CHECK(x_.device() == qw_.device(), "quantkern.packed_linear: x is on ", x_.device(), " but the weight is on ",
              qw_.device());
  const int64_t N = qw_.size(0);
  const c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N, "quantkern.packed_linear: bias must have shape [", N,
                "], got ", bias_->sizes());
    dt_of(*bias_, "bias");
    TORCH_CHECK(bias_->device() == x_.device(), "quantkern.packed_linear: bias is on ", bias_->device(),
                " but x is on ", x_.device());
    bias = bias_->to(at::kFloat).contiguous();
  }
  auto x = x_.reshape({-1, K}).contiguous();
  const int64_t Mrows = x.size(0);
  // The tensor-core GEMM is compiled for sm_80 and newer only (its body is empty below that):
  // on an older GPU, half / bf16 x with more than 4 rows goes through the fp32 kernels.
  int cc_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, x_.device().index()));
  if (Mrows > 4 && x.scalar_type() != at::kFloat && cc_major < 8) {
    return packed_linear_cuda(x_.to(at::kFloat), qw_, s_, z_, bits, group_size, K, bias_).to(x_.scalar_type());
  }
  std::vector<int64_t> oshape(x_.sizes().begin(), x_.sizes().end());
  oshape.back() = N;
  auto y = at::empty({Mrows, N}, x.options());
  if (Mrows == 0 || N == 0) return y.reshape(oshape);
  auto qw = aligned_qweight(qw_), s = s_.contiguous(), z = z_.contiguous();
  const DevW W = dev_view(packed_view(qw, s, z, bits, group_size, K));
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_meta(s.scalar_type(), [&](auto m) {
    using M = decltype(m);
    const M* sp = reinterpret_cast<const M*>(s.data_ptr());
    const M* zp = reinterpret_cast<const M*>(z.data_ptr());
    dispatch_meta(x.scalar_type(), [&](auto xv) {
      using X = decltype(xv);
      switch (bits) {
        case 4: launch_linear<4, X, M>(W, x, sp, zp, bp, y, Mrows, stream); break;
        case 3: launch_linear<3, X, M>(W, x, sp, zp, bp, y, Mrows, stream); break;
        default: launch_linear<2, X, M>(W, x, sp, zp, bp, y, Mrows, stream); break;
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.reshape(oshape);
}

// dX = dY W: the composite form (dequantize chunks of W, cuBLAS addmm; csrc/cpu/packed_grad.h).
at::Tensor packed_linear_backward_cuda(const at::Tensor& grad, const at::Tensor& qw, const at::Tensor& s,
                                       const at::Tensor& z, int64_t bits, int64_t group_size, int64_t K) {
  check_packed_backward(grad, qw, s, z, bits, group_size, K);
  const c10::cuda::CUDAGuard guard(grad.device());
  return packed_grad_composite(grad, qw, s, z, bits, group_size, K);
}

// The bias gradient: grad [..., N] summed over every leading dim, fp32 [N] (ATen's reduction).
at::Tensor packed_linear_bias_backward_cuda(const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() >= 1, "quantkern.packed_linear_bias_backward: grad must have at least 1 dim");
  const c10::cuda::CUDAGuard guard(grad.device());
  return grad.reshape({rows_of(grad).expect_int(), grad.size(-1)}).to(at::kFloat).sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("packed_linear_backward", &packed_linear_backward_cuda);
  m.impl("packed_linear_bias_backward", &packed_linear_bias_backward_cuda);
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("packed_linear", &packed_linear_cuda);
}

}  // namespace qk
