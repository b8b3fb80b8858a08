"""The benchmark harness (the ``benchmarks`` package) on tiny shapes: it runs end to end and
writes its JSON, Markdown and PNG; its validation rejects wrong outputs, wrong gradients, a wrong
argmax and wrong running statistics; the fused family plugs in through
``cnnext.ops.conv_bn_relu``; the host family compares modules with torch's; the CUDA plan (its
cases listed without a GPU, its code run under the emulator), timing loop and precision flags
behave. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cnnext
from benchmarks import conv_bn_relu, conv_direct, conv_im2col, host, pool, shapes
from benchmarks import run as bench_run
from benchmarks.cases import build_case
from benchmarks.cases.base import precision_flags
from benchmarks.config import Config, Plan, Spec, enumerate_specs, parse_threads
from benchmarks.machine import gpu_datasheet
from benchmarks.report import host_table, markdown, results_stem, write_results
from benchmarks.suite import Results, run_suite
from benchmarks.timing import time_events
from benchmarks.validate import ValidationError, check_close

ROOT = Path(__file__).resolve().parents[1]

# One thread, no progress lines, no cuDNN-benchmark child unless a test asks for it.
TINY = {"tiny": True, "threads": "1", "verbose": False, "cudnn_benchmark": False}


def suite(**config: object) -> Results:
    return run_suite(Config(**{**TINY, **config}))


def test_run_writes_json_md_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = bench_run.main(["--tiny", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Times are in microseconds" in out  # the Compare table
    assert "Host cost per call" in out
    stem = tmp_path / results_stem(results)
    payload = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = stem.with_suffix(".md").read_text()
    assert "## Machine" in md and "conv2d | fwd+bwd | fp32" in md and "max_pool2d" in md
    assert "host.nn.MaxPool2d | fwd+bwd" in md and " us (min " in md
    meta = payload["meta"]
    for key in ("cpu_model", "cpu_flags", "torch", "onednn", "mkl", "git", "peaks"):
        assert key in meta
    assert meta["peaks"]["1"]["gflops"] > 0 and meta["peaks"]["1"]["copy_gbs"] > 0
    rows = payload["rows"]
    assert {r["family"] for r in rows} == {"conv", "fused", "pool", "host"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    conv = [r for r in rows if r["family"] == "conv"]
    assert {r["impl"] for r in conv} == {
        "oneDNN",
        "torch.im2col",
        "cnnext.direct",
        "cnnext.im2col",
    }
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert (r["pct_peak"] is None) == (r["family"] == "host")
        assert r["family"] == "host" or r["pct_peak"] > 0
        assert 0 <= r["max_rel_err"] <= r["validated_tol"]
        if not r["baseline"]:
            expected = {"conv": {"oneDNN", "torch.im2col"}, "pool": {"torch"}, "host": {"torch"}}
            expected = expected.get(r["family"])
            if r["family"] == "fused":
                folded = r["op"].endswith("eval") and r["pass"] == "fwd"
                expected = {"eager", "torch.fuse_eval"} if folded else {"eager"}
            assert set(r["ratios"]) == expected
    assert {r["op"] for r in rows if r["family"] == "fused"} == {
        "conv_bn_relu.eval",
        "conv_bn_relu.train",
    }


def test_conv_rows_name_the_pick_of_their_pass() -> None:
    """A conv case names what algo="auto" runs in its pass: the CPU rule decides training and
    inference apart (16 channels on a 4x4 plane: im2col with gradients, direct without)."""
    layer = shapes.ConvLayer("test", "deep-small", 16, 4, 16, 3, padding=1)
    picks = {}
    for pass_ in ("fwd", "fwd+bwd"):
        spec = Spec("conv", "conv2d", layer, 2, pass_, "fp32", "contiguous")
        picks[pass_] = build_case(spec, Plan("cpu"), Config(**TINY)).extra["auto_pick"]
    assert picks == {"fwd": "direct", "fwd+bwd": "im2col"}


def test_validation_rejects_wrong_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    conv2d = cnnext.ops.conv2d
    monkeypatch.setattr(cnnext.ops, "conv2d", lambda *a, **k: conv2d(*a, **k) * 1.001)
    with pytest.raises(ValidationError, match=r"cnnext\.direct vs oneDNN .* output 0"):
        suite(families=("conv",), passes=("fwd",))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient off by 1%."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


def test_validation_checks_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    conv2d = cnnext.ops.conv2d
    monkeypatch.setattr(cnnext.ops, "conv2d", lambda *a, **k: _ScaleGrad.apply(conv2d(*a, **k)))
    suite(families=("conv",), passes=("fwd",), algos=("direct",))  # forward is right
    with pytest.raises(ValidationError, match="output 1 relative error"):
        suite(families=("conv",), passes=("fwd+bwd",), algos=("direct",))


def test_validation_rejects_wrong_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    max_pool2d = cnnext.ops.max_pool2d

    def shifted(*args, **kwargs):
        values, argmax = max_pool2d(*args, **kwargs)
        return values, argmax.flip(-1)

    monkeypatch.setattr(cnnext.ops, "max_pool2d", shifted)
    with pytest.raises(ValidationError, match="output 1 not identical"):
        suite(families=("pool",), passes=("fwd",))


def test_check_close() -> None:
    e = torch.randn(4, 5)
    check_close([e.clone()], [e], tol=1e-6)
    nan = e.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValidationError, match="relative error nan"):
        check_close([nan], [e], tol=1e-6)
    with pytest.raises(ValidationError, match="shape"):
        check_close([e[:3]], [e], tol=1e-6)
    with pytest.raises(ValidationError, match="float16"):
        check_close([e.half()], [e], tol=1.0)
    check_close([e.half()], [e.double()], tol=1e-3)  # float64 references take any dtype
    with pytest.raises(ValidationError, match="2 outputs"):
        check_close([e, e], [e], tol=1e-6)


def _fused_reference(
    input,
    weight,
    conv_bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    relu=True,
):
    """cnnext.ops.conv_bn_relu built from torch ops (planted bugs via keyword overrides)."""
    y = F.conv2d(input, weight, conv_bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.relu(y) if relu else y


def test_fused_family_rows() -> None:
    results = suite(families=("fused",))
    ops = {(r["op"], r["pass"], r["impl"]) for r in results.rows}
    for op in ("conv_bn_relu.eval", "conv_bn_relu.train"):
        for pass_ in ("fwd", "fwd+bwd"):
            assert {(op, pass_, "cnnext.fused"), (op, pass_, "eager")} <= ops
    for r in results.rows:
        if r["impl"] == "cnnext.fused":
            folded = r["op"].endswith("eval") and r["pass"] == "fwd"
            assert set(r["ratios"]) == ({"eager", "torch.fuse_eval"} if folded else {"eager"})


@pytest.mark.parametrize(
    "wrong, match",
    [
        ({"relu": False}, "output 0"),  # no ReLU
        ({"momentum": 0.2}, "output 1"),  # train: output right, running_mean updated wrongly
    ],
)
def test_fused_validation_rejects(monkeypatch: pytest.MonkeyPatch, wrong: dict, match: str):
    def fused(**kwargs):
        return _fused_reference(**{**kwargs, **wrong})

    # inspect.signature of the stand-in: the reference's parameters.
    fused.__signature__ = __import__("inspect").signature(_fused_reference)
    monkeypatch.setattr(cnnext.ops, "conv_bn_relu", fused, raising=False)
    with pytest.raises(ValidationError, match=match):
        suite(families=("fused",), passes=("fwd",))


def test_memory_estimate_skips(tmp_path: Path) -> None:
    results = suite(families=("conv", "pool"), memory_fraction=1e-12)
    assert not results.rows and len(results.skipped) == 8
    assert "GiB" in results.skipped[0]
    write_results(results, tmp_path)  # reports still come out
    assert (tmp_path / f"{results_stem(results)}.png").exists()


@pytest.mark.skipif(not cnnext.EMULATOR_AVAILABLE, reason="emulator not built")
def test_cuda_plan_under_the_emulator() -> None:
    """The CUDA plan (naive/tiled/im2col, precisions, the cudnn.benchmark child process) with
    cnnext's CUDA kernels emulated on CPU tensors."""
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    results = suite(
        device="emu",
        families=("conv",),
        layers="conv3x3",
        precisions=("tf32", "fp16"),
        cudnn_benchmark=True,
    )
    after = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    assert before == after
    impls = {(r["precision"], r["pass"], r["impl"]) for r in results.rows}
    for precision in ("tf32", "fp16"):
        for pass_ in ("fwd", "fwd+bwd"):
            for impl in (
                "cnnext.direct",  # variant auto: the implicit GEMM
                "cnnext.direct.naive",
                "cnnext.im2col",
                "oneDNN",
                "oneDNN.bench",  # timed in the child process
            ):
                assert (precision, pass_, impl) in impls
    ours = [r for r in results.rows if r["impl"].startswith("cnnext")]
    assert all(set(r["ratios"]) == {"oneDNN", "oneDNN.bench"} for r in ours)
    # cudnn.benchmark on is the main baseline: the plot's and the first ratio column.
    assert {r["primary"] for r in results.rows} == {"oneDNN.bench"}
    md = markdown(results)
    assert "| cnnext.im2col vs oneDNN.bench | cnnext.im2col vs oneDNN |" in md


def test_precision_flags_restore() -> None:
    plan = Plan("emu") if cnnext.EMULATOR_AVAILABLE else Plan("cpu")
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    for precision, mode in (("tf32", "tf32"), ("fp32", "ieee"), ("fp16", "ieee")):
        with precision_flags(precision, plan):
            if plan.kind != "cpu":
                assert (conv.fp32_precision, matmul.fp32_precision) == (mode, mode)
        assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_time_events_excludes_the_flush() -> None:
    """The CUDA timing loop with stand-in events on a fake clock: the flush advances the clock
    by 100 ms, the call by 2 ms; every recorded time is the call's alone."""
    clock = [0.0]
    flushes = []

    class Event:
        def record(self) -> None:
            self.t = clock[0]

        def elapsed_time(self, end: Event) -> float:
            return end.t - self.t

    def flush() -> None:
        flushes.append(1)
        clock[0] += 100.0

    def fn() -> None:
        clock[0] += 2.0

    args = {"label": "l", "sub_label": "s", "description": "d", "num_threads": 1}
    m = time_events(fn, flush, args, 0.001, Event, lambda: None)
    assert len(m.times) == len(flushes) > 0
    assert m.times == pytest.approx([0.002] * len(m.times))
    assert m.task_spec.description == "d" and m.number_per_run == 1


def test_gpu_datasheet_and_threads() -> None:
    assert gpu_datasheet("NVIDIA H100 80GB HBM3")["gbs"] == 3350.0
    assert gpu_datasheet("NVIDIA H100 PCIe")["matched"] == "H100 PCIE"
    assert gpu_datasheet("NVIDIA H200")["tflops"]["bf16"] == 989.4
    assert gpu_datasheet("NVIDIA A100-SXM4-40GB")["gbs"] == 1555.0
    assert gpu_datasheet("NVIDIA A100 80GB PCIe")["gbs"] == 1935.0
    assert gpu_datasheet("NVIDIA GeForce RTX 4090") is None
    assert parse_threads("1,all,1") == sorted({1, torch.get_num_threads()})
    with pytest.raises(ValueError):
        parse_threads("0")


def test_family_scripts_run_alone() -> None:
    tiny = {**TINY, "passes": ("fwd",)}
    pool_rows = pool.run(**tiny)
    assert {r["impl"] for r in pool_rows} == {"torch", "cnnext"}
    direct_rows = conv_direct.run(**tiny)
    assert {r["impl"] for r in direct_rows} == {"oneDNN", "torch.im2col", "cnnext.direct"}
    assert "cnnext.im2col" in {r["impl"] for r in conv_im2col.run(**tiny)}
    nhwc = [r for r in conv_im2col.run_channels_last(tiny=True) if r["impl"] == "cnnext.nhwc"]
    assert nhwc and all(set(r["ratios"]) == {"oneDNN", "cnnext.via_nchw"} for r in nhwc)
    fused = conv_bn_relu.run(**{**tiny, "layers": "conv3x3"})
    assert {r["impl"] for r in fused if not r["baseline"]} == {
        "cnnext.fused",
        "cnnext.fused.direct",
        "cnnext.fused.im2col",
        "cnnext.conv+relu",
    }
    assert {r["impl"] for r in host.run(**{**tiny, "layers": "pool"})} == {"torch", "cnnext"}
    # As a module, in a fresh process, from the repository root (no sys.path edits anywhere).
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.pool", "--tiny", "--threads", "1", "--passes", "fwd"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_pool2d | fwd | fp32" in proc.stdout
    sources = [*(ROOT / "benchmarks").rglob("*.py")]
    assert not [p.name for p in sources if "sys.path" in p.read_text() and p.name != "algo.py"]


def test_host_family() -> None:
    """Every host op and pass, cnnext against torch at one thread, in microseconds."""
    results = suite(families=("host",), threads="1,all")
    rows = results.rows
    assert {(r["op"], r["pass"]) for r in rows} == {
        (op, pass_) for op, (_, passes) in shapes.HOST_CASES.items() for pass_ in passes
    }
    assert {r["threads"] for r in rows} == {1} and {r["unit"] for r in rows} == {"calls/s"}
    ours = [r for r in rows if r["impl"] == "cnnext"]
    assert len(ours) == len(rows) // 2 and all(set(r["ratios"]) == {"torch"} for r in ours)
    assert all(r["pct_peak"] is None and r["max_rel_err"] <= r["validated_tol"] for r in rows)
    table = host_table(results)
    assert "host.nn.ConvBNReLU2d.train" in table and "torch us" in table


def test_host_validation_rejects_wrong_module(monkeypatch: pytest.MonkeyPatch) -> None:
    forward = cnnext.nn.AvgPool2d.forward
    monkeypatch.setattr(cnnext.nn.AvgPool2d, "forward", lambda self, x: forward(self, x) * 1.01)
    with pytest.raises(ValidationError, match=r"cnnext vs torch on host.nn.AvgPool2d"):
        suite(families=("host",), layers="pool", passes=("fwd",))


def test_host_validation_checks_running_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    """ConvBNReLU2d in train: a wrong momentum leaves outputs and gradients right."""
    from_modules = cnnext.nn.ConvBNReLU2d.from_modules

    def wrong(conv, bn, *args, **kwargs):
        bn.momentum = 0.2
        return from_modules(conv, bn, *args, **kwargs)

    monkeypatch.setattr(cnnext.nn.ConvBNReLU2d, "from_modules", wrong)
    with pytest.raises(ValidationError, match="host.nn.ConvBNReLU2d.train"):
        suite(families=("host",), layers="conv")


def test_gpu_cases_listed_without_a_gpu(capsys: pytest.CaptureFixture) -> None:
    """The CUDA suite's cases (ResNet-18 224x224 at batch 32 and 128, every distinct shape),
    enumerated without a GPU; host cases are CPU-only."""
    notes: list[str] = []
    cfg = Config(device="cuda", families=("conv", "fused", "host"), precisions=("fp32",))
    specs = enumerate_specs(cfg, notes)
    resnet = {(s.layer.name, s.batch) for s in specs if s.layer.net == "resnet18-224"}
    for layer in ("stem", "layer1", "layer4", "layer2.0.conv1", "layer4.0.downsample"):
        assert {(layer, 32), (layer, 128)} <= resnet
    assert not any(s.family == "host" for s in specs) and any("host" in n for n in notes)
    quick = enumerate_specs(Config(device="cuda", quick=True, families=("conv",)), [])
    assert {s.batch for s in quick if s.layer.id == "resnet18-224.stem"} == {1, 32, 128}
    cpu = enumerate_specs(Config(families=("conv",)), [])
    assert "resnet18-224.layer2.0.conv1" not in {s.layer.id for s in cpu}
    exact = Config(device="cuda", families=("conv",), batches=(1,), precisions=("fp32",))
    assert {s.batch for s in enumerate_specs(exact, [])} == {1}
    bench_run.main(["--device", "cuda", "--only", "conv", "--precisions", "fp32", "--list"])
    out = capsys.readouterr().out
    assert "conv2d resnet18-224.layer3 N=128 fwd+bwd fp32" in out and "cases" in out
