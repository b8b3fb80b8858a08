"""CPU benchmark of cnnext's direct convolution against PyTorch's two CPU paths: ``F.conv2d``
(oneDNN) and torch's own im2col + GEMM (``aten._slow_conv2d_forward`` with oneDNN disabled), on
LeNet, ResNet-18 and VGG-16 layers at batch 1 and 32. Each implementation is validated against
``F.conv2d`` (output and all gradients) before it is timed.

Usage::

    PYTHONPATH=. python benchmarks/conv_direct.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cnnext

# torch.backends.mkldnn.flags() warns about Intel GPUs on every use.
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")


@dataclass(frozen=True)
class Layer:
    name: str
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0

    def flops(self, batch: int) -> float:
        """Multiply-adds x 2 of the forward pass."""
        out = (self.size + 2 * self.padding - self.kernel) // self.stride + 1
        return 2.0 * batch * self.c_out * self.c_in * self.kernel**2 * out * out


LAYERS = [
    Layer("lenet.conv1", 1, 6, 28, 5),
    Layer("lenet.conv2", 6, 16, 12, 5),
    Layer("resnet18.conv1", 3, 64, 224, 7, 2, 3),
    Layer("resnet18.layer1", 64, 64, 56, 3, 1, 1),
    Layer("resnet18.layer2.0.conv1", 64, 128, 56, 3, 2, 1),
    Layer("resnet18.layer3.0.downsample", 128, 256, 28, 1, 2, 0),
    Layer("resnet18.layer3", 256, 256, 14, 3, 1, 1),
    Layer("resnet18.layer4", 512, 512, 7, 3, 1, 1),
    Layer("vgg16.conv3_1", 128, 256, 56, 3, 1, 1),
]
QUICK = ["lenet.conv2", "resnet18.layer1", "resnet18.layer3"]


def _cnnext(x, w, b, layer: Layer):
    return cnnext.ops.conv2d(x, w, b, stride=layer.stride, padding=layer.padding, algo="direct")


def _onednn(x, w, b, layer: Layer):
    return F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)


def _im2col(x, w, b, layer: Layer):
    # torch's own im2col + GEMM (THNN "slow_conv2d"); with oneDNN off, F.conv2d's autograd
    # also takes this path, so forward+backward times the matching backward too.
    with torch.backends.mkldnn.flags(enabled=False):
        if x.requires_grad or w.requires_grad:
            return F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
        k = (layer.kernel, layer.kernel)
        s, p = (layer.stride, layer.stride), (layer.padding, layer.padding)
        return torch.ops.aten._slow_conv2d_forward(x, w, k, b, s, p)


IMPLS: dict[str, Callable] = {"cnnext": _cnnext, "onednn": _onednn, "im2col": _im2col}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _validate(layer: Layer, x, w, b, grad) -> None:
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = _onednn(*leaves, layer)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    for name, fn in IMPLS.items():
        if name == "onednn":
            continue
        out = fn(x, w, b, layer)
        err = _rel_err(out, ref.detach())
        assert err < 1e-4, f"{name} forward on {layer.name}: relative error {err:.2e}"
        mine = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        grads = torch.autograd.grad(fn(*mine, layer), mine, grad)
        for label, g, e in zip(("input", "weight", "bias"), grads, ref_grads, strict=True):
            err = _rel_err(g, e)
            assert err < 1e-4, f"{name} grad_{label} on {layer.name}: relative error {err:.2e}"


def _pass(fn: Callable, forward_only: bool, layer: Layer, x, w, b, grad) -> Callable[[], object]:
    """One timed call: the forward alone (no autograd) or forward and backward."""
    if forward_only:

        def forward() -> None:
            with torch.no_grad():
                fn(x, w, b, layer)

        return forward
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def forward_backward() -> None:
        torch.autograd.grad(fn(*leaves, layer), leaves, grad)

    return forward_backward


def _clock() -> Callable[[], float]:
    """The calling thread's CPU time when torch runs one thread (other load on a shared machine
    then does not count), else wall-clock time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _time_all(calls: dict[str, Callable[[], object]], min_time: float, max_rounds: int):
    """Best seconds per call of each implementation. Rounds interleave the implementations so
    that each sees the same machine conditions; one warm-up call each first."""
    clock = _clock()
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < 3 or time.perf_counter() - start < min_time):
        for name, call in calls.items():
            t0 = clock()
            call()
            best[name] = min(best[name], clock() - t0)
        rounds += 1
    return best


def run(quick: bool = False) -> list[dict]:
    """Time forward and forward+backward of each layer; one row per (layer, batch, pass) with
    ms and GFLOP/s per implementation (forward+backward counts 3x the forward's FLOPs) and the
    speed-ups of cnnext (>1: cnnext is faster)."""
    torch.manual_seed(0)
    layers = [lay for lay in LAYERS if lay.name in QUICK] if quick else LAYERS
    batches = [1] if quick else [1, 32]
    min_time, max_rounds = (0.05, 5) if quick else (1.0, 10)
    rows: list[dict] = []
    for layer in layers:
        for batch in batches:
            x = torch.randn(batch, layer.c_in, layer.size, layer.size)
            w = torch.randn(layer.c_out, layer.c_in, layer.kernel, layer.kernel)
            w /= (layer.c_in * layer.kernel**2) ** 0.5
            b = torch.randn(layer.c_out)
            grad = torch.randn_like(_onednn(x, w, b, layer))
            _validate(layer, x, w, b, grad)
            flops = layer.flops(batch)
            for pass_name, factor in (("forward", 1.0), ("forward+backward", 3.0)):
                calls = {
                    name: _pass(fn, pass_name == "forward", layer, x, w, b, grad)
                    for name, fn in IMPLS.items()
                }
                best = _time_all(calls, min_time, max_rounds)
                row: dict = {"layer": layer.name, "batch": batch, "pass": pass_name}
                for name, seconds in best.items():
                    row[f"{name}_ms"] = seconds * 1e3
                    row[f"{name}_gflops"] = factor * flops / seconds / 1e9
                row["vs_onednn"] = row["onednn_ms"] / row["cnnext_ms"]
                row["vs_im2col"] = row["im2col_ms"] / row["cnnext_ms"]
                row["threads"] = torch.get_num_threads()
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'layer':30} {'N':>3} {'pass':16} {'cnnext ms':>10} {'GFLOP/s':>8} "
        f"{'oneDNN ms':>10} {'GFLOP/s':>8} {'im2col ms':>10} {'GFLOP/s':>8} "
        f"{'x oneDNN':>8} {'x im2col':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layer']:30} {r['batch']:>3} {r['pass']:16} "
            f"{r['cnnext_ms']:>10.2f} {r['cnnext_gflops']:>8.1f} "
            f"{r['onednn_ms']:>10.2f} {r['onednn_gflops']:>8.1f} "
            f"{r['im2col_ms']:>10.2f} {r['im2col_gflops']:>8.1f} "
            f"{r['vs_onednn']:>8.2f} {r['vs_im2col']:>8.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, three layers")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}  (x oneDNN, x im2col: speed-up of cnnext)")
    print(format_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
