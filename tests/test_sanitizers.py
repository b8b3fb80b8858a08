"""AddressSanitizer and ThreadSanitizer on the emulated CUDA kernels.

1. The emulated cases of the op tests listed below run again with the emulator built under each
   sanitizer (tools/run_sanitized.py), and must give no report at all: an out-of-bounds access
   or a data race is a bug even when the output happens to be right.
2. Each sanitizer is shown to catch a planted bug, through the Python extension (the kernels of
   tests/emu/planted.cu, built into the sanitizer variants only, as torch.ops.cnnext_planted)
   and in the standalone emulator self-test (tests/emu/selftest.cu), while the correct twins
   stay quiet.

`make test` builds both variants first (`make sanitizers`). A variant that cannot be built is a
failure; the tests skip only when the compiler has no runtime for that sanitizer.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cnnext

from .test_emulator import build as build_selftest
from .test_emulator import run as run_selftest

ROOT = Path(__file__).resolve().parent.parent

# The op tests run under each sanitizer: the pytest arguments of one child process each. Emulated
# cases only (the CPU kernels are not instrumented). ASan costs about what the plain emulator
# does (fiber switches dominate), so it takes every emulated case. TSan is slower, worst on
# gradcheck (thousands of launches): one schedule order is enough for it (its verdict rests on
# happens-before, not on the order), and no gradcheck. Measured on the quiet 2-core dev machine:
# ASan conv2d 71 s, pool 24 s, conv_bn_relu 28 s, conv2d_im2col 7 s; TSan 22, 13, 19, 16 s.
# Each op's test module, from its row of cnnext.ops.OPS.
OP_TESTS = list(dict.fromkeys(row.tests for row in cnnext.ops.OPS))
ASAN_RUNS: list[list[str]] = [["tests/test_gemm.py", "-k", "emu"]] + [
    [f"tests/{name}.py", "-k", "emu"] for name in OP_TESTS
]
TSAN_RUNS: list[list[str]] = [["tests/test_gemm.py", "-k", "emu"]] + [
    [f"tests/{name}.py", "-k", "emu-random and not gradcheck"] for name in OP_TESTS
]
# The tensor-core (wmma) kernels: every test of the file is emulated.
ASAN_RUNS.append(["tests/test_tensor_cores.py"])
TSAN_RUNS.append(["tests/test_tensor_cores.py", "-k", "emu-random"])


def _driver():
    spec = importlib.util.spec_from_file_location("run_sanitized", ROOT / "tools/run_sanitized.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rs = _driver()


@pytest.fixture(scope="module", params=["address", "thread"])
def sanitizer(request: pytest.FixtureRequest) -> str:
    """A sanitizer whose variant of the emulator extension is built and current."""
    name = request.param
    if rs.runtime_library(name) is None:
        pytest.skip(f"{rs.cxx()} has no {name} sanitizer runtime (lib{rs.SANITIZERS[name]}.so)")
    try:
        rs.build(name)  # a no-op after `make sanitizers`; rebuilds what changed since
    except RuntimeError as e:
        pytest.fail(str(e))
    return name


def _runs() -> list:
    return [
        pytest.param(s, args, id=f"{s}-{' '.join(args)}")
        for s, runs in (("address", ASAN_RUNS), ("thread", TSAN_RUNS))
        for args in runs
    ]


@pytest.mark.parametrize("name,args", _runs())
def test_op_tests_have_no_sanitizer_report(name: str, args: list[str]) -> None:
    if rs.runtime_library(name) is None:
        pytest.skip(f"{rs.cxx()} has no {name} sanitizer runtime")
    cmd = [sys.executable, str(ROOT / "tools/run_sanitized.py"), f"--sanitizer={name}", "-q"]
    r = subprocess.run(
        [*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-20000:]
    assert " passed" in out and f"no {name} sanitizer reports" in out, out[-5000:]


# ---- planted bugs through the Python extension ------------------------------------------------

PLANTED_SNIPPET = textwrap.dedent(
    """
    import sys, torch, cnnext
    torch.manual_seed(0)
    x = torch.randn(150) * 5
    for case in sys.argv[1:]:
        try:
            y = torch.ops.cnnext_planted.run(case, x)
        except RuntimeError as e:
            print(case, "raised", str(e).splitlines()[0])
            continue
        if case.startswith("scale"):
            want = 2 * x
        elif case.startswith("shared_shift"):
            idx = torch.arange(150)
            src = idx // 64 * 64 + (idx % 64 + 1) % 64
            want = torch.where(src < 150, x[src.clamp(max=149)], torch.zeros(()))
        elif case.startswith("stencil"):
            want = x + torch.cat([torch.zeros(1), x[:-1]])
        else:
            want = torch.bincount(x.abs().long() % 8, minlength=8).int()
        print(case, "ok" if torch.equal(y, want) else "WRONG")
    """
)

PLANTED = {
    "address": {
        "scale_global_overflow": ("heap-buffer-overflow", "scale_kernel<float, true>"),
        "shared_shift_overflow": ("global-buffer-overflow", "shared_shift_kernel<float, true>"),
    },
    "thread": {
        "stencil_missing_barrier": ("data race", "stencil_kernel<float, false>"),
        "histogram_missing_atomic": ("data race", "histogram_kernel<float, false>"),
    },
}


def _planted(name: str, cases: list[str]) -> tuple[int, str, list[str]]:
    return rs.run(name, ["-c", PLANTED_SNIPPET, *cases], capture=True, timeout=600)


def test_planted_bugs_are_reported_through_python(sanitizer: str) -> None:
    planted = PLANTED[sanitizer]
    # ASan stops at the first report: one process per case. TSan goes on: one process for all.
    groups = [[c] for c in planted] if sanitizer == "address" else [list(planted)]
    for cases in groups:
        code, out, reports = _planted(sanitizer, cases)
        assert code == 66 and len(reports) == 1, (cases, code, out, reports)
        for case in cases:
            kind, kernel = planted[case]
            assert f"{kind}" in reports[0] and kernel in reports[0], (case, reports[0])
        assert "planted.cu" in reports[0], reports[0]


def test_correct_twins_are_quiet_through_python(sanitizer: str) -> None:
    """The correct kernels, and a launch that fails at a barrier mismatch (its waiting threads
    must unwind cleanly) followed by correct launches, give no report."""
    cases = ["scale", "shared_shift", "stencil", "histogram", "divergent_barrier", "stencil"]
    code, out, reports = _planted(sanitizer, cases)
    assert code == 0 and not reports, (out, reports)
    lines = out.splitlines()
    for case in ["scale", "shared_shift", "stencil", "histogram"]:
        assert f"{case} ok" in lines, out
    assert any(
        line.startswith("divergent_barrier raised") and "barrier mismatch" in line for line in lines
    ), out


def test_driver_fails_on_a_report_even_when_tests_pass(tmp_path: Path) -> None:
    """Under TSan a race does not stop the process, and the planted stencil gives the right
    answer in forward order: pytest passes, so only the report can fail the run."""
    if rs.runtime_library("thread") is None:
        pytest.skip(f"{rs.cxx()} has no thread sanitizer runtime")
    rs.build("thread")
    test_file = tmp_path / "test_race.py"
    test_file.write_text(
        "import torch, cnnext\n\n"
        "def test_race():\n"
        "    x = torch.arange(100, dtype=torch.float32)\n"
        "    y = torch.ops.cnnext_planted.run('stencil_missing_barrier', x)\n"
        "    assert torch.equal(y, x + torch.cat([torch.zeros(1), x[:-1]]))\n"
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/run_sanitized.py"), "--sanitizer=thread", "--no-build"]
        + ["-q", f"--rootdir={tmp_path}", str(test_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = r.stdout + r.stderr
    assert "1 passed" in out, out
    assert r.returncode == 1 and "WARNING: ThreadSanitizer: data race" in out, out


def test_asan_sees_every_shared_array() -> None:
    """With CNNEXT_EMU_PLAIN_SHARED `__shared__` is `static`, so ASan puts redzones around shared
    arrays, but GCC gives none to a static local of a function with vague (COMDAT) linkage: a
    template or inline function outside an anonymous namespace. Kernels with shared memory live in
    an anonymous namespace (as csrc/gemm/cuda.cu shows); this finds any that does not."""
    if rs.runtime_library("address") is None:
        pytest.skip(f"{rs.cxx()} has no address sanitizer runtime")
    rs.build("address")
    module = rs.module_path("address")
    nm = subprocess.run(
        ["nm", "-C", "--defined-only", str(module)], capture_output=True, text=True, check=True
    ).stdout
    unprotected = []
    for line in nm.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) != 3 or parts[1] not in ("u", "V", "v"):
            continue
        name = parts[2]
        ours = "cnnext" in name or "_kernel" in name
        if ours and ")::" in name and not name.startswith("guard variable"):
            unprotected.append(name)
    assert not unprotected, (
        "shared memory ASan cannot guard (COMDAT static locals); put these kernels in an "
        f"anonymous namespace: {unprotected}"
    )


# ---- planted bugs in the standalone emulator self-test ----------------------------------------

ASAN_PLANTED = {
    "scale_global_overflow": ("heap-buffer-overflow", "scale_kernel<true>"),
    "shared_shift_overflow": ("global-buffer-overflow", "shared_shift_kernel<true>"),
    "dynamic_shift_overflow": ("heap-buffer-overflow", "dynamic_shift_kernel<true>"),
    "local_array_overflow": ("stack-buffer-overflow", "local_array_kernel"),
}


@pytest.mark.parametrize("case", sorted(ASAN_PLANTED))
def test_asan_reports_planted_out_of_bounds_access(case: str) -> None:
    code, out = run_selftest(build_selftest("asan"), case, "random:1")
    kind, kernel = ASAN_PLANTED[case]
    assert f"ERROR: AddressSanitizer: {kind}" in out and kernel in out, out
    assert code == 66, out


@pytest.mark.parametrize(
    "case",
    [
        "scale",
        "shared_shift",
        "dynamic_shift",
        "local_array",
        "error_then_launch",
        "transpose",
        "matmul",
        "reduce",
        "histogram",
        "stencil",
        "shuffle_modes",
        "dynamic_smem_poisoned",
        "early_exit",
    ],
)
def test_asan_is_quiet_on_correct_kernels(case: str) -> None:
    code, out = run_selftest(build_selftest("asan"), case, "random:5")
    assert code == 0 and "PASS" in out and "AddressSanitizer" not in out, out
