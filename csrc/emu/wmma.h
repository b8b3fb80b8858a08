// Tensor-core fragments (nvcuda::wmma) for the emulator, so that a wmma kernel is checked like
// any other: fragments of m16n16k16 half/bfloat16 and m16n16k8 tf32 with float accumulators.
//
// As on the GPU, load/store/mma are warp-collective (all 32 lanes meet at a warp barrier) and the
// mapping of matrix elements to (lane, x[i]) is unspecified: forward and reverse schedules use a
// fixed mapping, random:SEED a seed-dependent permutation, so code that indexes x[i] as if it knew
// the layout fails there, while element-wise code (scaling, conversions) keeps working.
// num_elements are nvcc's sm_80 values (crt/mma.h): half A/B 16 (each element held twice),
// bfloat16 A/B 8, tf32 A/B 4, float accumulator 8. mma_sync multiplies in fp32 the inputs as
// the fragment holds them (tf32: its low 13 mantissa bits dropped, as the tensor cores do) and
// accumulates in fp32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "emu/emu.h"

// The emulated kernels store half and bfloat16 as c10's types, which have CUDA's bit layout.
#ifndef __CUDA_FP16_TYPES_EXIST__
using __half = c10::Half;
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
#endif
#ifndef __CUDA_BF16_TYPES_EXIST__
using __nv_bfloat16 = c10::BFloat16;
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
#endif

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// Round to the nearest tf32 (10 mantissa bits), ties away from zero, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float in) {
  std::uint32_t bits;
  std::memcpy(&bits, &in, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;  // not inf/NaN
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

namespace detail {

// Per fragment: storage type, elements per lane, the matrix it holds (rows x cols), the element
// type in memory and an id for the layout table. Unsupported shapes have no traits.
template <class Use, int M, int N, int K, class T>
struct traits;
template <class Use, class T, int Count, int Rows, int Cols, class Mem, int Id>
struct traits_of {
  using storage = T;
  using mem = Mem;
  static constexpr int count = Count, rows = Rows, cols = Cols, id = Id;
};
template <>
struct traits<matrix_a, 16, 16, 16, __half> : traits_of<matrix_a, __half, 16, 16, 16, __half, 1> {};
template <>
struct traits<matrix_b, 16, 16, 16, __half> : traits_of<matrix_b, __half, 16, 16, 16, __half, 2> {};
template <>
struct traits<matrix_a, 16, 16, 16, __nv_bfloat16>
    : traits_of<matrix_a, __nv_bfloat16, 8, 16, 16, __nv_bfloat16, 3> {};
template <>
struct traits<matrix_b, 16, 16, 16, __nv_bfloat16>
    : traits_of<matrix_b, __nv_bfloat16, 8, 16, 16, __nv_bfloat16, 4> {};
template <>
struct traits<matrix_a, 16, 16, 8, precision::tf32>
    : traits_of<matrix_a, float, 4, 16, 8, float, 5> {};
template <>
struct traits<matrix_b, 16, 16, 8, precision::tf32>
    : traits_of<matrix_b, float, 4, 8, 16, float, 6> {};
template <>
struct traits<accumulator, 16, 16, 16, float> : traits_of<accumulator, float, 8, 16, 16, float, 7> {
};
template <>
struct traits<accumulator, 16, 16, 8, float> : traits_of<accumulator, float, 8, 16, 16, float, 8> {
};

template <class Layout>
constexpr int layout_id() {
  if constexpr (std::is_same_v<Layout, row_major>) return 1;
  if constexpr (std::is_same_v<Layout, col_major>) return 2;
  return 0;
}

// The layout table of this launch for one fragment type: entry lane * count + i is the
// (row-major) index of the matrix element that x[i] of that lane holds.
template <class Tr, class Layout>
const std::uint16_t* layout_table() {
  const std::uint32_t tag = static_cast<std::uint32_t>(Tr::id * 4 + layout_id<Layout>());
  return ::cnnext::emu::fragment_layout(tag, Tr::count, Tr::rows * Tr::cols);
}

inline unsigned lane_id() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32u;
}

// Meets the warp and checks CUDA's rules for a fragment load or store.
inline void check_memory_op(const char* op, const void* p, unsigned ldm, int layout,
                            unsigned elem_bytes, const char* file, int line) {
  struct Args {
    const void* p;
    unsigned ldm;
    int layout;
  };
  const Args mine{p, ldm, layout};
  Args all[32];
  ::cnnext::emu::warp_exchange(&mine, sizeof mine, all, op, file, line);
  const auto refuse = [&](const std::string& rule) {
    ::cnnext::emu::fail(std::string("cnnext emulator: kernel ") + ::cnnext::emu::kernel_name() +
                        ": " + op + " at " + file + ":" + std::to_string(line) + ": " + rule);
  };
  for (unsigned l = 0; l < 32; ++l) {
    if (all[l].p != p || all[l].ldm != ldm || all[l].layout != layout) {
      refuse("the pointer, ldm and layout must be the same in every lane of the warp (lane " +
             std::to_string(l) + " differs from lane " + std::to_string(lane_id()) + ")");
    }
  }
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    refuse("the pointer must be 256-bit (32-byte) aligned, it is " +
           std::to_string(reinterpret_cast<std::uintptr_t>(p) % 32) +
           " bytes past a 32-byte boundary");
  }
  if (ldm % (16 / elem_bytes) != 0) {
    refuse("ldm must be a multiple of " + std::to_string(16 / elem_bytes) +
           " elements (16 bytes) for " + std::to_string(elem_bytes * 8) +
           "-bit elements, got ldm = " + std::to_string(ldm));
  }
}

template <class T>
float to_float(T v) {
  return static_cast<float>(v);
}
// tf32 operands: the tensor cores read only the top 19 bits of the float (a NaN stays NaN).
inline float tf32_operand(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if (v == v) bits &= ~0x1fffu;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  using traits = detail::traits<Use, M, N, K, T>;
  static_assert(std::is_same_v<Use, accumulator> == std::is_void_v<Layout>,
                "wmma::fragment: matrix_a/matrix_b need row_major or col_major; an accumulator "
                "takes no layout");

 public:
  using element_type = T;
  using storage_element_type = typename traits::storage;
  static constexpr int num_elements = traits::count;
  static constexpr int num_storage_elements = traits::count;
  storage_element_type x[traits::count];
};

template <class Use, int M, int N, int K, class T, class Layout, class V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  using S = typename fragment<Use, M, N, K, T, Layout>::storage_element_type;
  for (auto& e : f.x) e = static_cast<S>(v);
}

template <class Use, int M, int N, int K, class T, class Layout>
std::enable_if_t<!std::is_same_v<Use, accumulator>> load_matrix_sync(
    fragment<Use, M, N, K, T, Layout>& f, const typename detail::traits<Use, M, N, K, T>::mem* p,
    unsigned ldm, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using Tr = detail::traits<Use, M, N, K, T>;
  constexpr bool rows = std::is_same_v<Layout, row_major>;
  detail::check_memory_op("wmma::load_matrix_sync", p, ldm, rows ? 0 : 1, sizeof(*p), file, line);
  const std::uint16_t* map = detail::layout_table<Tr, Layout>() + detail::lane_id() * Tr::count;
  for (int i = 0; i < Tr::count; ++i) {
    const unsigned r = map[i] / Tr::cols, c = map[i] % Tr::cols;
    f.x[i] = p[rows ? r * ldm + c : c * ldm + r];
  }
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                      layout_t layout, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  using Tr = detail::traits<accumulator, M, N, K, T>;
  detail::check_memory_op("wmma::load_matrix_sync", p, ldm, layout, sizeof(T), file, line);
  const std::uint16_t* map = detail::layout_table<Tr, void>() + detail::lane_id() * Tr::count;
  for (int i = 0; i < Tr::count; ++i) {
    const unsigned r = map[i] / Tr::cols, c = map[i] % Tr::cols;
    f.x[i] = p[layout == mem_row_major ? r * ldm + c : c * ldm + r];
  }
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  using Tr = detail::traits<accumulator, M, N, K, T>;
  detail::check_memory_op("wmma::store_matrix_sync", p, ldm, layout, sizeof(T), file, line);
  const std::uint16_t* map = detail::layout_table<Tr, void>() + detail::lane_id() * Tr::count;
  for (int i = 0; i < Tr::count; ++i) {
    const unsigned r = map[i] / Tr::cols, c = map[i] % Tr::cols;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[i];
  }
}

// d = a b + c. Each lane hands its fragments to the warp; every lane rebuilds a, b and c and
// computes its own elements of d (d may be c).
template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  using TA = detail::traits<matrix_a, M, N, K, T>;
  using TB = detail::traits<matrix_b, M, N, K, T>;
  using TC = detail::traits<accumulator, M, N, K, float>;
  struct Pack {
    typename TA::storage a[TA::count];
    typename TB::storage b[TB::count];
    float c[TC::count];
  };
  Pack mine;
  std::memcpy(mine.a, a.x, sizeof mine.a);
  std::memcpy(mine.b, b.x, sizeof mine.b);
  std::memcpy(mine.c, c.x, sizeof mine.c);
  Pack all[32];
  ::cnnext::emu::warp_exchange(&mine, sizeof mine, all, "wmma::mma_sync", file, line);

  const std::uint16_t* map_a = detail::layout_table<TA, LA>();
  const std::uint16_t* map_b = detail::layout_table<TB, LB>();
  const std::uint16_t* map_c = detail::layout_table<TC, void>();
  float A[M * K], B[K * N], C[M * N];
  bool seen_a[M * K] = {}, seen_b[K * N] = {};
  // Half fragments hold each element twice; the first copy in lane order is the one used.
  for (unsigned l = 0; l < 32; ++l) {
    for (int i = 0; i < TA::count; ++i) {
      const unsigned e = map_a[l * TA::count + i];
      if (seen_a[e]) continue;
      seen_a[e] = true;
      const float v = detail::to_float(all[l].a[i]);
      A[e] = std::is_same_v<T, precision::tf32> ? detail::tf32_operand(v) : v;
    }
    for (int i = 0; i < TB::count; ++i) {
      const unsigned e = map_b[l * TB::count + i];
      if (seen_b[e]) continue;
      seen_b[e] = true;
      const float v = detail::to_float(all[l].b[i]);
      B[e] = std::is_same_v<T, precision::tf32> ? detail::tf32_operand(v) : v;
    }
    for (int i = 0; i < TC::count; ++i) C[map_c[l * TC::count + i]] = all[l].c[i];
  }
  const std::uint16_t* mine_c = map_c + detail::lane_id() * TC::count;
  for (int i = 0; i < TC::count; ++i) {
    const unsigned r = mine_c[i] / N, col = mine_c[i] % N;
    float sum = 0.f;
    for (int p = 0; p < K; ++p) sum += A[r * K + p] * B[p * N + col];
    d.x[i] = C[mine_c[i]] + sum;
  }
}

}  // namespace nvcuda::wmma
