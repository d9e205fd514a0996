// Optional CPU features the AVX-512 kernels use when present (torch-free).
//
// The instruction-set table (isa.h) picks AVX-512 / AVX2 / scalar; inside the
// AVX-512 table some kernels also use VNNI, VBMI, AVX512-BF16 and AMX when the
// CPU (and, for AMX, the OS) allows. Each can be switched off at run time
// (quantkern.ops.set_cpu_feature, or QUANTKERN_DISABLE_CPU_FEATURES=amx,vnni)
// so that tests can force the fallbacks.
#pragma once

namespace qk {

enum class CpuFeature : int { Vnni = 0, Vbmi = 1, Bf16 = 2, Amx = 3, Count = 4 };

const char* cpu_feature_name(CpuFeature f);
bool cpu_feature_detected(CpuFeature f);
// Detected and not disabled.
bool cpu_feature_on(CpuFeature f);
// Not disabled (the emulated AVX-512 table, isa_avx512emu.cpp, has every feature but AMX).
bool cpu_feature_enabled(CpuFeature f);
// Returns false if the name is unknown.
bool set_cpu_feature_enabled(const char* name, bool on);
// The CPU's vendor string is "AuthenticAMD" (kernels that tune their instruction mix per vendor).
bool cpu_is_amd();
// GFNI (vgf2p8affineqb, in the int8 GEMV's Zen 4 int3 decode). Not switchable: every CPU with
// VNNI and VBMI has it; the GEMV checks it only for a VM that hides it.
bool cpu_has_gfni();

}  // namespace qk
