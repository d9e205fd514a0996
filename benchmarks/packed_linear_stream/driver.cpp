// Interleaved A/B timing of GEMV variants on cold weights, outside torch.
//
//   driver BITS lib1.so [lib2.so ...]
//
// Each lib exports `run` (kernel.cpp or stream.cpp). One 4096x11008 (K x N) weight with
// bf16 scales / zeros [N, K/64] is copied until the copies fill 2 GiB (HOT=1: one copy);
// every call takes the next copy, and the variants take turns, so bandwidth drift on this
// shared VM hits them alike. Prints the median and 25th percentile per variant, the GB/s of
// the weight bytes (packed + scales + zeros), and whether its output equals the first lib's
// (meaningful between kernel builds only). Env: R rounds (40), T threads (1 or 2; with 2
// each thread takes one contiguous half of the rows), K, N, HOT.
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

typedef void (*RunF)(const uint8_t* qw, const void* s, const void* z, const uint16_t* x, uint16_t* y, int bits,
                     long K, long N, long gs, uint8_t* ws);

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static long env(const char* k, long d) { return getenv(k) ? atol(getenv(k)) : d; }

int main(int argc, char** argv) {
  if (argc < 3) return fprintf(stderr, "usage: %s BITS lib.so [lib.so ...]\n", argv[0]), 2;
  const int bits = atoi(argv[1]);
  const long K = env("K", 4096), N = env("N", 11008), gs = 64, G = K / gs;
  const long row_bytes = K / 32 * bits * 4;
  const size_t qb = N * row_bytes, mb = N * G * 2, one = (qb + 2 * mb + 4095) / 4096 * 4096;
  const int copies = getenv("HOT") ? 1 : int((2ull << 30) / one);
  uint8_t* buf = static_cast<uint8_t*>(aligned_alloc(4096, size_t(copies) * one));
  for (size_t i = 0; i < qb; ++i) buf[i] = uint8_t(i * 2654435761u >> 13);
  uint16_t* meta = reinterpret_cast<uint16_t*>(buf + qb);
  for (size_t i = 0; i < 2 * size_t(N) * G; ++i) meta[i] = uint16_t(0x3c00 + (i & 63));  // bf16 0.0078..
  for (int c = 1; c < copies; ++c) memcpy(buf + size_t(c) * one, buf, one);
  std::vector<uint16_t> x(K);
  for (long k = 0; k < K; ++k) x[k] = uint16_t(0x3f80 + (k * 37 % 200));

  const int nv = argc - 2, T = int(env("T", 1)), R = int(env("R", 40));
  std::vector<RunF> f(nv);
  for (int v = 0; v < nv; ++v) {
    void* h = dlopen(argv[2 + v], RTLD_NOW | RTLD_LOCAL);
    if (!h) return fprintf(stderr, "%s\n", dlerror()), 1;
    f[v] = reinterpret_cast<RunF>(dlsym(h, "run"));
  }
  uint8_t* ws[2] = {static_cast<uint8_t*>(aligned_alloc(64, 1 << 20)), static_cast<uint8_t*>(aligned_alloc(64, 1 << 20))};
  std::vector<std::vector<uint16_t>> y(nv, std::vector<uint16_t>(N));
  std::vector<std::vector<double>> ts(nv);
  long it = 0;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < nv; ++v) {
      const uint8_t* b = buf + size_t(it++ % copies) * one;
      const double t0 = now();
      if (T == 1) {
        f[v](b, b + qb, b + qb + mb, x.data(), y[v].data(), bits, K, N, gs, ws[0]);
      } else {
#pragma omp parallel num_threads(2)
        {
          const int t = omp_get_thread_num();
          const long h = N / 2, n0 = t * h;
          f[v](b + n0 * row_bytes, b + qb + n0 * G * 2, b + qb + mb + n0 * G * 2, x.data(), y[v].data() + n0, bits,
               K, t ? N - h : h, gs, ws[t]);
        }
      }
      ts[v].push_back(now() - t0);
    }
  for (int v = 0; v < nv; ++v) {
    std::vector<double> t = ts[v];
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    const bool same = memcmp(y[v].data(), y[0].data(), N * 2) == 0;
    printf("%-34s int%d: %.3f ms (p25 %.3f)  %5.2f GB/s  %s\n", argv[2 + v], bits, med * 1e3, t[t.size() / 4] * 1e3,
           double(qb + 2 * mb) / med / 1e9, same ? "same output as the first" : "other output");
  }
}
