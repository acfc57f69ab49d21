"""Weights in the field's formats: official DiT, the FPDM release, ours and exports; --init; no code runs on load.

The outside layouts are built from their published names and shapes at tiny sizes (tests/release_reference.py)
and checked against a plain restatement of the released forward passes."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from release_reference import release_forward, release_state_dict

import fpdm.models
from fpdm import CheckpointError, create_model, load_model, read_weights
from fpdm.checkpoint import FORMAT
from fpdm.models import LEGACY_FIELDS

X = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 500, 999])
Y = torch.tensor([1, 5, 10])  # 10: the null class


def _outputs_match(model, sd, **reference):
    with torch.no_grad():
        ours, theirs = model(X, T, Y), release_forward(sd, X, T, Y, **reference)
    assert ours.abs().max() > 0.1  # weights that do something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_official_dit_checkpoint_loads_with_its_architecture_and_outputs(tmp_path):
    """Bugs: a timm name not mapped (x_embedder.proj, embedding_table), depth/patch/size/sigma misread."""
    sd = release_state_dict("dit", hidden=64, depth=3, learn_sigma=True)
    torch.save(sd, tmp_path / "DiT-tiny.pt")  # the official files: a bare state_dict
    model = load_model(tmp_path / "DiT-tiny.pt", num_heads=4)
    cfg = model.config
    assert (cfg.kind, cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.input_size, cfg.in_channels) == (
        "dit", 3, 64, 2, 8, 4)  # fmt: skip
    assert (cfg.num_classes, cfg.null_class, cfg.learn_sigma, model.training) == (10, True, True, False)
    _outputs_match(model, sd, heads=4)


def test_a_named_width_gives_its_heads_and_a_width_without_one_asks_for_it(tmp_path):
    sd = release_state_dict("dit", hidden=128, depth=2, std=0.02)  # 128: our T size, 4 heads
    torch.save(sd, tmp_path / "t.pt")
    assert load_model(tmp_path / "t.pt").config.num_heads == 4
    torch.save(release_state_dict("dit", hidden=96, depth=1), tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="do not say the model's num_heads; give it"):
        load_model(tmp_path / "odd.pt")


def test_dit_trained_without_label_dropout_has_no_null_row(tmp_path):
    """Bug: assuming a null row always (a 10-class model without one loads as 9 classes, or fails)."""
    sd = release_state_dict("dit", null_row=False)
    torch.save(sd, tmp_path / "nonull.pt")
    model = load_model(tmp_path / "nonull.pt", num_heads=4, num_classes=10)
    assert (model.config.num_classes, model.config.null_class, model.config.class_dropout_prob) == (10, False, 0.0)
    y = torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(model(X, T, y), release_forward(sd, X, T, y, heads=4), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="10 rows, which fits neither 12 classes"):
        load_model(tmp_path / "nonull.pt", num_heads=4, num_classes=12)
    with pytest.raises(ValueError, match="no null class to drop labels to"):
        create_model("DiT-T/2", null_class=False)  # label dropout needs the null row


def test_dit_training_checkpoints_with_namespace_args_load_ema_by_default(tmp_path):
    """DiT's train.py stores {"model", "ema", "opt", "args": Namespace}: a Namespace is allowed, the EMA taken."""
    ema, raw = release_state_dict("dit", seed=1), release_state_dict("dit", seed=2)
    args = argparse.Namespace(model="DiT-custom", image_size=64, num_classes=10)
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()}, "ema": ema, "opt": {}, "args": args},
               tmp_path / "0001000.pt")  # fmt: skip
    _outputs_match(load_model(tmp_path / "0001000.pt", num_heads=4), ema, heads=4)
    _outputs_match(load_model(tmp_path / "0001000.pt", weights="model", num_heads=4), raw, heads=4)


@pytest.mark.parametrize("timestep", [False, True])
def test_fpdm_release_checkpoint_loads_its_settings_and_matches_the_release(tmp_path, timestep):
    """Bugs: exact GELU in the projection, the final layer conditioned on t + y, pre/post depth misread, the
    release's pre/post timestep flag ignored, a different iteration count than the release samples with."""
    ema = release_state_dict("fpdm", pre=1, post=2, seed=3)
    args = {"model": "DiT-XL/2", "fixed_point": True, "fixed_point_pre_depth": 1, "fixed_point_post_depth": 2,
            "fixed_point_no_grad_min_iters": 0, "fixed_point_no_grad_max_iters": 6,
            "fixed_point_with_grad_min_iters": 2, "fixed_point_with_grad_max_iters": 9,
            "fixed_point_pre_post_timestep_conditioning": timestep}  # fmt: skip
    torch.save({"model": ema, "ema": ema, "opt": {}, "args": args, "train_steps": 7}, tmp_path / "fpdm.pt")
    loaded = read_weights(tmp_path / "fpdm.pt", hidden_size=64, num_heads=4)
    cfg = loaded.config
    assert loaded.source == "fpdm-release" and cfg.kind == "fpdm"
    assert (cfg.pre_depth, cfg.post_depth, cfg.timestep_in_pre_post) == (1, 2, timestep)
    assert (cfg.no_grad_iters, cfg.grad_iters, cfg.eval_iters) == ((0, 6), (2, 9), 28 - 1 - 2)
    assert (cfg.projection_gelu, cfg.final_conditioning) == ("tanh", "outer")
    assert loaded.sampling["guidance_channels"] == 3 and loaded.run["num_timesteps"] == 1000
    _outputs_match(loaded.build(), ema, heads=4, pre_post_timestep=timestep, iters=25)
    _outputs_match(load_model(tmp_path / "fpdm.pt", num_heads=4, eval_iters=4), ema, heads=4,
                   pre_post_timestep=timestep, iters=4)  # fmt: skip


def test_a_bare_fpdm_release_state_dict_loads_with_the_release_defaults(tmp_path):
    sd = release_state_dict("fpdm", pre=2, post=2, seed=4)
    torch.save(sd, tmp_path / "bare.pt")
    model = load_model(tmp_path / "bare.pt", num_heads=4)
    assert (model.config.pre_depth, model.config.timestep_in_pre_post, model.config.grad_iters) == (2, False, (1, 12))
    _outputs_match(model, sd, heads=4, iters=24)


def test_a_file_of_no_known_format_is_one_line_naming_what_was_found(tmp_path):
    torch.save({"weights": torch.zeros(2), "step": 3}, tmp_path / "what.pt")
    with pytest.raises(CheckpointError, match=r"no known weights format: found a dict with keys weights, step$"):
        load_model(tmp_path / "what.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="found a list"):
        load_model(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_model(tmp_path / "missing.pt")


def test_damaged_outside_weights_are_one_line(tmp_path):
    """Bug: a missing or misshapen tensor of an outside file read straight (KeyError, IndexError traceback)."""
    sd = release_state_dict("dit", seed=5)
    del sd["final_layer.linear.weight"]
    torch.save(sd, tmp_path / "nofinal.pt")
    with pytest.raises(CheckpointError, match="has no final_layer.linear.weight tensor or argument"):
        load_model(tmp_path / "nofinal.pt", num_heads=4)
    sd = release_state_dict("dit", seed=5)
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"].flatten(1)
    torch.save(sd, tmp_path / "flat.pt")
    with pytest.raises(CheckpointError, match="not a DiT's or FPDM's"):
        load_model(tmp_path / "flat.pt", num_heads=4)


def test_weights_that_do_not_fit_name_the_tensors(tmp_path):
    sd = release_state_dict("dit", seed=5)
    torch.save(sd, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match=r"shape of blocks\.0\.mlp\.fc1\.weight \(256, 64\) vs \(128, 64\)"):
        load_model(tmp_path / "dit.pt", num_heads=4, mlp_ratio=2.0)


# ----------------------------------------------------------------------------- our own checkpoints


def _our_checkpoint(path: Path, model, *, drop=(), sampling=None) -> Path:
    config = {k: v for k, v in model.config.__dict__.items() if k not in drop}
    state = {"format": FORMAT, "config": config, "model": model.state_dict(), "ema": model.state_dict(),
             "run": {"num_timesteps": 1000, "dataset": "digits"}, "step": 1}  # fmt: skip
    if sampling is not None:
        state["sampling"] = sampling
    torch.save(state, path)
    return path


def _trained_like(name: str, **overrides):
    torch.manual_seed(0)
    model = create_model(name, input_size=8, in_channels=4, num_classes=10, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_old_checkpoints_keep_their_architecture_and_outputs(tmp_path):
    """Bug: an old checkpoint (exact GELU, final layer on t + y) loaded with the new defaults silently changes."""
    old = _trained_like("FPDM-T/2", projection_gelu="none", final_conditioning="full", eval_iterate="best")
    path = _our_checkpoint(tmp_path / "old.pt", old, drop=tuple(LEGACY_FIELDS) + ("null_class",))
    loaded = load_model(path)
    assert (loaded.config.projection_gelu, loaded.config.final_conditioning) == ("none", "full")
    assert loaded.config.eval_iterate == "best" and loaded.eval_solver.func is fpdm.models.fixedpoint.picard
    with torch.no_grad():
        before, after = old(X, T, Y), loaded(X, T, Y)
        new_default = create_model("FPDM-T/2", input_size=8, in_channels=4, num_classes=10).eval()
        new_default.load_state_dict(old.state_dict())
        assert not torch.allclose(new_default(X, T, Y), before, atol=1e-4)  # the defaults do differ
    assert torch.equal(after, before)


def test_export_writes_safetensors_and_json_that_load_back_identically(tmp_path):
    from fpdm import export

    model = _trained_like("FPDM-T/2")
    path = _our_checkpoint(tmp_path / "ours.pt", model, sampling={"guidance": 2.5, "steps": 20})
    assert export.cli([str(path), "--out", str(tmp_path / "exp")]) == 0
    files = sorted(p.name for p in (tmp_path / "exp").iterdir() if not p.name.startswith("."))
    assert files == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert meta["model"]["hidden_size"] == 128 and meta["sampling"]["guidance"] == 2.5
    for source in (tmp_path / "exp", tmp_path / "exp" / "model.safetensors"):
        again = load_model(source)
        assert again.config == model.config
        for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
    assert read_weights(tmp_path / "exp").sampling["guidance"] == 2.5


def test_export_from_official_weights_then_sample_defaults(tmp_path):
    sd = release_state_dict("dit", hidden=128, depth=2, channels=1, std=0.02)
    torch.save(sd, tmp_path / "dit.pt")
    from fpdm import export

    assert export.cli([str(tmp_path / "dit.pt"), "--out", str(tmp_path / "exp")]) == 0
    loaded = read_weights(tmp_path / "exp")
    assert loaded.source == "export" and loaded.sampling["method"] == "ddpm" and loaded.sampling["steps"] == 250
    _outputs_match_1ch(loaded.build(), sd)


def _outputs_match_1ch(model, sd):
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, T[:2], Y[:2]), release_forward(sd, x, T[:2], Y[:2], heads=4),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


# ----------------------------------------------------------------------------- no code runs on load


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious(path: Path, marker: Path, wrap) -> Path:
    torch.save(wrap(_Payload(marker)), path)
    return path


@pytest.mark.parametrize("wrap", [lambda p: p, lambda p: {"model": {"w": p}, "ema": {}}, lambda p: {
    "format": FORMAT, "config": {}, "model": {}, "ema": {}, "run": {"x": p}}])
def test_no_entry_point_unpickles_a_payload(tmp_path, capsys, wrap):
    """Bug: any torch.load(weights_only=False) left on a path a user's file reaches."""
    from fpdm import evaluate, sample, train
    from fpdm import export as export_cli

    marker = tmp_path / "pwned"
    bad = _malicious(tmp_path / "bad.pt", marker, wrap)
    with pytest.raises(CheckpointError, match="not a plain weights file .*nothing in it was run"):
        load_model(bad)
    resume = tmp_path / "run" / "checkpoints"
    resume.mkdir(parents=True)
    _malicious(resume / "latest.pt", marker, wrap)
    calls = [
        (sample, ["--ckpt", str(bad), "--out", str(tmp_path / "s"), "--quiet"]),
        (evaluate, ["--ckpt", str(bad), "--out", str(tmp_path / "e"), "--quiet"]),
        (export_cli, [str(bad), "--out", str(tmp_path / "x")]),
        (train, ["--out", str(tmp_path / "run"), "--steps", "1", "--quiet"]),  # resume
        (train, ["--out", str(tmp_path / "fresh"), "--steps", "1", "--quiet", "--init", str(bad)]),
    ]
    for module, argv in calls:
        assert module.cli(argv) == 2, module.__name__
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a plain weights file" in err[0], (module.__name__, err)
    assert not marker.exists()


def test_the_feature_net_cache_is_read_without_running_code(tmp_path):
    """Bug: the evaluation's cached feature network unpickled as it is (a payload there runs): it goes through
    the safe reader, is refused, and is replaced by a network trained again."""
    from fpdm import evaluate

    marker = tmp_path / "pwned"
    _malicious(tmp_path / "featurenet-digits.pt", marker, lambda p: {"format": FORMAT, "weights": p})
    net, record = evaluate.feature_net_for("digits", cache_dir=tmp_path, epochs=1, progress=False)
    assert not marker.exists() and record["epochs"] == 1
    assert evaluate.load_checkpoint(tmp_path / "featurenet-digits.pt")["epochs"] == 1  # replaced by a plain one


def test_an_export_that_fails_keeps_the_earlier_one(tmp_path, monkeypatch, capsys):
    """Bug: the weights renamed into place before config.json was written (new weights, old config)."""
    import fpdm.files
    from fpdm import export

    torch.save(release_state_dict("dit", hidden=128, depth=2, channels=1, std=0.02), tmp_path / "a.pt")
    torch.save(release_state_dict("dit", hidden=128, depth=3, channels=1, std=0.02), tmp_path / "b.pt")
    assert export.cli([str(tmp_path / "a.pt"), "--out", str(tmp_path / "exp")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir() if not p.name.startswith(".")}
    real = fpdm.files.os.fsync
    calls = []

    def full_at_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(fpdm.files.os, "fsync", full_at_the_second_file)
    assert export.cli([str(tmp_path / "b.pt"), "--out", str(tmp_path / "exp")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json (no space left on the device)" in err[0], err
    assert {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir() if not p.name.startswith(".")} == before
    assert load_model(tmp_path / "exp").config.depth == 2


# ----------------------------------------------------------------------------- --init, resume, sampling defaults

DIGITS = ["--batch-size", "8", "--sample-steps", "0", "--quiet", "--log-every", "1"]


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "latest.pt", weights_only=True)


def test_init_maps_a_dit_onto_an_fpdm(tmp_path, capsys):
    """Bugs: the wrong DiT block as the fixed-point block, pre/post swapped, the projection not fresh, the
    flag ignored. A learning rate of 1e-12 leaves the weights where --init put them."""
    from fpdm import train

    sd = release_state_dict("dit", hidden=128, depth=4, channels=1, seed=6, std=0.02)
    torch.save(sd, tmp_path / "dit.pt")
    out = tmp_path / "run"
    code = train.cli(["--model", "FPDM-T/2", "--init", str(tmp_path / "dit.pt"), "--steps", "1", "--lr", "1e-12",
                      "--out", str(out), *DIGITS])  # fmt: skip
    assert code == 0 and "initialised from" in capsys.readouterr().out
    weights = _ckpt(out)["model"]
    mapped = [("blocks_pre.0", "blocks.0"), ("block_fixed_point", "blocks.2"), ("blocks_post.0", "blocks.3")]
    for ours, theirs in mapped:
        torch.testing.assert_close(weights[f"{ours}.attn.qkv.weight"], sd[f"{theirs}.attn.qkv.weight"], atol=1e-8,
                                   rtol=0)  # fmt: skip
    torch.testing.assert_close(weights["y_embedder.embedding.weight"], sd["y_embedder.embedding_table.weight"],
                               atol=1e-8, rtol=0)  # fmt: skip
    torch.manual_seed(0)  # the run's seed: the injection and projection are the fresh model's
    fresh = create_model("FPDM-T/2", input_size=8, in_channels=1, num_classes=10)
    torch.testing.assert_close(weights["projection.0.weight"], fresh.projection[0].weight, atol=1e-8, rtol=0)
    assert json.loads((out / "config.json").read_text())["init"] == str(tmp_path / "dit.pt")


def test_init_fine_tunes_the_same_kind_and_refuses_what_cannot_work(tmp_path, capsys):
    from fpdm import train

    release = release_state_dict("fpdm", hidden=128, channels=1, seed=7, std=0.02)
    torch.save({"model": release, "ema": release, "opt": {}, "args": {}, "train_steps": 1}, tmp_path / "f.pt")
    out = tmp_path / "ft"
    assert train.cli(["--model", "FPDM-T/2", "--init", str(tmp_path / "f.pt"), "--steps", "1", "--lr", "1e-12",
                      "--out", str(out), *DIGITS]) == 0  # fmt: skip
    torch.testing.assert_close(_ckpt(out)["model"]["injection.weight"], release["block_pre_projection.weight"],
                               atol=1e-8, rtol=0)  # fmt: skip
    capsys.readouterr()
    # the same command again resumes (its --init was applied at the start)
    assert train.cli(["--model", "FPDM-T/2", "--init", str(tmp_path / "f.pt"), "--steps", "2", "--lr", "1e-12",
                      "--out", str(out), *DIGITS]) == 0  # fmt: skip
    assert _ckpt(out)["step"] == 2
    torch.save(release, tmp_path / "other.pt")
    refusals = [
        (["--model", "FPDM-T/2", "--out", str(out)], "holds a run to resume"),  # another --init: resume comes first
        (["--model", "DiT-T/2", "--out", str(tmp_path / "d")], "cannot start a DIT from fpdm-release weights"),
        (["--model", "FPDM-T/4", "--out", str(tmp_path / "p")], "shape of x_embedder.weight"),
    ]
    for i, (argv, match) in enumerate(refusals):
        source = tmp_path / ("other.pt" if i == 0 else "f.pt")
        assert train.cli([*argv, "--init", str(source), "--steps", "3", *DIGITS]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_a_run_from_before_the_release_defaults_resumes_as_it_was(tmp_path, capsys):
    """Bug: resuming an old run refused (its config lacks the new fields) or silently switched to the tanh
    GELU and final-layer conditioning of the release."""
    from fpdm import sample, train

    out = tmp_path / "old"
    argv = ["--model", "FPDM-T/2", "--out", str(out), "--no-grad-iters", "0,1", "--grad-iters", "1,1", *DIGITS]
    assert train.cli([*argv, "--steps", "1"]) == 0
    ckpt = _ckpt(out)
    for key in (*LEGACY_FIELDS, "null_class"):
        del ckpt["config"][key]
    del ckpt["sampling"]  # as old checkpoints were written
    torch.save(ckpt, out / "checkpoints" / "latest.pt")
    assert train.cli([*argv, "--steps", "2"]) == 0
    resumed = _ckpt(out)
    assert resumed["step"] == 2 and resumed["config"]["projection_gelu"] == "none"
    assert resumed["config"]["final_conditioning"] == "full"
    del resumed["sampling"]
    torch.save(resumed, out / "checkpoints" / "latest.pt")
    args = sample.build_parser().parse_args(["--ckpt", str(out / "checkpoints" / "latest.pt"), "--out",
                                             str(tmp_path / "s"), "--num-samples", "2", "--quiet"])  # fmt: skip
    summary = sample.main(args)  # the grid's settings of its time: DDIM, 50 steps, guidance 3
    assert (summary["method"], summary["steps"], summary["guidance"]) == ("ddim", 50, 3.0)


def test_sampling_defaults_are_the_training_grids(tmp_path, capsys):
    """Bug: the sampler's own defaults (no guidance) instead of what the run's grid used."""
    from fpdm import sample, train

    out = tmp_path / "run"
    assert train.cli(["--model", "DiT-T/2", "--out", str(out), "--steps", "1", "--guidance", "2.5", "--batch-size",
                      "8", "--sample-steps", "4", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    args = sample.build_parser().parse_args(["--ckpt", str(out / "checkpoints" / "latest.pt"), "--out",
                                             str(tmp_path / "s"), "--num-samples", "2"])  # fmt: skip
    summary = sample.main(args)
    assert (summary["method"], summary["steps"], summary["guidance"], summary["guidance_channels"]) == (
        "ddim", 4, 2.5, None)  # fmt: skip
    assert "fpdm weights: DDIM, 4 steps, guidance 2.5 on all channels" in capsys.readouterr().out

    # --init from our checkpoint and from its export: the new run starts at the EMA weights
    from fpdm import export

    assert export.cli([str(out / "checkpoints" / "latest.pt"), "--out", str(tmp_path / "exp")]) == 0
    ema = _ckpt(out)["ema"]
    for i, source in enumerate((out / "checkpoints" / "latest.pt", tmp_path / "exp")):
        again = tmp_path / f"again{i}"
        assert train.cli(["--model", "DiT-T/2", "--out", str(again), "--steps", "1", "--lr", "1e-12", "--init",
                          str(source), *DIGITS]) == 0  # fmt: skip
        started = _ckpt(again)["model"]
        for key, value in ema.items():
            torch.testing.assert_close(started[key], value, atol=1e-8, rtol=0)
