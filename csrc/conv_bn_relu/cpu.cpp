// Fused Conv2d + BatchNorm2d + ReLU on the CPU, on the direct or im2col convolution through the
// convolution dispatch (common/conv_dispatch.h). Eval: BatchNorm is folded into per-channel
// temporaries s = gamma / sqrt(var + eps), b' = (b - mean) * s + beta, and the convolution's store
// computes max(0, acc * s + b') for each output tile: no extra pass, and no folded copy of the
// weight (which would cost more than the convolution for deep layers at batch 1). Train: the
// convolution, then the per-channel batch statistics in one deterministic pass (runs of at most
// kRun values reduced exactly while in cache, merged in a fixed order by Chan's formula, in
// double), then normalise, scale, shift and ReLU in one pass. Backward: BatchNorm's two channel
// sums under the ReLU mask in one pass (fixed-order partials), the gradient of the convolution
// output in a second, then the convolution's own backward. The mask is recomputed (from the saved
// statistics in training, by rerunning the folded convolution in eval), never read from the output,
// which callers may modify in place. Every sum has an order that depends on the shapes only.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/conv_dispatch.h"
#include "common/cpu_parallel.h"
#include "common/library.h"
#include "common/params.h"
#include "conv_bn_relu/conv_bn_relu.h"

namespace cnnext {
namespace {

using fused::given;
using fused::kBackwardOp;
using fused::kForwardOp;

constexpr int64_t kRun = 4096;  // values of one exactly-reduced run (in L1/L2)
constexpr int kLanes = 8;       // independent partial sums, so the loops vectorise
constexpr int64_t kBuf = 512;   // positions of a masked-gradient block (on the stack)

// Elements per item: the tasks' grain (common/cpu_parallel.h).
int64_t task_grain(int64_t elems_per_item) { return cpu_grain_elements(elems_per_item); }

// A dense activation in its memory format: n * c planes of hw values (NCHW) or n * hw rows of
// c values (NHWC). The convolutions return their output dense in the input's format.
struct Dense {
  int64_t n = 0, c = 0, hw = 0;
  bool cl = false;
  int64_t numel() const { return n * c * hw; }
};

Dense dense_of(const Conv2dParams& p, bool cl) { return {p.n, p.c_out, p.h_out * p.w_out, cl}; }

at::MemoryFormat format_of(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return given(t) ? t->const_data_ptr<T>() : nullptr;
}

// v where cond holds, else +0 (also for an infinite or NaN v, as torch's threshold_backward), by
// masking the bits: GCC if-converts and vectorises this where it leaves `cond ? v : 0` a branch.
template <typename T>
inline T keep_if(bool cond, T v) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == sizeof(U));
  U bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= U(0) - U(cond);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// ---- eval: folding BatchNorm into the convolution -----------------------------------------------

// BatchNorm folded per output channel: scale = gamma * invstd, shift = (b - mean) * scale + beta
// (null b, gamma, beta: 0, 1, 0), so that relu(bn(conv(x) + b)) = relu(conv(x) * scale + shift).
template <typename T>
void fold_channels(int64_t c_out, const T* b, const T* gamma, const T* beta, const T* mean,
                   const T* invstd, T* scale, T* shift) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  for (int64_t o = 0; o < c_out; ++o) {
    const acc_t s = (gamma ? acc_t(gamma[o]) : acc_t(1)) * acc_t(invstd[o]);
    const acc_t bias = b ? acc_t(b[o]) : acc_t(0), beta_o = beta ? acc_t(beta[o]) : acc_t(0);
    scale[o] = static_cast<T>(s);
    shift[o] = static_cast<T>((bias - acc_t(mean[o])) * s + beta_o);
  }
}

// Gradients of the folded parameters back to the module's, with dw' = dL/dw' and db' = dL/db' of
// the folded convolution (w' = w * s, b' = shift): dw = dw' * s, db = db' * s, dbeta = db',
// dgamma = invstd * (sum_k dw'[o, k] w[o, k] + db'[o] (b[o] - mean[o])). Null outputs are not
// computed. grad_w may be gw itself: each row is read for dgamma before it is scaled.
template <typename T>
void fold_backward(int64_t c_out, int64_t k, const T* gw, const T* gb, const T* w, const T* b,
                   const T* scale, const T* mean, const T* invstd, T* grad_w, T* grad_b,
                   T* grad_gamma, T* grad_beta) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  at::parallel_for(0, c_out, task_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const acc_t s = acc_t(scale[o]);
      const T* gw_o = gw + o * k;
      if (grad_gamma != nullptr) {
        const T* w_o = w + o * k;
        acc_t lanes[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= k; i += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) lanes[j] += acc_t(gw_o[i + j]) * acc_t(w_o[i + j]);
        }
        acc_t dot = 0;
        for (int64_t j = 0; j < kLanes; ++j) dot += lanes[j];
        for (; i < k; ++i) dot += acc_t(gw_o[i]) * acc_t(w_o[i]);
        dot += acc_t(gb[o]) * ((b ? acc_t(b[o]) : acc_t(0)) - acc_t(mean[o]));
        grad_gamma[o] = static_cast<T>(dot * acc_t(invstd[o]));
      }
      if (grad_w != nullptr) {
        for (int64_t i = 0; i < k; ++i) grad_w[o * k + i] = static_cast<T>(acc_t(gw_o[i]) * s);
      }
      if (grad_b != nullptr) grad_b[o] = static_cast<T>(acc_t(gb[o]) * s);
      if (grad_beta != nullptr) grad_beta[o] = gb[o];
    }
  });
}

// grad * !(pre <= 0): ReLU's backward as torch's threshold_backward, which reads the output (whose
// sign is the pre-activation's) and lets the gradient through at a NaN.
template <typename T>
void relu_mask(int64_t numel, const T* g, const T* y, T* out) {
  at::parallel_for(0, numel, task_grain(1), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = keep_if(!(y[i] <= T(0)), g[i]);
  });
}

// ---- train: batch statistics --------------------------------------------------------------------

// Count, mean and sum of squared deviations of a set of values; merge() is Chan et al.'s
// pairwise update, exact up to rounding whatever the sizes of the two sets.
template <typename acc_t>
struct Moments {
  acc_t count = 0, mean = 0, m2 = 0;
  void merge(acc_t n, acc_t m, acc_t q) {
    if (n == 0) return;
    const acc_t total = count + n, delta = m - mean;
    mean += delta * (n / total);
    m2 += q + delta * delta * (count * n / total);
    count = total;
  }
};

// Moments of a contiguous run, in two passes over it while it is in cache.
template <typename T, typename acc_t>
void run_moments(const T* x, int64_t count, acc_t* mean, acc_t* m2) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) s[j] += acc_t(x[i + j]);
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) sum += s[j];
  for (; i < count; ++i) sum += acc_t(x[i]);
  const acc_t m = sum / acc_t(count);
  acc_t q[kLanes] = {};
  for (i = 0; i + kLanes <= count; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = acc_t(x[i + j]) - m;
      q[j] += d * d;
    }
  }
  acc_t sq = 0;
  for (int64_t j = 0; j < kLanes; ++j) sq += q[j];
  for (; i < count; ++i) {
    const acc_t d = acc_t(x[i]) - m;
    sq += d * d;
  }
  *mean = m;
  *m2 = sq;
}

// Per-channel moments of z. Partials (per plane piece, or per chunk of NHWC rows) are computed in
// parallel and merged per channel in index order: the result does not depend on the threads.
template <typename T, typename acc_t>
std::vector<Moments<acc_t>> channel_moments(const Dense& d, const T* z) {
  std::vector<Moments<acc_t>> out(d.c);
  if (d.numel() == 0) return out;
  if (!d.cl) {
    const int64_t pieces = div_up(d.hw, kRun), per_c = d.n * pieces;
    std::vector<acc_t> pmean(d.c * per_c), pm2(d.c * per_c);
    at::parallel_for(0, d.n * d.c * pieces, task_grain(std::min(d.hw, kRun)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t i = begin; i < end; ++i) {
                         const int64_t piece = i % pieces, plane = i / pieces;
                         const int64_t c = plane % d.c, n = plane / d.c, q0 = piece * kRun;
                         const int64_t slot = c * per_c + n * pieces + piece;
                         run_moments<T, acc_t>(z + plane * d.hw + q0, std::min(kRun, d.hw - q0),
                                               &pmean[slot], &pm2[slot]);
                       }
                     });
    at::parallel_for(0, d.c, task_grain(per_c), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t j = 0; j < per_c; ++j) {
          const int64_t len = std::min(kRun, d.hw - (j % pieces) * kRun);
          out[c].merge(acc_t(len), pmean[c * per_c + j], pm2[c * per_c + j]);
        }
      }
    });
    return out;
  }
  // NHWC: a chunk of rows gives per-channel moments (vectorised across the channels).
  const int64_t rows = d.n * d.hw, chunk = std::max<int64_t>(1, kRun / d.c);
  const int64_t chunks = div_up(rows, chunk);
  std::vector<acc_t> pmean(chunks * d.c), pm2(chunks * d.c);
  at::parallel_for(0, chunks, task_grain(chunk * d.c), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * chunk, nr = std::min(chunk, rows - r0);
      acc_t* m = pmean.data() + k * d.c;
      acc_t* q = pm2.data() + k * d.c;
      std::fill(m, m + d.c, acc_t(0));
      std::fill(q, q + d.c, acc_t(0));
      for (int64_t r = r0; r < r0 + nr; ++r) {
        const T* row = z + r * d.c;
        for (int64_t c = 0; c < d.c; ++c) m[c] += acc_t(row[c]);
      }
      for (int64_t c = 0; c < d.c; ++c) m[c] /= acc_t(nr);
      for (int64_t r = r0; r < r0 + nr; ++r) {
        const T* row = z + r * d.c;
        for (int64_t c = 0; c < d.c; ++c) {
          const acc_t dv = acc_t(row[c]) - m[c];
          q[c] += dv * dv;
        }
      }
    }
  });
  at::parallel_for(0, d.c, task_grain(chunks), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t nr = std::min(chunk, rows - k * chunk);
        out[c].merge(acc_t(nr), pmean[k * d.c + c], pm2[k * d.c + c]);
      }
    }
  });
  return out;
}

// a = gamma * invstd, b = beta - mean * a: y = max(0, z * a + b). Computed from the saved (rounded)
// statistics in forward and backward alike, so backward recomputes the forward's ReLU mask
// exactly.
template <typename T>
void affine_coefficients(int64_t channels, const T* gamma, const T* beta, const T* mean,
                         const T* invstd, T* a, T* b) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t scale = (gamma ? acc_t(gamma[c]) : acc_t(1)) * acc_t(invstd[c]);
    a[c] = static_cast<T>(scale);
    b[c] = static_cast<T>((beta ? acc_t(beta[c]) : acc_t(0)) - acc_t(mean[c]) * scale);
  }
}

// y = max(0, z * a[c] + b[c]): normalise, scale, shift and ReLU in one pass.
template <typename T>
void normalize_relu(const Dense& d, const T* z, const T* a, const T* b, T* y) {
  if (!d.cl) {
    at::parallel_for(0, d.n * d.c, task_grain(d.hw), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const T av = a[plane % d.c], bv = b[plane % d.c];
        const T* src = z + plane * d.hw;
        T* dst = y + plane * d.hw;
        for (int64_t i = 0; i < d.hw; ++i) dst[i] = std::max(src[i] * av + bv, T(0));
      }
    });
  } else {
    at::parallel_for(0, d.n * d.hw, task_grain(d.c), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* src = z + r * d.c;
        T* dst = y + r * d.c;
        for (int64_t c = 0; c < d.c; ++c) dst[c] = std::max(src[c] * a[c] + b[c], T(0));
      }
    });
  }
}

// ---- train backward -----------------------------------------------------------------------------

// Per channel: sum of gm and of gm * (z - mean), gm = (z * a + b <= 0 ? 0 : g), the forward's
// ReLU mask. Same partial / ordered merge structure as channel_moments.
template <typename T, typename acc_t>
std::vector<std::array<acc_t, 2>> backward_sums(const Dense& d, const T* g, const T* z,
                                                const T* mean, const T* a, const T* b) {
  std::vector<std::array<acc_t, 2>> out(d.c, {acc_t(0), acc_t(0)});
  if (d.numel() == 0) return out;
  if (!d.cl) {
    const int64_t pieces = div_up(d.hw, kRun), per_c = d.n * pieces;
    std::vector<std::array<acc_t, 2>> part(d.c * per_c);
    at::parallel_for(0, d.n * d.c * pieces, task_grain(std::min(d.hw, kRun)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t i = begin; i < end; ++i) {
                         const int64_t piece = i % pieces, plane = i / pieces;
                         const int64_t c = plane % d.c, n = plane / d.c, q0 = piece * kRun;
                         const int64_t len = std::min(kRun, d.hw - q0), off = plane * d.hw + q0;
                         const acc_t m = acc_t(mean[c]);
                         const T av = a[c], bv = b[c];
                         // The masked gradient of kBuf positions first (a vectorised select), then
                         // the two sums over it in kLanes running sums (vectorised too), added in a
                         // fixed order.
                         T gm[kBuf];
                         acc_t s0[kLanes] = {}, s1[kLanes] = {};
                         acc_t t0 = 0, t1 = 0;
                         for (int64_t q0 = 0; q0 < len; q0 += kBuf) {
                           const int64_t nb = std::min(kBuf, len - q0);
                           const T* zq = z + off + q0;
                           const T* gq = g + off + q0;
                           for (int64_t q = 0; q < nb; ++q)
                             gm[q] = keep_if(!(zq[q] * av + bv <= T(0)), gq[q]);
                           int64_t q = 0;
                           for (; q + kLanes <= nb; q += kLanes) {
                             for (int64_t j = 0; j < kLanes; ++j) {
                               s0[j] += acc_t(gm[q + j]);
                               s1[j] += acc_t(gm[q + j]) * (acc_t(zq[q + j]) - m);
                             }
                           }
                           for (; q < nb; ++q) {
                             t0 += acc_t(gm[q]);
                             t1 += acc_t(gm[q]) * (acc_t(zq[q]) - m);
                           }
                         }
                         for (int64_t j = 0; j < kLanes; ++j) t0 += s0[j], t1 += s1[j];
                         part[c * per_c + n * pieces + piece] = {t0, t1};
                       }
                     });
    at::parallel_for(0, d.c, task_grain(per_c), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t j = 0; j < per_c; ++j) {
          out[c][0] += part[c * per_c + j][0];
          out[c][1] += part[c * per_c + j][1];
        }
      }
    });
    return out;
  }
  const int64_t rows = d.n * d.hw, chunk = std::max<int64_t>(1, kRun / d.c);
  const int64_t chunks = div_up(rows, chunk);
  std::vector<acc_t> p0(chunks * d.c), p1(chunks * d.c), m(d.c);
  for (int64_t c = 0; c < d.c; ++c) m[c] = acc_t(mean[c]);
  at::parallel_for(0, chunks, task_grain(chunk * d.c), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * chunk, nr = std::min(chunk, rows - r0);
      acc_t* s0 = p0.data() + k * d.c;
      acc_t* s1 = p1.data() + k * d.c;
      std::fill(s0, s0 + d.c, acc_t(0));
      std::fill(s1, s1 + d.c, acc_t(0));
      for (int64_t r = r0; r < r0 + nr; ++r) {
        const int64_t off = r * d.c;
        for (int64_t c = 0; c < d.c; ++c) {
          const T zv = z[off + c];
          const acc_t gm = acc_t(keep_if(!(zv * a[c] + b[c] <= T(0)), g[off + c]));
          s0[c] += gm;
          s1[c] += gm * (acc_t(zv) - m[c]);
        }
      }
    }
  });
  at::parallel_for(0, d.c, task_grain(chunks), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < chunks; ++k) {
        out[c][0] += p0[k * d.c + c];
        out[c][1] += p1[k * d.c + c];
      }
    }
  });
  return out;
}

// dz = gm * k1[c] + (z - mean[c]) * k2[c] + k3[c], gm = (z * a + b <= 0 ? 0 : g).
template <typename T>
void grad_conv_output(const Dense& d, const T* g, const T* z, const T* a, const T* b, const T* mean,
                      const T* k1, const T* k2, const T* k3, T* dz) {
  auto at_ = [&](int64_t i, int64_t c) {
    const T gm = keep_if(!(z[i] * a[c] + b[c] <= T(0)), g[i]);
    dz[i] = gm * k1[c] + (z[i] - mean[c]) * k2[c] + k3[c];
  };
  if (!d.cl) {
    at::parallel_for(0, d.n * d.c, task_grain(d.hw), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % d.c;
        for (int64_t i = plane * d.hw; i < (plane + 1) * d.hw; ++i) at_(i, c);
      }
    });
  } else {
    at::parallel_for(0, d.n * d.hw, task_grain(d.c), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < d.c; ++c) at_(r * d.c + c, c);
      }
    });
  }
}

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view algo_name, int64_t max_col_bytes) {
  const Conv2dParams p = fused::check_forward(
      kForwardOp, input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training,
      eps, stride, padding, dilation, groups, max_col_bytes, /*allow_reduced=*/false);
  const ConvAlgorithm algo =
      fused::conv_algorithm(kForwardOp, algo_name, max_col_bytes, p, /*cuda=*/false);
  const auto options = input.options();
  at::Tensor save_mean = at::empty({p.c_out}, options);
  at::Tensor save_invstd = at::empty({p.c_out}, options);
  if (!training) {
    // Per-channel temporaries only: the module's parameters and buffers are never written.
    at::Tensor scale = at::empty({p.c_out}, options), shift = at::empty({p.c_out}, options);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_bn_relu_fold", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const at::Tensor rm = running_mean->contiguous(), rv = running_var->contiguous();
      const scalar_t* var = rv.const_data_ptr<scalar_t>();
      scalar_t* mean_out = save_mean.mutable_data_ptr<scalar_t>();
      scalar_t* invstd_out = save_invstd.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < p.c_out; ++c) {
        mean_out[c] = rm.const_data_ptr<scalar_t>()[c];
        invstd_out[c] = static_cast<scalar_t>(acc_t(1) / std::sqrt(acc_t(var[c]) + acc_t(eps)));
      }
      fold_channels<scalar_t>(p.c_out, ptr_or_null<scalar_t>(conv_bias),
                              ptr_or_null<scalar_t>(bn_weight), ptr_or_null<scalar_t>(bn_bias),
                              mean_out, invstd_out, scale.mutable_data_ptr<scalar_t>(),
                              shift.mutable_data_ptr<scalar_t>());
    });
    const at::Tensor output =
        conv_forward_cpu(p, input, weight, algo, ConvEpilogue::affine(scale, shift, /*relu=*/true));
    // Two distinct empty tensors: outputs must not alias.
    return {output, save_mean, save_invstd, at::empty({0}, options), at::empty({0}, options)};
  }

  const bool cl = is_channels_last(input);
  const at::Tensor z = conv_forward_cpu(p, input, weight, algo, ConvEpilogue::bias(conv_bias))
                           .contiguous(format_of(cl));
  at::Tensor output = at::empty(z.sizes(), options.memory_format(format_of(cl)));
  at::Tensor batch_var = at::empty({p.c_out}, options);
  const Dense d = dense_of(p, cl);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_bn_relu_train", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const std::vector<Moments<acc_t>> moments =
        channel_moments<scalar_t, acc_t>(d, z.const_data_ptr<scalar_t>());
    scalar_t* mean = save_mean.mutable_data_ptr<scalar_t>();
    scalar_t* invstd = save_invstd.mutable_data_ptr<scalar_t>();
    // nn.BatchNorm2d's running update, in acc_t as torch's CPU batch norm; strided, as a buffer
    // may be a view.
    const acc_t mom = static_cast<acc_t>(momentum);
    const auto update = [&](const std::optional<at::Tensor>& running, int64_t c, acc_t batch) {
      if (!given(running)) return;
      scalar_t& r = running->mutable_data_ptr<scalar_t>()[c * running->stride(0)];
      r = static_cast<scalar_t>(mom * batch + (acc_t(1) - mom) * acc_t(r));
    };
    for (int64_t c = 0; c < p.c_out; ++c) {
      // An empty batch has no statistics: mean 0 and variance 0, running ones left as they are.
      const Moments<acc_t>& m = moments[c];
      const acc_t var = m.count > 0 ? m.m2 / m.count : acc_t(0);
      const acc_t unbiased = m.count > 1 ? m.m2 / (m.count - 1) : acc_t(0);
      mean[c] = static_cast<scalar_t>(m.mean);
      invstd[c] = static_cast<scalar_t>(acc_t(1) / std::sqrt(var + acc_t(eps)));
      batch_var.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(unbiased);
      if (m.count > 0) {
        update(running_mean, c, m.mean);
        update(running_var, c, unbiased);
      }
    }
    std::vector<scalar_t> a(p.c_out), b(p.c_out);
    affine_coefficients<scalar_t>(p.c_out, ptr_or_null<scalar_t>(bn_weight),
                                  ptr_or_null<scalar_t>(bn_bias), mean, invstd, a.data(), b.data());
    normalize_relu<scalar_t>(d, z.const_data_ptr<scalar_t>(), a.data(), b.data(),
                             output.mutable_data_ptr<scalar_t>());
  });
  return {output, save_mean, save_invstd, batch_var, z};
}

// Training: `input` is read only for the weight's gradient and `weight` only for the input's;
// otherwise they may be placeholders of the right shape (see ConvBNReLU2dBackward in
// conv_bn_relu.h). Eval reads both, and takes the ReLU mask from
// conv_output (a copy of the forward output) or, when that is empty, reruns the folded convolution.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& conv_output, const at::Tensor& input,
    const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo_name, int64_t max_col_bytes, std::array<bool, 5> mask) {
  const Conv2dParams p = fused::check_backward(
      kBackwardOp, grad_output, conv_output, input, weight, conv_bias, bn_weight, bn_bias,
      save_mean, save_invstd, training, stride, padding, dilation, groups, max_col_bytes,
      /*allow_reduced=*/false);
  const ConvAlgorithm algo =
      fused::conv_algorithm(kBackwardOp, algo_name, max_col_bytes, p, /*cuda=*/false);
  const auto options = grad_output.options();
  // The layout the forward computed in: conv_output's (training), the input's (eval).
  const bool cl = is_channels_last(training ? conv_output : input);
  const at::MemoryFormat fmt = format_of(cl);
  const at::Tensor g = grad_output.contiguous(fmt);
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const Dense d = dense_of(p, cl);
  const int64_t k = p.c_in_per_group() * p.kh * p.kw;
  auto vec_or_none = [&](bool want) { return at::empty({want ? p.c_out : 0}, options); };
  at::Tensor grad_gamma = vec_or_none(mask[3]), grad_beta = vec_or_none(mask[4]);
  at::Tensor grad_input = at::empty({0}, options), grad_weight = at::empty({0}, options);
  at::Tensor grad_bias = vec_or_none(mask[2]);
  auto backward = [&](const at::Tensor& grad, const at::Tensor& w, std::array<bool, 3> m) {
    return conv_backward_cpu(p, grad, input, w, m, algo);
  };

  if (training) {
    const at::Tensor z = conv_output.contiguous(fmt);
    const bool need_conv = mask[0] || mask[1] || mask[2];
    at::Tensor dz = need_conv ? at::empty(z.sizes(), options.memory_format(fmt)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv_bn_relu_backward_train", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* mp = mean.const_data_ptr<scalar_t>();
      const scalar_t* ip = invstd.const_data_ptr<scalar_t>();
      const scalar_t* gamma = ptr_or_null<scalar_t>(bn_weight);
      std::vector<scalar_t> a(p.c_out), b(p.c_out);
      affine_coefficients<scalar_t>(p.c_out, gamma, ptr_or_null<scalar_t>(bn_bias), mp, ip,
                                    a.data(), b.data());
      const auto sums = backward_sums<scalar_t, acc_t>(
          d, g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), mp, a.data(), b.data());
      std::vector<scalar_t> k1(p.c_out), k2(p.c_out), k3(p.c_out);
      const acc_t count = acc_t(d.n * d.hw);
      for (int64_t c = 0; c < p.c_out; ++c) {
        const acc_t is = acc_t(ip[c]), scale = (gamma ? acc_t(gamma[c]) : acc_t(1)) * is;
        if (mask[3]) grad_gamma.mutable_data_ptr<scalar_t>()[c] = scalar_t(sums[c][1] * is);
        if (mask[4]) grad_beta.mutable_data_ptr<scalar_t>()[c] = scalar_t(sums[c][0]);
        // dz = scale * (gm - mean(gm) - xhat * mean(gm * xhat)), xhat = (z - mean) * invstd.
        k1[c] = scalar_t(scale);
        k2[c] = count > 0 ? scalar_t(-scale * is * is * sums[c][1] / count) : scalar_t(0);
        k3[c] = count > 0 ? scalar_t(-scale * sums[c][0] / count) : scalar_t(0);
      }
      if (need_conv) {
        grad_conv_output<scalar_t>(d, g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                   a.data(), b.data(), mp, k1.data(), k2.data(), k3.data(),
                                   dz.mutable_data_ptr<scalar_t>());
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
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv_bn_relu_backward_fold", [&] {
    fold_channels<scalar_t>(p.c_out, ptr_or_null<scalar_t>(conv_bias),
                            ptr_or_null<scalar_t>(bn_weight), ptr_or_null<scalar_t>(bn_bias),
                            mean.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
                            scale.mutable_data_ptr<scalar_t>(), shift.mutable_data_ptr<scalar_t>());
  });
  // The mask's source: the copy of the forward output when given (relu keeps the sign, zero and
  // NaN of the pre-activation, so the mask is the same), else the forward's pre-activation bit
  // for bit (same kernel, same epilogue minus the ReLU).
  const at::Tensor pre = conv_output.numel() != 0
                             ? conv_output.contiguous(fmt)
                             : conv_forward_cpu(p, input, weight, algo,
                                                ConvEpilogue::affine(scale, shift, /*relu=*/false))
                                   .contiguous(fmt);
  at::Tensor gm = at::empty(g.sizes(), options.memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv_bn_relu_backward_mask", [&] {
    relu_mask<scalar_t>(g.numel(), g.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(),
                        gm.mutable_data_ptr<scalar_t>());
  });
  // The input's gradient through the folded weight w * scale[o] is the plain weight's of
  // gm * scale[o]: the activation-sized gradient scaled, not a folded copy of the filter (512 x
  // 512 x 3 x 3: 9.4 MB written and page-faulted per call, as slow as the 4x4 layer's GEMMs).
  if (mask[0]) {
    const at::Tensor gs = at::mul(gm, scale.view({-1, 1, 1}));
    grad_input = std::get<0>(backward(gs.contiguous(fmt), w, {true, false, false}));
  }
  const bool need_gw = mask[1] || mask[3], need_gb = mask[2] || mask[3] || mask[4];
  if (need_gw || need_gb) {
    const ConvGrads folded = backward(gm, w, {false, need_gw, need_gb});
    const at::Tensor& gw_fold = std::get<1>(folded);
    const at::Tensor& gb_fold = std::get<2>(folded);
    // grad_weight is gw_fold scaled in place (a fresh contiguous tensor of the weight's shape).
    if (mask[1]) grad_weight = gw_fold;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv_bn_relu_backward_eval", [&] {
      auto out = [](bool want, at::Tensor& t) {
        return want ? t.mutable_data_ptr<scalar_t>() : nullptr;
      };
      fold_backward<scalar_t>(p.c_out, k, need_gw ? gw_fold.const_data_ptr<scalar_t>() : nullptr,
                              need_gb ? gb_fold.const_data_ptr<scalar_t>() : nullptr,
                              w.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(conv_bias),
                              scale.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
                              invstd.const_data_ptr<scalar_t>(), out(mask[1], grad_weight),
                              out(mask[2], grad_bias), out(mask[3], grad_gamma),
                              out(mask[4], grad_beta));
    });
  }
  return {grad_input, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace cnnext

TORCH_LIBRARY_IMPL(cnnext, CPU, m) {
  m.impl("conv_bn_relu", &cnnext::conv_bn_relu_forward_cpu);
  m.impl("conv_bn_relu_backward", &cnnext::conv_bn_relu_backward_cpu);
}
