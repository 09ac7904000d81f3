// fused_resnet_C::conv_bias_act on CPU: act(conv(pre(x), weight) + bias + residual), channels_last.
//
// The convolution, bias, residual add and ReLU run as ONE oneDNN primitive (bias + binary-add + eltwise-relu
// post-ops), reached through torch's registered mkldnn::_convolution_pointwise ops with a weight prepacked
// into oneDNN's blocked layout (cached, see weight_cache.h): what Inductor emits for a frozen graph, without
// compiling. Where oneDNN does not take the dtype (float64; float16/bfloat16 on CPUs without the needed ISA)
// or torch was built without it, at::convolution runs the conv and one vectorized pass adds bias + residual
// and applies ReLU. The pre-activation prologue is one vectorized pass before the conv.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sum.h>
#include <c10/core/MemoryFormat.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/epilogue.h"
#include "cpu/input_scans.h"
#include "cpu/weight_cache.h"
#include "message.h"

namespace fused_resnet::cpu {
namespace {

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// torch's oneDNN ops, called boxed: this file then depends on their schemas only, not on their C++ signatures
// (which are no public API):
//   mkldnn::_convolution_pointwise(X, W, B, padding, stride, dilation, groups, attr, scalars, algorithm)
//   mkldnn::_convolution_pointwise.binary(X, other, W, B, padding, stride, dilation, groups, binary_attr, alpha,
//                                         unary_attr, unary_scalars, unary_algorithm)
//   mkldnn::_convolution_pointwise_.binary(other!, X, W, B, padding, stride, dilation, groups, binary_attr, alpha,
//                                          unary_attr, unary_scalars, unary_algorithm)      (result into `other`)
//   mkldnn::_reorder_convolution_weight(self, padding, stride, dilation, groups, input_size)
struct OneDnnOps {
  c10::OperatorHandle conv;
  c10::OperatorHandle conv_binary;
  c10::OperatorHandle conv_binary_inplace;
  c10::OperatorHandle reorder;
  bool bf16;
  bool fp16;
};

at::Tensor call_boxed(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return std::move(stack.at(0)).toTensor();
}

bool call_bool(const c10::OperatorHandle& op) {
  std::vector<c10::IValue> stack;
  op.callBoxed(&stack);
  return stack.at(0).toBool();
}

// The oneDNN ops torch registers, or nullopt where this torch was built without them.
const std::optional<OneDnnOps>& onednn_ops() {
  static const std::optional<OneDnnOps> ops = []() -> std::optional<OneDnnOps> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto& dispatcher = c10::Dispatcher::singleton();
    auto conv = dispatcher.findSchema({"mkldnn::_convolution_pointwise", ""});
    auto conv_binary = dispatcher.findSchema({"mkldnn::_convolution_pointwise", "binary"});
    auto conv_binary_inplace = dispatcher.findSchema({"mkldnn::_convolution_pointwise_", "binary"});
    auto reorder = dispatcher.findSchema({"mkldnn::_reorder_convolution_weight", ""});
    auto bf16 = dispatcher.findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    auto fp16 = dispatcher.findSchema({"mkldnn::_is_mkldnn_fp16_supported", ""});
    if (!conv || !conv_binary || !conv_binary_inplace || !reorder || !bf16 || !fp16) return std::nullopt;
    return OneDnnOps{*conv, *conv_binary, *conv_binary_inplace, *reorder, call_bool(*bf16), call_bool(*fp16)};
  }();
  return ops;
}

bool onednn_takes(c10::ScalarType dtype) {
  const auto& ops = onednn_ops();
  if (!ops.has_value()) return false;
  switch (dtype) {
    case at::kFloat:
      return true;
    case at::kBFloat16:
      return ops->bf16;
    case at::kHalf:
      return ops->fp16;
    default:
      return false;  // float64: oneDNN has no f64 convolution
  }
}

// Whether no value among n has all its exponent bits set (NaN or an infinity): the least of ~bits & mask over them
// is 0 exactly where one has, an unsigned min reduction the compiler vectorizes; parallel over large tensors.
template <typename Bits>
bool no_exponent_all_ones(const void* data, int64_t n, Bits mask) {
  const Bits* bits = static_cast<const Bits*>(data);
  std::atomic<bool> found{false};
  at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    Bits least = mask;
    for (int64_t i = begin; i < end; ++i) least = std::min<Bits>(least, static_cast<Bits>(~bits[i] & mask));
    if (least == 0) found.store(true, std::memory_order_relaxed);
  });
  return !found.load();
}

// Whether every value of t is finite, reading its memory once (a dense tensor's values fill numel slots from its
// data pointer, whatever its strides).
bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const at::Tensor d = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  switch (d.scalar_type()) {
    case at::kFloat:
      return no_exponent_all_ones<uint32_t>(d.const_data_ptr(), d.numel(), 0x7f800000u);
    case at::kBFloat16:
      return no_exponent_all_ones<uint16_t>(d.const_data_ptr(), d.numel(), 0x7f80u);
    case at::kHalf:
      return no_exponent_all_ones<uint16_t>(d.const_data_ptr(), d.numel(), 0x7c00u);
    default:  // a NaN or an infinity makes the sum NaN or infinite (an overflow only takes the slower path)
      return std::isfinite(d.sum().item<double>());
  }
}

thread_local bool scan_inputs = true;

// A call whose weight, bias or prologue parameters are not all finite may make NaN from finite activations: from it
// on, this thread's convs scan theirs again (until the model's forward restores the switch: input_scans.h).
void scan_from_here_unless(bool params_finite) {
  if (!params_finite) scan_inputs = true;
}

// The oneDNN ops' arguments for one call: geometry lists, the prepacked weight, the bias in the activation dtype,
// and the unary post-op. oneDNN's ReLU is x86's max(x, 0), which makes a NaN 0: where an input, the weight or the
// bias holds NaN or an infinity (whose differences are NaN), the ReLU runs after the primitive instead, as torch.relu
// does, keeping NaN (an audit found a NaN input pixel giving finite logits). The check reads the input and the
// residual once more where input_scans_enabled() (input_scans.h); the weight's is made once, when it is packed.
struct OneDnnCall {
  std::vector<int64_t> stride, padding, dilation;
  at::Tensor packed, bias;
  bool relu_after;  // ReLU wanted and not taken as the primitive's post-op
  c10::IValue post_op;
};

OneDnnCall onednn_call(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_arg,
                       const at::Tensor& bias, const std::optional<at::Tensor>& residual, const ConvGeometry& g,
                       bool relu) {
  OneDnnCall call{{g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, {}, {}, false, {}};
  const PackedWeight packed =
      cached_prepacked_weight(weight_arg, input.sizes(), call.stride, call.padding, call.dilation, g.groups, [&] {
        return PackedWeight{call_boxed(onednn_ops()->reorder, {weight, call.padding, call.stride, call.dilation,
                                                               g.groups, input.sizes().vec()}),
                            all_finite(weight)};
      });
  call.packed = packed.packed;
  // oneDNN wants the bias in the activation dtype (the reference rounds it the same way), and dense: it reads
  // the data pointer as cout values in a row (a strided or expanded bias of the right dtype passed through as it was).
  call.bias = bias.to(input.scalar_type()).contiguous();
  const bool params_finite = packed.finite && all_finite(bias);
  scan_from_here_unless(params_finite);
  if (relu) {
    const bool finite =
        params_finite && (!scan_inputs || (all_finite(input) && (!residual.has_value() || all_finite(*residual))));
    call.relu_after = !finite;
    if (finite) call.post_op = c10::IValue("relu");
  }
  return call;
}

at::Tensor conv_onednn(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_arg,
                       const at::Tensor& bias, const std::optional<at::Tensor>& residual, const ConvGeometry& g,
                       bool relu) {
  const OneDnnOps& ops = *onednn_ops();
  const bool grouped_residual = residual.has_value() && g.groups != 1;
  const OneDnnCall call = onednn_call(input, weight, weight_arg, bias, residual, g, relu && !grouped_residual);
  const auto& [stride, padding, dilation, packed, b, relu_after, post_op] = call;
  const c10::List<std::optional<at::Scalar>> no_scalars;
  const c10::IValue none;
  if (grouped_residual) {
    // torch takes the binary post-op only for groups == 1 (its own fallback has no bfloat16 add_relu).
    at::Tensor y = call_boxed(ops.conv, {input, packed, none, padding, stride, dilation, g.groups, "none",
                                         no_scalars, none})
                       .contiguous(kChannelsLast);
    bias_residual_relu_into(y, bias, residual, relu, y);
    return y;
  }
  at::Tensor y;
  if (residual.has_value()) {
    // dst = relu(conv + bias + residual): binary-add and eltwise-relu post-ops of the one conv primitive.
    y = call_boxed(ops.conv_binary,
                   {input, *residual, packed, b, padding, stride, dilation, g.groups, "add", none, post_op, no_scalars,
                    none});
  } else {
    y = call_boxed(ops.conv, {input, packed, b, padding, stride, dilation, g.groups,
                              post_op.isNone() ? c10::IValue("none") : post_op, no_scalars, none});
  }
  if (relu_after) y.relu_();
  return y;
}

at::Tensor conv_generic(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                        const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu) {
  at::Tensor y = at::convolution(input, weight, std::nullopt, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w},
                                 {g.dil_h, g.dil_w}, /*transposed=*/false, {0, 0}, g.groups)
                     .contiguous(kChannelsLast);
  bias_residual_relu_into(y, bias, residual, relu, y);
  return y;
}

// pre(x) in channels_last: x itself, or relu(x*in_scale + in_shift) in a new buffer.
at::Tensor conv_input(const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                      const std::optional<at::Tensor>& in_shift) {
  at::Tensor input = x.contiguous(kChannelsLast);
  if (!in_scale.has_value()) return input;
  at::Tensor pre = empty_channels_last(input.sizes(), input.options());
  scale_shift_relu_into(input, *in_scale, *in_shift, pre);
  return pre;
}

at::Tensor conv_bias_act_checked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& in_scale,
                                 const std::optional<at::Tensor>& in_shift, const ConvGeometry& g, bool relu) {
  if (g.n == 0 || g.oh * g.ow == 0) {
    return empty_channels_last({g.n, g.cout, g.oh, g.ow}, x.options());
  }
  const at::Tensor input = conv_input(x, in_scale, in_shift);
  const at::Tensor w = weight.contiguous(kChannelsLast);
  scan_from_here_unless(!in_scale.has_value() || (all_finite(*in_scale) && all_finite(*in_shift)));
  std::optional<at::Tensor> r;
  if (residual.has_value()) r = residual->contiguous(kChannelsLast);

  const at::Tensor y = onednn_takes(x.scalar_type()) ? conv_onednn(input, w, weight, bias, r, g, relu)
                                                     : conv_generic(input, w, bias, r, g, relu);
  return as_canonical_channels_last(y);
}

at::Tensor conv_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& in_scale,
                             const std::optional<at::Tensor>& in_shift, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, bool relu) {
  const ConvGeometry g = check_conv_bias_act("conv_bias_act", c10::DeviceType::CPU, x, weight, bias, residual,
                                             in_scale, in_shift, stride, padding, dilation, groups);
  return conv_bias_act_checked(x, weight, bias, residual, in_scale, in_shift, g, relu);
}

// Where oneDNN can accumulate into the residual's own memory: a dtype it takes, an ungrouped conv (torch's
// in-place binary op has no grouped path), a dense channels_last residual that no input shares memory with.
bool accumulates_in_place(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& residual, const std::optional<at::Tensor>& in_scale,
                          const std::optional<at::Tensor>& in_shift, const ConvGeometry& g) {
  if (!onednn_takes(x.scalar_type()) || g.groups != 1 || !residual.is_contiguous(kChannelsLast) ||
      !residual.is_non_overlapping_and_dense() || g.n * g.oh * g.ow == 0) {
    return false;
  }
  const auto shares = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->has_storage() && t->storage().is_alias_of(residual.storage());
  };
  return !(shares(x) || shares(weight) || shares(bias) || shares(in_scale) || shares(in_shift));
}

void conv_bias_act_into_residual_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& residual, const std::optional<at::Tensor>& in_scale,
                                     const std::optional<at::Tensor>& in_shift, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, bool relu) {
  const ConvGeometry g = check_conv_bias_act("conv_bias_act_into_residual", c10::DeviceType::CPU, x, weight, bias,
                                             residual, in_scale, in_shift, stride, padding, dilation, groups);
  // No backward: refuse rather than return a result autograd cannot differentiate (e.g. replayed from a trace).
  if (at::GradMode::is_enabled()) {
    const auto needs_grad = [](const at::Tensor* t) { return t != nullptr && t->requires_grad(); };
    for (const at::Tensor* t : {&x, &weight, &bias, &residual, in_scale.has_value() ? &*in_scale : nullptr,
                                in_shift.has_value() ? &*in_shift : nullptr}) {
      FR_CHECK(!needs_grad(t), "conv_bias_act_into_residual has no backward; call it without autograd ",
               "(torch.no_grad() or torch.inference_mode()), or use conv_bias_act");
    }
  }
  if (!accumulates_in_place(x, weight, bias, residual, in_scale, in_shift, g)) {
    // Same result through a new buffer (the inputs are read completely before the residual is overwritten).
    residual.copy_(conv_bias_act_checked(x, weight, bias, residual, in_scale, in_shift, g, relu));
    return;
  }
  const at::Tensor input = conv_input(x, in_scale, in_shift);
  scan_from_here_unless(!in_scale.has_value() || (all_finite(*in_scale) && all_finite(*in_shift)));
  const OneDnnCall call = onednn_call(input, weight.contiguous(kChannelsLast), weight, bias, residual, g, relu);
  const c10::IValue none;
  // residual = relu(conv + bias + residual): oneDNN's sum post-op reads and writes the residual's memory.
  call_boxed(onednn_ops()->conv_binary_inplace,
             {residual, input, call.packed, call.bias, call.padding, call.stride, call.dilation, g.groups, "add", none,
              call.post_op, c10::List<std::optional<at::Scalar>>(), none});
  if (call.relu_after) residual.relu_();
}

}  // namespace

bool input_scans_enabled() {
  return scan_inputs;
}

bool set_input_scans_enabled(bool enabled) {
  const bool previous = scan_inputs;
  scan_inputs = enabled;
  return previous;
}

}  // namespace fused_resnet::cpu

TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) {
  m.impl("conv_bias_act", &fused_resnet::cpu::conv_bias_act_cpu);
  m.impl("conv_bias_act_into_residual", &fused_resnet::cpu::conv_bias_act_into_residual_cpu);
}
