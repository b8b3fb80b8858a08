"""Which convolution algorithm is faster where, on this CPU: the measurements behind the CPU rule
of ``cnnext._algo.choose`` (``algo="auto"``).

For each layer shape it validates cnnext's ``direct`` and ``im2col`` convolutions against
``F.conv2d`` (output and gradients), then times forward and forward+backward of both, with
``F.conv2d`` (oneDNN) measured in the same run as the baseline, and prints ms, GFLOP/s, the
ratio to torch, the faster cnnext algorithm and what the heuristic picks. Cases, validation and
timing come from the benchmarks package.

Usage, from the repository root (which then also provides the checkout's cnnext)::

    python -m benchmarks.algo [--quick] [--threads N] [--min-time S] [--layers REGEX]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

import cnnext
from benchmarks.cases.conv import conv_case
from benchmarks.config import PASSES, Plan, Spec
from benchmarks.shapes import ConvLayer
from benchmarks.timing import time_case
from benchmarks.validate import validate


def _layer(name: str, c_in: int, size: int, c_out: int, k: int, stride: int = 1,
           padding: int = 0, groups: int = 1) -> ConvLayer:  # fmt: skip
    return ConvLayer("algo", name, c_in, size, c_out, k, stride, padding, groups)


SHAPES = [  # (layer, batch)
    # small reductions (first layers, LeNet)
    (_layer("lenet.conv1", 1, 28, 6, 5, padding=2), 8),
    (_layer("lenet.conv2", 6, 14, 16, 5), 8),
    (_layer("c3k3 first layer", 3, 64, 32, 3, padding=1), 8),
    (_layer("c3k7s2 resnet stem", 3, 112, 64, 7, 2, 3), 2),
    (_layer("c8k3", 8, 32, 16, 3, padding=1), 8),
    # growing reductions, groups == 1
    (_layer("c16k3", 16, 32, 32, 3, padding=1), 8),
    (_layer("c32k1", 32, 32, 64, 1), 8),
    (_layer("c32k3", 32, 16, 32, 3, padding=1), 8),
    (_layer("c64k1", 64, 16, 128, 1), 8),
    (_layer("c64k3 resnet layer1", 64, 28, 64, 3, padding=1), 4),
    (_layer("c128k3 resnet layer2", 128, 14, 128, 3, padding=1), 4),
    (_layer("c256k3 resnet layer3", 256, 7, 256, 3, padding=1), 4),
    (_layer("c512k3 resnet layer4", 512, 4, 512, 3, padding=1), 4),
    (_layer("c512k3 plane 2x2", 512, 2, 512, 3, padding=1), 2),
    (_layer("c256k3 plane 1x1", 256, 1, 256, 3, padding=1), 2),
    # batch 1
    (_layer("n1 c64k3", 64, 28, 64, 3, padding=1), 1),
    (_layer("n1 c16k3", 16, 28, 16, 3, padding=1), 1),
    (_layer("n1 c256k3 14x14", 256, 14, 256, 3, padding=1), 1),
    # the register-blocked kernel (>= 16 channels per group) on planes around the crossover
    (_layer("c16k3 plane 8x8", 16, 8, 32, 3, padding=1), 8),
    (_layer("c32k3 plane 8x8", 32, 8, 32, 3, padding=1), 8),
    (_layer("c64k3 plane 8x8", 64, 8, 64, 3, padding=1), 32),
    (_layer("c64k3 cifar layer1", 64, 32, 64, 3, padding=1), 32),
    (_layer("c128k3s2 downsample", 64, 56, 128, 3, 2, 1), 8),
    (_layer("c256k3 resnet layer3 14x14", 256, 14, 256, 3, padding=1), 8),
    # grouped and depthwise
    (_layer("c64k3 g2", 64, 28, 64, 3, padding=1, groups=2), 4),
    (_layer("c64k3 g8", 64, 28, 64, 3, padding=1, groups=8), 4),
    (_layer("dw c32k3", 32, 32, 32, 3, padding=1, groups=32), 8),
    (_layer("dw c144k3s2 mobilenet", 144, 28, 144, 3, 2, 1, groups=144), 4),
    (_layer("dw c384k3 mobilenet", 384, 7, 384, 3, padding=1, groups=384), 4),
]
QUICK = ["lenet.conv2", "c16k3", "c64k3 resnet layer1", "c256k3 resnet layer3", "dw c32k3"]


def measure(layer: ConvLayer, n: int, threads: int, min_run_time: float, rounds: int) -> dict:
    """Per pass, per implementation (``torch``, ``direct``, ``im2col``): median ms; and what
    ``algo="auto"`` picks."""
    plan = Plan("cpu")
    times: dict[str, dict[str, float]] = {}
    pick = None
    for pass_ in PASSES:
        case = conv_case(Spec("conv", "conv2d", layer, n, pass_), plan,
                                ("direct", "im2col"))  # fmt: skip
        case.impls = [i for i in case.impls if i.name != "torch.im2col"]
        validate(case)
        timed = time_case(case, plan, threads, min_run_time, rounds, None)
        names = {"oneDNN": "torch", "cnnext.direct": "direct", "cnnext.im2col": "im2col"}
        times[pass_] = {names[k]: m.median * 1e3 for k, m in timed.items()}
        pick = case.extra.get("auto_pick")
    return {"times": times, "auto": pick}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.2, help="per blocked_autorange")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--layers", default="", help="regex on layer names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(lay, n) for lay, n in SHAPES if not args.quick or lay.name in QUICK]
    shapes = [(lay, n) for lay, n in shapes if re.search(args.layers, lay.name)]
    print(f"cnnext: {Path(cnnext.__file__).parent}")
    print(f"threads={args.threads}  times: median ms; GF = GFLOP/s of forward")
    header = (
        f"{'layer':<24}{'K':>6}{'pix':>6} | {'torch fwd':>9}{'direct':>8}{'im2col':>8}"
        f"{'GF dir':>7}{'GF i2c':>7} | {'torch f+b':>9}{'direct':>8}{'im2col':>8}"
        f" | {'fwd':>6}{'f+b':>7}{'auto':>7}{'x torch':>8}"
    )
    print(header)
    print("-" * len(header))
    for layer, n in shapes:
        r = measure(layer, n, args.threads, args.min_time, args.rounds)
        f, t = r["times"]["fwd"], r["times"]["fwd+bwd"]
        auto = r["auto"]
        gf = layer.flops(n) / 1e6
        best_f = min(("direct", "im2col"), key=lambda a: f[a])
        best_t = min(("direct", "im2col"), key=lambda a: t[a])
        print(
            f"{layer.name:<24}{layer.reduction:>6}{layer.out_size**2:>6} | {f['torch']:>9.3f}"
            f"{f['direct']:>8.3f}{f['im2col']:>8.3f}{gf / f['direct']:>7.1f}"
            f"{gf / f['im2col']:>7.1f} | {t['torch']:>9.3f}{t['direct']:>8.3f}"
            f"{t['im2col']:>8.3f} | {best_f:>6}{best_t:>7}{auto:>7}"
            f"{t['torch'] / t[auto]:>8.2f}"
        )


if __name__ == "__main__":
    main()
