"""Reports: the Compare table, the geometric-mean summary, JSON, Markdown and a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from torch.utils.benchmark import Compare

from .suite import Results


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def compare_table(results: Results) -> str:
    """``torch.utils.benchmark.Compare`` of every measurement (times in us)."""
    if not results.measurements:
        return "(no measurements)"
    compare = Compare(results.measurements)
    compare.trim_significant_figures()
    return str(compare)


def summary(results: Results) -> list[dict]:
    """Geometric-mean speed-up of each cnnext implementation over each baseline, per op, pass,
    precision and thread count."""
    groups: dict[tuple, list[float]] = {}
    for row in results.rows:
        for base, ratio in row.get("ratios", {}).items():
            key = (row["op"], row["pass"], row["precision"], row["threads"], row["impl"], base)
            groups.setdefault(key, []).append(ratio)
    keys = ("op", "pass", "precision", "threads", "impl", "baseline")
    return [
        {**dict(zip(keys, key, strict=True)), "geomean": geomean(v), "cases": len(v)}
        for key, v in sorted(groups.items())
    ]


def _group_key(row: dict) -> tuple:
    return (row["family"], row["op"], row["pass"], row["precision"], row["layout"], row["threads"])


def grouped(results: Results) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in results.rows:
        groups.setdefault(_group_key(row), []).append(row)
    return groups


def markdown(results: Results) -> str:
    meta = results.meta
    lines = [f"# cnnext benchmarks: {meta['device']}, {meta['date']} ({meta['mode']})", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    for key in (
        "cpu_model cpu_flags_of_note torch_cpu_capability logical_cpus torch_threads loadavg "
        "gpu gpu_capability gpu_sms gpu_memory_gib gpu_l2_mib cuda cudnn "
        "torch onednn mkl cnnext git python platform"
    ).split():
        if key in meta and meta[key] is not None:
            value = meta[key]
            value = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"| {key} | {value} |")
    lines += ["", "## Peaks", ""]
    for threads, peak in meta["peaks"].items():
        shown = {k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in peak.items()}
        lines.append(f"- {threads} thread(s)" if threads != "gpu" else "- GPU")
        lines.append(f"  {json.dumps(shown)}")
    min_run_time, rounds = meta["timing"]["min_run_time_s"], meta["timing"]["rounds"]
    lines += [
        "",
        "## Method",
        "",
        "Every implementation is validated against the case's reference (first baseline) on "
        "the same inputs before it is timed: outputs and, for fwd+bwd, every gradient; max "
        "pooling bit-identical values and argmax. Timing: `torch.utils.benchmark.Timer."
        f"blocked_autorange(min_run_time={min_run_time})`, {rounds} interleaved round(s) "
        "merged; on CUDA per-call CUDA events with an L2 flush before each call. Cells: "
        "median ms, rate at the median (GFLOP/s: fwd+bwd counts 3x the forward FLOPs; GB/s: "
        "bytes read + written once) and % of the peak; min ms in brackets. Ratios: baseline "
        "median / cnnext median (>1: cnnext faster). Max rel. err: the largest "
        "max|got - ref| / max|ref| of any implementation and output in validation.",
        f"Total run time {meta.get('seconds', '?')} s.",
        "",
        "The primary baseline (the plot's, and the first ratio column) is cuDNN with "
        "`cudnn.benchmark=True` (`cuDNN.bench`, timed in a child process) for CUDA convolutions "
        "unless the run skipped it, else the first baseline. Host rows (family `host`): "
        "microseconds per call on tiny CPU tensors at one thread, torch and cnnext interleaved.",
        "",
        "## Summary (geometric means)",
        "",
        "| op | pass | precision | threads | cnnext | vs | geomean | cases |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(results):
        lines.append(
            f"| {s['op']} | {s['pass']} | {s['precision']} | {s['threads']} | {s['impl']} | "
            f"{s['baseline']} | {s['geomean']:.2f}x | {s['cases']} |"
        )
    for (_, op, pass_, precision, layout, threads), rows in grouped(results).items():
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        ours = [i for i in impls if not any(r["baseline"] for r in rows if r["impl"] == i)]
        # The primary baseline's ratio first (on CUDA: cuDNN with cudnn.benchmark on).
        primary = rows[0]["primary"]
        bases = sorted((i for i in impls if i not in ours), key=lambda b: b != primary)
        ratio_cols = [(o, b) for o in ours for b in bases]
        lines += ["", f"## {op} | {pass_} | {precision} | {layout} | {threads} thread(s)", ""]
        auto = any("auto_pick" in r for r in rows)
        head = ["layer", "N", *impls, *(f"{o} vs {b}" for o, b in ratio_cols)]
        head += ["algo=auto picks"] if auto else []
        head += ["max rel. err"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cases: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            cases.setdefault((r["layer"], r["batch"]), {})[r["impl"]] = r
        for (layer, batch), by_impl in cases.items():
            cells = [layer, str(batch)]
            for impl in impls:
                r = by_impl.get(impl)
                if r is None:
                    cells.append("")
                    continue
                cells.append(_cell(r))
            for o, b in ratio_cols:
                ratio = by_impl.get(o, {}).get("ratios", {}).get(b)
                cells.append(f"{ratio:.2f}x" if ratio else "")
            if auto:
                picks = {r.get("auto_pick") for r in by_impl.values()} - {None}
                cells.append(", ".join(sorted(picks)))
            err = max((r.get("max_rel_err", 0.0) for r in by_impl.values()), default=0.0)
            cells.append(f"{err:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
    if results.skipped or results.notes:
        lines += ["", "## Skipped and notes", ""]
        lines += [f"- {s}" for s in results.notes + results.skipped]
    return "\n".join(lines) + "\n"


def _cell(r: dict) -> str:
    """One implementation's median (min), rate and % of peak; host rows in us per call."""
    if r["unit"] == "calls/s":
        return f"{r['median_ms'] * 1e3:.1f} us (min {r['min_ms'] * 1e3:.1f})"
    pct = f" ({r['pct_peak']:.0f}%)" if r["pct_peak"] is not None else ""
    unit = "GF/s" if r["unit"] == "GFLOP/s" else "GB/s"
    return f"{r['median_ms']:.3f} ms (min {r['min_ms']:.3f}), {r['rate']:.1f} {unit}{pct}"


def host_table(results: Results) -> str:
    """The host family side by side: us per call of torch and cnnext and torch / cnnext."""
    rows = [r for r in results.rows if r["family"] == "host" and "ratios" in r]
    if not rows:
        return ""
    lines = [f"{'op':<28} {'pass':<8} {'torch us':>9} {'cnnext us':>10} {'ratio':>7}"]
    by_key = {(r["op"], r["pass"], r["impl"]): r for r in results.rows if r["family"] == "host"}
    for r in rows:
        torch_row = by_key.get((r["op"], r["pass"], "torch"))
        if torch_row is None:
            continue
        lines.append(
            f"{r['op']:<28} {r['pass']:<8} {torch_row['median_ms'] * 1e3:>9.1f} "
            f"{r['median_ms'] * 1e3:>10.1f} {r['ratios']['torch']:>6.2f}x"
        )
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    """A grid of panels, one row per (op, pass, precision, layout) and one column per thread
    count: each cnnext implementation's speed-up over the case's primary baseline, per layer
    and batch (log scale; above 1x cnnext is faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ours = [r for r in results.rows if "ratios" in r]
    panels: dict[tuple, dict[int, list[dict]]] = {}
    for r in ours:
        key = _group_key(r)[:-1]
        panels.setdefault(key, {}).setdefault(r["threads"], []).append(r)
    threads = sorted({r["threads"] for r in ours})
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no ratios to plot", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    cases_max = max(len({(r["layer"], r["batch"]) for r in ours if _group_key(r)[:-1] == k})
                    for k in panels)  # fmt: skip
    width = max(5.0, 0.55 * cases_max) * len(threads)
    fig, axes = plt.subplots(
        len(panels), len(threads), figsize=(width, 3.4 * len(panels)), squeeze=False
    )
    for row_axes, ((_, op, pass_, precision, layout), by_threads) in zip(
        axes, panels.items(), strict=True
    ):
        for ax, t in zip(row_axes, threads, strict=True):
            rows = by_threads.get(t, [])
            names = list(dict.fromkeys(r["impl"] for r in rows))
            cases = list(dict.fromkeys((r["layer"], r["batch"]) for r in rows))
            primary = rows[0]["primary"] if rows else "baseline"
            bar = 0.8 / max(1, len(names))
            for j, name in enumerate(names):
                by_case = {
                    (r["layer"], r["batch"]): r["ratios"].get(primary)
                    for r in rows
                    if r["impl"] == name
                }
                xs = [i + (j - (len(names) - 1) / 2) * bar for i in range(len(cases))]
                ys = [by_case.get(c) or float("nan") for c in cases]
                ax.bar(xs, ys, bar, label=name)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(
                [f"{lay} N={n}" for lay, n in cases], rotation=60, fontsize=7, ha="right"
            )
            ax.set_ylabel(f"speed-up vs {primary}", fontsize=8)
            ax.set_title(f"{op} | {pass_} | {precision} | {layout} | {t} thread(s)", fontsize=9)
            ax.grid(axis="y", which="major", linewidth=0.3)
            if names:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def results_stem(results: Results) -> str:
    meta = results.meta
    suffix = "" if meta["mode"] == "full" else f"-{meta['mode']}"
    return f"{meta['device']}-{meta['date'][:10]}{suffix}"


def write_results(results: Results, out_dir: Path) -> dict[str, Path]:
    """``<device>-<date>[-quick|-tiny].{json,md,png}`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / results_stem(results)
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("json", "md", "png")}
    payload = {
        "meta": results.meta,
        "summary": summary(results),
        "rows": results.rows,
        "skipped": results.skipped,
        "notes": results.notes,
    }
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths
