"""A DEQ classifier trained on digits: fixedpoint (defaults, implicit, jfb, phantom) vs TorchDEQ (defaults, IFT,
phantom), in lockstep from the same weights on the same batches (benchmarks/deq_digits.py has the logic).

A reduced setting (1 seed, 2 epochs, one torch thread) so the suite stays short; the full benchmark is
``python benchmarks/deq_digits.py`` (3 seeds, 10 epochs). TorchDEQ's rows need torchdeq installed.
"""

from __future__ import annotations

import numpy as np
import torch
from deq_digits import configurations, run

TABLE = "DEQ on digits (width 128, batch 64, Adam 1e-3; 1 seed, 2 epochs, 1 thread): fixedpoint vs TorchDEQ"
COLUMNS = {  # summary key -> (column, format)
    "acc_mean": ("test_acc", ".4f"),
    "s_per_epoch": ("s_per_epoch", ".3f"),
    "time_vs_torchdeq": ("vs_torchdeq", ".2f"),
    "iters": ("fwd_iters", ".1f"),
    "unconverged": ("fwd_unconv", ".3f"),
    "b_iters": ("bwd_iters", ".1f"),
    "b_unconverged": ("bwd_unconv", ".3f"),
    "grad_spike": ("grad_max/median", ".2f"),
}


def bench_deq_digits(benchmark, report):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: more threads mostly spin, and on a shared machine they get in the way
    try:
        result = benchmark.pedantic(lambda: run(seeds=(0,), epochs=2, configs=configurations()), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    for row in result["summary"]:
        cells = {
            column: "-" if not np.isfinite(row[key]) else format(row[key], spec)
            for key, (column, spec) in COLUMNS.items()
        }
        report.add(TABLE, config=row["config"], **cells)
    defaults = result["defaults"]
    fpd, tdd = defaults["fixedpoint"], defaults.get("torchdeq")
    note = f"fixedpoint defaults: solver {fpd['solver']['name']}, backward {fpd['backward']['name']}"
    if tdd:
        note += (
            f"; torchdeq get_deq(): {tdd['core']}, {tdd['f_solver']} (max {tdd['f_max_iter']}, tol {tdd['f_tol']:g} "
            f"{tdd['f_stop_mode']}), backward {tdd['backward']}"
        )
    report.note(TABLE, note + ". unconv: fraction of samples over the library's own tolerance.")
    for row in result["summary"]:
        assert row["acc_mean"] > 0.3, row  # chance is 0.1: every configuration learns something in 2 epochs
