"""Shared pieces of the benchmark suite: a report that prints comparison tables at the end."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


class Report:
    """Rows of named tables, printed after the run (pytest_terminal_summary)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict]] = defaultdict(list)
        self.notes: dict[str, str] = {}

    def add(self, table: str, **row) -> None:
        self.tables[table].append(row)

    def note(self, table: str, text: str) -> None:
        self.notes[table] = text


_REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


def timed(benchmark, fn, *, rounds: int = 3):
    """Run ``fn`` under pytest-benchmark and return (its result, best seconds per call).

    With --benchmark-disable the call is timed once with perf_counter.
    """
    start = time.perf_counter()
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    seconds = time.perf_counter() - start
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        seconds = stats.stats.min
    return result, seconds


def interleaved(runs: dict, rounds: int, sync=lambda: None) -> dict:
    """Best seconds per call of each of ``runs`` (name -> fn), the runs alternating within every round (a shared
    machine's load moves them alike; take ratios between them). ``sync``: called before and after each call
    (``torch.cuda.synchronize`` on a GPU)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Rows that name a ``family`` get time and f-call ratios to fixedpoint's row of the same problem and family."""
    base = {(r.get("problem"), r["family"]): r for r in rows if r.get("library") == "fixedpoint" and "family" in r}
    out = []
    for row in rows:
        row = dict(row)
        ref = base.get((row.get("problem"), row.pop("family", None)))
        if ref is not None:
            row["time_vs_ours"] = f"{row['ms'] / ref['ms']:.2f}x"
            if isinstance(row.get("f_calls"), int):
                row["calls_vs_ours"] = f"{row['f_calls'] / ref['f_calls']:.2f}x"
        out.append(row)
    return out


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("BENCH_JSON"):  # the tables as data too (docs, the GPU check)
        tables = {name: _with_ratios(rows) for name, rows in _REPORT.tables.items()}
        Path(os.environ["BENCH_JSON"]).write_text(json.dumps({"tables": tables, "notes": _REPORT.notes}, indent=1))
    for name, rows in _REPORT.tables.items():
        rows = _with_ratios(rows)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cells = [[_format(row.get(c, "")) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        terminalreporter.write_sep("=", name)
        terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        terminalreporter.write_line("  ".join("-" * w for w in widths))
        for r in cells:
            terminalreporter.write_line("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        if name in _REPORT.notes:
            terminalreporter.write_line(_REPORT.notes[name])
