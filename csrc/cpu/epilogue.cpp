// The conv epilogue and prologue as single vectorized passes, and the fused_resnet_C::bias_residual_relu CPU op.
#include "cpu/epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"

namespace fused_resnet::cpu {
namespace {

using at::vec::Vectorized;

// About 32K elements per task: enough work to amortize a task, small enough to balance two to dozens of cores.
int64_t grain_rows(int64_t channels) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, channels));
}

// relu that keeps NaN, as torch.relu does.
template <typename T>
T relu_scalar(T v) {
  return v < T(0) ? T(0) : v;
}

// One pixel's channels: o = act(y + b [+ r]). Reduced-precision types widen to fp32 vectors.
template <typename scalar_t>
void epilogue_row(const scalar_t* y, const at::opmath_type<scalar_t>* b, const scalar_t* r, scalar_t* o, int64_t C,
                  bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<scalar_t>;
  using FVec = Vectorized<opmath_t>;
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    const Vec zero(scalar_t(0));
    for (; c + Vec::size() <= C; c += Vec::size()) {
      Vec v = Vec::loadu(y + c) + Vec::loadu(b + c);
      if (r != nullptr) v = v + Vec::loadu(r + c);
      if (relu) v = at::vec::maximum(v, zero);
      v.store(o + c);
    }
  } else {
    const FVec zero(0.f);
    for (; c + Vec::size() <= C; c += Vec::size()) {
      auto [v0, v1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(y + c));
      v0 = v0 + FVec::loadu(b + c);
      v1 = v1 + FVec::loadu(b + c + FVec::size());
      if (r != nullptr) {
        auto [r0, r1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(r + c));
        v0 = v0 + r0;
        v1 = v1 + r1;
      }
      if (relu) {
        v0 = at::vec::maximum(v0, zero);
        v1 = at::vec::maximum(v1, zero);
      }
      at::vec::convert_from_float<scalar_t>(v0, v1).store(o + c);
    }
  }
  for (; c < C; ++c) {
    opmath_t v = static_cast<opmath_t>(y[c]) + b[c];
    if (r != nullptr) v += static_cast<opmath_t>(r[c]);
    o[c] = static_cast<scalar_t>(relu ? relu_scalar(v) : v);
  }
}

// One pixel's channels: o = relu(x*s + t).
template <typename scalar_t>
void prologue_row(const scalar_t* x, const at::opmath_type<scalar_t>* s, const at::opmath_type<scalar_t>* t,
                  scalar_t* o, int64_t C) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<scalar_t>;
  using FVec = Vectorized<opmath_t>;
  const FVec zero(opmath_t(0));
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    for (; c + Vec::size() <= C; c += Vec::size()) {
      at::vec::maximum(Vec::loadu(x + c) * Vec::loadu(s + c) + Vec::loadu(t + c), zero).store(o + c);
    }
  } else {
    constexpr int64_t F = FVec::size();
    for (; c + Vec::size() <= C; c += Vec::size()) {
      auto [v0, v1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + c));
      v0 = at::vec::maximum(v0 * FVec::loadu(s + c) + FVec::loadu(t + c), zero);
      v1 = at::vec::maximum(v1 * FVec::loadu(s + c + F) + FVec::loadu(t + c + F), zero);
      at::vec::convert_from_float<scalar_t>(v0, v1).store(o + c);
    }
  }
  for (; c < C; ++c) {
    o[c] = static_cast<scalar_t>(relu_scalar(static_cast<opmath_t>(x[c]) * s[c] + t[c]));
  }
}

// The per-channel vectors in the math type of `like` (fp32, or fp64 for fp64), contiguous.
at::Tensor per_channel_opmath(const at::Tensor& v, const at::Tensor& like) {
  const auto dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return v.to(dtype).contiguous();
}

void check_nhwc_dense(const at::Tensor& t, const char* name) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(at::MemoryFormat::ChannelsLast), name, " must be dense channels_last");
}

}  // namespace

void bias_residual_relu_into(const at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                             bool relu, const at::Tensor& out) {
  check_nhwc_dense(y, "y");
  check_nhwc_dense(out, "out");
  if (residual.has_value()) check_nhwc_dense(*residual, "residual");
  const int64_t C = y.size(1);
  const int64_t rows = C == 0 ? 0 : y.numel() / C;
  const at::Tensor b = per_channel_opmath(bias, y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bias_residual_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const opmath_t* b_ptr = b.const_data_ptr<opmath_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        epilogue_row<scalar_t>(y_ptr + i * C, b_ptr, r_ptr == nullptr ? nullptr : r_ptr + i * C, o_ptr + i * C, C,
                               relu);
      }
    });
  });
}

void scale_shift_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& out) {
  check_nhwc_dense(x, "x");
  check_nhwc_dense(out, "out");
  const int64_t C = x.size(1);
  const int64_t rows = C == 0 ? 0 : x.numel() / C;
  const at::Tensor s = per_channel_opmath(scale, x);
  const at::Tensor t = per_channel_opmath(shift, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const opmath_t* s_ptr = s.const_data_ptr<opmath_t>();
    const opmath_t* t_ptr = t.const_data_ptr<opmath_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        prologue_row<scalar_t>(x_ptr + i * C, s_ptr, t_ptr, o_ptr + i * C, C);
      }
    });
  });
}

namespace {

at::Tensor bias_residual_relu_cpu(const at::Tensor& y, const at::Tensor& bias,
                                  const std::optional<at::Tensor>& residual, bool relu) {
  check_bias_residual_relu("bias_residual_relu", c10::DeviceType::CPU, y, bias, residual);
  const at::Tensor y_cl = y.contiguous(at::MemoryFormat::ChannelsLast);
  std::optional<at::Tensor> r_cl;
  if (residual.has_value()) r_cl = residual->contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = empty_channels_last(y.sizes(), y.options());
  bias_residual_relu_into(y_cl, bias, r_cl, relu, out);
  return out;
}

}  // namespace
}  // namespace fused_resnet::cpu

TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) {
  m.impl("bias_residual_relu", &fused_resnet::cpu::bias_residual_relu_cpu);
}
