// The float instantiation of the conv_bias_act kernels (one dtype per file: nvcc builds them in parallel).
#include "cuda/conv_bias_act_kernel.cuh"

namespace fused_resnet::cuda {
template cudaError_t launch_conv_bias_act_typed<float>(const ConvBiasActParams&, cudaStream_t);
}  // namespace fused_resnet::cuda
