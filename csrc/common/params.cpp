#include "common/params.h"

#include "common/checks.h"

#include <algorithm>

namespace cnnext {

Pair pair_arg(const char* op, const char* name, at::IntArrayRef v) {
  CNNEXT_CHECK(v.size() == 1 || v.size() == 2, op, "expected ", name,
               " to be an int or a pair of ints, got ", v);
  return v.size() == 1 ? Pair{v[0], v[0]} : Pair{v[0], v[1]};
}

std::vector<int64_t> Conv2dParams::output_sizes() const {
  if (batched) return {n, c_out, h_out, w_out};
  return {c_out, h_out, w_out};
}

std::vector<int64_t> Conv2dParams::input_sizes() const {
  if (batched) return {n, c_in, h, w};
  return {c_in, h, w};
}

namespace {

// The dilated window extent dilation * (kernel - 1) + 1 (kernel, dilation >= 1) and the padded
// size size + 2 * pad (pad >= 0), or an error naming the op when they overflow int64: absurd
// arguments must fail, not wrap around into a plausible geometry.
int64_t window_extent(const char* op, const char* what, int64_t kernel, int64_t dilation) {
  int64_t span = 0;
  CNNEXT_CHECK(!__builtin_mul_overflow(dilation, kernel - 1, &span) && span < INT64_MAX, op,
               "expected dilation * (", what, " - 1) + 1 to fit in int64, got dilation ", dilation,
               " and ", what, " ", kernel);
  return span + 1;
}

int64_t padded_size(const char* op, int64_t size, int64_t pad) {
  int64_t padded = 0;
  CNNEXT_CHECK(pad <= INT64_MAX / 2 && !__builtin_add_overflow(size, 2 * pad, &padded), op,
               "expected input size + 2 * padding to fit in int64, got padding ", pad);
  return padded;
}

// The stride only places the windows after the first. Once it reaches the padded size there is
// one output position (already counted), the window at 0, so clamping changes no result and
// keeps the kernels' stride-sized buffers (per-phase planes) bounded by the input: a stride of
// 2^31 on a 5 x 5 input made the CPU kernels allocate and walk stride-proportional buffers.
template <typename Params>
void clamp_stride(Params& p, int64_t padded_h, int64_t padded_w) {
  p.sh = std::min(p.sh, padded_h);
  p.sw = std::min(p.sw, padded_w);
}

// A dilated window may step over the whole input and read only padding (h = 2, kernel 2,
// dilation 3, padding 1: taps at -1 and 2). Torch then returns -inf with an argmax outside the
// window (even outside the plane, which its backward follows out of bounds); no gradient can be
// right, so such arguments are rejected. With dilation 1 every window touches the input.
void check_windows_touch_input(const char* op, const char* axis, int64_t size, int64_t kernel,
                               int64_t stride, int64_t pad, int64_t dilation, int64_t out) {
  if (dilation == 1) return;
  for (int64_t o = 0; o < out; ++o) {
    const int64_t start = o * stride - pad;
    const int64_t first =
        start >= 0 ? start : start + (-start + dilation - 1) / dilation * dilation;
    CNNEXT_CHECK(first < size && (first - start) / dilation < kernel, op, "window ", o,
                 " along the ", axis, " reads only padding (input ", size, ", kernel_size ", kernel,
                 ", stride ", stride, ", padding ", pad, ", dilation ", dilation, ")");
  }
}

}  // namespace

Conv2dParams conv2d_params(const char* op, const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool allow_reduced) {
  check_dim(op, "input", input, 3, 4);
  check_dim(op, "weight", weight, 4, 4);
  check_floating(op, "input", input, allow_reduced);
  check_same(op, "weight", weight, "input", input);
  Conv2dParams p;
  p.batched = input.dim() == 4;
  p.dtype = input.scalar_type();
  const int64_t off = p.batched ? 1 : 0;
  p.n = p.batched ? input.size(0) : 1;
  p.c_in = input.size(off);
  p.h = input.size(off + 1);
  p.w = input.size(off + 2);
  p.c_out = weight.size(0);
  p.kh = weight.size(2);
  p.kw = weight.size(3);
  const Pair s = pair_arg(op, "stride", stride);
  const Pair pad = pair_arg(op, "padding", padding);
  const Pair d = pair_arg(op, "dilation", dilation);
  p.sh = s.h, p.sw = s.w, p.ph = pad.h, p.pw = pad.w, p.dh = d.h, p.dw = d.w;
  p.groups = groups;
  CNNEXT_CHECK(p.sh > 0 && p.sw > 0, op, "expected stride to be positive, got (", p.sh, ", ", p.sw,
               ")");
  CNNEXT_CHECK(p.dh > 0 && p.dw > 0, op, "expected dilation to be positive, got (", p.dh, ", ",
               p.dw, ")");
  CNNEXT_CHECK(p.ph >= 0 && p.pw >= 0, op, "expected padding to be non-negative, got (", p.ph, ", ",
               p.pw, ")");
  CNNEXT_CHECK(groups > 0, op, "expected groups to be positive, got ", groups);
  CNNEXT_CHECK(p.c_in > 0 && p.h > 0 && p.w > 0, op,
               "expected input with non-zero channels, height and width, got shape ",
               input.sizes());
  CNNEXT_CHECK(p.c_out > 0 && p.kh > 0 && p.kw > 0, op,
               "expected weight with non-zero out_channels and kernel size, got shape ",
               weight.sizes());
  CNNEXT_CHECK(p.c_in % groups == 0, op, "groups (", groups, ") must divide the input channels (",
               p.c_in, ")");
  CNNEXT_CHECK(p.c_out % groups == 0, op, "groups (", groups,
               ") must divide the output channels (weight.size(0) = ", p.c_out, ")");
  CNNEXT_CHECK(weight.size(1) * groups == p.c_in, op, "input has ", p.c_in,
               " channels but weight of shape ", weight.sizes(), " with groups = ", groups,
               " expects ", weight.size(1) * groups);
  if (bias.has_value() && bias->defined()) {
    check_same(op, "bias", *bias, "input", input);
    check_vector(op, "bias", *bias, p.c_out);
  }
  const int64_t ekh = window_extent(op, "kernel size", p.kh, p.dh);
  const int64_t ekw = window_extent(op, "kernel size", p.kw, p.dw);
  const int64_t padded_h = padded_size(op, p.h, p.ph), padded_w = padded_size(op, p.w, p.pw);
  CNNEXT_CHECK(ekh <= padded_h && ekw <= padded_w, op, "kernel size (", ekh, " x ", ekw,
               " after dilation) is larger than the padded input (", padded_h, " x ", padded_w,
               ")");
  p.h_out = (padded_h - ekh) / p.sh + 1;
  p.w_out = (padded_w - ekw) / p.sw + 1;
  clamp_stride(p, padded_h, padded_w);
  return p;
}

std::vector<int64_t> Pool2dParams::output_sizes() const {
  if (batched) return {n, c, h_out, w_out};
  return {c, h_out, w_out};
}

std::vector<int64_t> Pool2dParams::input_sizes() const {
  if (batched) return {n, c, h, w};
  return {c, h, w};
}

int64_t pool_output_size(int64_t in, int64_t kernel, int64_t pad, int64_t stride, int64_t dilation,
                         bool ceil_mode) {
  // (in + 2 * pad - extent) / stride + 1, rounded down (torch's div_rtn: the difference is
  // negative for a window larger than the input) or up, without forming any sum that could
  // overflow once the caller has checked the extent and the padded size.
  const int64_t diff = in + 2 * pad - (dilation * (kernel - 1) + 1);
  const int64_t q = diff / stride, inexact = diff % stride != 0;
  int64_t out = (diff >= 0 ? q + (ceil_mode ? inexact : 0) : q - (ceil_mode ? 0 : inexact)) + 1;
  // (out - 1) * stride >= in + pad, as a division.
  const int64_t start = in + pad;
  if (ceil_mode && out - 1 >= start / stride + (start % stride != 0)) --out;
  return out;
}

Pool2dParams pool2d_params(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, bool ceil_mode, bool allow_reduced) {
  check_dim(op, "input", input, 3, 4);
  check_floating(op, "input", input, allow_reduced);
  Pool2dParams p;
  p.batched = input.dim() == 4;
  const int64_t off = p.batched ? 1 : 0;
  p.n = p.batched ? input.size(0) : 1;
  p.c = input.size(off);
  p.h = input.size(off + 1);
  p.w = input.size(off + 2);
  CNNEXT_CHECK(p.c > 0 && p.h > 0 && p.w > 0, op,
               "expected input with non-zero channels, height and width, got shape ",
               input.sizes());
  const Pair k = pair_arg(op, "kernel_size", kernel_size);
  const Pair s = stride.empty() ? k : pair_arg(op, "stride", stride);
  const Pair pad = pair_arg(op, "padding", padding);
  const Pair d = pair_arg(op, "dilation", dilation);
  p.kh = k.h, p.kw = k.w, p.sh = s.h, p.sw = s.w, p.ph = pad.h, p.pw = pad.w, p.dh = d.h,
  p.dw = d.w;
  p.ceil_mode = ceil_mode;
  CNNEXT_CHECK(p.kh > 0 && p.kw > 0, op, "expected kernel_size to be positive, got (", p.kh, ", ",
               p.kw, ")");
  CNNEXT_CHECK(p.sh > 0 && p.sw > 0, op, "expected stride to be positive, got (", p.sh, ", ", p.sw,
               ")");
  CNNEXT_CHECK(p.dh > 0 && p.dw > 0, op, "expected dilation to be positive, got (", p.dh, ", ",
               p.dw, ")");
  CNNEXT_CHECK(p.ph >= 0 && p.pw >= 0, op, "expected padding to be non-negative, got (", p.ph, ", ",
               p.pw, ")");
  CNNEXT_CHECK(p.ph <= p.kh / 2 && p.pw <= p.kw / 2, op,
               "expected padding to be at most half of kernel_size, got padding (", p.ph, ", ",
               p.pw, ") for kernel_size (", p.kh, ", ", p.kw, ")");
  int64_t area = 0;  // bounds the average pool's divisor
  CNNEXT_CHECK(!__builtin_mul_overflow(p.kh, p.kw, &area), op,
               "expected kernel_size[0] * kernel_size[1] to fit in int64, got (", p.kh, ", ", p.kw,
               ")");
  window_extent(op, "kernel_size", p.kh, p.dh);
  window_extent(op, "kernel_size", p.kw, p.dw);
  const int64_t padded_h = padded_size(op, p.h, p.ph), padded_w = padded_size(op, p.w, p.pw);
  p.h_out = pool_output_size(p.h, p.kh, p.ph, p.sh, p.dh, ceil_mode);
  p.w_out = pool_output_size(p.w, p.kw, p.pw, p.sw, p.dw, ceil_mode);
  CNNEXT_CHECK(p.h_out >= 1 && p.w_out >= 1, op, "output size is too small: input ", p.h, " x ",
               p.w, " gives output ", p.h_out, " x ", p.w_out);
  check_windows_touch_input(op, "height", p.h, p.kh, p.sh, p.ph, p.dh, p.h_out);
  check_windows_touch_input(op, "width", p.w, p.kw, p.sw, p.pw, p.dw, p.w_out);
  clamp_stride(p, padded_h, padded_w);
  return p;
}

}  // namespace cnnext
