// AVX-512 build of every span kernel. Standard headers come first so that only
// our code (included after the pragma) is compiled for AVX-512.
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define QK_ISA_AVX512 1
#define QK_ISA_NS avx512
#define QK_ISA_NAME "avx512"
#include "isa_kernels.inc"

const qk::IsaTable& qk::isa_table_avx512() { return qk::avx512::kTable; }
