"""Shared helpers for comparing cnnext with PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (rtol, atol) per dtype. float32 results may differ from torch's by reordered accumulation.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0, msg: str = ""
) -> None:
    """``torch.testing.assert_close`` with cnnext's per-dtype tolerances, optionally scaled for
    long reductions (e.g. ``scale=k*k*C`` terms)."""
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(
        actual, expected, rtol=rtol * scale, atol=atol * scale, msg=msg or None
    )


def dtypes_for(device: str) -> list[torch.dtype]:
    """float and double everywhere; half and bfloat16 where CUDA kernels run."""
    if device == "cuda":
        return [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float64]


def make_input(
    shape: tuple[int, ...],
    device: str,
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
) -> torch.Tensor:
    """A random input in one of the layouts the tests cover: ``contiguous``, ``channels_last``
    or ``noncontiguous`` (a strided view)."""
    if layout == "noncontiguous":
        big = torch.randn(*shape[:-1], shape[-1] * 2, device=device, dtype=dtype)
        x = big[..., ::2]
        assert not x.is_contiguous()
        return x
    x = torch.randn(*shape, device=device, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def cuda_channels_last(x: torch.Tensor) -> bool:
    """A cuda tensor in channels_last (and not also NCHW-contiguous) layout: where torch's own
    CUDA kernels were seen to diverge from its CPU ones."""
    return (
        x.is_cuda
        and x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def avg_pool2d_reference(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.avg_pool2d`` as the reference. torch's CUDA backward for channels_last input with
    padding gave wrong gradients until pytorch/pytorch#188344 was fixed (seen with torch 2.11 on an
    H100: relative error 1.0 against float64), so channels_last cuda input is pooled by torch's CPU
    kernel; the copies keep autograd, the layout and the device."""
    if cuda_channels_last(x):
        return F.avg_pool2d(x.cpu(), **kwargs).to(x.device)
    return F.avg_pool2d(x, **kwargs)
