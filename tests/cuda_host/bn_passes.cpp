// csrc/cuda/bn_train.cu's kernels and launchers, run on the CPU by the host emulation (emulator.h), behind a C
// entry point for ctypes (tests/cuda_on_host.py).
#include "emulator.h"

#include <cstddef>

#include "cuda/bn_train.cu"

extern "C" {

// For the ctypes mirror of the struct to check its layout against: its size, then each field's offset in order.
void fr_bn_params_layout(long long* out) {
  using P = fused_resnet::cuda::BnPassParams;
  const long long layout[] = {
      sizeof(P),          offsetof(P, dtype),    offsetof(P, y),    offsetof(P, g),    offsetof(P, residual),
      offsetof(P, residual_scale), offsetof(P, scale), offsetof(P, shift), offsetof(P, mean), offsetof(P, a),
      offsetof(P, b),     offsetof(P, c),        offsetof(P, out),  offsetof(P, sum0), offsetof(P, sum1),
      offsetof(P, workspace), offsetof(P, rows), offsetof(P, channels), offsetof(P, relu)};
  for (size_t i = 0; i < sizeof(layout) / sizeof(layout[0]); ++i) out[i] = layout[i];
}

long long fr_bn_workspace_elements(long long rows, long long channels) {
  return fused_resnet::cuda::bn_workspace_elements(rows, channels);
}

void fr_set_bn_rows_per_thread(int rows) { fused_resnet::cuda::set_bn_rows_per_thread(rows); }

// launch_bn_stats_finalize; returns the cudaError_t.
int fr_bn_stats_finalize(const fused_resnet::cuda::BnPassParams* p, const fused_resnet::cuda::BnFinalizeParams* f) {
  return fused_resnet::cuda::launch_bn_stats_finalize(*p, *f, nullptr);
}

// BnFinalizeParams' size, then each field's offset in order.
void fr_bn_finalize_layout(long long* out) {
  using F = fused_resnet::cuda::BnFinalizeParams;
  const long long layout[] = {sizeof(F),           offsetof(F, gamma),  offsetof(F, beta),  offsetof(F, running_mean),
                              offsetof(F, running_var), offsetof(F, invstd), offsetof(F, scale), offsetof(F, shift),
                              offsetof(F, count),  offsetof(F, eps),    offsetof(F, factor)};
  for (size_t i = 0; i < sizeof(layout) / sizeof(layout[0]); ++i) out[i] = layout[i];
}

// launch_bn_grad_sums_coefficients; returns the cudaError_t.
int fr_bn_grad_sums_coefficients(const fused_resnet::cuda::BnPassParams* p,
                                 const fused_resnet::cuda::BnCoefficientParams* coef) {
  return fused_resnet::cuda::launch_bn_grad_sums_coefficients(*p, *coef, nullptr);
}

// BnCoefficientParams' size, then each field's offset in order.
void fr_bn_coefficients_layout(long long* out) {
  using K = fused_resnet::cuda::BnCoefficientParams;
  const long long layout[] = {sizeof(K),          offsetof(K, a), offsetof(K, invstd), offsetof(K, mean),
                              offsetof(K, grad_gamma), offsetof(K, b), offsetof(K, c),      offsetof(K, count)};
  for (size_t i = 0; i < sizeof(layout) / sizeof(layout[0]); ++i) out[i] = layout[i];
}

// which: 0 stats, 1 normalize, 2 grad_sums, 3 grad_input. Returns the cudaError_t.
int fr_bn_pass(int which, const fused_resnet::cuda::BnPassParams* p) {
  using namespace fused_resnet::cuda;
  switch (which) {
    case 0:
      return launch_bn_stats(*p, nullptr);
    case 1:
      return launch_bn_normalize(*p, nullptr);
    case 2:
      return launch_bn_grad_sums(*p, nullptr);
    case 3:
      return launch_bn_grad_input(*p, nullptr);
  }
  return cudaErrorInvalidValue;
}

}  // extern "C"
