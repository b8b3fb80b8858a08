// Convolution as an implicit GEMM on CUDA cores: forward (fprop), grad_input (dgrad) and
// grad_weight (wgrad) are each one GEMM whose operands are gathered from the activations and the
// filter on the fly, never unfolded in memory (CUTLASS's "implicit GEMM", SIMT flavour).
//   fprop: out[m = (n, p, q)][co]   = sum_k x[m; k = (tap, ci)] * w[co][k]
//   dgrad: dx[m = (n, h, w)][ci]    = sum_k dy[m; k = (tap, co)] * w[co][tap][ci], one GEMM per
//          stride phase (h mod sh, w mod sw): only the taps that reach a phase are summed, so the
//          zeros of the stride-upsampled gradient are never multiplied
//   wgrad: dw[co][n = (tap, ci)]    = sum_k dy[k = (n, p, q)][co] * x[k; n], split over k
// Launch: a block computes a BM x BN output tile with BM/8 * BN/8 threads; a thread owns 8 x 8
// accumulators (two 4 x 4 quadrants, so its shared loads are 128-bit and conflict-free); a warp
// owns 32 x 64. K advances 8 at a time through two shared-memory stages: the next tile is loaded
// into registers while the current one is multiplied, one barrier per step. Index maps use
// precomputed fast division (no 64-bit division anywhere in the kernels). grid = (m tiles,
// groups * n tiles, split-K slices or dgrad phases); split-K partials are summed in a fixed
// order by a second kernel, so results are bitwise reproducible.
// int-ok-file: 32-bit GEMM indices and fast division by design; plan_* refuse (igemm_fits) any
// extent at or above 2^30 and the naive kernels take those
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_compat.cuh"
#include "common/params.h"
#include "conv2d_direct/kernels.cuh"

#ifdef __CUDACC__
#define CNNEXT_IGEMM_UNROLL _Pragma("unroll")
#else
#define CNNEXT_IGEMM_UNROLL
#endif

namespace cnnext {
// Anonymous: ASan gives redzones only to non-COMDAT static locals (the emulated __shared__).
namespace {

constexpr int kIgemmBK = 8;

// ---- index maps --------------------------------------------------------------------------------

// Division by a run-time constant as a multiply and a shift (Granlund-Montgomery, valid for
// 0 <= n < 2^31): the magic number is computed once on the host.
struct FastDivmod {
  int32_t divisor = 1;
  uint32_t mul = 0, shr = 0;

  FastDivmod() = default;
  explicit FastDivmod(int64_t d) : divisor(static_cast<int32_t>(d)) {
    if (divisor <= 1) return;
    uint32_t log2 = 0;
    while ((int64_t(1) << log2) < d) ++log2;  // ceil(log2(d))
    const uint32_t p = 31 + log2;
    mul = static_cast<uint32_t>(((uint64_t(1) << p) + static_cast<uint64_t>(d) - 1) /
                                static_cast<uint64_t>(d));
    shr = p - 32;
  }
  __device__ __forceinline__ int32_t div(int32_t n) const {
    return divisor > 1 ? static_cast<int32_t>(__umulhi(static_cast<uint32_t>(n), mul) >> shr) : n;
  }
  __device__ __forceinline__ void divmod(int32_t n, int32_t& q, int32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

// An element of an operand: its offset, and the (h, w) position it contributes to the validity
// test (0 <= h < h_lim, 0 <= w < w_lim, with h and w summed over the operand's two index maps).
struct Coord {
  int64_t ofs;
  int32_t h, w;
};
// Position of an index beyond its map's count: fails every validity test, even summed with
// another map's position.
constexpr int32_t kOutside = -(1 << 30);
__device__ __forceinline__ Coord outside() { return {0, kOutside, kOutside}; }

// index -> (n, i, j) of a grid of rows x cols pixels; position (org_h + i * st_h, org_w + j *
// st_w); offset n * sn + h * sh + w * sw.
struct PixelMap {
  FastDivmod div_cols, div_rows;
  int64_t sn = 0, sh = 0, sw = 0;
  int32_t st_h = 1, st_w = 1, org_h = 0, org_w = 0;
  int32_t count = 0;

  __device__ __forceinline__ Coord at(int32_t index) const {
    if (index >= count) return outside();
    int32_t rest, j, n, i;
    div_cols.divmod(index, rest, j);
    div_rows.divmod(rest, n, i);
    const int32_t h = org_h + i * st_h, w = org_w + j * st_w;
    return {n * sn + h * sh + w * sw, h, w};
  }
};

// index -> (tap, c) with c fastest (tap_major) or (c, tap); tap -> (tr, ts) by div_s; offset
// base + c * sc + tr * sr + ts * ss; position (tr * dh, ts * dw).
struct TapMap {
  FastDivmod div_c, div_taps, div_s;
  bool tap_major = true;
  int64_t base = 0, sc = 0, sr = 0, ss = 0;
  int32_t dh = 0, dw = 0;
  int32_t count = 0;

  __device__ __forceinline__ Coord at(int32_t index) const {
    if (index >= count) return outside();
    int32_t tap, c, tr, ts;
    if (tap_major) {
      div_c.divmod(index, tap, c);
    } else {
      div_taps.divmod(index, c, tap);
    }
    div_s.divmod(tap, tr, ts);
    return {base + c * sc + tr * sr + ts * ss, tr * dh, ts * dw};
  }
};

// index -> base + index * ld, position (0, 0).
struct LinearMap {
  int64_t base = 0, ld = 0;
  int32_t count = 0;

  __device__ __forceinline__ Coord at(int32_t index) const {
    if (index >= count) return outside();
    return {base + index * ld, 0, 0};
  }
};

// A GEMM operand [K x X] read from `ptr`: element (k, x) lies at k_map(k).ofs + x_map(x).ofs and
// is zero unless 0 <= hk + hx < h_lim and 0 <= wk + wx < w_lim (padding, tile overhang).
// `vec`: along the operand's contiguous direction, 4 consecutive indices starting at a multiple
// of 4 are 4 consecutive elements at a 16-byte aligned address with the same position.
template <typename scalar_t, class KMap, class XMap>
struct Operand {
  using scalar_type = scalar_t;
  const scalar_t* ptr = nullptr;
  KMap k;
  XMap x;
  int32_t h_lim = 2147483647, w_lim = 2147483647;
  bool vec = false;

  __device__ __forceinline__ bool valid(const Coord& kc, const Coord& xc) const {
    return static_cast<uint32_t>(kc.h + xc.h) < static_cast<uint32_t>(h_lim) &&
           static_cast<uint32_t>(kc.w + xc.w) < static_cast<uint32_t>(w_lim);
  }
};

// ---- tile configurations -----------------------------------------------------------------------

// WARPS_M x WARPS_N warps, each 32 x 64 outputs (lanes 4 x 8, 8 x 8 accumulators per lane).
template <int WARPS_M, int WARPS_N>
struct IgemmConfig {
  static constexpr int kWarpsM = WARPS_M, kWarpsN = WARPS_N;
  static constexpr int kBM = 32 * WARPS_M, kBN = 64 * WARPS_N;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  // Shared rows padded by 4 words: the transposing stores of a warp then hit 32 banks.
  static constexpr int kPitchA = kBM + 4, kPitchB = kBN + 4;
  static constexpr int kSmemWords = 2 * kIgemmBK * (kPitchA + kPitchB);  // two stages
};
using IgemmLarge = IgemmConfig<4, 2>;  // 128 x 128, 256 threads
using IgemmSmall = IgemmConfig<2, 1>;  // 64 x 64, 64 threads

// ---- vector helpers ----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void load4(const T* p, T (&v)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else {
    CNNEXT_IGEMM_UNROLL
    for (int i = 0; i < 4; ++i) v[i] = p[i];
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const T (&v)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    CNNEXT_IGEMM_UNROLL
    for (int i = 0; i < 4; ++i) p[i] = v[i];
  }
}

// ---- global -> registers -> shared tile loader -------------------------------------------------

// Loads the [kIgemmBK x X] tiles of one operand, in quads of 4 elements along the operand's
// contiguous direction: K4 (4 consecutive k of one x: NHWC channels, filter rows) or X4 (4
// consecutive x of one k: NCHW pixels, NHWC channels of wgrad). A thread's x indices are fixed
// for the whole K loop, so their maps are evaluated once; only the k maps move.
// CHECK_FINITE records whether a non-finite value was loaded (dgrad's exactness test).
template <typename scalar_t, int X, int THREADS, bool K4, bool CHECK_FINITE, class Op>
struct TileLoader {
  using acc_t = cuda_acc_t<scalar_t>;
  static constexpr int kQuads = X * kIgemmBK / 4 / THREADS;
  static constexpr int kXs = K4 ? kQuads : 4;
  static constexpr int kRowQuads = X / 4;  // X4: quads per k row
  static_assert(kQuads >= 1 && (K4 || THREADS % kRowQuads == 0), "tile does not fit the block");

  const Op& op;
  Coord xc[kXs];
  acc_t v[kQuads][4];
  int32_t lane_k, lane_x;  // K4: k offset (0 or 4), first x; X4: first k row, x offset
  bool nonfinite = false;

  __device__ __forceinline__ TileLoader(const Op& o, int32_t x0, int tid) : op(o) {
    if (K4) {
      lane_k = (tid % 2) * 4, lane_x = tid / 2;
      CNNEXT_IGEMM_UNROLL
      for (int q = 0; q < kQuads; ++q) xc[q] = op.x.at(x0 + lane_x + q * (THREADS / 2));
    } else {
      lane_k = tid / kRowQuads, lane_x = (tid % kRowQuads) * 4;
      CNNEXT_IGEMM_UNROLL
      for (int i = 0; i < 4; ++i) xc[i] = op.x.at(x0 + lane_x + i);
    }
  }

  __device__ __forceinline__ acc_t fetch(const Coord& kc, const Coord& xc_) const {
    return op.valid(kc, xc_) ? static_cast<acc_t>(op.ptr[kc.ofs + xc_.ofs]) : acc_t(0);
  }

  __device__ __forceinline__ void fetch4(const Coord& kc, const Coord& xc_, acc_t (&out)[4]) const {
    if (op.valid(kc, xc_)) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        load4(op.ptr + kc.ofs + xc_.ofs, out);
      } else {
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < 4; ++j) out[j] = static_cast<acc_t>(op.ptr[kc.ofs + xc_.ofs + j]);
      }
    } else {
      CNNEXT_IGEMM_UNROLL
      for (int j = 0; j < 4; ++j) out[j] = acc_t(0);
    }
  }

  __device__ __forceinline__ void load(int32_t k0) {
    CNNEXT_IGEMM_UNROLL
    for (int q = 0; q < kQuads; ++q) {
      if (K4) {
        const int32_t k = k0 + lane_k;
        if (op.vec) {
          fetch4(op.k.at(k), xc[q], v[q]);
        } else {
          CNNEXT_IGEMM_UNROLL
          for (int j = 0; j < 4; ++j) v[q][j] = fetch(op.k.at(k + j), xc[q]);
        }
      } else {
        const Coord kc = op.k.at(k0 + lane_k + q * (THREADS / kRowQuads));
        if (op.vec) {
          fetch4(kc, xc[0], v[q]);
        } else {
          CNNEXT_IGEMM_UNROLL
          for (int j = 0; j < 4; ++j) v[q][j] = fetch(kc, xc[j]);
        }
      }
      if (CHECK_FINITE) {
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < 4; ++j) nonfinite |= (v[q][j] - v[q][j]) != acc_t(0);
      }
    }
  }

  // Tile layout in shared memory: [kIgemmBK][X + 4], k-major.
  __device__ __forceinline__ void store(acc_t* s) const {
    constexpr int pitch = X + 4;
    CNNEXT_IGEMM_UNROLL
    for (int q = 0; q < kQuads; ++q) {
      if (K4) {
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < 4; ++j) s[(lane_k + j) * pitch + lane_x + q * (THREADS / 2)] = v[q][j];
      } else {
        store4(s + (lane_k + q * (THREADS / kRowQuads)) * pitch + lane_x, v[q]);
      }
    }
  }
};

// ---- the main loop -----------------------------------------------------------------------------

// Where a thread's accumulators sit in the block tile: rows am + {0..3, 16..19}, columns
// bn + {0..3, 32..35}.
template <class Cfg>
struct ThreadTile {
  int am, bn;
  __device__ __forceinline__ explicit ThreadTile(int tid) {
    const int warp = tid / 32, lane = tid % 32;
    am = (warp % Cfg::kWarpsM) * 32 + (lane / 8) * 4;
    bn = (warp / Cfg::kWarpsM) * 64 + (lane % 8) * 4;
  }
  static __device__ __forceinline__ int row(int i) { return i < 4 ? i : 12 + i; }
  static __device__ __forceinline__ int col(int j) { return j < 4 ? j : 28 + j; }
};

// acc += A[k0:k1] * B[k0:k1] through two shared stages. ROW_SUMS: threads tid < BM also sum
// their row of A over k (wgrad's grad_bias, read from the tile already in shared memory).
template <class Cfg, bool ROW_SUMS, typename acc_t, class LA, class LB>
__device__ __forceinline__ void igemm_mainloop(LA& la, LB& lb, int32_t k0, int32_t k1, acc_t* smem,
                                               const ThreadTile<Cfg>& tt, acc_t (&acc)[8][8],
                                               acc_t& row_sum, int tid) {
  constexpr int PA = Cfg::kPitchA, PB = Cfg::kPitchB, BK = kIgemmBK;
  acc_t* const sa = smem;
  acc_t* const sb = smem + 2 * BK * PA;
  if (k0 >= k1) return;  // uniform over the block
  la.load(k0);
  lb.load(k0);
  la.store(sa);
  lb.store(sb);
  __syncthreads();
  int stage = 0;
  for (int32_t k = k0; k < k1; k += BK) {
    const bool more = k + BK < k1;
    if (more) {  // the next tile travels while this one is multiplied
      la.load(k + BK);
      lb.load(k + BK);
    }
    const acc_t* ta = sa + stage * BK * PA;
    const acc_t* tb = sb + stage * BK * PB;
    CNNEXT_IGEMM_UNROLL
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[8], b[8];
      load4(ta + kk * PA + tt.am, reinterpret_cast<acc_t(&)[4]>(a[0]));
      load4(ta + kk * PA + tt.am + 16, reinterpret_cast<acc_t(&)[4]>(a[4]));
      load4(tb + kk * PB + tt.bn, reinterpret_cast<acc_t(&)[4]>(b[0]));
      load4(tb + kk * PB + tt.bn + 32, reinterpret_cast<acc_t(&)[4]>(b[4]));
      CNNEXT_IGEMM_UNROLL
      for (int i = 0; i < 8; ++i) {
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    if (ROW_SUMS && tid < Cfg::kBM) {
      CNNEXT_IGEMM_UNROLL
      for (int kk = 0; kk < BK; ++kk) row_sum += ta[kk * PA + tid];
    }
    if (more) {  // the other stage was last read before the previous barrier
      la.store(sa + (stage ^ 1) * BK * PA);
      lb.store(sb + (stage ^ 1) * BK * PB);
    }
    __syncthreads();
    stage ^= 1;
  }
}

// Writes the thread's accumulators to out[rows(m).ofs + cols(n).ofs] through the epilogue
// (channel: epi_base + n); m, n are block-relative offsets added to (m0, n0).
template <class Cfg, typename out_t, typename acc_t, class RowMap, class ColMap, class Epilogue>
__device__ __forceinline__ void igemm_store(out_t* out, const RowMap& rows, const ColMap& cols,
                                            int32_t m0, int32_t n0, const ThreadTile<Cfg>& tt,
                                            const acc_t (&acc)[8][8], const Epilogue& epilogue,
                                            int64_t epi_base) {
  Coord cc[8];
  CNNEXT_IGEMM_UNROLL
  for (int j = 0; j < 8; ++j) cc[j] = cols.at(n0 + tt.bn + ThreadTile<Cfg>::col(j));
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 8; ++i) {
    const Coord rc = rows.at(m0 + tt.am + ThreadTile<Cfg>::row(i));
    if (rc.h == kOutside) continue;
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 8; ++j) {
      if (cc[j].h == kOutside) continue;
      const int64_t channel = epi_base + n0 + tt.bn + ThreadTile<Cfg>::col(j);
      out[rc.ofs + cc[j].ofs] = static_cast<out_t>(epilogue(acc[i][j], channel));
    }
  }
}

__device__ __forceinline__ int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }

// Split-K slice z of K: [z * slice_len, min(K, (z + 1) * slice_len)), slice_len a multiple of BK.
struct SplitK {
  int32_t slices = 1, slice_len = 0;
};

// An epilogue that passes values through (dgrad, wgrad, split-K partials).
struct IdentityEpilogue {
  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t value, int64_t /*channel*/) const {
    return value;
  }
};

// ---- fprop -------------------------------------------------------------------------------------

template <typename scalar_t>
struct FpropArgs {
  using acc_t = cuda_acc_t<scalar_t>;
  Operand<scalar_t, TapMap, PixelMap> a;      // input: k = (tap, ci) or (ci, tap), x = (n, p, q)
  Operand<scalar_t, LinearMap, LinearMap> b;  // filter rows: k along a row, x = co
  PixelMap out_rows;                          // output pixels
  LinearMap out_cols;                         // output channels
  scalar_t* out = nullptr;
  acc_t* partial = nullptr;                  // split-K: [slices][M][groups * N]
  int32_t m = 0, n = 0, k = 0, n_tiles = 1;  // per group
  int64_t a_group = 0, b_group = 0;          // offsets of one group in the input and filter
  SplitK split;
};

template <typename scalar_t, class Cfg, bool NHWC, class Epilogue>
__global__ void __launch_bounds__(Cfg::kThreads)
    conv2d_implicit_gemm_fprop_kernel(const FpropArgs<scalar_t> args, Epilogue epilogue) {
  using acc_t = cuda_acc_t<scalar_t>;
  __align__(16) __shared__ acc_t smem[Cfg::kSmemWords];
  const int tid = threadIdx.x;
  const int32_t grp = blockIdx.y / args.n_tiles, nt = blockIdx.y % args.n_tiles;
  const int32_t m0 = blockIdx.x * Cfg::kBM, n0 = nt * Cfg::kBN;
  const int32_t k0 = blockIdx.z * args.split.slice_len;
  const int32_t k1 = args.split.slices > 1 ? imin(args.k, k0 + args.split.slice_len) : args.k;

  auto a = args.a;
  a.k.base += grp * args.a_group;
  auto b = args.b;
  b.x.base += grp * args.b_group;
  TileLoader<scalar_t, Cfg::kBM, Cfg::kThreads, NHWC, false, decltype(a)> la(a, m0, tid);
  TileLoader<scalar_t, Cfg::kBN, Cfg::kThreads, true, false, decltype(b)> lb(b, n0, tid);
  const ThreadTile<Cfg> tt(tid);
  acc_t acc[8][8];
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 8; ++i) {
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);
  }
  acc_t unused = 0;
  igemm_mainloop<Cfg, false>(la, lb, k0, k1, smem, tt, acc, unused, tid);

  if (args.split.slices > 1) {
    const int64_t width = static_cast<int64_t>(args.out_cols.count);  // groups * N
    const LinearMap rows{0, width, args.m};
    const LinearMap cols{static_cast<int64_t>(grp) * args.n, 1, args.n};
    igemm_store<Cfg>(args.partial + blockIdx.z * args.m * width, rows, cols, m0, n0, tt, acc,
                     IdentityEpilogue{}, 0);
  } else {
    LinearMap cols = args.out_cols;
    cols.base += grp * args.n * cols.ld;
    cols.count = args.n;
    igemm_store<Cfg>(args.out, args.out_rows, cols, m0, n0, tt, acc, epilogue,
                     static_cast<int64_t>(grp) * args.n);
  }
}

// ---- dgrad -------------------------------------------------------------------------------------

// One axis of a stride phase: output rows h = phase + stride * i (i < extent) take the taps
// r = t0 + step * t (t < taps) and read grad_output row i + off0 - dstep * t.
struct DgradAxis {
  FastDivmod extent, taps;  // by pixels and count (at least 1)
  int32_t pixels = 0, count = 0, t0 = 0, step = 1, off0 = 0, dstep = 0;
};
constexpr int kDgradMaxStride = 8;

template <typename scalar_t>
struct DgradArgs {
  using acc_t = cuda_acc_t<scalar_t>;
  const scalar_t* dy = nullptr;
  const scalar_t* w = nullptr;  // [C_out][R][S][C_in/g] strides below
  scalar_t* dx = nullptr;
  int64_t dy_sn = 0, dy_sc = 0, dy_sh = 0, dy_sw = 0;
  int64_t dx_sn = 0, dx_sc = 0, dx_sh = 0, dx_sw = 0;
  int64_t w_sk = 0, w_sc = 0, w_sr = 0, w_ss = 0;
  int32_t batch = 0, p = 0, q = 0;  // grad_output extent
  int32_t c_out = 0, c_in = 0;      // per group: the reduced and the output channels
  int32_t sh = 1, sw = 1, n_tiles = 1;
  FastDivmod div_c_out, div_sw;
  DgradAxis rows[kDgradMaxStride], cols[kDgradMaxStride];
  FastDivmod div_taps[kDgradMaxStride * kDgradMaxStride];  // per phase: row taps * column taps
  bool vec_a = false, vec_b = false;
};

// Stride phase z of a dgrad launch (blockIdx.z): its pixel count, its K (taps that reach it x
// C_out per group), and the maps of its operands and output. Shared by the CUDA-core and the
// tensor-core dgrad kernels.
template <typename scalar_t>
struct DgradPhase {
  int32_t ph = 0, pw = 0, z = 0, m = 0, taps_k = 0;
  bool taps_fastest = false;
  // Copies, not pointers into the kernel's parameters: taking a parameter's address makes nvcc
  // copy the parameter block to local memory.
  DgradAxis ra, ca;

  __device__ __forceinline__ DgradPhase(const DgradArgs<scalar_t>& args, int32_t phase,
                                        bool taps_fastest_)
      : z(phase), taps_fastest(taps_fastest_) {
    args.div_sw.divmod(phase, ph, pw);
    ra = args.rows[ph], ca = args.cols[pw];
    m = args.batch * ra.pixels * ca.pixels;
    taps_k = ra.count * ca.count * args.c_out;
  }

  // The phase's taps of one (co, tap) index: tap-major (c_out fastest) or taps fastest.
  __device__ __forceinline__ TapMap taps(const DgradArgs<scalar_t>& args, int64_t base, int64_t sc,
                                         int64_t sr, int64_t ss) const {
    TapMap t;
    t.div_c = args.div_c_out, t.div_s = ca.taps, t.div_taps = args.div_taps[z];
    t.tap_major = !taps_fastest;
    t.base = base, t.sc = sc, t.sr = sr, t.ss = ss, t.count = taps_k;
    return t;
  }

  // A: grad_output at row i + off0 - dstep * tr (and likewise for columns).
  __device__ __forceinline__ Operand<scalar_t, TapMap, PixelMap> a(const DgradArgs<scalar_t>& args,
                                                                   int32_t grp) const {
    Operand<scalar_t, TapMap, PixelMap> op;
    op.ptr = args.dy;
    op.x.div_cols = ca.extent, op.x.div_rows = ra.extent;
    op.x.sn = args.dy_sn, op.x.sh = args.dy_sh, op.x.sw = args.dy_sw;
    op.x.org_h = ra.off0, op.x.org_w = ca.off0, op.x.count = m;
    op.k = taps(args, static_cast<int64_t>(grp) * args.c_out * args.dy_sc, args.dy_sc,
                -static_cast<int64_t>(ra.dstep) * args.dy_sh,
                -static_cast<int64_t>(ca.dstep) * args.dy_sw);
    op.k.dh = -ra.dstep, op.k.dw = -ca.dstep;
    op.h_lim = args.p, op.w_lim = args.q, op.vec = args.vec_a;
    return op;
  }

  // B: filter rows (co, r, s) of the phase's taps; c_in contiguous when w_sc == 1.
  __device__ __forceinline__ Operand<scalar_t, TapMap, LinearMap> b(const DgradArgs<scalar_t>& args,
                                                                    int32_t grp) const {
    Operand<scalar_t, TapMap, LinearMap> op;
    op.ptr = args.w;
    op.k = taps(
        args,
        static_cast<int64_t>(grp) * args.c_out * args.w_sk + ra.t0 * args.w_sr + ca.t0 * args.w_ss,
        args.w_sk, ra.step * args.w_sr, ca.step * args.w_ss);
    op.x = LinearMap{0, args.w_sc, args.c_in};
    op.vec = args.vec_b;
    return op;
  }

  // grad_input pixels (ph + sh * i, pw + sw * j) and channels of group grp.
  __device__ __forceinline__ PixelMap rows(const DgradArgs<scalar_t>& args) const {
    PixelMap r;
    r.div_cols = ca.extent, r.div_rows = ra.extent;
    r.sn = args.dx_sn, r.sh = args.dx_sh, r.sw = args.dx_sw;
    r.st_h = args.sh, r.st_w = args.sw, r.org_h = ph, r.org_w = pw, r.count = m;
    return r;
  }
  __device__ __forceinline__ LinearMap cols(const DgradArgs<scalar_t>& args, int32_t grp) const {
    return LinearMap{static_cast<int64_t>(grp) * args.c_in * args.dx_sc, args.dx_sc, args.c_in};
  }
};

// Output (m, n) of a dgrad GEMM summed over real taps only. A block that loaded a non-finite
// filter value redoes its tile so: the zeros that stand for padding would otherwise turn
// 0 * Inf into NaN where torch's col2im, which skips padding, gives a finite value or Inf.
template <class A, class B>
__device__ __forceinline__ cuda_acc_t<typename A::scalar_type> dgrad_exact_sum(const A& a,
                                                                               const B& b,
                                                                               int32_t m, int32_t n,
                                                                               int32_t taps_k) {
  using acc_t = cuda_acc_t<typename A::scalar_type>;
  const Coord xa = a.x.at(m), xb = b.x.at(n);
  acc_t sum = 0;
  if (xa.h == kOutside || xb.h == kOutside) return sum;
  for (int32_t kk = 0; kk < taps_k; ++kk) {
    const Coord ka = a.k.at(kk);
    if (!a.valid(ka, xa)) continue;
    const Coord kb = b.k.at(kk);
    sum += static_cast<acc_t>(a.ptr[ka.ofs + xa.ofs]) * static_cast<acc_t>(b.ptr[kb.ofs + xb.ofs]);
  }
  return sum;
}

// K order: (tap, co) with co fastest (NHWC grad_output and a channels_last filter: both read
// along channels), or with TAPS_FASTEST (co, tap) (NCHW grad_output and a [C_out][C_in/g][R][S]
// filter, whose taps of one (co, ci) are contiguous: read in place, no filter copy).
template <typename scalar_t, class Cfg, bool NHWC, bool TAPS_FASTEST>
__global__ void __launch_bounds__(Cfg::kThreads)
    conv2d_implicit_gemm_dgrad_kernel(const DgradArgs<scalar_t> args) {
  using acc_t = cuda_acc_t<scalar_t>;
  __align__(16) __shared__ acc_t smem[Cfg::kSmemWords];
  __shared__ int nonfinite_warps[Cfg::kThreads / 32];
  const int tid = threadIdx.x;
  const DgradPhase<scalar_t> ph(args, blockIdx.z, TAPS_FASTEST);
  const int32_t m0 = blockIdx.x * Cfg::kBM;
  if (m0 >= ph.m) return;  // this phase has fewer pixels than the largest one
  const int32_t grp = blockIdx.y / args.n_tiles, nt = blockIdx.y % args.n_tiles;
  const int32_t n0 = nt * Cfg::kBN;
  const auto a = ph.a(args, grp);
  const auto b = ph.b(args, grp);
  TileLoader<scalar_t, Cfg::kBM, Cfg::kThreads, NHWC, false, decltype(a)> la(a, m0, tid);
  TileLoader<scalar_t, Cfg::kBN, Cfg::kThreads, TAPS_FASTEST, true, decltype(b)> lb(b, n0, tid);
  const ThreadTile<Cfg> tt(tid);
  acc_t acc[8][8];
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 8; ++i) {
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);
  }
  acc_t unused = 0;
  igemm_mainloop<Cfg, false>(la, lb, 0, ph.taps_k, smem, tt, acc, unused, tid);
  // Block-wide "any non-finite filter value": a warp vote, then one flag per warp (no atomics).
  const unsigned vote = __ballot_sync(0xffffffffu, lb.nonfinite);
  if (tid % 32 == 0) nonfinite_warps[tid / 32] = vote != 0;
  __syncthreads();
  bool nonfinite = false;
  for (int w = 0; w < Cfg::kThreads / 32; ++w) nonfinite |= nonfinite_warps[w] != 0;
  if (nonfinite) {
    CNNEXT_IGEMM_UNROLL
    for (int i = 0; i < 8; ++i) {
      CNNEXT_IGEMM_UNROLL
      for (int j = 0; j < 8; ++j) {
        acc[i][j] = dgrad_exact_sum(a, b, m0 + tt.am + ThreadTile<Cfg>::row(i),
                                    n0 + tt.bn + ThreadTile<Cfg>::col(j), ph.taps_k);
      }
    }
  }
  const PixelMap rows = ph.rows(args);
  const LinearMap cols = ph.cols(args, grp);
  igemm_store<Cfg>(args.dx, rows, cols, m0, n0, tt, acc, IdentityEpilogue{}, 0);
}

// ---- wgrad -------------------------------------------------------------------------------------

template <typename scalar_t>
struct WgradArgs {
  using acc_t = cuda_acc_t<scalar_t>;
  Operand<scalar_t, PixelMap, LinearMap> a;  // grad_output: k = (n, p, q), x = co
  Operand<scalar_t, PixelMap, TapMap> b;     // input: k = (n, p, q), x = (tap, ci) or (ci, tap)
  TapMap out_cols;                           // grad_weight columns (its own strides)
  int64_t out_ld = 0;                        // grad_weight row stride (per c_out)
  scalar_t* dw = nullptr;
  scalar_t* db = nullptr;                    // grad_bias, or nullptr
  acc_t* partial = nullptr;                  // split-K: [slices][groups * M][N]
  acc_t* partial_bias = nullptr;             // split-K with grad_bias: [slices][groups * M]
  int32_t m = 0, n = 0, k = 0, n_tiles = 1;  // per group
  int64_t a_group = 0, b_group = 0;
  SplitK split;
};

template <typename scalar_t, class Cfg, bool NHWC>
__global__ void __launch_bounds__(Cfg::kThreads)
    conv2d_implicit_gemm_wgrad_kernel(const WgradArgs<scalar_t> args) {
  using acc_t = cuda_acc_t<scalar_t>;
  __align__(16) __shared__ acc_t smem[Cfg::kSmemWords];
  const int tid = threadIdx.x;
  const int32_t grp = blockIdx.y / args.n_tiles, nt = blockIdx.y % args.n_tiles;
  const int32_t m0 = blockIdx.x * Cfg::kBM, n0 = nt * Cfg::kBN;
  const int32_t k0 = blockIdx.z * args.split.slice_len;
  const int32_t k1 = args.split.slices > 1 ? imin(args.k, k0 + args.split.slice_len) : args.k;

  auto a = args.a;
  a.x.base += grp * args.a_group;
  auto b = args.b;
  b.x.base += grp * args.b_group;
  // NHWC: channels are contiguous (X4); NCHW: pixels are (K4).
  TileLoader<scalar_t, Cfg::kBM, Cfg::kThreads, !NHWC, false, decltype(a)> la(a, m0, tid);
  TileLoader<scalar_t, Cfg::kBN, Cfg::kThreads, !NHWC, false, decltype(b)> lb(b, n0, tid);
  const ThreadTile<Cfg> tt(tid);
  acc_t acc[8][8];
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 8; ++i) {
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);
  }
  acc_t row_sum = 0;
  const bool bias_block = args.db != nullptr && nt == 0;
  if (bias_block) {
    igemm_mainloop<Cfg, true>(la, lb, k0, k1, smem, tt, acc, row_sum, tid);
  } else {
    igemm_mainloop<Cfg, false>(la, lb, k0, k1, smem, tt, acc, row_sum, tid);
  }

  const int32_t co = grp * args.m + m0 + tid;  // the bias row of threads tid < BM
  if (args.split.slices > 1) {
    const LinearMap rows{static_cast<int64_t>(grp) * args.m * args.n, args.n, args.m};
    const LinearMap cols{0, 1, args.n};
    const int64_t slice_words = static_cast<int64_t>(gridDim.y / args.n_tiles) * args.m * args.n;
    igemm_store<Cfg>(args.partial + blockIdx.z * slice_words, rows, cols, m0, n0, tt, acc,
                     IdentityEpilogue{}, 0);
    if (bias_block && tid < Cfg::kBM && m0 + tid < args.m) {
      args.partial_bias[static_cast<int64_t>(blockIdx.z) * (gridDim.y / args.n_tiles) * args.m +
                        co] = row_sum;
    }
  } else {
    const LinearMap rows{static_cast<int64_t>(grp) * args.m * args.out_ld, args.out_ld, args.m};
    igemm_store<Cfg>(args.dw, rows, args.out_cols, m0, n0, tt, acc, IdentityEpilogue{}, 0);
    if (bias_block && tid < Cfg::kBM && m0 + tid < args.m) {
      args.db[co] = static_cast<scalar_t>(row_sum);
    }
  }
}

// ---- split-K reduction -------------------------------------------------------------------------

// out[rows(e / width) + cols(e % width)] = epilogue(sum over slices of partial[s][e], e % width),
// slices added in order; threads past the matrix reduce the bias partials the same way.
template <typename scalar_t, class RowMap, class ColMap, class Epilogue>
__global__ void conv2d_splitk_reduce_kernel(const cuda_acc_t<scalar_t>* __restrict__ partial,
                                            int32_t slices, int32_t height, FastDivmod width,
                                            RowMap rows, ColMap cols, scalar_t* __restrict__ out,
                                            const cuda_acc_t<scalar_t>* __restrict__ partial_bias,
                                            scalar_t* __restrict__ bias_out, int32_t bias_count,
                                            Epilogue epilogue) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t numel = static_cast<int64_t>(height) * width.divisor;
  if (e < numel) {
    acc_t sum = 0;
    for (int32_t s = 0; s < slices; ++s) sum += partial[s * numel + e];
    int32_t m, n;
    width.divmod(static_cast<int32_t>(e), m, n);
    out[rows.at(m).ofs + cols.at(n).ofs] = static_cast<scalar_t>(epilogue(sum, n));
  } else if (e - numel < bias_count) {
    const int64_t c = e - numel;
    acc_t sum = 0;
    for (int32_t s = 0; s < slices; ++s) sum += partial_bias[s * bias_count + c];
    bias_out[c] = static_cast<scalar_t>(sum);
  }
}

// ---- filter layout -----------------------------------------------------------------------------

// [C_out][C_in/g][R][S] -> [C_out][R][S][C_in/g] (the channels_last filter the GEMMs read along
// channels), one thread per element.
template <typename scalar_t>
__global__ void conv2d_filter_to_krsc_kernel(const scalar_t* __restrict__ w,
                                             scalar_t* __restrict__ out, int64_t numel,
                                             FastDivmod div_c, FastDivmod div_taps) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= numel) return;
  // e indexes the output: ((co * taps) + tap) * C + c.
  int32_t rest, c, co, tap;
  div_c.divmod(static_cast<int32_t>(e), rest, c);
  div_taps.divmod(rest, co, tap);
  out[e] = w[(static_cast<int64_t>(co) * div_c.divisor + c) * div_taps.divisor + tap];
}

}  // namespace
}  // namespace cnnext

// ---- host side ---------------------------------------------------------------------------------
// Each pass is planned (index maps, tile, split, workspace bytes) and then run, so that the
// backward allocates one workspace for both of its GEMMs.
namespace cnnext {
namespace {

enum class IgemmTile { kAuto, kLarge, kSmall };

inline IgemmTile tile_of(DirectVariant v) {
  return v == DirectVariant::kLargeTile   ? IgemmTile::kLarge
         : v == DirectVariant::kSmallTile ? IgemmTile::kSmall
                                          : IgemmTile::kAuto;
}

// "auto" leaves depthwise-like layers (fewer than 8 output channels per group) to the naive
// kernel: a GEMM tile would be almost all padding there.
inline bool use_implicit_gemm(DirectVariant v, const Conv2dParams& p) {
  if (v == DirectVariant::kNaive) return false;
  return v != DirectVariant::kAuto || p.groups == 1 || p.c_out_per_group() >= 8;
}

// The filter as the GEMMs read it: dense, in its own layout when that is channels_last.
inline at::Tensor dense_filter(const at::Tensor& w) {
  return w.dim() == 4 && w.is_contiguous(at::MemoryFormat::ChannelsLast) ? w : w.contiguous();
}

inline int64_t igemm_sm_count() {
#ifdef CNNEXT_CUDA_EMULATION
  return 132;  // an H100's: the emulator runs the grids the GPU would get
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr int64_t kInt32Max = 2147483647;
// Split-K keeps at least this much of K per slice, and partial sums below this many words.
constexpr int64_t kMinSliceK = 64, kMaxSlices = 256, kMaxPartialWords = int64_t(1) << 26;

struct IgemmShape {
  bool large = true;
  int64_t m_tiles = 0, n_tiles = 0;
  SplitK split;
};

// Whether a dtype has the small tile: float only. With 64 threads the wider accumulators of
// double and the conversions of half/bfloat16 made ptxas spill; they take the large tile.
template <typename scalar_t>
constexpr bool kHasSmallTile = std::is_same_v<scalar_t, float>;

// Large tiles when they alone fill the GPU, else small ones; then split K over slices until
// about two waves of blocks exist (when allowed and K is long enough).
inline IgemmShape plan_igemm_shape(int64_t m, int64_t n, int64_t k, int64_t groups, IgemmTile tile,
                                   bool allow_split, int64_t words_per_slice, bool has_small) {
  const int64_t sms = igemm_sm_count();
  auto tiles = [&](int64_t bm, int64_t bn) { return (m + bm - 1) / bm * ((n + bn - 1) / bn); };
  IgemmShape s;
  s.large = !has_small || tile == IgemmTile::kLarge ||
            (tile == IgemmTile::kAuto && tiles(IgemmLarge::kBM, IgemmLarge::kBN) * groups >= sms);
  const int64_t bm = s.large ? IgemmLarge::kBM : IgemmSmall::kBM;
  const int64_t bn = s.large ? IgemmLarge::kBN : IgemmSmall::kBN;
  s.m_tiles = (m + bm - 1) / bm, s.n_tiles = (n + bn - 1) / bn;
  const int64_t blocks = s.m_tiles * s.n_tiles * groups;
  int64_t slices = 1;
  if (allow_split && blocks < sms) {
    slices = std::min({(2 * sms + blocks - 1) / blocks, k / kMinSliceK, kMaxSlices,
                       kMaxPartialWords / std::max<int64_t>(words_per_slice, 1)});
  }
  if (slices > 1) {
    const int64_t len = round_up((k + slices - 1) / slices, kIgemmBK);
    s.split.slice_len = static_cast<int32_t>(len);
    s.split.slices = static_cast<int32_t>((k + len - 1) / len);
  }
  if (s.split.slices <= 1) s.split = SplitK{1, static_cast<int32_t>(round_up(k, kIgemmBK))};
  return s;
}

// One byte buffer carved into 16-byte aligned pieces: the one workspace of a call.
class Workspace {
 public:
  int64_t reserve(int64_t bytes) {
    const int64_t at = bytes_;
    bytes_ += round_up(bytes, 16);
    return at;
  }
  void allocate(const at::Tensor& like) {
    if (bytes_ > 0) buffer_ = at::empty({bytes_}, like.options().dtype(at::kByte));
  }
  template <typename T>
  T* at(int64_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(buffer_.data_ptr()) + offset);
  }

 private:
  int64_t bytes_ = 0;
  at::Tensor buffer_;
};

// Whether a [C_out][C_in/g][R][S] filter must be copied to [C_out][R][S][C_in/g] for a GEMM that
// reads it along channels (one small launch; a channels_last filter is read in place).
inline bool filter_needs_krsc(const at::Tensor& w) {
  return w.size(1) > 1 && w.size(2) * w.size(3) > 1 && w.stride(1) != 1;
}

template <typename scalar_t>
void launch_filter_to_krsc(const at::Tensor& w, scalar_t* out) {
  const int64_t numel = w.numel();
  const at::Tensor wc = w.contiguous();
  CNNEXT_LAUNCH((conv2d_filter_to_krsc_kernel<scalar_t>), dim3(ceil_div(numel, 256)), dim3(256), 0,
                current_stream(), wc.const_data_ptr<scalar_t>(), out, numel, FastDivmod(w.size(1)),
                FastDivmod(w.size(2) * w.size(3)));
}

// Geometry too large for 32-bit GEMM indices (or a grid): the caller runs the naive kernels.
inline bool igemm_fits(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (s > kInt32Max / 2) return false;
  }
  return true;
}

// ---- fprop ----

template <typename scalar_t>
struct FpropPlan {
  FpropArgs<scalar_t> args;
  IgemmShape shape;
  bool nhwc = false, transform = false;
  int64_t filter_at = -1, partial_at = -1;
};

// x and out dense (NCHW or channels_last), weight dense in either layout.
template <typename scalar_t>
bool plan_fprop(const Conv2dParams& p, const at::Tensor& x, const at::Tensor& w,
                const at::Tensor& out, IgemmTile tile, bool allow_split, Workspace* ws,
                FpropPlan<scalar_t>* plan) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t cg = p.c_in_per_group(), cog = p.c_out_per_group(), taps = p.kh * p.kw;
  const int64_t m = p.n * p.h_out * p.w_out, k = cg * taps;
  if (!igemm_fits({m, k, p.c_out * k, m * p.c_out, x.numel(), out.numel()})) return false;
  const Strides4 xs = strides4(x), os = strides4(out);
  plan->nhwc = is_channels_last(x);
  const bool kcrs = taps == 1 || w.is_contiguous();
  const bool tap_major = plan->nhwc || !kcrs;
  plan->transform = tap_major && filter_needs_krsc(w);
  const bool is_float = std::is_same_v<scalar_t, float>;
  plan->shape = plan_igemm_shape(m, cog, k, p.groups, tile, allow_split && !plan->transform,
                                 m * p.c_out, kHasSmallTile<scalar_t>);
  if (plan->shape.n_tiles * p.groups > 65535) return false;

  FpropArgs<scalar_t>& a = plan->args;
  a.a.ptr = x.const_data_ptr<scalar_t>();
  a.a.x.div_cols = FastDivmod(p.w_out), a.a.x.div_rows = FastDivmod(p.h_out);
  a.a.x.sn = xs.n, a.a.x.sh = xs.h, a.a.x.sw = xs.w;
  a.a.x.st_h = static_cast<int32_t>(p.sh), a.a.x.st_w = static_cast<int32_t>(p.sw);
  a.a.x.org_h = static_cast<int32_t>(-p.ph), a.a.x.org_w = static_cast<int32_t>(-p.pw);
  a.a.x.count = static_cast<int32_t>(m);
  a.a.k.div_c = FastDivmod(cg), a.a.k.div_taps = FastDivmod(taps), a.a.k.div_s = FastDivmod(p.kw);
  a.a.k.tap_major = tap_major;
  a.a.k.sc = xs.c, a.a.k.sr = p.dh * xs.h, a.a.k.ss = p.dw * xs.w;
  a.a.k.dh = static_cast<int32_t>(p.dh), a.a.k.dw = static_cast<int32_t>(p.dw);
  a.a.k.count = static_cast<int32_t>(k);
  a.a.h_lim = static_cast<int32_t>(p.h), a.a.w_lim = static_cast<int32_t>(p.w);
  a.a.vec = is_float && plan->nhwc && cg % 4 == 0 && xs.c == 1 && xs.w % 4 == 0 && xs.h % 4 == 0 &&
            xs.n % 4 == 0 && aligned16(a.a.ptr);
  a.a_group = cg * xs.c;
  a.b.ptr = w.const_data_ptr<scalar_t>();  // replaced by the KRSC copy when transformed
  a.b.k = LinearMap{0, 1, static_cast<int32_t>(k)};
  a.b.x = LinearMap{0, k, static_cast<int32_t>(cog)};
  a.b.vec = is_float && k % 4 == 0 && (plan->transform || aligned16(a.b.ptr));
  a.b_group = cog * k;
  a.out_rows.div_cols = FastDivmod(p.w_out), a.out_rows.div_rows = FastDivmod(p.h_out);
  a.out_rows.sn = os.n, a.out_rows.sh = os.h, a.out_rows.sw = os.w;
  a.out_rows.count = static_cast<int32_t>(m);
  a.out_cols = LinearMap{0, os.c, static_cast<int32_t>(p.c_out)};
  a.out = out.mutable_data_ptr<scalar_t>();
  a.m = static_cast<int32_t>(m), a.n = static_cast<int32_t>(cog), a.k = static_cast<int32_t>(k);
  a.n_tiles = static_cast<int32_t>(plan->shape.n_tiles);
  a.split = plan->shape.split;
  if (plan->transform) plan->filter_at = ws->reserve(w.numel() * sizeof(scalar_t));
  if (a.split.slices > 1) {
    plan->partial_at = ws->reserve(a.split.slices * m * p.c_out * sizeof(acc_t));
  }
  return true;
}

template <typename scalar_t, class Epilogue>
void run_fprop(FpropPlan<scalar_t>& plan, const at::Tensor& w, const Workspace& ws,
               const Epilogue& epilogue) {
  using acc_t = cuda_acc_t<scalar_t>;
  FpropArgs<scalar_t>& a = plan.args;
  const cudaStream_t stream = current_stream();
  if (plan.transform) {
    scalar_t* filter = ws.at<scalar_t>(plan.filter_at);
    launch_filter_to_krsc<scalar_t>(w, filter);
    a.b.ptr = filter;
  }
  if (a.split.slices > 1) a.partial = ws.at<acc_t>(plan.partial_at);
  const dim3 grid(static_cast<unsigned>(plan.shape.m_tiles),
                  static_cast<unsigned>(plan.shape.n_tiles * (a.out_cols.count / a.n)),
                  static_cast<unsigned>(a.split.slices));
  auto launch = [&](auto cfg, auto nhwc) {
    using Cfg = decltype(cfg);
    constexpr bool NHWC = decltype(nhwc)::value;
    CNNEXT_LAUNCH((conv2d_implicit_gemm_fprop_kernel<scalar_t, Cfg, NHWC, Epilogue>), grid,
                  dim3(Cfg::kThreads), 0, stream, a, epilogue);
  };
  using T = std::true_type;
  using F = std::false_type;
  bool ran_small = false;
  if constexpr (kHasSmallTile<scalar_t>) {
    if (!plan.shape.large) {
      plan.nhwc ? launch(IgemmSmall{}, T{}) : launch(IgemmSmall{}, F{});
      ran_small = true;
    }
  }
  if (!ran_small) plan.nhwc ? launch(IgemmLarge{}, T{}) : launch(IgemmLarge{}, F{});
  if (a.split.slices > 1) {
    const int64_t numel = static_cast<int64_t>(a.m) * a.out_cols.count;
    CNNEXT_LAUNCH((conv2d_splitk_reduce_kernel<scalar_t, PixelMap, LinearMap, Epilogue>),
                  dim3(ceil_div(numel, 256)), dim3(256), 0, stream, a.partial, a.split.slices, a.m,
                  FastDivmod(a.out_cols.count), a.out_rows, a.out_cols, a.out,
                  static_cast<const acc_t*>(nullptr), static_cast<scalar_t*>(nullptr), 0, epilogue);
  }
}

// out = epilogue(conv(x, w)); returns false when the geometry needs the naive kernel.
// allow_split: split-K (its reduction is a second launch) may be used.
template <typename scalar_t, class Epilogue>
bool conv2d_implicit_gemm_forward(const Conv2dParams& p, const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& out, const Epilogue& epilogue, IgemmTile tile,
                                  bool allow_split = true) {
  Workspace ws;
  FpropPlan<scalar_t> plan;
  if (!plan_fprop<scalar_t>(p, x, w, out, tile, allow_split, &ws, &plan)) return false;
  ws.allocate(x);
  run_fprop<scalar_t>(plan, w, ws, epilogue);
  return true;
}

// ---- dgrad ----

// The stride phases of one axis (see DgradAxis): extent `in`, filter `taps`, padding, dilation.
inline bool dgrad_axes(int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dil,
                       DgradAxis* axes) {
  if (stride > kDgradMaxStride) return false;
  const int64_t g = std::gcd(stride, dil), step = stride / g;
  for (int64_t ph = 0; ph < stride; ++ph) {
    DgradAxis& a = axes[ph];
    const int64_t extent = ph < in ? (in - ph + stride - 1) / stride : 0;
    int64_t t0 = -1;
    for (int64_t r = 0; r < std::min(taps, step); ++r) {
      if (((ph + pad - r * dil) % stride + stride) % stride == 0) {
        t0 = r;
        break;
      }
    }
    const int64_t count = t0 >= 0 ? (taps - 1 - t0) / step + 1 : 0;
    a.extent = FastDivmod(std::max<int64_t>(extent, 1));
    a.taps = FastDivmod(std::max<int64_t>(count, 1));
    a.pixels = static_cast<int32_t>(extent);
    a.count = static_cast<int32_t>(count);
    a.t0 = static_cast<int32_t>(std::max<int64_t>(t0, 0));
    a.step = static_cast<int32_t>(step);
    a.off0 = t0 >= 0 ? static_cast<int32_t>((ph + pad - t0 * dil) / stride) : 0;
    a.dstep = static_cast<int32_t>(step * dil / stride);
  }
  return true;
}

template <typename scalar_t>
struct DgradPlan {
  DgradArgs<scalar_t> args;
  IgemmShape shape;
  bool nhwc = false, transform = false, taps_fastest = false;
  int64_t filter_at = -1;
  int64_t phases = 1;
};

template <typename scalar_t>
constexpr bool kTapsFastest = !std::is_same_v<scalar_t, double>;

template <typename scalar_t>
bool plan_dgrad(const Conv2dParams& p, const at::Tensor& dy, const at::Tensor& w,
                const at::Tensor& dx, IgemmTile tile, Workspace* ws, DgradPlan<scalar_t>* plan) {
  const int64_t cg = p.c_in_per_group(), cog = p.c_out_per_group(), taps = p.kh * p.kw;
  const int64_t m = p.n * p.h * p.w;
  if (!igemm_fits({m, cog * taps, dy.numel(), dx.numel(), w.numel()})) return false;
  DgradArgs<scalar_t>& a = plan->args;
  if (!dgrad_axes(p.h, p.kh, p.sh, p.ph, p.dh, a.rows) ||
      !dgrad_axes(p.w, p.kw, p.sw, p.pw, p.dw, a.cols)) {
    return false;
  }
  plan->nhwc = is_channels_last(dy);
  // Not for double: ptxas gave that instantiation a stack frame on sm_80 (double is for
  // gradcheck; it copies the filter instead).
  plan->taps_fastest = kTapsFastest<scalar_t> && !plan->nhwc && w.is_contiguous();
  plan->transform = !plan->taps_fastest && filter_needs_krsc(w);
  plan->phases = p.sh * p.sw;
  for (int64_t ph = 0; ph < p.sh; ++ph) {
    for (int64_t pw = 0; pw < p.sw; ++pw) {
      a.div_taps[ph * p.sw + pw] = FastDivmod(std::max(a.rows[ph].count * a.cols[pw].count, 1));
    }
  }
  const Strides4 ys = strides4(dy), xs = strides4(dx);
  // Phase extents differ by at most one row/column: plan the grid for the largest.
  const int64_t m_max = p.n * ((p.h + p.sh - 1) / p.sh) * ((p.w + p.sw - 1) / p.sw);
  plan->shape = plan_igemm_shape(m_max * plan->phases, cg, cog * taps, p.groups, tile, false, 0,
                                 kHasSmallTile<scalar_t>);
  const int64_t bm = plan->shape.large ? IgemmLarge::kBM : IgemmSmall::kBM;
  plan->shape.m_tiles = (m_max + bm - 1) / bm;
  if (plan->shape.n_tiles * p.groups > 65535) return false;
  const bool is_float = std::is_same_v<scalar_t, float>;
  a.dy = dy.const_data_ptr<scalar_t>();
  a.w = w.const_data_ptr<scalar_t>();
  a.dx = dx.mutable_data_ptr<scalar_t>();
  a.dy_sn = ys.n, a.dy_sc = ys.c, a.dy_sh = ys.h, a.dy_sw = ys.w;
  a.dx_sn = xs.n, a.dx_sc = xs.c, a.dx_sh = xs.h, a.dx_sw = xs.w;
  if (plan->transform) {  // the KRSC copy's strides
    a.w_sk = taps * cg, a.w_sc = 1, a.w_sr = p.kw * cg, a.w_ss = cg;
    plan->filter_at = ws->reserve(w.numel() * sizeof(scalar_t));
  } else {
    a.w_sk = w.stride(0), a.w_sc = w.stride(1), a.w_sr = w.stride(2), a.w_ss = w.stride(3);
  }
  a.batch = static_cast<int32_t>(p.n);
  a.p = static_cast<int32_t>(p.h_out), a.q = static_cast<int32_t>(p.w_out);
  a.c_out = static_cast<int32_t>(cog), a.c_in = static_cast<int32_t>(cg);
  a.sh = static_cast<int32_t>(p.sh), a.sw = static_cast<int32_t>(p.sw);
  a.n_tiles = static_cast<int32_t>(plan->shape.n_tiles);
  a.div_c_out = FastDivmod(cog), a.div_sw = FastDivmod(p.sw);
  a.vec_a = is_float && plan->nhwc && cog % 4 == 0 && ys.c == 1 && ys.w % 4 == 0 && ys.h % 4 == 0 &&
            ys.n % 4 == 0 && aligned16(a.dy);
  a.vec_b = is_float && !plan->taps_fastest && cg % 4 == 0 && a.w_sc == 1 && a.w_sk % 4 == 0 &&
            a.w_sr % 4 == 0 && a.w_ss % 4 == 0 && (plan->transform || aligned16(a.w));
  return true;
}

template <typename scalar_t>
void run_dgrad(DgradPlan<scalar_t>& plan, const at::Tensor& w, const Workspace& ws) {
  DgradArgs<scalar_t>& a = plan.args;
  if (plan.transform) {
    scalar_t* filter = ws.at<scalar_t>(plan.filter_at);
    launch_filter_to_krsc<scalar_t>(w, filter);
    a.w = filter;
  }
  const dim3 grid(static_cast<unsigned>(plan.shape.m_tiles),
                  static_cast<unsigned>(plan.shape.n_tiles * (w.size(0) / a.c_out)),
                  static_cast<unsigned>(plan.phases));
  auto launch_order = [&](auto cfg, auto nhwc, auto taps_fastest) {
    using Cfg = decltype(cfg);
    constexpr bool NHWC = decltype(nhwc)::value, TF = decltype(taps_fastest)::value;
    CNNEXT_LAUNCH((conv2d_implicit_gemm_dgrad_kernel<scalar_t, Cfg, NHWC, TF>), grid,
                  dim3(Cfg::kThreads), 0, current_stream(), a);
  };
  using T = std::true_type;
  using F = std::false_type;
  // NHWC grad_output is read along channels (tap-major); NCHW along pixels, in either order.
  auto launch = [&](auto cfg) {
    if (plan.nhwc) {
      launch_order(cfg, T{}, F{});
    } else if (plan.taps_fastest) {
      if constexpr (kTapsFastest<scalar_t>) launch_order(cfg, F{}, T{});
    } else {
      launch_order(cfg, F{}, F{});
    }
  };
  bool ran_small = false;
  if constexpr (kHasSmallTile<scalar_t>) {
    if (!plan.shape.large) {
      launch(IgemmSmall{});
      ran_small = true;
    }
  }
  if (!ran_small) launch(IgemmLarge{});
}

// ---- wgrad ----

template <typename scalar_t>
struct WgradPlan {
  WgradArgs<scalar_t> args;
  IgemmShape shape;
  bool nhwc = false;
  int64_t groups = 1;
  int64_t partial_at = -1, partial_bias_at = -1;
};

// dw: contiguous [C_out][C_in/g][R][S]; db: [C_out] or undefined.
template <typename scalar_t>
bool plan_wgrad(const Conv2dParams& p, const at::Tensor& dy, const at::Tensor& x,
                const at::Tensor& dw, const at::Tensor& db, IgemmTile tile, Workspace* ws,
                WgradPlan<scalar_t>* plan) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t cg = p.c_in_per_group(), cog = p.c_out_per_group(), taps = p.kh * p.kw;
  const int64_t kpos = p.n * p.h_out * p.w_out, nw = cg * taps;
  if (!igemm_fits({kpos, nw, dy.numel(), x.numel(), dw.numel()})) return false;
  plan->nhwc = is_channels_last(dy) && is_channels_last(x);
  plan->groups = p.groups;
  plan->shape = plan_igemm_shape(cog, nw, kpos, p.groups, tile, true, p.c_out * nw + p.c_out,
                                 kHasSmallTile<scalar_t>);
  if (plan->shape.n_tiles * p.groups > 65535) return false;
  const Strides4 ys = strides4(dy), xs = strides4(x);
  const bool is_float = std::is_same_v<scalar_t, float>;
  const bool tap_major = plan->nhwc;
  WgradArgs<scalar_t>& a = plan->args;
  // A: grad_output, k = output pixel, x = channel.
  a.a.ptr = dy.const_data_ptr<scalar_t>();
  a.a.k.div_cols = FastDivmod(p.w_out), a.a.k.div_rows = FastDivmod(p.h_out);
  a.a.k.sn = ys.n, a.a.k.sh = ys.h, a.a.k.sw = ys.w, a.a.k.count = static_cast<int32_t>(kpos);
  a.a.x = LinearMap{0, ys.c, static_cast<int32_t>(cog)};
  a.a.vec = is_float && plan->nhwc && cog % 4 == 0 && ys.c == 1 && ys.w % 4 == 0 && ys.h % 4 == 0 &&
            ys.n % 4 == 0 && aligned16(a.a.ptr);
  a.a_group = cog * ys.c;
  // B: input at the output pixel's receptive field, x = (tap, ci) or (ci, tap).
  a.b.ptr = x.const_data_ptr<scalar_t>();
  a.b.k.div_cols = FastDivmod(p.w_out), a.b.k.div_rows = FastDivmod(p.h_out);
  a.b.k.sn = xs.n, a.b.k.sh = xs.h, a.b.k.sw = xs.w;
  a.b.k.st_h = static_cast<int32_t>(p.sh), a.b.k.st_w = static_cast<int32_t>(p.sw);
  a.b.k.org_h = static_cast<int32_t>(-p.ph), a.b.k.org_w = static_cast<int32_t>(-p.pw);
  a.b.k.count = static_cast<int32_t>(kpos);
  TapMap taps_in;
  taps_in.div_c = FastDivmod(cg), taps_in.div_taps = FastDivmod(taps);
  taps_in.div_s = FastDivmod(p.kw), taps_in.tap_major = tap_major;
  taps_in.sc = xs.c, taps_in.sr = p.dh * xs.h, taps_in.ss = p.dw * xs.w;
  taps_in.dh = static_cast<int32_t>(p.dh), taps_in.dw = static_cast<int32_t>(p.dw);
  taps_in.count = static_cast<int32_t>(nw);
  a.b.x = taps_in;
  a.b.h_lim = static_cast<int32_t>(p.h), a.b.w_lim = static_cast<int32_t>(p.w);
  a.b.vec = is_float && plan->nhwc && cg % 4 == 0 && xs.c == 1 && xs.w % 4 == 0 && xs.h % 4 == 0 &&
            xs.n % 4 == 0 && aligned16(a.b.ptr);
  a.b_group = cg * xs.c;
  // grad_weight columns in its own (contiguous) layout, in the GEMM's column order.
  TapMap taps_out = taps_in;
  taps_out.sc = dw.stride(1), taps_out.sr = dw.stride(2), taps_out.ss = dw.stride(3);
  taps_out.dh = 0, taps_out.dw = 0;
  a.out_cols = taps_out;
  a.out_ld = dw.stride(0);
  a.dw = dw.mutable_data_ptr<scalar_t>();
  a.db = db.defined() ? db.mutable_data_ptr<scalar_t>() : nullptr;
  a.m = static_cast<int32_t>(cog), a.n = static_cast<int32_t>(nw), a.k = static_cast<int32_t>(kpos);
  a.n_tiles = static_cast<int32_t>(plan->shape.n_tiles);
  a.split = plan->shape.split;
  if (a.split.slices > 1) {
    plan->partial_at = ws->reserve(a.split.slices * p.c_out * nw * sizeof(acc_t));
    if (a.db) plan->partial_bias_at = ws->reserve(a.split.slices * p.c_out * sizeof(acc_t));
  }
  return true;
}

template <typename scalar_t>
void run_wgrad(WgradPlan<scalar_t>& plan, const Workspace& ws) {
  using acc_t = cuda_acc_t<scalar_t>;
  WgradArgs<scalar_t>& a = plan.args;
  const cudaStream_t stream = current_stream();
  if (a.split.slices > 1) {
    a.partial = ws.at<acc_t>(plan.partial_at);
    if (a.db) a.partial_bias = ws.at<acc_t>(plan.partial_bias_at);
  }
  const dim3 grid(static_cast<unsigned>(plan.shape.m_tiles),
                  static_cast<unsigned>(plan.shape.n_tiles * plan.groups),
                  static_cast<unsigned>(a.split.slices));
  auto launch = [&](auto cfg, auto nhwc) {
    using Cfg = decltype(cfg);
    constexpr bool NHWC = decltype(nhwc)::value;
    CNNEXT_LAUNCH((conv2d_implicit_gemm_wgrad_kernel<scalar_t, Cfg, NHWC>), grid,
                  dim3(Cfg::kThreads), 0, stream, a);
  };
  using T = std::true_type;
  using F = std::false_type;
  bool ran_small = false;
  if constexpr (kHasSmallTile<scalar_t>) {
    if (!plan.shape.large) {
      plan.nhwc ? launch(IgemmSmall{}, T{}) : launch(IgemmSmall{}, F{});
      ran_small = true;
    }
  }
  if (!ran_small) plan.nhwc ? launch(IgemmLarge{}, T{}) : launch(IgemmLarge{}, F{});
  if (a.split.slices > 1) {
    const int64_t height = static_cast<int64_t>(a.m) * plan.groups;
    const int64_t bias_count = a.db ? height : 0;
    const int64_t numel = height * a.n + bias_count;
    const LinearMap rows{0, a.out_ld, static_cast<int32_t>(height)};
    CNNEXT_LAUNCH((conv2d_splitk_reduce_kernel<scalar_t, LinearMap, TapMap, IdentityEpilogue>),
                  dim3(ceil_div(numel, 256)), dim3(256), 0, stream, a.partial, a.split.slices,
                  static_cast<int32_t>(height), FastDivmod(a.n), rows, a.out_cols, a.dw,
                  a.partial_bias, a.db, static_cast<int32_t>(bias_count), IdentityEpilogue{});
  }
}

}  // namespace
}  // namespace cnnext
