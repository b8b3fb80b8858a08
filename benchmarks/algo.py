"""Which convolution algorithm is faster where, on this CPU: the measurements behind the CPU rule
of ``cnnext._algo.choose`` (``algo="auto"``).

For each layer shape it validates cnnext's ``direct`` and ``im2col`` convolutions against
``F.conv2d`` (output and gradients), then times forward and forward+backward of both, with
``F.conv2d`` (oneDNN) measured in the same run as the baseline, and prints ms, GFLOP/s, the
ratio to torch, the faster cnnext algorithm and what the heuristic picks.

Usage::

    PYTHONPATH=. python benchmarks/algo.py [--quick] [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cnnext
from cnnext import _algo


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    c_in: int
    size: int
    c_out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def out(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def flops(self) -> float:
        """2 x multiply-adds of the forward pass."""
        c_red = self.c_in // self.groups * self.kernel**2
        return 2.0 * self.n * self.c_out * c_red * self.out**2

    def conf(self) -> tuple:
        s, p = (self.stride,) * 2, (self.padding,) * 2
        return s, p, (1, 1), self.groups


SHAPES = [
    # small reductions (first layers, LeNet)
    Shape("lenet.conv1", 8, 1, 28, 6, 5, padding=2),
    Shape("lenet.conv2", 8, 6, 14, 16, 5),
    Shape("c3k3 first layer", 8, 3, 64, 32, 3, padding=1),
    Shape("c3k7s2 resnet stem", 2, 3, 112, 64, 7, 2, 3),
    Shape("c8k3", 8, 8, 32, 16, 3, padding=1),
    # growing reductions, groups == 1
    Shape("c16k3", 8, 16, 32, 32, 3, padding=1),
    Shape("c32k1", 8, 32, 32, 64, 1),
    Shape("c32k3", 8, 32, 16, 32, 3, padding=1),
    Shape("c64k1", 8, 64, 16, 128, 1),
    Shape("c64k3 resnet layer1", 4, 64, 28, 64, 3, padding=1),
    Shape("c128k3 resnet layer2", 4, 128, 14, 128, 3, padding=1),
    Shape("c256k3 resnet layer3", 4, 256, 7, 256, 3, padding=1),
    Shape("c512k3 resnet layer4", 4, 512, 4, 512, 3, padding=1),
    Shape("c512k3 plane 2x2", 2, 512, 2, 512, 3, padding=1),
    Shape("c256k3 plane 1x1", 2, 256, 1, 256, 3, padding=1),
    # batch 1
    Shape("n1 c64k3", 1, 64, 28, 64, 3, padding=1),
    Shape("n1 c16k3", 1, 16, 28, 16, 3, padding=1),
    # grouped and depthwise
    Shape("c64k3 g2", 4, 64, 28, 64, 3, padding=1, groups=2),
    Shape("c64k3 g8", 4, 64, 28, 64, 3, padding=1, groups=8),
    Shape("dw c32k3", 8, 32, 32, 32, 3, padding=1, groups=32),
    Shape("dw c144k3s2 mobilenet", 4, 144, 28, 144, 3, 2, 1, groups=144),
    Shape("dw c384k3 mobilenet", 4, 384, 7, 384, 3, padding=1, groups=384),
]
QUICK = ["lenet.conv2", "c16k3", "c64k3 resnet layer1", "c256k3 resnet layer3", "dw c32k3"]


def _impl(algo: str | None, shape: Shape) -> Callable[..., torch.Tensor]:
    s, p, d, g = shape.conf()
    if algo is None:
        return lambda x, w, b: F.conv2d(x, w, b, s, p, d, g)
    return lambda x, w, b: cnnext.ops.conv2d(x, w, b, s, p, d, g, algo=algo)


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _validate(shape: Shape, algo: str, x, w, b) -> None:
    xs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ys = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref, out = _impl(None, shape)(*xs), _impl(algo, shape)(*ys)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for a, e in zip([out, *(t.grad for t in ys)], [ref, *(t.grad for t in xs)], strict=True):
        err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        if err > 1e-4:
            raise AssertionError(f"{shape.name} {algo}: relative error {err:.2e}")


def _time_both(fn: Callable[..., torch.Tensor], x, w, b, repeats: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``fn``."""
    with torch.no_grad():
        forward = _time(lambda: fn(x, w, b), repeats)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))

    def train_step() -> None:
        y = fn(xg, wg, bg)
        torch.autograd.grad(y, (xg, wg, bg), torch.ones_like(y))

    return forward * 1e3, _time(train_step, repeats) * 1e3


def measure(shape: Shape, repeats: int) -> dict[str, tuple[float, float]]:
    """Per implementation: (forward ms, forward+backward ms)."""
    x = torch.randn(shape.n, shape.c_in, shape.size, shape.size)
    w = torch.randn(shape.c_out, shape.c_in // shape.groups, shape.kernel, shape.kernel) * 0.1
    b = torch.randn(shape.c_out)
    for algo in ("direct", "im2col"):
        _validate(shape, algo, x, w, b)
    results = {}
    for name, algo in (("torch", None), ("direct", "direct"), ("im2col", "im2col")):
        results[name] = _time_both(_impl(algo, shape), x, w, b, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [s for s in SHAPES if not args.quick or s.name in QUICK]
    print(f"threads={args.threads}  times: best of {args.repeats}, ms; GF = GFLOP/s of forward")
    header = (
        f"{'layer':<24}{'K':>6}{'pix':>6} | {'torch fwd':>9}{'direct':>8}{'im2col':>8}"
        f"{'GF dir':>7}{'GF i2c':>7} | {'torch f+b':>9}{'direct':>8}{'im2col':>8}"
        f" | {'fwd':>6}{'f+b':>7}{'auto':>7}{'x torch':>8}"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        r = measure(shape, args.repeats)
        gf = shape.flops() / 1e6
        best_f = min(("direct", "im2col"), key=lambda a: r[a][0])
        best_t = min(("direct", "im2col"), key=lambda a: r[a][1])
        x = torch.empty(shape.n, shape.c_in, shape.size, shape.size)
        w = torch.empty(shape.c_out, shape.c_in // shape.groups, shape.kernel, shape.kernel)
        auto, _ = _algo.choose(x, w, *shape.conf())
        k = shape.c_in // shape.groups * shape.kernel**2
        print(
            f"{shape.name:<24}{k:>6}{shape.out**2:>6} | {r['torch'][0]:>9.3f}"
            f"{r['direct'][0]:>8.3f}{r['im2col'][0]:>8.3f}{gf / r['direct'][0]:>7.1f}"
            f"{gf / r['im2col'][0]:>7.1f} | {r['torch'][1]:>9.3f}{r['direct'][1]:>8.3f}"
            f"{r['im2col'][1]:>8.3f} | {best_f:>6}{best_t:>7}{auto:>7}"
            f"{r['torch'][1] / r[auto][1]:>8.2f}"
        )


if __name__ == "__main__":
    main()
