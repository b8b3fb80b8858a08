// Runtime ISA selection for the CPU kernels: one detection, one environment switch.
#pragma once

#include <cstdlib>
#include <string>

#include "common/checks.h"
#include "common/cpu_target.h"

namespace cnnext {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa detect_cpu_isa() {
#ifdef CNNEXT_X86_COPIES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

// CNNEXT_CPU_ISA = baseline | avx2 | avx512 caps the detected ISA, so tests run every copy of a
// kernel on one machine. Read on every call (tests change it between calls); `op` names the
// caller in the error.
inline CpuIsa cpu_isa(const char* op) {
  static const CpuIsa detected = detect_cpu_isa();
  const char* env = std::getenv("CNNEXT_CPU_ISA");
  if (env == nullptr || *env == '\0') return detected;
  const std::string want(env);
  CpuIsa cap = CpuIsa::kAvx512;
  if (want == "baseline") {
    cap = CpuIsa::kBaseline;
  } else if (want == "avx2") {
    cap = CpuIsa::kAvx2;
  } else {
    CNNEXT_CHECK(want == "avx512", op,
                 "expected CNNEXT_CPU_ISA to be 'baseline', 'avx2' or 'avx512', got '", want, "'");
  }
  return static_cast<int>(cap) < static_cast<int>(detected) ? cap : detected;
}

}  // namespace cnnext
