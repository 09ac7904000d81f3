// The float16 narrow-tile kernels of the sm90 CUTLASS engine (one dtype per file: nvcc builds them in parallel).
#include "cuda/conv_sm90_cutlass.cuh"

namespace fused_resnet::cuda {
cudaError_t launch_conv_sm90_narrow_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_narrow_typed<cutlass::half_t>(p, stream, check_only);
}
}  // namespace fused_resnet::cuda
