"""Validation: every implementation of a case against its reference, before it is timed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cases.base import Case, Impl, outputs


class ValidationError(AssertionError):
    """An implementation disagrees with the case's reference: nothing of it is timed."""


def _results(impl: Impl) -> list[torch.Tensor]:
    with impl.context():
        if impl.reset is not None:
            impl.reset()
        out = outputs(impl.call())
    return [t.detach().clone() for t in out if isinstance(t, torch.Tensor)]


def check_close(
    got: Sequence[torch.Tensor],
    expected: Sequence[torch.Tensor],
    tol: float,
    exact: Sequence[int] = (),
    what: str = "",
) -> float:
    """Raise ``ValidationError`` unless each ``got[i]`` matches ``expected[i]``: same shape;
    bit-identical for integer tensors and for indices in ``exact``; else
    ``max|got - expected| / max|expected| <= tol`` (NaN fails), computed in float64.
    Returns the largest of those relative errors."""
    worst = 0.0
    if len(got) != len(expected):
        raise ValidationError(f"{what}: {len(got)} outputs, the reference gives {len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape:
            raise ValidationError(
                f"{what}: output {i} has shape {tuple(g.shape)}, expected {tuple(e.shape)}"
            )
        if i in exact or not e.is_floating_point():
            if g.dtype != e.dtype or not torch.equal(g, e):
                bad = (g != e).sum().item() if g.dtype == e.dtype else "all"
                raise ValidationError(f"{what}: output {i} not identical ({bad} elements differ)")
            continue
        if e.dtype != torch.float64 and g.dtype != e.dtype:
            raise ValidationError(f"{what}: output {i} is {g.dtype}, expected {e.dtype}")
        if g.numel() == 0:
            continue
        g64, e64 = g.double(), e.double()
        scale = e64.abs().max().clamp_min(1e-30)
        err = ((g64 - e64).abs().max() / scale).item()
        if not err <= tol:
            raise ValidationError(
                f"{what}: output {i} relative error {err:.3g} > tolerance {tol:.3g}"
            )
        worst = max(worst, err)
    return worst


def validate(case: Case) -> dict[str, float]:
    """Every implementation of ``case`` against its reference; raises ``ValidationError``.
    Returns each implementation's largest relative error (0 for the reference)."""
    by_name = {impl.name: impl for impl in case.impls}
    expected = _results(by_name[case.reference])
    errors = {case.reference: 0.0}
    for impl in case.impls:
        if impl.name != case.reference:
            what = f"{impl.name} vs {case.reference} on {case.spec.title}"
            errors[impl.name] = check_close(_results(impl), expected, case.tol, case.exact, what)
    return errors
