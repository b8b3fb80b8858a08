"""One ``torch.autograd.Function`` per op family. ``forward`` calls the registered forward op and
``backward`` the registered backward op (flash-attention's pattern), choosing the namespace once
in forward (``cnnext`` or, under ``emulate_cuda()``, ``cnnext_emu``) and keeping it for
backward. Only what backward needs is saved."""

from __future__ import annotations

from typing import Any

import torch

from . import _backend
from ._backend import lib

__all__ = [
    "AvgPool2dFunction",
    "Conv2dFunction",
    "ConvBNReLU2dFunction",
    "MaxPool2dFunction",
]


def _mark(ctx: Any, tensor: torch.Tensor) -> Any:
    """Remember on ``ctx`` which namespace served forward; return it."""
    ctx.emulated = _backend.use_emulator(tensor)
    return lib(ctx.emulated)


# ---- pooling ------------------------------------------------------------------------------------


def _like_output(grad_output: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``grad_output`` with the forward output's strides. The backward ops give the gradient the
    layout of ``grad_output``, which autograd may hand over contiguous; the forward output's
    strides carry the input's layout, so the gradient takes it, as torch's does. (Comparing
    strides, not formats: ``.contiguous(memory_format)`` keeps ambiguous strides such as those
    of an ``[N, C, 1, 1]`` gradient.)"""
    if grad_output.stride() == stride:
        return grad_output
    return grad_output.new_empty_strided(grad_output.shape, stride).copy_(grad_output)


class MaxPool2dFunction(torch.autograd.Function):
    """Max pooling that returns the argmax (flat ``h * W + w`` index per plane) and scatters
    gradients back through it. Args are normalised pairs (see ``cnnext.ops.max_pool2d``)."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        input: torch.Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ns = _mark(ctx, input)
        output, argmax = ns.max_pool2d_with_argmax(
            input, kernel_size, stride, padding, dilation, ceil_mode
        )
        ctx.save_for_backward(argmax)
        ctx.input_size = tuple(input.shape)
        ctx.output_stride = output.stride()
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.mark_non_differentiable(argmax)
        return output, argmax

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _grad_argmax: Any) -> tuple[Any, ...]:  # noqa: D102
        (argmax,) = ctx.saved_tensors
        grad_output = _like_output(grad_output, ctx.output_stride)
        grad_input = lib(ctx.emulated).max_pool2d_backward(
            grad_output, argmax, ctx.input_size, *ctx.args
        )
        return grad_input, None, None, None, None, None


class AvgPool2dFunction(torch.autograd.Function):
    """Average pooling; backward spreads each output gradient over its window."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        input: torch.Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        ceil_mode: bool,
        count_include_pad: bool,
        divisor_override: int | None,
    ) -> torch.Tensor:
        ns = _mark(ctx, input)
        ctx.args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.input_size = tuple(input.shape)
        output = ns.avg_pool2d(input, *ctx.args)
        ctx.output_stride = output.stride()
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # noqa: D102
        grad_output = _like_output(grad_output, ctx.output_stride)
        grad_input = lib(ctx.emulated).avg_pool2d_backward(grad_output, ctx.input_size, *ctx.args)
        return grad_input, None, None, None, None, None, None


# ---- convolution (direct and im2col) ------------------------------------------------------------


def conv2d_forward(
    ns: Any,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conf: tuple,
    algo: str,
    variant: str,
    max_col_bytes: int,
) -> torch.Tensor:
    """The forward op of ``algo`` in namespace ``ns``; ``conf`` is (stride, padding, dilation,
    groups). Shared by ``Conv2dFunction`` and ``cnnext.ops.conv2d``'s no-gradient path."""
    if algo == "direct":
        return ns.conv2d_direct(input, weight, bias, *conf, variant)
    if algo == "im2col":
        return ns.conv2d_im2col(input, weight, bias, *conf, max_col_bytes)
    raise ValueError(f"cnnext.conv2d: algo must be 'direct' or 'im2col', got {algo!r}")


class Conv2dFunction(torch.autograd.Function):
    """2D convolution by ``algo`` = ``"direct"`` (``variant`` picks the CUDA kernels of forward
    and backward: ``"auto"``, ``"naive"`` or ``"tiled"``) or ``"im2col"`` (column buffer
    bounded by ``max_col_bytes``).

    Saves the input only if the weight needs a gradient and the weight only if the input does;
    ``ctx.needs_input_grad`` becomes the backward op's ``output_mask``. A tensor not saved is
    passed to the backward op as a one-element placeholder of the right shape (the op reads
    ``input`` only for ``output_mask[1]`` and ``weight`` only for ``output_mask[0]``).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        algo: str,
        variant: str,
        max_col_bytes: int,
    ) -> torch.Tensor:
        conf = (stride, padding, dilation, groups)
        output = conv2d_forward(
            _mark(ctx, input), input, weight, bias, conf, algo, variant, max_col_bytes
        )
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
        ctx.input_shape, ctx.weight_shape = input.shape, weight.shape
        ctx.has_bias = bias is not None
        ctx.conf = conf
        ctx.algo, ctx.variant, ctx.max_col_bytes = algo, variant, max_col_bytes
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # noqa: D102
        input, weight = ctx.saved_tensors
        if input is None:
            input = grad_output.new_zeros(()).expand(ctx.input_shape)
        if weight is None:
            weight = grad_output.new_zeros(()).expand(ctx.weight_shape)
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        ]
        ns = lib(ctx.emulated)
        if ctx.algo == "direct":
            grads = ns.conv2d_direct_backward(
                grad_output, input, weight, *ctx.conf, mask, ctx.variant
            )
        else:
            grads = ns.conv2d_im2col_backward(
                grad_output, input, weight, *ctx.conf, mask, ctx.max_col_bytes
            )
        grad_input, grad_weight, grad_bias = (
            g if m else None for g, m in zip(grads, mask, strict=True)
        )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------


class ConvBNReLU2dFunction(torch.autograd.Function):
    """``relu(batch_norm(conv2d(input, weight, conv_bias)))`` by one registered op pair.

    ``training=True`` normalises with the batch statistics and, when ``running_mean`` /
    ``running_var`` are given, updates them in place exactly as ``nn.BatchNorm2d`` does (the op
    itself is functional: it returns the batch mean and unbiased variance, and this Function
    writes the running buffers). ``training=False`` normalises with the running statistics
    (BatchNorm folded into the convolution). ``momentum`` is the update factor (the module
    resolves ``momentum=None`` to the cumulative average before calling).

    The output itself is not saved, so an inplace op on it (e.g. a following
    ``nn.ReLU(inplace=True)``) is harmless: training recomputes the ReLU mask from the saved
    convolution output and statistics, eval reads it from a private copy of the output (as much
    memory as eager's ReLU keeps; rerunning the folded convolution instead would cost a second
    forward). In training the input is saved only for the weight's gradient and the weight only
    for the input's (a tensor not saved reaches the backward op as a one-element placeholder of
    the right shape); eval saves both.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        conv_bias: torch.Tensor | None,
        bn_weight: torch.Tensor | None,
        bn_bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        algo: str,
        max_col_bytes: int,
    ) -> torch.Tensor:
        ns = _mark(ctx, input)
        output, save_mean, save_invstd, batch_var, conv_output = ns.conv_bn_relu(
            input,
            weight,
            conv_bias,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            training,
            eps,
            stride,
            padding,
            dilation,
            groups,
            algo,
            max_col_bytes,
        )
        if not training:
            # The ReLU mask's source for backward: a copy, unaffected by inplace ops on output.
            conv_output = output.clone()
        # An empty batch has no statistics: torch leaves the running ones as they are.
        empty_batch = input.dim() == 4 and input.shape[0] == 0
        if training and not empty_batch:
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(
                    save_mean.to(running_mean.dtype), alpha=momentum
                )
            if running_var is not None:
                running_var.mul_(1 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum)
        need = ctx.needs_input_grad
        ctx.save_for_backward(
            conv_output,
            save_mean,
            save_invstd,
            input if need[1] or not training else None,
            weight if need[0] or not training else None,
            conv_bias,
            bn_weight,
            bn_bias,
        )
        ctx.input_shape, ctx.weight_shape = input.shape, weight.shape
        ctx.has = (conv_bias is not None, bn_weight is not None, bn_bias is not None)
        ctx.training = training
        ctx.conf = (stride, padding, dilation, groups, algo, max_col_bytes)
        ctx.output_stride = output.stride()
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # noqa: D102
        conv_output, save_mean, save_invstd, input, weight, conv_bias, bn_weight, bn_bias = (
            ctx.saved_tensors
        )
        if input is None:
            input = grad_output.new_zeros(()).expand(ctx.input_shape)
        if weight is None:
            weight = grad_output.new_zeros(()).expand(ctx.weight_shape)
        need = ctx.needs_input_grad
        has_conv_bias, has_gamma, has_beta = ctx.has
        mask = [
            need[0],
            need[1],
            has_conv_bias and need[2],
            has_gamma and need[3],
            has_beta and need[4],
        ]
        grad_output = _like_output(grad_output, ctx.output_stride)
        grads = lib(ctx.emulated).conv_bn_relu_backward(
            grad_output,
            conv_output,
            input,
            weight,
            conv_bias,
            bn_weight,
            bn_bias,
            save_mean,
            save_invstd,
            ctx.training,
            *ctx.conf,
            mask,
        )
        return (
            *(g if m else None for g, m in zip(grads, mask, strict=True)),
            *([None] * 11),
        )
