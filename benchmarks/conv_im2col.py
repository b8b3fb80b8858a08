"""im2col + GEMM convolution: cnnext against PyTorch, side by side in one run.

Baselines: ``F.conv2d`` (oneDNN on the CPU, cuDNN on CUDA) and, on the CPU, torch's own im2col
path (``aten._slow_conv2d_forward`` and its autograd backward, oneDNN and NNPACK off). Layers of
LeNet-5, VGG-11 / ResNet-18 (CIFAR) and ResNet-18 (224); every implementation is validated
before it is timed. ``--nhwc-study`` adds, on one CPU thread, cnnext's native channels_last path
against converting to NCHW and back and against oneDNN on the same channels_last input.

    python -m benchmarks.conv_im2col [--quick] [--nhwc-study] [--device cuda] [--out DIR]

Importable: ``run(quick=False, **config) -> list[dict]``, ``run_channels_last(quick=False,
tiny=False) -> list[dict]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import cnnext

from .cases.base import Case, Impl, tolerance
from .cli import script_main
from .config import Config, Plan, Spec
from .report import compare_table, geomean
from .shapes import QUICK_LAYERS, ConvLayer, layers_for
from .suite import Results, add_ratios_and_peaks, make_row, run_suite
from .timing import time_case
from .validate import validate


def run(quick: bool = False, **config: object) -> list[dict]:
    """The im2col cases; ``config`` overrides ``Config`` fields."""
    cfg = Config(families=("conv",), algos=("im2col",), quick=quick, **config)
    return run_suite(cfg).rows


def channels_last_case(layer: ConvLayer, n: int) -> Case:
    """Forward on a channels_last input: the native NHWC path, the NCHW path with conversions
    around it, and oneDNN (the reference)."""
    spec = Spec("conv", "conv2d.channels_last", layer, n, "fwd", layout="NHWC")
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(n, layer.c_in, layer.size, layer.size, generator=gen).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(layer.c_out, layer.c_in, layer.k, layer.k, generator=gen)
    w /= (layer.c_in * layer.k**2) ** 0.5
    b = torch.randn(layer.c_out, generator=gen)
    s, p = (layer.stride,) * 2, (layer.padding,) * 2
    limit = cnnext.ops.get_im2col_workspace_limit()
    op = torch.ops.cnnext.conv2d_im2col
    nhwc = torch.channels_last

    def via_nchw() -> torch.Tensor:
        return op(x.contiguous(), w, b, s, p, (1, 1), 1, limit).contiguous(memory_format=nhwc)

    impls = [
        Impl("oneDNN", lambda: F.conv2d(x, w, b, s, p), baseline=True),
        Impl("cnnext.nhwc", lambda: op(x, w, b, s, p, (1, 1), 1, limit)),
        Impl("cnnext.via_nchw", via_nchw, baseline=True),
    ]
    return Case(
        spec=spec,
        work=layer.flops(n),
        unit="GFLOP/s",
        impls=impls,
        reference="oneDNN",
        primary="oneDNN",
        tol=tolerance("fp32", layer.c_in * layer.k**2),
        shape=str(layer),
    )


def run_channels_last(quick: bool = False, tiny: bool = False) -> list[dict]:
    """The NHWC study on one CPU thread (C_in = 1 has no distinct channels_last layout);
    ``ratios`` of the ``cnnext.nhwc`` rows compare with oneDNN and with the via-NCHW path."""
    cfg = Config(quick=quick, tiny=tiny, verbose=False)
    min_run_time, rounds = cfg.timing()
    plan = Plan("cpu")
    results = Results(meta={})
    layers = layers_for("conv", tiny)
    if quick and not tiny:
        layers = [lay for lay in layers if lay.id in QUICK_LAYERS["conv"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in cfg.batch_list():
            for layer in layers:
                if layer.c_in == 1 or (n > 1 and layer.size >= 112):
                    continue
                case = channels_last_case(layer, n)
                validate(case)
                timed = time_case(case, plan, 1, min_run_time, rounds, None)
                for impl in case.impls:
                    results.rows.append(make_row(case, impl, timed[impl.name], 1))
                    results.measurements.append(timed[impl.name])
    finally:
        torch.set_num_threads(threads)
    add_ratios_and_peaks(results)
    print(compare_table(results))
    return results.rows


def main(argv: Sequence[str] | None = None) -> None:
    def extend(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--nhwc-study", action="store_true", help="also the channels_last comparison"
        )

    _, args = script_main(__doc__, argv, extend, families=("conv",), algos=("im2col",))
    if args.nhwc_study:
        rows = run_channels_last(quick=args.quick, tiny=args.tiny)
        ratios = [r["ratios"] for r in rows if r["impl"] == "cnnext.nhwc"]
        print(
            "channels_last geomean: native NHWC vs via-NCHW "
            f"{geomean([r['cnnext.via_nchw'] for r in ratios]):.2f}x, vs oneDNN "
            f"{geomean([r['oneDNN'] for r in ratios]):.2f}x"
        )


if __name__ == "__main__":
    main()
