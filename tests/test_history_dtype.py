"""history_dtype: Anderson's and Broyden's histories stored in bf16/fp16 with fp32 accumulation.

Anderson's low-precision history is in difference form (m - 1 differences of consecutive pairs beside the newest
pair in the iterate's dtype); Broyden's stores its rank-one factors balanced, (s u, v / s). Each test names the
realistic bug it would catch. Kernel checks run the Triton kernels on CPU under TRITON_INTERPRET=1 (tiny shapes).
"""

import os
from functools import partial

import pytest
import torch
from problems import problem_set

import fixedpoint
from fixedpoint import Status, _graphs
from fixedpoint._solvers import Anderson, Broyden
from fixedpoint.kernels import reference
from fixedpoint.kernels.groups import BroydenStep
from fixedpoint.testing import EagerGraphs, ReplayedGraphs
from fixedpoint.testing import anderson_state as _anderson
from fixedpoint.testing import broyden_state as _broyden

HALF = [torch.bfloat16, torch.float16]
SOLVERS = ["anderson", "broyden"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    """The Triton kernels, or a skip where they cannot run (no triton; no CUDA and no interpreter)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    return pytest.importorskip("fixedpoint.kernels.triton_kernels", reason="triton is not installed")


def _fp32(problem):
    """The problem in fp32: its map (computed in fp64), start and solution."""
    return (lambda z: problem.f(z.double()).float()), problem.x0.float(), problem.solution


def _error(x, solution):
    """The worst sample's distance to the solution, relative to its size (at least 1)."""
    diff = (x.double() - solution).flatten(1).norm(dim=1)
    return (diff / solution.flatten(1).norm(dim=1).clamp_min(1.0)).max().item()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("solver", SOLVERS)
def test_half_history_reaches_the_tolerance_on_the_problem_set(solver, dtype):
    """Every problem of the shared set reaches tol 1e-4 with a bf16/fp16 history, within a small factor of the fp32
    history's iterations, and as close to the solution as fp32 gets. Catches: Anderson storing the absolute images
    f(x_i) in half precision (x = sum alpha_i f_i then carries an error ~2^-8 ||x*||: it stalls near 1e-3), a
    difference formed against the wrong pair, and Broyden's v = H^T dx overflowing fp16 without the balancing
    (it did on linear-symmetric-0.98: NONFINITE after 35 iterations)."""
    for problem in problem_set():
        if solver not in problem.solvers:
            continue
        f, x0, solution = _fp32(problem)
        run = partial(getattr(fixedpoint, solver), f, x0, tol=1e-4, max_iter=problem.max_iter, stop=problem.stop,
                      impl="torch", **problem.options.get(solver, {}))  # fmt: skip
        full, half = run(), run(history_dtype=dtype)
        assert half.converged.all(), (problem.name, half.statuses())
        assert half.nsteps.max() <= 1.5 * full.nsteps.max() + 2, (problem.name, full.nsteps, half.nsteps)
        assert _error(half.x, solution) <= 2 * _error(full.x, solution) + 1e-3, problem.name
        assert half.x.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF)
def test_the_history_is_stored_in_half_precision(dtype):
    """The history tensors really are bf16/fp16: Anderson's m - 1 differences (and the kept pair in fp32), Broyden's
    U and V. Catches: a history_dtype accepted and then ignored (allocated in x's dtype), which saves nothing."""
    x = torch.randn(4, 64)
    fx, gnorm = torch.tanh(x), torch.ones(4)
    full = Anderson(m=5).init(x, fx, fx - x, gnorm)
    state = Anderson(m=5, history_dtype=dtype).init(x, fx, fx - x, gnorm)
    assert state.relative and state.F.dtype == state.G.dtype == dtype and state.F.element_size() == 2
    assert state.F.shape == (4, 4, 64) and state.x_kept.dtype == state.f_kept.dtype == torch.float32
    history = lambda s: s.F.nbytes + s.G.nbytes  # noqa: E731
    assert history(state) * 2.5 == history(full)  # 2 bytes for 4, m - 1 = 4 slots for 5
    assert history(state) + state.x_kept.nbytes + state.f_kept.nbytes == 0.6 * history(full)  # with the kept pair
    broyden = Broyden(m=6, history_dtype=dtype).init(x, fx, fx - x, gnorm)
    assert broyden.U.dtype == broyden.V.dtype == dtype and broyden.U.nbytes == 4 * 6 * 64 * 2
    assert broyden.x.dtype == broyden.g.dtype == broyden.hg.dtype == torch.float32


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_default_history_is_unchanged(solver):
    """history_dtype=None and history_dtype=x0's dtype are today's solver, bit for bit (fp32 and bf16 iterates).
    Catches: the default routed into the difference form (different rounding, so other tests' exact values move)."""
    w = torch.randn(24, 24, generator=torch.Generator().manual_seed(0)) * 0.15
    b = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    f = lambda z: torch.tanh(z @ w.T.to(z.dtype) + b.to(z.dtype))  # noqa: E731
    solve = getattr(fixedpoint, solver)
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.zeros(5, 24, dtype=dtype)
        default, same = solve(f, x0, tol=1e-5, max_iter=40), solve(f, x0, tol=1e-5, max_iter=40, history_dtype=dtype)
        none = solve(f, x0, tol=1e-5, max_iter=40, history_dtype=None)
        for sol in (same, none):
            assert torch.equal(sol.x, default.x) and sol.nfev == default.nfev
            torch.testing.assert_close(sol.trace, default.trace, rtol=0, atol=0, equal_nan=True)


def test_the_difference_form_is_the_same_method():
    """With an fp64 iterate and an fp32 history (rounding far below the tolerance) the difference form takes the
    absolute form's steps: the same iterations and the same iterates to rounding, with damping and restarts.
    Catches: a wrong sign or shift in gamma, or a base of f_kept where x_kept + beta g_kept belongs (such a method
    may still converge, only more slowly, which the tolerance tests would not see)."""
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w *= 0.95 / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(4, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + b)  # noqa: E731
    x0 = torch.zeros(4, 32, dtype=torch.float64)
    for options in ({"m": 5}, {"m": 3, "beta": 0.7}, {"m": 4, "growth": 1.05}):
        absolute = fixedpoint.anderson(f, x0, tol=1e-9, max_iter=80, **options)
        relative = fixedpoint.anderson(f, x0, tol=1e-9, max_iter=80, history_dtype=torch.float32, **options)
        assert absolute.converged.all() and relative.converged.all(), options
        assert (relative.nsteps - absolute.nsteps).abs().max() <= 1, (options, absolute.nsteps, relative.nsteps)
        torch.testing.assert_close(relative.x, absolute.x, rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_nonfinite_sample_leaves_the_others_alone(solver):
    """Per-sample stopping with a half history: a sample whose f turns NaN is NONFINITE with its last finite iterate,
    and every other sample's result is bit for bit a run without it. Catches: the kept pair or the differences
    updated for the whole batch (a NaN row mixed into others), or a stopped sample's kept pair taken again."""
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)) * 0.2
    b = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    calls = [0]

    def f(z, poison):
        calls[0] += 1
        out = torch.tanh(z @ w.T + b)
        if poison and calls[0] >= 4:
            out[2] = float("nan")
        return out

    solve = partial(getattr(fixedpoint, solver), x0=torch.zeros(4, 16), tol=1e-6, max_iter=60,
                    history_dtype=torch.bfloat16)  # fmt: skip
    clean, poisoned = solve(partial(f, poison=False)), solve(partial(f, poison=True))
    assert poisoned.statuses()[2] == Status.NONFINITE and torch.isfinite(poisoned.x[2]).all()
    others = [0, 1, 3]
    assert torch.equal(poisoned.x[others], clean.x[others]) and poisoned.converged[others].all()
    assert torch.equal(poisoned.nsteps[others], clean.nsteps[others])


def test_structured_states_take_a_half_history():
    """A tuple state with a bf16 history is the concatenated state's solve, bit for bit. Catches: history_dtype
    checked against a leaf instead of the flat state (a refusal), or dropped on the structured path."""
    w = torch.randn(12, 12, generator=torch.Generator().manual_seed(6)) * 0.3
    b = torch.randn(3, 12, generator=torch.Generator().manual_seed(7))
    flat = lambda z: torch.tanh(z @ w.T + b)  # noqa: E731
    tree = lambda s: (lambda y: (y[:, :5], y[:, 5:].reshape(3, 7)))(flat(torch.cat([s[0], s[1]], dim=1)))  # noqa: E731
    for solver in SOLVERS:
        solve = partial(getattr(fixedpoint, solver), tol=1e-6, max_iter=60, history_dtype=torch.bfloat16)
        one, two = solve(flat, torch.zeros(3, 12)), solve(tree, (torch.zeros(3, 5), torch.zeros(3, 7)))
        assert one.converged.all() and torch.equal(torch.cat(two.x, dim=1), one.x)


@pytest.mark.parametrize("stand_in", [EagerGraphs, ReplayedGraphs])
def test_graph_solver_with_a_half_history_equals_the_eager_loop(monkeypatch, stand_in):
    """graph="solver" (CPU stand-ins for capture and replay) with a bf16 history: the eager loop's result, with one
    graph per position of the m - 1 slot ring. Catches: the kept pair or the last evaluated pair not carried
    between replays (a replay would mix from a stale pair), and a period of m where the ring has m - 1 slots."""
    w = torch.randn(12, 12, generator=torch.Generator().manual_seed(8)) * 0.3
    b = torch.randn(5, 12, generator=torch.Generator().manual_seed(9))
    f = lambda z: torch.tanh(z @ w.T + b)  # noqa: E731
    solve = partial(fixedpoint.anderson, f, torch.zeros(5, 12), tol=1e-6, max_iter=40, m=4,
                    history_dtype=torch.bfloat16)  # fmt: skip
    eager = solve()
    graphs = stand_in()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    captured = solve(graph="solver")
    assert graphs.captures == 6  # lcm(m - 1 = 3, 2)
    assert captured.nsteps.tolist() == eager.nsteps.tolist() and captured.nfev == eager.nfev
    torch.testing.assert_close(captured.x, eager.x, rtol=0, atol=0)
    again = solve(graph="solver")  # a kept session: reinit into its buffers
    torch.testing.assert_close(again.x, eager.x, rtol=0, atol=0)


def test_bad_history_dtypes_are_refused():
    """A clear error naming the value. Catches: an int8 or a wider history accepted silently (an int history would
    truncate every difference to 0; a wider one saves nothing), and beta="auto" run without its damped images."""
    f, x0 = (lambda z: 0.5 * z), torch.ones(2, 3)
    for solver in (fixedpoint.anderson, fixedpoint.broyden):
        with pytest.raises(ValueError, match="torch.int8"):
            solver(f, x0, history_dtype=torch.int8)
        with pytest.raises(TypeError, match="'bf16'"):
            solver(f, x0, history_dtype="bf16")
        with pytest.raises(ValueError, match="narrower.*torch.float64"):
            solver(f, x0, history_dtype=torch.float64)
        with pytest.raises(ValueError, match="narrower.*torch.float16"):
            solver(f, x0.bfloat16(), history_dtype=torch.float16)
        assert solver(f, x0.double(), history_dtype=torch.float32).converged.all()  # fp32 under fp64: fine
    with pytest.raises(ValueError, match="beta='auto'"):
        fixedpoint.anderson(f, x0, beta="auto", history_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="narrower"):  # a Solver built by hand: the same rule
        fixedpoint.solve(Broyden(history_dtype=torch.float64), f, x0)


def _recorded_history_dtypes(monkeypatch) -> list:
    """The dtype of every history the Anderson and Broyden solvers allocate from now on."""
    seen = []
    for cls, history in ((Anderson, "F"), (Broyden, "U")):
        def init(self, *args, _init=cls.init, _history=history):
            state = _init(self, *args)
            seen.append(getattr(state, _history).dtype)
            return state

        monkeypatch.setattr(cls, "init", init)
    return seen


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_the_solver_functions_pass_the_history_dtype_on(solver, monkeypatch):
    """Catches: anderson() or broyden() checking history_dtype and then building their solver without it (the
    solve still converges, in fp32: only the history's dtype tells)."""
    seen = _recorded_history_dtypes(monkeypatch)
    f, x0 = lambda z: 0.5 * torch.tanh(z) + 1, torch.zeros(2, 16)
    assert getattr(fixedpoint, solver)(f, x0, history_dtype=torch.float16).converged.all()
    assert seen == [torch.float16]


def test_fixed_point_layer_forwards_the_history_dtype(monkeypatch):
    """FixedPoint takes solver options through functools.partial, history_dtype too. Catches: a solver option that a
    layer cannot reach (its solve would still be a fixed point: the history's dtype is checked)."""
    seen = _recorded_history_dtypes(monkeypatch)
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(10)) * 0.3
    solver = partial(fixedpoint.anderson, tol=1e-6, history_dtype=torch.bfloat16)
    layer = fixedpoint.FixedPoint(lambda z, x: torch.tanh(z @ w.T + x), solver=solver)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(11))
    z = layer(x)
    torch.testing.assert_close(z, torch.tanh(z @ w.T + x), rtol=0, atol=1e-5)
    assert seen and set(seen) == {torch.bfloat16}


# ----------------------------------------------------------------------------- Triton kernels against the twins


def _relative_state(batch, m, dim, dtype, seed, slot=1):
    """A relative AndersonState with a random history of differences and kept/new pairs on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    F, G = rand(batch, m, dim).to(dtype) * 0.1, rand(batch, m, dim).to(dtype) * 0.1
    took = torch.tensor([True, False] * (batch // 2), device=DEVICE)
    return _anderson(F, G, slot, alpha=rand(batch, m), x_kept=rand(batch, dim), f_kept=rand(batch, dim), took=took,
                     x_new=rand(batch, dim), f_new=rand(batch, dim), row=torch.zeros(batch, 2, m, device=DEVICE),
                     kept_gnorm=torch.ones(batch, device=DEVICE))  # fmt: skip


def _copy(state):
    """The state with its own copies of every tensor (a second kernel writes into them)."""
    from dataclasses import fields, replace

    return replace(state, **{f.name: getattr(state, f.name).clone() for f in fields(state)
                             if isinstance(getattr(state, f.name), torch.Tensor)})  # fmt: skip


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dim", [40, 67])
def test_relative_residual_write_kernel_equals_twin(dtype, dim):
    """The fused residual pass in difference form: g - g_kept and f(x) - f_kept into the slot (1 ulp: the interpreter
    truncates), the norms, the Gram row of the stored difference and the projections G g. Catches: the Gram row taken
    against the unrounded difference, or the projections against the kept pair's g."""
    triton_kernels = _triton()
    state = _relative_state(4, 3, dim, dtype, seed=dim)
    gen = torch.Generator().manual_seed(1)
    x, fx = (torch.randn(4, dim, generator=gen).to(DEVICE) for _ in range(2))
    one, two = _copy(state), _copy(state)
    gsq1, fsq1, row1 = triton_kernels.anderson_residual_write(one, x, fx)
    gsq2, fsq2, row2 = reference.anderson_residual_write(two, x, fx)
    ulp = 2 * 2**-7 if dtype == torch.bfloat16 else 2 * 2**-10
    torch.testing.assert_close(one.G.float(), two.G.float(), rtol=ulp, atol=ulp * 1e-2)
    torch.testing.assert_close(one.F.float(), two.F.float(), rtol=ulp, atol=ulp * 1e-2)
    torch.testing.assert_close(gsq1, gsq2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fsq1, fsq2, rtol=1e-5, atol=1e-5)
    assert row1.shape == row2.shape == (4, 2, 3)
    torch.testing.assert_close(row1, row2, rtol=4 * ulp, atol=4 * ulp)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_relative_mix_kernel_equals_twin_and_keeps_the_right_pair(dtype, beta):
    """The mixing in difference form: the kept pair takes the new one only where ``took`` (and only for active
    samples), the step starts from f_kept + (beta - 1) g_kept; stopped samples get ``frozen``. Catches: the kept pair
    overwritten for a blown-up sample (it would go on from the blown-up iterate)."""
    triton_kernels = _triton()
    state = _relative_state(4, 3, 50, dtype, seed=5)
    frozen = torch.full((4, 50), 7.0, device=DEVICE)
    active = torch.tensor([True, True, False, True], device=DEVICE)
    for fz, act in ((None, None), (frozen, active)):
        one, two = _copy(state), _copy(state)
        out1 = triton_kernels.anderson_mix(one, beta, fz, act)
        out2 = reference.anderson_mix(two, beta, fz, act)
        torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
        assert torch.equal(one.x_kept, two.x_kept) and torch.equal(one.f_kept, two.f_kept)
        moved = state.took if act is None else state.took & act
        expect = torch.where(moved[:, None], state.x_new, state.x_kept)
        assert torch.equal(two.x_kept, expect)
    assert torch.equal(out1[2], frozen[2])


@pytest.mark.parametrize("blown", [False, True])
def test_relative_absorb_kernel_equals_twin(blown):
    """The absorb in difference form: the Gram row into the matrix, the least-squares weights -gamma from the
    projections (no normalisation), ``took``; a blown-up sample drops every difference and keeps its pair; an
    ill-conditioned one restarts with weights 0. Catches: the absolute form's sum-to-one normalisation applied to
    gamma, or a blown-up sample keeping a difference that points at the discarded pair."""
    triton_kernels = _triton()
    batch, m, dim = 4, 3, 30
    gen = torch.Generator().manual_seed(3)
    dG = torch.randn(batch, m, dim, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    g[3] += 100 * dG[3, 0]  # ||gamma||_1 ~ 100 > (max_coeff - 1) / 2: a restart
    gram = (dG @ dG.transpose(1, 2)).float()
    row = torch.stack([gram[:, 1], (dG @ g[:, :, None])[..., 0].float()], dim=1)  # slot 1 just written
    gnorm = torch.full((batch,), 5.0 if blown else 0.5)
    results = []
    for module in (triton_kernels, reference):
        state = _anderson(torch.zeros(batch, m, 1, device=DEVICE), None, 1, gram=gram.clone().to(DEVICE),
                          row=row.clone().to(DEVICE), valid=torch.ones(batch, m, dtype=torch.bool, device=DEVICE),
                          kept_gnorm=torch.ones(batch, device=DEVICE), x_kept=torch.zeros(batch, 1, device=DEVICE),
                          took=torch.zeros(batch, dtype=torch.bool, device=DEVICE),
                          restarts=torch.zeros(batch, dtype=torch.long, device=DEVICE))  # fmt: skip
        alpha = module.anderson_absorb(state, gnorm.to(DEVICE), growth=2.0, ridge=1e-6, max_coeff=50.0,
                                       graph_safe=True)  # fmt: skip
        results.append((alpha, state.valid, state.took, state.restarts, state.kept_gnorm))
    (a1, *rest1), (a2, *rest2) = results
    torch.testing.assert_close(a1, a2, rtol=1e-4, atol=1e-5)
    for t1, t2 in zip(rest1, rest2):
        assert torch.equal(t1, t2)
    valid, took, restarts = rest2[:3]
    if blown:
        assert not valid.any() and not took.any() and (a2 == 0).all() and (restarts >= 1).all()
    else:
        assert took.all() and valid[:3].all() and not valid[3].any() and restarts.tolist() == [0, 0, 0, 1]
        gamma = torch.linalg.lstsq(dG[:3].transpose(1, 2), g[:3, :, None]).solution[..., 0]
        torch.testing.assert_close(-a2[:3].double(), gamma.to(DEVICE), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", HALF)
def test_balanced_broyden_kernels_equal_twins(dtype):
    """Broyden with a half U, V: combine's two extra norms, and finish's balanced term (s u, v / s) into the slot,
    whose product is the fp32 term's. Catches: the scale applied to one factor only (H changes), or the norms read
    from the wrong columns of the sums."""
    triton_kernels = _triton()
    batch, m, dim, n = 2, 4, 48, 2
    gen = torch.Generator().manual_seed(4)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    U, V = rand(batch, m, dim).to(dtype), rand(batch, m, dim).to(dtype)
    x, g, dx, hg = rand(batch, dim), rand(batch, dim), rand(batch, dim), rand(batch, dim)
    step = BroydenStep(x, g, torch.ones(batch, device=DEVICE), dx)
    outs = []
    for module in (triton_kernels, reference):
        state = _broyden(U.clone(), V.clone(), n, hg=hg, x=x - dx, g=rand(batch, dim), gnorm=torch.ones(batch))
        coeff = module.broyden_dots(state, step)
        applies = module.broyden_combine(state, step, coeff)
        assert applies.sums.shape == (batch, 6)
        new = module.broyden_finish(state, step, applies, growth=100.0)
        outs.append((applies, new))
    (a1, s1), (a2, s2) = outs
    torch.testing.assert_close(a1.sums, a2.sums, rtol=1e-4, atol=1e-4)
    ulp = 2 * 2**-7 if dtype == torch.bfloat16 else 2 * 2**-10
    torch.testing.assert_close(s1.U.float(), s2.U.float(), rtol=2 * ulp, atol=1e-3)
    torch.testing.assert_close(s1.V.float(), s2.V.float(), rtol=2 * ulp, atol=1e-3)
    # the stored term is u v^T of the fp32 update (up to half rounding), however it is split
    u_v = s2.U[:, n].float()[:, :, None] * s2.V[:, n].float()[:, None, :]
    denom, _, _, v_g, v_sq, r_sq = a2.sums.double().unbind(1)
    u = (dx.double() - (a2.h_g.double() - hg.double())) / denom[:, None]
    torch.testing.assert_close(u_v.double(), u[:, :, None] * a2.v.double()[:, None, :], rtol=0.05, atol=0.05)
    ratio = s2.U[:, n].float().norm(dim=1) / s2.V[:, n].float().norm(dim=1)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0.02, atol=0)  # balanced


@pytest.mark.parametrize("solver", SOLVERS)
def test_triton_solve_with_a_half_history_equals_torch(solver):
    """A whole solve with a bf16 history through the Triton kernels (interpreter) and the twins: the same statuses,
    iterations within one, the same solution to the tolerance. Catches: a launcher still asserting G has x's dtype,
    or a kernel flag (DIFF, BALANCE) not passed on the solver's path."""
    _triton()
    w = torch.randn(10, 10, generator=torch.Generator().manual_seed(12)) * 0.3
    b = torch.randn(3, 10, generator=torch.Generator().manual_seed(13))
    f = lambda z: torch.tanh(z @ w.T.to(z.device) + b.to(z.device))  # noqa: E731
    runs = {}
    for impl in ("torch", "triton"):
        solve = getattr(fixedpoint, solver)
        runs[impl] = solve(f, torch.zeros(3, 10, device=DEVICE), tol=1e-5, max_iter=40, m=4, impl=impl,
                           history_dtype=torch.bfloat16)  # fmt: skip
    one, two = runs["torch"], runs["triton"]
    assert one.statuses() == two.statuses() == [Status.CONVERGED] * 3
    assert (one.nsteps - two.nsteps).abs().max() <= 1
    torch.testing.assert_close(one.x, two.x, rtol=0, atol=1e-4)
