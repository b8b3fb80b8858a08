"""Pooling: cnnext against PyTorch, side by side in one run.

Times forward and forward+backward of ``cnnext.ops.max_pool2d(return_indices=True)`` against
``F.max_pool2d(return_indices=True)`` and ``cnnext.ops.avg_pool2d`` against ``F.avg_pool2d`` on
the pools of LeNet-5, VGG-11 (CIFAR) and ResNet-18, at 1 thread and all threads, after checking
that both give the same results (max: identical values and argmax). Reports ms, GB/s (bytes
read + written, each tensor once), the percentage of a plain copy's bandwidth measured in the
same run, and the speed-up over torch.

    python -m benchmarks.pool [--quick] [--channels-last] [--device cuda] [--out DIR]

Importable: ``run(quick=False, **config) -> list[dict]`` (one dict per implementation and
case; see ``benchmarks.config.Config`` for the options).
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import script_main
from .config import Config
from .suite import run_suite


def run(quick: bool = False, **config: object) -> list[dict]:
    """The pooling cases; ``config`` overrides ``Config`` fields."""
    return run_suite(Config(families=("pool",), quick=quick, **config)).rows


def main(argv: Sequence[str] | None = None) -> None:
    script_main(__doc__, argv, families=("pool",))


if __name__ == "__main__":
    main()
