"""The GPU benchmark scripts, dry-run on CPU (Triton's interpreter, tiny sizes, untimed), and the codegen audit.

They only run for real on a lent GPU, where a broken script wastes scarce device time;
this runs every code path once and checks what they report.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fixedpoint.kernels.triton_kernels", reason="triton is not installed")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_gpu  # noqa: E402
import gpu_tune  # noqa: E402


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


def test_bench_gpu_kernel_cases_and_anderson_step_run(cpu_dry_run):
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


def _never_converging():
    """A map on (2, 3, 8) never exactly at its fixed point: every solve runs all its iterations."""
    noise = torch.randn(64, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    calls = [0]

    def f(z):
        calls[0] += 1
        return torch.tanh(0.5 * z + 1) + 0.01 * noise[calls[0] % 64]

    return f


def test_bench_gpu_overhead_tables_are_filled(cpu_dry_run):
    f = _never_converging()
    report, z0 = Rows(), torch.zeros(2, 3, 8)
    for name in ("picard", "anderson m=5", "broyden m=20"):
        bench_gpu.bench_overhead_fpdm_xl(report, (f, z0), name)
    for name in ("picard", "picard check_every=20", "anderson m=5"):
        bench_gpu.bench_steady_overhead_fpdm_xl(report, (f, z0), name)
    tables = [table for table, _ in report.rows]
    assert tables.count(bench_gpu.OVERHEAD) == 3 and tables.count(bench_gpu.STEADY) == 3
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

    byte_knobs = ("BLOCK_BYTES", "TILE_BYTES", "FUSED_TILE_BYTES", "DOTS_BYTES", "COMBINE_BYTES")
    total_bytes = sum(getattr(gpu_tune.tk, k) for k in byte_knobs)

    def do_bench(fn, **kw):  # 1 ms at the defaults, faster as any bytes constant grows: the sweep must set them
        fn()
        return total_bytes / sum(getattr(gpu_tune.tk, k) for k in byte_knobs)

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(gpu_tune, "SIZES", {"tiny": 300})
    monkeypatch.setattr(gpu_tune, "BATCH", 2)
    monkeypatch.setattr(gpu_tune, "GRID", {"bytes": [0.5, 1], "steps": [1, 2], "warps": [4]})
    defaults = {k: getattr(gpu_tune.tk, k) for k in gpu_tune.KNOBS}
    gpu_tune.main(tmp_path, ["bfloat16"])
    assert {k: getattr(gpu_tune.tk, k) for k in defaults} == defaults  # the sweep leaves the module as it was
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    constants = {
        "residual": ["BLOCK_BYTES", "NUM_WARPS"],
        "anderson_write m=5": ["TILE_BYTES", "NUM_WARPS"],
        "anderson_residual_write m=5": ["FUSED_TILE_BYTES", "NUM_WARPS"],
        "broyden_dots n=10": ["DOTS_BYTES", "DOTS_WARPS"],
        "broyden_combine n=10": ["COMBINE_BYTES", "NUM_WARPS"],
    }
    assert {r["kernel"]: r["constants (bytes, warps)"] for r in rows} == constants
    for row in rows:
        assert row["size"] == "tiny"
        assert len(row["all TB/s"]) == 4 + len(gpu_tune.PIPELINE) + 1  # the grid, the stages, the default
        # half the default bytes timed slower than the default (so the sweep set them), the default is best
        assert row["best (bytes, steps, warps, stages)"][0] == row["default (bytes, steps, warps, stages)"][0]
        assert row["best TB/s"] == pytest.approx(row["default TB/s"])


@pytest.mark.parametrize("dim", [256 * 1152, 3125000])  # FPDM-XL/2; a multiple of 8 but not of 16 (1e8 / 32)
def test_codegen_audit_gives_half_precision_the_fp32_access_shape(dim):
    """benchmarks/codegen_audit.py compiles kernels for sm_90 on this machine (no GPU): launch sizes in bytes
    give bf16 the same 16-byte loads and stores per thread as fp32 (equal element counts gave bf16 half the
    bytes per thread and 4-byte accesses in the history write), also where D is not a multiple of 16 (Triton
    alone then gave bf16 2-byte accesses). Runs the compiler, not the interpreter."""
    pytest.importorskip("triton")
    script = (
        "import json, torch, codegen_audit as ca\n"
        f"rows = ca.audit([torch.float32, torch.bfloat16], cases=['residual', 'anderson_residual_write'], dim={dim})\n"
        "print(json.dumps([{k: r[k] for k in ('case', 'dtype', 'loads', 'stores', 'registers')} for r in rows]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS), str(BENCHMARKS.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode and "ptxas" in done.stderr + done.stdout:
        pytest.skip(f"no usable ptxas for sm_90 in this triton: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    rows = {(r["case"], r["dtype"]): r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    assert len(rows) == 6
    for case in ("residual", "residual (writes g)", "anderson_residual_write m=5"):
        fp32, bf16 = rows[case, "fp32"], rows[case, "bf16"]
        assert (bf16["loads"], bf16["stores"]) == (fp32["loads"], fp32["stores"]), case
        widths = set(re.findall(r"x(\d+)B", fp32["loads"]))
        assert widths == {"16"} and 0 < fp32["registers"] <= 255, (case, fp32)  # only 16-byte loads
