"""Drop-in ``nn.Module``s with torch's constructor signatures and state_dict keys."""

from __future__ import annotations

import torch  # noqa: F401
from torch import nn  # noqa: F401

from . import ops  # noqa: F401

__all__: list[str] = []


# ---- pooling ------------------------------------------------------------------------------------


# ---- convolution --------------------------------------------------------------------------------


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------
