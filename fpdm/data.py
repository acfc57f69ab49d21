"""Datasets: built-in digits, Fashion-MNIST idx files, an image folder, VAE latent shards.

Every dataset is loaded whole into memory as a :class:`ImageData`: images
(N, C, H, W) float32 in [-1, 1] (latents: as encoded, already scaled) and
labels (N,) int64. Names: ``digits``, ``fashion-mnist``, ``folder:PATH``,
``latents:PATH``.
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checks import InputError

__all__ = ["ImageData", "DataError", "load_dataset", "check_dataset", "DATASETS", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist", "folder:PATH", "latents:PATH")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


DataError = InputError  # the old name (before 0.2 its own class): a dataset that cannot be loaded


@dataclass
class ImageData:
    images: Tensor  # (N, C, H, W) float32
    labels: Tensor  # (N,) int64
    num_classes: int
    name: str
    is_latent: bool = False  # latents are not images: no clipping to [-1, 1], decode before viewing

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]


def check_dataset(name: str, data_dir: str | None = None) -> None:
    """An InputError for a dataset name of no known form or a folder that does not exist: cheap, before any
    output is created."""
    if name in ("digits", "fashion-mnist"):
        return
    if name.startswith("folder:"):
        if not Path(name[len("folder:") :]).is_dir():
            raise InputError(f"image folder {name[len('folder:'):]} does not exist")
        return
    if name.startswith("latents:"):
        if not Path(name[len("latents:") :]).is_dir():
            raise InputError(f"no latent shards (*.npz) at {name[len('latents:'):]}: no such folder; make them with "
                             "`python -m fpdm.encode`")  # fmt: skip
        return
    raise InputError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def load_dataset(
    name: str, *, split: str = "train", data_dir: str | None = None, image_size: int | None = None
) -> ImageData:
    """Load a dataset by name (see the module docstring); ``split`` is "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_dataset(name, data_dir)
    if name == "digits":
        data = _digits(split)
    elif name == "fashion-mnist":
        data = _fashion_mnist(split, Path(data_dir) if data_dir else FASHION_MNIST_DIR)
    elif name.startswith("folder:"):
        data = _folder(Path(name[len("folder:") :]), image_size)
    else:
        data = _latents(Path(name[len("latents:") :]))
    finite = torch.isfinite(data.images.flatten(1)).all(dim=1)  # (N,)
    if not finite.all():
        first = int((~finite).nonzero()[0])
        raise InputError(f"{name} holds non-finite values (NaN or Inf) in {int((~finite).sum())} of {len(data)} "
                         f"images (the first: index {first}); fix or re-encode the data")  # fmt: skip
    return data


def _to_unit_range(pixels: np.ndarray, high: float) -> Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / high * 2.0 - 1.0)


def _digits(split: str) -> ImageData:
    """scikit-learn's 1,797 UCI 8x8 digits (values 0..16), shipped in its wheel. Test: every 5th image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    test = np.arange(len(labels)) % 5 == 0
    keep = test if split == "test" else ~test
    return ImageData(_to_unit_range(images[keep][:, None], 16.0), torch.from_numpy(labels[keep]).long(), 10, "digits")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str, directory: Path) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise InputError(
                f"Fashion-MNIST file {path} not found: on Debian `apt-get install dataset-fashion-mnist`, "
                "or pass --data-dir with the idx .gz files"
            )
    try:
        images, labels = _read_idx(images_path), _read_idx(labels_path)
    except (OSError, ValueError, IndexError, EOFError) as err:  # EOFError: a truncated .gz
        raise InputError(f"cannot read Fashion-MNIST in {directory}: {err}") from None
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or not len(labels):
        raise InputError(
            f"Fashion-MNIST in {directory}: {images_path.name} holds images {images.shape} and {labels_path.name} "
            f"labels {labels.shape}; expected (N, 28, 28) and (N,) with N >= 1"
        )
    if labels.max() > 9:
        raise InputError(f"Fashion-MNIST in {directory}: {labels_path.name} holds label {labels.max()}; expected 0-9")
    return ImageData(
        _to_unit_range(images[:, None], 255.0), torch.from_numpy(labels.copy()).long(), 10, "fashion-mnist"
    )


def _folder(root: Path, image_size: int | None) -> ImageData:
    """One subfolder per class; images are centre-cropped and resized to ``image_size`` (RGB)."""
    from PIL import Image

    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"image folder {root} has no class subfolders (expected {root}/CLASS/IMAGE.png)")
    size = image_size or 32
    images, labels = [], []
    for index, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    side = min(img.size)
                    left, top = (img.width - side) // 2, (img.height - side) // 2
                    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                raise InputError(f"cannot read image {path}: {str(err).splitlines()[0]}") from None
            images.append(np.asarray(img).transpose(2, 0, 1))
            labels.append(index)
    if not images:
        raise InputError(f"image folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageData(_to_unit_range(np.stack(images), 255.0), torch.tensor(labels), len(classes), f"folder:{root}")


def _latents(root: Path) -> ImageData:
    """Shards ``*.npz`` with ``latents`` (N, C, h, w) and ``labels`` (N,), as written by ``python -m fpdm.encode``."""
    shards = sorted(root.glob("*.npz")) if root.is_dir() else [root]
    if not shards or not shards[0].is_file():
        raise InputError(f"no latent shards (*.npz) at {root}; make them with `python -m fpdm.encode`")
    latents, labels, num_classes = [], [], 0
    for shard in shards:
        try:
            with np.load(shard) as data:
                latents.append(data["latents"].astype(np.float32))
                labels.append(data["labels"].astype(np.int64))
                num_classes = max(num_classes, int(data["num_classes"]) if "num_classes" in data else 0)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise InputError(f"cannot read latent shard {shard}: {str(err).splitlines()[0]}") from None
        if latents[-1].ndim != 4 or len(latents[-1]) == 0 or len(labels[-1]) != len(latents[-1]):
            raise InputError(f"latent shard {shard} holds latents {latents[-1].shape} and labels {labels[-1].shape}; "
                             "expected (N, C, h, w) and (N,) with N >= 1")  # fmt: skip
        if latents[-1].shape[1:] != latents[0].shape[1:]:
            raise InputError(f"latent shard {shard} has latents of shape {latents[-1].shape[1:]}, "
                             f"{shards[0]} of {latents[0].shape[1:]}: one encoding per folder")  # fmt: skip
    y = torch.from_numpy(np.concatenate(labels))
    if int(y.min()) < 0:
        raise InputError(f"latent shards at {root} hold label {int(y.min())}; labels are class indices >= 0")
    return ImageData(
        torch.from_numpy(np.concatenate(latents)), y, max(num_classes, int(y.max()) + 1), f"latents:{root}", True
    )
