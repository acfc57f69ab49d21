"""Running a command that starts processes of its own (torchrun's ranks, a script) without hanging the suite."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def launch(cmd: list[str], folder: Path, name: str, marker: str, env: dict | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``cmd`` with its output in ``folder/name.out`` and ``.err`` (a hung rank holding a pipe cannot block the
    test); on a timeout kill its process group and every process whose command line holds ``marker`` (torchrun's
    workers run in sessions of their own). ``env``: the environment (default: this one, OMP_NUM_THREADS=1: the
    same threads in every process, so sums are bit-for-bit reproducible on a CPU). A kill shows as returncode -9."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if env is None else env
    with open(folder / f"{name}.out", "w") as so, open(folder / f"{name}.err", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, start_new_session=True, env=env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError, ValueError):
                    if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                        os.kill(int(cmdline.parent.name), signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, (folder / f"{name}.out").read_text(),
                                       (folder / f"{name}.err").read_text())  # fmt: skip
