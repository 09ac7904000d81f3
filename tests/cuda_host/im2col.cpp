// csrc/cuda/im2col.cu's kernel and launcher, run on the CPU by the host emulation (emulator.h), behind a C entry
// point for ctypes (tests/test_cuda_sm90_engine.py).
#include "emulator.h"

#include "cuda/im2col.cu"

extern "C" {

// Rows of images [n0, n0 + images) of x [n, h, w, c] (16-bit values) for a kh x kw conv; returns the cudaError_t.
int fr_im2col(const void* x, int n, int h, int w, int c, int kh, int kw, int oh, int ow, int stride_h, int stride_w,
              int pad_h, int pad_w, int dil_h, int dil_w, int n0, int images, void* rows, int depth) {
  fused_resnet::cuda::ConvBiasActParams p{};
  p.x = x;
  p.n = n, p.h = h, p.w = w, p.c = c, p.kh = kh, p.kw = kw, p.oh = oh, p.ow = ow;
  p.stride_h = stride_h, p.stride_w = stride_w, p.pad_h = pad_h, p.pad_w = pad_w, p.dil_h = dil_h, p.dil_w = dil_w;
  p.groups = 1;
  return fused_resnet::cuda::launch_im2col(p, n0, images, rows, depth, nullptr);
}

}  // extern "C"
