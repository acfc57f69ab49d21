"""DiT and FPDM: sizes and parameter counts, initialisation, shapes, the fixed-point layer, overfitting."""

from functools import partial

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


# ----------------------------------------------------------------------------- the fixed-point layer is a FixedPoint


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 10])


def _plain_reference(model, x, t, y, calls, z0=None):
    """FPDM's forward written out: pre blocks, injection, ``calls`` plain iterations of the block (the last
    iterate), post blocks, final layer."""
    tokens, t_emb, y_emb = model.embed(x, t, y)
    c_outer = model.outer_condition(t_emb, y_emb)
    for block in model.blocks_pre:
        tokens = block(tokens, c_outer)
    x_inj = model.injection(tokens)
    z = tokens if z0 is None else z0
    for _ in range(calls):
        z = model.block_fixed_point(model.projection(torch.cat([z, x_inj], dim=-1)), t_emb + y_emb)
    for block in model.blocks_post:
        z = block(z, c_outer)
    return model.unpatchify(model.final_layer(z, model.final_condition(t_emb, y_emb)))


def test_fpdm_layer_is_a_fixedpoint_with_the_same_weights_names_and_the_release_numbers():
    """Catches: the map registered as a submodule of the layer (new state_dict keys: old checkpoints and the
    official weights would no longer load), and an eval forward that is not the release's plain iteration."""
    model = _tiny_fpdm().eval()
    assert isinstance(model.fixed_point, fixedpoint.FixedPoint) and model.fixed_point.solver is None
    keys = list(model.state_dict())
    assert not any(k.startswith("fixed_point.") for k in keys) and len(keys) == 47
    assert {k.split(".")[0] for k in keys} == {"x_embedder", "t_embedder", "y_embedder", "blocks_pre", "injection",
                                               "projection", "block_fixed_point", "blocks_post", "final_layer"}
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), _plain_reference(model, x, t, y, 12), rtol=0, atol=0)
        z0 = torch.randn(3, 16, 128, generator=torch.Generator().manual_seed(2))
        out = model(x, t, y, z0=z0, solver=fixed_iterations(5))
        torch.testing.assert_close(out, _plain_reference(model, x, t, y, 5, z0), rtol=0, atol=0)


def test_a_deepcopy_of_fpdm_solves_with_its_own_weights():
    """Catches: the layer's map bound to the original model (an EMA copy, copy.deepcopy(model), would solve
    with the training weights in its fixed-point layer while its other blocks are the EMA's)."""
    import copy

    model = _tiny_fpdm().eval()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.block_fixed_point.parameters():
            p.mul_(0.5)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ema(x, t, y), _plain_reference(ema, x, t, y, 12), rtol=0, atol=0)
        torch.testing.assert_close(model(x, t, y), _plain_reference(model, x, t, y, 12), rtol=0, atol=0)
        assert not torch.equal(ema(x, t, y), model(x, t, y))


def test_fpdm_training_draws_come_from_the_generator_given():
    """Catches: the S-JFB draws not taken from forward's ``generator`` (training would not be reproducible),
    or the generator kept on the model. Values: the counts are what stochastic_jfb draws from that seed, and
    the output is the block applied that many times."""
    model = _tiny_fpdm(no_grad_iters=(0, 10), grad_iters=(1, 12), class_dropout_prob=0.0).train()
    x, t, y = _inputs()
    for seed in (0, 1, 2, 3):
        out = model(x, t, y, generator=torch.Generator().manual_seed(seed))
        expected = torch.Generator().manual_seed(seed)
        n_ng = int(torch.randint(0, 11, (), generator=expected))
        n_g = int(torch.randint(1, 13, (), generator=expected))
        info = model.last_fixed_point.info
        assert (info.no_grad_steps, info.grad_steps, model.last_fixed_point.calls) == (n_ng, n_g, n_ng + n_g)
        torch.testing.assert_close(out, _plain_reference(model, x, t, y, n_ng + n_g), rtol=0, atol=0)
    assert model.generator is None
    model.generator = torch.Generator().manual_seed(3)  # the model's generator: for forwards given none
    model(x, t, y)
    assert (model.last_fixed_point.info.no_grad_steps, model.last_fixed_point.info.grad_steps) == (n_ng, n_g)


def test_a_per_call_solver_does_not_leak_into_the_next_call_even_when_it_raises():
    """Catches: the per-call solver stored on the model or its layer (a failed sampling run left its last step's
    solver behind), and ``eval_solver`` no longer being the layer's (setting it would change nothing)."""
    model = _tiny_fpdm().eval()
    own = model.eval_solver
    x, t, y = _inputs()

    def fails(*args, **kwargs):
        raise RuntimeError("a failing solver")

    with torch.no_grad(), pytest.raises(RuntimeError, match="a failing solver"):
        model(x, t, y, solver=fails)
    assert model.eval_solver is own is model.fixed_point.eval_solver
    with torch.no_grad():
        out = model(x, t, y)
    assert model.last_fixed_point.calls == 12
    torch.testing.assert_close(out, _plain_reference(model, x, t, y, 12), rtol=0, atol=0)
    model.eval_solver = fixed_iterations(4)  # the documented way to change the model's own
    assert model.fixed_point.eval_solver is model.eval_solver
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), _plain_reference(model, x, t, y, 4), rtol=0, atol=0)
    with pytest.raises(TypeError, match="eval_solver must be a solver function, got NoneType"):
        model.eval_solver = None


def test_fpdm_in_eval_with_autograd_has_the_implicit_gradient_at_the_eval_solution():
    """Catches: an eval forward with autograd on whose fixed-point layer passes no gradient (fixedpoint's solvers
    run without autograd), or a wrong one. Values: the output equals the no-grad output, and at a converged
    fixed point the implicit gradient equals backprop through many plain iterations (a contraction here)."""
    model = _tiny_fpdm().eval()
    with torch.no_grad():  # a contractive block: plain iteration converges, and unrolling it gives the exact gradient
        model.projection[-1].weight.mul_(0.2)
    x, t, y = _inputs()
    solver = partial(fixedpoint.anderson, tol=1e-6, max_iter=200)
    with torch.no_grad():
        expected = model(x, t, y, solver=solver)
    out = model(x, t, y, solver=solver)
    assert model.last_fixed_point.solution.converged.all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    implicit = model.injection.weight.grad.clone()
    model.zero_grad()
    reference = _plain_reference(model, x, t, y, 200)
    torch.testing.assert_close(reference, expected, rtol=1e-4, atol=1e-5)
    (reference * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert implicit.abs().sum() > 0
    torch.testing.assert_close(implicit, model.injection.weight.grad, rtol=1e-3, atol=1e-5)
