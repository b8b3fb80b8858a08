"""The C++ autograd of each op family (the CNNEXT_AUTOGRAD block of its csrc/<family>/<family>.h,
on csrc/common/autograd.h): the node a differentiable call records, that neither forward nor
backward re-enters Python, which gradients a backward pass computes, and calls that must record
nothing. Gradient values are held against torch in each family's own test file."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F

import cnnext

CNNEXT_DIR = cnnext.__file__.rsplit("/", 1)[0]


def _calls(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> Iterator[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], tuple]]:
    """(family, cnnext call, torch call, leaves) for every differentiable family."""
    yield (
        "MaxPool2dBackward",
        lambda: cnnext.ops.max_pool2d(x, 3, 2, 1),
        lambda: F.max_pool2d(x, 3, 2, 1),
        (x,),
    )
    yield (
        "AvgPool2dBackward",
        lambda: cnnext.ops.avg_pool2d(x, 3, 2, 1),
        lambda: F.avg_pool2d(x, 3, 2, 1),
        (x,),
    )
    for algo in ("direct", "im2col"):
        yield (
            f"Conv2d{algo.capitalize()}Backward",
            lambda algo=algo: cnnext.ops.conv2d(x, w, b, 1, 1, algo=algo),
            lambda: F.conv2d(x, w, b, 1, 1),
            (x, w, b),
        )
    gamma = torch.rand_like(b).add(0.5).requires_grad_(b.requires_grad)
    beta = torch.randn_like(b).requires_grad_(b.requires_grad)
    mean, var = torch.randn_like(b).detach(), torch.rand_like(b).add(0.5).detach()
    for training in (True, False):
        yield (
            "ConvBNReLU2dBackward",
            lambda training=training: cnnext.ops.conv_bn_relu(
                x, w, b, gamma, beta, mean.clone(), var.clone(), training, padding=1
            ),
            lambda training=training: F.relu(
                F.batch_norm(
                    F.conv2d(x, w, b, 1, 1), mean.clone(), var.clone(), gamma, beta, training
                )
            ),
            (x, w, b, gamma, beta),
        )


def _leaves(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    return x, w, b


def test_one_cpp_node_per_family(device: str) -> None:
    """A differentiable call records one C++ node of its family, also in the emulator's
    namespace, with an edge per tensor argument (an absent optional one: an empty edge), and a
    torch.autograd.graph creation hook sees it."""
    for family, ours, _, leaves in _calls(*_leaves(device)):
        seen: list[str] = []
        with torch.autograd.graph.node_creation_hook(lambda n, seen=seen: seen.append(n.name())):
            node = ours().grad_fn
        assert node is not None and node.name() == family, (family, node and node.name())
        assert seen.count(family) == 1, seen  # (and the leaves' AccumulateGrad nodes)
        edges = [fn for fn, _ in node.next_functions]
        accumulated = [getattr(fn, "variable", None) for fn in edges if fn is not None]
        assert all(any(a is leaf for a in accumulated) for leaf in leaves), family


class _PythonCalls:
    """Records calls of Python functions defined in the cnnext package."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(CNNEXT_DIR):
            self.seen.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    def __enter__(self) -> _PythonCalls:
        sys.setprofile(self)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


def test_backward_never_enters_python(device: str) -> None:
    """Backward runs no cnnext Python code (the Python autograd.Functions are gone), and the
    gradients match torch's."""
    for family, ours, theirs, leaves in _calls(*_leaves(device)):
        out = ours()
        grad = torch.randn_like(out)
        with _PythonCalls() as calls:
            got = torch.autograd.grad(out, leaves, grad)
        assert calls.seen == [], (family, calls.seen)
        want = torch.autograd.grad(theirs(), leaves, grad)
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e)


def test_backward_computes_what_is_asked(device: str) -> None:
    """torch.autograd.grad for one leaf gets that gradient alone (the backward op's output_mask
    follows the pass, not just requires_grad), equal to the full pass's."""
    x, w, b = _leaves(device)
    for algo in ("direct", "im2col"):
        out = cnnext.ops.conv2d(x, w, b, 1, 1, algo=algo)
        grad = torch.randn_like(out)
        full = torch.autograd.grad(out, (x, w, b), grad, retain_graph=True)
        for i, leaf in enumerate((x, w, b)):
            (alone,) = torch.autograd.grad(out, leaf, grad, retain_graph=True)
            torch.testing.assert_close(alone, full[i])


def test_no_node_without_grad(device: str) -> None:
    """Under no_grad, or with no input requiring a gradient, a call records nothing."""
    x, w, b = _leaves(device)
    with torch.no_grad():
        for _, ours, _, _ in _calls(x, w, b):
            assert ours().grad_fn is None
    for _, ours, _, _ in _calls(x.detach(), w.detach(), b.detach()):
        assert ours().grad_fn is None


def test_fused_op_updates_running_stats(device: str) -> None:
    """The fused op itself writes the running statistics in training, exactly as F.batch_norm
    (unbiased variance, momentum, strided buffers), bumping their version counters; eval and an
    empty batch leave them alone."""
    lib = cnnext._backend.ops_for(torch.empty(0, device=device))
    x = torch.randn(3, 3, 6, 5, device=device, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64)
    conf = ([1, 1], [1, 1], [1, 1], 1)
    store = torch.randn(4, 2, device=device, dtype=torch.float64)
    mean, var = store[:, 0], store[:, 1].abs().add_(0.5)  # views with stride 2
    want_mean, want_var = mean.clone(), var.clone()
    F.batch_norm(F.conv2d(x, w, padding=1), want_mean, want_var, None, None, True, 0.3, 1e-5)
    versions = mean._version, var._version
    lib.conv_bn_relu(x, w, None, None, None, mean, var, True, 0.3, 1e-5, *conf)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    assert mean._version > versions[0] and var._version > versions[1]
    before = mean.clone(), var.clone()
    lib.conv_bn_relu(x, w, None, None, None, mean, var, False, 0.3, 1e-5, *conf)
    lib.conv_bn_relu(x[:0], w, None, None, None, mean, var, True, 0.3, 1e-5, *conf)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])


def test_compiled_autograd_captures_every_node() -> None:
    """torch._dynamo.compiled_autograd on an eager forward: each family's node is lifted into
    the captured backward graph (a call of its functional form), AOTAutograd traces through it
    to the family's backward op, and the gradients are eager's. A second pass with the same
    shapes reuses the compiled graph."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    dynamo_graphs: list[str] = []
    aot_graphs: list[str] = []

    def inner(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        aot_graphs.append(gm.code)
        return gm.forward

    aot = aot_autograd(fw_compiler=inner)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        dynamo_graphs.append(gm.code)
        return aot(gm, example_inputs)

    for family, ours, _, leaves in _calls(*_leaves("cpu")):
        out = ours()
        grad = torch.randn_like(out)
        want = torch.autograd.grad(out, leaves, grad, retain_graph=True)
        dynamo_graphs.clear()
        aot_graphs.clear()
        for _ in range(2):
            with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
                got = torch.autograd.grad(out, leaves, grad, retain_graph=True)
            for g, e in zip(got, want, strict=True):
                torch.testing.assert_close(g, e, rtol=0, atol=0)
        assert len(dynamo_graphs) == 1 and len(aot_graphs) == 1, (family, dynamo_graphs)
        assert family in dynamo_graphs[0], (family, dynamo_graphs[0])
        assert "torch.ops.cnnext." in aot_graphs[0] and "_backward" in aot_graphs[0], (
            family,
            aot_graphs[0],
        )
    # Behind a node torch lifts (sum's backward), as in a training step.
    for _, ours, theirs, leaves in _calls(*_leaves("cpu")):
        with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
            got = torch.autograd.grad(ours().square().sum(), leaves)
        want = torch.autograd.grad(theirs().square().sum(), leaves)
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e)
