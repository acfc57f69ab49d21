"""python -m fpdm.study: the FPDM-vs-DiT study, reproducible by one command.

1. trains a DiT and an FPDM of the same width on the same data (a rerun resumes each training from its
   last checkpoint; the measurements and the sweep are redone);
2. measures parameters, training memory (bytes autograd keeps for backward,
   plus weights, gradients and AdamW state) and training throughput;
3. sweeps quality (Frechet distance in our feature space, conditional
   accuracy) against sampling compute, at budgets equal to DiT sampling with
   ``--dit-steps`` steps: DiT, and FPDM uniform / smoothing / reuse /
   reallocation / Anderson;
4. writes ``report.md`` with the tables, the quality-vs-compute plot and the
   sample grids at the smallest budget side by side.

Defaults: Fashion-MNIST (28x28, patch 4), width 128; DiT with 8 blocks;
FPDM with 1 + fixed-point + 1 blocks and the paper's S-JFB ranges.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from . import checks
from .checks import InputError
from .evaluate import FPDM_VARIANTS, check_variants, load_models, reference_for, sweep, write_reports
from .files import atomic_write, write_json, write_text
from .train import read_metrics
from .weights import load_model


def _train(kind: str, args: argparse.Namespace, out: Path) -> Path:
    """Run (or resume) python -m fpdm.train for one model; returns its checkpoint."""
    model = f"{kind}-T/{args.patch}"
    cmd = [sys.executable, "-m", "fpdm.train", "--dataset", args.dataset, "--model", model,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--out", str(out),
           "--ckpt-every", "250", "--sample-steps", str(args.grid_steps), "--quiet"]  # fmt: skip
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if kind == "DiT":
        cmd += ["--depth", str(args.dit_depth)]
    print("python " + " ".join(cmd[1:]), flush=True)  # as a user would type it
    subprocess.run(cmd, check=True)
    return out / "checkpoints" / "latest.pt"


def _memory_and_params(ckpt: Path, batch: int) -> dict:
    """Parameters, and training memory at ``batch`` per process: 16 B per parameter + saved activations."""
    model = load_model(ckpt)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def activations(grad_iters=None) -> int:
        saved[0] = 0
        if grad_iters is not None:
            cfg.no_grad_iters, cfg.grad_iters = (0, 0), (grad_iters, grad_iters)
        x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
        return saved[0]

    if cfg.kind == "dit":
        plain = activations()
        model.grad_checkpointing = True
        return {"params": params, "memory_mb": (16 * params + plain) / 2**20,
                "memory_checkpointed_mb": (16 * params + activations()) / 2**20}  # fmt: skip
    lo, hi = cfg.grad_iters
    mean = sum(activations(n) for n in range(lo, hi + 1)) / (hi - lo + 1)
    return {"params": params, "memory_mb": (16 * params + mean) / 2**20,
            "memory_worst_mb": (16 * params + activations(hi)) / 2**20}  # fmt: skip


def _side_by_side(grids: Path, out: Path, budget: int) -> Path:
    """The sample grids at the smallest budget in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    files = sorted(grids.glob(f"*-{budget}.png"), key=lambda p: (not p.name.startswith("dit"), p.name))
    cols = min(4, len(files))
    rows = -(-len(files) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path in zip(axes.flat, files):
        ax.imshow(Image.open(path), cmap="gray")
        ax.set_title(path.stem.replace("dit-dit", "DiT").replace("fpdm-", "FPDM ").rsplit("-", 1)[0], fontsize=10)
    fig.suptitle(f"samples at {budget} block evaluations per sample (one column per class)", fontsize=11)
    fig.tight_layout()
    try:
        return atomic_write(out, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)


def main(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    checkpoints = {kind: _train(kind, args, out / kind.lower()) for kind in ("DiT", "FPDM")}
    summary = {}
    for kind, ckpt in checkpoints.items():
        records = read_metrics(ckpt.parent.parent / "metrics.jsonl")
        speeds = [r["steps_per_s"] for r in records if "steps_per_s" in r]
        summary[kind] = {**_memory_and_params(ckpt, args.batch_size),
                         "steps_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
                         "final_loss": records[-1]["loss"] if records else None}  # fmt: skip
    write_json(out / "training.json", summary)

    ref = reference_for(args.dataset, data_dir=args.data_dir, progress=True)
    models = load_models([str(c) for c in checkpoints.values()])
    rows = sweep(models, dit_steps=args.dit_steps, dit_depth=args.dit_depth,
                 variants=args.variants, num_samples=args.num_samples, ref=ref, guidance=args.guidance, seed=0,
                 batch_size=args.sample_batch, progress=True, grids=out / "grids")  # fmt: skip
    title = (f"{args.dataset}: quality vs sampling compute ({args.num_samples} samples; "
             f"feature net test accuracy {ref.record['test_accuracy']:.3f})")  # fmt: skip
    write_reports(rows, out, title=title)
    smallest = min(args.dit_steps) * args.dit_depth
    _side_by_side(out / "grids", out / "grids_smallest_budget.png", smallest)

    lines = [f"# FPDM vs DiT on {args.dataset}", "", "| | DiT | FPDM |", "|---|---|---|"]
    d, f = summary["DiT"], summary["FPDM"]
    lines += [
        f"| parameters | {d['params'] / 1e6:.2f}M | {f['params'] / 1e6:.2f}M |",
        f"| training memory, batch {args.batch_size} (MB) | {d['memory_mb']:.0f} "
        f"(checkpointed {d['memory_checkpointed_mb']:.0f}) | {f['memory_mb']:.0f} (worst {f['memory_worst_mb']:.0f}) |",
        f"| training steps/s (median) | {d['steps_per_s']:.2f} | {f['steps_per_s']:.2f} |",
        f"| final training loss | {d['final_loss']:.4f} | {f['final_loss']:.4f} |",
        "", (out / "results.md").read_text().split("\n", 2)[2],
        "![quality vs compute](quality_vs_compute.png)", "",
        "![samples at the smallest budget](grids_smallest_budget.png)",
    ]  # fmt: skip
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    print(f"wrote {report}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = checks.Parser(prog="python -m fpdm.study", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="runs/study")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dit-depth", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000, help="training steps of each model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dit-steps", type=checks.positive_ints, default=[5, 10, 20, 50],
                   help="comma-separated DiT step counts")  # fmt: skip
    p.add_argument("--variants", type=checks.names, default=list(FPDM_VARIANTS), help="comma-separated FPDM variants")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--sample-batch", type=int, default=250)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--grid-steps", type=int, default=50,
                   help="DDIM steps of each training run's own sample grid (samples.png; 0: none)")  # fmt: skip
    return p


def validate(args: argparse.Namespace) -> None:
    """Everything that would otherwise fail only after both models have trained."""
    check_variants(args.variants)
    small = {flag: value for flag, value in (("--dit-depth", args.dit_depth), ("--steps", args.steps),
             ("--batch-size", args.batch_size), ("--sample-batch", args.sample_batch), ("--patch", args.patch))
             if value < 1}  # fmt: skip
    if small:
        raise InputError(", ".join(f"{flag} must be >= 1, got {value}" for flag, value in small.items()))
    if args.grid_steps < 0:
        raise InputError(f"--grid-steps must be >= 0 (0: no grid), got {args.grid_steps}")
    if args.num_samples < 2:
        raise InputError("--num-samples must be at least 2 (a covariance needs two samples)")
    checks.number("--guidance", args.guidance)
    checks.output_dir(args.out)


def _run(args: argparse.Namespace) -> None:
    validate(args)
    with checks.run_lock(Path(args.out)):  # one study per folder (each training run locks its own)
        main(args)


def cli(argv: list[str] | None = None) -> int:
    try:
        return checks.run_cli(build_parser(), argv, _run)
    except subprocess.CalledProcessError as err:  # the training command said why, in one line: not again
        return err.returncode


if __name__ == "__main__":
    sys.exit(cli())
