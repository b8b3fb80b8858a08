"""Convert torchvision's ResNet-18 to cnnext layers, check it computes the same, and time it.

    python examples/convert_resnet.py                # 224x224, batches 1 and 8 (~10 s, 2 cores)
    python examples/convert_resnet.py --threads 1 --batch 16
    python examples/convert_resnet.py --algo im2col --no-fuse
    python examples/convert_resnet.py --size 32 --batch 1 --threads 1    # a smoke test (~5 s)

The model is ``torchvision.models.resnet18(weights=None)`` (random weights from a fixed seed;
nothing is downloaded). A deep copy goes through ``cnnext.convert``, which prints what it
replaced, what it fused into ``ConvBNReLU2d`` and what it left alone and why. The two models are
then compared:

* eval mode: the logits of both, on the batches that are timed afterwards;
* train mode (on fresh copies of both, at ``--train-size``): the logits, the input's gradient,
  every parameter's gradient (by the original's name; ``report.map_key`` translates the names
  of fused layers) and the BatchNorm running statistics after the step.

Each comparison prints its max-abs error and its tolerance; the exit status is 1 on a mismatch.
Last comes a CPU timing of the eval forward of both models (``torch.utils.benchmark.Timer``,
median ms) at batch 1 and ``--batch``.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.utils import benchmark

import cnnext

# err <= ATOL + RTOL * max|reference|, per tensor, in float32. Eval logits agree to ~1e-6; train
# mode goes through 20 batch-statistics BatchNorms, whose backward amplifies rounding (the
# converted model folds conv + BN into one op and sums in another order).
EVAL_TOL = (1e-5, 1e-5)
TRAIN_TOL = (1e-5, 1e-3)


@dataclass
class Check:
    """One comparison of the converted model against the original."""

    what: str
    max_abs_err: float
    ref_max_abs: float
    tol: float
    where: str = ""  # for a summary of several tensors: the worst one

    @property
    def ok(self) -> bool:
        """Whether the error is within the tolerance (NaN never is)."""
        return self.max_abs_err <= self.tol

    def line(self) -> str:
        """``match    eval logits [8, 3, 224, 224]  max-abs error 1.91e-06 (tolerance ...)``."""
        verdict = "match   " if self.ok else "MISMATCH"
        where = f" at {self.where}" if self.where else ""
        return (
            f"{verdict} {self.what:<42} max-abs error {self.max_abs_err:.2e} "
            f"(tolerance {self.tol:.1e}, max |ref| {self.ref_max_abs:.2e}){where}"
        )


def compare(what: str, ref: torch.Tensor, got: torch.Tensor, tol: tuple[float, float]) -> Check:
    """The max-abs error of ``got`` against ``ref`` (same shape) and its tolerance."""
    if ref.shape != got.shape:
        return Check(f"{what} (shape {list(got.shape)} != {list(ref.shape)})", float("inf"), 0, 0)
    ref64, got64 = ref.detach().double(), got.detach().double()
    err = (ref64 - got64).abs().max().item() if ref.numel() else 0.0
    scale = ref64.abs().max().item() if ref.numel() else 0.0
    if err != err:  # NaN
        err = float("inf")
    return Check(what, err, scale, tol[0] + tol[1] * scale)


def worst(what: str, checks: list[Check]) -> Check:
    """The check with the largest error relative to its tolerance, relabelled ``what``."""
    bad = max(checks, key=lambda c: c.max_abs_err / c.tol if c.tol else float("inf"))
    failed = sum(not c.ok for c in checks)
    label = f"{what} (worst of {len(checks)}{f', {failed} failed' if failed else ''})"
    return Check(label, bad.max_abs_err, bad.ref_max_abs, bad.tol, where=bad.what)


def build(seed: int, fuse: bool, algo: str) -> tuple[nn.Module, nn.Module, cnnext.ConvertReport]:
    """ResNet-18 with random weights (``seed``) and its cnnext conversion (of a deep copy)."""
    torch.manual_seed(seed)
    original = torchvision.models.resnet18(weights=None)
    converted, report = cnnext.convert(
        copy.deepcopy(original), fuse=fuse, algo=algo, return_report=True
    )
    return original, converted, report


@torch.no_grad()
def check_eval(
    original: nn.Module, converted: nn.Module, inputs: dict[int, torch.Tensor]
) -> list[Check]:
    """Eval-mode logits of both models on each input (``Tensor[N, 3, S, S]``, keyed by N)."""
    original.eval()
    converted.eval()
    return [
        compare(f"eval logits {list(x.shape)}", original(x), converted(x), EVAL_TOL)
        for x in inputs.values()
    ]


def check_train(
    original: nn.Module,
    converted: nn.Module,
    report: cnnext.ConvertReport,
    size: int,
    seed: int,
) -> list[Check]:
    """One train-mode forward + backward of copies of both models on a ``Tensor[2, 3, S, S]``:
    logits, input gradient, parameter gradients and BatchNorm running statistics."""
    ref_model, new_model = copy.deepcopy(original).train(), copy.deepcopy(converted).train()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 3, size, size, generator=gen)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = ref_model(x_ref), new_model(x_new)
    weight = torch.randn(out_ref.shape, generator=gen)  # a loss whose gradient is not uniform
    (out_ref * weight).sum().backward()
    (out_new * weight).sum().backward()

    checks = [
        compare(f"train logits {list(out_ref.shape)}", out_ref, out_new, TRAIN_TOL),
        compare(f"train grad of input {list(x.shape)}", x_ref.grad, x_new.grad, TRAIN_TOL),
    ]
    new_params = dict(new_model.named_parameters())
    param_checks = []
    for name, p in ref_model.named_parameters():
        q = new_params.get(report.map_key(name))
        if q is None or p.grad is None or q.grad is None:
            missing = "parameter" if q is None else "gradient"
            param_checks.append(Check(f"{name}: no {missing}", float("inf"), 0.0, 0.0))
            continue
        param_checks.append(compare(name, p.grad, q.grad, TRAIN_TOL))
    checks.append(worst("train grads of parameters", param_checks))
    new_buffers = dict(new_model.named_buffers())
    stat_checks = [
        compare(name, b, new_buffers[report.map_key(name)], TRAIN_TOL)
        for name, b in ref_model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    ]
    checks.append(worst("train BN running stats", stat_checks))
    for c in param_checks + stat_checks:
        if not c.ok:
            print(f"  {c.line()}")
    return checks


def time_forward(
    model: nn.Module, x: torch.Tensor, threads: int, min_run_time: float, label: str
) -> float:
    """Median ms of ``model(x)`` in eval mode under ``no_grad``."""
    model.eval()
    timer = benchmark.Timer(
        stmt="model(x)",
        setup="torch.set_grad_enabled(False)",
        globals={"model": model, "x": x, "torch": torch},
        num_threads=threads,
        label="resnet18 eval forward",
        description=label,
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224, help="input height and width for timing")
    p.add_argument("--batch", type=int, default=8, help="the batch timed besides batch 1")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--algo", default="auto", choices=["auto", "direct", "im2col"])
    p.add_argument("--no-fuse", action="store_true", help="do not fuse Conv2d->BN->ReLU")
    p.add_argument("--train-size", type=int, default=64, help="input side of the train check")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing")
    p.add_argument("--no-timing", action="store_true", help="only convert and compare")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Convert, compare and time; 0 when every comparison matched, else 1."""
    args = parse_args(argv)
    if args.train_size < 64:
        # At 32x32 layer4's BatchNorms see 1x1 maps: 2 values per channel at batch 2, where
        # batch-statistics BN's backward is ill-conditioned (|grad| ~1e5, rounding-dominated).
        raise SystemExit("--train-size must be at least 64 (layer4's BatchNorms need 2x2 maps)")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    original, converted, report = build(args.seed, not args.no_fuse, args.algo)
    print(report)
    print(
        f"summary: {len(report.fused)} Conv2d+BatchNorm2d+ReLU chains fused, "
        f"{len(report.replaced)} modules replaced, {len(report.left)} left unchanged "
        f"(chains found by {report.method})"
    )
    print()

    gen = torch.Generator().manual_seed(args.seed)
    inputs = {
        n: torch.randn(n, 3, args.size, args.size, generator=gen) for n in sorted({1, args.batch})
    }
    checks = check_eval(original, converted, inputs)
    checks += check_train(original, converted, report, args.train_size, args.seed)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    worst_err = max(c.max_abs_err for c in checks)
    print(
        f"outputs {'MISMATCH' if failed else 'match'}: "
        f"{len(checks) - len(failed)}/{len(checks)} checks passed, "
        f"largest max-abs error {worst_err:.2e}"
    )

    if not args.no_timing:
        print()
        print(
            f"CPU eval forward, {args.size}x{args.size}, {args.threads} thread(s), "
            f"median ms (torch.utils.benchmark.Timer.blocked_autorange):"
        )
        print(f"  {'batch':>5}  {'torch':>10}  {'cnnext':>10}  {'speed-up':>8}  (torch / cnnext)")
        for n, x in inputs.items():
            ms_ref = time_forward(original, x, args.threads, args.min_run_time, "torch")
            ms_new = time_forward(converted, x, args.threads, args.min_run_time, "cnnext")
            print(f"  {n:>5}  {ms_ref:>10.1f}  {ms_new:>10.1f}  {ms_ref / ms_new:>7.2f}x")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
