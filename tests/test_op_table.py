"""The op table (``cnnext.ops.OPS``) against what is registered and what reads it: every
registered op has exactly one row and a fake kernel whose parameters are the schema's, every row
has OpSpecs in the test module it names, runs under the sanitizers and has benchmark cases."""

from __future__ import annotations

import inspect

import pytest
import torch

import cnnext
from benchmarks.shapes import FAMILIES
from benchmarks.shapes import OPS as BENCH_OPS

from . import opspecs
from .test_sanitizers import OP_TESTS

ROWS = cnnext.ops.OPS
NAMESPACES = ["cnnext"] + (["cnnext_emu"] if cnnext.EMULATOR_AVAILABLE else [])


def _registered(ns: str) -> set[str]:
    """The public ops of namespace ``ns`` (underscored test hooks excluded)."""
    prefix = f"{ns}::"
    names = torch._C._dispatch_get_all_op_names()
    return {n[len(prefix) :] for n in names if n.startswith(prefix) and n[len(prefix)] != "_"}


@pytest.mark.parametrize("ns", NAMESPACES)
def test_every_registered_op_has_exactly_one_row(ns: str) -> None:
    in_rows = [name for row in ROWS for name in row.fakes]
    assert len(in_rows) == len(set(in_rows)), in_rows
    assert set(in_rows) == _registered(ns)
    assert len({row.op for row in ROWS}) == len(ROWS)
    for row in ROWS:
        assert row.op in row.fakes, row.op


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.op)
def test_fakes_mirror_the_schemas(row: cnnext.ops.OpDef) -> None:
    """A fake's parameters are its op's schema arguments, names and defaults: a schema change
    that forgets the fake fails here, not in a traced model."""
    for name, fake in row.fakes.items():
        schema = getattr(torch.ops.cnnext, name).default._schema
        params = inspect.signature(fake).parameters
        assert list(params) == [a.name for a in schema.arguments], name
        for arg in schema.arguments:
            default = params[arg.name].default
            if arg.has_default_value():
                assert default == arg.default_value, (name, arg.name)
            else:
                assert default is inspect.Parameter.empty, (name, arg.name)


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.op)
def test_fakes_are_registered(row: cnnext.ops.OpDef, ns: str) -> None:
    registry = torch._library.simple_registry.singleton
    for name in row.fakes:
        assert registry.find(f"{ns}::{name}").fake_impl.kernel is not None, (ns, name)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.op)
def test_each_row_reaches_the_suites(row: cnnext.ops.OpDef) -> None:
    assert row.function.__name__ in cnnext.ops.__all__
    assert row.family in ("conv", "fused", "max", "avg")
    specs = [s for s in opspecs.SPECS if s.op == row.op]
    assert specs and all(s.family == row.family for s in specs)
    assert row.tests in OP_TESTS
    family, cases = row.bench
    assert family in FAMILIES and set(cases) <= set(BENCH_OPS[family])
