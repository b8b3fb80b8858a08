"""Build cnnext's extensions.

- ``cnnext._C``: CPU kernels, plus the CUDA kernels when torch has CUDA and nvcc is found
  (``CNNEXT_CUDA=0|1`` overrides the detection).
- ``cnnext._C_emu``: the same ``.cu`` sources compiled by g++ against the CPU emulator of the
  CUDA execution model (``csrc/emu``), registered for CPU tensors in the ``cnnext_emu``
  namespace. It needs neither nvcc nor a CUDA torch. ``CNNEXT_EMU=0`` skips it.
- ``CNNEXT_EMU_SANITIZE=address|thread`` builds ``cnnext._C_emu_asan`` / ``_C_emu_tsan``, the
  emulator under AddressSanitizer or ThreadSanitizer, beside the normal one (tests only; load
  it with ``CNNEXT_EMULATOR=asan|tsan`` and the sanitizer runtime preloaded). They are built in
  build/lib-address / build/lib-thread, and a wheel or a non-editable install carries only
  ``_C`` and ``_C_emu`` (``BuildPy`` drops other extension modules from build/lib).

Install with ``pip install --no-build-isolation -e .`` so the installed torch is used.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
VERSION = "0.1.0"

# CUDA_HOME must be known before torch.utils.cpp_extension is imported: it resolves it then,
# and the auto-detected /usr/local is wrong on machines where nvcc is a symlink there.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    forced = env_flag("CNNEXT_CUDA")
    found = torch.version.cuda is not None and CUDA_HOME is not None
    found = found and os.path.exists(os.path.join(CUDA_HOME or "", "bin", "nvcc"))
    if forced is True and not found:
        sys.exit("CNNEXT_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    return found if forced is None else forced


def nvidia_include_dirs() -> list[str]:
    """Headers of the pip-installed CUDA libraries (cuBLAS, cuSPARSE, ...), which
    ATen/cuda/CUDAContext.h includes."""
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    dirs: list[str] = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def cublas_link_args() -> list[str]:
    """Link cuBLAS by file name: the pip wheels ship libcublas.so.N without the unversioned
    symlink. At run time torch has already loaded the same library, so the soname resolves."""
    dirs = [os.path.join(CUDA_HOME or "", "lib64")]
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "*", "lib")))
    except ImportError:
        pass
    for d in dirs:
        for name in ("libcublas.so", *sorted(glob.glob(os.path.join(d, "libcublas.so.*")))):
            path = os.path.join(d, os.path.basename(name))
            if os.path.exists(path):
                return [f"-L{d}", f"-l:{os.path.basename(path)}"]
    sys.exit("cnnext: CUDA build needs cuBLAS, but libcublas.so was not found")


def cuda_arch_list() -> str:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # With no GPU visible torch cannot pick the archs itself (it raises IndexError).
        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "native")


def has_boost_context() -> bool:
    cxx = os.environ.get("CXX", "c++")
    probe = "#include <boost/context/detail/fcontext.hpp>\nint main() { return 0; }\n"
    try:
        result = subprocess.run(
            [cxx, "-x", "c++", "-", "-o", os.devnull, "-lboost_context"],
            input=probe.encode(),
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        return False
    return result.returncode == 0


def op_dirs() -> list[str]:
    return sorted(
        d
        for d in os.listdir(CSRC)
        if os.path.isdir(os.path.join(CSRC, d)) and d not in ("common", "emu")
    )


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def emu_sources(sanitize: str) -> list[str]:
    """g++ compiles .cu files only through a .cpp wrapper; the wrappers also give the emulator
    build its own object files, apart from those of cnnext._C."""
    out_dir = ROOT / "build" / (f"emu_src_{sanitize}" if sanitize else "emu_src")
    units = {"cnnext_emu.cpp": "cnnext.cpp", "params.cpp": "common/params.cpp"}
    units["autocast_emu.cpp"] = "autocast.cpp"
    units["emu.cpp"] = "emu/emu.cpp"
    units["control.cpp"] = "emu/control.cpp"
    for op in op_dirs():
        if os.path.exists(os.path.join(CSRC, op, "cuda.cu")):
            units[f"{op}_cuda.cpp"] = f"{op}/cuda.cu"
    texts = {name: f'#include "{target}"\n' for name, target in units.items()}
    if sanitize:
        # Planted-bug kernels (torch.ops.cnnext_planted) that tests/test_sanitizers.py must see
        # reported: in the sanitizer builds only, never in cnnext or cnnext_emu.
        texts["planted.cpp"] = '#include "../../tests/emu/planted.cu"\n'
        # cnnext.cpp defines PyInit__C_emu; Python imports _C_emu_asan through PyInit__C_emu_asan.
        init = f"PyInit__C_emu{SANITIZER_SUFFIX[sanitize]}"
        texts["module_alias.cpp"] = (
            "#include <Python.h>\n"
            'extern "C" PyMODINIT_FUNC PyInit__C_emu(void);\n'
            f'extern "C" PyMODINIT_FUNC {init}(void) {{ return PyInit__C_emu(); }}\n'
        )
    sources = []
    for name, text in texts.items():
        write_if_changed(out_dir / name, text)
        sources.append(os.path.relpath(out_dir / name, ROOT))
    return sources


def build_info(cuda: bool, archs: str, emu: bool, fiber: str) -> None:
    text = (
        "# Written by setup.py at build time.\n"
        f"VERSION = {VERSION!r}\n"
        f"CUDA_COMPILED = {cuda!r}\n"
        f"CUDA_ARCHS = {archs.split(';') if cuda else []!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if cuda else None!r}\n"
        f"EMULATOR_BUILT = {emu!r}\n"
        f"EMULATOR_FIBERS = {fiber!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )
    write_if_changed(ROOT / "cnnext" / "_build_info.py", text)


SANITIZER_SUFFIX = {"address": "_asan", "thread": "_tsan"}


def emu_extension(boost: bool, sanitize: str) -> CppExtension:
    """The emulator extension; with ``sanitize`` ("address" or "thread") its sanitizer build
    ``cnnext._C_emu_asan`` / ``_C_emu_tsan``, a separate module beside the normal one (selected
    at import time by ``CNNEXT_EMULATOR=asan|tsan``), so the normal emulator stays fast."""
    flags = ["-O2", "-fopenmp", "-DCNNEXT_CUDA_EMULATION", "-Wall", "-Wno-unused-function"]
    # Hidden by default: the emulator defines the same cnnext:: functions as cnnext._C (the .cu
    # sources under other bodies), and with RTLD_GLOBAL the dynamic linker would bind one
    # module's calls to the other's. Only PyInit_* (PyMODINIT_FUNC) stays exported.
    flags.append("-fvisibility=hidden")
    link = ["-fopenmp"]
    if boost:
        flags.append("-DCNNEXT_EMU_BOOST")
    if sanitize == "address":
        # Plain static shared memory, so ASan's global redzones catch shared-array overflows.
        flags += ["-fsanitize=address", "-DCNNEXT_EMU_ASAN", "-DCNNEXT_EMU_PLAIN_SHARED"]
    elif sanitize == "thread":
        flags += ["-fsanitize=thread", "-DCNNEXT_EMU_TSAN"]
    if sanitize:
        flags += ["-O1", "-g", "-fno-omit-frame-pointer"]
        link.append(f"-fsanitize={sanitize}")
    suffix = SANITIZER_SUFFIX.get(sanitize, "")
    return CppExtension(
        f"cnnext._C_emu{suffix}",
        emu_sources(sanitize),
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": flags},
        extra_link_args=link,
        libraries=["boost_context"] if boost else [],
    )


def extensions() -> list:
    sanitize = os.environ.get("CNNEXT_EMU_SANITIZE", "")
    if sanitize:
        # Only the sanitizer module: _C and _C_emu (maybe built with nvcc) stay as they are.
        if sanitize not in SANITIZER_SUFFIX:
            sys.exit(f"CNNEXT_EMU_SANITIZE must be 'address' or 'thread', got {sanitize!r}")
        if env_flag("CNNEXT_EMU") is False:
            sys.exit("CNNEXT_EMU_SANITIZE needs the emulator (CNNEXT_EMU is 0)")
        return [emu_extension(has_boost_context(), sanitize)]
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    common = {
        "include_dirs": [str(ROOT / CSRC)],
        "extra_link_args": ["-fopenmp"],
    }
    ops = op_dirs()
    # fast_call.cpp (cnnext._C.FastOp) serves both namespaces from _C: the emulator has no copy.
    cpu_sources = [f"{CSRC}/cnnext.cpp", f"{CSRC}/fast_call.cpp", f"{CSRC}/autocast.cpp"]
    cpu_sources += [f"{CSRC}/common/params.cpp"]
    # The CPU side of the convolution dispatch (its CUDA side is inline in conv_dispatch.h).
    cpu_sources.append(f"{CSRC}/common/conv_dispatch.cpp")
    cpu_sources += [f"{CSRC}/{op}/cpu.cpp" for op in ops if os.path.exists(f"{CSRC}/{op}/cpu.cpp")]
    exts = []
    cuda = want_cuda()
    archs = ""
    if cuda:
        archs = cuda_arch_list()
        cuda_sources = [
            f"{CSRC}/{op}/cuda.cu" for op in ops if os.path.exists(f"{CSRC}/{op}/cuda.cu")
        ]
        exts.append(
            CUDAExtension(
                "cnnext._C",
                cpu_sources + cuda_sources,
                include_dirs=common["include_dirs"] + nvidia_include_dirs(),
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
                },
                extra_link_args=common["extra_link_args"] + cublas_link_args(),
            )
        )
    else:
        exts.append(
            CppExtension("cnnext._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, **common)
        )

    emu = env_flag("CNNEXT_EMU") is not False
    fiber = ""
    if emu:
        boost = has_boost_context()
        fiber = "boost.context" if boost else "ucontext"
        exts.append(emu_extension(boost, ""))
    build_info(cuda, archs, emu, fiber)
    return exts


class Build(BuildExtension):
    """BuildExtension with ninja; MAX_JOBS bounds the parallel compiles. Objects live in a
    persistent build/temp* folder (pip's editable install would use a fresh temp folder), so
    ninja rebuilds only what changed."""

    def finalize_options(self) -> None:  # noqa: D102
        tag = os.environ.get("CNNEXT_EMU_SANITIZE", "")
        if self.build_temp is None:
            self.build_temp = str(ROOT / "build" / (f"temp-{tag}" if tag else "temp"))
        if tag and self.build_lib is None:
            # Not build/lib: what is there goes into a wheel (see BuildPy).
            self.build_lib = str(ROOT / "build" / f"lib-{tag}")
        super().finalize_options()

    def run(self) -> None:  # noqa: D102
        if shutil.which("ninja") is None:
            self.use_ninja = False
        super().run()


def extension_file(name: str) -> str:
    """``cnnext._C`` -> ``cnnext/_C.cpython-311-x86_64-linux-gnu.so``."""
    return name.replace(".", "/") + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


class BuildPy(build_py):
    """build_py that also removes, from the build folder a wheel is packed from, the extension
    modules this build does not make: the sanitizer builds of the emulator (38 MB) that older
    checkouts left in build/lib, or a _C_emu from a build with the emulator on. A wheel or a
    non-editable ``pip install .`` then carries exactly the ext_modules of this build."""

    def run(self) -> None:  # noqa: D102
        super().run()
        build_lib = Path(self.build_lib).resolve()
        if getattr(self, "editable_mode", False) or build_lib == ROOT:
            return  # the source tree itself: its sanitizer modules serve the tests
        for stale in stale_extension_files(build_lib, self.distribution.ext_modules or []):
            stale.unlink()


def stale_extension_files(build_lib: Path, ext_modules: list) -> list[Path]:
    """Extension modules under ``build_lib/cnnext`` that ``ext_modules`` does not build."""
    keep = {build_lib / extension_file(ext.name) for ext in ext_modules}
    suffixes = (".so", ".pyd", ".dylib")
    found = (p for p in (build_lib / "cnnext").glob("*") if p.name.endswith(suffixes))
    return sorted(p for p in found if p not in keep)


setup(
    name="cnnext",
    version=VERSION,
    description="Verified CNN layer kernels for PyTorch: direct and im2col convolution, "
    "pooling, fused Conv+BN+ReLU, on CPU and CUDA",
    packages=find_packages(include=["cnnext", "cnnext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": Build.with_options(use_ninja=True), "build_py": BuildPy},
    python_requires=">=3.10",
    install_requires=["torch"],
    zip_safe=False,
)
