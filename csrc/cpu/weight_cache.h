// Conv weights prepacked into oneDNN's blocked layout, cached across calls.
//
// oneDNN convolves channels_last activations with weights in a blocked layout; given a plain weight it
// reorders it on every call, which costs up to ~1.8x at small spatial sizes (batch 1, 7x7). Inference
// reuses the same (BN-folded) weight call after call, so the reordered copy is kept here.
//
// A cached copy is valid while its source weight is unchanged. An entry is keyed on the weight's storage
// (held weakly, so a freed weight's address is never mistaken for a new one), data pointer, offset, sizes,
// strides, dtype, version counter, the conv geometry and the input shape (oneDNN's chosen layout depends on
// it). Every in-place op bumps the version counter; writes that bypass it (through `tensor.data`) are not
// seen, as for autograd's own saved-tensor checks. Only weights whose storage was declared stable with
// allow_prepacking are cached: the package declares the folded weights it keeps (nn/folding.py), while a
// tensor made inside a compiled graph may be a reused buffer rewritten without a version bump (Inductor), so
// it is packed afresh on every call. Tensors without a version counter (made inside torch.inference_mode())
// and weights that require grad are never cached. FUSED_RESNET_CPU_WEIGHT_CACHE=0 turns the cache off.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <functional>

namespace fused_resnet::cpu {

// A prepacked weight, and whether every value of its source weight is finite (known when it was packed, so that
// the caller need not read the weight again at each call).
struct PackedWeight {
  at::Tensor packed;
  bool finite;
};

// The prepacked weight for this call: from the cache, or made by `pack` (and cached when that is safe).
PackedWeight cached_prepacked_weight(const at::Tensor& weight, c10::IntArrayRef input_sizes, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                     const std::function<PackedWeight()>& pack);

// Declares `weight`'s storage stable (held weakly): calls with it may use the cache.
void allow_prepacking(const at::Tensor& weight);

void clear_weight_cache();
int64_t weight_cache_size();

}  // namespace fused_resnet::cpu
