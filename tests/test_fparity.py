"""F-parity: every ``cnnext.ops`` function takes each argument form its ``torch.nn.functional``
twin takes, with the same result, and refuses what the twin refuses, with the same exception
type. One table of good and bad forms; torch decides which each row is, so a row cannot drift
from torch's behaviour unnoticed (a few rows also state what torch must do, so the table cannot
lose its bad or its good half)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cnnext

X = (1, 3, 8, 9)  # odd width: row and column rules must not be swapped
W = (4, 3, 3, 3)

# (id, function, overrides of the base call, what torch does: "ok", an exception type or None
# when the row leaves it to torch)
CONV: list[tuple[str, dict[str, Any], Any]] = [
    ("defaults", {}, "ok"),
    ("stride int", {"stride": 2}, "ok"),
    ("stride pair", {"stride": (2, 1)}, "ok"),
    ("stride list", {"stride": [1, 2]}, "ok"),
    ("stride 1-tuple", {"stride": (2,)}, "ok"),
    ("stride 0-d tensor", {"stride": torch.tensor(2)}, "ok"),
    ("stride numpy int", {"stride": np.int64(2)}, "ok"),
    ("stride triple", {"stride": (1, 1, 1)}, RuntimeError),
    ("stride empty", {"stride": ()}, RuntimeError),
    ("stride zero", {"stride": 0}, RuntimeError),
    ("stride float", {"stride": 1.5}, TypeError),
    ("stride float in pair", {"stride": (1.5, 1)}, TypeError),
    ("stride bool", {"stride": True}, TypeError),
    ("stride None", {"stride": None}, TypeError),
    ("stride str", {"stride": "1"}, TypeError),
    ("padding int", {"padding": 1}, "ok"),
    ("padding pair", {"padding": (1, 2)}, "ok"),
    ("padding 1-tuple", {"padding": (1,)}, "ok"),
    ("padding negative", {"padding": -1}, RuntimeError),
    ("padding empty", {"padding": ()}, RuntimeError),
    ("padding triple", {"padding": (1, 1, 1)}, RuntimeError),
    ("padding valid", {"padding": "valid"}, "ok"),
    ("padding same", {"padding": "same"}, "ok"),
    ("padding same, stride 1 pair", {"padding": "same", "stride": (1, 1)}, "ok"),
    ("padding same, even kernel", {"padding": "same", "w": (4, 3, 4, 2)}, "ok"),
    ("padding same, dilated", {"padding": "same", "dilation": (2, 3)}, "ok"),
    ("padding same, 1x1", {"padding": "same", "w": (4, 3, 1, 1)}, "ok"),
    ("padding same, unbatched", {"padding": "same", "x": (3, 6, 7), "w": (4, 3, 2, 3)}, "ok"),
    ("padding same, stride 2", {"padding": "same", "stride": 2}, RuntimeError),
    ("padding same, stride (1, 2)", {"padding": "same", "stride": (1, 2)}, RuntimeError),
    ("padding unknown string", {"padding": "SAME"}, RuntimeError),
    ("padding string in list", {"padding": ["same"]}, TypeError),
    ("padding float", {"padding": 1.0}, TypeError),
    ("dilation int", {"dilation": 2}, "ok"),
    ("dilation pair", {"dilation": (2, 1)}, "ok"),
    ("dilation zero", {"dilation": 0}, RuntimeError),
    ("dilation triple", {"dilation": (1, 1, 1)}, RuntimeError),
    ("groups", {"groups": 3, "w": (6, 1, 3, 3)}, "ok"),
    ("groups numpy int", {"groups": np.int32(3), "w": (6, 1, 3, 3)}, "ok"),
    ("groups zero", {"groups": 0}, RuntimeError),
    ("groups float", {"groups": 1.0}, TypeError),
    ("groups tuple", {"groups": (1,)}, TypeError),
    ("no bias", {"bias": None}, "ok"),
]

POOL_COMMON: list[tuple[str, dict[str, Any], Any]] = [
    ("kernel int", {}, "ok"),
    ("kernel pair", {"kernel_size": (2, 3)}, "ok"),
    ("kernel list of one", {"kernel_size": [2]}, "ok"),
    ("kernel 0-d tensor", {"kernel_size": torch.tensor(2)}, "ok"),
    ("kernel triple", {"kernel_size": (1, 2, 3)}, RuntimeError),
    ("kernel empty", {"kernel_size": ()}, RuntimeError),
    ("kernel zero", {"kernel_size": 0}, RuntimeError),
    ("kernel float", {"kernel_size": 2.0}, TypeError),
    ("kernel float in pair", {"kernel_size": (2.0, 2)}, TypeError),
    ("kernel bool", {"kernel_size": True}, TypeError),
    ("kernel str", {"kernel_size": "2"}, TypeError),
    ("kernel None", {"kernel_size": None}, TypeError),
    ("stride None", {"stride": None}, "ok"),
    ("stride empty tuple", {"stride": ()}, "ok"),
    ("stride empty list", {"stride": []}, "ok"),
    ("stride int", {"stride": 1}, "ok"),
    ("stride pair", {"stride": (1, 2)}, "ok"),
    ("stride triple", {"stride": (1, 1, 1)}, RuntimeError),
    ("stride zero", {"stride": 0}, RuntimeError),
    ("stride float", {"stride": 1.0}, TypeError),
    ("padding pair", {"kernel_size": 3, "padding": (1, 0)}, "ok"),
    ("padding over half the kernel", {"padding": 2}, RuntimeError),
    ("padding negative", {"padding": -1}, RuntimeError),
    ("padding triple", {"padding": (1, 1, 1)}, RuntimeError),
    ("padding empty", {"padding": ()}, RuntimeError),
    ("ceil_mode", {"kernel_size": 3, "stride": 2, "ceil_mode": True}, "ok"),
    ("ceil_mode int", {"ceil_mode": 1}, TypeError),
    ("ceil_mode None", {"ceil_mode": None}, TypeError),
    ("ceil_mode str", {"ceil_mode": "x"}, TypeError),
    ("2D input", {"x": (8, 9)}, None),  # max: RuntimeError; avg: IndexError (torch's quirk)
    ("1D input", {"x": (9,)}, None),
    ("5D input", {"x": (1, 1, 3, 8, 9)}, RuntimeError),
    ("unbatched", {"x": (3, 8, 9)}, "ok"),
]

MAX_ONLY: list[tuple[str, dict[str, Any], Any]] = [
    ("dilation int", {"kernel_size": 3, "dilation": 2}, "ok"),
    ("dilation pair", {"kernel_size": 2, "dilation": (2, 1)}, "ok"),
    ("dilation zero", {"dilation": 0}, RuntimeError),
    ("dilation triple", {"dilation": (1, 1, 1)}, RuntimeError),
    ("return_indices", {"return_indices": True}, "ok"),
    ("return_indices int", {"return_indices": 1}, "ok"),  # truthy: torch's Python dispatch
]

AVG_ONLY: list[tuple[str, dict[str, Any], Any]] = [
    ("count_include_pad off", {"kernel_size": 3, "padding": 1, "count_include_pad": False}, "ok"),
    ("count_include_pad int", {"count_include_pad": 1}, TypeError),
    ("count_include_pad None", {"count_include_pad": None}, TypeError),
    ("divisor_override", {"divisor_override": 3}, "ok"),
    ("divisor_override negative", {"divisor_override": -2}, "ok"),
    ("divisor_override numpy", {"divisor_override": np.int64(5)}, "ok"),
    ("divisor_override zero", {"divisor_override": 0}, RuntimeError),
    ("divisor_override float", {"divisor_override": 1.5}, TypeError),
    ("divisor_override bool", {"divisor_override": True}, TypeError),
]

ROWS = (
    [("conv2d", *row) for row in CONV]
    + [("max_pool2d", *row) for row in POOL_COMMON + MAX_ONLY]
    + [("avg_pool2d", *row) for row in POOL_COMMON + AVG_ONLY]
)


def _call(module: Any, name: str, over: dict[str, Any], extra: dict[str, Any]) -> Any:
    """``module.name`` on the base call with ``over``; ``extra`` only for cnnext."""
    gen = torch.Generator().manual_seed(0)
    over = dict(over)
    x = torch.randn(over.pop("x", X), generator=gen, dtype=torch.float64)
    if name == "conv2d":
        w = torch.randn(over.pop("w", W), generator=gen, dtype=torch.float64)
        bias = torch.randn(w.shape[0], generator=gen, dtype=torch.float64)
        kwargs = {"bias": bias, **over}
        return module.conv2d(x, w, **kwargs, **extra)
    kwargs = {"kernel_size": 2, **over}
    return getattr(module, name)(x, **kwargs)


def _outcome(fn: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001  (the type is what the test compares)
        return None, error


@pytest.mark.parametrize("name,row_id,over,expect", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_argument_forms_as_torch(name: str, row_id: str, over: dict, expect: Any) -> None:
    algos = [{"algo": a} for a in ("auto", "direct", "im2col")] if name == "conv2d" else [{}]
    theirs, their_error = _outcome(lambda: _call(F, name, over, {}))
    if expect == "ok":
        assert their_error is None, f"torch refused a row marked good: {their_error!r}"
    elif expect is not None:
        assert isinstance(their_error, expect), f"torch gave {their_error!r}"
    for extra in algos:
        ours, our_error = _outcome(lambda: _call(cnnext.ops, name, over, extra))  # noqa: B023
        if their_error is not None:
            assert our_error is not None, f"cnnext accepted what torch refuses: {their_error!r}"
            assert isinstance(our_error, type(their_error)), (
                f"torch: {type(their_error).__name__}: {their_error}; "
                f"cnnext: {type(our_error).__name__}: {our_error}"
            )
            continue
        assert our_error is None, f"cnnext refused what torch takes: {our_error!r}"
        if isinstance(theirs, tuple):
            assert isinstance(ours, tuple) and len(ours) == len(theirs)
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b)
        else:
            torch.testing.assert_close(ours, theirs)


def test_same_padding_message_is_torchs() -> None:
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    message = "padding='same' is not supported for strided convolutions"
    with pytest.raises(RuntimeError, match=message):
        F.conv2d(x, w, padding="same", stride=2)
    with pytest.raises(RuntimeError, match=f"cnnext.conv2d: {message}"):
        cnnext.ops.conv2d(x, w, padding="same", stride=2)


def test_conv2d_defaults_to_auto() -> None:
    """``algo`` defaults to "auto", as in the modules; "auto" is also accepted explicitly."""
    import inspect

    assert inspect.signature(cnnext.ops.conv2d).parameters["algo"].default == "auto"
    assert inspect.signature(cnnext.ops.conv_bn_relu).parameters["algo"].default == "auto"
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(cnnext.ops.conv2d(x, w, algo="auto"), F.conv2d(x, w))


def test_same_padding_gradients() -> None:
    """The asymmetric 'same' pad sits inside autograd: gradients match torch's."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 3, 4, 3, dtype=torch.float64, generator=gen)
    for algo in ("direct", "im2col"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.conv2d(xr, wr, padding="same", dilation=(1, 2))
        out = cnnext.ops.conv2d(xo, wo, padding="same", dilation=(1, 2), algo=algo)
        grad = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
        ref.backward(grad)
        out.backward(grad)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(xo.grad, xr.grad)
        torch.testing.assert_close(wo.grad, wr.grad)


# ---- the lean binding (cnnext._C.FastOp) and its fallback to torch.ops --------------------------


class _Recorder(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Marked(torch.Tensor):
    """A subclass whose __torch_function__ records the functions it sees."""

    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def _each_op(x: torch.Tensor, w: torch.Tensor) -> list[tuple[str, Any]]:
    mean, var = torch.zeros(4), torch.ones(4)
    return [
        ("max_pool2d_with_argmax", lambda: cnnext.ops.max_pool2d(x, 2)),
        ("avg_pool2d", lambda: cnnext.ops.avg_pool2d(x, 2)),
        ("conv2d_direct", lambda: cnnext.ops.conv2d(x, w, algo="direct")),
        ("conv2d_im2col", lambda: cnnext.ops.conv2d(x, w, algo="im2col")),
        ("conv_bn_relu", lambda: cnnext.ops.conv_bn_relu(x, w, None, None, None, mean, var)),
    ]


def test_torch_function_modes_and_subclasses_see_every_op() -> None:
    """A torch function mode, or a tensor subclass with __torch_function__, sees each op (the
    lean binding declines them, torch.ops hands them over), and the results are unchanged."""
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    for op, call in _each_op(x, w):
        plain = call()
        with _Recorder() as recorder:
            moded = call()
        assert any(f"cnnext.{op}" in s for s in recorder.seen), (op, recorder.seen)
        torch.testing.assert_close(moded, plain)
    marked = x.as_subclass(_Marked)
    for op, call in _each_op(marked, w):
        _Marked.seen.clear()
        call()
        assert any(f"cnnext.{op}" in s for s in _Marked.seen), (op, _Marked.seen)


def test_emulated_calls_reach_the_emulator() -> None:
    """Inside emulate_cuda() every op runs its emulated CUDA kernels (the binding picks the
    cnnext_emu namespace for CPU tensors), and leaving it restores the CPU kernels."""
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    for op, call in _each_op(x, w):
        with cnnext.emulate_cuda("forward", record=True) as log:
            call()
        assert log is not None and len(log) > 0, op
    with cnnext.emulate_cuda("forward", record=True) as outer:
        with cnnext.emulate_cuda("reverse"):
            pass
        cnnext.ops.max_pool2d(x, 2)  # still emulated after an inner block exits
    assert outer is not None and len(outer) > 0
    for op, call in _each_op(x, w):
        with cnnext.emulate_cuda("forward", record=True) as log:
            pass
        call()  # after the block: the CPU kernel, nothing recorded
        assert log is not None and len(log) == 0, op


def test_fast_op_declines_what_it_does_not_parse() -> None:
    """The binding returns NotImplemented for argument forms it leaves to torch.ops, and an
    error naming the op for a wrong call of its own."""
    fast = cnnext._backend.fast_op("avg_pool2d")
    x = torch.randn(1, 3, 6, 6)
    plain = fast(x, 2, 2, 0, False, True, None)
    torch.testing.assert_close(plain, F.avg_pool2d(x, 2))
    for args in [
        (x, np.int64(2), 2, 0, False, True, None),  # not a Python int
        (x, (2, 2, 2), 2, 0, False, True, None),  # three ints
        (x, 2, (), 0, False, True, None),  # empty
        (x, 2, 2, 0, 0, True, None),  # an int for a bool
        (x, 2, 2, 0, False, True, 2**64),  # beyond int64
        (x.as_subclass(_Marked), 2, 2, 0, False, True, None),
        (x.numpy(), 2, 2, 0, False, True, None),
    ]:
        assert fast(*args) is NotImplemented, args
    with pytest.raises(TypeError, match="avg_pool2d takes 7 positional arguments"):
        fast(x, 2)
    both = cnnext._backend.fast_op("max_pool2d_with_argmax")(x, 2, 2, 0, 1, False)
    first = cnnext._backend.fast_op("max_pool2d_with_argmax", outputs=1)(x, 2, 2, 0, 1, False)
    assert isinstance(both, tuple) and len(both) == 2 and isinstance(first, torch.Tensor)
    torch.testing.assert_close(first, both[0])
    with pytest.raises(ValueError, match="has 2 returns, asked for 3"):
        cnnext._backend.fast_op("max_pool2d_with_argmax", outputs=3)
    with pytest.raises(RuntimeError, match="cnnext::avg_pool2d: .*kernel_size"):
        fast(x, 0, 1, 0, False, True, None)
    # min_dim: a first tensor of lower rank is declined, typed and boxed alike, so the caller's
    # checked path raises torch's exception for it (avg_pool2d: an IndexError).
    ranked = cnnext._backend.fast_op("avg_pool2d", min_dim=3)
    assert ranked(x[0, 0], 2, 2, 0, False, True, None) is NotImplemented
    torch.testing.assert_close(ranked(x[0], 2, 2, 0, False, True, None), F.avg_pool2d(x[0], 2))
    gemm = cnnext._backend.fast_op("_gemm", min_dim=2)
    flat = torch.zeros(4)
    assert (
        gemm(flat, flat, flat, "n", "n", 2, 2, 1, 1.0, 0.0, 2, 1, 2, 0, 0, 0, 1) is NotImplemented
    )
    with pytest.raises(IndexError):
        cnnext.nn.AvgPool2d(2)(x[0, 0])


def test_fast_ops_of_cnnext_ops_are_typed_and_the_rest_boxed() -> None:
    """cnnext.ops' bindings call their ops unboxed (csrc/fast_call.cpp's kTyped); an op without
    a typed entry still works through the boxed call, with the same results as torch.ops."""
    for name in ("_max_pool2d", "_max_pool2d_output", "_avg_pool2d"):
        assert "(typed)" in repr(getattr(cnnext.ops, name)), name
    for name in ("_conv2d_direct", "_conv2d_im2col", "_conv_bn_relu"):
        assert "(typed)" in repr(getattr(cnnext.ops, name)), name
    # cuBLAS's column-major GEMM (emulated: CPU tensors inside emulate_cuda), boxed.
    boxed = cnnext._backend.fast_op("_gemm")
    assert "(typed)" not in repr(boxed)
    a, b, c = torch.randn(3, 4), torch.randn(5, 3), torch.zeros(5, 4)  # a^T, b^T column-major
    args = ("n", "n", 4, 5, 3, 1.0, 0, 4, 3, 4, 0, 0, 0, 1)  # an int for a float, as torch.ops
    with cnnext.emulate_cuda():
        got = boxed(a.flatten(), b.flatten(), c.flatten(), *args)
        expected = torch.ops.cnnext_emu._gemm(a.flatten(), b.flatten(), c.flatten(), *args)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got.view(5, 4), b @ a)
