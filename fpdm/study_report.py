"""The study's report: cells aggregated over seeds, the FPDM-vs-DiT comparison against the spread, the
quality-vs-compute figure, one table per regime, training cost and the loss curves."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import write_json, write_text
from .images import pyplot, save_figure, smooth_curve, smoothing_half_width
from .study_cost import training_seconds
from .train import read_metrics

PAPER_REGIME = 5  # budgets of at most this many reference-DiT steps: the paper's regime (DiT-XL: 1.4 steps)
# a score's name: is higher better
METRICS = {"frechet": False, "cond_accuracy": True, "inception_fid": False, "sfid": False, "precision": True,
           "recall": True, "inception_score": True}  # fmt: skip
TARGET_SLACK = 1.25  # default fixed quality: within 25% of the reference DiT's final Frechet distance


def aggregate(rows: list[dict]) -> list[dict]:
    """One group per (model, variant, budget, guidance) of the sweep records: the seeds, and for each metric
    every seed has, its mean, min and max; steps, block evaluations and seconds as means."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "sweep":
            groups.setdefault((r["model"], r["variant"], r["budget"], r["guidance"]), []).append(r)
    out = []
    for (model, variant, budget, guidance), cells in groups.items():
        group = {"model": model, "variant": variant, "budget": budget, "guidance": guidance,
                 "dit_steps": cells[0]["dit_steps"], "seeds": sorted(c["seed"] for c in cells)}  # fmt: skip
        for name in ("steps", "block_evaluations", "seconds"):
            group[name] = float(np.mean([c[name] for c in cells]))
        for metric in METRICS:
            if all(metric in c for c in cells):
                values = [c[metric] for c in cells]
                group.update({f"{metric}_mean": float(np.mean(values)), f"{metric}_min": float(min(values)),
                              f"{metric}_max": float(max(values))})  # fmt: skip
        out.append(group)
    return out


def versus(a: dict, b: dict, metric: str) -> str:
    """``better`` / ``worse`` when ``a``'s range over seeds lies wholly on the better / worse side of ``b``'s (the
    ranges do not overlap), else ``within spread``."""
    higher = METRICS[metric]
    lo_a, hi_a, lo_b, hi_b = (g[f"{metric}_{end}"] for g in (a, b) for end in ("min", "max"))
    if (lo_a > hi_b) if higher else (hi_a < lo_b):
        return "better"
    if (hi_a < lo_b) if higher else (lo_a > hi_b):
        return "worse"
    return "within spread"


def best_dit(groups: list[dict], budget: int, guidance: float) -> dict | None:
    """The DiT with the lowest mean Frechet distance at ``budget`` and ``guidance`` (None if none affords it)."""
    dits = [g for g in groups if g["variant"] == "dit" and g["budget"] == budget and g["guidance"] == guidance]
    return min(dits, key=lambda g: g["frechet_mean"], default=None)


def loss_trend(records: list[dict]) -> float | None:
    """Relative change of the mean loss over the last 20% of the records against the 20% before them
    (negative: still falling); None with fewer than 10 records."""
    losses = [r["loss"] for r in records if "loss" in r]
    n = len(losses) // 5
    if n < 2:
        return None
    return float(np.mean(losses[-n:]) / np.mean(losses[-2 * n : -n]) - 1)


def time_to_target(stages: list[dict], records: list[dict], target: float) -> tuple[int | None, float | None]:
    """The first scored stage at or below ``target`` Frechet distance: its step and the training seconds to it."""
    for stage in sorted(stages, key=lambda s: s["step"]):
        if "frechet" in stage and stage["frechet"] <= target:
            return stage["step"], training_seconds(records, stage["step"])
    return None, None


def _label(model: str, variant: str) -> str:
    return model if variant == "dit" else f"{model} {variant}"


def _cell(group: dict | None, baseline: dict | None) -> str:
    if group is None:
        return "—"
    text = " / ".join(f"{group[f'{m}_mean']:{spec}} [{group[f'{m}_min']:{spec}}–{group[f'{m}_max']:{spec}}]"
                      for m, spec in (("frechet", ".2f"), ("cond_accuracy", ".3f")))  # fmt: skip
    if "inception_fid_mean" in group:
        text += f" / FID {group['inception_fid_mean']:.1f}"
    if group["variant"] != "dit" and baseline is not None and baseline is not group:
        marks = {"better": "▲", "worse": "▼", "within spread": "≈"}
        text += f" {marks[versus(group, baseline, 'frechet')]}{marks[versus(group, baseline, 'cond_accuracy')]}"
    return text + f" ({group['steps']:g} st)"


def same_model(groups: list[dict], variant: str) -> Callable[[dict], dict | None]:
    """A group's own model in ``variant`` at its budget and guidance (the ablation table's comparison: uniform)."""
    index = {(g["model"], g["variant"], g["budget"], g["guidance"]): g for g in groups}
    return lambda g: index.get((g["model"], variant, g["budget"], g["guidance"]))


def regime_table(groups: list[dict], skipped: list[dict], budgets: list[int], guidances: list[float],
                 models: list[str], baseline: Callable[[dict], dict | None] | None = None) -> list[str]:  # fmt: skip
    """Rows (model/variant, guidance) x columns (budgets): mean [min–max] of Frechet / conditional accuracy;
    rows in the order of ``models``; an FPDM marked against ``baseline(group)`` (default: the best DiT)."""
    if baseline is None:
        baseline = lambda g: best_dit(groups, g["budget"], g["guidance"])  # noqa: E731
    series = sorted({(g["model"], g["variant"]) for g in groups} | {(s["model"], s["variant"]) for s in skipped},
                    key=lambda s: (models.index(s[0]), s[1]))  # fmt: skip
    steps = {g["budget"]: g["dit_steps"] for g in groups} | {s["budget"]: s["dit_steps"] for s in skipped}
    lines = ["| model / variant | guidance | " + " | ".join(f"{b} blocks ({steps.get(b, '?')} ref. steps)"
             for b in budgets) + " |", "|---|---|" + "---|" * len(budgets)]  # fmt: skip
    index = {(g["model"], g["variant"], g["budget"], g["guidance"]): g for g in groups}
    for guidance in guidances:
        for model, variant in series:
            cells = []
            for budget in budgets:
                if any((s["model"], s["variant"], s["budget"]) == (model, variant, budget) for s in skipped):
                    cells.append("no cell: cannot afford one step")
                else:
                    group = index.get((model, variant, budget, guidance))
                    cells.append(_cell(group, None if group is None else baseline(group)))
            lines.append(f"| {_label(model, variant)} | {guidance:g} | " + " | ".join(cells) + " |")
    return lines


def compare(pairs: list[tuple[dict, dict]]) -> dict:
    """What pairs (a group, its baseline) say: in how many a's seed range lies wholly on the better / worse side
    of its baseline's (Frechet distance and accuracy), and a's change: Frechet relative (a / b - 1), accuracy
    in points (a - b), median [min, max] over the pairs."""
    out: dict = {"cells": len(pairs)}
    for metric, change in (("frechet", lambda a, b: a / b - 1), ("cond_accuracy", lambda a, b: a - b)):
        verdicts = [versus(a, b, metric) for a, b in pairs]
        changes = [change(a[f"{metric}_mean"], b[f"{metric}_mean"]) for a, b in pairs]
        out[metric] = {"better": verdicts.count("better"), "worse": verdicts.count("worse"),
                       "within": verdicts.count("within spread"),
                       "median": float(np.median(changes)) if changes else None,
                       "min": min(changes, default=None), "max": max(changes, default=None)}  # fmt: skip
    return out


def claim_pairs(groups: list[dict], *, regime_budget: int, variants: list[str], ablation: str | None,
                ablation_variants: list[str], reference_dit: str) -> dict[str, list[tuple[dict, dict]]]:  # fmt: skip
    """The comparisons behind each claim, as (group, baseline) pairs at the same budget and guidance.
    ``variants``: the FPDM variants every FPDM ran; ``ablation``: the model that ran ``ablation_variants``
    (each compared with its uniform); ``reference_dit``: the DiT a deeper one is compared with."""
    index = {(g["model"], g["variant"], g["budget"], g["guidance"]): g for g in groups}

    def at(model: str | Callable[[dict], str], variant: str | None) -> Callable[[dict], dict | None]:
        """The group of ``model`` (a name, or a function of the group) in ``variant`` (None: the group's own)."""
        return lambda g: index.get((model(g) if callable(model) else model, variant or g["variant"], g["budget"],
                                    g["guidance"]))  # fmt: skip

    def pairs(select: Callable[[dict], bool], baseline: Callable[[dict], dict | None]) -> list[tuple[dict, dict]]:
        return [(g, b) for g in groups if select(g) and (b := baseline(g)) is not None and b is not g]

    fpdm = lambda g: g["variant"] in variants and g["variant"] != "dit"  # noqa: E731
    best = lambda g: best_dit(groups, g["budget"], g["guidance"])  # noqa: E731
    ablated = lambda variant: lambda g: g["model"] == ablation and g["variant"] == variant  # noqa: E731
    uniform = same_model(groups, "uniform")
    claims = {
        "FPDM (every model, variant) vs the best DiT, the paper's regime":
            pairs(lambda g: fpdm(g) and g["budget"] <= regime_budget, best),
        "FPDM (every model, variant) vs the best DiT, longer budgets":
            pairs(lambda g: fpdm(g) and g["budget"] > regime_budget, best),
        "reuse vs uniform (each FPDM)": pairs(lambda g: g["variant"] == "reuse", uniform),
        "smoothing with reuse vs reuse (each FPDM)":
            pairs(lambda g: g["variant"] == "smoothing+reuse", same_model(groups, "reuse")),
        "FPDM from the trained DiT (-init) vs from scratch": pairs(
            lambda g: g["model"].endswith("-init"), at(lambda g: g["model"].removesuffix("-init"), None)),
        f"a deeper DiT vs {reference_dit}": pairs(
            lambda g: g["variant"] == "dit" and g["model"] != reference_dit, at(reference_dit, "dit")),
    }  # fmt: skip
    if ablation is not None:
        for variant in ablation_variants:  # (uniform itself: no pair, each group would be its own baseline)
            claims[f"{variant} vs uniform ({ablation})"] = pairs(ablated(variant), uniform)
    return {name: found for name, found in claims.items() if found}


def claims_table(groups: list[dict], guidances: list[float], **kwargs) -> tuple[list[str], list[dict]]:
    """The verdict table (one row per claim and guidance: ``compare`` of ``claim_pairs``) and its records."""
    lines = ["| claim | guidance | cells | Frechet: better / worse / within spread | Frechet change, median "
             "[min, max] | accuracy: better / worse / within | accuracy change (points), median [min, max] |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    records = []
    for guidance in guidances:
        chosen = [g for g in groups if g["guidance"] == guidance]
        for claim, found in claim_pairs(chosen, **kwargs).items():
            result = {"claim": claim, "guidance": guidance, **compare(found)}
            records.append(result)
            fr, acc = result["frechet"], result["cond_accuracy"]
            lines.append(f"| {claim} | {guidance:g} | {result['cells']} | {fr['better']} / {fr['worse']} / "
                         f"{fr['within']} | {fr['median']:+.1%} [{fr['min']:+.1%}, {fr['max']:+.1%}] | "
                         f"{acc['better']} / {acc['worse']} / {acc['within']} | {100 * acc['median']:+.1f} "
                         f"[{100 * acc['min']:+.1f}, {100 * acc['max']:+.1f}] |")  # fmt: skip
    return lines, records


def plot_quality(groups: list[dict], guidances: list[float], models: list[str], path: Path, title: str) -> Path:
    """Frechet distance and conditional accuracy vs block evaluations per sample, one row per guidance: the
    mean over seeds as a line, their range as a band, one colour per model, one line style per variant."""
    plt = pyplot()
    fig, axes = plt.subplots(len(guidances), 2, figsize=(12, 4.2 * len(guidances)), squeeze=False)
    variants = sorted({g["variant"] for g in groups})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    styles = dict(zip(variants, ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 2)), (0, (3, 1, 1, 1))], strict=False))
    series = sorted({(g["model"], g["variant"]) for g in groups}, key=lambda s: (models.index(s[0]), s[1]))
    for row, guidance in zip(axes, guidances):
        for model, variant in series:
            points = sorted((g for g in groups if (g["model"], g["variant"], g["guidance"]) == (model, variant,
                             guidance)), key=lambda g: g["block_evaluations"])  # fmt: skip
            x = [g["block_evaluations"] for g in points]
            for ax, metric in zip(row, ("frechet", "cond_accuracy")):
                ax.plot(x, [g[f"{metric}_mean"] for g in points], marker="o", ms=3, color=colours[model],
                        ls=styles.get(variant, "-"), lw=2 if variant == "dit" else 1.2,
                        label=_label(model, variant))  # fmt: skip
                ax.fill_between(x, [g[f"{metric}_min"] for g in points], [g[f"{metric}_max"] for g in points],
                                color=colours[model], alpha=0.12)  # fmt: skip
        for ax, ylabel in zip(row, ("Frechet distance, feature net (lower is better)", "conditional accuracy")):
            ax.set_xscale("log")
            ax.set_xlabel("block evaluations per sample")
            ax.set_ylabel(ylabel, fontsize=9)
            ax.set_title(f"guidance {guidance:g}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_yscale("log")
    axes[0, 1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training(curves: dict[str, list[dict]], stages: list[dict], target: float | None, path: Path) -> Path:
    """Every model's loss curve (smoothed) and its scored stages' Frechet distance, vs training step."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (model, records) in enumerate(curves.items()):
        colour = plt.cm.tab10(i % 10)
        points = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if points:
            steps, losses = zip(*points)
            left.plot(steps, smooth_curve(list(losses), smoothing_half_width(len(losses))), color=colour, label=model)
        scored = sorted((s["step"], s["frechet"]) for s in stages if s["model"] == model and "frechet" in s)
        if scored:
            right.plot(*zip(*scored), marker="o", color=colour, label=model)
    if target is not None:
        right.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.2f}")
    left.set(xlabel="training step", ylabel="training loss (smoothed)", yscale="log")
    right.set(xlabel="training step", ylabel="Frechet distance of the stage's checkpoint", yscale="log")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(out: Path, *, specs, ablation: str | None, args: argparse.Namespace, rows: list[dict],
                 stages: list[dict], costs: dict, guidance: dict, feature_accuracy: float) -> Path:  # fmt: skip
    """summary.json, quality_vs_compute.png, training.png and report.md in ``out``; ``ablation``: the model that
    ran the further sampling variants (None: none)."""
    every = aggregate(rows)
    main_variants = {"dit", *args.variants}
    groups = [g for g in every if g["variant"] in main_variants]  # what every model ran: the figure, the tables
    ablated = [g for g in every if g["model"] == ablation and g["dit_steps"] in args.ablation_steps]
    skipped = [r for r in rows if r["kind"] == "skip"]
    guidances = [1.0, guidance["best"]]
    names = [s.name for s in specs]
    curves = {name: read_metrics(out / name / "metrics.jsonl") for name in names}
    stage_of = {name: [s for s in stages if s["model"] == name] for name in names}
    ref_final = max(stage_of.get(args.init_from, []), key=lambda s: s["step"], default={})
    target = args.target_frechet if args.target_frechet is not None else (
        TARGET_SLACK * ref_final["frechet"] if "frechet" in ref_final else None)  # fmt: skip
    title = (f"{args.dataset}: {args.num_samples} samples per cell, seeds {','.join(map(str, args.seeds))} "
             f"(line: mean, band: range); feature net test accuracy {feature_accuracy:.3f}")  # fmt: skip
    plot_quality(groups, guidances, names, out / "quality_vs_compute.png", title)
    plot_training(curves, stages, target, out / "training.png")

    lines = [f"# FPDM vs DiT on {args.dataset}", "",
             f"Budgets are block evaluations per sample: k reference steps = k x {args.budget_depth} blocks (a DiT "
             f"of {args.budget_depth} blocks taking k steps). Each model spends a budget its own way: a DiT of D "
             "blocks takes floor(budget / D) steps, an FPDM its variant's steps with the rest as fixed-point calls; "
             "a model that cannot afford one step has no cell. Each cell: Frechet distance in the feature network's "
             "space mean [min–max] / conditional accuracy mean [min–max] over the seeds (model's sampling steps). "
             "Markers compare an FPDM with the best DiT at the same budget and guidance, Frechet then accuracy: "
             "▲ better and ▼ worse beyond the spread (the seed ranges do not overlap), ≈ within it.", "",
             "![quality vs compute](quality_vs_compute.png)", ""]  # fmt: skip
    budgets = sorted({r["budget"] for r in rows})
    for heading, chosen in ((f"The paper's regime: at most {PAPER_REGIME} reference steps", [
            b for b in budgets if b <= PAPER_REGIME * args.budget_depth]),
            ("Longer budgets", [b for b in budgets if b > PAPER_REGIME * args.budget_depth])):  # fmt: skip
        if chosen:
            lines += [f"## {heading}", "", *regime_table(groups, skipped, chosen, guidances, names), ""]
    if ablation is not None:
        chosen = sorted({g["budget"] for g in ablated})
        lines += [f"## Sampling variants of {ablation}", "",
                  f"Each variant of {ablation} against its own `uniform` at the same budget and guidance (markers as "
                  "above).", "", *regime_table(ablated, [s for s in skipped if s["model"] == ablation], chosen,
                                              guidances, [ablation], same_model(ablated, "uniform")), ""]  # fmt: skip
    verdict, verdict_records = claims_table(every, guidances, regime_budget=PAPER_REGIME * args.budget_depth,
                                            variants=args.variants, ablation=ablation,
                                            ablation_variants=args.ablation_variants,
                                            reference_dit=args.init_from)  # fmt: skip
    lines += ["## The claims, cell by cell", "",
              "Each claim's comparisons at the same budget and guidance: in how many cells the first setting's "
              "range over seeds lies wholly below (better) or above (worse) the second's, or overlaps it; its "
              "Frechet distance's relative change and its accuracy's change, median [min, max] over the cells.",
              "", *verdict, ""]  # fmt: skip
    geo = ", ".join(f"{s:g}: {v:.2f}" for s, v in sorted(guidance["geometric_mean_frechet"].items()))
    lines += ["## Guidance", "",
              f"Chosen scale: **{guidance['best']:g}**, the same for every model. Rule: every model samples "
              f"{args.num_samples} images at {guidance['budget']} blocks (a DiT its steps, an FPDM uniform) with seed "
              f"{args.select_seed} at each scale of the grid; the scale with the lowest geometric mean of the models' "
              f"Frechet distances to the held-out images wins. Held-out images: {guidance['held_out']} (the test "
              f"images are never seen; the diffusion models and the feature network did train on these). "
              f"Geometric means: {geo}.", ""]  # fmt: skip

    lines += ["## Training cost", "",
              "| model | parameters | steps/s (median) | training time (s) | final loss | loss change, last 20% vs "
              "the 20% before | memory computed (MB) | memory measured (MB) | step reaching the target | "
              "seconds to it |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary_costs = {}
    for name in names:
        records, cost = curves[name], costs[name]
        speeds = sorted(r["steps_per_s"] for r in records if r.get("steps_per_s"))
        last = records[-1]["step"] if records else 0
        step, seconds = time_to_target(stage_of[name], records, target) if target is not None else (None, None)
        entry = {**{k: v for k, v in cost.items() if k != "key"}, "steps_per_s": speeds[len(speeds) // 2] if speeds
                 else None, "training_seconds": training_seconds(records, last), "final_loss": records[-1]["loss"]
                 if records else None, "loss_trend": loss_trend(records), "target_step": step,
                 "target_seconds": seconds}  # fmt: skip
        summary_costs[name] = entry
        computed = f"{entry['computed_mb']:.0f}" + (f" (worst draw {entry['computed_worst_mb']:.0f})"
                                                    if "computed_worst_mb" in entry else "")  # fmt: skip
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {name} | {entry['params'] / 1e6:.2f}M | {fmt(entry['steps_per_s'], '.2f')} | "
                     f"{fmt(entry['training_seconds'], '.0f')} | {fmt(entry['final_loss'], '.4f')} | "
                     f"{fmt(entry['loss_trend'], '+.1%')} | {computed} | {entry['measured_mb']:.0f} | "
                     f"{fmt(step, 'd')} | {fmt(seconds, '.0f')} |")  # fmt: skip
    lines += ["", f"Target quality: Frechet distance {'—' if target is None else f'{target:.2f}'} at "
              f"{args.probe_steps * args.budget_depth} blocks, unguided (default: {TARGET_SLACK} x the final "
              f"stage of {args.init_from}); an -init model's steps and seconds count from its initialisation, not "
              "its DiT's training. Memory measured: the peak resident memory three training steps add in a fresh "
              "process (weights, gradients, AdamW state, activations, temporaries; an FPDM in its worst S-JFB "
              "draw); computed: 16 B per parameter plus the bytes saved for backward.", "",
              "![training](training.png)", "", "## Quality over training", "",
              "| model | step: Frechet / accuracy |", "|---|---|"]  # fmt: skip
    for name in names:
        scored = sorted(stage_of[name], key=lambda s: s["step"])
        cells = [f"{s['step']}: {s['frechet']:.2f} / {s['cond_accuracy']:.3f}" if "frechet" in s
                 else f"{s['step']}: missed ({s['missed']})" for s in scored]  # fmt: skip
        lines.append(f"| {name} | " + "; ".join(cells) + " |")
    if skipped:
        lines += ["", "## Budgets a model cannot afford", ""]
        lines += [f"- {_label(s['model'], s['variant'])} at {s['budget']} blocks: {s['reason']}" for s in skipped]
    write_json(out / "summary.json", {"groups": every, "skipped": skipped, "costs": summary_costs,
                                      "guidance": guidance, "target_frechet": target,
                                      "claims": verdict_records})  # fmt: skip
    return write_text(out / "report.md", "\n".join(lines) + "\n")
