"""Low-precision history: Anderson and Broyden with an fp32, bf16 and fp16 history, compared in the same run.

- Iterations to tolerance on the solver benchmark's problems (bench_solvers.py: a batch of 4 problems
  f(z) = W z + b, W symmetric with eigenvalues evenly over [-0.5, 0.98], D = 256, and the same under tanh;
  fp32 iterates), at rel. tol 1e-4 and 1e-5, with each solve's time (best of interleaved rounds).
- Time per iteration where the history's memory traffic matters: the free map z -> a * z + c at DiT-block
  size (64, 49, 192) of bench_overhead.py, (solve of 12 - solve of 1) / iterations between them.

Timings alternate the three histories round by round and keep each one's best (a shared machine moves all
three alike). The cuda rows run where a GPU is (impl="auto": the Triton kernels) and are skipped elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from conftest import interleaved

import fixedpoint
from fixedpoint.testing import linear_deq

HISTORIES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SOLVERS = {
    "anderson m=5": partial(fixedpoint.anderson, m=5),
    "anderson m=10": partial(fixedpoint.anderson, m=10),
    "broyden m=20": partial(fixedpoint.broyden, m=20),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
ITERS = "low-precision history: iterations to rel. tol (B=4, D=256, fp32 iterates; iters = worst sample)"
PER_ITER = "low-precision history: ms per iteration on a free map at DiT-block size (64, 49, 192), fp32 iterates"
ROUNDS = 5


def _interleaved(runs: dict, device: str) -> dict:
    return interleaved(runs, ROUNDS, sync=torch.cuda.synchronize if device == "cuda" else lambda: None)


def _problem(kind: str, device: str) -> tuple[Callable, torch.Tensor]:
    """bench_solvers.py's problem on ``device``: f and the injections b (B, D)."""
    f, b, _ = linear_deq(256, 4, dtype=torch.float32)
    if device != "cpu":  # the map's matrix lives on the CPU: f's input and output move (f is not what is measured)
        f = (lambda cpu_f: lambda z: cpu_f(z.cpu()).to(device))(f)
    return ((lambda z: torch.tanh(f(z))) if kind == "tanh" else f), b.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tol", [1e-4, 1e-5])
@pytest.mark.parametrize("kind", ["linear", "tanh"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def bench_history_iterations(report, device, tol, kind, solver):
    f, b = _problem(kind, device)
    x0 = torch.zeros_like(b)
    runs = {name: partial(SOLVERS[solver], f, x0, tol=tol, max_iter=400, history_dtype=dt)
            for name, dt in HISTORIES.items()}  # fmt: skip
    sols = {name: run() for name, run in runs.items()}
    seconds = _interleaved(runs, device)
    iters = {name: int(sol.nsteps.max()) for name, sol in sols.items()}
    for name, sol in sols.items():
        ms = seconds[name] * 1e3
        report.add(ITERS, device=device, problem=kind, tol=tol, solver=solver, history=name, iters=iters[name],
                   converged=f"{int(sol.converged.sum())}/4", ms=ms, ms_per_iter=ms / max(iters[name], 1),
                   iters_vs_fp32=f"{iters[name] / iters['fp32']:.2f}x",
                   time_vs_fp32=f"{seconds[name] / seconds['fp32']:.2f}x")  # fmt: skip
        assert sol.converged.all(), (solver, kind, name)
        assert iters[name] <= 1.5 * iters["fp32"] + 2, (solver, kind, name, iters)
    report.note(ITERS, f"best of {ROUNDS} interleaved rounds; x_vs_fp32: the same problem and solver's fp32 history")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["anderson m=5", "broyden m=20"])
def bench_history_time_per_iteration(report, device, solver):
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(64, 49, 192, generator=gen).to(device)
    a = 0.9 * torch.rand(64, 49, 192, generator=gen).to(device)
    f = lambda z: torch.addcmul(c, a, z)  # noqa: E731
    n = 12
    runs = {(name, k): partial(SOLVERS[solver], f, c, tol=1e-30, max_iter=k, divergence=None, history_dtype=dt)
            for name, dt in HISTORIES.items() for k in (1, n)}  # fmt: skip
    steps = {key: int(run().nsteps.max()) for key, run in runs.items()}
    seconds = _interleaved(runs, device)
    per_iter = {name: (seconds[name, n] - seconds[name, 1]) / (steps[name, n] - steps[name, 1]) for name in HISTORIES}
    history_mb = {}
    for name, dt in HISTORIES.items():
        itemsize = (dt or torch.float32).itemsize
        slots = 5 - (dt is not None) if solver.startswith("anderson") else 20  # Anderson's difference form: m - 1
        kept = 2 * 4 if solver.startswith("anderson") and dt is not None else 0  # its kept pair, fp32
        history_mb[name] = c.numel() * (2 * slots * itemsize + kept) / 1e6
    for name in HISTORIES:
        report.add(PER_ITER, device=device, solver=solver, history=name, iters=steps[name, n],
                   history_mb=history_mb[name], ms_per_iter=per_iter[name] * 1e3,
                   time_vs_fp32=f"{per_iter[name] / per_iter['fp32']:.2f}x")  # fmt: skip
    note = f"(solve of {n} - solve of 1) / iterations between them, best of {ROUNDS} interleaved rounds; history_mb: "
    report.note(PER_ITER, note + "the history's bytes (Anderson bf16/fp16: m - 1 differences + the kept fp32 pair)")
