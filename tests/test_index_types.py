"""Kernel index arithmetic is int64: tools/check_index_types.py finds no 32-bit index variables
in csrc/, and it does find planted ones."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import check_index_types  # noqa: E402


def test_no_32bit_indices_in_kernels() -> None:
    bad = check_index_types.findings(ROOT)
    assert not bad, "32-bit index variables (use int64_t):\n" + "\n".join(bad)


def test_checker_catches_planted_indices(tmp_path: Path) -> None:
    (tmp_path / "csrc" / "op").mkdir(parents=True)
    (tmp_path / "csrc" / "op" / "cuda.cu").write_text(
        "__global__ void k(float* y, int64_t n) {\n"
        "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  for (int j = 0; j < n; ++j) y[i] += j;\n"
        "  for (int64_t j = 0; j < n; ++j) y[j] = 0;\n"
        "  const int lane = threadIdx.x % 32;  // int-ok: lane in [0, 32)\n"
        "}\n"
    )
    bad = check_index_types.findings(tmp_path)
    assert [b.split(":")[1] for b in bad] == ["2", "3"], bad


def test_file_opt_out_needs_a_reason(tmp_path: Path) -> None:
    """A file opts out as a whole only with a stated reason."""
    (tmp_path / "csrc" / "op").mkdir(parents=True)
    body = "__global__ void k(float* y, int n) {\n  for (int j = 0; j < n; ++j) y[j] = 0;\n}\n"
    (tmp_path / "csrc" / "op" / "a.cuh").write_text("// int-ok-file: bounds checked\n" + body)
    (tmp_path / "csrc" / "op" / "b.cuh").write_text("// int-ok-file:\n" + body)
    bad = check_index_types.findings(tmp_path)
    assert [b.split(":")[0] for b in bad] == ["csrc/op/b.cuh"], bad
