// Autocast for the convolution forward ops (conv2d_direct, conv2d_im2col, conv_bn_relu), with
// torch's policy for its own conv2d (the lower-precision list): floating tensor arguments other
// than float64 are cast to the autocast dtype (cached_cast, which caches the casts of leaf
// weights as torch does), then the op runs again below the autocast key. Backward needs no rule:
// autograd records the casts, so parameter gradients come back in the parameters' dtype.
// Registered where the kernels take half and bfloat16: AutocastCUDA for cnnext, AutocastCPU for
// cnnext_emu (the emulated CUDA kernels serve CPU tensors). cnnext's CPU kernels are float and
// double only, so CPU autocast leaves them alone (they run in the input's dtype). Pools get no
// rule (torch has none: they run in the input's dtype).
//
// conv_bn_relu as eager conv -> batch_norm -> relu under autocast: the convolution's operands go
// to the autocast dtype while batch norm keeps float32 parameters and running statistics. The
// affine parameters are cast (autograd turns their gradients back into float32); float32 running
// statistics are updated here, in float32, from the batch statistics the op returns in float
// (training), or read as a cast copy (eval), since the op takes them in the input's dtype.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/library.h"

namespace cnnext {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  const std::string qualified = std::string(CNNEXT_NS_NAME "::") + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Sig>();
}

// The autocast dtype of kDevice, and the cast of one argument to it.
template <c10::DeviceType kDevice>
at::ScalarType lower_type() {
  return at::autocast::get_lower_precision_fp_from_device_type(kDevice);
}
template <c10::DeviceType kDevice, typename T>
auto to_lower(const T& arg) {
  return at::autocast::cached_cast(lower_type<kDevice>(), arg, kDevice);
}

// Keeps the autocast kernels from running again for the ops called inside them.
template <c10::DeviceType kDevice>
struct BelowAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice)};
};

// ---- conv2d_direct, conv2d_im2col ----

// Extra...: the arguments after groups (direct: variant, max_col_bytes; im2col: max_col_bytes).
template <typename... Extra>
using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, Extra...);

template <c10::DeviceType kDevice, typename... Extra>
at::Tensor conv_autocast(const char* name, const at::Tensor& input, const at::Tensor& weight,
                         const OptionalTensor& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         Extra... extra) {
  BelowAutocast<kDevice> below;
  return find_op<ConvSig<Extra...>>(name).call(to_lower<kDevice>(input), to_lower<kDevice>(weight),
                                               to_lower<kDevice>(bias), stride, padding, dilation,
                                               groups, extra...);
}

template <c10::DeviceType kDevice>
at::Tensor conv2d_direct_autocast(const at::Tensor& input, const at::Tensor& weight,
                                  const OptionalTensor& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  c10::string_view variant, int64_t max_col_bytes) {
  return conv_autocast<kDevice, c10::string_view, int64_t>("conv2d_direct", input, weight, bias,
                                                           stride, padding, dilation, groups,
                                                           variant, max_col_bytes);
}

template <c10::DeviceType kDevice>
at::Tensor conv2d_im2col_autocast(const at::Tensor& input, const at::Tensor& weight,
                                  const OptionalTensor& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  int64_t max_col_bytes) {
  return conv_autocast<kDevice, int64_t>("conv2d_im2col", input, weight, bias, stride, padding,
                                         dilation, groups, max_col_bytes);
}

// ---- conv_bn_relu ----

using FusedOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FusedSig = FusedOutputs(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                              const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                              const OptionalTensor&, bool, double, double, at::IntArrayRef,
                              at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view, int64_t);

bool given(const OptionalTensor& t) { return t.has_value() && t->defined(); }

template <c10::DeviceType kDevice>
FusedOutputs conv_bn_relu_autocast(const at::Tensor& input, const at::Tensor& weight,
                                   const OptionalTensor& conv_bias, const OptionalTensor& bn_weight,
                                   const OptionalTensor& bn_bias,
                                   const OptionalTensor& running_mean,
                                   const OptionalTensor& running_var, bool training,
                                   double momentum, double eps, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, c10::string_view algo, int64_t max_col_bytes) {
  BelowAutocast<kDevice> below;
  static const auto op = find_op<FusedSig>("conv_bn_relu");
  const at::Tensor x = to_lower<kDevice>(input);
  const at::ScalarType dtype = x.scalar_type();
  // Running statistics the op cannot take as they are (float32 beside a half input).
  const auto apart = [&](const OptionalTensor& r) {
    return given(r) && r->scalar_type() != dtype && r->is_floating_point();
  };
  const bool mixed = apart(running_mean) || apart(running_var);
  const auto cast_copy = [&](const OptionalTensor& r) -> OptionalTensor {
    if (!given(r)) return r;
    return r->to(dtype);
  };
  const OptionalTensor none;
  FusedOutputs out =
      op.call(x, to_lower<kDevice>(weight), to_lower<kDevice>(conv_bias),
              to_lower<kDevice>(bn_weight), to_lower<kDevice>(bn_bias),
              !mixed     ? running_mean
              : training ? none
                         : cast_copy(running_mean),
              !mixed     ? running_var
              : training ? none
                         : cast_copy(running_var),
              training, momentum, eps, stride, padding, dilation, groups, algo, max_col_bytes);
  if (mixed && training && std::get<0>(out).numel() > 0) {
    // nn.BatchNorm2d's update in the buffers' dtype, from the batch mean and unbiased variance
    // (float for a half or bfloat16 input); an empty batch leaves them as they are.
    at::NoGradGuard no_grad;
    const auto update = [&](const OptionalTensor& r, const at::Tensor& batch) {
      if (!given(r)) return;
      const at::Tensor b = batch.detach().to(r->scalar_type());
      r->copy_(b * momentum + *r * (1.0 - momentum));
    };
    update(running_mean, std::get<1>(out));
    update(running_var, std::get<3>(out));
  }
  return out;
}

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  m.impl("conv2d_direct", TORCH_FN(conv2d_direct_autocast<kDevice>));
  m.impl("conv2d_im2col", TORCH_FN(conv2d_im2col_autocast<kDevice>));
  m.impl("conv_bn_relu", TORCH_FN(conv_bn_relu_autocast<kDevice>));
}

}  // namespace
}  // namespace cnnext

#ifdef CNNEXT_CUDA_EMULATION
// The emulated CUDA kernels take half and bfloat16 CPU tensors: CPU autocast applies to them.
CNNEXT_LIBRARY_IMPL_EXPAND(CNNEXT_NS, AutocastCPU, m) {
  cnnext::register_autocast<c10::DeviceType::CPU>(m);
}
#else
CNNEXT_LIBRARY_IMPL_EXPAND(CNNEXT_NS, AutocastCUDA, m) {
  cnnext::register_autocast<c10::DeviceType::CUDA>(m);
}
#endif
