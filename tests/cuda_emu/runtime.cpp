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

// ------------------------------------------------------------------ red zones around CPU tensors
// While on (torch.ops.quantkern_emu.redzones(True)), every CPU tensor is allocated with 64-byte red
// zones on both sides and its body pre-filled with the same pattern: 16-bit words 0xFFkk, a NaN in
// fp32 / fp16 / bf16 (and -1-ish in the integer types), with kk different per allocation. So:
// - a kernel that reads past either end of a tensor (or an element nothing wrote) reads NaN;
// - a kernel that writes past either end is reported: every launch ends with a check of the red
//   zones of all live tensors (qk_emu::check_redzones, from Launch::run), and a corrupted zone
//   raises "qk_emu: a kernel wrote ... bytes past the end of a ... tensor" in the op that did it.
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <mutex>
#include <sstream>
#include <unordered_map>

namespace qk_emu {
namespace {

constexpr size_t kRz = 64;

struct Rec {
  size_t n;
  unsigned char kk;
};

std::mutex g_mu;
std::unordered_map<char*, Rec>& live() {
  static auto* m = new std::unordered_map<char*, Rec>;  // never destroyed: tensors may die at exit
  return *m;
}
std::atomic<bool> g_on{false};
std::string g_freed_bad;  // a corruption found when its tensor was freed (reported at the next check)
c10::Allocator* g_orig = nullptr;

// by address parity, so every aligned 16-bit (and 32-bit) word reads 0xFFkk (0xFFkkFFkk), little endian
inline unsigned char pat(const char* a, unsigned char kk) { return (reinterpret_cast<uintptr_t>(a) & 1) ? 0xFF : kk; }

void fill(char* p, size_t n, unsigned char kk) {
  for (size_t i = 0; i < n; ++i) p[i] = char(pat(p + i, kk));
}

// "" if both zones of the allocation whose body starts at d are intact, else what is wrong.
std::string bad_zone(char* d, const Rec& r) {
  std::ostringstream os;
  auto scan = [&](char* z, bool after) {
    size_t lo = kRz, hi = 0;
    for (size_t i = 0; i < kRz; ++i)
      if ((unsigned char)z[i] != pat(z + i, r.kk)) lo = std::min(lo, i), hi = i + 1;
    if (lo < hi) {
      if (after)
        os << "bytes [" << lo << ", " << hi << ") past the end of a " << r.n << "-byte tensor";
      else
        os << "bytes [-" << kRz - lo << ", -" << kRz - hi << ") before the start of a " << r.n << "-byte tensor";
    }
    return lo < hi;
  };
  if (!scan(d - kRz, false)) scan(d + r.n, true);
  return os.str();
}

void rz_free(void* ptr) {
  char* d = static_cast<char*>(ptr);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    auto it = live().find(d);
    if (it != live().end()) {
      const std::string b = bad_zone(d, it->second);
      if (!b.empty() && g_freed_bad.empty()) g_freed_bad = "qk_emu: something wrote " + b + " (found when it was freed)";
      live().erase(it);
      std::free(d - kRz);
      return;
    }
  }
  if (g_orig && g_orig->raw_deleter()) g_orig->raw_deleter()(ptr);  // allocated while off
}

struct RedzoneAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (!g_on.load()) {
      c10::DataPtr p = g_orig->allocate(n);
      return p;
    }
    void* base = nullptr;
    if (posix_memalign(&base, 64, n + 2 * kRz) != 0) throw std::bad_alloc();
    char* d = static_cast<char*>(base) + kRz;
    static std::atomic<unsigned> next{0};
    const auto kk = (unsigned char)(0xF1 + (next++ % 14));  // 0xF1..0xFE: a NaN in fp16, bf16, fp32 and fp64
    // filled before it is recorded: a launch ending in another thread meanwhile checks only filled zones
    fill(static_cast<char*>(base), n + 2 * kRz, kk);
    {
      std::lock_guard<std::mutex> lk(g_mu);
      live()[d] = Rec{n, kk};
    }
    return {d, d, &rz_free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &rz_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

RedzoneAllocator g_rz;

bool set_redzones(bool on) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (!g_orig) {
    g_orig = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_rz, /*priority=*/255);
  }
  return g_on.exchange(on);
}

}  // namespace

// Called after every launch: raises if any live tensor's red zone was written (and repairs it).
void check_redzones() {
  std::string err;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    std::swap(err, g_freed_bad);
    for (auto& [d, r] : live()) {
      const std::string b = bad_zone(d, r);
      if (!b.empty()) {
        if (err.empty()) err = "qk_emu: a kernel wrote " + b;
        fill(d - kRz, kRz, r.kk);
        fill(d + r.n, kRz, r.kk);
      }
    }
  }
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace qk_emu

TORCH_LIBRARY_FRAGMENT(quantkern_emu, m) {
  m.def("redzones(bool on) -> bool", [](bool on) { return qk_emu::set_redzones(on); });
}
