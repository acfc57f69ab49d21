"""The CUDA-graph loops (graph=True, graph="solver" and its kept graphs) and the lagged convergence check. On CPU
the loops' logic runs with stand-ins for capture and replay (fixedpoint.testing.EagerGraphs, ReplayedGraphs)."""

import math
from contextlib import nullcontext
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
from fixedpoint.kernels.reference import solve_spd
from fixedpoint.testing import EagerGraphs, ReplayedGraphs


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


GRAPH_LOOPS = [True, "solver"]


STAND_INS = [EagerGraphs, ReplayedGraphs]  # Python reruns at replay / only recorded ops rerun, as on CUDA


@pytest.mark.parametrize("solver,options", [("anderson", {"m": 3}), ("picard", {"beta": 0.8}), ("picard", {})])
@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("graph", GRAPH_LOOPS)
@pytest.mark.parametrize("stand_in", STAND_INS)
def test_graph_loop_gives_the_default_loop_result(monkeypatch, solver, options, check_every, graph, stand_in):
    f, x0, calls = _problem()
    solve = getattr(fixedpoint, solver)
    reference = solve(f, x0, tol=1e-6, max_iter=40, check_every=check_every, **options)
    graphs = stand_in()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    calls[0] = 0
    captured = solve(f, x0, tol=1e-6, max_iter=40, graph=graph, check_every=check_every, **options)
    assert len(graphs.pools) == 1  # one per solve
    if graph == "solver":  # one graph per position in a period of lcm(m, 2); f eager, checked as without graphs
        assert graphs.captures == (6 if solver == "anderson" else 2)
        assert captured.nfev == reference.nfev == calls[0]
    else:
        assert graphs.captures == 1
    assert captured.nsteps.tolist() == reference.nsteps.tolist()
    assert captured.status.tolist() == reference.status.tolist()
    assert Status.NONFINITE in captured.statuses() and Status.MAX_ITER in captured.statuses()
    torch.testing.assert_close(captured.x, reference.x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(captured.residual, reference.residual, rtol=1e-4, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(captured.trace, reference.trace, rtol=1e-4, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("max_iter", [5, 11])
@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_graph_loop_keeps_the_best_iterate_when_the_residual_rises(monkeypatch, max_iter, graph):
    """The lazy best copy across captured chunks: the previous pair is carried from one replay to the next."""
    f, x0, iterates = transient_growth()
    residuals = (f(iterates) - iterates).norm(dim=2)[: max_iter + 1]
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    sol = fixedpoint.picard(f, x0, tol=1e-30, max_iter=max_iter, stop="abs", graph=graph)
    expected = iterates[residuals.argmin(dim=0), torch.arange(x0.shape[0])]
    assert torch.equal(sol.x, expected) and torch.equal(sol.fx, f(expected))


@pytest.mark.parametrize("solver,options", [("anderson", {"m": 1}), ("anderson", {"m": 2}), ("picard", {"beta": 0.9})])
@pytest.mark.parametrize("check_every", [1, 8])
@pytest.mark.parametrize("graph", GRAPH_LOOPS)
@pytest.mark.parametrize("stand_in", STAND_INS)
def test_graph_loop_returns_the_lowest_residual_pair(monkeypatch, solver, options, check_every, graph, stand_in):
    """Whatever the solver, the returned pair is the one with the lowest residual seen (start included),
    including when the best was the previous pair, carried across a replay in the static buffers."""
    f_linear, x0, _ = transient_growth(batch=8, seed=3)

    def f(z):
        return f_linear(z) + 0.3 * torch.sin(3 * z)

    monkeypatch.setattr(_graphs, "GRAPHS", stand_in())
    sol = getattr(fixedpoint, solver)(f, x0, tol=1e-30, max_iter=20, stop="abs", graph=graph, check_every=check_every,
                                      **options)  # fmt: skip
    assert (sol.trace.diff(dim=0) > 0).any(), "the residuals must rise somewhere for this test to mean anything"
    start = (f(x0) - x0).norm(dim=1)
    lowest = torch.minimum(start, sol.trace.nan_to_num(float("inf")).min(dim=0).values)
    assert torch.equal(sol.residual, lowest)
    torch.testing.assert_close(sol.fx, f(sol.x), rtol=0, atol=0)
    torch.testing.assert_close((sol.fx - sol.x).norm(dim=1), sol.residual, rtol=1e-12, atol=0)


@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_graph_loop_stops_early_when_every_sample_converges(monkeypatch, graph):
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    sol = fixedpoint.anderson(lambda z: 0.5 * z + 1.0, torch.zeros(3, 4), tol=1e-6, max_iter=500, graph=graph, m=2)
    assert sol.converged.all() and sol.trace.shape[0] == int(sol.nsteps.max()) < 40
    torch.testing.assert_close(sol.x, torch.full((3, 4), 2.0))
    eager = fixedpoint.anderson(lambda z: 0.5 * z + 1.0, torch.zeros(3, 4), tol=1e-6, max_iter=500, m=2)
    # no call of f after the stop but the rest of a captured chunk (graph=True); none with "solver"
    assert sol.nfev == eager.nfev if graph == "solver" else eager.nfev <= sol.nfev < eager.nfev + 4


@pytest.mark.parametrize("solver,options", [("anderson", {"m": 3}), ("picard", {}), ("picard", {"beta": 0.5})])
@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_graph_loops_never_write_into_what_f_returned(monkeypatch, solver, options, graph):
    """The static buffers are the loop's own copies: an f that keeps its outputs finds them unchanged."""
    f_linear, x0, _ = transient_growth(batch=4, seed=2)
    kept = []

    def f(z):
        out = f_linear(z) + 0.1 * torch.sin(z)
        kept.append((out, out.clone()))
        return out

    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    getattr(fixedpoint, solver)(f, x0, tol=1e-30, max_iter=13, stop="abs", graph=graph, **options)
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
@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_graph_loops_with_triton_kernels_equal_the_eager_loop(monkeypatch, solver, options, graph):
    """The Triton launchers inside both graph loops (the stand-in's, eagerly; on a CPU in the interpreter):
    the same solve as eagerly."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    f_cpu, x0, calls = _problem(batch=5, dim=8, seed=2)
    f, x0 = (lambda z: f_cpu(z.cpu()).to(z.device)), x0.to(device)
    solve = getattr(fixedpoint, solver)
    eager = solve(f, x0, tol=1e-6, max_iter=12, impl="triton", **options)
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    calls[0] = 0
    graphed = solve(f, x0, tol=1e-6, max_iter=12, impl="triton", graph=graph, **options)
    assert graphed.nsteps.tolist() == eager.nsteps.tolist() and graphed.status.tolist() == eager.status.tolist()
    torch.testing.assert_close(graphed.x, eager.x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphed.trace, eager.trace, rtol=1e-5, atol=1e-9, equal_nan=True)


def test_graph_needs_cuda_and_a_graph_capable_solver(monkeypatch):
    with pytest.raises(ValueError, match="graph=True captures a CUDA graph and needs CUDA tensors, got x0 on cpu"):
        fixedpoint.anderson(lambda z: z, torch.zeros(2, 3), graph=True)
    with pytest.raises(ValueError, match="graph must be False, True or 'solver', got 'yes'"):
        fixedpoint.picard(lambda z: z, torch.zeros(2, 3), graph="yes")
    with pytest.raises(TypeError, match=r"graph must be a bool or 'solver', got 1 \(int\)"):
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
@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_cuda_graph_equals_the_default_loop_on_gpu(solver, graph):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 256, device="cuda", generator=gen)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    injections = torch.randn(2, 16, 8, 256, device="cuda", generator=gen)
    solve = getattr(fixedpoint, solver)
    x0 = torch.zeros(16, 8, 256, device="cuda")
    results = []
    for b in (injections[0], injections[1], injections[0]):  # "solver": later solves replay the kept graphs
        f = partial(lambda z, b: torch.tanh(z @ w.T + b), b=b)
        eager = solve(f, x0, tol=1e-5, max_iter=80)
        graphed = solve(f, x0, tol=1e-5, max_iter=80, graph=graph, check_every=5)
        assert graphed.nsteps.tolist() == eager.nsteps.tolist() and graphed.status.tolist() == eager.status.tolist()
        torch.testing.assert_close(graphed.x, eager.x, rtol=1e-4, atol=1e-5)
        results.append(graphed.x)
    assert not torch.equal(results[0], results[1])
    torch.testing.assert_close(results[2], results[0], rtol=1e-6, atol=1e-7)  # a kept solve, a fresh one


@cuda
@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_kept_cuda_graph_with_args_equals_the_default_loop_on_gpu(solver):
    """graph=True with the injection passed as an arg: one capture, replayed by the later solves with other
    injections, each equal to the eager loop; the caller's injections are never written."""
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
        graphed = solve(block, x0, args=(b,), tol=1e-5, max_iter=80, graph=True, check_every=5)
        assert graphed.nsteps.tolist() == eager.nsteps.tolist() and graphed.status.tolist() == eager.status.tolist()
        torch.testing.assert_close(graphed.x, eager.x, rtol=1e-4, atol=1e-5)
    assert len(_graphs._graph_cache) == 1 and torch.equal(injections, original)


@cuda
def test_cuda_graph_rejects_a_map_that_syncs():
    w = 0.5 * torch.eye(8, device="cuda")

    def syncing(z):  # .item() copies to the host: not allowed while a graph is being captured
        return torch.tanh(z @ w) * float(z.abs().sum().item() * 0 + 1)

    x0 = torch.ones(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="f must be capturable"):  # tol unreachable: the capture happens
        fixedpoint.anderson(syncing, x0, graph=True, tol=1e-30, max_iter=30, divergence=None)


@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_every_graph_solve_warms_up_before_capture(monkeypatch, graph):
    """Each solve runs its first period eagerly (new kernel specializations compile there, never in capture)."""
    graphs = EagerGraphs()
    warmups = []
    graphs.warmup_stream = lambda device: warmups.append(device) or nullcontext()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    f, x0, _ = _problem()
    for beta in (1.0, 0.5):
        fixedpoint.picard(f, x0, tol=1e-6, max_iter=20, graph=graph, beta=beta)
    assert len(warmups) == 2 and graphs.captures == (2 if graph is True else 4)


@cuda
def test_solver_graphs_take_a_map_that_syncs():
    """graph="solver" runs f eagerly: a map with a host sync (which graph=True rejects) is fine."""
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


@pytest.mark.parametrize("solver,options", [("anderson", {"m": 3}), ("picard", {"beta": 0.8})])
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
    if not first_shift and solver == "anderson":  # Picard's period of 2 is full after its 2nd graph iteration
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


@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_dropped_graph_sessions_are_freed_at_once(kept_graphs, graph):
    """No reference cycle: clearing (or evicting) a session frees its graphs and buffers without waiting
    for the garbage collector."""
    import gc
    import weakref

    x0, args = _kept_args(1)
    fixedpoint.anderson(_kept_map, x0, args=args, tol=1e-6, max_iter=30, graph=graph)
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


# ----------------------------------------------------------------------------- graph=True kept (f's args declared)

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


@pytest.mark.parametrize(
    "solver,options,check_every,chunk",  # chunk: check_every, at least 4, rounded up to whole periods
    [("anderson", {"m": 3}, 1, 6), ("anderson", {"m": 3}, 7, 9), ("picard", {"beta": 0.8}, 1, 4),
     ("picard", {"beta": 0.8}, 7, 7)],
)  # fmt: skip
def test_graph_true_with_args_is_kept_for_later_solves(kept_graphs, solver, options, check_every, chunk):
    """graph=True with f's changing inputs in args: one capture serves later solves with other starts and
    args (no warm-up, no capture), each bit for bit the result of a solve with nothing kept and the eager
    loop's iterations, in whole chunks while they fit within max_iter and eagerly after; the earlier
    result and the caller's tensors are left as they were."""
    solve = getattr(fixedpoint, solver)
    problems = [_kept_args(1), _kept_args(2, nan_sample=2), _kept_args(3, drift=False)]

    def run(x0, args, **graph):
        return solve(_kept_map, x0, args=args, tol=1e-6, max_iter=40, check_every=check_every, **options, **graph)

    fresh = []
    for problem in problems:
        _graphs.clear_graph_cache()
        fresh.append(run(*problem, graph=True))
    _graphs.clear_graph_cache()
    captures = kept_graphs.captures
    originals = [[a.clone() for a in args[:2]] for _, args in problems]
    kept = [run(*problems[0], graph=True)]
    first = kept[0].x.clone()
    kept += [run(*problem, graph=True) for problem in problems[1:]]
    assert kept_graphs.captures - captures == 1 and len(_graphs._graph_cache) == 1
    for sol, reference, eager in zip(kept, fresh, (run(*problem) for problem in problems)):
        assert torch.equal(sol.nsteps, eager.nsteps) and torch.equal(sol.status, eager.status)
        for name in ("x", "fx", "residual", "trace"):
            assert torch.equal(getattr(sol, name).nan_to_num(), getattr(reference, name).nan_to_num()), name
    assert [sol.statuses()[2] for sol in kept] == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
    assert kept[0].nfev == fresh[0].nfev
    for sol in kept[1:]:  # the start's call, then whole chunks, checked after each, up to max_iter
        assert sol.nfev - 1 == min(chunk * math.ceil(int(sol.nsteps.max()) / chunk), 40)
    assert [sol.nfev for sol in kept[:2]] == [41, 41]  # a sample runs to max_iter: exactly its calls
    assert torch.equal(kept[0].x, first)
    for (_, args), original in zip(problems, originals):
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(args[:2], original, strict=True))


def test_graph_true_is_kept_per_f_args_and_options(kept_graphs):
    """The key: f itself, the non-tensor args by type and value, the tensor args' shapes, the start's shape
    (f's view of it), the chunk, the numerics settings, the options, and the train/eval flags of f's modules.
    Without args (f may read anything), graph=True keeps nothing."""
    x0, args = _kept_args(1)
    opts = dict(tol=1e-6, max_iter=30, m=2)

    def captures_of(f=_kept_map, x=x0, a=args, **options):
        before = kept_graphs.captures
        fixedpoint.anderson(f, x, args=a, graph=True, **{**opts, **options})
        return kept_graphs.captures - before

    assert captures_of() == 1 and captures_of() == 0
    assert captures_of(a=(*args[:2], 0.8)) == 1  # another rate: baked into the graph
    assert captures_of(a=(*args[:2], 1)) == 1  # 1 == 1.0, but another type
    assert captures_of(a=(args[0], args[1].expand(5, 12).clone(), 1.0)) == 1  # another shape
    assert captures_of(f=partial(_kept_map)) == 1  # another f
    assert captures_of(tol=1e-5) == 1
    _graphs.clear_graph_cache()
    for shape in ((5, 12), (5, 3, 4)):  # f's view of the same flat iterate: a softmax over its last dimension
        assert captures_of(f=_view_map, x=x0.view(shape), a=(args[0],)) == 1
        eager = fixedpoint.anderson(_view_map, x0.view(shape), args=(args[0],), **opts)
        kept = fixedpoint.anderson(_view_map, x0.view(shape), args=(args[0],), graph=True, **opts)
        torch.testing.assert_close(kept.x, eager.x, rtol=0, atol=0)
    assert captures_of(check_every=5) == 1 and captures_of(check_every=6) == 0  # chunks of 6 (m = 2), either way
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert captures_of() == 1
    torch.set_float32_matmul_precision("medium")
    try:
        assert captures_of() == 1
    finally:
        torch.set_float32_matmul_precision("highest")
    assert len(_graphs._graph_cache) == _graphs.GRAPH_CACHE_SIZE  # the least recently used were dropped
    assert captures_of(check_every=5) == 0  # still kept
    _graphs.clear_graph_cache()
    module = _KeptModule()
    assert captures_of(f=module) == 1 and captures_of(f=module.forward) == 1  # a module, a module's method
    module.eval()
    assert captures_of(f=module) == 1 and captures_of(f=module.forward) == 1  # dropout captured in eval
    closure = lambda z: _kept_map(z, *args)  # noqa: E731
    for _ in range(2):
        assert captures_of(f=closure, a=None) == 1
    assert all(key[1] is True or key[1] == "solver" for key in _graphs._graph_cache)
    assert not any(closure in key for key in _graphs._graph_cache)


class _Inputs(NamedTuple):
    b: torch.Tensor
    drift: torch.Tensor
    rate: float


_PACKINGS = {  # f's args (b, drift, rate) in containers, and the f that unpacks them
    "list and dict": (
        lambda b, drift, rate: ([b], {"drift": drift, "rate": rate}),
        lambda z, bs, extra: _kept_map(z, bs[0], extra["drift"], extra["rate"]),
    ),
    "named tuple": (lambda b, drift, rate: (_Inputs(b, drift, rate),), lambda z, inputs: _kept_map(z, *inputs)),
}


@pytest.mark.parametrize("packing", _PACKINGS)
def test_graph_true_copies_the_tensors_nested_in_args(kept_graphs, packing):
    """Tensors inside tuples, named tuples, lists and dicts in args are copied in like top-level ones: one
    capture serves later solves with other values, each the result of a solve with nothing kept; the
    caller's tensors are left as they were."""
    pack, f = _PACKINGS[packing]
    problems = [_kept_args(1), _kept_args(2, nan_sample=2), _kept_args(3, drift=False)]
    opts = dict(tol=1e-6, max_iter=40, m=3)
    fresh = []
    for x0, args in problems:
        _graphs.clear_graph_cache()
        fresh.append(fixedpoint.anderson(_kept_map, x0, args=args, graph=True, **opts))
    _graphs.clear_graph_cache()
    originals = [[a.clone() for a in args[:2]] for _, args in problems]
    captures = kept_graphs.captures
    kept = [fixedpoint.anderson(f, x0, args=pack(*args), graph=True, **opts) for x0, args in problems]
    assert kept_graphs.captures - captures == 1 and len(_graphs._graph_cache) == 1
    for sol, reference in zip(kept, fresh, strict=True):
        assert torch.equal(sol.nsteps, reference.nsteps) and torch.equal(sol.status, reference.status)
        assert torch.equal(sol.x.nan_to_num(), reference.x.nan_to_num())
    for (_, args), original in zip(problems, originals):
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(args[:2], original, strict=True))


def test_the_args_signature_sees_into_containers_and_matches_nan():
    """What a kept graph=True session is keyed by: tensors by shape, dtype and device wherever they sit in
    tuples, lists and dicts; containers by type and keys; other values by type and value, NaN matching NaN."""
    sig = _graphs.arg_signature
    b = torch.zeros(2, 3)
    assert sig(([b], {"r": 1.0})) == sig(([torch.ones(2, 3)], {"r": 1.0}))
    assert sig(([b], {"r": 1.0})) != sig(([b.T], {"r": 1.0}))  # another shape
    assert sig(([b], {"r": 1.0})) != sig(((b,), {"r": 1.0}))  # a tuple, not a list
    assert sig(([b], {"r": 1.0})) != sig(([b], {"s": 1.0}))  # another key
    assert sig(([b], {"r": 1.0})) != sig(([b.double()], {"r": 1.0}))  # another dtype
    assert sig((float("nan"),)) == sig((float("nan"),))
    assert sig((_Inputs(b, b, 1.0),)) != sig(((b, b, 1.0),))  # a named tuple is its own type
    assert [t.shape for t in _graphs.arg_tensors((b, [b.T], {"k": b[0]}, _Inputs(b[:1], b, 0.5)))] == [
        (2, 3), (3, 2), (3,), (1, 3), (2, 3)
    ]  # fmt: skip


def test_args_holding_an_unhashable_value_keep_nothing_and_warn(kept_graphs):
    """A value graph=True cannot key a session by (here a set): a warning, each solve captures its own graph,
    and its result is still the eager loop's."""
    x0, args = _kept_args(1)

    def f(z, b, drift, rate, labels):
        return _kept_map(z, b, drift, rate)

    for _ in range(2):
        with pytest.warns(UserWarning, match="unhashable"):
            graphed = fixedpoint.anderson(f, x0, args=(*args, {"a"}), tol=1e-6, max_iter=30, m=2, graph=True)
    eager = fixedpoint.anderson(_kept_map, x0, args=args, tol=1e-6, max_iter=30, m=2)
    assert kept_graphs.captures == 2 and not _graphs._graph_cache
    assert torch.equal(graphed.nsteps, eager.nsteps) and torch.equal(graphed.status, eager.status)
    torch.testing.assert_close(graphed.x, eager.x, rtol=1e-4, atol=1e-5)


def _view_map(z, b):
    return 0.5 * z.softmax(-1) + b.view_as(z)


class _KeptModule(torch.nn.Module):
    """_kept_map with a linear layer and dropout (captured as it runs: in train or eval mode)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(12, 12, bias=False)
        self.dropout = torch.nn.Dropout(0.0)

    def forward(self, z, b, drift, rate):
        return torch.where(drift == 0, torch.tanh(self.dropout(self.linear(rate * z)) + b), z + drift)


def test_chunks_are_check_every_iterations_in_whole_periods_within_max_iter():
    assert [_graphs.chunk_length(1, c, 50) for c in (1, 4, 5, 11)] == [4, 4, 5, 11]
    assert [_graphs.chunk_length(5, c, 50) for c in (1, 5, 6, 11)] == [5, 5, 10, 15]
    assert [_graphs.chunk_length(5, 11, n) for n in (15, 14, 11, 7, 3)] == [15, 10, 10, 5, 5]
    assert [_graphs.chunk_length(1, 11, n) for n in (11, 3, 1)] == [11, 3, 1]


@pytest.mark.parametrize("solver,m,calls", [("picard", None, [13, 12, 12]), ("anderson", 5, [16, 12, 12]),
                                            ("anderson", 3, [13, 12, 12])])  # fmt: skip
def test_a_kept_graph_makes_exactly_a_fixed_budget(kept_graphs, solver, m, calls):
    """A fixed budget of 12 calls (max_iter = check_every = 11): the solve that captures runs one period
    eagerly and replays a whole chunk past max_iter; kept solves replay whole chunks within max_iter and run
    the rest eagerly, making exactly the 12 calls, as the eager loop does, with its result."""
    from fpdm.models import fixed_iterations

    options = {} if m is None else {"m": m}
    solve = fixed_iterations(12, getattr(fixedpoint, solver), **options)
    runs = []
    for seed in range(3):
        x0, args = _kept_args(seed)
        graphed, eager = solve(_kept_map, x0, args=args, graph=True), solve(_kept_map, x0, args=args)
        torch.testing.assert_close(graphed.x, eager.x, rtol=0, atol=0)
        assert torch.equal(graphed.nsteps, eager.nsteps) and eager.nfev == 12
        runs.append(graphed.nfev)
    assert runs == calls and kept_graphs.captures == 1


@pytest.mark.parametrize("graph", GRAPH_LOOPS)
def test_a_kept_graph_reads_weights_changed_in_place_under_autocast(kept_graphs, graph):
    """Under autocast, graph=True warms up and captures with autocast's cache of cast weights off: the graph
    casts the weights itself, so a later solve sees weights an optimizer changed in place."""
    x0, args = _kept_args(1)
    module = _KeptModule()
    solve = partial(fixedpoint.anderson, module, x0, args=args, tol=1e-6, max_iter=20, m=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        solve(graph=graph)
    with torch.no_grad():
        module.linear.weight.mul_(-0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, eager = solve(graph=graph), solve()
    assert kept_graphs.captures == (1 if graph is True else 2)  # graph="solver": both positions in the first solve
    assert torch.equal(kept.nsteps, eager.nsteps)
    torch.testing.assert_close(kept.x, eager.x, rtol=0, atol=0)
    outside = solve(graph=graph)  # graph=True: autocast is in the key, a capture; graph="solver": the solver's
    assert kept_graphs.captures == 2  # ops never autocast, so its session serves both (no capture)
    _assert_same_solve(outside, solve())


def test_kept_graph_true_keeps_f_alive_until_cleared(kept_graphs):
    """Its graph replays f (reading f's weights where they were): the key keeps f, until dropped."""
    import gc
    import weakref

    x0, args = _kept_args(1)

    def f(z, b, drift, rate):
        return _kept_map(z, b, drift, rate)

    fixedpoint.picard(f, x0, args=args, tol=1e-6, max_iter=30, graph=True)
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is not None
    _graphs.clear_graph_cache()
    gc.collect()
    assert ref() is None
