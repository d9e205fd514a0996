// Interleaved A/B timing of GEMV variants on hot weights: what the instruction stream costs,
// without the memory stream (a GEMV whose hot time equals its cold time is bound by its
// instructions).
//
//   hot_driver BITS lib1.so [lib2.so ...]     (built and run by HOTLOOP=1 bash run.sh)
//
// Each lib is kernel.cpp built against one copy of the headers and exports `run_hot`: x (M rows)
// is prepared once, then REPS GEMVs run over one K x N weight (default 16384 x 64: 256 KiB of
// int2 codes, in L2) with bf16 scales / zeros [N, K / GS]. The variants take turns, R rounds; per
// variant it prints the median in cycles per 256 weights and row of x at GHZ (default 3.66, this
// host's measured clock) and whether its output equals the first lib's. Env: K, N, GS (64), M
// (1), REPS (50), R (30), GHZ. One thread: pin it (taskset -c 1).
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

typedef void (*RunHot)(const uint8_t* qw, const void* s, const void* z, const uint16_t* x, uint16_t* y, int bits,
                       long K, long N, long gs, uint8_t* ws, int reps, int M);

static long env(const char* k, long d) { return getenv(k) ? atol(getenv(k)) : d; }

int main(int argc, char** argv) {
  if (argc < 3) return fprintf(stderr, "usage: %s BITS lib.so [lib.so ...]\n", argv[0]), 2;
  const int bits = atoi(argv[1]);
  const long K = env("K", 16384), N = env("N", 64), gs = env("GS", 64), M = env("M", 1), G = K / gs;
  const int reps = int(env("REPS", 50)), R = int(env("R", 30));
  const double ghz = getenv("GHZ") ? atof(getenv("GHZ")) : 3.66;
  std::vector<uint8_t> q(size_t(N) * (K / 32) * bits * 4);
  for (size_t i = 0; i < q.size(); ++i) q[i] = uint8_t(i * 2654435761u >> 13);
  std::vector<uint16_t> s(N * G), z(N * G);
  for (size_t i = 0; i < s.size(); ++i) {
    s[i] = uint16_t(0x3c00 + (i & 63));  // bf16 0.0078..
    z[i] = uint16_t(0x4000 + (i & 7));
  }
  std::vector<uint16_t> x(K * M);
  for (long k = 0; k < K * M; ++k) x[k] = uint16_t(0x3f80 + (k * 37 % 200));
  const int nv = argc - 2;
  std::vector<RunHot> f(nv);
  for (int v = 0; v < nv; ++v) {
    void* h = dlopen(argv[2 + v], RTLD_NOW | RTLD_LOCAL);
    if (!h) return fprintf(stderr, "%s\n", dlerror()), 1;
    f[v] = reinterpret_cast<RunHot>(dlsym(h, "run_hot"));
    if (!f[v]) return fprintf(stderr, "%s: no run_hot\n", argv[2 + v]), 1;
  }
  uint8_t* ws = static_cast<uint8_t*>(aligned_alloc(64, 8 << 20));
  std::vector<std::vector<uint16_t>> y(nv, std::vector<uint16_t>(N * M));
  std::vector<std::vector<double>> ts(nv);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < nv; ++v) {
      const auto t0 = std::chrono::steady_clock::now();
      f[v](q.data(), s.data(), z.data(), x.data(), y[v].data(), bits, K, N, gs, ws, reps, int(M));
      ts[v].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  for (int v = 0; v < nv; ++v) {
    std::vector<double> t = ts[v];
    std::sort(t.begin(), t.end());
    const double cyc = t[t.size() / 2] / reps * ghz * 1e9 / (double(N) * K * M / 256);
    printf("%-34s int%d M=%ld: %.2f cycles per 256 weights and row of x  %s\n", argv[2 + v], bits, M, cyc,
           memcmp(y[v].data(), y[0].data(), y[v].size() * 2) == 0 ? "same output as the first" : "other output");
  }
}
