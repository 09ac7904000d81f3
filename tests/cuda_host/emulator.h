// Runs the extension's simple CUDA kernels on a CPU, for CI without a GPU. A block's threads become fibers
// (ucontext) of one OS thread, each run until it reaches __syncthreads or returns; when every thread has, the next
// phase starts. Blocks run one after another, so function-static arrays play a block's shared memory.
//
// This checks a kernel's logic (indexing, bounds, vector paths, merge order, barrier placement), never its speed or
// code generation. Threads run in the order fr_set_thread_order chose: forward, reverse, or shuffled anew in each
// phase. A missing barrier shows in some order (a thread reads a slot that another has not written yet, or already
// overwrote), since the GPU guarantees none. A barrier that not every thread of the block reaches, or threads
// waiting at different barriers, fails the launch (cudaErrorLaunchFailure): CUDA leaves that undefined.
// Not modelled: shared memory starts as whatever the previous block left there, not as garbage.
//
// Include it before the kernel file and compile with g++ -DFUSED_RESNET_HOST_EMULATION (csrc/cuda/kernel_launch.cuh
// then launches through emulated_launch).
#pragma once

#define __shared__ static
#define __launch_bounds__(...)
#define __syncthreads() fused_resnet::emulation::barrier(__LINE__)

#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector_functions.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fused_resnet::emulation {

enum class Order { kForward = 0, kReverse = 1, kShuffled = 2 };

// A fiber's stack, with an inaccessible page below it: an overflow faults instead of corrupting the heap.
class Fiber {
 public:
  static constexpr size_t kStackBytes = 256 * 1024;
  Fiber() : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    mapping_ = mmap(nullptr, kStackBytes + page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping_ == MAP_FAILED) throw std::bad_alloc();
    mprotect(mapping_, page_, PROT_NONE);
  }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber() { munmap(mapping_, kStackBytes + page_); }
  void* stack() const { return static_cast<char*>(mapping_) + page_; }

  ucontext_t context;
  bool done = false;
  int barrier_line = 0;  // where it waits, in this phase

 private:
  size_t page_;
  void* mapping_;
};

inline std::mutex launch_mutex;  // the state below is the process's: one launch at a time
inline Order order = Order::kForward;
inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()> body;  // the kernel call of the running launch
inline std::vector<std::unique_ptr<Fiber>> fibers;

inline void barrier(int line) {
  current->barrier_line = line;
  swapcontext(&current->context, &scheduler);
}

inline void fiber_main() {
  body();
  current->done = true;  // returning resumes the scheduler (uc_link)
}

// Runs one block; false where its threads did not all meet at the same barriers.
inline bool run_block(dim3 block, unsigned threads, std::mt19937& shuffle) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = *fibers[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack();
    f.context.uc_stack.ss_size = Fiber::kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.done = false;
  }
  std::vector<unsigned> turn(threads);
  std::iota(turn.begin(), turn.end(), 0u);
  if (order == Order::kReverse) std::reverse(turn.begin(), turn.end());
  for (;;) {  // one phase: every thread runs to its next barrier or its end
    if (order == Order::kShuffled) std::shuffle(turn.begin(), turn.end(), shuffle);
    for (unsigned t : turn) {
      current = fibers[t].get();
      threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      swapcontext(&scheduler, &current->context);
    }
    unsigned ended = 0;
    for (unsigned t = 0; t < threads; ++t) ended += fibers[t]->done;
    if (ended == threads) return true;
    if (ended != 0) return false;  // some returned while others wait at a barrier
    for (unsigned t = 1; t < threads; ++t) {
      if (fibers[t]->barrier_line != fibers[0]->barrier_line) return false;
    }
  }
}

}  // namespace fused_resnet::emulation

inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

template <typename... Params, typename... Args>
cudaError_t emulated_launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  using namespace fused_resnet::emulation;
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;  // what a launch of this shape gets on a GPU
  }
  std::lock_guard<std::mutex> lock(launch_mutex);
  gridDim = grid;
  blockDim = block;
  body = [&] { kernel(args...); };
  while (fibers.size() < threads) fibers.push_back(std::make_unique<Fiber>());
  std::mt19937 shuffle(12345);  // the same orders on every run
  bool ok = true;
  for (unsigned bz = 0; ok && bz < grid.z; ++bz) {
    for (unsigned by = 0; ok && by < grid.y; ++by) {
      for (unsigned bx = 0; ok && bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        ok = run_block(block, threads, shuffle);
      }
    }
  }
  body = nullptr;
  return ok ? cudaSuccess : cudaErrorLaunchFailure;
}

// The order in which each phase runs a block's threads (Order), for the launches that follow.
extern "C" void fr_set_thread_order(int order) {
  fused_resnet::emulation::order = static_cast<fused_resnet::emulation::Order>(order);
}
