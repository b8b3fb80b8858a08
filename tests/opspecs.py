"""Every cnnext op as an ``OpSpec``, for the cross-op reliability tests (fuzzing, bad input,
NaN/Inf, determinism, leaks). A spec knows how to draw a valid configuration, build its tensors,
run cnnext and PyTorch's reference, and how loose float32 comparisons may be (the scales the
per-family tests use, applied to tests/reference.py's tolerances). Each op's specs live in its
own test file (``OPSPECS``, the module its row of ``cnnext.ops.OPS`` names); ``SPECS`` collects
them, and fails if a row has none. This module holds what several specs share.

A configuration is a plain dict; tensors are a list whose first entry is the input. Which
tensors are differentiable is ``spec.grad_names`` (a subset, drawn, may require grad).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch._prims_common import suggest_memory_format

import cnnext

from .reference import TOLERANCES, cuda_channels_last, make_input

Config = dict[str, Any]
Tensors = list[Any]  # torch.Tensor or None (absent bias)
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")


@dataclass(frozen=True)
class OpSpec:
    """One op (or one algorithm of an op) under test.

    Attributes:
        name: test id.
        op: the registered forward op, as error messages name it (``cnnext::<op>: ...``): its
            row of ``cnnext.ops.OPS`` (``OPDEFS[op]``) gives the family (``spec.family``).
        draw: ``draw(draw_fn, emulated) -> Config``, a valid configuration (hypothesis).
        make: ``make(cfg, device, dtype) -> Tensors``.
        run / ref: ``(cfg, tensors) -> (output, extras)``; extras are further results compared
            without gradients (argmax, updated running statistics).
        scales: ``cfg -> (forward, backward)`` multipliers of the float32 tolerances.
        grad_names: names of the differentiable tensors, by position in ``tensors``.
        example: a small fixed configuration (determinism and leak tests).
        conditioning: ``(cfg, tensors) -> factor >= 1`` by which the given data make the output
            and the gradients more sensitive to rounding than ``scales`` assumes (None: 1).
        ref_masked: for an op that ends in a ReLU, ``(cfg, tensors, mask) -> (output, extras)``:
            the reference with the ReLU replaced by ``mask`` (True: pass). Its gradients, under
            the mask of cnnext's output, are the ones compared (None: ``ref``'s).
    """

    name: str
    op: str
    draw: Callable[[Callable, bool], Config]
    make: Callable[[Config, str, torch.dtype], Tensors]
    run: Callable[[Config, Tensors], tuple[torch.Tensor, tuple]]
    ref: Callable[[Config, Tensors], tuple[torch.Tensor, tuple]]
    scales: Callable[[Config], tuple[float, float]]
    grad_names: tuple[str, ...]
    example: Config
    conditioning: Callable[[Config, Tensors], float] | None = None
    ref_masked: Callable[[Config, Tensors, torch.Tensor], tuple[torch.Tensor, tuple]] | None = None

    @property
    def family(self) -> str:
        """``"conv"``, ``"max"``, ``"avg"`` or ``"fused"``: the row's, in ``cnnext.ops.OPS``."""
        return OPDEFS[self.op].family

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:  # short hypothesis reports
        return f"SPECS[{self.name!r}]"


# ---- shared drawing helpers ---------------------------------------------------------------------


def size_for(draw: Callable, extent: int, pad: int, spare: int) -> int:
    """An input size the window fits: at least ``extent - 2 * pad`` (and 1)."""
    low = max(1, extent - 2 * pad)
    return draw(st.integers(low, low + spare))


def common_cfg(draw: Callable, cfg: Config) -> Config:
    cfg["batched"] = draw(st.booleans()) if cfg["n"] == 1 else True
    cfg["layout"] = draw(st.sampled_from(LAYOUTS))
    return cfg


def input_tensor(cfg: Config, device: str, dtype: torch.dtype, channels: int) -> torch.Tensor:
    shape = (cfg["n"], channels, cfg["h"], cfg["w"])
    if not cfg["batched"]:
        shape = shape[1:]
    if cfg["layout"] == "noncontiguous":  # a strided view (contiguous only when degenerate)
        return torch.randn(*shape[:-1], shape[-1] * 2, device=device, dtype=dtype)[..., ::2]
    return make_input(shape, device, dtype, cfg["layout"])


# ---- convolution (both algorithms) --------------------------------------------------------------


def draw_conv(draw: Callable, emulated: bool) -> Config:
    groups = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    # Mostly small strides; sometimes one larger than the input (a single output position).
    stride = st.one_of(st.integers(1, 3), st.integers(4, 40))
    cfg = dict(
        n=draw(st.integers(0, 3)),
        c_in=groups * draw(st.integers(1, 3)),
        c_out=groups * draw(st.integers(1, 3)),
        kh=kh,
        kw=kw,
        stride=(draw(stride), draw(stride)),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=groups,
        h=size_for(draw, dh * (kh - 1) + 1, ph, 6 if emulated else 9),
        w=size_for(draw, dw * (kw - 1) + 1, pw, 6 if emulated else 9),
        bias=draw(st.booleans()),
        variant=draw(
            st.sampled_from(("auto", "naive", "implicit_gemm_64x64", "implicit_gemm_128x128"))
        ),
        # im2col column buffer: the default, one output row, or one byte (smallest chunks).
        col_limit=draw(st.sampled_from((None, 700, 1))),
    )
    return common_cfg(draw, cfg)


def make_conv(cfg: Config, device: str, dtype: torch.dtype) -> Tensors:
    fan_in = cfg["c_in"] // cfg["groups"] * cfg["kh"] * cfg["kw"]
    w = (
        torch.randn(cfg["c_out"], cfg["c_in"] // cfg["groups"], cfg["kh"], cfg["kw"], device=device)
        / fan_in**0.5
    )
    b = torch.randn(cfg["c_out"], device=device).to(dtype) if cfg["bias"] else None
    return [input_tensor(cfg, device, dtype, cfg["c_in"]), w.to(dtype), b]


def conv_kwargs(cfg: Config) -> dict:
    return dict(
        stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"]
    )


def _run_conv(algo: str) -> Callable[[Config, Tensors], tuple[torch.Tensor, tuple]]:
    def run(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
        limit = cfg.get("col_limit")
        previous = cnnext.ops.get_im2col_workspace_limit()
        if limit is not None:
            cnnext.ops.set_im2col_workspace_limit(limit)
        try:
            out = cnnext.ops.conv2d(
                t[0], t[1], t[2], algo=algo, variant=cfg.get("variant", "auto"), **conv_kwargs(cfg)
            )
        finally:
            cnnext.ops.set_im2col_workspace_limit(previous)
        return out, ()

    return run


def torch_conv(cfg: Config, x: torch.Tensor, w: torch.Tensor, b: Any) -> torch.Tensor:
    """``F.conv2d`` as the reference. On the CPU it runs on NCHW and the output then takes the
    layout torch's CPU convolution gives channels_last input: torch 2.14's oneDNN kernel
    segfaults on some tiny channels_last inputs (a 1x2x2x1 input, 6x1x3x1 weight, groups 2,
    stride 2, padding 3, dilation (1, 2)), which killed the long fuzz profile."""
    if x.device.type != "cpu" or x.dim() != 4 or suggest_memory_format(x) != torch.channels_last:
        return F.conv2d(x, w, b, **conv_kwargs(cfg))
    out = F.conv2d(x.contiguous(), w, b, **conv_kwargs(cfg))
    return out.contiguous(memory_format=torch.channels_last)


def _ref_conv(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    out = torch_conv(cfg, t[0], t[1], t[2])
    if cuda_channels_last(t[0]):
        # torch's own CUDA depthwise kernel (float64, or shapes cuDNN declines) returns NCHW for
        # channels_last input (seen with torch 2.11 on an H100); cnnext keeps channels_last, as
        # torch's CPU and cuDNN paths do.
        out = out.contiguous(memory_format=torch.channels_last)
    return out, ()


def conv_scales(cfg: Config) -> tuple[float, float]:
    # As tests/test_conv2d.py: a sum of `reduction` products forward; backward also sums over
    # every output position (grad_weight, grad_bias).
    reduction = cfg["c_in"] // cfg["groups"] * cfg["kh"] * cfg["kw"]
    forward = max(1.0, reduction / 16)
    return forward, max(forward, cfg["n"] * cfg["h"] * cfg["w"] / 64)


CONV_EXAMPLE = dict(
    n=2, c_in=4, c_out=6, kh=3, kw=3, stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2,
    h=9, w=8, bias=True, variant="auto", col_limit=None, batched=True, layout="contiguous",
)  # fmt: skip


def conv_spec(algo: str) -> OpSpec:
    return OpSpec(
        name=f"conv2d_{algo}",
        op=f"conv2d_{algo}",
        draw=draw_conv,
        make=make_conv,
        run=_run_conv(algo),
        ref=_ref_conv,
        scales=conv_scales,
        grad_names=("input", "weight", "bias"),
        example=CONV_EXAMPLE,
    )


# ---- the collection: every op of cnnext.ops.OPS, from its test module --------------------------

OPDEFS = {row.op: row for row in cnnext.ops.OPS}


def touches(start: int, kernel: int, dilation: int, size: int) -> bool:
    """Whether the pooling window starting at ``start`` has a tap inside ``[0, size)``; cnnext
    rejects dilated windows that read only padding (torch returns -inf and a stray argmax)."""
    first = start if start >= 0 else start + -(start // dilation) * dilation
    return first < size and (first - start) // dilation < kernel


def _collect() -> list[OpSpec]:
    """Each op's ``OpSpec``s, from the ``OPSPECS`` list of the test module its table row names
    (imported here: the test modules import this one, so this runs on first use of SPECS)."""
    specs: list[OpSpec] = []
    for module in dict.fromkeys(row.tests for row in cnnext.ops.OPS):
        specs += importlib.import_module(f"{__package__}.{module}").OPSPECS
    for row in cnnext.ops.OPS:
        mine = [s for s in specs if s.op == row.op]
        assert mine, f"cnnext.ops.OPS row {row.op!r}: no OpSpec in tests/{row.tests}.py's OPSPECS"
        assert all(OPDEFS[s.op].tests == row.tests for s in mine), row.op
    return specs


def __getattr__(name: str) -> Any:
    # SPECS is built on first use, once every module it imports can import this one.
    if name == "SPECS":
        specs = globals()["SPECS"] = _collect()
        return specs
    raise AttributeError(name)


# ---- running and comparing ----------------------------------------------------------------------


def emulated(schedule: str | None) -> Any:
    """``cnnext.emulate_cuda(schedule)``, or nothing for the CPU kernels (``schedule=None``)."""
    return cnnext.emulate_cuda(schedule) if schedule is not None else nullcontext()


def leaves(spec: OpSpec, tensors: Tensors, requires: Sequence[bool]) -> Tensors:
    """Fresh leaf copies (same strides) of ``tensors``; the differentiable ones picked by
    ``requires`` (one flag per ``grad_names`` entry) require grad."""
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        copy.copy_(t.detach())
        copy.requires_grad_(i < len(requires) and requires[i])
        out.append(copy)
    return out


def forward_backward(
    fn: Callable[[Config, Tensors], tuple[torch.Tensor, tuple]],
    cfg: Config,
    tensors: Tensors,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple, tuple, torch.Tensor]:
    """Output, extras, the gradients of ``<output, grad>`` w.r.t. the tensors that require grad,
    and ``grad`` (drawn from a normal distribution when not given)."""
    out, extras = fn(cfg, tensors)
    if grad is None:
        grad = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad.to(out.dtype)) if wanted else ()
    return out, extras, grads, grad


def check_against_torch(
    spec: OpSpec,
    cfg: Config,
    tensors: Tensors,
    requires: Sequence[bool],
    schedule: str | None,
    equal_nan: bool = False,
) -> None:
    """cnnext (the CPU kernels, or the emulated CUDA kernels in ``schedule``) against the PyTorch
    reference: output (values and layout), extras and every requested gradient. Half and
    bfloat16 (CUDA kernels only) are compared with the reference computed in float32 on the same
    rounded values, rounded once."""
    dtype = tensors[0].dtype
    reduced = dtype in (torch.float16, torch.bfloat16)
    theirs = [t.float() if reduced and t is not None else t for t in tensors]
    try:
        expected, expected_extras, expected_grads, grad = forward_backward(
            spec.ref, cfg, leaves(spec, theirs, requires)
        )
    except ValueError as refused:
        # Torch refuses some valid-looking inputs (training batch norm over one value per
        # channel): cnnext must refuse them too, with torch's words.
        first = str(refused).split(",")[0]
        with emulated(schedule), pytest.raises(ValueError, match=re.escape(first)):
            spec.run(cfg, leaves(spec, tensors, requires))
        return
    with emulated(schedule):
        out, extras, grads, _ = forward_backward(
            spec.run, cfg, leaves(spec, tensors, requires), grad.to(dtype)
        )
    if spec.ref_masked is not None and grads:
        # A pre-activation within rounding of 0 may land on either side of the ReLU's kink in
        # cnnext and in torch: the outputs still agree (compared below), but the gradient is
        # passed on one side only. Compare with torch's gradient under cnnext's ReLU mask (as
        # torch's ReLU backward, `not out <= 0`: a NaN output passes its gradient).
        masked = functools.partial(spec.ref_masked, mask=~(out.detach() <= 0))
        mine = leaves(spec, theirs, requires)
        _, _, expected_grads, _ = forward_backward(masked, cfg, mine, grad)
    forward_scale, backward_scale = spec.scales(cfg)
    # The data's own conditioning scales what flows through it (the output and the gradients),
    # not the extras (argmax, batch statistics), whose rounding it does not amplify.
    cond = spec.conditioning(cfg, theirs) if spec.conditioning is not None else 1.0
    assert out.shape == expected.shape and out.dtype == dtype, (out.shape, expected.shape)
    same_layout(out, expected)
    compare(out, expected.to(dtype), forward_scale * cond, equal_nan, "output")
    for i, (got, want) in enumerate(zip(extras, expected_extras, strict=True)):
        compare(got, want.to(got.dtype), forward_scale, equal_nan, f"extra {i}")
    for i, (got, want) in enumerate(zip(grads, expected_grads, strict=True)):
        compare(got, want.to(dtype), backward_scale * cond, equal_nan, f"gradient {i}")


def same_layout(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same memory layout: equal strides wherever a dimension has more than one element (a
    size-1 dimension's stride is arbitrary). An empty tensor addresses no memory, so it has no
    layout to compare (for batch 0 cuDNN may pick channels_last where the CPU picks NCHW)."""
    if want.numel() == 0:
        assert got.numel() == 0 and got.shape == want.shape
        return
    for size, a, b in zip(got.shape, got.stride(), want.stride(), strict=True):
        assert size <= 1 or a == b, ("strides", got.shape, got.stride(), want.stride())


def compare(got: torch.Tensor, want: torch.Tensor, scale: float, equal_nan: bool, what: str):
    """Exact for integers; tests/reference.py's per-dtype tolerances times ``scale`` else."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if not got.dtype.is_floating_point:
        assert torch.equal(got, want), what
        return
    rtol, atol = TOLERANCES[want.dtype]
    torch.testing.assert_close(
        got, want, rtol=rtol * scale, atol=atol * scale, equal_nan=equal_nan, msg=what
    )
