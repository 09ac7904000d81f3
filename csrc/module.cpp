// The Python module fused_resnet._C: build facts and the CPU weight cache's controls. Importing it also runs
// the TORCH_LIBRARY registrations of every other file in the extension.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "cpu/input_scans.h"
#include "cpu/weight_cache.h"
#ifdef FUSED_RESNET_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace {

// setup.py passes torch.__version__ as character codes (a quoted string does not survive ninja's shell).
constexpr char kTorchVersion[] = {FUSED_RESNET_TORCH_VERSION_CHARS, 0};

bool has_cuda() {
#ifdef FUSED_RESNET_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The Hopper engine (csrc/cuda/conv_sm90_cutlass.cuh): built, enabled, and how many calls it has run.
bool has_sm90_engine() {
#ifdef FUSED_RESNET_WITH_CUDA
  return fused_resnet::cuda::sm90_engine_built();
#else
  return false;
#endif
}

// The Hopper engine's process-wide switches (launch.h): on, its next kernels, the trial. Without the CUDA part they
// exist but stay off.
#ifdef FUSED_RESNET_WITH_CUDA
namespace switches = fused_resnet::cuda;
#else
namespace switches {
bool sm90_engine_enabled() { return false; }
void set_sm90_engine_enabled(bool) {}
bool sm90_next_enabled() { return false; }
void set_sm90_next_enabled(bool) {}
int sm90_trial_features() { return 0; }
void set_sm90_trial_features(int) {}
}  // namespace switches
#endif

#ifdef FUSED_RESNET_WITH_CUDA
// The names Python sees for the sm90 engine's kernels (launch.h, Sm90Route).
constexpr std::array<std::pair<fused_resnet::cuda::Sm90Route, const char*>, 8> kRouteNames = {{
    {fused_resnet::cuda::Sm90Route::kNone, ""},
    {fused_resnet::cuda::Sm90Route::kConv, "conv"},
    {fused_resnet::cuda::Sm90Route::kNarrowConv, "narrow-conv"},
    {fused_resnet::cuda::Sm90Route::kGemm, "gemm"},
    {fused_resnet::cuda::Sm90Route::kPersistentConv, "persistent-conv"},
    {fused_resnet::cuda::Sm90Route::kGemmWideEpilogue, "gemm-wide-epilogue"},
    {fused_resnet::cuda::Sm90Route::kStemConv, "stem-conv"},
    {fused_resnet::cuda::Sm90Route::kIm2colGemm, "im2col-gemm"},
}};

std::string route_name(fused_resnet::cuda::Sm90Route route) {
  for (const auto& [value, name] : kRouteNames) {
    if (value == route) return name;
  }
  return "";
}
#endif

// Kernel launches of the sm90 engine (one per call; one per chunk of images on the im2col path): on the kernel of
// that name ("conv", "narrow-conv", "gemm", "persistent-conv", "gemm-wide-epilogue", "stem-conv"), or on any ("").
long long sm90_engine_launches(const std::string& kernel) {
#ifdef FUSED_RESNET_WITH_CUDA
  for (const auto& [value, name] : kRouteNames) {
    // The im2col path counts its launches as the GEMM's.
    if (kernel == name && value != fused_resnet::cuda::Sm90Route::kIm2colGemm) {
      return fused_resnet::cuda::sm90_engine_launches(value);
    }
  }
  throw std::invalid_argument("unknown sm90 kernel '" + kernel +
                              "'; choose conv, narrow-conv, gemm, persistent-conv, gemm-wide-epilogue or stem-conv");
#else
  (void)kernel;
  return 0;
#endif
}

// The CUDA training passes' rows per thread (launch.h: set_bn_rows_per_thread); 1, 2 or 4.
void set_bn_rows_per_thread(int rows) {
  if (rows != 1 && rows != 2 && rows != 4) {
    throw std::invalid_argument("rows per thread must be 1, 2 or 4, got " + std::to_string(rows));
  }
#ifdef FUSED_RESNET_WITH_CUDA
  fused_resnet::cuda::set_bn_rows_per_thread(rows);
#endif
}

int bn_rows_per_thread() {
#ifdef FUSED_RESNET_WITH_CUDA
  return fused_resnet::cuda::bn_rows_per_thread();
#else
  return 1;
#endif
}

// Which sm90 kernel would take a call of these shapes (its host-side checks: no device needed): "conv",
// "narrow-conv", "gemm", "persistent-conv", "gemm-wide-epilogue", "stem-conv", "im2col-gemm" (the GEMM over im2col
// rows), or "" where the engine declines it (or the shapes make no conv). dtype is "float16" or "bfloat16" (others:
// ""); x is (N, C, H, W), weight (Cout, C/groups, KH, KW); the tensors are taken to be 16-byte aligned, dense
// channels_last.
std::string sm90_engine_route(const std::string& dtype, std::array<int, 4> x, std::array<int, 4> weight,
                              std::array<int, 2> stride, std::array<int, 2> padding, std::array<int, 2> dilation,
                              int groups, bool residual, bool prologue) {
#ifdef FUSED_RESNET_WITH_CUDA
  using fused_resnet::cuda::DType;
  if (dtype != "float16" && dtype != "bfloat16") return "";
  fused_resnet::cuda::ConvBiasActParams p{};
  // Stand-in addresses: aligned, never dereferenced by the checks.
  void* const aligned = reinterpret_cast<void*>(uintptr_t{1} << 20);
  p.x = p.weight = p.y = aligned;
  p.bias = static_cast<const float*>(aligned);
  p.residual = residual ? aligned : nullptr;
  p.in_scale = p.in_shift = prologue ? static_cast<const float*>(aligned) : nullptr;
  p.n = x[0], p.c = x[1], p.h = x[2], p.w = x[3];
  p.cout = weight[0], p.kh = weight[2], p.kw = weight[3];
  p.stride_h = stride[0], p.stride_w = stride[1], p.pad_h = padding[0], p.pad_w = padding[1];
  p.dil_h = dilation[0], p.dil_w = dilation[1], p.groups = groups;
  for (int v : {p.n, p.c, p.h, p.w, p.cout, p.kh, p.kw, p.stride_h, p.stride_w, p.dil_h, p.dil_w, groups}) {
    if (v <= 0) return "";
  }
  if (p.pad_h < 0 || p.pad_w < 0) return "";
  p.oh = (p.h + 2 * p.pad_h - p.dil_h * (p.kh - 1) - 1) / p.stride_h + 1;
  p.ow = (p.w + 2 * p.pad_w - p.dil_w * (p.kw - 1) - 1) / p.stride_w + 1;
  if (p.oh <= 0 || p.ow <= 0) return "";
  p.relu = true;
  return route_name(fused_resnet::cuda::sm90_engine_route(dtype == "float16" ? DType::kHalf : DType::kBFloat16, p));
#else
  (void)dtype, (void)x, (void)weight, (void)stride, (void)padding, (void)dilation, (void)groups, (void)residual,
      (void)prologue;
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_resnet C++/CUDA ops (registered as torch.ops.fused_resnet_C.*)";
  m.def("torch_version", [] { return std::string(kTorchVersion); }, "torch.__version__ this extension was built with");
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("has_sm90_engine", &has_sm90_engine, "whether the CUTLASS sm90 conv engine was compiled in (needs sm_90a)");
  m.def("sm90_engine_enabled", &switches::sm90_engine_enabled,
        "whether CUDA convs are offered to the sm90 engine first");
  m.def("set_sm90_engine_enabled", &switches::set_sm90_engine_enabled,
        "offer CUDA convs to the sm90 engine first (or not)");
  m.def("sm90_next_enabled", &switches::sm90_next_enabled,
        "whether the sm90 engine uses its next kernels (1x1 convs as a GEMM, narrow tiles, im2col rows for small "
        "inputs and strided 1x1 convs)");
  m.def("set_sm90_next_enabled", &switches::set_sm90_next_enabled, "use the sm90 engine's next kernels (or not)");
  m.def("sm90_trial_features", &switches::sm90_trial_features,
        "the trial's changes to the next kernels that are on, as a mask: 1 a persistent conv for over 64 output "
        "channels, 2 64x64 residual epilogue subtiles on the GEMM, 4 the RGB stem padded to 8 channels on 16-deep K "
        "steps (0: the next kernels as they are)");
  m.def("set_sm90_trial_features", &switches::set_sm90_trial_features,
        "turn the trial's changes on by mask (see sm90_trial_features)");
  m.def("set_bn_rows_per_thread", &set_bn_rows_per_thread,
        "rows a thread of the CUDA training passes' 16-byte kernels loads per round: 1 (default), 2 or 4");
  m.def("bn_rows_per_thread", &bn_rows_per_thread, "what set_bn_rows_per_thread chose");
  m.def("sm90_engine_route", &sm90_engine_route,
        "which sm90 kernel would take a call of these shapes: 'conv', 'narrow-conv', 'gemm', 'persistent-conv', "
        "'gemm-wide-epilogue', 'stem-conv', 'im2col-gemm' or '' (declined)",
        pybind11::arg("dtype"), pybind11::arg("x_shape"), pybind11::arg("w_shape"), pybind11::arg("stride"),
        pybind11::arg("padding"), pybind11::arg("dilation"), pybind11::arg("groups"), pybind11::arg("residual"),
        pybind11::arg("prologue"));
  m.def("sm90_engine_launches", &sm90_engine_launches,
        "kernel launches of the sm90 engine in this process (one per call; one per chunk of images on the im2col "
        "path): on the kernel of that name ('conv', 'narrow-conv', 'gemm', 'persistent-conv', 'gemm-wide-epilogue', "
        "'stem-conv'), or on any ('')",
        pybind11::arg("kernel") = "");
  m.def("clear_weight_cache", &fused_resnet::cpu::clear_weight_cache,
        "drop every prepacked (oneDNN-layout) CPU weight");
  m.def("weight_cache_size", &fused_resnet::cpu::weight_cache_size, "number of prepacked CPU weights held");
  m.def("cpu_input_scans_enabled", &fused_resnet::cpu::input_scans_enabled,
        "whether the CPU conv scans its activations for NaN/inf on this thread (cpu/input_scans.h)");
  m.def("set_cpu_input_scans_enabled", &fused_resnet::cpu::set_input_scans_enabled,
        "turn this thread's CPU activation scans on or off; returns the previous setting", pybind11::arg("enabled"));
}
