// Entry points of launch.h: the conv_bias_act dtype switch, and the standalone epilogue kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/conv_bias_act_kernel.cuh"
#include "cuda/elem.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda {

cudaError_t launch_conv_bias_act(DType dtype, const ConvBiasActParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf:
      return launch_conv_bias_act_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_conv_bias_act_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat:
      return launch_conv_bias_act_typed<float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------------------------------------
// out = act(y + bias[c] + residual): one grid-stride pass, math in fp32 (fp64 for fp64), one rounding.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void bias_residual_relu_kernel(const T* __restrict__ y, const typename AccMath<T>::Acc* __restrict__ bias,
                                          const T* __restrict__ residual, T* out, long long total, long long channels,
                                          bool relu) {
  using M = AccMath<T>;
  using Acc = typename M::Acc;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    Acc v = M::load(y[i]) + bias[i % channels];
    if (residual != nullptr) v += M::load(residual[i]);
    if (relu) v = v < Acc(0) ? Acc(0) : v;  // keeps NaN, as torch.relu does
    out[i] = M::store(v);
  }
}

template <typename T>
cudaError_t launch_epilogue(const void* y, const void* bias, const void* residual, void* out, long long total,
                            long long channels, bool relu, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const long long blocks = std::min<long long>((total + kThreads - 1) / kThreads, 1ll << 20);
  bias_residual_relu_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(y), static_cast<const typename AccMath<T>::Acc*>(bias),
      static_cast<const T*>(residual), static_cast<T*>(out), total, channels, relu);
  return cudaGetLastError();
}

cudaError_t launch_bias_residual_relu(DType dtype, const void* y, const void* bias, const void* residual, void* out,
                                      int64_t rows, int64_t channels, bool relu, cudaStream_t stream) {
  const long long total = static_cast<long long>(rows) * channels;
  if (total == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kHalf:
      return launch_epilogue<__half>(y, bias, residual, out, total, channels, relu, stream);
    case DType::kBFloat16:
      return launch_epilogue<__nv_bfloat16>(y, bias, residual, out, total, channels, relu, stream);
    case DType::kFloat:
      return launch_epilogue<float>(y, bias, residual, out, total, channels, relu, stream);
    case DType::kDouble:
      return launch_epilogue<double>(y, bias, residual, out, total, channels, relu, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fused_resnet::cuda
