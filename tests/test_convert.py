"""cnnext.convert: torchvision models converted give the original model's outputs, gradients and
running statistics; Conv->BN->ReLU fusion found by torch.fx (or among Sequential children);
what is left and why; torch.compile(fullgraph=True) of a converted model; DDP with gloo on 2
CPU processes against single-process training."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnext

from .reference import assert_close

FUSE = [False, True]


def small_cnn(bn: bool = True) -> nn.Sequential:
    """Every kind of layer convert handles: Conv-BN-ReLU chains, both pools, padding modes."""
    norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        norm(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding="same", padding_mode="reflect", groups=2),
        norm(8),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 12, 1),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 5),
    )


def check_converted(
    model: nn.Module, x: torch.Tensor, fuse: bool, *, steps: int = 1
) -> cnnext.ConvertReport:
    """The converted model gives the original's outputs (eval and train), gradients, and after
    SGD steps the same parameters and running statistics. Both in float64."""
    model = model.double()
    x = x.double()
    converted, report = cnnext.convert(model, fuse=fuse, return_report=True)
    assert converted is not model
    # Checkpoints load both ways (keys renamed only inside fused chains).
    converted.load_state_dict(report.map_state_dict(model.state_dict()), strict=True)
    model.load_state_dict(report.map_state_dict(converted.state_dict(), reverse=True), strict=True)
    model.eval()
    converted.eval()
    with torch.no_grad():
        assert_close(converted(x), model(x))
    model.train()
    converted.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, converted)]
    for step in range(steps):
        for opt in opts:
            opt.zero_grad()
        torch.manual_seed(step)  # the same dropout masks in both models
        out_ref = model(x)
        torch.manual_seed(step)
        out = converted(x)
        assert_close(out, out_ref)
        weights = torch.randn_like(out_ref)
        (out_ref * weights).sum().backward()
        (out * weights).sum().backward()
        params = dict(converted.named_parameters())
        for name, p in model.named_parameters():
            assert_close(params[report.map_key(name)].grad, p.grad, msg=name)
        for opt in opts:
            opt.step()
    after = converted.state_dict()
    for name, value in report.map_state_dict(model.state_dict()).items():
        assert_close(after[name].double(), value.double(), msg=name)  # params, running stats
    model.eval()
    converted.eval()
    with torch.no_grad():
        assert_close(converted(x), model(x))
    return report


# ---- torchvision models -------------------------------------------------------------------------


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def vgg11_bn() -> nn.Module:
    import torchvision

    model = torchvision.models.vgg11_bn(weights=None)
    model.classifier = nn.Linear(512 * 7 * 7, 10)  # the 4096-wide head only costs time here
    return model


def mobilenet_v2() -> nn.Module:
    import torchvision

    # Half width: torch's own float64 depthwise convolution (the reference) is slow.
    return torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.5)


@pytest.mark.parametrize("fuse", FUSE)
@pytest.mark.parametrize("make", [resnet18, vgg11_bn, mobilenet_v2], ids=lambda f: f.__name__)
def test_torchvision_model(make, fuse: bool) -> None:
    report = check_converted(make(), torch.randn(2, 3, 64, 64), fuse)
    assert report.replaced or report.fused
    kinds = {r.before for r in report.replaced}
    assert "Conv2d" in kinds or report.fused
    if make is mobilenet_v2:
        assert not report.fused  # every BN feeds ReLU6 or nothing
        if fuse:
            assert any("ReLU6" in x.reason for x in report.left)
    if make is vgg11_bn:
        assert any(x.module == "AdaptiveAvgPool2d" for x in report.left)
        if fuse:
            assert len(report.fused) == 8


def test_small_cnn_several_steps() -> None:
    check_converted(small_cnn(), torch.randn(4, 3, 16, 16), True, steps=3)


# ---- the module tree: what is replaced, shared, kept -------------------------------------------


def test_replaces_and_shares_parameters() -> None:
    model = small_cnn()
    converted = cnnext.convert(model, fuse=False)
    assert type(model[0]) is nn.Conv2d  # the original is untouched
    assert type(converted[0]) is cnnext.nn.Conv2d and converted[0].algo == "auto"
    assert converted[0].weight is not model[0].weight  # a deep copy
    assert type(converted[3]) is cnnext.nn.MaxPool2d
    assert type(converted[7]) is cnnext.nn.AvgPool2d
    same = cnnext.convert(model, fuse=False, inplace=True, algo="im2col")
    assert same is model and type(model[4]) is cnnext.nn.Conv2d and model[4].algo == "im2col"
    assert model[4].padding_mode == "reflect" and model[4].padding == "same"
    # Converting again changes nothing.
    again, report = cnnext.convert(model, fuse=False, return_report=True)
    assert report.replaced == []
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]


def test_single_layer_model() -> None:
    conv = nn.Conv2d(3, 4, 3)
    new = cnnext.convert(conv)
    assert type(new) is cnnext.nn.Conv2d
    x = torch.randn(1, 3, 5, 5)
    assert_close(new(x), conv(x))


def test_aliased_module_gets_one_replacement() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    converted = cnnext.convert(model, inplace=True)
    assert type(converted[0]) is cnnext.nn.Conv2d and converted[0] is converted[2]


def test_hooks_are_carried_over() -> None:
    model = small_cnn(bn=False)
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    converted = cnnext.convert(model, inplace=True)
    converted(torch.randn(1, 3, 16, 16))
    assert seen == ["Conv2d"] and type(converted[0]) is cnnext.nn.Conv2d
    handle.remove()
    converted(torch.randn(1, 3, 16, 16))
    assert len(seen) == 1


class DoubledConv(nn.Conv2d):
    def forward(self, x):  # noqa: D102
        return super().forward(x) * 2


def test_left_unchanged_with_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(
        nn.ConvTranspose2d(3, 4, 2),
        nn.AdaptiveAvgPool2d(4),
        DoubledConv(4, 4, 1),
        nn.Conv2d(4, 4, 1).half(),
        nn.Sequential(nn.Conv1d(2, 2, 1), nn.MaxPool1d(2)),
        nn.AdaptiveMaxPool2d(1),
        nn.Conv2d(4, 4, 1),
    )
    converted, report = cnnext.convert(model, return_report=True, verbose=True)
    left = {x.path: x.reason for x in report.left}
    assert "transposed" in left["0"]
    assert "adaptive" in left["1"] and "adaptive" in left["5"]
    assert "subclass of nn.Conv2d" in left["2"]
    assert "torch.float16 on CPU" in left["3"]
    assert "only 2D" in left["4.0"] and "only 2D" in left["4.1"]
    assert [r.path for r in report.replaced] == ["6"]
    assert type(converted[3]) is nn.Conv2d and type(converted[6]) is cnnext.nn.Conv2d
    printed = capsys.readouterr().out
    assert "left unchanged" in printed and "transposed convolution" in printed
    assert str(report) == printed.rstrip("\n")


def test_bad_algo() -> None:
    with pytest.raises(ValueError, match="algo must be one of"):
        cnnext.convert(small_cnn(), algo="fft")


# ---- fusion -------------------------------------------------------------------------------------


class FunctionalRelu(nn.Module):
    def __init__(self, act: nn.Module | str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = act

    def forward(self, x):  # noqa: D102
        y = self.bn(self.conv(x))
        if self.act == "F.relu":
            return F.relu(y)
        if self.act == ".relu()":
            return y.relu()
        if self.act == "F.relu(inplace=True)":
            return F.relu(y, inplace=True)
        return self.act(y)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):  # noqa: D102
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.body(x)
        return -self.body(x)


class TwoUses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()

    def forward(self, x):  # noqa: D102
        y = self.conv(x)
        return self.relu(self.bn(y)) + y


def test_fusion_in_resnet_keeps_shared_relu() -> None:
    converted, report = cnnext.convert(resnet18(), return_report=True)
    assert report.method == "fx"
    assert isinstance(converted.conv1, cnnext.nn.ConvBNReLU2d)
    assert isinstance(converted.bn1, nn.Identity) and isinstance(converted.relu, nn.Identity)
    block = converted.layer1[0]
    assert isinstance(block.conv1, cnnext.nn.ConvBNReLU2d) and isinstance(block.bn1, nn.Identity)
    assert type(block.relu) is nn.ReLU  # used twice in BasicBlock.forward: kept,
    assert not block.relu.inplace  # and out of place, not to overwrite the fused op's output
    (fusion,) = [f for f in report.fused if f.conv == "layer1.0.conv1"]
    assert fusion.relu_kept and "called 2 times" in fusion.why_kept
    assert "out-of-place" in fusion.why_kept
    assert type(block.conv2) is cnnext.nn.Conv2d  # bn2 feeds the residual addition
    assert any("addition" in x.reason for x in report.left)
    assert len(report.fused) == 9  # the stem + conv1 of each of the 8 BasicBlocks


@pytest.mark.parametrize(
    "act",
    ["F.relu", ".relu()", "F.relu(inplace=True)", nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6()],
    ids=str,
)
def test_fusion_activation_kinds(act) -> None:
    model = FunctionalRelu(act)
    report = check_converted(model, torch.randn(2, 3, 7, 7), fuse=True, steps=2)
    if isinstance(act, nn.ReLU6):
        assert not report.fused and "ReLU6" in report.left[0].reason
    elif act == "F.relu(inplace=True)":  # it would overwrite the output the fused op keeps
        assert not report.fused and "in-place" in report.left[0].reason
    else:
        (fusion,) = report.fused
        assert (fusion.conv, fusion.bn) == ("conv", "bn")
        assert fusion.relu_kept == isinstance(act, str)


def test_fusion_sequential_fallback() -> None:
    model = Untraceable()
    report = check_converted(model, torch.rand(2, 3, 9, 9), fuse=True)
    assert report.method == "sequential" and "TraceError" in (report.trace_error or "")
    (fusion,) = report.fused
    assert (fusion.conv, fusion.bn, fusion.relu) == ("body.0", "body.1", "body.2")


def test_no_fusion_when_conv_output_reused() -> None:
    report = check_converted(TwoUses(), torch.randn(2, 3, 7, 7), fuse=True)
    assert not report.fused and "also used elsewhere" in report.left[0].reason


@pytest.mark.parametrize(
    "bn",
    [
        nn.BatchNorm2d(6, affine=False),
        nn.BatchNorm2d(6, track_running_stats=False),
        nn.BatchNorm2d(6, momentum=None),
    ],
    ids=["no-affine", "no-running-stats", "cumulative-average"],
)
def test_fusion_unusual_batch_norms(bn: nn.BatchNorm2d) -> None:
    """Fused or left with a reason, as ConvBNReLU2d decides; either way the model is right."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn, nn.ReLU())
    report = check_converted(model, torch.randn(2, 3, 7, 7), fuse=True, steps=2)
    assert len(report.fused) + len([x for x in report.left if "not fused" in x.reason]) == 1


# ---- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend: str) -> None:
    torch._dynamo.reset()
    model = small_cnn()
    converted = cnnext.convert(model)
    compiled = torch.compile(converted, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    converted.eval()
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    for train in (False, True):  # train: batch statistics, running stats updated in the graph
        converted.train(train)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        # Backward before the next forward: BN saves its running stats, which a train-mode
        # forward updates in place.
        expected = converted(x1)
        expected.square().sum().backward()
        out = compiled(x2)
        out.square().sum().backward()
        assert_close(out, expected)
        assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("strict", [True, False])
def test_export(strict: bool) -> None:
    """torch.export, Dynamo-traced (strict) and not (non-strict: the Python runs on fake
    tensors, which the lean bindings decline): the graph holds cnnext's ops and the exported
    program computes what the torch model does."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 3), nn.AvgPool2d(2),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    converted = cnnext.convert(model)
    x = torch.randn(2, 3, 12, 12)
    program = torch.export.export(converted, (x,), strict=strict)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    names = ("conv_bn_relu", "max_pool2d_with_argmax", "avg_pool2d")
    assert {f"cnnext.{name}.default" for name in names} <= targets, targets
    assert any(t.startswith("cnnext.conv2d_") for t in targets), targets
    assert not any(t.startswith("aten.") for t in targets), targets
    with torch.no_grad():
        assert_close(program.module()(x), model(x))


# ---- DistributedDataParallel (gloo, 2 CPU processes) --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, state: dict, x, y, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        model = small_cnn(bn=False)
        model.load_state_dict(state)
        ddp = DistributedDataParallel(cnnext.convert(model))
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        F.cross_entropy(ddp(x[shard]), y[shard]).backward()
        grads = {name: p.grad for name, p in ddp.module.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_matches_single_process() -> None:
    import torch.multiprocessing as mp

    model = small_cnn(bn=False)  # BN would see per-process batch statistics
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    reference = cnnext.convert(model)
    F.cross_entropy(reference(x), y).backward()
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _ddp_worker,
            args=(2, _free_port(), model.state_dict(), x, y, out_dir),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 180
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail("DDP workers did not finish within 180 s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        grads = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for name, p in reference.named_parameters():
        assert_close(grads[0][name], p.grad, msg=name)
        assert_close(grads[1][name], grads[0][name], msg=name)
