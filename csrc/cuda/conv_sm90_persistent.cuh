// conv + folded-BN bias + [residual] + [ReLU] on Hopper as a *persistent* implicit GEMM: CUTLASS's sm90 conv main
// loop (TMA im2col loads of the activation, wgmma) run by CUTLASS's persistent ping-pong GEMM kernel, whose two
// math warp groups take turns on 128×128 tiles, so that one tile's epilogue overlaps the next tile's main loop and
// the producer warp streams the next tile's operands while a tile drains.
//
// Why: CUTLASS 4.2's sm90 conv kernel is not persistent and has one math warp group; on 128×128 tiles one CTA fills
// an SM (168 registers a thread), so each tile's pipeline fill and epilogue leave the tensor cores idle. The 3×3
// layers of over 64 channels ran at 0.68–0.80× of cuDNN's conv on it (H100, benchmarks/results/2026-11-27_H100_run4),
// while the 1×1 layers on the persistent ping-pong GEMM (conv_sm90_gemm.cuh) reached 0.79–1.00×. CUTLASS's conv
// dispatch refuses the persistent schedules, but its conv main loop offers the kernel layer the GEMM main loop's
// interface (load_init / load / mma / load_tail / mma_tail), and its M is linearized (N·P·Q output pixels) when A is
// loaded by im2col TMA. PersistentMainloop below only re-labels the schedule and takes the conv's own problem shape
// for building its TMA descriptors; the kernel, the tile scheduler and the epilogue are CUTLASS's GEMM ones, the
// epilogue on the packed NHWC output as an M×N row-major matrix (the 1×1 GEMM's).
//
// The "cutlass_trial" engine only, until a GPU run has checked and timed it (launch.cu), and without a residual: the
// layers it is for, ResNet-50's 3×3 ones, have none, and each kernel costs the 2-core build about 20 s of nvcc.
#pragma once

#include "cuda/conv_sm90_cutlass.cuh"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace fused_resnet::cuda::sm90 {

// CUTLASS's conv main loop, handed to the GEMM kernel layer under the ping-pong schedule.
template <class Conv>
struct PersistentMainloop : Conv {
  struct DispatchPolicy : Conv::DispatchPolicy {
    using Schedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  };
  // One elected thread issues each stage's TMA loads (Conv::load), as in CUTLASS's TMA GEMM main loops.
  static constexpr int NumProducerThreadEvents = 1;

  using ConvShape = typename Conv::ProblemShape;
  // (N·P·Q, K, (C, S, R), L): what the non-persistent conv kernel hands the main loop (Conv::get_problem_shape_MNKL),
  // with a run-time L of 1, as the GEMM epilogue's TMA descriptors expect.
  using GemmShape = cute::Shape<int, int, cute::Shape<int, int, int>, int>;

  static GemmShape gemm_shape(const ConvShape& shape) {
    const auto [m, n, k, l] = Conv::get_problem_shape_MNKL(shape);
    return {static_cast<int>(m), static_cast<int>(n), k, 1};
  }

  struct Arguments {
    ConvShape conv_shape;
    typename Conv::Arguments operands;
  };

  // The kernel layer passes its GEMM shape; the TMA descriptors are built from the conv's.
  template <class Shape>
  static typename Conv::Params to_underlying_arguments(const Shape&, const Arguments& args, void* workspace) {
    return Conv::to_underlying_arguments(args.conv_shape, args.operands, workspace);
  }

  template <class Shape>
  static bool can_implement(const Shape&, const Arguments& args) {
    return Conv::can_implement(args.conv_shape, args.operands);
  }

  // The GEMM kernel layer asserts GEMM-shaped (rank-3) operand strides and reads a batch mode L from the tiled
  // operands; a conv has neither (its strides are the conv's, inside the TMA descriptors). Stand-in stride types for
  // the assertions, and the tiled operands with a unit L mode, dropped again on their way back to the conv's load.
  using StrideA = cute::Stride<int64_t, cute::_1, int64_t>;
  using StrideB = cute::Stride<int64_t, cute::_1, int64_t>;

  template <class ProblemShapeMNKL>
  CUTLASS_DEVICE auto load_init(const ProblemShapeMNKL& shape, const typename Conv::Params& params) {
    const auto inputs = Conv::load_init(shape, params);
    return cute::make_tuple(with_unit_l(cute::get<0>(inputs)), with_unit_l(cute::get<1>(inputs)));
  }

  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(const typename Conv::Params& params, typename Conv::MainloopPipeline pipeline,
                           typename Conv::PipelineState state, const cute::tuple<TensorA, TensorB>& inputs,
                           const BlockCoord& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, typename Conv::TensorStorage& shared_tensors) {
    using cute::_;
    const auto unbatched = cute::make_tuple(cute::get<0>(inputs)(_, _, _, _, 0), cute::get<1>(inputs)(_, _, _, _, 0));
    Conv::load(params, pipeline, state, unbatched, blk_coord, k_tile_iter, k_tile_count, thread_idx,
               block_rank_in_cluster, shared_tensors);
  }

 private:
  // The im2col operand's layout is composed (a divmod layout of the conv's coordinates after the tiling); the mode
  // goes on its outer, tiled part, where a stride of 0 adds nothing to the coordinates it hands on.
  template <class Tensor>
  CUTLASS_DEVICE static auto with_unit_l(const Tensor& tiled) {
    const auto unit = cute::make_layout(cute::_1{}, cute::_0{});
    const auto& layout = tiled.layout();
    if constexpr (cute::is_composed_layout<cute::remove_cvref_t<decltype(layout)>>::value) {
      const auto outer = cute::append(layout.layout_b(), unit);
      return cute::make_tensor(tiled.data(), cute::composition(layout.layout_a(), layout.offset(), outer));
    } else {
      return cute::make_tensor(tiled.data(), cute::append(layout, unit));
    }
  }
};

template <class Element>
struct PersistentConvKernel {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA granules
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using RowMajor = cutlass::layout::RowMajor;  // the output: N·P·Q rows of K channels (NHWC)

  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::Clamp, Element, float,
                                                                    float, Element, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::Shape<cute::_128, cute::_128, cute::_64>,
      ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, RowMajor,
      kAlignment, Element, RowMajor, kAlignment, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

  // 6 stages of 32 KB: with the epilogue's 8 KB and the kernel's barriers the CTA stays within the SM's 227 KB
  // (checked below). CUTLASS's automatic count knows only the epilogue's share, not the ping-pong kernel's own.
  using Conv = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element,
      cutlass::layout::TensorNHWC, kAlignment, Element, cutlass::layout::TensorNHWC, kAlignment, float, TileShape,
      ClusterShape, cutlass::conv::collective::StageCount<6>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Mainloop = PersistentMainloop<Conv>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<typename Mainloop::GemmShape, Mainloop, Epilogue>;
  // CUTLASS's conv adapter drives any 3.x kernel of this interface; its GEMM adapter would pull in the 2.x GEMM
  // kernels, whose GemmUniversal specialization then clashes with the conv kernel's in this translation unit.
  using Op = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= cutlass::gemm::collective::detail::sm90_smem_capacity_bytes,
                "the persistent conv's stages do not fit the SM's shared memory");
};

// Runs the call, or with check_only only decides whether this kernel can take it (no device touched). Calls with a
// residual are declined (the caller offers them to the next kernel).
template <class Element>
cudaError_t launch_persistent_typed(const ConvBiasActParams& p, cudaStream_t stream, bool check_only) {
  using K = PersistentConvKernel<Element>;
  using Op = typename K::Op;
  using Kernel = typename K::Kernel;
  using ConvShape = typename K::Mainloop::ConvShape;

  if (p.residual != nullptr) return cudaErrorNotSupported;
  const ConvShape shape(cutlass::conv::Mode::kCrossCorrelation, {p.n, p.h, p.w, p.c}, {p.cout, p.kh, p.kw, p.c},
                        {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w}, {p.dil_h, p.dil_w}, 1);
  // As in launch(): the output extents CUTLASS derives must be the ones the caller allocated.
  if (shape.shape_C[1] != p.oh || shape.shape_C[2] != p.ow || shape.shape_C[3] != p.cout) {
    return cudaErrorNotSupported;
  }
  const long long m = static_cast<long long>(p.n) * p.oh * p.ow;
  if (m <= 0 || m > std::numeric_limits<int>::max()) return cudaErrorNotSupported;
  const int rows = static_cast<int>(m);

  const auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {rows, p.cout, 1});
  cutlass::KernelHardwareInfo hw_info;
  hw_info.sm_count = p.sm_count > 0 ? p.sm_count : 132;  // as the GEMM: a stand-in for check-only callers

  typename Op::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      K::Mainloop::gemm_shape(shape),
      {shape, {static_cast<const Element*>(p.x), static_cast<const Element*>(p.weight)}},
      {{}, nullptr, {}, static_cast<Element*>(p.y), stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.thread.bias_ptr = p.bias;
  args.epilogue.thread.activation.lower_bound = p.relu ? 0.f : -std::numeric_limits<float>::infinity();
  args.epilogue.thread.activation.upper_bound = std::numeric_limits<float>::infinity();

  return run_cutlass<Op>(args, stream, check_only);
}

}  // namespace fused_resnet::cuda::sm90
