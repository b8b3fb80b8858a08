"""Devices for every test: ``cpu`` (CPU kernels), ``emu-forward`` / ``emu-reverse`` /
``emu-random`` (the CUDA kernels run by the emulator in each schedule order, on CPU tensors) and
``cuda`` (real GPU; skipped when none is visible).

A test takes the ``device`` fixture and creates its tensors on it; for the emulated devices the
whole test body runs inside ``cnnext.emulate_cuda(schedule)``, so every cnnext op it calls on CPU
tensors runs the emulated CUDA kernel. PyTorch's reference ops are unaffected.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

import cnnext

# Property tests (tests/test_fuzz.py): a bounded, derandomized run by default, so the suite stays
# fast and CI reproducible; CNNEXT_HYPOTHESIS_PROFILE=long explores far more (random) examples.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "default",
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_HEALTH,
)
settings.register_profile("long", max_examples=1500, deadline=None, suppress_health_check=_HEALTH)
settings.load_profile(os.environ.get("CNNEXT_HYPOTHESIS_PROFILE", "default"))

DEVICES = ["cpu", "emu-forward", "emu-reverse", "emu-random", "cuda"]
EMU_DEVICES = ["emu-forward", "emu-reverse", "emu-random"]


def schedule_for(kind: str, nodeid: str) -> str:
    if kind == "emu-forward":
        return "forward"
    if kind == "emu-reverse":
        return "reverse"
    # A seed per test: reproducible, yet different tests explore different interleavings.
    base = int(os.environ.get("CNNEXT_TEST_SEED", "0"))
    return f"random:{(zlib.crc32(nodeid.encode()) + base) % 100003}"


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    """A torch device string; emulated devices run the test inside ``emulate_cuda``."""
    yield from _enter(request.param, request)


@pytest.fixture(params=EMU_DEVICES)
def emu_device(request: pytest.FixtureRequest) -> Iterator[str]:
    """Only the emulated CUDA devices (for CUDA-only features such as kernel variants)."""
    yield from _enter(request.param, request)


@pytest.fixture(params=["emu-forward", "emu-random", "cuda"])
def emu_or_cuda(request: pytest.FixtureRequest) -> Iterator[str]:
    """CUDA code only: the emulator (two orders) and, when present, the GPU."""
    yield from _enter(request.param, request)


def _enter(kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    if kind == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no GPU visible")
        yield "cuda"
    elif kind.startswith("emu"):
        assert cnnext.EMULATOR_AVAILABLE, "cnnext._C_emu was not built"
        with cnnext.emulate_cuda(schedule_for(kind, request.node.nodeid)):
            yield "cpu"
    else:
        yield kind


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _ieee_fp32_on_cuda() -> Iterator[None]:
    """cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later, so torch's fp32
    references on cuda would be ~1e-3 off; cnnext's fp32 kernels are checked against IEEE fp32.
    Only the fp32_precision API is used: torch refuses to read TF32 state set through both."""
    if not torch.cuda.is_available():
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    yield
    conv.fp32_precision, matmul.fp32_precision = before
