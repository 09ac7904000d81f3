// The training path's passes over a conv output y on CUDA: the ops and maths of csrc/cpu/bn_train.cpp
// (fused_resnet/training/passes.py), over dense NHWC tensors, math in fp32 (fp64 for fp64):
//   stats        per-channel (mean, M2): two-pass per batch of 8 values, batches and lanes merged by Chan
//   normalize    act(z)
//   grad_sums    (sum g', sum g'*(y - mean), g' when asked), g' = g*[z > 0]
//   grad_input   a*g' + b*y + c
// with z = fma(y, scale, shift) [+ r, or fma(r, r_scale, ...) with a residual scale] computed by one helper in every
// pass, so backward's mask is forward's bit for bit. A block covers 32 channels (one per lane: a warp reads 32
// consecutive values of a pixel) x 8 pixel lanes; every pass has a 16-byte twin (a thread owns a vector of channels)
// for the common case of channels a multiple of the vector width and aligned tensors. Reductions write one partial per
// (chunk of pixels, channel) and a second kernel merges the chunks in order (lanes of chunks, then the lanes): the
// result depends on the shape alone, never on the GPU or the timing.
// Torch-free: compiled by nvcc alone (see launch.h).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/bn_math.cuh"
#include "cuda/elem.cuh"
#include "cuda/kernel_launch.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda {
namespace {

constexpr int kLanesC = 32;  // channels per block
constexpr int kLanesR = 8;   // pixel lanes per block
constexpr int kBatch = 8;    // values a stats lane reduces two-pass before merging them into its running (mean, M2)
constexpr long long kMinChunkRows = 64;
// kMergeLanes: lanes per block of the merge kernels, each merging every kMergeLanes-th chunk partial (the merges are
// a chain of dependent steps: with 8 lanes 1,024 chunks took 45 µs per 64-channel layer on an H200, 2 blocks in
// all). kMergeBatch: partials a merge lane loads before merging them (for_lane_chunks); fp64 ones take 4, as 8 would
// not fit the 64 registers that 1,024 threads a block leave.
#if defined(FUSED_RESNET_HOST_EMULATION)
// tests/cuda_host/ runs these kernels on a CPU, on small tensors: with these limits those take the paths that only
// large tensors take on a GPU (chunks of more than kMinChunkRows rows, more chunks than merge lanes, merge batches
// that go round more than once and end part full, grid-stride loops that go round more than once).
constexpr long long kMaxChunks = 44;  // 8 lanes x batches of 2: 16 a round, the last round part full
constexpr long long kMaxElementwiseBlocks = 8;
constexpr int kMergeLanes = 8;
template <typename Acc>
constexpr int kMergeBatch = 2;
#else
constexpr long long kMaxChunks = 1024;
constexpr long long kMaxElementwiseBlocks = 16384;
constexpr int kMergeLanes = 32;
template <typename Acc>
constexpr int kMergeBatch = sizeof(Acc) > 4 ? 4 : 8;
#endif

// Pixels are split into chunks of chunk_rows (the last one shorter), one reduction partial each.
struct Chunks {
  long long count, rows;
};

Chunks chunks_for(long long rows) {
  long long count = std::min(kMaxChunks, std::max(1LL, (rows + kMinChunkRows - 1) / kMinChunkRows));
  const long long chunk_rows = (rows + count - 1) / count;
  count = (rows + chunk_rows - 1) / chunk_rows;  // no empty chunk
  return {count, chunk_rows};
}

dim3 channel_grid(long long blocks_x, long long channels) {
  return dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>((channels + kLanesC - 1) / kLanesC));
}

// The scalar kernels' pre-activation of value i, whose channel's residual scale is rs (where has_rs).
template <typename T>
__device__ __forceinline__ AccOf<T> pre_activation(AccOf<T> y, AccOf<T> scale, AccOf<T> shift, const T* r,
                                                   long long i, bool has_rs, AccOf<T> rs) {
  return pre_activation_of<T>(y, scale, shift, r != nullptr, r != nullptr ? AccMath<T>::load(r[i]) : AccOf<T>(0),
                              has_rs, rs);
}

// A scalar kernel's residual scale for channel c: (whether there is one, its value or 1).
template <typename Acc>
__device__ __forceinline__ Acc residual_scale_of(const Acc* residual_scale, long long c) {
  return residual_scale != nullptr ? residual_scale[c] : Acc(1);
}

// Chan's merge of (nb, mb, m2b) into the running (n, mean, m2).
template <typename Acc>
__device__ __forceinline__ void chan_merge(Acc& n, Acc& mean, Acc& m2, Acc nb, Acc mb, Acc m2b) {
  if (nb == Acc(0)) return;
  const Acc total = n + nb;
  const Acc wb = nb / total;
  const Acc delta = mb - mean;
  mean += delta * wb;
  m2 += m2b + delta * delta * n * wb;
  n = total;
}

// ------------------------------------------------------------------------------------------------ statistics
template <typename T>
__global__ void stats_partials(const T* __restrict__ y, long long rows, long long channels, long long chunk_rows,
                               AccOf<T>* __restrict__ part_mean, AccOf<T>* __restrict__ part_m2) {
  using Acc = AccOf<T>;
  __shared__ Acc s_n[kLanesR][kLanesC], s_mean[kLanesR][kLanesC], s_m2[kLanesR][kLanesC];
  const long long c = static_cast<long long>(blockIdx.y) * kLanesC + threadIdx.x;
  const long long begin = static_cast<long long>(blockIdx.x) * chunk_rows;
  const long long end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  Acc n = 0, mean = 0, m2 = 0;
  if (c < channels) {
    for (long long r0 = begin + threadIdx.y; r0 < end; r0 += kLanesR * kBatch) {
      Acc v[kBatch];
      Acc sum = 0;
      int k = 0;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const long long r = r0 + static_cast<long long>(j) * kLanesR;
        v[j] = r < end ? AccMath<T>::load(y[r * channels + c]) : Acc(0);
        sum += v[j];
        k += r < end;
      }
      const Acc mb = sum / Acc(k);
      Acc m2b = 0;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const Acc d = j < k ? v[j] - mb : Acc(0);
        m2b += d * d;
      }
      chan_merge(n, mean, m2, Acc(k), mb, m2b);
    }
  }
  s_n[threadIdx.y][threadIdx.x] = n;
  s_mean[threadIdx.y][threadIdx.x] = mean;
  s_m2[threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.y != 0 || c >= channels) return;
  for (int j = 1; j < kLanesR; ++j) chan_merge(n, mean, m2, s_n[j][threadIdx.x], s_mean[j][threadIdx.x], s_m2[j][threadIdx.x]);
  part_mean[blockIdx.x * channels + c] = mean;
  part_m2[blockIdx.x * channels + c] = m2;
}

// Chan's merge with the counts in double (a channel's count reaches rows, ~2^33: beyond fp32's exact integers).
template <typename Acc>
__device__ __forceinline__ void chan_merge_counted(double& n, Acc& mean, Acc& m2, double nb, Acc mb, Acc m2b) {
  if (nb == 0) return;
  const double total = n + nb;
  const Acc delta = mb - mean;
  mean += delta * static_cast<Acc>(nb / total);
  m2 += m2b + delta * delta * static_cast<Acc>(n * nb / total);
  n = total;
}

// torch.lerp's formula (ATen's at::native::lerp, in fp32), so that running stats move as nn.BatchNorm2d's do.
__device__ __forceinline__ float lerp(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

// launch.h's BnFinalizeParams for channel c, from its merged (mean, M2). IEEE division and square root (nvcc's
// defaults without --use_fast_math), as channel_math's div_rn and sqrt_rn.
__device__ __forceinline__ void finalize_channel(long long c, float mean, float m2, const BnFinalizeParams& f) {
  const float invstd = 1.0f / sqrtf(m2 / f.count + f.eps);
  if (f.running_mean != nullptr) {
    f.running_mean[c] = lerp(f.running_mean[c], mean, f.factor);
    f.running_var[c] = lerp(f.running_var[c], m2 / (f.count - 1.0f), f.factor);
  }
  const float scale = f.gamma != nullptr ? f.gamma[c] * invstd : invstd;
  float shift = -mean * scale;
  if (f.beta != nullptr) shift = shift + f.beta[c];
  f.invstd[c] = invstd;
  f.scale[c] = scale;
  f.shift[c] = shift;
}

// A merge lane's chunk partials, k = first, first + kMergeLanes, ... below count: B partials are loaded (load(b, k)
// into slot b) before any is merged (merge(b, k), in k's order), so the same order as one at a time. One at a time,
// each merge waited for its own load: at a few hundred cycles a round trip to L2, 128 of them in a row per lane
// would account for most of stats_merge's 45 µs per 64-channel layer on the H200 (2026-11-27_H200_run4, 8 lanes
// then); an estimate, not a measurement.
template <int B, typename Load, typename Merge>
__device__ __forceinline__ void for_lane_chunks(long long first, long long count, Load load, Merge merge) {
  for (long long k0 = first; k0 < count; k0 += static_cast<long long>(kMergeLanes) * B) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const long long k = k0 + static_cast<long long>(b) * kMergeLanes;
      if (k < count) load(b, k);
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const long long k = k0 + static_cast<long long>(b) * kMergeLanes;
      if (k < count) merge(b, k);
    }
  }
}

// Chunk partials -> per-channel (mean, M2), and with f.invstd set (fp32 only) what follows them (finalize_channel).
// A block is 32 channels x kMergeLanes lanes; lane j merges chunks j, j+kMergeLanes, ... in order, then the lanes
// merge pairwise in a tree (lane j takes lane j + half, half = 1, 2, 4, ...): a fixed order for a given shape, and
// 5 dependent merges after the lanes' instead of 31 (each merge divides twice in fp64).
template <typename Acc>
__global__ void __launch_bounds__(kLanesC* kMergeLanes)
    stats_merge(const Acc* __restrict__ part_mean, const Acc* __restrict__ part_m2, long long rows, long long channels,
                Chunks chunks, Acc* __restrict__ mean_out, Acc* __restrict__ m2_out, BnFinalizeParams f) {
  static_assert((kMergeLanes & (kMergeLanes - 1)) == 0, "the lanes' tree pairs them off");
  __shared__ double s_n[kMergeLanes][kLanesC];
  __shared__ Acc s_mean[kMergeLanes][kLanesC], s_m2[kMergeLanes][kLanesC];
  const long long c = static_cast<long long>(blockIdx.x) * kLanesC + threadIdx.x;
  double n = 0;
  Acc mean = 0, m2 = 0;
  if (c < channels) {  // the other threads merge nothing (n = 0) but still reach the barriers
    Acc pm[kMergeBatch<Acc>], pv[kMergeBatch<Acc>];
    for_lane_chunks<kMergeBatch<Acc>>(
        threadIdx.y, chunks.count,
        [&](int b, long long k) {
          pm[b] = part_mean[k * channels + c];
          pv[b] = part_m2[k * channels + c];
        },
        [&](int b, long long k) {
          const long long first = k * chunks.rows;
          const double nb = static_cast<double>((first + chunks.rows < rows ? first + chunks.rows : rows) - first);
          chan_merge_counted(n, mean, m2, nb, pm[b], pv[b]);
        });
  }
  const int x = threadIdx.x, y = threadIdx.y;
  s_n[y][x] = n;
  s_mean[y][x] = mean;
  s_m2[y][x] = m2;
  for (int half = 1; half < kMergeLanes; half *= 2) {
    __syncthreads();
    if (y % (2 * half) != 0) continue;
    chan_merge_counted(n, mean, m2, s_n[y + half][x], s_mean[y + half][x], s_m2[y + half][x]);
    s_n[y][x] = n;
    s_mean[y][x] = mean;
    s_m2[y][x] = m2;
  }
  if (y != 0 || c >= channels) return;
  mean_out[c] = mean;
  m2_out[c] = m2;
  if constexpr (std::is_same_v<Acc, float>) {
    if (f.invstd != nullptr) finalize_channel(c, mean, m2, f);
  }
}

// ------------------------------------------------------------------------------------------------ elementwise
template <typename T>
__global__ void normalize_kernel(const T* __restrict__ y, const AccOf<T>* __restrict__ scale,
                                 const AccOf<T>* __restrict__ shift, const T* __restrict__ residual,
                                 const AccOf<T>* __restrict__ residual_scale, T* __restrict__ out, long long rows,
                                 long long channels, bool relu) {
  using Acc = AccOf<T>;
  const long long c = static_cast<long long>(blockIdx.y) * kLanesC + threadIdx.x;
  if (c >= channels) return;
  const Acc s = scale[c], t = shift[c], rs = residual_scale_of(residual_scale, c);
  const bool has_rs = residual_scale != nullptr;
  const long long step = static_cast<long long>(gridDim.x) * kLanesR;
  for (long long r = static_cast<long long>(blockIdx.x) * kLanesR + threadIdx.y; r < rows; r += step) {
    const long long i = r * channels + c;
    const Acc z = pre_activation<T>(AccMath<T>::load(y[i]), s, t, residual, i, has_rs, rs);
    out[i] = AccMath<T>::store(activation_of(z, relu));
  }
}

// g where forward's z > 0 (NaN z: 0), or g itself without ReLU.
template <typename T>
__device__ __forceinline__ AccOf<T> masked_grad_of(AccOf<T> g, AccOf<T> y, AccOf<T> s, AccOf<T> t, bool has_residual,
                                                   AccOf<T> r_value, bool relu, bool has_rs, AccOf<T> rs) {
  return relu && !(pre_activation_of<T>(y, s, t, has_residual, r_value, has_rs, rs) > AccOf<T>(0)) ? AccOf<T>(0) : g;
}

template <typename T>
__device__ __forceinline__ AccOf<T> masked_grad(AccOf<T> g, AccOf<T> y, AccOf<T> s, AccOf<T> t, const T* r,
                                                long long i, bool relu, bool has_rs, AccOf<T> rs) {
  return masked_grad_of<T>(g, y, s, t, r != nullptr, r != nullptr ? AccMath<T>::load(r[i]) : AccOf<T>(0), relu,
                           has_rs, rs);
}

template <typename T>
__global__ void grad_input_kernel(const T* __restrict__ g, const T* __restrict__ y, const AccOf<T>* __restrict__ scale,
                                  const AccOf<T>* __restrict__ shift, const T* __restrict__ residual,
                                  const AccOf<T>* __restrict__ residual_scale, const AccOf<T>* __restrict__ a,
                                  const AccOf<T>* __restrict__ b, const AccOf<T>* __restrict__ cc, T* __restrict__ dy,
                                  long long rows, long long channels, bool relu) {
  using Acc = AccOf<T>;
  const long long c = static_cast<long long>(blockIdx.y) * kLanesC + threadIdx.x;
  if (c >= channels) return;
  const Acc s = scale[c], t = shift[c], ac = a[c], bc = b[c], ccc = cc[c], rs = residual_scale_of(residual_scale, c);
  const bool has_rs = residual_scale != nullptr;
  const long long step = static_cast<long long>(gridDim.x) * kLanesR;
  for (long long r = static_cast<long long>(blockIdx.x) * kLanesR + threadIdx.y; r < rows; r += step) {
    const long long i = r * channels + c;
    const Acc yv = AccMath<T>::load(y[i]);
    const Acc gm = masked_grad<T>(AccMath<T>::load(g[i]), yv, s, t, residual, i, relu, has_rs, rs);
    dy[i] = AccMath<T>::store(AccMath<T>::fma(ac, gm, AccMath<T>::fma(bc, yv, ccc)));
  }
}

// ------------------------------------------------------------------------------------------------ 16-byte vectors
// The elementwise passes above move one value per thread per access: too few bytes in flight per SM to cover the
// memory latency, whatever the occupancy. Where the channels are a multiple of the vector width and the tensors
// 16-byte aligned, these twins move 16 bytes per access instead: a thread owns kWidth consecutive channels of
// every pixel it visits (a vector never straddles two pixels), with the same arithmetic per value, so their
// results are bit for bit the scalar kernels' (Vec: bn_math.cuh).

// scale and shift, which backward reads only to recompute the ReLU mask: without a ReLU they are not loaded.
template <int W, typename Acc>
__device__ __forceinline__ void load_mask_channels(bool relu, Acc (&s)[W], Acc (&t)[W], const Acc* __restrict__ scale,
                                                   const Acc* __restrict__ shift, long long c0) {
  if (relu) {
    load_channels(s, scale, c0);
    load_channels(t, shift, c0);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) s[j] = t[j] = Acc(0);
  }
}

// The residual's per-channel scale where `wanted` (a residual and a scale given), else 1s.
template <int W, typename Acc>
__device__ __forceinline__ void load_residual_scale(bool wanted, Acc (&rs)[W], const Acc* __restrict__ residual_scale,
                                                    long long c0) {
  if (wanted) {
    load_channels(rs, residual_scale, c0);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) rs[j] = Acc(1);
  }
}

// Block: kVecThreads threads, (channel vectors of a pixel) x (pixels); the first channel of this thread's vector.
constexpr int kVecThreads = 256;

__device__ __forceinline__ long long vec_first_channel(int width) {
  return (static_cast<long long>(blockIdx.y) * blockDim.x + threadIdx.x) * width;
}

// The 16-byte elementwise and backward-sum kernels take U rows per thread per round, all loaded before any is used:
// U independent 16-byte loads per tensor in flight per thread. One (U = 1) moved 2.0-2.8 TB/s of the H200's 4.8
// (grad_input, normalize: 2026-11-27_H200_run4's kernel times over the bytes of ResNet-50's BN tensors at b256,
// 5.7 GB per pass over them all), but more rows take more registers and so fewer threads per SM (bf16 normalize,
// ptxas: 39 registers at U = 1, 72 at 2, 124 at 4): which wins is for a GPU to say (benchmarks/bn_passes_bench.py
// times each U; set_bn_rows_per_thread chooses; 1 until measured).
//
// Rounds over the rows first, first + step, ... below end of this thread's channel vector, U rows a round (rows
// u·blockDim.y apart): load(u, i) for each row of the round (u: its slot, i: the flat index of its first channel),
// then apply(u, i) for each. The elementwise kernels stride over the grid, the reductions over their chunk.
template <int U, typename Load, typename Apply>
__device__ __forceinline__ void for_rows_vec(long long first, long long end, long long step, long long channels,
                                             long long c0, Load load, Apply apply) {
  const long long lanes = blockDim.y;
  for (long long r0 = first; r0 < end; r0 += step) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long r = r0 + u * lanes;
      if (r < end) load(u, r * channels + c0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long r = r0 + u * lanes;
      if (r < end) apply(u, r * channels + c0);
    }
  }
}

// The grid-stride form, for the elementwise kernels.
template <int U, typename Load, typename Apply>
__device__ __forceinline__ void for_each_row_vec(long long rows, long long channels, long long c0, Load load,
                                                 Apply apply) {
  const long long per_block = static_cast<long long>(blockDim.y) * U;
  for_rows_vec<U>(static_cast<long long>(blockIdx.x) * per_block + threadIdx.y, rows, gridDim.x * per_block,
                  channels, c0, load, apply);
}

// kScaled: the residual has a per-channel scale (a template argument, so that the common kernels keep their
// registers: the scale's W values would otherwise cost every launch 8 more in 16 bits, and occupancy with them).
template <typename T, int U, bool kScaled>
__global__ void normalize_vec_kernel(const T* __restrict__ y, const AccOf<T>* __restrict__ scale,
                                     const AccOf<T>* __restrict__ shift, const T* __restrict__ residual,
                                     const AccOf<T>* __restrict__ residual_scale, T* __restrict__ out, long long rows,
                                     long long channels, bool relu) {
  using Acc = AccOf<T>;
  constexpr int W = Vec<T>::kWidth;
  const long long c0 = vec_first_channel(W);
  if (c0 >= channels) return;
  Acc s[W], t[W], rs[W];
  load_channels(s, scale, c0);
  load_channels(t, shift, c0);
  const bool has_residual = residual != nullptr;
  const bool has_rs = kScaled && has_residual;
  if constexpr (kScaled) load_residual_scale(has_rs, rs, residual_scale, c0);
  Vec<T> yv[U], rv[U];
  for_each_row_vec<U>(
      rows, channels, c0,
      [&](int u, long long i) {
        yv[u] = load_vec(y + i);
        if (has_residual) rv[u] = load_vec(residual + i);
      },
      [&](int u, long long i) {
        Vec<T> o;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const Acc rj = has_residual ? AccMath<T>::load(rv[u].v[j]) : Acc(0);
          const Acc z = pre_activation_of<T>(AccMath<T>::load(yv[u].v[j]), s[j], t[j], has_residual, rj, has_rs, rs[j]);
          o.v[j] = AccMath<T>::store(activation_of(z, relu));
        }
        store_vec(out + i, o);
      });
}

// Backward's rows in the 16-byte kernels: U rows of g, y and the residual (where there is one) loaded before any
// is used, and the masked gradient g' of each of their values, with forward's mask (masked_grad_of).
template <typename T, int U, bool kScaled>
struct GradRows {
  using Acc = AccOf<T>;
  static constexpr int W = Vec<T>::kWidth;
  const T* __restrict__ g;
  const T* __restrict__ y;
  const T* __restrict__ residual;  // nullptr: none
  bool relu, has_rs;
  Acc s[W], t[W], rs[W];  // scale, shift and the residual's scale, for the mask (not loaded without a ReLU)
  Vec<T> gv[U], yv[U], rv[U];

  __device__ __forceinline__ GradRows(const T* g_, const T* y_, const T* residual_,
                                      const Acc* __restrict__ residual_scale, const Acc* __restrict__ scale,
                                      const Acc* __restrict__ shift, bool relu_, long long c0)
      : g(g_), y(y_), residual(residual_), relu(relu_), has_rs(kScaled && relu_ && residual_ != nullptr) {
    load_mask_channels(relu, s, t, scale, shift, c0);
    if constexpr (kScaled) load_residual_scale(has_rs, rs, residual_scale, c0);
  }

  __device__ __forceinline__ void load(int u, long long i) {
    gv[u] = load_vec(g + i);
    yv[u] = load_vec(y + i);
    if (residual != nullptr) rv[u] = load_vec(residual + i);
  }

  __device__ __forceinline__ Acc y_value(int u, int j) const { return AccMath<T>::load(yv[u].v[j]); }

  // g' of value j of row u, whose y value is yj.
  __device__ __forceinline__ Acc masked(int u, int j, Acc yj) const {
    const bool has_residual = residual != nullptr;
    const Acc rj = has_residual ? AccMath<T>::load(rv[u].v[j]) : Acc(0);
    return masked_grad_of<T>(AccMath<T>::load(gv[u].v[j]), yj, s[j], t[j], has_residual, rj, relu, has_rs, rs[j]);
  }
};

template <typename T, int U, bool kScaled>
__global__ void grad_input_vec_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                      const AccOf<T>* __restrict__ scale, const AccOf<T>* __restrict__ shift,
                                      const T* __restrict__ residual, const AccOf<T>* __restrict__ residual_scale,
                                      const AccOf<T>* __restrict__ a, const AccOf<T>* __restrict__ b,
                                      const AccOf<T>* __restrict__ cc, T* __restrict__ dy, long long rows,
                                      long long channels, bool relu) {
  using Acc = AccOf<T>;
  constexpr int W = Vec<T>::kWidth;
  const long long c0 = vec_first_channel(W);
  if (c0 >= channels) return;
  GradRows<T, U, kScaled> in(g, y, residual, residual_scale, scale, shift, relu, c0);
  Acc ac[W], bc[W], ccc[W];
  load_channels(ac, a, c0);
  load_channels(bc, b, c0);
  load_channels(ccc, cc, c0);
  for_each_row_vec<U>(
      rows, channels, c0, [&](int u, long long i) { in.load(u, i); },
      [&](int u, long long i) {
        Vec<T> o;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const Acc yj = in.y_value(u, j);
          o.v[j] = AccMath<T>::store(AccMath<T>::fma(ac[j], in.masked(u, j, yj), AccMath<T>::fma(bc[j], yj, ccc[j])));
        }
        store_vec(dy + i, o);
      });
}

// The reductions' twins: a thread owns a vector of channels and reduces its pixels of a chunk; the block's pixel
// lanes are then merged and one partial per (chunk, channel) is written, for the same merge kernels. Per shape the
// result is as deterministic as the scalar kernels', though not bit for bit theirs (another summation order).
//
// Statistics: batches of kBatch vectors in flight, each reduced two-pass and merged into the thread's running
// (n, mean, M2) by Chan's formula. The count is the same for every channel of the thread, so the batch mean's and
// the merge's divisions are made once per batch for all of its channels, not twice per channel. The lanes then
// merge pairwise in a tree (log2 steps, all lanes at work) instead of one lane merging the others in turn, a chain
// of dependent merges with a division each. The pass moved 1.1 TB/s of the H200's 4.8 before these changes
// (2026-11-27_H200_run4's time over 5.7 GB); whether they were what held it back is for a GPU run to show.
template <typename T>
__global__ void stats_partials_vec(const T* __restrict__ y, long long rows, long long channels, long long chunk_rows,
                                   AccOf<T>* __restrict__ part_mean, AccOf<T>* __restrict__ part_m2) {
  using Acc = AccOf<T>;
  constexpr int W = Vec<T>::kWidth;
  __shared__ Acc s_n[kVecThreads], s_mean[kVecThreads][W], s_m2[kVecThreads][W];
  const long long c0 = vec_first_channel(W);
  const bool active = c0 < channels;  // inactive threads still reach the barriers
  const long long begin = static_cast<long long>(blockIdx.x) * chunk_rows;
  const long long end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  Acc n = 0, mean[W], m2[W];
#pragma unroll
  for (int ch = 0; ch < W; ++ch) mean[ch] = m2[ch] = Acc(0);
  if (active) {
    for (long long r0 = begin + threadIdx.y; r0 < end; r0 += static_cast<long long>(blockDim.y) * kBatch) {
      Vec<T> v[kBatch];
      int k = 0;  // rows grow with j: the valid loads are j < k
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const long long r = r0 + static_cast<long long>(j) * blockDim.y;
        if (r < end) {
          v[j] = load_vec(y + r * channels + c0);
          ++k;
        }
      }
      const Acc inv_k = Acc(1) / Acc(k);
      const Acc total = n + Acc(k);
      const Acc weight = Acc(k) / total;  // the batch's share of the merged mean
      const Acc cross = n * weight;       // n·k/(n + k), the δ² term's factor
#pragma unroll
      for (int ch = 0; ch < W; ++ch) {
        Acc sum = 0;
#pragma unroll
        for (int j = 0; j < kBatch; ++j) sum += j < k ? AccMath<T>::load(v[j].v[ch]) : Acc(0);
        const Acc mb = sum * inv_k;
        Acc m2b = 0;
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const Acc d = j < k ? AccMath<T>::load(v[j].v[ch]) - mb : Acc(0);
          m2b += d * d;
        }
        const Acc delta = mb - mean[ch];
        mean[ch] += delta * weight;
        m2[ch] += m2b + delta * delta * cross;
      }
      n = total;
    }
  }
  const int lane = threadIdx.y * blockDim.x + threadIdx.x;
  s_n[lane] = n;
#pragma unroll
  for (int ch = 0; ch < W; ++ch) {
    s_mean[lane][ch] = mean[ch];
    s_m2[lane][ch] = m2[ch];
  }
  // Step `half`: every lane that is a multiple of 2·half merges the lane `half` above it (which holds the merge of
  // its own subtree), in a fixed order for a given block shape.
  for (unsigned half = 1; half < blockDim.y; half *= 2) {
    __syncthreads();
    if (!active || threadIdx.y % (2 * half) != 0 || threadIdx.y + half >= blockDim.y) continue;
    const int other = lane + static_cast<int>(half * blockDim.x);
    const Acc nb = s_n[other];
    if (nb == Acc(0)) continue;
    const Acc total = n + nb;
    const Acc weight = nb / total;
    const Acc cross = n * weight;
#pragma unroll
    for (int ch = 0; ch < W; ++ch) {
      const Acc delta = s_mean[other][ch] - mean[ch];
      mean[ch] += delta * weight;
      m2[ch] += s_m2[other][ch] + delta * delta * cross;
      s_mean[lane][ch] = mean[ch];
      s_m2[lane][ch] = m2[ch];
    }
    n = total;
    s_n[lane] = n;
  }
  if (threadIdx.y != 0 || !active) return;
#pragma unroll
  for (int ch = 0; ch < W; ++ch) {
    part_mean[blockIdx.x * channels + c0 + ch] = mean[ch];
    part_m2[blockIdx.x * channels + c0 + ch] = m2[ch];
  }
}

// Backward sums: U rows loaded per round before any is used, as the elementwise kernels do.
template <typename T, int U, bool kScaled>
__global__ void grad_sums_partials_vec(const T* __restrict__ g, const T* __restrict__ y,
                                       const AccOf<T>* __restrict__ scale, const AccOf<T>* __restrict__ shift,
                                       const T* __restrict__ residual, const AccOf<T>* __restrict__ residual_scale,
                                       const AccOf<T>* __restrict__ mean, bool relu, T* __restrict__ masked,
                                       long long rows, long long channels, long long chunk_rows,
                                       AccOf<T>* __restrict__ part_g, AccOf<T>* __restrict__ part_gy) {
  using Acc = AccOf<T>;
  constexpr int W = Vec<T>::kWidth;
  __shared__ Acc s_g[kVecThreads][W], s_gy[kVecThreads][W];
  const long long c0 = vec_first_channel(W);
  const bool active = c0 < channels;  // inactive threads still reach the barrier
  const long long begin = static_cast<long long>(blockIdx.x) * chunk_rows;
  const long long end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  Acc sum_g[W], sum_gy[W];
#pragma unroll
  for (int ch = 0; ch < W; ++ch) sum_g[ch] = sum_gy[ch] = Acc(0);
  if (active) {
    GradRows<T, U, kScaled> in(g, y, residual, residual_scale, scale, shift, relu, c0);
    Acc mu[W];
    load_channels(mu, mean, c0);
    for_rows_vec<U>(
        begin + threadIdx.y, end, static_cast<long long>(blockDim.y) * U, channels, c0,
        [&](int u, long long i) { in.load(u, i); },
        [&](int u, long long i) {
          Vec<T> o;
#pragma unroll
          for (int ch = 0; ch < W; ++ch) {
            const Acc yj = in.y_value(u, ch);
            const Acc gm = in.masked(u, ch, yj);
            o.v[ch] = AccMath<T>::store(gm);
            sum_g[ch] += gm;
            sum_gy[ch] += gm * (yj - mu[ch]);
          }
          if (masked != nullptr) store_vec(masked + i, o);
        });
  }
  const int lane = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int ch = 0; ch < W; ++ch) {
    s_g[lane][ch] = sum_g[ch];
    s_gy[lane][ch] = sum_gy[ch];
  }
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  for (unsigned j = 1; j < blockDim.y; ++j) {
    const int other = j * blockDim.x + threadIdx.x;
#pragma unroll
    for (int ch = 0; ch < W; ++ch) {
      sum_g[ch] += s_g[other][ch];
      sum_gy[ch] += s_gy[other][ch];
    }
  }
#pragma unroll
  for (int ch = 0; ch < W; ++ch) {
    part_g[blockIdx.x * channels + c0 + ch] = sum_g[ch];
    part_gy[blockIdx.x * channels + c0 + ch] = sum_gy[ch];
  }
}

// ------------------------------------------------------------------------------------------------ backward sums
template <typename T>
__global__ void grad_sums_partials(const T* __restrict__ g, const T* __restrict__ y, const AccOf<T>* __restrict__ scale,
                                   const AccOf<T>* __restrict__ shift, const T* __restrict__ residual,
                                   const AccOf<T>* __restrict__ residual_scale, const AccOf<T>* __restrict__ mean,
                                   bool relu, T* __restrict__ masked, long long rows, long long channels,
                                   long long chunk_rows, AccOf<T>* __restrict__ part_g,
                                   AccOf<T>* __restrict__ part_gy) {
  using Acc = AccOf<T>;
  __shared__ Acc s_g[kLanesR][kLanesC], s_gy[kLanesR][kLanesC];
  const long long c = static_cast<long long>(blockIdx.y) * kLanesC + threadIdx.x;
  const long long begin = static_cast<long long>(blockIdx.x) * chunk_rows;
  const long long end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  Acc sum_g = 0, sum_gy = 0;
  if (c < channels) {
    const Acc s = scale[c], t = shift[c], mu = mean[c], rs = residual_scale_of(residual_scale, c);
    const bool has_rs = residual_scale != nullptr;
    for (long long r = begin + threadIdx.y; r < end; r += kLanesR) {
      const long long i = r * channels + c;
      const Acc yv = AccMath<T>::load(y[i]);
      const Acc gm = masked_grad<T>(AccMath<T>::load(g[i]), yv, s, t, residual, i, relu, has_rs, rs);
      if (masked != nullptr) masked[i] = AccMath<T>::store(gm);
      sum_g += gm;
      sum_gy += gm * (yv - mu);
    }
  }
  s_g[threadIdx.y][threadIdx.x] = sum_g;
  s_gy[threadIdx.y][threadIdx.x] = sum_gy;
  __syncthreads();
  if (threadIdx.y != 0 || c >= channels) return;
  for (int j = 1; j < kLanesR; ++j) {
    sum_g += s_g[j][threadIdx.x];
    sum_gy += s_gy[j][threadIdx.x];
  }
  part_g[blockIdx.x * channels + c] = sum_g;
  part_gy[blockIdx.x * channels + c] = sum_gy;
}

// launch.h's BnCoefficientParams for channel c, from its merged sums. IEEE division (nvcc's default without
// --use_fast_math), as channel_math's div_rn.
__device__ __forceinline__ void coefficients_channel(long long c, float sum_g, float sum_gy,
                                                     const BnCoefficientParams& coef) {
  const float invstd = coef.invstd[c], a = coef.a[c];
  const float k = invstd * invstd * sum_gy / coef.count;
  coef.grad_gamma[c] = sum_gy * invstd;
  coef.b[c] = -a * k;
  coef.c[c] = a * (k * coef.mean[c] - sum_g / coef.count);
}

// Chunk partials -> per-channel sums: each lane sums its chunks in order (as stats_merge's lanes), then lane 0 adds
// the lanes' sums in order (additions: no long dependent chain to shorten). With coef.b set (fp32 only), what
// follows them (coefficients_channel).
template <typename Acc>
__global__ void __launch_bounds__(kLanesC* kMergeLanes)
    sums_merge(const Acc* __restrict__ part0, const Acc* __restrict__ part1, long long chunks, long long channels,
               Acc* __restrict__ out0, Acc* __restrict__ out1, BnCoefficientParams coef) {
  __shared__ Acc s0[kMergeLanes][kLanesC], s1[kMergeLanes][kLanesC];
  const long long c = static_cast<long long>(blockIdx.x) * kLanesC + threadIdx.x;
  Acc sum0 = 0, sum1 = 0;
  if (c < channels) {
    Acc p0[kMergeBatch<Acc>], p1[kMergeBatch<Acc>];
    for_lane_chunks<kMergeBatch<Acc>>(
        threadIdx.y, chunks,
        [&](int b, long long k) {
          p0[b] = part0[k * channels + c];
          p1[b] = part1[k * channels + c];
        },
        [&](int b, long long) {
          sum0 += p0[b];
          sum1 += p1[b];
        });
  }
  s0[threadIdx.y][threadIdx.x] = sum0;
  s1[threadIdx.y][threadIdx.x] = sum1;
  __syncthreads();
  if (threadIdx.y != 0 || c >= channels) return;
  for (int j = 1; j < kMergeLanes; ++j) {
    sum0 += s0[j][threadIdx.x];
    sum1 += s1[j][threadIdx.x];
  }
  out0[c] = sum0;
  out1[c] = sum1;
  if constexpr (std::is_same_v<Acc, float>) {
    if (coef.b != nullptr) coefficients_channel(c, sum0, sum1, coef);
  }
}

// ------------------------------------------------------------------------------------------------ launchers
unsigned merge_blocks(long long channels) {
  return static_cast<unsigned>((channels + kLanesC - 1) / kLanesC);
}

long long elementwise_blocks(long long rows) {
  return std::min(kMaxElementwiseBlocks, std::max(1LL, (rows + kLanesR - 1) / kLanesR));
}

// Whether the 16-byte kernels can take a pass: channels a multiple of the vector width, every tensor aligned (the
// per-channel vectors too: load_channels reads them 16 bytes at a time).
template <typename T>
bool vectorizable(long long channels, std::initializer_list<const void*> tensors) {
  if (channels % Vec<T>::kWidth != 0) return false;
  for (const void* t : tensors) {
    if (t != nullptr && reinterpret_cast<uintptr_t>(t) % 16 != 0) return false;
  }
  return true;
}

// The 16-byte elementwise grid: a quarter of the blocks that one round over the rows would take, so that a thread
// loads its channel vectors (normalize 2, grad_input 5) once for 4 rounds instead of for each one or two pixels, but
// at least kMinElementwiseBlocks blocks in all where the rows allow (an H100 or H200 holds 132 SMs x 2,048 threads:
// 2,048 blocks of 256 fill it at least twice), at most kMaxElementwiseBlocks. Bytes in flight per SM stay as they were (as many threads resident, U rows each).
constexpr long long kRoundsPerThread = 4;
constexpr long long kMinElementwiseBlocks = 2048;

long long ceil_div(long long a, long long b) {
  return (a + b - 1) / b;
}

// Threads over a pixel's channel vectors (all of them, up to 32) x pixels, kVecThreads per block; grid.x covers
// the rows, rows_per_thread each per round (elementwise: grid-stride), or is one block per chunk (rows_are_blocks:
// `rows` is the chunk count).
template <typename T>
std::pair<dim3, dim3> vec_launch_shape(long long rows, long long channels, bool rows_are_blocks = false,
                                       int rows_per_thread = 1) {
  const long long vectors = channels / Vec<T>::kWidth;
  const int x = static_cast<int>(std::min<long long>(vectors, 32));
  const int y = kVecThreads / x;
  const long long blocks_y = ceil_div(vectors, x);
  long long blocks_x = rows;
  if (!rows_are_blocks) {
    const long long one_round = std::max(1LL, ceil_div(rows, static_cast<long long>(y) * rows_per_thread));
    const long long spread = std::max(ceil_div(one_round, kRoundsPerThread), ceil_div(kMinElementwiseBlocks, blocks_y));
    blocks_x = std::min({one_round, spread, kMaxElementwiseBlocks});
  }
  return {dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y)), dim3(x, y)};
}

std::atomic<int> rows_per_thread{1};

// f(std::integral_constant<int, U>) for the U that set_bn_rows_per_thread chose; U = 1 for fp32 and fp64, which
// train under autocast in 16 bits and would only add instantiations (and build time) here.
template <typename T, typename F>
cudaError_t with_rows_per_thread(F&& f) {
  if constexpr (sizeof(T) > 2) {
    return f(std::integral_constant<int, 1>{});
  } else {
    switch (rows_per_thread.load(std::memory_order_relaxed)) {
      case 2:
        return f(std::integral_constant<int, 2>{});
      case 4:
        return f(std::integral_constant<int, 4>{});
      default:
        return f(std::integral_constant<int, 1>{});
    }
  }
}

// Whether a pass's residual has a per-channel scale: its 16-byte kernels then are the kScaled ones, of one row per
// thread (the only ones built: projection block ends are 4 of ResNet-50's 53 units).
bool scaled_residual(const BnPassParams& p) {
  return p.residual != nullptr && p.residual_scale != nullptr;
}

using One = std::integral_constant<int, 1>;

// An elementwise pass: its 16-byte kernel (vec_kernel_at(integral_constant U, bool_constant kScaled): the one of U
// rows per thread) where `vectorized`, else its scalar kernel, with the same arguments.
template <typename T, typename VecKernelAt, typename Kernel, typename Args>
cudaError_t launch_elementwise(const BnPassParams& p, bool vectorized, VecKernelAt vec_kernel_at, Kernel scalar,
                               const Args& args, cudaStream_t stream) {
  if (vectorized && scaled_residual(p)) {
    const auto [grid, block] = vec_launch_shape<T>(p.rows, p.channels, false, 1);
    return launch_with(vec_kernel_at(One{}, std::true_type{}), grid, block, stream, args);
  }
  if (vectorized) {
    return with_rows_per_thread<T>([&](auto u) {
      const auto [grid, block] = vec_launch_shape<T>(p.rows, p.channels, false, decltype(u)::value);
      return launch_with(vec_kernel_at(u, std::false_type{}), grid, block, stream, args);
    });
  }
  return launch_with(scalar, channel_grid(elementwise_blocks(p.rows), p.channels), dim3(kLanesC, kLanesR), stream,
                     args);
}

template <typename T>
struct Stats {
  static cudaError_t run(const BnPassParams& p, cudaStream_t stream, const BnFinalizeParams& f = {}) {
    using Acc = AccOf<T>;
    const Chunks chunks = chunks_for(p.rows);
    Acc* part_mean = static_cast<Acc*>(p.workspace);
    Acc* part_m2 = part_mean + chunks.count * p.channels;
    const T* y = static_cast<const T*>(p.y);
    cudaError_t err;
    if (vectorizable<T>(p.channels, {p.y})) {
      const auto [grid, block] = vec_launch_shape<T>(chunks.count, p.channels, /*rows_are_blocks=*/true);
      err = launch_kernel(stats_partials_vec<T>, grid, block, stream, y, p.rows, p.channels, chunks.rows, part_mean,
                          part_m2);
    } else {
      err = launch_kernel(stats_partials<T>, channel_grid(chunks.count, p.channels), dim3(kLanesC, kLanesR), stream, y,
                          p.rows, p.channels, chunks.rows, part_mean, part_m2);
    }
    if (err != cudaSuccess) return err;
    return launch_kernel(stats_merge<Acc>, dim3(merge_blocks(p.channels)), dim3(kLanesC, kMergeLanes), stream,
                         part_mean, part_m2, p.rows, p.channels, chunks, static_cast<Acc*>(p.sum0),
                         static_cast<Acc*>(p.sum1), f);
  }
};

template <typename T>
struct Normalize {
  static cudaError_t run(const BnPassParams& p, cudaStream_t stream) {
    using Acc = AccOf<T>;
    const auto args = std::make_tuple(static_cast<const T*>(p.y), static_cast<const Acc*>(p.scale),
                                      static_cast<const Acc*>(p.shift), static_cast<const T*>(p.residual),
                                      static_cast<const Acc*>(p.residual_scale), static_cast<T*>(p.out), p.rows,
                                      p.channels, p.relu);
    return launch_elementwise<T>(
        p, vectorizable<T>(p.channels, {p.y, p.residual, p.residual_scale, p.out, p.scale, p.shift}),
        [](auto u, auto scaled) { return normalize_vec_kernel<T, decltype(u)::value, decltype(scaled)::value>; },
        normalize_kernel<T>, args, stream);
  }
};

template <typename T>
struct GradSums {
  static cudaError_t run(const BnPassParams& p, cudaStream_t stream, const BnCoefficientParams& coef = {}) {
    using Acc = AccOf<T>;
    const Chunks chunks = chunks_for(p.rows);
    Acc* part_g = static_cast<Acc*>(p.workspace);
    Acc* part_gy = part_g + chunks.count * p.channels;
    const auto args = std::make_tuple(
        static_cast<const T*>(p.g), static_cast<const T*>(p.y), static_cast<const Acc*>(p.scale),
        static_cast<const Acc*>(p.shift), static_cast<const T*>(p.residual), static_cast<const Acc*>(p.residual_scale),
        static_cast<const Acc*>(p.mean), p.relu, static_cast<T*>(p.out), p.rows, p.channels, chunks.rows, part_g,
        part_gy);
    cudaError_t err;
    if (vectorizable<T>(p.channels, {p.g, p.y, p.residual, p.residual_scale, p.out, p.scale, p.shift, p.mean})) {
      const auto shape = vec_launch_shape<T>(chunks.count, p.channels, /*rows_are_blocks=*/true);
      if (scaled_residual(p)) {
        err = launch_with(grad_sums_partials_vec<T, 1, true>, shape.first, shape.second, stream, args);
      } else {
        err = with_rows_per_thread<T>([&](auto u) {
          return launch_with(grad_sums_partials_vec<T, decltype(u)::value, false>, shape.first, shape.second, stream,
                             args);
        });
      }
    } else {
      err = launch_with(grad_sums_partials<T>, channel_grid(chunks.count, p.channels), dim3(kLanesC, kLanesR), stream,
                        args);
    }
    if (err != cudaSuccess) return err;
    return launch_kernel(sums_merge<Acc>, dim3(merge_blocks(p.channels)), dim3(kLanesC, kMergeLanes), stream, part_g,
                         part_gy, chunks.count, p.channels, static_cast<Acc*>(p.sum0), static_cast<Acc*>(p.sum1), coef);
  }
};

template <typename T>
struct GradInput {
  static cudaError_t run(const BnPassParams& p, cudaStream_t stream) {
    using Acc = AccOf<T>;
    const auto args = std::make_tuple(
        static_cast<const T*>(p.g), static_cast<const T*>(p.y), static_cast<const Acc*>(p.scale),
        static_cast<const Acc*>(p.shift), static_cast<const T*>(p.residual), static_cast<const Acc*>(p.residual_scale),
        static_cast<const Acc*>(p.a), static_cast<const Acc*>(p.b), static_cast<const Acc*>(p.c),
        static_cast<T*>(p.out), p.rows, p.channels, p.relu);
    return launch_elementwise<T>(
        p, vectorizable<T>(p.channels, {p.g, p.y, p.residual, p.residual_scale, p.out, p.scale, p.shift, p.a, p.b,
                                        p.c}),
        [](auto u, auto scaled) { return grad_input_vec_kernel<T, decltype(u)::value, decltype(scaled)::value>; },
        grad_input_kernel<T>, args, stream);
  }
};

// Runs Pass<T>::run(p, stream, epilogue...) for p.dtype; nothing to do for an empty tensor. With an epilogue (a
// merge kernel that goes on to what follows its sums, in fp32) 16- and 32-bit only: fp64 sums are finished in fp64
// by the caller, who also refuses counts under 2 before this.
template <template <typename> class Pass, typename... Epilogue>
cudaError_t dispatch(const BnPassParams& p, cudaStream_t stream, const Epilogue&... epilogue) {
  if (p.rows == 0 || p.channels == 0) return cudaSuccess;
  if (p.channels > kLanesC * 65535LL) return cudaErrorInvalidValue;  // grid.y limit
  return with_element_type<sizeof...(Epilogue) == 0>(
      p.dtype, [&](auto type) { return Pass<typename decltype(type)::T>::run(p, stream, epilogue...); });
}

}  // namespace

bool set_bn_rows_per_thread(int rows) {
  if (rows != 1 && rows != 2 && rows != 4) return false;
  rows_per_thread.store(rows, std::memory_order_relaxed);
  return true;
}

int bn_rows_per_thread() { return rows_per_thread.load(std::memory_order_relaxed); }

int64_t bn_workspace_elements(int64_t rows, int64_t channels) {
  return rows == 0 ? 0 : 2 * chunks_for(rows).count * channels;
}

cudaError_t launch_bn_stats(const BnPassParams& p, cudaStream_t stream) {
  return dispatch<Stats>(p, stream);
}

cudaError_t launch_bn_stats_finalize(const BnPassParams& p, const BnFinalizeParams& f, cudaStream_t stream) {
  if (f.invstd == nullptr || f.scale == nullptr || f.shift == nullptr ||
      (f.running_mean == nullptr) != (f.running_var == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch<Stats>(p, stream, f);
}

cudaError_t launch_bn_normalize(const BnPassParams& p, cudaStream_t stream) {
  return dispatch<Normalize>(p, stream);
}

cudaError_t launch_bn_grad_sums(const BnPassParams& p, cudaStream_t stream) {
  return dispatch<GradSums>(p, stream);
}

cudaError_t launch_bn_grad_sums_coefficients(const BnPassParams& p, const BnCoefficientParams& coef,
                                             cudaStream_t stream) {
  if (coef.a == nullptr || coef.invstd == nullptr || coef.mean == nullptr || coef.grad_gamma == nullptr ||
      coef.b == nullptr || coef.c == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch<GradSums>(p, stream, coef);
}

cudaError_t launch_bn_grad_input(const BnPassParams& p, cudaStream_t stream) {
  return dispatch<GradInput>(p, stream);
}

}  // namespace fused_resnet::cuda
