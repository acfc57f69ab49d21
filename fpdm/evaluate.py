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

``--inception PATH`` adds Inception FID and Inception Score computed with
pytorch-fid's weights file (local; nothing is downloaded); ``--ref-stats
FILE`` takes the FID's reference statistics from an npz (ADM's reference
batches, pytorch-fid's files), ``--save-stats FILE`` writes them. Modes:

- ``--samples DIR/samples.npz --dataset NAME``: score existing samples;
- ``--samples FILE --inception W --ref-stats REF``: Inception FID and IS
  only (ADM's layout: ``arr_0`` uint8 images, labels not needed);
- ``--save-stats FILE --inception W --samples S | --dataset NAME``:
  Inception statistics of a samples file or a dataset's test images;
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .checkpoint import load_checkpoint, save_checkpoint
from .checks import InputError
from .data import ImageData, load_dataset
from .fid import (  # noqa: F401 (fpdm.evaluate's names before fpdm.fid)
    IMAGE_KEYS,
    LABEL_KEYS,
    InceptionFeatures,
    InceptionReference,
    from_uint8,
    inception_features,
    inception_outputs,
    inception_scores,
    load_inception,
    quantize,
    read_images,
    read_inception_reference,
    read_inception_stats,
    read_samples,
    save_inception_stats,
)  # fmt: skip
from .files import write_json, write_text
from .images import pyplot, save_figure, to_uint8  # noqa: F401 (evaluate.to_uint8, an old name)
from .inception import INPUTS
from .metrics import (  # noqa: F401 (fpdm.evaluate's names before fpdm.metrics)
    FeatureStats,
    feature_stats,
    frechet_distance,
    frechet_from_moments,
    inception_score,
    precision_recall,
    trace_sqrt_product,
)  # fmt: skip
from .models import FPDM, DiT
from .sample import SampleError, generate, plan_compute  # noqa: F401 (evaluate.SampleError, an old name)
from .weights import read_weights

__all__ = [
    "FeatureNet", "frechet_distance", "frechet_from_moments", "feature_net_for", "score", "Variant", "FPDM_VARIANTS",
    "sweep", "read_samples", "read_images", "FeatureStats", "feature_stats", "inception_features",
    "inception_score", "read_inception_stats", "save_inception_stats",
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
def _batched(fn, images: Tensor, batch_size: int = 500, device: torch.device | None = None) -> Tensor:
    """fn over images (N, ...) in batches on ``device`` (default: where they are); the result on the CPU."""
    return torch.cat([fn(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


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


@dataclass
class Reference:
    """What generated images are compared with: the feature network and the real test set's features, and
    with ``--inception`` the Inception network and its reference (the test set's, or a file's)."""

    net: FeatureNet
    real_features: np.ndarray
    record: dict
    real_images: Tensor
    inception: nn.Module | None = None
    real_inception: InceptionReference | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def dataset_inception_reference(net: nn.Module, dataset: str, *, data_dir: str | None = None,
                                progress: bool = False) -> InceptionReference:  # fmt: skip
    """The Inception reference of a dataset's test images (quantised to uint8, as samples are): statistics for
    FID and sFID, features for precision and recall."""
    test = load_dataset(dataset, split="test", data_dir=data_dir)
    if test.is_latent:
        raise InputError(f"{dataset} holds latents, not images: no Inception statistics")
    return InceptionReference.of(inception_outputs(net, test.images, progress=progress))


def dataset_inception_stats(net: nn.Module, dataset: str, *, data_dir: str | None = None) -> FeatureStats:
    """The pool statistics (FID's) of ``dataset_inception_reference``."""
    return dataset_inception_reference(net, dataset, data_dir=data_dir).pool


def reference_for(dataset: str, *, data_dir=None, cache_dir=None, inception: str | None = None,
                  ref_stats: str | None = None, inception_input: str = "tf1", device: str | torch.device = "cpu",
                  progress=True) -> Reference:  # fmt: skip
    """The Reference of a dataset on ``device``; ``inception``: the FID Inception's weights file, ``ref_stats``:
    an npz that ``read_inception_reference`` reads (default: the dataset's test images). Both are read first."""
    net = load_inception(inception, inception_input).to(device) if inception else None
    real = read_inception_reference(ref_stats, net, progress=progress) if net is not None and ref_stats else None
    feature_net, record = feature_net_for(dataset, data_dir=data_dir, cache_dir=cache_dir, progress=progress)
    feature_net = feature_net.to(device)
    test = load_dataset(dataset, split="test", data_dir=data_dir)
    real_features = _batched(feature_net.features, test.images, device=device).numpy()
    if net is not None and real is None:
        real = dataset_inception_reference(net, dataset, data_dir=data_dir, progress=progress)
    return Reference(feature_net, real_features, record, test.images, net, real)


def score(images: Tensor, labels: Tensor, ref: Reference) -> dict:
    """Frechet distance and conditional accuracy of images (N, C, H, W) in [-1, 1] conditioned on labels;
    with an Inception network, Inception FID, sFID, precision, recall and Inception Score too."""
    if images.shape[1:] != ref.real_images.shape[1:]:
        raise InputError(f"generated images {tuple(images.shape[1:])} do not match the dataset's "
                         f"{tuple(ref.real_images.shape[1:])}")  # fmt: skip
    feats = _batched(ref.net.features, images, device=ref.device)
    logits = ref.net.head(feats.to(ref.device)).cpu()
    out = {
        "frechet": frechet_distance(feats.numpy(), ref.real_features),
        "cond_accuracy": float((logits.argmax(1) == labels).float().mean()),
    }
    if ref.inception is not None:
        out.update(inception_scores(ref.inception, inception_outputs(ref.inception, images), ref.real_inception))
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

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.2))
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
    save_figure(fig, out / "quality_vs_compute.png")


# ----------------------------------------------------------------------------- command line


def evaluate_images(args: argparse.Namespace, *, device: torch.device, progress: bool, rank: int = 0) -> dict:
    """``--samples`` (scored against ``--dataset`` and/or an Inception reference) and ``--save-stats`` (the
    Inception statistics of ``--samples``' images, or of ``--dataset``'s test images). Every file is read and
    checked before a network runs; the Inception network's reference before the feature network. Under
    torchrun every rank extracts its share of the Inception features; rank 0 scores, writes and prints."""
    if args.samples and not args.dataset and not (args.ref_stats or args.save_stats):
        raise InputError("--samples needs --dataset (the data the samples imitate), or --inception with "
                         "--ref-stats or --save-stats")  # fmt: skip
    if not args.samples and not args.dataset:
        raise InputError("--save-stats needs --samples FILE or --dataset NAME (whose test images' statistics)")
    result: dict = {"samples": str(args.samples)} if args.samples else {"dataset": args.dataset}
    images = labels = None
    if args.samples and args.dataset:
        images, labels = read_samples(args.samples)
        classes = load_dataset(args.dataset, split="test", data_dir=args.data_dir).num_classes
        if labels.min() < 0 or labels.max() >= classes:  # before the reference (it may train a network)
            raise InputError(f"samples {args.samples} have labels {int(labels.min())}..{int(labels.max())}; "
                             f"{args.dataset} has classes 0..{classes - 1}")  # fmt: skip
    elif args.samples:
        images = read_images(args.samples)  # uint8: no labels needed, converted batch by batch
    net = load_inception(args.inception, args.inception_input).to(device) if args.inception else None
    real = read_inception_reference(args.ref_stats, net, progress=progress) if args.ref_stats else None
    if images is not None and args.dataset and rank == 0:  # the small feature network: no collectives
        ref = reference_for(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, device=device,
                            progress=progress)  # fmt: skip
        result.update(score(images, labels, ref), feature_net_test_accuracy=ref.record["test_accuracy"])
    if net is not None:
        if images is None:  # --save-stats of a dataset
            own = dataset_inception_reference(net, args.dataset, data_dir=args.data_dir, progress=progress)
        else:
            features = inception_outputs(net, images, progress=progress)
            own = InceptionReference.of(features)
            if real is None and args.dataset:
                real = dataset_inception_reference(net, args.dataset, data_dir=args.data_dir, progress=progress)
            if rank == 0:
                result.update(inception_scores(net, features, real))
                if args.cross_check:
                    result["torch_fidelity"] = _cross_check(args, images, features, real)
        if args.save_stats and rank == 0:
            save_inception_stats(args.save_stats, own, input=net.input)
            result["saved_stats"] = str(args.save_stats)
    if rank == 0:
        print(json.dumps(result, indent=2))
    return result if rank == 0 else {}


def _cross_check(args: argparse.Namespace, images, features: InceptionFeatures, real: InceptionReference | None):
    """torch-fidelity's numbers on the same images and weights (``fpdm.fidelity``)."""
    from .fidelity import torch_fidelity_check

    if real is None or real.features is None:
        raise InputError("--cross-check needs reference images: --ref-stats with arr_0 images, or --dataset")
    pixels = images if isinstance(images, np.ndarray) else to_uint8(images)
    if args.ref_stats:
        reference = read_images(args.ref_stats)
    else:
        reference = to_uint8(load_dataset(args.dataset, split="test", data_dir=args.data_dir).images)
    return torch_fidelity_check(args.inception, pixels, reference, features.pool, real.features)


def _distributed_images(args: argparse.Namespace, progress: bool) -> dict:
    """evaluate_images under torchrun (gloo on a CPU, nccl on CUDA): the Inception features over the ranks."""
    from .train import process_group

    with process_group(args.device) as (rank, _, device):
        return evaluate_images(args, device=device, progress=progress, rank=rank)


def main(args: argparse.Namespace) -> dict | list[dict]:
    progress = not args.quiet
    device = checks.device(args.device)  # a bad --device is one line in every process, before a group forms
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not (args.samples or args.save_stats):
            raise InputError("under torchrun fpdm.evaluate shares the Inception features of --samples or "
                             "--save-stats over the ranks; a budget sweep (--ckpt) runs in one process")  # fmt: skip
        return _distributed_images(args, progress)
    if args.samples or args.save_stats:
        return evaluate_images(args, device=device, progress=progress)
    if not args.ckpt:
        raise InputError("give --samples FILE or at least one --ckpt")
    check_variants(args.variants)  # before the reference, which may train a feature network
    models = load_models(args.ckpt)  # every checkpoint read once, and checked before any feature network trains
    shapes = {f"{m.config.in_channels}x{m.config.input_size}x{m.config.input_size}" for _, m, _ in models}
    if len(shapes) > 1:
        raise InputError(f"the checkpoints generate different shapes ({', '.join(sorted(shapes))}): "
                         "evaluate the models of one dataset together")  # fmt: skip
    models = [(ckpt, model.to(device), run) for ckpt, model, run in models]
    dataset = args.dataset or models[0][2].get("dataset")
    ref = reference_for(dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, inception=args.inception,
                        ref_stats=args.ref_stats, inception_input=args.inception_input, device=device,
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
    p.add_argument("--inception", default=None, help="the FID Inception's weights file (pytorch-fid's or "
                   "torch-fidelity's) for Inception FID, sFID, IS, precision and recall")  # fmt: skip
    p.add_argument(
        "--inception-input",
        default="tf1",
        choices=list(INPUTS),
        help="how pixels enter the Inception: tf1 (ADM's evaluator, torch-fidelity) or pytorch-fid",
    )
    p.add_argument("--ref-stats", default=None,
                   help="Inception FID against this npz: mu and sigma (ADM reference batch, pytorch-fid) or arr_0 "
                        "uint8 images (default: --dataset's test images)")  # fmt: skip
    p.add_argument("--save-stats", default=None,
                   help="write the Inception statistics (mu, sigma) of --samples, or of --dataset's test images, "
                        "to this .npz")  # fmt: skip
    p.add_argument("--dit-steps", type=checks.positive_ints, default=[5, 10, 20, 50],
                   help="budgets, as DiT sampling steps")  # fmt: skip
    p.add_argument("--dit-depth", type=int, default=None, help="blocks of the reference DiT (default: from --ckpt)")
    p.add_argument("--variants", type=checks.names, default=list(FPDM_VARIANTS), help="FPDM variants")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=checks.seed, default=0, help="an integer in [0, 2^32)")
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--cross-check", action="store_true", help="also compute torch-fidelity's features, FID, precision "
                   "and recall on the same images and weights (needs the fid extra and --inception-input tf1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: each rank's GPU)")
    p.add_argument("--quiet", action="store_true")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.num_samples < 2:
        raise InputError("--num-samples must be at least 2 (a covariance needs two samples)")
    if args.batch_size < 1 or (args.dit_depth is not None and args.dit_depth < 1):
        raise InputError("--batch-size and --dit-depth must be >= 1")
    checks.number("--guidance", args.guidance)
    if args.cross_check and not (args.inception and args.samples and args.inception_input == "tf1"):
        raise InputError("--cross-check compares Inception numbers of --samples: it needs --inception and "
                         "--inception-input tf1 (torch-fidelity's resize)")  # fmt: skip
    for flag, value in (("--ref-stats", args.ref_stats), ("--save-stats", args.save_stats)):
        if value and not args.inception:
            raise InputError(f"{flag} needs --inception (the network of the statistics)")
    if args.save_stats:
        if args.ckpt and not args.samples:
            raise InputError("--save-stats takes the statistics of --samples or of --dataset's test images, "
                             "not of a sweep")  # fmt: skip
        if not str(args.save_stats).endswith(".npz") or Path(args.save_stats).is_dir():
            raise InputError(f"--save-stats {args.save_stats}: give a file name ending in .npz (pytorch-fid reads "
                             "statistics from .npz files only)")  # fmt: skip
        checks.output_dir(Path(args.save_stats).parent, "--save-stats")
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
