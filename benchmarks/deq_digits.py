"""Training a small DEQ classifier on scikit-learn's digits: fixedpoint vs TorchDEQ, each with its defaults.

The model: z* = tanh(W z* + U x + b) (width 128), logits = readout(z*); cross-entropy, Adam (lr 1e-3),
batch 64, 10 epochs; train on 4 of every 5 images, test on every 5th (360 of the 1797). Every
configuration starts from the same weights (one draw per seed) and sees the same batches in the same
order; the configurations train in lockstep (one batch each, in an order rotated every batch), so the
load of a shared machine falls on all of them alike.

Configurations: ``FixedPoint(cell)`` with whatever its defaults are when this runs, and with each other
``backward=`` of implicit / jfb / phantom (its default solver); TorchDEQ's ``get_deq()`` defaults, its
IFT mode (``ift=True``) and its phantom gradient (``grad=5, tau=0.5``, the k and damping of our
``phantom``). TorchDEQ is used as its docs show: ``z_out, info = deq(f, z0)``, loss on ``z_out[-1]``
only (the final state; its default returns that one state anyway).

Per configuration and seed: test accuracy after training, the median wall-clock training time per
epoch (forward, backward and optimizer step; no evaluation), mean forward iterations per step, the
fraction of samples whose forward solve missed the library's own tolerance, the relative residual
||f(z) - z|| / ||f(z)||, backward-solve statistics where there is one, and the largest |dL/dW| over its
median (gradient spikes).

One torch thread by default (``--threads``): the ops are small (64 x 128), and on a loaded machine
more threads mostly spin, which slows the library that launches more small ops far more than the other.

Run: ``python benchmarks/deq_digits.py [--seeds 3] [--epochs 10] [--threads 1] [--json runs/deq_digits.json]``;
``--candidates`` trains the configurations FixedPoint's defaults were chosen from instead (``candidates()``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import inspect
import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import fixedpoint as fp

WIDTH, BATCH, LR, EPOCHS, SEEDS = 128, 64, 1e-3, 10, (0, 1, 2)
TORCHDEQ_PHANTOM = {"grad": 5, "tau": 0.5}  # TorchDEQ's phantom gradient at our phantom's defaults (k=5, damping=0.5)


# ---------------------------------------------------------------- data and model


def load_digits_split(test_every: int = 5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as (N, 64) float32 in [0, 1] and int64 labels; every ``test_every``-th image is test.

    Returns x_train, y_train, x_test, y_test.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    test = torch.arange(len(y)) % test_every == 0
    return x[~test], y[~test], x[test], y[test]


class Cell(nn.Module):
    """f(z, inj) = tanh(W z + inj): the map whose fixed point the DEQ solves for."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(self.W(z) + inj)


STAT_KEYS = ("iters", "iters_max", "unconverged", "rel_residual", "b_iters", "b_unconverged")


class DEQLayer(nn.Module):
    """A library's DEQ around a :class:`Cell`: ``forward(inj) -> z*`` (with a graph) from a zero start.

    ``stats()``, called after the backward pass, describes the last call: the keys of ``STAT_KEYS``
    (forward iterations mean and max, fraction unconverged, mean relative residual; the backward solve's
    mean iterations and fraction unconverged), NaN where the library or mode has none.
    """

    cell: Cell

    def stats(self) -> dict[str, float]:
        raise NotImplementedError


def _rel_residual(x: Tensor, fx: Tensor) -> Tensor:
    """(B,) ||f(x) - x|| / ||f(x)||, the relative residual both libraries use."""
    x, fx = x.flatten(1).float(), fx.flatten(1).float()
    return (fx - x).norm(dim=1) / fx.norm(dim=1).clamp_min(1e-12)


class FixedPointLayer(DEQLayer):
    """``fixedpoint.FixedPoint(cell, **options)``: no options means the library's defaults."""

    def __init__(self, cell: Cell, **options) -> None:
        super().__init__()
        self.cell = cell
        self.layer = fp.FixedPoint(cell, **options)

    def forward(self, inj: Tensor) -> Tensor:
        return self.layer(inj)

    def stats(self) -> dict[str, float]:
        out = dict.fromkeys(STAT_KEYS, np.nan)
        sol = self.layer.last_solution
        if sol is not None:
            out["iters"] = float(sol.nsteps.float().mean())
            out["iters_max"] = float(sol.nsteps.max())
            out["unconverged"] = float((sol.status != fp.Status.CONVERGED).float().mean())
            out["rel_residual"] = float(_rel_residual(sol.x, sol.fx).mean())
        adjoint = getattr(self.layer.last_info, "backward", None)  # implicit's adjoint Solution, if any
        if isinstance(adjoint, fp.Solution):
            out["b_iters"] = float(adjoint.nsteps.float().mean())
            out["b_unconverged"] = float((adjoint.status != fp.Status.CONVERGED).float().mean())
        return out


class TorchDEQLayer(DEQLayer):
    """``torchdeq.get_deq(**options)`` called as its docs show: ``z_out, info = deq(f, z0)``; returns ``z_out[-1]``."""

    def __init__(self, cell: Cell, **options) -> None:
        super().__init__()
        import torchdeq

        self.cell = cell
        self.deq = torchdeq.get_deq(**options)
        self._info: dict | None = None
        self._backward_info: dict | None = None

    def forward(self, inj: Tensor) -> Tensor:
        self._info = self._backward_info = None
        z_out, self._info = self.deq(lambda z: self.cell(z, inj), torch.zeros_like(inj), backward_writer=self._record)
        return z_out[-1]

    def _record(self, info: dict) -> None:
        self._backward_info = info

    def stats(self) -> dict[str, float]:
        deq, info, b_info = self.deq, self._info, self._backward_info
        out = dict.fromkeys(STAT_KEYS, np.nan)
        if info is not None and float(info["nstep"].min()) >= 0:  # -1: a solver that keeps no statistics
            out["iters"] = float(info["nstep"].float().mean())
            out["iters_max"] = float(info["nstep"].max())
            # converged: the residual in its own stop mode (default 'abs') within its own tolerance
            out["unconverged"] = float((info[f"{deq.f_stop_mode}_lowest"] > deq.f_tol).float().mean())
            out["rel_residual"] = float(info["rel_lowest"].mean())
        if b_info is not None:
            out["b_iters"] = float(b_info["nstep"].float().mean())
            out["b_unconverged"] = float((b_info[f"{deq.b_stop_mode}_lowest"] > deq.b_tol).float().mean())
        return out


class DEQClassifier(nn.Module):
    """logits = readout(z*), z* = tanh(W z* + U x + b): ``inject`` is U and b, the cell holds W."""

    def __init__(self, width: int = WIDTH, n_in: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.inject = nn.Linear(n_in, width)
        self.cell = Cell(width)
        self.readout = nn.Linear(width, n_classes)
        self.deq: DEQLayer | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.deq(self.inject(x)))


# ---------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    """A named way to solve and differentiate the DEQ: ``make(cell) -> DEQLayer``."""

    name: str
    make: Callable[[Cell], DEQLayer]


def _has_torchdeq() -> bool:
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        return False
    return True


def configurations(torchdeq: bool | None = None) -> list[Config]:
    """fixedpoint with its defaults and each other backward mode; TorchDEQ's defaults, IFT and phantom (if
    installed)."""
    default = fp.FixedPoint(Cell(1)).backward
    configs = [Config("fixedpoint defaults", FixedPointLayer)]
    configs += [
        Config(f"fixedpoint {mode.__name__}", partial(FixedPointLayer, backward=mode))
        for mode in (fp.implicit, fp.jfb, fp.phantom)
        if mode is not default
    ]
    if torchdeq is None:
        torchdeq = _has_torchdeq()
    if torchdeq:
        configs += [
            Config("torchdeq defaults", TorchDEQLayer),
            Config("torchdeq ift", partial(TorchDEQLayer, ift=True)),
            Config("torchdeq phantom", partial(TorchDEQLayer, **TORCHDEQ_PHANTOM)),
        ]
    return configs


def candidates(torchdeq: bool | None = None) -> list[Config]:
    """The training configurations FixedPoint's defaults were chosen from (``--candidates``), named solver,
    tolerance exponent, iteration cap and backward mode: A4-50 is Anderson at 1e-4 in 50 iterations (the
    defaults before this comparison, with implicit), P3-40 plain iteration at 1e-3 in 40; and TorchDEQ's defaults."""
    solvers = {
        "A4-50": partial(fp.anderson, tol=1e-4, max_iter=50),
        "A3-30": partial(fp.anderson, tol=1e-3, max_iter=30),
        "P3-40": partial(fp.picard, tol=1e-3, max_iter=40),
    }
    grid = [("A4-50", "implicit"), ("A4-50", "jfb"), ("A3-30", "jfb"), ("A3-30", "phantom"), ("A3-30", "implicit"),
            ("P3-40", "jfb"), ("P3-40", "phantom"), ("P3-40", "implicit")]  # fmt: skip
    configs = [
        Config(f"{name} {mode}", partial(FixedPointLayer, solver=solvers[name], backward=getattr(fp, mode)))
        for name, mode in grid
    ]
    if torchdeq if torchdeq is not None else _has_torchdeq():
        configs.append(Config("torchdeq defaults", TorchDEQLayer))
    return configs


# ---------------------------------------------------------------- training


@dataclass
class RunResult:
    """One configuration trained with one seed."""

    config: str
    seed: int
    test_accuracy: float = np.nan
    epoch_seconds: list[float] = field(default_factory=list)
    steps: int = 0
    iters: float = np.nan  # mean over steps of the batch's mean forward iterations
    iters_max: float = np.nan  # mean over steps of the batch's largest
    unconverged: float = np.nan  # fraction of training samples whose forward solve missed its tolerance
    rel_residual: float = np.nan  # mean relative residual of the forward solve
    b_iters: float = np.nan  # backward (adjoint) solve: mean iterations, where there is one
    b_unconverged: float = np.nan  # and its fraction of samples over tolerance
    grad_max: float = np.nan  # largest |dL/dW| (Frobenius) over the steps
    grad_median: float = np.nan
    grad_spike: float = np.nan  # grad_max / grad_median
    final_loss: float = np.nan  # mean training loss over the last epoch
    test_iters: float = np.nan  # mean forward iterations on the test set (eval solver)
    grad_norms: list[float] = field(default_factory=list)  # |dL/dW| at every step
    step_unconverged: list[float] = field(default_factory=list)  # forward unconverged fraction at every step

    @property
    def epoch_median(self) -> float:
        return statistics.median(self.epoch_seconds) if self.epoch_seconds else np.nan


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else np.nan


def train_lockstep(
    configs: Sequence[Config],
    seed: int,
    *,
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    make_model: Callable[[], nn.Module] | None = None,
    epochs: int = EPOCHS,
    width: int = WIDTH,
    batch: int = BATCH,
    lr: float = LR,
) -> list[RunResult]:
    """Train one model per configuration from the same initial weights on the same batches, batch by batch.

    ``make_model()``: the model, with a ``cell`` (f's parameters) and a ``deq`` attribute that each
    configuration sets (default: :class:`DEQClassifier` of ``width`` for the data). The order of the
    configurations rotates every batch. Only the training step (forward, backward, optimizer step) is
    timed; statistics are read after it.
    """
    x_train, y_train, x_test, y_test = data if data is not None else load_digits_split()
    torch.manual_seed(seed)
    base = make_model() if make_model is not None else DEQClassifier(width, x_train.shape[1], int(y_train.max()) + 1)
    models, optimizers, results, records = [], [], [], []
    for config in configs:
        model = copy.deepcopy(base)
        model.deq = config.make(model.cell)
        models.append(model.train())
        optimizers.append(torch.optim.Adam(model.parameters(), lr=lr))
        results.append(RunResult(config.name, seed))
        records.append({"grad": [], "stats": [], "loss": []})
    order = torch.Generator().manual_seed(10_000 + seed)  # the batches: one draw shared by every configuration
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=order)
        seconds = [0.0] * len(configs)
        losses: list[list[float]] = [[] for _ in configs]
        for start in range(0, len(perm), batch):
            idx = perm[start : start + batch]
            xb, yb = x_train[idx], y_train[idx]
            for k in range(len(configs)):
                i = (k + step) % len(configs)
                model, opt = models[i], optimizers[i]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                seconds[i] += time.perf_counter() - t0
                records[i]["grad"].append(_grad_norm(model.cell))
                records[i]["stats"].append(model.deq.stats())
                losses[i].append(loss.item())
            step += 1
        for i in range(len(configs)):
            results[i].epoch_seconds.append(seconds[i])
            records[i]["loss"] = losses[i]
    for model, result, record in zip(models, results, records):
        _summarise(result, record)
        result.test_accuracy, result.test_iters = evaluate(model, x_test, y_test)
    return results


def _grad_norm(cell: nn.Module) -> float:
    """|dL/d theta| (Frobenius, over the cell's parameters: f's own), NaN before any gradient."""
    grads = [p.grad for p in cell.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else np.nan


def _summarise(result: RunResult, record: dict) -> None:
    """Fill a result's step statistics from the per-step records."""
    result.steps = len(record["grad"])
    result.grad_norms = list(record["grad"])
    result.step_unconverged = [s["unconverged"] for s in record["stats"]]
    for key in STAT_KEYS:
        setattr(result, key, _nanmean([s[key] for s in record["stats"]]))
    grads = [g for g in record["grad"] if np.isfinite(g)]
    if grads:
        result.grad_max, result.grad_median = max(grads), statistics.median(grads)
        result.grad_spike = result.grad_max / result.grad_median if result.grad_median > 0 else np.inf
    result.final_loss = _nanmean(record["loss"])


@torch.no_grad()
def evaluate(model: DEQClassifier, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Test accuracy in eval mode (each library's eval solve) and its mean forward iterations."""
    model.eval()
    accuracy = float((model(x).argmax(dim=1) == y).float().mean())
    iters = model.deq.stats()["iters"]
    model.train()
    return accuracy, iters


# ---------------------------------------------------------------- defaults, summary, table


def _describe(fn) -> dict:
    """A solver or backward mode: its name, the options a partial fixes, and its own defaults that matter here."""
    if fn is None:
        return {"name": None}
    keywords = dict(fn.keywords) if isinstance(fn, partial) else {}
    base = fn.func if isinstance(fn, partial) else fn
    out: dict = {"name": getattr(base, "__name__", repr(base)), **{k: repr(v) for k, v in keywords.items()}}
    try:
        for name, p in inspect.signature(base).parameters.items():
            if name in ("tol", "max_iter", "stop", "m", "k", "damping") and name not in keywords:
                out[name] = p.default
    except (TypeError, ValueError):
        pass
    return out


def library_defaults() -> dict:
    """What "defaults" meant in this run: FixedPoint's solver, eval solver and backward; TorchDEQ's get_deq()."""
    layer = fp.FixedPoint(Cell(4))
    out = {
        "fixedpoint": {
            "solver": _describe(layer.solver),
            "eval_solver": _describe(layer.eval_solver),
            "backward": _describe(layer.backward),
        }
    }
    if _has_torchdeq():
        import torchdeq

        deq = torchdeq.get_deq()
        args = deq.args
        phantom = f"phantom grad={args.get('grad', 1)} tau={args.get('tau', 1.0)}"
        out["torchdeq"] = {
            "version": importlib.metadata.version("torchdeq"),
            "core": type(deq).__name__,
            "f_solver": deq.f_solver.__name__,
            "f_max_iter": deq.f_max_iter,
            "f_tol": deq.f_tol,
            "f_stop_mode": deq.f_stop_mode,
            "eval_f_max_iter": deq.eval_f_max_iter,
            "backward": "ift" if args.get("ift", False) else phantom,
            "b_solver (ift=True)": deq.b_solver.__name__,
            "b_max_iter": deq.b_max_iter,
            "b_tol": deq.b_tol,
            "b_stop_mode": deq.b_stop_mode,
        }
    return out


def summarise(results: Sequence[RunResult]) -> list[dict]:
    """One row per configuration: mean (and min or worst) over seeds; time relative to TorchDEQ's defaults."""
    names = list(dict.fromkeys(r.config for r in results))
    rows = []
    for name in names:
        runs = [r for r in results if r.config == name]
        acc = [r.test_accuracy for r in runs]
        rows.append(
            {
                "config": name,
                "acc_mean": float(np.mean(acc)),
                "acc_min": float(np.min(acc)),
                "s_per_epoch": float(np.mean([r.epoch_median for r in runs])),
                "s_per_epoch_min": float(np.min([r.epoch_median for r in runs])),
                "iters": _nanmean([r.iters for r in runs]),
                "iters_max": _nanmean([r.iters_max for r in runs]),
                "unconverged": _nanmean([r.unconverged for r in runs]),
                "rel_residual": _nanmean([r.rel_residual for r in runs]),
                "b_iters": _nanmean([r.b_iters for r in runs]),
                "b_unconverged": _nanmean([r.b_unconverged for r in runs]),
                "grad_spike": _nanmean([r.grad_spike for r in runs]),
                "grad_spike_worst": float(np.nanmax([r.grad_spike for r in runs])),
                "final_loss": _nanmean([r.final_loss for r in runs]),
                "test_iters": _nanmean([r.test_iters for r in runs]),
            }
        )
    ref = next((r for r in rows if r["config"] == "torchdeq defaults"), None)  # None without torchdeq
    for row in rows:
        row["time_vs_torchdeq"] = row["s_per_epoch"] / ref["s_per_epoch"] if ref else np.nan
    return rows


def _cell(value: float, spec: str) -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """The summary as a fixed-width text table."""
    columns = [
        ("config", "config", "s"),
        ("acc mean", "acc_mean", ".4f"),
        ("acc min", "acc_min", ".4f"),
        ("s/epoch", "s_per_epoch", ".3f"),
        ("vs tdeq", "time_vs_torchdeq", ".2f"),
        ("iters", "iters", ".1f"),
        ("iters max", "iters_max", ".1f"),
        ("unconv", "unconverged", ".3f"),
        ("rel res", "rel_residual", ".1e"),
        ("b iters", "b_iters", ".1f"),
        ("b unconv", "b_unconverged", ".3f"),
        ("|g|max/med", "grad_spike", ".2f"),
        ("worst", "grad_spike_worst", ".2f"),
        ("test iters", "test_iters", ".1f"),
    ]
    cells = [[row[key] if spec == "s" else _cell(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(title), *(len(c[j]) for c in cells)) for j, (title, _, _) in enumerate(columns)]
    lines = ["  ".join(title.ljust(w) for (title, _, _), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def _jsonable(value):
    """``value`` with numpy scalars as Python numbers and NaN/inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def run(
    seeds: Sequence[int] = SEEDS,
    epochs: int = EPOCHS,
    *,
    configs: Sequence[Config] | None = None,
    width: int = WIDTH,
    batch: int = BATCH,
    lr: float = LR,
    json_path: str | Path | None = None,
    task: str = "digits",
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    make_model: Callable[[], nn.Module] | None = None,
) -> dict:
    """The whole benchmark: every seed in turn (configurations in lockstep); returns (and writes) the results.

    ``task`` names the data and model in the report: digits and :class:`DEQClassifier` unless ``data``
    and ``make_model`` say otherwise (``deq_fashion.py``). Convergence warnings of the backward solves are
    silenced: the statistics report them.
    """
    configs = list(configs) if configs is not None else configurations()
    data = data if data is not None else load_digits_split()
    results: list[RunResult] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fp.ConvergenceWarning)
        for seed in seeds:
            results += train_lockstep(
                configs, seed, data=data, make_model=make_model, epochs=epochs, width=width, batch=batch, lr=lr
            )
    rows = summarise(results)
    report = {
        "settings": {
            "task": task,
            "seeds": list(seeds),
            "epochs": epochs,
            "width": width,
            "batch": batch,
            "lr": lr,
            "train": len(data[1]),
            "test": len(data[3]),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "fixedpoint": fp.__version__,
        },
        "defaults": library_defaults(),
        "summary": rows,
        "runs": [asdict(r) | {"epoch_median": r.epoch_median} for r in results],
    }
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run the benchmark, print the defaults and the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="number of seeds (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--candidates", action="store_true", help="the configurations the defaults were chosen from")
    parser.add_argument("--json", default="runs/deq_digits.json", help="where to write the results ('' for nowhere)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = candidates() if args.candidates else configurations()
    report = run(
        range(args.seeds), args.epochs, configs=configs, width=args.width, batch=args.batch, lr=args.lr,
        json_path=args.json or None,
    )  # fmt: skip
    s = report["settings"]
    print_report(report, f"digits DEQ, width {s['width']}", args.json)


def print_report(report: dict, task: str, json_path: str | None) -> None:
    """The defaults compared, a heading with the settings, the table, and where the JSON went."""
    print(json.dumps(report["defaults"], indent=1))
    s = report["settings"]
    print(
        f"\n{task}, batch {s['batch']}, Adam lr {s['lr']:g}, {s['epochs']} epochs, seeds {s['seeds']}, "
        f"{s['threads']} threads (acc/time: mean over seeds, min acc; s/epoch: median epoch)"
    )
    print(format_table(report["summary"]))
    if json_path:
        print(f"\nresults: {json_path}")


if __name__ == "__main__":
    main()
