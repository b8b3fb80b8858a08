"""The command line the suite and the per-family scripts share."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import PASSES, PRECISIONS, Config, enumerate_specs
from .report import compare_table, host_table, summary, write_results
from .shapes import FAMILIES
from .suite import Results, run_suite


def _csv(kind: type = str) -> Callable[[str], tuple]:
    return lambda text: tuple(kind(item.strip()) for item in text.split(",") if item.strip())


def add_arguments(parser: argparse.ArgumentParser, families: bool) -> None:
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "emu"),
        default="cpu",
        help="emu: the CUDA plan with cnnext's kernels emulated (use --tiny)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few layers, batch 1 and 32, short timing (about a minute)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (tests of the harness)")
    if families:
        parser.add_argument(
            "--only",
            type=_csv(),
            default=FAMILIES,
            help="comma list of families: conv, fused, pool, host",
        )
        parser.add_argument(
            "--algos",
            type=_csv(),
            default=("direct", "im2col"),
            help="cnnext conv algorithms: direct, im2col",
        )
        parser.add_argument(
            "--fused-algos",
            type=_csv(),
            default=("auto",),
            help="algo values of the fused op: auto, direct, im2col (default auto)",
        )
    parser.add_argument(
        "--direct-variants",
        type=_csv(),
        help="CUDA direct kernels: auto (implicit GEMM), naive, tiled (default: all)",
    )
    parser.add_argument("--threads", default="1,all", help="CPU thread counts (default 1,all)")
    parser.add_argument("--batches", type=_csv(int), help="batch sizes (default 1,32,128)")
    parser.add_argument("--passes", type=_csv(), default=PASSES, help="fwd, fwd+bwd")
    parser.add_argument(
        "--precisions",
        type=_csv(),
        default=PRECISIONS,
        help="CUDA conv precisions: fp32 (TF32 off), tf32, fp16, bf16",
    )
    parser.add_argument("--channels-last", action="store_true", help="also NHWC inputs")
    parser.add_argument("--layers", help="regular expression on layer ids (net.name)")
    parser.add_argument("--min-time", type=float, help="blocked_autorange min_run_time (s)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="skip cases estimated above this fraction of available memory",
    )
    parser.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="CUDA: skip the cudnn.benchmark=True child process",
    )
    parser.add_argument("--out", type=Path, help="directory for the JSON/MD/PNG results")
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the cases the options select and exit (needs no GPU)",
    )


def config_from_args(args: argparse.Namespace, **fixed: Any) -> Config:
    for precision in args.precisions:
        if precision not in PRECISIONS:
            raise SystemExit(f"--precisions: unknown {precision!r}; expected {PRECISIONS}")
    for pass_ in args.passes:
        if pass_ not in PASSES:
            raise SystemExit(f"--passes: unknown {pass_!r}; expected {PASSES}")
    values = dict(
        device=args.device,
        quick=args.quick,
        tiny=args.tiny,
        threads=args.threads,
        batches=args.batches,
        passes=args.passes,
        precisions=args.precisions,
        layouts=("NCHW", "NHWC") if args.channels_last else ("NCHW",),
        layers=args.layers,
        min_run_time=args.min_time,
        rounds=args.rounds,
        memory_fraction=args.memory_fraction,
        cudnn_benchmark=not args.no_cudnn_benchmark,
    )
    if hasattr(args, "only"):
        values["families"] = args.only
    if hasattr(args, "algos"):
        values["algos"] = args.algos
    if getattr(args, "direct_variants", None):
        values["direct_variants"] = args.direct_variants
    if hasattr(args, "fused_algos"):
        values["fused_algos"] = args.fused_algos
    values.update(fixed)
    return Config(**values)


def report(results: Results, out_dir: Path | None) -> dict[str, Path]:
    """Print the Compare table and the summary; write the result files when ``out_dir``."""
    print(compare_table(results))
    print("\nGeometric-mean speed-ups of cnnext (>1: cnnext faster):")
    for s in summary(results):
        print(
            f"  {s['op']:<18} {s['pass']:<8} {s['precision']:<5} {s['threads']:>3} thr  "
            f"{s['impl']:<20} vs {s['baseline']:<14} {s['geomean']:6.2f}x  ({s['cases']} cases)"
        )
    host = host_table(results)
    if host:
        print("\nHost cost per call (1 thread; ratio: torch / cnnext, >1: cnnext faster):")
        print(host)
    for line in results.notes + results.skipped:
        print(f"note: {line}")
    if out_dir is None:
        return {}
    paths = write_results(results, out_dir)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def script_main(
    doc: str,
    argv: Sequence[str] | None = None,
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
    **fixed: Any,
) -> tuple[Results, argparse.Namespace]:
    """The command line of a per-family script: the shared options (plus ``extend``'s), run
    with the ``fixed`` config fields, print the report."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, families=False)
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args, **fixed)
    if args.list:
        print(list_cases(cfg))
        return Results(meta={}), args
    results = run_suite(cfg)
    report(results, args.out)
    return results, args


def list_cases(cfg: Config) -> str:
    """The cases of ``cfg``, one per line, then the notes and a count; builds no tensor."""
    notes: list[str] = []
    specs = enumerate_specs(cfg, notes)
    lines = [spec.title for spec in specs]
    lines += [f"note: {note}" for note in notes]
    lines.append(f"{len(specs)} cases")
    return "\n".join(lines)
