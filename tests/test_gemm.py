"""The GEMM wrapper (csrc/common/gemm.cuh) against torch.matmul: cuBLAS under CUDA, the CPU
implementation of cuBLAS's column-major contract under the emulator. Row-major matrices are
passed as their transposes, as every caller does."""

from __future__ import annotations

import itertools

import pytest
import torch

from .reference import assert_close


def _col_major(x: torch.Tensor) -> torch.Tensor:
    """Storage of ``x`` (rows x cols) in column-major order: the transpose, made contiguous."""
    return x.transpose(-1, -2).contiguous()


def _ns(device: str):
    import cnnext

    return torch.ops.cnnext_emu if cnnext.emulating() else torch.ops.cnnext


@pytest.mark.parametrize("ta,tb", list(itertools.product("nt", "nt")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_matches_matmul(emu_or_cuda: str, ta: str, tb: str, dtype: torch.dtype) -> None:
    device = emu_or_cuda
    m, n, k, batch = 7, 13, 5, 3
    a = torch.randn(batch, m, k, dtype=dtype, device=device)  # logical op(A)
    b = torch.randn(batch, k, n, dtype=dtype, device=device)
    c = torch.randn(batch, m, n, dtype=dtype, device=device)
    # Column-major storage of A (m x k) is a.T; with transa='t' we store A^T (k x m) instead.
    a_store = _col_major(a) if ta == "n" else _col_major(a.transpose(1, 2))
    b_store = _col_major(b) if tb == "n" else _col_major(b.transpose(1, 2))
    lda = m if ta == "n" else k
    ldb = k if tb == "n" else n
    out = _ns(device)._gemm(
        a_store,
        b_store,
        _col_major(c),
        ta,
        tb,
        m,
        n,
        k,
        0.5,
        2.0,
        lda,
        ldb,
        m,
        m * k,
        k * n,
        m * n,
        batch,
    )
    expected = 0.5 * (a @ b) + 2.0 * c
    assert_close(out.transpose(1, 2), expected, scale=10)


def test_gemm_beta_zero_never_reads_c(emu_or_cuda: str) -> None:
    a = torch.randn(4, 3, device=emu_or_cuda)
    b = torch.randn(3, 5, device=emu_or_cuda)
    c = torch.full((5, 4), float("nan"), device=emu_or_cuda)
    out = _ns(emu_or_cuda)._gemm(
        _col_major(a), _col_major(b), c, "n", "n", 4, 5, 3, 1.0, 0.0, 4, 3, 4, 0, 0, 0, 1
    )
    assert_close(out.T, a @ b)


@pytest.mark.parametrize(
    "lda,ldb,ldc,match",
    [(3, 3, 4, "lda = 3 < 4"), (4, 2, 4, "ldb = 2 < 3"), (4, 3, 3, "ldc = 3 < 4")],
)
def test_gemm_rejects_invalid_leading_dimension(emu_or_cuda: str, lda, ldb, ldc, match) -> None:
    a = torch.randn(12, device=emu_or_cuda)
    b = torch.randn(15, device=emu_or_cuda)
    c = torch.zeros(20, device=emu_or_cuda)
    with pytest.raises(RuntimeError, match=f"CUBLAS_STATUS_INVALID_VALUE: {match}"):
        _ns(emu_or_cuda)._gemm(a, b, c, "n", "n", 4, 5, 3, 1.0, 0.0, lda, ldb, ldc, 0, 0, 0, 1)


def test_gemm_rejects_bad_transpose_flag(emu_or_cuda: str) -> None:
    a = torch.randn(12, device=emu_or_cuda)
    with pytest.raises(RuntimeError, match="transa/transb"):
        _ns(emu_or_cuda)._gemm(a, a, a, "x", "n", 2, 2, 2, 1.0, 0.0, 2, 2, 2, 0, 0, 0, 1)
