// The CUDA runtime calls the host glue makes, for the CUDA emulator (emu.h). The device the
// emulator pretends to be: QK_EMU_SMS multiprocessors (default 4, so grid-stride loops and
// multi-block reductions take several rounds on small test inputs) and compute capability
// QK_EMU_CC (default 8: the tensor-core paths; 7 takes the sm_70 fallbacks).
#include <cuda_runtime.h>

#include <cstdlib>

extern "C" cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  auto env = [](const char* name, int dflt) {
    const char* e = std::getenv(name);
    return e ? std::atoi(e) : dflt;
  };
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = env("QK_EMU_SMS", 4); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = env("QK_EMU_CC", 8); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
