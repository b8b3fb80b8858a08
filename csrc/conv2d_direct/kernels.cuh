// The naive direct convolution kernels (the teaching baseline; implicit_gemm.cuh holds the fast
// family) and the helpers both share. naive: one thread per output element reads its receptive
// field from global memory. With TRANSPOSED the same kernel computes grad_input as the transposed
// convolution in gather form: the source is grad_output upsampled by the stride with zeros, the
// filter is flipped and its channel roles swap, so each input pixel gathers from exactly the
// outputs it fed. grad_weight: per-slice partial sums reduced in a fixed order; grad_bias: a
// per-channel tree reduction. The epilogue is a functor applied to every value before the store.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "common/cuda_compat.cuh"
#include "common/params.h"

namespace cnnext {
// Anonymous: ASan gives redzones only to non-COMDAT static locals (the emulated __shared__).
namespace {

// ---- epilogues ---------------------------------------------------------------------------------

// The default epilogue: identity plus an optional per-channel bias. A fused op passes its own
// functor with the same call signature (e.g. bias + ReLU); it is a kernel argument, so it must be
// trivially copyable and hold device pointers only.
template <typename scalar_t>
struct BiasEpilogue {
  const scalar_t* bias = nullptr;  // nullptr: no bias

  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t value, int64_t channel) const {
    return bias != nullptr ? value + static_cast<acc_t>(bias[channel]) : value;
  }
};

// ---- geometry ----------------------------------------------------------------------------------

// One convolution as the naive kernel sees it. Forward: source = input, up = 1.
// Transposed (grad_input): source = grad_output, up = the forward stride, conv stride 1, padding
// dilation * (k - 1) - padding (possibly negative), output = the input's plane.
struct DirectGeometry {
  int64_t n = 0, groups = 1;
  int64_t c_red = 0;  // channels reduced over, per group
  int64_t c_out = 0;  // output channels per group
  int64_t src_h = 0, src_w = 0;
  int64_t up_h = 1, up_w = 1;  // source upsampling (zeros between samples)
  int64_t vh = 0, vw = 0;      // upsampled source extent: (src - 1) * up + 1
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t out_h = 0, out_w = 0;
  int64_t src_sn = 0, src_sc = 0, src_sh = 0, src_sw = 0;
  int64_t out_sn = 0, out_sc = 0, out_sh = 0, out_sw = 0;
  bool out_channels_last = false;  // the naive kernel walks the output in memory order
};

// Strides of a 3D or 4D activation as (n, c, h, w); a 3D tensor is a batch of one.
struct Strides4 {
  int64_t n = 0, c = 0, h = 0, w = 0;
};
inline Strides4 strides4(const at::Tensor& t) {
  const int64_t off = t.dim() == 4 ? 1 : 0;
  return {off ? t.stride(0) : 0, t.stride(off), t.stride(off + 1), t.stride(off + 2)};
}

inline DirectGeometry forward_geometry(const Conv2dParams& p, const at::Tensor& input,
                                       const at::Tensor& output) {
  DirectGeometry g;
  g.n = p.n, g.groups = p.groups, g.c_red = p.c_in_per_group(), g.c_out = p.c_out_per_group();
  g.src_h = p.h, g.src_w = p.w, g.vh = p.h, g.vw = p.w;
  g.kh = p.kh, g.kw = p.kw, g.sh = p.sh, g.sw = p.sw, g.ph = p.ph, g.pw = p.pw, g.dh = p.dh,
  g.dw = p.dw;
  g.out_h = p.h_out, g.out_w = p.w_out;
  const Strides4 s = strides4(input), o = strides4(output);
  g.src_sn = s.n, g.src_sc = s.c, g.src_sh = s.h, g.src_sw = s.w;
  g.out_sn = o.n, g.out_sc = o.c, g.out_sh = o.h, g.out_sw = o.w;
  g.out_channels_last = is_channels_last(output);
  return g;
}

// grad_input[i] = sum over taps k with (i + pad - k * dilation) divisible by the stride of
// grad_output[(i + pad - k * dilation) / stride] * w[k]: a stride-1 convolution of the upsampled
// grad_output with the flipped filter, padded by dilation * (k - 1) - pad.
inline DirectGeometry input_grad_geometry(const Conv2dParams& p, const at::Tensor& grad_output,
                                          const at::Tensor& grad_input) {
  DirectGeometry g;
  g.n = p.n, g.groups = p.groups, g.c_red = p.c_out_per_group(), g.c_out = p.c_in_per_group();
  g.src_h = p.h_out, g.src_w = p.w_out, g.up_h = p.sh, g.up_w = p.sw;
  g.vh = (p.h_out - 1) * p.sh + 1, g.vw = (p.w_out - 1) * p.sw + 1;
  g.kh = p.kh, g.kw = p.kw, g.dh = p.dh, g.dw = p.dw;
  g.ph = p.dh * (p.kh - 1) - p.ph, g.pw = p.dw * (p.kw - 1) - p.pw;
  g.out_h = p.h, g.out_w = p.w;
  const Strides4 s = strides4(grad_output), o = strides4(grad_input);
  g.src_sn = s.n, g.src_sc = s.c, g.src_sh = s.h, g.src_sw = s.w;
  g.out_sn = o.n, g.out_sc = o.c, g.out_sh = o.h, g.out_sw = o.w;
  g.out_channels_last = is_channels_last(grad_input);
  return g;
}

// ---- device helpers ----------------------------------------------------------------------------

// Whether (y, x) of the upsampled source is a real sample rather than padding or a gap between
// samples. grad_input skips such taps instead of multiplying them by zero, so a
// NaN/Inf filter tap spreads only where torch's scatter (col2im) puts it.
__device__ __forceinline__ bool direct_row_real(const DirectGeometry& g, int64_t y) {
  return y >= 0 && y < g.vh && y % g.up_h == 0;
}
__device__ __forceinline__ bool direct_col_real(const DirectGeometry& g, int64_t x) {
  return x >= 0 && x < g.vw && x % g.up_w == 0;
}

// Source value at (y, x) of the upsampled plane `plane`; zero outside it and between samples.
template <bool TRANSPOSED, typename scalar_t>
__device__ __forceinline__ cuda_acc_t<scalar_t> direct_source(const scalar_t* __restrict__ plane,
                                                              const DirectGeometry& g, int64_t y,
                                                              int64_t x) {
  using acc_t = cuda_acc_t<scalar_t>;
  if (y < 0 || x < 0 || y >= g.vh || x >= g.vw) return acc_t(0);
  if (TRANSPOSED) {
    if (y % g.up_h != 0 || x % g.up_w != 0) return acc_t(0);
    y /= g.up_h;
    x /= g.up_w;
  }
  return static_cast<acc_t>(plane[y * g.src_sh + x * g.src_sw]);
}

// Filter tap for output channel `o` and reduced channel `c` of group `grp`. The weight is the
// forward one, contiguous [C_out][C_in / groups][kh][kw]; transposed swaps o and c and flips.
template <bool TRANSPOSED, typename scalar_t>
__device__ __forceinline__ cuda_acc_t<scalar_t> direct_filter(const scalar_t* __restrict__ weight,
                                                              const DirectGeometry& g, int64_t grp,
                                                              int64_t o, int64_t c, int64_t ky,
                                                              int64_t kx) {
  int64_t index;
  if (TRANSPOSED) {
    index = (((grp * g.c_red + c) * g.c_out + o) * g.kh + (g.kh - 1 - ky)) * g.kw + (g.kw - 1 - kx);
  } else {
    index = (((grp * g.c_out + o) * g.c_red + c) * g.kh + ky) * g.kw + kx;
  }
  return static_cast<cuda_acc_t<scalar_t>>(weight[index]);
}

// ---- naive: one thread per output element ------------------------------------------------------

template <typename scalar_t, bool TRANSPOSED, typename Epilogue>
__global__ void conv2d_direct_naive_kernel(const scalar_t* __restrict__ src,
                                           const scalar_t* __restrict__ weight,
                                           scalar_t* __restrict__ out, DirectGeometry g,
                                           Epilogue epilogue) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t channels = g.groups * g.c_out;
  const int64_t total = g.n * channels * g.out_h * g.out_w;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  // Consecutive threads take consecutive output addresses in either memory format.
  int64_t n, oc, oy, ox, rest = index;
  if (g.out_channels_last) {
    oc = rest % channels, rest /= channels;
    ox = rest % g.out_w, rest /= g.out_w;
    oy = rest % g.out_h, n = rest / g.out_h;
  } else {
    ox = rest % g.out_w, rest /= g.out_w;
    oy = rest % g.out_h, rest /= g.out_h;
    oc = rest % channels, n = rest / channels;
  }
  const int64_t grp = oc / g.c_out, o = oc % g.c_out;
  acc_t acc = 0;
  for (int64_t c = 0; c < g.c_red; ++c) {
    const scalar_t* plane = src + n * g.src_sn + (grp * g.c_red + c) * g.src_sc;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t y = oy * g.sh - g.ph + ky * g.dh;
      if (TRANSPOSED && !direct_row_real(g, y)) continue;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t x = ox * g.sw - g.pw + kx * g.dw;
        if (TRANSPOSED && !direct_col_real(g, x)) continue;
        acc += direct_source<TRANSPOSED>(plane, g, y, x) *
               direct_filter<TRANSPOSED>(weight, g, grp, o, c, ky, kx);
      }
    }
  }
  out[n * g.out_sn + oc * g.out_sc + oy * g.out_sh + ox * g.out_sw] =
      static_cast<scalar_t>(epilogue(acc, oc));
}

// ---- host side ---------------------------------------------------------------------------------

// "auto", "implicit_gemm" (and "tiled", its former name) run the implicit-GEMM kernels;
// "implicit_gemm_128x128" / "implicit_gemm_64x64" force a block tile (tests, tuning); "naive" the
// one-thread-per-output kernels.
enum class DirectVariant { kAuto, kNaive, kImplicitGemm, kLargeTile, kSmallTile };

inline DirectVariant parse_direct_variant(const char* op, c10::string_view variant) {
  if (variant == "auto") return DirectVariant::kAuto;
  if (variant == "naive") return DirectVariant::kNaive;
  if (variant == "implicit_gemm" || variant == "tiled") return DirectVariant::kImplicitGemm;
  if (variant == "implicit_gemm_128x128") return DirectVariant::kLargeTile;
  if (variant == "implicit_gemm_64x64") return DirectVariant::kSmallTile;
  CNNEXT_CHECK(false, op,
               "expected variant to be 'auto', 'implicit_gemm', 'implicit_gemm_128x128', "
               "'implicit_gemm_64x64', 'tiled' or 'naive', got '",
               std::string(variant), "'");
  return DirectVariant::kAuto;
}

// Runs the naive kernel for the convolution described by `g` (forward or, with TRANSPOSED,
// grad_input).
template <typename scalar_t, bool TRANSPOSED, typename Epilogue>
void conv2d_direct_naive_launch(const char* op, const DirectGeometry& g, const scalar_t* src,
                                const scalar_t* weight, scalar_t* out, Epilogue epilogue) {
  constexpr int64_t threads = 256;
  const int64_t total = g.n * g.groups * g.c_out * g.out_h * g.out_w;
  CNNEXT_CHECK((total + threads - 1) / threads <= 2147483647, op, "output too large (", total,
               " elements) for one launch");
  CNNEXT_LAUNCH((conv2d_direct_naive_kernel<scalar_t, TRANSPOSED, Epilogue>),
                dim3(ceil_div(total, threads)), dim3(threads), 0, current_stream(), src, weight,
                out, g, epilogue);
}

// ---- grad_weight: per-slice partial sums, then a fixed-order reduction -------------------------
// grad_weight[oc][k] = sum over positions p = (n, oy, ox) of grad_output[n][oc][oy][ox] *
// col[k][p], where k = (c, ky, kx) and col is the input at the tap's position (zero in padding):
// a GEMM of (C_out / groups) x (C_in / groups * kh * kw) per group, reduced over positions. The
// positions are cut into `slices`; each slice's sums go to partial[slice][C_out][k] and a second
// kernel adds the slices in order, so the result does not depend on the schedule (no atomics).
struct WeightGradGeometry {
  int64_t n = 0, groups = 1, c_in = 0, c_out = 0;  // c_in, c_out: per group
  int64_t h = 0, w = 0, kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t out_h = 0, out_w = 0;
  int64_t x_sn = 0, x_sc = 0, x_sh = 0, x_sw = 0;
  int64_t go_sn = 0, go_sc = 0, go_sh = 0, go_sw = 0;
  int64_t k = 0;          // c_in * kh * kw: columns of the per-group GEMM
  int64_t positions = 0;  // n * out_h * out_w
  int64_t slices = 1, slice_len = 0;
};

inline WeightGradGeometry weight_grad_geometry(const Conv2dParams& p, const at::Tensor& input,
                                               const at::Tensor& grad_output) {
  WeightGradGeometry g;
  g.n = p.n, g.groups = p.groups, g.c_in = p.c_in_per_group(), g.c_out = p.c_out_per_group();
  g.h = p.h, g.w = p.w, g.kh = p.kh, g.kw = p.kw, g.sh = p.sh, g.sw = p.sw, g.ph = p.ph,
  g.pw = p.pw, g.dh = p.dh, g.dw = p.dw, g.out_h = p.h_out, g.out_w = p.w_out;
  const Strides4 x = strides4(input), go = strides4(grad_output);
  g.x_sn = x.n, g.x_sc = x.c, g.x_sh = x.h, g.x_sw = x.w;
  g.go_sn = go.n, g.go_sc = go.c, g.go_sh = go.h, g.go_sw = go.w;
  g.k = g.c_in * g.kh * g.kw;
  g.positions = p.n * p.h_out * p.w_out;
  return g;
}

// Cuts the positions into slices of a multiple of `quantum` so that about kTargetBlocks units of
// work exist, with the partial buffer bounded. Depends on the shapes only (deterministic).
inline void set_weight_grad_slices(WeightGradGeometry* g, int64_t units, int64_t quantum) {
  constexpr int64_t kTargetBlocks = 512, kMaxPartial = int64_t(1) << 26;
  const int64_t numel = g->groups * g->c_out * g->k;
  int64_t slices = std::max<int64_t>(1, (kTargetBlocks + units - 1) / units);
  slices = std::min(slices, (g->positions + quantum - 1) / quantum);
  slices = std::max<int64_t>(1, std::min(slices, kMaxPartial / std::max<int64_t>(numel, 1)));
  int64_t len = (g->positions + slices - 1) / slices;
  len = (len + quantum - 1) / quantum * quantum;
  g->slice_len = len;
  g->slices = (g->positions + len - 1) / len;
}

// Position p of the flattened (n, oy, ox) reduction domain.
struct Position {
  int64_t n, oy, ox;
};
__device__ __forceinline__ Position weight_grad_position(const WeightGradGeometry& g, int64_t p) {
  const int64_t plane = g.out_h * g.out_w;
  return {p / plane, (p % plane) / g.out_w, p % g.out_w};
}

// Input value feeding column k = (c, ky, kx) of group `grp` at position q; zero in the padding.
template <typename scalar_t>
__device__ __forceinline__ cuda_acc_t<scalar_t> weight_grad_column(const scalar_t* __restrict__ x,
                                                                   const WeightGradGeometry& g,
                                                                   int64_t grp, int64_t k,
                                                                   const Position& q) {
  const int64_t kk = g.kh * g.kw;
  const int64_t c = k / kk, ky = (k % kk) / g.kw, kx = k % g.kw;
  const int64_t iy = q.oy * g.sh - g.ph + ky * g.dh, ix = q.ox * g.sw - g.pw + kx * g.dw;
  if (iy < 0 || ix < 0 || iy >= g.h || ix >= g.w) return cuda_acc_t<scalar_t>(0);
  return static_cast<cuda_acc_t<scalar_t>>(
      x[q.n * g.x_sn + (grp * g.c_in + c) * g.x_sc + iy * g.x_sh + ix * g.x_sw]);
}

template <typename scalar_t>
__device__ __forceinline__ cuda_acc_t<scalar_t> weight_grad_output(
    const scalar_t* __restrict__ grad_output, const WeightGradGeometry& g, int64_t oc,
    const Position& q) {
  return static_cast<cuda_acc_t<scalar_t>>(
      grad_output[q.n * g.go_sn + oc * g.go_sc + q.oy * g.go_sh + q.ox * g.go_sw]);
}

// Naive: one thread per (slice, weight element) walks the slice's positions.
template <typename scalar_t>
__global__ void conv2d_direct_grad_weight_naive_kernel(const scalar_t* __restrict__ grad_output,
                                                       const scalar_t* __restrict__ x,
                                                       cuda_acc_t<scalar_t>* __restrict__ partial,
                                                       WeightGradGeometry g) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t numel = g.groups * g.c_out * g.k;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= g.slices * numel) return;
  const int64_t slice = index / numel, e = index % numel;
  const int64_t oc = e / g.k, k = e % g.k, grp = oc / g.c_out;
  const int64_t begin = slice * g.slice_len, end = std::min(g.positions, begin + g.slice_len);
  acc_t acc = 0;
  for (int64_t p = begin; p < end; ++p) {
    const Position q = weight_grad_position(g, p);
    acc += weight_grad_output(grad_output, g, oc, q) * weight_grad_column(x, g, grp, k, q);
  }
  partial[index] = acc;
}

// One thread per weight element adds the slices in order.
template <typename scalar_t>
__global__ void conv2d_direct_grad_weight_reduce_kernel(
    const cuda_acc_t<scalar_t>* __restrict__ partial, scalar_t* __restrict__ grad_weight,
    int64_t slices, int64_t numel) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= numel) return;
  acc_t sum = 0;
  for (int64_t s = 0; s < slices; ++s) sum += partial[s * numel + e];
  grad_weight[e] = static_cast<scalar_t>(sum);
}

// grad_weight (contiguous, the weight's shape) from grad_output and the input, by the naive
// kernel and the ordered reduction.
template <typename scalar_t>
void conv2d_direct_grad_weight_naive_launch(const char* op, WeightGradGeometry g,
                                            const scalar_t* grad_output, const scalar_t* x,
                                            scalar_t* grad_weight, const at::Tensor& like) {
  using acc_t = cuda_acc_t<scalar_t>;
  const cudaStream_t stream = current_stream();
  const int64_t numel = g.groups * g.c_out * g.k;
  constexpr int64_t threads = 256;
  set_weight_grad_slices(&g, (numel + threads - 1) / threads, 1);
  const at::Tensor partial =
      at::empty({g.slices * numel}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const int64_t total = g.slices * numel;
  CNNEXT_CHECK((total + threads - 1) / threads <= 2147483647, op, "weight too large");
  CNNEXT_LAUNCH((conv2d_direct_grad_weight_naive_kernel<scalar_t>), dim3(ceil_div(total, threads)),
                dim3(threads), 0, stream, grad_output, x, partial.mutable_data_ptr<acc_t>(), g);
  CNNEXT_LAUNCH((conv2d_direct_grad_weight_reduce_kernel<scalar_t>), dim3(ceil_div(numel, threads)),
                dim3(threads), 0, stream, partial.const_data_ptr<acc_t>(), grad_weight, g.slices,
                numel);
}

// ---- grad_bias: one block per channel, a fixed-shape tree reduction ---------------------------
constexpr int64_t kBiasGradThreads = 128;

template <typename scalar_t>
__global__ void conv2d_direct_grad_bias_kernel(const scalar_t* __restrict__ grad_output,
                                               scalar_t* __restrict__ grad_bias,
                                               WeightGradGeometry g) {
  using acc_t = cuda_acc_t<scalar_t>;
  __shared__ acc_t sums[kBiasGradThreads];
  const int64_t oc = blockIdx.x, tid = threadIdx.x;
  acc_t acc = 0;
  for (int64_t p = tid; p < g.positions; p += kBiasGradThreads) {
    acc += weight_grad_output(grad_output, g, oc, weight_grad_position(g, p));
  }
  sums[tid] = acc;
  __syncthreads();
  for (int64_t half = kBiasGradThreads / 2; half > 0; half /= 2) {
    if (tid < half) sums[tid] += sums[tid + half];
    __syncthreads();
  }
  if (tid == 0) grad_bias[oc] = static_cast<scalar_t>(sums[0]);
}

template <typename scalar_t>
void conv2d_direct_grad_bias_launch(const WeightGradGeometry& g, const scalar_t* grad_output,
                                    scalar_t* grad_bias) {
  CNNEXT_LAUNCH((conv2d_direct_grad_bias_kernel<scalar_t>),
                dim3(static_cast<unsigned>(g.groups * g.c_out)), dim3(kBiasGradThreads), 0,
                current_stream(), grad_output, grad_bias, g);
}

}  // namespace
}  // namespace cnnext
