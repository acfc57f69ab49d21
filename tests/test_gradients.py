"""Backward modes: implicit against gradcheck and closed forms; jfb, phantom, unrolled, stochastic_jfb."""

import warnings
from functools import partial

import pytest
import torch
from torch import nn

import fixedpoint as fp
from fixedpoint.testing import symmetric_matrix

D = 64


def _linear_deq(dtype=torch.float64):
    """z = W z + U x, W symmetric, eigenvalues in [-0.5, 0.98]; loss = sum(c * z*)."""
    g = torch.Generator().manual_seed(0)
    w = symmetric_matrix(D, -0.5, 0.98, dtype=dtype)
    u = (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5).to(dtype).requires_grad_(True)
    x = torch.randn(3, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    c = torch.randn(3, D, generator=g, dtype=torch.float64).to(dtype)
    f = lambda z: z @ w.T + x @ u.T  # noqa: E731
    # closed form: z* = (I - W)^-1 U x, dL/dz* = c, adjoint a = (I - W)^-T c
    a = torch.linalg.solve((torch.eye(D, dtype=torch.float64) - w.double()).T, c.double().T).T
    exact_u = a.T @ x.detach().double()
    exact_x = a @ u.detach().double()
    return f, u, x, c, exact_u, exact_x


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def _solve_and_backward(f, x, c, **options):
    sol = fp.anderson(f, torch.zeros_like(x), tol=1e-12 if x.dtype == torch.float64 else 1e-6, max_iter=800, m=10)
    z = fp.implicit(f, sol.x, **options)
    (z * c).sum().backward()
    return z


def test_implicit_matches_closed_form_with_defaults():
    f, u, x, c, exact_u, exact_x = _linear_deq()
    _solve_and_backward(f, x, c)
    assert _rel(u.grad, exact_u) <= 1e-4
    assert _rel(x.grad, exact_x) <= 1e-4


def test_implicit_matches_closed_form_at_tight_settings():
    f, u, x, c, exact_u, exact_x = _linear_deq()
    _solve_and_backward(f, x, c, tol=1e-13, max_iter=1000, m=10)
    assert _rel(u.grad, exact_u) <= 1e-8
    assert _rel(x.grad, exact_x) <= 1e-8


def test_implicit_float32_defaults_are_accurate():
    f, u, x, c, exact_u, exact_x = _linear_deq(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.ConvergenceWarning)
        _solve_and_backward(f, x, c)
    assert _rel(u.grad, exact_u) <= 1e-4


@pytest.mark.parametrize("solver", [fp.picard, fp.anderson, fp.broyden, fp.newton], ids=lambda s: s.__name__)
def test_implicit_with_every_adjoint_solver(solver):
    f, u, x, c, exact_u, _ = _linear_deq()
    options = {"max_iter": 2000}  # tol 1e-10 on eigenvalue 0.98: Picard needs ~1200, Anderson ~250
    _solve_and_backward(f, x, c, solver=solver, tol=1e-10, **options)
    assert _rel(u.grad, exact_u) <= 1e-6


def test_torchdeq_like_short_backward_is_inaccurate_and_warns():
    """40 Picard steps (TorchDEQ's default backward) are far from converged on this problem."""
    f, u, x, c, exact_u, _ = _linear_deq()
    info = fp.GradInfo()
    with pytest.warns(fp.ConvergenceWarning, match=r"residual .* after 40 iterations"):
        _solve_and_backward(f, x, c, solver=fp.picard, max_iter=40, info=info)
    assert _rel(u.grad, exact_u) > 0.1
    assert info.backward is not None and not info.backward.converged.any()
    assert info.backward.nsteps.tolist() == [40, 40, 40]


def _tanh_deq(seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64)
    w = (0.7 * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_(True)
    x = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return w, x


@pytest.mark.parametrize(
    "make_f",
    [
        lambda w, x: lambda z: torch.tanh(z @ w.T + x),
        lambda w, x: lambda z: 0.5 * torch.sin(z @ w.T) + x * torch.sigmoid(z),
        lambda w, x: lambda z: torch.softmax(z @ w.T, dim=-1) * 2 + 0.3 * torch.tanh(x + z),
    ],
    ids=["tanh", "sin-sigmoid", "softmax"],
)
def test_implicit_gradcheck(make_f):
    w, x = _tanh_deq(1)

    def fixed_point(w, x):
        f = make_f(w, x)
        sol = fp.newton(f, torch.zeros_like(x), tol=1e-14, max_iter=50)
        assert sol.converged.all()
        return fp.implicit(f, sol.x, tol=1e-14, max_iter=500)

    assert torch.autograd.gradcheck(fixed_point, (w, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_implicit_memory_is_one_graph_of_f():
    """f is recorded once with grad, however many iterations the forward solve took."""
    f, u, x, c, _, _ = _linear_deq()
    calls = []

    def counted(z):
        calls.append(torch.is_grad_enabled())
        return f(z)

    sol = fp.picard(counted, torch.zeros_like(x), tol=1e-10, max_iter=2000)
    assert sol.nsteps.max() > 500
    calls.clear()
    z = fp.implicit(counted, sol.x)
    assert calls == [True]
    (z * c).sum().backward()
    assert all(not grad for grad in calls[1:])  # adjoint iterations build no graph


def test_unrolled_converges_to_implicit():
    f, u, x, c, exact_u, _ = _linear_deq()
    errors = []
    for steps in (20, 100, 1500):
        u.grad = None
        z = fp.unrolled(f, torch.zeros_like(x), steps=steps)
        (z * c).sum().backward()
        errors.append(_rel(u.grad, exact_u))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_jfb_is_one_application_of_f():
    f, u, x, c, _, _ = _linear_deq()
    sol = fp.anderson(f, torch.zeros_like(x), tol=1e-12, max_iter=500, m=10)
    z = fp.jfb(f, sol.x)
    torch.testing.assert_close(z, f(sol.x))
    (z * c).sum().backward()
    torch.testing.assert_close(u.grad, c.T @ x.detach())  # dL/dU of one layer: c x^T
    torch.testing.assert_close(x.grad, c @ u.detach())


def test_phantom_is_k_damped_steps():
    f, u, x, c, exact_u, _ = _linear_deq()
    sol = fp.anderson(f, torch.zeros_like(x), tol=1e-12, max_iter=500, m=10)
    z = fp.phantom(f, sol.x, k=3, damping=0.5)
    expected = sol.x
    for _ in range(3):
        expected = 0.5 * expected + 0.5 * f(expected)
    torch.testing.assert_close(z, expected)
    (z * c).sum().backward()
    grad_k3 = u.grad.clone()
    u.grad = None
    (fp.phantom(f, sol.x, k=60, damping=0.5) * c).sum().backward()
    assert _rel(u.grad, exact_u) < _rel(grad_k3, exact_u)  # more steps: closer to the exact gradient


def test_stochastic_jfb_counts_follow_ranges_and_generator():
    f, u, x, c, _, _ = _linear_deq()
    seen_ng, seen_g = set(), set()
    for seed in range(60):
        info = fp.GradInfo()
        calls = []

        def counted(z, calls=calls):
            calls.append(torch.is_grad_enabled())
            return f(z)

        fp.stochastic_jfb(
            counted,
            x.detach(),
            no_grad=(0, 3),
            with_grad=(1, 2),
            generator=torch.Generator().manual_seed(seed),
            info=info,
        )
        assert 0 <= info.no_grad_steps <= 3 and 1 <= info.grad_steps <= 2
        assert calls == [False] * info.no_grad_steps + [True] * info.grad_steps
        again = fp.GradInfo()
        fp.stochastic_jfb(
            f, x.detach(), no_grad=(0, 3), with_grad=(1, 2), generator=torch.Generator().manual_seed(seed), info=again
        )
        assert (again.no_grad_steps, again.grad_steps) == (info.no_grad_steps, info.grad_steps)
        seen_ng.add(info.no_grad_steps)
        seen_g.add(info.grad_steps)
    assert seen_ng == {0, 1, 2, 3} and seen_g == {1, 2}  # both ends of each range are drawn


def test_stochastic_jfb_gradients_reach_parameters_and_injection():
    f, u, x, c, _, _ = _linear_deq()
    x0 = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    z = fp.stochastic_jfb(f, x0, generator=torch.Generator().manual_seed(0))
    (z * c).sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert x0.grad is None  # the start is detached


def test_jacobian_penalty_estimates_frobenius_norm():
    w = symmetric_matrix(16, -0.5, 0.9)
    f = lambda z: z @ w.T  # noqa: E731
    z = torch.zeros(4, 16, dtype=torch.float64)
    estimate = fp.jacobian_penalty(f, z, samples=400, generator=torch.Generator().manual_seed(0))
    exact = (w**2).sum() / 16
    assert estimate.shape == (4,)
    torch.testing.assert_close(estimate, exact.expand(4), rtol=0.1, atol=0)


def test_jacobian_penalty_is_differentiable():
    w = (0.5 * torch.eye(8, dtype=torch.float64)).requires_grad_(True)
    penalty = fp.jacobian_penalty(lambda z: torch.tanh(z @ w.T), torch.zeros(2, 8, dtype=torch.float64))
    penalty.mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda f, z: fp.phantom(f, z, k=0), r"k.*0"),
        (lambda f, z: fp.phantom(f, z, damping=1.5), r"damping.*1\.5"),
        (lambda f, z: fp.unrolled(f, z, steps=0), r"steps.*0"),
        (lambda f, z: fp.stochastic_jfb(f, z, no_grad=(5, 2)), r"no_grad.*\(5, 2\)"),
        (lambda f, z: fp.stochastic_jfb(f, z, no_grad=(-1, 2)), r"no_grad.*\(-1, 2\)"),
        (lambda f, z: fp.stochastic_jfb(f, z, with_grad=(0, 2)), r"with_grad.*\(0, 2\)"),
        (lambda f, z: fp.implicit(f, z, tol=0.0), r"tol.*0\.0"),
        (lambda f, z: fp.jacobian_penalty(f, z, samples=0), r"samples.*0"),
    ],
)
def test_bad_values_are_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(lambda z: 0.5 * z, torch.zeros(2, 3))


def test_non_callable_f_is_a_type_error():
    for fn in (fp.jfb, fp.phantom, fp.implicit, fp.stochastic_jfb, fp.jacobian_penalty):
        with pytest.raises(TypeError, match="callable"):
            fn("f", torch.zeros(2, 3))


@pytest.mark.parametrize("mode", [fp.jfb, fp.phantom, fp.implicit, fp.stochastic_jfb, fp.jacobian_penalty])
def test_backward_modes_check_what_f_returns(mode):
    """f's output, as the solvers check it: a tensor, of z's shape and device; z of a floating dtype."""
    z = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="f must return a tensor, got tuple"):
        mode(lambda z: (0.5 * z,), z)
    with pytest.raises(ValueError, match=r"f changed the shape.*\(3, 4\).*\(3, 2\)"):
        mode(lambda z: z[:, :2], z)
    with pytest.raises(ValueError, match="f returned a tensor on meta, its input is on cpu"):
        mode(lambda z: z.to("meta"), z)
    with pytest.raises(TypeError, match="must be a floating-point torch.Tensor, got dtype torch.int64"):
        mode(lambda z: z, torch.zeros(3, 4, dtype=torch.long))


def test_implicit_through_a_map_that_ignores_z():
    """f(z) = 2 b does not depend on z: J = 0, the adjoint is the incoming gradient, d sum(z*) / db = 2."""
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    fp.implicit(lambda z: 2 * b, torch.zeros(3, 4, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(b.grad, torch.full_like(b, 2.0))
    constant = torch.ones(3, 4)  # nothing requires grad: backward runs, gives nothing, raises nothing
    z0 = torch.zeros(3, 4)
    fp.implicit(lambda z: constant, z0).sum().backward()
    assert z0.grad is None


@pytest.mark.parametrize("max_iter,krylov_dim", [(9, 2), (200, 2), (7, 20), (2, 5), (25, 4)])
def test_implicit_newton_adjoint_stays_within_max_iter(max_iter, krylov_dim):
    """GMRES's products, its restarts' residuals and the final check included, stay within max_iter."""
    f, u, x, c, _, _ = _linear_deq()
    info = fp.GradInfo()
    z = fp.implicit(f, torch.zeros_like(x), solver=fp.newton, krylov_dim=krylov_dim, max_iter=max_iter, tol=1e-300,
                    stop="abs", warn=False, info=info)  # fmt: skip
    (z * c).sum().backward()
    assert info.backward.nfev <= max_iter and int(info.backward.nsteps.max()) <= max_iter
    assert info.backward.nfev >= max_iter - krylov_dim  # the budget is spent, not cut short


def test_implicit_default_tolerance_follows_autocast():
    """Under fp16/bf16 autocast f's graph, and so the adjoint's products, compute in half precision: the default
    tolerance is half precision's (1e-2), not the fp32 gradient's (1e-6), so the adjoint does not run to
    max_iter and warn at every step. Its gradient is the fp32 one to half precision."""
    from fixedpoint._backward import default_adjoint_tol

    assert default_adjoint_tol(torch.float32) == 1e-6 and default_adjoint_tol(torch.float64) == 1e-8
    assert default_adjoint_tol(torch.float32, torch.bfloat16) == 1e-2
    assert default_adjoint_tol(torch.bfloat16, torch.float32) == 1e-2
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.mul_(0.6)
    x = torch.randn(4, 64)
    grads = []
    for dtype in (None, torch.bfloat16):
        layer = fp.FixedPoint(
            lambda z, x: torch.tanh(lin(z) + x), solver=partial(fp.anderson, tol=1e-3), backward=fp.implicit
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", fp.ConvergenceWarning)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = layer(x)
            (grad,) = torch.autograd.grad(out.float().pow(2).sum(), lin.weight)
        assert layer.last_info.backward.converged.all() and int(layer.last_info.backward.nsteps.max()) < 50
        grads.append(grad)
    assert _rel(grads[1], grads[0].double()) < 5e-2


def test_fixed_point_without_a_solver_needs_a_backward_that_iterates():
    """solver=None runs no forward solve: implicit, jfb and phantom would take z0 for the fixed point."""
    for backward in (fp.implicit, fp.jfb, fp.phantom, partial(fp.implicit, tol=1e-6)):
        with pytest.raises(ValueError, match="solver=None runs no forward solve"):
            fp.FixedPoint(lambda z: 0.5 * z, solver=None, backward=backward)
    for backward in (partial(fp.unrolled, steps=3), fp.stochastic_jfb):
        fp.FixedPoint(lambda z: 0.5 * z, solver=None, backward=backward)


def test_adjoint_options_are_checked_before_the_backward():
    """A misspelt adjoint option, a bad stop, or a Newton option GMRES does not take fail at the call, not later."""
    f, u, x, c, _, _ = _linear_deq()
    z0 = torch.zeros_like(x)
    with pytest.raises(TypeError, match="anderson has no option mm"):
        fp.implicit(f, z0, mm=3)
    with pytest.raises(ValueError, match="stop must be 'rel' or 'abs', got 'bad'"):
        fp.implicit(f, z0, stop="bad")
    with pytest.raises(TypeError, match="takes only krylov_dim.*jvp"):
        fp.implicit(f, z0, solver=fp.newton, jvp="reverse")
    with pytest.raises(ValueError, match="krylov_dim must be an integer >= 1, got 0"):
        fp.implicit(f, z0, solver=fp.newton, krylov_dim=0)


@pytest.mark.parametrize("solver", [fp.anderson, fp.newton])
def test_implicit_adjoint_honours_stop_abs(solver):
    """stop="abs" bounds the adjoint's absolute residual, with GMRES (Newton) as with the fixed-point solvers."""
    f, u, x, c, _, _ = _linear_deq()
    info = fp.GradInfo()
    z = fp.implicit(f, torch.zeros_like(x), solver=solver, stop="abs", tol=1e-3, info=info)
    (1e3 * z * c).sum().backward()  # a large gradient: its relative residual would be far looser
    sol = info.backward
    assert bool(sol.converged.all())
    assert float(sol.residual.max()) <= 1e-3
    # measured independently of the solver's own measure: the absolute adjoint residual ||J^T u + grad - u||
    absolute = (sol.fx - sol.x).reshape(len(sol.x), -1).norm(dim=1)
    assert float(absolute.max()) <= 1e-3 * (1 + 1e-6)


def test_implicit_refuses_second_derivatives():
    """create_graph=True would give silently wrong second derivatives (the adjoint's own dependence is not in the
    graph): an error that says so instead."""
    f, u, x, c, _, _ = _linear_deq()
    z = fp.implicit(f, torch.zeros_like(x))
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad((z * c).sum(), x, create_graph=True)


def test_fixed_point_module_passes_its_inputs_as_args_so_a_graph_is_kept(monkeypatch):
    """FixedPoint calls solver(f, z0, args=inputs): the same f at every forward and that forward's inputs as args
    (not a closure made per forward, which the solver can tell from nothing else and which no longer separates f
    from what changes). With a graph="solver" eval solver (through the CPU stand-in for CUDA graphs) later
    forwards with new inputs replay the first one's kept graphs and equal the eager solver's output."""
    from fixedpoint import _graphs
    from fixedpoint.testing import ReplayedGraphs

    graphs = ReplayedGraphs()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    torch.manual_seed(0)
    cell = nn.Linear(6, 6, dtype=torch.float64)
    solver = partial(fp.anderson, tol=1e-10, max_iter=40, m=3)
    calls = []

    def recording(f, z0, *, args=None, **options):
        calls.append((f, args))
        return solver(f, z0, args=args, graph="solver", **options)

    layer = fp.FixedPoint(lambda z, x: torch.tanh(0.5 * cell(z) + x), eval_solver=recording).eval()
    eager = fp.FixedPoint(layer.f, eval_solver=solver).eval()
    inputs, captures = [], []
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            inputs.append(x)
            # two solves to tol 1e-10, on the twins (graphs) and on the CPU host path (NumPy's sums and LAPACK)
            torch.testing.assert_close(layer(x), eager(x), rtol=0, atol=1e-9)
            assert layer.last_solution.converged.all()
            captures.append(graphs.captures)
    assert [f for f, _ in calls] == [layer.f] * 3
    assert all(len(args) == 1 and args[0] is x for (_, args), x in zip(calls, inputs, strict=True))
    assert captures[0] > 0 and captures == [captures[0]] * 3 and len(_graphs._graph_cache) == 1


def test_fixed_point_module_gives_a_solver_without_args_a_closure():
    """A custom solver written as solver(f, z0), without an ``args`` keyword, gets f closed over the inputs:
    the same output and gradient as a fixedpoint solver, in training and in eval."""
    torch.manual_seed(0)
    cell = nn.Linear(6, 6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    seen = []

    def my_solver(f, z0):  # a user's own solver: no args keyword
        seen.append(f)
        return fp.anderson(f, z0, tol=1e-12, max_iter=60)

    def f(z, x):
        return torch.tanh(0.5 * cell(z) + x)

    custom = fp.FixedPoint(f, solver=my_solver)
    reference = fp.FixedPoint(f, solver=partial(fp.anderson, tol=1e-12, max_iter=60))
    for mode in ("train", "eval"):
        getattr(custom, mode)(), getattr(reference, mode)()
        out, expected = custom(x), reference(x)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        (grad,), (expected_grad,) = torch.autograd.grad(out.sum(), x), torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)
    assert len(seen) == 2 and all(g is not f for g in seen)  # a closure over x, each time


def test_fixed_point_module_in_eval_mode_keeps_gradients_when_grad_is_on():
    """eval() with autograd on (saliency maps, attacks): the eval output carries the layer's gradient, equal to the
    training mode's; without grad, or with nothing that requires it, nothing is attached."""
    torch.manual_seed(0)
    cell = nn.Linear(6, 6, dtype=torch.float64)
    f = lambda z, x: torch.tanh(0.5 * cell(z) + x)  # noqa: E731
    layer = fp.FixedPoint(f, solver=partial(fp.anderson, tol=1e-12), backward=fp.implicit)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (train_grad,) = torch.autograd.grad(layer(x).sum(), x)
    layer.eval()
    out = layer(x)
    (eval_grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(eval_grad, train_grad, rtol=1e-6, atol=1e-9)
    assert layer.last_info is not None and layer.last_info.backward is not None
    with torch.no_grad():
        assert not layer(x).requires_grad
    cell.requires_grad_(False)  # nothing to differentiate: no graph, no adjoint
    assert not layer(x.detach()).requires_grad and layer.last_info is None
    cell.requires_grad_(True)
    jfb_layer = fp.FixedPoint(layer.f, solver=partial(fp.anderson, tol=1e-12), backward=fp.jfb)
    (jfb_train,) = torch.autograd.grad(jfb_layer(x).sum(), x)
    (jfb_eval,) = torch.autograd.grad(jfb_layer.eval()(x).sum(), x)  # the layer's own mode at the eval solution
    torch.testing.assert_close(jfb_eval, jfb_train, rtol=1e-6, atol=1e-9)


class _TinyDEQ(nn.Module):
    """A DEQ classifier: z = tanh(W z + U x), ||W||_F <= 0.9 (a contraction), then a linear head."""

    def __init__(self, backward, solver):
        super().__init__()
        torch.manual_seed(0)
        self.inject = nn.Linear(2, 16)
        self.w = nn.Linear(16, 16, bias=False)
        nn.init.normal_(self.w.weight, std=0.3 / 4)
        self.layer = fp.FixedPoint(self.cell, solver=solver, backward=backward)
        self.head = nn.Linear(16, 2)

    def cell(self, z, x_inj):
        w = self.w.weight
        w = 0.9 * w / w.norm().clamp_min(1.0)
        return torch.tanh(z @ w.T + x_inj)

    def forward(self, x):
        return self.head(self.layer(self.inject(x)))


@pytest.mark.parametrize(
    "backward,solver",
    [
        (fp.implicit, partial(fp.anderson, tol=1e-6, max_iter=60)),
        (fp.jfb, partial(fp.anderson, tol=1e-6, max_iter=60)),
        (partial(fp.phantom, k=3, damping=0.7), partial(fp.anderson, tol=1e-4)),
        (partial(fp.unrolled, steps=8), None),
        (partial(fp.stochastic_jfb, no_grad=(0, 4), with_grad=(1, 3)), None),
    ],
    ids=["implicit", "jfb", "phantom", "unrolled", "stochastic_jfb"],
)
def test_fixed_point_module_trains_a_tiny_classifier(backward, solver):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()  # XOR-like quadrants
    model = _TinyDEQ(backward, solver)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy > 0.85
    assert model.layer.last_solution is not None and model.layer.last_solution.converged.all()


def test_fixed_point_module_keeps_statistics():
    model = _TinyDEQ(partial(fp.stochastic_jfb, no_grad=(2, 2), with_grad=(3, 3)), None)
    model(torch.randn(4, 2)).sum().backward()
    assert model.layer.last_solution is None
    assert (model.layer.last_info.no_grad_steps, model.layer.last_info.grad_steps) == (2, 3)
    model = _TinyDEQ(fp.implicit, fp.anderson)
    model(torch.randn(4, 2)).sum().backward()
    assert model.layer.last_info.backward is not None and model.layer.last_info.backward.converged.all()


def test_fixed_point_module_rejects_bad_arguments():
    with pytest.raises(TypeError, match="backward must be callable"):
        fp.FixedPoint(lambda z: z, backward="implicit")
    with pytest.raises(ValueError, match="z0"):
        fp.FixedPoint(lambda z: z)()
