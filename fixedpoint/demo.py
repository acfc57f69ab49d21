"""python -m fixedpoint.demo: the four solvers on one problem, a table and a residual plot.

The problem is the benchmark of docs/solvers.md: a batch of linear DEQs
z = W z + b, W symmetric with eigenvalues evenly over [-0.5, 0.98]
(optionally under tanh).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import anderson, broyden, newton, picard
from .testing import linear_deq

SOLVERS = {"picard": picard, "anderson": anderson, "broyden": broyden, "newton": newton}


def run(dim: int, batch: int, tol: float, max_iter: int, nonlinear: bool) -> dict:
    """Solve with every solver; returns {name: (Solution, seconds, relative error or None)}."""
    f, b, z_star = linear_deq(dim, batch, dtype=torch.float32)
    g = (lambda z: torch.tanh(f(z))) if nonlinear else f
    results = {}
    for name, solver in SOLVERS.items():
        options = {"m": 10} if name == "anderson" else {}
        solver(g, torch.zeros_like(b), max_iter=2, **options)  # warm-up: first-call costs are not the solver's
        start = time.perf_counter()
        sol = solver(g, torch.zeros_like(b), tol=tol, max_iter=max_iter, **options)
        seconds = time.perf_counter() - start
        error = None if nonlinear else float(((sol.x - z_star).norm(dim=1) / z_star.norm(dim=1)).max())
        results[name] = (sol, seconds, error)
    return results


def plot(results: dict, path: Path, title: str) -> None:
    """Residual vs iteration, one thin line per sample, one colour per solver, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for color, (name, (sol, _, _)) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        trace = sol.trace.float()  # (n, B), NaN after a sample stopped
        steps = torch.arange(1, trace.shape[0] + 1)
        for b in range(trace.shape[1]):
            label = f"{name} ({sol.nfev} calls of f)" if b == 0 else None
            ax.semilogy(steps, trace[:, b], color=color, lw=1, alpha=0.8, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("||f(z) - z|| / ||f(z)||")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fixedpoint.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256, help="feature size D")
    parser.add_argument("--batch", type=int, default=4, help="batch size B")
    parser.add_argument("--tol", type=float, default=1e-5, help="relative tolerance")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--tanh", action="store_true", help="solve z = tanh(W z + b) instead")
    parser.add_argument("--plot", type=Path, default=Path("fixedpoint-demo.png"), help="PNG to write")
    args = parser.parse_args(argv)
    if args.dim < 1 or args.batch < 1 or not args.tol > 0 or args.max_iter < 1:
        parser.exit(2, "error: --dim, --batch, --max-iter must be >= 1 and --tol > 0\n")

    from rich.console import Console
    from rich.table import Table

    results = run(args.dim, args.batch, args.tol, args.max_iter, args.tanh)
    kind = "tanh(W z + b)" if args.tanh else "W z + b"
    title = f"z = {kind}, W symmetric, eig in [-0.5, 0.98], D={args.dim}, B={args.batch}, tol={args.tol:g}"
    table = Table(title=title)
    for column in ("solver", "iters", "f calls", "status", "residual", "error", "ms"):
        table.add_column(column, justify="left" if column in ("solver", "status") else "right")
    for name, (sol, seconds, error) in results.items():
        statuses = ", ".join(sorted({s.name for s in sol.statuses()}))
        table.add_row(
            name,
            str(int(sol.nsteps.max())),
            str(sol.nfev),
            statuses,
            f"{float(sol.residual.max()):.2e}",
            "-" if error is None else f"{error:.2e}",
            f"{seconds * 1e3:.1f}",
        )
    Console().print(table)
    print("iters and residual/error: the worst sample of the batch; error: ||z - z*|| / ||z*||")
    plot(results, args.plot, title)
    print(f"residual plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
