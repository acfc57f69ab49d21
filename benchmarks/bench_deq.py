"""DEQ classifiers trained with fixedpoint (defaults, each other backward mode) vs TorchDEQ (defaults, IFT,
phantom), in lockstep from the same weights on the same batches: the tanh DEQ on digits
(benchmarks/deq_digits.py has the logic) and the convolutional DEQ on Fashion-MNIST (deq_fashion.py; skipped
where its files are not installed: ``apt-get install dataset-fashion-mnist``).

Reduced settings (1 seed; digits 2 epochs, Fashion-MNIST 1 epoch of 640 images; one torch thread) so the
suite stays short; the full benchmarks are ``python benchmarks/deq_digits.py`` (3 seeds, 10 epochs) and
``python benchmarks/deq_fashion.py`` (3 seeds, 3 epochs, 3000 images). TorchDEQ's rows need torchdeq.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from deq_digits import configurations, run
from deq_fashion import DATA, ConvDEQClassifier, load_fashion, read_idx

TABLES = {
    "digits": "DEQ on digits (width 128, batch 64, Adam 1e-3; 1 seed, 2 epochs, 1 thread): fixedpoint vs TorchDEQ",
    "fashion": "Conv DEQ on Fashion-MNIST (640 train / 200 test, batch 64, Adam 1e-3; 1 seed, 1 epoch, 1 thread)",
}
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


def _task(name: str) -> dict:
    if name == "digits":
        return {"seeds": (0,), "epochs": 2}
    try:
        data = load_fashion(DATA, train=640, test=200)
    except (OSError, ValueError) as err:
        pytest.skip(f"Fashion-MNIST's IDX files are not installed ({err})")
    return {"seeds": (0,), "epochs": 1, "task": "fashion", "data": data, "make_model": ConvDEQClassifier}


@pytest.mark.parametrize("task", ["digits", "fashion"])
def bench_deq_training(benchmark, report, task):
    options = _task(task)
    table = TABLES[task]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: more threads mostly spin, and on a shared machine they get in the way
    try:
        result = benchmark.pedantic(lambda: run(configs=configurations(), **options), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    for row in result["summary"]:
        cells = {
            column: "-" if not np.isfinite(row[key]) else format(row[key], spec)
            for key, (column, spec) in COLUMNS.items()
        }
        report.add(table, config=row["config"], **cells)
    defaults = result["defaults"]
    fpd, tdd = defaults["fixedpoint"], defaults.get("torchdeq")
    note = f"fixedpoint defaults: solver {fpd['solver']['name']}, backward {fpd['backward']['name']}"
    if tdd:
        note += (
            f"; torchdeq get_deq(): {tdd['core']}, {tdd['f_solver']} (max {tdd['f_max_iter']}, tol {tdd['f_tol']:g} "
            f"{tdd['f_stop_mode']}), backward {tdd['backward']}"
        )
    report.note(table, note + ". unconv: fraction of samples over the library's own tolerance.")
    for row in result["summary"]:
        assert row["acc_mean"] > 0.3, row  # chance is 0.1: every configuration learns something


def test_idx_files_read_as_written(tmp_path):
    """Catches: a wrong header parse (dimension count, big-endian sizes) or offset in the Fashion-MNIST reader,
    which would shift every image by a few bytes; and a damaged file read as data instead of refused."""
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    (tmp_path / "short").write_bytes(header + images.tobytes()[:-1])
    with pytest.raises(ValueError, match="holds 23 values, its header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + bytes(4))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "float")
