// The torch-free interface between the CUDA kernels (csrc/cuda/*.cu, compiled by nvcc without torch headers)
// and their torch bindings (csrc/cuda/ops_cuda.cpp, bn_train_ops.cpp; compiled by g++): raw pointers, sizes
// and a stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_resnet::cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// One conv_bias_act call over dense NHWC tensors: x [N, H, W, C], weight [Cout, KH, KW, C/groups] (a
// channels_last (Cout, C/groups, KH, KW) tensor), residual and y [N, OH, OW, Cout], per-channel vectors fp32.
struct ConvBiasActParams {
  const void* x;
  const void* weight;
  const float* bias;      // [Cout]
  const void* residual;   // nullptr: none
  const float* in_scale;  // [C]; nullptr: no prologue
  const float* in_shift;  // [C]
  void* y;
  int n, h, w, c;
  int cout, kh, kw;
  int oh, ow;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int groups;
  bool relu;
  int sm_count;  // of the device the stream belongs to, for the tile-size choice
};

// Launches act(conv(pre(x), weight) + bias + residual) on `stream` (dtype: kHalf, kBFloat16 or kFloat as TF32).
// Callers guarantee N*OH*OW < 2^31 - 256 and groups <= 65535. Returns the launch error, if any.
cudaError_t launch_conv_bias_act(DType dtype, const ConvBiasActParams& p, cudaStream_t stream);

// The Hopper engine: the same op through CUTLASS's sm90 kernels (TMA, warp-specialized wgmma) with the fused
// epilogue, for the calls it can take: float16/bfloat16, ungrouped, no prologue, Cin and Cout multiples of 8,
// 16-byte aligned tensors, on a compute capability 9.0 device (the caller checks the device). The convs run as an
// implicit GEMM (conv_sm90_cutlass.cuh); with the next kernels on, 1x1 stride-1 unpadded convs run as a persistent
// GEMM (conv_sm90_gemm.cuh) and those of at most 64 output channels on narrower tiles. Returns
// cudaErrorNotSupported for any other call, and always where the extension was built without CUTLASS or without
// sm_90a; the caller then runs launch_conv_bias_act.
bool sm90_engine_built();
cudaError_t launch_conv_bias_act_sm90(DType dtype, const ConvBiasActParams& p, cudaStream_t stream);
// Which of its kernels would take the call, by its host-side checks alone (no device needed): the implicit conv
// with 128x128 tiles (kConv) or, with the next kernels on, 128x64 tiles (kNarrowConv: at most 64 output channels),
// the GEMM (kGemm), or the GEMM over im2col rows the caller lays out (kIm2colGemm, below); with the trial on also the
// persistent conv (kPersistentConv), the GEMM's wide-epilogue kernel (kGemmWideEpilogue) and the stem tiles
// (kStemConv: inputs of at most 16 channels, without a residual).
enum class Sm90Route { kNone, kConv, kNarrowConv, kGemm, kPersistentConv, kGemmWideEpilogue, kStemConv, kIm2colGemm };
Sm90Route sm90_engine_route(DType dtype, const ConvBiasActParams& p);

// The next kernels' path for convs of under 8 input channels (an RGB stem), which TMA cannot load as an implicit
// GEMM (16-byte pixel rows), and for 1x1 unpadded convs of stride 2-8 (projection shortcuts, whose rows are the
// pixels they read): the caller lays each output pixel's input window out as a row of sm90_im2col_depth(dtype, p)
// values (launch_im2col) and runs the call of sm90_im2col_gemm_params on the rows, a 1x1 conv that the GEMM takes.
// Depth 0: not this path.
int sm90_im2col_depth(DType dtype, const ConvBiasActParams& p);
// The GEMM call over the rows of `images` images: x = the rows, weight = [Cout, depth] (the filter in (kh, kw, c)
// order, zero past KH*KW*C); y and residual offset to image n0.
ConvBiasActParams sm90_im2col_gemm_params(const ConvBiasActParams& p, int depth, int n0, int images, const void* rows,
                                          const void* weight_rows);
// rows[(i - n0) * OH * OW + pixel, k] for images i in [n0, n0 + images): the input window of the output pixel in
// (kh, kw, c) order, zero in the padding and past KH*KW*C (16-bit dtypes; a bit copy).
cudaError_t launch_im2col(const ConvBiasActParams& p, int n0, int images, void* rows, int depth,
                          cudaStream_t stream);
// Kernel launches of the Hopper engine, on one of its kernels or on all of them for kNone: one per call, but one
// per chunk of images on the im2col path (tests use these to tell which kernel took a call).
long long sm90_engine_launches(Sm90Route route = Sm90Route::kNone);
// Whether the CUDA op offers its calls to the Hopper engine first (process-wide; off until the engine has passed
// the GPU check: see fused_resnet/ops/cpp_backend.py, set_cuda_engine), and whether that engine uses its next
// kernels: 1x1 convs on the GEMM path (strided ones over their gathered pixels), narrow tiles, im2col rows for
// small-channel inputs (off by default: until they have passed the GPU check, see cpp_backend.py).
void set_sm90_engine_enabled(bool enabled);
bool sm90_engine_enabled();
void set_sm90_next_enabled(bool enabled);
bool sm90_next_enabled();
// The trial: changes to the next kernels that a GPU run is to judge against them, on top of them (so only with the
// next kernels on), on disjoint layers: the convs of over 64 output channels without a residual that the GEMM does
// not take on a persistent ping-pong kernel (conv_sm90_persistent.cuh), 64x64 epilogue subtiles on the GEMM for
// calls with a residual (conv_sm90_gemm.cuh, WideEpilogue), and inputs of under 8 channels padded to 8 (below) for
// tiles with 16-deep K steps.
// Each change is on or off by itself (a mask of Sm90TrialFeature), so that one whose kernel fails its first GPU run
// can be left out while the others are measured (fused_resnet/ops/engine_smoke.py).
enum Sm90TrialFeature : int {
  kTrialPersistentConv = 1,  // route kPersistentConv
  kTrialWideEpilogue = 2,    // route kGemmWideEpilogue
  kTrialStemTiles = 4,       // route kStemConv, and the padding of inputs of under 8 channels (below)
  kTrialAll = 7,
};
void set_sm90_trial_features(int features);
int sm90_trial_features();
// The trial's path for inputs of under 8 channels (an RGB stem), in place of the im2col rows: x and the filter
// copied with their channels padded by zeros to 8 (16-byte pixels, which TMA's im2col loads address), then the call
// on those as any other, which takes the trial's stem tiles (16-deep K steps: conv_sm90_cutlass.cuh, StemTile). The
// stem as rows wrote and read 152 values a pixel (7x7x3, padded to 16 bytes), 9.5x its input, and ran at cuDNN's
// 1.8 ms (H100, b256), about a fifth of the model's time and far from either roofline. Padded, the input is 8 values a
// pixel, and the 16-deep K steps make 5.3x the stem's multiply-adds (the 64-deep ones of the other tiles, 21x: each
// K step holds one filter tap). Estimates, not yet run. Returns the padded channel count (8), or 0 where the call does
// not take this path.
int sm90_padded_channels(DType dtype, const ConvBiasActParams& p);

// out = act(y + bias[c] + residual) over `rows` NHWC pixels of `channels` channels; out may be y.
// bias is fp64 for kDouble, fp32 otherwise.
cudaError_t launch_bias_residual_relu(DType dtype, const void* y, const void* bias, const void* residual, void* out,
                                      int64_t rows, int64_t channels, bool relu, cudaStream_t stream);

// The training path's passes over a conv output y (csrc/cuda/bn_train.cu; maths as csrc/cpu/bn_train.cpp): dense
// NHWC tensors of `rows` pixels x `channels` in `dtype`; per-channel vectors in the accumulation type (fp64 for
// kDouble, fp32 otherwise). The reductions need a workspace of bn_workspace_elements(rows, channels) values of the
// accumulation type. Each returns the launch error, if any.
struct BnPassParams {
  DType dtype;
  const void* y;
  const void* g;         // grad_sums, grad_input: the incoming gradient
  const void* residual;  // nullptr: none
  const void* residual_scale;  // per channel, nullptr: 1 (a projection shortcut's raw conv output and BN scale)
  const void* scale;     // z = y*scale + shift [+ residual*residual_scale]
  const void* shift;
  const void* mean;      // grad_sums
  const void* a;         // grad_input: a*g' + b*y + c
  const void* b;
  const void* c;
  void* out;             // normalize: act(z); grad_input: dL/dy; grad_sums: g' (nullptr: not stored)
  void* sum0;            // stats: mean; grad_sums: sum g'
  void* sum1;            // stats: M2; grad_sums: sum g'*(y - mean)
  void* workspace;
  int64_t rows, channels;
  bool relu;
};

int64_t bn_workspace_elements(int64_t rows, int64_t channels);
// Rows a thread of the 16-byte normalize, backward-sum and input-gradient kernels loads before using any: 1, 2 or 4
// (false for others), process-wide, 1 unless set. More bytes in flight against more registers per thread: which
// is faster is measured on a GPU by benchmarks/bn_passes_bench.py (bn_train.cu says more).
bool set_bn_rows_per_thread(int rows);
int bn_rows_per_thread();
cudaError_t launch_bn_stats(const BnPassParams& p, cudaStream_t stream);

// What follows the statistics in a train-mode unit (fused_resnet/training/channel_math.py's finalize, the same
// formulas in the same order), done by the kernel that merges them instead of by a launch of its own: invstd =
// 1/sqrt(M2/count + eps), the running stats moved towards (mean, M2/(count - 1)) by `factor` as torch.lerp moves
// them, scale = gamma*invstd, shift = beta - mean*scale. fp32 vectors of `channels` values; 16- and 32-bit y only.
struct BnFinalizeParams {
  const float* gamma;    // nullptr: scale = invstd
  const float* beta;     // nullptr: shift = -mean*scale
  float* running_mean;   // nullptr: no running-stat update (then running_var too)
  float* running_var;
  float* invstd;
  float* scale;
  float* shift;
  float count, eps, factor;
};
cudaError_t launch_bn_stats_finalize(const BnPassParams& p, const BnFinalizeParams& f, cudaStream_t stream);
cudaError_t launch_bn_normalize(const BnPassParams& p, cudaStream_t stream);
cudaError_t launch_bn_grad_sums(const BnPassParams& p, cudaStream_t stream);

// What follows the backward's sums in a train-mode unit (fused_resnet/training/channel_math.py's coefficients, the
// same formulas in the same order), done by the kernel that merges them instead of by a launch of its own: with
// k = invstd^2 * sum_gy / count, b = -a*k and c = a*(k*mean - sum_g/count) (dL/dy = a*g' + b*y + c), and
// grad_gamma = sum_gy * invstd. fp32 vectors of `channels` values; 16- and 32-bit y only.
struct BnCoefficientParams {
  const float* a;       // the unit's scale, gamma*invstd
  const float* invstd;
  const float* mean;
  float* grad_gamma;
  float* b;
  float* c;
  float count;
};
cudaError_t launch_bn_grad_sums_coefficients(const BnPassParams& p, const BnCoefficientParams& coef,
                                             cudaStream_t stream);
cudaError_t launch_bn_grad_input(const BnPassParams& p, cudaStream_t stream);

// The stem's max-pool in training (max_pool.cu): dense NHWC tensors of n images, c channels a multiple of 16 bytes
// of values, every pointer 16-byte aligned, dilation 1 (cudaErrorInvalidValue otherwise; fp64 too).
struct MaxPoolParams {
  DType dtype;
  const void* x;      // forward: the pooled tensor [n, h, w, c]; backward: the unit's conv output y [n, h, w, c]
  const void* g;      // backward: the gradient of the pooled output [n, oh, ow, c]
  const void* scale;  // backward: fp32 vectors of c values, act = act(y*scale + shift) as bn_train.cu's normalize
  const void* shift;
  void* out;          // forward: [n, oh, ow, c]; backward: dL/d act [n, h, w, c]
  void* workspace;    // backward: max_pool_backward_workspace_bytes(p) bytes, 8-byte aligned
  int64_t n, h, w, c, oh, ow;
  int kh, kw, sh, sw, ph, pw;  // kernel, stride, padding
  bool relu;                   // backward: act is relu (keeping NaN) or the identity
};
// Windows along an axis of `size` values, torch's pooling_output_shape at dilation 1 (< 1: too small an input).
int64_t pooled_size(int64_t size, int kernel, int stride, int pad, bool ceil_mode);
cudaError_t launch_max_pool(const MaxPoolParams& p, cudaStream_t stream);
int64_t max_pool_backward_workspace_bytes(const MaxPoolParams& p);
// Windows of fewer than 255 taps (kh*kw) only, else cudaErrorInvalidValue.
cudaError_t launch_max_pool_bn_act_backward(const MaxPoolParams& p, cudaStream_t stream);

}  // namespace fused_resnet::cuda
