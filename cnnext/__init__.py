"""cnnext: verified CNN layer kernels for PyTorch (CPU, CUDA and the CUDA emulator).

Quick start::

    import cnnext
    y = cnnext.ops.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    with cnnext.emulate_cuda("reverse"):      # run the CUDA kernel on the CPU
        y2 = cnnext.ops.max_pool2d(x, 3, 2, 1)
"""

from __future__ import annotations

from . import (
    _fake,  # noqa: F401  (fake kernels for torch.compile)
    autograd,
    nn,
    ops,
)
from ._backend import EMULATOR_AVAILABLE, emulate_cuda, emulating
from ._info import info

try:
    from ._build_info import VERSION as __version__
except ImportError:  # pragma: no cover
    __version__ = "0.0.0"

__all__ = [
    "EMULATOR_AVAILABLE",
    "autograd",
    "emulate_cuda",
    "emulating",
    "info",
    "nn",
    "ops",
    "__version__",
]
