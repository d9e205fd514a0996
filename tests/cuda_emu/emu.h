// A CPU emulator for this project's CUDA kernels, so that CI (which has no GPU) runs their
// indexing, tails, shared-memory staging and warp reductions, not only their per-element math.
//
// tests/cuda_emu/build.py rewrites each csrc/cuda/*.cu (launch syntax, dynamic shared memory, the
// op registration) and compiles it with g++ with this header force-included. The kernels then run
// unchanged as C++: every CUDA thread of a block is a fiber (ucontext) with its own stack, and the
// fibers of a block switch only at __syncthreads and at warp collectives (__shfl_*_sync). Blocks run
// one after another, so a __shared__ variable (a function-local static here) is shared by the
// threads of one block, as on the GPU.
//
// What it checks and what it does not:
// - Between two barriers a fiber runs to completion before the next one starts, in the order
//   QK_EMU_ORDER gives (forward, reverse, or shuffle:SEED, chosen per launch). A missing
//   __syncthreads (a thread reading shared memory another thread writes in the same phase) makes
//   the result depend on that order, so the tests run both orders and compare.
// - Dynamic shared memory is filled with 0xFF bytes (a NaN for floats) at the start of every
//   block, so a read before any write shows.
// - Floating point: device intrinsics (__fadd_rn, ...) are IEEE single operations and the files
//   are compiled with -ffp-contract=off, so results match the GPU's where the kernel fixes the
//   order of operations. Tensor-core products (wmma) accumulate in fp32 in a fixed order; the
//   hardware's order differs, so those outputs are compared with a tolerance.
// - Not modelled: timing, memory coalescing, bank conflicts, occupancy, warp divergence cost,
//   out-of-bounds global accesses in general. But with red zones on (torch.ops.quantkern_emu.redzones,
//   runtime.cpp) every CPU tensor gets 64-byte red zones on both sides, filled, like a fresh
//   tensor's body, with NaN patterns: a read just past a tensor (or of an element nothing wrote)
//   reads NaN, and a write just past one raises at the end of the launch.
#pragma once

// Real headers first: after this block the CUDA keywords become macros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace qk_emu {

enum class St { Run, WaitBlock, WaitWarp, Done };

struct Fiber {
  ucontext_t ctx;
  St st = St::Run;
};

// One block's fibers and the scheduler that runs them.
struct Block {
  int n = 0;                          // threads in the block
  std::vector<Fiber> f;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  int cur = 0;                        // the fiber now running
  std::function<void()> body;
  std::exception_ptr err;
  std::vector<uint64_t> xch;          // one exchange slot per thread, for the shuffles
};

inline Block* g_blk = nullptr;
inline uint3 g_tid{0, 0, 0}, g_bid{0, 0, 0};
inline dim3 g_bdim{1, 1, 1}, g_gdim{1, 1, 1};
inline std::vector<unsigned char> g_dyn;  // dynamic shared memory of the running launch

inline constexpr size_t kStack = size_t(256) << 10;

inline void set_tid(int t) {
  g_tid = uint3{unsigned(t % g_bdim.x), unsigned((t / g_bdim.x) % g_bdim.y), unsigned(t / (g_bdim.x * g_bdim.y))};
}

inline void trampoline() {
  Block& b = *g_blk;
  try {
    b.body();
  } catch (...) {
    if (!b.err) b.err = std::current_exception();
  }
  b.f[b.cur].st = St::Done;  // uc_link returns to the scheduler
}

// The fiber order between barriers (QK_EMU_ORDER): forward, reverse or shuffle:SEED.
inline std::vector<int> order(int n, uint64_t launch_no) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) o[i] = i;
  const char* e = std::getenv("QK_EMU_ORDER");
  const std::string mode = e ? e : "forward";
  if (mode == "reverse") {
    std::reverse(o.begin(), o.end());
  } else if (mode.rfind("shuffle", 0) == 0) {
    const uint64_t seed = mode.size() > 8 ? std::strtoull(mode.c_str() + 8, nullptr, 10) : 0;
    std::mt19937_64 rng(seed * 1000003u + launch_no);
    std::shuffle(o.begin(), o.end(), rng);
  } else if (mode != "forward") {
    throw std::runtime_error("QK_EMU_ORDER must be forward, reverse or shuffle:SEED, got " + mode);
  }
  return o;
}

// Runs one block of n threads to completion.
inline void run_block(Block& b, const std::vector<int>& ord) {
  for (int i = 0; i < b.n; ++i) {
    Fiber& fb = b.f[i];
    fb.st = St::Run;
    getcontext(&fb.ctx);
    fb.ctx.uc_stack.ss_sp = b.stacks[i].get();
    fb.ctx.uc_stack.ss_size = kStack;
    fb.ctx.uc_link = &b.sched;
    makecontext(&fb.ctx, trampoline, 0);
  }
  const int nw = (b.n + 31) / 32;
  for (;;) {
    bool ran = false;
    for (int i : ord) {
      if (b.f[i].st != St::Run) continue;
      b.cur = i;
      set_tid(i);
      swapcontext(&b.sched, &b.f[i].ctx);
      ran = true;
    }
    bool released = false, all_done = true, any_run = false;
    for (int w = 0; w < nw; ++w) {  // a warp whose live lanes all wait at a warp collective goes on
      bool waiting = false, ready = true;
      for (int i = 32 * w; i < std::min(b.n, 32 * w + 32); ++i) {
        const St s = b.f[i].st;
        waiting |= s == St::WaitWarp;
        ready &= s == St::WaitWarp || s == St::Done;
      }
      if (waiting && ready) {
        for (int i = 32 * w; i < std::min(b.n, 32 * w + 32); ++i)
          if (b.f[i].st == St::WaitWarp) b.f[i].st = St::Run;
        released = true;
      }
    }
    bool block_ready = true, block_waiting = false;
    for (int i = 0; i < b.n; ++i) {
      const St s = b.f[i].st;
      all_done &= s == St::Done;
      any_run |= s == St::Run;
      block_waiting |= s == St::WaitBlock;
      block_ready &= s == St::WaitBlock || s == St::Done;  // exited threads count as arrived
    }
    if (all_done) break;
    if (!released && !any_run && block_waiting && block_ready) {
      for (int i = 0; i < b.n; ++i)
        if (b.f[i].st == St::WaitBlock) b.f[i].st = St::Run;
      released = true;
    }
    if (!released && !any_run && !ran)
      throw std::runtime_error("qk_emu: deadlock (threads wait at different barriers: a __syncthreads or a warp "
                               "collective that not every thread reaches)");
  }
  if (b.err) std::rethrow_exception(b.err);
}

inline void yield_as(St s) {
  Block& b = *g_blk;
  const int me = b.cur;
  b.f[me].st = s;
  swapcontext(&b.f[me].ctx, &b.sched);
}

inline void syncthreads() { yield_as(St::WaitBlock); }

// Warp shuffles: every lane publishes its value, the warp meets, each lane reads its source lane,
// the warp meets again (so no lane overwrites its slot before the others have read it).
template <class T>
T shfl_from(T v, int src_lane_fn_result) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "qk_emu: shuffle of a type wider than 8 bytes");
  Block& b = *g_blk;
  const int me = b.cur, base = me & ~31;
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  b.xch[me] = slot;
  yield_as(St::WaitWarp);
  const int src = base + src_lane_fn_result;
  T r = v;
  if (src < b.n) std::memcpy(&r, &b.xch[src], sizeof(T));
  yield_as(St::WaitWarp);
  return r;
}

inline int lane() { return g_blk->cur & 31; }

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) throw std::runtime_error("qk_emu: only full-warp shuffle masks are modelled");
}

template <class T>
T shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  check_mask(mask);
  const int l = lane(), seg = l & ~(width - 1), src = l ^ m;
  return shfl_from(v, (src & ~(width - 1)) == seg ? src : l);
}

template <class T>
T shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  check_mask(mask);
  const int l = lane(), seg = l & ~(width - 1), src = l + int(d);
  return shfl_from(v, src < seg + width ? src : l);
}

template <class T>
T shfl_sync(unsigned mask, T v, int src, int width = 32) {
  check_mask(mask);
  const int l = lane(), seg = l & ~(width - 1);
  return shfl_from(v, seg + (src & (width - 1)));
}

inline uint64_t g_launches = 0;

// runtime.cpp: raises if a kernel wrote into the red zone of a CPU tensor (while red zones are on).
void check_redzones();

// kernel<<<grid, block, smem, stream>>>(args...) becomes
// Launch(grid, block, smem, stream).run([&](auto&... a) { kernel(a...); }, args...).
struct Launch {
  dim3 grid, block;
  size_t smem;
  template <class G, class B, class S = int, class Q = int>
  Launch(G g, B bl, S sm = 0, Q = 0) : grid(to_dim3(g)), block(to_dim3(bl)), smem(size_t(sm)) {}

  template <class D>
  static dim3 to_dim3(D d) {
    if constexpr (std::is_same_v<D, dim3>) {
      return d;
    } else {
      return dim3(unsigned(d), 1, 1);
    }
  }

  // call(args...) calls the kernel; the arguments are copied once at the launch, and every thread
  // gets its own copies of them (a kernel's parameters are per thread).
  template <class F, class... A>
  void run(F call, A&&... args) {
    const int64_t n = int64_t(block.x) * block.y * block.z;
    if (n < 1 || n > 1024) throw std::runtime_error("qk_emu: block of " + std::to_string(n) + " threads");
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
      throw std::runtime_error("qk_emu: invalid grid");
    const std::tuple<std::decay_t<A>...> params(std::forward<A>(args)...);
    Block b;
    b.n = int(n);
    b.f.resize(b.n);
    b.xch.assign(b.n, 0);
    for (int i = 0; i < b.n; ++i) b.stacks.emplace_back(new char[kStack]);
    b.body = [&] {
      auto mine = params;
      std::apply(call, mine);
    };
    Block* prev = g_blk;
    g_blk = &b;
    g_bdim = block;
    g_gdim = grid;
    const auto ord = order(b.n, g_launches++);
    g_dyn.assign(smem + 16, 0xFF);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          g_bid = uint3{x, y, z};
          std::fill(g_dyn.begin(), g_dyn.end(), 0xFF);
          run_block(b, ord);
        }
    g_blk = prev;
    check_redzones();
  }
};

inline void* dyn_smem() { return g_dyn.data(); }

// --- device intrinsics (IEEE single operations; the files build with -ffp-contract=off)
inline float fadd_rn(float a, float b) { return a + b; }
inline float fsub_rn(float a, float b) { return a - b; }
inline float fmul_rn(float a, float b) { return a * b; }
inline float fdiv_rn(float a, float b) { return a / b; }
inline double dmul_rn(double a, double b) { return a * b; }
inline int float_as_int(float v) {
  int r;
  std::memcpy(&r, &v, 4);
  return r;
}
inline float int_as_float(int v) {
  float r;
  std::memcpy(&r, &v, 4);
  return r;
}
// Atomics: the fibers never interleave inside one, so these are plain read-modify-writes.
template <class T>
T atomic_add(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomic_or(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}

}  // namespace qk_emu

// CUDA's global math functions that <cmath> puts in std only.
using std::isfinite;
using std::isinf;
using std::isnan;

// CUDA's global min / max for integers (its overloads take the common type of the two arguments).
template <class A, class B, class = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(a) : C(b);
}
template <class A, class B, class = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}

// --- CUDA keywords and built-ins
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH__ 800  // the device branches of csrc/shared run, as on an sm_80 GPU

#define threadIdx (::qk_emu::g_tid)
#define blockIdx (::qk_emu::g_bid)
#define blockDim (::qk_emu::g_bdim)
#define gridDim (::qk_emu::g_gdim)
#define __syncthreads() ::qk_emu::syncthreads()
#define __shfl_xor_sync ::qk_emu::shfl_xor_sync
#define __shfl_down_sync ::qk_emu::shfl_down_sync
#define __shfl_sync ::qk_emu::shfl_sync
#define __fadd_rn ::qk_emu::fadd_rn
#define __fsub_rn ::qk_emu::fsub_rn
#define __fmul_rn ::qk_emu::fmul_rn
#define __fdiv_rn ::qk_emu::fdiv_rn
#define __dmul_rn ::qk_emu::dmul_rn
#define __float_as_int ::qk_emu::float_as_int
#define __int_as_float ::qk_emu::int_as_float
#define atomicAdd ::qk_emu::atomic_add
#define atomicOr ::qk_emu::atomic_or
#define __ldg(p) (*(p))

// The host glue's "x must be a CUDA tensor" checks accept the CPU tensors the emulator runs on.
#define is_cuda is_cpu
