// Element types of the torch-free CUDA kernels: explicit conversions (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__) and each type's accumulation type (fp32; fp64 for fp64).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fused_resnet::cuda {

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half zero() { return __ushort_as_half(0); }
  static __device__ __forceinline__ Pair make_pair(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float2 pair_to_float2(Pair v) { return __half22float2(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __ushort_as_bfloat16(0); }
  static __device__ __forceinline__ Pair make_pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float2 pair_to_float2(Pair v) { return __bfloat1622float2(v); }
};

template <>
struct Elem<float> {
  using Pair = float2;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
  static __device__ __forceinline__ float zero() { return 0.f; }
  static __device__ __forceinline__ Pair make_pair(float a, float b) { return make_float2(a, b); }
  static __device__ __forceinline__ float2 pair_to_float2(Pair v) { return v; }
};

// relu that keeps NaN, as torch.relu does.
__device__ __forceinline__ float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

// Loads into and stores from the accumulation type: fp32 for the 16-bit types and fp32, fp64 for fp64.
template <typename T>
struct AccMath {
  using Acc = float;
  static __device__ __forceinline__ float load(const T& v) { return Elem<T>::to_float(v); }
  static __device__ __forceinline__ T store(float v) { return Elem<T>::from_float(v); }
  static __device__ __forceinline__ float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
};

template <>
struct AccMath<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
  static __device__ __forceinline__ double fma(double a, double b, double c) { return __fma_rn(a, b, c); }
};

}  // namespace fused_resnet::cuda
