"""One ``torch.autograd.Function`` per op family. ``forward`` calls the registered forward op and
``backward`` the registered backward op (flash-attention's pattern), choosing the namespace once
in forward (``cnnext`` or, under ``emulate_cuda()``, ``cnnext_emu``) and keeping it for
backward. Only what backward needs is saved."""

from __future__ import annotations

from typing import Any

import torch

from . import _backend
from ._backend import lib

__all__: list[str] = []


def _mark(ctx: Any, tensor: torch.Tensor) -> Any:
    """Remember on ``ctx`` which namespace served forward; return it."""
    ctx.emulated = _backend.use_emulator(tensor)
    return lib(ctx.emulated)


# ---- pooling ------------------------------------------------------------------------------------


# ---- convolution (direct and im2col) ------------------------------------------------------------


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------
