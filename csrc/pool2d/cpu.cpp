// Max pooling (with argmax) and average pooling on the CPU, forward and backward.
// NCHW: parallel over (N*C) planes. Each output row is split into border outputs (window partly
// in the padding: a scalar scan) and interior outputs, computed a vector of output columns at a
// time. Input rows are first split into stride phases so that every tap is a unit-stride load.
// channels_last: parallel over output pixels, a vector of channels at a time.
// Vector chunks have a fixed length; the last one of a row overlaps its neighbour, so no scalar
// remainder runs. Backward: max scatters through the argmax within a plane (or a sample's block
// of channels), one task each; NCHW average pooling gathers, a vector of input columns at a
// time; channels_last average pooling scatters a vector of channels. All are deterministic and
// sum in torch's order, so float results match torch's CPU kernels to the bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"
#include "common/params.h"
#include "pool2d/pool2d.h"

namespace cnnext {
namespace {

using pool2d::Geometry;

constexpr int64_t kChunk = 64;  // channels per task of the channels_last backward scatter

// Elements of work per item: the tasks' grain (common/cpu_parallel.h).
int64_t grain(int64_t per_item) { return cpu_grain_elements(per_item); }

// ---- vectors -----------------------------------------------------------------------------------

using vec::blend;
using vec::Lanes;
using vec::load;
using vec::store;

// Argmax lanes fit the plane's flat indices.
template <typename L>
bool lanes_fit(const Geometry& g) {
  return g.h * g.w <= std::numeric_limits<typename L::index_scalar>::max();
}

// Runs Kernel::run<Lanes<scalar_t, bytes>>(args...) with the widest vectors the CPU offers. The
// extension is built for the baseline ISA; `flatten` inlines the whole kernel into each variant,
// so the AVX2 variant is compiled for AVX2 throughout.
template <typename scalar_t, typename Kernel, typename... Args>
__attribute__((flatten)) void run_base(Args&&... args) {
  Kernel::template run<Lanes<scalar_t, 16>>(args...);
}
#if defined(__x86_64__) && defined(__GNUC__)
template <typename scalar_t, typename Kernel, typename... Args>
__attribute__((target("avx2"), flatten)) void run_avx2(Args&&... args) {
  Kernel::template run<Lanes<scalar_t, 32>>(args...);
}
#endif
// Whether the kernels run their AVX2 variant: the CPU's ISA as common/cpu_isa.h reports it
// (CNNEXT_CPU_ISA=baseline forces the baseline variant, so tests cover it on an AVX2 machine).
// Read once per call, before the parallel region.
inline bool use_avx2(const char* op) { return cpu_isa(op) != CpuIsa::kBaseline; }

template <typename scalar_t, typename Kernel, typename... Args>
void run_kernel(bool avx2, Args&&... args) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx2) return run_avx2<scalar_t, Kernel>(args...);
#else
  (void)avx2;
#endif
  run_base<scalar_t, Kernel>(args...);
}

// Calls fn(start) for chunks [start, start + n) covering [lo, hi), all full: the last one is
// shifted left to end at hi and recomputes a few outputs (same values). Returns false, calling
// nothing, when the range is shorter than one chunk.
template <typename Fn>
inline bool for_full_chunks(int64_t lo, int64_t hi, int64_t n, Fn&& fn) {
  const int64_t span = hi - lo;
  if (span < n) return false;
  for (int64_t start = 0; start < span; start += n) fn(lo + std::min(start, span - n));
  return true;
}

// ---- window rows -------------------------------------------------------------------------------

// Interior output columns [lo, hi): every tap of the window row lies inside [0, w).
struct Interior {
  int64_t lo, hi;
};
Interior interior_columns(const Geometry& g, int64_t span) {
  const int64_t lo = std::min(g.w_out, (g.pw + g.sw - 1) / g.sw);
  const int64_t last = g.w - span + g.pw;  // largest window start + pw that still fits
  const int64_t hi = last < 0 ? 0 : std::min(g.w_out, last / g.sw + 1);
  return {lo, std::max(lo, hi)};
}

// Task-local scratch of the NCHW kernels: the input rows under one output row's windows, as
// unit-stride tap sources. For stride s > 1 each row is first split into its s phases (phase r
// holds columns r, r + s, r + 2s, ...), so that for every stride tap kj of interior output o
// reads source(t, kj)[o], and consecutive outputs are one vector load. Split rows are kept in
// min(window extent, h) slots (the rows of one window inside the input fall in distinct slots),
// so a row shared by the windows of consecutive output rows is split once.
template <typename scalar_t>
class RowSources {
 public:
  RowSources(const Geometry& g, int64_t dh, int64_t dw)
      : g_(g),
        dh_(dh),
        dw_(dw),
        phase_len_((g.w + g.sw - 1) / g.sw),
        // Sized by the window's rows and columns inside the input, not by the kernel: a
        // window may be far larger than the input (kernel 10^8, padding 5 * 10^7 is valid).
        slots_(std::min((g.kh - 1) * dh + 1, g.h)),
        rows_(std::min(g.kh, g.h)),
        row_index_(std::min(g.kh, g.h)),
        // Only interior outputs (whole window row inside the input) read taps.
        tap_((g.kw - 1) * dw + 1 <= g.w ? g.kw : 0),
        slot_row_(slots_) {
    if (g.sw > 1) split_.resize(slots_ * g.sw * phase_len_);
    for (int64_t kj = 0; kj < static_cast<int64_t>(tap_.size()); ++kj) {
      const int64_t e = kj * dw - g.pw;  // column of tap kj for output 0
      const int64_t q = e >= 0 ? e / g.sw : -((-e + g.sw - 1) / g.sw), r = e - q * g.sw;
      tap_[kj] = r * phase_len_ + q;
    }
  }

  // Forgets the split rows (call when moving to another plane).
  void new_plane() { std::fill(slot_row_.begin(), slot_row_.end(), int64_t(-1)); }

  // Sets up the rows of output row `oh` of `plane`; returns how many there are.
  template <typename L, int64_t kStride>
  int64_t prepare(const scalar_t* plane, int64_t oh) {
    const int64_t sw = kStride ? kStride : g_.sw;
    const int64_t ih0 = oh * g_.sh - g_.ph;
    const int64_t ih_end = pool2d::end_tap(ih0, g_.kh, dh_, g_.h);
    int64_t t = 0;
    for (int64_t ih = pool2d::first_tap(ih0, dh_); ih < ih_end; ih += dh_, ++t) {
      const scalar_t* row = plane + ih * g_.w;
      row_index_[t] = ih * g_.w;
      if (sw == 1) {
        rows_[t] = row;
        continue;
      }
      const int64_t slot = ih % slots_;
      scalar_t* dst = split_.data() + slot * sw * phase_len_;
      rows_[t] = dst;
      if (slot_row_[slot] == ih) continue;
      slot_row_[slot] = ih;
      int64_t done = 0;  // leading elements of every phase already split
      if (kStride == 2) {
        // Two vectors of the row -> one vector of even and one of odd columns.
        using V = typename L::value;
        using I = typename L::index;
        I even, odd;
        for (int64_t j = 0; j < L::count; ++j) even[j] = 2 * j, odd[j] = 2 * j + 1;
        V a, b;
        for (; 2 * (done + L::count) <= g_.w; done += L::count) {
          load(&a, row + 2 * done);
          load(&b, row + 2 * done + L::count);
          store(dst + done, __builtin_shuffle(a, b, even));
          store(dst + phase_len_ + done, __builtin_shuffle(a, b, odd));
        }
      }
      for (int64_t r = 0; r < sw; ++r) {
        const int64_t len = (g_.w - r + sw - 1) / sw;
        scalar_t* __restrict__ phase = dst + r * phase_len_;
        for (int64_t i = done; i < len; ++i) phase[i] = row[i * sw + r];
      }
    }
    return t;
  }

  const scalar_t* source(int64_t t, int64_t kj) const { return rows_[t] + tap_[kj]; }
  // Flat plane index of tap kj of output 0 in row t.
  int64_t index(int64_t t, int64_t kj) const { return row_index_[t] + kj * dw_ - g_.pw; }

 private:
  const Geometry& g_;
  int64_t dh_, dw_, phase_len_, slots_;
  std::vector<scalar_t> split_;
  std::vector<const scalar_t*> rows_;
  std::vector<int64_t> row_index_, tap_, slot_row_;  // slot_row_: the row a slot holds, or -1
};

// ---- max pooling, forward ----------------------------------------------------------------------

// One output by a plain scan of its window (border outputs).
template <typename scalar_t>
inline void max_window(const scalar_t* in, const Geometry& g, int64_t oh, int64_t ow, scalar_t* out,
                       int64_t* argmax) {
  const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
  const int64_t ih_first = pool2d::first_tap(ih0, g.dh), iw_first = pool2d::first_tap(iw0, g.dw);
  const int64_t ih_end = pool2d::end_tap(ih0, g.kh, g.dh, g.h);
  const int64_t iw_end = pool2d::end_tap(iw0, g.kw, g.dw, g.w);
  scalar_t best = -std::numeric_limits<scalar_t>::infinity();
  int64_t best_index = ih_first * g.w + iw_first;
  for (int64_t ih = ih_first; ih < ih_end; ih += g.dh) {
    for (int64_t iw = iw_first; iw < iw_end; iw += g.dw) {
      const scalar_t v = in[ih * g.w + iw];
      const bool take = pool2d::max_takes(v, best);  // selects, not branches: data-dependent
      best = take ? v : best;
      best_index = take ? ih * g.w + iw : best_index;
    }
  }
  *out = best;
  *argmax = best_index;
}

// Interior outputs [o0, o0 + L::count) of one output row whose window rows inside the input are
// the `nrows` sources of `rows`. `first` is the argmax of an all -inf window of output 0 and
// `step` holds lane * stride. The update is pool2d::max_takes, lane-wise.
template <typename L>
inline void max_chunk(const RowSources<typename L::scalar>& rows, int64_t nrows, const Geometry& g,
                      int64_t first, const typename L::index& step, int64_t o0,
                      typename L::scalar* out, int64_t* argmax) {
  using V = typename L::value;
  using I = typename L::index;
  using index_scalar = typename L::index_scalar;
  const int64_t column = o0 * g.sw;
  V best = V{} - std::numeric_limits<typename L::scalar>::infinity();
  I index = static_cast<index_scalar>(first + column) + step;
  for (int64_t t = 0; t < nrows; ++t) {
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      V v;
      load(&v, rows.source(t, kj) + o0);
      const I take = (v > best) | (v != v);
      blend(&best, take, v);
      blend(&index, take, static_cast<index_scalar>(rows.index(t, kj) + column) + step);
    }
  }
  store(out, best);
  store(argmax, __builtin_convertvector(index, typename L::wide_index));
}

template <typename L, int64_t kStride>
void max_planes_nchw(const typename L::scalar* in, typename L::scalar* out, int64_t* argmax,
                     const Geometry& g, RowSources<typename L::scalar>& rows, int64_t p_begin,
                     int64_t p_end) {
  const Interior mid =
      lanes_fit<L>(g) ? interior_columns(g, (g.kw - 1) * g.dw + 1) : Interior{g.w_out, g.w_out};
  typename L::index step;
  for (int64_t j = 0; j < L::count; ++j) step[j] = static_cast<typename L::index_scalar>(j * g.sw);
  for (int64_t plane = p_begin; plane < p_end; ++plane) {
    const typename L::scalar* src = in + plane * g.h * g.w;
    rows.new_plane();
    for (int64_t oh = 0; oh < g.h_out; ++oh) {
      const int64_t row = (plane * g.h_out + oh) * g.w_out;
      auto scalar = [&](int64_t begin, int64_t end) {
        for (int64_t ow = begin; ow < end; ++ow) {
          max_window(src, g, oh, ow, out + row + ow, argmax + row + ow);
        }
      };
      scalar(0, mid.lo);
      if (mid.hi - mid.lo >= L::count) {
        const int64_t nrows = rows.template prepare<L, kStride>(src, oh);
        const int64_t first = pool2d::first_tap(oh * g.sh - g.ph, g.dh) * g.w - g.pw;
        for_full_chunks(mid.lo, mid.hi, L::count, [&](int64_t o0) {
          max_chunk<L>(rows, nrows, g, first, step, o0, out + row + o0, argmax + row + o0);
        });
      } else {
        scalar(mid.lo, mid.hi);
      }
      scalar(mid.hi, g.w_out);
    }
  }
}

struct MaxNchw {
  template <typename L>
  static void run(const typename L::scalar* in, typename L::scalar* out, int64_t* argmax,
                  const Geometry& g, RowSources<typename L::scalar>& rows, int64_t b, int64_t e) {
    if (g.sw == 1) {
      max_planes_nchw<L, 1>(in, out, argmax, g, rows, b, e);
    } else if (g.sw == 2) {
      max_planes_nchw<L, 2>(in, out, argmax, g, rows, b, e);
    } else {
      max_planes_nchw<L, 0>(in, out, argmax, g, rows, b, e);
    }
  }
};

// channels_last: channels [c0, c0 + L::count) of one output pixel, taps in torch's order.
template <typename L>
inline void max_channels(const typename L::scalar* sample, const Geometry& g, int64_t ih0,
                         int64_t iw0, int64_t c0, typename L::scalar* dst, int64_t* dst_index) {
  using V = typename L::value;
  using I = typename L::index;
  using index_scalar = typename L::index_scalar;
  const int64_t ih_first = pool2d::first_tap(ih0, g.dh), iw_first = pool2d::first_tap(iw0, g.dw);
  const int64_t ih_end = pool2d::end_tap(ih0, g.kh, g.dh, g.h);
  const int64_t iw_end = pool2d::end_tap(iw0, g.kw, g.dw, g.w);
  V best = V{} - std::numeric_limits<typename L::scalar>::infinity();
  I index = I{} + static_cast<index_scalar>(ih_first * g.w + iw_first);
  for (int64_t ih = ih_first; ih < ih_end; ih += g.dh) {
    for (int64_t iw = iw_first; iw < iw_end; iw += g.dw) {
      V v;
      load(&v, sample + (ih * g.w + iw) * g.c + c0);
      const I take = (v > best) | (v != v);
      blend(&best, take, v);
      blend(&index, take, I{} + static_cast<index_scalar>(ih * g.w + iw));
    }
  }
  store(dst + c0, best);
  store(dst_index + c0, __builtin_convertvector(index, typename L::wide_index));
}

// channels_last, one channel at a time (fewer channels than lanes, or huge planes).
template <typename scalar_t>
inline void max_channels_scalar(const scalar_t* sample, const Geometry& g, int64_t ih0, int64_t iw0,
                                scalar_t* dst, int64_t* dst_index) {
  const int64_t ih_first = pool2d::first_tap(ih0, g.dh), iw_first = pool2d::first_tap(iw0, g.dw);
  const int64_t ih_end = pool2d::end_tap(ih0, g.kh, g.dh, g.h);
  const int64_t iw_end = pool2d::end_tap(iw0, g.kw, g.dw, g.w);
  for (int64_t c = 0; c < g.c; ++c) {
    scalar_t best = -std::numeric_limits<scalar_t>::infinity();
    int64_t best_index = ih_first * g.w + iw_first;
    for (int64_t ih = ih_first; ih < ih_end; ih += g.dh) {
      for (int64_t iw = iw_first; iw < iw_end; iw += g.dw) {
        const scalar_t v = sample[(ih * g.w + iw) * g.c + c];
        if (pool2d::max_takes(v, best)) {
          best = v;
          best_index = ih * g.w + iw;
        }
      }
    }
    dst[c] = best;
    dst_index[c] = best_index;
  }
}

// channels_last: output pixels [b, e) of all samples.
struct MaxNhwc {
  template <typename L>
  static void run(const typename L::scalar* in, typename L::scalar* out, int64_t* argmax,
                  const Geometry& g, int64_t b, int64_t e) {
    const bool vectors = lanes_fit<L>(g);
    for (int64_t pix = b; pix < e; ++pix) {
      const int64_t ow = pix % g.w_out, oh = pix / g.w_out % g.h_out;
      const int64_t n = pix / (g.w_out * g.h_out);
      const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
      const typename L::scalar* sample = in + n * g.h * g.w * g.c;
      typename L::scalar* dst = out + pix * g.c;
      int64_t* dst_index = argmax + pix * g.c;
      if (!vectors || !for_full_chunks(0, g.c, L::count, [&](int64_t c0) {
            max_channels<L>(sample, g, ih0, iw0, c0, dst, dst_index);
          })) {
        max_channels_scalar(sample, g, ih0, iw0, dst, dst_index);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_argmax_cpu(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const pool2d::ForwardPlan plan = pool2d::plan_max_forward(
      pool2d::Backend::kCpu, input, kernel_size, stride, padding, dilation, ceil_mode);
  if (plan.empty()) return {plan.output, plan.argmax};
  const Pool2dParams& p = plan.p;
  const Geometry& g = plan.g;
  const bool avx2 = use_avx2("max_pool2d_with_argmax");
  AT_DISPATCH_FLOATING_TYPES(plan.input.scalar_type(), "max_pool2d_with_argmax_cpu", [&] {
    const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
    scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();
    int64_t* arg = plan.argmax.mutable_data_ptr<int64_t>();
    if (plan.channels_last) {
      const int64_t pixels = p.n * p.h_out * p.w_out;
      at::parallel_for(0, pixels, grain(p.kh * p.kw * p.c), [&](int64_t b, int64_t e) {
        run_kernel<scalar_t, MaxNhwc>(avx2, in, out, arg, g, b, e);
      });
    } else {
      at::parallel_for(0, p.n * p.c, grain(p.h * p.w), [&](int64_t b, int64_t e) {
        RowSources<scalar_t> rows(g, g.dh, g.dw);
        run_kernel<scalar_t, MaxNchw>(avx2, in, out, arg, g, rows, b, e);
      });
    }
  });
  return {plan.output, plan.argmax};
}

// ---- max pooling, backward ---------------------------------------------------------------------

// Scatter, one task per plane (NCHW) or per sample's block of kChunk channels (channels_last):
// deterministic, and in torch's order. An argmax outside the plane is reported, not followed.
template <typename scalar_t>
void max_backward_cpu_typed(const at::Tensor& go, const at::Tensor& am, at::Tensor& gi,
                            const Pool2dParams& p, bool channels_last) {
  const scalar_t* grad = go.const_data_ptr<scalar_t>();
  const int64_t* arg = am.const_data_ptr<int64_t>();
  scalar_t* out = gi.mutable_data_ptr<scalar_t>();
  const int64_t plane = p.h * p.w, plane_out = p.h_out * p.w_out;
  auto inside = [plane](int64_t index) {
    return static_cast<uint64_t>(index) < static_cast<uint64_t>(plane);
  };
  auto report = [plane](const int64_t* idx, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      CNNEXT_CHECK(idx[i] >= 0 && idx[i] < plane, "max_pool2d_backward", "argmax holds ", idx[i],
                   ", outside the input plane of ", plane, " elements");
    }
  };
  if (!channels_last) {
    at::parallel_for(0, p.n * p.c, grain(plane), [&](int64_t b, int64_t e) {
      for (int64_t pl = b; pl < e; ++pl) {
        scalar_t* dst = out + pl * plane;
        std::fill(dst, dst + plane, scalar_t(0));
        const scalar_t* src = grad + pl * plane_out;
        const int64_t* idx = arg + pl * plane_out;
        bool ok = true;
        for (int64_t o = 0; o < plane_out; ++o) {
          if (inside(idx[o])) {
            dst[idx[o]] += src[o];
          } else {
            ok = false;
          }
        }
        if (!ok) report(idx, plane_out);
      }
    });
    return;
  }
  const int64_t blocks = (p.c + kChunk - 1) / kChunk;
  at::parallel_for(0, p.n * blocks, grain(plane * kChunk), [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * kChunk;
      const int64_t nc = std::min(kChunk, p.c - c0);
      scalar_t* dst = out + n * plane * p.c + c0;
      for (int64_t i = 0; i < plane; ++i) std::fill(dst + i * p.c, dst + i * p.c + nc, scalar_t(0));
      for (int64_t o = 0; o < plane_out; ++o) {
        const scalar_t* src = grad + (n * plane_out + o) * p.c + c0;
        const int64_t* idx = arg + (n * plane_out + o) * p.c + c0;
        bool ok = true;
        for (int64_t j = 0; j < nc; ++j) {
          if (inside(idx[j])) {
            dst[idx[j] * p.c + j] += src[j];
          } else {
            ok = false;
          }
        }
        if (!ok) report(idx, nc);
      }
    }
  });
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& argmax,
                                   at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  pool2d::BackwardPlan plan =
      pool2d::plan_max_backward(pool2d::Backend::kCpu, grad_output, argmax, input_size, kernel_size,
                                stride, padding, dilation, ceil_mode);
  if (plan.empty()) return plan.grad_input;
  AT_DISPATCH_FLOATING_TYPES(plan.grad_output.scalar_type(), "max_pool2d_backward_cpu", [&] {
    max_backward_cpu_typed<scalar_t>(plan.grad_output, plan.argmax, plan.grad_input, plan.p,
                                     plan.channels_last);
  });
  return plan.grad_input;
}

// ---- average pooling, forward ------------------------------------------------------------------

struct AvgOptions {
  bool count_include_pad;
  int64_t divisor_override;  // 0: none
};

template <typename scalar_t>
inline void avg_window(const scalar_t* in, const Geometry& g, const AvgOptions& o, int64_t oh,
                       int64_t ow, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
  const int64_t ih_end = std::min(ih0 + g.kh, g.h), iw_end = std::min(iw0 + g.kw, g.w);
  const int64_t ih_begin = std::max<int64_t>(ih0, 0), iw_begin = std::max<int64_t>(iw0, 0);
  if (ih_begin >= ih_end || iw_begin >= iw_end) {
    *out = scalar_t(0);  // a window entirely in the padding (torch writes 0)
    return;
  }
  acc_t sum = 0;
  for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
    for (int64_t iw = iw_begin; iw < iw_end; ++iw) sum += in[ih * g.w + iw];
  }
  *out = static_cast<scalar_t>(sum / static_cast<acc_t>(pool2d::avg_divisor(
                                         g, ih0, iw0, o.count_include_pad, o.divisor_override)));
}

// Interior outputs [o0, o0 + L::count) of one output row whose window rows inside the input are
// the `nrows` (>= 1) sources of `rows`; interior columns share the row's divisor. Sums run in
// torch's order (row-major over the window).
template <typename L>
inline void avg_chunk(const RowSources<typename L::scalar>& rows, int64_t nrows, const Geometry& g,
                      at::opmath_type<typename L::scalar> divisor, int64_t o0,
                      typename L::scalar* out) {
  using V = typename L::value;
  V sum = V{}, v;
  for (int64_t t = 0; t < nrows; ++t) {
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      load(&v, rows.source(t, kj) + o0);
      sum += v;
    }
  }
  store(out, sum / divisor);
}

template <typename L, int64_t kStride>
void avg_planes_nchw(const typename L::scalar* in, typename L::scalar* out, const Geometry& g,
                     const AvgOptions& o, RowSources<typename L::scalar>& rows, int64_t p_begin,
                     int64_t p_end) {
  using acc_t = at::opmath_type<typename L::scalar>;
  const Interior mid = interior_columns(g, g.kw);
  for (int64_t plane = p_begin; plane < p_end; ++plane) {
    const typename L::scalar* src = in + plane * g.h * g.w;
    rows.new_plane();
    for (int64_t oh = 0; oh < g.h_out; ++oh) {
      typename L::scalar* row = out + (plane * g.h_out + oh) * g.w_out;
      auto scalar = [&](int64_t begin, int64_t end) {
        for (int64_t ow = begin; ow < end; ++ow) avg_window(src, g, o, oh, ow, row + ow);
      };
      scalar(0, mid.lo);
      const int64_t ih0 = oh * g.sh - g.ph;
      const bool has_rows = std::max<int64_t>(ih0, 0) < std::min(ih0 + g.kh, g.h);
      if (has_rows && mid.hi - mid.lo >= L::count) {
        const int64_t nrows = rows.template prepare<L, kStride>(src, oh);
        const acc_t divisor = static_cast<acc_t>(pool2d::avg_divisor(
            g, ih0, mid.lo * g.sw - g.pw, o.count_include_pad, o.divisor_override));
        for_full_chunks(mid.lo, mid.hi, L::count,
                        [&](int64_t o0) { avg_chunk<L>(rows, nrows, g, divisor, o0, row + o0); });
      } else {
        scalar(mid.lo, mid.hi);
      }
      scalar(mid.hi, g.w_out);
    }
  }
}

struct AvgNchw {
  template <typename L>
  static void run(const typename L::scalar* in, typename L::scalar* out, const Geometry& g,
                  const AvgOptions& o, RowSources<typename L::scalar>& rows, int64_t b, int64_t e) {
    if (g.sw == 1) {
      avg_planes_nchw<L, 1>(in, out, g, o, rows, b, e);
    } else if (g.sw == 2) {
      avg_planes_nchw<L, 2>(in, out, g, o, rows, b, e);
    } else {
      avg_planes_nchw<L, 0>(in, out, g, o, rows, b, e);
    }
  }
};

// channels_last: output pixels [b, e) of all samples, a vector of channels at a time.
struct AvgNhwc {
  template <typename L>
  static void run(const typename L::scalar* in, typename L::scalar* out, const Geometry& g,
                  const AvgOptions& o, int64_t b, int64_t e) {
    using scalar_t = typename L::scalar;
    using acc_t = at::opmath_type<scalar_t>;
    using V = typename L::value;
    for (int64_t pix = b; pix < e; ++pix) {
      const int64_t ow = pix % g.w_out, oh = pix / g.w_out % g.h_out;
      const int64_t n = pix / (g.w_out * g.h_out);
      const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
      const int64_t ih_end = std::min(ih0 + g.kh, g.h), iw_end = std::min(iw0 + g.kw, g.w);
      const int64_t ih_begin = std::max<int64_t>(ih0, 0), iw_begin = std::max<int64_t>(iw0, 0);
      // A window entirely in the padding sums nothing: 0 / 1 = 0, as torch writes.
      const bool empty = ih_begin >= ih_end || iw_begin >= iw_end;
      const acc_t divisor = empty ? acc_t(1)
                                  : static_cast<acc_t>(pool2d::avg_divisor(
                                        g, ih0, iw0, o.count_include_pad, o.divisor_override));
      const scalar_t* sample = in + n * g.h * g.w * g.c;
      scalar_t* dst = out + pix * g.c;
      auto tap = [&](int64_t ih, int64_t iw) { return sample + (ih * g.w + iw) * g.c; };
      const bool vectors = for_full_chunks(0, g.c, L::count, [&](int64_t c0) {
        V sum = V{}, v;
        for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
          for (int64_t iw = iw_begin; iw < iw_end; ++iw) {
            load(&v, tap(ih, iw) + c0);
            sum += v;
          }
        }
        store(dst + c0, sum / divisor);
      });
      if (!vectors) {
        for (int64_t c = 0; c < g.c; ++c) {
          acc_t sum = 0;
          for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
            for (int64_t iw = iw_begin; iw < iw_end; ++iw) sum += tap(ih, iw)[c];
          }
          dst[c] = static_cast<scalar_t>(sum / divisor);
        }
      }
    }
  }
};

at::Tensor avg_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                          bool count_include_pad, std::optional<int64_t> divisor_override) {
  const pool2d::ForwardPlan plan = pool2d::plan_avg_forward(
      pool2d::Backend::kCpu, input, kernel_size, stride, padding, ceil_mode, divisor_override);
  if (plan.empty()) return plan.output;
  const Pool2dParams& p = plan.p;
  const Geometry& g = plan.g;
  const AvgOptions o{count_include_pad, divisor_override.value_or(0)};
  const bool avx2 = use_avx2("avg_pool2d");
  AT_DISPATCH_FLOATING_TYPES(plan.input.scalar_type(), "avg_pool2d_cpu", [&] {
    const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
    scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();
    if (plan.channels_last) {
      at::parallel_for(
          0, p.n * p.h_out * p.w_out, grain(p.kh * p.kw * p.c),
          [&](int64_t b, int64_t e) { run_kernel<scalar_t, AvgNhwc>(avx2, in, out, g, o, b, e); });
    } else {
      at::parallel_for(0, p.n * p.c, grain(p.h * p.w), [&](int64_t b, int64_t e) {
        RowSources<scalar_t> rows(g, 1, 1);
        run_kernel<scalar_t, AvgNchw>(avx2, in, out, g, o, rows, b, e);
      });
    }
  });
  return plan.output;
}

// ---- average pooling, backward -----------------------------------------------------------------

// NCHW average-pool backward as a gather, a vector of input columns at a time. Per plane each
// output's share grad / divisor goes once into a zero-padded row; input row ih then sums, over
// the output rows covering it (ascending) and the kernel columns (descending: output columns
// ascending), the shares of the outputs whose window holds it. That is torch's summation order,
// so the result is torch's to the bit. Columns are summed phase by phase (iw = i * sw + r), which
// makes every load unit-stride; the phases are interleaved into the row at the end.
struct AvgBackwardNchw {
  template <typename L>
  static void run(const typename L::scalar* grad, typename L::scalar* out, const Geometry& g,
                  const AvgOptions& o, int64_t p_begin, int64_t p_end) {
    using scalar_t = typename L::scalar;
    using V = typename L::value;
    static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, "float or double");
    constexpr int64_t lanes = L::count;
    const int64_t sw = g.sw;
    const int64_t phase_len = (g.w + sw - 1) / sw;
    const int64_t vec_len = (phase_len + lanes - 1) / lanes * lanes;
    // Share rows: `left` zeros before output column 0 and zeros after the last one, enough for
    // every lane: lane i of phase r, tap kj reads column i + (r + pw - kj) / sw.
    const int64_t left = (g.kw + sw - 1) / sw + 1;
    const int64_t row_len = left + std::max(g.w_out, vec_len + (sw + g.pw) / sw + 1);
    std::vector<scalar_t> share(g.h_out * row_len, scalar_t(0));
    std::vector<scalar_t> phases(sw * vec_len);
    for (int64_t plane = p_begin; plane < p_end; ++plane) {
      const scalar_t* src = grad + plane * g.h_out * g.w_out;
      scalar_t* dst = out + plane * g.h * g.w;
      for (int64_t oh = 0; oh < g.h_out; ++oh) {
        const int64_t ih0 = oh * g.sh - g.ph;
        const bool rows = std::max<int64_t>(ih0, 0) < std::min(ih0 + g.kh, g.h);
        for (int64_t ow = 0; ow < g.w_out; ++ow) {
          const int64_t iw0 = ow * g.sw - g.pw;
          const bool cols = std::max<int64_t>(iw0, 0) < std::min(iw0 + g.kw, g.w);
          // A window entirely in the padding has no input to spread over.
          share[oh * row_len + left + ow] =
              rows && cols ? src[oh * g.w_out + ow] /
                                 static_cast<scalar_t>(pool2d::avg_divisor(
                                     g, ih0, iw0, o.count_include_pad, o.divisor_override))
                           : scalar_t(0);
        }
      }
      for (int64_t ih = 0; ih < g.h; ++ih) {
        int64_t oh_begin, oh_end;
        pool2d::covering_outputs(ih, g.kh, g.sh, g.ph, 1, g.h_out, &oh_begin, &oh_end);
        for (int64_t r = 0; r < sw; ++r) {
          scalar_t* acc = phases.data() + r * vec_len;
          V sum, v;
          for (int64_t i = 0; i < vec_len; i += lanes) store(acc + i, V{});
          for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
            const scalar_t* row = share.data() + oh * row_len + left;
            for (int64_t kj = g.kw - 1; kj >= 0; --kj) {
              const int64_t m = r + g.pw - kj;  // output column (times sw) of lane 0
              if (((m % sw) + sw) % sw != 0) continue;
              const scalar_t* col = row + m / sw;
              for (int64_t i = 0; i < vec_len; i += lanes) {
                load(&sum, acc + i);
                load(&v, col + i);
                store(acc + i, sum + v);
              }
            }
          }
        }
        scalar_t* row = dst + ih * g.w;
        int64_t done = 0;  // leading elements of every phase already interleaved
        if (sw == 1) {
          std::memcpy(row, phases.data(), g.w * sizeof(scalar_t));
          continue;
        }
        if (sw == 2) {
          // One vector of even and one of odd columns -> two vectors of the row.
          typename L::index low, high;
          for (int64_t j = 0; j < lanes; ++j) {
            low[j] = j % 2 == 0 ? j / 2 : lanes + j / 2;
            high[j] = j % 2 == 0 ? lanes / 2 + j / 2 : lanes + lanes / 2 + j / 2;
          }
          V even, odd;
          for (; 2 * (done + lanes) <= g.w; done += lanes) {
            load(&even, phases.data() + done);
            load(&odd, phases.data() + vec_len + done);
            store(row + 2 * done, __builtin_shuffle(even, odd, low));
            store(row + 2 * done + lanes, __builtin_shuffle(even, odd, high));
          }
        }
        for (int64_t r = 0; r < sw; ++r) {
          for (int64_t i = done; i * sw + r < g.w; ++i) row[i * sw + r] = phases[r * vec_len + i];
        }
      }
    }
  }
};

template <typename scalar_t>
void avg_backward_cpu_typed(const at::Tensor& go, at::Tensor& gi, const Pool2dParams& p,
                            const AvgOptions& o, bool channels_last, bool avx2) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = pool2d::geometry(p);
  const scalar_t* grad = go.const_data_ptr<scalar_t>();
  scalar_t* out = gi.mutable_data_ptr<scalar_t>();
  const int64_t plane = p.h * p.w;
  // Each output spreads grad / divisor over the part of its window inside the input; returns
  // the divisor.
  auto window = [&](int64_t oh, int64_t ow, int64_t* ih_b, int64_t* ih_e, int64_t* iw_b,
                    int64_t* iw_e) {
    const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    *ih_b = std::max<int64_t>(ih0, 0), *ih_e = std::min(ih0 + g.kh, g.h);
    *iw_b = std::max<int64_t>(iw0, 0), *iw_e = std::min(iw0 + g.kw, g.w);
    // An empty window (entirely in the padding) contributes nothing; its loops do not run.
    const bool empty = *ih_b >= *ih_e || *iw_b >= *iw_e;
    return empty ? acc_t(1)
                 : static_cast<acc_t>(
                       pool2d::avg_divisor(g, ih0, iw0, o.count_include_pad, o.divisor_override));
  };
  if (!channels_last && p.sh >= p.kh && p.sw >= p.kw && p.w_out < 16) {
    // Windows that do not overlap (2x2/s2, a global pool) on short output rows: every input
    // element takes at most one output's share, so a plain scatter is exact, and the gather's
    // per-row phase bookkeeping, which pays off over rows of two vectors or more, would cost
    // more than the copies (a 7x7 global pool: 17x more).
    at::parallel_for(0, p.n * p.c, grain(plane), [&](int64_t b, int64_t e) {
      for (int64_t pl = b; pl < e; ++pl) {
        const scalar_t* src = grad + pl * p.h_out * p.w_out;
        scalar_t* dst = out + pl * plane;
        std::fill(dst, dst + plane, scalar_t(0));
        for (int64_t oh = 0; oh < p.h_out; ++oh) {
          for (int64_t ow = 0; ow < p.w_out; ++ow) {
            int64_t ih_b, ih_e, iw_b, iw_e;
            const acc_t divisor = window(oh, ow, &ih_b, &ih_e, &iw_b, &iw_e);
            const scalar_t share = src[oh * p.w_out + ow] / static_cast<scalar_t>(divisor);
            for (int64_t ih = ih_b; ih < ih_e; ++ih) {
              std::fill(dst + ih * p.w + iw_b, dst + ih * p.w + iw_e, share);
            }
          }
        }
      }
    });
    return;
  }
  if (!channels_last) {
    at::parallel_for(0, p.n * p.c, grain(plane), [&](int64_t b, int64_t e) {
      run_kernel<scalar_t, AvgBackwardNchw>(avx2, grad, out, g, o, b, e);
    });
    return;
  }
  const int64_t blocks = (p.c + kChunk - 1) / kChunk;
  at::parallel_for(0, p.n * blocks, grain(plane * kChunk), [&](int64_t b, int64_t e) {
    acc_t delta[kChunk];
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * kChunk;
      const int64_t nc = std::min(kChunk, p.c - c0);
      scalar_t* dst = out + n * plane * p.c + c0;
      for (int64_t i = 0; i < plane; ++i) std::fill(dst + i * p.c, dst + i * p.c + nc, scalar_t(0));
      for (int64_t oh = 0; oh < p.h_out; ++oh) {
        for (int64_t ow = 0; ow < p.w_out; ++ow) {
          int64_t ih_b, ih_e, iw_b, iw_e;
          const acc_t divisor = window(oh, ow, &ih_b, &ih_e, &iw_b, &iw_e);
          const scalar_t* src = grad + ((n * p.h_out + oh) * p.w_out + ow) * p.c + c0;
          for (int64_t j = 0; j < nc; ++j) delta[j] = static_cast<acc_t>(src[j]) / divisor;
          for (int64_t ih = ih_b; ih < ih_e; ++ih) {
            for (int64_t iw = iw_b; iw < iw_e; ++iw) {
              scalar_t* __restrict__ d = dst + (ih * p.w + iw) * p.c;
              for (int64_t j = 0; j < nc; ++j) d[j] += delta[j];
            }
          }
        }
      }
    }
  });
}

at::Tensor avg_pool2d_backward_cpu(const at::Tensor& grad_output, at::IntArrayRef input_size,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                                   std::optional<int64_t> divisor_override) {
  pool2d::BackwardPlan plan =
      pool2d::plan_avg_backward(pool2d::Backend::kCpu, grad_output, input_size, kernel_size, stride,
                                padding, ceil_mode, divisor_override);
  if (plan.empty()) return plan.grad_input;
  const AvgOptions o{count_include_pad, divisor_override.value_or(0)};
  const bool avx2 = use_avx2("avg_pool2d_backward");
  AT_DISPATCH_FLOATING_TYPES(plan.grad_output.scalar_type(), "avg_pool2d_backward_cpu", [&] {
    avg_backward_cpu_typed<scalar_t>(plan.grad_output, plan.grad_input, plan.p, o,
                                     plan.channels_last, avx2);
  });
  return plan.grad_input;
}

}  // namespace
}  // namespace cnnext

TORCH_LIBRARY_IMPL(cnnext, CPU, m) {
  m.impl("max_pool2d_with_argmax", &cnnext::max_pool2d_with_argmax_cpu);
  m.impl("max_pool2d_backward", &cnnext::max_pool2d_backward_cpu);
  m.impl("avg_pool2d", &cnnext::avg_pool2d_cpu);
  m.impl("avg_pool2d_backward", &cnnext::avg_pool2d_backward_cpu);
}
