"""Max pooling (with argmax) and average pooling against torch.nn.functional: values, argmax,
memory formats, gradients, float64 gradcheck, opcheck, torch.compile, the nn modules and bad
input, on cpu, the emulated CUDA device in every schedule order, and cuda."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

import cnnext
from cnnext._shapes import pool_output_size

from .opspecs import Config, OpSpec, Tensors, common_cfg, input_tensor, size_for, touches
from .reference import assert_close, avg_pool2d_reference, dtypes_for, make_input


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def __str__(self) -> str:
        return (
            f"n{self.n}c{self.c}x{self.h}x{self.w}-k{self.kernel[0]}x{self.kernel[1]}"
            f"s{self.stride[0]}{self.stride[1]}p{self.padding[0]}{self.padding[1]}"
            f"d{self.dilation[0]}{self.dilation[1]}{'-ceil' if self.ceil_mode else ''}"
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    def max_args(self) -> dict:
        return dict(
            kernel_size=self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
        )

    def avg_args(self) -> dict:
        return dict(
            kernel_size=self.kernel,
            stride=self.stride,
            padding=self.padding,
            ceil_mode=self.ceil_mode,
        )


def _k(k: int, s: int, p: int = 0, d: int = 1) -> dict:
    return dict(kernel=(k, k), stride=(s, s), padding=(p, p), dilation=(d, d))


# Odd sizes; kernels 1/2/3/5 and non-square; strides 1/2/3; padding up to kernel // 2;
# dilation 1 and 2; ceil_mode both ways. Widths of 37-50 give interior rows long enough for the
# CPU kernels' vector chunks (and their overlapping last chunk); the narrow ones take the scalar
# border path throughout.
MAX_CASES = [
    Case(2, 3, 7, 7, **_k(1, 1)),
    Case(2, 3, 13, 11, **_k(2, 2)),
    Case(2, 3, 13, 11, **_k(2, 2, 1), ceil_mode=True),
    Case(1, 4, 13, 13, **_k(3, 2, 1)),
    Case(2, 3, 12, 13, **_k(3, 1, 1, 2), ceil_mode=True),
    Case(1, 3, 13, 9, (3, 5), (2, 3), (1, 2), ceil_mode=True),
    Case(2, 2, 11, 13, **_k(5, 3, 2)),
    Case(1, 2, 11, 13, **_k(5, 3, 2), ceil_mode=True),
    Case(1, 2, 9, 9, **_k(3, 3, 0, 2), ceil_mode=True),
    Case(1, 2, 9, 40, **_k(3, 2, 1)),
    Case(1, 2, 7, 37, **_k(3, 1, 1)),
    Case(1, 2, 7, 50, **_k(5, 3, 2), ceil_mode=True),
    Case(1, 2, 8, 41, (2, 3), (1, 2), (1, 1), (2, 1)),
    Case(2, 3, 7, 7, **_k(7, 7)),  # a global pool
    Case(1, 2, 11, 10, **_k(2, 3, 1), ceil_mode=True),  # stride > kernel: inputs in no window
]
# Average pooling has no dilation.
AVG_CASES = [c for c in MAX_CASES if c.dilation == (1, 1)]
# (count_include_pad, divisor_override)
AVG_MODES = [(True, None), (False, None), (True, 3), (False, -2)]
SMALL = [MAX_CASES[3], MAX_CASES[5], MAX_CASES[4]]


def _max(x: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return cnnext.ops.max_pool2d(x, return_indices=True, **case.max_args())


def _max_ref(x: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return F.max_pool2d(x, return_indices=True, **case.max_args())


def _avg(x: torch.Tensor, case: Case, mode: tuple) -> torch.Tensor:
    return cnnext.ops.avg_pool2d(
        x, **case.avg_args(), count_include_pad=mode[0], divisor_override=mode[1]
    )


def _avg_ref(x: torch.Tensor, case: Case, mode: tuple) -> torch.Tensor:
    return avg_pool2d_reference(
        x, **case.avg_args(), count_include_pad=mode[0], divisor_override=mode[1]
    )


def _same_layout(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.stride() == expected.stride(), (out.stride(), expected.stride())


# ---- max pooling -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MAX_CASES, ids=str)
def test_max_forward_matches_torch(device: str, case: Case) -> None:
    for dtype in dtypes_for(device):
        x = make_input(case.shape, device, dtype)
        out, idx = _max(x, case)
        expected, expected_idx = _max_ref(x, case)
        _same_layout(out, expected)
        _same_layout(idx, expected_idx)
        assert torch.equal(out, expected)  # a max is exact
        assert torch.equal(idx, expected_idx)


@pytest.mark.parametrize("case", MAX_CASES, ids=str)
def test_max_backward_matches_torch(device: str, case: Case) -> None:
    x = make_input(case.shape, device).requires_grad_()
    grad = torch.randn_like(_max_ref(x, case)[0])
    (got,) = torch.autograd.grad(_max(x, case)[0], x, grad)
    (expected,) = torch.autograd.grad(_max_ref(x, case)[0], x, grad)
    _same_layout(got, expected)
    assert_close(got, expected)


# ---- average pooling ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AVG_MODES, ids=lambda m: f"pad{int(m[0])}div{m[1]}")
@pytest.mark.parametrize("case", AVG_CASES, ids=str)
def test_avg_forward_matches_torch(device: str, case: Case, mode: tuple) -> None:
    for dtype in dtypes_for(device):
        x = make_input(case.shape, device, dtype)
        out = _avg(x, case, mode)
        expected = _avg_ref(x, case, mode)
        _same_layout(out, expected)
        assert_close(out, expected)


@pytest.mark.parametrize("mode", AVG_MODES, ids=lambda m: f"pad{int(m[0])}div{m[1]}")
@pytest.mark.parametrize("case", AVG_CASES, ids=str)
def test_avg_backward_matches_torch(device: str, case: Case, mode: tuple) -> None:
    x = make_input(case.shape, device).requires_grad_()
    grad = torch.randn_like(_avg_ref(x, case, mode))
    (got,) = torch.autograd.grad(_avg(x, case, mode), x, grad)
    (expected,) = torch.autograd.grad(_avg_ref(x, case, mode), x, grad)
    _same_layout(got, expected)
    assert_close(got, expected)


# ---- layouts, shapes, special values -----------------------------------------------------------


LAYOUT_CASES = [
    Case(2, 19, 7, 9, **_k(3, 2, 1)),  # 19 channels: vector chunks plus an overlapping one
    Case(2, 3, 9, 8, **_k(2, 2), ceil_mode=True),  # fewer channels than a vector
    Case(1, 5, 4, 4, **_k(3, 3, 1), ceil_mode=True),  # 2 x 2 output
    Case(2, 9, 3, 3, **_k(3, 1)),  # 1 x 1 output: torch's ambiguous-stride rule
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_layouts(device: str, layout: str, case: Case) -> None:
    """Outputs and gradients take torch's memory format (channels_last in, channels_last out),
    also when autograd hands backward a contiguous gradient."""
    for dtype in dtypes_for(device):
        x = make_input(case.shape, device, dtype, layout).requires_grad_()
        out, idx = _max(x, case)
        expected, expected_idx = _max_ref(x, case)
        _same_layout(out, expected)
        _same_layout(idx, expected_idx)
        assert torch.equal(out, expected) and torch.equal(idx, expected_idx)
        grad = torch.randn(expected.shape, device=device, dtype=dtype)  # contiguous
        (got,) = torch.autograd.grad(out, x, grad)
        (want,) = torch.autograd.grad(expected, x, grad)
        _same_layout(got, want)
        assert_close(got, want)
        for mode in AVG_MODES[:2]:
            out = _avg(x, case, mode)
            expected = _avg_ref(x, case, mode)
            _same_layout(out, expected)
            assert_close(out, expected)
            (got,) = torch.autograd.grad(out, x, grad)
            (want,) = torch.autograd.grad(expected, x, grad)
            _same_layout(got, want)
            assert_close(got, want)


@pytest.mark.parametrize("n", [0, 1])
def test_batch_zero_and_one(device: str, n: int) -> None:
    case = replace(MAX_CASES[3], n=n)
    x = torch.randn(case.shape, device=device, requires_grad=True)
    out, idx = _max(x, case)
    expected, expected_idx = _max_ref(x, case)
    _same_layout(out, expected)
    assert torch.equal(out, expected) and torch.equal(idx, expected_idx)
    out.sum().backward()
    avg = _avg(x, case, AVG_MODES[0])
    _same_layout(avg, _avg_ref(x, case, AVG_MODES[0]))
    avg.sum().backward()
    assert x.grad.shape == x.shape
    if n:
        expected_grad = torch.autograd.grad(
            _max_ref(x, case)[0].sum() + _avg_ref(x, case, AVG_MODES[0]).sum(), x
        )[0]
        assert_close(x.grad, expected_grad)


def test_unbatched_3d(device: str) -> None:
    case = MAX_CASES[5]
    x = torch.randn(case.shape[1:], device=device, requires_grad=True)
    out, idx = _max(x, case)
    expected, expected_idx = _max_ref(x, case)
    assert out.dim() == 3 and torch.equal(out, expected) and torch.equal(idx, expected_idx)
    for mode in AVG_MODES:
        assert_close(_avg(x, case, mode), _avg_ref(x, case, mode))
    grad = torch.randn_like(expected)
    (got,) = torch.autograd.grad(_max(x, case)[0], x, grad)
    assert_close(got, torch.autograd.grad(expected, x, grad)[0])
    (got,) = torch.autograd.grad(_avg(x, case, AVG_MODES[1]), x, grad)
    assert_close(got, torch.autograd.grad(_avg_ref(x, case, AVG_MODES[1]), x, grad)[0])


@pytest.mark.parametrize("case", [MAX_CASES[3], MAX_CASES[4], MAX_CASES[9]], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_propagates_as_in_torch(device: str, case: Case, layout: str) -> None:
    """A NaN wins its window (the last NaN in row-major order gives the argmax), as in torch."""
    x = make_input(replace(case, c=max(case.c, 9)).shape, device, layout=layout)
    mask = torch.rand(x.shape, device=device) < 0.2
    x = x.masked_fill(mask, float("nan"))
    out, idx = _max(x, case)
    expected, expected_idx = _max_ref(x, case)
    assert out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, expected_idx)
    if case.dilation == (1, 1):
        avg, avg_expected = _avg(x, case, AVG_MODES[0]), _avg_ref(x, case, AVG_MODES[0])
        torch.testing.assert_close(avg, avg_expected, equal_nan=True)


@pytest.mark.parametrize("case", [MAX_CASES[3], MAX_CASES[4], MAX_CASES[10]], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_take_the_first_maximum(device: str, case: Case, layout: str) -> None:
    shape = replace(case, c=max(case.c, 9)).shape
    x = torch.randint(0, 3, shape, device=device).float()
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    out, idx = _max(x, case)
    expected, expected_idx = _max_ref(x, case)
    assert torch.equal(out, expected) and torch.equal(idx, expected_idx)


def test_all_minus_inf_keeps_torchs_argmax(device: str) -> None:
    case = MAX_CASES[4]
    x = torch.full(case.shape, float("-inf"), device=device)
    out, idx = _max(x, case)
    expected, expected_idx = _max_ref(x, case)
    assert torch.equal(out, expected) and torch.equal(idx, expected_idx)


@pytest.mark.parametrize("case", [MAX_CASES[1], MAX_CASES[3], MAX_CASES[5]], ids=str)
def test_max_unpool_round_trip(device: str, case: Case) -> None:
    x = torch.randn(case.shape, device=device)
    out, idx = _max(x, case)
    size = x.shape[-2:]
    unpooled = F.max_unpool2d(out, idx, case.kernel, case.stride, case.padding, output_size=size)
    expected, expected_idx = _max_ref(x, case)
    ref = F.max_unpool2d(expected, expected_idx, case.kernel, case.stride, case.padding, size)
    assert torch.equal(unpooled, ref)
    # Every kept value sits where it came from.
    kept = unpooled != 0
    assert torch.equal(unpooled[kept], x[kept])


def test_deterministic_backward(device: str) -> None:
    case = MAX_CASES[4]  # stride 1: windows overlap, inputs gather several outputs
    x = torch.randn(case.shape, device=device, requires_grad=True)
    grad = torch.randn_like(_max_ref(x, case)[0])
    first = torch.autograd.grad(_max(x, case)[0], x, grad)[0]
    second = torch.autograd.grad(_max(x, case)[0], x, grad)[0]
    assert torch.equal(first, second)
    avg_case = replace(case, dilation=(1, 1))
    grad = torch.randn_like(_avg_ref(x, avg_case, AVG_MODES[0]))
    first = torch.autograd.grad(_avg(x, avg_case, AVG_MODES[0]), x, grad)[0]
    second = torch.autograd.grad(_avg(x, avg_case, AVG_MODES[0]), x, grad)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_cuda_kernels(emu_device: str, dtype: torch.dtype) -> None:
    """half and bfloat16 (CUDA kernels only) with float accumulation, against torch's CPU ops in
    the same dtype."""
    for case in [MAX_CASES[3], MAX_CASES[5]]:
        for layout in ["contiguous", "channels_last"]:
            x = make_input(replace(case, c=9).shape, "cpu", dtype, layout).requires_grad_()
            out, idx = _max(x, case)
            expected, expected_idx = _max_ref(x, case)
            _same_layout(out, expected)
            assert torch.equal(out, expected) and torch.equal(idx, expected_idx)
            grad = torch.randn_like(expected)
            (got,) = torch.autograd.grad(out, x, grad)
            assert_close(got, torch.autograd.grad(expected, x, grad)[0])
            for mode in AVG_MODES:
                out = _avg(x, case, mode)
                ref = _avg_ref(x.float(), case, mode)  # float math, rounded once
                assert out.dtype == dtype
                assert_close(out, ref.to(dtype))
                (got,) = torch.autograd.grad(out, x, grad)
                (want,) = torch.autograd.grad(ref, x, grad.float())
                assert_close(got, want.to(dtype))


def test_cpu_baseline_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU kernels' 16-byte (SSE2/NEON) variant, forced on this machine by the one ISA
    switch (CNNEXT_CPU_ISA, read on every call), matching torch bit for bit."""
    monkeypatch.setenv("CNNEXT_CPU_ISA", "baseline")
    gen = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float64):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 19, 9, 40, dtype=dt, generator=gen).contiguous(memory_format=fmt)
            x[0, 0, 0, :9] = float("nan")
            for k, s, p in ((3, 2, 1), (2, 1, 1), (5, 3, 2)):
                o, i = cnnext.ops.max_pool2d(x, k, s, p, return_indices=True)
                e, ei = F.max_pool2d(x, k, s, p, return_indices=True)
                torch.testing.assert_close(o, e, rtol=0, atol=0, equal_nan=True)
                assert torch.equal(i, ei)
                torch.testing.assert_close(
                    cnnext.ops.avg_pool2d(x, k, s, p), F.avg_pool2d(x, k, s, p), equal_nan=True
                )
                xg = x.nan_to_num().requires_grad_()
                for ours, ref in (
                    (cnnext.ops.avg_pool2d, F.avg_pool2d),
                    (cnnext.ops.max_pool2d, F.max_pool2d),
                ):
                    g = torch.randn(ref(xg, k, s, p).shape, dtype=dt, generator=gen)
                    got = torch.autograd.grad(ours(xg, k, s, p), xg, g)[0]
                    want = torch.autograd.grad(ref(xg, k, s, p), xg, g)[0]
                    torch.testing.assert_close(got, want)


def test_cpu_isa_switch_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad CNNEXT_CPU_ISA is refused by name, by the pooling ops as by the convolutions."""
    monkeypatch.setenv("CNNEXT_CPU_ISA", "sse9")
    with pytest.raises(
        RuntimeError, match="cnnext::max_pool2d_with_argmax: expected CNNEXT_CPU_ISA"
    ):
        cnnext.ops.max_pool2d(torch.randn(1, 2, 4, 4), 2)


def test_cpu_larger_multithreaded() -> None:
    """Several planes per task and several tasks, on the vectorised CPU paths."""
    x = torch.randn(3, 24, 30, 70)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        for case in [Case(3, 24, 30, 70, **_k(3, 2, 1)), Case(3, 24, 30, 70, **_k(2, 2))]:
            out, idx = _max(xx, case)
            expected, expected_idx = _max_ref(xx, case)
            _same_layout(out, expected)
            assert torch.equal(out, expected) and torch.equal(idx, expected_idx)
            assert_close(_avg(xx, case, AVG_MODES[0]), _avg_ref(xx, case, AVG_MODES[0]))


# ---- autograd, opcheck, compile ----------------------------------------------------------------


@pytest.mark.parametrize("case", SMALL, ids=str)
def test_gradcheck(device: str, case: Case) -> None:
    small = replace(case, n=1, c=2, h=min(case.h, 7), w=min(case.w, 8))
    x = torch.randn(small.shape, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _max(t, small)[0], (x,), eps=1e-6, atol=1e-7)
    if small.dilation == (1, 1):
        for mode in AVG_MODES:
            assert torch.autograd.gradcheck(
                lambda t, m=mode: _avg(t, small, m), (x,), eps=1e-6, atol=1e-7
            )


def _geometry(case: Case) -> tuple:
    return list(case.kernel), list(case.stride), list(case.padding)


@pytest.mark.parametrize("ns", ["cnnext", "cnnext_emu"])
def test_opcheck(ns: str) -> None:
    lib = getattr(torch.ops, ns)
    for case in [MAX_CASES[3], MAX_CASES[5]]:
        for layout in ["contiguous", "channels_last"]:
            x = make_input(case.shape, "cpu", layout=layout)
            k, s, p = _geometry(case)
            d = list(case.dilation)
            torch.library.opcheck(lib.max_pool2d_with_argmax, (x, k, s, p, d, case.ceil_mode))
            out, idx = lib.max_pool2d_with_argmax(x, k, s, p, d, case.ceil_mode)
            grad = torch.randn_like(out)
            torch.library.opcheck(
                lib.max_pool2d_backward, (grad, idx, list(x.shape), k, s, p, d, case.ceil_mode)
            )
            for cip, div in [(True, None), (False, 3)]:
                args = (k, s, p, case.ceil_mode, cip, div)
                torch.library.opcheck(lib.avg_pool2d, (x, *args))
                torch.library.opcheck(lib.avg_pool2d_backward, (grad, list(x.shape), *args))


def test_compile_fullgraph() -> None:
    x = torch.randn(2, 3, 13, 11)

    def model(t):
        y = cnnext.ops.max_pool2d(t, 3, 2, 1, ceil_mode=True)
        y = cnnext.ops.avg_pool2d(torch.relu(y), 2, 1, 1, count_include_pad=False)
        return y.sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, comp = model(a), compiled(b)
    assert_close(comp, eager)
    eager.backward()
    comp.backward()
    assert_close(b.grad, a.grad)


def test_compile_fullgraph_emulated() -> None:
    x = torch.randn(1, 2, 9, 7)

    def model(t):
        return cnnext.ops.avg_pool2d(cnnext.ops.max_pool2d(t, 2, 1), 3, 2, 1).sum()

    with cnnext.emulate_cuda():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager, comp = model(a), compiled(b)
        eager.backward()
        comp.backward()
    assert_close(comp, eager)
    assert_close(b.grad, a.grad)


# ---- nn modules --------------------------------------------------------------------------------


MODULES = [
    (torch.nn.MaxPool2d(3, 2, 1), cnnext.nn.MaxPool2d(3, 2, 1)),
    (
        torch.nn.MaxPool2d((3, 2), dilation=(1, 2), ceil_mode=True),
        cnnext.nn.MaxPool2d((3, 2), dilation=(1, 2), ceil_mode=True),
    ),
    (torch.nn.AvgPool2d(2), cnnext.nn.AvgPool2d(2)),
    (
        torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=4),
        cnnext.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=4),
    ),
]


@pytest.mark.parametrize("pair", MODULES, ids=lambda p: repr(p[0]))
def test_modules_match_torch(device: str, pair: tuple) -> None:
    reference, module = pair
    assert repr(module) == repr(reference)
    assert module.state_dict().keys() == reference.state_dict().keys()
    converted = type(module).from_torch(reference)
    assert repr(converted) == repr(reference) and vars(converted).keys() >= {"kernel_size"}
    for name in reference.__constants__:
        assert getattr(converted, name) == getattr(reference, name), name
    x = torch.randn(2, 3, 11, 10, device=device, requires_grad=True)
    out, expected = module(x), reference(x)
    assert_close(out, expected)
    grad = torch.randn_like(expected)
    assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_max_module_return_indices(device: str) -> None:
    module = cnnext.nn.MaxPool2d(2, return_indices=True)
    reference = torch.nn.MaxPool2d(2, return_indices=True)
    x = torch.randn(1, 2, 7, 9, device=device)
    (out, idx), (expected, expected_idx) = module(x), reference(x)
    assert torch.equal(out, expected) and torch.equal(idx, expected_idx)
    assert cnnext.nn.MaxPool2d.from_torch(reference).return_indices


# ---- bad input ---------------------------------------------------------------------------------


# Rows every op shares (rank, integer dtype, kernel/stride/dilation/padding signs, output size)
# are in tests/test_bad_input.py; these are pooling's own.
BAD = [
    # (description, op, input shape, kwargs, message)
    (
        "padding over half the kernel",
        "max",
        (1, 2, 5, 5),
        {"kernel_size": 3, "padding": 2},
        "padding to be at most half of kernel_size",
    ),
    (
        "padding over half the kernel",
        "avg",
        (1, 2, 5, 5),
        {"kernel_size": (4, 2), "padding": (1, 2)},
        "padding to be at most half of kernel_size",
    ),
    (
        "zero divisor",
        "avg",
        (1, 2, 5, 5),
        {"kernel_size": 2, "divisor_override": 0},
        "divisor_override to be non-zero",
    ),
    ("empty plane", "max", (1, 2, 0, 5), {"kernel_size": 1}, "non-zero channels, height and width"),
    (
        "dilated window over padding only",
        "max",
        (1, 2, 2, 12),
        {"kernel_size": 2, "padding": (1, 0), "dilation": (3, 2), "ceil_mode": True},
        "window 0 along the height reads only padding",
    ),
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: f"{b[1]}-{b[0]}")
def test_bad_input(device: str, bad: tuple) -> None:
    _, which, shape, kwargs, message = bad
    x = torch.randn(shape, device=device)
    op = "max_pool2d_with_argmax" if which == "max" else "avg_pool2d"
    fn = cnnext.ops.max_pool2d if which == "max" else cnnext.ops.avg_pool2d
    with pytest.raises(
        RuntimeError, match=f"cnnext::{op}: expected .*{message}|cnnext::{op}: {message}"
    ):
        fn(x, **kwargs)


def test_bad_reduced_dtype_on_cpu() -> None:
    x = torch.randn(1, 2, 5, 5, dtype=torch.float16)
    with pytest.raises(
        RuntimeError, match=r"cnnext::avg_pool2d: expected input .*\(float32 or float64\)"
    ):
        cnnext.ops.avg_pool2d(x, 2)


@pytest.mark.parametrize("ns", ["cnnext", "cnnext_emu"])
def test_bad_backward_arguments(ns: str) -> None:
    lib = getattr(torch.ops, ns)
    x = torch.randn(1, 2, 6, 6)
    geometry = ([2, 2], [2, 2], [0, 0])
    out, idx = lib.max_pool2d_with_argmax(x, *geometry, [1, 1], False)
    grad = torch.randn_like(out)
    op = "cnnext::max_pool2d_backward"
    with pytest.raises(RuntimeError, match=f"{op}: expected argmax to have dtype int64"):
        lib.max_pool2d_backward(grad, idx.int(), [1, 2, 6, 6], *geometry, [1, 1], False)
    with pytest.raises(RuntimeError, match=f"{op}: expected argmax of the same shape"):
        lib.max_pool2d_backward(grad, idx[..., :2], [1, 2, 6, 6], *geometry, [1, 1], False)
    with pytest.raises(RuntimeError, match=f"{op}: expected grad_output of shape"):
        lib.max_pool2d_backward(grad, idx, [1, 2, 8, 6], *geometry, [1, 1], False)
    with pytest.raises(RuntimeError, match=f"{op}: expected input_size to have 3 or 4 entries"):
        lib.max_pool2d_backward(grad, idx, [6, 6], *geometry, [1, 1], False)
    if ns == "cnnext":  # the CPU kernel checks argmax values (the CUDA gather ignores strays)
        with pytest.raises(RuntimeError, match=f"{op}: argmax holds 99"):
            lib.max_pool2d_backward(grad, idx.fill_(99), [1, 2, 6, 6], *geometry, [1, 1], False)
    op = "cnnext::avg_pool2d_backward"
    with pytest.raises(RuntimeError, match=f"{op}: expected grad_output of shape"):
        lib.avg_pool2d_backward(grad, [1, 2, 7, 9], *geometry, False, True, None)
    with pytest.raises(RuntimeError, match=f"{op}: expected divisor_override to be non-zero"):
        lib.avg_pool2d_backward(grad, [1, 2, 6, 6], *geometry, False, True, 0)


# ---- OpSpecs (tests/opspecs.py: fuzzing, bad input, determinism, leaks) -------------------------


def _draw_pool(draw: Callable, emulated: bool, dilated: bool) -> Config:
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if dilated else (1, 1)
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    stride = st.one_of(st.integers(1, 3), st.integers(4, 40))
    cfg = dict(
        n=draw(st.integers(0, 3)),
        c=draw(st.integers(1, 5)),
        kernel=(kh, kw),
        # None: stride = kernel_size, as in torch.
        stride=draw(st.one_of(st.none(), st.tuples(stride, stride))),
        padding=(ph, pw),
        dilation=(dh, dw),
        ceil_mode=draw(st.booleans()),
        h=size_for(draw, dh * (kh - 1) + 1, ph, 8 if emulated else 12),
        w=size_for(draw, dw * (kw - 1) + 1, pw, 8 if emulated else 12),
    )
    return common_cfg(draw, cfg)


def _draw_max(draw: Callable, emulated: bool) -> Config:
    cfg = _draw_pool(draw, emulated, dilated=True)
    stride = cfg["stride"] or cfg["kernel"]
    for i, size in enumerate((cfg["h"], cfg["w"])):
        k, s, p, d = cfg["kernel"][i], stride[i], cfg["padding"][i], cfg["dilation"][i]
        out = pool_output_size(size, k, s, p, d, cfg["ceil_mode"])
        assume(all(touches(o * s - p, k, d, size) for o in range(out)))
    return cfg


def _draw_avg(draw: Callable, emulated: bool) -> Config:
    cfg = _draw_pool(draw, emulated, dilated=False)
    cfg["count_include_pad"] = draw(st.booleans())
    divisor = st.one_of(st.integers(-3, -1), st.integers(1, 7))
    cfg["divisor_override"] = draw(st.one_of(st.none(), divisor))
    return cfg


def _make_pool(cfg: Config, device: str, dtype: torch.dtype) -> Tensors:
    return [input_tensor(cfg, device, dtype, cfg["c"])]


def _max_kwargs(cfg: Config) -> dict:
    return dict(
        kernel_size=cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        ceil_mode=cfg["ceil_mode"],
    )


def _avg_kwargs(cfg: Config) -> dict:
    return dict(
        kernel_size=cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg["ceil_mode"],
        count_include_pad=cfg["count_include_pad"],
        divisor_override=cfg["divisor_override"],
    )


def _run_max(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    out, idx = cnnext.ops.max_pool2d(t[0], return_indices=True, **_max_kwargs(cfg))
    return out, (idx,)


def _ref_max(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    out, idx = F.max_pool2d(t[0], return_indices=True, **_max_kwargs(cfg))
    return out, (idx,)


def _run_avg(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    return cnnext.ops.avg_pool2d(t[0], **_avg_kwargs(cfg)), ()


def _ref_avg(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    return avg_pool2d_reference(t[0], **_avg_kwargs(cfg)), ()


POOL_EXAMPLE = dict(
    n=2, c=3, kernel=(3, 2), stride=(1, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=True,
    h=9, w=8, batched=True, layout="contiguous", count_include_pad=False, divisor_override=None,
)  # fmt: skip

MAX_SPEC = OpSpec(
    name="max_pool2d",
    op="max_pool2d_with_argmax",
    draw=_draw_max,
    make=_make_pool,
    run=_run_max,
    ref=_ref_max,
    scales=lambda cfg: (1.0, 1.0),
    grad_names=("input",),
    example={**POOL_EXAMPLE, "dilation": (2, 1)},
)
AVG_SPEC = OpSpec(
    name="avg_pool2d",
    op="avg_pool2d",
    draw=_draw_avg,
    make=_make_pool,
    run=_run_avg,
    ref=_ref_avg,
    scales=lambda cfg: (1.0, 1.0),
    grad_names=("input",),
    example=POOL_EXAMPLE,
)


OPSPECS = [MAX_SPEC, AVG_SPEC]
