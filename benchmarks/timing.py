"""Timing: ``Timer.blocked_autorange``; on CUDA per-call events after an L2 flush."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer

from .cases.base import Case, Impl
from .config import Plan, Spec


class L2Flush:
    """Zeroes a buffer of twice the GPU's L2 (at least 256 MiB) before each timed call."""

    def __init__(self, device: torch.device) -> None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        self.buffer = torch.empty(max(2 * l2, 256 << 20), dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def time_events(
    fn: Callable[[], Any],
    flush: Callable[[], None],
    timer_args: dict,
    min_run_time: float,
    event: Callable[[], Any],
    synchronize: Callable[[], None],
) -> Measurement:
    """Seconds per call of ``fn`` from device events around each call, each call preceded by
    ``flush()`` (not timed). ``Timer.blocked_autorange`` drives the loop and decides how many
    calls; its own wall times (which include the flush) go in the metadata."""
    pairs = []

    def step() -> None:
        flush()
        start, end = event(), event()
        start.record()
        fn()
        end.record()
        pairs.append((start, end))

    synchronize()
    wall = Timer("step()", globals={"step": step}, **timer_args).blocked_autorange(
        min_run_time=min_run_time
    )
    synchronize()
    times = [start.elapsed_time(end) / 1e3 for start, end in pairs]
    return Measurement(1, times, wall.task_spec, metadata={"wall_median_s": wall.median})


def measure(impl: Impl, spec: Spec, plan: Plan, threads: int, min_run_time: float, flush):
    """One ``blocked_autorange`` of ``impl`` (CUDA: per-call events, L2 flushed before each)."""
    timer_args = {
        "label": spec.label,
        "sub_label": spec.sub_label,
        "description": impl.name,
        "num_threads": threads,
    }
    with impl.context():
        if plan.kind == "cuda":
            return time_events(
                impl.call,
                flush,
                timer_args,
                min_run_time,
                lambda: torch.cuda.Event(enable_timing=True),
                torch.cuda.synchronize,
            )
        timer = Timer("fn()", globals={"fn": impl.call}, **timer_args)
        return timer.blocked_autorange(min_run_time=min_run_time)


def time_case(case: Case, plan: Plan, threads: int, min_run_time: float, rounds: int, flush):
    """Measurements of every timed implementation: ``rounds`` rounds that interleave the
    implementations (load from other processes then hits all alike), merged per impl."""
    runs: dict[str, list[Measurement]] = {}
    for _ in range(rounds):
        for impl in case.impls:
            if impl.timed:
                m = measure(impl, case.spec, plan, threads, min_run_time, flush)
                runs.setdefault(impl.name, []).append(m)
    return {name: Measurement.merge(ms)[0] for name, ms in runs.items()}
