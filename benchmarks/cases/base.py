"""What every family's cases are made of: implementations, the case, tolerances, the flags
around a call and the timed calls of each pass."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ROUNDOFF, Plan, Spec


@dataclass
class Impl:
    """One implementation of a case.

    Attributes:
        name: its column in the tables (``cnnext.direct``, ``oneDNN``, ...).
        call: the timed call; returns the tensors validation compares (forward outputs, then
            the gradients for forward+backward).
        baseline: a PyTorch baseline (cnnext's rows get a speed-up against each baseline).
        context: flags around every call (validation and timing).
        reset: restores state a call mutates (running statistics) before validation.
        timed: False for a reference that is only used to validate (float64).
    """

    name: str
    call: Callable[[], Any]
    baseline: bool = False
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    reset: Callable[[], None] | None = None
    timed: bool = True


@dataclass
class Case:
    """A spec with its tensors and implementations.

    Attributes:
        work: FLOPs (``unit == "GFLOP/s"``) or bytes moved (``"GB/s"``) of one call.
        reference: the implementation every other one must match.
        primary: the baseline the plot compares against.
        tol: bound on ``max|got - expected| / max|expected|`` per output tensor.
        exact: indices of outputs that must be bit-identical (integer outputs always are).
    """

    spec: Spec
    work: float
    unit: str
    impls: list[Impl]
    reference: str
    primary: str
    tol: float
    exact: tuple[int, ...] = ()
    shape: str = ""
    extra: dict = field(default_factory=dict)


def tolerance(precision: str, reduction: int) -> float:
    """Relative-to-max error bound: the precision's roundoff plus fp32 accumulation error that
    grows like sqrt(terms), with a factor 8 of headroom."""
    return max(1e-5, 8.0 * (ROUNDOFF[precision] + 2.0**-24 * math.sqrt(reduction)))


def _chain(*factories: Callable[[], contextlib.AbstractContextManager]) -> Callable:
    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for f in factories:
                stack.enter_context(f())
            yield

    return context


@contextlib.contextmanager
def _attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def torch_im2col_path() -> contextlib.AbstractContextManager:
    """oneDNN and NNPACK off: ``F.conv2d`` and its backward take aten's ``slow_conv2d``
    (im2col + GEMM) on the CPU."""
    return _chain(
        lambda: _attr(torch.backends.mkldnn, "enabled", False),
        lambda: torch.backends.nnpack.flags(enabled=False),
    )()


def cudnn_benchmark(on: bool) -> contextlib.AbstractContextManager:
    return _attr(torch.backends.cudnn, "benchmark", on)


@contextlib.contextmanager
def precision_flags(precision: str, plan: Plan) -> Iterator[None]:
    """TF32 on for ``tf32`` and explicitly off otherwise, for cuDNN convolutions and cuBLAS
    (cnnext's im2col GEMM follows the matmul flag), through the fp32_precision API only (torch
    refuses to read TF32 state set through a mix of the old and new APIs)."""
    if plan.kind == "cpu":
        yield
        return
    mode = "tf32" if precision == "tf32" else "ieee"
    with (
        _attr(torch.backends.cudnn.conv, "fp32_precision", mode),
        _attr(torch.backends.cuda.matmul, "fp32_precision", mode),
    ):
        yield


def randn(shape: Sequence[int], gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def place(t: torch.Tensor, plan: Plan, dtype: torch.dtype, layout: str = "NCHW") -> torch.Tensor:
    t = t.to(plan.device, dtype)
    if layout == "NHWC" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def outputs(result: Any) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def forward_call(fn: Callable, args: Sequence) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return fn(*args)

    return call


def forward_backward_call(fn: Callable, leaves: Sequence[torch.Tensor], grad: torch.Tensor):
    """``fn(*leaves)`` then the gradients of its first output with respect to ``leaves``."""

    def call() -> tuple:
        out = outputs(fn(*leaves))
        grads = torch.autograd.grad(out[0], leaves, grad)
        return (*out, *grads)

    return call


def pass_calls(spec: Spec, fns: dict[str, Callable], inputs: Sequence, grad: torch.Tensor):
    """The timed call of each function for the spec's pass. Forward+backward shares one set of
    leaves (``autograd.grad`` accumulates nothing) that need gradients."""
    if spec.pass_ == "fwd":
        return {name: forward_call(fn, inputs) for name, fn in fns.items()}
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return {name: forward_backward_call(fn, leaves, grad) for name, fn in fns.items()}
