// Self-tests of the CUDA emulator: small kernels in plain CUDA, each checked against a CPU
// reference, and planted-bug twins the emulator must catch. Built without torch by
// tests/test_emulator.py (g++, optionally with -fsanitize=thread), and run as
//   selftest CASE SCHEDULE     -> prints "PASS", "WRONG ..." (exit 1) or "ERROR ..." (exit 2).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// The program is built without the extension's flags; the shared headers test for this one.
#ifndef CNNEXT_CUDA_EMULATION
#define CNNEXT_CUDA_EMULATION
#endif
#include "common/async_copy.cuh"
#include "emu/emu.h"

template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
            Args... args) {
  auto body = [&]() { kernel(args...); };
  cnnext::emu::launch(name, grid, block, smem, body);
}

// ---- tiled transpose: a 32x32 tile through shared memory, one barrier ---------------------------
constexpr int TILE = 32, ROWS = 8;
template <bool kBarrier>
__global__ void transpose_kernel(const float* in, float* out, int h, int w) {
  __shared__ float tile[TILE][TILE + 1];
  int x = blockIdx.x * TILE + threadIdx.x, y = blockIdx.y * TILE + threadIdx.y;
  for (int j = 0; j < TILE; j += ROWS)
    if (x < w && y + j < h) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * w + x];
  if (kBarrier) __syncthreads();
  x = blockIdx.y * TILE + threadIdx.x;
  y = blockIdx.x * TILE + threadIdx.y;
  for (int j = 0; j < TILE; j += ROWS)
    if (x < h && y + j < w) out[(y + j) * h + x] = tile[threadIdx.x][threadIdx.y + j];
}

// ---- tiled matmul: two barriers per K step
// --------------------------------------------------------
constexpr int MT = 16;
template <bool kSecondBarrier>
__global__ void matmul_kernel(const float* a, const float* b, float* c, int m, int n, int k) {
  __shared__ float sa[MT][MT];
  __shared__ float sb[MT][MT];
  const int row = blockIdx.y * MT + threadIdx.y, col = blockIdx.x * MT + threadIdx.x;
  float acc = 0.f;
  for (int t = 0; t < k; t += MT) {
    sa[threadIdx.y][threadIdx.x] =
        (row < m && t + threadIdx.x < k) ? a[row * k + t + threadIdx.x] : 0.f;
    sb[threadIdx.y][threadIdx.x] =
        (t + threadIdx.y < k && col < n) ? b[(t + threadIdx.y) * n + col] : 0.f;
    __syncthreads();
    for (int p = 0; p < MT; ++p) acc += sa[threadIdx.y][p] * sb[p][threadIdx.x];
    if (kSecondBarrier) __syncthreads();  // the tile may be overwritten only after everyone used it
  }
  if (row < m && col < n) c[row * n + col] = acc;
}

// ---- double-buffered (two-stage) matmul: the load of tile t+1 overlaps the compute of tile t ---
// One barrier per K step suffices with two stages, if it sits between the compute of tile t-1
// and the refill of that stage with tile t+1. The planted twin moves it after the refill: the
// tiles are still visible before their compute, but a fast thread refills the stage slow threads
// are still multiplying from.
template <bool kGuardRefill>
__global__ void pipeline_kernel(const float* a, const float* b, float* c, int m, int n, int k) {
  __shared__ float sa[2][MT][MT];
  __shared__ float sb[2][MT][MT];
  const int row = blockIdx.y * MT + threadIdx.y, col = blockIdx.x * MT + threadIdx.x;
  const int tiles = (k + MT - 1) / MT;
  auto load = [&](int t, int stage) {
    const int ka = t * MT + threadIdx.x, kb = t * MT + threadIdx.y;
    sa[stage][threadIdx.y][threadIdx.x] = (row < m && ka < k) ? a[row * k + ka] : 0.f;
    sb[stage][threadIdx.y][threadIdx.x] = (kb < k && col < n) ? b[kb * n + col] : 0.f;
  };
  load(0, 0);
  float acc = 0.f;
  for (int t = 0; t < tiles; ++t) {
    if (kGuardRefill) __syncthreads();  // tile t visible; everyone is done with tile t-1's stage
    if (t + 1 < tiles) load(t + 1, (t + 1) % 2);
    if (!kGuardRefill) __syncthreads();  // planted: only the visibility half of the barrier
    const int s = t % 2;
    for (int p = 0; p < MT; ++p) acc += sa[s][threadIdx.y][p] * sb[s][p][threadIdx.x];
  }
  if (row < m && col < n) c[row * n + col] = acc;
}

// ---- block reduction: warp shuffles, then one warp reduces the per-warp partials ----------------
template <bool kBarrier>
__global__ void reduce_kernel(const float* in, float* out, int n) {
  __shared__ float partial[32];
  const int tid = threadIdx.x, i = blockIdx.x * blockDim.x + tid;
  float v = i < n ? in[i] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (tid % 32 == 0) partial[tid / 32] = v;
  if (kBarrier) __syncthreads();
  if (tid < 32) {
    v = tid < (int)(blockDim.x / 32) ? partial[tid] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (tid == 0) out[blockIdx.x] = v;
  }
}

// ---- shared-memory histogram with atomics -------------------------------------------------------
constexpr int BINS = 16;
template <bool kAtomic>
__global__ void histogram_kernel(const int* in, int* hist, int n) {
  __shared__ int local[BINS];
  if (threadIdx.x < BINS) local[threadIdx.x] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    if (kAtomic) {
      atomicAdd(&local[in[i]], 1);
    } else {
      local[in[i]] += 1;  // planted bug: a read-modify-write race between threads
    }
  }
  __syncthreads();
  if (threadIdx.x < BINS) atomicAdd(&hist[threadIdx.x], local[threadIdx.x]);
}

// ---- stencil: each thread reads its left neighbour's shared slot
// ---------------------------------
template <bool kBarrier>
__global__ void stencil_kernel(const float* in, float* out, int n) {
  __shared__ float s[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = i < n ? in[i] : 0.f;
  if (kBarrier) __syncthreads();
  const float left = threadIdx.x > 0 ? s[threadIdx.x - 1] : (i > 0 && i - 1 < n ? in[i - 1] : 0.f);
  if (i < n) out[i] = s[threadIdx.x] + left;
}

// ---- barrier misuse
// ------------------------------------------------------------------------------
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();  // a different barrier: undefined behaviour on a GPU
  }
  out[threadIdx.x] = 1.f;
}

__global__ void deadlock_kernel(float* out) {
  // Lane 0 waits at the block barrier while lanes 1..31 wait for it in a full-warp shuffle.
  float v = threadIdx.x;
  if (threadIdx.x == 0)
    __syncthreads();
  else
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void early_exit_kernel(float* out) {
  // Threads that exit do not hold a barrier back (modern CUDA semantics).
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 2.f;
}

// ---- warp primitives and dynamic shared memory
// ----------------------------------------------------
__global__ void shuffle_modes_kernel(int* out, int width) {
  const int lane = threadIdx.x % 32, v = 100 + lane;
  out[threadIdx.x * 5 + 0] = __shfl_sync(0xffffffffu, v, 3, width);
  out[threadIdx.x * 5 + 1] = __shfl_up_sync(0xffffffffu, v, 2, width);
  out[threadIdx.x * 5 + 2] = __shfl_down_sync(0xffffffffu, v, 2, width);
  out[threadIdx.x * 5 + 3] = __shfl_xor_sync(0xffffffffu, v, 5, width);
  out[threadIdx.x * 5 + 4] = __ballot_sync(0xffffffffu, lane % 3 == 0);
}

__global__ void dynamic_smem_kernel(float* out) {
  CNNEXT_DYNAMIC_SHARED(float, buf);
  out[threadIdx.x] = buf[threadIdx.x];  // read before any write: must not look like real data
}

// ---- tensor cores (nvcuda::wmma)
// ----------------------------------------------------------------- C[m, n] = alpha * A[m, k] .
// B[k, n] + bias[n] (all row-major in memory), one warp per 16x16 tile of C, two warps per block.
// The A and B fragments read memory as LA / LB: a row-major A [m, k] seen col_major is A^T, so the
// host passes the transposed copy it needs.
namespace wmma = nvcuda::wmma;
constexpr int WM = 16;

// kAssumeLayout plants the bug: the bias is added by indexing the accumulator as if lane l held
// elements l * 8 .. l * 8 + 7 of the tile in row-major order (the emulator's fixed layout), which
// CUDA does not promise.
template <class T, int WK, class LA, class LB, bool kAssumeLayout>
__global__ void wmma_gemm_kernel(
    const typename wmma::fragment<wmma::matrix_a, WM, WM, WK, T, LA>::storage_element_type* a,
    const typename wmma::fragment<wmma::matrix_b, WM, WM, WK, T, LB>::storage_element_type* b,
    const float* bias, float* c, int m, int n, int k, float alpha) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile_m = blockIdx.y * WM, tile_n = (blockIdx.x * 2 + warp) * WM;
  if (tile_n >= n) return;  // the whole warp leaves together
  wmma::fragment<wmma::matrix_a, WM, WM, WK, T, LA> fa;
  wmma::fragment<wmma::matrix_b, WM, WM, WK, T, LB> fb;
  wmma::fragment<wmma::accumulator, WM, WM, WK, float> acc;
  wmma::fill_fragment(acc, 0.f);
  constexpr bool a_rows = std::is_same_v<LA, wmma::row_major>;
  constexpr bool b_rows = std::is_same_v<LB, wmma::row_major>;
  for (int p = 0; p < k; p += WK) {
    wmma::load_matrix_sync(fa, a_rows ? a + tile_m * k + p : a + p * m + tile_m, a_rows ? k : m);
    wmma::load_matrix_sync(fb, b_rows ? b + p * n + tile_n : b + tile_n * k + p, b_rows ? n : k);
    if constexpr (std::is_same_v<T, wmma::precision::tf32>) {
      for (auto& v : fa.x) v = wmma::__float_to_tf32(v);  // element-wise: layout-free
      for (auto& v : fb.x) v = wmma::__float_to_tf32(v);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= alpha;  // element-wise: layout-free
  if (kAssumeLayout) {
    for (int i = 0; i < acc.num_elements; ++i) acc.x[i] += bias[tile_n + (lane * 8 + i) % WM];
    wmma::store_matrix_sync(c + tile_m * n + tile_n, acc, n, wmma::mem_row_major);
  } else {
    // The bias through memory: C tile = bias rows, loaded as the starting accumulator.
    wmma::fragment<wmma::accumulator, WM, WM, WK, float> out;
    wmma::store_matrix_sync(c + tile_m * n + tile_n, acc, n, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < WM * WM; i += 32)
      c[(tile_m + i / WM) * n + tile_n + i % WM] += bias[tile_n + i % WM];
    __syncwarp();
    wmma::load_matrix_sync(out, c + tile_m * n + tile_n, n, wmma::mem_row_major);
    wmma::store_matrix_sync(c + tile_m * n + tile_n, out, n, wmma::mem_row_major);
  }
}

// nvcc's sm_80 fragment sizes (crt/mma.h), which kernels may rely on.
static_assert(wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>::num_elements ==
              16);
static_assert(
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>::num_elements == 8);
static_assert(wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32,
                             wmma::row_major>::num_elements == 4);
static_assert(wmma::fragment<wmma::accumulator, 16, 16, 16, float>::num_elements == 8);

// Misuse the emulator must refuse. `bug`: 0 ldm not a multiple of 8, 1 pointer 16 bytes off a
// 32-byte boundary, 2 a pointer that differs between lanes, 3 lane 7 skips mma_sync, 4 a warp
// of 16 threads.
__global__ void wmma_misuse_kernel(const __half* a, const __half* b, float* c, int bug) {
  const int lane = threadIdx.x % 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  const unsigned ldm = bug == 0 ? 20 : 32;
  const __half* pa = bug == 1 ? a + 8 : bug == 2 ? a + (lane % 2) * 16 : a;
  wmma::load_matrix_sync(fa, pa, ldm);
  wmma::load_matrix_sync(fb, b, 32);
  if (!(bug == 3 && lane == 7)) wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// TF32 rounding, exactly: c1 = A * Bsel and c2 = Asel * B, where the selectors hold one 1 per
// output (Asel[i][p] = Bsel[p][i] = [p == i % 8]), so every output is one operand value times 1.
// kConvert: the operands pass through __float_to_tf32 (round to nearest, ties away from zero);
// otherwise the tensor core reads them as they are and drops their low 13 mantissa bits.
template <bool kConvert>
__global__ void wmma_tf32_rounding_kernel(const float* a, const float* asel, const float* b,
                                          const float* bsel, float* c1, float* c2) {
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa, fs;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb, ft;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::load_matrix_sync(fa, a, 8);
  wmma::load_matrix_sync(fs, asel, 8);
  wmma::load_matrix_sync(fb, b, 8);
  wmma::load_matrix_sync(ft, bsel, 8);
  if (kConvert) {
    for (auto& v : fa.x) v = wmma::__float_to_tf32(v);
    for (auto& v : fb.x) v = wmma::__float_to_tf32(v);
  }
  wmma::fill_fragment(acc, 0.f);
  wmma::mma_sync(acc, fa, ft, acc);
  wmma::store_matrix_sync(c1, acc, 16, wmma::mem_row_major);
  wmma::fill_fragment(acc, 0.f);
  wmma::mma_sync(acc, fs, fb, acc);
  wmma::store_matrix_sync(c2, acc, 16, wmma::mem_row_major);
}

// ---- cp.async: two groups of 16-byte copies into shared memory ---------------------------------
// out = 2 * the block's 512 inputs, each half reversed, read from shared memory filled by
// cp.async in two groups (first half, second half). kBug: 0 correct (wait<1> before using the
// first half, wait<0> before the second), 1 no wait at all, 2 wait<1> only, so the second half
// is read while its group may be in flight, 3 a source 4 bytes off its 16-byte alignment.
template <int kBug>
__global__ void async_copy_kernel(const float* in, float* out) {
  __shared__ __align__(16) float s[512];
  const int t = threadIdx.x;
  const float* src = in + blockIdx.x * 512;
  float* dst = out + blockIdx.x * 512;
  cnnext::cp_async_16(&s[t * 4], src + t * 4 + (kBug == 3 ? 1 : 0));
  cnnext::cp_async_commit();
  cnnext::cp_async_16(&s[256 + t * 4], src + 256 + t * 4);
  cnnext::cp_async_commit();
  if (kBug != 1) cnnext::cp_async_wait<1>();
  __syncthreads();
  for (int j = 0; j < 4; ++j) dst[t * 4 + j] = 2.f * s[255 - (t * 4 + j)];
  if (kBug == 0) cnnext::cp_async_wait<0>();
  __syncthreads();
  for (int j = 0; j < 4; ++j) dst[256 + t * 4 + j] = 2.f * s[256 + 255 - (t * 4 + j)];
}

// ---- out-of-bounds twins, for AddressSanitizer
// ---------------------------------------------------- In an anonymous namespace, as the op kernels
// are: GCC gives no ASan redzones to the static locals of a template with vague (COMDAT) linkage,
// and `__shared__` is a static local.
namespace {

template <bool kOverflow>
__global__ void scale_kernel(const float* in, float* out, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n + (kOverflow ? 1 : 0)) out[i] = 2.f * in[i];  // planted: reads in[n], writes out[n]
}

template <bool kOverflow>
__global__ void shared_shift_kernel(const float* in, float* out, int64_t n) {
  __shared__ float s[64];
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  s[threadIdx.x + (kOverflow ? 1 : 0)] = i < n ? in[i] : 0.f;  // planted: thread 63 writes s[64]
  __syncthreads();
  if (i < n) out[i] = s[(threadIdx.x + 1) % 64];
}

template <bool kOverflow>
__global__ void dynamic_shift_kernel(const float* in, float* out, int64_t n) {
  CNNEXT_DYNAMIC_SHARED(float, s);
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  s[threadIdx.x] = i < n ? in[i] : 0.f;
  __syncthreads();
  // planted: the last thread reads one past the blockDim.x floats of dynamic shared memory
  const unsigned j = kOverflow ? threadIdx.x + 1 : (threadIdx.x + 1) % blockDim.x;
  if (i < n) out[i] = s[j];
}

__global__ void local_array_kernel(const float* in, float* out, int64_t n, int64_t len) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t k = 0; k < len; ++k) acc[k] = i < n ? in[i] * k : 0.f;  // planted: len 5
  __syncthreads();  // the array lives on the fiber's stack across a switch
  if (i < n) out[i] = acc[0] + acc[1] + acc[2] + acc[3];
}

}  // namespace

// ---- cases
// ----------------------------------------------------------------------------------------
struct Wrong : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, double tol = 0) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(double(got[i]) - double(want[i])) <= tol)) {
      throw Wrong("element " + std::to_string(i) + ": got " + std::to_string(double(got[i])) +
                  ", want " + std::to_string(double(want[i])));
    }
  }
}

std::vector<float> random_floats(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

template <bool kBarrier>
void run_transpose() {
  const int h = 45, w = 67;
  auto in = random_floats(h * w, 1);
  std::vector<float> out(h * w, 0.f), want(h * w);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) want[x * h + y] = in[y * w + x];
  launch("transpose", transpose_kernel<kBarrier>,
         dim3((w + TILE - 1) / TILE, (h + TILE - 1) / TILE), dim3(TILE, ROWS), 0, in.data(),
         out.data(), h, w);
  expect_equal(out, want);
}

template <bool kSecond>
void run_matmul() {
  const int m = 37, n = 29, k = 53;
  auto a = random_floats(m * k, 2), b = random_floats(k * n, 3);
  std::vector<float> c(m * n, 0.f), want(m * n, 0.f);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float s = 0;
      for (int p = 0; p < k; ++p) s += a[i * k + p] * b[p * n + j];
      want[i * n + j] = s;
    }
  launch("matmul", matmul_kernel<kSecond>, dim3((n + MT - 1) / MT, (m + MT - 1) / MT), dim3(MT, MT),
         0, a.data(), b.data(), c.data(), m, n, k);
  expect_equal(c, want, 1e-4);
}

template <bool kGuardRefill>
void run_pipeline() {
  const int m = 37, n = 29, k = 83;
  auto a = random_floats(m * k, 12), b = random_floats(k * n, 13);
  std::vector<float> c(m * n, 0.f), want(m * n, 0.f);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float s = 0;
      for (int p = 0; p < k; ++p) s += a[i * k + p] * b[p * n + j];
      want[i * n + j] = s;
    }
  launch("pipeline", pipeline_kernel<kGuardRefill>, dim3((n + MT - 1) / MT, (m + MT - 1) / MT),
         dim3(MT, MT), 0, a.data(), b.data(), c.data(), m, n, k);
  expect_equal(c, want, 1e-4);
}

template <bool kBarrier>
void run_reduce() {
  const int n = 1000, threads = 256, blocks = (n + threads - 1) / threads;
  auto in = random_floats(n, 4);
  std::vector<float> out(blocks, 0.f), want(blocks, 0.f);
  for (int i = 0; i < n; ++i) want[i / threads] += in[i];
  launch("reduce", reduce_kernel<kBarrier>, dim3(blocks), dim3(threads), 0, in.data(), out.data(),
         n);
  expect_equal(out, want, 1e-4);
}

template <bool kAtomic>
void run_histogram() {
  const int n = 5000;
  std::mt19937 rng(5);
  std::vector<int> in(n), hist(BINS, 0), want(BINS, 0);
  for (auto& x : in) x = static_cast<int>(rng() % BINS);
  for (int x : in) want[x]++;
  launch("histogram", histogram_kernel<kAtomic>, dim3(4), dim3(128), 0, in.data(), hist.data(), n);
  expect_equal(hist, want);
}

template <bool kBarrier>
void run_stencil() {
  const int n = 700;
  auto in = random_floats(n, 6);
  std::vector<float> out(n, 0.f), want(n);
  for (int i = 0; i < n; ++i) want[i] = in[i] + (i > 0 ? in[i - 1] : 0.f);
  launch("stencil", stencil_kernel<kBarrier>, dim3((n + 255) / 256), dim3(256), 0, in.data(),
         out.data(), n);
  expect_equal(out, want, 1e-6);
}

void run_shuffle_modes() {
  for (int width : {32, 8}) {
    std::vector<int> out(64 * 5, 0), want(64 * 5);
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, seg = lane / width * width, pos = lane - seg;
      want[t * 5 + 0] = 100 + seg + 3 % width;
      want[t * 5 + 1] = 100 + (pos >= 2 ? lane - 2 : lane);
      want[t * 5 + 2] = 100 + (pos + 2 < width ? lane + 2 : lane);
      const int x = lane ^ 5;
      want[t * 5 + 3] = 100 + (x / width == lane / width ? x : lane);
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l) ballot |= (l % 3 == 0 ? 1u : 0u) << l;
      want[t * 5 + 4] = static_cast<int>(ballot);
    }
    launch("shuffle_modes", shuffle_modes_kernel, dim3(1), dim3(64), 0, out.data(), width);
    expect_equal(out, want);
  }
}

void run_dynamic_smem() {
  std::vector<float> out(64, 0.f);
  launch("dynamic_smem", dynamic_smem_kernel, dim3(2), dim3(64), 64 * sizeof(float), out.data());
  for (float v : out)
    if (!std::isnan(v)) throw Wrong("dynamic shared memory was not poisoned");
}

void run_early_exit() {
  std::vector<float> out(32, 0.f), want(32, 0.f);
  for (int i = 0; i < 16; ++i) want[i] = 2.f;
  launch("early_exit", early_exit_kernel, dim3(1), dim3(32), 0, out.data());
  expect_equal(out, want);
}

// Out-of-bounds twins: the correct kernel must pass; the planted one is for ASan to report (without
// ASan it may pass or give a wrong result).
template <bool kOverflow>
void run_scale() {
  const int64_t n = 1000;
  auto in = random_floats(n, 7);
  std::vector<float> out(n, 0.f), want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = 2.f * in[i];
  launch("scale", scale_kernel<kOverflow>, dim3(8), dim3(128), 0, in.data(), out.data(), n);
  expect_equal(out, want);
}

template <bool kOverflow>
void run_shared_shift() {
  const int64_t n = 300;
  auto in = random_floats(n, 8);
  std::vector<float> out(n, 0.f), want(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i / 64 * 64 + (i % 64 + 1) % 64;
    want[i] = j < n ? in[j] : 0.f;
  }
  launch("shared_shift", shared_shift_kernel<kOverflow>, dim3(5), dim3(64), 0, in.data(),
         out.data(), n);
  expect_equal(out, want);
}

template <bool kOverflow>
void run_dynamic_shift() {
  const int64_t n = 300;
  auto in = random_floats(n, 9);
  std::vector<float> out(n, 0.f), want(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i / 64 * 64 + (i % 64 + 1) % 64;
    want[i] = j < n ? in[j] : 0.f;
  }
  launch("dynamic_shift", dynamic_shift_kernel<kOverflow>, dim3(5), dim3(64), 64 * sizeof(float),
         in.data(), out.data(), n);
  expect_equal(out, want);
}

template <bool kOverflow>
void run_local_array() {
  const int64_t n = 200;
  auto in = random_floats(n, 10);
  std::vector<float> out(n, 0.f), want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = in[i] * 6.f;
  launch("local_array", local_array_kernel, dim3(2), dim3(128), 0, in.data(), out.data(), n,
         int64_t(kOverflow ? 5 : 4));
  expect_equal(out, want, 1e-5);
}

template <class T>
T to_storage(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(v);
  }
}

// Rounds to tf32 as the hardware's cvt.rna does (nearest, ties away from zero), written apart
// from the emulator's __float_to_tf32: keep the top 19 bits after adding half of the dropped ones.
float tf32_reference(float v) {
  const double scale = std::ldexp(1.0, std::ilogb(v) - 10);  // one unit in the last tf32 place
  return static_cast<float>(std::copysign(std::floor(std::fabs(v) / scale + 0.5) * scale, v));
}

// Inputs of magnitude 0.25 .. 2 with few mantissa bits (exact in half and bfloat16); tf32 gets
// full floats, rounded by the kernel.
template <class T, int WK, class LA, class LB, bool kAssumeLayout>
void run_wmma_gemm() {
  using SA = typename wmma::fragment<wmma::matrix_a, WM, WM, WK, T, LA>::storage_element_type;
  using SB = typename wmma::fragment<wmma::matrix_b, WM, WM, WK, T, LB>::storage_element_type;
  constexpr bool tf32 = std::is_same_v<T, wmma::precision::tf32>;
  const int m = 48, n = 80, k = 64;  // n: 5 warp tiles, so one block has an idle warp
  std::mt19937 rng(14);
  auto draw = [&] {
    if (tf32) return std::uniform_real_distribution<float>(-2.f, 2.f)(rng);
    return static_cast<float>(static_cast<int>(rng() % 17) - 8) / 4.f;
  };
  std::vector<float> af(m * k), bf(k * n), bias(n);
  for (auto& v : af) v = draw();
  for (auto& v : bf) v = draw();
  for (auto& v : bias) v = static_cast<float>(rng() % 7);
  constexpr bool a_rows = std::is_same_v<LA, wmma::row_major>;
  constexpr bool b_rows = std::is_same_v<LB, wmma::row_major>;
  // 32-byte aligned storage; a col_major operand is stored transposed.
  std::vector<SA, std::allocator<SA>> a(m * k + 64);
  std::vector<SB> b(k * n + 64);
  auto* pa = reinterpret_cast<SA*>((reinterpret_cast<std::uintptr_t>(a.data()) + 31) &
                                   ~std::uintptr_t(31));
  auto* pb = reinterpret_cast<SB*>((reinterpret_cast<std::uintptr_t>(b.data()) + 31) &
                                   ~std::uintptr_t(31));
  for (int i = 0; i < m; ++i)
    for (int p = 0; p < k; ++p) pa[a_rows ? i * k + p : p * m + i] = to_storage<SA>(af[i * k + p]);
  for (int p = 0; p < k; ++p)
    for (int j = 0; j < n; ++j) pb[b_rows ? p * n + j : j * k + p] = to_storage<SB>(bf[p * n + j]);
  const float alpha = 0.5f;
  std::vector<float> cbuf(m * n + 8, -1.f), want(m * n);
  float* c = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(cbuf.data()) + 31) &
                                      ~std::uintptr_t(31));
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int p = 0; p < k; ++p) {
        const float x = tf32 ? tf32_reference(af[i * k + p]) : af[i * k + p];
        const float y = tf32 ? tf32_reference(bf[p * n + j]) : bf[p * n + j];
        s += double(x) * double(y);
      }
      want[i * n + j] = static_cast<float>(alpha * s + bias[j]);
    }
  launch("wmma_gemm", wmma_gemm_kernel<T, WK, LA, LB, kAssumeLayout>,
         dim3((n / WM + 1) / 2, m / WM), dim3(64), 0, static_cast<const SA*>(pa),
         static_cast<const SB*>(pb), bias.data(), c, m, n, k, alpha);
  expect_equal(std::vector<float>(c, c + m * n), want, tf32 ? 1e-3 : 0);
}

void run_wmma_misuse(int bug) {
  alignas(32) static __half a[16 * 64], b[16 * 32];
  alignas(32) static float c[16 * 16];
  for (auto& v : a) v = __float2half(1.f);
  for (auto& v : b) v = __float2half(1.f);
  launch("wmma_misuse", wmma_misuse_kernel, dim3(1), dim3(bug == 4 ? 16 : 32), 0,
         static_cast<const __half*>(a), static_cast<const __half*>(b), c, bug);
  for (float v : c)
    if (v != 16.f) throw Wrong("wmma misuse kernel: got " + std::to_string(v));
}

// Drops the low 13 mantissa bits (toward zero), written apart from the emulator.
float tf32_truncated(float v) {
  const double scale = std::ldexp(1.0, std::ilogb(v) - 10);
  return static_cast<float>(std::copysign(std::floor(std::fabs(v) / scale) * scale, v));
}

// 128 values for each operand: ties between two tf32 values (1 + 2^-11 rounds away from zero, to
// odd, where round-to-nearest-even would keep 1), neighbours of ties, values whose dropped bits
// are all set, and random floats of several magnitudes.
void run_wmma_tf32_rounding() {
  std::vector<float> vals;
  const float tie = 1.f + std::ldexp(1.f, -11), ulp = std::ldexp(1.f, -23);
  for (float base : {1.f, 1.5f, 3.f, 1e-3f, 7e5f}) {
    vals.push_back(base * tie);
    vals.push_back(-base * tie);
    vals.push_back(base * (tie - ulp));
    vals.push_back(-base * (tie + ulp));
    vals.push_back(std::nextafter(base * (1.f + std::ldexp(1.f, -10)), 0.f));  // low bits all set
  }
  std::mt19937 rng(23);
  while (vals.size() < 256) {
    const float mag = std::ldexp(1.f, static_cast<int>(rng() % 40) - 20);
    const float v = std::uniform_real_distribution<float>(-1.f, 1.f)(rng) * mag;
    if (v != 0.f) vals.push_back(v);
  }
  alignas(32) static float a[16 * 8], asel[16 * 8], b[16 * 8], bsel[16 * 8];
  alignas(32) static float c1[16 * 16], c2[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int p = 0; p < 8; ++p) {
      a[i * 8 + p] = vals[i * 8 + p];  // row-major A [16][8]
      asel[i * 8 + p] = p == i % 8 ? 1.f : 0.f;
      b[i * 8 + p] = vals[128 + i * 8 + p];  // col-major B [8][16]: column i at b + 8 i
      bsel[i * 8 + p] = p == i % 8 ? 1.f : 0.f;
    }
  for (bool convert : {true, false}) {
    launch("wmma_tf32_rounding",
           convert ? wmma_tf32_rounding_kernel<true> : wmma_tf32_rounding_kernel<false>, dim3(1),
           dim3(32), 0, static_cast<const float*>(a), static_cast<const float*>(asel),
           static_cast<const float*>(b), static_cast<const float*>(bsel), c1, c2);
    std::vector<float> want1(256), want2(256);
    auto round = convert ? tf32_reference : tf32_truncated;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        want1[i * 16 + j] = round(a[i * 8 + j % 8]);
        want2[i * 16 + j] = round(b[j * 8 + i % 8]);
      }
    expect_equal(std::vector<float>(c1, c1 + 256), want1);
    expect_equal(std::vector<float>(c2, c2 + 256), want2);
  }
}

template <int kBug>
void run_async_copy() {
  const int blocks = 3;
  std::vector<float> in(blocks * 512 + 4), out(blocks * 512, 0.f), want(blocks * 512);
  float* src = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(in.data()) + 15) &
                                        ~std::uintptr_t(15));
  for (int i = 0; i < blocks * 512; ++i) src[i] = static_cast<float>(i + 1);
  for (int b = 0; b < blocks; ++b)
    for (int i = 0; i < 512; ++i) {
      const int half = i / 256 * 256;
      want[b * 512 + i] = 2.f * src[b * 512 + half + 255 - (i - half)];
    }
  launch("async_copy", async_copy_kernel<kBug>, dim3(blocks), dim3(64), 0,
         static_cast<const float*>(src), out.data());
  expect_equal(out, want);
}

// A launch that fails while threads wait at barriers, then correct launches on the same OS
// thread: the waiting threads must unwind cleanly (TSan: no fiber ends inside an ignore region,
// no race with the reused stacks or with freed memory; ASan: no stale stack poison).
void run_error_then_launch() {
  for (int rep = 0; rep < 2; ++rep) {
    std::vector<float> out(64);
    try {
      launch("divergent_barrier", divergent_barrier_kernel, dim3(1), dim3(64), 0, out.data());
      throw Wrong("the divergent barrier was not reported");
    } catch (const Wrong&) {
      throw;
    } catch (const std::exception&) {
    }
    run_local_array<false>();
    run_stencil<true>();
    run_reduce<true>();
  }
}

void run_divergent_barrier() {
  std::vector<float> out(64);
  launch("divergent_barrier", divergent_barrier_kernel, dim3(1), dim3(64), 0, out.data());
}

void run_deadlock() {
  std::vector<float> out(32);
  launch("deadlock", deadlock_kernel, dim3(1), dim3(32), 0, out.data());
}

void run_too_many_threads() {
  std::vector<float> out(2048);
  launch("early_exit", early_exit_kernel, dim3(1), dim3(2048), 0, out.data());
}

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> cases = {
      {"transpose", run_transpose<true>},
      {"transpose_missing_barrier", run_transpose<false>},
      {"matmul", run_matmul<true>},
      {"matmul_missing_barrier", run_matmul<false>},
      {"pipeline", run_pipeline<true>},
      {"pipeline_missing_barrier", run_pipeline<false>},
      {"reduce", run_reduce<true>},
      {"reduce_missing_barrier", run_reduce<false>},
      {"histogram", run_histogram<true>},
      {"histogram_missing_atomic", run_histogram<false>},
      {"stencil", run_stencil<true>},
      {"stencil_missing_barrier", run_stencil<false>},
      {"shuffle_modes", run_shuffle_modes},
      {"dynamic_smem_poisoned", run_dynamic_smem},
      {"early_exit", run_early_exit},
      {"divergent_barrier", run_divergent_barrier},
      {"deadlock", run_deadlock},
      {"too_many_threads", run_too_many_threads},
      {"scale", run_scale<false>},
      {"scale_global_overflow", run_scale<true>},
      {"shared_shift", run_shared_shift<false>},
      {"shared_shift_overflow", run_shared_shift<true>},
      {"dynamic_shift", run_dynamic_shift<false>},
      {"dynamic_shift_overflow", run_dynamic_shift<true>},
      {"local_array", run_local_array<false>},
      {"local_array_overflow", run_local_array<true>},
      {"error_then_launch", run_error_then_launch},
      {"async_copy", run_async_copy<0>},
      {"async_copy_missing_wait", run_async_copy<1>},
      {"async_copy_lax_wait", run_async_copy<2>},
      {"async_copy_misaligned", run_async_copy<3>},
      {"wmma_half", run_wmma_gemm<__half, 16, wmma::row_major, wmma::col_major, false>},
      {"wmma_half_rr", run_wmma_gemm<__half, 16, wmma::row_major, wmma::row_major, false>},
      {"wmma_bf16", run_wmma_gemm<__nv_bfloat16, 16, wmma::col_major, wmma::row_major, false>},
      {"wmma_tf32",
       run_wmma_gemm<wmma::precision::tf32, 8, wmma::row_major, wmma::col_major, false>},
      {"wmma_tf32_rounding", run_wmma_tf32_rounding},
      {"wmma_assumes_layout", run_wmma_gemm<__half, 16, wmma::row_major, wmma::col_major, true>},
      {"wmma_bad_ldm", [] { run_wmma_misuse(0); }},
      {"wmma_misaligned", [] { run_wmma_misuse(1); }},
      {"wmma_divergent_pointer", [] { run_wmma_misuse(2); }},
      {"wmma_lane_skips_mma", [] { run_wmma_misuse(3); }},
      {"wmma_partial_warp", [] { run_wmma_misuse(4); }},
      {"wmma_ok", [] { run_wmma_misuse(5); }},
  };
  if (argc < 2 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: selftest CASE [SCHEDULE]; cases:");
    for (auto& [name, fn] : cases) std::fprintf(stderr, " %s", name.c_str());
    std::fprintf(stderr, "\n");
    return 3;
  }
  try {
    if (argc > 2) cnnext::emu::set_schedule(argv[2]);
    cases.at(argv[1])();
  } catch (const Wrong& e) {
    std::printf("WRONG %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::printf("ERROR %s\n", e.what());
    return 2;
  }
  std::printf("PASS\n");
  return 0;
}
