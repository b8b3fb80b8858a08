"""Output-size formulas shared by the fake kernels and the Python wrappers (the C++ twin is
csrc/common/params.cpp). They accept SymInts so torch.compile can trace dynamic shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Int = Any  # int or torch.SymInt


def pair(value: int | Sequence[int], name: str = "argument", op: str = "cnnext") -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``; else a ValueError naming ``op`` and ``name``."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"{op}: expected {name} to be an int or a pair of ints, got {value}")
    return (value[0], value[1])


def conv_output_size(size: Int, kernel: int, stride: int, padding: int, dilation: int) -> Int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(
    size: Int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> Int:
    """PyTorch's rule: with ceil_mode the last window must start inside the input or its
    left padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out = out - 1
    return out
