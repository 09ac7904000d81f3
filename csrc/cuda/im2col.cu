// The Hopper engine's im2col rows (launch.h: launch_im2col) for convs of under 8 input channels and for 1x1 convs of
// stride 2-8, which its GEMM then takes as a 1x1 stride-1 conv. Torch-free and CUTLASS-free, so that tests/cuda_host/
// can also run it on a CPU.
#include <algorithm>
#include <cstdint>

#include "cuda/kernel_launch.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda {
namespace {

#if defined(FUSED_RESNET_HOST_EMULATION)
constexpr long long kMaxBlocks = 4;  // tests/cuda_host/: small inputs take the grid-stride loop round more than once
#else
constexpr long long kMaxBlocks = 1ll << 16;
#endif

// 16-bit elements, copied as bits: a thread per 8-value granule of a row walks (kh, kw, c) from the granule's first
// index and stores the 8 values at once. With `pixel_granules` (a 1x1 filter, C a multiple of 8, x on 16 bytes) a
// granule is 8 channels of one input pixel, loaded at once too.
__global__ void im2col_kernel(const unsigned short* __restrict__ x, uint4* __restrict__ rows, ConvBiasActParams p,
                              long long n0, long long granules, int granules_per_row, bool pixel_granules) {
  const long long pixels = static_cast<long long>(p.oh) * p.ow;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < granules; g += step) {
    const long long row = g / granules_per_row;
    const int k0 = static_cast<int>(g % granules_per_row) * 8;
    const long long image = n0 + row / pixels;
    const int pixel = static_cast<int>(row % pixels);
    const int ih0 = pixel / p.ow * p.stride_h - p.pad_h, iw0 = pixel % p.ow * p.stride_w - p.pad_w;
    if (pixel_granules) {
      const bool inside = k0 < p.c && ih0 >= 0 && ih0 < p.h && iw0 >= 0 && iw0 < p.w;
      rows[g] = inside ? reinterpret_cast<const uint4*>(x)[(((image * p.h + ih0) * p.w + iw0) * p.c + k0) / 8]
                       : make_uint4(0, 0, 0, 0);
      continue;
    }
    int c = k0 % p.c, s = k0 / p.c % p.kw, r = k0 / p.c / p.kw;
    unsigned words[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (r < p.kh) {  // past KH*KW*C: zeros (and r*dil_h, unbounded there, is never formed)
        const int ih = ih0 + r * p.dil_h, iw = iw0 + s * p.dil_w;
        if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w) {
          const unsigned bits = x[((image * p.h + ih) * p.w + iw) * p.c + c];
          words[j / 2] |= bits << (16 * (j % 2));
        }
      }
      if (++c == p.c) {
        c = 0;
        if (++s == p.kw) s = 0, ++r;
      }
    }
    rows[g] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

}  // namespace

cudaError_t launch_im2col(const ConvBiasActParams& p, int n0, int images, void* rows, int depth,
                          cudaStream_t stream) {
  if (depth % 8 != 0 || depth < p.kh * p.kw * p.c || reinterpret_cast<uintptr_t>(rows) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  const long long granules = static_cast<long long>(images) * p.oh * p.ow * (depth / 8);
  if (granules == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<long long>((granules + kThreads - 1) / kThreads, kMaxBlocks));
  const bool pixel_granules =
      p.kh == 1 && p.kw == 1 && p.c % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  return launch_kernel(im2col_kernel, dim3(blocks), dim3(kThreads), stream, static_cast<const unsigned short*>(p.x),
                       static_cast<uint4*>(rows), p, static_cast<long long>(n0), granules, depth / 8, pixel_granules);
}

}  // namespace fused_resnet::cuda
