"""The ``conv`` family: cnnext's convolutions against ``F.conv2d`` (oneDNN / cuDNN)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import cnnext

from ..config import DTYPES, Plan, Spec
from .base import (
    Case,
    Impl,
    cudnn_benchmark,
    pass_calls,
    place,
    randn,
    tolerance,
    torch_im2col_path,
)


def direct_variants(plan: Plan, wanted: Sequence[str] | None = None) -> tuple[str, ...]:
    """The direct CUDA kernels to time (``wanted``, default all): ``auto`` (the implicit GEMM,
    ``cnnext.direct``), the naive teaching baseline, and the tiled kernel while cnnext has it."""
    if not plan.gpu_algorithms:
        return ("",)
    known = getattr(cnnext.ops, "VARIANTS", ("auto", "naive"))
    return tuple(v for v in ("auto", "naive", "tiled") if v in known and v in (wanted or known))


def conv_case(
    spec: Spec,
    plan: Plan,
    algos: Sequence[str],
    phase: str = "main",
    cudnn_bench_baseline: bool = True,
    variants: Sequence[str] | None = None,
) -> Case:
    """cnnext's conv algorithms against ``F.conv2d`` (oneDNN / cuDNN, heuristics) and, on the
    CPU, torch's own im2col (``aten._slow_conv2d_forward``, oneDNN and NNPACK off). ``phase ==
    "cudnn-bench"``: only ``F.conv2d`` with ``cudnn.benchmark=True``, against float64; on the
    GPU plan that is the primary baseline when ``cudnn_bench_baseline`` (the suite times it in
    a child process)."""
    layer, n = spec.layer, spec.batch
    dtype = DTYPES[spec.precision]
    gen = torch.Generator().manual_seed(spec.seed)
    x = randn((n, layer.c_in, layer.size, layer.size), gen)
    c_group = layer.c_in // layer.groups
    w = randn((layer.c_out, c_group, layer.k, layer.k), gen, layer.reduction**-0.5)
    b = randn((layer.c_out,), gen, 0.1)
    grad = randn((n, layer.c_out, layer.out_size, layer.out_size), gen)
    k, s, p, g = (layer.k,) * 2, (layer.stride,) * 2, (layer.padding,) * 2, layer.groups
    inputs = [place(x, plan, dtype, spec.layout), place(w, plan, dtype), place(b, plan, dtype)]
    grad = place(grad, plan, dtype, spec.layout)
    lib = plan.conv_library
    specials: dict[str, tuple[Callable, bool, Callable]] = {}  # name: (fn, baseline, context)

    def torch_conv(xx, ww, bb):
        return F.conv2d(xx, ww, bb, s, p, 1, g)

    if phase == "cudnn-bench":
        specials[f"{lib}.bench"] = (torch_conv, True, lambda: cudnn_benchmark(True))
        reference = "fp64"
        specials[reference] = (
            lambda xx, ww, bb: F.conv2d(xx.double(), ww.double(), bb.double(), s, p, 1, g),
            True,
            contextlib.nullcontext,
        )
    else:
        reference = lib
        specials[lib] = (torch_conv, True, lambda: cudnn_benchmark(False))
        emulated = plan.cnnext_context
        for algo in algos:
            for variant in direct_variants(plan, variants) if algo == "direct" else ("",):

                def ours(xx, ww, bb, algo=algo, variant=variant or "auto"):
                    return cnnext.ops.conv2d(xx, ww, bb, s, p, 1, g, algo=algo, variant=variant)

                name = f"cnnext.{algo}" + (f".{variant}" if variant not in ("", "auto") else "")
                specials[name] = (ours, False, emulated)
        if plan.kind == "cpu" and g == 1:  # slow_conv2d has no groups

            def slow(xx, ww, bb):
                if spec.pass_ == "fwd":
                    return torch.ops.aten._slow_conv2d_forward(xx, ww, k, bb, s, p)
                return F.conv2d(xx, ww, bb, s, p)  # slow_conv2d and its backward

            specials["torch.im2col"] = (slow, True, torch_im2col_path)
    calls = pass_calls(spec, {name: f for name, (f, _, _) in specials.items()}, inputs, grad)
    impls = [
        Impl(name, calls[name], baseline, context, timed=name != "fp64")
        for name, (_, baseline, context) in specials.items()
    ]
    backward = spec.pass_ != "fwd"
    reduction = layer.reduction
    if backward:
        reduction = max(reduction, layer.c_out * layer.k**2, n * layer.out_size**2)
    bench_primary = phase == "cudnn-bench" or (plan.gpu_algorithms and cudnn_bench_baseline)
    extra = {}
    choose = getattr(getattr(cnnext, "_algo", None), "choose", None)
    if choose is not None and phase == "main":
        with plan.cnnext_context():  # the emulated device chooses as CUDA does
            # The pick of this pass: training and inference are decided apart on the CPU.
            algo, variant = choose(inputs[0], inputs[1], s, p, (1, 1), g, grads=backward)
        extra["auto_pick"] = algo + ("" if variant == "auto" else f".{variant}")
    return Case(
        spec=spec,
        work=layer.flops(n) * (3.0 if backward else 1.0),
        unit="GFLOP/s",
        impls=impls,
        reference=reference,
        primary=f"{lib}.bench" if bench_primary else lib,
        tol=tolerance(spec.precision, reduction),
        shape=str(layer),
        extra=extra,
    )
