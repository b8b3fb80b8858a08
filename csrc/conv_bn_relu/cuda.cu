// Fused Conv2d + BatchNorm2d + ReLU on CUDA. Eval: fold_channels_kernel folds BatchNorm into a
// per-channel scale and shift; the convolution dispatch (common/conv_dispatch.h) runs the
// implicit-GEMM kernel with a scale + shift + ReLU epilogue (one kernel), or im2col with them in
// its one bias pass. Train: the convolution; stats_partial_kernel
// (block = channel x slice, 128 threads, per-thread Welford, fixed-tree merge),
// stats_finalize_kernel (thread = channel, slices merged in order), normalize_kernel (grid-stride,
// thread = element). Backward mirrors it (two- level channel sums, elementwise grad), then the
// convolution's backward. No atomics anywhere.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/conv_dispatch.h"
#include "common/cuda_compat.cuh"
#include "common/params.h"
#include "conv_bn_relu/conv_bn_relu.h"

namespace cnnext {
namespace {

using fused::given;
using fused::kBackwardOp;
using fused::kForwardOp;

constexpr unsigned int kThreads = 256;         // elementwise kernels
constexpr int64_t kReduceThreads = 128;        // channel reductions (a power of two)
constexpr int64_t kMaxBlocks = 65535;          // grid-stride beyond this
constexpr int64_t kTargetReduceBlocks = 1024;  // channel x slice blocks to aim for

dim3 grid_for(int64_t work) {
  return dim3(
      static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(work, kThreads), 1, kMaxBlocks)));
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return given(t) ? t->const_data_ptr<T>() : nullptr;
}

// ---- folding ------------------------------------------------------------------------------------

// save_mean = running_mean, save_invstd = 1 / sqrt(running_var + eps); thread = channel.
template <typename scalar_t>
__global__ void eval_stats_kernel(const scalar_t* __restrict__ running_mean,
                                  const scalar_t* __restrict__ running_var,
                                  cuda_acc_t<scalar_t> eps, cuda_acc_t<scalar_t>* __restrict__ mean,
                                  cuda_acc_t<scalar_t>* __restrict__ invstd, int64_t c_out) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= c_out) return;
  mean[c] = static_cast<acc_t>(running_mean[c]);
  invstd[c] = acc_t(1) / std::sqrt(static_cast<acc_t>(running_var[c]) + eps);
}

// BatchNorm folded per output channel (thread = channel): scale = gamma * invstd,
// shift = (b - mean) * scale + beta (null b, gamma, beta: 0, 1, 0), so that
// relu(bn(conv(x) + b)) = relu(conv(x) * scale + shift).
template <typename scalar_t>
__global__ void fold_channels_kernel(const scalar_t* __restrict__ b,
                                     const scalar_t* __restrict__ gamma,
                                     const scalar_t* __restrict__ beta,
                                     const cuda_acc_t<scalar_t>* __restrict__ mean,
                                     const cuda_acc_t<scalar_t>* __restrict__ invstd,
                                     scalar_t* __restrict__ scale, scalar_t* __restrict__ shift,
                                     int64_t c_out) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= c_out) return;
  const acc_t s = (gamma != nullptr ? static_cast<acc_t>(gamma[o]) : acc_t(1)) * invstd[o];
  const acc_t bias = b != nullptr ? static_cast<acc_t>(b[o]) : acc_t(0);
  const acc_t beta_o = beta != nullptr ? static_cast<acc_t>(beta[o]) : acc_t(0);
  scale[o] = static_cast<scalar_t>(s);
  shift[o] = static_cast<scalar_t>((bias - mean[o]) * s + beta_o);
}

// w' = w * scale[o] (thread = weight element, k per channel): the folded weight, whose transpose
// gives the input's gradient in eval mode.
template <typename scalar_t>
__global__ void scale_weight_kernel(const scalar_t* __restrict__ w,
                                    const scalar_t* __restrict__ scale,
                                    scalar_t* __restrict__ w_out, int64_t c_out, int64_t k) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= c_out * k) return;
  w_out[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) * static_cast<acc_t>(scale[i / k]));
}

// Gradients of the folded parameters back to the module's (block = output channel), with
// dw' = dL/dw' and db' = dL/db' of the folded convolution (w' = w * s, b' = shift):
// dw = dw' * s, db = db' * s, dbeta = db', dgamma = invstd * (sum_k dw'[o, k] w[o, k] +
// db'[o] (b[o] - mean[o])), the sum by a fixed tree. Null outputs are not computed.
template <typename scalar_t>
__global__ void fold_backward_kernel(const scalar_t* __restrict__ gw,
                                     const scalar_t* __restrict__ gb,
                                     const scalar_t* __restrict__ w, const scalar_t* __restrict__ b,
                                     const scalar_t* __restrict__ scale,
                                     const cuda_acc_t<scalar_t>* __restrict__ mean,
                                     const cuda_acc_t<scalar_t>* __restrict__ invstd,
                                     scalar_t* __restrict__ grad_w, scalar_t* __restrict__ grad_b,
                                     scalar_t* __restrict__ grad_gamma,
                                     scalar_t* __restrict__ grad_beta, int64_t k) {
  using acc_t = cuda_acc_t<scalar_t>;
  __shared__ acc_t sums[kReduceThreads];
  const int64_t o = blockIdx.x, tid = threadIdx.x;
  const acc_t s = static_cast<acc_t>(scale[o]);
  acc_t dot = 0;
  const bool read_gw = grad_w != nullptr || grad_gamma != nullptr;  // else gw may be null
  for (int64_t i = o * k + tid; read_gw && i < (o + 1) * k; i += kReduceThreads) {
    const acc_t g = static_cast<acc_t>(gw[i]);
    if (grad_w != nullptr) grad_w[i] = static_cast<scalar_t>(g * s);
    if (grad_gamma != nullptr) dot += g * static_cast<acc_t>(w[i]);
  }
  if (grad_gamma == nullptr) {
    if (tid == 0 && grad_b != nullptr) grad_b[o] = static_cast<scalar_t>(gb[o] * s);
    if (tid == 0 && grad_beta != nullptr) grad_beta[o] = gb[o];
    return;  // uniform across the block: no thread waits at the barriers below
  }
  sums[tid] = dot;
  __syncthreads();
  for (int64_t width = kReduceThreads / 2; width > 0; width /= 2) {
    if (tid < width) sums[tid] += sums[tid + width];
    __syncthreads();
  }
  if (tid != 0) return;
  const acc_t db = static_cast<acc_t>(gb[o]);
  const acc_t bias = b != nullptr ? static_cast<acc_t>(b[o]) : acc_t(0);
  grad_gamma[o] = static_cast<scalar_t>((sums[0] + db * (bias - mean[o])) * invstd[o]);
  if (grad_b != nullptr) grad_b[o] = static_cast<scalar_t>(db * s);
  if (grad_beta != nullptr) grad_beta[o] = gb[o];
}

// grad * !(pre <= 0): ReLU's backward as torch's threshold_backward, which reads the output (whose
// sign is the pre-activation's) and lets the gradient through at a NaN. Thread = element.
template <typename scalar_t>
__global__ void relu_mask_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ pre,
                                 scalar_t* __restrict__ out, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = pre[i] <= scalar_t(0) ? scalar_t(0) : g[i];
  }
}

// ---- batch statistics ---------------------------------------------------------------------------

// A dense activation (NCHW or NHWC): value (n, c, q) at n * sn + c * sc + q * sq. The n * hw
// positions of a channel are cut into `slices` of slice_len, one block per (channel, slice).
struct ChannelGeometry {
  int64_t n = 0, c = 0, hw = 0, sn = 0, sc = 0, sq = 0;
  int64_t slices = 1, slice_len = 0;
  bool cl = false;
};

// Depends on the shape only, so the order of every sum is fixed.
ChannelGeometry channel_geometry(const Conv2dParams& p, bool cl) {
  ChannelGeometry g;
  g.n = p.n, g.c = p.c_out, g.hw = p.h_out * p.w_out, g.cl = cl;
  g.sn = g.c * g.hw;
  g.sc = cl ? 1 : g.hw;
  g.sq = cl ? g.c : 1;
  const int64_t count = g.n * g.hw;
  if (count == 0) return g;
  const int64_t most = (count + kReduceThreads * 4 - 1) / (kReduceThreads * 4);
  const int64_t want = (kTargetReduceBlocks + g.c - 1) / g.c;
  const int64_t slices = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, most));
  g.slice_len = (count + slices - 1) / slices;
  g.slices = (count + g.slice_len - 1) / g.slice_len;
  return g;
}

__device__ __forceinline__ int64_t channel_offset(const ChannelGeometry& g, int64_t c, int64_t p) {
  return (p / g.hw) * g.sn + c * g.sc + (p % g.hw) * g.sq;
}

// Chan et al.'s merge of (n2, mean2, m2_2) into (n, mean, m2).
template <typename acc_t>
__device__ __forceinline__ void welford_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t n2,
                                              acc_t mean2, acc_t m2_2) {
  if (n2 == acc_t(0)) return;
  const acc_t total = n + n2, delta = mean2 - mean;
  mean += delta * (n2 / total);
  m2 += m2_2 + delta * delta * (n * n2 / total);
  n = total;
}

// The affine coefficients of y = max(0, z * a + b): a = gamma * invstd, b = beta - mean * a (null
// gamma, beta: 1, 0). One function for forward and backward, so backward recomputes the forward's
// ReLU mask exactly.
template <typename scalar_t>
__device__ __forceinline__ void affine_coefficients(const scalar_t* __restrict__ gamma,
                                                    const scalar_t* __restrict__ beta,
                                                    cuda_acc_t<scalar_t> mean,
                                                    cuda_acc_t<scalar_t> invstd, int64_t c,
                                                    cuda_acc_t<scalar_t>* a,
                                                    cuda_acc_t<scalar_t>* b) {
  using acc_t = cuda_acc_t<scalar_t>;
  *a = (gamma != nullptr ? static_cast<acc_t>(gamma[c]) : acc_t(1)) * invstd;
  *b = (beta != nullptr ? static_cast<acc_t>(beta[c]) : acc_t(0)) - mean * *a;
}

// The stored output max(0, z * a + b) (backward compares it with 0 for the mask).
template <typename scalar_t>
__device__ __forceinline__ scalar_t normalized_relu(scalar_t z, cuda_acc_t<scalar_t> a,
                                                    cuda_acc_t<scalar_t> b) {
  using acc_t = cuda_acc_t<scalar_t>;
  const acc_t v = static_cast<acc_t>(z) * a + b;
  return static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
}

// Block (channel, slice): each thread runs Welford over positions tid, tid + 128, ... of the
// slice; a fixed tree merges the threads. partial[block] = (count, mean, m2).
template <typename scalar_t>
__global__ void stats_partial_kernel(const scalar_t* __restrict__ z,
                                     cuda_acc_t<scalar_t>* __restrict__ partial,
                                     ChannelGeometry g) {
  using acc_t = cuda_acc_t<scalar_t>;
  __shared__ acc_t s_n[kReduceThreads], s_mean[kReduceThreads], s_m2[kReduceThreads];
  const int64_t block = blockIdx.x, tid = threadIdx.x;
  const int64_t c = block / g.slices, slice = block % g.slices;
  const int64_t begin = slice * g.slice_len;
  const int64_t end = std::min(g.n * g.hw, begin + g.slice_len);
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t p = begin + tid; p < end; p += kReduceThreads) {
    const acc_t x = static_cast<acc_t>(z[channel_offset(g, c, p)]);
    n += acc_t(1);
    const acc_t delta = x - mean;
    mean += delta / n;
    m2 += delta * (x - mean);
  }
  s_n[tid] = n, s_mean[tid] = mean, s_m2[tid] = m2;
  __syncthreads();
  for (int64_t width = kReduceThreads / 2; width > 0; width /= 2) {
    if (tid < width) {
      welford_merge(s_n[tid], s_mean[tid], s_m2[tid], s_n[tid + width], s_mean[tid + width],
                    s_m2[tid + width]);
    }
    __syncthreads();
  }
  if (tid == 0) {
    partial[block * 3 + 0] = s_n[0];
    partial[block * 3 + 1] = s_mean[0];
    partial[block * 3 + 2] = s_m2[0];
  }
}

// What finalizing the batch statistics reads and writes (a kernel argument).
template <typename scalar_t>
struct StatsOut {
  using acc_t = cuda_acc_t<scalar_t>;
  const acc_t* partial = nullptr;  // [C][slices][3] from stats_partial_kernel
  const scalar_t* gamma = nullptr;
  const scalar_t* beta = nullptr;
  acc_t eps = 0, momentum = 0;
  acc_t *mean = nullptr, *invstd = nullptr, *var = nullptr;
  scalar_t* running_mean = nullptr;  // null: not tracked
  scalar_t* running_var = nullptr;
  int64_t running_mean_stride = 0, running_var_stride = 0;
  bool update_running = false;  // an empty batch leaves the running statistics alone
};

// Channel c: merges its slices in order and returns the affine coefficients (a, b) of
// y = max(0, z * a + b). With `write`: stores mean, invstd = 1 / sqrt(var + eps) with the biased
// variance, the unbiased variance (0 for fewer than two values) and nn.BatchNorm2d's running
// update from the mean and the unbiased variance. An empty batch gives mean 0, variance 0.
template <typename scalar_t>
__device__ __forceinline__ void finalize_channel(const StatsOut<scalar_t>& f,
                                                 const ChannelGeometry& g, int64_t c, bool write,
                                                 cuda_acc_t<scalar_t>* a, cuda_acc_t<scalar_t>* b) {
  using acc_t = cuda_acc_t<scalar_t>;
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t s = 0; s < g.slices; ++s) {
    const acc_t* part = f.partial + (c * g.slices + s) * 3;
    welford_merge(n, mean, m2, part[0], part[1], part[2]);
  }
  const acc_t var = n > acc_t(0) ? m2 / n : acc_t(0);
  const acc_t invstd = acc_t(1) / std::sqrt(var + f.eps);
  if (write) {
    const acc_t unbiased = n > acc_t(1) ? m2 / (n - acc_t(1)) : acc_t(0);
    f.mean[c] = mean;
    f.invstd[c] = invstd;
    f.var[c] = unbiased;
    if (f.update_running && f.running_mean != nullptr) {
      scalar_t& r = f.running_mean[c * f.running_mean_stride];
      r = static_cast<scalar_t>(f.momentum * mean + (acc_t(1) - f.momentum) * acc_t(r));
    }
    if (f.update_running && f.running_var != nullptr) {
      scalar_t& r = f.running_var[c * f.running_var_stride];
      r = static_cast<scalar_t>(f.momentum * unbiased + (acc_t(1) - f.momentum) * acc_t(r));
    }
  }
  affine_coefficients(f.gamma, f.beta, mean, invstd, c, a, b);
}

// Finalize and normalize in one launch: every block merges every channel's slices into shared
// memory (the same order in each block, so the same coefficients bit for bit), block 0 also
// writes the statistics, then y = max(0, z * a[c] + b[c]) over a grid-stride share of elements.
// For channel counts whose coefficients fit in shared memory (kFusedCoefBytes).
template <typename scalar_t>
__global__ void finalize_normalize_kernel(const StatsOut<scalar_t> f,
                                          const scalar_t* __restrict__ z, scalar_t* __restrict__ y,
                                          int64_t total, int64_t c_stride, ChannelGeometry g) {
  using acc_t = cuda_acc_t<scalar_t>;
  CNNEXT_DYNAMIC_SHARED(acc_t, coef);  // [a: C][b: C]
  for (int64_t c = threadIdx.x; c < g.c; c += blockDim.x) {
    finalize_channel(f, g, c, blockIdx.x == 0, &coef[c], &coef[g.c + c]);
  }
  __syncthreads();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (i / c_stride) % g.c;
    y[i] = normalized_relu(z[i], coef[c], coef[g.c + c]);
  }
}

// The same in two launches for channel counts beyond the shared budget: thread = channel writes
// the statistics and coef = (a, b) to global memory, then normalize_kernel.
template <typename scalar_t>
__global__ void stats_finalize_kernel(const StatsOut<scalar_t> f,
                                      cuda_acc_t<scalar_t>* __restrict__ coef, ChannelGeometry g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.c) return;
  finalize_channel(f, g, c, true, &coef[c], &coef[g.c + c]);
}

template <typename scalar_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ z,
                                 const cuda_acc_t<scalar_t>* __restrict__ coef,
                                 scalar_t* __restrict__ y, int64_t total, int64_t channels,
                                 int64_t c_stride) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (i / c_stride) % channels;
    y[i] = normalized_relu(z[i], coef[c], coef[channels + c]);
  }
}

// ---- train backward -----------------------------------------------------------------------------

// What the backward's channel sums need and write (a kernel argument).
template <typename scalar_t>
struct GradStats {
  using acc_t = cuda_acc_t<scalar_t>;
  const scalar_t* gamma = nullptr;
  const scalar_t* beta = nullptr;
  const acc_t* mean = nullptr;
  const acc_t* invstd = nullptr;
  const acc_t* partial = nullptr;  // [C][slices][2] from backward_partial_kernel
  scalar_t* grad_gamma = nullptr;  // null: not asked
  scalar_t* grad_beta = nullptr;
};

// Block (channel, slice): sums of gm and gm * (z - mean) by a fixed tree, gm = grad where the
// forward's output (recomputed from z and the affine coefficients) is positive, else 0.
template <typename scalar_t>
__global__ void backward_partial_kernel(const scalar_t* __restrict__ grad,
                                        const scalar_t* __restrict__ z, const GradStats<scalar_t> f,
                                        cuda_acc_t<scalar_t>* __restrict__ partial,
                                        ChannelGeometry g) {
  using acc_t = cuda_acc_t<scalar_t>;
  __shared__ acc_t s0[kReduceThreads], s1[kReduceThreads];
  const int64_t block = blockIdx.x, tid = threadIdx.x;
  const int64_t c = block / g.slices, slice = block % g.slices;
  const int64_t begin = slice * g.slice_len;
  const int64_t end = std::min(g.n * g.hw, begin + g.slice_len);
  const acc_t m = f.mean[c];
  acc_t a, b;
  affine_coefficients(f.gamma, f.beta, m, f.invstd[c], c, &a, &b);
  acc_t sum_g = 0, sum_gx = 0;
  for (int64_t p = begin + tid; p < end; p += kReduceThreads) {
    const int64_t i = channel_offset(g, c, p);
    const bool on = !(normalized_relu(z[i], a, b) <= scalar_t(0));
    const acc_t gm = on ? static_cast<acc_t>(grad[i]) : acc_t(0);
    sum_g += gm;
    sum_gx += gm * (static_cast<acc_t>(z[i]) - m);
  }
  s0[tid] = sum_g, s1[tid] = sum_gx;
  __syncthreads();
  for (int64_t width = kReduceThreads / 2; width > 0; width /= 2) {
    if (tid < width) {
      s0[tid] += s0[tid + width];
      s1[tid] += s1[tid + width];
    }
    __syncthreads();
  }
  if (tid == 0) {
    partial[block * 2 + 0] = s0[0];
    partial[block * 2 + 1] = s1[0];
  }
}

// Channel c: adds its slices in order into k = (a, b, k1, k2, k3): the forward's affine
// coefficients (for the ReLU mask) and those of
// dz = gm * k1 + (z - mean) * k2 + k3 = scale * (gm - mean(gm) - xhat * mean(gm * xhat)).
// With `write`: grad_gamma = sum_gx * invstd and grad_beta = sum_g where asked.
template <typename scalar_t>
__device__ __forceinline__ void grad_channel(const GradStats<scalar_t>& f, const ChannelGeometry& g,
                                             int64_t c, bool write, cuda_acc_t<scalar_t> (&k)[5]) {
  using acc_t = cuda_acc_t<scalar_t>;
  acc_t sum_g = 0, sum_gx = 0;
  for (int64_t s = 0; s < g.slices; ++s) {
    sum_g += f.partial[(c * g.slices + s) * 2 + 0];
    sum_gx += f.partial[(c * g.slices + s) * 2 + 1];
  }
  const acc_t is = f.invstd[c];
  const acc_t scale = (f.gamma != nullptr ? static_cast<acc_t>(f.gamma[c]) : acc_t(1)) * is;
  const acc_t count = static_cast<acc_t>(g.n * g.hw);
  if (write && f.grad_gamma != nullptr) f.grad_gamma[c] = static_cast<scalar_t>(sum_gx * is);
  if (write && f.grad_beta != nullptr) f.grad_beta[c] = static_cast<scalar_t>(sum_g);
  affine_coefficients(f.gamma, f.beta, f.mean[c], is, c, &k[0], &k[1]);
  k[2] = scale;
  k[3] = count > acc_t(0) ? -scale * is * is * sum_gx / count : acc_t(0);
  k[4] = count > acc_t(0) ? -scale * sum_g / count : acc_t(0);
}

// dz = gm * k1[c] + (z - mean[c]) * k2[c] + k3[c] for element i (gm as in backward_partial_kernel).
template <typename scalar_t>
__device__ __forceinline__ scalar_t grad_conv_output(scalar_t grad, scalar_t z,
                                                     cuda_acc_t<scalar_t> mean,
                                                     const cuda_acc_t<scalar_t>* k, int64_t step) {
  using acc_t = cuda_acc_t<scalar_t>;
  const bool on = !(normalized_relu(z, k[0], k[step]) <= scalar_t(0));
  const acc_t gm = on ? static_cast<acc_t>(grad) : acc_t(0);
  return static_cast<scalar_t>(gm * k[2 * step] + (static_cast<acc_t>(z) - mean) * k[3 * step] +
                               k[4 * step]);
}

// Channel sums and dz in one launch, as finalize_normalize_kernel: every block derives every
// channel's coefficients into shared memory ([5][C]), block 0 writes grad_gamma / grad_beta.
template <typename scalar_t>
__global__ void finalize_grad_kernel(const GradStats<scalar_t> f, const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ z, scalar_t* __restrict__ dz,
                                     int64_t total, int64_t c_stride, ChannelGeometry g) {
  using acc_t = cuda_acc_t<scalar_t>;
  CNNEXT_DYNAMIC_SHARED(acc_t, coef);
  for (int64_t c = threadIdx.x; c < g.c; c += blockDim.x) {
    acc_t k[5];
    grad_channel(f, g, c, blockIdx.x == 0, k);
    for (int64_t j = 0; j < 5; ++j) coef[j * g.c + c] = k[j];
  }
  __syncthreads();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (i / c_stride) % g.c;
    dz[i] = grad_conv_output(grad[i], z[i], f.mean[c], coef + c, g.c);
  }
}

// The same in two launches beyond the shared budget: thread = channel writes coef [5][C] to
// global memory, then grad_conv_output_kernel.
template <typename scalar_t>
__global__ void backward_finalize_kernel(const GradStats<scalar_t> f,
                                         cuda_acc_t<scalar_t>* __restrict__ coef,
                                         ChannelGeometry g) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.c) return;
  acc_t k[5];
  grad_channel(f, g, c, true, k);
  for (int64_t j = 0; j < 5; ++j) coef[j * g.c + c] = k[j];
}

template <typename scalar_t>
__global__ void grad_conv_output_kernel(const GradStats<scalar_t> f,
                                        const scalar_t* __restrict__ grad,
                                        const scalar_t* __restrict__ z,
                                        const cuda_acc_t<scalar_t>* __restrict__ coef,
                                        scalar_t* __restrict__ dz, int64_t total, int64_t c_stride,
                                        ChannelGeometry g) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (i / c_stride) % g.c;
    dz[i] = grad_conv_output(grad[i], z[i], f.mean[c], coef + c, g.c);
  }
}

// ---- host ---------------------------------------------------------------------------------------

at::MemoryFormat format_of(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

unsigned int channel_blocks(int64_t c) { return ceil_div(c, kThreads); }

// The training forward's convolution z = conv(input, weight) + conv_bias in the input's layout,
// without split-K: the statistics and the normalization then take two more launches only.
at::Tensor train_conv(const Conv2dParams& p, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& conv_bias, ConvAlgorithm algo) {
  algo.split_k = false;
  return conv_forward_cuda(kForwardOp, p, input, weight, algo, ConvEpilogue::bias(conv_bias));
}

// Blocks of the launches that first derive every channel's coefficients (each block repeats that
// work, so their number is capped) and the shared memory those coefficients may take.
constexpr int64_t kFusedBlocks = 1024, kFusedCoefBytes = 40 * 1024;

dim3 fused_grid(int64_t work) {
  return dim3(
      static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(work, kThreads), 1, kFusedBlocks)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view algo_name, int64_t max_col_bytes) {
  const Conv2dParams p = fused::check_forward(
      kForwardOp, input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training,
      eps, stride, padding, dilation, groups, max_col_bytes, /*allow_reduced=*/true);
  const ConvAlgorithm algo =
      fused::conv_algorithm(kForwardOp, algo_name, max_col_bytes, p, /*cuda=*/true);
  CNNEXT_DEVICE_GUARD(input);
  const auto options = input.options();
  const auto stats_options = options.dtype(fused::stats_type(input.scalar_type()));
  at::Tensor save_mean = at::empty({p.c_out}, stats_options);
  at::Tensor save_invstd = at::empty({p.c_out}, stats_options);
  const bool cl = is_channels_last(input);
  const at::MemoryFormat fmt = format_of(cl);
  const cudaStream_t stream = current_stream();

  if (!training) {
    // Per-channel temporaries only: the module's parameters and buffers are never written.
    at::Tensor scale = at::empty({p.c_out}, options), shift = at::empty({p.c_out}, options);
    const at::Tensor rm = running_mean->contiguous(), rv = running_var->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "conv_bn_relu_eval", [&] {
          using acc_t = cuda_acc_t<scalar_t>;
          CNNEXT_LAUNCH((eval_stats_kernel<scalar_t>), dim3(channel_blocks(p.c_out)),
                        dim3(kThreads), 0, stream, rm.const_data_ptr<scalar_t>(),
                        rv.const_data_ptr<scalar_t>(), static_cast<acc_t>(eps),
                        save_mean.mutable_data_ptr<acc_t>(), save_invstd.mutable_data_ptr<acc_t>(),
                        p.c_out);
          CNNEXT_LAUNCH((fold_channels_kernel<scalar_t>), dim3(channel_blocks(p.c_out)),
                        dim3(kThreads), 0, stream, ptr_or_null<scalar_t>(conv_bias),
                        ptr_or_null<scalar_t>(bn_weight), ptr_or_null<scalar_t>(bn_bias),
                        save_mean.const_data_ptr<acc_t>(), save_invstd.const_data_ptr<acc_t>(),
                        scale.mutable_data_ptr<scalar_t>(), shift.mutable_data_ptr<scalar_t>(),
                        p.c_out);
        });
    const at::Tensor output = conv_forward_cuda(kForwardOp, p, input, weight, algo,
                                                ConvEpilogue::affine(scale, shift, /*relu=*/true));
    // Two distinct empty tensors: outputs must not alias.
    return {output, save_mean, save_invstd, at::empty({0}, options), at::empty({0}, options)};
  }

  const at::Tensor z = train_conv(p, input, weight, conv_bias, algo).contiguous(fmt);
  at::Tensor output = at::empty(z.sizes(), options.memory_format(fmt));
  at::Tensor batch_var = at::empty({p.c_out}, stats_options);
  const ChannelGeometry g = channel_geometry(p, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv_bn_relu_train", [&] {
        using acc_t = cuda_acc_t<scalar_t>;
        const int64_t total = z.numel();
        const int64_t coef_bytes = 2 * p.c_out * static_cast<int64_t>(sizeof(acc_t));
        const bool one_pass = coef_bytes <= kFusedCoefBytes;
        // The one workspace: slice partials, and the coefficients when they do not fit shared.
        at::Tensor work =
            at::empty({p.c_out * g.slices * 3 + (one_pass ? 0 : 2 * p.c_out)}, stats_options);
        acc_t* partial = work.mutable_data_ptr<acc_t>();
        CNNEXT_LAUNCH((stats_partial_kernel<scalar_t>),
                      dim3(static_cast<unsigned int>(p.c_out * g.slices)), dim3(kReduceThreads), 0,
                      stream, z.const_data_ptr<scalar_t>(), partial, g);
        StatsOut<scalar_t> f;
        f.partial = partial;
        f.gamma = ptr_or_null<scalar_t>(bn_weight), f.beta = ptr_or_null<scalar_t>(bn_bias);
        f.eps = static_cast<acc_t>(eps), f.momentum = static_cast<acc_t>(momentum);
        f.mean = save_mean.mutable_data_ptr<acc_t>();
        f.invstd = save_invstd.mutable_data_ptr<acc_t>();
        f.var = batch_var.mutable_data_ptr<acc_t>();
        // An empty batch has no statistics: the running ones stay as they are.
        f.update_running = total > 0;
        if (given(running_mean)) {
          f.running_mean = running_mean->mutable_data_ptr<scalar_t>();
          f.running_mean_stride = running_mean->stride(0);
        }
        if (given(running_var)) {
          f.running_var = running_var->mutable_data_ptr<scalar_t>();
          f.running_var_stride = running_var->stride(0);
        }
        if (one_pass) {
          CNNEXT_LAUNCH((finalize_normalize_kernel<scalar_t>), fused_grid(total), dim3(kThreads),
                        static_cast<std::size_t>(coef_bytes), stream, f,
                        z.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), total,
                        g.sc, g);
          return;
        }
        acc_t* coef = partial + p.c_out * g.slices * 3;
        CNNEXT_LAUNCH((stats_finalize_kernel<scalar_t>), dim3(channel_blocks(p.c_out)),
                      dim3(kThreads), 0, stream, f, coef, g);
        if (total > 0) {
          CNNEXT_LAUNCH((normalize_kernel<scalar_t>), grid_for(total), dim3(kThreads), 0, stream,
                        z.const_data_ptr<scalar_t>(), coef, output.mutable_data_ptr<scalar_t>(),
                        total, p.c_out, g.sc);
        }
      });
  return {output, save_mean, save_invstd, batch_var, z};
}

// Training: `input` is read only for the weight's gradient and `weight` only for the input's;
// otherwise they may be placeholders of the right shape (see ConvBNReLU2dBackward in
// conv_bn_relu.h). Eval reads both, and takes the ReLU mask from
// conv_output (a copy of the forward output) or, when that is empty, reruns the folded convolution.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& conv_output, const at::Tensor& input,
    const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo_name, int64_t max_col_bytes, std::array<bool, 5> mask) {
  const Conv2dParams p = fused::check_backward(
      kBackwardOp, grad_output, conv_output, input, weight, conv_bias, bn_weight, bn_bias,
      save_mean, save_invstd, training, stride, padding, dilation, groups, max_col_bytes,
      /*allow_reduced=*/true);
  const ConvAlgorithm algo =
      fused::conv_algorithm(kBackwardOp, algo_name, max_col_bytes, p, /*cuda=*/true);
  CNNEXT_DEVICE_GUARD(grad_output);
  const auto options = grad_output.options();
  const auto stats_options = options.dtype(fused::stats_type(grad_output.scalar_type()));
  // The layout the forward computed in: conv_output's (training), the input's (eval).
  const bool cl = is_channels_last(training ? conv_output : input);
  const at::MemoryFormat fmt = format_of(cl);
  const at::Tensor g = grad_output.contiguous(fmt);
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const cudaStream_t stream = current_stream();
  const int64_t k = p.c_in_per_group() * p.kh * p.kw;
  auto vec_or_none = [&](bool want) { return at::empty({want ? p.c_out : 0}, options); };
  at::Tensor grad_gamma = vec_or_none(mask[3]), grad_beta = vec_or_none(mask[4]);
  at::Tensor grad_input = at::empty({0}, options), grad_weight = at::empty({0}, options);
  at::Tensor grad_bias = vec_or_none(mask[2]);
  auto backward = [&](const at::Tensor& grad, const at::Tensor& w, std::array<bool, 3> m) {
    return conv_backward_cuda(kBackwardOp, p, grad, input, w, m, algo);
  };

  if (training) {
    const at::Tensor z = conv_output.contiguous(fmt);
    const bool need_conv = mask[0] || mask[1] || mask[2];
    at::Tensor dz = need_conv ? at::empty(z.sizes(), options.memory_format(fmt)) : at::Tensor();
    const ChannelGeometry geo = channel_geometry(p, cl);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, g.scalar_type(), "conv_bn_relu_backward_train", [&] {
          using acc_t = cuda_acc_t<scalar_t>;
          const int64_t total = need_conv ? z.numel() : 0;
          const int64_t coef_bytes = 5 * p.c_out * static_cast<int64_t>(sizeof(acc_t));
          const bool one_pass = coef_bytes <= kFusedCoefBytes;
          at::Tensor work =
              at::empty({p.c_out * geo.slices * 2 + (one_pass ? 0 : 5 * p.c_out)}, stats_options);
          GradStats<scalar_t> f;
          f.gamma = ptr_or_null<scalar_t>(bn_weight), f.beta = ptr_or_null<scalar_t>(bn_bias);
          f.mean = mean.const_data_ptr<acc_t>(), f.invstd = invstd.const_data_ptr<acc_t>();
          f.partial = work.const_data_ptr<acc_t>();
          f.grad_gamma = mask[3] ? grad_gamma.mutable_data_ptr<scalar_t>() : nullptr;
          f.grad_beta = mask[4] ? grad_beta.mutable_data_ptr<scalar_t>() : nullptr;
          CNNEXT_LAUNCH((backward_partial_kernel<scalar_t>),
                        dim3(static_cast<unsigned int>(p.c_out * geo.slices)), dim3(kReduceThreads),
                        0, stream, g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), f,
                        work.mutable_data_ptr<acc_t>(), geo);
          scalar_t* dzp = need_conv ? dz.mutable_data_ptr<scalar_t>() : nullptr;
          if (one_pass) {
            CNNEXT_LAUNCH((finalize_grad_kernel<scalar_t>), fused_grid(total), dim3(kThreads),
                          static_cast<std::size_t>(coef_bytes), stream, f,
                          g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), dzp, total,
                          geo.sc, geo);
            return;
          }
          acc_t* coef = work.mutable_data_ptr<acc_t>() + p.c_out * geo.slices * 2;
          CNNEXT_LAUNCH((backward_finalize_kernel<scalar_t>), dim3(channel_blocks(p.c_out)),
                        dim3(kThreads), 0, stream, f, coef, geo);
          if (total > 0) {
            CNNEXT_LAUNCH((grad_conv_output_kernel<scalar_t>), grid_for(total), dim3(kThreads), 0,
                          stream, f, g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                          coef, dzp, total, geo.sc, geo);
          }
        });
    if (need_conv) {
      auto [gi, gw, gb] = backward(dz, weight, {mask[0], mask[1], mask[2]});
      grad_input = gi, grad_weight = gw, grad_bias = gb;
    }
    return {grad_input, grad_weight, grad_bias, grad_gamma, grad_beta};
  }

  // Eval: the gradient through the folded convolution, then back to the module's parameters.
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) {
    return {grad_input, grad_weight, grad_bias, grad_gamma, grad_beta};
  }
  const at::Tensor w = weight.contiguous();
  at::Tensor scale = at::empty({p.c_out}, options), shift = at::empty({p.c_out}, options);
  // The folded weight only where the input's gradient needs it.
  at::Tensor w_fold = mask[0] ? at::empty(weight.sizes(), options) : w;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "conv_bn_relu_backward_fold", [&] {
        using acc_t = cuda_acc_t<scalar_t>;
        CNNEXT_LAUNCH((fold_channels_kernel<scalar_t>), dim3(channel_blocks(p.c_out)),
                      dim3(kThreads), 0, stream, ptr_or_null<scalar_t>(conv_bias),
                      ptr_or_null<scalar_t>(bn_weight), ptr_or_null<scalar_t>(bn_bias),
                      mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                      scale.mutable_data_ptr<scalar_t>(), shift.mutable_data_ptr<scalar_t>(),
                      p.c_out);
        if (mask[0]) {
          CNNEXT_LAUNCH((scale_weight_kernel<scalar_t>), dim3(ceil_div(p.c_out * k, kThreads)),
                        dim3(kThreads), 0, stream, w.const_data_ptr<scalar_t>(),
                        scale.const_data_ptr<scalar_t>(), w_fold.mutable_data_ptr<scalar_t>(),
                        p.c_out, k);
        }
      });
  // The mask's source: the copy of the forward output when given (relu keeps the sign, zero and
  // NaN of the pre-activation, so the mask is the same), else the forward's pre-activation bit
  // for bit (same kernel, same epilogue minus the ReLU).
  const at::Tensor pre = conv_output.numel() != 0
                             ? conv_output.contiguous(fmt)
                             : conv_forward_cuda(kBackwardOp, p, input, weight, algo,
                                                 ConvEpilogue::affine(scale, shift, /*relu=*/false))
                                   .contiguous(fmt);
  at::Tensor gm = at::empty(g.sizes(), options.memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "conv_bn_relu_backward_mask", [&] {
        const int64_t total = g.numel();
        if (total > 0) {
          CNNEXT_LAUNCH((relu_mask_kernel<scalar_t>), grid_for(total), dim3(kThreads), 0, stream,
                        g.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(),
                        gm.mutable_data_ptr<scalar_t>(), total);
        }
      });
  const bool need_gw = mask[1] || mask[3], need_gb = mask[2] || mask[3] || mask[4];
  auto [gi, gw_fold, gb_fold] = backward(gm, w_fold, {mask[0], need_gw, need_gb});
  grad_input = gi;
  if (mask[1]) grad_weight = at::empty(weight.sizes(), options);
  if (need_gw || need_gb) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, g.scalar_type(), "conv_bn_relu_backward_eval", [&] {
          using acc_t = cuda_acc_t<scalar_t>;
          auto out = [](bool want, at::Tensor& t) {
            return want ? t.mutable_data_ptr<scalar_t>() : nullptr;
          };
          // gb is read for grad_b, grad_beta and grad_gamma only, gw for grad_w and grad_gamma
          // only: each is computed whenever it is read.
          CNNEXT_LAUNCH((fold_backward_kernel<scalar_t>), dim3(static_cast<unsigned int>(p.c_out)),
                        dim3(kReduceThreads), 0, stream,
                        need_gw ? gw_fold.const_data_ptr<scalar_t>() : nullptr,
                        need_gb ? gb_fold.const_data_ptr<scalar_t>() : nullptr,
                        w.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(conv_bias),
                        scale.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
                        invstd.const_data_ptr<acc_t>(), out(mask[1], grad_weight),
                        out(mask[2], grad_bias), out(mask[3], grad_gamma), out(mask[4], grad_beta),
                        k);
        });
  }
  return {grad_input, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace cnnext

CNNEXT_CUDA_IMPL(m) {
  m.impl("conv_bn_relu", &cnnext::conv_bn_relu_forward_cuda);
  m.impl("conv_bn_relu_backward", &cnnext::conv_bn_relu_backward_cuda);
}
