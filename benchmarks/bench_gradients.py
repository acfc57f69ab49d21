"""Gradient accuracy and backward time of each backward mode, beside TorchDEQ's IFT and JFB; memory.

Problems (float64, B = 3): the hard linear DEQ z = W z + U x (W symmetric,
eigenvalues in [-0.5, 0.98], D = 64) whose exact gradient is closed-form, and
a tanh DEQ z = tanh(W z + U x) (D = 64, ||W||_2 = 0.9) whose reference is our
implicit gradient at tol 1e-13 (itself checked against float64 gradcheck in
the tests). Loss = sum(c * z*); the gradient compared is dL/dU.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import timed

import fixedpoint as fp
from fixedpoint.testing import symmetric_matrix

D, B = 64, 3
TABLE = "gradient accuracy vs exact dL/dU (float64, D=64, B=3; backward ms = loss.backward())"
MEMORY = "memory saved for backward (bytes of tensors autograd keeps) vs forward iterations"


def _problem(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        w = symmetric_matrix(D, -0.5, 0.98)
    else:
        w = torch.randn(D, D, generator=g, dtype=torch.float64)
        w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    u = (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5).requires_grad_(True)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    if kind == "linear":
        f = lambda z: z @ w.T + x @ u.T  # noqa: E731
        adj = torch.linalg.solve((torch.eye(D, dtype=torch.float64) - w).T, c.T).T
        exact = adj.T @ x
    else:
        f = lambda z: torch.tanh(z @ w.T + x @ u.T)  # noqa: E731
        exact = None
    z_star = fp.newton(f, torch.zeros(B, D, dtype=torch.float64), tol=1e-14, max_iter=100).x
    if exact is None:
        u.grad = None
        (fp.implicit(f, z_star, tol=1e-13, max_iter=2000) * c).sum().backward()
        exact = u.grad.clone()
    return f, u, c, z_star, exact


MODES = {
    "implicit (defaults)": fp.implicit,
    "implicit newton": partial(fp.implicit, solver=fp.newton),
    "jfb": fp.jfb,
    "phantom k=5 d=0.5": partial(fp.phantom, k=5, damping=0.5),
    "unrolled 30 from z*": partial(fp.unrolled, steps=30),
}


def _accuracy(grad, exact):
    cos = float(torch.nn.functional.cosine_similarity(grad.flatten(), exact.flatten(), dim=0))
    rel = float((grad - exact).norm() / exact.norm())
    return cos, rel


@pytest.mark.parametrize("kind", ["linear", "tanh"])
@pytest.mark.parametrize("mode", list(MODES))
def bench_backward_mode(benchmark, report, kind, mode):
    f, u, c, z_star, exact = _problem(kind)

    def backward():
        u.grad = None
        z = MODES[mode](f, z_star)
        (z * c).sum().backward()
        return u.grad.clone()

    grad, seconds = timed(benchmark, backward, rounds=3)
    cos, rel = _accuracy(grad, exact)
    report.add(
        TABLE, problem=kind, library="fixedpoint", mode=mode, cosine=f"{cos:.6f}", rel_error=rel, ms=seconds * 1e3
    )
    if mode == "implicit (defaults)" and kind == "linear":
        assert rel <= 1e-4  # the target in the issue (TorchDEQ's default backward: 0.31)


TORCHDEQ = {"IFT (defaults)": {"ift": True}, "JFB (grad=1)": {"grad": 1}}


@pytest.mark.parametrize("kind", ["linear", "tanh"])
@pytest.mark.parametrize("mode", list(TORCHDEQ))
def bench_backward_torchdeq(benchmark, report, kind, mode):
    torchdeq = pytest.importorskip("torchdeq")
    f, u, c, z_star, exact = _problem(kind)
    # forward: start at our converged z* so only the backward differs
    deq = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=1, **TORCHDEQ[mode])

    def backward():
        u.grad = None
        z_out, _ = deq(f, z_star.clone())
        (z_out[-1] * c).sum().backward()
        return u.grad.clone()

    grad, seconds = timed(benchmark, backward, rounds=3)
    cos, rel = _accuracy(grad, exact)
    report.add(TABLE, problem=kind, library="torchdeq", mode=mode, cosine=f"{cos:.6f}", rel_error=rel, ms=seconds * 1e3)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves while ``fn`` builds its graph."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("iterations", [10, 50, 200])
def bench_memory_implicit_vs_unrolled(benchmark, report, iterations):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    x = torch.randn(32, 256)
    f = lambda z: 0.5 * torch.tanh(mlp(z)) + x  # noqa: E731
    z0 = torch.zeros_like(x)

    def implicit():
        sol = fp.picard(f, z0, tol=1e-30, max_iter=iterations, divergence=None)
        return fp.implicit(f, sol.x)

    unrolled = lambda: fp.unrolled(f, z0, steps=iterations)  # noqa: E731
    imp_bytes = _saved_bytes(implicit)
    unr_bytes = _saved_bytes(unrolled)
    benchmark.pedantic(implicit, rounds=1, iterations=1)
    report.add(
        MEMORY,
        forward_iterations=iterations,
        implicit_MB=imp_bytes / 2**20,
        unrolled_MB=unr_bytes / 2**20,
        ratio=f"{unr_bytes / imp_bytes:.1f}x",
    )
    report.note(MEMORY, "f: a 256-1024-256 GELU MLP on a batch of 32, float32")
    assert imp_bytes < unr_bytes / (iterations / 2)
