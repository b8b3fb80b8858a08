"""Property tests (hypothesis) for every op of tests/opspecs.py: random valid shapes and
parameters on the CPU kernels and on the emulated CUDA kernels (a drawn schedule order) match
PyTorch forward and backward; random invalid or extreme parameters raise an error naming the op,
and never crash or hang (those run in a subprocess with a time limit).

Example counts come from the hypothesis profile (tests/conftest.py): ``default`` is small and
derandomized; ``CNNEXT_HYPOTHESIS_PROFILE=long`` runs many more random examples.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st

import cnnext

from .opspecs import SPECS, OpSpec, check_against_torch, compare, touches

INT64_MAX = 2**63 - 1
VERBOSE = os.environ.get("CNNEXT_FUZZ_VERBOSE") == "1"
SCHEDULES = st.one_of(
    st.sampled_from(("forward", "reverse")),
    st.integers(0, 100_000).map(lambda seed: f"random:{seed}"),
)


def _skip_without_gpu(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU visible")


def _dtypes(device: str) -> list[torch.dtype]:
    if device == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---- valid parameters: cnnext == torch ----------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
@given(data=st.data())
def test_random_valid_matches_torch(spec: OpSpec, device: str, data: st.DataObject) -> None:
    _skip_without_gpu(device)
    emu = device == "emu"
    cfg = spec.draw(data.draw, emu)
    dtype = data.draw(st.sampled_from(_dtypes(device)), label="dtype")
    schedule = data.draw(SCHEDULES, label="schedule") if emu else None
    requires = [data.draw(st.booleans(), label=f"grad {n}") for n in spec.grad_names]
    if VERBOSE:  # the last line before a crash names the example
        print(spec, device, cfg, dtype, schedule, requires, file=sys.stderr, flush=True)
    tensors = spec.make(cfg, "cuda" if device == "cuda" else "cpu", dtype)
    check_against_torch(spec, cfg, tensors, requires, schedule)


# ---- invalid or extreme parameters: an error naming the op (run in a subprocess) ----------------

HUGE = st.integers(2**31, INT64_MAX)
# Padding that overflows h + 2 * padding (a smaller huge padding is valid, with a giant output).
HUGE_PADDING = st.integers(2**62, INT64_MAX)


def _extent(kernel: int, dilation: int) -> int:
    return dilation * (kernel - 1) + 1


def _pair(draw: Callable, bad: bool, ok: st.SearchStrategy, wrong: st.SearchStrategy) -> tuple:
    """A pair of arguments, valid by ``ok``; if ``bad``, one or both drawn from ``wrong``."""
    which = draw(st.sampled_from(((True, False), (False, True), (True, True)))) if bad else ()
    return tuple(draw(wrong if i < len(which) and which[i] else ok) for i in range(2))


def _size(draw: Callable, bad: bool, kernel: int, dilation: int, padding: int) -> int:
    """An input size the window fits (any small size if ``bad`` or the window is huge)."""
    extent = _extent(kernel, max(dilation, 1)) if kernel > 0 else 1
    if bad or extent >= 64:
        return draw(st.integers(1, 3 if bad else 9))
    low = max(1, extent - 2 * max(padding, 0))
    return draw(st.integers(low, low + 6))


def _corrupt(draw: Callable, fields: tuple[str, ...]) -> set[str]:
    """Which arguments to make invalid: none (a valid call) to two of them."""
    return set(draw(st.lists(st.sampled_from(fields), max_size=2)))


def _conv_case(draw: Callable) -> dict:
    bad = _corrupt(draw, ("stride", "padding", "dilation", "groups", "weight", "bias", "size"))
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    if "groups" in bad:
        groups = draw(st.one_of(st.integers(-1, 0), st.integers(2, 5), HUGE))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    # Strides beyond the input are valid (one output position), also huge ones.
    stride = _pair(draw, "stride" in bad, st.one_of(st.integers(1, 4), HUGE), st.integers(-2, 0))
    padding = _pair(
        draw, "padding" in bad, st.integers(0, 3), st.one_of(st.integers(-2, -1), HUGE_PADDING)
    )
    dilation = _pair(
        draw, "dilation" in bad, st.integers(1, 3), st.one_of(st.integers(-2, 0), HUGE)
    )
    hw = tuple(_size(draw, "size" in bad, k[i], dilation[i], padding[i]) for i in range(2))
    c_w = c_in // max(groups, 1) or 1
    return dict(
        n=draw(st.integers(0, 2)),
        c_in=c_in,
        c_out=c_out,
        c_w=draw(st.integers(1, 4)) if "weight" in bad else c_w,
        k=k,
        hw=hw,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(
            st.sampled_from((0, c_out + 1)) if "bias" in bad else st.sampled_from((None, c_out))
        ),
    )


def _conv_valid(c: dict) -> bool:
    if c["groups"] <= 0 or min(c["stride"]) <= 0 or min(c["dilation"]) <= 0:
        return False
    if min(c["padding"]) < 0 or c["c_in"] % c["groups"] or c["c_out"] % c["groups"]:
        return False
    if c["c_w"] * c["groups"] != c["c_in"] or c["bias"] not in (None, c["c_out"]):
        return False
    for k, d, size, pad in zip(c["k"], c["dilation"], c["hw"], c["padding"], strict=True):
        extent, padded = _extent(k, d), size + 2 * pad
        if extent > INT64_MAX or padded > INT64_MAX or extent > padded:
            return False
    return True


def _check_conv(spec: OpSpec, c: dict) -> None:
    x = torch.randn(c["n"], c["c_in"], *c["hw"])
    w = torch.randn(c["c_out"], c["c_w"], *c["k"])
    b = torch.randn(c["bias"]) if c["bias"] is not None else None
    kwargs = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"])
    event("valid" if _conv_valid(c) else "invalid")
    if VERBOSE:
        print(spec, c, _conv_valid(c), file=sys.stderr, flush=True)
    if not _conv_valid(c):
        with pytest.raises(RuntimeError, match=f"cnnext::{spec.op}: "):
            cnnext.ops.conv2d(x, w, b, groups=c["groups"], algo=spec.op[7:], **kwargs)
        return
    out = cnnext.ops.conv2d(x, w, b, groups=c["groups"], algo=spec.op[7:], **kwargs)
    # A stride beyond the padded input gives one output position: clamp it for torch's sake.
    kwargs["stride"] = tuple(
        min(s, size + 2 * p) for s, size, p in zip(c["stride"], c["hw"], c["padding"], strict=True)
    )
    scale = max(1.0, c["c_w"] * c["k"][0] * c["k"][1] / 16)  # as in test_conv2d.py
    compare(out, F.conv2d(x, w, b, groups=c["groups"], **kwargs), scale, False, "output")


def _pool_case(draw: Callable, spec: OpSpec) -> dict:
    fields = ("kernel", "stride", "padding", "dilation", "size", "divisor")
    bad = _corrupt(draw, fields[:5] if spec.family == "max" else fields[:3] + fields[4:])
    kernel = _pair(draw, "kernel" in bad, st.integers(1, 4), st.one_of(st.integers(-1, 0), HUGE))
    stride = _pair(draw, "stride" in bad, st.one_of(st.integers(1, 4), HUGE), st.integers(-2, 0))
    padding = _pair(
        draw,
        "padding" in bad,
        st.integers(0, 2),  # kept when above half the kernel: the check must catch it
        st.one_of(st.integers(-2, -1), st.integers(3, 5), HUGE_PADDING),
    )
    dilation = (1, 1)
    if spec.family == "max":
        dilation = _pair(
            draw, "dilation" in bad, st.integers(1, 3), st.one_of(st.integers(-1, 0), HUGE)
        )
    hw = tuple(_size(draw, "size" in bad, kernel[i], dilation[i], padding[i]) for i in range(2))
    return dict(
        n=draw(st.integers(0, 2)),
        c=draw(st.integers(1, 3)),
        hw=hw,
        kernel=kernel,
        stride=None if draw(st.booleans()) and "stride" not in bad else stride,  # None: kernel
        padding=padding,
        dilation=dilation,
        ceil_mode=draw(st.booleans()),
        divisor=None
        if spec.family == "max"
        else 0
        if "divisor" in bad
        else draw(st.one_of(st.none(), st.integers(-2, 3))),
    )


def _pool_valid(c: dict) -> bool:
    from cnnext._shapes import pool_output_size

    stride = c["stride"] or c["kernel"]
    if min(c["kernel"]) <= 0 or min(stride) <= 0 or min(c["dilation"]) <= 0:
        return False
    if min(c["padding"]) < 0 or c["divisor"] == 0 or c["kernel"][0] * c["kernel"][1] > INT64_MAX:
        return False
    for k, s, p, d, size in zip(
        c["kernel"], stride, c["padding"], c["dilation"], c["hw"], strict=True
    ):
        if p > k // 2 or _extent(k, d) > INT64_MAX or size + 2 * p > INT64_MAX:
            return False
        out = pool_output_size(size, k, s, p, d, c["ceil_mode"])
        if out < 1 or not all(touches(o * s - p, k, d, size) for o in range(min(out, 10**4))):
            return False
    return True


def _check_pool(spec: OpSpec, c: dict) -> None:
    x = torch.randn(c["n"], c["c"], *c["hw"])
    args = dict(kernel_size=c["kernel"], stride=c["stride"], padding=c["padding"])
    args["ceil_mode"] = c["ceil_mode"]
    if spec.family == "max":
        args["dilation"] = c["dilation"]
        fn, ref = cnnext.ops.max_pool2d, F.max_pool2d
    else:
        args["divisor_override"] = c["divisor"]
        fn, ref = cnnext.ops.avg_pool2d, F.avg_pool2d
    event("valid" if _pool_valid(c) else "invalid")
    if VERBOSE:
        print(spec, c, _pool_valid(c), file=sys.stderr, flush=True)
    if not _pool_valid(c):
        with pytest.raises(RuntimeError, match=f"cnnext::{spec.op}: "):
            fn(x, **args)
        return
    out = fn(x, **args)
    stride = c["stride"] or c["kernel"]
    # torch takes int32 arguments. A stride beyond both the padded input and the window leaves
    # the one window at 0 (also with ceil_mode, where the window may exceed the padded input).
    args["stride"] = tuple(
        min(s, max(size + 2 * p, _extent(k, d)) + 1)
        for s, size, p, k, d in zip(
            stride, c["hw"], c["padding"], c["kernel"], c["dilation"], strict=True
        )
    )
    if max(*args["kernel_size"], *args["padding"], *args.get("dilation", (1,))) < 2**31:
        compare(out, ref(x, **args), 1.0, False, "output")
    else:  # beyond torch's int32 arguments: the shape only
        assert out.shape[:2] == x.shape[:2]


INNER = os.environ.get("CNNEXT_FUZZ_INNER") == "1"


@pytest.mark.skipif(not INNER, reason="run by test_invalid_parameters_fail_cleanly in a subprocess")
@pytest.mark.parametrize("device", ["cpu", "emu"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.family != "fused"], ids=str)
@given(data=st.data())
def test_inner_invalid_parameters(spec: OpSpec, device: str, data: st.DataObject) -> None:
    """Random, often invalid, sometimes extreme (up to 2**63 - 1) arguments: exactly the invalid
    ones raise ``cnnext::<op>: ...`` (a Python model of the checks decides which), the valid
    ones match torch."""
    ctx = cnnext.emulate_cuda("forward") if device == "emu" else torch.no_grad()
    with ctx:
        if spec.family == "conv":
            _check_conv(spec, _conv_case(data.draw))
        else:
            _check_pool(spec, _pool_case(data.draw, spec))


def _limit_memory() -> None:
    # A runaway allocation then fails in the child instead of inviting the OOM killer.
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))


def test_invalid_parameters_fail_cleanly() -> None:
    """The invalid-parameter properties in a subprocess with a time limit, so that a crash or a
    hang fails this test instead of killing or stalling the suite."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CNNEXT_FUZZ_INNER="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += [f"{__file__}::test_inner_invalid_parameters"]
    try:
        result = subprocess.run(
            command,
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"invalid-parameter fuzzing hung:\n{(e.stdout or '')[-4000:]}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"rc={result.returncode}\n{output[-6000:]}"
    assert " passed" in output and " failed" not in output, output[-3000:]
