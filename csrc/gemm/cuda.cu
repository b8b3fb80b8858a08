// Test hook for the GEMM wrapper (common/gemm.cuh): cuBLAS under nvcc, the CPU contract under
// the emulator. Kept as an op so tests hold both against torch.matmul and probe validation.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <string>

#include "common/checks.h"
#include "common/cuda_compat.cuh"
#include "common/gemm.cuh"

namespace cnnext {
namespace {

at::Tensor gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                     c10::string_view transa, c10::string_view transb, int64_t m, int64_t n,
                     int64_t k, double alpha, double beta, int64_t lda, int64_t ldb, int64_t ldc,
                     int64_t stride_a, int64_t stride_b, int64_t stride_c, int64_t batch) {
  const char* op = "_gemm";
  CNNEXT_CHECK(transa.size() == 1 && transb.size() == 1, op, "transa/transb must be one letter");
  check_floating(op, "a", a, true);
  check_same(op, "b", b, "a", a);
  check_same(op, "c", c, "a", a);
  CNNEXT_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(), op,
               "expected contiguous a, b and c");
  CNNEXT_DEVICE_GUARD(a);
  at::Tensor out = c.clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cnnext_gemm", [&] {
    using acc_t = cuda_acc_t<scalar_t>;
    gemm_strided_batched<scalar_t>(
        transa[0], transb[0], m, n, k, static_cast<acc_t>(alpha), a.const_data_ptr<scalar_t>(), lda,
        stride_a, b.const_data_ptr<scalar_t>(), ldb, stride_b, static_cast<acc_t>(beta),
        out.mutable_data_ptr<scalar_t>(), ldc, stride_c, batch);
  });
  return out;
}

}  // namespace
}  // namespace cnnext

CNNEXT_CUDA_IMPL(m) { m.impl("_gemm", &cnnext::gemm_cuda); }
