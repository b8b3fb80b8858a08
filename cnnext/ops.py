"""The functional API: ``cnnext.ops.conv2d``, ``max_pool2d``, ``avg_pool2d``, ``conv_bn_relu``.
Each is differentiable through the Functions in ``cnnext.autograd``."""

from __future__ import annotations

import torch  # noqa: F401

from . import autograd  # noqa: F401
from ._shapes import pair  # noqa: F401

__all__: list[str] = []


# ---- pooling ------------------------------------------------------------------------------------


# ---- convolution (direct and im2col) ------------------------------------------------------------


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------
