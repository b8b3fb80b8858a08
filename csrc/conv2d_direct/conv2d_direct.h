// Host entry points of the direct convolution, for fused ops (csrc/conv_bn_relu) that reuse it
// rather than copy it. The CUDA functions live in cuda.cu: in the real build they take CUDA
// tensors, in the emulator build (its own extension) CPU tensors. Fused CUDA forwards with their
// own epilogue launch the kernels of kernels.cuh directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace cnnext {

// Fused epilogue in the output store: acc * scale[c] + bias[c] (undefined `scale`: 1), then
// max(0, .) with `relu`. `scale`: the input's dtype, length C_out.
at::Tensor conv2d_direct_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, c10::string_view variant,
                                     const at::Tensor& scale, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_direct_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view variant);

at::Tensor conv2d_direct_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, c10::string_view variant);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_direct_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view variant);

}  // namespace cnnext

// ==== autograd ===================================================================================
// Compiled into csrc/cnnext.cpp only (CNNEXT_AUTOGRAD), which registers the forward for the
// Autograd key of conv2d_direct (the node is csrc/autograd.h's, shared with im2col).
#ifdef CNNEXT_AUTOGRAD
#include <string>

#include "autograd.h"

namespace cnnext {

struct DirectConv {
  static constexpr const char* kForward = "conv2d_direct";
  static constexpr const char* kBackward = "conv2d_direct_backward";
  static constexpr const char* kNode = "Conv2dDirectBackward";
  using Extra = c10::string_view;  // the CUDA kernel variant
  using Stored = std::string;
};

}  // namespace cnnext
#endif  // CNNEXT_AUTOGRAD
