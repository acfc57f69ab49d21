"""python -m fpdm.study at a toy size: argument checks, cell-level resume after an interruption, the spread
over seeds, the guidance choice's data, unaffordable budgets, the report; and the cost measurements."""

import dataclasses
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from fpdm import study
from fpdm.data import load_dataset
from fpdm.evaluate import feature_net_for
from fpdm.models import model_config
from fpdm.study_cost import measured_memory, training_seconds
from fpdm.study_report import aggregate, best_dit, claim_pairs, compare, versus

TOY = ["--dataset", "digits", "--patch", "2", "--models", "dit4,dit6,fpdm1+1-init", "--init-from", "dit4",
       "--steps", "4", "--init-steps", "2", "--stages", "2", "--batch-size", "16", "--budget-depth", "4",
       "--dit-steps", "1,2", "--variants", "uniform", "--num-samples", "20", "--guidance-grid", "2,3",
       "--probe-steps", "2", "--select-images", "100", "--grid-steps", "0", "--ablation", "fpdm1+1-init",
       "--ablation-variants", "anderson", "--ablation-steps", "1"]  # fmt: skip
INTERRUPT_AT = 5  # the sweep's 5th sample is interrupted (Ctrl-C)


@contextmanager
def one_thread():
    """Toy tensors in this process: a second thread only waits, and on a busy machine it waits long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory, feature_cache):
    """The toy study run three times: interrupted in its sweep, again to the end, and once more. Records what
    each run computed, which trainings and samples it ran, and what the guidance choice compared with."""
    out = tmp_path_factory.mktemp("study") / "study"
    argv = [*TOY, "--cache-dir", str(feature_cache), "--out", str(out)]
    log = {"runs": [], "selection_references": []}
    real_sample, real_train, real_frechet = study._sample, study._train, study.frechet_distance
    with one_thread(), pytest.MonkeyPatch.context() as mp:
        calls = {"sample": 0, "train": 0, "memory": 0, "interrupt": True}

        def sample(*a, **k):
            calls["sample"] += 1
            in_sweep = calls["sample"] - calls.get("before_sweep", calls["sample"])
            if calls["interrupt"] and in_sweep == INTERRUPT_AT:
                raise KeyboardInterrupt
            return real_sample(*a, **k)

        def train(*a, **k):
            calls["train"] += 1
            return real_train(*a, **k)

        def frechet(a, b):  # only the guidance choice calls study.frechet_distance (the sweep scores via score)
            log["selection_references"].append(np.array(b))
            return real_frechet(a, b)

        def sweep(*a, **k):  # counts the samples before the sweep: the interruption falls inside it
            calls.setdefault("before_sweep", calls["sample"])
            return real_sweep(*a, **k)

        def memory(*a):  # measured for real in its own test (a process of its own per model)
            calls["memory"] += 1
            return {"measured_mb": 1.0, "baseline_rss_mb": 0.0}

        real_sweep = study.sweep_cells
        mp.setattr(study, "_sample", sample)
        mp.setattr(study, "_train", train)
        mp.setattr(study, "frechet_distance", frechet)
        mp.setattr(study, "sweep_cells", sweep)
        mp.setattr(study, "measured_memory", memory)
        for interrupt in (True, False, False):
            calls.update(sample=0, train=0, memory=0, interrupt=interrupt)
            calls.pop("before_sweep", None)
            code = study.cli(argv)
            lines = (out / "cells.jsonl").read_text().splitlines()
            log["runs"].append({"code": code, "samples": calls["sample"], "trainings": calls["train"],
                                "memory": calls["memory"], "cells": len(lines)})  # fmt: skip
    return out, log


def test_study_resumes_cell_by_cell(toy_study):
    """Bug caught: the sweep redone (or trainings, memory measurements, the guidance choice) after an
    interruption or on a plain rerun, or a cell written twice, or one lost with the interruption."""
    out, log = toy_study
    first, second, third = log["runs"]
    assert first["code"] == 130  # interrupted: what it finished is kept
    assert second["code"] == 0 and third["code"] == 0
    records = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == second["cells"] == third["cells"]
    sweep = [r for r in records if r["kind"] == "sweep"]
    # the second run sampled exactly the sweep cells the first did not finish, and nothing else
    assert second["samples"] == len(sweep) - (INTERRUPT_AT - 1) and second["trainings"] == 0
    assert second["memory"] == 0 and first["memory"] == 3
    assert third["samples"] == third["trainings"] == third["memory"] == 0
    # every (model, variant, budget, guidance) holds the three seeds, each once
    assert len(sweep) == len({(r["model"], r["variant"], r["budget"], r["guidance"], r["seed"]) for r in sweep})
    assert {r["seed"] for r in sweep} == {0, 1, 2}


def test_study_skips_and_records_unaffordable_budgets(toy_study):
    """Bug caught: a DiT-6 at a 4-block budget sampled with 0 steps (or crashing the sweep), or dropped
    silently instead of being recorded and reported."""
    out, _ = toy_study
    records = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["kind"] == "skip"]
    assert [(r["model"], r["budget"]) for r in skipped] == [("dit6", 4)]
    sweep = [r for r in records if r["kind"] == "sweep"]
    assert {r["budget"] for r in sweep if r["model"] == "dit6"} == {8}
    assert all(r["steps"] == 1 and r["block_evaluations"] == 6 for r in sweep if r["model"] == "dit6")
    assert {r["budget"] for r in sweep if r["model"] == "dit4"} == {4, 8}
    assert "dit6 at 4 blocks" in (out / "report.md").read_text()


def test_guidance_is_chosen_on_held_out_training_images(toy_study, feature_cache):
    """Bug caught: the guidance scale chosen against the test reference (the numbers reported), or on other
    training images than the held-out split the report names, or a scale other than the lowest geometric mean."""
    out, log = toy_study
    net, _ = feature_net_for("digits", cache_dir=feature_cache, progress=False)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    with torch.no_grad():
        held_out = net.features(train.images[-100:]).numpy()
        test_features = net.features(test.images).numpy()
    seen = log["selection_references"]
    assert seen and all(b.shape == held_out.shape and np.allclose(b, held_out, atol=1e-5) for b in seen)
    assert not any(b.shape == test_features.shape for b in seen)
    summary = json.loads((out / "summary.json").read_text())
    selects = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    scores: dict[float, list[float]] = {}
    for record in (r for r in selects if r["kind"] == "select"):
        scores.setdefault(record["guidance"], []).append(record["frechet"])
    geo = {scale: float(np.exp(np.mean(np.log(v)))) for scale, v in scores.items()}
    assert sorted(geo) == [2.0, 3.0] and all(len(v) == len(scores[2.0]) > 1 for v in scores.values())
    assert summary["guidance"]["best"] == min(geo, key=lambda s: (geo[s], s))  # the lowest geometric mean wins
    assert summary["guidance"]["held_out"] == "training images 1337..1436 of 1437"
    guidances = {g["guidance"] for g in summary["groups"]}
    assert guidances == {1.0, summary["guidance"]["best"]}  # the same chosen scale for every model


def test_study_writes_report_figures_and_costs(toy_study):
    """Bug caught: a report without the regime tables, the figures or the cost columns; stages not scored."""
    out, _ = toy_study
    report = (out / "report.md").read_text()
    assert "## The paper's regime" in report and "quality_vs_compute.png" in report and "training.png" in report
    assert "| dit4 | 1 |" in report and "| fpdm1+1-init uniform | 1 |" in report and "## Training cost" in report
    # the ablation: its own table (against the model's uniform), not in the main tables; and the claims
    main, ablation = report.split("## Sampling variants of fpdm1+1-init")
    assert "anderson" not in main.split("## The claims")[0] and "| fpdm1+1-init anderson | 1 |" in ablation
    assert "| anderson vs uniform (fpdm1+1-init) | 1 | 1 |" in report
    for name in ("quality_vs_compute.png", "training.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    costs = summary["costs"]
    assert set(costs) == {"dit4", "dit6", "fpdm1+1-init"}
    assert costs["dit6"]["params"] > costs["dit4"]["params"] > costs["fpdm1+1-init"]["params"]
    assert costs["dit4"]["steps_per_s"] > 0 and costs["fpdm1+1-init"]["computed_worst_mb"] > 0
    stages = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["step"]) for r in stages if r["kind"] == "stage") == [
        ("dit4", 2), ("dit4", 4), ("dit6", 2), ("dit6", 4), ("fpdm1+1-init", 1), ("fpdm1+1-init", 2)]  # fmt: skip


def test_spread_is_mean_and_range_over_seeds():
    """Bug caught: the range taken over budgets or guidances instead of seeds, a mean of the wrong cells, or an
    FPDM marked better while the seed ranges overlap."""
    base = {"kind": "sweep", "dit_steps": 1, "budget": 8, "guidance": 1.0, "steps": 1, "block_evaluations": 8,
            "seconds": 1.0}  # fmt: skip
    rows = [{**base, "model": "dit8", "variant": "dit", "seed": s, "frechet": f, "cond_accuracy": a}
            for s, f, a in ((0, 10.0, 0.5), (1, 12.0, 0.6), (2, 14.0, 0.4))]  # fmt: skip
    rows += [{**base, "model": "fpdm1+1", "variant": "uniform", "seed": s, "frechet": f, "cond_accuracy": a}
             for s, f, a in ((0, 7.0, 0.55), (1, 9.0, 0.45), (2, 8.5, 0.50))]  # fmt: skip
    rows += [{**base, "guidance": 3.0, "model": "dit8", "variant": "dit", "seed": 0, "frechet": 1.0,
              "cond_accuracy": 0.9}]  # fmt: skip
    groups = {(g["model"], g["guidance"]): g for g in aggregate(rows)}
    dit, fpdm = groups[("dit8", 1.0)], groups[("fpdm1+1", 1.0)]
    assert dit["seeds"] == [0, 1, 2] and groups[("dit8", 3.0)]["seeds"] == [0]
    assert dit["frechet_mean"] == pytest.approx(12.0) and (dit["frechet_min"], dit["frechet_max"]) == (10.0, 14.0)
    assert fpdm["frechet_mean"] == pytest.approx((7 + 9 + 8.5) / 3)
    assert (fpdm["cond_accuracy_min"], fpdm["cond_accuracy_max"]) == (0.45, 0.55)
    assert versus(fpdm, dit, "frechet") == "better"  # 7..9 below 10..14: beyond the spread
    assert versus(dit, fpdm, "frechet") == "worse"
    assert versus(fpdm, dit, "cond_accuracy") == "within spread"  # 0.45..0.55 overlaps 0.4..0.6
    assert best_dit(aggregate(rows), 8, 1.0)["model"] == "dit8" and best_dit(aggregate(rows), 16, 1.0) is None


def test_sweep_settings_cover_the_ablation_once_smallest_budget_first():
    """Bug caught: the ablation's uniform sampled twice (or missing where the main variants lack it), its variants
    run at every budget or on another model, or the sweep ordered by model so that an interrupted study has the
    long budgets of one model and none of the paper's regime of the others."""
    args = study.build_parser().parse_args(["--dit-steps", "1,5,50", "--variants", "reuse",
                                            "--ablation-steps", "1,5", "--ablation-variants", "anderson"])  # fmt: skip
    specs = study.parse_models(["dit8", "fpdm1+1", "fpdm2+2"])
    settings = [(spec.name, steps, variant) for spec, steps, variant in study.sweep_settings(specs, args)]
    assert len(settings) == len(set(settings))
    assert [steps for _, steps, _ in settings] == sorted(steps for _, steps, _ in settings)
    assert {s for s in settings if s[0] == "fpdm1+1"} == {("fpdm1+1", n, v) for n in (1, 5, 50) for v in ["reuse"]} | {
        ("fpdm1+1", n, v) for n in (1, 5) for v in ("uniform", "anderson")}  # fmt: skip
    assert {v for name, _, v in settings if name == "fpdm2+2"} == {"reuse"}
    assert study.ablation_model(specs, None).name == "fpdm1+1" and study.ablation_model(specs, "none") is None
    assert study.ablation_model(study.parse_models(["dit8", "fpdm1+1-init"]), None).name == "fpdm1+1-init"
    assert study.ablation_model(study.parse_models(["dit8"]), None) is None


def _group(model, variant, budget, frechet, accuracy=0.5, guidance=1.0):
    """One aggregated cell with a seed range of +-1 around ``frechet`` and +-0.01 around ``accuracy``."""
    return {"model": model, "variant": variant, "budget": budget, "guidance": guidance, "frechet_mean": frechet,
            "frechet_min": frechet - 1, "frechet_max": frechet + 1, "cond_accuracy_mean": accuracy,
            "cond_accuracy_min": accuracy - 0.01, "cond_accuracy_max": accuracy + 0.01}  # fmt: skip


def test_claims_pair_each_setting_with_its_baseline():
    """Bug caught: an FPDM compared with a DiT at another budget or guidance, or with the worse DiT; the ablation's
    variants counted as 'every FPDM', or a fixed list of them reported instead of the ones it ran; an -init model
    paired with another variant of its scratch twin; a change reported as b / a instead of a / b; counts that do
    not add up."""
    groups = [_group("dit8", "dit", 8, 20.0), _group("dit12", "dit", 16, 30.0), _group("dit8", "dit", 16, 10.0),
              _group("fpdm1+1", "uniform", 8, 15.0, 0.6), _group("fpdm1+1", "reuse", 8, 14.5),
              _group("fpdm1+1", "uniform", 16, 12.0), _group("fpdm1+1", "anderson", 8, 25.0),
              _group("fpdm1+1-init", "uniform", 8, 10.0), _group("fpdm1+1-init", "reuse", 8, 30.0),
              _group("fpdm1+1", "uniform", 8, 1.0, guidance=3.0)]  # fmt: skip
    claims = claim_pairs(groups, regime_budget=8, variants=["uniform", "reuse"], ablation="fpdm1+1",
                         ablation_variants=["uniform", "anderson", "realloc-high"], reference_dit="dit8")  # fmt: skip
    pairs = {name: [(a["model"], a["variant"], a["budget"], b["model"], b["variant"], b["budget"]) for a, b in found]
             for name, found in claims.items()}  # fmt: skip
    low = "FPDM (every model, variant) vs the best DiT, the paper's regime"
    assert sorted(pairs[low]) == sorted([("fpdm1+1", "uniform", 8, "dit8", "dit", 8),
                                         ("fpdm1+1", "reuse", 8, "dit8", "dit", 8),
                                         ("fpdm1+1-init", "uniform", 8, "dit8", "dit", 8),
                                         ("fpdm1+1-init", "reuse", 8, "dit8", "dit", 8)])  # fmt: skip
    # at 16 blocks the better DiT (dit8, 2 steps) is the baseline, not the deeper one
    assert pairs["FPDM (every model, variant) vs the best DiT, longer budgets"] == [
        ("fpdm1+1", "uniform", 16, "dit8", "dit", 16)]  # fmt: skip
    assert pairs["FPDM from the trained DiT (-init) vs from scratch"] == [
        ("fpdm1+1-init", "uniform", 8, "fpdm1+1", "uniform", 8), ("fpdm1+1-init", "reuse", 8, "fpdm1+1", "reuse", 8)]
    assert pairs["anderson vs uniform (fpdm1+1)"] == [("fpdm1+1", "anderson", 8, "fpdm1+1", "uniform", 8)]
    assert pairs["a deeper DiT vs dit8"] == [("dit12", "dit", 16, "dit8", "dit", 16)]
    assert "realloc-high vs uniform (fpdm1+1)" not in claims  # no such cells: no row
    assert "uniform vs uniform (fpdm1+1)" not in claims  # the baseline is not compared with itself
    only_realloc = claim_pairs(groups, regime_budget=8, variants=["uniform", "reuse"], ablation="fpdm1+1",
                               ablation_variants=["realloc-high"], reference_dit="dit8")  # fmt: skip
    assert "anderson vs uniform (fpdm1+1)" not in only_realloc  # a variant not asked for: no row
    result = compare(claims[low])
    fr, acc = result["frechet"], result["cond_accuracy"]
    assert result["cells"] == 4 and (fr["better"], fr["worse"], fr["within"]) == (3, 1, 0)
    assert fr["median"] == pytest.approx(np.median([15 / 20 - 1, 14.5 / 20 - 1, 10 / 20 - 1, 30 / 20 - 1]))
    assert (fr["min"], fr["max"]) == (pytest.approx(-0.5), pytest.approx(0.5))
    assert (acc["better"], acc["worse"], acc["within"]) == (1, 0, 3) and acc["max"] == pytest.approx(0.1)


def test_training_seconds_from_metrics():
    """Bug caught: time to a step computed from the cumulative step count instead of each record's window."""
    records = [{"step": 10, "steps_per_s": 2.0}, {"step": 20, "steps_per_s": 5.0}, {"step": 30, "loss": 1.0}]
    assert training_seconds(records, 20) == pytest.approx(10 / 2 + 10 / 5)
    assert training_seconds(records, 15) == pytest.approx(10 / 2 + 5 / 5)
    assert training_seconds(records, 25) is None  # not reached by a timed record


def test_measured_memory_holds_the_training_state(tmp_path, monkeypatch):
    """Bug caught: a baseline taken after an earlier peak (an import's), which reads ~0 for a small model, or
    after the model was built. At the peak the weights, gradients and AdamW's two moments (16 B per parameter)
    are all resident."""
    cfg = model_config("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=4)
    (tmp_path / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measuring process's threads: toy tensors need one
    measured = measured_memory(tmp_path / "config.json", 16)
    assert measured["measured_mb"] >= 16 * cfg.num_parameters / 2**20


def test_cells_file_drops_a_torn_line(tmp_path):
    """Bug caught: a cell appended after a line torn by a kill is glued onto it and lost on the next read."""
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps({"key": "a", "kind": "sweep"}) + '\n{"key": "b", "ki')
    cells = study.Cells(path)
    cells.add("c", {"kind": "sweep"})
    assert set(study.Cells(path).done) == {"a", "c"}
    path.write_text(json.dumps({"key": "a", "kind": "sweep"}))  # whole, but cut before its newline
    study.Cells(path).add("b", {"kind": "sweep"})
    assert set(study.Cells(path).done) == {"a", "b"}


@pytest.mark.parametrize(
    "args, match",
    [
        (["--models", "dit8,vit3"], "--models: unknown model 'vit3'"),
        (["--seeds", "0,1"], "--seeds needs at least 3 different sampling seeds"),
        (["--seeds", "0,x,2"], "argument --seeds: expected an integer in [0, 2^32), got 'x'"),
        (["--variants", "uniform,nope"], "unknown variant(s) nope"),
        (["--guidance-grid", "1,2"], "expected comma-separated numbers > 1, got '1,2'"),
        (["--models", "dit8,fpdm1+1-init", "--init-from", "dit12"], "which is not a DiT of --models"),
        (["--models", "dit12", "--probe-steps", "1"], "--probe-steps 1 (8 blocks) is less than one step of dit12"),
        (["--dit-steps", "a"], "expected comma-separated integers, got 'a'"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--num-samples", "1"], "--num-samples must be at least 2"),
        (["--ablation", "dit8"], "--ablation dit8 is not an FPDM of --models ('none': no ablation)"),
        (["--ablation-variants", "smoothing,x"], "unknown variant(s) x"),
    ],
)
def test_study_bad_input_is_one_line(tmp_path, cli, args, match):
    """Bug caught: a bad flag found only after hours of training, or reported as a traceback."""
    code, _, err = cli("fpdm.study", ["--out", tmp_path / "study", *args])
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and match in err, err
