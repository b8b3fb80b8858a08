"""Which convolution algorithm serves ``algo="auto"``: a heuristic, and an opt-in autotuner.

``choose`` is a fixed rule per (shape, dtype, device); it never runs anything. With
``cnnext.set_autotune(True)`` (cnnext's ``torch.backends.cudnn.benchmark``) the first call with
a new key times every candidate on the real tensors and caches the fastest in memory; later
calls with the same key reuse it. Under ``torch.compile`` nothing is ever timed: a traced call
uses the cached winner if its key is already there, else the heuristic.

The heuristic (see ``choose`` for the thresholds and the measurements behind them):

* CPU (measured, benchmarks/algo.py): the direct kernel for grouped/depthwise convolutions and
  for ``groups == 1`` layers with a large output plane (>= 256 pixels) and >= 8 input
  channels; im2col (BLAS GEMMs) for 1x1 kernels, small output planes, first layers with 1-7
  input channels and, with gradients to compute, strided layers. Float32 layers with >= 16
  input channels per group take the direct kernel on small planes too: always with no gradient
  to compute (inference), and with one when the batch holds >= 512 output pixels.
* CUDA (reasoned, not yet measured): im2col (cuBLAS) only where im2col is a plain GEMM with
  no column buffer, a 1x1 kernel with stride 1 and no padding, ungrouped, with C_in and C_out
  both >= 32; the direct kernel (variant ``"auto"``: the implicit-GEMM kernel) for everything
  else.

This is the one rule: ``cnnext.ops.conv2d``, ``cnnext.ops.conv_bn_relu``, ``cnnext.nn.Conv2d``
and ``cnnext.nn.ConvBNReLU2d`` all resolve ``"auto"`` here (``select``) before calling an op.
The convolution dispatch's C++ ``resolve_conv_algo`` (csrc/common/conv_dispatch.h) mirrors it,
with gradients assumed, only for direct ``torch.ops.cnnext`` calls with ``algo="auto"``;
tests/test_algo_rule.py holds all of them to ``choose``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from . import _backend

__all__ = [
    "autotune_cache",
    "choose",
    "clear_autotune_cache",
    "get_autotune",
    "select",
    "set_autotune",
]

Pair = tuple[int, int]
Choice = tuple[str, str]  # (algo, variant)

# Plain module globals (not ContextVars) so torch.compile can guard on them.
_autotune = False
_cache: dict[tuple[Any, ...], Choice] = {}

# How many timed runs per candidate (after one untimed warm-up run); the minimum counts.
AUTOTUNE_REPEATS = 3


def set_autotune(enabled: bool) -> None:
    """Time the convolution algorithms on the first call with each new shape key and reuse the
    fastest afterwards (like ``torch.backends.cudnn.benchmark``). Off by default; only
    ``algo="auto"`` calls are affected (the default of ``cnnext.ops.conv2d``,
    ``cnnext.ops.conv_bn_relu``, the modules and converted models)."""
    global _autotune
    _autotune = bool(enabled)


def get_autotune() -> bool:
    """Whether the autotuner is on."""
    return _autotune


def clear_autotune_cache() -> None:
    """Forget every autotuned choice."""
    _cache.clear()


def autotune_cache() -> dict[tuple[Any, ...], Choice]:
    """A copy of the autotuner's cache: key -> ``(algo, variant)``. The key is
    ``(device type, dtype, input shape, weight shape, stride, padding, dilation, groups,
    memory format, (input needs grad, weight needs grad))``; the device type is ``"cpu"``,
    ``"cuda"`` or ``"emu"``, and with a gradient to compute the candidates are timed forward and
    backward."""
    return dict(_cache)


def _device_kind(input: torch.Tensor) -> str:
    if input.device.type == "cuda":
        return "cuda"
    return "emu" if _backend.use_emulator(input) else "cpu"


# ---- the heuristic ------------------------------------------------------------------------------

# CPU thresholds, from benchmarks/algo.py on this machine (1 thread; two runs in
# benchmarks/results/algo_cpu.txt; forward+backward, which training runs, decides where the two
# directions disagree). The direct kernel wins on planes of >= 256 output pixels with >= 8
# input channels (C_in=32 3x3 on 16x16: f+b 1.6 vs 2.1 ms; C_in=16 on 32x32: 3.3 vs 3.8 ms) and
# on every grouped/depthwise layer (MobileNet's 144-channel depthwise: 2.6 vs 7.8 ms). im2col
# wins on 1x1 kernels (a 1x1 conv is one GEMM: forward 0.40 vs 0.79 ms), on planes under 256
# pixels (ResNet layer4 at 4x4: 25.8 vs 47.1 ms; a 2x2 plane: 10.6 vs 23.9 ms), and on first
# layers with 1-7 input channels (C_in=3 3x3 at 64x64: f+b 3.8 vs 17.7 ms). Near the
# boundaries (ResNet layer1 at 28x28, LeNet conv2) the two are within the run-to-run noise.
CPU_DIRECT_MIN_PIXELS = 256  # H_out * W_out
CPU_DIRECT_MIN_CHANNELS = 8  # C_in / groups
# Inference (no gradient to compute) is decided by the forward alone, where the register-blocked
# direct kernel (float32, >= 16 channels per group) wins on small planes too: forward on the
# suite's 3x3 layers below 256 pixels, direct 0.9-1.9x oneDNN, im2col 0.6-1.3x, direct ahead in
# 26 of 28 (benchmarks/results/direct_cpu_kernel-2026-12-07-2.txt, 1 thread, CPU time).
CPU_DIRECT_NOGRAD_MIN_CHANNELS = 16  # C_in / groups
# With gradients, that kernel takes small planes too once the batch holds enough of their pixels:
# it skips the taps that read only the zero border (oneDNN's 4x4 and 2x2 planes multiply 31% and
# 56% fewer products than a plain 3x3 loop), runs the pixels of several samples per register
# block, and its grad_weight reduces over them all. Forward+backward vs oneDNN, 1 thread,
# direct / im2col (benchmarks/results/cpu-deep-2026-12-08*): at batch 32, ResNet's 4x4, 7x7,
# 8x8 and 14x14 layers 0.91-0.98 / 0.76-0.87, VGG's 8x8 and 4x4 0.95-1.06 / 0.80-0.85; at batch 8
# the 8x8 planes 0.88-0.97 / 0.79-0.85, the 4x4 ones 0.59-0.72 / 1.05-1.10, VGG's 2x2 0.38 /
# 1.96 (1.08 / 1.31 at batch 32).
CPU_BLOCKED_MIN_PIXELS = 512  # N * H_out * W_out
# With gradients, strided layers take im2col: the direct backward (phase-split grad_input,
# grad_weight) loses to the GEMMs there. Forward+backward vs oneDNN, 1 thread, direct / im2col
# (the forward and both gradients timed apart, summed; 2026-12-07): ResNet-18 CIFAR
# layer2.0.conv1 (64->128, 32x32, s2) 1.05 / 1.26 and 0.84 / 0.97 (two runs) at batch 8,
# 0.73 / 0.99 at 32, 0.80 / 1.18 at 128; ResNet-18 224 layer2/3/4.0.conv1 0.74-0.85 /
# 0.96-1.05 at 32, 0.86-1.00 / 1.18-1.31 at 128.
# CUDA: reasoned, not yet measured on a GPU. An earlier H100 run (benchmarks/results/
# cuda-2026-11-22.md) found cuBLAS 3-100x faster than the old direct kernels on every deep layer,
# but those kernels were plain FMA loops; the implicit-GEMM direct kernel builds no column buffer
# and fuses the epilogue, so im2col keeps only the case where it is a plain GEMM on the input
# itself (a 1x1 kernel, stride 1, no padding, groups 1) with both GEMM dimensions worth cuBLAS's
# tiles. Re-measure with benchmarks/algo.py on a GPU before trusting the bound.
CUDA_IM2COL_MIN_CHANNELS = 32  # C_in and C_out of a 1x1 layer


def _plausible(input: torch.Tensor, weight: torch.Tensor, stride: Pair, dilation: Pair) -> bool:
    """Whether the rule can read these shapes; the op refuses the others with its own error."""
    return weight.dim() == 4 and input.dim() in (3, 4) and min(stride) > 0 and min(dilation) > 0


def choose(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    grads: bool | None = None,
) -> Choice:
    """The algorithm ``algo="auto"`` runs when the autotuner has no entry: ``(algo, variant)``.

    Args:
        input: ``Tensor[N, C_in, H, W]`` or ``Tensor[C_in, H, W]`` (only its shape, device and
            dtype are read).
        weight: ``Tensor[C_out, C_in / groups, kH, kW]``.
        stride, padding, dilation: pairs; groups: int.
        grads: whether a gradient will be computed through this call (CPU: training and
            inference are decided apart). ``None``: grad mode is on and the input or the weight
            requires a gradient.

    Returns:
        ``("direct", "auto")`` or ``("im2col", "auto")``. Arguments the ops refuse (a weight
        that is not 4D, an input that is not 3D or 4D, a stride or dilation below 1) get
        ``("direct", "auto")``: the op then raises its own error.
    """
    # Every call of an "auto" convolution runs this: shapes are read once (a few microseconds
    # count on small layers), the emulator is asked about only while it is on.
    wshape, ishape = weight.shape, input.shape
    if len(wshape) != 4 or len(ishape) not in (3, 4) or min(stride) < 1 or min(dilation) < 1:
        return ("direct", "auto")  # the op refuses these arguments, naming them
    c_out, c_per_group, kh, kw = wshape
    if input.is_cuda or (_backend._emulating and input.device.type == "cpu"):
        gemm = (
            kh == 1
            and kw == 1
            and stride[0] == 1
            and stride[1] == 1
            and padding[0] == 0
            and padding[1] == 0
            and groups == 1
            and c_per_group >= CUDA_IM2COL_MIN_CHANNELS
            and c_out >= CUDA_IM2COL_MIN_CHANNELS
        )
        return ("im2col", "auto") if gemm else ("direct", "auto")
    if groups > 1:
        return ("direct", "auto")
    if (kh == 1 and kw == 1) or c_per_group < CPU_DIRECT_MIN_CHANNELS:
        return ("im2col", "auto")
    if grads is None:
        grads = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
    if not grads and c_per_group >= CPU_DIRECT_NOGRAD_MIN_CHANNELS and input.dtype == torch.float32:
        return ("direct", "auto")
    if grads and (stride[0] > 1 or stride[1] > 1):
        return ("im2col", "auto")
    h_out = (ishape[-2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (ishape[-1] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if h_out * w_out >= CPU_DIRECT_MIN_PIXELS:
        return ("direct", "auto")
    if c_per_group >= CPU_DIRECT_NOGRAD_MIN_CHANNELS and input.dtype == torch.float32:
        n = ishape[0] if len(ishape) == 4 else 1
        if n * h_out * w_out >= CPU_BLOCKED_MIN_PIXELS:
            return ("direct", "auto")
    return ("im2col", "auto")


# ---- the autotuner ------------------------------------------------------------------------------


def _key(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    grads: tuple[bool, bool],
) -> tuple[Any, ...]:
    if input.is_contiguous():
        layout = "contiguous"
    elif input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        layout = "channels_last"
    else:
        layout = "strided"
    return (
        _device_kind(input),
        input.dtype,
        tuple(input.shape),
        tuple(weight.shape),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        layout,
        grads,
    )


def candidates(device_kind: str) -> list[Choice]:
    """What the autotuner times: on CUDA the implicit GEMM's two block tiles, the naive kernel
    and im2col."""
    if device_kind == "cpu":
        return [("direct", "auto"), ("im2col", "auto")]
    return [
        ("direct", "implicit_gemm_128x128"),
        ("direct", "implicit_gemm_64x64"),
        ("direct", "naive"),
        ("im2col", "auto"),
    ]


def _timer(input: torch.Tensor) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        sync = torch.cuda.synchronize if input.device.type == "cuda" else (lambda *a: None)
        fn()  # warm-up: first-call allocations, BLAS/kernel initialisation
        sync(input.device)
        best = float("inf")
        for _ in range(AUTOTUNE_REPEATS):
            start = time.perf_counter()
            fn()
            sync(input.device)
            best = min(best, time.perf_counter() - start)
        return best

    return measure


def _tune(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    grads: tuple[bool, bool],
) -> Choice:
    from . import ops  # ops imports nothing from here; a local import keeps the layers apart

    x = input.detach()
    w = weight.detach()
    measure = _timer(input)

    backward = any(grads)

    def run(algo: str, variant: str) -> Callable[[], object]:
        def call() -> object:
            with torch.enable_grad() if backward else torch.no_grad():
                xi = x.detach().requires_grad_(grads[0])
                wi = w.detach().requires_grad_(grads[1])
                y = ops.conv2d(xi, wi, None, stride, padding, dilation, groups, algo, variant)
                if backward:
                    wrt = [t for t in (xi, wi) if t.requires_grad]
                    return torch.autograd.grad(y, wrt, torch.ones_like(y))
                return y

        return call

    best: Choice | None = None
    best_time = float("inf")
    failures = []
    for algo, variant in candidates(_device_kind(input)):
        try:
            elapsed = measure(run(algo, variant))
        except (RuntimeError, MemoryError) as error:  # e.g. out of memory for the column buffer
            failures.append(f"{algo}/{variant}: {error}")
            continue
        if elapsed < best_time:
            best, best_time = (algo, variant), elapsed
    if best is None:
        raise RuntimeError("cnnext autotune: every algorithm failed:\n" + "\n".join(failures))
    return best


def select(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Choice:
    """``algo="auto"`` resolved: the autotuned choice when the autotuner is on (timing it now if
    the key is new and we are not compiling), else ``choose``."""
    if not _autotune or not _plausible(input, weight, stride, dilation):  # (short-circuits)
        return choose(input, weight, stride, padding, dilation, groups)
    # Which gradients backward will compute: training and inference are timed separately.
    enabled = torch.is_grad_enabled()
    grads = (enabled and input.requires_grad, enabled and weight.requires_grad)
    if torch.compiler.is_compiling():
        # Never time inside a trace. Symbolic (dynamic) sizes cannot key the cache.
        if all(isinstance(s, int) for s in (*input.shape, *weight.shape)):
            hit = _cache.get(_key(input, weight, stride, padding, dilation, groups, grads))
            if hit is not None:
                return hit
        return choose(input, weight, stride, padding, dilation, groups, any(grads))
    key = _key(input, weight, stride, padding, dilation, groups, grads)
    hit = _cache.get(key)
    if hit is None:
        hit = _cache[key] = _tune(input, weight, stride, padding, dilation, groups, grads)
    return hit
