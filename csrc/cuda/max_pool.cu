// The stem's max-pool in training (fused_resnet/training/max_pool_train.py), over dense NHWC tensors whose channels
// are whole 16-byte vectors, dilation 1:
//   max_pool                out[n, oh, ow, :] = the window's maximum of x
//   max_pool_bn_act_backward  dL/d act for act = T(act(y*scale + shift)), the unit's output as bn_train.cu's
//                           normalize stores it, recomputed here from y instead of read: each window's argmax found
//                           again (one pass, into a byte per window and channel), then gathered (a second)
// with torch's CUDA rules (aten/src/ATen/native/cuda/DilatedMaxPool2d.cu, channels_last kernels), so that values and
// gradients are torch's: a window's taps in row-major order, a value wins if it is greater than the best so far or
// NaN (the first maximum, the last NaN), copied as it is; the gradient of an input pixel is the sum, in fp32 from 0
// in the windows' row-major order, of the gradients of the windows whose argmax it is, cast once (in one window
// only: that window's gradient as it is, or +0).
// A thread owns one channel vector of one output pixel (forward, backward's argmax) or input pixel (backward's
// gather: no atomics).
// Torch-free: compiled by nvcc alone (see launch.h).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/bn_math.cuh"
#include "cuda/kernel_launch.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda {
namespace {

// No __launch_bounds__(kThreads): with it CUDA 13's ptxas held these kernels to 40 and 80 registers, and spilled.
constexpr int kThreads = 256;
#if defined(FUSED_RESNET_HOST_EMULATION)
constexpr long long kMaxBlocks = 4;  // tests/cuda_host/: small tensors take the grid-stride loop more than once
#else
constexpr long long kMaxBlocks = 1 << 20;
#endif

// Taps [first, end) of window o along one axis, inside the image: torch's bounds (start = o*stride - pad, end =
// min(start + kernel, size), then the start moved up to 0).
struct Taps {
  int first, end;
};

__device__ __forceinline__ Taps taps_of(int o, int kernel, int stride, int pad, int size) {
  const int start = o * stride - pad;
  return {start < 0 ? 0 : start, start + kernel < size ? start + kernel : size};
}

// Windows [first, end) along one axis that hold input position i: torch's p_start / p_end.
__device__ __forceinline__ int first_window(int i, int pad, int kernel, int stride) {
  return i + pad < kernel ? 0 : (i + pad - kernel) / stride + 1;
}

__device__ __forceinline__ int end_window(int i, int pad, int stride, int windows) {
  const int end = (i + pad) / stride + 1;
  return end < windows ? end : windows;
}

template <typename Acc>
__device__ __forceinline__ bool wins(Acc value, Acc best) {
  return value > best || value != value;  // greater, or NaN
}

// The pooling geometry as ints, the kernels' locals.
struct Geometry {
  int h, w, oh, ow, kh, kw, sh, sw, ph, pw;
  long long c;
};

__device__ __forceinline__ Geometry geometry_of(const MaxPoolParams& p) {
  return {static_cast<int>(p.h), static_cast<int>(p.w), static_cast<int>(p.oh), static_cast<int>(p.ow), p.kh,
          p.kw, p.sh, p.sw, p.ph, p.pw, p.c};
}

// f(n, row, col, pixel, v) for every channel vector v of every pixel (n, row, col) of an [n, height, width, vectors]
// grid of items, flat pixel index `pixel`, grid-stride: consecutive threads take consecutive vectors of a pixel.
template <typename F>
__device__ __forceinline__ void for_each_pixel_vector(long long n, int height, int width, long long vectors, F f) {
  const long long items = n * height * width * vectors;
  for (long long item = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long v = item % vectors, pixel = item / vectors;
    const int col = static_cast<int>(pixel % width), row = static_cast<int>(pixel / width % height);
    f(pixel / (static_cast<long long>(width) * height), row, col, pixel, v);
  }
}

template <typename T>
__global__ void max_pool_vec(const T* __restrict__ x, T* __restrict__ out, MaxPoolParams p) {
  using Acc = AccOf<T>;
  constexpr int W = Vec<T>::kWidth;
  const Geometry k = geometry_of(p);
  for_each_pixel_vector(p.n, k.oh, k.ow, k.c / W, [&](long long n, int oh, int ow, long long pixel, long long v) {
    const T* image = x + n * k.h * k.w * k.c + v * W;
    const Taps rows = taps_of(oh, k.kh, k.sh, k.ph, k.h), cols = taps_of(ow, k.kw, k.sw, k.pw, k.w);
    Acc best[W];
    Vec<T> o;  // the winners as they are (torch copies them: a NaN keeps its bits)
#pragma unroll
    for (int j = 0; j < W; ++j) best[j] = -INFINITY, o.v[j] = AccMath<T>::store(-INFINITY);
    for (int ih = rows.first; ih < rows.end; ++ih) {
      for (int iw = cols.first; iw < cols.end; ++iw) {
        const Vec<T> xv = load_vec(image + (static_cast<long long>(ih) * k.w + iw) * k.c);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const Acc value = AccMath<T>::load(xv.v[j]);
          if (wins(value, best[j])) best[j] = value, o.v[j] = xv.v[j];
        }
      }
    }
    store_vec(out + pixel * k.c + v * W, o);
  });
}

// The backward in two passes: each window's argmax per channel (max_pool_bn_act_winners), then each input pixel's
// gradient from the windows that hold it (max_pool_grad_gather). Why not one: an input pixel lies in up to 4 windows
// of the stem's 3x3/2 pool, 2.25 on average, and a gather that found each of their argmaxes again evaluated about 20
// activations per pixel, 9 times the windows' own taps: by a count of its instructions (about 64 per tap and vector
// of 8 bf16 channels) some 1 ms of issue time for ResNet-50 at b256 on an H200, against about 0.2 ms to move its bytes.
// The winners cost one byte per window and channel (51 MB there). An estimate, not a measurement.

// A window's winning tap per channel: its place in the window's full kernel grid (row-major from the unclipped
// start: below kh*kw, which the launcher holds under kMaxTaps), or kNoWinner where no tap wins (a window of -inf
// values), where torch credits the image's pixel 0.
constexpr int kNoWinner = 255;
constexpr int kMaxTaps = kNoWinner;  // launch.h's limit on kh*kw

template <int W>
struct alignas(W) Winners {
  unsigned char v[W];
};

template <typename T>
__global__ void max_pool_bn_act_winners(const T* __restrict__ y, const AccOf<T>* __restrict__ scale,
                                        const AccOf<T>* __restrict__ shift, unsigned char* __restrict__ winners,
                                        MaxPoolParams p) {
  using Acc = AccOf<T>;
  constexpr int W = Vec<T>::kWidth;
  const Geometry k = geometry_of(p);
  const bool relu = p.relu;
  for_each_pixel_vector(p.n, k.oh, k.ow, k.c / W, [&](long long n, int oh, int ow, long long pixel, long long v) {
    const T* image = y + n * k.h * k.w * k.c + v * W;
    Acc s[W], t[W], best[W];
    load_channels(s, scale, v * W);
    load_channels(t, shift, v * W);
    Winners<W> won;
#pragma unroll
    for (int j = 0; j < W; ++j) best[j] = -INFINITY, won.v[j] = kNoWinner;
    const int h0 = oh * k.sh - k.ph, w0 = ow * k.sw - k.pw;  // the window's unclipped start
    const Taps rows = taps_of(oh, k.kh, k.sh, k.ph, k.h), cols = taps_of(ow, k.kw, k.sw, k.pw, k.w);
    for (int ih = rows.first; ih < rows.end; ++ih) {
      for (int iw = cols.first; iw < cols.end; ++iw) {
        const auto tap = static_cast<unsigned char>((ih - h0) * k.kw + (iw - w0));
        const Vec<T> yv = load_vec(image + (static_cast<long long>(ih) * k.w + iw) * k.c);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const Acc z = pre_activation_of<T>(AccMath<T>::load(yv.v[j]), s[j], t[j], false, Acc(0));
          const Acc act = AccMath<T>::load(AccMath<T>::store(activation_of(z, relu)));  // as stored
          if (wins(act, best[j])) best[j] = act, won.v[j] = tap;
        }
      }
    }
    *reinterpret_cast<Winners<W>*>(winners + pixel * k.c + v * W) = won;
  });
}

template <typename T>
__global__ void max_pool_grad_gather(const T* __restrict__ g, const unsigned char* __restrict__ winners,
                                     T* __restrict__ dx, MaxPoolParams p) {
  using Acc = AccOf<T>;
  constexpr int W = Vec<T>::kWidth;
  const Geometry k = geometry_of(p);
  for_each_pixel_vector(p.n, k.h, k.w, k.c / W, [&](long long n, int h, int w, long long pixel, long long v) {
    const long long window_base = n * k.oh * k.ow * k.c + v * W;
    const bool pixel0 = h == 0 && w == 0;  // credited by a window without a winner
    Acc sum[W];
    // In exactly one window, torch copies that window's gradient as it is (a -0 or a NaN keeps its bits) instead
    // of summing from +0: `copy` then holds it.
    Vec<T> copy;
#pragma unroll
    for (int j = 0; j < W; ++j) sum[j] = Acc(0), copy.v[j] = AccMath<T>::store(Acc(0));
    const int oh_first = first_window(h, k.ph, k.kh, k.sh), ow_first = first_window(w, k.pw, k.kw, k.sw);
    const int oh_end = end_window(h, k.ph, k.sh, k.oh), ow_end = end_window(w, k.pw, k.sw, k.ow);
    const bool one_window = oh_end - oh_first == 1 && ow_end - ow_first == 1;
    for (int oh = oh_first; oh < oh_end; ++oh) {
      for (int ow = ow_first; ow < ow_end; ++ow) {
        const int tap = (h - (oh * k.sh - k.ph)) * k.kw + (w - (ow * k.sw - k.pw));  // this pixel's, in the window
        const long long at = window_base + (static_cast<long long>(oh) * k.ow + ow) * k.c;
        const Winners<W> won = *reinterpret_cast<const Winners<W>*>(winners + at);
        const Vec<T> gv = load_vec(g + at);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          if (won.v[j] == tap || (won.v[j] == kNoWinner && pixel0)) {
            sum[j] += AccMath<T>::load(gv.v[j]);
            copy.v[j] = gv.v[j];
          }
        }
      }
    }
    if (!one_window) {
#pragma unroll
      for (int j = 0; j < W; ++j) copy.v[j] = AccMath<T>::store(sum[j]);
    }
    store_vec(dx + pixel * k.c + v * W, copy);
  });
}

unsigned blocks_for(long long items) {
  return static_cast<unsigned>(std::min(kMaxBlocks, std::max(1LL, (items + kThreads - 1) / kThreads)));
}

bool aligned(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// What both kernels need of p: whole 16-byte channel vectors, aligned tensors, windows that fit an int index.
template <typename T>
bool takes(const MaxPoolParams& p) {
  return p.c % Vec<T>::kWidth == 0 && aligned(p.x) && aligned(p.g) && aligned(p.scale) && aligned(p.shift) &&
         aligned(p.out) && p.h * p.w <= INT32_MAX && p.kh > 0 && p.kw > 0 && p.sh > 0 && p.sw > 0;
}

template <typename T>
cudaError_t run_forward(const MaxPoolParams& p, cudaStream_t stream) {
  if (!takes<T>(p)) return cudaErrorInvalidValue;
  return launch_kernel(max_pool_vec<T>, dim3(blocks_for(p.n * p.oh * p.ow * (p.c / Vec<T>::kWidth))), dim3(kThreads),
                       stream, static_cast<const T*>(p.x), static_cast<T*>(p.out), p);
}

template <typename T>
cudaError_t run_backward(const MaxPoolParams& p, cudaStream_t stream) {
  if (!takes<T>(p) || p.g == nullptr || p.scale == nullptr || p.shift == nullptr || p.workspace == nullptr ||
      reinterpret_cast<uintptr_t>(p.workspace) % 8 != 0 || p.kh * p.kw >= kMaxTaps) {
    return cudaErrorInvalidValue;
  }
  constexpr int W = Vec<T>::kWidth;
  auto* winners = static_cast<unsigned char*>(p.workspace);
  const cudaError_t err =
      launch_kernel(max_pool_bn_act_winners<T>, dim3(blocks_for(p.n * p.oh * p.ow * (p.c / W))), dim3(kThreads),
                    stream, static_cast<const T*>(p.x), static_cast<const AccOf<T>*>(p.scale),
                    static_cast<const AccOf<T>*>(p.shift), winners, p);
  if (err != cudaSuccess) return err;
  return launch_kernel(max_pool_grad_gather<T>, dim3(blocks_for(p.n * p.h * p.w * (p.c / W))), dim3(kThreads),
                       stream, static_cast<const T*>(p.g), static_cast<const unsigned char*>(winners),
                       static_cast<T*>(p.out), p);
}

}  // namespace

int64_t pooled_size(int64_t size, int kernel, int stride, int pad, bool ceil_mode) {
  const int64_t span = size + 2 * pad - kernel + (ceil_mode ? stride - 1 : 0);
  int64_t windows = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;  // floor division
  if (ceil_mode && (windows - 1) * stride >= size + pad) --windows;  // the last window would start in the padding
  return windows;
}

cudaError_t launch_max_pool(const MaxPoolParams& p, cudaStream_t stream) {
  if (p.n * p.oh * p.ow * p.c == 0) return cudaSuccess;
  return with_element_type(p.dtype, [&](auto type) { return run_forward<typename decltype(type)::T>(p, stream); });
}

int64_t max_pool_backward_workspace_bytes(const MaxPoolParams& p) {
  return p.n * p.oh * p.ow * p.c;  // one winning tap per window and channel
}

cudaError_t launch_max_pool_bn_act_backward(const MaxPoolParams& p, cudaStream_t stream) {
  if (p.n * p.h * p.w * p.c == 0) return cudaSuccess;
  return with_element_type(p.dtype, [&](auto type) { return run_backward<typename decltype(type)::T>(p, stream); });
}

}  // namespace fused_resnet::cuda
