// Large fresh CPU output buffers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cnnext {

// Writing a fresh buffer of many megabytes is mostly page faults: with 4 KiB pages the kernel
// maps and zeroes each page on its own, which costs more than max pooling's arithmetic (30 of
// 69 ms for ResNet's stem pool at batch 32). Transparent huge pages cut the faults 512-fold;
// with THP in "madvise" mode (the common default) a buffer gets them only when asked. Advisory:
// a failure or another OS changes nothing. torch asks the same for every allocation under
// THP_MEM_ALLOC_ENABLE=1.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  // The huge pages wholly inside the buffer: never advise memory it does not own.
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty for a CPU output the kernel writes whole, with huge pages when it is large.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace cnnext
