// csrc/cuda/max_pool.cu's kernels and launchers, run on the CPU by the host emulation (emulator.h), behind C entry
// points for ctypes (tests/cuda_on_host.py: max_pool, max_pool_bn_act_backward).
#include "emulator.h"

#include "cuda/max_pool.cu"

extern "C" {

// launch.h's MaxPoolParams from its fields; which: 0 forward, 1 backward. Returns the cudaError_t.
int fr_max_pool(int which, int dtype, const void* x, const void* g, const void* scale, const void* shift, void* out,
                void* workspace, long long n, long long h, long long w, long long c, long long oh, long long ow,
                int kh, int kw, int sh, int sw, int ph, int pw, bool relu) {
  fused_resnet::cuda::MaxPoolParams p{};
  p.dtype = static_cast<fused_resnet::cuda::DType>(dtype);
  p.x = x, p.g = g, p.scale = scale, p.shift = shift, p.out = out, p.workspace = workspace;
  p.n = n, p.h = h, p.w = w, p.c = c, p.oh = oh, p.ow = ow;
  p.kh = kh, p.kw = kw, p.sh = sh, p.sw = sw, p.ph = ph, p.pw = pw;
  p.relu = relu;
  return which == 0 ? fused_resnet::cuda::launch_max_pool(p, nullptr)
                    : fused_resnet::cuda::launch_max_pool_bn_act_backward(p, nullptr);
}

long long fr_max_pool_backward_workspace_bytes(long long n, long long c, long long oh, long long ow) {
  fused_resnet::cuda::MaxPoolParams p{};
  p.n = n, p.c = c, p.oh = oh, p.ow = ow;
  return fused_resnet::cuda::max_pool_backward_workspace_bytes(p);
}

long long fr_pooled_size(long long size, int kernel, int stride, int pad, bool ceil_mode) {
  return fused_resnet::cuda::pooled_size(size, kernel, stride, pad, ceil_mode);
}

}  // extern "C"
