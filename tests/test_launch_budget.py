"""Launch and allocation budgets of the CUDA convolutions, counted by the emulator's recorder
(``cnnext.emulate_cuda(record=True)``): every kernel launch and every cuBLAS call of one op call,
at batch 1, 8 and 64. A layer's count does not grow with the batch (no per-sample launches; only
split-K's reduction comes or goes with the length of K), and an op allocates its outputs plus at
most one workspace (no hidden layout copies)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import cnnext

BATCHES = [1, 8, 64]
EMU = torch.ops.cnnext_emu if cnnext.EMULATOR_AVAILABLE else None
pytestmark = pytest.mark.skipif(EMU is None, reason="the emulator extension was not built")

# (C_in, H, W, C_out, k, stride, padding): a 3x3 layer, a strided one, a 1x1 projection.
LAYERS = [
    (16, 6, 6, 32, 3, 1, 1),
    (8, 7, 7, 16, 3, 2, 1),
    (16, 4, 4, 32, 1, 2, 0),
]


def _layer_id(layer: tuple) -> str:
    c, h, w, co, k, s, p = layer
    return f"c{c}x{h}x{w}-o{co}k{k}s{s}p{p}"


def _tensors(layer: tuple, n: int, input_cl: bool, filter_cl: bool):
    c, h, w, co, k, s, p = layer
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = torch.randn(co, c, k, k, generator=gen)
    if input_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if filter_cl:
        wt = wt.contiguous(memory_format=torch.channels_last)
    return x, wt, torch.randn(co, generator=gen), [s, s], [p, p]


def _counted(fn, *args):
    """(launches, allocations, log, result) of ``fn(*args)`` under the emulator: kernels plus cuBLAS
    calls, and the allocations of more than zero bytes that the profiler saw."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with cnnext.emulate_cuda(record=True) as log:
            result = fn(*args)
    # Every tensor an op allocates goes through an aten::empty* call the profiler sees.
    allocations = [
        e
        for e in prof.events()
        if e.name.startswith("aten::empty") and (e.self_cpu_memory_usage or 0) > 0
    ]
    return len(log.kernels) + len(log.gemms), len(allocations), log, result


def test_recorder_and_profiler_see_an_op() -> None:
    """Not vacuous: the recorder sees the launches and the profiler the output's allocation."""
    x, w, b, stride, padding = _tensors(LAYERS[0], 2, False, False)
    launches, allocations, log, _ = _counted(
        EMU.conv2d_direct, x, w, b, stride, padding, [1, 1], 1, "auto"
    )
    assert launches >= 1 and allocations >= 1
    assert any("implicit_gemm" in r.name for r in log.kernels)


@pytest.mark.parametrize("layer", LAYERS, ids=_layer_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_filter"])
def test_conv_direct_budget(layer: tuple, layout: str) -> None:
    """Forward: <= 2 launches for a channels_last input, <= 3 for NCHW; backward (grad_input,
    grad_weight and grad_bias): <= 4 and <= 5; the same count at every batch; outputs plus at
    most one workspace allocated."""
    input_cl = layout != "nchw"
    filter_cl = layout == "channels_last_filter"
    fwd_budget, bwd_budget = (2, 4) if input_cl else (3, 5)
    counts: list[tuple[int, int]] = []
    for n in BATCHES:
        x, w, b, stride, padding = _tensors(layer, n, input_cl, filter_cl)
        conf = (stride, padding, [1, 1], 1)
        fwd, fwd_allocs, log, y = _counted(EMU.conv2d_direct, x, w, b, *conf, "auto")
        assert all(
            "implicit_gemm" in r.name or "splitk" in r.name or "filter" in r.name
            for r in log.kernels
        ), str(log)
        assert fwd <= fwd_budget, f"forward at N={n}: {fwd} launches\n{log}"
        assert fwd_allocs <= 2, f"forward at N={n}: {fwd_allocs} allocations\n{log}"
        grad = torch.randn_like(y)
        mask = [True, True, True]
        bwd, bwd_allocs, log, _ = _counted(
            EMU.conv2d_direct_backward, grad, x, w, *conf, mask, "auto"
        )
        assert bwd <= bwd_budget, f"backward at N={n}: {bwd} launches\n{log}"
        assert bwd_allocs <= 4, f"backward at N={n}: {bwd_allocs} allocations\n{log}"
        counts.append((fwd, bwd))
    # No per-sample launches: from a batch of 1 to 64 a count may only gain split-K's one
    # reduction per GEMM (wgrad's K is the batch's pixel count: a long K is split, a short one not).
    fwd_counts = [f for f, _ in counts]
    bwd_counts = [b for _, b in counts]
    assert max(fwd_counts) - min(fwd_counts) <= 1, counts
    assert max(bwd_counts) - min(bwd_counts) <= 1, counts


@pytest.mark.parametrize("layer", LAYERS[:2], ids=_layer_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last_filter"])
def test_conv_bn_relu_train_budget(layer: tuple, layout: str) -> None:
    """Fused Conv + BN + ReLU in training (algo="direct"): forward <= 3 launches (convolution,
    channel statistics, normalization with the running update), backward <= 5 (channel sums, dz,
    and the convolution's backward), at every batch."""
    cl = layout != "nchw"
    for n in BATCHES:
        x, w, b, stride, padding = _tensors(layer, n, cl, cl)
        co = w.shape[0]
        gamma, beta = torch.rand(co) + 0.5, torch.randn(co)
        rm, rv = torch.zeros(co), torch.ones(co)
        conf = (stride, padding, [1, 1], 1, "direct", 1 << 26)
        fwd, _, log, outs = _counted(
            EMU.conv_bn_relu, x, w, b, gamma, beta, rm, rv, True, 0.1, 1e-5, *conf
        )
        assert fwd <= 3, f"forward at N={n}: {fwd} launches\n{log}"
        y, mean, invstd, _, z = outs
        grad = torch.randn_like(y)
        mask = [True] * 5
        bwd, _, log, _ = _counted(
            EMU.conv_bn_relu_backward,
            grad,
            z,
            x,
            w,
            b,
            gamma,
            beta,
            mean,
            invstd,
            True,
            *conf,
            mask,
        )
        assert bwd <= 5, f"backward at N={n}: {bwd} launches\n{log}"
