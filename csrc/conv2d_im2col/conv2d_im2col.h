// The im2col + GEMM convolution's ops (registered kernels). Each plans a call (validates it)
// and runs it through the convolution dispatch (common/conv_dispatch.h); cpu.cpp and cuda.cu also
// define the dispatch's im2col engine (conv2d_im2col_run_*), which other families reach only
// through the dispatch. The CUDA functions live in cuda.cu: in the real build they take CUDA
// tensors, in the emulator build (its own extension) CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace cnnext {

at::Tensor conv2d_im2col_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, int64_t max_col_bytes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_im2col_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, int64_t max_col_bytes);

at::Tensor conv2d_im2col_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, int64_t max_col_bytes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_im2col_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, int64_t max_col_bytes);

}  // namespace cnnext

// ==== autograd ===================================================================================
// Compiled into csrc/cnnext.cpp only (CNNEXT_AUTOGRAD), which registers the forward for the
// Autograd key of conv2d_im2col (the node is csrc/common/autograd.h's, shared with the direct one).
#ifdef CNNEXT_AUTOGRAD
#include "common/autograd.h"

namespace cnnext {

struct Im2colConv {
  static constexpr const char* kForward = "conv2d_im2col";
  static constexpr const char* kBackward = "conv2d_im2col_backward";
  static constexpr const char* kNode = "Conv2dIm2colBackward";
  using Extras = std::tuple<int64_t>;  // max_col_bytes
};

}  // namespace cnnext
#endif  // CNNEXT_AUTOGRAD
