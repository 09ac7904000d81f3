// The float16 implicit-conv kernels of the sm90 CUTLASS engine, wide and narrow tiles (one dtype per file: nvcc builds
// them in parallel; both tiles in one file: the CUTLASS headers are parsed once).
#include "cuda/conv_sm90_cutlass.cuh"

namespace fused_resnet::cuda {
cudaError_t launch_conv_sm90_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_typed<cutlass::half_t>(p, stream, check_only);
}

cudaError_t launch_conv_sm90_narrow_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_narrow_typed<cutlass::half_t>(p, stream, check_only);
}
}  // namespace fused_resnet::cuda
