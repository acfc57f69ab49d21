"""Datasets: built-in digits, Fashion-MNIST idx files, an image folder, VAE latent shards.

Names: ``digits``, ``fashion-mnist``, ``folder:PATH``, ``latents:PATH``. :func:`open_dataset` gives a
torch ``Dataset`` that reads only what is asked for: digits and Fashion-MNIST are small and held in memory
(:class:`ImageData`), a ``folder:`` decodes its files when a row is read (:class:`ImageFolder`), and
``latents:`` reads the rows of its shards in place (:class:`LatentShards`). Every one has ``rows(indices)`` (a batch:
images (B, C, H, W) float32 in [-1, 1], latents as encoded, and labels (B,) int64) and the same
attributes (``num_classes``, ``channels``, ``image_size``, ``is_latent``, ``name``). Training reads them
through :func:`batch_loader` (a ``torch.utils.data.DataLoader``) with the indices of :func:`step_indices`.
:func:`load_dataset` reads a whole dataset into memory (evaluation, small sets).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .checkpoint import first_line
from .checks import InputError

__all__ = [
    "ImageData", "ImageFolder", "LatentShards", "DataError", "open_dataset", "load_dataset", "check_dataset",
    "center_crop", "decode_image", "npz_array", "npz_layout", "ShardRows", "read_manifest", "step_indices",
    "step_flips", "StepIndices",
    "batch_loader", "DATASETS", "FASHION_MNIST_DIR",
    "MANIFEST",
]  # fmt: skip

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist", "folder:PATH", "latents:PATH")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST = "manifest.json"  # in a latents folder: the finished shards (python -m fpdm.encode)
LATENTS_FORMAT = "fpdm-latents"


DataError = InputError  # the old name (before 0.2 its own class): a dataset that cannot be loaded


@dataclass
class ImageData(Dataset):
    """A dataset held in memory: images (N, C, H, W) float32 and labels (N,) int64."""

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

    def rows(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) and labels (B,) at ``indices`` (B,) int64."""
        return self.images[indices], self.labels[indices]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


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


def open_dataset(
    name: str, *, split: str = "train", data_dir: str | None = None, image_size: int | None = None
) -> ImageData | ImageFolder | LatentShards:
    """A dataset by name (see the module docstring), read lazily where it is large; ``split``: train or test."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_dataset(name, data_dir)
    if name == "digits":
        data = _digits(split)
    elif name == "fashion-mnist":
        data = _fashion_mnist(split, Path(data_dir) if data_dir else FASHION_MNIST_DIR)
    elif name.startswith("folder:"):
        return ImageFolder(Path(name[len("folder:") :]), image_size or 32)
    else:
        return LatentShards(Path(name[len("latents:") :]))
    _check_finite(data.images, name)
    return data


def load_dataset(
    name: str, *, split: str = "train", data_dir: str | None = None, image_size: int | None = None
) -> ImageData:
    """A whole dataset in memory (see the module docstring); ``split`` is "train" or "test". For evaluation and
    small sets: training streams through :func:`open_dataset` instead."""
    data = open_dataset(name, split=split, data_dir=data_dir, image_size=image_size)
    if isinstance(data, ImageData):
        return data
    images, labels = data.rows(torch.arange(len(data)))
    _check_finite(images, name)
    return ImageData(images, labels, data.num_classes, data.name, data.is_latent)


def _check_finite(images: Tensor | np.ndarray, name: str, first_index: int = 0, count: int | None = None) -> None:
    images = torch.as_tensor(images)
    finite = torch.isfinite(images.flatten(1)).all(dim=1)  # (N,)
    if not finite.all():
        first = first_index + int((~finite).nonzero()[0])
        raise InputError(f"{name} holds non-finite values (NaN or Inf) in {int((~finite).sum())} of "
                         f"{count or len(images)} images (the first: index {first}); fix or re-encode the "
                         "data")  # fmt: skip


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


# ----------------------------------------------------------------------------- image folders, decoded lazily


def center_crop(image, size: int):
    """ADM's centre crop (DiT's ``center_crop_arr``): halve with a box filter while the short side is at least
    twice ``size``, resize (bicubic) so that the short side is ``size``, then crop the centre square."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """An image file as (3, size, size) uint8: RGB, centre-cropped (:func:`center_crop`). An InputError naming
    the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = center_crop(img.convert("RGB"), size)
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise InputError(f"cannot read image {path}: {first_line(err)}") from None
    return arr.transpose(2, 0, 1)


class ImageFolder(Dataset):
    """``root/CLASS/IMAGE``: one subfolder per class, RGB images decoded when read (ADM's centre crop to
    ``image_size``), in [-1, 1]. Only the file names are held (one NumPy bytes array, which forked loader
    workers share instead of copying, as they would a list of Python strings)."""

    is_latent = False
    channels = 3

    def __init__(self, root: str | Path, image_size: int = 32) -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"image folder {root} does not exist")
        self.root, self.image_size, self.name = root, image_size, f"folder:{root}"
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise InputError(f"image folder {root} has no class subfolders (expected {root}/CLASS/IMAGE.png)")
        names, labels = [], []
        for index, cls in enumerate(self.classes):
            files = sorted(p.name for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            names += files
            labels += [index] * len(files)
        if not names:
            raise InputError(f"image folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.names = np.array([n.encode("utf-8", "surrogateescape") for n in names])  # (N,) fixed-width bytes
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.names)

    def path(self, index: int) -> Path:
        name = self.names[index].decode("utf-8", "surrogateescape")
        return self.root / self.classes[int(self.labels[index])] / name

    def pixels(self, indices: Iterable[int]) -> np.ndarray:
        """(B, 3, S, S) uint8 of the images at ``indices``, decoded now."""
        return np.stack([decode_image(self.path(int(i)), self.image_size) for i in indices])

    def rows(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return _to_unit_range(self.pixels(indices.tolist()), 255.0), self.labels[indices]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.rows(torch.tensor([index]))
        return x[0], y[0]


# ----------------------------------------------------------------------------- latent shards, read by rows


def npz_layout(path: Path, key: str) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """Where array ``key`` of an .npz file lies: (dtype, shape, byte offset) when stored uncompressed (as
    ``np.savez`` writes), None when compressed. ValueError, KeyError or zipfile.BadZipFile for a damaged file."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"member {key}.npy has no local header")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(fh)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {key}.npy has .npy format {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(fh)
        offset = fh.tell()
        size = fh.seek(0, 2)
    if dtype.hasobject or fortran_order:
        raise ValueError(f"member {key}.npy holds {'objects' if dtype.hasobject else 'a Fortran-ordered array'}")
    if offset + int(np.prod(shape)) * dtype.itemsize > size:
        raise ValueError(f"member {key}.npy is truncated")
    return dtype, tuple(shape), offset


def npz_array(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of an .npz file, memory-mapped when stored uncompressed (``np.load``'s ``mmap_mode`` does
    not reach into archives); a compressed member is read whole."""
    layout = npz_layout(path, key)
    if layout is None:
        with np.load(path) as data:
            return data[key]
    dtype, shape, offset = layout
    if not shape or 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class ShardRows:
    """The rows of an array stored in an .npz shard, read with ``os.pread`` (the positioned reads a memory map
    makes, without mapping the file: the pages stay in the OS's cache, out of this process's RSS, where a
    memory map's fault-around would map a growing part of the data set). Opened lazily in each process."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> None:
        self.path, self.dtype, self.shape, self.offset = path, dtype, shape, offset
        self.row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        self.reads = 0  # rows read, for tests
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:  # to a spawned worker: never a file descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with suppress(OSError):
                os.close(self._fd)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (ascending, repeats allowed): consecutive ones in one read."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            data = os.pread(self._fd, (j - i) * self.row_bytes, self.offset + int(rows[i]) * self.row_bytes)
            flat[i:j] = np.frombuffer(data, np.uint8).reshape(j - i, -1)
            i = j
        self.reads += len(rows)
        return out


def read_manifest(root: Path) -> dict | None:
    """``root``'s latent manifest (written by ``python -m fpdm.encode``), None when there is none; an InputError
    in one line for one that is damaged."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != LATENTS_FORMAT:
            raise ValueError(f"not an {LATENTS_FORMAT} manifest")
        shards = manifest["shards"]
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and type(s.get("rows")) is int
            and type(s.get("index")) is int for s in shards
        ):  # fmt: skip
            raise ValueError("its shards are not a list of {index, file, rows}")
        if type(manifest["shards_total"]) is not int or type(manifest["num_classes"]) is not int:
            raise ValueError("shards_total and num_classes must be integers")
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = first_line(err)
        raise InputError(f"latent manifest {path} is damaged ({reason}); move it away (shards it listed are "
                         "encoded again) or re-encode") from None  # fmt: skip
    return manifest


class LatentShards(Dataset):
    """A folder of latent shards ``*.npz`` with ``latents`` (N, C, h, w) and ``labels`` (N,), read by rows
    (:class:`ShardRows`, positioned reads at the rows' offsets): a batch reads its rows and nothing else. With
    a manifest (``python -m fpdm.encode``) the shards are those it
    lists (an unfinished encoding is refused); without one (shards from before 0.2) every ``*.npz``, checked
    for non-finite values shard by shard when opened. Each batch read is checked too."""

    is_latent = True

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.root, self.name = root, f"latents:{root}"
        manifest = read_manifest(root) if root.is_dir() else None
        if manifest is not None:
            done = len(manifest["shards"])
            if not manifest.get("complete") or done != manifest["shards_total"]:
                raise InputError(f"latents at {root} are unfinished ({done} of {manifest['shards_total']} shards): "
                                 "run the same `python -m fpdm.encode` command again to finish them")  # fmt: skip
            self.paths = [root / s["file"] for s in sorted(manifest["shards"], key=lambda s: s["index"])]
            counts = [s["rows"] for s in sorted(manifest["shards"], key=lambda s: s["index"])]
        else:
            self.paths = sorted(root.glob("*.npz")) if root.is_dir() else [root]
            counts = None
        if not self.paths or not self.paths[0].is_file():
            raise InputError(f"no latent shards (*.npz) at {root}; make them with `python -m fpdm.encode`")
        labels, num_classes, shape = [], 0, None
        self._shards: list[ShardRows | np.ndarray] = []  # each shard's rows: read on demand (in memory if compressed)
        for k, shard in enumerate(self.paths):
            try:
                layout = npz_layout(shard, "latents")
                latents = npz_array(shard, "latents") if layout is None else ShardRows(shard, *layout)
                labels.append(np.asarray(npz_array(shard, "labels")).astype(np.int64))
                with np.load(shard) as data:
                    num_classes = max(num_classes, int(data["num_classes"]) if "num_classes" in data else 0)
            except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
                reason = first_line(err)
                raise InputError(f"cannot read latent shard {shard}: {reason}") from None
            if len(latents.shape) != 4 or len(latents) == 0 or len(labels[-1]) != len(latents):
                raise InputError(f"latent shard {shard} holds latents {latents.shape} and labels "
                                 f"{labels[-1].shape}; expected (N, C, h, w) and (N,) with N >= 1")  # fmt: skip
            if counts is not None and counts[k] != len(latents):
                raise InputError(f"latent shard {shard} holds {len(latents)} latents, its manifest says "
                                 f"{counts[k]}: a damaged or replaced shard; re-encode it")  # fmt: skip
            if shape is not None and tuple(latents.shape[1:]) != shape:
                raise InputError(f"latent shard {shard} has latents of shape {latents.shape[1:]}, "
                                 f"{self.paths[0]} of {shape}: one encoding per folder")  # fmt: skip
            shape = tuple(latents.shape[1:])
            if counts is None:  # no encoder checked these: a few MB at a time
                start = sum(len(y) for y in labels[:-1])
                for lo in range(0, len(latents), 256):
                    rows = np.arange(lo, min(lo + 256, len(latents)))
                    _check_finite(np.asarray(latents[rows], np.float32), self.name, start + lo, None)
            self._shards.append(latents)
        self.labels = torch.from_numpy(np.concatenate(labels))
        if int(self.labels.min()) < 0:
            raise InputError(f"latent shards at {root} hold label {int(self.labels.min())}; labels are class "
                             "indices >= 0")  # fmt: skip
        self.ends = np.cumsum([len(y) for y in labels])
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = max(num_classes, int(self.labels.max()) + 1)

    channels = property(lambda self: self.shape[0])
    image_size = property(lambda self: self.shape[-1])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def shard(self, k: int) -> ShardRows | np.ndarray:
        """Shard ``k``'s latents: ``shard(k)[rows]`` reads those rows (ascending)."""
        return self._shards[k]

    def rows(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.ends, idx, side="right")
        out = np.empty((len(idx), *self.shape), np.float32)
        for k in np.unique(shard):
            where = np.nonzero(shard == k)[0]
            local = idx[where] - (self.ends[k - 1] if k else 0)
            order = np.argsort(local, kind="stable")  # rows in file order: sequential reads
            out[where[order]] = self.shard(int(k))[local[order]]
        x = torch.from_numpy(out)
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        if not finite.all():
            bad = int(idx[int((~finite).nonzero()[0])])
            shard_file = self.paths[int(np.searchsorted(self.ends, bad, side="right"))]
            raise InputError(f"{self.name} holds non-finite values (NaN or Inf) at index {bad} (in {shard_file}); "
                             "fix or re-encode the data")  # fmt: skip
        return x, self.labels[torch.as_tensor(idx)]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.rows(torch.tensor([index]))
        return x[0], y[0]


# ----------------------------------------------------------------------------- what training reads each step


def step_indices(generator: torch.Generator, size: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
    """Rank ``rank``'s share of a step's global batch: ``batch_size`` indices drawn from ``generator`` (the same
    draw in every process: a run of any world size sees the same global batch), then the rank's slice."""
    idx = torch.randint(size, (batch_size,), generator=generator)
    local = batch_size // world
    return idx[rank * local : (rank + 1) * local]


def step_flips(generator: torch.Generator, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
    """Which of the rank's images to flip horizontally this step (bool (B,)): the same draw in every process."""
    flips = torch.rand(batch_size, generator=generator) < 0.5
    local = batch_size // world
    return flips[rank * local : (rank + 1) * local]


class StepIndices:
    """The steps' :func:`step_indices`, from ``generator``'s state now, for a DataLoader to read ahead. The
    generator itself is not advanced: training draws the same indices from it step by step, so that the state a
    checkpoint saves is that of the steps trained, whatever the loader has prefetched."""

    def __init__(self, generator: torch.Generator, size: int, batch_size: int, steps: int, rank: int = 0,
                 world: int = 1) -> None:  # fmt: skip
        self.state, self.steps = generator.get_state(), steps
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator()
        generator.set_state(self.state)
        for _ in range(self.steps):
            yield step_indices(generator, self.size, self.batch_size, self.rank, self.world)


class _Batches(Dataset):
    """A dataset read a batch at a time: ``batches[indices]`` is (images, labels, indices)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (*self.data.rows(indices), indices)


def _as_is(batch):
    return batch


def batch_loader(
    data, batches: Iterable[Tensor], *, workers: int = 0, pin_memory: bool = False, prefetch: int = 2
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(images, labels, indices) for each index batch of ``batches``, read by a DataLoader with ``workers``
    processes (0: in this one), pinned for a fast copy to a GPU when ``pin_memory``. An error in a worker is
    the same one-line InputError as in this process."""
    loader = DataLoader(
        _Batches(data), sampler=batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        collate_fn=_as_is, prefetch_factor=prefetch if workers else None, persistent_workers=False,
        generator=torch.Generator().manual_seed(0),  # its workers' seeds: never a draw from torch's global RNG
    )  # fmt: skip
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except InputError as err:  # from a worker: "Caught InputError in DataLoader worker ... Traceback ..."
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise InputError(re.sub(r"^[\w.]*InputError: ", "", lines[-1])) from None
        yield batch
