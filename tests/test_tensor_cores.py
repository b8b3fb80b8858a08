"""Tensor-core (wmma) implicit-GEMM convolution for half and bfloat16, run by the emulator.

The forward is held against torch's float convolution of the same rounded inputs, with a
tolerance of the output dtype's rounding plus float accumulation error scaled by the reduction
length; every emulated order runs (random:SEED permutes the fragment layouts, so a kernel that
assumed one would fail there). The recorder names the kernel that ran: tensor cores where the
geometry allows, the SIMT implicit GEMM where it does not (reduced channels not a multiple of 8)
or where a SIMT tile is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import cnnext

TC_KERNEL = "conv2d_implicit_gemm_tc_fprop_kernel"
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class Case(NamedTuple):
    n: int
    c_in: int
    c_out: int
    hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    input_cl: bool = False
    filter_cl: bool = False
    bias: bool = True


CASES = {
    # channels_last input, NCHW filter: copied to KRSC (one launch), no split-K; tile overhang in
    # m (162 of 192), n (24 of 64) and k (144 = 4.5 steps of 32).
    "nhwc_3x3": Case(2, 16, 24, (9, 9), (3, 3), padding=(1, 1), input_cl=True),
    # the same with a channels_last filter: read in place, K split over 2 slices.
    "nhwc_3x3_splitk": Case(
        2, 16, 24, (9, 9), (3, 3), padding=(1, 1), input_cl=True, filter_cl=True
    ),
    # NCHW: k = (ci, tap), pixels read along x; stride and dilation, odd c_out.
    "nchw_strided_dilated": Case(1, 8, 13, (11, 7), (3, 3), (2, 2), (1, 1), (2, 2)),
    # groups (8 reduced and 9 output channels each), rectangular kernel, stride and padding.
    "nhwc_groups": Case(
        2, 16, 18, (6, 10), (1, 3), (2, 1), (0, 2), groups=2, input_cl=True, bias=False
    ),
    # NCHW groups: 8 reduced and 9 output channels each (fewer than 8 go to the naive kernel).
    "nchw_groups": Case(2, 16, 18, (7, 5), (3, 3), padding=(1, 1), groups=2),
    # long K (576) over 9 split-K slices, one output tile.
    "nchw_long_k": Case(1, 64, 16, (5, 5), (3, 3), padding=(1, 1)),
}


def _tensors(
    case: Case, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(case.n, case.c_in, *case.hw, generator=gen).to(dtype)
    w = torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, generator=gen).to(dtype)
    b = torch.randn(case.c_out, generator=gen).to(dtype) if case.bias else None
    if case.input_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if case.filter_cl:
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _check_close(
    out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, case: Case
) -> None:
    """out against torch's float convolution of the same (rounded) inputs."""
    args = (case.stride, case.padding, case.dilation, case.groups)
    ref = F.conv2d(x.float(), w.float(), None if b is None else b.float(), *args)
    bound = F.conv2d(x.float().abs(), w.float().abs(), None, *args)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    tol = EPS[out.dtype] * ref.abs() + k * 2.0**-22 * bound + 1e-6
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = (out.float() - ref).abs()
    worst = (err - tol).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds its tolerance by {worst:.3g}"


def _run(
    case: Case, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, variant: str = "auto"
) -> tuple[torch.Tensor, list[str]]:
    with cnnext.emulate_cuda(record=True) as log:
        out = cnnext.ops.conv2d(
            x,
            w,
            b,
            case.stride,
            case.padding,
            case.dilation,
            case.groups,
            algo="direct",
            variant=variant,
        )
    assert log is not None
    return out, [r.name for r in log.kernels]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_on_tensor_cores(emu_device: str, name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    x, w, b = _tensors(case, dtype)
    out, kernels = _run(case, x, w, b)
    assert any(TC_KERNEL in k for k in kernels), kernels
    assert out.is_contiguous(memory_format=torch.channels_last) == case.input_cl
    _check_close(out, x, w, b, case)


def test_split_k_and_filter_copy_are_planned() -> None:
    """Not vacuous: the cases above do exercise split-K (a reduce launch) and the filter copy."""
    launches = {}
    for name in ("nhwc_3x3", "nhwc_3x3_splitk", "nchw_long_k"):
        case = CASES[name]
        _, launches[name] = _run(case, *_tensors(case, torch.float16))
    assert any("filter_to_krsc" in k for k in launches["nhwc_3x3"])
    assert not any("splitk_reduce" in k for k in launches["nhwc_3x3"])
    for name in ("nhwc_3x3_splitk", "nchw_long_k"):
        assert not any("filter_to_krsc" in k for k in launches[name])
        assert any("splitk_reduce" in k for k in launches[name]), launches[name]


@pytest.mark.parametrize("c_in", [3, 7, 12])
@pytest.mark.parametrize("input_cl", [False, True], ids=["nchw", "nhwc"])
def test_channels_not_a_multiple_of_8_fall_back(emu_device: str, c_in: int, input_cl: bool) -> None:
    case = Case(2, c_in, 10, (7, 6), (3, 3), padding=(1, 1), input_cl=input_cl)
    x, w, b = _tensors(case, torch.float16)
    out, kernels = _run(case, x, w, b)
    assert not any(TC_KERNEL in k for k in kernels), kernels
    assert any("implicit_gemm_fprop" in k for k in kernels), kernels
    _check_close(out, x, w, b, case)


@pytest.mark.parametrize("name", ["nchw_strided_dilated", "nhwc_3x3_splitk"])
def test_filter_not_16_byte_aligned_falls_back(emu_device: str, name: str) -> None:
    """The tensor-core fprop reads the filter in 16-byte vectors only; one element past an
    aligned start (a view into a larger buffer) runs on the SIMT family, with the right answer."""
    case = CASES[name]
    x, w, b = _tensors(case, torch.float16)
    fmt = torch.channels_last if case.filter_cl else torch.contiguous_format
    buf = torch.empty(w.numel() + 1, dtype=w.dtype)
    shifted = buf[1:].view(w.permute(0, 2, 3, 1).shape if case.filter_cl else w.shape)
    shifted = shifted.permute(0, 3, 1, 2) if case.filter_cl else shifted
    shifted.copy_(w)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous(memory_format=fmt)
    out, kernels = _run(case, x, shifted, b)
    assert not any(TC_KERNEL in k for k in kernels), kernels
    assert any("implicit_gemm_fprop" in k for k in kernels), kernels
    _check_close(out, x, w, b, case)


def test_a_simt_tile_on_request_and_float_stay_off_tensor_cores() -> None:
    case = CASES["nhwc_3x3"]
    x, w, b = _tensors(case, torch.float16)
    out, kernels = _run(case, x, w, b, variant="implicit_gemm_128x128")
    assert not any(TC_KERNEL in k for k in kernels) and any("implicit_gemm" in k for k in kernels)
    _check_close(out, x, w, b, case)
    _, kernels = _run(case, x.float(), w.float(), b.float())
    assert not any(TC_KERNEL in k for k in kernels), kernels


# Backward cases: stride phases (some without taps), grad_weight split-K with grad_bias, groups.
GRAD_CASES = {
    "nhwc_3x3": CASES["nhwc_3x3"],
    "nhwc_3x3_splitk": CASES["nhwc_3x3_splitk"],
    "nchw_strided_dilated": CASES["nchw_strided_dilated"],
    "nhwc_groups": CASES["nhwc_groups"],
    "nchw_groups": CASES["nchw_groups"],
    # stride 2 with a 1x1 filter: the odd phases get no tap at all (zeros).
    "nchw_1x1_stride2": Case(2, 8, 16, (7, 8), (1, 1), (2, 2)),
    # K = 2 * 15 * 15 = 450 pixels for grad_weight: split over slices, c_out 16 (vector runs).
    "nhwc_5x5_long": Case(2, 8, 16, (15, 15), (5, 5), padding=(2, 2), input_cl=True),
}


def _grads(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gy: torch.Tensor, case: Case
) -> list[torch.Tensor]:
    """Float (grad_input, grad_weight[, grad_bias]) by torch's autograd."""
    leaves = [t.detach().float().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    y = F.conv2d(leaves[0], leaves[1], bias, case.stride, case.padding, case.dilation, case.groups)
    y.backward(gy.float())
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bf16"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_on_tensor_cores(emu_device: str, name: str, dtype: torch.dtype) -> None:
    case = GRAD_CASES[name]
    x, w, b = _tensors(case, dtype)
    leaves = [t.detach().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    with cnnext.emulate_cuda(record=True) as log:
        y = cnnext.ops.conv2d(
            leaves[0],
            leaves[1],
            leaves[2] if b is not None else None,
            case.stride,
            case.padding,
            case.dilation,
            case.groups,
            algo="direct",
        )
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
        y.backward(gy)
    assert log is not None
    names = [r.name for r in log.kernels]
    for kernel in ("tc_fprop", "tc_dgrad", "tc_wgrad"):
        assert any(f"conv2d_implicit_gemm_{kernel}_kernel" in n for n in names), names
    ref = _grads(x, w, b, gy, case)
    bound = _grads(x.abs(), w.abs(), b, gy.abs(), case)
    h_out, w_out = y.shape[2], y.shape[3]
    lengths = [case.c_out // case.groups * case.kernel[0] * case.kernel[1]]
    lengths += [case.n * h_out * w_out] * (len(leaves) - 1)
    whats = ("input", "weight", "bias")[: len(leaves)]
    for what, leaf, r, bnd, k in zip(whats, leaves, ref, bound, lengths, strict=True):
        got = leaf.grad
        assert got is not None and got.dtype == dtype and got.shape == r.shape, what
        tol = EPS[dtype] * r.abs() + k * 2.0**-22 * bnd + 1e-6
        err = (got.float() - r).abs()
        assert (err <= tol).all(), f"grad_{what}: max error {err.max().item():.3g}"
    if case.input_cl:
        assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last)


def test_grad_weight_split_k_is_planned() -> None:
    """Not vacuous: the long case's grad_weight runs split-K (a reduce launch after the GEMM)."""
    case = GRAD_CASES["nhwc_5x5_long"]
    x, w, b = _tensors(case, torch.float16)
    w.requires_grad_()
    with cnnext.emulate_cuda(record=True) as log:
        y = cnnext.ops.conv2d(x, w, b, case.stride, case.padding, algo="direct")
        y.sum().backward()
    assert log is not None
    names = [r.name for r in log.kernels]
    wgrad = next(i for i, n in enumerate(names) if "tc_wgrad" in n)
    assert any("splitk_reduce" in n for n in names[wgrad + 1 :]), names


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_grad_input_non_finite_filter(emu_device: str, value: float) -> None:
    """A non-finite filter value reaches exactly the gradients torch gives it (not the padded
    positions, where the tensor cores would multiply it by zero and make NaN)."""
    case = Case(1, 8, 8, (5, 5), (3, 3), padding=(1, 1), bias=False)
    x, w, _ = _tensors(case, torch.float16)
    w[0, 0, 0, 0] = value
    xl = x.detach().requires_grad_()
    with cnnext.emulate_cuda(record=True) as log:
        y = cnnext.ops.conv2d(xl, w, None, case.stride, case.padding, algo="direct")
        gy = torch.ones_like(y)
        y.backward(gy)
    assert log is not None and any("tc_dgrad" in r.name for r in log.kernels)
    ref = _grads(x, w, None, gy, case)[0]
    got = xl.grad.float()
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert torch.allclose(got[finite], ref[finite], rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("input_cl", [False, True], ids=["nchw", "nhwc"])
def test_launch_budget_on_tensor_cores(input_cl: bool) -> None:
    """Issue 16's budgets hold on the tensor-core path: forward <= 2 launches for channels_last
    input and <= 3 for NCHW, backward <= 4 and <= 5; from batch 1 to 8 a count may only gain
    split-K's reduction (grad_weight's K is the batch's pixel count)."""
    counts = []
    for n in (1, 8):
        case = Case(n, 16, 24, (6, 6), (3, 3), padding=(1, 1), input_cl=input_cl)
        x, w, b = _tensors(case, torch.float16)
        leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
        with cnnext.emulate_cuda(record=True) as fwd:
            y = cnnext.ops.conv2d(*leaves, case.stride, case.padding, algo="direct")
        with cnnext.emulate_cuda(record=True) as bwd:
            y.sum().backward()
        assert fwd is not None and bwd is not None
        assert any("tc_fprop" in r.name for r in fwd.kernels)
        assert any("tc_dgrad" in r.name for r in bwd.kernels)
        assert len(fwd.kernels) <= (2 if input_cl else 3), fwd.names()
        assert len(bwd.kernels) <= (4 if input_cl else 5), bwd.names()
        counts.append((len(fwd.kernels), len(bwd.kernels)))
    for i in (0, 1):
        assert max(c[i] for c in counts) - min(c[i] for c in counts) <= 1, counts


# ---- TF32: float32 on tensor cores ---------------------------------------------------------------
# The emulator runs float32 on tensor cores only with emulate_cuda(tf32=True) and torch's TF32
# setting for convolutions on (its default). The kernels round both GEMM operands to tf32 (round
# to nearest, ties away from zero) and accumulate in float32; products of tf32 values are exact in
# float32, so against float64 on the same rounded inputs only the float32 summation errs.

TF32_CASES = {
    "nhwc_3x3": CASES["nhwc_3x3"],
    "nhwc_3x3_splitk": CASES["nhwc_3x3_splitk"],
    "nchw_strided_dilated": CASES["nchw_strided_dilated"],
    "nhwc_groups": CASES["nhwc_groups"],
    "nchw_long_k": CASES["nchw_long_k"],
    # 12 channels: a multiple of 4 (whole 16-byte vectors of float) but not of 8
    "nhwc_12_channels": Case(2, 12, 20, (7, 6), (3, 3), padding=(1, 1), input_cl=True),
    "nchw_1x1_stride2": GRAD_CASES["nchw_1x1_stride2"],
}


def tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to tf32 as cvt.rna does (10 mantissa bits, ties away from zero)."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, rounded, bits).view(torch.float32).reshape(t.shape)


def _float_tensors(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x, w, b = _tensors(case, torch.float32)
    return x, w, b


def _sum_tolerance(ref: torch.Tensor, bound: torch.Tensor, k: int) -> torch.Tensor:
    """Float32 summation of k exact products (and a bias), against float64."""
    return k * 2.0**-24 * bound + 2.0**-24 * ref.abs() + 1e-30


@pytest.mark.parametrize("name", list(TF32_CASES))
def test_tf32_forward_on_tensor_cores(emu_device: str, name: str) -> None:
    case = TF32_CASES[name]
    x, w, b = _float_tensors(case)
    with cnnext.emulate_cuda(tf32=True):
        out, kernels = _run(case, x, w, b)
    assert any(TC_KERNEL in k for k in kernels), kernels
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) == case.input_cl
    args = (case.stride, case.padding, case.dilation, case.groups)
    xr, wr = tf32(x).double(), tf32(w).double()
    ref = F.conv2d(xr, wr, None if b is None else b.double(), *args)
    bound = F.conv2d(xr.abs(), wr.abs(), None if b is None else b.double().abs(), *args)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    err = (out.double() - ref).abs()
    tol = _sum_tolerance(ref, bound, k + 1)
    assert (err <= tol).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("tied", ["input", "weight", "grad_output"])
def test_tf32_rounds_operands_to_nearest_ties_away(tied: str) -> None:
    """Exactly: 1 + 2^-11 lies halfway between two tf32 values and rounds up (away from zero), so
    with ones elsewhere every result is its product count times 1 + 2^-10 where a tied operand
    took part; IEEE float would give 1 + 2^-11 per product, truncation 1, ties-to-even 1."""
    tie = 1.0 + 2.0**-11
    x = torch.full((2, 8, 6, 5), tie if tied == "input" else 1.0).requires_grad_()
    w = torch.full((16, 8, 3, 3), tie if tied == "weight" else 1.0).requires_grad_()
    with cnnext.emulate_cuda(tf32=True, record=True) as log:
        y = cnnext.ops.conv2d(x, w, None, 1, 1, algo="direct")
        y.backward(torch.full_like(y, tie if tied == "grad_output" else 1.0))
    assert log is not None
    names = [r.name for r in log.kernels]
    for kernel in ("tc_fprop", "tc_dgrad", "tc_wgrad"):
        assert any(kernel in n for n in names), names
    up = 1.0 + 2.0**-10
    ones_x = torch.ones(x.shape, dtype=torch.float64)
    ones_w = torch.ones(w.shape, dtype=torch.float64)
    ones_y = torch.ones(y.shape, dtype=torch.float64)
    counts = {  # products per result (padding drops some)
        "output": F.conv2d(ones_x, ones_w, None, 1, 1),
        "grad_input": torch.nn.grad.conv2d_input(x.shape, ones_w, ones_y, 1, 1),
        "grad_weight": torch.nn.grad.conv2d_weight(ones_x, w.shape, ones_y, 1, 1),
    }
    operands = {
        "output": ("input", "weight"),
        "grad_input": ("weight", "grad_output"),
        "grad_weight": ("input", "grad_output"),
    }
    got = {"output": y.detach(), "grad_input": x.grad, "grad_weight": w.grad}
    for what, count in counts.items():
        want = count * (up if tied in operands[what] else 1.0)
        assert torch.equal(got[what].double(), want), what


@pytest.mark.parametrize("name", ["nhwc_3x3", "nchw_strided_dilated", "nhwc_groups"])
def test_tf32_gradients_on_tensor_cores(emu_device: str, name: str) -> None:
    case = GRAD_CASES[name]
    x, w, b = _float_tensors(case)
    leaves = [t.detach().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    with cnnext.emulate_cuda(tf32=True, record=True) as log:
        y = cnnext.ops.conv2d(
            leaves[0], leaves[1], leaves[2] if b is not None else None,
            case.stride, case.padding, case.dilation, case.groups, algo="direct",
        )  # fmt: skip
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        y.backward(gy)
    assert log is not None
    names = [r.name for r in log.kernels]
    for kernel in ("tc_fprop", "tc_dgrad", "tc_wgrad"):
        assert any(f"conv2d_implicit_gemm_{kernel}_kernel" in n for n in names), names
    args = (case.stride, case.padding, case.dilation, case.groups)
    xr, wr, gr = tf32(x).double(), tf32(w).double(), tf32(gy).double()
    refs = {
        "input": torch.nn.grad.conv2d_input(x.shape, wr, gr, *args),
        "weight": torch.nn.grad.conv2d_weight(xr, w.shape, gr, *args),
    }
    bounds = {
        "input": torch.nn.grad.conv2d_input(x.shape, wr.abs(), gr.abs(), *args),
        "weight": torch.nn.grad.conv2d_weight(xr.abs(), w.shape, gr.abs(), *args),
    }
    lengths = {
        "input": case.c_out // case.groups * case.kernel[0] * case.kernel[1],
        "weight": case.n * y.shape[2] * y.shape[3],
    }
    grads = {"input": leaves[0].grad, "weight": leaves[1].grad}
    if b is not None:
        # grad_bias sums grad_output in float32, not rounded to tf32
        refs["bias"] = gy.double().sum((0, 2, 3))
        bounds["bias"] = gy.double().abs().sum((0, 2, 3))
        lengths["bias"] = lengths["weight"]
        grads["bias"] = leaves[2].grad
    for what, got in grads.items():
        assert got is not None and got.dtype == torch.float32, what
        ref = refs[what]
        err = (got.double() - ref).abs()
        tol = _sum_tolerance(ref, bounds[what], lengths[what])
        assert (err <= tol).all(), f"grad_{what}: max error {err.max().item():.3g}"


def _conv_ieee(
    case: Case, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **emu: object
) -> tuple[list[torch.Tensor], list[str]]:
    """Forward and gradients of conv2d (direct) under emulate_cuda(**emu), and the kernels."""
    leaves = [t.detach().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    with cnnext.emulate_cuda(record=True, **emu) as log:  # type: ignore[arg-type]
        y = cnnext.ops.conv2d(
            leaves[0], leaves[1], leaves[2] if b is not None else None,
            case.stride, case.padding, case.dilation, case.groups, algo="direct",
        )  # fmt: skip
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    assert log is not None
    return [y.detach()] + [t.grad for t in leaves], [r.name for r in log.kernels]


@pytest.fixture
def restore_tf32_settings() -> Iterator[None]:
    conv = torch.backends.cudnn.conv.fp32_precision
    allow = torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allow
        torch.backends.cudnn.conv.fp32_precision = conv


def test_tf32_only_where_torch_and_the_emulation_allow(restore_tf32_settings: None) -> None:
    """Without tf32=True, with torch.backends.cudnn.allow_tf32 off, or with the convolution
    precision set to "ieee", float32 runs the CUDA-core kernels, bit for bit as before."""
    case = CASES["nhwc_3x3"]
    x, w, b = _float_tensors(case)
    ieee, kernels = _conv_ieee(case, x, w, b)
    assert not any("_tc_" in k for k in kernels) and any("implicit_gemm" in k for k in kernels)
    tc, kernels = _conv_ieee(case, x, w, b, tf32=True)
    assert any("_tc_" in k for k in kernels), kernels
    assert not all(torch.equal(a, c) for a, c in zip(ieee, tc, strict=True))
    torch.backends.cudnn.allow_tf32 = False
    off, kernels = _conv_ieee(case, x, w, b, tf32=True)
    assert not any("_tc_" in k for k in kernels), kernels
    assert all(torch.equal(a, c) for a, c in zip(ieee, off, strict=True))
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    off, kernels = _conv_ieee(case, x, w, b, tf32=True)
    assert not any("_tc_" in k for k in kernels), kernels
    assert all(torch.equal(a, c) for a, c in zip(ieee, off, strict=True))
    # a SIMT tile on request
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    _, kernels = _run(case, x, w, b, variant="implicit_gemm_64x64")
    assert not any("_tc_" in k for k in kernels), kernels


def test_tf32_setting_nests() -> None:
    """A nested emulate_cuda keeps the enclosing TF32 choice and schedule unless given its own."""
    emu = torch.ops.cnnext_emu
    with cnnext.emulate_cuda("reverse", tf32=True):
        with cnnext.emulate_cuda(record=True):
            assert emu._get_tf32() and emu._get_schedule() == "reverse"
            with cnnext.emulate_cuda(tf32=False):
                assert not emu._get_tf32()
            assert emu._get_tf32()
    with cnnext.emulate_cuda():
        assert not emu._get_tf32()


@pytest.mark.parametrize("c_in", [3, 6, 10])
def test_tf32_channels_not_a_multiple_of_4_fall_back(emu_device: str, c_in: int) -> None:
    case = Case(2, c_in, 10, (7, 6), (3, 3), padding=(1, 1), input_cl=c_in == 6)
    x, w, b = _float_tensors(case)
    tf, kernels = _conv_ieee(case, x, w, b, tf32=True)
    assert not any("_tc_" in k for k in kernels), kernels
    ieee, _ = _conv_ieee(case, x, w, b)
    assert all(torch.equal(a, c) for a, c in zip(ieee, tf, strict=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tf32_fused_conv_bn_relu(emu_device: str, training: bool) -> None:
    """The fused op's convolution (forward, and grad_input / grad_weight of its backward) runs the
    TF32 kernels; against eager conv -> batch_norm -> relu in float64 on tf32-rounded inputs.
    Backward multiplies the gradient at the convolution's output, itself rounded to tf32 in the
    kernel: a rounding that lands on the other side of a tie costs one tf32 unit (2^-10), and the
    float32 forward it derives from differs from float64 by about as much."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 7, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3, generator=gen)
    cb, g, beta = (torch.randn(24, generator=gen) for _ in range(3))
    rm, rv = torch.randn(24, generator=gen), torch.rand(24, generator=gen) + 0.5
    leaves = [t.clone().requires_grad_() for t in (x, w, cb, g, beta)]
    gy = torch.randn(2, 24, 7, 6, generator=gen)
    with cnnext.emulate_cuda(tf32=True, record=True) as log:
        y = cnnext.ops.conv_bn_relu(
            *leaves, rm.clone(), rv.clone(), training, 0.1, 1e-5, padding=1, algo="direct"
        )
        y.backward(gy)
    assert log is not None
    names = [r.name for r in log.kernels]
    for kernel in ("tc_fprop", "tc_dgrad", "tc_wgrad"):
        assert any(kernel in n for n in names), names
    # float64 reference on the rounded inputs; z (the convolution) is a leaf for its gradient
    xr, wr = tf32(x).double(), tf32(w).double()
    z = F.conv2d(xr, wr, cb.double(), padding=1).requires_grad_()
    ref_params = [t.double().requires_grad_() for t in (g, beta)]
    ref = torch.relu(F.batch_norm(z, rm.double(), rv.double(), *ref_params, training, 0.1, 1e-5))
    ref.backward(gy.double())
    k = 16 * 9
    bound = F.conv2d(xr.abs(), wr.abs(), cb.double().abs(), padding=1)
    conv_tol = _sum_tolerance(z.detach(), bound, k + 1)
    if training:
        invstd = 1 / (z.detach().var((0, 2, 3), unbiased=False) + 1e-5).sqrt()
    else:
        invstd = 1 / (rv.double() + 1e-5).sqrt()
    scale = (g.double() * invstd).abs().view(1, -1, 1, 1)
    # the error of z, and of its batch mean, scaled by the normalisation; float32 rounding after
    tol = scale * (conv_tol + conv_tol.max()) * 2 + 2.0**-20 * (ref.detach().abs() + 1)
    err = (y.detach().double() - ref.detach()).abs()
    assert (err <= tol).all(), f"output: max error {err.max().item():.3g}"

    gz = z.grad
    slack = 2.0**-9 * (gz.abs() + gz.abs().mean())
    grad_in = torch.nn.grad.conv2d_input(x.shape, wr, tf32(gz).double(), padding=1)
    tol_in = torch.nn.grad.conv2d_input(x.shape, wr.abs(), slack, padding=1)
    tol_in += _sum_tolerance(
        grad_in, torch.nn.grad.conv2d_input(x.shape, wr.abs(), gz.abs(), padding=1), 24 * 9
    )
    grad_w = torch.nn.grad.conv2d_weight(xr, w.shape, tf32(gz).double(), padding=1)
    tol_w = torch.nn.grad.conv2d_weight(xr.abs(), w.shape, slack, padding=1)
    tol_w += _sum_tolerance(
        grad_w, torch.nn.grad.conv2d_weight(xr.abs(), w.shape, gz.abs(), padding=1), 2 * 7 * 6
    )
    for what, got, want, tol_ in (
        ("input", leaves[0].grad, grad_in, tol_in),
        ("weight", leaves[1].grad, grad_w, tol_w),
    ):
        assert got is not None and got.dtype == torch.float32
        err = (got.double() - want).abs()
        assert (err <= tol_).all(), f"grad_{what}: max error {err.max().item():.3g}"
    assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last)
