"""The robustness rules of the public contract, one test each."""

import re
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import ALL, linear_deq

import fixedpoint
from fixedpoint import Status

SOLVERS = [getattr(fixedpoint, name) for name in ALL]


def _poisoned(f, sample: int, after: int):
    """f, but sample ``sample`` turns NaN from call ``after`` on."""
    calls = [0]

    def g(z):
        calls[0] += 1
        out = f(z)
        if calls[0] > after:
            out = out.clone()
            out[sample] = float("nan")
        return out

    return g


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_a_nan_sample_is_nonfinite_and_leaves_the_others_alone(solver):
    f, b, z_star = linear_deq(dim=16, batch=4, high=0.8)
    x0 = torch.zeros_like(b)
    clean = solver(f, x0, tol=1e-8, max_iter=300)
    sol = solver(_poisoned(f, sample=1, after=3), x0, tol=1e-8, max_iter=300)
    assert sol.statuses()[1] == Status.NONFINITE
    assert torch.isfinite(sol.x[1]).all() and torch.isfinite(sol.residual[1])
    others = [0, 2, 3]
    assert (sol.status[others] == Status.CONVERGED).all()
    # same iterates and step counts as without the bad sample; the loop did not wait for it
    torch.testing.assert_close(sol.x[others], clean.x[others], rtol=0, atol=1e-12)
    assert sol.nsteps[others].tolist() == clean.nsteps[others].tolist()
    assert sol.trace.shape[0] == sol.nsteps[others].max()
    assert sol.nsteps[1] < sol.nsteps[others].min()


def test_nonfinite_sample_keeps_its_last_finite_iterate():
    f, b, _ = linear_deq(dim=8, batch=2, high=0.5)
    sol = fixedpoint.picard(_poisoned(f, sample=0, after=3), torch.zeros_like(b), tol=1e-12)
    # calls 1..3 are finite: x0 -> x1 -> x2 were evaluated finitely, the 4th call (at x3) was NaN
    x = torch.zeros_like(b)
    for _ in range(2):
        x = f(x)
    torch.testing.assert_close(sol.x[0], x[0])
    assert sol.nsteps[0] == 3


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_an_expanding_sample_is_diverged(solver):
    f, b, _ = linear_deq(dim=8, batch=3, high=0.5)
    grow = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)[:, None]

    def g(z):  # sample 1 is z -> 3 z + c far from its fixed point: it runs away
        return torch.where(grow > 1, 3.0 * z + 1.0, f(z))

    x0 = torch.zeros_like(b)
    x0[1] = 1.0
    sol = solver(g, x0, tol=1e-8, max_iter=200, divergence=1e3)
    if solver is fixedpoint.picard:
        assert sol.statuses()[1] == Status.DIVERGED
    else:  # the others may solve the linear map z = 3 z + 1: either way it stops early
        assert sol.statuses()[1] in (Status.DIVERGED, Status.CONVERGED)
    assert (sol.status[[0, 2]] == Status.CONVERGED).all()


def test_divergence_check_can_be_disabled():
    f = lambda z: 2.0 * z + 1.0  # noqa: E731
    sol = fixedpoint.picard(f, torch.zeros(2, 3), max_iter=30, divergence=None)
    assert sol.statuses() == [Status.MAX_ITER] * 2


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_in_low_precision_out(solver, dtype):
    f, b, z_star = linear_deq(dim=32, batch=3, high=0.8)
    w_b = lambda z: f(z.double()).to(z.dtype)
    sol = solver(w_b, torch.zeros_like(b, dtype=dtype), tol=1e-2, max_iter=100)
    assert sol.x.dtype == dtype
    assert sol.residual.dtype == torch.float32 and sol.trace.dtype == torch.float32
    assert sol.converged.all()
    err = (sol.x.double() - z_star).norm(dim=1) / z_star.norm(dim=1)
    assert err.max() < 1e-2 / (1 - 0.8) + 1e-2  # residual / (1 - contraction) + rounding


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_any_shape_with_leading_batch(solver):
    f, b, z_star = linear_deq(dim=24, batch=2, high=0.8)
    g = lambda z: f(z.reshape(2, -1)).reshape(z.shape)  # noqa: E731
    sol = solver(g, torch.zeros(2, 2, 3, 4, dtype=torch.float64), tol=1e-10, max_iter=200)
    assert sol.x.shape == (2, 2, 3, 4)
    torch.testing.assert_close(sol.x.reshape(2, -1), z_star)


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_converged_samples_are_frozen(solver):
    """A sample that starts at its fixed point stops at step 0 and is returned unchanged."""
    f, b, z_star = linear_deq(dim=16, batch=3, high=0.8)
    x0 = torch.zeros_like(b)
    x0[2] = z_star[2]
    sol = solver(f, x0, tol=1e-8)
    assert sol.nsteps[2] == 0 and sol.nsteps[:2].min() > 0
    assert torch.equal(sol.x[2], z_star[2])
    assert torch.isnan(sol.trace[:, 2]).all()


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_no_autograd_graph(solver):
    w = torch.nn.Linear(8, 8, dtype=torch.float64)
    with torch.no_grad():
        w.weight.mul_(0.3)
    x0 = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    sol = solver(lambda z: torch.tanh(w(z)), x0)
    assert not sol.x.requires_grad and sol.x.grad_fn is None


def test_misspelt_option_is_a_type_error():
    f, b, _ = linear_deq(dim=4, batch=1)
    with pytest.raises(TypeError, match="max_iters"):
        fixedpoint.anderson(f, b, max_iters=10)
    with pytest.raises(TypeError):
        fixedpoint.picard(f, b, 1e-3)  # options are keyword-only


@pytest.mark.parametrize(
    "solver,option,value",
    [
        ("picard", "tol", 0.0),
        ("picard", "tol", -1e-3),
        ("anderson", "max_iter", 0),
        ("broyden", "max_iter", 2.5),
        ("anderson", "m", 0),
        ("broyden", "m", 0),
        ("broyden", "m", 1),  # the rank reduction keeps m // 2 = 0: plain Picard
        ("anderson", "max_iter", True),
        ("anderson", "beta", 0.0),
        ("picard", "beta", 3.0),
        ("anderson", "ridge", -1.0),
        ("newton", "krylov_dim", 0),
        ("newton", "jvp", "central"),
        ("anderson", "stop", "relative"),
        ("picard", "divergence", 0.5),
    ],
)
def test_bad_values_are_value_errors_naming_the_value(solver, option, value):
    f, b, _ = linear_deq(dim=4, batch=1)
    with pytest.raises(ValueError, match=rf"{option}.*{re.escape(repr(value))}"):
        getattr(fixedpoint, solver)(f, b, **{option: value})


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_f_changing_shape_or_batch_is_a_value_error(solver):
    with pytest.raises(ValueError, match=r"f changed the shape.*\(3, 4\).*\(3, 2\)"):
        solver(lambda z: z[:, :2], torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(1, 4\)"):
        solver(lambda z: z[:1], torch.zeros(3, 4))
    with pytest.raises(ValueError, match="f returned a tensor on meta, its input is on cpu"):
        solver(lambda z: z.to("meta"), torch.zeros(3, 4))


def test_newton_reverse_jvp_under_inference_mode_is_a_clear_error():
    """Reverse-mode products need autograd, which inference mode turns off; forward mode runs there."""
    f, b, _ = linear_deq(dim=4, batch=2)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"jvp='reverse'.*inference_mode.*jvp='forward'"):
            fixedpoint.newton(f, b, jvp="reverse")
        assert fixedpoint.newton(f, b, tol=1e-10).converged.all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("check_every", [1, 3])
def test_f_returning_a_static_output_buffer_is_a_value_error(name, check_every):
    """A CUDA-graphed model hands back one buffer on every call: the loop would read overwritten pairs.

    (Newton's default forward-mode jvp rejects such an f by itself: torch.func forbids the in-place copy.)
    """
    solver = partial(fixedpoint.newton, jvp="reverse") if name == "newton" else getattr(fixedpoint, name)
    f, b, _ = linear_deq(dim=4, batch=2)
    buffer = torch.empty_like(b)

    def static(z):
        return buffer.copy_(f(z))

    with pytest.raises(ValueError, match="previous output's address.*must return a new tensor"):
        solver(static, b, tol=1e-12, check_every=check_every, **({"beta": 0.9} if name == "picard" else {}))
    sol = solver(lambda z: static(z).clone(), b, tol=1e-12, check_every=check_every)  # the fix the error names
    torch.testing.assert_close(sol.x, solver(f, b, tol=1e-12, check_every=check_every).x, rtol=0, atol=0)


@pytest.mark.parametrize("solver", SOLVERS[:3], ids=ALL[:3])
def test_f_returning_its_own_input_is_fine(solver):
    """A projection hands back a feasible z itself: that is no reused buffer (f(z) = z there).

    (Newton is left out: on this map it heads for 0 from below, where fp32 squared norms underflow.)
    """

    def project(z):
        return z if (z >= 0).all() else z.abs()

    sol = solver(project, -torch.ones(2, 3))
    assert sol.converged.all() and (sol.x >= 0).all() and torch.equal(project(sol.x), sol.x)


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_numpy_and_tensor_scalars_are_options_too(solver):
    """Values from a sweep config (NumPy scalars, 0-d tensors) are numbers like any other."""
    import numpy as np

    f, b, z_star = linear_deq(dim=4, batch=2)
    sol = solver(f, b, tol=np.float32(1e-6), max_iter=np.int64(30), check_every=torch.tensor(1))
    plain = solver(f, b, tol=float(np.float32(1e-6)), max_iter=30)
    torch.testing.assert_close(sol.x, plain.x, rtol=0, atol=0)
    assert torch.equal(sol.nsteps, plain.nsteps)


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_f_modifying_its_input_in_place_is_a_value_error(solver):
    """z.clamp_() inside f changes the loop's own iterate: g = f(x) - x would read 0 and "converge" at once."""
    with pytest.raises(ValueError, match="f modified its input in place"):
        solver(lambda z: z.mul_(0.5).add_(1.0), torch.zeros(2, 3))


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_f_returning_integers_is_a_type_error(solver):
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        solver(lambda z: torch.round(0.5 * z + 1.3).long(), torch.zeros(2, 3))


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_a_fixed_point_at_zero_converges_with_the_relative_stop(solver):
    """||f(x) - x|| / ||f(x)|| does not shrink on the way to a fixed point at 0 (a blank sample, a zero
    injection): the relative stop measures against the start's residual there (kernels.reference.REL_FLOOR),
    so that sample converges near 0 instead of holding the batch at max_iter."""
    torch.manual_seed(0)
    w = torch.randn(16, 16, dtype=torch.float64)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(3, 16, dtype=torch.float64)
    x[0] = 0.0  # tanh(W z) = z only at z = 0
    sol = solver(lambda z: torch.tanh(z @ w.T + x), torch.full((3, 16), 0.1, dtype=torch.float64), tol=1e-4)
    assert sol.converged.all()
    assert float(sol.x[0].norm()) < 1e-6
    z0_residual = float((torch.tanh(torch.full((16,), 0.1, dtype=torch.float64) @ w.T) - 0.1).norm())
    assert float(sol.residual[0]) == pytest.approx(float((sol.fx[0] - sol.x[0]).norm()) / (1e-3 * z0_residual))


def test_bad_inputs_are_type_errors():
    with pytest.raises(TypeError, match="callable"):
        fixedpoint.anderson("f", torch.zeros(2, 2))
    with pytest.raises(TypeError, match="floating"):
        fixedpoint.anderson(lambda z: z, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="Tensor"):
        fixedpoint.anderson(lambda z: z, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="batch"):
        fixedpoint.anderson(lambda z: z, torch.zeros(0, 3))


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_autocast_applies_to_f_and_never_to_the_solver(solver):
    """Under torch.autocast f runs autocast (a mixed-precision model), while the solver's norms, Gram matrices
    and small solves stay in fp32: with an f autocast leaves alone (elementwise), the solve is bit for bit the
    one without autocast. (Anderson's matmuls in bf16 used to stall it at max_iter.)"""
    gen = torch.Generator().manual_seed(0)
    a, b = 0.9 * torch.rand(4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    seen = []

    def f(z):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.tanh(z * a + b)

    plain = solver(f, torch.zeros(4, 64), tol=1e-7, max_iter=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = solver(f, torch.zeros(4, 64), tol=1e-7, max_iter=100)
        assert torch.is_autocast_enabled("cpu")  # restored
    assert seen == [False] * plain.nfev + [True] * mixed.nfev and mixed.converged.all()
    for name in ("x", "fx", "residual", "nsteps", "status"):
        assert torch.equal(getattr(mixed, name), getattr(plain, name)), name


@pytest.mark.parametrize("args", [torch.ones(2, 2), [torch.ones(2, 2)], 1.0])
def test_args_that_are_not_a_tuple_are_a_type_error(args):
    """A lone tensor or a list is not unpacked silently as f's further inputs."""
    with pytest.raises(TypeError, match=f"args must be a tuple .*got {type(args).__name__}"):
        fixedpoint.anderson(lambda z, b: z + b, torch.zeros(2, 2), args=args)


@st.composite
def contractions(draw):
    """A random batched affine contraction z -> W z + b and its fixed point."""
    dim = draw(st.integers(2, 12))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    norm = draw(st.floats(0.05, 0.9))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    w *= norm / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - w, b.T).T
    return w, b, z_star


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
@settings(max_examples=25, deadline=None)
@given(problem=contractions())
def test_random_contractions_converge_to_linalg_solve(solver, problem):
    w, b, z_star = problem
    sol = solver(lambda z: z @ w.T + b, torch.zeros_like(b), tol=1e-11, max_iter=500)
    assert sol.converged.all(), sol
    torch.testing.assert_close(sol.x, z_star, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
def test_checking_every_k_iterations_gives_the_same_solution(solver):
    f, b, _ = linear_deq(dim=16, batch=4, high=0.8)
    poisoned = _poisoned(f, sample=2, after=4)
    every = solver(poisoned, torch.zeros_like(b), tol=1e-8, max_iter=300)
    sparse = solver(_poisoned(f, sample=2, after=4), torch.zeros_like(b), tol=1e-8, max_iter=300, check_every=7)
    assert sparse.status.tolist() == every.status.tolist() and sparse.nsteps.tolist() == every.nsteps.tolist()
    torch.testing.assert_close(sparse.x, every.x, rtol=0, atol=1e-12)
    torch.testing.assert_close(sparse.trace, every.trace, rtol=0, atol=1e-12, equal_nan=True)
    # the count is asked for after iterations 7, 14, ... and read one iteration later: the loop runs on
    # to one iteration past the first multiple of 7 at or after the last sample's stop (Newton's extra
    # iterations cost it more than one call each)
    stopped = int(every.nsteps.max())
    extra = 7 * -(-stopped // 7) + 1 - stopped
    assert sparse.nfev == every.nfev + extra if solver is not fixedpoint.newton else sparse.nfev > every.nfev
    with pytest.raises(ValueError, match="check_every.*0"):
        solver(f, b, check_every=0)


def test_a_huge_max_iter_costs_memory_for_the_iterations_run_only():
    """The trace was allocated for max_iter + 1 rows up front: max_iter=10**9 on a 14-step solve asked for
    4 GB per sample (an allocator error that names no option, or a minute spent filling it with NaN), and the
    Solution's trace, a view, kept all of it alive."""
    f, b, _ = linear_deq(dim=8, batch=1, high=0.5, dtype=torch.float32)
    sol = fixedpoint.picard(f, torch.zeros_like(b), tol=1e-6, max_iter=10**9)
    reference = fixedpoint.picard(f, torch.zeros_like(b), tol=1e-6, max_iter=50)
    assert sol.converged.all() and sol.trace.shape == (int(sol.nsteps.max()), 1) == reference.trace.shape
    torch.testing.assert_close(sol.trace, reference.trace, rtol=0, atol=0, equal_nan=True)
    assert sol.trace.untyped_storage().nbytes() < 2**12  # a few dozen rows of one fp32 residual


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
@pytest.mark.parametrize("check_every", [1, 3])
def test_the_trace_grown_while_iterating_equals_one_allocated_up_front(monkeypatch, solver, check_every):
    """The eager loop grows its trace (TRACE_ROWS rows, then doubling up to max_iter + 1): a growth that
    dropped, shifted or left unwritten rows, or put the start's scratch row into the result, shows here,
    where it grows from 3 rows (many times but for Newton; a NaN sample and the lagged check included)."""
    from fixedpoint import _solve

    f, b, _ = linear_deq(dim=16, batch=3, high=0.95)

    def run():
        return solver(_poisoned(f, sample=1, after=5), torch.zeros_like(b), tol=1e-10, max_iter=99,
                      check_every=check_every)  # fmt: skip

    monkeypatch.setattr(_solve, "TRACE_ROWS", 2)
    grown = run()
    monkeypatch.setattr(_solve, "TRACE_ROWS", 10**4)  # max_iter + 1 rows up front, as the graph modes
    upfront = run()
    assert grown.trace.shape == upfront.trace.shape and grown.trace.shape[0] > 3  # grown
    torch.testing.assert_close(grown.trace, upfront.trace, rtol=0, atol=0, equal_nan=True)
    assert grown.nsteps.tolist() == upfront.nsteps.tolist() and torch.equal(grown.x, upfront.x)


@pytest.mark.parametrize("solver,option", [("anderson", "m"), ("broyden", "m"), ("newton", "krylov_dim")])
def test_an_option_whose_buffers_cannot_fit_in_memory_is_a_value_error_naming_it(solver, option):
    """m sizes Anderson's (B, m, D) history and (B, m, m) Gram matrix (Broyden's factors, Newton's GMRES
    basis: krylov_dim): m=10**12 was an allocator error that names no option, and a size the OS overcommits
    would kill the process when the history is zeroed. Checked before allocating: at once."""
    import time

    f, b, _ = linear_deq(dim=4, batch=2)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{option}=1000000000000 asks for .* bytes.*available"):
        getattr(fixedpoint, solver)(f, b, **{option: 10**12})
    assert time.perf_counter() - start < 1


def test_solver_graphs_refuse_a_max_iter_whose_static_trace_cannot_fit(monkeypatch):
    """graph="solver" keeps max_iter + 1 trace rows at fixed addresses (the device counts the row): a
    max_iter too large for memory was an allocator error that names no option. One that fits still runs."""
    from fixedpoint import _graphs
    from fixedpoint.testing import EagerGraphs

    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    f, b, _ = linear_deq(dim=4, batch=2, high=0.5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"max_iter=1000000000000 asks for .* bytes\) for the static trace"):
        fixedpoint.picard(f, b, graph="solver", max_iter=10**12)
    sol = fixedpoint.picard(f, b, graph="solver", max_iter=10**4)
    assert sol.converged.all() and sol.trace.shape == (int(sol.nsteps.max()), 2)


@pytest.mark.parametrize("style", ["setup_context", "ctx_in_forward"])
def test_newton_on_an_autograd_function_without_jvp_names_the_problem_and_jvp_reverse(style):
    """A custom torch.autograd.Function with only a backward (the usual kind) has no forward-mode derivative:
    newton's default jvp='forward' failed with torch.func's internal message, which never says that
    jvp='reverse' (backward only) solves the same problem."""

    class HalfTanh(torch.autograd.Function):
        @staticmethod
        def backward(ctx, grad):
            (z,) = ctx.saved_tensors
            return grad * 0.5 * (1 - torch.tanh(z) ** 2)

    if style == "setup_context":
        HalfTanh.forward = staticmethod(lambda z: 0.5 * torch.tanh(z))
        HalfTanh.setup_context = staticmethod(lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))
    else:
        HalfTanh.forward = staticmethod(lambda ctx, z: ctx.save_for_backward(z) or 0.5 * torch.tanh(z))
    b = torch.linspace(-1, 1, 6, dtype=torch.float64).view(2, 3)
    f = lambda z: HalfTanh.apply(z) + b  # noqa: E731
    with pytest.raises(ValueError, match=r"forward-mode autograd.*does not support.*use jvp='reverse'"):
        fixedpoint.newton(f, torch.zeros_like(b))
    sol = fixedpoint.newton(f, torch.zeros_like(b), jvp="reverse", tol=1e-12)
    assert sol.converged.all()
    torch.testing.assert_close(sol.x, 0.5 * torch.tanh(sol.x) + b)


@pytest.mark.parametrize("solver", SOLVERS, ids=ALL)
@pytest.mark.parametrize(
    "option,value",
    [("tol", float("inf")), ("tol", float("nan")), ("tol", torch.tensor(float("inf"))), ("max_iter", float("inf"))],
)
def test_infinite_or_nan_tolerances_and_budgets_are_value_errors_naming_the_value(solver, option, value):
    """tol=inf would stop every sample as CONVERGED at its start, tol=nan never (nan comparisons are false):
    both are refused, as is an infinite max_iter (a budget is an integer)."""
    f, b, _ = linear_deq(dim=4, batch=1)
    with pytest.raises(ValueError, match=rf"{option}.*{re.escape(repr(value))}"):
        solver(f, b, **{option: value})
