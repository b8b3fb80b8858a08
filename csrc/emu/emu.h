// CUDA execution model on the CPU (see docs/design.md, "The CUDA emulator").
//
// A .cu file compiled by g++ with -DCNNEXT_CUDA_EMULATION sees this header instead of the CUDA
// runtime. Each CUDA thread of a block runs as a fiber; __syncthreads() and warp shuffles yield to
// the block's scheduler, which resumes the fibers in forward, reverse or random order. Blocks run
// one after another on the launching OS thread. This header needs no torch library, only c10's
// header-only Half and BFloat16, so that the emulator's self-tests build as a small standalone
// program (also under TSan/ASan).
#pragma once

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

// ---- CUDA built-in types and qualifiers -------------------------------------------------------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// As CUDA defines it for GCC: a GNU attribute may sit among the decl-specifiers, where kernels
// write it (`__shared__ __align__(16) float s[N];`), and alignas may not.
#define __align__(n) __attribute__((aligned(n)))
// A block runs to completion on one OS thread, so static storage per OS thread is exactly a
// block's shared memory. The sanitizer build makes it plain static storage so ASan sees overflows.
#ifdef CNNEXT_EMU_PLAIN_SHARED
#define __shared__ static
#else
#define __shared__ static thread_local
#endif

// Set by the scheduler before it resumes each emulated thread.
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace cnnext::emu {

// Runs `body` once per thread of every block of the grid. Throws std::runtime_error for an
// invalid launch (CUDA's limits), a barrier mismatch, a deadlock, or an error raised by a thread.
void launch(const char* kernel_name, dim3 grid, dim3 block, std::size_t dynamic_smem_bytes,
            void (*body)(void*), void* payload);

template <typename F>
void launch(const char* kernel_name, dim3 grid, dim3 block, std::size_t smem, F& body) {
  launch(kernel_name, grid, block, smem, [](void* p) { (*static_cast<F*>(p))(); }, &body);
}

// "forward", "reverse" or "random:SEED". Per OS thread; the initial value comes from the
// environment variable CNNEXT_EMU_SCHEDULE (default "forward").
void set_schedule(const std::string& schedule);
std::string get_schedule();
// Whether emulated float convolutions may use TF32 tensor cores (emulate_cuda(tf32=True), and
// then only where torch's own TF32 setting allows). Per OS thread, off by default.
void set_tf32(bool enabled);
bool tf32_enabled();
const char* fiber_backend();  // "boost.context" or "ucontext"

// Barrier and warp primitives (the public CUDA names are defined below).
void block_barrier(const char* file, int line);
void warp_barrier(unsigned mask, const char* file, int line);
// kind: 0 idx, 1 up, 2 down, 3 xor.
void warp_shuffle(unsigned mask, const void* in, void* out, std::size_t bytes, int kind, int arg,
                  int width, const char* file, int line);
// kind: 0 ballot (bit mask of lanes with pred), 1 any, 2 all.
unsigned warp_vote(unsigned mask, bool pred, int kind, const char* file, int line);
void* dynamic_shared();  // this block's dynamic shared memory, poisoned with 0xFF bytes
void fail(const std::string& message);  // raise from inside a kernel
const char* kernel_name();              // of the launch now running on this OS thread

// Warp-collective exchange (the wmma fragments use it): every lane of the calling warp, which
// must be a full warp of 32 threads, hands in `bytes` (at most 128) and receives all 32 lanes'
// bytes in lane order in `all`. `op` names the operation in errors.
void warp_exchange(const void* mine, std::size_t bytes, void* all, const char* op, const char* file,
                   int line);
// The fragment layout of the running launch for a fragment type `tag`: entry lane * per_lane + i
// is the matrix element (of `elements`) held in element i of that lane. Fixed for "forward" and
// "reverse", a permutation drawn from the seed for "random:SEED".
const std::uint16_t* fragment_layout(std::uint32_t tag, unsigned per_lane, unsigned elements);

// cp.async (see common/async_copy.cuh): per emulated thread, copies are queued, grouped by
// async_commit(), and handed out by async_pop() only once their group is older than the newest
// `keep` groups; the caller then performs them, in kernel code, so the sanitizers see them.
struct AsyncCopy {
  void* dst;
  const void* src;
  std::size_t bytes;
};
void async_copy(void* dst, const void* src, std::size_t bytes, const char* file, int line);
void async_commit();
bool async_pop(int keep, AsyncCopy* out);

// Launch recorder, per OS thread (a launch runs on the thread that makes it). While at least one
// recording is open, every launch and every emulated cuBLAS call is appended, in call order.
// record_start() returns a token; record_stop(token) closes that recording and those opened
// after it, and returns what was recorded since it opened, one record per line:
//   kernel\tNAME\tgx gy gz\tbx by bz\tSMEM        gemm\tgemm_strided_batched\tTA TB M N K BATCH
// record_peek(token) returns the same without closing. Nested recordings share the records: an
// outer one also sees what an inner one recorded.
std::int64_t record_start();
std::string record_stop(std::int64_t token);
std::string record_peek(std::int64_t token);
void record_gemm(char transa, char transb, std::int64_t m, std::int64_t n, std::int64_t k,
                 std::int64_t batch);

}  // namespace cnnext::emu

// ---- synchronisation ---------------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cnnext::emu::block_barrier(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  cnnext::emu::warp_barrier(mask, file, line);
}

template <typename T>
T cnnext_emu_shuffle(unsigned mask, T var, int kind, int arg, int width, const char* file,
                     int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a large type");
  T out;
  cnnext::emu::warp_shuffle(mask, &var, &out, sizeof(T), kind, arg, width, file, line);
  return out;
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cnnext_emu_shuffle(mask, var, 0, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cnnext_emu_shuffle(mask, var, 1, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cnnext_emu_shuffle(mask, var, 2, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cnnext_emu_shuffle(mask, var, 3, lane_mask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return cnnext::emu::warp_vote(mask, pred != 0, 0, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(cnnext::emu::warp_vote(mask, pred != 0, 1, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(cnnext::emu::warp_vote(mask, pred != 0, 2, file, line));
}

// ---- atomics: real atomics, because blocks may one day run on several OS threads and because
// ThreadSanitizer must see them as atomics (a plain += between fibers is reported as a race).
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;  // holds the old value whether or not the exchange happened
}
template <typename T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (value < old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

// ---- math intrinsics used by the kernels
// ---------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}

// ---- vector types and integer intrinsics of the implicit-GEMM kernels
// ---------------------------- 16-byte aligned like CUDA's, so a misaligned 128-bit access is as
// wrong here as on the GPU.
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
// Blocks of a launch run one after another on one OS thread: a fence orders nothing more, but
// TSan must see one where the GPU needs one.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Dynamic shared memory: `extern __shared__` has no C++ meaning, so kernels use this macro.
#define CNNEXT_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::cnnext::emu::dynamic_shared())

// Tensor-core fragments (nvcuda::wmma).
#include "emu/wmma.h"  // IWYU pragma: export
