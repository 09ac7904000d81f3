// Vectorized per-channel passes over NHWC tensors (C innermost), one at::parallel_for over pixels each:
// the conv epilogue act(y + bias[c] + residual) and the pre-activation prologue relu(x*scale[c] + shift[c]).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fused_resnet::cpu {

// out = act(y + bias[c] + residual), computed in fp32 (fp64 for fp64) and rounded once to y's dtype.
// y, residual and out are dense channels_last; out may be y itself.
void bias_residual_relu_into(const at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                             bool relu, const at::Tensor& out);

// out = relu(x*scale[c] + shift[c]), computed in fp32 (fp64 for fp64); x and out dense channels_last.
void scale_shift_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& out);

}  // namespace fused_resnet::cpu
