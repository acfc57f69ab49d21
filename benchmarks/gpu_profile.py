"""Where an FPDM-XL/2 solve spends its time on a GPU: torch.profiler tables (run by hand on a CUDA machine).

python benchmarks/gpu_profile.py [out_dir]: for picard and anderson over 20 iterations (eager, and with
graph="solver"), then on f compiled with torch.compile(f, mode="reduce-overhead") (graph=True's replacement,
``bench_gpu.compiled``: compiled and recorded at its first calls, so these run last: a timeout loses only them),
the kernels by total GPU time and the host ops by total CPU time, per iteration.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from bench_gpu import compiled, make_fpdm_xl_map  # benchmarks/ is on the path when run as a script
from torch.profiler import ProfilerActivity, profile

import fixedpoint


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    f, z0 = make_fpdm_xl_map()
    free = dict(tol=1e-30, divergence=None)
    fc = compiled(f)  # compiled and recorded in its first calls (the "f compiled x20" warm-up below)
    runs = {
        "f x20": lambda: [f(z0) for _ in range(20)],
        "picard 20": lambda: fixedpoint.picard(f, z0, max_iter=20, **free),
        "picard graph=solver 20": lambda: fixedpoint.picard(f, z0, max_iter=20, graph="solver", **free),
        "anderson 20": lambda: fixedpoint.anderson(f, z0, max_iter=20, **free),
        "anderson graph=solver 20": lambda: fixedpoint.anderson(f, z0, max_iter=20, graph="solver", **free),
        "f compiled x20": lambda: [fc(z0) for _ in range(20)],
        "picard f compiled graph=solver 20": lambda: fixedpoint.picard(fc, z0, max_iter=20, graph="solver", **free),
        "anderson f compiled 20": lambda: fixedpoint.anderson(fc, z0, max_iter=20, **free),
        "anderson f compiled graph=solver 20": lambda: fixedpoint.anderson(fc, z0, max_iter=20, graph="solver", **free),
    }
    with torch.no_grad():
        for name, run in runs.items():
            run()  # warm-up: compile (the compiled f: also warm up and record, in its first calls), allocate
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            wall = start.elapsed_time(end)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            table_gpu = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
            table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60)
            text = f"## {name}: {wall:.1f} ms (events)\n{table_gpu}\n{table_cpu}\n"
            with (out / "profile.txt").open("a") as log:
                log.write(text)
            print(f"## {name}: {wall:.1f} ms")
            print(table_gpu)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-profile"))
