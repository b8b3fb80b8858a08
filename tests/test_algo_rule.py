"""One algorithm rule (``cnnext._algo.choose``) for every way in: ``ops.conv2d``,
``ops.conv_bn_relu``, ``nn.Conv2d`` and ``nn.ConvBNReLU2d`` must pass the op the algorithm the
rule picks, on a grid of shapes around its thresholds (CPU and emulated CUDA), with and without
gradients. What they pass is read at the dispatcher (a TorchDispatchMode sees every
``torch.ops.cnnext*`` call), so it does not depend on how the Python or C++ layers above the op
are written. The fused op's own C++ resolution of ``algo="auto"`` (which serves direct op calls)
is checked against the same rule by what it computes and allocates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import cnnext
from cnnext import _algo

# (id, input shape, weight shape, stride, padding, groups)
# Wide reductions where the rule does not care (C_in >= 8), so that direct and im2col round
# differently and the fused op's own choice can be read off its output bits.
CPU_GRID = [
    ("225 px", (1, 64, 15, 15), (8, 64, 3, 3), 1, 1, 1),
    ("256 px", (1, 64, 16, 16), (8, 64, 3, 3), 1, 1, 1),
    ("484 px", (1, 64, 22, 22), (8, 64, 3, 3), 1, 1, 1),
    ("529 px", (1, 64, 23, 23), (8, 64, 3, 3), 1, 1, 1),
    ("7 in-channels", (1, 7, 16, 16), (8, 7, 3, 3), 1, 1, 1),
    ("1x1", (1, 64, 16, 16), (8, 64, 1, 1), 1, 0, 1),
    ("grouped", (1, 128, 8, 8), (8, 64, 3, 3), 1, 1, 2),
    ("stride 2, 289 px", (1, 64, 33, 33), (8, 64, 3, 3), 2, 1, 1),
    ("unbatched", (64, 16, 16), (8, 64, 3, 3), 1, 1, 1),
    # Small planes over a batch (float32, >= 16 channels): 31 x 16 and 32 x 16 output pixels.
    ("31 x 4x4", (31, 64, 4, 4), (8, 64, 3, 3), 1, 1, 1),
    ("32 x 4x4", (32, 64, 4, 4), (8, 64, 3, 3), 1, 1, 1),
    ("32 x 4x4, 12 in-channels", (32, 12, 4, 4), (8, 12, 3, 3), 1, 1, 1),
]
CUDA_GRID = [
    ("1x1 gemm", (1, 64, 5, 5), (32, 64, 1, 1), 1, 0, 1),
    ("1x1, 16 in", (1, 16, 5, 5), (32, 16, 1, 1), 1, 0, 1),
    ("1x1, 16 out", (1, 64, 5, 5), (16, 64, 1, 1), 1, 0, 1),
    ("1x1 stride 2", (1, 64, 5, 5), (32, 64, 1, 1), 2, 0, 1),
    ("1x1 padded", (1, 64, 4, 4), (32, 64, 1, 1), 1, 1, 1),
    ("1x1 grouped", (1, 64, 4, 4), (32, 32, 1, 1), 1, 0, 2),
    ("3x3, K 432", (1, 48, 6, 6), (32, 48, 3, 3), 1, 1, 1),
    ("3x3 first layer", (1, 3, 6, 6), (8, 3, 3, 3), 1, 1, 1),
]
GRID = [("cpu", *row) for row in CPU_GRID] + [("emu", *row) for row in CUDA_GRID]
IDS = [f"{g[0]}-{g[1]}" for g in GRID]


# Where conv_bn_relu's schema puts `algo`, read from the schema rather than counted by hand.
_FUSED_ALGO = next(
    i
    for i, a in enumerate(torch.ops.cnnext.conv_bn_relu.default._schema.arguments)
    if a.name == "algo"
)


class Recorder(TorchDispatchMode):
    """Records ``(op name, args)`` of every cnnext forward op that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        name = func._schema.name
        if name.split("::")[0] in ("cnnext", "cnnext_emu"):
            self.calls.append((name.split("::")[1], args))
        return func(*args, **(kwargs or {}))

    def algos(self) -> list[str]:
        """The algorithm of each forward convolution call."""
        found = []
        for op, args in self.calls:
            if op in ("conv2d_direct", "conv2d_im2col"):
                found.append(op[len("conv2d_") :])
            elif op == "conv_bn_relu":
                found.append(args[_FUSED_ALGO])
        return found


@contextlib.contextmanager
def on(device: str) -> Iterator[None]:
    with cnnext.emulate_cuda("forward") if device == "emu" else contextlib.nullcontext():
        yield


def _tensors(xs: tuple, ws: tuple, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=gen).requires_grad_(grad)
    w = (torch.randn(ws, generator=gen) / (ws[1] * ws[2] * ws[3]) ** 0.5).requires_grad_(grad)
    return x, w


def _callers(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, groups: int):
    """Every way in, each a zero-argument call."""
    c_out = w.shape[0]
    conv = cnnext.nn.Conv2d(w.shape[1] * groups, c_out, w.shape[2:], stride, padding, 1, groups)
    block = cnnext.nn.ConvBNReLU2d(
        w.shape[1] * groups, c_out, tuple(w.shape[2:]), stride, padding, 1, groups
    )
    with torch.no_grad():
        conv.weight.copy_(w)
        block.conv.weight.copy_(w)
    stats = [torch.zeros(c_out), torch.ones(c_out), torch.ones(c_out), torch.zeros(c_out)]
    batched = x if x.dim() == 4 else x.unsqueeze(0)

    def fused(training: bool):
        return lambda: cnnext.ops.conv_bn_relu(
            x, w, None, stats[2], stats[3], stats[0], stats[1], training,
            stride=stride, padding=padding, groups=groups,
        )  # fmt: skip

    def module(training: bool):
        return lambda: block.train(training)(batched)

    return {
        "ops.conv2d": lambda: cnnext.ops.conv2d(x, w, None, stride, padding, 1, groups),
        "nn.Conv2d": lambda: conv(x),
        "ops.conv_bn_relu eval": fused(False),
        "ops.conv_bn_relu train": fused(True),
        "nn.ConvBNReLU2d eval": module(False),
        "nn.ConvBNReLU2d train": module(True),
    }


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("device,row_id,xs,ws,stride,padding,groups", GRID, ids=IDS)
def test_every_way_in_passes_the_rules_choice(
    device: str, row_id: str, xs, ws, stride: int, padding: int, groups: int, grad: bool
) -> None:
    x, w = _tensors(xs, ws, grad)
    with on(device):
        for name, call in _callers(x, w, stride, padding, groups).items():
            # A module's weight is a parameter: it requires a gradient either way.
            grads = grad or name.startswith("nn.")
            conf = ((stride, stride), (padding, padding), (1, 1), groups)
            expected = _algo.choose(x, w, *conf, grads=grads)[0]
            with Recorder() as rec:
                call()
            assert rec.algos() == [expected], f"{name}: passed {rec.algos()}, rule: {expected}"


def test_grid_crosses_every_threshold() -> None:
    """Not vacuous: the grid gets both answers on each device kind."""
    for device in ("cpu", "emu"):
        picks = set()
        for dev, _, xs, ws, stride, padding, groups in GRID:
            if dev != device:
                continue
            x, w = _tensors(xs, ws, False)
            with on(device):
                picks.add(_algo.choose(x, w, (stride,) * 2, (padding,) * 2, (1, 1), groups)[0])
        assert picks == {"direct", "im2col"}, device


def test_cpu_inference_takes_direct_on_small_planes() -> None:
    """With no gradient to compute the CPU rule drops the pixel bound for float32 layers with
    >= 16 channels per group (the register-blocked direct kernel's forward wins there); training
    keeps it; narrow, pointwise, float64 and first layers keep im2col."""
    conf = ((1, 1), (1, 1), (1, 1), 1)
    x, w = _tensors((1, 64, 15, 15), (8, 64, 3, 3), False)
    assert _algo.choose(x, w, *conf, grads=False) == ("direct", "auto")
    assert _algo.choose(x, w, *conf, grads=True) == ("im2col", "auto")
    assert _algo.choose(x, w, *conf) == ("direct", "auto")  # neither requires a gradient
    with torch.no_grad():
        assert _algo.choose(x, w.requires_grad_(), *conf) == ("direct", "auto")
    assert _algo.choose(x, w, *conf) == ("im2col", "auto")  # the weight requires one
    x, w = _tensors((1, 12, 15, 15), (8, 12, 3, 3), False)
    assert _algo.choose(x, w, *conf, grads=False) == ("im2col", "auto")
    x, w = _tensors((1, 64, 15, 15), (8, 64, 3, 3), False)
    assert _algo.choose(x.double(), w.double(), *conf, grads=False) == ("im2col", "auto")
    x, w = _tensors((1, 64, 15, 15), (8, 64, 1, 1), False)
    assert _algo.choose(x, w, (1, 1), (0, 0), (1, 1), 1, grads=False)[0] == "im2col"


def test_cpu_training_takes_im2col_on_strided_layers() -> None:
    """With gradients a strided CPU layer takes im2col whatever its plane (the direct backward
    loses there); without, the forward decides (direct for float32 with >= 16 channels)."""
    x, w = _tensors((1, 64, 64, 64), (8, 64, 3, 3), False)  # 32 x 32 output pixels at stride 2
    for stride in ((2, 2), (1, 2), (2, 1)):
        conf = (stride, (1, 1), (1, 1), 1)
        assert _algo.choose(x, w, *conf, grads=True) == ("im2col", "auto"), stride
        assert _algo.choose(x, w, *conf, grads=False) == ("direct", "auto"), stride
    assert _algo.choose(x, w, (1, 1), (1, 1), (1, 1), 1, grads=True) == ("direct", "auto")


def test_cpu_training_takes_direct_on_batched_small_planes() -> None:
    """With gradients a small plane takes the direct kernel once the batch holds 512 output
    pixels, for float32 with >= 16 channels per group (the register-blocked kernel); float64,
    12 channels and a single sample keep im2col."""
    conf = ((1, 1), (1, 1), (1, 1), 1)
    for n, algo in ((31, "im2col"), (32, "direct"), (8, "im2col")):
        x, w = _tensors((n, 64, 4, 4), (8, 64, 3, 3), False)
        assert _algo.choose(x, w, *conf, grads=True) == (algo, "auto"), n
    x, w = _tensors((8, 64, 8, 8), (8, 64, 3, 3), False)
    assert _algo.choose(x, w, *conf, grads=True) == ("direct", "auto")
    assert _algo.choose(x.double(), w.double(), *conf, grads=True) == ("im2col", "auto")
    x, w = _tensors((8, 12, 8, 8), (8, 12, 3, 3), False)
    assert _algo.choose(x, w, *conf, grads=True) == ("im2col", "auto")
    x, w = _tensors((64, 15, 15), (8, 64, 3, 3), False)
    assert _algo.choose(x, w, *conf, grads=True) == ("im2col", "auto")


def test_cuda_rule_documented_cases() -> None:
    """The CUDA rule: im2col only for a plain GEMM (1x1, stride 1, no padding, ungrouped,
    C_in and C_out >= 32), the direct kernel's "auto" variant for everything else."""
    with cnnext.emulate_cuda():
        for _, _, xs, ws, stride, padding, groups in GRID[len(CPU_GRID) :]:
            x, w = _tensors(xs, ws, False)
            got = _algo.choose(x, w, (stride,) * 2, (padding,) * 2, (1, 1), groups)
            gemm = ws[2:] == (1, 1) and stride == 1 and padding == 0 and groups == 1
            gemm = gemm and ws[0] >= 32 and ws[1] >= 32
            assert got == (("im2col", "auto") if gemm else ("direct", "auto")), (xs, ws)


def _fused_raw(ns: Any, x, w, algo: str, training: bool, stride: int, padding: int, groups: int):
    c = w.shape[0]
    ones, zeros = torch.ones(c), torch.zeros(c)
    return ns.conv_bn_relu(
        x, w, None, ones * 1.5, zeros + 0.25, zeros.clone(), ones.clone(), training, 0.1, 1e-5,
        [stride] * 2, [padding] * 2, [1, 1], groups, algo, 64 << 20,
    )[0]  # fmt: skip


def _fingerprint(call: Any) -> tuple[torch.Tensor, tuple]:
    """What a call returns, and the ATen calls it makes inside the op (the allocations of its
    buffers: im2col's column buffer among them), by the profiler."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = call()
    events = tuple((e.name, str(e.input_shapes)) for e in prof.events() if "cnnext" not in e.name)
    return out, events


def _mirror_picks(device: str) -> tuple[set[str], list[str]]:
    """The grid cases where direct and im2col can be told apart (by output bits or by the
    buffers they allocate), and those among them where the op's own "auto" does not run what
    the rule chooses."""
    told, wrong = set(), []
    for dev, row_id, xs, ws, stride, padding, groups in GRID:
        if dev != device:
            continue
        x, w = _tensors(xs, ws, False)
        with on(device):
            ns = torch.ops.cnnext_emu if device == "emu" else torch.ops.cnnext
            # The op's own "auto" assumes a backward may follow (csrc/common/conv_dispatch.h).
            conf = ((stride,) * 2, (padding,) * 2, (1, 1), groups)
            expected = _algo.choose(x, w, *conf, grads=True)[0]
            for training in (False, True):
                runs = {
                    a: _fingerprint(
                        lambda a=a: _fused_raw(ns, x, w, a, training, stride, padding, groups)  # noqa: B023
                    )
                    for a in ("auto", "direct", "im2col")
                }
                (out_d, ev_d), (out_i, ev_i) = runs["direct"], runs["im2col"]
                if torch.equal(out_d, out_i) and ev_d == ev_i:
                    continue  # nothing tells which ran
                told.add(row_id)
                out_a, ev_a = runs["auto"]
                out_e, ev_e = runs[expected]
                if not (torch.equal(out_a, out_e) and ev_a == ev_e):
                    wrong.append(f"{row_id} training={training}: expected {expected}")
    return told, wrong


def test_fused_op_cpu_auto_mirrors_the_rule() -> None:
    """The convolution dispatch's resolve_conv_algo (csrc/common/conv_dispatch.h), which the
    fused op's algo="auto" takes, picks what ``choose`` picks (the fused op's own copy once used
    512 output pixels where the rule uses 256)."""
    told, wrong = _mirror_picks("cpu")
    # Not vacuous: the cases between the old and the new threshold are among those told apart.
    assert {"256 px", "484 px", "225 px", "529 px", "31 x 4x4", "32 x 4x4"} <= told, told
    assert not wrong, wrong


def test_fused_op_cuda_auto_mirrors_the_rule() -> None:
    told, wrong = _mirror_picks("emu")
    assert "3x3, K 432" in told, told
    assert not wrong, wrong
