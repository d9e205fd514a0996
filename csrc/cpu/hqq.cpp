// CPU implementation of quantkern::hqq_quantize (the HQQ zero-point solver).
//
// Pass 1 (fused): every tile of groups is loaded once, initialised (min-max)
// and iterated `iters` times in L1 (csrc/cpu/hqq_kernel.h). In the modes
// "group" and "none" it writes q / scale / zero directly. In the official
// "global" mode the stop depends on the error of the whole tensor, so pass 1
// also records each tile's per-iteration error sums (fp64) and every group's
// zero after each iteration; the host then applies the official rule
// (first non-improving iteration of the fp32 mean error, whose update is
// kept) and pass 2 writes q from the chosen zeros (one more read of W).
//
// Determinism: tiles depend only on M; per-tile sums are reduced in tile
// order, so the results are bitwise identical for any thread count and for
// every ISA (each SIMD lane runs exactly the scalar sequence of one group).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "hqq_host.h"
#include "host_cache.h"
#include "isa.h"

namespace qk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> hqq_quantize_cpu(const at::Tensor& W_, int64_t bits, int64_t group_size,
                                                                int64_t axis, double lp_norm, double beta, double kappa,
                                                                int64_t iters, c10::string_view early_stop) {
  HqqHost H = hqq_prepare(W_, bits, group_size, axis, lp_norm, beta, kappa, iters,
                          std::string_view(early_stop.data(), early_stop.size()));
  HqqParams P = H.P;
  P.c = H.c.data();
  P.thr = H.thr.data();
  const int64_t N = H.N, K = H.K, M = P.M;
  auto W = W_.contiguous();
  const Dt dt = dt_of(W, "W");
  auto q = cpu_empty({N, K}, at::kByte);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto scale = at::empty({N, K / group_size}, f32);
  auto zero = at::empty({N, K / group_size}, f32);
  if (M == 0) return {q, scale, zero};
  auto s_inv = at::empty({M}, f32);
  const bool global = P.mode == HqqStop::Global;
  const int64_t TG = hqq_tile_groups(M), ntiles = (M + TG - 1) / TG;
  at::Tensor zhist, err;
  if (global) {
    zhist = at::empty({P.iters + 1, M}, f32);
    err = at::zeros({ntiles, P.iters}, at::TensorOptions().dtype(at::kDouble));
  }
  std::vector<int> bad(size_t(ntiles), 0);
  const void* wp = W.data_ptr();
  float *sp = s_inv.data_ptr<float>(), *scp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  float* zh = global ? zhist.data_ptr<float>() : nullptr;
  double* ep = global ? err.data_ptr<double>() : nullptr;
  uint8_t* qp = q.data_ptr<uint8_t>();
  const IsaTable& T = isa_table();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * TG, j1 = std::min(M, j0 + TG);
      T.hqq_solve(dt, wp, P, j0, j1, sp, scp, global ? nullptr : zp, zh, global ? ep + t * P.iters : nullptr,
                  global ? nullptr : qp, &bad[size_t(t)]);
    }
  });
  for (int64_t t = 0; t < ntiles; ++t)
    TORCH_CHECK_VALUE(!bad[size_t(t)], "quantkern.hqq_quantize: W contains NaN or infinity, or a group with max|W| * max(group_size, 2) > 2^127 "
                "(the fp32 solver would overflow: scale W down by a power of two) (in groups ", t * TG, "..",
                std::min(M, (t + 1) * TG) - 1, ")");
  if (global) {
    std::vector<float> E(size_t(P.iters));
    const double numel = double(N) * double(K);
    for (int it = 0; it < P.iters; ++it) {
      double s = 0;
      for (int64_t t = 0; t < ntiles; ++t) s += ep[t * P.iters + it];
      E[size_t(it)] = float(s / numel);
    }
    const int n = hqq_global_updates(E.data(), P.iters);
    std::memcpy(zp, zh + int64_t(n) * M, size_t(M) * sizeof(float));
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = t * TG, j1 = std::min(M, j0 + TG);
        T.hqq_write_q(dt, wp, P, j0, j1, sp, zp, qp);
      }
    });
  }
  return {q, scale, zero};
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CPU, m) { m.impl("hqq_quantize", &hqq_quantize_cpu); }

}  // namespace qk
