"""Checkpoints written atomically and read back safely: never half-written, never silently replaced, and
never a file that runs code when it is read (``torch.load(weights_only=True)``: tensors, containers, numbers)."""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

from .checks import InputError
from .files import WriteError, atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "check_settings", "read_file", "first_line"]

FORMAT = 1

torch.serialization.add_safe_globals([argparse.Namespace])  # DiT's train.py stores its arguments as one


CheckpointError = InputError  # the old name (before 0.2 its own class): a file that cannot be used


def first_line(err: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_file(path: str | Path) -> object:
    """A .pt file's content through ``torch.load(weights_only=True)``, or a .safetensors file's tensors.

    An InputError for a missing, unreadable or unsafe file: one that needs code to load is refused
    and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is unreadable (no such file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise InputError(f"{path} is not a readable safetensors file ({first_line(err)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler: something other than data
        wanted = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if wanted:  # a function or class to call: what a payload needs
            raise InputError(f"{path} is not a plain weights file (it asks for {wanted.group(1)}); refused: "
                             "nothing in it was run") from None  # fmt: skip
        detail = re.search(r"WeightsUnpickler error: (.+)", str(err))
        reason = detail.group(1).strip() if detail and detail.group(1).strip() else "not a pickle of tensors"
        raise InputError(f"{path} is unreadable ({reason})") from None
    except Exception as err:  # noqa: BLE001 (a damaged file fails in many ways; each is one answer to the user)
        raise InputError(f"{path} is unreadable ({first_line(err)})") from None


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename."""
    try:
        atomic_write(path, lambda fh: torch.save({"format": FORMAT, **state}, fh))
    except WriteError as err:
        kept = f"{path} still holds the previous checkpoint" if Path(path).exists() else "no checkpoint was written"
        raise InputError(f"cannot write checkpoint {path} ({err.why}); {kept}") from None


def load_checkpoint(
    path: Path, *, run: dict | None = None, config: dict | None = None, hint: str | None = None
) -> dict:
    """Read a checkpoint; if ``run`` / ``config`` are given, each of their keys must match what it was written
    with (a key the checkpoint lacks reads None).

    ``hint`` ends the message of an unreadable file (default: how a training run starts over).
    """
    path = Path(path)
    try:
        state = read_file(path)
    except InputError as err:
        if "not a plain weights file" in str(err):
            raise
        hint = hint if hint is not None else "move it away to start over, or use another --out"
        raise InputError(f"checkpoint {err}; {hint}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path} is not a checkpoint of this program (format {FORMAT})")
    check_settings(path, state, run=run, config=config)
    return state


def check_settings(path: Path, state: dict, **expected: dict | None) -> None:
    """An InputError unless each given dict's keys match what the checkpoint ``state`` was written with
    under that name (a key the checkpoint lacks reads None)."""
    for name, wanted in expected.items():
        if wanted is None:
            continue
        saved = state.get(name, {})
        saved = saved if isinstance(saved, dict) else {}
        diff = [
            f"{key}={_show(saved.get(key))} (now {_show(wanted.get(key))})"
            for key in sorted(wanted)
            if _show(saved.get(key)) != _show(wanted.get(key))
        ]
        if diff:
            raise InputError(
                f"checkpoint {path} was made with {', '.join(diff)}; use the same settings to resume, or another --out"
            )


def _show(value) -> str:
    return str(list(value) if isinstance(value, tuple) else value)
