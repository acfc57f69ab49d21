"""Command-line checks shared by the fpdm commands, run before any work: a bad value is one line naming it.

One error class, :class:`InputError`, for everything a user can get wrong (a flag, a dataset, a checkpoint, a
sampling plan); every command prints it as one line and exits 2. The argparse ``type=`` helpers live here too:
argparse prefixes their message with the flag (``argument --steps: expected a positive integer, got '-1'``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "InputError", "Parser", "device", "memory", "number", "output_dir", "run_cli", "run_lock",
    "seed", "positive_int", "int_range", "positive_ints", "names", "classes",
]  # fmt: skip


COMPILE_MODES = ("off", "on", "reduce-overhead", "max-autotune")  # --compile: torch.compile's modes ("on": default)


class InputError(ValueError):
    """Input that cannot work: a command-line value, a dataset, a checkpoint or weights file, settings. The
    message says what and why in one line (naming the flag and the value where there is one); the commands print
    it and exit 2. ``CheckpointError``, ``DataError``, ``SampleError``, ``EvaluateError``, ``EncodeError`` and
    ``UsageError`` are other names of this class."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is for --help)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, run: Callable[[argparse.Namespace], None],
    errors: tuple[type[BaseException], ...] = (),
    interrupted: str | Callable[[argparse.Namespace], str] = "interrupted",
) -> int:  # fmt: skip
    """A command's entry point: parse, ``run``, and turn what a user can cause into one line on stderr, no
    traceback: InputError (and any other ``errors``) exit 2, a file that cannot be read or written (OSError) 1,
    Ctrl-C 130 with ``interrupted`` (a line, or a function of the arguments giving it)."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (InputError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted(args) if callable(interrupted) else interrupted, file=sys.stderr)
        return 130
    return 0


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an existing directory we can write in (created now, before any work is done), or an
    InputError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{flag} {path}: it or a folder above it is a file, not a directory") from None
    except OSError as err:
        raise InputError(f"{flag} {path} cannot be created: {err.strerror}") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise InputError(f"{flag} {path} is not writable: {err.strerror}") from None
    return path


@contextmanager
def run_lock(out: Path, flag: str = "--out") -> Iterator[None]:
    """Hold ``out``'s lock for the body: a second run on the same folder (which would interleave its
    checkpoints and metrics with this one's) is an InputError naming the holder. The lock goes with the
    process, however it ends. Where the OS has no fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise InputError(
                f"{flag} {out} is in use by another run (process {holder}); wait for it, or use another {flag}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------- argparse types


def _integers(text: str, expected: str) -> list[int]:
    """The comma-separated integers of ``text``, or an ArgumentTypeError: expected ``expected``, got text."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def seed(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2^32) (the range every generator and derived seed takes)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^32), got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_range(text: str) -> tuple[int, int]:
    """An argparse type: ``LOW,HIGH``, two integers (an inclusive range; its bounds are the model's to check)."""
    values = _integers(text, "LOW,HIGH (two integers)")
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two integers), got {text!r}")
    return values[0], values[1]


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1, e.g. ``5,10,20``."""
    values = _integers(text, "comma-separated integers")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def names(text: str) -> list[str]:
    """An argparse type: comma-separated names, e.g. ``uniform,reuse`` (which are valid is the command's to say)."""
    return text.split(",")


def classes(text: str) -> str | list[int]:
    """An argparse type: ``random``, or comma-separated class labels (their range is the model's to check)."""
    return text if text == "random" else _integers(text, "'random' or comma-separated integers")


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


def physical_memory() -> int:
    """Bytes of this machine's RAM (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def memory(flag: str, value: object, nbytes: float, device: torch.device | None = None) -> None:
    """An InputError when ``flag value`` asks for more memory (``nbytes``, an estimate) than the machine (or
    the CUDA device) has: one line naming the option and the memory, instead of an allocator's traceback."""
    on_cuda = device is not None and device.type == "cuda"
    have = torch.cuda.get_device_properties(device).total_memory if on_cuda else physical_memory()
    if have and nbytes > have:
        where = f"{device}" if on_cuda else "this machine"
        raise InputError(f"{flag} {value} needs about {nbytes / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB "
                         f"of {where}")  # fmt: skip
