// c10::cuda device guards for the CUDA emulator (tests/cuda_emu/emu.h): nothing to switch.
#pragma once

#include "CUDAException.h"
#include "CUDAStream.h"

namespace c10::cuda {
struct CUDAGuard {
  template <class D>
  explicit CUDAGuard(const D&) {}
};
struct OptionalCUDAGuard {
  template <class D>
  explicit OptionalCUDAGuard(const D&) {}
};
}  // namespace c10::cuda
