"""GPU benchmarks of the fused kernels and the solver loop (skipped without CUDA).

Three tables, each from one run on one device:

1. Achieved memory bandwidth of every kernel and of its PyTorch twin, for
   B*D from 1e5 to 1e8 (B = 32), as a fraction of the device's peak. Bytes are
   the fewest the operation must move (each input read once, each output
   written once), so the twin's extra passes show up as lower bandwidth.
   Peak: the datasheet figure for known devices, and the device-to-device copy
   measured in the same run. Target: >= 70% of peak.
2. One Anderson step (residual epilogue, history write + Gram row, small
   solve, mixing) at FPDM-XL/2 sizes (batch 32, 256 tokens, width 1152,
   bf16, m = 5), Triton vs PyTorch. Target: >= 2x.
3. Solver overhead per iteration as a fraction of one FPDM-XL/2 fixed-point
   iteration (its real fixed-point block, random weights, bf16, batch 32):
   (solve time - f calls x f time) / (iterations x f time). Target: <= 5%.
   A second table takes the difference of a 20- and a 60-iteration solve, so
   per-solve work (the start, a graph's warm-up and capture) drops out. That
   difference of two ~30-80 ms solves is noisy (host jitter), so it is taken
   in rounds: f, the short and the long solve timed back to back in each
   round; the table gives the median over rounds and the spread (quartiles).

The rows named "f compiled" solve ``torch.compile(f, mode="reduce-overhead")``
(``compiled``: inductor, with PyTorch's CUDA graph trees around it; its output
cloned), on the eager loop and with graph="solver". They replace the removed
graph=True (f captured with the loop): one graph launch for f, and with
graph="solver" one for the solver's work. f is compiled and recorded once per
process, before the first timing; their f time is the compiled f's.
``pytest -k compiled`` selects them (``-k "not compiled"`` leaves them out).

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed
before every call) except the steady-state rounds (CUDA events around each
call). ``BENCH_JSON=path`` also writes the tables as JSON.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

import fixedpoint
from fixedpoint import _graphs
from fixedpoint._solvers import Anderson
from fixedpoint.kernels.groups import BroydenStep
from fixedpoint.testing import anderson_state, broyden_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

BANDWIDTH = "kernel bandwidth, fraction of peak (B = 32, min bytes / median time)"
STEP = "Anderson step at FPDM-XL/2 sizes (32 x 256 x 1152, bf16, m = 5): Triton vs PyTorch"
OVERHEAD = "solver overhead per iteration / one FPDM-XL/2 fixed-point iteration (batch 32, bf16)"
STEADY = "steady-state solver overhead per iteration / one FPDM-XL/2 fixed-point iteration (per-solve costs removed)"

PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # datasheet (SXM parts)
SIZES = [10**5, 10**6, 10**7, 10**8]
BATCH, M, N_BROYDEN = 32, 5, 10
DEVICE = "cuda"  # a dry run of this code on CPU sets "cpu" (and small sizes, below)
MODEL, TOKENS = "FPDM-XL/2", 256


def _bench_ms(fn, rep: int = 60) -> float:
    """Median milliseconds per call (CUDA events, L2 flushed); on a CPU dry run, one timed call."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


@pytest.fixture(scope="module")
def peak() -> dict:
    """Datasheet peak (if known) and the measured device-to-device copy bandwidth, bytes/s."""
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    spec = next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)
    src = torch.empty(2**28 if DEVICE == "cuda" else 2**16, dtype=torch.float32, device=DEVICE).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / (_bench_ms(lambda: dst.copy_(src)) * 1e-3)
    return {"device": name, "spec": spec, "copy": copy}


def _kernel_cases(dim: int, dtype: torch.dtype):
    """(name, elements moved at minimum, {impl: thunk}) for every kernel at (BATCH, dim)."""
    from fixedpoint.kernels import reference, triton_kernels

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)

    x, fx, g, dx, hg, frozen = (rand(BATCH, dim) for _ in range(6))
    F, G = rand(BATCH, M, dim), rand(BATCH, M, dim)
    U, V = rand(BATCH, N_BROYDEN, dim), rand(BATCH, N_BROYDEN, dim)
    alpha = torch.softmax(torch.randn(BATCH, M, device=DEVICE), dim=1)
    coeff = torch.randn(BATCH, 2, N_BROYDEN, device=DEVICE)
    alive = torch.ones(BATCH, N_BROYDEN, dtype=torch.bool, device=DEVICE)
    active = torch.rand(BATCH, device=DEVICE) < 0.9
    n = N_BROYDEN
    # count 2: the history writes go to slot 2; Broyden's applies run over n slots with the state's hg
    anderson = anderson_state(F, G, slot=2, alpha=alpha)
    gnorm = torch.zeros(BATCH, device=DEVICE)  # the states' field the kernels timed here do not read
    broyden = broyden_state(U, V, n, alive, x=x, g=g, gnorm=gnorm, hg=hg, next_x=x)
    new = BroydenStep(x=x, g=g, gnorm=gnorm, dx=dx)  # dots and combine read its g and dx
    cases = [
        ("residual", 3, lambda k: k.residual(x, fx, g)),
        ("residual (g not kept)", 2, lambda k: k.residual(x, fx, None)),
        ("picard_step", 3, lambda k: k.picard_step(x, fx, 0.8, frozen, active)),
        (f"anderson_write m={M}", M + 3, lambda k: k.anderson_write(anderson, fx, g)),
        (f"anderson_write m={M} (g in slot)", M + 2, lambda k: k.anderson_write(anderson, fx, G[:, 2])),
        (f"anderson_residual_write m={M}", M + 3, lambda k: k.anderson_residual_write(anderson, x, fx)),
        (f"anderson_mix m={M}", M + 1, lambda k: k.anderson_mix(anderson, 1.0, frozen, active)),
        (f"broyden_dots n={n}", 2 * n + 2, lambda k: k.broyden_dots(broyden, new)),
        (f"broyden_combine n={n}", 2 * n + 5, lambda k: k.broyden_combine(broyden, new, coeff)),
    ]
    for name, passes, run in cases:
        yield (
            name,
            passes * BATCH * dim,
            {"triton": lambda run=run: run(triton_kernels), "torch": lambda run=run: run(reference)},
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{s:.0e}" for s in SIZES])
def bench_kernel_bandwidth(report, peak, dtype, size):
    dim = size // BATCH
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, elements, impls in _kernel_cases(dim, dtype):
        row = {"kernel": name, "dtype": str(dtype).removeprefix("torch."), "B*D": f"{size:.0e}"}
        for impl, thunk in impls.items():
            seconds = _bench_ms(thunk) * 1e-3
            rate = elements * itemsize / seconds
            row[f"{impl}_us"] = seconds * 1e6
            row[f"{impl}_TB/s"] = rate / 1e12
            if peak["spec"]:
                row[f"{impl}_of_spec"] = f"{100 * rate / peak['spec']:.0f}%"
            row[f"{impl}_of_copy"] = f"{100 * rate / peak['copy']:.0f}%"
        row["speedup"] = f"{row['torch_us'] / row['triton_us']:.2f}x"
        report.add(BANDWIDTH, **row)
        torch.cuda.empty_cache()
    spec = f"{peak['spec'] / 1e12:.2f} TB/s datasheet, " if peak["spec"] else ""
    report.note(BANDWIDTH, f"{peak['device']}: peak {spec}{peak['copy'] / 1e12:.2f} TB/s measured copy; target >= 70%")


def _anderson_step(impl: str, batch: int, dim: int, dtype: torch.dtype):
    """A thunk running one Anderson step (f excluded) on a full history, with the kernels of ``impl``."""
    kern = fixedpoint.kernels.resolve(impl, torch.empty(1, device=DEVICE, dtype=dtype))
    solver = Anderson(m=M, kernels=kern)
    x, fx = (torch.randn(batch, dim, device=DEVICE).to(dtype) for _ in range(2))
    g = torch.empty_like(x)
    gsq, _ = kern.residual(x, fx, g)
    state = solver.init(x, fx, g, gsq.sqrt())
    for _ in range(M):  # fill the history
        g, gsq, _, state = solver.residual(state, x, fx)
        state = solver.update(state, x, fx, g, gsq.sqrt())
        x = 0.9 * x + 0.1 * fx
    active = torch.ones(batch, dtype=torch.bool, device=DEVICE)
    holder = {"state": state}

    def step():
        # as the loop: the residual pass writes g, f(x) into the next slot with the Gram row
        g, gsq, _, st = solver.residual(holder["state"], x, fx)
        st = solver.update(st, x, fx, g, gsq.sqrt())
        _, holder["state"] = solver.step(None, st, active, None)

    return step


def _replayed(thunk):
    """``thunk`` captured in a CUDA graph (after a warm-up): its replay, i.e. GPU time without launch overhead.
    On a CPU dry run, through the graph stand-in when one is swapped in (else ``thunk`` itself)."""
    graphs, device = _graphs.GRAPHS, torch.device(DEVICE)
    if DEVICE != "cuda" and isinstance(graphs, _graphs.CudaGraphs):
        return thunk
    with graphs.warmup_stream(device):
        thunk()
    return graphs.capture(thunk, device, graphs.memory_pool(device))


def bench_anderson_step_fpdm_xl(report):
    dim = TOKENS * 1152
    for mode in ("eager", "CUDA graph replay"):
        times = {}
        for impl in ("torch", "triton"):
            step = _anderson_step(impl, BATCH, dim, torch.bfloat16)
            times[impl] = _bench_ms(step if mode == "eager" else _replayed(step))
        speedup = f"{times['torch'] / times['triton']:.2f}x"
        report.add(STEP, mode=mode, torch_ms=times["torch"], triton_ms=times["triton"], speedup=speedup)
    report.note(
        STEP,
        "step = residual epilogue + history write + Gram row (one pass) + small solve + mixing; eager includes the "
        "host's launch time, graph replay is GPU time; target >= 2x",
    )


def make_fpdm_xl_map():
    """f(z) of FPDM-XL/2's fixed-point layer (random weights, bf16, eval) at batch 32 x 256 tokens x 1152, and a z0."""
    from fpdm.models import create_model

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = create_model(MODEL, input_size=32, num_classes=1000).to(torch.bfloat16).eval()
    width = model.config.hidden_size
    x_inj = torch.randn(BATCH, TOKENS, width, device=DEVICE, dtype=torch.bfloat16)
    c = torch.randn(BATCH, width, device=DEVICE, dtype=torch.bfloat16)
    z0 = torch.randn(BATCH, TOKENS, width, device=DEVICE, dtype=torch.bfloat16)

    def f(z):
        return model.fixed_point_map(z, x_inj, c)

    return f, z0


@pytest.fixture(scope="module")
def fpdm_xl_map():
    return make_fpdm_xl_map()


N_ITERS = 20
COMPILED = "f compiled"  # rows with this in their name solve the compiled f (``compiled``)
SOLVES = {  # name: (iterations, solve)
    "picard": (20, lambda f, z, n: fixedpoint.picard(f, z, **_free(n))),
    "anderson m=5": (20, lambda f, z, n: fixedpoint.anderson(f, z, m=5, **_free(n))),
    "anderson m=5 torch path": (20, lambda f, z, n: fixedpoint.anderson(f, z, m=5, impl="torch", **_free(n))),
    "anderson m=5 check_every=10": (20, lambda f, z, n: fixedpoint.anderson(f, z, m=5, check_every=10, **_free(n))),
    "anderson m=5 graph=solver": (20, lambda f, z, n: fixedpoint.anderson(f, z, m=5, graph="solver", **_free(n))),
    "picard graph=solver": (20, lambda f, z, n: fixedpoint.picard(f, z, graph="solver", **_free(n))),
    "broyden m=20": (20, lambda f, z, n: fixedpoint.broyden(f, z, **_free(n))),
    # graph=True's replacement (graph=True ran these with check_every=5 at 20 iterations)
    "picard f compiled check_every=5": (20, lambda f, z, n: fixedpoint.picard(f, z, check_every=5, **_free(n))),
    "picard f compiled graph=solver": (20, lambda f, z, n: fixedpoint.picard(f, z, graph="solver", **_free(n))),
    "anderson m=5 f compiled check_every=5": (
        20,
        lambda f, z, n: fixedpoint.anderson(f, z, m=5, check_every=5, **_free(n)),
    ),
    "anderson m=5 f compiled graph=solver": (
        20,
        lambda f, z, n: fixedpoint.anderson(f, z, m=5, graph="solver", **_free(n)),
    ),
}


def _free(n: int) -> dict:
    """Options for exactly ``n`` iterations (tolerance unreachable, no divergence stop)."""
    return dict(tol=1e-30, max_iter=n, divergence=None)


def compile_f(f: Callable) -> Callable:
    """``torch.compile(f, mode="reduce-overhead")``: inductor's kernels, replayed from CUDA graph trees (recorded on
    the first calls, again for new shapes). The CPU dry run swaps in a stand-in."""
    return torch.compile(f, mode="reduce-overhead")


def compiled(f: Callable) -> Callable:
    """f compiled (``compile_f``), once per f, its output cloned: CUDA graph trees return a call's outputs in graph
    memory that the next call overwrites (an error to read after that), and the solver keeps earlier outputs (the
    last and the best pair, Anderson's history)."""
    if getattr(f, "compiled", None) is None:
        step = compile_f(f)

        def f_compiled(z: torch.Tensor) -> torch.Tensor:
            return step(z).clone()

        f.compiled = f_compiled
    return f.compiled


def _row_map(name: str, f: Callable) -> Callable:
    """The f a row solves and times: the compiled one for the "f compiled" rows, else f."""
    return compiled(f) if COMPILED in name else f


@pytest.mark.parametrize("name", list(SOLVES))
def bench_overhead_fpdm_xl(report, fpdm_xl_map, name):
    f, z0 = fpdm_xl_map
    f = _row_map(name, f)
    iters, solve = SOLVES[name]
    with torch.no_grad():
        for _ in range(3):  # the compiled f compiles, warms up and records here, outside the timings
            f(z0)
        f_ms = _bench_ms(lambda: [f(z0) for _ in range(N_ITERS)], rep=400) / N_ITERS
        sol = solve(f, z0, iters)
        assert int(sol.nsteps.max()) == iters, sol
        solve_ms = _bench_ms(lambda: solve(f, z0, iters), rep=400)
    overhead = (solve_ms - sol.nfev * f_ms) / (iters * f_ms)
    report.add(OVERHEAD, solver=name, iterations=iters, f_ms=f_ms, solve_ms=solve_ms, f_calls=sol.nfev,
               overhead=f"{100 * overhead:.1f}%")  # fmt: skip
    report.note(
        OVERHEAD,
        "overhead = (solve - calls x f) / (iterations x f), graph capture included; f: the row's own "
        "(compiled in the f compiled rows); target <= 5%",
    )


STEADY_SOLVES = {  # name: solve(f, z, n)
    "picard": lambda f, z, n: fixedpoint.picard(f, z, **_free(n)),
    "picard check_every=20": lambda f, z, n: fixedpoint.picard(f, z, check_every=20, **_free(n)),
    "anderson m=5": lambda f, z, n: fixedpoint.anderson(f, z, m=5, **_free(n)),
    "picard graph=solver": lambda f, z, n: fixedpoint.picard(f, z, graph="solver", **_free(n)),
    "anderson m=5 graph=solver": lambda f, z, n: fixedpoint.anderson(f, z, m=5, graph="solver", **_free(n)),
    "anderson m=5 graph=solver check_every=20": lambda f, z, n: fixedpoint.anderson(
        f, z, m=5, graph="solver", check_every=20, **_free(n)
    ),
    # graph=True's replacement (graph=True ran these with check_every=20)
    "picard f compiled check_every=20": lambda f, z, n: fixedpoint.picard(f, z, check_every=20, **_free(n)),
    "picard f compiled graph=solver": lambda f, z, n: fixedpoint.picard(f, z, graph="solver", **_free(n)),
    "anderson m=5 f compiled check_every=20": lambda f, z, n: fixedpoint.anderson(
        f, z, m=5, check_every=20, **_free(n)
    ),
    "anderson m=5 f compiled graph=solver": lambda f, z, n: fixedpoint.anderson(f, z, m=5, graph="solver", **_free(n)),
}
STEADY_ITERS = (20, 60)
STEADY_ROUNDS = 15


def _rounds_ms(thunks: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of every thunk in each of ``rounds`` rounds, the thunks run back to back within a round so
    that drifts of clock and host load hit them alike (CUDA events on a GPU, perf_counter on a CPU dry run)."""
    times = {name: [] for name in thunks}
    for _ in range(rounds):
        for name, thunk in thunks.items():
            if DEVICE == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                thunk()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                thunk()
                times[name].append((time.perf_counter() - begin) * 1e3)
    return times


@pytest.mark.parametrize("name", list(STEADY_SOLVES))
def bench_steady_overhead_fpdm_xl(report, fpdm_xl_map, name):
    """Two solves of different lengths: their difference is what each further iteration costs, without the
    per-solve work (the start, a graph's warm-up and capture). Paired per round, median over rounds."""
    f, z0 = fpdm_xl_map
    f = _row_map(name, f)
    solve = STEADY_SOLVES[name]
    short_n, long_n = STEADY_ITERS
    with torch.no_grad():
        sols = [solve(f, z0, n) for n in STEADY_ITERS]  # also the warm-up: compile, record, capture, allocate
        for sol, n in zip(sols, STEADY_ITERS):
            assert int(sol.nsteps.max()) == n, sol
        times = _rounds_ms(
            {
                "f": lambda: [f(z0) for _ in range(N_ITERS)],
                "short": lambda: solve(f, z0, short_n),
                "long": lambda: solve(f, z0, long_n),
            },
            STEADY_ROUNDS,
        )
    iters, extra_calls = long_n - short_n, sols[1].nfev - sols[0].nfev
    f_ms = [t / N_ITERS for t in times["f"]]
    overheads = [
        (long - short - extra_calls * f) / (iters * f) for f, short, long in zip(f_ms, times["short"], times["long"])
    ]
    q1, median, q3 = statistics.quantiles(overheads, n=4) if len(overheads) > 1 else overheads * 3
    per_iteration = [(long - short) / iters - f for f, short, long in zip(f_ms, times["short"], times["long"])]
    report.add(STEADY, solver=name, iterations=f"{short_n} vs {long_n}", f_ms=statistics.median(f_ms),
               short_ms=statistics.median(times["short"]), long_ms=statistics.median(times["long"]),
               per_iteration_us=1e3 * statistics.median(per_iteration), overhead=f"{100 * median:.1f}%",
               quartiles=f"{100 * q1:.1f}% .. {100 * q3:.1f}%")  # fmt: skip
    report.note(
        STEADY,
        "overhead = ((long - short) - extra calls x f) / (extra iterations x f), per round of f, "
        f"short and long back to back; median and quartiles of {STEADY_ROUNDS} rounds; f: the row's own "
        "(compiled in the f compiled rows); target <= 5%",
    )
