"""graph="solver" (f eager, the solver's own work replayed from CUDA graphs kept for later solves), the removal of
graph=True (f captured with the loop: compile f instead), and the lagged convergence check. On CPU the graphs'
logic runs with stand-ins for capture and replay (fixedpoint.testing.EagerGraphs, ReplayedGraphs)."""

import math
import warnings
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import numpy as np
import pytest
import torch
from problems import transient_growth
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fixedpoint
from fixedpoint import Status, _graphs, _solve
from fixedpoint import kernels as kernel_modules
from fixedpoint._solvers import Anderson
from fixedpoint.kernels.reference import solve_spd
from fixedpoint.testing import EagerGraphs, ReplayedGraphs


@pytest.fixture(autouse=True)
def _eager_solves_on_the_twins(monkeypatch):
    """The graphs replay the PyTorch twins; an eager CPU solve's default is the host path (NumPy's ops, equal to
    the twins up to rounding, which a sample without a fixed point amplifies over 40 iterations). So the eager
    solves the graphs are compared with run on the twins too: the comparison is of the graph machinery alone."""
    resolve = kernel_modules.resolve

    def twins_for_host(impl, x):
        module = resolve(impl, x)
        return kernel_modules.reference if module is kernel_modules.host else module

    monkeypatch.setattr(kernel_modules, "resolve", twins_for_host)


def _contraction_map(seed, dim=12, batch=5, nan_after=None, shift=True, rate=0.9):
    """tanh(W z + b), a contraction of Lipschitz constant ``rate`` (W, b drawn per seed); with ``shift``,
    sample 4 has no fixed point (a shift); with ``nan_after``, sample 2 turns NaN from that call on. Returns
    f (its calls counted in ``f.calls[0]``) and a random start."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen)
    w = rate * w / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(batch, dim, generator=gen)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = torch.tanh(z @ w.T + b)
        if shift:
            out[4] = z[4] + 0.01
        if nan_after is not None and calls[0] >= nan_after:
            out[2] = float("nan")
        return out

    f.calls = calls
    return f, torch.randn(batch, dim, generator=gen)


def _problem(batch=5, dim=12, seed=0):
    """From zeros: sample 2 turns NaN on the 6th call; sample 4 has no fixed point (MAX_ITER). Also the calls."""
    f, _ = _contraction_map(seed, dim=dim, batch=batch, nan_after=6)
    return f, torch.zeros(batch, dim), f.calls


STAND_INS = [EagerGraphs, ReplayedGraphs]  # Python reruns at replay / only recorded ops rerun, as on CUDA


@pytest.mark.parametrize(
    "solver,options",
    [
        ("anderson", {"m": 3}),
        ("picard", {"beta": 0.8}),
        ("picard", {}),
        ("anderson", {"m": 3, "beta": "auto"}),
        ("picard", {"beta": "auto"}),
    ],
)
@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("stand_in", STAND_INS)
def test_solver_graphs_give_the_default_loop_result(monkeypatch, solver, options, check_every, stand_in):
    """f eagerly, then one replay per iteration, from one memory pool per session and one graph per position in a
    period of lcm(solver period, 2): the same calls of f, iterations, statuses, iterates and trace as the loop
    without graphs, with samples that turn NaN and that never converge (a replay reading a stale buffer, a
    position captured twice or a wrong count would show here)."""
    f, x0, calls = _problem()
    solve = getattr(fixedpoint, solver)
    reference = solve(f, x0, tol=1e-6, max_iter=40, check_every=check_every, **options)
    graphs = stand_in()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    calls[0] = 0
    captured = solve(f, x0, tol=1e-6, max_iter=40, graph="solver", check_every=check_every, **options)
    assert len(graphs.pools) == 1  # one per session
    assert graphs.captures == (6 if solver == "anderson" else 2)
    assert captured.nfev == reference.nfev == calls[0]  # f eager, checked as without graphs
    assert captured.nsteps.tolist() == reference.nsteps.tolist()
    assert captured.status.tolist() == reference.status.tolist()
    assert Status.NONFINITE in captured.statuses() and Status.MAX_ITER in captured.statuses()
    torch.testing.assert_close(captured.x, reference.x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(captured.residual, reference.residual, rtol=1e-4, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(captured.trace, reference.trace, rtol=1e-4, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("built", ["anderson()", "Anderson(kernels=host)"])
def test_cpu_graphs_capture_the_twins_not_the_host_path(monkeypatch, built):
    """On a CPU "auto" takes the host path, whose Anderson passes are NumPy's: a graph would run them once, at
    capture, and replay nothing of them. Catches: a graph solve capturing the host kernels, with the default
    impl or a solver built by hand with them (its replays would skip the history write and the mixing: the
    solve stalls at MAX_ITER)."""
    monkeypatch.undo()  # the real resolve, not this module's fixture
    monkeypatch.setattr(_graphs, "GRAPHS", ReplayedGraphs())
    (f, x0, _), (g, _, _) = _problem(), _problem()  # (each map turns sample 2 NaN at its own 6th call)
    if built == "anderson()":
        graphed = fixedpoint.anderson(f, x0, tol=1e-6, max_iter=40, m=3, graph="solver")
    else:
        solver = Anderson(m=3, kernels=kernel_modules.host, graph_safe=True)
        graphed = fixedpoint.solve(solver, f, x0, tol=1e-6, max_iter=40, graph="solver")
    eager = fixedpoint.anderson(g, x0, tol=1e-6, max_iter=40, m=3, impl="torch")
    assert graphed.status.tolist() == eager.status.tolist() and graphed.converged.sum() == 3
    assert graphed.nsteps.tolist() == eager.nsteps.tolist()
    torch.testing.assert_close(graphed.x[:4], eager.x[:4], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("max_iter", [5, 11])
@pytest.mark.parametrize("stand_in", STAND_INS)
def test_solver_graphs_keep_the_best_iterate_when_the_residual_rises(monkeypatch, max_iter, stand_in):
    """The lazy best copy across replays: the previous pair is carried from one replay to the next (in the static
    buffers, and in f's output buffers taken in turn), so a best pair followed by a worse one is still returned."""
    f, x0, iterates = transient_growth()
    residuals = (f(iterates) - iterates).norm(dim=2)[: max_iter + 1]
    monkeypatch.setattr(_graphs, "GRAPHS", stand_in())
    sol = fixedpoint.picard(f, x0, tol=1e-30, max_iter=max_iter, stop="abs", graph="solver")
    expected = iterates[residuals.argmin(dim=0), torch.arange(x0.shape[0])]
    assert torch.equal(sol.x, expected) and torch.equal(sol.fx, f(expected))


@pytest.mark.parametrize("solver,options", [("anderson", {"m": 1}), ("anderson", {"m": 2}), ("picard", {"beta": 0.9})])
@pytest.mark.parametrize("check_every", [1, 8])
@pytest.mark.parametrize("stand_in", STAND_INS)
def test_solver_graphs_return_the_lowest_residual_pair(monkeypatch, solver, options, check_every, stand_in):
    """Whatever the solver, the returned pair is the one with the lowest residual seen (start included),
    including when the best was the previous pair, carried across a replay in the static buffers."""
    f_linear, x0, _ = transient_growth(batch=8, seed=3)

    def f(z):
        return f_linear(z) + 0.3 * torch.sin(3 * z)

    monkeypatch.setattr(_graphs, "GRAPHS", stand_in())
    sol = getattr(fixedpoint, solver)(f, x0, tol=1e-30, max_iter=20, stop="abs", graph="solver",
                                      check_every=check_every, **options)  # fmt: skip
    assert (sol.trace.diff(dim=0) > 0).any(), "the residuals must rise somewhere for this test to mean anything"
    start = (f(x0) - x0).norm(dim=1)
    lowest = torch.minimum(start, sol.trace.nan_to_num(float("inf")).min(dim=0).values)
    assert torch.equal(sol.residual, lowest)
    torch.testing.assert_close(sol.fx, f(sol.x), rtol=0, atol=0)
    torch.testing.assert_close((sol.fx - sol.x).norm(dim=1), sol.residual, rtol=1e-12, atol=0)


@pytest.mark.parametrize("stand_in", STAND_INS)
def test_solver_graphs_stop_early_when_every_sample_converges(monkeypatch, stand_in):
    """The replays stop once every sample has converged (not at max_iter), after exactly the eager loop's calls
    of f: convergence is checked after every replay as without graphs."""
    monkeypatch.setattr(_graphs, "GRAPHS", stand_in())
    sol = fixedpoint.anderson(lambda z: 0.5 * z + 1.0, torch.zeros(3, 4), tol=1e-6, max_iter=500, graph="solver", m=2)
    assert sol.converged.all() and sol.trace.shape[0] == int(sol.nsteps.max()) < 40
    torch.testing.assert_close(sol.x, torch.full((3, 4), 2.0))
    eager = fixedpoint.anderson(lambda z: 0.5 * z + 1.0, torch.zeros(3, 4), tol=1e-6, max_iter=500, m=2)
    assert sol.nfev == eager.nfev and torch.equal(sol.nsteps, eager.nsteps)


@pytest.mark.parametrize("solver,options", [("anderson", {"m": 3}), ("picard", {}), ("picard", {"beta": 0.5})])
@pytest.mark.parametrize("stand_in", STAND_INS)
def test_solver_graphs_never_write_into_what_f_returned(monkeypatch, solver, options, stand_in):
    """f's output is copied into the graphs' own buffers (the static buffers too are copies): an f that keeps its
    outputs finds them unchanged."""
    f_linear, x0, _ = transient_growth(batch=4, seed=2)
    kept = []

    def f(z):
        out = f_linear(z) + 0.1 * torch.sin(z)
        kept.append((out, out.clone()))
        return out

    monkeypatch.setattr(_graphs, "GRAPHS", stand_in())
    getattr(fixedpoint, solver)(f, x0, tol=1e-30, max_iter=13, stop="abs", graph="solver", **options)
    assert len(kept) >= 14 and all(torch.equal(out, copy) for out, copy in kept)


@pytest.mark.parametrize("stop_at", [4, 5, 6, 7])  # every position in Picard's period of two graphs, and a wrap
def test_solver_graphs_stop_at_any_position_with_the_last_pair(monkeypatch, stop_at):
    """graph="solver" checks convergence after every iteration: a stop mid-period returns the pair of the
    position that stopped (the last pair is taken from that graph's outputs), as the eager loop does."""
    f, x0, iterates = transient_growth(batch=3, seed=1)
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    reference = fixedpoint.picard(f, x0, tol=1e-30, max_iter=stop_at, stop="abs")
    sol = fixedpoint.picard(f, x0, tol=1e-30, max_iter=stop_at, stop="abs", graph="solver")
    assert sol.nfev == reference.nfev == stop_at + 1 and torch.equal(sol.nsteps, reference.nsteps)
    assert torch.equal(sol.x, reference.x) and torch.equal(sol.fx, reference.fx)
    torch.testing.assert_close(sol.trace, reference.trace, rtol=0, atol=0)


@pytest.mark.parametrize("solver,options", [("anderson", {"m": 3}), ("picard", {"beta": 0.7})])
def test_solver_graphs_with_triton_kernels_equal_the_eager_loop(monkeypatch, solver, options):
    """The Triton launchers inside the solver's graphs (the stand-in's, eagerly; on a CPU in the interpreter):
    the same solve as eagerly."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    f_cpu, x0, calls = _problem(batch=5, dim=8, seed=2)
    f, x0 = (lambda z: f_cpu(z.cpu()).to(z.device)), x0.to(device)
    solve = getattr(fixedpoint, solver)
    eager = solve(f, x0, tol=1e-6, max_iter=12, impl="triton", **options)
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    calls[0] = 0
    graphed = solve(f, x0, tol=1e-6, max_iter=12, impl="triton", graph="solver", **options)
    assert graphed.nfev == eager.nfev == calls[0]
    assert graphed.nsteps.tolist() == eager.nsteps.tolist() and graphed.status.tolist() == eager.status.tolist()
    torch.testing.assert_close(graphed.x, eager.x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphed.trace, eager.trace, rtol=1e-5, atol=1e-9, equal_nan=True)


def test_graph_needs_cuda_and_a_graph_capable_solver(monkeypatch):
    """graph is False or "solver": another value is an error naming the two (NumPy's bool by its type), and
    "solver" needs CUDA tensors and a solver with a period (Broyden's step calls f)."""
    with pytest.raises(ValueError, match="graph must be False or 'solver', got 'yes'"):
        fixedpoint.picard(lambda z: z, torch.zeros(2, 3), graph="yes")
    with pytest.raises(TypeError, match=r"graph must be False or 'solver', got 1 \(int\)"):
        fixedpoint.picard(lambda z: z, torch.zeros(2, 3), graph=1)
    with pytest.raises(TypeError, match=r"got (np\.)?False_? \(numpy\.bool_?\)"):  # NumPy's bool, named
        fixedpoint.picard(lambda z: z, torch.zeros(2, 3), graph=np.bool_(False))
    with pytest.raises(ValueError, match="graph='solver' captures a CUDA graph and needs CUDA tensors, got x0 on cpu"):
        fixedpoint.picard(lambda z: z, torch.zeros(2, 3), graph="solver")
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    with pytest.raises(ValueError, match="graph='solver' is not supported by Broyden"):
        _solve.solve(
            fixedpoint._solvers.Broyden(),
            lambda z: z,
            torch.zeros(2, 3),
            tol=1e-4,
            max_iter=5,
            stop="rel",
            divergence=None,
            graph="solver",
        )


@pytest.mark.parametrize("solver", ["picard", "anderson"])
@pytest.mark.parametrize("stand_in", [None, EagerGraphs])  # on CPU as such, and where graphs could run
def test_graph_true_was_removed_and_names_what_replaces_it(monkeypatch, solver, stand_in):
    """graph=True (f captured with the loop) was removed in 0.2: asking for it is a ValueError that names the
    replacements (torch.compile of f, graph='solver'), before any other check (not "needs CUDA tensors"), and
    never a silent eager or "solver" solve nor a call of f."""
    if stand_in is not None:
        monkeypatch.setattr(_graphs, "GRAPHS", stand_in())
    calls = []
    message = (r"graph=True \(f captured with the loop\) was removed in fixedpoint 0\.2: compile f instead, "
               r"torch\.compile\(f, mode='reduce-overhead'\).* pass graph='solver'")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        getattr(fixedpoint, solver)(lambda z: calls.append(z) or z, torch.zeros(2, 3), graph=True)
    assert not calls and not _graphs._graph_cache


@pytest.mark.parametrize("solver", ["picard", "anderson"])
@pytest.mark.parametrize(
    "graph,error,shown",
    [("on", ValueError, "'on'"), ("True", ValueError, "'True'"), ("Solver", ValueError, "'Solver'"),
     (1, TypeError, r"1 \(int\)"), (0, TypeError, r"0 \(int\)"), (None, TypeError, r"None \(NoneType\)"),
     (np.bool_(True), TypeError, r"(np\.)?True_? \(numpy\.bool_?\)")],
)  # fmt: skip
def test_graph_values_other_than_false_and_solver_are_errors(monkeypatch, solver, graph, error, shown):
    """Only False and "solver" are modes: "on" (the sampler's removed flag), a string spelled otherwise, or an
    integer or NumPy bool (1 == True) is an error naming the valid values, never taken for graph=True or a mode."""
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    with pytest.raises(error, match=rf"^graph must be False or 'solver', got {shown}"):
        getattr(fixedpoint, solver)(lambda z: z, torch.zeros(2, 3), graph=graph)


def test_solve_spd_matches_linalg_solve():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, 5, generator=gen, dtype=torch.float64)
    a = a @ a.transpose(1, 2) + 0.1 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(solve_spd(a, b), torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)
    a[2, 1, 1] = float("nan")
    assert not torch.isfinite(solve_spd(a, b)[2]).all() and torch.isfinite(solve_spd(a, b)[0]).all()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_cuda_graph_equals_the_default_loop_on_gpu(solver):
    """On a GPU, for real: graph="solver" solves equal the eager loop's, and later solves (another f) replay the
    kept graphs with their own results (a kept session reading the first solve's buffers would repeat it)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 256, device="cuda", generator=gen)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    injections = torch.randn(2, 16, 8, 256, device="cuda", generator=gen)
    solve = getattr(fixedpoint, solver)
    x0 = torch.zeros(16, 8, 256, device="cuda")
    results = []
    for b in (injections[0], injections[1], injections[0]):  # later solves replay the kept graphs
        f = partial(lambda z, b: torch.tanh(z @ w.T + b), b=b)
        eager = solve(f, x0, tol=1e-5, max_iter=80)
        graphed = solve(f, x0, tol=1e-5, max_iter=80, graph="solver", check_every=5)
        assert graphed.nsteps.tolist() == eager.nsteps.tolist() and graphed.status.tolist() == eager.status.tolist()
        torch.testing.assert_close(graphed.x, eager.x, rtol=1e-4, atol=1e-5)
        results.append(graphed.x)
    assert not torch.equal(results[0], results[1])
    torch.testing.assert_close(results[2], results[0], rtol=1e-6, atol=1e-7)  # a kept solve, a fresh one


@cuda
@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_kept_cuda_graphs_with_args_equal_the_default_loop_on_gpu(solver):
    """graph="solver" with the injection passed as an arg (as FixedPoint and FPDM pass their inputs): one session,
    replayed by the later solves with other injections, each equal to the eager loop; the caller's injections are
    never written."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 256, device="cuda", generator=gen)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    injections = torch.randn(3, 16, 8, 256, device="cuda", generator=gen)
    original = injections.clone()
    solve = getattr(fixedpoint, solver)
    x0 = torch.zeros(16, 8, 256, device="cuda")

    def block(z, b):
        return torch.tanh(z @ w.T + b)

    for b in (injections[0], injections[1], injections[2], injections[0]):
        eager = solve(block, x0, args=(b,), tol=1e-5, max_iter=80)
        graphed = solve(block, x0, args=(b,), tol=1e-5, max_iter=80, graph="solver", check_every=5)
        assert graphed.nsteps.tolist() == eager.nsteps.tolist() and graphed.status.tolist() == eager.status.tolist()
        torch.testing.assert_close(graphed.x, eager.x, rtol=1e-4, atol=1e-5)
    assert len(_graphs._graph_cache) == 1 and torch.equal(injections, original)


@pytest.mark.parametrize("solver,m", [("anderson", 3), ("anderson", 2), ("picard", None)])
def test_every_new_session_warms_up_before_its_captures(monkeypatch, solver, m):
    """A solve that builds graphs runs its first solver period eagerly inside the warm-up (new kernel
    specializations compile there, never in a capture), and captures only after it; a solve that replays a kept
    session neither warms up nor captures."""
    graphs, events = EagerGraphs(), []

    @contextmanager
    def warmup_stream(device):
        events.append("warm-up")
        yield
        events.append("end")

    def capture(body, device, pool):
        events.append("capture")
        return EagerGraphs.capture(graphs, body, device, pool)

    graphs.warmup_stream, graphs.capture = warmup_stream, capture
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    f, x0, _ = _problem()
    options, period = ({"m": m}, m) if solver == "anderson" else ({}, 1)

    def g(z):
        events.append("f")
        return f(z)

    runs = []
    for beta in (1.0, 0.5, 1.0):  # another beta: another session; the third solve replays the first's
        events.clear()
        getattr(fixedpoint, solver)(g, x0, tol=1e-6, max_iter=20, graph="solver", beta=beta, **options)
        runs.append(list(events))
    for run in runs[:2]:  # the start's call, one eager period, then f eagerly before each position's capture
        assert run[: run.index("capture")] == ["f", "warm-up", *["f"] * period, "end", "f"]
        assert run.count("capture") == math.lcm(period, 2) and run.count("warm-up") == 1
    assert "warm-up" not in runs[2] and "capture" not in runs[2] and runs[2].count("f") == runs[0].count("f")


@cuda
def test_solver_graphs_take_a_map_that_syncs():
    """graph="solver" runs f eagerly: a map with a host sync (which no capture of f allows) is fine."""
    w = 0.5 * torch.eye(8, device="cuda")

    def syncing(z):
        return torch.tanh(z @ w) * float(z.abs().sum().item() * 0 + 1)

    x0 = torch.ones(2, 8, device="cuda")
    eager = fixedpoint.anderson(syncing, x0, tol=1e-30, max_iter=30, divergence=None)
    graphed = fixedpoint.anderson(syncing, x0, tol=1e-30, max_iter=30, divergence=None, graph="solver")
    assert graphed.nfev == eager.nfev and torch.equal(graphed.nsteps, eager.nsteps)
    torch.testing.assert_close(graphed.x, eager.x, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("graph", [False, "solver"])
def test_lagged_check_on_gpu_runs_the_iterations_it_runs_on_cpu(graph):
    """check_every >= 2 reads the count one iteration late through pinned memory and an event on CUDA,
    a plain copy on CPU: the same iterations either way, so the same calls of f."""
    runs = {}
    for device in ("cpu", "cuda"):
        gen = torch.Generator().manual_seed(1)
        w = torch.randn(64, 64, generator=gen, dtype=torch.float64)
        w = (0.8 * w / torch.linalg.matrix_norm(w, ord=2)).to(device)
        b = torch.randn(6, 64, generator=gen, dtype=torch.float64).to(device)
        options = {"graph": graph} if device == "cuda" else {}
        f = partial(lambda z, w, b: torch.tanh(z @ w.T + b), w=w, b=b)
        runs[device] = fixedpoint.anderson(f, torch.zeros_like(b), tol=1e-8, max_iter=200, check_every=4, **options)
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu.nfev == cpu.nfev and gpu.nsteps.tolist() == cpu.nsteps.tolist() and gpu.converged.all()
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=1e-9, atol=1e-10)


def _assert_same_solve(sol, reference):
    """The same iterations; values to rounding (a graph's Anderson solves its small systems by plain tensor
    ops, not LAPACK: on the sample without a fixed point the two drift apart by ~3e-5 in 40 iterations)."""
    assert sol.nfev == reference.nfev
    assert sol.nsteps.tolist() == reference.nsteps.tolist() and sol.status.tolist() == reference.status.tolist()
    torch.testing.assert_close(sol.x, reference.x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sol.fx, reference.fx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sol.trace, reference.trace, rtol=1e-4, atol=1e-9, equal_nan=True)


@pytest.fixture(params=STAND_INS, ids=lambda cls: cls.__name__)
def kept_graphs(monkeypatch, request):
    """Each stand-in for CUDA graphs in turn, with an empty cache of graph="solver" sessions."""
    graphs = request.param()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)  # the cache is emptied around every test (conftest)
    return graphs


@pytest.mark.parametrize(
    "solver,options",
    [
        ("anderson", {"m": 3}),
        ("picard", {"beta": 0.8}),
        ("anderson", {"m": 3, "beta": "auto"}),
        ("picard", {"beta": "auto"}),
    ],
)
@pytest.mark.parametrize("first_shift", [True, False])  # the first solve runs to max_iter, or stops mid-period
def test_solver_graphs_are_kept_for_later_solves_of_any_map(kept_graphs, solver, options, first_shift):
    """A later solve with the same solver, shapes and options replays the kept graphs (no warm-up, no
    capture but of positions not yet captured), for another f and start: the same iterations as the
    eager loop, and bit for bit the result of a solve with nothing kept. The earlier result is its own
    copy, untouched."""
    solve = getattr(fixedpoint, solver)
    solves = [(1, None, first_shift), (2, 9, True), (3, None, True)]  # seed, NaN from call, shift

    def run(seed, nan_after, shift, **graph):  # without the shift, a fast contraction: it converges mid-period
        f, x0 = _contraction_map(seed, nan_after=nan_after, shift=shift, rate=0.9 if shift else 0.05)
        return solve(f, x0, tol=1e-6, max_iter=40, **options, **graph)

    fresh = []
    for args in solves:
        _graphs.clear_graph_cache()
        fresh.append(run(*args, graph="solver"))
    _graphs.clear_graph_cache()
    captures = kept_graphs.captures
    kept = [run(*solves[0], graph="solver")]
    first, captured = kept[0].x.clone(), kept_graphs.captures - captures
    kept += [run(*args, graph="solver") for args in solves[1:]]
    period, warmup = (6, 3) if solver == "anderson" else (2, 1)
    assert captured == min(period, int(kept[0].nsteps.max()) - warmup)  # positions reached in the first solve
    assert kept_graphs.captures - captures == period  # each position once, over the three solves
    # Picard's period of 2 is full after its 2nd graph iteration; beta="auto" damps the fast contraction (longer)
    if not first_shift and solver == "anderson" and "beta" not in options:
        assert 0 < captured < period  # the first solve stopped mid-period
    for sol, reference, eager in zip(kept, fresh, (run(*args) for args in solves)):
        assert (
            sol.nfev == eager.nfev and torch.equal(sol.nsteps, eager.nsteps) and torch.equal(sol.status, eager.status)
        )
        for name in ("x", "fx", "residual", "nsteps", "status", "trace"):
            assert torch.equal(getattr(sol, name).nan_to_num(), getattr(reference, name).nan_to_num()), name
    assert torch.equal(kept[0].x, first)


class _NewTensors(TorchDispatchMode):
    """The shapes of the tensors aten ops allocate (outputs that are neither views nor an argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            given = {id(t) for t in tree_leaves((args, kwargs))}
            made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and id(t) not in given]
            self.shapes += [tuple(t.shape) for t in made]
        return out


def test_a_kept_solve_starts_in_the_kept_buffers(kept_graphs):
    """A later solve writes its start where the kept graphs read: no second Anderson history (reinit
    zeroes the kept one in place), no new best pair or accounting tensors. The first solve allocates them."""
    batch, dim, m = 5, 12, 3
    runs = []
    for seed in (1, 2):
        f, x0 = _contraction_map(seed, batch=batch, dim=dim)
        with _NewTensors() as new:
            runs.append(fixedpoint.anderson(f, x0, m=m, tol=1e-6, max_iter=30, graph="solver"))
        trace_shape = (31, batch)
        counts = [new.shapes.count(shape) for shape in ((batch, m, dim), trace_shape)]
        assert counts == ([2 + 2, 1] if seed == 1 else [0, 0]), (seed, counts)  # init's F, G, then the static copies
    _graphs.clear_graph_cache()
    _assert_same_solve(runs[1], fixedpoint.anderson(f, x0, m=m, tol=1e-6, max_iter=30, graph="solver"))


def test_solver_graphs_are_kept_per_key_and_cleared(kept_graphs):
    """A session is kept per key (another tolerance or batch size: another session, its own pool) and replayed by
    a later solve with its key; clear_graph_cache drops them all (the next solve captures again)."""
    f, x0 = _contraction_map(1)
    fixedpoint.picard(f, x0, tol=1e-6, max_iter=30, graph="solver")
    fixedpoint.picard(f, x0, tol=1e-5, max_iter=30, graph="solver")  # another tolerance: another session
    fixedpoint.picard(*_contraction_map(1, batch=6), tol=1e-6, max_iter=30, graph="solver")  # another batch
    assert kept_graphs.captures == 6 and len(kept_graphs.pools) == 3
    fixedpoint.picard(f, x0, tol=1e-5, max_iter=30, graph="solver")
    assert kept_graphs.captures == 6
    _graphs.clear_graph_cache()
    fixedpoint.picard(f, x0, tol=1e-5, max_iter=30, graph="solver")
    assert kept_graphs.captures == 8 and len(kept_graphs.pools) == 4


def test_solver_graphs_survive_a_failed_solve_and_a_nested_one(kept_graphs):
    """A solve whose f raises drops the session it used (its buffers are half-updated); a solve inside f
    with the same key builds its own while the outer one holds the kept session."""
    f, x0 = _contraction_map(1)
    opts = dict(tol=1e-6, max_iter=30, m=2)
    fixedpoint.anderson(f, x0, graph="solver", **opts)

    def failing(z):
        if failing.calls == 4:
            raise RuntimeError("f failed")
        failing.calls += 1
        return f(z)

    failing.calls = 0
    with pytest.raises(RuntimeError, match="f failed"):
        fixedpoint.anderson(failing, x0, graph="solver", **opts)
    assert not _graphs._graph_cache  # dropped
    g, y0 = _contraction_map(2)

    def nested(z):  # an inner solve of the same key inside f
        inner = fixedpoint.anderson(g, y0, graph="solver", **opts)
        return f(z) + 0 * inner.x

    captures = kept_graphs.captures
    _assert_same_solve(fixedpoint.anderson(nested, x0, graph="solver", **opts), fixedpoint.anderson(f, x0, **opts))
    period = 2 * opts["m"] // math.gcd(2, opts["m"])
    # two sessions: the one the first inner solve (inside the outer start's call of f) built and the outer solve
    # then took, and the one the later inner solves built and shared while the outer solve held the first
    assert kept_graphs.captures - captures == 2 * period
    _assert_same_solve(fixedpoint.anderson(g, y0, graph="solver", **opts), fixedpoint.anderson(g, y0, **opts))


def test_a_map_that_fails_at_the_start_leaves_the_kept_session(kept_graphs):
    """f is called at the start before a kept session is taken: a solve whose f fails there (or returns a
    wrong shape) wrote nothing into the session, which stays kept, and the next solve captures nothing."""
    f, x0 = _contraction_map(1)
    opts = dict(tol=1e-6, max_iter=30, m=2)
    fixedpoint.anderson(f, x0, graph="solver", **opts)
    captures = kept_graphs.captures

    def failing(z):
        raise RuntimeError("f failed")

    with pytest.raises(RuntimeError, match="f failed"):
        fixedpoint.anderson(failing, x0, graph="solver", **opts)
    with pytest.raises(ValueError, match="f changed the shape"):
        fixedpoint.anderson(lambda z: z[:, :3], x0, graph="solver", **opts)
    assert len(_graphs._graph_cache) == 1
    _assert_same_solve(fixedpoint.anderson(f, x0, graph="solver", **opts), fixedpoint.anderson(f, x0, **opts))
    assert kept_graphs.captures == captures


def test_kept_solver_graphs_do_not_keep_f_alive(kept_graphs):
    """f is never captured: a kept session holds no reference to it (f and what it closes over, a model's
    weights, would otherwise stay in memory until the session is dropped)."""
    import gc
    import weakref

    f, x0 = _contraction_map(1)
    fixedpoint.anderson(f, x0, tol=1e-6, max_iter=30, graph="solver")
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None and len(_graphs._graph_cache) == 1


def test_solver_graphs_kept_in_inference_mode_serve_only_inference_mode(kept_graphs):
    """Buffers made under torch.inference_mode() cannot be written outside it: the mode is part of the key."""
    f, x0 = _contraction_map(1)
    with torch.inference_mode():
        inside = fixedpoint.anderson(f, x0, tol=1e-6, max_iter=30, graph="solver")
    outside = fixedpoint.anderson(f, x0, tol=1e-6, max_iter=30, graph="solver")
    assert len(_graphs._graph_cache) == 2 and torch.equal(inside.x, outside.x)


def test_dropped_graph_sessions_are_freed_at_once(kept_graphs):
    """No reference cycle: clearing (or evicting) a session frees its graphs and buffers (Anderson's history in the
    static buffers included) without waiting for the garbage collector."""
    import gc
    import weakref

    x0, args = _kept_args(1)
    fixedpoint.anderson(_kept_map, x0, args=args, tol=1e-6, max_iter=30, graph="solver")
    (session,) = _graphs._graph_cache.values()
    refs = [weakref.ref(session), weakref.ref(session.static["state.F"])]
    del session
    gc.disable()
    try:
        _graphs.clear_graph_cache()
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_an_unhashable_solver_runs_solver_graphs_without_keeping_them(kept_graphs):
    """A key that cannot be hashed (a solver without __hash__) is a warning and a solve with its own graphs and the
    eager result, not a TypeError from the cache."""

    class Unhashable(fixedpoint._solvers.Picard):
        __hash__ = None

    f, x0 = _contraction_map(1)
    with pytest.warns(UserWarning, match="graph='solver' keeps nothing for later solves: .* unhashable"):
        sol = _solve.solve(Unhashable(beta=0.8), f, x0, tol=1e-6, max_iter=30, stop="rel", divergence=None,
                           graph="solver")  # fmt: skip
    _assert_same_solve(sol, fixedpoint.picard(f, x0, tol=1e-6, max_iter=30, divergence=None, beta=0.8))
    assert not _graphs._graph_cache


@pytest.mark.parametrize("check_every", [1, 3])
def test_a_solve_that_converges_in_the_warm_up_calls_f_as_the_eager_loop(kept_graphs, check_every):
    """The warm-up period checks convergence as the eager loop does (m = 5: every sample stops sooner)."""
    eager = fixedpoint.anderson(lambda z: 0.01 * z + 1.0, torch.zeros(3, 4), tol=1e-6, m=5, check_every=check_every)
    graphed = fixedpoint.anderson(lambda z: 0.01 * z + 1.0, torch.zeros(3, 4), tol=1e-6, m=5, graph="solver",
                                  check_every=check_every)  # fmt: skip
    assert graphed.nfev == eager.nfev and int(eager.nsteps.max()) < 5 and not _graphs._graph_cache


def test_solver_graphs_refuse_a_step_that_calls_f(kept_graphs):
    """f is never captured: a solver whose step calls it would replay the first solve's f later."""

    class CallingPicard(fixedpoint._solvers.Picard):
        def step(self, fn, state, active, frozen=None):
            fn(state.x)  # e.g. a Jacobian-vector product
            return super().step(fn, state, active, frozen)

    f, x0 = _contraction_map(1)
    with pytest.raises(RuntimeError, match="the solver's step may not call it"):
        _solve.solve(CallingPicard(), f, x0, tol=1e-6, max_iter=30, stop="rel", divergence=None, graph="solver")


# ----------------------------------------------------------------------------- f's args with kept solver graphs

_KEPT_W = 0.9 * torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(7)))[0]  # f's weights


def _kept_map(z, b, drift, rate):
    """tanh(rate z W^T + b), a contraction; samples with a non-zero drift have no fixed point (z + drift)."""
    return torch.where(drift == 0, torch.tanh(rate * z @ _KEPT_W.T + b), z + drift)


def _kept_args(seed, batch=5, dim=12, nan_sample=None, drift=True):
    """A start and the args of one solve: sample 4 drifts (MAX_ITER), ``nan_sample`` is NaN from the start."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(batch, dim, generator=gen)
    if nan_sample is not None:
        b[nan_sample] = float("nan")
    shift = torch.zeros(batch, 1)
    if drift:
        shift[4] = 0.01
    return torch.randn(batch, dim, generator=gen), (b, shift, 1.0)


class _Inputs(NamedTuple):
    b: torch.Tensor
    drift: torch.Tensor
    rate: float


class _KeptModule(torch.nn.Module):
    """_kept_map with a linear layer and dropout (in train or eval mode)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(12, 12, bias=False)
        self.dropout = torch.nn.Dropout(0.0)

    def forward(self, z, b, drift, rate):
        return torch.where(drift == 0, torch.tanh(self.dropout(self.linear(rate * z)) + b), z + drift)


@pytest.mark.parametrize(
    "solver,options,check_every",
    [("anderson", {"m": 3}, 1), ("anderson", {"m": 3}, 7), ("picard", {"beta": 0.8}, 1), ("picard", {"beta": 0.8}, 7)],
)
def test_solver_graphs_with_args_are_kept_for_later_solves(kept_graphs, solver, options, check_every):
    """f's changing inputs in args (as FixedPoint and FPDM pass them): f runs eagerly on each solve's own args, so
    one session serves later solves with other starts and args, each bit for bit the result of a solve with
    nothing kept and the eager loop's iterations and calls; the earlier result and the caller's tensors are left
    as they were (a kept session that read the first solve's args, or wrote into them, would show here)."""
    solve = getattr(fixedpoint, solver)
    problems = [_kept_args(1), _kept_args(2, nan_sample=2), _kept_args(3, drift=False)]

    def run(x0, args, **graph):
        return solve(_kept_map, x0, args=args, tol=1e-6, max_iter=40, check_every=check_every, **options, **graph)

    fresh = []
    for problem in problems:
        _graphs.clear_graph_cache()
        fresh.append(run(*problem, graph="solver"))
    _graphs.clear_graph_cache()
    captures = kept_graphs.captures
    originals = [[a.clone() for a in args[:2]] for _, args in problems]
    kept = [run(*problems[0], graph="solver")]
    first = kept[0].x.clone()
    kept += [run(*problem, graph="solver") for problem in problems[1:]]
    assert kept_graphs.captures - captures == (6 if solver == "anderson" else 2) and len(_graphs._graph_cache) == 1
    for sol, reference, eager in zip(kept, fresh, (run(*problem) for problem in problems), strict=True):
        assert sol.nfev == eager.nfev and torch.equal(sol.nsteps, eager.nsteps)
        assert torch.equal(sol.status, eager.status)
        for name in ("x", "fx", "residual", "trace"):
            assert torch.equal(getattr(sol, name).nan_to_num(), getattr(reference, name).nan_to_num()), name
    assert [sol.statuses()[2] for sol in kept] == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
    assert [sol.nfev for sol in kept[:2]] == [41, 41]  # a sample runs to max_iter: exactly its calls
    assert torch.equal(kept[0].x, first)
    for (_, args), original in zip(problems, originals):
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(args[:2], original, strict=True))


def test_solver_graphs_are_shared_by_any_f_args_modules_and_autocast(kept_graphs):
    """graph="solver" captures only the solver's own ops: a session is keyed by the solver, its options and the
    start (shape, dtype, device, inference mode), never by f, f's args (values, types, shapes, containers, an
    unhashable value), its modules' train/eval flags, autocast or check_every. A key holding any of them would
    capture anew at every sampling step (whose args change) or, with an unhashable arg, keep nothing with a
    warning; each solve still gives the eager loop's result."""
    x0, args = _kept_args(1)
    module = _KeptModule()
    opts = dict(tol=1e-6, max_iter=30, m=2)
    variants = {
        "the first": (_kept_map, args, {}),
        "another rate": (_kept_map, (*args[:2], 0.8), {}),
        "an int rate": (_kept_map, (*args[:2], 1), {}),
        "another arg shape": (_kept_map, (args[0], args[1].expand(5, 12).clone(), 1.0), {}),
        "another f": (partial(_kept_map), args, {}),
        "a closure, no args": (lambda z: _kept_map(z, *args), None, {}),
        "a named tuple": (lambda z, inputs: _kept_map(z, *inputs), (_Inputs(*args),), {}),
        "a list and a dict": (
            lambda z, bs, extra: _kept_map(z, bs[0], extra["drift"], extra["rate"]),
            ([args[0]], {"drift": args[1], "rate": 1.0}),
            {},
        ),
        "an unhashable arg": (lambda z, b, drift, rate, labels: _kept_map(z, b, drift, rate), (*args, {"a"}), {}),
        "a module": (module, args, {}),
        "its method": (module.forward, args, {}),
        "another check_every": (_kept_map, args, {"check_every": 5}),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "keeps nothing" warning
        for name, (f, a, options) in variants.items():
            if name == "a module":
                module.eval()
            sol = fixedpoint.anderson(f, x0, args=a, graph="solver", **opts, **options)
            _assert_same_solve(sol, fixedpoint.anderson(f, x0, args=a, **opts, **options))
            assert kept_graphs.captures == 2, name  # the first solve's two positions (lcm(m, 2)), then none
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sol = fixedpoint.anderson(module, x0, args=args, graph="solver", **opts)
            eager = fixedpoint.anderson(module, x0, args=args, **opts)
        assert torch.equal(sol.nsteps, eager.nsteps)
        torch.testing.assert_close(sol.x, eager.x, rtol=0, atol=0)
    assert kept_graphs.captures == 2 and len(_graphs._graph_cache) == 1


@pytest.mark.parametrize("solver,m", [("picard", None), ("anderson", 5), ("anderson", 3)])
def test_solver_graphs_make_exactly_a_fixed_budget(kept_graphs, solver, m):
    """A fixed budget of 12 calls (fpdm's fixed_iterations: max_iter = check_every = 11, the lagged check): f runs
    eagerly, so every solve, the one that warms up and captures and the kept ones that go on capturing the
    period's later positions, makes exactly the 12 calls, with the eager loop's result (graph=True's capture made
    up to a period more)."""
    from fpdm.models import fixed_iterations

    options = {} if m is None else {"m": m}
    solve = fixed_iterations(12, getattr(fixedpoint, solver), **options)
    for seed in range(3):
        x0, args = _kept_args(seed)
        graphed, eager = solve(_kept_map, x0, args=args, graph="solver"), solve(_kept_map, x0, args=args)
        assert graphed.nfev == eager.nfev == 12 and torch.equal(graphed.nsteps, eager.nsteps)
        torch.testing.assert_close(graphed.x, eager.x, rtol=0, atol=0)
        torch.testing.assert_close(graphed.fx, eager.fx, rtol=0, atol=0)
    assert kept_graphs.captures == math.lcm(m or 1, 2) and len(_graphs._graph_cache) == 1


def test_kept_solver_graphs_read_weights_changed_in_place_under_autocast(kept_graphs):
    """f runs eagerly under autocast (the graphs hold none of its casts): a later solve sees weights an optimizer
    changed in place, and the solver's ops never autocast, so a session kept under autocast serves a solve
    outside it (no capture) with the eager result."""
    x0, args = _kept_args(1)
    module = _KeptModule()
    solve = partial(fixedpoint.anderson, module, x0, args=args, tol=1e-6, max_iter=20, m=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        solve(graph="solver")
    with torch.no_grad():
        module.linear.weight.mul_(-0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, eager = solve(graph="solver"), solve()
    assert kept_graphs.captures == 2  # both positions in the first solve
    assert torch.equal(kept.nsteps, eager.nsteps)
    torch.testing.assert_close(kept.x, eager.x, rtol=0, atol=0)
    outside = solve(graph="solver")
    assert kept_graphs.captures == 2
    _assert_same_solve(outside, solve())
