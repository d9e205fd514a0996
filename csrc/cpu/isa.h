// Run-time selection of the CPU instruction set.
//
// Each isa_<name>.cpp compiles every op's span kernels for one instruction set
// and fills one IsaTable. The torch-facing files (csrc/cpu/<op>.cpp) do the
// threading and the bookkeeping and call the span kernels through isa_table(),
// so one set of loops serves AVX-512, AVX2 and scalar.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../shared/layout.h"
#include "../shared/oscillation.h"
#include "../shared/packing.h"

namespace qk {

struct HqqParams;  // csrc/shared/hqq.h

struct IsaTable {
  const char* name;
  // fake_quant_lsq: one span of `len` elements. Parameters are broadcast when
  // param_stride == 0 (acc_* receive one sum each) and per element when
  // param_stride == 1 (acc_*[i] += the element's term).
  void (*lsq_fwd)(Dt, const void* x, void* y, int64_t len, const float* s, const float* b,
                  int64_t param_stride, float n, float p);
  void (*lsq_bwd)(Dt, const void* g, const void* x, void* gx, int64_t len, const float* s,
                  const float* b, int64_t param_stride, float n, float p, float* acc_s,
                  float* acc_b);
  // oscillation_update: one span of `len` contiguous weights (csrc/cpu/oscillation_kernel.h).
  void (*osc_update)(Dt, void* w, int64_t len, const float* s, const float* b, int64_t param_stride,
                     int32_t* meta, float* ema, const OscConsts& k, bool freeze, int64_t* counts);
  // dampening_loss: sum of squared differences over a span; and its gradient.
  double (*damp_fwd)(Dt, const void* w, int64_t len, const float* s, const float* b, int64_t param_stride,
                     float n, float p);
  void (*damp_bwd)(Dt, const void* w, void* gw, int64_t len, const float* s, const float* b,
                   int64_t param_stride, float n, float p, float g2);
  // hqq_quantize: solve groups [j0, j1) (see csrc/cpu/hqq_kernel.h), then,
  // in the global early-stop mode, write q once the stop is known.
  void (*hqq_solve)(Dt, const void* W, const HqqParams& P, int64_t j0, int64_t j1, float* s_inv,
                    float* scale, float* zero, float* zhist, double* err, uint8_t* q, int* bad);
  void (*hqq_write_q)(Dt, const void* W, const HqqParams& P, int64_t j0, int64_t j1,
                      const float* s_inv, const float* zero, uint8_t* q);
  // packed_linear / dequantize on packed weights (packed_kernel.h). The glue asks
  // for a path, prepares x into a workspace (split over "units"), then runs row
  // ranges of W in parallel.
  int (*pk_plan)(const PackedW&, Dt xdt, int64_t M);
  int64_t (*pk_mchunk)(int path);
  int64_t (*pk_prep_units)(int path, int64_t M);
  int64_t (*pk_ws_bytes)(const PackedW&, Dt xdt, int64_t M, int path);
  void (*pk_prep)(const PackedW&, Dt xdt, const void* x, int64_t ldx, int64_t M, int path, int64_t u0, int64_t u1,
                  void* ws);
  void (*pk_run)(const PackedW&, const void* ws, int64_t M, int path, int64_t n0, int64_t n1, Dt ydt, void* y,
                 int64_t ldy, const float* bias);
  int64_t (*pk_n_grain)(int path);
  void (*pk_dequant)(const PackedW&, int64_t n0, int64_t n1, Dt odt, void* out, int64_t ldo);
};

const IsaTable& isa_table_avx512();
const IsaTable& isa_table_avx2();
const IsaTable& isa_table_scalar();
// The AVX-512 table emulated with SIMDe (isa_avx512emu.cpp); nullptr where it was not built.
const IsaTable* isa_table_avx512emu();

// The table in use: the best the CPU supports, unless forced by
// set_cpu_capability() or the QUANTKERN_CPU_CAPABILITY environment variable.
const IsaTable& isa_table();
// Names the CPU can run, best first ("avx512", "avx2", "scalar").
std::vector<std::string> supported_cpu_capabilities();
// Tables that emulate an instruction set the CPU may lack, for tests: "avx512emu" (the AVX-512
// kernels on SIMDe, isa_avx512emu.cpp) where it was built and the CPU has AVX2. Never chosen by
// "auto"; set_cpu_capability takes the name.
std::vector<std::string> emulated_cpu_capabilities();
// Force a capability ("avx512", "avx2", "scalar", "avx512emu", or "auto"); throws if the CPU
// cannot run it. Returns the name now in use.
std::string set_cpu_capability(const std::string& name);

}  // namespace qk
