// The Python module fused_resnet._C: build facts and the CPU weight cache's controls. Importing it also runs
// the TORCH_LIBRARY registrations of every other file in the extension.
#include <pybind11/pybind11.h>

#include "cpu/weight_cache.h"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_resnet C++/CUDA ops (registered as torch.ops.fused_resnet_C.*)";
  m.def("torch_version", [] { return std::string(kTorchVersion); }, "torch.__version__ this extension was built with");
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("clear_weight_cache", &fused_resnet::cpu::clear_weight_cache,
        "drop every prepacked (oneDNN-layout) CPU weight");
  m.def("weight_cache_size", &fused_resnet::cpu::weight_cache_size, "number of prepacked CPU weights held");
}
