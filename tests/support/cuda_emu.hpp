// tests/support/cuda_emu.hpp: runs CUDA kernels on the CPU, for tests on machines without a GPU (test-only;
// never part of the library).
//
// The same `__global__` function templates that nvcc compiles into limoe_cuda (src/cuda/kernels/*.cuh) are
// compiled by g++ with this header included first:
//   - under ThreadSanitizer every CUDA thread of a block is a host thread (of a team created once and reused);
//     `threadIdx`, `blockIdx`, `blockDim`, `gridDim` are thread-local; the team runs the blocks one after
//     another, all of a block's threads at once, with a barrier between blocks, so `__shared__` (a
//     function-local `static`) is one array per block in flight, as on the device; `__syncthreads()` is a
//     std::barrier over the block's threads: a kernel that reads shared memory another thread wrote without a
//     barrier between them is a data race that ThreadSanitizer reports (tests/cuda_emu/tests.cmake);
//   - in the other builds on x86-64 a block's CUDA threads are fibers on the launching host thread (as HIP-CPU
//     runs a block): each runs until it reaches `__syncthreads()` or returns, in threadIdx order, then the next;
//     when all have arrived they go on past the barrier. The same interleavings a GPU may take at barriers, and
//     the same results for a race-free kernel, without a host context switch per CUDA thread per barrier
//     (256-thread blocks on 2 cores made tens of millions of them: most of the emulated tests' time). A block
//     in which some threads return while others wait at `__syncthreads()` (a barrier under a branch that
//     diverges: a hang or undefined on a GPU) is an error naming the thread, rather than a hang;
//   - warp intrinsics are not emulated: the kernels written for both use shared-memory reductions;
//   - outside ThreadSanitizer builds, a kernel whose first launch never reached `__syncthreads` runs its later
//     launches on the calling thread, each block's threads one after another (no team wake-up and no barrier
//     per block: the same results, since threads that never meet at a barrier cannot rely on each other's
//     writes). Should such a kernel reach `__syncthreads` on a later launch, the emulator throws, naming it,
//     rather than guess. Under TSan every launch runs on the team, so races between threads stay visible.
// emu::launch(grid, block, kernel, args...) is the <<<grid, block>>> launch.
//
// The CUDA backend's host code (src/cuda/backend/) compiled against this header runs on host memory
// (LIMOE_CUDA_EMULATION): its kernels launch here, and its cuBLAS calls go to tests/support/cublas_emu.hpp
// (included at the end), the stand-in for the library the tests cannot call without a GPU: the same call sites as
// on a GPU, checked against the library's documented column-major semantics.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <barrier>
#include <exception>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#error "cuda_emu.hpp is for host compilers: nvcc compiles the kernels for the device"
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__

#define LIMOE_CUDA_EMULATION 1

namespace emu {
namespace detail {
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
// The launch in progress: set when one of its threads reaches __syncthreads (team mode); in sequential mode
// block_barrier is null and __syncthreads throws.
inline thread_local std::atomic<bool>* barrier_reached = nullptr;

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LIMOE_EMU_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) || defined(LIMOE_EMU_TSAN)
inline constexpr bool kSequentialLaunches = false;
#else
inline constexpr bool kSequentialLaunches = true;
// Not under AddressSanitizer or MemorySanitizer either: they would take a switch of stacks they were not told of
// for an overflow (g++ defines __SANITIZE_ADDRESS__, clang answers __has_feature).
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define LIMOE_EMU_OTHER_SANITIZER 1
#endif
#endif
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(LIMOE_EMU_OTHER_SANITIZER)
#define LIMOE_EMU_FIBERS 1
#endif
#endif
// What the launches on the team showed of each kernel's barriers, by the kernel's address.
enum class Barriers { unknown, none, used };
class BarrierLog {
 public:
  static BarrierLog& instance() {
    static BarrierLog log;
    return log;
  }
  Barriers of(const void* kernel) {
    std::lock_guard lock(mutex_);
    const auto it = seen_.find(kernel);
    return it == seen_.end() ? Barriers::unknown : it->second;
  }
  void note(const void* kernel, bool reached) {
    std::lock_guard lock(mutex_);
    Barriers& b = seen_[kernel];
    if (b != Barriers::used) b = reached ? Barriers::used : Barriers::none;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<const void*, Barriers> seen_;
};

// threadIdx of linear thread t in a block; calls fn(blockIdx) for every block of the grid, in order.
inline dim3 thread_of(unsigned t, dim3 block) { return dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y)); }
template <class Fn>
void for_each_block(dim3 grid, Fn&& fn) {
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) fn(dim3(bx, by, bz));
}
}  // namespace detail

// The host threads that play CUDA threads: created once and reused by every launch (creating a thread per
// CUDA thread per launch costs more than the kernels of the tests). Worker i plays threadIdx i of a block.
class ThreadTeam {
 public:
  static ThreadTeam& instance() {
    static ThreadTeam team;
    return team;
  }
  // Runs body(i) on workers 0..n-1 concurrently and returns when all have finished.
  void run(unsigned n, const std::function<void(unsigned)>& body) {
    std::unique_lock lock(mutex_);
    while (workers_.size() < n) {
      const auto id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { work(id); });
    }
    body_ = &body;
    active_ = n;
    remaining_ = n;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [this] { return remaining_ == 0; });
    body_ = nullptr;
  }
  ~ThreadTeam() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  void work(unsigned id) {
    std::uint64_t seen = 0;
    for (;;) {
      const std::function<void(unsigned)>* body = nullptr;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        if (id >= active_) continue;
        body = body_;
      }
      (*body)(id);
      std::lock_guard lock(mutex_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* body_ = nullptr;
  std::uint64_t generation_ = 0;
  unsigned active_ = 0, remaining_ = 0;
  bool stop_ = false;
};

#if defined(LIMOE_EMU_FIBERS)
namespace detail {
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save, loads `load` as the
// stack pointer and restores the registers saved there (System V x86-64: rbx, rbp, r12-r15; MXCSR and the x87
// control word are left alone: nothing here changes them).
__attribute__((naked, noinline)) inline void fiber_switch(void** /*save*/, void* /*load*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}

// The CUDA threads of one block as fibers on the calling host thread (see the header's comment). After an error
// (a kernel's exception, a barrier some threads skip) the block's other fibers are dropped where they stand:
// their locals are not destroyed (a leak on a failing launch, nothing more: the next launch starts afresh).
class FiberBlock {
 public:
  // Per CUDA thread: mapped, so only the pages a kernel touches take memory, below a page that faults on use
  // (an overflow stops there instead of writing over the next stack).
  static constexpr std::size_t kStackBytes = std::size_t{256} << 10, kGuardBytes = std::size_t{64} << 10;

  // Runs body() once per thread of every block of `grid`, the blocks in order.
  template <class Body>
  void run(dim3 grid, dim3 block, const Body& body) {
    if (current_ != nullptr) throw std::logic_error("emu: a kernel launched a kernel (not emulated)");
    const unsigned n = block.x * block.y * block.z;
    while (stacks_.size() < n) stacks_.emplace_back();
    fibers_.assign(n, Fiber{});
    body_ = [](const void* b) { (*static_cast<const Body*>(b))(); };
    body_arg_ = &body;
    current_ = this;
    struct Restore {
      ~Restore() { current_ = nullptr; }
    } restore;
    for_each_block(grid, [&](dim3 b) {
      block_idx = b;
      for (unsigned t = 0; t < n; ++t) {
        // A fresh stack: 16-byte aligned top, the entry's address where fiber_switch's `ret` finds it, then six
        // zeros for the registers it pops; at the entry the stack is as after a call (rsp + 8 aligned).
        auto top = reinterpret_cast<std::uintptr_t>(stacks_[t].top()) & ~std::uintptr_t{15};
        auto* sp = reinterpret_cast<void**>(top);
        *--sp = nullptr;                                  // the entry's return address: it never returns
        *--sp = reinterpret_cast<void*>(&FiberBlock::entry);
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        fibers_[t] = Fiber{sp, State::ready};
      }
      for (;;) {  // rounds: every thread runs to its next barrier or its end
        unsigned waiting = 0, finished = 0;
        for (unsigned t = 0; t < n; ++t) {
          if (fibers_[t].state == State::finished) continue;
          fibers_[t].state = State::running;
          running_ = t;
          thread_idx = thread_of(t, block);
          fiber_switch(&scheduler_sp_, fibers_[t].sp);
          if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
        }
        for (const Fiber& f : fibers_) (f.state == State::waiting ? waiting : finished) += 1;
        if (waiting == 0) break;  // the block is done
        if (finished != 0) {
          unsigned t = 0;
          while (fibers_[t].state != State::finished) ++t;
          throw std::logic_error("emu: thread " + std::to_string(t) + " of block (" + std::to_string(b.x) + ", " +
                                 std::to_string(b.y) + ", " + std::to_string(b.z) + ") returned while " +
                                 std::to_string(waiting) + " others wait at __syncthreads (a barrier under a "
                                 "branch that diverges: a hang on a GPU)");
        }
        for (Fiber& f : fibers_) f.state = State::ready;
      }
    });
  }

  // __syncthreads from the running fiber: back to the scheduler until every thread of the block has arrived.
  void sync() {
    Fiber& f = fibers_[running_];
    f.state = State::waiting;
    fiber_switch(&f.sp, scheduler_sp_);
  }

  static FiberBlock*& current() { return current_; }
  static FiberBlock& for_this_thread() {
    static thread_local FiberBlock block;
    return block;
  }

 private:
  enum class State { ready, running, waiting, finished };
  struct Fiber {
    void* sp = nullptr;
    State state = State::ready;
  };
  static void entry() {
    FiberBlock& self = *current_;
    try {
      self.body_(self.body_arg_);
    } catch (...) {
      self.error_ = std::current_exception();
    }
    Fiber& f = self.fibers_[self.running_];
    f.state = State::finished;
    void* dead = nullptr;
    fiber_switch(&dead, self.scheduler_sp_);  // never resumed
    __builtin_unreachable();
  }

  // One fiber's stack: kStackBytes above a guard of kGuardBytes that may not be touched.
  class Stack {
   public:
    Stack() {
      void* p = ::mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      if (::mprotect(p, kGuardBytes, PROT_NONE) != 0) {
        ::munmap(p, kGuardBytes + kStackBytes);
        throw std::runtime_error("emu: mprotect of a fiber stack's guard page failed");
      }
      base_ = static_cast<char*>(p);
    }
    Stack(Stack&& o) noexcept : base_(std::exchange(o.base_, nullptr)) {}
    Stack(const Stack&) = delete;
    Stack& operator=(const Stack&) = delete;
    Stack& operator=(Stack&&) = delete;
    ~Stack() {
      if (base_ != nullptr) ::munmap(base_, kGuardBytes + kStackBytes);
    }
    char* top() const { return base_ + kGuardBytes + kStackBytes; }

   private:
    char* base_ = nullptr;
  };

  inline static thread_local FiberBlock* current_ = nullptr;
  std::vector<Stack> stacks_;
  std::vector<Fiber> fibers_;
  void (*body_)(const void*) = nullptr;
  const void* body_arg_ = nullptr;
  void* scheduler_sp_ = nullptr;
  unsigned running_ = 0;
  std::exception_ptr error_;
};
}  // namespace detail
#endif

// Runs kernel(args...) on grid x block CUDA threads: block-size host threads of the team run the blocks in
// order, each block's threads concurrently, with a barrier after each block (so no thread starts writing the
// next block's shared memory while another still reads this block's).
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, Kernel&& kernel, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::invalid_argument("emu::launch: " + std::to_string(threads) + " threads per block");
  const unsigned long long blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  if (blocks == 0) return;
  // The kernel's address, when it is a function (launches of one kernel share what is known of its barriers).
  const void* key = nullptr;
  if constexpr (std::is_pointer_v<std::decay_t<Kernel>> && std::is_function_v<std::remove_pointer_t<std::decay_t<Kernel>>>)
    key = reinterpret_cast<const void*>(+kernel);
  const bool logged = detail::kSequentialLaunches && key != nullptr;
  if (logged && detail::BarrierLog::instance().of(key) == detail::Barriers::none) {
    // Barrier-free: every thread of every block on this thread, in order.
    detail::block_barrier = nullptr;
    detail::barrier_reached = nullptr;
    detail::block_dim = block;
    detail::grid_dim = grid;
    detail::for_each_block(grid, [&](dim3 b) {
      detail::block_idx = b;
      for (unsigned t = 0; t < threads; ++t) {
        detail::thread_idx = detail::thread_of(t, block);
        kernel(args...);
      }
    });
    return;
  }
#if defined(LIMOE_EMU_FIBERS)
  {
    std::atomic<bool> reached{false};
    detail::barrier_reached = &reached;
    detail::block_dim = block;
    detail::grid_dim = grid;
    detail::FiberBlock::for_this_thread().run(grid, block, [&] { kernel(args...); });
    detail::barrier_reached = nullptr;
    if (logged) detail::BarrierLog::instance().note(key, reached.load());
    return;
  }
#endif
  std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
  std::atomic<bool> reached{false};
  const std::function<void(unsigned)> body = [&](unsigned t) {
    detail::thread_idx = detail::thread_of(t, block);
    detail::block_dim = block;
    detail::grid_dim = grid;
    detail::block_barrier = &barrier;
    detail::barrier_reached = &reached;
    detail::for_each_block(grid, [&](dim3 b) {
      detail::block_idx = b;
      kernel(args...);
      barrier.arrive_and_wait();
    });
  };
  ThreadTeam::instance().run(threads, body);
  if (logged) detail::BarrierLog::instance().note(key, reached.load());
}

}  // namespace emu

#define threadIdx (::emu::detail::thread_idx)
#define blockIdx (::emu::detail::block_idx)
#define blockDim (::emu::detail::block_dim)
#define gridDim (::emu::detail::grid_dim)

// Every thread of the block waits here until all have arrived (each thread must reach it: as on the device,
// a __syncthreads under a divergent branch deadlocks).
inline void __syncthreads() {
#if defined(LIMOE_EMU_FIBERS)
  if (::emu::detail::FiberBlock* f = ::emu::detail::FiberBlock::current()) {
    ::emu::detail::barrier_reached->store(true, std::memory_order_relaxed);
    f->sync();
    return;
  }
#endif
  if (::emu::detail::block_barrier == nullptr)
    throw std::logic_error("emu: a kernel reached __syncthreads on a launch run sequentially (its first launch never "
                           "did); make its barriers unconditional or launch it on the team");
  ::emu::detail::barrier_reached->store(true, std::memory_order_relaxed);
  ::emu::detail::block_barrier->arrive_and_wait();
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float sqrtf(float x) { return std::sqrt(x); }

#include "cublas_emu.hpp"
