"""Drop-in ``nn.Module``s with torch's constructor signatures and state_dict keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401
from torch import nn  # noqa: F401

from . import ops  # noqa: F401

__all__: list[str] = ["AvgPool2d", "MaxPool2d"]

IntPair = int | Sequence[int]


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


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------
