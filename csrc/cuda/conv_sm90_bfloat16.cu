// The bfloat16 implicit-conv kernels of the sm90 CUTLASS engine on its wide tiles. One dtype and one tile
// shape per file, so that nvcc builds them in parallel: with both tiles in one file it was the longest compile of
// the build (76 s against 58 s for the wide tiles alone and 51 s for the narrow ones, sm_90a, measured on the 2-core
// development machine), which sets the build's time on a 16-core one. The narrow tiles: conv_sm90_next_bfloat16.cu.
#include "cuda/conv_sm90_cutlass.cuh"

namespace fused_resnet::cuda {
cudaError_t launch_conv_sm90_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90::launch_typed<cutlass::bfloat16_t>(p, stream, check_only);
}
}  // namespace fused_resnet::cuda
