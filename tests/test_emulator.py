"""The CUDA emulator holds itself to account: small kernels pass in every schedule order, and
planted-bug twins (a missing barrier, a missing atomic, a read of a neighbour's shared slot
without a barrier, divergent barriers, a deadlock, an invalid launch) are caught.

The kernels live in tests/emu/selftest.cu, outside the user-facing op namespaces; they are
compiled here with g++ into a small standalone program (no torch), once per variant."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cnnext

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "tests/emu/selftest.cu",
    ROOT / "csrc/emu/emu.cpp",
    ROOT / "csrc/emu/emu.h",
    ROOT / "csrc/emu/wmma.h",
    ROOT / "csrc/common/async_copy.cuh",
]
# c10's header-only Half and BFloat16 (the wmma fragments' element types); no torch library.
TORCH_INCLUDE = Path(torch.__file__).resolve().parent / "include"
SCHEDULES = ["forward", "reverse", "random:1", "random:2"]
CXX = os.environ.get("CXX", "g++")


def _has_boost() -> bool:
    probe = "#include <boost/context/detail/fcontext.hpp>\nint main(){return 0;}\n"
    r = subprocess.run(
        [CXX, "-x", "c++", "-", "-o", os.devnull, "-lboost_context"],
        input=probe.encode(),
        capture_output=True,
        check=False,
    )
    return r.returncode == 0


def build(variant: str) -> Path:
    """Compile the self-test program: variant is 'boost', 'ucontext', 'tsan' or 'asan'."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + variant.encode())
    out = ROOT / "build" / "emu_selftest" / f"{variant}-{digest.hexdigest()[:16]}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++20", "-O1", "-g", f"-I{ROOT / 'csrc'}", f"-I{TORCH_INCLUDE}"]
    libs: list[str] = []
    if variant in ("boost", "tsan", "asan") and _has_boost():
        flags.append("-DCNNEXT_EMU_BOOST")
        libs.append("-lboost_context")
    if variant == "boost" and "-DCNNEXT_EMU_BOOST" not in flags:
        pytest.skip("Boost.Context is not installed (apt-get install libboost-context-dev)")
    if variant == "tsan":
        flags += ["-fsanitize=thread", "-DCNNEXT_EMU_TSAN"]
    if variant == "asan":
        # Shared memory as plain statics, as in the ASan build of the extension (setup.py).
        flags += [
            "-fsanitize=address",
            "-fno-omit-frame-pointer",
            "-DCNNEXT_EMU_ASAN",
            "-DCNNEXT_EMU_PLAIN_SHARED",
        ]
    tmp = out.with_suffix(".tmp")
    cmd = [CXX, *flags, "-x", "c++", str(SOURCES[0]), "-x", "c++", str(SOURCES[1]), "-o", str(tmp)]
    result = subprocess.run(cmd + libs, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        if variant in ("tsan", "asan") and variant in result.stderr:
            pytest.skip(f"the compiler has no {variant} runtime: {result.stderr[-300:]}")
        raise AssertionError(f"building the emulator self-test failed:\n{result.stderr}")
    tmp.rename(out)
    return out


def _no_aslr() -> list[str]:
    """TSan from GCC 12 cannot map its shadow memory when mmap is randomised with more than 28
    bits (vm.mmap_rnd_bits); `setarch -R` turns randomisation off for the child."""
    prefix = [shutil.which("setarch") or "setarch", platform.machine(), "-R"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        ok = False
    return prefix if ok else []


def run(binary: Path, case: str, schedule: str = "forward") -> tuple[int, str]:
    env = dict(
        os.environ,
        TSAN_OPTIONS="halt_on_error=0 exitcode=66 report_bugs=1",
        ASAN_OPTIONS="detect_leaks=0:exitcode=66",
    )
    prefix = _no_aslr() if binary.name.startswith("tsan") else []
    r = subprocess.run(
        [*prefix, str(binary), case, schedule], capture_output=True, text=True, timeout=120, env=env
    )
    return r.returncode, r.stdout + r.stderr


pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")

GOOD = [
    "transpose",
    "matmul",
    "pipeline",
    "reduce",
    "histogram",
    "stencil",
    "shuffle_modes",
    "dynamic_smem_poisoned",
    "early_exit",
    # correct twins of the out-of-bounds kernels (tests/test_sanitizers.py), and a failed launch
    # followed by correct ones on the same thread
    "scale",
    "shared_shift",
    "dynamic_shift",
    "local_array",
    "error_then_launch",
    # tensor-core fragments: half, bfloat16 and tf32 (its rounding exactly), several operand layouts
    "wmma_half",
    "wmma_half_rr",
    "wmma_bf16",
    "wmma_tf32",
    "wmma_tf32_rounding",
    "wmma_ok",
    "async_copy",
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", GOOD)
@pytest.mark.parametrize("backend", ["boost", "ucontext"])
def test_correct_kernels_pass_in_every_order(backend: str, case: str, schedule: str) -> None:
    code, out = run(build(backend), case, schedule)
    assert code == 0 and "PASS" in out, out


# Planted bugs that corrupt results: each must FAIL in reverse or random order. The stencil twin
# also shows why several orders are needed: it passes in forward order.
MISSING_BARRIER = [
    "transpose_missing_barrier",
    "matmul_missing_barrier",
    "pipeline_missing_barrier",
    "reduce_missing_barrier",
    "stencil_missing_barrier",
]


@pytest.mark.parametrize("case", MISSING_BARRIER)
def test_planted_missing_barrier_is_caught(case: str) -> None:
    binary = build("boost" if _has_boost() else "ucontext")
    results = {s: run(binary, case, s) for s in ["reverse", "random:1"]}
    failed = [s for s, (code, out) in results.items() if code == 1 and "WRONG" in out]
    assert failed, f"{case} was not caught: {results}"


def test_neighbour_read_passes_forward_fails_reverse() -> None:
    binary = build("boost" if _has_boost() else "ucontext")
    assert run(binary, "stencil_missing_barrier", "forward")[0] == 0
    code, out = run(binary, "stencil_missing_barrier", "reverse")
    assert code == 1 and "WRONG" in out, out


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:3"])
def test_divergent_barriers_are_a_mismatch(schedule: str) -> None:
    code, out = run(build("boost" if _has_boost() else "ucontext"), "divergent_barrier", schedule)
    assert code == 2 and "barrier mismatch" in out and "selftest.cu" in out, out


def test_deadlock_is_reported() -> None:
    code, out = run(build("boost" if _has_boost() else "ucontext"), "deadlock")
    assert code == 2 and "deadlock" in out, out


def test_launch_limits_are_enforced() -> None:
    code, out = run(build("boost" if _has_boost() else "ucontext"), "too_many_threads")
    assert code == 2 and "invalid launch" in out and "1024" in out, out


def test_wmma_layout_assumption_fails_under_random_order() -> None:
    """Indexing an accumulator as if its layout were known passes with the fixed layout of the
    forward order and fails once random:SEED permutes it."""
    binary = build("boost" if _has_boost() else "ucontext")
    assert run(binary, "wmma_assumes_layout", "forward")[0] == 0
    for schedule in ["random:1", "random:2"]:
        code, out = run(binary, "wmma_assumes_layout", schedule)
        assert code == 1 and "WRONG" in out, out


@pytest.mark.parametrize("case", ["async_copy_missing_wait", "async_copy_lax_wait"])
@pytest.mark.parametrize("schedule", ["forward", "random:1"])
def test_cp_async_lands_only_at_its_wait(case: str, schedule: str) -> None:
    """No wait, or a wait that leaves the group still needed in flight: shared memory is stale."""
    code, out = run(build("boost" if _has_boost() else "ucontext"), case, schedule)
    assert code == 1 and "WRONG" in out, out


def test_cp_async_alignment_is_checked() -> None:
    code, out = run(build("boost" if _has_boost() else "ucontext"), "async_copy_misaligned")
    assert code == 2 and "cp.async at" in out and "aligned to 16 bytes" in out, out


WMMA_MISUSE = {
    "wmma_bad_ldm": "ldm must be a multiple of 8 elements (16 bytes) for 16-bit elements",
    "wmma_misaligned": "the pointer must be 256-bit (32-byte) aligned",
    "wmma_divergent_pointer": "must be the same in every lane of the warp",
    "wmma_lane_skips_mma": "lanes of warp 0 wait at different warp operations",
    "wmma_partial_warp": "needs all 32 lanes",
}


@pytest.mark.parametrize("case", sorted(WMMA_MISUSE))
def test_wmma_misuse_is_refused(case: str) -> None:
    for schedule in ["forward", "random:4"]:
        code, out = run(build("boost" if _has_boost() else "ucontext"), case, schedule)
        assert code == 2 and WMMA_MISUSE[case] in out, out
        assert "kernel wmma_misuse" in out and "selftest.cu:" in out, out


# Cooperative fibers make `x += 1` atomic, so a missing atomic can only be seen as a race:
# ThreadSanitizer, with fiber switches that do not synchronise and barriers that do.
RACES = {
    "histogram_missing_atomic": "histogram_kernel<false>",
    "stencil_missing_barrier": "stencil_kernel<false>",
    "matmul_missing_barrier": "matmul_kernel<false>",
    "pipeline_missing_barrier": "pipeline_kernel<false>",
}


@pytest.mark.parametrize("case", sorted(RACES))
def test_tsan_reports_planted_race(case: str) -> None:
    code, out = run(build("tsan"), case, "forward")
    assert "WARNING: ThreadSanitizer: data race" in out and RACES[case] in out, out
    assert code == 66, out


@pytest.mark.parametrize(
    "case",
    ["histogram", "stencil", "matmul", "pipeline", "reduce", "transpose", "error_then_launch"],
)
def test_tsan_is_quiet_on_correct_kernels(case: str) -> None:
    code, out = run(build("tsan"), case, "random:5")
    assert code == 0 and "PASS" in out and "ThreadSanitizer" not in out, out


@pytest.mark.parametrize("case", ["wmma_half", "wmma_tf32", "pipeline", "async_copy"])
@pytest.mark.parametrize("sanitizer", ["asan", "tsan"])
def test_sanitizers_are_quiet_on_new_primitives(sanitizer: str, case: str) -> None:
    code, out = run(build(sanitizer), case, "random:5")
    assert code == 0 and "PASS" in out and "Sanitizer" not in out, out


@pytest.mark.parametrize("case", ["divergent_barrier", "deadlock"])
def test_tsan_failed_launch_unwinds_cleanly(case: str) -> None:
    """Threads left at a barrier by a failed launch unwind and finish: TSan sees no fiber end
    inside the emulator's ignore region (it would abort the process) and no race."""
    code, out = run(build("tsan"), case, "reverse")
    assert code == 2 and "ERROR cnnext emulator" in out and "ThreadSanitizer" not in out, out


# ---- the Python switch --------------------------------------------------------------------------


def test_emulate_cuda_sets_and_restores_schedule() -> None:
    emu = torch.ops.cnnext_emu
    before = emu._get_schedule()
    assert not cnnext.emulating()
    with cnnext.emulate_cuda("random:42"):
        assert cnnext.emulating()
        assert emu._get_schedule() == "random:42"
        with cnnext.emulate_cuda("reverse"):
            assert emu._get_schedule() == "reverse"
        assert emu._get_schedule() == "random:42"
    assert not cnnext.emulating()
    assert emu._get_schedule() == before


def test_bad_schedule_is_rejected() -> None:
    with pytest.raises(RuntimeError, match="schedule must be"):
        with cnnext.emulate_cuda("sideways"):
            pass
    assert not cnnext.emulating()


def test_info_reports_emulator() -> None:
    report = cnnext.info(print_report=False)
    assert report["emulator built"] is True
    assert report["emulator fibers"] in ("boost.context", "ucontext")
    assert report["GPU visible"] == torch.cuda.is_available()


# ---- the launch recorder -------------------------------------------------------------------------


def test_record_max_pool2d_shows_its_kernel() -> None:
    x = torch.randn(2, 3, 9, 11)
    with cnnext.emulate_cuda("random:3", record=True) as log:
        cnnext.ops.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert log is not None
    assert [r.name for r in log] == ["max_pool2d_forward_kernel"]
    (k,) = log.kernels
    assert k.kind == "kernel" and k.full_name.startswith("(max_pool2d_forward_kernel<scalar_t")
    assert log.gemms == []
    out_elements = 2 * 3 * 5 * 6
    assert k.block is not None and k.grid is not None
    assert k.block[1:] == (1, 1) and k.grid[1:] == (1, 1) and k.smem == 0
    threads = k.block[0] * k.grid[0]
    assert out_elements <= threads < out_elements + k.block[0]
    table = str(log)
    assert "max_pool2d_forward_kernel" in table and f"{k.grid[0]}x1x1" in table


def test_record_im2col_conv_shows_im2col_and_gemm_shape() -> None:
    x, w = torch.randn(2, 3, 9, 11), torch.randn(5, 3, 3, 3)
    with cnnext.emulate_cuda(record=True) as log:
        y = cnnext.ops.conv2d(x, w, padding=1, algo="im2col")
    assert log is not None
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1))
    assert log.names() == ["im2col_kernel", "gemm_strided_batched"]
    # Row-major Y[C_out, P] = W[C_out, K] . col[K, P] as column-major Y^T = col^T W^T, batched
    # over the 2 samples: m = P = 9*11, n = C_out, k = C_in*3*3.
    (g,) = log.gemms
    assert (g.transa, g.transb, g.m, g.n, g.k, g.batch) == ("n", "n", 99, 5, 27, 2)
    assert "gemm_strided_batched" in str(log) and "n n 99 5 27 2" in str(log)


def test_record_backward_and_live_view() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with cnnext.emulate_cuda(record=True) as log:
        assert log is not None
        y = cnnext.ops.conv2d(x, w, padding=1, algo="im2col")
        forward = len(log)  # the log reads the emulator live inside the block
        y.sum().backward()
        assert len(log) > forward
    assert len(log) > forward and log.records[:forward] == log[:forward]
    assert "col2im_kernel" in log.names()


def test_record_false_records_nothing() -> None:
    x = torch.randn(1, 2, 6, 6)
    with cnnext.emulate_cuda("reverse") as nothing:
        cnnext.ops.max_pool2d(x, 2)
    assert nothing is None
    with cnnext.emulate_cuda(record=True) as log:
        pass
    assert log is not None and len(log) == 0 and str(log).startswith("#")
    # Outside any recording the emulator keeps nothing: a later recording starts empty.
    with cnnext.emulate_cuda():
        cnnext.ops.max_pool2d(x, 2)
    with cnnext.emulate_cuda(record=True) as log:
        cnnext.ops.avg_pool2d(x, 2)
    assert log is not None and log.names() == ["avg_pool2d_forward_kernel"]


def test_nested_recordings() -> None:
    x = torch.randn(1, 2, 6, 6)
    with cnnext.emulate_cuda(record=True) as outer:
        cnnext.ops.max_pool2d(x, 2)
        with cnnext.emulate_cuda("random:1", record=True) as inner:
            cnnext.ops.avg_pool2d(x, 2)
        with cnnext.emulate_cuda("reverse"):  # no log of its own; the outer one still records
            cnnext.ops.avg_pool2d(x, 3)
        cnnext.ops.max_pool2d(x, 3)
    assert outer is not None and inner is not None
    assert inner.names() == ["avg_pool2d_forward_kernel"]
    assert outer.names() == [
        "max_pool2d_forward_kernel",
        "avg_pool2d_forward_kernel",
        "avg_pool2d_forward_kernel",
        "max_pool2d_forward_kernel",
    ]


def test_exception_restores_recording_state() -> None:
    x = torch.randn(1, 2, 6, 6)
    emu = torch.ops.cnnext_emu
    before = emu._get_schedule()
    with pytest.raises(RuntimeError, match="boom"):
        with cnnext.emulate_cuda("random:9", record=True) as log:
            cnnext.ops.max_pool2d(x, 2)
            raise RuntimeError("boom")
    assert log is not None and log.names() == ["max_pool2d_forward_kernel"]
    assert not cnnext.emulating() and emu._get_schedule() == before
    # A failing op inside nested recordings: both close, and nothing stays open.
    with pytest.raises(RuntimeError):
        with cnnext.emulate_cuda(record=True) as outer:
            with cnnext.emulate_cuda(record=True):
                cnnext.ops.max_pool2d(x, 2)
                cnnext.ops.max_pool2d(x, 0)  # invalid kernel size
    assert outer is not None and outer.names() == ["max_pool2d_forward_kernel"]
    token = emu._record_start()
    assert token == 0, "a recording was left open"
    emu._record_stop(token)


def test_short_kernel_name() -> None:
    from cnnext._backend import short_kernel_name

    assert (
        short_kernel_name("(conv2d_direct_tiled_kernel<scalar_t, 4, kTiledRW, TRANSPOSED, E>)")
        == "conv2d_direct_tiled_kernel"
    )
    assert short_kernel_name("cnnext::scale_kernel") == "scale_kernel"
    assert short_kernel_name("plain") == "plain"
