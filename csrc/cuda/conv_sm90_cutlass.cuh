// conv + folded-BN bias + [residual] + [ReLU] on Hopper through CUTLASS's sm90 implicit-GEMM convolution: TMA
// im2col loads of the activation, warp-specialized wgmma main loop, and the fused epilogue
//   y = act(1·acc + beta·residual + bias[c])      (LinCombPerColBiasEltAct: the bias is per output channel)
// stored by TMA. It is the engine for the 16-bit layers that TMA can address (Cin and Cout multiples of 8,
// ungrouped, no pre-activation prologue); conv_bias_act_kernel.cuh handles everything else.
//
// CUTLASS's sm90 kernels exist only in sm_90a code: for any other architecture the kernel body is a stub, so the
// host side checks the device before launching (launch_conv_bias_act_sm90 in launch.h).
//
// Torch-free, like every .cu here (see launch.h); the CUTLASS headers come from the nvidia-cutlass wheel or
// CUTLASS_PATH (setup.py).
#pragma once

#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

// CUTLASS headers assume these two come first (the conv builders use KernelHardwareInfo without including it).
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"

#include "cute/tensor.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cuda/cutlass_run.cuh"
#include "cuda/launch.h"

namespace fused_resnet::cuda::sm90 {

// The output tile and the main loop's pipeline depth (0: as many stages as shared memory holds).
// Wide: 128×128 tiles, 64-deep K steps (four 16-deep wgmma steps): the tile design.md §2 measured to build in ~36 s
// without spilling; 128×256 spills. One CTA per SM (168 registers per thread, shared memory full of stages).
struct WideTile {
  using Shape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
  static constexpr int kStages = 0;
};
// Narrow: 128×64 tiles for layers of at most 64 output channels, which fill half of a wide tile. 4 stages keep a
// CTA at 98,816 bytes of shared memory and 116 registers per thread (95 without a residual; ptxas, sm_90a), so
// two CTAs share an SM and one's pipeline fill and epilogue overlap the other's main loop.
struct NarrowTile {
  using Shape = cute::Shape<cute::_128, cute::_64, cute::Shape<cute::_64>>;
  static constexpr int kStages = 4;
};
// Stem: 128×64 tiles with 16-deep K steps, for inputs of at most 16 channels (the trial's RGB stem, padded to 8:
// launch.h). A K step of the implicit conv covers channels of one filter tap: 64 deep, an 8-channel tap is 7/8 zeros,
// so a 7×7 stem took 49 steps of 64, 3,136 multiply-adds per output value for its 147 (21×; the im2col rows' GEMM:
// 192). 16 deep: 784 (5.3×; ~0.33 TFLOP for ResNet-50's stem at batch 256). 16 stages of 6 KB keep a CTA near 107 KB
// of shared memory, two CTAs per SM as on the narrow tiles, with ~1,000 cycles of wgmma in flight per CTA.
struct StemTile {
  using Shape = cute::Shape<cute::_128, cute::_64, cute::Shape<cute::_16>>;
  static constexpr int kStages = 16;
};

// One kernel per (element type, residual or not, tile). Without a residual the source operand is `void`, so the
// epilogue never reads C at all (beta·C with beta = 0 would still read it, and 0·NaN is NaN). The activation, Clamp,
// takes its bounds at run time (ReLU: [0, +inf), none: (-inf, +inf); NaN propagates, as the GPU tests check), so one
// kernel serves both: until 2026-11-27 the wide tiles had a kernel per activation (ReLu, Identity), which cost the
// 2-core build two more CUTLASS instantiations per dtype.
template <class Element, bool kResidual, class Tile>
struct ConvKernel {
  using Layout = cutlass::layout::TensorNHWC;  // activations NHWC; the filter [Cout, KH, KW, Cin] alike
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA granules
  using ElementSource = std::conditional_t<kResidual, Element, void>;
  using TileShape = typename Tile::Shape;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using Fusion =
      cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::Clamp, Element, float, float,
                                                         Element, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementSource, Layout, kAlignment, Element,
      Layout, kAlignment, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

  using Stages = std::conditional_t<
      Tile::kStages == 0,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::StageCount<(Tile::kStages > 0 ? Tile::kStages : 1)>>;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element, Layout,
      kAlignment, Element, Layout, kAlignment, float, TileShape, ClusterShape, Stages,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, Mainloop::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

// Runs the call, or with check_only only decides whether this kernel can take it (host-side checks alone: no
// device is touched, so CPU tests can ask). cudaErrorNotSupported: it cannot.
template <class Element, class K>
cudaError_t launch(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  using Conv = typename K::Conv;
  using ProblemShape = typename K::ProblemShape;
  constexpr bool kResidual = !std::is_void_v<typename K::ElementSource>;

  const ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation, {p.n, p.h, p.w, p.c}, {p.cout, p.kh, p.kw, p.c},
                           {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w}, {p.dil_h, p.dil_w}, 1);
  // The output extents CUTLASS derives must be the ones the caller allocated (torch's formula; a mismatch would
  // write out of bounds): shape_C is [n, p, q, k].
  if (shape.shape_C[1] != p.oh || shape.shape_C[2] != p.ow || shape.shape_C[3] != p.cout) {
    return cudaErrorNotSupported;
  }

  // Output strides (q, p, n) of the packed NHWC output, innermost first; the residual has the output's layout.
  typename Conv::ConvKernel::StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Conv::ConvKernel::StrideD{})>{},
                 [&](auto i) { cute::get<0, i>(stride_d) = shape.stride_C[ProblemShape::RankT - 2 - i]; });
  typename Conv::ConvKernel::StrideC stride_c{};
  if constexpr (kResidual) {
    cute::for_each(cute::make_seq<cute::rank<0>(typename Conv::ConvKernel::StrideC{})>{},
                   [&](auto i) { cute::get<0, i>(stride_c) = shape.stride_C[ProblemShape::RankT - 2 - i]; });
  }

  typename Conv::Arguments args{
      shape,
      {static_cast<const Element*>(p.x), static_cast<const Element*>(p.weight)},
      {{}, static_cast<const typename K::ElementSource*>(p.residual), stride_c, static_cast<Element*>(p.y), stride_d}};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = kResidual ? 1.f : 0.f;
  args.epilogue.thread.bias_ptr = p.bias;
  args.epilogue.thread.activation.lower_bound = p.relu ? 0.f : -std::numeric_limits<float>::infinity();
  args.epilogue.thread.activation.upper_bound = std::numeric_limits<float>::infinity();

  return run_cutlass<Conv>(args, stream, check_only);
}

// The entry points of one element type (instantiated in conv_sm90_<dtype>.cu);
// the caller checked the rest of what the engine needs (sm90_call in launch.cu).
template <class Element, bool kResidual>
using WideKernel = ConvKernel<Element, kResidual, WideTile>;

template <class Element, bool kResidual>
using NarrowKernel = ConvKernel<Element, kResidual, NarrowTile>;

template <class Element>
cudaError_t launch_typed(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return p.residual != nullptr ? launch<Element, WideKernel<Element, true>>(p, stream, check_only)
                               : launch<Element, WideKernel<Element, false>>(p, stream, check_only);
}

template <class Element>
cudaError_t launch_narrow_typed(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return p.residual != nullptr ? launch<Element, NarrowKernel<Element, true>>(p, stream, check_only)
                               : launch<Element, NarrowKernel<Element, false>>(p, stream, check_only);
}

// Without a residual only: an RGB stem has none (and each kernel costs the 2-core build ~20 s of nvcc).
template <class Element>
cudaError_t launch_stem_typed(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  return p.residual == nullptr ? launch<Element, ConvKernel<Element, false, StemTile>>(p, stream, check_only)
                               : cudaErrorNotSupported;
}

}  // namespace fused_resnet::cuda::sm90
