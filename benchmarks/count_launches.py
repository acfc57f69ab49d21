"""Kernel launches per solver iteration, counted on any machine (no GPU needed).

python benchmarks/count_launches.py: runs each solver with the PyTorch twins and with
the Triton kernels (in Triton's CPU interpreter) and counts, per iteration, the
operations that would launch a GPU kernel: aten ops other than views and
allocations, plus Triton kernel launches. f's own ops are excluded. On a GPU each
launch costs ~5-15 us of host time (a Triton launch ~30-50 us with triton 3.6), which
is what an eager solve pays per iteration on top of f.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fixedpoint  # noqa: E402

NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "_to_copy_noop", "detach", "alias"}


class Launches(TorchDispatchMode):
    """Counts kernel-launching aten ops; paused inside f and inside Triton's interpreter."""

    def __init__(self) -> None:
        super().__init__()
        self.torch = self.triton = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in NO_LAUNCH and not name.startswith("_local_scalar"):
            self.torch += 1
        return func(*args, **(kwargs or {}))


def count(solver: str, impl: str, iters: int) -> tuple[int, int]:
    from triton.runtime.interpreter import InterpretedFunction

    torch.manual_seed(0)
    w = torch.randn(16, 16)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(4, 16)
    mode = Launches()

    def f(z):
        mode.paused += 1
        try:
            return torch.tanh(z @ w.T + b)
        finally:
            mode.paused -= 1

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        mode.triton += 1
        mode.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    InterpretedFunction.run = run
    try:
        with mode:
            getattr(fixedpoint, solver)(f, torch.zeros(4, 16), tol=1e-30, max_iter=iters, divergence=None, impl=impl)
    finally:
        InterpretedFunction.run = original
    return mode.torch, mode.triton


def main() -> None:
    print("solver    impl     launches per iteration (aten + triton)")
    for solver in ("picard", "anderson", "broyden"):
        for impl in ("torch", "triton"):
            (t1, k1), (t2, k2) = count(solver, impl, 10), count(solver, impl, 20)
            aten, tri = (t2 - t1) / 10, (k2 - k1) / 10
            print(f"{solver:9s} {impl:8s} {aten + tri:5.1f}  ({aten:.1f} aten + {tri:.1f} triton)")


if __name__ == "__main__":
    main()
