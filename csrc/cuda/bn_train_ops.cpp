// CUDA implementations of the train-mode BN pass ops (schemas in csrc/ops.cpp; CPU twins in csrc/cpu/bn_train.cpp):
// check, allocate channels_last outputs and the reductions' workspace, launch csrc/cuda/bn_train.cu on the current
// stream of y's device.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"
#include "cuda/current_stream.h"
#include "cuda/kernel_dtype.h"
#include "cuda/launch.h"
#include "message.h"

namespace fused_resnet::cuda {
namespace {

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;
constexpr int64_t kMaxChannels = 32 * 65535;  // 32 channels per block, grid.y <= 65535 (bn_train.cu)

// y, the gradient and the residual as dense NHWC tensors (the residual's per-channel scale beside it), kept alive
// for the launch.
struct NhwcInputs {
  at::Tensor y, g;
  std::optional<at::Tensor> residual, residual_scale;
};

NhwcInputs nhwc_inputs(const char* op, const at::Tensor& y, const std::optional<at::Tensor>& g,
                       const std::optional<at::Tensor>& residual,
                       const std::optional<at::Tensor>& residual_scale = std::nullopt) {
  check_bn_y(op, c10::DeviceType::CUDA, y);
  if (g.has_value()) check_bn_like(op, "grad", *g, y);
  if (residual.has_value()) check_bn_like(op, "residual", *residual, y);
  check_bn_residual_scale(op, residual, residual_scale, y);
  NhwcInputs in{y.contiguous(kChannelsLast), g.has_value() ? g->contiguous(kChannelsLast) : at::Tensor(), {}, {}};
  if (residual.has_value()) in.residual = residual->contiguous(kChannelsLast);
  in.residual_scale = residual_scale;
  return in;
}

BnPassParams params(const NhwcInputs& in) {
  BnPassParams p{};
  p.dtype = kernel_dtype(in.y.scalar_type());
  p.y = in.y.const_data_ptr();
  p.g = in.g.defined() ? in.g.const_data_ptr() : nullptr;
  p.residual = in.residual.has_value() ? in.residual->const_data_ptr() : nullptr;
  p.residual_scale = in.residual_scale.has_value() ? in.residual_scale->const_data_ptr() : nullptr;
  p.channels = in.y.size(1);
  p.rows = p.channels == 0 ? 0 : in.y.numel() / p.channels;
  FR_CHECK(p.channels <= kMaxChannels, "the CUDA training kernels take at most ", kMaxChannels,
           " channels, got ", p.channels);
  return p;
}

at::Tensor workspace(const at::Tensor& y, const BnPassParams& p) {
  return at::empty({bn_workspace_elements(p.rows, p.channels)}, bn_accumulation_options(y));
}

// A per-channel output the reduction's merge kernel writes whole; zeros where there is nothing to reduce.
at::Tensor per_channel_result(const at::Tensor& y, const BnPassParams& p) {
  at::Tensor out = at::empty({y.size(1)}, bn_accumulation_options(y));
  if (p.rows == 0) out.zero_();
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& y_in) {
  const NhwcInputs in = nhwc_inputs("bn_stats", y_in, std::nullopt, std::nullopt);
  c10::cuda::CUDAGuard guard(y_in.device());
  BnPassParams p = params(in);
  at::Tensor mean = per_channel_result(y_in, p), m2 = per_channel_result(y_in, p);
  const at::Tensor ws = workspace(y_in, p);
  p.workspace = ws.mutable_data_ptr();
  p.sum0 = mean.mutable_data_ptr();
  p.sum1 = m2.mutable_data_ptr();
  C10_CUDA_CHECK(launch_bn_stats(p, stream_of(y_in)));
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_finalize_cuda(
    const at::Tensor& y_in, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double count,
    double eps, double factor) {
  const char* op = "bn_stats_finalize";
  const NhwcInputs in = nhwc_inputs(op, y_in, std::nullopt, std::nullopt);
  FR_CHECK(y_in.scalar_type() != at::kDouble, op, ": fp64 statistics are finalized in fp64 by the caller");
  FR_CHECK(running_mean.has_value() == running_var.has_value(), op,
           ": give both running_mean and running_var, or neither");
  for (const auto& [name, v] : {std::pair{"gamma", &gamma}, std::pair{"beta", &beta},
                                std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    if (v->has_value()) check_bn_vector(op, name, **v, y_in);
  }
  c10::cuda::CUDAGuard guard(y_in.device());
  BnPassParams p = params(in);
  // nn.BatchNorm2d refuses a batch of one value per channel; the count divides what the kernel reduced.
  FR_CHECK(p.rows > 1 && count == static_cast<double>(p.rows), op, ": count must be the ", p.rows,
           " values per channel of y (and more than 1), got ", count);
  at::Tensor mean = per_channel_result(y_in, p), m2 = per_channel_result(y_in, p);
  at::Tensor invstd = per_channel_result(y_in, p), scale = per_channel_result(y_in, p);
  at::Tensor shift = per_channel_result(y_in, p);
  const at::Tensor ws = workspace(y_in, p);
  p.workspace = ws.mutable_data_ptr();
  p.sum0 = mean.mutable_data_ptr();
  p.sum1 = m2.mutable_data_ptr();
  BnFinalizeParams f{};
  f.gamma = gamma.has_value() ? gamma->const_data_ptr<float>() : nullptr;
  f.beta = beta.has_value() ? beta->const_data_ptr<float>() : nullptr;
  f.running_mean = running_mean.has_value() ? running_mean->mutable_data_ptr<float>() : nullptr;
  f.running_var = running_var.has_value() ? running_var->mutable_data_ptr<float>() : nullptr;
  f.invstd = invstd.mutable_data_ptr<float>();
  f.scale = scale.mutable_data_ptr<float>();
  f.shift = shift.mutable_data_ptr<float>();
  f.count = static_cast<float>(count);
  f.eps = static_cast<float>(eps);
  f.factor = static_cast<float>(factor);
  C10_CUDA_CHECK(launch_bn_stats_finalize(p, f, stream_of(y_in)));
  return {mean, m2, invstd, scale, shift};
}

at::Tensor bn_normalize_cuda(const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& residual, bool relu,
                             const std::optional<at::Tensor>& residual_scale) {
  const char* op = "bn_normalize";
  const NhwcInputs in = nhwc_inputs(op, y_in, std::nullopt, residual, residual_scale);
  check_bn_vector(op, "scale", scale, y_in);
  check_bn_vector(op, "shift", shift, y_in);
  c10::cuda::CUDAGuard guard(y_in.device());
  at::Tensor out = empty_channels_last(y_in.sizes(), y_in.options());
  BnPassParams p = params(in);
  p.scale = scale.const_data_ptr();
  p.shift = shift.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.relu = relu;
  C10_CUDA_CHECK(launch_bn_normalize(p, stream_of(y_in)));
  return out;
}

// bn_grad_sums' checked inputs.
NhwcInputs grad_sums_inputs(const char* op, const at::Tensor& g_in, const at::Tensor& y_in, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                            const at::Tensor& mean, const std::optional<at::Tensor>& residual_scale) {
  NhwcInputs in = nhwc_inputs(op, y_in, g_in, residual, residual_scale);
  for (const auto& [name, v] : {std::pair{"scale", scale}, {"shift", shift}, {"mean", mean}}) {
    check_bn_vector(op, name, v, y_in);
  }
  return in;
}

// bn_grad_sums' outputs and parameters, under the caller's device guard; the launch is the caller's.
struct GradSumsCall {
  BnPassParams p;
  at::Tensor sum_g, sum_gy, masked, workspace;
};

GradSumsCall grad_sums_call(const NhwcInputs& in, const at::Tensor& y_in, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& mean, bool relu, bool store_masked) {
  GradSumsCall call{params(in), {}, {}, {}, {}};
  BnPassParams& p = call.p;
  call.sum_g = per_channel_result(y_in, p);
  call.sum_gy = per_channel_result(y_in, p);
  call.masked = store_masked ? empty_channels_last(y_in.sizes(), y_in.options())
                             : at::empty({0}, bn_accumulation_options(y_in));
  call.workspace = workspace(y_in, p);
  p.workspace = call.workspace.mutable_data_ptr();
  p.scale = scale.const_data_ptr();
  p.shift = shift.const_data_ptr();
  p.mean = mean.const_data_ptr();
  p.out = store_masked ? call.masked.mutable_data_ptr() : nullptr;
  p.sum0 = call.sum_g.mutable_data_ptr();
  p.sum1 = call.sum_gy.mutable_data_ptr();
  p.relu = relu;
  return call;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_grad_sums_cuda(const at::Tensor& g_in, const at::Tensor& y_in,
                                                                 const at::Tensor& scale, const at::Tensor& shift,
                                                                 const std::optional<at::Tensor>& residual,
                                                                 const at::Tensor& mean, bool relu,
                                                                 bool store_masked,
                                                                 const std::optional<at::Tensor>& residual_scale) {
  const NhwcInputs in = grad_sums_inputs("bn_grad_sums", g_in, y_in, scale, shift, residual, mean, residual_scale);
  c10::cuda::CUDAGuard guard(y_in.device());
  const GradSumsCall call = grad_sums_call(in, y_in, scale, shift, mean, relu, store_masked);
  C10_CUDA_CHECK(launch_bn_grad_sums(call.p, stream_of(y_in)));
  return {call.sum_g, call.sum_gy, call.masked};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_grad_sums_coefficients_cuda(
    const at::Tensor& g_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
    bool store_masked, double count, const std::optional<at::Tensor>& residual_scale) {
  const char* op = "bn_grad_sums_coefficients";
  const NhwcInputs in = grad_sums_inputs(op, g_in, y_in, scale, shift, residual, mean, residual_scale);
  FR_CHECK(y_in.scalar_type() != at::kDouble, op, ": fp64 sums are finished in fp64 by the caller");
  check_bn_vector(op, "invstd", invstd, y_in);
  const int64_t rows = y_in.size(1) == 0 ? 0 : y_in.numel() / y_in.size(1);
  FR_CHECK(rows > 1 && count == static_cast<double>(rows), op, ": count must be the ", rows,
           " values per channel of y (and more than 1), got ", count);
  c10::cuda::CUDAGuard guard(y_in.device());
  const GradSumsCall call = grad_sums_call(in, y_in, scale, shift, mean, relu, store_masked);
  at::Tensor grad_gamma = per_channel_result(y_in, call.p), b = per_channel_result(y_in, call.p);
  at::Tensor c = per_channel_result(y_in, call.p);
  BnCoefficientParams coef{};
  coef.a = scale.const_data_ptr<float>();
  coef.invstd = invstd.const_data_ptr<float>();
  coef.mean = mean.const_data_ptr<float>();
  coef.grad_gamma = grad_gamma.mutable_data_ptr<float>();
  coef.b = b.mutable_data_ptr<float>();
  coef.c = c.mutable_data_ptr<float>();
  coef.count = static_cast<float>(count);
  C10_CUDA_CHECK(launch_bn_grad_sums_coefficients(call.p, coef, stream_of(y_in)));
  return {call.sum_g, grad_gamma, b, c, call.masked};
}

at::Tensor bn_grad_input_cuda(const at::Tensor& g_in, const at::Tensor& y_in, const at::Tensor& scale,
                              const at::Tensor& shift, const std::optional<at::Tensor>& residual, const at::Tensor& a,
                              const at::Tensor& b, const at::Tensor& c, bool relu,
                              const std::optional<at::Tensor>& residual_scale) {
  const char* op = "bn_grad_input";
  const NhwcInputs in = nhwc_inputs(op, y_in, g_in, residual, residual_scale);
  for (const auto& [name, v] : {std::pair{"scale", scale}, {"shift", shift}, {"a", a}, {"b", b}, {"c", c}}) {
    check_bn_vector(op, name, v, y_in);
  }
  c10::cuda::CUDAGuard guard(y_in.device());
  at::Tensor dy = empty_channels_last(y_in.sizes(), y_in.options());
  BnPassParams p = params(in);
  p.scale = scale.const_data_ptr();
  p.shift = shift.const_data_ptr();
  p.a = a.const_data_ptr();
  p.b = b.const_data_ptr();
  p.c = c.const_data_ptr();
  p.out = dy.mutable_data_ptr();
  p.relu = relu;
  C10_CUDA_CHECK(launch_bn_grad_input(p, stream_of(y_in)));
  return dy;
}

}  // namespace
}  // namespace fused_resnet::cuda

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) {
  m.impl("bn_stats", &fused_resnet::cuda::bn_stats_cuda);
  m.impl("bn_stats_finalize", &fused_resnet::cuda::bn_stats_finalize_cuda);
  m.impl("bn_normalize", &fused_resnet::cuda::bn_normalize_cuda);
  m.impl("bn_grad_sums", &fused_resnet::cuda::bn_grad_sums_cuda);
  m.impl("bn_grad_sums_coefficients", &fused_resnet::cuda::bn_grad_sums_coefficients_cuda);
  m.impl("bn_grad_input", &fused_resnet::cuda::bn_grad_input_cuda);
}
