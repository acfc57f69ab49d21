"""The inputs of scripts/recipe_smoke.sh, made here because none of the real ones exist on a CPU machine.

``python scripts/recipe_smoke_assets.py DIR`` writes, under DIR:

- ``images/a``, ``images/b``: 12 random 32x32 RGB PNGs each, the layout ``--dataset folder:`` reads
  (one subfolder per class), standing in for ImageNet's training folder;
- ``reference.npz``: the same images as ``arr_0`` (N, 32, 32, 3) uint8, ADM's layout, from which the script
  saves reference statistics with ``fpdm.evaluate --save-stats`` (standing in for
  ``VIRTUAL_imagenet256_labeled.npz``);
- ``vae/``: a tiny randomly initialised diffusers AutoencoderKL (2 blocks of 8 channels: 32x32 images to
  4x16x16 latents, ``fpdm.testing.save_tiny_vae``), standing in for ``sd-vae-ft-ema``;
- ``pt_inception.pth``: the FID Inception-v3 with random weights in pytorch-fid's layout
  (``fpdm.testing.save_random_fid_inception``), standing in for ``pt_inception-2015-12-05-6726825d.pth``.

Nothing is downloaded. Every number a run of the script prints is meaningless: it checks that the commands
run end to end, not what they measure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fpdm.testing import save_random_fid_inception, save_tiny_vae

CLASSES = ("a", "b")
PER_CLASS = 12
SIZE = 32


def write_images(root: Path) -> np.ndarray:
    """The image folder; returns its images (N, SIZE, SIZE, 3) uint8 in the order written."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
            images.append(pixels)
    return np.stack(images)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images = write_images(out / "images")
    np.savez(out / "reference.npz", arr_0=images)
    save_tiny_vae(out / "vae", sample_size=SIZE)
    save_random_fid_inception(out / "pt_inception.pth")
    print(f"wrote {len(images)} images in {len(CLASSES)} classes, reference.npz, vae/, pt_inception.pth to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/recipe_smoke_assets.py DIR")
    main(Path(sys.argv[1]))
