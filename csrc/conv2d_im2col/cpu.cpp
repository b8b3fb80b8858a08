// im2col + GEMM convolution on the CPU: unfold each sample's receptive fields into a column
// buffer and multiply by the weight with BLAS. Contiguous input uses col[(c, ki, kj), pixel] and
// Y = W . col per sample, so the GEMM writes NCHW output in place; channels_last input uses
// col[pixel, (g, ki, kj, c)] and Y = col . W'^T over a whole chunk of samples, so the GEMM writes
// NHWC output in place. The column buffer never exceeds max_col_bytes (at least one sample), and
// a 1x1 / stride 1 / unpadded convolution multiplies the input directly.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/params.h"

// Fortran BLAS as exported by libtorch_cpu when torch is built with MKL (what ATen's own
// cpublas::gemm calls, which an extension cannot reach). Weak: a torch without these symbols
// resolves them to null and the GEMMs go through at::addmm_ on views instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace cnnext {
namespace {

constexpr const char* kForward = "conv2d_im2col";
constexpr const char* kBackward = "conv2d_im2col_backward";

// ---- GEMM -----------------------------------------------------------------------------------

// Views of a column-major matrix (rows x cols, leading dimension ld) as the row-major tensor of
// its transpose, for the at::addmm_ fallback.
template <typename scalar_t>
at::Tensor col_major_t(const scalar_t* p, char trans, int64_t rows, int64_t cols, int64_t ld) {
  // op(X) is rows x cols; its transpose as a [cols, rows] tensor.
  const bool t = trans == 't';
  auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  return at::from_blob(const_cast<scalar_t*>(p), {cols, rows},
                       t ? at::IntArrayRef{1, ld} : at::IntArrayRef{ld, 1}, options);
}

// C = alpha op(A) op(B) + beta C in column-major storage: the contract of common/gemm.cuh (and of
// BLAS), so the CPU and CUDA files issue the same calls. beta == 0 never reads C.
template <typename scalar_t>
void blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, scalar_t alpha,
               const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t beta,
               scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const bool fits = std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_ != nullptr && fits) {
      const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
      sgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
      return;
    }
  } else {
    if (dgemm_ != nullptr && fits) {
      const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
      dgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
      return;
    }
  }
  // C^T = op(B)^T op(A)^T, all as row-major views of the same storage.
  at::Tensor ct = col_major_t<scalar_t>(c, 'n', m, n, ldc);
  at::Tensor bt = col_major_t<scalar_t>(b, transb, k, n, ldb);
  at::Tensor at_ = col_major_t<scalar_t>(a, transa, m, k, lda);
  ct.addmm_(bt, at_, beta, alpha);  // beta == 0 ignores ct, as BLAS does
}

// ---- geometry -------------------------------------------------------------------------------

// Shared by forward and backward: sizes of the GEMM operands.
struct Layout {
  int64_t p = 0;           // output pixels per sample, H_out * W_out
  int64_t k = 0;           // reduction per group, C_in/groups * kh * kw
  int64_t gk = 0;          // col entries per pixel, C_in * kh * kw
  bool pointwise = false;  // 1x1, stride 1, no padding: the input is its own column buffer
};

Layout layout_of(const Conv2dParams& p) {
  Layout l;
  l.p = p.h_out * p.w_out;
  l.k = p.c_in_per_group() * p.kh * p.kw;
  l.gk = p.c_in * p.kh * p.kw;
  // Dilation does not matter for a 1x1 kernel.
  l.pointwise = p.kh == 1 && p.kw == 1 && p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0;
  return l;
}

// Samples whose columns fit in max_col_bytes (at least one, at most n).
int64_t samples_per_chunk(const Conv2dParams& p, const Layout& l, int64_t max_col_bytes,
                          int64_t elem_size) {
  const int64_t per_sample = std::max<int64_t>(1, l.gk * l.p * elem_size);
  return std::clamp<int64_t>(max_col_bytes / per_sample, 1, std::max<int64_t>(p.n, 1));
}

// Output columns [lo, hi) whose input column ow * stride + off lies inside [0, size).
inline void valid_range(int64_t off, int64_t stride, int64_t size, int64_t out, int64_t& lo,
                        int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  hi = size - off <= 0 ? 0 : (size - off + stride - 1) / stride;
  lo = std::min(lo, out);
  hi = std::clamp(hi, lo, out);
}

// ---- contiguous (NCHW) im2col / col2im: col[(c, ki, kj), (oh, ow)] of one sample -------------

template <typename scalar_t>
void im2col_nchw(const Conv2dParams& p, const scalar_t* x, scalar_t* col) {
  const int64_t kk = p.kh * p.kw, plane = p.h * p.w, pix = p.h_out * p.w_out;
  at::parallel_for(0, p.c_in * kk, std::max<int64_t>(1, 16384 / pix), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t c = r / kk, ki = (r / p.kw) % p.kh, kj = r % p.kw;
      const scalar_t* src_plane = x + c * plane;
      scalar_t* dst = col + r * pix;
      const int64_t off_w = kj * p.dw - p.pw;
      int64_t lo, hi;
      valid_range(off_w, p.sw, p.w, p.w_out, lo, hi);
      for (int64_t oh = 0; oh < p.h_out; ++oh, dst += p.w_out) {
        const int64_t ih = oh * p.sh - p.ph + ki * p.dh;
        if (ih < 0 || ih >= p.h) {
          std::fill(dst, dst + p.w_out, scalar_t(0));
          continue;
        }
        const scalar_t* src = src_plane + ih * p.w + off_w;
        std::fill(dst, dst + lo, scalar_t(0));
        if (p.sw == 1) {
          std::memcpy(dst + lo, src + lo, (hi - lo) * sizeof(scalar_t));
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * p.sw];
        }
        std::fill(dst + hi, dst + p.w_out, scalar_t(0));
      }
    }
  });
}

// Each input plane sums its own kh * kw rows of col in a fixed order: deterministic.
template <typename scalar_t>
void col2im_nchw(const Conv2dParams& p, const scalar_t* col, scalar_t* x) {
  const int64_t kk = p.kh * p.kw, plane = p.h * p.w, pix = p.h_out * p.w_out;
  at::parallel_for(0, p.c_in, std::max<int64_t>(1, 16384 / (kk * pix)), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      scalar_t* dst_plane = x + c * plane;
      std::fill(dst_plane, dst_plane + plane, scalar_t(0));
      for (int64_t ki = 0; ki < p.kh; ++ki) {
        for (int64_t kj = 0; kj < p.kw; ++kj) {
          const scalar_t* src = col + ((c * p.kh + ki) * p.kw + kj) * pix;
          const int64_t off_w = kj * p.dw - p.pw;
          int64_t lo, hi;
          valid_range(off_w, p.sw, p.w, p.w_out, lo, hi);
          for (int64_t oh = 0; oh < p.h_out; ++oh, src += p.w_out) {
            const int64_t ih = oh * p.sh - p.ph + ki * p.dh;
            if (ih < 0 || ih >= p.h) continue;
            scalar_t* dst = dst_plane + ih * p.w + off_w;
            if (p.sw == 1) {
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += src[ow];
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow * p.sw] += src[ow];
            }
          }
        }
      }
    }
  });
}

// ---- channels_last (NHWC) im2col / col2im: col[(n, oh, ow), (g, ki, kj, c)] -----------------

template <typename scalar_t>
void im2col_nhwc(const Conv2dParams& p, const scalar_t* x, scalar_t* col, int64_t samples) {
  const int64_t cg = p.c_in_per_group(), pix = p.h_out * p.w_out, gk = p.c_in * p.kh * p.kw;
  // With one group and no dilation a kernel row's kw taps are kw*C contiguous input values.
  const bool rows = p.groups == 1 && p.dw == 1;
  at::parallel_for(0, samples * pix, std::max<int64_t>(1, 16384 / gk), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = q / pix, oh = (q % pix) / p.w_out, ow = q % p.w_out;
      const scalar_t* xs = x + n * p.h * p.w * p.c_in;
      scalar_t* dst = col + q * gk;
      const int64_t iw0 = ow * p.sw - p.pw;
      for (int64_t g = 0; g < p.groups; ++g) {
        for (int64_t ki = 0; ki < p.kh; ++ki) {
          const int64_t ih = oh * p.sh - p.ph + ki * p.dh;
          if (ih < 0 || ih >= p.h) {
            std::fill(dst, dst + p.kw * cg, scalar_t(0));
            dst += p.kw * cg;
            continue;
          }
          const scalar_t* src_row = xs + ih * p.w * p.c_in + g * cg;
          if (rows && iw0 >= 0 && iw0 + p.kw <= p.w) {
            std::memcpy(dst, src_row + iw0 * p.c_in, p.kw * cg * sizeof(scalar_t));
            dst += p.kw * cg;
            continue;
          }
          for (int64_t kj = 0; kj < p.kw; ++kj, dst += cg) {
            const int64_t iw = iw0 + kj * p.dw;
            if (iw < 0 || iw >= p.w) {
              std::fill(dst, dst + cg, scalar_t(0));
            } else {
              std::memcpy(dst, src_row + iw * p.c_in, cg * sizeof(scalar_t));
            }
          }
        }
      }
    }
  });
}

// Gather: each input pixel sums the col entries that read it, in a fixed order.
template <typename scalar_t>
void col2im_nhwc(const Conv2dParams& p, const scalar_t* col, scalar_t* x, int64_t samples) {
  const int64_t cg = p.c_in_per_group(), pix = p.h_out * p.w_out, gk = p.c_in * p.kh * p.kw;
  const int64_t in_pix = p.h * p.w;
  at::parallel_for(0, samples * in_pix, std::max<int64_t>(1, 4096 / gk), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = q / in_pix, ih = (q % in_pix) / p.w, iw = q % p.w;
      scalar_t* dst = x + q * p.c_in;
      std::fill(dst, dst + p.c_in, scalar_t(0));
      for (int64_t ki = 0; ki < p.kh; ++ki) {
        const int64_t oh_s = ih + p.ph - ki * p.dh;
        if (oh_s < 0 || oh_s % p.sh != 0 || oh_s / p.sh >= p.h_out) continue;
        for (int64_t kj = 0; kj < p.kw; ++kj) {
          const int64_t ow_s = iw + p.pw - kj * p.dw;
          if (ow_s < 0 || ow_s % p.sw != 0 || ow_s / p.sw >= p.w_out) continue;
          const scalar_t* src =
              col + (n * pix + (oh_s / p.sh) * p.w_out + ow_s / p.sw) * gk + (ki * p.kw + kj) * cg;
          for (int64_t g = 0; g < p.groups; ++g) {
            const scalar_t* s = src + g * p.kh * p.kw * cg;
            scalar_t* d = dst + g * cg;
            for (int64_t c = 0; c < cg; ++c) d[c] += s[c];
          }
        }
      }
    }
  });
}

// ---- forward --------------------------------------------------------------------------------

// Slots of the column buffer for samples processed in parallel, each slot one sample's columns.
int64_t column_slots(const Conv2dParams& p, const Layout& l, int64_t max_col_bytes,
                     int64_t elem_size) {
  return std::min<int64_t>(samples_per_chunk(p, l, max_col_bytes, elem_size),
                           std::max(1, at::get_num_threads()));
}

// Runs fn(n, slot) for every sample, slots spread over threads (a slot is one thread's at a time).
template <typename F>
void for_each_sample(int64_t n, int64_t slots, const F& fn) {
  if (slots <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  at::parallel_for(0, slots, 1, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      for (int64_t i = s * n / slots; i < (s + 1) * n / slots; ++i) fn(i, s);
    }
  });
}

template <typename scalar_t>
void forward_nchw(const Conv2dParams& p, const Layout& l, const scalar_t* x, const scalar_t* w,
                  const scalar_t* bias, scalar_t* y, int64_t max_col_bytes) {
  const int64_t cog = p.c_out_per_group(), in_size = p.c_in * p.h * p.w;
  const int64_t slots = l.pointwise ? 1 : column_slots(p, l, max_col_bytes, sizeof(scalar_t));
  at::Tensor col_buffer;
  if (!l.pointwise) {
    col_buffer = at::empty({slots * l.gk * l.p},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  }
  scalar_t* col = l.pointwise ? nullptr : col_buffer.mutable_data_ptr<scalar_t>();
  for_each_sample(
      p.n, l.pointwise ? std::max(1, at::get_num_threads()) : slots, [&](int64_t n, int64_t slot) {
        const scalar_t* a = x + n * in_size;
        if (!l.pointwise) {
          scalar_t* c = col + slot * l.gk * l.p;
          im2col_nchw(p, a, c);
          a = c;
        }
        scalar_t* yn = y + n * p.c_out * l.p;
        if (bias != nullptr) {
          for (int64_t o = 0; o < p.c_out; ++o) {
            std::fill(yn + o * l.p, yn + (o + 1) * l.p, bias[o]);
          }
        }
        // Row-major Y_g[cog, P] = W_g[cog, K] . col_g[K, P] is, in BLAS's column
        // order, Y_g^T = col_g^T . W_g^T: no transposes, output written in place.
        for (int64_t g = 0; g < p.groups; ++g) {
          blas_gemm<scalar_t>('n', 'n', l.p, cog, l.k, 1, a + g * l.k * l.p, l.p, w + g * cog * l.k,
                              l.k, bias != nullptr ? 1 : 0, yn + g * cog * l.p, l.p);
        }
      });
}

template <typename scalar_t>
void forward_nhwc(const Conv2dParams& p, const Layout& l, const scalar_t* x, const scalar_t* w,
                  const scalar_t* bias, scalar_t* y, int64_t max_col_bytes) {
  const int64_t cog = p.c_out_per_group();
  const int64_t chunk =
      l.pointwise ? p.n : samples_per_chunk(p, l, max_col_bytes, sizeof(scalar_t));
  at::Tensor col_buffer;
  if (!l.pointwise) {
    col_buffer = at::empty({chunk * l.p * l.gk},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  }
  for (int64_t n0 = 0; n0 < p.n; n0 += chunk) {
    const int64_t nb = std::min(chunk, p.n - n0), rows = nb * l.p;
    const scalar_t* a = x + n0 * p.h * p.w * p.c_in;
    if (!l.pointwise) {
      scalar_t* c = col_buffer.mutable_data_ptr<scalar_t>();
      im2col_nhwc(p, a, c, nb);
      a = c;
    }
    scalar_t* yc = y + n0 * l.p * p.c_out;
    if (bias != nullptr) {
      at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          std::memcpy(yc + r * p.c_out, bias, p.c_out * sizeof(scalar_t));
      });
    }
    // Row-major Y_g[rows, cog] = col_g[rows, K] . W'_g[cog, K]^T is, column-major,
    // Y_g^T = op(W'_g) . col_g^T with W'_g read transposed and Y's rows C_out apart.
    for (int64_t g = 0; g < p.groups; ++g) {
      blas_gemm<scalar_t>('t', 'n', cog, rows, l.k, 1, w + g * cog * l.k, l.k, a + g * l.k, l.gk,
                          bias != nullptr ? 1 : 0, yc + g * cog, p.c_out);
    }
  }
}

at::Tensor conv2d_im2col_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, int64_t max_col_bytes) {
  const Conv2dParams p =
      conv2d_params(kForward, input, weight, bias, stride, padding, dilation, groups, false);
  CNNEXT_CHECK(max_col_bytes > 0, kForward, "expected max_col_bytes to be positive, got ",
               max_col_bytes);
  const bool cl = is_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output = at::empty(p.output_sizes(), input.options().memory_format(fmt));
  if (p.n == 0) return output;
  const at::Tensor x = (p.batched ? input : input.unsqueeze(0)).contiguous(fmt);
  // channels_last multiplies by W' = weight as [C_out, kh, kw, C_in/groups].
  const at::Tensor w = cl ? weight.permute({0, 2, 3, 1}).contiguous() : weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const Layout l = layout_of(p);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_im2col_forward_cpu", [&] {
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    auto* run = cl ? &forward_nhwc<scalar_t> : &forward_nchw<scalar_t>;
    run(p, l, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
        output.mutable_data_ptr<scalar_t>(), max_col_bytes);
  });
  return output;
}

// ---- backward -------------------------------------------------------------------------------

template <typename scalar_t>
void backward_nchw(const Conv2dParams& p, const Layout& l, const scalar_t* dy, const scalar_t* x,
                   const scalar_t* w, scalar_t* dx, scalar_t* dw, int64_t max_col_bytes) {
  const int64_t cog = p.c_out_per_group(), in_size = p.c_in * p.h * p.w;
  const int64_t out_size = p.c_out * l.p, w_size = p.c_out * l.k;
  const bool need_col = !l.pointwise;
  const int64_t slots = column_slots(p, l, max_col_bytes, sizeof(scalar_t));
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  at::Tensor col_buffer = need_col ? at::empty({slots * l.gk * l.p}, options) : at::Tensor();
  // One grad_weight partial per slot beyond the first, summed in slot order: deterministic for a
  // given thread count.
  at::Tensor partials =
      dw != nullptr && slots > 1 ? at::empty({slots - 1, w_size}, options) : at::Tensor();
  std::vector<char> started(slots, 0);  // per slot; not vector<bool>, slots run in parallel
  for_each_sample(p.n, slots, [&](int64_t n, int64_t slot) {
    scalar_t* col =
        need_col ? col_buffer.mutable_data_ptr<scalar_t>() + slot * l.gk * l.p : nullptr;
    const scalar_t* dyn = dy + n * out_size;
    if (dw != nullptr) {
      const scalar_t* a = x + n * in_size;
      if (need_col) {
        im2col_nchw(p, a, col);
        a = col;
      }
      scalar_t* acc = slot == 0 ? dw : partials.mutable_data_ptr<scalar_t>() + (slot - 1) * w_size;
      // dW_g[cog, K] += dY_g[cog, P] . col_g[K, P]^T, i.e. dW_g^T = col_g . dY_g^T column-major.
      for (int64_t g = 0; g < p.groups; ++g) {
        blas_gemm<scalar_t>('t', 'n', l.k, cog, l.p, 1, a + g * l.k * l.p, l.p, dyn + g * cog * l.p,
                            l.p, started[slot] ? 1 : 0, acc + g * cog * l.k, l.k);
      }
      started[slot] = 1;
    }
    if (dx != nullptr) {
      scalar_t* dxn = dx + n * in_size;
      scalar_t* target = need_col ? col : dxn;
      // dcol_g[K, P] = W_g[cog, K]^T . dY_g[cog, P], i.e. dcol_g^T = dY_g^T . W_g column-major.
      for (int64_t g = 0; g < p.groups; ++g) {
        blas_gemm<scalar_t>('n', 't', l.p, l.k, cog, 1, dyn + g * cog * l.p, l.p, w + g * cog * l.k,
                            l.k, 0, target + g * l.k * l.p, l.p);
      }
      if (need_col) col2im_nchw(p, col, dxn);
    }
  });
  if (dw != nullptr) {
    if (!started[0]) std::fill(dw, dw + w_size, scalar_t(0));
    for (int64_t s = 1; s < slots; ++s) {
      if (!started[s]) continue;
      const scalar_t* src = partials.const_data_ptr<scalar_t>() + (s - 1) * w_size;
      for (int64_t i = 0; i < w_size; ++i) dw[i] += src[i];
    }
  }
}

template <typename scalar_t>
void backward_nhwc(const Conv2dParams& p, const Layout& l, const scalar_t* dy, const scalar_t* x,
                   const scalar_t* w, scalar_t* dx, scalar_t* dw, int64_t max_col_bytes) {
  const int64_t cog = p.c_out_per_group();
  const int64_t chunk =
      l.pointwise ? p.n : samples_per_chunk(p, l, max_col_bytes, sizeof(scalar_t));
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  at::Tensor col_buffer = l.pointwise ? at::Tensor() : at::empty({chunk * l.p * l.gk}, options);
  for (int64_t n0 = 0; n0 < p.n; n0 += chunk) {
    const int64_t nb = std::min(chunk, p.n - n0), rows = nb * l.p;
    const scalar_t* dyc = dy + n0 * l.p * p.c_out;
    scalar_t* col = l.pointwise ? nullptr : col_buffer.mutable_data_ptr<scalar_t>();
    if (dw != nullptr) {
      const scalar_t* a = x + n0 * p.h * p.w * p.c_in;
      if (!l.pointwise) {
        im2col_nhwc(p, a, col, nb);
        a = col;
      }
      // dW'_g[cog, K] += dY_g[rows, cog]^T . col_g[rows, K]; column-major dW'_g^T = col_g^T dY_g.
      for (int64_t g = 0; g < p.groups; ++g) {
        blas_gemm<scalar_t>('n', 't', l.k, cog, rows, 1, a + g * l.k, l.gk, dyc + g * cog, p.c_out,
                            n0 == 0 ? 0 : 1, dw + g * cog * l.k, l.k);
      }
    }
    if (dx != nullptr) {
      scalar_t* dxc = dx + n0 * p.h * p.w * p.c_in;
      scalar_t* target = l.pointwise ? dxc : col;
      // dcol_g[rows, K] = dY_g[rows, cog] . W'_g[cog, K]; column-major dcol_g^T = W'_g^T dY_g^T.
      for (int64_t g = 0; g < p.groups; ++g) {
        blas_gemm<scalar_t>('n', 'n', l.k, rows, cog, 1, w + g * cog * l.k, l.k, dyc + g * cog,
                            p.c_out, 0, target + g * l.k, l.gk);
      }
      if (!l.pointwise) col2im_nhwc(p, col, dxc, nb);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_im2col_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, int64_t max_col_bytes) {
  // `input` is read only for grad_weight and `weight` only for grad_input: the other may be a
  // stride-0 placeholder of the right shape, used here for its metadata alone.
  const Conv2dParams p = conv2d_params(kBackward, input, weight, std::nullopt, stride, padding,
                                       dilation, groups, false);
  CNNEXT_CHECK(max_col_bytes > 0, kBackward, "expected max_col_bytes to be positive, got ",
               max_col_bytes);
  check_same(kBackward, "grad_output", grad_output, "input", input);
  CNNEXT_CHECK(grad_output.sizes() == at::IntArrayRef(p.output_sizes()), kBackward,
               "expected grad_output of shape ", at::IntArrayRef(p.output_sizes()), ", got ",
               grad_output.sizes());
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
  if (output_mask[2]) at::sum_out(grad_bias, dy, {0, 2, 3});
  if (!output_mask[0] && !output_mask[1]) return {grad_input, grad_weight, grad_bias};
  at::Tensor x, w, dw_buffer;
  if (output_mask[1]) {
    x = (p.batched ? input : input.unsqueeze(0)).contiguous(fmt);
    // channels_last accumulates dW' = grad_weight as [C_out, kh, kw, C_in/groups].
    dw_buffer =
        cl ? at::empty({p.c_out, p.kh, p.kw, p.c_in_per_group()}, weight.options()) : grad_weight;
  }
  if (output_mask[0]) w = cl ? weight.permute({0, 2, 3, 1}).contiguous() : weight.contiguous();
  at::Tensor dx4 = output_mask[0] && !p.batched ? grad_input.unsqueeze(0) : grad_input;
  const Layout l = layout_of(p);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_im2col_backward_cpu", [&] {
    auto* run = cl ? &backward_nhwc<scalar_t> : &backward_nchw<scalar_t>;
    run(p, l, dy.const_data_ptr<scalar_t>(),
        output_mask[1] ? x.const_data_ptr<scalar_t>() : nullptr,
        output_mask[0] ? w.const_data_ptr<scalar_t>() : nullptr,
        output_mask[0] ? dx4.mutable_data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? dw_buffer.mutable_data_ptr<scalar_t>() : nullptr, max_col_bytes);
  });
  if (output_mask[1] && cl) grad_weight.copy_(dw_buffer.permute({0, 3, 1, 2}));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cnnext

TORCH_LIBRARY_IMPL(cnnext, CPU, m) {
  m.impl("conv2d_im2col", &cnnext::conv2d_im2col_forward_cpu);
  m.impl("conv2d_im2col_backward", &cnnext::conv2d_im2col_backward_cpu);
}
