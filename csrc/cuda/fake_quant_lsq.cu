// CUDA implementation of quantkern::fake_quant_lsq and its fused backward.
//
// All per-element arithmetic is qk::lsq_fake_quant / qk::lsq_grads from
// csrc/shared/fake_quant_lsq.h, the very code the CPU kernels and their tests
// run; this file only moves data: loads (fp32/fp16/bf16 -> fp32), stores
// (fp32 -> storage type, round to nearest even) and the reductions.
//
// x is viewed as [outer, C, inner]; element e uses parameter (e / inner) % C
// (csrc/shared/layout.h).
//
// Backward, deterministically and without atomics or host syncs:
//   pass 1 (one read of grad and x, one write of grad_x): every work unit (a
//     warp or a block, see below) owns a fixed set of (slot, channel) pairs and
//     writes their fp32 partial sums of d_scale and d_offset to a small
//     [nslots, C] buffer (at most ~1/32 of x). The work split depends only on
//     the shape and dtype, never on the GPU, so results are bitwise identical
//     run to run and across GPUs.
//   pass 2 (tiny): one warp per channel sums the slots in a fixed order (fp64),
//     multiplies by grad_scale and writes the fp32 result. When there is a
//     single slot, pass 1 writes the results directly and pass 2 is skipped.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../cpu/checks.h"  // lsq_layout, dt_of: the same argument checks as the CPU glue
#include "io.cuh"
#include "../shared/fake_quant_lsq.h"

namespace qk {
namespace {

constexpr int kThreads = 256;  // every kernel here: 8 warps per block
constexpr int kWarps = kThreads / 32;

// VEC elements of S in one 16-byte (or narrower, for VEC = 1) memory access.
template <class S, int VEC>
struct alignas(sizeof(S) * VEC) Pack {
  S v[VEC];
};
template <class S>
constexpr int vec_of() {
  return 16 / int(sizeof(S));  // 4 for fp32, 8 for fp16/bf16
}

// VEC consecutive elements at p + e: one vector access when kVecLd (p + e is
// 16-byte aligned), else VEC scalar accesses. The backward kernels take VEC
// (how elements are grouped, hence the order of the fp32 sums) from the shape
// alone and kVecLd from the pointers, so a misaligned view gets the very same
// bits as an aligned copy of it.
template <class S, int VEC, bool kVecLd = true>
__device__ __forceinline__ void load(const S* p, int64_t e, float (&out)[VEC]) {
  if constexpr (kVecLd) {
    Pack<S, VEC> pk = *reinterpret_cast<const Pack<S, VEC>*>(p + e);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = Io<S>::ld(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = Io<S>::ld(p[e + k]);
  }
}
template <class S, int VEC, bool kVecLd = true>
__device__ __forceinline__ void store(S* p, int64_t e, const float (&in)[VEC]) {
  if constexpr (kVecLd) {
    Pack<S, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = Io<S>::st(in[k]);
    *reinterpret_cast<Pack<S, VEC>*>(p + e) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[e + k] = Io<S>::st(in[k]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;  // every lane holds the same, fixed-order sum
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// ------------------------------------------------------------------ forward
// Grid-stride over VEC-element vectors. The parameter index of the current
// element is tracked incrementally as (r = e % inner, c = (e / inner) % C):
// 64-bit divisions once per thread, at the start, instead of per element.
struct Cursor {
  int64_t r, c;
  __device__ __forceinline__ void init(int64_t e, int64_t inner, int64_t C) {
    const int64_t q = e / inner;
    r = e - q * inner;
    c = q % C;
  }
  // Advance by a step with dr = step % inner and dc = (step / inner) % C.
  __device__ __forceinline__ void advance(int64_t dr, int64_t dc, int64_t inner, int64_t C) {
    r += dr;
    c += dc;
    if (r >= inner) {
      r -= inner;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

template <class S, int VEC>
__global__ void __launch_bounds__(kThreads) lsq_fwd_kernel(const S* __restrict__ x, S* __restrict__ y,
                                                            const float* __restrict__ s, const float* __restrict__ b,
                                                            int64_t numel, int64_t inner, int64_t C, float n, float p,
                                                            int64_t step_dr, int64_t step_dc) {
  const int64_t nvec = numel / VEC;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  Cursor cur;
  cur.init(tid * VEC, inner, C);
  for (int64_t v = tid; v < nvec; v += nthreads) {
    float xv[VEC], yv[VEC];
    load<S, VEC>(x, v * VEC, xv);
    Cursor k = cur;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float sc = __ldg(s + k.c), bc = __ldg(b + k.c);
      yv[j] = lsq_fake_quant<float>(xv[j], sc, bc, n, p);
      k.advance(1, 0, inner, C);
    }
    store<S, VEC>(y, v * VEC, yv);
    cur.advance(step_dr, step_dc, inner, C);
  }
  // The numel % VEC tail, one element per thread of the first block.
  const int64_t e = nvec * VEC + tid;
  if (e < numel) {
    Cursor k;
    k.init(e, inner, C);
    y[e] = Io<S>::st(lsq_fake_quant<float>(Io<S>::ld(x[e]), s[k.c], b[k.c], n, p));
  }
}

// ------------------------------------------------------------------ backward
// Where one element's grads go: grad_x is stored, ds/db are accumulated.
__device__ __forceinline__ void bwd_elem(float g, float x, float s, float b, float n, float p, float& gx,
                                         float& acc_s, float& acc_b) {
  float ds, db;
  lsq_grads<float>(g, x, s, b, n, p, 0.f, gx, ds, db);
  acc_s += ds;
  acc_b += db;
}

// Writes one (slot, channel) partial sum, or the final value when there is a
// single slot (direct: out = sum * grad_scale, as pass 2 would compute it).
__device__ __forceinline__ void put_partial(float* ps, float* pb, int64_t idx, float vs, float vb, bool direct,
                                            double gscale) {
  if (direct) {
    ps[idx] = float(double(vs) * gscale);
    pb[idx] = float(double(vb) * gscale);
  } else {
    ps[idx] = vs;
    pb[idx] = vb;
  }
}

// "Rows" kernel, for inner >= 32 (per-tensor, per-channel on a leading axis,
// per-group). The unit of work is one warp task: channel c, outer rows
// [ob*Ob, ob*Ob + Ob) and inner segment [seg*Sg, seg*Sg + Sg), at most 4096
// elements. Its lanes stride over the task's (row, vector) pairs, then a warp
// shuffle reduction yields the partial sum of slot (ob * nseg + seg), channel c.
// Consecutive tasks are consecutive channels, i.e. consecutive memory.
struct RowsPlan {
  int64_t outer, C, inner, Sg, nseg, Ob, nob, ntasks;
};

template <class S, int VEC, bool kVecLd>
__global__ void __launch_bounds__(kThreads) lsq_bwd_rows_kernel(const S* __restrict__ g, const S* __restrict__ x,
                                                                 S* __restrict__ gx, const float* __restrict__ s,
                                                                 const float* __restrict__ b, float* __restrict__ ps,
                                                                 float* __restrict__ pb, RowsPlan P, float n, float p,
                                                                 bool direct, double gscale) {
  const int lane = threadIdx.x & 31;
  const int64_t task = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (task >= P.ntasks) return;  // whole warps only: no block-level sync below
  const int64_t c = task % P.C;
  const int64_t seg = (task / P.C) % P.nseg;
  const int64_t ob = task / (P.C * P.nseg);
  const int64_t o0 = ob * P.Ob;
  const int rows = int(min(P.Ob, P.outer - o0));
  const int64_t i0 = seg * P.Sg;
  const int nv = int(min(P.Sg, P.inner - i0)) / VEC;  // the plan ensures VEC divides the segment
  const int total = rows * nv;                           // <= 4096 / VEC + rows
  const float sc = __ldg(s + c), bc = __ldg(b + c);
  float acc_s = 0.f, acc_b = 0.f;
  // (ro, v) = divmod(k, nv), advanced incrementally as k steps by 32.
  int ro = lane / max(nv, 1), v = lane - ro * max(nv, 1);
  for (int k = lane; k < total; k += 32) {
    const int64_t e = ((o0 + ro) * P.C + c) * P.inner + i0 + int64_t(v) * VEC;
    float gv[VEC], xv[VEC], gxv[VEC];
    load<S, VEC, kVecLd>(g, e, gv);
    load<S, VEC, kVecLd>(x, e, xv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) bwd_elem(gv[j], xv[j], sc, bc, n, p, gxv[j], acc_s, acc_b);
    store<S, VEC, kVecLd>(gx, e, gxv);
    v += 32;
    while (v >= nv) {
      v -= nv;
      ++ro;
    }
  }
  acc_s = warp_sum(acc_s);
  acc_b = warp_sum(acc_b);
  if (lane == 0) put_partial(ps, pb, (ob * P.nseg + seg) * P.C + c, acc_s, acc_b, direct, gscale);
}

// "Columns" kernel, for inner < 32 (per-channel on the last axes: inner == 1
// is x [*, C] with axis=-1). x is viewed as [outer, R = C * inner]; a block
// owns the tile of channels [cb*Cb, cb*Cb + Cb) (Wt = Cb * inner contiguous
// columns) and outer rows [ob*Ob, ob*Ob + Ob). TPR = Wt / VEC threads cover one
// row with coalesced vector loads and RPB = 256 / TPR rows are read at once;
// each thread sums its VEC columns down the rows, then the block combines the
// per-column sums of each channel in shared memory in a fixed order. Every
// (slot = ob, channel) pair belongs to exactly one block.
struct ColsPlan {
  int64_t outer, C, inner, Cb, ncb, Ob, nob;
};
constexpr int kColsMaxWidth = 64;  // threads per row at most (times VEC columns)

template <class S, int VEC, bool kVecLd>
__global__ void __launch_bounds__(kThreads) lsq_bwd_cols_kernel(const S* __restrict__ g, const S* __restrict__ x,
                                                                 S* __restrict__ gx, const float* __restrict__ s,
                                                                 const float* __restrict__ b, float* __restrict__ ps,
                                                                 float* __restrict__ pb, ColsPlan P, float n, float p,
                                                                 bool direct, double gscale) {
  __shared__ float sh_s[kThreads * VEC];
  __shared__ float sh_b[kThreads * VEC];
  const int64_t cb = blockIdx.x % P.ncb, ob = blockIdx.x / P.ncb;
  const int64_t c0 = cb * P.Cb, o0 = ob * P.Ob;
  const int inner = int(P.inner);
  const int Wt = int(P.Cb) * inner;                // tile width (columns) of a full tile
  const int cn = int(min(P.Cb, P.C - c0));         // channels in this tile
  const int wt = cn * inner;                       // columns in this tile (VEC divides it)
  const int tpr = Wt / VEC, rpb = kThreads / tpr;  // threads per row, rows per pass
  const int t = threadIdx.x;
  const int r = t / tpr, jv = (t - r * tpr) * VEC;  // first row, first column of this thread
  const int64_t R = P.C * P.inner;
  const int64_t o1 = min(P.outer, o0 + P.Ob);
  float acc_s[VEC], acc_b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc_s[j] = acc_b[j] = 0.f;
  if (r < rpb && jv < wt) {
    float sc[VEC], bc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = c0 + (jv + j) / inner;
      sc[j] = __ldg(s + c);
      bc[j] = __ldg(b + c);
    }
    for (int64_t o = o0 + r; o < o1; o += rpb) {
      const int64_t e = o * R + c0 * P.inner + jv;
      float gv[VEC], xv[VEC], gxv[VEC];
      load<S, VEC, kVecLd>(g, e, gv);
      load<S, VEC, kVecLd>(x, e, xv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) bwd_elem(gv[j], xv[j], sc[j], bc[j], n, p, gxv[j], acc_s[j], acc_b[j]);
      store<S, VEC, kVecLd>(gx, e, gxv);
    }
  }
  // Column sums, laid out [row of pass][column]; idle threads contribute zeros
  // to slots that are never read.
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sh_s[t * VEC + j] = acc_s[j];
    sh_b[t * VEC + j] = acc_b[j];
  }
  __syncthreads();
  for (int k = t; k < cn; k += kThreads) {
    float vs = 0.f, vb = 0.f;
    for (int rr = 0; rr < rpb; ++rr)
      for (int i = 0; i < inner; ++i) {
        const int idx = rr * Wt + k * inner + i;  // = (thread rr*tpr + col/VEC)*VEC + col%VEC
        vs += sh_s[idx];
        vb += sh_b[idx];
      }
    put_partial(ps, pb, ob * P.C + c0 + k, vs, vb, direct, gscale);
  }
}

// Pass 2: channel c = sum over slots k of partial[k, c], in a fixed order
// (lane-strided, then a fixed shuffle tree), in fp64; times grad_scale.
__global__ void __launch_bounds__(kThreads) lsq_reduce_kernel(const float* __restrict__ ps,
                                                               const float* __restrict__ pb, float* __restrict__ os,
                                                               float* __restrict__ obt, int64_t nslots, int64_t C,
                                                               double gscale) {
  const int lane = threadIdx.x & 31;
  const int64_t c = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (c >= C) return;
  double as = 0.0, ab = 0.0;
  for (int64_t k = lane; k < nslots; k += 32) {
    as += double(ps[k * C + c]);
    ab += double(pb[k * C + c]);
  }
  as = warp_sum(as);
  ab = warp_sum(ab);
  if (lane == 0) {
    os[c] = float(as * gscale);
    obt[c] = float(ab * gscale);
  }
}

// ------------------------------------------------------------------ host side
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int sm_count(int device) {
  // Cached per device: cudaDeviceGetAttribute is cheap but not free, and the
  // forward is called per training step. Only the forward's grid size uses it
  // (its results do not depend on the grid).
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

template <class F>
void dispatch_storage(Dt dt, F&& f) {
  switch (dt) {
    case Dt::F32: f(float{}); break;
    case Dt::F16: f(__half{}); break;
    case Dt::BF16: f(__nv_bfloat16{}); break;
  }
}

void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks > 0 && blocks < (int64_t(1) << 31), "quantkern: tensor too large for the CUDA ", what,
              " kernel (", blocks, " blocks)");
}

at::Tensor fake_quant_lsq_cuda(const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& offset_,
                               int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                               std::optional<int64_t> group_size, double /*grad_scale: backward only*/) {
  const Layout L = lsq_layout(x_, scale_, offset_, qmin, qmax, axis, group_size);
  TORCH_CHECK(x_.is_cuda(), "quantkern: x must be a CUDA tensor here, got ", x_.device());
  // Scale values are NOT checked here (the CPU kernel does): reading them would
  // synchronise the host with the stream on every call.
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto s = scale_.contiguous(), b = offset_.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  const float n = float(qmin), p = float(qmax);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(dt_of(x, "x"), [&](auto tag) {
    using S = decltype(tag);
    constexpr int V = vec_of<S>();
    const S* xp = static_cast<const S*>(x.data_ptr());
    S* yp = static_cast<S*>(y.data_ptr());
    const bool vec = aligned16(xp) && aligned16(yp);
    const int vw = vec ? V : 1;
    // Enough blocks to fill the GPU a few times over; each thread then strides.
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>(cdiv(numel / vw, kThreads), int64_t(sm_count(x.get_device())) * 8));
    // The cursor of a thread moves by the grid stride each iteration.
    const int64_t step = blocks * kThreads * vw;
    const int64_t dr = step % L.inner, dc = (step / L.inner) % L.C;
    const float *sp = s.data_ptr<float>(), *bp = b.data_ptr<float>();
    if (vec)
      lsq_fwd_kernel<S, V><<<unsigned(blocks), kThreads, 0, stream>>>(xp, yp, sp, bp, numel, L.inner, L.C, n, p, dr, dc);
    else
      lsq_fwd_kernel<S, 1><<<unsigned(blocks), kThreads, 0, stream>>>(xp, yp, sp, bp, numel, L.inner, L.C, n, p, dr, dc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_lsq_backward_cuda(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& offset_,
    int64_t qmin, int64_t qmax, std::optional<int64_t> axis, std::optional<int64_t> group_size,
    double grad_scale) {
  const Layout L = lsq_layout(x_, scale_, offset_, qmin, qmax, axis, group_size);
  TORCH_CHECK(x_.is_cuda(), "quantkern: x must be a CUDA tensor here, got ", x_.device());
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "quantkern: grad shape ", grad_.sizes(), " must equal x shape ", x_.sizes());
  TORCH_CHECK(grad_.scalar_type() == x_.scalar_type(), "quantkern: grad dtype ", grad_.scalar_type(),
              " must equal x dtype ", x_.scalar_type());
  TORCH_CHECK(grad_.device() == x_.device(), "quantkern: grad is on ", grad_.device(), " but x is on ", x_.device());
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), g = grad_.contiguous();
  auto s = scale_.contiguous(), b = offset_.contiguous();
  auto gx = at::empty(x.sizes(), x.options());
  // Every entry of the outputs (and of the partials) is written exactly once
  // by the kernels, so no memset is needed, except for an empty x.
  auto gs = at::empty(s.sizes(), s.options()), gb = at::empty(b.sizes(), b.options());
  const int64_t numel = x.numel();
  if (numel == 0) return {gx, gs.zero_(), gb.zero_()};
  const float n = float(qmin), p = float(qmax);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = L.C;
  dispatch_storage(dt_of(x, "x"), [&](auto tag) {
    using S = decltype(tag);
    constexpr int V = vec_of<S>();
    const S *gp = static_cast<const S*>(g.data_ptr()), *xp = static_cast<const S*>(x.data_ptr());
    S* gxp = static_cast<S*>(gx.data_ptr());
    const bool ptrs_aligned = aligned16(gp) && aligned16(xp) && aligned16(gxp);
    const float *sp = s.data_ptr<float>(), *bp = b.data_ptr<float>();
    at::Tensor part_s = gs, part_b = gb;
    int64_t nslots = 1;
    // The plans below depend only on the shape and dtype (VEC), so the
    // reduction order, and with it every bit of the result, is reproducible.
    if (L.inner >= 32) {
      RowsPlan P{};
      P.outer = L.outer;
      P.C = C;
      P.inner = L.inner;
      P.Sg = std::min<int64_t>(L.inner, 4096);
      P.nseg = cdiv(L.inner, P.Sg);
      P.Ob = std::clamp<int64_t>(4096 / P.Sg, 1, L.outer);
      P.nob = cdiv(L.outer, P.Ob);
      P.ntasks = P.nob * P.nseg * C;
      nslots = P.nob * P.nseg;
      if (nslots > 1) {
        part_s = at::empty({nslots, C}, s.options());
        part_b = at::empty({nslots, C}, s.options());
      }
      const int64_t blocks = cdiv(P.ntasks, kWarps);
      check_grid(blocks, "backward");
      // VEC (the grouping, hence the summation order) from the shape only; vector
      // loads only where the pointers allow them (same bits either way).
      const bool vec = L.inner % V == 0;  // then VEC divides every segment
      float *pps = part_s.data_ptr<float>(), *ppb = part_b.data_ptr<float>();
      if (vec && ptrs_aligned)
        lsq_bwd_rows_kernel<S, V, true><<<unsigned(blocks), kThreads, 0, stream>>>(gp, xp, gxp, sp, bp, pps, ppb, P,
                                                                                  n, p, nslots == 1, grad_scale);
      else if (vec)
        lsq_bwd_rows_kernel<S, V, false><<<unsigned(blocks), kThreads, 0, stream>>>(gp, xp, gxp, sp, bp, pps, ppb, P,
                                                                                   n, p, nslots == 1, grad_scale);
      else
        lsq_bwd_rows_kernel<S, 1, false><<<unsigned(blocks), kThreads, 0, stream>>>(gp, xp, gxp, sp, bp, pps, ppb, P,
                                                                                   n, p, nslots == 1, grad_scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t R = C * L.inner;
      const bool vec = R % V == 0;  // then every row and tile start is a multiple of VEC (shape only, as above)
      const int vw = vec ? V : 1;
      ColsPlan P{};
      P.outer = L.outer;
      P.C = C;
      P.inner = L.inner;
      // Cb channels per tile: Wt = Cb * inner <= kColsMaxWidth * vw columns, and
      // Wt a multiple of vw (Cb a multiple of vw / gcd(inner, vw)).
      int64_t m = vw;
      for (int64_t d = vw; d > 1; d /= 2)
        if (L.inner % d == 0) {
          m = vw / d;
          break;
        }
      int64_t Cb = (kColsMaxWidth * vw / L.inner) / m * m;
      P.Cb = std::clamp<int64_t>(Cb, 1, C);
      P.ncb = cdiv(C, P.Cb);
      const int64_t Wt = P.Cb * L.inner;
      // At least 64 rows per tile (partials <= 1/64 of x), ~16K elements.
      P.Ob = std::clamp<int64_t>(std::max<int64_t>(16384 / Wt, 64), 1, L.outer);
      P.nob = cdiv(L.outer, P.Ob);
      nslots = P.nob;
      if (nslots > 1) {
        part_s = at::empty({nslots, C}, s.options());
        part_b = at::empty({nslots, C}, s.options());
      }
      const int64_t blocks = P.nob * P.ncb;
      check_grid(blocks, "backward");
      float *pps = part_s.data_ptr<float>(), *ppb = part_b.data_ptr<float>();
      if (vec && ptrs_aligned)
        lsq_bwd_cols_kernel<S, V, true><<<unsigned(blocks), kThreads, 0, stream>>>(gp, xp, gxp, sp, bp, pps, ppb, P,
                                                                                  n, p, nslots == 1, grad_scale);
      else if (vec)
        lsq_bwd_cols_kernel<S, V, false><<<unsigned(blocks), kThreads, 0, stream>>>(gp, xp, gxp, sp, bp, pps, ppb, P,
                                                                                   n, p, nslots == 1, grad_scale);
      else
        lsq_bwd_cols_kernel<S, 1, false><<<unsigned(blocks), kThreads, 0, stream>>>(gp, xp, gxp, sp, bp, pps, ppb, P,
                                                                                   n, p, nslots == 1, grad_scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (nslots > 1) {
      const int64_t blocks = cdiv(C, kWarps);
      check_grid(blocks, "reduction");
      lsq_reduce_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(part_s.data_ptr<float>(), part_b.data_ptr<float>(),
                                                                  gs.data_ptr<float>(), gb.data_ptr<float>(), nslots,
                                                                  C, grad_scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gs, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("fake_quant_lsq", &fake_quant_lsq_cuda);
  m.impl("fake_quant_lsq_backward", &fake_quant_lsq_backward_cuda);
}

}  // namespace qk
