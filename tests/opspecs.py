"""Every cnnext op as one row of a table, for the cross-op reliability tests (fuzzing, bad input,
NaN/Inf, determinism, leaks). A row knows how to draw a valid configuration, build its tensors,
run cnnext and PyTorch's reference, and how loose float32 comparisons may be (the scales the
per-family tests use, applied to tests/reference.py's tolerances). A new op family is one more
``OpSpec`` in ``SPECS``.

A configuration is a plain dict; tensors are a list whose first entry is the input. Which
tensors are differentiable is ``spec.grad_names`` (a subset, drawn, may require grad).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch._prims_common import suggest_memory_format

import cnnext
from cnnext._shapes import pool_output_size

from .reference import TOLERANCES, avg_pool2d_reference, cuda_channels_last, make_input

Config = dict[str, Any]
Tensors = list[Any]  # torch.Tensor or None (absent bias)
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")


@dataclass(frozen=True)
class OpSpec:
    """One op (or one algorithm of an op) under test.

    Attributes:
        name: test id.
        op: the registered forward op, as error messages name it (``cnnext::<op>: ...``).
        family: ``"conv"``, ``"max"``, ``"avg"`` or ``"fused"``.
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
    family: str
    draw: Callable[[Callable, bool], Config]
    make: Callable[[Config, str, torch.dtype], Tensors]
    run: Callable[[Config, Tensors], tuple[torch.Tensor, tuple]]
    ref: Callable[[Config, Tensors], tuple[torch.Tensor, tuple]]
    scales: Callable[[Config], tuple[float, float]]
    grad_names: tuple[str, ...]
    example: Config
    conditioning: Callable[[Config, Tensors], float] | None = None
    ref_masked: Callable[[Config, Tensors, torch.Tensor], tuple[torch.Tensor, tuple]] | None = None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:  # short hypothesis reports
        return f"SPECS[{self.name!r}]"


# ---- shared drawing helpers ---------------------------------------------------------------------


def _size_for(draw: Callable, extent: int, pad: int, spare: int) -> int:
    """An input size the window fits: at least ``extent - 2 * pad`` (and 1)."""
    low = max(1, extent - 2 * pad)
    return draw(st.integers(low, low + spare))


def _common(draw: Callable, cfg: Config) -> Config:
    cfg["batched"] = draw(st.booleans()) if cfg["n"] == 1 else True
    cfg["layout"] = draw(st.sampled_from(LAYOUTS))
    return cfg


def _input(cfg: Config, device: str, dtype: torch.dtype, channels: int) -> torch.Tensor:
    shape = (cfg["n"], channels, cfg["h"], cfg["w"])
    if not cfg["batched"]:
        shape = shape[1:]
    if cfg["layout"] == "noncontiguous":  # a strided view (contiguous only when degenerate)
        return torch.randn(*shape[:-1], shape[-1] * 2, device=device, dtype=dtype)[..., ::2]
    return make_input(shape, device, dtype, cfg["layout"])


# ---- convolution (both algorithms) --------------------------------------------------------------


def _draw_conv(draw: Callable, emulated: bool) -> Config:
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
        h=_size_for(draw, dh * (kh - 1) + 1, ph, 6 if emulated else 9),
        w=_size_for(draw, dw * (kw - 1) + 1, pw, 6 if emulated else 9),
        bias=draw(st.booleans()),
        variant=draw(
            st.sampled_from(("auto", "naive", "implicit_gemm_64x64", "implicit_gemm_128x128"))
        ),
        # im2col column buffer: the default, one output row, or one byte (smallest chunks).
        col_limit=draw(st.sampled_from((None, 700, 1))),
    )
    return _common(draw, cfg)


def _make_conv(cfg: Config, device: str, dtype: torch.dtype) -> Tensors:
    fan_in = cfg["c_in"] // cfg["groups"] * cfg["kh"] * cfg["kw"]
    w = (
        torch.randn(cfg["c_out"], cfg["c_in"] // cfg["groups"], cfg["kh"], cfg["kw"], device=device)
        / fan_in**0.5
    )
    b = torch.randn(cfg["c_out"], device=device).to(dtype) if cfg["bias"] else None
    return [_input(cfg, device, dtype, cfg["c_in"]), w.to(dtype), b]


def _conv_kwargs(cfg: Config) -> dict:
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
                t[0], t[1], t[2], algo=algo, variant=cfg.get("variant", "auto"), **_conv_kwargs(cfg)
            )
        finally:
            cnnext.ops.set_im2col_workspace_limit(previous)
        return out, ()

    return run


def _torch_conv(cfg: Config, x: torch.Tensor, w: torch.Tensor, b: Any) -> torch.Tensor:
    """``F.conv2d`` as the reference. On the CPU it runs on NCHW and the output then takes the
    layout torch's CPU convolution gives channels_last input: torch 2.14's oneDNN kernel
    segfaults on some tiny channels_last inputs (a 1x2x2x1 input, 6x1x3x1 weight, groups 2,
    stride 2, padding 3, dilation (1, 2)), which killed the long fuzz profile."""
    if x.device.type != "cpu" or x.dim() != 4 or suggest_memory_format(x) != torch.channels_last:
        return F.conv2d(x, w, b, **_conv_kwargs(cfg))
    out = F.conv2d(x.contiguous(), w, b, **_conv_kwargs(cfg))
    return out.contiguous(memory_format=torch.channels_last)


def _ref_conv(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    out = _torch_conv(cfg, t[0], t[1], t[2])
    if cuda_channels_last(t[0]):
        # torch's own CUDA depthwise kernel (float64, or shapes cuDNN declines) returns NCHW for
        # channels_last input (seen with torch 2.11 on an H100); cnnext keeps channels_last, as
        # torch's CPU and cuDNN paths do.
        out = out.contiguous(memory_format=torch.channels_last)
    return out, ()


def _conv_scales(cfg: Config) -> tuple[float, float]:
    # As tests/test_conv2d.py: a sum of `reduction` products forward; backward also sums over
    # every output position (grad_weight, grad_bias).
    reduction = cfg["c_in"] // cfg["groups"] * cfg["kh"] * cfg["kw"]
    forward = max(1.0, reduction / 16)
    return forward, max(forward, cfg["n"] * cfg["h"] * cfg["w"] / 64)


CONV_EXAMPLE = dict(
    n=2, c_in=4, c_out=6, kh=3, kw=3, stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2,
    h=9, w=8, bias=True, variant="auto", col_limit=None, batched=True, layout="contiguous",
)  # fmt: skip


def _conv_spec(algo: str) -> OpSpec:
    return OpSpec(
        name=f"conv2d_{algo}",
        op=f"conv2d_{algo}",
        family="conv",
        draw=_draw_conv,
        make=_make_conv,
        run=_run_conv(algo),
        ref=_ref_conv,
        scales=_conv_scales,
        grad_names=("input", "weight", "bias"),
        example=CONV_EXAMPLE,
    )


# ---- pooling ------------------------------------------------------------------------------------


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
        h=_size_for(draw, dh * (kh - 1) + 1, ph, 8 if emulated else 12),
        w=_size_for(draw, dw * (kw - 1) + 1, pw, 8 if emulated else 12),
    )
    return _common(draw, cfg)


def touches(start: int, kernel: int, dilation: int, size: int) -> bool:
    """Whether the pooling window starting at ``start`` has a tap inside ``[0, size)``; cnnext
    rejects dilated windows that read only padding (torch returns -inf and a stray argmax)."""
    first = start if start >= 0 else start + -(start // dilation) * dilation
    return first < size and (first - start) // dilation < kernel


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
    return [_input(cfg, device, dtype, cfg["c"])]


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
    family="max",
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
    family="avg",
    draw=_draw_avg,
    make=_make_pool,
    run=_run_avg,
    ref=_ref_avg,
    scales=lambda cfg: (1.0, 1.0),
    grad_names=("input",),
    example=POOL_EXAMPLE,
)


# ---- fused conv + batch norm + ReLU ------------------------------------------------------------


def _draw_fused(draw: Callable, emulated: bool) -> Config:
    cfg = _draw_conv(draw, emulated)
    cfg["n"] = max(cfg["n"], 1)  # batch statistics need a sample
    cfg["batched"] = True
    cfg["training"] = draw(st.booleans())
    cfg["momentum"] = draw(st.sampled_from((0.1, 0.5)))
    cfg["eps"] = draw(st.sampled_from((1e-5, 1e-3)))
    return cfg


def _make_fused(cfg: Config, device: str, dtype: torch.dtype) -> Tensors:
    x, w, b = _make_conv(cfg, device, dtype)
    c = cfg["c_out"]
    bn_weight = (torch.rand(c, device=device) + 0.5).to(dtype)
    bn_bias = torch.randn(c, device=device).to(dtype)
    running_mean = torch.randn(c, device=device).to(dtype)
    running_var = (torch.rand(c, device=device) + 0.5).to(dtype)
    return [x, w, b, bn_weight, bn_bias, running_mean, running_var]


def _fused_stats(t: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    # Each call updates its own copy of the running statistics (training mode).
    return t[5].detach().clone(), t[6].detach().clone()


def _run_fused(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    # The one place that knows cnnext.ops.conv_bn_relu's signature.
    mean, var = _fused_stats(t)
    out = cnnext.ops.conv_bn_relu(
        t[0], t[1], t[2],
        running_mean=mean, running_var=var, bn_weight=t[3], bn_bias=t[4],
        training=cfg["training"], momentum=cfg["momentum"], eps=cfg["eps"],
        **_conv_kwargs(cfg),
    )  # fmt: skip
    return out, (mean, var)


def _ref_fused(cfg: Config, t: Tensors) -> tuple[torch.Tensor, tuple]:
    return _ref_fused_masked(cfg, t, None)


def _ref_fused_masked(
    cfg: Config, t: Tensors, mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple]:
    """The eager reference; with ``mask``, the ReLU passes exactly where ``mask`` is True."""
    mean, var = _fused_stats(t)
    y = _torch_conv(cfg, t[0], t[1], t[2])
    y = F.batch_norm(y, mean, var, t[3], t[4], cfg["training"], cfg["momentum"], cfg["eps"])
    if mask is None:
        return torch.relu(y), (mean, var)
    return torch.where(mask, y, torch.zeros_like(y)), (mean, var)


def _fused_conditioning(cfg: Config, t: Tensors) -> float:
    """How much training-mode batch norm amplifies the convolution's rounding, for these tensors.

    Training normalises channel c with its batch statistics: y = gamma_c * (z - mean_c) *
    invstd_c + beta_c. The convolution output z carries an absolute rounding error of about
    u * max(1, |z|) (u: the float32 reduction's, or half/bfloat16's when z itself is rounded),
    which ``scales`` allows for. Batch norm multiplies it by gamma_c * invstd_c on its way into
    the output, and the gradient of z is gamma_c * invstd_c times the incoming one, so every
    gradient summed from it (the conv bias's is exactly 0 in training: both sides return
    rounding noise of that size) carries the same factor. With the fuzzer's small channels
    (few values, zero padding) the batch variance is often small, and the factor large, in
    torch's float32 as in ours. Returns max over channels of max(1, |gamma_c| * invstd_c *
    max(1, max|z_c|)); 1 in eval mode, where the running variance is well away from 0.
    Checked on random training cases drawn as the fuzzer draws them, every gradient requested
    (800 draws on the CPU in float32, 300 emulated in bfloat16): the unscaled tolerances failed
    26 and 19 comparisons (all gradients, most the conv bias's), this factor none, and
    max|z_c| * invstd_c / sqrt(M) alone (no gain) 2 and 5."""
    if not cfg["training"]:
        return 1.0
    x, w = t[0].detach().double(), t[1].detach().double()
    b = t[2].detach().double() if t[2] is not None else None
    z = F.conv2d(x, w, b, **_conv_kwargs(cfg))
    if z.dim() == 3:
        z = z.unsqueeze(0)
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
    if per_channel.shape[1] < 2:
        return 1.0  # no statistics (an empty batch) or refused by torch
    invstd = (per_channel.var(dim=1, unbiased=False) + cfg["eps"]).rsqrt()
    gamma = t[3].detach().double().abs() if t[3] is not None else torch.ones_like(invstd)
    magnitude = per_channel.abs().amax(dim=1).clamp(min=1.0)
    return max(1.0, float((gamma * invstd * magnitude).max()))


FUSED_SPEC = OpSpec(
    name="conv_bn_relu",
    op="conv_bn_relu",
    family="fused",
    draw=_draw_fused,
    make=_make_fused,
    run=_run_fused,
    ref=_ref_fused,
    # Batch normalisation divides by the batch's standard deviation: errors scale like the
    # convolution's.
    scales=_conv_scales,
    grad_names=("input", "weight", "bias", "bn_weight", "bn_bias"),
    example={**CONV_EXAMPLE, "training": True, "momentum": 0.1, "eps": 1e-5},
    conditioning=_fused_conditioning,
    ref_masked=_ref_fused_masked,
)

SPECS: list[OpSpec] = [_conv_spec("direct"), _conv_spec("im2col"), MAX_SPEC, AVG_SPEC, FUSED_SPEC]


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
