"""The ``fused`` family: ``cnnext.ops.conv_bn_relu`` against eager conv -> batch_norm -> relu."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

import cnnext

from ..config import DTYPES, Plan, Spec
from .base import Case, Impl, outputs, pass_calls, place, randn, tolerance


def fused_case(spec: Spec, plan: Plan, algos: Sequence[str] = ("auto",)) -> Case:
    """``cnnext.ops.conv_bn_relu`` (BN folded in eval; batch statistics and running-stat
    updates in train) against eager ``F.conv2d -> F.batch_norm -> F.relu``, once per ``algo``
    in ``algos`` (``auto``: ``cnnext.fused``; else ``cnnext.fused.<algo>``). Eval forward also
    times ``cnnext.conv+relu``: cnnext's convolution (auto's pick) on parameters folded ahead of
    time, then a separate ReLU pass, which the fused op's call-time folding and ReLU in the
    output store replace. Each
    implementation updates its own copy of the running statistics; in train they are compared
    after one call. The gradient of the output is zero where the reference pre-activation is
    within 1e-3 of its max from zero, so a ReLU mask that flips on a rounding difference
    cannot fail validation."""
    layer, n = spec.layer, spec.batch
    training = spec.op.endswith("train")
    dtype = DTYPES[spec.precision]
    gen = torch.Generator().manual_seed(spec.seed)
    x = place(randn((n, layer.c_in, layer.size, layer.size), gen), plan, dtype, spec.layout)
    w = randn((layer.c_out, layer.c_in, layer.k, layer.k), gen, (layer.c_in * layer.k**2) ** -0.5)
    gamma = 1.0 + randn((layer.c_out,), gen, 0.1)
    beta = randn((layer.c_out,), gen, 0.1)
    mean0 = place(randn((layer.c_out,), gen, 0.1), plan, dtype)
    var0 = place(1.0 + torch.rand(layer.c_out, generator=gen), plan, dtype)
    w, gamma, beta = (place(t, plan, dtype) for t in (w, gamma, beta))
    s, p, momentum, eps = (layer.stride,) * 2, (layer.padding,) * 2, 0.1, 1e-5
    with torch.no_grad():
        z = F.batch_norm(
            F.conv2d(x, w, None, s, p), mean0.clone(), var0.clone(), gamma, beta, training
        )
    grad = place(randn(z.shape, gen), plan, dtype, spec.layout)
    grad[z.abs() <= 1e-3 * z.abs().max()] = 0

    def eager(xx, ww, gg, bb, stats):
        y = F.conv2d(xx, ww, None, s, p)
        return F.relu(F.batch_norm(y, *stats, gg, bb, training, momentum, eps))

    def ours(xx, ww, gg, bb, stats, algo="auto"):
        # algo only when asked for: the harness tests plant stand-ins without it.
        chosen = {} if algo == "auto" else {"algo": algo}
        return cnnext.ops.conv_bn_relu(
            input=xx,
            weight=ww,
            conv_bias=None,
            bn_weight=gg,
            bn_bias=bb,
            running_mean=stats[0],
            running_var=stats[1],
            training=training,
            momentum=momentum,
            eps=eps,
            stride=s,
            padding=p,
            dilation=(1, 1),
            groups=1,
            **chosen,
        )

    impls = []
    names = {"eager": (eager, True, contextlib.nullcontext)}
    if not training and spec.pass_ == "fwd":
        # torch's own answer for inference: BatchNorm folded once ahead of time.
        with torch.no_grad():
            fw, fb = fuse_conv_bn_weights(w, None, mean0, var0, eps, gamma, beta)

        def folded(xx, ww, gg, bb, stats):
            return F.relu(F.conv2d(xx, fw, fb, s, p))

        names["torch.fuse_eval"] = (folded, True, contextlib.nullcontext)
    for algo in algos:
        name = "cnnext.fused" + ("" if algo == "auto" else f".{algo}")
        names[name] = (functools.partial(ours, algo=algo), False, plan.cnnext_context)
    if not training and spec.pass_ == "fwd":
        with plan.cnnext_context():  # the emulated device chooses as CUDA does
            pick, variant = cnnext._algo.choose(x, fw, s, p, (1, 1), 1)

        def conv_then_relu(xx, ww, gg, bb, stats):
            y = cnnext.ops.conv2d(xx, fw, fb, s, p, algo=pick, variant=variant)
            return torch.relu_(y)

        names["cnnext.conv+relu"] = (conv_then_relu, False, plan.cnnext_context)
    leaves = [x, w, gamma, beta]
    for name, (fn, baseline, context) in names.items():
        stats = (mean0.clone(), var0.clone())
        bound = lambda *a, fn=fn, stats=stats: fn(*a, stats)
        call = pass_calls(spec, {name: bound}, leaves, grad)[name]
        if training:
            call = lambda call=call, stats=stats: (*outputs(call()), *stats)

        def reset(stats=stats) -> None:
            stats[0].copy_(mean0)
            stats[1].copy_(var0)

        impls.append(Impl(name, call, baseline, context, reset))
    backward = spec.pass_ != "fwd"
    reduction = max(layer.c_in * layer.k**2, n * layer.out_size**2)
    if backward:
        reduction = max(reduction, layer.c_out * layer.k**2)
    return Case(
        spec=spec,
        work=layer.flops(n) * (3.0 if backward else 1.0),
        unit="GFLOP/s",
        impls=impls,
        reference="eager",
        primary="eager",
        tol=tolerance(spec.precision, reduction),
        shape=str(layer),
    )
