"""Iterations to tolerance and wall time: ours vs TorchDEQ vs scipy.optimize, in the same run.

The problem (docs/solvers.md): a batch of 4 problems f(z) = W z + b, W symmetric
with eigenvalues evenly over [-0.5, 0.98], D = 256, relative tolerance 1e-5,
and the same under tanh. float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from conftest import timed

import fixedpoint
from fixedpoint.testing import linear_deq

TOL = 1e-5
MAX_ITER = 400
TABLE = "iterations to rel. tol 1e-5 (B=4, D=256, float32; iters = worst sample)"


def _problem(kind: str, dtype=torch.float32):
    f, b, z_star = linear_deq(256, 4, dtype=dtype)
    if kind == "tanh":
        return (lambda z: torch.tanh(f(z))), b
    return f, b


FAMILY = {  # which of our solvers each row is compared with
    "picard": "picard",
    "fixed_point_iter": "picard",
    "anderson m=10": "anderson m=10",
    "anderson m=5": "anderson m=5",
    "broyden": "broyden",
    "broyden1": "broyden",
    "newton": "newton",
    "newton_krylov": "newton",
}

OURS = {
    "picard": lambda f, x0: fixedpoint.picard(f, x0, tol=TOL, max_iter=2000),
    "anderson m=10": lambda f, x0: fixedpoint.anderson(f, x0, tol=TOL, max_iter=MAX_ITER, m=10),
    "anderson m=5": lambda f, x0: fixedpoint.anderson(f, x0, tol=TOL, max_iter=MAX_ITER, m=5),
    "broyden": lambda f, x0: fixedpoint.broyden(f, x0, tol=TOL, max_iter=MAX_ITER),
    "newton": lambda f, x0: fixedpoint.newton(f, x0, tol=TOL, max_iter=MAX_ITER),
}


@pytest.mark.parametrize("kind", ["linear", "tanh"])
@pytest.mark.parametrize("name", list(OURS))
def bench_fixedpoint(benchmark, report, kind, name):
    f, b = _problem(kind)
    sol, seconds = timed(benchmark, lambda: OURS[name](f, torch.zeros_like(b)), rounds=5)
    report.add(
        TABLE,
        problem=kind,
        library="fixedpoint",
        solver=name,
        family=FAMILY[name],
        iters=int(sol.nsteps.max()),
        f_calls=sol.nfev,
        converged=f"{int(sol.converged.sum())}/4",
        ms=seconds * 1e3,
    )
    if name == "anderson m=10" and kind == "linear":
        assert sol.converged.all() and sol.nsteps.max() <= 60  # the target in the issue
    if name == "broyden":
        assert sol.converged.all() and sol.nsteps.max() <= 90


TORCHDEQ = {
    "fixed_point_iter": {"max_iter": 2000},
    "anderson m=10": {"m": 10},
    "anderson m=5": {"m": 5},
    "broyden": {},
}


@pytest.mark.parametrize("kind", ["linear", "tanh"])
@pytest.mark.parametrize("name", list(TORCHDEQ))
def bench_torchdeq(benchmark, report, kind, name):
    solvers = pytest.importorskip("torchdeq.solver")
    f, b = _problem(kind)
    options = {"max_iter": MAX_ITER, **TORCHDEQ[name]}
    solver = solvers.get_solver(name.split()[0])
    run = lambda: solver(f, torch.zeros_like(b), tol=TOL, stop_mode="rel", **options)  # noqa: E731
    (z, _, info), seconds = timed(benchmark, run, rounds=5)
    rel = info["rel_lowest"]
    report.add(
        TABLE,
        problem=kind,
        library="torchdeq",
        solver=name,
        family=FAMILY[name],
        iters=int(info["nstep"].max()),
        f_calls=int(info["nstep"].max()) + 1,
        converged=f"{int((rel <= TOL).sum())}/4",
        ms=seconds * 1e3,
    )


SCIPY = {
    "anderson m=10": lambda F, v0, tol: scipy.optimize.anderson(F, v0, M=10, f_tol=tol, maxiter=MAX_ITER),
    "broyden1": lambda F, v0, tol: scipy.optimize.broyden1(F, v0, f_tol=tol, maxiter=MAX_ITER),
    "newton_krylov": lambda F, v0, tol: scipy.optimize.newton_krylov(F, v0, f_tol=tol, maxiter=MAX_ITER),
}


@pytest.mark.parametrize("kind", ["linear", "tanh"])
@pytest.mark.parametrize("name", list(SCIPY))
def bench_scipy(benchmark, report, kind, name):
    """scipy solves one sample at a time, in float64 (its finite differences need it);
    its f_tol is set to tol * ||f(z*)||, our measure at the answer."""
    f, b = _problem(kind, torch.float64)
    ref = fixedpoint.newton(f, torch.zeros_like(b), tol=1e-10)  # only to scale the tolerance
    scale = f(ref.x).double().norm(dim=1).numpy()
    calls = [0] * b.shape[0]

    def solve_all():
        converged = 0
        for i in range(b.shape[0]):
            calls[i] = 0

            def residual(v, i=i):
                calls[i] += 1
                z = torch.zeros_like(b)
                z[i] = torch.from_numpy(np.asarray(v))
                return (f(z)[i] - z[i]).numpy()

            try:
                SCIPY[name](residual, np.zeros(b.shape[1]), TOL * scale[i] * 0.999)
                converged += 1
            except (scipy.optimize.NoConvergence, ValueError):  # ValueError: scipy's own breakdowns
                pass
        return converged

    converged, seconds = timed(benchmark, solve_all, rounds=1)
    report.add(
        TABLE,
        problem=kind,
        library="scipy",
        solver=name,
        family=FAMILY[name],
        iters="-",
        f_calls=max(calls),
        converged=f"{converged}/4",
        ms=seconds * 1e3,
    )
