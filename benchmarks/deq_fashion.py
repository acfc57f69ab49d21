"""A second DEQ task for choosing defaults: a convolutional DEQ on Fashion-MNIST, fixedpoint vs TorchDEQ.

The model is the DEQ tutorial's ResNet cell (implicit-layers-tutorial.org, chapter 4) at CPU size:
a stride-2 stem (1 -> 16 channels, 28x28 -> 14x14) and GroupNorm gives the injection x; the cell
f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z))))))) (16 -> 32 -> 16 channels, 3x3, weights
N(0, 0.01)); then GroupNorm, 2x2 average pooling and a linear readout. Unlike the digits cell it is
not a contraction by construction: GroupNorm keeps the state's scale, and convergence is what training
makes of it.

Everything else is ``deq_digits.py``'s: the same configurations (fixedpoint's defaults and backward
modes, TorchDEQ's), the same weights and batches for all, lockstep timing, the same statistics.
The data is a subset (default: the first 3000 training images and the first 1000 test images), read from the
IDX files of ``--data`` (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist; or the four ``*-ubyte.gz`` files from the Fashion-MNIST repository).
Nothing is downloaded.

Run: ``python benchmarks/deq_fashion.py [--seeds 3] [--epochs 3] [--json runs/deq_fashion.json]``
(``--candidates``: the configurations FixedPoint's defaults were chosen from, as in deq_digits.py).
"""

from __future__ import annotations

import argparse
import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from deq_digits import candidates, configurations, print_report, run
from torch import Tensor, nn

DATA = Path("/usr/share/datasets/fashion-mnist")
CHANNELS, INNER, GROUPS = 16, 32, 4
TRAIN, TEST, EPOCHS, BATCH, LR = 3000, 1000, 3, 64, 1e-3


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} values, its header says {dims}")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {stem}(.gz) in {folder}")


def load_fashion(folder: Path = DATA, train: int = TRAIN, test: int = TEST) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first ``train`` training and ``test`` test images as (N, 1, 28, 28) float32 in [0, 1], labels int64."""
    split = {}
    for part in ("train", "t10k"):
        images = read_idx(_find(folder, f"{part}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{part}-labels-idx1-ubyte"))
        n = train if part == "train" else test
        split[part] = (
            torch.tensor(images[:n], dtype=torch.float32).unsqueeze(1) / 255.0,
            torch.tensor(labels[:n], dtype=torch.long),
        )
    return (*split["train"], *split["t10k"])


class ResNetCell(nn.Module):
    """f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z))))))): the DEQ tutorial's cell, z and x (B, C, H, W)."""

    def __init__(self, channels: int = CHANNELS, inner: int = INNER, groups: int = GROUPS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(groups, c) for c in (inner, channels, channels))
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(y))))


class ConvDEQClassifier(nn.Module):
    """logits = readout(pool(GN(z*))), z* = cell(z*, stem(x)); ``deq`` is set per configuration."""

    def __init__(self, channels: int = CHANNELS, n_classes: int = 10) -> None:
        super().__init__()
        self.inject = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False), nn.GroupNorm(GROUPS, channels)
        )  # (B, 1, 28, 28) -> (B, C, 14, 14)
        self.cell = ResNetCell(channels)
        self.head = nn.Sequential(
            nn.GroupNorm(GROUPS, channels), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(channels * 7 * 7, n_classes)
        )
        self.deq: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.deq(self.inject(x)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--train", type=int, default=TRAIN, help="training images used (the first N)")
    parser.add_argument("--test", type=int, default=TEST, help="test images used (the first N)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--candidates", action="store_true", help="the configurations the defaults were chosen from")
    parser.add_argument("--json", default="runs/deq_fashion.json", help="where to write the results ('' for nowhere)")
    args = parser.parse_args(argv)
    try:
        data = load_fashion(args.data, args.train, args.test)
    except (OSError, ValueError) as err:
        parser.exit(2, f"deq_fashion: {err}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = candidates() if args.candidates else configurations()
    report = run(
        range(args.seeds), args.epochs, configs=configs, batch=args.batch, lr=args.lr, json_path=args.json or None,
        task="fashion-mnist conv", data=data, make_model=ConvDEQClassifier,
    )  # fmt: skip
    s = report["settings"]
    print_report(report, f"Fashion-MNIST conv DEQ ({s['train']} train / {s['test']} test images)", args.json)


if __name__ == "__main__":
    main()
