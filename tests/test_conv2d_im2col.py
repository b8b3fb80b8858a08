"""im2col-specific behaviour of ``cnnext.ops.conv2d(algo="im2col")`` against
``torch.nn.functional.conv2d``: a batch split into column-buffer chunks (tiny workspace limit),
the 1x1 shortcut that skips the column buffer, CPU column tiles and GEMM blocking at larger
sizes, half/bfloat16 on the emulated CUDA device, deterministic backward, and bad arguments.
The shared matrix (shapes, layouts, gradcheck, opcheck, compile) is in test_conv2d.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import cnnext

from .opspecs import conv_spec
from .reference import assert_close, make_input


@pytest.fixture
def workspace_limit() -> Iterator[None]:
    """Restores the im2col workspace limit after a test that changes it."""
    previous = cnnext.ops.get_im2col_workspace_limit()
    yield
    cnnext.ops.set_im2col_workspace_limit(previous)


def _grads(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad)


def _check_fwd_bwd(x, w, b, kwargs, scale: float = 1.0) -> None:
    expected = F.conv2d(x, w, b, **kwargs)
    grad = torch.randn_like(expected)
    expected, expected_grads = _grads(lambda *t: F.conv2d(*t, **kwargs), (x, w, b), grad)
    out, grads = _grads(lambda *t: cnnext.ops.conv2d(*t, algo="im2col", **kwargs), (x, w, b), grad)
    assert out.shape == expected.shape
    assert_close(out, expected, scale=scale)
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e, scale=scale * 4)


# (batch, c_in, h, w, c_out, k, stride, padding, dilation, groups)
CHUNKED = [
    (5, 3, 9, 7, 4, 3, 1, 1, 1, 1),
    (4, 4, 7, 9, 6, 3, 2, 1, 2, 2),
    (3, 2, 6, 6, 3, 2, 1, 0, 1, 1),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("limit", [1, 700], ids=["limit1B", "limit700B"])
@pytest.mark.parametrize("case", CHUNKED, ids=str)
def test_chunked_batch_matches_torch(device: str, case, limit: int, layout: str, workspace_limit):
    """A workspace limit below one sample's columns: one sample (CUDA, channels_last backward) or
    one output row (CPU tiles) at a time, same result as F.conv2d forward and backward."""
    n, c, h, w_, co, k, s, p, d, g = case
    x = make_input((n, c, h, w_), device, layout=layout)
    w = torch.randn(co, c // g, k, k, device=device) / (c // g * k * k) ** 0.5
    b = torch.randn(co, device=device)
    cnnext.ops.set_im2col_workspace_limit(limit)
    assert cnnext.ops.get_im2col_workspace_limit() == limit
    _check_fwd_bwd(x, w, b, dict(stride=s, padding=p, dilation=d, groups=g))


def test_chunk_boundaries_any_limit(device: str, workspace_limit) -> None:
    """Limits that split the batch into uneven chunks (1, 2 or 3 samples, last one shorter)."""
    n, c, h, co, k = 7, 2, 6, 3, 3
    x = torch.randn(n, c, h, h, device=device)
    w = torch.randn(co, c, k, k, device=device)
    b = torch.randn(co, device=device)
    per_sample = c * k * k * h * h * 4  # columns of one sample, padding 1, float32
    for samples in (1, 2, 3):
        cnnext.ops.set_im2col_workspace_limit(samples * per_sample + 5)
        _check_fwd_bwd(x, w, b, dict(padding=1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "groups,dilation,bias", [(1, 1, True), (3, 1, False), (1, 2, True)], ids=str
)
def test_pointwise_shortcut(device: str, groups: int, dilation: int, bias: bool, layout: str):
    """1x1, stride 1, no padding multiplies the input directly (dilation is irrelevant)."""
    x = make_input((3, 6, 5, 7), device, layout=layout)
    w = torch.randn(9, 6 // groups, 1, 1, device=device)
    b = torch.randn(9, device=device) if bias else None
    tensors = (x, w, b) if bias else (x, w)

    def ref(*t):
        return F.conv2d(*t, dilation=dilation, groups=groups)

    def ours(*t):
        return cnnext.ops.conv2d(*t, dilation=dilation, groups=groups, algo="im2col")

    expected = ref(*tensors)
    grad = torch.randn_like(expected)
    expected, expected_grads = _grads(ref, tensors, grad)
    out, grads = _grads(ours, tensors, grad)
    assert_close(out, expected)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    for got, exp in zip(grads, expected_grads, strict=True):
        assert_close(got, exp, scale=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reduced_precision_emulated(emu_device: str, dtype: torch.dtype, layout: str) -> None:
    """half/bfloat16 CUDA kernels (fp32 accumulation) against F.conv2d computed in float."""
    n, c, co, k = 2, 4, 6, 3
    x = make_input((n, c, 7, 6), emu_device, dtype=dtype, layout=layout)
    w = (torch.randn(co, c // 2, k, k) / (c // 2 * k * k) ** 0.5).to(dtype)
    b = torch.randn(co).to(dtype)
    kwargs = dict(padding=1, groups=2)
    expected = F.conv2d(x.float(), w.float(), b.float(), **kwargs)
    grad = torch.randn_like(expected)
    expected, expected_grads = _grads(
        lambda *t: F.conv2d(*t, **kwargs), (x.float(), w.float(), b.float()), grad
    )
    out, grads = _grads(
        lambda *t: cnnext.ops.conv2d(*t, algo="im2col", **kwargs), (x, w, b), grad.to(dtype)
    )
    assert out.dtype == dtype
    # The output is rounded to `dtype` once; the float reference is rounded the same way.
    assert_close(out, expected.to(dtype))
    scale = n * 7 * 6 / 16  # grad_weight and grad_bias sum over the batch and the pixels
    for got, exp in zip(grads, expected_grads, strict=True):
        assert got.dtype == dtype
        assert_close(got, exp.to(dtype), scale=scale)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case",
    [
        # (n, c_in, h, w, c_out, k, stride, padding, dilation, groups)
        (2, 64, 33, 31, 24, 3, 1, 1, 1, 1),  # P >= 256, large columns: blocks of output rows
        (9, 70, 5, 6, 130, 3, 1, 1, 1, 1),  # small maps: several samples per tile, K > 512
        (1, 3, 61, 64, 70, 7, 2, 3, 1, 1),  # stem-like: phase-split im2col, N > 64 channels
        (3, 48, 12, 12, 48, 3, 2, 1, 1, 3),  # groups with strided, phase-split columns
    ],
    ids=str,
)
def test_cpu_tiles_and_blocking(case, dtype: torch.dtype, layout: str) -> None:
    """CPU sizes that take the tiled paths and several GEMM blocks in every dimension."""
    n, c, h, w_, co, k, s, p, d, g = case
    x = make_input((n, c, h, w_), "cpu", dtype=dtype, layout=layout)
    w = torch.randn(co, c // g, k, k, dtype=dtype) / (c // g * k * k) ** 0.5
    b = torch.randn(co, dtype=dtype)
    _check_fwd_bwd(x, w, b, dict(stride=s, padding=p, dilation=d, groups=g), scale=8)


def test_backward_is_deterministic(device: str) -> None:
    """Two backward passes give bit-identical gradients (no atomics, fixed reduction order)."""
    x = torch.randn(4, 6, 8, 8, device=device)
    w = torch.randn(8, 3, 3, 3, device=device)
    b = torch.randn(8, device=device)
    grad = torch.randn(4, 8, 8, 8, device=device)
    runs = [
        _grads(
            lambda *t: cnnext.ops.conv2d(*t, padding=1, groups=2, algo="im2col"), (x, w, b), grad
        )[1]
        for _ in range(2)
    ]
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_placeholders_are_not_read(device: str) -> None:
    """The backward op reads input only for grad_weight and weight only for grad_input: a
    stride-0 placeholder of the other (as cnnext.autograd passes) is fine."""
    ns = torch.ops.cnnext_emu if cnnext.emulating() else torch.ops.cnnext
    x = torch.randn(2, 4, 7, 7, device=device)
    w = torch.randn(5, 4, 3, 3, device=device)
    grad = torch.randn(2, 5, 7, 7, device=device)
    conf = ([1, 1], [1, 1], [1, 1], 1)
    x_ph = torch.zeros((), device=device).expand(x.shape)
    w_ph = torch.zeros((), device=device).expand(w.shape)
    (ex, ew) = torch.autograd.grad(
        F.conv2d(x.requires_grad_(), w.requires_grad_(), padding=1), (x, w), grad
    )
    gi, gw, gb = ns.conv2d_im2col_backward(grad, x_ph, w.detach(), *conf, [True, False, False], 64)
    assert gw.shape == (0,) and gb.shape == (0,)
    assert_close(gi, ex, scale=4)
    gi, gw, gb = ns.conv2d_im2col_backward(grad, x.detach(), w_ph, *conf, [False, True, True], 64)
    assert gi.shape == (0,)
    assert_close(gw, ew, scale=8)
    assert_close(gb, grad.sum((0, 2, 3)), scale=8)


def test_bad_workspace_limit(device: str) -> None:
    ns = torch.ops.cnnext_emu if cnnext.emulating() else torch.ops.cnnext
    x, w = torch.randn(1, 3, 5, 5, device=device), torch.randn(4, 3, 3, 3, device=device)
    conf = ([1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="cnnext::conv2d_im2col: expected max_col_bytes"):
        ns.conv2d_im2col(x, w, None, *conf, 0)
    grad = torch.randn(1, 4, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="cnnext::conv2d_im2col_backward: expected max_col"):
        ns.conv2d_im2col_backward(grad, x, w, *conf, [True, True, False], -1)
    with pytest.raises(RuntimeError, match="cnnext::conv2d_im2col_backward: expected grad_output"):
        ns.conv2d_im2col_backward(grad[:, :3], x, w, *conf, [True, True, False], 64)
    with pytest.raises(ValueError, match="workspace limit must be positive"):
        cnnext.ops.set_im2col_workspace_limit(0)


# The OpSpec of the cross-op suites (tests/opspecs.py: fuzzing, bad input, determinism, leaks).
OPSPECS = [conv_spec("im2col")]
