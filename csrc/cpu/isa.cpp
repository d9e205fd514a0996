#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace qk {
namespace {

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

const IsaTable* lookup(const std::string& name) {
  if (name == "avx512") return cpu_has_avx512() ? &isa_table_avx512() : nullptr;
  if (name == "avx2") return cpu_has_avx2() ? &isa_table_avx2() : nullptr;
  if (name == "scalar") return &isa_table_scalar();
  if (name == "avx512emu") return cpu_has_avx2() ? isa_table_avx512emu() : nullptr;
  return nullptr;
}

const IsaTable* best() {
  if (const char* env = std::getenv("QUANTKERN_CPU_CAPABILITY")) {
    std::string want(env);
    if (!want.empty() && want != "auto") {
      if (const IsaTable* t = lookup(want)) return t;
      throw std::runtime_error("QUANTKERN_CPU_CAPABILITY=" + want +
                               " is not supported on this CPU (use avx512, avx2, scalar, avx512emu or auto)");
    }
  }
  if (cpu_has_avx512()) return &isa_table_avx512();
  if (cpu_has_avx2()) return &isa_table_avx2();
  return &isa_table_scalar();
}

std::atomic<const IsaTable*> g_table{nullptr};

}  // namespace

const IsaTable& isa_table() {
  const IsaTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> out;
  if (cpu_has_avx512()) out.push_back("avx512");
  if (cpu_has_avx2()) out.push_back("avx2");
  out.push_back("scalar");
  return out;
}

std::vector<std::string> emulated_cpu_capabilities() {
  std::vector<std::string> out;
  if (cpu_has_avx2() && isa_table_avx512emu()) out.push_back("avx512emu");
  return out;
}

std::string set_cpu_capability(const std::string& name) {
  const IsaTable* t = name == "auto" ? best() : lookup(name);
  if (!t) throw std::invalid_argument("cpu capability '" + name +
                                      "' is not supported on this CPU; supported: avx512 (if the "
                                      "CPU has it), avx2 (if it has it), scalar, auto, and avx512emu "
                                      "(AVX-512 kernels emulated on AVX2, where the build has SIMDe)");
  g_table.store(t, std::memory_order_release);
  return t->name;
}

}  // namespace qk
