"""beta="auto": scipy's scale of the first step (0.5 max(||x0||, 1) / ||f(x0) - x0||, per sample), and the
classic badly scaled systems scipy's own solvers are tested on: ours solve at least what scipy's solve."""

import warnings
from functools import partial

import numpy as np
import pytest
import scipy.optimize
import torch
from problems import classic_systems

import fixedpoint
from fixedpoint._solvers import auto_beta

TOL = 1e-8  # ours: ||F(x)|| (stop="abs"); scipy: max |F(x)| (f_tol)
MAX_ITER = 200
SYSTEMS = {system.name: system for system in classic_systems()}
# ours, next to scipy's solver of the same kind
KINDS = {
    "anderson": (partial(fixedpoint.anderson, beta="auto"), scipy.optimize.anderson),
    "broyden": (partial(fixedpoint.broyden, beta="auto"), scipy.optimize.broyden1),
    "newton": (fixedpoint.newton, scipy.optimize.newton_krylov),
}
# what scipy 1.17's solvers solve from the published starts (checked below whatever scipy does: a later
# scipy that fails one does not drop it); scipy's anderson and newton_krylov fail both of Powell's starts
ALL = set(SYSTEMS)
SCIPY_SOLVES = {
    "anderson": ALL - {"powell(0,1)", "powell(-1,-2)"},
    "broyden": ALL,
    "newton": ALL - {"powell(0,1)", "powell(-1,-2)"},
}


def _scipy_solves(solver, system) -> bool:
    """Whether scipy's ``solver`` reaches max |F| < TOL from the system's start within MAX_ITER iterations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow in exp on Powell's problem
        try:
            x = solver(system.F_numpy, np.asarray(system.x0), f_tol=TOL, maxiter=MAX_ITER)
        except (scipy.optimize.NoConvergence, ValueError, np.linalg.LinAlgError):
            return False
    return bool(np.all(np.isfinite(x)) and np.abs(system.F_numpy(x)).max() < TOL)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_solves_what_scipy_solves(name, kind):
    """Ours (anderson and broyden with beta="auto", newton) solve, from the same start, every classic system
    scipy's solver of the same kind solves: converged, ||F(x)|| <= tol, at scipy.optimize.root's root.
    Catches: an unscaled first step that blows Powell's problem up (exp overflow) or stalls, a restart that
    repeats the step that blew up, a scale taken from the wrong norm or the whole batch."""
    system = SYSTEMS[name]
    ours, theirs = KINDS[kind]
    if not (name in SCIPY_SOLVES[kind] or _scipy_solves(theirs, system)):
        pytest.skip(f"scipy's {theirs.__name__} does not solve {name} either")
    x0 = torch.tensor([system.x0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fixedpoint.ConvergenceWarning)
        sol = ours(system.f, x0, tol=TOL, max_iter=MAX_ITER, stop="abs")
    assert sol.converged.all(), (name, kind, sol)
    assert float(system.F(sol.x).norm()) <= TOL
    np.testing.assert_allclose(sol.x[0].numpy(), system.root(), rtol=1e-5, atol=1e-8)


def test_auto_beta_is_scipys_alpha():
    """auto_beta is scipy's initial Jacobian scale (GenericBroyden.setup: alpha = 0.5 max(|x0|, 1) / |F(x0)|),
    and 1 where the start is its fixed point. Catches: a dropped 0.5 or max(., 1), ||f(x0)|| in place of
    ||f(x0) - x0||, a NaN/inf scale from a zero residual."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.cat([0.01 * torch.randn(2, 5, generator=gen), 10 * torch.randn(2, 5, generator=gen)]).double()
    g0 = torch.randn(4, 5, generator=gen, dtype=torch.float64) * torch.tensor([[1e-3], [1.0], [1.0], [1e4]])
    for x, g, beta in zip(x0, g0, auto_beta(x0, g0.norm(dim=1)), strict=True):
        jacobian = scipy.optimize.BroydenFirst()
        jacobian.setup(x.numpy(), g.numpy(), lambda v: v)
        assert float(beta) == pytest.approx(jacobian.alpha, rel=1e-14)
    zero = torch.zeros(2, dtype=torch.float64)
    assert auto_beta(torch.ones(2, 3, dtype=torch.float64), zero).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_auto_first_step_is_scipys(solver):
    """Every solver's first step with beta="auto" is x0 + alpha F(x0), scipy's first step, per sample.
    Catches: beta applied to the wrong term (x0 + F(x0) - beta x0), the scale of another sample, a step
    from the unscaled image f(x0) where the kernel's beta is a scalar (Anderson's mixing, Picard's step)."""
    system = SYSTEMS["powell(-1,-2)"]
    x0 = torch.tensor([[-1.0, -2.0], [0.0, 1.0], [2.0, 0.5]], dtype=torch.float64)
    seen = []

    def f(z):
        seen.append(z.clone())
        return system.f(z)

    getattr(fixedpoint, solver)(f, x0, tol=TOL, max_iter=1, stop="abs", beta="auto")
    g0 = system.F(x0)
    alpha = 0.5 * x0.norm(dim=1).clamp_min(1) / g0.norm(dim=1)
    torch.testing.assert_close(seen[1], x0 + alpha[:, None] * g0, rtol=1e-10, atol=1e-10)  # Anderson: f + (beta - 1) g


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_auto_scale_is_per_sample(solver):
    """A batch of starts gives each sample the iterations and result it gets alone: one sample at its fixed
    point (residual 0, scale 1), one tiny, one huge residual. Catches: a scale from batch-wide norms, a NaN
    scale of one sample that spreads, Broyden's backtracking (a quarter of the scale after a blown first
    step) applied to samples that did not blow up."""
    cases = [("powell(0,1)", [[0.0, 1.0], [-1.0, -2.0], [1.1e-5, 9.106]]), ("F2", [[0.0] * 6, [1.0, 2, 3, 4, 5, 6]])]
    for name, starts in cases:
        f = SYSTEMS[name].f
        x0 = torch.tensor(starts, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            solve = partial(getattr(fixedpoint, solver), f, tol=TOL, max_iter=60, stop="abs", beta="auto")
            batch = solve(x0)
            alone = [solve(x0[i : i + 1]) for i in range(len(starts))]
        assert batch.nsteps.tolist() == [int(s.nsteps[0]) for s in alone]
        assert batch.status.tolist() == [int(s.status[0]) for s in alone]
        torch.testing.assert_close(batch.x, torch.cat([s.x for s in alone]), rtol=1e-12, atol=1e-300, equal_nan=True)


def test_beta_is_checked():
    """beta is a number in its range or "auto": a misspelt "Auto" or a nonpositive scale is a ValueError naming
    beta, not a silent unit step. Catches: a string compared loosely, Broyden accepting beta <= 0."""
    f, x0 = (lambda z: 0.5 * z), torch.ones(2, 3)
    for solve in (fixedpoint.picard, fixedpoint.anderson, fixedpoint.broyden):
        for bad in ("Auto", "scipy", 0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="beta"):
                solve(f, x0, beta=bad)
    with pytest.raises(ValueError, match="beta"):
        fixedpoint.anderson(f, x0, beta=2.5)  # a damping beyond 2 is still refused
    assert fixedpoint.broyden(f, x0, beta=3.0).converged.all()  # any positive initial scale
