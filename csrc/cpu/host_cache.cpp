#include "host_cache.h"

#include <sys/mman.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace qk {
namespace {

constexpr size_t kMinCached = size_t(1) << 20;  // smaller outputs: default allocator
constexpr size_t kRound = size_t(2) << 20;      // 2 MiB: huge-page granularity

size_t limit_bytes() {
  static const size_t lim = [] {
    const char* e = std::getenv("QUANTKERN_CPU_CACHE_MB");
    long mb = e ? std::atol(e) : 1024;
    return mb > 0 ? size_t(mb) << 20 : size_t(0);
  }();
  return lim;
}

struct Block {
  void* ptr;
  size_t size;
};

class HostCache final : public at::Allocator {
 public:
  at::DataPtr allocate(size_t n) override {
    size_t size = (std::max(n, size_t(1)) + kRound - 1) / kRound * kRound;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        ptr = it->second.back();
        it->second.pop_back();
        cached_ -= size;
      }
    }
    if (!ptr) {
      if (posix_memalign(&ptr, kRound, size) != 0) {
        // The cache may hold the memory we need: give it back and retry once.
        host_cache_empty();
        TORCH_CHECK(posix_memalign(&ptr, kRound, size) == 0, "quantkern: out of memory allocating ",
                    size, " bytes");
      }
#ifdef MADV_HUGEPAGE
      madvise(ptr, size, MADV_HUGEPAGE);
#endif
    }
    return {ptr, new Block{ptr, size}, &HostCache::release, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    instance().put(b->ptr, b->size);
    delete b;
  }

  void put(void* ptr, size_t size) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cached_ + size <= limit_bytes()) {
        free_[size].push_back(ptr);
        cached_ += size;
        return;
      }
    }
    std::free(ptr);
  }

  int64_t clear() {
    std::map<size_t, std::vector<void*>> drop;
    size_t bytes;
    {
      std::lock_guard<std::mutex> g(mu_);
      drop.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (auto& kv : drop)
      for (void* p : kv.second) std::free(p);
    return int64_t(bytes);
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return int64_t(cached_);
  }

  static HostCache& instance() {
    // Leaked on purpose: tensors may be freed during interpreter shutdown,
    // after static destructors would have run.
    static HostCache* c = new HostCache();
    return *c;
  }

 private:
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

}  // namespace

at::Tensor cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  size_t bytes = size_t(numel) * c10::elementSize(dtype);
  if (bytes < kMinCached || limit_bytes() == 0) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &HostCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

int64_t host_cache_empty() { return HostCache::instance().clear(); }
int64_t host_cache_bytes() { return HostCache::instance().bytes(); }

}  // namespace qk
