"""python -m fpdm.evaluate: how good are generated images, and how does quality grow with compute?

Quality is measured with a feature network per dataset: a small CNN
classifier the project trains on the real training images (cached, its test
accuracy recorded). Two numbers:

- Frechet distance between generated images and the real test images in the
  classifier's feature space (lower is better). It is computed like FID, but
  with a different network: the values are NOT comparable with Inception-FID
  numbers from papers.
- conditional accuracy: how often the classifier agrees with the class the
  sample was conditioned on (higher is better).

``--inception PATH`` adds Inception FID computed with pytorch-fid's weights
file (local; nothing is downloaded). Modes:

- ``--samples DIR/samples.npz --dataset NAME``: score existing samples;
- ``--ckpt A --ckpt B --dit-steps 5,10,20,50``: a budget sweep. The budgets
  are those of a DiT sampling with that many steps; every checkpoint is
  sampled at each budget (an FPDM in several variants: uniform, smoothing,
  reuse, reallocation, Anderson) and scored. Writes results.json,
  results.md and quality_vs_compute.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .checkpoint import first_line, load_checkpoint, save_checkpoint
from .checks import InputError
from .data import ImageData, load_dataset
from .files import atomic_write, write_json, write_text
from .models import FPDM, DiT
from .sample import SampleError, generate, plan_compute  # noqa: F401 (evaluate.SampleError, an old name)
from .weights import read_weights

__all__ = [
    "FeatureNet", "frechet_distance", "feature_net_for", "score", "Variant", "FPDM_VARIANTS", "sweep",
]  # fmt: skip

FEATURE_NET_VERSION = 2


EvaluateError = InputError  # the old name (before 0.2 its own class)


# ----------------------------------------------------------------------------- feature network


class FeatureNet(nn.Module):
    """A small CNN classifier (~2 MFLOP per 28x28 image); its 4*width-d penultimate activations are the features."""

    def __init__(self, channels: int, num_classes: int, width: int = 24) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (N, 4 * width)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, classes)


@torch.no_grad()
def _batched(fn, images: Tensor, batch_size: int = 500) -> Tensor:
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def train_feature_net(train: ImageData, test: ImageData, *, epochs: int, seed: int = 0, progress: bool = True):
    """Train the classifier (Adam, light shift augmentation); returns it and its test accuracy."""
    torch.manual_seed(seed)
    net = FeatureNet(train.channels, train.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps_per_epoch = max(len(train) // 128, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    from rich.progress import track

    for _ in track(range(epochs), description="training the feature network", disable=not progress):
        order = torch.randperm(len(train), generator=gen)
        net.train()
        for i in range(steps_per_epoch):
            idx = order[i * 128 : (i + 1) * 128]
            x = train.images[idx]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(x), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    accuracy = float((_batched(net, test.images).argmax(1) == test.labels).float().mean())
    return net, accuracy


def default_cache_dir() -> Path:
    return Path(os.environ.get("FPDM_CACHE", Path.home() / ".cache" / "fpdm"))


def feature_net_for(
    dataset: str, *, data_dir: str | None = None, cache_dir: Path | None = None, epochs: int | None = None,
    progress: bool = True,
) -> tuple[FeatureNet, dict]:  # fmt: skip
    """The cached feature network of a dataset, trained on first use. Returns it and its record."""
    train = load_dataset(dataset, split="train", data_dir=data_dir)
    if train.is_latent:
        raise InputError("latent datasets have no image classifier: decode samples and evaluate images")
    test = load_dataset(dataset, split="test", data_dir=data_dir)
    key = dataset.replace("/", "_").replace(":", "_")
    path = (cache_dir or default_cache_dir()) / f"featurenet-{key}.pt"
    shape = [train.channels, train.image_size, train.image_size]
    if path.exists():
        try:
            state = load_checkpoint(path)
            if state["version"] == FEATURE_NET_VERSION and state["shape"] == shape:
                net = FeatureNet(train.channels, train.num_classes)
                net.load_state_dict(state["weights"])
                return net.eval(), {k: state[k] for k in ("dataset", "test_accuracy", "epochs")}
        except (InputError, KeyError, RuntimeError):
            pass  # stale or unreadable cache: train again and replace it
    epochs = epochs or (30 if len(train) < 5000 else 4)
    net, accuracy = train_feature_net(train, test, epochs=epochs, progress=progress)
    record = {"dataset": dataset, "test_accuracy": accuracy, "epochs": epochs}
    save_checkpoint(path, {"weights": net.state_dict(), "version": FEATURE_NET_VERSION, "shape": shape, **record})
    return net, record


# ----------------------------------------------------------------------------- scores


def read_samples(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) in [-1, 1] and labels (N,) from a samples npz: ``images`` (or ADM's ``arr_0``) uint8
    (N, H, W, C), ``labels`` integers. Anything else is an InputError naming what was found."""
    what = f"samples {path} (uint8 images (N, H, W, C) and integer labels, as python -m fpdm.sample writes)"
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"a single {type(data).__name__}, not an npz archive")
        with data:
            key = "images" if "images" in data.files else "arr_0"
            pixels, labels = data[key], data["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot read {what}: {first_line(err)}") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
        raise InputError(f"{what}: its images are {pixels.dtype} of shape {pixels.shape}")
    if labels.dtype.kind not in "iu" or labels.shape != pixels.shape[:1]:
        raise InputError(f"{what}: its labels are {labels.dtype} of shape {labels.shape} for {len(pixels)} images")
    if len(pixels) < 2:
        raise InputError(f"{what}: {len(pixels)} image(s); scoring needs at least 2 (a covariance)")
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W)
    return images, torch.from_numpy(labels.astype(np.int64))


def frechet_distance(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two sets of features (N, d), in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, feats in (("first", a), ("second", b)):
        if not np.isfinite(feats).all():
            raise InputError(f"the {name} set's features hold NaN or Inf (non-finite images?): no Frechet "
                             "distance")  # fmt: skip
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    from_samples = min(len(a), len(b)) < a.shape[1]
    cross = trace_sqrt_product(a - mu_a, b - mu_b, cov_a, cov_b, from_samples=from_samples)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def trace_sqrt_product(
    a: np.ndarray, b: np.ndarray, cov_a: np.ndarray, cov_b: np.ndarray, *, from_samples: bool
) -> float:
    """Tr((S_a S_b)^(1/2)) for covariances S_a, S_b (d, d) of the centred samples a (N_a, d), b (N_b, d).

    It is the sum of the square roots of S_a S_b's eigenvalues, which are those of the symmetric PSD
    S_a^(1/2) S_b S_a^(1/2): real and >= 0 (rounding's negatives are clipped), by two symmetric
    eigendecompositions (~1 s at d = 2048, where scipy.linalg.sqrtm of the product takes ~20 s and needs
    pytorch-fid's regularisation when it is singular). ``from_samples`` (fewer samples than dimensions):
    S_a S_b's nonzero eigenvalues are the squared singular values of a b^T / sqrt((N_a - 1)(N_b - 1)), an
    (N_a, N_b) matrix, so a few images cost microseconds. Both are exact; tests compare them with each
    other and with closed forms."""
    if from_samples:
        scale = np.sqrt((len(a) - 1) * (len(b) - 1))
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / scale)
    w, v = np.linalg.eigh(cov_a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov_b @ root), 0, None)).sum())


@dataclass
class Reference:
    """What generated images are compared with: the feature network and the real test set's features."""

    net: FeatureNet
    real_features: np.ndarray
    record: dict
    real_images: Tensor
    inception: nn.Module | None = None
    real_inception: np.ndarray | None = None


def reference_for(dataset: str, *, data_dir=None, cache_dir=None, inception: str | None = None, progress=True):
    net, record = feature_net_for(dataset, data_dir=data_dir, cache_dir=cache_dir, progress=progress)
    test = load_dataset(dataset, split="test", data_dir=data_dir)
    ref = Reference(net, _batched(net.features, test.images).numpy(), record, test.images)
    if inception:
        from .inception import load_fid_inception

        try:
            ref.inception = load_fid_inception(inception)
        except ValueError as err:
            raise InputError(str(err)) from None
        ref.real_inception = _batched(ref.inception, test.images, 50).numpy()
    return ref


def score(images: Tensor, labels: Tensor, ref: Reference) -> dict:
    """Frechet distance and conditional accuracy of images (N, C, H, W) in [-1, 1] conditioned on labels."""
    if images.shape[1:] != ref.real_images.shape[1:]:
        raise InputError(f"generated images {tuple(images.shape[1:])} do not match the dataset's "
                         f"{tuple(ref.real_images.shape[1:])}")  # fmt: skip
    feats = _batched(ref.net.features, images)
    logits = ref.net.head(feats)
    out = {
        "frechet": frechet_distance(feats.numpy(), ref.real_features),
        "cond_accuracy": float((logits.argmax(1) == labels).float().mean()),
    }
    if ref.inception is not None:
        out["inception_fid"] = frechet_distance(_batched(ref.inception, images, 50).numpy(), ref.real_inception)
    return out


# ----------------------------------------------------------------------------- budget sweeps


@dataclass(frozen=True)
class Variant:
    """An FPDM sampling setting at a budget: steps relative to the DiT's, schedule, solver, reuse."""

    name: str
    step_factor: float = 1.0  # steps = factor x the DiT's steps at this budget (smoothing > 1)
    schedule: str = "uniform"
    solver: str = "picard"
    reuse: bool = False


FPDM_VARIANTS = {
    v.name: v
    for v in (
        Variant("uniform"),
        Variant("smoothing", step_factor=2.0),
        Variant("reuse", reuse=True),
        Variant("realloc-high", schedule="high-noise"),
        Variant("realloc-low", schedule="low-noise"),
        Variant("anderson", solver="anderson"),
        Variant("smoothing+reuse", step_factor=2.0, reuse=True),
    )
}


def _fpdm_plan(cfg, dit_steps: int, budget: int, variant: Variant):
    """The variant's plan, with its steps capped so that every step gets at least one call."""
    cost = cfg.pre_depth + cfg.post_depth
    steps = min(max(1, round(dit_steps * variant.step_factor)), budget // (cost + 1))
    if steps < 1:
        return None
    return plan_compute(cfg, steps=steps, budget=budget, schedule=variant.schedule)


def check_variants(variants: list[str]) -> None:
    """An InputError naming the variants that are not in FPDM_VARIANTS."""
    unknown = [v for v in variants if v not in FPDM_VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(FPDM_VARIANTS)}")


def load_models(checkpoints: list[str]) -> list[tuple[str, DiT | FPDM, dict]]:
    """(checkpoint, model, run settings) for each weights file, in order: what ``sweep`` evaluates."""
    loaded = [read_weights(ckpt) for ckpt in checkpoints]
    return [(ckpt, weights.build(), weights.run) for ckpt, weights in zip(checkpoints, loaded)]


def sweep(
    models: list[tuple[str, DiT | FPDM, dict]], *, dit_steps: list[int], dit_depth: int | None, variants: list[str],
    num_samples: int, ref: Reference, guidance: float, seed: int, batch_size: int, progress: bool,
    grids: Path | None = None, on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:  # fmt: skip
    """Sample and score every checkpoint's model (and FPDM variant) at every budget; one row each.
    ``models``: from ``load_models``. ``on_row(rows)`` is called with the rows so far after each one (the
    command writes results.json then: a sweep that fails keeps what it finished).

    Every setting is planned, and checked against the diffusion timesteps its checkpoint was trained
    with, before anything is sampled."""
    loaded = [(model, run) for _, model, run in models]
    checkpoints = [ckpt for ckpt, _, _ in models]
    depths = [m.config.depth for m, _ in loaded if m.config.kind == "dit"]
    dit_depth = dit_depth or (depths[0] if depths else None)
    if dit_depth is None:
        raise InputError("budgets are DiT steps x DiT depth: pass --dit-depth or a DiT checkpoint")
    num_classes = loaded[0][0].config.num_classes
    labels = torch.arange(num_samples) % num_classes
    settings = []  # (checkpoint, model, timesteps, DiT steps, budget, variant name, plan, solver, reuse)
    for ckpt, (model, run) in zip(checkpoints, loaded):
        cfg, timesteps = model.config, int(run.get("num_timesteps", 1000))
        for steps_dit in dit_steps:
            budget = steps_dit * dit_depth
            variants_here = [("dit", None)] if cfg.kind == "dit" else [(v, FPDM_VARIANTS[v]) for v in variants]
            for name, variant in variants_here:
                if variant is None:
                    plan, solver, reuse = plan_compute(cfg, budget=budget), "picard", False
                else:
                    plan, solver, reuse = _fpdm_plan(cfg, steps_dit, budget, variant), variant.solver, variant.reuse
                if plan is None:
                    continue
                if plan.steps > timesteps:
                    raise InputError(f"{cfg.kind.upper()} {name} at {steps_dit} DiT steps samples {plan.steps} "
                                     f"steps, more than the {timesteps} diffusion timesteps of {ckpt}")  # fmt: skip
                settings.append((ckpt, model, timesteps, steps_dit, budget, name, plan, solver, reuse))
    rows = []
    for ckpt, model, timesteps, steps_dit, budget, name, plan, solver, reuse in settings:
        cfg = model.config
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        images, stats = generate(model, labels, plan, image_shape=shape, guidance=guidance, solver=solver,
                                 reuse=reuse, seed=seed, batch_size=batch_size, num_timesteps=timesteps,
                                 progress=False)  # fmt: skip
        row = {
            "checkpoint": ckpt, "model": cfg.kind, "variant": name, "dit_steps": steps_dit, "budget": budget,
            "steps": plan.steps, "block_evaluations": stats.block_evaluations, "seconds": stats.seconds,
            **score(images, labels, ref),
        }  # fmt: skip
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        if progress:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        if grids is not None and steps_dit == min(dit_steps):
            from .images import save_grid

            save_grid(images[: 10 * min(num_classes, 10)], grids / f"{cfg.kind}-{name}-{budget}.png",
                      nrow=10, scale=2)  # fmt: skip
    return rows


def write_reports(rows: list[dict], out: Path, *, title: str) -> None:
    """results.json, results.md and quality_vs_compute.png."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", rows)
    has_fid = any("inception_fid" in r for r in rows)
    header = ["model", "variant", "DiT steps", "budget (blocks)", "steps", "block evals", "Frechet (ours)",
              "cond. acc.", *(["Inception FID"] if has_fid else []), "seconds"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["budget"], r["model"] != "dit", r["variant"])):
        fid = [f"{r.get('inception_fid', float('nan')):.2f}"] if has_fid else []
        cells = [r["model"].upper(), r["variant"], r["dit_steps"], r["budget"], r["steps"],
                 f"{r['block_evaluations']:g}", f"{r['frechet']:.2f}", f"{r['cond_accuracy']:.3f}",
                 *fid, f"{r['seconds']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    write_text(out / "results.md", f"# {title}\n\n" + "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r["model"], r["variant"]) for r in rows})
    for model, variant in series:
        points = sorted((r["block_evaluations"], r["frechet"], r["cond_accuracy"]) for r in rows
                        if (r["model"], r["variant"]) == (model, variant))  # fmt: skip
        label = "DiT" if model == "dit" else f"FPDM {variant}"
        style = dict(marker="o", lw=2.2 if model == "dit" else 1.3, ls="-" if model == "dit" else "--")
        left.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
        right.plot([p[0] for p in points], [p[2] for p in points], label=label, **style)
    for ax, ylabel in ((left, "Frechet distance, our feature net (lower is better)"),
                       (right, "conditional accuracy (higher is better)")):  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("block evaluations per sample")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(out / "quality_vs_compute.png", lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- command line


def main(args: argparse.Namespace) -> dict | list[dict]:
    progress = not args.quiet
    if args.samples:
        if not args.dataset:
            raise InputError("--samples needs --dataset (the data the samples imitate)")
        images, labels = read_samples(args.samples)
        classes = load_dataset(args.dataset, split="test", data_dir=args.data_dir).num_classes
        if labels.min() < 0 or labels.max() >= classes:  # before the reference (it may train a network)
            raise InputError(f"samples {args.samples} have labels {int(labels.min())}..{int(labels.max())}; "
                             f"{args.dataset} has classes 0..{classes - 1}")  # fmt: skip
        ref = reference_for(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                            inception=args.inception, progress=progress)  # fmt: skip
        result = {"samples": str(args.samples), **score(images, labels, ref),
                  "feature_net_test_accuracy": ref.record["test_accuracy"]}  # fmt: skip
        print(json.dumps(result, indent=2))
        return result
    if not args.ckpt:
        raise InputError("give --samples FILE or at least one --ckpt")
    check_variants(args.variants)  # before the reference, which may train a feature network
    models = load_models(args.ckpt)  # every checkpoint read once, and checked before any feature network trains
    shapes = {f"{m.config.in_channels}x{m.config.input_size}x{m.config.input_size}" for _, m, _ in models}
    if len(shapes) > 1:
        raise InputError(f"the checkpoints generate different shapes ({', '.join(sorted(shapes))}): "
                         "evaluate the models of one dataset together")  # fmt: skip
    dataset = args.dataset or models[0][2].get("dataset")
    ref = reference_for(dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, inception=args.inception,
                        progress=progress)  # fmt: skip
    out = Path(args.out)  # checked by cli before any work
    start = time.perf_counter()
    rows = sweep(models, dit_steps=args.dit_steps, dit_depth=args.dit_depth, variants=args.variants,
                 num_samples=args.num_samples, ref=ref, guidance=args.guidance, seed=args.seed,
                 batch_size=args.batch_size, progress=progress, grids=out / "grids",
                 on_row=lambda rows: write_json(out / "results.json", rows))  # fmt: skip
    title = (f"{dataset}: quality vs sampling compute ({args.num_samples} samples, guidance {args.guidance}; "
             f"feature net test accuracy {ref.record['test_accuracy']:.3f})")  # fmt: skip
    write_reports(rows, out, title=title)
    print(f"{len(rows)} settings in {time.perf_counter() - start:.0f} s; wrote {out}/results.md, results.json, "
          "quality_vs_compute.png")  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = checks.Parser(prog="python -m fpdm.evaluate", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--samples", default=None, help="score a samples.npz of python -m fpdm.sample")
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint(s) for a budget sweep")
    p.add_argument("--dataset", default=None, help="the real data (default: the first checkpoint's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="feature networks (default ~/.cache/fpdm)")
    p.add_argument("--inception", default=None, help="pytorch-fid Inception weights file for Inception FID")
    p.add_argument("--dit-steps", type=checks.positive_ints, default=[5, 10, 20, 50],
                   help="budgets, as DiT sampling steps")  # fmt: skip
    p.add_argument("--dit-depth", type=int, default=None, help="blocks of the reference DiT (default: from --ckpt)")
    p.add_argument("--variants", type=checks.names, default=list(FPDM_VARIANTS), help="FPDM variants")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=checks.seed, default=0, help="an integer in [0, 2^32)")
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--quiet", action="store_true")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.num_samples < 2:
        raise InputError("--num-samples must be at least 2 (a covariance needs two samples)")
    if args.batch_size < 1 or (args.dit_depth is not None and args.dit_depth < 1):
        raise InputError("--batch-size and --dit-depth must be >= 1")
    checks.number("--guidance", args.guidance)
    if args.cache_dir is not None:
        checks.output_dir(args.cache_dir, "--cache-dir")
    if args.ckpt and not args.samples:  # a sweep writes into --out: one evaluation per folder, locked first
        with checks.run_lock(checks.output_dir(args.out)):
            main(args)
    else:
        main(args)


def cli(argv: list[str] | None = None) -> int:
    return checks.run_cli(build_parser(), argv, _run)


if __name__ == "__main__":
    sys.exit(cli())
