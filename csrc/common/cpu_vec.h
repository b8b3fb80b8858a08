// Float vectors of one register for the hand-blocked CPU kernels, one struct per ISA with the
// same members, so a kernel template is written once and instantiated per ISA. Each member
// carries its ISA's target attribute and is always inlined into a caller of that target.
#pragma once

#include "common/cpu_target.h"

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
