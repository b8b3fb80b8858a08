"""Leaks: 200 forward + backward iterations of every op of tests/opspecs.py, on the CPU kernels and
the emulated CUDA kernels, leave the process's resident memory (psutil RSS, after a warm-up and a
garbage collection) within a small bound, and leave no extra live tensors (counted with gc).

The bound: every iteration allocates the input, output and gradient tensors and the kernels'
workspaces, each at least ``MIN_TENSOR_BYTES`` (the shapes are chosen so); a leak of any one of
them per iteration grows RSS by at least 200 * MIN_TENSOR_BYTES = 25 MB, above the 20 MB bound,
while the noise measured here after the warm-up (allocator arenas, fiber stacks, autograd
bookkeeping) stays below 2 MB. RSS is read after ``malloc_trim`` (glibc), else a leak could
reuse heap memory freed by earlier tests without growing RSS; a planted leak of the 139 KB pooling
output per iteration reads +26.6 MB and fails.
"""

from __future__ import annotations

import ctypes
import gc
import warnings

import psutil
import pytest
import torch

from .opspecs import SPECS, OpSpec, emulated, forward_backward, leaves

ITERATIONS = 200
WARMUP = 20
BOUND_BYTES = 20 << 20
MIN_TENSOR_BYTES = 128 << 10

# float64 tensors of at least 128 KiB (16384 elements) each, small enough for the emulator:
# pooling input 2 x 8 x 32 x 32; convolution input 1 x 8 x 48 x 48 and output 1 x 8 x 46 x 46
# (grad_weight is small, but its buffers are per-call workspaces inside the kernels).
SHAPES = {
    "conv": {"n": 1, "c_in": 8, "c_out": 8, "h": 48, "w": 48, "stride": (1, 1), "padding": (0, 0),
             "dilation": (1, 1), "groups": 2, "kh": 3, "kw": 3},
    "max": {"n": 2, "c": 8, "h": 32, "w": 32, "kernel": (2, 2), "stride": (1, 1),
            "padding": (1, 1), "dilation": (1, 1), "ceil_mode": False},
    "avg": {"n": 2, "c": 8, "h": 32, "w": 32, "kernel": (2, 2), "stride": (1, 1),
            "padding": (1, 1), "ceil_mode": False},
}  # fmt: skip
SHAPES["fused"] = SHAPES["conv"]


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated torch module attributes
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


try:  # glibc: give freed heap memory back, so that a leak cannot hide in free chunks
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # pragma: no cover (not glibc)
    _malloc_trim = None


def _rss() -> int:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("schedule", [None, "random:3"], ids=["cpu", "emu"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_no_leak_over_200_iterations(spec: OpSpec, schedule: str | None) -> None:
    cfg = {**spec.example, **SHAPES[spec.family]}
    tensors = spec.make(cfg, "cpu", torch.float64)
    assert tensors[0].numel() * 8 >= MIN_TENSOR_BYTES
    requires = [True] * len(spec.grad_names)

    def step() -> None:
        with emulated(schedule):
            out, _, grads, _ = forward_backward(spec.run, cfg, leaves(spec, tensors, requires))
        assert out.numel() * 8 >= MIN_TENSOR_BYTES and grads

    for _ in range(WARMUP):
        step()
    tensors_before, rss_before = _live_tensors(), _rss()
    for _ in range(ITERATIONS):
        step()
    tensors_after, rss_after = _live_tensors(), _rss()
    # Fewer is fine: tensors left by earlier tests (compile caches) may be freed meanwhile; a
    # leak of one tensor per iteration adds 200.
    assert tensors_after <= tensors_before, (tensors_before, tensors_after)
    growth = rss_after - rss_before
    print(f"{spec} {schedule}: RSS {growth / 2**20:+.2f} MiB")
    assert growth < BOUND_BYTES, (
        f"RSS grew by {growth / 2**20:.1f} MiB over {ITERATIONS} iterations"
    )
