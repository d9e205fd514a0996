// Caching allocator for large CPU outputs.
//
// Why: glibc serves allocations above its mmap threshold with fresh mmap'd
// pages, so every 64 MiB output of a training step pays ~16k page faults plus
// the kernel zeroing the pages: measured here, a fresh 64 MiB output costs
// about 3x a write into existing memory, more than the kernel itself. Like
// PyTorch's CUDA caching allocator, we keep freed blocks (rounded to 2 MiB,
// backed by transparent huge pages where the kernel allows) and hand them out
// again. Small outputs go to the default allocator.
//
// Bound: at most QUANTKERN_CPU_CACHE_MB (default 1024) MiB of *free* blocks are
// kept; 0 disables caching. empty_cache() returns them to the system.
#pragma once

#include <ATen/ATen.h>

namespace qk {

// at::empty(sizes, dtype) on the CPU through the cache (or the default CPU
// allocator when the tensor is small or caching is off).
at::Tensor cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype);
inline at::Tensor cpu_empty_like(const at::Tensor& t) { return cpu_empty(t.sizes(), t.scalar_type()); }

// Free every cached block; returns the bytes released.
int64_t host_cache_empty();
// Bytes currently held in free blocks.
int64_t host_cache_bytes();

}  // namespace qk
