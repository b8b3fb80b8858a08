"""Where cnnext's ops get their derivatives.

The pooling and convolution families are differentiated by C++ ``torch::autograd::Function``s
(``csrc/autograd.cpp``) registered for the Autograd key of their forward ops, in both namespaces
(``torch.ops.cnnext`` and the emulator's ``torch.ops.cnnext_emu``): ``max_pool2d_with_argmax``,
``avg_pool2d``, ``conv2d_direct`` and ``conv2d_im2col``. Calling the forward op records the
autograd node; its backward calls the family's registered backward op, and a differentiable call
never re-enters Python. The fused op is still differentiated by ``ConvBNReLU2dFunction`` below.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _backend
from ._backend import lib

__all__ = ["ConvBNReLU2dFunction", "conv2d_forward"]


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
    """The forward op of ``algo`` (``"direct"`` or ``"im2col"``) in namespace ``ns``,
    differentiable through its registered autograd; ``conf`` is (stride, padding, dilation,
    groups), ``variant`` the direct CUDA kernel, ``max_col_bytes`` im2col's buffer bound."""
    if algo == "direct":
        return ns.conv2d_direct(input, weight, bias, *conf, variant)
    if algo == "im2col":
        return ns.conv2d_im2col(input, weight, bias, *conf, max_col_bytes)
    raise ValueError(f"cnnext.conv2d: algo must be 'direct' or 'im2col', got {algo!r}")


def _mark(ctx: Any, tensor: torch.Tensor) -> Any:
    """Remember on ``ctx`` which namespace served forward; return it."""
    ctx.emulated = _backend.use_emulator(tensor)
    return lib(ctx.emulated)


def _like_output(grad_output: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``grad_output`` with the forward output's strides (see ``like_output`` in
    csrc/autograd.cpp)."""
    if grad_output.stride() == stride:
        return grad_output
    return grad_output.new_empty_strided(grad_output.shape, stride).copy_(grad_output)


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
