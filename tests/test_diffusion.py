"""The diffusion process against closed forms, and the samplers' determinism."""

import math

import pytest
import torch

from fpdm.diffusion import Diffusion, guided, space_timesteps


def test_linear_schedule_endpoints_and_marginals():
    d = Diffusion.create(1000)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    ab = torch.cumprod(1 - d.betas, 0)[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_respaced_process_keeps_the_marginals():
    full, short = Diffusion.create(1000), Diffusion.create(1000, steps=25)
    assert len(short.timesteps) == 25 and short.timesteps[0] == 0 and short.timesteps[-1] == 999
    torch.testing.assert_close(short.alphas_cumprod, full.alphas_cumprod[short.timesteps])


def test_space_timesteps_rejects_bad_counts():
    assert space_timesteps(1000, 1) == [0]
    with pytest.raises(ValueError, match="sampling steps.*0"):
        space_timesteps(1000, 0)
    with pytest.raises(ValueError, match="1001"):
        space_timesteps(1000, 1001)


def test_posterior_matches_bayes_rule_for_gaussians():
    """q(x_{t-1} | x_t, x_0) from the closed form equals the product-of-Gaussians computation."""
    d = Diffusion.create(1000)
    t = torch.tensor([300])
    x0, xt = torch.randn(1, 1, 1, 1).double(), torch.randn(1, 1, 1, 1).double()
    mean, log_var = d.q_posterior(x0, xt, t)
    ab_prev, beta = d.alphas_cumprod_prev[300], d.betas[300]
    # prior x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    expected_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * xt / beta) / prec
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    assert math.isclose(log_var.item(), math.log(1 / prec.item()), rel_tol=1e-5)


def test_loss_of_an_oracle_is_zero_mse_and_vb_is_nonnegative():
    d = Diffusion.create(1000, learn_sigma=True)
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 10, 100, 500, 999])

    def oracle(xt, t_model, y):  # knows the noise; variance at the lower bound
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    loss = d.training_losses(oracle, x0, t, torch.zeros(6, dtype=torch.long), noise)
    assert (loss[1:] >= 0).all() and (loss[1:] < 1e-3).all()  # KL with the true mean and variance is ~0
    plain = Diffusion.create(1000, learn_sigma=False)
    zero = plain.training_losses(lambda *a: torch.zeros_like(x0), x0, t, torch.zeros(6, dtype=torch.long), noise)
    torch.testing.assert_close(zero, (noise**2).mean(dim=(1, 2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    return lambda x, t, y: torch.tanh(net(x)) + 0.01 * t.view(-1, 1, 1, 1) / 1000


def test_ddim_with_eta_zero_is_deterministic():
    d = Diffusion.create(1000, steps=20)
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        a = d.sample(_model(), noise, y, method="ddim", eta=0.0)
        b = d.sample(_model(), noise, y, method="ddim", eta=0.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_stochastic_samplers_are_reproducible_with_a_generator():
    d = Diffusion.create(1000, steps=10)
    noise, y = torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        for method, eta in (("ddpm", 0.0), ("ddim", 1.0)):
            a = d.sample(_model(), noise, y, method=method, eta=eta, generator=torch.Generator().manual_seed(3))
            b = d.sample(_model(), noise, y, method=method, eta=eta, generator=torch.Generator().manual_seed(3))
            c = d.sample(_model(), noise, y, method=method, eta=eta, generator=torch.Generator().manual_seed(4))
            assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_with_a_perfect_denoiser_recovers_the_data():
    """If the model predicts the true noise of a single known point, DDIM lands on that point."""
    d = Diffusion.create(1000, steps=50, learn_sigma=False)
    target = torch.full((1, 1, 2, 2), 0.5)

    def oracle(x, t, y):
        ab = d.alphas_cumprod[(d.timesteps == t[0]).nonzero()[0, 0]].float()
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    out = d.sample(oracle, torch.randn(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), method="ddim")
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_classifier_free_guidance_combines_the_two_halves():
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        eps = torch.where((y == 10).view(-1, 1, 1, 1), 1.0, 3.0).expand(-1, 1, 2, 2)
        return torch.cat([eps, torch.full_like(eps, 0.25)], dim=1)

    out = guided(model, 4.0, null_class=10)(torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2]))
    assert calls[0].tolist() == [1, 2, 10, 10]
    torch.testing.assert_close(out[:, :1], torch.full((2, 1, 2, 2), 1.0 + 4.0 * (3.0 - 1.0)))
    torch.testing.assert_close(out[:, 1:], torch.full((2, 1, 2, 2), 0.25))
    assert guided(model, 1.0, null_class=10) is model


def test_bad_sampler_arguments():
    d = Diffusion.create(1000, steps=5)
    with pytest.raises(ValueError, match="eta.*1.5"):
        d.sample(_model(), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), eta=1.5)
    with pytest.raises(ValueError, match="'plms'"):
        d.sample(_model(), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), method="plms")
