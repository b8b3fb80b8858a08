"""Fused Conv2d + BatchNorm2d + ReLU: ``cnnext.ops.conv_bn_relu`` against PyTorch, side by side.

The ``fused`` family of the suite with every ``algo`` of the fused op (``auto``: the
``cnnext.fused`` column; ``direct`` and ``im2col``), at one thread by default:

* eval forward (inference, no autograd): torch eager ``conv2d -> batch_norm -> relu`` (the
  reference), torch's ``fuse_conv_bn_weights`` + ``F.relu`` (BatchNorm folded ahead of time),
  cnnext (folded at call time, bias + ReLU in the convolution's output store), and
  ``cnnext.conv+relu``: cnnext's convolution (auto's pick) on parameters folded ahead of time,
  then a separate ReLU pass, which is what the fused op's folding and ReLU-in-the-store replace;
* eval and train forward+backward: eager against cnnext (train: batch statistics, the
  running-statistics update and every gradient).

Every implementation is validated against eager (outputs, running statistics, all gradients)
before it is timed.

    python -m benchmarks.conv_bn_relu [--quick] [--threads 1,all] [--device cuda] [--out DIR]

Importable: ``run(quick=False, **config) -> list[dict]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import script_main
from .config import Config
from .suite import run_suite

ALGOS = ("auto", "direct", "im2col")


def run(quick: bool = False, **config: object) -> list[dict]:
    """The fused cases with every algo; ``config`` overrides ``Config`` fields."""
    config = {"threads": "1", **config}
    return run_suite(Config(families=("fused",), fused_algos=ALGOS, quick=quick, **config)).rows


def main(argv: Sequence[str] | None = None) -> None:
    script_main(
        __doc__,
        argv,
        lambda p: p.set_defaults(threads="1"),
        families=("fused",),
        fused_algos=ALGOS,
    )


if __name__ == "__main__":
    main()
