// Direct 2D convolution on the CPU. Each sample's input is copied once into zero-padded planes
// split by stride phase, so that for every filter tap the outputs of a row read a contiguous run:
// output position q = oy * L + ox reads plane[q + offset(tap)] (columns ox >= W_out are computed
// and dropped). A register-blocked microkernel accumulates OCB output channels x P positions,
// vectorised by the compiler (zmm FMAs checked in the disassembly) in one copy per ISA (AVX-512,
// AVX2 + FMA, baseline), chosen at run time. grad_input runs the same microkernel once per
// stride phase of the input (the transposed convolution in gather form), grad_weight a blocked
// dot product over positions. Work is split with at::parallel_for; every sum has a fixed order.
// Backward multiplies structural zeros (padding, dropped columns) by real values, which is exact
// only for finite values: the convolution dispatch (common/conv_dispatch.h) sends the gradient of a
// NaN/Inf weight (grad_input) or input (grad_weight) to the im2col backward instead, which touches
// real taps only, as torch does.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/conv_dispatch.h"
#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "common/library.h"
#include "common/params.h"
#include "conv2d_direct/conv2d_direct.h"
#include "conv2d_direct/cpu_nhwc.h"

#if defined(__GNUC__)
#define CNNEXT_INLINE inline __attribute__((always_inline))
// Register blocks are small arrays: they stay in registers only when fully unrolled.
#define CNNEXT_CPU_UNROLL _Pragma("GCC unroll 16")
#else
#define CNNEXT_INLINE inline
#define CNNEXT_CPU_UNROLL
#endif

namespace cnnext {
namespace {

constexpr const char* kForwardOp = "conv2d_direct";
constexpr const char* kBackwardOp = "conv2d_direct_backward";
// Packed copies of a batch chunk stay under this size (at least one sample is packed).
constexpr int64_t kWorkspaceBytes = int64_t(32) << 20;

// ---- ISA selection ------------------------------------------------------------------------------

using Isa = CpuIsa;

// Bytes of accumulators that fit in registers next to the operands, and the vector width.
int64_t accumulator_bytes(Isa isa) {
  return isa == Isa::kAvx512 ? 16 * 64 : isa == Isa::kAvx2 ? 12 * 32 : 8 * 16;
}
int64_t vector_bytes(Isa isa) { return isa == Isa::kAvx512 ? 64 : isa == Isa::kAvx2 ? 32 : 16; }

void check_variant(const char* op, c10::string_view variant) {
  // The CPU has one kernel; the variants choose among the CUDA kernels.
  CNNEXT_CHECK(variant == "auto" || variant == "naive" || variant == "tiled" ||
                   variant == "implicit_gemm" || variant == "implicit_gemm_128x128" ||
                   variant == "implicit_gemm_64x64",
               op,
               "expected variant to be 'auto', 'implicit_gemm', 'implicit_gemm_128x128', "
               "'implicit_gemm_64x64', 'tiled' or 'naive', got '",
               std::string(variant), "'");
}

// Scratch memory, left uninitialised (every element read is written first).
template <typename T>
using Buffer = std::unique_ptr<T[]>;

// ---- microkernels -------------------------------------------------------------------------------

// A tile job: OCB output rows x nq positions (nq a multiple of P) of
//   out[o][q] = sum over channels c and taps t of weight[c][t][o] * src[c * chan_stride + taps[t] +
//   q]
template <typename T>
struct TileJob {
  const T* src;  // channel 0 at the first position
  int64_t chan_stride, nchan;
  const int64_t* taps;
  int64_t ntaps;
  const T* weight;  // [nchan][ntaps][OCB]
  int64_t nq;
  T* out;  // out[o * out_stride + q]
  int64_t out_stride;
};

template <typename T, int OCB, int P, bool kFma>
CNNEXT_INLINE void conv_tile(const TileJob<T>& job, int64_t q0) {
  T acc[OCB][P] = {};
  for (int64_t c = 0; c < job.nchan; ++c) {
    const T* __restrict__ src = job.src + c * job.chan_stride + q0;
    const T* __restrict__ w = job.weight + c * job.ntaps * OCB;
    for (int64_t t = 0; t < job.ntaps; ++t) {
      const T* __restrict__ x = src + job.taps[t];
      CNNEXT_CPU_UNROLL
      for (int64_t o = 0; o < OCB; ++o) {
        const T wv = w[t * OCB + o];
        for (int64_t j = 0; j < P; ++j) {
          if constexpr (kFma) {
            acc[o][j] = std::fma(wv, x[j], acc[o][j]);
          } else {
            acc[o][j] += wv * x[j];
          }
        }
      }
    }
  }
  CNNEXT_CPU_UNROLL
  for (int64_t o = 0; o < OCB; ++o) {
    for (int64_t j = 0; j < P; ++j) job.out[o * job.out_stride + q0 + j] = acc[o][j];
  }
}

template <typename T, int OCB, int P, bool kFma>
CNNEXT_INLINE void conv_tiles(const TileJob<T>& job) {
  for (int64_t q0 = 0; q0 < job.nq; q0 += P) conv_tile<T, OCB, P, kFma>(job, q0);
}

// A dot job: sums[o][t] = sum over q < nq of rows[o][q] * cols[t][q], nq a multiple of the
// 64-byte vector; partial sums per lane, added in lane order at the end.
template <typename T>
struct DotJob {
  const T* const* rows;  // OCB pointers
  const T* const* cols;  // TB pointers
  int64_t nq;
  T* sums;  // [OCB][TB]
};

template <typename T, int OCB, int TB, bool kFma>
CNNEXT_INLINE void dot_tile(const DotJob<T>& job) {
  constexpr int kLanes = 64 / sizeof(T);
  const T* rows[OCB];
  const T* cols[TB];
  CNNEXT_CPU_UNROLL
  for (int64_t o = 0; o < OCB; ++o) rows[o] = job.rows[o];
  CNNEXT_CPU_UNROLL
  for (int64_t t = 0; t < TB; ++t) cols[t] = job.cols[t];
  T acc[OCB][TB][kLanes] = {};
  for (int64_t q = 0; q < job.nq; q += kLanes) {
    CNNEXT_CPU_UNROLL
    for (int64_t o = 0; o < OCB; ++o) {
      CNNEXT_CPU_UNROLL
      for (int64_t t = 0; t < TB; ++t) {
        for (int64_t j = 0; j < kLanes; ++j) {
          if constexpr (kFma) {
            acc[o][t][j] = std::fma(rows[o][q + j], cols[t][q + j], acc[o][t][j]);
          } else {
            acc[o][t][j] += rows[o][q + j] * cols[t][q + j];
          }
        }
      }
    }
  }
  for (int64_t o = 0; o < OCB; ++o) {
    for (int64_t t = 0; t < TB; ++t) {
      T s = 0;
      for (int64_t j = 0; j < kLanes; ++j) s += acc[o][t][j];
      job.sums[o * TB + t] = s;
    }
  }
}

// An outer-product job: sums[t][j] = sum over segments s and q < nq of
// cols[t][s * col_step + q] * rows[s * row_step + q * ld + j], j < P: TB broadcast scalars against
// one P-wide row per step, no horizontal sums.
template <typename T>
struct OuterJob {
  const T* const* cols;  // TB pointers
  const T* rows;
  int64_t ld, nq;
  int64_t segments, col_step, row_step;
  T* sums;  // [TB][P]
};

template <typename T, int TB, int P, bool kFma>
CNNEXT_INLINE void outer_tile(const OuterJob<T>& job) {
  const T* cols[TB];
  CNNEXT_CPU_UNROLL
  for (int64_t t = 0; t < TB; ++t) cols[t] = job.cols[t];
  T acc[TB][P] = {};
  for (int64_t s = 0; s < job.segments; ++s) {
    const T* __restrict__ rows = job.rows + s * job.row_step;
    const int64_t shift = s * job.col_step;
    for (int64_t q = 0; q < job.nq; ++q) {
      const T* __restrict__ row = rows + q * job.ld;
      CNNEXT_CPU_UNROLL
      for (int64_t t = 0; t < TB; ++t) {
        const T xv = cols[t][shift + q];
        for (int64_t j = 0; j < P; ++j) {
          if constexpr (kFma) {
            acc[t][j] = std::fma(xv, row[j], acc[t][j]);
          } else {
            acc[t][j] += xv * row[j];
          }
        }
      }
    }
  }
  CNNEXT_CPU_UNROLL
  for (int64_t t = 0; t < TB; ++t) {
    for (int64_t j = 0; j < P; ++j) job.sums[t * P + j] = acc[t][j];
  }
}

// One copy of each microkernel per ISA; the bodies are inlined into the target-specific
// wrapper, so the compiler vectorises them for that ISA.
#ifdef CNNEXT_X86_COPIES
template <typename T, int OCB, int P>
CNNEXT_TARGET_AVX512 void conv_tiles_avx512(const TileJob<T>& job) {
  conv_tiles<T, OCB, P, true>(job);
}
template <typename T, int OCB, int P>
CNNEXT_TARGET_AVX2 void conv_tiles_avx2(const TileJob<T>& job) {
  conv_tiles<T, OCB, P, true>(job);
}
template <typename T, int OCB, int TB>
CNNEXT_TARGET_AVX512 void dot_tile_avx512(const DotJob<T>& job) {
  dot_tile<T, OCB, TB, true>(job);
}
template <typename T, int OCB, int TB>
CNNEXT_TARGET_AVX2 void dot_tile_avx2(const DotJob<T>& job) {
  dot_tile<T, OCB, TB, true>(job);
}
template <typename T, int TB, int P>
CNNEXT_TARGET_AVX512 void outer_tile_avx512(const OuterJob<T>& job) {
  outer_tile<T, TB, P, true>(job);
}
template <typename T, int TB, int P>
CNNEXT_TARGET_AVX2 void outer_tile_avx2(const OuterJob<T>& job) {
  outer_tile<T, TB, P, true>(job);
}
#endif
template <typename T, int OCB, int P>
void conv_tiles_baseline(const TileJob<T>& job) {
  conv_tiles<T, OCB, P, false>(job);
}
template <typename T, int OCB, int TB>
void dot_tile_baseline(const DotJob<T>& job) {
  dot_tile<T, OCB, TB, false>(job);
}
template <typename T, int TB, int P>
void outer_tile_baseline(const OuterJob<T>& job) {
  outer_tile<T, TB, P, false>(job);
}

template <typename T>
using ConvTilesFn = void (*)(const TileJob<T>&);
template <typename T>
using DotTileFn = void (*)(const DotJob<T>&);
template <typename T>
using OuterTileFn = void (*)(const OuterJob<T>&);

template <typename T, int OCB, int P>
ConvTilesFn<T> conv_tiles_for(Isa isa) {
#ifdef CNNEXT_X86_COPIES
  if (isa == Isa::kAvx512) return &conv_tiles_avx512<T, OCB, P>;
  if (isa == Isa::kAvx2) return &conv_tiles_avx2<T, OCB, P>;
#endif
  return &conv_tiles_baseline<T, OCB, P>;
}

template <typename T, int OCB>
ConvTilesFn<T> conv_tiles_for(Isa isa, int64_t positions) {
  switch (positions) {
    case 8:
      return conv_tiles_for<T, OCB, 8>(isa);
    case 16:
      return conv_tiles_for<T, OCB, 16>(isa);
    case 32:
      return conv_tiles_for<T, OCB, 32>(isa);
    default:
      return conv_tiles_for<T, OCB, 64>(isa);
  }
}

template <typename T>
ConvTilesFn<T> conv_tiles_for(Isa isa, int64_t ocb, int64_t positions) {
  if (ocb == 1) return conv_tiles_for<T, 1>(isa, positions);
  if (ocb == 2) return conv_tiles_for<T, 2>(isa, positions);
  if (ocb == 4) return conv_tiles_for<T, 4>(isa, positions);
  return conv_tiles_for<T, 8>(isa, positions);
}

template <typename T, int OCB, int TB>
DotTileFn<T> dot_tile_for(Isa isa) {
#ifdef CNNEXT_X86_COPIES
  if (isa == Isa::kAvx512) return &dot_tile_avx512<T, OCB, TB>;
  if (isa == Isa::kAvx2) return &dot_tile_avx2<T, OCB, TB>;
#endif
  return &dot_tile_baseline<T, OCB, TB>;
}

template <typename T>
DotTileFn<T> dot_tile_for(Isa isa, int64_t ocb, int64_t tb) {
  auto with_tb = [&](auto ocb_tag) -> DotTileFn<T> {
    constexpr int kOcb = decltype(ocb_tag)::value;
    if (tb == 1) return dot_tile_for<T, kOcb, 1>(isa);
    if (tb == 2) return dot_tile_for<T, kOcb, 2>(isa);
    return dot_tile_for<T, kOcb, 4>(isa);
  };
  if (ocb == 1) return with_tb(std::integral_constant<int, 1>{});
  if (ocb == 2) return with_tb(std::integral_constant<int, 2>{});
  return with_tb(std::integral_constant<int, 4>{});
}

template <typename T, int TB, int P>
OuterTileFn<T> outer_tile_for(Isa isa) {
#ifdef CNNEXT_X86_COPIES
  if (isa == Isa::kAvx512) return &outer_tile_avx512<T, TB, P>;
  if (isa == Isa::kAvx2) return &outer_tile_avx2<T, TB, P>;
#endif
  return &outer_tile_baseline<T, TB, P>;
}

template <typename T>
OuterTileFn<T> outer_tile_for(Isa isa, int64_t tb, int64_t p) {
  if (p == 16) {
    if (tb == 2) return outer_tile_for<T, 2, 16>(isa);
    if (tb == 4) return outer_tile_for<T, 4, 16>(isa);
    return outer_tile_for<T, 8, 16>(isa);
  }
  if (tb == 2) return outer_tile_for<T, 2, 32>(isa);
  if (tb == 4) return outer_tile_for<T, 4, 32>(isa);
  return outer_tile_for<T, 8, 32>(isa);
}

// The register tile of the conv microkernel: OCB channels x P positions.
struct TileShape {
  int64_t ocb = 1, p = 8;
};

// Picks the tile with the fewest cycles by a throughput model: per tap a tile issues
// ocb * ceil(P / lanes) FMAs and ceil(P / lanes) + ocb loads (two per cycle), over
// ceil(channels / ocb) * ceil(positions / P) tiles; padding waste counts as work. Ties go to the
// larger tile (enumerated first).
TileShape tile_shape(Isa isa, int64_t elem_bytes, int64_t channels, int64_t positions) {
  const int64_t lanes = vector_bytes(isa) / elem_bytes;
  TileShape best;
  double best_cycles = -1;
  for (int64_t ocb : {8, 4, 2, 1}) {
    for (int64_t p : {64, 32, 16, 8}) {
      if (ocb * p * elem_bytes > accumulator_bytes(isa)) continue;
      const int64_t vectors = div_up(p, lanes);
      const double per_tap = std::max<double>(ocb * vectors, 0.5 * (vectors + ocb));
      const double cycles = per_tap * div_up(channels, ocb) * div_up(positions, p);
      if (best_cycles < 0 || cycles < best_cycles) best = {ocb, p}, best_cycles = cycles;
    }
  }
  return best;
}

// ---- packing
// -------------------------------------------------------------------------------------

// The forward layout of one input channel: sh * sw phase planes of `plane` elements with rows of
// L; padded input element (y', x') = (y + ph, x + pw) sits in phase (y' % sh, x' % sw) at row
// y' / sh, column x' / sw. Output position q = oy * L + ox reads q + taps[(ky, kx)].
struct InputLayout {
  int64_t L = 0, rows = 0, plane = 0, chan = 0, qpad = 0;
  std::vector<int64_t> taps;
  std::vector<char> used;  // phases some tap reads (a 1x1 stride-2 filter reads one of four)
};

InputLayout input_layout(const Conv2dParams& p, int64_t quantum, int64_t elem_bytes) {
  InputLayout a;
  a.L = div_up(p.w + 2 * p.pw, p.sw);
  a.rows = div_up(p.h + 2 * p.ph, p.sh);
  a.qpad = round_up(p.h_out * a.L, quantum);
  const int64_t max_offset = ((p.kh - 1) * p.dh / p.sh) * a.L + (p.kw - 1) * p.dw / p.sw;
  a.plane = std::max(a.rows * a.L, a.qpad + max_offset);  // full-tile reads stay inside
  a.plane = odd_lines(a.plane, elem_bytes);
  a.chan = p.sh * p.sw * a.plane;
  a.used.assign(p.sh * p.sw, 0);
  for (int64_t ky = 0; ky < p.kh; ++ky) {
    for (int64_t kx = 0; kx < p.kw; ++kx) {
      const int64_t phase = (ky * p.dh % p.sh) * p.sw + kx * p.dw % p.sw;
      a.taps.push_back(phase * a.plane + (ky * p.dh / p.sh) * a.L + kx * p.dw / p.sw);
      a.used[phase] = 1;
    }
  }
  return a;
}

template <typename T>
void pack_input_channel(const T* src, int64_t s_h, int64_t s_w, const Conv2dParams& p,
                        const InputLayout& a, T* dst) {
  for (int64_t phase = 0; phase < p.sh * p.sw; ++phase) {
    if (a.used[phase]) std::fill(dst + phase * a.plane, dst + (phase + 1) * a.plane, T(0));
  }
  for (int64_t y = 0; y < p.h; ++y) {
    const int64_t yp = y + p.ph;
    const T* src_row = src + y * s_h;
    for (int64_t b = 0; b < p.sw; ++b) {
      if (!a.used[(yp % p.sh) * p.sw + b]) continue;  // never read: left unwritten
      T* dst_row = dst + ((yp % p.sh) * p.sw + b) * a.plane + (yp / p.sh) * a.L;
      // Columns col of phase b hold x = col * sw + b - pw, for 0 <= x < w.
      const int64_t col0 = div_up(std::max<int64_t>(p.pw - b, 0), p.sw);
      const int64_t x0 = col0 * p.sw + b - p.pw;
      if (p.sw == 1 && s_w == 1) {
        std::memcpy(dst_row + col0, src_row + x0, sizeof(T) * (p.w - x0));
      } else {
        for (int64_t x = x0, col = col0; x < p.w; x += p.sw, ++col) dst_row[col] = src_row[x * s_w];
      }
    }
  }
}

// Packs samples [n0, n0 + count) of a 3D/4D activation with strides (sn, sc, sh, sw).
struct Strides {
  int64_t n = 0, c = 0, h = 0, w = 0;
};
Strides strides_of(const at::Tensor& t) {
  const int64_t off = t.dim() == 4 ? 1 : 0;
  return {off ? t.stride(0) : 0, t.stride(off), t.stride(off + 1), t.stride(off + 2)};
}

template <typename T>
void pack_inputs(const T* x, const Strides& s, const Conv2dParams& p, const InputLayout& a,
                 int64_t n0, int64_t count, T* dst) {
  at::parallel_for(0, count * p.c_in, cpu_grain(a.chan), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = n0 + i / p.c_in, c = i % p.c_in;
      pack_input_channel(x + n * s.n + c * s.c, s.h, s.w, p, a, dst + i * a.chan);
    }
  });
}

// Filter for the tile microkernel: [groups][blocks][channels][taps][ocb] with a block stride of
// `block` elements, zero past the group. Tap t of output channel o and reduced channel c (both
// within group g) is base(g, o, c)[tap_offsets[t]].
template <typename T>
struct PackedFilter {
  std::vector<T> data;
  int64_t block = 0;
  const T* at(int64_t g, int64_t blocks, int64_t b) const {
    return data.data() + (g * blocks + b) * block;
  }
};

template <typename T, typename Base>
PackedFilter<T> pack_filter(int64_t groups, int64_t outs, int64_t chans,
                            const std::vector<int64_t>& tap_offsets, int64_t ocb,
                            bool reduced_outer, Base base) {
  const int64_t blocks = div_up(outs, ocb), ntaps = static_cast<int64_t>(tap_offsets.size());
  PackedFilter<T> f;
  f.block = odd_lines(chans * ntaps * ocb, sizeof(T));
  f.data.assign(groups * blocks * f.block, T(0));
  // Loop order by the weight's memory order: blocks then channels for the forward (ocb read
  // streams, sequential writes), channels then blocks for grad_input, whose blocks run along
  // the weight's rows (a sequential read, ocb-wide writes into every block).
  std::vector<const T*> rows(ocb);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < blocks * chans; ++i) {
      const int64_t b = reduced_outer ? i % blocks : i / chans;
      const int64_t c = reduced_outer ? i / blocks : i % chans;
      const int64_t nout = std::min(ocb, outs - b * ocb);
      T* dst = f.data.data() + (g * blocks + b) * f.block + c * ntaps * ocb;
      for (int64_t o = 0; o < nout; ++o) rows[o] = base(g, b * ocb + o, c);
      for (int64_t t = 0; t < ntaps; ++t) {
        for (int64_t o = 0; o < nout; ++o) dst[t * ocb + o] = rows[o][tap_offsets[t]];
      }
    }
  }
  return f;
}

// ---- forward
// -------------------------------------------------------------------------------------

// The store computes acc * scale[c] + bias[c] (a null scale is 1, exactly), then max(0, .) with
// `relu`: the fused epilogue of conv_bn_relu (BatchNorm's scale folded into the store rather
// than into a copy of the weight). The tile is still in L1: no extra pass over the output.
template <typename T>
void forward_typed(const Conv2dParams& p, const at::Tensor& input, const at::Tensor& weight,
                   const T* bias, const T* scale, bool relu, at::Tensor& output) {
  const Isa isa = cpu_isa(kForwardOp);
  const int64_t cin = p.c_in_per_group(), cout = p.c_out_per_group();
  const int64_t L = div_up(p.w + 2 * p.pw, p.sw);
  const TileShape shape = tile_shape(isa, sizeof(T), cout, p.h_out * L);
  const int64_t ocb = shape.ocb, P = shape.p, blocks = div_up(cout, ocb);
  const InputLayout a = input_layout(p, P, sizeof(T));
  const int64_t ntaps = p.kh * p.kw;

  const Strides ws = {weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3)};
  const T* w = weight.const_data_ptr<T>();
  std::vector<int64_t> tap_offsets;
  for (int64_t t = 0; t < ntaps; ++t) tap_offsets.push_back((t / p.kw) * ws.h + (t % p.kw) * ws.w);
  const PackedFilter<T> filter = pack_filter<T>(
      p.groups, cout, cin, tap_offsets, ocb, /*reduced_outer=*/false,
      [&](int64_t g, int64_t o, int64_t c) { return w + (g * cout + o) * ws.n + c * ws.c; });
  const ConvTilesFn<T> kernel = conv_tiles_for<T>(isa, ocb, P);

  const Strides xs = strides_of(input), os = strides_of(output);
  const T* x = input.const_data_ptr<T>();
  T* out = output.mutable_data_ptr<T>();
  // Work item: one sample, group, run of up to 4 channel blocks and run of positions.
  const int64_t q_step = std::min(a.qpad, round_up(512, P));
  const int64_t q_runs = div_up(a.qpad, q_step);
  constexpr int64_t kBlocksPerItem = 4;
  const int64_t block_runs = div_up(blocks, kBlocksPerItem);
  const int64_t sample_bytes = p.c_in * a.chan * static_cast<int64_t>(sizeof(T));
  const int64_t batch = std::clamp<int64_t>(kWorkspaceBytes / sample_bytes, 1, p.n);
  const Buffer<T> packed(new T[batch * p.c_in * a.chan]);

  for (int64_t n0 = 0; n0 < p.n; n0 += batch) {
    const int64_t count = std::min(batch, p.n - n0);
    pack_inputs(x, xs, p, a, n0, count, packed.get());
    const int64_t items = count * p.groups * block_runs * q_runs;
    const int64_t item_work = kBlocksPerItem * ocb * q_step * cin * ntaps;
    at::parallel_for(0, items, cpu_grain(item_work), [&](int64_t begin, int64_t end) {
      const Buffer<T> tile(new T[ocb * q_step]);
      for (int64_t item = begin; item < end; ++item) {
        int64_t rest = item;
        const int64_t qr = rest % q_runs;
        rest /= q_runs;
        const int64_t br = rest % block_runs;
        rest /= block_runs;
        const int64_t g = rest % p.groups, n = rest / p.groups;
        const int64_t q0 = qr * q_step, q1 = std::min(a.qpad, q0 + q_step);
        for (int64_t b = br * kBlocksPerItem; b < std::min(blocks, (br + 1) * kBlocksPerItem);
             ++b) {
          const TileJob<T> job{packed.get() + (n * p.c_in + g * cin) * a.chan + q0,
                               a.chan,
                               cin,
                               a.taps.data(),
                               ntaps,
                               filter.at(g, blocks, b),
                               q1 - q0,
                               tile.get(),
                               q_step};
          kernel(job);
          // Keep the columns ox < W_out of the rows this run covers; add the bias.
          for (int64_t o = 0; o < ocb && b * ocb + o < cout; ++o) {
            const int64_t oc = g * cout + b * ocb + o;
            const T bv = bias != nullptr ? bias[oc] : T(0);
            const T sv = scale != nullptr ? scale[oc] : T(1);  // x * 1 == x: plain conv unchanged
            T* out_c = out + (n0 + n) * os.n + oc * os.c;
            for (int64_t oy = q0 / a.L; oy < std::min(p.h_out, div_up(q1, a.L)); ++oy) {
              const int64_t x_begin = std::max<int64_t>(0, q0 - oy * a.L);
              const int64_t x_end = std::min(p.w_out, q1 - oy * a.L);
              const T* src = tile.get() + o * q_step;
              const int64_t shift = oy * a.L - q0;  // tile index of column 0 (may be negative)
              T* dst = out_c + oy * os.h;
              if (os.w == 1 && relu) {
                // std::max(v, 0) keeps NaN, as torch.relu does.
                for (int64_t ox = x_begin; ox < x_end; ++ox)
                  dst[ox] = std::max(src[shift + ox] * sv + bv, T(0));
              } else if (os.w == 1) {
                for (int64_t ox = x_begin; ox < x_end; ++ox) dst[ox] = src[shift + ox] * sv + bv;
              } else {
                for (int64_t ox = x_begin; ox < x_end; ++ox) {
                  const T v = src[shift + ox] * sv + bv;
                  dst[ox * os.w] = relu ? std::max(v, T(0)) : v;
                }
              }
            }
          }
        }
      }
    });
  }
}

}  // namespace

at::Tensor conv2d_direct_run_forward_cpu(const Conv2dParams& p, const at::Tensor& input,
                                         const at::Tensor& weight, const ConvEpilogue& epilogue) {
  const at::MemoryFormat fmt =
      is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output = at::empty(p.output_sizes(), input.options().memory_format(fmt));
  if (output.numel() == 0) return output;
  // Any strides: packing reads the input (channels_last included) in place, once per sample.
  const at::Tensor& b = epilogue.shift;
  const at::Tensor& s = epilogue.scale;
  const CpuIsa isa = cpu_isa(kForwardOp);
  if (nhwc::eligible(p, input.scalar_type(), isa)) {
    nhwc::forward(p, isa, input, weight, b.defined() ? b.const_data_ptr<float>() : nullptr,
                  s.defined() ? s.const_data_ptr<float>() : nullptr, epilogue.relu, output);
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_direct", [&] {
    forward_typed<scalar_t>(p, input, weight, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                            s.defined() ? s.const_data_ptr<scalar_t>() : nullptr, epilogue.relu,
                            output);
  });
  return output;
}

namespace {

// ---- grad_input
// ----------------------------------------------------------------------------------

// grad_input at (iy, ix) with (iy + ph) % sh == rh and (ix + pw) % sw == rw gathers only taps
// with ky * dh % sh == rh and kx * dw % sw == rw: per phase a stride-1 correlation of
// grad_output (padded by Bh rows and Bw columns in front) with that subset of the filter.
struct InputPhase {
  int64_t rh = 0, rw = 0;
  int64_t a0 = 0, rows = 0;  // iy = (a0 + a) * sh + rh - ph for a < rows
  int64_t c0 = 0, cols = 0;  // ix = (c0 + c) * sw + rw - pw for c < cols
  int64_t qpad = 0;
  std::vector<int64_t> taps;    // offsets into the padded grad_output plane
  std::vector<int64_t> kernel;  // ky * kw + kx of each tap
};

template <typename T>
void grad_input_typed(const Conv2dParams& p, const at::Tensor& grad_output,
                      const at::Tensor& weight, at::Tensor& grad_input) {
  const Isa isa = cpu_isa(kBackwardOp);
  const int64_t cin = p.c_in_per_group(), cout = p.c_out_per_group();
  const int64_t bh = (p.kh - 1) * p.dh / p.sh, bw = (p.kw - 1) * p.dw / p.sw;

  std::vector<InputPhase> phases;
  int64_t L = p.w_out + bw, rows = p.h_out + bh, widest = 0;
  for (int64_t rh = 0; rh < p.sh; ++rh) {
    for (int64_t rw = 0; rw < p.sw; ++rw) {
      InputPhase f;
      f.rh = rh, f.rw = rw;
      f.a0 = (p.ph - rh + p.sh - 1) / p.sh;  // first a with iy >= 0 (numerator >= 0)
      f.rows = p.h - 1 + p.ph - rh >= 0 ? (p.h - 1 + p.ph - rh) / p.sh - f.a0 + 1 : 0;
      f.c0 = (p.pw - rw + p.sw - 1) / p.sw;
      f.cols = p.w - 1 + p.pw - rw >= 0 ? (p.w - 1 + p.pw - rw) / p.sw - f.c0 + 1 : 0;
      if (f.rows <= 0 || f.cols <= 0) continue;
      L = std::max(L, f.c0 + f.cols + bw);
      rows = std::max(rows, f.a0 + f.rows + bh);
      phases.push_back(std::move(f));
    }
  }
  for (const InputPhase& f : phases) widest = std::max(widest, f.rows * L);
  const TileShape shape = tile_shape(isa, sizeof(T), cin, widest);
  const int64_t icb = shape.ocb, P = shape.p, blocks = div_up(cin, icb);
  int64_t plane = rows * L;
  for (InputPhase& f : phases) {
    f.qpad = round_up(f.rows * L, P);
    for (int64_t ky = 0; ky < p.kh; ++ky) {
      for (int64_t kx = 0; kx < p.kw; ++kx) {
        if (ky * p.dh % p.sh != f.rh || kx * p.dw % p.sw != f.rw) continue;
        const int64_t off = (f.a0 - ky * p.dh / p.sh + bh) * L + (f.c0 - kx * p.dw / p.sw + bw);
        f.taps.push_back(off);
        f.kernel.push_back(ky * p.kw + kx);
        plane = std::max(plane, f.qpad + off);  // full-tile reads stay inside
      }
    }
  }
  plane = odd_lines(plane, sizeof(T));

  const Strides ws = {weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3)};
  const T* w = weight.const_data_ptr<T>();
  std::vector<PackedFilter<T>> filters;
  for (const InputPhase& f : phases) {
    std::vector<int64_t> tap_offsets;
    for (const int64_t k : f.kernel) tap_offsets.push_back((k / p.kw) * ws.h + (k % p.kw) * ws.w);
    filters.push_back(pack_filter<T>(
        p.groups, cin, cout, tap_offsets, icb, /*reduced_outer=*/true,
        [&](int64_t g, int64_t i, int64_t o) { return w + (g * cout + o) * ws.n + i * ws.c; }));
  }
  const ConvTilesFn<T> kernel = conv_tiles_for<T>(isa, icb, P);

  const Strides gs = strides_of(grad_output), is = strides_of(grad_input);
  const T* go = grad_output.const_data_ptr<T>();
  T* gi = grad_input.mutable_data_ptr<T>();
  const int64_t sample_bytes = p.c_out * plane * static_cast<int64_t>(sizeof(T));
  const int64_t batch = std::clamp<int64_t>(kWorkspaceBytes / sample_bytes, 1, p.n);
  const Buffer<T> packed(new T[batch * p.c_out * plane]);
  constexpr int64_t kBlocksPerItem = 4;
  const int64_t block_runs = div_up(blocks, kBlocksPerItem);

  for (int64_t n0 = 0; n0 < p.n; n0 += batch) {
    const int64_t count = std::min(batch, p.n - n0);
    at::parallel_for(0, count * p.c_out, cpu_grain(plane), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = n0 + i / p.c_out, c = i % p.c_out;
        T* dst = packed.get() + i * plane;
        std::fill(dst, dst + plane, T(0));
        const T* src = go + n * gs.n + c * gs.c;
        for (int64_t oy = 0; oy < p.h_out; ++oy) {
          T* dst_row = dst + (oy + bh) * L + bw;
          for (int64_t ox = 0; ox < p.w_out; ++ox) dst_row[ox] = src[oy * gs.h + ox * gs.w];
        }
      }
    });
    for (std::size_t fi = 0; fi < phases.size(); ++fi) {
      const InputPhase& f = phases[fi];
      const int64_t ntaps = static_cast<int64_t>(f.taps.size());
      const int64_t q_step = std::min(f.qpad, round_up(512, P));
      const int64_t q_runs = div_up(f.qpad, q_step);
      const int64_t items = count * p.groups * block_runs * q_runs;
      const int64_t item_work = kBlocksPerItem * icb * q_step * cout * ntaps;
      at::parallel_for(0, items, cpu_grain(item_work), [&](int64_t begin, int64_t end) {
        const Buffer<T> tile(new T[icb * q_step]);
        for (int64_t item = begin; item < end; ++item) {
          int64_t rest = item;
          const int64_t qr = rest % q_runs;
          rest /= q_runs;
          const int64_t br = rest % block_runs;
          rest /= block_runs;
          const int64_t g = rest % p.groups, n = rest / p.groups;
          const int64_t q0 = qr * q_step, q1 = std::min(f.qpad, q0 + q_step);
          for (int64_t b = br * kBlocksPerItem; b < std::min(blocks, (br + 1) * kBlocksPerItem);
               ++b) {
            const TileJob<T> job{packed.get() + (n * p.c_out + g * cout) * plane + q0,
                                 plane,
                                 cout,
                                 f.taps.data(),
                                 ntaps,
                                 filters[fi].at(g, blocks, b),
                                 q1 - q0,
                                 tile.get(),
                                 q_step};
            kernel(job);
            for (int64_t i = 0; i < icb && b * icb + i < cin; ++i) {
              T* gi_c = gi + (n0 + n) * is.n + (g * cin + b * icb + i) * is.c;
              for (int64_t a = q0 / L; a < std::min(f.rows, div_up(q1, L)); ++a) {
                const int64_t c_begin = std::max<int64_t>(0, q0 - a * L);
                const int64_t c_end = std::min(f.cols, q1 - a * L);
                const T* src = tile.get() + i * q_step;
                const int64_t shift = a * L - q0;
                T* dst = gi_c + ((f.a0 + a) * p.sh + f.rh - p.ph) * is.h +
                         (f.c0 * p.sw + f.rw - p.pw) * is.w;
                const int64_t step = p.sw * is.w;
                for (int64_t c = c_begin; c < c_end; ++c) dst[c * step] = src[shift + c];
              }
            }
          }
        }
      });
    }
  }
}

// ---- grad_weight
// ---------------------------------------------------------------------------------

// grad_weight[oc][c][t] = sum over samples and positions q of go[n][oc][q] * x[n][c][q + taps[t]]
// with grad_output repacked on the forward's position grid (zero in columns ox >= W_out), so every
// input run is read straight from the packed input. Groups with at least 16 output channels use
// outer products vectorised over the channels (grad_output transposed to [q][oc]); narrower
// groups (depthwise) use dot products over positions. Each weight element is owned by one work
// item, which walks samples and position runs in order: the result does not depend on threads.
template <typename T>
void grad_weight_typed(const Conv2dParams& p, const at::Tensor& grad_output,
                       const at::Tensor& input, at::Tensor& grad_weight) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  const Isa isa = cpu_isa(kBackwardOp);
  constexpr int64_t kLanes = 64 / sizeof(T);
  const int64_t cin = p.c_in_per_group(), cout = p.c_out_per_group();
  const InputLayout a = input_layout(p, kLanes, sizeof(T));
  const int64_t ntaps = p.kh * p.kw, kdim = cin * ntaps;
  const bool outer = cout >= 16;
  // Outer products: P channels x tb columns per register tile.
  const int64_t P = cout >= 32 ? 32 : 16, mblocks = div_up(cout, P);
  const int64_t ld = odd_lines(mblocks * P, sizeof(T));
  int64_t tb = 2;
  while (tb < 8 && 2 * tb * P * static_cast<int64_t>(sizeof(T)) <= accumulator_bytes(isa)) tb *= 2;
  const OuterTileFn<T> outer_kernel = outer_tile_for<T>(isa, tb, P);
  // Dot products: ocb channels x dot_tb columns, lane sums added at the end.
  const int64_t ocb = cout >= 4 ? 4 : cout >= 2 ? 2 : 1, blocks = div_up(cout, ocb);
  const int64_t dot_tb = isa == Isa::kAvx512 ? 4 : isa == Isa::kAvx2 ? 2 : 1;
  const DotTileFn<T> dot_kernel = dot_tile_for<T>(isa, ocb, dot_tb);

  const Strides xs = strides_of(input), gs = strides_of(grad_output);
  const T* x = input.const_data_ptr<T>();
  const T* go = grad_output.const_data_ptr<T>();
  const int64_t go_elems = outer ? p.groups * a.qpad * ld : p.c_out * a.qpad;  // per sample
  const int64_t sample_bytes = (p.c_in * a.chan + go_elems) * static_cast<int64_t>(sizeof(T));
  const int64_t batch = std::clamp<int64_t>(kWorkspaceBytes / sample_bytes, 1, p.n);
  const Buffer<T> packed_x(new T[batch * p.c_in * a.chan]);
  const Buffer<T> packed_go(new T[batch * go_elems]);
  // grad_weight is the weight's shape, contiguous: [C_out][C_in / groups][kh][kw] = [C_out][kdim].
  // Outer items write it directly (assign in the first batch chunk, add after); dot items add
  // into `sums` (at a higher precision), converted at the end.
  T* gw = grad_weight.mutable_data_ptr<T>();
  std::vector<acc_t> sums(outer ? 0 : p.c_out * kdim, acc_t(0));

  // Items own a run of column blocks (outer) or channel blocks (dot) of one group: the input run
  // of a position step is reused from cache across the run. An outer item sums into a local
  // [channel][column] buffer kept small enough for L2, added to `sums` once per batch chunk.
  const int64_t threads = at::get_num_threads();
  const int64_t units = outer ? div_up(kdim, tb) : blocks;
  int64_t per_item =
      std::max<int64_t>(1, units / std::max<int64_t>(1, div_up(2 * threads, p.groups)));
  if (outer) {
    const int64_t unit_bytes = tb * cout * static_cast<int64_t>(sizeof(acc_t));
    per_item = std::clamp<int64_t>((int64_t(256) << 10) / unit_bytes, 1, per_item);
  }
  const int64_t runs = div_up(units, per_item);
  const int64_t local_kd = odd_lines(per_item * tb, sizeof(acc_t));
  // Positions per step: a sample's grad_output rows stay in L1 (outer), input runs in L2 (dot).
  const int64_t q_step =
      outer
          ? std::min<int64_t>(a.qpad, 256)
          : std::min(a.qpad, std::max<int64_t>(256, round_up((int64_t(128) << 10) / cin, kLanes)));

  for (int64_t n0 = 0; n0 < p.n; n0 += batch) {
    const int64_t count = std::min(batch, p.n - n0);
    pack_inputs(x, xs, p, a, n0, count, packed_x.get());
    // grad_output on the position grid: [n][g][q][ld] (outer) or [n][oc][q] (dot).
    const int64_t planes = outer ? count * p.groups : count * p.c_out;
    const int64_t plane = go_elems / (outer ? p.groups : p.c_out);
    at::parallel_for(0, planes, cpu_grain(plane), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* dst = packed_go.get() + i * plane;
        std::fill(dst, dst + plane, T(0));
        if (outer) {
          const int64_t n = n0 + i / p.groups, g = i % p.groups;
          for (int64_t m = 0; m < cout; ++m) {
            const T* src = go + n * gs.n + (g * cout + m) * gs.c;
            for (int64_t oy = 0; oy < p.h_out; ++oy) {
              for (int64_t ox = 0; ox < p.w_out; ++ox)
                dst[(oy * a.L + ox) * ld + m] = src[oy * gs.h + ox * gs.w];
            }
          }
        } else {
          const T* src = go + (n0 + i / p.c_out) * gs.n + (i % p.c_out) * gs.c;
          for (int64_t oy = 0; oy < p.h_out; ++oy) {
            for (int64_t ox = 0; ox < p.w_out; ++ox)
              dst[oy * a.L + ox] = src[oy * gs.h + ox * gs.w];
          }
        }
      }
    });
    const int64_t item_work = per_item * (outer ? tb * ld : ocb * kdim) * count * a.qpad;
    at::parallel_for(0, p.groups * runs, cpu_grain(item_work), [&](int64_t begin, int64_t end) {
      std::array<const T*, 8> rows{}, cols{};
      std::array<T, 8 * 32> tile{};
      std::vector<acc_t> local(outer ? cout * local_kd : 0);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / runs, r = item % runs;
        const int64_t u_begin = r * per_item, u_end = std::min(units, u_begin + per_item);
        const T* x0 = packed_x.get() + g * cin * a.chan;  // sample 0 of the group
        // Columns past kdim repeat a valid column; their sums are dropped.
        auto column = [&](const T* xn, int64_t k, int64_t q0) {
          k = std::min(k, kdim - 1);
          return xn + (k / ntaps) * a.chan + a.taps[k % ntaps] + q0;
        };
        if (outer) {
          // One call reduces over the chunk's samples: local[m][k] gets one add per call.
          std::fill(local.begin(), local.end(), acc_t(0));
          const T* go0 = packed_go.get() + g * a.qpad * ld;
          for (int64_t q0 = 0; q0 < a.qpad; q0 += q_step) {
            const int64_t nq = std::min(q_step, a.qpad - q0);
            for (int64_t mb = 0; mb < mblocks; ++mb) {
              const int64_t m_end = std::min(P, cout - mb * P);
              for (int64_t u = u_begin; u < u_end; ++u) {
                for (int64_t t = 0; t < tb; ++t) cols[t] = column(x0, u * tb + t, q0);
                outer_kernel(OuterJob<T>{cols.data(), go0 + q0 * ld + mb * P, ld, nq, count,
                                         p.c_in * a.chan, go_elems, tile.data()});
                acc_t* s = local.data() + mb * P * local_kd + (u - u_begin) * tb;
                for (int64_t j = 0; j < m_end; ++j) {
                  for (int64_t t = 0; t < tb; ++t) s[j * local_kd + t] += tile[t * P + j];
                }
              }
            }
          }
          const int64_t k_begin = u_begin * tb, k_end = std::min(kdim, u_end * tb);
          for (int64_t m = 0; m < cout; ++m) {
            T* dst = gw + (g * cout + m) * kdim;
            const acc_t* src = local.data() + m * local_kd - k_begin;
            if (n0 == 0) {
              for (int64_t k = k_begin; k < k_end; ++k) dst[k] = static_cast<T>(src[k]);
            } else {
              for (int64_t k = k_begin; k < k_end; ++k) dst[k] += static_cast<T>(src[k]);
            }
          }
          continue;
        }
        for (int64_t n = 0; n < count; ++n) {
          const T* xn = x0 + n * p.c_in * a.chan;
          const T* gon = packed_go.get() + n * go_elems + g * cout * a.qpad;
          for (int64_t q0 = 0; q0 < a.qpad; q0 += q_step) {
            const int64_t nq = std::min(q_step, a.qpad - q0);
            for (int64_t b = u_begin; b < u_end; ++b) {
              // Rows past the group's channels repeat a valid row; their sums are dropped.
              for (int64_t o = 0; o < ocb; ++o)
                rows[o] = gon + std::min(b * ocb + o, cout - 1) * a.qpad + q0;
              for (int64_t k0 = 0; k0 < kdim; k0 += dot_tb) {
                for (int64_t t = 0; t < dot_tb; ++t) cols[t] = column(xn, k0 + t, q0);
                dot_kernel(DotJob<T>{rows.data(), cols.data(), nq, tile.data()});
                for (int64_t o = 0; o < ocb && b * ocb + o < cout; ++o) {
                  acc_t* s = sums.data() + (g * cout + b * ocb + o) * kdim + k0;
                  for (int64_t t = 0; t < dot_tb && k0 + t < kdim; ++t)
                    s[t] += tile[o * dot_tb + t];
                }
              }
            }
          }
        }
      }
    });
  }
  for (int64_t i = 0; !outer && i < p.c_out * kdim; ++i) gw[i] = static_cast<T>(sums[i]);
}

// ---- grad_bias ----------------------------------------------------------------------------------

template <typename T>
void grad_bias_typed(const Conv2dParams& p, const at::Tensor& grad_output, at::Tensor& grad_bias) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  const Strides gs = strides_of(grad_output);
  const T* go = grad_output.const_data_ptr<T>();
  T* gb = grad_bias.mutable_data_ptr<T>();
  at::parallel_for(0, p.c_out, cpu_grain(p.n * p.h_out * p.w_out), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      // Eight running sums (vectorisable), added in a fixed order.
      acc_t lanes[8] = {};
      for (int64_t n = 0; n < p.n; ++n) {
        for (int64_t oy = 0; oy < p.h_out; ++oy) {
          const T* row = go + n * gs.n + c * gs.c + oy * gs.h;
          int64_t ox = 0;
          if (gs.w == 1) {
            for (; ox + 8 <= p.w_out; ox += 8) {
              for (int64_t j = 0; j < 8; ++j) lanes[j] += static_cast<acc_t>(row[ox + j]);
            }
          }
          for (; ox < p.w_out; ++ox) lanes[ox % 8] += static_cast<acc_t>(row[ox * gs.w]);
        }
      }
      acc_t total = 0;
      for (int64_t j = 0; j < 8; ++j) total += lanes[j];
      gb[c] = static_cast<T>(total);
    }
  });
}

}  // namespace

// `input` is read only for grad_weight and `weight` only for grad_input: otherwise they may be
// one-element placeholders expanded to the right shape. Both are read through their strides,
// never copied.
ConvGrads conv2d_direct_run_backward_cpu(const Conv2dParams& p, const at::Tensor& grad_output,
                                         const at::Tensor& input, const at::Tensor& weight,
                                         std::array<bool, 3> output_mask) {
  const at::MemoryFormat go_fmt =
      is_channels_last(grad_output) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto options = grad_output.options();
  at::Tensor grad_input = output_mask[0] ? at::empty(p.input_sizes(), options.memory_format(go_fmt))
                                         : at::empty({0}, options);
  at::Tensor grad_weight =
      output_mask[1] ? at::empty(weight.sizes(), options) : at::empty({0}, options);
  at::Tensor grad_bias = output_mask[2] ? at::empty({p.c_out}, options) : at::empty({0}, options);
  if (p.n == 0) {  // sums over an empty batch
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  // Many channels, float32: the register-blocked NHWC kernel (cpu_nhwc.h).
  const CpuIsa isa = cpu_isa(kBackwardOp);
  const bool blocked = nhwc::eligible(p, grad_output.scalar_type(), isa);
  bool input_done = !output_mask[0], weight_done = !output_mask[1];
  if (blocked && !input_done) {
    nhwc::grad_input(p, isa, grad_output, weight, grad_input);
    input_done = true;
  }
  if (blocked && !weight_done) {
    nhwc::grad_weight(p, isa, grad_output, input, grad_weight);
    weight_done = true;
  }
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "conv2d_direct_backward", [&] {
    if (!input_done) grad_input_typed<scalar_t>(p, grad_output, weight, grad_input);
    if (!weight_done) grad_weight_typed<scalar_t>(p, grad_output, input, grad_weight);
    if (output_mask[2]) grad_bias_typed<scalar_t>(p, grad_output, grad_bias);
  });
  return {grad_input, grad_weight, grad_bias};
}

// ---- the ops: plan (validate, parse), then run through the convolution dispatch --------------

at::Tensor conv2d_direct_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, c10::string_view variant,
                                     int64_t max_col_bytes) {
  const Conv2dParams p = conv2d_params(kForwardOp, input, weight, bias, stride, padding, dilation,
                                       groups, /*allow_reduced=*/false);
  check_variant(kForwardOp, variant);
  check_max_col_bytes(kForwardOp, max_col_bytes);
  return conv_forward_cpu(p, input, weight, {ConvAlgo::kDirect, variant, max_col_bytes},
                          ConvEpilogue::bias(bias));
}

// `input` or `weight` may be a placeholder (csrc/common/autograd.h). max_col_bytes bounds the
// column buffers of the non-finite fallback (im2col), as it does for the im2col op.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_direct_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::string_view variant, int64_t max_col_bytes) {
  const Conv2dParams p = conv2d_params(kBackwardOp, input, weight, std::nullopt, stride, padding,
                                       dilation, groups, /*allow_reduced=*/false);
  check_variant(kBackwardOp, variant);
  check_max_col_bytes(kBackwardOp, max_col_bytes);
  check_conv_grad_output(kBackwardOp, p, grad_output, input);
  return conv_backward_cpu(p, grad_output, input, weight, output_mask,
                           {ConvAlgo::kDirect, variant, max_col_bytes});
}

}  // namespace cnnext

TORCH_LIBRARY_IMPL(cnnext, CPU, m) {
  m.impl("conv2d_direct", &cnnext::conv2d_direct_forward_cpu);
  m.impl("conv2d_direct_backward", &cnnext::conv2d_direct_backward_cpu);
}
