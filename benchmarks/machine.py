"""Machine info (CPU, GPU, library versions, git commit) and the peaks that rates are measured
against."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import cnnext

from .config import Plan

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# Dense datasheet peaks: TFLOP/s per precision and HBM GB/s. The first matching name wins.
GPU_PEAKS = [
    ("H200", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4}, 4800.0),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5}, 3900.0),
    ("H100 PCIE", {"fp32": 51.2, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0}, 2000.0),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4}, 3350.0),
    ("A100 80GB PCIE", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}, 1935.0),
    ("A100-SXM4-80GB", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}, 2039.0),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}, 1555.0),
]


def gpu_datasheet(name: str) -> dict | None:
    """``{"tflops": {precision: TFLOP/s}, "gbs": GB/s, "matched": key}`` for a known GPU."""
    upper = name.upper()
    for key, tflops, gbs in GPU_PEAKS:
        if all(part in upper for part in key.split()):
            return {"tflops": tflops, "gbs": gbs, "matched": key}
    return None


def _best_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    fn()
    m = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return min(m.times)


def cpu_peaks(threads: int, mode: str) -> dict:
    """Measured at ``threads`` threads: sgemm GFLOP/s (``torch.mm``: MKL), a large oneDNN 1x1
    convolution (its GEMM kernel; MKL may run a narrower ISA than oneDNN), the larger of the
    two as the FLOP/s peak, and the GB/s of a plain copy (read + write) bigger than the LLC."""
    size, copy_numel, run = {
        "tiny": (128, 1 << 18, 0.001),
        "quick": (1024, 16 << 20, 0.05),
        "full": (2048, 32 << 20, 0.3),
    }[mode]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        c = torch.empty(size, size)
        sgemm = 2.0 * size**3 / _best_seconds(lambda: torch.mm(a, b, out=c), run) / 1e9
        n, ch, hw = max(1, size // 256), 256, 32
        x, w = torch.randn(n, ch, hw, hw), torch.randn(ch, ch, 1, 1)
        conv = 2.0 * n * ch * ch * hw * hw / _best_seconds(lambda: F.conv2d(x, w), run) / 1e9
        src = torch.randn(copy_numel)
        dst = torch.empty_like(src)
        copy = 2 * 4 * copy_numel / _best_seconds(lambda: dst.copy_(src), run) / 1e9
    finally:
        torch.set_num_threads(previous)
    return {
        "sgemm_gflops": sgemm,
        "onednn_1x1_gflops": conv,
        "gflops": max(sgemm, conv),
        "copy_gbs": copy,
    }


def gpu_peaks() -> dict:
    """Datasheet peaks of the GPU (when known) and a measured device copy."""
    name = torch.cuda.get_device_name()
    sheet = gpu_datasheet(name)
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / _best_seconds(lambda: dst.copy_(src), 0.2) / 1e9
    return {
        "datasheet": sheet,
        "gflops": {k: v * 1e3 for k, v in sheet["tflops"].items()} if sheet else None,
        "copy_gbs": copy,
        "gbs": sheet["gbs"] if sheet else copy,
    }


def _config_value(pattern: str) -> str | None:
    found = re.search(pattern, torch.__config__.show())
    return found.group(1) if found else None


FLAGS_OF_NOTE = (
    "sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 "
    "avx512_fp16 amx_tile amx_bf16 amx_fp16"
).split()


def machine_info(plan: Plan) -> dict:
    """CPU model and flags, versions of torch and its libraries, the GPU, the git commit."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": plan.kind,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cnnext": cnnext.__version__,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "onednn": _config_value(r"(?:MKL-DNN|oneDNN) v([\w.]+)"),
        "mkl": _config_value(r"Math Kernel Library Version ([\w.]+)"),
    }
    cpuinfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    info["cpu_model"] = model.group(1).strip() if model else platform.processor()
    all_flags = flags.group(1).split() if flags else []
    info["cpu_flags_of_note"] = [f for f in FLAGS_OF_NOTE if f in all_flags]
    info["cpu_flags"] = " ".join(all_flags)
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if plan.kind == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        commit = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["git"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["git"] = None
    return info
