// im2col + GEMM convolution on CUDA. im2col_kernel unfolds a chunk of samples (bounded by
// max_col_bytes) into col[n][(c, ki, kj)][pixel] (channels_last: col[n, pixel][(g, ki, kj, c)]),
// cuBLAS multiplies it by the weight on the current stream, and grad_input gathers dcol back with
// col2im_kernel. grad_weight and grad_bias come from the direct engine's implicit-GEMM wgrad (one
// GEMM over all samples, no layout copies), which the convolution dispatch runs beside this
// engine's grad_input (common/conv_dispatch.h). 1D grid-stride
// launches of 256 threads: in im2col/col2im a thread owns one (sample, channel, pixel) and its
// kh*kw column entries; in grad_bias_kernel a block owns one output channel and reduces it in
// shared memory in a fixed order (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/conv_dispatch.h"
#include "common/cuda_compat.cuh"
#include "common/gemm.cuh"
#include "common/params.h"
#include "conv2d_im2col/conv2d_im2col.h"

namespace cnnext {
namespace {

constexpr const char* kForward = "conv2d_im2col";
constexpr const char* kBackward = "conv2d_im2col_backward";
constexpr unsigned int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this

// Geometry the kernels need, passed by value.
struct ConvGeom {
  int64_t c_in, h, w, kh, kw, sh, sw, ph, pw, dh, dw, groups, h_out, w_out;
};

ConvGeom geom_of(const Conv2dParams& p) {
  return {p.c_in, p.h,  p.w,  p.kh, p.kw,     p.sh,    p.sw,
          p.ph,   p.pw, p.dh, p.dw, p.groups, p.h_out, p.w_out};
}

int64_t round_up_16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

dim3 grid_for(int64_t work) {
  return dim3(
      static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(work, kThreads), 1, kMaxBlocks)));
}

// Columns of `samples` samples: a thread reads one input channel at one output pixel for each of
// the kh*kw taps (zero outside the input) and writes the kh*kw column entries.
template <typename scalar_t, bool channels_last>
__global__ void im2col_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ col,
                              ConvGeom g, int64_t samples) {
  const int64_t pix = g.h_out * g.w_out, cg = g.c_in / g.groups, gk = g.c_in * g.kh * g.kw;
  const int64_t total = samples * g.c_in * pix;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    // Thread order: (n, c, pixel) for NCHW (coalesced along pixels), (n, pixel, c) for NHWC.
    int64_t n, c, q;
    if constexpr (channels_last) {
      c = i % g.c_in;
      q = (i / g.c_in) % pix;
      n = i / (g.c_in * pix);
    } else {
      q = i % pix;
      c = (i / pix) % g.c_in;
      n = i / (pix * g.c_in);
    }
    const int64_t oh = q / g.w_out, ow = q % g.w_out;
    const int64_t grp = c / cg, cc = c % cg;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t iw = ow * g.sw - g.pw + kj * g.dw;
        const bool inside = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
        scalar_t v = scalar_t(0);
        int64_t dst;
        if constexpr (channels_last) {
          if (inside) v = x[((n * g.h + ih) * g.w + iw) * g.c_in + c];
          dst = (n * pix + q) * gk + ((grp * g.kh + ki) * g.kw + kj) * cg + cc;
        } else {
          if (inside) v = x[((n * g.c_in + c) * g.h + ih) * g.w + iw];
          dst = ((n * g.c_in + c) * g.kh * g.kw + ki * g.kw + kj) * pix + q;
        }
        col[dst] = v;
      }
    }
  }
}

// Gather: each input element sums the column entries that read it, so no atomics are needed.
template <typename scalar_t, bool channels_last>
__global__ void col2im_kernel(const scalar_t* __restrict__ col, scalar_t* __restrict__ dx,
                              ConvGeom g, int64_t samples) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t pix = g.h_out * g.w_out, cg = g.c_in / g.groups, gk = g.c_in * g.kh * g.kw;
  const int64_t in_pix = g.h * g.w, total = samples * g.c_in * in_pix;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t n, c, r;
    if constexpr (channels_last) {
      c = i % g.c_in;
      r = (i / g.c_in) % in_pix;
      n = i / (g.c_in * in_pix);
    } else {
      r = i % in_pix;
      c = (i / in_pix) % g.c_in;
      n = i / (in_pix * g.c_in);
    }
    const int64_t ih = r / g.w, iw = r % g.w, grp = c / cg, cc = c % cg;
    acc_t sum = 0;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t oh_s = ih + g.ph - ki * g.dh;
      if (oh_s < 0 || oh_s % g.sh != 0 || oh_s / g.sh >= g.h_out) continue;
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t ow_s = iw + g.pw - kj * g.dw;
        if (ow_s < 0 || ow_s % g.sw != 0 || ow_s / g.sw >= g.w_out) continue;
        const int64_t q = (oh_s / g.sh) * g.w_out + ow_s / g.sw;
        const int64_t src = channels_last
                                ? (n * pix + q) * gk + ((grp * g.kh + ki) * g.kw + kj) * cg + cc
                                : ((n * g.c_in + c) * g.kh * g.kw + ki * g.kw + kj) * pix + q;
        sum += static_cast<acc_t>(col[src]);
      }
    }
    dx[i] = static_cast<scalar_t>(sum);
  }
}

// y[n, c, pixel] = y * scale[c] + bias[c] (either may be null: 1, 0), then max(0, y) when RELU:
// the fused epilogue of conv_bn_relu. cuBLAS has no scale/ReLU epilogue (cublasLt would, but the
// GEMM wrapper and its emulator contract are plain GEMMs), so they share the bias's one pass.
// `c_stride` is 1 for NHWC storage and H_out*W_out for NCHW.
template <typename scalar_t, bool RELU>
__global__ void bias_act_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ bias,
                                const scalar_t* __restrict__ scale, int64_t total, int64_t c_out,
                                int64_t c_stride) {
  using acc_t = cuda_acc_t<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (i / c_stride) % c_out;
    acc_t v = static_cast<acc_t>(y[i]);
    if (scale != nullptr) v *= static_cast<acc_t>(scale[c]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[c]);
    if (RELU) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN, as torch.relu does
    y[i] = static_cast<scalar_t>(v);
  }
}

// W' = the filter as [C_out, kh, kw, C_in/groups] (what the channels_last GEMMs multiply by),
// from a contiguous one; thread = element of W'.
template <typename scalar_t>
__global__ void filter_to_krsc_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out,
                                      int64_t numel, int64_t channels, int64_t taps) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = i % channels, tap = (i / channels) % taps, o = i / (channels * taps);
    out[i] = w[(o * channels + c) * taps + tap];
  }
}

// grad_bias[c] = sum over (n, pixel) of dy: block c, a fixed per-thread stride and a fixed tree,
// so the sum is the same on every run.
template <typename scalar_t>
__global__ void grad_bias_kernel(const scalar_t* __restrict__ dy, scalar_t* __restrict__ db,
                                 int64_t samples, int64_t pix, int64_t n_stride, int64_t c_stride,
                                 int64_t p_stride) {
  using acc_t = cuda_acc_t<scalar_t>;
  __shared__ acc_t partial[kThreads];
  const int64_t c = blockIdx.x, total = samples * pix;
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    sum += static_cast<acc_t>(dy[(i / pix) * n_stride + c * c_stride + (i % pix) * p_stride]);
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int64_t width = blockDim.x / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) db[c] = static_cast<scalar_t>(partial[0]);
}

// ---- host -----------------------------------------------------------------------------------

struct Layout {
  int64_t p = 0;           // output pixels per sample
  int64_t k = 0;           // reduction per group, C_in/groups * kh * kw
  int64_t gk = 0;          // column entries per pixel, C_in * kh * kw
  bool pointwise = false;  // 1x1, stride 1, no padding: the input is its own column buffer
};

Layout layout_of(const Conv2dParams& p) {
  Layout l;
  l.p = p.h_out * p.w_out;
  l.k = p.c_in_per_group() * p.kh * p.kw;
  l.gk = p.c_in * p.kh * p.kw;
  l.pointwise = p.kh == 1 && p.kw == 1 && p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0;
  return l;
}

int64_t samples_per_chunk(const Conv2dParams& p, const Layout& l, int64_t max_col_bytes,
                          int64_t elem_size) {
  if (l.pointwise) return std::max<int64_t>(p.n, 1);
  const int64_t per_sample = std::max<int64_t>(1, l.gk * l.p * elem_size);
  return std::clamp<int64_t>(max_col_bytes / per_sample, 1, std::max<int64_t>(p.n, 1));
}

template <typename scalar_t>
void im2col(const Conv2dParams& p, bool cl, const scalar_t* x, scalar_t* col, int64_t samples) {
  const int64_t work = samples * p.c_in * p.h_out * p.w_out;
  if (cl) {
    CNNEXT_LAUNCH((im2col_kernel<scalar_t, true>), grid_for(work), kThreads, 0, current_stream(), x,
                  col, geom_of(p), samples);
  } else {
    CNNEXT_LAUNCH((im2col_kernel<scalar_t, false>), grid_for(work), kThreads, 0, current_stream(),
                  x, col, geom_of(p), samples);
  }
}

template <typename scalar_t>
void col2im(const Conv2dParams& p, bool cl, const scalar_t* col, scalar_t* dx, int64_t samples) {
  const int64_t work = samples * p.c_in * p.h * p.w;
  if (cl) {
    CNNEXT_LAUNCH((col2im_kernel<scalar_t, true>), grid_for(work), kThreads, 0, current_stream(),
                  col, dx, geom_of(p), samples);
  } else {
    CNNEXT_LAUNCH((col2im_kernel<scalar_t, false>), grid_for(work), kThreads, 0, current_stream(),
                  col, dx, geom_of(p), samples);
  }
}

// Y[n0 : n0+nb] = W . col for NCHW storage: per sample and group, row-major
// Y_g[cog, P] = W_g[cog, K] . col_g[K, P], i.e. column-major Y_g^T = col_g^T . W_g^T with no
// transposes. Batched over samples (looping groups) or over groups (looping samples), whichever
// loop is shorter. Also computes dcol = W^T . dY when `transposed` (see backward).
template <typename scalar_t>
void gemm_nchw(const Conv2dParams& p, const Layout& l, int64_t nb, const scalar_t* w,
               const scalar_t* in, scalar_t* out, bool transposed) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t cog = p.c_out_per_group();
  // Forward: in = col [nb, G, K, P], out = Y [nb, G, cog, P].
  // Backward (transposed): in = dY [nb, G, cog, P], out = dcol [nb, G, K, P], and
  // dcol_g[K, P] = W_g^T . dY_g, i.e. column-major dcol_g^T = dY_g^T . W_g ('t' on W).
  const int64_t in_g = (transposed ? cog : l.k) * l.p, out_g = (transposed ? l.k : cog) * l.p;
  const int64_t n_cols = transposed ? l.k : cog, depth = transposed ? cog : l.k;
  const char tb = transposed ? 't' : 'n';
  if (p.groups <= nb) {
    for (int64_t g = 0; g < p.groups; ++g) {
      gemm_strided_batched<scalar_t>('n', tb, l.p, n_cols, depth, acc_t(1), in + g * in_g, l.p,
                                     p.groups * in_g, w + g * cog * l.k, l.k, 0, acc_t(0),
                                     out + g * out_g, l.p, p.groups * out_g, nb);
    }
  } else {
    for (int64_t n = 0; n < nb; ++n) {
      gemm_strided_batched<scalar_t>('n', tb, l.p, n_cols, depth, acc_t(1),
                                     in + n * p.groups * in_g, l.p, in_g, w, l.k, cog * l.k,
                                     acc_t(0), out + n * p.groups * out_g, l.p, out_g, p.groups);
    }
  }
}

}  // namespace

at::Tensor conv2d_im2col_run_forward_cuda(const Conv2dParams& p, const at::Tensor& input,
                                          const at::Tensor& weight, const ConvEpilogue& epilogue,
                                          int64_t max_col_bytes) {
  CNNEXT_DEVICE_GUARD(input);
  const bool cl = is_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output = at::empty(p.output_sizes(), input.options().memory_format(fmt));
  if (p.n == 0) return output;
  const at::Tensor x = (p.batched ? input : input.unsqueeze(0)).contiguous(fmt);
  // channels_last multiplies by W' = weight as [C_out, kh, kw, C_in/groups].
  const at::Tensor w = cl ? weight.permute({0, 2, 3, 1}).contiguous() : weight.contiguous();
  const at::Tensor& b = epilogue.shift;
  const at::Tensor& s = epilogue.scale;
  const bool has_bias = b.defined();
  const Layout l = layout_of(p);
  const int64_t chunk = samples_per_chunk(p, l, max_col_bytes, input.element_size());
  at::Tensor col_buffer = l.pointwise ? at::Tensor() : at::empty({chunk * l.gk * l.p}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_im2col_forward_cuda", [&] {
        using acc_t = cuda_acc_t<scalar_t>;
        const int64_t cog = p.c_out_per_group(), in_size = p.c_in * p.h * p.w;
        const scalar_t* wp = w.const_data_ptr<scalar_t>();
        scalar_t* y = output.mutable_data_ptr<scalar_t>();
        for (int64_t n0 = 0; n0 < p.n; n0 += chunk) {
          const int64_t nb = std::min(chunk, p.n - n0);
          const scalar_t* a = x.const_data_ptr<scalar_t>() + n0 * in_size;
          if (!l.pointwise) {
            scalar_t* col = col_buffer.mutable_data_ptr<scalar_t>();
            im2col<scalar_t>(p, cl, a, col, nb);
            a = col;
          }
          scalar_t* yc = y + n0 * p.c_out * l.p;
          if (cl) {
            // Row-major Y_g[nb*P, cog] (rows C_out apart) = col_g[nb*P, K] . W'_g[cog, K]^T is,
            // column-major, Y_g^T = op(W'_g) . col_g^T with W' read transposed ('t'); one call
            // batched over groups.
            gemm_strided_batched<scalar_t>('t', 'n', cog, nb * l.p, l.k, acc_t(1), wp, l.k,
                                           cog * l.k, a, l.gk, l.k, acc_t(0), yc, p.c_out, cog,
                                           p.groups);
          } else {
            gemm_nchw<scalar_t>(p, l, nb, wp, a, yc, false);
          }
        }
        const int64_t total = p.n * p.c_out * l.p;
        const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* sp = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;
        const int64_t c_stride = cl ? int64_t(1) : l.p;
        if (epilogue.relu) {
          CNNEXT_LAUNCH((bias_act_kernel<scalar_t, true>), grid_for(total), kThreads, 0,
                        current_stream(), y, bp, sp, total, p.c_out, c_stride);
        } else if (has_bias || sp != nullptr) {
          CNNEXT_LAUNCH((bias_act_kernel<scalar_t, false>), grid_for(total), kThreads, 0,
                        current_stream(), y, bp, sp, total, p.c_out, c_stride);
        }
      });
  return output;
}

// grad_input, and grad_bias when grad_weight is not wanted (conv_backward_cuda takes grad_weight
// and grad_bias from the direct engine's wgrad). `weight` is read only for grad_input: otherwise
// it may be a stride-0 placeholder of the right shape, used here for its metadata alone.
ConvGrads conv2d_im2col_run_backward_cuda(const char* op, const Conv2dParams& p,
                                          const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, std::array<bool, 3> output_mask,
                                          int64_t max_col_bytes) {
  TORCH_INTERNAL_ASSERT(!output_mask[1], op, ": grad_weight is the direct engine's");
  CNNEXT_DEVICE_GUARD(grad_output);
  const bool cl = is_channels_last(grad_output);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // Masked-off gradients are empty tensors of shape [0]; grad_input follows grad_output's format.
  at::Tensor grad_input = output_mask[0]
                              ? at::empty(p.input_sizes(), grad_output.options().memory_format(fmt))
                              : at::empty({0}, input.options());
  at::Tensor grad_weight =
      at::empty(output_mask[1] ? weight.sizes() : at::IntArrayRef{0}, weight.options());
  at::Tensor grad_bias = at::empty({output_mask[2] ? p.c_out : 0}, weight.options());
  if (p.n == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor dy = (p.batched ? grad_output : grad_output.unsqueeze(0)).contiguous(fmt);
  const Layout l = layout_of(p);
  const int64_t chunk = samples_per_chunk(p, l, max_col_bytes, input.element_size());
  const at::Tensor dx = output_mask[0] && !p.batched ? grad_input.unsqueeze(0) : grad_input;
  const bool need_col = !l.pointwise && output_mask[0];
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_im2col_backward_cuda", [&] {
        using acc_t = cuda_acc_t<scalar_t>;
        const int64_t cog = p.c_out_per_group(), in_size = p.c_in * p.h * p.w;
        const int64_t out_size = p.c_out * l.p;
        if (output_mask[2]) {
          CNNEXT_LAUNCH((grad_bias_kernel<scalar_t>), dim3(static_cast<unsigned int>(p.c_out)),
                        kThreads, 0, current_stream(), dy.const_data_ptr<scalar_t>(),
                        grad_bias.mutable_data_ptr<scalar_t>(), p.n, l.p, out_size,
                        cl ? int64_t(1) : l.p, cl ? p.c_out : int64_t(1));
        }
        if (!output_mask[0]) return;
        // channels_last multiplies by W' = weight as [C_out, kh, kw, C_in/groups]: the weight
        // itself when it is laid out so, else a copy made by a cnnext kernel into the workspace,
        // which also holds the column buffer.
        const at::Tensor w =
            weight.is_contiguous(at::MemoryFormat::ChannelsLast) ? weight : weight.contiguous();
        const bool copy_filter =
            cl && w.size(1) > 1 && w.size(2) * w.size(3) > 1 && w.stride(1) != 1;
        const int64_t filter_bytes =
            copy_filter ? round_up_16(w.numel() * int64_t(sizeof(scalar_t))) : 0;
        const int64_t col_bytes = need_col ? chunk * l.gk * l.p * int64_t(sizeof(scalar_t)) : 0;
        const at::Tensor ws =
            filter_bytes + col_bytes > 0
                ? at::empty({filter_bytes + col_bytes}, dy.options().dtype(at::kByte))
                : at::Tensor();
        char* base = ws.defined() ? static_cast<char*>(ws.data_ptr()) : nullptr;
        const scalar_t* wp = w.const_data_ptr<scalar_t>();
        if (copy_filter) {
          scalar_t* filter = reinterpret_cast<scalar_t*>(base);
          const at::Tensor wc = w.contiguous();
          CNNEXT_LAUNCH((filter_to_krsc_kernel<scalar_t>), grid_for(w.numel()), kThreads, 0,
                        current_stream(), wc.const_data_ptr<scalar_t>(), filter, w.numel(),
                        w.size(1), w.size(2) * w.size(3));
          wp = filter;
        }
        scalar_t* col = need_col ? reinterpret_cast<scalar_t*>(base + filter_bytes) : nullptr;
        for (int64_t n0 = 0; n0 < p.n; n0 += chunk) {
          const int64_t nb = std::min(chunk, p.n - n0);
          const scalar_t* dyc = dy.const_data_ptr<scalar_t>() + n0 * out_size;
          scalar_t* dxc = dx.mutable_data_ptr<scalar_t>() + n0 * in_size;
          scalar_t* target = l.pointwise ? dxc : col;
          if (cl) {
            // dcol_g[rows, K] = dY_g[rows, cog] . W'_g[cog, K]: column-major
            // dcol_g^T = W'_g^T . dY_g^T with no transposes, batched over groups.
            gemm_strided_batched<scalar_t>('n', 'n', l.k, nb * l.p, cog, acc_t(1), wp, l.k,
                                           cog * l.k, dyc, p.c_out, cog, acc_t(0), target, l.gk,
                                           l.k, p.groups);
          } else {
            gemm_nchw<scalar_t>(p, l, nb, wp, dyc, target, true);
          }
          if (!l.pointwise) col2im<scalar_t>(p, cl, col, dxc, nb);
        }
      });
  return {grad_input, grad_weight, grad_bias};
}

// ---- the ops: plan (validate), then run through the convolution dispatch ----------------------

at::Tensor conv2d_im2col_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, int64_t max_col_bytes) {
  const Conv2dParams p =
      conv2d_params(kForward, input, weight, bias, stride, padding, dilation, groups, true);
  check_max_col_bytes(kForward, max_col_bytes);
  ConvAlgorithm algo{ConvAlgo::kIm2col};
  algo.max_col_bytes = max_col_bytes;
  return conv_forward_cuda(kForward, p, input, weight, algo, ConvEpilogue::bias(bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_im2col_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, int64_t max_col_bytes) {
  const Conv2dParams p = conv2d_params(kBackward, input, weight, std::nullopt, stride, padding,
                                       dilation, groups, true);
  check_max_col_bytes(kBackward, max_col_bytes);
  check_conv_grad_output(kBackward, p, grad_output, input);
  ConvAlgorithm algo{ConvAlgo::kIm2col};
  algo.max_col_bytes = max_col_bytes;
  return conv_backward_cuda(kBackward, p, grad_output, input, weight, output_mask, algo);
}

}  // namespace cnnext

CNNEXT_CUDA_IMPL(m) {
  m.impl("conv2d_im2col", &cnnext::conv2d_im2col_forward_cuda);
  m.impl("conv2d_im2col_backward", &cnnext::conv2d_im2col_backward_cuda);
}
