// c10 CUDA error checks for the CUDA emulator (tests/cuda_emu/emu.h).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                    \
  do {                                                                          \
    const cudaError_t qk_emu_err_ = (expr);                                     \
    TORCH_CHECK(qk_emu_err_ == cudaSuccess, "qk_emu: CUDA call failed: " #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
