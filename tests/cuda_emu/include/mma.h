// nvcuda::wmma for the CUDA emulator (tests/cuda_emu/emu.h): every lane of a warp holds the whole
// tile in fp32 and computes the whole product, in a fixed order (k ascending). The GPU splits the
// tile across lanes and sums in its own order, so wmma results are compared with a tolerance.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment;

template <int M, int N, int K, class T, class Layout>
struct fragment<matrix_a, M, N, K, T, Layout> {
  float v[M][K];
};
template <int M, int N, int K, class T, class Layout>
struct fragment<matrix_b, M, N, K, T, Layout> {
  float v[K][N];
};
template <int M, int N, int K, class T>
struct fragment<accumulator, M, N, K, T, void> {
  float v[M][N];
};

template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, T x) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) f.v[i][j] = float(x);
}

template <int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  constexpr bool row = std::is_same_v<L, row_major>;
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) f.v[i][k] = to_f(row ? p[i * ldm + k] : p[k * ldm + i]);
}

template <int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  constexpr bool row = std::is_same_v<L, row_major>;
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < N; ++j) f.v[k][j] = to_f(row ? p[k * ldm + j] : p[j * ldm + k]);
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float r[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < K; ++k) s += a.v[i][k] * b.v[k][j];  // products of 16-bit inputs are exact in fp32
      r[i][j] = s;
    }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) d.v[i][j] = r[i][j];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) p[layout == mem_row_major ? i * ldm + j : j * ldm + i] = f.v[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
