// The CPU side of the convolution dispatch (conv_dispatch.h): the engine choice and the direct
// engine's non-finite fallback.
#include "common/conv_dispatch.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/isfinite.h>

namespace cnnext {
namespace {

// Whether every element is finite: one pass, no allocation for dense tensors (any memory format).
bool all_finite(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return at::isfinite(t).all().item<bool>();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "all_finite", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    finite = at::parallel_reduce(
        0, t.numel(), int64_t(1) << 16, true,
        [&](int64_t begin, int64_t end, bool ok) {
          // v * 0 is 0 for finite v and NaN otherwise; 16 running sums vectorise.
          scalar_t lanes[16] = {};
          int64_t i = begin;
          for (; i + 16 <= end; i += 16) {
            for (int64_t j = 0; j < 16; ++j) lanes[j] += data[i + j] * scalar_t(0);
          }
          for (; i < end; ++i) lanes[0] += data[i] * scalar_t(0);
          scalar_t zero = 0;
          for (const scalar_t v : lanes) zero += v;
          return ok && zero == scalar_t(0);
        },
        [](bool a, bool b) { return a && b; });
  });
  return finite;
}

}  // namespace

at::Tensor conv_forward_cpu(const Conv2dParams& p, const at::Tensor& input,
                            const at::Tensor& weight, const ConvAlgorithm& algo,
                            const ConvEpilogue& epilogue) {
  if (resolve_conv_algo(algo.algo, p, /*cuda=*/false) == ConvAlgo::kIm2col) {
    return conv2d_im2col_run_forward_cpu(p, input, weight, epilogue, algo.max_col_bytes);
  }
  return conv2d_direct_run_forward_cpu(p, input, weight, epilogue);
}

ConvGrads conv_backward_cpu(const Conv2dParams& p, const at::Tensor& grad_output,
                            const at::Tensor& input, const at::Tensor& weight,
                            std::array<bool, 3> output_mask, const ConvAlgorithm& algo) {
  if (resolve_conv_algo(algo.algo, p, /*cuda=*/false) == ConvAlgo::kIm2col) {
    return conv2d_im2col_run_backward_cpu(p, grad_output, input, weight, output_mask,
                                          algo.max_col_bytes);
  }
  // The direct engine multiplies structural zeros (padding, dropped columns) by real values,
  // exact only for finite ones.
  const bool exact_input = p.n != 0 && output_mask[0] && !all_finite(weight);
  const bool exact_weight = p.n != 0 && output_mask[1] && !all_finite(input);
  if (!exact_input && !exact_weight) {
    return conv2d_direct_run_backward_cpu(p, grad_output, input, weight, output_mask);
  }
  auto exact = conv2d_im2col_run_backward_cpu(
      p, grad_output, input, weight, {exact_input, exact_weight, false}, algo.max_col_bytes);
  auto grads = conv2d_direct_run_backward_cpu(
      p, grad_output, input, weight,
      {output_mask[0] && !exact_input, output_mask[1] && !exact_weight, output_mask[2]});
  if (exact_input) std::get<0>(grads) = std::get<0>(exact);
  if (exact_weight) std::get<1>(grads) = std::get<1>(exact);
  return grads;
}

}  // namespace cnnext
