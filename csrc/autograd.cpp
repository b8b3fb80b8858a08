// Autograd of every op family: one torch::autograd::Function per family, registered for its
// forward op's Autograd key in this build's namespace (cnnext in _C, cnnext_emu in _C_emu), so a
// differentiable call never re-enters Python. Forward runs the forward op below autograd;
// backward calls the family's registered backward op, so each backend's backward kernel serves
// as it is. Only what backward needs is saved. Without a gradient to record (grad mode off, or no
// input requiring one) the op runs directly, with no autograd node.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/library.h"

namespace cnnext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of `name` in this build's namespace. The signature must be the kernels'
// exactly (the dispatcher checks it).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  const std::string qualified = std::string(CNNEXT_NS_NAME "::") + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Sig>();
}

// Calls `op` below autograd (from an autograd kernel, calling it normally would come back here).
template <typename Sig, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// Calls a backward op. Under create_graph the op goes through the dispatcher's autograd fallback
// (no double backward), as any op without a derivative; otherwise straight to its kernel.
template <typename Sig, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (c10::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  return call_below_autograd(op, std::forward<Args>(args)...);
}

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const std::optional<at::Tensor>& t) { return t && requires_grad(*t); }

// Whether a call must record an autograd node.
template <typename... Ts>
bool wants_grad(const Ts&... tensors) {
  return c10::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

// `grad` with the forward output's strides. The backward ops give the gradient the layout of
// grad_output, which autograd may hand over contiguous; the forward output's strides carry the
// input's layout, so the gradient takes it, as torch's does. (Strides, not memory formats:
// .contiguous(format) keeps ambiguous strides such as those of an [N, C, 1, 1] gradient.)
at::Tensor like_output(const at::Tensor& grad, at::IntArrayRef output_stride) {
  if (grad.strides() == output_stride) return grad;
  return at::empty_strided(grad.sizes(), output_stride, grad.options()).copy_(grad);
}

// A stand-in for a tensor that was not saved: the backward ops read only its metadata.
at::Tensor placeholder(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::zeros({}, like.options()).expand(sizes);
}

// ---- pooling (csrc/pool2d) ----------------------------------------------------------------------

using MaxPoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef,
                                                      at::IntArrayRef, at::IntArrayRef,
                                                      at::IntArrayRef, bool);
using MaxPoolBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                      at::IntArrayRef, bool);

const c10::TypedOperatorHandle<MaxPoolSig>& max_pool_op() {
  static const auto op = find_op<MaxPoolSig>("max_pool2d_with_argmax");
  return op;
}

// Saves the argmax; backward scatters the gradient through it (the op gathers on CUDA).
class MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
    auto [output, argmax] = call_below_autograd(max_pool_op(), input, kernel_size, stride, padding,
                                                dilation, ceil_mode);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({argmax});
    ctx->save_for_backward({argmax});
    auto& saved = ctx->saved_data;
    saved["input_size"] = vec(input.sizes());
    saved["output_stride"] = vec(output.strides());
    saved["kernel_size"] = vec(kernel_size);
    saved["stride"] = vec(stride);
    saved["padding"] = vec(padding);
    saved["dilation"] = vec(dilation);
    saved["ceil_mode"] = ceil_mode;
    return {output, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), {}, {}, {}, {}, {}};
    static const auto op = find_op<MaxPoolBackwardSig>("max_pool2d_backward");
    auto& saved = ctx->saved_data;
    const at::Tensor grad = like_output(grads[0], saved["output_stride"].toIntVector());
    const at::Tensor grad_input =
        call_backward(op, grad, ctx->get_saved_variables()[0], saved["input_size"].toIntVector(),
                      saved["kernel_size"].toIntVector(), saved["stride"].toIntVector(),
                      saved["padding"].toIntVector(), saved["dilation"].toIntVector(),
                      saved["ceil_mode"].toBool());
    return {grad_input, {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_argmax_autograd(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  if (!wants_grad(input)) {
    return call_below_autograd(max_pool_op(), input, kernel_size, stride, padding, dilation,
                               ceil_mode);
  }
  const variable_list out =
      MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {out[0], out[1]};
}

using AvgPoolSig = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                              bool, bool, std::optional<int64_t>);
using AvgPoolBackwardSig = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, bool, bool,
                                      std::optional<int64_t>);

const c10::TypedOperatorHandle<AvgPoolSig>& avg_pool_op() {
  static const auto op = find_op<AvgPoolSig>("avg_pool2d");
  return op;
}

// Saves no tensor: backward spreads each output gradient over its window.
class AvgPool2dFunction : public torch::autograd::Function<AvgPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override) {
    at::Tensor output = call_below_autograd(avg_pool_op(), input, kernel_size, stride, padding,
                                            ceil_mode, count_include_pad, divisor_override);
    ctx->set_materialize_grads(false);
    auto& saved = ctx->saved_data;
    saved["input_size"] = vec(input.sizes());
    saved["output_stride"] = vec(output.strides());
    saved["kernel_size"] = vec(kernel_size);
    saved["stride"] = vec(stride);
    saved["padding"] = vec(padding);
    saved["ceil_mode"] = ceil_mode;
    saved["count_include_pad"] = count_include_pad;
    saved["divisor_override"] = divisor_override;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), {}, {}, {}, {}, {}, {}};
    static const auto op = find_op<AvgPoolBackwardSig>("avg_pool2d_backward");
    auto& saved = ctx->saved_data;
    const at::Tensor grad = like_output(grads[0], saved["output_stride"].toIntVector());
    const at::Tensor grad_input = call_backward(
        op, grad, saved["input_size"].toIntVector(), saved["kernel_size"].toIntVector(),
        saved["stride"].toIntVector(), saved["padding"].toIntVector(), saved["ceil_mode"].toBool(),
        saved["count_include_pad"].toBool(), saved["divisor_override"].toOptional<int64_t>());
    return {grad_input, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor avg_pool2d_autograd(const at::Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                               bool count_include_pad, std::optional<int64_t> divisor_override) {
  if (!wants_grad(input)) {
    return call_below_autograd(avg_pool_op(), input, kernel_size, stride, padding, ceil_mode,
                               count_include_pad, divisor_override);
  }
  return AvgPool2dFunction::apply(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                  divisor_override)[0];
}

// ---- convolution (csrc/conv2d_direct, csrc/conv2d_im2col) ---------------------------------------

// The two convolution families differ only in their op names and in the last argument: the
// direct kernels' variant, im2col's column-buffer bound.
struct DirectConv {
  using Extra = c10::string_view;
  static constexpr const char* kForward = "conv2d_direct";
  static constexpr const char* kBackward = "conv2d_direct_backward";
  static c10::IValue store(Extra variant) { return std::string(variant); }
};

struct Im2colConv {
  using Extra = int64_t;
  static constexpr const char* kForward = "conv2d_im2col";
  static constexpr const char* kBackward = "conv2d_im2col_backward";
  static c10::IValue store(Extra max_col_bytes) { return max_col_bytes; }
};

template <typename Algo>
using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                           typename Algo::Extra);
template <typename Algo>
using ConvBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t, std::array<bool, 3>, typename Algo::Extra);

template <typename Algo>
const c10::TypedOperatorHandle<ConvSig<Algo>>& conv_op() {
  static const auto op = find_op<ConvSig<Algo>>(Algo::kForward);
  return op;
}

// Saves the input only if the weight needs a gradient and the weight only if the input does; a
// tensor not saved reaches the backward op as a placeholder of the right shape (the ops read
// `input` only for output_mask[1] and `weight` only for output_mask[0]). The mask is what this
// backward pass asks for (torch.autograd.grad(out, x) computes no weight gradient).
template <typename Algo>
class Conv2dFunction : public torch::autograd::Function<Conv2dFunction<Algo>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups,
                               typename Algo::Extra extra) {
    at::Tensor output = call_below_autograd(conv_op<Algo>(), input, weight, bias, stride, padding,
                                            dilation, groups, extra);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({weight.requires_grad() ? input : at::Tensor(),
                            input.requires_grad() ? weight : at::Tensor()});
    auto& saved = ctx->saved_data;
    saved["input_size"] = vec(input.sizes());
    saved["weight_size"] = vec(weight.sizes());
    saved["has_bias"] = bias.has_value() && bias->defined();
    saved["stride"] = vec(stride);
    saved["padding"] = vec(padding);
    saved["dilation"] = vec(dilation);
    saved["groups"] = groups;
    saved["extra"] = Algo::store(extra);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), {}, {}, {}, {}, {}, {}, {}};
    static const auto op = find_op<ConvBackwardSig<Algo>>(Algo::kBackward);
    auto& saved = ctx->saved_data;
    const at::Tensor& grad = grads[0];
    const variable_list tensors = ctx->get_saved_variables();
    // Autograd edges are numbered over the tensor arguments given: bias is the third if any.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      saved["has_bias"].toBool() && ctx->needs_input_grad(2)};
    const at::Tensor input =
        tensors[0].defined() ? tensors[0] : placeholder(grad, saved["input_size"].toIntVector());
    const at::Tensor weight =
        tensors[1].defined() ? tensors[1] : placeholder(grad, saved["weight_size"].toIntVector());
    const c10::IValue& extra = saved["extra"];
    typename Algo::Extra extra_arg;
    if constexpr (std::is_same_v<typename Algo::Extra, int64_t>) {
      extra_arg = extra.toInt();
    } else {
      extra_arg = extra.toStringView();
    }
    auto [grad_input, grad_weight, grad_bias] = call_backward(
        op, grad, input, weight, saved["stride"].toIntVector(), saved["padding"].toIntVector(),
        saved["dilation"].toIntVector(), saved["groups"].toInt(), mask, extra_arg);
    return {mask[0] ? grad_input : at::Tensor(),
            mask[1] ? grad_weight : at::Tensor(),
            mask[2] ? grad_bias : at::Tensor(),
            {},
            {},
            {},
            {},
            {}};
  }
};

template <typename Algo>
at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           typename Algo::Extra extra) {
  if (!wants_grad(input, weight, bias)) {
    return call_below_autograd(conv_op<Algo>(), input, weight, bias, stride, padding, dilation,
                               groups, extra);
  }
  return Conv2dFunction<Algo>::apply(input, weight, bias, stride, padding, dilation, groups,
                                     extra)[0];
}

// ---- fused conv + batch norm + ReLU (csrc/conv_bn_relu) -----------------------------------------

using FusedOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;
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

const c10::TypedOperatorHandle<FusedSig>& fused_op() {
  static const auto op = find_op<FusedSig>("conv_bn_relu");
  return op;
}

bool given(const OptionalTensor& t) { return t.has_value() && t->defined(); }
at::Tensor or_undefined(const OptionalTensor& t) { return given(t) ? *t : at::Tensor(); }

// The output itself is not saved, so an inplace op on it (e.g. a following
// nn.ReLU(inplace=True)) is harmless: training recomputes the ReLU mask from the saved
// convolution output and statistics, eval reads it from a private copy of the output (as much
// memory as eager's ReLU keeps; rerunning the folded convolution instead would cost a second
// forward). Training saves the input only for the weight's gradient and the weight only for the
// input's (a tensor not saved reaches the backward op as a placeholder of the right shape); eval
// saves both. The running statistics are written by the op itself.
class ConvBNReLU2dFunction : public torch::autograd::Function<ConvBNReLU2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const OptionalTensor& conv_bias,
                               const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                               const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training, double momentum,
                               double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, c10::string_view algo,
                               int64_t max_col_bytes) {
    auto [output, save_mean, save_invstd, batch_var, conv_output] = call_below_autograd(
        fused_op(), input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
        training, momentum, eps, stride, padding, dilation, groups, algo, max_col_bytes);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({save_mean, save_invstd, batch_var, conv_output});
    ctx->save_for_backward({training ? conv_output : output.clone(), save_mean, save_invstd,
                            weight.requires_grad() || !training ? input : at::Tensor(),
                            input.requires_grad() || !training ? weight : at::Tensor(),
                            or_undefined(conv_bias), or_undefined(bn_weight),
                            or_undefined(bn_bias)});
    auto& saved = ctx->saved_data;
    saved["input_size"] = vec(input.sizes());
    saved["weight_size"] = vec(weight.sizes());
    saved["output_stride"] = vec(output.strides());
    saved["training"] = training;
    saved["stride"] = vec(stride);
    saved["padding"] = vec(padding);
    saved["dilation"] = vec(dilation);
    saved["groups"] = groups;
    saved["algo"] = std::string(algo);
    saved["max_col_bytes"] = max_col_bytes;
    return {output, save_mean, save_invstd, batch_var, conv_output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(16);
    if (!grads[0].defined()) return result;
    static const auto op = find_op<FusedBackwardSig>("conv_bn_relu_backward");
    auto& saved = ctx->saved_data;
    const variable_list t = ctx->get_saved_variables();
    const at::Tensor grad = like_output(grads[0], saved["output_stride"].toIntVector());
    // Autograd edges are numbered over the tensor arguments given: input, weight, then the
    // optional ones that were passed.
    std::array<bool, 5> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), false, false,
                                false};
    size_t edge = 2;
    for (int64_t i = 0; i < 3; ++i) {
      if (t[5 + i].defined()) mask[2 + i] = ctx->needs_input_grad(edge++);
    }
    const at::Tensor input =
        t[3].defined() ? t[3] : placeholder(grad, saved["input_size"].toIntVector());
    const at::Tensor weight =
        t[4].defined() ? t[4] : placeholder(grad, saved["weight_size"].toIntVector());
    auto grads_out = call_backward(op, grad, t[0], input, weight, t[5], t[6], t[7], t[1], t[2],
                                   saved["training"].toBool(), saved["stride"].toIntVector(),
                                   saved["padding"].toIntVector(), saved["dilation"].toIntVector(),
                                   saved["groups"].toInt(), saved["algo"].toStringView(),
                                   saved["max_col_bytes"].toInt(), mask);
    const std::array<at::Tensor, 5> all = {std::get<0>(grads_out), std::get<1>(grads_out),
                                           std::get<2>(grads_out), std::get<3>(grads_out),
                                           std::get<4>(grads_out)};
    for (int64_t i = 0; i < 5; ++i) {
      if (mask[i]) result[i] = all[i];
    }
    return result;
  }
};

FusedOutputs conv_bn_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                   const OptionalTensor& conv_bias, const OptionalTensor& bn_weight,
                                   const OptionalTensor& bn_bias,
                                   const OptionalTensor& running_mean,
                                   const OptionalTensor& running_var, bool training,
                                   double momentum, double eps, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, c10::string_view algo, int64_t max_col_bytes) {
  FusedOutputs out;
  if (!wants_grad(input, weight, conv_bias, bn_weight, bn_bias)) {
    out = call_below_autograd(fused_op(), input, weight, conv_bias, bn_weight, bn_bias,
                              running_mean, running_var, training, momentum, eps, stride, padding,
                              dilation, groups, algo, max_col_bytes);
  } else {
    const variable_list v = ConvBNReLU2dFunction::apply(
        input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, momentum,
        eps, stride, padding, dilation, groups, algo, max_col_bytes);
    out = {v[0], v[1], v[2], v[3], v[4]};
  }
  // The op wrote the running statistics below autograd, where no version counter moves; bump
  // them as an inplace op would (torch's batch norm does), so stale saved copies are caught.
  if (training) {
    if (given(running_mean)) torch::autograd::impl::bump_version(*running_mean);
    if (given(running_var)) torch::autograd::impl::bump_version(*running_var);
  }
  return out;
}

}  // namespace
}  // namespace cnnext

CNNEXT_LIBRARY_IMPL_EXPAND(CNNEXT_NS, Autograd, m) {
  m.impl("max_pool2d_with_argmax", &cnnext::max_pool2d_with_argmax_autograd);
  m.impl("avg_pool2d", &cnnext::avg_pool2d_autograd);
  m.impl("conv2d_direct", &cnnext::conv2d_autograd<cnnext::DirectConv>);
  m.impl("conv2d_im2col", &cnnext::conv2d_autograd<cnnext::Im2colConv>);
  m.impl("conv_bn_relu", &cnnext::conv_bn_relu_autograd);
}
