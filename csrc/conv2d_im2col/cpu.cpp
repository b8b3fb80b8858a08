// im2col + GEMM convolution on the CPU. Contiguous input is unfolded tile by tile into
// col[(c, ki, kj), pixel] and multiplied as Y = W . col, so the GEMM writes NCHW output in place;
// a tile is a block of output rows of one sample (large maps stay in cache) or a few whole
// samples side by side (small maps still give the GEMM wide operands). channels_last input is
// unfolded into col[pixel, (g, ki, kj, c)] and multiplied as Y = col . W'^T, which writes NHWC
// output in place. Column buffers never exceed max_col_bytes (at least one output row), and a
// 1x1 / stride 1 / unpadded convolution multiplies the input directly. float GEMMs run on
// oneDNN's brgemm micro-kernel through ATen's cpublas (BLAS where oneDNN has none); double on
// BLAS through at::addmm_.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/conv_dispatch.h"
#include "common/cpu_parallel.h"
#include "common/params.h"
#include "conv2d_im2col/conv2d_im2col.h"

// Fortran BLAS as libtorch_cpu exports it when torch is built with MKL. Weak: a torch without
// these symbols resolves them to null and blas_gemm falls back to at::addmm_.
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

template <typename scalar_t>
at::Tensor scratch(int64_t numel) {
  return at::empty({numel}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// ---- GEMM -----------------------------------------------------------------------------------

// A column-major matrix op(X) (rows x cols, leading dimension ld) as the row-major tensor of its
// transpose, [cols, rows], over the same storage.
template <typename scalar_t>
at::Tensor col_major_t(const scalar_t* p, char trans, int64_t rows, int64_t cols, int64_t ld) {
  auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  return at::from_blob(const_cast<scalar_t*>(p), {cols, rows},
                       trans == 't' ? at::IntArrayRef{1, ld} : at::IntArrayRef{ld, 1}, options);
}

// C = op(A) op(B) + beta C in column-major storage (BLAS's and common/gemm.cuh's contract);
// beta == 0 never reads C. Calls BLAS directly when torch exports it (as ATen's own cpublas does,
// which an extension cannot reach), else at::addmm_ on views: C^T = op(B)^T op(A)^T.
template <typename scalar_t>
void blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, const scalar_t* a,
               int64_t lda, const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c,
               int64_t ldc) {
  if (m == 0 || n == 0) return;
  const scalar_t alpha = 1;
  if (std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX) {
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (sgemm_ != nullptr) {
        sgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
        return;
      }
    } else {
      if (dgemm_ != nullptr) {
        dgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
        return;
      }
    }
  }
  at::Tensor ct = col_major_t<scalar_t>(c, 'n', m, n, ldc);
  ct.addmm_(col_major_t<scalar_t>(b, transb, k, n, ldb),
            col_major_t<scalar_t>(a, transa, m, k, lda), beta, alpha);
}

// Row-major C[m, n] = A[m, k] . B[k, n] (+ C when add_c). float: oneDNN's brgemm micro-kernel in
// blocks whose B panel stays in L2 (brgemm itself does no cache blocking), parallel over column
// blocks when called outside a parallel region, and also over row blocks when there are fewer
// column blocks than threads (a batch-1 deep layer has one); double: BLAS. Each C block sums its
// k blocks in order, so the result does not depend on the split.
template <typename scalar_t>
void gemm_rm(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b,
             int64_t ldb, scalar_t* c, int64_t ldc, bool add_c) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<scalar_t, float>) {
    constexpr int64_t kMB = 64, kNB = 256, kKB = 512;
    const int64_t n_blocks = (n + kNB - 1) / kNB, m_blocks = (m + kMB - 1) / kMB;
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    const int64_t m_parts =
        n_blocks >= threads ? 1 : std::min(m_blocks, (threads + n_blocks - 1) / n_blocks);
    at::parallel_for(0, n_blocks * m_parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n0 = item / m_parts * kNB, nb = std::min(kNB, n - n0);
        const int64_t part = item % m_parts;
        const int64_t m_begin = part * m_blocks / m_parts * kMB;
        const int64_t m_end = std::min(m, (part + 1) * m_blocks / m_parts * kMB);
        for (int64_t k0 = 0; k0 < k; k0 += kKB) {
          const int64_t kb = std::min(kKB, k - k0);
          for (int64_t m0 = m_begin; m0 < m_end; m0 += kMB) {
            at::native::cpublas::brgemm(std::min(kMB, m - m0), nb, kb, lda, ldb, ldc,
                                        add_c || k0 > 0, a + m0 * lda + k0, b + k0 * ldb + n0,
                                        c + m0 * ldc + n0);
          }
        }
      }
    });
  } else {
    blas_gemm<scalar_t>('n', 'n', n, m, k, b, ldb, a, lda, add_c ? 1 : 0, c, ldc);
  }
}

// ---- geometry -------------------------------------------------------------------------------

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

// Output columns [lo, hi) whose input column ow * stride + off lies inside [0, size).
inline void valid_range(int64_t off, int64_t stride, int64_t size, int64_t out, int64_t& lo,
                        int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  hi = size - off <= 0 ? 0 : (size - off + stride - 1) / stride;
  lo = std::min(lo, out);
  hi = std::clamp(hi, lo, out);
}

// ---- contiguous (NCHW) im2col / col2im ------------------------------------------------------
// Columns of output rows [oh0, oh1) of one sample: col[(c, ki, kj) * ld + (oh - oh0) * W_out + ow].

template <typename scalar_t>
void im2col_nchw(const Conv2dParams& p, const scalar_t* x, scalar_t* col, int64_t ld, int64_t oh0,
                 int64_t oh1) {
  const int64_t plane = p.h * p.w, cols = (oh1 - oh0) * p.w_out;
  // With a stride below the kernel width several kernel columns read the same strided positions
  // (7x7 stride 2 stems): split each input row into its `sw` phases once, then every kernel
  // column is a contiguous copy from one phase instead of a strided gather. Narrow rows gather.
  const bool phased = p.sw > 1 && p.kw > p.sw && p.w_out >= 32;
  const int64_t phase_len = (p.w + p.sw - 1) / p.sw;
  // Per kernel column: the valid output columns [lo, hi) and where ow = 0 reads from (in the
  // input row, or in the phase rows), computed once rather than per output row.
  std::vector<int64_t> lo(p.kw), hi(p.kw), from(p.kw);
  for (int64_t kj = 0; kj < p.kw; ++kj) {
    const int64_t off = kj * p.dw - p.pw;  // iw = ow * sw + off
    valid_range(off, p.sw, p.w, p.w_out, lo[kj], hi[kj]);
    // off = j0 * sw + phase with 0 <= phase < sw, so iw reads phases[phase][ow + j0].
    const int64_t phase = ((off % p.sw) + p.sw) % p.sw;
    from[kj] = phased ? phase * phase_len + (off - phase) / p.sw : off;
  }
  at::parallel_for(0, p.c_in * p.kh, cpu_grain_elements(p.kw * cols), [&](int64_t b, int64_t e) {
    std::vector<scalar_t> phases(phased ? p.sw * phase_len : 0);
    for (int64_t r = b; r < e; ++r) {
      const int64_t c = r / p.kh, ki = r % p.kh;
      const scalar_t* src_plane = x + c * plane;
      scalar_t* dst_row = col + r * p.kw * ld;
      for (int64_t oh = oh0; oh < oh1; ++oh, dst_row += p.w_out) {
        const int64_t ih = oh * p.sh - p.ph + ki * p.dh;
        if (ih < 0 || ih >= p.h) {
          for (int64_t kj = 0; kj < p.kw; ++kj) {
            std::fill(dst_row + kj * ld, dst_row + kj * ld + p.w_out, scalar_t(0));
          }
          continue;
        }
        const scalar_t* src_row = src_plane + ih * p.w;
        if (phased) {
          for (int64_t ph = 0; ph < p.sw; ++ph) {
            for (int64_t j = 0; j * p.sw + ph < p.w; ++j) {
              phases[ph * phase_len + j] = src_row[j * p.sw + ph];
            }
          }
        }
        for (int64_t kj = 0; kj < p.kw; ++kj) {
          scalar_t* dst = dst_row + kj * ld;
          const int64_t l0 = lo[kj], h0 = hi[kj];
          std::fill(dst, dst + l0, scalar_t(0));
          if (p.sw == 1) {
            std::memcpy(dst + l0, src_row + from[kj] + l0, (h0 - l0) * sizeof(scalar_t));
          } else if (phased) {
            std::memcpy(dst + l0, phases.data() + from[kj] + l0, (h0 - l0) * sizeof(scalar_t));
          } else {
            const scalar_t* src = src_row + from[kj];
            for (int64_t ow = l0; ow < h0; ++ow) dst[ow] = src[ow * p.sw];
          }
          std::fill(dst + h0, dst + p.w_out, scalar_t(0));
        }
      }
    }
  });
}

// Adds the columns of output rows [oh0, oh1) back into one sample's input gradient (zeroed first
// when `first`). Each input plane sums its own kh * kw rows in a fixed order: deterministic.
template <typename scalar_t>
void col2im_nchw(const Conv2dParams& p, const scalar_t* col, int64_t ld, int64_t oh0, int64_t oh1,
                 scalar_t* dx, bool first) {
  const int64_t kk = p.kh * p.kw, plane = p.h * p.w, cols = (oh1 - oh0) * p.w_out;
  at::parallel_for(0, p.c_in, cpu_grain_elements(kk * cols), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      scalar_t* dst_plane = dx + c * plane;
      if (first) std::fill(dst_plane, dst_plane + plane, scalar_t(0));
      for (int64_t ki = 0; ki < p.kh; ++ki) {
        for (int64_t kj = 0; kj < p.kw; ++kj) {
          const scalar_t* src = col + (c * kk + ki * p.kw + kj) * ld;
          const int64_t off = kj * p.dw - p.pw;
          int64_t lo, hi;
          valid_range(off, p.sw, p.w, p.w_out, lo, hi);
          for (int64_t oh = oh0; oh < oh1; ++oh, src += p.w_out) {
            const int64_t ih = oh * p.sh - p.ph + ki * p.dh;
            if (ih < 0 || ih >= p.h) continue;
            scalar_t* dst = dst_plane + ih * p.w + off;
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

// Rows [q0, q1) of the batch's columns (q = n * P + oh * W_out + ow) into col[(q - q0) * gk + ...].
template <typename scalar_t>
void im2col_nhwc(const Conv2dParams& p, const scalar_t* x, scalar_t* col, int64_t q0, int64_t q1) {
  const int64_t cg = p.c_in_per_group(), pix = p.h_out * p.w_out, gk = p.c_in * p.kh * p.kw;
  // With one group and no dilation a kernel row's kw taps are kw*C contiguous input values.
  const bool rows = p.groups == 1 && p.dw == 1;
  at::parallel_for(q0, q1, cpu_grain_elements(gk), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = q / pix, oh = (q % pix) / p.w_out, ow = q % p.w_out;
      const scalar_t* xs = x + n * p.h * p.w * p.c_in;
      scalar_t* dst = col + (q - q0) * gk;
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

// Gather over `samples` whole samples: each input pixel sums the col entries that read it, in a
// fixed order.
template <typename scalar_t>
void col2im_nhwc(const Conv2dParams& p, const scalar_t* col, scalar_t* x, int64_t samples) {
  const int64_t cg = p.c_in_per_group(), pix = p.h_out * p.w_out, gk = p.c_in * p.kh * p.kw;
  const int64_t in_pix = p.h * p.w;
  at::parallel_for(0, samples * in_pix, cpu_grain_elements(gk), [&](int64_t b, int64_t e) {
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

// ---- work split -----------------------------------------------------------------------------

// Column entries per tile for a 1-thread cache-sized tile, and the narrowest GEMM worth having
// (a smaller feature map groups several samples per tile).
constexpr int64_t kTileEntries = 1 << 18;
constexpr int64_t kMinCols = 256;
// Output pixels (batch included) from which channels_last input takes the NHWC path.
constexpr int64_t kMinNhwcPixels = 1024;

// A contiguous-path tile: output rows [oh0, oh1) of samples [n0, n0 + nb) (nb > 1 only with
// whole samples).
struct Tile {
  int64_t n0, nb, oh0, oh1;
};

// Samples [s0, s1) as tiles of at most `budget` column entries (always at least one output row).
std::vector<Tile> plan_tiles(const Conv2dParams& p, const Layout& l, int64_t s0, int64_t s1,
                             int64_t budget) {
  std::vector<Tile> tiles;
  const int64_t per_sample = l.gk * l.p;
  if (l.pointwise || (l.p >= kMinCols && per_sample <= std::min(budget, kTileEntries))) {
    for (int64_t n = s0; n < s1; ++n) tiles.push_back({n, 1, 0, p.h_out});
  } else if (l.p < kMinCols && per_sample <= budget) {
    const int64_t nb =
        std::clamp<int64_t>(std::min((kMinCols + l.p - 1) / l.p, budget / per_sample), 1,
                            std::max<int64_t>(1, s1 - s0));
    for (int64_t n = s0; n < s1; n += nb) tiles.push_back({n, std::min(nb, s1 - n), 0, p.h_out});
  } else {
    const int64_t max_rows =
        std::clamp<int64_t>(std::min(budget, kTileEntries) / (l.gk * p.w_out), 1, p.h_out);
    // Equal row blocks (not full blocks and a remainder): threads get equal work.
    const int64_t blocks = (p.h_out + max_rows - 1) / max_rows;
    const int64_t rows = (p.h_out + blocks - 1) / blocks;
    for (int64_t n = s0; n < s1; ++n) {
      for (int64_t oh = 0; oh < p.h_out; oh += rows) {
        tiles.push_back({n, 1, oh, std::min(oh + rows, p.h_out)});
      }
    }
  }
  return tiles;
}

// Parallel tasks over samples: one per thread (a single sample parallelises inside instead).
int64_t sample_slots(const Conv2dParams& p) {
  return std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(p.n, 1));
}

// Column entries per tile: the budget is shared by the slots; one output row always fits.
int64_t tile_budget(const Conv2dParams& p, const Layout& l, int64_t slots, int64_t max_col_bytes,
                    int64_t elem_size) {
  return std::max(max_col_bytes / elem_size / slots, l.gk * p.w_out);
}

// The widest of `tiles` in output pixels, and whether any groups several samples.
int64_t max_tile_cols(const std::vector<Tile>& tiles, int64_t w_out, bool& grouped) {
  int64_t cols = 0;
  grouped = false;
  for (const Tile& t : tiles) {
    cols = std::max(cols, t.nb * (t.oh1 - t.oh0) * w_out);
    grouped = grouped || t.nb > 1;
  }
  return cols;
}

// Runs fn(tile, slot) over all tiles: samples are split into `slots` contiguous ranges, one per
// parallel task, so a sample's tiles stay on one thread, in row order.
template <typename F>
void for_each_tile(const Conv2dParams& p, const Layout& l, int64_t slots, int64_t budget,
                   const F& fn) {
  auto run_slot = [&](int64_t s) {
    for (const Tile& t : plan_tiles(p, l, s * p.n / slots, (s + 1) * p.n / slots, budget)) {
      fn(t, s);
    }
  };
  if (slots <= 1) {
    run_slot(0);
    return;
  }
  at::parallel_for(0, slots, 1, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) run_slot(s);
  });
}

// Forward only: all tiles in plan order, split into at most `slots` contiguous ranges, one per
// parallel task. Forward tiles write disjoint output rows, so a batch smaller than the thread
// count still uses every thread (backward keeps a sample's tiles on one thread instead: col2im
// adds neighbouring tiles' rows).
template <typename F>
void for_each_forward_tile(const std::vector<Tile>& tiles, int64_t slots, const F& fn) {
  const int64_t count = static_cast<int64_t>(tiles.size());
  const int64_t parts = std::clamp<int64_t>(slots, 1, std::max<int64_t>(count, 1));
  if (parts == 1) {
    for (const Tile& t : tiles) fn(t, 0);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      for (int64_t i = s * count / parts; i < (s + 1) * count / parts; ++i) fn(tiles[i], s);
    }
  });
}

// Forward only: with few tiles, a tile count that is not a multiple of the thread count leaves
// threads idle (one tile at batch 1 uses one thread; three on two threads, 2/3 of them). Cuts
// every tile into `parts` equal pieces (samples of a multi-sample tile, else output rows) so the
// count becomes one; each thread then unfolds and multiplies its own output rows.
std::vector<Tile> split_for_threads(const std::vector<Tile>& tiles, int64_t slots) {
  const int64_t count = static_cast<int64_t>(tiles.size());
  if (count == 0 || count % slots == 0 || count >= 4 * slots) return tiles;
  const int64_t parts = slots / std::gcd(count, slots);
  std::vector<Tile> split;
  for (const Tile& t : tiles) {
    const int64_t units = t.nb > 1 ? t.nb : t.oh1 - t.oh0;
    const int64_t q = std::min(parts, units);
    for (int64_t i = 0; i < q; ++i) {
      const int64_t u0 = i * units / q, u1 = (i + 1) * units / q;
      split.push_back(t.nb > 1 ? Tile{t.n0 + u0, u1 - u0, t.oh0, t.oh1}
                               : Tile{t.n0, 1, t.oh0 + u0, t.oh0 + u1});
    }
  }
  return split;
}

// channels_last backward works on chunks of whole samples whose columns fit in max_col_bytes.
int64_t samples_per_chunk(const Conv2dParams& p, const Layout& l, int64_t max_col_bytes,
                          int64_t elem_size) {
  if (l.pointwise) return std::max<int64_t>(p.n, 1);
  const int64_t per_sample = std::max<int64_t>(1, l.gk * l.p * elem_size);
  return std::clamp<int64_t>(max_col_bytes / per_sample, 1, std::max<int64_t>(p.n, 1));
}

// ---- plan -----------------------------------------------------------------------------------

// What a call decides before it computes: its path, the split of its work over parallel slots
// and the scratch each slot needs, in elements (a column buffer; on the NCHW path also the GEMM
// output of a multi-sample tile, or its gathered grad_output). It depends on the shapes, the
// thread count and max_col_bytes only; the run functions below only follow it.
struct Plan {
  Layout l;
  bool nhwc = false;        // the channels_last path
  int64_t slots = 1;        // parallel tasks, each with its own scratch
  int64_t budget = 0;       // NCHW: column entries per tile
  std::vector<Tile> tiles;  // NCHW forward: every tile, in order
  int64_t rows = 0;      // NHWC forward: output pixels per tile; NHWC backward: samples per chunk
  int64_t col_size = 0;  // column buffer per slot
  int64_t tmp_size = 0;  // NCHW: multi-sample GEMM output (forward) or grad_output (backward)
};

// The NHWC GEMM reads the weight transposed, W'^T[K, C_out], formed once per call; with few
// output pixels that transpose costs more than converting the activations, so small maps take
// the contiguous path and come back channels_last.
Plan plan_forward(const Conv2dParams& p, bool channels_last, int64_t max_col_bytes,
                  int64_t elem_size) {
  Plan plan;
  plan.l = layout_of(p);
  const Layout& l = plan.l;
  plan.nhwc = channels_last && p.n * l.p >= kMinNhwcPixels;
  if (plan.nhwc) {
    // Tiles of output pixels (any range of q = n * P + pixel is a contiguous block of NHWC rows),
    // cache-sized and within the budget; slots are parallel tasks over contiguous tile ranges.
    const int64_t total = p.n * l.p;
    plan.slots = std::clamp<int64_t>(at::get_num_threads(), 1, total);
    plan.rows =
        l.pointwise
            ? total
            : std::clamp<int64_t>(
                  std::min(max_col_bytes / elem_size / plan.slots, kTileEntries) / l.gk, 1, total);
    plan.col_size = l.pointwise ? 0 : plan.rows * l.gk;
    return plan;
  }
  plan.slots = std::max<int64_t>(at::get_num_threads(), 1);
  plan.budget = tile_budget(p, l, plan.slots, max_col_bytes, elem_size);
  plan.tiles = split_for_threads(plan_tiles(p, l, 0, p.n, plan.budget), plan.slots);
  bool grouped;
  const int64_t max_cols = max_tile_cols(plan.tiles, p.w_out, grouped);
  plan.col_size = l.pointwise ? 0 : l.gk * max_cols;
  plan.tmp_size = grouped ? p.c_out * max_cols : 0;
  return plan;
}

// Backward takes the layout of grad_output.
Plan plan_backward(const Conv2dParams& p, bool channels_last, int64_t max_col_bytes,
                   int64_t elem_size) {
  Plan plan;
  plan.l = layout_of(p);
  const Layout& l = plan.l;
  plan.nhwc = channels_last;
  if (plan.nhwc) {
    plan.rows = samples_per_chunk(p, l, max_col_bytes, elem_size);
    plan.col_size = l.pointwise ? 0 : plan.rows * l.p * l.gk;
    return plan;
  }
  plan.slots = sample_slots(p);
  plan.budget = tile_budget(p, l, plan.slots, max_col_bytes, elem_size);
  bool grouped;
  // The largest tile any slot sees: the first slot's share of samples is the largest.
  const int64_t max_cols = max_tile_cols(
      plan_tiles(p, l, 0, (p.n + plan.slots - 1) / plan.slots, plan.budget), p.w_out, grouped);
  plan.col_size = l.pointwise ? 0 : l.gk * max_cols;
  plan.tmp_size = grouped ? p.c_out * max_cols : 0;
  return plan;
}

// ---- forward --------------------------------------------------------------------------------

// The fused epilogue of conv_bn_relu on `count` values of one channel: v * scale + shift, then
// max(0, .) with `relu` (std::max(v, 0) keeps NaN, as torch.relu does). Vectorises.
template <typename scalar_t>
void epilogue_run(scalar_t* v, int64_t count, scalar_t scale, scalar_t shift, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < count; ++i) v[i] = std::max(v[i] * scale + shift, scalar_t(0));
  } else {
    for (int64_t i = 0; i < count; ++i) v[i] = v[i] * scale + shift;
  }
}

// With `scale` (the fused epilogue of conv_bn_relu) each output is acc * scale[c] + bias[c],
// then max(0, .) with `relu`: applied to each tile right after its GEMM, while the tile is still
// in cache, so there is no separate pass over the output. Without a scale the bias is written
// before the GEMM accumulates onto it, as in the plain convolution.
template <typename scalar_t>
void forward_nchw(const Conv2dParams& p, const Plan& plan, const scalar_t* x, const scalar_t* w,
                  const scalar_t* bias, const scalar_t* scale, bool relu, scalar_t* y) {
  const Layout& l = plan.l;
  const int64_t cog = p.c_out_per_group(), in_size = p.c_in * p.h * p.w;
  const int64_t out_size = p.c_out * l.p;
  // Per slot: a column tile and, for multi-sample tiles, the GEMM output before it is scattered.
  const int64_t col_size = plan.col_size, tmp_size = plan.tmp_size;
  at::Tensor col_buffer = scratch<scalar_t>(plan.slots * col_size);
  at::Tensor tmp_buffer = scratch<scalar_t>(plan.slots * tmp_size);
  for_each_forward_tile(plan.tiles, plan.slots, [&](const Tile& t, int64_t slot) {
    const int64_t rows = (t.oh1 - t.oh0) * p.w_out, cols = t.nb * rows;
    const scalar_t* a = x + t.n0 * in_size + t.oh0 * p.w_out;  // pointwise: a block of rows
    if (!l.pointwise) {
      scalar_t* col = col_buffer.mutable_data_ptr<scalar_t>() + slot * col_size;
      for (int64_t b = 0; b < t.nb; ++b) {
        im2col_nchw(p, x + (t.n0 + b) * in_size, col + b * rows, cols, t.oh0, t.oh1);
      }
      a = col;
    }
    const int64_t lda = l.pointwise ? l.p : cols;
    // One sample's output rows are written in place (bias first, then accumulated onto); a group
    // of samples goes through a [C_out, nb * rows] buffer.
    const bool direct = t.nb == 1;
    scalar_t* c = direct ? y + t.n0 * out_size + t.oh0 * p.w_out
                         : tmp_buffer.mutable_data_ptr<scalar_t>() + slot * tmp_size;
    const int64_t ldc = direct ? l.p : cols;
    const bool add_bias_first = direct && bias != nullptr && scale == nullptr;
    if (add_bias_first) {
      for (int64_t o = 0; o < p.c_out; ++o) std::fill(c + o * ldc, c + o * ldc + cols, bias[o]);
    }
    // Y_g[cog, cols] = W_g[cog, K] . col_g[K, cols], all row-major.
    for (int64_t g = 0; g < p.groups; ++g) {
      gemm_rm<scalar_t>(cog, cols, l.k, w + g * cog * l.k, l.k, a + g * l.k * lda, lda,
                        c + g * cog * ldc, ldc, add_bias_first);
    }
    if (direct && (scale != nullptr || relu)) {
      for (int64_t o = 0; o < p.c_out; ++o) {
        const scalar_t so = scale != nullptr ? scale[o] : scalar_t(1);
        const scalar_t bo = scale != nullptr && bias != nullptr ? bias[o] : scalar_t(0);
        epilogue_run(c + o * ldc, cols, so, bo, relu);
      }
    }
    if (!direct) {
      for (int64_t b = 0; b < t.nb; ++b) {
        for (int64_t o = 0; o < p.c_out; ++o) {
          const scalar_t* src = c + o * ldc + b * rows;
          scalar_t* dst = y + (t.n0 + b) * out_size + o * l.p;
          const scalar_t bo = bias != nullptr ? bias[o] : scalar_t(0);
          const scalar_t so = scale != nullptr ? scale[o] : scalar_t(1);  // x * 1 == x
          if (relu) {
            for (int64_t i = 0; i < rows; ++i) dst[i] = std::max(src[i] * so + bo, scalar_t(0));
          } else {
            for (int64_t i = 0; i < rows; ++i) dst[i] = src[i] * so + bo;
          }
        }
      }
    }
  });
}

// `wt` is W'^T per group: [G][K = (ki, kj, c)][cog].
template <typename scalar_t>
void forward_nhwc(const Conv2dParams& p, const Plan& plan, const scalar_t* x, const scalar_t* wt,
                  const scalar_t* bias, const scalar_t* scale, bool relu, scalar_t* y) {
  const Layout& l = plan.l;
  const int64_t cog = p.c_out_per_group(), total = p.n * l.p;
  const int64_t slots = plan.slots, tile = plan.rows;
  const int64_t tiles = (total + tile - 1) / tile;
  at::Tensor col_buffer = scratch<scalar_t>(slots * plan.col_size);
  auto run_tile = [&](int64_t i, int64_t slot) {
    const int64_t q0 = i * tile, rows = std::min(tile, total - q0);
    const scalar_t* a = x + q0 * p.c_in;  // pointwise: the input rows themselves
    if (!l.pointwise) {
      scalar_t* col = col_buffer.mutable_data_ptr<scalar_t>() + slot * tile * l.gk;
      im2col_nhwc(p, x, col, q0, q0 + rows);
      a = col;
    }
    scalar_t* yc = y + q0 * p.c_out;
    const bool add_bias_first = bias != nullptr && scale == nullptr;
    if (add_bias_first) {
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(yc + r * p.c_out, bias, p.c_out * sizeof(scalar_t));
    }
    // Y_g[rows, cog] (rows C_out apart) = col_g[rows, K] . W'^T_g[K, cog], all row-major.
    for (int64_t g = 0; g < p.groups; ++g) {
      gemm_rm<scalar_t>(rows, cog, l.k, a + g * l.k, l.gk, wt + g * l.k * cog, cog, yc + g * cog,
                        p.c_out, add_bias_first);
    }
    if (scale != nullptr) {
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* v = yc + r * p.c_out;
        for (int64_t c = 0; c < p.c_out; ++c) {
          const scalar_t t = v[c] * scale[c] + (bias != nullptr ? bias[c] : scalar_t(0));
          v[c] = relu ? std::max(t, scalar_t(0)) : t;
        }
      }
    } else if (relu) {
      epilogue_run(yc, rows * p.c_out, scalar_t(1), scalar_t(0), true);
    }
  };
  if (slots <= 1 || tiles <= 1) {
    for (int64_t i = 0; i < tiles; ++i) run_tile(i, 0);
    return;
  }
  at::parallel_for(0, slots, 1, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      for (int64_t i = s * tiles / slots; i < (s + 1) * tiles / slots; ++i) run_tile(i, s);
    }
  });
}

}  // namespace

at::Tensor conv2d_im2col_run_forward_cpu(const Conv2dParams& p, const at::Tensor& input,
                                         const at::Tensor& weight, const ConvEpilogue& epilogue,
                                         int64_t max_col_bytes) {
  const bool cl = is_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output = at::empty(p.output_sizes(), input.options().memory_format(fmt));
  if (p.n == 0) return output;
  const Plan plan = plan_forward(p, cl, max_col_bytes, input.element_size());
  const bool nhwc = plan.nhwc;
  const auto run_fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = (p.batched ? input : input.unsqueeze(0)).contiguous(run_fmt);
  // W'^T per group, [G][kh, kw, C_in/groups][C_out/groups], matching col's (g, ki, kj, c) order.
  const at::Tensor w =
      nhwc ? weight.view({p.groups, p.c_out_per_group(), p.c_in_per_group(), p.kh, p.kw})
                 .permute({0, 3, 4, 2, 1})
                 .contiguous()
           : weight.contiguous();
  const at::Tensor& b = epilogue.shift;
  const at::Tensor& s = epilogue.scale;
  at::Tensor y = cl && !nhwc ? at::empty(p.output_sizes(), output.options()) : output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_im2col_forward_cpu", [&] {
    auto* run = nhwc ? &forward_nhwc<scalar_t> : &forward_nchw<scalar_t>;
    run(p, plan, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        s.defined() ? s.const_data_ptr<scalar_t>() : nullptr, epilogue.relu,
        y.mutable_data_ptr<scalar_t>());
  });
  if (!y.is_same(output)) output.copy_(y);
  return output;
}

namespace {

// ---- backward -------------------------------------------------------------------------------

template <typename scalar_t>
void backward_nchw(const Conv2dParams& p, const Plan& plan, const scalar_t* dy, const scalar_t* x,
                   const scalar_t* w, scalar_t* dx, scalar_t* dw) {
  const Layout& l = plan.l;
  const int64_t cog = p.c_out_per_group(), in_size = p.c_in * p.h * p.w;
  const int64_t out_size = p.c_out * l.p, w_size = p.c_out * l.k;
  const int64_t slots = plan.slots, budget = plan.budget;
  const int64_t col_size = plan.col_size, tmp_size = plan.tmp_size;
  at::Tensor col_buffer = scratch<scalar_t>(slots * col_size);
  at::Tensor tmp_buffer = scratch<scalar_t>(slots * tmp_size);
  // grad_weight: slot 0 accumulates in place, the others into partials summed in slot order
  // afterwards (deterministic for a given thread count).
  at::Tensor partials = scratch<scalar_t>(dw != nullptr ? (slots - 1) * w_size : 0);
  std::vector<char> started(slots, 0);  // not vector<bool>: slots run in parallel
  // The backward GEMMs read W and col transposed, which BLAS does while packing (brgemm would
  // need explicit transposes, slower here than what they save).
  for_each_tile(p, l, slots, budget, [&](const Tile& t, int64_t slot) {
    const int64_t rows = (t.oh1 - t.oh0) * p.w_out, cols = t.nb * rows;
    const int64_t ld_col = l.pointwise ? l.p : cols;
    scalar_t* col = col_buffer.mutable_data_ptr<scalar_t>() + slot * col_size;
    // dY of the tile as [C_out, cols]: in place for one sample, gathered for several.
    const scalar_t* g_out = dy + t.n0 * out_size + t.oh0 * p.w_out;
    int64_t ld_dy = l.p;
    if (t.nb > 1) {
      scalar_t* tmp = tmp_buffer.mutable_data_ptr<scalar_t>() + slot * tmp_size;
      for (int64_t b = 0; b < t.nb; ++b) {
        for (int64_t o = 0; o < p.c_out; ++o) {
          std::memcpy(tmp + o * cols + b * rows, dy + (t.n0 + b) * out_size + o * l.p,
                      rows * sizeof(scalar_t));
        }
      }
      g_out = tmp;
      ld_dy = cols;
    }
    if (dw != nullptr) {
      const scalar_t* a = x + t.n0 * in_size;
      if (!l.pointwise) {
        for (int64_t b = 0; b < t.nb; ++b) {
          im2col_nchw(p, x + (t.n0 + b) * in_size, col + b * rows, cols, t.oh0, t.oh1);
        }
        a = col;
      }
      scalar_t* acc = slot == 0 ? dw : partials.mutable_data_ptr<scalar_t>() + (slot - 1) * w_size;
      // dW_g[cog, K] += dY_g[cog, cols] . col_g[K, cols]^T, i.e. column-major
      // dW_g^T = op(col_g) . dY_g^T.
      for (int64_t g = 0; g < p.groups; ++g) {
        blas_gemm<scalar_t>('t', 'n', l.k, cog, cols, a + g * l.k * ld_col, ld_col,
                            g_out + g * cog * ld_dy, ld_dy, started[slot] ? 1 : 0,
                            acc + g * cog * l.k, l.k);
      }
      started[slot] = 1;
    }
    if (dx != nullptr) {
      scalar_t* target = l.pointwise ? dx + t.n0 * in_size : col;
      // dcol_g[K, cols] = W_g[cog, K]^T . dY_g[cog, cols], i.e. column-major
      // dcol_g^T = dY_g^T . op(W_g).
      for (int64_t g = 0; g < p.groups; ++g) {
        blas_gemm<scalar_t>('n', 't', cols, l.k, cog, g_out + g * cog * ld_dy, ld_dy,
                            w + g * cog * l.k, l.k, 0, target + g * l.k * ld_col, ld_col);
      }
      if (!l.pointwise) {
        for (int64_t b = 0; b < t.nb; ++b) {
          col2im_nchw(p, col + b * rows, cols, t.oh0, t.oh1, dx + (t.n0 + b) * in_size, t.oh0 == 0);
        }
      }
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
void backward_nhwc(const Conv2dParams& p, const Plan& plan, const scalar_t* dy, const scalar_t* x,
                   const scalar_t* w, scalar_t* dx, scalar_t* dw) {
  const Layout& l = plan.l;
  const int64_t cog = p.c_out_per_group();
  const int64_t chunk = plan.rows;
  at::Tensor col_buffer = scratch<scalar_t>(plan.col_size);
  for (int64_t n0 = 0; n0 < p.n; n0 += chunk) {
    const int64_t nb = std::min(chunk, p.n - n0), rows = nb * l.p;
    const scalar_t* dyc = dy + n0 * l.p * p.c_out;
    scalar_t* col = col_buffer.mutable_data_ptr<scalar_t>();
    if (dw != nullptr) {
      const scalar_t* a = x + n0 * p.h * p.w * p.c_in;
      if (!l.pointwise) {
        im2col_nhwc(p, x, col, n0 * l.p, n0 * l.p + rows);
        a = col;
      }
      // dW'_g[cog, K] += dY_g[rows, cog]^T . col_g[rows, K]; column-major dW'_g^T = col_g^T dY_g.
      for (int64_t g = 0; g < p.groups; ++g) {
        blas_gemm<scalar_t>('n', 't', l.k, cog, rows, a + g * l.k, l.gk, dyc + g * cog, p.c_out,
                            n0 == 0 ? 0 : 1, dw + g * cog * l.k, l.k);
      }
    }
    if (dx != nullptr) {
      scalar_t* dxc = dx + n0 * p.h * p.w * p.c_in;
      scalar_t* target = l.pointwise ? dxc : col;
      // dcol_g[rows, K] = dY_g[rows, cog] . W'_g[cog, K], all row-major.
      for (int64_t g = 0; g < p.groups; ++g) {
        gemm_rm<scalar_t>(rows, l.k, cog, dyc + g * cog, p.c_out, w + g * cog * l.k, l.k,
                          target + g * l.k, l.gk, false);
      }
      if (!l.pointwise) col2im_nhwc(p, col, dxc, nb);
    }
  }
}

}  // namespace

// `input` is read only for grad_weight and `weight` only for grad_input: the other may be a
// stride-0 placeholder of the right shape, used here for its metadata alone.
ConvGrads conv2d_im2col_run_backward_cpu(const Conv2dParams& p, const at::Tensor& grad_output,
                                         const at::Tensor& input, const at::Tensor& weight,
                                         std::array<bool, 3> output_mask, int64_t max_col_bytes) {
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
  at::Tensor x, w, dw;
  if (output_mask[1]) {
    x = (p.batched ? input : input.unsqueeze(0)).contiguous(fmt);
    // channels_last accumulates dW' = grad_weight as [C_out, kh, kw, C_in/groups].
    dw = cl ? at::empty({p.c_out, p.kh, p.kw, p.c_in_per_group()}, weight.options()) : grad_weight;
  }
  if (output_mask[0]) w = cl ? weight.permute({0, 2, 3, 1}).contiguous() : weight.contiguous();
  const at::Tensor dx = output_mask[0] && !p.batched ? grad_input.unsqueeze(0) : grad_input;
  const Plan plan = plan_backward(p, cl, max_col_bytes, grad_output.element_size());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_im2col_backward_cpu", [&] {
    auto* run = cl ? &backward_nhwc<scalar_t> : &backward_nchw<scalar_t>;
    run(p, plan, dy.const_data_ptr<scalar_t>(),
        output_mask[1] ? x.const_data_ptr<scalar_t>() : nullptr,
        output_mask[0] ? w.const_data_ptr<scalar_t>() : nullptr,
        output_mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? dw.mutable_data_ptr<scalar_t>() : nullptr);
  });
  if (output_mask[1] && cl) grad_weight.copy_(dw.permute({0, 3, 1, 2}));
  return {grad_input, grad_weight, grad_bias};
}

// ---- the ops: plan (validate), then run through the convolution dispatch ----------------------

at::Tensor conv2d_im2col_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, int64_t max_col_bytes) {
  const Conv2dParams p =
      conv2d_params(kForward, input, weight, bias, stride, padding, dilation, groups, false);
  check_max_col_bytes(kForward, max_col_bytes);
  ConvAlgorithm algo{ConvAlgo::kIm2col};
  algo.max_col_bytes = max_col_bytes;
  return conv_forward_cpu(p, input, weight, algo, ConvEpilogue::bias(bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_im2col_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, int64_t max_col_bytes) {
  const Conv2dParams p = conv2d_params(kBackward, input, weight, std::nullopt, stride, padding,
                                       dilation, groups, false);
  check_max_col_bytes(kBackward, max_col_bytes);
  check_conv_grad_output(kBackward, p, grad_output, input);
  ConvAlgorithm algo{ConvAlgo::kIm2col};
  algo.max_col_bytes = max_col_bytes;
  return conv_backward_cpu(p, grad_output, input, weight, output_mask, algo);
}

}  // namespace cnnext

TORCH_LIBRARY_IMPL(cnnext, CPU, m) {
  m.impl("conv2d_im2col", &cnnext::conv2d_im2col_forward_cpu);
  m.impl("conv2d_im2col_backward", &cnnext::conv2d_im2col_backward_cpu);
}
