"""Pooling on the CPU: cnnext vs PyTorch, side by side in one run.

Times forward and forward+backward of ``cnnext.ops.max_pool2d(return_indices=True)`` against
``F.max_pool2d(return_indices=True)`` and ``cnnext.ops.avg_pool2d`` against ``F.avg_pool2d``, at
one thread and at all threads, after checking that both give the same results. Reports ms, the
memory traffic as GB/s (bytes read + written, each tensor once) next to the bandwidth of a plain
copy measured in the same run, and the speedup over torch.

    PYTHONPATH=. python benchmarks/pool.py [--quick] [--channels-last]

Importable: ``run(quick=False) -> list[dict]`` (one dict per row of the table).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

try:
    import cnnext
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cnnext


@dataclass(frozen=True)
class Shape:
    n: int
    c: int
    h: int
    w: int
    kernel: int
    stride: int
    padding: int

    def __str__(self) -> str:
        k, s, p = self.kernel, self.stride, self.padding
        return f"({self.n}, {self.c}, {self.h}, {self.w}) {k}x{k}/s{s}/p{p}"


SHAPES = [Shape(32, 64, 112, 112, 3, 2, 1), Shape(128, 64, 32, 32, 2, 2, 0)]


def _time(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call."""
    fn()
    # Timer runs at 1 thread unless told otherwise.
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(numel: int, min_run_time: float) -> float:
    """GB/s of ``dst.copy_(src)`` (read + write) on float32 buffers of ``numel`` elements."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), min_run_time)
    return 2 * numel * 4 / seconds / 1e9


def _ops(shape: Shape, x: torch.Tensor) -> dict:
    """Per op: (cnnext forward, torch forward, cnnext fwd+bwd, torch fwd+bwd, bytes fwd,
    bytes fwd+bwd, validate)."""
    k, s, p = shape.kernel, shape.stride, shape.padding
    out = F.max_pool2d(x, k, s, p)
    in_bytes, out_elems = x.numel() * x.element_size(), out.numel()
    grad = torch.randn_like(out)
    xg = x.detach().clone().requires_grad_()

    def ours_max():
        return cnnext.ops.max_pool2d(x, k, s, p, return_indices=True)

    def torch_max():
        return F.max_pool2d(x, k, s, p, return_indices=True)

    def ours_avg():
        return cnnext.ops.avg_pool2d(x, k, s, p)

    def torch_avg():
        return F.avg_pool2d(x, k, s, p)

    def train(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(xg), xg, grad)

    def validate_max() -> None:
        (o, i), (e, ei) = ours_max(), torch_max()
        assert torch.equal(o, e) and torch.equal(i, ei), "max_pool2d: values or argmax differ"
        assert o.stride() == e.stride(), "max_pool2d: memory format differs"
        g = train(lambda t: cnnext.ops.max_pool2d(t, k, s, p))()[0]
        torch.testing.assert_close(g, train(lambda t: F.max_pool2d(t, k, s, p))()[0])

    def validate_avg() -> None:
        o, e = ours_avg(), torch_avg()
        torch.testing.assert_close(o, e)
        assert o.stride() == e.stride(), "avg_pool2d: memory format differs"
        g = train(lambda t: cnnext.ops.avg_pool2d(t, k, s, p))()[0]
        torch.testing.assert_close(g, train(lambda t: F.avg_pool2d(t, k, s, p))()[0])

    # Bytes: read the input, write values (4) and argmax (8); backward reads grad_output and the
    # argmax and writes grad_input.
    max_fwd = in_bytes + out_elems * (4 + 8)
    avg_fwd = in_bytes + out_elems * 4
    return {
        "max_pool2d": (
            ours_max,
            torch_max,
            train(lambda t: cnnext.ops.max_pool2d(t, k, s, p)),
            train(lambda t: F.max_pool2d(t, k, s, p)),
            max_fwd,
            max_fwd + out_elems * (4 + 8) + in_bytes,
            validate_max,
        ),
        "avg_pool2d": (
            ours_avg,
            torch_avg,
            train(lambda t: cnnext.ops.avg_pool2d(t, k, s, p)),
            train(lambda t: F.avg_pool2d(t, k, s, p)),
            avg_fwd,
            avg_fwd + out_elems * 4 + in_bytes,
            validate_avg,
        ),
    }


def run(quick: bool = False, channels_last: bool = False) -> list[dict]:
    """Benchmark every shape at 1 thread and at all threads; returns one dict per row.

    Args:
        quick: shorter timing runs and no forward+backward.
        channels_last: also time channels_last inputs.
    """
    min_run_time = 0.2 if quick else 1.0
    all_threads = torch.get_num_threads()
    thread_counts = sorted({1, all_threads})
    layouts = ["NCHW", "NHWC"] if channels_last else ["NCHW"]
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            copy_gbs = copy_bandwidth(32 * 64 * 112 * 112, min_run_time)
            for shape in SHAPES:
                torch.manual_seed(0)
                base = torch.randn(shape.n, shape.c, shape.h, shape.w)
                for layout in layouts:
                    x = (
                        base.contiguous(memory_format=torch.channels_last)
                        if layout == "NHWC"
                        else base
                    )
                    for op, spec in _ops(shape, x).items():
                        ours_f, torch_f, ours_t, torch_t, bytes_f, bytes_t, validate = spec
                        validate()
                        passes = [("forward", ours_f, torch_f, bytes_f)]
                        if not quick:
                            passes.append(("fwd+bwd", ours_t, torch_t, bytes_t))
                        for name, ours, ref, nbytes in passes:
                            t_ours = _time(ours, min_run_time)
                            t_ref = _time(ref, min_run_time)
                            rows.append(
                                {
                                    "op": op,
                                    "shape": str(shape),
                                    "layout": layout,
                                    "threads": threads,
                                    "pass": name,
                                    "torch_ms": t_ref * 1e3,
                                    "cnnext_ms": t_ours * 1e3,
                                    "speedup": t_ref / t_ours,
                                    "cnnext_gbs": nbytes / t_ours / 1e9,
                                    "torch_gbs": nbytes / t_ref / 1e9,
                                    "copy_gbs": copy_gbs,
                                }
                            )
    finally:
        torch.set_num_threads(all_threads)
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'op':<11} {'shape':<30} {'fmt':<4} {'thr':>3} {'pass':<8} {'torch ms':>9} "
        f"{'cnnext ms':>9} {'speedup':>7} {'GB/s':>6} {'% copy':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['op']:<11} {r['shape']:<30} {r['layout']:<4} {r['threads']:>3} {r['pass']:<8} "
            f"{r['torch_ms']:>9.2f} {r['cnnext_ms']:>9.2f} {r['speedup']:>6.2f}x "
            f"{r['cnnext_gbs']:>6.1f} {100 * r['cnnext_gbs'] / r['copy_gbs']:>5.0f}%"
        )
    copies = sorted({(r["threads"], r["copy_gbs"]) for r in rows})
    lines.append(
        "copy bandwidth (read + write): "
        + ", ".join(f"{g:.1f} GB/s at {t} thread(s)" for t, g in copies)
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, forward only")
    parser.add_argument("--channels-last", action="store_true", help="also time NHWC inputs")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, cnnext {cnnext.__version__}, {torch.get_num_threads()} threads"
    )
    print(format_table(run(quick=args.quick, channels_last=args.channels_last)))


if __name__ == "__main__":
    main()
