"""Launch-parameter sweep of the tiled Triton kernels on a GPU (run by hand, or by gpu_check.sh).

python benchmarks/gpu_tune.py [out_dir] [dtype ...]: for the residual pass, the history write
(alone and with the residual fused in), broyden_dots and broyden_combine, at FPDM-XL/2 size
(32 x 256 x 1152) and at B*D ~ 1e8, times every combination of bytes per inner step, warps
per program and inner steps per program around the kernel's setting for that dtype (its
entry in fixedpoint.kernels.triton_kernels.LAUNCH_SETTINGS); then, at the best of those, software
pipelining of the inner steps (stages 2 and 3: cp.async loads in flight across steps). It
prints the achieved bandwidth against the current setting. The sweep sets LAUNCH_SETTINGS entries
while it times them and puts them back: it changes nothing. Bytes moved are the fewest the
kernel must move, as in bench_gpu.py. Kernels go in ORDER, the most used first, each in every
dtype and size: tune.json is rewritten after every row, so a timeout loses the least used.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fixedpoint.kernels import triton_kernels as tk
from fixedpoint.kernels.groups import BroydenStep
from fixedpoint.testing import anderson_state, broyden_state

SIZES = {"fpdm-xl/2": 256 * 1152, "1e8": 3 * 2**20}  # D at batch 32 (both multiples of 16: one compile per config)
BATCH, M, N = 32, 5, 10
GRID = {"bytes": [0.5, 1, 2, 4], "warps": [4, 8], "steps": [4, 16]}  # bytes: times the current setting's
PIPELINE = [2, 3]  # STAGES tried at the best of GRID


# Anderson's iteration, every solver's residual, Broyden's, then Anderson's start
ORDER = ("anderson_residual_write", "residual", "broyden_dots", "broyden_combine", "anderson_write")


def _case(kernel: str, dim: int, dtype: torch.dtype) -> tuple[str, int, Callable[[], object]]:
    """(name, (B, dim) passes it moves, thunk) of ``kernel`` (a LAUNCH_SETTINGS key) at (BATCH, dim), its
    tensors made here."""

    def rand(*shape):
        return torch.randn(*shape, device="cuda").to(dtype)

    x, fx, g, dx, hg = (rand(BATCH, dim) for _ in range(5))

    def zeros(*shape, dtype=torch.float32):  # the states' fields the timed kernels do not read
        return torch.zeros(*shape, dtype=dtype, device=x.device)

    if kernel == "residual":
        return "residual", 3, lambda: tk.residual(x, fx, g)
    if kernel in ("anderson_write", "anderson_residual_write"):
        F, G = rand(BATCH, M, dim), rand(BATCH, M, dim)
        # count 2: the write goes to slot 2
        state = anderson_state(F, G, slot=2)
        if kernel == "anderson_write":
            return f"anderson_write m={M}", M + 3, lambda: tk.anderson_write(state, fx, g)
        return f"anderson_residual_write m={M}", M + 3, lambda: tk.anderson_residual_write(state, x, fx)
    U, V = rand(BATCH, N, dim), rand(BATCH, N, dim)
    alive = torch.ones(BATCH, N, dtype=torch.bool, device=x.device)  # every term live
    gnorm, restarts = zeros(BATCH), zeros(BATCH, dtype=torch.int64)
    # the applies run over its N slots, with its hg
    state = broyden_state(U, V, N, alive, restarts=restarts, x=x, g=g, gnorm=gnorm, hg=hg, next_x=x)
    new = BroydenStep(x=x, g=g, gnorm=gnorm, dx=dx)  # dots and combine read its g and dx
    if kernel == "broyden_dots":
        return f"broyden_dots n={N}", 2 * N + 2, lambda: tk.broyden_dots(state, new)
    coeff = torch.randn(BATCH, 2, N, device="cuda")
    return f"broyden_combine n={N}", 2 * N + 5, lambda: tk.broyden_combine(state, new, coeff)


def _time(thunk: Callable[[], object], kernel: str, itemsize: int, setting: tk.LaunchSetting) -> float:
    """Median seconds of ``thunk`` with LAUNCH_SETTINGS[kernel] set to ``setting`` for this element size."""
    from triton.testing import do_bench

    table = tk.LAUNCH_SETTINGS[kernel]
    saved = table[itemsize]
    try:
        table[itemsize] = setting
        return do_bench(thunk, warmup=5, rep=25, return_mode="median") * 1e-3
    finally:
        table[itemsize] = saved


def main(out: Path, dtypes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kernel, dtype_name, (size_name, dim) in itertools.product(ORDER, dtypes, SIZES.items()):
        dtype = getattr(torch, dtype_name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        name, passes, thunk = _case(kernel, dim, dtype)
        nbytes = passes * BATCH * dim * itemsize
        default = tk.launch_setting(kernel, itemsize)
        timed = {}
        for scale, warps, steps in itertools.product(GRID["bytes"], GRID["warps"], GRID["steps"]):
            config = tk.LaunchSetting(int(scale * default.nbytes), warps, steps, 1)
            timed[config] = _time(thunk, kernel, itemsize, config)
        best = min(timed, key=timed.get)
        for stages in PIPELINE:
            config = dataclasses.replace(best, stages=stages)
            timed[config] = _time(thunk, kernel, itemsize, config)
        if default not in timed:
            timed[default] = _time(thunk, kernel, itemsize, default)
        best = min(timed, key=timed.get)
        row = {
            "kernel": name,
            "dtype": dtype_name,
            "size": size_name,
            "launch": kernel,
            "default (bytes, warps, steps, stages)": dataclasses.astuple(default),
            "default TB/s": nbytes / timed[default] / 1e12,
            "best (bytes, warps, steps, stages)": dataclasses.astuple(best),
            "best TB/s": nbytes / timed[best] / 1e12,
            "all TB/s": {str(dataclasses.astuple(k)): nbytes / v / 1e12 for k, v in timed.items()},
        }
        rows.append(row)
        result = {"device": torch.cuda.get_device_name(), "rows": rows}
        (out / "tune.json").write_text(json.dumps(result, indent=1))  # after every row: a timeout keeps the rest
        print(
            f"{name:28s} {dtype_name:9s} {size_name:10s} default {dataclasses.astuple(default)}"
            f" {row['default TB/s']:.2f} TB/s | best {dataclasses.astuple(best)} {row['best TB/s']:.2f} TB/s",
            flush=True,
        )
        del thunk  # frees its tensors before the next case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_tune.py needs CUDA")
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-tune"), sys.argv[2:] or ["bfloat16"])
