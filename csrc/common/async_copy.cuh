// Asynchronous global -> shared copies (cp.async, sm_80+), for multi-stage shared-memory
// pipelines:
//   cp_async_16(dst_smem, src_global);  // queue a 16-byte copy (both 16-byte aligned)
//   cp_async_commit();                  // close the group of copies queued since the last commit
//   cp_async_wait<N>();                 // wait until at most N committed groups are in flight
// A wait covers only the calling thread's copies: other threads see the data after a
// __syncthreads() that follows their writers' waits. Under the emulator a copy lands only when
// a wait completes its group, so a missing or too-lax wait reads stale shared memory.
#pragma once

#include <cstring>

#ifdef CNNEXT_CUDA_EMULATION
#include "emu/emu.h"
#endif

namespace cnnext {

#ifdef CNNEXT_CUDA_EMULATION

inline void cp_async_16(void* dst_smem, const void* src_global, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  emu::async_copy(dst_smem, src_global, 16, file, line);
}
inline void cp_async_commit() { emu::async_commit(); }
template <int N>
void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait: N counts groups left in flight");
  emu::AsyncCopy c;
  // The copies run here, in kernel code, so that ASan and TSan check them as the thread's own.
  while (emu::async_pop(N, &c)) std::memcpy(c.dst, c.src, c.bytes);
}

#else

__device__ __forceinline__ void cp_async_16(void* dst_smem, const void* src_global) {
#if __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src_global));
#else
  // No cp.async before sm_80: a plain 16-byte copy, complete before any wait.
  *static_cast<uint4*>(dst_smem) = *static_cast<const uint4*>(src_global);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait: N counts groups left in flight");
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

#endif

}  // namespace cnnext
