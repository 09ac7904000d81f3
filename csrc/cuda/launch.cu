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
cudaError_t launch_conv_sm90_narrow_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_conv_sm90_narrow_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_conv_sm90_persistent_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_conv_sm90_persistent_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_conv_sm90_stem_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_conv_sm90_stem_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_gemm_sm90_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_gemm_sm90_bfloat16(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_gemm_wide_epilogue_sm90_half(const ConvBiasActParams& p, cudaStream_t stream, bool check_only);
cudaError_t launch_gemm_wide_epilogue_sm90_bfloat16(const ConvBiasActParams& p, cudaStream_t stream,
                                                    bool check_only);
#endif

namespace {
constexpr int kNarrowMaxCout = 64;  // the narrow conv tile's width
constexpr int kStemMaxChannels = 16;  // the stem tiles' K step; inputs of more channels take 64-deep ones
constexpr int kRoutes = static_cast<int>(Sm90Route::kIm2colGemm) + 1;
constexpr int kIm2colMaxChannels = 7;  // inputs the implicit conv cannot take: rows of under 8 channels
constexpr int kIm2colMaxDepth = 1024;
constexpr int kPaddedChannels = 8;  // 16 bytes of a 16-bit pixel: what TMA moves at least
std::atomic<long long> sm90_route_launches[kRoutes] = {};
std::atomic<bool> sm90_enabled{false};
std::atomic<bool> sm90_next_on{false};
std::atomic<int> trial_feature_mask{0};

// Whether one of the trial's changes (a Sm90TrialFeature) is on: on top of the next kernels only (launch.h).
bool trial_has(int feature) {
  return sm90_next_on.load(std::memory_order_relaxed) &&
         (trial_feature_mask.load(std::memory_order_relaxed) & feature) != 0;
}

[[maybe_unused]] bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }  // CUTLASS builds

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
  using Launcher = cudaError_t (*)(const ConvBiasActParams&, cudaStream_t, bool);
  struct Kernel {
    bool offered;
    Sm90Route route;
    Launcher half, bfloat16;
  };
  // In the order they are offered the call; each declines what its host-side checks refuse. The next kernels
  // first, where they are on; the trial's changes to them (set_sm90_trial_features) before those.
  const bool next = sm90_next_on.load(std::memory_order_relaxed);
  const Kernel kernels[] = {
      {trial_has(kTrialWideEpilogue) && pointwise(p), Sm90Route::kGemmWideEpilogue, launch_gemm_wide_epilogue_sm90_half,
       launch_gemm_wide_epilogue_sm90_bfloat16},
      {next && pointwise(p), Sm90Route::kGemm, launch_gemm_sm90_half, launch_gemm_sm90_bfloat16},
      {trial_has(kTrialStemTiles) && p.c <= kStemMaxChannels, Sm90Route::kStemConv, launch_conv_sm90_stem_half,
       launch_conv_sm90_stem_bfloat16},
      {next && p.cout <= kNarrowMaxCout, Sm90Route::kNarrowConv, launch_conv_sm90_narrow_half,
       launch_conv_sm90_narrow_bfloat16},
      {trial_has(kTrialPersistentConv), Sm90Route::kPersistentConv, launch_conv_sm90_persistent_half,
       launch_conv_sm90_persistent_bfloat16},
      {true, Sm90Route::kConv, launch_conv_sm90_half, launch_conv_sm90_bfloat16},
  };
  for (const Kernel& kernel : kernels) {
    if (!kernel.offered) continue;
    const cudaError_t err = (dtype == DType::kHalf ? kernel.half : kernel.bfloat16)(p, stream, check_only);
    if (err == cudaErrorNotSupported) continue;
    if (err == cudaSuccess) *route = kernel.route;
    return err;
  }
#else
  (void)dtype, (void)p, (void)stream, (void)check_only;
#endif
  return cudaErrorNotSupported;
}
}  // namespace

bool sm90_engine_built() {
#ifdef FUSED_RESNET_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

long long sm90_engine_launches(Sm90Route route) {
  if (route != Sm90Route::kNone) return sm90_route_launches[static_cast<int>(route)].load(std::memory_order_relaxed);
  long long total = 0;
  for (const auto& count : sm90_route_launches) total += count.load(std::memory_order_relaxed);
  return total;
}

void set_sm90_engine_enabled(bool enabled) { sm90_enabled.store(enabled, std::memory_order_relaxed); }

bool sm90_engine_enabled() { return sm90_enabled.load(std::memory_order_relaxed); }

void set_sm90_next_enabled(bool enabled) { sm90_next_on.store(enabled, std::memory_order_relaxed); }

bool sm90_next_enabled() { return sm90_next_on.load(std::memory_order_relaxed); }

void set_sm90_trial_features(int features) {
  trial_feature_mask.store(features & kTrialAll, std::memory_order_relaxed);
}

int sm90_trial_features() { return trial_feature_mask.load(std::memory_order_relaxed); }

int sm90_padded_channels(DType dtype, const ConvBiasActParams& p) {
  const bool takes = trial_has(kTrialStemTiles) && (dtype == DType::kHalf || dtype == DType::kBFloat16) &&
                     p.groups == 1 && p.in_scale == nullptr && p.c > 0 && p.c < kPaddedChannels;
  return takes ? kPaddedChannels : 0;
}

int sm90_im2col_depth(DType dtype, const ConvBiasActParams& p) {
  // 1x1 unpadded convs of stride 2-8 (projection shortcuts): their rows are the pixels they read, so that the
  // persistent GEMM takes them. On the implicit conv (non-persistent; their K is one tap, 4-16 steps) they ran at
  // 0.47-0.49x of cuDNN's conv on the H100 (benchmarks/results/2026-11-27_H100_run4), where the stride-1 1x1
  // layers on the GEMM ran at 0.79-1.00x. Strides past 8 stay declined, as on the implicit conv.
  const bool strided_pointwise = p.kh == 1 && p.kw == 1 && p.pad_h == 0 && p.pad_w == 0 &&
                                 (p.stride_h > 1 || p.stride_w > 1) && p.stride_h <= 8 && p.stride_w <= 8 &&
                                 p.c % 8 == 0;
  if (!sm90_next_on.load(std::memory_order_relaxed) || (dtype != DType::kHalf && dtype != DType::kBFloat16) ||
      p.groups != 1 || p.in_scale != nullptr || (p.c > kIm2colMaxChannels && !strided_pointwise)) {
    return 0;
  }
  const long long depth = (static_cast<long long>(p.kh) * p.kw * p.c + 7) / 8 * 8;  // rows of 16-byte granules
  return depth <= kIm2colMaxDepth ? static_cast<int>(depth) : 0;
}

ConvBiasActParams sm90_im2col_gemm_params(const ConvBiasActParams& p, int depth, int n0, int images, const void* rows,
                                          const void* weight_rows) {
  ConvBiasActParams q = p;
  const long long offset = static_cast<long long>(n0) * p.oh * p.ow * p.cout * 2;  // bytes: 16-bit elements
  q.x = rows;
  q.weight = weight_rows;
  q.y = static_cast<char*>(p.y) + offset;
  q.residual = p.residual == nullptr ? nullptr : static_cast<const char*>(p.residual) + offset;
  q.n = images, q.h = p.oh, q.w = p.ow, q.c = depth;
  q.kh = q.kw = 1;
  q.stride_h = q.stride_w = q.dil_h = q.dil_w = 1;
  q.pad_h = q.pad_w = 0;
  return q;
}

Sm90Route sm90_engine_route(DType dtype, const ConvBiasActParams& p) {
  Sm90Route route;
  if (const int channels = sm90_padded_channels(dtype, p); channels > 0) {
    ConvBiasActParams padded = p;
    padded.c = channels;
    // Stand-ins for the caller's padded copies of x and the filter (fresh allocations, aligned); the checks only
    // look at the addresses' alignment.
    padded.x = padded.weight = reinterpret_cast<const void*>(uintptr_t{1} << 20);
    sm90_call(dtype, padded, nullptr, /*check_only=*/true, &route);
    return route;
  }
  if (const int depth = sm90_im2col_depth(dtype, p); depth > 0) {
    // Stand-ins for the caller's row buffers (fresh allocations, aligned) in the host-side checks.
    sm90_call(dtype, sm90_im2col_gemm_params(p, depth, 0, p.n, p.y, p.y), nullptr, /*check_only=*/true, &route);
    const bool gemm = route == Sm90Route::kGemm || route == Sm90Route::kGemmWideEpilogue;
    return gemm ? Sm90Route::kIm2colGemm : Sm90Route::kNone;
  }
  sm90_call(dtype, p, nullptr, /*check_only=*/true, &route);
  return route;
}

cudaError_t launch_conv_bias_act_sm90(DType dtype, const ConvBiasActParams& p, cudaStream_t stream) {
  Sm90Route route;
  const cudaError_t err = sm90_call(dtype, p, stream, /*check_only=*/false, &route);
  if (err == cudaSuccess) sm90_route_launches[static_cast<int>(route)].fetch_add(1, std::memory_order_relaxed);
  return err;
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
