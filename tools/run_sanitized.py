#!/usr/bin/env python3
"""Run tests against the emulator built with AddressSanitizer or ThreadSanitizer.

    tools/run_sanitized.py --sanitizer address|thread [--no-build] [PYTEST ARGS...]
    tools/run_sanitized.py --sanitizer address|thread --build-only
    e.g. tools/run_sanitized.py --sanitizer thread tests/test_gemm.py -k emu

1. (Re)builds the sanitizer variant of the emulator extension, ``cnnext/_C_emu_asan*.so`` or
   ``_C_emu_tsan*.so`` (``CNNEXT_EMU_SANITIZE=... setup.py build_ext --inplace``; ninja
   recompiles only what changed, and nothing runs when the module is newer than its sources).
2. Runs pytest in a child Python with the sanitizer runtime preloaded and
   ``CNNEXT_EMULATOR=asan|tsan``, so ``torch.ops.cnnext_emu`` is the sanitized build. The CPU
   kernels (``torch.ops.cnnext``) and torch itself are not instrumented.
3. Fails on any sanitizer report, printing it, even when every test passed: a race or an
   out-of-bounds access is a bug whether or not the output happened to be right.

Exit status: 1 when a sanitizer reported (whatever pytest's status: a sanitizer that reported
sets the child's status to 66), else pytest's status; 2 when the build failed; 77 when the
compiler has no runtime for this sanitizer (0 with --build-only, which then only says so, and
tests/test_sanitizers.py skips, naming the reason).

What the environment does, and why (``sanitizer_env``):
- ``LD_PRELOAD=<libasan|libtsan> libstdc++``: the runtime must initialise before anything it
  intercepts, and Python is not linked against it. libstdc++ is preloaded too: ASan resolves the
  real ``__cxa_throw`` when it starts, and in a C program such as Python libstdc++ is not
  loaded yet, so the first C++ exception would trip an ASan CHECK.
- ``OMP_NUM_THREADS=1``: libgomp is not instrumented, so TSan cannot see its barriers; one CPU
  thread keeps torch's own parallel loops out of the picture. The emulator runs a launch on the
  calling thread anyway.
- ``ASAN_OPTIONS``: ``detect_leaks=0`` (CPython and torch keep allocations alive at exit on
  purpose); reports go to ``log_path`` files, not stderr, because pytest captures stderr and a
  report aborts the process before pytest can print it.
- ``TSAN_OPTIONS``: ``halt_on_error=0`` so one run lists every race; ``log_path`` as above.
  TSan from GCC 12 cannot map its shadow memory when the kernel randomises mmap with more than
  28 bits (``vm.mmap_rnd_bits``), so the child runs under ``setarch -R`` (no ASLR) when
  ``setarch`` works here.
- No suppressions are needed with torch 2.14.1 and GCC 12; should torch or CPython ever need
  one, it goes to ``tools/sanitizers/<asan|tsan>.supp`` (loaded when present) with a comment
  saying why. cnnext code is never suppressed.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANITIZERS = {"address": "asan", "thread": "tsan"}
# Any line with one of these in a sanitizer's output is a finding. ThreadSanitizer also reports
# misuse of its own annotations ("thread finished with ignores enabled"), hence the broad match.
MARKERS = (
    "ERROR: AddressSanitizer",
    "WARNING: ThreadSanitizer",
    "ThreadSanitizer:",
    "AddressSanitizer:",
    "LeakSanitizer:",
)
EXIT_NO_RUNTIME = 77


def cxx() -> str:
    return os.environ.get("CXX", "g++")


def runtime_library(sanitizer: str) -> Path | None:
    """The compiler's shared sanitizer runtime (libasan.so / libtsan.so), or None when the
    compiler has none (``-print-file-name`` then echoes the bare name back)."""
    name = f"lib{SANITIZERS[sanitizer]}.so"
    try:
        out = subprocess.run(
            [cxx(), f"-print-file-name={name}"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except FileNotFoundError:
        return None
    path = Path(out)
    return path.resolve() if path.is_absolute() and path.exists() else None


def libstdcxx() -> Path | None:
    out = subprocess.run(
        [cxx(), "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, check=False
    ).stdout.strip()
    path = Path(out)
    return path.resolve() if path.is_absolute() and path.exists() else None


def module_path(sanitizer: str) -> Path | None:
    """The built sanitizer variant of the emulator extension, if any."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = ROOT / "cnnext" / f"_C_emu_{SANITIZERS[sanitizer]}{suffix}"
    return path if path.exists() else None


def build_inputs() -> list[Path]:
    files = [ROOT / "setup.py", ROOT / "tests" / "emu" / "planted.cu"]
    files += [p for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    return files


def is_stale(sanitizer: str) -> bool:
    module = module_path(sanitizer)
    if module is None:
        return True
    built = module.stat().st_mtime
    return any(p.stat().st_mtime > built for p in build_inputs())


def build(sanitizer: str, quiet: bool = False) -> None:
    """Builds the sanitizer variant in place when a source is newer than it; ninja then
    recompiles only the changed translation units. Raises RuntimeError on a failed build."""
    if not is_stale(sanitizer):
        return
    env = dict(os.environ, CNNEXT_EMU_SANITIZE=sanitizer, CNNEXT_CUDA="0")
    env.setdefault("MAX_JOBS", "2")
    # The venv's ninja (a pip package) when no system ninja is on PATH: incremental builds.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    if not quiet:
        print(f"run_sanitized: building the {sanitizer} variant: {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0 or module_path(sanitizer) is None:
        tail = (result.stdout + result.stderr)[-6000:]
        raise RuntimeError(f"building the {sanitizer} variant of the emulator failed:\n{tail}")
    # ninja may find nothing to do and leave the module's time alone: mark it current.
    module = module_path(sanitizer)
    assert module is not None
    os.utime(module)


def suppressions(sanitizer: str) -> Path | None:
    path = ROOT / "tools" / "sanitizers" / f"{SANITIZERS[sanitizer]}.supp"
    return path if path.exists() else None


def setarch_prefix() -> list[str]:
    """``setarch <arch> -R`` when it works here (see the module docstring), else nothing."""
    tool = shutil.which("setarch")
    if tool is None:
        return []
    prefix = [tool, platform.machine(), "-R"]
    ok = subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0
    return prefix if ok else []


def command_prefix(sanitizer: str) -> list[str]:
    return setarch_prefix() if sanitizer == "thread" else []


def sanitizer_env(sanitizer: str, log_dir: Path, halt_on_error: bool | None = None) -> dict:
    """The child's environment: runtime preloaded, sanitized emulator selected, one thread,
    reports written under ``log_dir``. ``halt_on_error`` defaults to True for ASan (it cannot
    continue anyway) and False for TSan (one run lists every race)."""
    runtime = runtime_library(sanitizer)
    if runtime is None:
        raise FileNotFoundError(f"{cxx()} has no {sanitizer} sanitizer runtime")
    preload = [str(runtime)]
    stdcxx = libstdcxx()
    if stdcxx is not None:
        preload.append(str(stdcxx))
    if os.environ.get("LD_PRELOAD"):
        preload.append(os.environ["LD_PRELOAD"])
    short = SANITIZERS[sanitizer]
    if halt_on_error is None:
        halt_on_error = sanitizer == "address"
    options = {
        "halt_on_error": int(halt_on_error),
        "exitcode": 66,
        "log_path": str(log_dir / short),
    }
    if sanitizer == "address":
        options["detect_leaks"] = 0
    supp = suppressions(sanitizer)
    if supp is not None:
        options["suppressions"] = str(supp)
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=" ".join(preload),
        CNNEXT_EMULATOR=short,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    text = ":".join(f"{k}={v}" for k, v in options.items())
    # Extra options for a debugging session, e.g. CNNEXT_SANITIZER_OPTIONS=verbosity=1.
    extra = os.environ.get("CNNEXT_SANITIZER_OPTIONS")
    env[f"{short.upper()}_OPTIONS"] = f"{text}:{extra}" if extra else text
    return env


def reports(log_dir: Path, extra_text: str = "") -> list[str]:
    """Every sanitizer report written under ``log_dir`` (and in ``extra_text``, e.g. the
    child's stderr, for messages printed before the runtime read its options)."""
    found = []
    for path in sorted(glob.glob(str(log_dir / "*"))):
        text = Path(path).read_text(errors="replace")
        if any(m in text for m in MARKERS):
            found.append(text)
    if any(m in extra_text for m in MARKERS):
        found.append(extra_text)
    return found


def run(
    sanitizer: str,
    args: list[str],
    halt_on_error: bool | None = None,
    capture: bool = False,
    timeout: float | None = None,
) -> tuple[int, str, list[str]]:
    """Runs ``python ARGS`` under the sanitizer. Returns (exit status, output when captured,
    the sanitizer reports)."""
    with tempfile.TemporaryDirectory(prefix=f"cnnext-{SANITIZERS[sanitizer]}-") as tmp:
        log_dir = Path(tmp)
        env = sanitizer_env(sanitizer, log_dir, halt_on_error)
        cmd = [*command_prefix(sanitizer), sys.executable, *args]
        result = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            capture_output=capture,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = (result.stdout or "") + (result.stderr or "") if capture else ""
        return result.returncode, output, reports(log_dir, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s --sanitizer address|thread [--no-build] [PYTEST ARGS...]",
    )
    parser.add_argument("--sanitizer", required=True, choices=sorted(SANITIZERS))
    parser.add_argument("--no-build", action="store_true", help="use the module as built")
    parser.add_argument("--build-only", action="store_true", help="(re)build, run nothing")
    opts, pytest_args = parser.parse_known_args(argv)
    sanitizer = opts.sanitizer
    # SIGTERM (e.g. from `timeout`) as an exception, so subprocess.run kills the child too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    if runtime_library(sanitizer) is None:
        print(
            f"run_sanitized: {cxx()} has no {sanitizer} sanitizer runtime "
            f"(lib{SANITIZERS[sanitizer]}.so); install it (Debian: the compiler's "
            f"lib{SANITIZERS[sanitizer]}N package)",
            file=sys.stderr,
        )
        return 0 if opts.build_only else EXIT_NO_RUNTIME
    if not opts.no_build:
        try:
            build(sanitizer)
        except RuntimeError as e:
            print(f"run_sanitized: {e}", file=sys.stderr)
            return 2
    if opts.build_only:
        return 0
    if module_path(sanitizer) is None:
        print(f"run_sanitized: the {sanitizer} variant is not built", file=sys.stderr)
        return 2

    args = ["-m", "pytest", "-p", "no:cacheprovider", *pytest_args]
    code, _, found = run(sanitizer, args)
    for text in found:
        print(f"\n===== {sanitizer} sanitizer report =====\n{text}", file=sys.stderr)
    if found:
        print(
            f"run_sanitized: {len(found)} {sanitizer} sanitizer report file(s); "
            f"pytest exited with {code}",
            file=sys.stderr,
        )
        return 1
    if code != 0:
        print(
            f"run_sanitized: pytest under the {sanitizer} sanitizer exited with {code}",
            file=sys.stderr,
        )
        return code
    print(f"run_sanitized: no {sanitizer} sanitizer reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
