"""The GPU benchmark scripts, dry-run on CPU (Triton's interpreter, tiny sizes, untimed), and the codegen audit.

They only run for real on a lent GPU, where a broken script wastes scarce device time;
this runs every code path once and checks what they report.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("fixedpoint.kernels.triton_kernels", reason="triton is not installed")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_gpu  # noqa: E402
import gpu_tune  # noqa: E402

from fixedpoint import _graphs  # noqa: E402
from fixedpoint.testing import EagerGraphs  # noqa: E402


class Rows:
    def __init__(self):
        self.rows = []

    def add(self, table, **row):
        self.rows.append((table, row))

    def note(self, table, text):
        pass


@pytest.fixture
def cpu_dry_run(monkeypatch):
    monkeypatch.setattr(bench_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(bench_gpu, "BATCH", 2)
    monkeypatch.setattr(bench_gpu, "N_BROYDEN", 3)


def test_bench_gpu_kernel_cases_and_anderson_step_run(cpu_dry_run, monkeypatch):
    names = []
    for name, elements, impls in bench_gpu._kernel_cases(40, torch.bfloat16):
        assert elements >= 2 * 2 * 40 and set(impls) == {"triton", "torch"}
        for thunk in impls.values():
            thunk()
        names.append(name)
    assert "anderson_residual_write m=5" in names and "residual (g not kept)" in names
    for impl in ("torch", "triton"):
        step = bench_gpu._anderson_step(impl, 2, 64, torch.float32)
        step()
        step()
    graphs = EagerGraphs()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    calls = []
    bench_gpu._replayed(lambda: calls.append(1))()  # warm-up, capture (runs here), the skipped first replay
    assert graphs.captures == 1 and len(calls) == 2


def _never_converging():
    """A map on (2, 3, 8) never exactly at its fixed point: every solve runs all its iterations."""
    noise = torch.randn(64, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    calls = [0]

    def f(z):
        calls[0] += 1
        return torch.tanh(0.5 * z + 1) + 0.01 * noise[calls[0] % 64]

    return f


def test_bench_gpu_overhead_tables_are_filled(cpu_dry_run, monkeypatch):
    """Every row of both overhead tables runs its solve for exactly its iterations (the graph rows with
    the eager stand-in for CUDA graphs; the "f compiled" rows, graph=True's replacement, through a stand-in
    for torch.compile that counts the calls reaching it, and with every output cloned)."""
    monkeypatch.setattr(_graphs, "GRAPHS", EagerGraphs())
    monkeypatch.setattr(bench_gpu, "STEADY_ROUNDS", 1)
    f = _never_converging()
    compiles, compiled_calls, outputs = [], [0], []

    def compile_f(g):  # stands in for torch.compile(g, mode="reduce-overhead"): one buffer for every output
        compiles.append(g)

        def step(z):
            compiled_calls[0] += 1
            if not outputs:
                outputs.append(torch.empty_like(z))
            return outputs[0].copy_(g(z))  # as a CUDA graph tree's replay: the previous output overwritten

        return step

    monkeypatch.setattr(bench_gpu, "compile_f", compile_f)
    report, z0 = Rows(), torch.zeros(2, 3, 8)
    calls = []  # per row: (name, calls of the compiled f)
    for bench, names in ((bench_gpu.bench_overhead_fpdm_xl, bench_gpu.SOLVES),
                         (bench_gpu.bench_steady_overhead_fpdm_xl, bench_gpu.STEADY_SOLVES)):  # fmt: skip
        for name in names:
            before = compiled_calls[0]
            bench(report, (f, z0), name)
            calls.append((name, compiled_calls[0] - before))
    assert compiles == [f]  # compiled once, for every compiled row
    compiled_rows = [n for name, n in calls if bench_gpu.COMPILED in name]
    assert len(compiled_rows) == 8 and min(compiled_rows) > 20  # 4 per table: picard, anderson; eager, graph=solver
    assert all(n == 0 for name, n in calls if bench_gpu.COMPILED not in name)
    assert not any("graph=True" in name or "kept" in name for name, _ in calls)
    tables = [table for table, _ in report.rows]
    assert tables.count(bench_gpu.OVERHEAD) == len(bench_gpu.SOLVES) >= 11
    assert tables.count(bench_gpu.STEADY) == len(bench_gpu.STEADY_SOLVES) >= 10
    steady = [row for table, row in report.rows if table == bench_gpu.STEADY]
    assert all(row["iterations"] == "20 vs 60" and row["overhead"].endswith("%") for row in steady)


def test_steady_overhead_is_the_median_of_paired_rounds(cpu_dry_run, monkeypatch):
    """Given round times, the table is the closed form: per round, ((long - short) - extra calls x f) /
    (extra iterations x f), f = 1 ms, Picard's 40 extra calls over 40 extra iterations; median and quartiles."""
    extra = [0.1, 0.3, 0.05, 0.2, 0.0]  # ms of solver work per extra iteration, one per round
    rounds = {"f": [20.0] * 5, "short": [30.0] * 5, "long": [30.0 + 40 + 40 * e for e in extra]}
    monkeypatch.setattr(bench_gpu, "_rounds_ms", lambda thunks, n: rounds)
    report, z0 = Rows(), torch.zeros(2, 3, 8)
    bench_gpu.bench_steady_overhead_fpdm_xl(report, (_never_converging(), z0), "picard")
    ((_, row),) = report.rows
    assert row["overhead"] == "10.0%" and row["per_iteration_us"] == pytest.approx(100.0)  # the medians
    assert row["quartiles"] == "2.5% .. 25.0%"  # statistics.quantiles' default ("exclusive") method


def test_gpu_tune_sweeps_and_writes_its_json(monkeypatch, tmp_path):
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: real_randn(*a, **{**k, "device": "cpu"}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "cpu dry run")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    import triton.testing

    # every kernel at 4 KiB, 4 warps, 4 steps, 1 stage: the defaults lie inside the grid below, so each row's
    # last timing is a pipelined variant, and a sweep that did not put entries back would leave it set
    table = {kernel: dict.fromkeys((2, 4), gpu_tune.tk.LaunchSetting(4096)) for kernel in gpu_tune.tk.LAUNCH_SETTINGS}
    monkeypatch.setattr(gpu_tune.tk, "LAUNCH_SETTINGS", table)
    defaults = {kernel: dict(sizes) for kernel, sizes in table.items()}
    total_bytes = sum(setting.nbytes for sizes in defaults.values() for setting in sizes.values())
    changed = []  # per timing: the LAUNCH_SETTINGS entries that differ from the defaults

    def do_bench(fn, **kw):  # 1 ms at the defaults, faster as any tile grows: the sweep must set them
        fn()
        changed.append({(k, size) for k, sizes in table.items() for size, v in sizes.items() if v != defaults[k][size]})
        return total_bytes / sum(setting.nbytes for sizes in table.values() for setting in sizes.values())

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(gpu_tune, "SIZES", {"tiny": 300})
    monkeypatch.setattr(gpu_tune, "BATCH", 2)
    monkeypatch.setattr(gpu_tune, "GRID", {"bytes": [0.5, 1], "warps": [4], "steps": [1, 4]})
    gpu_tune.main(tmp_path, ["bfloat16"])
    assert table == defaults  # the sweep leaves the module as it was
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    launches = {
        "residual": "residual",
        "anderson_write m=5": "anderson_write",
        "anderson_residual_write m=5": "anderson_residual_write",
        "broyden_dots n=10": "broyden_dots",
        "broyden_combine n=10": "broyden_combine",
    }
    assert {r["kernel"]: r["launch"] for r in rows} == launches
    assert [r["launch"] for r in rows] == list(gpu_tune.ORDER)  # Anderson's fused write first: a timeout spares it
    per_row = 4 + len(gpu_tune.PIPELINE)  # the grid (the default among it), the stages
    assert len(changed) == len(rows) * per_row
    for i, row in enumerate(rows):
        assert row["size"] == "tiny"
        assert len(row["all TB/s"]) == per_row
        timings = changed[i * per_row : (i + 1) * per_row]
        assert all(c <= {(row["launch"], 2)} for c in timings), timings  # its own bf16 entry, nothing else
        assert sum(c == set() for c in timings) == 1  # the default, timed once
        # half the default bytes timed slower than the default (so the sweep set them), the default is best
        assert row["best (bytes, warps, steps, stages)"][0] == row["default (bytes, warps, steps, stages)"][0]
        assert row["best TB/s"] == pytest.approx(row["default TB/s"])


@pytest.mark.parametrize("dim", [256 * 1152, 3125000])  # FPDM-XL/2; a multiple of 8 but not of 16 (1e8 / 32)
def test_codegen_audit_gives_every_dtype_16_byte_accesses(dim):
    """benchmarks/codegen_audit.py compiles kernels for sm_90 on this machine (no GPU): with launch sizes in bytes
    every thread moves 16-byte vectors in bf16 as in fp32, as many as its setting's bytes per step give (element
    counts gave bf16 4-byte accesses in the history write), also where D is not a multiple of 16 (Triton alone
    then gave bf16 2-byte accesses). Runs the compiler, not the interpreter."""
    pytest.importorskip("triton")
    from fixedpoint.kernels import triton_kernels as tk

    script = (
        "import json, torch, codegen_audit as ca\n"
        f"rows = ca.audit([torch.float32, torch.bfloat16], cases=['residual', 'anderson_residual_write'], dim={dim})\n"
        "keys = ('case', 'dtype', 'loads', 'async copies', 'stores', 'registers', 'warps')\n"
        "print(json.dumps([{k: r[k] for k in keys} for r in rows]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS), str(BENCHMARKS.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode and "ptxas" in done.stderr + done.stdout:
        pytest.skip(f"no usable ptxas for sm_90 in this triton: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    rows = {(r["case"], r["dtype"]): r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    assert len(rows) == 6
    history = 8  # m = 5 slots padded to 8 rows of the tile
    for (case, dtype), row in rows.items():
        itemsize = 4 if dtype == "fp32" else 2
        kernel = "residual" if case.startswith("residual") else "anderson_residual_write"
        setting = tk.launch_setting(kernel, itemsize)
        threads = 32 * setting.warps
        per_row = setting.nbytes // threads if kernel == "residual" else setting.nbytes // history // threads
        width = min(16, per_row)  # a row's bytes per thread, in vectors of up to 16 bytes
        want = Counter({width: 2 * per_row // width})  # x and f(x)
        if kernel == "anderson_residual_write":
            want[16] += setting.nbytes // threads // 16  # the history tile
        accesses = row["loads"] + " " + row["async copies"]  # pipelined steps load through cp.async copies
        loads = Counter({int(b): int(n) for n, b in re.findall(r"(\d+)x(\d+)B", accesses)})
        unrolled = loads[16] // want[16]  # the compiler may unroll or pipeline the inner steps
        expected = Counter({b: unrolled * n for b, n in want.items()})
        assert 1 <= unrolled <= setting.max_steps and loads == expected, (case, dtype, row)
        assert width == 16, row
        assert set(re.findall(r"x(\d+)B", row["stores"])) <= {"16", "8", "4"}, row  # 4: the fp32 partial sums
        assert 0 < row["registers"] <= 255, row


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_solver_graphs_launch_one_copy_and_one_graph_per_iteration(solver):
    """graph="solver": per iteration the host launches f, the copy of f(x) and one graph; no Triton
    kernel and no other aten op outside the graph (counted as the difference of a 20- and a 10-iteration
    solve, with the eager stand-in for graphs)."""
    import count_launches

    assert count_launches.per_iteration(solver, "triton", "solver", iterations=(6, 16)) == (1.0, 0.0, 1.0)
