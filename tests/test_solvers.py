"""Every solver on the shared problem set: answers against closed forms and scipy.optimize."""

import numpy as np
import pytest
import scipy.optimize
import torch
from problems import ALL, linear_deq, per_sample_root, problem_set, transient_growth

import fixedpoint
from fixedpoint import Status
from fixedpoint.testing import symmetric_matrix

PROBLEMS = problem_set()
CASES = [(p, s) for p in PROBLEMS for s in ALL if s in p.solvers]


def _error(x, solution):
    """Per-sample ||x - x*|| / max(||x*||, 1)."""
    diff = (x.double() - solution).flatten(1).norm(dim=1)
    return diff / solution.flatten(1).norm(dim=1).clamp_min(1.0)


@pytest.mark.parametrize("problem,solver", CASES, ids=[f"{p.name}-{s}" for p, s in CASES])
def test_solution_matches_reference_float64(problem, solver):
    sol = getattr(fixedpoint, solver)(problem.f, problem.x0, tol=1e-10, max_iter=problem.max_iter, stop=problem.stop)
    assert sol.converged.all(), sol
    assert _error(sol.x, problem.solution).max() < 1e-7
    assert sol.x.shape == problem.x0.shape and sol.x.dtype == torch.float64


@pytest.mark.parametrize("problem,solver", CASES, ids=[f"{p.name}-{s}" for p, s in CASES])
def test_solution_matches_reference_float32(problem, solver):
    def f32(z):
        return problem.f(z.double()).float()

    sol = getattr(fixedpoint, solver)(f32, problem.x0.float(), tol=1e-5, max_iter=problem.max_iter, stop=problem.stop)
    assert sol.converged.all(), sol
    assert sol.x.dtype == torch.float32
    assert _error(sol.x, problem.solution).max() < 1e-3


@pytest.mark.parametrize("solver", ALL)
def test_residual_and_trace_describe_the_returned_iterate(solver):
    problem = PROBLEMS[2]  # tanh layer
    sol = getattr(fixedpoint, solver)(problem.f, problem.x0, tol=1e-8)
    fx = problem.f(sol.x)
    torch.testing.assert_close(sol.fx, fx)  # the image of the returned iterate, not of the last one
    recomputed = (fx - sol.x).flatten(1).norm(dim=1) / fx.flatten(1).norm(dim=1)
    torch.testing.assert_close(sol.residual, recomputed)
    # the trace has one row per iteration; a sample's last finite entry is where it stopped
    assert sol.trace.shape == (int(sol.nsteps.max()), problem.x0.shape[0])
    for b in range(problem.x0.shape[0]):
        column = sol.trace[:, b]
        assert torch.isfinite(column[: sol.nsteps[b]]).all() and torch.isnan(column[sol.nsteps[b] :]).all()
        assert sol.residual[b] == column[: sol.nsteps[b]].min() or sol.nsteps[b] == 0


@pytest.mark.parametrize("max_iter", [3, 5, 11])  # the best iterate in the middle, at the end, before the end
@pytest.mark.parametrize("check_every", [1, 3])
def test_the_best_iterate_is_kept_when_the_residual_rises(max_iter, check_every):
    """The best pair is copied lazily (only when a sample stops or its residual rises): still the right one."""
    f, x0, iterates = transient_growth()
    residuals = (f(iterates) - iterates).norm(dim=2)[: max_iter + 1]  # (K, B): iterate k has residual k
    assert (residuals.diff(dim=0) > 0).any() and (residuals.diff(dim=0) < 0).any()  # it falls and rises
    best = residuals.argmin(dim=0)
    assert len(set(best.tolist())) > 1  # samples differ in where their best iterate is
    sol = fixedpoint.picard(f, x0, tol=1e-30, max_iter=max_iter, stop="abs", check_every=check_every)
    expected = iterates[best, torch.arange(x0.shape[0])]
    assert torch.equal(sol.x, expected) and torch.equal(sol.fx, f(expected))
    assert torch.equal(sol.residual, residuals.min(dim=0).values)


@pytest.mark.parametrize("solver,options", [*[(s, {}) for s in ALL], ("anderson", {"m": 1})])
@pytest.mark.parametrize("check_every", [1, 3])
def test_every_solver_returns_its_lowest_residual_pair(solver, options, check_every):
    f_linear, x0, _ = transient_growth(batch=8, seed=3)

    def f(z):
        return f_linear(z) + 0.3 * torch.sin(3 * z)

    sol = getattr(fixedpoint, solver)(f, x0, tol=1e-30, max_iter=15, stop="abs", check_every=check_every, **options)
    start = (f(x0) - x0).norm(dim=1)
    lowest = torch.minimum(start, sol.trace.nan_to_num(float("inf")).min(dim=0).values)
    assert torch.equal(sol.residual, lowest)
    torch.testing.assert_close(sol.fx, f(sol.x), rtol=0, atol=0)
    torch.testing.assert_close((sol.fx - sol.x).norm(dim=1), sol.residual, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        ("anderson", scipy.optimize.anderson),
        ("broyden", scipy.optimize.broyden1),
        ("newton", scipy.optimize.newton_krylov),
    ],
)
@pytest.mark.parametrize("index", [2, 3, 4, 6])  # tanh layer, DEQ MLP, attention, scipy F3
def test_agrees_with_scipy_optimize(ours, theirs, index):
    problem = PROBLEMS[index]
    sol = getattr(fixedpoint, ours)(problem.f, problem.x0, tol=1e-11, stop="abs", max_iter=300)
    assert sol.converged.all()
    reference = per_sample_root(problem.f, problem.x0, lambda F, v0: theirs(F, v0, f_tol=1e-11))
    np.testing.assert_allclose(sol.x.numpy(), reference.numpy(), atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("solver", ALL)
def test_args_are_passed_to_f_after_the_iterate(solver):
    """f(z, *args) with args=(W, b, 0.5) gives exactly the solve of the closure over them, and the
    fixed point of z = 0.5 (W z + b) in closed form."""
    w = symmetric_matrix(16, -0.5, 0.9)
    b = torch.randn(3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def affine(z, w, b, scale):
        return scale * (z @ w.T + b)

    solve = getattr(fixedpoint, solver)
    x0 = torch.zeros(3, 16, dtype=torch.float64)
    with_args = solve(affine, x0, args=(w, b, 0.5), tol=1e-12, max_iter=200)
    closure = solve(lambda z: affine(z, w, b, 0.5), x0, tol=1e-12, max_iter=200)
    for name in ("x", "fx", "residual", "nsteps", "status", "trace"):
        assert torch.equal(getattr(with_args, name).nan_to_num(), getattr(closure, name).nan_to_num()), name
    assert with_args.nfev == closure.nfev and with_args.converged.all()
    z_star = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - 0.5 * w, 0.5 * b.T).T
    torch.testing.assert_close(with_args.x, z_star, rtol=1e-9, atol=1e-10)


def test_anderson_reaches_tight_tolerance_without_stalling():
    """A fixed absolute ridge stalls here (TorchDEQ hits its iteration cap); ours is relative."""
    f, b, z_star = linear_deq(dim=256, batch=4)
    sol = fixedpoint.anderson(f, torch.zeros_like(b), tol=1e-10, max_iter=400, m=10)
    assert sol.converged.all(), sol
    assert sol.nsteps.max() < 200
    assert _error(sol.x, z_star).max() < 1e-8


def test_anderson_m10_iterations_on_the_benchmark_problem():
    f, b, _ = linear_deq(dim=256, batch=4)
    sol = fixedpoint.anderson(
        lambda z: f(z.double()).float(), torch.zeros_like(b).float(), tol=1e-5, max_iter=200, m=10
    )
    assert sol.converged.all() and sol.nsteps.max() <= 60


def test_broyden_memory_is_bounded_and_still_converges():
    f, b, z_star = linear_deq(dim=256, batch=4)
    sol = fixedpoint.broyden(f, torch.zeros_like(b), tol=1e-5, max_iter=300, m=8)
    assert sol.converged.all() and _error(sol.x, z_star).max() < 1e-3


def test_newton_reverse_mode_jvp_matches_forward_mode():
    problem = PROBLEMS[4]
    fwd = fixedpoint.newton(problem.f, problem.x0, tol=1e-10, jvp="forward")
    rev = fixedpoint.newton(problem.f, problem.x0, tol=1e-10, jvp="reverse")
    assert rev.converged.all()
    torch.testing.assert_close(fwd.x, rev.x, atol=1e-9, rtol=0)
    assert rev.nfev < fwd.nfev  # one recorded call per Newton step instead of one per product


def test_newton_takes_quadratic_steps_on_a_linear_map():
    f, b, z_star = linear_deq(dim=64, batch=2)
    sol = fixedpoint.newton(f, torch.zeros_like(b), tol=1e-10, krylov_dim=64, max_restarts=0, eta_max=1e-12)
    assert sol.nsteps.max() <= 2 and _error(sol.x, z_star).max() < 1e-10


def test_nfev_counts_every_call():
    calls = []
    f, b, _ = linear_deq(dim=8, batch=2)

    def counted(z):
        calls.append(1)
        return f(z)

    for solver in ALL:
        calls.clear()
        sol = getattr(fixedpoint, solver)(counted, torch.zeros_like(b))
        assert sol.nfev == len(calls)


def test_status_enum_codes():
    assert [s.name for s in Status] == ["CONVERGED", "MAX_ITER", "DIVERGED", "NONFINITE"]
    f, b, _ = linear_deq(dim=8, batch=2)
    sol = fixedpoint.picard(f, torch.zeros_like(b), max_iter=2)
    assert sol.statuses() == [Status.MAX_ITER, Status.MAX_ITER]
    assert not sol.converged.any() and sol.nsteps.tolist() == [2, 2]


def test_solvers_compose_with_a_compiled_map():
    """graph=True's replacement: f compiled with torch.compile (inductor, here on a CPU) inside any solver.
    Bugs: the loop calling f in a way that makes dynamo recompile at every solve (a changing Python scalar, a
    new view, a new grad mode per call), hitting the recompile limit over a training run; or the compiled f
    giving other iterates than the eager one."""
    import torch._dynamo

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=gen)
    w *= 0.8 / torch.linalg.matrix_norm(w, ord=2)
    cell = lambda z, x: torch.tanh(z @ w.T + x)  # noqa: E731
    compiled = torch.compile(cell)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # a process-wide count: other tests compile too
    graphs = []
    for step in range(50):
        x = torch.randn(4, 8, generator=gen)
        solver = (fixedpoint.picard, fixedpoint.anderson)[step % 2]
        fast = solver(compiled, torch.zeros(4, 8), args=(x,), tol=1e-6, max_iter=60)
        eager = solver(cell, torch.zeros(4, 8), args=(x,), tol=1e-6, max_iter=60)
        assert fast.converged.all() and fast.nsteps.tolist() == eager.nsteps.tolist()
        torch.testing.assert_close(fast.x, eager.x, rtol=1e-5, atol=1e-6)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert graphs[-1] == graphs[1] <= 2  # compiled once (at most once per grad mode); 48 more solves replay


def test_the_solver_contract_is_explicit(monkeypatch):
    """Bugs: the loop probing for hooks again (a duck-typed object running with whatever it happens to have, e.g.
    a step without ``frozen``), or a solver without a period admitted to graph="solver". A minimal subclass with
    only init/step/update runs with the base class's residual pass and the loop's freezing."""
    from dataclasses import dataclass

    class Duck:
        def init(self, x, fx, g, gnorm):
            return x

        def step(self, fn, state, active):
            return state, state

        def update(self, state, x, fx, g, gnorm):
            return fx

    f = lambda z: 0.5 * z + 1.0  # noqa: E731
    with pytest.raises(TypeError, match="solver must be a fixedpoint Solver \\(a subclass\\), got Duck"):
        fixedpoint.solve(Duck(), f, torch.zeros(2, 3))

    @dataclass(frozen=True)
    class Plain(fixedpoint.Solver):  # x <- f(x): everything else is the base class's and the loop's
        def init(self, x, fx, g, gnorm):
            return fx

        def step(self, fn, state, active, frozen):
            return state, state

        def update(self, state, x, fx, g, gnorm):
            return fx

    sol = fixedpoint.solve(Plain(), f, torch.zeros(2, 3), tol=1e-10, max_iter=60)
    reference = fixedpoint.picard(f, torch.zeros(2, 3), tol=1e-10, max_iter=60)
    torch.testing.assert_close(sol.x, reference.x, rtol=0, atol=0)
    assert sol.nsteps.tolist() == reference.nsteps.tolist() and sol.converged.all()
    from fixedpoint import _graphs
    from fixedpoint.testing import EagerGraphs

    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())  # graphs on a CPU: the stand-in
    with pytest.raises(ValueError, match="graph='solver' is not supported by Plain"):
        fixedpoint.solve(Plain(), f, torch.zeros(2, 3), graph="solver")
