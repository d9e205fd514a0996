// CPU implementation of the packed-weight ops: pack, unpack, dequantize,
// packed_linear (format: csrc/shared/packing.h; spec: quantkern/reference/packing.py).
//
// The kernels are in packed_kernel.h, one build per instruction set; this file
// checks arguments, chooses the path (GEMV / GEMM / AMX), prepares x once per
// call and splits the rows of W over threads (each thread gets one contiguous
// range, so the weight streams from memory in order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"
#include "host_cache.h"
#include "isa.h"
#include "packed_checks.h"

namespace qk {
namespace {

at::Tensor pack_cpu(const at::Tensor& q_, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "quantkern.pack: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(q_.dim() == 2, "quantkern.pack: q must be 2-D [N, K], got shape ", q_.sizes());
  TORCH_CHECK(at::isIntegralType(q_.scalar_type(), /*includeBool=*/false),
              "quantkern.pack: q must have an integer dtype, got ", q_.scalar_type());
  const int64_t N = q_.size(0), K = q_.size(1);
  TORCH_CHECK(K > 0, "quantkern.pack: K (q.shape[1]) must be positive");
  if (q_.numel()) {
    auto mm = at::aminmax(q_);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < (int64_t(1) << bits), "quantkern.pack: q values must lie in [0, ", (1 << bits) - 1,
                "] for bits=", bits, "; got min ", lo, ", max ", hi);
  }
  auto q = q_.to(at::kByte).contiguous();
  const int64_t nb = (K + 31) / 32;
  auto out = at::zeros({N, nb * bits}, q.options().dtype(at::kInt));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  uint8_t* op = reinterpret_cast<uint8_t*>(out.data_ptr<int32_t>());
  const int64_t rb = nb * bits * 4;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) packed_set(op + n * rb, int(bits), nb, k / 32, int(k % 32), qp[n * K + k]);
  });
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& qw_, int64_t bits, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "quantkern.unpack: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(K > 0, "quantkern.unpack: in_features must be positive, got ", K);
  check_qweight("unpack", qw_, bits, K);
  auto qw = qw_.contiguous();
  const int64_t N = qw.size(0), nb = (K + 31) / 32, rb = nb * bits * 4;
  auto out = at::empty({N, K}, qw.options().dtype(at::kByte));
  const uint8_t* ip = reinterpret_cast<const uint8_t*>(qw.data_ptr<int32_t>());
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) op[n * K + k] = uint8_t(packed_q(ip + n * rb, int(bits), nb, k / 32, int(k % 32)));
  });
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& qw_, const at::Tensor& scales_, const at::Tensor& zeros_, int64_t bits,
                          int64_t group_size, int64_t K, std::optional<at::ScalarType> dtype) {
  check_packed("dequantize", qw_, scales_, zeros_, bits, group_size, K);
  auto qw = qw_.contiguous(), s = scales_.contiguous(), z = zeros_.contiguous();
  const at::ScalarType odt = dtype.value_or(s.scalar_type());
  const int64_t N = qw.size(0);
  auto out = at::empty({N, K}, s.options().dtype(odt));
  const Dt od = dt_of(out, "dtype");
  if (N == 0) return out;
  const PackedW P = packed_view(qw, s, z, bits, group_size, K);
  const IsaTable& T = isa_table();
  const int64_t es = out.element_size();
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { T.pk_dequant(P, n0, n1, od, op + n0 * K * es, K); });
  return out;
}

// fp32 GEMM for larger M on fp32/fp16 x: dequantize panels of rows to fp32 (our
// kernels, exact as the reference) and multiply each with MKL's sgemm. Only one
// panel (kPanelRows x K fp32) exists at a time.
void gemm_panels_mkl(const IsaTable& T, const PackedW& P, const at::Tensor& x, const at::Tensor& bias, at::Tensor& y) {
  const int64_t N = P.N, K = P.K;
  const int64_t rows = std::max<int64_t>(64, std::min<int64_t>(N, (int64_t(4) << 20) / (4 * K)) / 16 * 16);
  auto xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  auto panel = at::empty({std::min(rows, N), K}, x.options().dtype(at::kFloat));
  float* pp = panel.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nb = std::min(rows, N - n0);
    at::parallel_for(0, nb, 16, [&](int64_t a, int64_t b) {
      T.pk_dequant(P, n0 + a, n0 + b, Dt::F32, pp + a * K, K);
    });
    auto blk = at::mm(xf, panel.narrow(0, 0, nb).t());
    if (bias.defined()) blk.add_(bias.narrow(0, n0, nb));
    y.narrow(1, n0, nb).copy_(blk);
  }
}

at::Tensor packed_linear_cpu(const at::Tensor& x_, const at::Tensor& qw_, const at::Tensor& scales_,
                             const at::Tensor& zeros_, int64_t bits, int64_t group_size, int64_t K,
                             const std::optional<at::Tensor>& bias_) {
  check_packed("packed_linear", qw_, scales_, zeros_, bits, group_size, K);
  const Dt xdt = dt_of(x_, "x");
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == K, "quantkern.packed_linear: x must have shape [..., ", K,
              "] (in_features), got ", x_.sizes());
  TORCH_CHECK(x_.device() == qw_.device(), "quantkern.packed_linear: x is on ", x_.device(), " but the weight is on ",
              qw_.device());
  const int64_t N = qw_.size(0);
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
  const int64_t M = x.size(0);
  std::vector<int64_t> oshape(x_.sizes().begin(), x_.sizes().end());
  oshape.back() = N;
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.reshape(oshape);
  auto qw = qw_.contiguous(), s = scales_.contiguous(), z = zeros_.contiguous();
  const PackedW P = packed_view(qw, s, z, bits, group_size, K);
  const IsaTable& T = isa_table();
  const int path = T.pk_plan(P, xdt, M);
  if (path == 0 /* generic fp32 GEMM */ && M > 16) {
    gemm_panels_mkl(T, P, x, bias, y);
    return y.reshape(oshape);
  }
  const int64_t es = x.element_size();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t mc = std::min<int64_t>(M, T.pk_mchunk(path));
  auto ws = at::empty({T.pk_ws_bytes(P, xdt, mc, path)}, x.options().dtype(at::kByte));
  void* wp = ws.data_ptr();
  const int64_t grain = T.pk_n_grain(path);
  const int64_t units = (N + grain - 1) / grain;
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t m = std::min(mc, M - m0);
    const char* xp = static_cast<const char*>(x.data_ptr()) + m0 * K * es;
    char* yp = static_cast<char*>(y.data_ptr()) + m0 * N * es;
    at::parallel_for(0, T.pk_prep_units(path, m), 1,
                     [&](int64_t u0, int64_t u1) { T.pk_prep(P, xdt, xp, K, m, path, u0, u1, wp); });
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      T.pk_run(P, wp, m, path, u0 * grain, std::min(N, u1 * grain), xdt, yp, N, bp);
    });
  }
  return y.reshape(oshape);
}

// ------------------------------------------------------------ autograd (every device)
// packed_linear's autograd lives here rather than in Python (torch.library.register_autograd):
// the Python wrapper runs on every call, no_grad included, and once a large weight has
// streamed through the caches its cold interpreter path cost ~40 us per call (4096x2048
// int4, 1 thread: 370 us vs 330 us under inference_mode). The _triton op keeps the Python
// version (quantkern/_registry.py, packed_grad_input), which this backward mirrors.

// dX = dY W for y = x W^T, W dequantized to fp32 a block of rows at a time (at most
// kGradChunkBytes), never whole; fp32 accumulation, result in grad's dtype.
constexpr int64_t kGradChunkBytes = int64_t(16) << 20;

// Product of all but the last size of t (symbolic under torch.compile).
c10::SymInt rows_of(const at::Tensor& t) {
  c10::SymInt r = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) r = r * t.sym_size(d);
  return r;
}

at::Tensor packed_grad_input(const at::Tensor& grad, const at::Tensor& qw, const at::Tensor& s, const at::Tensor& z,
                             int64_t bits, int64_t group_size, int64_t K) {
  static auto deq = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("quantkern::dequantize", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                          int64_t, std::optional<at::ScalarType>)>();
  // Sizes of grad stay symbolic (sym_size / *_symint): under torch.compile(dynamic=True) a concrete
  // read of the row count would pin the batch size and recompile for every new one. N (the weight's
  // rows) is read concretely: the chunk loop needs it, and a weight does not change shape.
  const int64_t N = qw.size(0);
  auto g2 = grad.reshape_symint({rows_of(grad), c10::SymInt(N)});  // (not -1: N may be 0)
  auto out = at::zeros_symint({g2.sym_size(0), c10::SymInt(K)}, grad.options().dtype(at::kFloat));
  const int64_t step = std::max<int64_t>(1, kGradChunkBytes / (4 * K));
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t n1 = std::min(N, n0 + step);
    auto w = deq.call(qw.slice(0, n0, n1), s.slice(0, n0, n1), z.slice(0, n0, n1), bits, group_size, K, at::kFloat);
    out.addmm_(g2.slice(1, n0, n1).to(at::kFloat), w);
  }
  std::vector<c10::SymInt> shape(grad.sym_sizes().begin(), grad.sym_sizes().end());
  shape.back() = c10::SymInt(K);
  return out.to(grad.scalar_type()).reshape_symint(shape);
}

class PackedLinearFn : public torch::autograd::Function<PackedLinearFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qw,
                            const at::Tensor& s, const at::Tensor& z, int64_t bits, int64_t group_size, int64_t K,
                            const std::optional<at::Tensor>& bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("quantkern::packed_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           int64_t, int64_t, int64_t, const std::optional<at::Tensor>&)>();
    ctx->save_for_backward({qw, s, z});
    // one map entry per call (this runs under no_grad too): bits, group_size, K, has_bias
    ctx->saved_data["args"] = std::vector<int64_t>{bits, group_size, K, bias.has_value() && bias->defined()};
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, qw, s, z, bits, group_size, K, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const auto args = ctx->saved_data["args"].toIntVector();
    at::Tensor gx, gb;
    if (ctx->needs_input_grad(0)) gx = packed_grad_input(grad, saved[0], saved[1], saved[2], args[0], args[1], args[2]);
    // needs_input_grad counts tensor inputs only: x, qweight, scales, zeros, bias
    if (args[3] && ctx->needs_input_grad(4))
      gb = grad.reshape_symint({rows_of(grad), grad.sym_size(-1)}).to(at::kFloat).sum(0);
    // one entry per forward argument (ints included); none for the packed weight, scales, zeros
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), gb};
  }
};

at::Tensor packed_linear_autograd(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& s, const at::Tensor& z,
                                  int64_t bits, int64_t group_size, int64_t K, const std::optional<at::Tensor>& bias) {
  return PackedLinearFn::apply(x, qw, s, z, bits, group_size, K, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
}

TORCH_LIBRARY_IMPL(quantkern, Autograd, m) { m.impl("packed_linear", &packed_linear_autograd); }

}  // namespace qk
