// Portable scalar build of every span kernel (baseline x86-64, no pragma).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#define QK_ISA_SCALAR 1
#define QK_ISA_NS scalar
#define QK_ISA_NAME "scalar"
#include "isa_kernels.inc"

const qk::IsaTable& qk::isa_table_scalar() { return qk::scalar::kTable; }
