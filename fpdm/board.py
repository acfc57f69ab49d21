"""Optional TensorBoard logging (``python -m fpdm.train --tensorboard``): the records metrics.jsonl holds, and the
sample grids, as TensorBoard events in ``--out/tensorboard`` (``tensorboard --logdir OUT/tensorboard``). Needs
the ``tensorboard`` package (the ``tensorboard`` extra); metrics.jsonl stays the record a run resumes from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checks import InputError

__all__ = ["check_tensorboard", "open_board", "write_record", "write_grid"]


def check_tensorboard() -> None:
    """An InputError, before any training, when TensorBoard's writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise InputError(f"--tensorboard needs the tensorboard package (pip install 'fpdm[tensorboard]'): {err}") from (
            None
        )


def open_board(out: Path, start_step: int):
    """A SummaryWriter on ``out/tensorboard``. A resumed run purges the events an interrupted one wrote after
    ``start_step`` (the checkpoint's step), as metrics.jsonl drops its records: each step is shown once."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)


def write_record(board, record: dict) -> None:
    """A metrics record ({"step": s, name: number, ...}) as scalars train/<name> at step s."""
    for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)):
            board.add_scalar(f"train/{name}", value, record["step"])
    board.flush()


def write_grid(board, path: Path, step: int) -> None:
    """A saved sample grid (PNG) as the image samples/ema at ``step``."""
    from PIL import Image

    with Image.open(path) as image:
        board.add_image("samples/ema", np.asarray(image.convert("RGB")), step, dataformats="HWC")
    board.flush()
