"""Kernel launches per solver iteration, counted on any machine (no GPU needed).

python benchmarks/count_launches.py: runs each solver with the PyTorch twins and with
the Triton kernels (in Triton's CPU interpreter) and counts, per iteration, the
operations that would launch a GPU kernel: aten ops other than views and
allocations, plus Triton kernel launches. f's own ops are excluded. On a GPU each
launch costs ~5-15 us of host time (a Triton launch ~30-50 us with triton 3.6), which
is what an eager solve pays per iteration on top of f. With graph="solver" the
host launches one copy and one CUDA graph per iteration (the graphs are replayed by
an eager stand-in here, each replay counted as one launch and its contents not).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fixedpoint  # noqa: E402
from fixedpoint import _graphs  # noqa: E402
from fixedpoint.testing import EagerGraphs  # noqa: E402

NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "_to_copy_noop", "detach", "alias"}


class Launches(TorchDispatchMode):
    """Counts kernel-launching aten ops; paused inside f and inside Triton's interpreter."""

    def __init__(self) -> None:
        super().__init__()
        self.torch = self.triton = self.graphs = 0
        self.paused = 0

    @contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in NO_LAUNCH and not name.startswith("_local_scalar"):
            self.torch += 1
        return func(*args, **(kwargs or {}))


class CountedGraphs(EagerGraphs):
    """EagerGraphs whose replays count as one launch each; what a graph contains is not counted."""

    def __init__(self, mode: Launches) -> None:
        super().__init__()
        self.mode = mode

    def capture(self, body, device, pool):
        def paused_body() -> None:
            with self.mode.pause():
                body()

        replay = super().capture(paused_body, device, pool)

        def counted() -> None:
            self.mode.graphs += 1
            replay()

        return counted


def count(solver: str, impl: str, iters: int, graph: bool | str = False) -> tuple[int, int, int]:
    """Launches of a solve of ``iters`` iterations: (aten ops, Triton kernels, CUDA graphs)."""
    from triton.runtime.interpreter import InterpretedFunction

    torch.manual_seed(0)
    w = torch.randn(16, 16)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(4, 16)
    mode = Launches()

    def f(z):
        with mode.pause():
            return torch.tanh(z @ w.T + b)

    original, graphs = InterpretedFunction.run, _graphs.GRAPHS

    def run(self, *args, **kwargs):
        mode.triton += not mode.paused
        with mode.pause():
            return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    if graph:
        _graphs.GRAPHS = CountedGraphs(mode)
    try:
        with mode:
            getattr(fixedpoint, solver)(
                f, torch.zeros(4, 16), tol=1e-30, max_iter=iters, divergence=None, impl=impl,
                **({"graph": graph} if graph else {}),  # broyden takes no graph argument
            )  # fmt: skip
    finally:
        InterpretedFunction.run, _graphs.GRAPHS = original, graphs
        _graphs.clear_graph_cache()  # the stand-in's sessions
    return mode.torch, mode.triton, mode.graphs


CASES = [(solver, impl, False) for solver in ("picard", "anderson", "broyden") for impl in ("torch", "triton")]
CASES += [(solver, "triton", "solver") for solver in ("picard", "anderson")]


def per_iteration(
    solver: str, impl: str, graph: bool | str = False, iterations: tuple[int, int] = (10, 20)
) -> tuple[float, float, float]:
    """Launches per iteration (aten, Triton, graphs): the difference of two solves' counts (by default of
    10 and 20 iterations), so that per-solve work (the start, a graph's warm-up and captures) drops out."""
    (n_short, n_long) = iterations
    short, long = count(solver, impl, n_short, graph), count(solver, impl, n_long, graph)
    return tuple((b - a) / (n_long - n_short) for a, b in zip(short, long))


def main() -> None:
    print("solver    impl     graph    launches per iteration (aten + triton + graphs)")
    for solver, impl, graph in CASES:
        aten, tri, graphs = per_iteration(solver, impl, graph)
        print(f"{solver:9s} {impl:8s} {str(graph):8s} {aten + tri + graphs:5.1f}  "
              f"({aten:.1f} aten + {tri:.1f} triton + {graphs:.1f} graphs)")  # fmt: skip


if __name__ == "__main__":
    main()
