// One way to launch the elementwise and reduction kernels, so that their logic can also run on a CPU: the host
// emulation of tests/cuda_host/ (FUSED_RESNET_HOST_EMULATION) declares emulated_launch before it includes a kernel
// file, and the tests then run the very kernels of that file on CPU tensors, since CI has no GPU.
#pragma once

#include <cuda_runtime_api.h>

#include <tuple>

namespace fused_resnet::cuda {

// kernel<<<grid, block, 0, stream>>>(args...); returns the launch error, if any. Brace-initialised parameters:
// like <<<>>>, no void* to T* and no narrowing conversions.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
#if defined(FUSED_RESNET_HOST_EMULATION)
  (void)stream;
  return emulated_launch(kernel, grid, block, Params{args}...);
#else
  kernel<<<grid, block, 0, stream>>>(Params{args}...);
  return cudaGetLastError();
#endif
}

// The same with the arguments in a tuple: one argument list for a kernel and its twin (e.g. the 16-byte one).
template <typename Kernel, typename... Args>
cudaError_t launch_with(Kernel kernel, dim3 grid, dim3 block, cudaStream_t stream, const std::tuple<Args...>& args) {
  return std::apply([&](auto... a) { return launch_kernel(kernel, grid, block, stream, a...); }, args);
}

}  // namespace fused_resnet::cuda
