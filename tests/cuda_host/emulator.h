// Runs the extension's simple CUDA kernels on a CPU, for CI without a GPU. A block's threads become fibers
// (ucontext) of one OS thread, run in thread-index order, each until it reaches __syncthreads or returns; when every
// live thread has, the next phase starts. A thread that has returned no longer counts at the barrier, as on a GPU.
// Blocks run one after another, so function-static arrays play a block's shared memory.
//
// This checks a kernel's logic (indexing, bounds, vector paths, merge order, barrier placement: a thread that reads
// what higher threads write before the barrier reads stale values, deterministically), never its speed or code
// generation. Include it before the kernel file and compile with g++ -DFUSED_RESNET_HOST_EMULATION
// (csrc/cuda/kernel_launch.cuh then launches through emulated_launch).
#pragma once

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime_api.h>
#include <ucontext.h>
#include <vector_functions.h>

#include <cmath>
#include <functional>
#include <memory>
#include <vector>

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fused_resnet::emulation {

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  bool done = false;
};

inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()> body;  // the kernel call of the running launch
inline std::vector<Fiber> fibers;

inline void fiber_main() {
  body();
  current->done = true;  // returning resumes the scheduler (uc_link)
}

}  // namespace fused_resnet::emulation

inline void __syncthreads() {
  using namespace fused_resnet::emulation;
  swapcontext(&current->context, &scheduler);
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

template <typename... Params, typename... Args>
cudaError_t emulated_launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  using namespace fused_resnet::emulation;
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    return cudaErrorInvalidConfiguration;  // what a launch of this shape gets on a GPU
  }
  gridDim = grid;
  blockDim = block;
  body = [&] { kernel(args...); };
  if (fibers.size() < threads) fibers.resize(threads);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = fibers[t];
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &scheduler;
          makecontext(&f.context, fiber_main, 0);
          f.done = false;
        }
        for (bool live = true; live;) {  // one phase: every live thread runs to its next barrier or its end
          live = false;
          for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            current = &fibers[t];
            threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
            swapcontext(&scheduler, &current->context);
            live = live || !current->done;
          }
        }
      }
    }
  }
  body = nullptr;
  return cudaSuccess;
}
