// Direct 2D convolution on CUDA (kernels in kernels.cuh).
// Forward: "naive" runs one thread per output element; "tiled" (and "auto") gives a block a
// spatial tile of outputs for several channels, staged through shared memory per input-channel
// chunk. Backward: grad_input is the transposed convolution in gather form (same two kernels),
// grad_weight a GEMM over positions whose per-slice partial sums are reduced in a fixed order by a
// second kernel, grad_bias a per-channel tree reduction: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_compat.cuh"
#include "common/params.h"
#include "conv2d_direct/conv2d_direct.h"
#include "conv2d_direct/kernels.cuh"

namespace cnnext {
namespace {

constexpr const char* kForwardOp = "conv2d_direct";
constexpr const char* kBackwardOp = "conv2d_direct_backward";

at::MemoryFormat format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace

at::Tensor conv2d_direct_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, c10::string_view variant) {
  const Conv2dParams p = conv2d_params(kForwardOp, input, weight, bias, stride, padding, dilation,
                                       groups, /*allow_reduced=*/true);
  const DirectVariant kind = parse_direct_variant(kForwardOp, variant);
  CNNEXT_DEVICE_GUARD(input);
  const at::MemoryFormat fmt = format_of(input);
  at::Tensor output = at::empty(p.output_sizes(), input.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  // Dense in the input's own format: channels_last stays channels_last (strided kernels).
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const DirectGeometry g = forward_geometry(p, x, output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_direct", [&] {
    const BiasEpilogue<scalar_t> epilogue{has_bias ? b.const_data_ptr<scalar_t>() : nullptr};
    conv2d_direct_launch<scalar_t, /*TRANSPOSED=*/false>(
        kForwardOp, g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        output.mutable_data_ptr<scalar_t>(), epilogue, kind);
  });
  return output;
}

// `input` is read only for grad_weight and `weight` only for grad_input: otherwise they may be
// one-element placeholders expanded to the right shape (see cnnext.autograd.Conv2dFunction).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_direct_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view variant) {
  const Conv2dParams p = conv2d_params(kBackwardOp, input, weight, std::nullopt, stride, padding,
                                       dilation, groups, /*allow_reduced=*/true);
  const DirectVariant kind = parse_direct_variant(kBackwardOp, variant);
  check_same(kBackwardOp, "grad_output", grad_output, "input", input);
  CNNEXT_CHECK(grad_output.sizes() == at::IntArrayRef(p.output_sizes()), kBackwardOp,
               "expected grad_output of shape ", at::IntArrayRef(p.output_sizes()), ", got ",
               grad_output.sizes());
  CNNEXT_DEVICE_GUARD(grad_output);
  const at::MemoryFormat go_fmt = format_of(grad_output);
  const auto options = grad_output.options();
  at::Tensor grad_input = output_mask[0] ? at::empty(p.input_sizes(), options.memory_format(go_fmt))
                                         : at::empty({0}, options);
  at::Tensor grad_weight =
      output_mask[1] ? at::empty(weight.sizes(), options) : at::empty({0}, options);
  at::Tensor grad_bias = output_mask[2] ? at::empty({p.c_out}, options) : at::empty({0}, options);
  if (p.n == 0) {  // sums over an empty batch
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor go = grad_output.contiguous(go_fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, go.scalar_type(), "conv2d_direct_backward", [&] {
        if (output_mask[0]) {
          const at::Tensor w = weight.contiguous();
          conv2d_direct_launch<scalar_t, /*TRANSPOSED=*/true>(
              kBackwardOp, input_grad_geometry(p, go, grad_input), go.const_data_ptr<scalar_t>(),
              w.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
              BiasEpilogue<scalar_t>{}, kind);
        }
        if (output_mask[1]) {
          const at::Tensor x = input.contiguous(format_of(input));
          conv2d_direct_grad_weight_launch<scalar_t>(
              kBackwardOp, weight_grad_geometry(p, x, go), go.const_data_ptr<scalar_t>(),
              x.const_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(), go, kind);
        }
        if (output_mask[2]) {
          // Only grad_output's geometry is used: `input` may be a placeholder here.
          conv2d_direct_grad_bias_launch<scalar_t>(weight_grad_geometry(p, go, go),
                                                   go.const_data_ptr<scalar_t>(),
                                                   grad_bias.mutable_data_ptr<scalar_t>());
        }
      });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cnnext

CNNEXT_CUDA_IMPL(m) {
  m.impl("conv2d_direct", &cnnext::conv2d_direct_forward_cuda);
  m.impl("conv2d_direct_backward", &cnnext::conv2d_direct_backward_cuda);
}
