// AVX2 (+FMA, F16C) build of every span kernel; see isa_avx512.cpp.
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#pragma GCC target("avx2,fma,f16c")
#define QK_ISA_AVX2 1
#define QK_ISA_NS avx2
#define QK_ISA_NAME "avx2"
#include "isa_kernels.inc"

const qk::IsaTable& qk::isa_table_avx2() { return qk::avx2::kTable; }
