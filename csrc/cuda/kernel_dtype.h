// The kernels' DType of a torch dtype, for the torch bindings (the kernel files never include torch headers).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cuda/launch.h"
#include "message.h"

namespace fused_resnet::cuda {

inline DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      FR_CHECK(false, "unsupported dtype ", t);
  }
}

}  // namespace fused_resnet::cuda
