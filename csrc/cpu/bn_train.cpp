// The training path's passes over a conv output y on CPU (fused_resnet/training/passes.py names them "cpp"):
//   bn_stats(y)                                   per-channel (mean, M2): two-pass per chunk, chunks merged by Chan
//   bn_normalize(y, scale, shift, r?, relu, rs?)  act(y*scale + shift [+ r*rs])
//   bn_grad_sums(g, y, scale, shift, r?, mean, relu, store_masked, rs?)
//                                                 (sum g', sum g'*(y - mean), g' or empty), g' = g*[z > 0]
//   bn_grad_input(g, y, scale, shift, r?, a, b, c, relu, rs?)   a*g' + b*y + c
// with z = y*scale + shift [+ r, or + r*rs with a residual scale rs] computed by one helper (fused multiply-adds) in
// every pass, so backward's mask is forward's bit for bit. Tensors are NHWC (C innermost); each pass is one
// at::parallel_for over pixels, vectorized over channels, in fp32 (fp64 for fp64). Chunks are reduced in a fixed
// order: results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace fused_resnet::cpu {
namespace {

using at::vec::Vectorized;
constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// Pixels per chunk: about 16K values, so a chunk's second pass reads it from cache.
int64_t chunk_rows(int64_t channels) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, channels));
}

at::Tensor nhwc(const at::Tensor& t) {
  return t.contiguous(kChannelsLast);
}

// One pixel's values of channels [c, c + V) as opmath vectors (two for reduced precision, whose vectors hold twice
// as many values), and back.
template <typename scalar_t>
struct Lanes {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<scalar_t>;
  using FVec = Vectorized<opmath_t>;
  static constexpr bool kWide = !std::is_same_v<scalar_t, opmath_t>;
  static constexpr int64_t kParts = kWide ? 2 : 1;
  static constexpr int64_t kSize = Vec::size();

  static void load(const scalar_t* p, FVec (&out)[kParts]) {
    if constexpr (kWide) {
      std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(Vec::loadu(p));
    } else {
      out[0] = Vec::loadu(p);
    }
  }
  static void store(scalar_t* p, const FVec (&v)[kParts]) {
    if constexpr (kWide) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
};

// z = y*scale + shift [+ r [*rs]] for channels [c, c + kSize) of one pixel: the one definition of the
// pre-activation (rs, the residual's per-channel scale, nullptr: none).
template <typename scalar_t>
void pre_activation(const scalar_t* y, const at::opmath_type<scalar_t>* s, const at::opmath_type<scalar_t>* t,
                    const scalar_t* r, const at::opmath_type<scalar_t>* rs, int64_t c,
                    typename Lanes<scalar_t>::FVec (&z)[Lanes<scalar_t>::kParts],
                    typename Lanes<scalar_t>::FVec (&yv)[Lanes<scalar_t>::kParts]) {
  using L = Lanes<scalar_t>;
  using FVec = typename L::FVec;
  L::load(y + c, yv);
  for (int64_t p = 0; p < L::kParts; ++p) {
    const int64_t o = c + p * FVec::size();
    z[p] = at::vec::fmadd(yv[p], FVec::loadu(s + o), FVec::loadu(t + o));
  }
  if (r != nullptr) {
    FVec rv[L::kParts];
    L::load(r + c, rv);
    for (int64_t p = 0; p < L::kParts; ++p) {
      z[p] = rs == nullptr ? z[p] + rv[p] : at::vec::fmadd(rv[p], FVec::loadu(rs + c + p * FVec::size()), z[p]);
    }
  }
}

template <typename opmath_t, typename scalar_t>
opmath_t pre_activation_scalar(const scalar_t* y, const opmath_t* s, const opmath_t* t, const scalar_t* r,
                               const opmath_t* rs, int64_t c) {
  opmath_t z = std::fma(static_cast<opmath_t>(y[c]), s[c], t[c]);
  if (r == nullptr) return z;
  return rs == nullptr ? z + static_cast<opmath_t>(r[c]) : std::fma(static_cast<opmath_t>(r[c]), rs[c], z);
}

template <typename T>
T masked(T g, T z, bool relu) {
  return (relu && !(z > T(0))) ? T(0) : g;
}

// g where z > 0, else 0 (NaN z too). A plain loop over the lanes: the extension is built for the baseline ISA,
// where Vectorized's compare + blendv are element-by-element calls, while this loop compiles to SIMD selects.
template <typename FVec>
FVec relu_mask(const FVec& g, const FVec& z) {
  using T = typename FVec::value_type;
  __at_align__ T gs[FVec::size()];
  __at_align__ T zs[FVec::size()];
  g.store(gs);
  z.store(zs);
  for (int64_t k = 0; k < FVec::size(); ++k) gs[k] = zs[k] > T(0) ? gs[k] : T(0);
  return FVec::loadu(gs);
}

// g' (g masked by forward's ReLU, or g itself) and y as opmath lanes, for channels [c, c + kSize) of one pixel.
template <typename scalar_t>
void masked_grad(const scalar_t* yr, const scalar_t* gr, const scalar_t* rr, const at::opmath_type<scalar_t>* rs,
                 const at::opmath_type<scalar_t>* s, const at::opmath_type<scalar_t>* t, int64_t c, bool relu,
                 typename Lanes<scalar_t>::FVec (&gv)[Lanes<scalar_t>::kParts],
                 typename Lanes<scalar_t>::FVec (&yv)[Lanes<scalar_t>::kParts]) {
  using L = Lanes<scalar_t>;
  typename L::FVec z[L::kParts];
  pre_activation<scalar_t>(yr, s, t, rr, rs, c, z, yv);
  L::load(gr + c, gv);
  if (relu) {
    for (int64_t p = 0; p < L::kParts; ++p) gv[p] = relu_mask(gv[p], z[p]);
  }
}

template <typename opmath_t, typename scalar_t>
opmath_t masked_grad_scalar(const scalar_t* yr, const scalar_t* gr, const scalar_t* rr, const opmath_t* rs,
                            const opmath_t* s, const opmath_t* t, int64_t c, bool relu) {
  return masked(static_cast<opmath_t>(gr[c]), pre_activation_scalar(yr, s, t, rr, rs, c), relu);
}

// -------------------------------------------------------------------------------- float32 rows, two ISAs
// The extension is built for the baseline ISA, where ATen's Vectorized<float> is a plain array; float32, the
// common case, gets plain loops compiled twice instead, for x86-64-v3 (AVX2 + FMA) and the baseline, the
// loader picking one per machine (GCC function multi-versioning). Every pass computes z with one correctly
// rounded fma, so forward's output and backward's mask agree bit for bit whichever clone runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSED_RESNET_ISA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FUSED_RESNET_ISA_CLONES
#endif

// Rows of C channels never overlap one another (outputs are fresh tensors or per-chunk partials): __restrict
// lets the compiler vectorize the read-modify-write accumulators.
FUSED_RESNET_ISA_CLONES
void sum_row_f32(const float* __restrict y, float* __restrict sum, int64_t C) {
  for (int64_t c = 0; c < C; ++c) sum[c] += y[c];
}

FUSED_RESNET_ISA_CLONES
void squared_deviation_row_f32(const float* __restrict y, const float* __restrict mean, float* __restrict m2,
                               int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float d = y[c] - mean[c];
    m2[c] = std::fma(d, d, m2[c]);
  }
}

// kScaled: the residual has a per-channel scale rs (a template argument: as a run-time test in the loop it kept GCC
// from vectorizing grad_input_row_f32 at all, checked in the object code).
template <bool kScaled>
inline float pre_activation_f32(const float* __restrict y, const float* __restrict s, const float* __restrict t,
                                const float* __restrict r, const float* __restrict rs, int64_t c) {
  const float z = std::fma(y[c], s[c], t[c]);
  if (r == nullptr) return z;
  if constexpr (kScaled) {
    return std::fma(r[c], rs[c], z);
  } else {
    return z + r[c];
  }
}

template <bool kScaled>
FUSED_RESNET_ISA_CLONES void normalize_row_f32(const float* __restrict y, const float* __restrict s, const float* __restrict t,
                       const float* __restrict r, const float* __restrict rs, float* __restrict o, int64_t C,
                       bool relu) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = pre_activation_f32<kScaled>(y, s, t, r, rs, c);
    o[c] = relu && z < 0.f ? 0.f : z;  // keeps NaN, as torch.relu does
  }
}

template <bool kScaled>
inline float masked_f32(const float* __restrict g, const float* __restrict y, const float* __restrict s,
                        const float* __restrict t, const float* __restrict r, const float* __restrict rs, int64_t c,
                        bool relu) {
  return relu && !(pre_activation_f32<kScaled>(y, s, t, r, rs, c) > 0.f) ? 0.f : g[c];
}

template <bool kScaled>
FUSED_RESNET_ISA_CLONES void grad_sums_row_f32(const float* __restrict g, const float* __restrict y, const float* __restrict s,
                       const float* __restrict t, const float* __restrict r, const float* __restrict rs,
                       const float* __restrict mean, float* __restrict sum_g, float* __restrict sum_gy,
                       float* __restrict masked_out, int64_t C, bool relu) {
  for (int64_t c = 0; c < C; ++c) {
    const float gm = masked_f32<kScaled>(g, y, s, t, r, rs, c, relu);
    sum_g[c] += gm;
    sum_gy[c] = std::fma(gm, y[c] - mean[c], sum_gy[c]);
  }
  if (masked_out != nullptr) {
    for (int64_t c = 0; c < C; ++c) masked_out[c] = masked_f32<kScaled>(g, y, s, t, r, rs, c, relu);
  }
}

template <bool kScaled>
FUSED_RESNET_ISA_CLONES void grad_input_row_f32(const float* __restrict g, const float* __restrict y, const float* __restrict s,
                        const float* __restrict t, const float* __restrict r, const float* __restrict rs,
                        const float* __restrict a, const float* __restrict b, const float* __restrict k,
                        float* __restrict dy, int64_t C, bool relu) {
  for (int64_t c = 0; c < C; ++c) {
    dy[c] = std::fma(a[c], masked_f32<kScaled>(g, y, s, t, r, rs, c, relu), std::fma(b[c], y[c], k[c]));
  }
}

template <typename scalar_t>
constexpr bool kFloat32 = std::is_same_v<scalar_t, float>;

// -------------------------------------------------------------------------------- statistics
template <typename scalar_t>
void stats_kernel(const at::Tensor& y, const at::Tensor& mean_out, const at::Tensor& m2_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using L = Lanes<scalar_t>;
  using FVec = typename L::FVec;
  const int64_t C = y.size(1);
  const int64_t M = y.numel() / C;
  const int64_t rows = chunk_rows(C);
  const int64_t chunks = (M + rows - 1) / rows;
  std::vector<opmath_t> part_mean(chunks * C), part_m2(chunks * C);
  const scalar_t* base = y.const_data_ptr<scalar_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first = k * rows, n = std::min(rows, M - first);
      opmath_t* mean = part_mean.data() + k * C;
      opmath_t* m2 = part_m2.data() + k * C;
      std::fill(mean, mean + C, opmath_t(0));
      std::fill(m2, m2 + C, opmath_t(0));
      // Two passes over the chunk (it is in cache): the mean, then the squared deviations from it.
      for (int64_t i = first; i < first + n; ++i) {
        const scalar_t* row = base + i * C;
        if constexpr (kFloat32<scalar_t>) {
          sum_row_f32(row, mean, C);
          continue;
        }
        int64_t c = 0;
        for (; c + L::kSize <= C; c += L::kSize) {
          FVec v[L::kParts];
          L::load(row + c, v);
          for (int64_t p = 0; p < L::kParts; ++p) {
            opmath_t* acc = mean + c + p * FVec::size();
            (FVec::loadu(acc) + v[p]).store(acc);
          }
        }
        for (; c < C; ++c) mean[c] += static_cast<opmath_t>(row[c]);
      }
      for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<opmath_t>(n);
      for (int64_t i = first; i < first + n; ++i) {
        const scalar_t* row = base + i * C;
        if constexpr (kFloat32<scalar_t>) {
          squared_deviation_row_f32(row, mean, m2, C);
          continue;
        }
        int64_t c = 0;
        for (; c + L::kSize <= C; c += L::kSize) {
          FVec v[L::kParts];
          L::load(row + c, v);
          for (int64_t p = 0; p < L::kParts; ++p) {
            const int64_t o = c + p * FVec::size();
            const FVec d = v[p] - FVec::loadu(mean + o);
            at::vec::fmadd(d, d, FVec::loadu(m2 + o)).store(m2 + o);
          }
        }
        for (; c < C; ++c) {
          const opmath_t d = static_cast<opmath_t>(row[c]) - mean[c];
          m2[c] += d * d;
        }
      }
    }
  });
  // Chan et al.: with delta = mean_b - mean_a and n = n_a + n_b,
  //   mean = mean_a + delta * n_b / n,   M2 = M2_a + M2_b + delta^2 * n_a * n_b / n   (chunks in order)
  opmath_t* mean = mean_out.mutable_data_ptr<opmath_t>();
  opmath_t* m2 = m2_out.mutable_data_ptr<opmath_t>();
  for (int64_t c = 0; c < C; ++c) {
    opmath_t count = 0, mu = 0, sq = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      const opmath_t n_b = static_cast<opmath_t>(std::min(rows, M - k * rows));
      const opmath_t delta = part_mean[k * C + c] - mu;
      const opmath_t w = n_b / (count + n_b);
      mu += delta * w;
      sq += part_m2[k * C + c] + delta * delta * count * w;
      count += n_b;
    }
    mean[c] = mu;
    m2[c] = sq;
  }
}

// -------------------------------------------------------------------------------- BN-apply (+ residual) (+ ReLU)
template <typename scalar_t>
void normalize_kernel(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                      bool relu, const at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using L = Lanes<scalar_t>;
  using FVec = typename L::FVec;
  const int64_t C = y.size(1);
  const int64_t M = y.numel() / C;
  const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
  const scalar_t* r_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  const opmath_t* rs = residual_scale.has_value() ? residual_scale->const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* s = scale.const_data_ptr<opmath_t>();
  const opmath_t* t = shift.const_data_ptr<opmath_t>();
  scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
  const FVec zero(opmath_t(0));
  at::parallel_for(0, M, chunk_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* yr = y_ptr + i * C;
      const scalar_t* rr = r_ptr == nullptr ? nullptr : r_ptr + i * C;
      scalar_t* o = o_ptr + i * C;
      if constexpr (kFloat32<scalar_t>) {
        if (rs != nullptr) {
          normalize_row_f32<true>(yr, s, t, rr, rs, o, C, relu);
        } else {
          normalize_row_f32<false>(yr, s, t, rr, rs, o, C, relu);
        }
        continue;
      }
      int64_t c = 0;
      for (; c + L::kSize <= C; c += L::kSize) {
        FVec z[L::kParts], yv[L::kParts];
        pre_activation<scalar_t>(yr, s, t, rr, rs, c, z, yv);
        if (relu) {  // maximum keeps NaN, as torch.relu does
          for (int64_t p = 0; p < L::kParts; ++p) z[p] = at::vec::maximum(z[p], zero);
        }
        L::store(o + c, z);
      }
      for (; c < C; ++c) {
        const opmath_t z = pre_activation_scalar(yr, s, t, rr, rs, c);
        o[c] = static_cast<scalar_t>(relu && z < opmath_t(0) ? opmath_t(0) : z);
      }
    }
  });
}

// -------------------------------------------------------------------------------- backward: masked sums
template <typename scalar_t>
void grad_sums_kernel(const at::Tensor& g, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                      const at::Tensor& mean_t, bool relu, const std::optional<at::Tensor>& masked_out,
                      const at::Tensor& sum_g_out, const at::Tensor& sum_gy_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using L = Lanes<scalar_t>;
  using FVec = typename L::FVec;
  const int64_t C = y.size(1);
  const int64_t M = y.numel() / C;
  const int64_t rows = chunk_rows(C);
  const int64_t chunks = (M + rows - 1) / rows;
  std::vector<opmath_t> part_g(chunks * C, 0), part_gy(chunks * C, 0);
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
  const scalar_t* r_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* m_ptr = masked_out.has_value() ? masked_out->mutable_data_ptr<scalar_t>() : nullptr;
  const opmath_t* rs = residual_scale.has_value() ? residual_scale->const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* s = scale.const_data_ptr<opmath_t>();
  const opmath_t* t = shift.const_data_ptr<opmath_t>();
  const opmath_t* mu = mean_t.const_data_ptr<opmath_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      opmath_t* sg = part_g.data() + k * C;
      opmath_t* sgy = part_gy.data() + k * C;
      for (int64_t i = k * rows; i < std::min(M, (k + 1) * rows); ++i) {
        const scalar_t* yr = y_ptr + i * C;
        const scalar_t* gr = g_ptr + i * C;
        const scalar_t* rr = r_ptr == nullptr ? nullptr : r_ptr + i * C;
        if constexpr (kFloat32<scalar_t>) {
          float* m_row = m_ptr == nullptr ? nullptr : m_ptr + i * C;
          if (rs != nullptr) {
            grad_sums_row_f32<true>(gr, yr, s, t, rr, rs, mu, sg, sgy, m_row, C, relu);
          } else {
            grad_sums_row_f32<false>(gr, yr, s, t, rr, rs, mu, sg, sgy, m_row, C, relu);
          }
          continue;
        }
        int64_t c = 0;
        for (; c + L::kSize <= C; c += L::kSize) {
          FVec yv[L::kParts], gv[L::kParts];
          masked_grad<scalar_t>(yr, gr, rr, rs, s, t, c, relu, gv, yv);
          for (int64_t p = 0; p < L::kParts; ++p) {
            const int64_t o = c + p * FVec::size();
            (FVec::loadu(sg + o) + gv[p]).store(sg + o);
            at::vec::fmadd(gv[p], yv[p] - FVec::loadu(mu + o), FVec::loadu(sgy + o)).store(sgy + o);
          }
          if (m_ptr != nullptr) L::store(m_ptr + i * C + c, gv);
        }
        for (; c < C; ++c) {
          const opmath_t gm = masked_grad_scalar(yr, gr, rr, rs, s, t, c, relu);
          sg[c] += gm;
          sgy[c] += gm * (static_cast<opmath_t>(yr[c]) - mu[c]);
          if (m_ptr != nullptr) m_ptr[i * C + c] = static_cast<scalar_t>(gm);
        }
      }
    }
  });
  opmath_t* sum_g = sum_g_out.mutable_data_ptr<opmath_t>();
  opmath_t* sum_gy = sum_gy_out.mutable_data_ptr<opmath_t>();
  for (int64_t c = 0; c < C; ++c) {
    opmath_t a = 0, b = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += part_g[k * C + c];
      b += part_gy[k * C + c];
    }
    sum_g[c] = a;
    sum_gy[c] = b;
  }
}

// -------------------------------------------------------------------------------- backward: BN input gradient
template <typename scalar_t>
void grad_input_kernel(const at::Tensor& g, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                       const at::Tensor& a_t, const at::Tensor& b_t, const at::Tensor& c_t, bool relu,
                       const at::Tensor& dy) {
  using opmath_t = at::opmath_type<scalar_t>;
  using L = Lanes<scalar_t>;
  using FVec = typename L::FVec;
  const int64_t C = y.size(1);
  const int64_t M = y.numel() / C;
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
  const scalar_t* r_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  const opmath_t* s = scale.const_data_ptr<opmath_t>();
  const opmath_t* t = shift.const_data_ptr<opmath_t>();
  const opmath_t* rs = residual_scale.has_value() ? residual_scale->const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* a = a_t.const_data_ptr<opmath_t>();
  const opmath_t* b = b_t.const_data_ptr<opmath_t>();
  const opmath_t* cc = c_t.const_data_ptr<opmath_t>();
  scalar_t* d_ptr = dy.mutable_data_ptr<scalar_t>();
  // The ReLU as a template argument: a run-time test inside the vector loop kept it from being optimized (2x).
  const auto run = [&](auto relu_tag) {
    constexpr bool kRelu = decltype(relu_tag)::value;
    at::parallel_for(0, M, chunk_rows(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* yr = y_ptr + i * C;
        const scalar_t* gr = g_ptr + i * C;
        const scalar_t* rr = r_ptr == nullptr ? nullptr : r_ptr + i * C;
        if constexpr (kFloat32<scalar_t>) {
          if (rs != nullptr) {
            grad_input_row_f32<true>(gr, yr, s, t, rr, rs, a, b, cc, d_ptr + i * C, C, kRelu);
          } else {
            grad_input_row_f32<false>(gr, yr, s, t, rr, rs, a, b, cc, d_ptr + i * C, C, kRelu);
          }
          continue;
        }
        int64_t c = 0;
        for (; c + L::kSize <= C; c += L::kSize) {
          FVec yv[L::kParts], gv[L::kParts];
          masked_grad<scalar_t>(yr, gr, rr, rs, s, t, c, kRelu, gv, yv);
          for (int64_t p = 0; p < L::kParts; ++p) {
            const int64_t o = c + p * FVec::size();
            gv[p] = at::vec::fmadd(FVec::loadu(a + o), gv[p],
                                   at::vec::fmadd(FVec::loadu(b + o), yv[p], FVec::loadu(cc + o)));
          }
          L::store(d_ptr + i * C + c, gv);
        }
        for (; c < C; ++c) {
          const opmath_t gm = masked_grad_scalar(yr, gr, rr, rs, s, t, c, kRelu);
          d_ptr[i * C + c] =
              static_cast<scalar_t>(std::fma(a[c], gm, std::fma(b[c], static_cast<opmath_t>(yr[c]), cc[c])));
        }
      }
    });
  };
  if (relu) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// -------------------------------------------------------------------------------- ops: check, allocate, run
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& y_in) {
  check_bn_y("bn_stats", c10::DeviceType::CPU, y_in);
  const at::Tensor y = nhwc(y_in);
  at::Tensor mean = at::zeros({y.size(1)}, bn_accumulation_options(y));
  at::Tensor m2 = at::zeros({y.size(1)}, bn_accumulation_options(y));
  if (y.numel() == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_stats_cpu",
                                  [&] { stats_kernel<scalar_t>(y, mean, m2); });
  return {mean, m2};
}

at::Tensor bn_normalize_cpu(const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
                            const std::optional<at::Tensor>& residual, bool relu,
                            const std::optional<at::Tensor>& residual_scale) {
  const char* op = "bn_normalize";
  check_bn_y(op, c10::DeviceType::CPU, y_in);
  check_bn_vector(op, "scale", scale, y_in);
  check_bn_vector(op, "shift", shift, y_in);
  if (residual.has_value()) check_bn_like(op, "residual", *residual, y_in);
  check_bn_residual_scale(op, residual, residual_scale, y_in);
  const at::Tensor y = nhwc(y_in);
  std::optional<at::Tensor> r;
  if (residual.has_value()) r = nhwc(*residual);
  at::Tensor out = empty_channels_last(y.sizes(), y.options());
  if (y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_normalize_cpu",
                                  [&] { normalize_kernel<scalar_t>(y, scale, shift, r, residual_scale, relu, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_grad_sums_cpu(const at::Tensor& g_in, const at::Tensor& y_in,
                                                                const at::Tensor& scale, const at::Tensor& shift,
                                                                const std::optional<at::Tensor>& residual,
                                                                const at::Tensor& mean, bool relu,
                                                                bool store_masked,
                                                                const std::optional<at::Tensor>& residual_scale) {
  const char* op = "bn_grad_sums";
  check_bn_y(op, c10::DeviceType::CPU, y_in);
  check_bn_like(op, "grad", g_in, y_in);
  for (const auto& [name, v] : {std::pair{"scale", scale}, {"shift", shift}, {"mean", mean}}) {
    check_bn_vector(op, name, v, y_in);
  }
  if (residual.has_value()) check_bn_like(op, "residual", *residual, y_in);
  check_bn_residual_scale(op, residual, residual_scale, y_in);
  const at::Tensor y = nhwc(y_in), g = nhwc(g_in);
  std::optional<at::Tensor> r;
  if (residual.has_value()) r = nhwc(*residual);
  at::Tensor sum_g = at::zeros({y.size(1)}, bn_accumulation_options(y));
  at::Tensor sum_gy = at::zeros({y.size(1)}, bn_accumulation_options(y));
  std::optional<at::Tensor> masked_out;
  if (store_masked) masked_out = empty_channels_last(y.sizes(), y.options());
  if (y.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_grad_sums_cpu", [&] {
      grad_sums_kernel<scalar_t>(g, y, scale, shift, r, residual_scale, mean, relu, masked_out, sum_g, sum_gy);
    });
  }
  return {sum_g, sum_gy, store_masked ? *masked_out : at::empty({0}, bn_accumulation_options(y))};
}

at::Tensor bn_grad_input_cpu(const at::Tensor& g_in, const at::Tensor& y_in, const at::Tensor& scale,
                             const at::Tensor& shift, const std::optional<at::Tensor>& residual, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& c, bool relu,
                             const std::optional<at::Tensor>& residual_scale) {
  const char* op = "bn_grad_input";
  check_bn_y(op, c10::DeviceType::CPU, y_in);
  check_bn_like(op, "grad", g_in, y_in);
  for (const auto& [name, v] : {std::pair{"scale", scale}, {"shift", shift}, {"a", a}, {"b", b}, {"c", c}}) {
    check_bn_vector(op, name, v, y_in);
  }
  if (residual.has_value()) check_bn_like(op, "residual", *residual, y_in);
  check_bn_residual_scale(op, residual, residual_scale, y_in);
  const at::Tensor y = nhwc(y_in), g = nhwc(g_in);
  std::optional<at::Tensor> r;
  if (residual.has_value()) r = nhwc(*residual);
  at::Tensor dy = empty_channels_last(y.sizes(), y.options());
  if (y.numel() == 0) return dy;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_grad_input_cpu",
                                  [&] {
                                    grad_input_kernel<scalar_t>(g, y, scale, shift, r, residual_scale, a, b, c, relu,
                                                                dy);
                                  });
  return dy;
}

}  // namespace
}  // namespace fused_resnet::cpu

TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) {
  m.impl("bn_stats", &fused_resnet::cpu::bn_stats_cpu);
  m.impl("bn_normalize", &fused_resnet::cpu::bn_normalize_cpu);
  m.impl("bn_grad_sums", &fused_resnet::cpu::bn_grad_sums_cpu);
  m.impl("bn_grad_input", &fused_resnet::cpu::bn_grad_input_cpu);
}
