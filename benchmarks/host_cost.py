"""Host cost per call on tiny CPU tensors (1x4x6x6, 1 thread), cnnext next to torch.

At this size the kernels take well under a microsecond; what is timed is the path around them:
Python wrappers, dispatch, the autograd node and its backward. Rounds interleave the two sides
so that drift of the machine hits both; each case reports the median over rounds of the
microseconds per call and the ratio torch / cnnext (>= 1: cnnext as fast as torch or faster).

    PYTHONPATH=. python benchmarks/host_cost.py [--rounds 15] [--number 2000] [--only REGEX]

(PYTHONPATH=. so that the checkout's cnnext is timed, not an installed one; the first line of the
output names the cnnext it imported.)
"""

from __future__ import annotations

import argparse
import re
import statistics
import timeit
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import cnnext

Case = tuple[str, Callable[[], object], Callable[[], object]]


def _fwd_bwd(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> Callable[[], object]:
    """One forward and the backward into every leaf that needs a gradient."""
    leaves = [a for a in args if a.requires_grad]

    def run() -> object:
        out = fn(*args)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def _no_grad(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(*args)

    return run


def cases() -> list[Case]:
    """(name, cnnext, torch) pairs."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6)
    xg = x.clone().requires_grad_()
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    ours_max, torch_max = cnnext.nn.MaxPool2d(2), nn.MaxPool2d(2)
    ours_avg, torch_avg = cnnext.nn.AvgPool2d(2), nn.AvgPool2d(2)
    torch_conv = nn.Conv2d(4, 4, 3, padding=1)
    ours_conv = cnnext.nn.Conv2d.from_torch(torch_conv)
    fused = cnnext.nn.ConvBNReLU2d(4, 4, 3, padding=1)
    eager = fused.to_modules()  # shares the parameters and buffers
    eval_fused = cnnext.nn.ConvBNReLU2d(4, 4, 3, padding=1).eval()
    eval_eager = eval_fused.to_modules().eval()

    def ours_f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cnnext.ops.conv2d(x, w, b, padding=1)

    def torch_f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, b, padding=1)

    return [
        ("MaxPool2d fwd+bwd", _fwd_bwd(ours_max, xg), _fwd_bwd(torch_max, xg)),
        ("MaxPool2d no-grad", _no_grad(ours_max, x), _no_grad(torch_max, x)),
        ("AvgPool2d fwd+bwd", _fwd_bwd(ours_avg, xg), _fwd_bwd(torch_avg, xg)),
        ("AvgPool2d no-grad", _no_grad(ours_avg, x), _no_grad(torch_avg, x)),
        ("conv2d F fwd+bwd", _fwd_bwd(ours_f, xg, w, b), _fwd_bwd(torch_f, xg, w, b)),
        ("conv2d F no-grad", _no_grad(ours_f, x, w, b), _no_grad(torch_f, x, w, b)),
        ("nn.Conv2d fwd+bwd", _fwd_bwd(ours_conv, xg), _fwd_bwd(torch_conv, xg)),
        ("nn.Conv2d no-grad", _no_grad(ours_conv, x), _no_grad(torch_conv, x)),
        ("ConvBNReLU2d train fwd+bwd", _fwd_bwd(fused, xg), _fwd_bwd(eager, xg)),
        ("ConvBNReLU2d train no-grad", _no_grad(fused, x), _no_grad(eager, x)),
        ("ConvBNReLU2d eval no-grad", _no_grad(eval_fused, x), _no_grad(eval_eager, x)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000, help="calls per timed round")
    parser.add_argument("--only", default="", help="regex over case names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    selected = [c for c in cases() if re.search(args.only, c[0])]
    print(f"torch {torch.__version__}, cnnext {cnnext.__file__}, 1 thread, {args.rounds} rounds")
    print(f"{'case':30s} {'cnnext us':>10s} {'torch us':>10s} {'torch/cnnext':>13s}")
    for name, ours, theirs in selected:
        for fn in (ours, theirs):  # warm-up
            timeit.timeit(fn, number=max(1, args.number // 10))
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(args.rounds):
            for side, fn in enumerate((ours, theirs)):
                times[side].append(timeit.timeit(fn, number=args.number) / args.number * 1e6)
        t_ours, t_torch = (statistics.median(t) for t in times)
        print(f"{name:30s} {t_ours:10.2f} {t_torch:10.2f} {t_torch / t_ours:12.2f}x")


if __name__ == "__main__":
    main()
