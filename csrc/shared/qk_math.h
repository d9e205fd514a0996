// Torch-free scalar math shared by the CPU and CUDA kernels.
//
// Every per-element formula in csrc/shared/ is written once, as a template over
// a value type T, in terms of the small vocabulary below (add/sub/mul/div,
// comparisons returning a mask, select, rint). The scalar overloads here serve
// CUDA threads and the scalar CPU path; csrc/cpu/simd.h overloads the same names
// for AVX2 and AVX-512 vectors. So the CPU tests, which force every variant,
// check the exact arithmetic the GPU runs.
//
// Why explicit add/mul instead of operators: nvcc (and gcc with
// -ffp-contract=fast) would fuse `q * s + b` into one FMA, which rounds once and
// can differ from the reference's two roundings in the last bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QK_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU ISA variants include this header in translation units
// compiled for different instruction sets; inlining everywhere means no
// out-of-line copy compiled for AVX-512 can be picked by the linker for the
// scalar path.
#define QK_HD __attribute__((always_inline)) inline
#endif

namespace qk {

QK_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
QK_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
QK_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
QK_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round half to even, as torch.round.
QK_HD float rint(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return __builtin_rintf(a);
#endif
}
QK_HD float splat(float a) { return a; }
QK_HD bool lt(float a, float b) { return a < b; }
QK_HD bool le(float a, float b) { return a <= b; }
QK_HD bool gt(float a, float b) { return a > b; }
QK_HD bool ge(float a, float b) { return a >= b; }
QK_HD bool mand(bool a, bool b) { return a && b; }
QK_HD bool mor(bool a, bool b) { return a || b; }
QK_HD float select(bool m, float a, float b) { return m ? a : b; }

// clamp(v, lo, hi) that lets NaN through, as torch.clamp does (min/max
// instructions would silently replace a NaN by a bound).
template <class T>
QK_HD T clamp_nan(T v, T lo, T hi) {
  return select(lt(v, lo), lo, select(gt(v, hi), hi, v));
}

}  // namespace qk
