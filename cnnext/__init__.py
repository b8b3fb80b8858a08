"""cnnext: verified CNN layer kernels for PyTorch (CPU, CUDA and the CUDA emulator).

Quick start::

    import cnnext
    y = cnnext.ops.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    with cnnext.emulate_cuda("reverse"):      # run the CUDA kernel on the CPU
        y2 = cnnext.ops.max_pool2d(x, 3, 2, 1)
    model = cnnext.convert(torchvision.models.resnet18())   # cnnext layers, fused Conv+BN+ReLU
"""

from __future__ import annotations

from . import (
    _fake,  # noqa: F401  (registers cnnext.ops.OPS' fake kernels for torch.compile)
    autograd,
    nn,
    ops,
)
from ._algo import clear_autotune_cache, get_autotune, set_autotune
from ._backend import EMULATOR_AVAILABLE, emulate_cuda, emulating
from ._info import info
from .convert import ConvertReport, convert

try:
    from ._build_info import VERSION as __version__
except ImportError:  # pragma: no cover
    __version__ = "0.0.0"

__all__ = [
    "EMULATOR_AVAILABLE",
    "ConvertReport",
    "autograd",
    "clear_autotune_cache",
    "convert",
    "emulate_cuda",
    "emulating",
    "get_autotune",
    "info",
    "nn",
    "ops",
    "set_autotune",
    "__version__",
]
