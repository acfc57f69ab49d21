"""Stability diagnostics: spectral_radius against known spectra, Solution.rate against closed-form iterations."""

import math

import pytest
import torch

import fixedpoint
from fixedpoint import Status, spectral_radius


def _linear(a: torch.Tensor):
    """f(z) = A_b z per sample, A (B, D, D)."""
    return lambda z: torch.einsum("bij,bj->bi", a, z)


def _with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, D, D) non-symmetric matrices Q diag(eigenvalues) Q^-1 with random Q."""
    q = torch.randn(*eigenvalues.shape, eigenvalues.shape[-1], generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)  # fmt: skip
    return q @ torch.diag_embed(eigenvalues) @ torch.linalg.inv(q)


@pytest.mark.parametrize("jvp", ["forward", "reverse"])
def test_spectral_radius_of_linear_maps_with_known_spectra(jvp):
    """Catches: the growth of the first (transient) steps averaged in, a batch-wide norm instead of one per
    sample, the sign of a negative dominant eigenvalue kept (a radius is |lambda|), a zero map giving NaN."""
    eigenvalues = torch.tensor([[0.95, 0.6, 0.5, 0.1], [-1.2, 0.7, 0.3, 0.2], [0.5, -0.2, 0.1, 0.0]],
                               dtype=torch.float64)  # fmt: skip
    a = torch.cat([_with_spectrum(eigenvalues), torch.zeros(1, 4, 4, dtype=torch.float64)])  # a zero Jacobian
    z = torch.randn(4, 4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    rho = spectral_radius(_linear(a), z, iters=80, jvp=jvp, generator=gen)
    assert rho.dtype == torch.float64 and rho.shape == (4,)
    torch.testing.assert_close(rho[:3], torch.tensor([0.95, 1.2, 0.5], dtype=torch.float64), rtol=1e-6, atol=0)
    assert rho[3] == 0


def test_spectral_radius_of_a_rotation_is_its_scale():
    """A dominant complex pair r e^{+-i theta} (a scaled rotation block): the power iteration's vector turns
    every step, its norm grows by r exactly. Catches: a Rayleigh quotient (v . J v, ~r cos theta) in place of
    the growth."""
    r, theta = 0.9, 1.0
    block = r * torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    a = torch.zeros(2, 3, 3)
    a[:, :2, :2] = block
    a[:, 2, 2] = 0.3
    rho = spectral_radius(_linear(a), torch.zeros(2, 3), iters=40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rho, torch.full((2,), r), rtol=1e-5, atol=0)


def test_spectral_radius_of_a_nonlinear_layer_at_its_fixed_point():
    """A tanh DEQ layer at its solution: equal to the largest |eigenvalue| of the explicit Jacobian
    diag(1 - tanh^2) W (torch.autograd.functional.jacobian), with f's further inputs passed as args.
    Catches: the Jacobian taken at the wrong point (z0 rather than the solution), args dropped."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    f = lambda z, bias: torch.tanh(z @ w.T + bias)  # noqa: E731
    sol = fixedpoint.anderson(f, torch.zeros(2, 6, dtype=torch.float64), args=(b,), tol=1e-12, max_iter=100)
    rho = spectral_radius(f, sol.x, args=(b,), iters=400, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda z, i=i: f(z[None], b[i : i + 1])[0], sol.x[i])
        expected = torch.linalg.eigvals(jac).abs().max()
        torch.testing.assert_close(rho[i], expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"iters": 1}, ValueError, "iters"),
        ({"jvp": "sideways"}, ValueError, "jvp must be 'forward' or 'reverse', got 'sideways'"),
        ({"args": [1]}, TypeError, "args must be a tuple"),
    ],
)
def test_spectral_radius_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral_radius(torch.tanh, torch.zeros(2, 3), **kwargs)
    with pytest.raises(TypeError, match="z must be a non-empty floating-point tensor"):
        spectral_radius(torch.tanh, torch.zeros(2, 3, dtype=torch.long))


def test_rate_of_a_linear_iteration_is_its_contraction():
    """z <- a z + c per sample (scalar a): the absolute residual shrinks by |a| every iteration, so the rate
    is |a| exactly; a sample stopped at iteration 1 has no rate (NaN), and a diverged one grows (> 1).
    Catches: the window read past a stopped sample's last residual (its NaN rows), a ratio inverted."""
    a = torch.tensor([0.5, 0.9, -0.8, 0.0, 1.5], dtype=torch.float64)[:, None]
    f = lambda z: a * z + 1.0  # noqa: E731
    sol = fixedpoint.picard(f, torch.zeros(5, 2, dtype=torch.float64), tol=1e-9, max_iter=200, stop="abs",
                            divergence=1e3)  # fmt: skip
    assert sol.statuses() == [Status.CONVERGED] * 4 + [Status.DIVERGED]
    # (the last residuals are ~1e-9 of iterates ~10: f(x) - x carries ~1e-6 relative rounding)
    torch.testing.assert_close(sol.rate[:3], a[:3, 0].abs(), rtol=1e-5, atol=0)
    assert math.isnan(sol.rate[3])  # a = 0: f(x0) is the fixed point, the trace holds one residual (0)
    torch.testing.assert_close(sol.rate[4], torch.tensor(1.5, dtype=torch.float64), rtol=1e-5, atol=0)


def test_rate_is_nan_without_two_traced_iterations():
    """Catches: an index error or a made-up rate when the trace has fewer than two rows."""
    sol = fixedpoint.picard(lambda z: 0.5 * z, torch.ones(3, 2), max_iter=1)
    assert sol.trace.shape[0] == 1 and torch.isnan(sol.rate).all()


def test_fixedpoint_reports_the_spectral_radius_only_when_asked():
    """A linear DEQ layer z = A z + x (A with a known spectrum): FixedPoint(spectral_radius=k) estimates
    rho(A) at each forward's solution, in eval and in training, at k more calls of f; off by default (no
    extra call, NaN in convergence()). Catches: the estimate taken at the start instead of the solution,
    the layer's inputs not passed to f, the calls made when nobody asked."""
    eigenvalues = torch.tensor([[0.7, 0.3, -0.2], [-0.85, 0.1, 0.4]], dtype=torch.float64)
    a = _with_spectrum(eigenvalues)
    calls = []

    def f(z, x):
        calls.append(1)
        return torch.einsum("bij,bj->bi", a, z) + x

    x = torch.randn(2, 3, dtype=torch.float64)
    plain = fixedpoint.FixedPoint(f, solver=fixedpoint.anderson).eval()
    plain(x)
    assert plain.last_spectral_radius is None and math.isnan(plain.convergence()["spectral_radius"])
    without = len(calls)
    calls.clear()
    layer = fixedpoint.FixedPoint(f, solver=fixedpoint.anderson, spectral_radius=60)
    for training in (False, True):
        layer.train(training)
        calls.clear()
        layer(x.clone().requires_grad_(training))
        torch.testing.assert_close(layer.last_spectral_radius, torch.tensor([0.7, 0.85], dtype=torch.float64),
                                   rtol=1e-6, atol=0)  # fmt: skip
        assert layer.convergence()["spectral_radius"] == pytest.approx(0.85, rel=1e-6)
        if not training:
            assert len(calls) == without + 60
    with pytest.raises(ValueError, match="spectral_radius"):
        fixedpoint.FixedPoint(f, spectral_radius=1)


def test_spectral_radius_of_a_structured_state_is_the_whole_maps():
    """Two leaves updated by separate linear maps (radii 0.6 and 0.9): the whole map's radius is 0.9.
    Catches: only the first leaf's Jacobian estimated, a structure refused."""
    a1 = _with_spectrum(torch.tensor([[0.6, 0.2]], dtype=torch.float64))
    a2 = _with_spectrum(torch.tensor([[-0.9, 0.5, 0.1]], dtype=torch.float64), seed=1)
    f = lambda z: (torch.einsum("bij,bj->bi", a1, z[0]), torch.einsum("bij,bj->bi", a2, z[1]))  # noqa: E731
    state = (torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    rho = spectral_radius(f, state, iters=80, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rho, torch.tensor([0.9], dtype=torch.float64), rtol=1e-6, atol=0)
