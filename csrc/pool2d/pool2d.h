// Shared by the CPU kernels (cpu.cpp) and the CUDA kernels (cuda.cu, host and device code):
// the window geometry, the window rules that must match torch bit for bit, and the plan of every
// call (validation, output sizes, output layout and allocation), which cpu.cpp and cuda.cu only
// run. Forward arguments are parsed by common/params.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common/checks.h"
#include "common/cpu_memory.h"
#include "common/params.h"

#ifdef __CUDACC__
#define CNNEXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CNNEXT_HOST_DEVICE inline
#endif

namespace cnnext::pool2d {

// Plain values, passed by value to CUDA kernels.
struct Geometry {
  int64_t c, h, w, h_out, w_out;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

inline Geometry geometry(const Pool2dParams& p) {
  return {p.c, p.h, p.w, p.h_out, p.w_out, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw};
}

// First tap of a window starting at `start` (possibly in the padding) that is not left of the
// input. Max pooling scans from here, and an all -inf window keeps this position as its argmax.
CNNEXT_HOST_DEVICE int64_t first_tap(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + (-start + dilation - 1) / dilation * dilation;
}

// One past the last tap of a window starting at `start`, clamped to the input.
CNNEXT_HOST_DEVICE int64_t end_tap(int64_t start, int64_t kernel, int64_t dilation, int64_t size) {
  return std::min(start + (kernel - 1) * dilation + 1, size);
}

// Max pooling's update, in torch's order (row-major over the window): a strictly greater value
// replaces the running maximum, so ties keep the first; a NaN always replaces it, so the last
// NaN wins and propagates.
template <typename T>
CNNEXT_HOST_DEVICE bool max_takes(T value, T best) {
  return (value > best) | (value != value);
}

// Average pooling's divisor for the window starting at (ih0, iw0), as torch computes it: the
// window is clipped to the padded input for count_include_pad, to the input otherwise.
CNNEXT_HOST_DEVICE int64_t avg_divisor(const Geometry& g, int64_t ih0, int64_t iw0,
                                       bool count_include_pad, int64_t divisor_override) {
  if (divisor_override != 0) return divisor_override;
  const int64_t ih1 = std::min(ih0 + g.kh, g.h + g.ph), iw1 = std::min(iw0 + g.kw, g.w + g.pw);
  if (count_include_pad) return (ih1 - ih0) * (iw1 - iw0);
  return (std::min(ih1, g.h) - std::max<int64_t>(ih0, 0)) *
         (std::min(iw1, g.w) - std::max<int64_t>(iw0, 0));
}

// The outputs [begin, end) along one axis whose window (kernel taps at `dilation`) can cover
// input position `i`; used by the gathering backward kernels.
CNNEXT_HOST_DEVICE void covering_outputs(int64_t i, int64_t kernel, int64_t stride, int64_t padding,
                                         int64_t dilation, int64_t out_size, int64_t* begin,
                                         int64_t* end) {
  const int64_t first = i + padding - (kernel - 1) * dilation;  // window start of the lowest
  *begin = first <= 0 ? 0 : (first + stride - 1) / stride;
  *end = std::min((i + padding) / stride + 1, out_size);
}

// ---- host-side validation of the backward ops ---------------------------------------------

// Parses the forward arguments against `input_size` (checked like a forward input) and checks
// that grad_output has the forward's output shape.
inline Pool2dParams backward_params(const char* op, const at::Tensor& grad_output,
                                    at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode, bool allow_reduced) {
  CNNEXT_CHECK(grad_output.defined(), op, "expected grad_output to be a tensor, got None");
  check_floating(op, "grad_output", grad_output, allow_reduced);
  CNNEXT_CHECK(input_size.size() == 3 || input_size.size() == 4, op,
               "expected input_size to have 3 or 4 entries, got ", input_size);
  // A meta tensor lets the forward parser validate the geometry without allocating.
  const at::Tensor shape_only = at::empty(
      input_size,
      grad_output.options().device(at::kMeta).memory_format(at::MemoryFormat::Contiguous));
  const Pool2dParams p = pool2d_params(op, shape_only, kernel_size, stride, padding, dilation,
                                       ceil_mode, allow_reduced);
  CNNEXT_CHECK(grad_output.sizes() == at::IntArrayRef(p.output_sizes()), op,
               "expected grad_output of shape ", at::IntArrayRef(p.output_sizes()),
               " (the forward output for input_size ", input_size, "), got ", grad_output.sizes());
  return p;
}

inline void check_argmax(const char* op, const at::Tensor& argmax, const at::Tensor& grad_output) {
  CNNEXT_CHECK(argmax.defined(), op, "expected argmax to be a tensor, got None");
  CNNEXT_CHECK(argmax.scalar_type() == at::kLong, op, "expected argmax to have dtype int64, got ",
               argmax.scalar_type());
  CNNEXT_CHECK(argmax.device() == grad_output.device(), op,
               "expected argmax on the same device as grad_output (", grad_output.device(),
               "), got ", argmax.device());
  CNNEXT_CHECK(argmax.sizes() == grad_output.sizes(), op,
               "expected argmax of the same shape as grad_output (", grad_output.sizes(), "), got ",
               argmax.sizes());
}

inline void check_divisor(const char* op, const std::optional<int64_t>& divisor_override) {
  CNNEXT_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
               "expected divisor_override to be non-zero, got 0");
}

// Outputs (and gradients) keep the layout of the tensor they come from, as torch's do.
inline at::MemoryFormat memory_format(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// ---- plans: everything a call needs before its kernels run --------------------------------

// Which backend runs a plan: the CPU kernels take float and double and get huge-page outputs
// (common/cpu_memory.h); the CUDA kernels (real or emulated) also take half and bfloat16.
enum class Backend { kCpu, kCuda };

inline at::Tensor allocate(Backend backend, at::IntArrayRef sizes,
                           const at::TensorOptions& options) {
  return backend == Backend::kCpu ? empty_output(sizes, options) : at::empty(sizes, options);
}

// A forward call: the geometry, the layout (the input's), the outputs allocated in it, and the
// input dense in it (undefined when there is nothing to compute).
struct ForwardPlan {
  Pool2dParams p;
  Geometry g;
  bool channels_last = false;
  at::Tensor output, argmax;  // argmax: max pooling only
  at::Tensor input;
  bool empty() const { return output.numel() == 0; }
};

// A backward call: the geometry, the layout (grad_output's), grad_input allocated in it, and
// grad_output (and argmax) dense in it (undefined when grad_input is empty).
struct BackwardPlan {
  Pool2dParams p;
  Geometry g;
  bool channels_last = false;
  at::Tensor grad_input;
  at::Tensor grad_output, argmax;
  bool empty() const { return grad_input.numel() == 0; }
};

inline ForwardPlan plan_forward(Backend backend, const Pool2dParams& p, const at::Tensor& input,
                                bool with_argmax) {
  ForwardPlan plan;
  plan.p = p;
  plan.g = geometry(p);
  const at::MemoryFormat fmt = memory_format(input);
  plan.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  plan.output = allocate(backend, p.output_sizes(), input.options().memory_format(fmt));
  if (with_argmax) {
    plan.argmax =
        allocate(backend, p.output_sizes(), input.options().dtype(at::kLong).memory_format(fmt));
  }
  if (!plan.empty()) plan.input = input.contiguous(fmt);
  return plan;
}

inline BackwardPlan plan_backward(Backend backend, const Pool2dParams& p,
                                  const at::Tensor& grad_output, at::IntArrayRef input_size,
                                  const at::Tensor& argmax) {
  BackwardPlan plan;
  plan.p = p;
  plan.g = geometry(p);
  const at::MemoryFormat fmt = memory_format(grad_output);
  plan.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  plan.grad_input = allocate(backend, input_size, grad_output.options().memory_format(fmt));
  if (plan.empty()) return plan;
  plan.grad_output = grad_output.contiguous(fmt);
  if (argmax.defined()) plan.argmax = argmax.contiguous(fmt);
  return plan;
}

inline ForwardPlan plan_max_forward(Backend backend, const at::Tensor& input,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    bool ceil_mode) {
  const Pool2dParams p = pool2d_params("max_pool2d_with_argmax", input, kernel_size, stride,
                                       padding, dilation, ceil_mode, backend == Backend::kCuda);
  return plan_forward(backend, p, input, /*with_argmax=*/true);
}

inline BackwardPlan plan_max_backward(Backend backend, const at::Tensor& grad_output,
                                      const at::Tensor& argmax, at::IntArrayRef input_size,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      bool ceil_mode) {
  const char* op = "max_pool2d_backward";
  const Pool2dParams p = backward_params(op, grad_output, input_size, kernel_size, stride, padding,
                                         dilation, ceil_mode, backend == Backend::kCuda);
  check_argmax(op, argmax, grad_output);
  return plan_backward(backend, p, grad_output, input_size, argmax);
}

// Average pooling has no dilation.
constexpr int64_t kNoDilation[2] = {1, 1};

inline ForwardPlan plan_avg_forward(Backend backend, const at::Tensor& input,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, bool ceil_mode,
                                    const std::optional<int64_t>& divisor_override) {
  const char* op = "avg_pool2d";
  const Pool2dParams p = pool2d_params(op, input, kernel_size, stride, padding, kNoDilation,
                                       ceil_mode, backend == Backend::kCuda);
  check_divisor(op, divisor_override);
  return plan_forward(backend, p, input, /*with_argmax=*/false);
}

inline BackwardPlan plan_avg_backward(Backend backend, const at::Tensor& grad_output,
                                      at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      bool ceil_mode,
                                      const std::optional<int64_t>& divisor_override) {
  const char* op = "avg_pool2d_backward";
  const Pool2dParams p = backward_params(op, grad_output, input_size, kernel_size, stride, padding,
                                         kNoDilation, ceil_mode, backend == Backend::kCuda);
  check_divisor(op, divisor_override);
  return plan_backward(backend, p, grad_output, input_size, at::Tensor());
}

}  // namespace cnnext::pool2d

// ==== autograd ===================================================================================
// Compiled into csrc/cnnext.cpp only (CNNEXT_AUTOGRAD), which registers these forwards for the
// Autograd key of the ops (see csrc/common/autograd.h).
#ifdef CNNEXT_AUTOGRAD
#include <tuple>
#include <vector>

#include "common/autograd.h"

namespace cnnext::pool2d {

using MaxPoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef,
                                                      at::IntArrayRef, at::IntArrayRef,
                                                      at::IntArrayRef, bool);
using MaxPoolBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                      at::IntArrayRef, bool);
using AvgPoolSig = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                              bool, bool, std::optional<int64_t>);
using AvgPoolBackwardSig = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, bool, bool,
                                      std::optional<int64_t>);

// Saves the argmax; backward scatters the gradient through it (the op gathers on CUDA).
struct MaxPool2dBackward : autograd::CompiledNode<MaxPool2dBackward> {
  autograd::SavedVariable argmax;
  std::vector<int64_t> input_size, output_stride, kernel_size, stride, padding, dilation;
  bool ceil_mode = false;

  template <typename Self, typename F>
  static void visit(Self& s, F&& f) {
    f(s.argmax), f(s.input_size), f(s.output_stride), f(s.kernel_size), f(s.stride);
    f(s.padding), f(s.dilation), f(s.ceil_mode);
  }

  std::string name() const override { return "MaxPool2dBackward"; }
  autograd::variable_list run(autograd::variable_list&& grads,
                              c10::ArrayRef<bool> /*needs: input's, the only edge*/) const {
    if (!grads[0].defined()) return {at::Tensor()};
    static const auto op = autograd::find_op<MaxPoolBackwardSig>("max_pool2d_backward");
    return {autograd::call_backward(op, autograd::like_output(grads[0], output_stride),
                                    argmax.unpack(), input_size, kernel_size, stride, padding,
                                    dilation, ceil_mode)};
  }
};

inline std::tuple<at::Tensor, at::Tensor> max_pool2d_with_argmax_autograd(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  static const auto op = autograd::find_op<MaxPoolSig>("max_pool2d_with_argmax");
  if (!autograd::wants_grad("max_pool2d_with_argmax", input)) {
    return autograd::call_below_autograd(op, input, kernel_size, stride, padding, dilation,
                                         ceil_mode);
  }
  auto node = autograd::make_node<MaxPool2dBackward>(input);
  auto [output, argmax] =
      autograd::call_below_autograd(op, input, kernel_size, stride, padding, dilation, ceil_mode);
  node->argmax = autograd::save(argmax);
  node->input_size = input.sizes().vec();
  node->output_stride = output.strides().vec();
  node->kernel_size = kernel_size.vec();
  node->stride = stride.vec();
  node->padding = padding.vec();
  node->dilation = dilation.vec();
  node->ceil_mode = ceil_mode;
  autograd::finish_node(node, output);
  return {output, argmax};
}

// Saves no tensor: backward spreads each output gradient over its window.
struct AvgPool2dBackward : autograd::CompiledNode<AvgPool2dBackward> {
  std::vector<int64_t> input_size, output_stride, kernel_size, stride, padding;
  bool ceil_mode = false, count_include_pad = true;
  std::optional<int64_t> divisor_override;

  template <typename Self, typename F>
  static void visit(Self& s, F&& f) {
    f(s.input_size), f(s.output_stride), f(s.kernel_size), f(s.stride), f(s.padding);
    f(s.ceil_mode), f(s.count_include_pad), f(s.divisor_override);
  }

  std::string name() const override { return "AvgPool2dBackward"; }
  autograd::variable_list run(autograd::variable_list&& grads,
                              c10::ArrayRef<bool> /*needs: input's, the only edge*/) const {
    if (!grads[0].defined()) return {at::Tensor()};
    static const auto op = autograd::find_op<AvgPoolBackwardSig>("avg_pool2d_backward");
    return {autograd::call_backward(op, autograd::like_output(grads[0], output_stride), input_size,
                                    kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override)};
  }
};

inline at::Tensor avg_pool2d_autograd(const at::Tensor& input, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      bool ceil_mode, bool count_include_pad,
                                      std::optional<int64_t> divisor_override) {
  static const auto op = autograd::find_op<AvgPoolSig>("avg_pool2d");
  if (!autograd::wants_grad("avg_pool2d", input)) {
    return autograd::call_below_autograd(op, input, kernel_size, stride, padding, ceil_mode,
                                         count_include_pad, divisor_override);
  }
  auto node = autograd::make_node<AvgPool2dBackward>(input);
  at::Tensor output = autograd::call_below_autograd(op, input, kernel_size, stride, padding,
                                                    ceil_mode, count_include_pad, divisor_override);
  node->input_size = input.sizes().vec();
  node->output_stride = output.strides().vec();
  node->kernel_size = kernel_size.vec();
  node->stride = stride.vec();
  node->padding = padding.vec();
  node->ceil_mode = ceil_mode;
  node->count_include_pad = count_include_pad;
  node->divisor_override = divisor_override;
  autograd::finish_node(node, output);
  return output;
}

}  // namespace cnnext::pool2d
#endif  // CNNEXT_AUTOGRAD
