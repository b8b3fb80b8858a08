// Argument checks whose messages name the op and the argument, e.g.
//   "cnnext::max_pool2d_with_argmax: expected input to be a 3D or 4D tensor, got 5D".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#define CNNEXT_CHECK(cond, op, ...) TORCH_CHECK((cond), "cnnext::", op, ": ", __VA_ARGS__)

namespace cnnext {

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t lo,
                      int64_t hi) {
  CNNEXT_CHECK(t.defined(), op, "expected ", name, " to be a tensor, got None");
  if (lo == hi) {
    CNNEXT_CHECK(t.dim() == lo, op, "expected ", name, " to be a ", lo, "D tensor, got ", t.dim(),
                 "D with shape ", t.sizes());
  } else {
    CNNEXT_CHECK(t.dim() >= lo && t.dim() <= hi, op, "expected ", name, " to be a ", lo, "D or ",
                 hi, "D tensor, got ", t.dim(), "D with shape ", t.sizes());
  }
}

// Float and double everywhere; half and bfloat16 only where `allow_reduced` (CUDA kernels).
inline void check_floating(const char* op, const char* name, const at::Tensor& t,
                           bool allow_reduced) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kDouble ||
                  (allow_reduced && (s == at::kHalf || s == at::kBFloat16));
  CNNEXT_CHECK(ok, op, "expected ", name, " to have a floating dtype (",
               allow_reduced ? "float32, float64, float16 or bfloat16" : "float32 or float64",
               "), got ", s);
}

// Same dtype and device as the reference tensor.
inline void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  CNNEXT_CHECK(t.device() == ref.device(), op, "expected ", name, " on the same device as ",
               ref_name, " (", ref.device(), "), got ", t.device());
  CNNEXT_CHECK(t.scalar_type() == ref.scalar_type(), op, "expected ", name,
               " to have the same dtype as ", ref_name, " (", ref.scalar_type(), "), got ",
               t.scalar_type());
}

inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t length) {
  CNNEXT_CHECK(t.dim() == 1 && t.size(0) == length, op, "expected ", name,
               " to be a 1D tensor of length ", length, ", got shape ", t.sizes());
}

inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

}  // namespace cnnext
