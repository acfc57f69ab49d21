"""The diffusion process against closed forms, and the samplers' determinism."""

import math

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------------
# Against DiT's released diffusion code (facebookresearch/DiT diffusion/{respace,gaussian_diffusion,diffusion_utils}.py,
# which the FPDM release copies). The references below are transcribed from the published code, independently of
# fpdm.diffusion: float64 numpy tables, indexed then cast to float32, and DiT's float32 torch arithmetic.


def _dit_space_timesteps(num_timesteps, section_counts):
    """respace.space_timesteps, transcribed."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError("cannot create exactly that many steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:  # noqa: SIM108 (as published)
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("num_timesteps", [1000, 21, 250, 999, 4000])
def test_space_timesteps_is_dits_for_every_step_count(num_timesteps):
    """DiT accumulates the float stride (cur_idx += stride); round(i * stride) differs by one at single points for
    278 of the 1000 step counts of a 1000-step process."""
    for steps in range(1, min(num_timesteps, 1000) + 1):
        expected = sorted(_dit_space_timesteps(num_timesteps, str(steps)))
        assert space_timesteps(num_timesteps, steps) == expected, steps


def test_space_timesteps_named_case_and_string_forms():
    keep = space_timesteps(1000, 21)
    assert 499 in keep and 500 not in keep  # DiT's 21-step DDIM (round(10 * 49.95) = 500 is the bug)
    assert Diffusion.create(1000, steps=21).timesteps.tolist() == keep
    for spec in ("ddim25", "ddim50", "ddim1000", "10,15,20", "1,2", "7", "0,5"):
        assert space_timesteps(1000, spec) == sorted(_dit_space_timesteps(1000, spec)), spec
    assert space_timesteps(300, "10,15,20") == sorted(_dit_space_timesteps(300, [10, 15, 20]))
    assert Diffusion.create(1000, steps="ddim25").timesteps.tolist() == list(range(0, 1000, 40))
    with pytest.raises(ValueError, match="exactly 999 steps"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section of 334 steps into 400"):
        space_timesteps(1000, "400,10,10")
    with pytest.raises(ValueError, match="'ddimx'"):
        space_timesteps(1000, "ddimx")
    with pytest.raises(ValueError, match="'5,a'"):
        space_timesteps(1000, "5,a")


def _dit_normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def _dit_approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _dit_discretized_gaussian_log_likelihood(x, *, means, log_scales):
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _dit_approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = _dit_approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _dit_extract(arr, timesteps, broadcast_shape):
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res + torch.zeros(broadcast_shape, device=timesteps.device)


def _mean_flat(x):
    return x.mean(dim=list(range(1, len(x.shape))))


class _DiTDiffusion:
    """create_diffusion(timestep_respacing, learn_sigma): SpacedDiffusion over DiT's linear schedule, epsilon
    prediction, LEARNED_RANGE (or FIXED_LARGE) variance, LossType.MSE. The model output is passed in directly
    (``out``), the model having been called with ``timestep_map[t]``."""

    def __init__(self, steps=None, learn_sigma=True, num_timesteps=1000):
        scale = 1000 / num_timesteps
        base_betas = np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
        use = set(range(num_timesteps)) if steps is None else _dit_space_timesteps(num_timesteps, str(steps))
        base_alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        last_alpha_cumprod, new_betas, self.timestep_map = 1.0, [], []
        for i, alpha_cumprod in enumerate(base_alphas_cumprod):
            if i in use:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        betas = np.array(new_betas, dtype=np.float64)
        self.learn_sigma = learn_sigma
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def q_sample(self, x_start, t, noise):
        return (
            _dit_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _dit_extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (
            _dit_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _dit_extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return mean, _dit_extract(self.posterior_log_variance_clipped, t, x_t.shape)

    def p_mean_variance(self, model_output, x, t, clip_denoised):
        C = x.shape[1]
        if self.learn_sigma:
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            min_log = _dit_extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _dit_extract(np.log(self.betas), t, x.shape)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:
            fixed = np.append(self.posterior_variance[1], self.betas[1:])
            model_log_variance = _dit_extract(np.log(fixed), t, x.shape)
        pred_xstart = (
            _dit_extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
            - _dit_extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output
        )
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "log_variance": model_log_variance, "pred_xstart": pred_xstart}

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = _mean_flat(_dit_normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"]))
        kl = kl / np.log(2.0)
        decoder_nll = -_dit_discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = _mean_flat(decoder_nll) / np.log(2.0)
        return torch.where((t == 0), decoder_nll, kl)

    def training_losses(self, model_output, x_start, t, noise):
        C = x_start.shape[1]
        model_output, model_var_values = torch.split(model_output, C, dim=1)
        frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
        x_t = self.q_sample(x_start, t, noise)
        return _mean_flat((noise - model_output) ** 2) + self.vb_terms_bpd(frozen_out, x_start, x_t, t)

    def p_sample(self, model_output, x, t, noise, clip_denoised=False):
        out = self.p_mean_variance(model_output, x, t, clip_denoised)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model_output, x, t, noise, eta, clip_denoised=False):
        out = self.p_mean_variance(model_output, x, t, clip_denoised)
        eps = (_dit_extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - out["pred_xstart"]) / _dit_extract(
            self.sqrt_recipm1_alphas_cumprod, t, x.shape
        )
        alpha_bar = _dit_extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _dit_extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return mean_pred + nonzero_mask * sigma * noise


def _fake_model(x, t, y):
    """Deterministic, depends on x, the original timestep and the class: eps (C channels) and variance values."""
    c = x.shape[1]
    phase = t.float().view(-1, 1, 1, 1) / 100 + torch.arange(c).view(1, c, 1, 1) + y.float().view(-1, 1, 1, 1)
    eps = 0.1 * x + 0.5 * torch.sin(phase)
    return torch.cat([eps, torch.tanh(0.3 * x + torch.cos(phase))], dim=1)


def test_q_sample_uses_dits_float64_coefficients():
    d, ref = Diffusion.create(1000), _DiTDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    t = torch.tensor([0, 1, 2, 500, 999])
    torch.testing.assert_close(d.q_sample(x0, t, noise), ref.q_sample(x0, t, noise), rtol=1e-6, atol=1e-7)
    # sqrt(1 - abar) at t = 0 from the float64 table: from an fp32 abar (1 - 1e-4) it is off by ~3e-4 relative
    coef = d.q_sample(torch.zeros(1, 1, 1, 1), torch.tensor([0]), torch.ones(1, 1, 1, 1)).item()
    assert coef == pytest.approx(np.float32(np.sqrt(1.0 - ref.alphas_cumprod[0])), rel=1e-7)


def test_training_loss_matches_dit_at_the_first_and_last_timesteps():
    """MSE + vb (learned sigma) against DiT's; an fp32 abar makes the vb term differ by ~1e-4 relative at t = 0..2."""
    d, ref = Diffusion.create(1000, learn_sigma=True), _DiTDiffusion()
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(5, 4, 4, 4, generator=g) * 2.2 - 1.1).clamp(-1, 1)  # some pixels at +-1: the edge bins
    noise = torch.randn(5, 4, 4, 4, generator=g)
    # an eps unrelated to the noise (an untrained model): fp32 abar puts ~1e-4 (t = 0, 1) and ~5e-6 (t = 2) in vb
    out = torch.cat([torch.randn(5, 4, 4, 4, generator=g), torch.rand(5, 4, 4, 4, generator=g) * 2 - 1], 1)
    t = torch.tensor([0, 1, 2, 500, 999])
    y = torch.zeros(5, dtype=torch.long)
    seen = []

    def model(xt, t_model, y_model):
        seen.append(t_model.clone())
        return out

    loss = d.training_losses(model, x0, t, y, noise)
    expected = ref.training_losses(out, x0, t, noise)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert seen[0].tolist() == t.tolist()
    xt = ref.q_sample(x0, t, noise)
    torch.testing.assert_close(d.vb_terms(out, x0, xt, t), ref.vb_terms_bpd(out, x0, xt, t), rtol=1e-6, atol=0)


def _model_steps(ref, model, noise, y, step):
    """DiT's sampling loop: the model sees timestep_map[t]; ``step(out, x, t)`` is one of the reference's samplers."""
    x, xs = noise, []
    for i in reversed(range(ref.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        out = model(x, torch.tensor(ref.timestep_map)[t], y)
        x = step(out, x, t, i)
        xs.append(x)
    return xs


def _noises(seed, n, shape):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("steps", [21, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_trajectory_matches_dit_step_by_step(steps, eta, clip):
    d, ref = Diffusion.create(1000, steps=steps), _DiTDiffusion(steps)
    assert d.timesteps.tolist() == ref.timestep_map
    shape, y = (2, 4, 4, 4), torch.tensor([3, 7])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    # ours draws z only for i > 0 when eta > 0, in that order; DiT's noise at t = 0 (and at eta = 0) is multiplied by 0
    zs = _noises(5, steps - 1, shape) if eta > 0 else []
    zs = zs + [torch.zeros(shape)] * (steps - len(zs))

    def step(out, x, t, i):
        return ref.ddim_sample(out, x, t, zs[steps - 1 - i] if eta > 0 else torch.zeros(shape), eta, clip)

    expected = _model_steps(ref, _fake_model, x_T, y, step)
    got = list(d.ddim_steps(_fake_model, x_T, y, eta=eta, clip=clip, generator=torch.Generator().manual_seed(5)))
    assert len(got) == len(expected) == steps
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"step {i}: {m}")


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddpm_trajectory_matches_dit_step_by_step(learn_sigma):
    steps = 21
    d, ref = Diffusion.create(1000, steps=steps, learn_sigma=learn_sigma), _DiTDiffusion(steps, learn_sigma)
    shape, y = (2, 4, 4, 4), torch.tensor([1, 2])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    zs = _noises(6, steps - 1, shape) + [torch.zeros(shape)]

    def model(x, t, y):
        out = _fake_model(x, t, y)
        return out if learn_sigma else out[:, : x.shape[1]]

    expected = _model_steps(ref, model, x_T, y, lambda out, x, t, i: ref.p_sample(out, x, t, zs[steps - 1 - i]))
    got = list(d.ddpm_steps(model, x_T, y, generator=torch.Generator().manual_seed(6)))
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"step {i}: {m}")


def _dit_forward_with_cfg(forward, x, t, y, cfg_scale, in_channels=None):
    """models.DiT.forward_with_cfg, transcribed (``in_channels`` set: the commented-out all-channel line)."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = forward(combined, t, y)
    k = 3 if in_channels is None else in_channels
    eps, rest = model_out[:, :k], model_out[:, k:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def test_guidance_on_three_channels_is_dits_forward_with_cfg():
    """DiT's (and the FPDM release's) published FIDs guide only the first 3 of the 4 latent channels."""
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    t, y, null = torch.tensor([40, 40]), torch.tensor([3, 5]), 10
    # DiT's sample.py: z doubled, y = [y, null], t over the doubled batch
    dit_in = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    dit_three = _dit_forward_with_cfg(_fake_model, *dit_in, 4.0)[:2]
    dit_all = _dit_forward_with_cfg(_fake_model, *dit_in, 4.0, in_channels=4)[:2]
    torch.testing.assert_close(guided(_fake_model, 4.0, null, channels=3)(x, t, y), dit_three, rtol=0, atol=0)
    torch.testing.assert_close(guided(_fake_model, 4.0, null)(x, t, y), dit_all, rtol=0, atol=0)
    assert not torch.allclose(dit_three[:, 3], dit_all[:, 3])  # the 4th channel's eps is what differs
    torch.testing.assert_close(guided(_fake_model, 4.0, null, channels=4)(x, t, y), dit_all, rtol=0, atol=0)


def test_guidance_channels_are_validated():
    x, t, y = torch.zeros(1, 4, 2, 2), torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match="got 0"):
        guided(_fake_model, 4.0, 10, channels=0)
    with pytest.raises(ValueError, match="channels=5 exceeds the input's 4 channels"):
        guided(_fake_model, 4.0, 10, channels=5)(x, t, y)
