"""The layers the suite times: conv and pool shapes of real networks, and the tiny shapes of the
harness tests and of the host-cost family."""

from __future__ import annotations

from dataclasses import dataclass

import cnnext

FAMILIES = ("conv", "fused", "pool", "host")


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
# On CUDA: the rest of ResNet-18's distinct 224x224 shapes (each stage's strided first conv and
# its 1x1 downsample), so the GPU suite covers the whole network.
RESNET18_224_STRIDED = [
    ConvLayer("resnet18-224", "layer2.0.conv1", 64, 56, 128, 3, stride=2, padding=1),
    ConvLayer("resnet18-224", "layer2.0.downsample", 64, 56, 128, 1, stride=2),
    ConvLayer("resnet18-224", "layer3.0.conv1", 128, 28, 256, 3, stride=2, padding=1),
    ConvLayer("resnet18-224", "layer3.0.downsample", 128, 28, 256, 1, stride=2),
    ConvLayer("resnet18-224", "layer4.0.conv1", 256, 14, 512, 3, stride=2, padding=1),
    ConvLayer("resnet18-224", "layer4.0.downsample", 256, 14, 512, 1, stride=2),
]
GPU_CONV_LAYERS = CONV_LAYERS + RESNET18_224_STRIDED
# Conv + BatchNorm + ReLU: every conv layer of the networks that have BatchNorm.
FUSED_LAYERS = [layer for layer in CONV_LAYERS if layer.net != "lenet5"]
GPU_FUSED_LAYERS = [layer for layer in GPU_CONV_LAYERS if layer.net != "lenet5"]
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
    "host": {"host.conv3x3", "host.pool2"},
}
# Harness tests: a few hundred emulated CUDA threads per launch at most.
TINY_CONV = [
    ConvLayer("tiny", "conv3x3", 3, 9, 4, 3, padding=1),
    ConvLayer("tiny", "conv1x1.s2", 4, 8, 5, 1, stride=2),
]
TINY_POOL = [PoolLayer("tiny", "pool3x3.s2", 3, 9, 3, 2, 1)]
BATCHES, QUICK_BATCHES, TINY_BATCHES = (1, 32, 128), (1, 32), (2,)
# On CUDA the 224x224 layers always run at training batch sizes too (unless --batches is given).
GPU_224_BATCHES = (32, 128)
# Above this many input pixels, --quick times batch 1 only (on the CPU).
QUICK_MAX_PIXELS_BATCHED = 64 * 64

# Host cost: tensors so small that a call is all framework (dispatch, autograd, allocation).
HOST_CONV = ConvLayer("host", "conv3x3", 4, 6, 4, 3, padding=1)
HOST_POOL = PoolLayer("host", "pool2", 4, 6, 2, 2)
HOST_BATCH = 1
# op: (layer, passes); "fwd" is a forward under no_grad.
HOST_CASES: dict[str, tuple[ConvLayer | PoolLayer, tuple[str, ...]]] = {
    "host.F.conv2d": (HOST_CONV, ("fwd", "fwd+bwd")),
    "host.nn.Conv2d": (HOST_CONV, ("fwd", "fwd+bwd")),
    "host.nn.MaxPool2d": (HOST_POOL, ("fwd", "fwd+bwd")),
    "host.nn.AvgPool2d": (HOST_POOL, ("fwd", "fwd+bwd")),
    "host.nn.ConvBNReLU2d.train": (HOST_CONV, ("fwd+bwd",)),
    "host.nn.ConvBNReLU2d.eval": (HOST_CONV, ("fwd",)),
}


def layers_for(family: str, tiny: bool, gpu: bool = False) -> list[ConvLayer] | list[PoolLayer]:
    """The layers of a family (``gpu``: the CUDA suite's, with all of ResNet-18 at 224x224)."""
    if family == "pool":
        return TINY_POOL if tiny else POOL_LAYERS
    if family == "host":
        return list(dict.fromkeys(layer for layer, _ in HOST_CASES.values()))
    if tiny:
        return TINY_CONV
    if family == "conv":
        return GPU_CONV_LAYERS if gpu else CONV_LAYERS
    return GPU_FUSED_LAYERS if gpu else FUSED_LAYERS


def _table_cases() -> dict[str, tuple[str, ...]]:
    """Each family's cases, from the op table (``cnnext.ops.OPS``: every op names the
    benchmark family and cases that time it)."""
    cases: dict[str, tuple[str, ...]] = {}
    for row in cnnext.ops.OPS:
        family, names = row.bench
        cases[family] = tuple(dict.fromkeys(cases.get(family, ()) + names))
    return cases


OPS = {**_table_cases(), "host": tuple(HOST_CASES)}
