"""Sampling: compute plans spend their budgets, reuse, reproducibility, and the command line."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fpdm.models import create_model
from fpdm.sample import SampleError, check_graph, generate, plan_compute


def _fpdm(**overrides):
    torch.manual_seed(0)
    model = create_model("FPDM-T/2", input_size=8, in_channels=1, num_classes=10, **overrides)
    for module in (model.block_fixed_point.adaLN_modulation[-1], model.final_layer.linear):
        torch.nn.init.normal_(module.weight, std=0.05)  # as if trained: a non-trivial map and output
    return model.eval()


@pytest.mark.parametrize("schedule", ["uniform", "high-noise", "low-noise"])
@pytest.mark.parametrize("steps,budget", [(5, 40), (7, 50), (20, 560), (40, 560), (3, 9)])
def test_each_schedule_plans_exactly_its_budget(schedule, steps, budget):
    cfg = _fpdm().config
    plan = plan_compute(cfg, steps=steps, budget=budget, schedule=schedule)
    assert plan.steps == steps and len(plan.calls) == steps and min(plan.calls) >= 1
    assert steps * (cfg.pre_depth + cfg.post_depth) + sum(plan.calls) == budget


def test_schedules_put_the_calls_where_they_say():
    cfg = _fpdm().config
    high = plan_compute(cfg, steps=10, budget=200, schedule="high-noise").calls
    low = plan_compute(cfg, steps=10, budget=200, schedule="low-noise").calls
    uniform = plan_compute(cfg, steps=10, budget=200).calls
    assert high[0] > high[-1] and low[0] < low[-1] and uniform == [18] * 10


def test_smoothing_more_steps_fewer_iterations_same_budget():
    cfg = _fpdm().config  # pre 1 + post 1: the paper's 20 x 26 and 40 x 12 are both 560 blocks
    a = plan_compute(cfg, steps=20, iters=26)
    b = plan_compute(cfg, budget=560, iters=12)
    assert (a.budget, b.budget, b.steps) == (560, 560, 40) and set(a.calls) == {26} and set(b.calls) == {12}


def test_dit_plans_count_its_depth():
    cfg = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10).config
    assert plan_compute(cfg, budget=40).steps == 10 and plan_compute(cfg, steps=5).budget == 20
    with pytest.raises(SampleError, match="--iters and --schedule apply to FPDM"):
        plan_compute(cfg, steps=5, iters=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=10, budget=15), "at least 30 blocks"),
        (dict(budget=2, iters=3), "less than one step"),
        (dict(steps=5, budget=40, schedule="fancy"), "unknown schedule 'fancy'"),
        (dict(steps=5, budget=40, schedule="adaptive"), "positive finite --tol"),
        (dict(steps=5, budget=40, schedule="adaptive", tol=float("inf")), "positive finite --tol, got inf"),
        (dict(steps=0, budget=40), "--steps must be a positive integer"),
        (dict(budget=40), "give two of"),
    ],
)
def test_bad_plans_are_errors(kwargs, match):
    with pytest.raises(SampleError, match=match):
        plan_compute(_fpdm().config, **kwargs)


def _run(model, plan, **kwargs):
    labels = torch.tensor([0, 3, 7, 9])
    return generate(model, labels, plan, image_shape=(1, 8, 8), progress=False, batch_size=4, **kwargs)


@pytest.mark.parametrize("schedule", ["uniform", "high-noise", "low-noise"])
def test_sampling_spends_exactly_the_planned_budget(schedule):
    model = _fpdm()
    plan = plan_compute(model.config, steps=6, budget=40, schedule=schedule)
    _, stats = _run(model, plan, guidance=2.0)
    assert stats.block_evaluations == 40 and stats.calls_per_step == [float(c) for c in plan.calls]


def test_adaptive_stops_at_tolerance_within_the_budget():
    model = _fpdm()
    plan = plan_compute(model.config, steps=6, budget=200, schedule="adaptive", tol=1e-3)
    _, stats = _run(model, plan, solver="anderson")
    assert stats.block_evaluations <= 200
    assert all(c >= 1 for c in stats.calls_per_step) and sum(stats.calls_per_step) < 200 - 12  # stopped early
    tight = plan_compute(model.config, steps=6, budget=30, schedule="adaptive", tol=1e-9)
    _, capped = _run(model, tight, solver="anderson")
    assert capped.block_evaluations <= 30


def test_reuse_changes_the_start_not_the_answer_at_convergence():
    model = _fpdm()
    starts = []
    original = model.fixed_point_map

    def spy(z, x_inj, c):
        starts.append(z)
        return original(z, x_inj, c)

    plan = plan_compute(model.config, steps=5, budget=5 * 2 + 5 * 40, schedule="adaptive", tol=1e-6)
    cold, cold_stats = _run(model, plan, solver="anderson", reuse=False)
    model.fixed_point_map = spy
    warm, warm_stats = _run(model, plan, solver="anderson", reuse=True)
    torch.testing.assert_close(warm, cold, atol=2e-4, rtol=0)  # the same fixed points
    assert sum(warm_stats.calls_per_step) < sum(cold_stats.calls_per_step)  # reached from closer starts


def test_reused_start_is_the_previous_fixed_point():
    model = _fpdm()
    calls = []
    original = model.fixed_point_map

    def spy(z, x_inj, c):
        calls.append((z.clone(), x_inj, c))
        return original(z, x_inj, c)

    model.fixed_point_map = spy
    _run(model, plan_compute(model.config, steps=3, iters=2), reuse=True)
    assert len(calls) == 6  # 3 steps x 2 calls
    with torch.no_grad():
        end_of_step_1 = original(*calls[1])  # the fixed point step 1 returned: f at its last iterate
    torch.testing.assert_close(calls[2][0], end_of_step_1)  # step 2 starts there
    assert not torch.equal(calls[2][0], calls[0][0])


def test_ddim_sampling_is_reproducible_with_a_seed():
    model = _fpdm()
    plan = plan_compute(model.config, steps=4, iters=3)
    a, _ = _run(model, plan, seed=5, guidance=3.0)
    b, _ = _run(model, plan, seed=5, guidance=3.0)
    c, _ = _run(model, plan, seed=6, guidance=3.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_leaves_the_models_eval_solver_as_it_was():
    """The driver hands each step's solver to the model as an argument (model(..., solver=)): a sampler that set
    model.eval_solver per step and restored it only on success left a failed run's last step solver behind,
    and every later forward of that model ran it."""
    model = _fpdm()
    own = model.eval_solver
    plan = plan_compute(model.config, steps=4, iters=6)
    _run(model, plan)
    assert model.eval_solver is own
    model.blocks_post[0].mlp.fc1.weight.data.fill_(float("nan"))  # the run fails mid-way
    with pytest.raises(SampleError, match="non-finite"):
        _run(model, plan)
    assert model.eval_solver is own


def test_anderson_at_sampling_time():
    model = _fpdm()
    plan = plan_compute(model.config, steps=4, iters=6)
    images, stats = _run(model, plan, solver="anderson")
    assert images.shape == (4, 1, 8, 8) and stats.block_evaluations == 4 * 8
    with pytest.raises(SampleError, match="unknown solver 'newton'"):
        _run(model, plan, solver="newton")


@pytest.fixture
def trained(trained_checkpoint):
    """The session's tiny FPDM checkpoint, shared by the command tests (they never modify it)."""
    return trained_checkpoint("FPDM-T/2")


def test_sample_command_writes_grid_npz_and_stats(tmp_path, trained):
    ckpt = trained
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "fpdm.sample", "--ckpt", str(ckpt), "--num-samples", "12", "--out", str(out),
           "--budget", "40", "--steps", "5", "--schedule", "high-noise", "--reuse", "--classes", "1,2",
           "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_0"].dtype == np.uint8  # ADM's layout
    assert data["labels"].tolist() == [1, 2] * 6
    stats = json.loads((out / "stats.json").read_text())
    assert stats["block_evaluations_per_sample"] == 40 and stats["steps"] == 5 and stats["reuse"] is True
    assert (out / "samples.png").is_file() and "40 block evaluations per sample" in result.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (["--classes", "3,12"], "--classes [12] outside 0..9"),
        (["--budget", "5", "--steps", "5"], "at least 15 blocks"),
        (["--eta", "2"], "--eta must be in [0.0, 1.0], got 2.0"),
        (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
        (["--device", "foo"], "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
        (["--steps", "2000"], "2000 sampling steps > the 1000 diffusion timesteps of this checkpoint"),
        (["--tol", "0.1"], "--tol applies to --schedule adaptive"),
        (["--method", "ddpm", "--eta", "0.5"], "--eta applies to --method ddim"),
        (
            ["--graph", "solver", "--device", "cpu"],
            "--graph solver replays CUDA graphs and needs a CUDA device, got cpu",
        ),
    ],
)
def test_sample_command_bad_input(tmp_path, trained, args, match, cli):
    code, _, err = cli("fpdm.sample", ["--ckpt", trained, "--out", tmp_path / "s", "--quiet", *args])
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {err.strip()[7:]}"] and match in err


def test_sample_command_refuses_the_removed_graph_on(tmp_path, trained, cli):
    """--graph on (the block captured with the loop) was removed with fixedpoint's graph=True: argparse's one-line
    invalid-choice error naming the choices left, exit 2, before any output is made (not a traceback, and never a
    run that samples eagerly or in another mode)."""
    code, _, err = cli("fpdm.sample", ["--ckpt", trained, "--out", tmp_path / "s", "--quiet", "--graph", "on"])
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert re.search(r"error: argument --graph: invalid choice: 'on' \(choose from '?off'?, '?solver'?\)", line), line
    assert not (tmp_path / "s").exists()


def test_sample_command_rejects_a_mismatched_checkpoint(tmp_path, trained, cli):
    ckpt = trained
    state = torch.load(ckpt, weights_only=False)
    state["config"]["hidden_size"] = 64  # the weights no longer fit the config
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, _, err = cli("fpdm.sample", ["--ckpt", bad, "--out", tmp_path / "s", "--quiet"])
    assert code == 2 and "do not match its model config" in err
    assert len(err.strip().splitlines()) == 1


def test_sample_command_uses_the_checkpoints_diffusion_timesteps(tmp_path, monkeypatch, cli, trained_checkpoint):
    """A model trained on 100 timesteps is sampled on that schedule (it never saw t >= 100), and more sampling
    steps than timesteps is an error before any sampling."""
    ckpt = trained_checkpoint("FPDM-T/2", "--num-timesteps", "100")
    from fpdm import diffusion, sample

    created = []
    real_create = diffusion.Diffusion.create
    monkeypatch.setattr(sample.Diffusion, "create", lambda n, **kw: created.append(n) or real_create(n, **kw))
    args = sample.build_parser().parse_args(["--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--steps", "5",
                                             "--num-samples", "4", "--quiet"])  # fmt: skip
    summary = sample.main(args)
    assert created == [100] and summary["num_timesteps"] == 100
    code, _, err = cli("fpdm.sample", ["--ckpt", ckpt, "--out", tmp_path / "t", "--steps", "200"])
    assert code == 2 and "200 sampling steps > the 100 diffusion timesteps" in err
    assert not (tmp_path / "t").exists()


def test_sample_command_checks_its_output_and_vae_before_sampling(tmp_path, trained, cli):
    ckpt = trained
    (tmp_path / "afile").write_text("keep me")
    cmd = ["--ckpt", ckpt, "--quiet", "--steps", "2"]
    code, _, err = cli("fpdm.sample", [*cmd, "--out", tmp_path / "afile"])
    assert code == 2 and "is a file, not a directory" in err
    assert (tmp_path / "afile").read_text() == "keep me"
    state = torch.load(ckpt, weights_only=False)
    state["run"]["dataset"] = "latents:/somewhere"  # a latent model: needs --vae to decode
    torch.save(state, tmp_path / "latent.pt")
    cmd[1] = tmp_path / "latent.pt"
    code, _, err = cli("fpdm.sample", [*cmd, "--out", tmp_path / "l"])
    assert code == 2 and "pass --vae PATH" in err and not (tmp_path / "l").exists()
    code, _, err = cli("fpdm.sample", [*cmd, "--out", tmp_path / "l", "--vae", tmp_path / "none"])
    assert code == 2 and "Traceback" not in err and not (tmp_path / "l").exists()
    vae_errors = (f"cannot load an AutoencoderKL from {tmp_path / 'none'}", "the VAE needs diffusers")
    assert any(message in err for message in vae_errors), err


def test_sampling_with_cuda_graphs_gives_the_eager_images(monkeypatch):
    """With the CPU stand-in for CUDA graphs, graph="solver" (--graph solver): the same images as without graphs
    and exactly the planned calls, the solver's graphs captured once (Picard: a period of two positions) and
    replayed by every later step; plans whose calls change per step (a high-noise schedule with more distinct
    counts than sessions kept, the adaptive schedule) run too, with the eager images. The release's plain
    iteration, broyden and a DiT are refused in one line each."""
    from fixedpoint import _graphs
    from fixedpoint.testing import EagerGraphs

    graphs = EagerGraphs()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    release = _fpdm()  # the release's plain iteration (last iterate): the graphs replay picard's best one
    plan = plan_compute(release.config, steps=5, iters=5)
    with pytest.raises(SampleError, match="replays fixedpoint's picard, whose output is its best iterate"):
        _run(release, plan, graph="solver")
    _run(release, plan, graph="solver", solver="anderson")  # anderson is the same solver either way
    graphs.captures = 0
    _graphs.clear_graph_cache()
    model = _fpdm(eval_iterate="best")  # plain iteration as checkpoints before the release's default
    eager, eager_stats = _run(model, plan, guidance=2.0)
    images, stats = _run(model, plan, guidance=2.0, graph="solver")
    torch.testing.assert_close(images, eager, rtol=1e-5, atol=1e-6)
    assert eager_stats.calls_per_step == [5.0] * 5
    assert graphs.captures == 2 and stats.calls_per_step == [5.0] * 5  # f eager: a period of 2 positions
    with pytest.raises(SampleError, match="graph='solver' \\(--graph\\) works with the picard and anderson"):
        _run(model, plan, graph="solver", solver="broyden")
    varied = plan_compute(model.config, steps=12, budget=12 * 2 + 60, schedule="high-noise")
    adaptive = plan_compute(model.config, steps=3, budget=30, schedule="adaptive", tol=1e-3)
    assert len(set(varied.calls)) > _graphs.GRAPH_CACHE_SIZE
    for other in (varied, adaptive):
        eager, eager_stats = _run(model, other)
        images, stats = _run(model, other, graph="solver")
        torch.testing.assert_close(images, eager, rtol=1e-5, atol=1e-6)
        assert stats.calls_per_step == eager_stats.calls_per_step
    dit = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10).eval()
    with pytest.raises(SampleError, match="applies to FPDM; a DiT has no fixed-point layer"):
        _run(dit, plan_compute(dit.config, steps=3), graph="solver")


@pytest.mark.parametrize("runs", ["generate", "check_graph"])
def test_graph_true_and_other_modes_are_sample_errors(runs):
    """graph=True (--graph on) was removed with fixedpoint's graph=True: a SampleError naming graph='solver' and
    torch.compile, before any sampling (never fixedpoint's own error mid-run, nor an eager run); any other value
    but False and "solver" (1 == True, "on") is a SampleError naming the two."""
    model = _fpdm(eval_iterate="best")
    plan = plan_compute(model.config, steps=2, iters=3)

    def run(graph):
        if runs == "check_graph":
            check_graph(graph, "picard", plan, model.config)
        else:
            _run(model, plan, graph=graph)

    removed = (
        r"graph=True \(--graph on\) was removed with fixedpoint's graph=True: use graph='solver' \(--graph solver\)"
    )
    with pytest.raises(SampleError, match=removed + ", and torch.compile for the block"):
        run(True)
    for value in (1, "on", "True"):
        with pytest.raises(SampleError, match=f"^graph must be False or 'solver', got {value!r}$"):
            run(value)
    run(False)
    check_graph("solver", "anderson", plan, model.config)  # allowed (CUDA is checked by the command)


@pytest.mark.parametrize("model_name", ["FPDM-T/2", "DiT-T/2"])
def test_a_compiled_sampler_gives_the_eager_images(tmp_path, monkeypatch, cli, trained_checkpoint, model_name):
    """--compile compiles FPDM's fixed-point block (a DiT's forward) and samples the eager images to float
    tolerance with the same block count (torch.compile's aot_eager backend: inductor's C++ builds take a
    minute on a CPU). Catches: the compiled block not the one solved (FPDM looks its map up per call), a
    reduce-overhead output not cloned (the solver keeps earlier outputs: an error), flags lost."""
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or real(fn, backend="aot_eager"))
    ckpt = trained_checkpoint(model_name)
    runs = {}
    for mode in ("off", "reduce-overhead"):
        out = tmp_path / mode
        code, _, err = cli("fpdm.sample", ["--ckpt", ckpt, "--num-samples", "4", "--steps", "3", "--out", out,
                                           "--quiet", "--compile", mode])  # fmt: skip
        assert code == 0, err
        runs[mode] = (np.load(out / "samples.npz")["arr_0"], json.loads((out / "stats.json").read_text()))
    assert compiled == [{"mode": "reduce-overhead"}]
    eager, fast = runs["off"], runs["reduce-overhead"]
    assert np.abs(eager[0].astype(int) - fast[0].astype(int)).max() <= 1  # uint8: at most a level apart
    assert eager[1]["block_evaluations_per_sample"] == fast[1]["block_evaluations_per_sample"]
