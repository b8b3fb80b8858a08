"""Fake (shape-only) kernels for every registered op, in both namespaces, so torch.compile and
opcheck can trace the ops without running them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from . import _backend
from ._shapes import conv_output_size, pair, pool_output_size  # noqa: F401

F = TypeVar("F", bound=Callable[..., object])


def register_fake(name: str) -> Callable[[F], F]:
    """Register ``fn`` as the fake kernel of ``cnnext::name`` and ``cnnext_emu::name``."""

    def decorate(fn: F) -> F:
        torch.library.register_fake(f"cnnext::{name}")(fn)
        if _backend.EMULATOR_AVAILABLE:
            torch.library.register_fake(f"cnnext_emu::{name}")(fn)
        return fn

    return decorate


def empty_like_format(
    ref: torch.Tensor, sizes: Sequence[object], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An empty tensor of ``sizes`` in ``ref``'s memory format (channels_last kept for 4D)."""
    out = ref.new_empty(sizes, dtype=dtype)  # type: ignore[arg-type]
    if ref.dim() == 4 and len(sizes) == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# ---- test hooks ---------------------------------------------------------------------------------


@register_fake("_gemm")
def _gemm_fake(a, b, c, transa, transb, m, n, k, alpha, beta, lda, ldb, ldc, sa, sb, sc, batch):  # noqa: ANN001, ANN202
    return torch.empty_like(c)


# ---- pooling ------------------------------------------------------------------------------------


# ---- direct convolution -------------------------------------------------------------------------


# ---- im2col convolution -------------------------------------------------------------------------


# ---- fused conv + batch norm + ReLU -------------------------------------------------------------
