"""The register-blocked CPU direct convolution (csrc/conv2d_direct/cpu_nhwc.h: float32 layers with
at least 16 input and output channels per group) against torch.nn.functional.conv2d run in
float64 on the same values: forward, grad_input, grad_weight and grad_bias, in both per-ISA
copies, on shapes chosen to hit its edges: register blocks of pixels (6, 8, 12 and 16 with
AVX-512, 6 and 12 with AVX2) and of input channels cut short, output channels past a 16-, 32- or
64-wide block,
stride, padding larger than the filter's reach, dilation, groups, channels_last and NCHW input,
batch 0 and 1; and thread-count independence of every result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cnnext

# (n, c_in, h, w, c_out, k, stride, padding, dilation, groups)
SHAPES = [
    (2, 16, 9, 13, 16, 3, 1, 1, 1, 1),  # one 16-wide block, W_out 13: a 12-block + 1
    (1, 19, 7, 25, 33, 3, 1, 1, 1, 1),  # 33 outputs: 32 + a 1-channel tail; C_in 19 = 12 + 7
    (3, 32, 6, 12, 48, 1, 1, 0, 1, 1),  # 1x1, 48 = 32 + 16, W_out 12 exactly
    (2, 24, 11, 17, 17, 3, 2, 1, 1, 1),  # stride 2 (grad_input on the phase-split kernel)
    (1, 16, 8, 16, 31, 3, 1, 2, 2, 1),  # dilation 2, 31 outputs: one 16-wide vector + 15
    (2, 32, 5, 11, 32, 3, 1, 0, 1, 2),  # groups 2 with 16 channels each
    (1, 20, 6, 6, 40, 5, 1, 3, 1, 1),  # k5, padding 3: most windows reach into the border
    (1, 16, 3, 1, 16, 1, 1, 0, 1, 1),  # W = 1
    (2, 64, 4, 29, 69, 3, 1, 1, 1, 1),  # 69 = 2 x 32 + 5, W_out 29 = 2 x 12 + 5
    (1, 17, 9, 9, 20, 2, 3, 1, 1, 1),  # stride 3, even filter
    (1, 16, 4, 4, 16, 3, 1, 4, 1, 1),  # padding larger than the filter's reach
    (2, 16, 9, 10, 24, 1, 2, 0, 1, 1),  # 1x1 stride 2: three of four grad_input phases get no tap
    (1, 16, 11, 12, 16, 3, 2, 2, 2, 1),  # stride 2, dilation 2: every tap in one phase
    (1, 32, 13, 9, 32, 3, 2, 1, 1, 2),  # stride 2 with groups
    # Two 128-channel blocks, the second cut short: 131 = 128 + 3 (only the channel loop's
    # remainder, not its 4-way unrolled part); grad_input's 131 outputs = 4 x 32 + 3, a last
    # block packed one vector wide.
    (1, 131, 4, 13, 40, 3, 1, 1, 1, 1),
    (1, 40, 5, 6, 150, 3, 2, 1, 1, 1),  # grad_input reduces over 150 = 128 + 22 = ... + 5 x 4 + 2
    # Four-vector blocks (AVX-512, 128-256 reduced channels of a 3x3: conv_width), 6-pixel
    # register blocks, and last blocks of one to three vectors. Forward: 80 = 64 + 16 on 15-wide
    # rows (3 x 5 pixels); 112 = 64 + 48 on a 3x3 plane at stride 2 over 136 = 128 + 8 channels;
    # 96 = 64 + 32 per group. grad_input: 72 = 64 + 8 inputs on a 7x7 plane, and 96 = 64 + 32
    # inputs over the four stride phases (1, 2, 2 and 4 taps of one packed block width).
    (2, 128, 5, 15, 80, 3, 1, 1, 1, 1),
    (1, 136, 6, 6, 112, 3, 2, 1, 1, 1),
    (1, 256, 4, 13, 192, 3, 1, 1, 1, 2),
    (2, 72, 7, 7, 144, 3, 1, 1, 1, 1),
    (1, 96, 9, 9, 160, 3, 2, 1, 1, 1),
    # Planes narrower than a register block run the pixels of several samples as one sequence:
    # register blocks that straddle samples, with groups and a one-vector last block (33 = 32 + 1
    # per group); a 1x1 plane; runs of samples that differ with the thread count.
    (5, 32, 3, 3, 66, 3, 1, 1, 1, 2),
    (3, 16, 1, 1, 16, 3, 1, 1, 1, 1),
    (5, 16, 3, 3, 16, 3, 1, 1, 1, 1),
    # Pixels by the taps that reach data (a tap that reads only the zero border is skipped):
    # 16 samples of a 4x4 plane fill a block per class (corners, edges, interior), forward and
    # grad_input; stride 2 and dilation 2 classes; 13 samples of 3x2 at padding 2, where some
    # pixels' windows reach no data.
    (16, 32, 4, 4, 48, 3, 1, 1, 1, 1),
    (12, 16, 7, 5, 32, 3, 2, 1, 1, 1),
    (13, 16, 5, 5, 16, 3, 1, 2, 2, 1),
    (13, 16, 3, 2, 24, 3, 1, 2, 1, 1),
]


def _conf(s: tuple) -> dict:
    return dict(stride=s[6], padding=s[7], dilation=s[8], groups=s[9])


def _make(s: tuple, layout: str, seed: int = 0):
    n, c_in, h, w, c_out, k, _, _, _, groups = s
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        x = torch.randn(n, c_in, h, 2 * w, generator=gen)[..., ::2]
    wt = torch.randn(c_out, c_in // groups, k, k, generator=gen) / (c_in // groups * k * k) ** 0.5
    b = torch.randn(c_out, generator=gen)
    return x, wt, b


def _run(s: tuple, x, w, b, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = cnnext.ops.conv2d(*leaves, algo="direct", **_conf(s))
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _check(s: tuple, layout: str) -> None:
    x, w, b = _make(s, layout)
    conf = _conf(s)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.conv2d(*leaves, **conf)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ref.backward(grad.double())
    got = _run(s, x, w, b, grad)
    want = [ref.detach()] + [t.grad for t in leaves]
    red = s[1] // s[9] * s[5] * s[5]
    for name, g, e in zip(
        ["out", "grad_input", "grad_weight", "grad_bias"], got, want, strict=True
    ):
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        # Float32 sums of `terms` products of unit-scale values against the float64 result.
        terms = red if name in ("out", "grad_input") else s[0] * ref.shape[2] * ref.shape[3]
        tol = 4e-6 * terms**0.5 * float(e.abs().max().clamp(min=1))
        torch.testing.assert_close(g, e.float(), rtol=1e-4, atol=tol, msg=name)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_blocked_kernel_matches_torch(
    shape: tuple, layout: str, isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNEXT_CPU_ISA", isa)
    _check(shape, layout)


@pytest.mark.parametrize("n", [0, 1])
def test_blocked_kernel_small_batches(n: int) -> None:
    s = (n, 32, 7, 9, 32, 3, 1, 1, 1, 1)
    x, w, b = _make(s, "contiguous")
    grad = torch.randn(n, 32, 7, 9)
    got = _run(s, x, w, b, grad)
    want = [F.conv2d(x, w, b, padding=1)]
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    F.conv2d(*leaves, padding=1).backward(grad)
    want += [t.grad for t in leaves]
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_blocked_kernel_unbatched_input() -> None:
    x, w, b = _make((1, 16, 6, 14, 20, 3, 1, 1, 1, 1), "contiguous")
    out = cnnext.ops.conv2d(x[0], w, b, padding=1, algo="direct")
    torch.testing.assert_close(out, F.conv2d(x[0], w, b, padding=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape", [SHAPES[1], SHAPES[3], SHAPES[8], SHAPES[16], SHAPES[19], SHAPES[-3]], ids=str
)
def test_blocked_kernel_thread_count_independent(shape: tuple) -> None:
    """Every output and gradient is bitwise the same at 1 and 2 threads (each element is summed
    by one task in a fixed order)."""
    x, w, b = _make(shape, "channels_last")
    grad = torch.randn(F.conv2d(x, w, b, **_conf(shape)).shape)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run(shape, x, w, b, grad))
    finally:
        torch.set_num_threads(before)
    for a, c in zip(*results, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_epilogue_on_blocked_kernel(
    layout: str, isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conv_bn_relu in eval reuses the direct forward with a scale and ReLU in the store (NCHW
    output: through the AVX-512 transposes, 48 = 16 + 16 + 16 channels, 18 = 16 + 2 columns); a
    NaN input spreads to the outputs it reaches, through the ReLU, as in torch."""
    monkeypatch.setenv("CNNEXT_CPU_ISA", isa)
    x = torch.randn(2, 32, 9, 18)
    x[1, 3, 4, 5] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    block = cnnext.nn.ConvBNReLU2d(32, 48, 3, padding=1, algo="direct").eval()
    with torch.no_grad():
        block[1].running_mean.uniform_(-1, 1)
        block[1].running_var.uniform_(0.5, 2)
        ref = block.to_modules()(x)
        out = block(x)
    assert ref.isnan().sum() == 48 * 9
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("n, h, w", [(16, 4, 4), (2, 5, 20)], ids=["plane", "rows"])
def test_border_taps_skipped(
    n: int, h: int, w: int, isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap whose reads all fall in the zero padding is not multiplied (as oneDNN, torch's CPU
    convolution): an infinite weight at the top-left tap leaves the pixels where it reads the
    border finite, not NaN (inf x 0), and makes the others infinite. On a narrow plane (pixels
    in classes by their taps) every border pixel; on wide rows (the taps of a row) the top row.
    grad_input alike: the inputs that no output reaches through that tap stay finite. And
    grad_weight: an infinite grad_output at the top-left pixel reaches only the taps that read
    data there."""
    monkeypatch.setenv("CNNEXT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, h, w, generator=gen).requires_grad_()
    wt = torch.randn(32, 16, 3, 3, generator=gen) / 12
    wt[5, 3, 0, 0] = float("inf")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = cnnext.ops.conv2d(x, wt, padding=1, algo="direct")
            (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
            results.append((out.detach(), gx))
    finally:
        torch.set_num_threads(before)
    out, gx = results[0]
    for a, c in zip(results[0], results[1], strict=True):
        assert torch.equal(a.nan_to_num(), c.nan_to_num())
    others = [o for o in range(32) if o != 5]
    assert torch.isfinite(out[:, others]).all()
    assert torch.isfinite(out[:, 5, 0]).all()
    assert torch.isinf(out[:, 5, 1:, 1:]).all()
    if h < 12 and w < 12:
        assert torch.isfinite(out[:, 5, :, 0]).all()
    # Input (iy, ix) meets the infinite weight through output (iy + 1, ix + 1).
    assert torch.isinf(gx[:, 3, :-1, :-1]).all()
    assert torch.isfinite(gx[:, 3, -1]).all()
    if h < 12 and w < 12:
        assert torch.isfinite(gx[:, 3, :, -1]).all()
    assert torch.isfinite(gx[:, [c for c in range(16) if c != 3]]).all()
    wf = (wt.nan_to_num(posinf=1.0) / 12).requires_grad_()
    out = cnnext.ops.conv2d(x.detach(), wf, padding=1, algo="direct")
    grad = torch.ones_like(out)
    grad[0, 5, 0, 0] = float("inf")
    (gw,) = torch.autograd.grad(out, wf, grad)
    assert torch.isinf(gw[5, :, 1:, 1:]).all()
    assert torch.isfinite(gw[5, :, 0]).all() and torch.isfinite(gw[5, :, :, 0]).all()
    assert torch.isfinite(gw[others]).all()


def test_gradcheck_double_on_wide_layer() -> None:
    """float64 (the plane-based path) on a shape the float32 kernel would take."""
    x = torch.randn(1, 16, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, c: cnnext.ops.conv2d(a, c, padding=1, algo="direct"), (x, w)
    )


def test_packed_filter_cache_sees_changes() -> None:
    """The forward reuses a weight's packed copy across calls only while the weight is the same
    tensor, unmodified: an in-place update, a view of other values and a new tensor at a freed
    one's address (same version 0) all repack."""
    x = torch.randn(1, 32, 6, 7)

    def check(w: torch.Tensor) -> None:
        out = cnnext.ops.conv2d(x, w, padding=1, algo="direct")
        torch.testing.assert_close(out, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)

    w = torch.randn(32, 32, 3, 3)
    with torch.no_grad():
        check(w)
        check(w)
        w.mul_(-2)  # bumps the version, same data pointer
        check(w)
        w.data = torch.randn(32, 32, 3, 3)
        check(w)
        for _ in range(3):  # freed and reallocated, likely at the same address
            del w
            w = torch.randn(32, 32, 3, 3)
            check(w)
        big = torch.randn(64, 32, 3, 3)
        check(big[32:])  # a view: other data pointer
        check(big[:32].transpose(2, 3))  # same pointer as big[:32] would be, other strides
    with torch.inference_mode():
        wi = torch.randn(32, 32, 3, 3)
        check(wi)
        wi.add_(1)
        check(wi)
