// The grain-size policy of the CPU kernels, and the index arithmetic they share.
#pragma once

#include <algorithm>
#include <cstdint>

namespace cnnext {

// The one grain-size policy of the CPU kernels: items per at::parallel_for task so that a task
// does at least ~2^17 multiply-adds, so that small problems run on the calling thread without
// opening a parallel region.
inline int64_t cpu_grain(int64_t work_per_item) {
  constexpr int64_t kTaskWork = int64_t(1) << 17;
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_item));
}

// The same for memory-bound passes (copies, comparisons, elementwise updates), whose work is
// counted in elements read or written: one costs about four multiply-adds, so a task moves at
// least ~2^15 elements.
inline int64_t cpu_grain_elements(int64_t elements_per_item) {
  constexpr int64_t kMultiplyAddsPerElement = 4;
  return cpu_grain(kMultiplyAddsPerElement * std::max<int64_t>(1, elements_per_item));
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }

// A row or plane stride that is an odd number of 64-byte lines: streams at a power-of-two stride
// would all fall into the same few L1 sets.
inline int64_t odd_lines(int64_t elems, int64_t elem_bytes) {
  const int64_t per_line = 64 / elem_bytes;
  return (div_up(elems, per_line) | 1) * per_line;
}

}  // namespace cnnext
