"""Host cost: what one call of cnnext costs next to torch's twin when the tensors are tiny.

On a ``1 x 4 x 6 x 6`` CPU tensor at one thread, interleaved rounds, torch and cnnext side by
side: forward+backward of the functional convolution, ``nn.Conv2d``, ``MaxPool2d``,
``AvgPool2d`` and ``ConvBNReLU2d`` in train mode (against ``Conv2d -> BatchNorm2d -> ReLU``),
and no-grad forward of the same (``ConvBNReLU2d`` in eval: fused against eager). Reports
microseconds per call and torch / cnnext (> 1: cnnext faster). Each pair is validated first.

    python -m benchmarks.host [--quick] [--rounds R] [--min-time S] [--out DIR]

Importable: ``run(quick=False, **config) -> list[dict]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import script_main
from .config import Config
from .suite import run_suite


def run(quick: bool = False, **config: object) -> list[dict]:
    """The host cases; ``config`` overrides ``Config`` fields."""
    return run_suite(Config(families=("host",), quick=quick, **config)).rows


def main(argv: Sequence[str] | None = None) -> None:
    script_main(__doc__, argv, lambda p: p.set_defaults(threads="1"), families=("host",))


if __name__ == "__main__":
    main()
