"""Direct convolution: cnnext against PyTorch's CPU and GPU convolutions, side by side.

On the CPU cnnext's direct kernel runs against ``F.conv2d`` (oneDNN) and torch's own im2col +
GEMM (``aten._slow_conv2d_forward``, oneDNN and NNPACK off); on CUDA the implicit-GEMM kernel
(variant ``auto``) and the naive one run against cuDNN (``cudnn.benchmark`` on: the main
baseline; off: a column). Layers of LeNet-5, VGG-11 / ResNet-18 (CIFAR) and ResNet-18 (224),
forward and forward+backward; each implementation is validated against ``F.conv2d`` (output
and all gradients) before it is timed.

    python -m benchmarks.conv_direct [--quick] [--threads 1] [--device cuda] [--out DIR]

Importable: ``run(quick=False, **config) -> list[dict]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import script_main
from .config import Config
from .suite import run_suite


def run(quick: bool = False, **config: object) -> list[dict]:
    """The direct-convolution cases; ``config`` overrides ``Config`` fields."""
    cfg = Config(families=("conv",), algos=("direct",), quick=quick, **config)
    return run_suite(cfg).rows


def main(argv: Sequence[str] | None = None) -> None:
    script_main(__doc__, argv, families=("conv",), algos=("direct",))


if __name__ == "__main__":
    main()
