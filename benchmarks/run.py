"""The cnnext benchmark suite: every kernel family against PyTorch's own (oneDNN on the CPU,
cuDNN on the GPU), validated before it is timed, with a Compare table, JSON, Markdown and a PNG.

Families (``--only``): ``conv`` (direct: CPU kernel; CUDA implicit GEMM (variant ``auto``),
naive (and tiled while it exists); im2col + GEMM) against ``F.conv2d`` and, on the CPU, torch's
own im2col (``aten._slow_conv2d_forward``); on CUDA against cuDNN with ``cudnn.benchmark`` on
(the main baseline) and off, TF32 off (``fp32``) and on (``tf32``), ``fp16`` and ``bf16``.
``fused`` (``cnnext.ops.conv_bn_relu``, eval and train; ``--fused-algos``) against eager conv ->
batch_norm -> relu, and in eval against ``fuse_conv_bn_eval`` + relu. ``pool`` (max with
argmax, avg) against ``F.max_pool2d(return_indices=True)`` / ``F.avg_pool2d``. ``host``: the
per-call cost on tiny CPU tensors at one thread (functional conv, ``Conv2d``, ``MaxPool2d``,
``AvgPool2d``, ``ConvBNReLU2d`` against torch's twins), in microseconds.

Layers: the convolutions of LeNet-5 (28x28), VGG-11 and ResNet-18 on CIFAR-10 (32x32) and
ResNet-18 at 224x224 (CPU: stem and one layer per stage; CUDA: every distinct shape, also at
batch 32 and 128), batch 1, 32 and 128, forward and forward+backward, at 1 thread and all
threads. Shapes, cases, validation, timing and reports live in the ``benchmarks`` package.

Usage, from the repository root::

    python -m benchmarks.run --quick                  # about a minute on a quiet machine
    python -m benchmarks.run                          # the whole suite (tens of minutes)
    python -m benchmarks.run --device cuda --only conv
    python -m benchmarks.run --only host              # host cost per call
    python -m benchmarks.run --tiny --device emu      # the CUDA plan, kernels emulated
    python -m benchmarks.run --device cuda --list     # the CUDA cases, without a GPU

Writes ``benchmarks/results/<device>-<date>[-quick].{json,md,png}`` (``--out DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import cli
from .machine import RESULTS_DIR
from .suite import Results, run_suite


def main(argv: Sequence[str] | None = None) -> Results:
    """Parse ``argv``, run the suite, print the report and write the result files."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_arguments(parser, families=True)
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    if args.list:
        print(cli.list_cases(cfg))
        return Results(meta={})
    results = run_suite(cfg)
    cli.report(results, args.out or RESULTS_DIR)
    return results


if __name__ == "__main__":
    main()
