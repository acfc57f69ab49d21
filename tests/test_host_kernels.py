"""The CPU path (fixedpoint.kernels.host) against the pure PyTorch twins: the loop's bookkeeping bit for bit,
Anderson's and Broyden's passes up to rounding (flags and counts exactly); when the host path leaves data to the
twins; and what the twins read of Anderson's history (only the slots written)."""

import dataclasses
import math
from dataclasses import fields, replace

import pytest
import torch

import fixedpoint
from fixedpoint import Status
from fixedpoint.kernels import host, reference, resolve
from fixedpoint.kernels.groups import AndersonState, BroydenStep, LoopBuffers, Pair, StopRule, evolve
from fixedpoint.testing import anderson_state, broyden_state


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
    """Catches: the host path changing any solve on a CPU (iterates, statuses, trace) against impl='torch':
    bit for bit where only the bookkeeping is NumPy's, up to rounding for Anderson and Broyden (NumPy's sums and
    LAPACK call), with the same statuses and step counts; and 'auto' not picking it for CPU tensors (nor for Newton,
    which has no impl option)."""
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
        close = dict(rtol=1e-6, atol=1e-13) if solver in ("anderson", "broyden") else dict(rtol=0, atol=0)
        for name in ("x", "fx", "residual", "trace"):
            torch.testing.assert_close(getattr(a, name), getattr(t, name), **close, equal_nan=True)
        assert torch.equal(a.nsteps, t.nsteps) and torch.equal(a.status, t.status)
    sol = solutions[0]
    assert sol.statuses()[4] == Status.NONFINITE and (sol.status[:4] == Status.CONVERGED).all()


def _absorb_state(batch: int, m: int, dtype: torch.dtype, relative: bool, seed: int, singular: bool = False):
    """An Anderson state after a write to slot 2, with every case absorb meets: a blown-up sample, a nearly
    dependent history (weights ~1e3: a restart at max_coeff 50; ``singular``: two equal pairs), a NaN Gram
    entry, slots not in the history."""
    gen = torch.Generator().manual_seed(seed)
    residuals = torch.randn(batch, m, 30, generator=gen, dtype=torch.float64)
    residuals[3, 1] = residuals[3, 0] * (1 + 1e-3)
    gram = (residuals @ residuals.transpose(1, 2)).to(dtype)
    gram[4, 0, 0] = math.nan
    if singular:  # sample 3's slots 0 and 1 hold the same pair
        gram[3, 1], gram[3, :, 1] = gram[3, 0], gram[3, :, 0]
    valid = torch.rand(batch, m, generator=gen) < 0.8
    valid[:, :2] = True
    newest = torch.zeros(batch, m, dtype=torch.bool)
    newest[:, 1] = True
    kept = torch.rand(batch, generator=gen, dtype=dtype)
    gnorm = kept * 2
    gnorm[5] = kept[5] * 500  # blown up (growth 100)
    row = gram[:, 2].clone()
    buffers = dict(gram=gram, valid=valid, newest=newest, kept_gnorm=kept, restarts=torch.arange(batch), row=row)
    if relative:  # the row is (B, 2, m): the new difference's Gram row and the projections of g
        projections = torch.randn(batch, m, generator=gen, dtype=dtype)
        buffers.update(row=torch.stack([row, projections], dim=1), x_kept=torch.zeros(batch, 1),
                       f_kept=torch.zeros(batch, 1), took=torch.zeros(batch, dtype=torch.bool))  # fmt: skip
    F = torch.zeros(batch, m, 1)
    return anderson_state(F, F, 2, **buffers), gnorm


def _absorb_both(dtype: torch.dtype, relative: bool, growth: float | None = 100.0, **options) -> list[list]:
    """The twin's and the host's absorb on the same state: [alpha and the in-place buffers] for each."""
    results = []
    for module in (reference, host):
        state, gnorm = _absorb_state(8, 5, dtype, relative, seed=4)
        alpha = module.anderson_absorb(state, gnorm, growth=growth, max_coeff=50.0, graph_safe=False, **options)
        results.append([alpha, state.gram, state.valid, state.newest, state.kept_gnorm, state.restarts, state.took])
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("growth", [100.0, 1e4, None])  # sample 5 blows up (x 500) only at 100: else the fast path
def test_host_anderson_absorb_equals_the_twin(dtype, relative, growth):
    """Catches: a restart (blown up, ill-conditioned, NaN) or a relative sample handled otherwise than the twin
    (the flags and counts must agree exactly), the fast path for a step where no sample blew up (and for growth
    None) writing other flags than the general one, weights further from the twin's than rounding (the ridge
    added in fp64 where the twin rounds it to fp32, a wrong normalisation), and the in-place buffers (gram,
    valid, newest, kept_gnorm, restarts, took) not written through the views."""
    twin, ours = _absorb_both(dtype, relative, growth, ridge=1e-6)
    for a, b in zip(ours, twin, strict=True):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        exact = not a.is_floating_point() or a is ours[1] or a is ours[4]  # flags, counts, copied Gram and norms
        close = dict(rtol=0, atol=0) if exact else dict(rtol=1e-9 if dtype == torch.float64 else 3e-7, atol=1e-12)
        torch.testing.assert_close(a, b, **close, equal_nan=True)
    restarts = ours[5] - torch.arange(8)
    assert restarts[5] == (growth == 100.0) and restarts[4] == 1  # blown up; NaN Gram entry
    assert relative or restarts[3] == 1  # nearly dependent pairs: ||alpha||_1 > 50
    assert (restarts[[0, 1, 2, 6, 7]] == 0).all()  # the well-posed samples keep their histories


@pytest.mark.parametrize("relative", [False, True])
def test_host_anderson_absorb_survives_an_exactly_singular_system(relative, monkeypatch):
    """Two equal pairs and a ridge below fp32's range (rounded to fp32 it is 0, in both implementations) leave a
    sample's system exactly singular, which NumPy's solve refuses for the whole batch. Catches: that
    LinAlgError escaping, or the fallback (PyTorch's solve) giving other weights or restarts than the twin:
    the singular sample restarts, the others keep their weights."""
    options = dict(growth=100.0, ridge=1e-300, max_coeff=50.0, graph_safe=False)
    twin_state, gnorm = _absorb_state(8, 5, torch.float64, relative, seed=4, singular=True)
    twin = reference.anderson_absorb(twin_state, gnorm, **options)
    solve_ex, fallbacks = torch.linalg.solve_ex, []
    monkeypatch.setattr(torch.linalg, "solve_ex", lambda *a: fallbacks.append(1) or solve_ex(*a))
    state, gnorm = _absorb_state(8, 5, torch.float64, relative, seed=4, singular=True)
    ours = host.anderson_absorb(state, gnorm, **options)
    assert fallbacks  # NumPy refused the batch: PyTorch's solve ran
    torch.testing.assert_close(ours, twin, rtol=1e-9, atol=1e-12, equal_nan=True)
    for name in ("valid", "newest", "restarts"):
        assert torch.equal(getattr(state, name), getattr(twin_state, name)), name
    assert not relative or state.restarts[3] == 3 + 1  # relative: the two differences made it singular


def test_history_slots_not_written_yet_are_never_read():
    """Catches: the twins reading ring slots not written in this solve (a fresh history is not zero-filled on
    the CPU path, so such a slot may hold NaN: 0 * NaN in the Gram row or the mixing would poison the sample)."""
    gen = torch.Generator().manual_seed(5)
    batch, m, dim = 3, 4, 7
    for relative in (False, True):
        F, G = (torch.full((batch, m, dim), math.nan) for _ in range(2))  # uninitialised memory, at worst
        extra = dict(x_kept=torch.zeros(batch, dim), f_kept=torch.zeros(batch, dim), x_new=torch.zeros(batch, dim),
                     f_new=torch.zeros(batch, dim), took=torch.zeros(batch, dtype=torch.bool),
                     row=torch.zeros(batch, 2, m)) if relative else {}  # fmt: skip
        state = replace(anderson_state(F, G, **extra), count=1)  # slot 0 written, slot 1 next
        F[:, 0], G[:, 0] = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
        x, fx = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
        gsq, fsq, row = reference.anderson_residual_write(state, x, fx)
        assert torch.isfinite(row).all() and (row[..., 2:] == 0).all()  # slots 2, 3: not written, rows 0
        alpha = torch.zeros(batch, m)
        alpha[:, :2] = 0.5
        mixed = reference.anderson_mix(replace(state, count=2, alpha=alpha), 1.0, None, None)
        assert torch.isfinite(mixed).all()


def test_fresh_cpu_history_is_not_zero_filled_and_the_solve_is_unchanged(monkeypatch):
    """Catches: the CPU path zero-filling a fresh (B, m, D) history (14 MB per solve at DiT-S size) that it never
    reads before writing, or a solve that changes when that memory holds garbage (the Triton kernels, which read
    every slot, keep the zero fill: READS_UNWRITTEN_SLOTS)."""
    assert not host.READS_UNWRITTEN_SLOTS and not reference.READS_UNWRITTEN_SLOTS
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 16, generator=gen)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(4, 16, generator=gen)
    f = lambda z: torch.tanh(z @ w.T + b)  # noqa: E731
    garbage, sizes = torch.Tensor.new_empty, []

    def poisoned(self, *size, **kwargs):  # every fresh allocation from new_empty filled with NaN
        sizes.append(tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size)
        return garbage(self, *size, **kwargs).fill_(math.nan)

    clean = fixedpoint.anderson(f, torch.zeros(4, 16), m=5, tol=1e-6)
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    dirty = fixedpoint.anderson(f, torch.zeros(4, 16), m=5, tol=1e-6)
    monkeypatch.undo()
    assert sizes.count((4, 5, 16)) == 2  # F and G came from new_empty, NaN-filled: no zero fill
    assert clean.converged.all()
    for name in ("x", "residual", "nsteps", "status", "trace"):
        torch.testing.assert_close(getattr(dirty, name), getattr(clean, name), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dim", [64, 9408])
def test_gram_row_is_as_accurate_as_fp32_allows(dim):
    """The Gram row as (1, D) x (D, m) per sample (on a CPU 14x faster than the (m, D) x (D, 1) product at
    32 x 6 x 9408). Catches: a row further from the fp64 products than fp32 accumulation allows."""
    gen = torch.Generator().manual_seed(7)
    F, G = torch.randn(4, 6, dim, generator=gen), torch.randn(4, 6, dim, generator=gen)
    state = anderson_state(F, G, 2)
    row = reference.anderson_write(state, F[:, 2], G[:, 2])
    exact = (G.double() @ G[:, 2].double()[:, :, None])[..., 0]
    bound = dim * 2**-24 * (G.double().abs() @ G[:, 2].double().abs()[:, :, None])[..., 0]
    assert ((row.double() - exact).abs() <= bound).all()


def test_evolve_is_dataclasses_replace_for_the_groups():
    """``evolve`` (the solvers' per-iteration state update, replace without its __init__ call). Catches: the copy
    sharing the original's field dict (a later evolve or count changing a state the graphs kept), a field that is
    not carried over, a class other than the original's, and a misspelt field silently added (replace raises)."""
    gen = torch.Generator().manual_seed(7)
    F, G = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    state = replace(anderson_state(F, G), count=2, alpha=torch.ones(2, 3))
    alpha = torch.zeros(2, 3)
    evolved, replaced = evolve(state, count=3, alpha=alpha), replace(state, count=3, alpha=alpha)
    assert type(evolved) is AndersonState and evolved is not state
    for field in fields(AndersonState):
        assert getattr(evolved, field.name) is getattr(replaced, field.name), field.name
    assert state.count == 2 and state.alpha.eq(1).all() and evolved.slot == 0  # the original untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolved.count = 4
    with pytest.raises(TypeError, match="cuont"):
        evolve(state, cuont=3)
    pair = BroydenStep(F[:, 0], G[:, 0], torch.ones(2), F[:, 1])  # a NamedTuple group is not a dataclass
    with pytest.raises(TypeError):
        evolve(pair, x=F[:, 2])


def _history_state(batch: int, m: int, dim: int, dtype: torch.dtype, count: int, seed: int) -> AndersonState:
    """An Anderson state with ``count`` pairs written (fewer than m: a ring not full yet) and weights alpha over
    them (0 elsewhere, as the absorb leaves them)."""
    gen = torch.Generator().manual_seed(seed)
    F, G = (torch.randn(batch, m, dim, generator=gen, dtype=dtype) for _ in range(2))
    alpha = torch.rand(batch, m, generator=gen, dtype=dtype)
    alpha[:, min(count, m) :] = 0
    return replace(anderson_state(F, G), count=count, alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [2, 7])  # the ring filling up (slots 0-1 written, 2 next), full (slot 2 next)
def test_host_anderson_residual_write_and_mix_equal_the_twins(dtype, count):
    """Anderson's passes over the history by NumPy (small fp32/fp64 data). Catches: g or f(x) written to another
    slot than the twin's (or not through the views), a Gram row over the wrong slots or not padded with zeros
    for the slots not written yet, norms or products further from the twin's than rounding, the mixing's
    (beta - 1) term dropped, and stopped samples not given ``frozen``."""
    gen = torch.Generator().manual_seed(8)
    x, fx, frozen = (torch.randn(6, 40, generator=gen, dtype=dtype) for _ in range(3))
    active = torch.tensor([True, False, True, True, False, True])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    states = [_history_state(6, 5, 40, dtype, count, seed=9) for _ in range(2)]
    written = [module.anderson_residual_write(state, x, fx) for module, state in zip((reference, host), states)]
    for a, b in zip(*written, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
    assert torch.equal(states[1].F, states[0].F) and torch.equal(states[1].G, states[0].G)  # IEEE: bit for bit
    assert torch.equal(states[1].G[:, count % 5], fx - x) and (written[1][2][:, min(count + 1, 5) :] == 0).all()
    for beta in (1.0, 0.7):
        for stopped in (None, frozen):
            on = None if stopped is None else active
            mixed = [module.anderson_mix(states[0], beta, stopped, on) for module in (reference, host)]
            torch.testing.assert_close(mixed[1], mixed[0], rtol=rtol, atol=rtol)
            assert mixed[1].dtype == dtype and mixed[1].is_contiguous()
    assert torch.equal(mixed[1][~active], frozen[~active])


@pytest.mark.parametrize("case", ["at the bound", "above the bound", "bf16 history", "fp16 data", "fp64 weights"])
def test_host_anderson_passes_leave_large_or_narrow_data_to_the_twins(case, monkeypatch):
    """NumPy up to SMALL_ELEMENTS (B x D) inclusive; above it (PyTorch's threaded ops win), in the difference
    form (a narrower history), for dtypes NumPy cannot hold and for weights in another dtype than the history
    (NumPy's product would come out in theirs), the twins run. Catches: NumPy taking data it would slow down or
    cannot represent (bf16), an off-by-one at the bound, or the bound compared with another size than B x D."""
    dtype, dim = torch.float32, 40
    if case in ("at the bound", "above the bound"):  # B x D = 240; F and G hold 5 x 240
        monkeypatch.setattr(host, "SMALL_ELEMENTS", 6 * dim - (case == "above the bound"))
    if case == "fp16 data":
        dtype = torch.float16
    calls = []
    for name in ("anderson_residual_write", "anderson_mix"):
        original = getattr(reference, name)
        monkeypatch.setattr(
            reference, name, lambda *a, original=original, name=name: calls.append(name) or original(*a)
        )
    gen = torch.Generator().manual_seed(10)
    x, fx = (torch.randn(6, dim, generator=gen).to(dtype) for _ in range(2))
    if case == "bf16 history":
        F, G = (torch.randn(6, 4, dim, generator=gen).bfloat16() for _ in range(2))
        kept = dict(x_kept=x.clone(), f_kept=fx.clone(), took=torch.ones(6, dtype=torch.bool), row=torch.zeros(6, 2, 4))
        state = replace(anderson_state(F, G, **kept), count=2, alpha=torch.rand(6, 4, generator=gen), x_new=x, f_new=fx)
    else:
        state = _history_state(6, 5, dim, dtype, 2, seed=11)
        state = replace(state, alpha=state.alpha.double() if case == "fp64 weights" else state.alpha.float())
    host.anderson_residual_write(state, x, fx)
    mixed = host.anderson_mix(state, 1.0, None, None)
    both = ["anderson_residual_write", "anderson_mix"]
    twins = {"at the bound": [], "fp64 weights": ["anderson_mix"]}.get(case, both)
    assert calls == twins and mixed.dtype == x.dtype


def _broyden_case(dtype: torch.dtype, seed: int):
    """A Broyden state with 3 of 5 slots used (one term dead) and an evaluated step whose update meets every case
    finish meets: sample 1 blows up (its ||g|| x 500), sample 2 has dx = 0 (denominator 0: no term kept),
    sample 3 is NaN."""
    gen = torch.Generator().manual_seed(seed)
    U, V = (torch.randn(6, 5, 40, generator=gen, dtype=dtype) for _ in range(2))
    x, g, dx, hg, x_old, g_old = (torch.randn(6, 40, generator=gen, dtype=dtype) for _ in range(6))
    dx[2] = 0.0
    g[3] = math.nan
    alive = torch.ones(6, 5, dtype=torch.bool)
    alive[0, 1] = False
    gnorm_old = torch.rand(6, generator=gen, dtype=dtype) + 0.5
    gnorm = gnorm_old * 1.5
    gnorm[1] = gnorm_old[1] * 500
    state = broyden_state(U, V, 3, alive, x=x_old, g=g_old, gnorm=gnorm_old, hg=hg, restarts=torch.arange(6))
    return state, BroydenStep(x, g, gnorm, dx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_broyden_kernels_equal_the_twins(dtype):
    """Broyden's three passes by NumPy (small fp32/fp64 data). Catches: V g and U dx swapped or over the wrong
    slots, a dead term weighed in the applies, sums in another order than [dx . H dg, ||dx||^2, ||H dg||^2,
    v . g], u or v written to another slot, a blown-up sample not put back at the state's iterate with H = -I
    (its terms dead, restarts + 1), a zero or NaN denominator keeping a term, and the fast path (no sample blew
    up) returning other iterates than the general one."""
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for blow_up in (True, False):
        results = []
        for module in (reference, host):
            state, new = _broyden_case(dtype, seed=12)
            if not blow_up:
                new = new._replace(gnorm=state.gnorm * 1.5)
            coeff = module.broyden_dots(state, new)
            applies = module.broyden_combine(state, new, coeff)
            out = module.broyden_finish(state, new, applies, growth=100.0)
            results.append([coeff, *applies, out.x, out.g, out.gnorm, out.hg, out.next_x, state.U, state.V,
                            state.alive, state.restarts])  # fmt: skip
            assert out.count == 4
        for a, b in zip(*results, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            exact = not a.is_floating_point()
            torch.testing.assert_close(a, b, rtol=0 if exact else rtol, atol=0 if exact else rtol, equal_nan=True)
        alive, restarts = results[1][-2], results[1][-1] - torch.arange(6)
        assert restarts.tolist() == ([0, 1, 0, 0, 0, 0] if blow_up else [0] * 6)
        assert not alive[2, 3] and not alive[3, 3] and alive[0, 3] and alive[0, 1] == False  # noqa: E712
        assert alive[1].any() != blow_up  # a blown-up sample's terms all die


def test_host_broyden_kernels_leave_a_narrower_history_to_the_twins(monkeypatch):
    """U, V in bf16 under fp32 iterates: the twins (they balance each stored term); NumPy cannot hold bf16. Catches:
    the host path taking a narrower history."""
    calls = []
    for name in ("broyden_dots", "broyden_combine", "broyden_finish"):
        original = getattr(reference, name)
        monkeypatch.setattr(
            reference, name, lambda *a, original=original, name=name, **k: calls.append(name) or original(*a, **k)
        )
    state, new = _broyden_case(torch.float32, seed=13)
    state = replace(state, U=state.U.bfloat16(), V=state.V.bfloat16())
    applies = host.broyden_combine(state, new, host.broyden_dots(state, new))
    host.broyden_finish(state, new, applies, growth=100.0)
    assert calls == ["broyden_dots", "broyden_combine", "broyden_finish"]
