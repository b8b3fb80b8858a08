"""Fake (shape-only) kernels for every registered op, in both namespaces, so torch.compile and
opcheck can trace the ops without running them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch._prims_common import suggest_memory_format

from . import _backend
from ._shapes import conv_output_size, pair, pool_output_size

F = TypeVar("F", bound=Callable[..., object])


def register_fake(name: str) -> Callable[[F], F]:
    """Register ``fn`` as the fake kernel of ``cnnext::name`` and ``cnnext_emu::name``."""

    def decorate(fn: F) -> F:
        torch.library.register_fake(f"cnnext::{name}")(fn)
        if _backend.EMULATOR_AVAILABLE:
            torch.library.register_fake(f"cnnext_emu::{name}")(fn)
        return fn

    return decorate


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


def _pool_sizes(input, kernel_size, stride, padding, dilation, ceil_mode):
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride) if len(stride) else (kh, kw)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    h_out = pool_output_size(input.shape[-2], kh, sh, ph, dh, ceil_mode)
    w_out = pool_output_size(input.shape[-1], kw, sw, pw, dw, ceil_mode)
    return (*input.shape[:-2], h_out, w_out)


def _conv_sizes(input, weight, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    h_out = conv_output_size(input.shape[-2], weight.shape[2], sh, ph, dh)
    w_out = conv_output_size(input.shape[-1], weight.shape[3], sw, pw, dw)
    return (*input.shape[:-3], weight.shape[0], h_out, w_out)


def _conv_backward_fake(grad_output, input, weight, output_mask):
    # Masked-off gradients come back as empty tensors of shape [0].
    grad_input = (
        empty_like_format(grad_output, input.shape) if output_mask[0] else input.new_empty(0)
    )
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0)
    return grad_input, grad_weight, grad_bias


# ---- test hooks ---------------------------------------------------------------------------------


@register_fake("_gemm")
def _gemm_fake(a, b, c, transa, transb, m, n, k, alpha, beta, lda, ldb, ldc, sa, sb, sc, batch):
    return torch.empty_like(c)


# ---- pooling ------------------------------------------------------------------------------------


@register_fake("max_pool2d_with_argmax")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    sizes = _pool_sizes(input, kernel_size, stride, padding, dilation, ceil_mode)
    return empty_like_format(input, sizes), empty_like_format(input, sizes, dtype=torch.int64)


@register_fake("max_pool2d_backward")
def _max_pool2d_backward_fake(
    grad_output, argmax, input_size, kernel_size, stride, padding, dilation, ceil_mode
):
    return empty_like_format(grad_output, input_size)


@register_fake("avg_pool2d")
def _avg_pool2d_fake(
    input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    return empty_like_format(input, _pool_sizes(input, kernel_size, stride, padding, 1, ceil_mode))


@register_fake("avg_pool2d_backward")
def _avg_pool2d_backward_fake(
    grad_output,
    input_size,
    kernel_size,
    stride,
    padding,
    ceil_mode,
    count_include_pad,
    divisor_override,
):
    return empty_like_format(grad_output, input_size)


# ---- direct convolution -------------------------------------------------------------------------


@register_fake("conv2d_direct")
def _conv2d_direct_fake(
    input, weight, bias, stride, padding, dilation, groups, variant, max_col_bytes=64 << 20
):
    return empty_like_format(input, _conv_sizes(input, weight, stride, padding, dilation))


@register_fake("conv2d_direct_backward")
def _conv2d_direct_backward_fake(
    grad_output,
    input,
    weight,
    stride,
    padding,
    dilation,
    groups,
    output_mask,
    variant="auto",
    max_col_bytes=64 << 20,
):
    return _conv_backward_fake(grad_output, input, weight, output_mask)


# ---- im2col convolution -------------------------------------------------------------------------


@register_fake("conv2d_im2col")
def _conv2d_im2col_fake(input, weight, bias, stride, padding, dilation, groups, max_col_bytes):
    return empty_like_format(input, _conv_sizes(input, weight, stride, padding, dilation))


@register_fake("conv2d_im2col_backward")
def _conv2d_im2col_backward_fake(
    grad_output, input, weight, stride, padding, dilation, groups, output_mask, max_col_bytes
):
    return _conv_backward_fake(grad_output, input, weight, output_mask)


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The saved statistics' dtype: float for half / bfloat16 input, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@register_fake("conv_bn_relu")
def _conv_bn_relu_fake(
    input,
    weight,
    conv_bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    stride,
    padding,
    dilation,
    groups,
    algo="auto",
    max_col_bytes=1 << 26,
):
    sizes = _conv_sizes(input, weight, stride, padding, dilation)
    channels = weight.shape[0]
    stats = _stats_dtype(input.dtype)
    output = empty_like_format(input, sizes)
    save_mean = input.new_empty(channels, dtype=stats)
    save_invstd = input.new_empty(channels, dtype=stats)
    if training:
        return (
            output,
            save_mean,
            save_invstd,
            input.new_empty(channels, dtype=stats),
            empty_like_format(input, sizes),
        )
    return output, save_mean, save_invstd, input.new_empty(0), input.new_empty(0)


@register_fake("conv_bn_relu_backward")
def _conv_bn_relu_backward_fake(
    grad_output,
    conv_output,
    input,
    weight,
    conv_bias,
    bn_weight,
    bn_bias,
    save_mean,
    save_invstd,
    training,
    stride,
    padding,
    dilation,
    groups,
    algo,
    max_col_bytes,
    output_mask,
):
    channels = weight.shape[0]

    def vector(want: bool) -> torch.Tensor:
        return grad_output.new_empty(channels if want else 0)

    # grad_input takes the layout the forward computed in: conv_output's (training), the
    # input's (eval).
    ref = conv_output if training else input
    grad_input = empty_like_format(ref, input.shape) if output_mask[0] else grad_output.new_empty(0)
    grad_weight = grad_output.new_empty(weight.shape if output_mask[1] else (0,))
    return (
        grad_input,
        grad_weight,
        vector(output_mask[2]),
        vector(output_mask[3]),
        vector(output_mask[4]),
    )
