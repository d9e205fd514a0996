// How a parameter tensor (scale, offset) maps onto the elements of x.
//
// x (contiguous) is viewed as [outer, C, inner]; element i uses parameter
// (i / inner) % C. Per-tensor: {1, 1, numel}. Per-channel on axis a:
// {prod(shape[:a]), shape[a], prod(shape[a+1:])}. Per-group on [rows, K] with
// group size g: {1, rows * K / g, g}.
#pragma once

#include <cstdint>

namespace qk {

// Storage type of a tensor the kernels read or write.
enum class Dt : int { F32 = 0, F16 = 1, BF16 = 2 };

struct Layout {
  int64_t outer, C, inner;
};

}  // namespace qk
