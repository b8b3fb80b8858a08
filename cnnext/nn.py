"""Drop-in ``nn.Module``s with torch's constructor signatures and state_dict keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_dynamo_compiling  # why not is_compiling: cnnext/ops.py

from . import ops

__all__: list[str] = ["AvgPool2d", "Conv2d", "ConvBNReLU2d", "MaxPool2d"]

IntPair = int | Sequence[int]
CONV_ALGOS = ("auto", "direct", "im2col")


# ---- pooling ------------------------------------------------------------------------------------


class MaxPool2d(nn.Module):
    """``torch.nn.MaxPool2d`` on cnnext's kernels (same constructor, attributes and repr).

    Args:
        kernel_size, stride (default: kernel_size), padding, dilation: ints or pairs.
        return_indices: also return the int64 argmax (flat ``h * W + w`` per input plane).
        ceil_mode: round the output size up.

    Shape:
        ``Tensor[N, C, H, W]`` or ``Tensor[C, H, W]`` -> ``Tensor[N, C, H_out, W_out]``
        (channels_last in, channels_last out).
    """

    def __init__(
        self,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if (stride is not None) else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode

    def forward(self, input: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Max-pool ``input``; with ``return_indices`` also return the argmax."""
        # ops.max_pool2d's lean binding, called from here: on a small layer the Python frame
        # in between is a measurable part of the call.
        if not is_dynamo_compiling():
            out = (ops._max_pool2d if self.return_indices else ops._max_pool2d_output)(
                input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
            )
            if out is not NotImplemented:
                return out
        return ops.max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )

    def extra_repr(self) -> str:
        """Torch's: ``kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False``."""
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )

    @classmethod
    def from_torch(cls, module: nn.MaxPool2d) -> MaxPool2d:
        """The cnnext equivalent of a ``torch.nn.MaxPool2d``."""
        return cls(
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            return_indices=module.return_indices,
            ceil_mode=module.ceil_mode,
        )


class AvgPool2d(nn.Module):
    """``torch.nn.AvgPool2d`` on cnnext's kernels (same constructor, attributes and repr).

    Args:
        kernel_size, stride (default: kernel_size), padding: ints or pairs.
        ceil_mode: round the output size up.
        count_include_pad: count padded zeros in the divisor.
        divisor_override: divide by this instead of the window size.

    Shape:
        ``Tensor[N, C, H, W]`` or ``Tensor[C, H, W]`` -> ``Tensor[N, C, H_out, W_out]``
        (channels_last in, channels_last out).
    """

    def __init__(
        self,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: IntPair = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if (stride is not None) else kernel_size
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Average-pool ``input``."""
        # The binding declines input of rank < 3 (ops.avg_pool2d raises torch's error).
        if not is_dynamo_compiling():
            out = ops._avg_pool2d(
                input,
                self.kernel_size,
                self.stride,
                self.padding,
                self.ceil_mode,
                self.count_include_pad,
                self.divisor_override,
            )
            if out is not NotImplemented:
                return out
        return ops.avg_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )

    def extra_repr(self) -> str:
        """Torch's: ``kernel_size=3, stride=2, padding=1``."""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    @classmethod
    def from_torch(cls, module: nn.AvgPool2d) -> AvgPool2d:
        """The cnnext equivalent of a ``torch.nn.AvgPool2d``."""
        return cls(
            module.kernel_size,
            module.stride,
            module.padding,
            module.ceil_mode,
            module.count_include_pad,
            module.divisor_override,
        )


# ---- convolution --------------------------------------------------------------------------------


def _check_algo(algo: str) -> str:
    if algo not in CONV_ALGOS:
        raise ValueError(f"cnnext.nn.Conv2d: algo must be one of {CONV_ALGOS}, got {algo!r}")
    return algo


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by cnnext's kernels (``cnnext.ops.conv2d``).

    Same constructor, attributes, parameter names and ``state_dict`` keys as
    ``torch.nn.Conv2d``, so checkpoints load both ways, plus the keyword ``algo``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as ``torch.nn.Conv2d``. ``padding`` may be ``'same'``
            (stride 1; when ``dilation * (k - 1)`` is odd the extra row/column goes to the
            bottom/right, as in torch) or ``'valid'``. ``padding_mode`` ``'zeros'`` pads inside
            the kernel; ``'reflect'``, ``'replicate'`` and ``'circular'`` pad with ``F.pad``
            first, as torch does.
        algo: ``"auto"`` (``cnnext.set_autotune`` or the heuristic in ``cnnext._algo``),
            ``"direct"`` or ``"im2col"``.

    Shapes:
        input ``Tensor[N, C_in, H, W]`` or ``Tensor[C_in, H, W]`` (contiguous or
        channels_last) -> ``Tensor[N, C_out, H_out, W_out]`` in the input's memory format.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        algo: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self.algo = _check_algo(algo)

    @classmethod
    def from_torch(cls, module: nn.Conv2d, algo: str = "auto") -> Conv2d:
        """A cnnext ``Conv2d`` that shares ``module``'s Parameters (no copy): training either
        one trains both. Hooks are not carried over.

        Args:
            module: a ``torch.nn.Conv2d`` (or a cnnext one).
            algo: as the constructor's.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(
                f"cnnext.nn.Conv2d.from_torch: expected a torch.nn.Conv2d, got {type(module)}"
            )
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device="meta",  # no allocation or initialisation: the Parameters come next
            dtype=module.weight.dtype,
            algo=algo,
        )
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new

    def to_torch(self) -> nn.Conv2d:
        """A plain ``torch.nn.Conv2d`` sharing this module's Parameters."""
        plain = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
            dtype=self.weight.dtype,
        )
        plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        else:
            padding = self.padding  # ints, or 'same' / 'valid' (ops.conv2d follows torch)
        # algo "auto" is resolved by ops.conv2d with the one rule (cnnext._algo.select).
        return ops.conv2d(
            input, weight, bias, self.stride, padding, self.dilation, self.groups, self.algo
        )

    def extra_repr(self) -> str:  # noqa: D102
        extra = super().extra_repr()
        return extra if self.algo == "auto" else f"{extra}, algo={self.algo!r}"

    def __setstate__(self, state: dict[str, Any]) -> None:  # noqa: D105
        super().__setstate__(state)
        if not hasattr(self, "algo"):
            self.algo = "auto"


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------


class ConvBNReLU2d(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> ReLU`` as one fused cnnext op (``cnnext.ops.conv_bn_relu``).

    A ``nn.Sequential`` whose children are exactly ``0: nn.Conv2d``, ``1: nn.BatchNorm2d``,
    ``2: nn.ReLU``, so its ``state_dict`` keys (``0.weight``, ``1.weight``, ``1.bias``,
    ``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``, and ``0.bias`` with
    ``bias=True``) are those of ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...),
    nn.ReLU())``: checkpoints load both ways with no key remapping. Only ``forward`` differs:
    one fused op instead of three. Train / eval behaviour, running statistics (``momentum=None``
    is the cumulative average), ``affine`` and ``track_running_stats`` follow ``nn.BatchNorm2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: the
            convolution's (``nn.Conv2d``; integer padding, zero padding mode). ``bias`` defaults
            to False: BatchNorm's shift makes a conv bias redundant.
        eps, momentum, affine, track_running_stats: BatchNorm's (``nn.BatchNorm2d``).
        algo: ``"auto"``, ``"direct"`` or ``"im2col"``: the convolution underneath.

    Shape:
        ``Tensor[N, C_in, H, W]`` -> ``Tensor[N, C_out, H_out, W_out]`` (channels_last in,
        channels_last out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        algo: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,  # type: ignore[arg-type]
            dilation=dilation,
            groups=groups,
            bias=bias,
            **factory,
        )
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **factory)
        _check_fusable(conv, bn, algo)
        super().__init__(conv, bn, nn.ReLU())
        self.algo = algo

    @property
    def conv(self) -> nn.Conv2d:
        """The convolution (child ``0``)."""
        return self[0]  # type: ignore[return-value]

    @property
    def bn(self) -> nn.BatchNorm2d:
        """The batch norm (child ``1``)."""
        return self[1]  # type: ignore[return-value]

    @property
    def relu(self) -> nn.ReLU:
        """The ReLU (child ``2``); it holds no state."""
        return self[2]  # type: ignore[return-value]

    def __getitem__(self, idx: int | slice) -> nn.Module:  # type: ignore[override]
        """Children by index; a slice is a plain ``nn.Sequential`` (not a fused module)."""
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.BatchNorm2d, algo: str = "auto") -> ConvBNReLU2d:
        """Fuse an existing ``nn.Conv2d`` (or ``cnnext.nn.Conv2d``) and ``nn.BatchNorm2d``.

        The modules are shared, not copied: parameters, buffers and their training flags stay
        those of ``conv`` and ``bn``. Raises ``ValueError`` for what the fused op cannot run:
        a non-``'zeros'`` padding mode, string padding (``'same'`` / ``'valid'``), a channel
        mismatch, or modules of other types.
        """
        _check_fusable(conv, bn, algo)
        fused = cls.__new__(cls)
        nn.Sequential.__init__(fused, conv, bn, nn.ReLU())
        fused.algo = algo
        return fused

    def to_modules(self) -> nn.Sequential:
        """A plain ``nn.Sequential(conv, bn, nn.ReLU())`` sharing this module's conv and bn."""
        return nn.Sequential(self.conv, self.bn, nn.ReLU())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``relu(bn(conv(input)))``, choosing batch or running statistics as BatchNorm2d."""
        conv, bn = self.conv, self.bn
        if input.dim() != 4:
            # As nn.BatchNorm2d (the Sequential would fail there).
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        # nn.BatchNorm2d.forward's bookkeeping, line for line.
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / float(bn.num_batches_tracked)
            else:
                factor = bn.momentum
        bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_running = not bn.training or bn.track_running_stats
        # algo "auto" is resolved by ops.conv_bn_relu with the one rule (cnnext._algo.select).
        return ops.conv_bn_relu(
            input,
            conv.weight,
            conv.bias,
            bn.weight,
            bn.bias,
            bn.running_mean if use_running else None,
            bn.running_var if use_running else None,
            bn_training,
            factor,
            bn.eps,
            conv.stride,
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,
            conv.groups,
            algo=self.algo,
        )

    def extra_repr(self) -> str:
        """``algo='auto'``."""
        return f"algo={self.algo!r}"


def _check_fusable(conv: nn.Module, bn: nn.Module, algo: str) -> None:
    """ValueError unless ``conv`` and ``bn`` form a Conv2d + BatchNorm2d the fused op runs."""
    if algo not in ops.FUSED_ALGOS:
        raise ValueError(
            f"cnnext.nn.ConvBNReLU2d: algo must be one of {ops.FUSED_ALGOS}, got {algo!r}"
        )
    conv_types: tuple[type, ...] = (nn.Conv2d,)
    cnnext_conv = globals().get("Conv2d")  # cnnext.nn.Conv2d, where it exists
    if isinstance(cnnext_conv, type):
        conv_types += (cnnext_conv,)
    if not isinstance(conv, conv_types):
        raise ValueError(
            f"cnnext.nn.ConvBNReLU2d: expected an nn.Conv2d, got {type(conv).__name__}"
        )
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(
            f"cnnext.nn.ConvBNReLU2d: expected an nn.BatchNorm2d, got {type(bn).__name__}"
        )
    padding_mode = getattr(conv, "padding_mode", "zeros")
    if padding_mode != "zeros":
        raise ValueError(
            f"cnnext.nn.ConvBNReLU2d: only padding_mode='zeros' is supported, got {padding_mode!r}"
        )
    if isinstance(conv.padding, str):
        raise ValueError(
            "cnnext.nn.ConvBNReLU2d: string padding ('same'/'valid') is not supported, got "
            f"{conv.padding!r}; pass explicit integers"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"cnnext.nn.ConvBNReLU2d: BatchNorm2d has {bn.num_features} features but the "
            f"convolution has {conv.out_channels} output channels"
        )
