// conv + folded-BN bias + [residual] + [ReLU] as ONE tensor-core kernel: an implicit GEMM over NHWC.
//
//   rows    M = N*OH*OW output pixels
//   columns N = Cout/groups output channels (one group per blockIdx.z)
//   depth   K = KH*KW*Cin/groups, Cin innermost, so both operand tiles are contiguous along K
//
// A CTA computes a BM x BN tile of the output with mma.sync (fp16/bf16: m16n8k16; fp32: m16n8k8 on TF32),
// accumulating in fp32, then applies the epilogue in registers: + bias[c] (the folded BN shift), + residual
// (same NHWC offsets as the output), ReLU, one cast, one store. The activation is written once.
//
// Two loaders fill the same shared-memory tiles:
//   VEC      16-byte cp.async copies in a STAGES-deep pipeline; needs Cin/groups to be a multiple of 16 bytes
//            (so a copy never straddles a filter tap) and 16-byte aligned bases. Every ResNet conv but the stem.
//   generic  element by element through registers: any Cin (the 7x7 stem's 3), and the pre-activation
//            prologue relu(x*in_scale + in_shift), applied to real pixels only (padding stays 0).
// Both bounds-check every element (zero fill), so any shape is correct; offsets into x, weight and y are
// 64-bit. Written for correctness first; tile sizes and the loader split are the tuning knobs.
//
// This header is torch-free: it is compiled by nvcc alone (see launch.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "cuda/elem.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda {

// ---------------------------------------------------------------------------------------------------------
// Tensor-core fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8"). With lane = 4*g + t:
//   16-bit A (16x16): a[0]=(g, 2t..2t+1)  a[1]=(g+8, 2t..)  a[2]=(g, 2t+8..)  a[3]=(g+8, 2t+8..)
//   16-bit B (16x8):  b[0]=(k 2t..2t+1, n g)  b[1]=(k 2t+8.., n g)
//   tf32   A (16x8):  a[0]=(g, t)  a[1]=(g+8, t)  a[2]=(g, t+4)  a[3]=(g+8, t+4)
//   tf32   B (8x8):   b[0]=(k t, n g)  b[1]=(k t+4, n g)
//   C (16x8, fp32):   c[0]=(g, 2t)  c[1]=(g, 2t+1)  c[2]=(g+8, 2t)  c[3]=(g+8, 2t+1)
// Shared tiles are [row][k] with k contiguous (A: row = output pixel; B: row = output channel), so every
// 16-bit fragment register is one aligned 32-bit shared load.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct Mma;

__device__ __forceinline__ uint32_t lds32(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T16>
struct Mma16 {
  static constexpr int K = 16;
  static __device__ __forceinline__ void load_a(uint32_t (&a)[4], const T16* tile, int lds, int t) {
    a[0] = lds32(tile + 2 * t);
    a[1] = lds32(tile + 8 * lds + 2 * t);
    a[2] = lds32(tile + 2 * t + 8);
    a[3] = lds32(tile + 8 * lds + 2 * t + 8);
  }
  static __device__ __forceinline__ void load_b(uint32_t (&b)[2], const T16* tile, int t) {
    b[0] = lds32(tile + 2 * t);
    b[1] = lds32(tile + 2 * t + 8);
  }
};

template <>
struct Mma<__half> : Mma16<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct Mma<__nv_bfloat16> : Mma16<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct Mma<float> {
  static constexpr int K = 8;
  // Round to nearest (cvt.rna) rather than letting the tensor core truncate the low mantissa bits.
  static __device__ __forceinline__ uint32_t tf32(float v) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
    return r;
  }
  static __device__ __forceinline__ void load_a(uint32_t (&a)[4], const float* tile, int lds, int t) {
    a[0] = tf32(tile[t]);
    a[1] = tf32(tile[8 * lds + t]);
    a[2] = tf32(tile[t + 4]);
    a[3] = tf32(tile[8 * lds + t + 4]);
  }
  static __device__ __forceinline__ void load_b(uint32_t (&b)[2], const float* tile, int t) {
    b[0] = tf32(tile[t]);
    b[1] = tf32(tile[t + 4]);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// ---------------------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies; src_bytes = 0 writes 16 zero bytes (out-of-bounds).
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// ---------------------------------------------------------------------------------------------------------
// Tile configuration.
// ---------------------------------------------------------------------------------------------------------
template <typename T, int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, bool VEC_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr bool VEC = VEC_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int CHUNK = 16 / int(sizeof(T));  // elements per 16-byte copy
  static constexpr int BK = 4 * CHUNK;                // a K tile row is 64 bytes: 4 copies
  // Rows padded by 16 bytes (80-byte stride): the 8 rows a fragment load touches hit 8 distinct bank groups.
  static constexpr int LDS = BK + CHUNK;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int STAGE_ELEMS = (BM + BN) * LDS;
  static constexpr size_t SMEM_BYTES =
      size_t(STAGES) * STAGE_ELEMS * sizeof(T) + size_t(BM) * (sizeof(long long) + 2 * sizeof(int));

  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a whole number of mma tiles");
  static_assert(BK % Mma<T>::K == 0, "K tile must be a whole number of mma steps");
  static_assert((BM * 4) % THREADS == 0 && (BN * 4) % THREADS == 0 && THREADS % 4 == 0, "VEC loader split");
  static_assert((BM * BK) % THREADS == 0 && (BN * BK) % THREADS == 0 && THREADS % BK == 0, "generic loader split");
  static_assert(VEC || STAGES == 1, "the generic loader is synchronous: one stage");
};

// Marks an output row past M: its window origin is so far outside the image that every tap is padding.
constexpr int kNoRow = INT_MIN / 2;

struct Tap {
  int dh, dw, c;  // offset of this K index from the window origin (rows, cols) and its channel in the group
  bool valid;     // k < K
};

__device__ __forceinline__ Tap decode_k(int k, int kdim, int cin_g, int kw, int dil_h, int dil_w) {
  if (k >= kdim) return Tap{0, 0, 0, false};
  const int tap = k / cin_g;
  const int r = tap / kw;
  return Tap{r * dil_h, (tap - r * kw) * dil_w, k - tap * cin_g, true};
}

template <typename T, class Cfg, bool PROLOGUE>
__global__ void __launch_bounds__(Cfg::THREADS) conv_bias_act_kernel(const ConvBiasActParams p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LDS = Cfg::LDS, THREADS = Cfg::THREADS;
  constexpr int CHUNK = Cfg::CHUNK, MI = Cfg::MI, NI = Cfg::NI, STAGES = Cfg::STAGES;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  long long* row_base = reinterpret_cast<long long*>(smem_raw + size_t(STAGES) * Cfg::STAGE_ELEMS * sizeof(T));
  int* row_ih = reinterpret_cast<int*>(row_base + BM);
  int* row_iw = row_ih + BM;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ wgt = static_cast<const T*>(p.weight);
  const int tid = threadIdx.x;
  const int group = blockIdx.z;
  const int cin_g = p.c / p.groups;
  const int cout_g = p.cout / p.groups;
  const int kdim = p.kh * p.kw * cin_g;
  const int ohw = p.oh * p.ow;
  const int m_total = p.n * ohw;
  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;  // output channel within the group

  // ---- map each output row (pixel) of the tile to its input window --------------------------------------
  for (int i = tid; i < BM; i += THREADS) {
    const int m = m0 + i;
    if (m < m_total) {
      const int img = m / ohw;
      const int rem = m - img * ohw;
      const int oh = rem / p.ow;
      const int ow = rem - oh * p.ow;
      row_base[i] = static_cast<long long>(img) * p.h * p.w * p.c + static_cast<long long>(group) * cin_g;
      row_ih[i] = oh * p.stride_h - p.pad_h;
      row_iw[i] = ow * p.stride_w - p.pad_w;
    } else {
      row_base[i] = 0;
      row_ih[i] = kNoRow;
      row_iw[i] = kNoRow;
    }
  }
  __syncthreads();

  auto a_tile = [&](int stage) { return smem + stage * Cfg::STAGE_ELEMS; };
  auto b_tile = [&](int stage) { return smem + stage * Cfg::STAGE_ELEMS + BM * LDS; };
  auto pixel_offset = [&](int row, const Tap& tap, bool& inside) -> long long {
    const int ih = row_ih[row] + tap.dh;
    const int iw = row_iw[row] + tap.dw;
    inside = tap.valid && static_cast<unsigned>(ih) < static_cast<unsigned>(p.h) &&
             static_cast<unsigned>(iw) < static_cast<unsigned>(p.w);
    return row_base[row] + (static_cast<long long>(ih) * p.w + iw) * p.c + tap.c;
  };

  // ---- loaders ------------------------------------------------------------------------------------------
  // VEC: thread -> (row, 16-byte chunk); the chunk's K index and tap are decoded once per K tile.
  auto load_tile_async = [&](int stage, int kt) {
    T* a = a_tile(stage);
    T* b = b_tile(stage);
    const int cc = tid % 4;
    const int k = kt * BK + cc * CHUNK;
    const Tap tap = decode_k(k, kdim, cin_g, p.kw, p.dil_h, p.dil_w);
#pragma unroll
    for (int i = 0; i < BM * 4 / THREADS; ++i) {
      const int row = tid / 4 + i * (THREADS / 4);
      bool inside;
      const long long off = pixel_offset(row, tap, inside);
      cp_async_16(a + row * LDS + cc * CHUNK, inside ? x + off : x, inside);
    }
#pragma unroll
    for (int i = 0; i < BN * 4 / THREADS; ++i) {
      const int row = tid / 4 + i * (THREADS / 4);
      const int n = n0 + row;
      const bool inside = tap.valid && n < cout_g;
      const T* src = wgt + (static_cast<long long>(group) * cout_g + n) * kdim + k;
      cp_async_16(b + row * LDS + cc * CHUNK, inside ? src : wgt, inside);
    }
  };

  // generic: thread -> (row, one K index); loads through registers, applying the prologue to real pixels.
  auto load_tile_sync = [&](int kt) {
    T* a = a_tile(0);
    T* b = b_tile(0);
    const int kk = tid % BK;
    const int k = kt * BK + kk;
    const Tap tap = decode_k(k, kdim, cin_g, p.kw, p.dil_h, p.dil_w);
    float scale = 1.f, shift = 0.f;
    if constexpr (PROLOGUE) {
      if (tap.valid) {
        scale = p.in_scale[group * cin_g + tap.c];
        shift = p.in_shift[group * cin_g + tap.c];
      }
    }
#pragma unroll 4
    for (int i = 0; i < BM * BK / THREADS; ++i) {
      const int row = tid / BK + i * (THREADS / BK);
      bool inside;
      const long long off = pixel_offset(row, tap, inside);
      T v = Elem<T>::zero();
      if (inside) {
        v = x[off];
        if constexpr (PROLOGUE) v = Elem<T>::from_float(relu_keep_nan(Elem<T>::to_float(v) * scale + shift));
      }
      a[row * LDS + kk] = v;
    }
#pragma unroll 4
    for (int i = 0; i < BN * BK / THREADS; ++i) {
      const int row = tid / BK + i * (THREADS / BK);
      const int n = n0 + row;
      T v = Elem<T>::zero();
      if (tap.valid && n < cout_g) v = wgt[(static_cast<long long>(group) * cout_g + n) * kdim + k];
      b[row * LDS + kk] = v;
    }
  };

  // ---- main loop: tensor-core MACs over the K tiles -----------------------------------------------------
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warp_m = warp % Cfg::WARPS_M;
  const int warp_n = warp / Cfg::WARPS_M;
  const int lg = lane >> 2;  // "groupID" of the fragment layouts
  const int lt = lane & 3;   // "threadID_in_group"

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;

  auto compute_stage = [&](int stage) {
    const T* a = a_tile(stage) + (warp_m * Cfg::WM + lg) * LDS;
    const T* b = b_tile(stage) + (warp_n * Cfg::WN + lg) * LDS;
#pragma unroll
    for (int ks = 0; ks < BK; ks += Mma<T>::K) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) Mma<T>::load_a(af[mi], a + mi * 16 * LDS + ks, LDS, lt);
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) Mma<T>::load_b(bf[ni], b + ni * 8 * LDS + ks, lt);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) Mma<T>::mma(acc[mi][ni], af[mi], bf[ni]);
    }
  };

  const int k_tiles = (kdim + BK - 1) / BK;
  if constexpr (Cfg::VEC) {
    // STAGES-1 tiles in flight; tile kt+STAGES-1 goes into the stage that tile kt-1 used, which every warp
    // has finished reading once it passes this iteration's barrier.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < k_tiles) load_tile_async(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      const int next = kt + STAGES - 1;
      if (next < k_tiles) load_tile_async(next % STAGES, next);
      cp_async_commit();
      compute_stage(kt % STAGES);
    }
    cp_async_wait<0>();
  } else {
    for (int kt = 0; kt < k_tiles; ++kt) {
      load_tile_sync(kt);
      __syncthreads();
      compute_stage(0);
      __syncthreads();
    }
  }

  // ---- epilogue: + bias, + residual, ReLU, cast, store (pairs of channels where aligned) ------------------
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  using Pair = typename Elem<T>::Pair;
  const bool pairs = (cout_g % 2 == 0) && (reinterpret_cast<uintptr_t>(y) % sizeof(Pair) == 0) &&
                     (res == nullptr || reinterpret_cast<uintptr_t>(res) % sizeof(Pair) == 0);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + warp_m * Cfg::WM + mi * 16 + lg + half * 8;
      if (m >= m_total) continue;
      const long long row_off = static_cast<long long>(m) * p.cout + static_cast<long long>(group) * cout_g;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int n = n0 + warp_n * Cfg::WN + ni * 8 + 2 * lt;  // even
        if (n >= cout_g) continue;
        const long long off = row_off + n;
        const int ch = group * cout_g + n;
        float v0 = acc[mi][ni][2 * half] + p.bias[ch];
        if (pairs) {  // n even and cout_g even: n + 1 < cout_g, and off is even
          float v1 = acc[mi][ni][2 * half + 1] + p.bias[ch + 1];
          if (res != nullptr) {
            const float2 r = Elem<T>::pair_to_float2(*reinterpret_cast<const Pair*>(res + off));
            v0 += r.x;
            v1 += r.y;
          }
          if (p.relu) {
            v0 = relu_keep_nan(v0);
            v1 = relu_keep_nan(v1);
          }
          *reinterpret_cast<Pair*>(y + off) = Elem<T>::make_pair(v0, v1);
        } else {
          if (res != nullptr) v0 += Elem<T>::to_float(res[off]);
          y[off] = Elem<T>::from_float(p.relu ? relu_keep_nan(v0) : v0);
          if (n + 1 < cout_g) {
            float v1 = acc[mi][ni][2 * half + 1] + p.bias[ch + 1];
            if (res != nullptr) v1 += Elem<T>::to_float(res[off + 1]);
            y[off + 1] = Elem<T>::from_float(p.relu ? relu_keep_nan(v1) : v1);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: pick a loader and a tile, launch.
// ---------------------------------------------------------------------------------------------------------
template <typename T, class Cfg, bool PROLOGUE>
cudaError_t launch_tile(const ConvBiasActParams& p, cudaStream_t stream) {
  auto kernel = conv_bias_act_kernel<T, Cfg, PROLOGUE>;
  // Opting in to more than 48 KB of dynamic shared memory is per device; remember where it was done.
  static std::atomic<unsigned long long> configured{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = 1ull << (device % 64);
  if ((configured.load(std::memory_order_acquire) & bit) == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg::SMEM_BYTES));
    if (err != cudaSuccess) return err;
    configured.fetch_or(bit, std::memory_order_acq_rel);
  }
  const int cout_g = p.cout / p.groups;
  const long long m_total = static_cast<long long>(p.n) * p.oh * p.ow;
  const dim3 grid(static_cast<unsigned>((m_total + Cfg::BM - 1) / Cfg::BM), (cout_g + Cfg::BN - 1) / Cfg::BN,
                  p.groups);
  kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_conv_bias_act_typed(const ConvBiasActParams& p, cudaStream_t stream) {
  constexpr int CHUNK = 16 / int(sizeof(T));
  // 128x128 tiles: 8 warps of 64x32; 64x64 tiles: 4 warps of 32x32, for small outputs and narrow groups.
  using BigVec = TileConfig<T, 128, 128, 2, 4, 3, true>;
  using SmallVec = TileConfig<T, 64, 64, 2, 2, 3, true>;
  using BigGeneric = TileConfig<T, 128, 128, 2, 4, 1, false>;
  using SmallGeneric = TileConfig<T, 64, 64, 2, 2, 1, false>;

  const int cin_g = p.c / p.groups;
  const int cout_g = p.cout / p.groups;
  const bool prologue = p.in_scale != nullptr;
  const bool aligned = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
  const bool vec = !prologue && cin_g % CHUNK == 0 && aligned;
  const long long m_total = static_cast<long long>(p.n) * p.oh * p.ow;
  const long long big_tiles = ((m_total + 127) / 128) * ((cout_g + 127) / 128) * p.groups;
  const bool big = cout_g > 64 && big_tiles >= p.sm_count;

  if (vec) return big ? launch_tile<T, BigVec, false>(p, stream) : launch_tile<T, SmallVec, false>(p, stream);
  if (prologue) {
    return big ? launch_tile<T, BigGeneric, true>(p, stream) : launch_tile<T, SmallGeneric, true>(p, stream);
  }
  return big ? launch_tile<T, BigGeneric, false>(p, stream) : launch_tile<T, SmallGeneric, false>(p, stream);
}

// Instantiated once per dtype, each in its own .cu file so that nvcc compiles them in parallel.
extern template cudaError_t launch_conv_bias_act_typed<__half>(const ConvBiasActParams&, cudaStream_t);
extern template cudaError_t launch_conv_bias_act_typed<__nv_bfloat16>(const ConvBiasActParams&, cudaStream_t);
extern template cudaError_t launch_conv_bias_act_typed<float>(const ConvBiasActParams&, cudaStream_t);

}  // namespace fused_resnet::cuda
