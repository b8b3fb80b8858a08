"""Where cnnext's ops get their derivatives.

Each op family is differentiated by one hand-written C++ ``torch::autograd::Node`` (the
``CNNEXT_AUTOGRAD`` block that closes its ``csrc/<family>/<family>.h``, on
``csrc/common/autograd.h``)
whose forward is registered for the Autograd key of the family's forward op, in both namespaces
(``torch.ops.cnnext`` and the emulator's ``torch.ops.cnnext_emu``): ``max_pool2d_with_argmax``,
``avg_pool2d``, ``conv2d_direct``, ``conv2d_im2col`` and ``conv_bn_relu``. Calling the forward op
records the node; its backward calls the family's registered backward op. A differentiable call
never re-enters Python, so there is no Python ``autograd.Function`` here, only the call helper
that ``cnnext.ops`` shares with its callers.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["conv2d_forward"]


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
    groups), ``variant`` the direct CUDA kernel, ``max_col_bytes`` the bound on im2col's column
    buffers (also those of the direct CPU backward's non-finite fallback)."""
    if algo == "direct":
        return ns.conv2d_direct(input, weight, bias, *conf, variant, max_col_bytes)
    if algo == "im2col":
        return ns.conv2d_im2col(input, weight, bias, *conf, max_col_bytes)
    raise ValueError(f"cnnext.conv2d: algo must be 'direct' or 'im2col', got {algo!r}")
