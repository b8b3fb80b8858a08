"""The ``host`` family: what a call costs on tensors so small that the kernel is nothing.

Each op of ``HOST_CASES`` runs cnnext's functional op or module against torch's twin on a
``1 x 4 x 6 x 6`` CPU tensor at one thread: ``fwd`` is a forward under ``no_grad``, ``fwd+bwd``
a forward and ``autograd.grad`` of the input and every parameter (nothing accumulates in
``.grad``). The modules share their parameters' values; train-mode BatchNorm compares the
running statistics after one call. Rows report microseconds per call (``calls/s`` as rate).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import cnnext

from ..config import Spec
from ..shapes import ConvLayer, PoolLayer
from .base import Case, Impl, outputs, randn, tolerance


def _conv_modules(layer: ConvLayer, gen: torch.Generator) -> tuple[nn.Module, nn.Module]:
    theirs = nn.Conv2d(layer.c_in, layer.c_out, layer.k, layer.stride, layer.padding)
    with torch.no_grad():
        theirs.weight.copy_(randn(theirs.weight.shape, gen, layer.reduction**-0.5))
        theirs.bias.copy_(randn(theirs.bias.shape, gen, 0.1))
    ours = cnnext.nn.Conv2d(layer.c_in, layer.c_out, layer.k, layer.stride, layer.padding)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _fused_modules(
    layer: ConvLayer, gen: torch.Generator, training: bool
) -> tuple[nn.Module, nn.Module]:
    # No conv bias, as in the networks: before batch statistics its gradient is exactly zero
    # in theory and rounding noise in practice, which no tolerance can compare.
    conv = nn.Conv2d(layer.c_in, layer.c_out, layer.k, layer.stride, layer.padding, bias=False)
    bn = nn.BatchNorm2d(layer.c_out)
    with torch.no_grad():
        conv.weight.copy_(randn(conv.weight.shape, gen, layer.reduction**-0.5))
        bn.weight.copy_(1.0 + randn(bn.weight.shape, gen, 0.1))
        bn.bias.copy_(randn(bn.bias.shape, gen, 0.1))
        bn.running_mean.copy_(randn(bn.running_mean.shape, gen, 0.1))
        bn.running_var.copy_(1.0 + torch.rand(bn.running_var.shape, generator=gen))
    theirs = nn.Sequential(conv, bn, nn.ReLU()).train(training)
    ours = cnnext.nn.ConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    return ours.train(training), theirs


def _modules(spec: Spec, gen: torch.Generator) -> tuple[Callable, Callable, list, bool]:
    """(cnnext's callable, torch's, the parameters of each as leaves, whether it is trained)."""
    layer = spec.layer
    op = spec.op.removeprefix("host.")
    if op == "F.conv2d":
        assert isinstance(layer, ConvLayer)
        w = randn((layer.c_out, layer.c_in, layer.k, layer.k), gen, layer.reduction**-0.5)
        b = randn((layer.c_out,), gen, 0.1)
        s, p = layer.stride, layer.padding
        return (
            lambda x, w, b: cnnext.ops.conv2d(x, w, b, s, p),
            lambda x, w, b: F.conv2d(x, w, b, s, p),
            [w, b],
            False,
        )
    if op in ("nn.MaxPool2d", "nn.AvgPool2d"):
        assert isinstance(layer, PoolLayer)
        kind = op.removeprefix("nn.")
        args = (layer.k, layer.stride, layer.padding)
        return getattr(cnnext.nn, kind)(*args), getattr(nn, kind)(*args), [], False
    assert isinstance(layer, ConvLayer)
    if op == "nn.Conv2d":
        ours, theirs = _conv_modules(layer, gen)
        training = False
    else:
        training = op.endswith("train")
        ours, theirs = _fused_modules(layer, gen, training)
    return ours, theirs, [], training


def host_case(spec: Spec) -> Case:
    """cnnext against torch on one tiny CPU case (``spec.op`` names the pair)."""
    layer, n = spec.layer, spec.batch
    gen = torch.Generator().manual_seed(spec.seed)
    c_in = layer.c_in if isinstance(layer, ConvLayer) else layer.c
    x = randn((n, c_in, layer.size, layer.size), gen)
    ours, theirs, tensors, training = _modules(spec, gen)
    out_c = layer.c_out if isinstance(layer, ConvLayer) else layer.c
    grad = randn((n, out_c, layer.out_size, layer.out_size), gen)
    impls = []
    for name, fn in (("torch", theirs), ("cnnext", ours)):
        modules = [fn] if isinstance(fn, nn.Module) else []
        params = [t.clone().requires_grad_() for t in tensors]
        params += [q for m in modules for q in m.parameters()]
        buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        initial = [b.clone() for b in buffers]
        if spec.pass_ == "fwd":

            def call(fn=fn, params=params) -> tuple:
                with torch.no_grad():
                    return outputs(fn(x, *params[: len(tensors)]))

        else:
            leaf = x.clone().requires_grad_()

            def call(fn=fn, params=params, leaf=leaf, buffers=buffers) -> tuple:
                out = fn(leaf, *params[: len(tensors)])
                grads = torch.autograd.grad(out, [leaf, *params], grad)
                return (out, *grads, *buffers)

        def reset(buffers=buffers, initial=initial) -> None:
            for b, b0 in zip(buffers, initial, strict=True):
                b.copy_(b0)

        impls.append(Impl(name, call, baseline=name == "torch", reset=reset))
    if training:
        # No gradient where the pre-activation is within rounding of ReLU's kink.
        with torch.no_grad():
            pre = copy.deepcopy(theirs[:2])(x)
        grad[pre.abs() <= 1e-3 * pre.abs().max()] = 0
    reduction = layer.reduction if isinstance(layer, ConvLayer) else layer.k**2
    return Case(
        spec=spec,
        work=1e9,  # one call: the rate column is calls per second
        unit="calls/s",
        impls=impls,
        reference="torch",
        primary="torch",
        tol=tolerance("fp32", max(reduction, n * layer.out_size**2 * 4)),
        exact=(),
        shape=f"{n}x{c_in}x{layer.size}x{layer.size} {layer}",
    )
