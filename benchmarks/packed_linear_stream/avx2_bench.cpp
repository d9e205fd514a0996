// Out-of-torch timing of the library's own AVX2 GEMV / GEMM (the isa_avx2 kernel table; the path
// pk_plan picks for bf16 x and M: the int16 GEMM from M = 12), for A/B runs of
// a change to csrc/cpu/packed_avx2*.h without torch's thread pool or allocator in the way
// (RESULTS_packed_linear.md, session 30). Build against a checkout (or a copy of its csrc/) with the
// library's own flags (setup.py): without -fwrapv GCC compiles the int16 GEMM's loop differently, and
// an inline-asm change to it measured 28% faster without these flags and 20% slower with them
// (session 35):
//
//   SRC=/path/to/checkout; g++ -g -fwrapv -DNDEBUG -O3 -std=c++20 -ffp-contract=off -fno-math-errno -fopenmp -I$SRC/csrc/cpu \
//     benchmarks/packed_linear_stream/avx2_bench.cpp $SRC/csrc/cpu/isa_avx2.cpp \
//     $SRC/csrc/cpu/cpu_features.cpp -o avx2_bench -pthread
//   MBF=1 taskset -c 1 ./avx2_bench BITS [M [N [REPS]]]
//
// One K x N weight (K from env K, default 4096; group size env GS, default 64) of random codes,
// scales 0.01 and zeros 7.3 (fp32, or bf16 with MBF=1), bf16 x [M, K]; 40 timed iterations of
// (prepare x, REPS calls over all N rows); prints the minimum in ms and output 0 against a double
// reference. N = 44032 at K = 4096 (101 MB with bf16 metadata) is out of cache; N = 256 with REPS =
// 160 is hot. T2=1 splits the rows in two halves on cores 0 and 1, as at::parallel_for would.
// Needs an AVX2 + FMA CPU.
#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "../shared/packing.h"
#include "isa.h"

namespace {
uint16_t to_bf16(float& v) {  // truncate v to bf16 in place, return its bits
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xFFFF0000u;
  std::memcpy(&v, &u, 4);
  return uint16_t(u >> 16);
}
void pin(int cpu) {
  cpu_set_t cs;
  CPU_ZERO(&cs);
  CPU_SET(cpu, &cs);
  pthread_setaffinity_np(pthread_self(), sizeof cs, &cs);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: avx2_bench BITS [M [N [REPS]]]\n");
    return 2;
  }
  const int bits = std::atoi(argv[1]), M = argc > 2 ? std::atoi(argv[2]) : 1;
  const int64_t N = argc > 3 ? std::atoll(argv[3]) : 11008, reps = argc > 4 ? std::atoll(argv[4]) : 1;
  const int64_t K = std::getenv("K") ? std::atoll(std::getenv("K")) : 4096;
  const int64_t gs = std::getenv("GS") ? std::atoll(std::getenv("GS")) : 64;
  if (bits < 2 || bits > 4 || K % 32 || K % gs || gs % 32 || M < 1 || N < 1) {
    std::fprintf(stderr, "avx2_bench: bits 2-4, K and GS multiples of 32, GS dividing K\n");
    return 2;
  }
  const int64_t G = K / gs;
  std::vector<uint8_t> qw(size_t(N * (K / 32) * bits * 4));
  for (auto& b : qw) b = uint8_t(std::rand());
  std::vector<float> sc(size_t(N * G), 0.01f), ze(size_t(N * G), 7.3f);
  std::vector<uint16_t> scb(sc.size()), zeb(ze.size());
  qk::PackedW P = qk::packed_w(qw.data(), sc.data(), ze.data(), qk::Dt::F32, N, K, bits, gs);
  if (std::getenv("MBF")) {
    for (size_t i = 0; i < sc.size(); ++i) {
      scb[i] = to_bf16(sc[i]);
      zeb[i] = to_bf16(ze[i]);
    }
    P.scales = scb.data();
    P.zeros = zeb.data();
    P.mdt = qk::Dt::BF16;
  }
  std::vector<float> x(size_t(M * K));
  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = std::rand() / float(RAND_MAX) - 0.5f;
    xb[i] = to_bf16(x[i]);
  }
  double ref0 = 0;  // output (0, 0) in double from the decoded codes
  for (int64_t k = 0; k < K; ++k) {
    const int q = qk::packed_q(qw.data(), bits, P.nb, k / 32, k % 32);
    ref0 += double(x[k]) * ((float(q) - ze[k / gs]) * sc[k / gs]);
  }
  std::vector<float> y(size_t(M * N));
  const qk::IsaTable& T = qk::isa_table_avx2();
  const int path = T.pk_plan(P, qk::Dt::BF16, M);
  // 64-byte aligned, as torch's allocator gives the op (the GEMM's x tiles are read with aligned loads)
  std::vector<uint8_t> ws_buf(size_t(T.pk_ws_bytes(P, qk::Dt::BF16, M, path)) + 64);
  uint8_t* const ws = ws_buf.data() + (64 - reinterpret_cast<uintptr_t>(ws_buf.data()) % 64) % 64;
  const bool two = std::getenv("T2") != nullptr;
  if (two) pin(1);
  const int64_t half = (N / 2 + 15) / 16 * 16;
  auto rows = [&](int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < reps; ++r) T.pk_run(P, ws, M, path, n0, n1, qk::Dt::F32, y.data(), N, nullptr);
  };
  std::vector<double> ts;
  for (int it = 0; it < 40; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    T.pk_prep(P, qk::Dt::BF16, xb.data(), K, M, path, 0, M, ws);
    if (two) {
      std::thread th([&] {
        pin(0);
        rows(std::min(half, N), N);
      });
      rows(0, std::min(half, N));
      th.join();
    } else {
      rows(0, N);
    }
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("bits %d M %d N %lld K %lld g%lld path %d: %.3f ms  y[0] %g  reference %g\n", bits, M, (long long)N,
              (long long)K, (long long)gs, path, *std::min_element(ts.begin(), ts.end()) * 1e3, y[0], ref0);
  return 0;
}
