"""python -m fpdm.study: FPDM vs DiT in the paper's regime and beyond, by one resumable command.

1. trains every model of ``--models`` (DiTs of several depths, FPDMs with P + fixed-point + Q blocks, and
   an FPDM initialised from a trained DiT) in ``--stages`` stages, scoring each stage's checkpoint: quality
   per training step;
2. measures each model's training cost: parameters, steps/s, memory computed and measured, time to reach
   a fixed quality;
3. chooses one guidance scale for every model on a held-out split of the training images;
4. samples and scores every cell (model, variant, budget, guidance, seed): budgets are block evaluations
   per sample, ``--dit-steps`` steps of a DiT of ``--budget-depth`` blocks, from 1 step (the paper's regime)
   to 50; guidance 1 and the chosen scale; every cell over ``--seeds``;
5. writes ``report.md``: the quality-vs-compute figure with the spread over seeds, one table per regime,
   training cost, loss curves and quality over training.

Every finished cell is one line of ``cells.jsonl``, kept across runs: the same command again (after an
interruption, or with more seeds or budgets) computes only what is missing; trainings resume from their
checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checks
from .checkpoint import load_checkpoint
from .checks import InputError
from .data import check_dataset, load_dataset
from .evaluate import FPDM_VARIANTS, _batched, _fpdm_plan, check_variants, frechet_distance, reference_for, score
from .files import write_text
from .sample import generate, plan_compute
from .study_cost import computed_memory, measured_memory
from .weights import read_weights

MODEL_FORMS = "ditD (a DiT of D blocks), fpdmP+Q (P + fixed point + Q blocks), fpdmP+Q-init (from --init-from)"


class TrainingFailed(Exception):
    """A training run that stopped with an error (it printed its own line); carries its exit code."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study, by its name: ``dit8``, ``fpdm1+1``, ``fpdm1+1-init``."""

    name: str
    kind: str  # "dit" | "fpdm"
    depth: int = 0  # DiT blocks
    pre: int = 0  # FPDM explicit blocks before / after the fixed-point layer
    post: int = 0
    init: bool = False  # FPDM started from the trained --init-from DiT

    @property
    def step_cost(self) -> int:
        """Block evaluations of the cheapest sampling step (an FPDM step: its explicit blocks and one call)."""
        return self.depth if self.kind == "dit" else self.pre + self.post + 1

    def train_flags(self, patch: int) -> list[str]:
        if self.kind == "dit":
            return ["--model", f"DiT-T/{patch}", "--depth", str(self.depth)]
        return ["--model", f"FPDM-T/{patch}", "--pre-depth", str(self.pre), "--post-depth", str(self.post)]


def parse_models(names: list[str]) -> list[ModelSpec]:
    """The specs of ``--models`` names, or an InputError naming the first that is not of a known form."""
    specs = []
    for name in names:
        found = re.fullmatch(r"dit(\d+)|fpdm(\d+)\+(\d+)(-init)?", name)
        if found is None or (found[1] is not None and int(found[1]) < 1):
            raise InputError(f"--models: unknown model {name!r}; valid forms: {MODEL_FORMS}")
        if found[1] is not None:
            specs.append(ModelSpec(name, "dit", depth=int(found[1])))
        else:
            specs.append(ModelSpec(name, "fpdm", pre=int(found[2]), post=int(found[3]), init=bool(found[4])))
    if len(set(names)) < len(names):
        raise InputError(f"--models names a model twice: {','.join(names)}")
    return specs


def stage_steps(total: int, stages: int) -> list[int]:
    """``stages`` step counts evenly spaced up to ``total`` (fewer when ``total`` is smaller)."""
    return sorted({max(1, round(total * i / stages)) for i in range(1, stages + 1)})


# ----------------------------------------------------------------------------- finished cells


class Cells:
    """The finished cells of a JSON-lines file, each a record with a unique ``key``. A new cell is appended as
    one line and fsynced, so a kill loses at most the line being written; on opening, a torn or damaged line
    is dropped and the file rewritten (atomically) without it, so later appends start on a line of their own."""

    def __init__(self, path: Path) -> None:
        self.path, self.done, self.computed = path, {}, 0
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                self.done[record["key"]] = record
        if len(self.done) < len(lines) or (text and not text.endswith("\n")):  # damage, or a last line cut short
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.done.values()))

    @staticmethod
    def key(**fields) -> str:
        return json.dumps(fields, sort_keys=True)

    def add(self, key: str, record: dict) -> dict:
        record = {"key": key, **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[key] = record
        self.computed += 1
        return record


# ----------------------------------------------------------------------------- training


def _train(spec: ModelSpec, steps: int, args: argparse.Namespace, out: Path, init: Path | None, final: bool) -> Path:
    """Train (or resume) ``spec`` up to ``steps`` with python -m fpdm.train, in this process."""
    from . import train

    argv = [*spec.train_flags(args.patch), "--dataset", args.dataset, "--steps", str(steps),
            "--batch-size", str(args.batch_size), "--out", str(out), "--quiet",
            "--sample-steps", str(args.grid_steps if final else 0)]  # fmt: skip
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    argv += ["--init", str(init)] if init is not None else []
    print("python -m fpdm.train " + " ".join(argv), flush=True)  # as a user would type it
    code = train.cli(argv)
    if code:
        raise TrainingFailed(code)
    return out / "checkpoints" / "latest.pt"


def _labels(n: int, classes: int) -> torch.Tensor:
    return torch.arange(n) % classes


def _sample(model, run: dict, plan, *, variant: str, labels, guidance: float, seed: int, batch: int):
    """Images and SampleStats of one setting (``variant``: "dit" or an FPDM variant)."""
    cfg = model.config
    v = FPDM_VARIANTS.get(variant)
    return generate(model, labels, plan, image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size),
                    guidance=guidance, solver=v.solver if v else "picard", reuse=v.reuse if v else False,
                    seed=seed, batch_size=batch, num_timesteps=int(run.get("num_timesteps", 1000)),
                    progress=False)  # fmt: skip


def plan_for(cfg, variant: str, dit_steps: int, budget: int):
    """The sampling plan of a model at a budget, None when it cannot afford one step."""
    if variant == "dit":
        return plan_compute(cfg, budget=budget) if budget >= cfg.depth else None
    return _fpdm_plan(cfg, dit_steps, budget, FPDM_VARIANTS[variant])


def train_all(specs: list[ModelSpec], args, out: Path, cells: Cells, ref) -> tuple[dict[str, Path], list[dict]]:
    """Every model trained in stages, each stage's checkpoint scored once (unguided, ``--probe-steps``,
    the first seed); init models after the DiT they start from. Returns each model's final checkpoint and this
    run's stage records (not those of earlier runs with other settings, which cells.jsonl keeps too)."""
    final: dict[str, Path] = {}
    keys = []
    budget = args.probe_steps * args.budget_depth
    for spec in sorted(specs, key=lambda s: s.init):
        init = final[args.init_from] if spec.init else None
        total = args.init_steps if spec.init else args.steps
        for step in stage_steps(total, args.stages):
            key = Cells.key(kind="stage", model=spec.name, step=step, budget=budget, seed=args.seeds[0],
                            num_samples=args.num_samples, batch=args.sample_batch)  # fmt: skip
            keys.append(key)
            if key in cells.done:
                continue
            ckpt = _train(spec, step, args, out / spec.name, init, final=step == total)
            at = int(load_checkpoint(ckpt)["step"])
            if at != step:  # trained past this stage before it was scored (--stages or --steps changed)
                cells.add(key, {"kind": "stage", "model": spec.name, "step": step, "missed": f"checkpoint at {at}"})
                continue
            weights = read_weights(ckpt)
            model, variant = weights.build(), "dit" if spec.kind == "dit" else "uniform"
            plan = plan_for(model.config, variant, args.probe_steps, budget)
            labels = _labels(args.num_samples, model.config.num_classes)
            images, stats = _sample(model, weights.run, plan, variant=variant, labels=labels, guidance=1.0,
                                    seed=args.seeds[0], batch=args.sample_batch)  # fmt: skip
            cells.add(key, {"kind": "stage", "model": spec.name, "step": step, "budget": budget,
                            "seconds": stats.seconds, **score(images, labels, ref)})  # fmt: skip
        final[spec.name] = out / spec.name / "checkpoints" / "latest.pt"
    return final, [cells.done[key] for key in keys]


def training_costs(specs: list[ModelSpec], checkpoints: dict[str, Path], args, out: Path, cells: Cells) -> dict:
    """Parameters and memory (computed; measured in a fresh process), once per model and batch size."""
    costs = {}
    for spec in specs:
        key = Cells.key(kind="cost", model=spec.name, batch=args.batch_size)
        if key not in cells.done:
            cfg = read_weights(checkpoints[spec.name]).config
            print(f"measuring the training memory of {spec.name} at batch {args.batch_size}", flush=True)
            cells.add(key, {"kind": "cost", "model": spec.name, **computed_memory(cfg, args.batch_size),
                            **measured_memory(out / spec.name / "config.json", args.batch_size)})  # fmt: skip
        costs[spec.name] = cells.done[key]
    return costs


# ----------------------------------------------------------------------------- guidance


def held_out_split(args) -> tuple[torch.Tensor, str]:
    """The last ``--select-images`` training images (never the test set's), and which they are."""
    train = load_dataset(args.dataset, split="train", data_dir=args.data_dir)
    if args.select_images >= len(train):
        raise InputError(f"--select-images {args.select_images}: the training set has only {len(train)} images")
    first = len(train) - args.select_images
    what = f"training images {first}..{len(train) - 1} of {len(train)}"
    return train.images[first:].clone(), what


def _features(net, images: torch.Tensor) -> np.ndarray:
    """The feature network's features (N, d) of images (N, C, H, W), in batches."""
    return _batched(net.features, images).numpy()


def select_guidance(specs, models: dict, args, cells: Cells, net, held_out: torch.Tensor) -> dict:
    """The scale of ``--guidance-grid`` whose samples are closest to the held-out images: every model samples
    at ``--probe-steps`` (a DiT its steps, an FPDM ``uniform``) with ``--select-seed``, and the scale with the
    lowest geometric mean of the models' Frechet distances to the held-out images wins (ties: the smaller)."""
    budget = args.probe_steps * args.budget_depth
    reference = _features(net, held_out)
    scores: dict[float, list[float]] = {}
    for scale in args.guidance_grid:
        for spec in specs:
            model, run, step = models[spec.name]
            key = Cells.key(kind="select", model=spec.name, step=step, guidance=scale, budget=budget,
                            seed=args.select_seed, num_samples=args.num_samples, batch=args.sample_batch,
                            held_out=len(held_out))  # fmt: skip
            if key not in cells.done:
                variant = "dit" if spec.kind == "dit" else "uniform"
                labels = _labels(args.num_samples, model.config.num_classes)
                images, _ = _sample(model, run, plan_for(model.config, variant, args.probe_steps, budget),
                                    variant=variant, labels=labels, guidance=scale, seed=args.select_seed,
                                    batch=args.sample_batch)  # fmt: skip
                cells.add(key, {"kind": "select", "model": spec.name, "guidance": scale,
                                "frechet": frechet_distance(_features(net, images), reference)})  # fmt: skip
            scores.setdefault(scale, []).append(cells.done[key]["frechet"])
    geo = {scale: float(np.exp(np.mean(np.log(values)))) for scale, values in scores.items()}
    best = min(geo, key=lambda s: (geo[s], s))
    return {"best": best, "geometric_mean_frechet": geo, "budget": budget}


# ----------------------------------------------------------------------------- the sweep


def ablation_model(specs: list[ModelSpec], name: str | None) -> ModelSpec | None:
    """The model of ``--ablation``: the named FPDM, None for 'none', and by default the first FPDM of --models
    trained from scratch (else the first FPDM; None without one). An InputError if the name is not an FPDM."""
    fpdms = [s for s in specs if s.kind == "fpdm"]
    if name is None:
        return next((s for s in fpdms if not s.init), fpdms[0] if fpdms else None)
    if name == "none":
        return None
    found = next((s for s in fpdms if s.name == name), None)
    if found is None:
        raise InputError(f"--ablation {name} is not an FPDM of --models ('none': no ablation)")
    return found


def sweep_settings(specs: list[ModelSpec], args) -> list[tuple[ModelSpec, int, str]]:
    """(model, reference steps, variant) of every sweep setting: each model's ``--variants`` (a DiT: its steps) at
    every ``--dit-steps``, and the ``--ablation`` model's ``--ablation-variants`` and ``uniform`` (what they are
    compared with) at ``--ablation-steps``, each setting once; in order of budget, the smallest first (the
    paper's regime, a small part of the compute, is complete first)."""
    settings = [(spec, dit_steps, variant) for spec in specs for dit_steps in args.dit_steps
                for variant in (["dit"] if spec.kind == "dit" else args.variants)]  # fmt: skip
    ablated = ablation_model(specs, args.ablation)
    if ablated is not None:
        extra = ["uniform", *args.ablation_variants]
        settings += [(ablated, dit_steps, v) for dit_steps in args.ablation_steps for v in dict.fromkeys(extra)
                     if (ablated, dit_steps, v) not in settings]  # fmt: skip
    return sorted(settings, key=lambda setting: setting[1])  # stable: models and variants in order per budget


def sweep_cells(specs, models: dict, args, guidances: list[float], cells: Cells, ref) -> list[dict]:
    """Every (model, variant, budget, guidance, seed) cell of this run's settings (``sweep_settings``): kept ones
    read, missing ones sampled and scored (and appended at once); a budget a model cannot afford is a
    ``skipped`` record."""
    wanted = []
    for spec, dit_steps, variant in sweep_settings(specs, args):
        model, run, step = models[spec.name]
        budget = dit_steps * args.budget_depth
        plan = plan_for(model.config, variant, dit_steps, budget)
        if plan is None:
            key = Cells.key(kind="skip", model=spec.name, variant=variant, budget=budget)
            if key not in cells.done:
                cells.add(key, {"kind": "skip", "model": spec.name, "variant": variant, "budget": budget,
                                "dit_steps": dit_steps, "reason": f"one step costs at least {spec.step_cost} "
                                f"blocks, more than the budget"})  # fmt: skip
            wanted.append(key)
            continue
        if plan.steps > int(run.get("num_timesteps", 1000)):
            raise InputError(f"{spec.name} {variant} at {budget} blocks samples {plan.steps} steps, more "
                             "than its diffusion timesteps")  # fmt: skip
        for guidance in guidances:
            for seed in args.seeds:
                key = Cells.key(kind="sweep", model=spec.name, step=step, variant=variant, budget=budget,
                                guidance=guidance, seed=seed, num_samples=args.num_samples,
                                batch=args.sample_batch, inception=bool(args.inception))  # fmt: skip
                wanted.append(key)
                if key in cells.done:
                    continue
                labels = _labels(args.num_samples, model.config.num_classes)
                images, stats = _sample(model, run, plan, variant=variant, labels=labels, guidance=guidance,
                                        seed=seed, batch=args.sample_batch)  # fmt: skip
                record = cells.add(key, {
                    "kind": "sweep", "model": spec.name, "variant": variant, "dit_steps": dit_steps,
                    "budget": budget, "guidance": guidance, "seed": seed, "steps": plan.steps,
                    "block_evaluations": stats.block_evaluations, "seconds": stats.seconds,
                    **score(images, labels, ref),
                })  # fmt: skip
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                                  if k != "key"}), flush=True)  # fmt: skip
    return [cells.done[key] for key in wanted]


# ----------------------------------------------------------------------------- the command


def main(args: argparse.Namespace) -> dict:
    """The whole study; returns how many cells this run computed and kept."""
    from .study_report import write_report

    start = time.perf_counter()
    out = Path(args.out)
    specs = parse_models(args.models)
    cells = Cells(out / "cells.jsonl")
    kept = len(cells.done)
    ref = reference_for(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, inception=args.inception,
                        progress=True)  # fmt: skip
    held_out, held_out_what = held_out_split(args)  # before any training: a bad --select-images is one line
    checkpoints, stages = train_all(specs, args, out, cells, ref)
    costs = training_costs(specs, checkpoints, args, out, cells)
    models = {}
    for spec in specs:
        weights = read_weights(checkpoints[spec.name])
        models[spec.name] = (weights.build(), weights.run, int(load_checkpoint(checkpoints[spec.name])["step"]))
    guidance = select_guidance(specs, models, args, cells, ref.net, held_out)
    guidance["held_out"] = held_out_what
    rows = sweep_cells(specs, models, args, [1.0, guidance["best"]], cells, ref)
    ablated = ablation_model(specs, args.ablation)
    write_report(out, specs=specs, ablation=ablated.name if ablated else None, args=args, rows=rows, stages=stages,
                 costs=costs, guidance=guidance, feature_accuracy=ref.record["test_accuracy"])  # fmt: skip
    summary = {"computed": cells.computed, "kept": kept, "seconds": time.perf_counter() - start}
    print(f"{cells.computed} cells computed, {kept} kept from before; wrote {out / 'report.md'}")
    return summary


def _seeds(text: str) -> list[int]:
    """An argparse type: comma-separated sampling seeds, integers in [0, 2^32)."""
    return [checks.seed(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers > 1 (guidance scales)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = checks.Parser(prog="python -m fpdm.study", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="runs/study")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="feature networks (default ~/.cache/fpdm)")
    p.add_argument("--inception", default=None, help="pytorch-fid Inception weights: Inception FID too")
    p.add_argument("--patch", type=checks.positive_int, default=4)
    p.add_argument("--models", type=checks.names, default="dit8,dit12,fpdm1+1,fpdm2+2,fpdm1+1-init",
                   help=f"comma-separated: {MODEL_FORMS}")  # fmt: skip
    p.add_argument("--init-from", default="dit8", help="the DiT of --models that -init FPDMs start from")
    p.add_argument("--steps", type=checks.positive_int, default=2500, help="training steps of each model")
    p.add_argument("--init-steps", type=checks.positive_int, default=1000, help="training steps of -init models")
    p.add_argument("--stages", type=checks.positive_int, default=5, help="checkpoints scored per training")
    p.add_argument("--batch-size", type=checks.positive_int, default=64)
    p.add_argument("--budget-depth", type=checks.positive_int, default=8,
                   help="budgets are --dit-steps x this many block evaluations per sample")  # fmt: skip
    p.add_argument("--dit-steps", type=checks.positive_ints, default="1,2,3,5,10,20,50",
                   help="budgets, as steps of a DiT of --budget-depth blocks")  # fmt: skip
    p.add_argument("--variants", type=checks.names, default="uniform,reuse,smoothing+reuse",
                   help=f"FPDM variants: {', '.join(FPDM_VARIANTS)}")  # fmt: skip
    p.add_argument("--ablation", default=None,
                   help="the FPDM of --models whose other sampling variants are measured too (default: the first "
                   "FPDM trained from scratch; 'none': no ablation)")  # fmt: skip
    p.add_argument("--ablation-variants", type=checks.names, default="smoothing,realloc-high,realloc-low,anderson",
                   help="the --ablation model's further variants, each compared with its uniform")  # fmt: skip
    p.add_argument("--ablation-steps", type=checks.positive_ints, default="1,2,3,5",
                   help="budgets of the ablation, as --dit-steps (default: the paper's regime)")  # fmt: skip
    p.add_argument("--seeds", type=_seeds, default="0,1,2", help="sampling seeds (at least 3)")
    p.add_argument("--num-samples", type=int, default=200, help="samples per cell")
    p.add_argument("--sample-batch", type=checks.positive_int, default=250)
    p.add_argument("--guidance-grid", type=_floats, default="1.5,2,3,4", help="guidance scales to choose from")
    p.add_argument("--probe-steps", type=checks.positive_int, default=5,
                   help="budget (in --dit-steps) of the guidance choice and the training stages' scores")  # fmt: skip
    p.add_argument("--select-images", type=checks.positive_int, default=5000,
                   help="the last N training images: the guidance choice's reference (not the test set)")  # fmt: skip
    p.add_argument("--select-seed", type=checks.seed, default=1000, help="sampling seed of the guidance choice")
    p.add_argument("--target-frechet", type=float, default=None,
                   help="the quality of 'time to reach' (default: 1.25 x --init-from's final stage)")  # fmt: skip
    p.add_argument("--grid-steps", type=int, default=50, help="DDIM steps of each training's samples.png (0: none)")
    return p


def validate(args: argparse.Namespace) -> None:
    """Everything that would otherwise fail only after the models have trained: one line each."""
    specs = parse_models(args.models)
    check_variants(args.variants)
    check_variants(args.ablation_variants)
    ablation_model(specs, args.ablation)
    check_dataset(args.dataset, args.data_dir)
    if len(set(args.seeds)) < 3:
        seeds = ",".join(map(str, args.seeds))
        raise InputError(f"--seeds needs at least 3 different sampling seeds (a spread), got {seeds}")
    inits = [s for s in specs if s.init]
    source = next((s for s in specs if s.name == args.init_from), None)
    if inits and (source is None or source.kind != "dit"):
        raise InputError(f"{inits[0].name} starts from --init-from {args.init_from}, which is not a DiT of --models")
    for spec in inits:
        if source.depth < spec.pre + spec.post + 1:
            raise InputError(f"{spec.name} needs {spec.pre + spec.post + 1} blocks of {source.name}")
    probe = args.probe_steps * args.budget_depth
    poor = [s.name for s in specs if s.step_cost > probe]
    if poor:
        raise InputError(f"--probe-steps {args.probe_steps} ({probe} blocks) is less than one step of "
                         f"{', '.join(poor)}")  # fmt: skip
    if args.num_samples < 2:
        raise InputError(f"--num-samples must be at least 2 (a covariance needs two samples), got {args.num_samples}")
    if args.grid_steps < 0:
        raise InputError(f"--grid-steps must be >= 0 (0: no grid), got {args.grid_steps}")
    if args.target_frechet is not None:
        checks.number("--target-frechet", args.target_frechet, low=0)
    checks.output_dir(args.out)
    if args.cache_dir is not None:
        checks.output_dir(args.cache_dir, "--cache-dir")


def _run(args: argparse.Namespace) -> None:
    validate(args)
    with checks.run_lock(Path(args.out)):  # one study per folder (each training run locks its own)
        main(args)


def cli(argv: list[str] | None = None) -> int:
    try:
        return checks.run_cli(build_parser(), argv, _run)
    except TrainingFailed as err:  # the training command said why, in one line: not again
        return err.args[0]


if __name__ == "__main__":
    sys.exit(cli())
