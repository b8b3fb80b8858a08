"""``cnnext.convert(model)``: swap torch's conv/pool layers in any model for cnnext's, and fuse
Conv2d -> BatchNorm2d -> ReLU chains into ``cnnext.nn.ConvBNReLU2d``.

The original module tree is mutated (a deep copy of it unless ``inplace=True``); no
``GraphModule`` is returned, so the model keeps its class, its ``forward`` and its attributes.
torch.fx is used only to *find* fusable chains, because a chain is defined by data flow (the
conv's output feeds only the BN, the BN's output only a ReLU), which the module tree cannot
show; models that do not trace fall back to consecutive children of ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as cnn

__all__ = ["ConvertReport", "Fusion", "Left", "Replacement", "convert"]


# ---- the report ---------------------------------------------------------------------------------


@dataclass
class Replacement:
    """``path`` (dotted module path) now holds a cnnext module."""

    path: str
    before: str
    after: str


@dataclass
class Fusion:
    """A Conv2d -> BatchNorm2d -> ReLU chain now computed by one ``ConvBNReLU2d``, stored at the
    conv's path; the BN's path holds ``nn.Identity``. The ReLU (a module path, or a description
    of the function call) was replaced by ``nn.Identity`` unless ``relu_kept`` (it is also used
    elsewhere, or it is a function call: relu is idempotent, so keeping it is harmless)."""

    conv: str
    bn: str
    relu: str
    relu_kept: bool
    why_kept: str = ""


@dataclass
class Left:
    """``path`` was left as it was, and why."""

    path: str
    module: str
    reason: str


@dataclass
class ConvertReport:
    """What ``cnnext.convert`` did.

    Attributes:
        method: how chains were found: ``"fx"``, ``"sequential"`` (the model did not trace) or
            ``"none"`` (``fuse=False``, or no fused module available).
        trace_error: why torch.fx could not trace the model, if it could not.
        replaced: modules swapped one for one.
        fused: chains fused into ``ConvBNReLU2d``.
        left: modules (or chains) left unchanged, with the reason.
    """

    method: str = "none"
    trace_error: str | None = None
    replaced: list[Replacement] = field(default_factory=list)
    fused: list[Fusion] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)

    def renamed(self) -> dict[str, str]:
        """Module-path prefixes whose parameters and buffers moved: a fused conv's go from
        ``conv`` to ``conv.0`` and its BN's from ``bn`` to ``conv.1`` (``ConvBNReLU2d`` is an
        ``nn.Sequential`` of the three modules)."""
        moves = {}
        for f in self.fused:
            moves[f.conv] = f"{f.conv}.0" if f.conv else "0"
            moves[f.bn] = f"{f.conv}.1" if f.conv else "1"
        return moves

    def map_key(self, key: str, reverse: bool = False) -> str:
        """A ``state_dict`` key of the original model -> the converted model's key (or back,
        with ``reverse``)."""
        moves = self.renamed()
        if reverse:
            moves = {new: old for old, new in moves.items()}
        prefix, _, leaf = key.rpartition(".")
        return f"{moves[prefix]}.{leaf}" if prefix in moves else key

    def map_state_dict(self, state_dict: dict[str, Any], reverse: bool = False) -> dict[str, Any]:
        """An original model's ``state_dict`` (or ``named_parameters`` dict) with its keys
        renamed for the converted model (identity where nothing was fused); ``reverse``
        renames a converted model's keys back for the original."""
        return {self.map_key(k, reverse): v for k, v in state_dict.items()}

    def table(self) -> str:
        """The report as a plain-text table."""
        lines = [f"cnnext.convert: chains found by: {self.method}"]
        if self.trace_error:
            lines.append(f"  (torch.fx could not trace the model: {self.trace_error})")
        rows = [
            (f.conv, "Conv2d+BatchNorm2d+ReLU", "ConvBNReLU2d", _fusion_note(f)) for f in self.fused
        ]
        rows += [(r.path, r.before, r.after, "") for r in self.replaced]
        lines.append(f"replaced ({len(self.fused)} fused chains, {len(self.replaced)} modules):")
        lines += _rows(("path", "was", "now", "note"), rows)
        lines.append(f"left unchanged or not fused ({len(self.left)}):")
        lines += _rows(
            ("path", "module", "reason"), [(x.path, x.module, x.reason) for x in self.left]
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fusion_note(f: Fusion) -> str:
    relu = f"relu {f.relu} kept ({f.why_kept})" if f.relu_kept else f"relu {f.relu} -> Identity"
    return f"bn {f.bn} -> Identity; {relu}"


def _rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    rows = [header, *[tuple(c or "(root)" if i == 0 else c for i, c in enumerate(r)) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


# ---- module-tree helpers ------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """The replacement runs the replaced module's hooks (the same dicts, so handles made on the
    old module still remove them)."""
    for name in _HOOK_DICTS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def _is_cnnext(module: nn.Module) -> bool:
    return type(module).__module__.startswith("cnnext")


def _name(module: nn.Module) -> str:
    return type(module).__name__


# Reasons for modules cnnext has nothing for (checked with isinstance, in this order).
_UNSUPPORTED: tuple[tuple[type, str], ...] = (
    (nn.ConvTranspose2d, "transposed convolution: no cnnext kernel"),
    (nn.Conv1d, "only 2D convolution has cnnext kernels"),
    (nn.Conv3d, "only 2D convolution has cnnext kernels"),
    (nn.AdaptiveAvgPool2d, "adaptive pooling: no cnnext kernel"),
    (nn.AdaptiveMaxPool2d, "adaptive pooling: no cnnext kernel"),
    (nn.LPPool2d, "power-average pooling: no cnnext kernel"),
    (nn.FractionalMaxPool2d, "fractional max pooling: no cnnext kernel"),
    (
        (nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d),
        "only 2D pooling has cnnext kernels",
    ),
)


def _conv_unsupported(conv: nn.Conv2d) -> str | None:
    """Why cnnext's kernels cannot run this conv's parameters, or None."""
    weight = conv.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet"
    device = weight.device.type
    if device not in ("cpu", "cuda", "meta"):
        return f"device {device!r}: cnnext has CPU and CUDA kernels"
    if device == "cpu" and weight.dtype not in (torch.float32, torch.float64):
        return f"{weight.dtype} on CPU: cnnext's CPU kernels take float32 and float64"
    if not weight.is_floating_point():
        return f"{weight.dtype} weights"
    return None


# ---- finding Conv2d -> BatchNorm2d -> ReLU chains ----------------------------------------------

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_)
_RELU_METHODS = ("relu", "relu_")
_NOT_RELU = {nn.ReLU6: "ReLU6", nn.LeakyReLU: "LeakyReLU", nn.SiLU: "SiLU", nn.GELU: "GELU"}


@dataclass
class _Chain:
    conv: str
    bn: str
    relu: str  # a module path, or "F.relu" / ".relu()" for a call
    relu_module: bool  # the ReLU is a module at path `relu` that may become Identity
    relu_shared: str  # non-empty: why the ReLU module must stay


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, treating cnnext's modules as leaves too (so converting a model twice
    works)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_cnnext(m) or super().is_leaf_module(m, module_qualified_name)


def _fx_chains(model: nn.Module, report: ConvertReport) -> list[_Chain] | None:
    """Chains found by tracing ``model``; None if it does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001  (any failure to trace means "use the fallback")
        report.trace_error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return None
    modules = dict(model.named_modules())
    paths: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(path)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")

    def module_of(node: torch.fx.Node) -> nn.Module | None:
        return modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]

    def shared(path: str) -> str:
        if calls[path] > 1:
            return f"called {calls[path]} times in forward"
        if len(paths[id(modules[path])]) > 1:
            return "registered under several names"
        return ""

    def examine(node: torch.fx.Node, bn_node: torch.fx.Node) -> _Chain | str:
        """The chain starting at conv ``node``, or why it cannot be fused."""
        conv_path, bn_path = str(node.target), str(bn_node.target)
        conv, bn = modules[conv_path], modules[bn_path]
        if type(bn) is not nn.BatchNorm2d:
            return f"{_name(bn)} is not a plain BatchNorm2d"
        if len(node.users) > 1:
            return "the conv's output is also used elsewhere"
        if bn_node.args != (node,) or bn_node.kwargs:
            return "the BN's call has other arguments"
        users = list(bn_node.users)
        if len(users) != 1:
            return f"the BN's output feeds {len(users)} operations, not one ReLU"
        (act,) = users
        act_module = module_of(act)
        if type(act_module) is nn.ReLU:
            relu, relu_module = str(act.target), True
        elif act.op in ("call_function", "call_method") and act.args and act.args[0] is bn_node:
            if act.target not in (_RELU_FUNCTIONS if act.op == "call_function" else _RELU_METHODS):
                return f"the BN's output feeds {_activation_name(act, act_module)}, not a ReLU"
            name = getattr(act.target, "__name__", str(act.target))
            relu, relu_module = (f"{name}()" if act.op == "call_function" else f".{name}()"), False
            inplace = act.kwargs.get("inplace", act.args[1] if len(act.args) > 1 else False)
            if inplace or name.endswith("_"):
                # A call cannot be rewritten, and an in-place relu would overwrite the fused op's
                # output, which its backward keeps.
                return f"the BN's output feeds an in-place {relu}"
        else:
            return f"the BN's output feeds {_activation_name(act, act_module)}, not a ReLU"
        why = shared(conv_path) or shared(bn_path)
        if why:
            return f"the conv or BN module is {why}"
        if _has_hooks(conv) or _has_hooks(bn) or (relu_module and _has_hooks(act_module)):
            return "a module of the chain has hooks, which fusion would skip"
        keep = shared(relu) if relu_module else "a function call"
        return _Chain(conv_path, bn_path, relu, relu_module, keep)

    chains = []
    for node in graph.nodes:
        if type(module_of(node)) is not nn.Conv2d:
            continue
        bn_nodes = [u for u in node.users if isinstance(module_of(u), nn.BatchNorm2d)]
        if not bn_nodes:
            continue
        found = examine(node, bn_nodes[0])
        if isinstance(found, str):
            where = f"{node.target}, {bn_nodes[0].target}"
            report.left.append(Left(where, "Conv2d+BatchNorm2d", f"not fused: {found}"))
        else:
            chains.append(found)
    return chains


def _activation_name(node: torch.fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return _NOT_RELU.get(type(module), _name(module))
    if node.op == "call_function":
        if node.target in (operator.add, torch.add, operator.iadd):
            return "an addition"
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _sequential_chains(model: nn.Module) -> list[_Chain]:
    """Consecutive (Conv2d, BatchNorm2d, ReLU) children of every ``nn.Sequential``."""
    chains = []
    seen: set[int] = set()
    for path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or _is_cnnext(seq) or id(seq) in seen:
            continue
        seen.add(id(seq))
        names = list(seq._modules)
        i = 0
        while i + 2 < len(names):
            a, b, c = (seq._modules[n] for n in names[i : i + 3])
            if (
                type(a) is nn.Conv2d
                and type(b) is nn.BatchNorm2d
                and type(c) is nn.ReLU
                and not any(_has_hooks(m) for m in (a, b, c))
            ):
                full = [f"{path}.{n}" if path else n for n in names[i : i + 3]]
                # Each slot is replaced, not the module object: a ReLU shared with other slots
                # keeps working there.
                chains.append(_Chain(full[0], full[1], full[2], True, ""))
                i += 3
            else:
                i += 1
    return chains


def _fuse(model: nn.Module, chains: list[_Chain], algo: str, report: ConvertReport) -> None:
    fused_cls = cnn.ConvBNReLU2d  # type: ignore[attr-defined]
    for chain in chains:
        conv = model.get_submodule(chain.conv)
        bn = model.get_submodule(chain.bn)
        reason = _conv_unsupported(conv)  # type: ignore[arg-type]
        if reason is None:
            try:
                fused = fused_cls.from_modules(conv, bn, algo=algo)
            except (ValueError, NotImplementedError, TypeError, RuntimeError) as error:
                reason = str(error).splitlines()[0]
        if reason is not None:
            report.left.append(
                Left(f"{chain.conv}, {chain.bn}", "Conv2d+BatchNorm2d+ReLU", f"not fused: {reason}")
            )
            continue
        _set(model, chain.conv, fused)
        _set(model, chain.bn, nn.Identity())
        why_kept = chain.relu_shared
        if chain.relu_module and not chain.relu_shared:
            _set(model, chain.relu, nn.Identity())
        elif chain.relu_module:
            relu = model.get_submodule(chain.relu)
            if relu.inplace:  # type: ignore[union-attr]
                # Applied in place to the fused op's output, which its backward keeps, it would
                # fail autograd's version check; out of place it computes the same everywhere.
                relu.inplace = False  # type: ignore[union-attr]
                why_kept += "; made out-of-place"
        report.fused.append(Fusion(chain.conv, chain.bn, chain.relu, bool(why_kept), why_kept))


# ---- one-for-one replacement --------------------------------------------------------------------


def _factories(algo: str) -> dict[type, Callable[[nn.Module], nn.Module]]:
    table: dict[type, Callable[[nn.Module], nn.Module]] = {
        nn.Conv2d: lambda m: cnn.Conv2d.from_torch(m, algo=algo),  # type: ignore[arg-type]
    }
    for name, torch_cls in (("MaxPool2d", nn.MaxPool2d), ("AvgPool2d", nn.AvgPool2d)):
        cls = getattr(cnn, name, None)
        if cls is not None:
            table[torch_cls] = cls.from_torch
    return table


def _children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in list(module._modules.items()):
        if child is not None:
            yield name, child


def _replace(model: nn.Module, algo: str, report: ConvertReport) -> nn.Module:
    factories = _factories(algo)
    done: dict[int, nn.Module] = {}  # id(old module) -> its replacement (aliases share one)
    visited: set[int] = set()

    def convert_one(module: nn.Module, path: str) -> nn.Module | None:
        reason = _conv_unsupported(module) if type(module) is nn.Conv2d else None  # type: ignore[arg-type]
        if reason is None:
            try:
                new = factories[type(module)](module)
            except (ValueError, NotImplementedError, TypeError) as error:
                reason = str(error).splitlines()[0]
        if reason is not None:
            report.left.append(Left(path, _name(module), reason))
            return None
        _carry_hooks(module, new)
        report.replaced.append(Replacement(path, _name(module), f"cnnext.nn.{_name(new)}"))
        return new

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in _children(module):
            path = f"{prefix}{name}"
            if _is_cnnext(child):
                continue
            if type(child) in factories:
                if id(child) not in done:
                    new = convert_one(child, path)
                    if new is None:
                        continue
                    done[id(child)] = new
                setattr(module, name, done[id(child)])
                continue
            if id(child) in visited:
                continue
            visited.add(id(child))
            _note_unsupported(child, path, factories, report)
            visit(child, f"{path}.")

    if type(model) in factories and not _is_cnnext(model):
        return convert_one(model, "") or model
    visit(model, "")
    return model


def _note_unsupported(
    module: nn.Module, path: str, factories: dict[type, Any], report: ConvertReport
) -> None:
    for cls, reason in _UNSUPPORTED:
        if isinstance(module, cls):
            report.left.append(Left(path, _name(module), reason))
            return
    for base in factories:
        if isinstance(module, base):
            report.left.append(
                Left(
                    path, _name(module), f"a subclass of nn.{base.__name__}; its forward may differ"
                )
            )
            return
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        report.left.append(Left(path, _name(module), "no cnnext module for it in this build"))


# ---- the entry point ----------------------------------------------------------------------------


def convert(
    model: nn.Module,
    *,
    fuse: bool = True,
    algo: str = "auto",
    inplace: bool = False,
    verbose: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Swap ``nn.Conv2d``, ``nn.MaxPool2d`` and ``nn.AvgPool2d`` in ``model`` for cnnext's
    modules, and (``fuse=True``) Conv2d -> BatchNorm2d -> ReLU chains for ``ConvBNReLU2d``.

    Parameters are shared with the module they replace (in the copy, unless ``inplace``), and
    ``state_dict`` keys are unchanged except inside fused chains, where the conv's and BN's
    entries move under the conv's path (``conv.weight`` -> ``conv.0.weight``, ``bn.weight`` ->
    ``conv.1.weight``; ``report.map_state_dict`` translates an old checkpoint).

    A chain is fused when the conv's output is used only by the BN and the BN's output only by
    a ``nn.ReLU`` module, ``F.relu``/``torch.relu`` or ``.relu()``, found with torch.fx when the
    model traces, else among consecutive children of ``nn.Sequential``. The fused module sits
    at the conv's path and the BN's path holds ``nn.Identity``; the ReLU becomes
    ``nn.Identity`` too unless it is also used elsewhere (ResNet's shared ``relu``) or is a
    function call: relu is idempotent, so applying it again is harmless. Anything cnnext cannot
    run is left unchanged, and the report says why.

    Args:
        model: any ``nn.Module`` (the model itself may be a single conv or pool layer).
        fuse: fuse Conv2d -> BatchNorm2d -> ReLU chains.
        algo: the convolution algorithm of the new modules: ``"auto"``, ``"direct"`` or
            ``"im2col"``.
        inplace: convert ``model`` itself instead of a deep copy.
        verbose: print the report as a table.
        return_report: return ``(model, report)`` instead of the model.

    Returns:
        The converted model (the same object when ``inplace``, unless ``model`` itself was a
        single layer), and a ``ConvertReport`` if ``return_report``.
    """
    cnn._check_algo(algo)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConvertReport()
    if fuse:
        if getattr(cnn, "ConvBNReLU2d", None) is None:
            report.left.append(
                Left("*", "ConvBNReLU2d", "no fused module in this build: not fused")
            )
        else:
            chains = _fx_chains(model, report)
            report.method = "fx"
            if chains is None:
                chains, report.method = _sequential_chains(model), "sequential"
            _fuse(model, chains, algo, report)
    model = _replace(model, algo, report)
    if verbose:
        print(report.table())
    return (model, report) if return_report else model
