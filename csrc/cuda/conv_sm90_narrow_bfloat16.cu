// The bfloat16 implicit-conv kernels of the sm90 CUTLASS engine on its narrow tiles, 128x64 for at most 64 output
// channels (a file of their own: see conv_sm90_bfloat16.cu).
#include "cuda/conv_sm90_cutlass.cuh"

namespace fused_resnet::cuda {
cudaError_t launch_conv_sm90_narrow_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_narrow_typed<cutlass::bfloat16_t>(p, stream, check_only);
}
}  // namespace fused_resnet::cuda
