"""Clean installs: a wheel (or a non-editable ``pip install .``) of a working checkout carries
the extension modules of that build, ``cnnext._C`` and ``cnnext._C_emu``, and nothing else.

A wheel is packed from setuptools' build folder (``build/lib.<platform>-<tag>``): build_py and
build_ext write there, and whatever an earlier build left there goes in too. The sanitizer
builds of the emulator (``_C_emu_asan``, ``_C_emu_tsan``, 38 MB) used to be left there by
``make test``. Building a real wheel recompiles everything (minutes), so this test runs the two
steps that decide its contents, without a compiler: setup.py's extension list for a normal build,
and the build_py step (setup.py's ``BuildPy``) on a copy of the checkout whose build folder holds
stale modules as ``make test`` leaves them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what setup.py reads (no extension modules, no build folder)."""
    if not (ROOT / "setup.py").exists():
        pytest.skip("not a source checkout")
    root = tmp_path_factory.mktemp("checkout")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, root / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_build_info.py")
    for name in ("cnnext", "csrc"):
        shutil.copytree(ROOT / name, root / name, ignore=ignore)
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ, CNNEXT_CUDA="0")
    env.pop("CNNEXT_EMU_SANITIZE", None)
    env.pop("CNNEXT_EMU", None)
    return env


def test_normal_build_makes_only_C_and_C_emu(checkout: Path) -> None:
    code = (
        "import setuptools\nfrom distutils.core import run_setup\n"
        "dist = run_setup('setup.py', stop_after='init')\n"
        "print(sorted(e.name for e in dist.ext_modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=checkout, env=_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['cnnext._C', 'cnnext._C_emu']"


def test_build_py_drops_stale_extension_modules(checkout: Path) -> None:
    plat = f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    build_lib = checkout / "build" / plat / "cnnext"
    build_lib.mkdir(parents=True)
    modules = ("_C", "_C_emu", "_C_emu_asan", "_C_emu_tsan")
    for name in modules:
        (build_lib / f"{name}{SUFFIX}").write_bytes(b"\0")
        (checkout / "cnnext" / f"{name}{SUFFIX}").write_bytes(b"\0")
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py"],
        cwd=checkout,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    built = sorted(p.name for p in build_lib.iterdir() if p.name.endswith(SUFFIX))
    assert built == [f"_C{SUFFIX}", f"_C_emu{SUFFIX}"]
    assert (build_lib / "ops.py").exists()  # build_py itself ran
    # The source tree keeps its sanitizer modules: tests/test_sanitizers.py loads them.
    kept = sorted(p.name for p in (checkout / "cnnext").iterdir() if p.name.endswith(SUFFIX))
    assert kept == sorted(f"{name}{SUFFIX}" for name in modules)


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_sanitizer_builds_stay_out_of_build_lib(checkout: Path, sanitizer: str) -> None:
    """The sanitizer builds (``tools/run_sanitized.py``: ``build_ext --inplace``) build in
    build/lib-<sanitizer>, never in the folder a wheel is packed from."""
    code = (
        "import setuptools\nfrom distutils.core import run_setup\n"
        "dist = run_setup('setup.py', stop_after='commandline')\n"
        "cmd = dist.get_command_obj('build_ext')\n"
        "cmd.ensure_finalized()\n"
        "print(cmd.build_lib)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "build_ext", "--inplace"],
        cwd=checkout,
        env={**_env(), "CNNEXT_EMU_SANITIZE": sanitizer},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    build_lib = Path(out.stdout.strip().splitlines()[-1])
    assert build_lib == checkout / "build" / f"lib-{sanitizer}"
