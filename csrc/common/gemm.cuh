// The one GEMM entry point of the CUDA kernels, with cuBLAS's column-major contract:
//   C[i + j*ldc] = alpha * sum_p op(A)[i, p] * op(B)[p, j] + beta * C[i + j*ldc]
// for each of `batch` matrices at strides stride_a/b/c. Under nvcc it calls cuBLAS on the
// current handle and stream; under the emulator it runs the same contract on the CPU, including
// cuBLAS's argument validation and its rule that C is never read when beta == 0.
// Row-major callers swap the operands: C^T = B^T A^T is the row-major product in column-major.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "common/cuda_compat.cuh"

#ifdef CNNEXT_CUDA_EMULATION
#include <ATen/Parallel.h>
#else
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#endif

namespace cnnext {

// Returns an empty string when the arguments are valid for cuBLAS, else what is wrong.
inline std::string gemm_argument_error(char transa, char transb, int64_t m, int64_t n, int64_t k,
                                       int64_t lda, int64_t ldb, int64_t ldc, int64_t batch) {
  auto is_op = [](char t) { return t == 'n' || t == 'N' || t == 't' || t == 'T'; };
  if (!is_op(transa) || !is_op(transb)) return "transa/transb must be one of 'n', 't'";
  if (m < 0 || n < 0 || k < 0 || batch < 0) return "m, n, k and batch must be non-negative";
  const bool ta = transa == 't' || transa == 'T', tb = transb == 't' || transb == 'T';
  const int64_t min_lda = std::max<int64_t>(1, ta ? k : m);
  const int64_t min_ldb = std::max<int64_t>(1, tb ? n : k);
  const int64_t min_ldc = std::max<int64_t>(1, m);
  if (lda < min_lda) return "lda = " + std::to_string(lda) + " < " + std::to_string(min_lda);
  if (ldb < min_ldb) return "ldb = " + std::to_string(ldb) + " < " + std::to_string(min_ldb);
  if (ldc < min_ldc) return "ldc = " + std::to_string(ldc) + " < " + std::to_string(min_ldc);
  const int64_t int_max = 2147483647;
  if (m > int_max || n > int_max || k > int_max || lda > int_max || ldb > int_max ||
      ldc > int_max || batch > int_max)
    return "a dimension or leading dimension does not fit cuBLAS's 32-bit int";
  return "";
}

#ifdef CNNEXT_CUDA_EMULATION

template <typename scalar_t>
void gemm_strided_batched(char transa, char transb, int64_t m, int64_t n, int64_t k,
                          cuda_acc_t<scalar_t> alpha, const scalar_t* a, int64_t lda,
                          int64_t stride_a, const scalar_t* b, int64_t ldb, int64_t stride_b,
                          cuda_acc_t<scalar_t> beta, scalar_t* c, int64_t ldc, int64_t stride_c,
                          int64_t batch) {
  using acc_t = cuda_acc_t<scalar_t>;
  const std::string error = gemm_argument_error(transa, transb, m, n, k, lda, ldb, ldc, batch);
  TORCH_CHECK(error.empty(), "cnnext gemm: CUBLAS_STATUS_INVALID_VALUE: ", error);
  emu::record_gemm(transa, transb, m, n, k, batch);  // a valid call, even an empty one
  if (m == 0 || n == 0 || batch == 0) return;
  const bool ta = transa == 't' || transa == 'T', tb = transb == 't' || transb == 'T';
  // Element (i, p) of op(A) and (p, j) of op(B), in column-major storage.
  const int64_t a_i = ta ? lda : 1, a_p = ta ? 1 : lda;
  const int64_t b_p = tb ? ldb : 1, b_j = tb ? 1 : ldb;
  at::parallel_for(0, batch * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bi = idx / n, j = idx % n;
      const scalar_t* A = a + bi * stride_a;
      const scalar_t* B = b + bi * stride_b + j * b_j;
      scalar_t* C = c + bi * stride_c + j * ldc;
      for (int64_t i = 0; i < m; ++i) {
        acc_t sum = 0;
        for (int64_t p = 0; p < k; ++p) {
          sum += static_cast<acc_t>(A[i * a_i + p * a_p]) * static_cast<acc_t>(B[p * b_p]);
        }
        // cuBLAS: with beta == 0, C is output only (it may hold NaN or garbage).
        C[i] = static_cast<scalar_t>(beta == acc_t(0) ? alpha * sum
                                                      : alpha * sum + beta * acc_t(C[i]));
      }
    }
  });
}

#else

namespace detail {
inline cublasOperation_t cublas_op(char t) {
  return (t == 't' || t == 'T') ? CUBLAS_OP_T : CUBLAS_OP_N;
}
inline void check_cublas(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "cnnext gemm: ", what, " failed with ",
              cublasGetStatusString(status));
}
}  // namespace detail

template <typename scalar_t>
void gemm_strided_batched(char transa, char transb, int64_t m, int64_t n, int64_t k,
                          cuda_acc_t<scalar_t> alpha, const scalar_t* a, int64_t lda,
                          int64_t stride_a, const scalar_t* b, int64_t ldb, int64_t stride_b,
                          cuda_acc_t<scalar_t> beta, scalar_t* c, int64_t ldc, int64_t stride_c,
                          int64_t batch) {
  const std::string error = gemm_argument_error(transa, transb, m, n, k, lda, ldb, ldc, batch);
  TORCH_CHECK(error.empty(), "cnnext gemm: CUBLAS_STATUS_INVALID_VALUE: ", error);
  if (m == 0 || n == 0 || batch == 0) return;
  // ATen's handle is already bound to the current stream.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const auto opa = detail::cublas_op(transa), opb = detail::cublas_op(transb);
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb),
            ildc = static_cast<int>(ldc), ibatch = static_cast<int>(batch);
  if constexpr (std::is_same_v<scalar_t, double>) {
    detail::check_cublas(
        cublasDgemmStridedBatched(handle, opa, opb, im, in, ik, &alpha, a, ilda, stride_a, b, ildb,
                                  stride_b, &beta, c, ildc, stride_c, ibatch),
        "cublasDgemmStridedBatched");
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    // fp32 follows torch's matmul TF32 switch as torch's own matmuls read it: allowTF32CuBLAS()
    // throws once the legacy allow_tf32 and the new fp32_precision APIs were both used.
    const bool tf32 =
        !at::NoTF32Guard::should_disable_tf32() &&
        at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
            at::Float32Precision::TF32;
    detail::check_cublas(
        cublasSetMathMode(handle, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
        "cublasSetMathMode");
    detail::check_cublas(
        cublasSgemmStridedBatched(handle, opa, opb, im, in, ik, &alpha, a, ilda, stride_a, b, ildb,
                                  stride_b, &beta, c, ildc, stride_c, ibatch),
        "cublasSgemmStridedBatched");
  } else {
    // half / bfloat16 storage with fp32 accumulation.
    const cudaDataType_t type = std::is_same_v<scalar_t, at::Half> ? CUDA_R_16F : CUDA_R_16BF;
    const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
    detail::check_cublas(
        cublasGemmStridedBatchedEx(handle, opa, opb, im, in, ik, &alpha_f, a, type, ilda, stride_a,
                                   b, type, ildb, stride_b, &beta_f, c, type, ildc, stride_c,
                                   ibatch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx");
  }
}

#endif

template <typename scalar_t>
void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, cuda_acc_t<scalar_t> alpha,
          const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, cuda_acc_t<scalar_t> beta,
          scalar_t* c, int64_t ldc) {
  gemm_strided_batched<scalar_t>(transa, transb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc,
                                 0, 1);
}

}  // namespace cnnext
