// The bfloat16 implicit-conv kernels of the sm90 engine's next kernels: narrow 128x64 tiles for at most 64 output
// channels, the trial's persistent conv (conv_sm90_persistent.cuh) and its stem tiles (16-deep K steps). A file of
// their own: see conv_sm90_bfloat16.cu.
#include "cuda/conv_sm90_persistent.cuh"

namespace fused_resnet::cuda {
cudaError_t launch_conv_sm90_narrow_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_narrow_typed<cutlass::bfloat16_t>(p, stream, check_only);
}
cudaError_t launch_conv_sm90_persistent_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_persistent_typed<cutlass::bfloat16_t>(p, stream, check_only);
}
cudaError_t launch_conv_sm90_stem_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_stem_typed<cutlass::bfloat16_t>(p, stream, check_only);
}
}  // namespace fused_resnet::cuda
