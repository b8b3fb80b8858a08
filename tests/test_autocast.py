"""Autocast: cnnext's convolution ops follow torch's policy for conv2d (the lower-precision list).

Under the emulator (its ops serve CPU tensors, so CPU autocast applies) a converted CNN returns
what the torch model returns under the same autocast: the output in the autocast dtype, float32
parameter gradients and float32 batch-norm running statistics, and the convolutions run on the
half/bfloat16 tensor-core kernels. cnnext's CPU kernels are float32/float64 only: CPU autocast
leaves them in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import cnnext

LOW = [torch.bfloat16, torch.float16]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),  # no BN after it: a plain cnnext conv
    )


def _input() -> torch.Tensor:
    return torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    out.float().square().sum().backward()
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "half"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_cnn_matches_torch_under_autocast(dtype: torch.dtype, training: bool) -> None:
    ref_model = _model().train(training)
    model = cnnext.convert(ref_model).train(training)
    assert any(isinstance(m, cnnext.nn.ConvBNReLU2d) for m in model.modules())
    x = _input()
    ref = _run(ref_model, x, dtype)
    with cnnext.emulate_cuda(record=True) as log:
        out = _run(model, x, dtype)
    assert log is not None
    assert out.dtype == ref.dtype == dtype
    # bfloat16 / half rounding at different points (the fused op normalises the float32
    # convolution with rounded affine parameters, torch its rounded output): a unit or two of
    # the last place
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert _rel_err(out, ref) <= 2 * eps
    named = dict(model.named_parameters())
    for name, p in ref_model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    ref_grads = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    got_grads = torch.cat([g.flatten() for g in grads])
    assert got_grads.shape == ref_grads.shape and len(named) == len(grads)
    assert _rel_err(got_grads, ref_grads) <= 2 * eps
    for ref_buf, buf in zip(ref_model.buffers(), model.buffers(), strict=True):
        assert buf.dtype == ref_buf.dtype
        if buf.is_floating_point():  # running statistics, updated in float32 when training
            torch.testing.assert_close(buf, ref_buf, rtol=4 * eps, atol=4 * eps)
    names = [r.name for r in log.kernels]
    assert any("tc_fprop" in n for n in names), names
    assert any("tc_dgrad" in n for n in names) and any("tc_wgrad" in n for n in names), names


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_conv_ops_cast_to_the_autocast_dtype(algo: str) -> None:
    """fp32 leaves in, bfloat16 out; gradients reach the leaves in float32. float64 is left alone,
    as torch's autocast does."""
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(16, 8, 1, 1, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    with cnnext.emulate_cuda(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = cnnext.ops.conv2d(x, w, b, algo=algo)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        y64 = cnnext.ops.conv2d(x.double(), w.double(), b.double(), algo=algo)
        assert y64.dtype == torch.float64
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    low = [t.detach().bfloat16().float() for t in (x, w, b)]
    ref = torch.nn.functional.conv2d(*low)
    assert _rel_err(y, ref) <= 2.0**-8


def test_fused_op_keeps_float32_running_statistics() -> None:
    """Training under autocast: the fused op's float32 running statistics get torch's update."""
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(16, 8, 3, 3)
    rm, rv = torch.zeros(16), torch.ones(16)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    with cnnext.emulate_cuda(), torch.autocast("cpu", dtype=torch.float16):
        y = cnnext.ops.conv_bn_relu(x, w, None, None, None, rm, rv, True, 0.25, 1e-5, padding=1)
        z = torch.nn.functional.conv2d(x, w, padding=1)
        ref = torch.relu(torch.nn.functional.batch_norm(z, ref_rm, ref_rv, None, None, True, 0.25))
    assert y.dtype == ref.dtype == torch.float16
    assert rm.dtype == rv.dtype == torch.float32
    torch.testing.assert_close(rm, ref_rm, rtol=2.0**-9, atol=2.0**-9)
    torch.testing.assert_close(rv, ref_rv, rtol=2.0**-9, atol=2.0**-9)


def test_cpu_kernels_stay_float32_under_cpu_autocast() -> None:
    """cnnext's CPU kernels are float32/float64 only; CPU autocast does not cast their inputs."""
    model = cnnext.convert(_model())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_input())
    assert out.dtype == torch.float32
