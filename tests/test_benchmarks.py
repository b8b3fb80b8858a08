"""The benchmark harness (benchmarks/) on tiny shapes: it runs end to end and writes its JSON,
Markdown and PNG; its validation rejects wrong outputs, wrong gradients, a wrong argmax and
wrong running statistics; the fused family plugs in through ``cnnext.ops.conv_bn_relu`` and is
skipped without it; the CUDA timing loop and precision flags behave. No timing assertions."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cnnext

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
common = importlib.import_module("common")
bench_run = importlib.import_module("run")

# One thread, no progress lines, no cuDNN-benchmark child unless a test asks for it.
TINY = {"tiny": True, "threads": "1", "verbose": False, "cudnn_benchmark": False}


def suite(**config: object) -> common.Results:
    return common.run_suite(common.Config(**{**TINY, **config}))


def test_run_writes_json_md_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = bench_run.main(["--tiny", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Times are in microseconds" in out  # the Compare table
    stem = tmp_path / common.results_stem(results)
    payload = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = stem.with_suffix(".md").read_text()
    assert "## Machine" in md and "conv2d | fwd+bwd | fp32" in md and "max_pool2d" in md
    meta = payload["meta"]
    for key in ("cpu_model", "cpu_flags", "torch", "onednn", "mkl", "git", "peaks"):
        assert key in meta
    assert meta["peaks"]["1"]["gflops"] > 0 and meta["peaks"]["1"]["copy_gbs"] > 0
    rows = payload["rows"]
    assert {r["family"] for r in rows} >= {"conv", "pool"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    conv = [r for r in rows if r["family"] == "conv"]
    assert {r["impl"] for r in conv} == {
        "oneDNN",
        "torch.im2col",
        "cnnext.direct",
        "cnnext.im2col",
    }
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and r["pct_peak"] > 0
        assert 0 <= r["max_rel_err"] <= r["validated_tol"]
        if not r["baseline"]:
            expected = {"conv": {"oneDNN", "torch.im2col"}, "pool": {"torch"}}.get(r["family"])
            if r["family"] == "fused":
                folded = r["op"].endswith("eval") and r["pass"] == "fwd"
                expected = {"eager", "torch.fuse_eval"} if folded else {"eager"}
            assert set(r["ratios"]) == expected
    assert {r["op"] for r in rows if r["family"] == "fused"} == {
        "conv_bn_relu.eval",
        "conv_bn_relu.train",
    }


def test_validation_rejects_wrong_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    conv2d = cnnext.ops.conv2d
    monkeypatch.setattr(cnnext.ops, "conv2d", lambda *a, **k: conv2d(*a, **k) * 1.001)
    with pytest.raises(common.ValidationError, match=r"cnnext\.direct vs oneDNN .* output 0"):
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
    with pytest.raises(common.ValidationError, match="output 1 relative error"):
        suite(families=("conv",), passes=("fwd+bwd",), algos=("direct",))


def test_validation_rejects_wrong_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    max_pool2d = cnnext.ops.max_pool2d

    def shifted(*args, **kwargs):
        values, argmax = max_pool2d(*args, **kwargs)
        return values, argmax.flip(-1)

    monkeypatch.setattr(cnnext.ops, "max_pool2d", shifted)
    with pytest.raises(common.ValidationError, match="output 1 not identical"):
        suite(families=("pool",), passes=("fwd",))


def test_check_close() -> None:
    e = torch.randn(4, 5)
    common.check_close([e.clone()], [e], tol=1e-6)
    nan = e.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(common.ValidationError, match="relative error nan"):
        common.check_close([nan], [e], tol=1e-6)
    with pytest.raises(common.ValidationError, match="shape"):
        common.check_close([e[:3]], [e], tol=1e-6)
    with pytest.raises(common.ValidationError, match="float16"):
        common.check_close([e.half()], [e], tol=1.0)
    common.check_close([e.half()], [e.double()], tol=1e-3)  # float64 references take any dtype
    with pytest.raises(common.ValidationError, match="2 outputs"):
        common.check_close([e, e], [e], tol=1e-6)


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
    with pytest.raises(common.ValidationError, match=match):
        suite(families=("fused",), passes=("fwd",))


def test_memory_estimate_skips(tmp_path: Path) -> None:
    results = suite(families=("conv", "pool"), memory_fraction=1e-12)
    assert not results.rows and len(results.skipped) == 8
    assert "GiB" in results.skipped[0]
    common.write_results(results, tmp_path)  # reports still come out
    assert (tmp_path / f"{common.results_stem(results)}.png").exists()


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
                "cnnext.direct.naive",
                "cnnext.direct.tiled",
                "cnnext.im2col",
                "oneDNN",
                "oneDNN.bench",  # timed in the child process
            ):
                assert (precision, pass_, impl) in impls
    ours = [r for r in results.rows if r["impl"].startswith("cnnext")]
    assert all(set(r["ratios"]) == {"oneDNN", "oneDNN.bench"} for r in ours)


def test_precision_flags_restore() -> None:
    plan = common.Plan("emu") if cnnext.EMULATOR_AVAILABLE else common.Plan("cpu")
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    for precision, mode in (("tf32", "tf32"), ("fp32", "ieee"), ("fp16", "ieee")):
        with common.precision_flags(precision, plan):
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
    m = common.time_events(fn, flush, args, 0.001, Event, lambda: None)
    assert len(m.times) == len(flushes) > 0
    assert m.times == pytest.approx([0.002] * len(m.times))
    assert m.task_spec.description == "d" and m.number_per_run == 1


def test_gpu_datasheet_and_threads() -> None:
    assert common.gpu_datasheet("NVIDIA H100 80GB HBM3")["gbs"] == 3350.0
    assert common.gpu_datasheet("NVIDIA H100 PCIe")["matched"] == "H100 PCIE"
    assert common.gpu_datasheet("NVIDIA H200")["tflops"]["bf16"] == 989.4
    assert common.gpu_datasheet("NVIDIA A100-SXM4-40GB")["gbs"] == 1555.0
    assert common.gpu_datasheet("NVIDIA A100 80GB PCIe")["gbs"] == 1935.0
    assert common.gpu_datasheet("NVIDIA GeForce RTX 4090") is None
    assert common.parse_threads("1,all,1") == sorted({1, torch.get_num_threads()})
    with pytest.raises(ValueError):
        common.parse_threads("0")


def test_family_scripts_run_alone() -> None:
    tiny = {**TINY, "passes": ("fwd",)}
    pool_rows = importlib.import_module("pool").run(**tiny)
    assert {r["impl"] for r in pool_rows} == {"torch", "cnnext"}
    direct_rows = importlib.import_module("conv_direct").run(**tiny)
    assert {r["impl"] for r in direct_rows} == {"oneDNN", "torch.im2col", "cnnext.direct"}
    im2col = importlib.import_module("conv_im2col")
    assert "cnnext.im2col" in {r["impl"] for r in im2col.run(**tiny)}
    nhwc = [r for r in im2col.run_channels_last(tiny=True) if r["impl"] == "cnnext.nhwc"]
    assert nhwc and all(set(r["ratios"]) == {"oneDNN", "cnnext.via_nchw"} for r in nhwc)
    # As a script, in a fresh process.
    proc = subprocess.run(
        [sys.executable, str(BENCH / "pool.py"), "--tiny", "--threads", "1", "--passes", "fwd"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_pool2d | fwd | fp32" in proc.stdout
