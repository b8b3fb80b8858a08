"""GPU facts of the nvcc build, read from its machine code without a GPU (issue 16).

``cuobjdump`` (shipped in the torch wheels' triton package) reads the cubins inside
``cnnext._C``: ``-res-usage`` gives each kernel's registers, shared memory, stack frame and local
memory, ``-elf`` its symbol table (the subroutines nvcc placed in each kernel's text section) and
``-sass`` the instructions. Gates:

- every kernel: no local memory (no spills, no stack frame);
- every fp32 kernel whose name contains ``implicit_gemm`` (the float instantiation, not half,
  bfloat16 or double) but not ``implicit_gemm_tc_`` (the tensor-core family, gated below): no
  call to a 64-bit integer division or remainder routine (nvcc emits
  ``__cuda_sm20_{div,rem}_{s,u}64`` subroutines for them; 32-bit division is inlined), at least
  one 128-bit shared load (``LDS.128``), no ``LDL``/``STL``, and a static FFMA : LDS instruction
  ratio of at least 8 (register blocking: each shared value feeds many multiply-adds);
- every half or bfloat16 kernel whose name contains ``implicit_gemm``: at least one tensor-core
  multiply (``HMMA``), no 64-bit division and no spills, except the SIMT kernels named in
  ``SIMT_REDUCED`` (what the tensor-core path does not cover yet, or falls back to), which the
  test lists as such;
- every float kernel whose name contains ``implicit_gemm_tc_`` (TF32): at least one TF32
  tensor-core multiply (``HMMA.*.TF32``), no 64-bit division and no spills.

Each arch of the fat binary (sm_80, sm_90, ...) is checked on its own. The tests skip with a
reason when ``cnnext._C`` has no device code (built without nvcc) or a tool is missing. Planted
kernels compiled here with nvcc check that the gates flag what they should. Set
``CNNEXT_SASS_LIBRARY`` to read another build's ``_C``; run this file as a script to print the
table for any kernels (``python tests/test_sass.py --pattern tiled``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GEMM_MARK = "implicit_gemm"
TC_MARK = "implicit_gemm_tc_"
MIN_FFMA_PER_LDS = 8.0
# nvcc's 64-bit integer division and remainder subroutines (sm20 is the ABI's name, not an arch).
DIV64 = re.compile(r"__cuda_sm\d+_(?:div|rem)_[su]64")
NOT_FP32 = re.compile(r"\b(?:double|c10::Half|c10::BFloat16|__half|__nv_bfloat16|half)\b")
FP32 = re.compile(r"\bfloat\b")
REDUCED = re.compile(r"\b(?:c10::Half|c10::BFloat16|__half|__nv_bfloat16)\b")
# Half/bfloat16 implicit-GEMM kernels that run on CUDA cores, and why (issue 17): the SIMT family
# is the fallback of the tensor-core kernels (conv2d_implicit_gemm_tc_*) where C_in / groups is
# not a multiple of 8, or where a SIMT tile is asked for by name.
_FALLBACK = "SIMT fallback: C_in/groups not a multiple of 8, or a SIMT tile named"
SIMT_REDUCED = {
    "conv2d_implicit_gemm_fprop_kernel": _FALLBACK,
    "conv2d_implicit_gemm_dgrad_kernel": _FALLBACK,
    "conv2d_implicit_gemm_wgrad_kernel": _FALLBACK,
}


def _tool(name: str) -> str | None:
    """``name`` from triton's bundled CUDA tools, else ``$CUDA_HOME/bin``, else PATH."""
    spec = importlib.util.find_spec("triton")
    candidates = []
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append(Path(cuda_home) / "bin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def _run(*args: str) -> str:
    """stdout of a tool (cuobjdump warns on stderr for every ELF that lacks a --function)."""
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc.stdout


@dataclass
class Kernel:
    """One kernel in one arch's cubin. Counts are static (instructions in the code)."""

    arch: str
    mangled: str
    name: str = ""
    registers: int = 0
    shared: int = 0
    stack: int = 0
    local: int = 0
    div64_routines: set[str] = field(default_factory=set)  # in its text section
    div64_calls: int = -1  # -1: instructions not read
    ffma: int = 0
    lds: int = 0
    lds128: int = 0
    local_ops: int = 0  # LDL + STL
    hmma: int = 0
    hmma_tf32: int = 0  # HMMA with TF32 operands

    @property
    def tc(self) -> bool:
        """A kernel of the tensor-core family (implicit_gemm_tc.cuh)."""
        return TC_MARK in self.name

    @property
    def fp32(self) -> bool:
        return bool(FP32.search(self.name)) and not NOT_FP32.search(self.name)

    @property
    def reduced(self) -> bool:
        return bool(REDUCED.search(self.name))

    @property
    def gemm(self) -> bool:
        return GEMM_MARK in self.name

    @property
    def ratio(self) -> float:
        return self.ffma / self.lds if self.lds else float("inf") if self.ffma else 0.0


def _blocks(text: str) -> Iterable[tuple[str, str]]:
    """``(arch, text)`` per ELF in a cuobjdump listing (a fat binary holds one per source file
    and arch; a bare cubin is one block)."""
    parts = re.split(r"^Fatbin elf code:\s*$", text, flags=re.M)
    for part in parts:
        arch = re.search(r"^arch = (sm_\d+a?)|code for (sm_\d+a?)|\bsm=(\d+a?)\b", part, re.M)
        if arch is None:
            continue
        name = next(g for g in arch.groups() if g)
        yield (name if name.startswith("sm_") else f"sm_{name}"), part


def parse_resource_usage(text: str) -> dict[tuple[str, str], Kernel]:
    """``cuobjdump -res-usage``: ``Function NAME:`` then ``REG:n STACK:n SHARED:n LOCAL:n ...``."""
    kernels = {}
    pattern = re.compile(r"^\s*Function ([^\s:]+):\s*\n\s*(.*)$", re.M)
    for arch, block in _blocks(text):
        for name, usage in pattern.findall(block):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage))
            kernels[(arch, name)] = Kernel(
                arch,
                name,
                registers=int(fields.get("REG", 0)),
                shared=int(fields.get("SHARED", 0)),
                stack=int(fields.get("STACK", 0)),
                local=int(fields.get("LOCAL", 0)),
            )
    return kernels


def parse_div64_symbols(text: str) -> dict[tuple[str, str], dict[int, str]]:
    """``cuobjdump -elf``: per (arch, kernel), the 64-bit division routines nvcc placed in the
    kernel's text section, as ``{offset: routine}`` (CALL targets are offsets in that section)."""
    found: dict[tuple[str, str], dict[int, str]] = {}
    section_row = re.compile(r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+[0-9a-f]+\s+.*\s(\.\S+)$")
    symbol_row = re.compile(r"^\s*(?:0x)?[0-9a-f]+\s+(\S+)\s+\S+\s+\S+\s+\S+\s+(\S+)\s+(\S+)$")
    for arch, block in _blocks(text):
        sections: dict[int, str] = {}
        state = ""
        for line in block.splitlines():
            if line.startswith("Sections:") or line.startswith(".section"):
                state = "sections" if line.startswith("S") else "symtab" * (".symtab" in line)
            elif state == "sections":
                row = section_row.match(line)
                if row:
                    sections[int(row.group(1), 16)] = row.group(2)
            elif state == "symtab" and DIV64.search(line):
                row = symbol_row.match(line)
                if row:
                    value, shndx, symbol = row.groups()
                    text_section = sections.get(int(shndx, 16), "")
                    if text_section.startswith(".text."):
                        kernel = text_section.removeprefix(".text.")
                        routine = DIV64.search(symbol).group(0)  # type: ignore[union-attr]
                        found.setdefault((arch, kernel), {})[int(value, 16)] = routine
    return found


SASS_ROW = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> dict[tuple[str, str], dict]:
    """``cuobjdump -sass``: per (arch, kernel) the opcode counts and the CALL targets."""
    out: dict[tuple[str, str], dict] = {}
    for arch, block in _blocks(text):
        current = None
        for line in block.splitlines():
            head = re.match(r"^\s*Function : (\S+)", line)
            if head:
                current = out.setdefault(
                    (arch, head.group(1)),
                    {
                        "ffma": 0,
                        "lds": 0,
                        "lds128": 0,
                        "local_ops": 0,
                        "hmma": 0,
                        "hmma_tf32": 0,
                        "calls": [],
                    },
                )
                continue
            row = SASS_ROW.search(line) if current is not None else None
            if row is None:
                continue
            opcode, operands = row.group(2), row.group(3)
            base, *mods = opcode.split(".")
            if base == "FFMA":
                current["ffma"] += 1
            elif base == "LDS":
                current["lds"] += 1
                current["lds128"] += "128" in mods
            elif base in ("LDL", "STL"):
                current["local_ops"] += 1
            elif base == "HMMA":
                current["hmma"] += 1
                current["hmma_tf32"] += "TF32" in mods
            elif base == "CALL":
                target = re.search(r"0x([0-9a-f]+)", operands)
                if target:
                    current["calls"].append(int(target.group(1), 16))
    return out


def demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(dict.fromkeys(names))
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, proc.stdout.splitlines(), strict=True))


def has_device_code(cuobjdump: str, path: str) -> bool:
    proc = subprocess.run([cuobjdump, "-lelf", path], capture_output=True, text=True)
    return proc.returncode == 0 and "ELF file" in proc.stdout


@functools.cache
def inspect(path: str, sass_pattern: str = GEMM_MARK, fp32_only: bool = True) -> list[Kernel]:
    """Every kernel of every arch in ``path`` (a shared library, fat binary or cubin), with
    instruction counts for those whose demangled name contains ``sass_pattern`` (fp32 only if
    ``fp32_only``). Cached: cuobjdump runs once per library and pattern per session."""
    cuobjdump = _tool("cuobjdump")
    assert cuobjdump is not None
    kernels = parse_resource_usage(_run(cuobjdump, "-res-usage", path))
    names = demangle(k.mangled for k in kernels.values())
    for kernel in kernels.values():
        kernel.name = names[kernel.mangled]
    div64 = parse_div64_symbols(_run(cuobjdump, "-elf", path))
    for key, routines in div64.items():
        if key in kernels:
            kernels[key].div64_routines = set(routines.values())
    wanted = {
        k.mangled
        for k in kernels.values()
        if re.search(sass_pattern, k.name) and (k.fp32 or not fp32_only)
    }
    if wanted:
        sass = parse_sass(_run(cuobjdump, "-sass", "-fun", ",".join(sorted(wanted)), path))
        for key, facts in sass.items():
            kernel = kernels.get(key)
            if kernel is None:
                continue
            kernel.ffma, kernel.lds = facts["ffma"], facts["lds"]
            kernel.lds128, kernel.local_ops = facts["lds128"], facts["local_ops"]
            kernel.hmma, kernel.hmma_tf32 = facts["hmma"], facts["hmma_tf32"]
            routines = div64.get(key, {})
            kernel.div64_calls = sum(target in routines for target in facts["calls"])
    return sorted(kernels.values(), key=lambda k: (k.arch, k.name))


def local_memory_failures(kernels: Iterable[Kernel]) -> list[str]:
    return [
        f"{k.arch} {k.name}: local memory {k.local} B, stack {k.stack} B, LDL/STL {k.local_ops}"
        for k in kernels
        if k.local or k.stack or k.local_ops
    ]


def gemm_failures(kernels: Iterable[Kernel]) -> list[str]:
    """The implicit-GEMM gates on kernels whose instructions were read."""
    failures = []
    for k in kernels:
        where = f"{k.arch} {k.name}"
        if k.div64_calls != 0 or k.div64_routines:
            routines = ", ".join(sorted(k.div64_routines))
            failures.append(f"{where}: {k.div64_calls} call(s) to 64-bit division ({routines})")
        if k.lds128 == 0:
            failures.append(f"{where}: no 128-bit shared load (LDS.128)")
        if k.ratio < MIN_FFMA_PER_LDS:
            failures.append(f"{where}: FFMA/LDS = {k.ffma}/{k.lds} = {k.ratio:.1f} < 8")
        if k.local_ops:
            failures.append(f"{where}: {k.local_ops} local loads/stores (spills)")
    return failures


def simt_reason(kernel: Kernel) -> str | None:
    """Why a half/bfloat16 implicit-GEMM kernel may run on CUDA cores, or None."""
    found = (why for name, why in SIMT_REDUCED.items() if re.search(rf"\b{name}<", kernel.name))
    return next(found, None)


def tensor_core_failures(kernels: Iterable[Kernel]) -> list[str]:
    """The tensor-core gates on half/bfloat16 implicit-GEMM kernels and on float tensor-core
    (TF32) kernels whose instructions were read."""
    failures = []
    for k in kernels:
        where = f"{k.arch} {k.name}"
        if k.hmma == 0 and simt_reason(k) is None:
            failures.append(f"{where}: no tensor-core multiply (HMMA)")
        if k.fp32 and k.hmma_tf32 == 0:
            failures.append(f"{where}: no TF32 tensor-core multiply (HMMA.*.TF32)")
        if k.div64_calls != 0 or k.div64_routines:
            failures.append(f"{where}: {k.div64_calls} call(s) to 64-bit division")
        if k.local_ops:
            failures.append(f"{where}: {k.local_ops} local loads/stores (spills)")
    return failures


def table(kernels: Iterable[Kernel]) -> str:
    lines = [
        f"{'arch':<6} {'regs':>4} {'shared':>6} {'FFMA':>5} {'LDS':>4} {'.128':>4} "
        f"{'ratio':>6} {'div64':>5} {'HMMA':>5} {'TF32':>5}  kernel"
    ]
    for k in kernels:
        lines.append(
            f"{k.arch:<6} {k.registers:>4} {k.shared:>6} {k.ffma:>5} {k.lds:>4} {k.lds128:>4} "
            f"{k.ratio:>6.1f} {k.div64_calls:>5} {k.hmma:>5} {k.hmma_tf32:>5}  {k.name}"
        )
    return "\n".join(lines)


# ---- the package's own build --------------------------------------------------------------------


def _library() -> str:
    path = os.environ.get("CNNEXT_SASS_LIBRARY")
    if path:
        return path
    spec = importlib.util.find_spec("cnnext._C")
    if spec is None or spec.origin is None:
        pytest.skip("cnnext._C is not built")
    return spec.origin


@pytest.fixture(scope="module")
def build_kernels() -> list[Kernel]:
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (triton's backends/nvidia/bin, $CUDA_HOME/bin, PATH)")
    library = _library()
    if not has_device_code(cuobjdump, library):
        pytest.skip(f"{library} has no CUDA code (built without nvcc)")
    return inspect(library)


def test_no_local_memory(build_kernels: list[Kernel]) -> None:
    """No kernel spills or keeps a stack frame, in any arch."""
    assert build_kernels
    archs = sorted({k.arch for k in build_kernels})
    print(f"\n{len(build_kernels)} kernel instances in {', '.join(archs)}")
    assert not local_memory_failures(build_kernels)


def test_implicit_gemm_kernels(build_kernels: list[Kernel]) -> None:
    """The fp32 implicit-GEMM kernels on CUDA cores exist and pass the gates; prints their
    table."""
    gemm = [k for k in build_kernels if k.gemm and k.fp32 and not k.tc]
    assert gemm, f"no fp32 kernel named *{GEMM_MARK}* in the nvcc build of cnnext._C"
    print("\n" + table(gemm))
    assert not gemm_failures(gemm), "\n".join(gemm_failures(gemm))


def test_tensor_core_kernels(build_kernels: list[Kernel]) -> None:
    """Half/bfloat16 implicit-GEMM kernels multiply on tensor cores (HMMA), apart from the SIMT
    kernels of SIMT_REDUCED, which are listed; a tensor-core fprop exists in every arch."""
    library = _library()
    reduced = [k for k in inspect(library, GEMM_MARK, fp32_only=False) if k.gemm and k.reduced]
    assert reduced, f"no half/bfloat16 kernel named *{GEMM_MARK}* in the nvcc build"
    print("\n" + table(reduced))
    for k in reduced:
        if k.hmma == 0 and simt_reason(k):
            print(f"CUDA cores ({simt_reason(k)}): {k.arch} {k.name}")
    for part in ("tc_fprop", "tc_dgrad", "tc_wgrad"):
        tc = [k for k in reduced if f"implicit_gemm_{part}" in k.name]
        assert {k.arch for k in tc} == {k.arch for k in build_kernels}, f"no {part} kernel"
        assert all(k.hmma > 0 for k in tc)
    assert not tensor_core_failures(reduced), "\n".join(tensor_core_failures(reduced))


def test_tf32_tensor_core_kernels(build_kernels: list[Kernel]) -> None:
    """The float tensor-core kernels (fprop, dgrad, wgrad) exist in every arch and multiply in
    TF32 (HMMA.1684.F32.TF32 on sm_80/sm_90); no spills, no 64-bit division."""
    tf32 = [k for k in build_kernels if k.tc and k.fp32]
    print("\n" + table(tf32))
    for part in ("tc_fprop", "tc_dgrad", "tc_wgrad"):
        found = [k for k in tf32 if f"implicit_gemm_{part}" in k.name]
        assert {k.arch for k in found} == {k.arch for k in build_kernels}, f"no float {part}"
    assert all(k.hmma_tf32 > 0 and k.hmma == k.hmma_tf32 for k in tf32)
    assert not tensor_core_failures(tf32), "\n".join(tensor_core_failures(tf32))
    assert not local_memory_failures(tf32)


# ---- planted kernels: the gates flag what they should -------------------------------------------

PLANTED = r"""
#include <cstdint>

// 64-bit division and remainder in a loop: nvcc calls its subroutines every iteration.
template <typename T>
__global__ void planted_implicit_gemm_div64(const T* x, T* y, int64_t n, int64_t w) {
  T acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += x[i / w + i % w];
  y[threadIdx.x] = acc;
}
template __global__ void planted_implicit_gemm_div64<float>(const float*, float*, int64_t,
                                                            int64_t);
template __global__ void planted_implicit_gemm_div64<double>(const double*, double*, int64_t,
                                                             int64_t);

// Register blocking: an 8x8 tile of accumulators per thread fed by four 128-bit shared loads
// per k step (64 FFMA per 4 LDS.128). Under a tight register cap the accumulators spill.
__global__ void planted_implicit_gemm_blocked(const float4* a, const float4* b, float* c,
                                              int k_steps) {
  __shared__ float4 sa[8][16], sb[8][16];
  const int t = threadIdx.x, row = t / 8, col = t % 8;
  float acc[8][8] = {};
  for (int step = 0; step < k_steps; ++step) {
    sa[t / 16][t % 16] = a[step * 128 + t];
    sb[t / 16][t % 16] = b[step * 128 + t];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float4 a0 = sa[k][2 * row], a1 = sa[k][2 * row + 1];
      const float4 b0 = sb[k][2 * col], b1 = sb[k][2 * col + 1];
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) c[(blockIdx.x * 64 + t) * 64 + i * 8 + j] = acc[i][j];
}
"""


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Kernel]]:
    """The planted kernels compiled for sm_80 and sm_90: as written, and with registers capped
    at 32 (the 64 accumulators must spill). Compiled once per session."""
    nvcc = _tool("nvcc")
    if nvcc is None or _tool("cuobjdump") is None:
        pytest.skip("nvcc or cuobjdump not found")
    work = tmp_path_factory.mktemp("sass")
    source = work / "planted.cu"
    source.write_text(PLANTED)
    arches = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    builds = {}
    for name, extra in (("plain", []), ("capped", ["-maxrregcount=32"])):
        out = work / f"{name}.fatbin"
        subprocess.run(
            [nvcc, "-fatbin", *arches, *extra, "-o", str(out), str(source)],
            check=True,
            capture_output=True,
        )
        builds[name] = inspect(str(out))
    return builds


def _named(kernels: list[Kernel], part: str) -> list[Kernel]:
    found = [k for k in kernels if part in k.name]
    assert {k.arch for k in found} == {"sm_80", "sm_90"}, [k.name for k in kernels]
    return found


def test_planted_division_is_flagged(planted: dict[str, list[Kernel]]) -> None:
    div = _named(planted["plain"], "div64<float>")
    assert all(k.fp32 and k.gemm and k.div64_calls > 0 for k in div)
    assert all(any("64-bit division" in f for f in gemm_failures([k])) for k in div)
    assert not local_memory_failures(div)
    double = _named(planted["plain"], "div64<double>")
    assert not any(k.fp32 for k in double) and all(k.div64_calls == -1 for k in double)


def test_planted_register_blocking_passes(planted: dict[str, list[Kernel]]) -> None:
    blocked = _named(planted["plain"], "blocked")
    print("\n" + table(blocked))
    assert all(k.lds128 >= 4 and k.ratio >= MIN_FFMA_PER_LDS for k in blocked)
    assert not gemm_failures(blocked) and not local_memory_failures(blocked)


def test_planted_spill_is_flagged(planted: dict[str, list[Kernel]]) -> None:
    capped = _named(planted["capped"], "blocked")
    assert all(k.registers <= 32 for k in capped)
    # ptxas puts spilled registers in the stack frame (STACK), not in LOCAL.
    assert all((k.stack > 0 or k.local > 0) and k.local_ops > 0 for k in capped)
    assert len(local_memory_failures(capped)) == len(capped)
    assert all(any("spills" in f for f in gemm_failures([k])) for k in capped)


def test_tensor_core_gate_flags_a_reduced_kernel_without_hmma() -> None:
    half = "void cnnext::(anonymous namespace)::conv2d_implicit_gemm_tc_fprop_kernel<c10::Half>()"
    simt = "void cnnext::(anonymous namespace)::conv2d_implicit_gemm_dgrad_kernel<c10::Half>()"
    assert Kernel("sm_90", "", half).reduced and not Kernel("sm_90", "", half).fp32
    assert tensor_core_failures([Kernel("sm_90", "", half, div64_calls=0)])
    assert not tensor_core_failures([Kernel("sm_90", "", half, div64_calls=0, hmma=8)])
    assert not tensor_core_failures([Kernel("sm_90", "", simt, div64_calls=0)])
    tf32 = "void cnnext::(anonymous namespace)::conv2d_implicit_gemm_tc_wgrad_kernel<float, true>()"
    assert Kernel("sm_90", "", tf32).tc and Kernel("sm_90", "", tf32).fp32
    assert tensor_core_failures([Kernel("sm_90", "", tf32, div64_calls=0, hmma=8)])
    assert not tensor_core_failures([Kernel("sm_90", "", tf32, div64_calls=0, hmma=8, hmma_tf32=8)])


def test_is_fp32() -> None:
    assert Kernel("sm_90", "", "void k<float, 4>(float const*)").fp32
    for other in ("c10::Half", "c10::BFloat16", "double"):
        assert not Kernel("sm_90", "", f"void k<{other}>(at::AccumulateType<float>)").fp32
    assert not Kernel("sm_90", "", "void k<int>(int*)").fp32


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the SASS table of cnnext._C's kernels.")
    parser.add_argument("--library", default=None, help="default: cnnext._C")
    parser.add_argument("--pattern", default=GEMM_MARK, help="regex on demangled kernel names")
    parser.add_argument("--all-dtypes", action="store_true", help="not only fp32 kernels")
    args = parser.parse_args()
    library = args.library or os.environ.get("CNNEXT_SASS_LIBRARY") or _library()
    kernels = inspect(library, args.pattern, not args.all_dtypes)
    shown = [k for k in kernels if k.div64_calls >= 0]
    print(table(shown))
    print(f"\n{len(kernels)} kernel instances; local memory: ", end="")
    print("\n".join(local_memory_failures(kernels)) or "none")
    for line in gemm_failures(k for k in shown if not k.tc):
        print("gate:", line)
    for line in tensor_core_failures(k for k in shown if k.tc or k.reduced):
        print("gate:", line)


if __name__ == "__main__":
    sys.exit(main())
