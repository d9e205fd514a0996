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
#include "packed_grad.h"

// The BLAS sgemm and MKL's per-thread thread count, as libtorch_cpu exports them in torch's MKL
// builds (x86). Weak: null elsewhere, and then packed_linear keeps to its own fp32 GEMM.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // C interface (lower case: Fortran's)
// MKL's packed-operand GEMM (CBLAS enums: ColMajor 102, NoTrans 111, Trans 112, BMatrix 162, Packed 151).
extern "C" size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
extern "C" void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                 const float* src, int ld, float* dest) __attribute__((weak));
extern "C" void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                                    const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));

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

// MKL on one thread for the calling thread while in scope (restored on exceptions too: a thread
// left at one MKL thread would run every later torch matmul single-threaded).
struct MklOneThread {
  int prev;
  MklOneThread() : prev(MKL_Set_Num_Threads_Local(1)) {}
  ~MklOneThread() { MKL_Set_Num_Threads_Local(prev); }
  MklOneThread(const MklOneThread&) = delete;
  MklOneThread& operator=(const MklOneThread&) = delete;
};

// The BLAS paths below need both symbols and 32-bit sizes.
bool blas_usable(std::initializer_list<int64_t> sizes) {
  if (!sgemm_ || !MKL_Set_Num_Threads_Local) return false;
  for (int64_t v : sizes)
    if (v >= (int64_t(1) << 31)) return false;  // sgemm_ takes 32-bit sizes
  return true;
}

// fp32 GEMM for larger M on fp32/fp16 x: dequantize tiles of rows to fp32 (our kernels,
// exact as the reference) and multiply each with MKL's sgemm, one thread per tile. The tiles
// are fixed by the shape and every MKL call runs on one thread (MKL_Set_Num_Threads_Local), so
// the output bits do not depend on the thread count: a multi-threaded sgemm splits its sums by
// thread count, and so does MKL called inside a parallel region without the local setting.
// Worker threads run no ATen ops (they would miss the caller's inference / fake-tensor modes).
//
// Tile sizes: up to `cap` of n, and at least 8 tiles where n allows (2 threads stay balanced).
int64_t blas_tile(int64_t n, int64_t cap) { return std::min(cap, std::max<int64_t>(32, (n + 127) / 128 * 16)); }

// The B operand shared by many tiles (column-major k x n, leading dimension ldb) packed once into
// MKL's layout (cblas_sgemm_pack) for products with m rows, instead of once per sgemm call
// (4096 x 11008, M = 32, 2 threads: 26 -> 16 ms). Packed on one MKL thread: the layout MKL picks
// follows its thread count. Undefined where torch's MKL lacks the packed API.
at::Tensor mkl_pack_b(const float* b, int64_t m, int64_t n, int64_t k, int64_t ldb, const at::TensorOptions& o) {
  if (!cblas_sgemm_pack || !cblas_sgemm_compute || !cblas_sgemm_pack_get_size) return {};
  MklOneThread one;
  auto dest = at::empty({int64_t(cblas_sgemm_pack_get_size(162, int(m), int(n), int(k)) / 4) + 1}, o);
  cblas_sgemm_pack(102, 162, 111, int(m), int(n), int(k), 1.f, b, int(ldb), dest.data_ptr<float>());
  return dest;
}

// One tile, column-major: C (m x n, ldc) = op(A) B + beta C, op(A) = A^T when trans_a (A is then
// k x m, lda), else A (m x k). B (k x n, ldb) comes packed from mkl_pack_b when `bk` is set, which
// needs the m it was packed for (MKL: compute takes pack's m, n, k); other tiles take plain sgemm.
void tile_sgemm(bool trans_a, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                int64_t ldb, const at::Tensor& bk, int64_t bk_m, float beta, float* c, int64_t ldc) {
  if (bk.defined() && m == bk_m) {
    cblas_sgemm_compute(102, trans_a ? 112 : 111, 151, int(m), int(n), int(k), a, int(lda), bk.data_ptr<float>(),
                        int(k), beta, c, int(ldc));
    return;
  }
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  const float one = 1.f;
  sgemm_(trans_a ? "T" : "N", "N", &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
}

void gemm_panels_mkl(const IsaTable& T, const PackedW& P, const at::Tensor& x, const at::Tensor& bias, at::Tensor& y) {
  const int64_t N = P.N, K = P.K, M = x.size(0);
  // Taller tiles for larger M (fewer passes over x); at small M, a tile that stays in L2. Where
  // N gives tiles of under 256 rows and M >= 512, x goes in chunks of 256 rows as well and the
  // tiles count them towards their 8 tasks, so they grow taller: a thin tile against all of x is
  // bound by reading x (2 threads, M = 2048: K x N = 1536 x 384 with tiles of 48 rows took 1.3x
  // fp32 F.linear's time, 1.06x in chunks; 384 x 1536 1.40x -> 1.01x). Wide layers keep one chunk
  // and x packed once (4096 x 11008, M = 512: chunks were 15% slower).
  const int64_t cap = M <= 64 ? 64 : M <= 512 ? 256 : 512;
  const int64_t mc = M >= 512 && blas_tile(N, cap) < 256 ? 256 : M, mt = (M + mc - 1) / mc;
  const int64_t rows = blas_tile(N * mt, cap), nt = (N + rows - 1) / rows;
  auto xf = x.to(at::kFloat).contiguous();
  auto yf = y.scalar_type() == at::kFloat ? y : at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  // every tile's B, packed once where x is one chunk shared by several tiles
  const at::Tensor xk = mt == 1 && N >= rows ? mkl_pack_b(xp, rows, M, K, K, xf.options()) : at::Tensor();
  at::parallel_for(0, nt * mt, 1, [&](int64_t t0, int64_t t1) {
    const size_t bytes = (size_t(std::min(rows, N)) * K * sizeof(float) + 63) / 64 * 64;  // aligned_alloc: a multiple
    std::unique_ptr<float, decltype(&std::free)> panel(static_cast<float*>(std::aligned_alloc(64, bytes)), &std::free);
    TORCH_CHECK(panel, "quantkern.packed_linear: out of memory for a ", rows, " x ", K, " fp32 tile");
    MklOneThread one;
    int64_t have = -1;  // the tile in `panel` (a thread's tasks run tile by tile, chunks inner)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t / mt * rows, nb = std::min(rows, N - n0), m0 = t % mt * mc, mb = std::min(mc, M - m0);
      if (have != t / mt) T.pk_dequant(P, n0, n0 + nb, Dt::F32, panel.get(), K);
      have = t / mt;
      // column-major view: y[m0:m0+mb, n0:n0+nb]^T (nb x mb, ld N) = tile (K x nb, ld K)^T * x^T (K x mb, ld K)
      tile_sgemm(true, nb, mb, K, panel.get(), K, xp + m0 * K, K, xk, rows, 0.f, yp + m0 * N + n0, N);
    }
  });
  if (bias.defined()) yf.add_(bias);
  if (!yf.is_same(y)) y.copy_(yf);
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
  at::Tensor bias;            // fp32, contiguous (the MKL path adds it as a tensor)
  std::vector<float> bias_f;  // a bf16 / fp16 bias in fp32, converted here: an ATen .to() cost ~1.8 us a call
  const float* bp = nullptr;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N, "quantkern.packed_linear: bias must have shape [", N,
                "], got ", bias_->sizes());
    const Dt bdt = dt_of(*bias_, "bias");
    TORCH_CHECK(bias_->device() == x_.device(), "quantkern.packed_linear: bias is on ", bias_->device(),
                " but x is on ", x_.device());
    auto bc = bias_->contiguous();
    if (bdt == Dt::F32) {
      bias = bc;
    } else {
      bias_f.resize(N);
      if (bdt == Dt::BF16) {  // exact widening
        const auto* b = bc.data_ptr<at::BFloat16>();
        for (int64_t i = 0; i < N; ++i) bias_f[i] = static_cast<float>(b[i]);
      } else {
        const auto* b = bc.data_ptr<at::Half>();
        for (int64_t i = 0; i < N; ++i) bias_f[i] = static_cast<float>(b[i]);
      }
      bias = at::from_blob(bias_f.data(), {N}, bc.options().dtype(at::kFloat));
    }
    bp = bias.data_ptr<float>();
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
  int path = T.pk_plan(P, xdt, M);
  // The bf16 GEMMs (3: AMX, 4: vdpbf16ps) treat denormal inputs and products as zero (DAZ / FTZ): a
  // row of bf16 x whose entries all lie below 2^-64 (bf16 reaches ~1e-38) would lose its output
  // there (test_packed_linear_tiny_inputs at M = 12: 2% error against F.linear's 0.2%). Such calls take
  // the fp32 paths (1: the LUT GEMV, 0: the fp32 GEMM), as the int8 / int16 GEMVs' groups do.
  if (path == 3 || path == 4) {
    const auto amax = x.abs().amax(1).to(at::kFloat);
    if (((amax > 0) & (amax < 0x1p-64f)).any().item<bool>()) path = M <= 16 ? 1 : 0;
  }
  if (path == 0 /* generic fp32 GEMM */ && M > 16 && blas_usable({M * K, M * N, N * K})) {
    gemm_panels_mkl(T, P, x, bias, y);
    return y.reshape(oshape);
  }
  const int64_t es = x.element_size();
  const int64_t mc = std::min<int64_t>(M, T.pk_mchunk(path));
  auto ws = at::empty({T.pk_ws_bytes(P, xdt, mc, path)}, x.options().dtype(at::kByte));
  void* wp = ws.data_ptr();
  // the kernels lay their workspace out in 64-byte aligned parts and read some with aligned loads
  // (the AVX2 int16 GEMM's x tiles); torch's CPU allocator aligns to 64
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(wp) % 64 == 0, "quantkern.packed_linear: workspace not 64-byte aligned");
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

// ------------------------------------------------------------ packed_linear_backward
// dX [R, K] fp32 = g [R, N] (fp32, contiguous) W: in chunks of rows of W fixed by K (dequantized
// in parallel, elementwise), each chunk's product split over tiles of dX fixed by the shape (256
// rows of dY x blas_tile columns, at least 8 tiles in all where the shape allows), one
// single-threaded sgemm per tile, so that the bits do not depend on the thread count (one
// multi-threaded sgemm splits its sums by thread count).
at::Tensor packed_grad_input_blas(const at::Tensor& g, const at::Tensor& qw_, const at::Tensor& s_,
                                  const at::Tensor& z_, int64_t bits, int64_t group_size, int64_t K) {
  auto qw = qw_.contiguous(), s = s_.contiguous(), z = z_.contiguous();
  const PackedW P = packed_view(qw, s, z, bits, group_size, K);
  const IsaTable& T = isa_table();
  const int64_t R = g.size(0), N = P.N;
  auto out = at::zeros({R, K}, g.options());
  const int64_t step = std::max<int64_t>(1, std::min(N, kGradChunkBytes / (4 * K)));
  auto panel = at::empty({step, K}, g.options());
  float* pp = panel.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const int64_t rt = 256, tr = (R + rt - 1) / rt, kt = std::min(K, blas_tile(K * tr, 512)), tk = (K + kt - 1) / kt;
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t nb = std::min(step, N - n0);
    at::parallel_for(0, nb, 16, [&](int64_t a, int64_t b) { T.pk_dequant(P, n0 + a, n0 + b, Dt::F32, pp + a * K, K); });
    std::vector<at::Tensor> gk(tr);  // each row tile of dY is the B of all its column tiles
    for (int64_t r = 0; r < tr; ++r)
      gk[r] = mkl_pack_b(gp + r * rt * N + n0, kt, std::min(rt, R - r * rt), nb, N, g.options());
    at::parallel_for(0, tr * tk, 1, [&](int64_t t0, int64_t t1) {
      MklOneThread one;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = t / tk, r0 = r * rt, k0 = t % tk * kt;
        // column-major view: dX^T[k0:k0+m, r0:r0+n] (ld K) += W^T[k0:k0+m, chunk] (ld K) g^T[chunk, r0:r0+n] (ld N)
        tile_sgemm(false, std::min(kt, K - k0), std::min(rt, R - r0), nb, pp + k0, K, gp + r0 * N + n0, N, gk[r], kt,
                   1.f, op + r0 * K + k0, K);
      }
    });
  }
  return out;
}

// Column sums of g [R, N] (fp32, contiguous) in double, columns split over threads and each
// column's rows added in order: the same bits for any thread count (ATen's sum splits the rows
// by thread count when the output is small, e.g. the bias gradient of a one-output head).
at::Tensor column_sums(const at::Tensor& g) {
  const int64_t R = g.size(0), N = g.size(1);
  auto out = at::empty({N}, g.options());
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(c1 - c0, 0.0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += gp[r * N + c];
    for (int64_t c = c0; c < c1; ++c) op[c] = float(acc[c - c0]);
  });
  return out;
}

// The op packed_linear_bias_backward: grad [..., N] summed over every leading dim, fp32 [N].
at::Tensor packed_linear_bias_backward_cpu(const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() >= 1, "quantkern.packed_linear_bias_backward: grad must have at least 1 dim");
  return column_sums(grad.reshape({rows_of(grad).expect_int(), grad.size(-1)}).to(at::kFloat).contiguous());
}

// dX = dY W (the op packed_linear_backward): the BLAS path, whose bits do not depend on the
// thread count (each call reaches at most 256 rows of dY and dX), or the composite form.
at::Tensor packed_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& qw, const at::Tensor& s,
                                      const at::Tensor& z, int64_t bits, int64_t group_size, int64_t K) {
  check_packed_backward(grad, qw, s, z, bits, group_size, K);
  const int64_t N = qw.size(0);
  if (!blas_usable({N * 256, K * 256})) return packed_grad_composite(grad, qw, s, z, bits, group_size, K);
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape.back() = K;
  auto g2 = grad.reshape({rows_of(grad).expect_int(), N}).to(at::kFloat).contiguous();
  return packed_grad_input_blas(g2, qw, s, z, bits, group_size, K).to(grad.scalar_type()).reshape(shape);
}

// ------------------------------------------------------------ autograd (every device)
// packed_linear's autograd lives here rather than in Python (torch.library.register_autograd):
// the Python wrapper runs on every call, no_grad included, and once a large weight has
// streamed through the caches its cold interpreter path cost ~40 us per call (4096x2048
// int4, 1 thread: 370 us vs 330 us under inference_mode). The _triton op keeps the Python
// version (quantkern/_registry.py). dX is the op packed_linear_backward, so torch.compile's
// backward graph runs its kernel, and create_graph=True differentiates it (its autograd,
// quantkern/_registry.py, is packed_linear itself).

at::Tensor packed_linear_below_autograd(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& s,
                                        const at::Tensor& z, int64_t bits, int64_t group_size, int64_t K,
                                        const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("quantkern::packed_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, int64_t, int64_t, const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, qw, s, z, bits, group_size, K, bias);
}

class PackedLinearFn : public torch::autograd::Function<PackedLinearFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qw,
                            const at::Tensor& s, const at::Tensor& z, int64_t bits, int64_t group_size, int64_t K,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({qw, s, z});
    ctx->saved_data["args"] = std::vector<int64_t>{bits, group_size, K, bias.has_value() && bias->defined()};
    return packed_linear_below_autograd(x, qw, s, z, bits, group_size, K, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const auto args = ctx->saved_data["args"].toIntVector();
    at::Tensor gx, gb;
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("quantkern::packed_linear_backward", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            int64_t, int64_t, int64_t)>();
    if (ctx->needs_input_grad(0)) gx = bwd.call(grad, saved[0], saved[1], saved[2], args[0], args[1], args[2]);
    // needs_input_grad counts tensor inputs only: x, qweight, scales, zeros, bias
    static auto bias_bwd = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("quantkern::packed_linear_bias_backward", "")
                               .typed<at::Tensor(const at::Tensor&)>();
    if (args[3] && ctx->needs_input_grad(4)) gb = bias_bwd.call(grad);
    // one entry per forward argument (ints included); none for the packed weight, scales, zeros
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), gb};
  }
};

at::Tensor packed_linear_autograd(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& s, const at::Tensor& z,
                                  int64_t bits, int64_t group_size, int64_t K, const std::optional<at::Tensor>& bias) {
  // Inference (no_grad, or no input that requires grad) skips the autograd Function: its context,
  // saved-tensor list and argument map cost ~1 us a call, a tenth of a small layer's M = 1 GEMV.
  // Every tensor input counts, as Function::apply counts them: the output of a call with scales
  // that require grad still requires grad (their gradient is None).
  // Forward-mode dual tensors keep the Function path, which refuses them (no jvp) rather than
  // dropping their tangent.
  const bool has_bias = bias.has_value() && bias->defined();
  const bool dual = x._fw_grad(0).defined() || s._fw_grad(0).defined() || z._fw_grad(0).defined() ||
                    (has_bias && bias->_fw_grad(0).defined());
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || qw.requires_grad() || s.requires_grad() ||
                                                   z.requires_grad() || (has_bias && bias->requires_grad()));
  if (!grad && !dual) return packed_linear_below_autograd(x, qw, s, z, bits, group_size, K, bias);
  return PackedLinearFn::apply(x, qw, s, z, bits, group_size, K, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
  m.impl("packed_linear_backward", &packed_linear_backward_cpu);
  m.impl("packed_linear_bias_backward", &packed_linear_bias_backward_cpu);
}

TORCH_LIBRARY_IMPL(quantkern, Autograd, m) { m.impl("packed_linear", &packed_linear_autograd); }

}  // namespace qk
