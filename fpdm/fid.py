"""Inception metrics of image sets, as ADM's evaluator computes them: FID, sFID, Inception Score, precision and
recall; the files they read and write (samples in ADM's layout, reference statistics). Feature extraction runs on
any device, and under torchrun over the ranks (each a share of the batches)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import first_line
from .checks import InputError
from .files import atomic_write
from .images import from_uint8, to_uint8
from .inception import SPATIAL_FEATURES, FIDInceptionV3
from .metrics import FeatureStats, feature_stats, frechet_to_moments, inception_score, precision_recall

__all__ = [
    "InceptionFeatures", "InceptionReference", "load_inception", "inception_outputs", "inception_features",
    "inception_scores", "read_inception_reference", "read_inception_stats", "save_inception_stats",
    "read_images", "read_samples", "from_uint8", "quantize",
]  # fmt: skip


# ----------------------------------------------------------------------------- image files


IMAGE_KEYS = ("arr_0", "images")  # ADM's layout, which python -m fpdm.sample writes since 0.2; ours before it
LABEL_KEYS = ("labels", "arr_1")  # ours; ADM's sample scripts save class labels as arr_1


def _npz_arrays(path: str | Path, what: str, roles) -> dict[str, np.ndarray]:
    """For each role, the array under the first of its keys that the npz archive ``path`` holds. ``roles``:
    {role: keys}, or a function of the archive's keys giving it. A missing file, something else than an npz
    archive, or a role without any of its keys is an InputError naming ``what``, the keys missing and those
    found."""
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"a single {type(data).__name__}, not an npz archive")
        with data:
            wanted = roles(data.files) if callable(roles) else roles
            missing = [" or ".join(keys) for keys in wanted.values() if not set(keys) & set(data.files)]
            if missing:
                raise InputError(f"{what}: no {'; no '.join(missing)} in it (it holds "
                                 f"{', '.join(data.files) or 'nothing'})")  # fmt: skip
            return {role: data[next(k for k in keys if k in data.files)] for role, keys in wanted.items()}
    except InputError:
        raise
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot read {what}: {first_line(err)}") from None


def _check_pixels(pixels: np.ndarray, what: str) -> np.ndarray:
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
        raise InputError(f"{what}: its images are {pixels.dtype} of shape {pixels.shape}")
    if len(pixels) < 2:
        raise InputError(f"{what}: {len(pixels)} image(s); scoring needs at least 2 (a covariance)")
    return pixels


def read_images(path: str | Path) -> np.ndarray:
    """The uint8 images (N, H, W, C) of an npz under ``arr_0`` (ADM's layout) or ``images`` (ours before 0.2);
    labels are not needed. Anything else is an InputError naming the file and what was found."""
    what = f"images {path} (uint8 (N, H, W, C) under arr_0 or images)"
    return _check_pixels(_npz_arrays(path, what, {"images": IMAGE_KEYS})["images"], what)


def read_samples(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) in [-1, 1] and labels (N,) from a samples npz: uint8 images (N, H, W, C) under
    ``arr_0`` (ADM's layout, python -m fpdm.sample's) or ``images`` (ours before 0.2), integer labels under
    ``labels`` (or ADM's ``arr_1``). Anything else is an InputError naming the file and what was found."""
    what = f"samples {path} (uint8 images (N, H, W, C) and integer labels, as python -m fpdm.sample writes)"
    arrays = _npz_arrays(path, what, {"images": IMAGE_KEYS, "labels": LABEL_KEYS})
    pixels, labels = _check_pixels(arrays["images"], what), arrays["labels"]
    if labels.dtype.kind not in "iu" or labels.shape != pixels.shape[:1]:
        raise InputError(f"{what}: its labels are {labels.dtype} of shape {labels.shape} for {len(pixels)} images")
    return from_uint8(pixels), torch.from_numpy(labels.astype(np.int64))


def quantize(images: Tensor) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] on the 256 levels of uint8, as a saved PNG or samples file holds them."""
    return from_uint8(to_uint8(images))


# ----------------------------------------------------------------------------- features


class InceptionFeatures(NamedTuple):
    """The Inception features of a set of images, float64: ``pool`` (N, 2048) for FID, IS, precision and
    recall; ``spatial`` (N, 2023) for sFID."""

    pool: np.ndarray
    spatial: np.ndarray


def load_inception(path: str | Path, input: str = "tf1") -> FIDInceptionV3:
    """The FID Inception with the weights file at ``path`` (pytorch-fid's or torch-fidelity's); ``input``: how
    pixels enter it (``fpdm.inception.INPUTS``). An InputError when it does not load."""
    from .inception import load_fid_inception

    try:
        return load_fid_inception(path, input)
    except ValueError as err:
        raise InputError(str(err)) from None


def _pixels(images: Tensor | np.ndarray) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] or uint8 (N, H, W, C) -> float pixel values 0..255 (N, C, H, W): floats
    are quantised to uint8's levels first (what a PNG or samples file holds)."""
    pixels = torch.as_tensor(images if isinstance(images, np.ndarray) else to_uint8(images))
    return pixels.permute(0, 3, 1, 2).float()


@torch.no_grad()
def inception_outputs(
    net: FIDInceptionV3, images: Tensor | np.ndarray, *, batch_size: int = 50, progress: bool = False
) -> InceptionFeatures:
    """Pool and spatial features of images (N, C, H, W) in [-1, 1] or uint8 (N, H, W, C), on the network's
    device. Float images are quantised to uint8 first (``quantize``): what ADM's evaluator and pytorch-fid
    read. Batches are converted one at a time (50,000 images at 256 x 256: 10 GB as uint8, 39 GB as float).
    Under torchrun (an initialised process group) rank r computes batches r, r + world, ... and every rank
    returns the whole set, in order: the same features, bit for bit, as one process computing all."""
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        raise InputError(f"images for Inception are uint8 (N, H, W, C) or float tensors, not {images.dtype}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(net.parameters()).device
    batches = range(rank, -(-len(images) // batch_size), world)
    from rich.progress import track

    parts = []
    for i in track(batches, description="Inception features", disable=not progress or rank != 0 or len(batches) < 2):
        pool, spatial = net.pixel_features(_pixels(images[i * batch_size : (i + 1) * batch_size]).to(device))
        parts.append(torch.cat([pool, spatial], 1).double())  # (n, 2048 + SPATIAL_FEATURES)
    dims = net.fc.in_features
    mine = torch.cat(parts) if parts else torch.empty(0, dims + SPATIAL_FEATURES, dtype=torch.float64, device=device)
    rows = _gathered(mine, len(images), batch_size, world) if world > 1 else mine
    rows = rows.cpu().numpy()
    return InceptionFeatures(rows[:, :dims], rows[:, dims:])


def _gathered(mine: Tensor, total: int, batch_size: int, world: int) -> Tensor:
    """Every rank's rows (rank r: batches r, r + world, ...) on every rank, in batch order."""
    share = -(-total // (batch_size * world)) * batch_size  # the most rows any rank holds
    padded = torch.cat([mine, mine.new_zeros(share - len(mine), mine.shape[1])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    batches = [parts[i % world][(i // world) * batch_size : (i // world + 1) * batch_size]
               for i in range(-(-total // batch_size))]  # fmt: skip
    return torch.cat(batches)[:total]


def inception_features(net: FIDInceptionV3, images: Tensor | np.ndarray, batch_size: int = 50) -> np.ndarray:
    """The pool features (N, 2048), float64, of ``inception_outputs``."""
    return inception_outputs(net, images, batch_size=batch_size).pool


# ----------------------------------------------------------------------------- references and scores


@dataclass
class InceptionReference:
    """What samples are compared with in Inception space: pool statistics (FID), spatial statistics (sFID;
    None when unknown) and the pool features of reference images (precision, recall; None without images)."""

    pool: FeatureStats
    spatial: FeatureStats | None = None
    features: np.ndarray | None = None

    @classmethod
    def of(cls, features: InceptionFeatures) -> InceptionReference:
        return cls(feature_stats(features.pool), feature_stats(features.spatial), features.pool)


def inception_scores(
    net: FIDInceptionV3, features: InceptionFeatures | np.ndarray, reference: InceptionReference | FeatureStats | None
) -> dict:
    """The Inception numbers of generated images' ``features`` (``inception_outputs``; or pool features alone):
    ``inception_fid`` against the reference's statistics, ``sfid`` where both have spatial ones, ``precision``
    and ``recall`` (k = 3) where the reference has images' features, and ``inception_score``."""
    pool, spatial = (features.pool, features.spatial) if isinstance(features, InceptionFeatures) else (features, None)
    if isinstance(reference, FeatureStats):
        reference = InceptionReference(reference)
    device = next(net.parameters()).device
    out = {}
    if reference is not None:
        out["inception_fid"] = frechet_to_moments(pool, *reference.pool)
        if spatial is not None and reference.spatial is not None:
            out["sfid"] = frechet_to_moments(spatial, *reference.spatial)
        if reference.features is not None and min(len(pool), len(reference.features)) > 3:
            out["precision"], out["recall"] = precision_recall(reference.features, pool, k=3, device=device)
    out["inception_score"] = inception_score(net.logits(torch.from_numpy(pool)))
    return out


def read_inception_reference(
    path: str | Path, net: FIDInceptionV3 | None = None, *, images: bool = True, progress: bool = False
) -> InceptionReference:
    """An npz's Inception reference. ``mu`` and ``sigma`` (and ``mu_s``, ``sigma_s`` for sFID) when there
    (ADM's reference batches, pytorch-fid's and ``save_inception_stats``'s files; preferred, as ADM's
    evaluator does); uint8 images (N, H, W, C) under ``arr_0`` (or ``images``) give what the statistics lack
    and, with ``images``, the features for precision and recall (ADM's reference batches hold 10,000), through
    ``net``. A file whose ``input`` (how its pixels entered the network) differs from ``net``'s is refused.
    Anything else is an InputError naming the file, the keys missing and those found."""
    what = f"reference statistics {path} (mu and sigma, or uint8 images arr_0)"

    def roles(keys: list[str]) -> dict[str, tuple[str, ...]]:  # what to read, from what the file holds
        wanted = {"mu": ("mu",), "sigma": ("sigma",)} if {"mu", "sigma"} & set(keys) else {}
        wanted.update({k: (k,) for k in ("mu_s", "sigma_s", "input") if k in keys})
        if "mu" not in wanted or (images and net is not None and set(IMAGE_KEYS) & set(keys)):
            wanted["images"] = IMAGE_KEYS
        return wanted

    arrays = _npz_arrays(path, what, roles)
    if net is not None and "input" in arrays and str(arrays["input"]) != net.input:
        raise InputError(f"{what}: its statistics are of the {arrays['input']} input; this network's is "
                         f"{net.input} (--inception-input)")  # fmt: skip
    stats = None
    if "mu" in arrays:  # checked before any image goes through the network
        stats = _stats(arrays["mu"], arrays["sigma"], what, net.fc.in_features if net is not None else None)
    spatial = _stats(arrays["mu_s"], arrays["sigma_s"], what, None) if {"mu_s", "sigma_s"} <= arrays.keys() else None
    if "images" not in arrays:
        return InceptionReference(stats, spatial)
    if net is None:
        raise InputError(f"{what}: it holds images, whose statistics need the Inception network (--inception)")
    own = InceptionReference.of(inception_outputs(net, _check_pixels(arrays["images"], what), progress=progress))
    return InceptionReference(stats or own.pool, spatial or own.spatial, own.features)


def _stats(mu: np.ndarray, sigma: np.ndarray, what: str, dims: int | None) -> FeatureStats:
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise InputError(f"{what}: mu is {mu.dtype} {mu.shape} and sigma {sigma.dtype} {sigma.shape}, not a mean "
                         "(d,) and a covariance (d, d)")  # fmt: skip
    if dims is not None and d != dims:  # before any image goes through the network
        raise InputError(f"{what}: statistics of {d} features; the Inception network's are {dims}")
    return FeatureStats(mu.astype(np.float64), sigma.astype(np.float64))


def read_inception_stats(path: str | Path, net: FIDInceptionV3 | None = None) -> FeatureStats:
    """The pool statistics (FID's) of ``read_inception_reference`` (no images' features)."""
    return read_inception_reference(path, net, images=False).pool


def save_inception_stats(
    path: str | Path, reference: InceptionReference | FeatureStats, input: str | None = None
) -> Path:
    """``mu``, ``sigma`` (and ``mu_s``, ``sigma_s``: sFID's, as in ADM's reference batches), float64, and the
    network's ``input`` in an npz, atomically: what pytorch-fid reads (``fid_score.py PATH STATS``: mu, sigma)
    and what ``read_inception_reference`` and ``--ref-stats`` read."""
    if isinstance(reference, FeatureStats):
        reference = InceptionReference(reference)
    arrays = {"mu": reference.pool.mu, "sigma": reference.pool.sigma}
    if reference.spatial is not None:
        arrays.update(mu_s=reference.spatial.mu, sigma_s=reference.spatial.sigma)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    if input is not None:
        arrays["input"] = np.array(input)
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))
