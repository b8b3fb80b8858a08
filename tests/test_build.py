"""The build itself: the real CUDA extension is compiled whenever torch has CUDA and nvcc is
present (so every .cu compiles and links under nvcc, even on a machine with no GPU), and the
emulator extension is always there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import cnnext
from cnnext import _build_info


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_emulator_extension_built() -> None:
    assert cnnext.EMULATOR_AVAILABLE, "cnnext._C_emu did not build"
    assert _build_info.EMULATOR_BUILT


def test_cuda_extension_built_when_nvcc_present() -> None:
    if os.environ.get("CNNEXT_CUDA") == "0":
        return  # explicitly disabled (make test-fast)
    if torch.version.cuda is not None and _nvcc_present():
        assert _build_info.CUDA_COMPILED, "nvcc is present but the CUDA kernels were not built"
        assert _build_info.CUDA_ARCHS, "no CUDA archs recorded"
        # The CUDA kernels are registered even with no GPU to run them.
        assert torch._C._dispatch_has_kernel_for_dispatch_key("cnnext::_gemm", "CUDA")


def test_extensions_link_the_shared_libstdcxx() -> None:
    """Each cnnext extension must use the process's libstdc++, not a static copy: with one (a
    g++ that links libstdc++ statically, as on one GPU image), the first TORCH_CHECK message
    crashed in std::ostream instead of raising. tools/gpu_run.sh picks the system g++."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return  # binutils missing: nothing to read the ELF headers with
    from cnnext import _C

    libs = [_C.__file__]
    if cnnext.EMULATOR_AVAILABLE:
        from cnnext import _C_emu

        libs.append(_C_emu.__file__)
    for lib in libs:
        dynamic = subprocess.run([readelf, "-d", lib], capture_output=True, text=True).stdout
        assert "libstdc++.so" in dynamic, f"{lib} does not link libstdc++ dynamically"


def test_python_m_cnnext_reports() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cnnext"], capture_output=True, text=True, check=True
    ).stdout
    assert "CUDA kernels compiled" in out and "emulator fibers" in out
    assert f"{torch.__version__}" in out


def test_every_schema_in_both_namespaces() -> None:
    """The emulator namespace gets its schemas from the same registry as cnnext."""
    ours = {
        s.name.split("::")[1]: str(s)
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("cnnext::")
    }
    emu = {
        s.name.split("::")[1]: str(s)
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("cnnext_emu::")
    }
    assert ours, "no cnnext ops registered"
    for name, schema in ours.items():
        assert name in emu, f"{name} missing from cnnext_emu"
        assert emu[name].replace("cnnext_emu::", "cnnext::") == schema


def _defined_dynamic_symbols(lib: str) -> list[str]:
    """The demangled names a shared library exports (``nm -D --defined-only``)."""
    out = subprocess.run(
        ["nm", "-D", "--defined-only", "-C", lib], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(" ", 2)[2] for line in out.splitlines() if line.count(" ") >= 2]


def test_emulator_exports_no_cnnext_symbol() -> None:
    """cnnext._C_emu (and its sanitizer builds) define the same cnnext:: functions as cnnext._C
    with other bodies; exported, the dynamic linker could bind one module's calls to the other's.
    Only the module's PyInit is exported."""
    if shutil.which("nm") is None or not cnnext.EMULATOR_AVAILABLE:
        pytest.skip("needs nm and the emulator build")
    from cnnext import _C_emu

    exported = _defined_dynamic_symbols(_C_emu.__file__)
    assert "PyInit__C_emu" in exported
    ours = [name for name in exported if "cnnext" in name]
    assert ours == [], ours
    for variant in ("asan", "tsan"):  # when tools/run_sanitized.py has built them
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        path = os.path.join(os.path.dirname(_C_emu.__file__), f"_C_emu_{variant}{suffix}")
        if os.path.exists(path):
            exported = _defined_dynamic_symbols(path)
            assert f"PyInit__C_emu_{variant}" in exported
            assert [name for name in exported if "cnnext" in name] == [], variant


RTLD_GLOBAL_SCRIPT = """
import os, sys
sys.setdlopenflags(os.RTLD_GLOBAL | os.RTLD_NOW)
import pytest
import torch
import torch.nn.functional as F
import cnnext
from cnnext import _C, _C_emu  # both in the global symbol scope
x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
expected = F.conv2d(x, w, padding=1, stride=(1, 2))
with cnnext.emulate_cuda("reverse"):
    got = cnnext.ops.conv2d(x, w, padding=1, stride=(1, 2), algo="im2col")
torch.testing.assert_close(got, expected)
got = cnnext.ops.conv2d(x, w, padding=1, stride=(1, 2), algo="im2col")
torch.testing.assert_close(got, expected)
print("ok")
"""


def test_both_extensions_under_rtld_global() -> None:
    """With RTLD_GLOBAL, the emulated im2col once resolved to cnnext._C's functions."""
    if not cnnext.EMULATOR_AVAILABLE:
        pytest.skip("needs the emulator build")
    out = subprocess.run(
        [sys.executable, "-c", RTLD_GLOBAL_SCRIPT],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(cnnext.__file__))),
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_families_include_only_common_and_their_own_headers() -> None:
    """Convolution families share one dispatch (csrc/common/conv_dispatch.h) rather than include
    each other: every op family's sources include csrc/common/ and their own folder only."""
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    wrong = []
    for family in ("conv2d_direct", "conv2d_im2col", "conv_bn_relu", "pool2d"):
        folder = os.path.join(csrc, family)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    if not line.startswith('#include "'):
                        continue
                    target = line.split('"')[1]
                    if target.split("/")[0] not in ("common", family):
                        wrong.append(f"{family}/{name}: {line.strip()}")
    assert not wrong, wrong
