"""Bad input, the same table for every op of tests/opspecs.py, on the CPU kernel and the emulated
CUDA kernel (and cuda when present): each row must raise a RuntimeError whose message names the
op and the argument. Op-specific rows (pool padding over half the kernel, divisor_override = 0,
zero groups, backward-op arguments) stay in the op's own test file.

Also NaN and Inf inputs at chosen positions: forward and backward propagate them as torch does
(max pooling: a NaN wins its window and takes the gradient).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import cnnext

from .conftest import schedule_for
from .opspecs import SPECS, OpSpec, check_against_torch

CONV = ("conv", "fused")
POOL = ("max", "avg")
ALL = CONV + POOL


@pytest.fixture(params=["cpu", "emu", "cuda"])
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """The kernel under test: checks are host code, so one emulated schedule suffices."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    if request.param == "emu":
        with cnnext.emulate_cuda("forward"):
            yield "emu"
    else:
        yield request.param


def _device(kernel: str) -> str:
    return "cuda" if kernel == "cuda" else "cpu"


# (id, families, overrides of the base call, argument named in the message, message fragment)
ROWS: list[tuple[str, tuple[str, ...], dict[str, Any], str, str]] = [
    ("2D input", ALL, {"x": (5, 5)}, "input", "to be a 3D or 4D tensor"),
    ("5D input", ALL, {"x": (1, 3, 2, 5, 5)}, "input", "to be a 3D or 4D tensor"),
    ("3D weight", CONV, {"w": (4, 3, 3)}, "weight", "to be a 4D tensor"),
    ("integer input", ALL, {"x_dtype": torch.int64}, "input", "to have a floating dtype"),
    ("integer weight", CONV, {"w_dtype": torch.int32}, "weight", "to have the same dtype"),
    ("float64 weight", CONV, {"w_dtype": torch.float64}, "weight", "to have the same dtype"),
    ("float64 bias", CONV, {"b_dtype": torch.float64}, "bias", "to have the same dtype"),
    ("CPU weight", CONV, {"w_device": "cpu", "cuda_only": True}, "weight", "on the same device"),
    ("channels", CONV, {"w": (4, 2, 3, 3)}, "input", "has 3 channels but weight"),
    ("groups", CONV, {"groups": 2}, "groups", r"\(2\) must divide the input channels"),
    ("empty kernel", CONV, {"w": (4, 3, 0, 3)}, "weight", "with non-zero out_channels and kernel"),
    ("zero kernel", POOL, {"kernel": (0, 3)}, "kernel_size", "to be positive"),
    ("negative kernel", POOL, {"kernel": (3, -2)}, "kernel_size", "to be positive"),
    ("zero stride", ALL, {"stride": (0, 1)}, "stride", "to be positive"),
    ("negative stride", ALL, {"stride": (1, -2)}, "stride", "to be positive"),
    ("zero dilation", CONV + ("max",), {"dilation": (1, 0)}, "dilation", "to be positive"),
    ("negative dilation", CONV + ("max",), {"dilation": (-1, 1)}, "dilation", "to be positive"),
    ("negative padding", ALL, {"padding": (0, -1)}, "padding", "to be non-negative"),
    (
        "kernel over padded input",
        CONV,
        {"x": (1, 3, 2, 5), "padding": (0, 0)},
        "kernel size",
        "larger than the padded",
    ),
    ("output size < 1", POOL, {"x": (1, 3, 1, 5), "padding": (0, 1)}, "output size", "too small"),
    ("dilated kernel over input", ("max",), {"dilation": (4, 1)}, "output size", "too small"),
    ("bias length", CONV, {"b": (3,)}, "bias", "to be a 1D tensor of length 4"),
    ("bias rank", CONV, {"b": (4, 1)}, "bias", "to be a 1D tensor of length 4"),
    ("bn_weight length", ("fused",), {"bn_weight": (3,)}, "bn_weight", ""),
    ("bn_bias length", ("fused",), {"bn_bias": (5,)}, "bn_bias", ""),
    ("running_mean length", ("fused",), {"running_mean": (3,)}, "running_mean", ""),
    ("running_var length", ("fused",), {"running_var": (2, 2)}, "running_var", ""),
]


def _call(spec: OpSpec, device: str, over: dict[str, Any]) -> Any:
    """The op on a small valid base call (3x5x5 input, 3x3 window, padding 1) with overrides."""
    x = torch.randn(over.get("x", (1, 3, 5, 5)), device=device).to(over.get("x_dtype", torch.float))
    geometry = {
        "stride": over.get("stride", (1, 1)),
        "padding": over.get("padding", (1, 1)),
    }
    if spec.family in POOL:
        kernel = over.get("kernel", (3, 3))
        if spec.family == "max":
            return cnnext.ops.max_pool2d(
                x, kernel, dilation=over.get("dilation", (1, 1)), **geometry
            )
        return cnnext.ops.avg_pool2d(x, kernel, **geometry)
    w_device = over.get("w_device", device)
    w = torch.randn(over.get("w", (4, 3, 3, 3)), device=w_device).to(over.get("w_dtype", x.dtype))
    b = torch.randn(over.get("b", (4,)), device=device).to(over.get("b_dtype", x.dtype))
    geometry.update(dilation=over.get("dilation", (1, 1)), groups=over.get("groups", 1))
    if spec.family == "conv":
        return cnnext.ops.conv2d(x, w, b, algo=spec.op[len("conv2d_") :], **geometry)

    def vec(name: str, fill: float) -> torch.Tensor:
        return torch.full(over.get(name, (4,)), fill, device=device, dtype=x.dtype)

    return cnnext.ops.conv_bn_relu(
        x, w, b,
        running_mean=vec("running_mean", 0.0), running_var=vec("running_var", 1.0),
        bn_weight=vec("bn_weight", 1.0), bn_bias=vec("bn_bias", 0.0),
        training=over.get("training", False), momentum=0.1, eps=1e-5, **geometry,
    )  # fmt: skip


CASES = [(spec, row) for spec in SPECS for row in ROWS if spec.family in row[1]]


@pytest.mark.parametrize("spec,row", CASES, ids=lambda v: v.name if isinstance(v, OpSpec) else v[0])
def test_bad_input_names_op_and_argument(kernel: str, spec: OpSpec, row: tuple) -> None:
    _, _, over, argument, fragment = row
    if over.get("cuda_only") and kernel != "cuda":
        pytest.skip("a device mismatch needs a GPU (meta or emulated is not another device)")
    message = f"cnnext::{spec.op}: .*{argument}.*{fragment}"
    with pytest.raises(RuntimeError, match=message):
        _call(spec, _device(kernel), over)


def test_base_call_is_valid(kernel: str) -> None:
    """The table's base call itself succeeds, so every row fails for its own reason."""
    for spec in SPECS:
        _call(spec, _device(kernel), {})
        if spec.family == "fused":
            _call(spec, _device(kernel), {"training": True})


# ---- NaN and Inf --------------------------------------------------------------------------------

SPECIAL = {
    "nan": [float("nan")],
    "inf": [float("inf"), float("-inf")],
    "mixed": [float("nan"), float("inf"), float("-inf")],
}


def _plant(t: torch.Tensor, values: list[float], count: int, seed: int) -> None:
    """Writes ``values`` (cycled) at ``count`` chosen positions of ``t`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(t.numel(), generator=g)[:count]
    index = torch.unravel_index(flat, t.shape)
    with torch.no_grad():
        for i in range(count):
            t[tuple(d[i] for d in index)] = values[i % len(values)]


@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("special", list(SPECIAL))
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("mode", ["cpu", "emu-forward", "emu-random"])
def test_nan_inf_propagate_as_in_torch(
    request: pytest.FixtureRequest, mode: str, spec: OpSpec, special: str, where: str
) -> None:
    if where == "weight" and spec.family not in CONV:
        pytest.skip("pooling has no weight")
    # Mixed NaN/Inf planted in a channels_last input. Not in a weight: torch's own channels_last
    # convolution skips padded taps (no 0 * Inf) and so disagrees with its NCHW result there.
    layout = "channels_last" if special == "mixed" and where == "input" else "contiguous"
    cfg = {**spec.example, "layout": layout}
    tensors = spec.make(cfg, "cpu", torch.float32)
    target = tensors[0] if where == "input" else tensors[1]
    _plant(target, SPECIAL[special], max(1, target.numel() // 25), seed=len(special))
    schedule = None if mode == "cpu" else schedule_for(mode, request.node.nodeid)
    requires = [True] * len(spec.grad_names)
    check_against_torch(spec, cfg, tensors, requires, schedule, equal_nan=True)


GEOMETRIES = {  # stride gaps, padding larger than the tap span, dilation with groups, a stem
    "s2p1": dict(stride=2, padding=1, dilation=1, groups=1, k=3),
    "d2g2": dict(stride=1, padding=2, dilation=2, groups=2, k=3),
    "s3k2": dict(stride=3, padding=0, dilation=1, groups=1, k=2),
    "s2p3k7": dict(stride=2, padding=3, dilation=1, groups=1, k=7),
}


@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("variant", ["naive", "implicit_gemm_64x64", "implicit_gemm_128x128"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("mode", ["cpu", "emu-random"])
def test_direct_backward_skips_structural_taps(
    request: pytest.FixtureRequest, mode: str, geometry: str, variant: str, where: str
) -> None:
    """A NaN and an Inf in the weight (input) reach exactly the grad_input (grad_weight) entries
    they reach in torch: padding, stride gaps and tile overhang are skipped, not multiplied by 0."""
    g = dict(GEOMETRIES[geometry])
    k, conf = g.pop("k"), g
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 11, 13, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 4 // conf["groups"], k, k, dtype=torch.float64, generator=gen)
    target = w if where == "weight" else x
    target.view(-1)[5] = float("nan")
    target.view(-1)[target.numel() // 2] = float("inf")
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    out_ref = torch.nn.functional.conv2d(x_ref, w_ref, **conf)
    grad = torch.randn(out_ref.shape, dtype=torch.float64, generator=gen)
    out_ref.backward(grad)
    x_ours, w_ours = x.clone().requires_grad_(), w.clone().requires_grad_()
    schedule = None if mode == "cpu" else schedule_for(mode, request.node.nodeid)
    with cnnext.emulate_cuda(schedule) if schedule else torch.enable_grad():
        out = cnnext.ops.conv2d(x_ours, w_ours, algo="direct", variant=variant, **conf)
        out.backward(grad)
    # Not vacuous: the gradient at stake is non-finite in part only.
    spread = (x_ref.grad if where == "weight" else w_ref.grad).isfinite()
    assert spread.any() and not spread.all()
    for ours, ref in [(out, out_ref), (x_ours.grad, x_ref.grad), (w_ours.grad, w_ref.grad)]:
        torch.testing.assert_close(ours, ref, equal_nan=True)


def test_max_pool_nan_rule_with_gradient() -> None:
    """Two NaNs in one window: the last in row-major order is the argmax and takes the
    gradient, on the CPU and the emulated kernels alike."""
    x = torch.randn(1, 1, 4, 4)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = float("nan")
    for schedule in (None, "reverse"):
        leaf = x.clone().requires_grad_()
        ctx = cnnext.emulate_cuda(schedule) if schedule else torch.enable_grad()
        with ctx:
            out, idx = cnnext.ops.max_pool2d(leaf, 2, return_indices=True)
            (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        assert idx[0, 0, 0, 0] == 4 and out[0, 0, 0, 0].isnan()
        assert grad[0, 0, 1, 0] == 1 and grad[0, 0, 0, 1] == 0


PY_NAMES = {"conv": "cnnext.conv2d", "max": "cnnext.max_pool2d", "avg": "cnnext.avg_pool2d"}


@pytest.mark.parametrize("argument", ["stride", "padding", "dilation"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.family in PY_NAMES], ids=str)
def test_python_arguments_name_op(spec: OpSpec, argument: str) -> None:
    """Arguments that are not an int or a pair fail in Python, naming the function."""
    if spec.family == "avg" and argument == "dilation":
        pytest.skip("avg_pool2d has no dilation")
    with pytest.raises(ValueError, match=f"{PY_NAMES[spec.family]}: expected {argument} to be"):
        _call(spec, "cpu", {argument: (1, 2, 3)})
