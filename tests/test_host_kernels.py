"""The CPU path's NumPy bookkeeping (fixedpoint.kernels.host) against the pure PyTorch twins: bit for bit."""

import math

import pytest
import torch

import fixedpoint
from fixedpoint import Status
from fixedpoint.kernels import host, reference, resolve
from fixedpoint.kernels.groups import LoopBuffers, Pair, StopRule


def _bookkeep_inputs(batch: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    gsq = torch.rand(batch, generator=gen, dtype=dtype) * 1e-2
    fsq = torch.rand(batch, generator=gen, dtype=dtype) + 0.5
    gsq[3], gsq[5], gsq[6], fsq[6], fsq[8] = math.nan, math.inf, 0.0, 0.0, math.inf  # NaN, inf, 0/0, inf image
    gsq[10], fsq[10] = 1e-7, 1e-12  # relative: below the floor, divided by 1e-3 of the start's residual
    gnorm0 = torch.rand(batch, generator=gen, dtype=dtype)
    gnorm0[7], gsq[7] = 1e-9, 4.0  # diverged
    gnorm0[6] = 0.0  # a fixed point at 0 from the start: 0 / max(0, 0) is 0 / tiny
    status = torch.randint(0, 4, (batch,), generator=gen)
    status[:20] = Status.MAX_ITER
    active = status == Status.MAX_ITER
    active[1] = False
    best = torch.rand(batch, generator=gen, dtype=dtype) * 0.05
    best[9] = math.nan  # a NaN start: any finite residual improves on it
    pending = torch.rand(batch, generator=gen) < 0.5
    nsteps = torch.randint(0, 5, (batch,), generator=gen)
    trace = torch.full((6, batch), math.nan, dtype=dtype)
    return gsq, fsq, gnorm0, status, active, best, pending, nsteps, trace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("divergence", [50.0, math.inf])
@pytest.mark.parametrize("graph_row", [False, True])  # the trace row from the device counter, stop at max_iter
def test_host_bookkeep_equals_the_twin_bit_for_bit(dtype, relative, divergence, graph_row):
    """Catches: a NumPy rounding that differs from PyTorch's (its float32 sqrt differs in the last bit on
    ~20% of inputs), a NaN/inf/0 residual classified otherwise (NumPy's comparisons and where on NaN),
    the in-place updates (status, best residual, steps, trace row, pending) not written through the views,
    and counts that disagree with the flags."""
    inputs = _bookkeep_inputs(64, dtype, seed=int(relative) + 2 * int(graph_row))
    results = []
    for module in (reference, host):
        gsq, fsq, gnorm0, status, active, best, pending, nsteps, trace = (t.clone() for t in inputs)
        done = torch.tensor(2 if graph_row else 0)
        row = None if graph_row else 2
        loop = LoopBuffers(gnorm0, status, best, pending, nsteps, trace, done, best_x=None, best_fx=None)
        out = module.bookkeep(gsq, fsq, active, loop, StopRule(1e-2, 5, relative, divergence), row)
        results.append([*out, status, best, pending, nsteps, trace, done])
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    _, new_active, take, counts, status = results[1][:5]
    assert set(take.tolist()) == {0, 1, 2} and int(counts[1]) == int((take != 0).sum())
    assert {int(s) for s in status[:20]} >= {Status.CONVERGED, Status.MAX_ITER, Status.NONFINITE}
    assert int(counts[0]) == int(new_active.sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_host_best_update_equals_the_twin(dtype):
    """Catches: rows copied from the wrong pair, an aliased x = prev (the loop's finish passes the same
    tensors twice) read after being overwritten, or bf16 (no NumPy dtype) failing instead of using the twin."""
    gen = torch.Generator().manual_seed(3)
    bx, bf, x, fx, px, pf = (torch.randn(4, 9, generator=gen).to(dtype) for _ in range(6))
    take = torch.tensor([0, 1, 2, 1], dtype=torch.int8)
    unused = dict.fromkeys(("gnorm0", "status", "best_res", "pending", "nsteps", "trace", "done"))
    for new, prev in ((Pair(x, fx), Pair(px, pf)), (Pair(px, pf), Pair(px, pf))):  # (finish: the last pair is both)
        got, expected = (bx.clone(), bf.clone()), (bx.clone(), bf.clone())
        host.best_update(LoopBuffers(**unused, best_x=got[0], best_fx=got[1]), new, prev, take)
        reference.best_update(LoopBuffers(**unused, best_x=expected[0], best_fx=expected[1]), new, prev, take)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(got[0][1], px[1]) and torch.equal(got[0][0], bx[0])


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden", "newton"])
def test_cpu_solves_with_the_host_path_equal_the_pure_pytorch_ones(solver):
    """Catches: the host path changing any solve on a CPU (iterates, statuses, trace) against impl='torch';
    and 'auto' not picking it for CPU tensors (nor for Newton, which has no impl option)."""
    assert resolve("auto", torch.zeros(2, 3)) is host and resolve("torch", torch.zeros(2, 3)) is reference
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    w *= 0.95 / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    b[4] = math.nan  # one poisoned sample
    f = lambda z: torch.tanh(z @ w.T + b)  # noqa: E731
    run = getattr(fixedpoint, solver)
    if solver == "newton":
        with torch.no_grad():
            from fixedpoint.kernels import default_for

            assert default_for(torch.zeros(1)) is host
        solutions = [run(f, torch.zeros(5, 12, dtype=torch.float64), tol=1e-9, max_iter=40)]
    else:
        solutions = [run(f, torch.zeros(5, 12, dtype=torch.float64), tol=1e-9, max_iter=40, impl=impl)
                     for impl in ("auto", "torch")]  # fmt: skip
        a, t = solutions
        for name in ("x", "fx", "residual", "nsteps", "status", "trace"):
            torch.testing.assert_close(getattr(a, name), getattr(t, name), rtol=0, atol=0, equal_nan=True)
    sol = solutions[0]
    assert sol.statuses()[4] == Status.NONFINITE and (sol.status[:4] == Status.CONVERGED).all()
