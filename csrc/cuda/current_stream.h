// The stream an op implementation launches on: the current CUDA stream of its tensors' device (the caller holds a
// device guard for that device). For the torch-facing op files only; the kernel files stay torch-free.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

namespace fused_resnet::cuda {

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace fused_resnet::cuda
