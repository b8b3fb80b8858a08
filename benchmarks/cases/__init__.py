"""The cases of each family: ``build_case`` makes one from its spec; ``estimate_bytes`` and
``memory_budget`` decide whether it fits."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config import DTYPES, Config, Plan, Spec
from .base import Case
from .conv import conv_case
from .fused import fused_case
from .host import host_case
from .pool import pool_case


def build_case(spec: Spec, plan: Plan, cfg: Config, phase: str = "main") -> Case:
    torch.manual_seed(spec.seed)
    if spec.family == "conv":
        return conv_case(spec, plan, cfg.algos, phase, cfg.cudnn_benchmark, cfg.direct_variants)
    if spec.family == "fused":
        return fused_case(spec, plan, cfg.fused_algos)
    if spec.family == "host":
        return host_case(spec)
    return pool_case(spec, plan)


def estimate_bytes(spec: Spec, plan: Plan, cfg: Config) -> int:
    """Peak memory of a case, roughly: the inputs and their gradient-leaf copies, outputs and
    gradients of the reference and of the implementation under validation, the eager
    intermediates, torch's whole-batch im2col columns (forward and backward) and workspaces."""
    layer, n = spec.layer, spec.batch
    elem = DTYPES[spec.precision].itemsize
    if spec.family == "host":
        return 64 << 20
    if spec.family == "pool":
        x = n * layer.c * layer.size**2
        y = n * layer.c * layer.out_size**2
        return elem * (4 * x + 6 * y) + 8 * 3 * y + (64 << 20)
    x = n * layer.c_in * layer.size**2
    y = n * layer.c_out * layer.out_size**2
    w = layer.c_out * layer.reduction
    total = elem * (4 * x + 6 * y + 6 * w) + (256 << 20)
    if spec.family == "fused":
        total += elem * 4 * y
    elif plan.kind == "cpu":  # measured: ~6 GiB peak RSS for resnet18-224.stem N=128 fwd+bwd
        cols = n * layer.c_in * layer.k**2 * layer.out_size**2
        total += elem * cols * (3 if spec.pass_ != "fwd" else 1)
    return total


def memory_budget(plan: Plan, cfg: Config) -> int:
    if plan.kind == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * max(cfg.memory_fraction, 0.8))
    available = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:  # not Linux: assume 8 GiB
        available = 8 << 30
    return int(available * cfg.memory_fraction)
