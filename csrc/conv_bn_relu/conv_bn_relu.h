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

// ==== autograd ===================================================================================
// Compiled into csrc/cnnext.cpp only (CNNEXT_AUTOGRAD), which registers the forward for the
// Autograd key of conv_bn_relu (see csrc/common/autograd.h).
#ifdef CNNEXT_AUTOGRAD
#include <tuple>

#include "common/autograd.h"

namespace cnnext::fused {

using autograd::OptionalTensor;
using FusedOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FusedSig = FusedOutputs(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                              const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                              const OptionalTensor&, bool, double, double, at::IntArrayRef,
                              at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view, int64_t);
using FusedBackwardSig = FusedOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const OptionalTensor&,
                                      const OptionalTensor&, const OptionalTensor&,
                                      const at::Tensor&, const at::Tensor&, bool, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                                      int64_t, std::array<bool, 5>);

// The output itself is not saved, so an inplace op on it (e.g. a following
// nn.ReLU(inplace=True)) is harmless: training recomputes the ReLU mask from the saved
// convolution output and statistics, eval reads it from a private copy of the output (as much
// memory as eager's ReLU keeps; rerunning the folded convolution instead would cost a second
// forward). Training saves the input only for the weight's gradient and the weight only for the
// input's (a tensor not saved reaches the backward op as a placeholder of the right shape); eval
// saves both. Edges: input, weight, conv_bias, bn_weight, bn_bias (empty where absent).
struct ConvBNReLU2dBackward : autograd::CompiledNode<ConvBNReLU2dBackward> {
  autograd::SavedVariable conv_output, save_mean, save_invstd, input, weight, conv_bias, bn_weight,
      bn_bias;
  std::vector<int64_t> input_size, weight_size, output_stride, stride, padding, dilation;
  std::array<bool, 3> given{};  // conv_bias, bn_weight, bn_bias
  bool training = false;
  int64_t groups = 1, max_col_bytes = 0;
  std::string algo;

  template <typename Self, typename F>
  static void visit(Self& s, F&& f) {
    f(s.conv_output), f(s.save_mean), f(s.save_invstd), f(s.input), f(s.weight), f(s.conv_bias);
    f(s.bn_weight), f(s.bn_bias), f(s.input_size), f(s.weight_size), f(s.output_stride);
    f(s.stride), f(s.padding), f(s.dilation), f(s.given), f(s.training), f(s.groups);
    f(s.max_col_bytes), f(s.algo);
  }

  std::string name() const override { return "ConvBNReLU2dBackward"; }
  autograd::variable_list run(autograd::variable_list&& grads, c10::ArrayRef<bool> needs) const {
    autograd::variable_list result(5);
    if (!grads[0].defined()) return result;
    static const auto op = autograd::find_op<FusedBackwardSig>("conv_bn_relu_backward");
    const at::Tensor grad = autograd::like_output(grads[0], output_stride);
    const std::array<bool, 5> mask = {needs[0], needs[1], given[0] && needs[2],
                                      given[1] && needs[3], given[2] && needs[4]};
    at::Tensor x = input.unpack(), w = weight.unpack();
    if (!x.defined()) x = autograd::placeholder(grad, input_size);
    if (!w.defined()) w = autograd::placeholder(grad, weight_size);
    auto unpack_optional = [](const autograd::SavedVariable& v) -> OptionalTensor {
      at::Tensor t = v.unpack();
      return t.defined() ? OptionalTensor(std::move(t)) : std::nullopt;
    };
    auto out =
        autograd::call_backward(op, grad, conv_output.unpack(), x, w, unpack_optional(conv_bias),
                                unpack_optional(bn_weight), unpack_optional(bn_bias),
                                save_mean.unpack(), save_invstd.unpack(), training, stride, padding,
                                dilation, groups, algo, max_col_bytes, mask);
    const std::array<at::Tensor, 5> all = {std::get<0>(out), std::get<1>(out), std::get<2>(out),
                                           std::get<3>(out), std::get<4>(out)};
    for (size_t i = 0; i < 5; ++i) {
      if (mask[i]) result[i] = all[i];
    }
    return result;
  }
};

inline FusedOutputs conv_bn_relu_autograd(
    const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& conv_bias,
    const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
    const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
    double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view algo, int64_t max_col_bytes) {
  static const auto op = autograd::find_op<FusedSig>("conv_bn_relu");
  FusedOutputs out;
  if (!autograd::wants_grad("conv_bn_relu", input, weight, conv_bias, bn_weight, bn_bias)) {
    out = autograd::call_below_autograd(op, input, weight, conv_bias, bn_weight, bn_bias,
                                        running_mean, running_var, training, momentum, eps, stride,
                                        padding, dilation, groups, algo, max_col_bytes);
  } else {
    auto node =
        autograd::make_node<ConvBNReLU2dBackward>(input, weight, conv_bias, bn_weight, bn_bias);
    out = autograd::call_below_autograd(op, input, weight, conv_bias, bn_weight, bn_bias,
                                        running_mean, running_var, training, momentum, eps, stride,
                                        padding, dilation, groups, algo, max_col_bytes);
    const auto& [output, save_mean, save_invstd, batch_var, conv_output] = out;
    node->conv_output = autograd::save(training ? conv_output : output.clone());
    node->save_mean = autograd::save(save_mean);
    node->save_invstd = autograd::save(save_invstd);
    if (weight.requires_grad() || !training) node->input = autograd::save(input);
    if (input.requires_grad() || !training) node->weight = autograd::save(weight);
    node->conv_bias = autograd::save(conv_bias);
    node->bn_weight = autograd::save(bn_weight);
    node->bn_bias = autograd::save(bn_bias);
    auto given = [](const OptionalTensor& t) { return t.has_value() && t->defined(); };
    node->given = {given(conv_bias), given(bn_weight), given(bn_bias)};
    node->input_size = input.sizes().vec();
    node->weight_size = weight.sizes().vec();
    node->output_stride = output.strides().vec();
    node->training = training;
    node->stride = stride.vec();
    node->padding = padding.vec();
    node->dilation = dilation.vec();
    node->groups = groups;
    node->algo = std::string(algo);
    node->max_col_bytes = max_col_bytes;
    autograd::finish_node(node, output);
  }
  // The op wrote the running statistics below autograd, where no version counter moves; bump
  // them as an inplace op would (torch's batch norm does), so stale saved copies are caught.
  if (training) {
    if (running_mean.has_value() && running_mean->defined()) {
      torch::autograd::impl::bump_version(*running_mean);
    }
    if (running_var.has_value() && running_var->defined()) {
      torch::autograd::impl::bump_version(*running_var);
    }
  }
  return out;
}

}  // namespace cnnext::fused
#endif  // CNNEXT_AUTOGRAD
