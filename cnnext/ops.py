"""The functional API: ``cnnext.ops.conv2d``, ``max_pool2d``, ``avg_pool2d``, ``conv_bn_relu``.
Each is differentiable through its op's C++ autograd (see ``cnnext.autograd``)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Only Dynamo must not see the lean bindings (opaque to it; it folds this call to True). Other
# tracers pass fake or proxy tensors, which the bindings decline (exact tensors only), or see
# the op through the dispatcher; torch.compiler.is_compiling costs a second Python frame.
from torch.compiler import is_dynamo_compiling

from . import _algo, _backend
from ._shapes import (
    conv_backward_empty,
    conv_sizes,
    empty_like_format,
    pool_sizes,
    stats_dtype,
)
from .autograd import conv2d_forward

__all__ = [
    "OPS",
    "OpDef",
    "avg_pool2d",
    "conv2d",
    "conv_bn_relu",
    "get_im2col_workspace_limit",
    "max_pool2d",
    "set_im2col_workspace_limit",
]

ALGOS = ("direct", "im2col")
VARIANTS = (
    "auto",
    "implicit_gemm",
    "implicit_gemm_128x128",
    "implicit_gemm_64x64",
    "tiled",
    "naive",
)

# The im2col column buffer is built per chunk of the batch so that it stays under this many
# bytes (a whole-batch buffer of a ResNet layer at N=128 is ~300 MB). The schemas' default of
# max_col_bytes (csrc/cnnext.cpp) and the C++ kDefaultMaxColBytes are the same 64 MiB.
DEFAULT_WORKSPACE_LIMIT = 64 << 20
_im2col_workspace_limit = DEFAULT_WORKSPACE_LIMIT


def set_im2col_workspace_limit(num_bytes: int) -> None:
    """Bound the im2col column buffer (per call) to ``num_bytes``; at least one sample's
    columns are always built, whatever the limit."""
    global _im2col_workspace_limit
    if num_bytes <= 0:
        raise ValueError(f"cnnext: im2col workspace limit must be positive, got {num_bytes}")
    _im2col_workspace_limit = int(num_bytes)


def get_im2col_workspace_limit() -> int:
    """The current im2col column-buffer bound in bytes."""
    return _im2col_workspace_limit


IntPair = int | Sequence[int]
Tensor = torch.Tensor
Ints = Sequence[int]  # an int[2] / int[] schema argument


class ArgumentError(RuntimeError, ValueError):
    """A sequence argument of the wrong length. A RuntimeError, as torch.nn.functional raises
    for it, and a ValueError, as cnnext raised before."""


class RankError(RuntimeError, IndexError):
    """An input of too few dimensions for ``avg_pool2d``: torch's ``F.avg_pool2d`` raises an
    IndexError there (its RuntimeError for other ranks); cnnext's checks raise RuntimeErrors."""


def _int(value: object, name: str, op: str) -> int:
    """``value`` as an int, as torch's argument parser takes it (ints, 0-d integer tensors,
    numpy ints, SymInts; never bools or floats), else a TypeError."""
    if isinstance(value, torch.SymInt):
        return value  # type: ignore[return-value]
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(f"{op}: expected {name} to be an int, got {type(value).__name__}")


def _ints(value: object, name: str, op: str, allow_empty: bool = False) -> tuple[int, ...]:
    """An int or a sequence of ints as a tuple (one int: a 1-tuple), else a TypeError."""
    if isinstance(value, (list, tuple, torch.Size)):
        return tuple(_int(v, name, op) for v in value)
    return (_int(value, name, op),)


def _pair(value: object, name: str, op: str) -> tuple[int, int]:
    """torch.nn.functional's rule for a 2D argument: an int or a sequence of one or two ints.
    Other lengths raise ``ArgumentError``, other types TypeError."""
    # Fast paths for the common forms: a call's host cost matters on small layers.
    if type(value) is int:
        return (value, value)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is type(value[1]) is int:
        return value  # type: ignore[return-value]
    ints = _ints(value, name, op)
    if len(ints) not in (1, 2):
        raise ArgumentError(f"{op}: expected {name} to be an int or a pair of ints, got {value}")
    return (ints[0], ints[-1])


def _pool_stride(stride: object, kernel: tuple[int, int], op: str) -> tuple[int, int]:
    """Pooling's stride: None or an empty sequence means the kernel size."""
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        return kernel
    return _pair(stride, "stride", op)


def _bool(value: object, name: str, op: str) -> bool:
    """torch's pooling functions take only real bools for their flags (TypeError otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: expected {name} to be a bool, got {type(value).__name__}")
    return value


# ---- pooling ------------------------------------------------------------------------------------

# Each function first tries its op's lean binding (``_backend.fast_op``: a few microseconds less
# per call than torch.ops, which small layers feel) with the arguments as given; it declines
# (NotImplemented) anything but the plain forms, which then take the checked path below.
_max_pool2d = _backend.fast_op("max_pool2d_with_argmax")
_max_pool2d_output = _backend.fast_op("max_pool2d_with_argmax", outputs=1)  # argmax dropped
_avg_pool2d = _backend.fast_op("avg_pool2d", min_dim=3)  # rank < 3: RankError below


def max_pool2d(
    input: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Max pooling, as ``torch.nn.functional.max_pool2d``.

    Args:
        input: ``Tensor[N, C, H, W]`` or ``Tensor[C, H, W]``, contiguous or channels_last.
        kernel_size, stride (default: kernel_size), padding, dilation: ints or pairs.
        ceil_mode: round the output size up (the last window must start inside the input or
            its left padding).
        return_indices: also return the int64 argmax, the flat ``h * W + w`` index into each
            input plane (what ``F.max_unpool2d`` takes).

    Returns:
        ``Tensor[N, C, H_out, W_out]`` (in the input's memory format), and the argmax if asked.
    """
    if not is_dynamo_compiling():
        out = (_max_pool2d if return_indices else _max_pool2d_output)(
            input,
            kernel_size,
            kernel_size if stride is None else stride,
            padding,
            dilation,
            ceil_mode,
        )
        if out is not NotImplemented:
            return out
    op = "cnnext.max_pool2d"
    k = _pair(kernel_size, "kernel_size", op)
    args = (
        k,
        _pool_stride(stride, k, op),
        _pair(padding, "padding", op),
        _pair(dilation, "dilation", op),
    )
    ceil_mode = _bool(ceil_mode, "ceil_mode", op)
    ns = _backend.ops_for(input)  # differentiable by its C++ autograd (cnnext.autograd)
    output, argmax = ns.max_pool2d_with_argmax(input, *args, ceil_mode)
    return (output, argmax) if return_indices else output


def _max_pool2d_fake(
    input: Tensor,
    kernel_size: Ints,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    ceil_mode: bool,
) -> tuple[Tensor, Tensor]:
    sizes = pool_sizes(input, kernel_size, stride, padding, dilation, ceil_mode)
    return empty_like_format(input, sizes), empty_like_format(input, sizes, dtype=torch.int64)


def _max_pool2d_backward_fake(
    grad_output: Tensor,
    argmax: Tensor,
    input_size: Ints,
    kernel_size: Ints,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    ceil_mode: bool,
) -> Tensor:
    return empty_like_format(grad_output, input_size)


def avg_pool2d(
    input: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """Average pooling, as ``torch.nn.functional.avg_pool2d``.

    Args:
        input: ``Tensor[N, C, H, W]`` or ``Tensor[C, H, W]``, contiguous or channels_last.
        kernel_size, stride (default: kernel_size), padding: ints or pairs.
        ceil_mode: round the output size up.
        count_include_pad: count padded zeros in the divisor.
        divisor_override: divide by this instead of the window size.

    Returns:
        ``Tensor[N, C, H_out, W_out]`` in the input's memory format.
    """
    if not is_dynamo_compiling():
        out = _avg_pool2d(  # declines input of rank < 3 (min_dim), refused below
            input,
            kernel_size,
            kernel_size if stride is None else stride,
            padding,
            ceil_mode,
            count_include_pad,
            divisor_override,
        )
        if out is not NotImplemented:
            return out
    op = "cnnext.avg_pool2d"
    if input.dim() < 3:
        raise RankError(
            "cnnext::avg_pool2d: expected input to be a 3D or 4D tensor, got "
            f"{input.dim()}D with shape {list(input.shape)}"
        )
    k = _pair(kernel_size, "kernel_size", op)
    args = (k, _pool_stride(stride, k, op), _pair(padding, "padding", op))
    args += (_bool(ceil_mode, "ceil_mode", op),)
    count_include_pad = _bool(count_include_pad, "count_include_pad", op)
    if divisor_override is not None:
        divisor_override = _int(divisor_override, "divisor_override", op)
    ns = _backend.ops_for(input)  # differentiable by its C++ autograd (cnnext.autograd)
    return ns.avg_pool2d(input, *args, count_include_pad, divisor_override)


def _avg_pool2d_fake(
    input: Tensor,
    kernel_size: Ints,
    stride: Ints,
    padding: Ints,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Tensor:
    return empty_like_format(input, pool_sizes(input, kernel_size, stride, padding, 1, ceil_mode))


def _avg_pool2d_backward_fake(
    grad_output: Tensor,
    input_size: Ints,
    kernel_size: Ints,
    stride: Ints,
    padding: Ints,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Tensor:
    return empty_like_format(grad_output, input_size)


# ---- convolution (direct and im2col) ------------------------------------------------------------


def _conv_padding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding: str | IntPair,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    op: str,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(input, padding pair)`` for the op, with ``F.conv2d``'s rules for ``'valid'`` (no
    padding) and ``'same'`` (stride 1; a total of ``dilation * (k - 1)`` per axis, split evenly,
    an odd extra row/column going to the bottom/right, padded here with zeros as torch does)."""
    if not isinstance(padding, str):
        return input, _pair(padding, "padding", op)
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise RuntimeError(f"{op}: Invalid padding string: {padding!r} (expected same or valid)")
    if stride != (1, 1):
        raise RuntimeError(f"{op}: padding='same' is not supported for strided convolutions")
    if weight.dim() != 4:
        return input, (0, 0)  # the op refuses the weight, naming it
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[-2:], strict=True)]
    extra = [t % 2 for t in totals]
    if extra[0] or extra[1]:
        input = F.pad(input, [0, extra[1], 0, extra[0]])
    return input, (totals[0] // 2, totals[1] // 2)


CONV_ALGOS = ("auto", *ALGOS)
_conv2d_direct = _backend.fast_op("conv2d_direct")
_conv2d_im2col = _backend.fast_op("conv2d_im2col")


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: str | IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    algo: str = "auto",
    variant: str = "auto",
) -> torch.Tensor:
    """2D convolution (cross-correlation), as ``torch.nn.functional.conv2d``.

    Args:
        input: ``Tensor[N, C_in, H, W]`` or ``Tensor[C_in, H, W]``, contiguous or channels_last.
        weight: ``Tensor[C_out, C_in / groups, kH, kW]``.
        bias: optional ``Tensor[C_out]``.
        stride, dilation: ints or pairs.
        padding: an int or a pair (zero padding), or ``"valid"`` (none) or ``"same"`` (stride
            1; an odd total puts the extra row/column at the bottom/right, as torch).
        groups: number of channel groups (``groups == C_in`` is depthwise).
        algo: ``"auto"`` (``cnnext._algo.select``: the rule of ``cnnext._algo.choose``, or the
            autotuner when it is on), ``"direct"`` or ``"im2col"`` (im2col + GEMM: BLAS on CPU,
            cuBLAS on CUDA).
        variant: direct CUDA kernel: ``"auto"`` / ``"implicit_gemm"`` (the implicit-GEMM
            family; ``"implicit_gemm_128x128"`` or ``"implicit_gemm_64x64"`` force its block
            tile, ``"tiled"`` is its former name) or ``"naive"`` (one thread per output);
            ignored on CPU and by im2col.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, channels_last when the input is.
    """
    op = "cnnext.conv2d"
    if algo not in CONV_ALGOS:
        raise ValueError(f"{op}: algo must be one of {CONV_ALGOS}, got {algo!r}")
    if variant not in VARIANTS:
        raise ValueError(f"{op}: variant must be one of {VARIANTS}, got {variant!r}")
    stride_ = _pair(stride, "stride", op)
    dilation_ = _pair(dilation, "dilation", op)
    input, padding_ = _conv_padding(input, weight, padding, stride_, dilation_, op)
    groups = _int(groups, "groups", op)
    if algo == "auto":
        algo, chosen = _algo.select(input, weight, stride_, padding_, dilation_, groups)
        variant = chosen if variant == "auto" else variant
    conf = (stride_, padding_, dilation_, groups)
    if not is_dynamo_compiling():
        if algo == "direct":
            out = _conv2d_direct(input, weight, bias, *conf, variant, _im2col_workspace_limit)
        else:
            out = _conv2d_im2col(input, weight, bias, *conf, _im2col_workspace_limit)
        if out is not NotImplemented:
            return out
    ns = _backend.ops_for(input)  # differentiable by its C++ autograd (cnnext.autograd)
    return conv2d_forward(ns, input, weight, bias, conf, algo, variant, _im2col_workspace_limit)


def _conv2d_direct_fake(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    variant: str,
    max_col_bytes: int = DEFAULT_WORKSPACE_LIMIT,
) -> Tensor:
    return empty_like_format(input, conv_sizes(input, weight, stride, padding, dilation))


def _conv2d_direct_backward_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    output_mask: Sequence[bool],
    variant: str = "auto",
    max_col_bytes: int = DEFAULT_WORKSPACE_LIMIT,
) -> tuple[Tensor, Tensor, Tensor]:
    return conv_backward_empty(grad_output, input, weight, output_mask)


def _conv2d_im2col_fake(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    max_col_bytes: int,
) -> Tensor:
    return empty_like_format(input, conv_sizes(input, weight, stride, padding, dilation))


def _conv2d_im2col_backward_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    output_mask: Sequence[bool],
    max_col_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return conv_backward_empty(grad_output, input, weight, output_mask)


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------


FUSED_ALGOS = ("auto", "direct", "im2col")
_conv_bn_relu = _backend.fast_op("conv_bn_relu")


def conv_bn_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    algo: str = "auto",
) -> torch.Tensor:
    """``relu(batch_norm(conv2d(input, weight, conv_bias), ...))`` in one fused op, as
    ``F.relu(F.batch_norm(F.conv2d(input, weight, conv_bias, stride, padding, dilation, groups),
    running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))``.

    Args:
        input: ``Tensor[N, C_in, H, W]`` or ``Tensor[C_in, H, W]`` (a batch of one),
            contiguous or channels_last.
        weight: ``Tensor[C_out, C_in / groups, kH, kW]``; conv_bias: optional ``Tensor[C_out]``.
        bn_weight, bn_bias: BatchNorm's affine ``Tensor[C_out]`` (None: 1 and 0).
        running_mean, running_var: ``Tensor[C_out]`` buffers. Eval mode normalises with them
            (both required); training updates them in place when given (running_var with the
            unbiased batch variance), exactly as ``F.batch_norm``.
        training: normalise with the batch statistics (and update the running ones).
        momentum: the running-statistics update factor.
        eps: added to the variance.
        stride, padding, dilation, groups: the convolution's, as ``F.conv2d`` (zero padding).
        algo: ``"auto"``, ``"direct"`` or ``"im2col"``: the convolution underneath. Eval mode
            folds BatchNorm into it and applies bias + ReLU in its output epilogue. ``"auto"``
            is resolved here by ``cnnext._algo.select``, as for ``conv2d`` and the modules.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``, channels_last when the input is.
    """
    if algo not in FUSED_ALGOS:
        raise ValueError(f"cnnext.conv_bn_relu: algo must be one of {FUSED_ALGOS}, got {algo!r}")
    if isinstance(padding, str):
        raise ValueError(
            "cnnext.conv_bn_relu: string padding ('same'/'valid') is not supported; pass "
            "explicit integers"
        )
    op = "cnnext.conv_bn_relu"
    stride_, padding_, dilation_ = (
        _pair(stride, "stride", op),
        _pair(padding, "padding", op),
        _pair(dilation, "dilation", op),
    )
    groups = _int(groups, "groups", op)
    if algo == "auto":  # the one rule, shared with conv2d and the modules (cnnext._algo)
        algo = _algo.select(input, weight, stride_, padding_, dilation_, groups)[0]
    if training:
        # torch.nn.functional.batch_norm's check, with its exception type and message.
        sizes = conv_sizes(input, weight, stride_, padding_, dilation_)
        values = 1
        for i, s in enumerate(sizes):
            if i != len(sizes) - 3:
                values *= s
        if input.dim() in (3, 4) and values == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{torch.Size(sizes)}"
            )
    # Differentiable by its C++ autograd (cnnext.autograd); the op updates the running stats.
    args = (
        input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training,
        momentum, eps, stride_, padding_, dilation_, groups, algo, _im2col_workspace_limit,
    )  # fmt: skip
    if not is_dynamo_compiling():
        out = _conv_bn_relu(*args)
        if out is not NotImplemented:
            return out[0]
    return _backend.ops_for(input).conv_bn_relu(*args)[0]


def _conv_bn_relu_fake(
    input: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    algo: str = "auto",
    max_col_bytes: int = DEFAULT_WORKSPACE_LIMIT,
) -> tuple[Tensor, ...]:
    sizes = conv_sizes(input, weight, stride, padding, dilation)
    channels = weight.shape[0]
    stats = stats_dtype(input.dtype)
    output = empty_like_format(input, sizes)
    save_mean = input.new_empty(channels, dtype=stats)
    save_invstd = input.new_empty(channels, dtype=stats)
    if training:
        batch_var = input.new_empty(channels, dtype=stats)
        return output, save_mean, save_invstd, batch_var, empty_like_format(input, sizes)
    return output, save_mean, save_invstd, input.new_empty(0), input.new_empty(0)


def _conv_bn_relu_backward_fake(
    grad_output: Tensor,
    conv_output: Tensor,
    input: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    algo: str,
    max_col_bytes: int,
    output_mask: Sequence[bool],
) -> tuple[Tensor, ...]:
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


# ---- the op table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpDef:
    """One registered op (a forward and its backward) and what the Python side hangs off it.

    The one table of cnnext's ops: ``cnnext._fake`` registers the fakes from it; the test suites
    collect their ``OpSpec``s from the test module it names (tests/opspecs.py), pick the
    bad-input rows by its ``family``, and run that module's emulated cases under the sanitizers
    (tests/test_sanitizers.py); the benchmarks time the cases it names (benchmarks/shapes.py).

    Attributes:
        op: the forward op, ``torch.ops.cnnext.<op>`` (and ``cnnext_emu``).
        function: the public function that calls it.
        fakes: shape-only kernel of each registered op of the row (forward and backward).
        family: the class of arguments it takes, for the shared bad-input rows: ``"conv"``,
            ``"fused"``, ``"max"`` or ``"avg"``.
        tests: the test module (``tests/<tests>.py``) holding its ``OPSPECS`` and emulated cases.
        bench: ``(family, cases)`` of ``python -m benchmarks.run`` that time it.
    """

    op: str
    function: Callable[..., Any]
    fakes: Mapping[str, Callable[..., Any]]
    family: str
    tests: str
    bench: tuple[str, tuple[str, ...]]


OPS: tuple[OpDef, ...] = (
    OpDef(
        op="max_pool2d_with_argmax",
        function=max_pool2d,
        fakes={
            "max_pool2d_with_argmax": _max_pool2d_fake,
            "max_pool2d_backward": _max_pool2d_backward_fake,
        },
        family="max",
        tests="test_pool",
        bench=("pool", ("max_pool2d",)),
    ),
    OpDef(
        op="avg_pool2d",
        function=avg_pool2d,
        fakes={"avg_pool2d": _avg_pool2d_fake, "avg_pool2d_backward": _avg_pool2d_backward_fake},
        family="avg",
        tests="test_pool",
        bench=("pool", ("avg_pool2d",)),
    ),
    OpDef(
        op="conv2d_direct",
        function=conv2d,
        fakes={
            "conv2d_direct": _conv2d_direct_fake,
            "conv2d_direct_backward": _conv2d_direct_backward_fake,
        },
        family="conv",
        tests="test_conv2d",
        bench=("conv", ("conv2d",)),
    ),
    OpDef(
        op="conv2d_im2col",
        function=conv2d,
        fakes={
            "conv2d_im2col": _conv2d_im2col_fake,
            "conv2d_im2col_backward": _conv2d_im2col_backward_fake,
        },
        family="conv",
        tests="test_conv2d_im2col",
        bench=("conv", ("conv2d",)),
    ),
    OpDef(
        op="conv_bn_relu",
        function=conv_bn_relu,
        fakes={
            "conv_bn_relu": _conv_bn_relu_fake,
            "conv_bn_relu_backward": _conv_bn_relu_backward_fake,
        },
        family="fused",
        tests="test_conv_bn_relu",
        bench=("fused", ("conv_bn_relu.eval", "conv_bn_relu.train")),
    ),
)
