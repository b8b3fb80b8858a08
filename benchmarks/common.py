"""Shared pieces of cnnext's benchmarks: ``run.py`` and the per-family scripts use only these.

One source of truth for
- the shapes: the conv layers of LeNet-5 (28x28), VGG-11 and ResNet-18 on CIFAR-10 (32x32) and
  ResNet-18 at 224x224 (stem and one layer per stage), and the pools of the same networks;
- the cases: per family (``conv``, ``fused``, ``pool``) the cnnext implementations and the
  PyTorch baselines, built on one device plan (``cpu``; ``cuda``; ``emu`` = the CUDA plan with
  cnnext's CUDA kernels run by the emulator on CPU tensors, for testing the harness);
- validation: every implementation against the case's reference, before anything is timed;
- timing: ``torch.utils.benchmark.Timer.blocked_autorange``; on CUDA each call is timed by CUDA
  events after an L2 flush (a buffer larger than L2 is zeroed), the Timer driving the loop;
- machine info and peaks (CPU: a measured sgemm / oneDNN 1x1-conv probe and a copy; GPU:
  datasheet peaks by name), and the reports (Compare table, JSON, Markdown, PNG).

cuDNN keeps one plan per convolution key in a process-wide cache, whether the plan came from
autotuning or from heuristics and whatever ``cudnn.benchmark`` says when it is looked up, so the
benchmark-on baseline (``cuDNN.bench``) is timed in a child process of its own (validated there
against a float64 reference) after the main run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils.benchmark import Compare, Measurement, Timer

BENCH_DIR = Path(__file__).resolve().parent
try:
    import cnnext
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(BENCH_DIR.parent))
    import cnnext

# torch.backends.mkldnn / oneDNN warn about TF32 on Intel GPUs; irrelevant here.
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")

RESULTS_DIR = BENCH_DIR / "results"
FAMILIES = ("conv", "fused", "pool")
PASSES = ("fwd", "fwd+bwd")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}
# Unit roundoff of the arithmetic each precision implies (0: plain fp32 inputs and outputs).
ROUNDOFF = {"fp32": 0.0, "fp64": 0.0, "tf32": 2.0**-11, "fp16": 2.0**-11, "bf16": 2.0**-8}


class ValidationError(AssertionError):
    """An implementation disagrees with the case's reference: nothing of it is timed."""


# ---- shapes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvLayer:
    """A square convolution layer: ``c_in x size x size -> c_out``, ``k x k`` filter."""

    net: str
    name: str
    c_in: int
    size: int
    c_out: int
    k: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def id(self) -> str:
        return f"{self.net}.{self.name}"

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.k) // self.stride + 1

    @property
    def reduction(self) -> int:
        """Terms of each output's sum: ``C_in / groups * k * k``."""
        return self.c_in // self.groups * self.k * self.k

    def flops(self, n: int) -> float:
        """Forward FLOPs (2 per multiply-add) at batch ``n``."""
        return 2.0 * n * self.c_out * self.reduction * self.out_size**2

    def __str__(self) -> str:
        groups = f" g{self.groups}" if self.groups > 1 else ""
        return (
            f"{self.c_in}x{self.size}x{self.size}->{self.c_out} "
            f"k{self.k} s{self.stride} p{self.padding}{groups}"
        )


@dataclass(frozen=True)
class PoolLayer:
    """A square pooling window over ``c x size x size``."""

    net: str
    name: str
    c: int
    size: int
    k: int
    stride: int
    padding: int = 0

    @property
    def id(self) -> str:
        return f"{self.net}.{self.name}"

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.k) // self.stride + 1

    def __str__(self) -> str:
        return f"{self.c}x{self.size}x{self.size} k{self.k} s{self.stride} p{self.padding}"


CONV_LAYERS = [
    ConvLayer("lenet5", "conv1", 1, 28, 6, 5, padding=2),
    ConvLayer("lenet5", "conv2", 6, 14, 16, 5),
    # VGG-11 on CIFAR-10; conv8 has conv7's shape.
    ConvLayer("vgg11-cifar", "conv1", 3, 32, 64, 3, padding=1),
    ConvLayer("vgg11-cifar", "conv2", 64, 16, 128, 3, padding=1),
    ConvLayer("vgg11-cifar", "conv3", 128, 8, 256, 3, padding=1),
    ConvLayer("vgg11-cifar", "conv4", 256, 8, 256, 3, padding=1),
    ConvLayer("vgg11-cifar", "conv5", 256, 4, 512, 3, padding=1),
    ConvLayer("vgg11-cifar", "conv6", 512, 4, 512, 3, padding=1),
    ConvLayer("vgg11-cifar", "conv7", 512, 2, 512, 3, padding=1),
    # ResNet-18 on CIFAR-10 (3x3 stem, no max pool): every distinct conv shape.
    ConvLayer("resnet18-cifar", "conv1", 3, 32, 64, 3, padding=1),
    ConvLayer("resnet18-cifar", "layer1", 64, 32, 64, 3, padding=1),
    ConvLayer("resnet18-cifar", "layer2.0.conv1", 64, 32, 128, 3, stride=2, padding=1),
    ConvLayer("resnet18-cifar", "layer2.0.shortcut", 64, 32, 128, 1, stride=2),
    ConvLayer("resnet18-cifar", "layer2", 128, 16, 128, 3, padding=1),
    ConvLayer("resnet18-cifar", "layer3.0.conv1", 128, 16, 256, 3, stride=2, padding=1),
    ConvLayer("resnet18-cifar", "layer3.0.shortcut", 128, 16, 256, 1, stride=2),
    ConvLayer("resnet18-cifar", "layer3", 256, 8, 256, 3, padding=1),
    ConvLayer("resnet18-cifar", "layer4.0.conv1", 256, 8, 512, 3, stride=2, padding=1),
    ConvLayer("resnet18-cifar", "layer4.0.shortcut", 256, 8, 512, 1, stride=2),
    ConvLayer("resnet18-cifar", "layer4", 512, 4, 512, 3, padding=1),
    # ResNet-18 at 224x224: the stem and one 3x3 layer per stage.
    ConvLayer("resnet18-224", "stem", 3, 224, 64, 7, stride=2, padding=3),
    ConvLayer("resnet18-224", "layer1", 64, 56, 64, 3, padding=1),
    ConvLayer("resnet18-224", "layer2", 128, 28, 128, 3, padding=1),
    ConvLayer("resnet18-224", "layer3", 256, 14, 256, 3, padding=1),
    ConvLayer("resnet18-224", "layer4", 512, 7, 512, 3, padding=1),
]
# Conv + BatchNorm + ReLU: every conv layer of the networks that have BatchNorm.
FUSED_LAYERS = [layer for layer in CONV_LAYERS if layer.net != "lenet5"]
# Pool shapes of the networks (ResNet-18: the stem's 3x3/s2 pool, the global pool of the head);
# max and avg pooling both run on each.
POOL_LAYERS = [
    PoolLayer("lenet5", "pool1", 6, 28, 2, 2),
    PoolLayer("lenet5", "pool2", 16, 10, 2, 2),
    PoolLayer("vgg11-cifar", "pool1", 64, 32, 2, 2),
    PoolLayer("vgg11-cifar", "pool2", 128, 16, 2, 2),
    PoolLayer("vgg11-cifar", "pool3", 256, 8, 2, 2),
    PoolLayer("vgg11-cifar", "pool4", 512, 4, 2, 2),
    PoolLayer("vgg11-cifar", "pool5", 512, 2, 2, 2),
    PoolLayer("resnet18-cifar", "head_pool", 512, 4, 4, 4),
    PoolLayer("resnet18-224", "stem_pool", 64, 112, 3, 2, 1),
    PoolLayer("resnet18-224", "head_pool", 512, 7, 7, 7),
]
QUICK_LAYERS = {
    "conv": {"lenet5.conv1", "resnet18-cifar.layer1", "resnet18-cifar.layer4", "resnet18-224.stem"},
    "fused": {"resnet18-cifar.layer3", "resnet18-224.layer4"},
    "pool": {"lenet5.pool1", "vgg11-cifar.pool1", "resnet18-224.stem_pool"},
}
# Harness tests: a few hundred emulated CUDA threads per launch at most.
TINY_CONV = [
    ConvLayer("tiny", "conv3x3", 3, 9, 4, 3, padding=1),
    ConvLayer("tiny", "conv1x1.s2", 4, 8, 5, 1, stride=2),
]
TINY_POOL = [PoolLayer("tiny", "pool3x3.s2", 3, 9, 3, 2, 1)]
BATCHES, QUICK_BATCHES, TINY_BATCHES = (1, 32, 128), (1, 32), (2,)
# Above this many input pixels, --quick times batch 1 only.
QUICK_MAX_PIXELS_BATCHED = 64 * 64


def layers_for(family: str, tiny: bool) -> list[ConvLayer] | list[PoolLayer]:
    if family == "pool":
        return TINY_POOL if tiny else POOL_LAYERS
    if tiny:
        return TINY_CONV
    return CONV_LAYERS if family == "conv" else FUSED_LAYERS


OPS = {
    "conv": ("conv2d",),
    "fused": ("conv_bn_relu.eval", "conv_bn_relu.train"),
    "pool": ("max_pool2d", "avg_pool2d"),
}


# ---- configuration ------------------------------------------------------------------------------


@dataclass
class Config:
    """What to run. ``None`` fields take the defaults of the mode (full, ``quick`` or ``tiny``).

    Attributes:
        device: ``cpu``, ``cuda`` or ``emu`` (the CUDA plan on CPU tensors, cnnext's CUDA kernels
            run by the emulator: tiny shapes only, the numbers mean nothing).
        families: any of ``conv``, ``fused``, ``pool``.
        algos: conv algorithms of cnnext to time (``direct``, ``im2col``).
        threads: comma list of CPU thread counts, ``all`` = torch's default.
        precisions: CUDA conv precisions (``fp32`` = TF32 off, ``tf32``, ``fp16``, ``bf16``);
            pooling, the fused op and every CPU case run in fp32.
        layouts: ``NCHW`` and/or ``NHWC`` (channels_last inputs).
        layers: regular expression on the layer id (``net.name``).
        cudnn_benchmark: on CUDA, time the ``cudnn.benchmark=True`` baseline in a child process.
    """

    device: str = "cpu"
    families: tuple[str, ...] = FAMILIES
    algos: tuple[str, ...] = ("direct", "im2col")
    quick: bool = False
    tiny: bool = False
    threads: str = "1,all"
    batches: tuple[int, ...] | None = None
    passes: tuple[str, ...] = PASSES
    precisions: tuple[str, ...] = PRECISIONS
    layouts: tuple[str, ...] = ("NCHW",)
    layers: str | None = None
    min_run_time: float | None = None
    rounds: int | None = None
    memory_fraction: float = 0.5
    cudnn_benchmark: bool = True
    verbose: bool = True

    @property
    def mode(self) -> str:
        return "tiny" if self.tiny else "quick" if self.quick else "full"

    def timing(self) -> tuple[float, int]:
        """(``min_run_time`` seconds per blocked_autorange, interleaved rounds)."""
        default = {"tiny": (0.001, 1), "quick": (0.02, 1), "full": (0.25, 2)}[self.mode]
        return (
            default[0] if self.min_run_time is None else self.min_run_time,
            default[1] if self.rounds is None else self.rounds,
        )

    def batch_list(self) -> tuple[int, ...]:
        if self.batches is not None:
            return self.batches
        return {"tiny": TINY_BATCHES, "quick": QUICK_BATCHES, "full": BATCHES}[self.mode]

    def thread_list(self, plan: Plan) -> list[int]:
        if plan.kind == "cuda":
            return [torch.get_num_threads()]
        return parse_threads(self.threads)


def parse_threads(spec: str) -> list[int]:
    """``"1,all"`` -> ``[1, torch.get_num_threads()]`` (sorted, without repeats)."""
    counts = set()
    for item in spec.split(","):
        item = item.strip()
        counts.add(torch.get_num_threads() if item == "all" else int(item))
    if not counts or min(counts) < 1:
        raise ValueError(f"--threads: expected positive counts or 'all', got {spec!r}")
    return sorted(counts)


@dataclass(frozen=True)
class Plan:
    """Where the cases run: ``cpu``, ``cuda`` or ``emu`` (CUDA kernels emulated on the CPU)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda", "emu"):
            raise ValueError(f"device must be cpu, cuda or emu, got {self.kind!r}")
        if self.kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no GPU visible")
        if self.kind == "emu" and not cnnext.EMULATOR_AVAILABLE:
            raise RuntimeError("--device emu: cnnext._C_emu was not built")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.kind == "cuda" else "cpu")

    @property
    def gpu_algorithms(self) -> bool:
        """Whether cnnext's CUDA kernels run (really or emulated)."""
        return self.kind != "cpu"

    @property
    def conv_library(self) -> str:
        """What ``F.conv2d`` runs on this device."""
        return "cuDNN" if self.kind == "cuda" else "oneDNN"

    def cnnext_context(self) -> contextlib.AbstractContextManager:
        return cnnext.emulate_cuda() if self.kind == "emu" else contextlib.nullcontext()


@dataclass(frozen=True)
class Spec:
    """One case: an op of a family on a layer at a batch size, pass, precision and layout."""

    family: str
    op: str
    layer: ConvLayer | PoolLayer
    batch: int
    pass_: str
    precision: str = "fp32"
    layout: str = "NCHW"

    @property
    def title(self) -> str:
        return f"{self.op} {self.layer.id} N={self.batch} {self.pass_} {self.precision}" + (
            "" if self.layout == "NCHW" else f" {self.layout}"
        )

    @property
    def label(self) -> str:
        """Compare-table group."""
        return f"{self.op} | {self.pass_} | {self.precision}"

    @property
    def sub_label(self) -> str:
        """Compare-table row."""
        layout = "" if self.layout == "NCHW" else f" {self.layout}"
        return f"{self.layer.id} N={self.batch}{layout}"

    @property
    def seed(self) -> int:
        return zlib.crc32(f"{self.family}|{self.layer.id}|{self.batch}".encode())

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_type"] = type(self.layer).__name__
        return d

    @staticmethod
    def from_json(d: dict) -> Spec:
        d = dict(d)
        cls = {"ConvLayer": ConvLayer, "PoolLayer": PoolLayer}[d.pop("layer_type")]
        return Spec(**{**d, "layer": cls(**d["layer"])})


def enumerate_specs(cfg: Config, notes: list[str]) -> list[Spec]:
    """Every case the configuration asks for, in run order."""
    pattern = re.compile(cfg.layers) if cfg.layers else None
    specs = []
    for family in cfg.families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        precisions = cfg.precisions if (family == "conv" and cfg.device != "cpu") else ("fp32",)
        for layer in layers_for(family, cfg.tiny):
            if cfg.quick and not cfg.tiny and layer.id not in QUICK_LAYERS[family]:
                continue
            if pattern and not pattern.search(layer.id):
                continue
            for batch in cfg.batch_list():
                big = layer.size * layer.size > QUICK_MAX_PIXELS_BATCHED
                if cfg.quick and batch > 1 and big:
                    continue
                for pass_ in cfg.passes:
                    for precision in precisions:
                        for layout in cfg.layouts:
                            for op in OPS[family]:
                                specs.append(
                                    Spec(family, op, layer, batch, pass_, precision, layout)
                                )
    return specs


# ---- cases --------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation of a case.

    Attributes:
        name: its column in the tables (``cnnext.direct``, ``oneDNN``, ...).
        call: the timed call; returns the tensors validation compares (forward outputs, then
            the gradients for forward+backward).
        baseline: a PyTorch baseline (cnnext's rows get a speed-up against each baseline).
        context: flags around every call (validation and timing).
        reset: restores state a call mutates (running statistics) before validation.
        timed: False for a reference that is only used to validate (float64).
    """

    name: str
    call: Callable[[], Any]
    baseline: bool = False
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    reset: Callable[[], None] | None = None
    timed: bool = True


@dataclass
class Case:
    """A spec with its tensors and implementations.

    Attributes:
        work: FLOPs (``unit == "GFLOP/s"``) or bytes moved (``"GB/s"``) of one call.
        reference: the implementation every other one must match.
        primary: the baseline the plot compares against.
        tol: bound on ``max|got - expected| / max|expected|`` per output tensor.
        exact: indices of outputs that must be bit-identical (integer outputs always are).
    """

    spec: Spec
    work: float
    unit: str
    impls: list[Impl]
    reference: str
    primary: str
    tol: float
    exact: tuple[int, ...] = ()
    shape: str = ""
    extra: dict = field(default_factory=dict)


def tolerance(precision: str, reduction: int) -> float:
    """Relative-to-max error bound: the precision's roundoff plus fp32 accumulation error that
    grows like sqrt(terms), with a factor 8 of headroom."""
    return max(1e-5, 8.0 * (ROUNDOFF[precision] + 2.0**-24 * math.sqrt(reduction)))


def _chain(*factories: Callable[[], contextlib.AbstractContextManager]) -> Callable:
    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for f in factories:
                stack.enter_context(f())
            yield

    return context


@contextlib.contextmanager
def _attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def torch_im2col_path() -> contextlib.AbstractContextManager:
    """oneDNN and NNPACK off: ``F.conv2d`` and its backward take aten's ``slow_conv2d``
    (im2col + GEMM) on the CPU."""
    return _chain(
        lambda: _attr(torch.backends.mkldnn, "enabled", False),
        lambda: torch.backends.nnpack.flags(enabled=False),
    )()


def cudnn_benchmark(on: bool) -> contextlib.AbstractContextManager:
    return _attr(torch.backends.cudnn, "benchmark", on)


@contextlib.contextmanager
def precision_flags(precision: str, plan: Plan) -> Iterator[None]:
    """TF32 on for ``tf32`` and explicitly off otherwise, for cuDNN convolutions and cuBLAS
    (cnnext's im2col GEMM follows the matmul flag), through the fp32_precision API only (torch
    refuses to read TF32 state set through a mix of the old and new APIs)."""
    if plan.kind == "cpu":
        yield
        return
    mode = "tf32" if precision == "tf32" else "ieee"
    with (
        _attr(torch.backends.cudnn.conv, "fp32_precision", mode),
        _attr(torch.backends.cuda.matmul, "fp32_precision", mode),
    ):
        yield


def _random(shape: Sequence[int], gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _place(t: torch.Tensor, plan: Plan, dtype: torch.dtype, layout: str = "NCHW") -> torch.Tensor:
    t = t.to(plan.device, dtype)
    if layout == "NHWC" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _outputs(result: Any) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _forward(fn: Callable, args: Sequence) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return fn(*args)

    return call


def _forward_backward(fn: Callable, leaves: Sequence[torch.Tensor], grad: torch.Tensor):
    """``fn(*leaves)`` then the gradients of its first output with respect to ``leaves``."""

    def call() -> tuple:
        out = _outputs(fn(*leaves))
        grads = torch.autograd.grad(out[0], leaves, grad)
        return (*out, *grads)

    return call


def _calls(spec: Spec, fns: dict[str, Callable], inputs: Sequence, grad: torch.Tensor):
    """The timed call of each function for the spec's pass. Forward+backward shares one set of
    leaves (``autograd.grad`` accumulates nothing) that need gradients."""
    if spec.pass_ == "fwd":
        return {name: _forward(fn, inputs) for name, fn in fns.items()}
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return {name: _forward_backward(fn, leaves, grad) for name, fn in fns.items()}


def conv_case(spec: Spec, plan: Plan, algos: Sequence[str], phase: str = "main") -> Case:
    """cnnext's conv algorithms against ``F.conv2d`` (oneDNN / cuDNN, heuristics) and, on the
    CPU, torch's own im2col (``aten._slow_conv2d_forward``, oneDNN and NNPACK off). ``phase ==
    "cudnn-bench"``: only ``F.conv2d`` with ``cudnn.benchmark=True``, against float64."""
    layer, n = spec.layer, spec.batch
    dtype = DTYPES[spec.precision]
    gen = torch.Generator().manual_seed(spec.seed)
    x = _random((n, layer.c_in, layer.size, layer.size), gen)
    c_group = layer.c_in // layer.groups
    w = _random((layer.c_out, c_group, layer.k, layer.k), gen, layer.reduction**-0.5)
    b = _random((layer.c_out,), gen, 0.1)
    grad = _random((n, layer.c_out, layer.out_size, layer.out_size), gen)
    k, s, p, g = (layer.k,) * 2, (layer.stride,) * 2, (layer.padding,) * 2, layer.groups
    inputs = [_place(x, plan, dtype, spec.layout), _place(w, plan, dtype), _place(b, plan, dtype)]
    grad = _place(grad, plan, dtype, spec.layout)
    lib = plan.conv_library
    specials: dict[str, tuple[Callable, bool, Callable]] = {}  # name: (fn, baseline, context)

    def torch_conv(xx, ww, bb):
        return F.conv2d(xx, ww, bb, s, p, 1, g)

    if phase == "cudnn-bench":
        specials[f"{lib}.bench"] = (torch_conv, True, lambda: cudnn_benchmark(True))
        reference = "fp64"
        specials[reference] = (
            lambda xx, ww, bb: F.conv2d(xx.double(), ww.double(), bb.double(), s, p, 1, g),
            True,
            contextlib.nullcontext,
        )
    else:
        reference = lib
        specials[lib] = (torch_conv, True, lambda: cudnn_benchmark(False))
        emulated = plan.cnnext_context
        for algo in algos:
            variants = ("naive", "tiled") if (algo == "direct" and plan.gpu_algorithms) else ("",)
            for variant in variants:

                def ours(xx, ww, bb, algo=algo, variant=variant or "auto"):
                    return cnnext.ops.conv2d(xx, ww, bb, s, p, 1, g, algo=algo, variant=variant)

                name = f"cnnext.{algo}" + (f".{variant}" if variant else "")
                specials[name] = (ours, False, emulated)
        if plan.kind == "cpu" and g == 1:  # slow_conv2d has no groups

            def slow(xx, ww, bb):
                if spec.pass_ == "fwd":
                    return torch.ops.aten._slow_conv2d_forward(xx, ww, k, bb, s, p)
                return F.conv2d(xx, ww, bb, s, p)  # slow_conv2d and its backward

            specials["torch.im2col"] = (slow, True, torch_im2col_path)
    calls = _calls(spec, {name: f for name, (f, _, _) in specials.items()}, inputs, grad)
    impls = [
        Impl(name, calls[name], baseline, context, timed=name != "fp64")
        for name, (_, baseline, context) in specials.items()
    ]
    backward = spec.pass_ != "fwd"
    reduction = layer.reduction
    if backward:
        reduction = max(reduction, layer.c_out * layer.k**2, n * layer.out_size**2)
    extra = {}
    choose = getattr(getattr(cnnext, "_algo", None), "choose", None)
    if choose is not None and phase == "main":
        with plan.cnnext_context():  # the emulated device chooses as CUDA does
            algo, variant = choose(inputs[0], inputs[1], s, p, (1, 1), g)
        extra["auto_pick"] = algo + ("" if variant == "auto" else f".{variant}")
    return Case(
        spec=spec,
        work=layer.flops(n) * (3.0 if backward else 1.0),
        unit="GFLOP/s",
        impls=impls,
        reference=reference,
        primary=f"{lib}.bench" if phase == "cudnn-bench" else lib,
        tol=tolerance(spec.precision, reduction),
        shape=str(layer),
        extra=extra,
    )


def fused_case(spec: Spec, plan: Plan) -> Case:
    """``cnnext.ops.conv_bn_relu`` (BN folded in eval; batch statistics and running-stat
    updates in train) against eager ``F.conv2d -> F.batch_norm -> F.relu``. Each
    implementation updates its own copy of the running statistics; in train they are compared
    after one call. The gradient of the output is zero where the reference pre-activation is
    within 1e-3 of its max from zero, so a ReLU mask that flips on a rounding difference
    cannot fail validation."""
    layer, n = spec.layer, spec.batch
    training = spec.op.endswith("train")
    dtype = DTYPES[spec.precision]
    gen = torch.Generator().manual_seed(spec.seed)
    x = _place(_random((n, layer.c_in, layer.size, layer.size), gen), plan, dtype, spec.layout)
    w = _random((layer.c_out, layer.c_in, layer.k, layer.k), gen, (layer.c_in * layer.k**2) ** -0.5)
    gamma = 1.0 + _random((layer.c_out,), gen, 0.1)
    beta = _random((layer.c_out,), gen, 0.1)
    mean0 = _place(_random((layer.c_out,), gen, 0.1), plan, dtype)
    var0 = _place(1.0 + torch.rand(layer.c_out, generator=gen), plan, dtype)
    w, gamma, beta = (_place(t, plan, dtype) for t in (w, gamma, beta))
    s, p, momentum, eps = (layer.stride,) * 2, (layer.padding,) * 2, 0.1, 1e-5
    with torch.no_grad():
        z = F.batch_norm(
            F.conv2d(x, w, None, s, p), mean0.clone(), var0.clone(), gamma, beta, training
        )
    grad = _place(_random(z.shape, gen), plan, dtype, spec.layout)
    grad[z.abs() <= 1e-3 * z.abs().max()] = 0

    def eager(xx, ww, gg, bb, stats):
        y = F.conv2d(xx, ww, None, s, p)
        return F.relu(F.batch_norm(y, *stats, gg, bb, training, momentum, eps))

    def ours(xx, ww, gg, bb, stats):
        return cnnext.ops.conv_bn_relu(
            input=xx,
            weight=ww,
            conv_bias=None,
            bn_weight=gg,
            bn_bias=bb,
            running_mean=stats[0],
            running_var=stats[1],
            training=training,
            momentum=momentum,
            eps=eps,
            stride=s,
            padding=p,
            dilation=(1, 1),
            groups=1,
        )

    impls = []
    names = {"eager": (eager, True, contextlib.nullcontext)}
    if not training and spec.pass_ == "fwd":
        # torch's own answer for inference: BatchNorm folded once ahead of time.
        with torch.no_grad():
            fw, fb = fuse_conv_bn_weights(w, None, mean0, var0, eps, gamma, beta)

        def folded(xx, ww, gg, bb, stats):
            return F.relu(F.conv2d(xx, fw, fb, s, p))

        names["torch.fuse_eval"] = (folded, True, contextlib.nullcontext)
    names["cnnext.fused"] = (ours, False, plan.cnnext_context)
    leaves = [x, w, gamma, beta]
    for name, (fn, baseline, context) in names.items():
        stats = (mean0.clone(), var0.clone())
        bound = lambda *a, fn=fn, stats=stats: fn(*a, stats)
        call = _calls(spec, {name: bound}, leaves, grad)[name]
        if training:
            call = lambda call=call, stats=stats: (*_outputs(call()), *stats)

        def reset(stats=stats) -> None:
            stats[0].copy_(mean0)
            stats[1].copy_(var0)

        impls.append(Impl(name, call, baseline, context, reset))
    backward = spec.pass_ != "fwd"
    reduction = max(layer.c_in * layer.k**2, n * layer.out_size**2)
    if backward:
        reduction = max(reduction, layer.c_out * layer.k**2)
    return Case(
        spec=spec,
        work=layer.flops(n) * (3.0 if backward else 1.0),
        unit="GFLOP/s",
        impls=impls,
        reference="eager",
        primary="eager",
        tol=tolerance(spec.precision, reduction),
        shape=str(layer),
    )


def pool_case(spec: Spec, plan: Plan) -> Case:
    """``cnnext.ops.max_pool2d(return_indices=True)`` / ``avg_pool2d`` against
    ``F.max_pool2d(return_indices=True)`` / ``F.avg_pool2d``. Max pooling must give identical
    values and argmax. Bytes: the input read and the outputs written once (values + int64
    argmax); backward adds grad_output (and argmax) read and grad_input written."""
    layer, n = spec.layer, spec.batch
    dtype = DTYPES[spec.precision]
    gen = torch.Generator().manual_seed(spec.seed)
    x = _place(_random((n, layer.c, layer.size, layer.size), gen), plan, dtype, spec.layout)
    grad = _place(_random((n, layer.c, layer.out_size, layer.out_size), gen), plan, dtype)
    k, st, p = layer.k, layer.stride, layer.padding
    if spec.op == "max_pool2d":
        fns = {
            "torch": lambda xx: F.max_pool2d(xx, k, st, p, return_indices=True),
            "cnnext": lambda xx: cnnext.ops.max_pool2d(xx, k, st, p, return_indices=True),
        }
        out_bytes = dtype.itemsize + 8
    else:
        fns = {
            "torch": lambda xx: F.avg_pool2d(xx, k, st, p),
            "cnnext": lambda xx: cnnext.ops.avg_pool2d(xx, k, st, p),
        }
        out_bytes = dtype.itemsize
    calls = _calls(spec, fns, [x], grad)
    impls = [
        Impl("torch", calls["torch"], baseline=True),
        Impl("cnnext", calls["cnnext"], context=plan.cnnext_context),
    ]
    in_bytes, outs = x.numel() * dtype.itemsize, n * layer.c * layer.out_size**2
    work = in_bytes + outs * out_bytes
    if spec.pass_ != "fwd":
        work += outs * out_bytes + in_bytes
    return Case(
        spec=spec,
        work=float(work),
        unit="GB/s",
        impls=impls,
        reference="torch",
        primary="torch",
        tol=tolerance(spec.precision, layer.k**2),
        exact=(0, 1) if spec.op == "max_pool2d" else (),
        shape=str(layer),
    )


def build_case(spec: Spec, plan: Plan, cfg: Config, phase: str = "main") -> Case:
    torch.manual_seed(spec.seed)
    if spec.family == "conv":
        return conv_case(spec, plan, cfg.algos, phase)
    if spec.family == "fused":
        return fused_case(spec, plan)
    return pool_case(spec, plan)


def estimate_bytes(spec: Spec, plan: Plan, cfg: Config) -> int:
    """Peak memory of a case, roughly: the inputs and their gradient-leaf copies, outputs and
    gradients of the reference and of the implementation under validation, the eager
    intermediates, torch's whole-batch im2col columns (forward and backward) and workspaces."""
    layer, n = spec.layer, spec.batch
    elem = DTYPES[spec.precision].itemsize
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


# ---- validation ---------------------------------------------------------------------------------


def _results(impl: Impl) -> list[torch.Tensor]:
    with impl.context():
        if impl.reset is not None:
            impl.reset()
        out = _outputs(impl.call())
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


# ---- timing -------------------------------------------------------------------------------------


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


# ---- machine info and peaks ---------------------------------------------------------------------

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


# ---- the run ------------------------------------------------------------------------------------


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
    min_run_time, rounds = cfg.timing()
    threads_list = cfg.thread_list(plan)
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
            with precision_flags(spec.precision, plan):
                case = build_case(spec, plan, cfg, phase)  # fused computes with the flags
                for threads in threads_list:
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
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "common.child_main(sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), str(job)], check=True)
        rows, measurements, skipped = pickle.loads((job / "out.pkl").read_bytes())
    results.rows.extend(rows)
    results.measurements.extend(measurements)
    results.skipped.extend(skipped)


def child_main(job_dir: str) -> None:
    """Entry point of the cuDNN-benchmark child process."""
    job = Path(job_dir)
    payload = json.loads((job / "job.json").read_text())
    config = payload["config"]
    for key in ("families", "algos", "batches", "passes", "precisions", "layouts"):
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
        if row["unit"] == "GB/s":
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


# ---- reports ------------------------------------------------------------------------------------


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
        bases = [i for i in impls if i not in ours]
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
                pct = f" ({r['pct_peak']:.0f}%)" if r["pct_peak"] is not None else ""
                unit = "GF/s" if r["unit"] == "GFLOP/s" else "GB/s"
                cells.append(
                    f"{r['median_ms']:.3f} ms (min {r['min_ms']:.3f}), {r['rate']:.1f} {unit}{pct}"
                )
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


# ---- command line -------------------------------------------------------------------------------


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
            help="comma list of families: conv, fused, pool",
        )
        parser.add_argument(
            "--algos",
            type=_csv(),
            default=("direct", "im2col"),
            help="cnnext conv algorithms: direct, im2col",
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
    results = run_suite(config_from_args(args, **fixed))
    report(results, args.out)
    return results, args
