// The bfloat16 kernels of the sm90 engine's 1×1 GEMM path (a file of their own: CUTLASS's conv and GEMM kernel headers
// clash in one translation unit; one dtype per file: nvcc builds them in parallel).
#include "cuda/conv_sm90_gemm.cuh"

namespace fused_resnet::cuda {
cudaError_t launch_gemm_sm90_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90_gemm::launch_typed<cutlass::bfloat16_t>(p, stream, check_only);
}
cudaError_t launch_gemm_wide_epilogue_sm90_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return sm90_gemm::launch_wide_epilogue_typed<cutlass::bfloat16_t>(p, stream, check_only);
}
}  // namespace fused_resnet::cuda
