"""Direct convolution: cnnext against PyTorch's CPU and GPU convolutions, side by side.

On the CPU cnnext's direct kernel runs against ``F.conv2d`` (oneDNN) and torch's own im2col +
GEMM (``aten._slow_conv2d_forward``, oneDNN and NNPACK off); on CUDA the naive and tiled
kernels run against cuDNN. Layers of LeNet-5, VGG-11 / ResNet-18 (CIFAR) and ResNet-18 (224),
forward and forward+backward; each implementation is validated against ``F.conv2d`` (output
and all gradients) before it is timed.

    python benchmarks/conv_direct.py [--quick] [--threads 1] [--device cuda] [--out DIR]

Importable: ``run(quick=False, **config) -> list[dict]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run(quick: bool = False, **config: object) -> list[dict]:
    """The direct-convolution cases; ``config`` overrides ``common.Config`` fields."""
    cfg = common.Config(families=("conv",), algos=("direct",), quick=quick, **config)
    return common.run_suite(cfg).rows


def main(argv: Sequence[str] | None = None) -> None:
    common.script_main(__doc__, argv, families=("conv",), algos=("direct",))


if __name__ == "__main__":
    main()
