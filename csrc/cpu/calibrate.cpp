// CPU kernels of the histogram calibrators (csrc/shared/calibrate.h):
//
// calib_histogram: channels [C, M] are binned into int64 pos / neg rows in
//   place. Many channels: one task per channel. Few channels (per tensor):
//   each channel is cut into slices with a private histogram each, summed
//   in slice order afterwards (integer counts: deterministic for any thread
//   count).
// calib_search: per channel, the extended bins and prefix sums are built
//   once (O(bins)), every candidate is evaluated independently (tasks over
//   candidates when there are few channels, over channels otherwise), and
//   calib_pick chooses. The objective of a candidate does not depend on the
//   partition, so the result is the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../shared/calibrate.h"
#include "calibrate_checks.h"

namespace qk {
namespace {

// Two phases per chunk: bins and signs of `len` values (branch-free, vectorisable),
// then the increments (a table of the two rows instead of a branch on the sign,
// which would mispredict on half the values).
template <class T>
void hist_span(const T* x, int64_t len, float nf, float R, int64_t n, int64_t* pos, int64_t* neg, bool& bad) {
  constexpr int kChunk = 1024;
  int32_t bin[kChunk];
  uint8_t sgn[kChunk];
  int64_t* rows[2] = {pos, neg};
  const float top = float(n - 1);
  for (int64_t m0 = 0; m0 < len; m0 += kChunk) {
    const int cnt = int(std::min<int64_t>(kChunk, len - m0));
    int nbad = 0;
    for (int k = 0; k < cnt; ++k) {
      const float v = float(x[m0 + k]);
      const float t = calib_ratio_fast(std::fabs(v), nf, R);
      nbad += calib_bad(t);
      bin[k] = calib_bin(t, top);
      sgn[k] = v < 0;
    }
    if (nbad) {  // NaN / inf in x, or a finite |x| * n beyond fp32: redo the chunk exactly
      for (int k = 0; k < cnt; ++k) {
        const float t = calib_ratio(std::fabs(float(x[m0 + k])), nf, R);
        if (calib_bad(t)) {
          bad = true;
          return;
        }
        bin[k] = calib_bin(t, top);
      }
    }
    for (int k = 0; k < cnt; ++k) rows[sgn[k]][bin[k]] += 1;
  }
}

template <class T>
bool hist_channels(const at::Tensor& x, at::Tensor& pos, at::Tensor& neg, const float* R, const int64_t* n) {
  const int64_t C = x.size(0), M = x.size(1), B = pos.size(1);
  const T* xp = x.data_ptr<T>();
  int64_t *pp = pos.data_ptr<int64_t>(), *np = neg.data_ptr<int64_t>();
  std::atomic<bool> bad{false};
  const int64_t nth = at::get_num_threads();
  if (C >= 2 * nth || M < 65536) {
    at::parallel_for(0, C, std::max<int64_t>(1, 65536 / std::max<int64_t>(M, 1)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        if (!(R[c] > 0) || n[c] <= 0) continue;
        bool b = false;
        hist_span(xp + c * M, M, float(n[c]), R[c], n[c], pp + c * B, np + c * B, b);
        if (b) bad = true;
      }
    });
    return bad;
  }
  // few long channels: slices with private histograms
  const int64_t S = std::min<int64_t>(4 * nth, (M + 65535) / 65536), len = (M + S - 1) / S;
  std::vector<int64_t> priv(size_t(S) * 2 * size_t(B));
  for (int64_t c = 0; c < C; ++c) {
    if (!(R[c] > 0) || n[c] <= 0) continue;
    std::fill(priv.begin(), priv.end(), 0);
    at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t m0 = s * len, m1 = std::min(M, m0 + len);
        int64_t* hp = priv.data() + s * 2 * B;
        bool b = false;
        if (m0 < m1) hist_span(xp + c * M + m0, m1 - m0, float(n[c]), R[c], n[c], hp, hp + B, b);
        if (b) bad = true;
      }
    });
    for (int64_t s = 0; s < S; ++s) {
      const int64_t* hp = priv.data() + s * 2 * B;
      for (int64_t k = 0; k < B; ++k) {
        pp[c * B + k] += hp[k];
        np[c * B + k] += hp[B + k];
      }
    }
  }
  return bad;
}

void calib_histogram_cpu(const at::Tensor& x_, at::Tensor pos, at::Tensor neg, const at::Tensor& R_,
                         const at::Tensor& n_) {
  calib_histogram_check(x_, pos, neg, R_, n_);
  auto x = x_.contiguous();
  auto R = R_.contiguous();
  auto n = n_.contiguous();
  const float* Rp = R.data_ptr<float>();
  const int64_t* np = n.data_ptr<int64_t>();
  bool bad;
  switch (x.scalar_type()) {
    case at::kFloat: bad = hist_channels<float>(x, pos, neg, Rp, np); break;
    case at::kHalf: bad = hist_channels<c10::Half>(x, pos, neg, Rp, np); break;
    default: bad = hist_channels<c10::BFloat16>(x, pos, neg, Rp, np); break;
  }
  TORCH_CHECK(!bad, "quantkern.calib_histogram: x contains NaN or infinity");
}

std::tuple<at::Tensor, at::Tensor> calib_search_cpu(const at::Tensor& pos_, const at::Tensor& neg_,
                                                    const at::Tensor& width_, const at::Tensor& n_,
                                                    c10::string_view method, int64_t num_bits, bool is_unsigned,
                                                    bool symmetric, int64_t stride, int64_t start_bin) {
  const int meth = calib_search_check(pos_, neg_, width_, n_, method, num_bits, is_unsigned, symmetric, stride,
                                      start_bin);
  auto pos = pos_.contiguous(), neg = neg_.contiguous(), width = width_.contiguous(), n = n_.contiguous();
  const int64_t C = pos.size(0), B = pos.size(1);
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto amin = at::zeros({C}, f64), amax = at::zeros({C}, f64);
  const int64_t *pp = pos.data_ptr<int64_t>(), *ngp = neg.data_ptr<int64_t>(), *nn = n.data_ptr<int64_t>();
  const double* wp = width.data_ptr<double>();
  double *lo = amin.data_ptr<double>(), *hi = amax.data_ptr<double>();
  const int64_t L = symmetric ? B : 2 * (B + stride);
  const int64_t Imax = symmetric ? B + 1 : (B / stride + 2) * (B / stride + 2);
  auto one = [&](int64_t c, std::vector<double>& buf) {
    if (!(wp[c] > 0)) return;  // no data yet: (0, 0)
    double *ext = buf.data(), *cb = ext + L, *cz = cb + L + 1, *cbl = cz + L + 1, *obj = cbl + L + 1;
    const CalibChan ch = calib_build(pp + c * B, ngp + c * B, nn[c], wp[c], symmetric, meth, stride, start_bin, ext,
                                     cb, cz, cbl);
    at::parallel_for(0, ch.ncand, 16, [&](int64_t t0, int64_t t1) {  // serial inside a per-channel task
      for (int64_t t = t0; t < t1; ++t)
        obj[t] = calib_eval(ext, cb, cz, cbl, ch, symmetric, meth, int(num_bits), is_unsigned, stride, start_bin, t);
    });
    const int64_t t = calib_pick(obj, ch, symmetric, meth, stride, start_bin);
    calib_result(ch, symmetric, meth, is_unsigned, nn[c], stride, start_bin, t, lo[c], hi[c]);
  };
  const size_t need = size_t(4 * L + 3 + Imax);
  if (C >= 2 * at::get_num_threads()) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> buf(need);
      for (int64_t c = c0; c < c1; ++c) one(c, buf);
    });
  } else {
    std::vector<double> buf(need);
    for (int64_t c = 0; c < C; ++c) one(c, buf);
  }
  return {amin, amax};
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("calib_histogram", &calib_histogram_cpu);
  m.impl("calib_search", &calib_search_cpu);
}

}  // namespace qk
