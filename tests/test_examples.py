"""Smoke tests of examples/: each script runs end to end, tiny, as a user would run it (a
subprocess from the repository root), and prints and writes what it promises. One CPU thread,
so they stay cheap next to other work; no accuracy or timing thresholds."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 300  # a hang guard: each run takes ~10 s on 2 busy cores


def run_example(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python examples/<script> <args>`` from the repository root, on one thread."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    print(result.stdout)  # shown by pytest when the test fails
    print(result.stderr, file=sys.stderr)
    return result


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """An example script imported as a module (its ``main`` not run), registered in
    ``sys.modules`` for the test's duration (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_train_digits_tiny(tmp_path: Path) -> None:
    result = run_example(
        "train_digits.py", "--epochs", "1", "--subset", "64", "--quiet", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "data: digits, 64 train / 360 test images of 1x28x28" in out
    final = re.search(
        r"test accuracy: cnnext (\d+\.\d)% \| plain torch (\d+\.\d)% "
        r"\(difference (\d+\.\d) points\) in \d+ s",
        out,
    )
    assert final, out
    ours, twin, diff = (float(g) for g in final.groups())
    assert 0 <= ours <= 100 and 0 <= twin <= 100
    assert diff == pytest.approx(abs(ours - twin), abs=0.11)

    for name in ("curves.png", "filters.png", "feature_maps.png", "confusion.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1000, name

    checkpoint = tmp_path / "cnnext_digits.pt"
    reloaded = re.search(
        rf"checkpoint {re.escape(str(checkpoint))} loads into plain torch: "
        r"test accuracy (\d+\.\d)%",
        out,
    )
    assert reloaded, out
    state = torch.load(checkpoint, weights_only=True)
    # The plain-torch twin's keys: Sequential(Conv2d, BatchNorm2d, ReLU) blocks at 0 and 2.
    assert state["0.0.weight"].shape == (16, 1, 3, 3)
    assert state["2.1.running_var"].shape == (32,)


def test_convert_resnet_tiny() -> None:
    result = run_example(
        "convert_resnet.py",
        *("--size", "32", "--batch", "1", "--threads", "1", "--min-run-time", "0.05"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "cnnext.convert: chains found by: fx" in out
    assert re.search(r"^  conv1 +Conv2d\+BatchNorm2d\+ReLU +ConvBNReLU2d", out, re.M), out
    assert re.search(r"^  layer4\.1\.conv2 +Conv2d +cnnext\.nn\.Conv2d", out, re.M), out
    assert re.search(r"^  avgpool +AdaptiveAvgPool2d +adaptive pooling", out, re.M), out
    assert (
        "summary: 9 Conv2d+BatchNorm2d+ReLU chains fused, 12 modules replaced, "
        "12 left unchanged (chains found by fx)"
    ) in out
    for what in (
        r"eval logits \[1, 3, 32, 32\]",
        r"train logits \[2, 1000\]",
        r"train grad of input \[2, 3, 64, 64\]",
        r"train grads of parameters \(worst of 62\)",
        r"train BN running stats \(worst of 40\)",
    ):
        assert re.search(rf"^match +{what} +max-abs error \d\.\d\de[-+]\d\d", out, re.M), what
    assert "MISMATCH" not in out
    assert re.search(r"^outputs match: 5/5 checks passed, largest max-abs error ", out, re.M)
    assert "CPU eval forward, 32x32, 1 thread(s), median ms" in out
    assert re.search(r"^ +1 +\d+\.\d +\d+\.\d +\d+\.\d\dx$", out, re.M), out


def test_convert_resnet_mismatch_exits_nonzero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("convert_resnet", monkeypatch)
    # A negative tolerance fails every comparison, whatever the error.
    monkeypatch.setattr(example, "EVAL_TOL", (-1.0, 0.0))
    monkeypatch.setattr(example, "TRAIN_TOL", (-1.0, 0.0))
    threads = torch.get_num_threads()
    try:
        code = example.main(["--size", "32", "--batch", "1", "--threads", "1", "--no-timing"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"^MISMATCH eval logits \[1, 3, 32, 32\]", out, re.M), out
    assert "outputs MISMATCH: 0/5 checks passed" in out
