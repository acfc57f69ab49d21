"""Training a DEQ with FixedPoint's defaults: implicit's fallback for unconverged samples, rate-limited
adjoint warnings, half-precision forward tolerance, the state's shape, per-step statistics.

Each test names the bug it catches. Linear maps are per sample, z_b = W_b z_b + U x_b with W_b = r_b Q_b
(Q_b orthogonal, so each sample's contraction is r_b exactly): the exact adjoint is (I - W_b)^-T c_b, and
dL/dx_b = U^T u_b for L = sum(c * z), so each sample's gradient shows which adjoint it took.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import nn

import fixedpoint as fp
from fixedpoint import _backward

F64 = torch.float64
D = 8


def _orthogonal(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))[0]


class PerSampleLinear:
    """z_b = W_b z_b + U x_b, W_b = radii[b] * Q_b: a batched linear DEQ with a chosen contraction per sample."""

    def __init__(self, radii, seed=0):
        self.w = torch.stack([r * _orthogonal(D, seed + i) for i, r in enumerate(radii)])  # (B, D, D)
        g = torch.Generator().manual_seed(seed + 100)
        self.u = torch.randn(D, D, generator=g, dtype=F64) / D**0.5
        self.x = torch.randn(len(radii), D, generator=g, dtype=F64, requires_grad=True)
        self.c = torch.randn(len(radii), D, generator=g, dtype=F64)

    def __call__(self, z):
        return torch.einsum("bij,bj->bi", self.w, z) + self.x @ self.u.T

    def adjoint(self) -> torch.Tensor:
        """(B, D): the exact adjoint (I - W_b)^-T c_b, by torch.linalg.solve in float64."""
        eye = torch.eye(D, dtype=F64).expand_as(self.w)
        return torch.linalg.solve((eye - self.w).transpose(1, 2), self.c.unsqueeze(-1)).squeeze(-1)

    def x_grad(self, u: torch.Tensor) -> torch.Tensor:
        """dL/dx for per-sample adjoints u: U^T u_b."""
        return u @ self.u

    def backward(self, z: torch.Tensor) -> torch.Tensor:
        self.x.grad = None
        (self.c * z).sum().backward()
        return self.x.grad.clone()


def test_unconverged_forward_sample_gets_jfb_and_the_others_the_exact_gradient():
    """Catches: an exact adjoint solved at a sample whose forward stopped at MAX_ITER (spectral radius 0.999
    here): its gradient spikes; and a fallback that is not per sample (the converged ones must keep the IFT)."""
    deq = PerSampleLinear([0.5, 0.999, 0.3])
    sol = fp.picard(deq, torch.zeros_like(deq.x), tol=1e-12, max_iter=60)
    assert sol.statuses() == [fp.Status.CONVERGED, fp.Status.MAX_ITER, fp.Status.CONVERGED]
    info = fp.GradInfo()
    grad = deq.backward(fp.implicit(deq, sol.x, status=sol, tol=1e-13, info=info))
    exact, jfb = deq.x_grad(deq.adjoint()), deq.x_grad(deq.c)
    torch.testing.assert_close(grad[[0, 2]], exact[[0, 2]], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad[1], jfb[1], rtol=0, atol=0)  # u = grad: JFB, exactly
    jfb_mode = deq.backward(fp.jfb(deq, sol.x))  # the library's own JFB agrees
    torch.testing.assert_close(grad[1], jfb_mode[1], rtol=1e-14, atol=1e-14)
    assert (info.fallback_forward, info.fallback_adjoint, info.fallbacks) == (1, 0, 1)
    assert info.adjoint_samples.tolist() == [0, 2] and info.backward.x.shape == (2, D)  # only they were solved
    # the spike avoided: the exact adjoint of the 0.999 sample is orders of magnitude larger
    assert exact[1].norm() > 100 * jfb[1].norm()


def test_phantom_fallback_is_damped_adjoint_steps():
    """Catches: unconverged='phantom' not being the phantom gradient: for a linear f, phantom(f, z, k=5,
    damping=0.5)'s gradient exactly."""
    deq = PerSampleLinear([0.5, 0.999, 0.3])
    sol = fp.picard(deq, torch.zeros_like(deq.x), tol=1e-12, max_iter=60)
    grad = deq.backward(fp.implicit(deq, sol.x, status=sol, tol=1e-13, unconverged="phantom"))
    phantom = deq.backward(fp.phantom(deq, sol.x, k=5, damping=0.5))
    torch.testing.assert_close(grad[1], phantom[1], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad[[0, 2]], deq.x_grad(deq.adjoint())[[0, 2]], rtol=1e-10, atol=1e-12)


def test_unconverged_exact_reproduces_the_plain_adjoint():
    """Catches: unconverged='exact' still masking: it must solve every sample's adjoint, as implicit did
    before fallbacks (and as it does without status), the 0.999 sample included."""
    deq = PerSampleLinear([0.5, 0.999, 0.3])
    sol = fp.picard(deq, torch.zeros_like(deq.x), tol=1e-12, max_iter=60)
    info = fp.GradInfo()
    options = {"tol": 1e-13, "m": D}  # Anderson with m = D: GMRES-like, exact on the 0.999 sample too
    exact_mode = deq.backward(fp.implicit(deq, sol.x, status=sol, unconverged="exact", info=info, **options))
    torch.testing.assert_close(exact_mode, deq.x_grad(deq.adjoint()), rtol=1e-9, atol=1e-10)
    no_status = deq.backward(fp.implicit(deq, sol.x, **options))  # without status: all count as converged
    torch.testing.assert_close(no_status, exact_mode, rtol=1e-12, atol=1e-12)
    assert (info.fallback_forward, info.fallback_adjoint) == (0, 0) and info.adjoint_samples is None
    assert info.backward.x.shape == (3, D)


def test_unconverged_adjoint_falls_back_unless_within_slack():
    """Catches: an unconverged adjoint used as it stands (a spike) or, the other way, a nearly converged one
    (within slack x tol: what the precision allows) thrown away. Picard adjoint, 20 iterations at tol 1e-3:
    r = 0.5 converges, r = 0.75 misses slightly (kept), r = 0.98 misses badly (JFB)."""
    deq = PerSampleLinear([0.5, 0.75, 0.98])
    sol = fp.picard(deq, torch.zeros_like(deq.x), tol=1e-13, max_iter=4000)
    assert sol.converged.all()
    info = fp.GradInfo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad = deq.backward(fp.implicit(deq, sol.x, status=sol, solver=fp.picard, tol=1e-3, max_iter=20, info=info))
    adjoint = info.backward
    assert adjoint.statuses() == [fp.Status.CONVERGED, fp.Status.MAX_ITER, fp.Status.MAX_ITER]
    assert 1e-3 < float(adjoint.residual[1]) <= 1e-2 and float(adjoint.residual[2]) > 1e-2
    torch.testing.assert_close(grad[0], deq.x_grad(adjoint.x)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[1], deq.x_grad(adjoint.x)[1], rtol=1e-12, atol=1e-12)  # best iterate kept
    torch.testing.assert_close(grad[2], deq.x_grad(deq.c)[2], rtol=0, atol=0)  # JFB
    assert (info.fallback_forward, info.fallback_adjoint) == (0, 1)
    assert len(caught) == 1 and "1 of 3 samples" in str(caught[0].message) and "JFB" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at implicit's call, not at autograd
    # slack=1: the slight miss falls back too
    grad = deq.backward(
        fp.implicit(deq, sol.x, solver=fp.picard, tol=1e-3, max_iter=20, slack=1, warn=False, info=info)
    )
    torch.testing.assert_close(grad[1], deq.x_grad(deq.c)[1], rtol=0, atol=0)
    assert info.fallback_adjoint == 2


def test_adjoint_warnings_are_relative_to_precision_and_rate_limited():
    """Catches: a ConvergenceWarning at every training step, for misses like 1.25e-6 against 1e-6 (100 steps:
    none) and for real misses (warned at the 1st, 10th, 100th, ... per call site, with the count)."""
    deq = PerSampleLinear([0.75])
    z = torch.linalg.solve(torch.eye(D, dtype=F64) - deq.w[0], (deq.x @ deq.u.T)[0].detach())[None]
    _backward._MISSES.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100):  # slight: residual ~3e-3 against tol 1e-3 (< 10x)
            deq.backward(fp.implicit(deq, z, solver=fp.picard, tol=1e-3, max_iter=20))
        assert caught == []
        for _ in range(12):  # bad: residual ~0.06 against 1e-4
            deq.backward(fp.implicit(deq, z, solver=fp.picard, tol=1e-4, max_iter=10))
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and "miss 1 at this call site" in messages[0] and "miss 10 " in messages[1]
        for _ in range(3):
            deq.backward(fp.implicit(deq, z, solver=fp.picard, tol=1e-4, max_iter=10, warn="always"))
        assert len(caught) == 5
        deq.backward(fp.implicit(deq, z, solver=fp.picard, tol=1e-4, max_iter=10, warn=False))
        assert len(caught) == 5


def _tanh_deq(width=128, features=64, batch=64, seed=0):
    torch.manual_seed(seed)
    w, inject = nn.Linear(width, width), nn.Linear(features, width)
    with torch.no_grad():  # ||W||_2 = 1: a trained DEQ's range
        w.weight.div_(torch.linalg.matrix_norm(w.weight, ord=2))
    x = torch.rand(batch, features)
    return (lambda z, x: torch.tanh(w(z) + inject(x))), x, w


def test_bf16_autocast_forward_converges_at_the_default_tolerance():
    """Catches: an fp32 tolerance kept under bf16 autocast, where it cannot be reached: nearly every sample ran
    to max_iter at every training step (and then took implicit's fallback gradient)."""
    cell, x, w = _tanh_deq()
    layer = fp.FixedPoint(cell, state_shape=(128,))  # the default solver: tol 1e-3, bf16 needs 3e-3
    exact = fp.FixedPoint(cell, state_shape=(128,), solver=fp.anderson, backward=fp.implicit)  # its own 1e-4
    old = fp.FixedPoint(cell, state_shape=(128,), solver=partial(fp.anderson, tol=1e-4))  # set: kept as is
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().pow(2).sum().backward()
        exact(x).float().pow(2).sum().backward()
        old(x)
    for sol in (layer.last_solution, exact.last_solution):
        assert float(sol.converged.double().mean()) >= 0.9
        assert float(sol.residual[sol.converged].max()) <= 3e-3  # bf16's tolerance was used
    assert float(layer.last_solution.residual.max()) > 1e-3  # not the fp32 default (it would have run longer)
    assert float(old.last_solution.converged.double().mean()) < 0.5  # what an fp32 tolerance gives
    assert exact.last_info.fallback_forward == int((~exact.last_solution.converged).sum())
    layer(x)  # fp32 again: the default solver's own tolerance
    assert float(layer.last_solution.residual.max()) <= 1e-3 and layer.last_solution.converged.all()
    loose = fp.FixedPoint(cell, state_shape=(128,), half_tol=2e-2)  # one argument away
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loose(x)
    assert float(loose.last_solution.residual.max()) > 3e-3


def test_half_tolerance_never_tightens_a_looser_default():
    """Catches: the half-precision tolerance replacing a default that is already looser (fp16's 5e-4 over a
    solver's own 1e-3 would make it iterate longer in half precision than in fp32), or applied to a
    tolerance the user set."""
    seen = []

    def solver(f, z0, *, args=(), tol: float = 1e-3, max_iter: int = 40):
        seen.append(tol)
        return fp.picard(f, z0, args=args, tol=tol, max_iter=max_iter)

    cell = lambda z, x: torch.tanh(0.5 * z + x)  # noqa: E731
    x = torch.rand(3, 16)
    for dtype, expected in ((torch.float16, 1e-3), (torch.bfloat16, 3e-3)):
        seen.clear()
        fp.FixedPoint(cell, solver=solver)(x.to(dtype))  # a half state, no autocast
        fp.FixedPoint(cell, solver=partial(solver, tol=1e-5))(x.to(dtype))
        assert seen == [expected, 1e-5], dtype


class _WideCell(nn.Module):
    """z = tanh(W z + U x): a state of width 16 from inputs of width 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w, self.u = nn.Linear(16, 16), nn.Linear(8, 16)
        with torch.no_grad():
            self.w.weight.mul_(0.5 / torch.linalg.matrix_norm(self.w.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.w(z) + self.u(x))


def test_state_shape_differs_from_the_input():
    """Catches: the default start (zeros like the first input) failing inside the user's cell with a matmul
    error that does not say what to do; and an f that changes the state's shape reported without the fix."""
    x = torch.randn(3, 8)
    for layer in (fp.FixedPoint(_WideCell(), state_shape=(16,)),
                  fp.FixedPoint(_WideCell(), z0=lambda x: x.new_zeros(x.shape[0], 16))):  # fmt: skip
        z = layer(x)
        assert z.shape == (3, 16) and layer.last_solution.converged.all()
        z.sum().backward()
    with pytest.raises(ValueError, match=r"start, zeros shaped like the first input \(3, 8\).*3x8 and 16x16.*state_"):
        fp.FixedPoint(_WideCell())(x)
    grows = lambda z, x: torch.tanh(torch.cat([z, z], dim=1) * 0.3 + x.repeat(1, 2))  # noqa: E731
    with pytest.raises(ValueError, match=r"input \(3, 8\), output \(3, 16\).*state_shape=\(16,\)"):
        fp.FixedPoint(grows)(x)
    with pytest.raises(ValueError, match=r"state_shape must be"):
        fp.FixedPoint(grows, state_shape=(0,))
    with pytest.raises(ValueError, match=r"not both"):
        fp.FixedPoint(grows, state_shape=(16,), z0=lambda x: x)


def test_convergence_statistics_equal_the_solutions():
    """Catches: per-step statistics that disagree with the Solution they summarise, or that miss the
    fallbacks FixedPoint's implicit took (it must pass its forward Solution to implicit)."""
    deq = PerSampleLinear([0.5, 0.999, 0.3])
    layer = fp.FixedPoint(lambda z, x: deq(z), solver=partial(fp.picard, tol=1e-12, max_iter=60), backward=fp.implicit)
    values = layer.convergence()
    assert all(v != v for v in values.values())  # NaN before any forward
    z = layer(deq.x)
    before = layer.convergence()  # after the forward, before the backward: no fallback counted yet
    (deq.c * z).sum().backward()
    stats, sol, info = layer.convergence(), layer.last_solution, layer.last_info
    assert all(type(v) is float for v in stats.values())
    assert stats["converged"] == pytest.approx(2 / 3) == float(sol.converged.double().mean())
    assert stats["iterations"] == float(sol.nsteps.double().mean()) and stats["max_iterations"] == 60.0
    assert stats["residual"] == float(sol.residual.max())
    assert (stats["fallbacks"], stats["fallback_forward"], stats["fallback_adjoint"]) == (1.0, 1.0, 0.0)
    assert stats["adjoint_iterations"] == float(info.backward.nsteps.double().mean())
    assert before["converged"] == stats["converged"] and before["fallbacks"] != before["fallbacks"]
    torch.testing.assert_close(deq.x.grad[1], deq.x_grad(deq.c)[1])  # the fallback took effect in the layer


def test_a_model_containing_fixedpoint_compiles_and_stops_recompiling():
    """Bugs: dynamo tracing the solver's loop (54 graph breaks and the recompile limit hit in _solve.py), a
    compiled model computing something else than the eager one, or recompiling at every new batch."""
    import torch._dynamo

    from fixedpoint import FixedPoint

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.U = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(8, 16)

        def forward(self, z, x):
            return torch.tanh(self.W(z) + self.U(x))

    class Model(torch.nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.deq, self.out = FixedPoint(cell, state_shape=(16,)), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.out(torch.relu(self.deq(x)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Model(Cell())
    assert torch._dynamo.explain(eager)(torch.randn(4, 8)).graph_break_count <= 1
    compiled_cell = Model(torch.compile(Cell(), backend="eager"))  # f compiled too
    compiled_cell.load_state_dict({k.replace("deq.f.", "deq.f._orig_mod."): v for k, v in eager.state_dict().items()})
    model = torch.compile(compiled_cell, backend="eager")
    graphs = []
    for step in range(12):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        out = model(x)
        out.square().sum().backward()
        reference = eager(x)
        reference.square().sum().backward()
        torch.testing.assert_close(out, reference)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[2]  # no new graph after the first steps: new inputs replay
    for p, q in zip(compiled_cell.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_the_defaults_are_plain_iteration_to_1e_3_and_the_jfb_gradient():
    """Pins FixedPoint's training defaults (chosen by benchmarks/deq_digits.py and deq_fashion.py): a change
    of solver, tolerance, cap or backward mode fails here, not silently in users' training runs. The
    gradient is JFB's: one f at the detached forward solution (U^T c here), which is plain iteration's
    (Picard from zeros) stopped at relative 1e-3 or 40 iterations; eval solves the same way."""
    deq = PerSampleLinear([0.5, 0.8, 0.995])  # the last needs more than 40 plain iterations for 1e-3
    layer = fp.FixedPoint(lambda z, x: deq(z))
    z = layer(deq.x)
    (deq.c * z).sum().backward()
    reference = fp.picard(lambda v: deq(v).detach(), torch.zeros_like(deq.x), tol=1e-3, max_iter=40)
    sol = layer.last_solution
    torch.testing.assert_close(sol.x, reference.x, rtol=0, atol=0)
    assert sol.statuses() == [fp.Status.CONVERGED, fp.Status.CONVERGED, fp.Status.MAX_ITER]
    assert sol.nsteps.tolist() == reference.nsteps.tolist() and int(sol.nsteps.max()) == 40
    torch.testing.assert_close(deq.x.grad, deq.x_grad(deq.c))  # JFB's closed form: dL/dx = U^T c (exact: U^T u)
    assert layer.last_info.backward is None  # no adjoint solve ran
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(deq.x), z)  # the eval solve is the same


def test_a_per_call_eval_solver_is_used_for_that_call_only():
    """Catches: forward's ``eval_solver`` stored on the layer (the next call, or every call after one that
    raised, would solve with it), or ignored (the layer's own solving instead). Values: each call equals its
    solver run directly."""
    deq = PerSampleLinear([0.5, 0.8, 0.9])
    f = lambda z: deq(z).detach()  # noqa: E731
    own, brief = partial(fp.picard, tol=1e-10, max_iter=60), partial(fp.picard, tol=1e-30, max_iter=3)
    layer = fp.FixedPoint(lambda z, x: deq(z), eval_solver=own).eval()
    start = torch.zeros_like(deq.x)
    with torch.no_grad():
        short = layer(deq.x, eval_solver=brief)
        assert layer.last_solution.nfev == brief(f, start).nfev == 4 and layer.eval_solver is own
        torch.testing.assert_close(short, brief(f, start).fx, rtol=0, atol=0)
        torch.testing.assert_close(layer(deq.x), own(f, start).fx, rtol=0, atol=0)  # the layer's own again
        assert layer.last_solution.nfev == own(f, start).nfev > 4

        def fails(*args, **kwargs):
            raise RuntimeError("this solver fails")

        with pytest.raises(RuntimeError, match="this solver fails"):
            layer(deq.x, eval_solver=fails)
        torch.testing.assert_close(layer(deq.x), own(f, start).fx, rtol=0, atol=0)
    assert layer.eval_solver is own
    with pytest.raises(TypeError, match="eval_solver must be callable, got int"):
        layer(deq.x, eval_solver=3)


def test_a_per_call_backward_gets_its_options_and_the_layer_keeps_its_own():
    """Catches: forward's ``backward`` not used in training (a per-call generator ignored: the draws would come
    from the global RNG), used without the layer's GradInfo, kept for later calls, or not checked as the
    constructor checks it (solver=None with a mode that starts at z0 as if it were the fixed point)."""
    cell = lambda z, x: torch.tanh(0.5 * z + x)  # noqa: E731
    ranges = dict(no_grad=(0, 5), with_grad=(1, 6))
    layer = fp.FixedPoint(cell, solver=None, backward=partial(fp.stochastic_jfb, **ranges))
    x = torch.randn(4, 3, requires_grad=True)
    draws = []
    for seed in (3, 3, 4):
        out = layer(x, backward=partial(layer.backward, generator=torch.Generator().manual_seed(seed)))
        expected = torch.Generator().manual_seed(seed)
        n_ng, n_g = int(torch.randint(0, 6, (), generator=expected)), int(torch.randint(1, 7, (), generator=expected))
        assert (layer.last_info.no_grad_steps, layer.last_info.grad_steps) == (n_ng, n_g)
        z = torch.zeros_like(x)
        for _ in range(n_ng + n_g):
            z = cell(z, x)
        torch.testing.assert_close(out, z, rtol=0, atol=0)  # n_ng + n_g calls of f from the start
        draws.append((n_ng, n_g))
    assert draws[0] == draws[1] and layer.backward.keywords == ranges  # the layer's own is as it was
    with pytest.raises(ValueError, match="solver=None runs no forward solve.*jfb would start at z0"):
        layer(x, backward=fp.jfb)
    with pytest.raises(TypeError, match="backward must be callable, got str"):
        layer(x, backward="jfb")


def test_half_tol_zero_keeps_the_solvers_own_tolerance_in_half_precision():
    """Catches: half_tol=0 refused, or still raising a default tolerance to half precision's (a caller who
    asked for the solver's own 1e-4 in bf16 would get 3e-3)."""
    seen = []

    def solver(f, z0, *, args=(), tol: float = 1e-4, max_iter: int = 40):
        seen.append(tol)
        return fp.picard(f, z0, args=args, tol=tol, max_iter=max_iter)

    cell = lambda z, x: torch.tanh(0.5 * z + x)  # noqa: E731
    x = torch.rand(3, 16, dtype=torch.bfloat16)
    fp.FixedPoint(cell, solver=solver, half_tol=0)(x)
    fp.FixedPoint(cell, solver=solver)(x)
    assert seen == [1e-4, 3e-3]
    with pytest.raises(ValueError, match="half_tol must be a positive finite number, got -1"):
        fp.FixedPoint(cell, half_tol=-1)


def test_solvers_given_per_call_do_not_pile_up_in_the_layer():
    """Catches: a layer remembering the signature of every solver it was given (a sampler makes a new one per
    step: thousands over a run), which kept them all alive."""
    from fixedpoint._module import SIGNATURES_KEPT

    layer = fp.FixedPoint(lambda z, x: torch.tanh(0.5 * z + x)).eval()
    x = torch.rand(2, 4)
    with torch.no_grad():
        for n in range(3 * SIGNATURES_KEPT):
            layer(x, eval_solver=partial(fp.picard, max_iter=n + 1))
    assert len(layer._signatures) <= SIGNATURES_KEPT
