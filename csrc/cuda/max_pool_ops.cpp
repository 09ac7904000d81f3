// CUDA implementations of the stem's training max-pool ops (schemas in csrc/ops.cpp, kernels in max_pool.cu,
// caller fused_resnet/training/max_pool_train.py): check, lay the inputs out as dense 16-byte aligned NHWC, allocate
// the channels_last output, launch on the current stream of the input's device.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>

#include "checks.h"
#include "cuda/current_stream.h"
#include "cuda/kernel_dtype.h"
#include "cuda/launch.h"
#include "message.h"

namespace fused_resnet::cuda {
namespace {

// kernel, stride and padding as (h, w) pairs, checked as torch's max_pool2d checks them (dilation 1).
struct Window {
  std::array<int, 2> kernel, stride, padding;
};

Window window_of(const char* op, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  FR_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
           ": kernel_size, stride and padding must be pairs, got ", kernel, ", ", stride, ", ", padding);
  Window w{};
  for (int i = 0; i < 2; ++i) {
    FR_CHECK(kernel[i] > 0 && stride[i] > 0 && padding[i] >= 0 && kernel[i] <= 1024 && stride[i] <= 1024, op,
             ": kernel_size and stride must be positive (at most 1024) and padding not negative, got ", kernel,
             ", ", stride, ", ", padding);
    FR_CHECK(2 * padding[i] <= kernel[i], op, ": padding must be at most half the kernel size, got padding ",
             padding, " for kernel_size ", kernel);
    w.kernel[i] = static_cast<int>(kernel[i]);
    w.stride[i] = static_cast<int>(stride[i]);
    w.padding[i] = static_cast<int>(padding[i]);
  }
  return w;
}

// A dense channels_last copy of t (t itself where it already is one) at a 16-byte aligned address.
at::Tensor aligned_nhwc(const at::Tensor& t) {
  at::Tensor out = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 != 0) out = out.clone(at::MemoryFormat::ChannelsLast);
  return out;
}

at::Tensor aligned_vector(const at::Tensor& v) {
  return reinterpret_cast<uintptr_t>(v.const_data_ptr()) % 16 == 0 ? v : v.clone();
}

// The checks both ops make of the pooled tensor (the forward's input, the backward's y).
void check_pooled(const char* op, const at::Tensor& x) {
  check_bn_y(op, c10::DeviceType::CUDA, x);
  FR_CHECK(x.scalar_type() != at::kDouble, op, ": float64 is not supported (float16, bfloat16 or float32)");
  const int64_t width = 16 / static_cast<int64_t>(x.element_size());
  FR_CHECK(x.size(1) % width == 0, op, ": the channels must be a multiple of ", width, " for ", x.scalar_type(),
           " (16 bytes), got ", x.size(1));
  FR_CHECK(x.size(2) * x.size(3) <= INT32_MAX, op, ": at most 2^31 - 1 pixels per image, got ", x.size(2), "x",
           x.size(3));
}

MaxPoolParams params_of(const at::Tensor& x, const Window& w, int64_t oh, int64_t ow) {
  MaxPoolParams p{};
  p.dtype = kernel_dtype(x.scalar_type());
  p.n = x.size(0), p.c = x.size(1), p.h = x.size(2), p.w = x.size(3), p.oh = oh, p.ow = ow;
  p.kh = w.kernel[0], p.kw = w.kernel[1], p.sh = w.stride[0], p.sw = w.stride[1];
  p.ph = w.padding[0], p.pw = w.padding[1];
  return p;
}

at::Tensor max_pool_nhwc_cuda(const at::Tensor& x_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                              at::IntArrayRef padding, bool ceil_mode) {
  const char* op = "max_pool_nhwc";
  check_pooled(op, x_in);
  const Window w = window_of(op, kernel, stride, padding);
  const int64_t oh = pooled_size(x_in.size(2), w.kernel[0], w.stride[0], w.padding[0], ceil_mode);
  const int64_t ow = pooled_size(x_in.size(3), w.kernel[1], w.stride[1], w.padding[1], ceil_mode);
  FR_CHECK(oh >= 1 && ow >= 1, op, ": the input (", x_in.size(2), "x", x_in.size(3),
           ") is too small for the window: output size ", oh, "x", ow);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned_nhwc(x_in);
  at::Tensor out = empty_channels_last({x.size(0), x.size(1), oh, ow}, x.options());
  MaxPoolParams p = params_of(x, w, oh, ow);
  p.x = x.const_data_ptr();
  p.out = out.mutable_data_ptr();
  C10_CUDA_CHECK(launch_max_pool(p, stream_of(x)));
  return out;
}

at::Tensor max_pool_bn_act_backward_cuda(const at::Tensor& g_in, const at::Tensor& y_in, const at::Tensor& scale_in,
                                         const at::Tensor& shift_in, bool relu, at::IntArrayRef kernel,
                                         at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "max_pool_bn_act_backward";
  check_pooled(op, y_in);
  check_bn_vector(op, "scale", scale_in, y_in);
  check_bn_vector(op, "shift", shift_in, y_in);
  const Window w = window_of(op, kernel, stride, padding);
  FR_CHECK(w.kernel[0] * w.kernel[1] < 255, op, ": windows of at most 254 taps (a byte per window and channel ",
           "names the winner), got kernel_size ", kernel);
  // The pooled size says nothing of ceil_mode here: either count of windows is taken, not any other.
  const auto fits = [&](int axis, int64_t size) {
    const int i = axis - 2;
    const int64_t size_in = y_in.size(axis);
    return size == pooled_size(size_in, w.kernel[i], w.stride[i], w.padding[i], false) ||
           size == pooled_size(size_in, w.kernel[i], w.stride[i], w.padding[i], true);
  };
  FR_CHECK(g_in.dim() == 4 && g_in.size(0) == y_in.size(0) && g_in.size(1) == y_in.size(1) &&
               g_in.scalar_type() == y_in.scalar_type() && g_in.device() == y_in.device() &&
               g_in.layout() == at::kStrided && g_in.size(2) >= 1 && g_in.size(3) >= 1 && fits(2, g_in.size(2)) &&
               fits(3, g_in.size(3)),
           op, ": grad must be the pooled output's gradient (", y_in.scalar_type(), " on ", y_in.device(),
           ", the windows of y ", y_in.sizes(), "), got ", g_in.scalar_type(), " of shape ", g_in.sizes(), " on ",
           g_in.device());
  c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = aligned_nhwc(y_in), g = aligned_nhwc(g_in);
  const at::Tensor scale = aligned_vector(scale_in), shift = aligned_vector(shift_in);
  at::Tensor dx = empty_channels_last(y.sizes(), y.options());
  MaxPoolParams p = params_of(y, w, g.size(2), g.size(3));
  p.x = y.const_data_ptr();
  p.g = g.const_data_ptr();
  p.scale = scale.const_data_ptr();
  p.shift = shift.const_data_ptr();
  p.out = dx.mutable_data_ptr();
  p.relu = relu;
  const at::Tensor winners = at::empty({max_pool_backward_workspace_bytes(p)}, y.options().dtype(at::kByte));
  p.workspace = winners.mutable_data_ptr();
  C10_CUDA_CHECK(launch_max_pool_bn_act_backward(p, stream_of(y)));
  return dx;
}

}  // namespace
}  // namespace fused_resnet::cuda

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) {
  m.impl("max_pool_nhwc", &fused_resnet::cuda::max_pool_nhwc_cuda);
  m.impl("max_pool_bn_act_backward", &fused_resnet::cuda::max_pool_bn_act_backward_cuda);
}
