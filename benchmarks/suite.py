"""The run: build, validate and time every case, in this process and, for the cuDNN baseline
with ``cudnn.benchmark=True``, in a child process.

cuDNN keeps one plan per convolution key in a process-wide cache, whether the plan came from
autotuning or from heuristics and whatever ``cudnn.benchmark`` says when it is looked up, so the
benchmark-on baseline (``cuDNN.bench``) is timed in a child process of its own (validated there
against a float64 reference) after the main run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.benchmark import Measurement

from .cases import build_case, estimate_bytes, memory_budget
from .cases.base import Case, Impl, precision_flags
from .config import Config, Plan, Spec, enumerate_specs
from .machine import cpu_peaks, gpu_peaks, machine_info
from .timing import L2Flush, time_case
from .validate import validate


@dataclass
class Results:
    meta: dict
    rows: list[dict] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_row(case: Case, impl: Impl, m: Measurement, threads: int) -> dict:
    spec = case.spec
    median, best = m.median, min(m.times)
    rate = case.work / median / 1e9
    return {
        "family": spec.family,
        "op": spec.op,
        "net": spec.layer.net,
        "layer": spec.layer.id,
        "shape": case.shape,
        "batch": spec.batch,
        "pass": spec.pass_,
        "precision": spec.precision,
        "layout": spec.layout,
        "threads": threads,
        "impl": impl.name,
        "baseline": impl.baseline,
        "reference": impl.name == case.reference,
        "primary": case.primary,
        "validated_tol": case.tol,
        "median_ms": median * 1e3,
        "min_ms": best * 1e3,
        "iqr_ms": m.iqr * 1e3,
        "runs": len(m.times),
        "unit": case.unit,
        "work": case.work,
        "rate": rate,
        "rate_best": case.work / best / 1e9,
        **case.extra,
    }


def run_cases(
    specs: Sequence[Spec], plan: Plan, cfg: Config, results: Results, phase: str = "main"
) -> None:
    """Build, validate and time each spec at each thread count; append rows, measurements and
    skips to ``results``. A ``ValidationError`` propagates: nothing wrong gets a number."""
    flush = L2Flush(plan.device) if plan.kind == "cuda" else None
    all_threads = torch.get_num_threads()
    try:
        for i, spec in enumerate(specs):
            need, budget = estimate_bytes(spec, plan, cfg), memory_budget(plan, cfg)
            if need > budget:
                why = f"{spec.title}: needs ~{need / 2**30:.1f} GiB, budget {budget / 2**30:.1f}"
                results.skipped.append(why)
                if cfg.verbose:
                    print(f"skip {why}", file=sys.stderr)
                continue
            if cfg.verbose:
                print(f"[{i + 1}/{len(specs)}] {phase} {spec.title}", file=sys.stderr)
            min_run_time, rounds = cfg.timing(spec.family)
            with precision_flags(spec.precision, plan):
                case = build_case(spec, plan, cfg, phase)  # fused computes with the flags
                for threads in cfg.thread_list(plan, spec.family):
                    torch.set_num_threads(threads)
                    errors = validate(case)
                    timed = time_case(case, plan, threads, min_run_time, rounds, flush)
                    for impl in case.impls:
                        if impl.name in timed:
                            row = make_row(case, impl, timed[impl.name], threads)
                            row["max_rel_err"] = errors[impl.name]
                            results.rows.append(row)
                            results.measurements.append(timed[impl.name])
            del case
            if plan.kind == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(all_threads)


def _child_cudnn_benchmark(specs: Sequence[Spec], cfg: Config, results: Results) -> None:
    """Time ``F.conv2d`` with ``cudnn.benchmark=True`` in a fresh process (see the module
    docstring) and merge its rows and measurements into ``results``."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp)
        payload = {"config": dataclasses.asdict(cfg), "specs": [s.to_json() for s in specs]}
        (job / "job.json").write_text(json.dumps(payload))
        # The child imports this package (and cnnext) from where this process did.
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        subprocess.run(
            [sys.executable, "-m", "benchmarks.suite", str(job)],
            check=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        rows, measurements, skipped = pickle.loads((job / "out.pkl").read_bytes())
    results.rows.extend(rows)
    results.measurements.extend(measurements)
    results.skipped.extend(skipped)


def child_main(job_dir: str) -> None:
    """Entry point of the cuDNN-benchmark child process."""
    job = Path(job_dir)
    payload = json.loads((job / "job.json").read_text())
    config = payload["config"]
    for key in (
        "families",
        "algos",
        "direct_variants",
        "fused_algos",
        "batches",
        "passes",
        "precisions",
        "layouts",
    ):
        if config.get(key) is not None:
            config[key] = tuple(config[key])
    cfg = Config(**config)
    plan = Plan(cfg.device)
    results = Results(meta={})
    run_cases([Spec.from_json(s) for s in payload["specs"]], plan, cfg, results, "cudnn-bench")
    (job / "out.pkl").write_bytes(
        pickle.dumps((results.rows, results.measurements, results.skipped))
    )


def add_ratios_and_peaks(results: Results) -> None:
    """Per cnnext row: ``ratios[baseline] = baseline median / cnnext median`` (>1: cnnext is
    faster) over the baselines of the same case; per row: percent of the peak."""
    groups: dict[tuple, list[dict]] = {}
    for row in results.rows:
        key = tuple(
            row[k]
            for k in ("family", "op", "layer", "batch", "pass", "precision", "layout", "threads")
        )
        groups.setdefault(key, []).append(row)
    for rows in groups.values():
        baselines = {r["impl"]: r["median_ms"] for r in rows if r["baseline"]}
        for row in rows:
            if not row["baseline"]:
                row["ratios"] = {name: ms / row["median_ms"] for name, ms in baselines.items()}
    peaks = results.meta.get("peaks", {})
    for row in results.rows:
        peak = peaks.get(str(row["threads"]), peaks.get("gpu"))
        if row["unit"] not in ("GB/s", "GFLOP/s"):  # host: calls per second have no peak
            value = None
        elif row["unit"] == "GB/s":
            value = peak.get("gbs", peak.get("copy_gbs")) if peak else None
        elif peak and isinstance(peak.get("gflops"), dict):
            value = peak["gflops"].get(row["precision"])
        else:
            value = peak.get("gflops") if peak else None
        row["peak"] = value
        row["pct_peak"] = 100.0 * row["rate"] / value if value else None


def run_suite(cfg: Config) -> Results:
    """Run every case of ``cfg``; raises ``ValidationError`` when an implementation is wrong."""
    plan = Plan(cfg.device)
    results = Results(meta=machine_info(plan))
    if plan.kind == "emu" and not cfg.tiny and cfg.verbose:
        print("note: emulated CUDA kernels are very slow; use --tiny", file=sys.stderr)
    specs = enumerate_specs(cfg, results.notes)
    results.meta["config"] = dataclasses.asdict(cfg)
    results.meta["mode"] = cfg.mode
    results.meta["timing"] = dict(zip(("min_run_time_s", "rounds"), cfg.timing(), strict=True))
    if plan.kind == "cuda":
        results.meta["peaks"] = {"gpu": gpu_peaks()}
    else:
        results.meta["peaks"] = {str(t): cpu_peaks(t, cfg.mode) for t in cfg.thread_list(plan)}
    start = time.perf_counter()
    run_cases(specs, plan, cfg, results)
    conv_specs = [s for s in specs if s.family == "conv"]
    if plan.gpu_algorithms and cfg.cudnn_benchmark and conv_specs:
        if plan.kind == "cuda":
            torch.cuda.empty_cache()
        _child_cudnn_benchmark(conv_specs, cfg, results)
    results.skipped = list(dict.fromkeys(results.skipped))  # the child repeats the parent's
    results.meta["seconds"] = round(time.perf_counter() - start, 1)
    add_ratios_and_peaks(results)
    return results


if __name__ == "__main__":  # the cuDNN-benchmark child process
    child_main(sys.argv[1])
