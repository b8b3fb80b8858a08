// Shared by the CPU (cpu.cpp) and CUDA (cuda.cu) host code of conv_bn_relu: the plan of a call
// (argument validation of the forward and backward ops, the convolution's algorithm) and the
// dtype of the saved statistics. The convolution runs through common/conv_dispatch.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/conv_dispatch.h"
#include "common/params.h"

namespace cnnext::fused {

constexpr const char* kForwardOp = "conv_bn_relu";
constexpr const char* kBackwardOp = "conv_bn_relu_backward";

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The saved mean / invstd / batch variance are in the accumulation dtype: float for half and
// bfloat16 inputs (as torch's batch norm saves them), else the input's dtype.
inline at::ScalarType stats_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

// An optional per-channel parameter: the input's dtype and device, a vector of length c_out.
inline void check_channel_param(const char* op, const char* name,
                                const std::optional<at::Tensor>& t, const at::Tensor& input,
                                int64_t c_out) {
  if (!given(t)) return;
  check_same(op, name, *t, "input", input);
  check_vector(op, name, *t, c_out);
}

// Validates every forward argument; returns the convolution's geometry.
inline Conv2dParams check_forward(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& conv_bias,
                                  const std::optional<at::Tensor>& bn_weight,
                                  const std::optional<at::Tensor>& bn_bias,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var, bool training,
                                  double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, int64_t max_col_bytes,
                                  bool allow_reduced) {
  const Conv2dParams p = conv2d_params(op, input, weight, std::nullopt, stride, padding, dilation,
                                       groups, allow_reduced);
  check_channel_param(op, "conv_bias", conv_bias, input, p.c_out);
  check_channel_param(op, "bn_weight", bn_weight, input, p.c_out);
  check_channel_param(op, "bn_bias", bn_bias, input, p.c_out);
  check_channel_param(op, "running_mean", running_mean, input, p.c_out);
  check_channel_param(op, "running_var", running_var, input, p.c_out);
  CNNEXT_CHECK(training || (given(running_mean) && given(running_var)), op,
               "expected running_mean and running_var in eval mode (training=False), got None");
  CNNEXT_CHECK(eps >= 0, op, "expected eps to be non-negative, got ", eps);
  check_max_col_bytes(op, max_col_bytes);
  // torch.nn.functional.batch_norm's rule (its message, so callers can match either).
  CNNEXT_CHECK(!training || p.n * p.h_out * p.w_out != 1, op,
               "Expected more than 1 value per channel when training, got a convolution output of "
               "size ",
               at::IntArrayRef(p.output_sizes()));
  return p;
}

// Validates the backward op's arguments against the forward's geometry.
inline Conv2dParams check_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& conv_output,
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t max_col_bytes, bool allow_reduced) {
  const Conv2dParams p = conv2d_params(op, input, weight, std::nullopt, stride, padding, dilation,
                                       groups, allow_reduced);
  const std::vector<int64_t> out_vec = p.output_sizes();
  const at::IntArrayRef out_sizes(out_vec);
  check_same(op, "grad_output", grad_output, "input", input);
  CNNEXT_CHECK(grad_output.sizes() == out_sizes, op, "expected grad_output of shape ", out_sizes,
               ", got ", grad_output.sizes());
  if (training) {
    check_same(op, "conv_output", conv_output, "input", input);
    CNNEXT_CHECK(conv_output.sizes() == out_sizes, op, "expected conv_output of shape ", out_sizes,
                 " in training mode, got ", conv_output.sizes());
  } else if (conv_output.numel() != 0) {
    // Eval: a copy of the forward output, the source of the ReLU mask.
    check_same(op, "conv_output", conv_output, "input", input);
    CNNEXT_CHECK(conv_output.sizes() == out_sizes, op,
                 "expected conv_output to be empty or the forward output of shape ", out_sizes,
                 " in eval mode, got ", conv_output.sizes());
  }
  check_channel_param(op, "conv_bias", conv_bias, input, p.c_out);
  check_channel_param(op, "bn_weight", bn_weight, input, p.c_out);
  check_channel_param(op, "bn_bias", bn_bias, input, p.c_out);
  const at::ScalarType st = stats_type(input.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"save_mean", save_mean},
                                {"save_invstd", save_invstd}}) {
    CNNEXT_CHECK(t.device() == input.device() && t.scalar_type() == st, op, "expected ", name,
                 " of dtype ", st, " on ", input.device(), ", got ", t.scalar_type(), " on ",
                 t.device());
    check_vector(op, name, t, p.c_out);
  }
  check_max_col_bytes(op, max_col_bytes);
  return p;
}

// The convolution of a call: algo "auto" resolved by the dispatch's rule for the backend (the
// same choice cnnext._algo makes), the direct kernel's default variant, the caller's bound on
// im2col's column buffers.
inline ConvAlgorithm conv_algorithm(const char* op, c10::string_view algo, int64_t max_col_bytes,
                                    const Conv2dParams& p, bool cuda) {
  ConvAlgorithm a;
  a.algo = resolve_conv_algo(parse_conv_algo(op, algo), p, cuda);
  a.max_col_bytes = max_col_bytes;
  return a;
}

}  // namespace cnnext::fused
