// Per-ISA copies of CPU code: the target attributes, in a header with no dependencies (the
// kernel microbenchmark compiles the microkernels without torch).
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CNNEXT_X86_COPIES 1
#define CNNEXT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define CNNEXT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
