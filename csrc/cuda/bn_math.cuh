// What every kernel over a train-mode unit's conv output shares (bn_train.cu's passes, max_pool.cu's stem pool):
// the one definition of the unit's activation from y, and the 16-byte vectors the kernels move. Torch-free.
#pragma once

#include "cuda/elem.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda {

template <typename T>
using AccOf = typename AccMath<T>::Acc;

template <typename Element>
struct Type {
  using T = Element;
};

// f(Type<T>{}) for the element type of `dtype`, the one dtype switch of these kernels' launchers; fp64 only where
// kWithDouble (the others work in fp32: cudaErrorInvalidValue).
template <bool kWithDouble = false, typename F>
cudaError_t with_element_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf:
      return f(Type<__half>{});
    case DType::kBFloat16:
      return f(Type<__nv_bfloat16>{});
    case DType::kFloat:
      return f(Type<float>{});
    case DType::kDouble:
      if constexpr (kWithDouble) return f(Type<double>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// z = y*scale + shift [+ r [*r_scale]]: the one definition of the pre-activation (r_value is read only with a
// residual, r_scale only with a residual scale; without one the sum is the plain addition it always was).
template <typename T>
__device__ __forceinline__ AccOf<T> pre_activation_of(AccOf<T> y, AccOf<T> scale, AccOf<T> shift, bool has_residual,
                                                      AccOf<T> r_value, bool has_r_scale = false,
                                                      AccOf<T> r_scale = AccOf<T>(1)) {
  AccOf<T> z = AccMath<T>::fma(y, scale, shift);
  if (has_residual) z = has_r_scale ? AccMath<T>::fma(r_value, r_scale, z) : z + r_value;
  return z;
}

// The unit's output before its cast to T: relu(z) keeping NaN (as torch.relu does), or z.
template <typename Acc>
__device__ __forceinline__ Acc activation_of(Acc z, bool relu) {
  return relu && z < Acc(0) ? Acc(0) : z;
}

// kWidth consecutive channels of one pixel, 16 bytes: the unit of the vectorized kernels' loads and stores.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
  T v[kWidth];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& value) {
  *reinterpret_cast<Vec<T>*>(p) = value;
}

// A thread's kWidth values of a per-channel vector, from channel c0 on, in 16-byte loads (the launchers check the
// vectors' alignment). Loaded one value at a time (ptxas made 8 scalar loads a vector) they took 8 times the L1
// wavefronts: a warp's 32 threads own 32 different channel vectors, so each 4-byte load touched 32 sectors; and as
// the elementwise kernels' threads mostly visit one or two pixels, by that count these loads took more L1 time than
// the pixels' own (grad_input loads 5 vectors). A count from the SASS, not a measurement.
template <int W, typename Acc>
__device__ __forceinline__ void load_channels(Acc (&dst)[W], const Acc* __restrict__ src, long long c0) {
  constexpr int kPerLoad = 16 / static_cast<int>(sizeof(Acc));
  static_assert(W % kPerLoad == 0, "a thread's channels are whole 16-byte vectors of the accumulator type");
  struct alignas(16) Chunk {
    Acc v[kPerLoad];
  };
  const Chunk* chunks = reinterpret_cast<const Chunk*>(src + c0);
#pragma unroll
  for (int k = 0; k < W / kPerLoad; ++k) {
    const Chunk chunk = chunks[k];
#pragma unroll
    for (int j = 0; j < kPerLoad; ++j) dst[k * kPerLoad + j] = chunk.v[j];
  }
}

}  // namespace fused_resnet::cuda
