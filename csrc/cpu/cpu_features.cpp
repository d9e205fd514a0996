#include "cpu_features.h"

#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace qk {
namespace {

constexpr int kN = int(CpuFeature::Count);
const char* kNames[kN] = {"vnni", "vbmi", "bf16", "amx"};

bool detect(CpuFeature f) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512f = b & (1u << 16);
  if (!avx512f) return false;
  switch (f) {
    case CpuFeature::Vnni: return c & (1u << 11);
    case CpuFeature::Vbmi: return c & (1u << 1);
    case CpuFeature::Amx: {
      if (!((d & (1u << 24)) && (d & (1u << 22)))) return false;  // AMX-TILE, AMX-BF16
      unsigned xlo, xhi;
      __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
      (void)xhi;
      return (xlo & (3u << 17)) == (3u << 17);  // XTILECFG, XTILEDATA enabled by the OS
    }
    case CpuFeature::Bf16: {
      unsigned a1, b1, c1, d1;
      if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) return false;
      return a1 & (1u << 5);
    }
    default: return false;
  }
}

struct State {
  bool detected[kN];
  std::atomic<bool> enabled[kN];
  State() {
    const char* env = std::getenv("QUANTKERN_DISABLE_CPU_FEATURES");
    std::string off = env ? std::string(",") + env + "," : std::string();
    for (int i = 0; i < kN; ++i) {
      detected[i] = detect(CpuFeature(i));
      enabled[i] = off.find(std::string(",") + kNames[i] + ",") == std::string::npos;
    }
  }
};

State& state() {
  static State s;
  return s;
}

}  // namespace

const char* cpu_feature_name(CpuFeature f) { return kNames[int(f)]; }
bool cpu_feature_detected(CpuFeature f) { return state().detected[int(f)]; }
bool cpu_feature_on(CpuFeature f) {
  const State& s = state();
  return s.detected[int(f)] && s.enabled[int(f)].load(std::memory_order_relaxed);
}
bool cpu_feature_enabled(CpuFeature f) { return state().enabled[int(f)].load(std::memory_order_relaxed); }
bool set_cpu_feature_enabled(const char* name, bool on) {
  for (int i = 0; i < kN; ++i)
    if (std::strcmp(name, kNames[i]) == 0) {
      state().enabled[i] = on;
      return true;
    }
  return false;
}

bool cpu_is_amd() {
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char v[13];
  std::memcpy(v, &b, 4);
  std::memcpy(v + 4, &d, 4);
  std::memcpy(v + 8, &c, 4);
  v[12] = 0;
  return std::strcmp(v, "AuthenticAMD") == 0;
}

bool cpu_has_gfni() {
  static const bool has = [] {  // once: CPUID traps to the hypervisor in a VM (microseconds per call)
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & (1u << 8));
  }();
  return has;
}

}  // namespace qk
