"""Loading the extensions and choosing which op namespace serves a call.

``torch.ops.cnnext`` holds the CPU and CUDA kernels; ``torch.ops.cnnext_emu`` holds the CUDA
kernels compiled for the CPU emulator. Inside ``emulate_cuda()`` every cnnext op called on CPU
tensors runs the emulated CUDA kernel instead of the CPU kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, overload

import torch

from . import _C  # registers torch.ops.cnnext

# CNNEXT_EMULATOR=asan|tsan loads the sanitizer build of the emulator instead (tests only; the
# sanitizer runtime must be preloaded). Both register the same `cnnext_emu` namespace.
EMULATOR_VARIANT = os.environ.get("CNNEXT_EMULATOR", "")
if EMULATOR_VARIANT not in ("", "asan", "tsan"):
    raise ImportError(f"cnnext: CNNEXT_EMULATOR must be 'asan' or 'tsan', got {EMULATOR_VARIANT!r}")
try:
    importlib.import_module(
        f".{'_C_emu_' + EMULATOR_VARIANT if EMULATOR_VARIANT else '_C_emu'}", __package__
    )
    EMULATOR_AVAILABLE = True
except ImportError:  # built with CNNEXT_EMU=0, or no C++20 compiler at build time
    if EMULATOR_VARIANT:
        raise
    EMULATOR_AVAILABLE = False

# A plain module global (not a ContextVar) so torch.compile can guard on it.
_emulating = False


def emulating() -> bool:
    """True inside ``cnnext.emulate_cuda()``."""
    return _emulating


def use_emulator(tensor: torch.Tensor) -> bool:
    """Whether a call on ``tensor`` goes to the emulated CUDA kernels."""
    return _emulating and tensor.device.type == "cpu"


def lib(emulated: bool) -> Any:
    """The op namespace: ``torch.ops.cnnext_emu`` when ``emulated`` else ``torch.ops.cnnext``."""
    return torch.ops.cnnext_emu if emulated else torch.ops.cnnext


def ops_for(tensor: torch.Tensor) -> Any:
    """The op namespace serving a call on ``tensor``."""
    return lib(use_emulator(tensor))


def fast_op(name: str, outputs: int | None = None, min_dim: int = 0) -> Any:
    """``cnnext._C.FastOp(name)``: the lean binding of ``cnnext::name`` (``cnnext_emu::name`` for
    CPU tensors inside ``emulate_cuda()``), csrc/fast_call.cpp. It takes positional arguments of
    the plain forms only (exact tensors, ints, int pairs as an int or a sequence of one or two,
    bools, floats, str, None) and returns ``NotImplemented`` for anything else or while a torch
    function mode is active; callers then go through ``torch.ops``, as they do while
    Dynamo traces (the binding is opaque to it). ``outputs``: give back only the first
    ``outputs`` of the op's returns (a single one: the tensor itself, not a tuple).
    ``min_dim``: decline a first tensor of fewer dimensions (the checked path raises)."""
    return _C.FastOp(name, -1 if outputs is None else outputs, min_dim)


def default_schedule() -> str:
    return os.environ.get("CNNEXT_EMU_SCHEDULE") or "forward"


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
    """One kernel launch or one cuBLAS call, as the emulator saw it.

    ``name`` is the kernel's short name (``conv2d_implicit_gemm_fprop_kernel``); ``full_name``
    is the kernel expression as launched
    (``(conv2d_implicit_gemm_fprop_kernel<scalar_t, Cfg, NHWC, Epilogue>)``). GEMM records
    (``kind == "gemm"``) carry cuBLAS's column-major ``transa, transb, m, n, k, batch`` and no
    grid; kernel records carry ``grid``, ``block`` and dynamic shared memory ``smem``.
    """

    kind: str  # "kernel" | "gemm"
    name: str
    full_name: str
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    smem: int = 0
    transa: str | None = None
    transb: str | None = None
    m: int | None = None
    n: int | None = None
    k: int | None = None
    batch: int | None = None


def short_kernel_name(expression: str) -> str:
    """``(ns::foo_kernel<float, 4>)`` -> ``foo_kernel``."""
    name = expression.strip().strip("()").strip()
    name = name.split("<", 1)[0].strip()
    return name.rsplit("::", 1)[-1]


def _parse_records(text: str) -> list[LaunchRecord]:
    records = []
    for line in text.splitlines():
        fields = line.split("\t")
        if fields[0] == "kernel":
            gx, gy, gz = (int(v) for v in fields[2].split())
            bx, by, bz = (int(v) for v in fields[3].split())
            records.append(
                LaunchRecord(
                    "kernel",
                    short_kernel_name(fields[1]),
                    fields[1],
                    grid=(gx, gy, gz),
                    block=(bx, by, bz),
                    smem=int(fields[4]),
                )
            )
        else:
            ta, tb, m, n, k, batch = fields[2].split()
            records.append(
                LaunchRecord(
                    "gemm",
                    fields[1],
                    fields[1],
                    transa=ta,
                    transb=tb,
                    m=int(m),
                    n=int(n),
                    k=int(k),
                    batch=int(batch),
                )
            )
    return records


class LaunchLog(Sequence[LaunchRecord]):
    """What ran under ``emulate_cuda(record=True)``: kernel launches and cuBLAS calls in call
    order, on the calling thread. It reads the emulator live while its ``with`` block runs and
    keeps what it saw once the block exits.

    Example::

        with cnnext.emulate_cuda(record=True) as log:
            cnnext.ops.conv2d(x, w, padding=1, algo="im2col")
        print(log)                                  # a table
        [r.name for r in log.kernels]               # ['im2col_kernel', ...]
        [(g.m, g.n, g.k, g.batch) for g in log.gemms]
    """

    def __init__(self, token: int) -> None:
        self._token: int | None = token
        self._records: list[LaunchRecord] = []

    def _close(self) -> None:
        if self._token is not None:
            self._records = _parse_records(torch.ops.cnnext_emu._record_stop(self._token))
            self._token = None

    @property
    def records(self) -> list[LaunchRecord]:
        """Every record, in call order."""
        if self._token is not None:
            return _parse_records(torch.ops.cnnext_emu._record_peek(self._token))
        return list(self._records)

    @property
    def kernels(self) -> list[LaunchRecord]:
        """The kernel launches."""
        return [r for r in self.records if r.kind == "kernel"]

    @property
    def gemms(self) -> list[LaunchRecord]:
        """The cuBLAS (``gemm_strided_batched``) calls."""
        return [r for r in self.records if r.kind == "gemm"]

    def names(self) -> list[str]:
        """Short names of every record, in call order."""
        return [r.name for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, i: int) -> LaunchRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[LaunchRecord]: ...
    def __getitem__(self, i: int | slice) -> LaunchRecord | list[LaunchRecord]:
        return self.records[i]

    def __repr__(self) -> str:
        kernels = sum(r.kind == "kernel" for r in self.records)
        return f"<LaunchLog: {kernels} kernel launches, {len(self) - kernels} GEMMs>"

    def __str__(self) -> str:
        rows = [("#", "kind", "name", "grid", "block", "smem", "gemm (ta tb m n k batch)")]
        for i, r in enumerate(self.records):
            if r.kind == "kernel":
                assert r.grid is not None and r.block is not None
                rows.append(
                    (
                        str(i),
                        r.kind,
                        r.name,
                        "x".join(map(str, r.grid)),
                        "x".join(map(str, r.block)),
                        str(r.smem),
                        "",
                    )
                )
            else:
                gemm = f"{r.transa} {r.transb} {r.m} {r.n} {r.k} {r.batch}"
                rows.append((str(i), r.kind, r.name, "", "", "", gemm))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        cells = (zip(row, widths, strict=True) for row in rows)
        return "\n".join("  ".join(c.ljust(w) for c, w in line).rstrip() for line in cells)


@contextlib.contextmanager
def emulate_cuda(
    schedule: str | None = None, record: bool = False, tf32: bool | None = None
) -> Iterator[LaunchLog | None]:
    """Run cnnext's CUDA kernels on CPU tensors through the emulator.

    Args:
        schedule: the order in which the emulated threads of a block run between barriers:
            ``"forward"``, ``"reverse"`` or ``"random:SEED"``. Defaults to the order of an
            enclosing ``emulate_cuda``, else the environment variable ``CNNEXT_EMU_SCHEDULE``,
            else ``"forward"``. A kernel with a missing ``__syncthreads()`` typically passes in
            one order and fails in another.
        record: yield a :class:`LaunchLog` of every kernel launch (name, grid, block, dynamic
            shared memory) and cuBLAS call (``transa, transb, m, n, k, batch``) made inside the
            block. Without it the context yields ``None``. An outer recording also sees what a
            nested one records.
        tf32: let float32 convolutions run the TF32 tensor-core kernels, as they do on a GPU
            (sm_80 or newer) when torch allows TF32 for its cuDNN convolutions
            (``torch.backends.cudnn.allow_tf32``, default on, or
            ``torch.backends.cudnn.conv.fp32_precision``). Even then only where that setting
            allows it. Defaults to the setting of an enclosing ``emulate_cuda``, else ``False``:
            emulated float32 results are then IEEE, comparable with torch's CPU convolution at
            float32 tolerances (torch's CPU kernels never use TF32).

    Example::

        with cnnext.emulate_cuda("random:7"):
            y = cnnext.ops.max_pool2d(x, 3, 2, 1)   # x on the CPU, emulated CUDA kernel
        with cnnext.emulate_cuda(record=True) as log:
            y = cnnext.ops.max_pool2d(x, 3, 2, 1)
        print(log)
        with cnnext.emulate_cuda(tf32=True):
            y = cnnext.ops.conv2d(x, w, padding=1)  # float32 on emulated TF32 tensor cores
    """
    global _emulating
    if not EMULATOR_AVAILABLE:
        raise RuntimeError(
            "cnnext.emulate_cuda: the emulator extension cnnext._C_emu was not built "
            "(it needs a C++20 compiler at install time; see README)"
        )
    emu = torch.ops.cnnext_emu
    previous_schedule = emu._get_schedule()
    previous_tf32 = emu._get_tf32()
    previous = _emulating
    if schedule is None:
        schedule = previous_schedule if previous else default_schedule()
    emu._set_schedule(schedule)
    if tf32 is None:
        tf32 = previous_tf32 if previous else False
    emu._set_tf32(bool(tf32))
    _emulating = True
    _C._set_emulating(True)  # the same switch for cnnext._C.FastOp
    log = LaunchLog(emu._record_start()) if record else None
    try:
        yield log
    finally:
        if log is not None:
            log._close()
        _emulating = previous
        _C._set_emulating(previous)
        emu._set_schedule(previous_schedule)
        emu._set_tf32(previous_tf32)
