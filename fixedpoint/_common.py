"""What every part of fixedpoint shares and nothing else provides: the status codes, the statistics dtype,
argument checks, memory checks and autocast's dtype. A leaf: it imports only torch and the standard library."""

from __future__ import annotations

import enum
import math
import numbers
import operator

import torch
from torch import Tensor

__all__ = [
    "MEMORY_CHECKED",
    "Status",
    "as_integer",
    "as_real",
    "autocast_dtype",
    "available_memory",
    "check_int",
    "check_interval",
    "check_memory",
    "check_positive",
    "row_norms",
    "stat_dtype",
]


class Status(enum.IntEnum):
    """Why a sample stopped iterating (stored per sample in ``Solution.status``)."""

    CONVERGED = 0  #: residual <= tol
    MAX_ITER = 1  #: max_iter reached without converging
    DIVERGED = 2  #: ||f(x) - x|| grew beyond ``divergence`` times its start
    NONFINITE = 3  #: f produced NaN/Inf; the sample keeps its last finite iterate


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision for norms, Gram matrices and small solves: fp64 for fp64 data, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(v: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, D) -> (B,) Euclidean norms accumulated in ``dtype``."""
    return torch.linalg.vector_norm(v, dim=1, dtype=dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs ops in on this device type, or None where it is off (or not supported)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def as_real(value: object) -> float | None:
    """A Python, NumPy or 0-d tensor real number as a float; None for anything else (bools included)."""
    if isinstance(value, Tensor):
        ok = value.ndim == 0 and value.dtype != torch.bool and not value.is_complex()
        return float(value) if ok else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_integer(value: object) -> int | None:
    """A Python, NumPy or 0-d integer tensor as an int; None for anything else (bools and floats included)."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive(name: str, value: float) -> float:
    """``value`` as a float, or a ValueError naming it: a positive finite number."""
    number = as_real(value)
    if number is None or not number > 0 or not math.isfinite(number):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_int(name: str, value: int, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming it: an integer >= minimum."""
    number = as_integer(value)
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def check_interval(name: str, value: float, low: float, high: float) -> float:
    """``value`` as a float with low < value <= high, or a ValueError naming it."""
    number = as_real(value)
    if number is None or not low < number <= high:
        raise ValueError(f"{name} must be in ({low}, {high}], got {value!r}")
    return number


MEMORY_CHECKED = 2**28  # bytes from which an option's buffers are checked against the memory available


def available_memory(device: torch.device) -> int | None:
    """Bytes that ``device`` can still allocate (CPU: free RAM and swap; CUDA: free plus cached by torch),
    or None where unknown."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if device.type == "cpu":
            with open("/proc/meminfo") as info:
                kib = {line.split(":")[0]: int(line.split()[1]) for line in info if line.split()[1:2]}
            return 1024 * (kib["MemAvailable"] + kib.get("SwapFree", 0))
    except (OSError, KeyError, ValueError, RuntimeError):
        pass
    return None


def check_memory(name: str, value: int, nbytes: int, what: str, device: torch.device) -> None:
    """A ValueError naming option ``name`` when the ``nbytes`` it makes ``what`` take exceed the memory
    ``device`` has available: before allocating (an allocator error would not name the option, and an
    overcommitted CPU allocation would fail only when written). Sizes below MEMORY_CHECKED are not checked."""
    if nbytes < MEMORY_CHECKED:
        return
    available = available_memory(device)
    if available is not None and nbytes > available:
        raise ValueError(
            f"{name}={value} asks for {nbytes / 2**30:.4g} GiB ({nbytes} bytes) for {what}, more than the "
            f"{available / 2**30:.4g} GiB available on {device}: choose a smaller {name}"
        )
