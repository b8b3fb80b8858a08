"""Output-size formulas shared by the fake kernels and the Python wrappers (the C++ twin is
csrc/common/params.cpp), and the empty outputs the fake kernels build from them. They accept
SymInts so torch.compile can trace dynamic shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._prims_common import suggest_memory_format

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


# ---- what the fake (shape-only) kernels return --------------------------------------------------


def memory_format(ref: torch.Tensor) -> torch.memory_format:
    """The memory format torch's ops give an output computed from ``ref`` (the C++ twin is
    ``Tensor::suggest_memory_format``): channels_last for channels_last 4D input."""
    if ref.dim() == 4 and suggest_memory_format(ref) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def empty_like_format(
    ref: torch.Tensor, sizes: Sequence[object], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An empty tensor of ``sizes`` in ``ref``'s memory format."""
    fmt = memory_format(ref) if len(sizes) == 4 else torch.contiguous_format
    return ref.new_empty(sizes, dtype=dtype).contiguous(memory_format=fmt)  # type: ignore[arg-type]


def pool_sizes(
    input: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: int | Sequence[int], ceil_mode: bool,
) -> tuple[Int, ...]:  # fmt: skip
    """A pooling op's output size (an empty ``stride`` means the kernel size)."""
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride) if len(stride) else (kh, kw)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    h_out = pool_output_size(input.shape[-2], kh, sh, ph, dh, ceil_mode)
    w_out = pool_output_size(input.shape[-1], kw, sw, pw, dw, ceil_mode)
    return (*input.shape[:-2], h_out, w_out)


def conv_sizes(
    input: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[Int, ...]:  # fmt: skip
    """A convolution's output size. The kernel size is the weight's last two dimensions, so a
    caller checking before the op (which refuses a weight that is not 4D) gets a size, not an
    IndexError."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    h_out = conv_output_size(input.shape[-2], weight.shape[-2], sh, ph, dh)
    w_out = conv_output_size(input.shape[-1], weight.shape[-1], sw, pw, dw)
    return (*input.shape[:-3], weight.shape[0], h_out, w_out)


def conv_backward_empty(
    grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A convolution backward's (grad_input, grad_weight, grad_bias); masked-off gradients are
    empty tensors of shape [0]."""
    grad_input = (
        empty_like_format(grad_output, input.shape) if output_mask[0] else input.new_empty(0)
    )
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0)
    return grad_input, grad_weight, grad_bias


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fused op's saved statistics' dtype: float for half / bfloat16 input, else the
    input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
