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
#include "common/conv_dispatch.h"
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

// The fused epilogue of conv_bn_relu: acc * scale[c] + shift[c] (BatchNorm folded, so no folded
// copy of the weight is made), then ReLU (v < 0 ? 0 : v keeps NaN, as torch.relu does) when
// RELU; without it eval backward recomputes the forward's pre-activation bit for bit. A kernel
// argument: trivially copyable, device pointers only.
template <typename scalar_t, bool RELU>
struct ScaleShiftEpilogue {
  const scalar_t* scale = nullptr;
  const scalar_t* shift = nullptr;

  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t value, int64_t channel) const {
    const acc_t v = value * static_cast<acc_t>(scale[channel]) + static_cast<acc_t>(shift[channel]);
    return RELU && v < acc_t(0) ? acc_t(0) : v;
  }
};

// The implicit GEMM (on tensor cores for half/bfloat16 where supported, unless a SIMT tile was
// asked for), or the naive kernel where it does not fit or was asked for.
template <typename scalar_t, class Epilogue>
void run_forward(const char* op, const Conv2dParams& p, DirectVariant kind, bool split_k,
                 const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                 const Epilogue& epilogue) {
  const bool igemm = use_implicit_gemm(kind, p);
  if (igemm && tile_of(kind) == IgemmTile::kAuto &&
      conv2d_implicit_gemm_tc_forward<scalar_t>(p, x, w, out, epilogue)) {
    return;
  }
  if (igemm &&
      conv2d_implicit_gemm_forward<scalar_t>(p, x, w, out, epilogue, tile_of(kind), split_k)) {
    return;
  }
  conv2d_direct_naive_launch<scalar_t, /*TRANSPOSED=*/false>(
      op, forward_geometry(p, x, out), x.const_data_ptr<scalar_t>(),
      w.contiguous().const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), epilogue);
}

}  // namespace

at::Tensor conv2d_direct_run_forward_cuda(const char* op, const Conv2dParams& p,
                                          const at::Tensor& input, const at::Tensor& weight,
                                          const ConvEpilogue& epilogue, c10::string_view variant,
                                          bool split_k) {
  const DirectVariant kind = parse_direct_variant(op, variant);
  CNNEXT_DEVICE_GUARD(input);
  const at::MemoryFormat fmt = format_of(input);
  at::Tensor output = at::empty(p.output_sizes(), input.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  // Dense in the input's own format: channels_last stays channels_last (strided kernels).
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor w = dense_filter(weight);
  // Two forms (conv_dispatch.h): bias only (no multiply), or scale and shift.
  TORCH_INTERNAL_ASSERT(epilogue.scale.defined() ? epilogue.shift.defined() : !epilogue.relu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_direct", [&] {
    const at::Tensor& b = epilogue.shift;
    if (!epilogue.scale.defined()) {
      const BiasEpilogue<scalar_t> bias{b.defined() ? b.const_data_ptr<scalar_t>() : nullptr};
      run_forward<scalar_t>(op, p, kind, split_k, x, w, output, bias);
      return;
    }
    const scalar_t* sp = epilogue.scale.const_data_ptr<scalar_t>();
    const scalar_t* hp = b.const_data_ptr<scalar_t>();
    if (epilogue.relu) {
      run_forward<scalar_t>(op, p, kind, split_k, x, w, output,
                            ScaleShiftEpilogue<scalar_t, true>{sp, hp});
    } else {
      run_forward<scalar_t>(op, p, kind, split_k, x, w, output,
                            ScaleShiftEpilogue<scalar_t, false>{sp, hp});
    }
  });
  return output;
}

// `input` is read only for grad_weight and `weight` only for grad_input: otherwise they may be
// one-element placeholders expanded to the right shape (see csrc/common/autograd.h).
ConvGrads conv2d_direct_run_backward_cuda(const char* op, const Conv2dParams& p,
                                          const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, std::array<bool, 3> output_mask,
                                          c10::string_view variant, bool tensor_cores) {
  const DirectVariant kind = parse_direct_variant(op, variant);
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
        const bool tc =
            tensor_cores && igemm && tile_of(kind) == IgemmTile::kAuto && tc_supported<scalar_t>(p);
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
              op, input_grad_geometry(p, go, grad_input), go.const_data_ptr<scalar_t>(),
              wc.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
              BiasEpilogue<scalar_t>{});
        }
        if (wgrad_ok) {
          tc ? run_tc_wgrad<scalar_t>(wgrad, ws) : run_wgrad<scalar_t>(wgrad, ws);
        } else if (output_mask[1]) {
          conv2d_direct_grad_weight_naive_launch<scalar_t>(
              op, weight_grad_geometry(p, x, go), go.const_data_ptr<scalar_t>(),
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

// ---- the ops: plan (validate, parse), then run through the convolution dispatch --------------

at::Tensor conv2d_direct_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, c10::string_view variant,
                                      int64_t max_col_bytes) {
  const Conv2dParams p = conv2d_params(kForwardOp, input, weight, bias, stride, padding, dilation,
                                       groups, /*allow_reduced=*/true);
  parse_direct_variant(kForwardOp, variant);
  check_max_col_bytes(kForwardOp, max_col_bytes);
  return conv_forward_cuda(kForwardOp, p, input, weight,
                           {ConvAlgo::kDirect, variant, max_col_bytes}, ConvEpilogue::bias(bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_direct_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view variant, int64_t max_col_bytes) {
  const Conv2dParams p = conv2d_params(kBackwardOp, input, weight, std::nullopt, stride, padding,
                                       dilation, groups, /*allow_reduced=*/true);
  parse_direct_variant(kBackwardOp, variant);
  check_max_col_bytes(kBackwardOp, max_col_bytes);
  check_conv_grad_output(kBackwardOp, p, grad_output, input);
  return conv_backward_cuda(kBackwardOp, p, grad_output, input, weight, output_mask,
                            {ConvAlgo::kDirect, variant, max_col_bytes});
}

}  // namespace cnnext

CNNEXT_CUDA_IMPL(m) {
  m.impl("conv2d_direct", &cnnext::conv2d_direct_forward_cuda);
  m.impl("conv2d_direct_backward", &cnnext::conv2d_direct_backward_cuda);
}
