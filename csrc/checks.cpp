#include "checks.h"
#include "message.h"

#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

namespace fused_resnet {
namespace {

bool is_float_dtype(c10::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_device(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device_type,
                  const at::Tensor& x) {
  FR_CHECK(t.device().type() == device_type, op, ": ", name, " is on ", t.device(), " but this is the ",
           c10::DeviceTypeName(device_type, /*lower_case=*/true), " implementation; move every tensor to ",
           c10::DeviceTypeName(device_type, true));
  FR_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", x.device(),
           "; move both to one device");
  FR_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
           t.layout());
}

void check_pair(const char* op, const char* name, c10::IntArrayRef value, int64_t minimum) {
  FR_CHECK(value.size() == 2, op, ": ", name, " must have 2 values (height, width), got ", value);
  FR_CHECK(value[0] >= minimum && value[1] >= minimum, op, ": ", name, " must be >= ", minimum, ", got ", value);
}

void check_per_channel(const char* op, const char* name, const at::Tensor& t, int64_t channels,
                       const at::Tensor& x, c10::DeviceType device_type) {
  check_device(op, name, t, device_type, x);
  FR_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape (", channels, ",), got ",
           t.sizes());
  FR_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == x.scalar_type(),
           op, ": ", name, " must be float32 (or float64, or the input dtype), got ", t.scalar_type());
}

}  // namespace

ConvGeometry check_conv_bias_act(
    const char* op, c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups) {
  FR_CHECK(x.defined() && weight.defined() && bias.defined(), op, ": x, weight and bias are required");
  check_device(op, "input", x, device_type, x);
  FR_CHECK(x.dim() == 4, op, ": input must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  FR_CHECK(is_float_dtype(x.scalar_type()), op,
           ": input must be floating point (float16, bfloat16, float32 or float64), got ", x.scalar_type());
  check_device(op, "weight", weight, device_type, x);
  FR_CHECK(weight.dim() == 4, op, ": weight must be 4-D (Cout, Cin/groups, KH, KW), got shape ", weight.sizes());
  FR_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
           " must match the input dtype ", x.scalar_type());
  FR_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);

  ConvGeometry g{};
  g.n = x.size(0);
  g.c = x.size(1);
  g.h = x.size(2);
  g.w = x.size(3);
  g.cout = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.groups = groups;
  FR_CHECK(g.c > 0 && g.cout > 0 && g.kh > 0 && g.kw > 0, op,
           ": needs at least one input channel, output channel and filter tap; input ", x.sizes(), ", weight ",
           weight.sizes());
  FR_CHECK(g.c == weight.size(1) * groups, op, ": input has ", g.c, " channels but the weight expects ",
           weight.size(1) * groups, " (Cin/groups=", weight.size(1), ", groups=", groups, ")");
  FR_CHECK(g.cout % groups == 0, op, ": Cout=", g.cout, " is not divisible by groups=", groups);
  g.oh = (g.h + 2 * g.pad_h - g.dil_h * (g.kh - 1) - 1) / g.stride_h + 1;
  g.ow = (g.w + 2 * g.pad_w - g.dil_w * (g.kw - 1) - 1) / g.stride_w + 1;
  FR_CHECK(g.h + 2 * g.pad_h >= g.dil_h * (g.kh - 1) + 1 && g.w + 2 * g.pad_w >= g.dil_w * (g.kw - 1) + 1, op,
           ": input spatial size (", g.h, ", ", g.w, ") is too small for a (", g.kh, ", ", g.kw,
           ") kernel with padding ", padding, " and dilation ", dilation);

  check_device(op, "bias", bias, device_type, x);
  FR_CHECK(bias.dim() == 1 && bias.size(0) == g.cout, op, ": bias must have shape (", g.cout, ",), got ",
           bias.sizes());
  FR_CHECK(bias.scalar_type() == at::kFloat || bias.scalar_type() == x.scalar_type(), op,
           ": bias must be float32 (or the input dtype), got ", bias.scalar_type());

  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_device(op, "residual", r, device_type, x);
    FR_CHECK(r.dim() == 4 && r.size(0) == g.n && r.size(1) == g.cout && r.size(2) == g.oh && r.size(3) == g.ow,
             op, ": residual must have the output shape [", g.n, ", ", g.cout, ", ", g.oh, ", ", g.ow, "], got ",
             r.sizes());
    FR_CHECK(r.scalar_type() == x.scalar_type(), op, ": residual dtype ", r.scalar_type(),
             " must match the input dtype ", x.scalar_type());
  }
  FR_CHECK(in_scale.has_value() == in_shift.has_value(), op,
           ": in_scale and in_shift come together (the folded pre-activation BN); got only ",
           in_scale.has_value() ? "in_scale" : "in_shift");
  if (in_scale.has_value()) {
    check_per_channel(op, "in_scale", *in_scale, g.c, x, device_type);
    check_per_channel(op, "in_shift", *in_shift, g.c, x, device_type);
  }
  return g;
}

void check_bias_residual_relu(
    const char* op, c10::DeviceType device_type, const at::Tensor& y, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual) {
  FR_CHECK(y.defined() && bias.defined(), op, ": y and bias are required");
  check_device(op, "y", y, device_type, y);
  FR_CHECK(y.dim() == 4, op, ": y must be a 4-D (N, C, H, W) tensor, got shape ", y.sizes());
  FR_CHECK(is_float_dtype(y.scalar_type()), op,
           ": y must be floating point (float16, bfloat16, float32 or float64), got ", y.scalar_type());
  check_device(op, "bias", bias, device_type, y);
  FR_CHECK(bias.dim() == 1 && bias.size(0) == y.size(1), op, ": bias must have shape (", y.size(1), ",), got ",
           bias.sizes());
  FR_CHECK(bias.scalar_type() == at::kFloat || bias.scalar_type() == y.scalar_type(), op,
           ": bias must be float32 (or y's dtype), got ", bias.scalar_type());
  if (residual.has_value()) {
    check_device(op, "residual", *residual, device_type, y);
    FR_CHECK(residual->sizes() == y.sizes(), op, ": residual must have y's shape ", y.sizes(), ", got ",
             residual->sizes());
    FR_CHECK(residual->scalar_type() == y.scalar_type(), op, ": residual dtype ", residual->scalar_type(),
             " must match y's dtype ", y.scalar_type());
  }
}

void check_bn_y(const char* op, c10::DeviceType device_type, const at::Tensor& y) {
  FR_CHECK(y.dim() == 4, op, ": expected an (N, C, H, W) tensor, got shape ", y.sizes());
  FR_CHECK(y.device().type() == device_type, op, ": this is the ", c10::DeviceTypeName(device_type, true),
           " implementation, got a tensor on ", y.device());
  FR_CHECK(y.layout() == at::kStrided, op, ": y must be a dense (strided) tensor, got layout ", y.layout());
  FR_CHECK(is_float_dtype(y.scalar_type()), op, ": y must be float16, bfloat16, float32 or float64, got ",
           y.scalar_type());
}

void check_bn_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& y) {
  FR_CHECK(t.sizes() == y.sizes() && t.scalar_type() == y.scalar_type() && t.device() == y.device() &&
               t.layout() == at::kStrided,
           op, ": ", name, " must match y (shape ", y.sizes(), ", ", y.scalar_type(), ", ", y.device(),
           "), got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
}

at::TensorOptions bn_accumulation_options(const at::Tensor& y) {
  return y.options().dtype(y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

void check_bn_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& y) {
  const auto acc = bn_accumulation_options(y).dtype().toScalarType();
  FR_CHECK(v.dim() == 1 && v.size(0) == y.size(1) && v.scalar_type() == acc && v.is_contiguous() &&
               v.device() == y.device(),
           op, ": ", name, " must be a contiguous ", acc, " vector of ", y.size(1), " values on ", y.device(),
           ", got ", v.scalar_type(), " of shape ", v.sizes(), " on ", v.device());
}

void check_bn_residual_scale(const char* op, const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& residual_scale, const at::Tensor& y) {
  if (!residual_scale.has_value()) return;
  FR_CHECK(residual.has_value(), op, ": residual_scale scales the residual, but no residual was given");
  check_bn_vector(op, "residual_scale", *residual_scale, y);
}

at::Tensor empty_channels_last(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options.memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor as_canonical_channels_last(const at::Tensor& t) {
  // Size-1 dimensions make several stride sets "channels_last contiguous"; fake tensors have exactly one.
  const auto canonical = c10::get_channels_last_strides_2d(t.sizes());
  if (t.strides() == c10::IntArrayRef(canonical)) {
    return t;
  }
  return empty_channels_last(t.sizes(), t.options()).copy_(t);
}

}  // namespace fused_resnet
