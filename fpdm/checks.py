"""Command-line checks shared by the fpdm commands, run before any work: a bad value is one line naming it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["InputError", "device", "number", "output_dir"]


class InputError(ValueError):
    """A command-line value that cannot work; the message names the flag and the value."""


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an existing directory (created now, before any work is done), or an InputError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{flag} {path}: it or a folder above it is a file, not a directory") from None
    except OSError as err:
        raise InputError(f"{flag} {path} cannot be created: {err.strerror}") from None
    return path


def device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{flag} {name}: this machine has no CUDA GPU that torch {torch.__version__} can use")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{flag} {name}: this machine has {count} CUDA GPU(s)")
    return dev


def number(flag: str, value: float, low: float | None = None, high: float | None = None) -> float:
    """``value`` if it is finite and in [low, high] (either bound optional), else an InputError naming it."""
    if math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high):
        return value
    if low is not None and high is not None:
        bounds = f"in [{low}, {high}]"
    elif low is not None:
        bounds = f">= {low}"
    elif high is not None:
        bounds = f"<= {high}"
    else:
        bounds = "a finite number"
    raise InputError(f"{flag} must be {bounds}, got {value}")
