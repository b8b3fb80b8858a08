"""Fake (shape-only) kernels for every registered op, in both namespaces, so torch.compile and
opcheck can trace the ops without running them. Each op's fake sits beside its public function
in ``cnnext.ops`` and is registered from the op table there (``cnnext.ops.OPS``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from . import _backend
from .ops import OPS

F = TypeVar("F", bound=Callable[..., object])


def register_fake(name: str) -> Callable[[F], F]:
    """Register ``fn`` as the fake kernel of ``cnnext::name`` and ``cnnext_emu::name``."""

    def decorate(fn: F) -> F:
        torch.library.register_fake(f"cnnext::{name}")(fn)
        if _backend.EMULATOR_AVAILABLE:
            torch.library.register_fake(f"cnnext_emu::{name}")(fn)
        return fn

    return decorate


for _row in OPS:
    for _name, _fn in _row.fakes.items():
        register_fake(_name)(_fn)


# ---- test hooks (not in the op table: no public function) -----------------------------------


@register_fake("_gemm")
def _gemm_fake(a, b, c, transa, transb, m, n, k, alpha, beta, lda, ldb, ldc, sa, sb, sc, batch):
    return torch.empty_like(c)
