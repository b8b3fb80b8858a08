"""CPU benchmark of cnnext's im2col + GEMM convolution against PyTorch, side by side in one run.

Baselines, all on one thread:
- ``slow``: torch's own im2col path, ``aten._slow_conv2d_forward`` (and its autograd backward)
  with oneDNN disabled; it has no dilation or groups, which the suite does not use.
- ``onednn``: ``F.conv2d`` (oneDNN on CPU).

Layers: LeNet-5 (28x28), VGG-11 and ResNet-18 on CIFAR (32x32), ResNet-18 at 224x224 (stem and
one 3x3 layer per stage), each at batch 1 and 32. Every implementation is validated against
``F.conv2d`` before it is timed with ``torch.utils.benchmark.Timer.blocked_autorange``.
Forward times the registered op (``torch.ops.cnnext.conv2d_im2col``); forward+backward goes
through ``cnnext.ops.conv2d(algo="im2col")`` and autograd, as a user would.

Run: ``PYTHONPATH=. python benchmarks/conv_im2col.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import cnnext


@dataclass(frozen=True)
class Layer:
    net: str
    name: str
    c_in: int
    size: int
    c_out: int
    k: int
    stride: int = 1
    padding: int = 0

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.k) // self.stride + 1

    def flops(self, n: int) -> float:
        return 2.0 * n * self.c_out * self.c_in * self.k * self.k * self.out_size**2

    @property
    def first(self) -> bool:
        return self.c_in <= 3


LAYERS = [
    Layer("lenet5", "conv1", 1, 28, 6, 5, padding=2),
    Layer("lenet5", "conv2", 6, 14, 16, 5),
    Layer("vgg11-cifar", "conv1", 3, 32, 64, 3, padding=1),
    Layer("vgg11-cifar", "conv2", 64, 16, 128, 3, padding=1),
    Layer("vgg11-cifar", "conv3", 128, 8, 256, 3, padding=1),
    Layer("vgg11-cifar", "conv5", 256, 4, 512, 3, padding=1),
    Layer("vgg11-cifar", "conv7", 512, 2, 512, 3, padding=1),
    Layer("resnet18-cifar", "conv1", 3, 32, 64, 3, padding=1),
    Layer("resnet18-cifar", "layer1", 64, 32, 64, 3, padding=1),
    Layer("resnet18-cifar", "layer2.down", 64, 32, 128, 3, stride=2, padding=1),
    Layer("resnet18-cifar", "layer2.short", 64, 32, 128, 1, stride=2),
    Layer("resnet18-cifar", "layer3", 256, 8, 256, 3, padding=1),
    Layer("resnet18-cifar", "layer4", 512, 4, 512, 3, padding=1),
    Layer("resnet18-224", "stem", 3, 224, 64, 7, stride=2, padding=3),
    Layer("resnet18-224", "layer1", 64, 56, 64, 3, padding=1),
    Layer("resnet18-224", "layer2", 128, 28, 128, 3, padding=1),
    Layer("resnet18-224", "layer3", 256, 14, 256, 3, padding=1),
    Layer("resnet18-224", "layer4", 512, 7, 512, 3, padding=1),
]
QUICK = {
    ("lenet5", "conv1"),
    ("vgg11-cifar", "conv1"),
    ("resnet18-cifar", "layer1"),
    ("resnet18-cifar", "layer4"),
    ("resnet18-224", "stem"),
    ("resnet18-224", "layer3"),
}


def _time(fn, min_run_time: float) -> float:
    """Median milliseconds of ``fn()``."""
    return (
        Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3
    )


def _time_all(impls: dict, min_run_time: float, rounds: int) -> dict[str, float]:
    """Milliseconds per implementation: ``rounds`` interleaved blocked_autorange medians, the
    smallest kept, so that load from other processes hits every implementation alike."""
    best = {name: math.inf for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            with _context(name):
                best[name] = min(best[name], _time(fn, min_run_time))
    return best


def _context(name: str):
    """The slow path runs with oneDNN disabled (around the whole timing loop, not per call)."""
    if name == "slow":
        return torch.backends.mkldnn.flags(enabled=False)
    return contextlib.nullcontext()


def _check(name: str, got: torch.Tensor, expected: torch.Tensor, reduction: int) -> None:
    scale = max(1.0, reduction / 16)
    torch.testing.assert_close(
        got, expected, rtol=1e-4 * scale, atol=1e-5 * scale, msg=f"{name} disagrees with F.conv2d"
    )


def bench_layer(layer: Layer, n: int, backward: bool, min_run_time: float, rounds: int) -> dict:
    """Times one layer at batch ``n``: forward, or forward+backward when ``backward``."""
    x = torch.randn(n, layer.c_in, layer.size, layer.size)
    w = torch.randn(layer.c_out, layer.c_in, layer.k, layer.k) / math.sqrt(
        layer.c_in * layer.k * layer.k
    )
    b = torch.randn(layer.c_out)
    k, s, p = (layer.k, layer.k), (layer.stride,) * 2, (layer.padding,) * 2
    limit = cnnext.ops.get_im2col_workspace_limit()
    reduction = layer.c_in * layer.k * layer.k

    def slow_forward(xx, ww, bb):
        return torch.ops.aten._slow_conv2d_forward(xx, ww, k, bb, s, p)

    if not backward:
        impls = {
            "cnnext": lambda: torch.ops.cnnext.conv2d_im2col(x, w, b, s, p, (1, 1), 1, limit),
            "slow": lambda: slow_forward(x, w, b),
            "onednn": lambda: F.conv2d(x, w, b, s, p),
        }
        expected = F.conv2d(x, w, b, s, p)
        for name, fn in impls.items():
            with _context(name):
                _check(name, fn(), expected, reduction)
    else:
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        grad = torch.randn_like(F.conv2d(x, w, b, s, p))
        fwd = {
            "cnnext": lambda: cnnext.ops.conv2d(xs, ws, bs, s, p, algo="im2col"),
            "slow": lambda: slow_forward(xs, ws, bs),
            "onednn": lambda: F.conv2d(xs, ws, bs, s, p),
        }

        def make(f):
            return lambda: torch.autograd.grad(f(), (xs, ws, bs), grad)

        impls = {name: make(f) for name, f in fwd.items()}
        expected = impls["onednn"]()
        for name, fn in impls.items():
            with _context(name):
                got = fn()
            for g, e in zip(got, expected, strict=True):
                _check(name, g, e, reduction * max(1, n * layer.out_size**2 // 64))

    flops = layer.flops(n) * (3 if backward else 1)
    row: dict = {
        "net": layer.net,
        "layer": layer.name,
        "shape": f"{layer.c_in}x{layer.size}x{layer.size}->{layer.c_out} k{layer.k}"
        f" s{layer.stride} p{layer.padding}",
        "batch": n,
        "pass": "fwd+bwd" if backward else "fwd",
        "first_layer": layer.first,
        "gflop": flops / 1e9,
    }
    for name, ms in _time_all(impls, min_run_time, rounds).items():
        row[f"{name}_ms"] = ms
        row[f"{name}_gflops"] = flops / ms / 1e6
    row["vs_slow"] = row["slow_ms"] / row["cnnext_ms"]
    row["vs_onednn"] = row["onednn_ms"] / row["cnnext_ms"]
    return row


def bench_channels_last(layer: Layer, n: int, min_run_time: float, rounds: int) -> dict:
    """channels_last input, forward: cnnext's native NHWC path (col[pixel, (ki, kj, c)], GEMM
    output already channels_last) against converting to NCHW, running the contiguous path and
    converting the output back, and against F.conv2d (oneDNN) on the same input."""
    x = torch.randn(n, layer.c_in, layer.size, layer.size).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(layer.c_out, layer.c_in, layer.k, layer.k) / math.sqrt(
        layer.c_in * layer.k * layer.k
    )
    b = torch.randn(layer.c_out)
    s, p = (layer.stride,) * 2, (layer.padding,) * 2
    limit = cnnext.ops.get_im2col_workspace_limit()
    op = torch.ops.cnnext.conv2d_im2col
    impls = {
        "nhwc": lambda: op(x, w, b, s, p, (1, 1), 1, limit),
        "via_nchw": lambda: op(x.contiguous(), w, b, s, p, (1, 1), 1, limit).contiguous(
            memory_format=torch.channels_last
        ),
        "onednn": lambda: F.conv2d(x, w, b, s, p),
    }
    expected = F.conv2d(x, w, b, s, p)
    row: dict = {"net": layer.net, "layer": layer.name, "batch": n}
    for name, fn in impls.items():
        out = fn()
        assert out.is_contiguous(memory_format=torch.channels_last), name
        _check(name, out, expected, layer.c_in * layer.k * layer.k)
    for name, ms in _time_all(impls, min_run_time, rounds).items():
        row[f"{name}_ms"] = ms
    row["nhwc_vs_via_nchw"] = row["via_nchw_ms"] / row["nhwc_ms"]
    row["nhwc_vs_onednn"] = row["onednn_ms"] / row["nhwc_ms"]
    return row


def run_channels_last(quick: bool = False) -> list[dict]:
    """``bench_channels_last`` over the suite (batch 32 only below 112x112; C_in = 1 has no
    distinct channels_last layout), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layers = [lay for lay in LAYERS if not quick or (lay.net, lay.name) in QUICK]
        return [
            bench_channels_last(layer, n, 0.05 if quick else 0.2, 2 if quick else 3)
            for n in (1, 32)
            for layer in layers
            if layer.c_in > 1 and (n == 1 or layer.size < 112)
        ]
    finally:
        torch.set_num_threads(threads)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def run(quick: bool = False) -> list[dict]:
    """Benchmarks the suite on one thread; returns one dict per (layer, batch, pass) with
    milliseconds, GFLOP/s and the speed-up of cnnext over each baseline (>1: cnnext faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        layers = [lay for lay in LAYERS if not quick or (lay.net, lay.name) in QUICK]
        for backward in (False, True):
            for n in (1, 32):
                for layer in layers:
                    if quick and n == 32 and layer.size >= 112:
                        continue
                    rows.append(
                        bench_layer(layer, n, backward, 0.05 if quick else 0.2, 2 if quick else 3)
                    )
        return rows
    finally:
        torch.set_num_threads(threads)


def summary(rows: list[dict]) -> dict:
    """Geometric means of the speed-ups, overall and for first layers at batch 1."""
    out = {}
    for kind in ("fwd", "fwd+bwd"):
        sel = [r for r in rows if r["pass"] == kind]
        first = [r for r in sel if r["first_layer"] and r["batch"] == 1]
        out[kind] = {
            "geomean_vs_slow": geomean([r["vs_slow"] for r in sel]),
            "geomean_vs_onednn": geomean([r["vs_onednn"] for r in sel]),
            "first_layers_batch1_vs_onednn_min": min((r["vs_onednn"] for r in first), default=0),
            "first_layers_batch1_vs_onednn_geomean": geomean([r["vs_onednn"] for r in first]),
        }
    return out


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'pass':8}{'net':16}{'layer':14}{'N':>4}{'cnnext ms':>11}{'slow ms':>10}"
        f"{'oneDNN ms':>11}{'cnnext GF/s':>12}{'slow GF/s':>10}{'oneDNN GF/s':>12}"
        f"{'vs slow':>9}{'vs oneDNN':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['pass']:8}{r['net']:16}{r['layer']:14}{r['batch']:>4}{r['cnnext_ms']:>11.3f}"
            f"{r['slow_ms']:>10.3f}{r['onednn_ms']:>11.3f}{r['cnnext_gflops']:>12.1f}"
            f"{r['slow_gflops']:>10.1f}{r['onednn_gflops']:>12.1f}{r['vs_slow']:>9.2f}"
            f"{r['vs_onednn']:>10.2f}"
        )
    for kind, s in summary(rows).items():
        print(
            f"{kind}: geomean speed-up vs slow {s['geomean_vs_slow']:.2f}x, vs oneDNN "
            f"{s['geomean_vs_onednn']:.2f}x; first layers at batch 1 vs oneDNN: min "
            f"{s['first_layers_batch1_vs_onednn_min']:.2f}x, geomean "
            f"{s['first_layers_batch1_vs_onednn_geomean']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and batch sizes")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--channels-last", action="store_true", help="also compare the NHWC path (forward)"
    )
    args = parser.parse_args()
    rows = run(quick=args.quick)
    print_table(rows)
    result = {"rows": rows, "summary": summary(rows)}
    if args.channels_last:
        cl_rows = run_channels_last(quick=args.quick)
        print("\nchannels_last input, forward, ms: native NHWC | via NCHW | oneDNN")
        for r in cl_rows:
            print(
                f"{r['net']:16}{r['layer']:14}{r['batch']:>4}{r['nhwc_ms']:>10.3f}"
                f"{r['via_nchw_ms']:>10.3f}{r['onednn_ms']:>10.3f}   NHWC vs via-NCHW "
                f"{r['nhwc_vs_via_nchw']:.2f}x, vs oneDNN {r['nhwc_vs_onednn']:.2f}x"
            )
        print(
            f"geomean: NHWC vs via-NCHW {geomean([r['nhwc_vs_via_nchw'] for r in cl_rows]):.2f}x,"
            f" vs oneDNN {geomean([r['nhwc_vs_onednn'] for r in cl_rows]):.2f}x"
        )
        result["channels_last"] = cl_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
