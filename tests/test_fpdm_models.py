"""DiT and FPDM: sizes and parameter counts, initialisation, shapes, the fixed-point layer, overfitting."""

import pytest
import torch

import fixedpoint
from fpdm.diffusion import Diffusion
from fpdm.models import MODEL_SIZES, DiTBlock, FixedPointState, create_model, fixed_iterations, model_names


def _expected_parameters(kind, hidden, depth, patch, channels=4, classes=1000, learn_sigma=True, pre=1, post=1):
    """Closed-form parameter count of DiT / FPDM (trainable; DiT's fixed pos_embed excluded)."""
    d, p, c_out = hidden, patch, channels * (2 if learn_sigma else 1)
    block = 18 * d * d + 15 * d  # qkv, proj, 2-layer MLP (ratio 4), adaLN (6D)
    embed = channels * p * p * d + d + (256 * d + d + d * d + d) + (classes + 1) * d
    final = 2 * d * d + 2 * d + d * p * p * c_out + p * p * c_out
    if kind == "dit":
        return embed + depth * block + final
    fixed_point = (d * d + d) + (4 * d * d + 2 * d) + (2 * d * d + d)  # injection, projection
    return embed + (pre + 1 + post) * block + fixed_point + final


@pytest.mark.parametrize("name", model_names())
def test_parameter_counts_of_every_named_size(name):
    kind, rest = name.split("-", 1)
    size, patch = rest.split("/")
    hidden, depth, _ = MODEL_SIZES[size]
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_parameters(kind.lower(), hidden, depth, int(patch)) == model.config.num_parameters


@pytest.mark.parametrize("overrides", [dict(mlp_ratio=2.0), dict(null_class=False, class_dropout_prob=0.0),
                                       dict(learn_sigma=False, in_channels=3), dict(pre_depth=3, post_depth=0)])
def test_the_closed_form_parameter_count_follows_every_field(overrides):
    """Bug: the memory check's count ignoring a field (MLP ratio, the null row, sigma channels, pre depth)."""
    for name in ("DiT-T/2", "FPDM-T/4"):
        model = create_model(name, input_size=8, num_classes=7, **overrides)
        assert model.config.num_parameters == sum(p.numel() for p in model.parameters())


def test_dit_xl2_has_dit_published_parameter_count():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    count = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()  # DiT counts its fixed pos_embed
    assert count == 675_129_632


def test_fpdm_xl_has_87_percent_fewer_parameters_than_dit_xl():
    with torch.device("meta"):
        dit, fpdm = create_model("DiT-XL/2"), create_model("FPDM-XL/2")
    ratio = sum(p.numel() for p in fpdm.parameters()) / sum(p.numel() for p in dit.parameters())
    assert 0.12 < ratio < 0.14  # the paper: 87% fewer


@pytest.mark.parametrize("name", ["DiT-T/2", "DiT-T/4", "FPDM-T/2", "FPDM-T/4"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes(name, learn_sigma):
    model = create_model(name, input_size=8, in_channels=3, num_classes=5, learn_sigma=learn_sigma)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([0, 999]), torch.tensor([1, 5]))  # 5 = the null class
    assert out.shape == (2, 6 if learn_sigma else 3, 8, 8)


def test_adaln_zero_blocks_start_as_identity_and_the_model_outputs_zero():
    model = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    tokens = torch.randn(3, 16, 128)
    c = torch.randn(3, 128)
    for block in model.blocks:
        assert isinstance(block, DiTBlock)
        torch.testing.assert_close(block(tokens, c), tokens, rtol=0, atol=0)
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    assert torch.count_nonzero(out) == 0


def test_position_embedding_is_a_fixed_buffer():
    model = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    assert "pos_embed" not in dict(model.named_parameters())
    assert model.pos_embed.shape == (1, 16, 128)
    # sin-cos: the first half of the features encodes one axis with sin then cos, each in [-1, 1]
    assert model.pos_embed.abs().max() <= 1.0 and model.pos_embed[0, 0, 0] == 0.0


def test_unknown_names_and_fields_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-XXL/2'; valid: DiT-XL/2, DiT-XL/4"):
        create_model("DiT-XXL/2")
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) widht; valid: .*hidden_size"):
        create_model("DiT-S/2", widht=3)
    with pytest.raises(ValueError, match=r"patch_size=4 \(input_size 6\)"):
        create_model("DiT-T/4", input_size=6)
    with pytest.raises(ValueError, match=r"grad_iters=\(0, 2\)"):
        create_model("FPDM-T/2", grad_iters=(0, 2))


def _tiny_fpdm(**overrides):
    torch.manual_seed(0)
    model = create_model("FPDM-T/2", input_size=8, in_channels=1, num_classes=10, **overrides)
    # as after some training: non-zero modulation in the fixed-point block and a non-zero output layer
    torch.nn.init.normal_(model.block_fixed_point.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    return model


def test_fpdm_training_uses_stochastic_jfb_counts():
    model = _tiny_fpdm(no_grad_iters=(2, 2), grad_iters=(3, 3))
    model.train()
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2]))
    state = model.last_fixed_point
    assert isinstance(state, FixedPointState)
    assert (state.info.no_grad_steps, state.info.grad_steps, state.calls) == (2, 3, 5)
    assert model.block_evaluations == 1 + 1 + 5
    out.sum().backward()
    assert model.blocks_pre[0].attn.qkv.weight.grad is not None  # through the injection
    assert model.injection.weight.grad.abs().sum() > 0


def test_fpdm_eval_runs_the_configured_solver_and_reports_calls():
    model = _tiny_fpdm().eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2])
    model.eval_solver = fixed_iterations(7)
    with torch.no_grad():
        model(x, t, y)
    assert model.last_fixed_point.calls == 7 and model.block_evaluations == 9
    assert model.last_fixed_point.solution.nsteps.tolist() == [6, 6]
    with torch.no_grad():  # a solver for one call, as an argument: the model's own is left as it was
        out3 = model(x, t, y, solver=fixed_iterations(3))
        assert model.last_fixed_point.calls == 3 and model.block_evaluations == 5
        model.eval_solver = fixed_iterations(3)
        torch.testing.assert_close(model(x, t, y), out3, rtol=0, atol=0)
    model.eval_solver = fixed_iterations(7)
    # with picard: the same iterates as the default loop (which syncs after every iteration)
    options = fixed_iterations(7, fixedpoint.picard).keywords
    assert options["check_every"] == 6
    assert fixed_iterations(7, fixedpoint.picard, check_every=1).keywords["check_every"] == 1
    f = lambda z: 0.5 * torch.tanh(z) + 1.0  # noqa: E731
    z0 = torch.randn(3, 5)
    synced = fixedpoint.picard(f, z0, **{**options, "check_every": 1})
    assert torch.equal(fixed_iterations(7, fixedpoint.picard)(f, z0).x, synced.x)


def test_default_eval_is_the_release_plain_iteration():
    """The bug: the default eval returning picard's best iterate (or f of it) instead of f^n(z0), the release's
    output; or a call too many or too few."""
    f = lambda z: torch.sin(3 * z) + 0.1 * z  # noqa: E731  (not a contraction: the best iterate is not the last)
    z0 = torch.randn(4, 6, dtype=torch.float64)
    expected = z0
    for _ in range(9):
        previous, expected = expected, f(expected)
    sol = fixed_iterations(9)(f, z0)
    assert torch.equal(sol.fx, expected) and torch.equal(sol.x, previous) and sol.nfev == 9
    assert sol.nsteps.tolist() == [8] * 4
    torch.testing.assert_close(sol.residual, ((expected - previous).norm(dim=1) / expected.norm(dim=1)).float())
    with pytest.raises(TypeError, match="check_every"):
        fixed_iterations(3, check_every=1)


def test_fpdm_eval_with_anderson_converges_and_warm_start_matches():
    from functools import partial

    import fixedpoint

    model = _tiny_fpdm().eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2])
    model.eval_solver = partial(fixedpoint.anderson, tol=1e-6, max_iter=100)
    with torch.no_grad():
        cold = model(x, t, y)
        z_star = model.last_fixed_point.z
        cold_calls = model.last_fixed_point.calls
        warm = model(x, t, y, z0=z_star)
    assert model.last_fixed_point.solution.converged.all()
    assert model.last_fixed_point.calls < cold_calls  # starting at the answer is cheaper
    torch.testing.assert_close(warm, cold, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stand_in", ["EagerGraphs", "ReplayedGraphs"])
def test_fpdm_eval_with_solver_graphs_keeps_one_session_across_timesteps(monkeypatch, stand_in):
    """The block is passed with its injection and conditioning as args and runs eagerly: a graph="solver" solver
    captures the solver's graphs at the first forward, and every later forward (another timestep, another noisy
    input: the same solver, options and shapes) replays that one kept session, giving what the eager solver gives
    with the same iterations. CUDA graphs run here through a stand-in (fixedpoint.testing)."""
    from functools import partial

    from fixedpoint import _graphs, testing

    graphs = getattr(testing, stand_in)()
    monkeypatch.setattr(_graphs, "GRAPHS", graphs)
    model = _tiny_fpdm().eval()
    y = torch.tensor([1, 2])
    solver = partial(fixedpoint.picard, tol=1e-6, max_iter=12, check_every=4)
    with torch.no_grad():
        for step, t in enumerate(([900, 900], [500, 400], [20, 5])):
            x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(step)), torch.tensor(t)
            model.eval_solver = partial(solver, graph="solver")
            graphed = model(x, t, y)
            graphed_solution = model.last_fixed_point.solution
            model.eval_solver = solver
            eager = model(x, t, y)
            assert graphs.captures == 2 and len(_graphs._graph_cache) == 1, step  # Picard: a period of 2 positions
            assert graphed_solution.nfev == model.last_fixed_point.solution.nfev
            assert torch.equal(graphed_solution.nsteps, model.last_fixed_point.solution.nsteps)
            torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


def test_pre_post_blocks_see_the_timestep_only_when_asked():
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([3])
    for flag in (False, True):
        model = _tiny_fpdm(timestep_in_pre_post=flag).eval()
        torch.nn.init.normal_(model.blocks_pre[0].adaLN_modulation[-1].weight, std=0.1)
        seen = []
        model.blocks_pre[0].register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
        with torch.no_grad():
            model(x, torch.tensor([10]), y)
            model(x, torch.tensor([900]), y)
        assert torch.equal(seen[0], seen[1]) is (not flag)


def test_fpdm_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = create_model("FPDM-T/2", input_size=8, in_channels=1, num_classes=10, no_grad_iters=(0, 2),
                         grad_iters=(1, 3))  # fmt: skip
    diffusion = Diffusion.create(learn_sigma=True)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.arange(8) % 10
    noise = torch.randn(8, 1, 8, 8)
    t = torch.linspace(100, 900, 8).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = diffusion.training_losses(model, x, t, y, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10
