// The one convolution dispatch: which engine runs a convolution (the direct kernels of
// csrc/conv2d_direct or im2col + GEMM of csrc/conv2d_im2col), with which epilogue in its store,
// within which workspace. The convolution ops (conv2d_direct, conv2d_im2col, conv_bn_relu) plan
// a call (validate it, parse the algorithm) and run it through conv_forward_* / conv_backward_*;
// they include this header, not each other's. The engines' entry points below take a call that
// is already validated; each family's cpu.cpp / cuda.cu defines its own. The CUDA functions take
// CUDA tensors in the real build and CPU tensors in the emulator build (its own extension).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/params.h"

namespace cnnext {

// cnnext.ops' default bound on an im2col column buffer (set_im2col_workspace_limit), and the
// bound of calls whose schema has no max_col_bytes (the direct op's non-finite fallback).
constexpr int64_t kDefaultMaxColBytes = int64_t(64) << 20;

// What the store computes from a convolution's accumulator: acc * scale[c] + shift[c], then
// max(0, .) with `relu` (NaN kept, as torch.relu does). The plain convolution's epilogue is
// bias(): acc + bias[c] with no multiply, so its results are those of a convolution without an
// epilogue. Tensors: the input's dtype and device, length C_out, contiguous.
struct ConvEpilogue {
  at::Tensor scale;  // undefined: no multiply
  at::Tensor shift;  // undefined: no addition
  bool relu = false;

  static ConvEpilogue bias(const std::optional<at::Tensor>& b) {
    ConvEpilogue e;
    if (b.has_value() && b->defined()) e.shift = b->contiguous();
    return e;
  }
  // BatchNorm folded into the store (conv_bn_relu): both tensors given.
  static ConvEpilogue affine(const at::Tensor& scale, const at::Tensor& shift, bool relu) {
    ConvEpilogue e;
    e.scale = scale.contiguous();
    e.shift = shift.contiguous();
    e.relu = relu;
    return e;
  }
};

enum class ConvAlgo { kAuto, kDirect, kIm2col };

inline ConvAlgo parse_conv_algo(const char* op, c10::string_view algo) {
  if (algo == "auto") return ConvAlgo::kAuto;
  if (algo == "direct") return ConvAlgo::kDirect;
  if (algo == "im2col") return ConvAlgo::kIm2col;
  CNNEXT_CHECK(false, op, "expected algo to be 'auto', 'direct' or 'im2col', got '",
               std::string(algo), "'");
  return ConvAlgo::kAuto;
}

inline void check_max_col_bytes(const char* op, int64_t max_col_bytes) {
  CNNEXT_CHECK(max_col_bytes > 0, op, "expected max_col_bytes to be positive, got ", max_col_bytes);
}

// The rule "auto" follows, the same as cnnext._algo.choose (which cnnext.ops and cnnext.nn use
// before they call an op; this serves direct calls of the ops with algo="auto") with gradients
// to compute: an op cannot know whether a backward will follow, and its backward must rerun the
// forward's algorithm (the fused eval backward recomputes the ReLU mask from it).
// tests/test_algo_rule.py holds the two to the same choices.
// CPU (measured): the direct kernel for grouped layers and for unstrided planes of at least 256
// output pixels with 8 or more input channels per group, or of at least 512 over the batch for
// float32 with 16 or more (the register-blocked kernel); im2col for 1x1 kernels, small planes,
// strided layers (_algo: the direct backward loses there) and first layers. CUDA (reasoned): im2col
// (cuBLAS) only where it is a plain GEMM on the input (1x1, stride 1, no padding, ungrouped, 32 or
// more channels in and out); the direct kernel otherwise.
constexpr int64_t kCpuDirectMinPixels = 256;    // _algo.CPU_DIRECT_MIN_PIXELS
constexpr int64_t kCpuDirectMinChannels = 8;    // _algo.CPU_DIRECT_MIN_CHANNELS
constexpr int64_t kCpuBlockedMinPixels = 512;   // _algo.CPU_BLOCKED_MIN_PIXELS
constexpr int64_t kCpuBlockedMinChannels = 16;  // _algo.CPU_DIRECT_NOGRAD_MIN_CHANNELS
constexpr int64_t kCudaIm2colMinChannels = 32;  // _algo.CUDA_IM2COL_MIN_CHANNELS

inline ConvAlgo resolve_conv_algo(ConvAlgo algo, const Conv2dParams& p, bool cuda) {
  if (algo != ConvAlgo::kAuto) return algo;
  const bool pointwise = p.kh == 1 && p.kw == 1;
  if (cuda) {
    const bool plain_gemm = pointwise && p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0 &&
                            p.groups == 1 && p.c_in >= kCudaIm2colMinChannels &&
                            p.c_out >= kCudaIm2colMinChannels;
    return plain_gemm ? ConvAlgo::kIm2col : ConvAlgo::kDirect;
  }
  if (p.groups > 1) return ConvAlgo::kDirect;
  if (pointwise || p.sh > 1 || p.sw > 1 || p.c_in_per_group() < kCpuDirectMinChannels)
    return ConvAlgo::kIm2col;
  const bool blocked = p.dtype == at::kFloat && p.c_in_per_group() >= kCpuBlockedMinChannels;
  const int64_t pixels = p.h_out * p.w_out;
  if (pixels >= kCpuDirectMinPixels || (blocked && p.n * pixels >= kCpuBlockedMinPixels))
    return ConvAlgo::kDirect;
  return ConvAlgo::kIm2col;
}

// How a convolution runs: the engine ("auto": the rule above), the direct kernel's variant
// (CUDA: parse_direct_variant's names; the CPU has one kernel), the bound on im2col's column
// buffers (also of the direct CPU backward's non-finite fallback, which runs im2col), and whether
// the CUDA direct forward may split K (a second launch).
struct ConvAlgorithm {
  ConvAlgo algo = ConvAlgo::kAuto;
  c10::string_view variant = "auto";
  int64_t max_col_bytes = kDefaultMaxColBytes;
  bool split_k = true;
};

using ConvGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ---- the engines: validated calls only ----------------------------------------------------------
// Forward: the output in the input's memory format. Backward: (grad_input, grad_weight,
// grad_bias), masked-off ones as empty tensors; `input` is read only for grad_weight and `weight`
// only for grad_input (the other may be a placeholder of the right shape).

at::Tensor conv2d_direct_run_forward_cpu(const Conv2dParams& p, const at::Tensor& input,
                                         const at::Tensor& weight, const ConvEpilogue& epilogue);
// Exact for finite operands only (it multiplies structural zeros): conv_backward_cpu routes the
// gradients of non-finite operands to im2col.
ConvGrads conv2d_direct_run_backward_cpu(const Conv2dParams& p, const at::Tensor& grad_output,
                                         const at::Tensor& input, const at::Tensor& weight,
                                         std::array<bool, 3> output_mask);
at::Tensor conv2d_im2col_run_forward_cpu(const Conv2dParams& p, const at::Tensor& input,
                                         const at::Tensor& weight, const ConvEpilogue& epilogue,
                                         int64_t max_col_bytes);
ConvGrads conv2d_im2col_run_backward_cpu(const Conv2dParams& p, const at::Tensor& grad_output,
                                         const at::Tensor& input, const at::Tensor& weight,
                                         std::array<bool, 3> output_mask, int64_t max_col_bytes);

// `op` names the caller in the errors the kernels may raise.
at::Tensor conv2d_direct_run_forward_cuda(const char* op, const Conv2dParams& p,
                                          const at::Tensor& input, const at::Tensor& weight,
                                          const ConvEpilogue& epilogue, c10::string_view variant,
                                          bool split_k);
// tensor_cores: half/bfloat16 may run on tensor cores (where the variant allows).
ConvGrads conv2d_direct_run_backward_cuda(const char* op, const Conv2dParams& p,
                                          const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, std::array<bool, 3> output_mask,
                                          c10::string_view variant, bool tensor_cores);
at::Tensor conv2d_im2col_run_forward_cuda(const Conv2dParams& p, const at::Tensor& input,
                                          const at::Tensor& weight, const ConvEpilogue& epilogue,
                                          int64_t max_col_bytes);
// grad_input and grad_bias only: on CUDA grad_weight is the direct engine's (conv_backward_cuda).
ConvGrads conv2d_im2col_run_backward_cuda(const char* op, const Conv2dParams& p,
                                          const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, std::array<bool, 3> output_mask,
                                          int64_t max_col_bytes);

// ---- the dispatch ------------------------------------------------------------------------------

// epilogue(conv(input, weight)) by the engine `algo` resolves to (csrc/common/conv_dispatch.cpp).
at::Tensor conv_forward_cpu(const Conv2dParams& p, const at::Tensor& input,
                            const at::Tensor& weight, const ConvAlgorithm& algo,
                            const ConvEpilogue& epilogue);
// The direct engine's gradients of non-finite operands (a NaN/Inf weight for grad_input, input
// for grad_weight) come from im2col, which touches real taps only, as torch does.
ConvGrads conv_backward_cpu(const Conv2dParams& p, const at::Tensor& grad_output,
                            const at::Tensor& input, const at::Tensor& weight,
                            std::array<bool, 3> output_mask, const ConvAlgorithm& algo);

// The CUDA direct kernels handle non-finite operands themselves (a block that loads one redoes
// its tile over real taps only).
inline at::Tensor conv_forward_cuda(const char* op, const Conv2dParams& p, const at::Tensor& input,
                                    const at::Tensor& weight, const ConvAlgorithm& algo,
                                    const ConvEpilogue& epilogue) {
  if (resolve_conv_algo(algo.algo, p, /*cuda=*/true) == ConvAlgo::kIm2col) {
    return conv2d_im2col_run_forward_cuda(p, input, weight, epilogue, algo.max_col_bytes);
  }
  return conv2d_direct_run_forward_cuda(op, p, input, weight, epilogue, algo.variant, algo.split_k);
}

// im2col's grad_weight (and then grad_bias) is the direct engine's implicit-GEMM wgrad on CUDA
// cores: one GEMM over every pixel of every sample, split over K. In NCHW an unfolded sample's
// pixels are the columns of its own matrix, so im2col would need a GEMM per sample or transposed
// copies of the input and grad_output.
inline ConvGrads conv_backward_cuda(const char* op, const Conv2dParams& p,
                                    const at::Tensor& grad_output, const at::Tensor& input,
                                    const at::Tensor& weight, std::array<bool, 3> output_mask,
                                    const ConvAlgorithm& algo) {
  if (resolve_conv_algo(algo.algo, p, /*cuda=*/true) == ConvAlgo::kDirect) {
    return conv2d_direct_run_backward_cuda(op, p, grad_output, input, weight, output_mask,
                                           algo.variant, /*tensor_cores=*/true);
  }
  ConvGrads wgrad;
  if (output_mask[1]) {
    wgrad = conv2d_direct_run_backward_cuda(op, p, grad_output, input, weight,
                                            {false, true, output_mask[2]}, "implicit_gemm",
                                            /*tensor_cores=*/false);
  }
  ConvGrads grads = conv2d_im2col_run_backward_cuda(
      op, p, grad_output, input, weight, {output_mask[0], false, output_mask[2] && !output_mask[1]},
      algo.max_col_bytes);
  if (output_mask[1]) {
    std::get<1>(grads) = std::get<1>(wgrad);
    if (output_mask[2]) std::get<2>(grads) = std::get<2>(wgrad);
  }
  return grads;
}

// The backward ops' shared check: grad_output matches input and the forward's output shape.
inline void check_conv_grad_output(const char* op, const Conv2dParams& p,
                                   const at::Tensor& grad_output, const at::Tensor& input) {
  check_same(op, "grad_output", grad_output, "input", input);
  CNNEXT_CHECK(grad_output.sizes() == at::IntArrayRef(p.output_sizes()), op,
               "expected grad_output of shape ", at::IntArrayRef(p.output_sizes()), ", got ",
               grad_output.sizes());
}

}  // namespace cnnext
