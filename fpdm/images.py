"""Images out: sample grids as PNG, loss curves as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write

__all__ = ["to_uint8", "from_uint8", "grid_image", "save_grid", "plot_loss_curve", "smooth_curve"]


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def from_uint8(pixels: np.ndarray | Tensor) -> Tensor:
    """uint8 images (N, H, W, C) -> (N, C, H, W) float32 in [-1, 1] (0 -> -1, 255 -> 1): ``to_uint8``'s inverse
    on its 256 levels."""
    return torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def grid_image(images: Tensor, *, nrow: int, scale: int = 1, pad: int = 1):
    """(N, C, H, W) images in [-1, 1] as one PIL image: a grid with ``nrow`` images per row."""
    from PIL import Image

    pixels = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = pixels.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top : top + h, left : left + w] = pixels[i]
    image = Image.fromarray(grid[:, :, 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def save_grid(images: Tensor, path: Path, *, nrow: int, scale: int = 1, pad: int = 1) -> Path:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid with ``nrow`` images per row (atomically)."""
    image = grid_image(images, nrow=nrow, scale=scale, pad=pad)
    return atomic_write(path, lambda fh: image.save(fh, format="PNG"))


def smoothing_half_width(n: int) -> int:
    """The loss plot's smoothing half-width for n records: 2.5% of them on each side (a 5% window)."""
    return n // 40


def smooth_curve(values: list[float], half: int) -> np.ndarray:
    """A centred moving average of log(values) over 2 * half + 1 records, back in value space (the curve is
    plotted on a log scale): no lag, unlike an exponential average, which trails a falling loss by about
    1 / (1 - decay) records. Near the ends the window shrinks to what is available on both sides, so the
    first and last points are the raw ones. A loss that falls exponentially is followed exactly. Values that
    are not all positive are averaged as they are."""
    raw = np.asarray(values, dtype=np.float64)  # (n,)
    positive = bool((raw > 0).all())
    logs = np.log(raw) if positive else raw
    n = len(logs)
    sums = np.concatenate([[0.0], np.cumsum(logs)])
    index = np.arange(n)
    width = np.minimum(np.minimum(index, n - 1 - index), half)  # per point: the half-width that fits
    mean = (sums[index + width + 1] - sums[index - width]) / (2 * width + 1)
    return np.exp(mean) if positive else mean


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when a figure is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png_path: Path) -> Path:
    """``fig`` written to ``png_path`` as a PNG atomically (a kill leaves the old file or none), then closed."""
    try:
        return atomic_write(png_path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        pyplot().close(fig)


def plot_loss_curve(records: list[dict], png_path: Path, *, title: str = "training loss") -> Path:
    """Loss (raw and smoothed) vs step from metrics records ({"step": ..., "loss": ...}), as a PNG."""
    plt = pyplot()
    steps, losses = [], []
    for record in records:
        if "loss" in record:
            steps.append(record["step"])
            losses.append(record["loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    if losses:
        half = smoothing_half_width(len(losses))
        ax.plot(steps, smooth_curve(losses, half), lw=1.5, label=f"smoothed (centred, {2 * half + 1} records)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, png_path)
