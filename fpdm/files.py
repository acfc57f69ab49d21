"""Output files written atomically: a reader (or a crash, a kill, a full disk) sees the old file or the new
one, never a part of one; the error names the file and, for a full disk, says so."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

__all__ = ["WriteError", "atomic_write", "write_set", "write_text", "write_json", "json_writer", "reason"]


class WriteError(OSError):
    """A file that could not be written; the message names it, why, and what was kept."""

    def __init__(self, path: Path, why: str, kept: str) -> None:
        super().__init__(f"cannot write {path} ({why}); {kept}")
        self.path, self.why = path, why

    def __str__(self) -> str:
        return str(self.args[0])


def reason(err: BaseException) -> str:
    """Why a write failed, in a few words ("no space left on the device" for a full disk)."""
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "errno 28" in text.lower():
        return "no space left on the device"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(fh)`` into a temporary file beside it, fsync, then rename it into place.

    A failure leaves the previous file as it was and raises a WriteError naming ``path``."""
    path = Path(path)
    write_set(path.parent, {path.name: write})
    return path


def write_set(folder: str | Path, writers: dict[str, Callable[[BinaryIO], None]]) -> None:
    """Write several files of ``folder`` as one set: each into a temporary file first (fsync), and only when
    all are written, renamed into place in the order given (put a manifest last). A failure while writing
    (a full disk, an error, a kill) leaves every previous file as it was."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temporaries = {name: folder / f".{name}.tmp-{os.getpid()}" for name in writers}
    try:
        for name, write in writers.items():
            try:
                with open(temporaries[name], "wb") as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
                path = folder / name
                kept = f"{path} still holds its previous content" if path.exists() else "nothing was written there"
                raise WriteError(path, reason(err), kept) from None
        for name, tmp in temporaries.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in temporaries.values():
            with suppress(OSError):  # a read-only folder refuses even removing what is not there
                tmp.unlink(missing_ok=True)
    for name in writers:
        remove_stale_temporaries(folder / name)
    with suppress(OSError):  # some file systems cannot fsync a folder
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def json_writer(value: object) -> Callable[[BinaryIO], None]:
    """A writer (for ``atomic_write`` / ``write_set``) of ``value`` as indented JSON."""
    return lambda fh: fh.write((json.dumps(value, indent=2) + "\n").encode())


def write_json(path: str | Path, value: object) -> Path:
    """``value`` as indented JSON, atomically."""
    return atomic_write(path, json_writer(value))


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of writes that a killed process left behind (never a live writer's)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises when no such process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue  # not ours, or a live process of another user
