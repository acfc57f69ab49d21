"""The shared problem set: every solver runs on every problem it is expected to solve.

Each problem is a batched map f on (B, ...) with a known fixed point: closed
forms for linear maps, and scipy.optimize.root at tight tolerance for the rest.
The classic systems are from scipy.optimize's own nonlinear-solver tests
(test_nonlin.py), put in fixed-point form z = z + s F(z).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from fixedpoint.testing import linear_deq

ALL = ("picard", "anderson", "broyden", "newton")


@dataclass
class Problem:
    name: str
    f: Callable[[Tensor], Tensor]  # (B, ...) -> (B, ...)
    x0: Tensor  # (B, ...) float64
    solution: Tensor  # (B, ...) float64 fixed point
    solvers: tuple[str, ...] = ALL  # solvers expected to converge from x0
    stop: str = "rel"
    max_iter: int = 300
    options: dict = field(default_factory=dict)  # per-solver keyword options


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_sample_root(f: Callable[[Tensor], Tensor], x0: Tensor, root: Callable) -> Tensor:
    """Solve f(z) = z one sample at a time with a scipy root finder ``root(F, x0) -> x``.

    f is evaluated on the whole batch (it may close over per-sample inputs) with
    the other samples held at x0.
    """
    rows = []
    for i in range(x0.shape[0]):

        def residual(v: np.ndarray, i: int = i) -> np.ndarray:
            full = x0.clone()
            full[i] = torch.from_numpy(v).reshape(x0[i].shape)
            return (f(full)[i] - full[i]).reshape(-1).numpy()

        rows.append(torch.from_numpy(np.asarray(root(residual, x0[i].reshape(-1).numpy()))).reshape(x0[i].shape))
    return torch.stack(rows)


def _hybr(residual: Callable, v0: np.ndarray) -> np.ndarray:
    out = scipy.optimize.root(residual, v0, tol=1e-13)
    assert out.success, out.message
    return out.x


def _reference(f: Callable[[Tensor], Tensor], x0: Tensor) -> Tensor:
    """Per-sample fixed point by scipy.optimize.root (hybr) at tight tolerance."""
    return per_sample_root(f, x0, _hybr)


def _linear_nonsymmetric() -> Problem:
    dim, batch = 24, 3
    w = torch.randn(dim, dim, generator=_gen(3), dtype=torch.float64)
    w *= 0.8 / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(batch, dim, generator=_gen(4), dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - w, b.T).T
    return Problem("linear-nonsymmetric", lambda z: z @ w.T + b, torch.zeros_like(b), z_star)


def _tanh_layer() -> Problem:
    dim, batch = 32, 4
    w = torch.randn(dim, dim, generator=_gen(5), dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    u = torch.randn(batch, dim, generator=_gen(6), dtype=torch.float64)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + u)

    x0 = torch.zeros(batch, dim, dtype=torch.float64)
    return Problem("tanh-layer", f, x0, _reference(f, x0))


def _deq_mlp() -> Problem:
    """A DEQ-style residual MLP block with input injection: z = z + 0.5 MLP(norm(z) + x) - 0.5 z."""
    dim, hidden, batch = 16, 32, 4
    w1 = torch.randn(hidden, dim, generator=_gen(7), dtype=torch.float64) / dim**0.5
    w2 = torch.randn(dim, hidden, generator=_gen(8), dtype=torch.float64) / hidden**0.5
    x = torch.randn(batch, dim, generator=_gen(9), dtype=torch.float64)

    def f(z: Tensor) -> Tensor:
        h = torch.nn.functional.gelu((z + x) @ w1.T)
        return 0.5 * z + 0.5 * torch.tanh(h @ w2.T) + 0.3 * x

    x0 = torch.zeros(batch, dim, dtype=torch.float64)
    return Problem("deq-mlp", f, x0, _reference(f, x0))


def _attention() -> Problem:
    """A single-head self-attention map on token sequences (B, T, d), with injection."""
    batch, tokens, width = 3, 5, 8
    g = _gen(10)
    wq, wk, wv = (torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5 for _ in range(3))
    x = torch.randn(batch, tokens, width, generator=g, dtype=torch.float64)

    def f(z: Tensor) -> Tensor:
        q, k, v = z @ wq, z @ wk, z @ wv  # (B, T, d)
        att = torch.softmax(q @ k.transpose(1, 2) / width**0.5, dim=-1)  # (B, T, T)
        return 0.6 * torch.tanh(att @ v) + x

    x0 = torch.zeros(batch, tokens, width, dtype=torch.float64)
    return Problem("attention", f, x0, _reference(f, x0))


def _scipy_f1() -> Problem:
    """test_nonlin.F: F(x) = -d x - c (x.x) x, root 0, from several starts; z = z + F(z)/2."""
    d = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64)

    def f(z: Tensor) -> Tensor:
        return z + 0.5 * (-d * z - 0.01 * (z * z).sum(1, keepdim=True) * z)

    x0 = torch.tensor([[1.0] * 5, [0.5, -1, 2, 0.1, 1], [-1.0] * 5], dtype=torch.float64)
    return Problem("scipy-F", f, x0, torch.zeros_like(x0), stop="abs")


def _scipy_f3() -> Problem:
    """test_nonlin.F3: A x - b with A tridiagonal [1, -2, 1]; z = z + F(z)/4."""
    a = torch.tensor([[-2.0, 1, 0], [1, -2, 1], [0, 1, -2]], dtype=torch.float64)
    b = torch.tensor([[1.0, 2, 3], [0, 1, 0], [-3, 2, 5]], dtype=torch.float64)
    z_star = torch.linalg.solve(a, b.T).T
    return Problem("scipy-F3", lambda z: z + 0.25 * (z @ a.T - b), torch.zeros_like(b), z_star)


def _scipy_f6() -> Problem:
    """test_nonlin.F6: a preconditioned 2-D system with root (0, 1); z = z + F(z)."""
    j0 = torch.tensor([[-4.256, 14.7], [0.8394989, 0.59964207]], dtype=torch.float64)

    def f(z: Tensor) -> Tensor:
        x1, x2 = z[:, 0], z[:, 1]
        v = torch.stack([(x1 + 3) * (x2**5 - 7) + 18, torch.sin(x2 * torch.exp(x1) - 1)], dim=1)
        return z - torch.linalg.solve(j0, v.T).T

    x0 = torch.tensor([[-0.5, 1.4], [0.1, 0.9], [-0.2, 1.1]], dtype=torch.float64)
    solution = torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64)
    return Problem("scipy-F6", f, x0, solution)


def _linear_hard() -> Problem:
    f, b, z_star = linear_deq(dim=64, batch=4)
    return Problem("linear-symmetric-0.98", f, torch.zeros_like(b), z_star, max_iter=1500)


def problem_set() -> list[Problem]:
    return [
        _linear_hard(),
        _linear_nonsymmetric(),
        _tanh_layer(),
        _deq_mlp(),
        _attention(),
        _scipy_f1(),
        _scipy_f3(),
        _scipy_f6(),
    ]


@dataclass
class Classic:
    """A classic root problem F(x) = 0 from its published formula, posed as the fixed point of x + F(x)."""

    name: str
    F: Callable[[Tensor], Tensor]  # (B, n) -> (B, n), float64
    x0: list[float]  # the published start
    source: str

    def f(self, z: Tensor) -> Tensor:
        """The fixed-point map x + F(x): unscaled, so the solver's own scale (beta="auto") is what is tested."""
        return z + self.F(z)

    def F_numpy(self, v: np.ndarray) -> np.ndarray:
        """F on one point, for scipy's solvers."""
        return self.F(torch.as_tensor(v, dtype=torch.float64)[None])[0].numpy()

    def root(self) -> np.ndarray:
        """scipy.optimize.root (hybr) from x0 at tight tolerance."""
        return _hybr(self.F_numpy, np.asarray(self.x0, dtype=np.float64))


def _powell(z: Tensor) -> Tensor:
    """Powell's badly scaled function: F1 = 1e4 x1 x2 - 1, F2 = exp(-x1) + exp(-x2) - 1.0001."""
    x1, x2 = z[:, 0], z[:, 1]
    return torch.stack([1e4 * x1 * x2 - 1, torch.exp(-x1) + torch.exp(-x2) - 1.0001], dim=1)


def _pipes(q: Tensor) -> Tensor:
    """Four parallel pipes (k = 0.5, total flow 4): P_i = k Q_i^2, F_i = P_i - P_0 (i = 1..3), F_3 = sum Q - 4."""
    p = 0.5 * q**2
    return torch.cat([p[:, 1:] - p[:, :1], q.sum(1, keepdim=True) - 4.0], dim=1)


def _test_nonlin_F(z: Tensor) -> Tensor:
    """F(x) = -d x - c (x.x) x with d = diag(3, 2, 1.5, 1, 0.5), c = 0.01."""
    d = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=z.dtype)
    return -d * z - 0.01 * (z * z).sum(1, keepdim=True) * z


def _test_nonlin_F3(z: Tensor) -> Tensor:
    """F(x) = A x - b, A tridiagonal [1, -2, 1] (3 x 3), b = (1, 2, 3)."""
    a = torch.tensor([[-2.0, 1, 0], [1, -2, 1], [0, 1, -2]], dtype=z.dtype)
    return z @ a.T - torch.tensor([1.0, 2, 3], dtype=z.dtype)


def _test_nonlin_F6(z: Tensor) -> Tensor:
    """F(x) = -J0^-1 v(x), v = ((x1 + 3)(x2^5 - 7) + 18, sin(x2 exp(x1) - 1)), root (0, 1)."""
    j0 = torch.tensor([[-4.256, 14.7], [0.8394989, 0.59964207]], dtype=z.dtype)
    x1, x2 = z[:, 0], z[:, 1]
    v = torch.stack([(x1 + 3) * (x2**5 - 7) + 18, torch.sin(x2 * torch.exp(x1) - 1)], dim=1)
    return -torch.linalg.solve(j0, v.T).T


_NONLIN = "scipy/optimize/tests/test_nonlin.py"
_MGH = "More, Garbow, Hillstrom, ACM TOMS 7 (1981), problem 3"


def classic_systems() -> list[Classic]:
    """scipy's classic nonlinear systems (test_nonlin's F, F2, F2_lucky, F3, F4_powell, F5, F6), each from
    its published start, posed as z = z + F(z) without a problem-specific step size."""
    return [
        Classic("powell(0,1)", _powell, [0.0, 1.0], _MGH + " (its standard start)"),
        Classic("powell(-1,-2)", _powell, [-1.0, -2.0], _NONLIN + ": F4_powell"),
        Classic("pipes", _pipes, [2.0, 0.0, 2.0, 0.0], _NONLIN + ": F5, test_minpack.pressure_network"),
        Classic("F", _test_nonlin_F, [1.0] * 5, _NONLIN + ": F"),
        Classic("F2", lambda z: z, [1.0, 2, 3, 4, 5, 6], _NONLIN + ": F2 (F(x) = x)"),
        Classic("F2_lucky", lambda z: z, [0.0] * 6, _NONLIN + ": F2_lucky (the start is the root)"),
        Classic("F3", _test_nonlin_F3, [1.0, 2, 3], _NONLIN + ": F3"),
        Classic("F6", _test_nonlin_F6, [-0.5, 1.4], _NONLIN + ": F6"),
    ]


def transient_growth(
    batch: int = 6, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """Picard on f(z) = A z + c, A a slowly expanding rotation (|eigenvalues| 1.1): residuals that fall and rise.

    Returns f, x0 (B, 2) float64 and the Picard iterates (K, B, 2) for K = 12 calls of f
    (iterate k = A^k (x0 - x*) + x*), so a test knows which iterate has the lowest residual.
    Everything lives on `device`.
    """
    a = torch.tensor([[0.2, 4.0], [-0.3, 0.1]], dtype=torch.float64, device=device)
    c = torch.tensor([1.0, -1.0], dtype=torch.float64, device=device)
    x0 = torch.randn(batch, 2, generator=_gen(seed), dtype=torch.float64).to(device)

    def f(z: Tensor) -> Tensor:
        return z @ a.T + c

    iterates = [x0]
    for _ in range(11):
        iterates.append(f(iterates[-1]))
    return f, x0, torch.stack(iterates)
