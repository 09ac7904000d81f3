// A 1×1, stride-1, unpadded conv + folded-BN bias + [residual] + [ReLU] on Hopper as what it is, a GEMM:
//   y[M = N·H·W, Cout] = act(x[M, Cin] · weight[Cout, Cin]ᵀ + residual + bias[c])
// through CUTLASS's persistent ping-pong sm90 GEMM: one producer warp group streams A/B tiles by TMA while two
// consumer warp groups take turns, so one tile's epilogue (bias, residual, ReLU, TMA store) overlaps the next
// tile's wgmma main loop.
//
// Why not the implicit conv (conv_sm90_cutlass.cuh) for these layers too: CUTLASS 4.2 has only a non-persistent
// sm90 conv kernel, one 128×128 tile per CTA and one CTA per SM. A 1×1 layer's GEMM-K is just Cin (64–2048,
// 1–32 K steps), so each CTA spends most of its life filling its pipeline and draining its epilogue, one after
// the other: on the H200 (benchmarks/results/2026-11-27_H200_run2) those layers ran at 1/3–1/4 of cuDNN's conv
// alone (e.g. 64→64 at 56×56: 164 µs against 57 µs), while 3×3 layers with long K loops came within 0.9× of it.
//
// The activation is Clamp with run-time bounds ([0, +inf) for ReLU, (-inf, +inf) for none; NaN propagates
// either way, as torch.relu keeps it), so ReLU and no-ReLU share a kernel: build time on 2 cores is the limit
// (design.md §2). Without a residual the source operand is `void`: C is never read.
//
// The epilogue works through a tile in subtiles, each residual subtile loaded by TMA ahead of its use into one of
// at most 4 shared-memory stages (CUTLASS's choice for this schedule). CUTLASS's own subtile here is 64×32, 4 KB
// of bf16, so at most 16 KB of residual in flight per SM, through 8 subtiles a tile. On the H100
// (benchmarks/results/2026-11-27_H100_run4) the 1×1 layers with a residual moved their bytes at 2.3 TB/s against
// 2.6 TB/s for the same shape without one (and 2.75 for cuDNN's conv alone), and Triton's kernel ran the largest
// of them 1.23× as fast: the residual's loads look latency-bound. WideEpilogue: 64×64 subtiles, twice the bytes in
// flight through half as many subtiles (the "cutlass_trial" engine, launch.cu), for the next GPU run to judge.
//
// Torch-free, like every .cu here (see launch.h).
#pragma once

#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"

#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cuda/cutlass_run.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda::sm90_gemm {

struct AutoEpilogue {
  using Tile = cutlass::epilogue::collective::EpilogueTileAuto;
};
struct WideEpilogue {
  using Tile = cute::Shape<cute::_64, cute::_64>;
};

template <class Element, bool kResidual, class EpilogueSubtile = AutoEpilogue>
struct GemmKernel {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA granules
  using LayoutA = cutlass::layout::RowMajor;     // x: M×K, K (channels) innermost: NHWC
  using LayoutB = cutlass::layout::ColumnMajor;  // weight: [Cout, Cin], K innermost
  using LayoutD = cutlass::layout::RowMajor;     // y and the residual: M×N, NHWC
  using ElementSource = std::conditional_t<kResidual, Element, void>;
  // 128×128 tiles, 64-deep K steps, as the implicit conv (design.md §2: 128×256 spills). Each consumer warp group
  // owns a whole tile in ping-pong, 128 fp32 accumulators per thread.
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::Clamp, Element, float,
                                                                    float, Element, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      typename EpilogueSubtile::Tile, float, float, ElementSource, LayoutD, kAlignment, Element,
      LayoutD, kAlignment, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlignment, Element, LayoutB, kAlignment,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;

  // The default tile scheduler of this kernel schedule: persistent, one CTA per SM, no workspace.
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  // The builder's stage count leaves out the kernel's own barriers and alignment: the wide epilogue's kernel is
  // within ~1 KB of the limit by hand count. Past it the launch would fail at run time (no fallback); here, the build.
  static_assert(sizeof(typename Kernel::SharedStorage) <= cutlass::gemm::collective::detail::sm90_smem_capacity_bytes,
                "the GEMM's stages and epilogue do not fit the SM's shared memory");
};

// Runs the call, or with check_only only decides whether this kernel can take it (host-side checks alone: no
// device is touched, so CPU tests can ask). cudaErrorNotSupported: it cannot. The caller (launch.cu) routes only
// 1×1, stride-1, unpadded convs here, whose output extents are the input's.
template <class Element, bool kResidual, class EpilogueSubtile = AutoEpilogue>
cudaError_t launch(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  using K = GemmKernel<Element, kResidual, EpilogueSubtile>;
  using Gemm = typename K::Gemm;
  using Kernel = typename Gemm::GemmKernel;

  if (p.kh != 1 || p.kw != 1 || p.stride_h != 1 || p.stride_w != 1 || p.pad_h != 0 || p.pad_w != 0 ||
      p.oh != p.h || p.ow != p.w) {
    return cudaErrorNotSupported;
  }
  const long long m = static_cast<long long>(p.n) * p.h * p.w;
  if (m <= 0 || m > std::numeric_limits<int>::max()) return cudaErrorNotSupported;
  const int rows = static_cast<int>(m);

  const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {rows, p.c, 1});
  const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {p.cout, p.c, 1});
  const auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, {rows, p.cout, 1});
  const auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {rows, p.cout, 1});

  cutlass::KernelHardwareInfo hw_info;
  // The persistent grid is one CTA per SM. Host-side checks need no count; a launch always has one (ops_cuda.cpp),
  // and a stand-in keeps CUTLASS from querying a device that a check-only caller may not have.
  hw_info.sm_count = p.sm_count > 0 ? p.sm_count : 132;

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {rows, p.cout, p.c, 1},
      {static_cast<const Element*>(p.x), stride_a, static_cast<const Element*>(p.weight), stride_b},
      {{}, static_cast<const typename K::ElementSource*>(p.residual), stride_c, static_cast<Element*>(p.y), stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = kResidual ? 1.f : 0.f;
  args.epilogue.thread.bias_ptr = p.bias;
  args.epilogue.thread.activation.lower_bound = p.relu ? 0.f : -std::numeric_limits<float>::infinity();
  args.epilogue.thread.activation.upper_bound = std::numeric_limits<float>::infinity();

  return run_cutlass<Gemm>(args, stream, check_only);
}

// The entry points of one element type (instantiated in conv_sm90_gemm_<dtype>.cu). The wide-epilogue one takes
// only calls with a residual (without one the epilogue loads nothing).
template <class Element>
cudaError_t launch_typed(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return p.residual != nullptr ? launch<Element, true>(p, stream, check_only)
                               : launch<Element, false>(p, stream, check_only);
}

template <class Element>
cudaError_t launch_wide_epilogue_typed(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return p.residual != nullptr ? launch<Element, true, WideEpilogue>(p, stream, check_only) : cudaErrorNotSupported;
}

}  // namespace fused_resnet::cuda::sm90_gemm
