"""Semantics pinned by closed forms and golden values: each test catches a realistic bug that once passed the suite.

Every test runs without Triton: on CPU tensors the solvers' ``impl="auto"`` picks the PyTorch twins
(fixedpoint.kernels.resolve), and the tests pass ``impl="torch"`` where a solver takes it, so they hold
on a GPU machine too. The list of mutations they catch is in docs/design.md ("Testing").
"""

from __future__ import annotations

import math

import pytest
import torch

import fixedpoint
from fixedpoint import ConvergenceWarning, Status
from fixedpoint._newton import gmres

SOLVERS = ("picard", "anderson", "broyden", "newton")
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(name: str, f, x0, **options):
    """fixedpoint.<name>(f, x0, ...) on the PyTorch twins (newton has no impl: it always runs them)."""
    if name != "newton":
        options.setdefault("impl", "torch")
    return getattr(fixedpoint, name)(f, x0, **options)


def _recording(f):
    """f, and the list of the loop's evaluated (x, f(x)) pairs (calls under no_grad: not Newton's JVP calls)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recorded(z):
        out = f(z)
        if not torch.is_grad_enabled():
            pairs.append((z.clone(), out.clone()))
        return out

    return recorded, pairs


def _nonsymmetric(dim: int, norm: float, seed: int) -> torch.Tensor:
    """A (dim, dim) float64 matrix with spectral norm ``norm`` and W != W^T."""
    w = torch.randn(dim, dim, generator=_gen(seed), dtype=F64)
    w = w * norm / torch.linalg.matrix_norm(w, 2)
    assert (w - w.T).abs().max() > 0.1
    return w


# ----------------------------------------------------------------------------- 1. stopped samples stay put


@pytest.mark.parametrize("solver", SOLVERS)
def test_stopped_samples_sit_at_their_best_iterate_while_others_iterate(solver):
    """Catches: the loop's advance lets stopped samples keep moving (Newton's and Broyden's non-freezing path)."""
    dim = 4
    w = _nonsymmetric(dim, 1.0, seed=0)
    c = torch.randn(2, dim, generator=_gen(1), dtype=F64)
    s = torch.tensor([0.05, 0.95], dtype=F64)  # sample 0 converges in a few steps, sample 1 needs many more

    f, pairs = _recording(lambda z: s[:, None] * torch.tanh(z @ w.T) + c)
    slow = {"krylov_dim": 1} if solver == "newton" else {}  # Newton: inexact steps, so sample 1 takes a while
    sol = _run(solver, f, torch.zeros(2, dim, dtype=F64), tol=1e-8, stop="abs", max_iter=200, **slow)
    assert sol.statuses() == [Status.CONVERGED, Status.CONVERGED]
    n0, n1 = int(sol.nsteps[0]), int(sol.nsteps[1])
    assert n0 >= 1 and n1 >= n0 + 2, sol.nsteps  # f is called after sample 0 stopped
    assert len(pairs) == n1 + 1  # the start, then one evaluation per iteration
    # sample 0 stopped at its n0-th evaluated iterate: x, f(x), residual are exactly that pair's
    x_stop, fx_stop = pairs[n0][0][0], pairs[n0][1][0]
    assert torch.equal(sol.x[0], x_stop) and torch.equal(sol.fx[0], fx_stop)
    torch.testing.assert_close(sol.residual[0], torch.linalg.vector_norm(fx_stop - x_stop), rtol=1e-14, atol=0)
    assert sol.residual[0] == sol.trace[n0 - 1, 0] and torch.isnan(sol.trace[n0:, 0]).all()
    # ... and every later call of f saw sample 0 at exactly that iterate
    for x, _ in pairs[n0 + 1 :]:
        assert torch.equal(x[0], x_stop)


# ----------------------------------------------------------------------------- 6. Anderson's damping, residuals


def _tanh_map(dim: int = 3, batch: int = 2, seed: int = 2):
    w = _nonsymmetric(dim, 0.7, seed=seed)
    c = torch.randn(batch, dim, generator=_gen(seed + 1), dtype=F64)
    return lambda z: torch.tanh(z @ w.T) + c, torch.zeros(batch, dim, dtype=F64) + 0.3


@pytest.mark.parametrize("beta", [0.4, 1.0, 1.6])
def test_anderson_with_one_pair_of_history_is_damped_picard(beta):
    """Catches: Anderson's damping mis-applied (beta ignored, or (1 - beta) for (beta - 1) in the mixing)."""
    g, x0 = _tanh_map()
    f, pairs = _recording(g)
    sol = _run("anderson", f, x0, m=1, beta=beta, tol=1e-30, max_iter=6, divergence=None)
    assert len(pairs) == 7 and sol.nfev == 7
    x = x0.clone()
    for z, _ in pairs:  # x_{k+1} = x_k + beta (f(x_k) - x_k), with a single pair alpha = 1
        torch.testing.assert_close(z, x, rtol=1e-13, atol=1e-13)
        x = x + beta * (g(x) - x)


@pytest.mark.parametrize("m", [2, 5])
def test_anderson_first_step_is_a_damped_picard_step(m):
    """Catches: Anderson's first step (history of one pair) ignores beta."""
    g, x0 = _tanh_map()
    f, pairs = _recording(g)
    _run("anderson", f, x0, m=m, beta=0.3, tol=1e-30, max_iter=1, divergence=None)
    torch.testing.assert_close(pairs[1][0], x0 + 0.3 * (g(x0) - x0), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("stop", ["rel", "abs"])
def test_residual_and_trace_are_the_stopping_measure_of_each_evaluated_pair(solver, stop):
    """Catches: a wrong relative residual (||f(x) - x|| / ||f(x)|| per sample; e.g. ||x|| or ||g0|| below,
    or a batch-wide norm) in the loop's or Anderson's own residual pass, or stop="abs" measuring relatively."""
    w = _nonsymmetric(3, 0.8, seed=4)
    c = torch.tensor([[1.0, -2.0, 0.5], [30.0, 10.0, -20.0]], dtype=F64)  # very different scales per sample
    f, pairs = _recording(lambda z: 0.5 * z @ w.T + 0.3 * torch.sin(z) + c)  # no saturation: never exact
    sol = _run(solver, f, torch.zeros(2, 3, dtype=F64), tol=1e-30, stop=stop, max_iter=3, divergence=None)
    assert len(pairs) == 4 and sol.trace.shape == (3, 2) and (sol.status == Status.MAX_ITER).all()

    def measure(x, fx):
        gnorm = torch.linalg.vector_norm(fx - x, dim=1)
        return gnorm / torch.linalg.vector_norm(fx, dim=1) if stop == "rel" else gnorm

    for k, (x, fx) in enumerate(pairs[1:]):  # far from 0: the rel floor (1e-3 ||g0||) is not involved
        torch.testing.assert_close(sol.trace[k], measure(x, fx), rtol=1e-12, atol=0)
    torch.testing.assert_close(sol.residual, measure(sol.x, sol.fx), rtol=1e-12, atol=0)
    assert torch.equal(sol.residual, sol.trace.min(dim=0).values)


def test_relative_residual_near_a_fixed_point_at_zero_uses_the_start_floor():
    """Catches: the rel measure's floor max(||f(x)||, 1e-3 ||f(x0) - x0||) dropped or mis-scaled."""
    sol = _run("picard", lambda z: 0.5 * z, torch.ones(1, 1, dtype=F64), tol=1e-4, stop="rel", max_iter=100)
    # x_k = 0.5^k, f(x_k) = g(x_k) = 0.5^(k+1), ||g0|| = 0.5: rel = 1 while 0.5^(k+1) >= 5e-4, then 0.5^(k+1) / 5e-4
    expected = [0.5 ** (k + 1) / max(0.5 ** (k + 1), 5e-4) for k in range(1, 25)]
    assert int(sol.nsteps[0]) == 24 and sol.statuses() == [Status.CONVERGED]  # 0.5^25 / 5e-4 = 5.96e-5 <= 1e-4
    torch.testing.assert_close(sol.trace[:, 0], torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(sol.residual, torch.tensor([0.5**25 / 5e-4], dtype=F64), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- 8. implicit: the transpose


@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_gradient_of_a_nonsymmetric_linear_layer_is_the_transposed_solve(solver):
    """Catches: the implicit backward solving with J instead of J^T (invisible with a symmetric W)."""
    dim, batch = 5, 3
    w = _nonsymmetric(dim, 0.6, seed=5).requires_grad_(True)
    b = torch.randn(batch, dim, generator=_gen(6), dtype=F64, requires_grad=True)
    c = torch.randn(batch, dim, generator=_gen(7), dtype=F64)
    eye = torch.eye(dim, dtype=F64)
    f = lambda z: z @ w.T + b  # noqa: E731
    with torch.no_grad():
        z_star = torch.linalg.solve(eye - w, b.T).T  # z* = (I - W)^-1 b per sample
    out = fixedpoint.implicit(f, z_star, solver=getattr(fixedpoint, solver), tol=1e-12, max_iter=300)
    (c * out).sum().backward()
    with torch.no_grad():
        u = torch.linalg.solve((eye - w).T, c.T).T  # dL/dz* pulled through: u = (I - W)^-T c
        wrong = torch.linalg.solve(eye - w, c.T).T  # (I - W)^-1 c: what a missing transpose gives
    assert (u - wrong).abs().max() > 0.1
    torch.testing.assert_close(b.grad, u, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(w.grad, u.T @ z_star, rtol=1e-8, atol=1e-9)  # sum_i u_i z_i*^T


# ----------------------------------------------------------------------------- 9. GMRES restarts


def _restart_problem(dim: int = 12, seed: int = 8):
    a = torch.eye(dim, dtype=F64) - _nonsymmetric(dim, 0.7, seed=seed)
    rhs = torch.randn(2, dim, generator=_gen(seed + 1), dtype=F64)
    return a, rhs, torch.linalg.solve(a, rhs.T).T


def test_restarted_gmres_reaches_the_direct_solve_only_through_its_restarts():
    """Catches: GMRES restarts skipped, or a restart that does not recompute its residual from b - A x."""
    a, rhs, exact = _restart_problem()
    rtol = torch.full((2,), 1e-12, dtype=F64)
    errors = []
    for restarts in (0, 2, 150):
        x = gmres(lambda v: v @ a.T, rhs, rtol=rtol, restart=2, max_restarts=restarts)
        errors.append(float((x - exact).abs().max()))
    assert errors[0] > 1e-2 and errors[1] < 0.7 * errors[0]  # one cycle of 2 Krylov vectors is far off
    torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-10)


def test_implicit_with_the_gmres_adjoint_restarts_within_max_iter():
    """Catches: the GMRES adjoint (implicit, solver=newton) not restarting: short Krylov cycles stall far off."""
    dim = 12
    w = torch.eye(dim, dtype=F64) - _restart_problem(dim)[0]
    b = torch.randn(2, dim, generator=_gen(10), dtype=F64, requires_grad=True)
    c = torch.randn(2, dim, generator=_gen(11), dtype=F64)
    eye = torch.eye(dim, dtype=F64)
    with torch.no_grad():
        z_star = torch.linalg.solve(eye - w, b.T).T
        u = torch.linalg.solve((eye - w).T, c.T).T

    def grad_b(max_iter):
        b.grad = None
        out = fixedpoint.implicit(lambda z: z @ w.T + b, z_star, solver=fixedpoint.newton, krylov_dim=2,
                                  tol=1e-11, max_iter=max_iter)  # fmt: skip
        (c * out).sum().backward()
        return b.grad.clone()

    with pytest.warns(ConvergenceWarning):  # 3 products: one cycle of 2 Krylov vectors, no restart
        assert (grad_b(3) - u).abs().max() > 1e-2
    torch.testing.assert_close(grad_b(300), u, rtol=1e-8, atol=1e-9)


# ----------------------------------------------------------------------------- fpdm: models


def _tiny_fpdm():
    from fpdm.models import create_model

    with torch.random.fork_rng():  # the global RNG as other tests left it
        torch.manual_seed(0)
        model = create_model("FPDM-T/2", input_size=4, in_channels=2, num_classes=3, pre_depth=1, post_depth=1)
    with torch.no_grad():  # away from adaLN-zero's identity blocks, so that every module matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(12), dtype=p.dtype))
    return model


@pytest.mark.parametrize("training", [False, True])
def test_fpdm_fixed_point_layer_starts_from_the_pre_blocks_tokens(training):
    """Catches: FPDM's fixed-point solve starting from the injection Linear(x_pre) instead of x_pre itself."""
    from fpdm.models import fixed_iterations

    model = _tiny_fpdm()
    model.train(training)
    model.eval_solver = fixed_iterations(1)  # eval: one call of the block, from the start
    model.config.no_grad_iters, model.config.grad_iters = (0, 0), (1, 1)  # training: one call with gradient
    seen = {}
    hooks = [
        model.blocks_pre[-1].register_forward_hook(lambda mod, args, out: seen.setdefault("x_pre", out.detach())),
        model.injection.register_forward_hook(lambda mod, args, out: seen.setdefault("x_inj", out.detach())),
        model.projection.register_forward_pre_hook(lambda mod, args: seen.setdefault("proj_in", args[0].detach())),
    ]
    x = torch.randn(2, 2, 4, 4, generator=_gen(13))
    try:
        with torch.random.fork_rng(), torch.set_grad_enabled(training):  # training draws label dropout
            model(x, torch.tensor([5, 700]), torch.tensor([0, 2]))
    finally:
        for hook in hooks:
            hook.remove()
    d = model.config.hidden_size
    assert (seen["x_pre"] - seen["x_inj"]).abs().max() > 1e-2  # the two candidates differ
    assert torch.equal(seen["proj_in"][..., :d], seen["x_pre"])  # z0 = x_pre (the first call's z)
    assert torch.equal(seen["proj_in"][..., d:], seen["x_inj"])  # the injection is the other input
    if not training:
        assert torch.equal(model.last_fixed_point.solution.x, seen["x_pre"])


def test_label_dropout_replaces_a_fraction_p_of_labels_by_the_null_class():
    """Catches: label dropout computed and discarded (the null class never trained), or applied in eval."""
    from fpdm.models import LabelEmbedder

    num_classes, p, n = 10, 0.1, 20000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        embedder = LabelEmbedder(num_classes, 8, p)
        y = torch.arange(n) % num_classes
        table = embedder.embedding.weight.detach()
        assert table.shape[0] == num_classes + 1  # the null row is the last one
        embedder.train()
        with torch.no_grad():
            out = embedder(y)
        dropped = (out == table[num_classes]).all(dim=1)
        assert abs(dropped.float().mean().item() - p) < 0.01
        assert torch.equal(out[~dropped], table[y[~dropped]])  # the others keep their own class's row
        embedder.eval()
        with torch.no_grad():
            assert torch.equal(embedder(y), table[y])  # eval: nothing dropped


# ----------------------------------------------------------------------------- fpdm: training


def test_update_ema_is_decay_times_ema_plus_one_minus_decay_times_params():
    """Catches: update_ema with decay and 1 - decay swapped; ema_decay_at's warmup formula changed."""
    from fpdm.train import ema_decay_at, update_ema

    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for i, (e, p) in enumerate(zip(ema.parameters(), model.parameters(), strict=True)):
            e.copy_(torch.randn(e.shape, generator=_gen(20 + i)))
            p.copy_(torch.randn(p.shape, generator=_gen(30 + i)))
    before = [e.detach().clone() for e in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, old, p in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e.detach(), 0.9 * old + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)
    # min(decay, (1 + step) / (10 + step))
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1, rel=1e-12)
    assert ema_decay_at(10, 0.9999) == pytest.approx(11 / 20, rel=1e-12)
    assert ema_decay_at(1000, 0.9999) == pytest.approx(1001 / 1010, rel=1e-12)
    assert ema_decay_at(10**7, 0.9999) == 0.9999


# ----------------------------------------------------------------------------- fpdm: diffusion


def test_training_loss_gradient_on_epsilon_channels_is_the_mse_alone():
    """Catches: the stop-gradient removed from the learned-variance term (the vb loss pushing on epsilon)."""
    from fpdm.diffusion import Diffusion

    d = Diffusion.create(1000, learn_sigma=True)
    n, ch, h = 3, 2, 4
    x0 = torch.rand(n, ch, h, h, generator=_gen(40)) * 2 - 1
    noise = torch.randn(n, ch, h, h, generator=_gen(41))
    t = torch.tensor([0, 10, 600])  # the decoder NLL at t = 0, the KL elsewhere
    out = (torch.randn(n, 2 * ch, h, h, generator=_gen(42)) * 0.5).requires_grad_(True)
    d.training_losses(lambda xt, ts, y: out, x0, t, torch.zeros(n, dtype=torch.long), noise=noise).sum().backward()
    eps_grad, var_grad = out.grad[:, :ch], out.grad[:, ch:]
    # d/d eps of mean((noise - eps)^2) per sample: 2 (eps - noise) / (C H W)
    torch.testing.assert_close(eps_grad, 2 * (out[:, :ch].detach() - noise) / (ch * h * h), rtol=1e-5, atol=1e-7)
    # the variance channels: only the bound term, which sees epsilon through a stop-gradient
    frozen = out.detach().clone().requires_grad_(True)
    xt = d.q_sample(x0, t, noise)
    d.vb_terms(torch.cat([frozen[:, :ch].detach(), frozen[:, ch:]], dim=1), x0, xt, t).sum().backward()
    assert var_grad.abs().max() > 1e-4
    torch.testing.assert_close(var_grad, frozen.grad[:, ch:], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_steps_with_eta_match_the_closed_form(eta):
    """Catches: a wrong DDIM sigma (eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)) or its noise."""
    from fpdm.diffusion import Diffusion, linear_betas

    d = Diffusion.create(1000, learn_sigma=False, steps=10)
    kept = d.timesteps.tolist()
    assert len(kept) == 10 and kept[0] == 0 and kept[-1] == 999
    abar = torch.cumprod(1 - linear_betas(1000).double(), dim=0)  # the original process at the kept timesteps
    eps = torch.randn(2, 1, 2, 2, generator=_gen(50), dtype=F64)  # the fake model's fixed output
    start = torch.randn(2, 1, 2, 2, generator=_gen(51), dtype=F64)
    seen_t = []

    def model(xt, ts, y):
        seen_t.append(ts.tolist())
        return eps.float()

    steps = d.ddim_steps(model, start.float(), torch.zeros(2, dtype=torch.long), eta=eta, generator=_gen(52))
    noise = _gen(52)  # the sampler draws one standard normal per step but the last, from the generator in turn
    x = start
    for i in reversed(range(10)):
        got = next(steps).double()
        assert seen_t[-1] == [kept[i]] * 2
        ab, ab_prev = abar[kept[i]].item(), (abar[kept[i - 1]].item() if i else 1.0)
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        expected = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if i:
            expected = expected + sigma * torch.randn(x.shape, generator=noise).double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(x0.abs().max())))
        x = got  # the next step from where the sampler is (no float32 drift between the two)
    with pytest.raises(StopIteration):
        next(steps)
