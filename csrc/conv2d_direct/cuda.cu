// Direct 2D convolution on CUDA: the implicit-GEMM family (implicit_gemm.cuh) for forward,
// grad_input and grad_weight, or, with variant "naive" and where a geometry does not fit 32-bit
// GEMM indices or a stride above 8 on the grad_input side, the one-thread-per-output kernels of
// kernels.cuh. grad_bias rides on grad_weight's GEMM (it sums the grad_output tile already in
// shared memory) and has its own tree reduction when grad_weight is not wanted. Half and bfloat16
// run the same GEMMs on tensor cores (implicit_gemm_tc.cuh) where the channels allow.
// Deterministic, no atomics on values.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_compat.cuh"
#include "common/params.h"
#include "conv2d_direct/conv2d_direct.h"
#include "conv2d_direct/implicit_gemm.cuh"
#include "conv2d_direct/implicit_gemm_tc.cuh"
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
  const at::Tensor w = dense_filter(weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_direct", [&] {
    const BiasEpilogue<scalar_t> epilogue{has_bias ? b.const_data_ptr<scalar_t>() : nullptr};
    const bool igemm = use_implicit_gemm(kind, p);
    // Half/bfloat16 on tensor cores where supported, unless a SIMT tile was asked for.
    if (igemm && tile_of(kind) == IgemmTile::kAuto &&
        conv2d_implicit_gemm_tc_forward<scalar_t>(p, x, w, output, epilogue)) {
      return;
    }
    if (igemm && conv2d_implicit_gemm_forward<scalar_t>(p, x, w, output, epilogue, tile_of(kind))) {
      return;
    }
    conv2d_direct_naive_launch<scalar_t, /*TRANSPOSED=*/false>(
        kForwardOp, forward_geometry(p, x, output), x.const_data_ptr<scalar_t>(),
        w.contiguous().const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), epilogue);
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
  const bool igemm = use_implicit_gemm(kind, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, go.scalar_type(), "conv2d_direct_backward", [&] {
        // Plan both GEMMs first: one workspace serves them.
        Workspace ws;
        DgradPlan<scalar_t> dgrad;
        WgradPlan<scalar_t> wgrad;
        const at::Tensor w = output_mask[0] ? dense_filter(weight) : at::Tensor();
        const at::Tensor x = output_mask[1] ? input.contiguous(format_of(input)) : at::Tensor();
        // Half/bfloat16 on tensor cores where supported, unless a SIMT tile was asked for.
        const bool tc = igemm && tile_of(kind) == IgemmTile::kAuto && tc_supported<scalar_t>(p);
        const at::Tensor db = output_mask[2] ? grad_bias : at::Tensor();
        const bool dgrad_ok =
            output_mask[0] && igemm &&
            (tc ? plan_tc_dgrad<scalar_t>(p, go, w, grad_input, &ws, &dgrad)
                : plan_dgrad<scalar_t>(p, go, w, grad_input, tile_of(kind), &ws, &dgrad));
        const bool wgrad_ok =
            output_mask[1] && igemm &&
            (tc ? plan_tc_wgrad<scalar_t>(p, go, x, grad_weight, db, &ws, &wgrad)
                : plan_wgrad<scalar_t>(p, go, x, grad_weight, db, tile_of(kind), &ws, &wgrad));
        ws.allocate(go);
        if (dgrad_ok) {
          tc ? run_tc_dgrad<scalar_t>(dgrad, w, ws) : run_dgrad<scalar_t>(dgrad, w, ws);
        } else if (output_mask[0]) {
          const at::Tensor wc = w.contiguous();
          conv2d_direct_naive_launch<scalar_t, /*TRANSPOSED=*/true>(
              kBackwardOp, input_grad_geometry(p, go, grad_input), go.const_data_ptr<scalar_t>(),
              wc.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
              BiasEpilogue<scalar_t>{});
        }
        if (wgrad_ok) {
          tc ? run_tc_wgrad<scalar_t>(wgrad, ws) : run_wgrad<scalar_t>(wgrad, ws);
        } else if (output_mask[1]) {
          conv2d_direct_grad_weight_naive_launch<scalar_t>(
              kBackwardOp, weight_grad_geometry(p, x, go), go.const_data_ptr<scalar_t>(),
              x.const_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(), go);
        }
        if (output_mask[2] && !wgrad_ok) {
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
