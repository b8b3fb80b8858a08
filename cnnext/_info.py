"""``cnnext.info()`` and ``python -m cnnext``: what was built and what this machine offers."""

from __future__ import annotations

from typing import Any

import torch

from . import _backend

try:
    from . import _build_info as _bi
except ImportError:  # pragma: no cover - only when the package was not built by setup.py
    _bi = None  # type: ignore[assignment]


def info(print_report: bool = True) -> dict[str, Any]:
    """Report the build and the runtime.

    Args:
        print_report: also print the report, one item per line.

    Returns:
        dict with the version, torch version, whether CUDA kernels were compiled and for which
        archs, whether a GPU is visible, and whether the emulator is built with which fibers.
    """
    fibers = None
    if _backend.EMULATOR_AVAILABLE:
        fibers = torch.ops.cnnext_emu._fiber_backend()
    report: dict[str, Any] = {
        "cnnext": getattr(_bi, "VERSION", "unknown"),
        "torch": torch.__version__,
        "torch built with CUDA": torch.version.cuda,
        "CUDA kernels compiled": bool(getattr(_bi, "CUDA_COMPILED", False)),
        "CUDA archs": list(getattr(_bi, "CUDA_ARCHS", [])),
        "GPU visible": torch.cuda.is_available(),
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "emulator built": _backend.EMULATOR_AVAILABLE,
        "emulator fibers": fibers,
        "emulator variant": _backend.EMULATOR_VARIANT or "plain",
        "emulator schedule (default)": _backend.default_schedule(),
        "CPU threads": torch.get_num_threads(),
    }
    if print_report:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return report
