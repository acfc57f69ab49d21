"""Checkpoints written atomically and read back with checks: never half-written, never silently replaced."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why in one line."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        kept = f"{path} still holds the previous checkpoint" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); {kept}") from None
    finally:
        with suppress(OSError):  # a read-only folder refuses even removing what is not there
            tmp.unlink(missing_ok=True)
    _remove_stale_temporaries(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of saves that a killed process left behind (never a live writer's)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises when no such process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue  # not ours, or a live process of another user


def load_checkpoint(
    path: Path, *, run: dict | None = None, config: dict | None = None, hint: str | None = None
) -> dict:
    """Read a checkpoint; if ``run`` / ``config`` are given, each of their keys must match what it was written
    with (a key the checkpoint lacks reads None).

    ``hint`` ends the message of an unreadable file (default: how a training run starts over).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 (any failure to read is the same answer to the user)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = hint if hint is not None else "move it away to start over, or use another --out"
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this program (format {FORMAT})")
    for name, expected in (("run", run), ("config", config)):
        if expected is None:
            continue
        saved = state.get(name, {})
        diff = [
            f"{key}={_show(saved.get(key))} (now {_show(expected.get(key))})"
            for key in sorted(expected)
            if _show(saved.get(key)) != _show(expected.get(key))
        ]
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was made with {', '.join(diff)}; use the same settings to resume, or another --out"
            )
    return state


def _show(value) -> str:
    return str(list(value) if isinstance(value, tuple) else value)
