// The direct convolution's ops (registered kernels). Each plans a call (validates it, parses the
// variant) and runs it through the convolution dispatch (common/conv_dispatch.h); cpu.cpp and
// cuda.cu also define the dispatch's direct engine (conv2d_direct_run_*), which other families
// reach only through the dispatch. The CUDA functions live in cuda.cu: in the real build they take
// CUDA tensors, in the emulator build (its own extension) CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace cnnext {

at::Tensor conv2d_direct_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, c10::string_view variant,
                                     int64_t max_col_bytes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_direct_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view variant, int64_t max_col_bytes);

at::Tensor conv2d_direct_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, c10::string_view variant,
                                      int64_t max_col_bytes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_direct_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view variant, int64_t max_col_bytes);

}  // namespace cnnext

// ==== autograd ===================================================================================
// Compiled into csrc/cnnext.cpp only (CNNEXT_AUTOGRAD), which registers the forward for the
// Autograd key of conv2d_direct (the node is csrc/common/autograd.h's, shared with im2col).
#ifdef CNNEXT_AUTOGRAD
#include <string>

#include "common/autograd.h"

namespace cnnext {

struct DirectConv {
  static constexpr const char* kForward = "conv2d_direct";
  static constexpr const char* kBackward = "conv2d_direct_backward";
  static constexpr const char* kNode = "Conv2dDirectBackward";
  // The CUDA kernel variant; the bound on the CPU backward's non-finite fallback's im2col buffers.
  using Extras = std::tuple<c10::string_view, int64_t>;
};

}  // namespace cnnext
#endif  // CNNEXT_AUTOGRAD
