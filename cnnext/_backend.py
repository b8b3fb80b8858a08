"""Loading the extensions and choosing which op namespace serves a call.

``torch.ops.cnnext`` holds the CPU and CUDA kernels; ``torch.ops.cnnext_emu`` holds the CUDA
kernels compiled for the CPU emulator. Inside ``emulate_cuda()`` every cnnext op called on CPU
tensors runs the emulated CUDA kernel instead of the CPU kernel.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from . import _C  # noqa: F401  (registers torch.ops.cnnext)

# CNNEXT_EMULATOR=asan|tsan loads the sanitizer build of the emulator instead (tests only; the
# sanitizer runtime must be preloaded). Both register the same `cnnext_emu` namespace.
EMULATOR_VARIANT = os.environ.get("CNNEXT_EMULATOR", "")
if EMULATOR_VARIANT not in ("", "asan", "tsan"):
    raise ImportError(f"cnnext: CNNEXT_EMULATOR must be 'asan' or 'tsan', got {EMULATOR_VARIANT!r}")
try:
    importlib.import_module(
        f".{'_C_emu_' + EMULATOR_VARIANT if EMULATOR_VARIANT else '_C_emu'}", __package__
    )
    EMULATOR_AVAILABLE = True
except ImportError:  # built with CNNEXT_EMU=0, or no C++20 compiler at build time
    if EMULATOR_VARIANT:
        raise
    EMULATOR_AVAILABLE = False

# A plain module global (not a ContextVar) so torch.compile can guard on it.
_emulating = False


def emulating() -> bool:
    """True inside ``cnnext.emulate_cuda()``."""
    return _emulating


def use_emulator(tensor: torch.Tensor) -> bool:
    """Whether a call on ``tensor`` goes to the emulated CUDA kernels."""
    return _emulating and tensor.device.type == "cpu"


def lib(emulated: bool) -> Any:
    """The op namespace: ``torch.ops.cnnext_emu`` when ``emulated`` else ``torch.ops.cnnext``."""
    return torch.ops.cnnext_emu if emulated else torch.ops.cnnext


def ops_for(tensor: torch.Tensor) -> Any:
    """The op namespace serving a call on ``tensor``."""
    return lib(use_emulator(tensor))


def default_schedule() -> str:
    return os.environ.get("CNNEXT_EMU_SCHEDULE") or "forward"


@contextlib.contextmanager
def emulate_cuda(schedule: str | None = None) -> Iterator[None]:
    """Run cnnext's CUDA kernels on CPU tensors through the emulator.

    Args:
        schedule: the order in which the emulated threads of a block run between barriers:
            ``"forward"``, ``"reverse"`` or ``"random:SEED"``. Defaults to the environment
            variable ``CNNEXT_EMU_SCHEDULE``, else ``"forward"``. A kernel with a missing
            ``__syncthreads()`` typically passes in one order and fails in another.

    Example::

        with cnnext.emulate_cuda("random:7"):
            y = cnnext.ops.max_pool2d(x, 3, 2, 1)   # x on the CPU, emulated CUDA kernel
    """
    global _emulating
    if not EMULATOR_AVAILABLE:
        raise RuntimeError(
            "cnnext.emulate_cuda: the emulator extension cnnext._C_emu was not built "
            "(it needs a C++20 compiler at install time; see README)"
        )
    emu = torch.ops.cnnext_emu
    previous_schedule = emu._get_schedule()
    previous = _emulating
    emu._set_schedule(schedule if schedule is not None else default_schedule())
    _emulating = True
    try:
        yield
    finally:
        _emulating = previous
        emu._set_schedule(previous_schedule)
