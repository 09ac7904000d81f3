// The extension's op schemas, in one place. Implementations are registered per device:
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL CPU) and csrc/cuda/*.cpp (TORCH_LIBRARY_IMPL CUDA).
//
// The namespace is the extension's own, so these ops never compete with the Triton backend's for an
// (op, device) slot. Fake (meta) and autograd implementations are registered from Python by
// fused_resnet/ops/cpp_backend.py; torch requires each C++-defined op to name the Python module whose
// torch.library.register_fake call registers its fake, hence the set_python_module lines.
#include <torch/library.h>

TORCH_LIBRARY(fused_resnet_C, m) {
  // act(conv(pre(x), weight) + bias + residual) in x's dtype, channels_last; pre(x) = relu(x*in_scale + in_shift)
  // when in_scale is given (padding stays 0 after pre). Same schema as every backend's conv_bias_act.
  m.set_python_module("fused_resnet.ops.conv_bias_act_autograd", "imported by fused_resnet.ops.cpp_backend");
  m.def(
      "conv_bias_act(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor? in_scale, Tensor? in_shift, "
      "int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> Tensor");
  // act(y + bias[c] + residual) in y's dtype, channels_last: the conv epilogue alone.
  m.set_python_module("fused_resnet.ops.cpp_backend", "");
  m.def("bias_residual_relu(Tensor y, Tensor bias, Tensor? residual, bool relu) -> Tensor");
  // Declares a CPU weight's storage stable, so that conv_bias_act may keep its prepacked copy (cpu/weight_cache.h).
  m.def("allow_prepacking(Tensor weight) -> ()");
  // The same result written into `residual`: for callers whose residual is dead after this call, so that the
  // output needs no new buffer and oneDNN accumulates into it (its "sum" post-op). CPU only. Returns nothing
  // (torch.compile's functionalization takes no custom op whose output aliases an input).
  m.def(
      "conv_bias_act_into_residual(Tensor x, Tensor weight, Tensor bias, Tensor(a!) residual, Tensor? in_scale, "
      "Tensor? in_shift, int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> ()");
  // Train-mode BN passes over a conv output y (csrc/cpu/bn_train.cpp, csrc/cuda/bn_train.cu; training/passes.py):
  // per-channel (mean, M2); act(y*scale + shift [+ residual*residual_scale]); the backward's masked sums; BN's input
  // gradient. residual_scale (per channel, only with a residual): a projection shortcut's BN scale, its raw conv
  // output the residual (training/projection_train.py).
  m.set_python_module("fused_resnet.training.cpp_passes", "");
  m.def("bn_stats(Tensor y) -> (Tensor mean, Tensor m2)");
  // CUDA only: bn_stats and what follows it in a unit (training/channel_math.py's finalize) in the same launches,
  // fp32 statistics and vectors; the running stats (both or neither) move in place, and the caller bumps their
  // version counters (training/cpp_passes.py: stats_finalize).
  m.def(
      "bn_stats_finalize(Tensor y, Tensor? gamma, Tensor? beta, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float count, float eps, float factor) -> (Tensor mean, Tensor m2, Tensor invstd, Tensor scale, Tensor shift)");
  m.def(
      "bn_normalize(Tensor y, Tensor scale, Tensor shift, Tensor? residual, bool relu, "
      "Tensor? residual_scale=None) -> Tensor");
  m.def(
      "bn_grad_sums(Tensor g, Tensor y, Tensor scale, Tensor shift, Tensor? residual, Tensor mean, bool relu, "
      "bool store_masked, Tensor? residual_scale=None) -> (Tensor sum_g, Tensor sum_gy, Tensor masked)");
  // CUDA only: bn_grad_sums and what follows it in a unit's backward (training/channel_math.py's coefficients) in
  // the same launches, fp32 vectors: dL/dgamma = sum_gy*invstd and b, c of dL/dy = scale*g' + b*y + c.
  m.def(
      "bn_grad_sums_coefficients(Tensor g, Tensor y, Tensor scale, Tensor shift, Tensor? residual, Tensor mean, "
      "Tensor invstd, bool relu, bool store_masked, float count, Tensor? residual_scale=None) -> (Tensor sum_g, "
      "Tensor grad_gamma, Tensor b, Tensor c, Tensor masked)");
  m.def(
      "bn_grad_input(Tensor g, Tensor y, Tensor scale, Tensor shift, Tensor? residual, Tensor a, Tensor b, "
      "Tensor c, bool relu, Tensor? residual_scale=None) -> Tensor");
  m.set_python_module("fused_resnet.training.max_pool_train", "");
  // CUDA only, the stem's max-pool in training (training/max_pool_train.py; csrc/cuda/max_pool.cu), dilation 1,
  // channels a multiple of 16 bytes: torch's max_pool2d values; and the gradient with respect to the pooled
  // act(y*scale + shift), as bn_normalize makes it, recomputed from y (torch's argmax rules, no indices kept;
  // windows of at most 254 taps).
  m.def("max_pool_nhwc(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) -> Tensor");
  m.def(
      "max_pool_bn_act_backward(Tensor grad, Tensor y, Tensor scale, Tensor shift, bool relu, int[2] kernel_size, "
      "int[2] stride, int[2] padding) -> Tensor");
}
