"""Train a CNN on real handwritten digits with cnnext layers, next to the same CNN in plain torch.

    python examples/train_digits.py                       # ~20 s on 2 idle CPU cores
    python examples/train_digits.py --algo im2col --optimizer sgd --epochs 12
    python examples/train_digits.py --emulate-cuda --subset 256 --epochs 1  # emulated CUDA
    python examples/train_digits.py --dataset mnist --data-dir ~/data --download

The model is the modern pipeline: [Conv -> BN -> ReLU -> MaxPool] x 2 -> Flatten -> Linear ->
BatchNorm1d -> ReLU -> Dropout -> Linear, trained with cross-entropy on the logits (softmax is
inside the loss). The conv blocks are cnnext's fused ``ConvBNReLU2d`` and ``MaxPool2d``; the twin
uses ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` and ``nn.MaxPool2d``, starts from the same
weights and sees the same batches and augmentations, so the two accuracies should agree. The
cnnext checkpoint loads into the twin unchanged (same state_dict keys).

Default data needs no network: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans), upsampled to 28x28 and split 80/20 with a fixed seed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cnnext  # noqa: E402

CLASSES = 10


# ---- data ---------------------------------------------------------------------------------------


def load_digits_28(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], upsampled to 28x28, split 80/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def load_torchvision(name: str, root: str, download: bool):  # noqa: ANN201
    """MNIST, Fashion-MNIST or CIFAR-10 from torchvision (needs the files or a network)."""
    import torchvision

    cls = {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    out = []
    for train in (True, False):
        ds = cls(root, train=train, download=download)
        data = torch.as_tensor(ds.data, dtype=torch.float32) / 255.0
        data = data.permute(0, 3, 1, 2) if data.dim() == 4 else data.unsqueeze(1)
        out += [data.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)]
    return tuple(out)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A small random affine per image (rotation +-10 deg, scale 0.9-1.1, shift +-2 px)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (10 * torch.pi / 180)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2.0 / x.shape[-1] * 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


# ---- models -------------------------------------------------------------------------------------


def conv_block(cin: int, cout: int, algo: str) -> nn.Sequential:
    """Conv -> BN -> ReLU as cnnext's fused ConvBNReLU2d: an nn.Sequential with children 0/1/2,
    so its state_dict keys equal the plain-torch block's."""
    return cnnext.nn.ConvBNReLU2d(cin, cout, 3, padding=1, algo=algo)


def cnnext_model(in_ch: int, side: int, algo: str) -> nn.Sequential:
    flat = 32 * (side // 4) ** 2
    return nn.Sequential(
        conv_block(in_ch, 16, algo),
        cnnext.nn.MaxPool2d(2),
        conv_block(16, 32, algo),
        cnnext.nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(128, CLASSES),
    )


def torch_twin(in_ch: int, side: int) -> nn.Sequential:
    """The same network in plain torch; its state_dict keys equal the cnnext model's."""
    flat = 32 * (side // 4) ** 2

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    return nn.Sequential(
        block(in_ch, 16),
        nn.MaxPool2d(2),
        block(16, 32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(128, CLASSES),
    )


# ---- training -----------------------------------------------------------------------------------


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: str):  # noqa: ANN201
    model.eval()
    loss, correct, preds = 0.0, 0, []
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == yb).sum().item()
        preds.append(pred.cpu())
    return loss / len(y), 100.0 * correct / len(y), torch.cat(preds)


def train(model: nn.Module, name: str, data, args, device: str) -> History:  # noqa: ANN001
    x_train, y_train, x_test, y_test = data
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr * 30, momentum=0.9)
    # The same seed for both models: identical batches, augmentations and dropout masks.
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    aug = torch.Generator().manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 3)
    history = History()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=shuffle)
        seen, loss_sum, correct = 0, 0.0, 0
        bar = tqdm(
            range(0, len(order), args.batch_size),
            desc=f"{name:>6} epoch {epoch}",
            leave=False,
            disable=args.quiet,
        )
        for i in bar:
            idx = order[i : i + args.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample in train mode
                continue
            xb = augment(x_train[idx], aug).to(device)
            yb = y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%")
        test_loss, test_acc, _ = evaluate(model, x_test, y_test, 256, device)
        history.train_loss.append(loss_sum / max(seen, 1))
        history.train_acc.append(100.0 * correct / max(seen, 1))
        history.test_loss.append(test_loss)
        history.test_acc.append(test_acc)
        if not args.quiet:
            print(
                f"{name:>6} epoch {epoch}: train loss {history.train_loss[-1]:.3f} "
                f"acc {history.train_acc[-1]:.1f}% | test loss {test_loss:.3f} acc {test_acc:.1f}%"
            )
    return history


# ---- pictures -----------------------------------------------------------------------------------


def plot_curves(ours: History, twin: History, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(ours.train_loss) + 1)
    for h, label, style in ((ours, "cnnext", "-"), (twin, "torch", "--")):
        ax1.plot(epochs, h.train_loss, style, label=f"{label} train")
        ax1.plot(epochs, h.test_loss, style, label=f"{label} test")
        ax2.plot(epochs, h.train_acc, style, label=f"{label} train")
        ax2.plot(epochs, h.test_acc, style, label=f"{label} test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_filters(model: nn.Sequential, path: Path) -> None:
    w = model[0][0].weight.detach().cpu()  # [16, C_in, 3, 3]
    fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
    for i, ax in enumerate(axes.flat):
        ax.imshow(w[i].mean(0), cmap="coolwarm")
        ax.set_axis_off()
        ax.set_title(f"{i}", fontsize=8)
    fig.suptitle("first-layer 3x3 filters (learned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_feature_maps(model: nn.Sequential, image: torch.Tensor, path: Path, device: str) -> None:
    model.eval()
    stages, x = [("input", image)], image.unsqueeze(0).to(device)
    for i, layer in enumerate(model[:4]):
        x = layer(x)
        if i in (1, 3):
            stages.append((f"after block {i // 2 + 1} {tuple(x.shape[1:])}", x[0].cpu()))
    fig = plt.figure(figsize=(12, 5))
    sub = fig.subfigures(1, 3, width_ratios=[1, 3, 3])
    sub[0].subplots().imshow(stages[0][1][0], cmap="gray")
    sub[0].suptitle("test digit")
    for s, (title, maps) in zip(sub[1:], stages[1:], strict=True):
        axes = s.subplots(4, len(maps) // 4)
        for m, ax in zip(maps, axes.flat, strict=True):
            ax.imshow(m, cmap="viridis")
            ax.set_axis_off()
        s.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(pred: torch.Tensor, target: torch.Tensor, path: Path) -> None:
    cm = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    cm.index_put_((target, pred), torch.ones_like(target), accumulate=True)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    for i in range(CLASSES):
        for j in range(CLASSES):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title="confusion matrix (test set)",
        xticks=range(CLASSES),
        yticks=range(CLASSES),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist", "cifar10"]
    )
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (SGD uses 30x)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--algo", default="auto", choices=["auto", "direct", "im2col"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--emulate-cuda",
        action="store_true",
        help="run cnnext's CUDA kernels on the CPU through the emulator (slow)",
    )
    p.add_argument("--subset", type=int, default=0, help="use only this many training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible (try --emulate-cuda)")
    if args.emulate_cuda and args.device != "cpu":
        raise SystemExit("--emulate-cuda runs the CUDA kernels on CPU tensors: use --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dataset == "digits":
        data = load_digits_28(args.seed)
    else:
        data = load_torchvision(args.dataset, args.data_dir, args.download)
    if args.subset:
        data = (data[0][: args.subset], data[1][: args.subset], *data[2:])
    in_ch, side = data[0].shape[1], data[0].shape[-1]
    print(
        f"data: {args.dataset}, {len(data[1])} train / {len(data[3])} test images of "
        f"{in_ch}x{side}x{side}; cnnext algo={args.algo}"
        f"{', CUDA kernels emulated' if args.emulate_cuda else ''} on {args.device}"
    )

    torch.manual_seed(args.seed)
    twin = torch_twin(in_ch, side)
    ours = cnnext_model(in_ch, side, args.algo)
    ours.load_state_dict(twin.state_dict())  # the same initial weights
    twin_start = copy.deepcopy(twin.state_dict())

    scope = cnnext.emulate_cuda() if args.emulate_cuda else contextlib.nullcontext()
    with scope:
        h_ours = train(ours.to(args.device), "cnnext", data, args, args.device)
        _, acc_ours, pred = evaluate(ours, data[2], data[3], 256, args.device)
    twin.load_state_dict(twin_start)
    h_twin = train(twin.to(args.device), "torch", data, args, args.device)
    _, acc_twin, _ = evaluate(twin, data[2], data[3], 256, args.device)

    checkpoint = out / "cnnext_digits.pt"
    torch.save(ours.state_dict(), checkpoint)
    reloaded = torch_twin(in_ch, side).to(args.device)
    reloaded.load_state_dict(torch.load(checkpoint, map_location=args.device))
    with scope:
        _, acc_reloaded, _ = evaluate(reloaded, data[2], data[3], 256, args.device)

    plot_curves(h_ours, h_twin, out / "curves.png")
    plot_filters(ours, out / "filters.png")
    with scope:
        plot_feature_maps(ours, data[2][0], out / "feature_maps.png", args.device)
    plot_confusion(pred, data[3], out / "confusion.png")

    elapsed = time.perf_counter() - start
    print(f"checkpoint {checkpoint} loads into plain torch: test accuracy {acc_reloaded:.1f}%")
    print(
        "pictures: "
        + ", ".join(
            str(out / n) for n in ("curves.png", "filters.png", "feature_maps.png", "confusion.png")
        )
    )
    print(
        f"test accuracy: cnnext {acc_ours:.1f}% | plain torch {acc_twin:.1f}% "
        f"(difference {abs(acc_ours - acc_twin):.1f} points) in {elapsed:.0f} s"
    )
    return {"cnnext": acc_ours, "torch": acc_twin, "reloaded": acc_reloaded, "seconds": elapsed}


if __name__ == "__main__":
    main()
