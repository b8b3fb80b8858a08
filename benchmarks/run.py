"""The cnnext benchmark suite: every kernel family against PyTorch's own (oneDNN on the CPU,
cuDNN on the GPU), validated before it is timed, with a Compare table, JSON, Markdown and a PNG.

Families (``--only``): ``conv`` (direct: CPU kernel, CUDA naive and tiled; im2col + GEMM)
against ``F.conv2d`` and, on the CPU, torch's own im2col (``aten._slow_conv2d_forward``); on
CUDA against cuDNN with ``cudnn.benchmark`` off and on, TF32 off (``fp32``) and on (``tf32``),
``fp16`` and ``bf16``. ``fused`` (``cnnext.ops.conv_bn_relu``, eval and train) against eager
conv -> batch_norm -> relu, and in eval against ``fuse_conv_bn_eval`` + relu. ``pool`` (max with
argmax, avg) against ``F.max_pool2d(return_indices=True)`` / ``F.avg_pool2d``.

Layers: the convolutions of LeNet-5 (28x28), VGG-11 and ResNet-18 on CIFAR-10 (32x32) and
ResNet-18 at 224x224 (stem and one layer per stage), batch 1, 32 and 128, forward and
forward+backward, at 1 thread and all threads. Shapes, validation, timing and reports live in
``benchmarks/common.py``.

Usage::

    python benchmarks/run.py --quick                  # about a minute on a quiet machine
    python benchmarks/run.py                          # the whole suite (tens of minutes)
    python benchmarks/run.py --device cuda --only conv
    python benchmarks/run.py --tiny --device emu      # the CUDA plan, kernels emulated

Writes ``benchmarks/results/<device>-<date>[-quick].{json,md,png}`` (``--out DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: Sequence[str] | None = None) -> common.Results:
    """Parse ``argv``, run the suite, print the report and write the result files."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_arguments(parser, families=True)
    args = parser.parse_args(argv)
    results = common.run_suite(common.config_from_args(args))
    common.report(results, args.out or common.RESULTS_DIR)
    return results


if __name__ == "__main__":
    main()
