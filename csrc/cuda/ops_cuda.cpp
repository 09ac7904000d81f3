// CUDA implementations of the fused_resnet_C ops: check, allocate, launch the torch-free kernels of
// csrc/cuda/*.cu on the current stream of the input's device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>

#include "checks.h"
#include "cuda/current_stream.h"
#include "cuda/kernel_dtype.h"
#include "cuda/launch.h"
#include "message.h"

namespace fused_resnet::cuda {
namespace {

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

struct DeviceInfo {
  int major = 0, minor = 0, sm_count = 0;
};

const DeviceInfo& device_info(c10::DeviceIndex index) {
  constexpr int kMaxDevices = 64;
  static std::array<DeviceInfo, kMaxDevices> infos;
  static std::array<std::once_flag, kMaxDevices> once;
  FR_CHECK(index >= 0 && index < kMaxDevices, "CUDA device index ", index, " out of range");
  std::call_once(once[index], [index] {
    DeviceInfo& info = infos[index];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, index));
  });
  return infos[index];
}

int narrow(int64_t v) {
  return static_cast<int>(v);
}

// The Hopper engine's path for inputs of under 8 channels and for 1x1 convs of stride 2-8 (launch.h,
// sm90_im2col_depth): each output pixel's input window laid out as a row, then the GEMM over the rows, a chunk of
// images at a time so that the rows take at most kIm2colBytes. False where the engine does not take the call this
// way (nothing was launched).
constexpr int64_t kIm2colBytes = int64_t{256} << 20;

bool run_im2col_on_sm90(const at::Tensor& x_cl, const at::Tensor& w_cl, const ConvBiasActParams& p,
                        cudaStream_t stream) {
  const DType dtype = kernel_dtype(x_cl.scalar_type());
  // Most calls end at the first, cheap test; CUTLASS's host-side checks run only for calls of this path, first on
  // stand-ins for the buffers below (they look at sizes and alignment only, and fresh allocations are aligned), so
  // that a declined call allocates nothing, then again in each chunk's launch (a chunk differs only in its rows and
  // its 16-byte aligned offsets, so none is declined after the first has run).
  const int depth = sm90_im2col_depth(dtype, p);
  if (depth == 0 || sm90_engine_route(dtype, p) != Sm90Route::kIm2colGemm) return false;
  const int64_t row_bytes = int64_t{depth} * static_cast<int64_t>(x_cl.element_size());
  const int64_t pixels = int64_t{p.oh} * p.ow;
  const int chunk = static_cast<int>(std::clamp<int64_t>(kIm2colBytes / (pixels * row_bytes), 1, p.n));
  const at::Tensor rows = x_cl.new_empty({chunk * pixels, int64_t{depth}});
  // The filter in (kh, kw, c) order, as the rows: a channels_last weight is [Cout, KH, KW, C] in memory, so where the
  // rows have no zero tail (a 1x1 filter over a multiple of 8 channels) and it sits on 16 bytes, it is used as it is.
  const int64_t taps = int64_t{p.kh} * p.kw * p.c;
  at::Tensor weight_rows = w_cl.permute({0, 2, 3, 1}).reshape({p.cout, taps});
  if (taps != depth || reinterpret_cast<uintptr_t>(weight_rows.const_data_ptr()) % 16 != 0) {
    at::Tensor padded = w_cl.new_empty({int64_t{p.cout}, int64_t{depth}});
    padded.narrow(1, taps, depth - taps).zero_();
    padded.narrow(1, 0, taps).copy_(weight_rows);
    weight_rows = padded;
  }
  for (int n0 = 0; n0 < p.n; n0 += chunk) {
    const int images = std::min(chunk, p.n - n0);
    C10_CUDA_CHECK(launch_im2col(p, n0, images, rows.mutable_data_ptr(), depth, stream));
    const ConvBiasActParams q =
        sm90_im2col_gemm_params(p, depth, n0, images, rows.const_data_ptr(), weight_rows.const_data_ptr());
    C10_CUDA_CHECK(launch_conv_bias_act_sm90(dtype, q, stream));
  }
  return true;
}

// The trial's path for inputs of under 8 channels (launch.h, sm90_padded_channels): x and the filter copied with their
// channels padded by zeros, then the call on the copies. False where the engine does not take the call this way
// (nothing was launched).
bool run_padded_on_sm90(const at::Tensor& x_cl, const at::Tensor& w_cl, const ConvBiasActParams& p,
                        cudaStream_t stream) {
  const DType dtype = kernel_dtype(x_cl.scalar_type());
  const int channels = sm90_padded_channels(dtype, p);
  if (channels == 0 || sm90_engine_route(dtype, p) == Sm90Route::kNone) return false;
  // [N, H, W, 8] in memory (channels_last), zero past the tensor's own channels.
  const auto padded = [channels](const at::Tensor& t) {
    at::Tensor out = t.new_zeros({t.size(0), t.size(2), t.size(3), int64_t{channels}});
    out.narrow(3, 0, t.size(1)).copy_(t.permute({0, 2, 3, 1}));
    return out;
  };
  const at::Tensor x_padded = padded(x_cl);
  const at::Tensor w_padded = padded(w_cl);
  ConvBiasActParams q = p;
  q.x = x_padded.const_data_ptr();
  q.weight = w_padded.const_data_ptr();
  q.c = channels;
  C10_CUDA_CHECK(launch_conv_bias_act_sm90(dtype, q, stream));
  return true;
}

at::Tensor conv_bias_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& in_scale,
                              const std::optional<at::Tensor>& in_shift, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, bool relu) {
  const char* op = "conv_bias_act";
  const ConvGeometry g = check_conv_bias_act(op, c10::DeviceType::CUDA, x, weight, bias, residual, in_scale,
                                             in_shift, stride, padding, dilation, groups);
  const auto dtype = x.scalar_type();
  FR_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
           ": the CUDA kernels run float16, bfloat16 and float32 (on TF32 tensor cores), got ", dtype,
           "; use the reference backend for float64");
  c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo& info = device_info(x.device().index());
  FR_CHECK(info.major >= 8, op, ": the CUDA kernels need compute capability 8.0 or newer, ", x.device(), " is ",
           info.major, ".", info.minor);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const int64_t m_total = g.n * g.oh * g.ow;
  FR_CHECK(m_total < kIntMax - 256, op, ": N*OH*OW = ", m_total,
           " output pixels exceed the kernel's 32-bit row index; split the batch");
  FR_CHECK(g.groups <= 65535, op, ": groups=", g.groups, " exceeds the CUDA grid limit of 65535");
  for (int64_t v : {g.h, g.w, g.c, g.cout, g.kh * g.kw * (g.c / g.groups), g.pad_h + g.h, g.pad_w + g.w,
                    g.stride_h * g.oh, g.stride_w * g.ow, g.dil_h * g.kh, g.dil_w * g.kw}) {
    FR_CHECK(v < (int64_t{1} << 29), op, ": a size in ", x.sizes(), " / ", weight.sizes(),
             " is too large for the kernel's 32-bit index math");
  }

  at::Tensor out = empty_channels_last({g.n, g.cout, g.oh, g.ow}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor x_cl = x.contiguous(kChannelsLast);
  const at::Tensor w_cl = weight.contiguous(kChannelsLast);
  const at::Tensor b = bias.to(at::kFloat).contiguous();
  std::optional<at::Tensor> r, s, t;
  if (residual.has_value()) r = residual->contiguous(kChannelsLast);
  if (in_scale.has_value()) {
    s = in_scale->to(at::kFloat).contiguous();
    t = in_shift->to(at::kFloat).contiguous();
  }

  ConvBiasActParams p{};
  p.x = x_cl.const_data_ptr();
  p.weight = w_cl.const_data_ptr();
  p.bias = b.const_data_ptr<float>();
  p.residual = r.has_value() ? r->const_data_ptr() : nullptr;
  p.in_scale = s.has_value() ? s->const_data_ptr<float>() : nullptr;
  p.in_shift = t.has_value() ? t->const_data_ptr<float>() : nullptr;
  p.y = out.mutable_data_ptr();
  p.n = narrow(g.n);
  p.h = narrow(g.h);
  p.w = narrow(g.w);
  p.c = narrow(g.c);
  p.cout = narrow(g.cout);
  p.kh = narrow(g.kh);
  p.kw = narrow(g.kw);
  p.oh = narrow(g.oh);
  p.ow = narrow(g.ow);
  p.stride_h = narrow(g.stride_h);
  p.stride_w = narrow(g.stride_w);
  p.pad_h = narrow(g.pad_h);
  p.pad_w = narrow(g.pad_w);
  p.dil_h = narrow(g.dil_h);
  p.dil_w = narrow(g.dil_w);
  p.groups = narrow(g.groups);
  p.relu = relu;
  p.sm_count = info.sm_count;
  const cudaStream_t stream = stream_of(x);
  // sm_90a code (the Hopper engine) runs on compute capability 9.0 exactly.
  if (sm90_engine_enabled() && info.major == 9 && info.minor == 0) {
    if (run_padded_on_sm90(x_cl, w_cl, p, stream) || run_im2col_on_sm90(x_cl, w_cl, p, stream)) return out;
    const cudaError_t err = launch_conv_bias_act_sm90(kernel_dtype(dtype), p, stream);
    if (err != cudaErrorNotSupported) {
      C10_CUDA_CHECK(err);
      return out;
    }
  }
  C10_CUDA_CHECK(launch_conv_bias_act(kernel_dtype(dtype), p, stream));
  return out;
}

at::Tensor bias_residual_relu_cuda(const at::Tensor& y, const at::Tensor& bias,
                                   const std::optional<at::Tensor>& residual, bool relu) {
  check_bias_residual_relu("bias_residual_relu", c10::DeviceType::CUDA, y, bias, residual);
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = empty_channels_last(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const at::Tensor y_cl = y.contiguous(kChannelsLast);
  const at::Tensor b = bias.to(y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  std::optional<at::Tensor> r;
  if (residual.has_value()) r = residual->contiguous(kChannelsLast);
  const cudaStream_t stream = stream_of(y);
  C10_CUDA_CHECK(launch_bias_residual_relu(kernel_dtype(y.scalar_type()), y_cl.const_data_ptr(), b.const_data_ptr(),
                                           r.has_value() ? r->const_data_ptr() : nullptr, out.mutable_data_ptr(),
                                           y.numel() / y.size(1), y.size(1), relu, stream));
  return out;
}

}  // namespace
}  // namespace fused_resnet::cuda

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) {
  m.impl("conv_bias_act", &fused_resnet::cuda::conv_bias_act_cuda);
  m.impl("bias_residual_relu", &fused_resnet::cuda::bias_residual_relu_cuda);
}
