"""CPU benchmark of cnnext's fused Conv2d + BatchNorm2d + ReLU (``cnnext.nn.ConvBNReLU2d``)
against PyTorch, side by side in one run, one thread, on ResNet-18 and VGG-16 layers at batch 1
and 32:

* eval forward (inference, no autograd): torch eager ``Conv2d -> BatchNorm2d -> ReLU``
  (oneDNN convolution, then two elementwise passes), and torch's
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` + ``F.relu`` (BatchNorm folded, one ReLU pass),
  against cnnext with ``algo`` = auto, direct and im2col (folded BatchNorm, bias + ReLU in the
  convolution's output store);
* train forward + backward: torch eager against cnnext (batch statistics, running-statistics
  update, every gradient).

The eval rows also time ``cnnext_conv_then_relu``: cnnext's convolution (auto's algorithm) on
parameters folded beforehand, then a separate ``relu_`` pass, which is what the fused op's
call-time folding and ReLU-in-the-store replace.

Every implementation is validated against torch eager (eval: output; train: output, running
statistics and all gradients) before it is timed. Timing: ``torch.utils.benchmark.Timer
.blocked_autorange`` medians on the calling thread's CPU time (torch runs one thread, so load
from other processes on a shared machine does not count), implementations interleaved over
rounds, the best round kept. Ratios are torch ms / cnnext ms (> 1: cnnext faster).

Usage::

    PYTHONPATH=. python benchmarks/conv_bn_relu.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.benchmark import Timer

import cnnext


@dataclass(frozen=True)
class Layer:
    name: str
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0

    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def flops(self, batch: int) -> float:
        """Multiply-adds x 2 of the convolution's forward pass."""
        return 2.0 * batch * self.c_out * self.c_in * self.kernel**2 * self.out_size() ** 2


LAYERS = [
    Layer("resnet18.conv1", 3, 64, 224, 7, 2, 3),
    Layer("resnet18.layer1", 64, 64, 56, 3, 1, 1),
    Layer("resnet18.layer2.0.conv1", 64, 128, 56, 3, 2, 1),
    Layer("resnet18.layer3", 256, 256, 14, 3, 1, 1),
    Layer("resnet18.layer4", 512, 512, 7, 3, 1, 1),
    Layer("vgg16.conv3_1", 128, 256, 56, 3, 1, 1),
]
QUICK = ["resnet18.conv1", "resnet18.layer3"]
CNNEXT_ALGOS = ["auto", "direct", "im2col"]


def _modules(layer: Layer) -> nn.Sequential:
    """torch's Conv2d -> BatchNorm2d -> ReLU with non-trivial BatchNorm state."""
    ref = nn.Sequential(
        nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, bias=False),
        nn.BatchNorm2d(layer.c_out),
        nn.ReLU(),
    )
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
        ref[1].running_mean.uniform_(-0.5, 0.5)
        ref[1].running_var.uniform_(0.5, 2.0)
    return ref


def _fused(ref: nn.Sequential, algo: str) -> nn.Module:
    model = cnnext.nn.ConvBNReLU2d.from_modules(
        copy.deepcopy(ref[0]), copy.deepcopy(ref[1]), algo=algo
    )
    return model.train(ref.training)


def _scale(layer: Layer, batch: int) -> float:
    return max(1.0, layer.c_in * layer.kernel**2 / 16, batch * layer.out_size() ** 2 / 256)


def _check(name: str, got: torch.Tensor, expected: torch.Tensor, scale: float) -> None:
    torch.testing.assert_close(
        got, expected, rtol=1e-4 * scale, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}"
    )


def _time(fn: Callable[[], object]) -> Callable[[float], float]:
    timer = Timer("fn()", globals={"fn": fn}, timer=time.thread_time)
    return lambda min_run_time: timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _time_all(calls: dict[str, Callable[[], object]], min_run_time: float, rounds: int):
    """Milliseconds per implementation: the best of ``rounds`` interleaved medians."""
    timers = {name: _time(fn) for name, fn in calls.items()}
    best = dict.fromkeys(calls, math.inf)
    for _ in range(rounds):
        for name, measure in timers.items():
            best[name] = min(best[name], measure(min_run_time))
    return best


def bench_eval(layer: Layer, batch: int, min_run_time: float, rounds: int) -> dict:
    ref = _modules(layer).eval()
    folded = fuse_conv_bn_eval(ref[0], ref[1])
    x = torch.randn(batch, layer.c_in, layer.size, layer.size)
    calls: dict[str, Callable[[], object]] = {
        "torch_eager": lambda: ref(x),
        "torch_fuse_conv_bn_eval": lambda: F.relu(folded(x)),
    }
    for algo in CNNEXT_ALGOS:
        model = _fused(ref, algo)
        calls[f"cnnext_{algo}"] = lambda model=model: model(x)
    # The same convolution (auto's pick) on pre-folded parameters, then a separate ReLU pass:
    # what the fused op saves by folding at call time and applying ReLU in the store.
    pick, _ = cnnext._algo.choose(x, folded.weight, (layer.stride,) * 2, (layer.padding,) * 2,
                                  (1, 1), 1)  # fmt: skip
    w_f, b_f, s, p = folded.weight, folded.bias, layer.stride, layer.padding
    calls["cnnext_conv_then_relu"] = lambda: torch.relu_(
        cnnext.ops.conv2d(x, w_f, b_f, s, p, algo=pick)
    )
    with torch.no_grad():
        expected = ref(x)
        for name, call in calls.items():
            _check(name, call(), expected, _scale(layer, batch))
        ms = _time_all(calls, min_run_time, rounds)
    return _row("eval fwd", layer, batch, ms, layer.flops(batch))


def bench_train(layer: Layer, batch: int, min_run_time: float, rounds: int) -> dict:
    ref = _modules(layer).train()
    x = torch.randn(batch, layer.c_in, layer.size, layer.size)
    grad = torch.randn(batch, layer.c_out, layer.out_size(), layer.out_size())
    # No gradient where the pre-activation is within rounding of the ReLU's kink: a mask bit
    # flipped by a last-digit difference would otherwise fail validation (not the timing).
    with torch.no_grad():
        pre = copy.deepcopy(ref[:2])(x)
    grad[pre.abs() <= 1e-3 * pre.abs().max()] = 0
    models = {"torch_eager": ref}
    models.update({f"cnnext_{algo}": _fused(ref, algo) for algo in CNNEXT_ALGOS})

    def step(model: nn.Module) -> list[torch.Tensor]:
        xi = x.detach().requires_grad_()
        params = [xi, *model.parameters()]
        out = model(xi)
        return [out, *torch.autograd.grad(out, params, grad)]

    # Validate one step from identical states: output, all gradients, running statistics.
    expected = step(copy.deepcopy(ref))
    want_buffers = None
    for name, model in models.items():
        trial = copy.deepcopy(model)
        got = step(trial)
        for g, e in zip(got, expected, strict=True):
            _check(name, g, e, _scale(layer, batch) * 4)
        buffers = [b for b in trial.buffers() if b.is_floating_point()]
        if want_buffers is None:
            want_buffers = buffers
        for g, e in zip(buffers, want_buffers, strict=True):
            _check(name + " running stats", g, e, _scale(layer, batch))
    calls = {name: (lambda model=model: step(model)) for name, model in models.items()}
    ms = _time_all(calls, min_run_time, rounds)
    return _row("train fwd+bwd", layer, batch, ms, 3 * layer.flops(batch))


def _row(mode: str, layer: Layer, batch: int, ms: dict[str, float], flops: float) -> dict:
    row: dict = {"mode": mode, "layer": layer.name, "batch": batch}
    for name, value in ms.items():
        row[f"{name}_ms"] = value
        row[f"{name}_gflops"] = flops / value / 1e6
    best = min(ms[f"cnnext_{algo}"] for algo in ("direct", "im2col"))
    row["auto_vs_eager"] = ms["torch_eager"] / ms["cnnext_auto"]
    row["best_vs_eager"] = ms["torch_eager"] / best
    if "torch_fuse_conv_bn_eval_ms" in row:
        row["auto_vs_fuse_conv_bn_eval"] = ms["torch_fuse_conv_bn_eval"] / ms["cnnext_auto"]
        row["auto_vs_conv_then_relu"] = ms["cnnext_conv_then_relu"] / ms["cnnext_auto"]
    return row


def run(quick: bool = False) -> list[dict]:
    """The suite on one thread; one dict per (mode, layer, batch) with milliseconds, GFLOP/s
    (convolution FLOPs; x3 for forward+backward) and speed-ups over torch (> 1: cnnext
    faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layers = [lay for lay in LAYERS if not quick or lay.name in QUICK]
        min_run_time, rounds = (0.05, 2) if quick else (0.2, 3)
        rows = []
        for bench in (bench_eval, bench_train):
            for batch in (1, 32):
                for layer in layers:
                    if quick and batch == 32 and layer.size > 56:
                        continue
                    rows.append(bench(layer, batch, min_run_time, rounds))
        return rows
    finally:
        torch.set_num_threads(threads)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'mode':14}{'layer':25}{'N':>3}{'eager ms':>10}{'fuse ms':>9}{'auto ms':>9}"
        f"{'direct':>9}{'im2col':>9}{'conv+relu':>10}{'auto GF/s':>10}{'auto/eager':>11}"
        f"{'best/eager':>11}{'auto/fuse':>10}"
    ]
    for r in rows:
        fuse = r.get("torch_fuse_conv_bn_eval_ms")
        vs_fuse = r.get("auto_vs_fuse_conv_bn_eval")
        lines.append(
            f"{r['mode']:14}{r['layer']:25}{r['batch']:>3}{r['torch_eager_ms']:>10.2f}"
            + (f"{fuse:>9.2f}" if fuse else f"{'-':>9}")
            + f"{r['cnnext_auto_ms']:>9.2f}{r['cnnext_direct_ms']:>9.2f}"
            f"{r['cnnext_im2col_ms']:>9.2f}"
            + (
                f"{r['cnnext_conv_then_relu_ms']:>10.2f}"
                if "cnnext_conv_then_relu_ms" in r
                else f"{'-':>10}"
            )
            + f"{r['cnnext_auto_gflops']:>10.1f}"
            f"{r['auto_vs_eager']:>11.2f}{r['best_vs_eager']:>11.2f}"
            + (f"{vs_fuse:>10.2f}" if vs_fuse else f"{'-':>10}")
        )
    for mode in ("eval fwd", "train fwd+bwd"):
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            auto = [r["auto_vs_eager"] for r in sel]
            best = [r["best_vs_eager"] for r in sel]
            lines.append(
                f"{mode}: auto vs torch eager geomean {geomean(auto):.2f}x (min {min(auto):.2f}x,"
                f" max {max(auto):.2f}x); best algo geomean {geomean(best):.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and batch sizes")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = run(quick=args.quick)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
