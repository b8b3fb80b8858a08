"""The ``pool`` family: cnnext's max (with argmax) and average pooling against torch's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import cnnext

from ..config import DTYPES, Plan, Spec
from .base import Case, Impl, pass_calls, place, randn, tolerance


def pool_case(spec: Spec, plan: Plan) -> Case:
    """``cnnext.ops.max_pool2d(return_indices=True)`` / ``avg_pool2d`` against
    ``F.max_pool2d(return_indices=True)`` / ``F.avg_pool2d``. Max pooling must give identical
    values and argmax. Bytes: the input read and the outputs written once (values + int64
    argmax); backward adds grad_output (and argmax) read and grad_input written."""
    layer, n = spec.layer, spec.batch
    dtype = DTYPES[spec.precision]
    gen = torch.Generator().manual_seed(spec.seed)
    x = place(randn((n, layer.c, layer.size, layer.size), gen), plan, dtype, spec.layout)
    grad = place(randn((n, layer.c, layer.out_size, layer.out_size), gen), plan, dtype)
    k, st, p = layer.k, layer.stride, layer.padding
    if spec.op == "max_pool2d":
        fns = {
            "torch": lambda xx: F.max_pool2d(xx, k, st, p, return_indices=True),
            "cnnext": lambda xx: cnnext.ops.max_pool2d(xx, k, st, p, return_indices=True),
        }
        out_bytes = dtype.itemsize + 8
    else:
        fns = {
            "torch": lambda xx: F.avg_pool2d(xx, k, st, p),
            "cnnext": lambda xx: cnnext.ops.avg_pool2d(xx, k, st, p),
        }
        out_bytes = dtype.itemsize
    calls = pass_calls(spec, fns, [x], grad)
    impls = [
        Impl("torch", calls["torch"], baseline=True),
        Impl("cnnext", calls["cnnext"], context=plan.cnnext_context),
    ]
    in_bytes, outs = x.numel() * dtype.itemsize, n * layer.c * layer.out_size**2
    work = in_bytes + outs * out_bytes
    if spec.pass_ != "fwd":
        work += outs * out_bytes + in_bytes
    return Case(
        spec=spec,
        work=float(work),
        unit="GB/s",
        impls=impls,
        reference="torch",
        primary="torch",
        tol=tolerance(spec.precision, layer.k**2),
        exact=(0, 1) if spec.op == "max_pool2d" else (),
        shape=str(layer),
    )
