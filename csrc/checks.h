// Input validation shared by every device's implementation: each entry point calls these first, so a wrong
// call fails the same way on CPU and CUDA, with a message that names the argument, the value and what works.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace fused_resnet {

// Geometry of one validated conv_bias_act call (input NCHW sizes; output N, Cout, OH, OW).
struct ConvGeometry {
  int64_t n, c, h, w;
  int64_t cout, kh, kw, oh, ow;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
};

ConvGeometry check_conv_bias_act(
    const char* op, c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups);

void check_bias_residual_relu(
    const char* op, c10::DeviceType device_type, const at::Tensor& y, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual);

// The train-mode BN passes (cpu/bn_train.cpp, cuda/bn_train_ops.cpp): y an (N, C, H, W) float tensor on
// device_type; `like` tensors (gradient, residual) match y's shape, dtype and device; per-channel vectors are
// contiguous vectors of C values in the accumulation dtype (float64 for float64 y, else float32).
void check_bn_y(const char* op, c10::DeviceType device_type, const at::Tensor& y);
void check_bn_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& y);
void check_bn_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& y);
// residual_scale, where given: a per-channel vector, and only with a residual (it scales nothing else).
void check_bn_residual_scale(const char* op, const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& residual_scale, const at::Tensor& y);
at::TensorOptions bn_accumulation_options(const at::Tensor& y);

// Sizes and strides of a dense channels_last tensor, exactly as torch.empty(..., memory_format=channels_last)
// makes them (fake tensors carry these strides, so real outputs must too).
at::Tensor empty_channels_last(c10::IntArrayRef sizes, const at::TensorOptions& options);

// `t` itself when it already has the canonical channels_last strides, else a canonical copy.
at::Tensor as_canonical_channels_last(const at::Tensor& t);

}  // namespace fused_resnet
