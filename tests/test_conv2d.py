"""Both convolutions (algo="direct" and algo="im2col") against torch.nn.functional.conv2d:
outputs, gradients, float64 gradcheck, opcheck, torch.compile and bad input, on cpu, the
emulated CUDA device in every schedule order, and cuda."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import cnnext

from .opspecs import conv_spec
from .reference import assert_close, dtypes_for, make_input

ALGOS = ["direct", "im2col"]


@dataclass(frozen=True)
class Case:
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    def __str__(self) -> str:
        return (
            f"n{self.n}c{self.c_in}x{self.h}x{self.w}-o{self.c_out}k{self.kh}x{self.kw}"
            f"s{self.stride[0]}{self.stride[1]}p{self.padding[0]}{self.padding[1]}"
            f"d{self.dilation[0]}{self.dilation[1]}g{self.groups}{'b' if self.bias else ''}"
        )

    def tensors(self, device: str, dtype: torch.dtype, layout: str = "contiguous"):
        x = make_input((self.n, self.c_in, self.h, self.w), device, dtype, layout)
        w = (
            torch.randn(
                self.c_out, self.c_in // self.groups, self.kh, self.kw, device=device, dtype=dtype
            )
            / (self.c_in // self.groups * self.kh * self.kw) ** 0.5
        )
        b = torch.randn(self.c_out, device=device, dtype=dtype) if self.bias else None
        return x, w, b

    def kwargs(self) -> dict:
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups
        )

    @property
    def reduction(self) -> int:
        return self.c_in // self.groups * self.kh * self.kw


# Odd sizes on purpose: 7, 13, odd channel counts, non-square kernels.
CASES = [
    Case(1, 1, 7, 7, 1, 1, 1, bias=False),
    Case(2, 3, 13, 13, 5, 3, 3, padding=(1, 1)),
    Case(3, 3, 13, 7, 4, 5, 5, stride=(2, 2), padding=(2, 2)),
    Case(1, 5, 13, 13, 7, 7, 7, padding=(3, 3)),
    Case(2, 4, 13, 11, 6, 3, 5, stride=(1, 2), padding=(1, 2), bias=False),
    Case(2, 3, 13, 13, 4, 3, 3, stride=(3, 3), padding=(0, 1), dilation=(2, 2)),
    Case(2, 4, 9, 9, 6, 3, 3, padding=(1, 1), groups=2),
    Case(2, 6, 9, 11, 6, 3, 3, padding=(1, 1), groups=6),  # depthwise
    Case(1, 6, 8, 8, 12, 3, 3, stride=(2, 2), padding=(1, 1), groups=6),  # depthwise multiplier 2
    Case(3, 7, 10, 10, 9, 1, 1),  # 1x1 stride 1: im2col skips the column buffer
    Case(2, 7, 10, 10, 9, 1, 1, stride=(2, 2)),
    Case(1, 2, 5, 5, 3, 3, 3, padding=(3, 3), dilation=(2, 1)),
    Case(1, 16, 12, 12, 20, 3, 3, padding=(1, 1)),  # enough channels for several tiles
]
SMALL = [CASES[1], CASES[4], CASES[5], CASES[7]]


def run(case: Case, x, w, b, algo: str, variant: str = "auto") -> torch.Tensor:
    return cnnext.ops.conv2d(x, w, b, algo=algo, variant=variant, **case.kwargs())


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("algo", ALGOS)
def test_forward_matches_torch(device: str, algo: str, case: Case) -> None:
    for dtype in dtypes_for(device):
        x, w, b = case.tensors(device, dtype)
        expected = F.conv2d(x, w, b, **case.kwargs())
        out = run(case, x, w, b, algo)
        assert out.shape == expected.shape and out.dtype == dtype
        assert_close(out, expected, scale=max(1.0, case.reduction / 16))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("algo", ALGOS)
def test_backward_matches_torch(device: str, algo: str, case: Case) -> None:
    dtype = torch.float32
    x, w, b = case.tensors(device, dtype)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    grad = torch.randn_like(F.conv2d(x, w, b, **case.kwargs()))
    expected = torch.autograd.grad(F.conv2d(x, w, b, **case.kwargs()), params, grad)
    got = torch.autograd.grad(run(case, x, w, b, algo), params, grad)
    scale = max(1.0, case.n * case.h * case.w / 64, case.reduction / 16)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, scale=scale)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("algo", ALGOS)
def test_layouts(device: str, algo: str, layout: str) -> None:
    case = CASES[4]
    x, w, b = case.tensors(device, torch.float32, layout)
    x.requires_grad_()
    expected = F.conv2d(x, w, b, **case.kwargs())
    out = run(case, x, w, b, algo)
    assert_close(out, expected)
    # Memory format follows torch's: channels_last in, channels_last out.
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(expected)
    (gx,) = torch.autograd.grad(out, x, grad)
    (ex,) = torch.autograd.grad(expected, x, grad)
    assert_close(gx, ex, scale=4)


@pytest.mark.parametrize("algo", ALGOS)
def test_batch_zero_and_unbatched(device: str, algo: str) -> None:
    case = CASES[1]
    _, w, b = case.tensors(device, torch.float32)
    x0 = torch.randn(0, case.c_in, case.h, case.w, device=device, requires_grad=True)
    out = run(case, x0, w, b, algo)
    assert out.shape == F.conv2d(x0, w, b, **case.kwargs()).shape
    out.sum().backward()
    assert x0.grad.shape == x0.shape
    x3 = torch.randn(case.c_in, case.h, case.w, device=device)
    assert_close(run(case, x3, w, b, algo), F.conv2d(x3, w, b, **case.kwargs()))


@pytest.mark.parametrize("which", ["input", "weight", "bias"])
@pytest.mark.parametrize("algo", ALGOS)
def test_partial_gradients(device: str, algo: str, which: str) -> None:
    """Only the requested gradient is computed (output_mask), and it is right."""
    case = CASES[2]
    x, w, b = case.tensors(device, torch.float32)
    target = {"input": x, "weight": w, "bias": b}[which].requires_grad_()
    grad = torch.randn_like(F.conv2d(x, w, b, **case.kwargs()))
    (got,) = torch.autograd.grad(run(case, x, w, b, algo), target, grad)
    (expected,) = torch.autograd.grad(F.conv2d(x, w, b, **case.kwargs()), target, grad)
    assert_close(got, expected, scale=8)


@pytest.mark.parametrize("case", SMALL, ids=str)
@pytest.mark.parametrize("algo", ALGOS)
def test_gradcheck(device: str, algo: str, case: Case) -> None:
    small = Case(
        1,
        case.c_in,
        min(case.h, 7),
        min(case.w, 6),
        case.c_out,
        case.kh,
        case.kw,
        case.stride,
        case.padding,
        case.dilation,
        case.groups,
        case.bias,
    )
    x, w, b = small.tensors(device, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*args):
        return run(small, args[0], args[1], args[2] if small.bias else None, algo)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def _namespaces() -> list:
    return [torch.ops.cnnext, torch.ops.cnnext_emu]


@pytest.mark.parametrize("ns", ["cnnext", "cnnext_emu"])
@pytest.mark.parametrize("algo", ALGOS)
def test_opcheck(ns: str, algo: str) -> None:
    lib = getattr(torch.ops, ns)
    for case in [CASES[1], CASES[6]]:
        x, w, b = case.tensors("cpu", torch.float32)
        conf = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
        extra = ["auto"] if algo == "direct" else [1 << 20]
        forward = getattr(lib, f"conv2d_{algo}")
        backward = getattr(lib, f"conv2d_{algo}_backward")
        torch.library.opcheck(forward, (x, w, b, *conf, *extra))
        grad = torch.randn_like(F.conv2d(x, w, b, **case.kwargs()))
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            bextra = [] if algo == "direct" else [1 << 20]
            torch.library.opcheck(backward, (grad, x, w, *conf, mask, *bextra))


@pytest.mark.parametrize("algo", ALGOS)
def test_compile_fullgraph(algo: str) -> None:
    case = CASES[1]
    x, w, b = case.tensors("cpu", torch.float32)

    def model(x, w, b):
        return torch.relu(cnnext.ops.conv2d(x, w, b, padding=1, algo=algo)).sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    ys = [t.clone().requires_grad_() for t in (x, w, b)]
    eager, comp = model(*xs), compiled(*ys)
    assert_close(comp, eager)
    eager.backward()
    comp.backward()
    for a, e in zip(ys, xs, strict=True):
        assert_close(a.grad, e.grad)


# Rows every op shares (ranks, dtypes, devices, channels, signs of stride/padding/dilation, a
# kernel over the padded input, bias length) are in tests/test_bad_input.py.
BAD = [
    # (description, input shape, weight shape, bias shape, kwargs, message)
    (
        "groups do not divide C_out",
        (1, 4, 5, 5),
        (3, 2, 3, 3),
        None,
        {"groups": 2},
        "must divide the output channels",
    ),
    ("zero groups", (1, 3, 5, 5), (4, 3, 3, 3), None, {"groups": 0}, "groups to be positive"),
    (
        "dilation overflows int64",
        (1, 3, 5, 5),
        (4, 3, 3, 3),
        None,
        {"dilation": 2**62},
        "dilation \\* \\(kernel size - 1\\) \\+ 1 to fit in int64",
    ),
]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("bad", BAD, ids=lambda b: b[0])
def test_bad_input(device: str, algo: str, bad) -> None:
    _, xs, ws, bs, kwargs, message = bad
    x = torch.randn(xs, device=device)
    w = torch.randn(ws, device=device)
    b = torch.randn(bs, device=device) if bs else None
    with pytest.raises(RuntimeError, match=f"cnnext::conv2d_{algo}: .*{message}"):
        cnnext.ops.conv2d(x, w, b, algo=algo, **kwargs)


def test_python_argument_errors() -> None:
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="algo must be one of"):
        cnnext.ops.conv2d(x, w, algo="winograd")
    with pytest.raises(ValueError, match="variant must be one of"):
        cnnext.ops.conv2d(x, w, variant="fast")
    with pytest.raises(ValueError, match="pair of ints"):
        cnnext.ops.conv2d(x, w, stride=(1, 2, 3))


# ---- direct-only: CUDA kernel variants, reduced precision, tiling edges, CPU ISA copies --------

# The naive kernels and the implicit-GEMM family in both of its block tiles.
VARIANTS = ["naive", "implicit_gemm_64x64", "implicit_gemm_128x128"]


def _grads(case: Case, x, w, b, fn, grad):
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    return torch.autograd.grad(fn(x, w, b), params, grad)


def _check_forward_backward(case: Case, x, w, b, variant: str, ref_dtype=None) -> None:
    """cnnext direct (this variant) against F.conv2d, output and every gradient. With
    ``ref_dtype`` the reference runs in that dtype on the same (rounded) values."""
    dtype = x.dtype
    ref = (lambda t: t.to(ref_dtype) if t is not None else None) if ref_dtype else (lambda t: t)
    expected = F.conv2d(ref(x), ref(w), ref(b), **case.kwargs())
    out = run(case, x, w, b, "direct", variant)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected.to(dtype), scale=max(1.0, case.reduction / 16))
    grad = torch.randn(expected.shape, dtype=dtype)
    got = _grads(case, x, w, b, lambda *a: run(case, *a, "direct", variant), grad)
    xr, wr, br = (ref(t).detach() if t is not None else None for t in (x, w, b))
    want = _grads(case, xr, wr, br, lambda *a: F.conv2d(*a, **case.kwargs()), ref(grad))
    scale = max(1.0, case.n * case.h * case.w / 64, case.reduction / 16)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert_close(g, e.to(dtype), scale=scale)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_torch(emu_device: str, variant: str, case: Case) -> None:
    """Each CUDA kernel variant (forward, grad_input, grad_weight, grad_bias) on every case."""
    x, w, b = case.tensors(emu_device, torch.float32)
    _check_forward_backward(case, x, w, b, variant)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_layouts(emu_device: str, variant: str, layout: str) -> None:
    for case in (CASES[4], CASES[8]):
        x, w, b = case.tensors(emu_device, torch.float32, layout)
        _check_forward_backward(case, x, w, b, variant)
        if layout == "channels_last":
            out = run(case, x, w, b, "direct", variant)
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reduced_precision_emulated(emu_device: str, variant: str, dtype: torch.dtype) -> None:
    """half and bfloat16 CUDA kernels (float accumulation) against a float32 reference on the
    same rounded values."""
    for case in (CASES[2], CASES[7], CASES[12]):
        x, w, b = case.tensors(emu_device, dtype)
        _check_forward_backward(case, x, w, b, variant, ref_dtype=torch.float32)


# Several blocks in every grid dimension: m and n tiles, split-K slices (forward and
# grad_weight), K not a multiple of the 8-deep step.
BIG = [
    Case(2, 20, 37, 45, 24, 3, 3, padding=(1, 1)),
    Case(1, 3, 19, 23, 70, 3, 3, stride=(2, 1), padding=(1, 1), dilation=(1, 2)),
]


@pytest.mark.parametrize("case", BIG, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_several_tiles(emu_device: str, variant: str, case: Case) -> None:
    x, w, b = case.tensors(emu_device, torch.float32)
    _check_forward_backward(case, x, w, b, variant)


# Implicit-GEMM edges: channel counts that allow 128-bit loads (multiples of 4) and those that do
# not; grad_input stride phases (with a dilation sharing a factor with the stride, taps that reach
# no pixel of a phase, 1x1 filters with stride whose odd phases get no tap at all); tiles, K and
# split-K slices that do not divide the problem; a large batch; groups.
IGEMM_CASES = [
    Case(3, 8, 11, 13, 12, 3, 3, padding=(1, 1)),
    Case(2, 8, 12, 12, 8, 3, 3, stride=(2, 2), padding=(1, 1)),
    Case(1, 4, 13, 14, 4, 3, 3, stride=(2, 2), padding=(2, 1), dilation=(2, 2)),
    Case(2, 12, 9, 10, 20, 4, 2, stride=(3, 2), padding=(2, 0), groups=4),
    Case(2, 16, 9, 10, 16, 3, 3, padding=(1, 1), groups=2, bias=False),
    Case(64, 4, 5, 5, 8, 3, 3, padding=(1, 1)),
    Case(1, 132, 4, 4, 70, 3, 3, padding=(1, 1)),
    Case(1, 3, 30, 31, 5, 7, 7, stride=(2, 2), padding=(3, 3)),
    Case(2, 8, 6, 7, 8, 1, 1, stride=(2, 2)),
]


def _layout_tensors(case: Case, device: str, layout: str):
    """``layout``: input/filter memory formats: both NCHW, both channels_last, or one of each."""
    x_layout = "channels_last" if layout in ("channels_last", "cl_input") else "contiguous"
    x, w, b = case.tensors(device, torch.float32, x_layout)
    if layout in ("channels_last", "cl_filter"):
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, b


@pytest.mark.parametrize("case", IGEMM_CASES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cl_input", "cl_filter"])
def test_implicit_gemm_edges(emu_device: str, layout: str, case: Case) -> None:
    x, w, b = _layout_tensors(case, emu_device, layout)
    _check_forward_backward(case, x, w, b, "implicit_gemm")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cl_input"])
def test_implicit_gemm_large_tile_edges(emu_device: str, layout: str) -> None:
    """The 128 x 128 tile with vector loads, phases and split-K."""
    for case in (IGEMM_CASES[1], IGEMM_CASES[6]):
        x, w, b = _layout_tensors(case, emu_device, layout)
        _check_forward_backward(case, x, w, b, "implicit_gemm_128x128")


@pytest.mark.parametrize("variant", ["auto", "implicit_gemm"])
def test_huge_dilation(emu_device: str, variant: str) -> None:
    """A 2x2 filter dilated by 120: taps far outside most pixels' reach."""
    case = Case(1, 2, 125, 125, 3, 2, 2, dilation=(120, 120))
    x, w, b = case.tensors(emu_device, torch.float32)
    _check_forward_backward(case, x, w, b, variant)


def test_stride_beyond_phase_limit(emu_device: str) -> None:
    """grad_input with a stride above 8 leaves the phase decomposition for the naive kernel."""
    case = Case(1, 4, 30, 30, 8, 3, 3, stride=(9, 2), padding=(1, 1))
    x, w, b = case.tensors(emu_device, torch.float32)
    _check_forward_backward(case, x, w, b, "implicit_gemm")


@pytest.mark.parametrize("variant", ["implicit_gemm_64x64", "implicit_gemm_128x128"])
def test_gradcheck_implicit_gemm(emu_device: str, variant: str) -> None:
    case = Case(1, 4, 6, 5, 4, 3, 2, stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    x, w, b = case.tensors(emu_device, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda *a: run(case, *a, "direct", variant), inputs, eps=1e-6, atol=1e-7
    )


def test_gradcheck_naive(emu_device: str) -> None:
    case = Case(1, 2, 6, 5, 3, 3, 2, stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    x, w, b = case.tensors(emu_device, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda *a: run(case, *a, "direct", "naive"), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_backward_variants(variant: str) -> None:
    case = CASES[6]
    x, w, b = case.tensors("cpu", torch.float32)
    conf = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    grad = torch.randn_like(F.conv2d(x, w, b, **case.kwargs()))
    torch.library.opcheck(torch.ops.cnnext_emu.conv2d_direct, (x, w, b, *conf, variant))
    for mask in ([True, True, True], [False, False, True]):
        torch.library.opcheck(
            torch.ops.cnnext_emu.conv2d_direct_backward, (grad, x, w, *conf, mask, variant)
        )


@pytest.mark.parametrize("variant", ["auto", *VARIANTS])
def test_backward_is_deterministic(variant: str) -> None:
    """Bitwise-identical gradients whatever the emulated schedule (no atomics, fixed-order
    reductions), and on the CPU whatever the number of threads."""
    case = BIG[1]
    x, w, b = case.tensors("cpu", torch.float32)
    grad = torch.randn_like(F.conv2d(x, w, b, **case.kwargs()))

    def grads():
        return _grads(
            case, x.clone(), w.clone(), b.clone(), lambda *a: run(case, *a, "direct", variant), grad
        )

    runs = []
    for schedule in ("forward", "reverse", "random:11"):
        with cnnext.emulate_cuda(schedule):
            runs.append(grads())
    threads = torch.get_num_threads()
    try:
        cpu = []
        for n in (1, 2):
            torch.set_num_threads(n)
            cpu.append(grads())
    finally:
        torch.set_num_threads(threads)
    for a, b2 in ((runs[0], runs[1]), (runs[0], runs[2]), (cpu[0], cpu[1])):
        for g1, g2 in zip(a, b2, strict=True):
            assert torch.equal(g1, g2)


@pytest.mark.parametrize("ns", ["cnnext", "cnnext_emu"])
def test_bad_variant_and_max_col_bytes(ns: str) -> None:
    lib = getattr(torch.ops, ns)
    x, w, grad = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(1, 4, 3, 3)
    conf = ([1, 1], [0, 0], [1, 1], 1)
    mask = [True, True, False]
    for extra, name in ((("fast",), "variant"), (("auto", 0), "max_col_bytes")):
        with pytest.raises(RuntimeError, match=f"cnnext::conv2d_direct: expected {name}"):
            lib.conv2d_direct(x, w, None, *conf, *extra)
        with pytest.raises(RuntimeError, match=f"cnnext::conv2d_direct_backward: expected {name}"):
            lib.conv2d_direct_backward(grad, x, w, *conf, mask, *extra)
    with pytest.raises(RuntimeError, match="cnnext::conv2d_direct_backward: expected grad_output"):
        lib.conv2d_direct_backward(grad[:, :3], x, w, *conf, mask)


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation ``fn`` makes (torch's profiler records each)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("operand", ["weight", "input"])
def test_cpu_non_finite_fallback_honours_the_workspace_limit(operand: str) -> None:
    """The direct CPU backward takes the gradients of non-finite operands from im2col (a NaN
    weight: grad_input; a NaN input: grad_weight); its column buffers follow
    set_im2col_workspace_limit as im2col's own do: a sample's columns (wider than any tensor of
    the call) at the default, pieces of one at the smallest limit."""
    x = torch.randn(4, 16, 20, 20)
    w = torch.randn(2, 16, 5, 5)
    (w if operand == "weight" else x)[0, 0, 1, 1] = float("nan")
    x.requires_grad_()
    w.requires_grad_()
    grad = torch.randn(4, 2, 20, 20)
    columns = 16 * 25 * 20 * 20 * x.element_size()  # one sample's unfolded input

    def backward() -> tuple[torch.Tensor, ...]:
        out = cnnext.ops.conv2d(x, w, padding=2, algo="direct")
        return torch.autograd.grad(out, (x, w), grad)

    previous = cnnext.ops.get_im2col_workspace_limit()
    try:
        whole = _largest_allocation(backward)
        cnnext.ops.set_im2col_workspace_limit(1)
        bounded = _largest_allocation(backward)
        got = backward()
    finally:
        cnnext.ops.set_im2col_workspace_limit(previous)
    assert whole >= columns, (whole, columns)  # not vacuous: the fallback ran im2col
    assert bounded < columns // 4, (bounded, columns)
    expected = torch.autograd.grad(F.conv2d(x, w, padding=2), (x, w), grad)
    spread = expected[0 if operand == "weight" else 1].isnan()  # the other operand's gradient
    assert spread.any() and not spread.all()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpu_isa_copies(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every per-ISA copy of the CPU microkernels (capped by CNNEXT_CPU_ISA), on cases that use
    each channel block (4, 2, 1) and tile width."""
    monkeypatch.setenv("CNNEXT_CPU_ISA", isa)
    for case in (CASES[1], CASES[3], CASES[7], CASES[8], CASES[11], BIG[1]):
        for dtype in (torch.float32, torch.float64):
            x, w, b = case.tensors("cpu", dtype)
            _check_forward_backward(case, x, w, b, "auto")


def test_cpu_isa_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNEXT_CPU_ISA", "sse9")
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="cnnext::conv2d_direct: expected CNNEXT_CPU_ISA"):
        cnnext.ops.conv2d(x, w, algo="direct")


@pytest.mark.parametrize(
    "case",
    [
        # Wide rows: the packed copy exceeds ~1 MiB, chunks of 65 samples.
        Case(130, 16, 64, 64, 16, 3, 3, stride=(2, 1), padding=(1, 1)),
        # A 6x6 plane: at most 4096 / 36 = 113 samples per chunk (one run of the flattened
        # plane), three chunks of 101, 101 and 99 samples; 40 outputs: blocks of 32 and 8.
        Case(301, 16, 6, 6, 40, 3, 3, padding=(1, 1)),
    ],
    ids=["wide", "narrow"],
)
def test_cpu_batch_chunks(case: Case) -> None:
    """A batch larger than one chunk of the CPU direct engine is processed in chunks of equal
    size (forward, grad_input and the grad_weight sums that run across chunks)."""
    x, w, b = case.tensors("cpu", torch.float32, "channels_last")
    _check_forward_backward(case, x, w, b, "auto")


# The OpSpec of the cross-op suites (tests/opspecs.py: fuzzing, bad input, determinism, leaks).
OPSPECS = [conv_spec("direct")]
