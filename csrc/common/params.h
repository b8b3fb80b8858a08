// Parse and validate convolution and pooling arguments once, for every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace cnnext {

// A (height, width) pair from an int[2] argument that may also hold a single value.
struct Pair {
  int64_t h = 0, w = 0;
};
Pair pair_arg(const char* op, const char* name, at::IntArrayRef v);

// Geometry of a 2D convolution; a 3D input is treated as a batch of one.
struct Conv2dParams {
  bool batched = true;
  int64_t n = 0, c_in = 0, h = 0, w = 0;
  int64_t c_out = 0, kh = 0, kw = 0;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, groups = 1;
  int64_t h_out = 0, w_out = 0;
  at::ScalarType dtype = at::kFloat;  // the input's

  int64_t c_in_per_group() const { return c_in / groups; }
  int64_t c_out_per_group() const { return c_out / groups; }
  // Output shape in the input's rank: [N, C_out, H_out, W_out] or [C_out, H_out, W_out].
  std::vector<int64_t> output_sizes() const;
  std::vector<int64_t> input_sizes() const;
};

// Checks ranks, dtypes, devices, channel/group consistency, bias length, positive stride and
// dilation, non-negative padding, and that the dilated kernel fits the padded input.
// `allow_reduced`: half and bfloat16 accepted (CUDA kernels).
Conv2dParams conv2d_params(const char* op, const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool allow_reduced);

// Geometry of a 2D pooling window over each (H, W) plane; 3D input is a batch of one.
struct Pool2dParams {
  bool batched = true;
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  bool ceil_mode = false;
  int64_t h_out = 0, w_out = 0;

  std::vector<int64_t> output_sizes() const;
  std::vector<int64_t> input_sizes() const;
};

// PyTorch's rule: the last window must start inside the input or its left padding.
int64_t pool_output_size(int64_t in, int64_t kernel, int64_t pad, int64_t stride, int64_t dilation,
                         bool ceil_mode);

// An empty `stride` means stride = kernel_size, as in torch.
Pool2dParams pool2d_params(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, bool ceil_mode, bool allow_reduced);

}  // namespace cnnext
