#include "common/params.h"

#include "common/checks.h"

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
  const int64_t ekh = p.dh * (p.kh - 1) + 1, ekw = p.dw * (p.kw - 1) + 1;
  CNNEXT_CHECK(ekh <= p.h + 2 * p.ph && ekw <= p.w + 2 * p.pw, op, "kernel size (", ekh, " x ", ekw,
               " after dilation) is larger than the padded input (", p.h + 2 * p.ph, " x ",
               p.w + 2 * p.pw, ")");
  p.h_out = (p.h + 2 * p.ph - ekh) / p.sh + 1;
  p.w_out = (p.w + 2 * p.pw - ekw) / p.sw + 1;
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
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // Floor division (torch's div_rtn): span may be negative for a window larger than the input.
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
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
  p.h_out = pool_output_size(p.h, p.kh, p.ph, p.sh, p.dh, ceil_mode);
  p.w_out = pool_output_size(p.w, p.kw, p.pw, p.sw, p.dw, ceil_mode);
  CNNEXT_CHECK(p.h_out >= 1 && p.w_out >= 1, op, "output size is too small: input ", p.h, " x ",
               p.w, " gives output ", p.h_out, " x ", p.w_out);
  return p;
}

}  // namespace cnnext
