// The CPU kernels' vector helpers. VecAvx512 / VecAvx2: float vectors of one register for the
// hand-blocked kernels, one struct per ISA with the same members, so a kernel template is
// written once and instantiated per ISA; each member carries its ISA's target attribute and is
// always inlined into a caller of that target. vec::Lanes: GCC vector types of any element type
// (with lane masks and index lanes), for kernels compiled once per vector width.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cpu_target.h"

#if defined(__GNUC__)
namespace cnnext::vec {

// One vector register of lanes as a GCC vector: kBytes = 32 in the AVX2 copy of a kernel, 16
// (SSE2, NEON) in its baseline copy (pool2d's kernels). The hot loops are written with these
// explicitly because GCC's auto-vectoriser left them scalar in some inlined copies. A comparison
// yields lane masks as wide as the values, so argmax lanes are int32 for float (planes under 2^31
// elements) and int64 for double. (GCC lowers compares of vectors wider than the ISA's registers to
// scalar code, hence one register per vector.)
template <typename T, int kBytes>
struct Lanes;
template <int kBytes>
struct Lanes<float, kBytes> {
  using scalar = float;
  static constexpr int64_t count = kBytes / sizeof(float);
  typedef float value __attribute__((vector_size(kBytes)));
  typedef int32_t index_scalar;
  typedef int32_t index __attribute__((vector_size(kBytes)));
  typedef int64_t wide_index __attribute__((vector_size(2 * kBytes)));
};
template <int kBytes>
struct Lanes<double, kBytes> {
  using scalar = double;
  static constexpr int64_t count = kBytes / sizeof(double);
  typedef double value __attribute__((vector_size(kBytes)));
  typedef int64_t index_scalar;
  typedef int64_t index __attribute__((vector_size(kBytes)));
  typedef int64_t wide_index __attribute__((vector_size(kBytes)));
};

// Unaligned vector load and store.
template <typename V, typename T>
inline void load(V* v, const T* p) {
  std::memcpy(v, p, sizeof *v);
}
template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// *dst = mask ? value : *dst, lane-wise.
template <typename M, typename T>
inline void blend(T* dst, const M& mask, const T& value) {
  *dst = (T)(((M)value & mask) | ((M)*dst & ~mask));
}

}  // namespace cnnext::vec
#endif

#ifdef CNNEXT_X86_COPIES
#include <immintrin.h>

namespace cnnext {

#define CNNEXT_VEC_AVX512 CNNEXT_TARGET_AVX512 inline __attribute__((always_inline))
#define CNNEXT_VEC_AVX2 CNNEXT_TARGET_AVX2 inline __attribute__((always_inline))

struct VecAvx512 {
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static CNNEXT_VEC_AVX512 Reg zero() { return _mm512_setzero_ps(); }
  static CNNEXT_VEC_AVX512 Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static CNNEXT_VEC_AVX512 void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  // A broadcast feeding an FMA becomes the FMA's embedded {1to16} memory operand.
  static CNNEXT_VEC_AVX512 Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static CNNEXT_VEC_AVX512 Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static CNNEXT_VEC_AVX512 Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
};

struct VecAvx2 {
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static CNNEXT_VEC_AVX2 Reg zero() { return _mm256_setzero_ps(); }
  static CNNEXT_VEC_AVX2 Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static CNNEXT_VEC_AVX2 void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static CNNEXT_VEC_AVX2 Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static CNNEXT_VEC_AVX2 Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static CNNEXT_VEC_AVX2 Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
};

}  // namespace cnnext
#endif
