// Entry points of launch.h: the conv_bias_act dtype switch, and the standalone epilogue kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

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
// The Hopper engine's entry: which calls it takes (conv_sm90_<dtype>.cu hold its kernels).
// ---------------------------------------------------------------------------------------------------------
#ifdef FUSED_RESNET_WITH_CUTLASS
cudaError_t launch_conv_sm90_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_conv_sm90_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_gemm_sm90_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_gemm_sm90_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
#endif

namespace {
constexpr int kPaddedChannels = 8;  // 16-byte pixel rows in 16-bit dtypes: what TMA moves
std::atomic<long long> sm90_launches{0};
std::atomic<long long> sm90_gemm_launches{0};
std::atomic<bool> sm90_enabled{false};
std::atomic<bool> sm90_next_on{false};

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A 1x1, stride-1, unpadded conv is a plain GEMM over the NHWC pixels (conv_sm90_gemm.cuh says why it has its own
// kernel).
bool pointwise(const ConvBiasActParams& p) {
  return p.kh == 1 && p.kw == 1 && p.stride_h == 1 && p.stride_w == 1 && p.pad_h == 0 && p.pad_w == 0;
}

// Runs (or with check_only, only checks) the call on the Hopper kernel that takes it, and says which in *route.
cudaError_t sm90_call(DType dtype, const ConvBiasActParams& p, cudaStream_t stream, bool check_only,
                      Sm90Route* route) {
  *route = Sm90Route::kNone;
#ifdef FUSED_RESNET_WITH_CUTLASS
  // TMA moves 16-byte granules: channel counts and every base address must keep rows on them. Its im2col mode
  // traverses at most 8 elements per step (cuTensorMapEncodeIm2col's elementStrides), which CUTLASS's
  // can_implement does not check: larger conv strides would get a broken descriptor.
  const bool takes = p.groups == 1 && p.in_scale == nullptr && p.c % 8 == 0 && p.cout % 8 == 0 && p.stride_h <= 8 &&
                     p.stride_w <= 8 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.y) &&
                     (p.residual == nullptr || aligned16(p.residual)) && aligned16(p.bias);
  if (!takes || (dtype != DType::kHalf && dtype != DType::kBFloat16)) return cudaErrorNotSupported;
  if (sm90_next_on.load(std::memory_order_relaxed) && pointwise(p)) {
    const cudaError_t err = dtype == DType::kHalf ? launch_gemm_sm90_half(p, stream, check_only)
                                                  : launch_gemm_sm90_bfloat16(p, stream, check_only);
    if (err != cudaErrorNotSupported) {
      if (err == cudaSuccess) *route = Sm90Route::kGemm;
      return err;
    }
  }
  const cudaError_t err = dtype == DType::kHalf ? launch_conv_sm90_half(p, stream, check_only)
                                                : launch_conv_sm90_bfloat16(p, stream, check_only);
  if (err == cudaSuccess) *route = Sm90Route::kConv;
  return err;
#else
  (void)dtype, (void)p, (void)stream, (void)check_only;
  return cudaErrorNotSupported;
#endif
}
}  // namespace

bool sm90_engine_built() {
#ifdef FUSED_RESNET_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

long long sm90_engine_launches() { return sm90_launches.load(std::memory_order_relaxed); }

long long sm90_engine_gemm_launches() { return sm90_gemm_launches.load(std::memory_order_relaxed); }

void set_sm90_engine_enabled(bool enabled) { sm90_enabled.store(enabled, std::memory_order_relaxed); }

bool sm90_engine_enabled() { return sm90_enabled.load(std::memory_order_relaxed); }

void set_sm90_next_enabled(bool enabled) { sm90_next_on.store(enabled, std::memory_order_relaxed); }

bool sm90_next_enabled() { return sm90_next_on.load(std::memory_order_relaxed); }

int sm90_padded_channels(DType dtype, const ConvBiasActParams& p) {
  const bool pads = sm90_next_on.load(std::memory_order_relaxed) &&
                    (dtype == DType::kHalf || dtype == DType::kBFloat16) && p.groups == 1 && p.c < kPaddedChannels &&
                    p.in_scale == nullptr;
  return pads ? kPaddedChannels : 0;
}

Sm90Route sm90_engine_route(DType dtype, const ConvBiasActParams& p) {
  Sm90Route route;
  if (const int padded = sm90_padded_channels(dtype, p); padded > 0) {
    ConvBiasActParams q = p;
    q.c = padded;  // the caller's padded copies: fresh allocations, aligned
    sm90_call(dtype, q, nullptr, /*check_only=*/true, &route);
    return route == Sm90Route::kNone ? Sm90Route::kNone : Sm90Route::kPadded;
  }
  sm90_call(dtype, p, nullptr, /*check_only=*/true, &route);
  return route;
}

cudaError_t launch_conv_bias_act_sm90(DType dtype, const ConvBiasActParams& p, cudaStream_t stream) {
  Sm90Route route;
  const cudaError_t err = sm90_call(dtype, p, stream, /*check_only=*/false, &route);
  if (err == cudaSuccess) {
    sm90_launches.fetch_add(1, std::memory_order_relaxed);
    if (route == Sm90Route::kGemm) sm90_gemm_launches.fetch_add(1, std::memory_order_relaxed);
  }
  return err;
}

// ---------------------------------------------------------------------------------------------------------
// Channel padding for the Hopper engine: a thread per pixel builds its 8-channel row (16 bytes) in registers and
// stores it at once.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void pad_channels_kernel(const T* __restrict__ x, T* __restrict__ out, long long pixels, int channels) {
  static_assert(sizeof(T) * kPaddedChannels == sizeof(uint4), "a padded row is one 16-byte store");
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < pixels; i += step) {
    uint4 row = make_uint4(0, 0, 0, 0);  // all-zero bits: +0 in half and bfloat16
    T* values = reinterpret_cast<T*>(&row);
    for (int c = 0; c < channels; ++c) values[c] = x[i * channels + c];
    reinterpret_cast<uint4*>(out)[i] = row;
  }
}

cudaError_t launch_pad_channels(DType dtype, const void* x, void* out, int64_t pixels, int channels, int padded,
                                cudaStream_t stream) {
  if (padded != kPaddedChannels || channels < 1 || channels > padded) return cudaErrorInvalidValue;
  if (pixels == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<long long>((pixels + kThreads - 1) / kThreads, 1ll << 16));
  switch (dtype) {
    case DType::kHalf:
      pad_channels_kernel<__half>
          <<<blocks, kThreads, 0, stream>>>(static_cast<const __half*>(x), static_cast<__half*>(out), pixels, channels);
      return cudaGetLastError();
    case DType::kBFloat16:
      pad_channels_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(out), pixels, channels);
      return cudaGetLastError();
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
