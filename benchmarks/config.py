"""What a run times: its configuration, the device plan and the list of cases."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from dataclasses import dataclass

import torch

import cnnext

from .shapes import (
    BATCHES,
    FAMILIES,
    GPU_224_BATCHES,
    HOST_BATCH,
    HOST_CASES,
    OPS,
    QUICK_BATCHES,
    QUICK_LAYERS,
    QUICK_MAX_PIXELS_BATCHED,
    TINY_BATCHES,
    ConvLayer,
    PoolLayer,
    layers_for,
)

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


@dataclass
class Config:
    """What to run. ``None`` fields take the defaults of the mode (full, ``quick`` or ``tiny``).

    Attributes:
        device: ``cpu``, ``cuda`` or ``emu`` (the CUDA plan on CPU tensors, cnnext's CUDA kernels
            run by the emulator: tiny shapes only, the numbers mean nothing).
        families: any of ``conv``, ``fused``, ``pool``, ``host`` (per-call cost on tiny CPU
            tensors at 1 thread: the host path, not the kernels).
        algos: conv algorithms of cnnext to time (``direct``, ``im2col``).
        direct_variants: CUDA direct kernels to time (``auto``: the implicit GEMM, ``naive``,
            ``tiled``); None: every one cnnext has.
        fused_algos: ``algo`` values of the fused op to time (``auto``, ``direct``,
            ``im2col``); ``auto`` is ``cnnext.fused``, the others ``cnnext.fused.<algo>``.
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
    direct_variants: tuple[str, ...] | None = None
    fused_algos: tuple[str, ...] = ("auto",)
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

    def timing(self, family: str = "") -> tuple[float, int]:
        """(``min_run_time`` seconds per blocked_autorange, interleaved rounds). The host family
        takes more rounds by default: a call of microseconds feels every neighbour's load."""
        default = {"tiny": (0.001, 1), "quick": (0.02, 1), "full": (0.25, 2)}[self.mode]
        if family == "host" and not self.tiny:
            default = (default[0], 5)
        return (
            default[0] if self.min_run_time is None else self.min_run_time,
            default[1] if self.rounds is None else self.rounds,
        )

    def batch_list(self) -> tuple[int, ...]:
        if self.batches is not None:
            return self.batches
        return {"tiny": TINY_BATCHES, "quick": QUICK_BATCHES, "full": BATCHES}[self.mode]

    def thread_list(self, plan: Plan, family: str = "") -> list[int]:
        if family == "host":
            return [1]
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


def batches_for(layer: ConvLayer | PoolLayer, cfg: Config) -> tuple[int, ...]:
    """The configured batches; on the GPU plan the 224x224 layers also at ``GPU_224_BATCHES``
    unless ``--batches`` names them exactly."""
    batches = cfg.batch_list()
    if cfg.device != "cpu" and cfg.batches is None and layer.net == "resnet18-224":
        batches = tuple(sorted(set(batches) | set(GPU_224_BATCHES)))
    return batches


def enumerate_specs(cfg: Config, notes: list[str]) -> list[Spec]:
    """Every case the configuration asks for, in run order."""
    pattern = re.compile(cfg.layers) if cfg.layers else None
    gpu = cfg.device != "cpu"
    specs = []
    for family in cfg.families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if family == "host":
            specs += _host_specs(cfg, pattern, notes)
            continue
        precisions = cfg.precisions if (family == "conv" and gpu) else ("fp32",)
        for layer in layers_for(family, cfg.tiny, gpu):
            if cfg.quick and not cfg.tiny and layer.id not in QUICK_LAYERS[family]:
                continue
            if pattern and not pattern.search(layer.id):
                continue
            for batch in batches_for(layer, cfg):
                big = layer.size * layer.size > QUICK_MAX_PIXELS_BATCHED
                if cfg.quick and batch > 1 and big and not gpu:
                    continue
                for pass_ in cfg.passes:
                    for precision in precisions:
                        for layout in cfg.layouts:
                            for op in OPS[family]:
                                specs.append(
                                    Spec(family, op, layer, batch, pass_, precision, layout)
                                )
    return specs


def _host_specs(cfg: Config, pattern: re.Pattern | None, notes: list[str]) -> list[Spec]:
    """The host-cost cases: CPU only, batch 1, NCHW, fp32, each op in its own passes."""
    if cfg.device != "cpu":
        notes.append("host: CPU tensors only; skipped on --device " + cfg.device)
        return []
    return [
        Spec("host", op, layer, HOST_BATCH, pass_)
        for op, (layer, passes) in HOST_CASES.items()
        if not pattern or pattern.search(layer.id)
        for pass_ in passes
        if pass_ in cfg.passes
    ]
