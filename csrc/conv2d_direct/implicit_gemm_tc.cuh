// Convolution as an implicit GEMM on tensor cores, for half and bfloat16 (wmma m16n16k16) and for
// float in TF32 (m16n16k8, operands rounded to tf32 as they leave shared memory) with float
// accumulators: the GEMMs of implicit_gemm.cuh (fprop, phase-decomposed dgrad, split-K wgrad with
// grad_bias), gathered through the same index maps. Launch: a block owns a 64 x 64 output tile
// with 4 warps (2 x 2), a warp owns 32 x 32 (2 x 2 fragments). K advances 32 at a time through two
// shared-memory stages; both operands are stored [x][k] with k contiguous (A row_major, B
// col_major) and the next tile travels in registers while the current one is multiplied. The
// accumulators leave through shared memory (store_matrix_sync), so the epilogue and the output
// index maps see plain (m, n) elements, never the fragment layout, which CUDA leaves unspecified.
// Split-K as in the SIMT family: float partials summed in a fixed order by the reduce kernel.
// grid = (m tiles, groups * n tiles, split-K slices or dgrad phases).
// int-ok-file: as implicit_gemm.cuh: 32-bit GEMM indices, extents bounded on the host
#pragma once

#ifdef __CUDACC__
#include <mma.h>
#endif

#include <ATen/Context.h>

#include <cstring>

#include "conv2d_direct/implicit_gemm.cuh"

namespace cnnext {
namespace {

namespace wmma = nvcuda::wmma;

template <typename scalar_t>
constexpr bool kHasTensorCores =
    std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16> ||
    std::is_same_v<scalar_t, float>;

// Per element type: the wmma fragment type, the element type wmma loads from memory (under the
// emulator half/bfloat16 are the same types), the fragment's k, the raw bits, and the exponent
// mask (all ones: Inf or NaN).
template <typename scalar_t>
struct TcTraits;
template <>
struct TcTraits<at::Half> {
  using frag_t = __half;
  using mem_t = __half;
  using bits_t = uint16_t;
  static constexpr int kK = 16;
  static constexpr bits_t kExp = 0x7c00;
};
template <>
struct TcTraits<at::BFloat16> {
  using frag_t = __nv_bfloat16;
  using mem_t = __nv_bfloat16;
  using bits_t = uint16_t;
  static constexpr int kK = 16;
  static constexpr bits_t kExp = 0x7f80;
};
template <>
struct TcTraits<float> {
  using frag_t = wmma::precision::tf32;
  using mem_t = float;
  using bits_t = uint32_t;
  static constexpr int kK = 8;
  static constexpr bits_t kExp = 0x7f800000u;
};

// The block tile, for every element type.
struct TcGeometry {
  static constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
  static constexpr int kWarpsM = 2;        // warps along m; a warp owns 32 x 32
  static constexpr int kPitchC = kBN + 4;  // floats per row of the staged output
};

// Shared memory per element type. Rows of a stage are kBK elements plus one 16-byte vector apart
// (80 bytes for half, 144 for float): fragment pointers stay 32-byte aligned and the rows a
// fragment load reads fall in distinct banks.
template <typename scalar_t>
struct TcTile : TcGeometry {
  static constexpr int kVec = 16 / sizeof(scalar_t);  // elements of one 16-byte vector
  static constexpr int kPitch = kBK + kVec;
  static constexpr int kStage = (kBM + kBN) * kPitch;  // elements of one stage, A then B
  static constexpr int kStageBytes = 2 * kStage * static_cast<int>(sizeof(scalar_t));
  static constexpr int kSmemBytes =
      kStageBytes > kBM * kPitchC * 4 ? kStageBytes : kBM * kPitchC * 4;
};

// 16 bytes: 8 half/bfloat16 or 4 float values as raw bits.
struct alignas(16) TcVec {
  uint32_t w[4];
};

// Raw copies: values move between memories without conversions.
template <typename scalar_t, typename bits_t = typename TcTraits<scalar_t>::bits_t>
__device__ __forceinline__ bits_t tc_bits(const scalar_t* p) {
#ifdef __CUDACC__
  return *reinterpret_cast<const bits_t*>(p);
#else
  bits_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}
template <typename bits_t>
__device__ __forceinline__ void tc_put(void* p, bits_t v) {
#ifdef __CUDACC__
  *static_cast<bits_t*>(p) = v;
#else
  std::memcpy(p, &v, sizeof v);
#endif
}
__device__ __forceinline__ void tc_load16(TcVec& v, const void* p) {
#ifdef __CUDACC__
  const uint4 t = *static_cast<const uint4*>(p);
  v.w[0] = t.x, v.w[1] = t.y, v.w[2] = t.z, v.w[3] = t.w;
#else
  std::memcpy(&v, p, sizeof v);
#endif
}
__device__ __forceinline__ void tc_store16(void* p, const TcVec& v) {
#ifdef __CUDACC__
  *static_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

// Loads the [X x kBK] tile of one operand (see Operand) and stores it to shared memory as
// [x][kPitch], k contiguous. KRUN: the operand is contiguous along k (NHWC channels, filter rows):
// a thread reads one 16-byte vector of consecutive k (8 half or 4 float values) for each of kXs
// x's, one vector load each when op.vec (kVec consecutive k from a multiple of kVec are then kVec
// consecutive elements at a 16-byte aligned address). Otherwise it is contiguous along x (NCHW
// pixels): a thread reads 4 consecutive x of kKs k rows, coalesced. CHECK_FINITE records whether
// a non-finite value was loaded (dgrad's exactness test).
template <typename scalar_t, int X, bool KRUN, class Op, bool CHECK_FINITE = false>
struct TcLoader {
  using Tile = TcTile<scalar_t>;
  using bits_t = typename TcTraits<scalar_t>::bits_t;
  static constexpr int kBK = Tile::kBK, kThreads = Tile::kThreads, kVec = Tile::kVec;
  static constexpr int kKLanes = kBK / kVec;  // KRUN: threads along k of one x
  static constexpr int kXs = KRUN ? X * kKLanes / kThreads : 4;
  static constexpr int kKs = KRUN ? kVec : X * kBK / 4 / kThreads;
  static constexpr int kXLanes = X / 4;  // !KRUN: threads along one k row
  static_assert(kXs >= 1 && kKs >= 1 && kThreads % kKLanes == 0 &&
                    (KRUN || kThreads % kXLanes == 0),
                "tile does not fit");

  const Op& op;
  Coord xc[kXs];
  TcVec v[KRUN ? kXs : 1];      // KRUN: the kVec k of each x
  bits_t s[KRUN ? 1 : 4][kKs];  // !KRUN: [x][k]
  int32_t lane_k, lane_x;
  bool nonfinite = false;

  __device__ __forceinline__ void check(bits_t bits) {
    if (CHECK_FINITE) nonfinite |= (bits & TcTraits<scalar_t>::kExp) == TcTraits<scalar_t>::kExp;
  }
  // Element j of a vector.
  static __device__ __forceinline__ bits_t element(const TcVec& vec, int j) {
    if constexpr (sizeof(bits_t) == 2) {
      return static_cast<bits_t>(vec.w[j / 2] >> (16 * (j % 2)));
    } else {
      return vec.w[j];
    }
  }

  __device__ __forceinline__ TcLoader(const Op& o, int32_t x0, int tid) : op(o) {
    if (KRUN) {
      lane_k = (tid % kKLanes) * kVec, lane_x = tid / kKLanes;
      CNNEXT_IGEMM_UNROLL
      for (int q = 0; q < kXs; ++q) xc[q] = op.x.at(x0 + lane_x + q * (kThreads / kKLanes));
    } else {
      lane_k = tid / kXLanes, lane_x = (tid % kXLanes) * 4;
      CNNEXT_IGEMM_UNROLL
      for (int i = 0; i < 4; ++i) xc[i] = op.x.at(x0 + lane_x + i);
    }
  }

  __device__ __forceinline__ bits_t fetch(const Coord& kc, const Coord& xc_) const {
    return op.valid(kc, xc_) ? tc_bits(op.ptr + kc.ofs + xc_.ofs) : bits_t(0);
  }

  __device__ __forceinline__ void load(int32_t k0) {
    if constexpr (KRUN) {
      if (op.vec) {
        const Coord kc = op.k.at(k0 + lane_k);
        CNNEXT_IGEMM_UNROLL
        for (int q = 0; q < kXs; ++q) {
          if (op.valid(kc, xc[q])) {
            tc_load16(v[q], op.ptr + kc.ofs + xc[q].ofs);
          } else {
            v[q] = TcVec{{0, 0, 0, 0}};
          }
        }
      } else {
        Coord kc[kVec];
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < kVec; ++j) kc[j] = op.k.at(k0 + lane_k + j);
        CNNEXT_IGEMM_UNROLL
        for (int q = 0; q < kXs; ++q) {
          CNNEXT_IGEMM_UNROLL
          for (int j = 0; j < 4; ++j) {
            if constexpr (sizeof(bits_t) == 2) {
              v[q].w[j] = static_cast<uint32_t>(fetch(kc[2 * j], xc[q])) |
                          static_cast<uint32_t>(fetch(kc[2 * j + 1], xc[q])) << 16;
            } else {
              v[q].w[j] = fetch(kc[j], xc[q]);
            }
          }
        }
      }
    } else {
      CNNEXT_IGEMM_UNROLL
      for (int j = 0; j < kKs; ++j) {
        const Coord kc = op.k.at(k0 + lane_k + j * (kThreads / kXLanes));
        CNNEXT_IGEMM_UNROLL
        for (int i = 0; i < 4; ++i) s[i][j] = fetch(kc, xc[i]);
      }
    }
    if (CHECK_FINITE) {
      CNNEXT_IGEMM_UNROLL
      for (int q = 0; q < (KRUN ? kXs : 4); ++q) {
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < (KRUN ? kVec : kKs); ++j) check(KRUN ? element(v[q], j) : s[q][j]);
      }
    }
  }

  __device__ __forceinline__ void store(scalar_t* tile) const {
    constexpr int P = Tile::kPitch;
    if constexpr (KRUN) {
      CNNEXT_IGEMM_UNROLL
      for (int q = 0; q < kXs; ++q) {
        tc_store16(tile + (lane_x + q * (kThreads / kKLanes)) * P + lane_k, v[q]);
      }
    } else {
      CNNEXT_IGEMM_UNROLL
      for (int i = 0; i < 4; ++i) {
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < kKs; ++j) {
          tc_put(tile + (lane_x + i) * P + lane_k + j * (kThreads / kXLanes), s[i][j]);
        }
      }
    }
  }
};

template <typename scalar_t>
using TcAcc = wmma::fragment<wmma::accumulator, 16, 16, TcTraits<scalar_t>::kK, float>;

// acc += A[k0:k1] * B[k0:k1] through two shared stages; warp (wm, wn) owns rows wm * 32 + {0, 16}
// and columns wn * 32 + {0, 16} of fragments. Float operands are rounded to tf32 once loaded
// (element-wise, so the fragment layout does not matter). ROW_SUMS: threads tid < kBM also sum
// their row of A over k (wgrad's grad_bias, read from the tile already in shared memory, so in
// full precision).
template <typename scalar_t, bool ROW_SUMS = false, class LA, class LB>
__device__ __forceinline__ void tc_mainloop(LA& la, LB& lb, int32_t k0, int32_t k1, scalar_t* smem,
                                            int wm, int wn, TcAcc<scalar_t> (&acc)[2][2],
                                            float* row_sum = nullptr, int tid = 0) {
  using Tr = TcTraits<scalar_t>;
  using Tile = TcTile<scalar_t>;
  using frag_t = typename Tr::frag_t;
  using mem_t = typename Tr::mem_t;
  constexpr int P = Tile::kPitch, BK = Tile::kBK, ST = Tile::kStage, FK = Tr::kK;
  constexpr int B0 = Tile::kBM * P;  // B after A within a stage
  if (k0 >= k1) return;              // uniform over the block
  la.load(k0);
  lb.load(k0);
  la.store(smem);
  lb.store(smem + B0);
  __syncthreads();
  int stage = 0;
  for (int32_t k = k0; k < k1; k += BK) {
    const bool more = k + BK < k1;
    if (more) {  // the next tile travels while this one is multiplied
      la.load(k + BK);
      lb.load(k + BK);
    }
    const mem_t* ta = reinterpret_cast<const mem_t*>(smem + stage * ST);
    const mem_t* tb = ta + B0;
    CNNEXT_IGEMM_UNROLL
    for (int kk = 0; kk < BK; kk += FK) {
      wmma::fragment<wmma::matrix_a, 16, 16, FK, frag_t, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, FK, frag_t, wmma::col_major> fb[2];
      CNNEXT_IGEMM_UNROLL
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], ta + (wm * 32 + i * 16) * P + kk, P);
      CNNEXT_IGEMM_UNROLL
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], tb + (wn * 32 + j * 16) * P + kk, P);
      if constexpr (std::is_same_v<scalar_t, float>) {
        CNNEXT_IGEMM_UNROLL
        for (int i = 0; i < 2; ++i) {
          CNNEXT_IGEMM_UNROLL
          for (int e = 0; e < fa[i].num_elements; ++e)
            fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
          CNNEXT_IGEMM_UNROLL
          for (int e = 0; e < fb[i].num_elements; ++e)
            fb[i].x[e] = wmma::__float_to_tf32(fb[i].x[e]);
        }
      }
      CNNEXT_IGEMM_UNROLL
      for (int i = 0; i < 2; ++i) {
        CNNEXT_IGEMM_UNROLL
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    if (ROW_SUMS && tid < Tile::kBM) {
      const scalar_t* row = smem + stage * ST + tid * P;
      CNNEXT_IGEMM_UNROLL
      for (int kk = 0; kk < BK; ++kk) *row_sum += static_cast<float>(row[kk]);
    }
    if (more) {  // the other stage was last read before the previous barrier
      la.store(smem + (stage ^ 1) * ST);
      lb.store(smem + (stage ^ 1) * ST + B0);
    }
    __syncthreads();
    stage ^= 1;
  }
}

// The accumulators to shared memory as a [kBM][kPitchC] float tile (the stages are free: the main
// loop ended on a barrier).
template <class Acc>
__device__ __forceinline__ void tc_stage(float* staged, int wm, int wn, const Acc (&acc)[2][2]) {
  constexpr int PC = TcGeometry::kPitchC;
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 2; ++i) {
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(staged + (wm * 32 + i * 16) * PC + wn * 32 + j * 16, acc[i][j], PC,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
}

// out[rows(m0 + r).ofs + cols(n0 + c).ofs] = epilogue(staged (r, c), epi_base + n0 + c).
// ROWS_FAST: consecutive threads take consecutive rows (pixels of an NCHW output), else
// consecutive columns (channels of NHWC, rows of a partial).
template <bool ROWS_FAST, typename out_t, class RowMap, class ColMap, class Epilogue>
__device__ __forceinline__ void tc_write(out_t* out, const RowMap& rows, const ColMap& cols,
                                         int32_t m0, int32_t n0, const float* staged,
                                         const Epilogue& epilogue, int64_t epi_base, int tid) {
  constexpr int PC = TcGeometry::kPitchC, T = TcGeometry::kThreads;
  constexpr int kFixed =
      ROWS_FAST ? TcGeometry::kBM : TcGeometry::kBN;  // threads along the fast axis
  const int fast = tid % kFixed;
  const Coord fc = ROWS_FAST ? rows.at(m0 + fast) : cols.at(n0 + fast);
  if (fc.h == kOutside) return;
  CNNEXT_IGEMM_UNROLL
  for (int s = tid / kFixed; s < (ROWS_FAST ? TcGeometry::kBN : TcGeometry::kBM); s += T / kFixed) {
    const int r = ROWS_FAST ? fast : s, c = ROWS_FAST ? s : fast;
    const Coord sc = ROWS_FAST ? cols.at(n0 + c) : rows.at(m0 + r);
    if (sc.h == kOutside) continue;
    out[fc.ofs + sc.ofs] = static_cast<out_t>(epilogue(staged[r * PC + c], epi_base + n0 + c));
  }
}

template <bool ROWS_FAST, typename out_t, class RowMap, class ColMap, class Epilogue, class Acc>
__device__ __forceinline__ void tc_store(out_t* out, const RowMap& rows, const ColMap& cols,
                                         int32_t m0, int32_t n0, int wm, int wn,
                                         const Acc (&acc)[2][2], float* staged,
                                         const Epilogue& epilogue, int64_t epi_base, int tid) {
  tc_stage(staged, wm, wn, acc);
  tc_write<ROWS_FAST>(out, rows, cols, m0, n0, staged, epilogue, epi_base, tid);
}

// ---- fprop -------------------------------------------------------------------------------------

// args as for the SIMT fprop; a.vec and b.vec mean 16-byte runs along k (TcTile::kVec elements).
template <typename scalar_t, bool NHWC, class Epilogue>
__global__ void __launch_bounds__(TcGeometry::kThreads)
    conv2d_implicit_gemm_tc_fprop_kernel(const FpropArgs<scalar_t> args, Epilogue epilogue) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __align__(128) __shared__ unsigned char smem_raw[TcTile<scalar_t>::kSmemBytes];
  scalar_t* const smem = reinterpret_cast<scalar_t*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % TcGeometry::kWarpsM, wn = warp / TcGeometry::kWarpsM;
  const int32_t grp = blockIdx.y / args.n_tiles, nt = blockIdx.y % args.n_tiles;
  const int32_t m0 = blockIdx.x * TcGeometry::kBM, n0 = nt * TcGeometry::kBN;
  const int32_t k0 = blockIdx.z * args.split.slice_len;
  const int32_t k1 = args.split.slices > 1 ? imin(args.k, k0 + args.split.slice_len) : args.k;

  auto a = args.a;
  a.k.base += grp * args.a_group;
  auto b = args.b;
  b.x.base += grp * args.b_group;
  b.vec = true;  // plan_tc_fprop guarantees it; a constant here drops the scalar path
  TcLoader<scalar_t, TcGeometry::kBM, NHWC, decltype(a)> la(a, m0, tid);
  TcLoader<scalar_t, TcGeometry::kBN, true, decltype(b)> lb(b, n0, tid);
  TcAcc<scalar_t> acc[2][2];
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 2; ++i) {
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  tc_mainloop<scalar_t>(la, lb, k0, k1, smem, wm, wn, acc);

  float* const staged = reinterpret_cast<float*>(smem_raw);
  if (args.split.slices > 1) {
    const int64_t width = static_cast<int64_t>(args.out_cols.count);  // groups * N
    const LinearMap rows{0, width, args.m};
    const LinearMap cols{static_cast<int64_t>(grp) * args.n, 1, args.n};
    tc_store<false>(args.partial + blockIdx.z * args.m * width, rows, cols, m0, n0, wm, wn, acc,
                    staged, IdentityEpilogue{}, 0, tid);
  } else {
    LinearMap cols = args.out_cols;
    cols.base += grp * args.n * cols.ld;
    cols.count = args.n;
    tc_store<!NHWC>(args.out, args.out_rows, cols, m0, n0, wm, wn, acc, staged, epilogue,
                    static_cast<int64_t>(grp) * args.n, tid);
  }
#else
  __trap();  // no bfloat16 or tf32 wmma before sm_80; the host never launches it there
#endif
}

// ---- dgrad -------------------------------------------------------------------------------------

// As the SIMT dgrad (one GEMM per stride phase, grid z): A = grad_output gathered along the
// phase's taps, B = filter rows; args.vec_a means 16-byte runs of c_out.
template <typename scalar_t, bool NHWC, bool TAPS_FASTEST>
__global__ void __launch_bounds__(TcGeometry::kThreads)
    conv2d_implicit_gemm_tc_dgrad_kernel(const DgradArgs<scalar_t> args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __align__(128) __shared__ unsigned char smem_raw[TcTile<scalar_t>::kSmemBytes];
  __shared__ int nonfinite_warps[TcGeometry::kThreads / 32];
  scalar_t* const smem = reinterpret_cast<scalar_t*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % TcGeometry::kWarpsM, wn = warp / TcGeometry::kWarpsM;
  int32_t ph, pw;
  args.div_sw.divmod(blockIdx.z, ph, pw);
  const DgradAxis& ra = args.rows[ph];
  const DgradAxis& ca = args.cols[pw];
  const int32_t m = args.batch * ra.pixels * ca.pixels;
  const int32_t m0 = blockIdx.x * TcGeometry::kBM;
  if (m0 >= m) return;  // this phase has fewer pixels than the largest one
  const int32_t grp = blockIdx.y / args.n_tiles, nt = blockIdx.y % args.n_tiles;
  const int32_t n0 = nt * TcGeometry::kBN;
  const int32_t taps_k = ra.count * ca.count * args.c_out;

  // A: grad_output at row i + off0 - dstep * tr.
  Operand<scalar_t, TapMap, PixelMap> a;
  a.ptr = args.dy;
  a.x.div_cols = ca.extent, a.x.div_rows = ra.extent;
  a.x.sn = args.dy_sn, a.x.sh = args.dy_sh, a.x.sw = args.dy_sw;
  a.x.org_h = ra.off0, a.x.org_w = ca.off0, a.x.count = m;
  a.k.div_c = args.div_c_out, a.k.div_s = ca.taps, a.k.tap_major = !TAPS_FASTEST;
  a.k.div_taps = args.div_taps[blockIdx.z];
  a.k.base = static_cast<int64_t>(grp) * args.c_out * args.dy_sc, a.k.sc = args.dy_sc;
  a.k.sr = -static_cast<int64_t>(ra.dstep) * args.dy_sh;
  a.k.ss = -static_cast<int64_t>(ca.dstep) * args.dy_sw;
  a.k.dh = -ra.dstep, a.k.dw = -ca.dstep, a.k.count = taps_k;
  a.h_lim = args.p, a.w_lim = args.q, a.vec = args.vec_a;
  // B: filter rows (co, r, s); k-contiguous only with TAPS_FASTEST (then never in 8-runs).
  Operand<scalar_t, TapMap, LinearMap> b;
  b.ptr = args.w;
  b.k.div_c = args.div_c_out, b.k.div_s = ca.taps, b.k.tap_major = !TAPS_FASTEST;
  b.k.div_taps = args.div_taps[blockIdx.z];
  b.k.base =
      static_cast<int64_t>(grp) * args.c_out * args.w_sk + ra.t0 * args.w_sr + ca.t0 * args.w_ss;
  b.k.sc = args.w_sk, b.k.sr = ra.step * args.w_sr, b.k.ss = ca.step * args.w_ss;
  b.k.count = taps_k;
  b.x.base = 0, b.x.ld = args.w_sc, b.x.count = args.c_in;
  b.vec = false;

  TcLoader<scalar_t, TcGeometry::kBM, NHWC, decltype(a)> la(a, m0, tid);
  TcLoader<scalar_t, TcGeometry::kBN, TAPS_FASTEST, decltype(b), true> lb(b, n0, tid);
  TcAcc<scalar_t> acc[2][2];
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 2; ++i) {
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  tc_mainloop<scalar_t>(la, lb, 0, taps_k, smem, wm, wn, acc);
  // Block-wide "any non-finite filter value": a warp vote, then one flag per warp (no atomics).
  const unsigned vote = __ballot_sync(0xffffffffu, lb.nonfinite);
  if (tid % 32 == 0) nonfinite_warps[warp] = vote != 0;
  float* const staged = reinterpret_cast<float*>(smem_raw);
  tc_stage(staged, wm, wn, acc);  // its barrier also publishes the flags
  bool nonfinite = false;
  CNNEXT_IGEMM_UNROLL
  for (int w = 0; w < TcGeometry::kThreads / 32; ++w) nonfinite |= nonfinite_warps[w] != 0;
  if (nonfinite) {  // uniform over the block
    // A non-finite filter value met the zeros that stand for padding: redo this tile summing
    // only real taps, so Inf/NaN reach exactly the gradients torch's col2im gives them.
    for (int e = tid; e < TcGeometry::kBM * TcGeometry::kBN; e += TcGeometry::kThreads) {
      const int r = e / TcGeometry::kBN, c = e % TcGeometry::kBN;
      const Coord xa = a.x.at(m0 + r), xb = b.x.at(n0 + c);
      float sum = 0.f;
      if (xa.h != kOutside && xb.h != kOutside) {
        for (int32_t kk = 0; kk < taps_k; ++kk) {
          const Coord ka = a.k.at(kk);
          if (!a.valid(ka, xa)) continue;
          const Coord kb = b.k.at(kk);
          sum += static_cast<float>(a.ptr[ka.ofs + xa.ofs]) *
                 static_cast<float>(b.ptr[kb.ofs + xb.ofs]);
        }
      }
      staged[r * TcGeometry::kPitchC + c] = sum;
    }
    __syncthreads();
  }

  PixelMap rows;
  rows.div_cols = ca.extent, rows.div_rows = ra.extent;
  rows.sn = args.dx_sn, rows.sh = args.dx_sh, rows.sw = args.dx_sw;
  rows.st_h = args.sh, rows.st_w = args.sw, rows.org_h = ph, rows.org_w = pw, rows.count = m;
  const LinearMap cols{static_cast<int64_t>(grp) * args.c_in * args.dx_sc, args.dx_sc, args.c_in};
  tc_write<!NHWC>(args.dx, rows, cols, m0, n0, staged, IdentityEpilogue{}, 0, tid);
#else
  __trap();
#endif
}

// ---- wgrad -------------------------------------------------------------------------------------

// As the SIMT wgrad: A = grad_output [pixels x c_out], B = input [pixels x (tap, ci)], K split
// over grid z; blocks of the first n tile also sum grad_bias from A's tiles.
template <typename scalar_t, bool NHWC>
__global__ void __launch_bounds__(TcGeometry::kThreads)
    conv2d_implicit_gemm_tc_wgrad_kernel(const WgradArgs<scalar_t> args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __align__(128) __shared__ unsigned char smem_raw[TcTile<scalar_t>::kSmemBytes];
  scalar_t* const smem = reinterpret_cast<scalar_t*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % TcGeometry::kWarpsM, wn = warp / TcGeometry::kWarpsM;
  const int32_t grp = blockIdx.y / args.n_tiles, nt = blockIdx.y % args.n_tiles;
  const int32_t m0 = blockIdx.x * TcGeometry::kBM, n0 = nt * TcGeometry::kBN;
  const int32_t k0 = blockIdx.z * args.split.slice_len;
  const int32_t k1 = args.split.slices > 1 ? imin(args.k, k0 + args.split.slice_len) : args.k;

  auto a = args.a;
  a.x.base += grp * args.a_group;
  auto b = args.b;
  b.x.base += grp * args.b_group;
  // NHWC: channels are contiguous (along x); NCHW: pixels are (along k).
  TcLoader<scalar_t, TcGeometry::kBM, !NHWC, decltype(a)> la(a, m0, tid);
  TcLoader<scalar_t, TcGeometry::kBN, !NHWC, decltype(b)> lb(b, n0, tid);
  TcAcc<scalar_t> acc[2][2];
  CNNEXT_IGEMM_UNROLL
  for (int i = 0; i < 2; ++i) {
    CNNEXT_IGEMM_UNROLL
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  float* const staged = reinterpret_cast<float*>(smem_raw);
  const int32_t co = grp * args.m + m0 + tid;  // the bias row of threads tid < kBM
  // The store, once per kind of block: a bias flag kept live across the main loop costs a
  // register that ptxas spilled (float, sm_90).
  const auto finish = [&](auto bias_block, float row_sum) {
    constexpr bool BIAS = decltype(bias_block)::value;
    if (args.split.slices > 1) {
      const LinearMap rows{static_cast<int64_t>(grp) * args.m * args.n, args.n, args.m};
      const LinearMap cols{0, 1, args.n};
      const int64_t slice_words = static_cast<int64_t>(gridDim.y / args.n_tiles) * args.m * args.n;
      tc_store<false>(args.partial + blockIdx.z * slice_words, rows, cols, m0, n0, wm, wn, acc,
                      staged, IdentityEpilogue{}, 0, tid);
      if (BIAS && tid < TcGeometry::kBM && m0 + tid < args.m) {
        args.partial_bias[static_cast<int64_t>(blockIdx.z) * (gridDim.y / args.n_tiles) * args.m +
                          co] = row_sum;
      }
    } else {
      const LinearMap rows{static_cast<int64_t>(grp) * args.m * args.out_ld, args.out_ld, args.m};
      tc_store<false>(args.dw, rows, args.out_cols, m0, n0, wm, wn, acc, staged, IdentityEpilogue{},
                      0, tid);
      if (BIAS && tid < TcGeometry::kBM && m0 + tid < args.m) {
        args.db[co] = static_cast<scalar_t>(row_sum);
      }
    }
  };
  if (args.db != nullptr && nt == 0) {
    float row_sum = 0.f;
    tc_mainloop<scalar_t, true>(la, lb, k0, k1, smem, wm, wn, acc, &row_sum, tid);
    finish(std::true_type{}, row_sum);
  } else {
    tc_mainloop<scalar_t>(la, lb, k0, k1, smem, wm, wn, acc);
    finish(std::false_type{}, 0.f);
  }
#else
  __trap();
#endif
}

}  // namespace
}  // namespace cnnext

// ---- host side ---------------------------------------------------------------------------------
namespace cnnext {
namespace {

// Whether fp32 convolutions may run in TF32: torch's own setting for its cuDNN convolutions
// (torch.backends.cudnn.allow_tf32, or torch.backends.cudnn.conv.fp32_precision), read per call
// as torch does. The emulator also needs emulate_cuda(tf32=True): its users compare emulated
// float results with torch's CPU convolution, which never uses TF32.
inline bool tc_tf32_allowed() {
#ifdef CNNEXT_CUDA_EMULATION
  if (!emu::tf32_enabled()) return false;
#endif
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// The tensor-core path needs half/bfloat16, or float with TF32 allowed; channels reduced per
// group in whole 16-byte vectors (a multiple of 8 half or 4 float values, along channels and
// filter rows); on a GPU, sm_80 or newer.
template <typename scalar_t>
bool tc_supported(const Conv2dParams& p) {
  if constexpr (!kHasTensorCores<scalar_t>) {
    return false;
  } else {
    if (std::is_same_v<scalar_t, float> && !tc_tf32_allowed()) return false;
#ifndef CNNEXT_CUDA_EMULATION
    if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
#endif
    return p.c_in_per_group() % TcTile<scalar_t>::kVec == 0;
  }
}

// 64 x 64 tiles; K split over slices (multiples of kBK) until about two waves of blocks exist.
inline IgemmShape plan_tc_shape(int64_t m, int64_t n, int64_t k, int64_t groups, bool allow_split,
                                int64_t words_per_slice) {
  constexpr int64_t BK = TcGeometry::kBK;
  const int64_t sms = igemm_sm_count();
  IgemmShape s;
  s.m_tiles = (m + TcGeometry::kBM - 1) / TcGeometry::kBM;
  s.n_tiles = (n + TcGeometry::kBN - 1) / TcGeometry::kBN;
  const int64_t blocks = s.m_tiles * s.n_tiles * groups;
  int64_t slices = 1;
  if (allow_split && blocks < sms) {
    slices = std::min({(2 * sms + blocks - 1) / blocks, k / kMinSliceK, kMaxSlices,
                       kMaxPartialWords / std::max<int64_t>(words_per_slice, 1)});
  }
  s.split = SplitK{1, static_cast<int32_t>(round_up(k, BK))};
  if (slices > 1) {
    const int64_t len = round_up((k + slices - 1) / slices, BK);
    if ((k + len - 1) / len > 1) {
      s.split = SplitK{static_cast<int32_t>((k + len - 1) / len), static_cast<int32_t>(len)};
    }
  }
  return s;
}

// The SIMT plan's index maps with the tensor-core tile, split and 16-byte vector rules.
template <typename scalar_t>
bool plan_tc_fprop(const Conv2dParams& p, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& out, Workspace* ws, FpropPlan<scalar_t>* plan) {
  using acc_t = cuda_acc_t<scalar_t>;
  Workspace scratch;  // the SIMT plan's own reservations are not used
  if (!plan_fprop<scalar_t>(p, x, w, out, IgemmTile::kAuto, true, &scratch, plan)) return false;
  const int64_t cg = p.c_in_per_group(), k = cg * p.kh * p.kw, m = p.n * p.h_out * p.w_out;
  plan->shape = plan_tc_shape(m, p.c_out_per_group(), k, p.groups, !plan->transform, m * p.c_out);
  if (plan->shape.n_tiles * p.groups > 65535 || plan->shape.m_tiles > kInt32Max) return false;
  FpropArgs<scalar_t>& a = plan->args;
  const Strides4 xs = strides4(x);
  constexpr int64_t V = TcTile<scalar_t>::kVec;
  a.a.vec = plan->nhwc && cg % V == 0 && xs.c == 1 && xs.w % V == 0 && xs.h % V == 0 &&
            xs.n % V == 0 && aligned16(a.a.ptr);
  // The kernel reads the filter in 16-byte vectors only (a runtime choice there cost ptxas a
  // spilled predicate): a filter that is not 16-byte aligned runs on the SIMT family instead.
  a.b.vec = k % V == 0 && (plan->transform || aligned16(a.b.ptr));
  if (!a.b.vec) return false;
  a.n_tiles = static_cast<int32_t>(plan->shape.n_tiles);
  a.split = plan->shape.split;
  plan->filter_at = plan->transform ? ws->reserve(w.numel() * sizeof(scalar_t)) : -1;
  plan->partial_at =
      a.split.slices > 1 ? ws->reserve(a.split.slices * m * p.c_out * sizeof(acc_t)) : -1;
  return true;
}

template <typename scalar_t, class Epilogue>
void run_tc_fprop(FpropPlan<scalar_t>& plan, const at::Tensor& w, const Workspace& ws,
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
  if (plan.nhwc) {
    CNNEXT_LAUNCH((conv2d_implicit_gemm_tc_fprop_kernel<scalar_t, true, Epilogue>), grid,
                  dim3(TcGeometry::kThreads), 0, stream, a, epilogue);
  } else {
    CNNEXT_LAUNCH((conv2d_implicit_gemm_tc_fprop_kernel<scalar_t, false, Epilogue>), grid,
                  dim3(TcGeometry::kThreads), 0, stream, a, epilogue);
  }
  if (a.split.slices > 1) {
    const int64_t numel = static_cast<int64_t>(a.m) * a.out_cols.count;
    CNNEXT_LAUNCH((conv2d_splitk_reduce_kernel<scalar_t, PixelMap, LinearMap, Epilogue>),
                  dim3(ceil_div(numel, 256)), dim3(256), 0, stream, a.partial, a.split.slices, a.m,
                  FastDivmod(a.out_cols.count), a.out_rows, a.out_cols, a.out,
                  static_cast<const acc_t*>(nullptr), static_cast<scalar_t*>(nullptr), 0, epilogue);
  }
}

// out = epilogue(conv(x, w)) on tensor cores; false when the dtype or geometry is not supported
// (the caller runs the SIMT family).
template <typename scalar_t, class Epilogue>
bool conv2d_implicit_gemm_tc_forward(const Conv2dParams& p, const at::Tensor& x,
                                     const at::Tensor& w, const at::Tensor& out,
                                     const Epilogue& epilogue) {
  if constexpr (!kHasTensorCores<scalar_t>) {
    return false;
  } else {
    if (!tc_supported<scalar_t>(p)) return false;
    Workspace ws;
    FpropPlan<scalar_t> plan;
    if (!plan_tc_fprop<scalar_t>(p, x, w, out, &ws, &plan)) return false;
    ws.allocate(x);
    run_tc_fprop<scalar_t>(plan, w, ws, epilogue);
    return true;
  }
}

// ---- dgrad ----

// The SIMT plan (phases, maps) with the tensor-core tile; no split (K = taps * c_out per phase).
template <typename scalar_t>
bool plan_tc_dgrad(const Conv2dParams& p, const at::Tensor& dy, const at::Tensor& w,
                   const at::Tensor& dx, Workspace* ws, DgradPlan<scalar_t>* plan) {
  Workspace scratch;
  if (!plan_dgrad<scalar_t>(p, dy, w, dx, IgemmTile::kAuto, &scratch, plan)) return false;
  const int64_t m_max = p.n * ((p.h + p.sh - 1) / p.sh) * ((p.w + p.sw - 1) / p.sw);
  plan->shape = plan_tc_shape(m_max, p.c_in_per_group(), 0, p.groups, false, 0);
  if (plan->shape.n_tiles * p.groups > 65535) return false;
  DgradArgs<scalar_t>& a = plan->args;
  const Strides4 ys = strides4(dy);
  constexpr int64_t V = TcTile<scalar_t>::kVec;
  a.vec_a = plan->nhwc && p.c_out_per_group() % V == 0 && ys.c == 1 && ys.w % V == 0 &&
            ys.h % V == 0 && ys.n % V == 0 && aligned16(a.dy);
  a.vec_b = false;
  a.n_tiles = static_cast<int32_t>(plan->shape.n_tiles);
  plan->filter_at = plan->transform ? ws->reserve(w.numel() * sizeof(scalar_t)) : -1;
  return true;
}

template <typename scalar_t>
void run_tc_dgrad(DgradPlan<scalar_t>& plan, const at::Tensor& w, const Workspace& ws) {
  if constexpr (kHasTensorCores<scalar_t>) {
    DgradArgs<scalar_t>& a = plan.args;
    if (plan.transform) {
      scalar_t* filter = ws.at<scalar_t>(plan.filter_at);
      launch_filter_to_krsc<scalar_t>(w, filter);
      a.w = filter;
    }
    const dim3 grid(static_cast<unsigned>(plan.shape.m_tiles),
                    static_cast<unsigned>(plan.shape.n_tiles * (w.size(0) / a.c_out)),
                    static_cast<unsigned>(plan.phases));
    auto launch = [&](auto nhwc, auto taps_fastest) {
      constexpr bool NHWC = decltype(nhwc)::value, TF = decltype(taps_fastest)::value;
      CNNEXT_LAUNCH((conv2d_implicit_gemm_tc_dgrad_kernel<scalar_t, NHWC, TF>), grid,
                    dim3(TcGeometry::kThreads), 0, current_stream(), a);
    };
    using T = std::true_type;
    using F = std::false_type;
    if (plan.nhwc) {
      launch(T{}, F{});
    } else if (plan.taps_fastest) {
      launch(F{}, T{});
    } else {
      launch(F{}, F{});
    }
  }
}

// ---- wgrad ----

template <typename scalar_t>
bool plan_tc_wgrad(const Conv2dParams& p, const at::Tensor& dy, const at::Tensor& x,
                   const at::Tensor& dw, const at::Tensor& db, Workspace* ws,
                   WgradPlan<scalar_t>* plan) {
  using acc_t = cuda_acc_t<scalar_t>;
  Workspace scratch;
  if (!plan_wgrad<scalar_t>(p, dy, x, dw, db, IgemmTile::kAuto, &scratch, plan)) return false;
  const int64_t nw = p.c_in_per_group() * p.kh * p.kw, kpos = p.n * p.h_out * p.w_out;
  plan->shape =
      plan_tc_shape(p.c_out_per_group(), nw, kpos, p.groups, true, p.c_out * nw + p.c_out);
  if (plan->shape.n_tiles * p.groups > 65535) return false;
  WgradArgs<scalar_t>& a = plan->args;
  a.a.vec = a.b.vec = false;  // k runs are pixels (NCHW) or the loads run along x (NHWC)
  a.n_tiles = static_cast<int32_t>(plan->shape.n_tiles);
  a.split = plan->shape.split;
  plan->partial_at = plan->partial_bias_at = -1;
  if (a.split.slices > 1) {
    plan->partial_at = ws->reserve(a.split.slices * p.c_out * nw * sizeof(acc_t));
    if (a.db) plan->partial_bias_at = ws->reserve(a.split.slices * p.c_out * sizeof(acc_t));
  }
  return true;
}

template <typename scalar_t>
void run_tc_wgrad(WgradPlan<scalar_t>& plan, const Workspace& ws) {
  if constexpr (kHasTensorCores<scalar_t>) {
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
    if (plan.nhwc) {
      CNNEXT_LAUNCH((conv2d_implicit_gemm_tc_wgrad_kernel<scalar_t, true>), grid,
                    dim3(TcGeometry::kThreads), 0, stream, a);
    } else {
      CNNEXT_LAUNCH((conv2d_implicit_gemm_tc_wgrad_kernel<scalar_t, false>), grid,
                    dim3(TcGeometry::kThreads), 0, stream, a);
    }
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
}

}  // namespace
}  // namespace cnnext
